//! Streaming subscribers: EventSource, WebSocket and the chunked stream. The
//! response stays open; the subscriber stays in the worker's listeners after each delivery
//! (`Listeners::park_stream`) and every message is written as it comes.
//!
//! Memory: a message's bytes are the worker's one copy of it (an EventSource event is
//! formatted once per worker, see `Payload::sse_event`), shared by every subscriber; a
//! subscriber holds a reference to each message nginx has not sent yet, and recycles its
//! buffer headers, so a long-lived stream does not grow its request pool. What is not sent yet
//! is bounded by `martd_max_pending_bytes`: over it, the connection is closed with a log line
//! (the client resumes from its last id). A client that reads nothing for `send_timeout` is
//! closed as nginx closes any.
//!
//! The stream ends (cleanly: the last chunk) when the worker shuts down or reloads, when the
//! channel is deleted, when a newer subscriber displaces it, or when the worker cannot copy a
//! message; a client closing it is noticed by `ngx_http_test_reading`.
//!
//! Once the response header and the backlog are sent, a stream on an HTTP/1.x keep-alive
//! connection gives its request back to nginx and writes on the connection itself (see
//! [`super::detached`]): an idle stream then costs a connection and this context, not a
//! request.

use std::collections::VecDeque;
use std::ffi::c_void;
use std::ptr;
use std::rc::Rc;

use martd_core::listeners::{ListenerKey, Payload, Verdict};
use nginx_sys::{
    ngx_add_timer, ngx_buf_t, ngx_connection_t, ngx_del_timer, ngx_delete_posted_event,
    ngx_event_t, ngx_http_core_loc_conf_t, ngx_http_core_module, ngx_http_finalize_request,
    ngx_http_request_t, ngx_http_run_posted_requests, ngx_http_send_header, ngx_http_send_special,
    ngx_http_test_reading, ngx_int_t, ngx_msec_t, ngx_pool_cleanup_add, ngx_post_event,
    ngx_posted_events, ngx_str_t, NGX_DONE, NGX_ERROR, NGX_HTTP_FLUSH, NGX_HTTP_LAST, NGX_LOG_ERR,
    NGX_OK,
};

use super::piece::{Keep, Piece};
use crate::conf::{LocConf, MainConf};
use crate::listen::{self, Handle};
use crate::response;
use martd_core::transport::{sse, websocket as ws};

/// Which stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    EventSource,
    /// Each message's body then `martd_stream_separator`.
    Stream,
    /// Each message a WebSocket frame (see `super::websocket`).
    WebSocket,
}

impl Kind {
    pub(super) fn content_type(self) -> &'static [u8] {
        match self {
            Kind::EventSource => b"text/event-stream",
            Kind::Stream | Kind::WebSocket => b"text/plain",
        }
    }

    /// The transport the stats count it under.
    fn listener_kind(self) -> martd_core::stats::ListenerKind {
        use martd_core::stats::ListenerKind as L;
        match self {
            Kind::EventSource => L::EventSource,
            Kind::Stream => L::Stream,
            Kind::WebSocket => L::WebSocket,
        }
    }
}

