//! Reload and graceful shutdown.

use super::*;

// 10. reload and shutdown

#[test]
fn reload_keeps_messages_and_ends_parked_listeners_quickly() {
    heavy_test(async {
        let mut ng = Nginx::start(std_conf());
        let mut c = Conn::open_probed(ng.port).await;
        for i in 1..=3 {
            c.publish("r", format!("r{i}")).await;
        }
        c.publish("r2", "other").await;
        let mut last = fetch(&mut c, &sub_path("r"), None, None).await;
        for _ in 0..2 {
            last = fetch(&mut c, &sub_path("r"), Some(&last.etag), None).await;
        }
        assert_eq!(last.text(), "r3");

        let conns = Conn::open_many(ng.port, 100).await;
        let per: HashSet<u32> = conns.iter().map(Conn::worker).collect();
        assert_eq!(per.len(), 2, "100 connections all on one worker");
        let ls: Vec<Pending> =
            conns.into_iter().map(|c| c.listen("r", Some(&last.etag), Some(&last.lm))).collect();
        c.wait_listeners("r", 100).await;
        drop(c);

        let took = ng.reload();
        assert!(took < Duration::from_secs(2), "reload with 100 parked listeners took {took:?}");
        for l in ls {
            let r = l.resp().await;
            assert_status(&r, 304, "parked listener at reload");
            assert_eq!(r.header("etag"), Some(last.etag.as_str()));
            assert_eq!(r.header("last-modified"), Some(last.lm.as_str()));
        }

        let (mut a, mut b) = Conn::pair(ng.port).await;
        let i = a.wait_listeners("r", 0).await;
        assert_eq!(i.messages, 3, "stored messages lost at reload");
        assert_eq!(b.info("r2").await.map(|i| i.messages), Some(1));
        let m = fetch(&mut b, &sub_path("r"), None, None).await;
        assert_eq!(m.text(), "r1");
        let m = fetch(&mut a, &sub_path("r"), Some(&m.etag), None).await;
        assert_eq!(m.text(), "r2");
        // Delivery across the new workers works.
        let l = Conn::open_on(ng.port, a.worker()).await.listen("r", Some(&last.etag), None);
        b.wait_listeners("r", 1).await;
        assert_published(&b.publish("r", "r4").await, 201, "publish after reload");
        assert_eq!(expect_msg(&l.resp().await).text(), "r4");
        ng.finish();
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_with_changed_shm_size_takes_new_zone() {
    let mut ng = Nginx::start(std_conf().http("martd_shm_size 8m;"));
    let mut c = Conn::open_probed(ng.port).await;
    c.publish("z", "kept").await;
    ng.reload();
    let mut c = Conn::open_probed(ng.port).await;
    assert_eq!(c.info("z").await.map(|i| i.messages), Some(1), "same size: zone kept");
    let id = c.publish_id(&pub_path("z"), "second").await;
    ng.set_conf(std_conf().http("martd_shm_size 16m;"));
    ng.reload();
    let mut c = Conn::open_probed(ng.port).await;
    assert!(c.info("z").await.is_none(), "changed size: a new, empty zone");
    let id2 = c.publish_id(&pub_path("z"), "new zone").await;
    assert!(id2 > id, "ids after a new zone: {id} then {id2}");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_answers_parked_listeners_304() {
    let mut ng = Nginx::start(std_conf());
    let (mut a, b) = Conn::pair(ng.port).await;
    let id = a.publish_id(&pub_path("g"), "x").await;
    let etag = format!("\"{id}\"");
    let la = Conn::open_on(ng.port, a.worker()).await.listen("g", Some(&etag), None);
    let lb = b.listen("g", Some(&etag), None);
    a.wait_listeners("g", 2).await;
    drop(a);
    let stopped = ng.stop();
    for l in [la, lb] {
        let r = l.resp().await;
        assert_status(&r, 304, "parked listener at graceful shutdown");
        assert_eq!(r.header("etag"), Some(etag.as_str()));
    }
    if let Err(e) = stopped {
        panic!("{e}");
    }
    ng.finish();
}
