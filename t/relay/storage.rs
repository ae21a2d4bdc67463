//! Storage rules: buffer length, message timeout, store off, channel ids, channel timeout.

use super::*;

// 8. storage rules

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffer_length_honoured() {
    // Taken from the publishing location; the listener location's value does not matter.
    let ng = Nginx::start(Conf::new(&pubsub(
        "martd_message_buffer_length 3;",
        "martd_message_buffer_length 100;",
    )));
    let (mut a, mut b) = Conn::pair(ng.port).await;
    for i in 1..=5 {
        let c = if i % 2 == 0 { &mut a } else { &mut b };
        c.publish("bl", format!("m{i}")).await;
    }
    let i = a.info("bl").await.unwrap();
    assert_eq!(i.messages, 3, "{i:?}");
    let mut got = Vec::new();
    let mut etag = None;
    for _ in 0..3 {
        let m = fetch(&mut b, &sub_path("bl"), etag.as_deref(), None).await;
        got.push(m.text());
        etag = Some(m.etag);
    }
    assert_eq!(got, ["m3", "m4", "m5"]);
    // Nothing more: the next request waits until m6.
    let l = Conn::open_on(ng.port, a.worker()).await.listen("bl", etag.as_deref(), None);
    b.wait_listeners("bl", 1).await;
    assert_published(&b.publish("bl", "m6").await, 201, "publish");
    assert_eq!(expect_msg(&l.resp().await).text(), "m6");
    assert_eq!(a.info("bl").await.unwrap().messages, 3);
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffer_length_zero_keeps_none() {
    let ng = Nginx::start(Conf::new(&pubsub("martd_message_buffer_length 0;", "")));
    let (mut a, b) = Conn::pair(ng.port).await;
    assert_published(&a.publish("b0", "lost").await, 202, "publish");
    assert_eq!(a.info("b0").await.unwrap().messages, 0);
    let l = b.listen("b0", None, None);
    a.wait_listeners("b0", 1).await;
    assert!(!l.is_finished(), "nothing is stored, the listener must wait");
    assert_published(&a.publish("b0", "live").await, 201, "publish");
    assert_eq!(expect_msg(&l.resp().await).text(), "live");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_timeout_honoured() {
    let ng = Nginx::start(Conf::new(&pubsub("martd_message_timeout 1s;", "")));
    let (mut a, mut b) = Conn::pair(ng.port).await;
    a.publish("mt", "short-lived").await;
    assert_eq!(fetch(&mut b, &sub_path("mt"), None, None).await.text(), "short-lived");
    // Gone after its timeout (polled, bounded).
    let i = a
        .wait_info("mt", "0 messages after the message timeout", |i| {
            i.is_some_and(|i| i.messages == 0)
        })
        .await;
    assert!(i.is_some());
    // Not delivered any more: a listener without ids waits, and gets the next one.
    let l = b.listen("mt", None, None);
    a.wait_listeners("mt", 1).await;
    assert!(!l.is_finished(), "an expired message was delivered");
    assert_published(&a.publish("mt", "fresh").await, 201, "publish");
    assert_eq!(expect_msg(&l.resp().await).text(), "fresh");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_messages_off() {
    let ng = Nginx::start(Conf::new(&pubsub("martd_store_messages off;", "")));
    let (mut a, b) = Conn::pair(ng.port).await;
    assert_published(&a.publish("so", "nobody").await, 202, "publish with no listener");
    assert_eq!(a.info("so").await.unwrap().messages, 0);
    // A later listener does not get it...
    let l = b.listen("so", None, None);
    a.wait_listeners("so", 1).await;
    assert!(!l.is_finished(), "an unstored message was delivered");
    // ...a waiting one gets the next, on another worker.
    let i = assert_published(&a.publish("so", "live").await, 201, "publish");
    assert_eq!(i.messages, 0, "{i:?}");
    let (b, r) = l.conn_resp().await;
    assert_eq!(expect_msg(&r).text(), "live");
    let etag = r.header("etag").unwrap().to_string();
    // and a listener following that id waits again (nothing stored after it).
    let l = b.listen("so", Some(&etag), None);
    a.wait_listeners("so", 1).await;
    assert!(!l.is_finished());
    drop(l);
    a.wait_listeners("so", 0).await;
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_messages_off_reaches_listeners_on_both_workers() {
    let ng = Nginx::start(Conf::new(&pubsub("martd_store_messages off;", "")));
    let (mut a, b) = Conn::pair(ng.port).await;
    let (wa, wb) = (a.worker(), b.worker());
    drop(b);
    let mut etags: Vec<Option<String>> = vec![None; 4];
    for round in 0..5 {
        let mut ls = Vec::new();
        for (k, w) in [wa, wa, wb, wb].into_iter().enumerate() {
            let l = Conn::open_on(ng.port, w).await.listen("sb", etags[k].as_deref(), None);
            ls.push((w, l));
        }
        a.wait_listeners("sb", 4).await;
        let body = format!("transient {round}");
        let i = assert_published(&a.publish("sb", body.clone()).await, 201, "publish");
        assert_eq!(i.messages, 0, "{i:?}");
        for (k, (w, l)) in ls.into_iter().enumerate() {
            let r = l.resp().await;
            assert_eq!(r.worker(), w);
            let m = expect_msg(&r);
            assert_eq!(m.text(), body, "listener {k} on worker {w}");
            etags[k] = Some(m.etag);
        }
        a.wait_listeners("sb", 0).await;
    }
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_workers_every_pair_delivers() {
    let ng = Nginx::start(std_conf().workers(4));
    let w = ng.worker_pids();
    assert_eq!(w.len(), 4);
    let mut pubs = HashMap::new();
    for &pw in &w {
        pubs.insert(pw, Conn::open_on(ng.port, pw).await);
    }
    let mut etag: Option<String> = None;
    for &pw in &w {
        // Every other worker has a listener; one publish reaches them all.
        let mut ls = Vec::new();
        for &lw in w.iter().filter(|&&x| x != pw) {
            ls.push((lw, Conn::open_on(ng.port, lw).await.listen("q", etag.as_deref(), None)));
        }
        let p = pubs.get_mut(&pw).unwrap();
        p.wait_listeners("q", 3).await;
        let body = format!("from {pw}");
        assert_published(&p.publish("q", body.clone()).await, 201, "publish");
        for (lw, l) in ls {
            let r = l.resp().await;
            assert_eq!(r.worker(), lw);
            let m = expect_msg(&r);
            assert_eq!(m.text(), body);
            etag = Some(m.etag);
        }
        p.wait_listeners("q", 0).await;
    }
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_id_variable_and_inheritance() {
    let server = r"
        martd_message_buffer_length 2;
        location ~ ^/p/(\w+)$ { martd_push; martd_channel_id $1; }
        location ~ ^/s/(\w+)$ { martd_listen; martd_channel_id $1; }
        location = /pub { martd_push; martd_message_buffer_length 5; }
        location = /sub { martd_listen; martd_listener_timeout 30s; }
";
    let ng = Nginx::start(Conf::new(server).http("martd_listener_timeout 1s;"));
    let mut c = Conn::open_probed(ng.port).await;
    for i in 1..=3 {
        let r = c.send("POST", "/p/foo", &[], format!("f{i}")).await;
        assert_status(&r, 202, "publish via $1");
    }
    // Server-level buffer length inherited by /p/.
    assert_eq!(c.info("foo").await.unwrap().messages, 2);
    let m = fetch(&mut c, "/s/foo", None, None).await;
    assert_eq!(m.text(), "f2");
    let m = fetch(&mut c, &sub_path("foo"), Some(&m.etag), None).await;
    assert_eq!(m.text(), "f3");
    // http-level listener timeout inherited by /s/.
    let r = c.get_long("/s/foo", &[("if-none-match", &m.etag)], LONG).await;
    assert_status(&r, 304, "inherited listener timeout");
    // Location-level value overrides the server one.
    for i in 1..=6 {
        c.publish("bar", format!("b{i}")).await;
    }
    assert_eq!(c.info("bar").await.unwrap().messages, 5);
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_timeout_removes_idle_channel() {
    let ng = Nginx::start(Conf::new(&format!(
        "        martd_channel_timeout 1s;\n{}",
        pubsub("", "martd_listener_timeout 1s;")
    )));
    let (mut a, b) = Conn::pair(ng.port).await;
    a.publish("kept", "stored").await;
    // A listener creates "idle"; when it times out the channel has nothing left.
    let l = b.listen("idle", None, None);
    a.wait_listeners("idle", 1).await;
    assert_status(&l.resp().await, 304, "listener timeout");
    // Poll less often than the channel timeout, in case reading the info counts as activity.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if a.info("idle").await.is_none() {
            break;
        }
        assert!(Instant::now() < deadline, "idle channel not removed");
        sleep_ms(1500).await;
    }
    let i = a.info("kept").await;
    assert!(i.is_some_and(|i| i.messages == 1), "a channel with a stored message was removed");
    ng.finish();
}

/// Channels that only listeners made (never published to) go soon after their last listener,
/// whatever `martd_channel_timeout` says, so a flood of listeners on made-up names cannot hold
/// the zone; a published channel stays for its channel timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_only_channels_freed_after_their_last_listener() {
    let ng = Nginx::start(Conf::new(&format!(
        "        martd_channel_timeout 1h;\n{}",
        pubsub("", "martd_listener_timeout 1s;")
    )));
    let (mut a, b) = Conn::pair(ng.port).await;
    let names: Vec<String> = (0..50).map(|i| format!("made-up-{i}")).collect();
    let mut waiting = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let c = if i % 2 == 0 {
            Conn::open_on(ng.port, a.worker()).await
        } else {
            Conn::open_on(ng.port, b.worker()).await
        };
        waiting.push(c.listen(n, None, None));
    }
    a.wait_listeners(&names[49], 1).await;
    a.publish("published", "kept").await;
    for l in waiting {
        assert_status(&l.resp().await, 304, "listener timeout");
    }
    // Gone within a few housekeeping passes (each at most a second apart), not after 1 h.
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in &names {
        while a.info(n).await.is_some() {
            assert!(Instant::now() < deadline, "listener-only channel {n} not freed");
            sleep_ms(200).await;
        }
    }
    assert!(a.info("published").await.is_some(), "a published channel was removed");
    ng.finish();
}
