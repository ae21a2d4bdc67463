//! Zone exhaustion and recovery.

use super::*;

// 12. zone exhaustion

fn is_zone_full_line(l: &str) -> bool {
    let l = l.to_ascii_lowercase();
    l.contains("martd")
        && ["full", "no memory", "out of memory", "exhausted", "507"].iter().any(|k| l.contains(k))
}

/// Publishes 8 KB messages round-robin over `channels` until the zone answers 507.
async fn fill_zone(c: &mut Conn, pub_loc: &str, channels: &[String]) -> usize {
    let body = vec![b'z'; 8192];
    for n in 0..5000 {
        let ch = &channels[n % channels.len()];
        let r = c.send("POST", &format!("{pub_loc}?channel={ch}"), &[], body.clone()).await;
        match r.status {
            507 => return n,
            201 | 202 => {}
            s => panic!("publish {n} while filling the zone: {s} {}", r.text()),
        }
    }
    panic!("a 256k zone took 5000 messages of 8 KB without a 507");
}

/// A 256k zone filled with 8 KB messages (timeout `message_timeout`) on 8 channels named
/// `{prefix}0..7`: the server, a connection, the channels and how many messages fitted.
async fn full_zone(message_timeout: &str, prefix: &str) -> (Nginx, Conn, Vec<String>, usize) {
    let mut ng = Nginx::start(
        Conf::new(&pubsub(
            &format!(
                "martd_message_buffer_length 1000; martd_message_timeout {message_timeout}; \
                 client_body_buffer_size 16k;"
            ),
            "",
        ))
        .http("martd_shm_size 256k;"),
    );
    ng.allow_log_if(is_zone_full_line);
    let mut c = Conn::open_probed(ng.port).await;
    let chans: Vec<String> = (0..8).map(|i| format!("{prefix}{i}")).collect();
    let n = fill_zone(&mut c, "/pub", &chans).await;
    (ng, c, chans, n)
}

#[test]
fn zone_exhaustion_507_then_delete_recovers() {
    heavy_test(async {
        let t0 = Instant::now();
        let (ng, mut c, chans, n1) = full_zone("1h", "full").await;
        assert!(n1 > 0, "not even one message fitted");
        for _ in 0..30 {
            let r = c.send("POST", &pub_path("full0"), &[], vec![b'z'; 8192]).await;
            assert_status(&r, 507, "publish to a full zone");
        }
        let elapsed = t0.elapsed().as_secs();
        let lines = ng.log().lines().filter(|l| is_zone_full_line(l)).count();
        assert!(lines >= 1, "no error-log line says the zone is full\n{}", ng.log_tail(20));
        assert!(
            lines as u64 <= 2 * (elapsed + 2),
            "{lines} zone-full lines in {elapsed}s: more than one per second per worker"
        );
        // Listeners still get what is stored; a small message still fails.
        assert_eq!(fetch(&mut c, &sub_path("full1"), None, None).await.body.len(), 8192);

        for ch in &chans {
            assert_status(&c.send("DELETE", &pub_path(ch), &[], "").await, 200, "DELETE");
        }
        assert_published(&c.publish("after", "works").await, 202, "publish after delete");
        assert_status(&c.send("DELETE", &pub_path("after"), &[], "").await, 200, "DELETE");
        let n2 = fill_zone(&mut c, "/pub", &chans).await;
        assert!(
            n2 * 4 >= n1 * 3,
            "memory not recovered after DELETE: {n1} messages fitted at first, {n2} after"
        );
        ng.finish();
    });
}

#[test]
fn zone_exhaustion_then_expiry_recovers() {
    heavy_test(async {
        let (ng, mut c, _chans, n1) = full_zone("2s", "exp").await;
        assert!(n1 > 0);
        // Publishing works again once the messages expired (on a channel never used before).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = c.send("POST", &pub_path("fresh"), &[], vec![b'y'; 8192]).await;
            if r.status == 202 {
                break;
            }
            assert_status(&r, 507, "publish while full");
            assert!(Instant::now() < deadline, "zone still full long after the messages expired");
            sleep_ms(250).await;
        }
        let i = c.info("exp0").await;
        assert!(i.as_ref().is_none_or(|i| i.messages == 0), "expired messages still queued: {i:?}");
        ng.finish();
    });
}
