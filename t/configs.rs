//! martd inside realistic nginx configurations (issue 8): a reload while a publish body is
//! still arriving, a cache zone (cache manager and loader processes), listeners reached through
//! `X-Accel-Redirect`, `error_page`, `try_files` and named locations, listen locations with
//! `mirror`, `limit_req`, `limit_conn`, `realip` and `allow`/`deny`, the access log of a
//! listener whose client went away, TLS and HTTP/2 listeners, and a keep-alive connection whose
//! detached listener timed out and asked again. Real nginx with 2 workers, real sockets; every
//! wait is bounded, and the harness fails a test whose error log has alerts or crashes.

mod harness;

use std::time::{Duration, Instant};

use harness::backend::*;
use harness::h2::*;
use harness::*;

/// How soon a woken listener must be answered (its own timeout is far longer).
const PROMPT: Duration = Duration::from_secs(3);

/// A message id newer than any this zone will issue: the listener waits for the next message.
const FUTURE: &str = "\"9000000000000000000\"";

fn assert_status(r: &Resp, status: u16, what: &str) {
    assert_eq!(r.status, status, "{what}: got {} {:?} body {:?}", r.status, r.headers, r.text());
}

fn assert_published(r: &Resp, what: &str) -> Info {
    assert!(r.status == 201 || r.status == 202, "{what}: publish got {} {:?}", r.status, r.text());
    parse_info_text(&r.text())
}

async fn sleep_ms(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// A long-poll of `path` on a new connection served by worker `pid`.
async fn listen_on(port: u16, pid: u32, path: &str, headers: &[(&str, &str)]) -> Pending {
    Conn::open_on(port, pid).await.spawn_get(path, headers, LONG)
}

/// The answer of a woken listener, which must come within [`PROMPT`].
async fn promptly(p: Pending, what: &str) -> (Conn, Resp) {
    within(PROMPT, &format!("{what}: woken listener answered within {PROMPT:?}"), p.conn_resp())
        .await
}

/// Expects the message `body` (a listener's 200), from worker `worker` if given.
fn expect_body(r: &Resp, body: &str, worker: Option<u32>, what: &str) -> Msg {
    assert_eq!(r.status, 200, "{what}: expected a message, got {} {:?}", r.status, r.text());
    let m = expect_msg(r);
    assert_eq!(m.text(), body, "{what}: message body");
    if let Some(w) = worker {
        assert_eq!(r.worker(), w, "{what}: answered by another worker");
    }
    m
}

/// Waits (bounded) until `pred` holds on the file at `path`'s lines that contain `needle`.
async fn wait_log_lines(
    path: &std::path::Path,
    needle: &str,
    what: &str,
    pred: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let read = || -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .map(String::from)
            .collect()
    };
    let deadline = Instant::now() + QUICK;
    loop {
        let lines = read();
        if pred(&lines) {
            return lines;
        }
        if Instant::now() > deadline {
            panic!("{what}: access log {} lines with {needle:?}: {lines:?}", path.display());
        }
        sleep_ms(20).await;
    }
}

/// Exactly one access-log line for `needle` (and still one a little later).
async fn one_log_line(path: &std::path::Path, needle: &str, what: &str) -> String {
    wait_log_lines(path, needle, what, |l| !l.is_empty()).await;
    sleep_ms(300).await;
    let lines = wait_log_lines(path, needle, what, |_| true).await;
    assert_eq!(lines.len(), 1, "{what}: one access-log line per long-poll: {lines:?}");
    lines.into_iter().next().unwrap()
}

