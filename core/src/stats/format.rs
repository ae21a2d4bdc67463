//! The stats bodies: JSON (the default), plain text, and Prometheus' text exposition format
//! 0.0.4; and the JSON of one channel or a page of channels.

use std::fmt::Write;

use super::{ChannelStats, Counts, ListenerKind, Snapshot, DELAY_BOUNDS_US, RATE_WINDOW};
use crate::json::push_string;

/// The format of a stats body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Text,
    Prometheus,
}

impl Format {
    /// The `format` argument if there is one (`json`, `text`, `prometheus`), else the
    /// `Accept` header (`application/openmetrics-text` or `text/plain; version=0.0.4`:
    /// Prometheus; `application/json`: JSON; `text/plain`: text), else JSON.
    pub fn select(arg: Option<&[u8]>, accept: Option<&[u8]>) -> Result<Format, &'static str> {
        if let Some(a) = arg {
            return match a {
                b"json" => Ok(Format::Json),
                b"text" => Ok(Format::Text),
                b"prometheus" => Ok(Format::Prometheus),
                _ => Err("unknown format: format= takes json, text or prometheus"),
            };
        }
        let accept = String::from_utf8_lossy(accept.unwrap_or_default()).to_ascii_lowercase();
        let accept: String = accept.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        Ok(
            if accept.contains("application/openmetrics-text")
                || accept
                    .split(',')
                    .any(|t| t.starts_with("text/plain") && t.contains("version=0.0.4"))
            {
                Format::Prometheus
            } else if accept.contains("application/json") {
                Format::Json
            } else if accept.contains("text/plain") {
                Format::Text
            } else {
                Format::Json
            },
        )
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Text => "text/plain",
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
        }
    }

    pub fn render(self, s: &Snapshot) -> String {
        match self {
            Format::Json => json(s),
            Format::Text => text(s),
            Format::Prometheus => prometheus(s),
        }
    }
}

/// Publishes per second, averaged over the last minute.
fn rate(s: &Snapshot) -> f64 {
    s.published_last_minute() as f64 / RATE_WINDOW as f64
}

fn avg_us(c: &Counts) -> u64 {
    c.delay_sum_us.checked_div(c.notify_received).unwrap_or(0)
}

fn json_string(out: &mut String, s: &[u8]) {
    let mut v = Vec::new();
    push_string(&mut v, s);
    out.push_str(&String::from_utf8_lossy(&v));
}

fn json_listeners(out: &mut String, c: &Counts) {
    let _ = write!(out, "{{\"total\":{}", c.listeners_total());
    for k in ListenerKind::ALL {
        let _ = write!(out, ",\"{}\":{}", k.name(), c.listeners[k as usize]);
    }
    out.push('}');
}

fn json_notifications(out: &mut String, c: &Counts, histogram: bool) {
    let _ = write!(
        out,
        "{{\"sent\":{},\"received\":{},\"delay_us\":{{\"count\":{},\"avg\":{},\"max\":{}",
        c.notify_sent,
        c.notify_received,
        c.notify_received,
        avg_us(c),
        c.delay_max_us
    );
    if histogram {
        out.push_str(",\"buckets\":{");
        for (i, n) in c.delay_buckets.iter().enumerate() {
            let le = DELAY_BOUNDS_US.get(i).map_or("+Inf".to_string(), |b| b.to_string());
            let _ = write!(out, "{}\"{}\":{}", if i > 0 { "," } else { "" }, le, n);
        }
        out.push('}');
    }
    out.push_str("}}");
}

fn json(s: &Snapshot) -> String {
    let mut o = String::with_capacity(1024 + 256 * s.workers.len());
    let _ = write!(o, "{{\"uptime\":{},\"nginx_version\":", s.uptime_s);
    json_string(&mut o, s.nginx_version.as_bytes());
    o.push_str(",\"martd_version\":");
    json_string(&mut o, s.martd_version.as_bytes());
    let _ = write!(
        o,
        ",\"zone\":{{\"size\":{},\"used\":{},\"free\":{}}},\"channels\":{},\"messages\":{}",
        s.zone_size, s.zone_used, s.zone_free, s.channels, s.messages
    );
    let _ = write!(
        o,
        ",\"published\":{{\"total\":{},\"last_minute\":{},\"per_second\":{:.3},\"last_minute_by_second\":[",
        s.published,
        s.published_last_minute(),
        rate(s)
    );
    for (i, n) in s.published_per_second.iter().enumerate() {
        let _ = write!(o, "{}{}", if i > 0 { "," } else { "" }, n);
    }
    let _ = write!(
        o,
        "]}},\"channels_created\":{},\"channels_removed\":{},\"deliveries\":{},\"alloc_failures\":{},\"listeners\":",
        s.channels_created, s.channels_removed, s.totals.deliveries, s.alloc_failures
    );
    json_listeners(&mut o, &s.totals);
    o.push_str(",\"notifications\":");
    json_notifications(&mut o, &s.totals, true);
    o.push_str(",\"workers\":[");
    for (i, w) in s.workers.iter().enumerate() {
        let _ = write!(
            o,
            "{}{{\"slot\":{},\"pid\":{},\"listeners\":",
            if i > 0 { "," } else { "" },
            w.slot,
            w.pid
        );
        json_listeners(&mut o, &w.counts);
        let _ = write!(o, ",\"deliveries\":{},\"notifications\":", w.counts.deliveries);
        json_notifications(&mut o, &w.counts, false);
        o.push('}');
    }
    o.push_str("]}\n");
    o
}

