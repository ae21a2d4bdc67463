//! Channel tokens: registration by a push (`token`, `token_ttl`, `X-Martd-Token`), listeners
//! admitted only with a live token of each channel (`martd_require_token`) over every
//! transport, expiry, and the per-token listener cap across workers
//! (`martd_max_listeners_per_token`): charged once per waiting listener, not again by a
//! detached listener's replay, and given back when a listener is answered, its client goes,
//! or its worker is killed. Bad input gets `400` with the reason.

use super::*;

/// A far-future etag: the listener waits.
const WAIT: (&str, &str) = ("If-None-Match", "\"9000000000000000000\"");

fn tokens_conf() -> Conf {
    api_conf(
        "        location = /tsub { martd_listen; martd_require_token on; }
        location = /tsubs {
            martd_listen; martd_require_token on;
            martd_channel_id $arg_chs; martd_channel_id_delimiter \"|\";
        }
        location = /tjsub { martd_listen json longpoll eventsource; martd_require_token on; }
        location = /tes { martd_listen eventsource websocket; martd_require_token on; }
        location = /csub {
            martd_listen longpoll eventsource; martd_require_token on;
            martd_max_listeners_per_token 2;
        }
        location = /anchor { martd_listen eventsource; }
        location = /cjsub {
            martd_listen json; martd_require_token on; martd_max_listeners_per_token 1;
        }",
    )
}

