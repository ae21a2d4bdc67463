//! The store's side of `martd_persist`: every change that must outlive the zone (a stored
//! message, a channel's attributes, a removed channel, a one-to-one delivery) is appended as
//! a record ([`crate::persist`]) to a bounded journal in the zone, in the order it happens
//! under the lock. The edge's writer takes the journal out, writes it to disk, and only then
//! drops what it wrote ([`Store::journal_written`]): a writer that dies mid-way leaves it for
//! the next. Restoring replays a file's records into an empty store ([`Store::restore`]); a
//! compaction replays a file into a store of its own and writes what is left ([`Store::dump`]).

use allocator_api2::alloc::Allocator;
use allocator_api2::boxed::Box;
use allocator_api2::vec::Vec;

use super::{AttrUpdate, Store, StoreError};
use crate::msgid::MsgId;
use crate::persist::{encode, encoded_len, Record, SavedAttrs, SavedMessage, VERSION};

/// The journal in the zone.
pub struct Journal<A: Allocator> {
    buf: Vec<u8, A>,
    /// Bytes ever appended; the journal holds the last `buf.len()` of them.
    appended: u64,
    /// Bytes written to disk (and synced, per the writer's policy).
    pub durable: u64,
    /// `buf` may not grow past this: publishes are refused ([`StoreError::Behind`]).
    cap: usize,
    /// The writer's last failure, if the disk is failing (publishes are refused meanwhile).
    pub failing: bool,
    /// Records that found no room (a removal or delivery while the journal was full).
    pub lost: u64,
    /// Worker slots with publishes waiting for `durable` (see `Store::journal_wait`).
    waiting: Vec<u32, A>,
    /// A reload made a new zone, filled from the file: this one takes no more publishes.
    pub superseded: bool,
}

impl<A: Allocator + Clone> Store<A> {
    /// Turns the journal on, holding at most `cap` bytes not yet written.
    pub fn enable_journal(&mut self, cap: usize) -> Result<(), StoreError> {
        if let Some(j) = self.journal.as_mut() {
            j.cap = cap;
            return Ok(());
        }
        let j = Journal {
            buf: Vec::new_in(self.alloc.clone()),
            appended: 0,
            durable: 0,
            cap,
            failing: false,
            lost: 0,
            waiting: Vec::new_in(self.alloc.clone()),
            superseded: false,
        };
        self.journal =
            Some(Box::try_new_in(j, self.alloc.clone()).map_err(|_| StoreError::NoMemory)?);
        Ok(())
    }

    /// Turns the journal off (`martd_persist` removed by a reload).
    pub fn disable_journal(&mut self) {
        self.journal = None;
    }

    pub fn journal(&self) -> Option<&Journal<A>> {
        self.journal.as_deref()
    }

    /// Makes room for `need` more bytes, or says why a publish must be refused.
    pub(super) fn journal_room(&mut self, need: usize) -> Result<(), StoreError> {
        let Some(j) = self.journal.as_mut() else {
            return Ok(());
        };
        if j.superseded {
            return Err(StoreError::Superseded);
        }
        if j.failing {
            return Err(StoreError::DiskFailing);
        }
        if j.buf.len() + need > j.cap || j.buf.try_reserve(need).is_err() {
            return Err(StoreError::Behind);
        }
        Ok(())
    }

    /// Appends `rec` (room made by `journal_room` for the records a publish writes; other
    /// records are counted as lost when there is none).
    pub(super) fn journal_append(&mut self, rec: &Record<'_>) {
        let Some(j) = self.journal.as_mut() else {
            return;
        };
        let mut bytes = std::vec::Vec::with_capacity(encoded_len(rec));
        encode(rec, &mut bytes);
        if j.buf.try_reserve(bytes.len()).is_err() {
            j.lost += 1;
            return;
        }
        j.buf.extend_from_slice(&bytes);
        j.appended += bytes.len() as u64;
    }