fn text_listeners(c: &Counts) -> String {
    let mut o = c.listeners_total().to_string();
    for (i, k) in ListenerKind::ALL.iter().enumerate() {
        let _ = write!(
            o,
            "{}{} {}",
            if i == 0 { " (" } else { ", " },
            k.name(),
            c.listeners[*k as usize]
        );
    }
    o.push(')');
    o
}

fn text(s: &Snapshot) -> String {
    let t = &s.totals;
    let mut o = String::with_capacity(1024 + 160 * s.workers.len());
    let _ = write!(
        o,
        "uptime: {}\nnginx version: {}\nmartd version: {}\nzone size: {}\nzone used: {}\nzone free: {}\n\
         channels: {}\nmessages: {}\npublished: {}\npublished last minute: {}\npublished per second: {:.3}\n\
         channels created: {}\nchannels removed: {}\ndeliveries: {}\nlisteners: {}\nalloc failures: {}\n\
         notifications sent: {}\nnotifications received: {}\nnotification delay us: avg {} max {}\n",
        s.uptime_s,
        s.nginx_version,
        s.martd_version,
        s.zone_size,
        s.zone_used,
        s.zone_free,
        s.channels,
        s.messages,
        s.published,
        s.published_last_minute(),
        rate(s),
        s.channels_created,
        s.channels_removed,
        t.deliveries,
        text_listeners(t),
        s.alloc_failures,
        t.notify_sent,
        t.notify_received,
        avg_us(t),
        t.delay_max_us,
    );
    for w in &s.workers {
        let c = &w.counts;
        let _ = writeln!(
            o,
            "worker {}: listeners {}, deliveries {}, notifications sent {} received {}",
            w.pid,
            text_listeners(c),
            c.deliveries,
            c.notify_sent,
            c.notify_received
        );
    }
    o
}

/// Prometheus' text format 0.0.4: `# HELP`, `# TYPE`, then the samples of each metric.
struct Prom(String);

impl Prom {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = write!(self.0, "# HELP martd_{name} {help}\n# TYPE martd_{name} {kind}\n");
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, v: impl std::fmt::Display) {
        self.head(name, kind, help);
        let _ = writeln!(self.0, "martd_{name} {v}");
    }

    fn sample(&mut self, name: &str, labels: &str, v: impl std::fmt::Display) {
        let _ = writeln!(self.0, "martd_{name}{{{labels}}} {v}");
    }
}

/// A label value, escaped as the format asks (`\\`, `\"`, `\n`).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn seconds(us: u64) -> String {
    format!("{}.{:06}", us / 1_000_000, us % 1_000_000)
}

