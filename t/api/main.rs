//! martd's own API (issue 9): channel attributes and keys, `martd_listen json`, JSONP,
//! `martd_client_js`, bad input. Real nginx with 2 workers, real sockets; every wait is
//! bounded, and the harness fails a test whose error log has alerts or crashes.

#[allow(unused_imports)]
#[path = "../harness/mod.rs"]
mod harness;

mod attributes;
mod bad_input;
mod client_js;
mod clients;
mod config;
mod cors;
mod events;
mod expire;
mod json_listen;
mod jsonp;
mod keys;
mod lifecycle;
mod linger;
mod one2one;
mod realistic;
mod stats;
mod tokens;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use harness::json::*;
use harness::*;

/// How soon a woken listener (or one refused at once) must be answered.
const PROMPT: Duration = Duration::from_secs(3);

/// The locations most tests use: relay and JSON publishers, relay and JSON listeners (one with
/// a 1 s listener timeout), plus `extra` (more locations or server directives).
fn api_conf(extra: &str) -> Conf {
    Conf::new(&format!(
        "        location = /pub {{ martd_push; }}
        location = /jpub {{ martd_push json; }}
        location = /sub {{ martd_listen; }}
        location = /jsub {{ martd_listen json; }}
        location = /jsub-short {{ martd_listen json; martd_listener_timeout 1s; }}
{extra}"
    ))
}

