//! The `martd_push` endpoint: publish (`POST`/`PUT`), channel info (`GET`), delete
//! (`DELETE`).

use martd_core::info::{ChannelInfo, InfoFormat};
use martd_core::key::hash_key;
use martd_core::queue::{MessageSpec, MAX_CONTENT_TYPE, MAX_EVENT};
use martd_core::store::{PublishOpts, StoreError};
use nginx_sys::{
    ngx_chain_t, ngx_http_discard_request_body, ngx_http_finalize_request,
    ngx_http_read_client_request_body, ngx_http_request_t, ngx_int_t, NGX_DONE, NGX_ERROR,
    NGX_HTTP_DELETE, NGX_HTTP_GET, NGX_HTTP_POST, NGX_HTTP_PUT, NGX_HTTP_SPECIAL_RESPONSE,
    NGX_LOG_ERR, NGX_OK,
};

use crate::attrs;
use crate::backend::held;
use crate::channel_id::channel_id;
use crate::conf::LocConf;
use crate::listen::{main_conf, method};
use crate::response::{self, Body};
use crate::stats::vars;
use crate::worker::{self, now_ms};
use crate::zone;

fn loc_conf(r: *mut ngx_http_request_t) -> &'static LocConf {
    // SAFETY: the handler runs in a location whose martd conf was created by us.
    unsafe { &*(*(*r).loc_conf.add(crate::module().ctx_index) as *const LocConf) }
}

/// The `Accept` header, if any.
fn accept(r: *mut ngx_http_request_t) -> Option<&'static [u8]> {
    // SAFETY: `r` is a live request; its header list and values live as long as it.
    let req = unsafe { ngx::http::Request::from_ngx_http_request(r) };
    req.headers_in_iterator()
        .find(|(k, _)| k.as_bytes().eq_ignore_ascii_case(b"accept"))
        // SAFETY: the value belongs to the request's header list (see above).
        .map(|(_, v)| unsafe {
            std::slice::from_raw_parts(v.as_bytes().as_ptr(), v.as_bytes().len())
        })
}

fn info_response(
    r: *mut ngx_http_request_t,
    lcf: &LocConf,
    status: usize,
    info: &ChannelInfo,
) -> ngx_int_t {
    let format = if lcf.json { InfoFormat::Json } else { InfoFormat::from_accept(accept(r)) };
    let body = info.render(format);
    response::send(r, status, format.content_type().as_bytes(), Body::Bytes(body.as_bytes()), None)
}

/// `507`, with an error log line at most once a second per worker.
pub fn zone_full(r: *mut ngx_http_request_t, channel: &[u8]) -> ngx_int_t {
    let now = nginx_sys::ngx_time() as i64;
    let log_now = worker::with(|st| {
        let due = st.last_full_log != now;
        st.last_full_log = now;
        due
    })
    .unwrap_or(true);
    if log_now {
        // SAFETY: the connection's log is live.
        let log = unsafe { (*(*r).connection).log };
        martd_log!(
            NGX_LOG_ERR,
            log,
            "shared zone \"martd\" is full (martd_shm_size), refused a message for channel \"{}\"",
            String::from_utf8_lossy(&channel[..channel.len().min(64)])
        );
    }
    response::error(r, 507, "shared memory zone is full")
}

