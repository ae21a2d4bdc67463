//! Channel events (`martd_channel_events_channel`): channels made and removed, listeners
//! joining and leaving, published as JSON messages of the events channel in the order they
//! happen, across workers, including a listener whose worker is killed.

use super::*;

/// A far-future etag: the listener waits.
const WAIT: (&str, &str) = ("If-None-Match", "\"9000000000000000000\"");

fn events_conf() -> Conf {
    api_conf("        location = /ev { martd_listen eventsource; }")
        .http("martd_channel_events_channel events;")
}

/// The next `n` events, as (event name, channel, listeners), checking each is the JSON its
/// EventSource event name says.
async fn next_events(ev: &mut Events, n: usize) -> Vec<(String, String, u64)> {
    ev.take(n, PROMPT)
        .await
        .into_iter()
        .map(|e| {
            let v = parse_json(e.data.as_bytes(), "event");
            let o = object_with_keys(&v, &["event", "channel", "listeners"], "event");
            assert_eq!(o["event"], e.event.as_str(), "{e:?}");
            let ch = o["channel"].as_str().expect("channel").to_string();
            (e.event.clone(), ch, o["listeners"].as_u64().expect("listeners"))
        })
        .collect()
}

fn ev(kind: &str, ch: &str, n: u64) -> (String, String, u64) {
    (kind.to_string(), ch.to_string(), n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_events_come_in_order_from_every_worker() {
    let mut ng = Nginx::start(events_conf());
    ng.allow_log("exited on signal 9");
    let w = ng.worker_pids();
    let mut a = Conn::open_on(ng.port, w[0]).await;
    let mut b = Conn::open_on(ng.port, w[1]).await;
    // The backend watches the events channel (its own listener makes no event).
    let s = Streaming::open(
        Conn::open_on(ng.port, w[1]).await,
        "/ev?channel=events",
        &[("Accept", "text/event-stream")],
        LONG,
    )
    .await;
    assert_eq!(s.status, 200);
    let mut events = s.events();
    a.wait_listeners("events", 1).await;
    a.publish("room", "hi").await;
    let l1 = Conn::open_on(ng.port, w[1]).await.spawn_get("/sub?channel=room", &[WAIT], LONG);
    a.wait_listeners("room", 1).await;
    let l0 = Conn::open_on(ng.port, w[0]).await.spawn_get("/sub?channel=room", &[WAIT], LONG);
    a.wait_listeners("room", 2).await;
    assert_eq!(
        next_events(&mut events, 3).await,
        [
            ev("channel_created", "room", 0),
            ev("listener_joined", "room", 1),
            ev("listener_joined", "room", 2)
        ]
    );
    // Both answered by one message: each worker's listener leaves (in either order).
    b.publish("room", "m").await;
    for l in [l0, l1] {
        assert_eq!(l.resp().await.text(), "m");
    }
    let left = next_events(&mut events, 2).await;
    assert_eq!(left, [ev("listener_left", "room", 1), ev("listener_left", "room", 0)]);
    // A client that goes leaves too; a delete removes the channel.
    let gone = Conn::open_on(ng.port, w[0]).await.spawn_get("/sub?channel=room", &[WAIT], LONG);
    a.wait_listeners("room", 1).await;
    drop(gone);
    a.wait_listeners("room", 0).await;
    assert_eq!(b.send("DELETE", "/pub?channel=room", &[], "").await.status, 200);
    assert_eq!(
        next_events(&mut events, 3).await,
        [
            ev("listener_joined", "room", 1),
            ev("listener_left", "room", 0),
            ev("channel_deleted", "room", 0)
        ]
    );
    // A worker killed with a listener: it leaves when the channel is next touched.
    let doomed = Conn::open_on(ng.port, w[0]).await.spawn_get("/sub?channel=c2", &[WAIT], LONG);
    b.wait_listeners("c2", 1).await;
    assert_eq!(
        next_events(&mut events, 2).await,
        [ev("channel_created", "c2", 0), ev("listener_joined", "c2", 1)]
    );
    ng.kill_worker(w[0], libc::SIGKILL);
    ng.wait_respawn(w[0]);
    drop(doomed);
    b.publish("c2", "after").await;
    assert_eq!(next_events(&mut events, 1).await, [ev("listener_left", "c2", 0)]);
    // The events channel is an ordinary channel: what it stores can be read later.
    let r = b.get("/sub?channel=events", &[]).await;
    assert_eq!(r.status, 200);
    let first = parse_json(&r.body, "first stored event");
    assert_eq!(first["event"], "channel_created");
    assert_eq!(r.header("content-type"), Some("application/json"));
    ng.finish();
}
