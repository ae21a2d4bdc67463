//! Channel tokens on listen requests (gopush2's keys). A push registers tokens for a channel
//! (`token`, `token_ttl`; see `push`). Where `martd_require_token` is on, a listener must
//! present a live token of every channel it names (`token` argument or `X-Martd-Token`
//! header), else `403`: checked once, in the access phase. `martd_max_listeners_per_token`
//! caps the listeners waiting with one token across workers, else `409`: charged where the
//! listener starts to wait, under the same zone lock, and discharged when its handle goes
//! (its request finalized, its detached record replayed or closed, its stream ended). A
//! detached listener's replay skips the access phase and never parks again, so it is neither
//! checked nor charged twice. A worker that crashes loses its charges with its listeners
//! (the zone forgets a slot's counts when the slot's last listener leaves it).

use martd_core::key::{hash_key, KeyHash};
use martd_core::store::StoreError;
use nginx_sys::{ngx_http_request_t, ngx_int_t, NGX_DECLINED, NGX_ERROR, NGX_HTTP_FORBIDDEN};

use crate::conf::{LocConf, MainConf};
use crate::listen::main_conf;
use crate::worker::now_ms;
use crate::zone;

/// The access-phase step for a listen request: `Some(rc)` ends the access handler with
/// `rc`.
pub fn check(r: *mut ngx_http_request_t, lcf: &LocConf) -> Option<ngx_int_t> {
    if lcf.require_token == 0 {
        return None;
    }
    // SAFETY: the connection's log is live.
    let log = unsafe { (*(*r).connection).log };
    let token = match crate::attrs::token(r) {
        Ok(Some(t)) => t,
        Ok(None) => {
            martd_debug!(log, "listener refused: no token (martd_require_token)");
            return Some(NGX_HTTP_FORBIDDEN as ngx_int_t);
        }
        Err(_) => {
            // The content handler answers `400` with the reason.
            super::skip_to_content(r);
            return Some(NGX_DECLINED as ngx_int_t);
        }
    };
    // Invalid channel ids are the content handler's `400`.
    let names = crate::variables::request_channels(r)?;
    let now = now_ms();
    let Some(mut z) = zone::lock(main_conf(r)) else {
        return Some(NGX_ERROR as ngx_int_t);
    };
    let hash = hash_key(z.root().salt, &token);
    let store = z.store();
    let valid = names.iter().all(|n| store.token_valid(n, &hash, now));
    drop(z);
    if valid {
        return None;
    }
    martd_debug!(log, "listener refused: not a live token of its channel(s)");
    Some(NGX_HTTP_FORBIDDEN as ngx_int_t)
}

/// A listen request's token to charge, where its location caps listeners per token.
pub struct Charging {
    token: Vec<u8>,
    max: u32,
}

/// What a listen request of location `lcf` charges, if anything (a missing or bad token was
/// refused before).
pub fn to_charge(r: *mut ngx_http_request_t, lcf: &LocConf) -> Option<Charging> {
    if lcf.require_token == 0 || lcf.max_listeners_per_token <= 0 {
        return None;
    }
    let token = crate::attrs::token(r).ok().flatten()?;
    Some(Charging { token, max: lcf.max_listeners_per_token.min(u32::MAX as isize) as u32 })
}

impl Charging {
    /// Counts one more listener of `slot` on the token in each channel of `names` (all or
    /// none), under the zone lock `z`.
    pub fn charge<'a>(
        &self,
        z: &mut zone::Locked,
        mcf: &'static MainConf,
        slot: u32,
        names: impl Iterator<Item = &'a [u8]>,
    ) -> Result<Box<TokenCharge>, StoreError> {
        let hash = hash_key(z.root().salt, &self.token);
        let now = now_ms();
        let store = z.store();
        let mut on: Vec<(Box<[u8]>, u64)> = Vec::new();
        for name in names {
            match store.charge_token(name, &hash, slot, self.max, now) {
                Ok(serial) => on.push((name.into(), serial)),
                Err(e) => {
                    for (n, serial) in &on {
                        store.discharge_token(n, *serial, &hash, slot);
                    }
                    return Err(e);
                }
            }
        }
        Ok(Box::new(TokenCharge { mcf, slot, hash, on }))
    }
}

/// Listeners counted on a token, discharged when dropped (its listener's handle went).
pub struct TokenCharge {
    mcf: &'static MainConf,
    slot: u32,
    hash: KeyHash,
    /// The channels charged, by name and serial.
    on: Vec<(Box<[u8]>, u64)>,
}

impl TokenCharge {
    /// Discharges it with the zone already locked (a listener refused after it was charged).
    pub fn release_locked(mut self, z: &mut zone::Locked) {
        let store = z.store();
        for (n, serial) in self.on.drain(..) {
            store.discharge_token(&n, serial, &self.hash, self.slot);
        }
    }
}

impl Drop for TokenCharge {
    fn drop(&mut self) {
        if self.on.is_empty() {
            return;
        }
        if zone::held() {
            // SAFETY: the cycle's log is live in a worker.
            let log = unsafe { (*nginx_sys::ngx_cycle).log };
            martd_log!(
                nginx_sys::NGX_LOG_ALERT,
                log,
                "a token charge was dropped with the zone locked; its count stays"
            );
            return;
        }
        let Some(mut z) = zone::lock(self.mcf) else {
            return;
        };
        let store = z.store();
        for (n, serial) in &self.on {
            store.discharge_token(n, *serial, &self.hash, self.slot);
        }
    }
}