fn prometheus(s: &Snapshot) -> String {
    let t = &s.totals;
    let mut p = Prom(String::with_capacity(4096 + 512 * s.workers.len()));
    p.head("info", "gauge", "Versions of nginx and martd.");
    let labels = format!(
        "nginx_version=\"{}\",martd_version=\"{}\"",
        label(&s.nginx_version),
        label(&s.martd_version)
    );
    p.sample("info", &labels, 1);
    p.one("uptime_seconds", "gauge", "Seconds since the zone was made.", s.uptime_s);
    p.one("zone_size_bytes", "gauge", "Size of the shared zone.", s.zone_size);
    p.one("zone_used_bytes", "gauge", "Bytes of the zone in use (whole pages).", s.zone_used);
    p.one("zone_free_bytes", "gauge", "Bytes of the zone in free pages.", s.zone_free);
    p.one("channels", "gauge", "Channels in the zone.", s.channels);
    p.one("messages", "gauge", "Messages stored in the zone.", s.messages);
    p.one("published_total", "counter", "Messages published.", s.published);
    p.one(
        "published_last_minute",
        "gauge",
        "Messages published in the last 60 s.",
        s.published_last_minute(),
    );
    p.one(
        "publish_rate",
        "gauge",
        "Messages published per second over the last minute.",
        format!("{:.3}", rate(s)),
    );
    p.one("channels_created_total", "counter", "Channels created.", s.channels_created);
    p.one("channels_removed_total", "counter", "Channels removed when idle.", s.channels_removed);
    p.one("deliveries_total", "counter", "Messages written to listeners.", t.deliveries);
    p.one(
        "alloc_failures_total",
        "counter",
        "Operations refused because the zone was full.",
        s.alloc_failures,
    );
    p.head("listeners", "gauge", "Listeners waiting now, by transport.");
    for k in ListenerKind::ALL {
        p.sample("listeners", &format!("transport=\"{}\"", k.name()), t.listeners[k as usize]);
    }
    p.one("notifications_sent_total", "counter", "Wake-ups sent to other workers.", t.notify_sent);
    p.one(
        "notifications_received_total",
        "counter",
        "Wake-ups received from other workers.",
        t.notify_received,
    );
    p.head("notification_delay_seconds", "histogram", "Delay of wake-ups between workers.");
    let mut cumulative = 0;
    for (i, n) in t.delay_buckets.iter().enumerate() {
        cumulative += n;
        let le = DELAY_BOUNDS_US.get(i).map_or("+Inf".to_string(), |&b| seconds(b));
        p.sample("notification_delay_seconds_bucket", &format!("le=\"{le}\""), cumulative);
    }
    let _ = writeln!(p.0, "martd_notification_delay_seconds_sum {}", seconds(t.delay_sum_us));
    let _ = writeln!(p.0, "martd_notification_delay_seconds_count {}", t.notify_received);
    p.one(
        "notification_delay_max_seconds",
        "gauge",
        "Longest wake-up delay between workers.",
        seconds(t.delay_max_us),
    );
    p.head("worker_listeners", "gauge", "Listeners waiting in each worker, by transport.");
    for w in &s.workers {
        for k in ListenerKind::ALL {
            let labels = format!("pid=\"{}\",transport=\"{}\"", w.pid, k.name());
            p.sample("worker_listeners", &labels, w.counts.listeners[k as usize]);
        }
    }
    p.head("worker_deliveries_total", "counter", "Messages each worker wrote to listeners.");
    for w in &s.workers {
        p.sample("worker_deliveries_total", &format!("pid=\"{}\"", w.pid), w.counts.deliveries);
    }
    p.0
}

fn channel_body(o: &mut Vec<u8>, c: &ChannelStats) {
    o.extend_from_slice(b"{\"channel\":");
    push_string(o, &c.name);
    let last = if c.last_id == 0 { String::new() } else { c.last_id.to_string() };
    let _ = write!(
        Out(o),
        ",\"messages\":{},\"listeners\":{},\"last_message_id\":\"{}\",\"requested\":{},\"attributes\":{{",
        c.messages, c.listeners, last, c.requested
    );
    let mut attrs = Vec::new();
    if let Some(size) = c.size {
        attrs.push(format!("\"size\":{size}"));
    }
    if let Some(life) = c.life_ms {
        attrs.push(format!("\"life\":{}", life / 1000));
    }
    attrs.push(format!("\"one2one\":{}", c.one2one));
    o.extend_from_slice(attrs.join(",").as_bytes());
    o.extend_from_slice(b"}}");
}

/// `fmt::Write` into a byte vector.
struct Out<'a>(&'a mut Vec<u8>);

impl Write for Out<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// `?channel=`: one channel.
pub fn channel_json(c: &ChannelStats) -> Vec<u8> {
    let mut o = Vec::with_capacity(160 + c.name.len());
    channel_body(&mut o, c);
    o.push(b'\n');
    o
}

/// `?channels=`: a page of channels, and the cursor of the next page (`None`: the listing is
/// complete).
pub fn channels_json(page: &[ChannelStats], next: Option<&str>) -> Vec<u8> {
    let mut o = Vec::with_capacity(64 + page.iter().map(|c| 160 + c.name.len()).sum::<usize>());
    o.extend_from_slice(b"{\"channels\":[");
    for (i, c) in page.iter().enumerate() {
        if i > 0 {
            o.push(b',');
        }
        channel_body(&mut o, c);
    }
    o.extend_from_slice(b"],\"next\":");
    match next {
        Some(n) => push_string(&mut o, n.as_bytes()),
        None => o.extend_from_slice(b"null"),
    }
    o.extend_from_slice(b"}\n");
    o
}
