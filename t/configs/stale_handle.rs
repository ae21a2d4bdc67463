//! A detached listener's handle never answers a newer request on its connection.

use super::*;

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
