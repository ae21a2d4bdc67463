//! The channel store: every channel, its messages, its listener counts and the workers'
//! mailboxes. One `Store` lives in the shared zone; every worker reaches it under the zone's
//! mutex, so its methods take `&mut self` and never block.
//!
//! Listeners themselves (requests) are worker-local; the store only counts them per worker
//! *slot* (one slot per live worker process) so that a publish knows which workers to wake,
//! the counts stay exact, and a dead worker's counts can be removed.
//!
//! Every call costs a bounded amount of work whatever the number of channels: channels are
//! found through a table that grows one bucket at a time (`table.rs`), expiry runs through a
//! timing wheel in bounded steps (`expiry.rs`), and a crashed worker's counts are purged
//! lazily (`workers.rs`). The one exception is a message operation, which is linear in the
//! channel's queue (at most `martd_message_buffer_length` messages).

use std::ptr::NonNull;

use allocator_api2::alloc::Allocator;
use allocator_api2::vec::Vec;

use crate::info::ChannelInfo;
use crate::key::KeyHash;
#[cfg(test)]
use crate::msgid::Since;
use crate::msgid::{next_id, MsgId};
use crate::queue::{Message, MessageSpec, NoMemory};

mod api;
mod attrs;
mod channel;
mod clients;
mod events;
mod expiry;
mod journal;
mod listen;
mod outbox;
mod paged;
mod stats;
mod table;
mod tokens;
mod workers;

pub use api::{oldest, MultiListen, MultiPeek, Resume};
pub use attrs::AttrUpdate;
pub use channel::{Channel, LISTENER_ONLY_GRACE_MS};
pub use events::{event_json, ChannelEvent, EVENTS_OPTS};
use expiry::Wheel;
pub use journal::Journal;
pub use outbox::{Done, Outbox, Outgoing};
use table::ChannelTable;
pub use tokens::MAX_TOKENS;
pub use workers::WorkerSlot;
use workers::{notify, DeadSlot};

/// The budget of one [`Store::collect_garbage_step`] (channels looked at) that keeps a hold of
/// the zone lock around 50 µs at a million channels (`martd-bench lockhold`).
pub const GC_STEP_BUDGET: usize = 32;

/// Garbage-collection work a refused allocation may do before its one retry: one step, so a
/// publish or listen in a full zone holds the lock no longer than a step and the call.
pub const OOM_GC_BUDGET: usize = GC_STEP_BUDGET;

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
    /// `martd_listener_concurrency first`, or a one-to-one channel, and a listener is
    /// already waiting.
    Conflict,
    /// The channel has a key and the request did not carry it; or a listener's token is not
    /// one of the channel's.
    Forbidden,
    /// The channel has as many tokens as it may keep ([`tokens::MAX_TOKENS`]).
    TooManyTokens,
    /// As many listeners as `martd_max_listeners_per_token` allows wait with this token.
    TooManyTokenListeners,
    /// `martd_persist`: the journal holds as much as it may before the disk takes it.
    Behind,
    /// `martd_persist`: the disk could not be written.
    DiskFailing,
    /// `martd_persist`: a reload made a new zone; this one takes no more publishes.
    Superseded,
    /// `martd_redis_url`: the engine the nodes share cannot be reached.
    Unavailable,
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

/// Ids a listener gives that are newer than the zone's last one (`last`) count as `last` (from
/// before a clock step, or made up: the listener gets the next message), unless they are up to
/// `trust_upto` (see `Store::future_clamp`).
#[derive(Debug, Clone, Copy)]
pub struct Clamp {
    pub last: MsgId,
    pub trust_upto: MsgId,
}

/// How a channel is published to, from the publishing location's configuration.
#[derive(Debug, Clone, Copy)]
pub struct PublishOpts {
    /// Messages kept when the channel has no `size` attribute.
    pub buffer_len: usize,
    /// The most messages a channel's `size` attribute can keep here.
    pub buffer_max: usize,
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
    /// A streaming subscriber (EventSource, chunked stream): it parks even when stored
    /// messages are newer than its id (the caller sends them at once, from the channel, in
    /// the same hold of the lock) and stays parked after deliveries.
    pub stream: bool,
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
    /// Channels removed by garbage collection (idle, or never published to and left).
    pub channels_removed: u64,
    pub out_of_memory: u64,
    /// Stored (not transient) messages in every channel.
    pub messages: u64,
    /// Registered clients (entries of the channel table that are not channels).
    pub clients: u64,
}

