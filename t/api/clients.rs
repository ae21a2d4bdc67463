//! Registered clients (`martd_clients`, `martd_client_timeout`) and channels that admit only
//! them (`use_sessions=1`): registration, renewal by listening, expiry, anonymous channels open
//! to all (in one request too), across workers; bad input.

use super::*;

fn clients_conf() -> Conf {
    api_conf(
        "        location = /clients { martd_clients; }
        location = /clients-short { martd_clients; martd_client_timeout 1s; }
        location = /subs { martd_listen; martd_channel_id $arg_chs; martd_channel_id_delimiter \"|\"; }
        location = /es { martd_listen eventsource; }",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_clients_listen_on_session_channels() {
    let ng = Nginx::start(clients_conf());
    let w = ng.worker_pids();
    let mut a = Conn::open_on(ng.port, w[0]).await;
    let mut b = Conn::open_on(ng.port, w[1]).await;
    // Register on one worker; it is known on the other.
    let r = a.send("POST", "/clients?client_id=alice", &[], "").await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(parse_json(&r.body, "register")["client_id"], "alice");
    assert_eq!(parse_json(&r.body, "register")["timeout"], 60);
    let r = b.send("PUT", "/clients", &[("X-Martd-Client-Id", "alice")], "").await;
    assert_eq!(r.status, 200, "renewed: {}", r.text());
    let r = b.get("/clients?client_id=alice", &[]).await;
    assert_eq!(r.status, 200);
    let left = parse_json(&r.body, "info")["expires_in"].as_u64().unwrap();
    assert!((59..=60).contains(&left), "{left}");
    // A session channel: its messages go to registered clients only.
    let r = a.send("POST", "/pub?channel=priv&use_sessions=1", &[], "secret").await;
    assert!(r.status == 201 || r.status == 202, "{}", r.text());
    a.publish("pub1", "open").await;
    for path in ["/sub?channel=priv", "/sub?channel=priv&client_id=mallory"] {
        let r = b.get(path, &[]).await;
        assert_eq!(r.status, 403, "{path}: {}", r.text());
    }
    assert_eq!(a.info("priv").await.map(|i| i.listeners), Some(0), "refused ones counted");
    let r = b.get("/sub?channel=priv&client_id=alice", &[]).await;
    assert_eq!((r.status, r.text().as_str()), (200, "secret"));
    let r = b.get("/sub?channel=priv", &[("X-Martd-Client-Id", "alice")]).await;
    assert_eq!(r.status, 200);
    // Anonymous channels stay open; a request with both needs the client.
    assert_eq!(b.get("/sub?channel=pub1", &[]).await.status, 200);
    assert_eq!(b.get("/subs?chs=pub1|priv", &[]).await.status, 403);
    assert_eq!(b.get("/subs?chs=pub1|priv&client_id=alice", &[]).await.status, 200);
    // martd's JSON listen request names its client with `cid`.
    let r = b.get("/jsub?cid=alice&priv=0&pub1=0", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = parse_json(&r.body, "json listen");
    assert_eq!(v["channels"]["priv"]["payload"][0], "secret");
    assert_eq!(b.get("/jsub?cid=eve&priv=0", &[]).await.status, 403);
    // A waiting registered listener is woken; a stream too.
    let l = Conn::open_on(ng.port, w[0]).await.spawn_get(
        "/sub?channel=priv&client_id=alice",
        &[("If-None-Match", "\"9000000000000000000\"")],
        LONG,
    );
    a.wait_listeners("priv", 1).await;
    let r = Streaming::open(
        Conn::open_on(ng.port, w[1]).await,
        "/es?channel=priv&client_id=alice&last_event_id=9000000000000000000",
        &[("Accept", "text/event-stream")],
        QUICK,
    )
    .await;
    assert_eq!(r.status, 200);
    let mut ev = r.events();
    a.wait_listeners("priv", 2).await;
    a.publish("priv", "later").await;
    let r = l.resp().await;
    assert_eq!((r.status, r.text().as_str()), (200, "later"));
    assert_eq!(ev.next(PROMPT).await.expect("an event").data, "later");
    // Switched off, the channel is open again; a forgotten client is refused elsewhere.
    a.send("POST", "/pub?channel=priv&use_sessions=0", &[], "").await;
    assert_eq!(b.get("/sub?channel=priv", &[]).await.status, 200);
    assert_eq!(a.send("DELETE", "/clients?client_id=alice", &[], "").await.status, 200);
    assert_eq!(a.send("DELETE", "/clients?client_id=alice", &[], "").await.status, 404);
    assert_eq!(a.get("/clients?client_id=alice", &[]).await.status, 404);
    a.send("POST", "/pub?channel=priv&use_sessions=1", &[], "").await;
    assert_eq!(b.get("/sub?channel=priv&client_id=alice", &[]).await.status, 403);
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_expire_unless_they_listen_and_bad_input_is_refused() {
    let ng = Nginx::start(clients_conf());
    let mut c = Conn::open(ng.port).await;
    c.send("POST", "/pub?channel=s2&use_sessions=true", &[], "m").await;
    for id in ["idle", "busy"] {
        assert_eq!(
            c.send("POST", &format!("/clients-short?client_id={id}"), &[], "").await.status,
            201
        );
    }
    // "busy" listens every 400 ms, which renews it; "idle" does not.
    for _ in 0..4 {
        sleep_ms(400).await;
        assert_eq!(c.get("/sub?channel=s2&client_id=busy", &[]).await.status, 200);
    }
    assert_eq!(c.get("/sub?channel=s2&client_id=busy", &[]).await.status, 200);
    assert_eq!(c.get("/sub?channel=s2&client_id=idle", &[]).await.status, 403, "expired");
    assert_eq!(c.get("/clients?client_id=idle", &[]).await.status, 404);
    // Bad input: 400 with a reason, nothing registered or set.
    let long = "x".repeat(129);
    for (m, path, h, why) in [
        ("POST", "/clients".to_string(), None, "no client_id"),
        ("POST", format!("/clients?client_id={long}"), None, "longer than 128"),
        ("POST", "/clients".to_string(), Some(("X-Martd-Client-Id", "a b")), "visible ASCII"),
        ("POST", "/pub?channel=s3&use_sessions=maybe".to_string(), None, "use_sessions"),
    ] {
        let headers: Vec<(&str, &str)> = h.into_iter().collect();
        let r = c.send(m, &path, &headers, "").await;
        assert_eq!(r.status, 400, "{path}: {}", r.text());
        assert!(r.text().contains(why), "{path}: {}", r.text());
    }
    let r = c.send("PATCH", "/clients?client_id=a", &[], "").await;
    assert_eq!(r.status, 405);
    assert!(c.info("s3").await.is_none());
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_clients_location_use_sessions_is_refused() {
    let ng = Nginx::start(api_conf(""));
    let mut c = Conn::open(ng.port).await;
    let r = c.send("POST", "/pub?channel=s4&use_sessions=1", &[], "m").await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("needs a martd_clients location"), "{}", r.text());
    ng.finish();
}
