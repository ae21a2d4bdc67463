//! TLS and HTTP/2 listeners.

use super::*;

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
