//! martd: a push server inside nginx.
//!
//! This crate is the nginx edge of martd: module statics, directives, request handlers, the
//! shared zone and the workers' wake-up sockets. The channel store and everything else that
//! does not need nginx is in the `martd-core` crate.
//!
//! * [`conf`]: directives and their configuration structures.
//! * [`zone`]: the shared zone, its allocator and its lock.
//! * [`notify`]: one datagram socket per worker, bound in the abstract namespace.
//! * [`worker`]: the worker's own state: its slot in the zone, its parked listeners, wake-ups.
//! * [`push`] and [`listen`]: the two endpoints; [`listen::detach`] and [`listen::replay`]:
//!   listeners that give their request back to nginx while they wait.
//! * [`response`]: building responses.
//! * [`stats`]: the `martd_stats` endpoint and this worker's counters.

use std::ffi::c_void;
use std::ptr;

use nginx_sys::{ngx_command_t, ngx_http_module_t, ngx_module_t, NGX_HTTP_MODULE};

#[macro_use]
mod log;
mod access;
mod attrs;
mod backend;
mod channel_id;
mod client_js;
mod clients;
mod conf;
mod error;
mod listen;
mod notify;
mod push;
mod response;
mod stats;
mod transport;
mod variables;
mod worker;
mod zone;

#[cfg(feature = "export-modules")]
ngx::ngx_modules!(ngx_http_martd_module);

static NGX_HTTP_MARTD_MODULE_CTX: ngx_http_module_t = ngx_http_module_t {
    preconfiguration: Some(conf::preconfiguration),
    postconfiguration: Some(conf::postconfiguration),
    create_main_conf: Some(conf::create_main_conf),
    init_main_conf: Some(conf::init_main_conf),
    create_srv_conf: None,
    merge_srv_conf: None,
    create_loc_conf: Some(conf::create_loc_conf),
    merge_loc_conf: Some(conf::merge_loc_conf),
};

/// The module, under the name nginx's `load_module` and `--add-dynamic-module` expect.
#[used]
#[no_mangle]
#[allow(non_upper_case_globals)]
pub static mut ngx_http_martd_module: ngx_module_t = ngx_module_t {
    ctx: ptr::addr_of!(NGX_HTTP_MARTD_MODULE_CTX) as *mut c_void,
    // SAFETY: only the address of the command table is taken; nginx reads it at config time.
    commands: unsafe { ptr::addr_of_mut!(conf::NGX_HTTP_MARTD_COMMANDS[0]) },
    type_: NGX_HTTP_MODULE as _,
    init_process: Some(worker::init_process),
    exit_process: Some(worker::exit_process),
    exit_master: Some(backend::persist::exit_master),
    ..ngx_module_t::default()
};

/// The module, for code that needs a reference.
pub(crate) fn module() -> &'static ngx_module_t {
    // SAFETY: nginx writes the module's indices before any handler runs and never after, so
    // a shared reference taken at run time sees a value that no longer changes.
    unsafe { &*ptr::addr_of!(ngx_http_martd_module) }
}

#[allow(dead_code)]
const _: Option<ngx_command_t> = None;
