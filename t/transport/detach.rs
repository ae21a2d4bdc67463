//! Streams that give their request back to nginx once idle (`martd_detach_listeners`): they
//! go on delivering on every transport, over TLS too, end cleanly at reload, leave when their
//! client goes or their worker dies; and keep their request wherever nginx still needs it
//! (gzip, limit_conn, `martd_detach_listeners off`, HTTP/2).

use std::io::Write;

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

use super::websocket::{next_msg, ws_open};
use super::*;

/// The debug log line of a stream that gave its request back.
const DETACHED: &str = "streaming subscriber writes without its request";

/// Locations for each streaming transport, a debug log and an access log.
fn detach_conf(extra: &str) -> Conf {
    let mut c = conf(&format!(
        "        access_log logs/access.log;
        location = /es {{ martd_listen eventsource; martd_channel_id $arg_channel; }}
        location = /ws {{ martd_listen websocket; martd_channel_id $arg_channel; }}
        location = /st {{ martd_listen stream; martd_channel_id $arg_channel; }}
{extra}"
    ));
    c.main = "error_log logs/debug.log debug;".to_string();
    c
}

fn debug_log(ng: &Nginx) -> String {
    std::fs::read_to_string(ng.prefix().join("logs/debug.log")).unwrap_or_default()
}

