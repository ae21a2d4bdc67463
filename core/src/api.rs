//! Parsing martd's API requests: attribute values of a push, and the query of a
//! multi-channel listen (`?cid=..&chanA=ETAG&chanB=ETAG&callback=..`). Every error is the
//! one-line reason of a `400`.

use crate::msgid::MsgId;

/// Longest key accepted.
pub const MAX_KEY_LEN: usize = 256;
/// Longest JSONP callback name accepted.
pub const MAX_CALLBACK_LEN: usize = 64;

fn shown(v: &[u8]) -> String {
    let mut s: String = String::from_utf8_lossy(&v[..v.len().min(40)]).into_owned();
    s.retain(|c| !c.is_control());
    s
}

fn number(v: &[u8]) -> Option<u64> {
    // At most 19 digits: always fits a u64.
    if v.is_empty() || v.len() > 19 {
        return None;
    }
    v.iter().try_fold(0u64, |n, &b| b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0')))
}

/// `size`: messages the channel keeps, `0..=max`.
pub fn parse_size(v: &[u8], max: usize) -> Result<u32, String> {
    let n = number(v).ok_or_else(|| format!("invalid size \"{}\"", shown(v)))?;
    if n > max as u64 {
        return Err(format!("size {n} is over martd_message_buffer_length_max ({max})"));
    }
    Ok(n as u32)
}

/// `life`: seconds a message lives, at least 1 and at most `max_ms` (`0`: no bound, and then
/// `0` = never expires is accepted too). Returns milliseconds.
pub fn parse_life(v: &[u8], max_ms: u64) -> Result<u64, String> {
    seconds("life", v, max_ms)
}

/// `expire`: seconds this one message lives, whatever its channel's life; bounds as `life`.
/// Returns milliseconds.
pub fn parse_expire(v: &[u8], max_ms: u64) -> Result<u64, String> {
    seconds("expire", v, max_ms)
}

/// A number of seconds, at least 1 and at most `max_ms` (`0`: no bound, and then `0` = never
/// is accepted too), as milliseconds.
fn seconds(what: &str, v: &[u8], max_ms: u64) -> Result<u64, String> {
    let n = number(v).ok_or_else(|| format!("invalid {what} \"{}\"", shown(v)))?;
    let ms = n.saturating_mul(1000);
    if max_ms > 0 && (n == 0 || ms > max_ms) {
        return Err(format!(
            "{what} {n} is out of range: 1 to {} seconds (martd_message_timeout)",
            max_ms / 1000
        ));
    }
    Ok(ms)
}

/// The longest client id `martd_clients` registers.
pub const MAX_CLIENT_ID: usize = 128;

/// A client id: 1 to [`MAX_CLIENT_ID`] visible ASCII characters.
pub fn check_client_id(v: &[u8]) -> Result<(), String> {
    if v.is_empty() {
        return Err("empty client_id".into());
    }
    if v.len() > MAX_CLIENT_ID {
        return Err(format!("client_id longer than {MAX_CLIENT_ID} bytes"));
    }
    if !v.iter().all(u8::is_ascii_graphic) {
        return Err("client_id with a character other than visible ASCII".into());
    }
    Ok(())
}

/// `one2one`: `true`, `false`, `1` or `0`.
pub fn parse_bool(what: &str, v: &[u8]) -> Result<bool, String> {
    match v {
        b"true" | b"1" => Ok(true),
        b"false" | b"0" => Ok(false),
        _ => Err(format!("invalid {what} \"{}\": true or false", shown(v))),
    }
}

/// The longest channel token a push registers or a listener presents.
pub const MAX_TOKEN: usize = 256;

/// The longest life `token_ttl` gives a token: 30 days.
pub const MAX_TOKEN_TTL_MS: u64 = 30 * 86_400_000;

/// A channel token: 1 to [`MAX_TOKEN`] visible ASCII characters.
pub fn check_token(v: &[u8]) -> Result<(), String> {
    if v.is_empty() {
        return Err("empty token".into());
    }
    if v.len() > MAX_TOKEN {
        return Err(format!("token longer than {MAX_TOKEN} bytes"));
    }
    if !v.iter().all(u8::is_ascii_graphic) {
        return Err("token with a character other than visible ASCII".into());
    }
    Ok(())
}

/// `token_ttl`: 0 (the token lives as long as its channel) to 30 days, in seconds; as
/// milliseconds.
pub fn parse_token_ttl(v: &[u8]) -> Result<u64, String> {
    let n = number(v).ok_or_else(|| format!("invalid token_ttl \"{}\"", shown(v)))?;
    let ms = n.saturating_mul(1000);
    if ms > MAX_TOKEN_TTL_MS {
        return Err(format!(
            "token_ttl {n} is out of range: 0 to {} seconds",
            MAX_TOKEN_TTL_MS / 1000
        ));
    }
    Ok(ms)
}

/// `key`: 1 to [`MAX_KEY_LEN`] bytes.
pub fn check_key(v: &[u8]) -> Result<(), String> {
    if v.is_empty() {
        return Err("empty key".into());
    }
    if v.len() > MAX_KEY_LEN {
        return Err(format!("key longer than {MAX_KEY_LEN} bytes"));
    }
    Ok(())
}

/// A channel name: not empty, at most `max_len` bytes, no control character.
pub fn check_channel(name: &[u8], max_len: usize) -> Result<(), String> {
    if name.is_empty() {
        return Err("no channel id provided".into());
    }
    if name.len() > max_len {
        return Err(format!("channel id longer than {max_len} bytes"));
    }
    if name.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return Err("channel id with a control character".into());
    }
    Ok(())
}

