//! The channels by name: a linear-hashing table (Litwin) of chained buckets.
//!
//! Each channel is its own allocation and carries its name, its hash and the link to the next
//! channel of its bucket. The table grows and shrinks one bucket at a time (splitting or
//! merging one chain), so no call ever rehashes the whole table, and the bucket array is a
//! [`PagedVec`], so it never copies itself either: every operation costs a few chain links
//! whatever the number of channels.

use std::hash::{BuildHasher, RandomState};
use std::ptr::NonNull;

use allocator_api2::alloc::Allocator;
use allocator_api2::boxed::Box;

use super::channel::{Channel, Link};
use super::paged::PagedVec;
use crate::queue::NoMemory;

pub(super) struct ChannelTable<A: Allocator + Clone> {
    buckets: PagedVec<Link<A>, A>,
    /// `2^level`: addresses use the hash's low `level` bits, or `level + 1` bits for buckets
    /// below `split`, which have been split already in this round.
    base: usize,
    split: usize,
    len: usize,
    hasher: RandomState,
    alloc: A,
    /// While set, buckets are not merged (a sweep walks the buckets by index).
    pub(super) frozen: bool,
}

/// # Safety of the links
/// Every `NonNull<Channel<A>>` in the table came from `Box::into_raw` in `insert` and stays
/// valid until `remove` or drop. The store only ever turns such a pointer into a reference for
/// the span of one operation on that channel.
impl<A: Allocator + Clone> ChannelTable<A> {
    pub(super) fn new_in(alloc: A) -> Self {
        ChannelTable {
            buckets: PagedVec::new_in(alloc.clone()),
            base: 1,
            split: 0,
            len: 0,
            hasher: RandomState::new(),
            alloc,
            frozen: false,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn hash(&self, name: &[u8]) -> u64 {
        self.hasher.hash_one(name)
    }

    fn bucket_of(&self, hash: u64) -> usize {
        let h = hash as usize;
        let i = h & (self.base - 1);
        if i < self.split {
            h & ((self.base << 1) - 1)
        } else {
            i
        }
    }

    pub(super) fn bucket_count(&self) -> usize {
        self.buckets.len()
    }

    /// The first channel of bucket `i`.
    pub(super) fn bucket(&self, i: usize) -> Link<A> {
        self.buckets.get(i)
    }

    pub(super) fn find(&self, name: &[u8]) -> Option<NonNull<Channel<A>>> {
        if self.len == 0 {
            return None;
        }
        let hash = self.hash(name);
        let mut cur = self.buckets.get(self.bucket_of(hash));
        while let Some(p) = cur {
            // SAFETY: a live channel of the table (see the impl's note).
            let c = unsafe { p.as_ref() };
            if c.hash == hash && c.name.as_slice() == name {
                return Some(p);
            }
            cur = c.chain;
        }
        None
    }

    /// Moves `ch` into zone memory and links it in. Fails, with nothing changed, if memory
    /// runs out.
    pub(super) fn insert(&mut self, ch: Channel<A>) -> Result<NonNull<Channel<A>>, NoMemory> {
        if self.buckets.len() == 0 {
            self.buckets.push(None)?;
        }
        let b = Box::try_new_in(ch, self.alloc.clone()).map_err(|_| NoMemory)?;
        let (raw, _) = Box::into_raw_with_allocator(b);
        // SAFETY: `Box::into_raw_with_allocator` never returns null.
        let mut p = unsafe { NonNull::new_unchecked(raw) };
        // SAFETY: just allocated, not linked anywhere yet.
        let c = unsafe { p.as_mut() };
        let i = self.bucket_of(c.hash);
        c.chain = self.buckets.get(i);
        self.buckets.set(i, Some(p));
        self.len += 1;
        self.grow();
        Ok(p)
    }

    /// Unlinks `p` and gives the channel back (dropping it frees its memory).
    pub(super) fn remove(&mut self, p: NonNull<Channel<A>>) -> Channel<A> {
        // SAFETY: `p` is a live channel of the table.
        let (hash, next) = unsafe { (p.as_ref().hash, p.as_ref().chain) };
        let i = self.bucket_of(hash);
        let mut prev: Link<A> = None;
        let mut cur = self.buckets.get(i);
        while let Some(mut c) = cur {
            if c == p {
                match prev {
                    None => self.buckets.set(i, next),
                    // SAFETY: another live channel of the same bucket.
                    Some(mut q) => unsafe { q.as_mut().chain = next },
                }
                self.len -= 1;
                // Two merges per removal: the buckets catch up with a falling count.
                self.shrink();
                self.shrink();
                // SAFETY: allocated by `insert` with this allocator, now linked nowhere.
                let b = unsafe { Box::from_raw_in(p.as_ptr(), self.alloc.clone()) };
                return Box::into_inner(b);
            }
            prev = cur;
            // SAFETY: as above.
            cur = unsafe { c.as_mut().chain };
        }
        unreachable!("a channel of the table is in its bucket");
    }

    /// One split when the table holds more channels than buckets. If the bucket array cannot
    /// grow, chains just get longer.
    fn grow(&mut self) {
        if self.len <= self.buckets.len() || self.buckets.push(None).is_err() {
            return;
        }
        let from = self.split;
        let to = self.base + self.split;
        let mask = (self.base << 1) - 1;
        let (mut keep, mut moved): (Link<A>, Link<A>) = (None, None);
        let mut cur = self.buckets.get(from);
        while let Some(mut p) = cur {
            // SAFETY: a live channel of bucket `from`, relinked into one of two chains.
            let c = unsafe { p.as_mut() };
            cur = c.chain;
            if c.hash as usize & mask == to {
                c.chain = moved;
                moved = Some(p);
            } else {
                c.chain = keep;
                keep = Some(p);
            }
        }
        self.buckets.set(from, keep);
        self.buckets.set(to, moved);
        self.split += 1;
        if self.split == self.base {
            self.base <<= 1;
            self.split = 0;
        }
    }

    /// One merge when the table holds fewer channels than half its buckets.
    fn shrink(&mut self) {
        if self.frozen || self.buckets.len() <= 1 || self.len * 2 >= self.buckets.len() {
            return;
        }
        if self.split == 0 {
            self.base >>= 1;
            self.split = self.base;
        }
        self.split -= 1;
        let into = self.split;
        if let Some(Some(head)) = self.buckets.pop() {
            let mut tail = head;
            // SAFETY: live channels of the bucket being merged.
            unsafe {
                while let Some(next) = tail.as_ref().chain {
                    tail = next;
                }
                tail.as_mut().chain = self.buckets.get(into);
            }
            self.buckets.set(into, Some(head));
        }
        self.buckets.shrink_to(0);
    }

    /// Calls `f` on every channel.
    pub(super) fn for_each(&self, mut f: impl FnMut(&Channel<A>)) {
        for i in 0..self.buckets.len() {
            let mut cur = self.buckets.get(i);
            while let Some(p) = cur {
                // SAFETY: a live channel of the table.
                let c = unsafe { p.as_ref() };
                f(c);
                cur = c.chain;
            }
        }
    }
}

impl<A: Allocator + Clone> Drop for ChannelTable<A> {
    fn drop(&mut self) {
        for i in 0..self.buckets.len() {
            let mut cur = self.buckets.get(i);
            while let Some(p) = cur {
                // SAFETY: every channel is in exactly one chain; each is freed once, after
                // its link was read.
                unsafe {
                    cur = p.as_ref().chain;
                    drop(Box::from_raw_in(p.as_ptr(), self.alloc.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use allocator_api2::alloc::Global;
    use allocator_api2::vec::Vec;

    fn channel(t: &ChannelTable<Global>, name: &[u8]) -> Channel<Global> {
        let mut n = Vec::new_in(Global);
        n.extend_from_slice(name);
        Channel::new(n, t.hash(name), 0, 0, 0)
    }

    #[test]
    fn grows_and_shrinks_one_bucket_at_a_time() {
        let mut t = ChannelTable::new_in(Global);
        let mut ptrs = std::vec::Vec::new();
        for i in 0..2000u32 {
            let name = i.to_string();
            ptrs.push(t.insert(channel(&t, name.as_bytes())).unwrap());
            assert!(t.bucket_count() >= t.len() && t.bucket_count() <= t.len() + 1);
        }
        for i in 0..2000u32 {
            assert_eq!(t.find(i.to_string().as_bytes()), Some(ptrs[i as usize]));
        }
        assert_eq!(t.find(b"nope"), None);
        let mut n = 0;
        t.for_each(|_| n += 1);
        assert_eq!(n, 2000);
        for (i, p) in ptrs.iter().enumerate().skip(10) {
            let ch = t.remove(*p);
            assert_eq!(ch.name.as_slice(), i.to_string().as_bytes());
        }
        assert_eq!(t.len(), 10);
        assert!(t.bucket_count() <= 21, "{} buckets for 10 channels", t.bucket_count());
        for i in 0..10u32 {
            assert_eq!(t.find(i.to_string().as_bytes()), Some(ptrs[i as usize]));
        }
        // The rest is freed by the table's drop (checked for leaks by Miri).
    }
}
