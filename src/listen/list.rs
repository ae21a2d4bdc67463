//! Long-poll and interval-poll of a channel list (`martd_channel_id_delimiter`).
//!
//! The request's ids (`If-None-Match` / `If-Modified-Since`, as for one channel) resume every
//! channel of the list: message ids are unique and increasing in the whole zone. The answer is
//! one message, the oldest newer one of any of the channels, as a single-channel long-poll
//! answers it, plus `X-Martd-Channel`; its `Etag` asks for the next one. With nothing newer, a
//! long-poll parks on every channel at once (all or none, as `martd_listen json` does; see
//! `martd_core::listeners::Listeners::park_first`) and detaches like any listener on a
//! keep-alive HTTP/1.x connection; an interval-poll gets `304`.

use martd_core::msgid::{MsgId, Since};
use martd_core::store::{oldest, MultiListen, StoreError};
use nginx_sys::{ngx_http_request_t, ngx_int_t, NGX_ERROR};

use super::{
    answer_or_park, deliver_on, main_conf, not_modified, parked, refused, request_ids, unavailable,
};
use crate::conf::LocConf;
use crate::worker::{self, now_ms};
use crate::zone;

/// What a listen request on a channel list gets at once.
enum Now {
    /// The oldest newer message (`None`: no memory for the worker's copy) and the index of
    /// its channel in the list.
    Message(Option<std::rc::Rc<martd_core::listeners::Payload>>, usize),
    Parked(martd_core::listeners::ListenerKey),
}

/// Handles a long-poll (`interval`: an interval-poll) on channels `names` (two or more,
/// checked by `channel_ids`).
pub fn listen(
    r: *mut ngx_http_request_t,
    lcf: &LocConf,
    names: &[Vec<u8>],
    interval: bool,
) -> ngx_int_t {
    let (etag, modified) = request_ids(r);
    let since = Since::from_headers(etag, modified);
    let channels: Vec<(&[u8], Since)> = names.iter().map(|n| (&n[..], since)).collect();
    if interval {
        return poll(r, &channels);
    }
    if !worker::accepting() {
        return not_modified(r);
    }
    let now = now_ms();
    let Some((handle, outcome)) = answer_or_park(r, lcf, |p| {
        p.charge(channels.iter().map(|c| c.0))?;
        let mut consumed: Option<(usize, MsgId)> = None;
        let result = match p.z.store().listen_multi(&channels, &p.opts, now, &mut p.wake) {
            Ok(MultiListen::Messages(found)) => match oldest(&found, now) {
                Some((i, m)) => {
                    consumed = Some((i, m.id));
                    Ok(Now::Message(p.st.listeners.cache.get(m), i))
                }
                // Not possible: every channel found has a newer message.
                None => Err(StoreError::NotFound),
            },
            Ok(MultiListen::Park(parked)) => {
                let names = channels.iter().map(|c| c.0);
                let key = p.st.listeners.park_first(names, &parked, p.handle);
                Ok(Now::Parked(p.keep(key)))
            }
            Err(e) => Err(e),
        };
        if let Some((i, id)) = consumed {
            // A one-to-one channel's message is consumed by its delivery.
            p.z.store().consume(channels[i].0, id - 1, id);
        }
        result
    }) else {
        return NGX_ERROR as ngx_int_t;
    };
    match outcome {
        None => not_modified(r),
        Some(Ok(Now::Message(Some(payload), i))) => deliver_on(r, &payload, &names[i]),
        Some(Ok(Now::Message(None, _))) => unavailable(r),
        Some(Ok(Now::Parked(key))) => parked(r, handle, key, lcf),
        Some(Err(e)) => refused(r, e, channels.first().map_or(&b""[..], |c| c.0)),
    }
}

/// An interval-poll of a channel list: the oldest newer message at once, or `304`.
fn poll(r: *mut ngx_http_request_t, channels: &[(&[u8], Since)]) -> ngx_int_t {
    let mcf = main_conf(r);
    let now = now_ms();
    let found = worker::with(|st| {
        let mut z = zone::lock(mcf)?;
        let found = z.store().peek_multi(channels, now);
        let (i, m) = oldest(&found, now)?;
        let (id, payload) = (m.id, st.listeners.cache.get(m));
        // A one-to-one channel's message is consumed by its delivery.
        z.store().consume(channels[i].0, id - 1, id);
        Some((payload, i))
    })
    .flatten();
    match found {
        Some((Some(payload), i)) => deliver_on(r, &payload, channels[i].0),
        Some((None, _)) => unavailable(r),
        None => not_modified(r),
    }
}
