//! Publishes on their way to the engine several nodes share (`martd_redis_url`): a worker
//! appends each one (a message record, see [`crate::persist`]) to the zone's outbox and keeps
//! its request; the node's engine thread takes them, has the engine give each its id, stores
//! it in this zone as every node does ([`Store::insert_remote`]), and posts the outcome for
//! the worker's slot ([`Store::outbox_done`]), which then answers the publisher.

use allocator_api2::alloc::Allocator;
use allocator_api2::boxed::Box;
use allocator_api2::vec::Vec;

use super::{Store, StoreError};
use crate::msgid::MsgId;

/// The outcome of one publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    pub seq: u64,
    pub slot: u32,
    /// Its id; `0`: the engine could not take it.
    pub id: MsgId,
    /// Listeners of this node waiting on the channel when it was stored here.
    pub listeners: u32,
    /// The channel here once it was stored (the publisher's answer).
    pub info: Option<crate::info::ChannelInfo>,
    /// Stored, but fewer replicas than `martd_redis_wait` asks confirmed it in time.
    pub unconfirmed: bool,
}

/// A publish taken out of the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub seq: u64,
    pub slot: u32,
    /// The channel name.
    pub channel: std::vec::Vec<u8>,
    /// The message record (its id `0`: the engine gives it).
    pub record: std::vec::Vec<u8>,
}

struct Item<A: Allocator> {
    seq: u64,
    slot: u32,
    channel: Vec<u8, A>,
    record: Vec<u8, A>,
}

/// The outbox in the zone.
pub struct Outbox<A: Allocator> {
    items: Vec<Item<A>, A>,
    bytes: usize,
    cap: usize,
    next_seq: u64,
    done: Vec<Done, A>,
    /// The engine cannot be reached: publishes are refused (`503`).
    pub down: bool,
    /// Outcomes that found no room (their publishers time out).
    pub lost: u64,
    /// The engine thread was sent a wake-up it has not acted on (cleared when it takes).
    signalled: bool,
}

impl<A: Allocator + Clone> Store<A> {
    /// Turns the outbox on, holding at most `cap` bytes of publishes not taken yet.
    pub fn enable_outbox(&mut self, cap: usize) -> Result<(), StoreError> {
        if let Some(o) = self.outbox.as_mut() {
            o.cap = cap;
            return Ok(());
        }
        let o = Outbox {
            items: Vec::new_in(self.alloc.clone()),
            bytes: 0,
            cap,
            next_seq: 1,
            done: Vec::new_in(self.alloc.clone()),
            down: true,
            lost: 0,
            signalled: false,
        };
        self.outbox =
            Some(Box::try_new_in(o, self.alloc.clone()).map_err(|_| StoreError::NoMemory)?);
        Ok(())
    }

    pub fn disable_outbox(&mut self) {
        self.outbox = None;
    }

    pub fn outbox(&self) -> Option<&Outbox<A>> {
        self.outbox.as_deref()
    }

    /// Whether the engine can be reached (set by the engine thread).
    pub fn outbox_set_down(&mut self, down: bool) {
        if let Some(o) = self.outbox.as_mut() {
            o.down = down;
        }
    }

    /// Queues a publish of worker `slot` on `channel`; its sequence number.
    pub fn outbox_push(
        &mut self,
        slot: u32,
        channel: &[u8],
        record: &[u8],
    ) -> Result<u64, StoreError> {
        let alloc = self.alloc.clone();
        let o = self.outbox.as_mut().ok_or(StoreError::NotFound)?;
        if o.down {
            return Err(StoreError::Unavailable);
        }
        if o.bytes + record.len() > o.cap {
            return Err(StoreError::Behind);
        }
        let (mut c, mut r) = (Vec::new_in(alloc.clone()), Vec::new_in(alloc));
        c.try_reserve_exact(channel.len()).map_err(|_| StoreError::NoMemory)?;
        r.try_reserve_exact(record.len()).map_err(|_| StoreError::NoMemory)?;
        o.items.try_reserve(1).map_err(|_| StoreError::NoMemory)?;
        let pending = o.items.len() + 1;
        o.done.try_reserve(pending).map_err(|_| StoreError::NoMemory)?;
        c.extend_from_slice(channel);
        r.extend_from_slice(record);
        let seq = o.next_seq;
        o.next_seq += 1;
        o.bytes += record.len();
        o.items.push(Item { seq, slot, channel: c, record: r });
        Ok(seq)
    }

