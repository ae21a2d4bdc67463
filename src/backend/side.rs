//! A side thread of one worker per node, held by a lease in the zone root (the holder's pid):
//! `martd_persist`'s writer and `martd_redis_url`'s Redis thread. Whichever worker ticks first
//! takes a free lease (or one whose holder is gone) and starts the thread; an exiting worker
//! stops it, joins it and gives the lease back. The thread never logs itself (nginx's log
//! belongs to the event loop): it queues lines that the worker logs at its tick.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::conf::MainConf;
use crate::zone::{self, ZoneRoot};

pub type Level = u32;

/// What a side thread and its worker share.
pub struct Shared {
    stop: AtomicBool,
    logs: Mutex<Vec<(Level, String)>>,
}

impl Shared {
    pub fn new(stopping: bool) -> Shared {
        Shared { stop: AtomicBool::new(stopping), logs: Mutex::new(Vec::new()) }
    }

    /// Queues a line for the worker's log (at most 64 wait).
    pub fn log(&self, level: Level, msg: String) {
        if let Ok(mut l) = self.logs.lock() {
            if l.len() < 64 {
                l.push((level, msg));
            }
        }
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Logs the queued lines (the worker).
    pub fn flush_logs(&self) {
        let lines = self.logs.lock().map(|mut l| std::mem::take(&mut *l)).unwrap_or_default();
        for (level, msg) in lines {
            // SAFETY: the cycle and its log are live in the master and workers.
            let log = unsafe { (*nginx_sys::ngx_cycle).log };
            martd_log!(level, log, "{}", msg);
        }
    }
}

/// A running side thread.
pub struct SideThread {
    handle: Option<std::thread::JoinHandle<()>>,
    pub shared: Arc<Shared>,
}

impl SideThread {
    /// Asks it to stop and waits for it.
    pub fn stop(mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            h.thread().unpark();
            let _ = h.join();
        }
        self.shared.flush_logs();
    }
}

/// The worker's main conf, handed to a side thread.
#[derive(Clone, Copy)]
pub struct Conf(pub &'static MainConf);

// SAFETY: the main conf lives as long as the worker's cycle, and a side thread is joined
// before the worker exits; the thread only reads it and reaches the zone through its lock.
unsafe impl Send for Conf {}

/// Whether process `pid` exists (one of another user, such as a master running as root seen
/// from a worker, answers `EPERM`: it exists).
pub fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

/// Takes the lease `field` of the zone root if it is free or its holder is gone.
fn take_lease(mcf: &MainConf, field: fn(&mut ZoneRoot) -> &mut i32) -> bool {
    // SAFETY: nginx's pid of this process.
    let pid = unsafe { nginx_sys::ngx_pid };
    zone::lock(mcf).is_some_and(|mut z| {
        let holder = field(z.root());
        if *holder != 0 && *holder != pid && alive(*holder) {
            return false;
        }
        *holder = pid;
        true
    })
}

/// Gives the lease `field` back.
pub fn release_lease(mcf: &MainConf, field: fn(&mut ZoneRoot) -> &mut i32) {
    if let Some(mut z) = zone::lock(mcf) {
        *field(z.root()) = 0;
    }
}

/// Whether nobody alive holds the lease `field`.
pub fn lease_free(mcf: &MainConf, field: fn(&mut ZoneRoot) -> &mut i32) -> bool {
    zone::lock(mcf).is_some_and(|mut z| !alive(*field(z.root())))
}

/// A worker's tick for the side thread in `slot`: logs what it queued, or takes the lease and
/// starts it as `name` running `body`. Nothing while the worker is exiting.
pub fn tick(
    slot: &'static std::thread::LocalKey<std::cell::RefCell<Option<SideThread>>>,
    mcf: &'static MainConf,
    field: fn(&mut ZoneRoot) -> &mut i32,
    name: &str,
    body: impl FnOnce(Conf, Arc<Shared>) + Send + 'static,
) {
    let running = slot.with(|t| t.borrow().as_ref().map(|t| t.shared.flush_logs()).is_some());
    // SAFETY: nginx's per-process flag.
    if running || unsafe { nginx_sys::ngx_exiting } != 0 || !take_lease(mcf, field) {
        return;
    }
    let shared = Arc::new(Shared::new(false));
    let (conf, s) = (Conf(mcf), shared.clone());
    match std::thread::Builder::new().name(name.into()).spawn(move || body(conf, s)) {
        Ok(h) => slot.with(|t| *t.borrow_mut() = Some(SideThread { handle: Some(h), shared })),
        Err(e) => {
            // SAFETY: the cycle and its log are live in workers.
            let log = unsafe { (*nginx_sys::ngx_cycle).log };
            martd_log!(nginx_sys::NGX_LOG_ERR, log, "{}: no thread: {}", name, e);
            release_lease(mcf, field);
        }
    }
}

/// `exit_process`: stops the side thread in `slot`, if this worker runs it, and gives its
/// lease back. Whether it did.
pub fn stop(
    slot: &'static std::thread::LocalKey<std::cell::RefCell<Option<SideThread>>>,
    mcf: &'static MainConf,
    field: fn(&mut ZoneRoot) -> &mut i32,
) -> bool {
    let Some(t) = slot.with(|t| t.borrow_mut().take()) else { return false };
    t.stop();
    release_lease(mcf, field);
    true
}
