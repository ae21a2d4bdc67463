//! publish, idle, capacity (+ its child processes), latency (and latency-stream).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::clients::*;
use super::multi::{self, Multi, HOT};
use super::streams;
use super::{percentile, Errs, Outcome, CHILD_CPU_US, CONNECT_CONCURRENCY};
use crate::args::Args;
use crate::http::{self, now_us, Sources};
use crate::server::{self, Server};

pub(super) async fn publish(
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
pub(super) async fn keepalive_conn(
    fan: Arc<Fan>,
    dst: SocketAddr,
    srcs: Arc<Sources>,
    gate: Arc<Semaphore>,
) {
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

pub(super) async fn idle(
    srv: &Server,
    out: &mut Outcome,
    n: u64,
    nch: u64,
    keepalive: bool,
    multi: Option<Multi>,
) -> Result<(), String> {
    out.params.insert("listeners".into(), json!(n));
    if let Some(m) = &multi {
        out.params.insert("channels_per_listener".into(), json!(m.per_listener));
        out.params.insert("pool".into(), json!(m.pool));
    } else {
        out.params.insert("channels".into(), json!(nch));
    }
    out.params.insert("keepalive".into(), json!(keepalive));
    let nch = nch.max(1);
    let channels: Vec<String> = match multi {
        Some(_) => vec![HOT.to_string()],
        None => (0..nch).map(|i| format!("idle{i}")).collect(),
    };
    let srcs = Arc::new(Sources::new(0));
    let fan = Fan::new(1, 64, out.errs.clone());
    let mut ctl = control(srv, &srcs).await?;
    if let Some(m) = &multi {
        multi::fill_pool(srv, &srcs, m).await?;
    }
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
        match &multi {
            Some(m) => multi::spawn(&mut set, &fan, srv, &srcs, n, m),
            None => spawn_listeners(&mut set, &fan, srv.addr, &srcs, n, &channels),
        }
        wait_parked(&mut ctl, &channels, want, Duration::from_secs(120)).await?;
    }
    out.metric("setup_s", t0.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mem1 = srv.mem();
    idle_metrics(out, n - fan.failed.load(Relaxed), mem0, mem1);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// capacity: listeners in child processes (each one's open files stay under 20000)

pub(super) async fn capacity(
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

pub(super) async fn latency(
    srv: &Server,
    out: &mut Outcome,
    rate: f64,
    seconds: f64,
    stream: bool,
) -> Result<(), String> {
    out.params.insert("rate".into(), json!(rate));
    out.params.insert("seconds".into(), json!(seconds));
    if stream {
        out.params.insert("transport".into(), json!("eventsource"));
    }
    let count = (rate * seconds).round().max(1.0) as u64;
    let srcs = Sources::new(0);
    if srv.workers < 2 {
        return Err("latency needs 2 workers".into());
    }
    let mut conns = balanced(srv.addr, &srcs, 2, 1).await?;
    let (wp, mut pconn) = conns.pop().expect("two");
    let (wl, lconn) = conns.pop().expect("two");
    let mut ctl = control(srv, &srcs).await?;
    let fan = Fan::new(count, 64, out.errs.clone());
    let f2 = fan.clone();
    let ltask = tokio::spawn(async move {
        // latency-stream: one EventSource stream, open for the whole run, on the same
        // connection (so on the same worker).
        let mut lconn = lconn;
        let res = if stream {
            streams::listen_stream(&f2, lconn, "/subs?channel=lat").await
        } else {
            listen_loop(&f2, &mut lconn, "/sub?channel=lat").await
        };
        if let Err(e) = res {
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
    // The long-poll listener ends after the last message; the stream stays open.
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
