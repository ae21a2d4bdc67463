//! `martd_listener_concurrency` across workers.

use super::*;

// 5. listener concurrency

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_last_across_workers() {
    let ng = Nginx::start(Conf::new(&pubsub("", "martd_listener_concurrency last;")));
    let (mut a, b) = Conn::pair(ng.port).await;
    let (wa, wb) = (a.worker(), b.worker());
    let old = Conn::open_on(ng.port, wa).await.listen("cl", None, None);
    a.wait_listeners("cl", 1).await;
    let new = b.listen("cl", None, None);
    let r = old.resp().await;
    assert_status(&r, 409, "older listener displaced by a newer one on another worker");
    assert_eq!(r.worker(), wa);
    a.wait_listeners("cl", 1).await;
    assert!(!new.is_finished());
    assert_published(&a.publish("cl", "to the newest").await, 201, "publish");
    let r = new.resp().await;
    assert_eq!(r.worker(), wb);
    assert_eq!(expect_msg(&r).text(), "to the newest");

    // Same worker, other direction.
    let old = Conn::open_on(ng.port, wb).await.listen("cl2", None, None);
    a.wait_listeners("cl2", 1).await;
    let new = Conn::open_on(ng.port, wb).await.listen("cl2", None, None);
    assert_status(&old.resp().await, 409, "displaced on the same worker");
    let new2 = Conn::open_on(ng.port, wa).await.listen("cl2", None, None);
    assert_status(&new.resp().await, 409, "displaced from the other worker");
    a.wait_listeners("cl2", 1).await;
    assert_published(&a.publish("cl2", "last one").await, 201, "publish");
    assert_eq!(expect_msg(&new2.resp().await).text(), "last one");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_first_across_workers() {
    let ng = Nginx::start(Conf::new(&pubsub("", "martd_listener_concurrency first;")));
    let (mut a, b) = Conn::pair(ng.port).await;
    let wa = a.worker();
    let first = Conn::open_on(ng.port, wa).await.listen("cf", None, None);
    a.wait_listeners("cf", 1).await;
    let r = b.listen("cf", None, None).resp().await;
    assert_status(&r, 409, "newcomer on another worker while one waits");
    let r = Conn::open_on(ng.port, wa).await.listen("cf", None, None).resp().await;
    assert_status(&r, 409, "newcomer on the same worker while one waits");
    let i = a.wait_listeners("cf", 1).await;
    assert_eq!(i.listeners, 1);
    assert!(!first.is_finished(), "the first listener must keep waiting");
    assert_published(&a.publish("cf", "first wins").await, 201, "publish");
    let r = first.resp().await;
    assert_eq!(r.worker(), wa);
    assert_eq!(expect_msg(&r).text(), "first wins");
    // Once nobody waits, a newcomer is welcome again.
    a.wait_listeners("cf", 0).await;
    let etag = format!("\"{}\"", a.info("cf").await.unwrap().last_id.unwrap());
    let again = Conn::open_not_on(ng.port, wa).await.listen("cf", Some(&etag), None);
    a.wait_listeners("cf", 1).await;
    assert_published(&a.publish("cf", "again").await, 201, "publish");
    assert_eq!(expect_msg(&again.resp().await).text(), "again");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_broadcast_across_workers() {
    let ng = Nginx::start(Conf::new(&pubsub("", "martd_listener_concurrency broadcast;")));
    let (mut a, b) = Conn::pair(ng.port).await;
    let (wa, wb) = (a.worker(), b.worker());
    drop(b);
    let mut ls = Vec::new();
    for w in [wa, wa, wb, wb, wb] {
        ls.push((w, Conn::open_on(ng.port, w).await.listen("cb", None, None)));
    }
    a.wait_listeners("cb", 5).await;
    assert_published(&a.publish("cb", "everyone").await, 201, "publish");
    for (w, l) in ls {
        let r = l.resp().await;
        assert_eq!(r.worker(), w);
        assert_eq!(expect_msg(&r).text(), "everyone");
    }
    a.wait_listeners("cb", 0).await;
    ng.finish();
}
