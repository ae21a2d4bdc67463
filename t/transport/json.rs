//! `martd_listen json` with streaming transports: martd's multi-channel listen request
//! (`?cid=..&chanA=ETAG&chanB=ETAG`) over EventSource, WebSocket and a chunked stream, each
//! message in the JSON envelope of the long-poll reply, resumed by `Last-Event-ID`.

use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use super::websocket::{next_msg, ws_open};
use super::*;

fn json_conf() -> Conf {
    conf(
        "        location = /j { martd_listen json longpoll eventsource websocket stream;
                        martd_max_channels_per_request 3; }
        location = /j-es { martd_listen json eventsource; }
        location = /j-st { martd_listen json stream; }",
    )
}

/// The one channel of a streamed envelope: (name, etag, payload).
fn one(data: &[u8]) -> (String, String, Value) {
    let v: Value = serde_json::from_slice(data)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(data)));
    let chans = v["channels"].as_object().expect("channels");
    assert_eq!(chans.len(), 1, "one channel per message: {v}");
    let (name, c) = chans.iter().next().expect("a channel");
    let etag = c["etag"].as_str().expect("etag").to_string();
    let payload = c["payload"].as_array().expect("payload");
    assert_eq!(payload.len(), 1, "one message: {v}");
    (name.clone(), etag, payload[0].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_streaming_transport_carries_the_json_envelope_and_resumes() {
    let ng = Nginx::start(json_conf());
    let w = ng.worker_pids();
    let mut p = Conn::open_on(ng.port, w[0]).await;
    // Stored before: `ja` from the start, `jb` past its first message, `jc` nothing stored.
    let a0 = publish(&mut p, "ja", "a0").await;
    let b0 = publish(&mut p, "jb", "b0").await;
    let b1 = publish(&mut p, "jb", "b1").await;
    let path = format!("/j?cid=t&ja=0&jb={b0}&jc=0");
    let es = open_on(ng.port, w[1], &path, &[SSE]).await;
    assert_eq!(es.header("content-type"), Some("text/event-stream"));
    let mut st = open_on(ng.port, w[0], &path.replacen("/j?", "/j-st?", 1), &[]).await;
    let (mut ws, _) = ws_open(ng.port, &path).await;
    for ch in ["ja", "jb", "jc"] {
        p.wait_listeners(ch, 3).await;
    }
    // Live ones from both workers, a binary one as base64.
    let mut p2 = Conn::open_on(ng.port, w[1]).await;
    let mut want =
        vec![("ja".to_string(), a0, Value::from("a0")), ("jb".to_string(), b1, Value::from("b1"))];
    for i in 0..30 {
        let ch = ["ja", "jb", "jc"][i % 3];
        let c = if i % 2 == 0 { &mut p } else { &mut p2 };
        let body = format!("{ch} {i}\nline two");
        want.push((ch.to_string(), publish(c, ch, body.clone()).await, Value::from(body)));
    }
    let bin = publish(&mut p, "jc", &b"\xff\x00bin"[..]).await;
    want.push(("jc".to_string(), bin, serde_json::json!({"base64": "/wBiaW4="})));
    let want: Vec<(String, String, Value)> =
        want.into_iter().map(|(c, id, v)| (c, id.to_string(), v)).collect();
    let mut events = es.events();
    let got = events.take(want.len(), PROMPT).await;
    for (e, w) in got.iter().zip(&want) {
        assert_eq!(e.id, w.1, "the event id is the message id");
        assert_eq!(one(e.data.as_bytes()), *w);
    }
    let lines = st.pieces(b"\n", want.len(), PROMPT).await;
    assert_eq!(lines.iter().map(|l| one(l)).collect::<Vec<_>>(), want);
    for w in &want {
        match next_msg(&mut ws).await {
            Message::Text(t) => assert_eq!(one(t.as_bytes()), *w),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
    // An EventSource reconnecting with the same URL and its Last-Event-ID gets exactly what
    // came after it, on every channel.
    drop(events);
    let mid = &want[12].1;
    let mut again = open_on(ng.port, w[0], &path, &[SSE, ("Last-Event-ID", mid)]).await.events();
    let got = again.take(want.len() - 13, PROMPT).await;
    assert_eq!(got.iter().map(|e| one(e.data.as_bytes())).collect::<Vec<_>>(), want[13..].to_vec());
    let last = publish(&mut p, "ja", "after").await;
    let e = again.next(PROMPT).await.expect("a live event after the resume");
    assert_eq!(one(e.data.as_bytes()), ("ja".into(), last.to_string(), Value::from("after")));
    // A plain request on the same location is still the long-poll JSON reply.
    let r = Conn::open(ng.port).await.get(&format!("/j?cid=t&ja={last}&jb=0"), &[]).await;
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v: Value = serde_json::from_str(&r.text()).unwrap();
    assert!(v["channels"]["jb"]["payload"].as_array().is_some_and(|a| a.len() == 12), "{v}");
    drop((again, st, ws));
    p.wait_listeners("ja", 0).await;
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_json_stream_requests_get_400_or_406() {
    let ng = Nginx::start(json_conf());
    let mut c = Conn::open(ng.port).await;
    for (path, headers) in [
        ("/j?cid=t&ja=0", vec![SSE, ("Last-Event-ID", "abc")]),
        ("/j?cid=t&ja=0&last_event_id=-3", vec![SSE]),
        ("/j?cid=t&ja=0&jb=0&jc=0&jd=0", vec![SSE]),
        ("/j?cid=t&ja=x", vec![SSE]),
        ("/j?cid=t", vec![SSE]),
    ] {
        let r = c.get(path, &headers).await;
        assert_eq!(r.status, 400, "{path}: {}", r.text());
        assert!(r.text().contains("\"error\""), "{}", r.text());
    }
    // EventSource only: a long-poll is refused.
    let r = c.get("/j-es?cid=t&ja=0", &[]).await;
    assert_eq!(r.status, 406, "{}", r.text());
    let mut s = open_on(ng.port, ng.worker_pids()[0], "/j-es?cid=t&ja=0", &[SSE]).await;
    assert_eq!(s.status, 200);
    let id = publish(&mut Conn::open(ng.port).await, "ja", "only").await;
    let mut ev = std::mem::take(&mut s.buf);
    while !String::from_utf8_lossy(&ev).contains("\n\n") {
        ev.extend_from_slice(&s.chunk(PROMPT).await.expect("an event"));
    }
    let text = String::from_utf8_lossy(&ev).to_string();
    assert!(text.starts_with(&format!("id: {id}\ndata: ")), "{text}");
    ng.finish();
}
