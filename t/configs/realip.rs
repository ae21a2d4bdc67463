//! `realip` and `allow`/`deny` in the listen location.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realip_kept_on_replay() {
    let rip = "set_real_ip_from 127.0.0.1; real_ip_header X-Forwarded-For; \
               deny 10.9.9.9; deny 127.0.0.1; allow all;";
    let ng = Nginx::start(
        Conf::new(&format!(
            "        location = /pub {{ martd_push; }}
        location = /sub {{ martd_listen; {rip} access_log logs/rip.log rip; }}
        location = /sub-short {{ martd_listen; martd_listener_timeout 1s; {rip} access_log logs/rip.log rip; }}
        location = /sub-parked {{ martd_listen; martd_detach_listeners off; {rip} access_log logs/rip.log rip; }}
        location = /sub-parked-short {{ martd_listen; martd_detach_listeners off; martd_listener_timeout 1s; {rip} access_log logs/rip.log rip; }}
"
        ))
        .http("log_format rip '$remote_addr $status $uri $args';"),
    );
    let port = ng.port;
    let log = ng.prefix().join("logs/rip.log");
    let w = ng.worker_pids();
    let mut p = Conn::open_on(port, w[1]).await;
    for path in ["/sub", "/sub-parked"] {
        // Allowed by its forwarded address, answered by a message from the other worker.
        let ch = format!("rip{}", path.len());
        let l = listen_on(
            port,
            w[0],
            &format!("{path}?channel={ch}"),
            &[("x-forwarded-for", "10.1.2.3")],
        )
        .await;
        p.wait_listeners(&ch, 1).await;
        assert_status(&p.publish(&ch, "to 10.1.2.3").await, 201, path);
        let (_, r) = promptly(l, path).await;
        expect_body(&r, "to 10.1.2.3", Some(w[0]), &format!("{path}: allowed forwarded address"));
        let line = one_log_line(&log, &format!("{path} channel={ch}"), path).await;
        assert_eq!(
            line,
            format!("10.1.2.3 200 {path} channel={ch}"),
            "{path}: the answer is logged with the address realip computed"
        );

        // The same at the listener timeout.
        let ch = format!("ript{}", path.len());
        let r = within(
            Duration::from_secs(1) + PROMPT,
            "304",
            listen_on(
                port,
                w[0],
                &format!("{path}-short?channel={ch}"),
                &[("x-forwarded-for", "10.4.4.4")],
            )
            .await
            .resp(),
        )
        .await;
        assert_status(&r, 304, &format!("{path}-short: listener timeout"));
        let line = one_log_line(&log, &format!("channel={ch}"), path).await;
        assert_eq!(line, format!("10.4.4.4 304 {path}-short channel={ch}"), "{path}-short");

        // deny on the computed address; and the connection's own address is denied too.
        let mut c = Conn::open_on(port, w[0]).await;
        let r = c.get(&format!("{path}?channel={ch}"), &[("x-forwarded-for", "10.9.9.9")]).await;
        assert_status(&r, 403, &format!("{path}: denied forwarded address"));
        let r = c.get(&format!("{path}?channel={ch}"), &[]).await;
        assert_status(&r, 403, &format!("{path}: denied connection address"));
    }
    ng.finish();
}
