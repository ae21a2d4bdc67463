//! One channel in the zone, and its name.

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};

use allocator_api2::alloc::Allocator;
use allocator_api2::vec::Vec;

use crate::info::ChannelInfo;
use crate::msgid::MsgId;
use crate::queue::{Message, MessageQueue};

#[derive(Debug, Clone, Copy)]
pub(super) struct Waiter {
    pub(super) slot: u32,
    pub(super) count: u32,
}

/// One channel in the zone.
pub struct Channel<A: Allocator + Clone> {
    pub(super) serial: u64,
    pub(super) queue: MessageQueue<A>,
    pub(super) last_id: MsgId,
    pub(super) listeners: u32,
    pub(super) waiters: Vec<Waiter, A>,
    pub(super) park_counter: u64,
    /// Listeners that parked before this sequence number are displaced (`last` concurrency).
    pub(super) evict_below: u64,
    /// Milliseconds; `0` = never requested.
    pub(super) last_requested_ms: u64,
    pub(super) last_active_ms: u64,
    pub(super) channel_timeout_ms: u64,
}

impl<A: Allocator + Clone> Channel<A> {
    pub fn serial(&self) -> u64 {
        self.serial
    }

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

    pub(super) fn info(&self, now_ms: u64) -> ChannelInfo {
        ChannelInfo {
            messages: self.queue.stored_count(now_ms),
            requested: if self.last_requested_ms == 0 {
                -1
            } else {
                (now_ms.saturating_sub(self.last_requested_ms) / 1000) as i64
            },
            listeners: self.listeners,
            last_message_id: self.last_id,
        }
    }

    /// `n` of `slot`'s listeners are gone.
    pub(super) fn release(&mut self, slot: u32, n: u32) {
        if let Some(pos) = self.waiters.iter().position(|w| w.slot == slot) {
            let w = &mut self.waiters[pos];
            let n = n.min(w.count);
            w.count -= n;
            self.listeners = self.listeners.saturating_sub(n);
            if w.count == 0 {
                self.waiters.swap_remove(pos);
            }
        }
    }

    pub(super) fn is_idle(&self, now_ms: u64) -> bool {
        self.listeners == 0
            && self.queue.is_empty()
            && now_ms.saturating_sub(self.last_active_ms) >= self.channel_timeout_ms
    }
}

/// A channel name in zone memory, hashed and compared as its bytes.
pub struct ChannelName<A: Allocator>(pub(super) Vec<u8, A>);

impl<A: Allocator> Hash for ChannelName<A> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        <[u8] as Hash>::hash(self.0.as_slice(), state)
    }
}

impl<A: Allocator> PartialEq for ChannelName<A> {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_slice() == other.0.as_slice()
    }
}

impl<A: Allocator> Eq for ChannelName<A> {}

impl<A: Allocator> Borrow<[u8]> for ChannelName<A> {
    fn borrow(&self) -> &[u8] {
        self.0.as_slice()
    }
}
