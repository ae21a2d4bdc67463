//! One channel in the zone: its name, messages, listener counts, and its links in the
//! channel table and the expiry wheel.

use std::ptr::NonNull;

use allocator_api2::alloc::Allocator;
use allocator_api2::boxed::Box;
use allocator_api2::vec::Vec;

use super::attrs::{AttrUpdate, ChannelAttrs};
use super::expiry::Timer;
use super::PublishOpts;
use crate::info::ChannelInfo;
use crate::key::KeyHash;
use crate::msgid::{MsgId, Since};
use crate::queue::NoMemory;
use crate::queue::{Message, MessageQueue};

/// How long a channel that was never published to stays after its last listener left, counted
/// from the last listen request: such a channel holds nothing but its name, so a flood of
/// listeners on made-up names holds the zone only while they wait. In practice it goes at the
/// first garbage-collection step after that (the edge runs one at least once a second).
pub const LISTENER_ONLY_GRACE_MS: u64 = 1_000;

/// A pointer to a channel owned by the store's table. Channels never move while they exist.
pub(super) type Link<A> = Option<NonNull<Channel<A>>>;

/// Listeners of one worker slot on a channel.
#[derive(Debug, Clone, Copy)]
pub(super) struct Waiter {
    pub(super) slot: u32,
    pub(super) count: u32,
    /// Every message up to this id has been looked at by the slot's worker (its acks).
    pub(super) seen: MsgId,
}

/// One channel in the zone.
pub struct Channel<A: Allocator + Clone> {
    /// The next channel in the same table bucket.
    pub(super) chain: Link<A>,
    /// The hash of `name`.
    pub(super) hash: u64,
    pub(super) name: Vec<u8, A>,
    /// Its place in the expiry wheel.
    pub(super) timer: Timer<A>,
    pub(super) serial: u64,
    pub(super) queue: MessageQueue<A>,
    pub(super) last_id: MsgId,
    /// Listeners counted in `waiters`.
    pub(super) listeners: u32,
    /// Which wheel list `timer` is in (see [`Timer`]); next to `listeners` to share padding.
    pub(super) timer_list: u16,
    pub(super) waiters: Vec<Waiter, A>,
    pub(super) park_counter: u64,
    /// Listeners that parked before this sequence number are displaced (`last` concurrency).
    pub(super) evict_below: u64,
    /// Milliseconds; `0` = never requested.
    pub(super) last_requested_ms: u64,
    /// The last publish or listen request.
    pub(super) last_active_ms: u64,
    pub(super) channel_timeout_ms: u64,
    /// Attributes a publisher set, if any.
    pub(super) attrs: Option<Box<ChannelAttrs, A>>,
    /// Tokens a publisher registered (see `super::tokens`).
    pub(super) tokens: Vec<super::tokens::Token<A>, A>,
}

impl<A: Allocator + Clone> Channel<A> {
    pub(super) fn new(name: Vec<u8, A>, hash: u64, serial: u64, now_ms: u64, timeout: u64) -> Self {
        let alloc = name.allocator().clone();
        Channel {
            chain: None,
            hash,
            name,
            timer: Timer::default(),
            serial,
            queue: MessageQueue::new_in(alloc.clone()),
            last_id: 0,
            listeners: 0,
            timer_list: 0,
            waiters: Vec::new_in(alloc.clone()),
            tokens: Vec::new_in(alloc),
            park_counter: 0,
            evict_below: 0,
            last_requested_ms: 0,
            last_active_ms: now_ms,
            channel_timeout_ms: timeout,
            attrs: None,
        }
    }

    pub fn name(&self) -> &[u8] {
        &self.name
    }

    /// Not a channel: a registered client (see `super::clients`).
    pub(super) fn is_client(&self) -> bool {
        self.attrs.as_ref().is_some_and(|a| a.client)
    }

    pub fn serial(&self) -> u64 {
        self.serial
    }

    /// Listeners counted here, including those of a crashed worker not yet purged (see
    /// [`super::Store::info`] for the live count).
    pub fn listeners(&self) -> u32 {
        self.listeners
    }

    pub fn last_id(&self) -> MsgId {
        self.last_id
    }

    /// Listeners that parked before this sequence number are displaced (`last` concurrency).
    pub fn evict_below(&self) -> u64 {
        self.evict_below
    }

