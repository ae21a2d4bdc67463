//! The redis-* cases: two nginx nodes, A and B (each its own prefix, port and 2 workers), that
//! share channels through one redis-server (martd: `martd_redis_url`; nchan:
//! `nchan_redis_pass` to an upstream with `nchan_redis_server`). Every publish goes to node A.
//!
//! redis-latency: `latency` across the nodes: the listener waits on node B, the messages are
//! published on node A at the given rate, and each message's publish → receive time is taken
//! from its body. Unlike `latency`'s one publisher connection, which waits for each answer
//! before the next publish, a few connections (on one worker of node A, so that the messages
//! reach it in order) take turns, so that the rate holds when a publish takes longer than the
//! period (martd answers a publish once its own node has the message back from Redis).
//! redis-publish: `publish`'s publishers on node A, no listeners; the accepted publishes per
//! second, and afterwards a check that node B sees every channel's last message.
//! redis-publish-tls (`redis-publish --tls`, martd only): the same with redis-server serving TLS
//! only and the nodes connecting with `rediss://` (see `redis_server`): the cost of TLS.
//! redis-fanout: long-poll listeners of one channel spread evenly over both nodes, rounds
//! published on node A, as in `fanout`; every listener must get every message.
//!
//! How many listeners are waiting: martd's channel info counts the listeners of the node asked
//! (the counts of A and B are added up), nchan's counts every node's (from Redis: the largest
//! of the two is taken).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::header::{HeaderValue, ACCEPT};
use serde_json::{json, Value};
use tokio::task::JoinSet;

use super::clients::*;
use super::{median, percentile, Outcome};
use crate::http::{self, now_us, Sender, Sources};
use crate::redis_server::RedisServer;
use crate::server::{Kind, Server};

/// The two nodes of a run and their Redis.
pub(super) struct Cluster<'a> {
    pub(super) a: &'a Server,
    pub(super) b: &'a Server,
    pub(super) redis: &'a RedisServer,
}

