//! A stream that gave its request back: it writes on the connection itself.
//!
//! An open nginx request costs about 10 KB of worker memory (two request-pool blocks, the
//! header buffer), which an idle EventSource, WebSocket or chunked stream does not need: once
//! its header and backlog are sent, what it will ever write is its own bytes, flushed. So a
//! stream on an HTTP/1.x keep-alive connection (plain or TLS) whose response nothing else
//! rewrites finalizes its request into nginx's keep-alive state (nginx frees the request and
//! its buffers, and writes its access-log line then) and takes the connection over at once:
//! its read and write handlers, and `c->data`, are the stream's from then on.
//!
//! Detached, a write goes to `c->send_chain` (the chunk framing added here when the response
//! is chunked), the buffer headers are boxed and freed as soon as they are sent, and a TLS
//! connection's write buffer is freed when nothing waits in it. Reads look only for the
//! client closing (a WebSocket's frames are read as before). The stream ends as an attached
//! one does, then the connection is closed once its last bytes are sent (or `send_timeout`).

use std::ffi::c_void;
use std::ptr;

use nginx_sys::{
    ngx_add_timer, ngx_buf_t, ngx_chain_t, ngx_connection_t, ngx_del_timer, ngx_event_t,
    ngx_handle_read_event, ngx_handle_write_event, ngx_http_close_connection,
    ngx_http_finalize_request, ngx_http_request_t, ngx_int_t, ngx_reusable_connection, NGX_AGAIN,
    NGX_DONE, NGX_HTTP_VERSION_20, NGX_OK, NGX_USE_CLEAR_EVENT,
};

use super::piece::{point_at, Piece};
use super::streaming::{fail, leave_all, over_cap, post_task, quiet, Kind, StreamCtx};
use crate::conf::LocConf;

/// Whether the stream may give its request back, as far as its location and transport go
/// (checked once, when the header is sent): detaching allowed (`martd_detach_listeners`), an
/// HTTP/1.x keep-alive request on an edge-triggered event method, chunked (or a WebSocket),
/// not counted by limit_conn, and no body filter rewriting the response.
///
/// # Safety
/// `r` is the live request of `ctx`, its header sent.
pub(super) unsafe fn eligible(ctx: &StreamCtx, r: *mut ngx_http_request_t, lcf: &LocConf) -> bool {
    // SAFETY: `r` and its connection are live; nginx's globals are read on its thread.
    unsafe {
        lcf.detach_listeners == 1
            && (nginx_sys::ngx_event_flags & NGX_USE_CLEAR_EVENT as usize) != 0
            && (*r).http_version < NGX_HTTP_VERSION_20 as usize
            && ctx.keepalive
            && (ctx.chunked || ctx.kind == Kind::WebSocket)
            && (*r).headers_in.content_length_n <= 0
            && (*r).headers_in.chunked() == 0
            && (*r).discard_body() == 0
            && crate::listen::detach::post_action_unset(r)
            // limit_conn counts the request while it lives: keep it, so the limit holds.
            && (*r).limit_conn_status() == 0
            && (*r).headers_out.content_encoding.is_null()
            && !rewriting_filter(r)
    }
}

/// Whether, right now, nothing but this stream holds its request and nothing is left to send.
///
/// # Safety
/// `r` is the live request of `ctx`.
unsafe fn idle(ctx: &StreamCtx, r: *mut ngx_http_request_t) -> bool {
    // SAFETY: as above.
    unsafe {
        let c = (*r).connection;
        let b = (*r).header_in;
        nginx_sys::ngx_exiting == 0
            && nginx_sys::ngx_terminate == 0
            && ctx.pending == 0
            && ctx.in_flight.is_empty()
            && r == (*r).main
            && (*r).count() == 1
            && (*r).postponed.is_null()
            && (*r).posted_requests.is_null()
            && (*r).out.is_null()
            && (*r).buffered() == 0
            && (*r).blocked() == 0
            && (*r).limit_rate == 0
            && (*c).buffered() == 0
            && (*c).data == r as *mut c_void
            && (*c).close() == 0
            && (*c).error() == 0
            && (*(*c).read).eof() == 0
            && !b.is_null()
            && (*b).pos == (*b).last
            && crate::listen::detach::transport_ok(c)
    }
}

thread_local! {
    /// Context indexes of nginx's body filters that rewrite a response, of those this nginx
    /// has (looked up once by name: a module built without them must still load).
    static REWRITING: std::cell::OnceCell<Vec<usize>> = const { std::cell::OnceCell::new() };
}

