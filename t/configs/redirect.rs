//! Listeners reached through `X-Accel-Redirect`, `error_page`, `try_files` and named locations.

use super::*;

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
