//! `martd_authorize_request`: an internal subrequest decides before a listener waits or a push
//! is accepted (2xx allows, 401/403 go to the client, anything else is a 500 with a log line),
//! it sees the channel(s) in `$martd_channel_id`, and it runs once per request: a detached
//! listener's replay does not ask again.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_authorization_subrequest_decides_once_per_request() {
    // The application's check: it answers by the channel it is asked about.
    let app = Backend::start(Duration::ZERO, |target| {
        let status = if target.contains("secret") {
            "403 Forbidden"
        } else if target.contains("login") {
            "401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"martd\""
        } else if target.contains("broken") {
            "502 Bad Gateway"
        } else {
            "204 No Content"
        };
        format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    })
    .await;
    let mut ng = Nginx::start(Conf::new(&format!(
        "        location = /pub {{ martd_push; }}
        location = /apub {{ martd_push; martd_authorize_request /auth; }}
        location = /sub {{ martd_listen; martd_authorize_request /auth; }}
        location = /subs {{ martd_listen; martd_authorize_request /auth;
                           martd_channel_id $arg_chs; martd_channel_id_delimiter \"|\"; }}
        location = /jsub {{ martd_listen json; martd_authorize_request /auth; }}
        location = /open {{ martd_listen; martd_authorize_request off; }}
        location = /es {{ martd_listen eventsource; martd_authorize_request /auth; }}
        location = /auth {{ internal; proxy_pass_request_body off;
                           proxy_set_header Content-Length \"\";
                           proxy_pass http://127.0.0.1:{}/check?channel=$martd_channel_id; }}
",
        app.port
    )));
    ng.allow_log("answered 502");
    let w = ng.worker_pids();
    let mut p = Conn::open_on(ng.port, w[0]).await;
    // Allowed: the listener waits (detached), is woken, and its replay asks nothing more.
    let l = listen_on(ng.port, w[1], "/sub?channel=news", &[("If-None-Match", FUTURE)]).await;
    p.wait_listeners("news", 1).await;
    assert_eq!(app.count("channel=news"), 1);
    assert_published(&p.publish("news", "hello").await, "publish");
    let (_, r) = promptly(l, "allowed listener").await;
    assert_eq!((r.status, r.text().as_str()), (200, "hello"));
    assert_eq!(app.count("channel=news"), 1, "the replayed request asked again");
    // Refused: 403 and 401 (with the application's WWW-Authenticate) go to the client, never
    // counted as listeners; anything else is a 500 and an error log line.
    let mut c = Conn::open(ng.port).await;
    let r = c.get("/sub?channel=secret", &[]).await;
    assert_status(&r, 403, "forbidden");
    let r = c.get("/sub?channel=login", &[]).await;
    assert_status(&r, 401, "unauthorized");
    assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"martd\""));
    let r = c.get("/sub?channel=broken", &[]).await;
    assert_status(&r, 500, "broken check");
    assert!(ng.log().contains("martd_authorize_request \"/auth\" answered 502"), "no log line");
    for ch in ["secret", "login", "broken"] {
        assert_eq!(p.info(ch).await.map_or(0, |i| i.listeners), 0, "{ch} counted a listener");
    }
    // The channels of a list and of a JSON request, as the subrequest sees them (a new
    // connection: nginx closes one after a 500).
    let mut c = Conn::open(ng.port).await;
    let r = c.get("/subs?chs=a1|secret", &[]).await;
    assert_status(&r, 403, "a list with a forbidden channel");
    assert_eq!(app.count("channel=a1|secret"), 1, "{:?}", app.requests());
    p.publish("j1", "stored").await;
    let r = c.get("/jsub?cid=x&j1=0&j2=0", &[]).await;
    assert_status(&r, 200, "json listen");
    assert_eq!(app.count("channel=j1,j2"), 1, "{:?}", app.requests());
    // A push: checked before its body is read; refused, nothing is stored.
    let r = c.send("POST", "/apub?channel=secret", &[], "no").await;
    assert_status(&r, 403, "forbidden push");
    assert!(p.info("secret").await.is_none_or(|i| i.messages == 0), "a refused push stored");
    let r = c.send("POST", "/apub?channel=news", &[], "yes").await;
    assert_published(&r, "allowed push");
    // A stream, allowed then woken; refused.
    let s = Streaming::open(
        Conn::open(ng.port).await,
        "/es?channel=streamed",
        &[("Accept", "text/event-stream")],
        QUICK,
    )
    .await;
    assert_eq!(s.status, 200);
    let mut ev = s.events();
    p.wait_listeners("streamed", 1).await;
    p.publish("streamed", "live").await;
    assert_eq!(ev.next(PROMPT).await.expect("an event").data, "live");
    let r = c.get("/es?channel=secret", &[("Accept", "text/event-stream")]).await;
    assert_status(&r, 403, "forbidden stream");
    // Off: no subrequest.
    let before = app.requests().len();
    assert_status(&c.get("/open?channel=news", &[]).await, 200, "off");
    assert_eq!(app.requests().len(), before);
    ng.finish();
}
