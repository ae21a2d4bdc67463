//! `martd_stats`: the zone's stats (JSON, text or Prometheus), one channel (`?channel=`), or
//! a page of channels by name prefix (`?channels=prefix*`). The figures are kept by the store
//! and the workers' counters (see [`martd_core::stats`]); this handler only reads them.

pub mod count;
pub mod vars;

use nginx_sys::{ngx_http_request_t, ngx_int_t, ngx_slab_pool_t, NGX_ERROR};

use martd_core::api::percent_decode;
use martd_core::stats::{self, Cursor, Format, Snapshot, PAGE_MAX};

use crate::attrs::arg;
use crate::conf::MainConf;
use crate::listen::main_conf;
use crate::response::{self, Body};
use crate::transport::request_header;
use crate::worker::now_ms;
use crate::zone;

/// Buckets and channels one hold of the zone lock looks at in a `?channels=` listing.
const LIST_BUDGET: usize = 256;
/// Holds of the zone lock one `?channels=` request takes at most (the lock is released
/// between them).
const LIST_HOLDS: usize = 16;

/// Whether process `pid` still runs.
pub fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks whether the process exists.
    unsafe { libc::kill(pid, 0) == 0 || *libc::__errno_location() == libc::EPERM }
}

/// The content handler of `martd_stats` locations.
pub unsafe extern "C" fn stats_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    if let Err(rc) = response::get_or_head(r, "stats are read with GET or HEAD") {
        return rc;
    }
    let format = arg(r, "format");
    let format = match Format::select(format.as_deref(), request_header(r, "Accept")) {
        Ok(f) => f,
        Err(reason) => return response::error(r, 400, reason),
    };
    let channel = arg(r, "channel").map(|c| percent_decode(&c));
    let channels = arg(r, "channels").map(|c| percent_decode(&c));
    if (channel.is_some() || channels.is_some()) && format != Format::Json {
        return response::error(r, 400, "channel= and channels= answer JSON only");
    }
    let mcf = main_conf(r);
    match (channel, channels) {
        (Some(_), Some(_)) => response::error(r, 400, "channel= and channels= do not go together"),
        (Some(name), None) => one_channel(r, mcf, &name),
        (None, Some(prefix)) => list(r, mcf, &prefix),
        (None, None) => {
            if arg(r, "cursor").is_some() {
                return response::error(r, 400, "cursor= goes with channels=");
            }
            zone_stats(r, mcf, format)
        }
    }
}

fn zone_stats(r: *mut ngx_http_request_t, mcf: &MainConf, format: Format) -> ngx_int_t {
    let Some(mut snap) = snapshot(mcf) else {
        return response::error(r, 503, "martd has no zone here");
    };
    snap.nginx_version = nginx_sys::NGINX_VERSION.to_string_lossy().into_owned();
    snap.martd_version = env!("CARGO_PKG_VERSION").to_string();
    let body = format.render(&snap);
    response::no_store(r);
    response::send(r, 200, format.content_type().as_bytes(), Body::Bytes(body.as_bytes()), None)
}

/// The store's figures, the uptime and the zone's bytes, in one hold of the zone lock.
fn snapshot(mcf: &MainConf) -> Option<Snapshot> {
    let now = now_ms();
    let mut z = zone::lock(mcf)?;
    let created = z.root().created_ms;
    let mut snap = z.store().stats_snapshot(now, &alive);
    // SAFETY: the zone is mapped (it is locked); `shm.addr` is its slab pool, whose `pfree`
    // is read under its own mutex, which the lock holds.
    let (size, free_pages) = unsafe {
        let zone = &*mcf.shm_zone;
        (zone.shm.size as u64, (*(zone.shm.addr as *const ngx_slab_pool_t)).pfree as u64)
    };
    drop(z);
    // SAFETY: nginx's page size, set once at startup.
    let page = unsafe { nginx_sys::ngx_pagesize } as u64;
    snap.uptime_s = now.saturating_sub(created) / 1000;
    snap.zone_size = size;
    snap.zone_free = (free_pages * page).min(size);
    snap.zone_used = size - snap.zone_free;
    Some(snap)
}

fn one_channel(r: *mut ngx_http_request_t, mcf: &MainConf, name: &[u8]) -> ngx_int_t {
    if name.is_empty() {
        return response::error(r, 400, "channel= names a channel");
    }
    let now = now_ms();
    let Some(found) = zone::lock(mcf).map(|mut z| z.store().channel_stats(name, now)) else {
        return response::error(r, 503, "martd has no zone here");
    };
    match found {
        Ok(Some(c)) => response::json(r, 200, &stats::channel_json(&c), None),
        Ok(None) => response::error_in(r, 404, "no such channel", Some(name)),
        Err(_) => NGX_ERROR as ngx_int_t,
    }
}

fn list(r: *mut ngx_http_request_t, mcf: &MainConf, arg_value: &[u8]) -> ngx_int_t {
    let prefix = match stats::parse_prefix(arg_value) {
        Ok(p) => p,
        Err(reason) => return response::error(r, 400, reason),
    };
    let mut cursor = match arg(r, "cursor") {
        None => Cursor::default(),
        Some(c) => match Cursor::parse(&c) {
            Some(c) => c,
            None => return response::error(r, 400, "cursor= takes the \"next\" of the last page"),
        },
    };
    let now = now_ms();
    let mut page = Vec::new();
    let mut next = Some(cursor);
    // A few bounded holds of the lock, released in between, until the page is full or the
    // table is done.
    for _ in 0..LIST_HOLDS {
        let room = PAGE_MAX - page.len();
        let Some(mut z) = zone::lock(mcf) else {
            return response::error(r, 503, "martd has no zone here");
        };
        match z.store().list_channels(prefix, cursor, room, LIST_BUDGET, now, &mut page) {
            Ok(n) => next = n,
            Err(_) => return NGX_ERROR as ngx_int_t,
        }
        drop(z);
        match next {
            Some(c) if page.len() < PAGE_MAX => cursor = c,
            _ => break,
        }
    }
    let next = next.map(|c| c.render());
    response::json(r, 200, &stats::channels_json(&page, next.as_deref()), None)
}
