//! The `martd_listen` endpoint: long-poll listeners.
//!
//! A listener gets a stored message at once when one is newer than its ids; otherwise its
//! request is parked: counted in the zone, kept in the worker's [`Listeners`], held open with
//! `r->main->count++`, watched for disconnects with `ngx_http_test_reading`, and given a
//! timer. It leaves the park through exactly one of: [`answer`] after a wake-up (message,
//! `409`, `410`), the timer (`304`), a graceful shutdown (`304`), or the request being freed
//! (disconnect), whose pool cleanup takes it out of the worker and the zone.
//!
//! [`Listeners`]: martd_core::listeners::Listeners

pub mod detach;
pub mod json;
pub mod list;
pub mod replay;

use std::ffi::c_void;
use std::ptr;

use std::rc::Rc;

use martd_core::listeners::{ListenerKey, Payload, Verdict, MULTI};
use martd_core::msgid::{parse_etag, Since};
use martd_core::store::{Listen, ListenOpts, StoreError, WakeTarget};
use nginx_sys::{
    ngx_del_timer, ngx_event_t, ngx_http_discard_request_body, ngx_http_finalize_request,
    ngx_http_request_empty_handler, ngx_http_request_t, ngx_http_run_posted_requests,
    ngx_http_test_reading, ngx_int_t, ngx_parse_http_time, ngx_pool_cleanup_add, ngx_table_elt_t,
    NGX_DONE, NGX_ERROR, NGX_HTTP_CLIENT_CLOSED_REQUEST, NGX_HTTP_GET, NGX_OK,
};

use crate::access::tokens::{self, Charging, TokenCharge};
use crate::channel_id::channel_ids;
use crate::conf::{LocConf, MainConf};
use crate::response::{self, Body};
use crate::transport::{self, streaming, subscribe, Transport};
use crate::worker::{self, now_ms};
use crate::zone;

/// How the worker's listeners refer to a parked listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handle {
    /// A parked request; its context lives in the request pool.
    Request(*mut ListenerCtx),
    /// A listener that gave its request back to nginx, by connection and detachment
    /// sequence number (see [`detach`]).
    ///
    /// [`detach`]: crate::listen::detach
    Detached { conn: usize, seq: u64 },
    /// A streaming subscriber (EventSource, chunked stream); its context lives as long as its
    /// request.
    Stream(*mut crate::transport::streaming::StreamCtx),
}

/// Answers a listener that has left the worker's listeners (`None`: `304`).
pub fn answer_handle(h: Handle, verdict: Option<Verdict>) {
    match h {
        Handle::Request(ctx) => answer(ctx, verdict),
        Handle::Detached { conn, seq } => {
            replay::replay(conn, seq, replay::Outcome::Answer(verdict))
        }
        Handle::Stream(ctx) => crate::transport::streaming::answer(ctx, verdict),
    }
}

/// A parked listener, kept in the request pool (as the data of its pool cleanup).
pub struct ListenerCtx {
    request: *mut ngx_http_request_t,
    /// Where it sits in the worker's listeners; `None` once it left.
    key: Option<ListenerKey>,
    timer: ngx_event_t,
    /// Its token charge (`martd_max_listeners_per_token`), discharged when its request goes.
    pub(crate) charge: Option<Box<TokenCharge>>,
}

fn header(elt: *mut ngx_table_elt_t) -> Option<&'static [u8]> {
    // SAFETY: a non-null header element of a live request; its value lives in the request.
    unsafe { elt.as_ref().map(|e| e.value.as_bytes()) }
}

