//! Starting, reloading, killing and stopping a real nginx (master + workers) on a private prefix.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::conf::Conf;

/// Bound on every wait for nginx itself (start, reload, respawn, graceful stop).
pub const NGINX_WAIT: Duration = Duration::from_secs(10);

/// Error-log fragments that fail a test unless allowed by that test.
pub(super) const FORBIDDEN: &[&str] =
    &["[alert]", "[emerg]", "[crit]", "signal 11", "signal 6", "core dumped", "panicked"];

/// The nginx binary: `MARTD_NGINX_BINARY`, else the one built by `nginx-sys` (vendored).
pub fn nginx_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("MARTD_NGINX_BINARY") {
        return p.into();
    }
    match option_env!("MARTD_NGINX_BUILD_DIR") {
        Some(dir) => Path::new(dir).join("nginx"),
        None => panic!(
            "no nginx binary: build with the `vendored` feature (it exports MARTD_NGINX_BUILD_DIR) \
             or set MARTD_NGINX_BINARY"
        ),
    }
}

/// The module: `MARTD_MODULE`, else `libngx_http_martd_module.so` next to `deps/` of this test.
pub fn module_path() -> PathBuf {
    if let Some(p) = std::env::var_os("MARTD_MODULE") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/relay-xxxx -> target/<profile>/
    let dir =
        exe.parent().and_then(Path::parent).expect("test binary is not in target/<profile>/deps");
    dir.join("libngx_http_martd_module.so")
}

static NEXT_PORT: AtomicU32 = AtomicU32::new(0);

/// A free port on 127.0.0.1, taken below the kernel's ephemeral range so that the thousands of
/// client connections of parallel tests can never sit on it; checked by binding it.
pub fn free_port() -> u16 {
    let low = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    if low > 12000 {
        let base = 10000u32;
        let span = low - base;
        let offset = std::process::id().wrapping_mul(7919);
        for _ in 0..span {
            let p = base + (offset.wrapping_add(NEXT_PORT.fetch_add(1, Ordering::Relaxed)) % span);
            if TcpListener::bind(("127.0.0.1", p as u16)).is_ok() {
                return p as u16;
            }
        }
    }
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

pub(super) fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

fn send_signal(pid: u32, sig: libc::c_int) -> bool {
    // SAFETY: plain kill(2) on a pid this harness started.
    unsafe { libc::kill(pid as libc::pid_t, sig) == 0 }
}

fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => proc_state(&s) != Some('Z'),
        Err(_) => false,
    }
}

fn proc_state(stat: &str) -> Option<char> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().next()?.chars().next()
}

fn proc_ppid(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Live (non-zombie) children of `parent` with their process titles.
pub fn children_of(parent: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if proc_ppid(&stat) != Some(parent) || proc_state(&stat) == Some('Z') {
            continue;
        }
        let title = fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " ").trim().to_string())
            .unwrap_or_default();
        out.push((pid, title));
    }
    out.sort();
    out
}

/// The master: the process the harness started, or the new master of a binary upgrade (a
/// child of the old one, which has exited).
enum Master {
    Own(Child),
    Adopted(u32),
}

impl Master {
    fn id(&self) -> u32 {
        match self {
            Master::Own(c) => c.id(),
            Master::Adopted(p) => *p,
        }
    }

    /// How it exited, once it has.
    fn exit_status(&mut self) -> Option<String> {
        match self {
            Master::Own(c) => c.try_wait().unwrap().map(|st| st.to_string()),
            Master::Adopted(p) => (!alive(*p)).then(|| "gone".to_string()),
        }
    }

    fn kill(&mut self) {
        match self {
            Master::Own(c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Master::Adopted(p) => {
                send_signal(*p, libc::SIGKILL);
                let deadline = Instant::now() + NGINX_WAIT;
                while alive(*p) && Instant::now() < deadline {
                    sleep_ms(10);
                }
            }
        }
    }
}

/// Predicate accepting an otherwise forbidden error-log line.
type LogFilter = Box<dyn Fn(&str) -> bool + Send>;

/// A running nginx on its own temporary prefix. Call [`Nginx::finish`] at the end of a test;
/// dropping it does the same when the test did not panic.
pub struct Nginx {
    dir: Option<tempfile::TempDir>,
    prefix: PathBuf,
    pub port: u16,
    conf: Conf,
    child: Option<Master>,
    allowed: Vec<LogFilter>,
    finished: bool,
}

impl Nginx {
    pub fn start(conf: Conf) -> Nginx {
        let dir = tempfile::Builder::new().prefix("martd-t-").tempdir().expect("tempdir");
        let prefix = dir.path().to_path_buf();
        for d in ["conf", "logs", "tmp"] {
            fs::create_dir_all(prefix.join(d)).unwrap();
        }
        let mut ng = Nginx {
            dir: Some(dir),
            prefix,
            port: 0,
            conf,
            child: None,
            allowed: Vec::new(),
            finished: false,
        };
        ng.launch();
        ng
    }

