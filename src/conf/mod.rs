//! Directives and configuration.
//!
//! Location-level settings use nginx's own slot setters (so errors read like nginx's:
//! `"martd_message_timeout" directive invalid value`, `is duplicate`), and merge
//! http → server → location with the defaults documented in the README.

use std::ffi::{c_char, c_void};
use std::ptr::{self, NonNull};

use nginx_sys::{
    ngx_array_push, ngx_conf_t, ngx_flag_t, ngx_http_complex_value_t, ngx_http_conf_ctx_t,
    ngx_http_core_main_conf_t, ngx_http_core_module, ngx_http_handler_pt,
    ngx_http_phases_NGX_HTTP_ACCESS_PHASE as NGX_HTTP_ACCESS_PHASE,
    ngx_http_phases_NGX_HTTP_PREACCESS_PHASE as NGX_HTTP_PREACCESS_PHASE, ngx_int_t, ngx_msec_t,
    ngx_pcalloc, ngx_shared_memory_add, ngx_shm_zone_t, ngx_str_t, ngx_uint_t,
};
use ngx::core::NGX_CONF_OK;
use ngx::ngx_string;

use martd_core::store::Concurrency;

use crate::zone::ZoneRoot;

mod directives;

pub use directives::NGX_HTTP_MARTD_COMMANDS;

const UNSET: isize = -1;
const UNSET_UINT: usize = usize::MAX;
const UNSET_MSEC: ngx_msec_t = ngx_msec_t::MAX;
const UNSET_SIZE: usize = usize::MAX;

/// Default `martd_shm_size`.
pub const DEFAULT_SHM_SIZE: usize = 32 * 1024 * 1024;
/// Smallest `martd_shm_size` accepted.
pub const MIN_SHM_SIZE: usize = 256 * 1024;

/// `http`-level state: the zone.
#[repr(C)]
pub struct MainConf {
    pub shm_size: usize,
    /// `martd_shm_size` is set or some location uses `martd_push` or `martd_listen`: the zone
    /// is needed.
    pub used: bool,
    /// Some location uses `martd_listen`: workers need their wake-up socket.
    pub listens: bool,
    /// A `martd_clients` location exists: listeners are checked against `use_sessions`.
    pub clients: bool,
    pub shm_zone: *mut ngx_shm_zone_t,
    /// The store's root in the zone, set when the zone is initialised.
    pub root: *mut ZoneRoot,
    /// This cycle's number in the zone (see `zone::init_zone`).
    pub generation: u64,
    /// Indices of the variables martd's handlers set (see `stats::vars`); `-1`: none.
    pub vars: [ngx_int_t; 3],
    /// `martd_channel_events_channel` (empty: none).
    pub events_channel: ngx_str_t,
    /// `martd_persist`: the file (full path; empty: off), and how often it is synced
    /// (`0`: `sync=always`).
    pub persist_path: ngx_str_t,
    pub persist_sync_ms: ngx_msec_t,
    /// The cycle `martd_persist` was read in (its core conf names the workers' user).
    pub persist_cycle: *mut nginx_sys::ngx_cycle_t,
    /// The directory, opened by the master (inherited by the workers); `-1`: none.
    pub persist_dir_fd: libc::c_int,
    /// The workers' user, to own files the master makes (`uid_t::MAX`: not root).
    pub persist_user: libc::uid_t,
    /// `martd_redis_url` (empty: off; several urls: separated by spaces) and
    /// `martd_redis_namespace`.
    pub redis_url: ngx_str_t,
    pub redis_namespace: ngx_str_t,
    /// `martd_redis_cluster` (`NGX_CONF_UNSET` until read).
    pub redis_cluster: ngx_flag_t,
    /// `martd_redis_wait`: replicas each publish waits for (`0`: none) and how long.
    pub redis_wait_replicas: ngx_int_t,
    pub redis_wait_ms: ngx_msec_t,
    /// `martd_redis_trusted_certificate`: the file's certificates (PEM; empty: the system's).
    pub redis_ca: ngx_str_t,
}

/// What a location does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Role {
    None = 0,
    Push = 1,
    Listen = 2,
    /// `martd_client_js`: serves the browser library.
    ClientJs = 3,
    /// `martd_clients`: registers clients (sessions).
    Clients = 4,
    /// `martd_stats`: the stats and metrics.
    Stats = 5,
}

/// The bytes of a configuration string (empty when unset). They live as long as the cycle,
/// longer than any request of it.
pub fn conf_bytes(s: &ngx_str_t) -> &'static [u8] {
    if s.data.is_null() || s.len == 0 {
        return &[];
    }
    // SAFETY: as above: configuration strings are allocated in the cycle's pool.
    unsafe { std::slice::from_raw_parts(s.data, s.len) }
}

