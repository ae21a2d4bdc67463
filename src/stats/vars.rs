//! nginx variables for `log_format` and `add_header`: `$martd_channel_id` (see
//! `crate::variables`), and `$martd_message_id`, `$martd_listeners`, `$martd_messages`,
//! which martd's handlers set on the request when they know them (not found otherwise).

use std::ptr;

use nginx_sys::{
    ngx_conf_t, ngx_http_add_variable, ngx_http_get_variable_index, ngx_http_request_t,
    ngx_http_variable_value_t, ngx_int_t, ngx_pnalloc, ngx_str_t, NGX_ERROR, NGX_OK,
};

use crate::conf::MainConf;

/// The variables a handler sets, in the order of [`NAMES`] after `martd_channel_id`.
#[derive(Debug, Clone, Copy)]
pub enum Var {
    MessageId = 0,
    Listeners = 1,
    Messages = 2,
}

const NAMES: [&str; 3] = ["martd_message_id", "martd_listeners", "martd_messages"];

/// Adds the variables (preconfiguration) and records the indices of the ones handlers set in
/// `mcf`. `false`: nginx could not add them.
pub fn add(cf: *mut ngx_conf_t, mcf: &mut MainConf) -> bool {
    let mut name = ngx_str_t { len: 16, data: c"martd_channel_id".as_ptr() as *mut u8 };
    // SAFETY: `cf` is the live configuration; nginx copies nothing of `name` but keeps
    // pointing at it: a static string.
    let v = unsafe {
        ngx_http_add_variable(cf, &mut name, nginx_sys::NGX_HTTP_VAR_NOCACHEABLE as usize)
    };
    if v.is_null() {
        return false;
    }
    // SAFETY: `v` is the variable nginx just made.
    unsafe { (*v).get_handler = Some(crate::variables::channel_id_variable) };
    for (i, n) in NAMES.iter().enumerate() {
        let mut name = ngx_str_t { len: n.len(), data: n.as_ptr() as *mut u8 };
        // SAFETY: as above; the names are statics.
        let v = unsafe { ngx_http_add_variable(cf, &mut name, 0) };
        if v.is_null() {
            return false;
        }
        // SAFETY: as above.
        unsafe { (*v).get_handler = Some(not_set_variable) };
        // SAFETY: the variable was just added.
        mcf.vars[i] = unsafe { ngx_http_get_variable_index(cf, &mut name) };
        if mcf.vars[i] == NGX_ERROR as ngx_int_t {
            return false;
        }
    }
    true
}

/// Sets variable `var` of request `r` to `value` (copied into the request pool).
pub fn set(r: *mut ngx_http_request_t, var: Var, value: &[u8]) {
    let mcf = crate::listen::main_conf(r);
    let index = mcf.vars[var as usize];
    if index < 0 {
        return;
    }
    // SAFETY: `r` is live; `variables` has an entry per indexed variable of its
    // configuration, which `index` is; the value lives in the request pool.
    unsafe {
        let p = ngx_pnalloc((*r).pool, value.len().max(1)) as *mut u8;
        if p.is_null() {
            return;
        }
        ptr::copy_nonoverlapping(value.as_ptr(), p, value.len());
        let v = &mut *(*r).variables.add(index as usize);
        v.set_len(value.len() as u32);
        v.data = p;
        v.set_valid(1);
        v.set_no_cacheable(0);
        v.set_not_found(0);
        v.set_escape(0);
    }
}

/// Sets `$martd_listeners` and `$martd_messages` from a channel's figures.
pub fn set_counts(r: *mut ngx_http_request_t, listeners: u64, messages: u64) {
    set(r, Var::Listeners, listeners.to_string().as_bytes());
    set(r, Var::Messages, messages.to_string().as_bytes());
}

/// Sets `$martd_message_id`.
pub fn set_message_id(r: *mut ngx_http_request_t, id: u64) {
    set(r, Var::MessageId, id.to_string().as_bytes());
}

/// Not found until a handler sets it.
unsafe extern "C" fn not_set_variable(
    _r: *mut ngx_http_request_t,
    v: *mut ngx_http_variable_value_t,
    _data: usize,
) -> ngx_int_t {
    // SAFETY: nginx passes the request's value slot of this variable.
    unsafe { (*v).set_not_found(1) };
    NGX_OK as ngx_int_t
}
