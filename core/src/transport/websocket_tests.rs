use super::*;

/// A client frame: masked with `mask`.
fn frame(b0: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = vec![b0];
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n @ 126..=65535 => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

const M: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

fn text(p: &[u8]) -> Vec<u8> {
    frame(0x81, p, M)
}

fn decode_all(input: &[u8]) -> Result<Vec<Event>, Fail> {
    let mut d = Decoder::new(1 << 20);
    let mut out = vec![];
    let used = d.decode(input, &mut out)?;
    assert_eq!(used, input.len(), "whole frames are used");
    Ok(out)
}

/// Feeds `input` one byte at a time.
fn decode_bytewise(input: &[u8]) -> Result<Vec<Event>, Fail> {
    let mut d = Decoder::new(1 << 20);
    let mut out = vec![];
    let mut buf = vec![];
    for &b in input {
        buf.push(b);
        let used = d.decode(&buf, &mut out)?;
        buf.drain(..used);
    }
    assert!(buf.is_empty());
    Ok(out)
}

fn code_of(r: Result<Vec<Event>, Fail>) -> u16 {
    r.expect_err("must fail").code
}

#[test]
fn accept_key_of_rfc_6455() {
    assert_eq!(accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
}

#[test]
fn messages_fragments_and_control_frames_between() {
    let mut input = text(b"hello");
    input.extend(frame(0x01, &"h\u{e9}".as_bytes()[..2], M)); // text, not fin, é cut
    input.extend(frame(0x89, b"ping!", M)); // a ping between fragments
    input.extend(frame(0x80, &"h\u{e9}llo".as_bytes()[2..], M)); // the last fragment
    input.extend(frame(0x82, &[0, 255, 1], M));
    input.extend(frame(0x8a, b"", M));
    input.extend(frame(0x88, &[0x03, 0xe8, b'b', b'y', b'e'], M));
    let want = vec![
        Event::Message { text: true, data: b"hello".to_vec() },
        Event::Ping(b"ping!".to_vec()),
        Event::Message { text: true, data: "h\u{e9}llo".as_bytes().to_vec() },
        Event::Message { text: false, data: vec![0, 255, 1] },
        Event::Pong(vec![]),
        Event::Close { code: Some(1000), reason: b"bye".to_vec() },
    ];
    assert_eq!(decode_all(&input).unwrap(), want);
    assert_eq!(decode_bytewise(&input).unwrap(), want);
    let long = vec![b'a'; 70_000];
    assert_eq!(
        decode_all(&text(&long)).unwrap(),
        vec![Event::Message { text: true, data: long.clone() }]
    );
    assert_eq!(decode_all(&text(&long[..300])).unwrap().len(), 1);
}

#[test]
fn protocol_errors_are_1002() {
    let unmasked = vec![0x81, 0x02, b'h', b'i'];
    assert_eq!(code_of(decode_all(&unmasked)), code::PROTOCOL_ERROR);
    assert_eq!(code_of(decode_all(&frame(0xc1, b"x", M))), code::PROTOCOL_ERROR, "rsv1");
    assert_eq!(code_of(decode_all(&frame(0x83, b"x", M))), code::PROTOCOL_ERROR, "opcode 3");
    assert_eq!(code_of(decode_all(&frame(0x8b, b"x", M))), code::PROTOCOL_ERROR, "opcode 11");
    assert_eq!(code_of(decode_all(&frame(0x89, &[0; 126], M))), code::PROTOCOL_ERROR);
    let fragmented_ping = frame(0x09, b"x", M);
    assert_eq!(code_of(decode_all(&fragmented_ping)), code::PROTOCOL_ERROR);
    assert_eq!(code_of(decode_all(&frame(0x80, b"x", M))), code::PROTOCOL_ERROR, "continuation");
    let mut nested = frame(0x01, b"a", M);
    nested.extend(text(b"b"));
    assert_eq!(code_of(decode_all(&nested)), code::PROTOCOL_ERROR, "message inside a message");
    assert_eq!(code_of(decode_all(&frame(0x88, &[3], M))), code::PROTOCOL_ERROR, "1-byte close");
    for bad in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
        let r = decode_all(&frame(0x88, &bad.to_be_bytes(), M));
        assert_eq!(code_of(r), code::PROTOCOL_ERROR, "close code {bad}");
    }
    for good in [1000u16, 1001, 1002, 1003, 1007, 1011, 3000, 4999] {
        assert!(decode_all(&frame(0x88, &good.to_be_bytes(), M)).is_ok(), "close code {good}");
    }
    let mut huge = vec![0x81, 0x80 | 127];
    huge.extend_from_slice(&(1u64 << 63).to_be_bytes());
    huge.extend_from_slice(&M);
    assert_eq!(code_of(decode_all(&huge)), code::PROTOCOL_ERROR);
}

#[test]
fn invalid_utf8_is_1007_as_soon_as_it_shows() {
    assert_eq!(code_of(decode_all(&text(b"\xff"))), code::INVALID_DATA);
    let mut close = vec![0x03, 0xe8];
    close.extend_from_slice(b"\xc3\x28");
    assert_eq!(code_of(decode_all(&frame(0x88, &close, M))), code::INVALID_DATA);
    // The first fragment already proves it: no need to wait for the rest.
    let mut d = Decoder::new(1 << 20);
    let first = frame(0x01, b"ok \xed\xa0\x80", M); // a UTF-16 surrogate
    assert_eq!(d.decode(&first, &mut vec![]).unwrap_err().code, code::INVALID_DATA);
    // A sequence cut at the end of the last fragment is an error.
    let cut = frame(0x81, &"\u{1f600}".as_bytes()[..3], M);
    assert_eq!(code_of(decode_all(&cut)), code::INVALID_DATA);
    // Binary messages are never checked.
    assert!(decode_all(&frame(0x82, b"\xff", M)).is_ok());
}

#[test]
fn size_limit_is_1009_from_the_header() {
    let mut d = Decoder::new(100);
    let mut header_only = frame(0x81, &[b'a'; 101], M);
    header_only.truncate(8);
    assert_eq!(d.decode(&header_only, &mut vec![]).unwrap_err().code, code::TOO_BIG);
    let mut d = Decoder::new(100);
    let mut two = frame(0x01, &[b'a'; 60], M);
    two.extend(frame(0x80, &[b'a'; 60], M));
    assert_eq!(d.decode(&two, &mut vec![]).unwrap_err().code, code::TOO_BIG);
    let mut d = Decoder::new(100);
    let mut out = vec![];
    assert!(d.decode(&frame(0x81, &[b'a'; 100], M), &mut out).is_ok());
    assert_eq!(out.len(), 1);
}

#[test]
fn encoder_frames() {
    for n in [0usize, 125, 126, 65535, 65536] {
        let payload = vec![7u8; n];
        let mut out = vec![];
        encode(&mut out, opcode::TEXT, &payload);
        assert_eq!(out.len(), frame_len(n));
        assert_eq!(out[0], 0x81);
        assert_eq!(out[1] & 0x80, 0, "server frames are not masked");
        assert!(out.ends_with(&payload));
    }
    let mut out = vec![];
    encode_close(&mut out, code::GOING_AWAY, &"\u{e9}".repeat(100));
    assert!(out.len() <= 127, "a control frame: at most 125 bytes of payload");
    assert_eq!(&out[2..4], &1001u16.to_be_bytes());
    assert!(std::str::from_utf8(&out[4..]).is_ok(), "cut on a character boundary");
}

proptest::proptest! {
    #[test]
    fn random_bytes_never_panic(input in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
        let mut d = Decoder::new(1000);
        let mut out = vec![];
        if let Ok(used) = d.decode(&input, &mut out) {
            proptest::prop_assert!(used <= input.len());
        }
    }

    #[test]
    fn valid_frames_decode_however_they_are_split(
        msgs in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..200), 1..6),
        cut in 0usize..2000,
    ) {
        let mut input = vec![];
        for m in &msgs {
            input.extend(frame(0x82, m, M));
        }
        let cut = cut.min(input.len());
        let mut d = Decoder::new(1 << 20);
        let mut out = vec![];
        let used = d.decode(&input[..cut], &mut out).unwrap();
        let mut rest = input[used..].to_vec();
        let used2 = d.decode(&rest, &mut out).unwrap();
        rest.drain(..used2);
        proptest::prop_assert!(rest.is_empty());
        let got: Vec<Vec<u8>> = out.into_iter().map(|e| match e {
            Event::Message { data, .. } => data,
            other => panic!("{other:?}"),
        }).collect();
        proptest::prop_assert_eq!(got, msgs);
    }
}