/// A streaming subscriber, owned by its request (freed by the request pool's cleanup), or once
/// detached by its connection (freed when [`super::detached`] closes it).
pub struct StreamCtx {
    pub(super) conn: *mut ngx_connection_t,
    /// Its request; null once detached.
    pub(super) request: *mut ngx_http_request_t,
    /// Writes on the connection itself: the request was given back (see [`super::detached`]).
    pub(super) detached: bool,
    /// The request is being given back: its pool's cleanup leaves the context alone.
    pub(super) detaching: bool,
    /// The request's transport allows detaching (checked once, when the stream opens).
    pub(super) may_detach: bool,
    /// The response is chunked: a detached stream frames its writes itself.
    pub(super) chunked: bool,
    /// The request was keep-alive before a WebSocket's `101` turned it off.
    pub(super) keepalive: bool,
    pub(super) send_timeout: ngx_msec_t,
    pub(super) mcf: &'static MainConf,
    /// Where it sits in the worker's listeners, one entry per channel; empty once it left.
    pub(super) keys: Vec<ListenerKey>,
    /// It listens on several channels (EventSource events then name theirs).
    multi: bool,
    /// Each message in the JSON envelope of `martd_listen json`, which names its channel.
    json: bool,
    pub(super) kind: Kind,
    separator: &'static [u8],
    /// Buffers given to nginx (or, detached, to the connection) and not sent yet, oldest
    /// first, with their length. Buffer headers are the request pool's; detached, boxed.
    pub(super) in_flight: VecDeque<(*mut ngx_buf_t, usize, Keep)>,
    /// Buffer headers of the request pool that were sent, for reuse.
    pub(super) free: Vec<*mut ngx_buf_t>,
    pub(super) pending: usize,
    pub(super) max_pending: usize,
    ping_ms: ngx_msec_t,
    pub(super) ping: ngx_event_t,
    /// Posted to end the stream (`done`): the request is finalized (`finish`: the rc of the
    /// last buffer; none: closed after a failed write or a passed pending cap), or the
    /// detached connection closed. Not done: posted to detach.
    pub(super) task: ngx_event_t,
    finish: Option<ngx_int_t>,
    /// Ended or failing: nothing more is written.
    pub(super) done: bool,
    /// Detached and ended cleanly: its last bytes are being sent.
    pub(super) closing: bool,
    /// A WebSocket's reading side.
    pub(super) ws: Option<Box<super::websocket::WsState>>,
    /// Its token charge (`martd_max_listeners_per_token`), discharged when the context goes.
    pub(super) charge: Option<Box<crate::access::tokens::TokenCharge>>,
}

/// A stored message sent when a stream opens, and its channel.
pub(super) type Backlogged = (Rc<Payload>, Option<Rc<[u8]>>);

/// EventSource keep-alive: a comment line.
const PING: &[u8] = b":\n\n";

/// The subscriber's context, made before it parks so that nothing can fail once the zone
/// counts it. `None`: no memory.
pub(super) fn prepare(
    r: *mut ngx_http_request_t,
    lcf: &LocConf,
    kind: Kind,
    multi: bool,
    json: bool,
) -> Option<*mut StreamCtx> {
    let separator = match kind {
        Kind::Stream => crate::conf::conf_bytes(&lcf.stream_separator),
        Kind::EventSource | Kind::WebSocket => &[][..],
    };
    // SAFETY: `r` is a live request; the core module's location conf is at its `ctx_index`.
    let (c, send_timeout) = unsafe {
        let clcf =
            *(*r).loc_conf.add(ngx_http_core_module.ctx_index) as *const ngx_http_core_loc_conf_t;
        ((*r).connection, (*clcf).send_timeout)
    };
    let ctx = Box::new(StreamCtx {
        conn: c,
        request: r,
        detached: false,
        detaching: false,
        may_detach: false,
        chunked: false,
        // SAFETY: `r` is live.
        keepalive: unsafe { (*r).keepalive() } != 0,
        send_timeout,
        mcf: listen::main_conf(r),
        keys: Vec::new(),
        multi,
        json,
        kind,
        separator,
        in_flight: VecDeque::new(),
        free: Vec::new(),
        pending: 0,
        max_pending: lcf.max_pending_bytes,
        ping_ms: match kind {
            Kind::EventSource => lcf.eventsource_ping,
            Kind::WebSocket => lcf.websocket_ping,
            Kind::Stream => 0,
        },
        // SAFETY: an all-zero `ngx_event_t` is nginx's own initial state for events.
        ping: unsafe { std::mem::zeroed() },
        // SAFETY: as above.
        task: unsafe { std::mem::zeroed() },
        finish: None,
        done: false,
        closing: false,
        ws: (kind == Kind::WebSocket).then(|| Box::new(super::websocket::WsState::new())),
        charge: None,
    });
    let ctx = Box::into_raw(ctx);
    // SAFETY: `r` is a live request; the cleanup takes the box back when the pool goes, and
    // is registered before anything else can hold the pointer.
    unsafe {
        let cln = ngx_pool_cleanup_add((*r).pool, 0);
        if cln.is_null() {
            drop(Box::from_raw(ctx));
            return None;
        }
        (*cln).data = ctx as *mut c_void;
        (*cln).handler = Some(stream_cleanup);
        *(*r).ctx.add(crate::module().ctx_index) = ctx as *mut c_void;
        for (ev, handler) in [
            (&mut (*ctx).ping, ping_handler as unsafe extern "C" fn(*mut ngx_event_t)),
            (&mut (*ctx).task, task_handler),
        ] {
            ev.handler = Some(handler);
            // The connection, as for nginx's own request timers (its debug log reads the fd).
            ev.data = c as *mut c_void;
            ev.log = (*c).log;
        }
    }
    Some(ctx)
}

