//! JSON listeners whose client goes away, whose worker is killed, and channels whose size is
//! lowered.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_gone_leave_every_channel() {
    let ng = Nginx::start(api_conf(""));
    let mut p = Conn::open_probed(ng.port).await;
    let conns = Conn::open_many(ng.port, 30).await;
    let mut ls: Vec<Pending> = conns
        .into_iter()
        .map(|c| c.spawn_get(&jsub("/jsub", &[("g1", "0"), ("g2", "0"), ("g3", "0")]), &[], LONG))
        .collect();
    for ch in ["g1", "g2", "g3"] {
        p.wait_listeners(ch, 30).await;
    }
    // 20 leave (some of them on a connection with another request queued behind).
    ls.truncate(10);
    for ch in ["g1", "g2", "g3"] {
        p.wait_listeners(ch, 10).await;
    }
    let m = jpub(&mut p, "g3", "", "to ten").await;
    assert_eq!(m.listeners, 10, "{m:?}");
    for l in ls {
        let (_, r) = promptly(l, "a listener that stayed").await;
        expect_texts(&r, &[("g3", &["to ten"])], "a listener that stayed");
    }
    for ch in ["g1", "g2", "g3"] {
        p.wait_listeners(ch, 0).await;
    }
    let m = jpub(&mut p, "g1", "", "to nobody").await;
    assert_eq!(m.listeners, 0, "{m:?}");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_with_json_listeners_waiting() {
    let mut ng = Nginx::start(api_conf(""));
    ng.allow_log("exited on signal 9");
    ng.allow_log("was locked by");
    let w = ng.worker_pids();
    let (victim, survivor) = (w[0], w[1]);
    let mut p = Conn::open_on(ng.port, survivor).await;
    jpub(&mut p, "k1", "one2one=true", "").await;
    let mut dead = Vec::new();
    dead.push(listen_on(ng.port, victim, &jsub("/jsub", &[("k1", "0"), ("k2", "0")])).await);
    for _ in 0..3 {
        dead.push(listen_on(ng.port, victim, &jsub("/jsub", &[("k2", "0"), ("k3", "0")])).await);
    }
    let live = listen_on(ng.port, survivor, &jsub("/jsub", &[("k3", "0")])).await;
    p.wait_listeners("k1", 1).await;
    p.wait_listeners("k2", 4).await;
    p.wait_listeners("k3", 4).await;
    ng.kill_worker(victim, libc::SIGKILL);
    ng.wait_respawn(victim);
    // The dead worker's listeners are no longer counted, on every channel.
    p.wait_listeners("k1", 0).await;
    p.wait_listeners("k2", 0).await;
    p.wait_listeners("k3", 1).await;
    drop(dead);
    // The one2one channel takes a new listener (on the respawned worker) and delivers to it.
    let now = ng.worker_pids();
    let respawned = *now.iter().find(|x| **x != survivor).unwrap();
    let l = listen_on(ng.port, respawned, &jsub("/jsub", &[("k1", "0")])).await;
    p.wait_listeners("k1", 1).await;
    let m = jpub(&mut p, "k1", "", "after the kill").await;
    assert_eq!(m.listeners, 1);
    let (_, r) = promptly(l, "one2one listener after the kill").await;
    expect_texts(&r, &[("k1", &["after the kill"])], "one2one after the kill");
    let m = jpub(&mut p, "k3", "", "to the survivor").await;
    assert_eq!(m.listeners, 1);
    let (_, r) = promptly(live, "listener on the survivor").await;
    expect_texts(&r, &[("k3", &["to the survivor"])], "survivor");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lowering_the_size_drops_the_oldest() {
    let ng = Nginx::start(api_conf(""));
    let mut c = Conn::open_probed(ng.port).await;
    for i in 1..=6 {
        jpub(&mut c, "low", "", format!("m{i}")).await;
    }
    jpub(&mut c, "low", "size=2", "").await;
    let r = c.get(&jsub("/jsub", &[("low", "0")]), &[]).await;
    expect_texts(&r, &[("low", &["m5", "m6"])], "size lowered to 2 by an attribute-only push");
    assert_eq!(jinfo(&mut c, "low").await.map(|i| i.messages), Some(2));
    jpub(&mut c, "low", "size=1", "m7").await;
    let r = c.get(&jsub("/jsub", &[("low", "0")]), &[]).await;
    expect_texts(&r, &[("low", &["m7"])], "size lowered to 1 with a message");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_made_channels_go_attribute_made_ones_stay() {
    let ng = Nginx::start(api_conf(""));
    let mut c = Conn::open_probed(ng.port).await;
    // A keyed channel made by an attribute-only push, and one made by a JSON listener alone.
    jpub(&mut c, "made-by-push", "key=k3y&size=4", "").await;
    let r = within(
        PROMPT + Duration::from_secs(1),
        "1 s listener",
        c.get(&jsub("/jsub-short", &[("made-by-push", "0"), ("made-by-listener", "0")]), &[]),
    )
    .await;
    expect_empty(&r, "listener on both");
    let deadline = Instant::now() + Duration::from_secs(10);
    while jinfo(&mut c, "made-by-listener").await.is_some() {
        assert!(Instant::now() < deadline, "a channel only a listener made is still there");
        sleep_ms(100).await;
    }
    sleep_ms(1500).await;
    let i = jinfo(&mut c, "made-by-push").await;
    assert!(i.is_some(), "the attribute-only channel went with the listener's channel");
    let r = c.send("POST", "/jpub?channel=made-by-push", &[], "x").await;
    expect_json_error(&r, 403, "its key still holds");
    for n in 0..6 {
        jpub(&mut c, "made-by-push", "key=k3y", format!("m{n}")).await;
    }
    assert_eq!(jinfo(&mut c, "made-by-push").await.map(|i| i.messages), Some(4), "its size");
    ng.finish();
}
