//! The worker's own state: its slot in the zone, its parked listeners and its wake-ups.
//!
//! nginx runs a worker's handlers on one thread, so the state is a thread-local behind a
//! `RefCell`. It is never borrowed while a request is answered (answering can run other
//! handlers that need it): wake-ups collect verdicts under the borrow and the zone lock, then
//! answer after both are released.

use std::cell::RefCell;
use std::ffi::c_int;
use std::ptr;

use nginx_sys::{
    ngx_add_timer, ngx_close_connection, ngx_connection_t, ngx_cycle_t, ngx_event_t,
    ngx_get_connection, ngx_handle_read_event, ngx_int_t, ngx_post_event, ngx_posted_events,
    NGX_LOG_ALERT, NGX_OK, NGX_PROCESS_SINGLE, NGX_PROCESS_WORKER,
};

use martd_core::listeners::{Listeners, Verdict};
use martd_core::store::{WakeTarget, GC_STEP_BUDGET};

use crate::conf::MainConf;
use crate::listen::detach::{self, DetachedListeners};
use crate::listen::{self, Handle};
use crate::notify::{self, Sent};
use crate::zone;

const GC_INTERVAL_MS: u64 = 1000;
/// Garbage-collection steps one timer event runs (each a short hold of the zone lock, see
/// [`GC_STEP_BUDGET`]) before it lets the event loop run again.
const GC_STEPS_PER_TICK: usize = 32;
/// Channels a wake-up looks at per hold of the zone lock.
const WAKE_CHANNELS_PER_LOCK: usize = 16;

pub struct WorkerState {
    /// Our slot in the zone; `None` once shutting down (or if registering failed).
    pub slot: Option<u32>,
    pub listeners: Listeners<Handle>,
    /// Parked listeners that gave their request back to nginx.
    pub detached: DetachedListeners,
    pub mcf: *mut MainConf,
    /// The zone's nonce: with a slot number, the address of that worker's socket.
    nonce: u64,
    /// Our bound socket, read from the event loop.
    notify_conn: *mut ngx_connection_t,
    /// An unbound socket wake-ups are sent from (kept after shutdown starts: an old worker
    /// may still publish).
    send_fd: c_int,
    mailbox_ev: Box<ngx_event_t>,
    gc_ev: Box<ngx_event_t>,
    /// Second of the last "zone is full" log line.
    pub last_full_log: i64,
    /// A garbage-collection pass of this worker has more to do.
    gc_more: bool,
}

thread_local! {
    static WORKER: RefCell<Option<WorkerState>> = const { RefCell::new(None) };
}

/// Runs `f` on the worker state; `None` outside a worker using martd.
pub fn with<R>(f: impl FnOnce(&mut WorkerState) -> R) -> Option<R> {
    WORKER.with(|w| {
        let mut w = w.try_borrow_mut().ok()?;
        let st = w.as_mut()?;
        let r = f(st);
        // Every change to the worker's listeners is made in here: its long-poll count is
        // published to its counters on the way out.
        crate::stats::count::long_polls(st.listeners.len() - st.listeners.streams());
        Some(r)
    })
}

/// Wall-clock milliseconds, as nginx cached them for this event loop iteration.
pub fn now_ms() -> u64 {
    let t = nginx_sys::ngx_timeofday();
    (t.sec as u64) * 1000 + t.msec as u64
}

/// What the data of the worker's own events points at. nginx's debug logging reads an event's
/// data as a connection (`ngx_event_ident`: its `fd`) when a timer fires, so events that
/// belong to no connection point at this stand-in (fd -1), as nginx's own such events do.
struct NoConnection(std::cell::UnsafeCell<ngx_connection_t>);

// SAFETY: the stand-in is only ever read (its `fd`) by nginx's debug log, in the worker's one
// thread; it is never written after it is made.
unsafe impl Sync for NoConnection {}

thread_local! {
    static NO_CONNECTION: Box<NoConnection> = {
        // SAFETY: an all-zero connection is a valid value; only `fd` is ever read.
        let mut c: ngx_connection_t = unsafe { std::mem::zeroed() };
        c.fd = -1;
        Box::new(NoConnection(std::cell::UnsafeCell::new(c)))
    };
}

