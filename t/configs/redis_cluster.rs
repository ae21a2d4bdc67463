//! `martd_redis_cluster on`: two nginx nodes share channels through a real 3-master Redis
//! Cluster with one replica per master (`redis-cli --cluster create`). Channels spread over
//! every master; publishes alternate between the nodes and are read back in one order on
//! both; a master is SIGKILLed while publishes go on: its replica takes over, publishes in
//! between may get `503`, and with `martd_redis_wait 1` every acknowledged message is still
//! there, on both nodes, once the killed master is back as a replica.

use std::collections::HashMap;

use super::*;
use harness::redis::Cluster;

const CHANNELS: usize = 24;

fn node_conf(urls: &[String]) -> Conf {
    Conf::new(
        "        location = /pub { martd_push; }
        location = /sub { martd_listen; }",
    )
    .http(&format!(
        "martd_redis_url {}; martd_redis_cluster on; martd_redis_wait 1 2s; \
         martd_redis_namespace t;",
        urls.join(" ")
    ))
}

/// One publish; its body if it was acknowledged (`201`/`202`), `None` if refused (`503`).
async fn publish(c: &mut Conn, ch: &str, body: &str) -> Option<String> {
    let r = c.send("POST", &format!("/pub?channel={ch}&size=1000"), &[], body.to_string()).await;
    match r.status {
        201 | 202 => Some(body.to_string()),
        503 => None,
        s => panic!("publish {ch}: {s} {}", r.text()),
    }
}

/// Publishes `n` acknowledged messages alternating between the nodes over every channel,
/// recording them per channel; refusals are retried (bounded).
async fn publish_many(
    nodes: &mut [Conn; 2],
    acked: &mut HashMap<String, Vec<String>>,
    seq: &mut usize,
    n: usize,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut done = 0;
    while done < n {
        let ch = format!("c{}", *seq % CHANNELS);
        let body = format!("m{}", *seq);
        *seq += 1;
        if let Some(b) = publish(&mut nodes[*seq % 2], &ch, &body).await {
            acked.entry(ch).or_default().push(b);
            done += 1;
        } else {
            assert!(Instant::now() < deadline, "the cluster took no publish for too long");
            sleep_ms(50).await;
        }
    }
}

/// Every acknowledged message of every channel, in order, with no duplicate, on node `c`.
async fn check_node(c: &mut Conn, acked: &HashMap<String, Vec<String>>) {
    for (ch, want) in acked {
        let mut e = String::from("\"0\"");
        let mut seen: Vec<String> = Vec::new();
        let last = want.last().expect("a message");
        while seen.last() != Some(last) {
            let r = c.get(&format!("/sub?channel={ch}"), &[("If-None-Match", &e)]).await;
            assert_eq!(r.status, 200, "{ch} after {e}: {}", r.text());
            e = r.header("etag").expect("an Etag").to_string();
            assert!(!seen.contains(&r.text()), "{ch}: {} twice", r.text());
            seen.push(r.text());
        }
        let kept: Vec<&String> = seen.iter().filter(|s| want.contains(s)).collect();
        assert_eq!(kept, want.iter().collect::<Vec<_>>(), "{ch}: acknowledged messages");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_shares_channels_and_its_failover_loses_nothing_acknowledged() {
    let mut cluster = Cluster::start(3);
    let urls = cluster.urls();
    let mut a = Nginx::start(node_conf(&urls));
    let mut b = Nginx::start(node_conf(&urls));
    for ng in [&mut a, &mut b] {
        ng.allow_log("martd_redis_url");
    }
    let mut nodes = [Conn::open(a.port).await, Conn::open(b.port).await];
    let mut acked: HashMap<String, Vec<String>> = HashMap::new();
    let mut seq = 0;
    // Warm-up and 300 publishes over channels on every master, alternating nodes.
    publish_many(&mut nodes, &mut acked, &mut seq, 300).await;
    // A listener on node b gets what node a publishes on a channel of every master.
    for k in 0..3 {
        let ch = format!("c{k}");
        let l = Conn::open(b.port).await.spawn_get(
            &format!("/sub?channel={ch}"),
            &[("If-None-Match", "\"9000000000000000000\"")],
            LONG,
        );
        nodes[1].wait_listeners(&ch, 1).await;
        let body = format!("live{k}");
        publish_many_one(&mut nodes[0], &ch, &body, &mut acked).await;
        let r = l.resp().await;
        assert_eq!((r.status, r.text()), (200, body));
    }
    // A master is killed; its replica takes over; publishes go on meanwhile.
    let victim = cluster.a_master();
    cluster.nodes[victim].kill();
    let t0 = Instant::now();
    while cluster.nodes.iter().filter(|n| n.running()).any(|n| n.masters_with_slots().len() < 3)
        || t0.elapsed() < Duration::from_secs(1)
    {
        publish_attempt(&mut nodes, &mut acked, &mut seq).await;
        assert!(t0.elapsed() < Duration::from_secs(30), "no failover");
    }
    cluster.wait_ok();
    // The killed master comes back as a replica; more publishes, acknowledged with WAIT.
    cluster.nodes[victim].start_again();
    publish_many(&mut nodes, &mut acked, &mut seq, 300).await;
    for c in nodes.iter_mut() {
        check_node(c, &acked).await;
    }
    a.finish();
    b.finish();
}

/// One publish at any node during the failover: recorded if acknowledged.
async fn publish_attempt(
    nodes: &mut [Conn; 2],
    acked: &mut HashMap<String, Vec<String>>,
    seq: &mut usize,
) {
    let ch = format!("c{}", *seq % CHANNELS);
    let body = format!("m{}", *seq);
    *seq += 1;
    match publish(&mut nodes[*seq % 2], &ch, &body).await {
        Some(b) => acked.entry(ch).or_default().push(b),
        None => sleep_ms(20).await,
    }
}

/// Publishes `body` on `ch` until acknowledged (bounded) and records it.
async fn publish_many_one(
    c: &mut Conn,
    ch: &str,
    body: &str,
    acked: &mut HashMap<String, Vec<String>>,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while publish(c, ch, body).await.is_none() {
        assert!(Instant::now() < deadline, "{ch}: never acknowledged");
        sleep_ms(50).await;
    }
    acked.entry(ch.to_string()).or_default().push(body.to_string());
}
