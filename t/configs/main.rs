//! martd inside realistic nginx configurations (issue 8): a reload while a publish body is
//! still arriving, a cache zone (cache manager and loader processes), listeners reached through
//! `X-Accel-Redirect`, `error_page`, `try_files` and named locations, listen locations with
//! `mirror`, `limit_req`, `limit_conn`, `realip` and `allow`/`deny`, the access log of a
//! listener whose client went away, TLS and HTTP/2 listeners, and a keep-alive connection whose
//! detached listener timed out and asked again; EventSource streams through the same redirects,
//! subrequests and limits. Real nginx with 2 workers, real sockets; every
//! wait is bounded, and the harness fails a test whose error log has alerts or crashes.

#[path = "../harness/mod.rs"]
mod harness;

mod access_examples;
mod authorize;
mod cache;
mod client_gone;
mod persist;
mod realip;
mod redirect;
mod redis;
mod redis_cluster;
mod reload;
mod stale_handle;
mod streams;
mod subrequest;
mod tls;

use std::time::{Duration, Instant};

use harness::backend::*;
use harness::h2::*;
use harness::*;

/// How soon a woken listener must be answered (its own timeout is far longer).
const PROMPT: Duration = Duration::from_secs(3);

/// A message id newer than any this zone will issue: the listener waits for the next message.
const FUTURE: &str = "\"9000000000000000000\"";

fn assert_status(r: &Resp, status: u16, what: &str) {
    assert_eq!(r.status, status, "{what}: got {} {:?} body {:?}", r.status, r.headers, r.text());
}

fn assert_published(r: &Resp, what: &str) -> Info {
    assert!(r.status == 201 || r.status == 202, "{what}: publish got {} {:?}", r.status, r.text());
    parse_info_text(&r.text())
}

async fn sleep_ms(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// A long-poll of `path` on a new connection served by worker `pid`.
async fn listen_on(port: u16, pid: u32, path: &str, headers: &[(&str, &str)]) -> Pending {
    Conn::open_on(port, pid).await.spawn_get(path, headers, LONG)
}

/// The answer of a woken listener, which must come within [`PROMPT`].
async fn promptly(p: Pending, what: &str) -> (Conn, Resp) {
    within(PROMPT, &format!("{what}: woken listener answered within {PROMPT:?}"), p.conn_resp())
        .await
}

/// Expects the message `body` (a listener's 200), from worker `worker` if given.
fn expect_body(r: &Resp, body: &str, worker: Option<u32>, what: &str) -> Msg {
    assert_eq!(r.status, 200, "{what}: expected a message, got {} {:?}", r.status, r.text());
    let m = expect_msg(r);
    assert_eq!(m.text(), body, "{what}: message body");
    if let Some(w) = worker {
        assert_eq!(r.worker(), w, "{what}: answered by another worker");
    }
    m
}

/// Waits (bounded) until `pred` holds on the file at `path`'s lines that contain `needle`.
async fn wait_log_lines(
    path: &std::path::Path,
    needle: &str,
    what: &str,
    pred: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let read = || -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .map(String::from)
            .collect()
    };
    let deadline = Instant::now() + QUICK;
    loop {
        let lines = read();
        if pred(&lines) {
            return lines;
        }
        if Instant::now() > deadline {
            panic!("{what}: access log {} lines with {needle:?}: {lines:?}", path.display());
        }
        sleep_ms(20).await;
    }
}

/// Exactly one access-log line for `needle` (and still one a little later).
async fn one_log_line(path: &std::path::Path, needle: &str, what: &str) -> String {
    wait_log_lines(path, needle, what, |l| !l.is_empty()).await;
    sleep_ms(300).await;
    let lines = wait_log_lines(path, needle, what, |_| true).await;
    assert_eq!(lines.len(), 1, "{what}: one access-log line per long-poll: {lines:?}");
    lines.into_iter().next().unwrap()
}

/// Listeners on both workers get messages published from the other one, `rounds` times in
/// each direction, within [`PROMPT`].
async fn deliver_both_ways(ng: &Nginx, ch: &str, rounds: usize, what: &str) {
    let w = ng.worker_pids();
    assert_eq!(w.len(), 2, "{what}: workers {w:?}");
    let mut etag: Option<String> = None;
    for round in 0..rounds {
        for (lw, pw) in [(w[0], w[1]), (w[1], w[0])] {
            let mut p = Conn::open_on(ng.port, pw).await;
            let h: Vec<(&str, &str)> =
                etag.as_deref().map(|e| vec![("if-none-match", e)]).unwrap_or_default();
            let l = listen_on(ng.port, lw, &format!("/sub?channel={ch}"), &h).await;
            p.wait_listeners(ch, 1).await;
            let body = format!("{what} round {round}: {pw} -> {lw}");
            let r = p.publish(ch, body.clone()).await;
            assert_status(&r, 201, &format!("{what}: publish with a listener waiting"));
            let (_, r) = promptly(l, &format!("{what}: {pw} -> {lw}")).await;
            etag = Some(expect_body(&r, &body, Some(lw), what).etag);
            p.wait_listeners(ch, 0).await;
        }
    }
}
