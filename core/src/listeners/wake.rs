//! A wake-up: a worker looks at one channel after a publish, a delete, a displacement or a
//! one-to-one election, and answers every listener it can.

// Keys are ids the zone made (channel serials, message ids), never a client's: a fast
// non-keyed hash is safe.
use rustc_hash::FxHashMap as HashMap;
use std::rc::Rc;

use allocator_api2::alloc::Allocator;

use super::first::{self, multi_due, FirstPass};
use super::{ListenerKey, Listeners, Owner, ParkedListener, Payload, Verdict};
use crate::json;
use crate::msgid::MsgId;
use crate::store::{Channel, Store, WakeTarget};

/// A multi-channel listener answered on the channel being looked at.
struct Triggered {
    index: usize,
    since: MsgId,
    park_seq: u64,
    conflict: bool,
}

/// One channel's part of multi-channel replies, by `(serial, since)`: the JSON fragment and
/// the id of its last message; `None` when nothing is newer.
type Fragments = HashMap<(u64, MsgId), Option<(Rc<[u8]>, MsgId)>>;

/// Entries of one worker gone from a channel: its name, how many, and `Some(seen)` when none
/// is left here.
type Release = (Box<[u8]>, u32, Option<MsgId>);

/// What the store must be told after a pass, collected while the channels are borrowed.
#[derive(Default)]
pub(super) struct Afterwards {
    /// Per channel serial.
    releases: HashMap<u64, Release>,
    /// One-to-one deliveries: `(name, after, upto)`.
    pub(super) consumed: Vec<(Box<[u8]>, MsgId, MsgId)>,
}

impl Afterwards {
    fn apply<A: Allocator + Clone>(self, store: &mut Store<A>, slot: u32) {
        for (serial, (name, n, last)) in self.releases {
            store.release(&name, serial, slot, n, last);
        }
        for (name, after, upto) in self.consumed {
            store.consume(&name, after, upto);
        }
    }
}

/// Every message of `ch` after `since` up to `horizon`, as this worker's copies (`None`: one
/// could not be copied).
fn stream_run<A: Allocator + Clone>(
    ch: &Channel<A>,
    mut since: MsgId,
    horizon: MsgId,
    now_ms: u64,
    cache: &mut super::PayloadCache,
) -> Option<Vec<Rc<Payload>>> {
    let mut run = Vec::new();
    while let Some(m) = ch.next_for(since, now_ms).filter(|m| m.id <= horizon) {
        run.push(cache.get(m)?);
        since = m.id;
    }
    Some(run)
}

fn fragment<A: Allocator + Clone>(
    ch: &Channel<A>,
    since: MsgId,
    now_ms: u64,
) -> Option<(Rc<[u8]>, MsgId)> {
    let (f, last) = ch.json_fragment(since, now_ms, true)?;
    // No memory for it: an empty fragment, `Verdict::Unavailable` (see `batch_verdict`).
    Some((f.unwrap_or_default().into(), last))
}

impl<H: Copy> Listeners<H> {
    /// A wake-up for these channels starts: while it is worked through, a multi-channel
    /// listener answered on one of them looks for news only on those of its channels that are
    /// among them. That is exact: a message published to a channel after a listener parked
    /// there is in the wake-up that follows the publish; one published before it parked was
    /// answered when it came; one published after this wake-up was taken comes with the next
    /// (and the listener, answered now with that channel's old id, asks for it again).
    ///
    /// `horizon`: the zone's last message id when the mailbox was taken. Streaming
    /// subscribers get messages up to it only: a later one comes with the wake-up its publish
    /// asks for, so that a subscriber of several channels gets every message of this pass
    /// before any later one (the caller writes each subscriber's messages in id order), and
    /// its last id is one to resume all its channels from.
    pub fn begin_wake(&mut self, serials: &[u64], horizon: MsgId) {
        self.woken.clear();
        self.woken.extend(serials.iter().copied());
        self.woken_known = true;
        self.horizon = horizon;
    }

    /// Whether channel `serial` may have news for a multi-channel listener in the wake-up
    /// being worked through (see [`Listeners::begin_wake`]).
    pub(super) fn woken(&self, serial: u64) -> bool {
        !self.woken_known || self.woken.contains(&serial)
    }