/// The subscriber parked under `key`: sends the response header and the backlog, and holds
/// the request open. `complete`: the backlog is whole (else the stream ends after it, and
/// the client resumes).
pub(super) fn open(
    ctx: *mut StreamCtx,
    keys: Vec<ListenerKey>,
    backlog: &[Backlogged],
    complete: bool,
    lcf: &LocConf,
) -> ngx_int_t {
    // SAFETY: `ctx` was made for the live request being handled; it is freed only with the
    // request pool.
    let ctx = unsafe { &mut *ctx };
    let first = keys.first().map_or(0, |k| k.serial);
    let n = keys.len();
    if n > 0 {
        crate::stats::count::stream(ctx.kind.listener_kind(), true);
    }
    ctx.keys = keys;
    let r = ctx.request;
    // SAFETY: `r` is the live request being handled.
    let log = unsafe { (*(*r).connection).log };
    martd_debug!(log, "streaming subscriber on {} channel(s), #{}... ({:?})", n, first, ctx.kind);
    let headers = if ctx.kind == Kind::WebSocket {
        let meta = super::websocket::wants_meta(r);
        if let Some(ws) = ctx.ws.as_mut() {
            ws.meta = meta;
        }
        super::websocket::handshake_headers(r, meta)
    } else {
        response::add_header(r, "Cache-Control", b"no-cache")
            .and_then(|()| response::add_header(r, "X-Accel-Buffering", b"no"))
    };
    if headers.is_none() {
        return NGX_ERROR as ngx_int_t;
    }
    // SAFETY: `r` is the live request; the content type is static.
    let rc = unsafe {
        if ctx.kind == Kind::WebSocket {
            (*r).headers_out.status = 101;
            // nginx's status table has no reason phrase for 101.
            let line = b"101 Switching Protocols";
            (*r).headers_out.status_line =
                ngx_str_t { len: line.len(), data: line.as_ptr() as *mut u8 };
            (*r).set_keepalive(0);
        } else {
            let ct = ctx.kind.content_type();
            (*r).headers_out.status = 200;
            (*r).headers_out.content_type =
                ngx_str_t { len: ct.len(), data: ct.as_ptr() as *mut u8 };
            (*r).headers_out.content_type_len = ct.len();
            (*r).headers_out.content_type_lowcase = ptr::null_mut();
        }
        (*r).headers_out.content_length_n = -1;
        ngx_http_send_header(r)
    };
    if rc == NGX_ERROR as ngx_int_t || rc > NGX_OK as ngx_int_t {
        return rc;
    }
    // SAFETY: `r` is live; the header filters have run (the chunked filter decided).
    unsafe {
        ctx.chunked = (*r).chunked() != 0;
        ctx.may_detach = super::detached::eligible(ctx, r, lcf);
    }
    // SAFETY: `r` is live; the request is held open: one more reference, answered by its
    // finalization when the stream ends; the client closing is noticed on reads.
    unsafe {
        if let Some(m) = (*r).main.as_mut() {
            m.set_count(m.count() + 1);
        }
        (*r).read_event_handler = Some(ngx_http_test_reading);
        (*r).write_event_handler = Some(super::attached::writer);
    }
    if backlog.is_empty() {
        // The header on its way at once (nginx holds small writes back otherwise).
        // SAFETY: `r` is live.
        let rc = unsafe { ngx_http_send_special(r, NGX_HTTP_FLUSH as usize) };
        super::attached::settle(ctx, rc);
    }
    if ctx.kind == Kind::WebSocket {
        // SAFETY: `r` is live; the WebSocket reads the connection from now on.
        unsafe { (*r).read_event_handler = Some(super::websocket::reader) };
    }
    for (p, channel) in backlog {
        deliver(ctx, p, channel.as_ref());
    }
    if ctx.kind == Kind::WebSocket && !ctx.done {
        // Frames the client sent with (or right after) its handshake.
        super::websocket::start(ctx);
        if ctx.done {
            return NGX_DONE as ngx_int_t;
        }
    }
    if !complete {
        end(ctx);
    } else if ctx.ping_ms > 0 && !ctx.done {
        // SAFETY: the event lives in the context, which outlives its timer (see cleanup).
        unsafe { ngx_add_timer(&mut ctx.ping, ctx.ping_ms) };
    }
    NGX_DONE as ngx_int_t
}

