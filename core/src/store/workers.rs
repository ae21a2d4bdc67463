//! Worker slots: registration, mailboxes and wake-up marks.

use allocator_api2::alloc::Allocator;
use allocator_api2::vec::Vec;

use super::{Store, StoreError, WakeTarget, MAILBOX_CAP};

/// A live worker process.
pub struct WorkerSlot<A: Allocator> {
    pub id: u32,
    pub pid: i32,
    pub generation: u64,
    pub index: u32,
    pub(super) signaled: bool,
    pub(super) overflow: bool,
    pub(super) mailbox: Vec<u64, A>,
}

impl<A: Allocator + Clone> Store<A> {
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
        });
        Ok(id)
    }

    /// Removes a worker slot and every listener it counted.
    pub fn unregister_worker(&mut self, slot: u32) {
        self.workers.retain(|w| w.id != slot);
        for ch in self.channels.values_mut() {
            ch.release(slot, u32::MAX);
        }
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
