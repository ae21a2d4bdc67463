//! nginx's access phase for martd locations: what is checked once per request, before a
//! listener waits or a message is accepted, so that it composes with nginx's own `allow`/
//! `deny`, `auth_request` and `limit_req`. A detached listener's replayed request skips the
//! access phases altogether (see `listen::replay`): nothing here runs twice for it.
//!
//! martd's handler is the last one registered in the access phase, so nginx runs it first.
//! It checks cross-origin requests ([`cors`]), channel tokens ([`tokens`]), registered
//! clients on `use_sessions` channels ([`sessions`]), then asks the authorization subrequest
//! ([`authorize`]).

pub mod authorize;
pub mod cors;
pub mod sessions;
pub mod tokens;

use nginx_sys::{
    ngx_http_core_content_phase, ngx_http_core_main_conf_t, ngx_http_core_module,
    ngx_http_request_t, ngx_int_t, NGX_DECLINED,
};

use crate::conf::Role;
use crate::listen::loc_conf;
use crate::worker;

/// The access-phase handler.
pub unsafe extern "C" fn access_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // The location check first: a pointer read, and this runs for every request.
    let lcf = loc_conf(r);
    if lcf.role == Role::None {
        return NGX_DECLINED as ngx_int_t;
    }
    // SAFETY: nginx calls phase handlers with a live request.
    if unsafe { (*r).main } != r {
        return NGX_DECLINED as ngx_int_t;
    }
    if !lcf.allow_origin.is_null() && cors::answered_by_content(r, lcf) {
        // A preflight (answered whatever the other access checks would say: it carries no
        // credentials), or an origin refused: the content handler answers it.
        skip_to_content(r);
        return NGX_DECLINED as ngx_int_t;
    }
    // Once per request: not again when the authorization subrequest brings it back here.
    if lcf.role == Role::Listen && !authorize::started(r) {
        if let Some(rc) = tokens::check(r, lcf) {
            return rc;
        }
        let rc = sessions::check(r, lcf);
        if rc != NGX_DECLINED as ngx_int_t {
            return rc;
        }
    }
    match lcf.role {
        Role::Listen | Role::Push => authorize::check(r, lcf),
        Role::None | Role::ClientJs | Role::Clients | Role::Stats => NGX_DECLINED as ngx_int_t,
    }
}

/// Makes the next phase handler `r` runs the content phase's first one (the caller returns
/// `NGX_DECLINED`, which the generic and access checkers count as one step on).
pub fn skip_to_content(r: *mut ngx_http_request_t) {
    let cached = worker::with(|st| st.detached.content_phase).flatten();
    let index = cached.or_else(|| {
        // SAFETY: the core module's main conf and its phase engine (a handler array ended by
        // a null checker) live as long as the cycle.
        let found = unsafe {
            let cmcf = *(*r).main_conf.add(ngx_http_core_module.ctx_index)
                as *const ngx_http_core_main_conf_t;
            let handlers = (*cmcf).phase_engine.handlers;
            let content = ngx_http_core_content_phase as *const () as usize;
            let mut i = 0;
            loop {
                match (*handlers.add(i)).checker {
                    None => break None,
                    Some(f) if f as usize == content => break Some(i),
                    Some(_) => i += 1,
                }
            }
        };
        worker::with(|st| st.detached.content_phase = found);
        found
    });
    if let Some(i) = index.and_then(|i| i.checked_sub(1)) {
        // SAFETY: `r` is live; its checker adds one for NGX_DECLINED.
        unsafe { (*r).phase_handler = i as ngx_int_t };
    }
}
