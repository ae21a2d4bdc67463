//! Cross-origin requests (`martd_allow_origin`): an allowed origin's responses carry
//! `Access-Control-Allow-Origin` and the rest on every status and from whoever made them, its
//! preflights get `204` (even behind `auth_basic`), a refused origin gets `403` and publishes
//! nothing, requests without `Origin` are untouched, and the value may be `*`, `off` or a
//! variable.

use super::*;

const APP: &str = "https://app.example";

fn cors_conf(dir: &std::path::Path) -> Conf {
    // A user file (no test authenticates: only the 401 and the preflight matter).
    let users = dir.join("users");
    std::fs::write(&users, "u:$apr1$x$3CEwVJTd3K.dwUN0o2vFV1\n").unwrap();
    Conf::new(&format!(
        "        martd_allow_origin \"{APP} https://two.example\";
        location = /pub {{ martd_push; }}
        location = /sub {{ martd_listen; martd_listener_timeout 1s; }}
        location = /sub-first {{ martd_listen; martd_listener_concurrency first; }}
        location = /es {{ martd_listen eventsource websocket; }}
        location = /auth-sub {{ auth_basic \"martd\"; auth_basic_user_file {}; martd_listen; }}
        location = /open {{ martd_listen; martd_allow_origin off; }}
        location = /any {{ martd_listen; martd_allow_origin *; }}
        location = /var {{ martd_listen; martd_allow_origin $cors; }}
        location = /limited {{ limit_req zone=cors_one; martd_listen; }}
",
        users.display()
    ))
    .http(
        "map $http_origin $cors { \"~^https://[a-z]+\\.example\\.org$\" $http_origin; default \"\"; }
    limit_req_zone $binary_remote_addr zone=cors_one:1m rate=1r/m;",
    )
}

/// Asserts the cross-origin headers of an allowed `origin`'s response.
fn assert_cors(r: &Resp, origin: &str, what: &str) {
    let h = |n: &str| r.header(n).map(str::to_string);
    assert_eq!(
        h("access-control-allow-origin").as_deref(),
        Some(origin),
        "{what}: {:?}",
        r.headers
    );
    assert_eq!(h("access-control-allow-credentials").as_deref(), Some("true"), "{what}");
    assert_eq!(
        h("access-control-expose-headers").as_deref(),
        Some("Etag, Last-Modified, X-Martd-Channel"),
        "{what}"
    );
    let vary: Vec<_> = r.headers.get_all("vary").iter().filter_map(|v| v.to_str().ok()).collect();
    assert!(vary.iter().any(|v| v.contains("Origin")), "{what}: Vary {vary:?}");
}

fn assert_no_cors(r: &Resp, what: &str) {
    assert!(r.header("access-control-allow-origin").is_none(), "{what}: {:?}", r.headers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_origin_gets_the_headers_on_every_status() {
    let dir = tempfile::tempdir().unwrap();
    let ng = Nginx::start(cors_conf(dir.path()));
    let w = ng.worker_pids();
    let o = [("Origin", APP)];
    let mut p = Conn::open_on(ng.port, w[0]).await;
    let r = p.send("POST", "/pub?channel=c1", &o, "m1").await;
    assert!(r.status == 201 || r.status == 202, "{}", r.status);
    assert_cors(&r, APP, "publish");
    let id = parse_info_text(&r.text()).last_id.unwrap();
    let mut c = Conn::open_on(ng.port, w[1]).await;
    assert_cors(&c.get("/sub?channel=c1", &o).await, APP, "200 message");
    let etag = format!("\"{id}\"");
    let r = c.get_long("/sub?channel=c1", &[o[0], ("If-None-Match", &etag)], LONG).await;
    assert_status(&r, 304, "timeout");
    assert_cors(&r, APP, "304 after the listener timeout");
    let r = c.get("/sub", &o).await;
    assert_status(&r, 400, "no channel");
    assert_cors(&r, APP, "400");
    // 409: a second listener where the first one is waiting.
    let first = Conn::open_on(ng.port, w[0]).await.spawn_get("/sub-first?channel=c2", &o, LONG);
    p.wait_listeners("c2", 1).await;
    let r = c.get("/sub-first?channel=c2", &o).await;
    assert_status(&r, 409, "second listener");
    assert_cors(&r, APP, "409");
    // 410: the channel deleted while the first waits (it detached and was replayed).
    let r = p.send("DELETE", "/pub?channel=c2", &o, "").await;
    assert_cors(&r, APP, "delete");
    let r = first.resp().await;
    assert_status(&r, 410, "deleted while waiting");
    assert_cors(&r, APP, "410 of a replayed detached listener");
    // A detached listener's message.
    let l = Conn::open_on(ng.port, w[1]).await.spawn_get(
        "/sub-first?channel=c3",
        &[o[0], ("If-None-Match", "\"9000000000000000000\"")],
        LONG,
    );
    p.wait_listeners("c3", 1).await;
    p.publish("c3", "late").await;
    let r = l.resp().await;
    assert_eq!((r.status, r.text().as_str()), (200, "late"));
    assert_cors(&r, APP, "200 of a replayed detached listener");
    // nginx's own error page (auth_basic's 401) carries them too.
    let r = c.get("/auth-sub?channel=c1", &o).await;
    assert_status(&r, 401, "auth_basic");
    assert_cors(&r, APP, "401 from auth_basic");
    // ... and limit_req's 503.
    c.get("/limited?channel=c1", &o).await;
    let r = c.get("/limited?channel=c1", &o).await;
    assert_status(&r, 503, "limit_req");
    assert_cors(&r, APP, "503 from limit_req");
    // A stream's head: EventSource 200, WebSocket 101.
    let s = Streaming::open(
        Conn::open(ng.port).await,
        "/es?channel=c1",
        &[o[0], ("Accept", "text/event-stream")],
        QUICK,
    )
    .await;
    assert_eq!(s.status, 200);
    assert_eq!(s.header("access-control-allow-origin"), Some(APP));
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", ng.port)).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    raw.write_all(
        format!(
            "GET /es?channel=c1 HTTP/1.1\r\nHost: x\r\nOrigin: {APP}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(QUICK, raw.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&head));
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains(&format!("access-control-allow-origin: {APP}")), "{head}");
    // The second origin of the list; no Origin at all: untouched.
    let two = "https://two.example";
    assert_cors(&c.get("/sub?channel=c1", &[("Origin", two)]).await, two, "second origin");
    let r = c.get("/sub?channel=c1", &[]).await;
    assert_status(&r, 200, "no Origin");
    assert_no_cors(&r, "no Origin");
    // Another location of the server (not martd's) inherits the directive but is untouched.
    let r = c.get("/__worker", &o).await;
    assert_status(&r, 204, "a location that is not martd's");
    assert_no_cors(&r, "a location that is not martd's");
    drop(s);
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflights_refusals_and_values() {
    let dir = tempfile::tempdir().unwrap();
    let ng = Nginx::start(cors_conf(dir.path()));
    let mut c = Conn::open(ng.port).await;
    let pre = |origin: &'static str, asked: &'static str| {
        vec![
            ("Origin", origin),
            ("Access-Control-Request-Method", "GET"),
            ("Access-Control-Request-Headers", asked),
        ]
    };
    for (path, methods) in [
        ("/sub?channel=p1", "GET"),
        ("/pub?channel=p1", "GET, POST, PUT, DELETE"),
        // No credentials on a preflight: answered before auth_basic asks for them.
        ("/auth-sub?channel=p1", "GET"),
    ] {
        let r = c.send("OPTIONS", path, &pre(APP, "if-none-match, last-event-id"), "").await;
        assert_status(&r, 204, path);
        assert_cors(&r, APP, path);
        assert_eq!(r.header("access-control-allow-methods"), Some(methods), "{path}");
        assert_eq!(
            r.header("access-control-allow-headers"),
            Some("if-none-match, last-event-id"),
            "{path}"
        );
        assert_eq!(r.header("access-control-max-age"), Some("600"), "{path}");
        assert!(r.body.is_empty(), "{path}");
    }
    // A header list that is not one is not echoed.
    let r = c.send("OPTIONS", "/sub?channel=p1", &pre(APP, "a b"), "").await;
    assert_status(&r, 204, "bad header list");
    assert!(r.header("access-control-allow-headers").is_none());
    // Refused origins: 403 with a reason, no headers, nothing published, no preflight.
    let evil = "https://evil.example";
    for (m, path) in [("GET", "/sub?channel=p1"), ("POST", "/pub?channel=p1"), ("GET", "/auth-sub")]
    {
        let r = c.send(m, path, &[("Origin", evil)], "x").await;
        assert_status(&r, 403, path);
        assert!(r.text().contains("origin not allowed"), "{}", r.text());
        assert_no_cors(&r, path);
    }
    let r = c.send("OPTIONS", "/sub?channel=p1", &pre(evil, "x"), "").await;
    assert_status(&r, 403, "refused preflight");
    assert!(c.info("p1").await.is_none(), "a refused origin published");
    // Values: off, *, a variable (a map that gives nothing: no cross-origin handling).
    c.publish("p2", "v").await;
    let r = c.get("/open?channel=p2", &[("Origin", evil)]).await;
    assert_status(&r, 200, "off");
    assert_no_cors(&r, "off");
    assert_cors(&c.get("/any?channel=p2", &[("Origin", evil)]).await, evil, "*");
    let org = "https://shop.example.org";
    assert_cors(&c.get("/var?channel=p2", &[("Origin", org)]).await, org, "variable");
    let r = c.get("/var?channel=p2", &[("Origin", evil)]).await;
    assert_status(&r, 200, "variable, empty");
    assert_no_cors(&r, "variable, empty");
    ng.finish();
}

fn assert_status(r: &Resp, status: u16, what: &str) {
    assert_eq!(r.status, status, "{what}: {} {:?}", r.text(), r.headers);
}
