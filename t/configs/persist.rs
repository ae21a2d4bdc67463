//! `martd_persist`: channels, messages, ids, attributes and keys survive a clean stop and
//! start, a SIGKILL of every nginx process (`sync=always`), and a damaged file (every valid
//! record before the damage); the file is compacted; a file that cannot be written refuses
//! publishes with `507` and a reason.

use super::*;

fn persist_conf(sync: &str) -> Conf {
    Conf::new(
        "        location = /pub { martd_push; }
        location = /sub { martd_listen; }",
    )
    .http(&format!("martd_persist persist {sync};"))
}

/// Publishes `m0`..`m{n-1}` on `ch`, each on a new connection, while nginx changes zones
/// (a reload into a new zone, a binary upgrade): a worker of the zone being replaced answers
/// `503` and the publisher tries again (a new connection may reach a new worker). How many
/// times it did.
async fn publish_through_changes(port: u16, ch: &'static str, n: usize) -> usize {
    let mut retried = 0;
    for i in 0..n {
        loop {
            let Ok(mut c) = Conn::try_open(port).await else { continue };
            let path = format!("/pub?channel={ch}&size=1000");
            let r = c.send("POST", &path, &[], format!("m{i}")).await;
            if r.status == 503 && r.text().contains("moving to a new zone") {
                retried += 1;
                assert!(retried < 10_000, "503 for too long");
                continue;
            }
            assert!(r.status == 202 || r.status == 201, "{}", r.text());
            break;
        }
        if i % 50 == 0 {
            sleep_ms(20).await;
        }
    }
    retried
}

