//! Worker slots: registration, mailboxes and wake-up marks, and the removal of the listener
//! counts a crashed worker left behind.
//!
//! Each slot counts the channels it has listeners on. A worker that leaves gracefully has
//! released all of them first, so unregistering it costs nothing more. A crashed worker's slot
//! (purged by [`Store::register_worker`]) still has counts: it becomes a *dead* slot, whose
//! counts go when a channel is touched (publish, listen, release, its garbage-collection
//! deadline), and a sweep over the table, a few buckets per garbage-collection step, removes
//! the rest in bounded time. It stops as soon as the dead slots' channel counts reach zero.

use std::ptr::NonNull;

use allocator_api2::alloc::Allocator;
use allocator_api2::boxed::Box;
use allocator_api2::vec::Vec;

use super::channel::Channel;
use super::{Store, StoreError, WakeTarget, MAILBOX_CAP};
use crate::msgid::MsgId;
use crate::stats::WorkerCounters;

/// A live worker process.
pub struct WorkerSlot<A: Allocator> {
    pub id: u32,
    pub pid: i32,
    pub generation: u64,
    pub index: u32,
    pub(super) signaled: bool,
    pub(super) overflow: bool,
    pub(super) mailbox: Vec<u64, A>,
    /// Channels with listeners of this slot.
    pub(super) channels: u32,
    /// Its stats, written by the worker itself (see [`Store::counters`]).
    pub(super) counters: Box<WorkerCounters, A>,
}

/// A slot that is gone while channels still count its listeners.
#[derive(Debug, Clone, Copy)]
pub(super) struct DeadSlot {
    pub(super) id: u32,
    /// Channels still counting listeners of it.
    pub(super) channels: u32,
}

impl<A: Allocator + Clone> Store<A> {
    /// `n` listeners of `slot` on channel incarnation `serial` are gone (answered, timed
    /// out, or disconnected). When the worker has no listener left there (`last`), it also
    /// stops holding back transient messages published after `seen`. A channel that was
    /// never published to goes soon after its last listener (see [`LISTENER_ONLY_GRACE_MS`]).
    pub fn release(&mut self, name: &[u8], serial: u64, slot: u32, n: u32, last: Option<MsgId>) {
        let Some(mut p) = self.live_channel(name, serial) else {
            return;
        };
        // SAFETY: a live channel of the table; the reference ends before the calls below.
        let ch = unsafe { p.as_mut() };
        let before = ch.listeners;
        let left = ch.release(slot, n);
        if let Some(seen) = last {
            ch.queue.ack_transient_after(seen);
        }
        let after = ch.listeners;
        if left {
            self.slot_left(slot);
        }
        if after < before {
            self.note_event(super::ChannelEvent::ListenerLeft, name, after);
        }
        self.rearm(p);
    }

    /// Worker `slot`, which keeps listeners on the channel, has looked at every message up to
    /// `upto` (after `seen`, what it had looked at before). Returns what it has seen now:
    /// `upto`, or the channel's last id if smaller.
    pub fn ack(&mut self, name: &[u8], serial: u64, slot: u32, seen: MsgId, upto: MsgId) -> MsgId {
        let Some(mut p) = self.live_channel(name, serial) else {
            return seen;
        };
        // SAFETY: a live channel of the table.
        let ch = unsafe { p.as_mut() };
        let upto = upto.min(ch.last_id).max(seen);
        if upto > seen {
            ch.queue.ack_transient_between(seen, upto);
        }
        if let Some(w) = ch.waiters.iter_mut().find(|w| w.slot == slot) {
            w.seen = w.seen.max(upto);
        }
        self.rearm(p);
        upto
    }

    /// Takes a worker's mailbox: the channel serials to look at, and whether it overflowed
    /// (then every channel with listeners in that worker must be looked at).
    pub fn take_mailbox(&mut self, slot: u32, out: &mut std::vec::Vec<u64>) -> bool {
        let Some(w) = self.workers.iter_mut().find(|w| w.id == slot) else {
            return false;
        };
        w.signaled = false;
        out.extend(w.mailbox.drain(..));
        std::mem::replace(&mut w.overflow, false)
    }

