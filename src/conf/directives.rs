//! The directive table and the handlers of directives that nginx's slot setters do not cover.

use std::ffi::{c_char, c_void};
use std::mem::offset_of;
use std::ptr;

use nginx_sys::{
    ngx_command_t, ngx_conf_enum_t, ngx_conf_log_error, ngx_conf_set_enum_slot,
    ngx_conf_set_flag_slot, ngx_conf_set_msec_slot, ngx_conf_set_num_slot, ngx_conf_set_size_slot,
    ngx_conf_set_str_slot, ngx_conf_t, ngx_http_conf_ctx_t, ngx_http_core_loc_conf_t,
    ngx_http_core_module, ngx_http_set_complex_value_slot, ngx_int_t, ngx_msec_t, ngx_parse_size,
    ngx_str_t, ngx_uint_t, NGX_CONF_1MORE, NGX_CONF_ANY, NGX_CONF_FLAG, NGX_CONF_NOARGS,
    NGX_CONF_TAKE1, NGX_CONF_TAKE2, NGX_HTTP_LOC_CONF, NGX_HTTP_MAIN_CONF, NGX_HTTP_SRV_CONF,
    NGX_LOG_EMERG,
};
use ngx::core::{NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::ngx_string;

use super::{LocConf, MainConf, Role, MIN_SHM_SIZE, UNSET_SIZE};
use crate::error::ConfError;
use crate::transport;

const fn command(
    name: ngx_str_t,
    type_: u32,
    set: unsafe extern "C" fn(*mut ngx_conf_t, *mut ngx_command_t, *mut c_void) -> *mut c_char,
    conf: usize,
    offset: usize,
    post: *mut c_void,
) -> ngx_command_t {
    ngx_command_t { name, type_: type_ as ngx_uint_t, set: Some(set), conf, offset, post }
}

const ANY: u32 = NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF;
const LOC: usize = offset_of!(ngx_http_conf_ctx_t, loc_conf);
const MAIN: usize = offset_of!(ngx_http_conf_ctx_t, main_conf);

static mut CONCURRENCY_VALUES: [ngx_conf_enum_t; 4] = [
    ngx_conf_enum_t { name: ngx_string!("broadcast"), value: 0 },
    ngx_conf_enum_t { name: ngx_string!("last"), value: 1 },
    ngx_conf_enum_t { name: ngx_string!("first"), value: 2 },
    ngx_conf_enum_t { name: ngx_str_t { len: 0, data: ptr::null_mut() }, value: 0 },
];

/// The directive table.
pub static mut NGX_HTTP_MARTD_COMMANDS: [ngx_command_t; 38] = [
    command(
        ngx_string!("martd_shm_size"),
        NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1,
        cmd_shm_size,
        MAIN,
        0,
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_push"),
        NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS | NGX_CONF_TAKE1,
        cmd_push,
        LOC,
        0,
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_listen"),
        NGX_HTTP_LOC_CONF | NGX_CONF_ANY,
        cmd_listen,
        LOC,
        0,
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_channel_id"),
        ANY | NGX_CONF_TAKE1,
        ngx_http_set_complex_value_slot,
        LOC,
        offset_of!(LocConf, channel_id),
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_allow_origin"),
        ANY | NGX_CONF_TAKE1,
        ngx_http_set_complex_value_slot,
        LOC,
        offset_of!(LocConf, allow_origin),
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_authorize_request"),
        ANY | NGX_CONF_TAKE1,
        ngx_conf_set_str_slot,
        LOC,
        offset_of!(LocConf, authorize_request),
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_message_buffer_length"),
        ANY | NGX_CONF_TAKE1,
        ngx_conf_set_num_slot,
        LOC,
        offset_of!(LocConf, buffer_length),
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_message_timeout"),
        ANY | NGX_CONF_TAKE1,
        ngx_conf_set_msec_slot,
        LOC,
        offset_of!(LocConf, message_timeout),
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_store_messages"),
        ANY | NGX_CONF_FLAG,
        ngx_conf_set_flag_slot,
        LOC,
        offset_of!(LocConf, store_messages),
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_listener_timeout"),
        ANY | NGX_CONF_TAKE1,
        ngx_conf_set_msec_slot,
        LOC,
        offset_of!(LocConf, listener_timeout),
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_listener_concurrency"),
        ANY | NGX_CONF_TAKE1,
        ngx_conf_set_enum_slot,
        LOC,
        offset_of!(LocConf, concurrency),
        // Only the address is taken; nginx reads the table at config time.
        ptr::addr_of_mut!(CONCURRENCY_VALUES) as *mut c_void,
    ),
    command(
        ngx_string!("martd_max_channel_id_length"),
        ANY | NGX_CONF_TAKE1,
        ngx_conf_set_num_slot,
        LOC,
        offset_of!(LocConf, max_channel_id_length),
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_max_listeners"),
        ANY | NGX_CONF_TAKE1,
        ngx_conf_set_num_slot,
        LOC,
        offset_of!(LocConf, max_listeners),
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_persist"),
        NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1 | NGX_CONF_TAKE2,
        cmd_persist,
        MAIN,
        0,
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_redis_url"),
        NGX_HTTP_MAIN_CONF | NGX_CONF_1MORE,
        cmd_redis_url,
        MAIN,
        0,
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_redis_namespace"),
        NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1,
        ngx_conf_set_str_slot,
        MAIN,
        offset_of!(MainConf, redis_namespace),
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_redis_cluster"),
        NGX_HTTP_MAIN_CONF | NGX_CONF_FLAG,
        ngx_conf_set_flag_slot,
        MAIN,
        offset_of!(MainConf, redis_cluster),
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_redis_trusted_certificate"),
        NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1,
        cmd_redis_trusted_certificate,
        MAIN,
        0,
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_redis_wait"),
        NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1 | NGX_CONF_TAKE2,
        cmd_redis_wait,
        MAIN,
        0,
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_channel_events_channel"),
        NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1,
        ngx_conf_set_str_slot,
        MAIN,
        offset_of!(MainConf, events_channel),
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_require_token"),
        ANY | NGX_CONF_FLAG,
        ngx_conf_set_flag_slot,
        LOC,
        offset_of!(LocConf, require_token),
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_max_listeners_per_token"),
        ANY | NGX_CONF_TAKE1,
        ngx_conf_set_num_slot,
        LOC,
        offset_of!(LocConf, max_listeners_per_token),
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_authorized_channels_only"),
        ANY | NGX_CONF_FLAG,
        ngx_conf_set_flag_slot,
        LOC,
        offset_of!(LocConf, authorized_only),
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_channel_timeout"),
        ANY | NGX_CONF_TAKE1,
        ngx_conf_set_msec_slot,
        LOC,
        offset_of!(LocConf, channel_timeout),
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_detach_listeners"),
        ANY | NGX_CONF_FLAG,
        ngx_conf_set_flag_slot,
        LOC,
        offset_of!(LocConf, detach_listeners),
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_message_buffer_length_max"),
        ANY | NGX_CONF_TAKE1,
        ngx_conf_set_num_slot,
        LOC,
        offset_of!(LocConf, buffer_length_max),
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_max_channels_per_request"),
        ANY | NGX_CONF_TAKE1,
        ngx_conf_set_num_slot,
        LOC,
        offset_of!(LocConf, max_channels),
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_eventsource_ping"),
        ANY | NGX_CONF_TAKE1,
        ngx_conf_set_msec_slot,
        LOC,
        offset_of!(LocConf, eventsource_ping),
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_websocket_ping"),
        ANY | NGX_CONF_TAKE1,
        ngx_conf_set_msec_slot,
        LOC,
        offset_of!(LocConf, websocket_ping),
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_websocket_publish"),
        ANY | NGX_CONF_FLAG,
        ngx_conf_set_flag_slot,
        LOC,
        offset_of!(LocConf, websocket_publish),
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_max_pending_bytes"),
        ANY | NGX_CONF_TAKE1,
        ngx_conf_set_size_slot,
        LOC,
        offset_of!(LocConf, max_pending_bytes),
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_channel_id_delimiter"),
        ANY | NGX_CONF_TAKE1,
        ngx_conf_set_str_slot,
        LOC,
        offset_of!(LocConf, channel_id_delimiter),
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_stream_separator"),
        ANY | NGX_CONF_TAKE1,
        ngx_conf_set_str_slot,
        LOC,
        offset_of!(LocConf, stream_separator),
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_clients"),
        NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS,
        cmd_clients,
        LOC,
        0,
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_client_timeout"),
        ANY | NGX_CONF_TAKE1,
        ngx_conf_set_msec_slot,
        LOC,
        offset_of!(LocConf, client_timeout),
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_client_js"),
        NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS | NGX_CONF_TAKE1 | NGX_CONF_TAKE2,
        cmd_client_js,
        LOC,
        0,
        ptr::null_mut(),
    ),
    command(
        ngx_string!("martd_stats"),
        NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS,
        cmd_stats,
        LOC,
        0,
        ptr::null_mut(),
    ),
    ngx_command_t::empty(),
];

/// Logs a configuration error at `[emerg]` with the file and line nginx is reading.
fn conf_error(cf: *mut ngx_conf_t, msg: &str) -> *mut c_char {
    let msg = format!("martd: {msg}");
    // SAFETY: `cf` is the live configuration nginx passed to the directive handler; the
    // message is passed with an explicit length.
    unsafe {
        ngx_conf_log_error(NGX_LOG_EMERG as _, cf, 0, c"%*s".as_ptr(), msg.len(), msg.as_ptr());
    }
    NGX_CONF_ERROR
}

/// A copy of `bytes` in the configuration pool (it lives as long as the configuration).
fn pool_copy(cf: *mut ngx_conf_t, bytes: &[u8]) -> Option<ngx_str_t> {
    // SAFETY: during a directive handler `cf->pool` is the configuration's live pool; the
    // copy is `bytes.len()` bytes into a fresh allocation of that size.
    unsafe {
        let data = nginx_sys::ngx_pnalloc((*cf).pool, bytes.len()) as *mut u8;
        if data.is_null() {
            return None;
        }
        ptr::copy_nonoverlapping(bytes.as_ptr(), data, bytes.len());
        Some(ngx_str_t { len: bytes.len(), data })
    }
}

/// The arguments of the directive being read, as bytes.
fn args(cf: *mut ngx_conf_t) -> Vec<Vec<u8>> {
    // SAFETY: during a directive handler `cf->args` is an array of `ngx_str_t` whose data
    // nginx keeps for the whole configuration read.
    unsafe {
        let a = &*(*cf).args;
        a.as_slice::<ngx_str_t>().iter().map(|s| s.as_bytes().to_vec()).collect()
    }
}

unsafe extern "C" fn cmd_shm_size(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: `conf` is this module's main conf, created by `create_main_conf`.
    let mcf = unsafe { &mut *(conf as *mut MainConf) };
    if mcf.shm_size != UNSET_SIZE {
        return c"is duplicate".as_ptr() as *mut c_char;
    }
    let a = args(cf);
    let value = String::from_utf8_lossy(&a[1]).into_owned();
    let mut s = ngx_str_t { len: a[1].len(), data: a[1].as_ptr() as *mut u8 };
    // SAFETY: `s` points at `a[1]`, alive for the call; ngx_parse_size only reads it.
    let size = unsafe { ngx_parse_size(&mut s) };
    if size < 0 {
        return conf_error(cf, &ConfError::InvalidSize(value).to_string());
    }
    let size = size as usize;
    if size < MIN_SHM_SIZE {
        return conf_error(cf, &ConfError::ZoneTooSmall(value, MIN_SHM_SIZE / 1024).to_string());
    }
    mcf.shm_size = size;
    // An explicit zone size makes martd active in this http block (zone, worker registration,
    // the preaccess handler) even before a location uses it.
    mcf.used = true;
    NGX_CONF_OK
}

/// `martd_redis_url redis://[user:password@]host:port[/db] [url...];` (several: seeds of a
/// cluster).
unsafe extern "C" fn cmd_redis_url(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: `conf` is this module's main conf, created by `create_main_conf`.
    let mcf = unsafe { &mut *(conf as *mut MainConf) };
    if mcf.redis_url.len != 0 {
        return c"is duplicate".as_ptr() as *mut c_char;
    }
    let a = args(cf);
    for url in &a[1..] {
        let text = String::from_utf8_lossy(url).into_owned();
        if let Err(why) = crate::backend::redis::check_url(&text) {
            return conf_error(cf, &format!("invalid redis url \"{text}\": {why}"));
        }
    }
    let Some(urls) = pool_copy(cf, &a[1..].join(&b' ')) else { return NGX_CONF_ERROR };
    mcf.redis_url = urls;
    mcf.used = true;
    NGX_CONF_OK
}

/// `martd_redis_trusted_certificate file;`: the certificates (PEM) that verify `rediss://`
/// servers, read now (a relative name is under nginx's configuration prefix).
unsafe extern "C" fn cmd_redis_trusted_certificate(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: `conf` is this module's main conf, created by `create_main_conf`.
    let mcf = unsafe { &mut *(conf as *mut MainConf) };
    if mcf.redis_ca.len != 0 {
        return c"is duplicate".as_ptr() as *mut c_char;
    }
    // SAFETY: `cf->args` holds the directive and its one argument, kept for the read.
    let mut name =
        unsafe { *(*(*cf).args).as_slice::<ngx_str_t>().get(1).unwrap_or(&ngx_str_t::default()) };
    // SAFETY: the cycle being configured; the full name is allocated in its pool.
    if unsafe { nginx_sys::ngx_conf_full_name((*cf).cycle, &mut name, 1) } != 0 {
        return NGX_CONF_ERROR;
    }
    let path = String::from_utf8_lossy(name.as_bytes()).into_owned();
    let pem = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) => return conf_error(cf, &format!("cannot read \"{path}\": {e}")),
    };
    if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
        return conf_error(cf, &format!("no PEM certificate in \"{path}\""));
    }
    let Some(pem) = pool_copy(cf, &pem) else { return NGX_CONF_ERROR };
    mcf.redis_ca = pem;
    NGX_CONF_OK
}

