//! Lingering multi-channel listeners.
//!
//! A multi-channel listener answered on a keep-alive connection nearly always asks again at
//! once, on the same connection, for the same channels, with the ids of the answer. Leaving
//! every channel and parking there again costs a zone lookup, a count and a table entry per
//! channel, twice. So a listener parked with a connection number (`conn`, given by the edge
//! for a detached listener of a broadcast location without a listener limit) does not leave
//! its channels when it is answered with messages of channels that are not one-to-one: its
//! entries stay, still counted in the zone, waiting past the ids it was given, for at most
//! [`LINGER_MS`]. Then:
//! - a request on that connection naming exactly those channels with exactly those ids (same
//!   order) takes the entries over without touching the zone ([`Listeners::revive`]);
//! - any other request on it, news on any of the channels (a publish, a delete, an election),
//!   the time running out ([`Listeners::lingering_due`]) or the worker's shutdown releases
//!   them as a leaving listener's.
//!
//! That is exact: while it lingers, a message published on one of its channels wakes this
//! worker (the zone counts the entry); a wake-up worked through before the request comes
//! releases it (the request then finds the message and is answered at once), one that comes
//! after finds the taken-over listener waiting past the id it sent and answers it.

use std::hash::{BuildHasher, Hasher};

use super::wake::Afterwards;
use super::{ListenerKey, Listeners, MultiListener, Owner, ParkedListener, MULTI};
use crate::msgid::MsgId;

/// How long an answered multi-channel listener lingers for its connection's next request.
pub const LINGER_MS: u64 = 1000;

/// What [`Listeners::revive`] found for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revive {
    /// The request's channels and ids are those of the lingering listener: it waits again,
    /// under this key, with the new handle. Nothing to tell the store.
    Revived(ListenerKey),
    /// A lingering listener that this request does not take over: the caller removes it
    /// ([`Listeners::remove`], under the zone lock) before handling the request.
    Stale(ListenerKey),
    /// Nothing lingers for the connection.
    Absent,
}

impl<H: Copy> Listeners<H> {
    /// A keyed hash of a list of channel names, in order.
    pub(super) fn names_hash<'a>(&self, names: impl Iterator<Item = &'a [u8]>) -> u64 {
        let mut h = self.names_keys.build_hasher();
        for n in names {
            h.write_usize(n.len());
            h.write(n);
        }
        h.finish()
    }

    /// A request on connection `conn` asks for `channels` (`(name, etag)`, in request order).
    /// `next`: the connection its listener may linger for in turn, if it is taken over.
    pub fn revive(
        &mut self,
        conn: u64,
        channels: &[(&[u8], MsgId)],
        handle: H,
        next: Option<u64>,
    ) -> Revive {
        let Some(index) = self.by_conn.remove(&conn) else {
            return Revive::Absent;
        };
        let key = ListenerKey { serial: MULTI, index };
        let Some(m) = self.multis.get(index) else {
            return Revive::Absent;
        };
        if m.lingered == 0 || m.conn != Some(conn) {
            return Revive::Absent;
        }
        let same = m.sinces.len() == channels.len()
            && m.sinces.iter().zip(channels).all(|(&since, c)| since == c.1)
            && self.names_hash(channels.iter().map(|c| c.0)) == m.names;
        if !same {
            return Revive::Stale(key);
        }
        let Some(m) = self.multis.get_mut(index) else {
            return Revive::Absent;
        };
        m.handle = handle;
        m.conn = next;
        m.lingered = 0;
        self.count += 1;
        Revive::Revived(key)
    }

    /// Lingering listeners whose time ran out (at most `max`), for the caller to remove
    /// ([`Listeners::remove`], under the zone lock). Takes no lock itself.
    pub fn lingering_due(&mut self, now_ms: u64, max: usize) -> Vec<ListenerKey> {
        let mut due = Vec::new();
        while due.len() < max {
            match self.lingering.front() {
                Some(&(until, index, lingered)) if until <= now_ms => {
                    self.lingering.pop_front();
                    if self.multis.get(index).is_some_and(|m| m.lingered == lingered) {
                        due.push(ListenerKey { serial: MULTI, index });
                    }
                }
                _ => break,
            }
        }
        due
    }

    /// Whether multi-channel listener `index` lingers.
    pub(super) fn is_lingering(&self, index: usize) -> bool {
        self.multis.get(index).is_some_and(|m| m.lingered != 0)
    }

    /// Lingering multi-channel listeners (answered, not yet taken over or released).
    pub fn lingering_len(&self) -> usize {
        self.by_conn.len()
    }

    /// Drops a lingering listener's connection from the lookup.
    pub(super) fn forget_conn(&mut self, m: &MultiListener<H>, index: usize) {
        if let Some(c) = m.conn {
            if self.by_conn.get(&c) == Some(&index) {
                self.by_conn.remove(&c);
            }
        }
    }

    /// Multi-channel listener `index`, just answered on channel `serial` (whose entry the
    /// wake-up took out), lingers: that entry comes back waiting past `own_last`, the entries
    /// of the other channels whose messages went out (`moved`: position in its list and last
    /// id) now wait past those. `false` (nothing changed) when its entry cannot be found.
    pub(super) fn linger(
        &mut self,
        index: usize,
        serial: u64,
        (own_last, park_seq): (MsgId, u64),
        moved: &[(usize, MsgId)],
        now_ms: u64,
    ) -> bool {
        let Some(m) = self.multis.get(index) else { return false };
        let (Some(conn), Some(pos)) = (m.conn, m.parts.iter().position(|p| p.serial == serial))
        else {
            return false;
        };
        let Some(local) = self.channels.get_mut(&serial) else { return false };
        let at = local.parked.insert(ParkedListener {
            owner: Owner::Multi(index),
            since: own_last,
            park_seq,
        });
        for &(p, last) in moved {
            let Some(part) = self.multis.get(index).and_then(|m| m.parts.get(p)).copied() else {
                continue;
            };
            let Some(local) = self.channels.get_mut(&part.serial) else { continue };
            if let Some(entry) = local.parked.get_mut(part.index) {
                entry.since = last;
            }
        }
        let until = now_ms.saturating_add(LINGER_MS);
        self.lingered += 1;
        let lingered = self.lingered;
        let Some(m) = self.multis.get_mut(index) else { return false };
        if let Some(part) = m.parts.get_mut(pos) {
            part.index = at;
        }
        for (p, last) in std::iter::once((pos, own_last)).chain(moved.iter().copied()) {
            if let Some(s) = m.sinces.get_mut(p) {
                *s = last;
            }
        }
        m.lingered = lingered;
        // A connection's next request takes over or releases what lingers for it first; an
        // older listener this one replaced in the lookup would still expire in time.
        self.by_conn.insert(conn, index);
        self.lingering.push_back((until, index, lingered));
        true
    }

    /// A lingering listener will not be taken over (news on channel `serial`, whose entry
    /// the wake-up took out already): its other entries leave.
    pub(super) fn release_lingering(&mut self, index: usize, serial: u64, after: &mut Afterwards) {
        let Some(m) = self.multis.try_remove(index) else { return };
        self.forget_conn(&m, index);
        for &part in m.parts.iter().filter(|p| p.serial != serial) {
            self.leave_entry(part, index, after);
        }
    }
}
