//! `martd_redis_url`: several nginx nodes share channels through Redis (a standalone server,
//! or a Redis Cluster with `martd_redis_cluster on`).
//!
//! Listeners are served from the local zone only; Redis carries the messages. A message
//! enters a node's zone only from that node's Redis thread, in the order of the channel's
//! Redis stream, with the id Redis gave it, so ids are the same on every node and a listener
//! can resume on any node with its `Etag`:
//!
//! 1. A worker's publish goes to the zone's outbox (`martd_core::store::Outbox`), its request
//!    is held (see `backend::held`), and the first publish of a burst sends the Redis thread
//!    a datagram (its address is [`crate::notify::ENGINE_SLOT`]'s).
//! 2. One worker per node (a lease in the zone root) runs the Redis thread: a tokio runtime
//!    of its own, never the event loop. It takes the whole outbox and publishes it pipelined
//!    (see [`publish`]): a script gives each message its id (larger than the channel's last
//!    one, from Redis's clock as martd makes ids), appends it to the channel's stream
//!    (`MAXLEN ~`) and announces it on `NS:pub` with the id it follows.
//! 3. A node whose zone has the id a message follows stores it at once (from its own reply,
//!    or another node's announcement), `Store::insert_remote`, which wakes the listeners of
//!    every worker; a node that missed something reads the channel's stream past its last id
//!    (see [`streams`]). Then the publisher's worker is woken and answers `201`/`202`.
//! 4. When the thread (re)connects it reads every channel's stream (every master's, in a
//!    cluster), so a node that starts or comes back has what was published meanwhile.
//! 5. Redis unreachable: publishes get `503` with a reason; listeners keep waiting; the thread
//!    reconnects with a capped backoff and logs each change of state once.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use martd_core::store::Done;
use nginx_sys::{NGX_LOG_ERR, NGX_LOG_NOTICE};

use self::link::{Link, Servers};
use self::publish::Publisher;
use self::streams::{fetch, load_all};

use crate::backend::side::{self, Conf, Shared, SideThread};
use crate::conf::MainConf;
use crate::zone::{self, ZoneRoot};

mod link;
mod publish;
mod streams;

/// The outbox's room: a sixteenth of the zone, between 64 KB and 16 MB.
fn outbox_cap(mcf: &MainConf) -> usize {
    (mcf.shm_size / 16).clamp(64 << 10, 16 << 20)
}

/// Longest wait between two tries to reach Redis.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Entries read per `XRANGE`.
pub(super) const FETCH_BATCH: usize = 1000;

/// Checks a `martd_redis_url` value.
pub fn check_url(url: &str) -> Result<(), String> {
    if !url.starts_with("redis://") && !url.starts_with("rediss://") {
        return Err("not a redis:// or rediss:// url".into());
    }
    redis::Client::open(url).map(drop).map_err(|e| e.to_string())
}

/// The configured servers (none: off).
fn servers_of(mcf: &MainConf) -> Option<Servers> {
    let u = String::from_utf8_lossy(crate::conf::conf_bytes(&mcf.redis_url)).into_owned();
    let urls: Vec<String> = u.split(' ').filter(|s| !s.is_empty()).map(String::from).collect();
    let ca = crate::conf::conf_bytes(&mcf.redis_ca);
    let ca = (!ca.is_empty()).then(|| ca.to_vec());
    (!urls.is_empty()).then_some(Servers { urls, cluster: mcf.redis_cluster == 1, ca })
}

fn namespace(mcf: &MainConf) -> Vec<u8> {
    let n = crate::conf::conf_bytes(&mcf.redis_namespace);
    if n.is_empty() {
        b"martd".to_vec()
    } else {
        n.to_vec()
    }
}

/// `init_zone` (the master): the outbox on or off for this configuration.
pub fn configure(mcf: &MainConf, root: &mut ZoneRoot) -> Result<(), ()> {
    if servers_of(mcf).is_none() {
        root.store.disable_outbox();
        return Ok(());
    }
    // Keys and tokens hash alike on every node of the namespace.
    root.salt = martd_core::redis::shared_salt(&namespace(mcf));
    root.store.enable_outbox(outbox_cap(mcf)).map_err(drop)
}

thread_local! {
    static THREAD: std::cell::RefCell<Option<SideThread>> = const { std::cell::RefCell::new(None) };
}

fn lease(root: &mut ZoneRoot) -> &mut i32 {
    &mut root.redis_owner
}

/// A worker's tick (start, and once a second): takes the Redis lease if nobody holds it, and
/// logs what its thread has to say.
pub fn tick(mcf: &'static MainConf) {
    let Some(servers) = servers_of(mcf) else { return };
    side::tick(&THREAD, mcf, lease, "martd-redis", move |conf, shared| run(conf, servers, shared));
}

/// `exit_process`: the thread stops; the lease is given back.
pub fn stop(mcf: &'static MainConf) {
    side::stop(&THREAD, mcf, lease);
}

/// A worker queued the first publish of a burst: wakes the Redis thread. If none listens, the
/// next publish tries again (and the thread looks at the outbox every 100 ms anyway).
pub fn signal(mcf: &'static MainConf) {
    if crate::worker::send_to(crate::notify::ENGINE_SLOT) == Some(crate::notify::Sent::Gone) {
        if let Some(mut z) = zone::lock(mcf) {
            z.store().outbox_unsignal();
        }
    }
}

thread_local! {
    /// The Redis thread's socket to send wake-ups from (made once; a socket per wake-up
    /// costs more than the rest of a publish).
    static SENDER: std::cell::Cell<libc::c_int> = const { std::cell::Cell::new(-1) };
}

