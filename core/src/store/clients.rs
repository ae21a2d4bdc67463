//! Registered clients (sessions, as Simple-Comet has them): a client id registered by the
//! application lives for a timeout, renewed by each of its listen requests; a channel with
//! the `use_sessions` attribute admits only listeners that name a registered client.
//!
//! A client is kept as an entry of the channel table under a name no channel id can have (a
//! `0x01` byte, then the id: channel ids have no control characters), with an attribute box
//! marking it, no message and no listener. So it is found in one lookup, and it goes when it
//! expires exactly as an idle channel goes: the timing wheel and garbage collection in bounded
//! steps, with nothing to scan.

use allocator_api2::alloc::Allocator;
use allocator_api2::boxed::Box;

use super::attrs::ChannelAttrs;
use super::{Store, StoreError};

/// The first byte of a client's table name.
pub(super) const CLIENT_PREFIX: u8 = 0x01;

/// The table name of client `id`.
fn entry_name(id: &[u8]) -> std::vec::Vec<u8> {
    let mut name = std::vec::Vec::with_capacity(id.len() + 1);
    name.push(CLIENT_PREFIX);
    name.extend_from_slice(id);
    name
}

impl<A: Allocator + Clone> Store<A> {
    /// Registers client `id` for `timeout_ms`, or renews it (and sets its timeout); whether it
    /// is new.
    pub fn register_client(
        &mut self,
        id: &[u8],
        now_ms: u64,
        timeout_ms: u64,
    ) -> Result<bool, StoreError> {
        let name = entry_name(id);
        let (mut p, created) = self.get_or_create(&name, now_ms, timeout_ms)?;
        // SAFETY: a live entry of the table; the reference ends before the calls below.
        let ch = unsafe { p.as_mut() };
        if created {
            let alloc = self.alloc.clone();
            let marked = ChannelAttrs { client: true, ..ChannelAttrs::default() };
            match Box::try_new_in(marked, alloc) {
                Ok(b) => {
                    ch.attrs = Some(b);
                    self.stats.clients += 1;
                    // Counted by the stats as a registered client, not as a channel.
                    self.stats.channels_created -= 1;
                }
                Err(_) => {
                    self.remove_channel(p);
                    self.stats.channels_created -= 1;
                    return Err(StoreError::NoMemory);
                }
            }
        }
        ch.channel_timeout_ms = timeout_ms;
        ch.last_active_ms = now_ms;
        self.rearm(p);
        Ok(created)
    }

    /// Milliseconds client `id` has left (`None`: not registered, or expired); `renew`: its
    /// timeout starts again now.
    pub fn client_alive(&mut self, id: &[u8], now_ms: u64, renew: bool) -> Option<u64> {
        let p = self.channels.find(&entry_name(id))?;
        // SAFETY: a live entry of the table; the reference ends before the call below.
        let ch = unsafe { &mut *p.as_ptr() };
        if !ch.is_client() {
            return None;
        }
        let end = ch.last_active_ms.saturating_add(ch.channel_timeout_ms);
        if now_ms >= end {
            // Expired: garbage collection takes it at its deadline.
            return None;
        }
        if !renew {
            return Some(end - now_ms);
        }
        ch.last_active_ms = now_ms;
        let left = ch.channel_timeout_ms;
        self.rearm(p);
        Some(left)
    }

    /// Forgets client `id`; whether it was registered.
    pub fn unregister_client(&mut self, id: &[u8]) -> bool {
        let Some(p) = self.channels.find(&entry_name(id)) else {
            return false;
        };
        // SAFETY: a live entry of the table, only read here.
        if !unsafe { p.as_ref() }.is_client() {
            return false;
        }
        self.remove_channel(p);
        true
    }

    /// Whether channel `name` admits only registered clients (`use_sessions`).
    pub fn needs_session(&self, name: &[u8]) -> bool {
        // SAFETY: a live channel of the table, only read here.
        self.channels
            .find(name)
            .is_some_and(|p| unsafe { p.as_ref() }.attrs.as_ref().is_some_and(|a| a.use_sessions))
    }
}
