//! Long-poll listeners and the helpers every scenario uses: control connections, waiting until
//! the server holds every listener, publishing a round, sampling worker memory, round figures.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::multi::POOL_BODY;
use super::{median, percentile, Errs, Outcome, CONNECT_CONCURRENCY};
use crate::http::{self, now_us, Sender, Sources};
use crate::server::{self, Mem, Server};

/// Shared state of a crowd of listeners that each expect the messages `0..rounds` in order.
pub(super) struct Fan {
    pub(super) rounds: u64,
    pub(super) size: usize,
    pub(super) got: Vec<AtomicU64>,
    pub(super) last_us: Vec<AtomicU64>,
    pub(super) first_us: Vec<AtomicU64>,
    pub(super) lat_us: Mutex<Vec<u32>>,
    pub(super) connected: AtomicU64,
    pub(super) failed: AtomicU64,
    pub(super) done: AtomicU64,
    pub(super) errs: Arc<Errs>,
}

impl Fan {
    pub(super) fn new(rounds: u64, size: usize, errs: Arc<Errs>) -> Arc<Fan> {
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

    /// Records the arrival of a message body that must be message `expect` of the rounds.
    pub(super) fn deliver(&self, body: &[u8], expect: u64) -> Result<(), String> {
        let now = now_us();
        if body.len() != self.size {
            return Err(format!("message of {} bytes, want {}", body.len(), self.size));
        }
        let (ts, seq) = http::parse_message(body).ok_or("malformed message body")?;
        if seq != expect {
            return Err(format!("got message {seq}, want {expect} (lost or repeated)"));
        }
        let i = seq as usize;
        if i >= self.got.len() {
            return Err(format!("got message {seq} of {} rounds", self.rounds));
        }
        self.got[i].fetch_add(1, Relaxed);
        self.last_us[i].fetch_max(now, Relaxed);
        self.first_us[i].fetch_min(now, Relaxed);
        self.lat_us.lock().unwrap().push(now.saturating_sub(ts).min(u32::MAX as u64) as u32);
        Ok(())
    }

    pub(super) fn deliveries(&self) -> u64 {
        self.got.iter().map(|g| g.load(Relaxed)).sum()
    }

    pub(super) fn sorted_latencies(&self) -> Vec<u32> {
        let mut v = self.lat_us.lock().unwrap().clone();
        v.sort_unstable();
        v
    }
}

/// Long-polls `path` until every message `0..rounds` has arrived, in order.
pub(super) async fn listen_loop(fan: &Fan, s: &mut Sender, path: &str) -> Result<(), String> {
    let (mut etag, mut lm) = (None, None);
    let mut expect = 0;
    while expect < fan.rounds {
        let r = http::send(s, http::listen(path, etag.as_ref(), lm.as_ref())).await?;
        match r.status {
            200 => {
                if r.body.as_ref() == POOL_BODY {
                    // A message of a pool channel (nchan's multiplexed listeners): not counted.
                } else {
                    fan.deliver(&r.body, expect)?;
                    expect += 1;
                }
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
pub(super) async fn on_connection<F, Fut>(
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
pub(super) async fn listener(
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

pub(super) fn spawn_listeners(
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
pub(super) async fn control(srv: &Server, srcs: &Sources) -> Result<Vec<Sender>, String> {
    Ok(balanced(srv.addr, srcs, srv.workers.max(1), 1).await?.into_iter().map(|(_, s)| s).collect())
}

/// Waiting listeners of a channel: the largest count any worker reports.
pub(super) async fn count(ctl: &mut [Sender], channel: &str) -> Result<u64, String> {
    let mut n = 0;
    for c in ctl.iter_mut() {
        n = n.max(http::listener_count(c, channel).await?);
    }
    Ok(n)
}

/// Waits until the server reports `want()` waiting listeners over `channels`.
pub(super) async fn wait_parked(
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

pub(super) async fn wait_until(timeout: Duration, cond: impl Fn() -> bool) -> bool {
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
pub(super) async fn balanced(
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
pub(super) async fn publish_round(
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
pub(super) struct MemSampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Mem>,
}

impl MemSampler {
    pub(super) fn start(pids: Vec<u32>) -> MemSampler {
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

    pub(super) fn stop(self) -> Mem {
        self.stop.store(true, Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

/// The figures of a run of rounds: round times, delivery latencies, and the CPU the server and
/// the client used between `cpu0` and `cpu1` (taken over all the rounds, re-poll waits
/// included: the server's cost per delivery does not depend on how fast this one client is).
pub(super) fn round_metrics(
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

/// The idle figures: worker memory growth from `mem0` (fresh) to `mem1` (`parked` listeners
/// waiting), per listener.
pub(super) fn idle_metrics(out: &mut Outcome, parked: u64, mem0: Mem, mem1: Mem) {
    let per = |a: u64, b: u64| (b as f64 - a as f64) / parked.max(1) as f64;
    out.metric("parked", parked as f64);
    out.metric("rss_fresh_kb", mem0.rss as f64 / 1024.0);
    out.metric("rss_parked_kb", mem1.rss as f64 / 1024.0);
    out.metric("rss_per_listener_b", per(mem0.rss, mem1.rss));
    out.metric("anon_per_listener_b", per(mem0.anon, mem1.anon));
    out.metric("shmem_per_listener_b", per(mem0.shmem, mem1.shmem));
}
