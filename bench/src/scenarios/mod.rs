//! The scenarios: fanout, publish, idle, capacity (+ its child processes), latency, big, and
//! the redis-* cases (two nodes sharing channels through one redis-server).
//!
//! This file: the entry point (one run: start nginx (and Redis), run the scenario, stop, report)
//! and the results; `clients`: long-poll listeners and shared helpers; `fanout`: the fan-out
//! rounds; `load`: publish, idle, capacity, latency; `multi`: multi-channel listeners
//! (`--multi`); `streams`: EventSource and WebSocket subscribers (`--transport`); `redis`:
//! redis-latency, redis-publish and redis-fanout.

mod clients;
mod fanout;
mod load;
mod multi;
mod redis;
mod streams;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::args::Args;
use crate::redis_server::RedisServer;
use crate::server::{self, Kind, RedisLink, Server, ServerOpts};
use fanout::{fanout, fanout_floor, Variant};
pub use load::capacity_child;
use load::{capacity, idle, latency, publish};
use multi::Multi;
use redis::Cluster;
use streams::{fanout_streams, idle_streams, Transport};

/// CPU time of the capacity child processes (for `other_cpu_pct`).
static CHILD_CPU_US: AtomicU64 = AtomicU64::new(0);

/// Connections being opened at once, per client process.
const CONNECT_CONCURRENCY: usize = 128;

// ---------------------------------------------------------------------------------------------
// Results

#[derive(Default)]
struct Errs {
    count: AtomicU64,
    samples: Mutex<Vec<String>>,
}

impl Errs {
    fn add(&self, e: impl Into<String>) {
        self.add_n(1, e);
    }

    fn add_n(&self, n: u64, e: impl Into<String>) {
        if n == 0 {
            return;
        }
        self.count.fetch_add(n, Relaxed);
        let mut s = self.samples.lock().unwrap();
        if s.len() < 8 {
            s.push(e.into());
        }
    }

    fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    fn samples(&self) -> Vec<String> {
        self.samples.lock().unwrap().clone()
    }
}

/// What a scenario measured. Metric names carry their unit (`_ms`, `_us`, `_per_s`, `_b`).
#[derive(Default)]
struct Outcome {
    metrics: Vec<(&'static str, f64)>,
    errs: Arc<Errs>,
    params: Map<String, Value>,
}

impl Outcome {
    fn metric(&mut self, name: &'static str, v: f64) {
        self.metrics.push((name, v));
    }
}

pub(crate) fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64
}

/// Median of the finite values, NaN if there are none.
pub(crate) fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v == v.trunc() && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

// ---------------------------------------------------------------------------------------------
// Entry point

