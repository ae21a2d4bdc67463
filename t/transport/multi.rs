//! Several channels on one stream (`martd_channel_id_delimiter`): every message of every
//! channel, in publish order, tagged with its channel on EventSource, resumed from one id.

use std::collections::BTreeSet;

use super::*;

fn multi_conf() -> Conf {
    conf(
        "        location = /m { martd_listen eventsource stream; martd_channel_id $arg_chs;
                        martd_channel_id_delimiter \"|\"; martd_max_channels_per_request 4; }
        location = /m-lp { martd_listen; martd_channel_id $arg_chs; martd_channel_id_delimiter \"|\"; }",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_every_channel_in_publish_order_tagged_and_resumed_from_one_id() {
    let ng = Nginx::start(multi_conf());
    let w = ng.worker_pids();
    let mut p = Conn::open_on(ng.port, w[0]).await;
    // Stored before: sent in id order across the channels.
    let b0 = publish(&mut p, "mb", "b0").await;
    let a0 = publish(&mut p, "ma", "a0").await;
    let mut ev = open_on(ng.port, w[1], "/m?chs=ma|mb|mc", &[SSE]).await.events();
    let got = ev.take(2, PROMPT).await;
    let first: Vec<_> =
        got.iter().map(|e| (e.event.clone(), e.id.clone(), e.data.clone())).collect();
    assert_eq!(
        first,
        vec![
            ("mb".to_string(), b0.to_string(), "b0".to_string()),
            ("ma".to_string(), a0.to_string(), "a0".to_string())
        ]
    );
    for ch in ["ma", "mb", "mc"] {
        p.wait_listeners(ch, 1).await;
    }
    let chans = ["ma", "mb", "mc"];
    let mut sent = Vec::new();
    for i in 0..300usize {
        let ch = chans[(i * 7 + i / 3) % 3];
        sent.push((ch, publish(&mut p, ch, format!("{ch}-{i}")).await, format!("{ch}-{i}")));
    }
    let got = ev.take(300, PROMPT).await;
    for (e, (ch, id, body)) in got.iter().zip(&sent) {
        assert_eq!(
            (e.event.as_str(), e.id.clone(), e.data.as_str()),
            (*ch, id.to_string(), body.as_str())
        );
    }
    // Resume every channel from one id: exactly what came after it.
    drop(ev);
    let mid = sent[149].1;
    let mut ev =
        open_on(ng.port, w[0], "/m?chs=ma|mb|mc", &[SSE, ("Last-Event-ID", &mid.to_string())])
            .await
            .events();
    let got = ev.take(150, PROMPT).await;
    let ids: Vec<String> = got.iter().map(|e| e.id.clone()).collect();
    let want: Vec<String> = sent[150..].iter().map(|s| s.1.to_string()).collect();
    assert_eq!(ids, want);
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_on_both_workers_never_reorder_or_lose() {
    let ng = Nginx::start(multi_conf());
    let w = ng.worker_pids();
    let mut s = open_on(ng.port, w[0], "/m?chs=c1|c2|c3|c4", &[]).await;
    let mut p = Conn::open(ng.port).await;
    for ch in ["c1", "c2", "c3", "c4"] {
        p.wait_listeners(ch, 1).await;
    }
    // Four publishers, two per worker, each on its own channel, at once.
    let mut tasks = Vec::new();
    for (k, ch) in ["c1", "c2", "c3", "c4"].into_iter().enumerate() {
        let mut c = Conn::open_on(ng.port, w[k % 2]).await;
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..150 {
                ids.push(publish(&mut c, ch, format!("{ch}:{i}")).await);
            }
            ids
        }));
    }
    let mut published = BTreeSet::new();
    for t in tasks {
        published.extend(t.await.expect("publisher"));
    }
    let lines = s.pieces(b"\n", 600, Duration::from_secs(10)).await;
    // The stream carries no ids: check the order per channel and that each came once.
    let mut per: std::collections::HashMap<String, Vec<u32>> = Default::default();
    for l in &lines {
        let l = String::from_utf8_lossy(l);
        let (ch, i) = l.split_once(':').expect("ch:i");
        per.entry(ch.to_string()).or_default().push(i.parse().expect("number"));
    }
    for ch in ["c1", "c2", "c3", "c4"] {
        assert_eq!(per[ch], (0..150).collect::<Vec<_>>(), "{ch}");
    }
    assert_eq!(published.len(), 600);
    // EventSource: ids strictly increasing under the same storm.
    let mut ev =
        open_on(ng.port, w[1], "/m?chs=c1|c2|c3|c4", &[SSE, ("Last-Event-ID", "1")]).await.events();
    let got = ev.take(600, PROMPT).await;
    let ids: Vec<u64> = got.iter().map(|e| e.id.parse().expect("id")).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids in order");
    assert_eq!(ids.into_iter().collect::<BTreeSet<_>>(), published);
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_channel_lists_get_400() {
    let ng = Nginx::start(multi_conf());
    let mut c = Conn::open(ng.port).await;
    for (path, why) in [
        ("/m?chs=a||b", "empty channel id"),
        ("/m?chs=a|b|a", "twice"),
        ("/m?chs=a|b|c|d|e", "more than 4 channels"),
        ("/m?chs=|a", "empty channel id"),
        ("/m-lp?chs=a|b|b", "twice"),
    ] {
        let r = c.get(path, &[SSE]).await;
        assert_eq!(r.status, 400, "{path}: {}", r.text());
        assert!(r.text().contains(why), "{path}: {}", r.text());
    }
    ng.finish();
}
