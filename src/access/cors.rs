//! Cross-origin requests on martd locations (`martd_allow_origin`).
//!
//! The value (variables allowed) is `*`, a list of origins, or empty/`off`; it is judged
//! against the request's `Origin` by `martd_core::cors::judge`. A refused origin gets `403`
//! and a preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) of an allowed
//! one gets `204` with what it may send; both are answered by the content handler, which the
//! access phase sends them to directly. Every response of the location to an allowed origin,
//! whatever its status and whoever made it (martd, nginx's error pages, `auth_request`, a
//! detached listener's replay, a stream's head), carries `Access-Control-Allow-Origin` and
//! the rest: they are added by a header filter.

use martd_core::cors::{self, Verdict};
use nginx_sys::{
    ngx_http_complex_value, ngx_http_discard_request_body, ngx_http_output_header_filter_pt,
    ngx_http_request_t, ngx_http_top_header_filter, ngx_int_t, ngx_str_t, NGX_ERROR,
    NGX_HTTP_OPTIONS, NGX_OK,
};

use crate::conf::{LocConf, Role};
use crate::listen::{loc_conf, method};
use crate::response::{self, Body};
use crate::transport::request_header;

/// The response headers a cross-origin client may read.
const EXPOSE: &[u8] = b"Etag, Last-Modified, X-Martd-Channel";

/// How long a browser may keep a preflight's answer (seconds).
const MAX_AGE: &[u8] = b"600";

/// What `martd_allow_origin` says about request `r`.
fn verdict(r: *mut ngx_http_request_t, lcf: &LocConf) -> Verdict {
    if lcf.allow_origin.is_null() {
        return Verdict::Off;
    }
    let mut v = ngx_str_t { len: 0, data: std::ptr::null_mut() };
    // SAFETY: `r` is a live request; the value was compiled for its location; the result
    // lives in the request pool and is read before returning.
    let allowed = unsafe {
        if ngx_http_complex_value(r, lcf.allow_origin, &mut v) != NGX_OK as ngx_int_t {
            return Verdict::Refused;
        }
        if v.data.is_null() {
            &[][..]
        } else {
            std::slice::from_raw_parts(v.data, v.len)
        }
    };
    cors::judge(allowed, request_header(r, "Origin"))
}

fn is_preflight(r: *mut ngx_http_request_t) -> bool {
    method(r) == NGX_HTTP_OPTIONS as usize
        && request_header(r, "Access-Control-Request-Method").is_some()
}

/// Whether the content handler answers `r` right away (a preflight, or a refused origin), so
/// that the access phase sends it there.
pub fn answered_by_content(r: *mut ngx_http_request_t, lcf: &LocConf) -> bool {
    match verdict(r, lcf) {
        Verdict::Refused => true,
        Verdict::Allowed => is_preflight(r),
        Verdict::Off => false,
    }
}

/// A content handler's first step: answers a refused origin (`403`) or a preflight (`204`,
/// with `methods`); `None`: the request goes on.
pub fn answer(r: *mut ngx_http_request_t, methods: &'static [u8]) -> Option<ngx_int_t> {
    let lcf = loc_conf(r);
    let preflight = match verdict(r, lcf) {
        Verdict::Off => return None,
        Verdict::Allowed if !is_preflight(r) => return None,
        Verdict::Allowed => true,
        Verdict::Refused => false,
    };
    // SAFETY: nginx calls content handlers with a live request.
    let rc = unsafe { ngx_http_discard_request_body(r) };
    if rc != NGX_OK as ngx_int_t {
        return Some(rc);
    }
    if !preflight {
        return Some(response::error(r, 403, "origin not allowed (martd_allow_origin)"));
    }
    let asked =
        request_header(r, "Access-Control-Request-Headers").and_then(cors::requested_headers);
    let added = response::add_static_header(r, "Access-Control-Allow-Methods", methods)
        .and_then(|()| response::add_static_header(r, "Access-Control-Max-Age", MAX_AGE))
        .and_then(|()| match asked {
            Some(h) => response::add_header(r, "Access-Control-Allow-Headers", h),
            None => Some(()),
        });
    if added.is_none() {
        return Some(NGX_ERROR as ngx_int_t);
    }
    Some(response::send(r, 204, b"", Body::Lasting(b""), None))
}

static mut NEXT_HEADER_FILTER: ngx_http_output_header_filter_pt = None;

/// Puts [`header_filter`] at the top of nginx's header filters (at configuration, once per
/// cycle, as every nginx filter module does).
///
/// # Safety
/// Called from the module's postconfiguration, on nginx's only thread.
pub unsafe fn install_header_filter() {
    // SAFETY: as above: the filter chain is rebuilt by each configuration.
    unsafe {
        NEXT_HEADER_FILTER = ngx_http_top_header_filter;
        ngx_http_top_header_filter = Some(header_filter);
    }
}

/// Adds the cross-origin headers to a response of a martd location to an allowed origin (a
/// `martd_allow_origin` inherited by other locations of the server does nothing there).
unsafe extern "C" fn header_filter(r: *mut ngx_http_request_t) -> ngx_int_t {
    let lcf = loc_conf(r);
    // SAFETY: nginx calls header filters with a live request.
    if !lcf.allow_origin.is_null()
        && lcf.role != Role::None
        && unsafe { (*r).main } == r
        && verdict(r, lcf) == Verdict::Allowed
    {
        if let Some(origin) = request_header(r, "Origin") {
            let added = response::add_header(r, "Access-Control-Allow-Origin", origin.trim_ascii())
                .and_then(|()| {
                    response::add_static_header(r, "Access-Control-Allow-Credentials", b"true")
                })
                .and_then(|()| {
                    response::add_static_header(r, "Access-Control-Expose-Headers", EXPOSE)
                })
                .and_then(|()| response::add_static_header(r, "Vary", b"Origin"));
            if added.is_none() {
                return NGX_ERROR as ngx_int_t;
            }
        }
    }
    // SAFETY: the next filter was set with ours, at configuration.
    match unsafe { NEXT_HEADER_FILTER } {
        Some(next) => unsafe { next(r) },
        None => NGX_OK as ngx_int_t,
    }
}