/// The root of the zone.
pub struct Store<A: Allocator + Clone> {
    alloc: A,
    last_id: MsgId,
    next_serial: u64,
    next_slot: u32,
    /// Owns every channel. Dropped first: the wheel only points into it.
    channels: ChannelTable<A>,
    wheel: Wheel<A>,
    workers: Vec<WorkerSlot<A>, A>,
    /// Slots gone while channels still count their listeners.
    dead: Vec<DeadSlot, A>,
    /// The next bucket the crashed-worker sweep looks at, while one runs.
    sweep: Option<usize>,
    pub stats: Stats,
    /// Publishes per second over the last minute.
    rate: crate::stats::PublishRate,
    /// The cumulative counts of workers gone.
    retired: crate::stats::Counts,
    /// Channel events, when a channel gets them (see `events`).
    events: Option<allocator_api2::boxed::Box<events::Events<A>, A>>,
    /// `martd_persist`'s journal, when on (see `journal`).
    journal: Option<allocator_api2::boxed::Box<journal::Journal<A>, A>>,
    /// `martd_redis_url`'s outbox, when on (see `outbox`).
    outbox: Option<allocator_api2::boxed::Box<outbox::Outbox<A>, A>>,
}

impl<A: Allocator + Clone> Store<A> {
    /// An empty store; allocates nothing until used.
    pub fn new_in(alloc: A) -> Self {
        Store {
            last_id: 0,
            next_serial: 1,
            next_slot: 1,
            channels: ChannelTable::new_in(alloc.clone()),
            wheel: Wheel::new(),
            workers: Vec::new_in(alloc.clone()),
            dead: Vec::new_in(alloc.clone()),
            sweep: None,
            stats: Stats::default(),
            rate: Default::default(),
            retired: Default::default(),
            events: None,
            journal: None,
            outbox: None,
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
        // SAFETY: a live channel of the table, borrowed for as long as the store is.
        let ch = unsafe { self.channels.find(name)?.as_ref() };
        (ch.serial == serial).then_some(ch)
    }

    /// Whether a push carrying `key` may publish on channel `name` (no such channel, or no
    /// key, or that key).
    pub fn admits(&self, name: &[u8], key: Option<&KeyHash>) -> bool {
        // SAFETY: a live channel of the table, only read here.
        self.channels.find(name).is_none_or(|p| unsafe { p.as_ref() }.admits(key))
    }

    /// Listeners on `ch` that belong to live workers.
    fn live_listeners(&self, ch: &Channel<A>) -> u32 {
        if self.dead.is_empty() {
            ch.listeners
        } else {
            ch.listeners - ch.listeners_of(|slot| self.is_dead(slot))
        }
    }

    /// What the publisher endpoint reports about `name`; listeners of crashed workers not yet
    /// purged are left out.
    pub fn info(&self, name: &[u8], now_ms: u64) -> Option<ChannelInfo> {
        // SAFETY: a live channel of the table.
        let ch = unsafe { self.channels.find(name)?.as_ref() };
        Some(ch.info(now_ms, self.live_listeners(ch)))
    }

    /// Total listeners of live workers in every channel (for tests and stats; walks every
    /// channel).
    pub fn total_listeners(&self) -> u64 {
        let mut n = 0;
        self.channels.for_each(|c| n += u64::from(self.live_listeners(c)));
        n
    }

    /// The channel `name`, created if missing; says whether it was created.
    fn get_or_create(
        &mut self,
        name: &[u8],
        now_ms: u64,
        channel_timeout_ms: u64,
    ) -> Result<(NonNull<Channel<A>>, bool), NoMemory> {
        if let Some(p) = self.channels.find(name) {
            self.purge_dead(p);
            return Ok((p, false));
        }
        let mut key = Vec::new_in(self.alloc.clone());
        key.try_reserve_exact(name.len()).map_err(|_| NoMemory)?;
        key.extend_from_slice(name);
        let hash = self.channels.hash(name);
        let channel = Channel::new(key, hash, self.next_serial, now_ms, channel_timeout_ms);
        let p = self.channels.insert(channel)?;
        self.next_serial += 1;
        self.stats.channels_created += 1;
        self.note_event(events::ChannelEvent::Created, name, 0);
        Ok((p, true))
    }

    /// Takes channel `p` out of the wheel and the table and frees it. Its waiters' slots
    /// no longer count it.
    fn remove_channel(&mut self, p: NonNull<Channel<A>>) -> Channel<A> {
        self.wheel.disarm(p);
        let ch = self.channels.remove(p);
        if ch.is_client() {
            self.stats.clients -= 1;
        }
        for w in ch.waiters.iter() {
            self.slot_left(w.slot);
        }
        self.recount(ch.queue.stored_len(), 0);
        self.note_event(events::ChannelEvent::Deleted, &ch.name, 0);
        if !ch.is_client() {
            self.journal_append(&crate::persist::Record::Delete { channel: &ch.name });
        }
        ch
    }

    /// Runs `op`; if the zone is full, runs one bounded garbage-collection step (whatever has
    /// expired by now, up to [`OOM_GC_BUDGET`] channels) and tries once more.
    fn retrying<T>(
        &mut self,
        now_ms: u64,
        mut op: impl FnMut(&mut Self) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.wheel.observe(now_ms);
        match op(self) {
            Err(StoreError::NoMemory) => {
                self.collect_garbage_step(now_ms, OOM_GC_BUDGET);
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
    ///
    /// Messages live until their timeout (`timeout_ms`, never if `0`) or until newer ones push
    /// them out of the buffer; a channel with no listener and no message is removed
    /// `channel_timeout_ms` after its last publish or listen request.
    ///
    /// `spec` is the message (`None`: the push only sets attributes). `attrs` are the
    /// channel attributes the push carries; a channel with a key refuses a push without it
    /// ([`StoreError::Forbidden`]) and nothing changes.
    pub fn publish(
        &mut self,
        name: &[u8],
        spec: Option<&MessageSpec<'_>>,
        attrs: &AttrUpdate,
        opts: &PublishOpts,
        now_ms: u64,
        wake: &mut std::vec::Vec<WakeTarget>,
    ) -> Result<Published, StoreError> {
        self.retrying(now_ms, |s| s.publish_once(name, spec, attrs, opts, now_ms, wake))
    }

    fn publish_once(
        &mut self,
        name: &[u8],
        spec: Option<&MessageSpec<'_>>,
        attrs: &AttrUpdate,
        opts: &PublishOpts,
        now_ms: u64,
        wake: &mut std::vec::Vec<WakeTarget>,
    ) -> Result<Published, StoreError> {
        if self.journal.is_some() {
            let body = spec.map_or(0, |m| m.content_type.len() + m.event.len() + m.body.len());
            self.journal_room(2 * name.len() + body + 256)?;
        }
        let (mut p, created) = match self.channels.find(name) {
            Some(p) => {
                // SAFETY: a live channel of the table, only read here.
                if !unsafe { p.as_ref() }.admits(attrs.key.as_ref()) {
                    return Err(StoreError::Forbidden);
                }
                self.purge_dead(p);
                (p, false)
            }
            None => self.get_or_create(name, now_ms, opts.channel_timeout_ms)?,
        };
        // SAFETY: a live channel of the table; this reference ends before the wheel or the
        // table touch it again.
        let ch = unsafe { p.as_mut() };
        let stored_before = ch.queue.stored_len();
        ch.queue.expire(now_ms);
        let listeners = ch.listeners;
        let (buffer_len, timeout_ms) = ch.effective(attrs, opts);
        let keep = opts.store && buffer_len > 0;
        let id = match spec {
            Some(_) => next_id(self.last_id, now_ms.saturating_mul(1000)),
            None => ch.last_id,
        };
        let mut stored = ch.reserve_attrs(attrs);
        if attrs.size.is_some() && stored.is_ok() {
            // A lowered size drops the oldest messages now (before this push's message).
            ch.queue.truncate_to(buffer_len);
        }
        if let (Ok(()), Some(spec)) = (stored, spec) {
            if keep || listeners > 0 {
                let transient = (!keep).then_some(ch.waiters.len() as u32);
                let max_len = if keep { buffer_len } else { usize::MAX };
                let spec =
                    MessageSpec { timeout_ms: spec.expire_ms.unwrap_or(timeout_ms), ..*spec };
                // Messages pushed out of the buffer stay for the workers with listeners that
                // have not looked at them yet (a burst longer than the buffer).
                let waiters = &ch.waiters;
                let unseen = |id: MsgId| {
                    waiters.iter().filter(|w| w.count > 0 && w.seen < id).count() as u32
                };
                stored = ch
                    .queue
                    .make_message(&spec, id, now_ms, transient)
                    .and_then(|msg| ch.queue.push_keeping(msg, max_len, now_ms, unseen));
            }
        }
        if let Err(e) = stored {
            if created {
                // A refused publish leaves nothing behind.
                self.remove_channel(p);
            } else {
                // Expired messages may have gone.
                self.recount(stored_before, ch.queue.stored_len());
                self.rearm(p);
            }
            return Err(e.into());
        }
        let elect = ch.apply_attrs(attrs);
        ch.channel_timeout_ms = opts.channel_timeout_ms;
        ch.last_active_ms = now_ms;
        self.recount(stored_before, ch.queue.stored_len());
        if spec.is_some() {
            ch.last_id = id;
            self.last_id = id;
            self.stats.published += 1;
            self.rate.record(now_ms / 1000);
        }
        if self.journal.is_some() {
            // SAFETY: a live channel of the table, only read while the journal is written.
            let ch = unsafe { p.as_ref() };
            let stored = (spec.is_some() && keep).then_some(id);
            self.journal_publish(ch, attrs.any(), stored, buffer_len);
        }
        // SAFETY: as above.
        let ch = unsafe { p.as_mut() };
        let info = ch.info(now_ms, listeners);
        if listeners > 0 && (spec.is_some() || elect) {
            self.notify_waiters(p, wake);
        }
        self.rearm(p);
        Ok(Published { id, listeners, info })
    }

    /// The channel incarnation `serial` of `name`, with dead slots' counts purged.
    fn live_channel(&mut self, name: &[u8], serial: u64) -> Option<NonNull<Channel<A>>> {
        let p = self.channels.find(name)?;
        // SAFETY: a live channel of the table.
        if unsafe { p.as_ref() }.serial != serial {
            return None;
        }
        self.purge_dead(p);
        Some(p)
    }

    /// Deletes a channel; its listeners' workers are woken (they answer `410`). `Ok(None)`:
    /// no such channel; [`StoreError::Forbidden`]: the channel has a key and `key` is not it.
    pub fn delete(
        &mut self,
        name: &[u8],
        key: Option<&KeyHash>,
        now_ms: u64,
        wake: &mut std::vec::Vec<WakeTarget>,
    ) -> Result<Option<ChannelInfo>, StoreError> {
        let Some(p) = self.channels.find(name) else {
            return Ok(None);
        };
        // SAFETY: a live channel of the table, only read here.
        if !unsafe { p.as_ref() }.admits(key) {
            return Err(StoreError::Forbidden);
        }
        self.purge_dead(p);
        let ch = self.remove_channel(p);
        for w in ch.waiters.iter() {
            notify(&mut self.workers, w.slot, ch.serial, wake);
        }
        Ok(Some(ch.info(now_ms, ch.listeners)))
    }

    /// Tells every worker with listeners on channel `p` to look at it.
    fn notify_waiters(&mut self, p: NonNull<Channel<A>>, wake: &mut std::vec::Vec<WakeTarget>) {
        // SAFETY: a live channel of the table, only read here.
        let ch = unsafe { p.as_ref() };
        for w in ch.waiters.iter() {
            notify(&mut self.workers, w.slot, ch.serial, wake);
        }
    }
}

#[cfg(test)]
impl<A: Allocator + Clone> Store<A> {
    /// A relay publish: a message, no attributes.
    pub(crate) fn publish_msg(
        &mut self,
        name: &[u8],
        spec: &MessageSpec<'_>,
        opts: &PublishOpts,
        now_ms: u64,
        wake: &mut std::vec::Vec<WakeTarget>,
    ) -> Result<Published, StoreError> {
        self.publish(name, Some(spec), &AttrUpdate::default(), opts, now_ms, wake)
    }

    /// A delete without a key.
    pub(crate) fn delete_any(
        &mut self,
        name: &[u8],
        now_ms: u64,
        wake: &mut std::vec::Vec<WakeTarget>,
    ) -> Option<ChannelInfo> {
        self.delete(name, None, now_ms, wake).ok().flatten()
    }
}

#[cfg(test)]
mod check;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_api;
#[cfg(test)]
mod tests_clients;
#[cfg(test)]
mod tests_events;
#[cfg(test)]
mod tests_first;
#[cfg(test)]
mod tests_gc;
#[cfg(test)]
mod tests_journal;
#[cfg(test)]
mod tests_linger;
#[cfg(test)]
mod tests_stats;
#[cfg(test)]
mod tests_stream;
#[cfg(test)]
mod tests_tokens;