    /// Whether the engine thread should be sent a wake-up for what was just queued: `true`
    /// once until it takes the outbox (a burst of publishes costs one wake-up).
    pub fn outbox_signal(&mut self) -> bool {
        self.outbox.as_mut().is_some_and(|o| !std::mem::replace(&mut o.signalled, true))
    }

    /// The wake-up could not be sent (no engine thread listens): the next publish tries again.
    pub fn outbox_unsignal(&mut self) {
        if let Some(o) = self.outbox.as_mut() {
            o.signalled = false;
        }
    }

    /// Takes every queued publish (the engine thread).
    pub fn outbox_take(&mut self) -> std::vec::Vec<Outgoing> {
        let Some(o) = self.outbox.as_mut() else { return std::vec::Vec::new() };
        o.signalled = false;
        o.bytes = 0;
        o.items
            .drain(..)
            .map(|i| Outgoing {
                seq: i.seq,
                slot: i.slot,
                channel: i.channel.to_vec(),
                record: i.record.to_vec(),
            })
            .collect()
    }

    /// Posts a publish's outcome for its worker.
    pub fn outbox_done(&mut self, d: Done) {
        if let Some(o) = self.outbox.as_mut() {
            if o.done.try_reserve(1).is_ok() {
                o.done.push(d);
            } else {
                o.lost += 1;
            }
        }
    }

    /// Takes the outcomes for worker `slot`.
    pub fn outbox_results(&mut self, slot: u32) -> std::vec::Vec<Done> {
        let Some(o) = self.outbox.as_mut() else { return std::vec::Vec::new() };
        let mine: std::vec::Vec<Done> = o.done.iter().filter(|d| d.slot == slot).copied().collect();
        o.done.retain(|d| d.slot != slot);
        mine
    }

    /// How ids past the zone's last one count (see [`super::Clamp`]). With the outbox on, an
    /// id up to a minute ahead of the clock may be one another node has shown and this zone
    /// has not stored yet: the listener waits for what follows it, never a message it had.
    pub(super) fn future_clamp(&self, now_ms: u64) -> super::Clamp {
        let trust_upto = match self.outbox {
            Some(_) => now_ms.saturating_add(60_000).saturating_mul(1000),
            None => 0,
        };
        super::Clamp { last: self.last_id, trust_upto }
    }

    /// The buffer length and message life a push with `update` gets on channel `name` (its
    /// attributes, else the location's defaults), as [`Store::publish`] computes them.
    pub fn effective(
        &self,
        name: &[u8],
        update: &super::AttrUpdate,
        opts: &super::PublishOpts,
    ) -> (usize, u64) {
        match self.channels.find(name) {
            // SAFETY: a live channel of the table, only read here.
            Some(p) => unsafe { p.as_ref() }.effective(update, opts),
            None => {
                let len =
                    update.size.map_or(opts.buffer_len, |s| (s as usize).min(opts.buffer_max));
                (len, update.life_ms.unwrap_or(opts.timeout_ms))
            }
        }
    }

    /// The last id channel `name` has here (`0`: none, or no such channel).
    pub fn channel_last_id(&self, name: &[u8]) -> MsgId {
        // SAFETY: a live channel of the table, only read here.
        self.channels.find(name).map_or(0, |p| unsafe { p.as_ref() }.last_id)
    }

    /// Listeners of live workers on channel `name` here.
    pub fn channel_listeners(&self, name: &[u8]) -> u32 {
        // SAFETY: as above.
        self.channels.find(name).map_or(0, |p| self.live_listeners(unsafe { p.as_ref() }))
    }
}
