//! Garbage collection in bounded steps: a hierarchical timing wheel of channel deadlines.
//!
//! Every channel with something to expire (a message, or itself once idle) is linked into
//! one list of the wheel through its [`Timer`]: arming, moving and disarming are O(1) pointer
//! updates that never allocate, so no channel can lose its deadline for lack of memory. The
//! wheel has 6 levels of 64 slots; level `k` slots are `64^k` ms wide, so deadlines up to
//! 2^36 ms (2.2 years) ahead are placed exactly, and later ones are placed at that horizon and
//! placed again when they get there. A slot whose time has come is drained one channel at a
//! time: a level-0 entry is due at its exact millisecond, an entry of a higher level moves down
//! (at most once per level). [`Store::collect_garbage_step`] does at most `budget` such units
//! of work, so the edge can hold the zone lock for a bounded time and come back for more.
//!
//! A channel's timer may be earlier than its real deadline (it is only moved earlier, never
//! later, when the channel changes): it then fires, finds nothing to do yet and is placed
//! again at the real deadline.
//!
//! The same steps also finish purging a crashed worker's listener counts: a sweep over the
//! table's buckets (see `workers.rs`), a few buckets per step, only while such counts remain.

use std::ptr::NonNull;

use allocator_api2::alloc::Allocator;

use super::channel::{Channel, Link};
use super::Store;

const BITS: u32 = 6;
const SLOTS: usize = 1 << BITS;
const LEVELS: usize = 6;
/// The list of channels due already (armed at or before the wheel's time).
const PENDING: usize = LEVELS * SLOTS;
const LISTS: usize = PENDING + 1;
/// How far ahead the wheel places a deadline exactly.
const MAX_SPAN: u64 = 1 << (BITS as usize * LEVELS);

/// A channel's deadline when it has none.
pub(super) const NOT_ARMED: u64 = u64::MAX;

/// Work units a step gives to the crashed-worker sweep, out of its budget, while one runs.
const SWEEP_SHARE: usize = 2;

/// A channel's links in the wheel. The list it is in is `Channel::timer_list`.
pub(super) struct Timer<A: Allocator + Clone> {
    prev: Link<A>,
    next: Link<A>,
    /// The deadline it is armed for; [`NOT_ARMED`] when in no list.
    when: u64,
}

impl<A: Allocator + Clone> Default for Timer<A> {
    fn default() -> Self {
        Timer { prev: None, next: None, when: NOT_ARMED }
    }
}

impl<A: Allocator + Clone> Timer<A> {
    /// The deadline it is armed for ([`NOT_ARMED`]: none).
    #[cfg(test)]
    pub(super) fn when(&self) -> u64 {
        self.when
    }
}

/// The wheel: list heads and, per level, a bitmap of non-empty slots.
pub(super) struct Wheel<A: Allocator + Clone> {
    heads: [Link<A>; LISTS],
    occupied: [u64; LEVELS],
    /// The slot whose time has come and which is being emptied.
    draining: Option<usize>,
    /// The wheel's time (ms): every slot before it has been drained. Never goes back.
    elapsed: u64,
    armed: usize,
}

/// The wheel level for a deadline `when > elapsed`, `when - elapsed < MAX_SPAN`: the level
/// of the highest bit in which they differ.
fn level_for(elapsed: u64, when: u64) -> usize {
    let masked = ((elapsed ^ when) | (SLOTS as u64 - 1)).min(MAX_SPAN - 1);
    ((63 - masked.leading_zeros()) / BITS) as usize
}

/// The timer of live channel `p`. Every pointer the wheel holds is a live channel of the
/// store's table: a channel is disarmed before it is removed.
fn timer<'a, A: Allocator + Clone>(p: NonNull<Channel<A>>) -> &'a mut Channel<A> {
    // SAFETY: see above; the reference is used only within one wheel operation, during
    // which nothing else refers to that channel.
    unsafe { &mut *p.as_ptr() }
}

impl<A: Allocator + Clone> Wheel<A> {
    pub(super) fn new() -> Self {
        Wheel { heads: [None; LISTS], occupied: [0; LEVELS], draining: None, elapsed: 0, armed: 0 }
    }

    /// Channels armed.
    #[cfg(test)]
    pub(super) fn armed(&self) -> usize {
        self.armed
    }

    pub(super) fn elapsed(&self) -> u64 {
        self.elapsed
    }

    /// Lets an empty wheel jump to `now_ms`, so the first deadlines armed are placed near it.
    pub(super) fn observe(&mut self, now_ms: u64) {
        if self.armed == 0 && self.draining.is_none() {
            self.elapsed = self.elapsed.max(now_ms);
        }
    }

