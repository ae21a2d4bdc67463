//! Integration tests of martd against a real nginx with 2 workers. Every test checks a rule of
//! README.md; the harness (t/harness) fails any test whose error log shows alerts or crashes.

mod harness;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use harness::*;

const ALLOW_ALL: &str = "GET, POST, PUT, DELETE";

fn std_conf() -> Conf {
    Conf::new(&pubsub("", ""))
}

fn sub_path(ch: &str) -> String {
    format!("/sub?channel={ch}")
}

fn pub_path(ch: &str) -> String {
    format!("/pub?channel={ch}")
}

/// Request headers carrying message ids.
fn id_headers<'a>(etag: Option<&'a str>, lm: Option<&'a str>) -> Vec<(&'a str, &'a str)> {
    let mut h = Vec::new();
    if let Some(e) = etag {
        h.push(("if-none-match", e));
    }
    if let Some(l) = lm {
        h.push(("if-modified-since", l));
    }
    h
}

/// A listener request expected to be answered at once with a message.
async fn fetch(c: &mut Conn, path: &str, etag: Option<&str>, lm: Option<&str>) -> Msg {
    let r = c.get(path, &id_headers(etag, lm)).await;
    expect_msg(&r)
}

fn assert_status(r: &Resp, status: u16, what: &str) {
    assert_eq!(r.status, status, "{what}: got {} {:?} body {:?}", r.status, r.headers, r.text());
}

fn assert_published(r: &Resp, status: u16, what: &str) -> Info {
    assert_status(r, status, what);
    assert!(
        r.header("content-type").is_some_and(|t| t.starts_with("text/plain")),
        "{what}: publisher response is not text/plain: {:?}",
        r.headers
    );
    parse_info_text(&r.text())
}

/// A 4xx whose body is a one-line reason.
fn assert_one_line_error(r: &Resp, status: u16, what: &str) {
    assert_status(r, status, what);
    let t = r.text();
    let t = t.strip_suffix('\n').unwrap_or(&t);
    let t = t.strip_suffix('\r').unwrap_or(t);
    assert!(
        !t.trim().is_empty() && !t.contains('\n'),
        "{what}: body is not a one-line reason: {:?}",
        r.text()
    );
}

/// Deterministic pseudo-random bytes.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

