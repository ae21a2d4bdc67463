//! Message ids.
//!
//! An id is a `u64`, unique in the whole zone and strictly increasing:
//! `max(previous id + 1, now in microseconds)`. Taking the wall clock as a floor keeps ids
//! increasing across restarts (a new zone starts from the clock, which is past every id the
//! old zone issued unless more than a million messages a second were published or the clock
//! stepped back).

/// A message id.
pub type MsgId = u64;

/// The id that follows `last` at wall-clock time `now_us` (microseconds since the epoch).
pub fn next_id(last: MsgId, now_us: u64) -> MsgId {
    last.saturating_add(1).max(now_us)
}

/// What a listener asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Since {
    /// No ids: the oldest stored message.
    Oldest,
    /// `If-None-Match`: the first message after this id.
    After(MsgId),
    /// `If-Modified-Since` alone: the first message published after this second.
    ModifiedSince(u64),
}

impl Since {
    /// Builds the request from the parsed header values; `If-None-Match` wins when both are
    /// present, malformed values have already been turned into `None` by the parsers.
    pub fn from_headers(etag: Option<MsgId>, modified_since: Option<u64>) -> Since {
        match (etag, modified_since) {
            (Some(id), _) => Since::After(id),
            (None, Some(t)) => Since::ModifiedSince(t),
            (None, None) => Since::Oldest,
        }
    }
}

/// Parses an `If-None-Match` value: `"123"`, `W/"123"` or `123`, surrounded by optional
/// white space. Anything else (lists, `*`, signs, non-digits, overflow) is `None`.
pub fn parse_etag(value: &[u8]) -> Option<MsgId> {
    let v = value.trim_ascii();
    let v = v.strip_prefix(b"W/").unwrap_or(v);
    let v = match v {
        [b'"', inner @ .., b'"'] => inner,
        _ => v,
    };
    if v.is_empty() || v.len() > 20 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |acc, &d| acc.checked_mul(10)?.checked_add(u64::from(d - b'0')))
}

/// Formats an id as the quoted `Etag` value.
pub fn format_etag(id: MsgId) -> String {
    format!("\"{id}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_even_when_the_clock_does_not() {
        assert_eq!(next_id(0, 1_000), 1_000);
        assert_eq!(next_id(1_000, 1_000), 1_001);
        assert_eq!(next_id(5_000, 1_000), 5_001);
        assert_eq!(next_id(u64::MAX, 1), u64::MAX);
    }

    #[test]
    fn etag_forms() {
        assert_eq!(parse_etag(b"\"42\""), Some(42));
        assert_eq!(parse_etag(b"W/\"42\""), Some(42));
        assert_eq!(parse_etag(b" 42 "), Some(42));
        assert_eq!(parse_etag(b"18446744073709551615"), Some(u64::MAX));
        for bad in [
            &b""[..],
            b"\"\"",
            b"-1",
            b"1:",
            b"1:0",
            b"abc",
            b"\"42",
            b"18446744073709551616",
            b"99999999999999999999999",
            b"*",
            b"\"1\", \"2\"",
            b"%31",
            b"+1",
        ] {
            assert_eq!(parse_etag(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(format_etag(7), "\"7\"");
        assert_eq!(parse_etag(format_etag(123456789).as_bytes()), Some(123456789));
    }

    #[test]
    fn since_prefers_etag() {
        assert_eq!(Since::from_headers(Some(3), Some(9)), Since::After(3));
        assert_eq!(Since::from_headers(None, Some(9)), Since::ModifiedSince(9));
        assert_eq!(Since::from_headers(None, None), Since::Oldest);
    }
}