    /// The journal's bytes not written yet, and the position they end at.
    pub fn journal_pending(&self) -> Option<(&[u8], u64)> {
        self.journal.as_ref().map(|j| (&j.buf[..], j.appended))
    }

    /// The writer wrote (and synced) the first `n` pending bytes: they go, and `durable`
    /// moves on. Returns the slots waiting for durability, to wake.
    pub fn journal_written(&mut self, n: usize, synced: bool) -> std::vec::Vec<u32> {
        let Some(j) = self.journal.as_mut() else {
            return std::vec::Vec::new();
        };
        let n = n.min(j.buf.len());
        j.buf.drain(..n);
        j.failing = false;
        if synced {
            j.durable = j.appended - j.buf.len() as u64;
            return j.waiting.drain(..).collect();
        }
        std::vec::Vec::new()
    }

    /// A new zone took over (see `Journal::superseded`).
    pub fn journal_supersede(&mut self) {
        if let Some(j) = self.journal.as_mut() {
            j.superseded = true;
        }
    }

    /// The zone that took over is gone (a binary upgrade given up): publishes again.
    pub fn journal_resume(&mut self) {
        if let Some(j) = self.journal.as_mut() {
            j.superseded = false;
        }
    }

    /// The writer could not write: publishes are refused until it can again.
    pub fn journal_failed(&mut self) {
        if let Some(j) = self.journal.as_mut() {
            j.failing = true;
        }
    }

    /// The position a publish just made must reach on disk before it is answered
    /// (`martd_persist ... sync=always`), with worker `slot` to be woken when it does.
    /// `None`: it is there already.
    pub fn journal_wait(&mut self, slot: u32) -> Option<u64> {
        let j = self.journal.as_mut()?;
        if j.durable >= j.appended {
            return None;
        }
        if !j.waiting.contains(&slot) && j.waiting.try_reserve(1).is_ok() {
            j.waiting.push(slot);
        }
        Some(j.appended)
    }

    /// Notes what a publish on channel `p` changed (see `publish_once`).
    pub(super) fn journal_publish(
        &mut self,
        ch: &super::Channel<A>,
        attrs_changed: bool,
        stored: Option<MsgId>,
        keep: usize,
    ) {
        if self.journal.is_none() {
            return;
        }
        if attrs_changed {
            let attrs = saved_attrs(ch);
            self.journal_append(&Record::Attrs {
                channel: &ch.name,
                channel_timeout_ms: ch.channel_timeout_ms,
                attrs,
            });
        }
        if let Some(m) = stored.and_then(|id| ch.queue.after(id - 1, 0, false).next()) {
            if m.id == stored.unwrap_or(0) {
                self.journal_append(&Record::Message(saved_message(ch, m, keep)));
            }
        }
    }

    /// Replays one record into this store (empty at first: restoring a file). Messages that
    /// expired by `now_ms` are left out. Returns whether it changed anything.
    pub fn restore(&mut self, rec: &Record<'_>, now_ms: u64) -> Result<bool, StoreError> {
        match rec {
            Record::Header { last_id, .. } => {
                self.last_id = self.last_id.max(*last_id);
                Ok(false)
            }
            Record::Attrs { channel, channel_timeout_ms, attrs } => {
                let (mut p, _) = self.get_or_create(channel, now_ms, *channel_timeout_ms)?;
                // SAFETY: a live channel of the table.
                let ch = unsafe { p.as_mut() };
                let update = AttrUpdate {
                    size: attrs.size,
                    life_ms: attrs.life_ms,
                    one2one: Some(attrs.one2one),
                    key: attrs.key,
                    use_sessions: Some(attrs.use_sessions),
                };
                ch.reserve_attrs(&update)?;
                ch.restore_attrs(attrs);
                ch.channel_timeout_ms = *channel_timeout_ms;
                self.rearm(p);
                Ok(true)
            }
            Record::Message(m) => {
                self.last_id = self.last_id.max(m.id);
                if m.expires_ms <= now_ms {
                    return Ok(false);
                }
                let (mut p, _) = self.get_or_create(m.channel, now_ms, m.channel_timeout_ms)?;
                // SAFETY: a live channel of the table.
                let ch = unsafe { p.as_mut() };
                if m.id <= ch.last_id {
                    return Ok(false);
                }
                let before = ch.queue.stored_len();
                let msg = ch.queue.restore_message(m)?;
                ch.queue.push(msg, m.keep as usize)?;
                ch.last_id = m.id;
                ch.channel_timeout_ms = m.channel_timeout_ms;
                self.recount(before, ch.queue.stored_len());
                self.rearm(p);
                Ok(true)
            }
            Record::Delete { channel } => match self.channels.find(channel) {
                Some(p) => {
                    self.remove_channel(p);
                    Ok(true)
                }
                None => Ok(false),
            },
            Record::Consume { channel, after, upto } => {
                self.consume(channel, *after, *upto);
                Ok(true)
            }
        }
    }

