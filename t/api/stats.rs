//! `martd_stats` (issue 11): the figures after a scripted workload over both workers equal
//! what was done; JSON, text and Prometheus (parsed with `prometheus-parse`); one channel and
//! paged listings; a worker killed with SIGKILL; bad requests.

use serde_json::Value;

use super::*;

const SSE: (&str, &str) = ("Accept", "text/event-stream");

fn stats_conf() -> Conf {
    api_conf(
        "        location = /stats { martd_stats; }
        location = /es { martd_listen eventsource websocket stream; }",
    )
}

async fn stats_of(c: &mut Conn, args: &str) -> Value {
    let r = c.get(&format!("/stats{args}"), &[]).await;
    assert_eq!(r.status, 200, "stats{args}: {}", r.text());
    assert_eq!(media_type(&r).as_deref(), Some("application/json"), "{:?}", r.headers);
    parse_json(&r.body, "stats")
}

async fn stats(c: &mut Conn) -> Value {
    stats_of(c, "").await
}

/// The stats' entry of worker `pid`.
fn worker(s: &Value, pid: u32) -> &Value {
    let ws = s["workers"].as_array().expect("workers");
    ws.iter().find(|w| w["pid"] == pid).unwrap_or_else(|| panic!("worker {pid} in {s}"))
}

