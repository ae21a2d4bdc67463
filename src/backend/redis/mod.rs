//! `martd_redis_url`: several nginx nodes share channels through Redis.
//!
//! Listeners are served from the local zone only; Redis carries the messages. A message
//! enters a node's zone only from that node's Redis thread, in the order of the channel's
//! Redis stream, with the id Redis gave it, so ids are the same on every node and a listener
//! can resume on any node with its `Etag`:
//!
//! 1. A worker's publish goes to the zone's outbox (`martd_core::store::Outbox`) and its
//!    request is held (see `persist::held`).
//! 2. One worker per node (a lease in the zone root) runs the Redis thread: a tokio runtime
//!    of its own with a multiplexed connection and a subscription, never the event loop. It
//!    takes the outbox, and for each publish runs a script that gives the message its id
//!    (larger than the channel's last one, from Redis's clock as martd makes ids), appends it
//!    to the channel's stream (`MAXLEN ~`), and announces the channel on `NS:pub`.
//! 3. On its own reply, or another node's announcement, the thread reads the channel's stream
//!    after the last id this zone has and stores each message (`Store::insert_remote`), which
//!    wakes the listeners of every worker; then it posts the publish's outcome and wakes the
//!    publisher's worker, which answers `201`/`202`.
//! 4. When the thread (re)connects it reads every channel's stream, so a node that starts or
//!    comes back has what was published meanwhile.
//! 5. Redis unreachable: publishes get `503` with a reason; listeners keep waiting; the thread
//!    reconnects with a capped backoff and logs each change of state once.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use martd_core::persist::{decode_one, Record};

use self::streams::{fetch, load_all, post};
use martd_core::store::Done;
use nginx_sys::{NGX_LOG_ERR, NGX_LOG_NOTICE};

use crate::backend::side::{self, Conf, Shared, SideThread};
use crate::conf::MainConf;
use crate::zone::{self, ZoneRoot};

mod streams;

/// The outbox's room: a sixteenth of the zone, between 64 KB and 16 MB.
fn outbox_cap(mcf: &MainConf) -> usize {
    (mcf.shm_size / 16).clamp(64 << 10, 16 << 20)
}

/// Longest wait between two tries to reach Redis.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Entries read per `XRANGE`.
pub(super) const FETCH_BATCH: usize = 1000;

/// Gives a message its id, appends it to its channel's stream and announces the channel.
/// KEYS: stream, last id. ARGV: maxlen, record, announce channel, channel name.
const PUBLISH_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + math.floor(tonumber(t[2]) / 1000) * 1000
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
local id = last + 1
if now > id then id = now end
local sid = string.format('%.0f', id)
redis.call('SET', KEYS[2], sid)
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], sid .. '-0', 'm', ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return sid
";

/// Checks a `martd_redis_url` value.
pub fn check_url(url: &str) -> Result<(), String> {
    if url.starts_with("rediss://") {
        return Err("rediss:// (TLS) is not supported by this build".into());
    }
    if !url.starts_with("redis://") {
        return Err("not a redis:// url".into());
    }
    redis::Client::open(url).map(drop).map_err(|e| e.to_string())
}

fn url_of(mcf: &MainConf) -> Option<String> {
    let u = crate::conf::conf_bytes(&mcf.redis_url);
    (!u.is_empty()).then(|| String::from_utf8_lossy(u).into_owned())
}

fn namespace(mcf: &MainConf) -> Vec<u8> {
    let n = crate::conf::conf_bytes(&mcf.redis_namespace);
    if n.is_empty() {
        b"martd".to_vec()
    } else {
        n.to_vec()
    }
}

pub(super) fn stream_key(ns: &[u8], ch: &[u8]) -> Vec<u8> {
    [ns, b":{", ch, b"}:s"].concat()
}

fn last_key(ns: &[u8], ch: &[u8]) -> Vec<u8> {
    [ns, b":{", ch, b"}:l"].concat()
}

/// The channel a stream key names.
pub(super) fn channel_of(ns: &[u8], key: &[u8]) -> Option<Vec<u8>> {
    let rest = key.strip_prefix(ns)?.strip_prefix(b":{")?;
    Some(rest.strip_suffix(b"}:s")?.to_vec())
}

/// `init_zone` (the master): the outbox on or off for this configuration.
pub fn configure(mcf: &MainConf, root: &mut ZoneRoot) -> Result<(), ()> {
    if url_of(mcf).is_none() {
        root.store.disable_outbox();
        return Ok(());
    }
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
    let Some(url) = url_of(mcf) else { return };
    side::tick(&THREAD, mcf, lease, "martd-redis", move |conf, shared| run(conf, url, shared));
}