    /// Forgets that a slot was signalled: its pipe could not be written (a worker of another
    /// configuration generation, during a reload), so the next publisher must try again.
    pub fn clear_signal(&mut self, slot: u32) {
        if let Some(w) = self.workers.iter_mut().find(|w| w.id == slot) {
            w.signaled = false;
        }
    }

    /// Whether a slot's mailbox holds something nobody signalled it about (see
    /// [`Store::clear_signal`]). A signalled slot's pipe already carries the wake-up.
    pub fn has_unsignalled_mail(&self, slot: u32) -> bool {
        self.workers
            .iter()
            .any(|w| w.id == slot && !w.signaled && (w.overflow || !w.mailbox.is_empty()))
    }

    /// Registers a starting worker process. Slots of processes that are gone (`alive`
    /// says no) and the slot this process replaces (same generation and worker number, as
    /// after a crash and respawn) are purged first, with their listener counts.
    pub fn register_worker(
        &mut self,
        pid: i32,
        generation: u64,
        index: u32,
        alive: &dyn Fn(i32) -> bool,
    ) -> Result<u32, StoreError> {
        let stale: std::vec::Vec<u32> = self
            .workers
            .iter()
            .filter(|w| (w.generation == generation && w.index == index) || !alive(w.pid))
            .map(|w| w.id)
            .collect();
        for slot in stale {
            self.unregister_worker(slot);
        }
        self.workers.try_reserve(1).map_err(|_| StoreError::NoMemory)?;
        let counters = Box::try_new_in(WorkerCounters::default(), self.alloc.clone())
            .map_err(|_| StoreError::NoMemory)?;
        // Room for every live slot to become a dead one: unregistering never allocates.
        let dead_room = self.workers.len() + 1;
        self.dead.try_reserve(dead_room).map_err(|_| StoreError::NoMemory)?;
        let id = self.next_slot;
        self.next_slot = self.next_slot.wrapping_add(1).max(1);
        self.workers.push(WorkerSlot {
            id,
            pid,
            generation,
            index,
            signaled: false,
            overflow: false,
            mailbox: Vec::new_in(self.alloc.clone()),
            channels: 0,
            counters,
        });
        Ok(id)
    }

    /// Removes a worker slot. A worker that released its listeners first (a graceful exit)
    /// leaves nothing behind; otherwise its counts go lazily (see the module's note), and
    /// [`Store::info`] and [`Store::total_listeners`] leave them out meanwhile.
    pub fn unregister_worker(&mut self, slot: u32) {
        let Some(pos) = self.workers.iter().position(|w| w.id == slot) else {
            return;
        };
        let w = self.workers.swap_remove(pos);
        // Its cumulative counts stay in the zone's totals; its listeners are gone.
        self.retired.add(&w.counters.snapshot(), false);
        if w.channels == 0 {
            return;
        }
        // `register_worker` reserved room for this, so this never allocates.
        if self.dead.try_reserve(1).is_ok() {
            self.dead.push(DeadSlot { id: slot, channels: w.channels });
            self.start_sweep();
        } else {
            // Never reached; should it be, no count may stay that nobody tracks.
            for i in 0..self.channels.bucket_count() {
                let mut cur = self.channels.bucket(i);
                while let Some(mut p) = cur {
                    // SAFETY: a live channel of the table, not unlinked here.
                    let ch = unsafe { p.as_mut() };
                    cur = ch.chain;
                    ch.release(slot, u32::MAX);
                    self.rearm(p);
                }
            }
        }
    }

    /// Whether listeners of `slot` are counted although it is gone.
    pub(super) fn is_dead(&self, slot: u32) -> bool {
        self.dead.iter().any(|d| d.id == slot)
    }

    /// Whether `slot` is a registered worker's (only those have listeners counted).
    pub(super) fn is_registered(&self, slot: u32) -> bool {
        self.workers.iter().any(|w| w.id == slot)
    }

