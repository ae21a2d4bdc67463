//! Aborted listeners and bad input.

use super::*;
use crate::crash::check_all_workers_deliver;

// 13. aborted listeners

#[test]
fn abort_thousand_parked_listeners() {
    heavy_test(async {
        let ng = Nginx::start(std_conf());
        let mut c = Conn::open_probed(ng.port).await;
        let mut etag: Option<String> = None;
        for round in 0..2 {
            let conns = Conn::open_many(ng.port, 1000).await;
            let mut per: HashMap<u32, usize> = HashMap::new();
            for x in &conns {
                *per.entry(x.worker()).or_default() += 1;
            }
            assert_eq!(per.len(), 2, "1000 connections on one worker: {per:?}");
            let ls: Vec<Pending> =
                conns.into_iter().map(|x| x.listen("ab", etag.as_deref(), None)).collect();
            c.wait_info("ab", "1000 listeners", |i| i.is_some_and(|i| i.listeners == 1000)).await;
            assert!(ls.iter().all(|l| !l.is_finished()));
            drop(ls);
            c.wait_listeners("ab", 0).await;
            // Nobody is left waiting anywhere: a publish finds no listener.
            let r = c.publish("ab", format!("round {round}")).await;
            assert_published(&r, 202, "publish after every listener aborted");
            let m = fetch(&mut c, &sub_path("ab"), etag.as_deref(), None).await;
            assert_eq!(m.text(), format!("round {round}"));
            etag = Some(m.etag);
        }
        check_all_workers_deliver(&ng, "ab2").await;
        ng.finish();
    });
}

