//! The `martd` shared zone: its slab allocator, its root, and the lock around the store.
//!
//! Everything in the zone is reached under the slab pool's own `ngx_shmtx` mutex. That is
//! deliberate: when a worker dies holding it, nginx's master force-unlocks it (a home-made
//! spinlock would stay locked forever). All allocations inside use the `_locked` slab calls.

use std::alloc::Layout;
use std::ffi::c_void;
use std::ptr::{self, NonNull};

use martd_core::allocator_api2::alloc::{AllocError, Allocator};
use martd_core::allocator_api2::boxed::Box;
use nginx_sys::{
    ngx_int_t, ngx_shm_zone_t, ngx_shmtx_lock, ngx_shmtx_unlock, ngx_slab_alloc_locked,
    ngx_slab_free_locked, ngx_slab_pool_t, NGX_ERROR, NGX_LOG_EMERG, NGX_OK,
};

use martd_core::store::Store;

use crate::conf::MainConf;

/// The slab pool as an allocator. Valid only while the pool mutex is held, which the only
/// way to reach the store ([`lock`]) guarantees.
#[derive(Clone, Copy)]
pub struct ShmAlloc(NonNull<ngx_slab_pool_t>);

// SAFETY: `allocate` returns memory from the slab pool that stays valid until `deallocate`;
// slab chunks are powers of two aligned to their size (pages to the page size), so asking
// for `max(size, align)` bytes satisfies the layout's alignment.
unsafe impl Allocator for ShmAlloc {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        let size = layout.size().max(layout.align());
        // SAFETY: the pool is the zone's, and the caller holds its mutex (see `lock`).
        let p = unsafe { ngx_slab_alloc_locked(self.0.as_ptr(), size) } as *mut u8;
        NonNull::new(p).map(|p| NonNull::slice_from_raw_parts(p, size)).ok_or(AllocError)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, _layout: Layout) {
        // SAFETY: `ptr` came from `allocate` on the same pool; the mutex is held.
        unsafe { ngx_slab_free_locked(self.0.as_ptr(), ptr.as_ptr() as *mut c_void) }
    }
}

/// Identifies the layout of [`ZoneRoot`]: a zone reused across a reload must have been laid
/// out by the same build.
const MAGIC: u64 = 0x6d61_7274_645f_7a31; // "martd_z1"
const BUILD: &str = concat!(env!("CARGO_PKG_VERSION"), "/root-v1");

/// The first thing in the zone.
pub struct ZoneRoot {
    magic: u64,
    build: [u8; 32],
    /// Incremented once per configuration cycle that attaches the zone; tells worker
    /// generations apart across reloads.
    pub generation: u64,
    /// Zone-wide time of the last garbage collection (ms).
    pub last_gc_ms: u64,
    pub store: Store<ShmAlloc>,
}

fn build_id() -> [u8; 32] {
    let mut b = [0u8; 32];
    let n = BUILD.len().min(32);
    b[..n].copy_from_slice(&BUILD.as_bytes()[..n]);
    b
}

/// The store, locked. Unlocks on drop.
pub struct Locked {
    pool: NonNull<ngx_slab_pool_t>,
    root: NonNull<ZoneRoot>,
}

impl Locked {
    pub fn root(&mut self) -> &mut ZoneRoot {
        // SAFETY: the zone mutex is held for the guard's life, so no other process touches
        // the root; the root was allocated in `init_zone` and is never freed.
        unsafe { self.root.as_mut() }
    }

    pub fn store(&mut self) -> &mut Store<ShmAlloc> {
        &mut self.root().store
    }
}

impl Drop for Locked {
    fn drop(&mut self) {
        // SAFETY: the mutex was taken in `lock` by this process.
        unsafe { ngx_shmtx_unlock(&mut (*self.pool.as_ptr()).mutex) }
    }
}