/// Whether a body filter that rewrites responses (gzip, gunzip, sub, addition, SSI, charset
/// recoding, XSLT) took part in this one: it keeps a context in the request exactly then.
///
/// # Safety
/// `r` is a live request.
unsafe fn rewriting_filter(r: *mut ngx_http_request_t) -> bool {
    REWRITING.with(|cell| {
        let indexes = cell.get_or_init(|| {
            [
                c"ngx_http_gzip_filter_module",
                c"ngx_http_gunzip_filter_module",
                c"ngx_http_sub_filter_module",
                c"ngx_http_addition_filter_module",
                c"ngx_http_ssi_filter_module",
                c"ngx_http_charset_filter_module",
                c"ngx_http_xslt_filter_module",
            ]
            .iter()
            .filter_map(|name| {
                // SAFETY: looking a symbol up in the process; when found it is nginx's module
                // structure, whose `ctx_index` is set once configuration is read.
                unsafe {
                    let m = libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr())
                        as *const nginx_sys::ngx_module_t;
                    m.as_ref().map(|m| m.ctx_index)
                }
            })
            .collect()
        });
        // SAFETY: `r->ctx` has one slot per HTTP module; each index is one of them.
        indexes.iter().any(|&i| unsafe { !(*(*r).ctx.add(i)).is_null() })
    })
}

/// The posted task of an attached stream with nothing to send: gives its request back if it
/// can now, and takes the connection over.
pub(super) fn detach(ctx: *mut StreamCtx) {
    // SAFETY: the context is live and attached: its request and connection are live.
    let (r, c) = unsafe { ((*ctx).request, (*ctx).conn) };
    // SAFETY: as above.
    if !unsafe { idle(&*ctx, r) } {
        return;
    }
    // SAFETY: `r` is live and held only by this stream (`idle`): finalizing it with
    // `NGX_DONE` and a keep-alive connection puts the connection into nginx's keep-alive state
    // (nginx frees the request, logs it, and runs its pool's cleanups, ours leaving the
    // context alone while `detaching`). Nothing else runs meanwhile; then the connection is
    // either closed (fd -1), or idle with `c->data` back at its HTTP connection, and taken
    // over here before any event of it is handled.
    unsafe {
        let ctx = &mut *ctx;
        let hc = (*r).http_connection as *mut c_void;
        let number = (*c).number;
        // The pool's buffer headers go with the pool (none is in flight: `idle`).
        ctx.free = Vec::new();
        // A WebSocket's `101` turned keep-alive off, so that an attached one is closed.
        (*r).set_keepalive(1);
        let wev = (*c).write;
        if (*wev).timer_set() != 0 {
            ngx_del_timer(wev);
        }
        martd_debug!((*c).log, "streaming subscriber gives its request back");
        ctx.detaching = true;
        ngx_http_finalize_request(r, NGX_DONE as ngx_int_t);
        ctx.detaching = false;
        ctx.request = ptr::null_mut();
        if (*c).fd == -1 || (*c).number != number || (*c).data != hc || (*c).close() != 0 {
            // nginx closed the connection: the subscriber leaves.
            ctx.detached = true;
            ctx.done = true;
            drop_ctx(ctx);
            return;
        }
        (*c).set_idle(0);
        ngx_reusable_connection(c, 0);
        (*c).set_destroyed(0);
        let rev = (*c).read;
        if (*rev).timer_set() != 0 {
            ngx_del_timer(rev);
        }
        (*rev).handler = Some(reader);
        (*wev).handler = Some(writer);
        (*c).data = ctx as *mut StreamCtx as *mut c_void;
        (*(*c).log).action = c"streaming martd messages".as_ptr() as *mut _;
        ctx.detached = true;
        martd_debug!((*c).log, "streaming subscriber writes without its request");
    }
}

/// Writes `pieces` on the connection, as one chunk when the response is chunked.
pub(super) fn write(ctx: &mut StreamCtx, pieces: Vec<Piece>) {
    let total: usize = pieces.iter().map(Piece::len).sum();
    if total == 0 {
        return;
    }
    if ctx.chunked {
        let head = format!("{total:x}\r\n").into_bytes().into_boxed_slice();
        queue(ctx, Piece::owned(head));
    }
    for p in pieces {
        queue(ctx, p);
    }
    if ctx.chunked {
        queue(ctx, Piece::lasting(b"\r\n"));
    }
    flush(ctx);
}