/// A woken streaming subscriber: a message to write, or the end of its stream (`None`:
/// shutdown; a verdict other than a message: it has left the worker's listeners).
pub fn answer(ctx: *mut StreamCtx, verdict: Option<Verdict>) {
    // SAFETY: `ctx` is a parked subscriber's context: it is alive (it is removed from the
    // worker's listeners before it is freed, see `stream_cleanup` and `detached::close`).
    let ctx = unsafe { &mut *ctx };
    use martd_core::transport::websocket::code;
    let (close, why) = match verdict {
        Some(Verdict::DeliverOn(p, channel)) => return deliver(ctx, &p, Some(&channel)),
        Some(Verdict::Deliver(p)) => return deliver(ctx, &p, None),
        None => (code::GOING_AWAY, "going away"),
        Some(Verdict::Gone | Verdict::GoneChannel(_)) => (code::NORMAL, "channel deleted"),
        Some(Verdict::Conflict) => (code::POLICY, "displaced by a newer subscriber"),
        Some(Verdict::Unavailable | Verdict::Batch(_)) => (code::INTERNAL, "no memory here"),
    };
    // It left the channel it was answered on; its other channels' entries leave too.
    leave_all(ctx);
    end_with(ctx, close, why);
}

/// Takes the subscriber's remaining entries out of the worker's listeners and the zone.
pub(super) fn leave_all(ctx: &mut StreamCtx) {
    let handle = Handle::Stream(ctx as *mut StreamCtx);
    if !ctx.keys.is_empty() {
        crate::stats::count::stream(ctx.kind.listener_kind(), false);
    }
    for key in std::mem::take(&mut ctx.keys) {
        listen::leave_stream_key(key, handle);
    }
}

fn deliver(ctx: &mut StreamCtx, p: &Rc<Payload>, channel: Option<&Rc<[u8]>>) {
    let pieces =
        if ctx.json { json_pieces(ctx, p, channel) } else { plain_pieces(ctx, p, channel) };
    match pieces {
        Some(pieces) => {
            crate::stats::count::delivered(1);
            if !ctx.request.is_null() {
                crate::stats::vars::set_message_id(ctx.request, p.id);
            }
            write(ctx, pieces)
        }
        None => end(ctx),
    }
}

/// A message in the JSON envelope (`martd_listen json`): an EventSource event's data, a
/// WebSocket text frame, or a line of a chunked stream. `None`: no memory.
fn json_pieces(ctx: &StreamCtx, p: &Payload, channel: Option<&Rc<[u8]>>) -> Option<Vec<Piece>> {
    let name = channel.map_or(&[][..], |c| &c[..]);
    let env = martd_core::json::message(name, p.id, p.body())?;
    let mut out = Vec::new();
    match ctx.kind {
        Kind::EventSource => {
            out.try_reserve_exact(sse::event_capacity(None, env.len())).ok()?;
            sse::event(&mut out, p.id, None, &env);
        }
        Kind::WebSocket => {
            out.try_reserve_exact(ws::frame_len(env.len())).ok()?;
            ws::encode(&mut out, ws::opcode::TEXT, &env);
        }
        Kind::Stream => {
            return Some(vec![Piece::owned(env.into_boxed_slice()), Piece::lasting(ctx.separator)])
        }
    }
    Some(vec![Piece::owned(out.into_boxed_slice())])
}

