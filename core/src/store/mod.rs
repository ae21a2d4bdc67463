//! The channel store: every channel, its messages, its listener counts and the workers'
//! mailboxes. One `Store` lives in the shared zone; every worker reaches it under the zone's
//! mutex, so its methods take `&mut self` and never block.
//!
//! Listeners themselves (requests) are worker-local; the store only counts them per worker
//! *slot* (one slot per live worker process) so that a publish knows which workers to wake,
//! the counts stay exact, and a dead worker's counts can be removed.

use std::hash::RandomState;

use allocator_api2::alloc::Allocator;
use allocator_api2::vec::Vec;
use hashbrown::HashMap;

use crate::info::ChannelInfo;
use crate::msgid::{next_id, MsgId, Since};
use crate::queue::{Message, MessageQueue, MessageSpec, NoMemory};

mod channel;
mod workers;

use channel::Waiter;
pub use channel::{Channel, ChannelName};
use workers::notify;
pub use workers::WorkerSlot;

/// Channels a worker's mailbox can name before it overflows into "look at all of them".
pub const MAILBOX_CAP: usize = 256;

/// Why the store refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    /// The zone is full (even after dropping expired messages and idle channels).
    NoMemory,
    /// `martd_authorized_channels_only on` and the channel does not exist.
    NotFound,
    /// `martd_max_listeners` reached.
    TooManyListeners,
    /// `martd_listener_concurrency first` and a listener is already waiting.
    Conflict,
}

impl From<NoMemory> for StoreError {
    fn from(_: NoMemory) -> Self {
        StoreError::NoMemory
    }
}

/// `martd_listener_concurrency`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Concurrency {
    #[default]
    Broadcast,
    Last,
    First,
}

/// A worker to wake: the edge writes to its notification pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WakeTarget {
    pub slot: u32,
    pub pid: i32,
    pub generation: u64,
    pub index: u32,
}

/// How a channel is published to, from the publishing location's configuration.
#[derive(Debug, Clone, Copy)]
pub struct PublishOpts {
    pub buffer_len: usize,
    /// `0` = never.
    pub timeout_ms: u64,
    pub store: bool,
    pub channel_timeout_ms: u64,
}

/// How a listener waits, from the listening location's configuration.
#[derive(Debug, Clone, Copy)]
pub struct ListenOpts {
    pub concurrency: Concurrency,
    /// `0` = unlimited.
    pub max_listeners: u32,
    /// Create the channel if it does not exist (`martd_authorized_channels_only off`).
    pub create: bool,
    pub channel_timeout_ms: u64,
    /// The listening worker's slot.
    pub slot: u32,
}

/// The result of a publish.
#[derive(Debug, Clone, Copy)]
pub struct Published {
    pub id: MsgId,
    /// Listeners waiting when the message was published (201 if non-zero).
    pub listeners: u32,
    pub info: ChannelInfo,
}

/// A listener that has to wait: what the worker keeps to find its message later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parked {
    /// The channel incarnation; a channel deleted and created again has another serial.
    pub serial: u64,
    /// The id the listener waits past.
    pub since: MsgId,
    /// Order of arrival on the channel, for the concurrency rules.
    pub park_seq: u64,
    /// The channel's last id when the listener parked.
    pub last_id: MsgId,
}

/// What a listen request gets.
pub enum Listen<'a, A: Allocator> {
    /// A stored message, to be answered at once.
    Message(&'a Message<A>),
    /// Nothing yet: the listener is counted and must wait.
    Park(Parked),
}

/// Counters for the whole zone.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub published: u64,
    pub channels_created: u64,
    pub out_of_memory: u64,
}

/// The root of the zone.
pub struct Store<A: Allocator + Clone> {
    alloc: A,
    last_id: MsgId,
    next_serial: u64,
    next_slot: u32,
    channels: HashMap<ChannelName<A>, Channel<A>, RandomState, A>,
    workers: Vec<WorkerSlot<A>, A>,
    pub stats: Stats,
}

impl<A: Allocator + Clone> Store<A> {
    /// An empty store; allocates nothing until used.
    pub fn new_in(alloc: A) -> Self {
        Store {
            last_id: 0,
            next_serial: 1,
            next_slot: 1,
            channels: HashMap::with_hasher_in(RandomState::new(), alloc.clone()),
            workers: Vec::new_in(alloc.clone()),
            stats: Stats::default(),
            alloc,
        }
    }

