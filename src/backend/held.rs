//! Publishes answered later: with `martd_persist ... sync=always`, once the journal is on disk
//! up to the message; with `martd_redis_url`, once Redis gave the message its id and this
//! node stored it. The request is kept open (an extra count) and looked at on a wake-up from
//! the thread that did the work and every few milliseconds. The poll timer is not cancelable,
//! so a worker that shuts down gracefully (a reload) answers its held publishes before it
//! exits.

use martd_core::store::{Done, StoreError};
use nginx_sys::{ngx_http_request_t, ngx_int_t};

use crate::conf::MainConf;
use crate::zone;

/// What a held publish waits for.
#[derive(Debug, Clone, Copy)]
pub enum Wait {
    /// The journal on disk up to this position.
    Durable(u64),
    /// The outcome of outbox entry `seq`, until the worker's clock reads `deadline_ms`.
    Redis { seq: u64, deadline_ms: u64 },
}

/// Builds a held publish's answer: with the outcome from Redis (`None`: on disk, or Redis did
/// not answer in time).
pub type Answer = Box<dyn FnOnce(*mut ngx_http_request_t, Option<Done>) -> ngx_int_t>;

type Held = (*mut ngx_http_request_t, Wait, Answer);

thread_local! {
    static HELD: std::cell::RefCell<Vec<Held>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Looks at held publishes every few ms, besides the wake-ups.
    static TIMER: std::cell::RefCell<Option<(Box<nginx_sys::ngx_event_t>, &'static MainConf)>> =
        const { std::cell::RefCell::new(None) };
}

/// How often held publishes are looked at without a wake-up.
const POLL_MS: nginx_sys::ngx_msec_t = 10;

/// Holds a publish (its request kept open) until `wait` is over.
pub fn hold(r: *mut ngx_http_request_t, wait: Wait, answer: Answer) -> ngx_int_t {
    // SAFETY: `r` is live; the extra count keeps it until `answer_held` finalizes it.
    unsafe { (*(*r).main).set_count((*(*r).main).count() + 1) };
    HELD.with(|w| w.borrow_mut().push((r, wait, answer)));
    arm_timer(crate::listen::main_conf(r));
    nginx_sys::NGX_DONE as ngx_int_t
}

fn arm_timer(mcf: &'static MainConf) {
    TIMER.with(|t| {
        let Ok(mut t) = t.try_borrow_mut() else { return };
        let (ev, _) = t.get_or_insert_with(|| {
            // SAFETY: in a worker the cycle and its log are live.
            let log = unsafe { (*nginx_sys::ngx_cycle).log };
            (crate::worker::blank_event(timer_handler, log), mcf)
        });
        if ev.timer_set() == 0 {
            // SAFETY: the event is boxed in this thread-local, which outlives the timer.
            unsafe { nginx_sys::ngx_add_timer(&mut **ev, POLL_MS) };
        }
    });
}

unsafe extern "C" fn timer_handler(_ev: *mut nginx_sys::ngx_event_t) {
    let mcf = TIMER.with(|t| t.try_borrow().ok().and_then(|t| t.as_ref().map(|x| x.1)));
    let Some(mcf) = mcf else { return };
    answer_held(mcf);
    if HELD.with(|w| !w.borrow().is_empty()) {
        arm_timer(mcf);
    }
}

/// Answers the held publishes whose wait is over (a wake-up, or the poll timer).
pub fn answer_held(mcf: &'static MainConf) {
    if HELD.with(|w| w.borrow().is_empty()) {
        return;
    }
    let slot = crate::worker::with(|st| st.slot).flatten();
    let (durable, results) = match zone::lock(mcf) {
        Some(mut z) => {
            let store = z.store();
            let durable = store.journal().map_or(u64::MAX, |j| j.durable);
            let results = slot.map(|s| store.outbox_results(s)).unwrap_or_default();
            (durable, results)
        }
        None => return,
    };
    let now = crate::worker::now_ms();
    let mut ready: Vec<(Held, Option<Done>)> = Vec::new();
    HELD.with(|w| {
        let mut w = w.borrow_mut();
        let mut waiting = Vec::with_capacity(w.len());
        for h in w.drain(..) {
            match h.1 {
                Wait::Durable(pos) if pos <= durable => ready.push((h, None)),
                Wait::Redis { seq, deadline_ms } => match results.iter().find(|d| d.seq == seq) {
                    Some(d) => ready.push((h, Some(*d))),
                    None if now >= deadline_ms => ready.push((h, None)),
                    None => waiting.push(h),
                },
                Wait::Durable(_) => waiting.push(h),
            }
        }
        *w = waiting;
    });
    for ((r, _, answer), done) in ready {
        // SAFETY: `r` was kept open by `hold`; this is its last step.
        unsafe {
            let c = (*r).connection;
            let rc = answer(r, done);
            nginx_sys::ngx_http_finalize_request(r, rc);
            nginx_sys::ngx_http_run_posted_requests(c);
        }
    }
}

/// The answer to a publish that `martd_persist` or `martd_redis_url` refused.
pub fn refused(r: *mut ngx_http_request_t, e: StoreError) -> ngx_int_t {
    let reason = match e {
        StoreError::DiskFailing => {
            return crate::response::error(
                r,
                507,
                "martd_persist cannot write to disk (see the error log); nothing was stored",
            )
        }
        StoreError::Superseded => {
            "nginx is moving to a new zone (a reload or a binary upgrade): try again"
        }
        StoreError::Unavailable => {
            "redis (martd_redis_url) cannot be reached: nothing was published"
        }
        _ => "martd_persist is behind: the disk is slower than the publishers; try again",
    };
    crate::response::error(r, 503, reason)
}
