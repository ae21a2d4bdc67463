//! Per-message expiry (`expire` / `X-Martd-Expire`): a message lives its own seconds,
//! whatever its channel's life, and leaves the channel then even if nothing touches it.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_lives_its_own_seconds() {
    let ng = Nginx::start(api_conf("        martd_message_timeout 1h;"));
    let w = ng.worker_pids();
    let mut p = Conn::open_on(ng.port, w[0]).await;
    let m1 = p.publish_id("/pub?channel=x1&accept=json", "m1").await;
    let m2 = p.publish_id("/pub?channel=x1&expire=1", "m2").await;
    let r = p
        .send(
            "POST",
            "/pub?channel=x1",
            &[("X-Martd-Expire", "1"), ("accept", "application/json")],
            "m3",
        )
        .await;
    assert!(r.status == 201 || r.status == 202, "{}", r.text());
    let m4 = p.publish_id("/pub?channel=x1", "m4").await;
    // A channel that lives a second keeps a message that asks for more.
    p.publish_id("/pub?channel=x2&life=1", "short channel").await;
    let keep = p.publish_id("/pub?channel=x2&expire=60", "kept").await;
    assert_eq!(p.info("x1").await.map(|i| i.messages), Some(4));
    // Before their time, every message is there, in order.
    let mut c = Conn::open_on(ng.port, w[1]).await;
    let mut etag = format!("\"{}\"", m1 - 1);
    let mut got = Vec::new();
    for _ in 0..4 {
        let r = c.get("/sub?channel=x1", &[("If-None-Match", &etag)]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        got.push(r.text());
        etag = r.header("etag").unwrap().to_string();
    }
    assert_eq!(got, ["m1", "m2", "m3", "m4"]);
    assert!(m2 > m1 && m4 > m2);
    // After: the two 1 s messages are gone, the others stay (that garbage collection takes
    // them from a channel nothing touches is tested in core, store/tests_gc.rs).
    sleep_ms(2_200).await;
    let info = c.info("x1").await.expect("x1");
    assert_eq!(info.messages, 2, "{info:?}");
    let r = c.get("/sub?channel=x1", &[("If-None-Match", &format!("\"{m1}\""))]).await;
    assert_eq!((r.status, r.text().as_str()), (200, "m4"));
    let r = c.get("/sub?channel=x2", &[("If-None-Match", &format!("\"{}\"", keep - 1))]).await;
    assert_eq!((r.status, r.text().as_str()), (200, "kept"));
    assert_eq!(c.info("x2").await.map(|i| i.messages), Some(1));
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_expire_is_refused_and_nothing_is_stored() {
    let ng = Nginx::start(api_conf(
        "        martd_message_timeout 1h;
        location = /pub-unbounded { martd_push; martd_message_timeout 0; }",
    ));
    let mut p = Conn::open(ng.port).await;
    for (path, h, why) in [
        ("/pub?channel=x3&expire=soon", None, "invalid expire"),
        ("/pub?channel=x3&expire=-1", None, "invalid expire"),
        ("/pub?channel=x3&expire=0", None, "expire 0 is out of range: 1 to 3600 seconds"),
        ("/pub?channel=x3&expire=3601", None, "expire 3601 is out of range"),
        ("/pub?channel=x3", Some(("X-Martd-Expire", "1.5")), "invalid expire"),
        ("/jpub?channel=x3&expire=x", None, "invalid expire"),
    ] {
        let headers: Vec<(&str, &str)> = h.into_iter().collect();
        let r = p.send("POST", path, &headers, "body").await;
        assert_eq!(r.status, 400, "{path}: {}", r.text());
        assert!(r.text().contains(why), "{path}: {}", r.text());
    }
    assert!(p.info("x3").await.is_none(), "a refused publish stored something");
    // Where messages may live for ever, expire=0 asks for that.
    let r = p.send("POST", "/pub-unbounded?channel=x4&expire=0", &[], "for ever").await;
    assert_eq!(r.status, 202, "{}", r.text());
    ng.finish();
}
