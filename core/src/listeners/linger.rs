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

use std::hash::BuildHasher;

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
    /// One channel's share of a channel-list fingerprint: its place in the list, its name,
    /// the id waited past.
    pub(super) fn part_hash(&self, i: usize, name: &[u8], since: MsgId) -> u64 {
        self.fingerprint_keys.hash_one((i, name, since))
    }

    fn fingerprint(&self, channels: &[(&[u8], MsgId)]) -> u64 {
        let parts = channels.iter().enumerate();
        parts.fold(0u64, |f, (i, &(name, id))| f.wrapping_add(self.part_hash(i, name, id)))
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
        let (len, fingerprint) = (m.parts.len(), m.fingerprint);
        if len != channels.len() || self.fingerprint(channels) != fingerprint {
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
    /// wake-up took out, waiting past `since` at position `pos`), lingers: that entry comes
    /// back waiting past `own_last`, the entries of the other channels whose messages went
    /// out (`moved`: position in its list and last id) now wait past those. `name`: channel
    /// `serial`'s name. `false` (nothing changed) when its entry cannot be found.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn linger(
        &mut self,
        index: usize,
        serial: u64,
        name: &[u8],
        since: MsgId,
        own_last: MsgId,
        park_seq: u64,
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
        let mut delta =
            self.part_hash(pos, name, own_last).wrapping_sub(self.part_hash(pos, name, since));
        for &(p, last) in moved {
            let Some(part) = self.multis.get(index).and_then(|m| m.parts.get(p)).copied() else {
                continue;
            };
            let Some(local) = self.channels.get_mut(&part.serial) else { continue };
            let Some(entry) = local.parked.get_mut(part.index) else { continue };
            let old = std::mem::replace(&mut entry.since, last);
            let name = &local.name;
            let change = self
                .fingerprint_keys
                .hash_one((p, &name[..], last))
                .wrapping_sub(self.fingerprint_keys.hash_one((p, &name[..], old)));
            delta = delta.wrapping_add(change);
        }
        let until = now_ms.saturating_add(LINGER_MS);
        self.lingered += 1;
        let lingered = self.lingered;
        let Some(m) = self.multis.get_mut(index) else { return false };
        if let Some(part) = m.parts.get_mut(pos) {
            part.index = at;
        }
        m.fingerprint = m.fingerprint.wrapping_add(delta);
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
