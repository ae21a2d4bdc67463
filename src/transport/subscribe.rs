//! A streaming subscriber arrives: its resume id, its channels counted in the zone (all or
//! none), the stored messages it missed in id order, then [`streaming::open`].
//!
//! [`streaming::open`]: super::streaming::open

use std::rc::Rc;

use martd_core::api::ListenQuery;
use martd_core::listeners::Payload;
use martd_core::msgid::{parse_etag, MsgId, Since};
use martd_core::store::{Listen, ListenOpts, StoreError};
use martd_core::transport::sse;
use nginx_sys::{ngx_http_request_t, ngx_int_t, NGX_ERROR};

use super::request_header;
use super::streaming::{open, prepare, Kind};
use crate::conf::LocConf;
use crate::listen::{self, listen_opts, main_conf, refused, Handle};
use crate::response::{self, Body};
use crate::worker::{self, now_ms};
use crate::zone;

/// The id a subscriber resumes after: `Last-Event-ID` (EventSource), the `last_event_id`
/// argument, else `If-None-Match` / `If-Modified-Since`. `Err`: the reason of a `400`.
fn resume_since(r: *mut ngx_http_request_t, kind: Kind) -> Result<Since, &'static str> {
    if let Some(id) = resume_id(r, kind)? {
        return Ok(Since::After(id));
    }
    let (etag, modified) = listen::request_ids(r);
    if etag.is_none() {
        if let Some(v) = request_header(r, "If-None-Match") {
            if parse_etag(v).is_none() {
                return Err("invalid If-None-Match");
            }
        }
    }
    Ok(Since::from_headers(etag, modified))
}

/// Handles a streaming listen request on channels `names` (one, or several from
/// `martd_channel_id_delimiter`).
pub fn listen(
    r: *mut ngx_http_request_t,
    lcf: &LocConf,
    names: &[Vec<u8>],
    kind: Kind,
) -> ngx_int_t {
    let since = match resume_since(r, kind) {
        Ok(s) => s,
        Err(reason) => return response::error(r, 400, reason),
    };
    let channels: Vec<(&[u8], Since)> = names.iter().map(|n| (&n[..], since)).collect();
    subscribe(r, lcf, &channels, kind, false)
}

/// `martd_listen json` with a streaming transport: the channels and ids of martd's listen
/// request (`?chanA=ETAG&chanB=ETAG`), each message in the JSON envelope. A reconnecting
/// EventSource's `Last-Event-ID` (or `last_event_id`) resumes every channel past it.
pub fn listen_json(
    r: *mut ngx_http_request_t,
    lcf: &LocConf,
    q: &ListenQuery<'_>,
    kind: Kind,
) -> ngx_int_t {
    let resume = match resume_id(r, kind) {
        Ok(id) => id.unwrap_or(0),
        Err(reason) => return response::error(r, 400, reason),
    };
    let channels: Vec<(&[u8], Since)> =
        q.channels.iter().map(|&(n, id)| (n, Since::After(id.max(resume)))).collect();
    subscribe(r, lcf, &channels, kind, true)
}

/// `Last-Event-ID` (EventSource), else the `last_event_id` argument, if given.
fn resume_id(r: *mut ngx_http_request_t, kind: Kind) -> Result<Option<MsgId>, &'static str> {
    if kind == Kind::EventSource {
        if let Some(v) = request_header(r, "Last-Event-ID") {
            return sse::parse_last_event_id(v).map(Some).ok_or("invalid Last-Event-ID");
        }
    }
    match crate::attrs::arg(r, "last_event_id") {
        Some(v) => sse::parse_last_event_id(&v).map(Some).ok_or("invalid last_event_id"),
        None => Ok(None),
    }
}