/// Locks the zone of `mcf`; `None` when martd has no zone in this configuration.
pub fn lock(mcf: &MainConf) -> Option<Locked> {
    let root = NonNull::new(mcf.root)?;
    // SAFETY: `shm_zone` is set with `root` and its `shm.addr` is the mapped slab pool,
    // which stays mapped for the worker's life.
    let pool = NonNull::new(unsafe { (*mcf.shm_zone).shm.addr } as *mut ngx_slab_pool_t)?;
    // SAFETY: the pool's mutex was initialised by nginx when it created the zone.
    unsafe { ngx_shmtx_lock(&mut (*pool.as_ptr()).mutex) };
    Some(Locked { pool, root })
}

/// nginx's zone init callback: the master, once per configuration cycle.
///
/// * Reload with the zone reused (`data` is the old cycle's main conf): keep the old root,
///   after checking it was laid out by this build.
/// * Otherwise a fresh zone: allocate the root in it.
pub unsafe extern "C" fn init_zone(shm_zone: *mut ngx_shm_zone_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: nginx passes the zone it created in `postconfiguration`, whose `data` we set
    // to this cycle's main conf; `shm.addr` is the slab pool nginx initialised.
    let (mcf, pool) = unsafe {
        (&mut *((*shm_zone).data as *mut MainConf), (*shm_zone).shm.addr as *mut ngx_slab_pool_t)
    };
    let Some(pool_nn) = NonNull::new(pool) else {
        return NGX_ERROR as ngx_int_t;
    };
    // SAFETY: the pool is mapped; the mutex is initialised by nginx.
    unsafe { ngx_shmtx_lock(&mut (*pool).mutex) };
    let root = if !data.is_null() {
        // SAFETY: `data` is the previous cycle's main conf, alive during this call.
        let old = unsafe { &*(data as *const MainConf) };
        old.root
    } else {
        // SAFETY: as above.
        let existing = unsafe { (*pool).data } as *mut ZoneRoot;
        // SAFETY: `shm.exists` is only set on Windows, where the zone survives the master.
        if unsafe { (*shm_zone).shm.exists } != 0 && !existing.is_null() {
            existing
        } else {
            let root = ZoneRoot {
                magic: MAGIC,
                build: build_id(),
                generation: 0,
                last_gc_ms: 0,
                store: Store::new_in(ShmAlloc(pool_nn)),
            };
            match Box::try_new_in(root, ShmAlloc(pool_nn)) {
                Ok(b) => {
                    let (p, _) = Box::into_raw_with_allocator(b);
                    // SAFETY: the pool header is ours to annotate; nginx reads `log_ctx` when
                    // it logs slab errors and `log_nomem` to decide whether to.
                    unsafe {
                        (*pool).data = p as *mut c_void;
                        (*pool).set_log_nomem(0);
                        let ctx = b" in martd zone \"martd\"\0";
                        let dst = ngx_slab_alloc_locked(pool, ctx.len()) as *mut u8;
                        if !dst.is_null() {
                            ptr::copy_nonoverlapping(ctx.as_ptr(), dst, ctx.len());
                            (*pool).log_ctx = dst;
                        }
                    }
                    p
                }
                Err(_) => ptr::null_mut(),
            }
        }
    };
    let ok = !root.is_null() && {
        // SAFETY: `root` points at a ZoneRoot in the zone (just made, or kept from before).
        let r = unsafe { &mut *root };
        if r.magic == MAGIC && r.build == build_id() {
            r.generation += 1;
            mcf.generation = r.generation;
            true
        } else {
            false
        }
    };
    // SAFETY: locked above.
    unsafe { ngx_shmtx_unlock(&mut (*pool).mutex) };
    if !ok {
        // SAFETY: `cycle` is live during zone init.
        let log = unsafe { (*nginx_sys::ngx_cycle).log };
        martd_log!(
            NGX_LOG_EMERG,
            log,
            "the \"martd\" zone was made by another build of martd; restart nginx (a reload keeps the zone)"
        );
        return NGX_ERROR as ngx_int_t;
    }
    mcf.root = root;
    NGX_OK as ngx_int_t
}
