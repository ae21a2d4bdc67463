//! The nginx configuration a test runs (the harness writes the fixed parts, the test gives
//! snippets), and `nginx -t` checks of configurations that must be accepted or rejected.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use super::nginx::{free_port, module_path, nginx_binary, sleep_ms, FORBIDDEN, NGINX_WAIT};

/// One nginx configuration: the harness writes the fixed parts, the test gives snippets.
#[derive(Clone, Debug)]
pub struct Conf {
    pub workers: u32,
    pub main: String,
    pub http: String,
    pub server: String,
    pub load_module: bool,
    /// `daemon on` (the master detaches; a binary upgrade needs it).
    pub daemon: bool,
}

impl Conf {
    /// `server` goes inside the `server {}` block (locations, server-level directives).
    pub fn new(server: &str) -> Conf {
        Conf {
            workers: 2,
            main: String::new(),
            http: String::new(),
            server: server.to_string(),
            load_module: true,
            daemon: false,
        }
    }

    /// Directives for the `http {}` block.
    pub fn http(mut self, http: &str) -> Conf {
        self.http = http.to_string();
        self
    }

    pub fn workers(mut self, n: u32) -> Conf {
        self.workers = n;
        self
    }

    /// `daemon on`: the master detaches from the harness, as in production (nginx takes a
    /// binary upgrade's `USR2` only from a master whose parent is not the one that started
    /// it).
    pub fn daemon(mut self) -> Conf {
        self.daemon = true;
        self
    }

    /// Only for the harness self-test: a config that does not load the module at all.
    pub fn without_module(mut self) -> Conf {
        self.load_module = false;
        self
    }

    pub fn render(&self, prefix: &Path, port: u16) -> String {
        let p = prefix.display();
        let mut s = String::new();
        if self.load_module {
            let m = module_path();
            assert!(
                m.is_file(),
                "module {} not found: run `cargo build` first or set MARTD_MODULE",
                m.display()
            );
            s += &format!("load_module {};\n", m.display());
        }
        s += &format!(
            "worker_processes {w};
daemon {daemon};
master_process on;
error_log {p}/logs/error.log info;
pid {p}/logs/nginx.pid;
worker_rlimit_nofile 8192;
{main}
events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    client_body_temp_path {p}/tmp/client_body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
    keepalive_requests 100000;
    keepalive_timeout 300s;
{http}
    server {{
        listen 127.0.0.1:{port} reuseport;
        add_header X-Worker $pid always;
        location = /__worker {{ return 204; }}
{server}
    }}
}}
",
            w = self.workers,
            daemon = if self.daemon { "on" } else { "off" },
            main = self.main,
            http = self.http,
            server = self.server,
        );
        s
    }
}

/// Result of a configuration check that was expected to fail.
pub struct ConfigError {
    pub stderr: String,
    pub conf_path: PathBuf,
    pub conf_text: String,
}

impl ConfigError {
    /// 1-based line of the first configuration line containing `needle`.
    pub fn line_of(&self, needle: &str) -> usize {
        self.conf_text
            .lines()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle:?} not in the configuration"))
            + 1
    }

    /// The ` in <file>:<line>` suffix nginx puts on configuration errors.
    pub fn location_of(&self, needle: &str) -> String {
        format!(" in {}:{}", self.conf_path.display(), self.line_of(needle))
    }
}

fn run_config_check(conf: &Conf) -> (bool, ConfigError, tempfile::TempDir) {
    let dir = tempfile::Builder::new().prefix("martd-t-").tempdir().unwrap();
    let prefix = dir.path().to_path_buf();
    for d in ["conf", "logs", "tmp"] {
        fs::create_dir_all(prefix.join(d)).unwrap();
    }
    let conf_path = prefix.join("conf/nginx.conf");
    let conf_text = conf.render(&prefix, free_port());
    fs::write(&conf_path, &conf_text).unwrap();
    let err_path = prefix.join("logs/stderr.log");
    let mut child = Command::new(nginx_binary())
        .arg("-t")
        .arg("-p")
        .arg(format!("{}/", prefix.display()))
        .arg("-c")
        .arg("conf/nginx.conf")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("run nginx -t");
    let deadline = Instant::now() + NGINX_WAIT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("nginx -t did not finish within {NGINX_WAIT:?}");
        }
        sleep_ms(10);
    };
    let stderr = fs::read_to_string(&err_path).unwrap_or_default();
    (status.success(), ConfigError { stderr, conf_path, conf_text }, dir)
}

/// `nginx -t` must reject `conf`; returns its stderr and where the configuration was.
pub fn expect_config_error(conf: &Conf) -> ConfigError {
    let (ok, e, _dir) = run_config_check(conf);
    assert!(
        !ok,
        "nginx -t accepted a configuration it should reject:\n{}\n{}",
        e.conf_text, e.stderr
    );
    e
}

/// `nginx -t` must accept `conf`.
pub fn expect_config_ok(conf: &Conf) {
    let (ok, e, _dir) = run_config_check(conf);
    assert!(ok, "nginx -t rejected the configuration:\n{}\n{}", e.conf_text, e.stderr);
    let bad: Vec<&str> =
        e.stderr.lines().filter(|l| FORBIDDEN.iter().any(|f| l.contains(f))).collect();
    assert!(bad.is_empty(), "nginx -t complained: {bad:?}");
}
