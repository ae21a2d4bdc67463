//! `sync=always`: a publish is answered once the journal is on disk up to its message. Its
//! request is kept open (an extra count) and looked at on the writer's wake-up and every few
//! milliseconds; the poll timer is not cancelable, so a worker that shuts down gracefully (a
//! reload) answers its held publishes before it exits.

use crate::conf::MainConf;
use crate::zone;

/// Builds a publish's answer once its message is on disk.
pub type Answer = Box<dyn FnOnce(*mut nginx_sys::ngx_http_request_t) -> nginx_sys::ngx_int_t>;

thread_local! {
    /// `sync=always` publishes waiting for the journal to reach their position on disk.
    static DURABLE_WAIT: std::cell::RefCell<Vec<(*mut nginx_sys::ngx_http_request_t, u64, Answer)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Holds a publish (its request kept open) until the journal is on disk up to `pos`.
pub fn answer_when_durable(
    r: *mut nginx_sys::ngx_http_request_t,
    pos: u64,
    answer: Answer,
) -> nginx_sys::ngx_int_t {
    // SAFETY: `r` is live; the extra count keeps it until `answer_durable` finalizes it.
    unsafe { (*(*r).main).set_count((*(*r).main).count() + 1) };
    DURABLE_WAIT.with(|w| w.borrow_mut().push((r, pos, answer)));
    arm_durable_timer(crate::listen::main_conf(r));
    nginx_sys::NGX_DONE as nginx_sys::ngx_int_t
}

thread_local! {
    /// Looks at held publishes every few ms, besides the writer's wake-ups. It is not
    /// cancelable: a worker shutting down gracefully (a reload) waits for its held publishes.
    static DURABLE_TIMER: std::cell::RefCell<Option<(Box<nginx_sys::ngx_event_t>, &'static MainConf)>> =
        const { std::cell::RefCell::new(None) };
}

/// How often held publishes are looked at without a wake-up.
const DURABLE_POLL_MS: nginx_sys::ngx_msec_t = 10;

fn arm_durable_timer(mcf: &'static MainConf) {
    DURABLE_TIMER.with(|t| {
        let Ok(mut t) = t.try_borrow_mut() else { return };
        let (ev, _) = t.get_or_insert_with(|| {
            // SAFETY: in a worker the cycle and its log are live.
            let log = unsafe { (*nginx_sys::ngx_cycle).log };
            (crate::worker::blank_event(durable_timer_handler, log), mcf)
        });
        if ev.timer_set() == 0 {
            // SAFETY: the event is boxed in this thread-local, which outlives the timer.
            unsafe { nginx_sys::ngx_add_timer(&mut **ev, DURABLE_POLL_MS) };
        }
    });
}

unsafe extern "C" fn durable_timer_handler(_ev: *mut nginx_sys::ngx_event_t) {
    let mcf = DURABLE_TIMER.with(|t| t.try_borrow().ok().and_then(|t| t.as_ref().map(|x| x.1)));
    let Some(mcf) = mcf else { return };
    answer_durable(mcf);
    if DURABLE_WAIT.with(|w| !w.borrow().is_empty()) {
        arm_durable_timer(mcf);
    }
}

/// Answers the publishes whose messages are on disk now (a wake-up from the writer, or the
/// worker's tick).
pub fn answer_durable(mcf: &'static MainConf) {
    if DURABLE_WAIT.with(|w| w.borrow().is_empty()) {
        return;
    }
    let durable = zone::lock(mcf).and_then(|mut z| z.store().journal().map(|j| j.durable));
    let Some(durable) = durable else { return };
    let ready: Vec<_> = DURABLE_WAIT.with(|w| {
        let mut w = w.borrow_mut();
        let (ready, waiting): (Vec<_>, Vec<_>) =
            w.drain(..).partition(|(_, pos, _)| *pos <= durable);
        *w = waiting;
        ready
    });
    for (r, _, answer) in ready {
        // SAFETY: `r` was kept open by `answer_when_durable`; this is its last step.
        unsafe {
            let c = (*r).connection;
            let rc = answer(r);
            nginx_sys::ngx_http_finalize_request(r, rc);
            nginx_sys::ngx_http_run_posted_requests(c);
        }
    }
}

/// The answer to a publish the journal refused.
pub fn refused(
    r: *mut nginx_sys::ngx_http_request_t,
    e: martd_core::store::StoreError,
) -> nginx_sys::ngx_int_t {
    match e {
        martd_core::store::StoreError::DiskFailing => crate::response::error(
            r,
            507,
            "martd_persist cannot write to disk (see the error log); nothing was stored",
        ),
        martd_core::store::StoreError::Superseded => {
            crate::response::error(r, 503, "nginx is reloading into a new zone: try again")
        }
        _ => crate::response::error(
            r,
            503,
            "martd_persist is behind: the disk is slower than the publishers; try again",
        ),
    }
}