/// Location-level settings.
#[repr(C)]
pub struct LocConf {
    pub role: Role,
    /// `martd_push json` / `martd_listen json`: martd's JSON API.
    pub json: bool,
    /// `martd_client_js`: the script served, made when the directive is read.
    pub client_js: ngx_str_t,
    pub channel_id: *mut ngx_http_complex_value_t,
    /// `martd_allow_origin`: null = off.
    pub allow_origin: *mut ngx_http_complex_value_t,
    /// `martd_authorize_request`: empty or `off` = none.
    pub authorize_request: ngx_str_t,
    pub buffer_length: ngx_int_t,
    pub message_timeout: ngx_msec_t,
    pub store_messages: ngx_flag_t,
    pub listener_timeout: ngx_msec_t,
    /// `martd_client_timeout`.
    pub client_timeout: ngx_msec_t,
    pub concurrency: ngx_uint_t,
    pub max_channel_id_length: ngx_int_t,
    pub max_listeners: ngx_int_t,
    pub authorized_only: ngx_flag_t,
    /// `martd_require_token`.
    pub require_token: ngx_flag_t,
    /// `martd_max_listeners_per_token` (`0`: no cap).
    pub max_listeners_per_token: ngx_int_t,
    pub channel_timeout: ngx_msec_t,
    pub detach_listeners: ngx_flag_t,
    pub buffer_length_max: ngx_int_t,
    pub max_channels: ngx_int_t,
    /// `martd_listen` transports (`crate::transport::LONGPOLL`...).
    pub transports: u8,
    pub eventsource_ping: ngx_msec_t,
    pub websocket_ping: ngx_msec_t,
    pub websocket_publish: ngx_flag_t,
    pub max_pending_bytes: usize,
    pub stream_separator: ngx_str_t,
    /// `martd_channel_id_delimiter`: empty = none.
    pub channel_id_delimiter: ngx_str_t,
}

impl LocConf {
    pub fn concurrency(&self) -> Concurrency {
        match self.concurrency {
            1 => Concurrency::Last,
            2 => Concurrency::First,
            _ => Concurrency::Broadcast,
        }
    }
}

/// Allocates a zeroed `T` in the configuration pool and writes `value` into it.
fn conf_alloc<T>(cf: *mut ngx_conf_t, value: T) -> *mut c_void {
    // SAFETY: `cf->pool` lives as long as the configuration; the memory is sized and (pool
    // alignment is at least that of pointers) aligned for `T`, and written before use.
    unsafe {
        let p = ngx_pcalloc((*cf).pool, size_of::<T>()) as *mut T;
        if p.is_null() {
            return ptr::null_mut();
        }
        ptr::write(p, value);
        p as *mut c_void
    }
}

pub unsafe extern "C" fn create_main_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    conf_alloc(
        cf,
        MainConf {
            shm_size: UNSET_SIZE,
            used: false,
            listens: false,
            clients: false,
            vars: [-1; 3],
            shm_zone: ptr::null_mut(),
            root: ptr::null_mut(),
            generation: 0,
            events_channel: ngx_str_t { len: 0, data: ptr::null_mut() },
            persist_path: ngx_str_t { len: 0, data: ptr::null_mut() },
            persist_sync_ms: 1000,
            persist_cycle: ptr::null_mut(),
            persist_dir_fd: -1,
            persist_user: libc::uid_t::MAX,
            redis_url: ngx_str_t { len: 0, data: ptr::null_mut() },
            redis_namespace: ngx_str_t { len: 0, data: ptr::null_mut() },
            redis_cluster: UNSET,
            redis_wait_replicas: 0,
            redis_wait_ms: 1000,
            redis_ca: ngx_str_t { len: 0, data: ptr::null_mut() },
        },
    )
}

pub unsafe extern "C" fn init_main_conf(_cf: *mut ngx_conf_t, conf: *mut c_void) -> *mut c_char {
    // SAFETY: `conf` is this module's main conf.
    let mcf = unsafe { &mut *(conf as *mut MainConf) };
    if mcf.shm_size == UNSET_SIZE {
        mcf.shm_size = DEFAULT_SHM_SIZE;
    }
    if mcf.redis_cluster == UNSET {
        mcf.redis_cluster = 0;
    }
    NGX_CONF_OK
}

