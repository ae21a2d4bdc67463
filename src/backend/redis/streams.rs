//! Bringing Redis's streams into the zone: a channel's stream read past the zone's last id
//! (`XRANGE`), every channel's on (re)connect, and the outcomes of publishes posted to their
//! workers.

use martd_core::persist::{decode_one, Record};
use martd_core::store::Done;

use super::{channel_of, stream_key, wake, Conn, FETCH_BATCH};
use crate::conf::MainConf;
use crate::zone;

/// Posts outcomes (`id` `0`: failed) and wakes their workers.
pub(super) fn post(mcf: &'static MainConf, items: &[martd_core::store::Outgoing], id: u64) {
    let Some(mut z) = zone::lock(mcf) else { return };
    let nonce = z.root().nonce;
    let store = z.store();
    for o in items {
        let listeners = store.channel_listeners(&o.channel);
        store.outbox_done(Done { seq: o.seq, slot: o.slot, id, listeners });
    }
    drop(z);
    wake(nonce, items.iter().map(|o| o.slot));
}

/// Stores every message of channel `ch`'s stream newer than what this zone has.
pub(super) async fn fetch(
    mcf: &'static MainConf,
    conn: &mut Conn,
    ns: &[u8],
    ch: &[u8],
) -> Result<(), String> {
    let key = stream_key(ns, ch);
    loop {
        let last = match zone::lock(mcf) {
            Some(mut z) => z.store().channel_last_id(ch),
            None => return Ok(()),
        };
        let start = format!("({last}-0");
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(&key)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(FETCH_BATCH)
            .query_async(conn)
            .await
            .map_err(|e| e.to_string())?;
        let n = reply.ids.len();
        store_entries(mcf, ch, reply);
        if n < FETCH_BATCH {
            return Ok(());
        }
    }
}

/// Stores stream entries in the zone and wakes the workers with listeners on the channel.
fn store_entries(mcf: &'static MainConf, ch: &[u8], reply: redis::streams::StreamRangeReply) {
    let now = crate::worker::now_ms();
    let mut wake_targets = Vec::new();
    let Some(mut z) = zone::lock(mcf) else { return };
    let nonce = z.root().nonce;
    for entry in reply.ids {
        let id = entry.id.split('-').next().and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
        let Some(redis::Value::BulkString(bytes)) = entry.map.get("m") else { continue };
        let Some(Record::Message(mut m)) = decode_one(&bytes[..]) else { continue };
        if id == 0 || m.channel != ch {
            continue;
        }
        m.id = id;
        let _ = z.store().insert_remote(&m, now, &mut wake_targets);
    }
    drop(z);
    wake(nonce, wake_targets.iter().map(|t| t.slot));
}

/// Reads every channel's stream (a node that starts, or comes back).
pub(super) async fn load_all(
    mcf: &'static MainConf,
    conn: &mut Conn,
    ns: &[u8],
) -> Result<(), String> {
    let pattern = [ns, b":{*}:s"].concat();
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(500)
            .query_async(conn)
            .await
            .map_err(|e| e.to_string())?;
        for k in keys {
            if let Some(ch) = channel_of(ns, &k) {
                fetch(mcf, conn, ns, &ch).await?;
            }
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}