/// A JSONP callback name: `[A-Za-z_$][A-Za-z0-9_$.]*`, at most [`MAX_CALLBACK_LEN`] bytes.
pub fn check_callback(v: &[u8]) -> Result<(), String> {
    let first_ok = v.first().is_some_and(|&c| c.is_ascii_alphabetic() || c == b'_' || c == b'$');
    let rest_ok = v.iter().all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'$' | b'.'));
    if !first_ok || !rest_ok || v.len() > MAX_CALLBACK_LEN {
        return Err(format!(
            "invalid callback name \"{}\": [A-Za-z_$][A-Za-z0-9_$.]*, at most {MAX_CALLBACK_LEN} characters",
            shown(v)
        ));
    }
    Ok(())
}

/// `%XX` sequences decoded (a malformed one is kept as it is); `+` stays `+`.
pub fn percent_decode(v: &[u8]) -> Vec<u8> {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        match (v[i], v.get(i + 1).and_then(|&c| hex(c)), v.get(i + 2).and_then(|&c| hex(c))) {
            (b'%', Some(h), Some(l)) => {
                out.push(h << 4 | l);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// A multi-channel listen request.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ListenQuery<'a> {
    pub cid: Option<&'a [u8]>,
    pub callback: Option<&'a [u8]>,
    /// `token`: the channel token the listener presents (`martd_require_token`).
    pub token: Option<&'a [u8]>,
    /// `(name, etag)` in request order; etag `0` = everything stored.
    pub channels: Vec<(&'a [u8], MsgId)>,
}

/// Parses the query string of a multi-channel listen: every argument but `cid`, `callback`,
/// `token` and `_` names a channel (the raw name, as `$arg_NAME` would give it) and its value is the
/// etag to listen past (empty or `0`: everything stored).
pub fn parse_listen_query(
    args: &[u8],
    max_channels: usize,
    max_name_len: usize,
) -> Result<ListenQuery<'_>, String> {
    let mut q = ListenQuery::default();
    for arg in args.split(|&b| b == b'&').filter(|a| !a.is_empty()) {
        let (k, v) = match eq_sign(arg) {
            Some(i) => (&arg[..i], &arg[i + 1..]),
            None => (arg, &b""[..]),
        };
        match k {
            b"cid" => q.cid = Some(v),
            b"callback" => {
                check_callback(v)?;
                q.callback = Some(v);
            }
            b"token" => q.token = Some(v),
            b"_" => {}
            name => {
                check_channel(name, max_name_len)?;
                let etag = if v.is_empty() {
                    0
                } else {
                    number(v).ok_or_else(|| {
                        format!("invalid etag \"{}\" for channel \"{}\"", shown(v), shown(name))
                    })?
                };
                if q.channels.iter().any(|(n, _)| *n == name) {
                    return Err(format!("channel \"{}\" given twice", shown(name)));
                }
                if q.channels.len() >= max_channels {
                    return Err(format!(
                        "more than {max_channels} channels (martd_max_channels_per_request)"
                    ));
                }
                q.channels.push((name, etag));
            }
        }
    }
    if q.channels.is_empty() {
        return Err("no channel given: ?CHANNEL=ETAG&...".into());
    }
    Ok(q)
}

fn eq_sign(arg: &[u8]) -> Option<usize> {
    arg.iter().position(|&b| b == b'=')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_values() {
        assert_eq!(parse_size(b"10", 1000), Ok(10));
        assert_eq!(parse_size(b"0", 1000), Ok(0));
        assert!(parse_size(b"1001", 1000).is_err());
        assert!(parse_size(b"abc", 1000).is_err());
        assert!(parse_size(b"-1", 1000).is_err());
        assert!(parse_size(b"99999999999999999999999", 1000).is_err());
        assert_eq!(parse_life(b"3600", 3_600_000), Ok(3_600_000));
        assert!(parse_life(b"3601", 3_600_000).is_err());
        assert!(parse_life(b"0", 3_600_000).is_err());
        assert_eq!(parse_life(b"0", 0), Ok(0));
        assert_eq!(parse_expire(b"30", 3_600_000), Ok(30_000));
        assert!(check_client_id(b"a-1_B.c~").is_ok());
        assert!(check_client_id(b"").is_err());
        assert!(check_client_id(b"a b").is_err());
        assert!(check_client_id(&[b'x'; 129]).unwrap_err().contains("longer than 128"));
        assert!(parse_expire(b"3601", 3_600_000).unwrap_err().starts_with("expire 3601"));
        assert!(parse_expire(b"soon", 0).unwrap_err().contains("invalid expire"));
        assert!(parse_life(b"-1", 0).is_err());
        assert_eq!(parse_bool("one2one", b"true"), Ok(true));
        assert_eq!(parse_bool("one2one", b"0"), Ok(false));
        assert!(parse_bool("one2one", b"maybe").is_err());
        assert!(check_key(b"").is_err());
        assert!(check_key(&[b'k'; 257]).is_err());
        assert!(check_key(b"k").is_ok());
        assert!(check_token(b"t0k-EN_1").is_ok());
        assert!(check_token(b"").unwrap_err().contains("empty token"));
        assert!(check_token(b"a\x01").is_err());
        assert!(check_token(&[b't'; 257]).unwrap_err().contains("longer than 256"));
        assert_eq!(parse_token_ttl(b"0"), Ok(0));
        assert_eq!(parse_token_ttl(b"60"), Ok(60_000));
        assert!(parse_token_ttl(b"2592001").unwrap_err().contains("out of range"));
        assert!(parse_token_ttl(b"1h").unwrap_err().contains("invalid token_ttl"));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode(b"a%20b%2F%zz%4"), b"a b/%zz%4");
        assert_eq!(percent_decode(b"k+1"), b"k+1");
    }

    #[test]
    fn callbacks() {
        for ok in ["cb", "_x", "$", "jQuery123_456", "a.b.c", "x$1"] {
            assert!(check_callback(ok.as_bytes()).is_ok(), "{ok}");
        }
        let long = "a".repeat(65);
        for bad in ["", "1a", "a-b", "<script>", "a(b)", "a b", long.as_str()] {
            assert!(check_callback(bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(check_callback("a".repeat(64).as_bytes()).is_ok());
    }

    #[test]
    fn listen_queries() {
        let q =
            parse_listen_query(b"cid=c1&a=0&b=17&_=123&callback=cb&c=&token=t", 64, 1024).unwrap();
        assert_eq!(q.token, Some(&b"t"[..]));
        assert_eq!(q.cid, Some(&b"c1"[..]));
        assert_eq!(q.callback, Some(&b"cb"[..]));
        assert_eq!(q.channels, vec![(&b"a"[..], 0), (&b"b"[..], 17), (&b"c"[..], 0)]);
        assert!(parse_listen_query(b"cid=x", 64, 1024).is_err());
        assert!(parse_listen_query(b"", 64, 1024).is_err());
        assert!(parse_listen_query(b"a=x1", 64, 1024).is_err());
        assert!(parse_listen_query(b"a=1&a=2", 64, 1024).is_err());
        assert!(parse_listen_query(b"a=1&b=2&c=3", 2, 1024).is_err());
        assert!(parse_listen_query(b"a=1&b=2", 2, 1024).is_ok());
        assert!(parse_listen_query(b"abcd=1", 2, 3).is_err());
        assert!(parse_listen_query(b"a\x01=1", 2, 10).is_err());
        assert!(parse_listen_query(b"a=1&callback=a-b", 2, 10).is_err());
    }
}
