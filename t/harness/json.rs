//! JSON helpers for martd's own API (issue 9): strict parsing of its replies, base64, JSONP.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::http::Resp;

/// Parses `body` as JSON, panicking with `what` and the body if it is not.
pub fn parse_json(body: &[u8], what: &str) -> Value {
    serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!("{what}: not valid JSON ({e}): {:?}", String::from_utf8_lossy(body))
    })
}

/// The media type of `Content-Type` (before any `;`), lower-cased.
pub fn media_type(r: &Resp) -> Option<String> {
    r.header("content-type").map(|t| t.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
}

/// Insists on a JSON object with exactly `keys` (in any order).
pub fn object_with_keys<'a>(v: &'a Value, keys: &[&str], what: &str) -> &'a Map<String, Value> {
    let o = v.as_object().unwrap_or_else(|| panic!("{what}: not a JSON object: {v}"));
    let mut got: Vec<&str> = o.keys().map(String::as_str).collect();
    got.sort();
    let mut want = keys.to_vec();
    want.sort();
    assert_eq!(got, want, "{what}: keys of {v}");
    o
}

/// A martd error: `status`, `Content-Type: application/json`, a one-line body
/// `{"error":"reason"}` (and `"channel"` for a 410 of a JSON listener when `channel` is given).
/// Returns the reason.
pub fn expect_json_error(r: &Resp, status: u16, what: &str) -> String {
    assert_eq!(
        r.status,
        status,
        "{what}: expected {status}, got {} {:?} body {:?}",
        r.status,
        r.headers,
        r.text()
    );
    expect_json_error_body(r, what, None)
}

/// Like [`expect_json_error`] for the 410 of a JSON listener: `{"error":..,"channel":NAME}`.
pub fn expect_json_gone(r: &Resp, channel: &str, what: &str) -> String {
    assert_eq!(r.status, 410, "{what}: expected 410, got {} {:?}", r.status, r.text());
    expect_json_error_body(r, what, Some(channel))
}

fn expect_json_error_body(r: &Resp, what: &str, channel: Option<&str>) -> String {
    assert_eq!(
        media_type(r).as_deref(),
        Some("application/json"),
        "{what}: error Content-Type: {:?} body {:?}",
        r.headers,
        r.text()
    );
    let text = r.text();
    let line = text.strip_suffix('\n').unwrap_or(&text);
    assert!(!line.contains('\n'), "{what}: error body is not one line: {text:?}");
    let v = parse_json(&r.body, what);
    let keys: &[&str] = if channel.is_some() { &["channel", "error"] } else { &["error"] };
    let o = object_with_keys(&v, keys, what);
    if let Some(ch) = channel {
        assert_eq!(o["channel"].as_str(), Some(ch), "{what}: channel of {text}");
    }
    let reason =
        o["error"].as_str().unwrap_or_else(|| panic!("{what}: error not a string: {text}"));
    assert!(!reason.trim().is_empty(), "{what}: empty error reason: {text}");
    reason.to_string()
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64, padded.
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Strict standard base64 (padded, no whitespace); `None` if `s` is not exactly that.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if b.len() % 4 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(b.len() / 4 * 3);
    for (ci, chunk) in b.chunks(4).enumerate() {
        let last = ci == b.len() / 4 - 1;
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &chunk[..4 - pad] {
            let v = B64.iter().position(|&x| x == c)? as u32;
            n = (n << 6) | v;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        // Unused bits must be zero (canonical encoding).
        if bytes[3 - pad..].iter().any(|&x| x != 0) {
            return None;
        }
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

/// One item of a JSON listener's `payload`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A JSON string (the message was valid UTF-8).
    Text(String),
    /// `{"base64":"..."}`, decoded.
    Binary(Vec<u8>),
}

impl Item {
    pub fn bytes(&self) -> Vec<u8> {
        match self {
            Item::Text(s) => s.as_bytes().to_vec(),
            Item::Binary(b) => b.clone(),
        }
    }
}

/// One channel of a JSON listener's reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub etag: u64,
    pub payload: Vec<Item>,
}

impl Batch {
    /// The payload as text (binary items lossily).
    pub fn texts(&self) -> Vec<String> {
        self.payload.iter().map(|i| String::from_utf8_lossy(&i.bytes()).into_owned()).collect()
    }
}

/// Parses `{"channels":{NAME:{"etag":"ID","payload":[...]}}}` strictly: exactly those keys,
/// `etag` a decimal string, items strings or `{"base64":...}` objects (standard, padded).
pub fn parse_channels(v: &Value, what: &str) -> BTreeMap<String, Batch> {
    let top = object_with_keys(v, &["channels"], what);
    let chans = top["channels"].as_object().unwrap_or_else(|| panic!("{what}: channels: {v}"));
    let mut out = BTreeMap::new();
    for (name, c) in chans {
        let o = object_with_keys(c, &["etag", "payload"], &format!("{what}: channel {name}"));
        let etag = o["etag"].as_str().unwrap_or_else(|| panic!("{what}: etag not a string: {c}"));
        assert!(
            !etag.is_empty() && etag.bytes().all(|b| b.is_ascii_digit()),
            "{what}: etag of {name} is not decimal: {c}"
        );
        let etag: u64 = etag.parse().unwrap_or_else(|_| panic!("{what}: etag overflows: {c}"));
        let items = o["payload"].as_array().unwrap_or_else(|| panic!("{what}: payload: {c}"));
        let payload = items
            .iter()
            .map(|it| match it {
                Value::String(s) => Item::Text(s.clone()),
                Value::Object(_) => {
                    let o = object_with_keys(it, &["base64"], &format!("{what}: payload item"));
                    let s = o["base64"].as_str().unwrap_or_else(|| panic!("{what}: base64: {it}"));
                    Item::Binary(
                        base64_decode(s)
                            .unwrap_or_else(|| panic!("{what}: not standard padded base64: {s:?}")),
                    )
                }
                _ => panic!("{what}: payload item neither a string nor an object: {it}"),
            })
            .collect();
        out.insert(name.clone(), Batch { etag, payload });
    }
    out
}

/// `NAME(...);` -> `...` (optionally followed by a newline).
pub fn unwrap_jsonp<'a>(body: &'a str, name: &str, what: &str) -> &'a str {
    let b = body.strip_suffix('\n').unwrap_or(body);
    b.strip_prefix(name)
        .and_then(|s| s.strip_prefix('('))
        .and_then(|s| s.strip_suffix(");"))
        .unwrap_or_else(|| panic!("{what}: not {name}(...); : {body:?}"))
}

#[test]
fn base64_round_trip() {
    for (plain, enc) in [
        (&b""[..], ""),
        (b"f", "Zg=="),
        (b"fo", "Zm8="),
        (b"foo", "Zm9v"),
        (b"foob", "Zm9vYg=="),
        (b"\xff\x00\xfe", "/wD+"),
    ] {
        assert_eq!(base64_encode(plain), enc);
        assert_eq!(base64_decode(enc).as_deref(), Some(plain));
    }
    for bad in ["Zg=", "Z===", "Zh==", "Zg==Zg==", "Zm9v\n", "Zm-v"] {
        assert_eq!(base64_decode(bad), None, "{bad:?}");
    }
    let all: Vec<u8> = (0..=255).collect();
    assert_eq!(base64_decode(&base64_encode(&all)), Some(all));
}
