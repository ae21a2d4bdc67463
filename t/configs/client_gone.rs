//! The access log of a listener whose client went away.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_client_gone_logs_499() {
    let ng = Nginx::start(
        Conf::new(
            "        location = /pub { martd_push; }
        location = /sub { martd_listen; access_log logs/detached.log gone; }
        location = /sub-parked { martd_listen; martd_detach_listeners off; access_log logs/parked.log gone; }
",
        )
        .http("log_format gone '$status $request_method $args $request_time $body_bytes_sent';"),
    );
    let port = ng.port;
    let mut p = Conn::open_probed(port).await;
    let mut lines = Vec::new();
    for (path, log) in [("/sub", "logs/detached.log"), ("/sub-parked", "logs/parked.log")] {
        let log = ng.prefix().join(log);
        // The client goes away after waiting 600 ms.
        let ch = format!("gone{}", path.len());
        let mut w = RawConn::open(port).await;
        w.write(format!("GET {path}?channel={ch} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes()).await;
        p.wait_listeners(&ch, 1).await;
        sleep_ms(600).await;
        drop(w);
        p.wait_listeners(&ch, 0).await;
        let line =
            one_log_line(&log, &format!("channel={ch}"), &format!("{path}: client gone")).await;
        // A client answered after 600 ms: logged once, with the whole wait.
        let ch2 = format!("answered{}", path.len());
        let l =
            Conn::open_probed(port).await.spawn_get(&format!("{path}?channel={ch2}"), &[], LONG);
        p.wait_listeners(&ch2, 1).await;
        sleep_ms(600).await;
        p.publish(&ch2, "logged").await;
        let (_, r) = promptly(l, path).await;
        expect_body(&r, "logged", None, path);
        let answered =
            one_log_line(&log, &format!("channel={ch2}"), &format!("{path}: answered")).await;
        lines.push((path, line, answered));
    }
    for (path, gone, answered) in &lines {
        let f: Vec<&str> = gone.split(' ').collect();
        assert_eq!(f.len(), 5, "{path}: {gone:?}");
        assert_eq!(f[0], "499", "{path}: a listener whose client closed is logged 499: {gone:?}");
        assert_eq!(f[1], "GET", "{path}: {gone:?}");
        assert_eq!(f[4], "0", "{path}: nothing sent: {gone:?}");
        let t: f64 = f[3].parse().unwrap();
        assert!(t >= 0.5, "{path}: $request_time of a 499 covers the wait: {gone:?}");
        let a: Vec<&str> = answered.split(' ').collect();
        assert_eq!(a[0], "200", "{path}: {answered:?}");
        let t: f64 = a[3].parse().unwrap();
        assert!(
            t >= 0.5,
            "{path}: $request_time of an answered listener covers the wait: {answered:?}"
        );
    }
    // Same shape either way (channel names differ only by the location's length).
    let shape = |l: &str| {
        let f: Vec<&str> = l.split(' ').collect();
        (f[0].to_string(), f[1].to_string(), f[4].to_string())
    };
    assert_eq!(shape(&lines[0].1), shape(&lines[1].1), "499 lines: {lines:?}");
    ng.finish();
}
