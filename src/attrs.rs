//! The channel attributes a push carries (martd's API): the query arguments `size`, `life`,
//! `one2one`, `use_sessions`, `key`, `expire`, `token` and `token_ttl`, or the same names as
//! `X-Martd-` headers (an argument wins over its header). Values are checked against the
//! location's bounds here; the key is hashed with the zone's salt under the zone lock.

use martd_core::api;
use martd_core::key::hash_key;
use martd_core::store::AttrUpdate;
use nginx_sys::{ngx_http_arg, ngx_http_request_t, ngx_str_t, NGX_OK};

use crate::conf::LocConf;

/// A push's attributes, checked; the key still in clear.
pub struct PushAttrs {
    pub update: AttrUpdate,
    pub key: Option<Vec<u8>>,
    /// `expire`: this message's own life (ms), not a channel attribute.
    pub expire_ms: Option<u64>,
    /// `token`: a channel token to register (in clear; hashed under the zone lock), and its
    /// `token_ttl` (ms; `0`: as long as the channel).
    pub token: Option<Vec<u8>>,
    pub token_ttl_ms: u64,
}

impl PushAttrs {
    /// Whether the push names any attribute.
    pub fn any(&self) -> bool {
        self.update.any() || self.key.is_some() || self.token.is_some()
    }

    /// The update with the key hashed with the zone's `salt`.
    pub fn hashed(&self, salt: u64) -> AttrUpdate {
        AttrUpdate { key: self.key.as_ref().map(|k| hash_key(salt, k)), ..self.update }
    }
}

/// The raw value of query argument `name`.
pub fn arg(r: *mut ngx_http_request_t, name: &str) -> Option<Vec<u8>> {
    let mut v = ngx_str_t { len: 0, data: std::ptr::null_mut() };
    // SAFETY: `r` is a live request; the value points into its arguments and is copied.
    let found =
        unsafe { ngx_http_arg(r, name.as_ptr() as *mut u8, name.len(), &mut v) } == NGX_OK as isize;
    found.then(|| if v.len == 0 { Vec::new() } else { v.as_bytes().to_vec() })
}

/// The value of request header `name`.
fn header(r: *mut ngx_http_request_t, name: &str) -> Option<Vec<u8>> {
    // SAFETY: `r` is a live request; its header list lives as long as it.
    let req = unsafe { ngx::http::Request::from_ngx_http_request(r) };
    req.headers_in_iterator()
        .find(|(k, _)| k.as_bytes().eq_ignore_ascii_case(name.as_bytes()))
        .map(|(_, v)| v.as_bytes().to_vec())
}

/// An attribute's value: the argument (percent-decoded when `decode`), else the header.
fn value(r: *mut ngx_http_request_t, name: &str, decode: bool) -> Option<Vec<u8>> {
    match arg(r, name) {
        Some(v) if decode => Some(api::percent_decode(&v)),
        Some(v) => Some(v),
        // nginx drops header names with `_` by default: `token_ttl` is `X-Martd-Token-Ttl`.
        None => header(r, &format!("X-Martd-{}", name.replace('_', "-"))),
    }
}

/// The key a request carries (for a delete), checked.
pub fn key(r: *mut ngx_http_request_t) -> Result<Option<Vec<u8>>, String> {
    let key = value(r, "key", true);
    if let Some(k) = &key {
        api::check_key(k)?;
    }
    Ok(key)
}

/// The channel token a request carries (`token`, else `X-Martd-Token`), checked.
pub fn token(r: *mut ngx_http_request_t) -> Result<Option<Vec<u8>>, String> {
    let token = value(r, "token", true);
    if let Some(t) = &token {
        api::check_token(t)?;
    }
    Ok(token)
}

/// The attributes of a push, checked against the location's bounds.
pub fn from_request(r: *mut ngx_http_request_t, lcf: &LocConf) -> Result<PushAttrs, String> {
    let mut update = AttrUpdate::default();
    if let Some(v) = value(r, "size", false) {
        update.size = Some(api::parse_size(&v, lcf.buffer_length_max.max(0) as usize)?);
    }
    if let Some(v) = value(r, "life", false) {
        update.life_ms = Some(api::parse_life(&v, lcf.message_timeout as u64)?);
    }
    if let Some(v) = value(r, "one2one", false) {
        update.one2one = Some(api::parse_bool("one2one", &v)?);
    }
    if let Some(v) = value(r, "use_sessions", false) {
        if !crate::listen::main_conf(r).clients {
            return Err("use_sessions needs a martd_clients location".into());
        }
        update.use_sessions = Some(api::parse_bool("use_sessions", &v)?);
    }
    let expire_ms = match value(r, "expire", false) {
        Some(v) => Some(api::parse_expire(&v, lcf.message_timeout as u64)?),
        None => None,
    };
    let token = token(r)?;
    let token_ttl_ms = match value(r, "token_ttl", false) {
        Some(_) if token.is_none() => return Err("token_ttl without a token".into()),
        Some(v) => api::parse_token_ttl(&v)?,
        None => 0,
    };
    Ok(PushAttrs { update, key: key(r)?, expire_ms, token, token_ttl_ms })
}
