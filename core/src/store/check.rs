//! Consistency checks of the whole store, for tests.

use std::collections::HashMap;

use allocator_api2::alloc::Allocator;

use super::expiry::NOT_ARMED;
use super::Store;

impl<A: Allocator + Clone> Store<A> {
    /// Panics unless every structure agrees with every other: the table finds each channel,
    /// the wheel's lists hold exactly the armed channels and never later than their deadline,
    /// listener counts add up, and the slots' channel counts match the waiters.
    pub(super) fn check(&self) {
        let mut n = 0;
        let mut armed = 0;
        let mut per_slot: HashMap<u32, u32> = HashMap::new();
        let mut messages = 0;
        self.channels.for_each(|c| {
            n += 1;
            messages += c.queue.stored_len() as u64;
            assert_eq!(c.hash, self.channels.hash(&c.name));
            let found = self.channels.find(&c.name).expect("found by name");
            assert!(std::ptr::eq(found.as_ptr(), c), "one channel per name");
            let when = c.timer.when();
            if when != NOT_ARMED {
                armed += 1;
            }
            assert!(when <= c.deadline(), "armed at {when}, due at {}", c.deadline());
            let sum: u32 = c.waiters.iter().map(|w| w.count).sum();
            assert_eq!(sum, c.listeners, "listeners add up");
            for (i, w) in c.waiters.iter().enumerate() {
                assert!(w.count > 0);
                assert!(c.waiters[..i].iter().all(|v| v.slot != w.slot), "one waiter per slot");
                *per_slot.entry(w.slot).or_default() += 1;
            }
        });
        assert_eq!(n, self.channels.len());
        assert_eq!(messages, self.stats.messages, "the count of stored messages");
        assert_eq!(armed, self.wheel.armed());
        assert_eq!(self.wheel.check(), armed, "the wheel's lists hold the armed channels");
        for w in self.workers.iter() {
            assert_eq!(w.channels, per_slot.remove(&w.id).unwrap_or(0), "slot {}", w.id);
        }
        for d in self.dead.iter() {
            assert_eq!(d.channels, per_slot.remove(&d.id).unwrap_or(0), "dead slot {}", d.id);
            assert!(d.channels > 0);
        }
        assert!(per_slot.is_empty(), "waiters of unknown slots: {per_slot:?}");
        assert_eq!(self.sweep.is_some(), !self.dead.is_empty());
        assert_eq!(self.channels.frozen, self.sweep.is_some());
    }

    /// After garbage collection ran to the end at `now_ms`: nothing is due any more.
    pub(super) fn check_collected(&self, now_ms: u64) {
        self.channels.for_each(|c| {
            assert!(c.deadline() > now_ms, "channel {:?} due at {}", c.name, c.deadline());
        });
        assert!(self.dead.is_empty());
    }
}
