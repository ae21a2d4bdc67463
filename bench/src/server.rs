//! One nginx under test: configuration, start, worker pids, worker memory, stop, error log.

use std::fs;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::args::Args;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Martd,
    Nchan,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Martd => "martd",
            Kind::Nchan => "nchan",
        }
    }
}

pub struct ServerOpts {
    pub kind: Kind,
    pub nginx: PathBuf,
    pub module: PathBuf,
    pub workers: usize,
    pub keep: bool,
    /// Also a multi-channel listen location, `/subj` (martd: `martd_listen json`) or `/subm`
    /// (nchan: `nchan_channel_id $arg_chs` split at commas): set by the scenarios that use it, so
    /// that the other cases' configuration stays as it was.
    pub multi: bool,
    /// Also a streaming location, `/subs` (martd: `martd_listen eventsource websocket stream`;
    /// nchan: `nchan_subscriber eventsource websocket`): set by the stream scenarios alone.
    pub streams: bool,
    /// The redis-* cases: every node of the run shares channels through this Redis. martd:
    /// `martd_redis_url` and `martd_redis_namespace` at http level; nchan: an
    /// `upstream { nchan_redis_server ..; nchan_redis_namespace ..; }` and `nchan_redis_pass`
    /// in `/pub` and `/sub`.
    pub redis: Option<RedisLink>,
}

/// Where the nodes of a redis-* run find their Redis.
pub struct RedisLink {
    pub port: u16,
    /// The key prefix the nodes share.
    pub namespace: String,
    /// TLS only (martd alone): the CA certificate that verifies the server; martd then uses
    /// `rediss://localhost:PORT` and `martd_redis_trusted_certificate`.
    pub ca: Option<PathBuf>,
}

impl ServerOpts {
    pub fn from_args(a: &Args) -> Result<ServerOpts, String> {
        let kind = match a.str_opt("server").as_deref() {
            Some("martd") => Kind::Martd,
            Some("nchan") => Kind::Nchan,
            Some(o) => return Err(format!("--server: {o:?} is neither martd nor nchan")),
            None => return Err("--server martd|nchan is required".into()),
        };
        let martd_default =
            concat!(env!("CARGO_MANIFEST_DIR"), "/../target/debian-nginx/ngx_http_martd_module.so");
        let martd = a.string("martd-module", martd_default);
        let nchan = a.string("nchan-module", "/usr/lib/nginx/modules/ngx_nchan_module.so");
        let module = PathBuf::from(if kind == Kind::Martd { martd } else { nchan });
        let module = fs::canonicalize(&module)
            .map_err(|e| format!("{} module {}: {e}", kind.name(), module.display()))?;
        Ok(ServerOpts {
            kind,
            nginx: PathBuf::from(a.string("nginx", "/usr/sbin/nginx")),
            module,
            workers: a.num("workers", 2)?,
            keep: a.flag("keep"),
            multi: false,
            streams: false,
            redis: None,
        })
    }
}

pub struct Server {
    pub kind: Kind,
    pub addr: SocketAddr,
    pub workers: usize,
    prefix: PathBuf,
    child: Option<Child>,
    keep: bool,
}

/// Worker memory, summed over the workers, in bytes (from /proc/PID/status).
#[derive(Clone, Copy, Default, Debug)]
pub struct Mem {
    pub rss: u64,
    pub anon: u64,
    pub shmem: u64,
}

pub struct StopReport {
    /// `quit` (graceful, the normal case), `term` or `kill`.
    pub how: &'static str,
    /// [alert], [crit] and [emerg] lines of the error log and the master's stderr.
    pub alerts: Vec<String>,
}

fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind 127.0.0.1:0: {e}"))?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn config(
    kind: Kind,
    module: &Path,
    workers: usize,
    port: u16,
    multi: bool,
    streams: bool,
    redis: Option<&RedisLink>,
) -> String {
    let (zone, locations) = match kind {
        Kind::Martd => (
            "martd_shm_size 256m;",
            "location = /pub { martd_push; }\n        \
             location = /sub { martd_listen; martd_listener_timeout 0; }",
        ),
        Kind::Nchan => (
            "nchan_shared_memory_size 256m;",
            "location = /pub { nchan_publisher; nchan_channel_id $arg_channel; \
             nchan_message_buffer_length 10; nchan_message_timeout 1h; }\n        \
             location = /sub { nchan_subscriber longpoll; nchan_channel_id $arg_channel; \
             nchan_subscriber_timeout 0; nchan_subscriber_first_message oldest; }",
        ),
    };
    let mut locations = locations.to_string();
    let mut zone = zone.to_string();
    if let Some(RedisLink { port, namespace: ns, ca }) = redis {
        match (kind, ca) {
            (Kind::Martd, None) => {
                zone.push_str(&format!(
                    "\n    martd_redis_url redis://127.0.0.1:{port};\n    martd_redis_namespace {ns};"
                ));
            }
            (Kind::Martd, Some(ca)) => {
                zone.push_str(&format!(
                    "\n    martd_redis_url rediss://localhost:{port};\n    \
                     martd_redis_trusted_certificate {};\n    martd_redis_namespace {ns};",
                    ca.display()
                ));
            }
            // TLS to Redis is measured for martd only (refused before a node starts).
            (Kind::Nchan, _) => {
                zone.push_str(&format!(
                    "\n    upstream bench_redis {{ nchan_redis_server \"redis://127.0.0.1:{port}\"; \
                     nchan_redis_namespace {ns}; }}"
                ));
                // The channels of /pub and /sub (the only locations the redis cases use).
                locations = locations.replace("; }", "; nchan_redis_pass bench_redis; }");
            }
        }
    }
    if multi {
        locations.push_str(match kind {
            Kind::Martd => {
                "\n        location = /subj { martd_listen json; martd_listener_timeout 0; }"
            }
            Kind::Nchan => {
                "\n        location = /subm { nchan_subscriber longpoll; nchan_channel_id $arg_chs; \
                 nchan_channel_id_split_delimiter \",\"; nchan_subscriber_timeout 0; \
                 nchan_subscriber_first_message oldest; }"
            }
        });
    }
    if streams {
        locations.push_str(match kind {
            Kind::Martd => {
                "\n        location = /subs { martd_listen eventsource websocket stream; }"
            }
            Kind::Nchan => {
                "\n        location = /subs { nchan_subscriber eventsource websocket; \
                 nchan_channel_id $arg_channel; nchan_subscriber_timeout 0; \
                 nchan_subscriber_first_message oldest; }"
            }
        });
    }
    let body64 = "m".repeat(64);
    format!(
        "load_module {module};
daemon off;
worker_processes {workers};
worker_rlimit_nofile 20000;
error_log logs/error.log notice;
pid logs/nginx.pid;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    client_body_temp_path tmp/client_body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 600s;
    client_body_buffer_size 128k;
    client_max_body_size 1m;
    {zone}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        add_header X-Worker $pid always;
        {locations}
        location = /ret {{ return 200; }}
        location = /ret64 {{ return 200 \"{body64}\"; }}
        location / {{ return 404; }}
    }}
}}
",
        module = module.display()
    )
}

/// Pids of the processes whose parent is `ppid`.
pub fn children_of(ppid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else { return out };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // pid (comm) state ppid ...: comm may hold spaces and parentheses.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { continue };
        let mut f = rest.split_whitespace();
        f.next();
        if f.next().and_then(|p| p.parse::<u32>().ok()) == Some(ppid) {
            out.push(pid);
        }
    }
    out.sort_unstable();
    out
}

pub fn proc_mem(pid: u32) -> Mem {
    let mut m = Mem::default();
    let Ok(s) = fs::read_to_string(format!("/proc/{pid}/status")) else { return m };
    for line in s.lines() {
        let kb = |l: &str| -> u64 {
            l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 1024
        };
        if line.starts_with("VmRSS:") {
            m.rss = kb(line);
        } else if line.starts_with("RssAnon:") {
            m.anon = kb(line);
        } else if line.starts_with("RssShmem:") {
            m.shmem = kb(line);
        }
    }
    m
}

/// CPU time (user + system) a process has used so far, in microseconds.
pub fn proc_cpu_us(pid: u32) -> u64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { return 0 };
    // After the comm: state(3) ppid(4) ... utime(14) stime(15).
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    ticks * 1_000_000 / hz
}

