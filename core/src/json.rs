//! martd's JSON bodies: the multi-channel listener reply, errors, and the publish reply.
//!
//! A message body goes into a reply as a JSON string when it is valid UTF-8, else as
//! `{"base64":"..."}`, so a reply is always valid JSON whatever was published.

use base64::Engine;

use crate::msgid::MsgId;

/// The reply of a multi-channel listener that got nothing (timeout, worker shutdown).
pub const EMPTY_BATCH: &[u8] = b"{\"channels\":{}}";

/// Appends `s` as a JSON string (`"..."`, escaped). `s` must be valid UTF-8, or is taken
/// lossily.
pub fn push_string(out: &mut Vec<u8>, s: &[u8]) {
    let text = String::from_utf8_lossy(s);
    out.push(b'"');
    for c in text.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            // U+2028/2029 are valid JSON but end a line in old JavaScript (JSONP).
            c if (c as u32) < 0x20 || c == '\u{2028}' || c == '\u{2029}' => {
                out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes())
            }
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out.push(b'"');
}

/// Appends one message body: a JSON string, or `{"base64":"..."}` when it is not UTF-8.
pub fn push_payload(out: &mut Vec<u8>, body: &[u8]) {
    if std::str::from_utf8(body).is_ok() {
        push_string(out, body);
    } else {
        out.extend_from_slice(b"{\"base64\":\"");
        let engine = base64::engine::general_purpose::STANDARD;
        let start = out.len();
        out.resize(start + base64::encoded_len(body.len(), true).unwrap_or(0), 0);
        let n = engine.encode_slice(body, &mut out[start..]).unwrap_or(0);
        out.truncate(start + n);
        out.extend_from_slice(b"\"}");
    }
}

/// Bytes a fragment for `name` with these bodies takes at most (to reserve it fallibly).
pub fn fragment_capacity<'a>(name: &[u8], bodies: impl Iterator<Item = &'a [u8]>) -> usize {
    // Escaping takes at most 6 bytes per input byte; base64 4 per 3. 64 for the fixed parts.
    let body: usize = bodies.map(|b| b.len().saturating_mul(6).saturating_add(16)).sum();
    name.len().saturating_mul(6).saturating_add(body).saturating_add(64)
}

/// One channel of a multi-channel reply: `"name":{"etag":"ID","payload":[...]}`, where ID is
/// `last`, the id of the last message. `None` if memory for it cannot be had.
pub fn fragment<'a>(
    name: &[u8],
    last: MsgId,
    bodies: impl Iterator<Item = &'a [u8]> + Clone,
) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    out.try_reserve_exact(fragment_capacity(name, bodies.clone())).ok()?;
    push_string(&mut out, name);
    out.extend_from_slice(b":{\"etag\":\"");
    out.extend_from_slice(last.to_string().as_bytes());
    out.extend_from_slice(b"\",\"payload\":[");
    for (i, b) in bodies.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_payload(&mut out, b);
    }
    out.extend_from_slice(b"]}");
    Some(out)
}

/// A multi-channel reply made of fragments: `{"channels":{...}}`.
pub fn batch<'a>(fragments: impl Iterator<Item = &'a [u8]> + Clone) -> Option<Vec<u8>> {
    let len: usize = fragments.clone().map(|f| f.len() + 1).sum();
    let mut out = Vec::new();
    out.try_reserve_exact(len + EMPTY_BATCH.len()).ok()?;
    out.extend_from_slice(b"{\"channels\":{");
    for (i, f) in fragments.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(f);
    }
    out.extend_from_slice(b"}}");
    Some(out)
}

/// One message in the reply envelope, as a JSON stream sends each one:
/// `{"channels":{"name":{"etag":"ID","payload":[body]}}}`. `None`: no memory for it.
pub fn message(name: &[u8], id: MsgId, body: &[u8]) -> Option<Vec<u8>> {
    let one = fragment(name, id, std::iter::once(body))?;
    batch(std::iter::once(&one[..]))
}

