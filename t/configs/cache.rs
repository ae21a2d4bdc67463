//! A cache zone (cache manager and cache loader processes): no worker goes deaf.

use super::*;

const CACHE_HTTP: &str =
    "proxy_cache_path tmp/cache keys_zone=c:1m loader_sleep=50ms loader_files=1 loader_threshold=10ms;";

/// Waits until the master runs a cache manager and a cache loader (and they had a moment to
/// initialise).
async fn wait_cache_processes(ng: &Nginx) {
    let deadline = Instant::now() + NGINX_WAIT;
    loop {
        let kids = children_of(ng.master_pid());
        let has = |t: &str| kids.iter().any(|(_, title)| title.contains(t));
        if has("cache manager process") && has("cache loader process") {
            break;
        }
        assert!(Instant::now() < deadline, "no cache manager/loader: {kids:?}");
        sleep_ms(10).await;
    }
    // They register (or must not) in their init_process, right after they start.
    sleep_ms(200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_cache_path_leaves_no_worker_deaf() {
    let mut ng =
        Nginx::start(Conf::new(&pubsub("", "martd_listener_timeout 30s;")).http(CACHE_HTTP));
    wait_cache_processes(&ng).await;
    deliver_both_ways(&ng, "cache", 3, "with a cache zone").await;
    // Again a while later (the cache manager has run its rounds).
    sleep_ms(2000).await;
    deliver_both_ways(&ng, "cache-later", 2, "with a cache zone, 2 s later").await;
    // And after a reload (a new cache manager and loader start).
    ng.reload();
    wait_cache_processes(&ng).await;
    deliver_both_ways(&ng, "cache-reload", 2, "with a cache zone, after a reload").await;
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_cache_path_worker_killed_and_respawned() {
    let mut ng =
        Nginx::start(Conf::new(&pubsub("", "martd_listener_timeout 30s;")).http(CACHE_HTTP));
    ng.allow_log("exited on signal 9");
    ng.allow_log("was locked by");
    wait_cache_processes(&ng).await;
    deliver_both_ways(&ng, "ck", 1, "with a cache zone").await;
    for victim_index in [0, 1] {
        let w = ng.worker_pids();
        let victim = w[victim_index];
        // A listener on the survivor waits across the kill.
        let survivor = w[1 - victim_index];
        let l =
            listen_on(ng.port, survivor, "/sub?channel=ck-across", &[("if-none-match", FUTURE)])
                .await;
        ng.kill_worker(victim, libc::SIGKILL);
        let now = ng.wait_respawn(victim);
        let mut p = Conn::open_on(ng.port, *now.iter().find(|p| **p != survivor).unwrap()).await;
        p.wait_listeners("ck-across", 1).await;
        let body = format!("from the respawned worker {victim_index}");
        assert_status(&p.publish("ck-across", body.clone()).await, 201, "publish");
        let (_, r) = promptly(l, "respawned -> survivor").await;
        expect_body(&r, &body, Some(survivor), "respawned -> survivor");
        deliver_both_ways(&ng, &format!("ck{victim_index}"), 2, "after a worker was respawned")
            .await;
    }
    ng.finish();
}