    /// Registered `slot` has listeners on one more channel.
    pub(super) fn slot_joined(&mut self, slot: u32) {
        if let Some(w) = self.workers.iter_mut().find(|w| w.id == slot) {
            w.channels += 1;
        }
    }

    /// `slot` has no listener left on one channel.
    pub(super) fn slot_left(&mut self, slot: u32) {
        if let Some(w) = self.workers.iter_mut().find(|w| w.id == slot) {
            w.channels = w.channels.saturating_sub(1);
        } else if let Some(pos) = self.dead.iter().position(|d| d.id == slot) {
            let d = &mut self.dead[pos];
            d.channels = d.channels.saturating_sub(1);
            if d.channels == 0 {
                self.dead.swap_remove(pos);
                if self.dead.is_empty() {
                    self.stop_sweep();
                }
            }
        }
    }

    /// Drops the counts of dead slots from channel `p`.
    pub(super) fn purge_dead(&mut self, mut p: NonNull<Channel<A>>) {
        while !self.dead.is_empty() {
            // SAFETY: a live channel of the table; the reference ends before `slot_left`.
            let ch = unsafe { p.as_mut() };
            let Some(w) = ch.waiters.iter().find(|w| self.dead.iter().any(|d| d.id == w.slot))
            else {
                return;
            };
            let slot = w.slot;
            let before = ch.listeners;
            ch.release(slot, u32::MAX);
            let after = ch.listeners;
            self.slot_left(slot);
            if after < before {
                // SAFETY: as above; the name is copied before the event is noted.
                let name = unsafe { p.as_ref() }.name.to_vec();
                self.note_event(super::ChannelEvent::ListenerLeft, &name, after);
            }
        }
    }

    fn start_sweep(&mut self) {
        self.sweep = Some(0);
        self.channels.frozen = true;
    }

    fn stop_sweep(&mut self) {
        self.sweep = None;
        self.channels.frozen = false;
    }

    /// Purges dead slots' counts from up to `budget` buckets and channels; returns the work
    /// done. Buckets are never merged during a sweep (a merge could move an unvisited chain
    /// into a visited bucket); a split only moves a chain to a bucket at the end.
    pub(super) fn sweep_step(&mut self, budget: usize) -> usize {
        let Some(mut i) = self.sweep else {
            return 0;
        };
        let mut work = 0;
        while work < budget && !self.dead.is_empty() {
            if i >= self.channels.bucket_count() {
                // Every channel was looked at since the last slot died: nothing can be left.
                debug_assert!(self.dead.is_empty(), "dead slots left: {:?}", self.dead);
                self.dead.clear();
                break;
            }
            let mut cur = self.channels.bucket(i);
            work += 1;
            while let Some(p) = cur {
                // SAFETY: a live channel of the table; purging and arming never unlink it.
                cur = unsafe { p.as_ref() }.chain;
                self.purge_dead(p);
                self.rearm(p);
                work += 1;
            }
            i += 1;
        }
        if self.dead.is_empty() {
            self.stop_sweep();
        } else {
            self.sweep = Some(i);
        }
        work
    }
}

/// Puts channel `serial` in worker `slot`'s mailbox, and names the worker in `wake` unless it
/// has been signalled already and not yet looked.
pub(super) fn notify<A: Allocator>(
    workers: &mut [WorkerSlot<A>],
    slot: u32,
    serial: u64,
    wake: &mut std::vec::Vec<WakeTarget>,
) {
    let Some(w) = workers.iter_mut().find(|w| w.id == slot) else {
        return;
    };

    if !w.overflow && !w.mailbox.contains(&serial) {
        if w.mailbox.len() < MAILBOX_CAP && w.mailbox.try_reserve(1).is_ok() {
            w.mailbox.push(serial);
        } else {
            w.overflow = true;
        }
    }
    if !w.signaled {
        w.signaled = true;
        wake.push(WakeTarget { slot: w.id, pid: w.pid, generation: w.generation, index: w.index });
    }
}