// 14. bad input

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_empty_channel_id_400() {
    let ng = Nginx::start(std_conf());
    let mut c = Conn::open_probed(ng.port).await;
    for path in
        ["/pub", "/pub?channel=", "/pub?other=1", "/sub", "/sub?channel=", "/sub?x=&channel="]
    {
        let r = c.get(path, &[]).await;
        assert_one_line_error(&r, 400, &format!("GET {path}"));
    }
    for path in ["/pub", "/pub?channel="] {
        let r = c.send("POST", path, &[], "body").await;
        assert_one_line_error(&r, 400, &format!("POST {path}"));
        let r = c.send("DELETE", path, &[], "").await;
        assert_one_line_error(&r, 400, &format!("DELETE {path}"));
    }
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_id_length_limit() {
    let ng = Nginx::start(Conf::new(&format!(
        "        martd_max_channel_id_length 16;\n{}        location = /pubd {{ martd_push; martd_max_channel_id_length 1024; }}\n",
        pubsub("", "")
    )));
    let mut c = Conn::open_probed(ng.port).await;
    let ok = "a".repeat(16);
    let long = "a".repeat(17);
    assert_published(&c.publish(&ok, "fits").await, 202, "16-byte id");
    assert_one_line_error(&c.publish(&long, "x").await, 400, "17-byte id on publish");
    assert_one_line_error(&c.get(&sub_path(&long), &[]).await, 400, "17-byte id on listen");
    assert_one_line_error(&c.get(&pub_path(&long), &[]).await, 400, "17-byte id on info");
    assert_eq!(fetch(&mut c, &sub_path(&ok), None, None).await.text(), "fits");
    let ok = "b".repeat(1024);
    let long = "b".repeat(1025);
    let r = c.send("POST", &format!("/pubd?channel={ok}"), &[], "k").await;
    assert_status(&r, 202, "1024-byte id");
    let r = c.send("POST", &format!("/pubd?channel={long}"), &[], "k").await;
    assert_one_line_error(&r, 400, "1025-byte id");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_client_max_body_size_413() {
    let ng = Nginx::start(Conf::new(&pubsub("client_max_body_size 1k;", "")));
    let mut c = Conn::open_probed(ng.port).await;
    let r = c.send("POST", &pub_path("big"), &[], vec![b'x'; 2000]).await;
    assert_status(&r, 413, "body over client_max_body_size");
    let mut c = Conn::open_probed(ng.port).await;
    let chunks: Vec<Bytes> = (0..4).map(|_| Bytes::from(vec![b'y'; 600])).collect();
    let r = c
        .try_request(request("POST", &pub_path("big"), &[], chunked(chunks)), QUICK)
        .await
        .expect("chunked POST");
    assert_status(&r, 413, "chunked body over client_max_body_size");
    let mut c = Conn::open_probed(ng.port).await;
    assert!(c.info("big").await.is_none_or(|i| i.messages == 0), "a refused body was stored");
    assert_published(&c.publish("big", vec![b'x'; 1000]).await, 202, "body under the limit");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_larger_than_the_zone_413_without_unlimited_allocation() {
    // No nginx limit on the body: martd itself refuses what no zone could hold, before any
    // allocation of the body's size, and the worker lives on.
    let ng = Nginx::start(
        Conf::new(&pubsub("client_max_body_size 0; client_body_buffer_size 16k;", ""))
            .http("martd_shm_size 512k;"),
    );
    let mut c = Conn::open_probed(ng.port).await;
    let before = ng.worker_pids();
    let r = c.send("POST", &pub_path("huge"), &[], vec![b'z'; 3 << 20]).await;
    assert_one_line_error(&r, 413, "body larger than the zone");
    let mut c = Conn::open_probed(ng.port).await;
    assert_published(&c.publish("huge", vec![b'x'; 1000]).await, 202, "a small body after");
    assert_eq!(ng.worker_pids(), before, "a worker was replaced");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_listeners_across_workers_403() {
    let ng = Nginx::start(Conf::new(&pubsub("", "martd_max_listeners 1;")));
    let (mut a, b) = Conn::pair(ng.port).await;
    let first = Conn::open_on(ng.port, a.worker()).await.listen("ml", None, None);
    a.wait_listeners("ml", 1).await;
    let r = b.listen("ml", None, None).resp().await;
    assert_status(&r, 403, "second listener on another worker");
    let r = Conn::open_on(ng.port, a.worker()).await.listen("ml", None, None).resp().await;
    assert_status(&r, 403, "second listener on the same worker");
    a.wait_listeners("ml", 1).await;
    assert_published(&a.publish("ml", "one").await, 201, "publish");
    let m = expect_msg(&first.resp().await);
    // The slot is free again.
    a.wait_listeners("ml", 0).await;
    let again = Conn::open_not_on(ng.port, a.worker()).await.listen("ml", Some(&m.etag), None);
    a.wait_listeners("ml", 1).await;
    assert_published(&a.publish("ml", "two").await, 201, "publish");
    assert_eq!(expect_msg(&again.resp().await).text(), "two");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorized_channels_only() {
    let ng = Nginx::start(Conf::new(&pubsub("", "martd_authorized_channels_only on;")));
    let (mut a, mut b) = Conn::pair(ng.port).await;
    assert_status(&b.get(&sub_path("unk"), &[]).await, 403, "unknown channel");
    assert!(a.info("unk").await.is_none(), "a refused listener created the channel");
    a.publish("auth", "hi").await;
    let m = fetch(&mut b, &sub_path("auth"), None, None).await;
    assert_eq!(m.text(), "hi");
    let l = Conn::open_on(ng.port, b.worker()).await.listen("auth", Some(&m.etag), None);
    a.wait_listeners("auth", 1).await;
    assert_published(&a.publish("auth", "next").await, 201, "publish");
    assert_eq!(expect_msg(&l.resp().await).text(), "next");
    assert_status(&a.send("DELETE", &pub_path("auth"), &[], "").await, 200, "DELETE");
    assert_status(&b.get(&sub_path("auth"), &[]).await, 403, "removed channel");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_body_is_a_message() {
    let ng = Nginx::start(std_conf());
    let (mut a, b) = Conn::pair(ng.port).await;
    let r = a.send("POST", &pub_path("e"), &[], "").await;
    assert_eq!(assert_published(&r, 202, "empty publish").messages, 1);
    let (b, r) = b.listen("e", None, None).conn_resp().await;
    let m = expect_msg(&r);
    assert!(m.body.is_empty());
    let l = b.listen("e", Some(&m.etag), None);
    a.wait_listeners("e", 1).await;
    assert_published(&a.send("PUT", &pub_path("e"), &[], "").await, 201, "empty PUT");
    let m2 = expect_msg(&l.resp().await);
    assert!(m2.body.is_empty() && m2.id > m.id);
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_spooled_body_intact() {
    let ng = Nginx::start(Conf::new(&pubsub(
        "client_body_buffer_size 8k; client_max_body_size 4m;",
        "",
    )));
    let (mut a, mut b) = Conn::pair(ng.port).await;
    let big = noise(1 << 20, 7);
    let ct = "application/octet-stream";
    let r = a.send("POST", &pub_path("big"), &[("content-type", ct)], big.clone()).await;
    assert_published(&r, 202, "1 MB publish");
    let m = fetch(&mut b, &sub_path("big"), None, None).await;
    assert_eq!(m.body.len(), big.len());
    assert!(m.body == big, "1 MB body corrupted");
    assert_eq!(m.content_type.as_deref(), Some(ct));

    // To a waiting listener on the other worker, chunked, by PUT.
    let big2 = noise((1 << 20) + 12345, 8);
    let l = Conn::open_on(ng.port, b.worker()).await.listen("big", Some(&m.etag), None);
    a.wait_listeners("big", 1).await;
    let chunks: Vec<Bytes> = big2.chunks(100_000).map(Bytes::copy_from_slice).collect();
    let r = a
        .try_request(request("PUT", &pub_path("big"), &[], chunked(chunks)), QUICK)
        .await
        .expect("chunked PUT");
    assert_published(&r, 201, "chunked 1 MB PUT");
    let m2 = expect_msg(&l.resp().await);
    assert!(m2.body == big2, "chunked 1 MB body corrupted ({} bytes)", m2.body.len());
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_type_and_odd_channel_ids() {
    let ng = Nginx::start(std_conf());
    let mut c = Conn::open_probed(ng.port).await;
    let long_ct = format!("application/x-{}", "t".repeat(2000));
    for (i, ct) in ["application/vnd.martd+json; charset=utf-8", "text/html", long_ct.as_str()]
        .into_iter()
        .enumerate()
    {
        let ch = format!("ct{i}");
        c.send("POST", &pub_path(&ch), &[("content-type", ct)], "<b>x</b>").await;
        let m = fetch(&mut c, &sub_path(&ch), None, None).await;
        assert_eq!(m.content_type.as_deref(), Some(ct), "Content-Type not preserved");
    }
    let odd = ["%00", "a%0d%0ab", "..", "%2e%2e", "%C3%A9", "%FF%FE", "a/b", "ALL", "*", "a%20b"];
    for (i, ch) in odd.iter().enumerate() {
        let r = c.publish(ch, format!("odd {i}")).await;
        assert_published(&r, 202, &format!("publish to {ch:?}"));
    }
    for (i, ch) in odd.iter().enumerate() {
        let m = fetch(&mut c, &sub_path(ch), None, None).await;
        assert_eq!(m.text(), format!("odd {i}"), "channel {ch:?}");
        assert_eq!(c.info(ch).await.map(|i| i.messages), Some(1), "channel {ch:?}");
    }
    ng.finish();
}
