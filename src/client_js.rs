//! `martd_client_js`: serves martd's browser library (`js/martd.js`, embedded in the module).
//!
//! The script is made once, when the directive is read: the library, then one line per
//! parameter (`sub=URI` → `martd.SUB = "URI";`, `pub=URI` → `martd.PUB = "URI";`).

use nginx_sys::{ngx_http_request_t, ngx_int_t};

use crate::listen::loc_conf;
use crate::response::{self, Body};

/// The browser library.
pub const LIBRARY: &str = include_str!("../js/martd.js");

/// The script `martd_client_js` serves with these parameters, or the reason they are wrong.
pub fn script(params: &[Vec<u8>]) -> Result<Vec<u8>, String> {
    let mut out = LIBRARY.as_bytes().to_vec();
    for p in params {
        let text = String::from_utf8_lossy(p);
        let (var, uri) = match text.split_once('=') {
            Some(("sub", uri)) => ("SUB", uri),
            Some(("pub", uri)) => ("PUB", uri),
            _ => {
                return Err(format!(
                    "invalid parameter \"{text}\" of \"martd_client_js\": sub=URI or pub=URI"
                ))
            }
        };
        let plain = |c: char| !c.is_control() && !matches!(c, '"' | '\\' | '<' | '>');
        if uri.is_empty() || !uri.chars().all(plain) {
            return Err(format!("invalid URI \"{uri}\" in \"martd_client_js\""));
        }
        if !out.ends_with(b"\n") {
            out.push(b'\n');
        }
        out.extend_from_slice(format!("martd.{var} = \"{uri}\";\n").as_bytes());
    }
    Ok(out)
}

/// The content handler of `martd_client_js` locations.
pub unsafe extern "C" fn client_js_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    if let Err(rc) = response::get_or_head(r, "the browser library is read with GET or HEAD") {
        return rc;
    }
    // The script was copied into the configuration pool, which outlives the request.
    let body = loc_conf(r).client_js.as_bytes();
    response::send(r, 200, b"application/javascript", Body::Lasting(body), None)
}
