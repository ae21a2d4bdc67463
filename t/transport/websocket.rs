//! WebSocket (`martd_listen websocket`): messages as text or binary frames, resume, pings both
//! ways, closes with the right codes, malformed frames of every kind, reload.

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

use super::*;

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

fn ws_conf(extra: &str) -> Conf {
    conf(&format!(
        "        location = /ws {{ martd_listen websocket; }}
        location = /pub-bin {{ martd_push; }}
{extra}"
    ))
}

/// A WebSocket client on `path`; the worker that serves it.
pub(super) async fn ws_open(port: u16, path: &str) -> (Ws, u32) {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    let url = format!("ws://127.0.0.1:{port}{path}");
    let (ws, resp) = tokio::time::timeout(QUICK, tokio_tungstenite::client_async(url, tcp))
        .await
        .expect("handshake in time")
        .expect("WebSocket handshake");
    assert_eq!(resp.status().as_u16(), 101);
    let worker = resp
        .headers()
        .get("x-worker")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("X-Worker on the 101");
    (ws, worker)
}

/// The next data message (pings and pongs skipped).
pub(super) async fn next_msg<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match tokio::time::timeout(PROMPT, ws.next()).await {
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(Some(Ok(m))) => return m,
            Ok(other) => panic!("WebSocket ended: {other:?}"),
            Err(_) => panic!("no WebSocket message within {PROMPT:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_in_order_across_workers_binary_resume_and_closes() {
    let ng = Nginx::start(ws_conf(""));
    let mut p = Conn::open(ng.port).await;
    let stored = publish(&mut p, "w1", "stored").await;
    let (mut ws, worker) = ws_open(ng.port, "/ws?channel=w1").await;
    assert_eq!(next_msg(&mut ws).await, Message::text("stored"));
    let mut p = Conn::open_not_on(ng.port, worker).await;
    p.wait_listeners("w1", 1).await;
    let mut last = stored;
    for i in 0..300 {
        last = publish(&mut p, "w1", format!("m{i}")).await;
    }
    for i in 0..300 {
        assert_eq!(next_msg(&mut ws).await, Message::text(format!("m{i}")));
    }
    // Not UTF-8, or published as application/octet-stream: binary frames.
    publish(&mut p, "w1", &b"\xff\xfe"[..]).await;
    assert_eq!(next_msg(&mut ws).await, Message::binary(&b"\xff\xfe"[..]));
    let r = p
        .send("POST", "/pub?channel=w1", &[("content-type", "application/octet-stream")], "abc")
        .await;
    assert!(r.status == 201 || r.status == 202);
    assert_eq!(next_msg(&mut ws).await, Message::binary(&b"abc"[..]));
    // A ping of the client's is answered with its payload.
    ws.send(Message::Ping(b"hi"[..].into())).await.expect("ping");
    let pong = loop {
        match tokio::time::timeout(PROMPT, ws.next()).await {
            Ok(Some(Ok(Message::Pong(d)))) => break d,
            Ok(Some(Ok(_))) => continue,
            other => panic!("no pong: {other:?}"),
        }
    };
    assert_eq!(&pong[..], b"hi");
    // The client closes: echoed, and it leaves.
    ws.close(None).await.expect("close");
    p.wait_listeners("w1", 0).await;
    // Resume with last_event_id: exactly what was missed.
    let a = publish(&mut p, "w1", "x1").await;
    publish(&mut p, "w1", "x2").await;
    let (mut ws, _) = ws_open(ng.port, &format!("/ws?channel=w1&last_event_id={a}")).await;
    assert_eq!(next_msg(&mut ws).await, Message::text("x2"));
    assert!(last < a);
    // A deleted channel closes its WebSockets with 1000 and a reason.
    p.wait_listeners("w1", 1).await;
    let r = p.send("DELETE", "/pub?channel=w1", &[], "").await;
    assert_eq!(r.status, 200);
    match next_msg(&mut ws).await {
        Message::Close(Some(f)) => {
            assert_eq!(f.code, CloseCode::Normal);
            assert_eq!(f.reason.as_str(), "channel deleted");
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_closes_with_1001_and_clients_resume_without_loss() {
    let mut ng = Nginx::start(ws_conf(""));
    let mut p = Conn::open_probed(ng.port).await;
    let a = publish(&mut p, "rw", "before").await;
    let (mut ws, _) = ws_open(ng.port, &format!("/ws?channel=rw&last_event_id={}", a - 1)).await;
    assert_eq!(next_msg(&mut ws).await, Message::text("before"));
    drop(p);
    let took = ng.reload();
    assert!(took < Duration::from_secs(5), "reload took {took:?}");
    match next_msg(&mut ws).await {
        Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Away),
        other => panic!("expected close 1001, got {other:?}"),
    }
    let mut p = Conn::open_probed(ng.port).await;
    publish(&mut p, "rw", "after").await;
    let (mut ws, _) = ws_open(ng.port, &format!("/ws?channel=rw&last_event_id={a}")).await;
    assert_eq!(next_msg(&mut ws).await, Message::text("after"));
    ng.finish();
}

/// A raw client: handshake on `path`, then whatever bytes the test writes.
async fn raw_ws(port: u16, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write handshake");
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n =
            tokio::time::timeout(QUICK, s.read(&mut b)).await.expect("head in time").expect("read");
        assert_eq!(n, 1, "closed during the handshake: {:?}", String::from_utf8_lossy(&head));
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    assert!(head.starts_with("HTTP/1.1 101 Switching Protocols\r\n"), "{head}");
    assert!(head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
    s
}

/// A client frame: FIN, opcode, masked (or not) payload; `rsv` sets reserved bits.
fn frame(fin: bool, rsv: u8, op: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut f = vec![(if fin { 0x80 } else { 0 }) | (rsv << 4) | op];
    let m = if masked { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => f.push(m | n as u8),
        n @ 126..=65535 => {
            f.push(m | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(m | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let key = [1u8, 2, 3, 4];
    if masked {
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        f.extend_from_slice(payload);
    }
    f
}

/// Reads server frames until a close frame: its code (`None`: closed without one).
async fn close_code(s: &mut TcpStream) -> Option<u16> {
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + PROMPT;
    loop {
        // Parse whole frames at the front.
        while buf.len() >= 2 {
            let (op, len7) = (buf[0] & 0x0f, (buf[1] & 0x7f) as usize);
            let (hl, len) = match len7 {
                126 if buf.len() >= 4 => (4, u16::from_be_bytes([buf[2], buf[3]]) as usize),
                127 if buf.len() >= 10 => {
                    (10, u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize)
                }
                126 | 127 => break,
                n => (2, n),
            };
            if buf.len() < hl + len {
                break;
            }
            if op == 0x8 {
                return (len >= 2).then(|| u16::from_be_bytes([buf[hl], buf[hl + 1]]));
            }
            buf.drain(..hl + len);
        }
        let mut b = [0u8; 4096];
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => buf.extend_from_slice(&b[..n]),
            Err(_) => panic!("no close frame within {PROMPT:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_close_with_their_code_and_random_bytes_never_hurt_a_worker() {
    let mut ng = Nginx::start(ws_conf(""));
    let workers = ng.worker_pids();
    let big = vec![b'a'; 70 * 1024];
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("unmasked frame", frame(true, 0, 1, b"hi", false), 1002),
        ("reserved bits", frame(true, 0b100, 1, b"hi", true), 1002),
        ("unknown opcode", frame(true, 0, 0x3, b"hi", true), 1002),
        ("control frame over 125 bytes", frame(true, 0, 0x9, &[0u8; 126], true), 1002),
        ("fragmented control frame", frame(false, 0, 0x9, b"x", true), 1002),
        ("continuation with nothing to continue", frame(true, 0, 0x0, b"x", true), 1002),
        ("text that is not UTF-8", frame(true, 0, 1, b"\xff\xfe", true), 1007),
        ("message over the limit", frame(true, 0, 2, &big, true), 1009),
        ("close with a bad code", frame(true, 0, 0x8, &999u16.to_be_bytes(), true), 1002),
    ];
    for (what, bytes, want) in cases {
        let mut s = raw_ws(ng.port, "/ws?channel=mf").await;
        s.write_all(&bytes).await.expect("write");
        assert_eq!(close_code(&mut s).await, Some(want), "{what}");
    }
    // A client close is echoed with 1000.
    let mut s = raw_ws(ng.port, "/ws?channel=mf").await;
    s.write_all(&frame(true, 0, 0x8, &1000u16.to_be_bytes(), true)).await.expect("write");
    assert_eq!(close_code(&mut s).await, Some(1000));
    // Random and truncated bytes, on many connections: the workers survive, nothing leaks.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..150 {
        let mut s = raw_ws(ng.port, "/ws?channel=fz").await;
        let mut bytes = Vec::new();
        let n = 1 + (i * 7) % 300;
        for _ in 0..n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bytes.push(x as u8);
        }
        if i % 3 == 0 {
            // A valid frame cut short.
            bytes = frame(true, 0, 1, &bytes, true);
            bytes.truncate(bytes.len() / 2);
        }
        let _ = s.write_all(&bytes).await;
        if i % 2 == 0 {
            drop(s);
        } else {
            let _ = tokio::time::timeout(Duration::from_millis(20), s.read(&mut [0u8; 64])).await;
        }
    }
    let mut p = Conn::open(ng.port).await;
    p.wait_info("fz", "no listener left", |i| i.is_none_or(|i| i.listeners == 0)).await;
    assert_eq!(ng.worker_pids(), workers, "no worker died");
    ng.allow_log("client sent"); // nginx's own info lines about bad clients, if any
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_drop_peers_that_stop_answering_and_handshake_errors_get_400() {
    let ng = Nginx::start(ws_conf(
        "        location = /ws-ping { martd_listen websocket; martd_websocket_ping 200ms; }
        location = /ws-or-poll { martd_listen websocket longpoll; }",
    ));
    // A client that answers pings (tungstenite does, while it reads) stays.
    let (mut ok, _) = ws_open(ng.port, "/ws-ping?channel=pp").await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        while let Some(Ok(m)) = ok.next().await {
            if m.is_text() && tx.send(m).is_err() {
                break;
            }
        }
    });
    // A raw client that never answers is closed after a ping goes unanswered.
    let mut mute = raw_ws(ng.port, "/ws-ping?channel=pp").await;
    let mut pings = 0;
    let mut buf = [0u8; 64];
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(3), mute.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => pings += buf[..n].iter().filter(|&&b| b == 0x89).count(),
            Err(_) => break false,
        }
    };
    assert!(closed && pings >= 1, "closed: {closed}, pings seen: {pings}");
    let mut p = Conn::open(ng.port).await;
    p.wait_listeners("pp", 1).await;
    publish(&mut p, "pp", "still here").await;
    let got = tokio::time::timeout(PROMPT, rx.recv()).await.expect("in time");
    assert_eq!(got, Some(Message::text("still here")));
    reader.abort();
    // Handshake errors.
    for (what, extra) in [
        ("no key", "Sec-WebSocket-Version: 13\r\n"),
        (
            "version 8",
            "Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
        ),
    ] {
        let mut c = RawConn::open(ng.port).await;
        c.write(
            format!("GET /ws?channel=he HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{extra}\r\n")
                .as_bytes(),
        )
        .await;
        let r = c.response(QUICK).await;
        assert_eq!(r.status, 400, "{what}: {:?}", String::from_utf8_lossy(&r.body));
    }
    // A location offering long-poll too: a plain GET is a long-poll.
    publish(&mut p, "po", "lp").await;
    let r = p.get("/ws-or-poll?channel=po", &[]).await;
    assert_eq!((r.status, r.text().as_str()), (200, "lp"));
    let r = p.get("/ws?channel=po", &[]).await;
    assert_eq!(r.status, 406, "{}", r.text());
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn martd_websocket_publish_lets_clients_publish_with_the_channels_key() {
    let ng = Nginx::start(ws_conf(
        "        location = /ws-pub { martd_listen websocket; martd_websocket_publish on; }",
    ));
    let (mut publisher, _) = ws_open(ng.port, "/ws-pub?channel=wp").await;
    let (mut reader, _) = ws_open(ng.port, "/ws?channel=wp").await;
    let mut p = Conn::open(ng.port).await;
    p.wait_listeners("wp", 2).await;
    publisher.send(Message::text("from a socket")).await.expect("send");
    publisher.send(Message::binary(&b"\x00\x01"[..])).await.expect("send");
    assert_eq!(next_msg(&mut reader).await, Message::text("from a socket"));
    assert_eq!(next_msg(&mut reader).await, Message::binary(&b"\x00\x01"[..]));
    // The publishing socket is a subscriber too: it gets its own messages.
    assert_eq!(next_msg(&mut publisher).await, Message::text("from a socket"));
    // Off (the default): a client's messages are read and dropped.
    reader.send(Message::text("ignored")).await.expect("send");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = p.get("/pub?channel=wp", &[("accept", "application/json")]).await;
    assert!(r.text().contains("\"messages\":2"), "{}", r.text());
    // A keyed channel: without the key, 1008; with it, published.
    let r = p.send("POST", "/pub?channel=wk&key=s3cret", &[], "first").await;
    assert!(r.status == 201 || r.status == 202, "{}", r.text());
    let (mut nokey, _) =
        ws_open(ng.port, "/ws-pub?channel=wk&last_event_id=99999999999999999").await;
    nokey.send(Message::text("no key")).await.expect("send");
    match next_msg(&mut nokey).await {
        Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 1008),
        other => panic!("expected 1008, got {other:?}"),
    }
    let (mut keyed, _) = ws_open(ng.port, "/ws-pub?channel=wk&key=s3cret").await;
    assert_eq!(next_msg(&mut keyed).await, Message::text("first"));
    keyed.send(Message::text("with the key")).await.expect("send");
    assert_eq!(next_msg(&mut keyed).await, Message::text("with the key"));
    // A socket's key never gives a keyless channel a key.
    let (mut sets, _) = ws_open(ng.port, "/ws-pub?channel=nk&key=mine").await;
    sets.send(Message::text("hi")).await.expect("send");
    assert_eq!(next_msg(&mut sets).await, Message::text("hi"));
    let r = p.send("POST", "/pub?channel=nk", &[], "no key needed").await;
    assert!(r.status == 201 || r.status == 202, "{} {}", r.status, r.text());
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subprotocol_martd_meta_prefixes_id_channel_and_type() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let ng = Nginx::start(ws_conf(
        "        location = /ws-multi { martd_listen websocket; martd_channel_id $arg_chs;
                               martd_channel_id_delimiter \",\"; }",
    ));
    let url = format!("ws://127.0.0.1:{}/ws-multi?chs=ma,mb", ng.port);
    let mut req = url.into_client_request().expect("request");
    req.headers_mut().insert("Sec-WebSocket-Protocol", "other, martd.meta".parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.expect("handshake");
    assert_eq!(
        resp.headers().get("sec-websocket-protocol").map(|v| v.as_bytes()),
        Some(&b"martd.meta"[..])
    );
    // Without the subprotocol: bare messages, no protocol header.
    let (mut bare, _) = ws_open(ng.port, "/ws-multi?chs=ma,mb").await;
    let mut p = Conn::open(ng.port).await;
    p.wait_listeners("mb", 2).await;
    let r = p
        .send(
            "POST",
            "/pub?channel=ma",
            &[("content-type", "text/plain"), ("accept", "application/json")],
            "to a",
        )
        .await;
    let a = parse_info_json(&r.text()).last_id.expect("id");
    let r = p.send("POST", "/pub?channel=mb", &[("content-type", "application/json")], "{}").await;
    assert!(r.status == 201 || r.status == 202);
    assert_eq!(
        next_msg(&mut ws).await,
        Message::text(format!("id: {a}\nchannel: ma\ncontent-type: text/plain\n\nto a"))
    );
    match next_msg(&mut ws).await {
        Message::Text(t) => {
            assert!(t.contains("\nchannel: mb\ncontent-type: application/json\n\n{}"), "{t}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(next_msg(&mut bare).await, Message::text("to a"));
    assert_eq!(next_msg(&mut bare).await, Message::text("{}"));
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_that_stops_reading_is_closed_at_the_pending_cap() {
    let mut ng = Nginx::start(ws_conf(
        "        location = /ws-small { martd_listen websocket; martd_max_pending_bytes 64k; }",
    ));
    ng.allow_log("closing a streaming subscriber");
    // Handshake, then never read again (a 4 KB receive buffer).
    let mut slow = RawConn::open_on_small_buffer(ng.port).await;
    slow.write(
        b"GET /ws-small?channel=sw HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await;
    let (mut fast, _) = ws_open(ng.port, "/ws-small?channel=sw").await;
    let mut p = Conn::open(ng.port).await;
    p.wait_listeners("sw", 2).await;
    let body = "z".repeat(64 * 1024 - 16);
    for i in 0..150 {
        publish(&mut p, "sw", body.clone()).await;
        match next_msg(&mut fast).await {
            Message::Text(t) => assert_eq!(t.len(), body.len(), "message {i}"),
            other => panic!("message {i}: {other:?}"),
        }
    }
    wait_for_log(&ng, "martd: closing a streaming subscriber").await;
    assert!(
        slow.drained_to_close_within(Duration::from_secs(5)).await,
        "the slow socket is closed"
    );
    p.wait_listeners("sw", 1).await;
    ng.finish();
}
