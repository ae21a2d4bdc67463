//! EventSource (server-sent events) formatting, per the WHATWG HTML standard's event stream
//! format: `id:`, `event:` and `data:` fields, one `data:` line per line of the message (a line
//! ends at CR LF, LF or CR), a blank line after each event, comment lines for keep-alives.

use crate::msgid::MsgId;

/// Bytes [`event`] needs at most for a message of `body_len` bytes (every line break turned
/// into a `data: ` line), so the caller can reserve them fallibly.
pub fn event_capacity(event_name: Option<&[u8]>, body_len: usize) -> usize {
    let lines = body_len.saturating_mul(7); // worst case: every byte a line break
    lines.saturating_add(event_name.map_or(0, |e| e.len() + 8)).saturating_add(48)
}

/// Appends one event: `id: <id>`, `event: <name>` when given (line breaks dropped from it), and
/// the body as `data:` lines.
pub fn event(out: &mut Vec<u8>, id: MsgId, event_name: Option<&[u8]>, body: &[u8]) {
    out.extend_from_slice(b"id: ");
    out.extend_from_slice(id.to_string().as_bytes());
    out.push(b'\n');
    if let Some(name) = event_name {
        out.extend_from_slice(b"event: ");
        out.extend(name.iter().copied().filter(|&b| b != b'\r' && b != b'\n'));
        out.push(b'\n');
    }
    let mut rest = body;
    loop {
        let end = rest.iter().position(|&b| b == b'\r' || b == b'\n');
        out.extend_from_slice(b"data: ");
        match end {
            None => {
                out.extend_from_slice(rest);
                out.push(b'\n');
                break;
            }
            Some(i) => {
                out.extend_from_slice(&rest[..i]);
                out.push(b'\n');
                let skip = if rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n') { 2 } else { 1 };
                rest = &rest[i + skip..];
            }
        }
    }
    out.push(b'\n');
}

/// A comment line (ignored by clients): keeps proxies from closing an idle stream.
pub fn comment(out: &mut Vec<u8>, text: &[u8]) {
    out.push(b':');
    if !text.is_empty() {
        out.push(b' ');
        out.extend(text.iter().copied().filter(|&b| b != b'\r' && b != b'\n'));
    }
    out.extend_from_slice(b"\n\n");
}

/// The message id an EventSource client resumes from: its `Last-Event-ID` header or
/// `last_event_id` argument, a decimal id. `None` for anything else.
pub fn parse_last_event_id(v: &[u8]) -> Option<MsgId> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 20 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal event stream parser, as the WHATWG standard describes it: (id, event, data).
    fn parse(stream: &[u8]) -> Vec<(String, String, String)> {
        let text = String::from_utf8_lossy(stream).replace("\r\n", "\n").replace('\r', "\n");
        let mut events = vec![];
        let (mut id, mut ev, mut data): (String, String, Vec<String>) = Default::default();
        for line in text.split('\n') {
            if line.is_empty() {
                if !data.is_empty() {
                    events.push((id.clone(), std::mem::take(&mut ev), data.join("\n")));
                    data.clear();
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "id" => id = value.to_string(),
                "event" => ev = value.to_string(),
                "data" => data.push(value.to_string()),
                _ => {}
            }
        }
        events
    }

    #[test]
    fn lines_split_on_every_line_break() {
        let mut out = vec![];
        event(&mut out, 7, None, b"one\r\ntwo\nthree\rfour");
        event(&mut out, 8, Some(b"up\ndate"), b"");
        comment(&mut out, b"ping");
        event(&mut out, 9, None, b"trailing\n");
        let ev = parse(&out);
        assert_eq!(ev[0], ("7".into(), "".into(), "one\ntwo\nthree\nfour".into()));
        assert_eq!(ev[1], ("8".into(), "update".into(), "".into()));
        assert_eq!(ev[2], ("9".into(), "".into(), "trailing\n".into()));
        assert!(out.len() <= event_capacity(None, 40) * 3);
    }

    #[test]
    fn last_event_ids() {
        assert_eq!(parse_last_event_id(b" 123 "), Some(123));
        assert_eq!(parse_last_event_id(b"12a"), None);
        assert_eq!(parse_last_event_id(b""), None);
        assert_eq!(parse_last_event_id(b"99999999999999999999999"), None);
    }

    proptest::proptest! {
        #[test]
        fn any_body_round_trips_modulo_line_breaks(body in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let body: Vec<u8> = body.into_iter().map(|b| if b >= 0x80 { b'x' } else { b }).collect();
            let mut out = Vec::with_capacity(event_capacity(None, body.len()));
            let cap = out.capacity();
            event(&mut out, 1, None, &body);
            proptest::prop_assert!(out.len() <= cap);
            let ev = parse(&out);
            let want = String::from_utf8_lossy(&body).replace("\r\n", "\n").replace('\r', "\n");
            proptest::prop_assert_eq!(ev.len(), 1);
            proptest::prop_assert_eq!(&ev[0].2, &want);
        }
    }
}