fn etag(r: &Resp) -> String {
    r.header("etag").expect("an Etag").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_survive_a_stop_and_start() {
    let mut ng = Nginx::start(persist_conf("sync=1s"));
    let mut c = Conn::open(ng.port).await;
    for m in ["one", "two", "three"] {
        let r = c.publish("a", m).await;
        assert_eq!(r.status, 202, "{}", r.text());
    }
    let r = c.send("POST", "/pub?channel=k&key=sesame&size=2", &[], "k1").await;
    assert_eq!(r.status, 202, "{}", r.text());
    c.send("POST", "/pub?channel=k&key=sesame", &[], "k2").await;
    c.send("POST", "/pub?channel=k&key=sesame", &[], "k3").await;
    let first = c.get("/sub?channel=a", &[]).await;
    assert_eq!(first.text(), "one");
    let before: Vec<String> = {
        let mut ids = vec![etag(&first)];
        let mut e = etag(&first);
        for _ in 0..2 {
            let r = c.get("/sub?channel=a", &[("If-None-Match", &e)]).await;
            e = etag(&r);
            ids.push(e.clone());
        }
        ids
    };
    ng.restart();
    let mut c = Conn::open(ng.port).await;
    let r = c.get("/sub?channel=a", &[]).await;
    assert_eq!((r.status, r.text().as_str()), (200, "one"));
    assert_eq!(etag(&r), before[0], "the same id after the restart");
    let r = c.get("/sub?channel=a", &[("If-None-Match", &before[1])]).await;
    assert_eq!((r.text().as_str(), etag(&r)), ("three", before[2].clone()));
    // The attributes and the key came back: size 2 kept k2 and k3; no key, no push.
    let r = c.get("/sub?channel=k", &[]).await;
    assert_eq!(r.text(), "k2");
    assert_eq!(c.info("k").await.map(|i| i.messages), Some(2));
    assert_eq!(c.send("POST", "/pub?channel=k", &[], "x").await.status, 403);
    assert_eq!(c.send("POST", "/pub?channel=k&key=sesame", &[], "k4").await.status, 202);
    // Ids go on increasing.
    let r = c.publish("a", "four").await;
    assert_eq!(r.status, 202);
    let r = c.get("/sub?channel=a", &[("If-None-Match", &before[2])]).await;
    assert_eq!(r.text(), "four");
    assert!(
        etag(&r).trim_matches('"').parse::<u64>().unwrap()
            > before[2].trim_matches('"').parse::<u64>().unwrap()
    );
    // A delete is remembered too.
    assert_eq!(c.send("DELETE", "/pub?channel=a", &[], "").await.status, 200);
    ng.restart();
    let mut c = Conn::open(ng.port).await;
    assert!(c.info("a").await.is_none(), "deleted before the restart");
    assert_eq!(c.info("k").await.map(|i| i.messages), Some(2));
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_a_crash_of_every_process() {
    let mut ng = Nginx::start(persist_conf("sync=always"));
    let (mut a, mut b) = Conn::pair(ng.port).await;
    for i in 0..40 {
        let c = if i % 2 == 0 { &mut a } else { &mut b };
        let r = c.send("POST", "/pub?channel=c&size=100", &[], format!("m{i}")).await;
        assert_eq!(r.status, 202, "{}", r.text());
    }
    ng.crash_and_start();
    let mut c = Conn::open(ng.port).await;
    assert_eq!(c.info("c").await.map(|i| i.messages), Some(40));
    let mut got = vec![];
    let mut e = String::from("\"0\"");
    for _ in 0..40 {
        let r = c.get("/sub?channel=c", &[("If-None-Match", &e)]).await;
        assert_eq!(r.status, 200);
        e = etag(&r);
        got.push(r.text());
    }
    assert_eq!(got, (0..40).map(|i| format!("m{i}")).collect::<Vec<_>>());
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_file_keeps_what_is_before_the_damage() {
    let mut ng = Nginx::start(persist_conf("sync=always"));
    let mut c = Conn::open(ng.port).await;
    for m in ["a1", "a2", "a3"] {
        c.publish("d", m).await;
    }
    ng.stop().unwrap();
    let path = ng.prefix().join("persist/martd.journal");
    let mut bytes = std::fs::read(&path).unwrap();
    // The last record loses its last byte, as after a power cut in mid-write.
    bytes.pop();
    bytes.extend_from_slice(b"\x07garbage");
    std::fs::write(&path, &bytes).unwrap();
    ng.allow_log("skipped its last");
    ng.restart_after_stop();
    let mut c = Conn::open(ng.port).await;
    assert_eq!(c.info("d").await.map(|i| i.messages), Some(2));
    let log = std::fs::read_to_string(ng.log_path()).unwrap();
    assert!(
        log.contains("a record whose checksum does not match") || log.contains("cut short"),
        "{log}"
    );
    // The file goes on from the damage: new messages survive the next restart.
    c.publish("d", "a4").await;
    ng.restart();
    let mut c = Conn::open(ng.port).await;
    assert_eq!(c.info("d").await.map(|i| i.messages), Some(3));
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_is_compacted_and_a_file_that_cannot_be_written_refuses_publishes() {
    let mut ng = Nginx::start(persist_conf("sync=1s"));
    let mut c = Conn::open(ng.port).await;
    let body = "x".repeat(1000);
    for _ in 0..3000 {
        let r = c.send("POST", "/pub?channel=big&size=5", &[], body.clone()).await;
        assert!(r.status == 202 || r.status == 201, "{}", r.text());
    }
    let path = ng.prefix().join("persist/martd.journal");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if len > 0 && len < 2_200_000 {
            break;
        }
        assert!(Instant::now() < deadline, "not compacted: {len} bytes for 3 MB published");
        sleep_ms(100).await;
    }
    ng.restart();
    let mut c = Conn::open(ng.port).await;
    assert_eq!(c.info("big").await.map(|i| i.messages), Some(5));
    ng.finish();
    // A file that cannot be written: publishes get 507 with a reason, nothing is stored.
    let mut ng = Nginx::start(
        Conf::new("        location = /pub { martd_push; }").http("martd_persist /dev/full;"),
    );
    ng.allow_log("not a regular file");
    let mut c = Conn::open(ng.port).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = c.publish("f", "m").await;
        if r.status == 507 {
            assert!(r.text().contains("cannot write"), "{}", r.text());
            break;
        }
        assert!(Instant::now() < deadline, "still {}", r.status);
        sleep_ms(100).await;
    }
    ng.finish();
}

/// The worker running `martd_persist`'s writer thread.
fn writer_worker(ng: &Nginx) -> Option<u32> {
    ng.worker_pids().into_iter().find(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|tasks| {
            tasks.flatten().any(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|c| c.trim() == "martd-persist")
            })
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_worker_takes_over_when_the_writer_is_killed() {
    let mut ng = Nginx::start(persist_conf("sync=always"));
    ng.allow_log("exited on signal 9");
    let mut c = Conn::open(ng.port).await;
    for i in 0..10 {
        let r = c.send("POST", "/pub?channel=w&size=100", &[], format!("m{i}")).await;
        assert_eq!(r.status, 202, "{}", r.text());
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let writer = loop {
        if let Some(w) = writer_worker(&ng) {
            break w;
        }
        assert!(Instant::now() < deadline, "no worker runs the writer thread");
        sleep_ms(50).await;
    };
    ng.kill_worker(writer, libc::SIGKILL);
    ng.wait_respawn(writer);
    // Acknowledged only once on disk: a worker that lives (or the new one) writes them.
    for i in 10..20 {
        let mut c = Conn::open(ng.port).await;
        let r = c.send("POST", "/pub?channel=w&size=100", &[], format!("m{i}")).await;
        assert_eq!(r.status, 202, "{}", r.text());
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while writer_worker(&ng).is_none() {
        assert!(Instant::now() < deadline, "nobody took the writer over");
        sleep_ms(50).await;
    }
    ng.crash_and_start();
    let mut c = Conn::open(ng.port).await;
    assert_eq!(c.info("w").await.map(|i| i.messages), Some(20));
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_in_the_middle_of_publishing_lose_nothing() {
    let mut ng = Nginx::start(persist_conf("sync=always"));
    // Publishers on their own connections keep going while nginx reloads twice, the second
    // time with another zone size (a new zone: filled from the file).
    let port = ng.port;
    let publisher = tokio::spawn(publish_through_changes(port, "r", 300));
    sleep_ms(200).await;
    ng.reload();
    ng.set_conf(
        persist_conf("sync=always").http("martd_persist persist sync=always; martd_shm_size 48m;"),
    );
    ng.reload();
    within(Duration::from_secs(60), "publishers", publisher).await.unwrap();
    let mut c = Conn::open(ng.port).await;
    assert_eq!(c.info("r").await.map(|i| i.messages), Some(300), "across both reloads");
    ng.crash_and_start();
    let mut c = Conn::open(ng.port).await;
    assert_eq!(c.info("r").await.map(|i| i.messages), Some(300), "and a crash");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_directory_works_under_a_path_the_workers_cannot_walk() {
    // A prefix in /root, say: the master (root) opens the directory, the workers (nobody)
    // write through that descriptor.
    let mut ng = Nginx::start(Conf::new("        location = /pub { martd_push; }"));
    let private = ng.prefix().join("private");
    std::fs::create_dir_all(&private).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    ng.set_conf(
        Conf::new(
            "        location = /pub { martd_push; }
        location = /sub { martd_listen; }",
        )
        .http("martd_persist private/inner sync=always;"),
    );
    ng.reload();
    let mut c = Conn::open(ng.port).await;
    let r = c.publish("p", "kept").await;
    assert_eq!(r.status, 202, "{}", r.text());
    ng.restart();
    let mut c = Conn::open(ng.port).await;
    let r = c.get("/sub?channel=p", &[]).await;
    assert_eq!((r.status, r.text().as_str()), (200, "kept"));
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_upgrade_in_the_middle_of_publishing_loses_nothing() {
    let mut ng = Nginx::start(persist_conf("sync=1s").daemon());
    // Publishers keep going through USR2, both generations taking requests, WINCH and QUIT
    // of the old master: the old zone hands its journal over and then answers 503.
    let port = ng.port;
    let publisher = tokio::spawn(publish_through_changes(port, "u", 300));
    sleep_ms(100).await;
    ng.binary_upgrade(Duration::from_millis(300));
    let retried = within(Duration::from_secs(60), "publishers", publisher).await.unwrap();
    let log = ng.log();
    assert!(log.contains("the running zone handed over"), "no hand-over:\n{}", ng.log_tail(30));
    eprintln!("binary upgrade: {retried} publishes answered 503 and tried again");
    // The new master's zone has all 300, in order, with increasing ids.
    let mut c = Conn::open(ng.port).await;
    let mut e = String::from("\"0\"");
    let mut last = 0u64;
    for i in 0..300 {
        let r = c.get("/sub?channel=u", &[("If-None-Match", &e)]).await;
        assert_eq!(r.text(), format!("m{i}"));
        e = r.header("etag").expect("an Etag").to_string();
        let id: u64 = e.trim_matches('"').parse().expect("a numeric Etag");
        assert!(id > last, "ids increase");
        last = id;
    }
    // And the file the two generations wrote restores them all.
    ng.crash_and_start();
    let mut c = Conn::open(ng.port).await;
    assert_eq!(c.info("u").await.map(|i| i.messages), Some(300), "after a crash");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_upgrade_given_up_leaves_the_old_zone_publishing() {
    let mut ng = Nginx::start(persist_conf("sync=1s").daemon());
    ng.allow_log("that took the journal over is gone");
    let mut c = Conn::open(ng.port).await;
    assert_eq!(c.publish("g", "before").await.status, 202);
    let new = ng.start_new_binary();
    // Requests now reach either generation; the old workers' zone handed over (503).
    let old_worker = ng.worker_pids();
    let mut refused = false;
    for _ in 0..200 {
        let mut c = Conn::open(ng.port).await;
        let r = c.publish("g", "during").await;
        if r.status == 503
            && old_worker.contains(&r.header("x-worker").unwrap_or("").parse().unwrap_or(0))
        {
            refused = true;
            break;
        }
    }
    assert!(refused, "the old zone still took publishes after the hand-over");
    ng.quit_new_binary(new);
    // The old zone takes publishes again once the new master is gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut c = Conn::open(ng.port).await;
        let r = c.publish("g", "after").await;
        if r.status == 202 || r.status == 201 {
            break;
        }
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(Instant::now() < deadline, "the old zone never took publishes again");
        sleep_ms(20).await;
    }
    ng.finish();
}