/// Sends one wake-up to each of the worker slots named (once each).
pub(super) fn wake(nonce: u64, slots: impl IntoIterator<Item = u32>) {
    let mut sent: Vec<u32> = Vec::new();
    let fd = SENDER.with(|s| {
        if s.get() < 0 {
            s.set(crate::notify::sender().unwrap_or(-1));
        }
        s.get()
    });
    if fd < 0 {
        return;
    }
    for slot in slots {
        if !sent.contains(&slot) {
            sent.push(slot);
            crate::notify::send(fd, nonce, slot);
        }
    }
}

/// Closes the thread's wake-up socket (the thread ends).
fn close_sender() {
    SENDER.with(|s| {
        if s.get() >= 0 {
            crate::notify::close(s.replace(-1));
        }
    });
}

fn run(conf: Conf, servers: Servers, shared: Arc<Shared>) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().enable_io().build();
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            shared.log(NGX_LOG_ERR, format!("martd_redis_url: no runtime: {e}"));
            return;
        }
    };
    rt.block_on(session_loop(conf.0, servers, shared));
    close_sender();
}

/// The thread's wake-up socket, at the engine's address of the zone.
struct Waker {
    sock: Option<tokio::net::UnixDatagram>,
}

impl Waker {
    /// Binds the socket (it may still be bound by the thread of a worker that is exiting:
    /// then later).
    fn bind(&mut self, mcf: &'static MainConf) {
        if self.sock.is_some() {
            return;
        }
        let Some(nonce) = zone::lock(mcf).map(|mut z| z.root().nonce) else { return };
        let Ok(fd) = crate::notify::bind(nonce, crate::notify::ENGINE_SLOT) else { return };
        // SAFETY: `fd` is a non-blocking datagram socket just made and owned by nothing else.
        let std = unsafe {
            <std::os::unix::net::UnixDatagram as std::os::fd::FromRawFd>::from_raw_fd(fd)
        };
        self.sock = tokio::net::UnixDatagram::from_std(std).ok();
    }

    /// Waits for a wake-up and drains the socket (never, unbound).
    async fn woken(&self) {
        let Some(sock) = &self.sock else { return std::future::pending().await };
        let mut buf = [0u8; 16];
        let _ = sock.recv(&mut buf).await;
        while sock.try_recv(&mut buf).is_ok() {}
    }
}

/// Connects, serves, and reconnects with a capped backoff until stopped.
async fn session_loop(mcf: &'static MainConf, servers: Servers, shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(100);
    let mut was_up: Option<bool> = None;
    let shown = servers.shown();
    let mut waker = Waker { sock: None };
    waker.bind(mcf);
    while !shared.stopping() {
        let result = session(mcf, &servers, &shared, &mut was_up, &mut waker).await;
        if shared.stopping() {
            break;
        }
        set_down(mcf, true);
        if was_up != Some(false) {
            let why = result.err().unwrap_or_else(|| "connection closed".into());
            shared.log(NGX_LOG_ERR, format!("martd_redis_url \"{shown}\": unavailable: {why}"));
            was_up = Some(false);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
        if was_up == Some(true) {
            backoff = Duration::from_millis(100);
        }
    }
    set_down(mcf, true);
}

/// Marks Redis up or down; down, every publish waiting in the outbox fails (`503`).
fn set_down(mcf: &'static MainConf, down: bool) {
    let Some(mut z) = zone::lock(mcf) else { return };
    let nonce = z.root().nonce;
    let store = z.store();
    store.outbox_set_down(down);
    if !down {
        return;
    }
    let failed = store.outbox_take();
    for o in &failed {
        store.outbox_done(Done {
            seq: o.seq,
            slot: o.slot,
            id: 0,
            listeners: 0,
            info: None,
            unconfirmed: false,
        });
    }
    drop(z);
    wake(nonce, failed.iter().map(|o| o.slot));
}

async fn session(
    mcf: &'static MainConf,
    servers: &Servers,
    shared: &Shared,
    was_up: &mut Option<bool>,
    waker: &mut Waker,
) -> Result<(), String> {
    let mut link: Link = link::connect(servers).await?;
    let ns = namespace(mcf);
    let announce = [&ns[..], b":pub"].concat();
    let mut pubsub = link::subscribe(servers, &announce).await?;
    // Everything published while this node was away.
    load_all(mcf, &mut link, servers, &ns).await?;
    set_down(mcf, false);
    if *was_up != Some(true) {
        let shown = servers.shown();
        shared.log(NGX_LOG_NOTICE, format!("martd_redis_url \"{shown}\": connected"));
        *was_up = Some(true);
    }
    let sha = publish::load_script(&mut link).await?;
    let publisher = Publisher {
        sha,
        ns: ns.clone(),
        announce,
        wait_replicas: mcf.redis_wait_replicas as i64,
        wait_ms: mcf.redis_wait_ms as u64,
        origin: crate::notify::new_nonce(),
    };
    let mut messages = pubsub.on_message();
    loop {
        if shared.stopping() {
            return Ok(());
        }
        // Without its socket the thread looks at the outbox often; with it, now and then
        // (a wake-up lost to a full socket queue, a publish queued as the thread changed).
        let every = if waker.sock.is_some() { 100 } else { 2 };
        tokio::select! {
            m = messages.next() => {
                let Some(m) = m else { return Err("subscription closed".into()) };
                if let Some(ch) = publish::announced(mcf, &publisher, m.get_payload_bytes()) {
                    fetch(mcf, &mut link, &ns, &ch).await?;
                }
            }
            _ = waker.woken() => publish::outbox(mcf, &mut link, &publisher).await?,
            _ = tokio::time::sleep(Duration::from_millis(every)) => {
                waker.bind(mcf);
                publish::outbox(mcf, &mut link, &publisher).await?;
            }
        }
    }
}
