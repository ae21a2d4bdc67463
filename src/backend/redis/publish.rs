//! Publishing through Redis, and what other nodes publish.
//!
//! The thread takes the whole outbox at once and sends it as pipelines, one per channel (a
//! cluster routes each to the master of the channel's slot; a standalone server gets them
//! all in one round trip). Each publish runs [`SCRIPT`], which gives the message its id,
//! appends it to the channel's stream and announces it with the id it follows, and the
//! message itself when it is small. A node whose zone has the id the message follows stores
//! it straight from the reply or the announcement; any other node (it missed something)
//! reads the channel's stream instead. With `martd_redis_wait`, each pipeline ends with
//! `WAIT`, and its publishes are refused unless enough replicas had them in time.

use std::collections::HashMap;

use martd_core::persist::{decode_one, Record};
use martd_core::store::{Done, Outgoing};
use redis::Value;

use super::link::Link;
use super::streams::fetch;
use martd_core::redis::{attrs_key, last_key, stream_key, Kind};

use super::wake;
use crate::conf::MainConf;
use crate::zone;

/// Gives a message its id (larger than the channel's last one, from Redis's clock as martd
/// makes ids), appends it to the channel's stream and announces it.
/// KEYS: stream, last id. ARGV: buffer length, record, announce channel, channel name, the
/// publishing node's session. Announces `<session> <previous id> <id> <channel length>
/// <channel> [<record>]` (the record only up to 64 KB); returns `{id, previous id}`.
const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + math.floor(tonumber(t[2]) / 1000) * 1000
local prev = redis.call('GET', KEYS[2]) or '0'
local id = tonumber(prev) + 1
if now > id then id = now end
local sid = string.format('%.0f', id)
redis.call('SET', KEYS[2], sid)
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], sid .. '-0', 'm', ARGV[2])
local body = ''
if string.len(ARGV[2]) <= 65536 then body = ' ' .. ARGV[2] end
redis.call('PUBLISH', ARGV[3], ARGV[5] .. ' ' .. prev .. ' ' .. sid .. ' ' .. string.len(ARGV[4]) .. ' ' .. ARGV[4] .. body)
return {sid, prev}
";

/// Deletes a channel's stream and attributes (its last id stays, so ids keep growing) and
/// announces it. KEYS: stream, attributes. ARGV: announce channel, channel name, the node's
/// session. Returns `{1, 0}` (done; no message).
const DELETE_SCRIPT: &str = r"
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('PUBLISH', ARGV[1], ARGV[3] .. ' delete ' .. string.len(ARGV[2]) .. ' ' .. ARGV[2])
return {'1', '0'}
";

/// Keeps a channel's whole attributes and announces them.
/// KEYS: attributes. ARGV: record, announce channel, channel name, the node's session.
/// Returns `{1, 0}` (done; no message).
const ATTRS_SCRIPT: &str = r"
redis.call('SET', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[4] .. ' attrs ' .. string.len(ARGV[3]) .. ' ' .. ARGV[3] .. ' ' .. ARGV[1])
return {'1', '0'}
";

/// The thread's view of the configuration.
pub struct Publisher {
    pub ns: Vec<u8>,
    pub announce: Vec<u8>,
    pub wait_replicas: i64,
    pub wait_ms: u64,
    /// This session's mark on its announcements (it has stored its own already).
    pub origin: u64,
    /// The publish script's SHA-1, loaded on every server when the session starts (a server
    /// that lost it, say a replica promoted since, answers `NOSCRIPT`: the pipeline fails and
    /// the session starts again, loading it).
    pub sha: String,
}

/// Loads the publish script on every server (each node of a cluster); its SHA-1.
pub async fn load_script(link: &mut Link) -> Result<String, String> {
    let sha: redis::Value = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(SCRIPT)
        .query_async(link)
        .await
        .map_err(|e| e.to_string())?;
    match sha {
        Value::BulkString(b) => String::from_utf8(b).map_err(|e| e.to_string()),
        Value::SimpleString(s) => Ok(s),
        other => Err(format!("SCRIPT LOAD answered {other:?}")),
    }
}

/// A publish's place in Redis: its id, the id it follows, and whether enough replicas
/// confirmed it (`None`: refused).
type Placed = Option<(u64, u64, bool)>;

