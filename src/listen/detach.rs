//! Detached listeners: a parked long-poll that gives its request back to nginx while it waits.
//!
//! A parked request costs about 10 KB of worker memory, nearly all of it nginx's own (two
//! request-pool blocks, the header buffer). A listener on an HTTP/1.x keep-alive connection
//! (plain or TLS) does not need any of it while it waits. Its handler keeps a copy of the request
//! line and headers (a few hundred bytes) and lets nginx finalize the request into the
//! keep-alive state, which frees the request and its buffers; a posted event then takes the
//! idle connection over from nginx's keep-alive handler (no keep-alive timeout, not reusable,
//! not closed by a graceful shutdown: the listener's own timer and the worker's shutdown
//! answer it instead).
//!
//! When the listener's verdict is ready, [`replay`](super::replay) hands the saved request back
//! to nginx. A client that closes its connection while detached is noticed by the connection's
//! read event: the listener leaves the worker and the zone, and its request is replayed to end
//! as a parked one whose client went away would (`499`).

// Keys are connection addresses, never a client's data: a fast non-keyed hash is safe.
use rustc_hash::FxHashMap as HashMap;
use std::ffi::c_void;
use std::ptr;

use martd_core::listeners::ListenerKey;
use nginx_sys::{
    ngx_add_timer, ngx_connection_t, ngx_del_timer, ngx_event_t, ngx_http_close_connection,
    ngx_http_core_loc_conf_t, ngx_http_core_module, ngx_http_request_t, ngx_int_t, ngx_msec_t,
    ngx_post_event, ngx_posted_events, ngx_reusable_connection, NGX_HTTP_VERSION_20,
    NGX_USE_CLEAR_EVENT,
};

use crate::conf::LocConf;
use crate::listen::{
    self,
    replay::{replay, Outcome},
};
use crate::worker;

pub(super) type EventHandler = unsafe extern "C" fn(*mut ngx_event_t);

/// One detached listener, keyed by its connection.
pub(super) struct Detached {
    pub(super) conn: *mut ngx_connection_t,
    /// `c->number` when it detached: a closed and reused connection has another.
    pub(super) number: nginx_sys::ngx_atomic_uint_t,
    /// Tells this detachment from a later one on the same connection.
    pub(super) seq: u64,
    /// Where it sits in the worker's listeners; `None` once it left them.
    pub(super) key: Option<ListenerKey>,
    /// The request line and headers, fed back to nginx when the verdict is ready.
    pub(super) request: Box<[u8]>,
    /// The listener timeout (ms, saturated), armed when the connection is taken over.
    pub(super) timeout: u32,
    /// Taken over from nginx's keep-alive handler.
    pub(super) taken_over: bool,
    /// Set when woken: what the replayed request answers.
    pub(super) outcome: Option<Outcome>,
    /// The connection's own `recv`, put back after the replay's one read.
    pub(super) recv: nginx_sys::ngx_recv_pt,
    /// When the request arrived: the replay's `$request_time` counts from there.
    pub(super) start: StartTime,
    /// The client address the access phases saw (`set_real_ip_from` may have changed it),
    /// restored on the replay, whose access phases are skipped.
    pub(super) addr: Option<Box<ClientAddr>>,
    /// Its token charge: discharged when the record goes (replayed or closed).
    pub(super) charge: Option<Box<crate::access::tokens::TokenCharge>>,
}

/// When a request arrived (`r->start_sec`, `r->start_msec`), in 8 bytes: a detached listener
/// is kept small.
#[derive(Debug, Clone, Copy)]
pub(super) struct StartTime(u64);

impl StartTime {
    /// # Safety
    /// `r` is a live request.
    pub(super) unsafe fn of(r: *mut ngx_http_request_t) -> StartTime {
        // SAFETY: `r` is live.
        let (sec, msec) = unsafe { ((*r).start_sec, (*r).start_msec) };
        StartTime((sec.max(0) as u64).saturating_mul(1000).saturating_add(msec as u64))
    }

    pub(super) fn sec(self) -> libc::time_t {
        (self.0 / 1000) as libc::time_t
    }

