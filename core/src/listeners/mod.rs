//! One worker's parked listeners, grouped by channel, and its copies of messages.
//!
//! A listener is whatever handle the edge gives (`H`: a pointer to the request context in
//! nginx, a number in tests). A listener waits on one channel, or on several at once (a
//! multi-channel listener of martd's JSON API: one entry in each of its channels, all
//! pointing at one [`MultiListener`] record that holds the handle). When the worker is woken
//! for a channel, [`Listeners::wake`] decides, under the zone lock, which of its listeners get
//! a message, a `409` or a `410`, copies each message out of the zone at most once (see
//! [`PayloadCache`]), and returns the verdicts for the edge to answer after the lock is
//! released. A multi-channel listener answered on one channel leaves its other channels in
//! the same pass, unless it may linger there for its next request (see [`linger`]). A
//! multi-channel long-poll of a channel list (`martd_channel_id_delimiter`) is the same record
//! answered with one message instead of a JSON batch (see [`first`]).

mod first;
mod linger;
mod payload;
mod wake;

pub use linger::{Revive, LINGER_MS};

pub use payload::{Payload, PayloadCache, Verdict};

// Keys are ids the zone made (channel serials, message ids), never a client's: a fast
// non-keyed hash is safe.
use rustc_hash::FxHashMap as HashMap;

use slab::Slab;

use crate::msgid::MsgId;
use crate::store::Parked;

/// [`ListenerKey::serial`] of a multi-channel listener (channel serials start at 1 and are
/// never this large).
pub const MULTI: u64 = u64::MAX;

/// Where a parked listener sits, to remove it on timeout or disconnect: a channel serial and
/// its index there, or [`MULTI`] and the index of its multi-channel record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerKey {
    pub serial: u64,
    pub index: usize,
}

/// Who a parked entry belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner<H> {
    One(H),
    /// The index of a [`MultiListener`].
    Multi(usize),
    /// A streaming subscriber: it gets every message and stays.
    Stream(H),
}

struct ParkedListener<H> {
    owner: Owner<H>,
    since: MsgId,
    park_seq: u64,
}

/// A listener waiting on several channels: its handle and its entry in each channel.
struct MultiListener<H> {
    handle: H,
    parts: Vec<ListenerKey>,
    /// The connection (`c->number`) whose next request may take this listener's entries over
    /// once it is answered (see [`linger`]); `None`: it leaves its channels when answered.
    conn: Option<u64>,
    /// With `conn`: a keyed hash of its channel names in order ([`Listeners::names_hash`])
    /// and the id it waits past on each (as its entries do).
    names: u64,
    sinces: Vec<MsgId>,
    /// Answered and lingering (`handle` is spent): the number of that lingering in this
    /// worker (see [`Listeners::lingering`]); 0: waiting.
    lingered: u64,
    /// Answered with the oldest newer message of any of its channels
    /// ([`Verdict::DeliverOn`]), not with a JSON batch (see [`first`]).
    first: bool,
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

/// Empty listener tables kept for reuse (channels come and go with their listeners; a table
/// that grew is not grown again from nothing): at most this many, of at most
/// [`SPARE_CAPACITY`] entries each.
const SPARES: usize = 256;
const SPARE_CAPACITY: usize = 64;

/// One worker's parked listeners.
pub struct Listeners<H> {
    channels: HashMap<u64, LocalChannel<H>>,
    spare: Vec<Slab<ParkedListener<H>>>,
    /// The channels of the wake-up being worked through, when `woken_known` (see
    /// [`Listeners::begin_wake`]).
    woken: rustc_hash::FxHashSet<u64>,
    woken_known: bool,
    /// See [`Listeners::begin_wake`].
    horizon: MsgId,
    multis: Slab<MultiListener<H>>,
    /// Lingering multi-channel listeners by connection, and in the order they expire
    /// (`(until, index, lingered)`; entries of listeners taken over or gone stay until then).
    by_conn: HashMap<u64, usize>,
    lingering: std::collections::VecDeque<(u64, usize, u64)>,
    lingered: u64,
    /// Keys of [`Listeners::names_hash`] (a client names its channels).
    names_keys: std::hash::RandomState,
    pub cache: PayloadCache,
    count: usize,
    /// Entries of streaming subscribers (one per channel of each), counted in `count` too.
    streams: usize,
}

impl<H> Default for Listeners<H> {
    fn default() -> Self {
        Listeners {
            channels: HashMap::default(),
            spare: Vec::new(),
            woken: Default::default(),
            woken_known: false,
            horizon: MsgId::MAX,
            multis: Slab::new(),
            by_conn: HashMap::default(),
            lingering: Default::default(),
            lingered: 0,
            names_keys: Default::default(),
            cache: PayloadCache::default(),
            count: 0,
            streams: 0,
        }
    }
}

impl<H: Copy> Listeners<H> {
    fn insert(&mut self, name: &[u8], parked: &Parked, owner: Owner<H>) -> ListenerKey {
        let spare = &mut self.spare;
        let ch = self.channels.entry(parked.serial).or_insert_with(|| LocalChannel {
            name: name.into(),
            seen: parked.last_id,
            parked: spare.pop().unwrap_or_default(),
        });
        let index = ch.parked.insert(ParkedListener {
            owner,
            since: parked.since,
            park_seq: parked.park_seq,
        });
        ListenerKey { serial: parked.serial, index }
    }

