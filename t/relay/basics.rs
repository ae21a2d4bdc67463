//! Publish and listen basics, delivery across workers, channel info and delete, the listener
//! timeout and ordering.

use super::*;

// 0. harness

/// The harness itself (start, probe workers, reload, kill, respawn, restart), without the module.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_self_test_without_module() {
    let mut ng = Nginx::start(Conf::new("location = /x { return 200 ok; }").without_module());
    ng.allow_log("exited on signal 9");
    let w = ng.worker_pids();
    assert_eq!(w.len(), 2);
    let (mut a, mut b) = Conn::pair(ng.port).await;
    assert_ne!(a.worker(), b.worker());
    let r = a.get("/x", &[]).await;
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    assert_eq!(r.worker(), a.worker());
    assert_eq!(b.get("/x", &[]).await.worker(), b.worker());
    ng.reload();
    let w2 = ng.worker_pids();
    assert!(w2.iter().all(|p| !w.contains(p)), "{w:?} {w2:?}");
    ng.kill_worker(w2[0], libc::SIGKILL);
    let w3 = ng.wait_respawn(w2[0]);
    assert!(w3.contains(&w2[1]));
    let mut c = Conn::open_on(ng.port, w3[0]).await;
    assert_eq!(c.get("/x", &[]).await.status, 200);
    ng.restart();
    let mut c = Conn::open_probed(ng.port).await;
    assert_eq!(c.get("/x", &[]).await.status, 200);
    ng.finish();
}