/// Waits until the debug log has `n` detached streams; `false` if this nginx writes no debug
/// log (built without `--with-debug`): then detaching is not observable here.
async fn wait_detached(ng: &Nginx, n: usize) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = debug_log(ng);
        if !log.contains("[debug]") {
            eprintln!("nginx has no debug logging: detaching is not observable");
            return false;
        }
        let got = log.matches(DETACHED).count();
        assert!(got <= n, "{got} streams detached, expected {n}");
        if got == n {
            return true;
        }
        assert!(std::time::Instant::now() < deadline, "{got} of {n} streams detached");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_streams_give_their_request_back_and_deliver_and_end_cleanly() {
    let mut ng = Nginx::start(detach_conf(""));
    let w = ng.worker_pids();
    let mut p = Conn::open_on(ng.port, w[0]).await;
    let es = open_on(ng.port, w[1], "/es?channel=d1", &[SSE]).await;
    assert_eq!(es.status, 200);
    let mut es = es.events();
    let mut st = open_on(ng.port, w[0], "/st?channel=d1", &[]).await;
    let (mut ws, _) = ws_open(ng.port, "/ws?channel=d1").await;
    p.wait_listeners("d1", 3).await;
    let observable = wait_detached(&ng, 3).await;
    if observable {
        // nginx logged each request when it gave it back, the stream still open.
        let access = std::fs::read_to_string(ng.prefix().join("logs/access.log")).unwrap();
        for want in ["\"GET /es?channel=d1 HTTP/1.1\" 200", "\"GET /ws?channel=d1 HTTP/1.1\" 101"] {
            assert!(access.contains(want), "{want} not in the access log: {access}");
        }
    }
    // Messages from both workers, small and large (past the socket's buffer), in order.
    let mut p2 = Conn::open_on(ng.port, w[1]).await;
    let big = "x".repeat(300_000);
    let mut bodies = Vec::new();
    for i in 0..60 {
        let body = if i % 20 == 7 { format!("{i}{big}") } else { format!("m{i}") };
        let c = if i % 2 == 0 { &mut p } else { &mut p2 };
        publish(c, "d1", body.clone()).await;
        bodies.push(body);
    }
    let got = es.take(60, PROMPT).await;
    assert_eq!(got.iter().map(|e| e.data.clone()).collect::<Vec<_>>(), bodies);
    let got = st.pieces(b"\n", 60, PROMPT).await;
    assert_eq!(got, bodies.iter().map(|b| b.as_bytes().to_vec()).collect::<Vec<_>>());
    for b in &bodies {
        assert_eq!(next_msg(&mut ws).await, Message::text(b.as_str()));
    }
    // A WebSocket ping is answered while detached.
    ws.send(Message::Ping(b"hi"[..].into())).await.unwrap();
    loop {
        match tokio::time::timeout(PROMPT, ws.next()).await {
            Ok(Some(Ok(Message::Pong(d)))) => {
                assert_eq!(&d[..], b"hi");
                break;
            }
            Ok(Some(Ok(Message::Ping(_)))) => continue,
            other => panic!("expected a pong: {other:?}"),
        }
    }
    // Reload: each stream ends cleanly, the WebSocket with 1001, the chunked ones whole.
    let took = ng.reload();
    assert!(took < Duration::from_secs(5), "reload took {took:?}");
    assert!(st.ends_whole_within(PROMPT).await, "the stream did not end with its last chunk");
    assert!(es.ends_within(PROMPT).await, "the event stream did not end");
    match next_msg(&mut ws).await {
        Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Away),
        other => panic!("expected close 1001, got {other:?}"),
    }
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_streams_leave_when_clients_vanish_or_their_worker_dies() {
    let mut ng = Nginx::start(detach_conf(""));
    ng.allow_log("exited on signal 9");
    ng.allow_log("was locked by");
    let w = ng.worker_pids();
    let mut on = [Vec::new(), Vec::new()];
    for i in 0..20 {
        let s = open_on(ng.port, w[i % 2], "/es?channel=d2", &[SSE]).await;
        on[i % 2].push(s.events());
    }
    let mut p = Conn::open_on(ng.port, w[1]).await;
    p.wait_listeners("d2", 20).await;
    wait_detached(&ng, 20).await;
    // Five clients drop their connections: they leave.
    for _ in 0..5 {
        on[1].pop();
    }
    p.wait_listeners("d2", 15).await;
    // Worker 0 dies with ten detached streams: its clients see their stream end, the zone
    // forgets them, and worker 1's streams go on.
    ng.kill_worker(w[0], libc::SIGKILL);
    let now = ng.wait_respawn(w[0]);
    for ev in &mut on[0] {
        assert!(ev.ends_within(PROMPT).await, "a stream of the killed worker stayed open");
    }
    let mut p = Conn::open_on(ng.port, now[0]).await;
    p.wait_listeners("d2", 5).await;
    let id = publish(&mut p, "d2", "after").await;
    for ev in &mut on[1] {
        let e = ev.next(PROMPT).await.expect("a message after the crash");
        assert_eq!((e.id, e.data.as_str()), (id.to_string(), "after"));
    }
    drop(on);
    p.wait_listeners("d2", 0).await;
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_streams_detach_and_carry_large_messages() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_cert(dir.path());
    let tls_port = free_port();
    let ng = Nginx::start(detach_conf("").http(&format!(
        "server {{
        listen 127.0.0.1:{tls_port} ssl reuseport;
        ssl_certificate {};
        ssl_certificate_key {};
        martd_message_buffer_length 1000;
        location = /es {{ martd_listen eventsource; martd_channel_id $arg_channel; }}
    }}",
        cert.display(),
        key.display()
    )));
    let tls = connector(&ca);
    let mut streams = Vec::new();
    for _ in 0..4 {
        let c = Conn::try_open_tls(tls_port, &tls).await.expect("TLS connection");
        let s = Streaming::open(c, "/es?channel=d3", &[SSE], QUICK).await;
        assert_eq!(s.status, 200);
        streams.push(s.events());
    }
    let mut p = Conn::open(ng.port).await;
    p.wait_listeners("d3", 4).await;
    wait_detached(&ng, 4).await;
    let mut bodies = Vec::new();
    for i in 0..40 {
        let body = if i % 10 == 3 { "t".repeat(100_000 + i) } else { format!("tls {i}") };
        publish(&mut p, "d3", body.clone()).await;
        bodies.push(body);
    }
    for ev in &mut streams {
        let got = ev.take(40, PROMPT).await;
        assert_eq!(got.iter().map(|e| e.data.clone()).collect::<Vec<_>>(), bodies);
    }
    drop(streams);
    p.wait_listeners("d3", 0).await;
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_keep_their_request_where_nginx_still_needs_it() {
    let ng = Nginx::start(
        detach_conf(
            "        location = /gz { martd_listen eventsource; martd_channel_id $arg_channel;
            gzip on; gzip_min_length 0; gzip_types text/event-stream; }
        location = /lc { martd_listen eventsource; martd_channel_id $arg_channel;
            limit_conn per_ip 1; }
        location = /off { martd_listen eventsource stream; martd_channel_id $arg_channel;
            martd_detach_listeners off; }",
        )
        .http("limit_conn_zone $binary_remote_addr zone=per_ip:1m;"),
    );
    let w = ng.worker_pids();
    let mut p = Conn::open_on(ng.port, w[0]).await;
    // gzip rewrites the stream: it stays nginx's, compressed, flushed per message.
    let mut gz =
        open_on(ng.port, w[1], "/gz?channel=d4", &[SSE, ("Accept-Encoding", "gzip")]).await;
    assert_eq!(gz.header("content-encoding"), Some("gzip"));
    // limit_conn counts the stream while it is open: a second one from this address is refused.
    let lc = open_on(ng.port, w[0], "/lc?channel=d4", &[SSE]).await;
    assert_eq!(lc.status, 200);
    let mut lc = lc.events();
    let r = Conn::open(ng.port).await.get("/lc?channel=d4", &[SSE]).await;
    assert_eq!(r.status, 503, "limit_conn let a second stream in");
    let off = open_on(ng.port, w[1], "/off?channel=d4", &[SSE]).await;
    let mut off = off.events();
    p.wait_listeners("d4", 3).await;
    let id = publish(&mut p, "d4", "kept").await;
    let mut plain = flate2::write::GzDecoder::new(Vec::new());
    let want = format!("id: {id}\ndata: kept\n\n");
    while !String::from_utf8_lossy(plain.get_ref()).contains(&want) {
        let chunk = gz.chunk(PROMPT).await.expect("a gzip chunk");
        plain.write_all(&chunk).unwrap();
        plain.flush().unwrap();
    }
    for ev in [&mut lc, &mut off] {
        assert_eq!(ev.next(PROMPT).await.expect("a message").data, "kept");
    }
    // None of them detached; a plain stream beside them does (so the check can fail).
    if wait_detached(&ng, 0).await {
        let path = format!("/es?channel=d4&last_event_id={id}");
        let mut s = open_on(ng.port, w[0], &path, &[SSE]).await.events();
        wait_detached(&ng, 1).await;
        publish(&mut p, "d4", "plain").await;
        assert_eq!(s.next(PROMPT).await.expect("a message").data, "plain");
    }
    // HTTP/1.0 without keep-alive: the stream stays nginx's and is read to its close.
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", ng.port)).await.unwrap();
    raw.write_all(b"GET /st?channel=d5 HTTP/1.0\r\n\r\n").await.unwrap();
    p.wait_listeners("d5", 1).await;
    publish(&mut p, "d5", "ten").await;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("ten\n") {
        use tokio::io::AsyncReadExt;
        let n = tokio::time::timeout(PROMPT, raw.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(!debug_log(&ng).contains("[debug]") || debug_log(&ng).matches(DETACHED).count() <= 1);
    ng.finish();
}