fn published(r: &Resp, what: &str) {
    assert!(matches!(r.status, 200..=202), "{what}: {} {}", r.status, r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_admit_listeners_on_every_transport_and_expire() {
    let ng = Nginx::start(tokens_conf());
    let w = ng.worker_pids();
    let mut a = Conn::open_on(ng.port, w[0]).await;
    let mut b = Conn::open_on(ng.port, w[1]).await;
    // A push registers a token with its message; an empty push only registers one.
    published(&a.send("POST", "/pub?channel=t1&token=abc", &[], "m1").await, "push+token");
    let r = a
        .send(
            "POST",
            "/pub?channel=t1",
            &[("X-Martd-Token", "def"), ("X-Martd-Token-Ttl", "1")],
            "",
        )
        .await;
    assert_eq!(r.status, 200, "token only: {}", r.text());
    assert_eq!(a.info("t1").await.map(|i| i.messages), Some(1), "an empty push stores nothing");
    published(&a.publish("t2", "m2").await, "t2");
    // Without a live token of the channel: 403, on either worker.
    for (path, h) in [
        ("/tsub?channel=t1", None),
        ("/tsub?channel=t1&token=wrong", None),
        ("/tsub?channel=t1", Some(("X-Martd-Token", "nope"))),
        ("/tsub?channel=t2&token=abc", None),
        ("/tsub?channel=nosuch&token=abc", None),
    ] {
        for c in [&mut a, &mut b] {
            let r = c.get(path, &h.into_iter().collect::<Vec<_>>()).await;
            assert_eq!(r.status, 403, "{path} {h:?}: {}", r.text());
        }
    }
    assert_eq!(a.info("nosuch").await.map(|i| i.listeners), None, "a refusal makes no channel");
    // With one: admitted (argument or header), on both workers.
    let r = b.get("/tsub?channel=t1&token=abc", &[]).await;
    assert_eq!((r.status, r.text().as_str()), (200, "m1"));
    let r = a.get("/tsub?channel=t1", &[("X-Martd-Token", "def")]).await;
    assert_eq!((r.status, r.text().as_str()), (200, "m1"));
    // Tokens guard only the locations that require them.
    assert_eq!(b.get("/sub?channel=t1", &[]).await.status, 200);
    // A list, a JSON request and a stream need the token on every channel they name.
    assert_eq!(b.get("/tsubs?chs=t1|t2&token=abc", &[]).await.status, 403);
    let r = a.get(&format!("{}&token=abc", jsub("/tjsub", &[("t1", "0"), ("t2", "0")])), &[]).await;
    assert_eq!(r.status, 403, "{}", r.text());
    published(&a.send("POST", "/pub?channel=t2&token=abc", &[], "").await, "token on t2");
    let r = b.get("/tsubs?chs=t1|t2&token=abc", &[]).await;
    assert_eq!((r.status, r.text().as_str()), (200, "m1"));
    let r = a.get(&format!("{}&token=abc", jsub("/tjsub", &[("t1", "0"), ("t2", "0")])), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let got = parse_channels(&parse_json(&r.body, "json listen"), "json listen");
    assert_eq!(got["t1"].texts(), ["m1"]);
    assert_eq!(got["t2"].texts(), ["m2"]);
    let sse = [("Accept", "text/event-stream")];
    let r = b.get("/tes?channel=t1", &sse).await;
    assert_eq!(r.status, 403);
    let s = Streaming::open(
        Conn::open_on(ng.port, w[1]).await,
        "/tes?channel=t1&token=abc",
        &sse,
        QUICK,
    )
    .await;
    assert_eq!(s.status, 200);
    let mut ev = s.events();
    assert_eq!(ev.next(PROMPT).await.expect("the stored message").data, "m1");
    a.publish("t1", "m3").await;
    assert_eq!(ev.next(PROMPT).await.expect("a new message").data, "m3");
    // A token with a ttl expires; one without lives as long as its channel.
    sleep_ms(1_200).await;
    assert_eq!(a.get("/tsub?channel=t1", &[("X-Martd-Token", "def")]).await.status, 403);
    assert_eq!(a.get("/tsub?channel=t1&token=abc", &[]).await.status, 200);
    // Registering it again renews it.
    published(&a.send("POST", "/pub?channel=t1&token=def&token_ttl=60", &[], "").await, "renew");
    assert_eq!(b.get("/tsub?channel=t1&token=def", &[]).await.status, 200);
    // A channel with a key registers tokens only with its key.
    published(&a.send("POST", "/pub?channel=k1&key=sesame", &[], "k").await, "keyed");
    assert_eq!(a.send("POST", "/pub?channel=k1&token=t", &[], "").await.status, 403);
    assert_eq!(b.get("/tsub?channel=k1&token=t", &[]).await.status, 403);
    published(&a.send("POST", "/pub?channel=k1&key=sesame&token=t", &[], "").await, "with key");
    assert_eq!(b.get("/tsub?channel=k1&token=t", &[]).await.status, 200);
    // A channel keeps at most 64 tokens.
    for i in 0..64 {
        let r = a.send("POST", &format!("/pub?channel=many&token=t{i}"), &[], "").await;
        published(&r, "token");
    }
    let r = a.send("POST", "/pub?channel=many&token=one-more", &[], "x").await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("64 tokens"), "{}", r.text());
    assert_eq!(a.info("many").await.map(|i| i.messages), Some(0), "refused: nothing stored");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_with_a_reason() {
    let ng = Nginx::start(tokens_conf());
    let mut c = Conn::open(ng.port).await;
    published(&c.send("POST", "/pub?channel=b1&token=good", &[], "m").await, "token");
    let long = "t".repeat(257);
    for (m, path, h, why) in [
        ("POST", format!("/pub?channel=b2&token={long}"), None, "longer than 256"),
        ("POST", "/pub?channel=b2&token=a%20b".into(), None, "visible ASCII"),
        ("POST", "/pub?channel=b2&token=".into(), None, "empty token"),
        ("POST", "/pub?channel=b2&token=x&token_ttl=soon".into(), None, "invalid token_ttl"),
        ("POST", "/pub?channel=b2&token=x&token_ttl=9999999".into(), None, "out of range"),
        ("POST", "/pub?channel=b2&token_ttl=5".into(), None, "without a token"),
        ("GET", format!("/tsub?channel=b1&token={long}"), None, "longer than 256"),
        ("GET", "/tsub?channel=b1".into(), Some(("X-Martd-Token", "a\tb")), "visible ASCII"),
        ("GET", format!("{}&token=%01", jsub("/tjsub", &[("b1", "0")])), None, "visible ASCII"),
    ] {
        let headers: Vec<(&str, &str)> = h.into_iter().collect();
        let r = c.send(m, &path, &headers, "body").await;
        let reason = expect_json_error(&r, 400, &path);
        assert!(reason.contains(why), "{path}: {reason}");
    }
    assert!(c.info("b2").await.is_none(), "nothing stored");
    ng.finish();
}

/// An EventSource on channel `ch` from worker `pid` with no token: it stays through
/// deliveries, so that worker's slot keeps a listener on the channel and the zone must count
/// each token listener leaving (not just forget the slot's counts when its last one goes).
async fn anchor(ng: &Nginx, pid: u32, ch: &str) -> Events {
    let s = Streaming::open(
        Conn::open_on(ng.port, pid).await,
        &format!("/anchor?channel={ch}&last_event_id=9000000000000000000"),
        &[("Accept", "text/event-stream")],
        LONG,
    )
    .await;
    assert_eq!(s.status, 200);
    s.events()
}

/// Listens with a token on `path` from worker `pid`'s connection, and waits.
async fn waiting(ng: &Nginx, pid: u32, path: &str) -> Pending {
    Conn::open_on(ng.port, pid).await.spawn_get(path, &[WAIT], LONG)
}

/// Retries a listen until the cap admits it (the channel then counts `n` listeners; the
/// caller makes sure only this one can bring it there), bounded.
async fn admitted_within(ng: &Nginx, pid: u32, path: &str, ch: &str, n: u64) -> Pending {
    let mut probe = Conn::open_on(ng.port, pid).await;
    let until = Instant::now() + PROMPT;
    loop {
        let p = waiting(ng, pid, path).await;
        let deadline = Instant::now() + PROMPT;
        while !p.is_finished() {
            if probe.info(ch).await.is_some_and(|i| i.listeners == n) {
                return p;
            }
            assert!(Instant::now() < deadline, "{path}: neither admitted nor refused");
            sleep_ms(20).await;
        }
        let r = p.resp().await;
        assert_eq!(r.status, 409, "{path}: {}", r.text());
        assert!(Instant::now() < until, "{path}: still over the cap after {PROMPT:?}");
        sleep_ms(50).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_cap_per_token_holds_across_workers() {
    let mut ng = Nginx::start(tokens_conf());
    ng.allow_log("exited on signal 9");
    let w = ng.worker_pids();
    let mut a = Conn::open_on(ng.port, w[0]).await;
    let mut b = Conn::open_on(ng.port, w[1]).await;
    for t in ["k", "other"] {
        published(&a.send("POST", &format!("/pub?channel=c1&token={t}"), &[], "").await, t);
    }
    let path = "/csub?channel=c1&token=k";
    let _anchors = (anchor(&ng, w[0], "c1").await, anchor(&ng, w[1], "c1").await);
    a.wait_listeners("c1", 2).await;
    // Two listeners with one token, one on each worker: a third is over the cap, anywhere.
    let l0 = waiting(&ng, w[0], path).await;
    let l1 = waiting(&ng, w[1], path).await;
    a.wait_listeners("c1", 4).await;
    for c in [&mut a, &mut b] {
        let r = c.get(path, &[WAIT]).await;
        let reason = expect_json_error(&r, 409, "third listener");
        assert!(reason.contains("too many listeners on this token"), "{reason}");
        let r = c.get(path, &[("Accept", "text/event-stream")]).await;
        assert_eq!(r.status, 409, "a stream counts the same");
    }
    // Another token has its own count.
    let other = waiting(&ng, w[1], "/csub?channel=c1&token=other").await;
    a.wait_listeners("c1", 5).await;
    // Answered, each listens again at once on its connection: a detached listener's replay
    // did not charge the token again, and the answer gave it back.
    a.publish("c1", "one").await;
    let mut again = Vec::new();
    for l in [l0, l1] {
        let (conn, r) = l.conn_resp().await;
        assert_eq!((r.status, r.text().as_str()), (200, "one"));
        again.push(conn.spawn_get(path, &[WAIT], LONG));
    }
    let r = other.resp().await;
    assert_eq!(r.status, 200);
    a.wait_listeners("c1", 4).await;
    assert_eq!(a.get(path, &[WAIT]).await.status, 409, "the cap holds again");
    // A client that goes gives its place back.
    drop(again.pop());
    a.wait_listeners("c1", 3).await;
    let back = admitted_within(&ng, w[1], path, "c1", 4).await;
    // A stream with a token is charged until it ends.
    drop(again);
    drop(back);
    a.wait_listeners("c1", 2).await;
    let sse = [("Accept", "text/event-stream")];
    let s = Streaming::open(Conn::open_on(ng.port, w[0]).await, path, &sse, LONG).await;
    assert_eq!(s.status, 200);
    let k = waiting(&ng, w[0], path).await;
    a.wait_listeners("c1", 4).await;
    assert_eq!(b.get(path, &[WAIT]).await.status, 409);
    drop(s);
    a.wait_listeners("c1", 3).await;
    let back = admitted_within(&ng, w[1], path, "c1", 4).await;
    drop((k, back));
    a.wait_listeners("c1", 2).await;
    // A worker killed with its listeners: their charges go with it.
    let k0 = waiting(&ng, w[1], path).await;
    let k1 = waiting(&ng, w[1], path).await;
    a.wait_listeners("c1", 4).await;
    ng.kill_worker(w[1], libc::SIGKILL);
    let w2 = ng.wait_respawn(w[1]);
    drop((k0, k1));
    let fresh = w2.iter().copied().find(|p| *p != w[0]).unwrap_or(w2[0]);
    // Left: the anchor on the worker that lives.
    let l2 = admitted_within(&ng, fresh, path, "c1", 2).await;
    let l3 = admitted_within(&ng, w[0], path, "c1", 3).await;
    let mut a = Conn::open_on(ng.port, w[0]).await;
    assert_eq!(a.get(path, &[WAIT]).await.status, 409);
    a.publish("c1", "two").await;
    for l in [l2, l3] {
        assert_eq!(l.resp().await.text(), "two");
    }
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_listener_is_charged_once_per_request() {
    let ng = Nginx::start(tokens_conf());
    let w = ng.worker_pids();
    let mut a = Conn::open_on(ng.port, w[0]).await;
    for ch in ["j1", "j2"] {
        published(&a.send("POST", &format!("/pub?channel={ch}&token=jt"), &[], "").await, ch);
    }
    let _anchors = (anchor(&ng, w[1], "j1").await, anchor(&ng, w[1], "j2").await);
    let q = |c: &str| format!("/cjsub?cid={c}&j1=0&j2=0&token=jt");
    let l = Conn::open_on(ng.port, w[1]).await.spawn_get(&q("x"), &[], LONG);
    a.wait_listeners("j1", 2).await;
    let r = a.get(&q("y"), &[]).await;
    assert_eq!(r.status, 409, "{}", r.text());
    a.wait_listeners("j2", 2).await;
    a.publish("j2", "hi").await;
    let (conn, r) = l.conn_resp().await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Its next request (the same connection, as a client loops) is admitted.
    let next_path = format!("/cjsub?cid=x&j1=0&j2={}&token=jt", u64::MAX / 2);
    let next = conn.spawn_get(&next_path, &[], LONG);
    a.wait_listeners("j1", 2).await;
    assert_eq!(a.get(&q("z"), &[]).await.status, 409);
    a.publish("j1", "again").await;
    assert_eq!(next.resp().await.status, 200);
    ng.finish();
}
