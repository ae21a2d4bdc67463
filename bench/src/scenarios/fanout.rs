//! fanout (and big: one channel, large messages, worker memory sampled during the rounds), and
//! fanout-floor: nginx's own floor for a round.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::clients::*;
use super::multi::{self, Multi, HOT};
use super::{Outcome, CONNECT_CONCURRENCY};
use crate::http::{self, now_us, Sources};
use crate::server::Server;

/// The listeners of a fan-out.
#[derive(Clone, Copy)]
pub(super) enum Variant {
    /// `fanout`: single-channel listeners spread over the channels.
    Plain,
    /// `big`: single-channel listeners on one channel, worker memory sampled during the rounds.
    Big,
    /// `fanout --multi`: multi-channel listeners, the rounds published to `hot` alone.
    Multi(Multi),
}

pub(super) async fn fanout(
    srv: &Server,
    out: &mut Outcome,
    n: u64,
    nch: u64,
    rounds: u64,
    size: usize,
    variant: Variant,
) -> Result<(), String> {
    let big = matches!(variant, Variant::Big);
    let multi = match variant {
        Variant::Multi(m) => Some(m),
        _ => None,
    };
    out.params.insert("listeners".into(), json!(n));
    if let Some(m) = &multi {
        out.params.insert("channels_per_listener".into(), json!(m.per_listener));
        out.params.insert("pool".into(), json!(m.pool));
    } else if !big {
        out.params.insert("channels".into(), json!(nch));
    }
    out.params.insert("rounds".into(), json!(rounds));
    out.params.insert("size".into(), json!(size));
    let nch = nch.max(1);
    let prefix = if big { "big" } else { "fan" };
    let channels: Arc<Vec<String>> = Arc::new(match multi {
        // Multi-channel listeners: the rounds publish to `hot` alone.
        Some(_) => vec![HOT.to_string()],
        None => (0..nch).map(|i| format!("{prefix}{i}")).collect(),
    });
    let srcs = Arc::new(Sources::new(0));
    let errs = out.errs.clone();
    let fan = Fan::new(rounds, size, errs.clone());
    let mut ctl = control(srv, &srcs).await?;
    let mut pubs = Vec::new();
    for _ in 0..nch.min(8) {
        pubs.push(http::connect_spawned(srv.addr, srcs.next()).await?);
    }
    if let Some(m) = &multi {
        multi::fill_pool(srv, &srcs, m).await?;
    }
    let mem0 = srv.mem();

    let mut set = JoinSet::new();
    let t_setup = Instant::now();
    match &multi {
        Some(m) => multi::spawn(&mut set, &fan, srv, &srcs, n, m),
        None => spawn_listeners(&mut set, &fan, srv.addr, &srcs, n, &channels),
    }
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
pub(super) async fn fanout_floor(
    srv: &Server,
    out: &mut Outcome,
    n: u64,
    rounds: u64,
) -> Result<(), String> {
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