/// (busy, total) CPU time of the whole machine so far, in µs (first line of /proc/stat).
pub fn machine_cpu_us() -> (u64, u64) {
    let s = fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = f.iter().sum();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    ((total - idle) * 1_000_000 / hz, total * 1_000_000 / hz)
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Server {
    pub fn start(o: &ServerOpts) -> Result<Server, String> {
        let port = free_port()?;
        let base = std::env::var_os("TMPDIR").map(PathBuf::from).unwrap_or("/tmp".into());
        let prefix = base.join(format!(
            "martd-bench.{}.{}.{}",
            o.kind.name(),
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&prefix);
        fs::create_dir_all(prefix.join("logs"))
            .map_err(|e| format!("{}: {e}", prefix.display()))?;
        fs::create_dir_all(prefix.join("tmp")).map_err(|e| e.to_string())?;
        // Workers may run as an unprivileged user: let them reach the prefix.
        for d in [&prefix, &prefix.join("tmp")] {
            use std::os::unix::fs::PermissionsExt;
            let _ = fs::set_permissions(d, fs::Permissions::from_mode(0o755));
        }
        // Load a private copy of the module: a rebuild that overwrites the original in place
        // would crash (SIGBUS) workers that have it mapped.
        let module = prefix.join(o.module.file_name().unwrap_or("module.so".as_ref()));
        fs::copy(&o.module, &module).map_err(|e| format!("copy {}: {e}", o.module.display()))?;
        let conf = prefix.join("nginx.conf");
        let text = config(o.kind, &module, o.workers, port, o.multi, o.streams, o.redis.as_ref());
        fs::write(&conf, text).map_err(|e| e.to_string())?;
        let stderr = fs::File::create(prefix.join("stderr")).map_err(|e| e.to_string())?;
        let mut prefix_arg = prefix.clone().into_os_string();
        prefix_arg.push("/");
        let child = Command::new(&o.nginx)
            .arg("-p")
            .arg(&prefix_arg)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("{}: {e}", o.nginx.display()))?;
        let mut s = Server {
            kind: o.kind,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            workers: o.workers,
            prefix,
            child: Some(child),
            keep: o.keep,
        };
        let t0 = Instant::now();
        loop {
            if let Some(st) = s.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                s.child = None;
                let err = fs::read_to_string(s.prefix.join("stderr")).unwrap_or_default();
                let log = fs::read_to_string(s.prefix.join("logs/error.log")).unwrap_or_default();
                return Err(format!("nginx exited at start ({st}): {err}{log}"));
            }
            let up = TcpStream::connect_timeout(&s.addr, Duration::from_millis(200)).is_ok();
            if up && s.worker_pids().len() == o.workers {
                break;
            }
            if t0.elapsed() > Duration::from_secs(15) {
                return Err(format!("nginx did not come up on {} within 15 s", s.addr));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "martd-bench: {} on http://{} (nginx {}, workers {:?}, prefix {})",
            o.kind.name(),
            s.addr,
            s.master_pid(),
            s.worker_pids(),
            s.prefix.display()
        );
        Ok(s)
    }

    pub fn master_pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn worker_pids(&self) -> Vec<u32> {
        children_of(self.master_pid())
    }

    pub fn mem(&self) -> Mem {
        let mut m = Mem::default();
        for p in self.worker_pids() {
            let w = proc_mem(p);
            m.rss += w.rss;
            m.anon += w.anon;
            m.shmem += w.shmem;
        }
        m
    }

    /// CPU time used so far by the workers together, and by this (client) process, in µs.
    pub fn cpu_us(&self) -> (u64, u64) {
        let workers = self.worker_pids().into_iter().map(proc_cpu_us).sum();
        (workers, proc_cpu_us(std::process::id()))
    }

    /// Error-log lines that mean trouble; also reports a worker that crashed.
    pub fn alerts(&self) -> Vec<String> {
        let mut out = Vec::new();
        for f in ["logs/error.log", "stderr"] {
            let mut s = String::new();
            if let Ok(mut fh) = fs::File::open(self.prefix.join(f)) {
                let _ = fh.read_to_string(&mut s);
            }
            out.extend(
                s.lines()
                    .filter(|l| ["[alert]", "[crit]", "[emerg]"].iter().any(|k| l.contains(k)))
                    .map(str::to_string),
            );
        }
        out
    }

    /// Graceful stop (SIGQUIT; SIGTERM after 10 s, SIGKILL after 5 more).
    pub fn stop(mut self) -> StopReport {
        let mut how = "quit";
        if let Some(mut child) = self.child.take() {
            let pid = child.id() as i32;
            for (sig, name, wait) in [
                (libc::SIGQUIT, "quit", 10_000),
                (libc::SIGTERM, "term", 5_000),
                (libc::SIGKILL, "kill", 5_000),
            ] {
                how = name;
                // SAFETY: signalling our own child process.
                unsafe { libc::kill(pid, sig) };
                let t0 = Instant::now();
                let mut done = false;
                while t0.elapsed() < Duration::from_millis(wait) {
                    if child.try_wait().ok().flatten().is_some() {
                        done = true;
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                if done {
                    break;
                }
            }
            let _ = child.wait();
        }
        let alerts = self.alerts();
        if self.keep || !alerts.is_empty() {
            eprintln!("martd-bench: kept {}", self.prefix.display());
        } else {
            let _ = fs::remove_dir_all(&self.prefix);
        }
        StopReport { how, alerts }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}
