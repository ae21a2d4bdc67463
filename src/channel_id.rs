//! The channel id of a request, checked.

use nginx_sys::{ngx_http_arg, ngx_http_complex_value, ngx_http_request_t, ngx_str_t, NGX_OK};

use crate::conf::LocConf;
use crate::error::ChannelIdError;

/// Evaluates `martd_channel_id` (default `$arg_channel`) and checks it; the error is the
/// one-line reason for a `400`.
pub fn channel_id(r: *mut ngx_http_request_t, lcf: &LocConf) -> Result<Vec<u8>, ChannelIdError> {
    let mut v = ngx_str_t { len: 0, data: std::ptr::null_mut() };
    // SAFETY: `r` is a live request; `channel_id` (if set) was compiled for this location;
    // the result points into the request pool and is copied before returning.
    let ok = unsafe {
        if lcf.channel_id.is_null() {
            let name = b"channel";
            ngx_http_arg(r, name.as_ptr() as *mut u8, name.len(), &mut v) == NGX_OK as isize
        } else {
            ngx_http_complex_value(r, lcf.channel_id, &mut v) == NGX_OK as isize
        }
    };
    let id = if ok && v.len > 0 && !v.data.is_null() { v.as_bytes().to_vec() } else { Vec::new() };
    if id.is_empty() {
        return Err(ChannelIdError::Missing);
    }
    if id.len() > lcf.max_channel_id_length.max(0) as usize {
        return Err(ChannelIdError::TooLong(lcf.max_channel_id_length.max(0) as usize));
    }
    if id.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return Err(ChannelIdError::Control);
    }
    Ok(id)
}