    /// A message another node published (its id given by the shared engine, in order):
    /// stored as `restore` would, and the workers with listeners on its channel are told
    /// (`wake`). `false`: not newer than what the channel has (a repeat), nothing changed.
    pub fn insert_remote(
        &mut self,
        m: &SavedMessage<'_>,
        now_ms: u64,
        wake: &mut std::vec::Vec<super::WakeTarget>,
    ) -> Result<bool, StoreError> {
        let inserted = self.restore(&Record::Message(m.clone()), now_ms)?;
        if inserted {
            self.stats.published += 1;
            if let Some(p) = self.channels.find(m.channel) {
                self.notify_waiters(p, wake);
            }
        }
        Ok(inserted)
    }

    /// Channel `name`'s whole attributes as a record (what other nodes restore), if it has any.
    pub fn attrs_record(&self, name: &[u8], out: &mut std::vec::Vec<u8>) -> bool {
        let Some(p) = self.channels.find(name) else { return false };
        // SAFETY: a live channel of the table, only read here.
        let ch = unsafe { p.as_ref() };
        if ch.attrs.is_none() {
            return false;
        }
        let rec = Record::Attrs {
            channel: &ch.name,
            channel_timeout_ms: ch.channel_timeout_ms,
            attrs: saved_attrs(ch),
        };
        encode(&rec, out);
        true
    }

    /// Every channel's attributes and stored messages as records, after a header with
    /// `salt` (what a compaction writes).
    pub fn dump(&self, salt: u64, now_ms: u64, out: &mut std::vec::Vec<u8>) {
        encode(&Record::Header { version: VERSION, salt, last_id: self.last_id }, out);
        self.channels.for_each(|ch| {
            if ch.is_client() {
                return;
            }
            if ch.attrs.is_some() {
                let rec = Record::Attrs {
                    channel: &ch.name,
                    channel_timeout_ms: ch.channel_timeout_ms,
                    attrs: saved_attrs(ch),
                };
                encode(&rec, out);
            }
            for m in ch.messages_after(0, now_ms, false) {
                encode(&Record::Message(saved_message(ch, m, u32::MAX as usize)), out);
            }
        });
    }
}

fn saved_attrs<A: Allocator + Clone>(ch: &super::Channel<A>) -> SavedAttrs {
    let a = ch.attrs.as_deref().copied().unwrap_or_default();
    SavedAttrs {
        size: a.size,
        life_ms: a.life_ms,
        one2one: a.one2one,
        key: a.key,
        use_sessions: a.use_sessions,
    }
}

fn saved_message<'a, A: Allocator + Clone>(
    ch: &'a super::Channel<A>,
    m: &'a crate::queue::Message<A>,
    keep: usize,
) -> SavedMessage<'a> {
    SavedMessage {
        channel: &ch.name,
        channel_timeout_ms: ch.channel_timeout_ms,
        id: m.id,
        time: m.time,
        expires_ms: m.expires_ms(),
        keep: keep.min(u32::MAX as usize) as u32,
        content_type: m.content_type(),
        event: m.event(),
        body: m.body(),
    }
}