pub fn blank_event(
    handler: unsafe extern "C" fn(*mut ngx_event_t),
    log: *mut nginx_sys::ngx_log_t,
) -> Box<ngx_event_t> {
    // SAFETY: an all-zero `ngx_event_t` is nginx's own initial state for events.
    let mut ev: Box<ngx_event_t> = Box::new(unsafe { std::mem::zeroed() });
    ev.handler = Some(handler);
    ev.log = log;
    ev.data = NO_CONNECTION.with(|c| c.0.get()) as *mut std::ffi::c_void;
    ev
}

/// Whether this process serves requests: a worker, or nginx without a master. Cache
/// managers and loaders (and any other helper process) leave the zone alone.
fn serves_requests() -> bool {
    // SAFETY: reading nginx's per-process type, set before `init_process` runs.
    let p = unsafe { nginx_sys::ngx_process } as u32;
    p == NGX_PROCESS_WORKER || p == NGX_PROCESS_SINGLE
}

/// `init_process`: registers the worker in the zone and its socket in the event loop.
pub extern "C" fn init_process(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    if !serves_requests() {
        return NGX_OK as ngx_int_t;
    }
    let Some(mcf) = notify::main_conf(cycle) else {
        return NGX_OK as ngx_int_t;
    };
    // SAFETY: the cycle and its log are live; the globals are nginx's per-process values.
    let (log, pid, index) = unsafe { ((*cycle).log, nginx_sys::ngx_pid, nginx_sys::ngx_worker) };
    let generation = mcf.generation;
    let registered = zone::lock(mcf).map(|mut z| {
        let nonce = z.root().nonce;
        // Only a configuration with listen locations has listeners to wake: without one, the
        // worker takes no slot and binds no socket (no connection of worker_connections).
        let slot = if mcf.listens {
            z.store().register_worker(pid, generation, index as u32, &crate::stats::alive).ok()
        } else {
            Some(0)
        };
        let counters = slot.filter(|_| mcf.listens).and_then(|s| z.store().counters(s));
        (slot, nonce, counters)
    });
    let Some((slot, nonce, counters)) = registered else {
        return NGX_OK as ngx_int_t;
    };
    if slot.is_none() {
        martd_log!(NGX_LOG_ALERT, log, "could not register worker {} in the \"martd\" zone", pid);
    }
    let slot = slot.filter(|_| mcf.listens);
    let send_fd = notify::sender().unwrap_or_else(|e| {
        martd_log!(NGX_LOG_ALERT, log, "socket() failed for wake-ups: {}", e);
        -1
    });
    let mut notify_conn = ptr::null_mut();
    if let Some(slot) = slot {
        match notify::bind(nonce, slot) {
            Ok(fd) => notify_conn = listen_socket(fd, log),
            Err(e) => {
                martd_log!(
                    NGX_LOG_ALERT,
                    log,
                    "could not bind the wake-up socket of worker {}: {}",
                    pid,
                    e
                );
            }
        }
        if notify_conn.is_null() {
            // Nobody could wake this worker: it takes no listeners.
            if let Some(mut z) = zone::lock(mcf) {
                z.store().unregister_worker(slot);
            }
        }
    }
    let slot = slot.filter(|_| !notify_conn.is_null());
    crate::stats::count::attach(counters.filter(|_| slot.is_some()));
    let state = WorkerState {
        slot,
        listeners: Listeners::default(),
        detached: DetachedListeners::new(blank_event(detach::takeover_handler, log)),
        mcf,
        nonce,
        notify_conn,
        send_fd,
        mailbox_ev: blank_event(mailbox_handler, log),
        gc_ev: blank_event(gc_handler, log),
        last_full_log: 0,
        gc_more: false,
    };
    WORKER.with(|w| {
        let mut w = w.borrow_mut();
        let st = w.insert(state);
        st.gc_ev.set_cancelable(1);
        // SAFETY: the boxed event lives in the thread-local state for the worker's life.
        unsafe { ngx_add_timer(&mut *st.gc_ev, GC_INTERVAL_MS as _) };
    });
    // The first worker up starts `martd_persist`'s writer and `martd_redis_url`'s thread.
    crate::backend::persist::tick(mcf);
    crate::backend::redis::tick(mcf);
    NGX_OK as ngx_int_t
}