    /// The last id issued in this zone.
    pub fn last_id(&self) -> MsgId {
        self.last_id
    }

    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    /// The channel `name` if it is still incarnation `serial`.
    pub fn channel(&self, name: &[u8], serial: u64) -> Option<&Channel<A>> {
        self.channels.get(name).filter(|c| c.serial == serial)
    }

    pub fn info(&self, name: &[u8], now_ms: u64) -> Option<ChannelInfo> {
        self.channels.get(name).map(|c| c.info(now_ms))
    }

    fn get_or_create(
        &mut self,
        name: &[u8],
        now_ms: u64,
        channel_timeout_ms: u64,
    ) -> Result<&mut Channel<A>, NoMemory> {
        if !self.channels.contains_key(name) {
            self.channels.try_reserve(1).map_err(|_| NoMemory)?;
            let mut key = Vec::new_in(self.alloc.clone());
            key.try_reserve_exact(name.len()).map_err(|_| NoMemory)?;
            key.extend_from_slice(name);
            let channel = Channel {
                serial: self.next_serial,
                queue: MessageQueue::new_in(self.alloc.clone()),
                last_id: 0,
                listeners: 0,
                waiters: Vec::new_in(self.alloc.clone()),
                park_counter: 0,
                evict_below: 0,
                last_requested_ms: 0,
                last_active_ms: now_ms,
                channel_timeout_ms,
            };
            self.next_serial += 1;
            self.stats.channels_created += 1;
            self.channels.insert(ChannelName(key), channel);
        }
        self.channels.get_mut(name).ok_or(NoMemory)
    }

    /// Runs `op`; if the zone is full, drops expired messages and idle channels and tries once
    /// more.
    fn retrying<T>(
        &mut self,
        now_ms: u64,
        mut op: impl FnMut(&mut Self) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match op(self) {
            Err(StoreError::NoMemory) => {
                self.collect_garbage(now_ms);
                let r = op(self);
                if matches!(r, Err(StoreError::NoMemory)) {
                    self.stats.out_of_memory += 1;
                }
                r
            }
            r => r,
        }
    }

    /// Publishes a message. `wake` receives the workers to notify.
    pub fn publish(
        &mut self,
        name: &[u8],
        spec: &MessageSpec<'_>,
        opts: &PublishOpts,
        now_ms: u64,
        wake: &mut std::vec::Vec<WakeTarget>,
    ) -> Result<Published, StoreError> {
        self.retrying(now_ms, |s| s.publish_once(name, spec, opts, now_ms, wake))
    }

    fn publish_once(
        &mut self,
        name: &[u8],
        spec: &MessageSpec<'_>,
        opts: &PublishOpts,
        now_ms: u64,
        wake: &mut std::vec::Vec<WakeTarget>,
    ) -> Result<Published, StoreError> {
        let id = next_id(self.last_id, now_ms.saturating_mul(1000));
        let created = !self.channels.contains_key(name);
        let ch = self.get_or_create(name, now_ms, opts.channel_timeout_ms)?;
        ch.channel_timeout_ms = opts.channel_timeout_ms;
        ch.last_active_ms = now_ms;
        ch.queue.expire(now_ms);
        let listeners = ch.listeners;
        let keep = opts.store && opts.buffer_len > 0;
        if keep || listeners > 0 {
            let transient = (!keep).then_some(ch.waiters.len() as u32);
            let max_len = if keep { opts.buffer_len } else { usize::MAX };
            let stored = ch
                .queue
                .make_message(spec, id, now_ms, transient)
                .and_then(|msg| ch.queue.push(msg, max_len));
            if let Err(e) = stored {
                if created {
                    // A refused publish leaves nothing behind.
                    self.channels.remove(name);
                }
                return Err(e.into());
            }
        }
        ch.last_id = id;
        let serial = ch.serial;
        let info = ch.info(now_ms);
        self.last_id = id;
        self.stats.published += 1;
        if listeners > 0 {
            self.notify_waiters(name, serial, wake);
        }
        Ok(Published { id, listeners, info })
    }

