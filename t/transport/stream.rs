//! The chunked stream (`martd_listen stream`): every message's body then the separator, on
//! one long response; resume by `last_event_id` or `If-None-Match`.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_and_separators_in_order_across_workers_and_resume() {
    let ng = Nginx::start(conf(
        "        location = /st { martd_listen stream; martd_channel_id $arg_channel; }
        location = /st-sep { martd_listen stream; martd_channel_id $arg_channel;
                             martd_stream_separator \"\\r\\n--\\r\\n\"; }",
    ));
    let w = ng.worker_pids();
    let mut p = Conn::open_on(ng.port, w[0]).await;
    let first = publish(&mut p, "t1", "stored").await;
    let mut s = open_on(ng.port, w[1], "/st?channel=t1", &[]).await;
    assert_eq!(s.status, 200);
    assert_eq!(s.header("content-type"), Some("text/plain"));
    assert_eq!(s.header("transfer-encoding"), Some("chunked"));
    let mut sep = open_on(ng.port, w[0], "/st-sep?channel=t1", &[]).await;
    assert_eq!(s.pieces(b"\n", 1, PROMPT).await, vec![b"stored".to_vec()]);
    assert_eq!(sep.pieces(b"\r\n--\r\n", 1, PROMPT).await, vec![b"stored".to_vec()]);
    p.wait_listeners("t1", 2).await;
    let mut ids = vec![first];
    for i in 0..500 {
        ids.push(publish(&mut p, "t1", format!("line {i}")).await);
    }
    let want: Vec<Vec<u8>> = (0..500).map(|i| format!("line {i}").into_bytes()).collect();
    assert_eq!(s.pieces(b"\n", 500, PROMPT).await, want);
    assert_eq!(sep.pieces(b"\r\n--\r\n", 500, PROMPT).await, want);
    drop((s, sep));
    p.wait_listeners("t1", 0).await;
    let missed = publish(&mut p, "t1", "missed").await;
    let last = ids.last().copied().unwrap_or_default();
    let etag = format!("\"{last}\"");
    for (path, h) in [
        (format!("/st?channel=t1&last_event_id={last}"), vec![]),
        ("/st?channel=t1".to_string(), vec![("If-None-Match", etag.as_str())]),
    ] {
        let mut s = open_on(ng.port, w[1], &path, &h).await;
        assert_eq!(s.pieces(b"\n", 1, PROMPT).await, vec![b"missed".to_vec()], "{path}");
        assert!(!s.ends_within(std::time::Duration::from_millis(200)).await);
        assert!(s.buf.is_empty(), "only what was missed: {:?}", s.buf);
    }
    assert!(missed > last);
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transports_are_picked_per_request() {
    let ng = Nginx::start(conf(
        "        location = /any { martd_listen longpoll eventsource; martd_channel_id $arg_channel; }
        location = /poll-or-stream { martd_listen interval stream; martd_channel_id $arg_channel; }",
    ));
    let mut p = Conn::open(ng.port).await;
    publish(&mut p, "k1", "hello").await;
    // Long-poll: one message, then the connection serves the next request.
    let r = p.get("/any?channel=k1", &[]).await;
    assert_eq!((r.status, r.text().as_str()), (200, "hello"));
    // EventSource on the same location when asked for.
    let mut ev =
        Streaming::open(Conn::open(ng.port).await, "/any?channel=k1", &[SSE], QUICK).await.events();
    assert_eq!(ev.next(PROMPT).await.map(|e| e.data), Some("hello".into()));
    // interval before stream: a plain GET is an interval-poll there.
    let r = p.get("/poll-or-stream?channel=k1", &[]).await;
    assert_eq!((r.status, r.text().as_str()), (200, "hello"));
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_longer_than_the_buffer_reaches_open_streams_whole() {
    let ng = Nginx::start(conf(
        "        location = /pub-3 { martd_push; martd_message_buffer_length 3; }
        location = /st { martd_listen stream; }
        location = /es { martd_listen eventsource; }",
    ));
    let w = ng.worker_pids();
    let mut s = open_on(ng.port, w[1], "/st?channel=burst", &[]).await;
    let mut ev = open_on(ng.port, w[0], "/es?channel=burst", &[SSE]).await.events();
    let mut p = Conn::open_on(ng.port, w[0]).await;
    p.wait_listeners("burst", 2).await;
    // Published as fast as the publisher can, into a 3-message buffer, from two connections.
    let mut q = Conn::open_on(ng.port, w[1]).await;
    for i in 0..200 {
        let c = if i % 2 == 0 { &mut p } else { &mut q };
        c.publish_id("/pub-3?channel=burst", format!("b{i}")).await;
    }
    let want: Vec<Vec<u8>> = (0..200).map(|i| format!("b{i}").into_bytes()).collect();
    assert_eq!(s.pieces(b"\n", 200, PROMPT).await, want);
    let got: Vec<Vec<u8>> =
        ev.take(200, PROMPT).await.into_iter().map(|e| e.data.into_bytes()).collect();
    assert_eq!(got, want);
    // A newcomer gets only what the buffer keeps.
    let r = p.get("/sub?channel=burst", &[]).await;
    assert_eq!((r.status, r.text().as_str()), (200, "b197"));
    ng.finish();
}