/// Puts our bound socket `fd` in the event loop (read events only); null on failure (`fd` is
/// closed then).
fn listen_socket(fd: c_int, log: *mut nginx_sys::ngx_log_t) -> *mut ngx_connection_t {
    // SAFETY: `fd` is our socket; nginx's connection and event structures take it over like
    // any socket.
    unsafe {
        let c = ngx_get_connection(fd, log);
        if c.is_null() {
            notify::close(fd);
            return ptr::null_mut();
        }
        (*c).data = ptr::null_mut();
        (*(*c).read).handler = Some(notify_handler);
        (*(*c).read).log = log;
        // Idle: nginx calls the read handler with `c->close` set when a graceful shutdown
        // starts, which is when the worker answers its listeners.
        (*c).set_idle(1);
        if ngx_handle_read_event((*c).read, 0) != NGX_OK as ngx_int_t {
            ngx_close_connection(c);
            return ptr::null_mut();
        }
        c
    }
}

/// `exit_process`: leaves the zone.
pub extern "C" fn exit_process(_cycle: *mut ngx_cycle_t) {
    shutdown();
    if let Some(mcf) = with(|st| st.mcf) {
        // SAFETY: `mcf` is this worker's cycle's main conf, alive until the worker exits.
        crate::backend::redis::stop(unsafe { &*mcf });
        // SAFETY: as above.
        crate::backend::persist::stop(unsafe { &*mcf });
    }
    let st = WORKER.with(|w| w.borrow_mut().take());
    if let Some(mut st) = st {
        if !st.notify_conn.is_null() {
            // SAFETY: the connection was made in `init_process` and not closed since.
            unsafe { ngx_close_connection(st.notify_conn) };
            st.notify_conn = ptr::null_mut();
        }
        if st.send_fd >= 0 {
            notify::close(st.send_fd);
        }
    }
}

/// Wakes the workers a store call named; our own slot is handled by a posted event, never
/// inline, so the request being handled is not answered from inside its own handler.
pub fn wake(targets: &[WakeTarget]) {
    if targets.is_empty() {
        return;
    }
    with(|st| {
        let mut gone = Vec::new();
        for t in targets {
            if Some(t.slot) == st.slot {
                if st.mailbox_ev.posted() == 0 {
                    // SAFETY: the event is boxed in the worker state and outlives the queue.
                    unsafe {
                        ngx_post_event(&mut *st.mailbox_ev, ptr::addr_of_mut!(ngx_posted_events))
                    };
                }
            } else if st.send_fd < 0 || notify::send(st.send_fd, st.nonce, t.slot) == Sent::Gone {
                gone.push(t.slot);
            }
        }
        if !gone.is_empty() {
            // SAFETY: `mcf` is this worker's cycle's main conf.
            if let Some(mut z) = zone::lock(unsafe { &*st.mcf }) {
                for slot in gone {
                    z.store().clear_signal(slot);
                }
            }
        }
    });
}

/// Sends one wake-up to address `slot` of this zone from the worker's socket (a worker only).
pub fn send_to(slot: u32) -> Option<Sent> {
    with(|st| if st.send_fd < 0 { Sent::Gone } else { notify::send(st.send_fd, st.nonce, slot) })
}

thread_local! {
    /// Wake-ups to send once the current handler is done (see [`wake_later`]), and the posted
    /// event that sends them.
    static DEFERRED: RefCell<(Vec<WakeTarget>, Option<Box<ngx_event_t>>)> =
        const { RefCell::new((Vec::new(), None)) };
}

