//! WebSocket subscribers (RFC 6455) on the nginx connection: the handshake (`101`, the accept
//! key), the client's frames read and checked by `martd_core::transport::websocket::Decoder`
//! (pings answered, pongs noted, a close echoed, a protocol error closed with its code), and
//! pings of our own (`martd_websocket_ping`) that drop a peer which stops answering. Messages
//! go out as the worker's one frame per message (`Payload::ws_frame`), written like any
//! stream's (see [`super::streaming`]). What clients send besides control frames is read and
//! ignored.

use std::rc::Rc;

use martd_core::key::hash_key;
use martd_core::listeners::Payload;
use martd_core::queue::MessageSpec;
use martd_core::store::{AttrUpdate, PublishOpts, StoreError};
use martd_core::transport::websocket::{self as ws, code, Decoder, Event};
use nginx_sys::{
    ngx_handle_read_event, ngx_http_request_t, ngx_int_t, NGX_AGAIN, NGX_HTTP_VERSION_11, NGX_OK,
};

use super::piece::Piece;
use super::request_header;
use super::streaming::{ctx_of, end_with, fail, write, StreamCtx};
use crate::response;

/// The largest message a client may send (its frames are control frames, or ignored).
const MAX_MESSAGE: usize = 64 * 1024;
/// Bytes read from the connection at a time.
const READ_CHUNK: usize = 16 * 1024;
/// A ping with no payload.
const PING: &[u8] = &[0x80 | ws::opcode::PING, 0];

/// Where a WebSocket's own messages are published (`martd_websocket_publish on`, one
/// channel).
pub struct WsPublish {
    pub channel: Vec<u8>,
    /// The key the client gave when it connected (`key` argument or `X-Martd-Key`).
    pub key: Option<Vec<u8>>,
    pub opts: PublishOpts,
}

/// A WebSocket's reading side.
pub struct WsState {
    pub publish: Option<WsPublish>,
    /// The client asked for subprotocol `martd.meta`: each message frame starts with its id,
    /// channel and content type.
    pub meta: bool,
    decoder: Decoder,
    /// Bytes read and not yet decoded (an incomplete frame).
    rbuf: Vec<u8>,
    /// A ping of ours has had no pong yet.
    awaiting_pong: bool,
}

impl WsState {
    pub fn new() -> Self {
        WsState {
            publish: None,
            meta: false,
            decoder: Decoder::new(MAX_MESSAGE),
            rbuf: Vec::new(),
            awaiting_pong: false,
        }
    }
}

fn has_token(v: &[u8], token: &[u8]) -> bool {
    v.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Whether the request asks for a WebSocket (`Upgrade: websocket`).
pub fn requested(r: *mut ngx_http_request_t) -> bool {
    request_header(r, "Upgrade").is_some_and(|v| has_token(v, b"websocket"))
}

/// Checks the opening handshake (RFC 6455 4.2.1); `Err`: the reason of a `400`.
pub fn check_handshake(r: *mut ngx_http_request_t) -> Result<(), &'static str> {
    // SAFETY: `r` is a live request.
    if unsafe { (*r).http_version } != NGX_HTTP_VERSION_11 as usize {
        return Err("WebSocket needs HTTP/1.1");
    }
    if !request_header(r, "Connection").is_some_and(|v| has_token(v, b"upgrade")) {
        return Err("WebSocket handshake without Connection: upgrade");
    }
    if request_header(r, "Sec-WebSocket-Version").map(<[u8]>::trim_ascii) != Some(b"13") {
        return Err("WebSocket version must be 13");
    }
    let key = request_header(r, "Sec-WebSocket-Key").map(<[u8]>::trim_ascii).unwrap_or_default();
    if key.len() != 24 || !key.iter().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(b)) {
        return Err("invalid Sec-WebSocket-Key");
    }
    Ok(())
}

/// The subprotocol of message frames with a meta prefix.
const META: &[u8] = b"martd.meta";

/// Whether the client offers subprotocol `martd.meta`.
pub fn wants_meta(r: *mut ngx_http_request_t) -> bool {
    request_header(r, "Sec-WebSocket-Protocol").is_some_and(|v| has_token(v, META))
}

