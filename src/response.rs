//! Building and sending responses.

use std::ffi::c_void;
use std::ptr;
use std::rc::Rc;

use nginx_sys::{
    ngx_buf_t, ngx_chain_t, ngx_http_output_filter, ngx_http_request_t, ngx_http_send_header,
    ngx_http_send_special, ngx_http_set_content_type, ngx_int_t, ngx_list_push, ngx_pcalloc,
    ngx_pnalloc, ngx_pool_cleanup_add, ngx_str_t, ngx_table_elt_t, time_t, NGX_ERROR,
    NGX_HTTP_LAST, NGX_OK,
};

use martd_core::listeners::Payload;

/// A response body.
pub enum Body<'a> {
    /// Bytes copied into the request pool.
    Bytes(&'a [u8]),
    /// A message shared with every other listener of this worker, already held by the
    /// request: no copy.
    Held(&'a Rc<Payload>),
    /// Bytes that outlive the request (configuration memory): no copy.
    Lasting(&'a [u8]),
}

/// Copies `bytes` into the request pool.
fn pool_bytes(r: *mut ngx_http_request_t, bytes: &[u8]) -> Option<ngx_str_t> {
    if bytes.is_empty() {
        return Some(ngx_str_t { len: 0, data: ptr::null_mut() });
    }
    // SAFETY: `r->pool` is the live request pool; the copy fits the allocation.
    unsafe {
        let p = ngx_pnalloc((*r).pool, bytes.len()) as *mut u8;
        if p.is_null() {
            return None;
        }
        ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len());
        Some(ngx_str_t { len: bytes.len(), data: p })
    }
}

/// Adds a response header (`name` must be static; `value` is copied into the pool).
pub fn add_header(r: *mut ngx_http_request_t, name: &'static str, value: &[u8]) -> Option<()> {
    // The copy lives in the request pool, as long as the headers.
    let value = pool_bytes(r, value)?;
    add_header_ref(r, name, value.as_bytes())
}

extern "C" fn release_payload(data: *mut c_void) {
    // SAFETY: `data` holds the `Rc` written in `hold_payload`, read exactly once here.
    unsafe { drop(ptr::read(data as *mut Rc<Payload>)) }
}

/// Keeps `payload` alive as long as the request.
fn hold_payload(r: *mut ngx_http_request_t, payload: &Rc<Payload>) -> Option<()> {
    // SAFETY: the cleanup data area is sized for an `Rc` and pool-aligned; it is written
    // before the handler is set.
    unsafe {
        let cln = ngx_pool_cleanup_add((*r).pool, size_of::<Rc<Payload>>());
        if cln.is_null() {
            return None;
        }
        ptr::write((*cln).data as *mut Rc<Payload>, Rc::clone(payload));
        (*cln).handler = Some(release_payload);
    }
    Some(())
}

/// Sends a whole response and returns what to finalize the request with.
pub fn send(
    r: *mut ngx_http_request_t,
    status: usize,
    content_type: &[u8],
    body: Body<'_>,
    last_modified: Option<time_t>,
) -> ngx_int_t {
    send_inner(r, status, content_type, body, last_modified).unwrap_or(NGX_ERROR as ngx_int_t)
}

fn send_inner(
    r: *mut ngx_http_request_t,
    status: usize,
    content_type: &[u8],
    body: Body<'_>,
    last_modified: Option<time_t>,
) -> Option<ngx_int_t> {
    let (data, len) = match &body {
        Body::Bytes(b) => {
            let s = pool_bytes(r, b)?;
            (s.data as *const u8, s.len)
        }
        Body::Held(p) => (p.body().as_ptr(), p.body().len()),
        Body::Lasting(b) => (b.as_ptr(), b.len()),
    };
    let content_type = match &body {
        Body::Held(p) => p.content_type(),
        Body::Bytes(_) | Body::Lasting(_) => content_type,
    };
    // SAFETY: `r` is a live request owned by this worker; the strings given to nginx live in
    // the request pool or in a payload the pool holds.
    unsafe {
        (*r).headers_out.status = status;
        (*r).set_disable_not_modified(1);
        if content_type.is_empty() {
            if ngx_http_set_content_type(r) != NGX_OK as ngx_int_t {
                return None;
            }
        } else {
            let ct = match &body {
                Body::Held(_) => {
                    ngx_str_t { len: content_type.len(), data: content_type.as_ptr() as *mut u8 }
                }
                Body::Bytes(_) | Body::Lasting(_) => pool_bytes(r, content_type)?,
            };
            (*r).headers_out.content_type = ct;
            (*r).headers_out.content_type_len = ct.len;
            (*r).headers_out.content_type_lowcase = ptr::null_mut();
        }
        if let Some(t) = last_modified {
            (*r).headers_out.last_modified_time = t;
        }
        if status == 304 {
            (*r).headers_out.content_length_n = -1;
            (*r).set_header_only(1);
        } else {
            (*r).headers_out.content_length_n = len as i64;
        }
        let rc = ngx_http_send_header(r);
        if rc == NGX_ERROR as ngx_int_t || rc > NGX_OK as ngx_int_t || (*r).header_only() != 0 {
            return Some(rc);
        }
        if len == 0 {
            return Some(ngx_http_send_special(r, NGX_HTTP_LAST as _));
        }
        let b = ngx_pcalloc((*r).pool, size_of::<ngx_buf_t>()) as *mut ngx_buf_t;
        if b.is_null() {
            return None;
        }
        (*b).pos = data as *mut u8;
        (*b).start = data as *mut u8;
        (*b).last = (data as *mut u8).add(len);
        (*b).end = (*b).last;
        (*b).set_memory(1);
        (*b).set_last_buf(u32::from(r == (*r).main));
        (*b).set_last_in_chain(1);
        let mut out = ngx_chain_t { buf: b, next: ptr::null_mut() };
        Some(ngx_http_output_filter(r, &mut out))
    }
}

/// Adds a response header with a static value.
pub fn add_static_header(
    r: *mut ngx_http_request_t,
    name: &'static str,
    value: &'static [u8],
) -> Option<()> {
    add_header_ref(r, name, value)
}

/// Adds a response header whose value lives at least as long as the request (a static, or
/// memory of a payload the request holds).
fn add_header_ref(r: *mut ngx_http_request_t, name: &'static str, value: &[u8]) -> Option<()> {
    // SAFETY: `headers_out.headers` is the request's live header list; the new element is
    // zeroed first so fields this nginx version has and we do not set stay empty; the value
    // outlives the request by the caller's contract.
    unsafe {
        let h = ngx_list_push(&mut (*r).headers_out.headers) as *mut ngx_table_elt_t;
        if h.is_null() {
            return None;
        }
        ptr::write_bytes(h, 0, 1);
        (*h).hash = 1;
        (*h).key = ngx_str_t { len: name.len(), data: name.as_ptr() as *mut u8 };
        (*h).value = ngx_str_t { len: value.len(), data: value.as_ptr() as *mut u8 };
    }
    Some(())
}

/// A message response: `200`, its body, `Content-Type`, `Last-Modified` and `Etag`, with no
/// copy of the message (the request holds the worker's shared copy).
pub fn message(r: *mut ngx_http_request_t, payload: &Rc<Payload>) -> ngx_int_t {
    let headers = hold_payload(r, payload)
        .and_then(|()| add_header_ref(r, "Etag", payload.etag()))
        .and_then(|()| add_header_ref(r, "Vary", b"If-None-Match, If-Modified-Since"));
    if headers.is_none() {
        return NGX_ERROR as ngx_int_t;
    }
    send(r, 200, b"", Body::Held(payload), Some(payload.time as _))
}

/// An error response: `{"error":"reason"}` as `application/json`.
pub fn error(r: *mut ngx_http_request_t, status: usize, reason: &str) -> ngx_int_t {
    error_in(r, status, reason, None)
}

/// An error response about one channel: `{"error":"reason","channel":"name"}`.
pub fn error_in(
    r: *mut ngx_http_request_t,
    status: usize,
    reason: &str,
    channel: Option<&[u8]>,
) -> ngx_int_t {
    let body = martd_core::json::error(reason, channel);
    no_store(r);
    send(r, status, b"application/json", Body::Bytes(&body), None)
}

/// The start of a read-only endpoint: the request body is discarded, and a method other than
/// `GET` or `HEAD` is answered `405` (`Allow: GET, HEAD`) with `reason`. `Err`: what the
/// handler returns at once.
pub fn get_or_head(r: *mut ngx_http_request_t, reason: &str) -> Result<(), ngx_int_t> {
    // SAFETY: `r` is the live request of a content handler.
    let rc = unsafe { nginx_sys::ngx_http_discard_request_body(r) };
    if rc != NGX_OK as ngx_int_t {
        return Err(rc);
    }
    // SAFETY: `r` is live.
    let m = unsafe { (*r).method };
    if m != nginx_sys::NGX_HTTP_GET as usize && m != nginx_sys::NGX_HTTP_HEAD as usize {
        add_header(r, "Allow", b"GET, HEAD");
        return Err(error(r, 405, reason));
    }
    Ok(())
}

/// `Cache-Control: no-store`: martd's answers are never to be cached (old browsers cache
/// XMLHttpRequest GETs).
pub fn no_store(r: *mut ngx_http_request_t) {
    let _ = add_header_ref(r, "Cache-Control", b"no-store");
}

/// A JSON (or, with a JSONP callback, JavaScript) body of martd's API.
pub fn json(
    r: *mut ngx_http_request_t,
    status: usize,
    body: &[u8],
    callback: Option<&[u8]>,
) -> ngx_int_t {
    no_store(r);
    let Some(cb) = callback else {
        return send(r, status, b"application/json", Body::Bytes(body), None);
    };
    let mut wrapped = Vec::new();
    if wrapped.try_reserve_exact(cb.len() + body.len() + 3).is_err() {
        return NGX_ERROR as ngx_int_t;
    }
    wrapped.extend_from_slice(cb);
    wrapped.push(b'(');
    wrapped.extend_from_slice(body.strip_suffix(b"\n").unwrap_or(body));
    wrapped.extend_from_slice(b");");
    send(r, status, b"application/javascript", Body::Bytes(&wrapped), None)
}