/// Ends a detached stream cleanly: its last chunk (a WebSocket's close frame is written
/// before), then the connection closes when everything is sent.
pub(super) fn end(ctx: &mut StreamCtx) {
    if ctx.chunked {
        queue(ctx, Piece::lasting(b"0\r\n\r\n"));
    }
    ctx.done = true;
    ctx.closing = true;
    // SAFETY: the event lives in the context.
    unsafe {
        if ctx.ping.timer_set() != 0 {
            ngx_del_timer(&mut ctx.ping);
        }
    }
    flush(ctx);
}

fn queue(ctx: &mut StreamCtx, p: Piece) {
    let len = p.len();
    if len == 0 {
        return;
    }
    let (bytes, keep) = p.into_parts();
    // SAFETY: an all-zero buffer header is nginx's own initial state for one.
    let b = Box::into_raw(Box::new(unsafe { std::mem::zeroed::<ngx_buf_t>() }));
    // SAFETY: `b` is new; `bytes` points into `keep` (or at static bytes), which goes with it
    // into `in_flight` until it is sent.
    unsafe { point_at(b, &*bytes) };
    ctx.in_flight.push_back((b, len, keep));
    ctx.pending += len;
}

/// Sends what waits, as far as the socket takes it; then the write timer follows what is
/// left, and a stream that ended closes once nothing is left.
fn flush(ctx: &mut StreamCtx) {
    let c = ctx.conn;
    let mut links: Vec<ngx_chain_t> = ctx
        .in_flight
        .iter()
        .map(|&(b, _, _)| ngx_chain_t { buf: b, next: ptr::null_mut() })
        .collect();
    let n = links.len();
    let base = links.as_mut_ptr();
    // SAFETY: the connection is live and ours; `links` is not resized while nginx reads it,
    // and nginx keeps no link after the call (it advances the buffers' `pos`).
    let rc = unsafe {
        for i in 1..n {
            (*base.add(i - 1)).next = base.add(i);
        }
        if n > 0 {
            // Sent now, not held back in a TLS connection's buffer.
            (*(*base.add(n - 1)).buf).set_flush(1);
        }
        let head = if n == 0 { ptr::null_mut() } else { base };
        match (*c).send_chain {
            Some(send) if n > 0 || (*c).buffered() != 0 => send(c, head, 0),
            _ => ptr::null_mut(),
        }
    };
    drop(links);
    while let Some(&(b, len, _)) = ctx.in_flight.front() {
        // SAFETY: `b` is one of our boxed buffer headers.
        if unsafe { (*b).pos != (*b).last } {
            break;
        }
        ctx.in_flight.pop_front();
        ctx.pending -= len;
        // SAFETY: sent: nginx no longer holds it; boxed in `queue`.
        drop(unsafe { Box::from_raw(b) });
    }
    if rc as isize == nginx_sys::NGX_ERROR as isize {
        // SAFETY: the connection is live.
        unsafe { (*c).set_error(1) };
        fail(ctx, "");
        return;
    }
    if !over_cap(ctx) {
        return;
    }
    // SAFETY: the connection and its write event are live and ours.
    unsafe {
        let wev = (*c).write;
        if !ctx.in_flight.is_empty() || (*c).buffered() != 0 {
            ngx_add_timer(wev, ctx.send_timeout);
            if ngx_handle_write_event(wev, 0) != NGX_OK as ngx_int_t {
                fail(ctx, "");
            }
            return;
        }
        if (*wev).timer_set() != 0 {
            ngx_del_timer(wev);
        }
        free_tls_buffer(c);
    }
    if ctx.in_flight.capacity() > 16 {
        // An idle stream keeps no room from a burst.
        ctx.in_flight = std::collections::VecDeque::new();
    }
    if ctx.closing {
        post_task(ctx);
    }
}

/// A TLS connection's write buffer (`ssl_buffer_size`), freed while nothing waits in it.
///
/// # Safety
/// `c` is a live connection with nothing buffered.
#[cfg(ngx_feature = "ssl")]
unsafe fn free_tls_buffer(c: *mut ngx_connection_t) {
    // SAFETY: as above.
    unsafe {
        if !(*c).ssl.is_null() {
            nginx_sys::ngx_ssl_free_buffer(c);
        }
    }
}

