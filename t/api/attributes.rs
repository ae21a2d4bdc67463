//! Channel attributes on publish: `size` and `life` per channel (query arguments or
//! `X-Martd-*` headers, the argument winning), their upper bounds, and empty pushes.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_per_channel_in_one_location() {
    let ng = Nginx::start(api_conf(""));
    let mut c = Conn::open_probed(ng.port).await;

    // Two channels of the same location, sizes 2 and 4, given on the first push only.
    let mut last = [0u64; 2];
    for i in 1..=5 {
        let a = jpub(&mut c, "sz2", if i == 1 { "size=2" } else { "" }, format!("a{i}")).await;
        let b = jpub(&mut c, "sz4", if i == 1 { "size=4" } else { "" }, format!("b{i}")).await;
        assert!(a.etag > last[0] && b.etag > last[1], "ids not increasing: {a:?} {b:?}");
        last = [a.etag, b.etag];
    }
    assert_eq!(jinfo(&mut c, "sz2").await.map(|i| i.messages), Some(2), "size=2 channel");
    assert_eq!(jinfo(&mut c, "sz4").await.map(|i| i.messages), Some(4), "size=4 channel");
    let r = c.get(&jsub("/jsub", &[("sz2", "0"), ("sz4", "0")]), &[]).await;
    let chans =
        expect_texts(&r, &[("sz2", &["a4", "a5"]), ("sz4", &["b2", "b3", "b4", "b5"])], "etag 0");
    assert_eq!((chans["sz2"].etag, chans["sz4"].etag), (last[0], last[1]), "etags of the batches");

    // An attribute-only push changes the size; the reply names the last message.
    let r = jpub(&mut c, "sz2", "size=3", "").await;
    assert_eq!(r.etag, last[0], "attribute-only push: etag is the channel's last id");
    for i in 6..=8 {
        jpub(&mut c, "sz2", "", format!("a{i}")).await;
    }
    let r = c.get(&jsub("/jsub", &[("sz2", "0")]), &[]).await;
    expect_texts(&r, &[("sz2", &["a6", "a7", "a8"])], "size changed to 3");
    assert_eq!(jinfo(&mut c, "sz4").await.map(|i| i.messages), Some(4), "the other channel kept 4");

    // json mode answers info in JSON whatever the Accept header says.
    let r = c.get("/jpub?channel=sz4", &[("accept", "text/plain")]).await;
    assert_eq!(media_type(&r).as_deref(), Some("application/json"), "{:?}", r.headers);
    assert_eq!(parse_info_json(&r.text()).last_id, Some(last[1]));
    // A channel with no size keeps martd_message_buffer_length (10).
    for i in 1..=12 {
        jpub(&mut c, "szd", "", format!("d{i}")).await;
    }
    assert_eq!(jinfo(&mut c, "szd").await.map(|i| i.messages), Some(10), "default size");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_zero_keeps_nothing_but_delivers_to_waiting() {
    let ng = Nginx::start(api_conf(""));
    let (mut a, b) = Conn::pair(ng.port).await;
    let l = b.spawn_get(&jsub("/jsub", &[("none", "0")]), &[], LONG);
    a.wait_listeners("none", 1).await;
    let r = jpub(&mut a, "none", "size=0", "only now").await;
    assert_eq!(r.listeners, 1, "one listener was waiting: {r:?}");
    let (_, resp) = promptly(l, "listener on a size=0 channel").await;
    let chans = expect_texts(&resp, &[("none", &["only now"])], "size=0 delivery");
    assert_eq!(chans["none"].etag, r.etag, "etag of the delivered message");
    assert_eq!(jinfo(&mut a, "none").await.map(|i| i.messages), Some(0), "size=0 stores nothing");
    let r = within(PROMPT + Duration::from_secs(1), "short listener", async {
        a.get(&jsub("/jsub-short", &[("none", "0")]), &[]).await
    })
    .await;
    expect_empty(&r, "etag 0 on a size=0 channel");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn life_per_channel_in_one_location() {
    let ng = Nginx::start(api_conf(""));
    let mut c = Conn::open_probed(ng.port).await;
    // `short` lives 2 s (set by its first push, kept for the second); `long` has the
    // location's 1 h.
    jpub(&mut c, "short", "life=2", "s1").await;
    jpub(&mut c, "short", "", "s2").await;
    jpub(&mut c, "long", "", "l1").await;
    let started = Instant::now();
    let path = || jsub("/jsub", &[("short", "0"), ("long", "0")]);
    let r = c.get(&path(), &[]).await;
    if started.elapsed() < Duration::from_millis(900) {
        expect_texts(&r, &[("short", &["s1", "s2"]), ("long", &["l1"])], "right after publishing");
    }
    let mut c2 = Conn::open_probed(ng.port).await;
    let chans = until_unlisted(&mut c2, &["short", "long"], "short", Duration::from_secs(10)).await;
    assert_eq!(chans["long"].texts(), ["l1"], "the long-lived message");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "expired after {:?}",
        started.elapsed()
    );
    assert_eq!(jinfo(&mut c, "long").await.map(|i| i.messages), Some(1));
    // The channel keeps its life: a later message expires as well.
    jpub(&mut c, "short", "", "s3").await;
    let chans = until_unlisted(&mut c2, &["short", "long"], "short", Duration::from_secs(10)).await;
    assert_eq!(chans["long"].texts(), ["l1"], "the long-lived message");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_over_buffer_length_max_400() {
    let ng = Nginx::start(api_conf(
        "        location = /jpub20 { martd_push json; martd_message_buffer_length_max 20; }
        location = /pub20 { martd_push; martd_message_buffer_length_max 20; }
",
    ));
    let mut c = Conn::open_probed(ng.port).await;
    for (loc, ok, over) in [("/jpub20", 20, 21), ("/pub20", 20, 21), ("/jpub", 1000, 1001)] {
        let ch = format!("max{}", &loc[1..]);
        let path = pub_target(loc, &ch, &format!("size={over}"));
        let r = c.send("POST", &path, &[], "x").await;
        expect_json_error(&r, 400, &format!("POST {path}"));
        let h = over.to_string();
        let r = c.send("POST", &pub_target(loc, &ch, ""), &[("x-martd-size", &h)], "x").await;
        expect_json_error(&r, 400, &format!("{loc}: X-Martd-Size: {over}"));
        assert!(jinfo(&mut c, &ch).await.is_none(), "{loc}: a refused push created the channel");
        let path = pub_target(loc, &ch, &format!("size={ok}"));
        let r = c.send("POST", &path, &[], "x").await;
        assert!(
            (200..=202).contains(&r.status),
            "POST {path}: size at the maximum refused: {} {}",
            r.status,
            r.text()
        );
        assert_eq!(jinfo(&mut c, &ch).await.map(|i| i.messages), Some(1), "{loc}");
    }
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn life_over_message_timeout_400() {
    let ng = Nginx::start(api_conf(
        "        location = /jpub10 { martd_push json; martd_message_timeout 10s; }
        location = /pub10 { martd_push; martd_message_timeout 10s; }
        location = /jpub-never { martd_push json; martd_message_timeout 0; }
",
    ));
    let mut c = Conn::open_probed(ng.port).await;
    for (loc, ok, bad) in [
        ("/jpub10", &["10", "1"][..], &["11", "0"][..]),
        ("/pub10", &["10"][..], &["11", "0"][..]),
        ("/jpub", &["3600"][..], &["3601", "0"][..]),
        ("/jpub-never", &["0", "100000"][..], &[][..]),
    ] {
        let ch = format!("life{}", &loc[1..]);
        for b in bad {
            let path = pub_target(loc, &ch, &format!("life={b}"));
            let r = c.send("POST", &path, &[], "x").await;
            expect_json_error(&r, 400, &format!("POST {path}"));
            let r = c.send("POST", &pub_target(loc, &ch, ""), &[("x-martd-life", b)], "x").await;
            expect_json_error(&r, 400, &format!("{loc}: X-Martd-Life: {b}"));
        }
        assert!(jinfo(&mut c, &ch).await.is_none(), "{loc}: a refused push created the channel");
        for (i, o) in ok.iter().enumerate() {
            let path = pub_target(loc, &ch, &format!("life={o}"));
            let r = c.send("POST", &path, &[], "x").await;
            assert!(
                (200..=202).contains(&r.status),
                "POST {path}: refused: {} {}",
                r.status,
                r.text()
            );
            assert_eq!(jinfo(&mut c, &ch).await.map(|i| i.messages), Some(i as u64 + 1), "{loc}");
        }
    }
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attributes_from_headers_query_wins() {
    let ng = Nginx::start(api_conf(""));
    let mut c = Conn::open_probed(ng.port).await;
    // Headers alone.
    jpub_h(&mut c, "hdr", "", &[("x-martd-size", "2"), ("x-martd-life", "2")], "h1").await;
    for i in 2..=4 {
        jpub(&mut c, "hdr", "", format!("h{i}")).await;
    }
    assert_eq!(jinfo(&mut c, "hdr").await.map(|i| i.messages), Some(2), "X-Martd-Size: 2");
    // Both: the query argument wins, whichever is larger.
    jpub_h(&mut c, "q2", "size=2", &[("x-martd-size", "5")], "x").await;
    jpub_h(&mut c, "q5", "size=5", &[("x-martd-size", "2")], "x").await;
    for _ in 0..6 {
        jpub(&mut c, "q2", "", "y").await;
        jpub(&mut c, "q5", "", "y").await;
    }
    assert_eq!(jinfo(&mut c, "q2").await.map(|i| i.messages), Some(2), "size=2 over header 5");
    assert_eq!(jinfo(&mut c, "q5").await.map(|i| i.messages), Some(5), "size=5 over header 2");
    // Relay mode takes them too.
    for i in 0..4 {
        let r =
            c.send("POST", "/pub?channel=rhdr", &[("x-martd-size", "3")], format!("r{i}")).await;
        assert!(r.status == 201 || r.status == 202, "relay publish: {} {}", r.status, r.text());
    }
    assert_eq!(jinfo(&mut c, "rhdr").await.map(|i| i.messages), Some(3), "relay X-Martd-Size");
    // X-Martd-Life: 2 took effect too.
    let chans = until_unlisted(&mut c, &["hdr", "q2"], "hdr", Duration::from_secs(10)).await;
    assert!(chans.contains_key("q2"), "size=2 channel");
    // Query life wins over the header's: life=3600 with X-Martd-Life: 1 does not expire soon.
    jpub_h(&mut c, "ql", "life=3600", &[("x-martd-life", "1")], "stays").await;
    sleep_ms(2500).await;
    let r = c.get(&jsub("/jsub", &[("ql", "0")]), &[]).await;
    expect_texts(&r, &[("ql", &["stays"])], "life=3600 over X-Martd-Life: 1");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attribute_only_push_in_json_mode_is_never_delivered() {
    let ng = Nginx::start(api_conf(""));
    let mut p = Conn::open_probed(ng.port).await;
    let json_l = Conn::open_on(ng.port, p.worker()).await.spawn_get(
        &jsub("/jsub", &[("ao", "0")]),
        &[],
        LONG,
    );
    let relay_l = Conn::open_not_on(ng.port, p.worker()).await.listen("ao", None, None);
    p.wait_listeners("ao", 2).await;

    let r = jpub(&mut p, "ao", "size=5", "").await;
    assert_eq!(r.etag, 0, "attribute-only push on a channel with no message: etag \"0\"");
    let r = jpub_h(&mut p, "ao", "", &[("x-martd-life", "60")], "").await;
    assert_eq!(r.etag, 0, "attribute-only push by header");
    let r = jpub(&mut p, "ao", "", "").await;
    assert_eq!(r.etag, 0, "empty push in json mode, no attribute");
    still_waiting(&json_l, 700, "JSON listener after attribute-only pushes").await;
    assert!(!relay_l.is_finished(), "relay listener answered by an attribute-only push");
    let i = jinfo(&mut p, "ao").await.expect("attribute-only pushes create the channel");
    assert_eq!((i.messages, i.listeners, i.last_id), (0, 2, None), "{i:?}");

    let m = jpub(&mut p, "ao", "", "real").await;
    assert_eq!(m.listeners, 2, "{m:?}");
    let (_, r) = promptly(json_l, "JSON listener").await;
    let chans = expect_texts(&r, &[("ao", &["real"])], "the first real message");
    assert_eq!(chans["ao"].etag, m.etag);
    let (_, r) = promptly(relay_l, "relay listener").await;
    assert_eq!(expect_msg(&r).text(), "real");
    let r = jpub(&mut p, "ao", "life=30", "").await;
    assert_eq!(r.etag, m.etag, "attribute-only push: etag is the last message's id");
    let r = p.get(&jsub("/jsub", &[("ao", "0")]), &[]).await;
    expect_texts(&r, &[("ao", &["real"])], "only the real message is stored");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_empty_push_is_a_message_unless_attributes() {
    let ng = Nginx::start(api_conf(""));
    let mut p = Conn::open_probed(ng.port).await;
    let relay_l = Conn::open_probed(ng.port).await.listen("re", None, None);
    let json_l =
        Conn::open_probed(ng.port).await.spawn_get(&jsub("/jsub", &[("re", "0")]), &[], LONG);
    p.wait_listeners("re", 2).await;
    let r = p.send("POST", "/pub?channel=re", &[], "").await;
    assert_eq!(r.status, 201, "relay empty push with listeners: {} {}", r.status, r.text());
    let (_, r) = promptly(relay_l, "relay listener").await;
    let m = expect_msg(&r);
    assert!(m.body.is_empty(), "the empty message: {:?}", m.body);
    let (_, r) = promptly(json_l, "JSON listener").await;
    let chans = expect_texts(&r, &[("re", &[""])], "the empty message to a JSON listener");
    assert_eq!(chans["re"].etag, m.id);
    p.wait_listeners("re", 0).await;

    // With an attribute, an empty relay push only sets it.
    let relay_l = Conn::open_probed(ng.port).await.listen("re", Some(&m.etag), None);
    p.wait_listeners("re", 1).await;
    let r = p.send("POST", "/pub?channel=re&size=3", &[], "").await;
    assert!((200..=202).contains(&r.status), "attribute-only relay push: {}", r.status);
    let r = p.send("POST", "/pub?channel=re", &[("x-martd-life", "60")], "").await;
    assert!((200..=202).contains(&r.status), "attribute-only relay push by header: {}", r.status);
    still_waiting(&relay_l, 700, "relay listener after attribute-only relay pushes").await;
    let i = p.info("re").await.unwrap();
    assert_eq!((i.messages, i.last_id), (1, Some(m.id)), "no message added: {i:?}");
    // The size took effect: 5 more messages, 3 kept.
    for k in 0..5 {
        p.publish("re", format!("m{k}")).await;
    }
    assert_eq!(p.info("re").await.unwrap().messages, 3, "size=3 from the attribute-only push");
    let (_, r) = promptly(relay_l, "relay listener after a real message").await;
    assert_eq!(expect_msg(&r).text(), "m0");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attributes_go_with_the_channel() {
    let ng = Nginx::start(api_conf(
        "        location = /jpub-gc { martd_push json; martd_channel_timeout 1s; }\n",
    ));
    let mut c = Conn::open_probed(ng.port).await;
    // DELETE removes them: the channel made again has the location's size (10).
    jpub(&mut c, "gone", "size=2", "a").await;
    let r = c.send("DELETE", "/jpub?channel=gone", &[], "").await;
    assert_eq!(r.status, 200);
    for i in 0..12 {
        jpub(&mut c, "gone", "", format!("b{i}")).await;
    }
    assert_eq!(jinfo(&mut c, "gone").await.map(|i| i.messages), Some(10), "size after a DELETE");
    // So does the channel's removal when idle (its messages expired, martd_channel_timeout 1s).
    let r = c.send("POST", "/jpub-gc?channel=idle&size=2&life=1", &[], "x").await;
    expect_pub_reply(&r, "publish with a 1 s life");
    let deadline = Instant::now() + Duration::from_secs(15);
    while jinfo(&mut c, "idle").await.is_some() {
        assert!(Instant::now() < deadline, "the idle channel was not removed within 15 s");
        sleep_ms(200).await;
    }
    for i in 0..5 {
        jpub(&mut c, "idle", "", format!("n{i}")).await;
    }
    let i = jinfo(&mut c, "idle").await.unwrap();
    assert_eq!(i.messages, 5, "size after the channel was removed: {i:?}");
    ng.finish();
}
