//! martd's nginx variables.
//!
//! `$martd_channel_id`: the channel(s) of the martd location the main request is in, as
//! `martd_channel_id` names them (a `martd_channel_id_delimiter` list as given; the channels
//! of a `martd_listen json` request joined by commas). In a subrequest (the authorization
//! subrequest of `martd_authorize_request`, `mirror`, `auth_request`) it is the main
//! request's. Not found outside martd locations or when the id is missing or invalid.

use nginx_sys::{
    ngx_http_request_t, ngx_http_variable_value_t, ngx_int_t, ngx_pnalloc, NGX_ERROR, NGX_OK,
};

use crate::conf::Role;
use crate::listen::loc_conf;

/// The channels the main request's martd location names (checked), in request order.
pub fn request_channels(r: *mut ngx_http_request_t) -> Option<Vec<Vec<u8>>> {
    // SAFETY: variables and phase handlers run for live requests; the main request outlives
    // its subrequests.
    let m = unsafe { (*r).main };
    let lcf = loc_conf(m);
    match lcf.role {
        Role::Listen if lcf.json => {
            // SAFETY: `m` is live; its arguments live as long as it.
            let args = unsafe { (*m).args.as_bytes() };
            let q = martd_core::api::parse_listen_query(
                args,
                lcf.max_channels.max(0) as usize,
                lcf.max_channel_id_length.max(0) as usize,
            )
            .ok()?;
            Some(q.channels.iter().map(|c| c.0.to_vec()).collect())
        }
        Role::Listen | Role::Push => crate::channel_id::channel_ids(m, lcf).ok(),
        Role::None | Role::ClientJs | Role::Clients | Role::Stats => None,
    }
}

/// The channels of the main request's martd location, as one value: a list joined by
/// `martd_channel_id_delimiter`, a JSON request's channels by commas.
fn channels_of(r: *mut ngx_http_request_t) -> Option<Vec<u8>> {
    let ids = request_channels(r)?;
    // SAFETY: as above.
    let lcf = loc_conf(unsafe { (*r).main });
    let sep: &[u8] =
        if lcf.json { b"," } else { crate::conf::conf_bytes(&lcf.channel_id_delimiter) };
    Some(ids.join(sep))
}

/// `$martd_channel_id` (registered with the others by `stats::vars`).
pub unsafe extern "C" fn channel_id_variable(
    r: *mut ngx_http_request_t,
    v: *mut ngx_http_variable_value_t,
    _data: usize,
) -> ngx_int_t {
    let value = channels_of(r);
    // SAFETY: `v` is the variable value nginx asks us to fill; the copy lives in the request
    // pool, as long as the request that reads it.
    unsafe {
        match value {
            Some(bytes) if !bytes.is_empty() => {
                let p = ngx_pnalloc((*r).pool, bytes.len()) as *mut u8;
                if p.is_null() {
                    return NGX_ERROR as ngx_int_t;
                }
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len());
                (*v).set_len(bytes.len() as u32);
                (*v).set_valid(1);
                (*v).set_no_cacheable(1);
                (*v).set_not_found(0);
                (*v).data = p;
            }
            _ => (*v).set_not_found(1),
        }
    }
    NGX_OK as ngx_int_t
}