async fn sleep_ms(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

// ---------------------------------------------------------------------------------------------
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

// ---------------------------------------------------------------------------------------------
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

// ---------------------------------------------------------------------------------------------
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

// ---------------------------------------------------------------------------------------------
// 3. message ids

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_none_match_and_if_modified_since() {
    let ng = Nginx::start(Conf::new(&format!(
        "{}        location = /subt {{ martd_listen; martd_listener_timeout 1s; }}\n",
        pubsub("", "")
    )));
    let mut c = Conn::open_probed(ng.port).await;
    assert_published(&c.publish("i", "one").await, 202, "m1");
    let m1 = fetch(&mut c, &sub_path("i"), None, None).await;
    assert_eq!(m1.text(), "one");
    // Publish the next ones in a later second than m1.
    let lm1 = parse_http_date(&m1.lm).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while now_secs() <= lm1 {
        assert!(Instant::now() < deadline, "clock did not move past {}", m1.lm);
        sleep_ms(20).await;
    }
    assert_published(&c.publish("i", "two").await, 202, "m2");
    assert_published(&c.publish("i", "three").await, 202, "m3");

    // If-None-Match alone.
    let m2 = fetch(&mut c, &sub_path("i"), Some(&m1.etag), None).await;
    assert_eq!(m2.text(), "two");
    let m3 = fetch(&mut c, &sub_path("i"), Some(&m2.etag), None).await;
    assert_eq!(m3.text(), "three");
    assert!(m1.id < m2.id && m2.id < m3.id);

    // If-Modified-Since alone: the first message published after that second.
    let m = fetch(&mut c, &sub_path("i"), None, Some(&m1.lm)).await;
    assert_eq!(m.text(), "two", "If-Modified-Since = Last-Modified of m1");
    let before = fmt_http_date(lm1 - 10);
    let m = fetch(&mut c, &sub_path("i"), None, Some(&before)).await;
    assert_eq!(m.text(), "one", "If-Modified-Since before every message");

    // Both: If-None-Match decides.
    let future = "Fri, 01 Jan 2100 00:00:00 GMT";
    let m = fetch(&mut c, &sub_path("i"), Some(&m1.etag), Some(future)).await;
    assert_eq!(m.text(), "two", "If-None-Match must win over a future If-Modified-Since");
    let m = fetch(&mut c, &sub_path("i"), Some(&m2.etag), Some(&before)).await;
    assert_eq!(m.text(), "three", "If-None-Match must win over an old If-Modified-Since");

    // Nothing newer: wait (then 304 with the short timeout).
    let r = c.get_long("/subt?channel=i", &[("if-none-match", &m3.etag)], LONG).await;
    assert_status(&r, 304, "If-None-Match of the newest message");
    let r = c.get_long("/subt?channel=i", &[("if-modified-since", future)], LONG).await;
    assert_status(&r, 304, "If-Modified-Since in the future");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_malformed_and_extreme_ids() {
    let ng = Nginx::start(Conf::new(&format!(
        "{}        location = /subt {{ martd_listen; martd_listener_timeout 1s; }}\n",
        pubsub("martd_message_buffer_length 3;", "")
    )));
    let mut c = Conn::open_probed(ng.port).await;
    let mut ids = Vec::new();
    for i in 1..=5 {
        ids.push(c.publish_id(&pub_path("j"), format!("m{i}")).await);
    }
    // m1 and m2 were dropped by the buffer: an id older than every stored one -> oldest stored.
    let m = fetch(&mut c, &sub_path("j"), Some(&format!("\"{}\"", ids[0])), None).await;
    assert_eq!(m.text(), "m3", "id of a dropped message");
    for old in ["\"1\"", "\"0\""] {
        let m = fetch(&mut c, &sub_path("j"), Some(old), None).await;
        assert_eq!(m.text(), "m3", "If-None-Match {old}");
    }
    let m = fetch(&mut c, &sub_path("j"), Some(&format!("\"{}\"", ids[2])), None).await;
    assert_eq!(m.text(), "m4", "id of a stored message -> the next one");

    // Malformed values are treated as absent: the oldest stored message at once.
    let bad_inm = [
        "abc",
        "\"abc\"",
        "\"\"",
        "\"12a\"",
        "1:",
        "\"1:\"",
        "-1",
        "\"-1\"",
        "%22123%22",
        "W/\"x\"",
        "1,2,3",
        "\"1\", \"2\"",
        "\"0x10\"",
        "\"1e5\"",
        "\"+5\"",
        "*",
        "\"",
        "\"\"\"",
        "", // what the README's curl loop sends on its first round
    ];
    for v in bad_inm {
        let r = c.get_long("/subt?channel=j", &[("if-none-match", v)], LONG).await;
        assert_eq!(
            (r.status, r.text().as_str()),
            (200, "m3"),
            "If-None-Match {v:?} must be treated as absent (or as an old id)"
        );
    }
    let bad_ims = [
        "",
        "garbage",
        "Mon, 32 Foo 2020 99:99:99 GMT",
        "0",
        "-1",
        "%20",
        "Sun, 06 Nov 1994 08:49:37",
        "99999999999999999999",
    ];
    for v in bad_ims {
        let r = c.get_long("/subt?channel=j", &[("if-modified-since", v)], LONG).await;
        assert_eq!(
            (r.status, r.text().as_str()),
            (200, "m3"),
            "If-Modified-Since {v:?} must be treated as absent (or as an old time)"
        );
    }
    // Beyond 64 bits (or 63): whether malformed or "in the future", never a crash.
    for v in [
        "99999999999999999999",
        "\"99999999999999999999\"",
        "\"18446744073709551615\"",
        "\"18446744073709551616\"",
        "\"9223372036854775808\"",
        "\"340282366920938463463374607431768211456\"",
    ] {
        let r = c.get_long("/subt?channel=j", &[("if-none-match", v)], LONG).await;
        assert!(
            (r.status == 200 && r.text() == "m3") || r.status == 304,
            "If-None-Match {v:?}: {} {:?}",
            r.status,
            r.text()
        );
    }
    // A valid id newer than anything issued waits (304 after the short timeout).
    let r =
        c.get_long("/subt?channel=j", &[("if-none-match", "\"1000000000000000000\"")], LONG).await;
    assert_status(&r, 304, "future id on /subt");
    // Odd channel ids in the query never crash either.
    for q in ["%ZZ", "%00", "a&channel=b", "%", "%7f%ff"] {
        let _ = c.try_send("GET", &format!("/subt?channel={q}"), &[], "").await;
    }
    let mut c = Conn::open_probed(ng.port).await;
    assert_eq!(fetch(&mut c, &sub_path("j"), None, None).await.text(), "m3");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn future_id_waits_for_next_message() {
    let ng = Nginx::start(std_conf());
    let (mut p, l) = Conn::pair(ng.port).await;
    let last = p.publish_id(&pub_path("f"), "old").await;
    let future = format!("\"{}\"", last + 1_000_000_000_000);
    let l = l.listen("f", Some(&future), None);
    p.wait_listeners("f", 1).await;
    assert!(!l.is_finished(), "a future id must wait");
    let r = p.publish("f", "next").await;
    assert_published(&r, 201, "publish to a listener holding a future id");
    assert_eq!(expect_msg(&l.resp().await).text(), "next");
    ng.finish();
}

// ---------------------------------------------------------------------------------------------
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

// ---------------------------------------------------------------------------------------------
// 5. listener concurrency

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_last_across_workers() {
    let ng = Nginx::start(Conf::new(&pubsub("", "martd_listener_concurrency last;")));
    let (mut a, b) = Conn::pair(ng.port).await;
    let (wa, wb) = (a.worker(), b.worker());
    let old = Conn::open_on(ng.port, wa).await.listen("cl", None, None);
    a.wait_listeners("cl", 1).await;
    let new = b.listen("cl", None, None);
    let r = old.resp().await;
    assert_status(&r, 409, "older listener displaced by a newer one on another worker");
    assert_eq!(r.worker(), wa);
    a.wait_listeners("cl", 1).await;
    assert!(!new.is_finished());
    assert_published(&a.publish("cl", "to the newest").await, 201, "publish");
    let r = new.resp().await;
    assert_eq!(r.worker(), wb);
    assert_eq!(expect_msg(&r).text(), "to the newest");

    // Same worker, other direction.
    let old = Conn::open_on(ng.port, wb).await.listen("cl2", None, None);
    a.wait_listeners("cl2", 1).await;
    let new = Conn::open_on(ng.port, wb).await.listen("cl2", None, None);
    assert_status(&old.resp().await, 409, "displaced on the same worker");
    let new2 = Conn::open_on(ng.port, wa).await.listen("cl2", None, None);
    assert_status(&new.resp().await, 409, "displaced from the other worker");
    a.wait_listeners("cl2", 1).await;
    assert_published(&a.publish("cl2", "last one").await, 201, "publish");
    assert_eq!(expect_msg(&new2.resp().await).text(), "last one");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_first_across_workers() {
    let ng = Nginx::start(Conf::new(&pubsub("", "martd_listener_concurrency first;")));
    let (mut a, b) = Conn::pair(ng.port).await;
    let wa = a.worker();
    let first = Conn::open_on(ng.port, wa).await.listen("cf", None, None);
    a.wait_listeners("cf", 1).await;
    let r = b.listen("cf", None, None).resp().await;
    assert_status(&r, 409, "newcomer on another worker while one waits");
    let r = Conn::open_on(ng.port, wa).await.listen("cf", None, None).resp().await;
    assert_status(&r, 409, "newcomer on the same worker while one waits");
    let i = a.wait_listeners("cf", 1).await;
    assert_eq!(i.listeners, 1);
    assert!(!first.is_finished(), "the first listener must keep waiting");
    assert_published(&a.publish("cf", "first wins").await, 201, "publish");
    let r = first.resp().await;
    assert_eq!(r.worker(), wa);
    assert_eq!(expect_msg(&r).text(), "first wins");
    // Once nobody waits, a newcomer is welcome again.
    a.wait_listeners("cf", 0).await;
    let etag = format!("\"{}\"", a.info("cf").await.unwrap().last_id.unwrap());
    let again = Conn::open_not_on(ng.port, wa).await.listen("cf", Some(&etag), None);
    a.wait_listeners("cf", 1).await;
    assert_published(&a.publish("cf", "again").await, 201, "publish");
    assert_eq!(expect_msg(&again.resp().await).text(), "again");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_broadcast_across_workers() {
    let ng = Nginx::start(Conf::new(&pubsub("", "martd_listener_concurrency broadcast;")));
    let (mut a, b) = Conn::pair(ng.port).await;
    let (wa, wb) = (a.worker(), b.worker());
    drop(b);
    let mut ls = Vec::new();
    for w in [wa, wa, wb, wb, wb] {
        ls.push((w, Conn::open_on(ng.port, w).await.listen("cb", None, None)));
    }
    a.wait_listeners("cb", 5).await;
    assert_published(&a.publish("cb", "everyone").await, 201, "publish");
    for (w, l) in ls {
        let r = l.resp().await;
        assert_eq!(r.worker(), w);
        assert_eq!(expect_msg(&r).text(), "everyone");
    }
    a.wait_listeners("cb", 0).await;
    ng.finish();
}

// ---------------------------------------------------------------------------------------------
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

// ---------------------------------------------------------------------------------------------
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

// ---------------------------------------------------------------------------------------------
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

// ---------------------------------------------------------------------------------------------
// 9. ids

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_strictly_increasing_everywhere() {
    let mut ng = Nginx::start(std_conf());
    let mut all: Vec<u64> = Vec::new();
    let check = |all: &Vec<u64>, new: &[u64], what: &str| {
        let max = all.iter().copied().max().unwrap_or(0);
        assert!(
            new.iter().all(|&i| i > max),
            "{what}: ids {new:?} not above every earlier id (max {max})"
        );
        assert!(new.windows(2).all(|w| w[0] < w[1]), "{what}: {new:?}");
    };

    // Alternating channels and workers.
    let (mut a, mut b) = Conn::pair(ng.port).await;
    let mut new = Vec::new();
    for _ in 0..10 {
        new.push(a.publish_id(&pub_path("ia"), "x").await);
        new.push(b.publish_id(&pub_path("ib"), "y").await);
    }
    check(&all, &new, "alternating");
    all.extend(new);

    // Concurrent publishers on both workers: each sequence increasing, all unique.
    let mut tasks = Vec::new();
    for (mut c, ch) in [(a, "ca"), (b, "cb")] {
        tasks.push(tokio::spawn(async move {
            let mut v = Vec::new();
            for _ in 0..100 {
                v.push(c.publish_id(&pub_path(ch), "z").await);
            }
            v
        }));
    }
    let mut conc = Vec::new();
    for t in tasks {
        let v = within(LONG, "publisher task", t).await.unwrap();
        check(&all, &v, "concurrent");
        conc.extend(v);
    }
    let uniq: HashSet<u64> = conc.iter().copied().collect();
    assert_eq!(uniq.len(), conc.len(), "duplicate ids from concurrent publishers");
    all.extend(conc);

    // After a reload.
    ng.reload();
    let (mut a, mut b) = Conn::pair(ng.port).await;
    let new =
        vec![a.publish_id(&pub_path("ia"), "r").await, b.publish_id(&pub_path("ib"), "r").await];
    check(&all, &new, "after reload");
    all.extend(new);

    // After delete + re-create.
    assert_status(&a.send("DELETE", &pub_path("ia"), &[], "").await, 200, "DELETE");
    let new = vec![b.publish_id(&pub_path("ia"), "again").await];
    check(&all, &new, "after delete");
    assert_eq!(a.info("ia").await.unwrap().messages, 1);
    all.extend(new);

    // After a restart: a new zone.
    drop((a, b));
    ng.restart();
    let (mut a, mut b) = Conn::pair(ng.port).await;
    assert!(a.info("ia").await.is_none(), "a restart must start with an empty zone");
    let new = vec![
        a.publish_id(&pub_path("ia"), "new zone").await,
        b.publish_id(&pub_path("ib"), "new zone").await,
    ];
    check(&all, &new, "after restart");
    ng.finish();
}

// ---------------------------------------------------------------------------------------------
// 10. reload and shutdown

#[test]
fn reload_keeps_messages_and_ends_parked_listeners_quickly() {
    heavy_test(async {
        let mut ng = Nginx::start(std_conf());
        let mut c = Conn::open_probed(ng.port).await;
        for i in 1..=3 {
            c.publish("r", format!("r{i}")).await;
        }
        c.publish("r2", "other").await;
        let mut last = fetch(&mut c, &sub_path("r"), None, None).await;
        for _ in 0..2 {
            last = fetch(&mut c, &sub_path("r"), Some(&last.etag), None).await;
        }
        assert_eq!(last.text(), "r3");

        let conns = Conn::open_many(ng.port, 100).await;
        let per: HashSet<u32> = conns.iter().map(Conn::worker).collect();
        assert_eq!(per.len(), 2, "100 connections all on one worker");
        let ls: Vec<Pending> =
            conns.into_iter().map(|c| c.listen("r", Some(&last.etag), Some(&last.lm))).collect();
        c.wait_listeners("r", 100).await;
        drop(c);

        let took = ng.reload();
        assert!(took < Duration::from_secs(2), "reload with 100 parked listeners took {took:?}");
        for l in ls {
            let r = l.resp().await;
            assert_status(&r, 304, "parked listener at reload");
            assert_eq!(r.header("etag"), Some(last.etag.as_str()));
            assert_eq!(r.header("last-modified"), Some(last.lm.as_str()));
        }

        let (mut a, mut b) = Conn::pair(ng.port).await;
        let i = a.wait_listeners("r", 0).await;
        assert_eq!(i.messages, 3, "stored messages lost at reload");
        assert_eq!(b.info("r2").await.map(|i| i.messages), Some(1));
        let m = fetch(&mut b, &sub_path("r"), None, None).await;
        assert_eq!(m.text(), "r1");
        let m = fetch(&mut a, &sub_path("r"), Some(&m.etag), None).await;
        assert_eq!(m.text(), "r2");
        // Delivery across the new workers works.
        let l = Conn::open_on(ng.port, a.worker()).await.listen("r", Some(&last.etag), None);
        b.wait_listeners("r", 1).await;
        assert_published(&b.publish("r", "r4").await, 201, "publish after reload");
        assert_eq!(expect_msg(&l.resp().await).text(), "r4");
        ng.finish();
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_with_changed_shm_size_takes_new_zone() {
    let mut ng = Nginx::start(std_conf().http("martd_shm_size 8m;"));
    let mut c = Conn::open_probed(ng.port).await;
    c.publish("z", "kept").await;
    ng.reload();
    let mut c = Conn::open_probed(ng.port).await;
    assert_eq!(c.info("z").await.map(|i| i.messages), Some(1), "same size: zone kept");
    let id = c.publish_id(&pub_path("z"), "second").await;
    ng.set_conf(std_conf().http("martd_shm_size 16m;"));
    ng.reload();
    let mut c = Conn::open_probed(ng.port).await;
    assert!(c.info("z").await.is_none(), "changed size: a new, empty zone");
    let id2 = c.publish_id(&pub_path("z"), "new zone").await;
    assert!(id2 > id, "ids after a new zone: {id} then {id2}");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_answers_parked_listeners_304() {
    let mut ng = Nginx::start(std_conf());
    let (mut a, b) = Conn::pair(ng.port).await;
    let id = a.publish_id(&pub_path("g"), "x").await;
    let etag = format!("\"{id}\"");
    let la = Conn::open_on(ng.port, a.worker()).await.listen("g", Some(&etag), None);
    let lb = b.listen("g", Some(&etag), None);
    a.wait_listeners("g", 2).await;
    drop(a);
    let stopped = ng.stop();
    for l in [la, lb] {
        let r = l.resp().await;
        assert_status(&r, 304, "parked listener at graceful shutdown");
        assert_eq!(r.header("etag"), Some(etag.as_str()));
    }
    if let Err(e) = stopped {
        panic!("{e}");
    }
    ng.finish();
}

// ---------------------------------------------------------------------------------------------
// 11. a worker killed

/// Checks publish/listen in both directions between every pair of current workers.
async fn check_all_workers_deliver(ng: &Nginx, ch: &str) {
    let w = ng.worker_pids();
    assert_eq!(w.len(), 2);
    for (lw, pw) in [(w[0], w[1]), (w[1], w[0]), (w[0], w[0])] {
        let mut p = Conn::open_on(ng.port, pw).await;
        let last = p.info(ch).await.and_then(|i| i.last_id);
        let etag = last.map(|i| format!("\"{i}\""));
        let l = Conn::open_on(ng.port, lw).await.listen(ch, etag.as_deref(), None);
        p.wait_listeners(ch, 1).await;
        let body = format!("{pw}->{lw}");
        assert_published(&p.publish(ch, body.clone()).await, 201, "publish");
        let r = l.resp().await;
        assert_eq!(r.worker(), lw);
        assert_eq!(expect_msg(&r).text(), body);
        p.wait_listeners(ch, 0).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_idle_worker_then_everything_works() {
    let mut ng = Nginx::start(std_conf());
    ng.allow_log("exited on signal 9");
    ng.allow_log("was locked by");
    let w = ng.worker_pids();
    let (victim, survivor) = (w[0], w[1]);
    let mut p = Conn::open_on(ng.port, survivor).await;
    let mut dead_ls = Vec::new();
    let mut live_ls = Vec::new();
    for _ in 0..3 {
        dead_ls.push(Conn::open_on(ng.port, victim).await.listen("k", None, None));
        live_ls.push(Conn::open_on(ng.port, survivor).await.listen("k", None, None));
    }
    p.wait_listeners("k", 6).await;

    ng.kill_worker(victim, libc::SIGKILL);
    ng.wait_respawn(victim);
    // The respawned worker removes the dead one's listener counts.
    let i = p.wait_listeners("k", 3).await;
    assert_eq!(i.messages, 0);
    drop(dead_ls);
    assert_published(&p.publish("k", "after kill").await, 201, "publish");
    for l in live_ls {
        assert_eq!(expect_msg(&l.resp().await).text(), "after kill");
    }
    p.wait_listeners("k", 0).await;
    check_all_workers_deliver(&ng, "k").await;
    check_all_workers_deliver(&ng, "k-new").await;
    ng.finish();
}

#[test]
fn sigkill_worker_during_storm() {
    heavy_test(async {
        let mut ng = Nginx::start(std_conf());
        ng.allow_log("exited on signal 9");
        ng.allow_log("was locked by");
        let port = ng.port;
        let stop = Arc::new(AtomicBool::new(false));
        let published = Arc::new(AtomicU64::new(0));
        let received = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for t in 0..3u64 {
            let (stop, published) = (stop.clone(), published.clone());
            tasks.push(tokio::spawn(async move {
                let mut conn: Option<Conn> = None;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if conn.is_none() {
                        conn = Conn::try_open(port).await.ok();
                    }
                    let Some(c) = conn.as_mut() else {
                        sleep_ms(10).await;
                        continue;
                    };
                    n += 1;
                    let body = noise(64 + (n as usize * 37) % 4000, n);
                    let path = pub_path(&format!("s{}", (n + t) % 4));
                    match c.try_send("POST", &path, &[], body).await {
                        Ok(r) if r.status == 201 || r.status == 202 => {
                            published.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => panic!("storm publish got {}: {}", r.status, r.text()),
                        Err(_) => conn = None,
                    }
                }
            }));
        }
        for t in 0..8u64 {
            let (stop, received) = (stop.clone(), received.clone());
            tasks.push(tokio::spawn(async move {
                let mut conn: Option<Conn> = None;
                let mut etag: Option<String> = None;
                let ch = format!("s{}", t % 4);
                while !stop.load(Ordering::Relaxed) {
                    if conn.is_none() {
                        conn = Conn::try_open(port).await.ok();
                    }
                    let Some(c) = conn.as_mut() else {
                        sleep_ms(10).await;
                        continue;
                    };
                    let req = request(
                        "GET",
                        &sub_path(&ch),
                        &id_headers(etag.as_deref(), None),
                        full(""),
                    );
                    match c.try_request(req, Duration::from_secs(2)).await {
                        Ok(r) if r.status == 200 => {
                            etag = r.header("etag").map(str::to_string);
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) if r.status == 304 => {}
                        Ok(r) => panic!("storm listener got {}: {}", r.status, r.text()),
                        Err(_) => conn = None,
                    }
                }
            }));
        }
        let wait_counts = |p: u64, r: u64, what: &'static str| {
            let (published, received) = (published.clone(), received.clone());
            async move {
                let deadline = Instant::now() + Duration::from_secs(30);
                while published.load(Ordering::Relaxed) < p || received.load(Ordering::Relaxed) < r
                {
                    assert!(
                        Instant::now() < deadline,
                        "{what}: storm stalled at {} published / {} received",
                        published.load(Ordering::Relaxed),
                        received.load(Ordering::Relaxed)
                    );
                    sleep_ms(20).await;
                }
            }
        };
        wait_counts(300, 300, "before the kill").await;
        let victim = ng.worker_pids()[0];
        ng.kill_worker(victim, libc::SIGKILL);
        ng.wait_respawn(victim);
        let (p0, r0) = (published.load(Ordering::Relaxed), received.load(Ordering::Relaxed));
        wait_counts(p0 + 300, r0 + 300, "after the kill").await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            within(LONG, "storm task", t).await.expect("storm task panicked");
        }
        // Every storm client is gone: every count back to 0 (dead worker's counts removed).
        let mut c = Conn::open_probed(port).await;
        for s in 0..4 {
            c.wait_listeners(&format!("s{s}"), 0).await;
        }
        check_all_workers_deliver(&ng, "s0").await;
        check_all_workers_deliver(&ng, "after-storm").await;
        ng.finish();
    });
}

// ---------------------------------------------------------------------------------------------
// 12. zone exhaustion

fn is_zone_full_line(l: &str) -> bool {
    let l = l.to_ascii_lowercase();
    l.contains("martd")
        && ["full", "no memory", "out of memory", "exhausted", "507"].iter().any(|k| l.contains(k))
}

/// Publishes 8 KB messages round-robin over `channels` until the zone answers 507.
async fn fill_zone(c: &mut Conn, pub_loc: &str, channels: &[String]) -> usize {
    let body = vec![b'z'; 8192];
    for n in 0..5000 {
        let ch = &channels[n % channels.len()];
        let r = c.send("POST", &format!("{pub_loc}?channel={ch}"), &[], body.clone()).await;
        match r.status {
            507 => return n,
            201 | 202 => {}
            s => panic!("publish {n} while filling the zone: {s} {}", r.text()),
        }
    }
    panic!("a 256k zone took 5000 messages of 8 KB without a 507");
}

/// A 256k zone filled with 8 KB messages (timeout `message_timeout`) on 8 channels named
/// `{prefix}0..7`: the server, a connection, the channels and how many messages fitted.
async fn full_zone(message_timeout: &str, prefix: &str) -> (Nginx, Conn, Vec<String>, usize) {
    let mut ng = Nginx::start(
        Conf::new(&pubsub(
            &format!(
                "martd_message_buffer_length 1000; martd_message_timeout {message_timeout}; \
                 client_body_buffer_size 16k;"
            ),
            "",
        ))
        .http("martd_shm_size 256k;"),
    );
    ng.allow_log_if(is_zone_full_line);
    let mut c = Conn::open_probed(ng.port).await;
    let chans: Vec<String> = (0..8).map(|i| format!("{prefix}{i}")).collect();
    let n = fill_zone(&mut c, "/pub", &chans).await;
    (ng, c, chans, n)
}

#[test]
fn zone_exhaustion_507_then_delete_recovers() {
    heavy_test(async {
        let t0 = Instant::now();
        let (ng, mut c, chans, n1) = full_zone("1h", "full").await;
        assert!(n1 > 0, "not even one message fitted");
        for _ in 0..30 {
            let r = c.send("POST", &pub_path("full0"), &[], vec![b'z'; 8192]).await;
            assert_status(&r, 507, "publish to a full zone");
        }
        let elapsed = t0.elapsed().as_secs();
        let lines = ng.log().lines().filter(|l| is_zone_full_line(l)).count();
        assert!(lines >= 1, "no error-log line says the zone is full\n{}", ng.log_tail(20));
        assert!(
            lines as u64 <= 2 * (elapsed + 2),
            "{lines} zone-full lines in {elapsed}s: more than one per second per worker"
        );
        // Listeners still get what is stored; a small message still fails.
        assert_eq!(fetch(&mut c, &sub_path("full1"), None, None).await.body.len(), 8192);

        for ch in &chans {
            assert_status(&c.send("DELETE", &pub_path(ch), &[], "").await, 200, "DELETE");
        }
        assert_published(&c.publish("after", "works").await, 202, "publish after delete");
        assert_status(&c.send("DELETE", &pub_path("after"), &[], "").await, 200, "DELETE");
        let n2 = fill_zone(&mut c, "/pub", &chans).await;
        assert!(
            n2 * 4 >= n1 * 3,
            "memory not recovered after DELETE: {n1} messages fitted at first, {n2} after"
        );
        ng.finish();
    });
}

#[test]
fn zone_exhaustion_then_expiry_recovers() {
    heavy_test(async {
        let (ng, mut c, _chans, n1) = full_zone("2s", "exp").await;
        assert!(n1 > 0);
        // Publishing works again once the messages expired (on a channel never used before).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = c.send("POST", &pub_path("fresh"), &[], vec![b'y'; 8192]).await;
            if r.status == 202 {
                break;
            }
            assert_status(&r, 507, "publish while full");
            assert!(Instant::now() < deadline, "zone still full long after the messages expired");
            sleep_ms(250).await;
        }
        let i = c.info("exp0").await;
        assert!(i.as_ref().is_none_or(|i| i.messages == 0), "expired messages still queued: {i:?}");
        ng.finish();
    });
}

// ---------------------------------------------------------------------------------------------
// 13. aborted listeners

#[test]
fn abort_thousand_parked_listeners() {
    heavy_test(async {
        let ng = Nginx::start(std_conf());
        let mut c = Conn::open_probed(ng.port).await;
        let mut etag: Option<String> = None;
        for round in 0..2 {
            let conns = Conn::open_many(ng.port, 1000).await;
            let mut per: HashMap<u32, usize> = HashMap::new();
            for x in &conns {
                *per.entry(x.worker()).or_default() += 1;
            }
            assert_eq!(per.len(), 2, "1000 connections on one worker: {per:?}");
            let ls: Vec<Pending> =
                conns.into_iter().map(|x| x.listen("ab", etag.as_deref(), None)).collect();
            c.wait_info("ab", "1000 listeners", |i| i.is_some_and(|i| i.listeners == 1000)).await;
            assert!(ls.iter().all(|l| !l.is_finished()));
            drop(ls);
            c.wait_listeners("ab", 0).await;
            // Nobody is left waiting anywhere: a publish finds no listener.
            let r = c.publish("ab", format!("round {round}")).await;
            assert_published(&r, 202, "publish after every listener aborted");
            let m = fetch(&mut c, &sub_path("ab"), etag.as_deref(), None).await;
            assert_eq!(m.text(), format!("round {round}"));
            etag = Some(m.etag);
        }
        check_all_workers_deliver(&ng, "ab2").await;
        ng.finish();
    });
}

// ---------------------------------------------------------------------------------------------
// 14. bad input

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_empty_channel_id_400() {
    let ng = Nginx::start(std_conf());
    let mut c = Conn::open_probed(ng.port).await;
    for path in
        ["/pub", "/pub?channel=", "/pub?other=1", "/sub", "/sub?channel=", "/sub?x=&channel="]
    {
        let r = c.get(path, &[]).await;
        assert_one_line_error(&r, 400, &format!("GET {path}"));
    }
    for path in ["/pub", "/pub?channel="] {
        let r = c.send("POST", path, &[], "body").await;
        assert_one_line_error(&r, 400, &format!("POST {path}"));
        let r = c.send("DELETE", path, &[], "").await;
        assert_one_line_error(&r, 400, &format!("DELETE {path}"));
    }
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_id_length_limit() {
    let ng = Nginx::start(Conf::new(&format!(
        "        martd_max_channel_id_length 16;\n{}        location = /pubd {{ martd_push; martd_max_channel_id_length 1024; }}\n",
        pubsub("", "")
    )));
    let mut c = Conn::open_probed(ng.port).await;
    let ok = "a".repeat(16);
    let long = "a".repeat(17);
    assert_published(&c.publish(&ok, "fits").await, 202, "16-byte id");
    assert_one_line_error(&c.publish(&long, "x").await, 400, "17-byte id on publish");
    assert_one_line_error(&c.get(&sub_path(&long), &[]).await, 400, "17-byte id on listen");
    assert_one_line_error(&c.get(&pub_path(&long), &[]).await, 400, "17-byte id on info");
    assert_eq!(fetch(&mut c, &sub_path(&ok), None, None).await.text(), "fits");
    let ok = "b".repeat(1024);
    let long = "b".repeat(1025);
    let r = c.send("POST", &format!("/pubd?channel={ok}"), &[], "k").await;
    assert_status(&r, 202, "1024-byte id");
    let r = c.send("POST", &format!("/pubd?channel={long}"), &[], "k").await;
    assert_one_line_error(&r, 400, "1025-byte id");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_client_max_body_size_413() {
    let ng = Nginx::start(Conf::new(&pubsub("client_max_body_size 1k;", "")));
    let mut c = Conn::open_probed(ng.port).await;
    let r = c.send("POST", &pub_path("big"), &[], vec![b'x'; 2000]).await;
    assert_status(&r, 413, "body over client_max_body_size");
    let mut c = Conn::open_probed(ng.port).await;
    let chunks: Vec<Bytes> = (0..4).map(|_| Bytes::from(vec![b'y'; 600])).collect();
    let r = c
        .try_request(request("POST", &pub_path("big"), &[], chunked(chunks)), QUICK)
        .await
        .expect("chunked POST");
    assert_status(&r, 413, "chunked body over client_max_body_size");
    let mut c = Conn::open_probed(ng.port).await;
    assert!(c.info("big").await.is_none_or(|i| i.messages == 0), "a refused body was stored");
    assert_published(&c.publish("big", vec![b'x'; 1000]).await, 202, "body under the limit");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_larger_than_the_zone_413_without_unlimited_allocation() {
    // No nginx limit on the body: martd itself refuses what no zone could hold, before any
    // allocation of the body's size, and the worker lives on.
    let ng = Nginx::start(
        Conf::new(&pubsub("client_max_body_size 0; client_body_buffer_size 16k;", ""))
            .http("martd_shm_size 512k;"),
    );
    let mut c = Conn::open_probed(ng.port).await;
    let before = ng.worker_pids();
    let r = c.send("POST", &pub_path("huge"), &[], vec![b'z'; 3 << 20]).await;
    assert_one_line_error(&r, 413, "body larger than the zone");
    let mut c = Conn::open_probed(ng.port).await;
    assert_published(&c.publish("huge", vec![b'x'; 1000]).await, 202, "a small body after");
    assert_eq!(ng.worker_pids(), before, "a worker was replaced");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_listeners_across_workers_403() {
    let ng = Nginx::start(Conf::new(&pubsub("", "martd_max_listeners 1;")));
    let (mut a, b) = Conn::pair(ng.port).await;
    let first = Conn::open_on(ng.port, a.worker()).await.listen("ml", None, None);
    a.wait_listeners("ml", 1).await;
    let r = b.listen("ml", None, None).resp().await;
    assert_status(&r, 403, "second listener on another worker");
    let r = Conn::open_on(ng.port, a.worker()).await.listen("ml", None, None).resp().await;
    assert_status(&r, 403, "second listener on the same worker");
    a.wait_listeners("ml", 1).await;
    assert_published(&a.publish("ml", "one").await, 201, "publish");
    let m = expect_msg(&first.resp().await);
    // The slot is free again.
    a.wait_listeners("ml", 0).await;
    let again = Conn::open_not_on(ng.port, a.worker()).await.listen("ml", Some(&m.etag), None);
    a.wait_listeners("ml", 1).await;
    assert_published(&a.publish("ml", "two").await, 201, "publish");
    assert_eq!(expect_msg(&again.resp().await).text(), "two");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorized_channels_only() {
    let ng = Nginx::start(Conf::new(&pubsub("", "martd_authorized_channels_only on;")));
    let (mut a, mut b) = Conn::pair(ng.port).await;
    assert_status(&b.get(&sub_path("unk"), &[]).await, 403, "unknown channel");
    assert!(a.info("unk").await.is_none(), "a refused listener created the channel");
    a.publish("auth", "hi").await;
    let m = fetch(&mut b, &sub_path("auth"), None, None).await;
    assert_eq!(m.text(), "hi");
    let l = Conn::open_on(ng.port, b.worker()).await.listen("auth", Some(&m.etag), None);
    a.wait_listeners("auth", 1).await;
    assert_published(&a.publish("auth", "next").await, 201, "publish");
    assert_eq!(expect_msg(&l.resp().await).text(), "next");
    assert_status(&a.send("DELETE", &pub_path("auth"), &[], "").await, 200, "DELETE");
    assert_status(&b.get(&sub_path("auth"), &[]).await, 403, "removed channel");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_body_is_a_message() {
    let ng = Nginx::start(std_conf());
    let (mut a, b) = Conn::pair(ng.port).await;
    let r = a.send("POST", &pub_path("e"), &[], "").await;
    assert_eq!(assert_published(&r, 202, "empty publish").messages, 1);
    let (b, r) = b.listen("e", None, None).conn_resp().await;
    let m = expect_msg(&r);
    assert!(m.body.is_empty());
    let l = b.listen("e", Some(&m.etag), None);
    a.wait_listeners("e", 1).await;
    assert_published(&a.send("PUT", &pub_path("e"), &[], "").await, 201, "empty PUT");
    let m2 = expect_msg(&l.resp().await);
    assert!(m2.body.is_empty() && m2.id > m.id);
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_spooled_body_intact() {
    let ng = Nginx::start(Conf::new(&pubsub(
        "client_body_buffer_size 8k; client_max_body_size 4m;",
        "",
    )));
    let (mut a, mut b) = Conn::pair(ng.port).await;
    let big = noise(1 << 20, 7);
    let ct = "application/octet-stream";
    let r = a.send("POST", &pub_path("big"), &[("content-type", ct)], big.clone()).await;
    assert_published(&r, 202, "1 MB publish");
    let m = fetch(&mut b, &sub_path("big"), None, None).await;
    assert_eq!(m.body.len(), big.len());
    assert!(m.body == big, "1 MB body corrupted");
    assert_eq!(m.content_type.as_deref(), Some(ct));

    // To a waiting listener on the other worker, chunked, by PUT.
    let big2 = noise((1 << 20) + 12345, 8);
    let l = Conn::open_on(ng.port, b.worker()).await.listen("big", Some(&m.etag), None);
    a.wait_listeners("big", 1).await;
    let chunks: Vec<Bytes> = big2.chunks(100_000).map(Bytes::copy_from_slice).collect();
    let r = a
        .try_request(request("PUT", &pub_path("big"), &[], chunked(chunks)), QUICK)
        .await
        .expect("chunked PUT");
    assert_published(&r, 201, "chunked 1 MB PUT");
    let m2 = expect_msg(&l.resp().await);
    assert!(m2.body == big2, "chunked 1 MB body corrupted ({} bytes)", m2.body.len());
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_type_and_odd_channel_ids() {
    let ng = Nginx::start(std_conf());
    let mut c = Conn::open_probed(ng.port).await;
    let long_ct = format!("application/x-{}", "t".repeat(2000));
    for (i, ct) in ["application/vnd.martd+json; charset=utf-8", "text/html", long_ct.as_str()]
        .into_iter()
        .enumerate()
    {
        let ch = format!("ct{i}");
        c.send("POST", &pub_path(&ch), &[("content-type", ct)], "<b>x</b>").await;
        let m = fetch(&mut c, &sub_path(&ch), None, None).await;
        assert_eq!(m.content_type.as_deref(), Some(ct), "Content-Type not preserved");
    }
    let odd = ["%00", "a%0d%0ab", "..", "%2e%2e", "%C3%A9", "%FF%FE", "a/b", "ALL", "*", "a%20b"];
    for (i, ch) in odd.iter().enumerate() {
        let r = c.publish(ch, format!("odd {i}")).await;
        assert_published(&r, 202, &format!("publish to {ch:?}"));
    }
    for (i, ch) in odd.iter().enumerate() {
        let m = fetch(&mut c, &sub_path(ch), None, None).await;
        assert_eq!(m.text(), format!("odd {i}"), "channel {ch:?}");
        assert_eq!(c.info(ch).await.map(|i| i.messages), Some(1), "channel {ch:?}");
    }
    ng.finish();
}

// ---------------------------------------------------------------------------------------------
// 15. bad configuration

fn assert_emerg_at(e: &ConfigError, needle: &str, mentions: &[&str]) {
    assert!(e.stderr.contains("[emerg]"), "no [emerg] for {needle:?}: {}", e.stderr);
    let line = e.stderr.lines().find(|l| l.contains("[emerg]")).unwrap().to_string();
    assert!(
        line.ends_with(&e.location_of(needle)),
        "emerg does not point at the directive ({}): {line}",
        e.location_of(needle)
    );
    for m in mentions {
        assert!(line.contains(m), "emerg does not mention {m:?}: {line}");
    }
}

#[test]
fn bad_config_shm_size() {
    for size in ["1k", "255k", "0", "abc"] {
        let d = format!("martd_shm_size {size};");
        let e = expect_config_error(&std_conf().http(&d));
        assert_emerg_at(&e, &d, &["martd_shm_size"]);
    }
    expect_config_ok(&std_conf().http("martd_shm_size 256k;"));
}

#[test]
fn bad_config_values_rejected() {
    let cases: &[(&str, &str, &[&str])] = &[
        // nginx's enum slot names the value, not the directive.
        ("martd_listener_concurrency bogus;", "server", &["bogus"]),
        ("martd_store_messages maybe;", "server", &["maybe", "martd_store_messages"]),
        ("martd_authorized_channels_only 2;", "server", &["martd_authorized_channels_only"]),
        ("martd_detach_listeners sometimes;", "server", &["martd_detach_listeners"]),
        ("martd_message_buffer_length -1;", "server", &["martd_message_buffer_length"]),
        ("martd_message_buffer_length many;", "server", &["martd_message_buffer_length"]),
        ("martd_max_listeners x;", "server", &["martd_max_listeners"]),
        ("martd_max_channel_id_length ten;", "server", &["martd_max_channel_id_length"]),
        ("martd_listener_timeout forever;", "server", &["martd_listener_timeout"]),
        ("martd_message_timeout soon;", "server", &["martd_message_timeout"]),
        ("martd_channel_timeout later;", "server", &["martd_channel_timeout"]),
        ("martd_channel_id;", "server", &["martd_channel_id"]),
        ("martd_channel_id a b;", "server", &["martd_channel_id"]),
        ("martd_shm_size 1m;", "server", &["martd_shm_size"]),
        ("martd_push on;", "location", &["martd_push"]),
        ("martd_listen 1;", "location", &["martd_listen"]),
        ("martd_push;", "server", &["martd_push"]),
        ("martd_shm_size 1m; martd_shm_size 2m;", "http", &["martd_shm_size"]),
    ];
    for (directive, ctx, mentions) in cases {
        let conf = match *ctx {
            "http" => std_conf().http(directive),
            "server" => Conf::new(&format!("        {directive}\n{}", pubsub("", ""))),
            _ => Conf::new(&format!("        location = /bad {{ {directive} }}\n")),
        };
        let e = expect_config_error(&conf);
        assert_emerg_at(&e, directive, mentions);
    }
}

#[test]
fn good_config_every_directive_at_every_level() {
    let all = "martd_channel_id $arg_channel; martd_message_buffer_length 5; \
               martd_message_timeout 10m; martd_store_messages on; martd_listener_timeout 30s; \
               martd_listener_concurrency last; martd_max_channel_id_length 64; \
               martd_max_listeners 10; martd_authorized_channels_only off; martd_channel_timeout 1m; \
               martd_detach_listeners off;";
    let conf = Conf::new(&format!("        {all}\n{}", pubsub(all, all)))
        .http(&format!("martd_shm_size 1m; {all}"));
    expect_config_ok(&conf);
    for zero in [
        "martd_message_buffer_length 0;",
        "martd_message_timeout 0;",
        "martd_listener_timeout 0;",
        "martd_max_listeners 0;",
        "martd_listener_concurrency first;",
        "martd_listener_concurrency broadcast;",
        "martd_store_messages off;",
    ] {
        expect_config_ok(&Conf::new(&pubsub(zero, zero)));
    }
}

// ---------------------------------------------------------------------------------------------
// 16. detached listeners (plain HTTP/1.x keep-alive listeners give their request back to nginx)

/// A publisher connection, and a listener on `ch` on a connection of its own that the zone
/// already counts as waiting.
async fn publisher_and_waiting(port: u16, ch: &str, etag: Option<&str>) -> (Conn, Pending) {
    let mut p = Conn::open_probed(port).await;
    let l = Conn::open_probed(port).await.listen(ch, etag, None);
    p.wait_listeners(ch, 1).await;
    (p, l)
}

/// Resident memory of the workers, in bytes.
fn workers_rss(ng: &Nginx) -> u64 {
    ng.worker_pids()
        .iter()
        .map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            let kb: u64 = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap();
            kb * 1024
        })
        .sum()
}

/// Worker memory per waiting listener (connection included), fresh server, `n` listeners,
/// over TLS when `tls` has (CA certificate, certificate, key). Half of them then close their connection,
/// and the other half get a message.
async fn bytes_per_listener(
    sub_extra: &str,
    n: usize,
    tls: Option<&(PathBuf, PathBuf, PathBuf)>,
) -> u64 {
    let tls_port = free_port();
    let tls_conf = tls.map_or(String::new(), |(_, cert, key)| {
        format!(
            "        listen 127.0.0.1:{tls_port} ssl reuseport;\n        ssl_certificate {};\n        ssl_certificate_key {};\n",
            cert.display(),
            key.display()
        )
    });
    let ng = Nginx::start(Conf::new(&format!("{tls_conf}{}", pubsub("", sub_extra))));
    let mut c = Conn::open_probed(ng.port).await;
    let before = workers_rss(&ng);
    let conns = match tls {
        None => Conn::open_many(ng.port, n).await,
        Some((ca, _, _)) => {
            let connector = connector(ca);
            let mut conns = Vec::with_capacity(n);
            while conns.len() < n {
                let mut set = tokio::task::JoinSet::new();
                for _ in 0..(n - conns.len()).min(50) {
                    let connector = connector.clone();
                    set.spawn(async move { Conn::try_open_tls(tls_port, &connector).await });
                }
                while let Some(r) = set.join_next().await {
                    conns.push(r.unwrap().expect("TLS connection"));
                }
            }
            conns
        }
    };
    let mut ls: Vec<Pending> = conns.into_iter().map(|x| x.listen("mem", None, None)).collect();
    c.wait_listeners("mem", n as u64).await;
    let grown = workers_rss(&ng).saturating_sub(before);
    ls.truncate(n / 2);
    c.wait_listeners("mem", (n / 2) as u64).await;
    let r = c.publish("mem", "to all").await;
    assert_published(&r, 201, "publish to the waiting listeners");
    for l in ls {
        assert_eq!(expect_msg(&l.resp().await).text(), "to all");
    }
    ng.finish();
    grown / n as u64
}

#[test]
fn detached_listeners_hold_a_tenth_of_a_parked_request() {
    heavy_test(async {
        let n = 2000;
        let detached = bytes_per_listener("", n, None).await;
        let parked = bytes_per_listener("martd_detach_listeners off;", n, None).await;
        eprintln!("worker memory per listener: detached {detached} B, parked request {parked} B");
        assert!(
            detached * 4 < parked && detached < 4096,
            "detached listeners use {detached} B each, parked requests {parked} B"
        );
    });
}

#[test]
fn tls_listeners_detach_too() {
    heavy_test(async {
        let dir = tempfile::tempdir().unwrap();
        let certs = make_cert(dir.path());
        let n = 1000;
        let detached = bytes_per_listener("", n, Some(&certs)).await;
        let parked = bytes_per_listener("martd_detach_listeners off;", n, Some(&certs)).await;
        eprintln!("worker memory per TLS listener: detached {detached} B, parked {parked} B");
        // TLS state stays with the connection either way; the request goes.
        assert!(
            detached + 4096 < parked,
            "detached TLS listeners use {detached} B each, parked requests {parked} B"
        );

        // Taken over from nginx's keep-alive state: keepalive_timeout 1s does not end it.
        let tls_port = free_port();
        let (ca, cert, key) = &certs;
        let ng = Nginx::start(Conf::new(&format!(
            "        listen 127.0.0.1:{tls_port} ssl;\n        ssl_certificate {};\n        ssl_certificate_key {};\n{}",
            cert.display(),
            key.display(),
            pubsub("", "martd_listener_timeout 2s; keepalive_timeout 1s;")
        )));
        let tls = connector(ca);
        let c = Conn::try_open_tls(tls_port, &tls).await.unwrap();
        let started = Instant::now();
        let (c, r) = c.listen("tka", Some("\"1\""), None).conn_resp().await;
        assert_status(&r, 304, "TLS listener timeout");
        assert!(started.elapsed() >= Duration::from_millis(1900), "after {:?}", started.elapsed());
        let l = c.listen("tka", Some("\"1\""), None);
        let mut p = Conn::open_probed(ng.port).await;
        p.wait_listeners("tka", 1).await;
        p.publish("tka", "over tls").await;
        assert_eq!(expect_msg(&l.resp().await).text(), "over tls");
        ng.finish();
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_listener_outlives_keepalive_timeout() {
    // The connection is taken over from nginx's keep-alive state: its 1 s keep-alive timeout
    // does not apply, the 3 s listener timeout does.
    let ng =
        Nginx::start(Conf::new(&pubsub("", "martd_listener_timeout 3s; keepalive_timeout 1s;")));
    let c = Conn::open_probed(ng.port).await;
    let started = Instant::now();
    let (c, r) = c.listen("ka", Some("\"1\""), None).conn_resp().await;
    assert_status(&r, 304, "detached listener timeout");
    assert_eq!(r.header("etag"), Some("\"1\""));
    assert!(
        started.elapsed() >= Duration::from_millis(2900),
        "answered after {:?}",
        started.elapsed()
    );
    // The same connection serves the next long-poll, which a message answers.
    let l = c.listen("ka", Some("\"1\""), None);
    let mut p = Conn::open_probed(ng.port).await;
    p.wait_listeners("ka", 1).await;
    p.publish("ka", "after keepalive").await;
    assert_eq!(expect_msg(&l.resp().await).text(), "after keepalive");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_detached_listener_skips_access_phases() {
    // One request a minute per address: the long-poll passes limit_req once, when it parks.
    let ng = Nginx::start(
        Conf::new(&pubsub("", "limit_req zone=one; limit_req_status 429;"))
            .http("limit_req_zone $binary_remote_addr zone=one:1m rate=1r/m;"),
    );
    let (mut p, l) = publisher_and_waiting(ng.port, "lr", None).await;
    let r = p.publish("lr", "once").await;
    assert_published(&r, 201, "publish");
    assert_eq!(expect_msg(&l.resp().await).text(), "once");
    // limit_req is in force for new requests.
    let r = p.get(&sub_path("lr"), &[]).await;
    assert_status(&r, 429, "second long-poll within the minute");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_conn_still_caps_waiting_listeners() {
    let ng = Nginx::start(
        Conf::new(&pubsub("", "limit_conn addr 1;"))
            .http("limit_conn_zone $binary_remote_addr zone=addr:1m;"),
    );
    let (mut p, l) = publisher_and_waiting(ng.port, "lc", None).await;
    let r = p.get(&sub_path("lc"), &[]).await;
    assert_status(&r, 503, "a second waiting long-poll from the same address");
    p.publish("lc", "one").await;
    assert_eq!(expect_msg(&l.resp().await).text(), "one");
    // The slot is free again once the first one is answered.
    let r = p.get(&sub_path("lc"), &[]).await;
    assert_eq!(expect_msg(&r).text(), "one");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_listener_access_log_one_line_when_answered() {
    let ng = Nginx::start(
        Conf::new(&pubsub("", "access_log logs/listen.log brief;"))
            .http("log_format brief '$status $request $connection_requests';"),
    );
    let log = ng.prefix().join("logs/listen.log");
    let (mut p, l) = publisher_and_waiting(ng.port, "al", Some("\"1\"")).await;
    p.publish("al", "logged").await;
    let (c, r) = l.conn_resp().await;
    assert_eq!(expect_msg(&r).text(), "logged");
    drop(c);
    let lines: Vec<String> = within(QUICK, "access log line", async {
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<String> =
                text.lines().filter(|l| l.contains("/sub?channel=al")).map(String::from).collect();
            if !lines.is_empty() {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = std::fs::read_to_string(&log).unwrap();
    let all: Vec<&str> = text.lines().filter(|l| l.contains("/sub?channel=al")).collect();
    assert_eq!(all.len(), 1, "one access log line per long-poll: {all:?} (first seen {lines:?})");
    // Second request on its connection (after the probe), logged with the answer's status.
    assert_eq!(all[0], "200 GET /sub?channel=al HTTP/1.1 2");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_sent_while_detached_is_answered_after_it() {
    let ng = Nginx::start(std_conf());
    let mut p = Conn::open_probed(ng.port).await;
    let mut raw = RawConn::open(ng.port).await;
    raw.write(b"GET /sub?channel=pl HTTP/1.1\r\nHost: t\r\nIf-None-Match: \"1\"\r\n\r\n").await;
    p.wait_listeners("pl", 1).await;
    // A second request on the same connection while the first waits (HTTP/1.1 pipelining).
    raw.write(b"GET /__worker HTTP/1.1\r\nHost: t\r\n\r\n").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = p.publish("pl", "first").await;
    assert_published(&r, 201, "publish");
    let first = raw.response(QUICK).await;
    assert_eq!((first.status, first.body.as_slice()), (200, &b"first"[..]));
    let second = raw.response(QUICK).await;
    assert_eq!(second.status, 204, "the pipelined request is answered after the long-poll");
    // Then the connection is a normal keep-alive connection.
    raw.write(b"GET /sub?channel=pl HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert_eq!(raw.response(QUICK).await.body, b"first");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_that_cannot_detach_still_wait() {
    // HTTP/1.0 without keep-alive, a request with a body and `martd_detach_listeners off`
    // wait as nginx requests; HTTP/1.0 keep-alive and a request that arrived in two pieces
    // detach. Every one gets the message.
    let ng = Nginx::start(Conf::new(&format!(
        "{}        location = /sub-parked {{ martd_listen; martd_detach_listeners off; }}\n",
        pubsub("", "")
    )));
    let mut p = Conn::open_probed(ng.port).await;
    let mut http10 = RawConn::open(ng.port).await;
    http10.write(b"GET /sub?channel=nd HTTP/1.0\r\n\r\n").await;
    let mut keepalive10 = RawConn::open(ng.port).await;
    keepalive10.write(b"GET /sub?channel=nd HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").await;
    let mut split = RawConn::open(ng.port).await;
    split.write(b"GET /sub?channel=nd HTTP/1.1\r\nHo").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    split.write(b"st: t\r\n\r\n").await;
    let mut with_body = RawConn::open(ng.port).await;
    with_body
        .write(b"GET /sub?channel=nd HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi")
        .await;
    let off = Conn::open_probed(ng.port).await.spawn_get("/sub-parked?channel=nd", &[], LONG);
    p.wait_listeners("nd", 5).await;
    let r = p.publish("nd", "all five").await;
    assert_published(&r, 201, "publish");
    for (what, raw) in [
        ("HTTP/1.0", &mut http10),
        ("HTTP/1.0 keep-alive", &mut keepalive10),
        ("split request", &mut split),
        ("request with a body", &mut with_body),
    ] {
        let r = raw.response(QUICK).await;
        assert_eq!((r.status, r.body.as_slice()), (200, &b"all five"[..]), "{what}");
    }
    assert!(http10.closed_within(QUICK).await, "HTTP/1.0 connection not closed");
    assert_eq!(expect_msg(&off.resp().await).text(), "all five");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_gone_while_detached_leaves() {
    let ng = Nginx::start(std_conf());
    let mut p = Conn::open_probed(ng.port).await;
    let mut raws = Vec::new();
    for _ in 0..20 {
        let mut raw = RawConn::open(ng.port).await;
        raw.write(b"GET /sub?channel=gone HTTP/1.1\r\nHost: t\r\nIf-None-Match: \"1\"\r\n\r\n")
            .await;
        raws.push(raw);
    }
    p.wait_listeners("gone", 20).await;
    // Five of the leavers send another request first: unread data must not hide the close.
    for raw in &mut raws[5..10] {
        raw.write(b"GET /__worker HTTP/1.1\r\nHost: t\r\n\r\n").await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    raws.truncate(5);
    p.wait_listeners("gone", 5).await;
    let r = p.publish("gone", "to five").await;
    assert_eq!(parse_info_text(&r.text()).listeners, 5, "listeners counted at publish");
    for raw in &mut raws {
        assert_eq!(raw.response(QUICK).await.body, b"to five");
    }
    ng.finish();
}

#[test]
fn detached_listener_churn_with_timeouts_aborts_and_a_reload() {
    // 400 listeners on 8 channels with a 1 s listener timeout, a publisher every 20 ms, a third
    // of the listeners dropping their connection at random moments, and a reload in the
    // middle: every long-poll ends with a message, a 304 or the client's own abort, and the
    // listener counts end at zero everywhere.
    heavy_test(async {
        let mut ng = Nginx::start(Conf::new(&pubsub("", "martd_listener_timeout 1s;")));
        let port = ng.port;
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for t in 0..400u64 {
            let (stop, answers) = (stop.clone(), answers.clone());
            tasks.push(tokio::spawn(async move {
                let ch = format!("churn{}", t % 8);
                let mut etag: Option<String> = None;
                let mut n = t;
                while !stop.load(Ordering::Relaxed) {
                    let Ok(c) = Conn::try_open(port).await else {
                        sleep_ms(20).await;
                        continue;
                    };
                    n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let pending = c.listen(&ch, etag.as_deref(), None);
                    if t % 3 == 0 {
                        // Abort after 0–1.2 s: before or after the timeout or a message.
                        sleep_ms((n >> 33) % 1200).await;
                        if !pending.is_finished() {
                            drop(pending);
                            continue;
                        }
                    }
                    let r = pending.resp().await;
                    match r.status {
                        200 => etag = r.header("etag").map(String::from),
                        304 => {}
                        s => panic!("churn listener got {s}: {}", r.text()),
                    }
                    answers.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        let mut p = Conn::open_probed(port).await;
        let t0 = Instant::now();
        let mut reloaded = false;
        let mut n = 0u64;
        while t0.elapsed() < Duration::from_secs(4) {
            n += 1;
            let r = p.publish(&format!("churn{}", n % 8), format!("m{n}")).await;
            assert!(r.status == 201 || r.status == 202, "publish got {}", r.status);
            if !reloaded && t0.elapsed() > Duration::from_secs(2) {
                ng.reload();
                reloaded = true;
                p = Conn::open_probed(port).await;
            }
            sleep_ms(20).await;
        }
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            within(LONG, "churn listener task", t).await.unwrap();
        }
        assert!(answers.load(Ordering::Relaxed) > 400, "too few answers");
        let mut c = Conn::open_probed(port).await;
        for i in 0..8 {
            c.wait_listeners(&format!("churn{i}"), 0).await;
        }
        check_all_workers_deliver(&ng, "churn-after").await;
        ng.finish();
    });
}
