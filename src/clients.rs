//! `martd_clients`: the application registers the clients that may listen on channels with
//! the `use_sessions` attribute (Simple-Comet's sessions). `POST`/`PUT` registers (or renews)
//! `client_id` for `martd_client_timeout`, `GET` tells how long it has left, `DELETE` forgets
//! it. Each listen request of a registered client renews it (see `access::sessions`).

use martd_core::api;
use martd_core::json::push_string;
use martd_core::store::StoreError;
use nginx_sys::{
    ngx_http_discard_request_body, ngx_http_request_t, ngx_int_t, NGX_ERROR, NGX_HTTP_DELETE,
    NGX_HTTP_GET, NGX_HTTP_HEAD, NGX_HTTP_POST, NGX_HTTP_PUT, NGX_OK,
};

use crate::listen::{loc_conf, main_conf, method};
use crate::response;
use crate::worker::now_ms;
use crate::zone;

/// The client id a request names: the `client_id` argument, else an `X-Martd-Client-Id`
/// header, else (`cid`, martd's JSON listen request) the `cid` argument. `Err`: the reason of a
/// `400`.
pub fn client_id(r: *mut ngx_http_request_t, cid: bool) -> Result<Option<Vec<u8>>, String> {
    let v = crate::attrs::arg(r, "client_id")
        .or_else(|| crate::transport::request_header(r, "X-Martd-Client-Id").map(<[u8]>::to_vec))
        .or_else(|| cid.then(|| crate::attrs::arg(r, "cid")).flatten());
    match v {
        Some(v) => api::check_client_id(&v).map(|()| Some(v)),
        None => Ok(None),
    }
}

/// `{"client_id":"ID",NAME:SECONDS}`.
fn reply(id: &[u8], name: &str, ms: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(id.len() + 48);
    out.extend_from_slice(b"{\"client_id\":");
    push_string(&mut out, id);
    out.extend_from_slice(format!(",\"{name}\":{}}}", ms.div_ceil(1000)).as_bytes());
    out
}

/// The content handler of `martd_clients` locations.
pub unsafe extern "C" fn clients_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    if let Some(rc) = crate::access::cors::answer(r, b"GET, POST, PUT, DELETE") {
        return rc;
    }
    // SAFETY: nginx calls content handlers with a live request.
    let rc = unsafe { ngx_http_discard_request_body(r) };
    if rc != NGX_OK as ngx_int_t {
        return rc;
    }
    let m = method(r);
    let known = [NGX_HTTP_POST, NGX_HTTP_PUT, NGX_HTTP_GET, NGX_HTTP_HEAD, NGX_HTTP_DELETE];
    if !known.iter().any(|&k| k as usize == m) {
        response::add_header(r, "Allow", b"GET, POST, PUT, DELETE");
        return response::error(r, 405, "martd_clients takes GET, POST, PUT and DELETE");
    }
    let id = match client_id(r, false) {
        Ok(Some(id)) => id,
        Ok(None) => return response::error(r, 400, "no client_id"),
        Err(reason) => return response::error(r, 400, &reason),
    };
    let timeout = loc_conf(r).client_timeout as u64;
    let now = now_ms();
    let Some(mut z) = zone::lock(main_conf(r)) else {
        return NGX_ERROR as ngx_int_t;
    };
    let store = z.store();
    if m == NGX_HTTP_POST as usize || m == NGX_HTTP_PUT as usize {
        let done = store.register_client(&id, now, timeout);
        drop(z);
        return match done {
            Ok(new) => response::json(
                r,
                if new { 201 } else { 200 },
                &reply(&id, "timeout", timeout),
                None,
            ),
            Err(StoreError::NoMemory) => response::error(r, 507, "shared memory zone is full"),
            Err(_) => NGX_ERROR as ngx_int_t,
        };
    }
    if m == NGX_HTTP_DELETE as usize {
        let gone = store.unregister_client(&id);
        drop(z);
        return match gone {
            true => response::json(r, 200, &reply(&id, "timeout", timeout), None),
            false => response::error(r, 404, "no such client"),
        };
    }
    let left = store.client_alive(&id, now, false);
    drop(z);
    match left {
        Some(ms) => response::json(r, 200, &reply(&id, "expires_in", ms), None),
        None => response::error(r, 404, "no such client"),
    }
}