enum Params {
    Fanout {
        listeners: u64,
        channels: u64,
        rounds: u64,
        size: usize,
        floor: bool,
        multi: Option<Multi>,
        transport: Option<Transport>,
    },
    Publish {
        publishers: usize,
        channels: u64,
        seconds: f64,
        warmup: f64,
        size: usize,
    },
    Idle {
        listeners: u64,
        channels: u64,
        keepalive: bool,
        multi: Option<Multi>,
        transport: Option<Transport>,
    },
    Capacity {
        listeners: u64,
        procs: u64,
        channels: u64,
    },
    Latency {
        rate: f64,
        seconds: f64,
        /// latency-stream: the listener is one EventSource stream.
        stream: bool,
    },
    Big {
        listeners: u64,
        size: usize,
        rounds: u64,
    },
    /// redis-latency: `latency` with the publisher on node A and the listener on node B.
    RedisLatency {
        rate: f64,
        seconds: f64,
    },
    /// redis-publish: `publish`'s publishers, all on node A.
    RedisPublish {
        publishers: usize,
        channels: u64,
        seconds: f64,
        warmup: f64,
        size: usize,
    },
    /// redis-fanout: listeners of one channel on both nodes, the rounds published on node A.
    RedisFanout {
        listeners: u64,
        rounds: u64,
        size: usize,
    },
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

pub fn run(cmd: &str, a: &Args) -> Result<u8, String> {
    let mut opts = ServerOpts::from_args(a)?;
    let case = a.string("case", cmd);
    let strict = a.flag("strict");
    let deadline = Duration::from_secs(a.num("deadline", 300)?);
    let threads: usize = a.num("threads", 1)?;
    let multi = match a.str_opt("multi") {
        None => None,
        Some(v) => {
            let m = Multi {
                per_listener: v.parse().map_err(|_| format!("--multi: bad value {v:?}"))?,
                pool: a.num("pool", 1000)?,
            };
            m.check()?;
            Some(m)
        }
    };
    opts.multi = multi.is_some();
    let redis_case = cmd.starts_with("redis-");
    if redis_case && opts.multi {
        return Err(format!("--multi: not for {cmd}"));
    }
    let redis_bin = redis_case.then(|| a.string("redis-server", "/usr/bin/redis-server"));
    // --tls: redis-server serves TLS only and martd connects with rediss:// (redis-publish-tls).
    let tls = a.flag("tls");
    if tls && !redis_case {
        return Err(format!("--tls: not for {cmd} (redis-* cases only)"));
    }
    if tls && opts.kind == Kind::Nchan {
        return Err(format!("--tls: martd only ({cmd} over TLS is not measured for nchan)"));
    }
    let transport = a.str_opt("transport").map(|v| Transport::parse(&v)).transpose()?;
    opts.streams = transport.is_some();
    if transport.is_some() {
        if multi.is_some() || a.flag("floor") || a.flag("keepalive") {
            return Err("--transport goes with neither --multi, --floor nor --keepalive".into());
        }
        if !matches!(cmd, "fanout" | "idle" | "latency") {
            return Err(format!("--transport: not for {cmd}"));
        }
        if cmd == "latency" && transport != Some(Transport::EventSource) {
            return Err("latency --transport: eventsource only".into());
        }
    }
    let params = match cmd {
        "fanout" => Params::Fanout {
            listeners: a.num("listeners", 10_000)?,
            channels: a.num("channels", 1)?,
            rounds: a.num("rounds", 10)?,
            size: a.num("size", 64)?,
            floor: a.flag("floor"),
            multi,
            transport,
        },
        "publish" => Params::Publish {
            publishers: a.num("publishers", 16)?,
            channels: a.num("channels", 100)?,
            seconds: a.num("seconds", 5.0)?,
            warmup: a.num("warmup", 1.0)?,
            size: a.num("size", 64)?,
        },
        "idle" => Params::Idle {
            listeners: a.num("listeners", 15_000)?,
            channels: a.num("channels", 100)?,
            keepalive: a.flag("keepalive"),
            multi,
            transport,
        },
        "capacity" => Params::Capacity {
            listeners: a.num("listeners", 30_000)?,
            procs: a.num("procs", 2)?,
            channels: a.num("channels", 1)?,
        },
        "latency" => Params::Latency {
            rate: a.num("rate", 1000.0)?,
            seconds: a.num("seconds", 10.0)?,
            stream: transport.is_some(),
        },
        "big" => Params::Big {
            listeners: a.num("listeners", 1000)?,
            size: a.num("size", 65_536)?,
            rounds: a.num("rounds", 10)?,
        },
        "redis-latency" => {
            Params::RedisLatency { rate: a.num("rate", 1000.0)?, seconds: a.num("seconds", 10.0)? }
        }
        "redis-publish" => Params::RedisPublish {
            publishers: a.num("publishers", 16)?,
            channels: a.num("channels", 100)?,
            seconds: a.num("seconds", 5.0)?,
            warmup: a.num("warmup", 1.0)?,
            size: a.num("size", 64)?,
        },
        "redis-fanout" => Params::RedisFanout {
            listeners: a.num("listeners", 10_000)?,
            rounds: a.num("rounds", 10)?,
            size: a.num("size", 64)?,
        },
        _ => unreachable!(),
    };
    a.finish()?;
    let command = std::iter::once("martd-bench".to_string())
        .chain(std::env::args().skip(1).map(|s| shell_quote(&s)))
        .collect::<Vec<_>>()
        .join(" ");

    let t_start = Instant::now();
    // The redis-* cases: one redis-server and two nodes (A, B) that share it.
    let redis = match &redis_bin {
        Some(bin) => Some(RedisServer::start(bin.as_ref(), opts.keep, tls)?),
        None => None,
    };
    opts.redis = redis.as_ref().map(|r| RedisLink {
        port: r.port,
        namespace: r.namespace.clone(),
        ca: r.ca.clone(),
    });
    let mut nodes = vec![Server::start(&opts)?];
    if redis.is_some() {
        nodes.push(Server::start(&opts)?);
    }
    let srv = &nodes[0];
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
    }
    .map_err(|e| format!("tokio runtime: {e}"))?;
    let mut out = Outcome::default();
    if let Some(r) = &redis {
        out.params.insert("nodes".into(), json!(nodes.len()));
        out.params.insert("redis".into(), json!(r.version));
        if r.ca.is_some() {
            out.params.insert("tls".into(), json!(true));
        }
    }
    // CPU time of everything this run is made of: the nodes' workers, this client, Redis.
    let ours_cpu = || {
        let w: u64 = nodes.iter().map(|n| n.cpu_us().0).sum();
        w + server::proc_cpu_us(std::process::id()) + redis.as_ref().map_or(0, |r| r.cpu_us())
    };
    let machine0 = server::machine_cpu_us();
    let ours0 = ours_cpu();
    let res = rt.block_on(async {
        let fut = async {
            match params {
                Params::Fanout { listeners, rounds, floor: true, .. } => {
                    fanout_floor(srv, &mut out, listeners, rounds).await
                }
                Params::Fanout {
                    listeners, channels, rounds, size, transport: Some(t), ..
                } => fanout_streams(srv, &mut out, listeners, channels, rounds, size, t).await,
                Params::Fanout {
                    listeners, channels, rounds, size, floor: false, multi, ..
                } => {
                    let v = multi.map_or(Variant::Plain, Variant::Multi);
                    fanout(srv, &mut out, listeners, channels, rounds, size, v).await
                }
                Params::Publish { publishers, channels, seconds, warmup, size } => {
                    publish(srv, &mut out, publishers, channels, seconds, warmup, size).await
                }
                Params::Idle { listeners, channels, transport: Some(t), .. } => {
                    idle_streams(srv, &mut out, listeners, channels, t).await
                }
                Params::Idle { listeners, channels, keepalive, multi, .. } => {
                    idle(srv, &mut out, listeners, channels, keepalive, multi).await
                }
                Params::Capacity { listeners, procs, channels } => {
                    capacity(srv, &mut out, listeners, procs, channels, deadline).await
                }
                Params::Latency { rate, seconds, stream } => {
                    latency(srv, &mut out, rate, seconds, stream).await
                }
                Params::RedisLatency { rate, seconds } => {
                    let c = Cluster::new(&nodes, redis.as_ref())?;
                    redis::latency(&c, &mut out, rate, seconds).await
                }
                Params::RedisPublish { publishers, channels, seconds, warmup, size } => {
                    let c = Cluster::new(&nodes, redis.as_ref())?;
                    redis::publish(&c, &mut out, publishers, channels, seconds, warmup, size).await
                }
                Params::RedisFanout { listeners, rounds, size } => {
                    let c = Cluster::new(&nodes, redis.as_ref())?;
                    redis::fanout(&c, &mut out, listeners, rounds, size).await
                }
                Params::Big { listeners, size, rounds } => {
                    fanout(srv, &mut out, listeners, 1, rounds, size, Variant::Big).await
                }
            }
        };
        tokio::time::timeout(deadline, fut)
            .await
            .unwrap_or_else(|_| Err(format!("run deadline of {} s reached", deadline.as_secs())))
    });
    // CPU used by other processes during the run (builds, profilers...): a disturbed run.
    let machine1 = server::machine_cpu_us();
    let ours = (ours_cpu() + CHILD_CPU_US.load(Relaxed)).saturating_sub(ours0);
    let other_cpu_pct = (machine1.0 - machine0.0).saturating_sub(ours) as f64
        / (machine1.1 - machine0.1).max(1) as f64
        * 100.0;
    // Dropping the runtime closes every client connection before nginx is stopped.
    drop(rt);
    let errs = out.errs.clone();
    let fatal = res.err();
    if fatal.is_some() {
        errs.count.fetch_add(1, Relaxed);
    }
    let mut alerts = Vec::new();
    for node in nodes {
        let stop = node.stop();
        // Lines of the error log count as errors (worker crashes, "worker_connections are not
        // enough").
        errs.count.fetch_add(stop.alerts.len() as u64, Relaxed);
        alerts.extend(stop.alerts);
        if stop.how != "quit" {
            errs.add(format!("nginx did not stop on SIGQUIT within 10 s (needed {})", stop.how));
        }
    }
    if let Some(r) = redis {
        if !r.stop() {
            errs.add("redis-server did not stop on SIGTERM within 5 s");
        }
    }
    let elapsed = t_start.elapsed().as_secs_f64();

