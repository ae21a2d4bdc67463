//! Bad input: every one gets 400 with a JSON `{"error":...}` body and changes nothing.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_attribute_values_400_and_nothing_changes() {
    let ng = Nginx::start(api_conf(""));
    let (mut c, d) = Conn::pair(ng.port).await;
    let id = jpub(&mut c, "bi", "size=3", "m1").await.etag;
    let l = d.spawn_get(&jsub("/jsub", &[("bi", &id.to_string())]), &[], LONG);
    c.wait_listeners("bi", 1).await;
    let before = state(&jinfo(&mut c, "bi").await);
    let big = "9".repeat(30);
    let (big_size, big_life) = (format!("size={big}"), format!("life={big}"));
    let bad_args = [
        "size=abc",
        "size=-1",
        "size=1.5",
        "size=0x10",
        "size=3abc",
        big_size.as_str(),
        "life=-1",
        "life=abc",
        "life=1.5",
        "life=1s",
        big_life.as_str(),
        "one2one=maybe",
        "one2one=yes",
        "one2one=2",
        "one2one=truee",
        "size=2&one2one=maybe",
        "one2one=true&size=abc",
    ];
    let bad_headers = [
        ("x-martd-size", "abc"),
        ("x-martd-size", "-1"),
        ("x-martd-life", "-1"),
        ("x-martd-life", "soon"),
        ("x-martd-one2one", "maybe"),
    ];
    for loc in ["/jpub", "/pub"] {
        for body in ["x", ""] {
            for args in &bad_args {
                let path = pub_target(loc, "bi", args);
                let r = c.send("POST", &path, &[], body).await;
                expect_json_error(&r, 400, &format!("POST {path} body {body:?}"));
            }
            for (k, v) in bad_headers {
                let path = pub_target(loc, "bi", "");
                let r = c.send("POST", &path, &[(k, v)], body).await;
                expect_json_error(&r, 400, &format!("POST {path} {k}: {v} body {body:?}"));
            }
        }
        // A bad attribute never creates a channel either.
        let r = c.send("POST", &pub_target(loc, "bi-new", "size=abc"), &[], "x").await;
        expect_json_error(&r, 400, "bad size on a new channel");
        assert!(jinfo(&mut c, "bi-new").await.is_none(), "{loc}: a refused push created it");
    }
    assert_eq!(state(&jinfo(&mut c, "bi").await), before, "refused pushes changed the channel");
    assert!(!l.is_finished(), "a refused push woke the listener");
    // Neither the size nor one2one changed: 4 more messages keep 3, and a second listener waits.
    let second = Conn::open_probed(ng.port).await.spawn_get(
        &jsub("/jsub", &[("bi", &id.to_string())]),
        &[],
        LONG,
    );
    c.wait_listeners("bi", 2).await;
    let m2 = jpub(&mut c, "bi", "", "m2").await;
    assert_eq!(m2.listeners, 2, "{m2:?}");
    for p in [l, second] {
        let (_, r) = promptly(p, "listener after the refused pushes").await;
        expect_texts(&r, &[("bi", &["m2"])], "first message after the refused pushes");
    }
    for i in 3..=5 {
        jpub(&mut c, "bi", "", format!("m{i}")).await;
    }
    assert_eq!(jinfo(&mut c, "bi").await.map(|i| i.messages), Some(3), "size still 3");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_channels_per_request_400() {
    let ng = Nginx::start(api_conf(
        "        location = /jsub3 { martd_listen json; martd_max_channels_per_request 3; }\n",
    ));
    let mut c = Conn::open_probed(ng.port).await;
    jpub(&mut c, "n0", "", "m").await;
    let names: Vec<String> = (0..65).map(|i| format!("n{i}")).collect();
    let chans =
        |n: usize| -> Vec<(&str, &str)> { names[..n].iter().map(|s| (s.as_str(), "0")).collect() };
    for (loc, max) in [("/jsub3", 3), ("/jsub", 64)] {
        let r = c.get(&jsub(loc, &chans(max + 1)), &[]).await;
        expect_json_error(&r, 400, &format!("{loc}: {} channels", max + 1));
        for n in &names[1..=max] {
            assert!(
                jinfo(&mut c, n).await.is_none_or(|i| i.listeners == 0),
                "{loc}: {n} has a listener"
            );
        }
        assert_eq!(jinfo(&mut c, "n0").await.map(|i| i.listeners), Some(0));
        let r = c.get(&jsub(loc, &chans(max)), &[]).await;
        expect_texts(&r, &[("n0", &["m"])], &format!("{loc}: {max} channels"));
    }
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_etags_400() {
    let ng = Nginx::start(api_conf(""));
    let mut c = Conn::open_probed(ng.port).await;
    jpub(&mut c, "be", "", "m").await;
    let before = state(&jinfo(&mut c, "be").await);
    for etag in ["abc", "1x", "-1", "1.0", "0x10", "+1", "%201", "1%20", "%221%22", "1e5"] {
        for chans in [vec![("be", etag)], vec![("be2", "0"), ("be", etag)]] {
            let path = jsub("/jsub", &chans);
            let r = c.get(&path, &[]).await;
            expect_json_error(&r, 400, &format!("GET {path}"));
        }
    }
    assert_eq!(state(&jinfo(&mut c, "be").await), before, "bad requests changed the channel");
    assert!(jinfo(&mut c, "be2").await.is_none_or(|i| i.listeners == 0), "a listener was left");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_channel_or_a_channel_twice_400() {
    let ng = Nginx::start(api_conf(""));
    let mut c = Conn::open_probed(ng.port).await;
    jpub(&mut c, "dup", "", "m").await;
    let before = state(&jinfo(&mut c, "dup").await);
    for path in [
        "/jsub",
        "/jsub?",
        "/jsub?cid=x",
        "/jsub?cid=x&_=1&callback=cb",
        "/jsub?_=1",
        "/jsub?dup=0&dup=0",
        "/jsub?cid=x&dup=0&other=0&dup=5",
    ] {
        let r = c.get(path, &[]).await;
        expect_json_error(&r, 400, &format!("GET {path}"));
    }
    assert_eq!(state(&jinfo(&mut c, "dup").await), before, "bad requests changed the channel");
    assert!(jinfo(&mut c, "other").await.is_none_or(|i| i.listeners == 0), "a listener was left");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_in_channel_ids_400() {
    let ng = Nginx::start(api_conf(
        "        location = /hjpub { martd_push json; martd_channel_id $http_x_channel; }
        location = /hpub { martd_push; martd_channel_id $http_x_channel; }
        location = /hsub { martd_listen; martd_channel_id $http_x_channel; }
",
    ));
    let port = ng.port;
    let mut c = Conn::open_probed(port).await;
    let bad: [&[u8]; 6] = [b"a\x01b", b"\x1fab", b"ab\x7f", b"a\tb", b"a\x1bb", b"a\x08b"];
    for name in bad {
        for (method, loc, body) in [
            ("POST", "/hjpub", &b"x"[..]),
            ("POST", "/hjpub", &b""[..]),
            ("GET", "/hjpub", &b""[..]),
            ("DELETE", "/hjpub", &b""[..]),
            ("POST", "/hpub", &b"x"[..]),
            ("PUT", "/hpub", &b"x"[..]),
            ("GET", "/hpub", &b""[..]),
            ("DELETE", "/hpub", &b""[..]),
            ("GET", "/hsub", &b""[..]),
        ] {
            let mut head =
                format!("{method} {loc} HTTP/1.1\r\nHost: t\r\nX-Channel: ").into_bytes();
            head.extend_from_slice(name);
            head.extend_from_slice(b"\r\n");
            let r = raw_to_resp(raw_request(port, &head, body).await);
            expect_json_error(&r, 400, &format!("{method} {loc} with channel {name:?}"));
        }
    }
    // The same names without the control character are fine, and nothing was stored.
    for name in ["ab", "a b"] {
        let r = c.get("/hjpub", &[("x-channel", name)]).await;
        expect_json_error(&r, 404, &format!("info of {name:?} after refused pushes"));
        let r = c.send("POST", "/hjpub", &[("x-channel", name)], "fine").await;
        expect_pub_reply(&r, &format!("push to {name:?}"));
    }
    let r = c.get("/hsub", &[("x-channel", "ab")]).await;
    assert_eq!(expect_msg(&r).text(), "fine");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_full_507_json_everywhere() {
    let ng = Nginx::start(api_conf("").http("martd_shm_size 256k;"));
    let mut c = Conn::open_probed(ng.port).await;
    let mut n = 0;
    let full = loop {
        let path = format!("/jpub?channel=f{n}&size=1000");
        let r = c.send("POST", &path, &[], vec![b'x'; 8000]).await;
        if r.status != 200 {
            break r;
        }
        n += 1;
        assert!(n < 1000, "256k zone never full");
    };
    expect_json_error(&full, 507, "json publish into a full zone");
    let before = state(&jinfo(&mut c, "f0").await);
    let r = c.send("POST", "/pub?channel=f0", &[], vec![b'x'; 8000]).await;
    expect_json_error(&r, 507, "relay publish into a full zone");
    let names: Vec<String> = (0..64).map(|i| format!("new{i}")).collect();
    let args: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "0")).collect();
    let r = c.get_long(&jsub("/jsub-short", &args), &[], PROMPT + Duration::from_secs(1)).await;
    expect_json_error(&r, 507, "JSON listener on 64 new channels in a full zone");
    let r = c.send("POST", "/jpub?channel=zz&size=3", &[], "").await;
    expect_json_error(&r, 507, "attribute-only push of a new channel in a full zone");
    assert_eq!(state(&jinfo(&mut c, "f0").await), before, "a refused publish changed f0");
    // Deleting channels makes room again.
    for i in 0..n {
        let r = c.send("DELETE", &format!("/jpub?channel=f{i}"), &[], "").await;
        assert_eq!(r.status, 200);
    }
    jpub(&mut c, "f0", "", vec![b'y'; 8000]).await;
    let r = c.get(&jsub("/jsub", &[("f0", "0"), ("new0", "0")]), &[]).await;
    assert_eq!(expect_channels(&r, "listen after room was made")["f0"].payload.len(), 1);
    ng.finish();
}

/// Every martd error, relay mode included, is `{"error":...}` JSON with its status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_martd_error_is_json() {
    let ng = Nginx::start(
        api_conf(
            "        location = /sub-first { martd_listen; martd_listener_concurrency first; }
        location = /sub-max { martd_listen; martd_max_listeners 1; }
        location = /sub-auth { martd_listen; martd_authorized_channels_only on; }
        location = /pub-short { martd_push; martd_max_channel_id_length 4; }
        location = /jpub-short { martd_push json; martd_max_channel_id_length 4; }
        location = /jsub-idlen { martd_listen json; martd_max_channel_id_length 4; }
        location = /pub-big { martd_push; client_max_body_size 0; }
        location = /jpub-big { martd_push json; client_max_body_size 0; }
",
        )
        .http("martd_shm_size 512k;"),
    );
    let w = ng.worker_pids();
    let mut c = Conn::open_on(ng.port, w[0]).await;
    let cases: Vec<(&str, &str, u16)> = vec![
        ("GET", "/pub", 400),
        ("POST", "/pub", 400),
        ("DELETE", "/pub?channel=", 400),
        ("GET", "/sub", 400),
        ("GET", "/jpub", 400),
        ("POST", "/jpub?other=1", 400),
        ("DELETE", "/jpub", 400),
        ("GET", "/pub-short?channel=toolong", 400),
        ("POST", "/jpub-short?channel=toolong", 400),
        ("GET", "/jsub-idlen?toolong=0", 400),
        ("GET", "/pub?channel=missing", 404),
        ("DELETE", "/pub?channel=missing", 404),
        ("GET", "/jpub?channel=missing", 404),
        ("PATCH", "/pub?channel=a", 405),
        ("POST", "/sub?channel=a", 405),
        ("GET", "/sub-auth?channel=missing", 403),
    ];
    for (m, path, status) in cases {
        let r = c.send(m, path, &[], if m == "POST" { "x" } else { "" }).await;
        expect_json_error(&r, status, &format!("{m} {path}"));
        if status == 405 && path.starts_with("/pub") {
            assert_eq!(r.header("allow"), Some("GET, POST, PUT, DELETE"), "Allow of a 405");
        }
    }
    // 409 (concurrency first) and 403 (max listeners) of relay listeners.
    for (loc, status) in [("/sub-first", 409), ("/sub-max", 403)] {
        let first = Conn::open_on(ng.port, w[0]).await.spawn_get(
            &format!("{loc}?channel={status}"),
            &[],
            LONG,
        );
        c.wait_listeners(&status.to_string(), 1).await;
        let (_, r) = promptly(
            Conn::open_on(ng.port, w[1]).await.spawn_get(
                &format!("{loc}?channel={status}"),
                &[],
                LONG,
            ),
            loc,
        )
        .await;
        expect_json_error(&r, status, &format!("second relay listener on {loc}"));
        drop(first);
    }
    // 413: a message larger than the zone could ever hold.
    for loc in ["/pub-big", "/jpub-big"] {
        let r = c.send("POST", &format!("{loc}?channel=huge"), &[], vec![b'z'; 2 << 20]).await;
        expect_json_error(&r, 413, &format!("{loc}: larger than the zone"));
        c = Conn::open_on(ng.port, w[0]).await;
    }
    ng.finish();
}
