//! `martd_authorize_request URI`: before a listener waits or a push is accepted, an internal
//! subrequest to `URI` decides, as nginx's `auth_request` does: a `2xx` answer allows, `401`
//! (with the subrequest's `WWW-Authenticate`) and `403` go to the client, anything else is a
//! `500` with an error log line. The subrequest sees the channel(s) in `$martd_channel_id`.
//! It runs once per request: a detached listener's replayed request skips the access phase.

use std::ffi::c_void;
use std::ptr;

use nginx_sys::{
    ngx_http_post_subrequest_t, ngx_http_request_body_t, ngx_http_request_t, ngx_http_subrequest,
    ngx_int_t, ngx_list_push, ngx_pcalloc, ngx_str_t, ngx_table_elt_t, NGX_AGAIN, NGX_DECLINED,
    NGX_ERROR, NGX_HTTP_FORBIDDEN, NGX_HTTP_INTERNAL_SERVER_ERROR, NGX_HTTP_OK,
    NGX_HTTP_SPECIAL_RESPONSE, NGX_HTTP_SUBREQUEST_WAITED, NGX_HTTP_UNAUTHORIZED, NGX_LOG_ERR,
    NGX_OK,
};

use crate::conf::LocConf;

/// The state of one request's authorization, in its pool (the module's context slot, until
/// the content phase, where a stream puts its own there).
#[repr(C)]
struct AuthCtx {
    done: usize,
    status: usize,
    subrequest: *mut ngx_http_request_t,
}

/// The access-phase step: `NGX_DECLINED` when there is nothing to ask, `NGX_OK` when the
/// subrequest allowed, else what the phase handler returns (`NGX_AGAIN` while it runs).
pub fn check(r: *mut ngx_http_request_t, lcf: &LocConf) -> ngx_int_t {
    let uri = &lcf.authorize_request;
    if uri.len == 0 || uri.data.is_null() || uri.as_bytes() == b"off" {
        return NGX_DECLINED as ngx_int_t;
    }
    let index = crate::module().ctx_index;
    // SAFETY: `r` is the live main request in its access phase; our context slot holds this
    // step's `AuthCtx` or null (nothing else is put there before the content phase).
    unsafe {
        let ctx = *(*r).ctx.add(index) as *mut AuthCtx;
        if let Some(ctx) = ctx.as_ref() {
            if ctx.done == 0 {
                return NGX_AGAIN as ngx_int_t;
            }
            return verdict(r, ctx, uri);
        }
        let ctx = ngx_pcalloc((*r).pool, size_of::<AuthCtx>()) as *mut AuthCtx;
        let ps = ngx_pcalloc((*r).pool, size_of::<ngx_http_post_subrequest_t>())
            as *mut ngx_http_post_subrequest_t;
        if ctx.is_null() || ps.is_null() {
            return NGX_ERROR as ngx_int_t;
        }
        (*ps).handler = Some(subrequest_done);
        (*ps).data = ctx as *mut c_void;
        let mut uri = *uri;
        let mut sr: *mut ngx_http_request_t = ptr::null_mut();
        let rc = ngx_http_subrequest(
            r,
            &mut uri,
            ptr::null_mut(),
            &mut sr,
            ps,
            NGX_HTTP_SUBREQUEST_WAITED as usize,
        );
        if rc != NGX_OK as ngx_int_t || sr.is_null() {
            return NGX_ERROR as ngx_int_t;
        }
        // An empty body of its own: the subrequest never reads the client's (a publish's
        // body is read after, by martd's handler).
        let body = ngx_pcalloc((*r).pool, size_of::<ngx_http_request_body_t>());
        if body.is_null() {
            return NGX_ERROR as ngx_int_t;
        }
        (*sr).request_body = body as *mut ngx_http_request_body_t;
        (*sr).set_header_only(1);
        (*ctx).subrequest = sr;
        *(*r).ctx.add(index) = ctx as *mut c_void;
        martd_debug!((*(*r).connection).log, "authorization subrequest started");
    }
    NGX_AGAIN as ngx_int_t
}