    /// The wake-up is worked through: multi-channel listeners look at all their channels
    /// again (as when nothing was said, see [`Listeners::begin_wake`]).
    pub fn end_wake(&mut self) {
        self.woken.clear();
        self.woken_known = false;
        self.horizon = MsgId::MAX;
    }

    /// Looks at channel `serial` after a wake-up: every listener that can be answered is
    /// removed here and in the store's counts, and pushed to `out` with its verdict. `wake`
    /// gets the workers to wake again (a one-to-one election was decided).
    pub fn wake<A: Allocator + Clone>(
        &mut self,
        store: &mut Store<A>,
        serial: u64,
        slot: u32,
        now_ms: u64,
        out: &mut Vec<(H, Verdict)>,
        wake: &mut Vec<WakeTarget>,
    ) {
        let Some(local) = self.channels.get(&serial) else {
            return;
        };
        let name = local.name.clone();
        if store.channel(&name, serial).is_none() {
            self.wake_deleted(store, serial, slot, out);
            return;
        }
        self.report_election(store, &name, serial, wake);
        let Some(ch) = store.channel(&name, serial) else {
            return;
        };
        let mut after = Afterwards::default();
        let (answered, triggered) = self.answer_singles(ch, serial, now_ms, out, &mut after);
        let mut fragments = Fragments::default();
        let mut firsts = FirstPass::default();
        let mut bodies: HashMap<*const u8, Rc<[u8]>> = HashMap::default();
        let one2one = ch.one2one();
        // Entries that stay counted here: lingering listeners' (see `linger`).
        let mut kept = 0u32;
        for t in &triggered {
            if self.is_lingering(t.index) {
                // News for a lingering listener: it will not be taken over.
                self.release_lingering(t.index, serial, &mut after);
                continue;
            }
            let Some(m) = self.multis.get(t.index) else {
                continue;
            };
            let consumed = after.consumed.len();
            let mut moved = Vec::new();
            let mut own_last = None;
            let verdict = if t.conflict {
                Verdict::Conflict
            } else if m.first {
                let found = self.oldest_for(store, &m.parts, (ch, t.since), now_ms, &mut firsts);
                first::verdict(found, &mut firsts, &mut self.cache, &mut after)
            } else {
                let own = fragments
                    .entry((serial, t.since))
                    .or_insert_with(|| fragment(ch, t.since, now_ms));
                let own = own.clone();
                own_last = own.as_ref().map(|o| o.1);
                self.batch_verdict(
                    store,
                    &m.parts,
                    serial,
                    own,
                    now_ms,
                    (&mut fragments, &mut bodies),
                    &mut after,
                    &mut moved,
                )
            };
            let handle = m.handle;
            let may_linger = m.conn.is_some()
                && !one2one
                && after.consumed.len() == consumed
                && matches!(verdict, Verdict::Batch(_));
            self.count -= 1;
            let lingers = match own_last {
                Some(last) if may_linger => {
                    self.linger(t.index, serial, (last, t.park_seq), &moved, now_ms)
                }
                _ => false,
            };
            if lingers {
                kept += 1;
            } else if let Some(m) = self.multis.try_remove(t.index) {
                for &part in m.parts.iter().filter(|p| p.serial != serial) {
                    self.leave_entry(part, t.index, &mut after);
                }
            }
            out.push((handle, verdict));
        }
        let gone = answered + triggered.len() as u32 - kept;
        if one2one {
            for (&(s, since), f) in &fragments {
                if let (true, Some((_, last))) = (s == serial, f) {
                    after.consumed.push((name.clone(), since, *last));
                }
            }
        }
        self.settle(store, &name, serial, slot, gone, after);
    }