/// The content handler of `martd_push` locations.
pub unsafe extern "C" fn push_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    if let Some(rc) = crate::access::cors::answer(r, b"GET, POST, PUT, DELETE") {
        return rc;
    }
    let m = method(r);
    let lcf = loc_conf(r);
    if m == NGX_HTTP_POST as usize || m == NGX_HTTP_PUT as usize {
        // Bad input is refused before the body is read.
        let checked = channel_id(r, lcf)
            .map_err(|e| e.to_string())
            .and_then(|_| attrs::from_request(r, lcf))
            .and_then(|_| check_message_headers(r));
        if let Err(reason) = checked {
            // SAFETY: live request.
            let rc = unsafe { ngx_http_discard_request_body(r) };
            if rc != NGX_OK as ngx_int_t {
                return rc;
            }
            return response::error(r, 400, &reason);
        }
        // SAFETY: live request; nginx calls `publish_body` once the body is read (memory or
        // temp file) and holds the request until then.
        let rc = unsafe { ngx_http_read_client_request_body(r, Some(publish_body)) };
        if rc >= NGX_HTTP_SPECIAL_RESPONSE as ngx_int_t {
            return rc;
        }
        return NGX_DONE as ngx_int_t;
    }
    // SAFETY: live request.
    let rc = unsafe { ngx_http_discard_request_body(r) };
    if rc != NGX_OK as ngx_int_t {
        return rc;
    }
    if m != NGX_HTTP_GET as usize && m != NGX_HTTP_DELETE as usize {
        response::add_header(r, "Allow", b"GET, POST, PUT, DELETE");
        return response::error(r, 405, "publishers take GET, POST, PUT and DELETE");
    }
    let name = match channel_id(r, lcf) {
        Ok(n) => n,
        Err(reason) => return response::error(r, 400, &reason.to_string()),
    };
    let key = match attrs::key(r) {
        Ok(k) => k,
        Err(reason) => return response::error(r, 400, &reason),
    };
    let mcf = main_conf(r);
    let now = now_ms();
    if m == NGX_HTTP_DELETE as usize && mcf.redis_url.len > 0 {
        return delete_through_redis(r, lcf, &name, key.as_deref(), now);
    }
    let mut wake = Vec::new();
    let info = zone::lock(mcf).map(|mut z| {
        if m == NGX_HTTP_GET as usize {
            Ok(z.store().info(&name, now))
        } else {
            let key = key.map(|k| hash_key(z.root().salt, &k));
            z.store().delete(&name, key.as_ref(), now, &mut wake)
        }
    });
    worker::wake(&wake);
    match info {
        None => NGX_ERROR as ngx_int_t,
        Some(Ok(Some(info))) => {
            if m == NGX_HTTP_GET as usize {
                vars::set_counts(r, info.listeners.into(), info.messages as u64);
            }
            info_response(r, lcf, 200, &info)
        }
        Some(Ok(None)) => response::error(r, 404, "no such channel"),
        Some(Err(_)) => forbidden(r),
    }
}

/// `403`: the channel has a key and the request did not carry it.
fn forbidden(r: *mut ngx_http_request_t) -> ngx_int_t {
    response::error(r, 403, "wrong or missing key for this channel")
}

/// Why a body could not be read.
enum BodyError {
    /// Larger than the zone could ever hold (no memory is asked for it).
    TooLarge(u64),
    /// The worker could not allocate a buffer of this size.
    NoMemory(u64),
    Io(std::io::Error),
}

/// The length of the request body, from memory buffers and/or the temp file.
///
/// # Safety
/// `first` is the live request body chain.
unsafe fn body_len(first: *mut ngx_chain_t) -> u64 {
    let mut total = 0u64;
    let mut cl = first;
    // SAFETY: the chain and its buffers belong to the live request.
    unsafe {
        while let Some(link) = cl.as_ref() {
            let b = &*link.buf;
            total = total.saturating_add(if b.in_file() != 0 && !b.file.is_null() {
                (b.file_last - b.file_pos).max(0) as u64
            } else if !b.pos.is_null() && b.last > b.pos {
                b.last.offset_from(b.pos) as u64
            } else {
                0
            });
            cl = link.next;
        }
    }
    total
}

/// The request body, from memory buffers and/or the temp file. Nothing larger than `limit`
/// bytes is read, and the buffer is allocated fallibly: a client-sized allocation never aborts
/// the worker.
fn read_body(r: *mut ngx_http_request_t, limit: u64) -> Result<Vec<u8>, BodyError> {
    let mut out = Vec::new();
    // SAFETY: `request_body` and its chain belong to the live request; file buffers name the
    // temp file's descriptor and the byte range to read.
    unsafe {
        let rb = (*r).request_body;
        if rb.is_null() {
            return Ok(out);
        }
        let total = body_len((*rb).bufs);
        if total > limit {
            return Err(BodyError::TooLarge(total));
        }
        out.try_reserve_exact(total as usize).map_err(|_| BodyError::NoMemory(total))?;
        let mut cl: *mut ngx_chain_t = (*rb).bufs;
        while let Some(link) = cl.as_ref() {
            let b = &*link.buf;
            if b.in_file() != 0 && !b.file.is_null() {
                let fd = (*b.file).fd;
                let (start, end) = (b.file_pos, b.file_last);
                let mut pos = start;
                let base = out.len();
                // Reserved above: no reallocation.
                out.resize(base + (end - start) as usize, 0);
                while pos < end {
                    let dst = out.as_mut_ptr().add(base + (pos - start) as usize);
                    let n = libc::pread(fd, dst as *mut _, (end - pos) as usize, pos);
                    if n <= 0 {
                        return Err(BodyError::Io(std::io::Error::last_os_error()));
                    }
                    pos += n as i64;
                }
            } else if !b.pos.is_null() && b.last > b.pos {
                out.extend_from_slice(std::slice::from_raw_parts(
                    b.pos,
                    b.last.offset_from(b.pos) as usize,
                ));
            }
            cl = link.next;
        }
    }
    Ok(out)
}