/// `martd_redis_wait replicas [timeout];`: each publish is answered once that many replicas
/// have it (Redis `WAIT`), or `503` after `timeout` (default 1s).
unsafe extern "C" fn cmd_redis_wait(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: `conf` is this module's main conf, created by `create_main_conf`.
    let mcf = unsafe { &mut *(conf as *mut MainConf) };
    let a = args(cf);
    let shown = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
    let n = std::str::from_utf8(&a[1]).ok().and_then(|s| s.parse::<u16>().ok());
    let Some(n) = n else {
        return conf_error(cf, &format!("invalid number of replicas \"{}\"", shown(&a[1])));
    };
    mcf.redis_wait_replicas = n as ngx_int_t;
    if let Some(v) = a.get(2) {
        let mut s = ngx_str_t { len: v.len(), data: v.as_ptr() as *mut u8 };
        // SAFETY: `s` points at the argument, alive for the call; only read.
        let ms = unsafe { nginx_sys::ngx_parse_time(&mut s, 0) };
        if ms <= 0 {
            return conf_error(cf, &format!("invalid timeout \"{}\"", shown(v)));
        }
        mcf.redis_wait_ms = ms as ngx_msec_t;
    }
    NGX_CONF_OK
}

/// `martd_persist path [sync=always|sync=TIME];`
unsafe extern "C" fn cmd_persist(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: `conf` is this module's main conf, created by `create_main_conf`.
    let mcf = unsafe { &mut *(conf as *mut MainConf) };
    if mcf.persist_path.len != 0 {
        return c"is duplicate".as_ptr() as *mut c_char;
    }
    let a = args(cf);
    if let Some(opt) = a.get(2) {
        let Some(v) = opt.strip_prefix(b"sync=") else {
            let shown = String::from_utf8_lossy(opt).into_owned();
            return conf_error(cf, &format!("invalid parameter \"{shown}\""));
        };
        if v == b"always" {
            mcf.persist_sync_ms = 0;
        } else {
            let mut s = ngx_str_t { len: v.len(), data: v.as_ptr() as *mut u8 };
            // SAFETY: `s` points at the argument, alive for the call; only read.
            let ms = unsafe { nginx_sys::ngx_parse_time(&mut s, 0) };
            if ms <= 0 {
                let shown = String::from_utf8_lossy(v).into_owned();
                return conf_error(cf, &format!("invalid sync time \"{shown}\": always or a time"));
            }
            mcf.persist_sync_ms = ms as nginx_sys::ngx_msec_t;
        }
    }
    let Some(path) = a.get(1) else {
        return c"needs a path".as_ptr() as *mut c_char;
    };
    let Some(mut name) = pool_copy(cf, path) else { return NGX_CONF_ERROR };
    // SAFETY: the copy is in the configuration pool (an absolute path is kept as given, a
    // relative one is joined to the prefix).
    let name = unsafe {
        if nginx_sys::ngx_conf_full_name((*cf).cycle, &mut name, 0) != 0 {
            return c"could not make a full path".as_ptr() as *mut c_char;
        }
        name
    };
    mcf.persist_path = name;
    // SAFETY: `cf` is live during the directive handler.
    mcf.persist_cycle = unsafe { (*cf).cycle };
    mcf.used = true;
    NGX_CONF_OK
}