/// The `101` response's own headers (nginx adds `Connection: upgrade`).
pub fn handshake_headers(r: *mut ngx_http_request_t, meta: bool) -> Option<()> {
    let key = request_header(r, "Sec-WebSocket-Key")?;
    let accept = ws::accept_key(key);
    response::add_header(r, "Upgrade", b"websocket")?;
    if meta {
        response::add_header(r, "Sec-WebSocket-Protocol", META)?;
    }
    response::add_header(r, "Sec-WebSocket-Accept", accept.as_bytes())
}

/// A message frame of subprotocol `martd.meta`: `id: ID`, `channel: NAME`, `content-type:
/// TYPE` lines, a blank line, then the body (text when all of it is UTF-8 and the content type
/// is not `application/octet-stream`). `None`: no memory.
pub fn meta_frame(p: &Payload, channel: Option<&Rc<[u8]>>) -> Option<Box<[u8]>> {
    let channel = channel.map_or(&[][..], |c| &c[..]);
    let mut payload = Vec::new();
    let head = 48 + channel.len() + p.content_type().len();
    payload.try_reserve_exact(head + p.body().len()).ok()?;
    payload.extend_from_slice(format!("id: {}\nchannel: ", p.id).as_bytes());
    payload.extend(channel.iter().copied().filter(|&b| b != b'\n' && b != b'\r'));
    payload.extend_from_slice(b"\ncontent-type: ");
    payload.extend(p.content_type().iter().copied().filter(|&b| b != b'\n' && b != b'\r'));
    payload.extend_from_slice(b"\n\n");
    payload.extend_from_slice(p.body());
    let binary = p.content_type().eq_ignore_ascii_case(b"application/octet-stream")
        || std::str::from_utf8(&payload).is_err();
    let op = if binary { ws::opcode::BINARY } else { ws::opcode::TEXT };
    let mut frame = Vec::new();
    frame.try_reserve_exact(ws::frame_len(payload.len())).ok()?;
    ws::encode(&mut frame, op, &payload);
    Some(frame.into_boxed_slice())
}

/// The handshake is sent: takes what the client sent after its request (already read by
/// nginx) and reads on.
pub fn start(ctx: &mut StreamCtx) {
    let r = ctx.request;
    // SAFETY: `r` is live; its header buffer's unread part follows the request.
    let early = unsafe {
        let b = (*r).header_in;
        if b.is_null() || (*b).pos >= (*b).last {
            Vec::new()
        } else {
            let n = (*b).last.offset_from((*b).pos) as usize;
            let v = std::slice::from_raw_parts((*b).pos, n).to_vec();
            (*b).pos = (*b).last;
            v
        }
    };
    if let Some(st) = ctx.ws.as_mut() {
        st.rbuf.extend_from_slice(&early);
    }
    if !early.is_empty() && !decode(ctx) {
        return;
    }
    read(ctx);
}

/// The read handler of a WebSocket's request.
pub unsafe extern "C" fn reader(r: *mut ngx_http_request_t) {
    if let Some(ctx) = ctx_of(r) {
        read(ctx);
    }
}

/// Reads and handles what the client sent (attached or detached).
pub fn read(ctx: &mut StreamCtx) {
    let c = ctx.conn;
    // Read on the stack: an idle socket keeps no read buffer.
    let mut chunk = [0u8; READ_CHUNK];
    loop {
        if ctx.done {
            return;
        }
        // SAFETY: the connection is live; `recv` is set for every connection nginx accepts.
        let Some(recv) = (unsafe { (*c).recv }) else {
            fail(ctx, "");
            return;
        };
        // SAFETY: `recv` writes at most `READ_CHUNK` bytes into `chunk` and returns how many.
        let n = unsafe { recv(c, chunk.as_mut_ptr(), READ_CHUNK) };
        if n == NGX_AGAIN as isize {
            break;
        }
        if n <= 0 {
            // The client closed (or reset) the connection: closed from a posted event (this
            // may run inside the listen handler).
            // SAFETY: the connection is live.
            unsafe { (*c).set_error(1) };
            fail(ctx, "");
            return;
        }
        let Some(st) = ctx.ws.as_mut() else { return };
        let got = chunk.get(..n as usize).unwrap_or_default();
        if st.rbuf.try_reserve(got.len()).is_err() {
            fail(ctx, "no memory to read a WebSocket frame");
            return;
        }
        st.rbuf.extend_from_slice(got);
        if !decode(ctx) {
            return;
        }
    }
    // SAFETY: the connection's read event, re-armed as nginx's handlers do.
    if unsafe { ngx_handle_read_event((*c).read, 0) } != NGX_OK as ngx_int_t {
        fail(ctx, "");
    }
}