/// `martd_redis_url`: the message (and the channel's attributes, if the push names any) go to
/// Redis through the zone's outbox; the publisher is answered once Redis took them and this
/// node stored the message (see `backend::redis`). Attributes are applied here at once and
/// every other node restores the channel's whole attributes from Redis.
fn publish_through_redis(
    r: *mut ngx_http_request_t,
    lcf: &'static LocConf,
    name: &[u8],
    attrs: &attrs::PushAttrs,
    spec: Option<&MessageSpec<'_>>,
    opts: &PublishOpts,
    now: u64,
) -> ngx_int_t {
    let mcf = main_conf(r);
    let Some(slot) = worker::with(|st| st.slot).flatten() else {
        return response::error(r, 503, "this worker takes no publishes (shutting down)");
    };
    let mut wake = Vec::new();
    let queued = zone::lock(mcf).map(|mut z| {
        let update = attrs.hashed(z.root().salt);
        let store = z.store();
        if !store.admits(name, update.key.as_ref()) {
            return Err(StoreError::Forbidden);
        }
        let mut attrs_record = Vec::new();
        if attrs.any() {
            store.publish(name, None, &update, opts, now, &mut wake)?;
            store.attrs_record(name, &mut attrs_record);
        }
        // The message travels with the buffer length and life it gets here.
        let mut record = Vec::new();
        if let Some(spec) = spec {
            let (len, channel_life) = store.effective(name, &update, opts);
            let life = attrs.expire_ms.unwrap_or(channel_life);
            let keep = if opts.store { len } else { 0 };
            let message = martd_core::persist::SavedMessage {
                channel: name,
                channel_timeout_ms: opts.channel_timeout_ms,
                id: 0,
                time: now / 1000,
                expires_ms: if life == 0 { u64::MAX } else { now.saturating_add(life) },
                keep: keep.min(u32::MAX as usize) as u32,
                content_type: spec.content_type,
                event: spec.event,
                body: spec.body,
            };
            let rec = martd_core::persist::Record::Message(message);
            martd_core::persist::encode(&rec, &mut record);
        }
        let mut seq = None;
        for rec in [&attrs_record, &record] {
            if !rec.is_empty() {
                seq = Some(store.outbox_push(slot, name, rec)?);
            }
        }
        Ok(seq.map(|seq| (seq, store.outbox_signal())))
    });
    worker::wake(&wake);
    let seq = match queued {
        None => return NGX_ERROR as ngx_int_t,
        Some(Err(StoreError::Forbidden)) => return forbidden(r),
        Some(Err(StoreError::NoMemory)) => return zone_full(r, name),
        Some(Err(e)) => return held::refused(r, e),
        Some(Ok(None)) => return response::error(r, 400, "nothing to publish"),
        Some(Ok(Some((seq, signal)))) => {
            if signal {
                crate::backend::redis::signal(mcf);
            }
            seq
        }
    };
    let has_spec = spec.is_some();
    let answer = move |r: *mut ngx_http_request_t, done: Option<martd_core::store::Done>| {
        let Some(d) = done.filter(|d| d.id > 0) else {
            return held::refused(r, StoreError::Unavailable);
        };
        if d.unconfirmed {
            return response::error(
                r,
                503,
                "redis did not confirm the message on enough replicas (martd_redis_wait) in \
                 time: it may still be delivered",
            );
        }
        let info = d.info;
        if !has_spec {
            return match info {
                Some(info) if lcf.json => response::json(
                    r,
                    200,
                    &martd_core::json::published(info.last_message_id, info.listeners),
                    None,
                ),
                Some(info) => info_response(r, lcf, 200, &info),
                None => response::error(r, 200, "attributes set"),
            };
        }
        vars::set_message_id(r, d.id);
        if lcf.json {
            return response::json(r, 200, &martd_core::json::published(d.id, d.listeners), None);
        }
        match info {
            Some(info) => info_response(r, lcf, if d.listeners > 0 { 201 } else { 202 }, &info),
            None => response::error(r, if d.listeners > 0 { 201 } else { 202 }, "published"),
        }
    };
    let wait = held::Wait::Redis { seq, deadline_ms: now.saturating_add(REDIS_ANSWER_MS) };
    held::hold(r, wait, Box::new(answer))
}

