//! martd protocol helpers: channel info, message ids, HTTP dates.

use super::http::Resp;

/// Channel info as the publisher endpoint reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub messages: u64,
    pub requested: i64,
    pub listeners: u64,
    pub last_id: Option<u64>,
}

/// Parses the text/plain channel info, insisting on the README's exact four lines.
pub fn parse_info_text(s: &str) -> Info {
    // Lines end with "\n" or "\r\n" (the README does not fix the line ending), consistently.
    let eol = if s.contains("\r\n") { "\r\n" } else { "\n" };
    let body = s.strip_suffix(eol).unwrap_or(s);
    let lines: Vec<&str> = body.split(eol).collect();
    assert!(
        lines.iter().all(|l| !l.contains('\r') && !l.contains('\n')),
        "mixed line endings: {s:?}"
    );
    assert_eq!(lines.len(), 4, "channel info is not 4 lines: {s:?}");
    let field = |i: usize, prefix: &str| -> &str {
        lines[i]
            .strip_prefix(prefix)
            .unwrap_or_else(|| panic!("line {} of channel info is not {prefix:?}...: {s:?}", i + 1))
    };
    let messages = field(0, "queued messages: ")
        .parse()
        .unwrap_or_else(|_| panic!("bad queued messages: {s:?}"));
    let requested = field(1, "last requested: ")
        .strip_suffix(" sec. ago")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("bad last requested: {s:?}"));
    let listeners = field(2, "active listeners: ")
        .parse()
        .unwrap_or_else(|_| panic!("bad active listeners: {s:?}"));
    let id = field(3, "last message id:");
    let id = id.strip_prefix(' ').unwrap_or(id);
    let last_id = if id.is_empty() {
        None
    } else {
        Some(id.parse().unwrap_or_else(|_| panic!("bad last message id: {s:?}")))
    };
    Info { messages, requested, listeners, last_id }
}

/// Parses the JSON channel info, insisting on exactly the README's four keys.
pub fn parse_info_json(s: &str) -> Info {
    let v: serde_json::Value =
        serde_json::from_str(s).unwrap_or_else(|e| panic!("channel info is not JSON ({e}): {s:?}"));
    let o = v.as_object().unwrap_or_else(|| panic!("not a JSON object: {s:?}"));
    let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        ["last_message_id", "listeners", "messages", "requested"],
        "JSON channel info keys: {s:?}"
    );
    let id = o["last_message_id"]
        .as_str()
        .unwrap_or_else(|| panic!("last_message_id is not a string: {s:?}"));
    Info {
        messages: o["messages"].as_u64().unwrap_or_else(|| panic!("messages: {s:?}")),
        requested: o["requested"].as_i64().unwrap_or_else(|| panic!("requested: {s:?}")),
        listeners: o["listeners"].as_u64().unwrap_or_else(|| panic!("listeners: {s:?}")),
        last_id: if id.is_empty() {
            None
        } else {
            Some(id.parse().unwrap_or_else(|_| panic!("last_message_id not decimal: {s:?}")))
        },
    }
}

/// A delivered message: a listener's 200.
#[derive(Debug, Clone)]
pub struct Msg {
    pub body: bytes::Bytes,
    /// `Etag` as sent (quoted).
    pub etag: String,
    pub id: u64,
    /// `Last-Modified` as sent.
    pub lm: String,
    pub content_type: Option<String>,
}

impl Msg {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `"123"` -> 123, insisting on the quoted-decimal form.
pub fn parse_etag(e: &str) -> u64 {
    let inner = e
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or_else(|| panic!("Etag not quoted: {e:?}"));
    assert!(
        !inner.is_empty() && inner.bytes().all(|b| b.is_ascii_digit()),
        "Etag not a quoted decimal: {e:?}"
    );
    inner.parse().unwrap_or_else(|_| panic!("Etag overflows u64: {e:?}"))
}

/// Checks a listener's 200 against the README (headers present and well formed).
pub fn expect_msg(r: &Resp) -> Msg {
    assert_eq!(
        r.status,
        200,
        "expected a message, got {} {:?} {:?}",
        r.status,
        r.headers,
        r.text()
    );
    let etag = r.header("etag").unwrap_or_else(|| panic!("200 without Etag: {r:?}")).to_string();
    let id = parse_etag(&etag);
    let lm = r
        .header("last-modified")
        .unwrap_or_else(|| panic!("200 without Last-Modified: {r:?}"))
        .to_string();
    parse_http_date(&lm).unwrap_or_else(|| panic!("Last-Modified not an HTTP date: {lm:?}"));
    assert_eq!(
        r.header("vary"),
        Some("If-None-Match, If-Modified-Since"),
        "Vary of a message: {r:?}"
    );
    Msg {
        body: r.body.clone(),
        etag,
        id,
        lm,
        content_type: r.header("content-type").map(str::to_string),
    }
}

const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
const MONTHS: [&str; 12] =
    ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719468;
    let era = if z >= 0 { z } else { z - 146096 } / 146097;
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// IMF-fixdate for a Unix time.
pub fn fmt_http_date(secs: i64) -> String {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        DAYS[days.rem_euclid(7) as usize],
        d,
        MONTHS[(m - 1) as usize],
        y,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Parses an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
pub fn parse_http_date(s: &str) -> Option<i64> {
    let p: Vec<&str> = s.split(' ').collect();
    if p.len() != 6 || p[5] != "GMT" || !DAYS.contains(&p[0].trim_end_matches(',')) {
        return None;
    }
    let d: i64 = p[1].parse().ok()?;
    let m = MONTHS.iter().position(|x| *x == p[2])? as i64 + 1;
    let y: i64 = p[3].parse().ok()?;
    let t: Vec<i64> = p[4].split(':').map(|x| x.parse().ok()).collect::<Option<_>>()?;
    if t.len() != 3 || !(1..=31).contains(&d) {
        return None;
    }
    Some(days_from_civil(y, m, d) * 86400 + t[0] * 3600 + t[1] * 60 + t[2])
}

pub fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

#[test]
fn http_dates_round_trip() {
    assert_eq!(fmt_http_date(784111777), "Sun, 06 Nov 1994 08:49:37 GMT");
    assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"), Some(784111777));
    assert_eq!(parse_http_date("garbage"), None);
    let now = now_secs();
    assert_eq!(parse_http_date(&fmt_http_date(now)), Some(now));
}

#[test]
fn info_parsers() {
    let i = parse_info_text(
        "queued messages: 2\nlast requested: 3 sec. ago\nactive listeners: 1\nlast message id: 1763759221000123\n",
    );
    assert_eq!(
        i,
        Info { messages: 2, requested: 3, listeners: 1, last_id: Some(1763759221000123) }
    );
    let j = parse_info_json(
        r#"{"messages":2,"requested":3,"listeners":1,"last_message_id":"1763759221000123"}"#,
    );
    assert_eq!(i, j);
    let k = parse_info_text(
        "queued messages: 2\r\nlast requested: 3 sec. ago\r\nactive listeners: 1\r\nlast message id: 1763759221000123\r\n",
    );
    assert_eq!(i, k);
    let e = parse_info_text(
        "queued messages: 0\nlast requested: -1 sec. ago\nactive listeners: 0\nlast message id: ",
    );
    assert_eq!(e.last_id, None);
    assert_eq!(e.requested, -1);
}
