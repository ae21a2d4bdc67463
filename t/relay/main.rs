//! Integration tests of martd against a real nginx with 2 workers. Every test checks a rule of
//! README.md; the harness (t/harness) fails any test whose error log shows alerts or crashes.

#[path = "../harness/mod.rs"]
mod harness;

mod basics;
mod concurrency;
mod config;
mod crash;
mod detach;
mod ids;
mod input;
mod reload;
mod storage;
mod zone;

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
