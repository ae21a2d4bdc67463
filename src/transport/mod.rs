//! How a listener gets its messages. A `martd_listen` location offers one or more transports;
//! each request gets one of them:
//! - `Upgrade: websocket` → WebSocket, when offered;
//! - `Accept: text/event-stream` → EventSource, when offered;
//! - otherwise long-poll, interval-poll, then a chunked stream: the first offered.
//!
//! Long-poll and interval-poll answer one request with one message (see `crate::listen`);
//! EventSource and the chunked stream keep the response open and write every message as it
//! comes ([`streaming`]).

mod attached;
mod detached;
mod piece;
pub mod streaming;
pub mod subscribe;
pub mod websocket;

use nginx_sys::ngx_http_request_t;

use crate::conf::LocConf;

pub const LONGPOLL: u8 = 1;
pub const INTERVAL: u8 = 2;
pub const EVENTSOURCE: u8 = 4;
pub const STREAM: u8 = 8;
pub const WEBSOCKET: u8 = 16;

/// The words `martd_listen` accepts (for its error message).
pub const ACCEPTED: &str =
    "\"longpoll\", \"interval\", \"eventsource\", \"websocket\", \"stream\" and \"json\" are accepted";

/// The transport of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    LongPoll,
    Interval,
    EventSource,
    WebSocket,
    Stream,
}

/// The value of request header `name` (the first one).
pub fn request_header(r: *mut ngx_http_request_t, name: &str) -> Option<&'static [u8]> {
    // SAFETY: `r` is a live request; its header list lives as long as it (callers use the
    // value only while handling it).
    let req = unsafe { ngx::http::Request::from_ngx_http_request(r) };
    req.headers_in_iterator().find(|(k, _)| k.as_bytes().eq_ignore_ascii_case(name.as_bytes())).map(
        |(_, v)| {
            let v = v.as_bytes();
            // SAFETY: as above.
            unsafe { std::slice::from_raw_parts(v.as_ptr(), v.len()) }
        },
    )
}

/// Whether the request accepts an event stream (what EventSource clients send).
fn wants_event_stream(r: *mut ngx_http_request_t) -> bool {
    request_header(r, "Accept")
        .is_some_and(|v| v.windows(17).any(|w| w.eq_ignore_ascii_case(b"text/event-stream")))
}

/// The transport request `r` gets at location `lcf`; `Err`: the reason of a `406`.
pub fn select(r: *mut ngx_http_request_t, lcf: &LocConf) -> Result<Transport, &'static str> {
    let offered = lcf.transports;
    if offered & WEBSOCKET != 0 && websocket::requested(r) {
        return Ok(Transport::WebSocket);
    }
    if offered & EVENTSOURCE != 0 && wants_event_stream(r) {
        return Ok(Transport::EventSource);
    }
    [(LONGPOLL, Transport::LongPoll), (INTERVAL, Transport::Interval), (STREAM, Transport::Stream)]
        .into_iter()
        .find(|&(bit, _)| offered & bit != 0)
        .map(|(_, t)| t)
        .ok_or(match offered & (EVENTSOURCE | WEBSOCKET) {
            EVENTSOURCE => "this location serves EventSource only: send Accept: text/event-stream",
            WEBSOCKET => "this location serves WebSocket only: send Upgrade: websocket",
            _ => "this location serves EventSource (Accept: text/event-stream) and WebSocket only",
        })
}