/// Wakes `targets` from a posted event: for a caller that may be inside the worker state
/// ([`wake`] needs it), such as the zone guard publishing channel events as it unlocks.
pub fn wake_later(targets: Vec<WakeTarget>, nonce: u64) {
    // A thread that is not the worker's (a side thread of `backend`): its own datagrams.
    if WORKER.with(|w| w.try_borrow().is_ok_and(|s| s.is_none())) {
        if let Ok(fd) = notify::sender() {
            for t in &targets {
                notify::send(fd, nonce, t.slot);
            }
            notify::close(fd);
        }
        return;
    }
    // Outside the worker state (a worker exiting, a timer): at once.
    if WORKER.with(|w| w.try_borrow_mut().is_ok()) {
        wake(&targets);
        return;
    }
    DEFERRED.with(|d| {
        let Ok(mut d) = d.try_borrow_mut() else {
            return;
        };
        let (pending, ev) = &mut *d;
        pending.extend(targets);
        let ev = ev.get_or_insert_with(|| {
            // SAFETY: in a worker the cycle and its log are live.
            let log = unsafe { (*nginx_sys::ngx_cycle).log };
            blank_event(deferred_wake_handler, log)
        });
        if ev.posted() == 0 {
            // SAFETY: the event is boxed in this thread-local, which outlives the posted queue.
            unsafe { ngx_post_event(&mut **ev, ptr::addr_of_mut!(ngx_posted_events)) };
        }
    });
}

unsafe extern "C" fn deferred_wake_handler(_ev: *mut ngx_event_t) {
    let targets = DEFERRED.with(|d| d.try_borrow_mut().map(|mut d| std::mem::take(&mut d.0)));
    if let Ok(targets) = targets {
        wake(&targets);
    }
}

unsafe extern "C" fn notify_handler(ev: *mut ngx_event_t) {
    // SAFETY: nginx calls this with the read event of our pipe connection.
    let c = unsafe { (*ev).data as *mut ngx_connection_t };
    // SAFETY: as above; `close` is set by nginx's graceful shutdown.
    if unsafe { (*c).close() } != 0 {
        shutdown();
        with(|st| st.notify_conn = ptr::null_mut());
        // SAFETY: our connection, closed once: the state no longer refers to it.
        unsafe { ngx_close_connection(c) };
        return;
    }
    // SAFETY: `fd` is the socket the connection wraps.
    notify::drain(unsafe { (*c).fd });
    if let Some(mcf) = with(|st| st.mcf) {
        // SAFETY: `mcf` is this worker's cycle's main conf.
        crate::backend::held::answer_held(unsafe { &*mcf });
    }
    process_mailbox();
}

unsafe extern "C" fn mailbox_handler(_ev: *mut ngx_event_t) {
    process_mailbox();
}

/// Takes this worker's mailbox and answers every listener that can be answered.
fn process_mailbox() {
    let out = with(|st| {
        let mut out = Vec::new();
        let Some(slot) = st.slot else { return (out, Vec::new()) };
        // SAFETY: `mcf` is this worker's cycle's main conf.
        let mcf = unsafe { &*st.mcf };
        let mut serials = Vec::new();
        let mut horizon = u64::MAX;
        let overflow = zone::lock(mcf).is_some_and(|mut z| {
            horizon = z.store().last_id();
            z.store().take_mailbox(slot, &mut serials)
        });
        if overflow {
            serials = st.listeners.serials();
        }
        let now = now_ms();
        let mut again = Vec::new();
        // A few channels per hold of the zone lock: an overflowed mailbox names every channel
        // with listeners here.
        st.listeners.begin_wake(&serials, horizon);
        for chunk in serials.chunks(WAKE_CHANNELS_PER_LOCK) {
            let Some(mut z) = zone::lock(mcf) else { break };
            for &serial in chunk {
                st.listeners.wake(z.store(), serial, slot, now, &mut out, &mut again);
            }
        }
        st.listeners.end_wake();
        if serials.len() > 1 {
            // A streaming subscriber of several channels gets the pass's messages in id order,
            // then its end if it ends (see `Listeners::begin_wake`).
            out.sort_by_key(|(h, v)| match (h, v) {
                (Handle::Stream(_), Verdict::DeliverOn(p, _)) => (1, p.id),
                (Handle::Stream(_), _) => (1, u64::MAX),
                _ => (0, 0),
            });
        }
        (out, again)
    });
    let (out, again) = out.unwrap_or_default();
    // A one-to-one election was decided: the workers whose listeners lost look again.
    wake(&again);
    if !out.is_empty() {
        martd_debug!(
            ngx::log::ngx_cycle_log().as_ptr(),
            "woken: {} listener(s) answered",
            out.len()
        );
    }
    for (handle, verdict) in out {
        listen::answer_handle(handle, Some(verdict));
    }
}