/// Listeners on both workers get messages published from the other one, `rounds` times in
/// each direction, within [`PROMPT`].
async fn deliver_both_ways(ng: &Nginx, ch: &str, rounds: usize, what: &str) {
    let w = ng.worker_pids();
    assert_eq!(w.len(), 2, "{what}: workers {w:?}");
    let mut etag: Option<String> = None;
    for round in 0..rounds {
        for (lw, pw) in [(w[0], w[1]), (w[1], w[0])] {
            let mut p = Conn::open_on(ng.port, pw).await;
            let h: Vec<(&str, &str)> =
                etag.as_deref().map(|e| vec![("if-none-match", e)]).unwrap_or_default();
            let l = listen_on(ng.port, lw, &format!("/sub?channel={ch}"), &h).await;
            p.wait_listeners(ch, 1).await;
            let body = format!("{what} round {round}: {pw} -> {lw}");
            let r = p.publish(ch, body.clone()).await;
            assert_status(&r, 201, &format!("{what}: publish with a listener waiting"));
            let (_, r) = promptly(l, &format!("{what}: {pw} -> {lw}")).await;
            etag = Some(expect_body(&r, &body, Some(lw), what).etag);
            p.wait_listeners(ch, 0).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. a reload while a publish body is still arriving

/// SIGHUP without waiting for the old workers (one of them still serves a request): returns
/// (old workers, new workers) once the new generation runs.
async fn reload_begin(ng: &Nginx) -> (Vec<u32>, Vec<u32>) {
    let old = ng.all_workers();
    // SAFETY: kill(2) on the master this test started.
    assert_eq!(unsafe { libc::kill(ng.master_pid() as libc::pid_t, libc::SIGHUP) }, 0);
    let deadline = Instant::now() + NGINX_WAIT;
    loop {
        let now = ng.worker_pids();
        if now.len() == 2 && now.iter().all(|p| !old.contains(p)) {
            return (old, now);
        }
        assert!(Instant::now() < deadline, "no new workers after SIGHUP: {now:?} (old {old:?})");
        sleep_ms(10).await;
    }
}

/// Waits until every worker in `old` has exited.
async fn wait_gone(ng: &Nginx, old: &[u32]) {
    let deadline = Instant::now() + NGINX_WAIT;
    loop {
        let now = ng.all_workers();
        if old.iter().all(|p| !now.contains(p)) {
            return;
        }
        assert!(Instant::now() < deadline, "old workers {old:?} still there: {now:?}");
        sleep_ms(10).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_while_publish_body_in_flight_new_workers_still_woken() {
    let ng = Nginx::start(Conf::new(&pubsub("", "martd_listener_timeout 30s;")));
    let port = ng.port;
    let mut etag: Option<String> = None;
    for round in 0..3 {
        let ch = format!("rl{round}");
        let body = format!("published by the old generation, round {round}: {}", "x".repeat(200));
        // The publish request reaches the martd_push handler of a worker of this generation,
        // which waits for the body (100 Continue proves it is reading it).
        let mut publisher = Wire::open(port).await;
        publisher
            .write(
                format!(
                    "POST /pub?channel={ch} HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n\
                     Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            )
            .await;
        let cont = publisher.response(QUICK).await;
        assert_eq!(cont.status, 100, "round {round}: 100 Continue before the body");
        let (first, rest) = body.as_bytes().split_at(body.len() / 2);
        publisher.write(first).await;

        let (old, new) = reload_begin(&ng).await;

        // Listeners on both new workers (two each), waiting for the message still in flight.
        let h: Vec<(&str, &str)> =
            etag.as_deref().map(|e| vec![("if-none-match", e)]).unwrap_or_default();
        let mut ls = Vec::new();
        for &w in &new {
            for _ in 0..2 {
                ls.push((w, listen_on(port, w, &format!("/sub?channel={ch}"), &h).await));
            }
        }
        let mut p = Conn::open_on(port, new[0]).await;
        p.wait_listeners(&ch, 4).await;

        // The old worker finishes the publish.
        publisher.write(rest).await;
        let r = publisher.response(QUICK).await;
        assert_eq!(
            r.status,
            201,
            "round {round}: the old worker's publish: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        let info = parse_info_text(&String::from_utf8_lossy(&r.body));
        assert_eq!(info.listeners, 4, "round {round}: listeners counted by the old worker");
        for (w, l) in ls {
            let (_, r) = promptly(l, &format!("round {round}: old worker -> new worker {w}")).await;
            let m = expect_body(&r, &body, Some(w), "message published by the old generation");
            etag = Some(m.etag);
        }
        drop(publisher);
        wait_gone(&ng, &old).await;

        // Later publishes by the new workers reach listeners on both new workers promptly.
        for (i, &pw) in new.iter().enumerate() {
            let h: Vec<(&str, &str)> =
                etag.as_deref().map(|e| vec![("if-none-match", e)]).unwrap_or_default();
            let mut ls = Vec::new();
            for &w in &new {
                ls.push((w, listen_on(port, w, &format!("/sub?channel={ch}"), &h).await));
            }
            let mut pc = Conn::open_on(port, pw).await;
            pc.wait_listeners(&ch, 2).await;
            let body = format!("round {round}: new worker {pw} publishes ({i})");
            assert_status(&pc.publish(&ch, body.clone()).await, 201, "publish by a new worker");
            for (w, l) in ls {
                let (_, r) = promptly(l, &format!("round {round}: {pw} -> {w} after")).await;
                etag = Some(expect_body(&r, &body, Some(w), "publish by a new worker").etag);
            }
            pc.wait_listeners(&ch, 0).await;
        }
    }
    ng.finish();
}

// ---------------------------------------------------------------------------------------------
// 2. a cache zone: cache manager and cache loader processes

const CACHE_HTTP: &str =
    "proxy_cache_path tmp/cache keys_zone=c:1m loader_sleep=50ms loader_files=1 loader_threshold=10ms;";

/// Waits until the master runs a cache manager and a cache loader (and they had a moment to
/// initialise).
async fn wait_cache_processes(ng: &Nginx) {
    let deadline = Instant::now() + NGINX_WAIT;
    loop {
        let kids = children_of(ng.master_pid());
        let has = |t: &str| kids.iter().any(|(_, title)| title.contains(t));
        if has("cache manager process") && has("cache loader process") {
            break;
        }
        assert!(Instant::now() < deadline, "no cache manager/loader: {kids:?}");
        sleep_ms(10).await;
    }
    // They register (or must not) in their init_process, right after they start.
    sleep_ms(200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_cache_path_leaves_no_worker_deaf() {
    let mut ng =
        Nginx::start(Conf::new(&pubsub("", "martd_listener_timeout 30s;")).http(CACHE_HTTP));
    wait_cache_processes(&ng).await;
    deliver_both_ways(&ng, "cache", 3, "with a cache zone").await;
    // Again a while later (the cache manager has run its rounds).
    sleep_ms(2000).await;
    deliver_both_ways(&ng, "cache-later", 2, "with a cache zone, 2 s later").await;
    // And after a reload (a new cache manager and loader start).
    ng.reload();
    wait_cache_processes(&ng).await;
    deliver_both_ways(&ng, "cache-reload", 2, "with a cache zone, after a reload").await;
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_cache_path_worker_killed_and_respawned() {
    let mut ng =
        Nginx::start(Conf::new(&pubsub("", "martd_listener_timeout 30s;")).http(CACHE_HTTP));
    ng.allow_log("exited on signal 9");
    ng.allow_log("was locked by");
    wait_cache_processes(&ng).await;
    deliver_both_ways(&ng, "ck", 1, "with a cache zone").await;
    for victim_index in [0, 1] {
        let w = ng.worker_pids();
        let victim = w[victim_index];
        // A listener on the survivor waits across the kill.
        let survivor = w[1 - victim_index];
        let l =
            listen_on(ng.port, survivor, "/sub?channel=ck-across", &[("if-none-match", FUTURE)])
                .await;
        ng.kill_worker(victim, libc::SIGKILL);
        let now = ng.wait_respawn(victim);
        let mut p = Conn::open_on(ng.port, *now.iter().find(|p| **p != survivor).unwrap()).await;
        p.wait_listeners("ck-across", 1).await;
        let body = format!("from the respawned worker {victim_index}");
        assert_status(&p.publish("ck-across", body.clone()).await, 201, "publish");
        let (_, r) = promptly(l, "respawned -> survivor").await;
        expect_body(&r, &body, Some(survivor), "respawned -> survivor");
        deliver_both_ways(&ng, &format!("ck{victim_index}"), 2, "after a worker was respawned")
            .await;
    }
    ng.finish();
}

// ---------------------------------------------------------------------------------------------
// 3. listeners reached through X-Accel-Redirect, error_page, try_files, named locations

/// The backend of the X-Accel-Redirect locations: `/backend<suffix>?args` answers
/// `X-Accel-Redirect: /internal-listen<suffix>?args`.
async fn accel_backend() -> Backend {
    Backend::start(Duration::ZERO, |target| {
        let (path, args) = target.split_once('?').unwrap_or((target, ""));
        let suffix = path.strip_prefix("/backend").unwrap_or("-unknown");
        accel_redirect(&format!("/internal-listen{suffix}?{args}"))
    })
    .await
}

/// Every way of reaching a listen location from another one: `<entry>` waits 30 s,
/// `<entry>-short` 1 s, `<entry>-last` has `martd_listener_concurrency last`. The public
/// locations have a `limit_req` that lets each client request (by its `m` argument) run them
/// once. `/ep` and `/nl` answer 404 from the static module (no such file), after the
/// access phases.
fn redirect_conf(backend_port: u16) -> Conf {
    let once = "limit_req zone=once; limit_req_status 429;";
    let mut s = String::new();
    s += "        location = /pub { martd_push; }\n";
    s += "        location = /sub { martd_listen; }\n";
    for (suffix, extra) in [
        ("", "martd_listener_timeout 30s;"),
        ("-short", "martd_listener_timeout 1s;"),
        ("-last", "martd_listener_timeout 30s; martd_listener_concurrency last;"),
    ] {
        s += &format!(
            "        location = /auth{suffix} {{ {once} proxy_pass http://127.0.0.1:{backend_port}/backend{suffix}; }}
        location = /internal-listen{suffix} {{ internal; martd_listen; martd_channel_id $arg_channel; {extra} }}
        location @listen{suffix} {{ martd_listen; martd_channel_id $arg_channel; {extra} }}
        location = /ep{suffix} {{ {once} log_not_found off; error_page 404 = /internal-listen{suffix}?channel=$arg_channel; }}
        location = /tf{suffix} {{ {once} try_files /no-such-file /internal-listen{suffix}?channel=$arg_channel; }}
        location = /nl{suffix} {{ {once} log_not_found off; error_page 404 = @listen{suffix}; }}
        location = /tfn{suffix} {{ {once} try_files /no-such-file @listen{suffix}; }}
"
        );
    }
    // Each client request carries a unique `m`: the public location lets it through once a
    // minute, so a request that runs it a second time (a replay) gets 429.
    Conf::new(&s).http("limit_req_zone $arg_m zone=once:1m rate=1r/m;")
}

/// A fresh value for the `m` argument of each client request.
fn unique() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Through `entry`: delivery across workers (both directions), 304 at the listener timeout,
/// the keep-alive connection reused for the next listen, `concurrency last` displacing once.
/// With `backend`, it is asked exactly once per listen.
async fn check_redirected_listen(ng: &Nginx, entry: &str, backend: Option<&Backend>) {
    let port = ng.port;
    let w = ng.worker_pids();
    let once = |ch: &str, n: usize, what: &str| {
        if let Some(b) = backend {
            assert_eq!(
                b.count(&format!("channel={ch}&")),
                n,
                "{entry}: {what}: backend asked {:?}",
                b.requests()
            );
        }
    };
    // `m` (after the channel, so that `channel=x&` does not match `channel=x2&`) is unique.
    let path = |suffix: &str, ch: &str| format!("{entry}{suffix}?channel={ch}&m={}", unique());

    // Delivery across workers, both directions.
    for (i, (lw, pw)) in [(w[0], w[1]), (w[1], w[0])].into_iter().enumerate() {
        let ch = format!("d{i}");
        let l = listen_on(port, lw, &path("", &ch), &[]).await;
        let mut p = Conn::open_on(port, pw).await;
        p.wait_listeners(&ch, 1).await;
        let body = format!("{entry}: {pw} -> {lw}");
        assert_status(&p.publish(&ch, body.clone()).await, 201, &format!("{entry}: publish"));
        let (c, r) = promptly(l, &format!("{entry}: listener")).await;
        let m = expect_body(&r, &body, Some(lw), entry);
        p.wait_listeners(&ch, 0).await;
        once(&ch, 1, "one listen answered by a message");
        // The connection serves the next long-poll (304 after 1 s).
        let started = Instant::now();
        let r = within(
            Duration::from_secs(1) + PROMPT,
            &format!("{entry}: 304 at the listener timeout on a reused connection"),
            c.spawn_get(&path("-short", &ch), &[("if-none-match", &m.etag)], LONG).resp(),
        )
        .await;
        assert_status(&r, 304, &format!("{entry}: listener timeout on a reused connection"));
        assert!(started.elapsed() >= Duration::from_millis(900), "{entry}: 304 too early");
        once(&ch, 2, "a second listen on the same connection");
    }

    // 304 at the timeout, then the same connection waits again and gets a message.
    let ch = "t0";
    let c = Conn::open_on(port, w[0]).await;
    let started = Instant::now();
    let (c, r) = within(
        Duration::from_secs(1) + PROMPT,
        &format!("{entry}: 304 at the listener timeout"),
        c.spawn_get(&path("-short", ch), &[("if-none-match", FUTURE)], LONG).conn_resp(),
    )
    .await;
    assert_status(&r, 304, &format!("{entry}: listener timeout"));
    assert!(started.elapsed() >= Duration::from_millis(900), "{entry}: 304 too early");
    assert_eq!(r.header("etag"), Some(FUTURE), "{entry}: 304 echoes the id");
    sleep_ms(300).await;
    once(ch, 1, "one listen answered 304");
    let mut p = Conn::open_on(port, w[1]).await;
    p.wait_listeners(ch, 0).await;
    let l = c.spawn_get(&path("", ch), &[("if-none-match", FUTURE)], LONG);
    p.wait_listeners(ch, 1).await;
    assert_status(&p.publish(ch, "after a 304").await, 201, &format!("{entry}: publish"));
    let (_, r) = promptly(l, &format!("{entry}: listener after a 304")).await;
    expect_body(&r, "after a 304", Some(w[0]), entry);
    once(ch, 2, "a listen after the 304");

    // concurrency last: a newer listener displaces the older one once; the newer one waits.
    let ch = "last";
    let older = listen_on(port, w[0], &path("-last", ch), &[]).await;
    p.wait_listeners(ch, 1).await;
    let newer = listen_on(port, w[1], &path("-last", ch), &[]).await;
    let (_, r) = promptly(older, &format!("{entry}: displaced listener")).await;
    assert_status(&r, 409, &format!("{entry}: older listener displaced by a newer one"));
    p.wait_listeners(ch, 1).await;
    // No ping-pong: nothing asks again, the newer one keeps waiting.
    sleep_ms(1000).await;
    assert!(!newer.is_finished(), "{entry}: the newer listener was answered: displaced back?");
    once(ch, 2, "two listens with concurrency last");
    let i = p.wait_listeners(ch, 1).await;
    assert_eq!(i.listeners, 1);
    assert_status(&p.publish(ch, "to the newest").await, 201, &format!("{entry}: publish"));
    let (_, r) = promptly(newer, &format!("{entry}: newer listener")).await;
    expect_body(&r, "to the newest", Some(w[1]), entry);
    once(ch, 2, "two listens with concurrency last, after the message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_accel_redirect_listener() {
    let backend = accel_backend().await;
    let ng = Nginx::start(redirect_conf(backend.port));
    check_redirected_listen(&ng, "/auth", Some(&backend)).await;
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_page_redirect_listener() {
    let backend = accel_backend().await;
    let ng = Nginx::start(redirect_conf(backend.port));
    check_redirected_listen(&ng, "/ep", None).await;
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_files_fallback_listener() {
    let backend = accel_backend().await;
    let ng = Nginx::start(redirect_conf(backend.port));
    check_redirected_listen(&ng, "/tf", None).await;
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_location_listener_via_error_page() {
    let backend = accel_backend().await;
    let ng = Nginx::start(redirect_conf(backend.port));
    check_redirected_listen(&ng, "/nl", None).await;
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_location_listener_via_try_files() {
    let backend = accel_backend().await;
    let ng = Nginx::start(redirect_conf(backend.port));
    check_redirected_listen(&ng, "/tfn", None).await;
    ng.finish();
}

// ---------------------------------------------------------------------------------------------
// 4. subrequests and limits on listen locations

/// Waits until the zone counts every one of `ls` as waiting on `ch`; a listener answered (or
/// whose connection closed) before that fails the test with what it got.
async fn all_waiting(
    p: &mut Conn,
    ch: &str,
    mut ls: Vec<(u32, &'static str, Pending)>,
) -> Vec<(u32, &'static str, Pending)> {
    let deadline = Instant::now() + QUICK;
    loop {
        if let Some(i) = ls.iter().position(|(_, _, l)| l.is_finished()) {
            let (lw, path, l) = ls.swap_remove(i);
            // Panics with the error if the connection closed without an answer.
            let r = l.resp().await;
            panic!("{path} on {lw} answered before any message: {} {:?}", r.status, r.text());
        }
        let n = p.info(ch).await.map_or(0, |i| i.listeners);
        if n == ls.len() as u64 {
            return ls;
        }
        assert!(Instant::now() < deadline, "{ch}: {n} of {} listeners waiting", ls.len());
        sleep_ms(20).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_on_listen_location() {
    // The mirror upstream answers after 2 s, so the subrequest runs while listeners wait, are
    // answered and time out.
    let slow = Backend::slow(Duration::from_secs(2)).await;
    let ng = Nginx::start(Conf::new(&format!(
        "        location = /pub {{ martd_push; }}
        location = /sub {{ mirror /mirror; martd_listen; martd_listener_timeout 30s; }}
        location = /sub-short {{ mirror /mirror; martd_listen; martd_listener_timeout 1s; }}
        location = /sub2 {{ martd_listen; martd_listener_timeout 30s; }}
        location = /sub2-short {{ martd_listen; martd_listener_timeout 1s; }}
        location = /mirror {{ internal; proxy_pass http://127.0.0.1:{}; }}
",
        slow.port
    )));
    let port = ng.port;
    let w = ng.worker_pids();
    let mut p = Conn::open_on(port, w[0]).await;
    let mut mirrored = 0;
    for round in 0..2 {
        let ch = format!("m{round}");
        // On each worker: two listeners with a mirror, two plain detached ones.
        let mut ls = Vec::new();
        for &lw in &w {
            for path in ["/sub", "/sub", "/sub2", "/sub2"] {
                let l = listen_on(port, lw, &format!("{path}?channel={ch}"), &[]).await;
                ls.push((lw, path, l));
            }
        }
        mirrored += 4;
        let mut ls = all_waiting(&mut p, &ch, ls).await;
        slow.wait_count("/mirror", mirrored).await;
        let body = format!("mirror round {round}");
        let r = p.publish(&ch, body.clone()).await;
        assert_status(&r, 201, "publish");
        assert_eq!(parse_info_text(&r.text()).listeners, 8, "listeners counted at publish");
        for (lw, path, l) in ls.drain(..) {
            let (_, r) = promptly(l, &format!("{path} on {lw}")).await;
            expect_body(&r, &body, Some(lw), &format!("{path} listener"));
        }
        p.wait_listeners(&ch, 0).await;

        // Timeouts: 304 for every one, while mirror subrequests still run.
        let ch = format!("mt{round}");
        let mut ls = Vec::new();
        for &lw in &w {
            for path in ["/sub-short", "/sub-short", "/sub2-short"] {
                let l = listen_on(port, lw, &format!("{path}?channel={ch}"), &[]).await;
                ls.push((lw, path, l));
            }
        }
        mirrored += 4;
        for (lw, path, l) in ls {
            let r = within(Duration::from_secs(1) + PROMPT, &format!("{path} 304"), l.resp()).await;
            assert_status(&r, 304, &format!("{path} on {lw}: listener timeout"));
        }
        p.wait_listeners(&ch, 0).await;
    }
    // One mirror request per client request (none for replays).
    slow.wait_count("/mirror", mirrored).await;
    within(Duration::from_secs(5), "mirror subrequests answered", async {
        while slow.answered() < mirrored {
            sleep_ms(20).await;
        }
    })
    .await;
    sleep_ms(300).await;
    assert_eq!(slow.count("/mirror"), mirrored, "mirror requests: {:?}", slow.requests());
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_upstream_that_never_answers() {
    // The mirror upstream holds the request and then closes without an answer.
    let mute = Backend::start(Duration::from_secs(3), |_| String::new()).await;
    let mut ng = Nginx::start(Conf::new(&format!(
        "        location = /pub {{ martd_push; }}
        location = /sub {{ mirror /mirror; martd_listen; martd_listener_timeout 30s; }}
        location = /sub-short {{ mirror /mirror; martd_listen; martd_listener_timeout 1s; }}
        location = /sub2 {{ martd_listen; }}
        location = /mirror {{ internal; proxy_pass http://127.0.0.1:{}; }}
",
        mute.port
    )));
    ng.allow_log_if(|l| l.contains("upstream prematurely closed connection"));
    let port = ng.port;
    let w = ng.worker_pids();
    let mut p = Conn::open_on(port, w[1]).await;
    let mut long = Vec::new();
    for &lw in &w {
        for path in ["/sub", "/sub2"] {
            long.push((lw, path, listen_on(port, lw, &format!("{path}?channel=mute"), &[]).await));
        }
    }
    let long = all_waiting(&mut p, "mute", long).await;
    // Short ones (1 s) time out meanwhile, the others then get the message.
    let mut short = Vec::new();
    for &lw in &w {
        short.push((lw, listen_on(port, lw, "/sub-short?channel=mute", &[]).await));
    }
    for (lw, l) in short {
        let r = within(Duration::from_secs(1) + PROMPT, "304", l.resp()).await;
        assert_status(&r, 304, &format!("/sub-short on {lw}"));
    }
    p.wait_listeners("mute", 4).await;
    assert_status(&p.publish("mute", "unmirrored").await, 201, "publish");
    for (lw, path, l) in long {
        let (_, r) = promptly(l, &format!("{path} on {lw}")).await;
        expect_body(&r, "unmirrored", Some(lw), path);
    }
    within(Duration::from_secs(6), "mirror upstream closes", async {
        while mute.answered() < 4 {
            sleep_ms(20).await;
        }
    })
    .await;
    ng.finish();
}

/// Whether the nginx under test has a module configured with `--with-<name>`.
fn nginx_has(name: &str) -> bool {
    let out = std::process::Command::new(nginx_binary()).arg("-V").output().expect("nginx -V");
    String::from_utf8_lossy(&out.stderr).contains(&format!("--with-{name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_request_on_listen_location() {
    if !nginx_has("http_auth_request_module") {
        eprintln!("SKIPPED: this nginx has no auth_request module");
        return;
    }
    let ng = Nginx::start(Conf::new(
        "        location = /pub { martd_push; }
        location = /sub { auth_request /auth; martd_listen; martd_listener_timeout 30s; }
        location = /sub-short { auth_request /auth; martd_listen; martd_listener_timeout 1s; }
        location = /auth { internal; return 204; }
",
    ));
    check_plain_listen_location(&ng, "/sub", "auth_request").await;
    ng.finish();
}

/// Listeners on `path` (and `path-short`, 1 s) on both workers: a message reaches them all,
/// the short ones end with 304.
async fn check_plain_listen_location(ng: &Nginx, path: &str, what: &str) {
    let port = ng.port;
    let w = ng.worker_pids();
    let mut p = Conn::open_on(port, w[0]).await;
    let ch = format!("pl{}", path.replace('/', "_"));
    let mut ls = Vec::new();
    for &lw in &w {
        for _ in 0..3 {
            ls.push((lw, listen_on(port, lw, &format!("{path}?channel={ch}"), &[]).await));
        }
    }
    p.wait_listeners(&ch, 6).await;
    let body = format!("{what} message");
    assert_status(&p.publish(&ch, body.clone()).await, 201, what);
    let mut shorts = Vec::new();
    for (lw, l) in ls {
        let (c, r) = promptly(l, &format!("{what}: listener on {lw}")).await;
        let m = expect_body(&r, &body, Some(lw), what);
        // The same connection then times out on the short location (all at once).
        let path = format!("{path}-short?channel={ch}");
        shorts.push((lw, c.spawn_get(&path, &[("if-none-match", &m.etag)], LONG)));
    }
    for (lw, l) in shorts {
        let r = within(Duration::from_secs(1) + PROMPT, &format!("{what}: 304"), l.resp()).await;
        assert_status(&r, 304, &format!("{what}: listener timeout on {lw}"));
    }
    p.wait_listeners(&ch, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_req_and_limit_conn_on_listen_location() {
    // limit_req without nodelay: later listeners are delayed by the limiter before they wait.
    let ng = Nginx::start(
        Conf::new(
            "        location = /pub { martd_push; }
        location = /sub-lr { martd_listen; limit_req zone=lr burst=50; martd_listener_timeout 30s; }
        location = /sub-lr-short { martd_listen; limit_req zone=lr burst=50; martd_listener_timeout 1s; }
        location = /sub-lc { martd_listen; limit_conn lc 50; martd_listener_timeout 30s; }
        location = /sub-lc-short { martd_listen; limit_conn lc 50; martd_listener_timeout 1s; }
",
        )
        .http(
            "limit_req_zone $binary_remote_addr zone=lr:1m rate=20r/s;
    limit_conn_zone $binary_remote_addr zone=lc:1m;",
        ),
    );
    check_plain_listen_location(&ng, "/sub-lr", "limit_req").await;
    check_plain_listen_location(&ng, "/sub-lc", "limit_conn").await;
    ng.finish();
}

// ---------------------------------------------------------------------------------------------
// 5. the access log of a listener whose client went away

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_client_gone_logs_499() {
    let ng = Nginx::start(
        Conf::new(
            "        location = /pub { martd_push; }
        location = /sub { martd_listen; access_log logs/detached.log gone; }
        location = /sub-parked { martd_listen; martd_detach_listeners off; access_log logs/parked.log gone; }
",
        )
        .http("log_format gone '$status $request_method $args $request_time $body_bytes_sent';"),
    );
    let port = ng.port;
    let mut p = Conn::open_probed(port).await;
    let mut lines = Vec::new();
    for (path, log) in [("/sub", "logs/detached.log"), ("/sub-parked", "logs/parked.log")] {
        let log = ng.prefix().join(log);
        // The client goes away after waiting 600 ms.
        let ch = format!("gone{}", path.len());
        let mut w = RawConn::open(port).await;
        w.write(format!("GET {path}?channel={ch} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes()).await;
        p.wait_listeners(&ch, 1).await;
        sleep_ms(600).await;
        drop(w);
        p.wait_listeners(&ch, 0).await;
        let line =
            one_log_line(&log, &format!("channel={ch}"), &format!("{path}: client gone")).await;
        // A client answered after 600 ms: logged once, with the whole wait.
        let ch2 = format!("answered{}", path.len());
        let l =
            Conn::open_probed(port).await.spawn_get(&format!("{path}?channel={ch2}"), &[], LONG);
        p.wait_listeners(&ch2, 1).await;
        sleep_ms(600).await;
        p.publish(&ch2, "logged").await;
        let (_, r) = promptly(l, path).await;
        expect_body(&r, "logged", None, path);
        let answered =
            one_log_line(&log, &format!("channel={ch2}"), &format!("{path}: answered")).await;
        lines.push((path, line, answered));
    }
    for (path, gone, answered) in &lines {
        let f: Vec<&str> = gone.split(' ').collect();
        assert_eq!(f.len(), 5, "{path}: {gone:?}");
        assert_eq!(f[0], "499", "{path}: a listener whose client closed is logged 499: {gone:?}");
        assert_eq!(f[1], "GET", "{path}: {gone:?}");
        assert_eq!(f[4], "0", "{path}: nothing sent: {gone:?}");
        let t: f64 = f[3].parse().unwrap();
        assert!(t >= 0.5, "{path}: $request_time of a 499 covers the wait: {gone:?}");
        let a: Vec<&str> = answered.split(' ').collect();
        assert_eq!(a[0], "200", "{path}: {answered:?}");
        let t: f64 = a[3].parse().unwrap();
        assert!(
            t >= 0.5,
            "{path}: $request_time of an answered listener covers the wait: {answered:?}"
        );
    }
    // Same shape either way (channel names differ only by the location's length).
    let shape = |l: &str| {
        let f: Vec<&str> = l.split(' ').collect();
        (f[0].to_string(), f[1].to_string(), f[4].to_string())
    };
    assert_eq!(shape(&lines[0].1), shape(&lines[1].1), "499 lines: {lines:?}");
    ng.finish();
}

// ---------------------------------------------------------------------------------------------
// 6. realip and allow/deny in the listen location

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realip_kept_on_replay() {
    let rip = "set_real_ip_from 127.0.0.1; real_ip_header X-Forwarded-For; \
               deny 10.9.9.9; deny 127.0.0.1; allow all;";
    let ng = Nginx::start(
        Conf::new(&format!(
            "        location = /pub {{ martd_push; }}
        location = /sub {{ martd_listen; {rip} access_log logs/rip.log rip; }}
        location = /sub-short {{ martd_listen; martd_listener_timeout 1s; {rip} access_log logs/rip.log rip; }}
        location = /sub-parked {{ martd_listen; martd_detach_listeners off; {rip} access_log logs/rip.log rip; }}
        location = /sub-parked-short {{ martd_listen; martd_detach_listeners off; martd_listener_timeout 1s; {rip} access_log logs/rip.log rip; }}
"
        ))
        .http("log_format rip '$remote_addr $status $uri $args';"),
    );
    let port = ng.port;
    let log = ng.prefix().join("logs/rip.log");
    let w = ng.worker_pids();
    let mut p = Conn::open_on(port, w[1]).await;
    for path in ["/sub", "/sub-parked"] {
        // Allowed by its forwarded address, answered by a message from the other worker.
        let ch = format!("rip{}", path.len());
        let l = listen_on(
            port,
            w[0],
            &format!("{path}?channel={ch}"),
            &[("x-forwarded-for", "10.1.2.3")],
        )
        .await;
        p.wait_listeners(&ch, 1).await;
        assert_status(&p.publish(&ch, "to 10.1.2.3").await, 201, path);
        let (_, r) = promptly(l, path).await;
        expect_body(&r, "to 10.1.2.3", Some(w[0]), &format!("{path}: allowed forwarded address"));
        let line = one_log_line(&log, &format!("{path} channel={ch}"), path).await;
        assert_eq!(
            line,
            format!("10.1.2.3 200 {path} channel={ch}"),
            "{path}: the answer is logged with the address realip computed"
        );

        // The same at the listener timeout.
        let ch = format!("ript{}", path.len());
        let r = within(
            Duration::from_secs(1) + PROMPT,
            "304",
            listen_on(
                port,
                w[0],
                &format!("{path}-short?channel={ch}"),
                &[("x-forwarded-for", "10.4.4.4")],
            )
            .await
            .resp(),
        )
        .await;
        assert_status(&r, 304, &format!("{path}-short: listener timeout"));
        let line = one_log_line(&log, &format!("channel={ch}"), path).await;
        assert_eq!(line, format!("10.4.4.4 304 {path}-short channel={ch}"), "{path}-short");

        // deny on the computed address; and the connection's own address is denied too.
        let mut c = Conn::open_on(port, w[0]).await;
        let r = c.get(&format!("{path}?channel={ch}"), &[("x-forwarded-for", "10.9.9.9")]).await;
        assert_status(&r, 403, &format!("{path}: denied forwarded address"));
        let r = c.get(&format!("{path}?channel={ch}"), &[]).await;
        assert_status(&r, 403, &format!("{path}: denied connection address"));
    }
    ng.finish();
}

// ---------------------------------------------------------------------------------------------
// 7. TLS and HTTP/2 listeners

/// An HTTP/1.1 TLS connection served by worker `pid`.
async fn tls_on(port: u16, tls: &tokio_rustls::TlsConnector, pid: u32) -> Conn {
    for _ in 0..400 {
        let mut c = Conn::try_open_tls(port, tls).await.expect("TLS connection");
        let r = c.get("/__worker", &[]).await;
        if r.worker() == pid {
            c.worker = Some(pid);
            return c;
        }
    }
    panic!("no TLS connection landed on worker {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_http2_listeners_in_realistic_server() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_cert(dir.path());
    let tls_port = free_port();
    let ng = Nginx::start(Conf::new(&pubsub("", "")).http(&format!(
        "ssl_session_cache shared:SSL:1m;
    server {{
        listen 127.0.0.1:{tls_port} ssl reuseport;
        http2 on;
        server_name localhost;
        ssl_certificate {};
        ssl_certificate_key {};
        ssl_protocols TLSv1.2 TLSv1.3;
        keepalive_timeout 75s;
        add_header X-Worker $pid always;
        location = /__worker {{ return 204; }}
        location = /sub {{ martd_listen; martd_listener_timeout 30s; }}
        location = /sub-short {{ martd_listen; martd_listener_timeout 1s; }}
        location / {{ return 404; }}
    }}",
        cert.display(),
        key.display()
    )));
    let w = ng.worker_pids();
    let h2 = connector_h2(&ca);
    let h1 = connector(&ca);
    let mut p = Conn::open_on(ng.port, w[0]).await;
    let mut h2s = Vec::new();
    for &lw in &w {
        h2s.push(H2Conn::open_on(tls_port, &h2, "/__worker", lw).await);
    }
    let mut etag: Option<String> = None;
    for round in 0..2 {
        let ch = "tls";
        let h: Vec<(&str, &str)> =
            etag.as_deref().map(|e| vec![("if-none-match", e)]).unwrap_or_default();
        // Three streams per HTTP/2 connection, an HTTP/1.1 TLS listener per worker.
        let mut streams = Vec::new();
        for c in &h2s {
            for _ in 0..3 {
                streams.push((c.worker(), c.spawn_get(&format!("/sub?channel={ch}"), &h, LONG)));
            }
        }
        let mut ones = Vec::new();
        for &lw in &w {
            ones.push((
                lw,
                tls_on(tls_port, &h1, lw).await.spawn_get(&format!("/sub?channel={ch}"), &h, LONG),
            ));
        }
        p.wait_listeners(ch, 8).await;
        let body = format!("over TLS, round {round}");
        let mut pc = Conn::open_on(ng.port, w[round % 2]).await;
        let r = pc.publish(ch, body.clone()).await;
        assert_status(&r, 201, "publish");
        for (lw, s) in streams {
            let r = within(PROMPT, "h2 listener", s).await.unwrap().expect("h2 listener");
            etag = Some(expect_body(&r, &body, Some(lw), "HTTP/2 listener").etag);
        }
        for (lw, l) in ones {
            let (_, r) = promptly(l, "HTTP/1.1 TLS listener").await;
            expect_body(&r, &body, Some(lw), "HTTP/1.1 TLS listener");
        }
        p.wait_listeners(ch, 0).await;
    }

    // 304 at the timeout over HTTP/2 and HTTP/1.1 TLS.
    let s = h2s[0].spawn_get("/sub-short?channel=tls-t", &[("if-none-match", FUTURE)], LONG);
    let l = tls_on(tls_port, &h1, w[1]).await.spawn_get(
        "/sub-short?channel=tls-t",
        &[("if-none-match", FUTURE)],
        LONG,
    );
    let r = within(Duration::from_secs(1) + PROMPT, "h2 304", s).await.unwrap().expect("h2 304");
    assert_status(&r, 304, "HTTP/2 listener timeout");
    assert_eq!(r.header("etag"), Some(FUTURE));
    let r = within(Duration::from_secs(1) + PROMPT, "TLS 304", l.resp()).await;
    assert_status(&r, 304, "HTTP/1.1 TLS listener timeout");

    // A stream reset while waiting leaves; the connection keeps serving.
    let s = h2s[1].spawn_get("/sub?channel=tls-rst", &[], LONG);
    p.wait_listeners("tls-rst", 1).await;
    s.abort();
    p.wait_listeners("tls-rst", 0).await;
    let s = h2s[1].spawn_get("/sub?channel=tls-rst", &[], LONG);
    p.wait_listeners("tls-rst", 1).await;
    assert_status(&p.publish("tls-rst", "after a reset").await, 201, "publish");
    let r = within(PROMPT, "h2 after reset", s).await.unwrap().expect("h2 after reset");
    expect_body(&r, "after a reset", Some(w[1]), "HTTP/2 after a stream reset");

    // A whole HTTP/2 connection closed with listeners waiting.
    let streams: Vec<_> =
        (0..3).map(|_| h2s[0].spawn_get("/sub?channel=tls-close", &[], LONG)).collect();
    p.wait_listeners("tls-close", 3).await;
    h2s[0].shutdown();
    p.wait_listeners("tls-close", 0).await;
    for s in streams {
        let r = within(QUICK, "stream of a closed connection", s).await.unwrap();
        assert!(r.is_err(), "a stream of a closed connection got an answer: {r:?}");
    }
    // The other connection still delivers.
    let s = h2s[1].spawn_get("/sub?channel=tls-close", &[], LONG);
    p.wait_listeners("tls-close", 1).await;
    assert_status(&p.publish("tls-close", "still here").await, 201, "publish");
    let r = within(PROMPT, "h2 after a close", s).await.unwrap().expect("h2 after a close");
    expect_body(&r, "still here", Some(w[1]), "HTTP/2 on the other connection");
    ng.finish();
}

// ---------------------------------------------------------------------------------------------
// 8. a detached listener's handle never answers a newer request on its connection

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_handle_cannot_answer_newer_request() {
    let ng = Nginx::start(Conf::new(
        "        location = /pub { martd_push; }
        location = /sub { martd_listen; martd_listener_timeout 30s; }
        location = /sub-short { martd_listen; martd_listener_timeout 1s; }
",
    ));
    let port = ng.port;
    let w = ng.worker_pids();
    let mut p = Conn::open_on(port, w[1]).await;

    // Sequential: 304, then at once a new listen on another channel on the same connection.
    let mut c = Wire::open(port).await;
    c.get("/sub-short?channel=sa", &format!("If-None-Match: {FUTURE}\r\n")).await;
    let r = c.response(Duration::from_secs(1) + PROMPT).await;
    assert_eq!(r.status, 304, "first listen times out");
    c.get("/sub?channel=sb", &format!("If-None-Match: {FUTURE}\r\n")).await;
    p.wait_listeners("sb", 1).await;
    p.wait_listeners("sa", 0).await;
    assert_published(&p.publish("sa", "stale").await, "publish to the old channel");
    assert_status(&p.publish("sb", "fresh").await, 201, "publish to the new channel");
    let r = c.response(PROMPT).await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"fresh"[..]), "the new listen's answer");
    c.quiet(Duration::from_millis(500), "after the answer").await;
    c.get("/__worker", "").await;
    assert_eq!(c.response(QUICK).await.status, 204, "the connection goes on");
    c.quiet(Duration::from_millis(300), "after the probe").await;

    // Pipelined: the second listen is already on the connection when the first times out.
    let mut c = Wire::open(port).await;
    c.write(
        format!(
            "GET /sub-short?channel=sc HTTP/1.1\r\nHost: t\r\nIf-None-Match: {FUTURE}\r\n\r\n\
             GET /sub?channel=sd HTTP/1.1\r\nHost: t\r\nIf-None-Match: {FUTURE}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let r = c.response(Duration::from_secs(1) + PROMPT).await;
    assert_eq!(r.status, 304, "pipelined: first listen times out");
    p.wait_listeners("sd", 1).await;
    assert_published(&p.publish("sc", "stale").await, "publish to the old channel");
    assert_status(&p.publish("sd", "fresh").await, 201, "publish to the new channel");
    let r = c.response(PROMPT).await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"fresh"[..]), "pipelined: second answer");
    c.quiet(Duration::from_millis(500), "pipelined: after the answer").await;

    // Racing: on 12 connections at once, 3 rounds, one publish to the old channel lands
    // within ±25 ms of its 1 s timeout (from either worker); whatever ends the first listen,
    // the second one gets exactly its own message.
    let mut wires = Vec::new();
    for i in 0..12u64 {
        wires.push((i, Wire::open(port).await, Conn::open_probed(port).await));
    }
    let mut outcomes = std::collections::BTreeMap::new();
    for round in 0..3u64 {
        let mut tasks = Vec::new();
        for (i, mut c, mut q) in wires.drain(..) {
            tasks.push(tokio::spawn(async move {
                let ch = format!("ra{i}");
                c.get(&format!("/sub-short?channel={ch}"), &format!("If-None-Match: {FUTURE}\r\n"))
                    .await;
                let sent = Instant::now();
                // -25 ms .. +25 ms around the timeout, spread over connections and rounds.
                let offset = ((i * 5 + round * 2) % 51) as i64 - 25;
                let at = Duration::from_millis((1000 + offset) as u64);
                tokio::time::sleep_until((sent + at).into()).await;
                let pr = q.publish(&ch, format!("old {round} {i}")).await;
                assert_published(&pr, "publish to the old channel");
                let r = c.response(Duration::from_secs(1) + PROMPT).await;
                assert!(
                    r.status == 304
                        || (r.status == 200 && r.body == format!("old {round} {i}").as_bytes()),
                    "racing {i}: first answer {} {:?}",
                    r.status,
                    String::from_utf8_lossy(&r.body)
                );
                c.get(&format!("/sub?channel=rb{i}"), &format!("If-None-Match: {FUTURE}\r\n"))
                    .await;
                (i, c, q, r.status)
            }));
        }
        for t in tasks {
            let (i, c, q, status) = within(QUICK, "racing listener", t).await.expect("racing task");
            *outcomes.entry(status).or_insert(0) += 1;
            wires.push((i, c, q));
        }
        for (i, _, _) in &wires {
            p.wait_listeners(&format!("rb{i}"), 1).await;
        }
        for (i, _, _) in &wires {
            let r = p.publish(&format!("rb{i}"), format!("new {round} {i}")).await;
            assert_status(&r, 201, "publish to the new channel");
        }
        for (i, c, _) in &mut wires {
            let r = c.response(PROMPT).await;
            assert_eq!(
                (r.status, String::from_utf8_lossy(&r.body).into_owned()),
                (200, format!("new {round} {i}")),
                "racing {i}, round {round}: the second listen's answer"
            );
        }
        sleep_ms(200).await;
        for (i, c, _) in &mut wires {
            c.quiet(Duration::from_millis(1), &format!("racing {i}, round {round}")).await;
        }
    }
    eprintln!("racing: first listens ended by status {outcomes:?}");
    ng.finish();
}
