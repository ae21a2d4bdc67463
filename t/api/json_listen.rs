//! `martd_listen json`: several channels in one request, batches of everything newer than
//! each etag, waiting, timeouts, reloads, deletes, binary payloads, detaching.

use super::*;

/// Publishes `bodies` to `ch` through `/jpub`; returns their ids.
async fn publish_all(c: &mut Conn, ch: &str, bodies: &[&str]) -> Vec<u64> {
    let mut ids = Vec::new();
    for b in bodies {
        ids.push(jpub(c, ch, "", b.to_string()).await.etag);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_of_newer_messages_in_order_for_several_channels() {
    let ng = Nginx::start(api_conf(""));
    let (mut c, mut d) = Conn::pair(ng.port).await;
    let a = publish_all(&mut c, "ba", &["a1", "a2", "a3", "a4"]).await;
    let b = publish_all(&mut c, "bb", &["b1"]).await;
    let x = publish_all(&mut c, "bc", &["c1", "c2"]).await;
    for w in [a.windows(2), b.windows(2), x.windows(2)] {
        for p in w {
            assert!(p[0] < p[1], "ids not increasing: {p:?}");
        }
    }
    // From either worker: newer than a1 on ba, everything on bb, nothing newer on bc.
    for conn in [&mut c, &mut d] {
        let (a1, c2) = (a[0].to_string(), x[1].to_string());
        let r = conn.get(&jsub("/jsub", &[("ba", &a1), ("bb", "0"), ("bc", &c2)]), &[]).await;
        let chans =
            expect_texts(&r, &[("ba", &["a2", "a3", "a4"]), ("bb", &["b1"])], "mixed etags");
        assert_eq!(chans["ba"].etag, a[3], "etag = id of the last message listed");
        assert_eq!(chans["bb"].etag, b[0]);
        // The reply's etags bring the next request up to date: it waits (1 s) and ends empty.
        let (ea, eb) = (chans["ba"].etag.to_string(), chans["bb"].etag.to_string());
        let r = conn.get(&jsub("/jsub-short", &[("ba", &ea), ("bb", &eb), ("bc", &c2)]), &[]).await;
        expect_empty(&r, "asking again with the reply's etags");
    }
    // An etag between two ids, and one older than everything stored.
    let mid = ((a[1] + a[2]) / 2).to_string();
    let r = c.get(&jsub("/jsub", &[("ba", &mid), ("bc", "1")]), &[]).await;
    expect_texts(&r, &[("ba", &["a3", "a4"]), ("bc", &["c1", "c2"])], "etags between ids");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etag_zero_or_empty_is_everything_stored() {
    let ng = Nginx::start(api_conf(""));
    let mut c = Conn::open_probed(ng.port).await;
    publish_all(&mut c, "e1", &["x1", "x2", "x3"]).await;
    publish_all(&mut c, "e2", &["y1"]).await;
    for (e1, e2) in [("0", "0"), ("", ""), ("0", "")] {
        let r = c.get(&jsub("/jsub", &[("e1", e1), ("e2", e2)]), &[]).await;
        expect_texts(
            &r,
            &[("e1", &["x1", "x2", "x3"]), ("e2", &["y1"])],
            &format!("etags {e1:?} {e2:?}"),
        );
    }
    // `cid`, `callback` and `_` are not channels; the order of arguments does not matter.
    let r = c.get(&format!("/jsub?_=17&e2=0&cid={}&e1=0", cid()), &[]).await;
    expect_texts(&r, &[("e1", &["x1", "x2", "x3"]), ("e2", &["y1"])], "with _ and cid");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_until_a_publish_to_any_of_its_channels() {
    let ng = Nginx::start(api_conf(""));
    let w = ng.worker_pids();
    let mut p = Conn::open_on(ng.port, w[1]).await;
    // wa and wb have a message the listener already has; wc has none (etag 0).
    let mut etags: BTreeMap<&str, String> = BTreeMap::new();
    etags.insert("wa", publish_all(&mut p, "wa", &["old a"]).await[0].to_string());
    etags.insert("wb", publish_all(&mut p, "wb", &["old b"]).await[0].to_string());
    etags.insert("wc", "0".to_string());
    let rounds = [(w[0], w[1], "wb"), (w[1], w[0], "wc"), (w[0], w[0], "wa"), (w[1], w[1], "wc")];
    for (round, (lw, pw, ch)) in rounds.into_iter().enumerate() {
        let mut p = Conn::open_on(ng.port, pw).await;
        let chans: Vec<(&str, &str)> = etags.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let l = listen_on(ng.port, lw, &jsub("/jsub", &chans)).await;
        for c in ["wa", "wb", "wc"] {
            p.wait_listeners(c, 1).await;
        }
        still_waiting(&l, 200, &format!("round {round}: nothing newer yet")).await;
        let body = format!("round {round}: {pw} -> {lw}");
        let m = jpub(&mut p, ch, "", body.clone()).await;
        assert_eq!(m.listeners, 1, "{m:?}");
        let (_, r) = promptly(l, &format!("round {round}")).await;
        let got = expect_texts(&r, &[(ch, &[body.as_str()])], &format!("round {round}"));
        assert_eq!(got[ch].etag, m.etag);
        assert_eq!(r.worker(), lw);
        etags.insert(ch, m.etag.to_string());
        for c in ["wa", "wb", "wc"] {
            p.wait_listeners(c, 0).await;
        }
    }
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_timeout_answers_empty_channels() {
    let ng = Nginx::start(api_conf(""));
    let mut c = Conn::open_probed(ng.port).await;
    let id = jpub(&mut c, "t1", "", "old").await.etag.to_string();
    let started = Instant::now();
    let (c, r) = within(
        PROMPT + Duration::from_secs(1),
        "1 s listener timeout",
        c.spawn_get(&jsub("/jsub-short", &[("t1", &id), ("t2", "0")]), &[], LONG).conn_resp(),
    )
    .await;
    expect_empty(&r, "listener timeout");
    assert_eq!(r.text().trim_end(), r#"{"channels":{}}"#, "the empty reply");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "answered after {:?}",
        started.elapsed()
    );
    // The keep-alive connection serves the next request, which a message answers.
    let l = c.spawn_get(&jsub("/jsub", &[("t1", &id), ("t2", "0")]), &[], LONG);
    let mut p = Conn::open_probed(ng.port).await;
    p.wait_listeners("t2", 1).await;
    jpub(&mut p, "t2", "", "after a timeout").await;
    let (_, r) = promptly(l, "listener after a timeout").await;
    expect_texts(&r, &[("t2", &["after a timeout"])], "after a timeout");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_are_valid_json_and_binary_is_base64() {
    let ng = Nginx::start(api_conf(""));
    let (mut c, d) = Conn::pair(ng.port).await;
    let mut bodies: Vec<Vec<u8>> = vec![
        b"plain".to_vec(),
        b"quote \" backslash \\ slash / tab \t newline \n cr \r nul \0 bell \x07 del \x7f".to_vec(),
        "unicode é ✓ 😀 \u{2028} \u{2029} </script>".as_bytes().to_vec(),
        b"\xff\xfe\x00binary\x80".to_vec(),
        b"\xc3\x28 invalid two-byte".to_vec(),
        b"\xed\xa0\x80 surrogate".to_vec(),
        b"truncated \xe2\x9c".to_vec(),
        (0u8..=255).collect(),
        b"{\"base64\":\"AAAA\"}".to_vec(),
        Vec::new(),
    ];
    bodies.push(vec![0x80; 5000]);
    // A listener waiting on another worker gets the first one; then all of them at once.
    let l = d.spawn_get(&jsub("/jsub", &[("bin", "0")]), &[], LONG);
    c.wait_listeners("bin", 1).await;
    let r = c.send("POST", "/jpub?channel=bin&size=20", &[], bodies[3].clone()).await;
    let first = expect_pub_reply(&r, "binary publish");
    let (_, r) = promptly(l, "listener of a binary message").await;
    let chans = expect_channels(&r, "binary to a waiting listener");
    assert_eq!(chans["bin"].payload, [Item::Binary(bodies[3].clone())]);
    assert_eq!(chans["bin"].etag, first.etag);
    let r = c.send("DELETE", "/jpub?channel=bin", &[], "").await;
    assert_eq!(r.status, 200);
    for b in &bodies {
        let r = c.send("POST", "/jpub?channel=bin&size=20", &[], b.clone()).await;
        expect_pub_reply(&r, "publish");
        // Relay publishes and JSON listeners meet on the same channel.
        let r = c.send("POST", "/pub?channel=bin-relay", &[], b.clone()).await;
        assert!(r.status == 202, "relay publish: {}", r.status);
    }
    // Empty bodies are messages in relay mode only: the JSON channel lacks it.
    let json_bodies: Vec<&Vec<u8>> = bodies.iter().filter(|b| !b.is_empty()).collect();
    let r = c.get(&jsub("/jsub", &[("bin", "0"), ("bin-relay", "0")]), &[]).await;
    let chans = expect_channels(&r, "every kind of payload");
    let got: Vec<Vec<u8>> = chans["bin"].payload.iter().map(Item::bytes).collect();
    let want: Vec<Vec<u8>> = json_bodies.iter().map(|b| b.to_vec()).collect();
    assert_eq!(got, want, "json-mode payloads");
    let got: Vec<Vec<u8>> = chans["bin-relay"].payload.iter().map(Item::bytes).collect();
    assert_eq!(got.len(), 10, "relay channel keeps martd_message_buffer_length (10)");
    assert_eq!(got, bodies[bodies.len() - 10..].to_vec(), "relay-published payloads");
    for it in chans["bin"].payload.iter().chain(&chans["bin-relay"].payload) {
        let bytes = it.bytes();
        let is_text = matches!(it, Item::Text(_));
        assert_eq!(is_text, std::str::from_utf8(&bytes).is_ok(), "string iff UTF-8: {it:?}");
    }
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_answers_only_that_channels_listeners() {
    let ng = Nginx::start(api_conf(""));
    let w = ng.worker_pids();
    let mut p = Conn::open_on(ng.port, w[0]).await;
    let only_a = listen_on(ng.port, w[0], &jsub("/jsub", &[("pa", "0")])).await;
    let only_b = listen_on(ng.port, w[1], &jsub("/jsub", &[("pb", "0")])).await;
    let both = listen_on(ng.port, w[1], &jsub("/jsub", &[("pb", "0"), ("pa", "0")])).await;
    let relay_b = Conn::open_on(ng.port, w[0]).await.listen("pb", None, None);
    p.wait_listeners("pa", 2).await;
    p.wait_listeners("pb", 3).await;
    let m = jpub(&mut p, "pa", "", "to a").await;
    assert_eq!(m.listeners, 2, "{m:?}");
    for (l, what) in [(only_a, "listener of pa"), (both, "listener of pa and pb")] {
        let (_, r) = promptly(l, what).await;
        expect_texts(&r, &[("pa", &["to a"])], what);
    }
    still_waiting(&only_b, 500, "listener of pb only").await;
    assert!(!relay_b.is_finished(), "relay listener of pb answered by a publish to pa");
    p.wait_listeners("pb", 2).await;
    let m = jpub(&mut p, "pb", "", "to b").await;
    assert_eq!(m.listeners, 2, "{m:?}");
    let (_, r) = promptly(only_b, "listener of pb").await;
    expect_texts(&r, &[("pb", &["to b"])], "listener of pb");
    let (_, r) = promptly(relay_b, "relay listener of pb").await;
    assert_eq!(expect_msg(&r).text(), "to b");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_answers_410_naming_the_channel() {
    let ng = Nginx::start(api_conf(""));
    let w = ng.worker_pids();
    let mut p = Conn::open_on(ng.port, w[0]).await;
    jpub(&mut p, "dx", "", "x").await;
    let x = jinfo(&mut p, "dx").await.unwrap().last_id.unwrap().to_string();
    jpub(&mut p, "dy", "", "y").await;
    let y = jinfo(&mut p, "dy").await.unwrap().last_id.unwrap().to_string();
    let json_l = listen_on(ng.port, w[1], &jsub("/jsub", &[("dx", &x), ("dy", &y)])).await;
    let json_x = listen_on(ng.port, w[0], &jsub("/jsub", &[("dx", &x)])).await;
    let relay_l = Conn::open_on(ng.port, w[1]).await.listen("dy", Some(&format!("\"{y}\"")), None);
    p.wait_listeners("dx", 2).await;
    p.wait_listeners("dy", 2).await;
    let r = p.send("DELETE", "/jpub?channel=dy", &[], "").await;
    assert_eq!(r.status, 200, "DELETE: {}", r.text());
    assert_eq!(media_type(&r).as_deref(), Some("application/json"));
    let i = parse_info_json(&r.text());
    assert_eq!((i.messages, i.listeners), (1, 2), "info as it was: {i:?}");
    let (_, r) = promptly(json_l, "JSON listener of a deleted channel").await;
    let reason = expect_json_gone(&r, "dy", "JSON listener of a deleted channel");
    assert_eq!(reason, "channel deleted");
    let (_, r) = promptly(relay_l, "relay listener of a deleted channel").await;
    expect_json_error(&r, 410, "relay listener of a deleted channel");
    // The listener of the other channel only is not concerned.
    still_waiting(&json_x, 300, "listener of dx only").await;
    p.wait_listeners("dx", 1).await;
    let m = jpub(&mut p, "dx", "", "x2").await;
    assert_eq!(m.listeners, 1);
    let (_, r) = promptly(json_x, "listener of dx").await;
    expect_texts(&r, &[("dx", &["x2"])], "listener of dx after dy was deleted");
    // Deleting a missing channel: 404 JSON.
    let r = p.send("DELETE", "/jpub?channel=dy", &[], "").await;
    expect_json_error(&r, 404, "DELETE of a deleted channel");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_and_graceful_stop_answer_empty_channels() {
    let mut ng = Nginx::start(api_conf(""));
    let w = ng.worker_pids();
    let mut p = Conn::open_on(ng.port, w[0]).await;
    let id = jpub(&mut p, "rl", "", "kept").await.etag.to_string();
    let mut ls = Vec::new();
    for pid in [w[0], w[1], w[1]] {
        ls.push(listen_on(ng.port, pid, &jsub("/jsub", &[("rl", &id), ("rl2", "0")])).await);
    }
    let jsonp =
        listen_on(ng.port, w[0], &format!("{}&callback=cb", jsub("/jsub", &[("rl", &id)]))).await;
    p.wait_listeners("rl", 4).await;
    drop(p);
    let took = ng.reload();
    assert!(took < Duration::from_secs(5), "reload took {took:?}");
    for l in ls {
        let (_, r) = promptly(l, "JSON listener at reload").await;
        expect_empty(&r, "JSON listener at reload");
    }
    let (_, r) = promptly(jsonp, "JSONP listener at reload").await;
    assert_eq!(r.status, 200);
    assert_eq!(media_type(&r).as_deref(), Some("application/javascript"));
    let inner = unwrap_jsonp(&r.text(), "cb", "JSONP at reload").to_string();
    assert!(parse_channels(&parse_json(inner.as_bytes(), "JSONP"), "JSONP").is_empty());
    // Asking again with the same etags works on the new workers, and the message was kept.
    let mut c = Conn::open_probed(ng.port).await;
    let r = c.get(&jsub("/jsub", &[("rl", "0")]), &[]).await;
    expect_texts(&r, &[("rl", &["kept"])], "after the reload");
    let (a, b) = Conn::pair(ng.port).await;
    let la = a.spawn_get(&jsub("/jsub", &[("rl", &id)]), &[], LONG);
    let lb = b.spawn_get(&jsub("/jsub", &[("rl", &id)]), &[], LONG);
    c.wait_listeners("rl", 2).await;
    drop(c);
    let stopped = ng.stop();
    for l in [la, lb] {
        let (_, r) = promptly(l, "JSON listener at graceful stop").await;
        expect_empty(&r, "JSON listener at graceful stop");
    }
    if let Err(e) = stopped {
        panic!("{e}");
    }
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_names_are_raw_argument_names() {
    let ng = Nginx::start(api_conf(""));
    let mut c = Conn::open_probed(ng.port).await;
    // The publisher's `$arg_channel` is not decoded either: encoded names match as sent.
    for (name, body) in
        [("a%2Fb", "slash"), ("x%20y", "space"), ("%C3%A9t%C3%A9", "ete"), ("a.b-c_d~e", "plain")]
    {
        jpub(&mut c, name, "", body).await;
    }
    jpub(&mut c, "a", "", "decoded a").await;
    let r = c
        .get(
            &jsub(
                "/jsub",
                &[("a%2Fb", "0"), ("x%20y", "0"), ("%C3%A9t%C3%A9", "0"), ("a.b-c_d~e", "0")],
            ),
            &[],
        )
        .await;
    expect_texts(
        &r,
        &[
            ("a%2Fb", &["slash"]),
            ("x%20y", &["space"]),
            ("%C3%A9t%C3%A9", &["ete"]),
            ("a.b-c_d~e", &["plain"]),
        ],
        "encoded names",
    );
    // `%61` is not `a`.
    let r = c.get(&jsub("/jsub-short", &[("%61", "0")]), &[]).await;
    expect_empty(&r, "an encoded name is not decoded");
    ng.finish();
}

/// A multi-channel JSON listener on a keep-alive HTTP/1.1 connection detaches (the debug log's
/// line, as in t/relay/detach.rs) and still gets its message; its connection then serves the
/// next long-poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_channel_listener_detaches_and_gets_its_message() {
    let mut conf = api_conf("");
    conf.main = "error_log logs/debug.log debug;".to_string();
    let ng = Nginx::start(conf);
    let log_path = ng.prefix().join("logs/debug.log");
    let detached = || {
        std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                l.contains("martd: detached listener #") && l.contains("waits without its request")
            })
            .count()
    };
    let (mut p, c) = Conn::pair(ng.port).await;
    let l = c.spawn_get(&jsub("/jsub", &[("m1", "0"), ("m2", "0"), ("m3", "0")]), &[], LONG);
    for ch in ["m1", "m2", "m3"] {
        p.wait_listeners(ch, 1).await;
    }
    let debug = std::fs::read_to_string(&log_path).unwrap_or_default().contains("[debug]");
    if debug {
        wait_until("the JSON listener detaches", QUICK, || detached() == 1).await;
    } else {
        eprintln!("nginx has no debug logging: detaching not observable, delivery still checked");
    }
    let m = jpub(&mut p, "m2", "", "to m2").await;
    assert_eq!(m.listeners, 1);
    let (c, r) = promptly(l, "detached multi-channel listener").await;
    expect_texts(&r, &[("m2", &["to m2"])], "detached multi-channel listener");
    // The connection serves the next long-poll (detached again), answered by another message.
    let e = m.etag.to_string();
    let l = c.spawn_get(&jsub("/jsub", &[("m1", "0"), ("m2", &e), ("m3", "0")]), &[], LONG);
    p.wait_listeners("m2", 1).await;
    if debug {
        wait_until("the second long-poll detaches", QUICK, || detached() == 2).await;
    }
    jpub(&mut p, "m3", "", "to m3").await;
    let (mut c, r) = promptly(l, "second long-poll on the connection").await;
    expect_texts(&r, &[("m3", &["to m3"])], "second long-poll");
    // And then an ordinary request.
    assert_eq!(c.get("/__worker", &[]).await.status, 204);
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_limits_answer_json_errors() {
    let ng = Nginx::start(api_conf(
        "        location = /jsub-max1 { martd_listen json; martd_max_listeners 1; }
        location = /jsub-auth { martd_listen json; martd_authorized_channels_only on; }
        location = /jsub-first { martd_listen json; martd_listener_concurrency first; }
        location = /jsub-last { martd_listen json; martd_listener_concurrency last; }
",
    ));
    let w = ng.worker_pids();
    let mut p = Conn::open_on(ng.port, w[0]).await;
    // martd_max_listeners 1: a second waiting listener gets 403.
    let first = listen_on(ng.port, w[0], &jsub("/jsub-max1", &[("lm", "0")])).await;
    p.wait_listeners("lm", 1).await;
    let (_, r) =
        promptly(listen_on(ng.port, w[1], &jsub("/jsub-max1", &[("lm", "0")])).await, "max").await;
    expect_json_error(&r, 403, "over martd_max_listeners");
    // martd_authorized_channels_only: channels never published to get 403.
    jpub(&mut p, "la", "", "exists").await;
    let r = p.get(&jsub("/jsub-auth", &[("la-missing", "0"), ("la-missing2", "0")]), &[]).await;
    expect_json_error(&r, 403, "missing channels with martd_authorized_channels_only");
    let r = p.get(&jsub("/jsub-auth", &[("la", "0")]), &[]).await;
    expect_texts(&r, &[("la", &["exists"])], "an existing channel with authorized_channels_only");
    // concurrency first: a newcomer gets 409; last: the older one gets 409.
    let f = listen_on(ng.port, w[0], &jsub("/jsub-first", &[("lf", "0")])).await;
    p.wait_listeners("lf", 1).await;
    let (_, r) =
        promptly(listen_on(ng.port, w[1], &jsub("/jsub-first", &[("lf", "0")])).await, "first")
            .await;
    expect_json_error(&r, 409, "newcomer with concurrency first");
    let old = listen_on(ng.port, w[0], &jsub("/jsub-last", &[("ll", "0")])).await;
    p.wait_listeners("ll", 1).await;
    let new = listen_on(ng.port, w[1], &jsub("/jsub-last", &[("ll", "0")])).await;
    let (_, r) = promptly(old, "older listener with concurrency last").await;
    expect_json_error(&r, 409, "older listener with concurrency last");
    p.wait_listeners("ll", 1).await;
    for (ch, l) in [("lm", first), ("lf", f), ("ll", new)] {
        jpub(&mut p, ch, "", "end").await;
        let (_, r) = promptly(l, &format!("the waiting listener of {ch}")).await;
        expect_texts(&r, &[(ch, &["end"])], ch);
    }
    ng.finish();
}

/// `GET /pub?channel=<name>` (JSON info) on a raw connection: the waiting listeners, or None.
async fn raw_listeners(port: u16, name: &[u8]) -> Option<u64> {
    let mut head = b"GET /pub?channel=".to_vec();
    head.extend_from_slice(name);
    head.extend_from_slice(b" HTTP/1.1\r\nHost: t\r\nAccept: application/json\r\n");
    let r = raw_request(port, &head, b"").await;
    match r.status {
        404 => None,
        200 => Some(parse_info_json(&String::from_utf8_lossy(&r.body)).listeners),
        s => panic!("info of {name:?}: {s} {:?}", String::from_utf8_lossy(&r.body)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_names_needing_escapes_give_valid_json() {
    let ng = Nginx::start(api_conf(""));
    let port = ng.port;
    // Raw bytes in the request line: nginx passes `"`, `\`, UTF-8 and non-UTF-8 bytes.
    let names: [&[u8]; 5] =
        [b"a\"b\\c", "\u{e9}t\u{e9}".as_bytes(), b"x\xffy", b"</script>", b"{}[]:,"];
    for (i, name) in names.iter().enumerate() {
        let mut head = b"POST /jpub?channel=".to_vec();
        head.extend_from_slice(name);
        head.extend_from_slice(b" HTTP/1.1\r\nHost: t\r\n");
        let r = raw_to_resp(raw_request(port, &head, format!("m{i}").as_bytes()).await);
        expect_pub_reply(&r, &format!("publish to {name:?}"));
    }
    let mut target = format!("/jsub?cid={}", cid()).into_bytes();
    for name in &names {
        target.push(b'&');
        target.extend_from_slice(name);
        target.extend_from_slice(b"=0");
    }
    let mut head = b"GET ".to_vec();
    head.extend_from_slice(&target);
    head.extend_from_slice(b" HTTP/1.1\r\nHost: t\r\n");
    let r = raw_to_resp(raw_request(port, &head, b"").await);
    let chans = expect_channels(&r, "names needing escapes");
    assert_eq!(chans.len(), names.len(), "every channel listed: {}", r.text());
    for (i, name) in names.iter().enumerate() {
        let want = format!("m{i}");
        match std::str::from_utf8(name) {
            Ok(s) => {
                let b = chans.get(s).unwrap_or_else(|| panic!("no channel {s:?} in {}", r.text()));
                assert_eq!(b.texts(), [want], "channel {s:?}");
            }
            Err(_) => assert!(
                chans.values().any(|b| b.texts() == [want.clone()]),
                "the non-UTF-8 name's message: {}",
                r.text()
            ),
        }
    }
    // 410 of a waiting listener names the deleted channel in valid JSON too.
    for name in [&b"a\"b\\c"[..], b"x\xffy"] {
        let mut l = RawConn::open(port).await;
        let mut req = format!("GET /jsub?cid={}&", cid()).into_bytes();
        req.extend_from_slice(name);
        req.extend_from_slice(b"=99999999999999999 HTTP/1.1\r\nHost: t\r\n\r\n");
        l.write(&req).await;
        within(QUICK, "the raw listener waits", async {
            while raw_listeners(port, name).await != Some(1) {
                sleep_ms(20).await;
            }
        })
        .await;
        let mut head = b"DELETE /jpub?channel=".to_vec();
        head.extend_from_slice(name);
        head.extend_from_slice(b" HTTP/1.1\r\nHost: t\r\n");
        assert_eq!(raw_request(port, &head, b"").await.status, 200, "DELETE {name:?}");
        let r = raw_to_resp(l.response(PROMPT).await);
        match std::str::from_utf8(name) {
            Ok(s) => {
                expect_json_gone(&r, s, &format!("410 for {s:?}"));
            }
            Err(_) => {
                assert_eq!(r.status, 410);
                let v = parse_json(&r.body, "410 for a non-UTF-8 name");
                object_with_keys(&v, &["channel", "error"], "410 for a non-UTF-8 name");
            }
        }
    }
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_payloads_and_many_channels_in_one_reply() {
    let ng = Nginx::start(api_conf(""));
    let (mut c, mut d) = Conn::pair(ng.port).await;
    // 300 KB binary and text messages (bodies spooled to a temp file), several at once.
    let bin: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let text: String = (0..300_000u32).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let quotes = "\"\\\n".repeat(50_000);
    for body in [bin.clone(), text.clone().into_bytes(), quotes.clone().into_bytes()] {
        jpub(&mut c, "big", "", body).await;
    }
    let r = d.get(&jsub("/jsub", &[("big", "0")]), &[]).await;
    let chans = expect_channels(&r, "large payloads");
    assert_eq!(
        chans["big"].payload,
        [Item::Binary(bin.clone()), Item::Text(text.clone()), Item::Text(quotes.clone())],
        "large payloads"
    );
    // A waiting listener gets a large one too.
    let e = chans["big"].etag.to_string();
    let l = d.spawn_get(&jsub("/jsub", &[("big", &e)]), &[], LONG);
    c.wait_listeners("big", 1).await;
    jpub(&mut c, "big", "", bin.clone()).await;
    let (_, r) = promptly(l, "waiting listener of a large message").await;
    assert_eq!(expect_channels(&r, "large, waiting")["big"].payload, [Item::Binary(bin)]);
    // 64 channels with 10 messages each in one reply.
    let names: Vec<String> = (0..64).map(|i| format!("many{i}")).collect();
    for n in &names {
        for k in 0..10 {
            jpub(&mut c, n, "", format!("{n}/{k}")).await;
        }
    }
    let args: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "0")).collect();
    let r = c.get(&jsub("/jsub", &args), &[]).await;
    let chans = expect_channels(&r, "64 channels");
    assert_eq!(chans.len(), 64);
    for n in &names {
        let want: Vec<String> = (0..10).map(|k| format!("{n}/{k}")).collect();
        assert_eq!(chans[n].texts(), want, "{n}");
    }
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_of_json_locations() {
    let ng = Nginx::start(api_conf(""));
    let mut c = Conn::open_probed(ng.port).await;
    let r = c.send("PUT", "/jpub?channel=mp", &[], "put body").await;
    let put = expect_pub_reply(&r, "PUT to a json publisher");
    let r = c.get(&jsub("/jsub", &[("mp", "0")]), &[]).await;
    let chans = expect_texts(&r, &[("mp", &["put body"])], "PUT message");
    assert_eq!(chans["mp"].etag, put.etag);
    for m in ["PATCH", "OPTIONS"] {
        let r = c.send(m, "/jpub?channel=mp", &[], "x").await;
        expect_json_error(&r, 405, &format!("{m} to a json publisher"));
    }
    for m in ["POST", "PUT", "DELETE"] {
        let r = c.send(m, &jsub("/jsub", &[("mp", "0")]), &[], "x").await;
        expect_json_error(&r, 405, &format!("{m} to a json listener"));
    }
    assert_eq!(jinfo(&mut c, "mp").await.map(|i| (i.messages, i.listeners)), Some((1, 0)));
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_pipelined_behind_a_waiting_json_listener() {
    let ng = Nginx::start(api_conf(""));
    let mut p = Conn::open_probed(ng.port).await;
    let mut raw = RawConn::open(ng.port).await;
    let path = jsub("/jsub", &[("pp1", "0"), ("pp2", "0")]);
    raw.write(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes()).await;
    p.wait_listeners("pp2", 1).await;
    raw.write(b"GET /__worker HTTP/1.1\r\nHost: t\r\n\r\n").await;
    sleep_ms(100).await;
    jpub(&mut p, "pp2", "", "first").await;
    let r = raw_to_resp(raw.response(QUICK).await);
    expect_texts(&r, &[("pp2", &["first"])], "the waiting JSON listener");
    assert_eq!(raw.response(QUICK).await.status, 204, "the pipelined request after it");
    // Then the connection carries another JSON long-poll.
    let path = format!("{}&callback=cb", jsub("/jsub", &[("pp2", "0")]));
    raw.write(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes()).await;
    let r = raw_to_resp(raw.response(QUICK).await);
    assert_eq!(media_type(&r).as_deref(), Some("application/javascript"));
    ng.finish();
}
