//! JSONP: `callback=NAME` wraps the JSON listener's reply as `NAME(...);`
//! (`application/javascript`); bad names get 400, and errors stay JSON.

use super::*;

/// A JSONP 200: `application/javascript`, `NAME({...});`; returns the channels.
fn expect_jsonp(r: &Resp, name: &str, what: &str) -> BTreeMap<String, Batch> {
    assert_eq!(r.status, 200, "{what}: {} {:?} {:?}", r.status, r.headers, r.text());
    assert_eq!(
        media_type(r).as_deref(),
        Some("application/javascript"),
        "{what}: Content-Type: {:?}",
        r.headers
    );
    let text = r.text();
    let inner = unwrap_jsonp(&text, name, what);
    parse_channels(&parse_json(inner.as_bytes(), what), what)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_callback_wraps_reply_as_javascript() {
    let ng = Nginx::start(api_conf(""));
    let (mut c, d) = Conn::pair(ng.port).await;
    let id = jpub(&mut c, "j1", "", "hello \"js\" </script>").await.etag;
    jpub(&mut c, "j1", "", b"\xff\x00".to_vec()).await;
    let longest = format!("a{}", "b".repeat(63));
    for name in ["cb", "_", "$", "_x9", "jQuery3_1_0.cb$0", "a.b.c", "$.x_", longest.as_str()] {
        let path = format!("{}&callback={name}", jsub("/jsub", &[("j1", "0")]));
        let r = c.get(&path, &[]).await;
        let chans = expect_jsonp(&r, name, &format!("callback={name}"));
        assert_eq!(chans.len(), 1, "{chans:?}");
        assert_eq!(
            chans["j1"].payload,
            [Item::Text("hello \"js\" </script>".into()), Item::Binary(vec![0xff, 0])],
            "callback={name}"
        );
    }
    // A waiting JSONP listener (on the other worker) gets the message wrapped.
    let path =
        format!("{}&callback=got", jsub("/jsub", &[("j2", "0"), ("j1", "99999999999999999")]));
    let l = d.spawn_get(&path, &[], LONG);
    c.wait_listeners("j2", 1).await;
    jpub(&mut c, "j2", "", "woken").await;
    let (_, r) = promptly(l, "waiting JSONP listener").await;
    let chans = expect_jsonp(&r, "got", "waiting JSONP listener");
    assert_eq!(chans["j2"].texts(), ["woken"]);
    assert!(!chans.contains_key("j1"));
    // Its timeout reply is wrapped too.
    let path = format!(
        "{}&callback=t.o",
        jsub("/jsub-short", &[("j1", &(id + 10_000_000_000).to_string())])
    );
    let r = within(PROMPT + Duration::from_secs(1), "JSONP timeout", c.get(&path, &[])).await;
    assert!(expect_jsonp(&r, "t.o", "JSONP timeout").is_empty());
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_callback_names_400() {
    let ng = Nginx::start(api_conf(""));
    let mut c = Conn::open_probed(ng.port).await;
    jpub(&mut c, "jb", "", "m").await;
    let before = state(&jinfo(&mut c, "jb").await);
    let too_long = format!("a{}", "b".repeat(64));
    for name in [
        "a-b",
        "1a",
        "9",
        "%3Cscript%3E",
        "a%2Db",
        too_long.as_str(),
        "",
        "a(b)",
        "a;b",
        "a,b",
        "a:b",
    ] {
        let path = format!("{}&callback={name}", jsub("/jsub", &[("jb", "0")]));
        let r = c.get(&path, &[]).await;
        expect_json_error(&r, 400, &format!("callback={name:?}"));
    }
    // Bytes hyper will not put in a URI, on a raw connection.
    for name in ["<script>", "a\"b", "a{b}", "a|b", "a^b", "a`b"] {
        let head = format!(
            "GET {}&callback={name} HTTP/1.1\r\nHost: t\r\n",
            jsub("/jsub", &[("jb", "0")])
        );
        let r = raw_to_resp(raw_request(ng.port, head.as_bytes(), b"").await);
        expect_json_error(&r, 400, &format!("raw callback={name:?}"));
    }
    // Nothing changed, and a valid name still works.
    assert_eq!(state(&jinfo(&mut c, "jb").await), before, "the channel changed");
    let r = c.get(&format!("{}&callback=ok", jsub("/jsub", &[("jb", "0")])), &[]).await;
    assert_eq!(expect_jsonp(&r, "ok", "valid after invalid")["jb"].texts(), ["m"]);
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_with_a_callback_stay_json() {
    let ng = Nginx::start(api_conf(""));
    let w = ng.worker_pids();
    let mut p = Conn::open_on(ng.port, w[0]).await;
    // 400: a bad etag.
    let r = p.get(&format!("{}&callback=cb", jsub("/jsub", &[("je", "abc")])), &[]).await;
    expect_json_error(&r, 400, "bad etag with a callback");
    // 409: a one2one channel with a listener waiting.
    jpub(&mut p, "jo", "one2one=true", "").await;
    let first =
        listen_on(ng.port, w[0], &format!("{}&callback=cb", jsub("/jsub", &[("jo", "0")]))).await;
    p.wait_listeners("jo", 1).await;
    let second =
        listen_on(ng.port, w[1], &format!("{}&callback=cb", jsub("/jsub", &[("jo", "0")]))).await;
    let (_, r) = promptly(second, "second one2one JSONP listener").await;
    expect_json_error(&r, 409, "second one2one listener with a callback");
    // 410: its channel deleted.
    let r = p.send("DELETE", "/jpub?channel=jo", &[], "").await;
    assert_eq!(r.status, 200);
    let (_, r) = promptly(first, "JSONP listener of a deleted channel").await;
    expect_json_gone(&r, "jo", "JSONP listener of a deleted channel");
    ng.finish();
}
