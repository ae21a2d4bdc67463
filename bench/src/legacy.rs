//! The garbage-collection tick as it was before the timing wheel, replayed for comparison:
//! one walk over a `HashMap` (SwissTable, SipHash) of every channel, laid out as the old
//! store's channels were, scanning and expiring each channel's queue and checking whether it
//! is idle. That walk held the zone lock once a second.

use std::collections::HashMap;
use std::hint::black_box;
use std::time::Instant;

use martd_core::queue::{MessageQueue, MessageSpec};
use martd_core::Global;

use crate::lockhold::channel_name;

/// The old `Channel`, field for field.
#[allow(dead_code)]
struct OldChannel {
    serial: u64,
    queue: MessageQueue<Global>,
    last_id: u64,
    listeners: u32,
    waiters: Vec<(u32, u32)>,
    park_counter: u64,
    evict_below: u64,
    last_requested_ms: u64,
    last_active_ms: u64,
    channel_timeout_ms: u64,
}

const T0: u64 = 1_700_000_000_000;

/// Builds `channels` channels with one `size`-byte message each (timeout `ttl_ms`) and times
/// `walks` full walks (µs each), at a time when nothing has expired yet: what visiting every
/// channel costs, before anything is freed.
pub fn full_walk_us(channels: u64, size: usize, ttl_ms: u64, walks: u32) -> Vec<f64> {
    let body = vec![b'm'; size];
    let spec = MessageSpec {
        content_type: b"text/plain",
        event: b"",
        body: &body,
        timeout_ms: ttl_ms,
        expire_ms: None,
    };
    let mut map: HashMap<Vec<u8>, OldChannel> = HashMap::new();
    for i in 0..channels {
        let mut queue = MessageQueue::new_in(Global);
        let msg = queue.make_message(&spec, i + 1, T0, None).expect("memory");
        queue.push(msg, 10).expect("memory");
        let ch = OldChannel {
            serial: i,
            queue,
            last_id: i + 1,
            listeners: 0,
            waiters: Vec::new(),
            park_counter: 0,
            evict_below: 0,
            last_requested_ms: 0,
            last_active_ms: T0,
            channel_timeout_ms: 60_000,
        };
        map.insert(channel_name(i), ch);
    }
    let now = T0 + ttl_ms.saturating_sub(1);
    (0..walks)
        .map(|_| {
            let t = Instant::now();
            map.retain(|_, ch| {
                // The old expiry scanned the whole queue each time.
                black_box(ch.queue.stored_count(now));
                ch.queue.expire(now);
                !(ch.listeners == 0
                    && ch.queue.is_empty()
                    && now.saturating_sub(ch.last_active_ms) >= ch.channel_timeout_ms)
            });
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect()
}
