//! Subrequests (`mirror`, `auth_request`) and limits (`limit_req`, `limit_conn`) on listen
//! locations.

use super::*;

/// Waits until the zone counts every one of `ls` as waiting on `ch`; a listener answered (or
/// whose connection closed) before that fails the test with what it got.
async fn all_waiting(
    p: &mut Conn,
    ch: &str,
    mut ls: Vec<(u32, &'static str, Pending)>,
) -> Vec<(u32, &'static str, Pending)> {
    let deadline = Instant::now() + QUICK;
    loop {
        if let Some(i) = ls.iter().position(|(_, _, l)| l.is_finished()) {
            let (lw, path, l) = ls.swap_remove(i);
            // Panics with the error if the connection closed without an answer.
            let r = l.resp().await;
            panic!("{path} on {lw} answered before any message: {} {:?}", r.status, r.text());
        }
        let n = p.info(ch).await.map_or(0, |i| i.listeners);
        if n == ls.len() as u64 {
            return ls;
        }
        assert!(Instant::now() < deadline, "{ch}: {n} of {} listeners waiting", ls.len());
        sleep_ms(20).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_on_listen_location() {
    // The mirror upstream answers after 2 s, so the subrequest runs while listeners wait, are
    // answered and time out.
    let slow = Backend::slow(Duration::from_secs(2)).await;
    let ng = Nginx::start(Conf::new(&format!(
        "        location = /pub {{ martd_push; }}
        location = /sub {{ mirror /mirror; martd_listen; martd_listener_timeout 30s; }}
        location = /sub-short {{ mirror /mirror; martd_listen; martd_listener_timeout 1s; }}
        location = /sub2 {{ martd_listen; martd_listener_timeout 30s; }}
        location = /sub2-short {{ martd_listen; martd_listener_timeout 1s; }}
        location = /mirror {{ internal; proxy_pass http://127.0.0.1:{}; }}
",
        slow.port
    )));
    let port = ng.port;
    let w = ng.worker_pids();
    let mut p = Conn::open_on(port, w[0]).await;
    let mut mirrored = 0;
    for round in 0..2 {
        let ch = format!("m{round}");
        // On each worker: two listeners with a mirror, two plain detached ones.
        let mut ls = Vec::new();
        for &lw in &w {
            for path in ["/sub", "/sub", "/sub2", "/sub2"] {
                let l = listen_on(port, lw, &format!("{path}?channel={ch}"), &[]).await;
                ls.push((lw, path, l));
            }
        }
        mirrored += 4;
        let mut ls = all_waiting(&mut p, &ch, ls).await;
        slow.wait_count("/mirror", mirrored).await;
        let body = format!("mirror round {round}");
        let r = p.publish(&ch, body.clone()).await;
        assert_status(&r, 201, "publish");
        assert_eq!(parse_info_text(&r.text()).listeners, 8, "listeners counted at publish");
        for (lw, path, l) in ls.drain(..) {
            let (_, r) = promptly(l, &format!("{path} on {lw}")).await;
            expect_body(&r, &body, Some(lw), &format!("{path} listener"));
        }
        p.wait_listeners(&ch, 0).await;

        // Timeouts: 304 for every one, while mirror subrequests still run.
        let ch = format!("mt{round}");
        let mut ls = Vec::new();
        for &lw in &w {
            for path in ["/sub-short", "/sub-short", "/sub2-short"] {
                let l = listen_on(port, lw, &format!("{path}?channel={ch}"), &[]).await;
                ls.push((lw, path, l));
            }
        }
        mirrored += 4;
        for (lw, path, l) in ls {
            let r = within(Duration::from_secs(1) + PROMPT, &format!("{path} 304"), l.resp()).await;
            assert_status(&r, 304, &format!("{path} on {lw}: listener timeout"));
        }
        p.wait_listeners(&ch, 0).await;
    }
    // One mirror request per client request (none for replays).
    slow.wait_count("/mirror", mirrored).await;
    within(Duration::from_secs(5), "mirror subrequests answered", async {
        while slow.answered() < mirrored {
            sleep_ms(20).await;
        }
    })
    .await;
    sleep_ms(300).await;
    assert_eq!(slow.count("/mirror"), mirrored, "mirror requests: {:?}", slow.requests());
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_upstream_that_never_answers() {
    // The mirror upstream holds the request and then closes without an answer.
    let mute = Backend::start(Duration::from_secs(3), |_| String::new()).await;
    let mut ng = Nginx::start(Conf::new(&format!(
        "        location = /pub {{ martd_push; }}
        location = /sub {{ mirror /mirror; martd_listen; martd_listener_timeout 30s; }}
        location = /sub-short {{ mirror /mirror; martd_listen; martd_listener_timeout 1s; }}
        location = /sub2 {{ martd_listen; }}
        location = /mirror {{ internal; proxy_pass http://127.0.0.1:{}; }}
",
        mute.port
    )));
    ng.allow_log_if(|l| l.contains("upstream prematurely closed connection"));
    let port = ng.port;
    let w = ng.worker_pids();
    let mut p = Conn::open_on(port, w[1]).await;
    let mut long = Vec::new();
    for &lw in &w {
        for path in ["/sub", "/sub2"] {
            long.push((lw, path, listen_on(port, lw, &format!("{path}?channel=mute"), &[]).await));
        }
    }
    let long = all_waiting(&mut p, "mute", long).await;
    // Short ones (1 s) time out meanwhile, the others then get the message.
    let mut short = Vec::new();
    for &lw in &w {
        short.push((lw, listen_on(port, lw, "/sub-short?channel=mute", &[]).await));
    }
    for (lw, l) in short {
        let r = within(Duration::from_secs(1) + PROMPT, "304", l.resp()).await;
        assert_status(&r, 304, &format!("/sub-short on {lw}"));
    }
    p.wait_listeners("mute", 4).await;
    assert_status(&p.publish("mute", "unmirrored").await, 201, "publish");
    for (lw, path, l) in long {
        let (_, r) = promptly(l, &format!("{path} on {lw}")).await;
        expect_body(&r, "unmirrored", Some(lw), path);
    }
    within(Duration::from_secs(6), "mirror upstream closes", async {
        while mute.answered() < 4 {
            sleep_ms(20).await;
        }
    })
    .await;
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_request_on_listen_location() {
    let ng = Nginx::start(Conf::new(
        "        location = /pub { martd_push; }
        location = /sub { auth_request /auth; martd_listen; martd_listener_timeout 30s; }
        location = /sub-short { auth_request /auth; martd_listen; martd_listener_timeout 1s; }
        location = /sub-denied { auth_request /deny; martd_listen; }
        location = /auth { internal; return 204; }
        location = /deny { internal; return 403; }
",
    ));
    let r = Conn::open_probed(ng.port).await.get("/sub-denied?channel=ar", &[]).await;
    assert_status(&r, 403, "auth_request denying a listener");
    check_plain_listen_location(&ng, "/sub", "auth_request").await;
    ng.finish();
}

/// Listeners on `path` (and `path-short`, 1 s) on both workers: a message reaches them all,
/// the short ones end with 304.
async fn check_plain_listen_location(ng: &Nginx, path: &str, what: &str) {
    let port = ng.port;
    let w = ng.worker_pids();
    let mut p = Conn::open_on(port, w[0]).await;
    let ch = format!("pl{}", path.replace('/', "_"));
    let mut ls = Vec::new();
    for &lw in &w {
        for _ in 0..3 {
            ls.push((lw, listen_on(port, lw, &format!("{path}?channel={ch}"), &[]).await));
        }
    }
    p.wait_listeners(&ch, 6).await;
    let body = format!("{what} message");
    assert_status(&p.publish(&ch, body.clone()).await, 201, what);
    let mut shorts = Vec::new();
    for (lw, l) in ls {
        let (c, r) = promptly(l, &format!("{what}: listener on {lw}")).await;
        let m = expect_body(&r, &body, Some(lw), what);
        // The same connection then times out on the short location (all at once).
        let path = format!("{path}-short?channel={ch}");
        shorts.push((lw, c.spawn_get(&path, &[("if-none-match", &m.etag)], LONG)));
    }
    for (lw, l) in shorts {
        let r = within(Duration::from_secs(1) + PROMPT, &format!("{what}: 304"), l.resp()).await;
        assert_status(&r, 304, &format!("{what}: listener timeout on {lw}"));
    }
    p.wait_listeners(&ch, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_req_and_limit_conn_on_listen_location() {
    // limit_req without nodelay: later listeners are delayed by the limiter before they wait.
    let ng = Nginx::start(
        Conf::new(
            "        location = /pub { martd_push; }
        location = /sub-lr { martd_listen; limit_req zone=lr burst=50; martd_listener_timeout 30s; }
        location = /sub-lr-short { martd_listen; limit_req zone=lr burst=50; martd_listener_timeout 1s; }
        location = /sub-lc { martd_listen; limit_conn lc 50; martd_listener_timeout 30s; }
        location = /sub-lc-short { martd_listen; limit_conn lc 50; martd_listener_timeout 1s; }
",
        )
        .http(
            "limit_req_zone $binary_remote_addr zone=lr:1m rate=20r/s;
    limit_conn_zone $binary_remote_addr zone=lc:1m;",
        ),
    );
    check_plain_listen_location(&ng, "/sub-lr", "limit_req").await;
    check_plain_listen_location(&ng, "/sub-lc", "limit_conn").await;
    ng.finish();
}