/// Polls the stats until `ok` holds (the figures of other workers settle a moment later than
/// the responses the test saw), up to 5 s; returns the last stats.
async fn stats_until(c: &mut Conn, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = stats(c).await;
        if ok(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}: {s:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn listeners(s: &Value, kind: &str) -> u64 {
    s["listeners"][kind].as_u64().unwrap_or_else(|| panic!("listeners.{kind} in {s}"))
}

async fn publish_on(c: &mut Conn, ch: &str, body: &str) {
    let r = c.publish(ch, body.to_string()).await;
    assert!(r.status == 201 || r.status == 202, "publish {ch}: {} {}", r.status, r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn figures_equal_a_scripted_workload() {
    let mut ng = Nginx::start(stats_conf());
    ng.allow_log("exited on signal 9");
    ng.allow_log("was locked by");
    let w = ng.worker_pids();
    let (w0, w1) = (w[0], w[1]);
    let mut s0 = Conn::open_on(ng.port, w0).await;
    let mut p0 = Conn::open_on(ng.port, w0).await;
    let mut p1 = Conn::open_on(ng.port, w1).await;

    let s = stats(&mut s0).await;
    assert_eq!((s["channels"].as_u64(), s["messages"].as_u64()), (Some(0), Some(0)), "{s}");
    assert_eq!(s["published"]["total"], 0);
    assert_eq!(s["listeners"]["total"], 0);
    assert_eq!(s["martd_version"], env!("CARGO_PKG_VERSION"));
    assert!(s["nginx_version"].as_str().is_some_and(|v| v.starts_with("1.")), "{s}");
    let mut pids: Vec<u64> =
        s["workers"].as_array().unwrap().iter().map(|w| w["pid"].as_u64().unwrap()).collect();
    pids.sort();
    let mut want = vec![u64::from(w0), u64::from(w1)];
    want.sort();
    assert_eq!(pids, want);
    let zone = &s["zone"];
    assert_eq!(zone["size"], 32 * 1024 * 1024);
    assert_eq!(zone["used"].as_u64().unwrap() + zone["free"].as_u64().unwrap(), 32 * 1024 * 1024);

    // Publishes from both workers: s1 3 messages (w0), s2 2 and s3 1 (w1).
    for i in 0..3 {
        publish_on(&mut p0, "s1", &format!("a{i}")).await;
    }
    for i in 0..2 {
        publish_on(&mut p1, "s2", &format!("b{i}")).await;
    }
    publish_on(&mut p1, "s3", "c").await;
    let s = stats(&mut s0).await;
    assert_eq!((s["channels"].as_u64(), s["messages"].as_u64()), (Some(3), Some(6)), "{s}");
    assert_eq!(s["published"]["total"], 6);
    assert_eq!(s["published"]["last_minute"], 6);
    let by_second: u64 = s["published"]["last_minute_by_second"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(by_second, 6);

    // Long-polls: one on each worker; the one on w1 aborts; a publish from w1 answers w0's.
    let l0 = Conn::open_on(ng.port, w0).await.listen("lp", None, None);
    let l1 = Conn::open_on(ng.port, w1).await.listen("lp", None, None);
    p0.wait_listeners("lp", 2).await;
    let s = stats_until(&mut s0, "2 long-polls", |s| listeners(s, "longpoll") == 2).await;
    assert_eq!(worker(&s, w0)["listeners"]["longpoll"], 1);
    assert_eq!(worker(&s, w1)["listeners"]["longpoll"], 1);
    drop(l1);
    p0.wait_listeners("lp", 1).await;
    stats_until(&mut s0, "1 long-poll", |s| listeners(s, "longpoll") == 1).await;
    publish_on(&mut p1, "lp", "lp-msg").await;
    assert_eq!(expect_msg(&l0.resp().await).text(), "lp-msg");
    // A long-poll answered at once (s1's oldest message), on w1.
    let r = Conn::open_on(ng.port, w1).await.get("/sub?channel=s1", &[]).await;
    assert_eq!(expect_msg(&r).text(), "a0");
    let s = stats_until(&mut s0, "no long-poll", |s| listeners(s, "longpoll") == 0).await;
    assert_eq!(worker(&s, w0)["deliveries"], 1);
    assert_eq!(worker(&s, w1)["deliveries"], 1);

    // Streams on channel ev: EventSource and plain stream on w0, a WebSocket anywhere.
    let mut es = Streaming::open(Conn::open_on(ng.port, w0).await, "/es?channel=ev", &[SSE], QUICK)
        .await
        .events();
    let mut st =
        Streaming::open(Conn::open_on(ng.port, w0).await, "/es?channel=ev", &[], QUICK).await;
    let url = format!("ws://127.0.0.1:{}/es?channel=ev", ng.port);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("ws");
    p0.wait_listeners("ev", 3).await;
    let s = stats_until(&mut s0, "3 streams", |s| listeners(s, "total") == 3).await;
    assert_eq!(
        (listeners(&s, "eventsource"), listeners(&s, "websocket"), listeners(&s, "stream")),
        (1, 1, 1)
    );
    let ws_on_w1 = worker(&s, w1)["listeners"]["websocket"] == 1;
    assert_eq!(worker(&s, w0)["listeners"]["total"], if ws_on_w1 { 2 } else { 3 });
    publish_on(&mut p0, "ev", "ev-msg").await;
    assert_eq!(es.take(1, PROMPT).await[0].data, "ev-msg");
    assert_eq!(st.pieces(b"\n", 1, PROMPT).await, vec![b"ev-msg".to_vec()]);
    use futures_util::StreamExt;
    match tokio::time::timeout(PROMPT, ws.next()).await {
        Ok(Some(Ok(m))) => assert_eq!(m.into_text().expect("text").as_str(), "ev-msg"),
        other => panic!("websocket: {other:?}"),
    }
    drop((es, st, ws));
    p0.wait_listeners("ev", 0).await;
    stats_until(&mut s0, "streams closed", |s| listeners(s, "total") == 0).await;

    // A deleted channel.
    let r = p1.send("DELETE", "/pub?channel=s3", &[], "").await;
    assert_eq!(r.status, 200);

    // The truth: channels s1 (3), s2 (2), lp (1), ev (1); 8 publishes; deliveries: lp-msg,
    // a0, and ev-msg to 3 streams. Wake-ups between workers: lp (w1 -> w0), and ev (w0 -> w1)
    // if the WebSocket is on w1.
    let s = stats(&mut s0).await;
    assert_eq!((s["channels"].as_u64(), s["messages"].as_u64()), (Some(4), Some(7)), "{s}");
    assert_eq!(s["published"]["total"], 8);
    assert_eq!(s["published"]["last_minute"], 8);
    assert_eq!(s["channels_created"], 5);
    assert_eq!(s["deliveries"], 5, "{s}");
    assert_eq!(s["alloc_failures"], 0);
    let wakeups = if ws_on_w1 { 2 } else { 1 };
    assert_eq!(s["notifications"]["sent"], wakeups, "{s}");
    assert_eq!(s["notifications"]["received"], wakeups, "{s}");
    assert_eq!(s["notifications"]["delay_us"]["count"], wakeups);
    assert!(s["notifications"]["delay_us"]["max"].as_u64().unwrap() < 1_000_000, "{s}");
    assert_eq!(worker(&s, w1)["notifications"]["sent"], 1);
    assert_eq!(worker(&s, w0)["notifications"]["received"], 1);
    let w0_deliveries = worker(&s, w0)["deliveries"].as_u64().unwrap();
    assert_eq!(w0_deliveries, if ws_on_w1 { 3 } else { 4 });

    // Prometheus, parsed with a real parser, says the same.
    let r = s0.get("/stats?format=prometheus", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    let prom = prom_samples(&r.text());
    assert_eq!(prom["martd_channels"], 4.0);
    assert_eq!(prom["martd_messages"], 7.0);
    assert_eq!(prom["martd_published_total"], 8.0);
    assert_eq!(prom["martd_deliveries_total"], 5.0);
    assert_eq!(prom["martd_notifications_sent_total"], wakeups as f64);
    assert_eq!(prom["martd_listeners{transport=longpoll}"], 0.0);
    // The Accept header asks for the same.
    let r = s0.get("/stats", &[("Accept", "text/plain; version=0.0.4")]).await;
    assert_eq!(prom_samples(&r.text())["martd_published_total"], 8.0);
    let r = s0.get("/stats", &[("Accept", "application/openmetrics-text; version=1.0.0")]).await;
    assert_eq!(prom_samples(&r.text())["martd_channels"], 4.0);
    let r = s0.get("/stats?format=text", &[]).await;
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert!(r.text().contains("\nchannels: 4\nmessages: 7\npublished: 8\n"), "{}", r.text());

    // A worker killed with SIGKILL while a long-poll and an EventSource wait on it: its
    // listeners stop counting once it is replaced; what it did stays counted.
    let dl = Conn::open_on(ng.port, w1).await.listen("kk", None, None);
    let des =
        Streaming::open(Conn::open_on(ng.port, w1).await, "/es?channel=kk", &[SSE], QUICK).await;
    p0.wait_listeners("kk", 2).await;
    stats_until(&mut s0, "2 on w1", |s| listeners(s, "total") == 2).await;
    ng.kill_worker(w1, libc::SIGKILL);
    let new = ng.wait_respawn(w1);
    let s = stats_until(&mut s0, "respawned", |s| {
        let ws = s["workers"].as_array().unwrap();
        ws.len() == 2 && ws.iter().all(|w| w["pid"] != w1)
    })
    .await;
    assert_eq!(s["listeners"]["total"], 0, "{s}");
    assert_eq!(s["deliveries"], 5, "{s}");
    assert_eq!(s["notifications"]["sent"], wakeups, "{s}");
    assert_eq!(s["published"]["total"], 8);
    assert!(new.iter().any(|&p| s["workers"].as_array().unwrap().iter().any(|w| w["pid"] == p)));
    let kk = stats_of(&mut s0, "?channel=kk").await;
    assert_eq!(kk["listeners"], 0, "{kk}");
    drop((dl, des));
    ng.finish();
}

/// Every sample of a Prometheus text body, keyed `name` or `name{label=value,...}`.
fn prom_samples(text: &str) -> BTreeMap<String, f64> {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("prometheus text");
    let mut out = BTreeMap::new();
    for s in scrape.samples {
        let mut labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        let key = if labels.is_empty() {
            s.metric.clone()
        } else {
            format!("{}{{{}}}", s.metric, labels.join(","))
        };
        let v = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => continue,
        };
        out.insert(key, v);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_channel_and_paged_listings() {
    let ng = Nginx::start(stats_conf());
    let mut c = Conn::open(ng.port).await;
    jpub(&mut c, "room/k", "size=5&life=600&key=s3cret", "x").await;
    let v = stats_of(&mut c, "?channel=room/k").await;
    assert_eq!(v["channel"], "room/k");
    assert_eq!(v["messages"], 1);
    assert_eq!(v["listeners"], 0);
    assert_eq!(v["attributes"]["size"], 5);
    assert_eq!(v["attributes"]["life"], 600);
    assert!(v["attributes"].get("key").is_none() && !v.to_string().contains("s3cret"), "{v}");
    let r = c.get("/stats?channel=nope", &[]).await;
    assert_eq!(r.status, 404);
    let v = parse_json(&r.body, "missing channel");
    assert_eq!(
        (v["error"].as_str(), v["channel"].as_str()),
        (Some("no such channel"), Some("nope"))
    );

    for i in 0..150 {
        c.publish(&format!("room/{i}"), "m").await;
    }
    for i in 0..20 {
        c.publish(&format!("other/{i}"), "m").await;
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let args = match &cursor {
            Some(cur) => format!("?channels=room/*&cursor={cur}"),
            None => "?channels=room/*".to_string(),
        };
        let v = stats_of(&mut c, &args).await;
        let page = v["channels"].as_array().expect("channels");
        assert!(page.len() <= 100, "{} on a page", page.len());
        for ch in page {
            let name = ch["channel"].as_str().unwrap().to_string();
            assert!(name.starts_with("room/"), "{name}");
            assert!(seen.insert(name), "listed twice");
        }
        pages += 1;
        match v["next"].as_str() {
            Some(n) => cursor = Some(n.to_string()),
            None => break,
        }
        assert!(pages < 50);
    }
    assert_eq!(seen.len(), 151, "room/0..149 and room/k");
    assert!(pages >= 2);
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_a_reason() {
    let ng = Nginx::start(stats_conf());
    let mut c = Conn::open(ng.port).await;
    for (args, what) in [
        ("?format=xml", "unknown format"),
        ("?channels=room", "prefix without *"),
        ("?channels=room*&cursor=x", "bad cursor"),
        ("?cursor=1-0", "cursor alone"),
        ("?channel=a&channels=a*", "both"),
        ("?channel=a&format=prometheus", "a channel in prometheus"),
        ("?channel=", "empty channel"),
    ] {
        let r = c.get(&format!("/stats{args}"), &[]).await;
        let reason = expect_json_error(&r, 400, what);
        assert!(!reason.is_empty(), "{what}");
    }
    for m in ["POST", "DELETE", "PUT"] {
        let r = c.send(m, "/stats", &[], "").await;
        expect_json_error(&r, 405, m);
        assert_eq!(r.header("allow"), Some("GET, HEAD"));
    }
    let r = c.send("HEAD", "/stats", &[], "").await;
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    ng.finish();
}

/// A realistic configuration: the stats behind `allow`/`deny`, the variables in an access
/// log's `log_format` and in `add_header`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_allow_deny_and_in_log_format_and_add_header() {
    let conf = Conf::new(
        "        location = /pub { martd_push; }
        location = /stats { allow 127.0.0.1; deny all; martd_stats; }
        location = /stats-private { allow 10.0.0.1; deny all; martd_stats; }
        location = /lpub { martd_push; access_log logs/martd.log martd;
                           add_header X-Id $martd_message_id always; add_header X-Listeners $martd_listeners always;
                           add_header X-Messages $martd_messages always; }
        location = /lsub { martd_listen; access_log logs/martd.log martd;
                           add_header X-Id $martd_message_id always; add_header X-Channel $martd_channel_id; }",
    )
    .http(
        "log_format martd '$uri $arg_channel $status ch=$martd_channel_id id=$martd_message_id \
         l=$martd_listeners m=$martd_messages';",
    );
    let ng = Nginx::start(conf);
    let mut c = Conn::open(ng.port).await;
    assert_eq!(c.get("/stats", &[]).await.status, 200);
    assert_eq!(c.get("/stats-private", &[]).await.status, 403);

    let r = c.send("POST", "/lpub?channel=v1", &[], "hello").await;
    assert_eq!(r.status, 202);
    let id = r.header("x-id").expect("X-Id").to_string();
    assert_eq!((r.header("x-listeners"), r.header("x-messages")), (Some("0"), Some("1")));
    let r = c.get("/lsub?channel=v1", &[]).await;
    assert_eq!(expect_msg(&r).text(), "hello");
    assert_eq!((r.header("x-id"), r.header("x-channel")), (Some(id.as_str()), Some("v1")));

    // A long-poll that waits, answered from the other worker or this one.
    let l = Conn::open(ng.port).await.spawn_get("/lsub?channel=v2", &[], PROMPT);
    c.wait_listeners("v2", 1).await;
    let r = c.send("POST", "/lpub?channel=v2", &[], "again").await;
    assert_eq!(r.status, 201);
    let id2 = r.header("x-id").expect("X-Id").to_string();
    let r = l.resp().await;
    assert_eq!((r.status, r.header("x-id")), (200, Some(id2.as_str())));
    assert_eq!(c.get("/lsub?channel=", &[]).await.status, 400);

    let log_path = ng.prefix().join("logs/martd.log");
    let deadline = Instant::now() + Duration::from_secs(5);
    let log = loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log.lines().count() >= 5 || Instant::now() > deadline {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let lines: Vec<&str> = log.lines().collect();
    for want in [
        format!("/lpub v1 202 ch=v1 id={id} l=0 m=1"),
        format!("/lsub v1 200 ch=v1 id={id} l=0 m=1"),
        format!("/lpub v2 201 ch=v2 id={id2} l=1 m=1"),
        format!("/lsub v2 200 ch=v2 id={id2} l=- m=-"),
        "/lsub  400 ch=- id=- l=- m=-".to_string(),
    ] {
        assert!(lines.contains(&want.as_str()), "{want:?} not in\n{log}");
    }
    ng.finish();
}