/// Parks a streaming subscriber on `channels` (each with what it has seen), all or none,
/// and opens its stream with what it missed. `json`: messages in the JSON envelope.
fn subscribe(
    r: *mut ngx_http_request_t,
    lcf: &LocConf,
    channels: &[(&[u8], Since)],
    kind: Kind,
    json: bool,
) -> ngx_int_t {
    if kind == Kind::WebSocket {
        if let Err(reason) = super::websocket::check_handshake(r) {
            return response::error(r, 400, reason);
        }
    }
    if !worker::accepting() {
        // An empty stream: the client connects again, to a worker that is not leaving.
        return response::send(r, 200, kind.content_type(), Body::Bytes(b""), None);
    }
    let publish = match (kind, channels) {
        (Kind::WebSocket, &[(channel, _)]) if lcf.websocket_publish != 0 => {
            let key = match crate::attrs::key(r) {
                Ok(k) => k,
                Err(reason) => return response::error(r, 400, &reason),
            };
            Some(super::websocket::WsPublish {
                channel: channel.to_vec(),
                key,
                opts: crate::push::publish_opts(lcf),
            })
        }
        _ => None,
    };
    let Some(ctx) = prepare(r, lcf, kind, channels.len() > 1, json) else {
        return NGX_ERROR as ngx_int_t;
    };
    // SAFETY: `ctx` was just made for this live request.
    if let Some(ws) = unsafe { (*ctx).ws.as_mut() } {
        ws.publish = publish;
    }
    let mcf = main_conf(r);
    let now = now_ms();
    let mut wake = Vec::new();
    let token = crate::access::tokens::to_charge(r, lcf);
    let outcome = worker::with(|st| {
        let slot = st.slot?;
        let opts = ListenOpts { stream: true, ..listen_opts(lcf, slot) };
        let mut z = zone::lock(mcf)?;
        if let Some(t) = &token {
            match t.charge(&mut z, mcf, slot, channels.iter().map(|c| c.0)) {
                // SAFETY: `ctx` was made for this live request; dropped with it.
                Ok(c) => unsafe { (*ctx).charge = Some(c) },
                Err(e) => return Some(Err((0, e))),
            }
        }
        let store = z.store();
        let mut parked = Vec::with_capacity(channels.len());
        for (i, &(name, since)) in channels.iter().enumerate() {
            let res = match store.listen(name, since, &opts, now, &mut wake) {
                Ok(Listen::Park(p)) => Ok(p),
                // Not with `stream`.
                Ok(Listen::Message(_)) => Err(StoreError::NotFound),
                Err(e) => Err(e),
            };
            match res {
                Ok(p) => parked.push(p),
                Err(e) => {
                    // All channels or none: the ones counted already leave.
                    for ((n, _), p) in channels.iter().zip(&parked) {
                        store.release(n, p.serial, slot, 1, None);
                    }
                    return Some(Err((i, e)));
                }
            }
        }
        // Every stored message newer than the resume id, of every channel, in id order.
        let mut backlog: Vec<(Rc<Payload>, usize)> = Vec::new();
        // The first message that could not be copied: the backlog stops before it.
        let mut missing = u64::MAX;
        for (i, ((name, _), p)) in channels.iter().zip(&parked).enumerate() {
            let Some(ch) = store.channel(name, p.serial) else { continue };
            for m in ch.messages_after(p.since, now, false) {
                match st.listeners.cache.get(m) {
                    Some(payload) => backlog.push((payload, i)),
                    None => {
                        missing = missing.min(m.id);
                        break;
                    }
                }
            }
        }
        backlog.sort_by_key(|(p, _)| p.id);
        backlog.retain(|(p, _)| p.id < missing);
        let complete = missing == u64::MAX;
        let mut keys = Vec::with_capacity(channels.len());
        for (i, (&(name, _), mut p)) in channels.iter().zip(parked).enumerate() {
            if let Some((last, _)) = backlog.iter().rev().find(|(_, c)| *c == i) {
                // A one-to-one channel's messages are consumed by their delivery.
                store.consume(name, p.since, last.id);
                p.since = last.id;
            }
            keys.push(st.listeners.park_stream(name, &p, Handle::Stream(ctx)));
        }
        Some(Ok((keys, backlog, complete)))
    })
    .flatten();
    worker::wake(&wake);
    match outcome {
        None => response::send(r, 200, kind.content_type(), Body::Bytes(b""), None),
        Some(Err((i, e))) => refused(r, e, channels.get(i).map_or(&b""[..], |c| c.0)),
        Some(Ok((keys, backlog, complete))) => {
            let backlog: Vec<_> = backlog
                .into_iter()
                .map(|(p, i)| (p, channels.get(i).map(|c| Rc::<[u8]>::from(c.0))))
                .collect();
            open(ctx, keys, &backlog, complete, lcf)
        }
    }
}
