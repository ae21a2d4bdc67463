//! The JSON listen location inside a realistic server: a `proxy_cache_path` zone (cache manager
//! and loader processes), `limit_req` on the listen location, reached through `X-Accel-Redirect`
//! from a backend.

use super::*;
use harness::backend::*;

/// `/backend<suffix>?args` answers `X-Accel-Redirect: /internal-jsub<suffix>?args`.
async fn accel_backend() -> Backend {
    Backend::start(Duration::ZERO, |target| {
        let (path, args) = target.split_once('?').unwrap_or((target, ""));
        let suffix = path.strip_prefix("/backend").unwrap_or("-unknown");
        accel_redirect(&format!("/internal-jsub{suffix}?{args}"))
    })
    .await
}

/// Each client request carries a fresh `cid`; `limit_req` lets a `cid` through once a minute,
/// so a request whose access phases ran twice would get 429.
fn realistic_conf(backend_port: u16) -> Conf {
    let once = "limit_req zone=once; limit_req_status 429;";
    let mut s = String::new();
    for (suffix, extra) in
        [("", "martd_listener_timeout 30s;"), ("-short", "martd_listener_timeout 1s;")]
    {
        s += &format!(
            "        location = /auth{suffix} {{ proxy_pass http://127.0.0.1:{backend_port}/backend{suffix}; proxy_cache c; }}
        location = /internal-jsub{suffix} {{ internal; {once} martd_listen json; {extra} }}
"
        );
    }
    api_conf(&s).http(
        "    proxy_cache_path tmp/cache keys_zone=c:1m loader_sleep=50ms loader_files=1 loader_threshold=10ms;
    limit_req_zone $arg_cid zone=once:1m rate=1r/m;",
    )
}

