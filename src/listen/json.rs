//! `martd_listen json`: martd's multi-channel listener.
//!
//! `GET /sub?cid=CLIENT&chanA=ETAG&chanB=ETAG[&callback=NAME]` gets every stored message newer
//! than each etag, per channel, in one JSON reply; with nothing newer anywhere the request
//! parks on all its channels at once (one listener, one entry per channel, detached like a
//! single-channel listener) until a message is published on any of them.

use martd_core::api::{self, ListenQuery};
use martd_core::json;
use martd_core::listeners::{Revive, Verdict};
use martd_core::msgid::MsgId;
use martd_core::store::{Concurrency, MultiListen, MultiPeek};
use nginx_sys::{ngx_http_arg, ngx_http_request_t, ngx_int_t, ngx_str_t, NGX_ERROR, NGX_OK};

use super::{
    detach, keep_charge, listen_opts, main_conf, parked, prepare_handle, refused, unavailable,
};
use crate::conf::LocConf;
use crate::response;
use crate::transport::streaming::Kind;
use crate::transport::Transport;
use crate::worker::{self, now_ms};
use crate::zone;

/// The request's query string.
fn args(r: *mut ngx_http_request_t) -> &'static [u8] {
    // SAFETY: `r` is a live request; its arguments live as long as it (the caller uses them
    // only while handling it).
    unsafe { (*r).args.as_bytes() }
}

fn query(r: *mut ngx_http_request_t, lcf: &LocConf) -> Result<ListenQuery<'static>, String> {
    api::parse_listen_query(
        args(r),
        lcf.max_channels.max(0) as usize,
        lcf.max_channel_id_length.max(0) as usize,
    )
}

/// The request's JSONP callback (checked when the request arrived).
fn callback(r: *mut ngx_http_request_t) -> Option<&'static [u8]> {
    let name = b"callback";
    let mut v = ngx_str_t { len: 0, data: std::ptr::null_mut() };
    // SAFETY: `r` is a live request; the value points into its arguments, which live as long
    // as it (the caller uses it only while answering it).
    let found = unsafe { ngx_http_arg(r, name.as_ptr() as *mut u8, name.len(), &mut v) };
    if found != NGX_OK as ngx_int_t || v.len == 0 {
        return None;
    }
    // SAFETY: as above.
    let v = unsafe { std::slice::from_raw_parts(v.data, v.len) };
    api::check_callback(v).is_ok().then_some(v)
}

/// What a multi-channel listen gets at once.
enum Now {
    /// The reply body (`None`: no memory for it).
    Reply(Option<Vec<u8>>),
    Parked(martd_core::listeners::ListenerKey),
    /// Took over what lingered for its connection.
    Revived(martd_core::listeners::ListenerKey),
}

/// Handles a multi-channel listen request (long-poll or interval-poll).
pub fn listen(r: *mut ngx_http_request_t, lcf: &LocConf, transport: Transport) -> ngx_int_t {
    let q = match query(r, lcf) {
        Ok(q) => q,
        Err(reason) => return response::error(r, 400, &reason),
    };
    let kind = match transport {
        Transport::LongPoll => None,
        Transport::Interval => return interval(r, &q),
        Transport::EventSource => Some(Kind::EventSource),
        Transport::WebSocket => Some(Kind::WebSocket),
        Transport::Stream => Some(Kind::Stream),
    };
    if let Some(kind) = kind {
        return crate::transport::subscribe::listen_json(r, lcf, &q, kind);
    }
    if !worker::accepting() {
        return response::json(r, 200, json::EMPTY_BATCH, q.callback);
    }
    let Some((mut detached, handle)) = prepare_handle(r, lcf) else {
        return NGX_ERROR as ngx_int_t;
    };
    // SAFETY: `r` and its connection are live.
    let conn: u64 = unsafe { (*(*r).connection).number };
    // Answered, it may linger for this connection's next request (see
    // `martd_core::listeners::Listeners::revive`).
    let token = crate::access::tokens::to_charge(r, lcf);
    // A listener charged on a token is charged again by each request: it does not linger.
    let linger = (detached.is_some()
        && lcf.concurrency() == Concurrency::Broadcast
        && lcf.max_listeners == 0
        && token.is_none())
    .then_some(conn);
    let mcf = main_conf(r);
    let now = now_ms();
    let mut wake = Vec::new();
    let outcome = worker::with(|st| {
        let slot = st.slot?;
        let revive = if token.is_some() {
            Revive::Absent
        } else {
            st.listeners.revive(conn, &q.channels, handle, linger)
        };
        let stale = match revive {
            Revive::Revived(key) => {
                if let Some(d) = detached.take() {
                    detach::insert(&mut st.detached, d, key);
                }
                return Some(Ok(Now::Revived(key)));
            }
            Revive::Stale(key) => Some(key),
            Revive::Absent => None,
        };
        let opts = listen_opts(lcf, slot);
        let mut z = zone::lock(mcf)?;
        if let Some(key) = stale {
            st.listeners.remove(key, |r| z.store().release(&r.name, r.serial, slot, 1, r.last));
        }
        if let Some(t) = &token {
            match t.charge(&mut z, mcf, slot, q.channels.iter().map(|c| c.0)) {
                Ok(c) => keep_charge(&mut detached, handle, c, &mut z),
                Err(e) => return Some(Err(e)),
            }
        }
        let mut consumed: Vec<(&[u8], MsgId, MsgId)> = Vec::new();
        let now_result = match z.store().listen_multi(&q.channels, &opts, now, &mut wake) {
            Ok(MultiListen::Messages(found)) => {
                Ok(Now::Reply(batch(found, &q, now, &mut consumed)))
            }
            Ok(MultiListen::Park(parked)) => {
                let names = q.channels.iter().map(|c| c.0);
                let key = st.listeners.park_multi(names, &parked, handle, linger);
                if let Some(d) = detached.take() {
                    detach::insert(&mut st.detached, d, key);
                }
                Ok(Now::Parked(key))
            }
            Err(e) => Err(e),
        };
        for (name, after, upto) in consumed {
            z.store().consume(name, after, upto);
        }
        Some(now_result)
    })
    .flatten();
    worker::wake(&wake);
    match outcome {
        None => response::json(r, 200, json::EMPTY_BATCH, q.callback),
        Some(Ok(Now::Reply(Some(body)))) => reply(r, &body, q.callback),
        Some(Ok(Now::Reply(None))) => unavailable(r),
        Some(Ok(Now::Parked(key))) => parked(r, handle, key, lcf),
        Some(Ok(Now::Revived(key))) => {
            // SAFETY: `r` and its connection are live.
            let log = unsafe { (*(*r).connection).log };
            martd_debug!(log, "multi-channel listener #{} taken over by its connection", key.index);
            parked(r, handle, key, lcf)
        }
        Some(Err(e)) => refused(r, e, q.channels.first().map_or(&b""[..], |c| c.0)),
    }
}