pub unsafe extern "C" fn create_loc_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    conf_alloc(
        cf,
        LocConf {
            role: Role::None,
            json: false,
            client_js: ngx_str_t { len: 0, data: ptr::null_mut() },
            channel_id: ptr::null_mut(),
            allow_origin: ptr::null_mut(),
            authorize_request: ngx_str_t { len: 0, data: ptr::null_mut() },
            buffer_length: UNSET,
            message_timeout: UNSET_MSEC,
            store_messages: UNSET,
            listener_timeout: UNSET_MSEC,
            client_timeout: UNSET_MSEC,
            concurrency: UNSET_UINT,
            max_channel_id_length: UNSET,
            max_listeners: UNSET,
            authorized_only: UNSET,
            require_token: UNSET,
            max_listeners_per_token: UNSET,
            channel_timeout: UNSET_MSEC,
            detach_listeners: UNSET,
            buffer_length_max: UNSET,
            max_channels: UNSET,
            transports: 0,
            eventsource_ping: UNSET_MSEC,
            websocket_ping: UNSET_MSEC,
            websocket_publish: UNSET,
            max_pending_bytes: UNSET_SIZE,
            stream_separator: ngx_str_t { len: 0, data: ptr::null_mut() },
            channel_id_delimiter: ngx_str_t { len: 0, data: ptr::null_mut() },
        },
    )
}

fn merge<T: PartialEq + Copy>(conf: &mut T, prev: T, unset: T, default: T) {
    if *conf == unset {
        *conf = if prev == unset { default } else { prev };
    }
}

pub unsafe extern "C" fn merge_loc_conf(
    _cf: *mut ngx_conf_t,
    parent: *mut c_void,
    child: *mut c_void,
) -> *mut c_char {
    // SAFETY: both are this module's location confs.
    let (prev, conf) = unsafe { (&*(parent as *const LocConf), &mut *(child as *mut LocConf)) };
    if conf.allow_origin.is_null() {
        conf.allow_origin = prev.allow_origin;
    }
    if conf.authorize_request.data.is_null() {
        conf.authorize_request = prev.authorize_request;
    }
    if conf.channel_id.is_null() {
        conf.channel_id = prev.channel_id;
    }
    merge(&mut conf.buffer_length, prev.buffer_length, UNSET, 10);
    merge(&mut conf.message_timeout, prev.message_timeout, UNSET_MSEC, 3_600_000);
    merge(&mut conf.store_messages, prev.store_messages, UNSET, 1);
    merge(&mut conf.listener_timeout, prev.listener_timeout, UNSET_MSEC, 60_000);
    merge(&mut conf.client_timeout, prev.client_timeout, UNSET_MSEC, 60_000);
    merge(&mut conf.concurrency, prev.concurrency, UNSET_UINT, 0);
    merge(&mut conf.max_channel_id_length, prev.max_channel_id_length, UNSET, 1024);
    merge(&mut conf.max_listeners, prev.max_listeners, UNSET, 0);
    merge(&mut conf.authorized_only, prev.authorized_only, UNSET, 0);
    merge(&mut conf.require_token, prev.require_token, UNSET, 0);
    merge(&mut conf.max_listeners_per_token, prev.max_listeners_per_token, UNSET, 0);
    merge(&mut conf.channel_timeout, prev.channel_timeout, UNSET_MSEC, 300_000);
    merge(&mut conf.detach_listeners, prev.detach_listeners, UNSET, 1);
    merge(&mut conf.buffer_length_max, prev.buffer_length_max, UNSET, 1000);
    merge(&mut conf.max_channels, prev.max_channels, UNSET, 64);
    merge(&mut conf.eventsource_ping, prev.eventsource_ping, UNSET_MSEC, 0);
    merge(&mut conf.websocket_ping, prev.websocket_ping, UNSET_MSEC, 0);
    merge(&mut conf.websocket_publish, prev.websocket_publish, UNSET, 0);
    merge(&mut conf.max_pending_bytes, prev.max_pending_bytes, UNSET_SIZE, 1024 * 1024);
    if conf.channel_id_delimiter.data.is_null() {
        conf.channel_id_delimiter = prev.channel_id_delimiter;
    }
    if conf.stream_separator.data.is_null() {
        conf.stream_separator = if prev.stream_separator.data.is_null() {
            ngx_str_t { len: 1, data: c"\n".as_ptr() as *mut u8 }
        } else {
            prev.stream_separator
        };
    }
    NGX_CONF_OK
}