    /// Whether the listener that parked with sequence number `seq` is displaced (`409`): by a
    /// newer listener (`last` concurrency), or by the one-to-one election.
    pub fn evicts(&self, seq: u64) -> bool {
        seq < self.evict_below || self.attrs.as_ref().is_some_and(|a| a.evicts(seq))
    }

    /// One-to-one delivery is on: a message delivered is consumed.
    pub fn one2one(&self) -> bool {
        self.attrs.as_ref().is_some_and(|a| a.one2one)
    }

    /// The one-to-one election running on the channel, as `(cut, best)` (see
    /// [`super::Store::elect`]); `None` if none ever ran.
    pub fn election(&self) -> Option<(u64, u64)> {
        self.attrs.as_ref().filter(|a| a.elect_cut > 0).map(|a| (a.elect_cut, a.elect_best))
    }

    /// The id a listener asking for `since` waits past here: `0` for everything stored, an
    /// id from the future (from before a clock step) clamped to `clamp` (the zone's last id).
    pub(super) fn since_id(&self, since: Since, clamp: super::Clamp, now_ms: u64) -> MsgId {
        match since {
            Since::Oldest => 0,
            Since::After(id) if id <= clamp.last || id <= clamp.trust_upto => id,
            Since::After(_) => clamp.last,
            Since::ModifiedSince(t) => self.queue.id_at_time(t, now_ms),
        }
    }

    /// The message a listener waiting past `since` gets now, if any.
    pub fn next_for(&self, since: MsgId, now_ms: u64) -> Option<&Message<A>> {
        if since >= self.last_id {
            return None;
        }
        self.queue.next_after(since, now_ms, true)
    }

    /// This channel's part of a multi-channel reply: every live message after `since` (transient
    /// ones only if `include_transient`) as a JSON fragment, with the id of the last one.
    /// `None`: nothing newer; `Some((None, _))`: no memory for the fragment.
    pub fn json_fragment(
        &self,
        since: MsgId,
        now_ms: u64,
        include_transient: bool,
    ) -> Option<(Option<std::vec::Vec<u8>>, MsgId)> {
        let last = self.messages_after(since, now_ms, include_transient).last()?.id;
        let bodies = self.messages_after(since, now_ms, include_transient).map(|m| m.body());
        Some((crate::json::fragment(self.name(), last, bodies), last))
    }

    /// Whether a stored message newer than `since` can be delivered now. Answered from the
    /// channel's last id when nothing newer was ever published (no look at the messages).
    pub(super) fn has_stored_after(&self, since: MsgId, now_ms: u64) -> bool {
        since < self.last_id && self.queue.next_after(since, now_ms, false).is_some()
    }

    /// Every live message after `since`, oldest first; transient ones only if
    /// `include_transient`.
    pub fn messages_after(
        &self,
        since: MsgId,
        now_ms: u64,
        include_transient: bool,
    ) -> impl Iterator<Item = &Message<A>> + Clone {
        self.queue.after(since, now_ms, include_transient)
    }

    /// Whether a push or delete carrying `key` may change the channel.
    pub(super) fn admits(&self, key: Option<&KeyHash>) -> bool {
        self.attrs.as_ref().is_none_or(|a| a.admits(key))
    }

    /// The buffer length and message life a push with `update` gets here: the channel's
    /// attributes (the push's own first), bounded by the publishing location, else the
    /// location's defaults.
    pub(super) fn effective(&self, update: &AttrUpdate, opts: &PublishOpts) -> (usize, u64) {
        let cur = self.attrs.as_deref();
        let size = update.size.or(cur.and_then(|a| a.size));
        let life = update.life_ms.or(cur.and_then(|a| a.life_ms));
        let len = size.map_or(opts.buffer_len, |s| (s as usize).min(opts.buffer_max));
        let life = match (life, opts.timeout_ms) {
            (None, t) => t,
            (Some(l), 0) => l,
            (Some(0), t) => t,
            (Some(l), t) => l.min(t),
        };
        (len, life)
    }

    /// Makes room for the attributes `update` sets, so that applying them cannot fail.
    pub(super) fn reserve_attrs(&mut self, update: &AttrUpdate) -> Result<(), NoMemory> {
        if self.attrs.is_none() && update.any() {
            let alloc = self.name.allocator().clone();
            let b = Box::try_new_in(ChannelAttrs::default(), alloc).map_err(|_| NoMemory)?;
            self.attrs = Some(b);
        }
        Ok(())
    }

