use proptest::prelude::*;

use super::*;

#[test]
fn the_rate_ring_counts_the_last_minute_only() {
    let mut r = PublishRate::default();
    assert_eq!(r.per_second(0), [0; RATE_WINDOW]);
    for _ in 0..3 {
        r.record(1000);
    }
    r.record(1001);
    let s = r.per_second(1001);
    assert_eq!(s[RATE_WINDOW - 1], 1);
    assert_eq!(s[RATE_WINDOW - 2], 3);
    assert_eq!(s.iter().sum::<u64>(), 4);
    // 59 seconds later the first second is the oldest in the window; at 60 it is gone.
    assert_eq!(r.per_second(1059)[0], 3);
    assert_eq!(r.per_second(1060).iter().sum::<u64>(), 1);
    // A bucket reused a minute later starts again from zero.
    r.record(1060);
    assert_eq!(r.per_second(1060).iter().sum::<u64>(), 2);
    assert_eq!(r.per_second(5000).iter().sum::<u64>(), 0);
}

proptest! {
    #[test]
    fn the_rate_ring_matches_a_list_of_publishes(secs in proptest::collection::vec(0u64..300, 0..200), now in 0u64..400) {
        let mut sorted = secs.clone();
        sorted.sort();
        let mut r = PublishRate::default();
        for &s in &sorted {
            r.record(s);
        }
        let got = r.per_second(now);
        for (k, n) in got.iter().enumerate() {
            let second = (now + 1 + k as u64).checked_sub(RATE_WINDOW as u64);
            // Only seconds up to the last publish can be told apart from reused buckets.
            let truth = second.map_or(0, |s| sorted.iter().filter(|&&p| p == s).count() as u64);
            let last = sorted.last().copied().unwrap_or(0);
            if now >= last {
                prop_assert_eq!(*n, truth, "second {:?}", second);
            }
        }
    }
}

#[test]
fn worker_counters_snapshot_and_add() {
    let w = WorkerCounters::default();
    w.set_listeners(ListenerKind::LongPoll, 3);
    w.set_listeners(ListenerKind::WebSocket, 1);
    w.delivered(5);
    w.notified();
    w.woken(40);
    w.woken(120);
    w.woken(1_000_000);
    let c = w.snapshot();
    assert_eq!(c.listeners, [3, 0, 1, 0]);
    assert_eq!(c.listeners_total(), 4);
    assert_eq!((c.deliveries, c.notify_sent, c.notify_received), (5, 1, 3));
    assert_eq!((c.delay_sum_us, c.delay_max_us), (1_000_160, 1_000_000));
    assert_eq!(c.delay_buckets[0], 1);
    assert_eq!(c.delay_buckets[2], 1);
    assert_eq!(c.delay_buckets[DELAY_BOUNDS_US.len()], 1);
    let mut sum = Counts::default();
    sum.add(&c, false);
    assert_eq!(sum.listeners, [0; 4], "gauges are not retired");
    sum.add(&c, true);
    assert_eq!(sum.listeners, [3, 0, 1, 0]);
    assert_eq!(sum.deliveries, 10);
    assert_eq!(sum.delay_max_us, 1_000_000);
}

#[test]
fn format_by_argument_then_accept() {
    let sel = |arg: Option<&str>, accept: Option<&str>| {
        Format::select(arg.map(str::as_bytes), accept.map(str::as_bytes))
    };
    assert_eq!(sel(None, None), Ok(Format::Json));
    assert_eq!(sel(Some("text"), Some("application/json")), Ok(Format::Text));
    assert_eq!(sel(Some("prometheus"), None), Ok(Format::Prometheus));
    assert_eq!(sel(Some("json"), None), Ok(Format::Json));
    assert!(sel(Some("xml"), None).is_err());
    assert!(sel(Some(""), None).is_err());
    assert_eq!(sel(None, Some("text/plain; version=0.0.4")), Ok(Format::Prometheus));
    assert_eq!(sel(None, Some("text/plain;version=0.0.4;q=0.9,*/*;q=0.1")), Ok(Format::Prometheus));
    assert_eq!(
        sel(None, Some("application/openmetrics-text; version=1.0.0,text/plain;q=0.5")),
        Ok(Format::Prometheus)
    );
    assert_eq!(sel(None, Some("text/plain")), Ok(Format::Text));
    assert_eq!(sel(None, Some("application/json")), Ok(Format::Json));
    assert_eq!(sel(None, Some("*/*")), Ok(Format::Json));
}

fn sample() -> Snapshot {
    let w = WorkerCounters::default();
    w.set_listeners(ListenerKind::EventSource, 2);
    w.delivered(7);
    w.notified();
    w.woken(300);
    let counts = w.snapshot();
    let mut per_second = vec![0; RATE_WINDOW];
    per_second[RATE_WINDOW - 1] = 6;
    Snapshot {
        uptime_s: 12,
        nginx_version: "1.28.3".into(),
        martd_version: "0.1.0".into(),
        zone_size: 1 << 20,
        zone_used: 40960,
        zone_free: (1 << 20) - 40960,
        channels: 3,
        messages: 5,
        published: 9,
        published_per_second: per_second,
        channels_created: 4,
        channels_removed: 1,
        alloc_failures: 0,
        totals: counts,
        workers: vec![WorkerStats { slot: 1, pid: 4242, counts }],
    }
}

