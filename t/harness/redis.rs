//! A real `redis-server` (Debian's package) for the tests of martd's Redis mode: on a free
//! loopback port, in a temporary directory, with an append-only file synced on every write
//! (`appendfsync always`), so a SIGKILL and a start on the same directory keep every
//! acknowledged write. Killed when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::nginx::free_port;

/// How long a start may take.
const REDIS_WAIT: Duration = Duration::from_secs(10);

pub struct Redis {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Extra `redis-server` arguments (e.g. `--cluster-enabled yes`).
    extra: Vec<String>,
    /// Served over TLS only: the CA certificate that verifies it.
    pub tls_ca: Option<PathBuf>,
}

impl Redis {
    /// A standalone server.
    pub fn start() -> Redis {
        Redis::start_with(&[])
    }

    /// A server with extra arguments.
    pub fn start_with(extra: &[&str]) -> Redis {
        let dir = tempfile::Builder::new().prefix("martd-redis-").tempdir().expect("tempdir");
        let mut r = Redis {
            port: free_port(),
            dir,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            tls_ca: None,
        };
        r.launch();
        r
    }

    /// A standalone server that takes TLS only (a certificate for `localhost` signed by a
    /// throw-away CA, see [`super::tls::make_cert`]).
    pub fn start_tls() -> Redis {
        let dir = tempfile::Builder::new().prefix("martd-redis-").tempdir().expect("tempdir");
        let (ca, cert, key) = super::tls::make_cert(dir.path());
        let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
        let port = free_port();
        let extra = vec![
            "--port".to_string(),
            "0".to_string(),
            "--tls-port".to_string(),
            port.to_string(),
            "--tls-cert-file".to_string(),
            path(&cert),
            "--tls-key-file".to_string(),
            path(&key),
            "--tls-ca-cert-file".to_string(),
            path(&ca),
            "--tls-auth-clients".to_string(),
            "no".to_string(),
        ];
        let mut r = Redis { port, dir, child: None, extra, tls_ca: Some(ca) };
        r.launch();
        r
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// `redis://127.0.0.1:PORT` (`rediss://localhost:PORT` over TLS).
    pub fn url(&self) -> String {
        match self.tls_ca {
            Some(_) => format!("rediss://localhost:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    fn launch(&mut self) {
        let port = self.port.to_string();
        let dir = self.dir.path().to_string_lossy().into_owned();
        let mut args = vec![
            "--port",
            &port,
            "--bind",
            "127.0.0.1",
            "--dir",
            &dir,
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--daemonize",
            "no",
            "--logfile",
            "redis.log",
        ];
        args.extend(self.extra.iter().map(String::as_str));
        let child = Command::new("redis-server")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        self.child = Some(child);
        let t0 = Instant::now();
        while self.cli(&["PING"]).trim() != "PONG" {
            if t0.elapsed() >= REDIS_WAIT {
                let log = std::fs::read_to_string(self.dir.path().join("redis.log"));
                panic!("redis-server on {} did not start: {}", self.port, log.unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `redis-cli -p PORT args...` and gives its output ("" if it failed).
    pub fn cli(&self, args: &[&str]) -> String {
        let tls: Vec<String> = match &self.tls_ca {
            Some(ca) => vec!["--tls".into(), "--cacert".into(), ca.to_string_lossy().into_owned()],
            None => Vec::new(),
        };
        Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(&tls)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port and directory (it reloads its append-only file).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.launch();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster on loopback: `masters` masters with one replica each, made with
/// `redis-cli --cluster create` (node timeout 1 s, so a killed master's replica takes over in
/// a few seconds). Each node is a [`Redis`] with its own directory and append-only file.
pub struct Cluster {
    pub nodes: Vec<Redis>,
}

impl Cluster {
    pub fn start(masters: usize) -> Cluster {
        let args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "1000",
        ];
        // The cluster bus on a port of its own, checked free like the node's (the default,
        // port + 10000, may be some test connection's ephemeral port).
        let nodes: Vec<Redis> = (0..masters * 2)
            .map(|_| {
                let bus = free_port().to_string();
                Redis::start_with(&[&args[..], &["--cluster-port", &bus]].concat())
            })
            .collect();
        let addresses: Vec<String> =
            nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli --cluster create");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        let c = Cluster { nodes };
        c.wait_ok();
        c
    }

    /// Waits until every running node says `cluster_state:ok` and sees `masters` masters
    /// with slots.
    pub fn wait_ok(&self) {
        let t0 = Instant::now();
        let masters = self.nodes.len() / 2;
        loop {
            let ok = self.nodes.iter().filter(|n| n.running()).all(|n| {
                n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok")
                    && n.masters_with_slots().len() == masters
            });
            if ok {
                return;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "the cluster did not settle");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every node's url (seeds for martd).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Redis::url).collect()
    }

    /// The index of a node that is a master with slots now.
    pub fn a_master(&self) -> usize {
        let live = self.nodes.iter().find(|n| n.running()).expect("a live node");
        let masters = live.masters_with_slots();
        self.nodes.iter().position(|n| masters.contains(&n.port)).expect("a master")
    }
}

impl Redis {
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Ports of the masters that serve slots and are not failing, as this node sees them.
    pub fn masters_with_slots(&self) -> Vec<u16> {
        self.cli(&["CLUSTER", "NODES"])
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                let flags = f.get(2)?;
                let serving = flags.contains("master") && !flags.contains("fail") && f.len() > 8;
                let port = f.get(1)?.split(['@', ',']).next()?.rsplit(':').next()?;
                serving.then(|| port.parse().ok()).flatten()
            })
            .collect()
    }
}