/// `/auth<suffix>?cid=..&chans`, and the `cid=..&` the backend sees it by.
fn auth(suffix: &str, chans: &[(&str, &str)]) -> (String, String) {
    let path = jsub(&format!("/auth{suffix}"), chans);
    let cid = path.split_once("cid=").unwrap().1.split('&').next().unwrap().to_string();
    (path, format!("cid={cid}&"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_listen_behind_x_accel_redirect_with_cache_and_limit_req() {
    let backend = accel_backend().await;
    let ng = Nginx::start(realistic_conf(backend.port));
    let w = ng.worker_pids();
    wait_until("a cache manager process", NGINX_WAIT, || {
        children_of(ng.master_pid()).iter().any(|(_, t)| t.contains("cache manager process"))
    })
    .await;
    let mut p = Conn::open_on(ng.port, w[0]).await;
    let a1 = jpub(&mut p, "ra", "", "a1").await.etag.to_string();

    // Stored messages: answered at once.
    let (path, key) = auth("", &[("ra", "0"), ("rb", "0")]);
    let r = p.get(&path, &[]).await;
    expect_texts(&r, &[("ra", &["a1"])], "stored message through X-Accel-Redirect");
    assert_eq!(backend.count(&key), 1, "backend asked once: {:?}", backend.requests());

    // Waiting, woken from the other worker, both directions; the connection then serves a
    // 1 s listen that times out, then another that a message answers.
    let mut rb = "0".to_string();
    for (lw, pw) in [(w[0], w[1]), (w[1], w[0])] {
        let mut p = Conn::open_on(ng.port, pw).await;
        let (path, key) = auth("", &[("ra", &a1), ("rb", &rb)]);
        let l = listen_on(ng.port, lw, &path).await;
        p.wait_listeners("rb", 1).await;
        let body = format!("{pw} -> {lw}");
        let m = jpub(&mut p, "rb", "", body.clone()).await;
        assert_eq!(m.listeners, 1);
        let (c, r) = promptly(l, "redirected JSON listener").await;
        let chans = expect_texts(&r, &[("rb", &[body.as_str()])], "redirected JSON listener");
        assert_eq!(r.worker(), lw);
        rb = chans["rb"].etag.to_string();
        p.wait_listeners("rb", 0).await;
        assert_eq!(backend.count(&key), 1, "backend asked once per listen");

        let (path, key) = auth("-short", &[("ra", &a1), ("rb", &rb)]);
        let started = Instant::now();
        let (c, r) = within(
            PROMPT + Duration::from_secs(1),
            "1 s redirected listen",
            c.spawn_get(&path, &[], LONG).conn_resp(),
        )
        .await;
        expect_empty(&r, "redirected listener timeout");
        assert!(started.elapsed() >= Duration::from_millis(900), "after {:?}", started.elapsed());
        assert_eq!(backend.count(&key), 1);

        let (path, key) = auth("", &[("ra", &a1), ("rb", &rb)]);
        let l = c.spawn_get(&path, &[], LONG);
        p.wait_listeners("rb", 1).await;
        let m = jpub(&mut p, "ra", "", format!("again {lw}")).await;
        let (_, r) = promptly(l, "second listen on the connection").await;
        let again = format!("again {lw}");
        let chans = expect_texts(&r, &[("ra", &[again.as_str()])], "second listen");
        assert_eq!(chans["ra"].etag, m.etag);
        assert_eq!(backend.count(&key), 1);
        // Keep ra's etag current.
        let r = p.send("DELETE", "/jpub?channel=ra", &[], "").await;
        assert_eq!(r.status, 200);
        p.wait_listeners("rb", 0).await;
    }

    // JSONP through the redirect.
    let (path, _) = auth("", &[("rb", "0")]);
    let r = p.get(&format!("{path}&callback=cb"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(media_type(&r).as_deref(), Some("application/javascript"));
    let text = r.text();
    let chans = parse_channels(
        &parse_json(unwrap_jsonp(&text, "cb", "JSONP").as_bytes(), "JSONP"),
        "JSONP",
    );
    assert_eq!(chans["rb"].payload.len(), 2, "{text}");

    // Errors stay JSON; limit_req is in force (a cid used twice gets 429).
    let (path, _) = auth("", &[("rb", "abc")]);
    let r = p.get(&path, &[]).await;
    expect_json_error(&r, 400, "bad etag through the redirect");
    let (path, _) = auth("", &[("rb", "0")]);
    let r = p.get(&path, &[]).await;
    expect_channels(&r, "first use of a cid");
    let r = p.get(&path, &[]).await;
    assert_eq!(r.status, 429, "a cid used twice: {}", r.text());
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_listen_over_tls_and_http2() {
    use harness::h2::*;
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_cert(dir.path());
    let tls_port = free_port();
    let ng = Nginx::start(api_conf("").http(&format!(
        "ssl_session_cache shared:SSL:1m;
    server {{
        listen 127.0.0.1:{tls_port} ssl reuseport;
        http2 on;
        server_name localhost;
        ssl_certificate {};
        ssl_certificate_key {};
        add_header X-Worker $pid always;
        location = /__worker {{ return 204; }}
        location = /jsub {{ martd_listen json; martd_listener_timeout 30s; }}
        location = /jsub-short {{ martd_listen json; martd_listener_timeout 1s; }}
    }}",
        cert.display(),
        key.display()
    )));
    let w = ng.worker_pids();
    let mut p = Conn::open_on(ng.port, w[1]).await;
    jpub(&mut p, "hs", "", "stored").await;
    let h2 = H2Conn::open_on(tls_port, &connector_h2(&ca), "/__worker", w[0]).await;
    // Streams on one connection: stored (at once), waiting on various channels, JSONP, timeout.
    let stored = h2.spawn_get(&jsub("/jsub", &[("hs", "0")]), &[], LONG);
    let r = within(PROMPT, "h2 stored", stored).await.unwrap().expect("h2 stored");
    expect_texts(&r, &[("hs", &["stored"])], "h2: a stored message");
    let s1 = h2.spawn_get(&jsub("/jsub", &[("h1", "0"), ("h2", "0")]), &[], LONG);
    let s2 = h2.spawn_get(&jsub("/jsub", &[("h2", "0"), ("h3", "0")]), &[], LONG);
    let s3 = h2.spawn_get(&format!("{}&callback=cb", jsub("/jsub", &[("h3", "0")])), &[], LONG);
    let short = h2.spawn_get(&jsub("/jsub-short", &[("h4", "0")]), &[], LONG);
    p.wait_listeners("h1", 1).await;
    p.wait_listeners("h2", 2).await;
    p.wait_listeners("h3", 2).await;
    let r = within(PROMPT + Duration::from_secs(1), "h2 timeout", short).await.unwrap().unwrap();
    expect_empty(&r, "h2 listener timeout");
    assert_eq!(jpub(&mut p, "h2", "", "to h2").await.listeners, 2);
    for s in [s1, s2] {
        let r = within(PROMPT, "h2 stream", s).await.unwrap().expect("h2 stream");
        expect_texts(&r, &[("h2", &["to h2"])], "h2 stream");
        assert_eq!(r.worker(), w[0]);
    }
    p.wait_listeners("h3", 1).await;
    jpub(&mut p, "h3", "", "to h3").await;
    let r = within(PROMPT, "h2 JSONP stream", s3).await.unwrap().expect("h2 JSONP");
    assert_eq!(media_type(&r).as_deref(), Some("application/javascript"));
    let text = r.text();
    let chans = parse_channels(&parse_json(unwrap_jsonp(&text, "cb", "h2").as_bytes(), "h2"), "h2");
    assert_eq!(chans["h3"].texts(), ["to h3"]);

    // HTTP/1.1 over TLS (a detached listener) on the other worker.
    let mut c = Conn::try_open_tls(tls_port, &connector(&ca)).await.expect("TLS connection");
    let r = c.get(&jsub("/jsub", &[("hs", "0")]), &[]).await;
    expect_texts(&r, &[("hs", &["stored"])], "TLS HTTP/1.1: stored");
    let l = c.spawn_get(&jsub("/jsub", &[("h5", "0")]), &[], LONG);
    p.wait_listeners("h5", 1).await;
    jpub(&mut p, "h5", "", "over tls").await;
    let (_, r) = promptly(l, "TLS HTTP/1.1 listener").await;
    expect_texts(&r, &[("h5", &["over tls"])], "TLS HTTP/1.1 listener");
    ng.finish();
}

/// Listeners that ask again with the reply's etags, on both workers, while two publishers (one
/// per worker) publish to three channels: every listener gets every message exactly once, in
/// order per channel.
#[test]
fn json_listeners_lose_nothing_under_load() {
    heavy_test(async {
        let ng = Nginx::start(api_conf(""));
        let port = ng.port;
        let w = ng.worker_pids();
        let chans = ["ld0", "ld1", "ld2"];
        let per_publisher = 150usize;
        let total = 2 * per_publisher;
        let mut p = Conn::open_probed(port).await;
        for ch in chans {
            jpub(&mut p, ch, "size=1000", "").await;
        }
        let mut listeners = Vec::new();
        for i in 0..20 {
            let pid = w[i % 2];
            listeners.push(tokio::spawn(async move {
                let mut c = Conn::open_on(port, pid).await;
                let mut etags: BTreeMap<String, String> =
                    chans.iter().map(|c| (c.to_string(), "0".to_string())).collect();
                let mut got: BTreeMap<String, Vec<String>> = BTreeMap::new();
                while got.values().map(Vec::len).sum::<usize>() < total {
                    let args: Vec<(&str, &str)> =
                        etags.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                    let r = c.get_long(&jsub("/jsub", &args), &[], LONG).await;
                    for (ch, b) in expect_channels(&r, "listener under load") {
                        etags.insert(ch.clone(), b.etag.to_string());
                        got.entry(ch).or_default().extend(b.texts());
                    }
                }
                got
            }));
        }
        let mut publishers = Vec::new();
        for (k, pid) in w.iter().copied().enumerate() {
            publishers.push(tokio::spawn(async move {
                let mut c = Conn::open_on(port, pid).await;
                for n in 0..per_publisher {
                    let ch = chans[(n * 7 + k) % 3];
                    jpub(&mut c, ch, "", format!("{k}:{n}")).await;
                    if n % 10 == 0 {
                        sleep_ms(5).await;
                    }
                }
            }));
        }
        for t in publishers {
            within(Duration::from_secs(60), "publisher", t).await.unwrap();
        }
        let mut expected: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let r = p.get(&jsub("/jsub", &[("ld0", "0"), ("ld1", "0"), ("ld2", "0")]), &[]).await;
        for (ch, b) in expect_channels(&r, "everything stored") {
            expected.insert(ch, b.texts());
        }
        assert_eq!(expected.values().map(Vec::len).sum::<usize>(), total, "stored messages");
        for t in listeners {
            let got = within(Duration::from_secs(60), "listener", t).await.unwrap();
            assert_eq!(got, expected, "a listener's messages, per channel in order");
        }
        ng.finish();
    });
}

/// `auth_request` in front of a JSON listen location: asked once per long-poll (a detached
/// listener that is woken does not ask again), and a refusal means no listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_listen_behind_auth_request() {
    let backend = Backend::start(Duration::ZERO, |target| {
        if target.contains("deny") {
            "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
        } else {
            "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n".to_string()
        }
    })
    .await;
    let ng = Nginx::start(api_conf(&format!(
        "        location = /authz {{ internal; proxy_pass http://127.0.0.1:{}/authz?u=$request_uri; proxy_pass_request_body off; proxy_set_header Content-Length \"\"; }}
        location = /jsub-authz {{ auth_request /authz; martd_listen json; }}
",
        backend.port
    )));
    let w = ng.worker_pids();
    let mut p = Conn::open_on(ng.port, w[1]).await;
    for round in 0..3 {
        let path = jsub("/jsub-authz", &[("az", "0"), ("az2", "0")]);
        let key = path.split_once("cid=").unwrap().1.split('&').next().unwrap().to_string() + "&";
        let l = listen_on(ng.port, w[round % 2], &path).await;
        p.wait_listeners("az2", 1).await;
        let body = format!("round {round}");
        jpub(&mut p, "az2", "", body.clone()).await;
        let (_, r) = promptly(l, "listener behind auth_request").await;
        expect_texts(&r, &[("az2", &[body.as_str()])], "behind auth_request");
        p.send("DELETE", "/jpub?channel=az2", &[], "").await;
        sleep_ms(100).await;
        assert_eq!(
            backend.count(&format!("cid={key}")),
            1,
            "auth asked once: {:?}",
            backend.requests()
        );
    }
    let r = p.get(&jsub("/jsub-authz", &[("deny", "0")]), &[]).await;
    assert_eq!(r.status, 403, "refused by auth_request");
    assert!(jinfo(&mut p, "deny").await.is_none_or(|i| i.listeners == 0));
    ng.finish();
}