    /// A listen request: a message at once, or the listener is counted and parks.
    pub fn listen(
        &mut self,
        name: &[u8],
        since: Since,
        opts: &ListenOpts,
        now_ms: u64,
        wake: &mut std::vec::Vec<WakeTarget>,
    ) -> Result<Listen<'_, A>, StoreError> {
        let future_clamp = self.last_id;
        // Decide first with shared borrows only, then mutate.
        let parked = self.retrying(now_ms, |s| {
            let ch = if opts.create {
                s.get_or_create(name, now_ms, opts.channel_timeout_ms)?
            } else {
                s.channels.get_mut(name).ok_or(StoreError::NotFound)?
            };
            ch.last_requested_ms = now_ms.max(1);
            ch.last_active_ms = now_ms;
            ch.channel_timeout_ms = opts.channel_timeout_ms;
            let since_id = match since {
                Since::Oldest => 0,
                Since::After(id) => id.min(future_clamp),
                Since::ModifiedSince(t) => ch.queue.id_at_time(t, now_ms),
            };
            if ch.queue.next_after(since_id, now_ms, false).is_some() {
                return Ok(Err(since_id));
            }
            match opts.concurrency {
                Concurrency::First if ch.listeners > 0 => return Err(StoreError::Conflict),
                _ => {}
            }
            if opts.max_listeners > 0 && ch.listeners >= opts.max_listeners {
                return Err(StoreError::TooManyListeners);
            }
            match ch.waiters.iter_mut().find(|w| w.slot == opts.slot) {
                Some(w) => w.count += 1,
                None => {
                    ch.waiters.try_reserve(1).map_err(|_| NoMemory)?;
                    ch.waiters.push(Waiter { slot: opts.slot, count: 1 });
                }
            }
            ch.listeners += 1;
            ch.park_counter += 1;
            let park_seq = ch.park_counter;
            if opts.concurrency == Concurrency::Last {
                ch.evict_below = park_seq;
            }
            Ok(Ok(Parked { serial: ch.serial, since: since_id, park_seq, last_id: ch.last_id }))
        })?;
        match parked {
            Ok(p) => {
                if opts.concurrency == Concurrency::Last {
                    self.notify_waiters(name, p.serial, wake);
                }
                Ok(Listen::Park(p))
            }
            Err(since_id) => {
                let msg = self
                    .channels
                    .get(name)
                    .and_then(|c| c.queue.next_after(since_id, now_ms, false))
                    .ok_or(StoreError::NotFound)?;
                Ok(Listen::Message(msg))
            }
        }
    }

    /// `n` listeners of `slot` on channel incarnation `serial` are gone (answered, timed
    /// out, or disconnected). When the worker has no listener left there (`last`), it also
    /// stops holding back transient messages published after `seen`.
    pub fn release(&mut self, name: &[u8], serial: u64, slot: u32, n: u32, last: Option<MsgId>) {
        if let Some(ch) = self.channels.get_mut(name).filter(|c| c.serial == serial) {
            ch.release(slot, n);
            if let Some(seen) = last {
                ch.queue.ack_transient_after(seen);
            }
        }
    }

    /// A worker that keeps listeners on the channel has seen every message after `seen`.
    pub fn ack(&mut self, name: &[u8], serial: u64, seen: MsgId) -> MsgId {
        match self.channels.get_mut(name).filter(|c| c.serial == serial) {
            Some(ch) => {
                if ch.last_id > seen {
                    ch.queue.ack_transient_after(seen);
                }
                ch.last_id
            }
            None => seen,
        }
    }

    /// Deletes a channel; its listeners' workers are woken (they answer `410`).
    pub fn delete(
        &mut self,
        name: &[u8],
        now_ms: u64,
        wake: &mut std::vec::Vec<WakeTarget>,
    ) -> Option<ChannelInfo> {
        let ch = self.channels.remove(name)?;
        let info = ch.info(now_ms);
        for w in ch.waiters.iter() {
            notify(&mut self.workers, w.slot, ch.serial, wake);
        }
        Some(info)
    }

    /// Drops dead messages and idle channels. Returns the number of channels removed.
    pub fn collect_garbage(&mut self, now_ms: u64) -> usize {
        let before = self.channels.len();
        self.channels.retain(|_, ch| {
            ch.queue.expire(now_ms);
            !ch.is_idle(now_ms)
        });
        before - self.channels.len()
    }

    /// Tells every worker with listeners on `name` to look at it.
    fn notify_waiters(&mut self, name: &[u8], serial: u64, wake: &mut std::vec::Vec<WakeTarget>) {
        if let Some(ch) = self.channels.get(name) {
            for w in ch.waiters.iter() {
                notify(&mut self.workers, w.slot, serial, wake);
            }
        }
    }

    /// Total listeners counted in every channel (for tests and stats).
    pub fn total_listeners(&self) -> u64 {
        self.channels.values().map(|c| u64::from(c.listeners)).sum()
    }
}

#[cfg(test)]
mod tests;
