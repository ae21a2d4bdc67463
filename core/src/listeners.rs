//! One worker's parked listeners, grouped by channel, and its copies of messages.
//!
//! A listener is whatever handle the edge gives (`H`: a pointer to the request context in
//! nginx, a number in tests). When the worker is woken for a channel, [`Listeners::wake`]
//! decides, under the zone lock, which of its listeners get a message, a `409` or a `410`,
//! copies each message out of the zone at most once (see [`PayloadCache`]), and returns the
//! verdicts for the edge to answer after the lock is released.

use std::collections::HashMap;
use std::rc::{Rc, Weak};

use allocator_api2::alloc::Allocator;
use slab::Slab;

use crate::msgid::{format_etag, MsgId};
use crate::queue::Message;
use crate::store::{Parked, Store};

/// A message copied out of the zone, shared by every listener of this worker that gets it.
#[derive(Debug)]
pub struct Payload {
    pub id: MsgId,
    pub time: u64,
    etag_len: usize,
    ct_len: usize,
    /// The quoted `Etag` value, the content type and the body, formatted once.
    data: Box<[u8]>,
}

impl Payload {
    /// The `Etag` header value (the quoted id).
    pub fn etag(&self) -> &[u8] {
        &self.data[..self.etag_len]
    }

    pub fn content_type(&self) -> &[u8] {
        &self.data[self.etag_len..self.etag_len + self.ct_len]
    }

    pub fn body(&self) -> &[u8] {
        &self.data[self.etag_len + self.ct_len..]
    }
}

/// The worker's copies of messages, by id. A copy lives as long as a response uses it.
#[derive(Default)]
pub struct PayloadCache {
    copies: HashMap<MsgId, Weak<Payload>>,
    copies_made: u64,
}

impl PayloadCache {
    /// The worker's copy of `msg`, made now if no response holds one; `None` if the worker
    /// cannot allocate it (the message's size is the publisher's).
    pub fn get<A: Allocator>(&mut self, msg: &Message<A>) -> Option<Rc<Payload>> {
        if let Some(p) = self.copies.get(&msg.id).and_then(Weak::upgrade) {
            return Some(p);
        }
        let ct = msg.content_type();
        let etag = format_etag(msg.id);
        let mut data = Vec::new();
        data.try_reserve_exact(etag.len() + ct.len() + msg.body().len()).ok()?;
        data.extend_from_slice(etag.as_bytes());
        data.extend_from_slice(ct);
        data.extend_from_slice(msg.body());
        let p = Rc::new(Payload {
            id: msg.id,
            time: msg.time,
            etag_len: etag.len(),
            ct_len: ct.len(),
            data: data.into_boxed_slice(),
        });
        if self.copies.len() >= 64 && self.copies.len().is_power_of_two() {
            self.copies.retain(|_, w| w.strong_count() > 0);
        }
        self.copies.insert(msg.id, Rc::downgrade(&p));
        self.copies_made += 1;
        Some(p)
    }

    /// Copies made so far (one per message per worker while it is in use).
    pub fn copies_made(&self) -> u64 {
        self.copies_made
    }
}

/// What happens to a woken listener.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// `200` with this message.
    Deliver(Rc<Payload>),
    /// `409`: displaced by a newer listener (`last` concurrency).
    Conflict,
    /// `410`: the channel was deleted.
    Gone,
    /// `503`: the worker could not allocate its copy of the message (the listener asks again).
    Unavailable,
}

/// Where a parked listener sits, to remove it on timeout or disconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerKey {
    pub serial: u64,
    pub index: usize,
}

struct ParkedListener<H> {
    handle: H,
    since: MsgId,
    park_seq: u64,
}

struct LocalChannel<H> {
    name: Box<[u8]>,
    /// Every message up to this id has been looked at by this worker.
    seen: MsgId,
    parked: Slab<ParkedListener<H>>,
}

/// What the edge must tell the store after removing one listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    pub name: Box<[u8]>,
    pub serial: u64,
    /// `Some(seen)` when it was the worker's last listener on the channel.
    pub last: Option<MsgId>,
}

/// One worker's parked listeners.
pub struct Listeners<H> {
    channels: HashMap<u64, LocalChannel<H>>,
    pub cache: PayloadCache,
    count: usize,
}

