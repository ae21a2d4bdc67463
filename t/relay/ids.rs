//! Message ids: `If-None-Match`/`If-Modified-Since`, malformed and extreme ids, ids strictly
//! increasing everywhere.

use super::*;

// 3. message ids

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_none_match_and_if_modified_since() {
    let ng = Nginx::start(Conf::new(&format!(
        "{}        location = /subt {{ martd_listen; martd_listener_timeout 1s; }}\n",
        pubsub("", "")
    )));
    let mut c = Conn::open_probed(ng.port).await;
    assert_published(&c.publish("i", "one").await, 202, "m1");
    let m1 = fetch(&mut c, &sub_path("i"), None, None).await;
    assert_eq!(m1.text(), "one");
    // Publish the next ones in a later second than m1.
    let lm1 = parse_http_date(&m1.lm).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while now_secs() <= lm1 {
        assert!(Instant::now() < deadline, "clock did not move past {}", m1.lm);
        sleep_ms(20).await;
    }
    assert_published(&c.publish("i", "two").await, 202, "m2");
    assert_published(&c.publish("i", "three").await, 202, "m3");

    // If-None-Match alone.
    let m2 = fetch(&mut c, &sub_path("i"), Some(&m1.etag), None).await;
    assert_eq!(m2.text(), "two");
    let m3 = fetch(&mut c, &sub_path("i"), Some(&m2.etag), None).await;
    assert_eq!(m3.text(), "three");
    assert!(m1.id < m2.id && m2.id < m3.id);

    // If-Modified-Since alone: the first message published after that second.
    let m = fetch(&mut c, &sub_path("i"), None, Some(&m1.lm)).await;
    assert_eq!(m.text(), "two", "If-Modified-Since = Last-Modified of m1");
    let before = fmt_http_date(lm1 - 10);
    let m = fetch(&mut c, &sub_path("i"), None, Some(&before)).await;
    assert_eq!(m.text(), "one", "If-Modified-Since before every message");

    // Both: If-None-Match decides.
    let future = "Fri, 01 Jan 2100 00:00:00 GMT";
    let m = fetch(&mut c, &sub_path("i"), Some(&m1.etag), Some(future)).await;
    assert_eq!(m.text(), "two", "If-None-Match must win over a future If-Modified-Since");
    let m = fetch(&mut c, &sub_path("i"), Some(&m2.etag), Some(&before)).await;
    assert_eq!(m.text(), "three", "If-None-Match must win over an old If-Modified-Since");

    // Nothing newer: wait (then 304 with the short timeout).
    let r = c.get_long("/subt?channel=i", &[("if-none-match", &m3.etag)], LONG).await;
    assert_status(&r, 304, "If-None-Match of the newest message");
    let r = c.get_long("/subt?channel=i", &[("if-modified-since", future)], LONG).await;
    assert_status(&r, 304, "If-Modified-Since in the future");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_malformed_and_extreme_ids() {
    let ng = Nginx::start(Conf::new(&format!(
        "{}        location = /subt {{ martd_listen; martd_listener_timeout 1s; }}\n",
        pubsub("martd_message_buffer_length 3;", "")
    )));
    let mut c = Conn::open_probed(ng.port).await;
    let mut ids = Vec::new();
    for i in 1..=5 {
        ids.push(c.publish_id(&pub_path("j"), format!("m{i}")).await);
    }
    // m1 and m2 were dropped by the buffer: an id older than every stored one -> oldest stored.
    let m = fetch(&mut c, &sub_path("j"), Some(&format!("\"{}\"", ids[0])), None).await;
    assert_eq!(m.text(), "m3", "id of a dropped message");
    for old in ["\"1\"", "\"0\""] {
        let m = fetch(&mut c, &sub_path("j"), Some(old), None).await;
        assert_eq!(m.text(), "m3", "If-None-Match {old}");
    }
    let m = fetch(&mut c, &sub_path("j"), Some(&format!("\"{}\"", ids[2])), None).await;
    assert_eq!(m.text(), "m4", "id of a stored message -> the next one");

    // Malformed values are treated as absent: the oldest stored message at once.
    let bad_inm = [
        "abc",
        "\"abc\"",
        "\"\"",
        "\"12a\"",
        "1:",
        "\"1:\"",
        "-1",
        "\"-1\"",
        "%22123%22",
        "W/\"x\"",
        "1,2,3",
        "\"1\", \"2\"",
        "\"0x10\"",
        "\"1e5\"",
        "\"+5\"",
        "*",
        "\"",
        "\"\"\"",
        "", // what the README's curl loop sends on its first round
    ];
    for v in bad_inm {
        let r = c.get_long("/subt?channel=j", &[("if-none-match", v)], LONG).await;
        assert_eq!(
            (r.status, r.text().as_str()),
            (200, "m3"),
            "If-None-Match {v:?} must be treated as absent (or as an old id)"
        );
    }
    let bad_ims = [
        "",
        "garbage",
        "Mon, 32 Foo 2020 99:99:99 GMT",
        "0",
        "-1",
        "%20",
        "Sun, 06 Nov 1994 08:49:37",
        "99999999999999999999",
    ];
    for v in bad_ims {
        let r = c.get_long("/subt?channel=j", &[("if-modified-since", v)], LONG).await;
        assert_eq!(
            (r.status, r.text().as_str()),
            (200, "m3"),
            "If-Modified-Since {v:?} must be treated as absent (or as an old time)"
        );
    }
    // Beyond 64 bits (or 63): whether malformed or "in the future", never a crash.
    for v in [
        "99999999999999999999",
        "\"99999999999999999999\"",
        "\"18446744073709551615\"",
        "\"18446744073709551616\"",
        "\"9223372036854775808\"",
        "\"340282366920938463463374607431768211456\"",
    ] {
        let r = c.get_long("/subt?channel=j", &[("if-none-match", v)], LONG).await;
        assert!(
            (r.status == 200 && r.text() == "m3") || r.status == 304,
            "If-None-Match {v:?}: {} {:?}",
            r.status,
            r.text()
        );
    }
    // A valid id newer than anything issued waits (304 after the short timeout).
    let r =
        c.get_long("/subt?channel=j", &[("if-none-match", "\"1000000000000000000\"")], LONG).await;
    assert_status(&r, 304, "future id on /subt");
    // Odd channel ids in the query never crash either.
    for q in ["%ZZ", "%00", "a&channel=b", "%", "%7f%ff"] {
        let _ = c.try_send("GET", &format!("/subt?channel={q}"), &[], "").await;
    }
    let mut c = Conn::open_probed(ng.port).await;
    assert_eq!(fetch(&mut c, &sub_path("j"), None, None).await.text(), "m3");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn future_id_waits_for_next_message() {
    let ng = Nginx::start(std_conf());
    let (mut p, l) = Conn::pair(ng.port).await;
    let last = p.publish_id(&pub_path("f"), "old").await;
    let future = format!("\"{}\"", last + 1_000_000_000_000);
    let l = l.listen("f", Some(&future), None);
    p.wait_listeners("f", 1).await;
    assert!(!l.is_finished(), "a future id must wait");
    let r = p.publish("f", "next").await;
    assert_published(&r, 201, "publish to a listener holding a future id");
    assert_eq!(expect_msg(&l.resp().await).text(), "next");
    ng.finish();
}

// 9. ids

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_strictly_increasing_everywhere() {
    let mut ng = Nginx::start(std_conf());
    let mut all: Vec<u64> = Vec::new();
    let check = |all: &Vec<u64>, new: &[u64], what: &str| {
        let max = all.iter().copied().max().unwrap_or(0);
        assert!(
            new.iter().all(|&i| i > max),
            "{what}: ids {new:?} not above every earlier id (max {max})"
        );
        assert!(new.windows(2).all(|w| w[0] < w[1]), "{what}: {new:?}");
    };

    // Alternating channels and workers.
    let (mut a, mut b) = Conn::pair(ng.port).await;
    let mut new = Vec::new();
    for _ in 0..10 {
        new.push(a.publish_id(&pub_path("ia"), "x").await);
        new.push(b.publish_id(&pub_path("ib"), "y").await);
    }
    check(&all, &new, "alternating");
    all.extend(new);

    // Concurrent publishers on both workers: each sequence increasing, all unique.
    let mut tasks = Vec::new();
    for (mut c, ch) in [(a, "ca"), (b, "cb")] {
        tasks.push(tokio::spawn(async move {
            let mut v = Vec::new();
            for _ in 0..100 {
                v.push(c.publish_id(&pub_path(ch), "z").await);
            }
            v
        }));
    }
    let mut conc = Vec::new();
    for t in tasks {
        let v = within(LONG, "publisher task", t).await.unwrap();
        check(&all, &v, "concurrent");
        conc.extend(v);
    }
    let uniq: HashSet<u64> = conc.iter().copied().collect();
    assert_eq!(uniq.len(), conc.len(), "duplicate ids from concurrent publishers");
    all.extend(conc);

    // After a reload.
    ng.reload();
    let (mut a, mut b) = Conn::pair(ng.port).await;
    let new =
        vec![a.publish_id(&pub_path("ia"), "r").await, b.publish_id(&pub_path("ib"), "r").await];
    check(&all, &new, "after reload");
    all.extend(new);

    // After delete + re-create.
    assert_status(&a.send("DELETE", &pub_path("ia"), &[], "").await, 200, "DELETE");
    let new = vec![b.publish_id(&pub_path("ia"), "again").await];
    check(&all, &new, "after delete");
    assert_eq!(a.info("ia").await.unwrap().messages, 1);
    all.extend(new);

    // After a restart: a new zone.
    drop((a, b));
    ng.restart();
    let (mut a, mut b) = Conn::pair(ng.port).await;
    assert!(a.info("ia").await.is_none(), "a restart must start with an empty zone");
    let new = vec![
        a.publish_id(&pub_path("ia"), "new zone").await,
        b.publish_id(&pub_path("ib"), "new zone").await,
    ];
    check(&all, &new, "after restart");
    ng.finish();
}
