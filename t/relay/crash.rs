//! A worker killed (idle, and during a storm).

use super::*;

// 11. a worker killed

/// Checks publish/listen in both directions between every pair of current workers.
pub(crate) async fn check_all_workers_deliver(ng: &Nginx, ch: &str) {
    let w = ng.worker_pids();
    assert_eq!(w.len(), 2);
    for (lw, pw) in [(w[0], w[1]), (w[1], w[0]), (w[0], w[0])] {
        let mut p = Conn::open_on(ng.port, pw).await;
        let last = p.info(ch).await.and_then(|i| i.last_id);
        let etag = last.map(|i| format!("\"{i}\""));
        let l = Conn::open_on(ng.port, lw).await.listen(ch, etag.as_deref(), None);
        p.wait_listeners(ch, 1).await;
        let body = format!("{pw}->{lw}");
        assert_published(&p.publish(ch, body.clone()).await, 201, "publish");
        let r = l.resp().await;
        assert_eq!(r.worker(), lw);
        assert_eq!(expect_msg(&r).text(), body);
        p.wait_listeners(ch, 0).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_idle_worker_then_everything_works() {
    let mut ng = Nginx::start(std_conf());
    ng.allow_log("exited on signal 9");
    ng.allow_log("was locked by");
    let w = ng.worker_pids();
    let (victim, survivor) = (w[0], w[1]);
    let mut p = Conn::open_on(ng.port, survivor).await;
    let mut dead_ls = Vec::new();
    let mut live_ls = Vec::new();
    for _ in 0..3 {
        dead_ls.push(Conn::open_on(ng.port, victim).await.listen("k", None, None));
        live_ls.push(Conn::open_on(ng.port, survivor).await.listen("k", None, None));
    }
    p.wait_listeners("k", 6).await;

    ng.kill_worker(victim, libc::SIGKILL);
    ng.wait_respawn(victim);
    // The respawned worker removes the dead one's listener counts.
    let i = p.wait_listeners("k", 3).await;
    assert_eq!(i.messages, 0);
    drop(dead_ls);
    assert_published(&p.publish("k", "after kill").await, 201, "publish");
    for l in live_ls {
        assert_eq!(expect_msg(&l.resp().await).text(), "after kill");
    }
    p.wait_listeners("k", 0).await;
    check_all_workers_deliver(&ng, "k").await;
    check_all_workers_deliver(&ng, "k-new").await;
    ng.finish();
}

#[test]
fn sigkill_worker_during_storm() {
    heavy_test(async {
        let mut ng = Nginx::start(std_conf());
        ng.allow_log("exited on signal 9");
        ng.allow_log("was locked by");
        let port = ng.port;
        let stop = Arc::new(AtomicBool::new(false));
        let published = Arc::new(AtomicU64::new(0));
        let received = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for t in 0..3u64 {
            let (stop, published) = (stop.clone(), published.clone());
            tasks.push(tokio::spawn(async move {
                let mut conn: Option<Conn> = None;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if conn.is_none() {
                        conn = Conn::try_open(port).await.ok();
                    }
                    let Some(c) = conn.as_mut() else {
                        sleep_ms(10).await;
                        continue;
                    };
                    n += 1;
                    let body = noise(64 + (n as usize * 37) % 4000, n);
                    let path = pub_path(&format!("s{}", (n + t) % 4));
                    match c.try_send("POST", &path, &[], body).await {
                        Ok(r) if r.status == 201 || r.status == 202 => {
                            published.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => panic!("storm publish got {}: {}", r.status, r.text()),
                        Err(_) => conn = None,
                    }
                }
            }));
        }
        for t in 0..8u64 {
            let (stop, received) = (stop.clone(), received.clone());
            tasks.push(tokio::spawn(async move {
                let mut conn: Option<Conn> = None;
                let mut etag: Option<String> = None;
                let ch = format!("s{}", t % 4);
                while !stop.load(Ordering::Relaxed) {
                    if conn.is_none() {
                        conn = Conn::try_open(port).await.ok();
                    }
                    let Some(c) = conn.as_mut() else {
                        sleep_ms(10).await;
                        continue;
                    };
                    let req = request(
                        "GET",
                        &sub_path(&ch),
                        &id_headers(etag.as_deref(), None),
                        full(""),
                    );
                    match c.try_request(req, Duration::from_secs(2)).await {
                        Ok(r) if r.status == 200 => {
                            etag = r.header("etag").map(str::to_string);
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) if r.status == 304 => {}
                        Ok(r) => panic!("storm listener got {}: {}", r.status, r.text()),
                        Err(_) => conn = None,
                    }
                }
            }));
        }
        let wait_counts = |p: u64, r: u64, what: &'static str| {
            let (published, received) = (published.clone(), received.clone());
            async move {
                let deadline = Instant::now() + Duration::from_secs(30);
                while published.load(Ordering::Relaxed) < p || received.load(Ordering::Relaxed) < r
                {
                    assert!(
                        Instant::now() < deadline,
                        "{what}: storm stalled at {} published / {} received",
                        published.load(Ordering::Relaxed),
                        received.load(Ordering::Relaxed)
                    );
                    sleep_ms(20).await;
                }
            }
        };
        wait_counts(300, 300, "before the kill").await;
        let victim = ng.worker_pids()[0];
        ng.kill_worker(victim, libc::SIGKILL);
        ng.wait_respawn(victim);
        let (p0, r0) = (published.load(Ordering::Relaxed), received.load(Ordering::Relaxed));
        wait_counts(p0 + 300, r0 + 300, "after the kill").await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            within(LONG, "storm task", t).await.expect("storm task panicked");
        }
        // Every storm client is gone: every count back to 0 (dead worker's counts removed).
        let mut c = Conn::open_probed(port).await;
        for s in 0..4 {
            c.wait_listeners(&format!("s{s}"), 0).await;
        }
        check_all_workers_deliver(&ng, "s0").await;
        check_all_workers_deliver(&ng, "after-storm").await;
        ng.finish();
    });
}
