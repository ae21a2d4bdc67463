//! EventSource streams inside realistic configurations: reached by `X-Accel-Redirect` and
//! `error_page`, behind `auth_request`, with a `mirror` subrequest still running, under
//! `limit_req`; each delivers from both workers, gives its request back where it can, and
//! leaves its channel when its client goes.

use super::*;

const SSE: (&str, &str) = ("Accept", "text/event-stream");

/// Opens an EventSource on `path` from a new connection served by worker `pid`.
async fn es_on(port: u16, pid: u32, path: &str) -> Events {
    let s = Streaming::open(Conn::open_on(port, pid).await, path, &[SSE], QUICK).await;
    assert_eq!(s.status, 200, "{path}");
    assert_eq!(s.header("content-type"), Some("text/event-stream"), "{path}");
    s.events()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_through_redirects_subrequests_and_limits() {
    let app = Backend::start(Duration::ZERO, |target| {
        let channel = target.split("channel=").nth(1).unwrap_or("none").to_string();
        accel_redirect(&format!("/internal-es?channel={channel}"))
    })
    .await;
    let slow = Backend::slow(Duration::from_secs(2)).await;
    let mut conf = Conf::new(&format!(
        "        location = /pub {{ martd_push; }}
        location = /app {{ proxy_pass http://127.0.0.1:{app}; }}
        location = /internal-es {{ internal; martd_listen eventsource; martd_channel_id $arg_channel; }}
        location = /gone {{ error_page 404 = /es-fallback?channel=$arg_channel; return 404; }}
        location = /es-fallback {{ internal; martd_listen eventsource; martd_channel_id $arg_channel; }}
        location = /es-auth {{ auth_request /auth; martd_listen eventsource; martd_channel_id $arg_channel; }}
        location = /es-denied {{ auth_request /deny; martd_listen eventsource; martd_channel_id $arg_channel; }}
        location = /auth {{ internal; return 204; }}
        location = /deny {{ internal; return 403; }}
        location = /es-mirror {{ mirror /mirror; martd_listen eventsource; martd_channel_id $arg_channel; }}
        location = /mirror {{ internal; proxy_pass http://127.0.0.1:{slow}; }}
        location = /es-limited {{ limit_req zone=streams burst=1 nodelay; martd_listen eventsource;
                                  martd_channel_id $arg_channel; }}
",
        app = app.port,
        slow = slow.port
    ))
    .http("limit_req_zone $binary_remote_addr zone=streams:1m rate=1r/m;");
    conf.main = "error_log logs/debug.log debug;".to_string();
    let ng = Nginx::start(conf);
    let w = ng.worker_pids();
    let mut p = Conn::open_on(ng.port, w[0]).await;
    let denied = Conn::open(ng.port).await.get("/es-denied?channel=s1", &[SSE]).await;
    assert_status(&denied, 403, "auth_request said no");
    let mut streams = Vec::new();
    for (i, path) in
        ["/app", "/gone", "/es-auth", "/es-mirror", "/es-limited", "/es-limited"].iter().enumerate()
    {
        streams.push(es_on(ng.port, w[i % 2], &format!("{path}?channel=s1")).await);
    }
    // limit_req (1 r/m, burst 1) lets two streams in; the third is refused.
    let r = Conn::open(ng.port).await.get("/es-limited?channel=s1", &[SSE]).await;
    assert_status(&r, 503, "limit_req over its burst");
    assert_eq!(app.count("channel=s1"), 1, "the backend was asked once");
    p.wait_listeners("s1", streams.len() as u64).await;
    // Messages from both workers, while the mirror subrequest still runs and after it ended.
    let mut p2 = Conn::open_on(ng.port, w[1]).await;
    let mut ids = Vec::new();
    for i in 0..10 {
        let c = if i % 2 == 0 { &mut p } else { &mut p2 };
        ids.push(assert_published(&c.publish("s1", format!("m{i}")).await, "publish").last_id);
    }
    slow.wait_count("/mirror", 1).await;
    within(QUICK, "the mirror subrequest answered", async {
        while slow.answered() < 1 {
            sleep_ms(20).await;
        }
    })
    .await;
    for i in 10..20 {
        ids.push(assert_published(&p.publish("s1", format!("m{i}")).await, "publish").last_id);
    }
    for ev in &mut streams {
        let got = ev.take(20, PROMPT).await;
        let want: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
        assert_eq!(got.iter().map(|e| e.data.clone()).collect::<Vec<_>>(), want);
        let got_ids: Vec<Option<u64>> = got.iter().map(|e| e.id.parse().ok()).collect();
        assert_eq!(got_ids, ids);
    }
    // Every one of them gave its request back: redirected, behind auth_request, limited, and
    // the mirrored one once its subrequest was done (nginx built with debug logging only).
    let debug = std::fs::read_to_string(ng.prefix().join("logs/debug.log")).unwrap_or_default();
    if debug.contains("[debug]") {
        let n = debug.matches("streaming subscriber writes without its request").count();
        assert_eq!(n, streams.len(), "streams that gave their request back");
    }
    drop(streams);
    p.wait_listeners("s1", 0).await;
    ng.finish();
}
