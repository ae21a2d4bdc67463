//! One redis-server for the redis-* cases: a free 127.0.0.1 port, the run's temporary
//! directory, no persistence (`--save '' --appendonly no`), stopped at the end of the run.
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

impl RedisServer {
    pub fn start(binary: &Path, keep: bool) -> Result<RedisServer, String> {
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
        let mut cmd = Command::new(binary);
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
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
            dir,
            child: Some(child),
            keep,
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let t0 = Instant::now();
        while !ping(addr) {
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
            "martd-bench: redis-server {} on 127.0.0.1:{port} (pid {}, dir {}, namespace {})",
            r.version,
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
