//! A growable array of plain values kept in fixed-size pages.
//!
//! Growing it allocates one page and never moves what is stored, so no call ever copies the
//! whole array (a plain `Vec` of a million buckets would copy megabytes under the zone lock
//! when it doubles). Pages are 4 KB: one nginx slab page (or one slab chunk on systems with
//! bigger pages), so no run of contiguous free pages is ever needed.

use std::alloc::Layout;
use std::marker::PhantomData;
use std::ptr::NonNull;

use allocator_api2::alloc::Allocator;
use allocator_api2::vec::Vec;

use crate::queue::NoMemory;

/// Bytes per page.
pub(super) const PAGE_BYTES: usize = 4096;

pub(super) struct PagedVec<T: Copy, A: Allocator + Clone> {
    pages: Vec<NonNull<T>, A>,
    len: usize,
    _values: PhantomData<T>,
}

impl<T: Copy, A: Allocator + Clone> PagedVec<T, A> {
    /// Values per page.
    pub(super) const PER_PAGE: usize = PAGE_BYTES / size_of::<T>();

    pub(super) fn new_in(alloc: A) -> Self {
        PagedVec { pages: Vec::new_in(alloc), len: 0, _values: PhantomData }
    }

    /// One page: `PER_PAGE` values (at most `PAGE_BYTES`, which always fits a `Layout`).
    const PAGE_LAYOUT: Layout =
        match Layout::from_size_align(Self::PER_PAGE * size_of::<T>(), align_of::<T>()) {
            Ok(l) => l,
            Err(_) => panic!("a page fits in memory"),
        };

    fn page_layout() -> Layout {
        Self::PAGE_LAYOUT
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn capacity(&self) -> usize {
        self.pages.len() * Self::PER_PAGE
    }

    /// Makes room for `total` values, one page at a time; on failure nothing stored changes
    /// (pages already added stay, they are used later).
    pub(super) fn reserve_total(&mut self, total: usize) -> Result<(), NoMemory> {
        while self.capacity() < total {
            self.pages.try_reserve(1).map_err(|_| NoMemory)?;
            let page =
                self.pages.allocator().allocate(Self::page_layout()).map_err(|_| NoMemory)?;
            self.pages.push(page.cast());
        }
        Ok(())
    }

    /// Appends `v`; fails only if a new page is needed and cannot be had.
    pub(super) fn push(&mut self, v: T) -> Result<(), NoMemory> {
        self.reserve_total(self.len + 1)?;
        self.len += 1;
        self.set(self.len - 1, v);
        Ok(())
    }

    pub(super) fn pop(&mut self) -> Option<T> {
        let v = self.len.checked_sub(1).map(|i| self.get(i))?;
        self.len -= 1;
        Some(v)
    }

    fn slot(&self, i: usize) -> *mut T {
        assert!(i < self.len, "index {i} out of {}", self.len);
        let page = self.pages[i / Self::PER_PAGE];
        // SAFETY: `i < len <= capacity`, so the page exists and the offset is inside it.
        unsafe { page.as_ptr().add(i % Self::PER_PAGE) }
    }

    pub(super) fn get(&self, i: usize) -> T {
        // SAFETY: every index below `len` was written by `push` or `set`.
        unsafe { self.slot(i).read() }
    }

    pub(super) fn set(&mut self, i: usize, v: T) {
        // SAFETY: the slot is inside an allocated page (see `slot`), and `T: Copy` has no
        // destructor to run on the old value.
        unsafe { self.slot(i).write(v) }
    }

    /// Gives back pages beyond what `keep` values need, keeping one spare page so that a
    /// size going up and down around a page boundary does not allocate each time.
    pub(super) fn shrink_to(&mut self, keep: usize) {
        let keep = keep.max(self.len);
        let needed = keep.div_ceil(Self::PER_PAGE) + 1;
        while self.pages.len() > needed {
            let Some(page) = self.pages.pop() else { break };
            // SAFETY: the page was allocated in `reserve_total` with this layout.
            unsafe { self.pages.allocator().deallocate(page.cast(), Self::page_layout()) };
        }
    }
}

impl<T: Copy, A: Allocator + Clone> Drop for PagedVec<T, A> {
    fn drop(&mut self) {
        self.len = 0;
        self.shrink_to(0);
        if let Some(page) = self.pages.pop() {
            // SAFETY: as in `shrink_to`.
            unsafe { self.pages.allocator().deallocate(page.cast(), Self::page_layout()) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use allocator_api2::alloc::Global;

    #[test]
    fn grows_by_pages_and_gives_them_back() {
        let mut v: PagedVec<u64, Global> = PagedVec::new_in(Global);
        assert_eq!(v.capacity(), 0);
        let n = PagedVec::<u64, Global>::PER_PAGE * 3 + 5;
        for i in 0..n {
            v.push(i as u64 * 3).unwrap();
        }
        assert_eq!(v.capacity(), PagedVec::<u64, Global>::PER_PAGE * 4);
        assert!((0..n).all(|i| v.get(i) == i as u64 * 3));
        v.set(7, 1);
        assert_eq!(v.get(7), 1);
        for _ in 0..n - 2 {
            v.pop();
        }
        v.shrink_to(0);
        assert_eq!(v.capacity(), PagedVec::<u64, Global>::PER_PAGE * 2, "one spare page");
        assert_eq!((v.len(), v.get(1)), (2, 3));
    }
}
