//! The channel id of a request, checked.

use nginx_sys::{ngx_http_arg, ngx_http_complex_value, ngx_http_request_t, ngx_str_t, NGX_OK};

use crate::conf::LocConf;
use crate::error::ChannelIdError;

/// Evaluates `martd_channel_id` (default `$arg_channel`) and checks it; the error is the
/// one-line reason for a `400`.
pub fn channel_id(r: *mut ngx_http_request_t, lcf: &LocConf) -> Result<Vec<u8>, ChannelIdError> {
    let id = raw(r, lcf).map_or(Vec::new(), |v| v.as_bytes().to_vec());
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

/// `martd_channel_id` as the request names it, unchecked (in the request pool); `None` when
/// empty or absent.
fn raw(r: *mut ngx_http_request_t, lcf: &LocConf) -> Option<ngx_str_t> {
    let mut v = ngx_str_t { len: 0, data: std::ptr::null_mut() };
    // SAFETY: `r` is a live request; `channel_id` (if set) was compiled for this location;
    // the result points into the request's arguments or pool.
    let ok = unsafe {
        if lcf.channel_id.is_null() {
            let name = b"channel";
            ngx_http_arg(r, name.as_ptr() as *mut u8, name.len(), &mut v) == NGX_OK as isize
        } else {
            ngx_http_complex_value(r, lcf.channel_id, &mut v) == NGX_OK as isize
        }
    };
    (ok && v.len > 0 && !v.data.is_null()).then_some(v)
}

/// The channels of a request: `martd_channel_id`, split at `martd_channel_id_delimiter` when
/// one is set (each part checked as a channel id; at most `martd_max_channels_per_request`,
/// none empty, none twice). The error is the one-line reason for a `400`.
pub fn channel_ids(r: *mut ngx_http_request_t, lcf: &LocConf) -> Result<Vec<Vec<u8>>, String> {
    let delim = crate::conf::conf_bytes(&lcf.channel_id_delimiter);
    if delim.is_empty() {
        return channel_id(r, lcf).map(|id| vec![id]).map_err(|e| e.to_string());
    }
    let whole = {
        // The whole list may be longer than one id; each part is checked below.
        let l = LocConf { max_channel_id_length: isize::MAX, ..*lcf };
        channel_id(r, &l).map_err(|e| e.to_string())?
    };
    let max = lcf.max_channel_id_length.max(0) as usize;
    let mut ids: Vec<Vec<u8>> = Vec::new();
    let mut rest = &whole[..];
    loop {
        let (part, next) = match rest.windows(delim.len()).position(|w| w == delim) {
            Some(i) => (&rest[..i], Some(&rest[i + delim.len()..])),
            None => (rest, None),
        };
        if part.is_empty() {
            return Err("empty channel id in the list".into());
        }
        if part.len() > max {
            return Err(ChannelIdError::TooLong(max).to_string());
        }
        if ids.iter().any(|i| i == part) {
            return Err("a channel twice in the list".into());
        }
        ids.push(part.to_vec());
        if ids.len() > lcf.max_channels.max(0) as usize {
            return Err(format!(
                "more than {} channels (martd_max_channels_per_request)",
                lcf.max_channels.max(0)
            ));
        }
        match next {
            Some(n) => rest = n,
            None => return Ok(ids),
        }
    }
}
