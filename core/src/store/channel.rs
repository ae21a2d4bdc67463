//! One channel in the zone: its name, messages, listener counts, and its links in the
//! channel table and the expiry wheel.

use std::ptr::NonNull;

use allocator_api2::alloc::Allocator;
use allocator_api2::vec::Vec;

use super::expiry::Timer;
use crate::info::ChannelInfo;
use crate::msgid::MsgId;
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
            waiters: Vec::new_in(alloc),
            park_counter: 0,
            evict_below: 0,
            last_requested_ms: 0,
            last_active_ms: now_ms,
            channel_timeout_ms: timeout,
        }
    }

    pub fn name(&self) -> &[u8] {
        &self.name
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

    pub fn evict_below(&self) -> u64 {
        self.evict_below
    }

    /// The message a listener waiting past `since` gets now, if any.
    pub fn next_for(&self, since: MsgId, now_ms: u64) -> Option<&Message<A>> {
        self.queue.next_after(since, now_ms, true)
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
    /// its last activity, or [`LISTENER_ONLY_GRACE_MS`] if it was never published to.
    fn idle_deadline(&self) -> u64 {
        let wait = if self.last_id == 0 { LISTENER_ONLY_GRACE_MS } else { self.channel_timeout_ms };
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
