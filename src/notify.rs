//! Cross-worker wake-ups.
//!
//! A listener parked in worker B must be answered when worker A publishes. Shared memory
//! alone cannot wake a process sleeping in `epoll_wait`, so every worker owns a datagram
//! socket:
//!
//! 1. A worker registers in the zone (it gets a slot number) and binds a Unix datagram socket
//!    in the abstract namespace at an address made of the zone's nonce (random, drawn when the
//!    zone is made) and its slot: `\0martd/<nonce>/<slot>`. Its event loop reads it. Nothing
//!    is inherited from the master, so any martd process of the zone can reach any other,
//!    whichever configuration generation started either of them (an old worker finishing a
//!    publish during a reload wakes the new workers).
//! 2. A publisher appends the channel to the mailbox of every worker slot that has listeners
//!    on it (in the zone, under the lock), and for each slot not yet signalled sends one
//!    datagram to that slot's address after unlocking. Bursts of publishes thus cost one
//!    datagram and one wake-up per worker, not per message.
//! 3. The woken worker drains its socket, takes its mailbox (which clears the slot's
//!    "signalled" mark), and answers its listeners.
//! 4. When a datagram cannot be sent because nobody is bound at the address any more (the
//!    worker exited), the publisher clears the mark itself: a pending-wake-up mark never
//!    outlives the wake-up. A full socket queue already holds a wake-up, so that is fine too.

use std::ffi::{c_int, c_void};
use std::io;
use std::mem::{offset_of, size_of};
use std::ptr;

use nginx_sys::{ngx_cycle_t, ngx_http_conf_ctx_t, ngx_http_module};

use crate::conf::MainConf;

/// The address of a node's engine thread (`martd_redis_url`), beside the workers' slots.
pub const ENGINE_SLOT: u32 = u32::MAX;

/// The abstract-namespace address of slot `slot` in the zone with nonce `nonce`.
fn address(nonce: u64, slot: u32) -> (libc::sockaddr_un, libc::socklen_t) {
    // SAFETY: an all-zero `sockaddr_un` is a valid (empty) address.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let name = format!("martd/{nonce:016x}/{slot}");
    // sun_path[0] stays 0: the abstract namespace. The name is far shorter than sun_path.
    for (dst, &b) in sa.sun_path[1..].iter_mut().zip(name.as_bytes()) {
        *dst = b as libc::c_char;
    }
    let len = offset_of!(libc::sockaddr_un, sun_path) + 1 + name.len().min(sa.sun_path.len() - 1);
    (sa, len as libc::socklen_t)
}

fn dgram_socket() -> io::Result<c_int> {
    // SAFETY: plain socket(2).
    let fd = unsafe {
        libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0)
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// A non-blocking socket bound at slot `slot`'s address, to be read by that worker.
pub fn bind(nonce: u64, slot: u32) -> io::Result<c_int> {
    let fd = dgram_socket()?;
    let (sa, len) = address(nonce, slot);
    // SAFETY: `sa` is a live, initialised address of `len` bytes.
    let rc = unsafe { libc::bind(fd, ptr::addr_of!(sa).cast(), len) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        close(fd);
        return Err(e);
    }
    Ok(fd)
}

/// An unbound non-blocking socket to send wake-ups from.
pub fn sender() -> io::Result<c_int> {
    dgram_socket()
}

pub fn close(fd: c_int) {
    // SAFETY: closing a descriptor this module created and nothing else closes.
    unsafe { libc::close(fd) };
}

/// What became of a wake-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Queued at the worker (or its queue is full, which already holds a wake-up).
    Queued,
    /// Nobody is bound at the address: the worker is gone.
    Gone,
}

/// The monotonic clock (the same in every process of the machine), in microseconds: a
/// wake-up carries its send time so that its receiver can tell its delay.
fn monotonic_us() -> u64 {
    // SAFETY: an all-zero `timespec` is valid; clock_gettime writes it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a live `timespec`; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000) + ts.tv_nsec as u64 / 1000
}

/// Sends one wake-up datagram (its send time) to slot `slot`.
pub fn send(fd: c_int, nonce: u64, slot: u32) -> Sent {
    let (sa, len) = address(nonce, slot);
    let b = monotonic_us().to_ne_bytes();
    // SAFETY: `b.len()` bytes from a live buffer to a live address of `len` bytes.
    let n = unsafe {
        libc::sendto(fd, b.as_ptr() as *const c_void, b.len(), 0, ptr::addr_of!(sa).cast(), len)
    };
    if n == b.len() as isize {
        crate::stats::count::notified();
        return Sent::Queued;
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::ECONNREFUSED) | Some(libc::ENOENT) => Sent::Gone,
        // EAGAIN/ENOBUFS: the queue is full of wake-ups. Anything else is unexpected; the
        // receiving worker's periodic look at its mailbox still answers its listeners.
        _ => Sent::Queued,
    }
}

/// Reads every datagram pending on `fd`, counting each wake-up and its delay.
pub fn drain(fd: c_int) {
    let mut buf = [0u8; 64];
    for _ in 0..1024 {
        // SAFETY: reading into a live local buffer of the given size.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut c_void, buf.len(), 0) };
        if n < 0 {
            break;
        }
        if let Some(sent) = buf.first_chunk::<8>().filter(|_| n == 8) {
            let delay = monotonic_us().saturating_sub(u64::from_ne_bytes(*sent));
            crate::stats::count::woken(delay);
        }
    }
}

/// A random nonce for a new zone (`getrandom`, else time and pid).
pub fn new_nonce() -> u64 {
    let mut v = [0u8; size_of::<u64>()];
    // SAFETY: writing at most `v.len()` bytes into a live local buffer.
    let n = unsafe { libc::getrandom(v.as_mut_ptr() as *mut c_void, v.len(), libc::GRND_NONBLOCK) };
    if n == v.len() as isize {
        return u64::from_ne_bytes(v);
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    // SAFETY: getpid(2) cannot fail.
    t ^ (u64::from(unsafe { libc::getpid() } as u32) << 32)
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