    pub(super) fn msec(self) -> ngx_msec_t {
        (self.0 % 1000) as ngx_msec_t
    }
}

/// A client address as nginx keeps it on the connection.
#[derive(Debug, Clone)]
pub(super) struct ClientAddr {
    pub(super) sockaddr: Box<[u8]>,
    pub(super) text: Box<[u8]>,
}

/// A worker's detached listeners.
pub struct DetachedListeners {
    pub(super) by_conn: HashMap<usize, Detached>,
    /// Detachments that nginx has yet to put into its keep-alive state.
    pub(super) pending: Vec<(usize, u64)>,
    /// Listeners whose connection detached again while they were still counted (nginx closed
    /// it behind our back); they leave at the next takeover.
    pub(super) orphans: Vec<ListenerKey>,
    /// Their token charges, discharged there too (not under the zone lock `insert` holds).
    orphan_charges: Vec<crate::access::tokens::TokenCharge>,
    pub(super) next_seq: u64,
    pub(super) takeover_ev: Box<ngx_event_t>,
    /// nginx's keep-alive read handler (static in nginx; learned from the first takeover).
    pub(super) keepalive_handler: Option<EventHandler>,
    /// Index of the content phase's first handler in the phase engine.
    pub(crate) content_phase: Option<usize>,
}

impl DetachedListeners {
    pub fn new(takeover_ev: Box<ngx_event_t>) -> Self {
        DetachedListeners {
            by_conn: HashMap::default(),
            pending: Vec::new(),
            orphans: Vec::new(),
            orphan_charges: Vec::new(),
            next_seq: 0,
            takeover_ev,
            keepalive_handler: None,
            content_phase: None,
        }
    }
}

/// A listener about to detach: checked and copied before the zone is asked.
pub struct Prepared {
    conn: *mut ngx_connection_t,
    seq: u64,
    request: Box<[u8]>,
    timeout: ngx_msec_t,
    start: StartTime,
    addr: Option<Box<ClientAddr>>,
    /// Its token charge, kept by its record (see `access::tokens`).
    pub(crate) charge: Option<Box<crate::access::tokens::TokenCharge>>,
}

impl Prepared {
    pub fn handle(&self) -> listen::Handle {
        listen::Handle::Detached { conn: self.conn as usize, seq: self.seq }
    }
}

fn core_loc_conf(r: *mut ngx_http_request_t) -> &'static ngx_http_core_loc_conf_t {
    // SAFETY: every request has the core module's location conf.
    unsafe {
        &*(*(*r).loc_conf.add(ngx_http_core_module.ctx_index) as *const ngx_http_core_loc_conf_t)
    }
}

/// Whether the request's location has no `post_action` (which would run after it).
///
/// # Safety
/// `r` is a live request.
pub(crate) unsafe fn post_action_unset(r: *mut ngx_http_request_t) -> bool {
    core_loc_conf(r).post_action.len == 0
}

/// Whether a connection can sit in nginx's keep-alive state and be resumed: plain TCP, or a
/// finished TLS handshake with nothing decrypted and unread.
///
/// # Safety
/// `c` is a live connection.
pub(crate) unsafe fn transport_ok(c: *mut ngx_connection_t) -> bool {
    // SAFETY: `c` is live; `ngx_io` is nginx's per-process I/O table.
    let (recv, plain) = unsafe { ((*c).recv, nginx_sys::ngx_io.recv) };
    match recv {
        None => false,
        Some(f) if plain.is_some_and(|p| p as usize == f as usize) => true,
        // SAFETY: as above.
        Some(_) => unsafe { tls_ok(c) },
    }
}

#[cfg(ngx_feature = "ssl")]
unsafe fn tls_ok(c: *mut ngx_connection_t) -> bool {
    // SAFETY: `c` is live; its TLS state, when present, lives as long as it.
    unsafe {
        let ssl = (*c).ssl;
        !ssl.is_null()
            && (*ssl).handshaked() != 0
            && !(*ssl).connection.is_null()
            && nginx_sys::SSL_pending((*ssl).connection) == 0
    }
}

/// Built against an nginx without TLS: only plain connections detach.
#[cfg(not(ngx_feature = "ssl"))]
unsafe fn tls_ok(_c: *mut ngx_connection_t) -> bool {
    false
}

