//! A reload while a publish body is still arriving: the old worker's publish wakes the new
//! workers.

use super::*;

/// SIGHUP without waiting for the old workers (one of them still serves a request): returns
/// (old workers, new workers) once the new generation runs.
async fn reload_begin(ng: &Nginx) -> (Vec<u32>, Vec<u32>) {
    let old = ng.all_workers();
    // SAFETY: kill(2) on the master this test started.
    assert_eq!(unsafe { libc::kill(ng.master_pid() as libc::pid_t, libc::SIGHUP) }, 0);
    let deadline = Instant::now() + NGINX_WAIT;
    loop {
        let now = ng.worker_pids();
        if now.len() == 2 && now.iter().all(|p| !old.contains(p)) {
            return (old, now);
        }
        assert!(Instant::now() < deadline, "no new workers after SIGHUP: {now:?} (old {old:?})");
        sleep_ms(10).await;
    }
}

/// Waits until every worker in `old` has exited.
async fn wait_gone(ng: &Nginx, old: &[u32]) {
    let deadline = Instant::now() + NGINX_WAIT;
    loop {
        let now = ng.all_workers();
        if old.iter().all(|p| !now.contains(p)) {
            return;
        }
        assert!(Instant::now() < deadline, "old workers {old:?} still there: {now:?}");
        sleep_ms(10).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_while_publish_body_in_flight_new_workers_still_woken() {
    let ng = Nginx::start(Conf::new(&pubsub("", "martd_listener_timeout 30s;")));
    let port = ng.port;
    let mut etag: Option<String> = None;
    for round in 0..3 {
        let ch = format!("rl{round}");
        let body = format!("published by the old generation, round {round}: {}", "x".repeat(200));
        // The publish request reaches the martd_push handler of a worker of this generation,
        // which waits for the body (100 Continue proves it is reading it).
        let mut publisher = Wire::open(port).await;
        publisher
            .write(
                format!(
                    "POST /pub?channel={ch} HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n\
                     Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            )
            .await;
        let cont = publisher.response(QUICK).await;
        assert_eq!(cont.status, 100, "round {round}: 100 Continue before the body");
        let (first, rest) = body.as_bytes().split_at(body.len() / 2);
        publisher.write(first).await;

        let (old, new) = reload_begin(&ng).await;

        // Listeners on both new workers (two each), waiting for the message still in flight.
        let h: Vec<(&str, &str)> =
            etag.as_deref().map(|e| vec![("if-none-match", e)]).unwrap_or_default();
        let mut ls = Vec::new();
        for &w in &new {
            for _ in 0..2 {
                ls.push((w, listen_on(port, w, &format!("/sub?channel={ch}"), &h).await));
            }
        }
        let mut p = Conn::open_on(port, new[0]).await;
        p.wait_listeners(&ch, 4).await;

        // The old worker finishes the publish.
        publisher.write(rest).await;
        let r = publisher.response(QUICK).await;
        assert_eq!(
            r.status,
            201,
            "round {round}: the old worker's publish: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        let info = parse_info_text(&String::from_utf8_lossy(&r.body));
        assert_eq!(info.listeners, 4, "round {round}: listeners counted by the old worker");
        for (w, l) in ls {
            let (_, r) = promptly(l, &format!("round {round}: old worker -> new worker {w}")).await;
            let m = expect_body(&r, &body, Some(w), "message published by the old generation");
            etag = Some(m.etag);
        }
        drop(publisher);
        wait_gone(&ng, &old).await;

        // Later publishes by the new workers reach listeners on both new workers promptly.
        for (i, &pw) in new.iter().enumerate() {
            let h: Vec<(&str, &str)> =
                etag.as_deref().map(|e| vec![("if-none-match", e)]).unwrap_or_default();
            let mut ls = Vec::new();
            for &w in &new {
                ls.push((w, listen_on(port, w, &format!("/sub?channel={ch}"), &h).await));
            }
            let mut pc = Conn::open_on(port, pw).await;
            pc.wait_listeners(&ch, 2).await;
            let body = format!("round {round}: new worker {pw} publishes ({i})");
            assert_status(&pc.publish(&ch, body.clone()).await, 201, "publish by a new worker");
            for (w, l) in ls {
                let (_, r) = promptly(l, &format!("round {round}: {pw} -> {w} after")).await;
                etag = Some(expect_body(&r, &body, Some(w), "publish by a new worker").etag);
            }
            pc.wait_listeners(&ch, 0).await;
        }
    }
    ng.finish();
}