/// The ids the request sent, as (`If-None-Match` id, `If-Modified-Since` seconds).
pub(crate) fn request_ids(r: *mut ngx_http_request_t) -> (Option<u64>, Option<u64>) {
    // SAFETY: `r` is a live request.
    let (inm, ims) = unsafe { ((*r).headers_in.if_none_match, (*r).headers_in.if_modified_since) };
    let etag = header(inm).and_then(parse_etag);
    let since = header(ims).and_then(|v| {
        // SAFETY: ngx_parse_http_time reads `len` bytes.
        let t = unsafe { ngx_parse_http_time(v.as_ptr() as *mut u8, v.len()) };
        (t >= 0).then_some(t as u64)
    });
    (etag, since)
}

pub(crate) fn loc_conf(r: *mut ngx_http_request_t) -> &'static LocConf {
    // SAFETY: the handler runs in a location whose martd conf was created by us.
    unsafe { &*(*(*r).loc_conf.add(crate::module().ctx_index) as *const LocConf) }
}

pub(crate) fn main_conf(r: *mut ngx_http_request_t) -> &'static MainConf {
    // SAFETY: as above, for the http block's main conf.
    unsafe { &*(*(*r).main_conf.add(crate::module().ctx_index) as *const MainConf) }
}

pub(crate) fn method(r: *mut ngx_http_request_t) -> usize {
    // SAFETY: `r` is a live request.
    unsafe { (*r).method }
}

/// The content handler of `martd_listen` locations.
pub unsafe extern "C" fn listen_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    match replay::take_outcome(r) {
        Some(replay::Outcome::Answer(verdict)) => return respond(r, verdict),
        Some(replay::Outcome::ClientGone) => {
            // SAFETY: `r` and its connection are live. As `ngx_http_test_reading` does for a
            // parked request whose client closed.
            unsafe { (*(*r).connection).set_error(1) };
            return NGX_HTTP_CLIENT_CLOSED_REQUEST as ngx_int_t;
        }
        None => {}
    }
    if let Some(rc) = crate::access::cors::answer(r, b"GET") {
        return rc;
    }
    // SAFETY: nginx calls content handlers with a live request.
    let rc = unsafe { ngx_http_discard_request_body(r) };
    if rc != NGX_OK as ngx_int_t {
        return rc;
    }
    if method(r) != NGX_HTTP_GET as usize {
        response::add_header(r, "Allow", b"GET");
        return response::error(r, 405, "listeners only GET");
    }
    let lcf = loc_conf(r);
    if lcf.require_token != 0 {
        if let Err(reason) = crate::attrs::token(r) {
            return response::error(r, 400, &reason);
        }
    }
    let transport = match transport::select(r, lcf) {
        Ok(t) => t,
        Err(reason) => return response::error(r, 406, reason),
    };
    if lcf.json {
        return json::listen(r, lcf, transport);
    }
    let names = match channel_ids(r, lcf) {
        Ok(n) => n,
        Err(reason) => return response::error(r, 400, &reason),
    };
    let kind = match transport {
        Transport::LongPoll | Transport::Interval if names.len() > 1 => {
            return list::listen(r, lcf, &names, transport == Transport::Interval)
        }
        Transport::LongPoll => None,
        Transport::Interval => return interval(r, &names[0]),
        Transport::EventSource => Some(streaming::Kind::EventSource),
        Transport::Stream => Some(streaming::Kind::Stream),
        Transport::WebSocket => Some(streaming::Kind::WebSocket),
    };
    if let Some(kind) = kind {
        return subscribe::listen(r, lcf, &names, kind);
    }
    let [name] = &names[..] else {
        // Lists went to `list::listen` above.
        return NGX_ERROR as ngx_int_t;
    };
    if !worker::accepting() {
        return not_modified(r);
    }
    let (etag, modified) = request_ids(r);
    let since = Since::from_headers(etag, modified);
    let now = now_ms();
    let mut counts = None;
    let Some((handle, outcome)) = answer_or_park(r, lcf, |p| {
        p.charge(std::iter::once(&name[..]))?;
        match p.z.store().listen(name, since, &p.opts, now, &mut p.wake) {
            Ok(Listen::Message(m)) => {
                let id = m.id;
                let payload = p.st.listeners.cache.get(m);
                // A one-to-one channel's message is consumed by its delivery.
                p.z.store().consume(name, id - 1, id);
                counts = p.z.store().info(name, now);
                Ok(Err(payload))
            }
            Ok(Listen::Park(parked)) => {
                let key = p.st.listeners.park(name, &parked, p.handle);
                Ok(Ok(p.keep(key)))
            }
            Err(e) => Err(e),
        }
    }) else {
        return NGX_ERROR as ngx_int_t;
    };
    if let Some(i) = counts {
        crate::stats::vars::set_counts(r, i.listeners.into(), i.messages as u64);
    }
    match outcome {
        None => not_modified(r),
        Some(Ok(Err(Some(payload)))) => deliver(r, &payload),
        Some(Ok(Err(None))) => unavailable(r),
        Some(Ok(Ok(key))) => parked(r, handle, key, lcf),
        Some(Err(e)) => refused(r, e, name),
    }
}