#[test]
fn json_has_every_figure() {
    let v: serde_json::Value = serde_json::from_str(&Format::Json.render(&sample())).unwrap();
    assert_eq!(v["uptime"], 12);
    assert_eq!(v["nginx_version"], "1.28.3");
    assert_eq!(v["zone"]["free"], (1 << 20) - 40960);
    assert_eq!(v["channels"], 3);
    assert_eq!(v["messages"], 5);
    assert_eq!(v["published"]["total"], 9);
    assert_eq!(v["published"]["last_minute"], 6);
    assert_eq!(v["published"]["per_second"], 0.1);
    assert_eq!(v["published"]["last_minute_by_second"].as_array().unwrap().len(), 60);
    assert_eq!(v["deliveries"], 7);
    assert_eq!(v["listeners"]["total"], 2);
    assert_eq!(v["listeners"]["eventsource"], 2);
    assert_eq!(v["listeners"]["longpoll"], 0);
    assert_eq!(v["notifications"]["sent"], 1);
    assert_eq!(v["notifications"]["delay_us"]["avg"], 300);
    assert_eq!(v["notifications"]["delay_us"]["buckets"]["500"], 1);
    assert_eq!(v["workers"][0]["pid"], 4242);
    assert_eq!(v["workers"][0]["listeners"]["eventsource"], 2);
    assert_eq!(v["workers"][0]["deliveries"], 7);
}

#[test]
fn text_is_one_figure_a_line() {
    let t = Format::Text.render(&sample());
    assert!(t.contains("\nchannels: 3\n"), "{t}");
    assert!(
        t.contains("\nlisteners: 2 (longpoll 0, eventsource 2, websocket 0, stream 0)\n"),
        "{t}"
    );
    assert!(t.contains("\nworker 4242: listeners 2 (longpoll 0, eventsource 2"), "{t}");
    assert!(t.lines().all(|l| l.contains(": ")), "{t}");
}

#[test]
fn prometheus_exposition() {
    let t = Format::Prometheus.render(&sample());
    for line in [
        "# TYPE martd_published_total counter",
        "martd_published_total 9",
        "martd_listeners{transport=\"eventsource\"} 2",
        "martd_notification_delay_seconds_bucket{le=\"0.000250\"} 0",
        "martd_notification_delay_seconds_bucket{le=\"0.000500\"} 1",
        "martd_notification_delay_seconds_bucket{le=\"+Inf\"} 1",
        "martd_notification_delay_seconds_sum 0.000300",
        "martd_notification_delay_seconds_count 1",
        "martd_worker_deliveries_total{pid=\"4242\"} 7",
        "martd_info{nginx_version=\"1.28.3\",martd_version=\"0.1.0\"} 1",
    ] {
        assert!(t.lines().any(|l| l == line), "{line:?} missing in\n{t}");
    }
    // Every sample's metric has a TYPE line before it, and each TYPE comes once.
    let mut typed = std::collections::HashSet::new();
    for l in t.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            assert!(typed.insert(rest.split(' ').next().unwrap().to_string()), "{l}");
        } else if !l.starts_with('#') {
            let name = l.split(['{', ' ']).next().unwrap();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| typed.contains(*b)))
                .unwrap_or(name);
            assert!(typed.contains(base), "{l}");
        }
    }
    assert_eq!(Format::Prometheus.content_type(), "text/plain; version=0.0.4; charset=utf-8");
}

#[test]
fn channel_bodies() {
    let c = ChannelStats {
        name: b"a\"b".to_vec(),
        messages: 2,
        listeners: 1,
        last_id: 17,
        requested: -1,
        size: Some(5),
        life_ms: Some(600_000),
        one2one: false,
    };
    let v: serde_json::Value = serde_json::from_slice(&channel_json(&c)).unwrap();
    assert_eq!(v["channel"], "a\"b");
    assert_eq!(v["last_message_id"], "17");
    assert_eq!(v["attributes"]["size"], 5);
    assert_eq!(v["attributes"]["life"], 600);
    assert!(v["attributes"].get("key").is_none());
    let page: serde_json::Value =
        serde_json::from_slice(&channels_json(&[c.clone(), c], Some("3-0"))).unwrap();
    assert_eq!(page["channels"].as_array().unwrap().len(), 2);
    assert_eq!(page["next"], "3-0");
    let empty: serde_json::Value = serde_json::from_slice(&channels_json(&[], None)).unwrap();
    assert!(empty["next"].is_null());
}

#[test]
fn cursors_and_prefixes() {
    let c = Cursor { bucket: 12, skip: 3 };
    assert_eq!(Cursor::parse(c.render().as_bytes()), Some(c));
    for bad in ["", "1", "-1", "1-", "a-1", "1-2-3", "99999999999999999999-1", "1 -2"] {
        assert_eq!(Cursor::parse(bad.as_bytes()), None, "{bad}");
    }
    assert_eq!(parse_prefix(b"room/*"), Ok(&b"room/"[..]));
    assert_eq!(parse_prefix(b"*"), Ok(&b""[..]));
    assert!(parse_prefix(b"room").is_err());
    assert!(parse_prefix(b"").is_err());
}