    fn link(&mut self, p: NonNull<Channel<A>>, list: usize) {
        let head = self.heads[list];
        let c = timer(p);
        c.timer.prev = None;
        c.timer.next = head;
        c.timer_list = list as u16;
        if let Some(h) = head {
            timer(h).timer.prev = Some(p);
        }
        self.heads[list] = Some(p);
        if list < PENDING {
            self.occupied[list / SLOTS] |= 1 << (list % SLOTS);
        }
    }

    fn unlink(&mut self, p: NonNull<Channel<A>>) {
        let c = timer(p);
        let (prev, next, list) = (c.timer.prev, c.timer.next, usize::from(c.timer_list));
        c.timer = Timer::default();
        match prev {
            Some(q) => timer(q).timer.next = next,
            None => {
                self.heads[list] = next;
                if next.is_none() && list < PENDING {
                    self.occupied[list / SLOTS] &= !(1 << (list % SLOTS));
                }
            }
        }
        if let Some(n) = next {
            timer(n).timer.prev = prev;
        }
        self.armed -= 1;
    }

    /// Arms `p` for exactly `when` ([`NOT_ARMED`]: disarms it).
    pub(super) fn schedule(&mut self, p: NonNull<Channel<A>>, when: u64) {
        if timer(p).timer.when != NOT_ARMED {
            self.unlink(p);
        }
        if when == NOT_ARMED {
            return;
        }
        let list = if when <= self.elapsed {
            PENDING
        } else {
            // Beyond the span, the last millisecond before the current top-level slot comes
            // round again: never in that slot, which may be the one being drained.
            let top_slot = 1u64 << (BITS * (LEVELS as u32 - 1));
            let horizon = (self.elapsed & !(top_slot - 1)) + (MAX_SPAN - 1);
            let placed = when.min(horizon);
            let level = level_for(self.elapsed, placed);
            level * SLOTS + ((placed >> (level as u32 * BITS)) as usize & (SLOTS - 1))
        };
        self.link(p, list);
        timer(p).timer.when = when;
        self.armed += 1;
    }

    /// Makes sure `p` fires no later than `when`.
    pub(super) fn arm_by(&mut self, p: NonNull<Channel<A>>, when: u64) {
        if when < timer(p).timer.when {
            self.schedule(p, when);
        }
    }

    pub(super) fn disarm(&mut self, p: NonNull<Channel<A>>) {
        self.schedule(p, NOT_ARMED);
    }

    /// The first non-empty slot and the time it starts (ms). The lowest non-empty level holds
    /// the earliest deadlines.
    fn next_expiration(&self) -> Option<(usize, u64)> {
        let level = self.occupied.iter().position(|&o| o != 0)?;
        let shift = level as u32 * BITS;
        let now_slot = (self.elapsed >> shift) as u32 & (SLOTS as u32 - 1);
        let slot = (self.occupied[level].rotate_right(now_slot).trailing_zeros() + now_slot)
            & (SLOTS as u32 - 1);
        Some((level * SLOTS + slot as usize, self.slot_start(level, slot as usize)))
    }

    /// When slot `slot` of level `level` comes next: in the current round of that level, or
    /// the next one for a slot behind the wheel's time (only the top level wraps that way).
    fn slot_start(&self, level: usize, slot: usize) -> u64 {
        let shift = level as u32 * BITS;
        let level_range = 1u64 << (shift + BITS);
        let start = (self.elapsed & !(level_range - 1)) + ((slot as u64) << shift);
        if start <= self.elapsed {
            start + level_range
        } else {
            start
        }
    }

    /// Walks every list: links, bitmaps and placement agree. Returns the channels linked.
    #[cfg(test)]
    pub(super) fn check(&self) -> usize {
        let mut n = 0;
        for (list, head) in self.heads.iter().enumerate() {
            if list < PENDING {
                let bit = self.occupied[list / SLOTS] & (1 << (list % SLOTS)) != 0;
                assert_eq!(head.is_some(), bit, "occupancy of list {list}");
            }
            let mut prev = None;
            let mut cur = *head;
            while let Some(p) = cur {
                // SAFETY: the wheel holds live channels only.
                let c = unsafe { p.as_ref() };
                assert_eq!(c.timer.prev, prev);
                assert_eq!(usize::from(c.timer_list), list);
                let when = c.timer.when;
                assert_ne!(when, NOT_ARMED);
                if list == PENDING {
                    assert!(when <= self.elapsed);
                } else if Some(list) != self.draining {
                    let start = self.slot_start(list / SLOTS, list % SLOTS);
                    assert!(start > self.elapsed && start <= when, "{start} {when} {list}");
                }
                n += 1;
                prev = cur;
                cur = c.timer.next;
            }
        }
        n
    }

