//! WebSocket (RFC 6455) framing for the server side, without nginx: the handshake's accept key,
//! a decoder of client frames that enforces the protocol's rules, and an encoder of server
//! frames.
//!
//! The decoder is fed the bytes read from the connection and returns whole events (a complete
//! message, a ping, a pong, a close) or the close code the connection must end with:
//! `1002` for a protocol error (unmasked client frame, reserved bits or opcodes, a control frame
//! fragmented or over 125 bytes, a continuation with nothing to continue, a new message inside
//! a fragmented one, a bad close frame), `1007` for a text message (or close reason) that is not
//! UTF-8 (found as soon as the bytes received prove it), `1009` for a message over the limit
//! (found from the frame header, before its payload is read).

use base64::Engine;
use sha1::{Digest, Sha1};

/// The GUID of RFC 6455 section 1.3.
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`.
pub fn accept_key(client_key: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(client_key.trim_ascii());
    h.update(GUID);
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// Close codes martd sends.
pub mod code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
}

/// Frame opcodes.
pub mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// What the client sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    Message {
        text: bool,
        data: Vec<u8>,
    },
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    /// A close frame: its code (`None`: none given) and reason.
    Close {
        code: Option<u16>,
        reason: Vec<u8>,
    },
}

/// Why the connection must be closed: the code to send, and a reason for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fail {
    pub code: u16,
    pub reason: &'static str,
}

const fn fail(code: u16, reason: &'static str) -> Fail {
    Fail { code, reason }
}

/// A close code a peer may send (RFC 6455 7.4, and the registered and private ranges).
fn valid_close_code(c: u16) -> bool {
    matches!(c, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

/// Whether `data[from..]` may still become UTF-8: `Ok(end of the valid prefix)`, or a proof it
/// cannot (an invalid sequence before the end). A sequence cut at the end is not an error
/// unless `complete`.
fn check_utf8(data: &[u8], from: usize, complete: bool) -> Result<usize, ()> {
    match std::str::from_utf8(&data[from..]) {
        Ok(_) => Ok(data.len()),
        Err(e) if e.error_len().is_none() && !complete => Ok(from + e.valid_up_to()),
        Err(_) => Err(()),
    }
}

/// A client frame's header, once whole.
struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    len: usize,
    header_len: usize,
}

/// Decodes client frames.
pub struct Decoder {
    max_message: usize,
    /// The message being received in fragments: text or not, its data so far, and how much
    /// of it is known to be UTF-8.
    partial: Option<(bool, Vec<u8>, usize)>,
}

impl Decoder {
    /// A decoder that refuses messages over `max_message` bytes (`1009`).
    pub fn new(max_message: usize) -> Self {
        Decoder { max_message, partial: None }
    }

    /// Decodes what `input` holds: pushes each whole event to `out` and returns how many bytes
    /// were used (the rest, an incomplete frame, is to be given again with more bytes after
    /// it). An error ends the connection with its code.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<Event>) -> Result<usize, Fail> {
        let mut used = 0;
        while let Some(h) = self.header(&input[used..])? {
            let total = h.header_len + h.len;
            if input.len() - used < total {
                break;
            }
            let payload = &input[used + h.header_len..used + total];
            let mut data = Vec::new();
            data.try_reserve_exact(h.len).map_err(|_| fail(code::TOO_BIG, "no memory"))?;
            data.extend(payload.iter().enumerate().map(|(i, b)| b ^ h.mask[i % 4]));
            used += total;
            if let Some(ev) = self.frame(h.fin, h.opcode, data)? {
                let close = matches!(ev, Event::Close { .. });
                out.push(ev);
                if close {
                    break;
                }
            }
        }
        Ok(used)
    }

    /// The header at the start of `b`, checked; `None` while incomplete.
    fn header(&self, b: &[u8]) -> Result<Option<Header>, Fail> {
        if b.len() < 2 {
            return Ok(None);
        }
        let (fin, rsv, opcode) = (b[0] & 0x80 != 0, b[0] & 0x70, b[0] & 0x0f);
        if rsv != 0 {
            return Err(fail(code::PROTOCOL_ERROR, "reserved bits set"));
        }
        let control = opcode & 0x8 != 0;
        match opcode {
            opcode::CONTINUATION | opcode::TEXT | opcode::BINARY => {}
            opcode::CLOSE | opcode::PING | opcode::PONG => {}
            _ => return Err(fail(code::PROTOCOL_ERROR, "reserved opcode")),
        }
        if b[1] & 0x80 == 0 {
            return Err(fail(code::PROTOCOL_ERROR, "unmasked client frame"));
        }
        let (len, at) = match b[1] & 0x7f {
            126 if b.len() < 4 => return Ok(None),
            126 => (u64::from(u16::from_be_bytes([b[2], b[3]])), 4),
            127 if b.len() < 10 => return Ok(None),
            127 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&b[2..10]);
                let n = u64::from_be_bytes(n);
                if n >> 63 != 0 {
                    return Err(fail(code::PROTOCOL_ERROR, "payload length with its top bit set"));
                }
                (n, 10)
            }
            n => (u64::from(n), 2),
        };
        if control && (!fin || len > 125) {
            return Err(fail(code::PROTOCOL_ERROR, "fragmented or oversized control frame"));
        }
        let so_far = self.partial.as_ref().map_or(0, |p| p.1.len() as u64);
        if !control && len.saturating_add(so_far) > self.max_message as u64 {
            return Err(fail(code::TOO_BIG, "message over the size limit"));
        }
        if b.len() < at + 4 {
            return Ok(None);
        }
        let mask = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        Ok(Some(Header { fin, opcode, mask, len: len as usize, header_len: at + 4 }))
    }

    /// One whole frame: an event when it completes one.
    fn frame(&mut self, fin: bool, op: u8, data: Vec<u8>) -> Result<Option<Event>, Fail> {
        match op {
            opcode::PING => Ok(Some(Event::Ping(data))),
            opcode::PONG => Ok(Some(Event::Pong(data))),
            opcode::CLOSE => close_frame(data).map(Some),
            opcode::CONTINUATION => {
                let Some((text, mut sofar, valid)) = self.partial.take() else {
                    return Err(fail(code::PROTOCOL_ERROR, "continuation without a message"));
                };
                sofar.try_reserve(data.len()).map_err(|_| fail(code::TOO_BIG, "no memory"))?;
                sofar.extend_from_slice(&data);
                self.message(text, fin, sofar, valid)
            }
            _ => {
                if self.partial.is_some() {
                    return Err(fail(code::PROTOCOL_ERROR, "new message inside a fragmented one"));
                }
                self.message(op == opcode::TEXT, fin, data, 0)
            }
        }
    }

    fn message(
        &mut self,
        text: bool,
        fin: bool,
        data: Vec<u8>,
        valid: usize,
    ) -> Result<Option<Event>, Fail> {
        let valid = if text {
            check_utf8(&data, valid, fin)
                .map_err(|()| fail(code::INVALID_DATA, "text not UTF-8"))?
        } else {
            0
        };
        if fin {
            Ok(Some(Event::Message { text, data }))
        } else {
            self.partial = Some((text, data, valid));
            Ok(None)
        }
    }
}

fn close_frame(data: Vec<u8>) -> Result<Event, Fail> {
    match data.len() {
        0 => Ok(Event::Close { code: None, reason: Vec::new() }),
        1 => Err(fail(code::PROTOCOL_ERROR, "close frame of one byte")),
        _ => {
            let c = u16::from_be_bytes([data[0], data[1]]);
            if !valid_close_code(c) {
                return Err(fail(code::PROTOCOL_ERROR, "invalid close code"));
            }
            if std::str::from_utf8(&data[2..]).is_err() {
                return Err(fail(code::INVALID_DATA, "close reason not UTF-8"));
            }
            Ok(Event::Close { code: Some(c), reason: data[2..].to_vec() })
        }
    }
}

/// Bytes a server frame with `len` bytes of payload takes.
pub fn frame_len(len: usize) -> usize {
    len + match len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}

/// Appends a whole, unmasked server frame.
pub fn encode(out: &mut Vec<u8>, op: u8, payload: &[u8]) {
    out.push(0x80 | op);
    match payload.len() {
        n @ 0..=125 => out.push(n as u8),
        n @ 126..=65535 => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

/// Appends a close frame with `code` and a reason (cut to fit a control frame).
pub fn encode_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode(out, opcode::CLOSE, &payload);
}

#[cfg(test)]
#[path = "websocket_tests.rs"]
mod tests;