/// Publishes what the outbox holds and posts each outcome. An error of the connection fails
/// every publish not answered yet (`503`) and ends the session.
pub async fn outbox(mcf: &'static MainConf, link: &mut Link, p: &Publisher) -> Result<(), String> {
    let items = match zone::lock(mcf) {
        Some(mut z) => z.store().outbox_take(),
        None => return Ok(()),
    };
    if items.is_empty() {
        return Ok(());
    }
    // A standalone server takes the whole batch as one pipeline; a cluster, one per channel
    // (each goes to the master of its channel's slot). In order either way.
    let groups: Vec<Vec<usize>> = match link {
        Link::One(_) => vec![(0..items.len()).collect()],
        Link::Cluster(_) => {
            let mut by_channel: HashMap<&[u8], usize> = HashMap::new();
            let mut groups: Vec<Vec<usize>> = Vec::new();
            for (i, o) in items.iter().enumerate() {
                let g = *by_channel.entry(&o.channel[..]).or_insert_with(|| {
                    groups.push(Vec::new());
                    groups.len() - 1
                });
                groups[g].push(i);
            }
            groups
        }
    };
    let sends = groups.iter().map(|idx| {
        let mut link = link.clone();
        let pipe = pipeline(p, idx.iter().map(|&i| &items[i]));
        async move { (idx, pipe.query_async::<Vec<Value>>(&mut link).await) }
    });
    let replies = futures_util::future::join_all(sends).await;
    let mut placed: Vec<Placed> = vec![None; items.len()];
    let mut failure = None;
    for (idx, reply) in replies {
        match reply {
            Ok(values) => {
                let confirmed = confirmed(p, values.get(idx.len()));
                for (k, &i) in idx.iter().enumerate() {
                    placed[i] =
                        values.get(k).and_then(id_pair).map(|(id, prev)| (id, prev, confirmed));
                }
            }
            Err(e) => failure = Some(e.to_string()),
        }
    }
    let missed = settle(mcf, &items, &placed);
    if !missed.is_empty() {
        for ch in &missed {
            if let Err(e) = fetch(mcf, link, &p.ns, ch).await {
                failure.get_or_insert(e);
            }
        }
        let Some(mut z) = zone::lock(mcf) else { return failure.map_or(Ok(()), Err) };
        let nonce = z.root().nonce;
        post(z.store(), &items, &placed);
        drop(z);
        wake(nonce, items.iter().map(|o| o.slot));
    }
    failure.map_or(Ok(()), Err)
}

fn pipeline<'a>(p: &Publisher, items: impl Iterator<Item = &'a Outgoing>) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    for o in items {
        let ch = &o.channel[..];
        let (stream, last) = (stream_key(&p.ns, ch), last_key(&p.ns, ch));
        let keep = match decode_one(&o.record) {
            Some(Record::Message(m)) => m.keep.max(1),
            Some(Record::Delete { .. }) => {
                pipe.cmd("EVAL").arg(DELETE_SCRIPT).arg(2).arg(&stream).arg(attrs_key(&p.ns, ch));
                pipe.arg(&p.announce[..]).arg(ch).arg(p.origin);
                continue;
            }
            Some(Record::Attrs { .. }) => {
                pipe.cmd("EVAL").arg(ATTRS_SCRIPT).arg(1).arg(attrs_key(&p.ns, ch));
                pipe.arg(&o.record[..]).arg(&p.announce[..]).arg(ch).arg(p.origin);
                continue;
            }
            _ => 1,
        };
        pipe.cmd("EVALSHA").arg(&p.sha).arg(2).arg(&stream).arg(&last);
        pipe.arg(keep).arg(&o.record[..]).arg(&p.announce[..]).arg(ch).arg(p.origin);
    }
    if p.wait_replicas > 0 {
        pipe.cmd("WAIT").arg(p.wait_replicas).arg(p.wait_ms);
    }
    pipe
}

/// Whether the pipeline's `WAIT` (if any) counted enough replicas.
fn confirmed(p: &Publisher, wait: Option<&Value>) -> bool {
    if p.wait_replicas <= 0 {
        return true;
    }
    matches!(wait, Some(Value::Int(n)) if *n >= p.wait_replicas)
}

