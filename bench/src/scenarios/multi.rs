//! Multi-channel listeners (fanout-multi, idle-multi): each listener waits on `hot`, the one
//! channel published to, and on `per_listener - 1` more drawn from a pool of channels that each
//! got one message before the listeners came (so the zone holds many channels and messages, and
//! the listeners' etags for them are not "0").
//!
//! martd: `GET /subj?cid=ID&hot=ETAG&m17=ETAG&...` on a `martd_listen json` location; the reply
//! `{"channels":{"NAME":{"etag":"ID","payload":[...]}}}` lists the channels with newer messages,
//! and the listener asks again with the new etags (the others' unchanged).
//!
//! nchan: `GET /subm?chs=hot,m17,...` on a location with `nchan_channel_id $arg_chs` split at
//! commas (nchan's multiplexed channels): one message per reply, `Etag`/`Last-Modified` as for
//! one channel.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::clients::{listen_loop, on_connection, Fan};
use super::CONNECT_CONCURRENCY;
use crate::http::{self, Sender, Sources};
use crate::server::{Kind, Server};

/// The channel every multi-channel listener waits on, and the only one published to in rounds.
pub(super) const HOT: &str = "hot";

/// The body of the one message each pool channel gets before the listeners come.
pub(super) const POOL_BODY: &[u8] = b"pool";

#[derive(Clone, Copy, Debug)]
pub(super) struct Multi {
    /// Channels per listener, `hot` included.
    pub(super) per_listener: u64,
    /// Channels the others are drawn from.
    pub(super) pool: u64,
}

impl Multi {
    pub(super) fn check(&self) -> Result<(), String> {
        if self.per_listener < 1 || self.per_listener > 64 {
            return Err("--multi wants 1 to 64 channels per listener".into());
        }
        if self.pool < self.per_listener - 1 {
            return Err(format!(
                "--pool {} is smaller than --multi {} - 1",
                self.pool, self.per_listener
            ));
        }
        Ok(())
    }

    /// Listener `i`'s channels: `hot`, then `per_listener - 1` distinct pool channels (the same
    /// ones in every run).
    pub(super) fn channels(&self, i: u64) -> Vec<String> {
        let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x2545_f491_4f6c_dd1d;
        let mut picked: Vec<u64> = Vec::with_capacity(self.per_listener as usize);
        while (picked.len() as u64) < self.per_listener - 1 {
            // xorshift64*
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let k = x.wrapping_mul(0x2545_f491_4f6c_dd1d) % self.pool;
            if !picked.contains(&k) {
                picked.push(k);
            }
        }
        std::iter::once(HOT.to_string()).chain(picked.into_iter().map(pool_name)).collect()
    }
}

fn pool_name(k: u64) -> String {
    format!("m{k}")
}