    /// Takes out the next channel whose slot's time has come by `now_ms`, with the deadline
    /// it was armed for; `None` when nothing is due.
    pub(super) fn pop_due(&mut self, now_ms: u64) -> Option<(NonNull<Channel<A>>, u64)> {
        loop {
            let list = match (self.heads[PENDING], self.draining) {
                (Some(_), _) => PENDING,
                (None, Some(d)) if self.heads[d].is_some() => d,
                _ => match self.next_expiration() {
                    Some((list, start)) if start <= now_ms => {
                        self.elapsed = start;
                        self.draining = Some(list);
                        continue;
                    }
                    _ => {
                        self.draining = None;
                        self.elapsed = self.elapsed.max(now_ms);
                        return None;
                    }
                },
            };
            let Some(p) = self.heads[list] else {
                // Not reached: a list is drained only while it has entries.
                self.draining = None;
                continue;
            };
            let when = timer(p).timer.when;
            self.unlink(p);
            return Some((p, when));
        }
    }

    /// Whether [`Wheel::pop_due`] would return something.
    pub(super) fn has_due(&self, now_ms: u64) -> bool {
        self.heads[PENDING].is_some()
            || self.draining.is_some_and(|d| self.heads[d].is_some())
            || self.next_expiration().is_some_and(|(_, start)| start <= now_ms)
    }
}

impl<A: Allocator + Clone> Store<A> {
    /// One bounded step of garbage collection at `now_ms`: drops expired messages, removes
    /// channels idle long enough (see [`Store::publish`] and [`super::LISTENER_ONLY_GRACE_MS`]),
    /// and purges counts left by crashed workers. Does at most `budget` units of work (a
    /// channel looked at, or a bucket of the crashed-worker sweep) and returns whether more is
    /// due now. Each step is one short hold of the zone lock; the edge calls it again (after
    /// releasing the lock) while it returns `true`.
    pub fn collect_garbage_step(&mut self, now_ms: u64, budget: usize) -> bool {
        let budget = budget.max(1);
        let mut work = 0;
        if self.sweep.is_some() {
            work += self.sweep_step((budget / SWEEP_SHARE).max(1));
        }
        while work < budget {
            let Some((p, when)) = self.wheel.pop_due(now_ms) else {
                break;
            };
            work += 1;
            if when <= now_ms {
                self.fire(p, now_ms);
            } else {
                // Its slot's time has come but not its own (a coarser slot, or the clock went
                // back): place it again, never before the wheel's next millisecond.
                let at = when.max(self.wheel.elapsed() + 1);
                self.wheel.schedule(p, at);
            }
        }
        self.sweep.is_some() || self.wheel.has_due(now_ms)
    }

    /// Runs garbage-collection steps until nothing is due at `now_ms` (for tests and tools:
    /// the edge runs bounded steps). Returns the number of channels removed.
    pub fn collect_garbage(&mut self, now_ms: u64) -> usize {
        let before = self.stats.channels_removed;
        while self.collect_garbage_step(now_ms, 1024) {}
        (self.stats.channels_removed - before) as usize
    }

    /// The deadline of channel `p` has come (it is disarmed).
    fn fire(&mut self, mut p: NonNull<Channel<A>>, now_ms: u64) {
        self.purge_dead(p);
        // SAFETY: a live channel of the table; no other reference to it exists here.
        let ch = unsafe { p.as_mut() };
        let before = ch.queue.stored_len();
        ch.queue.expire(now_ms);
        self.recount(before, ch.queue.stored_len());
        if ch.is_removable(now_ms) {
            let channel = !ch.is_client();
            self.remove_channel(p);
            self.stats.channels_removed += u64::from(channel);
        } else {
            let d = ch.deadline();
            self.wheel.schedule(p, d);
        }
    }

    /// Arms channel `p` for its deadline, unless it is armed for earlier already.
    pub(super) fn rearm(&mut self, p: NonNull<Channel<A>>) {
        // SAFETY: a live channel of the table.
        let d = unsafe { p.as_ref() }.deadline();
        self.wheel.arm_by(p, d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels() {
        assert_eq!(level_for(0, 1), 0);
        assert_eq!(level_for(0, 63), 0);
        assert_eq!(level_for(0, 64), 1);
        assert_eq!(level_for(100, 127), 0);
        assert_eq!(level_for(127, 128), 1);
        assert_eq!(level_for(0, 4096), 2);
        assert_eq!(level_for(0, MAX_SPAN - 1), LEVELS - 1);
        assert_eq!(level_for(MAX_SPAN - 1, MAX_SPAN + 5), LEVELS - 1);
    }
}