    /// Sets the attributes read back from disk (room made by [`Channel::reserve_attrs`]).
    pub(super) fn restore_attrs(&mut self, saved: &crate::persist::SavedAttrs) {
        if let Some(a) = self.attrs.as_deref_mut() {
            a.size = saved.size;
            a.life_ms = saved.life_ms;
            a.one2one = saved.one2one;
            a.key = saved.key;
            a.use_sessions = saved.use_sessions;
        }
    }

    /// Applies `update` (room made by [`Channel::reserve_attrs`]). Returns whether one-to-one delivery was switched
    /// on while listeners waited: an election starts (see [`super::Store::elect`]) and the
    /// workers must be woken.
    pub(super) fn apply_attrs(&mut self, update: &AttrUpdate) -> bool {
        let Some(a) = self.attrs.as_deref_mut() else {
            return false;
        };
        if update.size.is_some() {
            a.size = update.size;
        }
        if update.life_ms.is_some() {
            a.life_ms = update.life_ms;
        }
        if a.key.is_none() {
            a.key = update.key;
        }
        if let Some(on) = update.use_sessions {
            a.use_sessions = on;
        }
        let mut elect = false;
        if let Some(on) = update.one2one {
            if on && !a.one2one {
                a.elect_cut = if self.listeners > 1 { self.park_counter } else { 0 };
                a.elect_best = u64::MAX;
                elect = a.elect_cut > 0;
            } else if !on {
                a.elect_cut = 0;
            }
            a.one2one = on;
        }
        elect
    }

    pub(super) fn info(&self, now_ms: u64, listeners: u32) -> ChannelInfo {
        ChannelInfo {
            messages: self.queue.stored_count(now_ms),
            requested: if self.last_requested_ms == 0 {
                -1
            } else {
                (now_ms.saturating_sub(self.last_requested_ms) / 1000) as i64
            },
            listeners,
            last_message_id: self.last_id,
        }
    }

    /// `n` of `slot`'s listeners are gone. Returns whether the slot has no listener left here
    /// (and so left the channel's waiters).
    pub(super) fn release(&mut self, slot: u32, n: u32) -> bool {
        let Some(pos) = self.waiters.iter().position(|w| w.slot == slot) else {
            return false;
        };
        let w = &mut self.waiters[pos];
        let n = n.min(w.count);
        w.count -= n;
        self.listeners = self.listeners.saturating_sub(n);
        if w.count == 0 {
            self.waiters.swap_remove(pos);
            // Tokens are charged only by counted listeners: none of this slot is left.
            for t in self.tokens.iter_mut() {
                t.forget_slot(slot);
            }
            true
        } else {
            false
        }
    }

    /// Listeners of slots for which `dead` says yes.
    pub(super) fn listeners_of(&self, dead: impl Fn(u32) -> bool) -> u32 {
        self.waiters.iter().filter(|w| dead(w.slot)).map(|w| w.count).sum()
    }

    /// When, with nothing else happening, the channel would go: `channel_timeout_ms` after
    /// its last activity, or [`LISTENER_ONLY_GRACE_MS`] if it was never published to (no
    /// message, no attribute).
    fn idle_deadline(&self) -> u64 {
        // A channel a publisher made (a message, or attributes) waits its timeout.
        let made_by_listeners = self.last_id == 0 && self.attrs.is_none() && self.tokens.is_empty();
        let wait = if made_by_listeners { LISTENER_ONLY_GRACE_MS } else { self.channel_timeout_ms };
        self.last_active_ms.saturating_add(wait)
    }

    fn is_empty(&self) -> bool {
        self.listeners == 0 && self.queue.is_empty()
    }

    /// Whether the channel can go now: no listener, no message, idle long enough.
    pub(super) fn is_removable(&self, now_ms: u64) -> bool {
        self.is_empty() && now_ms >= self.idle_deadline()
    }

    /// The next time garbage collection has something to do here (`u64::MAX`: never,
    /// until something changes): a message expires, or the channel becomes removable.
    pub(super) fn deadline(&self) -> u64 {
        let expiry = self.queue.next_expiry();
        if self.is_empty() {
            expiry.min(self.idle_deadline())
        } else {
            expiry
        }
    }
}