// 1. publish / listen basics

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_then_listen_gets_oldest_with_headers() {
    let ng = Nginx::start(std_conf());
    let mut c = Conn::open_probed(ng.port).await;

    let r = c.send("POST", &pub_path("a"), &[("content-type", "text/x-one")], "hello").await;
    let i1 = assert_published(&r, 202, "publish with no listener");
    assert_eq!(r.worker(), c.worker(), "X-Worker on a martd response");
    assert_eq!((i1.messages, i1.listeners), (1, 0), "{i1:?}");
    let id1 = i1.last_id.expect("last message id after a publish");

    let r = c.send("POST", &pub_path("a"), &[("content-type", "text/x-two")], "world").await;
    let i2 = assert_published(&r, 202, "second publish");
    assert_eq!(i2.messages, 2);
    let id2 = i2.last_id.unwrap();
    assert!(id2 > id1, "ids not increasing: {id1} {id2}");

    // No ids: the oldest, at once, with every header of the README.
    let m1 = fetch(&mut c, &sub_path("a"), None, None).await;
    assert_eq!(m1.text(), "hello");
    assert_eq!(m1.content_type.as_deref(), Some("text/x-one"));
    assert_eq!(m1.id, id1, "Etag is the message id of the channel info");
    let lm = parse_http_date(&m1.lm).unwrap();
    assert!((lm - now_secs()).abs() < 3600, "Last-Modified far from now: {}", m1.lm);

    let m2 = fetch(&mut c, &sub_path("a"), Some(&m1.etag), Some(&m1.lm)).await;
    assert_eq!((m2.text().as_str(), m2.id), ("world", id2));
    assert_eq!(m2.content_type.as_deref(), Some("text/x-two"));
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_listener_then_publish_is_201() {
    let ng = Nginx::start(std_conf());
    let mut p = Conn::open_probed(ng.port).await;
    let l = Conn::open_probed(ng.port).await.listen("w", None, None);
    let i = p.wait_listeners("w", 1).await;
    assert!(!l.is_finished(), "a listener on an empty channel must wait");
    assert_eq!((i.messages, i.last_id), (0, None), "nothing published yet: {i:?}");
    assert!(i.requested >= 0, "a listener asked: {i:?}");
    let r = p.get(&pub_path("w"), &[("accept", "application/json")]).await;
    let j = parse_info_json(&r.text());
    assert_eq!((j.messages, j.listeners, j.last_id), (0, 1, None), "{}", r.text());
    assert!(r.text().contains("\"last_message_id\":\"\""), "{}", r.text());

    let r = p.publish("w", "ping").await;
    let i = assert_published(&r, 201, "publish with a waiting listener");
    assert_eq!(i.messages, 1);
    let m = expect_msg(&l.resp().await);
    assert_eq!(m.text(), "ping");
    assert_eq!(Some(m.id), i.last_id);

    p.wait_listeners("w", 0).await;
    let r = p.publish("w", "pong").await;
    assert_published(&r, 202, "publish after the listener left");
    ng.finish();
}

// 2. across workers

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_worker_delivery_both_directions() {
    let ng = Nginx::start(std_conf());
    let (mut a, mut b) = Conn::pair(ng.port).await;
    let (wa, wb) = (a.worker(), b.worker());
    let mut etag: Option<String> = None;
    // Alternate directions many times: each delivery needs the other worker's pipe signalled
    // again, so a wake-up flag never reset shows up here.
    for round in 0..20 {
        let (lw, pw) = if round % 2 == 0 { (wa, wb) } else { (wb, wa) };
        let l = Conn::open_on(ng.port, lw).await.listen("x", etag.as_deref(), None);
        let pc = if pw == wa { &mut a } else { &mut b };
        pc.wait_listeners("x", 1).await;
        let body = format!("round {round}");
        let r = pc.publish("x", body.clone()).await;
        assert_published(&r, 201, "cross-worker publish");
        assert_eq!(r.worker(), pw);
        let resp = l.resp().await;
        let m = expect_msg(&resp);
        assert_eq!(resp.worker(), lw);
        assert_ne!(resp.worker(), r.worker(), "listener and publisher on the same worker");
        assert_eq!(m.text(), body);
        etag = Some(m.etag);
    }
    ng.finish();
}

// 4. channel info, delete, methods

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_info_text_and_json_across_workers() {
    let ng = Nginx::start(std_conf());
    let (mut a, mut b) = Conn::pair(ng.port).await;
    assert!(a.info("nope").await.is_none(), "unknown channel must be 404");
    let r = a.get(&pub_path("nope"), &[("accept", "application/json")]).await;
    assert_status(&r, 404, "JSON info of an unknown channel");

    let id1 = a.publish_id(&pub_path("n"), "x1").await;
    let r = b.publish("n", "x2").await;
    let i = assert_published(&r, 202, "second publish");
    assert_eq!((i.messages, i.requested, i.listeners), (2, -1, 0), "no listener ever asked: {i:?}");
    let id2 = i.last_id.unwrap();
    assert!(id2 > id1);

    let m1 = fetch(&mut a, &sub_path("n"), None, None).await;
    assert_eq!(m1.text(), "x1");
    let m2 = fetch(&mut b, &sub_path("n"), Some(&m1.etag), None).await;
    assert_eq!(m2.id, id2);

    let la = Conn::open_on(ng.port, a.worker()).await.listen("n", Some(&m2.etag), None);
    let lb = Conn::open_on(ng.port, b.worker()).await.listen("n", Some(&m2.etag), None);
    let i = a.wait_listeners("n", 2).await;
    assert_eq!(i.messages, 2);
    assert_eq!(i.last_id, Some(id2));
    assert!((0..=60).contains(&i.requested), "last requested: {i:?}");

    for (conn, accept) in
        [(&mut a, "application/json"), (&mut b, "text/html, application/json;q=0.9")]
    {
        let r = conn.get(&pub_path("n"), &[("accept", accept)]).await;
        assert_status(&r, 200, "JSON info");
        assert!(
            r.header("content-type").is_some_and(|t| t.starts_with("application/json")),
            "JSON info content type: {:?}",
            r.headers
        );
        let j = parse_info_json(&r.text());
        assert_eq!((j.messages, j.listeners, j.last_id), (2, 2, Some(id2)), "{j:?}");
        assert!((0..=60).contains(&j.requested), "{j:?}");
    }
    let r = b.get(&pub_path("n"), &[("accept", "text/plain")]).await;
    assert!(r.header("content-type").is_some_and(|t| t.starts_with("text/plain")));
    assert_eq!(parse_info_text(&r.text()).listeners, 2);

    let r = a.publish("n", "x3").await;
    assert_published(&r, 201, "publish to two workers");
    for l in [la, lb] {
        assert_eq!(expect_msg(&l.resp().await).text(), "x3");
    }
    let i = b.wait_listeners("n", 0).await;
    assert_eq!(i.messages, 3);
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_wakes_listeners_on_both_workers_with_410() {
    let ng = Nginx::start(std_conf());
    let (mut a, mut b) = Conn::pair(ng.port).await;
    let r = a.send("DELETE", &pub_path("d"), &[], "").await;
    assert_status(&r, 404, "DELETE of an unknown channel");

    let id = a.publish_id(&pub_path("d"), "d1").await;
    let etag = format!("\"{id}\"");
    let la = Conn::open_on(ng.port, a.worker()).await.listen("d", Some(&etag), None);
    let lb = Conn::open_on(ng.port, b.worker()).await.listen("d", Some(&etag), None);
    a.wait_listeners("d", 2).await;

    let r = b.send("DELETE", &pub_path("d"), &[], "").await;
    let i = assert_published(&r, 200, "DELETE");
    assert_eq!((i.messages, i.listeners, i.last_id), (1, 2, Some(id)), "info as it was: {i:?}");
    for l in [la, lb] {
        let r = l.resp().await;
        assert_status(&r, 410, "listener of a deleted channel");
    }
    assert!(a.info("d").await.is_none(), "deleted channel still there");
    assert!(b.info("d").await.is_none(), "deleted channel still there");
    let r = a.send("DELETE", &pub_path("d"), &[], "").await;
    assert_status(&r, 404, "second DELETE");
    // Created again from scratch.
    let r = b.publish("d", "d2").await;
    let i = assert_published(&r, 202, "publish after delete");
    assert_eq!(i.messages, 1);
    assert_eq!(fetch(&mut a, &sub_path("d"), None, None).await.text(), "d2");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_not_allowed() {
    let ng = Nginx::start(std_conf());
    let mut c = Conn::open_probed(ng.port).await;
    c.publish("m", "x").await;
    // (TRACE never reaches a module: nginx refuses it itself.)
    for m in ["PATCH", "OPTIONS", "HEAD", "PROPFIND"] {
        let r = c.send(m, &pub_path("m"), &[], "").await;
        assert_status(&r, 405, &format!("{m} on the publisher"));
        assert_eq!(r.header("allow"), Some(ALLOW_ALL), "{m} on the publisher");
    }
    for (m, body) in [
        ("POST", "a body"),
        ("PUT", "a body"),
        ("DELETE", ""),
        ("PATCH", "x"),
        ("OPTIONS", ""),
        ("HEAD", ""),
    ] {
        let r = c.send(m, &sub_path("m"), &[], body).await;
        assert_status(&r, 405, &format!("{m} on the listener"));
        assert_eq!(r.header("allow"), Some("GET"), "{m} on the listener");
    }
    // The connection is still usable (bodies of refused requests were consumed).
    assert_eq!(fetch(&mut c, &sub_path("m"), None, None).await.text(), "x");
    let i = c.info("m").await.unwrap();
    assert_eq!(i.messages, 1, "405 requests must not publish");
    ng.finish();
}

// 6. listener timeout

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_timeout_304_echoes_ids() {
    let ng = Nginx::start(Conf::new(&pubsub("", "martd_listener_timeout 1s;")));
    let mut c = Conn::open_probed(ng.port).await;
    c.publish("t", "m").await;
    let m = fetch(&mut c, &sub_path("t"), None, None).await;
    let r = c.get_long(&sub_path("t"), &id_headers(Some(&m.etag), Some(&m.lm)), LONG).await;
    assert_status(&r, 304, "listener timeout");
    assert_eq!(r.header("etag"), Some(m.etag.as_str()), "304 echoes If-None-Match as Etag");
    assert_eq!(r.header("last-modified"), Some(m.lm.as_str()), "304 echoes If-Modified-Since");
    assert!(r.body.is_empty(), "304 with a body");

    // Echoed ids work for the next request.
    let etag = r.header("etag").unwrap().to_string();
    let r = c.get_long(&sub_path("t"), &[("if-none-match", &etag)], LONG).await;
    assert_status(&r, 304, "second timeout");
    assert_eq!(r.header("etag"), Some(etag.as_str()));

    // An empty channel without ids times out too.
    let r = c.get_long(&sub_path("t-empty"), &[], LONG).await;
    assert_status(&r, 304, "timeout on an empty channel");
    // and the listener count goes back to zero
    c.wait_listeners("t", 0).await;
    ng.finish();
}

// 7. ordering

#[test]
fn thousand_messages_in_order_without_loss() {
    heavy_test(async {
        let ng = Nginx::start(Conf::new(&pubsub("martd_message_buffer_length 2000;", "")));
        const N: usize = 1000;
        let (mut p, mut l) = Conn::pair(ng.port).await;
        let lw = l.worker();
        let reader = tokio::spawn(async move {
            let mut got: Vec<(u64, String)> = Vec::with_capacity(N);
            let (mut etag, mut lm): (Option<String>, Option<String>) = (None, None);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
            while got.len() < N {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "only {} of {N} messages",
                    got.len()
                );
                let r = l
                    .get_long(&sub_path("o"), &id_headers(etag.as_deref(), lm.as_deref()), LONG)
                    .await;
                assert_eq!(r.worker(), lw);
                match r.status {
                    200 => {
                        let m = expect_msg(&r);
                        got.push((m.id, m.text()));
                        etag = Some(m.etag);
                        lm = Some(m.lm);
                    }
                    304 => {}
                    s => panic!("listener got {s}: {}", r.text()),
                }
            }
            got
        });
        p.wait_listeners("o", 1).await;
        for i in 0..N {
            let r = p.publish("o", format!("msg-{i:04}")).await;
            assert!(r.status == 201 || r.status == 202, "publish {i}: {}", r.status);
            assert_ne!(r.worker(), lw);
        }
        let got = within(Duration::from_secs(100), "reader", reader).await.unwrap();
        let bodies: Vec<&str> = got.iter().map(|(_, b)| b.as_str()).collect();
        let want: Vec<String> = (0..N).map(|i| format!("msg-{i:04}")).collect();
        if bodies != want {
            let first_bad = bodies.iter().zip(&want).position(|(g, w)| g != w);
            panic!(
                "messages lost, duplicated or out of order: got {} bodies, first difference at {first_bad:?}: {:?}",
                bodies.len(),
                first_bad.map(|i| &bodies[i.saturating_sub(2)..(i + 3).min(bodies.len())])
            );
        }
        assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "ids not increasing");
        let i = p.info("o").await.unwrap();
        assert_eq!(i.messages, N as u64);
        ng.finish();
    });
}
