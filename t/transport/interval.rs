//! Interval-poll (`martd_listen interval`): answered at once, `304` when nothing is newer; for
//! `martd_listen json interval` too.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_at_once_with_the_next_message_or_304() {
    let ng = Nginx::start(conf(
        "        location = /poll { martd_listen interval; martd_channel_id $arg_channel; }
        location = /jpoll { martd_listen json interval; }",
    ));
    let mut p = Conn::open(ng.port).await;
    // Nothing yet: 304 at once, and no listener is counted.
    let r = p.get("/poll?channel=i1", &[]).await;
    assert_eq!(r.status, 304);
    assert!(p.info("i1").await.is_none_or(|i| i.listeners == 0));
    let a = publish(&mut p, "i1", "a").await;
    let b = publish(&mut p, "i1", "b").await;
    let r = p.get("/poll?channel=i1", &[]).await;
    assert_eq!((r.status, r.text().as_str()), (200, "a"));
    assert_eq!(r.header("Etag"), Some(format!("\"{a}\"").as_str()));
    let inm = format!("\"{a}\"");
    let r = p.get("/poll?channel=i1", &[("If-None-Match", &inm)]).await;
    assert_eq!((r.status, r.text().as_str()), (200, "b"));
    let inm = format!("\"{b}\"");
    let r = p.get("/poll?channel=i1", &[("If-None-Match", &inm)]).await;
    assert_eq!(r.status, 304);
    // The JSON API: every newer message of every channel, or 304.
    let r = p.get(&format!("/jpoll?cid=x&i1={a}&i2=0"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON");
    assert_eq!(v["channels"]["i1"]["payload"], serde_json::json!(["b"]));
    assert!(v["channels"]["i2"].is_null());
    let r = p.get(&format!("/jpoll?cid=x&i1={b}&i2=0"), &[]).await;
    assert_eq!(r.status, 304);
    ng.finish();
}
