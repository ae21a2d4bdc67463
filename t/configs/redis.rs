//! `martd_redis_url`: two nginx nodes share channels through a real redis-server: a publish on
//! either reaches listeners on both, ids are the same everywhere (a listener resumes on the
//! other node with its `Etag`), 1,000 publishes alternating between the nodes keep their
//! order, Redis killed and started again (append-only file, `appendfsync always`) loses no
//! acknowledged message while publishes in between get `503`, and an unreachable Redis at
//! start leaves nginx running with publishes answered `503`.

use super::*;
use harness::redis::Redis;

fn node_conf(url: &str) -> Conf {
    Conf::new(
        "        location = /pub { martd_push; }
        location = /sub { martd_listen; }",
    )
    .http(&format!("martd_redis_url {url}; martd_redis_namespace t;"))
}

fn etag(r: &Resp) -> String {
    r.header("etag").expect("an Etag").to_string()
}

/// Publishes until Redis takes it (the node's thread connects at start), bounded.
async fn publish_ok(c: &mut Conn, ch: &str, body: &str) -> Resp {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r =
            c.send("POST", &format!("/pub?channel={ch}&size=1000"), &[], body.to_string()).await;
        if r.status == 201 || r.status == 202 {
            return r;
        }
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(Instant::now() < deadline, "redis never took a publish: {}", r.text());
        sleep_ms(50).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_channels_in_order() {
    let redis = Redis::start();
    let a = Nginx::start(node_conf(&redis.url()));
    let b = Nginx::start(node_conf(&redis.url()));
    let mut ca = Conn::open(a.port).await;
    let mut cb = Conn::open(b.port).await;
    publish_ok(&mut ca, "warm", "x").await;
    publish_ok(&mut cb, "warm", "y").await;
    // A listener on node b gets what node a publishes.
    let l = Conn::open(b.port).await.spawn_get(
        "/sub?channel=room",
        &[("If-None-Match", "\"9000000000000000000\"")],
        LONG,
    );
    cb.wait_listeners("room", 1).await;
    publish_ok(&mut ca, "room", "hello").await;
    let r = l.resp().await;
    assert_eq!((r.status, r.text().as_str()), (200, "hello"));
    let first = etag(&r);
    // The same id on node a; a listener resumes on the other node.
    let r = ca.get("/sub?channel=room", &[]).await;
    assert_eq!((r.text().as_str(), etag(&r)), ("hello", first.clone()));
    publish_ok(&mut cb, "room", "second").await;
    let r = ca.get("/sub?channel=room", &[("If-None-Match", &first)]).await;
    assert_eq!(r.text(), "second");
    // 1,000 publishes alternating between the nodes: one order on both.
    for i in 0..1000 {
        let c = if i % 2 == 0 { &mut ca } else { &mut cb };
        publish_ok(c, "order", &format!("{i}")).await;
    }
    for c in [&mut ca, &mut cb] {
        let mut e = String::from("\"0\"");
        for i in 0..1000 {
            let r = c.get("/sub?channel=order", &[("If-None-Match", &e)]).await;
            assert_eq!(r.text(), format!("{i}"));
            e = etag(&r);
        }
    }
    a.finish();
    b.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_started_again_loses_nothing_acknowledged() {
    let mut redis = Redis::start();
    let mut a = Nginx::start(node_conf(&redis.url()));
    let mut b = Nginx::start(node_conf(&redis.url()));
    for ng in [&mut a, &mut b] {
        ng.allow_log("martd_redis_url");
    }
    let mut ca = Conn::open(a.port).await;
    for i in 0..20 {
        publish_ok(&mut ca, "k", &format!("m{i}")).await;
    }
    // A listener waits on node b through the outage (once b has the 20).
    let mut cb = Conn::open(b.port).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while cb.info("k").await.map(|i| i.messages) != Some(20) {
        assert!(Instant::now() < deadline, "node b did not get the 20");
        sleep_ms(20).await;
    }
    let l = Conn::open(b.port).await.spawn_get(
        "/sub?channel=k",
        &[("If-None-Match", "\"9000000000000000000\"")],
        LONG,
    );
    redis.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = ca.send("POST", "/pub?channel=k", &[], "lost?").await;
        if r.status == 503 {
            assert!(r.text().contains("cannot be reached"), "{}", r.text());
            break;
        }
        assert!(Instant::now() < deadline, "still {} with redis down", r.status);
        sleep_ms(50).await;
    }
    redis.start_again();
    publish_ok(&mut ca, "k", "after").await;
    let r = l.resp().await;
    assert_eq!(r.text(), "after");
    // Node b restarted: it reads back everything from Redis (20 acknowledged, and "after").
    b.restart();
    let mut cb = Conn::open(b.port).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while cb.info("k").await.map(|i| i.messages) != Some(21) {
        assert!(Instant::now() < deadline, "node b did not load the channel");
        sleep_ms(50).await;
    }
    a.finish();
    b.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_at_start_leaves_nginx_running() {
    let mut ng = Nginx::start(node_conf("redis://127.0.0.1:1"));
    ng.allow_log("martd_redis_url");
    let mut c = Conn::open(ng.port).await;
    let r = c.publish("x", "m").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("cannot be reached"), "{}", r.text());
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_events_of_messages_from_another_node_wake_their_listeners() {
    let redis = Redis::start();
    let a = Nginx::start(node_conf(&redis.url()));
    let b = Nginx::start(
        Conf::new(
            "        location = /pub { martd_push; }
        location = /ev { martd_listen eventsource; }",
        )
        .http(&format!(
            "martd_redis_url {}; martd_redis_namespace t; martd_channel_events_channel ev;",
            redis.url()
        )),
    );
    let mut ca = Conn::open(a.port).await;
    let mut cb = Conn::open(b.port).await;
    publish_ok(&mut cb, "warm", "x").await;
    let s = Streaming::open(
        Conn::open(b.port).await,
        "/ev?channel=ev&last_event_id=9000000000000000000",
        &[("Accept", "text/event-stream")],
        LONG,
    )
    .await;
    assert_eq!(s.status, 200);
    let mut events = s.events();
    cb.wait_listeners("ev", 1).await;
    // Node b's Redis thread makes the channel: its event reaches the listener at once.
    publish_ok(&mut ca, "fresh", "m").await;
    let e = events.next(Duration::from_secs(3)).await.expect("an event");
    assert_eq!(e.event, "channel_created");
    assert!(e.data.contains("\"fresh\""), "{}", e.data);
    a.finish();
    b.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_carries_channels_between_nodes_and_checks_the_certificate() {
    let redis = Redis::start_tls();
    let ca = redis.tls_ca.clone().expect("a CA");
    let conf = || {
        node_conf(&redis.url()).http(&format!(
            "martd_redis_url {}; martd_redis_namespace t; martd_redis_trusted_certificate {};",
            redis.url(),
            ca.display()
        ))
    };
    let a = Nginx::start(conf());
    let b = Nginx::start(conf());
    let mut ca_conn = Conn::open(a.port).await;
    publish_ok(&mut ca_conn, "warm", "x").await;
    let l = Conn::open(b.port).await.spawn_get(
        "/sub?channel=tls",
        &[("If-None-Match", "\"9000000000000000000\"")],
        LONG,
    );
    let mut cb = Conn::open(b.port).await;
    cb.wait_listeners("tls", 1).await;
    publish_ok(&mut ca_conn, "tls", "over tls").await;
    let r = l.resp().await;
    assert_eq!((r.status, r.text().as_str()), (200, "over tls"));
    a.finish();
    b.finish();
    // Without the CA, the server's certificate is not trusted: nothing is published.
    let mut c = Nginx::start(node_conf(&redis.url()));
    c.allow_log("martd_redis_url");
    let mut cc = Conn::open(c.port).await;
    let r = cc.publish("x", "m").await;
    assert_eq!(r.status, 503, "{}", r.text());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !c.log().contains("unavailable") {
        assert!(Instant::now() < deadline, "no log line:\n{}", c.log_tail(10));
        sleep_ms(50).await;
    }
    assert!(
        c.log().contains("certificate") || c.log().contains("Certificate"),
        "{}",
        c.log_tail(5)
    );
    c.finish();
}

#[test]
fn bad_redis_directives_are_configuration_errors() {
    let base = |http: &str| Conf::new("        location = /pub { martd_push; }").http(http);
    let e = expect_config_error(&base("martd_redis_url http://x;"));
    assert!(e.stderr.contains("not a redis:// or rediss:// url"), "{}", e.stderr);
    let e = expect_config_error(&base(
        "martd_redis_url rediss://x:1; martd_redis_trusted_certificate /nonexistent.pem;",
    ));
    assert!(e.stderr.contains("cannot read \"/nonexistent.pem\""), "{}", e.stderr);
    let e = expect_config_error(&base("martd_redis_url redis://x:1; martd_redis_wait many;"));
    assert!(e.stderr.contains("invalid number of replicas \"many\""), "{}", e.stderr);
    let e = expect_config_error(&base("martd_redis_url redis://x:1; martd_redis_wait 1 soon;"));
    assert!(e.stderr.contains("invalid timeout \"soon\""), "{}", e.stderr);
    expect_config_ok(&base(
        "martd_redis_url redis://127.0.0.1:1 redis://127.0.0.1:2; martd_redis_cluster on; \
         martd_redis_wait 1 500ms;",
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_and_channel_attributes_reach_every_node() {
    let redis = Redis::start();
    let a = Nginx::start(node_conf(&redis.url()));
    let b = Nginx::start(node_conf(&redis.url()));
    let mut ca = Conn::open(a.port).await;
    let mut cb = Conn::open(b.port).await;
    for i in 0..3 {
        publish_ok(&mut ca, "gone", &format!("old{i}")).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while cb.info("gone").await.map(|i| i.messages) != Some(3) {
        assert!(Instant::now() < deadline, "node b did not get the 3");
        sleep_ms(20).await;
    }
    // A listener waiting on node b is told the channel is gone.
    let l = Conn::open(b.port).await.spawn_get(
        "/sub?channel=gone",
        &[("If-None-Match", "\"9000000000000000000\"")],
        LONG,
    );
    cb.wait_listeners("gone", 1).await;
    let r = ca.send("DELETE", "/pub?channel=gone", &[], "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(l.resp().await.status, 410);
    let deadline = Instant::now() + Duration::from_secs(10);
    while cb.info("gone").await.is_some() {
        assert!(Instant::now() < deadline, "node b kept the channel");
        sleep_ms(20).await;
    }
    assert!(ca.info("gone").await.is_none());
    // Published again: only the new message, on both nodes, with a larger id.
    publish_ok(&mut cb, "gone", "new").await;
    for c in [&mut ca, &mut cb] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.info("gone").await.map(|i| i.messages) != Some(1) {
            assert!(Instant::now() < deadline, "old messages came back, or the new one is missing");
            sleep_ms(20).await;
        }
        let r = c.get("/sub?channel=gone", &[("If-None-Match", "\"0\"")]).await;
        assert_eq!(r.text(), "new");
    }
    // A key set through node a holds on node b (the nodes share the hash salt), for
    // publishes and deletes; tokens are not shared: refused.
    let r = ca.send("POST", "/pub?channel=locked&key=k1", &[], "m").await;
    assert!(r.status == 201 || r.status == 202, "{}", r.text());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = cb.send("POST", "/pub?channel=locked", &[], "no key").await;
        if r.status == 403 {
            break;
        }
        assert!(Instant::now() < deadline, "node b never had the key: {}", r.status);
        sleep_ms(20).await;
    }
    assert_eq!(cb.send("DELETE", "/pub?channel=locked", &[], "").await.status, 403);
    let r = cb.send("POST", "/pub?channel=locked&key=k1", &[], "with key").await;
    assert!(r.status == 201 || r.status == 202, "{}", r.text());
    // An attribute-only push on node b (a buffer of 1) reaches node a: what a publishes
    // next is kept alone, on both nodes.
    let r = cb.send("POST", "/pub?channel=locked&key=k1&size=1", &[], "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = ca.send("POST", "/pub?channel=locked&key=k1", &[], "alone").await;
        assert!(r.status == 201 || r.status == 202, "{}", r.text());
        let (ia, ib) = (ca.info("locked").await, cb.info("locked").await);
        if ia.map(|i| i.messages) == Some(1) && ib.map(|i| i.messages) == Some(1) {
            break;
        }
        assert!(Instant::now() < deadline, "the size did not reach node a");
        sleep_ms(50).await;
    }
    let r = ca.send("POST", "/pub?channel=locked&token=t1&key=k1", &[], "m").await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("not shared between nodes"), "{}", r.text());
    // A node that starts later gets the key from Redis.
    let late = Nginx::start(node_conf(&redis.url()));
    let mut cl = Conn::open(late.port).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = cl.send("POST", "/pub?channel=locked", &[], "no key").await;
        if r.status == 403 {
            break;
        }
        assert_eq!(r.status, 503, "the late node published without the key: {}", r.text());
        assert!(Instant::now() < deadline, "the late node never connected");
        sleep_ms(50).await;
    }
    late.finish();
    assert_eq!(ca.send("DELETE", "/pub?channel=nothing", &[], "").await.status, 404);
    a.finish();
    b.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn martd_redis_wait_without_enough_replicas_answers_503() {
    // A standalone server has no replica: WAIT 1 never counts one.
    let redis = Redis::start();
    let ng = Nginx::start(node_conf(&redis.url()).http(&format!(
        "martd_redis_url {}; martd_redis_namespace t; martd_redis_wait 1 100ms;",
        redis.url()
    )));
    let mut c = Conn::open(ng.port).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = c.send("POST", "/pub?channel=w", &[], "m").await;
        assert_eq!(r.status, 503, "{}", r.text());
        if r.text().contains("did not confirm the message on enough replicas") {
            break;
        }
        assert!(r.text().contains("cannot be reached"), "{}", r.text());
        assert!(Instant::now() < deadline, "never connected");
        sleep_ms(50).await;
    }
    ng.finish();
}
