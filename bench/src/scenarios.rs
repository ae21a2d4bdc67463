//! The scenarios: fanout, publish, idle, capacity (+ its child processes), latency, big.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::args::Args;
use crate::http::{self, now_us, Sender, Sources};
use crate::server::{self, Mem, Server, ServerOpts};

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
    Fanout { listeners: u64, channels: u64, rounds: u64, size: usize, floor: bool },
    Publish { publishers: usize, channels: u64, seconds: f64, warmup: f64, size: usize },
    Idle { listeners: u64, channels: u64, keepalive: bool },
    Capacity { listeners: u64, procs: u64, channels: u64 },
    Latency { rate: f64, seconds: f64 },
    Big { listeners: u64, size: usize, rounds: u64 },
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

pub fn run(cmd: &str, a: &Args) -> Result<u8, String> {
    let opts = ServerOpts::from_args(a)?;
    let case = a.string("case", cmd);
    let strict = a.flag("strict");
    let deadline = Duration::from_secs(a.num("deadline", 300)?);
    let threads: usize = a.num("threads", 1)?;
    let params = match cmd {
        "fanout" => Params::Fanout {
            listeners: a.num("listeners", 10_000)?,
            channels: a.num("channels", 1)?,
            rounds: a.num("rounds", 10)?,
            size: a.num("size", 64)?,
            floor: a.flag("floor"),
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
        },
        "capacity" => Params::Capacity {
            listeners: a.num("listeners", 30_000)?,
            procs: a.num("procs", 2)?,
            channels: a.num("channels", 1)?,
        },
        "latency" => {
            Params::Latency { rate: a.num("rate", 1000.0)?, seconds: a.num("seconds", 10.0)? }
        }
        "big" => Params::Big {
            listeners: a.num("listeners", 1000)?,
            size: a.num("size", 65_536)?,
            rounds: a.num("rounds", 10)?,
        },
        _ => unreachable!(),
    };
    a.finish()?;
    let command = std::iter::once("martd-bench".to_string())
        .chain(std::env::args().skip(1).map(|s| shell_quote(&s)))
        .collect::<Vec<_>>()
        .join(" ");

    let t_start = Instant::now();
    let srv = Server::start(&opts)?;
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
    }
    .map_err(|e| format!("tokio runtime: {e}"))?;
    let mut out = Outcome::default();
    let machine0 = server::machine_cpu_us();
    let ours0 = srv.cpu_us();
    let res = rt.block_on(async {
        let fut = async {
            match params {
                Params::Fanout { listeners, rounds, floor: true, .. } => {
                    fanout_floor(&srv, &mut out, listeners, rounds).await
                }
                Params::Fanout { listeners, channels, rounds, size, floor: false } => {
                    fanout(&srv, &mut out, listeners, channels, rounds, size, false).await
                }
                Params::Publish { publishers, channels, seconds, warmup, size } => {
                    publish(&srv, &mut out, publishers, channels, seconds, warmup, size).await
                }
                Params::Idle { listeners, channels, keepalive } => {
                    idle(&srv, &mut out, listeners, channels, keepalive).await
                }
                Params::Capacity { listeners, procs, channels } => {
                    capacity(&srv, &mut out, listeners, procs, channels, deadline).await
                }
                Params::Latency { rate, seconds } => latency(&srv, &mut out, rate, seconds).await,
                Params::Big { listeners, size, rounds } => {
                    fanout(&srv, &mut out, listeners, 1, rounds, size, true).await
                }
            }
        };
        tokio::time::timeout(deadline, fut)
            .await
            .unwrap_or_else(|_| Err(format!("run deadline of {} s reached", deadline.as_secs())))
    });
    // CPU used by other processes during the run (builds, profilers...): a disturbed run.
    let machine1 = server::machine_cpu_us();
    let ours1 = srv.cpu_us();
    let ours = (ours1.0 + ours1.1 + CHILD_CPU_US.load(Relaxed)).saturating_sub(ours0.0 + ours0.1);
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
    let stop = srv.stop();
    // Lines of the error log count as errors (worker crashes, "worker_connections are not enough").
    errs.count.fetch_add(stop.alerts.len() as u64, Relaxed);
    if stop.how != "quit" {
        errs.add(format!("nginx did not stop on SIGQUIT within 10 s (needed {})", stop.how));
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
    for a in stop.alerts.iter().take(10) {
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
        "error_log": stop.alerts.iter().take(5).collect::<Vec<_>>(),
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

// ---------------------------------------------------------------------------------------------
// Long-poll listeners

/// Shared state of a crowd of listeners that each expect the messages `0..rounds` in order.
struct Fan {
    rounds: u64,
    size: usize,
    got: Vec<AtomicU64>,
    last_us: Vec<AtomicU64>,
    first_us: Vec<AtomicU64>,
    lat_us: Mutex<Vec<u32>>,
    connected: AtomicU64,
    failed: AtomicU64,
    done: AtomicU64,
    errs: Arc<Errs>,
}

impl Fan {
    fn new(rounds: u64, size: usize, errs: Arc<Errs>) -> Arc<Fan> {
        let v = |x: u64| (0..rounds.max(1)).map(|_| AtomicU64::new(x)).collect();
        Arc::new(Fan {
            rounds,
            size,
            got: v(0),
            last_us: v(0),
            first_us: v(u64::MAX),
            lat_us: Mutex::new(Vec::new()),
            connected: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            done: AtomicU64::new(0),
            errs,
        })
    }

    fn deliveries(&self) -> u64 {
        self.got.iter().map(|g| g.load(Relaxed)).sum()
    }

    fn sorted_latencies(&self) -> Vec<u32> {
        let mut v = self.lat_us.lock().unwrap().clone();
        v.sort_unstable();
        v
    }
}

/// Long-polls `path` until every message `0..rounds` has arrived, in order.
async fn listen_loop(fan: &Fan, s: &mut Sender, path: &str) -> Result<(), String> {
    let (mut etag, mut lm) = (None, None);
    let mut expect = 0;
    while expect < fan.rounds {
        let r = http::send(s, http::listen(path, etag.as_ref(), lm.as_ref())).await?;
        match r.status {
            200 => {
                let now = now_us();
                if r.body.len() != fan.size {
                    return Err(format!("message of {} bytes, want {}", r.body.len(), fan.size));
                }
                let (ts, seq) = http::parse_message(&r.body).ok_or("malformed message body")?;
                if seq != expect {
                    return Err(format!("got message {seq}, want {expect} (lost or repeated)"));
                }
                let i = seq as usize;
                fan.got[i].fetch_add(1, Relaxed);
                fan.last_us[i].fetch_max(now, Relaxed);
                fan.first_us[i].fetch_min(now, Relaxed);
                fan.lat_us.lock().unwrap().push(now.saturating_sub(ts).min(u32::MAX as u64) as u32);
                expect += 1;
                if r.etag.is_none() {
                    return Err("200 without Etag".into());
                }
                etag = r.etag;
                lm = r.last_modified;
            }
            304 => {
                if r.etag.is_some() {
                    etag = r.etag;
                    lm = r.last_modified;
                }
            }
            st => return Err(format!("listener got status {st}")),
        }
    }
    Ok(())
}

/// Opens one connection (at most `gate` connecting at once), counts it, runs `work` on it until
/// `work` ends or the server closes the connection, and records any error in `fan`.
async fn on_connection<F, Fut>(
    fan: &Fan,
    dst: SocketAddr,
    srcs: &Sources,
    gate: Arc<Semaphore>,
    work: F,
) where
    F: FnOnce(Sender) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let permit = gate.acquire_owned().await;
    let conn = http::connect(dst, srcs.next()).await;
    drop(permit);
    let res = match conn {
        Err(e) => Err(e),
        Ok((s, conn)) => {
            fan.connected.fetch_add(1, Relaxed);
            tokio::select! {
                biased;
                r = work(s) => r,
                r = conn => Err(format!("connection closed by the server ({r:?})")),
            }
        }
    };
    if let Err(e) = res {
        fan.failed.fetch_add(1, Relaxed);
        fan.errs.add(e);
    }
}

/// One listener on its own connection.
async fn listener(
    fan: Arc<Fan>,
    dst: SocketAddr,
    srcs: Arc<Sources>,
    path: String,
    gate: Arc<Semaphore>,
) {
    on_connection(&fan, dst, &srcs, gate, |mut s| {
        let fan = fan.clone();
        async move { listen_loop(&fan, &mut s, &path).await }
    })
    .await;
    fan.done.fetch_add(1, Relaxed);
}

fn spawn_listeners(
    set: &mut JoinSet<()>,
    fan: &Arc<Fan>,
    dst: SocketAddr,
    srcs: &Arc<Sources>,
    n: u64,
    channels: &[String],
) {
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    for i in 0..n {
        let path = format!("/sub?channel={}", channels[(i % channels.len() as u64) as usize]);
        set.spawn(listener(fan.clone(), dst, srcs.clone(), path, gate.clone()));
    }
}

/// Control connections, one on each worker: nchan's channel info is exact only on the worker
/// that owns the channel (the others count their own subscribers), so every worker is asked and
/// the largest count taken. martd answers the same on every worker.
async fn control(srv: &Server, srcs: &Sources) -> Result<Vec<Sender>, String> {
    Ok(balanced(srv.addr, srcs, srv.workers.max(1), 1).await?.into_iter().map(|(_, s)| s).collect())
}

/// Waiting listeners of a channel: the largest count any worker reports.
async fn count(ctl: &mut [Sender], channel: &str) -> Result<u64, String> {
    let mut n = 0;
    for c in ctl.iter_mut() {
        n = n.max(http::listener_count(c, channel).await?);
    }
    Ok(n)
}

/// Waits until the server reports `want()` waiting listeners over `channels`.
async fn wait_parked(
    ctl: &mut [Sender],
    channels: &[String],
    want: impl Fn() -> u64,
    timeout: Duration,
) -> Result<(), String> {
    let t0 = Instant::now();
    loop {
        let mut total = 0;
        for ch in channels {
            total += count(ctl, ch).await?;
        }
        if std::env::var_os("MARTD_BENCH_DEBUG").is_some() {
            eprintln!("wait_parked: server {total}, want {}", want());
        }
        if total >= want() {
            return Ok(());
        }
        if t0.elapsed() > timeout {
            return Err(format!(
                "server shows {total} waiting listeners, want {}, after {} s",
                want(),
                timeout.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_until(timeout: Duration, cond: impl Fn() -> bool) -> bool {
    let t0 = Instant::now();
    while !cond() {
        if t0.elapsed() > timeout {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    true
}

/// Connections spread evenly over the workers: `per_worker` answering from each (by X-Worker).
async fn balanced(
    dst: SocketAddr,
    srcs: &Sources,
    workers: usize,
    per_worker: usize,
) -> Result<Vec<(String, Sender)>, String> {
    let mut by: BTreeMap<String, Vec<Sender>> = BTreeMap::new();
    for _ in 0..(workers * per_worker * 20 + 100) {
        let mut s = http::connect_spawned(dst, srcs.next()).await?;
        let r = http::send(&mut s, http::get("/ret")).await?;
        let w = r.worker.ok_or("no X-Worker header")?;
        let v = by.entry(w).or_default();
        if v.len() < per_worker {
            v.push(s);
        }
        if by.len() == workers && by.values().all(|v| v.len() == per_worker) {
            return Ok(by
                .into_iter()
                .flat_map(|(w, v)| v.into_iter().map(move |s| (w.clone(), s)))
                .collect());
        }
    }
    Err(format!("could not get {per_worker} connections on each of {workers} workers"))
}

/// Publishes message `seq` to every channel, over the publisher connections in parallel.
async fn publish_round(
    pubs: &mut Vec<Sender>,
    channels: &Arc<Vec<String>>,
    size: usize,
    seq: u64,
    errs: &Errs,
) {
    let n = pubs.len();
    let mut set = JoinSet::new();
    for (k, mut s) in pubs.drain(..).enumerate() {
        let channels = channels.clone();
        set.spawn(async move {
            let mut bad = Vec::new();
            for ch in channels.iter().skip(k).step_by(n) {
                let (_, body) = http::message(size, seq);
                match http::send(&mut s, http::post(&format!("/pub?channel={ch}"), body)).await {
                    Ok(r) if r.status == 201 || r.status == 202 => {}
                    Ok(r) => bad.push(format!("publish to {ch}: status {}", r.status)),
                    Err(e) => bad.push(format!("publish to {ch}: {e}")),
                }
            }
            (s, bad)
        });
    }
    while let Some(r) = set.join_next().await {
        match r {
            Ok((s, bad)) => {
                pubs.push(s);
                for b in bad {
                    errs.add(b);
                }
            }
            Err(e) => errs.add(format!("publisher task: {e}")),
        }
    }
}

/// Samples the workers' summed memory every 5 ms on a thread; `stop` returns the peak.
struct MemSampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Mem>,
}

impl MemSampler {
    fn start(pids: Vec<u32>) -> MemSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak = Mem::default();
            while !st.load(Relaxed) {
                let mut m = Mem::default();
                for &p in &pids {
                    let w = server::proc_mem(p);
                    m.rss += w.rss;
                    m.anon += w.anon;
                    m.shmem += w.shmem;
                }
                peak.rss = peak.rss.max(m.rss);
                peak.anon = peak.anon.max(m.anon);
                peak.shmem = peak.shmem.max(m.shmem);
                std::thread::sleep(Duration::from_millis(5));
            }
            peak
        });
        MemSampler { stop, handle }
    }

    fn stop(self) -> Mem {
        self.stop.store(true, Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

/// The figures of a run of rounds: round times, delivery latencies, and the CPU the server and
/// the client used between `cpu0` and `cpu1` (taken over all the rounds, re-poll waits
/// included: the server's cost per delivery does not depend on how fast this one client is).
fn round_metrics(
    out: &mut Outcome,
    fan: &Fan,
    round_ms: &[f64],
    cpu0: (u64, u64),
    cpu1: (u64, u64),
) {
    let got = fan.deliveries();
    let lat = fan.sorted_latencies();
    out.metric("round_ms", median(round_ms));
    out.metric("round_max_ms", round_ms.iter().copied().fold(f64::NAN, f64::max));
    out.metric("p50_us", percentile(&lat, 0.50));
    out.metric("p99_us", percentile(&lat, 0.99));
    out.metric("deliveries", got as f64);
    out.metric("server_cpu_ms", (cpu1.0 - cpu0.0) as f64 / 1000.0);
    out.metric("client_cpu_ms", (cpu1.1 - cpu0.1) as f64 / 1000.0);
    out.metric("server_us_per_delivery", (cpu1.0 - cpu0.0) as f64 / got.max(1) as f64);
}

// ---------------------------------------------------------------------------------------------
// fanout (and big: one channel, large messages, worker memory sampled during the rounds)

async fn fanout(
    srv: &Server,
    out: &mut Outcome,
    n: u64,
    nch: u64,
    rounds: u64,
    size: usize,
    big: bool,
) -> Result<(), String> {
    out.params.insert("listeners".into(), json!(n));
    if !big {
        out.params.insert("channels".into(), json!(nch));
    }
    out.params.insert("rounds".into(), json!(rounds));
    out.params.insert("size".into(), json!(size));
    let nch = nch.max(1);
    let prefix = if big { "big" } else { "fan" };
    let channels: Arc<Vec<String>> = Arc::new((0..nch).map(|i| format!("{prefix}{i}")).collect());
    let srcs = Arc::new(Sources::new(0));
    let errs = out.errs.clone();
    let fan = Fan::new(rounds, size, errs.clone());
    let mut ctl = control(srv, &srcs).await?;
    let mut pubs = Vec::new();
    for _ in 0..nch.min(8) {
        pubs.push(http::connect_spawned(srv.addr, srcs.next()).await?);
    }
    let mem0 = srv.mem();

    let mut set = JoinSet::new();
    let t_setup = Instant::now();
    spawn_listeners(&mut set, &fan, srv.addr, &srcs, n, &channels);
    let want = || n - fan.failed.load(Relaxed);
    wait_parked(&mut ctl, &channels, want, Duration::from_secs(120)).await?;
    out.metric("setup_s", t_setup.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_millis(if big { 300 } else { 20 })).await;
    let mem_parked = srv.mem();
    let sampler = big.then(|| MemSampler::start(srv.worker_pids()));
    let cpu0 = srv.cpu_us();

    let mut round_ms = Vec::new();
    let mut busy_us = 0u64;
    for r in 0..rounds {
        if r > 0 {
            // Every listener has the previous message: let them ask again, and wait until the
            // server holds all of them.
            tokio::time::sleep(Duration::from_millis(20)).await;
            wait_parked(&mut ctl, &channels, want, Duration::from_secs(30)).await?;
        }
        let t0 = now_us();
        publish_round(&mut pubs, &channels, size, r, &errs).await;
        let i = r as usize;
        let all = wait_until(Duration::from_secs(30), || {
            fan.got[i].load(Relaxed) >= n - fan.failed.load(Relaxed)
        })
        .await;
        if !all {
            let missing = n - fan.failed.load(Relaxed) - fan.got[i].load(Relaxed);
            return Err(format!(
                "round {r}: {missing} listeners did not get the message within 30 s"
            ));
        }
        let took = fan.last_us[i].load(Relaxed).saturating_sub(t0);
        busy_us += took;
        round_ms.push(took as f64 / 1000.0);
    }
    let cpu1 = srv.cpu_us();
    let peak = sampler.map(MemSampler::stop);

    let expected = n * rounds;
    let got = fan.deliveries();
    if got < expected {
        errs.add_n(expected - got, format!("{} of {expected} deliveries missing", expected - got));
    }
    round_metrics(out, &fan, &round_ms, cpu0, cpu1);
    out.metric("deliveries_per_s", got as f64 / (busy_us.max(1) as f64 / 1e6));
    if let Some(peak) = peak {
        let kb = |b: u64| b as f64 / 1024.0;
        out.metric("rss_fresh_kb", kb(mem0.rss));
        out.metric("rss_parked_kb", kb(mem_parked.rss));
        out.metric("rss_peak_kb", kb(peak.rss));
        let growth = peak.rss.saturating_sub(mem_parked.rss);
        out.metric("rss_round_growth_kb", kb(growth));
        out.metric("anon_round_growth_kb", kb(peak.anon.saturating_sub(mem_parked.anon)));
        // Copying the message for each listener would make this about 1 (if the copies lived at
        // the same time); one copy per worker makes it about workers / listeners.
        out.metric("copies_per_listener", growth as f64 / (size as f64 * n.max(1) as f64));
    }
    Ok(())
}

/// nginx's own floor for a fan-out round: the same client with `n` keep-alive connections,
/// each asking `GET /ret64` (`return 200` with a 64-byte body) when a round starts; a round
/// ends when the last answer arrived. No module can answer these connections sooner: it is
/// nginx's request handling, loopback TCP and this client, with no pub/sub at all.
async fn fanout_floor(srv: &Server, out: &mut Outcome, n: u64, rounds: u64) -> Result<(), String> {
    out.params.insert("listeners".into(), json!(n));
    out.params.insert("rounds".into(), json!(rounds));
    out.params.insert("floor".into(), json!(true));
    let srcs = Arc::new(Sources::new(0));
    let errs = out.errs.clone();
    let fan = Fan::new(rounds, 64, errs.clone());
    // The round number and its start time (µs), sent to every connection.
    let (tx, rx) = tokio::sync::watch::channel((u64::MAX, 0u64));
    let mut set = JoinSet::new();
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let t_setup = Instant::now();
    let dst = srv.addr;
    for _ in 0..n {
        let (fan, srcs, gate, mut rx) = (fan.clone(), srcs.clone(), gate.clone(), rx.clone());
        set.spawn(async move {
            on_connection(&fan.clone(), dst, &srcs, gate, |mut s| {
                let fan = fan.clone();
                async move {
                    for r in 0..fan.rounds {
                        let t0 = loop {
                            let (round, t0) = *rx.borrow_and_update();
                            if round == r {
                                break t0;
                            }
                            rx.changed().await.map_err(|_| "rounds ended early")?;
                        };
                        let resp = http::send(&mut s, http::get("/ret64")).await?;
                        let now = now_us();
                        if resp.status != 200 || resp.body.len() != 64 {
                            return Err(format!(
                                "GET /ret64: {} ({} bytes)",
                                resp.status,
                                resp.body.len()
                            ));
                        }
                        let i = r as usize;
                        fan.got[i].fetch_add(1, Relaxed);
                        fan.last_us[i].fetch_max(now, Relaxed);
                        fan.lat_us
                            .lock()
                            .unwrap()
                            .push(now.saturating_sub(t0).min(u32::MAX as u64) as u32);
                    }
                    Ok(())
                }
            })
            .await;
        });
    }
    drop(rx);
    let ready = wait_until(Duration::from_secs(120), || {
        fan.connected.load(Relaxed) + fan.failed.load(Relaxed) >= n
    })
    .await;
    if !ready {
        return Err(format!("only {} of {n} connections after 120 s", fan.connected.load(Relaxed)));
    }
    out.metric("setup_s", t_setup.elapsed().as_secs_f64());
    let cpu0 = srv.cpu_us();
    let mut round_ms = Vec::new();
    for r in 0..rounds {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let t0 = now_us();
        tx.send_replace((r, t0));
        let i = r as usize;
        let all = wait_until(Duration::from_secs(30), || {
            fan.got[i].load(Relaxed) >= n - fan.failed.load(Relaxed)
        })
        .await;
        if !all {
            return Err(format!("floor round {r}: answers missing after 30 s"));
        }
        round_ms.push(fan.last_us[i].load(Relaxed).saturating_sub(t0) as f64 / 1000.0);
    }
    let cpu1 = srv.cpu_us();
    round_metrics(out, &fan, &round_ms, cpu0, cpu1);
    drop(tx);
    set.shutdown().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// publish

async fn publish(
    srv: &Server,
    out: &mut Outcome,
    publishers: usize,
    nch: u64,
    seconds: f64,
    warmup: f64,
    size: usize,
) -> Result<(), String> {
    out.params.insert("publishers".into(), json!(publishers));
    out.params.insert("channels".into(), json!(nch));
    out.params.insert("seconds".into(), json!(seconds));
    out.params.insert("size".into(), json!(size));
    let srcs = Sources::new(0);
    let workers = srv.workers.max(1);
    let per_worker = publishers.div_ceil(workers);
    let mut rates = BTreeMap::new();
    let mut cpu = BTreeMap::new();
    let mut client_cpu = BTreeMap::new();
    for (phase, ok_statuses) in [("pub", &[201u16, 202][..]), ("ret", &[200][..])] {
        // Fresh, evenly spread connections for each phase.
        let conns = balanced(srv.addr, &srcs, workers, per_worker).await?;
        let measuring = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let mut set = JoinSet::new();
        for (k, (_, mut s)) in conns.into_iter().take(publishers).enumerate() {
            let (measuring, stop, ok, errs) =
                (measuring.clone(), stop.clone(), ok.clone(), out.errs.clone());
            set.spawn(async move {
                let mut i = k as u64;
                while !stop.load(Relaxed) {
                    let path = if phase == "pub" {
                        format!("/pub?channel=p{}", i % nch.max(1))
                    } else {
                        "/ret".to_string()
                    };
                    let (_, body) = http::message(size, i);
                    match http::send(&mut s, http::post(&path, body)).await {
                        Ok(r) if ok_statuses.contains(&r.status) => {
                            if measuring.load(Relaxed) {
                                ok.fetch_add(1, Relaxed);
                            }
                        }
                        Ok(r) => errs.add(format!("{phase}: status {}", r.status)),
                        Err(e) => {
                            errs.add(format!("{phase}: {e}"));
                            return;
                        }
                    }
                    i += publishers as u64;
                }
            });
        }
        tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
        measuring.store(true, Relaxed);
        let t0 = Instant::now();
        let cpu0 = srv.cpu_us();
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
        measuring.store(false, Relaxed);
        let cpu1 = srv.cpu_us();
        let dt = t0.elapsed().as_secs_f64();
        stop.store(true, Relaxed);
        while set.join_next().await.is_some() {}
        let done = ok.load(Relaxed);
        rates.insert(phase, done as f64 / dt);
        cpu.insert(phase, (cpu1.0 - cpu0.0) as f64 / done.max(1) as f64);
        client_cpu.insert(phase, (cpu1.1 - cpu0.1) as f64 / dt / 1e6);
    }
    out.metric("pubs_per_s", rates["pub"]);
    out.metric("ret_per_s", rates["ret"]);
    out.metric("pub_over_ret", rates["pub"] / rates["ret"]);
    out.metric("server_us_per_pub", cpu["pub"]);
    out.metric("server_us_per_ret", cpu["ret"]);
    out.metric("client_cpu_share_pub", client_cpu["pub"]);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// idle

/// nginx's own floor for comparison: a keep-alive connection that made one request (`GET /ret`)
/// and now sits idle.
async fn keepalive_conn(fan: Arc<Fan>, dst: SocketAddr, srcs: Arc<Sources>, gate: Arc<Semaphore>) {
    on_connection(&fan, dst, &srcs, gate, |mut s| {
        let fan = fan.clone();
        async move {
            let r = http::send(&mut s, http::get("/ret")).await?;
            if r.status != 200 {
                return Err(format!("GET /ret: status {}", r.status));
            }
            fan.got[0].fetch_add(1, Relaxed);
            std::future::pending::<Result<(), String>>().await
        }
    })
    .await;
}

async fn idle(
    srv: &Server,
    out: &mut Outcome,
    n: u64,
    nch: u64,
    keepalive: bool,
) -> Result<(), String> {
    out.params.insert("listeners".into(), json!(n));
    out.params.insert("channels".into(), json!(nch));
    out.params.insert("keepalive".into(), json!(keepalive));
    let nch = nch.max(1);
    let channels: Vec<String> = (0..nch).map(|i| format!("idle{i}")).collect();
    let srcs = Arc::new(Sources::new(0));
    let fan = Fan::new(1, 64, out.errs.clone());
    let mut ctl = control(srv, &srcs).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mem0 = srv.mem();
    let mut set = JoinSet::new();
    let t0 = Instant::now();
    let want = || n - fan.failed.load(Relaxed);
    if keepalive {
        let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
        for _ in 0..n {
            set.spawn(keepalive_conn(fan.clone(), srv.addr, srcs.clone(), gate.clone()));
        }
        if !wait_until(Duration::from_secs(120), || fan.got[0].load(Relaxed) >= want()).await {
            return Err("keep-alive connections not all set up within 120 s".into());
        }
    } else {
        spawn_listeners(&mut set, &fan, srv.addr, &srcs, n, &channels);
        wait_parked(&mut ctl, &channels, want, Duration::from_secs(120)).await?;
    }
    out.metric("setup_s", t0.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mem1 = srv.mem();
    let parked = n - fan.failed.load(Relaxed);
    let per = |a: u64, b: u64| (b as f64 - a as f64) / parked.max(1) as f64;
    out.metric("parked", parked as f64);
    out.metric("rss_fresh_kb", mem0.rss as f64 / 1024.0);
    out.metric("rss_parked_kb", mem1.rss as f64 / 1024.0);
    out.metric("rss_per_listener_b", per(mem0.rss, mem1.rss));
    out.metric("anon_per_listener_b", per(mem0.anon, mem1.anon));
    out.metric("shmem_per_listener_b", per(mem0.shmem, mem1.shmem));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// capacity: listeners in child processes (each one's open files stay under 20000)

async fn capacity(
    srv: &Server,
    out: &mut Outcome,
    n: u64,
    procs: u64,
    nch: u64,
    deadline: Duration,
) -> Result<(), String> {
    out.params.insert("listeners".into(), json!(n));
    out.params.insert("procs".into(), json!(procs));
    out.params.insert("channels".into(), json!(nch));
    let procs = procs.max(1);
    let nch = nch.max(1);
    let channels: Arc<Vec<String>> = Arc::new((0..nch).map(|i| format!("cap{i}")).collect());
    let srcs = Sources::new(0);
    let mut ctl = control(srv, &srcs).await?;
    let mut pubs = vec![http::connect_spawned(srv.addr, srcs.next()).await?];
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let deadline_at = now_us() / 1_000_000 + deadline.as_secs();
    let (tx, rx) = mpsc::channel::<(u64, String)>();
    let mut children = Vec::new();
    let t_setup = Instant::now();
    for k in 0..procs {
        let count = n / procs + u64::from(k < n % procs);
        let mut child = Command::new(&exe)
            .arg("capacity-child")
            .args(["--addr", &srv.addr.to_string()])
            .args(["--listeners", &count.to_string()])
            .args(["--channels", &nch.to_string()])
            .args(["--net", &(k + 1).to_string()])
            .args(["--deadline-at", &deadline_at.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("{}: {e}", exe.display()))?;
        let stdout = child.stdout.take().expect("piped");
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send((k, line)).is_err() {
                    break;
                }
            }
        });
        children.push(child);
    }
    drop(tx);
    let res = async {
        // Every child has its listeners connected ...
        let mut ready = 0;
        let mut failed = 0u64;
        let mut results = Vec::new();
        let recv = |timeout: Duration| {
            let rx = &rx;
            async move {
                let t0 = Instant::now();
                loop {
                    match rx.try_recv() {
                        Ok(m) => return Some(m),
                        Err(mpsc::TryRecvError::Disconnected) => return None,
                        Err(mpsc::TryRecvError::Empty) if t0.elapsed() > timeout => return None,
                        Err(mpsc::TryRecvError::Empty) => {
                            tokio::time::sleep(Duration::from_millis(5)).await
                        }
                    }
                }
            }
        };
        while ready < procs {
            let (_, line) =
                recv(Duration::from_secs(180)).await.ok_or("capacity children not ready")?;
            if let Some(rest) = line.strip_prefix("ready ") {
                ready += 1;
                failed +=
                    rest.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            }
        }
        // ... and the server holds all of them.
        wait_parked(&mut ctl, &channels, || n - failed, Duration::from_secs(120)).await?;
        out.metric("setup_s", t_setup.elapsed().as_secs_f64());
        let t0 = now_us();
        publish_round(&mut pubs, &channels, 64, 0, &out.errs).await;
        while results.len() < procs as usize {
            let (_, line) =
                recv(Duration::from_secs(120)).await.ok_or("capacity children gave no result")?;
            if let Some(j) = line.strip_prefix("result ") {
                results.push(
                    serde_json::from_str::<Value>(j).map_err(|e| format!("child result: {e}"))?,
                );
            }
        }
        let mut received = 0;
        let mut last = 0;
        for r in &results {
            received += r["received"].as_u64().unwrap_or(0);
            last = last.max(r["last_us"].as_u64().unwrap_or(0));
            CHILD_CPU_US.fetch_add(r["cpu_us"].as_u64().unwrap_or(0), Relaxed);
            let e = r["errors"].as_u64().unwrap_or(0);
            let sample =
                r["error_samples"].get(0).and_then(|s| s.as_str()).unwrap_or("").to_string();
            out.errs.add_n(e, format!("child: {sample}"));
        }
        out.metric("received", received as f64);
        out.metric("completion_ms", last.saturating_sub(t0) as f64 / 1000.0);
        if received < n {
            out.errs.add_n(
                n - received,
                format!("{} of {n} listeners did not get the message", n - received),
            );
        }
        Ok::<(), String>(())
    }
    .await;
    for mut c in children {
        let t0 = Instant::now();
        while c.try_wait().ok().flatten().is_none() && t0.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = c.kill();
        let _ = c.wait();
    }
    res
}

/// `capacity-child --addr A --listeners N --channels C --net K --deadline-at EPOCH_S`: opens N
/// listeners from 127.0.K.x, prints `ready <connected> <failed>`, then, once each has its one
/// message (or at the deadline), `result {json}`.
pub fn capacity_child(a: &Args) -> Result<u8, String> {
    let addr: SocketAddr =
        a.str_opt("addr").ok_or("--addr")?.parse().map_err(|e| format!("--addr: {e}"))?;
    let n: u64 = a.num("listeners", 15_000)?;
    let nch: u64 = a.num("channels", 1)?;
    let net: u8 = a.num("net", 1)?;
    let deadline_at: u64 = a.num("deadline-at", now_us() / 1_000_000 + 300)?;
    a.finish()?;
    if !addr.ip().is_loopback() {
        return Err("loopback addresses only".into());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let errs = Arc::new(Errs::default());
        let fan = Fan::new(1, 64, errs.clone());
        let channels: Vec<String> = (0..nch.max(1)).map(|i| format!("cap{i}")).collect();
        let srcs = Arc::new(Sources::new(net));
        let mut set = JoinSet::new();
        spawn_listeners(&mut set, &fan, addr, &srcs, n, &channels);
        let left = || Duration::from_secs(deadline_at.saturating_sub(now_us() / 1_000_000));
        wait_until(left(), || fan.connected.load(Relaxed) + fan.failed.load(Relaxed) >= n).await;
        println!("ready {} {}", fan.connected.load(Relaxed), fan.failed.load(Relaxed));
        let _ = std::io::stdout().flush();
        wait_until(left(), || fan.done.load(Relaxed) >= n).await;
        let got = fan.got[0].load(Relaxed);
        println!(
            "result {}",
            json!({
                "received": got,
                "errors": errs.count(),
                "error_samples": errs.samples(),
                "first_us": fan.first_us[0].load(Relaxed),
                "last_us": fan.last_us[0].load(Relaxed),
                "cpu_us": server::proc_cpu_us(std::process::id()),
            })
        );
        let _ = std::io::stdout().flush();
    });
    Ok(0)
}

// ---------------------------------------------------------------------------------------------
// latency: listener on one worker, publisher on the other

async fn latency(srv: &Server, out: &mut Outcome, rate: f64, seconds: f64) -> Result<(), String> {
    out.params.insert("rate".into(), json!(rate));
    out.params.insert("seconds".into(), json!(seconds));
    let count = (rate * seconds).round().max(1.0) as u64;
    let srcs = Sources::new(0);
    if srv.workers < 2 {
        return Err("latency needs 2 workers".into());
    }
    let mut conns = balanced(srv.addr, &srcs, 2, 1).await?;
    let (wp, mut pconn) = conns.pop().expect("two");
    let (wl, mut lconn) = conns.pop().expect("two");
    let mut ctl = control(srv, &srcs).await?;
    let fan = Fan::new(count, 64, out.errs.clone());
    let f2 = fan.clone();
    let ltask = tokio::spawn(async move {
        if let Err(e) = listen_loop(&f2, &mut lconn, "/sub?channel=lat").await {
            f2.failed.fetch_add(1, Relaxed);
            f2.errs.add(e);
        }
        f2.done.fetch_add(1, Relaxed);
    });
    let ch = vec!["lat".to_string()];
    wait_parked(&mut ctl, &ch, || 1, Duration::from_secs(10)).await?;
    let period = Duration::from_secs_f64(1.0 / rate);
    let start = tokio::time::Instant::now();
    // A stall of the machine delays the schedule instead of bunching the missed messages into
    // a burst: a burst longer than the channel's buffer (10) would overrun a listener that
    // polls one message at a time, which is not what this case measures.
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for i in 0..count {
        tick.tick().await;
        let (_, body) = http::message(64, i);
        match http::send(&mut pconn, http::post("/pub?channel=lat", body)).await {
            Ok(r) if r.status == 201 || r.status == 202 => {
                if r.worker.as_deref() != Some(wp.as_str()) {
                    out.errs.add("publisher connection changed worker");
                }
            }
            Ok(r) => out.errs.add(format!("publish: status {}", r.status)),
            Err(e) => return Err(format!("publish: {e}")),
        }
        if fan.done.load(Relaxed) > 0 {
            break;
        }
    }
    let sent_s = start.elapsed().as_secs_f64();
    wait_until(Duration::from_secs(5), || fan.done.load(Relaxed) > 0).await;
    ltask.abort();
    let got = fan.deliveries();
    if got < count {
        out.errs.add_n(count - got, format!("{} of {count} messages not delivered", count - got));
    }
    let lat = fan.sorted_latencies();
    out.params.insert("listener_worker".into(), json!(wl));
    out.params.insert("publisher_worker".into(), json!(wp));
    out.metric("messages", got as f64);
    out.metric("rate_per_s", count as f64 / sent_s);
    out.metric("p50_us", percentile(&lat, 0.50));
    out.metric("p90_us", percentile(&lat, 0.90));
    out.metric("p99_us", percentile(&lat, 0.99));
    out.metric("max_us", lat.last().map(|&v| v as f64).unwrap_or(f64::NAN));
    Ok(())
}