    /// Keeps a listener the store told to park.
    pub fn park(&mut self, name: &[u8], parked: &Parked, handle: H) -> ListenerKey {
        self.count += 1;
        self.insert(name, parked, Owner::One(handle))
    }

    /// Keeps a streaming subscriber the store parked (with `ListenOpts::stream`), waiting
    /// past `parked.since` (set it to the last message the caller sent it). Wake-ups give it
    /// every newer message, in order, each a [`Verdict::DeliverOn`], and leave it parked; a
    /// [`Verdict::Conflict`], [`Verdict::Gone`] or [`Verdict::Unavailable`] ends it (it has
    /// left).
    pub fn park_stream(&mut self, name: &[u8], parked: &Parked, handle: H) -> ListenerKey {
        self.count += 1;
        self.streams += 1;
        self.insert(name, parked, Owner::Stream(handle))
    }

    /// Keeps a multi-channel listener the store parked on every channel in `names` (one
    /// [`Parked`] each, in the same order). `conn`: the connection whose next request may take
    /// it over after its answer (see [`linger`]).
    pub fn park_multi<'a>(
        &mut self,
        names: impl Iterator<Item = &'a [u8]> + Clone,
        parked: &[Parked],
        handle: H,
        conn: Option<u64>,
    ) -> ListenerKey {
        self.park_multi_as(names, parked, handle, conn, false)
    }