/// `{id, previous id}` from the script's reply.
fn id_pair(v: &Value) -> Option<(u64, u64)> {
    let Value::Array(a) = v else { return None };
    let num = |v: Option<&Value>| match v {
        Some(Value::BulkString(b)) => std::str::from_utf8(b).ok()?.parse::<u64>().ok(),
        _ => None,
    };
    Some((num(a.first())?, num(a.get(1))?))
}

/// Stores this node's own publishes that follow what the zone has, in order, and wakes their
/// listeners; unless a channel missed something, posts every outcome in the same hold of the
/// lock. The channels that missed something (another node published between), to be read
/// from their streams (their outcomes are posted after).
fn settle(mcf: &'static MainConf, items: &[Outgoing], placed: &[Placed]) -> Vec<Vec<u8>> {
    let now = crate::worker::now_ms();
    let mut missed: Vec<Vec<u8>> = Vec::new();
    let mut targets = Vec::new();
    let Some(mut z) = zone::lock(mcf) else { return missed };
    let nonce = z.root().nonce;
    let store = z.store();
    for (o, place) in items.iter().zip(placed) {
        let Some((id, prev, _)) = *place else { continue };
        if missed.contains(&o.channel) {
            continue;
        }
        let last = store.channel_last_id(&o.channel);
        let is_delete = matches!(decode_one(&o.record), Some(Record::Delete { .. }));
        if last >= id && !is_delete {
            continue;
        }
        match decode_one(&o.record) {
            // Applied here when it was pushed.
            Some(Record::Attrs { .. }) => {}
            Some(Record::Delete { channel }) => {
                let _ = store.delete(channel, None, now, &mut targets);
            }
            Some(Record::Message(mut m)) if last == prev => {
                m.id = id;
                let _ = store.insert_remote(&m, now, &mut targets);
            }
            _ => missed.push(o.channel.clone()),
        }
    }
    let posted = missed.is_empty();
    if posted {
        post(store, items, placed);
    }
    drop(z);
    let publishers = items.iter().map(|o| o.slot).filter(|_| posted);
    wake(nonce, targets.iter().map(|t| t.slot).chain(publishers));
    missed
}

/// Posts outcomes (refused ones: id `0`, answered `503`) for their workers.
fn post(
    store: &mut martd_core::store::Store<crate::zone::ShmAlloc>,
    items: &[Outgoing],
    placed: &[Placed],
) {
    let now = crate::worker::now_ms();
    for (o, place) in items.iter().zip(placed) {
        let (id, info, unconfirmed) = match place {
            Some((id, _, confirmed)) => (*id, store.info(&o.channel, now), !confirmed),
            None => (0, None, false),
        };
        let listeners = info.map_or(0, |i| i.listeners);
        store.outbox_done(Done { seq: o.seq, slot: o.slot, id, listeners, info, unconfirmed });
    }
}

/// An announcement from the announce channel: stores the message if it follows what the zone
/// has; the channel to read from its stream if this node missed something.
pub fn announced(mcf: &'static MainConf, p: &Publisher, payload: &[u8]) -> Option<Vec<u8>> {
    let a = martd_core::redis::parse_announcement(payload)?;
    if a.origin == p.origin {
        return None;
    }
    let (prev, id, ch, record) = (a.prev, a.id, a.channel, a.record);
    let now = crate::worker::now_ms();
    let mut targets = Vec::new();
    let mut z = zone::lock(mcf)?;
    let nonce = z.root().nonce;
    let store = z.store();
    match a.kind {
        Kind::Delete => {
            let _ = store.delete(ch, None, now, &mut targets);
            drop(z);
            wake(nonce, targets.iter().map(|t| t.slot));
            return None;
        }
        Kind::Attrs => {
            if let Some(rec @ Record::Attrs { channel, .. }) = record.and_then(decode_one) {
                if channel == ch {
                    let _ = store.restore(&rec, now);
                }
            }
            return None;
        }
        Kind::Message => {}
    }
    let last = store.channel_last_id(ch);
    if last >= id {
        return None;
    }
    match record.and_then(decode_one) {
        Some(Record::Message(mut m)) if last == prev && m.channel == ch => {
            m.id = id;
            let _ = store.insert_remote(&m, now, &mut targets);
        }
        _ => return Some(ch.to_vec()),
    }
    drop(z);
    wake(nonce, targets.iter().map(|t| t.slot));
    None
}
