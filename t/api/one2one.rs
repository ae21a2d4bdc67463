//! `one2one` channels: one listener at a time (all workers), the longest-waiting one kept
//! when it is switched on, and a delivered message consumed.

use super::*;

/// A 1 s JSON listener with etag 0 gets nothing: the channel stores no message.
async fn nothing_stored(c: &mut Conn, ch: &str, what: &str) {
    let r = within(
        PROMPT + Duration::from_secs(1),
        what,
        c.get(&jsub("/jsub-short", &[(ch, "0")]), &[]),
    )
    .await;
    expect_empty(&r, what);
    assert_eq!(jinfo(c, ch).await.map(|i| i.messages), Some(0), "{what}: info");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one2one_second_listener_409_across_workers() {
    let ng = Nginx::start(api_conf(""));
    let w = ng.worker_pids();
    let mut p = Conn::open_on(ng.port, w[0]).await;
    let r = jpub(&mut p, "o", "one2one=true", "").await;
    assert_eq!(r.etag, 0);
    let first = listen_on(ng.port, w[0], &jsub("/jsub", &[("o", "0")])).await;
    p.wait_listeners("o", 1).await;
    for (i, pid) in [w[1], w[0], w[1]].into_iter().enumerate() {
        let l = listen_on(ng.port, pid, &jsub("/jsub", &[("o", "0")])).await;
        let (_, r) = promptly(l, &format!("second listener #{i} on worker {pid}")).await;
        expect_json_error(&r, 409, &format!("second listener #{i} on a one2one channel"));
        assert_eq!(r.worker(), pid);
    }
    // A relay listener is a listener too.
    let (_, r) = promptly(
        Conn::open_on(ng.port, w[1]).await.listen("o", None, None),
        "relay listener on a one2one channel",
    )
    .await;
    expect_json_error(&r, 409, "relay listener on a one2one channel with one waiting");
    // A multi-channel listener that includes it too.
    let l = listen_on(ng.port, w[1], &jsub("/jsub", &[("other", "0"), ("o", "0")])).await;
    let (_, r) = promptly(l, "multi-channel listener").await;
    expect_json_error(&r, 409, "multi-channel listener including a busy one2one channel");
    let i = p.wait_listeners("o", 1).await;
    assert_eq!(i.listeners, 1);
    assert!(!first.is_finished(), "the first listener must keep waiting");

    let m = jpub(&mut p, "o", "", "for the first").await;
    assert_eq!(m.listeners, 1);
    let (_, r) = promptly(first, "the one2one listener").await;
    let chans = expect_texts(&r, &[("o", &["for the first"])], "one2one delivery");
    assert_eq!(chans["o"].etag, m.etag);
    assert_eq!(r.worker(), w[0]);
    // Consumed: a new listener with etag 0 does not get it.
    p.wait_listeners("o", 0).await;
    let mut c = Conn::open_on(ng.port, w[1]).await;
    nothing_stored(&mut c, "o", "after delivery to the one2one listener").await;

    // A message published while nobody waits is consumed by the first who takes it.
    let m2 = jpub(&mut p, "o", "", "stored").await;
    assert_eq!(m2.listeners, 0);
    let r = c.get(&jsub("/jsub", &[("o", "0")]), &[]).await;
    expect_texts(&r, &[("o", &["stored"])], "stored message on a one2one channel");
    nothing_stored(&mut c, "o", "after the stored message was taken").await;

    // Switched off again: two listeners wait side by side.
    jpub(&mut p, "o", "one2one=false", "").await;
    let a = listen_on(ng.port, w[0], &jsub("/jsub", &[("o", &m2.etag.to_string())])).await;
    let b = listen_on(ng.port, w[1], &jsub("/jsub", &[("o", &m2.etag.to_string())])).await;
    p.wait_listeners("o", 2).await;
    let m3 = jpub(&mut p, "o", "", "both").await;
    assert_eq!(m3.listeners, 2);
    for l in [a, b] {
        let (_, r) = promptly(l, "listener after one2one=false").await;
        expect_texts(&r, &[("o", &["both"])], "one2one off: broadcast");
    }
    assert_eq!(jinfo(&mut p, "o").await.map(|i| i.messages), Some(1), "kept when not one2one");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one2one_switched_on_keeps_the_longest_waiting() {
    let ng = Nginx::start(api_conf(""));
    let w = ng.worker_pids();
    let mut p = Conn::open_on(ng.port, w[1]).await;
    // Three listeners on two workers, in a known order.
    let oldest = listen_on(ng.port, w[0], &jsub("/jsub", &[("sw", "0")])).await;
    p.wait_listeners("sw", 1).await;
    sleep_ms(50).await;
    let second = listen_on(ng.port, w[1], &jsub("/jsub", &[("sw", "0")])).await;
    p.wait_listeners("sw", 2).await;
    sleep_ms(50).await;
    let third = listen_on(ng.port, w[0], &jsub("/jsub", &[("sw", "0"), ("sw-other", "0")])).await;
    p.wait_listeners("sw", 3).await;

    let r = jpub(&mut p, "sw", "one2one=1", "").await;
    assert_eq!(r.etag, 0, "{r:?}");
    for (l, pid, what) in [(second, w[1], "second"), (third, w[0], "third")] {
        let (_, r) = promptly(l, &format!("{what} listener displaced")).await;
        expect_json_error(&r, 409, &format!("{what} listener when one2one was switched on"));
        assert_eq!(r.worker(), pid);
    }
    p.wait_listeners("sw", 1).await;
    still_waiting(&oldest, 500, "the longest-waiting listener").await;
    assert_eq!(p.info("sw").await.unwrap().listeners, 1);

    let m = jpub(&mut p, "sw", "", "to the oldest").await;
    assert_eq!(m.listeners, 1);
    let (_, r) = promptly(oldest, "the longest-waiting listener").await;
    expect_texts(&r, &[("sw", &["to the oldest"])], "kept listener gets the message");
    assert_eq!(r.worker(), w[0]);
    p.wait_listeners("sw", 0).await;
    nothing_stored(&mut p, "sw", "the message was consumed").await;
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one2one_by_header_and_bad_values() {
    let ng = Nginx::start(api_conf(""));
    let (mut a, b) = Conn::pair(ng.port).await;
    jpub_h(&mut a, "oh", "", &[("x-martd-one2one", "true")], "").await;
    let first = Conn::open_on(ng.port, a.worker()).await.spawn_get(
        &jsub("/jsub", &[("oh", "0")]),
        &[],
        LONG,
    );
    a.wait_listeners("oh", 1).await;
    let (_, r) = promptly(b.spawn_get(&jsub("/jsub", &[("oh", "0")]), &[], LONG), "second").await;
    expect_json_error(&r, 409, "second listener, one2one set by header");
    // The argument wins over the header: one2one=0 with X-Martd-One2one: true switches it off.
    jpub_h(&mut a, "oh", "one2one=0", &[("x-martd-one2one", "true")], "").await;
    let second = Conn::open_not_on(ng.port, a.worker()).await.spawn_get(
        &jsub("/jsub", &[("oh", "0")]),
        &[],
        LONG,
    );
    a.wait_listeners("oh", 2).await;
    jpub(&mut a, "oh", "", "both").await;
    for l in [first, second] {
        let (_, r) = promptly(l, "after one2one=0").await;
        expect_texts(&r, &[("oh", &["both"])], "one2one off");
    }
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one2one_relay_listeners_consume_too() {
    let ng = Nginx::start(api_conf(""));
    let w = ng.worker_pids();
    let mut p = Conn::open_on(ng.port, w[0]).await;
    jpub(&mut p, "or", "one2one=true", "").await;
    // A waiting relay listener gets the message, which is consumed.
    let l = Conn::open_on(ng.port, w[1]).await.listen("or", None, None);
    p.wait_listeners("or", 1).await;
    let m = jpub(&mut p, "or", "", "r1").await;
    assert_eq!(m.listeners, 1);
    let (_, r) = promptly(l, "relay listener of a one2one channel").await;
    assert_eq!(expect_msg(&r).text(), "r1");
    p.wait_listeners("or", 0).await;
    nothing_stored(&mut p, "or", "after delivery to a relay listener").await;
    // Stored messages taken by relay listeners one by one, each consumed.
    jpub(&mut p, "or", "", "r2").await;
    jpub(&mut p, "or", "", "r3").await;
    let mut c = Conn::open_on(ng.port, w[1]).await;
    let r = c.get("/sub?channel=or", &[]).await;
    assert_eq!(expect_msg(&r).text(), "r2");
    let r = c.get("/sub?channel=or", &[]).await;
    assert_eq!(expect_msg(&r).text(), "r3", "r2 was consumed: the oldest is r3");
    nothing_stored(&mut p, "or", "after both stored messages were taken").await;
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one2one_election_in_every_arrangement() {
    let ng = Nginx::start(api_conf(""));
    let w = ng.worker_pids();
    let (a, b) = (w[0], w[1]);
    // Arrival order of the listeners' workers; the first arrival must stay. Some are relay
    // listeners (`true`).
    let arrangements: [&[(u32, bool)]; 5] = [
        &[(b, false), (a, false), (b, false)],
        &[(a, false), (a, false), (b, false), (b, false)],
        &[(b, false), (b, false), (b, false)],
        &[(a, true), (b, false), (a, false)],
        &[(b, false), (a, true), (b, true)],
    ];
    let mut p = Conn::open_on(ng.port, a).await;
    for (k, arr) in arrangements.iter().enumerate() {
        let ch = format!("el{k}");
        let mut ls = Vec::new();
        for (n, (pid, relay)) in arr.iter().enumerate() {
            let c = Conn::open_on(ng.port, *pid).await;
            let l = if *relay {
                c.listen(&ch, None, None)
            } else {
                c.spawn_get(&jsub("/jsub", &[(ch.as_str(), "0")]), &[], LONG)
            };
            ls.push((*pid, *relay, l));
            p.wait_listeners(&ch, n as u64 + 1).await;
            sleep_ms(20).await;
        }
        jpub(&mut p, &ch, "one2one=true", "").await;
        let mut ls = ls.into_iter();
        let (kept_pid, kept_relay, kept) = ls.next().unwrap();
        for (n, (pid, _, l)) in ls.enumerate() {
            let what = format!("arrangement {k}: listener #{} displaced", n + 1);
            let (_, r) = promptly(l, &what).await;
            expect_json_error(&r, 409, &what);
            assert_eq!(r.worker(), pid);
        }
        p.wait_listeners(&ch, 1).await;
        still_waiting(&kept, 300, &format!("arrangement {k}: the first arrival")).await;
        jpub(&mut p, &ch, "", format!("to {k}")).await;
        let (_, r) = promptly(kept, &format!("arrangement {k}: kept listener")).await;
        assert_eq!(r.worker(), kept_pid);
        if kept_relay {
            assert_eq!(expect_msg(&r).text(), format!("to {k}"));
        } else {
            let body = format!("to {k}");
            expect_texts(&r, &[(ch.as_str(), &[body.as_str()])], &format!("arrangement {k}"));
        }
        p.wait_listeners(&ch, 0).await;
        nothing_stored(&mut p, &ch, &format!("arrangement {k}: consumed")).await;
    }
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one2one_consumes_only_its_own_channel_in_a_batch() {
    let ng = Nginx::start(api_conf(""));
    let (mut p, mut c) = Conn::pair(ng.port).await;
    jpub(&mut p, "oa", "one2one=true", "a1").await;
    jpub(&mut p, "oa", "", "a2").await;
    jpub(&mut p, "ob", "", "b1").await;
    let r = c.get(&jsub("/jsub", &[("oa", "0"), ("ob", "0")]), &[]).await;
    expect_texts(&r, &[("oa", &["a1", "a2"]), ("ob", &["b1"])], "a batch from both");
    assert_eq!(jinfo(&mut p, "oa").await.map(|i| i.messages), Some(0), "one2one consumed");
    assert_eq!(jinfo(&mut p, "ob").await.map(|i| i.messages), Some(1), "the other kept");
    let r = c.get(&jsub("/jsub", &[("oa", "0"), ("ob", "0")]), &[]).await;
    expect_texts(&r, &[("ob", &["b1"])], "again: only the ordinary channel");
    // A listener whose etag skips part of the one2one queue takes only what it gets.
    let ids: Vec<u64> = {
        let mut v = Vec::new();
        for b in ["a3", "a4", "a5"] {
            v.push(jpub(&mut p, "oa", "", b).await.etag);
        }
        v
    };
    let r = c.get(&jsub("/jsub", &[("oa", &ids[0].to_string())]), &[]).await;
    expect_texts(&r, &[("oa", &["a4", "a5"])], "newer than a3");
    let i = jinfo(&mut p, "oa").await.unwrap();
    assert!(i.messages <= 1, "a4 and a5 were consumed: {i:?}");
    ng.finish();
}