    /// Keeps a long-poll of a channel list that the store parked on every channel in `names`
    /// (as [`Listeners::park_multi`]): a wake-up answers it with one message, the oldest newer
    /// one of any of its channels, as a [`Verdict::DeliverOn`] naming that channel. It never
    /// lingers.
    pub fn park_first<'a>(
        &mut self,
        names: impl Iterator<Item = &'a [u8]> + Clone,
        parked: &[Parked],
        handle: H,
    ) -> ListenerKey {
        self.park_multi_as(names, parked, handle, None, true)
    }

    fn park_multi_as<'a>(
        &mut self,
        names: impl Iterator<Item = &'a [u8]> + Clone,
        parked: &[Parked],
        handle: H,
        conn: Option<u64>,
        first: bool,
    ) -> ListenerKey {
        let mi = self.multis.vacant_key();
        let mut parts = Vec::with_capacity(parked.len());
        let (names_hash, sinces) = match conn {
            Some(_) => (self.names_hash(names.clone()), parked.iter().map(|p| p.since).collect()),
            None => (0, Vec::new()),
        };
        for (n, p) in names.zip(parked) {
            parts.push(self.insert(n, p, Owner::Multi(mi)));
        }
        self.multis.insert(MultiListener {
            handle,
            parts,
            conn,
            names: names_hash,
            sinces,
            lingered: 0,
            first,
        });
        self.count += 1;
        ListenerKey { serial: MULTI, index: mi }
    }

    /// Takes one entry out of its channel if it belongs to `owner`.
    fn remove_entry(&mut self, at: ListenerKey, owner: Owner<()>) -> Option<Removed> {
        let ch = self.channels.get_mut(&at.serial)?;
        let matches = match (ch.parked.get(at.index)?.owner, owner) {
            (Owner::One(_) | Owner::Stream(_), Owner::One(())) => true,
            (Owner::Multi(a), Owner::Multi(b)) => a == b,
            _ => false,
        };
        if !matches {
            return None;
        }
        if let Owner::Stream(_) = ch.parked.remove(at.index).owner {
            self.streams -= 1;
        }
        let last = ch.parked.is_empty().then_some(ch.seen);
        let removed = Removed { name: ch.name.clone(), serial: at.serial, last };
        if last.is_some() {
            self.drop_channel(at.serial);
        }
        Some(removed)
    }

    /// Forgets channel `serial` (no listener left here), keeping its table for reuse.
    fn drop_channel(&mut self, serial: u64) {
        if let Some(ch) = self.channels.remove(&serial) {
            self.keep_spare(ch.parked);
        }
    }

    fn keep_spare(&mut self, mut table: Slab<ParkedListener<H>>) {
        if self.spare.len() < SPARES && table.capacity() <= SPARE_CAPACITY {
            table.clear();
            self.spare.push(table);
        }
    }

    /// Removes a listener (timeout, disconnect); `release` gets what to tell the store for
    /// each of its channels. `false` if it was already answered.
    pub fn remove(&mut self, key: ListenerKey, mut release: impl FnMut(Removed)) -> bool {
        if key.serial == MULTI {
            let Some(m) = self.multis.try_remove(key.index) else {
                return false;
            };
            if m.lingered == 0 {
                self.count -= 1;
            } else {
                self.forget_conn(&m, key.index);
            }
            for part in m.parts {
                if let Some(r) = self.remove_entry(part, Owner::Multi(key.index)) {
                    release(r);
                }
            }
            return true;
        }
        self.remove_single(key, release)
    }

    /// Removes the single-channel listener or stream entry at `key`.
    fn remove_single(&mut self, key: ListenerKey, release: impl FnOnce(Removed)) -> bool {
        match self.remove_entry(key, Owner::One(())) {
            Some(r) => {
                self.count -= 1;
                release(r);
                true
            }
            None => false,
        }
    }

    /// Removes streaming subscriber `handle`'s entry at `key` (a subscriber of several
    /// channels has one per channel), if it is still there; `release` as for
    /// [`Listeners::remove`].
    pub fn remove_stream(
        &mut self,
        key: ListenerKey,
        handle: H,
        release: impl FnOnce(Removed),
    ) -> bool
    where
        H: PartialEq,
    {
        let ours = self
            .channels
            .get(&key.serial)
            .and_then(|c| c.parked.get(key.index))
            .is_some_and(|p| p.owner == Owner::Stream(handle));
        ours && self.remove_single(key, release)
    }

    /// Takes every listener out (worker shutting down): what to release in the store per
    /// channel (with the number of entries there), and every waiting listener's handle once.
    pub fn drain_all(&mut self) -> (Vec<(Removed, u32)>, Vec<H>) {
        self.count = 0;
        self.streams = 0;
        self.by_conn.clear();
        self.lingering.clear();
        let mut handles = Vec::new();
        let releases = self
            .channels
            .drain()
            .map(|(serial, ch)| {
                let n = ch.parked.len() as u32;
                handles.extend(ch.parked.into_iter().filter_map(|(_, p)| match p.owner {
                    Owner::One(h) | Owner::Stream(h) => Some(h),
                    Owner::Multi(_) => None,
                }));
                (Removed { name: ch.name, serial, last: Some(ch.seen) }, n)
            })
            .collect();
        handles.extend(self.multis.drain().filter(|m| m.lingered == 0).map(|m| m.handle));
        (releases, handles)
    }

    /// Serials of every channel with listeners here (for a mailbox overflow).
    pub fn serials(&self) -> Vec<u64> {
        self.channels.keys().copied().collect()
    }

    /// Listeners parked in this worker (a multi-channel listener counts once).
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Entries of streaming subscribers (a subscriber of several channels has one per
    /// channel); `len() - streams()` are the waiting long-polls.
    pub fn streams(&self) -> usize {
        self.streams
    }

    /// Entries in every channel (a multi-channel listener has one per channel).
    pub fn entries(&self) -> usize {
        self.channels.values().map(|c| c.parked.len()).sum()
    }
}