impl<H> Default for Listeners<H> {
    fn default() -> Self {
        Listeners { channels: HashMap::new(), cache: PayloadCache::default(), count: 0 }
    }
}

impl<H: Copy> Listeners<H> {
    /// Keeps a listener the store told to park.
    pub fn park(&mut self, name: &[u8], parked: &Parked, handle: H) -> ListenerKey {
        let ch = self.channels.entry(parked.serial).or_insert_with(|| LocalChannel {
            name: name.into(),
            seen: parked.last_id,
            parked: Slab::new(),
        });
        let index = ch.parked.insert(ParkedListener {
            handle,
            since: parked.since,
            park_seq: parked.park_seq,
        });
        self.count += 1;
        ListenerKey { serial: parked.serial, index }
    }

    /// Removes a listener (timeout, disconnect); `None` if it was already answered.
    pub fn remove(&mut self, key: ListenerKey) -> Option<Removed> {
        let ch = self.channels.get_mut(&key.serial)?;
        ch.parked.try_remove(key.index)?;
        self.count -= 1;
        let last = ch.parked.is_empty().then_some(ch.seen);
        let removed = Removed { name: ch.name.clone(), serial: key.serial, last };
        if last.is_some() {
            self.channels.remove(&key.serial);
        }
        Some(removed)
    }

    /// Takes every listener out (worker shutting down). The edge answers them and tells the
    /// store with [`Listeners::remove`]-like releases, which this returns per channel.
    pub fn drain_all(&mut self) -> Vec<(Removed, u32, Vec<H>)> {
        self.count = 0;
        self.channels
            .drain()
            .map(|(serial, ch)| {
                let handles: Vec<H> = ch.parked.into_iter().map(|(_, p)| p.handle).collect();
                let removed = Removed { name: ch.name, serial, last: Some(ch.seen) };
                (removed, handles.len() as u32, handles)
            })
            .collect()
    }

    /// Serials of every channel with listeners here (for a mailbox overflow).
    pub fn serials(&self) -> Vec<u64> {
        self.channels.keys().copied().collect()
    }

    /// Listeners parked in this worker.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Looks at channel `serial` after a wake-up: every listener that can be answered is
    /// removed here and in the store's counts, and pushed to `out` with its verdict.
    pub fn wake<A: Allocator + Clone>(
        &mut self,
        store: &mut Store<A>,
        serial: u64,
        slot: u32,
        now_ms: u64,
        out: &mut Vec<(H, Verdict)>,
    ) {
        let Some(local) = self.channels.get_mut(&serial) else {
            return;
        };
        let Some(ch) = store.channel(&local.name, serial) else {
            // Deleted (or deleted and created again): every listener here gets 410.
            let n = local.parked.len();
            out.extend(local.parked.drain().map(|p| (p.handle, Verdict::Gone)));
            self.count -= n;
            self.channels.remove(&serial);
            return;
        };
        let evict_below = ch.evict_below();
        let mut answered = 0u32;
        let cache = &mut self.cache;
        // Listeners of a channel mostly wait past the same id: remember the last answer.
        let mut last: Option<(MsgId, Option<Option<Rc<Payload>>>)> = None;
        local.parked.retain(|_, p| {
            let verdict = if p.park_seq < evict_below {
                Some(Verdict::Conflict)
            } else {
                let payload = match &last {
                    Some((since, payload)) if *since == p.since => payload.clone(),
                    _ => {
                        let payload = ch.next_for(p.since, now_ms).map(|m| cache.get(m));
                        last = Some((p.since, payload.clone()));
                        payload
                    }
                };
                payload.map(|p| p.map_or(Verdict::Unavailable, Verdict::Deliver))
            };
            match verdict {
                Some(v) => {
                    out.push((p.handle, v));
                    answered += 1;
                    false
                }
                None => true,
            }
        });
        self.count -= answered as usize;
        let name = local.name.clone();
        if local.parked.is_empty() {
            let seen = local.seen;
            self.channels.remove(&serial);
            store.release(&name, serial, slot, answered, Some(seen));
        } else {
            store.release(&name, serial, slot, answered, None);
            local.seen = store.ack(&name, serial, local.seen);
        }
    }
}