/// Publishes the one message of every pool channel (before the listeners come).
pub(super) async fn fill_pool(srv: &Server, srcs: &Sources, m: &Multi) -> Result<(), String> {
    let mut pubs = Vec::new();
    for _ in 0..4 {
        pubs.push(http::connect_spawned(srv.addr, srcs.next()).await?);
    }
    let mut set = JoinSet::new();
    let n = pubs.len() as u64;
    for (j, mut s) in pubs.into_iter().enumerate() {
        let pool = m.pool;
        set.spawn(async move {
            let mut k = j as u64;
            while k < pool {
                let path = format!("/pub?channel={}", pool_name(k));
                let r = http::send(&mut s, http::post(&path, POOL_BODY.into())).await?;
                if r.status != 201 && r.status != 202 {
                    return Err(format!("publish to {path}: status {}", r.status));
                }
                k += n;
            }
            Ok::<(), String>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r.map_err(|e| format!("pool publisher: {e}"))??;
    }
    Ok(())
}

/// Starts `n` multi-channel listeners, each on its own connection, expecting the rounds' messages
/// on `hot` in order.
pub(super) fn spawn(
    set: &mut JoinSet<()>,
    fan: &Arc<Fan>,
    srv: &Server,
    srcs: &Arc<Sources>,
    n: u64,
    m: &Multi,
) {
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let (kind, dst) = (srv.kind, srv.addr);
    for i in 0..n {
        let channels = m.channels(i);
        set.spawn(listener(fan.clone(), kind, dst, srcs.clone(), i, channels, gate.clone()));
    }
}

async fn listener(
    fan: Arc<Fan>,
    kind: Kind,
    dst: SocketAddr,
    srcs: Arc<Sources>,
    i: u64,
    channels: Vec<String>,
    gate: Arc<Semaphore>,
) {
    on_connection(&fan, dst, &srcs, gate, |mut s| {
        let fan = fan.clone();
        async move {
            match kind {
                Kind::Martd => json_loop(&fan, &mut s, &format!("c{i}"), &channels).await,
                Kind::Nchan => {
                    listen_loop(&fan, &mut s, &format!("/subm?chs={}", channels.join(","))).await
                }
            }
        }
    })
    .await;
    fan.done.fetch_add(1, Relaxed);
}

/// martd's JSON long-poll on `channels` (`channels[0]` is `hot`) until every message
/// `0..rounds` of `hot` has arrived, in order.
async fn json_loop(
    fan: &Fan,
    s: &mut Sender,
    cid: &str,
    channels: &[String],
) -> Result<(), String> {
    let mut etags: Vec<String> = vec!["0".to_string(); channels.len()];
    let mut expect = 0;
    let mut path = String::new();
    while expect < fan.rounds {
        path.clear();
        let _ = write!(path, "/subj?cid={cid}");
        for (c, e) in channels.iter().zip(&etags) {
            let _ = write!(path, "&{c}={e}");
        }
        let r = http::send(s, http::get(&path)).await?;
        if r.status != 200 {
            let body = String::from_utf8_lossy(&r.body);
            return Err(format!("listener got status {}: {}", r.status, body.trim_end()));
        }
        let v: Value = serde_json::from_slice(&r.body)
            .map_err(|e| format!("reply {:?}: {e}", String::from_utf8_lossy(&r.body)))?;
        let listed = v.get("channels").and_then(Value::as_object).ok_or_else(|| {
            format!("reply without \"channels\": {}", String::from_utf8_lossy(&r.body))
        })?;
        // An empty object (listener timeout, reload): ask again with the same etags.
        for (name, ch) in listed {
            let k = channels
                .iter()
                .position(|c| c == name)
                .ok_or_else(|| format!("reply lists channel {name:?}, not asked for"))?;
            let etag = ch.get("etag").and_then(Value::as_str).ok_or("channel without etag")?;
            let new: u64 = etag.parse().map_err(|_| format!("etag {etag:?} not a number"))?;
            let old: u64 = etags[k].parse().unwrap_or(0);
            if new <= old {
                return Err(format!("{name}: etag {new} after {old}"));
            }
            let payload = ch.get("payload").and_then(Value::as_array).ok_or("no payload array")?;
            if payload.is_empty() {
                return Err(format!("{name}: listed with an empty payload"));
            }
            for p in payload {
                let body = p.as_str().ok_or_else(|| format!("{name}: payload item {p}"))?;
                if k == 0 {
                    fan.deliver(body.as_bytes(), expect)?;
                    expect += 1;
                } else if body.as_bytes() != POOL_BODY || old != 0 || payload.len() != 1 {
                    return Err(format!("{name}: unexpected payload {payload:?} after {old}"));
                }
            }
            etags[k] = etag.to_string();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Multi;

    #[test]
    fn channels_distinct_hot_first() {
        let m = Multi { per_listener: 10, pool: 1000 };
        for i in 0..200 {
            let c = m.channels(i);
            assert_eq!(c.len(), 10);
            assert_eq!(c[0], "hot");
            let mut d = c.clone();
            d.sort();
            d.dedup();
            assert_eq!(d.len(), 10);
        }
        assert_ne!(m.channels(1), m.channels(2));
        let small = Multi { per_listener: 3, pool: 2 };
        assert_eq!(small.channels(7).len(), 3);
    }
}
