//! Replaying a detached listener's request.
//!
//! When the listener's verdict is ready (a message, `304`, `409`, `410`) the saved request is
//! handed back to nginx through the connection's `recv`: nginx parses and routes it again,
//! [`preaccess_handler`] skips the access phases it passed before (restoring the start time and
//! the client address they saw), and the `martd_listen` handler answers it with the verdict it
//! was woken with ([`take_outcome`]). The access log shows one line per long-poll, written when
//! it is answered.

use std::ffi::c_void;
use std::ptr;

use martd_core::listeners::Verdict;
use nginx_sys::{
    ngx_add_timer, ngx_connection_t, ngx_http_request_t, ngx_int_t, u_char, NGX_DECLINED, NGX_ERROR,
};

use super::detach::{conn_is, detached_read_handler, ClientAddr, EventHandler, StartTime};
use crate::conf::Role;
use crate::listen;
use crate::worker;

/// What a replayed request answers.
#[derive(Debug)]
pub enum Outcome {
    /// The verdict it was woken with (`None`: `304`).
    Answer(Option<Verdict>),
    /// The client went away while detached: the request ends as a parked one would (`499`).
    ClientGone,
}

/// Answers a detached listener that has left the worker's listeners: its saved request is
/// fed back to nginx, whose `martd_listen` handler answers it with `outcome`. A handle of an
/// earlier detachment on the same connection (another `seq`) answers nothing.
pub fn replay(ck: usize, seq: u64, outcome: Outcome) {
    let prepared = worker::with(|st| {
        let set = &mut st.detached;
        let d = set.by_conn.get_mut(&ck).filter(|d| d.seq == seq)?;
        d.key = None;
        if !conn_is(d) {
            set.by_conn.remove(&ck);
            return None;
        }
        d.outcome = Some(outcome);
        // SAFETY: `d.conn` is live (checked above).
        d.recv = unsafe { (*d.conn).recv };
        Some((d.conn, d.seq, set.keepalive_handler))
    })
    .flatten();
    let Some((c, seq, keepalive)) = prepared else {
        return;
    };
    // SAFETY: `c` is live.
    martd_debug!(unsafe { (*c).log }, "replaying detached listener #{}", seq);
    // SAFETY: `c` is our live connection, idle in the keep-alive state (taken over or not
    // yet): nginx's keep-alive handler reads the next request from it through `c->recv`,
    // which gives it the saved request once. The handler deletes the read timer
    // unconditionally, so one is armed.
    unsafe {
        let rev = (*c).read;
        if (*rev).handler.map(|h| h as usize) == Some(detached_read_handler as *const () as usize) {
            (*rev).handler = keepalive.map(|h| h as EventHandler);
        }
        let Some(handler) = (*rev).handler else {
            // Not a state we know: the connection stays nginx's.
            worker::with(|st| st.detached.by_conn.remove(&ck));
            return;
        };
        if (*rev).timer_set() == 0 {
            ngx_add_timer(rev, 60_000);
        }
        (*rev).set_timedout(0);
        (*c).recv = Some(replay_recv);
        handler(rev);
    }
    // Normally the replayed request took its outcome in its handler. If it did not (it was
    // routed elsewhere, or is still on its way), forget it: a request that reaches
    // `martd_listen` later is a fresh listener with the same ids.
    worker::with(|st| {
        if st.detached.by_conn.get(&ck).is_some_and(|d| d.seq == seq && d.outcome.is_some()) {
            st.detached.by_conn.remove(&ck);
        }
    });
}

/// The connection's `recv` during a replay: the saved request, once.
unsafe extern "C" fn replay_recv(c: *mut ngx_connection_t, buf: *mut u_char, size: usize) -> isize {
    let saved = worker::with(|st| {
        let d = st.detached.by_conn.get_mut(&(c as usize))?;
        Some((std::mem::take(&mut d.request), d.recv))
    })
    .flatten();
    let Some((request, recv)) = saved else {
        return NGX_ERROR as isize;
    };
    // SAFETY: `c` is live; nginx gives a buffer of `size` bytes.
    unsafe {
        (*c).recv = recv;
        if request.is_empty() || request.len() > size {
            return NGX_ERROR as isize;
        }
        ptr::copy_nonoverlapping(request.as_ptr(), buf, request.len());
    }
    request.len() as isize
}

/// For the `martd_listen` handler: the outcome of a replayed request, if `r` is one.
pub fn take_outcome(r: *mut ngx_http_request_t) -> Option<Outcome> {
    // SAFETY: `r` is a live request.
    let (c, main) = unsafe { ((*r).connection, (*r).main) };
    if r != main {
        return None;
    }
    worker::with(|st| {
        let d = st.detached.by_conn.get(&(c as usize))?;
        if d.outcome.is_none() || !conn_is(d) {
            return None;
        }
        st.detached.by_conn.remove(&(c as usize))?.outcome
    })
    .flatten()
}