/// Whether `r`'s authorization subrequest was started (the access phase came back to
/// martd's handler for its answer).
pub fn started(r: *mut ngx_http_request_t) -> bool {
    // SAFETY: `r` is live in its access phase; our context slot holds an `AuthCtx` or null.
    unsafe { !(*(*r).ctx.add(crate::module().ctx_index)).is_null() }
}

/// The subrequest's answer turned into the access phase's.
///
/// # Safety
/// `r` is live; `ctx` is its finished authorization.
unsafe fn verdict(r: *mut ngx_http_request_t, ctx: &AuthCtx, uri: &ngx_str_t) -> ngx_int_t {
    let status = ctx.status;
    if (NGX_HTTP_OK as usize..NGX_HTTP_SPECIAL_RESPONSE as usize).contains(&status) {
        return NGX_OK as ngx_int_t;
    }
    if status == NGX_HTTP_FORBIDDEN as usize {
        return status as ngx_int_t;
    }
    if status == NGX_HTTP_UNAUTHORIZED as usize {
        // SAFETY: as the caller promises; the subrequest's headers live in its parent's pool.
        if unsafe { copy_www_authenticate(r, ctx.subrequest) }.is_none() {
            return NGX_ERROR as ngx_int_t;
        }
        return status as ngx_int_t;
    }
    // SAFETY: the connection's log is live.
    let log = unsafe { (*(*r).connection).log };
    martd_log!(
        NGX_LOG_ERR,
        log,
        "martd_authorize_request \"{}\" answered {}: only 2xx, 401 and 403 are understood",
        String::from_utf8_lossy(uri.as_bytes()),
        status
    );
    NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t
}

/// The subrequest's `WWW-Authenticate` headers (its own, or its upstream's) on `r`'s `401`.
///
/// # Safety
/// `r` and its finished subrequest `sr` are live.
unsafe fn copy_www_authenticate(
    r: *mut ngx_http_request_t,
    sr: *mut ngx_http_request_t,
) -> Option<()> {
    // SAFETY: as above; the copied elements point at values in the shared pool.
    unsafe {
        let mut h = (*sr).headers_out.www_authenticate;
        if h.is_null() && !(*sr).upstream.is_null() {
            h = (*(*sr).upstream).headers_in.www_authenticate;
        }
        let mut link: *mut *mut ngx_table_elt_t = &mut (*r).headers_out.www_authenticate;
        while !h.is_null() {
            let ho = ngx_list_push(&mut (*r).headers_out.headers) as *mut ngx_table_elt_t;
            if ho.is_null() {
                return None;
            }
            *ho = *h;
            *link = ho;
            h = next_header(ho, &mut link);
        }
    }
    Some(())
}

/// Cuts copied header `ho` from the chain it was copied from: the next one of that chain
/// (nginx 1.23.0 on, which chains same-name headers), and where to link it.
///
/// # Safety
/// `ho` is a live header element of the request.
#[cfg(ngx_header_chain)]
unsafe fn next_header(
    ho: *mut ngx_table_elt_t,
    link: &mut *mut *mut ngx_table_elt_t,
) -> *mut ngx_table_elt_t {
    // SAFETY: as above.
    unsafe {
        let next = (*ho).next;
        (*ho).next = ptr::null_mut();
        *link = &mut (*ho).next;
        next
    }
}

/// Before nginx 1.23.0 a response has one `WWW-Authenticate` element: nothing follows.
///
/// # Safety
/// Nothing: kept alike the other one.
#[cfg(not(ngx_header_chain))]
unsafe fn next_header(
    _ho: *mut ngx_table_elt_t,
    _link: &mut *mut *mut ngx_table_elt_t,
) -> *mut ngx_table_elt_t {
    ptr::null_mut()
}

unsafe extern "C" fn subrequest_done(
    sr: *mut ngx_http_request_t,
    data: *mut c_void,
    rc: ngx_int_t,
) -> ngx_int_t {
    // SAFETY: `data` is the `AuthCtx` given with the subrequest, in the parent's pool.
    unsafe {
        let ctx = data as *mut AuthCtx;
        (*ctx).done = 1;
        (*ctx).status = (*sr).headers_out.status;
        martd_debug!(
            (*(*sr).connection).log,
            "authorization subrequest answered {}",
            (*ctx).status
        );
    }
    rc
}
