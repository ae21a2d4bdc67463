//! Detached listeners (plain and TLS HTTP/1.x keep-alive listeners give their request back to
//! nginx while they wait).

use super::*;
use crate::crash::check_all_workers_deliver;

// 16. detached listeners (plain HTTP/1.x keep-alive listeners give their request back to nginx)

/// A publisher connection, and a listener on `ch` on a connection of its own that the zone
/// already counts as waiting.
async fn publisher_and_waiting(port: u16, ch: &str, etag: Option<&str>) -> (Conn, Pending) {
    let mut p = Conn::open_probed(port).await;
    let l = Conn::open_probed(port).await.listen(ch, etag, None);
    p.wait_listeners(ch, 1).await;
    (p, l)
}

/// Resident memory of the workers, in bytes.
fn workers_rss(ng: &Nginx) -> u64 {
    ng.worker_pids()
        .iter()
        .map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            let kb: u64 = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap();
            kb * 1024
        })
        .sum()
}

/// Worker memory per waiting listener (connection included), fresh server, `n` listeners,
/// over TLS when `tls` has (CA certificate, certificate, key). Half of them then close their connection,
/// and the other half get a message.
async fn bytes_per_listener(
    sub_extra: &str,
    n: usize,
    tls: Option<&(PathBuf, PathBuf, PathBuf)>,
) -> u64 {
    let tls_port = free_port();
    let tls_conf = tls.map_or(String::new(), |(_, cert, key)| {
        format!(
            "        listen 127.0.0.1:{tls_port} ssl reuseport;\n        ssl_certificate {};\n        ssl_certificate_key {};\n",
            cert.display(),
            key.display()
        )
    });
    let ng = Nginx::start(Conf::new(&format!("{tls_conf}{}", pubsub("", sub_extra))));
    let mut c = Conn::open_probed(ng.port).await;
    let before = workers_rss(&ng);
    let conns = match tls {
        None => Conn::open_many(ng.port, n).await,
        Some((ca, _, _)) => {
            let connector = connector(ca);
            let mut conns = Vec::with_capacity(n);
            while conns.len() < n {
                let mut set = tokio::task::JoinSet::new();
                for _ in 0..(n - conns.len()).min(50) {
                    let connector = connector.clone();
                    set.spawn(async move { Conn::try_open_tls(tls_port, &connector).await });
                }
                while let Some(r) = set.join_next().await {
                    conns.push(r.unwrap().expect("TLS connection"));
                }
            }
            conns
        }
    };
    let mut ls: Vec<Pending> = conns.into_iter().map(|x| x.listen("mem", None, None)).collect();
    c.wait_listeners("mem", n as u64).await;
    let grown = workers_rss(&ng).saturating_sub(before);
    ls.truncate(n / 2);
    c.wait_listeners("mem", (n / 2) as u64).await;
    let r = c.publish("mem", "to all").await;
    assert_published(&r, 201, "publish to the waiting listeners");
    for l in ls {
        assert_eq!(expect_msg(&l.resp().await).text(), "to all");
    }
    ng.finish();
    grown / n as u64
}

#[test]
fn detached_listeners_hold_a_tenth_of_a_parked_request() {
    heavy_test(async {
        let n = 2000;
        let detached = bytes_per_listener("", n, None).await;
        let parked = bytes_per_listener("martd_detach_listeners off;", n, None).await;
        eprintln!("worker memory per listener: detached {detached} B, parked request {parked} B");
        assert!(
            detached * 4 < parked && detached < 4096,
            "detached listeners use {detached} B each, parked requests {parked} B"
        );
    });
}