/// A message as it was published, framed for the transport. `None`: no memory.
fn plain_pieces(
    ctx: &StreamCtx,
    p: &Rc<Payload>,
    channel: Option<&Rc<[u8]>>,
) -> Option<Vec<Piece>> {
    match ctx.kind {
        // An event with no name of its own takes its channel's on a multi-channel stream.
        Kind::EventSource if ctx.multi && p.event().is_empty() => p.sse_event().map(|ev| {
            // Each event names its channel (`event:`), before the event's own lines.
            let name = channel.map_or(&[][..], |c| &c[..]);
            let mut line = Vec::with_capacity(name.len() + 8);
            line.extend_from_slice(b"event: ");
            line.extend(name.iter().copied().filter(|&b| b != b'\r' && b != b'\n'));
            line.push(b'\n');
            vec![Piece::owned(line.into_boxed_slice()), Piece::payload(ev, p)]
        }),
        Kind::EventSource => p.sse_event().map(|ev| vec![Piece::payload(ev, p)]),
        Kind::WebSocket if ctx.ws.as_ref().is_some_and(|w| w.meta) => {
            super::websocket::meta_frame(p, channel).map(|f| vec![Piece::owned(f)])
        }
        Kind::WebSocket => p.ws_frame().map(|f| vec![Piece::payload(f, p)]),
        Kind::Stream => Some(vec![Piece::payload(p.body(), p), Piece::lasting(ctx.separator)]),
    }
}

/// Writes `pieces`, flushed: through nginx's output filters, or detached, on the connection.
pub(super) fn write(ctx: &mut StreamCtx, pieces: Vec<Piece>) {
    if ctx.done {
        return;
    }
    if ctx.detached {
        super::detached::write(ctx, pieces);
    } else {
        super::attached::write(ctx, pieces);
    }
}

/// `false` (and the connection closing) when more than `martd_max_pending_bytes` wait.
pub(super) fn over_cap(ctx: &mut StreamCtx) -> bool {
    if ctx.pending > ctx.max_pending {
        let why = format!(
            "{} bytes not sent yet (martd_max_pending_bytes {})",
            ctx.pending, ctx.max_pending
        );
        fail(ctx, &why);
        return false;
    }
    true
}

pub(super) fn post_task(ctx: &mut StreamCtx) {
    if ctx.task.posted() == 0 {
        // SAFETY: the event lives in the context; the context's end takes it off the queue.
        unsafe { ngx_post_event(&mut ctx.task, ptr::addr_of_mut!(ngx_posted_events)) };
    }
}

/// Closes the connection soon (a failed write, a slow reader): nothing more is written.
pub(super) fn fail(ctx: &mut StreamCtx, why: &str) {
    if ctx.done && !ctx.closing {
        return;
    }
    ctx.done = true;
    ctx.closing = false;
    ctx.finish = None;
    // SAFETY: the connection is live; the events live in the context.
    unsafe {
        if !why.is_empty() {
            let msg = format!("martd: closing a streaming subscriber: {why}");
            ngx::ngx_log_error!(NGX_LOG_ERR, (*ctx.conn).log, "{}", msg);
        }
        if ctx.ping.timer_set() != 0 {
            ngx_del_timer(&mut ctx.ping);
        }
    }
    post_task(ctx);
}

/// Ends the stream cleanly: the last chunk, then nginx finishes sending and finalizes.
fn end(ctx: &mut StreamCtx) {
    end_with(ctx, martd_core::transport::websocket::code::GOING_AWAY, "going away");
}