#[cfg(not(ngx_feature = "ssl"))]
unsafe fn free_tls_buffer(_c: *mut ngx_connection_t) {}

/// The posted task of a detached stream that ended: the connection is closed once its last
/// bytes are sent, or at once after a failure.
pub(super) fn close_when_sent(ctx: *mut StreamCtx) {
    // SAFETY: the context is live and detached; its connection is live.
    unsafe {
        let c = (*ctx).conn;
        if (*ctx).closing && ((*ctx).pending > 0 || (*c).buffered() != 0) {
            return;
        }
        close(ctx);
    }
}

/// Closes a detached stream's connection and frees the stream.
fn close(ctx: *mut StreamCtx) {
    // SAFETY: the context is live and detached; it is freed exactly once, here.
    unsafe {
        let c = (*ctx).conn;
        martd_debug!((*c).log, "streaming subscriber's connection closes");
        (*c).data = ptr::null_mut();
        drop_ctx(&mut *ctx);
        ngx_http_close_connection(c);
    }
}

/// Frees a detached context: its events quiet, its listeners left, its buffers freed.
///
/// # Safety
/// `ctx` is a detached context, boxed, not used after this.
unsafe fn drop_ctx(ctx: &mut StreamCtx) {
    quiet(ctx);
    leave_all(ctx);
    for (b, _, _) in ctx.in_flight.drain(..) {
        // SAFETY: boxed in `queue`; nginx is done with them (the connection goes).
        drop(unsafe { Box::from_raw(b) });
    }
    // SAFETY: boxed by `streaming::prepare`; the caller gives it up.
    drop(unsafe { Box::from_raw(ctx as *mut StreamCtx) });
}

/// The stream of a detached connection.
///
/// # Safety
/// `ev` is an event of a live detached connection.
unsafe fn ctx_of(ev: *mut ngx_event_t) -> (*mut ngx_connection_t, *mut StreamCtx) {
    // SAFETY: as above: the connection's data is its stream.
    unsafe {
        let c = (*ev).data as *mut ngx_connection_t;
        (c, (*c).data as *mut StreamCtx)
    }
}

/// Read events: a WebSocket's frames; else only the client closing (what it sends is read and
/// dropped). nginx closing the connection (`worker_shutdown_timeout`) closes it at once.
unsafe extern "C" fn reader(rev: *mut ngx_event_t) {
    // SAFETY: nginx calls the handler with the live read event of our connection.
    let (c, ctx) = unsafe { ctx_of(rev) };
    // SAFETY: as above.
    if unsafe { (*c).close() } != 0 {
        close(ctx);
        return;
    }
    // SAFETY: the context is live while the connection is ours.
    let ctx = unsafe { &mut *ctx };
    if ctx.done && !ctx.closing {
        return;
    }
    if ctx.kind == Kind::WebSocket {
        super::websocket::read(ctx);
        return;
    }
    let mut chunk = [0u8; 1024];
    loop {
        // SAFETY: the connection is live; `recv` writes at most `chunk.len()` bytes.
        let n = unsafe {
            match (*c).recv {
                Some(recv) => recv(c, chunk.as_mut_ptr(), chunk.len()),
                None => -1,
            }
        };
        if n == NGX_AGAIN as isize {
            break;
        }
        if n <= 0 {
            // SAFETY: the connection is live.
            let log = unsafe {
                (*c).set_error(1);
                (*c).log
            };
            martd_debug!(log, "streaming subscriber's client closed");
            fail(ctx, "");
            return;
        }
    }
    // SAFETY: the connection's read event, re-armed as nginx's handlers do.
    if unsafe { ngx_handle_read_event(rev, 0) } != NGX_OK as ngx_int_t {
        fail(ctx, "");
    }
}

/// Write events: the socket takes more, or `send_timeout` passed.
unsafe extern "C" fn writer(wev: *mut ngx_event_t) {
    // SAFETY: nginx calls the handler with the live write event of our connection.
    let (c, ctx) = unsafe { ctx_of(wev) };
    // SAFETY: the context is live while the connection is ours.
    let ctx = unsafe { &mut *ctx };
    // SAFETY: as above.
    unsafe {
        if (*wev).timedout() != 0 {
            (*wev).set_timedout(0);
            (*c).set_timedout(1);
            fail(ctx, "client timed out (send_timeout)");
            return;
        }
    }
    if ctx.done && !ctx.closing {
        return;
    }
    flush(ctx);
}