    // Human table.
    println!(
        "\n{} ({}) against {}: {}",
        cmd,
        case,
        opts.kind.name(),
        Value::Object(out.params.clone())
    );
    println!("| metric | value |\n|---|---|");
    for (k, v) in &out.metrics {
        println!("| {k} | {} |", fmt_num(*v));
    }
    println!("| errors | {} |", errs.count());
    println!("| elapsed_s | {elapsed:.1} |");
    println!("| other_cpu_pct | {other_cpu_pct:.1} |");
    if let Some(f) = &fatal {
        println!("run failed: {f}");
    }
    for a in alerts.iter().take(10) {
        println!("error log: {a}");
    }
    for s in errs.samples() {
        println!("error: {s}");
    }
    let metrics: Map<String, Value> = out
        .metrics
        .iter()
        .map(|(k, v)| (k.to_string(), json!(if v.is_finite() { *v } else { -1.0 })))
        .collect();
    let line = json!({
        "bench": "martd-bench",
        "scenario": cmd,
        "case": case,
        "server": opts.kind.name(),
        "errors": errs.count(),
        "fatal": fatal,
        "error_log": alerts.iter().take(5).collect::<Vec<_>>(),
        "error_samples": errs.samples(),
        "metrics": metrics,
        "params": out.params,
        "workers": opts.workers,
        "elapsed_s": (elapsed * 10.0).round() / 10.0,
        "other_cpu_pct": (other_cpu_pct * 10.0).round() / 10.0,
        "command": command,
    });
    println!("{line}");
    Ok(if strict && errs.count() > 0 { 1 } else { 0 })
}