/// A fresh client id for each JSON listen request.
fn cid() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("c{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// `loc?cid=..&CH=ETAG&...` (names and etags as given, not encoded).
fn jsub(loc: &str, chans: &[(&str, &str)]) -> String {
    let mut s = format!("{loc}?cid={}", cid());
    for (ch, etag) in chans {
        s += &format!("&{ch}={etag}");
    }
    s
}

/// The reply of a `martd_push json` publish: `200 {"etag":"ID","listeners":N}`.
#[derive(Debug, Clone, Copy)]
struct PubReply {
    etag: u64,
    listeners: u64,
}

fn expect_pub_reply(r: &Resp, what: &str) -> PubReply {
    assert_eq!(r.status, 200, "{what}: expected 200, got {} {:?}", r.status, r.text());
    assert_eq!(media_type(r).as_deref(), Some("application/json"), "{what}: {:?}", r.headers);
    let v = parse_json(&r.body, what);
    let o = object_with_keys(&v, &["etag", "listeners"], what);
    let etag = o["etag"].as_str().unwrap_or_else(|| panic!("{what}: etag not a string: {v}"));
    assert!(
        !etag.is_empty() && etag.bytes().all(|b| b.is_ascii_digit()),
        "{what}: etag not decimal: {v}"
    );
    PubReply {
        etag: etag.parse().unwrap_or_else(|_| panic!("{what}: etag overflows: {v}")),
        listeners: o["listeners"].as_u64().unwrap_or_else(|| panic!("{what}: listeners: {v}")),
    }
}

/// `POST /jpub?channel=ch[&args]` with `body`; expects the JSON publish reply.
async fn jpub(c: &mut Conn, ch: &str, args: &str, body: impl Into<bytes::Bytes>) -> PubReply {
    jpub_h(c, ch, args, &[], body).await
}

async fn jpub_h(
    c: &mut Conn,
    ch: &str,
    args: &str,
    headers: &[(&str, &str)],
    body: impl Into<bytes::Bytes>,
) -> PubReply {
    let path = pub_target("/jpub", ch, args);
    let r = c.send("POST", &path, headers, body).await;
    expect_pub_reply(&r, &format!("POST {path}"))
}

fn pub_target(loc: &str, ch: &str, args: &str) -> String {
    if args.is_empty() {
        format!("{loc}?channel={ch}")
    } else {
        format!("{loc}?channel={ch}&{args}")
    }
}

/// JSON channel info from `GET /jpub?channel=ch`; None on 404 (a JSON error).
async fn jinfo(c: &mut Conn, ch: &str) -> Option<Info> {
    let r = c.get(&format!("/jpub?channel={ch}"), &[]).await;
    match r.status {
        404 => {
            expect_json_error(&r, 404, &format!("info of missing channel {ch}"));
            None
        }
        200 => {
            assert_eq!(media_type(&r).as_deref(), Some("application/json"), "{:?}", r.headers);
            Some(parse_info_json(&r.text()))
        }
        s => panic!("info of {ch}: unexpected {s} {}", r.text()),
    }
}

/// Info fields that only a change to the channel moves (not `requested`).
fn state(i: &Option<Info>) -> Option<(u64, u64, Option<u64>)> {
    i.as_ref().map(|i| (i.messages, i.listeners, i.last_id))
}

/// A JSON listener's 200: checks the headers and parses the channels.
fn expect_channels(r: &Resp, what: &str) -> BTreeMap<String, Batch> {
    assert_eq!(
        r.status,
        200,
        "{what}: expected 200, got {} {:?} {:?}",
        r.status,
        r.headers,
        r.text()
    );
    assert_eq!(
        media_type(r).as_deref(),
        Some("application/json"),
        "{what}: Content-Type: {:?}",
        r.headers
    );
    assert_eq!(
        r.header("cache-control"),
        Some("no-store"),
        "{what}: Cache-Control: {:?}",
        r.headers
    );
    let chans = parse_channels(&parse_json(&r.body, what), what);
    for (name, b) in &chans {
        assert!(!b.payload.is_empty(), "{what}: channel {name} listed with no payload");
        for it in &b.payload {
            if let Item::Binary(bytes) = it {
                assert!(
                    std::str::from_utf8(bytes).is_err(),
                    "{what}: valid UTF-8 sent as base64 on {name}: {bytes:?}"
                );
            }
        }
    }
    chans
}

/// Expects exactly these channels with these payloads (as text).
fn expect_texts(r: &Resp, want: &[(&str, &[&str])], what: &str) -> BTreeMap<String, Batch> {
    let chans = expect_channels(r, what);
    let got: BTreeMap<&str, Vec<String>> =
        chans.iter().map(|(k, b)| (k.as_str(), b.texts())).collect();
    let want: BTreeMap<&str, Vec<String>> =
        want.iter().map(|(k, v)| (*k, v.iter().map(|s| s.to_string()).collect())).collect();
    assert_eq!(got, want, "{what}: reply {}", r.text());
    chans
}

/// The 200 `{"channels":{}}` of a timeout, reload or shutdown.
fn expect_empty(r: &Resp, what: &str) {
    let chans = expect_channels(r, what);
    assert!(chans.is_empty(), "{what}: expected no channels, got {}", r.text());
}

/// A long-poll of `path` on a new connection served by worker `pid`.
async fn listen_on(port: u16, pid: u32, path: &str) -> Pending {
    Conn::open_on(port, pid).await.spawn_get(path, &[], LONG)
}

/// The answer of a woken listener, which must come within [`PROMPT`].
async fn promptly(p: Pending, what: &str) -> (Conn, Resp) {
    within(PROMPT, &format!("{what}: answered within {PROMPT:?}"), p.conn_resp()).await
}

/// The pending request is still waiting `ms` later.
async fn still_waiting(p: &Pending, ms: u64, what: &str) {
    sleep_ms(ms).await;
    assert!(!p.is_finished(), "{what}: answered, but it should still be waiting");
}

async fn sleep_ms(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// One request on a raw connection (for bytes hyper will not send); `Connection: close`.
async fn raw_request(port: u16, head: &[u8], body: &[u8]) -> RawResp {
    let mut c = RawConn::open(port).await;
    let mut req = head.to_vec();
    req.extend_from_slice(b"Connection: close\r\n");
    if !body.is_empty() {
        req.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(body);
    c.write(&req).await;
    c.response(QUICK).await
}

/// A [`RawResp`] as a [`Resp`] (for the JSON checks).
fn raw_to_resp(r: RawResp) -> Resp {
    let mut headers = hyper::HeaderMap::new();
    for (k, v) in &r.headers {
        if let (Ok(k), Ok(v)) = (
            hyper::header::HeaderName::from_bytes(k.as_bytes()),
            hyper::header::HeaderValue::from_str(v),
        ) {
            headers.append(k, v);
        }
    }
    Resp { status: r.status, headers, body: r.body.into() }
}

/// Waits (bounded) until `pred` holds.
async fn wait_until(what: &str, limit: Duration, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !pred() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        sleep_ms(50).await;
    }
}

/// Asks `/jsub` for `chans` (etag 0) until `gone` is no longer listed (bounded by `limit`);
/// returns the channels of the last reply.
async fn until_unlisted(
    c: &mut Conn,
    chans: &[&str],
    gone: &str,
    limit: Duration,
) -> BTreeMap<String, Batch> {
    let deadline = Instant::now() + limit;
    let args: Vec<(&str, &str)> = chans.iter().map(|c| (*c, "0")).collect();
    loop {
        let r = c.get(&jsub("/jsub", &args), &[]).await;
        let got = expect_channels(&r, &format!("waiting for {gone} to go"));
        if !got.contains_key(gone) {
            return got;
        }
        assert!(Instant::now() < deadline, "{gone} still listed after {limit:?}: {}", r.text());
        sleep_ms(100).await;
    }
}