/// Whether the running configuration has a zone that nginx would reuse for `zone` (same name,
/// tag and size) but that another build of martd laid out.
fn old_zone_of_other_layout(zone: *const ngx_shm_zone_t) -> bool {
    // SAFETY: during configuration `ngx_cycle` is the running cycle (or nginx's initial one,
    // whose list is empty); its shared memory list and zones are live.
    unsafe {
        let old = nginx_sys::ngx_cycle;
        if old.is_null() {
            return false;
        }
        let mut part = &(*old).shared_memory.part as *const nginx_sys::ngx_list_part_t;
        while !part.is_null() {
            let zones = (*part).elts as *const ngx_shm_zone_t;
            for i in 0..(*part).nelts {
                let o = zones.add(i);
                if (*o).shm.name.as_bytes() == (*zone).shm.name.as_bytes()
                    && (*o).tag == (*zone).tag
                    && (*o).shm.size == (*zone).shm.size
                {
                    return !crate::zone::reusable(o);
                }
            }
            part = (*part).next;
        }
        false
    }
}

/// Adds martd's variables.
pub unsafe extern "C" fn preconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
    // SAFETY: during preconfiguration `cf->ctx` is the http block's `ngx_http_conf_ctx_t`,
    // whose main confs were created already.
    let mcf = unsafe {
        let ctx = (*cf).ctx as *mut ngx_http_conf_ctx_t;
        &mut *(*(*ctx).main_conf.add(crate::module().ctx_index) as *mut MainConf)
    };
    if crate::stats::vars::add(cf, mcf) {
        nginx_sys::NGX_OK as ngx_int_t
    } else {
        nginx_sys::NGX_ERROR as ngx_int_t
    }
}

/// Requests the shared zone once the whole `http` block is read, if any location needs it.
pub unsafe extern "C" fn postconfiguration(cf: *mut ngx_conf_t) -> nginx_sys::ngx_int_t {
    // SAFETY: during postconfiguration `cf->ctx` is the http block's `ngx_http_conf_ctx_t`.
    let mcf = unsafe {
        let ctx = (*cf).ctx as *mut ngx_http_conf_ctx_t;
        &mut *(*(*ctx).main_conf.add(crate::module().ctx_index) as *mut MainConf)
    };
    if !mcf.used {
        return nginx_sys::NGX_OK as ngx_int_t;
    }
    let mut name = ngx_string!("martd");
    // SAFETY: `cf` is live; the tag is the module's static address, the same in every cycle,
    // so nginx reuses the zone across reloads when its size is unchanged.
    let zone = unsafe {
        ngx_shared_memory_add(
            cf,
            &mut name,
            mcf.shm_size,
            ptr::addr_of_mut!(crate::ngx_http_martd_module) as *mut c_void,
        )
    };
    let Some(zone) = NonNull::new(zone) else {
        return nginx_sys::NGX_ERROR as ngx_int_t;
    };
    let fresh = old_zone_of_other_layout(zone.as_ptr());
    if fresh {
        // SAFETY: `cf` and its log are live.
        let log = unsafe { (*cf).log };
        martd_log!(
            nginx_sys::NGX_LOG_NOTICE,
            log,
            "the \"martd\" zone was laid out by another build of martd: starting with an empty zone"
        );
    }
    // SAFETY: `zone` was just returned by nginx and lives as long as the cycle.
    unsafe {
        let z = zone.as_ptr();
        (*z).init = Some(crate::zone::init_zone);
        (*z).data = mcf as *mut MainConf as *mut c_void;
        (*z).noreuse = usize::from(fresh);
    }
    mcf.shm_zone = zone.as_ptr();
    // Replayed requests of detached listeners skip the access phases (see `detach`).
    // SAFETY: the core module's main conf of this http block; its phase arrays are
    // initialized before postconfiguration and read when the phase engine is built after it.
    unsafe {
        let ctx = (*cf).ctx as *mut ngx_http_conf_ctx_t;
        let cmcf =
            *(*ctx).main_conf.add(ngx_http_core_module.ctx_index) as *mut ngx_http_core_main_conf_t;
        let phase = &mut (*cmcf).phases[NGX_HTTP_PREACCESS_PHASE as usize].handlers;
        let h = ngx_array_push(phase) as *mut ngx_http_handler_pt;
        if h.is_null() {
            return nginx_sys::NGX_ERROR as ngx_int_t;
        }
        *h = Some(crate::listen::replay::preaccess_handler);
        let phase = &mut (*cmcf).phases[NGX_HTTP_ACCESS_PHASE as usize].handlers;
        let h = ngx_array_push(phase) as *mut ngx_http_handler_pt;
        if h.is_null() {
            return nginx_sys::NGX_ERROR as ngx_int_t;
        }
        *h = Some(crate::access::access_handler);
        crate::access::cors::install_header_filter();
    }
    nginx_sys::NGX_OK as ngx_int_t
}