/// `martd_redis_url`: a delete goes to Redis through the outbox (the channel's stream is
/// dropped and every node deletes the channel); answered with the channel as it was here.
fn delete_through_redis(
    r: *mut ngx_http_request_t,
    lcf: &'static LocConf,
    name: &[u8],
    key: Option<&[u8]>,
    now: u64,
) -> ngx_int_t {
    let mcf = main_conf(r);
    let Some(slot) = worker::with(|st| st.slot).flatten() else {
        return response::error(r, 503, "this worker takes no deletes (shutting down)");
    };
    let mut record = Vec::new();
    martd_core::persist::encode(
        &martd_core::persist::Record::Delete { channel: name },
        &mut record,
    );
    let queued = zone::lock(mcf).map(|mut z| {
        let key = key.map(|k| hash_key(z.root().salt, k));
        let store = z.store();
        if !store.admits(name, key.as_ref()) {
            return Err(StoreError::Forbidden);
        }
        let Some(info) = store.info(name, now) else { return Ok(None) };
        let seq = store.outbox_push(slot, name, &record)?;
        Ok(Some((seq, store.outbox_signal(), info)))
    });
    let (seq, info) = match queued {
        None => return NGX_ERROR as ngx_int_t,
        Some(Err(StoreError::Forbidden)) => return forbidden(r),
        Some(Err(StoreError::NoMemory)) => return zone_full(r, name),
        Some(Err(e)) => return held::refused(r, e),
        Some(Ok(None)) => return response::error(r, 404, "no such channel"),
        Some(Ok(Some((seq, signal, info)))) => {
            if signal {
                crate::backend::redis::signal(mcf);
            }
            (seq, info)
        }
    };
    let answer = move |r: *mut ngx_http_request_t, done: Option<martd_core::store::Done>| match done
        .filter(|d| d.id > 0)
    {
        Some(_) => info_response(r, lcf, 200, &info),
        None => held::refused(r, StoreError::Unavailable),
    };
    let wait = held::Wait::Redis { seq, deadline_ms: now.saturating_add(REDIS_ANSWER_MS) };
    held::hold(r, wait, Box::new(answer))
}

/// How long a publish waits for Redis before it is answered `503`.
const REDIS_ANSWER_MS: u64 = 10_000;

/// The answer to a publish the store took (`has_spec`: with a message).
fn published_response(
    r: *mut ngx_http_request_t,
    lcf: &LocConf,
    has_spec: bool,
    p: &martd_core::store::Published,
) -> ngx_int_t {
    if lcf.json {
        return response::json(r, 200, &martd_core::json::published(p.id, p.listeners), None);
    }
    let status = match (has_spec, p.listeners) {
        (false, _) => 200,
        (true, 0) => 202,
        (true, _) => 201,
    };
    info_response(r, lcf, status, &p.info)
}

extern "C" fn publish_body(r: *mut ngx_http_request_t) {
    let rc = publish(r);
    // SAFETY: the body handler owns the request's final step.
    unsafe { ngx_http_finalize_request(r, rc) };
}

/// How location `lcf` publishes.
pub fn publish_opts(lcf: &LocConf) -> PublishOpts {
    PublishOpts {
        buffer_len: lcf.buffer_length.max(0) as usize,
        buffer_max: lcf.buffer_length_max.max(0) as usize,
        timeout_ms: lcf.message_timeout as u64,
        store: lcf.store_messages != 0,
        channel_timeout_ms: lcf.channel_timeout as u64,
    }
}

/// The message's `X-Martd-Event` (its EventSource event name), if any.
fn event_name(r: *mut ngx_http_request_t) -> Option<Vec<u8>> {
    crate::transport::request_header(r, "X-Martd-Event").map(<[u8]>::to_vec)
}

/// A message's own headers: a `Content-Type` and an `X-Martd-Event` it can keep. The error is
/// the reason of a `400`.
fn check_message_headers(r: *mut ngx_http_request_t) -> Result<(), String> {
    // SAFETY: `r` is live; the Content-Type header (if any) lives as long as it.
    let ct_len = unsafe { (*r).headers_in.content_type.as_ref().map_or(0, |h| h.value.len) };
    if ct_len > MAX_CONTENT_TYPE {
        return Err(format!("Content-Type longer than {MAX_CONTENT_TYPE} bytes"));
    }
    match event_name(r) {
        Some(e) if e.len() > MAX_EVENT => {
            Err(format!("X-Martd-Event longer than {MAX_EVENT} bytes"))
        }
        Some(e) if e.iter().any(|&b| b < 0x20 || b == 0x7f) => {
            Err("X-Martd-Event with a control character".into())
        }
        _ => Ok(()),
    }
}