/// Handles the whole frames read so far; `false` once the stream is ending.
fn decode(ctx: &mut StreamCtx) -> bool {
    let mut events = Vec::new();
    let Some(st) = ctx.ws.as_mut() else { return false };
    let decoded = st.decoder.decode(&st.rbuf, &mut events);
    match decoded {
        Ok(used) => {
            st.rbuf.drain(..used);
            if st.rbuf.is_empty() {
                // Nothing pending: no buffer kept while the socket is idle.
                st.rbuf = Vec::new();
            }
        }
        Err(f) => {
            // SAFETY: the connection is live.
            let log = unsafe { (*ctx.conn).log };
            martd_debug!(log, "closing a WebSocket: {} ({})", f.reason, f.code);
            end_with(ctx, f.code, f.reason);
            return false;
        }
    }
    for e in events {
        match e {
            Event::Ping(data) => {
                let mut frame = Vec::new();
                ws::encode(&mut frame, ws::opcode::PONG, &data);
                write(ctx, vec![Piece::owned(frame.into_boxed_slice())]);
            }
            Event::Pong(_) => {
                if let Some(st) = ctx.ws.as_mut() {
                    st.awaiting_pong = false;
                }
            }
            Event::Close { code: c, .. } => {
                // The close is echoed (RFC 6455 5.5.1): with a normal code either way.
                let _ = c;
                end_with(ctx, code::NORMAL, "");
                return false;
            }
            Event::Message { text, data } => publish(ctx, text, &data),
        }
        if ctx.done {
            return false;
        }
    }
    true
}

/// A client's message on a socket that may publish: a message of its channel (`text/plain`
/// for a text frame, `application/octet-stream` for a binary one). A channel whose key the
/// client did not give closes the socket with 1008; a full zone with 1011.
fn publish(ctx: &mut StreamCtx, text: bool, data: &[u8]) {
    let Some(p) = ctx.ws.as_ref().and_then(|w| w.publish.as_ref()) else { return };
    let mcf = ctx.mcf;
    let now = crate::worker::now_ms();
    let mut wake = Vec::new();
    let content_type: &[u8] = if text { b"text/plain" } else { b"application/octet-stream" };
    let spec = MessageSpec {
        content_type,
        event: b"",
        body: data,
        timeout_ms: p.opts.timeout_ms,
        expire_ms: None,
    };
    let result = crate::zone::lock(mcf).map(|mut z| {
        let key = p.key.as_ref().map(|k| hash_key(z.root().salt, k));
        // The key goes with the message only to a channel that has one: a subscriber's key
        // never gives a channel a key.
        let keyed = !z.store().admits(&p.channel, None);
        let update = AttrUpdate { key: key.filter(|_| keyed), ..AttrUpdate::default() };
        z.store().publish(&p.channel, Some(&spec), &update, &p.opts, now, &mut wake)
    });
    crate::worker::wake(&wake);
    match result {
        Some(Ok(_)) | None => {}
        Some(Err(StoreError::Forbidden)) => {
            end_with(ctx, code::POLICY, "this channel's key is needed to publish");
        }
        Some(Err(_)) => end_with(ctx, code::INTERNAL, "the message could not be stored"),
    }
}

/// The ping timer: `false` if the peer did not answer the last ping (it is being closed).
pub fn ping(ctx: &mut StreamCtx) -> bool {
    let Some(st) = ctx.ws.as_mut() else { return false };
    if st.awaiting_pong {
        fail(ctx, "");
        // SAFETY: the connection is live.
        let log = unsafe { (*ctx.conn).log };
        martd_debug!(log, "closing a WebSocket: no pong to the last ping");
        return false;
    }
    st.awaiting_pong = true;
    write(ctx, vec![Piece::lasting(PING)]);
    !ctx.done
}