/// `exit_process`: the thread stops; the lease is given back.
pub fn stop(mcf: &'static MainConf) {
    side::stop(&THREAD, mcf, lease);
}

/// Sends wake-ups to worker slots.
pub(super) fn wake(nonce: u64, slots: impl IntoIterator<Item = u32>) {
    if let Ok(fd) = crate::notify::sender() {
        for slot in slots {
            crate::notify::send(fd, nonce, slot);
        }
        crate::notify::close(fd);
    }
}

fn run(conf: Conf, url: String, shared: Arc<Shared>) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().enable_io().build();
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            shared.log(NGX_LOG_ERR, format!("martd_redis_url: no runtime: {e}"));
            return;
        }
    };
    rt.block_on(session_loop(conf.0, url, shared));
}

/// Connects, serves, and reconnects with a capped backoff until stopped.
async fn session_loop(mcf: &'static MainConf, url: String, shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(100);
    let mut was_up: Option<bool> = None;
    while !shared.stopping() {
        let result = session(mcf, &url, &shared, &mut was_up).await;
        if shared.stopping() {
            break;
        }
        set_down(mcf, true);
        if was_up != Some(false) {
            let why = result.err().unwrap_or_else(|| "connection closed".into());
            shared.log(NGX_LOG_ERR, format!("martd_redis_url \"{url}\": unavailable: {why}"));
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
        store.outbox_done(Done { seq: o.seq, slot: o.slot, id: 0, listeners: 0 });
    }
    drop(z);
    wake(nonce, failed.iter().map(|o| o.slot));
}

pub(super) type Conn = redis::aio::MultiplexedConnection;

async fn session(
    mcf: &'static MainConf,
    url: &str,
    shared: &Shared,
    was_up: &mut Option<bool>,
) -> Result<(), String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let connect = client.get_multiplexed_async_connection();
    let mut conn = tokio::time::timeout(Duration::from_secs(3), connect)
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let mut pubsub = client.get_async_pubsub().await.map_err(|e| e.to_string())?;
    let ns = namespace(mcf);
    let announce = [&ns[..], b":pub"].concat();
    pubsub.subscribe(&announce).await.map_err(|e| e.to_string())?;
    let script = redis::Script::new(PUBLISH_SCRIPT);
    // Everything published while this node was away.
    load_all(mcf, &mut conn, &ns).await?;
    set_down(mcf, false);
    if *was_up != Some(true) {
        shared.log(NGX_LOG_NOTICE, format!("martd_redis_url \"{url}\": connected"));
        *was_up = Some(true);
    }
    let mut messages = pubsub.on_message();
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    loop {
        if shared.stopping() {
            return Ok(());
        }
        tokio::select! {
            m = messages.next() => {
                let Some(m) = m else { return Err("subscription closed".into()) };
                let ch: Vec<u8> = m.get_payload_bytes().to_vec();
                fetch(mcf, &mut conn, &ns, &ch).await?;
            }
            _ = tick.tick() => {
                publish_outbox(mcf, &mut conn, &script, &ns, &announce).await?;
            }
        }
    }
}

/// Publishes what the outbox holds, in order, and posts each outcome.
async fn publish_outbox(
    mcf: &'static MainConf,
    conn: &mut Conn,
    script: &redis::Script,
    ns: &[u8],
    announce: &[u8],
) -> Result<(), String> {
    let items = match zone::lock(mcf) {
        Some(mut z) => z.store().outbox_take(),
        None => return Ok(()),
    };
    for (i, o) in items.iter().enumerate() {
        let keep = match decode_one(&o.record) {
            Some(Record::Message(m)) => m.keep.max(1),
            _ => 1,
        };
        let res: Result<String, _> = script
            .key(stream_key(ns, &o.channel))
            .key(last_key(ns, &o.channel))
            .arg(keep)
            .arg(&o.record[..])
            .arg(announce)
            .arg(&o.channel[..])
            .invoke_async(conn)
            .await;
        let id = match res {
            Ok(s) => s.parse::<u64>().unwrap_or(0),
            Err(e) => {
                // This one and the rest fail; the session starts again.
                post(mcf, &items[i..], 0);
                return Err(e.to_string());
            }
        };
        fetch(mcf, conn, ns, &o.channel).await?;
        post(mcf, std::slice::from_ref(o), id);
    }
    Ok(())
}
