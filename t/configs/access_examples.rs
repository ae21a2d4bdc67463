//! The access examples shipped in nginx-conf/access/ (IP allow-lists with `allow`/`deny`, a
//! shared cookie checked with `map` and `if`), included as they are: a refused client gets
//! `403` and is never counted as a listener; an allowed one listens and is woken.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_access_examples_work() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("nginx-conf/access");
    let ng = Nginx::start(
        Conf::new(&format!("        include {};\n", dir.join("locations.conf").display()))
            .http(&format!("include {};", dir.join("http.conf").display())),
    );
    let w = ng.worker_pids();
    let mut p = Conn::open_on(ng.port, w[0]).await;
    let r = p.send("POST", "/acl/pub?channel=acl", &[], "m1").await;
    assert!(r.status == 202 || r.status == 201, "publish from 127.0.0.1: {}", r.status);
    // The office location admits 127.0.0.1 (the test's address).
    let r = Conn::open_on(ng.port, w[1]).await.get("/acl/office/sub?channel=acl", &[]).await;
    assert_status(&r, 200, "office listener from 127.0.0.1");
    assert_eq!(r.text(), "m1");
    // The members location: no cookie, a wrong one: 403, not counted; the right one: listens.
    for cookie in [None, Some("martd_session=guess"), Some("martd_session=7f3c9a1e-members-onlyX")]
    {
        let headers: Vec<(&str, &str)> = cookie.map(|c| ("Cookie", c)).into_iter().collect();
        let r = Conn::open(ng.port).await.get("/acl/members/sub?channel=acl", &headers).await;
        assert_status(&r, 403, &format!("members listener with {cookie:?}"));
    }
    let mut c = Conn::open(ng.port).await;
    assert_eq!(listeners(&mut c).await, 0, "refused ones counted");
    let cookie = [("Cookie", "theme=dark; martd_session=7f3c9a1e-members-only")];
    let l = Conn::open_on(ng.port, w[1]).await.spawn_get(
        "/acl/members/sub?channel=acl",
        &[cookie[0], ("If-None-Match", FUTURE)],
        LONG,
    );
    within(QUICK, "the member waits", async {
        while listeners(&mut c).await != 1 {
            sleep_ms(20).await;
        }
    })
    .await;
    p.send("POST", "/acl/pub?channel=acl", &[], "m2").await;
    let (_, r) = promptly(l, "member").await;
    assert_eq!((r.status, r.text().as_str()), (200, "m2"));
    ng.finish();
}

/// The channel's waiting listeners, from the example's publisher location.
async fn listeners(c: &mut Conn) -> u64 {
    let r = c.get("/acl/pub?channel=acl", &[]).await;
    assert_status(&r, 200, "channel info");
    parse_info_text(&r.text()).listeners
}
