//! What the store reports to the stats: its incremental counts, the workers' counters, one
//! channel, and pages of channels by name prefix in bounded steps.

use std::ptr::NonNull;

use allocator_api2::alloc::Allocator;

use super::{Channel, Store};
use crate::queue::NoMemory;
use crate::stats::{ChannelStats, Cursor, Snapshot, WorkerCounters, WorkerStats};

/// A copy of a channel name out of the zone (its length is the client's: fallible).
fn copy_name(name: &[u8]) -> Result<Vec<u8>, NoMemory> {
    let mut v = Vec::new();
    v.try_reserve_exact(name.len()).map_err(|_| NoMemory)?;
    v.extend_from_slice(name);
    Ok(v)
}

impl<A: Allocator + Clone> Store<A> {
    /// A channel's stored messages went from `before` to `after`.
    pub(super) fn recount(&mut self, before: usize, after: usize) {
        self.stats.messages = (self.stats.messages + after as u64).saturating_sub(before as u64);
    }

    /// Worker `slot`'s counters. The record does not move or go until the slot is
    /// unregistered: its worker, their only writer, may keep the pointer until it unregisters
    /// itself (or dies, after which a new worker purges the slot).
    pub fn counters(&self, slot: u32) -> Option<NonNull<WorkerCounters>> {
        self.workers.iter().find(|w| w.id == slot).map(|w| NonNull::from(&*w.counters))
    }

    /// The zone-wide stats the store knows (the edge adds uptime, versions and zone bytes).
    /// Listeners of workers for which `alive` says no (killed, not yet replaced) are not
    /// counted; their other counts are.
    pub fn stats_snapshot(&self, now_ms: u64, alive: &dyn Fn(i32) -> bool) -> Snapshot {
        let mut totals = self.retired;
        totals.listeners = [0; 4];
        let mut workers = Vec::with_capacity(self.workers.len());
        for w in self.workers.iter() {
            let mut counts = w.counters.snapshot();
            if !alive(w.pid) {
                counts.listeners = [0; 4];
            }
            totals.add(&counts, true);
            workers.push(WorkerStats { slot: w.id, pid: w.pid, counts });
        }
        Snapshot {
            channels: self.channels.len() as u64 - self.stats.clients,
            messages: self.stats.messages,
            published: self.stats.published,
            published_per_second: self.rate.per_second(now_ms / 1000).to_vec(),
            channels_created: self.stats.channels_created,
            channels_removed: self.stats.channels_removed,
            alloc_failures: self.stats.out_of_memory,
            totals,
            workers,
            ..Snapshot::default()
        }
    }

    fn channel_stats_of(&self, ch: &Channel<A>, now_ms: u64) -> Result<ChannelStats, NoMemory> {
        let info = ch.info(now_ms, self.live_listeners(ch));
        let a = ch.attrs.as_deref();
        Ok(ChannelStats {
            name: copy_name(&ch.name)?,
            messages: info.messages as u64,
            listeners: u64::from(info.listeners),
            last_id: ch.last_id,
            requested: info.requested,
            size: a.and_then(|a| a.size),
            life_ms: a.and_then(|a| a.life_ms),
            one2one: a.is_some_and(|a| a.one2one),
        })
    }

    /// Channel `name`'s stats, if it exists.
    pub fn channel_stats(
        &self,
        name: &[u8],
        now_ms: u64,
    ) -> Result<Option<ChannelStats>, NoMemory> {
        // SAFETY: a live channel of the table, only read here.
        let Some(ch) = self.channels.find(name).map(|p| unsafe { p.as_ref() }) else {
            return Ok(None);
        };
        self.channel_stats_of(ch, now_ms).map(Some)
    }

    /// Lists, from `cursor` on, the channels whose name starts with `prefix`: at most `room`
    /// of them are pushed onto `out`, and no more than `budget` buckets and channels are
    /// looked at (`room` and `budget` at least 1: each call makes progress). Returns where the
    /// listing goes on (`None`: the table is done).
    ///
    /// The listing walks the table's buckets in order; a channel created or removed meanwhile
    /// may be listed or not, and one moved by the table growing or shrinking between two
    /// calls may be listed twice or missed.
    pub fn list_channels(
        &self,
        prefix: &[u8],
        cursor: Cursor,
        room: usize,
        budget: usize,
        now_ms: u64,
        out: &mut Vec<ChannelStats>,
    ) -> Result<Option<Cursor>, NoMemory> {
        let (mut bucket, mut skip) = (cursor.bucket, cursor.skip);
        let (mut work, mut added, budget) = (0, 0, budget.max(1));
        while bucket < self.channels.bucket_count() {
            let mut link = self.channels.bucket(bucket);
            let mut i = 0;
            while let Some(p) = link {
                // SAFETY: a live channel of the table, only read here.
                let ch = unsafe { p.as_ref() };
                link = ch.chain;
                if i >= skip {
                    if added == room || work >= budget {
                        return Ok(Some(Cursor { bucket, skip: i }));
                    }
                    if ch.name.starts_with(prefix) && !ch.is_client() {
                        out.try_reserve(1).map_err(|_| NoMemory)?;
                        out.push(self.channel_stats_of(ch, now_ms)?);
                        added += 1;
                    }
                    // Entries skipped again are not counted: every call makes progress.
                    work += 1;
                }
                i += 1;
            }
            work += 1;
            bucket += 1;
            skip = 0;
            if (added == room || work >= budget) && bucket < self.channels.bucket_count() {
                return Ok(Some(Cursor { bucket, skip: 0 }));
            }
        }
        Ok(None)
    }
}
