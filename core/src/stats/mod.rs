//! Stats and metrics: the counters martd keeps, and their JSON, text and Prometheus forms.
//!
//! Nothing here is proportional to the number of channels or listeners. Zone-wide figures are
//! kept incrementally by the store (channels, stored messages, publishes and their per-second
//! ring, allocation failures); per-worker figures are in each worker's [`WorkerCounters`] in
//! the zone, written only by that worker (relaxed atomics, no lock) and read by any worker
//! under the zone lock. When a worker leaves (gracefully, or found dead and purged), its
//! cumulative counts are folded into the store's retired totals, so zone-wide totals never
//! go down, and its listener gauges are dropped.

mod format;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

pub use format::{channel_json, channels_json, Format};

/// The transports a listener can wait on (`interval` is not a listener: it is answered at
/// once). A long-poll that gave its request back (detached) is a `LongPoll`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    LongPoll = 0,
    EventSource = 1,
    WebSocket = 2,
    Stream = 3,
}

impl ListenerKind {
    pub const ALL: [ListenerKind; 4] = [
        ListenerKind::LongPoll,
        ListenerKind::EventSource,
        ListenerKind::WebSocket,
        ListenerKind::Stream,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ListenerKind::LongPoll => "longpoll",
            ListenerKind::EventSource => "eventsource",
            ListenerKind::WebSocket => "websocket",
            ListenerKind::Stream => "stream",
        }
    }
}

/// Upper bounds (µs) of the notification delay histogram's buckets; one more bucket holds
/// everything above the last.
pub const DELAY_BOUNDS_US: [u64; 9] = [50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 100_000];
const DELAY_BUCKETS: usize = DELAY_BOUNDS_US.len() + 1;

/// The bucket of a delay of `us` microseconds.
fn delay_bucket(us: u64) -> usize {
    DELAY_BOUNDS_US.iter().position(|&b| us <= b).unwrap_or(DELAY_BOUNDS_US.len())
}

/// One worker's counters (a snapshot of [`WorkerCounters`], or sums of them).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Listeners waiting now, by [`ListenerKind`] (a gauge; never retired).
    pub listeners: [u64; 4],
    /// Messages written to listeners (see the README: a JSON reply counts once).
    pub deliveries: u64,
    /// Wake-up datagrams sent to other workers.
    pub notify_sent: u64,
    /// Wake-up datagrams received from other workers.
    pub notify_received: u64,
    /// Sum and maximum of the received wake-ups' delays (receive time minus send time).
    pub delay_sum_us: u64,
    pub delay_max_us: u64,
    /// Received wake-ups by delay: [`DELAY_BOUNDS_US`], then everything above (not
    /// cumulative).
    pub delay_buckets: [u64; DELAY_BUCKETS],
}

impl Counts {
    /// Listeners of every kind.
    pub fn listeners_total(&self) -> u64 {
        self.listeners.iter().sum()
    }

    /// Adds `other`'s cumulative counts (and its gauges when `gauges`).
    pub fn add(&mut self, other: &Counts, gauges: bool) {
        if gauges {
            for (a, b) in self.listeners.iter_mut().zip(other.listeners) {
                *a += b;
            }
        }
        self.deliveries += other.deliveries;
        self.notify_sent += other.notify_sent;
        self.notify_received += other.notify_received;
        self.delay_sum_us += other.delay_sum_us;
        self.delay_max_us = self.delay_max_us.max(other.delay_max_us);
        for (a, b) in self.delay_buckets.iter_mut().zip(other.delay_buckets) {
            *a += b;
        }
    }
}

/// One worker's counters in the zone. Only its worker writes them (no lock: relaxed atomics,
/// a single writer per field); others read them under the zone lock, which also keeps the
/// record from being freed meanwhile.
#[derive(Debug, Default)]
pub struct WorkerCounters {
    listeners: [AtomicU64; 4],
    deliveries: AtomicU64,
    notify_sent: AtomicU64,
    notify_received: AtomicU64,
    delay_sum_us: AtomicU64,
    delay_max_us: AtomicU64,
    delay_buckets: [AtomicU64; DELAY_BUCKETS],
}

impl WorkerCounters {
    /// The worker has `n` listeners of `kind` now.
    pub fn set_listeners(&self, kind: ListenerKind, n: u64) {
        self.listeners[kind as usize].store(n, Relaxed);
    }

    /// `n` messages were written to listeners.
    pub fn delivered(&self, n: u64) {
        self.deliveries.fetch_add(n, Relaxed);
    }

    /// A wake-up datagram was sent.
    pub fn notified(&self) {
        self.notify_sent.fetch_add(1, Relaxed);
    }