impl<'a> Cluster<'a> {
    pub(super) fn new(
        nodes: &'a [Server],
        redis: Option<&'a RedisServer>,
    ) -> Result<Cluster<'a>, String> {
        match (nodes, redis) {
            ([a, b], Some(redis)) => Ok(Cluster { a, b, redis }),
            _ => Err("a redis case needs two nodes and a redis-server".into()),
        }
    }

    /// Waits until every worker of both nodes publishes through Redis (a `2xx` to a publish on
    /// the channel `ready`): a node connects to Redis after it starts (nchan: each worker), and
    /// answers 503 until then.
    async fn ready(&self, srcs: &Sources) -> Result<(), String> {
        let t0 = Instant::now();
        for node in [self.a, self.b] {
            for mut s in control(node, srcs).await? {
                loop {
                    let r =
                        http::send(&mut s, http::post("/pub?channel=ready", "r".into())).await?;
                    if (200..300).contains(&r.status) {
                        break;
                    }
                    if t0.elapsed() > Duration::from_secs(15) {
                        return Err(format!(
                            "{} does not publish through Redis after 15 s (status {})",
                            node.addr, r.status
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        Ok(())
    }

    /// CPU time so far, in µs: node A's workers, node B's, redis-server's.
    fn cpu(&self) -> [u64; 3] {
        [self.a.cpu_us().0, self.b.cpu_us().0, self.redis.cpu_us()]
    }
}

/// Per-event CPU figures between two `Cluster::cpu` samples.
fn cpu_metrics(
    out: &mut Outcome,
    what: &'static [&'static str; 4],
    c0: [u64; 3],
    c1: [u64; 3],
    n: u64,
) {
    let per = |i: usize| (c1[i] - c0[i]) as f64 / n.max(1) as f64;
    out.metric(what[0], per(0) + per(1));
    out.metric(what[1], per(0));
    out.metric(what[2], per(1));
    out.metric(what[3], per(2));
}

// ---------------------------------------------------------------------------------------------
// redis-latency

/// Publisher connections of redis-latency that take turns.
const LATENCY_PUBLISHERS: usize = 4;

/// `k` connections to `srv` that all answer from the same worker (the first one's).
async fn same_worker(
    srv: &Server,
    srcs: &Sources,
    k: usize,
) -> Result<(String, Vec<Sender>), String> {
    let mut worker = None;
    let mut conns = Vec::new();
    for _ in 0..(k * 20 + 100) {
        let mut s = http::connect_spawned(srv.addr, srcs.next()).await?;
        let w = http::send(&mut s, http::get("/ret")).await?.worker.ok_or("no X-Worker header")?;
        if worker.get_or_insert_with(|| w.clone()) == &w {
            conns.push(s);
            if conns.len() == k {
                return Ok((w, conns));
            }
        }
    }
    Err(format!("could not get {k} connections on one worker of {}", srv.addr))
}

pub(super) async fn latency(
    c: &Cluster<'_>,
    out: &mut Outcome,
    rate: f64,
    seconds: f64,
) -> Result<(), String> {
    out.params.insert("rate".into(), json!(rate));
    out.params.insert("seconds".into(), json!(seconds));
    out.params.insert("publisher_connections".into(), json!(LATENCY_PUBLISHERS));
    let count = (rate * seconds).round().max(1.0) as u64;
    let srcs = Sources::new(0);
    c.ready(&srcs).await?;
    let (wp, mut free) = same_worker(c.a, &srcs, LATENCY_PUBLISHERS).await?;
    let (wl, mut lconn) = same_worker(c.b, &srcs, 1).await?;
    let lconn = lconn.pop().expect("one");
    let mut ctl = control(c.b, &srcs).await?;
    let fan = Fan::new(count, 64, out.errs.clone());
    let f2 = fan.clone();
    let ltask = tokio::spawn(async move {
        let mut lconn = lconn;
        if let Err(e) = listen_loop(&f2, &mut lconn, "/sub?channel=rlat").await {
            f2.failed.fetch_add(1, Relaxed);
            f2.errs.add(format!("listener on node B: {e}"));
        }
        f2.done.fetch_add(1, Relaxed);
    });
    wait_parked(&mut ctl, &["rlat".to_string()], || 1, Duration::from_secs(10)).await?;
    let period = Duration::from_secs_f64(1.0 / rate);
    let start = tokio::time::Instant::now();
    // As in `latency`: a stall delays the schedule instead of bunching the missed messages.
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A publish in flight gives its connection back when answered.
    let mut busy = JoinSet::new();
    let errs = out.errs.clone();
    let answered = |r: Result<(Sender, Result<u16, String>), _>| match r {
        Ok((s, Ok(st))) if (200..300).contains(&st) => Ok(s),
        Ok((s, Ok(st))) => {
            errs.add(format!("publish to node A: status {st}"));
            Ok(s)
        }
        Ok((_, Err(e))) => Err(format!("publish to node A: {e}")),
        Err(e) => Err(format!("publisher task: {e}")),
    };
    for i in 0..count {
        tick.tick().await;
        while let Some(r) = busy.try_join_next() {
            free.push(answered(r)?);
        }
        let mut s = match free.pop() {
            Some(s) => s,
            None => answered(busy.join_next().await.expect("busy"))?,
        };
        let (_, body) = http::message(64, i);
        busy.spawn(async move {
            let r = http::send(&mut s, http::post("/pub?channel=rlat", body)).await;
            (s, r.map(|r| r.status))
        });
        if fan.done.load(Relaxed) > 0 {
            break;
        }
    }
    while let Some(r) = busy.join_next().await {
        answered(r)?;
    }
    let sent_s = start.elapsed().as_secs_f64();
    wait_until(Duration::from_secs(5), || fan.done.load(Relaxed) > 0 || fan.deliveries() >= count)
        .await;
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

// ---------------------------------------------------------------------------------------------
// redis-publish

pub(super) async fn publish(
    c: &Cluster<'_>,
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
    let nch = nch.max(1);
    let srcs = Sources::new(0);
    c.ready(&srcs).await?;
    let per_worker = publishers.div_ceil(c.a.workers.max(1));
    let conns = balanced(c.a.addr, &srcs, c.a.workers.max(1), per_worker).await?;
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
                let (_, body) = http::message(size, i);
                let path = format!("/pub?channel=rp{}", i % nch);
                match http::send(&mut s, http::post(&path, body)).await {
                    Ok(r) if (200..300).contains(&r.status) => {
                        if measuring.load(Relaxed) {
                            ok.fetch_add(1, Relaxed);
                        }
                    }
                    Ok(r) => errs.add(format!("publish to node A: status {}", r.status)),
                    Err(e) => {
                        errs.add(format!("publish to node A: {e}"));
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
    let (cpu0, client0) = (c.cpu(), c.a.cpu_us().1);
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    measuring.store(false, Relaxed);
    let (cpu1, client1) = (c.cpu(), c.a.cpu_us().1);
    let dt = t0.elapsed().as_secs_f64();
    stop.store(true, Relaxed);
    while set.join_next().await.is_some() {}
    let done = ok.load(Relaxed);
    out.metric("pubs_per_s", done as f64 / dt);
    let names =
        &["server_us_per_pub", "node_a_us_per_pub", "node_b_us_per_pub", "redis_us_per_pub"];
    cpu_metrics(out, names, cpu0, cpu1, done);
    out.metric("client_cpu_share_pub", (client1 - client0) as f64 / dt / 1e6);

    // Every message went through Redis: node B ends up with each channel's last message.
    let t_sync = Instant::now();
    let mut ca = http::connect_spawned(c.a.addr, srcs.next()).await?;
    let mut cb = http::connect_spawned(c.b.addr, srcs.next()).await?;
    let mut behind = Vec::new();
    for k in 0..nch {
        let ch = format!("rp{k}");
        let want = last_id(&mut ca, &ch).await?;
        loop {
            let got = last_id(&mut cb, &ch).await?;
            if got == want {
                break;
            }
            if t_sync.elapsed() > Duration::from_secs(10) {
                behind.push(format!("{ch}: node B's last message {got:?}, node A's {want:?}"));
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    out.metric("node_b_sync_ms", t_sync.elapsed().as_secs_f64() * 1000.0);
    if let Some(first) = behind.first() {
        out.errs.add_n(
            behind.len() as u64,
            format!("{} channels behind on node B, e.g. {first}", behind.len()),
        );
    }
    Ok(())
}

/// The id of a channel's last message according to a node's channel info (None: no channel).
async fn last_id(s: &mut Sender, channel: &str) -> Result<Option<String>, String> {
    let mut req = http::get(&format!("/pub?channel={channel}"));
    req.headers_mut().insert(ACCEPT, HeaderValue::from_static("application/json"));
    let r = http::send(s, req).await?;
    match r.status {
        404 => Ok(None),
        200 => {
            let v: Value = serde_json::from_slice(&r.body)
                .map_err(|e| format!("channel info {:?}: {e}", String::from_utf8_lossy(&r.body)))?;
            Ok(v.get("last_message_id").and_then(|x| x.as_str()).map(str::to_string))
        }
        st => Err(format!("channel info of {channel}: status {st}")),
    }
}

// ---------------------------------------------------------------------------------------------
// redis-fanout

/// Waiting listeners of `channel` over both nodes (see the module's comment).
async fn parked(
    kind: Kind,
    ca: &mut [Sender],
    cb: &mut [Sender],
    channel: &str,
) -> Result<u64, String> {
    let (na, nb) = (count(ca, channel).await?, count(cb, channel).await?);
    Ok(match kind {
        Kind::Martd => na + nb,
        Kind::Nchan => na.max(nb),
    })
}

async fn wait_parked_both(
    kind: Kind,
    ca: &mut [Sender],
    cb: &mut [Sender],
    channel: &str,
    want: impl Fn() -> u64,
    timeout: Duration,
) -> Result<(), String> {
    let t0 = Instant::now();
    loop {
        let total = parked(kind, ca, cb, channel).await?;
        if total >= want() {
            return Ok(());
        }
        if t0.elapsed() > timeout {
            return Err(format!(
                "the nodes show {total} waiting listeners, want {}, after {} s",
                want(),
                timeout.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub(super) async fn fanout(
    c: &Cluster<'_>,
    out: &mut Outcome,
    n: u64,
    rounds: u64,
    size: usize,
) -> Result<(), String> {
    out.params.insert("listeners".into(), json!(n));
    out.params.insert("rounds".into(), json!(rounds));
    out.params.insert("size".into(), json!(size));
    let (n_a, n_b) = (n - n / 2, n / 2);
    out.params.insert("listeners_a".into(), json!(n_a));
    out.params.insert("listeners_b".into(), json!(n_b));
    let channels = Arc::new(vec!["rfan".to_string()]);
    let srcs = Arc::new(Sources::new(0));
    c.ready(&srcs).await?;
    let errs = out.errs.clone();
    // One crowd per node, so that each node's deliveries are checked on their own.
    let (fa, fb) = (Fan::new(rounds, size, errs.clone()), Fan::new(rounds, size, errs.clone()));
    let (mut ca, mut cb) = (control(c.a, &srcs).await?, control(c.b, &srcs).await?);
    let mut pubs = vec![http::connect_spawned(c.a.addr, srcs.next()).await?];
    let mut set = JoinSet::new();
    let t_setup = Instant::now();
    spawn_listeners(&mut set, &fa, c.a.addr, &srcs, n_a, &channels);
    spawn_listeners(&mut set, &fb, c.b.addr, &srcs, n_b, &channels);
    let failed = || fa.failed.load(Relaxed) + fb.failed.load(Relaxed);
    let want = || n - failed();
    let kind = c.a.kind;
    let ch = &channels[0];
    wait_parked_both(kind, &mut ca, &mut cb, ch, want, Duration::from_secs(120)).await?;
    out.metric("setup_s", t_setup.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cpu0 = c.cpu();

    let (mut round_ms, mut round_a_ms, mut round_b_ms) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        if r > 0 {
            // Every listener has the previous message: let them ask again, and wait until both
            // nodes hold all of them.
            tokio::time::sleep(Duration::from_millis(20)).await;
            wait_parked_both(kind, &mut ca, &mut cb, ch, want, Duration::from_secs(30)).await?;
        }
        let t0 = now_us();
        publish_round(&mut pubs, &channels, size, r, &errs).await;
        let i = r as usize;
        let got = || fa.got[i].load(Relaxed) + fb.got[i].load(Relaxed);
        if !wait_until(Duration::from_secs(30), || got() >= want()).await {
            let (ma, mb) = (
                (n_a - fa.failed.load(Relaxed)).saturating_sub(fa.got[i].load(Relaxed)),
                (n_b - fb.failed.load(Relaxed)).saturating_sub(fb.got[i].load(Relaxed)),
            );
            return Err(format!(
                "round {r}: {ma} listeners on node A and {mb} on node B did not get the message \
                 within 30 s"
            ));
        }
        let (la, lb) = (fa.last_us[i].load(Relaxed), fb.last_us[i].load(Relaxed));
        let ms = |last: u64| last.saturating_sub(t0) as f64 / 1000.0;
        round_ms.push(ms(la.max(lb)));
        round_a_ms.push(ms(la));
        round_b_ms.push(ms(lb));
    }
    let cpu1 = c.cpu();

    for (node, f, count) in [("A", &fa, n_a), ("B", &fb, n_b)] {
        let (expected, got) = (count * rounds, f.deliveries());
        if got < expected {
            let missing = expected - got;
            errs.add_n(missing, format!("node {node}: {missing} of {expected} deliveries missing"));
        }
    }
    let (lat_a, lat_b) = (fa.sorted_latencies(), fb.sorted_latencies());
    let mut lat: Vec<u32> = lat_a.iter().chain(lat_b.iter()).copied().collect();
    lat.sort_unstable();
    let deliveries = fa.deliveries() + fb.deliveries();
    out.metric("round_ms", median(&round_ms));
    out.metric("round_max_ms", round_ms.iter().copied().fold(f64::NAN, f64::max));
    out.metric("round_a_ms", median(&round_a_ms));
    out.metric("round_b_ms", median(&round_b_ms));
    out.metric("p50_us", percentile(&lat, 0.50));
    out.metric("p99_us", percentile(&lat, 0.99));
    out.metric("p99_a_us", percentile(&lat_a, 0.99));
    out.metric("p99_b_us", percentile(&lat_b, 0.99));
    out.metric("deliveries", deliveries as f64);
    out.metric("deliveries_a", fa.deliveries() as f64);
    out.metric("deliveries_b", fb.deliveries() as f64);
    let names = &[
        "server_us_per_delivery",
        "node_a_us_per_delivery",
        "node_b_us_per_delivery",
        "redis_us_per_delivery",
    ];
    cpu_metrics(out, names, cpu0, cpu1, deliveries);
    set.shutdown().await;
    Ok(())
}
