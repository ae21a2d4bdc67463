//! A stream that holds its request: it writes through nginx's output filters (the chunked
//! encoding, HTTP/2, TLS, any body filter), flushed, and nginx's write events drive what is
//! left to send. Until it gives its request back (see [`super::detached`]), or for good where
//! nginx still needs the request.

use std::ptr;

use nginx_sys::{
    ngx_add_timer, ngx_buf_t, ngx_chain_t, ngx_del_timer, ngx_http_core_loc_conf_t,
    ngx_http_core_module, ngx_http_output_filter, ngx_http_request_t, ngx_int_t, ngx_pcalloc,
    NGX_ERROR, NGX_OK,
};

use super::piece::{point_at, Piece};
use super::streaming::{ctx_of, fail, over_cap, post_task, StreamCtx};

/// Gives `pieces` to nginx's output filters, flushed.
pub(super) fn write(ctx: &mut StreamCtx, pieces: Vec<Piece>) {
    let r = ctx.request;
    let mut links: Vec<ngx_chain_t> = Vec::with_capacity(pieces.len());
    for piece in pieces {
        let (bytes, keep) = piece.into_parts();
        // SAFETY: `bytes` points into `keep` or at static bytes (see `Piece`).
        let bytes = unsafe { &*bytes };
        if bytes.is_empty() {
            continue;
        }
        let Some(b) = ctx.free.pop().or_else(|| new_buf(r)) else {
            fail(ctx, "no memory for a buffer");
            return;
        };
        // SAFETY: `b` is a buffer header of this request's pool, not in nginx's hands (new,
        // or sent); the bytes outlive it (`keep` goes with it into `in_flight`).
        unsafe { point_at(b, bytes) };
        ctx.in_flight.push_back((b, bytes.len(), keep));
        ctx.pending += bytes.len();
        links.push(ngx_chain_t { buf: b, next: ptr::null_mut() });
    }
    let n = links.len();
    if n == 0 {
        return;
    }
    let base = links.as_mut_ptr();
    // SAFETY: `links` is not resized from here on; nginx's filters copy the links they keep,
    // so the chain lives only for this call.
    let rc = unsafe {
        for i in 1..n {
            (*base.add(i - 1)).next = base.add(i);
        }
        (*(*base.add(n - 1)).buf).set_flush(1);
        ngx_http_output_filter(r, base)
    };
    settle(ctx, rc);
}

fn new_buf(r: *mut ngx_http_request_t) -> Option<*mut ngx_buf_t> {
    // SAFETY: `r` is live; the header lives in its pool and is reused for its lifetime.
    let b = unsafe { ngx_pcalloc((*r).pool, size_of::<ngx_buf_t>()) } as *mut ngx_buf_t;
    (!b.is_null()).then_some(b)
}

/// After nginx took or sent bytes (`rc` of the output filter): buffers sent are recycled, a
/// failed write or too much pending closes the connection, and the write timer follows
/// what is left to send. Nothing left: the stream may give its request back.
pub(super) fn settle(ctx: &mut StreamCtx, rc: ngx_int_t) {
    while let Some(&(b, len, _)) = ctx.in_flight.front() {
        // SAFETY: `b` is a buffer header of this request's pool.
        if unsafe { (*b).pos != (*b).last } {
            break;
        }
        ctx.in_flight.pop_front();
        ctx.pending -= len;
        ctx.free.push(b);
    }
    if rc == NGX_ERROR as ngx_int_t {
        fail(ctx, "");
        return;
    }
    if !over_cap(ctx) {
        return;
    }
    let r = ctx.request;
    // SAFETY: `r` and its connection are live; the core module's location conf is at its
    // `ctx_index`.
    unsafe {
        let c = (*r).connection;
        let wev = (*c).write;
        if (*c).buffered() != 0 || (*r).buffered() != 0 {
            let clcf = *(*r).loc_conf.add(ngx_http_core_module.ctx_index)
                as *const ngx_http_core_loc_conf_t;
            if (*wev).delayed() == 0 {
                ngx_add_timer(wev, ctx.send_timeout);
            }
            if nginx_sys::ngx_handle_write_event(wev, (*clcf).send_lowat) != NGX_OK as ngx_int_t {
                fail(ctx, "");
            }
            return;
        }
        if (*wev).timer_set() != 0 {
            ngx_del_timer(wev);
        }
    }
    if ctx.may_detach && ctx.pending == 0 && !ctx.done {
        post_task(ctx);
    }
}

/// The write event of a stream's request: nginx can send more.
pub(super) unsafe extern "C" fn writer(r: *mut ngx_http_request_t) {
    let Some(ctx) = ctx_of(r) else { return };
    // SAFETY: `r` and its connection are live (nginx calls the handler for them).
    unsafe {
        let c = (*r).connection;
        let wev = (*c).write;
        if (*wev).timedout() != 0 {
            (*c).set_timedout(1);
            fail(ctx, "client timed out (send_timeout)");
            return;
        }
        if (*wev).delayed() != 0 || ctx.done {
            return;
        }
        let rc = ngx_http_output_filter(r, ptr::null_mut());
        settle(ctx, rc);
    }
}