#[test]
fn tls_listeners_detach_too() {
    heavy_test(async {
        let dir = tempfile::tempdir().unwrap();
        let certs = make_cert(dir.path());
        let n = 1000;
        let detached = bytes_per_listener("", n, Some(&certs)).await;
        let parked = bytes_per_listener("martd_detach_listeners off;", n, Some(&certs)).await;
        eprintln!("worker memory per TLS listener: detached {detached} B, parked {parked} B");
        // TLS state stays with the connection either way; the request goes.
        assert!(
            detached + 4096 < parked,
            "detached TLS listeners use {detached} B each, parked requests {parked} B"
        );

        // Taken over from nginx's keep-alive state: keepalive_timeout 1s does not end it.
        let tls_port = free_port();
        let (ca, cert, key) = &certs;
        let ng = Nginx::start(Conf::new(&format!(
            "        listen 127.0.0.1:{tls_port} ssl;\n        ssl_certificate {};\n        ssl_certificate_key {};\n{}",
            cert.display(),
            key.display(),
            pubsub("", "martd_listener_timeout 2s; keepalive_timeout 1s;")
        )));
        let tls = connector(ca);
        let c = Conn::try_open_tls(tls_port, &tls).await.unwrap();
        let started = Instant::now();
        let (c, r) = c.listen("tka", Some("\"1\""), None).conn_resp().await;
        assert_status(&r, 304, "TLS listener timeout");
        assert!(started.elapsed() >= Duration::from_millis(1900), "after {:?}", started.elapsed());
        let l = c.listen("tka", Some("\"1\""), None);
        let mut p = Conn::open_probed(ng.port).await;
        p.wait_listeners("tka", 1).await;
        p.publish("tka", "over tls").await;
        assert_eq!(expect_msg(&l.resp().await).text(), "over tls");
        ng.finish();
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_listener_outlives_keepalive_timeout() {
    // The connection is taken over from nginx's keep-alive state: its 1 s keep-alive timeout
    // does not apply, the 3 s listener timeout does.
    let ng =
        Nginx::start(Conf::new(&pubsub("", "martd_listener_timeout 3s; keepalive_timeout 1s;")));
    let c = Conn::open_probed(ng.port).await;
    let started = Instant::now();
    let (c, r) = c.listen("ka", Some("\"1\""), None).conn_resp().await;
    assert_status(&r, 304, "detached listener timeout");
    assert_eq!(r.header("etag"), Some("\"1\""));
    assert!(
        started.elapsed() >= Duration::from_millis(2900),
        "answered after {:?}",
        started.elapsed()
    );
    // The same connection serves the next long-poll, which a message answers.
    let l = c.listen("ka", Some("\"1\""), None);
    let mut p = Conn::open_probed(ng.port).await;
    p.wait_listeners("ka", 1).await;
    p.publish("ka", "after keepalive").await;
    assert_eq!(expect_msg(&l.resp().await).text(), "after keepalive");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_detached_listener_skips_access_phases() {
    // One request a minute per address: the long-poll passes limit_req once, when it parks.
    let ng = Nginx::start(
        Conf::new(&pubsub("", "limit_req zone=one; limit_req_status 429;"))
            .http("limit_req_zone $binary_remote_addr zone=one:1m rate=1r/m;"),
    );
    let (mut p, l) = publisher_and_waiting(ng.port, "lr", None).await;
    let r = p.publish("lr", "once").await;
    assert_published(&r, 201, "publish");
    assert_eq!(expect_msg(&l.resp().await).text(), "once");
    // limit_req is in force for new requests.
    let r = p.get(&sub_path("lr"), &[]).await;
    assert_status(&r, 429, "second long-poll within the minute");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_conn_still_caps_waiting_listeners() {
    let ng = Nginx::start(
        Conf::new(&pubsub("", "limit_conn addr 1;"))
            .http("limit_conn_zone $binary_remote_addr zone=addr:1m;"),
    );
    let (mut p, l) = publisher_and_waiting(ng.port, "lc", None).await;
    let r = p.get(&sub_path("lc"), &[]).await;
    assert_status(&r, 503, "a second waiting long-poll from the same address");
    p.publish("lc", "one").await;
    assert_eq!(expect_msg(&l.resp().await).text(), "one");
    // The slot is free again once the first one is answered. The client can read the answer
    // a moment before its worker has freed the request (and with it the slot), and the next
    // request may reach the other worker in that moment: ask again a few times.
    let mut r = p.get(&sub_path("lc"), &[]).await;
    for _ in 0..50 {
        if r.status != 503 {
            break;
        }
        sleep_ms(10).await;
        r = p.get(&sub_path("lc"), &[]).await;
    }
    assert_eq!(expect_msg(&r).text(), "one");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_listener_access_log_one_line_when_answered() {
    let ng = Nginx::start(
        Conf::new(&pubsub("", "access_log logs/listen.log brief;"))
            .http("log_format brief '$status $request $connection_requests';"),
    );
    let log = ng.prefix().join("logs/listen.log");
    let (mut p, l) = publisher_and_waiting(ng.port, "al", Some("\"1\"")).await;
    p.publish("al", "logged").await;
    let (c, r) = l.conn_resp().await;
    assert_eq!(expect_msg(&r).text(), "logged");
    drop(c);
    let lines: Vec<String> = within(QUICK, "access log line", async {
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<String> =
                text.lines().filter(|l| l.contains("/sub?channel=al")).map(String::from).collect();
            if !lines.is_empty() {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = std::fs::read_to_string(&log).unwrap();
    let all: Vec<&str> = text.lines().filter(|l| l.contains("/sub?channel=al")).collect();
    assert_eq!(all.len(), 1, "one access log line per long-poll: {all:?} (first seen {lines:?})");
    // Second request on its connection (after the probe), logged with the answer's status.
    assert_eq!(all[0], "200 GET /sub?channel=al HTTP/1.1 2");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_sent_while_detached_is_answered_after_it() {
    let ng = Nginx::start(std_conf());
    let mut p = Conn::open_probed(ng.port).await;
    let mut raw = RawConn::open(ng.port).await;
    raw.write(b"GET /sub?channel=pl HTTP/1.1\r\nHost: t\r\nIf-None-Match: \"1\"\r\n\r\n").await;
    p.wait_listeners("pl", 1).await;
    // A second request on the same connection while the first waits (HTTP/1.1 pipelining).
    raw.write(b"GET /__worker HTTP/1.1\r\nHost: t\r\n\r\n").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = p.publish("pl", "first").await;
    assert_published(&r, 201, "publish");
    let first = raw.response(QUICK).await;
    assert_eq!((first.status, first.body.as_slice()), (200, &b"first"[..]));
    let second = raw.response(QUICK).await;
    assert_eq!(second.status, 204, "the pipelined request is answered after the long-poll");
    // Then the connection is a normal keep-alive connection.
    raw.write(b"GET /sub?channel=pl HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert_eq!(raw.response(QUICK).await.body, b"first");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_that_cannot_detach_still_wait() {
    // HTTP/1.0 without keep-alive, a request with a body and `martd_detach_listeners off`
    // wait as nginx requests; HTTP/1.0 keep-alive and a request that arrived in two pieces
    // detach. Every one gets the message.
    let ng = Nginx::start(Conf::new(&format!(
        "{}        location = /sub-parked {{ martd_listen; martd_detach_listeners off; }}\n",
        pubsub("", "")
    )));
    let mut p = Conn::open_probed(ng.port).await;
    let mut http10 = RawConn::open(ng.port).await;
    http10.write(b"GET /sub?channel=nd HTTP/1.0\r\n\r\n").await;
    let mut keepalive10 = RawConn::open(ng.port).await;
    keepalive10.write(b"GET /sub?channel=nd HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").await;
    let mut split = RawConn::open(ng.port).await;
    split.write(b"GET /sub?channel=nd HTTP/1.1\r\nHo").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    split.write(b"st: t\r\n\r\n").await;
    let mut with_body = RawConn::open(ng.port).await;
    with_body
        .write(b"GET /sub?channel=nd HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi")
        .await;
    let off = Conn::open_probed(ng.port).await.spawn_get("/sub-parked?channel=nd", &[], LONG);
    p.wait_listeners("nd", 5).await;
    let r = p.publish("nd", "all five").await;
    assert_published(&r, 201, "publish");
    for (what, raw) in [
        ("HTTP/1.0", &mut http10),
        ("HTTP/1.0 keep-alive", &mut keepalive10),
        ("split request", &mut split),
        ("request with a body", &mut with_body),
    ] {
        let r = raw.response(QUICK).await;
        assert_eq!((r.status, r.body.as_slice()), (200, &b"all five"[..]), "{what}");
    }
    assert!(http10.closed_within(QUICK).await, "HTTP/1.0 connection not closed");
    assert_eq!(expect_msg(&off.resp().await).text(), "all five");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_gone_while_detached_leaves() {
    let ng = Nginx::start(std_conf());
    let mut p = Conn::open_probed(ng.port).await;
    let mut raws = Vec::new();
    for _ in 0..20 {
        let mut raw = RawConn::open(ng.port).await;
        raw.write(b"GET /sub?channel=gone HTTP/1.1\r\nHost: t\r\nIf-None-Match: \"1\"\r\n\r\n")
            .await;
        raws.push(raw);
    }
    p.wait_listeners("gone", 20).await;
    // Five of the leavers send another request first: unread data must not hide the close.
    for raw in &mut raws[5..10] {
        raw.write(b"GET /__worker HTTP/1.1\r\nHost: t\r\n\r\n").await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    raws.truncate(5);
    p.wait_listeners("gone", 5).await;
    let r = p.publish("gone", "to five").await;
    assert_eq!(parse_info_text(&r.text()).listeners, 5, "listeners counted at publish");
    for raw in &mut raws {
        assert_eq!(raw.response(QUICK).await.body, b"to five");
    }
    ng.finish();
}

#[test]
fn detached_listener_churn_with_timeouts_aborts_and_a_reload() {
    // 400 listeners on 8 channels with a 1 s listener timeout, a publisher every 20 ms, a third
    // of the listeners dropping their connection at random moments, and a reload in the
    // middle: every long-poll ends with a message, a 304 or the client's own abort, and the
    // listener counts end at zero everywhere.
    heavy_test(async {
        let mut ng = Nginx::start(Conf::new(&pubsub("", "martd_listener_timeout 1s;")));
        let port = ng.port;
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for t in 0..400u64 {
            let (stop, answers) = (stop.clone(), answers.clone());
            tasks.push(tokio::spawn(async move {
                let ch = format!("churn{}", t % 8);
                let mut etag: Option<String> = None;
                let mut n = t;
                while !stop.load(Ordering::Relaxed) {
                    let Ok(c) = Conn::try_open(port).await else {
                        sleep_ms(20).await;
                        continue;
                    };
                    n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let pending = c.listen(&ch, etag.as_deref(), None);
                    if t % 3 == 0 {
                        // Abort after 0–1.2 s: before or after the timeout or a message.
                        sleep_ms((n >> 33) % 1200).await;
                        if !pending.is_finished() {
                            drop(pending);
                            continue;
                        }
                    }
                    let r = pending.resp().await;
                    match r.status {
                        200 => etag = r.header("etag").map(String::from),
                        304 => {}
                        s => panic!("churn listener got {s}: {}", r.text()),
                    }
                    answers.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        let mut p = Conn::open_probed(port).await;
        let t0 = Instant::now();
        let mut reloaded = false;
        let mut n = 0u64;
        while t0.elapsed() < Duration::from_secs(4) {
            n += 1;
            let r = p.publish(&format!("churn{}", n % 8), format!("m{n}")).await;
            assert!(r.status == 201 || r.status == 202, "publish got {}", r.status);
            if !reloaded && t0.elapsed() > Duration::from_secs(2) {
                ng.reload();
                reloaded = true;
                p = Conn::open_probed(port).await;
            }
            sleep_ms(20).await;
        }
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            within(LONG, "churn listener task", t).await.unwrap();
        }
        assert!(answers.load(Ordering::Relaxed) > 400, "too few answers");
        let mut c = Conn::open_probed(port).await;
        for i in 0..8 {
            c.wait_listeners(&format!("churn{i}"), 0).await;
        }
        check_all_workers_deliver(&ng, "churn-after").await;
        ng.finish();
    });
}

/// nginx built `--with-debug` (the vendored one is) logging at `debug`: martd's timers, posted
/// events and wake-up socket are safe under nginx's debug logging (which reads every timer
/// event's data as a connection), and the debug log shows parking, detaching, waking and the
/// replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_log_lines_for_park_detach_wake_replay() {
    let mut conf = Conf::new(&pubsub("", "martd_listener_timeout 1500ms;"));
    conf.main = "error_log logs/debug.log debug;".to_string();
    let ng = Nginx::start(conf);
    let (mut p, l) = publisher_and_waiting(ng.port, "dbg", None).await;
    assert_published(&p.publish("dbg", "m").await, 201, "publish");
    assert_eq!(expect_msg(&l.resp().await).text(), "m");
    // A listener timeout (a timer) and the once-a-second housekeeping timer fire too.
    let r = Conn::open_probed(ng.port).await.get(&sub_path("dbg-timeout"), &[]).await;
    assert_status(&r, 304, "timed-out listener");
    let log = std::fs::read_to_string(ng.prefix().join("logs/debug.log")).unwrap_or_default();
    if log.contains("[debug]") {
        for line in [
            "martd: parked listener",
            "martd: detached listener",
            "martd: woken",
            "martd: replaying detached listener",
            "martd: replayed listener skips the access phases",
        ] {
            assert!(log.contains(line), "no {line:?} line in the debug log");
        }
    } else {
        // An nginx without --with-debug (MARTD_NGINX_BINARY): no debug lines to check.
        eprintln!("nginx has no debug logging: only the run itself was checked");
    }
    ng.finish();
}