fn set_role(cf: *mut ngx_conf_t, conf: *mut c_void, role: Role) -> *mut c_char {
    // SAFETY: `conf` is this module's location conf, created by `create_loc_conf`.
    let lcf = unsafe { &mut *(conf as *mut LocConf) };
    if lcf.role != Role::None {
        return conf_error(cf, &ConfError::RoleTwice.to_string());
    }
    lcf.role = role;
    let a = args(cf);
    let name = String::from_utf8_lossy(&a[0]).into_owned();
    let bad = |v: &[u8], accepted| {
        let v = String::from_utf8_lossy(v).into_owned();
        conf_error(cf, &ConfError::BadArgument(name.clone(), v, accepted).to_string())
    };
    match role {
        Role::ClientJs | Role::Clients | Role::Stats => {}
        Role::Push => match a.get(1).map(|v| v.as_slice()) {
            None => {}
            Some(b"json") if a.len() == 2 => lcf.json = true,
            Some(other) => return bad(other, "only \"json\" is accepted"),
        },
        _ => {
            let mut transports = 0u8;
            for v in a.iter().skip(1) {
                let t = match v.as_slice() {
                    b"json" if !lcf.json => {
                        lcf.json = true;
                        continue;
                    }
                    b"longpoll" => transport::LONGPOLL,
                    b"interval" => transport::INTERVAL,
                    b"eventsource" => transport::EVENTSOURCE,
                    b"stream" => transport::STREAM,
                    b"websocket" => transport::WEBSOCKET,
                    other => return bad(other, transport::ACCEPTED),
                };
                if transports & t != 0 {
                    let v = String::from_utf8_lossy(v).into_owned();
                    return conf_error(cf, &ConfError::TransportTwice(v).to_string());
                }
                transports |= t;
            }
            if transports == 0 {
                transports = transport::LONGPOLL;
            }
            lcf.transports = transports;
        }
    }
    // SAFETY: during a location directive, `cf->ctx` is the location's `ngx_http_conf_ctx_t`
    // and the core module's location conf is at its `ctx_index`.
    unsafe {
        let ctx = (*cf).ctx as *mut ngx_http_conf_ctx_t;
        let clcf =
            *(*ctx).loc_conf.add(ngx_http_core_module.ctx_index) as *mut ngx_http_core_loc_conf_t;
        (*clcf).handler = Some(match role {
            Role::Push => crate::push::push_handler,
            Role::ClientJs => crate::client_js::client_js_handler,
            Role::Clients => crate::clients::clients_handler,
            Role::Stats => crate::stats::stats_handler,
            _ => crate::listen::listen_handler,
        });
        if role == Role::ClientJs {
            return NGX_CONF_OK;
        }
        let mcf = *(*ctx).main_conf.add(crate::module().ctx_index) as *mut MainConf;
        (*mcf).used = true;
        (*mcf).listens |= role == Role::Listen;
        (*mcf).clients |= role == Role::Clients;
    }
    NGX_CONF_OK
}

unsafe extern "C" fn cmd_push(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    set_role(cf, conf, Role::Push)
}

unsafe extern "C" fn cmd_clients(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    set_role(cf, conf, Role::Clients)
}

unsafe extern "C" fn cmd_listen(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    set_role(cf, conf, Role::Listen)
}

unsafe extern "C" fn cmd_stats(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    set_role(cf, conf, Role::Stats)
}

unsafe extern "C" fn cmd_client_js(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    let a = args(cf);
    let script = match crate::client_js::script(&a[1..]) {
        Ok(s) => s,
        Err(e) => return conf_error(cf, &e),
    };
    // SAFETY: `conf` is this module's location conf; `cf->pool` lives as long as it.
    unsafe {
        let lcf = &mut *(conf as *mut LocConf);
        if lcf.role != Role::None {
            return conf_error(cf, &ConfError::RoleTwice.to_string());
        }
        let Some(js) = pool_copy(cf, &script) else { return NGX_CONF_ERROR };
        lcf.client_js = js;
    }
    set_role(cf, conf, Role::ClientJs)
}