fn publish(r: *mut ngx_http_request_t) -> ngx_int_t {
    let lcf = loc_conf(r);
    let (Ok(name), Ok(attrs)) = (channel_id(r, lcf), attrs::from_request(r, lcf)) else {
        return response::error(r, 400, "bad channel id or attributes");
    };
    let mcf = main_conf(r);
    // SAFETY: the connection's log is live.
    let log = unsafe { (*(*r).connection).log };
    let body = match read_body(r, mcf.shm_size as u64) {
        Ok(b) => b,
        Err(BodyError::TooLarge(n)) => {
            martd_log!(
                NGX_LOG_ERR,
                log,
                "refused a message of {} bytes: larger than the \"martd\" zone (martd_shm_size)",
                n
            );
            return response::error(r, 413, "message larger than the shared memory zone");
        }
        Err(BodyError::NoMemory(n)) => {
            martd_log!(NGX_LOG_ERR, log, "could not allocate {} bytes for a message body", n);
            return response::error(r, 503, "no memory for the message, try again");
        }
        Err(BodyError::Io(e)) => {
            martd_log!(NGX_LOG_ERR, log, "could not read the request body: {}", e);
            return NGX_ERROR as ngx_int_t;
        }
    };
    // SAFETY: `r` is live; the Content-Type header (if any) lives as long as it.
    let content_type =
        unsafe { (*r).headers_in.content_type.as_ref().map(|h| h.value.as_bytes()).unwrap_or(b"") };
    let opts = publish_opts(lcf);
    let event = event_name(r).unwrap_or_default();
    let spec = MessageSpec {
        content_type,
        event: &event,
        body: &body,
        timeout_ms: opts.timeout_ms,
        expire_ms: attrs.expire_ms,
    };
    // An empty push only sets attributes: always in martd's API, and in the relay protocol
    // when it names any (else it is an empty message, as that protocol has it).
    let attributes_only = body.is_empty() && (lcf.json || attrs.any());
    let spec = (!attributes_only).then_some(&spec);
    let now = now_ms();
    if mcf.redis_url.len > 0 {
        if attrs.token.is_some() {
            return response::error(
                r,
                400,
                "with martd_redis_url, channel tokens are not shared between nodes and not \
                 accepted",
            );
        }
        return publish_through_redis(r, lcf, &name, &attrs, spec, &opts, now);
    }
    let mut wake = Vec::new();
    let result = zone::lock(mcf).map(|mut z| {
        let nonce = z.root().salt;
        let update = attrs.hashed(nonce);
        let store = z.store();
        if let Some(t) = &attrs.token {
            // Registered first, with the channel's key checked: a message is never stored
            // with its token refused.
            if !store.admits(&name, update.key.as_ref()) {
                return Err(StoreError::Forbidden);
            }
            store.add_token(&name, &hash_key(nonce, t), attrs.token_ttl_ms, now, &opts)?;
        }
        let published = store.publish(&name, spec, &update, &opts, now, &mut wake)?;
        // `martd_persist ... sync=always`: answered once it is on disk.
        let wait = match worker::with(|st| st.slot).flatten() {
            Some(slot) if mcf.persist_sync_ms == 0 => store.journal_wait(slot),
            _ => None,
        };
        Ok((published, wait))
    });
    worker::wake(&wake);
    if let Some(Ok((p, _))) = &result {
        if spec.is_some() {
            vars::set_message_id(r, p.id);
        }
        vars::set_counts(r, p.info.listeners.into(), p.info.messages as u64);
    }
    let has_spec = spec.is_some();
    let result = match result {
        Some(Ok((p, Some(pos)))) => {
            let answer = move |r, _| published_response(r, lcf, has_spec, &p);
            return held::hold(r, held::Wait::Durable(pos), Box::new(answer));
        }
        Some(Ok((p, None))) => Some(Ok(p)),
        Some(Err(e)) => Some(Err(e)),
        None => None,
    };
    match result {
        None => NGX_ERROR as ngx_int_t,
        Some(Ok(p)) => published_response(r, lcf, has_spec, &p),
        Some(Err(StoreError::NoMemory)) => zone_full(r, &name),
        Some(Err(StoreError::Forbidden)) => forbidden(r),
        Some(Err(
            e @ (StoreError::Behind
            | StoreError::DiskFailing
            | StoreError::Superseded
            | StoreError::Unavailable),
        )) => crate::backend::held::refused(r, e),
        Some(Err(StoreError::TooManyTokens)) => response::error(
            r,
            409,
            &format!("the channel has {} tokens already", martd_core::store::MAX_TOKENS),
        ),
        Some(Err(_)) => NGX_ERROR as ngx_int_t,
    }
}