/// Whether `r` can detach, and its saved request if so. Only a request that is the sole owner
/// of its connection and whose replay is exactly the same request: an HTTP/1.x keep-alive
/// (plain or TLS) main request that was not redirected internally (`X-Accel-Redirect`,
/// `error_page`, `try_files`, named locations: the replay would run the outer location again),
/// with no subrequest running (`mirror`) and no other reference (`r->count` is one), no body,
/// read whole into the connection's header buffer with nothing after it, on an edge-triggered
/// event method (epoll, kqueue), not counted by limit_conn. Every other listener keeps its
/// parked request.
pub fn prepare(r: *mut ngx_http_request_t, lcf: &LocConf) -> Option<Prepared> {
    if lcf.detach_listeners != 1 {
        return None;
    }
    // SAFETY: `r` is a live main request being handled; its connection, buffers and the
    // nginx globals read here are valid for the duration of the handler.
    unsafe {
        let c = (*r).connection;
        let b = (*r).header_in;
        let ok = transport_ok(c)
            && (nginx_sys::ngx_event_flags & NGX_USE_CLEAR_EVENT as usize) != 0
            && r == (*r).main
            && (*r).internal() == 0
            && (*r).count() == 1
            && (*r).postponed.is_null()
            && (*r).posted_requests.is_null()
            && (*r).background() == 0
            && (*c).data == r as *mut c_void
            && (*r).http_version < NGX_HTTP_VERSION_20 as usize
            && (*r).keepalive() == 1
            && (*r).headers_in.content_length_n <= 0
            && (*r).headers_in.chunked() == 0
            && (*r).discard_body() == 0
            && post_action_unset(r)
            // limit_conn counts the request while it lives: keep it, so the limit holds.
            && (*r).limit_conn_status() == 0
            && !b.is_null()
            && b == (*c).buffer
            && (*b).pos == (*b).last
            && !(*r).request_start.is_null()
            && (*r).request_start >= (*b).start
            && (*r).request_start < (*b).pos;
        if !ok {
            return None;
        }
        let request = saved_request(r)?;
        let seq = worker::with(|st| {
            st.detached.next_seq += 1;
            st.detached.next_seq
        })?;
        Some(Prepared {
            conn: c,
            seq,
            request,
            timeout: lcf.listener_timeout,
            start: StartTime::of(r),
            addr: if realip_changed(r) { client_addr(c).map(Box::new) } else { None },
            charge: None,
        })
    }
}

