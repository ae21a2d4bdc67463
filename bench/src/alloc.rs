//! Allocators for the in-process scenarios: one that counts bytes the way nginx's slab
//! allocator would take them, and one that works like it (power-of-two chunks carved from
//! 4 KB pages, kept on free lists: allocation and release are O(1), nothing is ever
//! consolidated).

use std::alloc::Layout;
use std::cell::RefCell;
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use martd_core::{AllocError, Allocator, Global};

/// nginx's page size on x86-64 Linux; slab chunks go up to half a page.
pub const PAGE: usize = 4096;

/// What `ngx_slab_alloc_locked` takes for a request (the zone's allocator asks for
/// `max(size, align)`): a power-of-two chunk of at least 8 bytes up to half a page, whole
/// pages above.
pub fn slab_size(layout: Layout) -> usize {
    let size = layout.size().max(layout.align());
    if size > PAGE / 2 {
        size.div_ceil(PAGE) * PAGE
    } else {
        size.next_power_of_two().max(8)
    }
}

/// Counts slab-rounded bytes in use. A pointer wide, like the zone's allocator.
#[derive(Clone, Copy)]
pub struct SlabCount(pub &'static AtomicUsize);

unsafe impl Allocator for SlabCount {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        self.0.fetch_add(slab_size(layout), Relaxed);
        Global.allocate(layout)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        self.0.fetch_sub(slab_size(layout), Relaxed);
        // SAFETY: allocated by `Global` with this layout in `allocate`.
        unsafe { Global.deallocate(ptr, layout) }
    }
}

/// Address space the slab-like allocator takes its pages from, like a zone that is mapped
/// once.
const ARENA: usize = 64 << 30;

struct Pools {
    /// Free chunks of each power of two from 8 B to one page, each holding the next.
    free: [Option<NonNull<u8>>; 10],
    /// The mapping, the next page never used, and the mapping's end.
    base: *mut u8,
    next: *mut u8,
    end: *mut u8,
}

impl Drop for Pools {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `SlabSim::new`; every clone of the allocator, so every
        // allocation from it, is gone.
        unsafe { libc::munmap(self.base.cast(), ARENA) };
    }
}

/// Works like nginx's slab pool (one process, so no lock): chunks of each power of two from
/// 8 B to one page, carved from 4 KB pages of one reserved mapping and kept on intrusive free
/// lists, so that taking and giving back a chunk is O(1) and nothing ever grows, copies or is
/// consolidated. Requests over a page go to the global allocator (whole pages in nginx, found
/// on its free page list). The pages go back to the system when the last clone is dropped.
#[derive(Clone)]
pub struct SlabSim(Rc<RefCell<Pools>>);

impl SlabSim {
    /// A pool whose first `prefault` bytes are touched already (as a zone's pages are, once
    /// it has been in use): first touches of fresh memory cost up to milliseconds on a virtual
    /// machine, which is the machine's time, not the store's.
    pub fn new(prefault: usize) -> Result<SlabSim, String> {
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ARENA,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(format!("mmap of {ARENA} bytes: {}", std::io::Error::last_os_error()));
        }
        let next = base as *mut u8;
        // SAFETY: the end of the mapping just made; the pages touched are inside it.
        let end = unsafe { next.add(ARENA) };
        for off in (0..prefault.min(ARENA)).step_by(PAGE) {
            // SAFETY: as above.
            unsafe { next.add(off).write_volatile(0) };
        }
        Ok(SlabSim(Rc::new(RefCell::new(Pools { free: [None; 10], base: next, next, end }))))
    }
}

fn class(size: usize) -> usize {
    (size.next_power_of_two().max(8).trailing_zeros() - 3) as usize
}

unsafe impl Allocator for SlabSim {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        let size = layout.size().max(layout.align());
        if size > PAGE {
            return Global.allocate(layout);
        }
        let c = class(size);
        let mut pools = self.0.borrow_mut();
        if pools.free[c].is_none() {
            if pools.next == pools.end {
                return Err(AllocError);
            }
            let page = pools.next;
            // SAFETY: `next` is page-aligned inside the arena, `end` a page boundary.
            pools.next = unsafe { page.add(PAGE) };
            for off in (0..PAGE).step_by(8 << c) {
                // SAFETY: `off` is inside the page; a free chunk holds the next free one.
                unsafe {
                    let chunk = NonNull::new_unchecked(page.add(off));
                    chunk.cast::<Option<NonNull<u8>>>().write(pools.free[c]);
                    pools.free[c] = Some(chunk);
                }
            }
        }
        let p = pools.free[c].ok_or(AllocError)?;
        // SAFETY: a free chunk starts with the link to the next.
        pools.free[c] = unsafe { p.cast::<Option<NonNull<u8>>>().read() };
        Ok(NonNull::slice_from_raw_parts(p, 8 << c))
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        let size = layout.size().max(layout.align());
        if size > PAGE {
            // SAFETY: allocated by `Global` with this layout.
            return unsafe { Global.deallocate(ptr, layout) };
        }
        let c = class(size);
        let mut pools = self.0.borrow_mut();
        // SAFETY: the chunk is ours again and at least 8 bytes, aligned to its size.
        unsafe { ptr.cast::<Option<NonNull<u8>>>().write(pools.free[c]) };
        pools.free[c] = Some(ptr);
    }
}

/// Grows the process's heap by `bytes`, touched, and keeps it (no trimming, no separate
/// mappings for blocks up to 32 MB), so that later allocations of the global allocator reuse
/// faulted-in memory.
pub fn prefault_heap(bytes: usize) {
    const BLOCK: usize = 16 << 20;
    // SAFETY: glibc's tunables, then blocks allocated, touched and freed.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        let blocks: Vec<*mut u8> = (0..bytes / BLOCK)
            .map(|_| {
                let p = libc::malloc(BLOCK) as *mut u8;
                if !p.is_null() {
                    for off in (0..BLOCK).step_by(PAGE) {
                        p.add(off).write_volatile(0);
                    }
                }
                p
            })
            .collect();
        for p in blocks {
            libc::free(p as *mut libc::c_void);
        }
    }
}
