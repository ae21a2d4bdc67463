//! Channel tokens (gopush2's keys): a publisher registers tokens for a channel (hashed, each
//! with an optional expiry); a listen location that requires one admits a listener only with
//! a valid token, and may cap the listeners counted on each token across workers.
//!
//! Tokens live in their channel, so they go with it. A token's listeners are counted per
//! worker slot; a slot whose last listener leaves the channel (answered, gone, or purged
//! after its worker crashed) has none on any token either, so `Channel::release` forgets it.
//! The edge charges a token when a listener is counted and discharges it when it leaves.

use allocator_api2::alloc::Allocator;
use allocator_api2::vec::Vec;

use super::{PublishOpts, Store, StoreError};
use crate::key::{same_key, KeyHash};

/// The most tokens a channel keeps (expired ones do not count).
pub const MAX_TOKENS: usize = 64;

/// One registered token.
pub struct Token<A: Allocator> {
    hash: KeyHash,
    /// `u64::MAX`: lives as long as its channel.
    expires_ms: u64,
    /// Listeners counted on it, per worker slot.
    counts: Vec<(u32, u32), A>,
}

impl<A: Allocator> Token<A> {
    fn live(&self, now_ms: u64) -> bool {
        now_ms < self.expires_ms
    }

    fn total(&self) -> u32 {
        self.counts.iter().map(|c| c.1).sum()
    }

    pub(super) fn forget_slot(&mut self, slot: u32) {
        self.counts.retain(|c| c.0 != slot);
    }
}

impl<A: Allocator + Clone> Store<A> {
    /// Registers token `hash` for channel `name` (made if missing), living `ttl_ms` (`0`: as
    /// long as the channel); registering it again renews it.
    pub fn add_token(
        &mut self,
        name: &[u8],
        hash: &KeyHash,
        ttl_ms: u64,
        now_ms: u64,
        opts: &PublishOpts,
    ) -> Result<(), StoreError> {
        let (mut p, created) = self.get_or_create(name, now_ms, opts.channel_timeout_ms)?;
        // SAFETY: a live channel of the table; the reference ends before the calls below.
        let ch = unsafe { p.as_mut() };
        let expires_ms = if ttl_ms == 0 { u64::MAX } else { now_ms.saturating_add(ttl_ms) };
        // Expired tokens nobody counts on go.
        ch.tokens.retain(|t| t.live(now_ms) || t.total() > 0);
        if let Some(t) = ch.tokens.iter_mut().find(|t| same_key(&t.hash, hash)) {
            t.expires_ms = expires_ms;
        } else {
            let refused = if ch.tokens.len() >= MAX_TOKENS {
                Some(StoreError::TooManyTokens)
            } else if ch.tokens.try_reserve(1).is_err() {
                Some(StoreError::NoMemory)
            } else {
                None
            };
            if let Some(e) = refused {
                if created {
                    self.remove_channel(p);
                    self.stats.channels_created -= 1;
                }
                return Err(e);
            }
            let counts = Vec::new_in(self.alloc.clone());
            ch.tokens.push(Token { hash: *hash, expires_ms, counts });
        }
        ch.last_active_ms = now_ms;
        self.rearm(p);
        Ok(())
    }

    /// Whether `hash` is a live token of channel `name`.
    pub fn token_valid(&self, name: &[u8], hash: &KeyHash, now_ms: u64) -> bool {
        // SAFETY: a live channel of the table, only read here.
        self.channels.find(name).is_some_and(|p| {
            unsafe { p.as_ref() }.tokens.iter().any(|t| t.live(now_ms) && same_key(&t.hash, hash))
        })
    }

    /// Counts one more listener of `slot` on token `hash` of channel `name`, and gives the
    /// channel's serial (to discharge it later): [`StoreError::Forbidden`] if it is not a live
    /// token there, [`StoreError::TooManyTokenListeners`] if `max` (`0`: no cap) are counted on it
    /// already.
    pub fn charge_token(
        &mut self,
        name: &[u8],
        hash: &KeyHash,
        slot: u32,
        max: u32,
        now_ms: u64,
    ) -> Result<u64, StoreError> {
        let Some(mut p) = self.channels.find(name) else {
            return Err(StoreError::Forbidden);
        };
        self.purge_dead(p);
        // SAFETY: a live channel of the table.
        let ch = unsafe { p.as_mut() };
        let Some(t) = ch.tokens.iter_mut().find(|t| t.live(now_ms) && same_key(&t.hash, hash))
        else {
            return Err(StoreError::Forbidden);
        };
        if max > 0 && t.total() >= max {
            return Err(StoreError::TooManyTokenListeners);
        }
        match t.counts.iter_mut().find(|c| c.0 == slot) {
            Some(c) => c.1 += 1,
            None => {
                t.counts.try_reserve(1).map_err(|_| StoreError::NoMemory)?;
                t.counts.push((slot, 1));
            }
        }
        Ok(ch.serial)
    }

    /// Listeners counted on token `hash` of channel `name`, on every slot (`0` when it is not
    /// a token there).
    pub fn token_listeners(&self, name: &[u8], hash: &KeyHash) -> u32 {
        self.channels.find(name).map_or(0, |p| {
            // SAFETY: a live channel of the table, only read here.
            let ch = unsafe { p.as_ref() };
            ch.tokens.iter().find(|t| same_key(&t.hash, hash)).map_or(0, Token::total)
        })
    }

    /// One listener of `slot` counted on token `hash` left.
    pub fn discharge_token(&mut self, name: &[u8], serial: u64, hash: &KeyHash, slot: u32) {
        let Some(mut p) = self.live_channel(name, serial) else {
            return;
        };
        // SAFETY: a live channel of the table.
        let ch = unsafe { p.as_mut() };
        if let Some(t) = ch.tokens.iter_mut().find(|t| same_key(&t.hash, hash)) {
            if let Some(c) = t.counts.iter_mut().find(|c| c.0 == slot) {
                c.1 = c.1.saturating_sub(1);
            }
            t.counts.retain(|c| c.1 > 0);
        }
    }
}