/// The request line and headers as the client sent them (nginx's parser wrote over the
/// buffer's copy), limited to what fits the connection's header buffer again.
///
/// # Safety
/// `r` is a live request whose headers were read.
unsafe fn saved_request(r: *mut ngx_http_request_t) -> Option<Box<[u8]>> {
    // SAFETY: the request line and the header list live in the live request.
    unsafe {
        let c = (*r).connection;
        let room = (*(*c).buffer).end.offset_from((*(*c).buffer).start) as usize;
        let line = (*r).request_line.as_bytes();
        let mut out = Vec::with_capacity(room.min(512));
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
        let mut part = &(*r).headers_in.headers.part as *const nginx_sys::ngx_list_part_t;
        while !part.is_null() {
            let elts = (*part).elts as *const nginx_sys::ngx_table_elt_t;
            for i in 0..(*part).nelts {
                let h = &*elts.add(i);
                out.extend_from_slice(h.key.as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(h.value.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            part = (*part).next;
        }
        out.extend_from_slice(b"\r\n");
        (out.len() <= room).then(|| out.into_boxed_slice())
    }
}

thread_local! {
    /// The realip module's context index, if this nginx has the module (looked up once: a
    /// module built without it must still load).
    static REALIP_INDEX: std::cell::Cell<Option<Option<usize>>> = const { std::cell::Cell::new(None) };
}

/// Whether the realip module changed this request's client address (it keeps a context in the
/// request exactly when it did). Only then is the address worth keeping for the replay.
///
/// # Safety
/// `r` is a live request.
unsafe fn realip_changed(r: *mut ngx_http_request_t) -> bool {
    let index = REALIP_INDEX.with(|cell| {
        if let Some(known) = cell.get() {
            return known;
        }
        // SAFETY: looking a symbol up in the process; when found it is nginx's module
        // structure, whose `ctx_index` is set once configuration is read.
        let found = unsafe {
            let m = libc::dlsym(libc::RTLD_DEFAULT, c"ngx_http_realip_module".as_ptr())
                as *const nginx_sys::ngx_module_t;
            m.as_ref().map(|m| m.ctx_index)
        };
        cell.set(Some(found));
        found
    });
    // SAFETY: `r->ctx` has one slot per HTTP module; `index` is one of them.
    index.is_some_and(|i| unsafe { !(*(*r).ctx.add(i)).is_null() })
}

/// The connection's client address as it is now.
///
/// # Safety
/// `c` is a live connection.
unsafe fn client_addr(c: *mut ngx_connection_t) -> Option<ClientAddr> {
    // SAFETY: the connection's address and its text live as long as the request.
    unsafe {
        let sa = (*c).sockaddr as *const u8;
        if sa.is_null() || (*c).addr_text.data.is_null() {
            return None;
        }
        Some(ClientAddr {
            sockaddr: std::slice::from_raw_parts(sa, (*c).socklen as usize).into(),
            text: (*c).addr_text.as_bytes().into(),
        })
    }
}

/// Keeps a detached listener (called under the zone lock, right after it parked).
pub fn insert(set: &mut DetachedListeners, p: Prepared, key: ListenerKey) {
    let seq = p.seq;
    // SAFETY: `p.conn` is the live connection of the request being handled.
    let number = unsafe { (*p.conn).number };
    let ck = p.conn as usize;
    let old = set.by_conn.insert(
        ck,
        Detached {
            conn: p.conn,
            number,
            seq,
            key: Some(key),
            request: p.request,
            timeout: u32::try_from(p.timeout).unwrap_or(u32::MAX),
            taken_over: false,
            outcome: None,
            recv: None,
            start: p.start,
            addr: p.addr,
            charge: p.charge,
        },
    );
    if let Some(mut d) = old {
        set.orphans.extend(d.key);
        set.orphan_charges.extend(d.charge.take().map(|c| *c));
    }
    set.pending.push((ck, seq));
    if set.takeover_ev.posted() == 0 {
        // SAFETY: the event is boxed in the worker state and outlives the posted queue.
        unsafe { ngx_post_event(&mut *set.takeover_ev, ptr::addr_of_mut!(ngx_posted_events)) };
    }
}

/// The handler's last step for a detached listener: the request is finalized with `NGX_OK`
/// (no response), which puts its connection into nginx's keep-alive state.
pub fn finish(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: `r` is the live request being handled.
    unsafe {
        // Logged once, when the replayed request is answered.
        (*r).set_logged(1);
        // The replay is the same long-poll: count it once against `keepalive_requests`.
        let c = (*r).connection;
        (*c).requests = (*c).requests.saturating_sub(1);
    }
    nginx_sys::NGX_OK as ngx_int_t
}

pub(super) fn conn_is(d: &Detached) -> bool {
    // SAFETY: connections live in nginx's connection array for the process's life; a closed
    // one has fd -1 and a reused one another number.
    unsafe { (*d.conn).fd != -1 && (*d.conn).number == d.number }
}

/// Posted after detachments: takes their connections over from nginx's keep-alive handler.
pub unsafe extern "C" fn takeover_handler(_ev: *mut ngx_event_t) {
    let Some((pending, orphans, charges)) = worker::with(|st| {
        let set = &mut st.detached;
        let taken = std::mem::take(&mut set.orphan_charges);
        (std::mem::take(&mut set.pending), std::mem::take(&mut set.orphans), taken)
    }) else {
        return;
    };
    for key in orphans {
        listen::leave_key(key);
    }
    drop(charges);
    for (ck, seq) in pending {
        let lost = worker::with(|st| takeover(&mut st.detached, ck, seq)).flatten();
        if let Some(key) = lost.flatten() {
            listen::leave_key(key);
        }
    }
}

/// Takes one connection over; `Some(key to leave)` if the listener is lost: its connection
/// closed, or in a state not expected (then the connection stays nginx's: it is never closed
/// here).
fn takeover(set: &mut DetachedListeners, ck: usize, seq: u64) -> Option<Option<ListenerKey>> {
    let d = set.by_conn.get_mut(&ck)?;
    if d.seq != seq || d.taken_over || d.outcome.is_some() {
        return None;
    }
    if !conn_is(d) {
        // nginx closed it (client gone before the keep-alive state settled).
        let d = set.by_conn.remove(&ck)?;
        return Some(d.key);
    }
    // SAFETY: `d.conn` is our live connection (checked above), in nginx's keep-alive state.
    unsafe {
        let c = d.conn;
        let rev = (*c).read;
        let handler = (*rev).handler;
        let expected = match (set.keepalive_handler, handler) {
            (_, None) => false,
            (None, Some(h)) => {
                set.keepalive_handler = Some(h);
                true
            }
            (Some(k), Some(h)) => k as usize == h as usize,
        };
        if !expected || (*c).close() != 0 || (*c).error() != 0 {
            let d = set.by_conn.remove(&ck)?;
            martd_debug!((*c).log, "detached listener left to nginx: unexpected state");
            return Some(d.key);
        }
        (*c).set_idle(0);
        ngx_reusable_connection(c, 0);
        (*rev).handler = Some(detached_read_handler);
        if (*rev).timer_set() != 0 {
            ngx_del_timer(rev);
        }
        if d.timeout > 0 {
            ngx_add_timer(rev, d.timeout as ngx_msec_t);
        }
        (*(*c).log).action = c"waiting for a martd message".as_ptr() as *mut _;
        d.taken_over = true;
        martd_debug!((*c).log, "detached listener #{} waits without its request", d.seq);
    }
    None
}

/// Read events of a detached connection: its timeout, or the client closing (or sending).
pub(super) unsafe extern "C" fn detached_read_handler(rev: *mut ngx_event_t) {
    // SAFETY: nginx calls read handlers with the connection's live read event.
    let c = unsafe { (*rev).data as *mut ngx_connection_t };
    let ck = c as usize;
    // SAFETY: as above.
    if unsafe { (*rev).timedout() } != 0 {
        // SAFETY: as above.
        unsafe { (*rev).set_timedout(0) };
        let key =
            worker::with(|st| st.detached.by_conn.get_mut(&ck).map(|d| (d.key.take(), d.seq)));
        match key.flatten() {
            Some((key, seq)) => {
                if let Some(key) = key {
                    listen::leave_key(key);
                }
                replay(ck, seq, Outcome::Answer(None));
            }
            // SAFETY: a connection of ours that no listener refers to: nothing would ever
            // answer it.
            None => unsafe { ngx_http_close_connection(c) },
        }
        return;
    }
    // SAFETY: `c` is live. As nginx's own `ngx_http_test_reading`: the peer's shutdown as
    // reported by epoll (`EPOLLRDHUP`) is a close; else a one-byte peek tells a close from data
    // (left for nginx to read after the answer, as a pipelined request).
    let closed = unsafe {
        (*c).close() != 0 || (*rev).pending_eof() != 0 || {
            let mut byte = 0u8;
            let n = libc::recv((*c).fd, (&mut byte as *mut u8).cast(), 1, libc::MSG_PEEK);
            n == 0 || (n < 0 && *libc::__errno_location() != libc::EAGAIN)
        }
    };
    if !closed {
        return;
    }
    let found = worker::with(|st| st.detached.by_conn.get_mut(&ck).map(|d| (d.key.take(), d.seq)))
        .flatten();
    let Some((key, seq)) = found else {
        // SAFETY: our live connection; nothing refers to it.
        unsafe {
            (*rev).set_eof(1);
            (*c).set_error(1);
            ngx_http_close_connection(c);
        }
        return;
    };
    if let Some(key) = key {
        listen::leave_key(key);
    }
    // SAFETY: `c` is live.
    martd_debug!(unsafe { (*c).log }, "detached listener's client closed the connection");
    // The request ends as a parked one whose client goes away: `499`, logged.
    replay(ck, seq, Outcome::ClientGone);
}