/// An interval-poll: the next message after the request's ids, or `304` at once.
fn interval(r: *mut ngx_http_request_t, name: &[u8]) -> ngx_int_t {
    let (etag, modified) = request_ids(r);
    let since = Since::from_headers(etag, modified);
    let mcf = main_conf(r);
    let now = now_ms();
    let found = worker::with(|st| {
        let mut z = zone::lock(mcf)?;
        let m = z.store().peek(name, since, now)?;
        let (id, payload) = (m.id, st.listeners.cache.get(m));
        // A one-to-one channel's message is consumed by its delivery.
        z.store().consume(name, id - 1, id);
        Some(payload)
    })
    .flatten();
    match found {
        Some(Some(payload)) => deliver(r, &payload),
        Some(None) => unavailable(r),
        None => not_modified(r),
    }
}

/// A long-poll deciding, under the zone lock, whether it is answered at once or parks (see
/// [`answer_or_park`]).
pub(crate) struct Parking<'a> {
    pub st: &'a mut worker::WorkerState,
    pub z: &'a mut zone::Locked,
    pub opts: ListenOpts,
    /// Its handle, should it park.
    pub handle: Handle,
    detached: Option<detach::Prepared>,
    /// Workers to wake once the lock is released.
    pub wake: Vec<WakeTarget>,
    /// The token it charges, if its location caps listeners per token.
    token: Option<Charging>,
    mcf: &'static MainConf,
}

impl Parking<'_> {
    /// The listener was parked at `key` in the worker's listeners: a detaching one is kept
    /// with its connection too.
    pub fn keep(&mut self, key: ListenerKey) -> ListenerKey {
        if let Some(d) = self.detached.take() {
            detach::insert(&mut self.st.detached, d, key);
        }
        key
    }

    /// Charges the listener's token on `names` (if its location caps listeners per token),
    /// kept with its handle: call it first, before the listener can be answered or parked.
    pub fn charge<'n>(&mut self, names: impl Iterator<Item = &'n [u8]>) -> Result<(), StoreError> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let charge = token.charge(self.z, self.mcf, self.opts.slot, names)?;
        keep_charge(&mut self.detached, self.handle, charge, self.z);
        Ok(())
    }
}

/// Keeps a listener's token charge with its handle: a detaching listener's record, or its
/// held request's context.
pub(crate) fn keep_charge(
    detached: &mut Option<detach::Prepared>,
    handle: Handle,
    charge: Box<TokenCharge>,
    z: &mut zone::Locked,
) {
    match (detached, handle) {
        (Some(d), _) => d.charge = Some(charge),
        // SAFETY: the context of the live request about to park or be answered.
        (None, Handle::Request(ctx)) => unsafe { (*ctx).charge = Some(charge) },
        // Streams keep theirs in their own context.
        (None, _) => (*charge).release_locked(z),
    }
}

