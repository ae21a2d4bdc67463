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

/// Identifies [`ZoneRoot`] as martd's.
const MAGIC: u64 = 0x6d61_7274_645f_7a32; // "martd_z2"

const fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    h
}

const fn fnv_usize(h: u64, v: usize) -> u64 {
    fnv(h, &(v as u64).to_le_bytes())
}

/// The layout of everything martd keeps in the zone: the sources that define it (hashed by
/// build.rs), the version, and the sizes and alignments of the stored types. A zone laid out
/// by another build is never read (see [`reusable`]).
pub const LAYOUT: u64 = {
    let h = fnv(0xcbf2_9ce4_8422_2325, env!("MARTD_ZONE_SOURCES").as_bytes());
    let h = fnv(h, env!("CARGO_PKG_VERSION").as_bytes());
    let h = fnv_usize(h, size_of::<ZoneRoot>());
    let h = fnv_usize(h, align_of::<ZoneRoot>());
    let h = fnv_usize(h, size_of::<Store<ShmAlloc>>());
    let h = fnv_usize(h, size_of::<martd_core::store::Channel<ShmAlloc>>());
    let h = fnv_usize(h, size_of::<martd_core::queue::Message<ShmAlloc>>());
    fnv_usize(h, size_of::<usize>())
};

/// The first thing in the zone.
pub struct ZoneRoot {
    magic: u64,
    layout: u64,
    /// Drawn when the zone is made: part of the workers' wake-up socket addresses.
    pub nonce: u64,
    /// Incremented once per configuration cycle that attaches the zone; tells worker
    /// generations apart across reloads.
    pub generation: u64,
    /// Zone-wide time of the last garbage collection (ms).
    pub last_gc_ms: u64,
    /// When the zone was made (wall-clock ms): the stats' uptime.
    pub created_ms: u64,
    /// Salts the hashes of keys and tokens: drawn with the zone, or restored with its
    /// channels from `martd_persist`'s file (their hashes stay valid).
    pub salt: u64,
    /// The worker process that writes `martd_persist`'s file (`0`: none).
    pub persister: i32,
    /// The worker process that talks to `martd_redis_url`'s Redis (`0`: none).
    pub redis_owner: i32,
    /// The master of a binary upgrade that took `martd_persist`'s file over (`0`: none).
    pub successor: i32,
    pub store: Store<ShmAlloc>,
}

impl ZoneRoot {
    fn is_ours(&self) -> bool {
        self.magic == MAGIC && self.layout == LAYOUT
    }
}

/// Whether the zone `old` (of the running configuration, reused by a reload when size and
/// tag match) was laid out by this build. Read without the lock: the magic and layout are
/// written once, before any worker starts.
pub fn reusable(old: *const ngx_shm_zone_t) -> bool {
    // SAFETY: `old` is a zone of the running cycle: mapped in the master, whose slab pool's
    // `data` is the root `init_zone` stored (or null).
    unsafe {
        let pool = (*old).shm.addr as *const ngx_slab_pool_t;
        if pool.is_null() {
            return false;
        }
        let root = (*pool).data as *const ZoneRoot;
        !root.is_null() && (*root).is_ours()
    }
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
        // Channel events noted in this hold go out in it, in order (see
        // `martd_core::store::events`); the workers they wake are woken once it is released.
        let mut wake = Vec::new();
        let nonce = self.root().nonce;
        if self.store().has_events() {
            self.store().flush_events(crate::worker::now_ms(), &mut wake);
        }
        HELD.set(false);
        // SAFETY: the mutex was taken in `lock` by this process.
        unsafe { ngx_shmtx_unlock(&mut (*self.pool.as_ptr()).mutex) };
        if !wake.is_empty() {
            crate::worker::wake_later(wake, nonce);
        }
    }
}

thread_local! {
    /// This process holds the zone lock (a `Locked` is alive).
    static HELD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this process holds the zone lock: taking it again would never return.
pub fn held() -> bool {
    HELD.get()
}

/// Locks the zone of `mcf`; `None` when martd has no zone in this configuration.
pub fn lock(mcf: &MainConf) -> Option<Locked> {
    let root = NonNull::new(mcf.root)?;
    // SAFETY: `shm_zone` is set with `root` and its `shm.addr` is the mapped slab pool,
    // which stays mapped for the worker's life.
    let pool = NonNull::new(unsafe { (*mcf.shm_zone).shm.addr } as *mut ngx_slab_pool_t)?;
    // SAFETY: the pool's mutex was initialised by nginx when it created the zone.
    unsafe { ngx_shmtx_lock(&mut (*pool.as_ptr()).mutex) };
    HELD.set(true);
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
    let mut fresh = false;
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
            let nonce = crate::notify::new_nonce();
            let root = ZoneRoot {
                magic: MAGIC,
                layout: LAYOUT,
                nonce,
                salt: nonce,
                persister: 0,
                redis_owner: 0,
                successor: 0,
                generation: 0,
                last_gc_ms: 0,
                created_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                store: Store::new_in(ShmAlloc(pool_nn)),
            };
            match Box::try_new_in(root, ShmAlloc(pool_nn)) {
                Ok(b) => {
                    fresh = true;
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
        if r.is_ours() {
            r.generation += 1;
            mcf.generation = r.generation;
            if crate::backend::persist::configure(mcf, r, fresh).is_err() {
                // SAFETY: `cycle` is live during zone init.
                let log = unsafe { (*nginx_sys::ngx_cycle).log };
                martd_log!(NGX_LOG_EMERG, log, "no memory in the \"martd\" zone for martd_persist");
            }
            if crate::backend::redis::configure(mcf, r).is_err() {
                // SAFETY: `cycle` is live during zone init.
                let log = unsafe { (*nginx_sys::ngx_cycle).log };
                martd_log!(
                    NGX_LOG_EMERG,
                    log,
                    "no memory in the \"martd\" zone for martd_redis_url"
                );
            }
            let events = crate::conf::conf_bytes(&mcf.events_channel);
            if r.store.set_events_channel((!events.is_empty()).then_some(events)).is_err() {
                // SAFETY: `cycle` is live during zone init.
                let log = unsafe { (*nginx_sys::ngx_cycle).log };
                martd_log!(
                    NGX_LOG_EMERG,
                    log,
                    "no memory in the \"martd\" zone for martd_channel_events_channel"
                );
            }
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