    /// The single-channel listeners of `serial` are answered; multi-channel ones with
    /// something to get (or displaced) are returned for the caller to answer.
    fn answer_singles<A: Allocator + Clone>(
        &mut self,
        ch: &Channel<A>,
        serial: u64,
        now_ms: u64,
        out: &mut Vec<(H, Verdict)>,
        after: &mut Afterwards,
    ) -> (u32, Vec<Triggered>) {
        let mut triggered = Vec::new();
        let Some(local) = self.channels.get_mut(&serial) else {
            return (0, triggered);
        };
        let mut answered = 0u32;
        let cache = &mut self.cache;
        let one2one = ch.one2one();
        // Listeners of a channel mostly wait past the same id: remember the last answer.
        let mut last: Option<(MsgId, Option<Option<Rc<Payload>>>)> = None;
        // The same for streaming subscribers: every message after an id (`None`: one could
        // not be copied).
        let mut last_run: Option<(MsgId, Option<Vec<Rc<Payload>>>)> = None;
        let horizon = self.horizon;
        let mut channel: Option<Rc<[u8]>> = None;
        let multis = &self.multis;
        let mut streams_gone = 0;
        local.parked.retain(|_, p| {
            let conflict = ch.evicts(p.park_seq);
            if let Owner::Stream(h) = p.owner {
                let run = match &last_run {
                    _ if conflict => None,
                    Some((since, run)) if *since == p.since => run.clone(),
                    _ => {
                        let run = stream_run(ch, p.since, horizon, now_ms, cache);
                        last_run = Some((p.since, run.clone()));
                        run
                    }
                };
                let Some(run) = run else {
                    out.push((h, if conflict { Verdict::Conflict } else { Verdict::Unavailable }));
                    answered += 1;
                    streams_gone += 1;
                    return false;
                };
                for msg in run {
                    if one2one {
                        after.consumed.push((ch.name().into(), p.since, msg.id));
                    }
                    p.since = msg.id;
                    let name = channel.get_or_insert_with(|| ch.name().into()).clone();
                    out.push((h, Verdict::DeliverOn(msg, name)));
                }
                return true;
            }
            if let Owner::Multi(index) = p.owner {
                if conflict || multi_due(multis.get(index), horizon, ch, p.since, now_ms) {
                    let (since, park_seq) = (p.since, p.park_seq);
                    triggered.push(Triggered { index, since, park_seq, conflict });
                    return false;
                }
                return true;
            }
            let verdict = if conflict {
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
            let (Owner::One(h), Some(v)) = (p.owner, verdict) else {
                return true;
            };
            if let (true, Verdict::Deliver(msg)) = (one2one, &v) {
                after.consumed.push((ch.name().into(), p.since, msg.id));
            }
            out.push((h, v));
            answered += 1;
            false
        });
        self.count -= answered as usize;
        self.streams -= streams_gone;
        (answered, triggered)
    }

    /// The reply of a multi-channel listener answered on channel `serial` (its fragment
    /// `own`): every one of its channels with something newer. `moved` gets, for each other
    /// channel in the reply, its place in `parts` and the last id sent.
    #[allow(clippy::too_many_arguments)]
    fn batch_verdict<A: Allocator + Clone>(
        &self,
        store: &Store<A>,
        parts: &[ListenerKey],
        serial: u64,
        own: Option<(Rc<[u8]>, MsgId)>,
        now_ms: u64,
        (fragments, bodies): (&mut Fragments, &mut HashMap<*const u8, Rc<[u8]>>),
        after: &mut Afterwards,
        moved: &mut Vec<(usize, MsgId)>,
    ) -> Verdict {
        // The channel woken is usually the only one with news: no list is made for it. Only
        // channels of the wake-up being worked through can have news (see `begin_wake`).
        let mut others: Vec<Rc<[u8]>> = Vec::new();
        let candidates = parts.iter().enumerate();
        for (pos, part) in candidates.filter(|(_, p)| p.serial != serial && self.woken(p.serial)) {
            let Some(local) = self.channels.get(&part.serial) else { continue };
            let Some(entry) = local.parked.get(part.index) else { continue };
            let since = entry.since;
            let f = fragments.entry((part.serial, since)).or_insert_with(|| {
                store.channel(&local.name, part.serial).and_then(|c| fragment(c, since, now_ms))
            });
            if let Some((frag, last)) = f {
                others.push(frag.clone());
                moved.push((pos, *last));
                if store.channel(&local.name, part.serial).is_some_and(|c| c.one2one()) {
                    after.consumed.push((local.name.clone(), since, *last));
                }
            }
        }
        let own = own.map(|(f, _)| f);
        if own.iter().chain(&others).any(|f| f.is_empty()) {
            return Verdict::Unavailable;
        }
        let only = match (&own, others.len()) {
            (Some(f), 0) => Some(f.clone()),
            (None, 1) => others.first().cloned(),
            _ => None,
        };
        if let Some(b) = only.as_ref().and_then(|f| bodies.get(&f.as_ptr())) {
            return Verdict::Batch(b.clone());
        }
        let Some(body) = json::batch(own.iter().chain(&others).map(|f| &f[..])) else {
            return Verdict::Unavailable;
        };
        let body: Rc<[u8]> = body.into();
        if let Some(f) = only {
            bodies.insert(f.as_ptr(), body.clone());
        }
        Verdict::Batch(body)
    }

    /// Tells the store what the pass changed: `gone` entries left channel `serial`, and
    /// whatever `after` collected.
    fn settle<A: Allocator + Clone>(
        &mut self,
        store: &mut Store<A>,
        name: &[u8],
        serial: u64,
        slot: u32,
        gone: u32,
        after: Afterwards,
    ) {
        match self.channels.get_mut(&serial) {
            Some(local) if !local.parked.is_empty() => {
                store.release(name, serial, slot, gone, None);
                local.seen = store.ack(name, serial, slot, local.seen, self.horizon);
            }
            Some(local) => {
                let seen = local.seen;
                self.drop_channel(serial);
                store.release(name, serial, slot, gone, Some(seen));
            }
            None => {}
        }
        after.apply(store, slot);
    }

    /// Channel `serial` was deleted (or deleted and created again): every listener here gets
    /// `410`, and multi-channel ones leave their other channels.
    fn wake_deleted<A: Allocator + Clone>(
        &mut self,
        store: &mut Store<A>,
        serial: u64,
        slot: u32,
        out: &mut Vec<(H, Verdict)>,
    ) {
        let Some(local) = self.channels.remove(&serial) else {
            return;
        };
        let name: Rc<[u8]> = local.name[..].into();
        let mut after = Afterwards::default();
        for (_, p) in local.parked {
            match p.owner {
                Owner::One(h) | Owner::Stream(h) => {
                    self.count -= 1;
                    self.streams -= usize::from(matches!(p.owner, Owner::Stream(_)));
                    out.push((h, Verdict::Gone));
                }
                Owner::Multi(index) if self.is_lingering(index) => {
                    self.release_lingering(index, serial, &mut after);
                }
                Owner::Multi(index) => {
                    let Some(m) = self.multis.try_remove(index) else { continue };
                    self.count -= 1;
                    for &part in m.parts.iter().filter(|p| p.serial != serial) {
                        self.leave_entry(part, index, &mut after);
                    }
                    out.push((m.handle, Verdict::GoneChannel(name.clone())));
                }
            }
        }
        after.apply(store, slot);
    }

    /// Takes multi-channel listener `index`'s entry `at` out of its channel, counting it in
    /// `after` (the channel's name is copied once per pass, not once per entry).
    pub(super) fn leave_entry(&mut self, at: ListenerKey, index: usize, after: &mut Afterwards) {
        let Some(ch) = self.channels.get_mut(&at.serial) else { return };
        match ch.parked.get(at.index) {
            Some(ParkedListener { owner: Owner::Multi(i), .. }) if *i == index => {}
            _ => return,
        }
        ch.parked.remove(at.index);
        let e = after.releases.entry(at.serial).or_insert_with(|| (ch.name.clone(), 0, None));
        e.1 += 1;
        if ch.parked.is_empty() {
            e.2 = Some(ch.seen);
            self.drop_channel(at.serial);
        }
    }

    /// One-to-one was switched on while listeners waited on channel `serial`: report this
    /// worker's longest-waiting listener there to the store's election.
    fn report_election<A: Allocator + Clone>(
        &self,
        store: &mut Store<A>,
        name: &[u8],
        serial: u64,
        wake: &mut Vec<WakeTarget>,
    ) {
        let Some(local) = self.channels.get(&serial) else { return };
        let Some(ch) = store.channel(name, serial) else { return };
        let Some((cut, best)) = ch.election() else { return };
        let below = ch.evict_below();
        let seqs = local.parked.iter().map(|(_, p)| p.park_seq);
        let min = seqs.filter(|&s| s <= cut && s >= below).min();
        if let Some(m) = min.filter(|&m| m < best) {
            store.elect(name, serial, m, wake);
        }
    }
}