/// Ends the stream cleanly; a WebSocket gets a close frame with `code` and `why` first.
pub(super) fn end_with(ctx: &mut StreamCtx, code: u16, why: &str) {
    if ctx.done {
        return;
    }
    if ctx.kind == Kind::WebSocket {
        let mut frame = Vec::new();
        martd_core::transport::websocket::encode_close(&mut frame, code, why);
        write(ctx, vec![Piece::owned(frame.into_boxed_slice())]);
        if ctx.done {
            return;
        }
    }
    if ctx.detached {
        super::detached::end(ctx);
        return;
    }
    ctx.done = true;
    let r = ctx.request;
    // SAFETY: `r` is live and held open by this stream (the reference taken in `open`).
    unsafe {
        if ctx.ping.timer_set() != 0 {
            ngx_del_timer(&mut ctx.ping);
        }
        // Finalized from a posted event, not here: a wake-up's answers may name this stream
        // again after its end (several channels, a shutdown), and must find it alive.
        ctx.finish = Some(ngx_http_send_special(r, NGX_HTTP_LAST as usize));
    }
    post_task(ctx);
}

/// The stream context of request `r` (set by [`prepare`] in the module's slot of `r->ctx`).
pub(super) fn ctx_of(r: *mut ngx_http_request_t) -> Option<&'static mut StreamCtx> {
    // SAFETY: `r->ctx` has one slot per HTTP module; ours holds a stream context of this
    // request, or null; the context lives as long as the request.
    unsafe {
        let p = *(*r).ctx.add(crate::module().ctx_index) as *mut StreamCtx;
        p.as_mut()
    }
}

unsafe extern "C" fn ping_handler(ev: *mut ngx_event_t) {
    // SAFETY: the event is the `ping` field of a live stream context.
    let ctx = unsafe {
        &mut *((ev as *mut u8).sub(std::mem::offset_of!(StreamCtx, ping)) as *mut StreamCtx)
    };
    if ctx.done {
        return;
    }
    match ctx.kind {
        Kind::WebSocket => {
            if !super::websocket::ping(ctx) {
                return;
            }
        }
        _ => write(ctx, vec![Piece::lasting(PING)]),
    }
    if !ctx.done {
        // SAFETY: as above.
        unsafe { ngx_add_timer(&mut ctx.ping, ctx.ping_ms) };
    }
}

/// The posted task: the stream's end (the request finalized, or the detached connection
/// closed), or, while it goes on, giving its request back.
unsafe extern "C" fn task_handler(ev: *mut ngx_event_t) {
    // SAFETY: the event is the `task` field of a live stream context.
    let ctx =
        unsafe { (ev as *mut u8).sub(std::mem::offset_of!(StreamCtx, task)) as *mut StreamCtx };
    // SAFETY: the context is live (its end takes the event off the queue).
    let (done, detached) = unsafe { ((*ctx).done, (*ctx).detached) };
    match (done, detached) {
        (false, false) => super::detached::detach(ctx),
        (false, true) => {}
        (true, true) => super::detached::close_when_sent(ctx),
        // SAFETY: its request is live (the cleanup takes the event off the queue).
        (true, false) => unsafe {
            let r = (*ctx).request;
            let c = (*r).connection;
            let rc = (*ctx).finish.unwrap_or(NGX_ERROR as ngx_int_t);
            ngx_http_finalize_request(r, rc);
            ngx_http_run_posted_requests(c);
        },
    }
}

/// Takes the context's events off nginx's timers and posted queue.
pub(super) fn quiet(ctx: &mut StreamCtx) {
    // SAFETY: the events live in the context and are nginx's only while set or posted.
    unsafe {
        if ctx.ping.timer_set() != 0 {
            ngx_del_timer(&mut ctx.ping);
        }
        if ctx.task.posted() != 0 {
            ngx_delete_posted_event(&mut ctx.task);
        }
    }
}

extern "C" fn stream_cleanup(data: *mut c_void) {
    let ctx = data as *mut StreamCtx;
    // SAFETY: the request pool is being destroyed. Giving the request back (`detaching`), the
    // context lives on with its connection; else its events must not fire afterwards and the
    // box is taken back exactly once, here.
    unsafe {
        if (*ctx).detaching {
            return;
        }
        quiet(&mut *ctx);
        leave_all(&mut *ctx);
        drop(Box::from_raw(ctx));
    }
}