/// If `r` is a replayed listener request: when it first arrived, and the client address its
/// access phases saw.
fn replay_context(r: *mut ngx_http_request_t) -> Option<(StartTime, Option<Box<ClientAddr>>)> {
    // SAFETY: `r` is a live request.
    let (c, main) = unsafe { ((*r).connection, (*r).main) };
    if r != main {
        return None;
    }
    worker::with(|st| {
        let d = st.detached.by_conn.get(&(c as usize)).filter(|d| d.outcome.is_some())?;
        Some((d.start, d.addr.clone()))
    })
    .flatten()
}

/// The connection's address before [`restore_client_addr`] changed it for one request.
#[repr(C)]
struct SavedAddr {
    conn: *mut ngx_connection_t,
    sockaddr: *mut nginx_sys::sockaddr,
    socklen: nginx_sys::socklen_t,
    addr_text: nginx_sys::ngx_str_t,
}

extern "C" fn restore_saved_addr(data: *mut c_void) {
    // SAFETY: `data` is the `SavedAddr` written by `restore_client_addr`; its connection
    // outlives the request pool being destroyed.
    unsafe {
        let s = &*(data as *const SavedAddr);
        (*s.conn).sockaddr = s.sockaddr;
        (*s.conn).socklen = s.socklen;
        (*s.conn).addr_text = s.addr_text;
    }
}

/// Puts back the client address that the first pass's access phases saw (as
/// `set_real_ip_from` left it), for this request only: as the realip module does, the
/// connection gets its own address back when the request pool goes.
fn restore_client_addr(r: *mut ngx_http_request_t, addr: &ClientAddr) -> Option<()> {
    // SAFETY: `r` and its connection are live; copies live in the request pool, and the
    // cleanup restores the connection's own values before that pool is freed.
    unsafe {
        let c = (*r).connection;
        let now = std::slice::from_raw_parts((*c).sockaddr as *const u8, (*c).socklen as usize);
        if now == &addr.sockaddr[..] && (*c).addr_text.as_bytes() == &addr.text[..] {
            return Some(());
        }
        let pool = (*r).pool;
        let sa = nginx_sys::ngx_pnalloc(pool, addr.sockaddr.len()) as *mut u8;
        let text = nginx_sys::ngx_pnalloc(pool, addr.text.len().max(1)) as *mut u8;
        let cln = nginx_sys::ngx_pool_cleanup_add(pool, size_of::<SavedAddr>());
        if sa.is_null() || text.is_null() || cln.is_null() {
            return None;
        }
        ptr::copy_nonoverlapping(addr.sockaddr.as_ptr(), sa, addr.sockaddr.len());
        ptr::copy_nonoverlapping(addr.text.as_ptr(), text, addr.text.len());
        ptr::write(
            (*cln).data as *mut SavedAddr,
            SavedAddr {
                conn: c,
                sockaddr: (*c).sockaddr,
                socklen: (*c).socklen,
                addr_text: (*c).addr_text,
            },
        );
        (*cln).handler = Some(restore_saved_addr);
        (*c).sockaddr = sa.cast();
        (*c).socklen = addr.sockaddr.len() as nginx_sys::socklen_t;
        (*c).addr_text = nginx_sys::ngx_str_t { len: addr.text.len(), data: text };
    }
    Some(())
}

/// Preaccess phase: a replayed listener request already passed the access phases when it
/// parked; it goes straight to the content phase (so `limit_req`, `auth_request` and the like
/// count a long-poll once).
pub unsafe extern "C" fn preaccess_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // The location check first: it is a pointer read, and this runs for every request.
    if listen::loc_conf(r).role != Role::Listen {
        return NGX_DECLINED as ngx_int_t;
    }
    let Some((start, addr)) = replay_context(r) else {
        return NGX_DECLINED as ngx_int_t;
    };
    // SAFETY: `r` is live.
    unsafe {
        (*r).start_sec = start.sec();
        (*r).start_msec = start.msec();
    }
    if let Some(addr) = addr {
        if restore_client_addr(r, &addr).is_none() {
            return nginx_sys::NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
        }
    }
    // SAFETY: `r` is live.
    martd_debug!(unsafe { (*(*r).connection).log }, "replayed listener skips the access phases");
    crate::access::skip_to_content(r);
    NGX_DECLINED as ngx_int_t
}