/// The reply listing `found` (channels with newer messages, by index in `q`); `consumed`
/// gets what one-to-one channels delivered, for the caller to tell the store. `None`: no
/// memory for it.
fn batch<'q>(
    found: MultiPeek<'_, zone::ShmAlloc>,
    q: &ListenQuery<'q>,
    now: u64,
    consumed: &mut Vec<(&'q [u8], MsgId, MsgId)>,
) -> Option<Vec<u8>> {
    let mut fragments = Vec::with_capacity(found.len());
    for (i, ch, since) in found {
        let Some((fragment, last)) = ch.json_fragment(since, now, false) else {
            continue;
        };
        fragments.push(fragment);
        if ch.one2one() {
            consumed.push((q.channels[i].0, since, last));
        }
    }
    let fragments = fragments.into_iter().collect::<Option<Vec<_>>>()?;
    json::batch(fragments.iter().map(|v| &v[..]))
}

/// An interval-poll of several channels: every newer message at once, or `304`.
fn interval(r: *mut ngx_http_request_t, q: &ListenQuery<'_>) -> ngx_int_t {
    let mcf = main_conf(r);
    let now = now_ms();
    let body = worker::with(|_| {
        let mut z = zone::lock(mcf)?;
        let mut consumed: Vec<(&[u8], MsgId, MsgId)> = Vec::new();
        let found = z.store().peek_multi(&q.channels, now);
        if found.is_empty() {
            return None;
        }
        let body = batch(found, q, now, &mut consumed);
        for (name, after, upto) in consumed {
            z.store().consume(name, after, upto);
        }
        Some(body)
    })
    .flatten();
    match body {
        Some(Some(body)) => reply(r, &body, q.callback),
        Some(None) => unavailable(r),
        None => {
            response::no_store(r);
            response::send(r, 304, b"", response::Body::Bytes(b""), None)
        }
    }
}

/// A reply carrying messages: one delivery in the stats, however many it batches.
fn reply(r: *mut ngx_http_request_t, body: &[u8], callback: Option<&[u8]>) -> ngx_int_t {
    crate::stats::count::delivered(1);
    response::json(r, 200, body, callback)
}

/// A multi-channel listener's answer after it waited (`None`: nothing, at its timeout or the
/// worker's shutdown).
pub fn respond(r: *mut ngx_http_request_t, verdict: Option<Verdict>) -> ngx_int_t {
    let cb = callback(r);
    match verdict {
        Some(Verdict::Batch(body)) => reply(r, &body, cb),
        None => response::json(r, 200, json::EMPTY_BATCH, cb),
        Some(Verdict::Conflict) => {
            response::error(r, 409, "another listener took this one-to-one channel")
        }
        Some(Verdict::GoneChannel(name)) => {
            response::error_in(r, 410, "channel deleted", Some(&name))
        }
        Some(Verdict::Gone) => response::error(r, 410, "channel deleted"),
        Some(Verdict::Unavailable | Verdict::Deliver(_) | Verdict::DeliverOn(..)) => unavailable(r),
    }
}
