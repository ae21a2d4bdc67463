//! EventSource: `text/event-stream`, one event per message with its id, multi-line bodies as
//! several `data:` lines, resume by `Last-Event-ID` or `last_event_id`, keep-alive comments,
//! the stream ending cleanly at reload and on a deleted channel, and slow readers closed.

use super::*;

fn es_conf(extra: &str) -> Conf {
    conf(&format!(
        "        location = /es {{ martd_listen eventsource; martd_channel_id $arg_channel; }}
{extra}"
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_in_order_across_workers_and_resume_without_loss() {
    let ng = Nginx::start(es_conf(""));
    let w = ng.worker_pids();
    let mut p = Conn::open_on(ng.port, w[0]).await;
    // Stored before the subscriber comes: sent first (no id given: everything stored).
    let early = publish(&mut p, "e1", "early").await;
    let s = open_on(ng.port, w[1], "/es?channel=e1", &[SSE]).await;
    assert_eq!(s.status, 200);
    assert_eq!(s.header("content-type"), Some("text/event-stream"));
    assert_eq!(s.header("cache-control"), Some("no-cache"));
    let mut ev = s.events();
    let first = ev.next(PROMPT).await.expect("the stored message");
    assert_eq!((first.id.as_str(), first.data.as_str()), (early.to_string().as_str(), "early"));
    p.wait_listeners("e1", 1).await;
    // Bodies with every kind of line break arrive as one event each, lines joined by \n.
    // (An empty body is sent too, but EventSource clients dispatch no event for it.)
    let bodies = ["one", "two\nlines", "cr\rlf\r\nmixed", "\n", "last"];
    let mut ids = Vec::new();
    for b in bodies {
        ids.push(publish(&mut p, "e1", b).await);
    }
    let got = ev.take(bodies.len(), PROMPT).await;
    for ((e, b), id) in got.iter().zip(bodies).zip(&ids) {
        assert_eq!(e.id, id.to_string());
        assert_eq!(e.data, b.replace("\r\n", "\n").replace('\r', "\n"));
    }
    // 300 messages in a row, none lost or repeated, in order.
    for i in 0..300 {
        ids.push(publish(&mut p, "e1", format!("m{i}")).await);
    }
    let got = ev.take(300, PROMPT).await;
    let want: Vec<String> = (0..300).map(|i| format!("m{i}")).collect();
    assert_eq!(got.iter().map(|e| e.data.clone()).collect::<Vec<_>>(), want);
    // Disconnect; what is published meanwhile comes on resume, from the header or argument.
    let last = ids.last().copied().unwrap_or_default();
    drop(ev);
    p.wait_listeners("e1", 0).await;
    let mut missed = Vec::new();
    for i in 0..5 {
        missed.push(publish(&mut p, "e1", format!("x{i}")).await);
    }
    let last_s = last.to_string();
    for (path, headers) in [
        ("/es?channel=e1".to_string(), vec![SSE, ("Last-Event-ID", last_s.as_str())]),
        (format!("/es?channel=e1&last_event_id={last}"), vec![SSE]),
    ] {
        let mut ev = open_on(ng.port, w[0], &path, &headers).await.events();
        let got = ev.take(5, PROMPT).await;
        let ids: Vec<String> = got.iter().map(|e| e.id.clone()).collect();
        assert_eq!(ids, missed.iter().map(|i| i.to_string()).collect::<Vec<_>>(), "{path}");
    }
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_resume_ids_and_requests_that_are_not_event_streams() {
    let ng = Nginx::start(es_conf(""));
    let mut c = Conn::open(ng.port).await;
    for (path, h) in [
        ("/es?channel=b1", ("Last-Event-ID", "x12")),
        ("/es?channel=b1&last_event_id=-1", ("X-Other", "1")),
        ("/es?channel=b1&last_event_id=99999999999999999999999", ("X-Other", "1")),
    ] {
        let r = c.get(path, &[SSE, h]).await;
        assert_eq!(r.status, 400, "{path} {h:?}: {}", r.text());
        assert!(r.text().contains("error"), "{}", r.text());
    }
    let r = c.get("/es?channel=b1", &[]).await;
    assert_eq!(r.status, 406, "{}", r.text());
    assert!(r.text().contains("EventSource only"), "{}", r.text());
    let r = c.get("/es", &[SSE]).await;
    assert_eq!(r.status, 400, "no channel: {}", r.text());
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_keep_idle_streams_alive() {
    let ng = Nginx::start(es_conf(
        "        location = /es-ping { martd_listen eventsource; martd_channel_id $arg_channel;
                               martd_eventsource_ping 200ms; }",
    ));
    let mut s =
        Streaming::open(Conn::open(ng.port).await, "/es-ping?channel=p1", &[SSE], QUICK).await;
    let pings = s.pieces(b":\n\n", 3, Duration::from_secs(5)).await;
    assert!(pings.iter().all(|p| p.is_empty()), "only comments: {pings:?}");
    // Without the directive: no comment while idle.
    let mut quiet =
        Streaming::open(Conn::open(ng.port).await, "/es?channel=p1", &[SSE], QUICK).await;
    assert!(!quiet.ends_within(Duration::from_millis(600)).await);
    assert!(quiet.buf.is_empty(), "{:?}", quiet.buf);
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_and_delete_end_streams_cleanly_and_nothing_is_lost() {
    let mut ng = Nginx::start(es_conf("        location = /pub-del { martd_push; }"));
    let w = ng.worker_pids();
    let mut p = Conn::open_on(ng.port, w[0]).await;
    let a = publish(&mut p, "r1", "before").await;
    let mut ev = open_on(ng.port, w[1], &format!("/es?channel=r1&last_event_id={}", a - 1), &[SSE])
        .await
        .events();
    assert_eq!(ev.next(PROMPT).await.map(|e| e.data), Some("before".into()));
    drop(p);
    let took = ng.reload();
    assert!(took < Duration::from_secs(5), "reload took {took:?}");
    assert!(ev.ends_within(Duration::from_secs(3)).await, "the stream ends at reload");
    let mut p = Conn::open_probed(ng.port).await;
    let b = publish(&mut p, "r1", "after").await;
    let mut ev = Streaming::open(
        Conn::open_probed(ng.port).await,
        "/es?channel=r1",
        &[SSE, ("Last-Event-ID", &a.to_string())],
        QUICK,
    )
    .await
    .events();
    let e = ev.next(PROMPT).await.expect("the message published across the reload");
    assert_eq!((e.id, e.data), (b.to_string(), "after".to_string()));
    // A deleted channel ends its streams.
    p.wait_listeners("r1", 1).await;
    let r = p.send("DELETE", "/pub?channel=r1", &[], "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(ev.ends_within(PROMPT).await, "the stream ends when its channel is deleted");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_is_closed_at_the_pending_cap_and_others_are_not_held_up() {
    let mut ng = Nginx::start(es_conf(
        "        location = /es-small { martd_listen eventsource; martd_channel_id $arg_channel;
                                martd_max_pending_bytes 64k; }",
    ));
    ng.allow_log("closing a streaming subscriber");
    let w = ng.worker_pids();
    // A client that never reads: a raw connection with a small receive buffer.
    let mut slow = RawConn::open_on_small_buffer(ng.port).await;
    slow.write(
        b"GET /es-small?channel=s1 HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n",
    )
    .await;
    let mut fast =
        Streaming::open(Conn::open_on(ng.port, w[0]).await, "/es-small?channel=s1", &[SSE], QUICK)
            .await
            .events();
    let mut p = Conn::open_on(ng.port, w[1]).await;
    p.wait_listeners("s1", 2).await;
    // More than the kernel's socket buffers take on loopback.
    let body = "y".repeat(64 * 1024);
    for i in 0..150 {
        publish(&mut p, "s1", body.clone()).await;
        let e = fast.next(PROMPT).await.unwrap_or_else(|| panic!("fast reader: message {i}"));
        assert_eq!(e.data.len(), body.len());
    }
    wait_for_log(&ng, "martd: closing a streaming subscriber").await;
    assert!(ng.log().contains("(martd_max_pending_bytes 65536)"), "{}", ng.log_tail(20));
    assert!(
        slow.drained_to_close_within(Duration::from_secs(5)).await,
        "the slow reader is closed"
    );
    p.wait_listeners("s1", 1).await;
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_long_polls_and_interval_polls_over_http2_and_tls() {
    use harness::h2::{connector_h2, H2Conn};
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_cert(dir.path());
    let tls_port = free_port();
    let ng = Nginx::start(conf("").http(&format!(
        "server {{
        listen 127.0.0.1:{tls_port} ssl reuseport;
        http2 on;
        server_name localhost;
        ssl_certificate {};
        ssl_certificate_key {};
        add_header X-Worker $pid always;
        location = /__worker {{ return 204; }}
        location = /es {{ martd_listen eventsource; martd_eventsource_ping 300ms; }}
        location = /sub {{ martd_listen longpoll interval; }}
        location = /poll {{ martd_listen interval; }}
    }}",
        cert.display(),
        key.display()
    )));
    let w = ng.worker_pids();
    let h2 = connector_h2(&ca);
    let c = H2Conn::open_on(tls_port, &h2, "/__worker", w[1]).await;
    let mut p = Conn::open_on(ng.port, w[0]).await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        let s = c.open_stream("/es?channel=h1", &[SSE]).await;
        assert_eq!((s.status, s.header("content-type")), (200, Some("text/event-stream")));
        streams.push(s.events());
    }
    let lp = c.spawn_get("/sub?channel=h1", &[], LONG);
    p.wait_listeners("h1", 4).await;
    let mut ids = Vec::new();
    for i in 0..50 {
        ids.push(publish(&mut p, "h1", format!("h2 {i}")).await);
    }
    for ev in &mut streams {
        let got = ev.take(50, PROMPT).await;
        assert_eq!(
            got.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
            ids.iter().map(|i| i.to_string()).collect::<Vec<_>>()
        );
    }
    let r = lp.await.expect("task").expect("long-poll over h2");
    assert_eq!((r.status, r.text().as_str()), (200, "h2 0"));
    let mut c2 = H2Conn::open_on(tls_port, &h2, "/__worker", w[0]).await;
    let last = format!("\"{}\"", ids[49]);
    let r = c2.get("/poll?channel=h1", &[("if-none-match", &last)], QUICK).await.expect("poll");
    assert_eq!(r.status, 304);
    // The client goes: its streams leave.
    drop(streams);
    c.shutdown();
    p.wait_listeners("h1", 0).await;
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publisher_names_events_with_x_martd_event() {
    let ng = Nginx::start(es_conf(
        "        location = /es-multi { martd_listen eventsource; martd_channel_id $arg_chs;
                               martd_channel_id_delimiter \",\"; }",
    ));
    let mut p = Conn::open(ng.port).await;
    let mut ev =
        Streaming::open(Conn::open(ng.port).await, "/es?channel=n1", &[SSE], QUICK).await.events();
    let mut multi =
        Streaming::open(Conn::open(ng.port).await, "/es-multi?chs=n1,n2", &[SSE], QUICK)
            .await
            .events();
    p.wait_listeners("n1", 2).await;
    let r = p.send("POST", "/pub?channel=n1", &[("X-Martd-Event", "update")], "u").await;
    assert!(r.status == 201 || r.status == 202, "{}", r.text());
    publish(&mut p, "n1", "plain").await;
    publish(&mut p, "n2", "other").await;
    let got = ev.take(2, PROMPT).await;
    assert_eq!((got[0].event.as_str(), got[0].data.as_str()), ("update", "u"));
    assert_eq!((got[1].event.as_str(), got[1].data.as_str()), ("message", "plain"));
    // On several channels, an event without a name of its own is named after its channel.
    let got = multi.take(3, PROMPT).await;
    let names: Vec<_> = got.iter().map(|e| (e.event.as_str(), e.data.as_str())).collect();
    assert_eq!(names, vec![("update", "u"), ("n1", "plain"), ("n2", "other")]);
    // Names that cannot be an event's: 400, and nothing is published.
    let long = "e".repeat(1025);
    for (v, why) in [("a\tb", "control character"), (long.as_str(), "longer than 1024")] {
        let r = p.send("POST", "/pub?channel=n1", &[("X-Martd-Event", v)], "no").await;
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(r.text().contains(why), "{}", r.text());
    }
    publish(&mut p, "n1", "after").await;
    assert_eq!(ev.next(PROMPT).await.map(|e| e.data), Some("after".into()));
    ng.finish();
}
