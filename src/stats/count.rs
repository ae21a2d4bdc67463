//! This worker's counters in the zone (its slot's [`WorkerCounters`]), written without the
//! zone lock: the worker is their only writer, and the record stays put until the worker
//! unregisters its slot, which it does only after [`detach`] (or, killed, never: a new worker
//! purges the slot).

use std::cell::Cell;
use std::ptr::{self, NonNull};

use martd_core::stats::{ListenerKind, WorkerCounters};

thread_local! {
    static COUNTERS: Cell<*const WorkerCounters> = const { Cell::new(ptr::null()) };
    /// Streaming subscribers here now, by kind (EventSource, WebSocket, stream).
    static STREAMS: Cell<[u64; 4]> = const { Cell::new([0; 4]) };
}

/// The worker registered: `counters` is its slot's record.
pub fn attach(counters: Option<NonNull<WorkerCounters>>) {
    COUNTERS.with(|c| c.set(counters.map_or(ptr::null(), |p| p.as_ptr())));
}

/// The worker is about to unregister its slot: nothing is written to the record any more.
pub fn detach() {
    COUNTERS.with(|c| c.set(ptr::null()));
}

fn with(f: impl FnOnce(&WorkerCounters)) {
    let p = COUNTERS.with(Cell::get);
    // SAFETY: set by `attach` to this worker's record in the zone, which stays allocated
    // until the slot is unregistered; `detach` clears it before that (see the module note).
    if let Some(c) = unsafe { p.as_ref() } {
        f(c);
    }
}

/// `n` messages were written to listeners.
pub fn delivered(n: u64) {
    with(|c| c.delivered(n));
}

/// A wake-up datagram was sent to another worker.
pub fn notified() {
    with(WorkerCounters::notified);
}

/// A wake-up datagram arrived, `delay_us` after it was sent.
pub fn woken(delay_us: u64) {
    with(|c| c.woken(delay_us));
}

/// The worker has `n` waiting long-polls (single- and multi-channel, held or detached).
pub fn long_polls(n: usize) {
    with(|c| c.set_listeners(ListenerKind::LongPoll, n as u64));
}

/// A streaming subscriber of `kind` started (`true`) or stopped waiting.
pub fn stream(kind: ListenerKind, started: bool) {
    let n = STREAMS.with(|s| {
        let mut v = s.get();
        let k = &mut v[kind as usize];
        *k = if started { *k + 1 } else { k.saturating_sub(1) };
        s.set(v);
        v[kind as usize]
    });
    with(|c| c.set_listeners(kind, n));
}