/// A graceful shutdown started (or the worker exits): answer every parked listener with
/// `304` and leave the zone, so the old worker does not hold a reload up.
fn shutdown() {
    let drained = with(|st| {
        let slot = st.slot.take()?;
        let (releases, handles) = st.listeners.drain_all();
        // The slot's counters go with it: nothing writes them from now on.
        crate::stats::count::detach();
        // SAFETY: `mcf` is this worker's cycle's main conf.
        if let Some(mut z) = zone::lock(unsafe { &*st.mcf }) {
            for (removed, n) in &releases {
                z.store().release(&removed.name, removed.serial, slot, *n, removed.last);
            }
            z.store().unregister_worker(slot);
        }
        Some(handles)
    });
    for handle in drained.flatten().unwrap_or_default() {
        listen::answer_handle(handle, None);
    }
}

/// Once a second: zone garbage collection (by whichever worker comes first), and a look at
/// this worker's mailbox. Wake-ups do not depend on that look (every publisher sends its
/// datagram or clears the mark); it only bounds what a publisher that died between marking
/// and sending could delay.
unsafe extern "C" fn gc_handler(ev: *mut ngx_event_t) {
    let now = now_ms();
    let state = with(|st| {
        // SAFETY: `mcf` is this worker's cycle's main conf.
        let mcf = unsafe { &*st.mcf };
        // The zone-wide pass is claimed by the first worker whose tick is due; a pass that
        // did not finish goes on at this worker's next (immediate) tick.
        let claimed = st.gc_more
            || zone::lock(mcf).is_some_and(|mut z| {
                let root = z.root();
                let due = now.saturating_sub(root.last_gc_ms) >= GC_INTERVAL_MS;
                if due {
                    root.last_gc_ms = now;
                }
                due
            });
        let mut more = false;
        if claimed {
            // Bounded steps, each its own short hold of the zone lock.
            for _ in 0..GC_STEPS_PER_TICK {
                let Some(mut z) = zone::lock(mcf) else { break };
                more = z.store().collect_garbage_step(now, GC_STEP_BUDGET);
                drop(z);
                if !more {
                    break;
                }
            }
        }
        st.gc_more = more;
        crate::backend::persist::tick(mcf);
        crate::backend::redis::tick(mcf);
        let lingering_more = release_lingering(st, mcf, now);
        (st.slot.is_some(), more || lingering_more)
    });
    if let Some(mcf) = with(|st| st.mcf) {
        // SAFETY: `mcf` is this worker's cycle's main conf.
        crate::backend::held::answer_held(unsafe { &*mcf });
    }
    let (registered, more) = state.unwrap_or((false, false));
    if registered {
        process_mailbox();
    }
    // SAFETY: `ngx_exiting` is nginx's per-process flag; `ev` is our boxed GC event.
    unsafe {
        if nginx_sys::ngx_exiting == 0 {
            ngx_add_timer(ev, if more { 1 } else { GC_INTERVAL_MS as _ });
        }
    }
}

/// Lingering multi-channel listeners (at most this many per tick) whose connection did not
/// come back are released, a few per hold of the zone lock. `true`: more are due.
fn release_lingering(st: &mut WorkerState, mcf: &MainConf, now: u64) -> bool {
    const PER_TICK: usize = 4096;
    let Some(slot) = st.slot else { return false };
    let due = st.listeners.lingering_due(now, PER_TICK);
    if due.is_empty() {
        return false;
    }
    martd_debug!(
        ngx::log::ngx_cycle_log().as_ptr(),
        "{} lingering multi-channel listener(s) released",
        due.len()
    );
    for chunk in due.chunks(WAKE_CHANNELS_PER_LOCK * 16) {
        let Some(mut z) = zone::lock(mcf) else { break };
        for &key in chunk {
            st.listeners.remove(key, |r| z.store().release(&r.name, r.serial, slot, 1, r.last));
        }
    }
    due.len() == PER_TICK
}

/// Whether this worker can park listeners now.
pub fn accepting() -> bool {
    // SAFETY: reading nginx's per-process flag.
    let exiting = unsafe { nginx_sys::ngx_exiting } != 0;
    !exiting && with(|st| st.slot.is_some()).unwrap_or(false)
}