/// Prepares a long-poll's handle (see [`prepare_handle`]), runs `decide` under the zone lock,
/// then wakes the workers it asked for. The decision is `None` when this worker has no slot or
/// no zone (answer `304`); the whole is `None` with no memory for the handle.
pub(crate) fn answer_or_park<T>(
    r: *mut ngx_http_request_t,
    lcf: &LocConf,
    decide: impl FnOnce(&mut Parking<'_>) -> T,
) -> Option<(Handle, Option<T>)> {
    let (detached, handle) = prepare_handle(r, lcf)?;
    let mcf = main_conf(r);
    let mut wake = Vec::new();
    // A copy of the request that did not detach (answered at once) is freed after the lock.
    let mut unused = None;
    let token = tokens::to_charge(r, lcf);
    let outcome = worker::with(|st| {
        let opts = listen_opts(lcf, st.slot?);
        let mut z = zone::lock(mcf)?;
        let mut p = Parking { st, z: &mut z, opts, handle, detached, wake: Vec::new(), token, mcf };
        let decided = decide(&mut p);
        (wake, unused) = (p.wake, p.detached);
        Some(decided)
    })
    .flatten();
    drop(unused);
    worker::wake(&wake);
    Some((handle, outcome))
}

/// The handle of a listener about to park: a detaching listener's copy of its request, or
/// else the parked request's context, made first so that nothing can fail once the zone
/// counts it. `None`: no memory.
pub(crate) fn prepare_handle(
    r: *mut ngx_http_request_t,
    lcf: &LocConf,
) -> Option<(Option<detach::Prepared>, Handle)> {
    let detached = detach::prepare(r, lcf);
    let handle = match &detached {
        Some(d) => d.handle(),
        None => Handle::Request(park_ctx(r)?),
    };
    Some((detached, handle))
}

/// How a listener of location `lcf` waits in worker slot `slot`.
pub(crate) fn listen_opts(lcf: &LocConf, slot: u32) -> ListenOpts {
    ListenOpts {
        concurrency: lcf.concurrency(),
        max_listeners: lcf.max_listeners.clamp(0, u32::MAX as isize) as u32,
        create: lcf.authorized_only == 0,
        channel_timeout_ms: lcf.channel_timeout as u64,
        slot,
        stream: false,
    }
}

/// A listener the zone counts now waits: detached, or its request held.
pub(crate) fn parked(
    r: *mut ngx_http_request_t,
    handle: Handle,
    key: ListenerKey,
    lcf: &LocConf,
) -> ngx_int_t {
    // SAFETY: `r` and its connection are live.
    let log = unsafe { (*(*r).connection).log };
    let how = if matches!(handle, Handle::Detached { .. }) { "detaching" } else { "held" };
    if key.serial == MULTI {
        martd_debug!(log, "parked multi-channel listener #{} ({})", key.index, how);
    } else {
        martd_debug!(log, "parked listener on channel #{} ({})", key.serial, how);
    }
    match handle {
        Handle::Detached { .. } => detach::finish(r),
        Handle::Request(ctx) => hold(r, ctx, key, lcf),
        // Streams are opened by `transport::streaming`, never parked here.
        Handle::Stream(_) => NGX_ERROR as ngx_int_t,
    }
}

/// The answer to a listen the store refused.
pub(crate) fn refused(r: *mut ngx_http_request_t, e: StoreError, channel: &[u8]) -> ngx_int_t {
    match e {
        StoreError::Conflict => {
            response::error(r, 409, "another listener is waiting on this channel")
        }
        StoreError::NotFound => response::error(r, 403, "no such channel"),
        StoreError::TooManyListeners => {
            response::error(r, 403, "too many listeners on this channel")
        }
        StoreError::TooManyTokenListeners => {
            response::error(r, 409, "too many listeners on this token")
        }
        StoreError::Forbidden => response::error(r, 403, "forbidden"),
        StoreError::TooManyTokens => response::error(r, 409, "too many tokens on this channel"),
        // Only publishes write the journal.
        StoreError::Behind
        | StoreError::DiskFailing
        | StoreError::Superseded
        | StoreError::Unavailable => crate::backend::held::refused(r, e),
        StoreError::NoMemory => crate::push::zone_full(r, channel),
    }
}

/// Holds a parked request open until it is answered: the pool-cleanup context takes its key,
/// the count increment outlives this handler's `NGX_DONE`, disconnects are watched, and the
/// listener timeout is armed.
fn hold(
    r: *mut ngx_http_request_t,
    ctx: *mut ListenerCtx,
    key: ListenerKey,
    lcf: &LocConf,
) -> ngx_int_t {
    // SAFETY: `ctx` lives in the request pool of the live request `r`.
    unsafe {
        (*ctx).key = Some(key);
        if let Some(m) = (*r).main.as_mut() {
            m.set_count(m.count() + 1);
        }
        if (*r).discard_body() == 0 {
            (*r).read_event_handler = Some(ngx_http_test_reading);
        }
        (*r).write_event_handler = Some(ngx_http_request_empty_handler);
        if lcf.listener_timeout > 0 {
            let t = &mut (*ctx).timer;
            t.handler = Some(listener_timeout);
            // The connection, as for nginx's own request timers (its debug log reads the fd).
            t.data = (*r).connection as *mut c_void;
            t.log = (*(*r).connection).log;
            nginx_sys::ngx_add_timer(t, lcf.listener_timeout);
        }
    }
    NGX_DONE as ngx_int_t
}

fn deliver(r: *mut ngx_http_request_t, payload: &Rc<Payload>) -> ngx_int_t {
    crate::stats::count::delivered(1);
    crate::stats::vars::set_message_id(r, payload.id);
    response::message(r, payload)
}

/// A message of a channel list's channel `channel`: as [`deliver`], naming the channel in
/// `X-Martd-Channel`.
fn deliver_on(r: *mut ngx_http_request_t, payload: &Rc<Payload>, channel: &[u8]) -> ngx_int_t {
    if response::add_header(r, "X-Martd-Channel", channel).is_none() {
        return NGX_ERROR as ngx_int_t;
    }
    deliver(r, payload)
}

/// `503`: the worker could not make its copy of the message; the listener asks again.
pub(crate) fn unavailable(r: *mut ngx_http_request_t) -> ngx_int_t {
    response::error(r, 503, "no memory for the message here, try again")
}

/// `304` echoing the request's ids.
fn not_modified(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: `r` is a live request.
    let (inm, ims) = unsafe { ((*r).headers_in.if_none_match, (*r).headers_in.if_modified_since) };
    if let Some(v) = header(inm) {
        response::add_header(r, "Etag", v);
    }
    if let Some(v) = header(ims) {
        response::add_header(r, "Last-Modified", v);
    }
    response::send(r, 304, b"", Body::Bytes(b""), None)
}

/// A woken listener's response (`None`: `304`, or an empty reply in martd's API).
fn respond(r: *mut ngx_http_request_t, verdict: Option<Verdict>) -> ngx_int_t {
    if loc_conf(r).json {
        return json::respond(r, verdict);
    }
    match verdict {
        Some(Verdict::Deliver(p)) => deliver(r, &p),
        Some(Verdict::Conflict) => response::error(r, 409, "a newer listener took this channel"),
        Some(Verdict::Gone) => response::error(r, 410, "channel deleted"),
        // A long-poll of a channel list (see `list`).
        Some(Verdict::DeliverOn(p, channel)) => deliver_on(r, &p, &channel),
        Some(Verdict::GoneChannel(channel)) => {
            response::add_header(r, "X-Martd-Channel", &channel);
            response::error_in(r, 410, "channel deleted", Some(&channel))
        }
        Some(Verdict::Unavailable | Verdict::Batch(_)) => unavailable(r),
        None => not_modified(r),
    }
}

/// The pool-cleanup context of a request about to park.
fn park_ctx(r: *mut ngx_http_request_t) -> Option<*mut ListenerCtx> {
    // SAFETY: the cleanup's data area is sized for the context; the context is written
    // before the handler is set; the handler runs when the request pool goes.
    unsafe {
        let cln = ngx_pool_cleanup_add((*r).pool, size_of::<ListenerCtx>());
        if cln.is_null() {
            return None;
        }
        let ctx = (*cln).data as *mut ListenerCtx;
        ptr::write(
            ctx,
            ListenerCtx { request: r, key: None, timer: std::mem::zeroed(), charge: None },
        );
        (*cln).handler = Some(listener_cleanup);
        Some(ctx)
    }
}

/// Answers a parked listener that has already left the worker's listeners: with its
/// verdict, or `304` when `None` (timeout, shutdown). Finalizes the request.
pub fn answer(ctx: *mut ListenerCtx, verdict: Option<Verdict>) {
    // SAFETY: `ctx` is a parked listener's context: its request is alive (it is removed
    // from the worker's listeners before its request pool goes, see `listener_cleanup`).
    unsafe {
        (*ctx).key = None;
        if (*ctx).timer.timer_set() != 0 {
            ngx_del_timer(&mut (*ctx).timer);
        }
        let r = (*ctx).request;
        let c = (*r).connection;
        let rc = respond(r, verdict);
        ngx_http_finalize_request(r, rc);
        ngx_http_run_posted_requests(c);
    }
}

/// Takes a listener out of the worker and the zone; `false` if it had already left.
fn leave(ctx: *mut ListenerCtx) -> bool {
    // SAFETY: `ctx` is live (timer or cleanup of its own request).
    match unsafe { (*ctx).key.take() } {
        Some(key) => {
            leave_key(key);
            true
        }
        None => false,
    }
}

/// Takes the listener at `key` out of the worker's listeners and the zone's counts.
pub fn leave_key(key: ListenerKey) {
    worker::with(|st| {
        let Some(slot) = st.slot else {
            return;
        };
        // SAFETY: `mcf` is this worker's cycle's main conf.
        let Some(mut z) = zone::lock(unsafe { &*st.mcf }) else {
            return;
        };
        st.listeners.remove(key, |r| z.store().release(&r.name, r.serial, slot, 1, r.last));
    });
}

/// Takes streaming subscriber `handle`'s entry at `key` out of the worker's listeners and the
/// zone's counts, if it is still there.
pub fn leave_stream_key(key: ListenerKey, handle: Handle) {
    worker::with(|st| {
        let Some(slot) = st.slot else {
            return;
        };
        // SAFETY: `mcf` is this worker's cycle's main conf.
        let Some(mut z) = zone::lock(unsafe { &*st.mcf }) else {
            return;
        };
        st.listeners
            .remove_stream(key, handle, |r| z.store().release(&r.name, r.serial, slot, 1, r.last));
    });
}

unsafe extern "C" fn listener_timeout(ev: *mut ngx_event_t) {
    // SAFETY: the timer is the `timer` field of its listener's context.
    let ctx = unsafe { (ev as *mut u8).sub(std::mem::offset_of!(ListenerCtx, timer)) }
        as *mut ListenerCtx;
    if leave(ctx) {
        answer(ctx, None);
    }
}

extern "C" fn listener_cleanup(data: *mut c_void) {
    let ctx = data as *mut ListenerCtx;
    // SAFETY: the request pool is being destroyed; the timer must not fire afterwards.
    unsafe {
        if (*ctx).timer.timer_set() != 0 {
            ngx_del_timer(&mut (*ctx).timer);
        }
    }
    leave(ctx);
    // SAFETY: as above; the context is not used after this.
    drop(unsafe { (*ctx).charge.take() });
}