    /// A wake-up datagram arrived `delay_us` after it was sent.
    pub fn woken(&self, delay_us: u64) {
        self.notify_received.fetch_add(1, Relaxed);
        self.delay_sum_us.fetch_add(delay_us, Relaxed);
        self.delay_max_us.fetch_max(delay_us, Relaxed);
        self.delay_buckets[delay_bucket(delay_us)].fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> Counts {
        Counts {
            listeners: self.listeners.each_ref().map(|a| a.load(Relaxed)),
            deliveries: self.deliveries.load(Relaxed),
            notify_sent: self.notify_sent.load(Relaxed),
            notify_received: self.notify_received.load(Relaxed),
            delay_sum_us: self.delay_sum_us.load(Relaxed),
            delay_max_us: self.delay_max_us.load(Relaxed),
            delay_buckets: self.delay_buckets.each_ref().map(|a| a.load(Relaxed)),
        }
    }
}

/// Seconds the publish rate looks back over.
pub const RATE_WINDOW: usize = 60;

/// Publishes per second over the last [`RATE_WINDOW`] seconds: a ring of per-second buckets,
/// each tagged with its second, so a bucket of a second long gone counts nothing.
#[derive(Debug, Clone)]
pub struct PublishRate {
    secs: [u64; RATE_WINDOW],
    counts: [u64; RATE_WINDOW],
}

impl Default for PublishRate {
    fn default() -> Self {
        PublishRate { secs: [u64::MAX; RATE_WINDOW], counts: [0; RATE_WINDOW] }
    }
}

impl PublishRate {
    /// A publish at second `now_s`.
    pub fn record(&mut self, now_s: u64) {
        let i = (now_s % RATE_WINDOW as u64) as usize;
        if self.secs[i] != now_s {
            self.secs[i] = now_s;
            self.counts[i] = 0;
        }
        self.counts[i] += 1;
    }

    /// Publishes in each of the last [`RATE_WINDOW`] seconds up to `now_s`, oldest first.
    pub fn per_second(&self, now_s: u64) -> [u64; RATE_WINDOW] {
        let mut out = [0; RATE_WINDOW];
        for (k, o) in out.iter_mut().enumerate() {
            let Some(s) = (now_s + 1 + k as u64).checked_sub(RATE_WINDOW as u64) else {
                continue;
            };
            let i = (s % RATE_WINDOW as u64) as usize;
            if self.secs[i] == s {
                *o = self.counts[i];
            }
        }
        out
    }
}

/// A worker in the stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerStats {
    pub slot: u32,
    pub pid: i32,
    pub counts: Counts,
}

/// Everything the zone-wide stats report.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub uptime_s: u64,
    pub nginx_version: String,
    pub martd_version: String,
    pub zone_size: u64,
    pub zone_used: u64,
    pub zone_free: u64,
    pub channels: u64,
    pub messages: u64,
    pub published: u64,
    /// Publishes in each of the last 60 seconds, oldest first (the current second last).
    pub published_per_second: Vec<u64>,
    pub channels_created: u64,
    pub channels_removed: u64,
    /// Operations refused because the zone was full (after a garbage-collection step).
    pub alloc_failures: u64,
    /// Every worker's counts, and those of workers gone; listeners of live workers only.
    pub totals: Counts,
    pub workers: Vec<WorkerStats>,
}

impl Snapshot {
    /// Publishes over the last minute.
    pub fn published_last_minute(&self) -> u64 {
        self.published_per_second.iter().sum()
    }
}

/// One channel in the stats (`?channel=`, `?channels=`): its info and attributes, never its
/// key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelStats {
    pub name: Vec<u8>,
    pub messages: u64,
    pub listeners: u64,
    pub last_id: u64,
    /// Seconds since a listener last asked; `-1`: never.
    pub requested: i64,
    pub size: Option<u32>,
    pub life_ms: Option<u64>,
    pub one2one: bool,
}

/// Where a `?channels=` listing goes on: a bucket of the channel table and how many channels
/// of its chain were listed already.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cursor {
    pub bucket: usize,
    pub skip: usize,
}

impl Cursor {
    /// Parses `B-S` (as [`Cursor::render`] writes it).
    pub fn parse(s: &[u8]) -> Option<Cursor> {
        let s = std::str::from_utf8(s).ok()?;
        let (b, k) = s.split_once('-')?;
        let digits =
            |t: &str| !t.is_empty() && t.len() <= 19 && t.bytes().all(|c| c.is_ascii_digit());
        if !digits(b) || !digits(k) {
            return None;
        }
        Some(Cursor { bucket: b.parse().ok()?, skip: k.parse().ok()? })
    }

    pub fn render(&self) -> String {
        format!("{}-{}", self.bucket, self.skip)
    }
}

/// The most channels one `?channels=` page lists.
pub const PAGE_MAX: usize = 100;

/// A `?channels=` argument: a prefix followed by `*`.
pub fn parse_prefix(arg: &[u8]) -> Result<&[u8], &'static str> {
    match arg.split_last() {
        Some((b'*', prefix)) => Ok(prefix),
        _ => Err("channels= takes a channel name prefix followed by *"),
    }
}
