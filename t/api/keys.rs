//! Channel keys: the first push with a key sets it; every later push and DELETE must carry it
//! (argument or `X-Martd-Key`), else 403; the key is never echoed.

use super::*;

const KEY: &str = "s3cr3t-KeY-7f1c";
const WRONG: &str = "wr0ng-KeY-88aa";

/// Every response of a test, to check at the end that no key was ever echoed.
#[derive(Default)]
struct Seen(Vec<Resp>);

impl Seen {
    fn add(&mut self, r: &Resp) -> Resp {
        self.0.push(r.clone());
        r.clone()
    }

    fn check_never_echoed(&self, keys: &[&str]) {
        for r in &self.0 {
            let body = String::from_utf8_lossy(&r.body);
            for k in keys {
                assert!(!body.contains(k), "key {k:?} echoed in a body: {body:?}");
                for (name, v) in &r.headers {
                    let v = String::from_utf8_lossy(v.as_bytes());
                    assert!(!v.contains(k), "key {k:?} echoed in header {name}: {v:?}");
                }
            }
        }
    }
}

fn expect_ok(r: &Resp, what: &str) {
    assert!((200..=202).contains(&r.status), "{what}: {} {:?}", r.status, r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_channel_json_push_and_delete() {
    let ng = Nginx::start(api_conf(""));
    let (mut c, b) = Conn::pair(ng.port).await;
    let mut seen = Seen::default();
    let with_key = format!("key={KEY}");
    let wrong = format!("key={WRONG}");
    let key_plus = format!("key={KEY}x");

    let r = seen.add(&c.send("POST", &pub_target("/jpub", "k", &with_key), &[], "one").await);
    let first = expect_pub_reply(&r, "first push with a key");
    let before = state(&jinfo(&mut c, "k").await);
    assert_eq!(before, Some((1, 0, Some(first.etag))));

    // Missing or wrong key: 403, nothing stored, a waiting listener not woken.
    let l = b.spawn_get(&jsub("/jsub", &[("k", &first.etag.to_string())]), &[], LONG);
    c.wait_listeners("k", 1).await;
    for (args, headers, what) in [
        ("", &[][..], "no key"),
        (wrong.as_str(), &[][..], "wrong key argument"),
        ("", &[("x-martd-key", WRONG)][..], "wrong key header"),
        ("key=s3cr3t", &[][..], "a prefix of the key"),
        (key_plus.as_str(), &[][..], "the key plus a byte"),
        ("size=3", &[][..], "attribute-only push without the key"),
    ] {
        for body in ["two", ""] {
            let path = pub_target("/jpub", "k", args);
            let r = seen.add(&c.send("POST", &path, headers, body).await);
            expect_json_error(&r, 403, &format!("{what}, body {body:?}: POST {path}"));
        }
    }
    let r = seen.add(&c.send("PUT", "/jpub?channel=k", &[], "put").await);
    expect_json_error(&r, 403, "PUT without the key");
    still_waiting(&l, 300, "listener after refused pushes").await;
    assert_eq!(state(&jinfo(&mut c, "k").await), Some((1, 1, Some(first.etag))), "unchanged");

    // The right key, as argument or header, works.
    let r = seen.add(&c.send("POST", &pub_target("/jpub", "k", &with_key), &[], "two").await);
    let two = expect_pub_reply(&r, "push with the key argument");
    assert_eq!(two.listeners, 1);
    let (_, resp) = promptly(l, "listener").await;
    seen.add(&resp);
    expect_texts(&resp, &[("k", &["two"])], "message pushed with the key");
    let r = seen.add(&c.send("POST", "/jpub?channel=k", &[("x-martd-key", KEY)], "three").await);
    expect_pub_reply(&r, "push with X-Martd-Key");
    // The argument wins over the header.
    let r = seen.add(
        &c.send("POST", &pub_target("/jpub", "k", &with_key), &[("x-martd-key", WRONG)], "4").await,
    );
    expect_pub_reply(&r, "right key argument, wrong header");
    let r = seen.add(
        &c.send("POST", &pub_target("/jpub", "k", &wrong), &[("x-martd-key", KEY)], "5").await,
    );
    expect_json_error(&r, 403, "wrong key argument, right header");

    // Info and listeners never show the key.
    for accept in ["application/json", "text/plain"] {
        seen.add(&c.get("/jpub?channel=k", &[("accept", accept)]).await);
        seen.add(&c.get("/pub?channel=k", &[("accept", accept)]).await);
        seen.add(&c.get(&format!("/pub?channel=k&key={KEY}"), &[("accept", accept)]).await);
    }
    let r = seen.add(&c.get(&jsub("/jsub", &[("k", "0")]), &[]).await);
    expect_texts(&r, &[("k", &["one", "two", "three", "4"])], "stored messages");
    let r = seen.add(&c.get("/sub?channel=k", &[]).await);
    assert_eq!(expect_msg(&r).text(), "one");

    // DELETE: missing or wrong key 403, the channel stays; the right key deletes it.
    let before = state(&jinfo(&mut c, "k").await);
    for (path, headers, what) in [
        ("/jpub?channel=k".to_string(), &[][..], "DELETE without the key"),
        (pub_target("/jpub", "k", &wrong), &[][..], "DELETE with a wrong key"),
        ("/jpub?channel=k".to_string(), &[("x-martd-key", WRONG)][..], "DELETE, wrong header"),
        ("/pub?channel=k".to_string(), &[][..], "relay DELETE without the key"),
    ] {
        let r = seen.add(&c.send("DELETE", &path, headers, "").await);
        expect_json_error(&r, 403, what);
    }
    assert_eq!(state(&jinfo(&mut c, "k").await), before, "refused DELETEs changed the channel");
    let r = seen.add(&c.send("DELETE", "/jpub?channel=k", &[("x-martd-key", KEY)], "").await);
    assert_eq!(r.status, 200, "DELETE with the key: {}", r.text());
    assert_eq!(media_type(&r).as_deref(), Some("application/json"));
    assert_eq!(parse_info_json(&r.text()).messages, 4, "DELETE answers the info as it was");
    assert!(jinfo(&mut c, "k").await.is_none(), "deleted");
    // The key went with the channel: a push without one creates it anew.
    let r = seen.add(&c.send("POST", "/jpub?channel=k", &[], "fresh").await);
    expect_pub_reply(&r, "push after the keyed channel was deleted");
    seen.check_never_echoed(&[KEY, WRONG]);
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_channel_relay_mode() {
    let ng = Nginx::start(api_conf(""));
    let mut c = Conn::open_probed(ng.port).await;
    let mut seen = Seen::default();
    let r = seen.add(&c.send("POST", "/pub?channel=rk", &[("x-martd-key", KEY)], "one").await);
    expect_ok(&r, "relay push setting the key by header");
    let r = seen.add(&c.send("POST", "/pub?channel=rk", &[], "two").await);
    expect_json_error(&r, 403, "relay push without the key");
    let r = seen.add(&c.send("POST", &format!("/pub?channel=rk&key={WRONG}"), &[], "two").await);
    expect_json_error(&r, 403, "relay push with a wrong key");
    // The key set in relay mode holds in json mode too.
    let r = seen.add(&c.send("POST", "/jpub?channel=rk", &[], "two").await);
    expect_json_error(&r, 403, "json push without the relay-set key");
    let r = seen.add(&c.send("POST", &format!("/pub?channel=rk&key={KEY}"), &[], "two").await);
    expect_ok(&r, "relay push with the key argument");
    assert_eq!(c.info("rk").await.unwrap().messages, 2);
    let r = seen.add(&c.send("DELETE", "/pub?channel=rk", &[("x-martd-key", WRONG)], "").await);
    expect_json_error(&r, 403, "relay DELETE with a wrong key");
    let r = seen.add(&c.send("DELETE", &format!("/pub?channel=rk&key={KEY}"), &[], "").await);
    assert_eq!(r.status, 200, "relay DELETE with the key: {}", r.text());
    assert!(c.info("rk").await.is_none());
    seen.check_never_echoed(&[KEY, WRONG]);
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_set_by_attribute_only_push_and_length_limit() {
    let ng = Nginx::start(api_conf(""));
    let mut c = Conn::open_probed(ng.port).await;
    // An attribute-only push may set the key.
    let r = jpub(&mut c, "ka", &format!("key={KEY}"), "").await;
    assert_eq!(r.etag, 0);
    let r = c.send("POST", "/jpub?channel=ka", &[], "x").await;
    expect_json_error(&r, 403, "push without the key set by an attribute-only push");
    assert_eq!(jinfo(&mut c, "ka").await.map(|i| i.messages), Some(0));

    // 256 bytes is the longest key; 257 is refused (and sets nothing).
    let k256 = "k".repeat(256);
    let k257 = "k".repeat(257);
    let r = c.send("POST", &format!("/jpub?channel=kl&key={k257}"), &[], "x").await;
    expect_json_error(&r, 400, "257-byte key");
    assert!(jinfo(&mut c, "kl").await.is_none(), "a refused push created the channel");
    jpub(&mut c, "kl", &format!("key={k256}"), "x").await;
    let r = c.send("POST", "/jpub?channel=kl", &[("x-martd-key", &k256[..255])], "x").await;
    expect_json_error(&r, 403, "255 bytes of the 256-byte key");
    jpub_h(&mut c, "kl", "", &[("x-martd-key", &k256)], "y").await;
    assert_eq!(jinfo(&mut c, "kl").await.map(|i| i.messages), Some(2));
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_and_attributes_survive_a_reload() {
    let mut ng = Nginx::start(api_conf(""));
    let mut c = Conn::open_probed(ng.port).await;
    jpub(&mut c, "kr", &format!("key={KEY}&size=2&one2one=true"), "m1").await;
    drop(c);
    ng.reload();
    let (mut c, d) = Conn::pair(ng.port).await;
    let r = c.send("POST", "/jpub?channel=kr", &[], "x").await;
    expect_json_error(&r, 403, "push without the key after a reload");
    for i in 2..=4 {
        jpub_h(&mut c, "kr", "", &[("x-martd-key", KEY)], format!("m{i}")).await;
    }
    assert_eq!(jinfo(&mut c, "kr").await.map(|i| i.messages), Some(2), "size=2 after a reload");
    let last = jinfo(&mut c, "kr").await.unwrap().last_id.unwrap().to_string();
    let l = Conn::open_on(ng.port, c.worker()).await.spawn_get(
        &jsub("/jsub", &[("kr", &last)]),
        &[],
        LONG,
    );
    c.wait_listeners("kr", 1).await;
    let (_, r) = promptly(d.spawn_get(&jsub("/jsub", &[("kr", &last)]), &[], LONG), "second").await;
    expect_json_error(&r, 409, "one2one after a reload");
    jpub_h(&mut c, "kr", "", &[("x-martd-key", KEY)], "m5").await;
    let (_, r) = promptly(l, "the one2one listener").await;
    expect_texts(&r, &[("kr", &["m5"])], "after a reload");
    ng.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_push_with_a_key_sets_it_on_an_existing_channel() {
    let ng = Nginx::start(api_conf(""));
    let mut c = Conn::open_probed(ng.port).await;
    jpub(&mut c, "late", "", "open").await;
    jpub(&mut c, "late", "", "still open").await;
    jpub(&mut c, "late", &format!("key={KEY}"), "locked").await;
    let r = c.send("POST", "/jpub?channel=late", &[], "x").await;
    expect_json_error(&r, 403, "push without the key once a push set it");
    let r = c.send("POST", "/pub?channel=late", &[], "x").await;
    expect_json_error(&r, 403, "relay push without the key once a push set it");
    let r = c.send("DELETE", "/jpub?channel=late", &[], "").await;
    expect_json_error(&r, 403, "DELETE without the key");
    // Another key is no way to change it.
    let r = c.send("POST", &format!("/jpub?channel=late&key={WRONG}"), &[], "x").await;
    expect_json_error(&r, 403, "a push with another key");
    assert_eq!(jinfo(&mut c, "late").await.map(|i| i.messages), Some(3));
    ng.finish();
}
