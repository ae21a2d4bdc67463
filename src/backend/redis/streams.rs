//! Bringing Redis's streams into the zone: a channel's stream read past the zone's last id
//! (`XRANGE`), and every channel's on (re)connect.

use martd_core::persist::{decode_one, Record};

use super::link::{self, Link, Servers};
use martd_core::redis::{attrs_key, channel_of, channel_of_attrs, stream_key};

use super::{wake, FETCH_BATCH};
use crate::conf::MainConf;
use crate::zone;

/// Stores every message of channel `ch`'s stream newer than what this zone has.
pub(super) async fn fetch(
    mcf: &'static MainConf,
    link: &mut Link,
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
            .query_async(link)
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

/// Reads every channel's attributes and stream (a node that starts, or comes back): the keys
/// of every server (each master of a cluster) that match the namespace's streams and
/// attributes.
pub(super) async fn load_all(
    mcf: &'static MainConf,
    link: &mut Link,
    servers: &Servers,
    ns: &[u8],
) -> Result<(), String> {
    let pattern = [ns, b":{*}:[sa]"].concat();
    for mut server in link::scan_targets(link, servers).await? {
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(500)
                .query_async(&mut server)
                .await
                .map_err(|e| e.to_string())?;
            for k in keys {
                if let Some(ch) = channel_of(ns, &k) {
                    fetch(mcf, link, ns, &ch).await?;
                } else if let Some(ch) = channel_of_attrs(ns, &k) {
                    fetch_attrs(mcf, link, ns, &ch).await?;
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(())
}

/// Restores channel `ch`'s attributes as Redis keeps them.
async fn fetch_attrs(
    mcf: &'static MainConf,
    link: &mut Link,
    ns: &[u8],
    ch: &[u8],
) -> Result<(), String> {
    let rec: Option<Vec<u8>> = redis::cmd("GET")
        .arg(attrs_key(ns, ch))
        .query_async(link)
        .await
        .map_err(|e| e.to_string())?;
    let Some(rec) = rec else { return Ok(()) };
    if let Some(r @ Record::Attrs { channel, .. }) = decode_one(&rec) {
        if channel == ch {
            if let Some(mut z) = zone::lock(mcf) {
                let _ = z.store().restore(&r, crate::worker::now_ms());
            }
        }
    }
    Ok(())
}
