//! Lingering multi-channel listeners: a JSON listener answered on a keep-alive connection
//! stays counted on its channels until that connection's next request takes it over (same
//! channels, the ids it was given), another request or news on one of its channels releases
//! it, or about a second passes. Nothing is lost or answered twice on the way.

use super::*;

fn counted(i: Option<Info>) -> u64 {
    i.map_or(0, |i| i.listeners)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answered_listener_lingers_and_its_connection_takes_it_over() {
    let mut conf = api_conf("");
    conf.main = "error_log logs/debug.log debug;".to_string();
    let ng = Nginx::start(conf);
    let log_path = ng.prefix().join("logs/debug.log");
    let taken = || {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        log.lines().filter(|l| l.contains("taken over by its connection")).count()
    };
    let (mut p, c) = Conn::pair(ng.port).await;
    let l = c.spawn_get(&jsub("/jsub", &[("g1", "0"), ("g2", "0"), ("g3", "0")]), &[], LONG);
    for ch in ["g1", "g2", "g3"] {
        p.wait_listeners(ch, 1).await;
    }
    let debug = std::fs::read_to_string(&log_path).unwrap_or_default().contains("[debug]");
    let m2 = jpub(&mut p, "g2", "", "to g2").await;
    let (c, r) = promptly(l, "multi-channel listener").await;
    expect_texts(&r, &[("g2", &["to g2"])], "multi-channel listener");
    // Answered, it lingers: still counted on every channel.
    for ch in ["g1", "g2", "g3"] {
        assert_eq!(counted(jinfo(&mut p, ch).await), 1, "lingering listener on {ch}");
    }
    // The connection's next request, with the ids it was given, takes it over.
    let e2 = m2.etag.to_string();
    let l = c.spawn_get(&jsub("/jsub", &[("g1", "0"), ("g2", &e2), ("g3", "0")]), &[], LONG);
    if debug {
        wait_until("the next request takes the listener over", QUICK, || taken() == 1).await;
    } else {
        eprintln!("nginx has no debug logging: the take-over is not observable");
        sleep_ms(300).await;
    }
    for ch in ["g1", "g2", "g3"] {
        assert_eq!(counted(jinfo(&mut p, ch).await), 1, "taken-over listener on {ch}");
    }
    let m3 = jpub(&mut p, "g3", "", "to g3").await;
    assert_eq!(m3.listeners, 1);
    let (c, r) = promptly(l, "taken-over listener").await;
    expect_texts(&r, &[("g3", &["to g3"])], "taken-over listener");
    // Another request on the connection releases what lingers at once.
    let l = c.spawn_get(&jsub("/jsub", &[("g4", "0")]), &[], LONG);
    p.wait_listeners("g4", 1).await;
    for ch in ["g1", "g2", "g3"] {
        assert_eq!(counted(jinfo(&mut p, ch).await), 0, "{ch} after another request");
    }
    jpub(&mut p, "g4", "", "to g4").await;
    let (_, r) = promptly(l, "listener of g4").await;
    expect_texts(&r, &[("g4", &["to g4"])], "listener of g4");
    if debug {
        assert_eq!(taken(), 1, "only the request with the same channels took one over");
    }
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn news_while_a_listener_lingers_is_never_lost() {
    let ng = Nginx::start(api_conf(""));
    let (mut p, c) = Conn::pair(ng.port).await;
    let mut q = Conn::open_probed(ng.port).await;
    let chans = ["n1", "n2"];
    let l = c.spawn_get(&jsub("/jsub", &[("n1", "0"), ("n2", "0")]), &[], LONG);
    p.wait_listeners("n1", 1).await;
    p.wait_listeners("n2", 1).await;
    let m1 = jpub(&mut p, "n1", "", "one").await;
    let (mut c, r) = promptly(l, "listener of n1 and n2").await;
    expect_texts(&r, &[("n1", &["one"])], "listener of n1 and n2");
    // A message on the other channel before the connection asks again: the lingering
    // listener is released by its wake-up, and the next request gets the message at once.
    let m2 = jpub(&mut p, "n2", "", "two").await;
    assert_eq!(m2.listeners, 1, "the lingering listener is counted");
    p.wait_listeners("n1", 0).await;
    let mut etags = [m1.etag, 0];
    let r = c.get(&jsub("/jsub", &[("n1", &etags[0].to_string()), ("n2", "0")]), &[]).await;
    expect_texts(&r, &[("n2", &["two"])], "the request after news while lingering");
    etags[1] = m2.etag;
    // The race: a publish on one channel while the answered connection asks again.
    for i in 0..30 {
        let hot = i % 2;
        let path = jsub("/jsub", &[("n1", &etags[0].to_string()), ("n2", &etags[1].to_string())]);
        let l = c.spawn_get(&path, &[], LONG);
        if i % 3 == 0 {
            sleep_ms(20).await;
        }
        let a = jpub(&mut p, chans[hot], "", format!("a{i}")).await;
        let (c2, r) = promptly(l, &format!("round {i}: listener")).await;
        let got = expect_channels(&r, &format!("round {i}"));
        assert_eq!(got[chans[hot]].texts(), vec![format!("a{i}")], "round {i}: {got:?}");
        etags[hot] = a.etag;
        if let Some(b) = got.get(chans[1 - hot]) {
            panic!("round {i}: {} got {:?} twice", chans[1 - hot], b.texts());
        }
        // Ask again and publish on the other channel at the same time.
        let path = jsub("/jsub", &[("n1", &etags[0].to_string()), ("n2", &etags[1].to_string())]);
        let other = chans[1 - hot];
        let l = c2.spawn_get(&path, &[], LONG);
        let b = jpub(&mut q, other, "", format!("b{i}")).await;
        let (c3, r) = promptly(l, &format!("round {i}: listener asking again")).await;
        expect_texts(&r, &[(other, &[&format!("b{i}")])], &format!("round {i}: b{i}"));
        etags[1 - hot] = b.etag;
        c = c3;
    }
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lingering_ends_when_the_connection_does_not_come_back_and_is_not_for_every_location() {
    let ng = Nginx::start(api_conf(
        "        location = /jsub-max { martd_listen json; martd_max_listeners 100; }
        location = /jsub-first { martd_listen json; martd_listener_concurrency first; }
",
    ));
    let (mut p, c) = Conn::pair(ng.port).await;
    let l = c.spawn_get(&jsub("/jsub", &[("x1", "0"), ("x2", "0")]), &[], LONG);
    p.wait_listeners("x2", 1).await;
    jpub(&mut p, "x1", "", "x").await;
    let (c, r) = promptly(l, "listener of x1 and x2").await;
    expect_texts(&r, &[("x1", &["x"])], "listener of x1 and x2");
    assert_eq!(counted(jinfo(&mut p, "x2").await), 1, "lingering");
    drop(c);
    // Released within about two seconds: the linger time, then the once-a-second sweep.
    let start = Instant::now();
    p.wait_listeners("x2", 0).await;
    p.wait_listeners("x1", 0).await;
    eprintln!("lingering listener released after {:?}", start.elapsed());
    // Locations with a listener limit or another concurrency rule do not linger.
    for loc in ["/jsub-max", "/jsub-first"] {
        let (a, b) = (format!("y{}a", &loc[6..]), format!("y{}b", &loc[6..]));
        let c = Conn::open_not_on(ng.port, p.worker()).await;
        let l = c.spawn_get(&jsub(loc, &[(&a, "0"), (&b, "0")]), &[], LONG);
        p.wait_listeners(&b, 1).await;
        jpub(&mut p, &a, "", "y").await;
        let (_c, r) = promptly(l, loc).await;
        expect_texts(&r, &[(&a, &["y"])], loc);
        for ch in [&a, &b] {
            assert_eq!(counted(jinfo(&mut p, ch).await), 0, "{loc}: {ch} right after the answer");
        }
    }
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_and_a_killed_worker_with_lingering_listeners() {
    let mut ng = Nginx::start(api_conf(""));
    let (mut p, c) = Conn::pair(ng.port).await;
    let l = c.spawn_get(&jsub("/jsub", &[("k1", "0"), ("k2", "0")]), &[], LONG);
    p.wait_listeners("k2", 1).await;
    jpub(&mut p, "k1", "", "k").await;
    let (c, _) = promptly(l, "listener of k1 and k2").await;
    assert_eq!(counted(jinfo(&mut p, "k2").await), 1, "lingering");
    drop(p);
    let took = ng.reload();
    assert!(took < Duration::from_secs(5), "reload took {took:?}");
    drop(c);
    let mut p = Conn::open_probed(ng.port).await;
    p.wait_listeners("k2", 0).await;
    // A worker killed while a listener lingers there: its counts go with it.
    let (mut p, c) = Conn::pair(ng.port).await;
    let victim = c.worker();
    let l = c.spawn_get(&jsub("/jsub", &[("k3", "0"), ("k4", "0")]), &[], LONG);
    p.wait_listeners("k4", 1).await;
    jpub(&mut p, "k3", "", "k").await;
    let (_c, _) = promptly(l, "listener of k3 and k4").await;
    assert_eq!(counted(jinfo(&mut p, "k4").await), 1, "lingering");
    ng.allow_log("exited on signal 9");
    ng.allow_log("was locked by");
    ng.kill_worker(victim, libc::SIGKILL);
    ng.wait_respawn(victim);
    p.wait_listeners("k4", 0).await;
    ng.finish();
}