    /// Start the master on a fresh port (retrying if the port got taken meanwhile).
    fn launch(&mut self) {
        let mut last_err = String::new();
        for _attempt in 0..5 {
            self.port = free_port();
            self.write_conf();
            let log_len = self.log_len();
            let stderr = fs::File::create(self.prefix.join("logs/stderr.log")).unwrap();
            let child = Command::new(nginx_binary())
                .arg("-p")
                .arg(format!("{}/", self.prefix.display()))
                .arg("-c")
                .arg("conf/nginx.conf")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", nginx_binary().display()));
            self.child = Some(Master::Own(child));
            if self.conf.daemon {
                self.adopt_daemon();
            }
            match self.wait_ready() {
                Ok(()) => return,
                Err(e) => {
                    self.kill_all();
                    self.child = None;
                    let stderr =
                        fs::read_to_string(self.prefix.join("logs/stderr.log")).unwrap_or_default();
                    if stderr.contains("Address already in use") {
                        // Somebody took the port between our check and nginx's bind: forget
                        // the bind errors and try another port.
                        self.truncate_log(log_len);
                        last_err = e;
                        continue;
                    }
                    panic!(
                        "nginx did not start: {e}\n--- stderr ---\n{stderr}\n--- error.log tail ---\n{}",
                        self.log_tail(40)
                    );
                }
            }
        }
        panic!("nginx could not bind a port after 5 attempts: {last_err}");
    }