/// An error body: `{"error":"reason"}`, and `"channel":"name"` when one is given.
pub fn error(reason: &str, channel: Option<&[u8]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(reason.len() + 32);
    out.extend_from_slice(b"{\"error\":");
    push_string(&mut out, reason.as_bytes());
    if let Some(name) = channel {
        out.extend_from_slice(b",\"channel\":");
        push_string(&mut out, name);
    }
    out.extend_from_slice(b"}\n");
    out
}

/// The reply of a publish in martd's API: `{"etag":"ID","listeners":N}`.
pub fn published(id: MsgId, listeners: u32) -> Vec<u8> {
    format!("{{\"etag\":\"{id}\",\"listeners\":{listeners}}}\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(b: &[u8]) -> serde_json::Value {
        serde_json::from_slice(b).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(b)))
    }

    #[test]
    fn one_message_is_a_reply_of_one_channel() {
        let v = parse(&message(b"c\n", 42, b"two\nlines").unwrap());
        assert_eq!(v["channels"]["c\n"]["etag"], "42");
        assert_eq!(v["channels"]["c\n"]["payload"], serde_json::json!(["two\nlines"]));
        let raw = message(b"c", 1, b"a\r\nb").unwrap();
        assert!(!raw.contains(&b'\n') && !raw.contains(&b'\r'), "one line: {raw:?}");
    }

    #[test]
    fn fragments_make_valid_json() {
        let a = fragment(
            b"a\"b",
            7,
            [b"x\ny".as_slice(), b"\x01\\", "\u{2028}é".as_bytes()].into_iter(),
        )
        .unwrap();
        let bin = fragment(b"bin", 9, [b"\xff\x00ab".as_slice()].into_iter()).unwrap();
        let body = batch([a.as_slice(), bin.as_slice()].into_iter()).unwrap();
        let v = parse(&body);
        let ch = &v["channels"]["a\"b"];
        assert_eq!(ch["etag"], "7");
        assert_eq!(ch["payload"][0], "x\ny");
        assert_eq!(ch["payload"][1], "\u{1}\\");
        assert_eq!(ch["payload"][2], "\u{2028}é");
        let b64 = v["channels"]["bin"]["payload"][0]["base64"].as_str().unwrap();
        let engine = base64::engine::general_purpose::STANDARD;
        assert_eq!(engine.decode(b64).unwrap(), b"\xff\x00ab");
        assert_eq!(parse(EMPTY_BATCH)["channels"].as_object().unwrap().len(), 0);
    }

    #[test]
    fn errors_and_publish_replies() {
        assert_eq!(parse(&error("bad \"x\"", None))["error"], "bad \"x\"");
        let e = parse(&error("channel deleted", Some(b"c")));
        assert_eq!(e["channel"], "c");
        let p = parse(&published(123, 2));
        assert_eq!(p["etag"], "123");
        assert_eq!(p["listeners"], 2);
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_make_valid_json(name in proptest::collection::vec(proptest::num::u8::ANY, 0..20),
                                     bodies in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..40), 0..4)) {
            let f = fragment(&name, 1, bodies.iter().map(|b| b.as_slice())).unwrap();
            let body = batch([f.as_slice()].into_iter()).unwrap();
            let v = parse(&body);
            let key = String::from_utf8_lossy(&name).into_owned();
            let items = v["channels"][key.as_str()]["payload"].as_array().unwrap().clone();
            proptest::prop_assert_eq!(items.len(), bodies.len());
            for (item, body) in items.iter().zip(&bodies) {
                let got = match item.as_str() {
                    Some(s) => s.as_bytes().to_vec(),
                    None => base64::engine::general_purpose::STANDARD
                        .decode(item["base64"].as_str().unwrap()).unwrap(),
                };
                proptest::prop_assert_eq!(&got, body);
            }
        }
    }
}
