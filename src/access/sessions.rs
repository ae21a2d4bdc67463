//! Registered clients on listen requests: a channel with the `use_sessions` attribute admits
//! only a listener that names a registered client (`client_id`, `X-Martd-Client-Id`, or the
//! `cid` of a JSON listen request), else `403`; channels without it stay open to all, in the
//! same request too. A registered client's listen request renews it. Checked only where the
//! configuration has a `martd_clients` location (without one no client can be registered, and
//! a push cannot set `use_sessions`): elsewhere no zone lock is taken here.

use nginx_sys::{ngx_http_request_t, ngx_int_t, NGX_DECLINED, NGX_ERROR, NGX_HTTP_FORBIDDEN};

use crate::conf::LocConf;
use crate::listen::main_conf;
use crate::worker::now_ms;
use crate::zone;

/// The access-phase step for a listen request.
pub fn check(r: *mut ngx_http_request_t, lcf: &LocConf) -> ngx_int_t {
    let mcf = main_conf(r);
    if !mcf.clients {
        return NGX_DECLINED as ngx_int_t;
    }
    // Invalid channel ids are the content handler's `400`.
    let Some(names) = crate::variables::request_channels(r) else {
        return NGX_DECLINED as ngx_int_t;
    };
    let client = crate::clients::client_id(r, lcf.json).ok().flatten();
    let now = now_ms();
    let Some(mut z) = zone::lock(mcf) else {
        return NGX_ERROR as ngx_int_t;
    };
    let store = z.store();
    if !names.iter().any(|n| store.needs_session(n)) {
        return NGX_DECLINED as ngx_int_t;
    }
    let admitted = client.is_some_and(|id| store.client_alive(&id, now, true).is_some());
    drop(z);
    if admitted {
        return NGX_DECLINED as ngx_int_t;
    }
    // SAFETY: the connection's log is live.
    let log = unsafe { (*(*r).connection).log };
    martd_debug!(log, "listener refused: a channel needs a registered client (use_sessions)");
    NGX_HTTP_FORBIDDEN as ngx_int_t
}
