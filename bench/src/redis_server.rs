//! One redis-server for the redis-* cases: a free 127.0.0.1 port, the run's temporary
//! directory, no persistence (`--save '' --appendonly no`), stopped at the end of the run.
//!
//! With `tls`, it serves TLS only (`--port 0 --tls-port P`) with a certificate for `localhost`
//! (and 127.0.0.1) signed by a throw-away CA, both made with the `openssl` command in that
//! directory; clients are not asked for certificates.
//!
//! It is bounded in time twice over: the run stops it (SIGTERM, then SIGKILL), and it gets
//! SIGKILL if this process dies first (PR_SET_PDEATHSIG), so it never outlives the run.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::server;

pub struct RedisServer {
    pub port: u16,
    /// The key prefix the nodes of this run share (martd_redis_namespace,
    /// nchan_redis_namespace): unique per run.
    pub namespace: String,
    pub version: String,
    /// TLS only: the CA certificate that verifies the server (`ca.pem` in its directory).
    pub ca: Option<PathBuf>,
    dir: PathBuf,
    child: Option<Child>,
    keep: bool,
}

/// `PING` over a plain socket; true on `+PONG`.
fn ping(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 16];
    s.write_all(b"PING\r\n").is_ok()
        && s.read(&mut buf).map(|n| buf[..n].starts_with(b"+PONG")).unwrap_or(false)
}

/// `PING` over TLS with `redis-cli` (next to `binary`, else on the PATH); true on `PONG`.
fn ping_tls(binary: &Path, port: u16, ca: &Path) -> bool {
    let cli = binary.with_file_name("redis-cli");
    let cli = if cli.exists() { cli } else { PathBuf::from("redis-cli") };
    Command::new(cli)
        .args(["--tls", "--cacert"])
        .arg(ca)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "PING"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "PONG")
        .unwrap_or(false)
}

/// A throw-away CA (`ca.pem`, `ca.key`) and a certificate for `localhost` and 127.0.0.1 that
/// it signs (`cert.pem`, `key.pem`), EC P-256 keys, valid 2 days, made in `dir`.
fn make_certificates(dir: &Path) -> Result<(), String> {
    let openssl = |args: &[&str]| -> Result<(), String> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("openssl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("openssl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)))
        }
    };
    let key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let ca = ["req", "-x509", "-days", "2", "-subj", "/CN=martd-bench CA"];
    openssl(&[&ca[..], &key, &["-keyout", "ca.key", "-out", "ca.pem"]].concat())?;
    let leaf = ["req", "-x509", "-CA", "ca.pem", "-CAkey", "ca.key", "-days", "2"];
    let ext = [
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=DNS:localhost,IP:127.0.0.1",
        "-addext",
        "basicConstraints=CA:FALSE",
    ];
    openssl(&[&leaf[..], &key, &ext, &["-keyout", "key.pem", "-out", "cert.pem"]].concat())
}

impl RedisServer {
    pub fn start(binary: &Path, keep: bool, tls: bool) -> Result<RedisServer, String> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("bind 127.0.0.1:0: {e}"))?
            .port();
        let base = std::env::var_os("TMPDIR").map(PathBuf::from).unwrap_or("/tmp".into());
        let nanos = crate::http::now_us();
        let dir = base.join(format!("martd-bench.redis.{}.{port}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let log = fs::File::create(dir.join("redis.log")).map_err(|e| e.to_string())?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let ca = if tls {
            make_certificates(&dir)?;
            Some(dir.join("ca.pem"))
        } else {
            None
        };
        let mut cmd = Command::new(binary);
        if tls {
            let f = |name: &str| dir.join(name).into_os_string();
            cmd.args(["--port", "0", "--tls-port", &port.to_string()])
                .arg("--tls-cert-file")
                .arg(f("cert.pem"))
                .arg("--tls-key-file")
                .arg(f("key.pem"))
                .arg("--tls-ca-cert-file")
                .arg(f("ca.pem"))
                .args(["--tls-auth-clients", "no"]);
        } else {
            cmd.args(["--port", &port.to_string()]);
        }
        cmd.args(["--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes"])
            .arg("--dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death signal.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| format!("{}: {e}", binary.display()))?;
        let version = Command::new(binary)
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.split_whitespace().find_map(|w| w.strip_prefix("v=").map(String::from)))
            .unwrap_or_else(|| "?".into());
        let mut r = RedisServer {
            port,
            namespace: format!("mb{}x{nanos}", std::process::id()),
            version,
            ca,
            dir,
            child: Some(child),
            keep,
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let t0 = Instant::now();
        let up = |r: &RedisServer| match &r.ca {
            Some(ca) => ping_tls(binary, port, ca),
            None => ping(addr),
        };
        while !up(&r) {
            if let Some(st) = r.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                r.child = None;
                let log = fs::read_to_string(r.dir.join("redis.log")).unwrap_or_default();
                return Err(format!("redis-server exited at start ({st}): {log}"));
            }
            if t0.elapsed() > Duration::from_secs(10) {
                return Err(format!("redis-server did not answer PING on {addr} within 10 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "martd-bench: redis-server {} on 127.0.0.1:{port}{} (pid {}, dir {}, namespace {})",
            r.version,
            if r.ca.is_some() { " (TLS only)" } else { "" },
            r.pid(),
            r.dir.display(),
            r.namespace
        );
        Ok(r)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// CPU time redis-server has used so far, in µs.
    pub fn cpu_us(&self) -> u64 {
        server::proc_cpu_us(self.pid())
    }

    /// SIGTERM (redis-server exits at once without persistence), SIGKILL after 5 s. Returns
    /// false if it had to be killed or had exited on its own before.
    pub fn stop(mut self) -> bool {
        let mut clean = false;
        if let Some(mut c) = self.child.take() {
            if c.try_wait().ok().flatten().is_none() {
                // SAFETY: signalling our own child process.
                unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
                let t0 = Instant::now();
                while t0.elapsed() < Duration::from_secs(5) {
                    if c.try_wait().ok().flatten().is_some() {
                        clean = true;
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        if self.keep || !clean {
            eprintln!("martd-bench: kept {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
        clean
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
