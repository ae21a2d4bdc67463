//! Long-poll and interval-poll of a channel list (`martd_channel_id_delimiter`): one message
//! per request, the oldest newer than the request's id on any channel, named by
//! `X-Martd-Channel`; its `Etag` asks for the next.

use std::collections::{BTreeMap, BTreeSet};

use super::*;

fn list_conf(main: &str) -> Conf {
    let mut c = conf(
        "        location = /lp { martd_listen; martd_channel_id $arg_chs;
                         martd_channel_id_delimiter \"|\"; martd_max_channels_per_request 4; }
        location = /lp-short { martd_listen; martd_channel_id $arg_chs;
                               martd_channel_id_delimiter \"|\"; martd_listener_timeout 1s; }
        location = /lp-held { martd_listen; martd_channel_id $arg_chs;
                              martd_channel_id_delimiter \"|\"; martd_detach_listeners off; }
        location = /ip { martd_listen interval; martd_channel_id $arg_chs;
                         martd_channel_id_delimiter \"|\"; martd_max_channels_per_request 4; }",
    );
    c.main = main.to_string();
    c
}

/// Publishes `body` on `ch` with `content_type`; its message id.
async fn publish_as(c: &mut Conn, ch: &str, content_type: &str, body: &str) -> u64 {
    let r = c
        .send(
            "POST",
            &format!("/pub?channel={ch}"),
            &[("content-type", content_type), ("accept", "application/json")],
            body.to_string(),
        )
        .await;
    assert!(r.status == 201 || r.status == 202, "publish: {} {}", r.status, r.text());
    parse_info_json(&r.text()).last_id.expect("an id")
}

/// `If-None-Match` with `id`, or nothing.
fn after(id: Option<u64>) -> Vec<(&'static str, String)> {
    id.map(|id| ("If-None-Match", format!("\"{id}\""))).into_iter().collect()
}

async fn get_after(c: &mut Conn, path: &str, id: Option<u64>) -> Resp {
    let h = after(id);
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    c.get_long(path, &h, LONG).await
}

/// A `200` of a channel list: (channel, id, body).
fn message(r: &Resp) -> (String, u64, String) {
    assert_eq!(r.status, 200, "{}", r.text());
    let ch = r.header("X-Martd-Channel").expect("X-Martd-Channel").to_string();
    let etag = r.header("Etag").expect("Etag").trim_matches('"').parse().expect("id");
    (ch, etag, r.text())
}

/// A long-poll of `path` with `If-None-Match: id`, from a new connection on worker `pid`.
async fn park_on(port: u16, pid: u32, path: &str, id: Option<u64>) -> Pending {
    let h = after(id);
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Conn::open_on(port, pid).await.spawn_get(path, &h, LONG)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_message_comes_as_a_long_poll_answers_it_with_its_channel() {
    let ng = Nginx::start(list_conf(""));
    let mut c = Conn::open(ng.port).await;
    let b = publish_as(&mut c, "lb", "text/x-b", "from b").await;
    let a = publish_as(&mut c, "la", "application/json", "{\"a\":1}").await;
    let cc = publish_as(&mut c, "lc", "text/plain", "from c").await;
    let mut id = None;
    let mut got = Vec::new();
    for _ in 0..3 {
        let r = get_after(&mut c, "/lp?chs=la|lb|lc", id).await;
        let m = message(&r);
        assert!(r.header("Last-Modified").is_some(), "Last-Modified");
        got.push((m.0.clone(), m.1, m.2.clone(), r.header("Content-Type").map(str::to_string)));
        id = Some(m.1);
    }
    let want = vec![
        ("lb".to_string(), b, "from b".to_string(), Some("text/x-b".to_string())),
        ("la".to_string(), a, "{\"a\":1}".to_string(), Some("application/json".to_string())),
        ("lc".to_string(), cc, "from c".to_string(), Some("text/plain".to_string())),
    ];
    assert_eq!(got, want);
    // The same from the interval-poll, then 304 echoing the id.
    let r = get_after(&mut c, "/ip?chs=lc|la|lb", Some(b)).await;
    assert_eq!(message(&r), ("la".to_string(), a, "{\"a\":1}".to_string()));
    let r = get_after(&mut c, "/ip?chs=lc|la|lb", Some(cc)).await;
    assert_eq!(r.status, 304, "{}", r.text());
    assert_eq!(r.header("Etag"), Some(format!("\"{cc}\"").as_str()));
    // An interval-poll counts no listener.
    assert_eq!(c.info("la").await.expect("la").listeners, 0);
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_poll_is_304_until_a_channel_gets_a_message() {
    let ng = Nginx::start(list_conf(""));
    let mut c = Conn::open(ng.port).await;
    let r = c.get("/ip?chs=ia|ib", &[]).await;
    assert_eq!(r.status, 304, "{}", r.text());
    let id = publish(&mut c, "ib", "b1").await;
    let r = c.get("/ip?chs=ia|ib", &[]).await;
    assert_eq!(message(&r), ("ib".to_string(), id, "b1".to_string()));
    let r = get_after(&mut c, "/ip?chs=ia|ib", Some(id)).await;
    assert_eq!(r.status, 304);
    ng.finish();
}

/// 200 messages published alternately on 3 channels from both workers, while a client
/// long-polls them one by one with the last `Etag`, on both workers: each comes once, in
/// publish order per channel, ids increasing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_by_etag_loses_and_repeats_nothing_across_workers() {
    let ng = Nginx::start(list_conf(""));
    let w = ng.worker_pids();
    let chans = ["ra", "rb", "rc"];
    let mut pubs = Vec::new();
    for (k, &pid) in w.iter().enumerate() {
        let mut c = Conn::open_on(ng.port, pid).await;
        pubs.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            for i in 0..100usize {
                let ch = chans[(i + k) % 3];
                let body = format!("{ch}:{k}:{i}");
                sent.push((publish(&mut c, ch, body.clone()).await, ch, body));
                if i % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            sent
        }));
    }
    let mut conns = [Conn::open_on(ng.port, w[0]).await, Conn::open_on(ng.port, w[1]).await];
    let mut id = None;
    let mut got: Vec<(String, u64, String)> = Vec::new();
    while got.len() < 200 {
        let c = &mut conns[got.len() % 2];
        let m = message(
            &within(PROMPT, "the next message", get_after(c, "/lp?chs=ra|rb|rc", id)).await,
        );
        id = Some(m.1);
        got.push(m);
    }
    let mut sent = Vec::new();
    for p in pubs {
        sent.extend(p.await.expect("publisher"));
    }
    sent.sort();
    let ids: Vec<u64> = got.iter().map(|m| m.1).collect();
    assert!(ids.windows(2).all(|p| p[0] < p[1]), "ids increasing");
    let want: Vec<(String, u64, String)> =
        sent.iter().map(|(id, ch, b)| (ch.to_string(), *id, b.clone())).collect();
    assert_eq!(got, want, "every message once, in id order");
    // Per channel, per publisher: in publish order.
    let mut per: BTreeMap<(String, String), Vec<usize>> = BTreeMap::new();
    for (ch, _, body) in &got {
        let mut parts = body.split(':');
        let (_, k, i) = (parts.next(), parts.next().expect("k"), parts.next().expect("i"));
        per.entry((ch.clone(), k.to_string())).or_default().push(i.parse().expect("i"));
    }
    assert!(per.values().all(|v| v.windows(2).all(|p| p[0] < p[1])), "{per:?}");
    // Nothing newer: the next long-poll waits, and no listener is left behind by the walk.
    let r = get_after(&mut conns[0], "/lp-short?chs=ra|rb|rc", id).await;
    assert_eq!(r.status, 304);
    for ch in chans {
        conns[1].wait_listeners(ch, 0).await;
    }
    ng.finish();
}

/// Several channels get messages at once while the list waits: each long-poll takes the
/// oldest, and the next (with its `Etag`) the next one, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_list_woken_by_a_burst_on_every_channel_takes_them_in_order() {
    let ng = Nginx::start(list_conf(""));
    let w = ng.worker_pids();
    let mut p = Conn::open_on(ng.port, w[1]).await;
    let mut last = publish(&mut p, "ba", "before").await;
    for round in 0..5 {
        let l = park_on(ng.port, w[round % 2], "/lp?chs=ba|bb|bc", Some(last)).await;
        for ch in ["ba", "bb", "bc"] {
            p.wait_listeners(ch, 1).await;
        }
        let mut tasks = Vec::new();
        for (k, ch) in ["bc", "bb", "ba"].into_iter().enumerate() {
            let mut c = Conn::open_on(ng.port, w[k % 2]).await;
            tasks.push(tokio::spawn(
                async move { publish(&mut c, ch, format!("{ch}{round}")).await },
            ));
        }
        let mut ids = BTreeSet::new();
        for t in tasks {
            ids.insert(t.await.expect("publisher"));
        }
        let (mut c, r) = within(PROMPT, "woken", l.conn_resp()).await;
        // Whatever part of the burst was published when it was woken, the oldest of the burst
        // came first; the rest follow, each once, in id order.
        let mut seen = vec![message(&r).1];
        loop {
            let r = get_after(&mut c, "/lp-short?chs=ba|bb|bc", seen.last().copied()).await;
            if r.status == 304 {
                break;
            }
            seen.push(message(&r).1);
        }
        assert_eq!(seen, ids.iter().copied().collect::<Vec<_>>(), "round {round}");
        last = seen[2];
    }
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_list_is_woken_by_its_second_channel_from_the_other_worker() {
    let ng = Nginx::start(list_conf(""));
    let w = ng.worker_pids();
    let mut p = Conn::open_on(ng.port, w[1]).await;
    let old = publish(&mut p, "wa", "old").await;
    for path in ["/lp?chs=wa|wb", "/lp-held?chs=wa|wb"] {
        let l = park_on(ng.port, w[0], path, Some(old)).await;
        for ch in ["wa", "wb"] {
            p.wait_listeners(ch, 1).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!l.is_finished(), "{path}: nothing newer yet");
        let id = publish(&mut p, "wb", format!("to wb {path}")).await;
        let (_, r) = within(PROMPT, "woken from the other worker", l.conn_resp()).await;
        assert_eq!(message(&r), ("wb".to_string(), id, format!("to wb {path}")));
        assert_eq!(r.worker(), w[0]);
        // It left both channels.
        p.wait_listeners("wa", 0).await;
        p.wait_listeners("wb", 0).await;
        p.send("DELETE", "/pub?channel=wb", &[], bytes::Bytes::new()).await;
    }
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_timeout_is_304_and_a_deleted_channel_410() {
    let ng = Nginx::start(list_conf(""));
    let mut c = Conn::open(ng.port).await;
    let id = publish(&mut c, "ta", "x").await;
    let started = std::time::Instant::now();
    let r = get_after(&mut c, "/lp-short?chs=ta|tb", Some(id)).await;
    assert_eq!(r.status, 304, "{}", r.text());
    assert_eq!(r.header("Etag"), Some(format!("\"{id}\"").as_str()));
    assert!(started.elapsed() >= Duration::from_millis(900), "{:?}", started.elapsed());
    c.wait_listeners("ta", 0).await;
    // A channel of the list is deleted while it waits: 410 naming it; it left the other.
    let l = Conn::open(ng.port).await.spawn_get(
        "/lp?chs=ta|tb",
        &[("If-None-Match", &format!("\"{id}\""))],
        LONG,
    );
    c.wait_listeners("ta", 1).await;
    c.wait_listeners("tb", 1).await;
    let r = c.send("DELETE", "/pub?channel=tb", &[], bytes::Bytes::new()).await;
    assert_eq!(r.status, 200);
    let (_, r) = within(PROMPT, "410", l.conn_resp()).await;
    assert_eq!(r.status, 410, "{}", r.text());
    assert_eq!(r.header("X-Martd-Channel"), Some("tb"));
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON");
    assert_eq!(v["channel"], "tb");
    c.wait_listeners("ta", 0).await;
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_lists_get_400_with_a_reason() {
    let ng = Nginx::start(list_conf(""));
    let mut c = Conn::open(ng.port).await;
    for path in ["/lp", "/ip"] {
        for (chs, why) in [
            ("a||b", "empty channel id"),
            ("a|b|a", "twice"),
            ("a|b|c|d|e", "more than 4 channels"),
            ("a|", "empty channel id"),
        ] {
            let r = c.get(&format!("{path}?chs={chs}"), &[]).await;
            assert_eq!(r.status, 400, "{path}?chs={chs}: {}", r.text());
            assert!(r.text().contains(why), "{path}?chs={chs}: {}", r.text());
        }
    }
    // Nothing was counted anywhere.
    assert!(c.info("a").await.is_none_or(|i| i.listeners == 0));
    ng.finish();
}

/// With debug logging: a list's long-poll on a keep-alive HTTP/1.1 connection detaches (and its
/// connection serves the next one); with `martd_detach_listeners off` it is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_list_detaches_on_keep_alive_or_is_held() {
    let ng = Nginx::start(list_conf("error_log logs/debug.log debug;"));
    let log_path = ng.prefix().join("logs/debug.log");
    let count = |what: &str| {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        log.lines().filter(|l| l.contains(what)).count()
    };
    let mut p = Conn::open(ng.port).await;
    let l = Conn::open(ng.port).await.spawn_get("/lp?chs=da|db", &[], LONG);
    p.wait_listeners("db", 1).await;
    let debug = std::fs::read_to_string(&log_path).unwrap_or_default().contains("[debug]");
    if debug {
        wait_for_log_in(&log_path, "martd: parked multi-channel listener #", "(detaching)").await;
        assert_eq!(count("waits without its request"), 1);
    } else {
        eprintln!("nginx has no debug logging: detaching not observable, delivery still checked");
    }
    let id = publish(&mut p, "db", "to db").await;
    let (c, r) = within(PROMPT, "detached list", l.conn_resp()).await;
    assert_eq!(message(&r), ("db".to_string(), id, "to db".to_string()));
    // The same connection waits again (detached again) and is answered from the other channel.
    let inm = format!("\"{id}\"");
    let l = c.spawn_get("/lp?chs=da|db", &[("If-None-Match", &inm)], LONG);
    p.wait_listeners("da", 1).await;
    if debug {
        wait_until_count(&count, "waits without its request", 2).await;
    }
    let id2 = publish(&mut p, "da", "to da").await;
    let (mut c, r) = within(PROMPT, "second detached list", l.conn_resp()).await;
    assert_eq!(message(&r), ("da".to_string(), id2, "to da".to_string()));
    assert_eq!(c.get("/__worker", &[]).await.status, 204);
    // Held: the request stays an nginx request.
    let l = Conn::open(ng.port).await.spawn_get(
        "/lp-held?chs=da|db",
        &[("If-None-Match", &format!("\"{id2}\""))],
        LONG,
    );
    p.wait_listeners("db", 1).await;
    if debug {
        wait_for_log_in(&log_path, "martd: parked multi-channel listener #", "(held)").await;
        assert_eq!(count("waits without its request"), 2, "not detached");
    }
    let id3 = publish(&mut p, "db", "held").await;
    let (_, r) = within(PROMPT, "held list", l.conn_resp()).await;
    assert_eq!(message(&r), ("db".to_string(), id3, "held".to_string()));
    ng.finish();
}

async fn wait_for_log_in(path: &std::path::Path, a: &str, b: &str) {
    let deadline = std::time::Instant::now() + QUICK;
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.lines().any(|l| l.contains(a) && l.contains(b)) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{a} {b}: not logged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_until_count(count: &impl Fn(&str) -> usize, what: &str, n: usize) {
    let deadline = std::time::Instant::now() + QUICK;
    while count(what) < n {
        assert!(std::time::Instant::now() < deadline, "{what}: {} of {n}", count(what));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
