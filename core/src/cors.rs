//! Cross-origin requests (`martd_allow_origin`): which origins may use a location, and the
//! headers a preflight may ask for.

/// What `martd_allow_origin`'s value says about a request's `Origin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No cross-origin handling: the value is empty or `off`, or the request has no `Origin`.
    Off,
    /// The origin may use the location: its responses carry it in
    /// `Access-Control-Allow-Origin`.
    Allowed,
    /// The origin may not: `403`.
    Refused,
}

/// Judges `origin` (the request's `Origin` header, if any) against `allowed`, the evaluated
/// `martd_allow_origin`: `*` (any origin), or origins separated by spaces or commas, each
/// compared whole and ignoring ASCII case (`https://app.example:8443`).
pub fn judge(allowed: &[u8], origin: Option<&[u8]>) -> Verdict {
    let allowed = allowed.trim_ascii();
    if allowed.is_empty() || allowed.eq_ignore_ascii_case(b"off") {
        return Verdict::Off;
    }
    let Some(origin) = origin.map(<[u8]>::trim_ascii) else {
        return Verdict::Off;
    };
    let listed = allowed
        .split(|&b| b == b' ' || b == b',' || b == b'\t')
        .filter(|o| !o.is_empty())
        .any(|o| o == b"*" || o.eq_ignore_ascii_case(origin));
    // `null` (sandboxed frames, `file:` pages) only when listed as such, never by `*`.
    if origin.eq_ignore_ascii_case(b"null") {
        let named = allowed.split(|&b| b == b' ' || b == b',').any(|o| o == b"null");
        return if named { Verdict::Allowed } else { Verdict::Refused };
    }
    if listed && is_origin(origin) {
        Verdict::Allowed
    } else {
        Verdict::Refused
    }
}

/// Whether `v` looks like a serialized origin (`scheme://host[:port]`, no path, no spaces or
/// control characters): only such a value is ever echoed in a response header.
fn is_origin(v: &[u8]) -> bool {
    let Some(i) = v.windows(3).position(|w| w == b"://") else { return false };
    let (scheme, host) = (&v[..i], &v[i + 3..]);
    !scheme.is_empty()
        && scheme.iter().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(b))
        && !host.is_empty()
        && host.len() <= 255
        && host.iter().all(|&b| b.is_ascii_graphic() && b != b'/' && b != b'?' && b != b'#')
}

/// The request headers a preflight may ask for (`Access-Control-Request-Headers`), as they
/// will be echoed: header names separated by commas. `None` if the value is not such a list.
pub fn requested_headers(v: &[u8]) -> Option<&[u8]> {
    let v = v.trim_ascii();
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    let ok = v.len() <= 1024
        && v.split(|&b| b == b',').all(|h| {
            let h = h.trim_ascii();
            !h.is_empty() && h.iter().all(|&b| token(b))
        });
    ok.then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_matched_whole_ignoring_case() {
        let list = b"https://app.example  https://Other.example:8443,http://x.test";
        for (origin, want) in [
            (Some(&b"https://app.example"[..]), Verdict::Allowed),
            (Some(b"HTTPS://APP.EXAMPLE"), Verdict::Allowed),
            (Some(b"https://other.example:8443"), Verdict::Allowed),
            (Some(b"http://x.test"), Verdict::Allowed),
            (Some(b"https://app.example.evil"), Verdict::Refused),
            (Some(b"https://app.example/"), Verdict::Refused),
            (Some(b"http://app.example"), Verdict::Refused),
            (Some(b"null"), Verdict::Refused),
            (None, Verdict::Off),
        ] {
            assert_eq!(judge(list, origin), want, "{:?}", origin.map(String::from_utf8_lossy));
        }
    }

    #[test]
    fn star_empty_off_and_null() {
        assert_eq!(judge(b"*", Some(b"https://a.b")), Verdict::Allowed);
        assert_eq!(judge(b"*", Some(b"not an origin")), Verdict::Refused);
        assert_eq!(judge(b"*", Some(b"https://a.b\r\nX: y")), Verdict::Refused);
        assert_eq!(judge(b"*", Some(b"null")), Verdict::Refused);
        assert_eq!(judge(b"null", Some(b"null")), Verdict::Allowed);
        assert_eq!(judge(b"", Some(b"https://a.b")), Verdict::Off);
        assert_eq!(judge(b" off ", Some(b"https://a.b")), Verdict::Off);
        assert_eq!(judge(b"*", None), Verdict::Off);
    }

    #[test]
    fn requested_headers_are_token_lists() {
        assert_eq!(
            requested_headers(b" if-none-match, Last-Event-ID ,x-martd-key"),
            Some(&b"if-none-match, Last-Event-ID ,x-martd-key"[..])
        );
        assert_eq!(requested_headers(b"a,,b"), None);
        assert_eq!(requested_headers(b"a b"), None);
        assert_eq!(requested_headers(b"a\r\nb"), None);
        assert_eq!(requested_headers(&[b'a'; 2000]), None);
    }
}