    /// `daemon on`: the process started exits once the master has detached; the master's pid
    /// is in the pid file.
    fn adopt_daemon(&mut self) {
        let deadline = Instant::now() + NGINX_WAIT;
        while self.child.as_mut().and_then(Master::exit_status).is_none() {
            assert!(Instant::now() < deadline, "nginx did not detach");
            sleep_ms(10);
        }
        let pid_file = self.prefix.join("logs/nginx.pid");
        let pid = loop {
            let pid = fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse().ok());
            if let Some(pid) = pid.filter(|&p| alive(p)) {
                break pid;
            }
            assert!(Instant::now() < deadline, "no master pid in {}", pid_file.display());
            sleep_ms(10);
        };
        self.child = Some(Master::Adopted(pid));
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + NGINX_WAIT;
        loop {
            if let Some(st) = self.child.as_mut().unwrap().exit_status() {
                return Err(format!("nginx exited with {st}"));
            }
            if self.worker_pids().len() == self.conf.workers as usize
                && TcpStream::connect_timeout(
                    &([127, 0, 0, 1], self.port).into(),
                    Duration::from_millis(200),
                )
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("not ready within {NGINX_WAIT:?}"));
            }
            sleep_ms(20);
        }
    }

    fn write_conf(&self) {
        fs::write(self.conf_path(), self.conf.render(&self.prefix, self.port)).unwrap();
    }

    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    pub fn conf_path(&self) -> PathBuf {
        self.prefix.join("conf/nginx.conf")
    }

    pub fn log_path(&self) -> PathBuf {
        self.prefix.join("logs/error.log")
    }

    pub fn master_pid(&self) -> u32 {
        self.child.as_ref().expect("nginx is not running").id()
    }

    /// Live worker processes, including old ones still shutting down after a reload.
    pub fn all_workers(&self) -> Vec<u32> {
        match &self.child {
            Some(c) => children_of(c.id())
                .into_iter()
                .filter(|(_, t)| t.contains("worker process"))
                .map(|(p, _)| p)
                .collect(),
            None => Vec::new(),
        }
    }

    /// Current workers (not the ones shutting down after a reload).
    pub fn worker_pids(&self) -> Vec<u32> {
        match &self.child {
            Some(c) => children_of(c.id())
                .into_iter()
                .filter(|(_, t)| t.contains("worker process") && !t.contains("shutting down"))
                .map(|(p, _)| p)
                .collect(),
            None => Vec::new(),
        }
    }

    /// Allow error-log lines containing `fragment` (for tests that provoke alerts on purpose).
    pub fn allow_log(&mut self, fragment: &str) {
        let f = fragment.to_string();
        self.allowed.push(Box::new(move |l: &str| l.contains(f.as_str())));
    }

    /// Allow error-log lines for which `pred` holds.
    pub fn allow_log_if(&mut self, pred: impl Fn(&str) -> bool + Send + 'static) {
        self.allowed.push(Box::new(pred));
    }

    /// Replace the configuration (takes effect at the next [`Nginx::reload`]).
    pub fn set_conf(&mut self, conf: Conf) {
        assert_eq!(conf.workers, self.conf.workers);
        self.conf = conf;
        self.write_conf();
    }

    /// SIGHUP; waits until every old worker has exited and the new ones run. Returns the time
    /// from the signal until the last old worker was gone.
    pub fn reload(&mut self) -> Duration {
        let old = self.all_workers();
        let t0 = Instant::now();
        assert!(send_signal(self.master_pid(), libc::SIGHUP), "SIGHUP failed");
        loop {
            let now = self.all_workers();
            let old_gone = old.iter().all(|p| !now.contains(p) && !alive(*p));
            if old_gone && self.worker_pids().len() == self.conf.workers as usize {
                return t0.elapsed();
            }
            if t0.elapsed() > NGINX_WAIT {
                panic!(
                    "reload not finished within {NGINX_WAIT:?}: old workers {old:?}, now {:?}\n{}",
                    children_of(self.master_pid()),
                    self.log_tail(30)
                );
            }
            sleep_ms(10);
        }
    }

    pub fn kill_worker(&self, pid: u32, sig: libc::c_int) {
        assert!(self.all_workers().contains(&pid), "{pid} is not a worker of this nginx");
        assert!(send_signal(pid, sig), "kill({pid}, {sig}) failed");
    }

    /// Waits until `dead` is gone and the master has a full set of workers again.
    pub fn wait_respawn(&self, dead: u32) -> Vec<u32> {
        let deadline = Instant::now() + NGINX_WAIT;
        loop {
            let now = self.worker_pids();
            if !now.contains(&dead) && !alive(dead) && now.len() == self.conf.workers as usize {
                return now;
            }
            if Instant::now() > deadline {
                panic!("worker {dead} not replaced within {NGINX_WAIT:?}: {now:?}");
            }
            sleep_ms(10);
        }
    }

    /// Graceful stop (SIGQUIT), bounded; SIGKILL fallback. Err if the fallback was needed.
    pub fn stop(&mut self) -> Result<(), String> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        let workers = children_of(child.id());
        send_signal(child.id(), libc::SIGQUIT);
        let deadline = Instant::now() + NGINX_WAIT;
        loop {
            if child.exit_status().is_some() {
                self.child = None;
                return Ok(());
            }
            if Instant::now() > deadline {
                break;
            }
            sleep_ms(10);
        }
        let left = children_of(child.id());
        self.kill_all();
        for (p, _) in workers {
            if alive(p) {
                send_signal(p, libc::SIGKILL);
            }
        }
        self.child = None;
        Err(format!(
            "nginx did not exit within {NGINX_WAIT:?} of SIGQUIT (processes left: {left:?})"
        ))
    }

    /// A binary upgrade, as an operator does it: `USR2` (the master starts a new master from
    /// the same binary, which inherits the listening sockets and starts its workers), a pause
    /// while both generations take requests, `WINCH` (the old workers finish), and `QUIT` to
    /// the old master. The new master is this nginx's master from then on.
    pub fn binary_upgrade(&mut self, overlap: Duration) {
        let old = self.master_pid();
        let new = self.start_new_binary();
        std::thread::sleep(overlap);
        send_signal(old, libc::SIGWINCH);
        send_signal(old, libc::SIGQUIT);
        let deadline = Instant::now() + NGINX_WAIT;
        while self.child.as_mut().and_then(Master::exit_status).is_none() {
            assert!(
                Instant::now() < deadline,
                "the old master did not exit\n{}",
                self.log_tail(30)
            );
            sleep_ms(20);
        }
        self.child = Some(Master::Adopted(new));
    }

    /// `USR2`: waits for the new master and its workers; its pid.
    pub fn start_new_binary(&mut self) -> u32 {
        let old = self.master_pid();
        send_signal(old, libc::SIGUSR2);
        let deadline = Instant::now() + NGINX_WAIT;
        loop {
            let masters: Vec<u32> = children_of(old)
                .into_iter()
                .filter(|(_, t)| t.contains("master process"))
                .map(|(p, _)| p)
                .collect();
            let ready = masters.first().is_some_and(|&m| {
                let workers = children_of(m).iter().filter(|(_, t)| t.contains("worker")).count();
                workers == self.conf.workers as usize
            });
            if ready {
                return masters[0];
            }
            assert!(Instant::now() < deadline, "no new master after USR2\n{}", self.log_tail(30));
            sleep_ms(20);
        }
    }

    /// An upgrade given up: the new master `new` is sent `QUIT` and waited for; the old one
    /// stays this nginx's master.
    pub fn quit_new_binary(&mut self, new: u32) {
        send_signal(new, libc::SIGQUIT);
        let deadline = Instant::now() + NGINX_WAIT;
        while alive(new) {
            assert!(
                Instant::now() < deadline,
                "the new master did not exit\n{}",
                self.log_tail(30)
            );
            sleep_ms(20);
        }
    }

    /// Start again after `stop` (on the same prefix, a new shared zone).
    pub fn restart_after_stop(&mut self) {
        self.launch();
    }

    /// Stop, then start again on the same prefix (a new shared zone).
    pub fn restart(&mut self) {
        if let Err(e) = self.stop() {
            panic!("{e}\n{}", self.log_tail(30));
        }
        self.launch();
    }

    /// SIGKILL for the master and every worker at once (a machine crash, as far as nginx can
    /// tell), then start again on the same prefix.
    pub fn crash_and_start(&mut self) {
        self.kill_all();
        self.launch();
    }

    fn kill_all(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let kids = children_of(child.id());
            child.kill();
            for (p, _) in kids {
                if alive(p) {
                    send_signal(p, libc::SIGKILL);
                }
            }
        }
    }

    fn log_len(&self) -> u64 {
        fs::metadata(self.log_path()).map(|m| m.len()).unwrap_or(0)
    }

    fn truncate_log(&self, len: u64) {
        if let Ok(f) = fs::OpenOptions::new().write(true).open(self.log_path()) {
            let _ = f.set_len(len);
        }
    }

    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(self.log_path()) {
            let _ = f.seek(SeekFrom::Start(0));
            let mut b = Vec::new();
            let _ = f.read_to_end(&mut b);
            s = String::from_utf8_lossy(&b).into_owned();
        }
        s
    }

    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let from = lines.len().saturating_sub(n);
        format!(
            "--- {} (last {} lines) ---\n{}",
            self.log_path().display(),
            lines.len() - from,
            lines[from..].join("\n")
        )
    }

    /// Lines of the error log that fail the test.
    pub fn bad_log_lines(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| FORBIDDEN.iter().any(|f| l.contains(f)))
            .filter(|l| !self.allowed.iter().any(|a| a(l)))
            .map(str::to_string)
            .collect()
    }

    /// Graceful stop + error-log check. Panics (with the log tail) on any problem.
    pub fn finish(mut self) {
        self.finish_inner();
    }

    fn finish_inner(&mut self) {
        self.finished = true;
        let stopped = self.stop();
        let bad = self.bad_log_lines();
        let mut problems = Vec::new();
        if let Err(e) = stopped {
            problems.push(e);
        }
        if !bad.is_empty() {
            problems.push(format!("forbidden error-log lines:\n{}", bad.join("\n")));
        }
        if !problems.is_empty() {
            self.keep_prefix();
            panic!("{}\n{}", problems.join("\n"), self.log_tail(40));
        }
        if std::env::var("MARTD_KEEP").as_deref() == Ok("all") {
            self.keep_prefix();
        }
    }

    /// With `MARTD_KEEP` set, the prefix of a failed test (or of every test, with
    /// `MARTD_KEEP=all`) is kept and its path printed.
    fn keep_prefix(&mut self) {
        if std::env::var_os("MARTD_KEEP").is_some() {
            if let Some(d) = self.dir.take() {
                eprintln!("keeping {}", d.keep().display());
            }
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if std::thread::panicking() {
            self.finished = true;
            self.kill_all();
            eprintln!("{}", self.log_tail(40));
            self.keep_prefix();
        } else {
            self.finish_inner();
        }
    }
}
