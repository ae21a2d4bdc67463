//! Cross-worker wake-ups.
//!
//! A listener parked in worker B must be answered when worker A publishes. Shared memory
//! alone cannot wake a process sleeping in `epoll_wait`, so every worker gets a pipe:
//!
//! 1. The master creates one non-blocking pipe per worker number in `init_module`, before
//!    the workers fork, for each configuration cycle. The pipes belong to the cycle's pool,
//!    so a reload makes new ones and the old ones close when the old cycle goes.
//! 2. Each worker adds the read end of the pipe of its own number (`ngx_worker`) to its event
//!    loop (see `worker::init_process`). A respawned worker gets the same number, hence the
//!    same pipe.
//! 3. A publisher appends the channel to the mailbox of every worker slot that has listeners
//!    on it (in the zone, under the lock), and for each slot not yet signalled writes one byte
//!    to that worker's pipe after unlocking. Bursts of publishes thus cost one byte and one
//!    wake-up per worker, not per message.
//! 4. The woken worker drains its pipe, takes its mailbox, and answers its listeners.
//!
//! Workers of another generation (the old ones during a reload) are not written to: they
//! answer their listeners with `304` as soon as they start shutting down.

use std::ffi::{c_int, c_void};
use std::ptr;

use nginx_sys::{
    ngx_core_conf_t, ngx_core_module, ngx_cycle_t, ngx_http_conf_ctx_t, ngx_http_module, ngx_int_t,
    ngx_pool_cleanup_add, NGX_ERROR, NGX_LOG_EMERG, NGX_OK,
};

use crate::conf::MainConf;

/// One pipe per worker number: `[read, write]`.
pub struct Pipes {
    fds: Vec<[c_int; 2]>,
}

impl Pipes {
    /// The read end for worker number `index`.
    pub fn read_fd(&self, index: usize) -> Option<c_int> {
        self.fds.get(index).map(|p| p[0])
    }

    /// Wakes worker number `index`. A full pipe already holds a pending wake-up, so
    /// `EAGAIN` is fine.
    pub fn signal(&self, index: usize) {
        if let Some(p) = self.fds.get(index) {
            let b = [1u8];
            // SAFETY: writing one byte from a live buffer to a descriptor this cycle owns.
            let _ = unsafe { libc::write(p[1], b.as_ptr() as *const c_void, 1) };
        }
    }

    /// Reads everything pending on `fd` (a non-blocking pipe read end).
    pub fn drain(fd: c_int) {
        let mut buf = [0u8; 256];
        loop {
            // SAFETY: reading into a live local buffer of the given size.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut c_void, buf.len()) };
            if n < buf.len() as isize {
                break;
            }
        }
    }
}

impl Drop for Pipes {
    fn drop(&mut self) {
        for p in &self.fds {
            // SAFETY: closing descriptors this structure created and nothing else closes.
            unsafe {
                libc::close(p[0]);
                libc::close(p[1]);
            }
        }
    }
}

extern "C" fn drop_pipes(data: *mut c_void) {
    // SAFETY: `data` is the `Pipes` written by `init_module`, dropped exactly once, here,
    // when the cycle pool is destroyed.
    unsafe { ptr::drop_in_place(data as *mut Pipes) }
}

/// This cycle's martd main conf, if the http block uses martd.
pub fn main_conf(cycle: *const ngx_cycle_t) -> Option<&'static mut MainConf> {
    // SAFETY: `conf_ctx` is indexed by module index; the http entry, when present, is the
    // http block's `ngx_http_conf_ctx_t`, whose main confs are indexed by ctx_index.
    unsafe {
        let ctx = *(*cycle).conf_ctx.add(ngx_http_module.index) as *mut ngx_http_conf_ctx_t;
        if ctx.is_null() {
            return None;
        }
        let mcf = *(*ctx).main_conf.add(crate::module().ctx_index) as *mut MainConf;
        mcf.as_mut().filter(|m| m.used)
    }
}

/// `init_module`: creates this cycle's pipes.
pub fn init_module(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    let Some(mcf) = main_conf(cycle) else {
        return NGX_OK as ngx_int_t;
    };
    // SAFETY: the core module's conf is always present in a cycle.
    let workers = unsafe {
        let ccf = *(*cycle).conf_ctx.add(ngx_core_module.index) as *const ngx_core_conf_t;
        (*ccf).worker_processes.max(1) as usize
    };
    let mut pipes = Pipes { fds: Vec::with_capacity(workers) };
    for _ in 0..workers {
        let mut fds = [0 as c_int; 2];
        // SAFETY: `fds` is a live two-element array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            // SAFETY: the cycle's log is live.
            let log = unsafe { (*cycle).log };
            martd_log!(NGX_LOG_EMERG, log, "pipe2() failed: {}", std::io::Error::last_os_error());
            return NGX_ERROR as ngx_int_t;
        }
        pipes.fds.push(fds);
    }
    // SAFETY: the cleanup's data area is sized for `Pipes` and pool-aligned; it is written
    // before the handler is set, and the handler drops it once.
    unsafe {
        let cln = ngx_pool_cleanup_add((*cycle).pool, size_of::<Pipes>());
        if cln.is_null() {
            return NGX_ERROR as ngx_int_t;
        }
        ptr::write((*cln).data as *mut Pipes, pipes);
        (*cln).handler = Some(drop_pipes);
        mcf.pipes = (*cln).data as *mut Pipes;
    }
    NGX_OK as ngx_int_t
}
