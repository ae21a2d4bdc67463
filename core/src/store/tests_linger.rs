//! Tests of lingering multi-channel listeners (see `listeners::linger`): taken over by their
//! connection's next request without the zone, released by news, other requests, time and
//! shutdown, and never for one-to-one channels.

use allocator_api2::alloc::Global;

use super::tests::{lopts, msg, popts, store_with_workers};
use super::*;
use crate::listeners::{ListenerKey, Listeners, Revive, Verdict, LINGER_MS};
use std::vec::Vec;

const CONN: u64 = 41;

/// Parks handle `h` on `channels` (none with news) for connection [`CONN`].
fn park_multi(
    s: &mut Store<Global>,
    l: &mut Listeners<u32>,
    channels: &[(&[u8], MsgId)],
    slot: u32,
    h: u32,
) -> ListenerKey {
    let MultiListen::Park(parked) = s.listen_multi(channels, &lopts(slot), 1, &mut vec![]).unwrap()
    else {
        panic!("nothing newer")
    };
    l.park_multi(channels.iter().map(|c| c.0), &parked, h, Some(CONN))
}

/// Publishes `body` on `name` and works the wake-up through: the verdicts.
fn publish_and_wake(
    s: &mut Store<Global>,
    l: &mut Listeners<u32>,
    slot: u32,
    name: &[u8],
    body: &[u8],
) -> Vec<(u32, Verdict)> {
    s.publish_msg(name, &msg(body), &popts(10), 2, &mut vec![]).unwrap();
    let mut serials = vec![];
    s.take_mailbox(slot, &mut serials);
    let mut out = vec![];
    l.begin_wake(&serials, MsgId::MAX);
    for &serial in &serials {
        l.wake(s, serial, slot, 2, &mut out, &mut vec![]);
    }
    l.end_wake();
    out
}

fn etag_of(out: &[(u32, Verdict)], name: &str) -> MsgId {
    let [(_, Verdict::Batch(body))] = out else { panic!("{out:?}") };
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    v["channels"][name]["etag"].as_str().unwrap().parse().unwrap()
}

fn release_all(s: &mut Store<Global>, l: &mut Listeners<u32>, key: ListenerKey, slot: u32) {
    l.remove(key, |r| s.release(&r.name, r.serial, slot, 1, r.last));
}

#[test]
fn an_answered_listener_lingers_counted_and_its_next_request_takes_it_over() {
    let (mut s, slots) = store_with_workers(1);
    let mut l: Listeners<u32> = Listeners::default();
    let key = park_multi(&mut s, &mut l, &[(b"a", 0), (b"b", 0), (b"c", 0)], slots[0], 7);
    let out = publish_and_wake(&mut s, &mut l, slots[0], b"b", b"1");
    let b1 = etag_of(&out, "b");
    assert_eq!(out[0].0, 7);
    assert_eq!((l.len(), l.lingering_len()), (0, 1));
    assert_eq!(s.total_listeners(), 3, "its entries stay counted");
    s.check();
    // The next request with the ids it was given takes it over, with its new handle.
    let next = [(&b"a"[..], 0), (&b"b"[..], b1), (&b"c"[..], 0)];
    assert_eq!(l.revive(CONN, &next, 8, Some(CONN)), Revive::Revived(key));
    assert_eq!((l.len(), l.lingering_len(), l.entries()), (1, 0, 3));
    // It waits past the ids it sent: the next message on b, and one on c, reach it.
    let out = publish_and_wake(&mut s, &mut l, slots[0], b"c", b"2");
    let c2 = etag_of(&out, "c");
    assert_eq!(out[0].0, 8);
    let again = [(&b"a"[..], 0), (&b"b"[..], b1), (&b"c"[..], c2)];
    assert_eq!(l.revive(CONN, &again, 9, Some(CONN)), Revive::Revived(key));
    let out = publish_and_wake(&mut s, &mut l, slots[0], b"b", b"3");
    assert_eq!(out[0].0, 9);
    assert!(etag_of(&out, "b") > b1);
    s.check();
}

#[test]
fn news_another_request_time_and_shutdown_release_a_lingering_listener() {
    let (mut s, slots) = store_with_workers(1);
    let slot = slots[0];
    let mut l: Listeners<u32> = Listeners::default();
    // News on one of its channels before the next request: released, nothing answered.
    park_multi(&mut s, &mut l, &[(b"a", 0), (b"b", 0)], slot, 1);
    let a1 = etag_of(&publish_and_wake(&mut s, &mut l, slot, b"a", b"1"), "a");
    assert!(publish_and_wake(&mut s, &mut l, slot, b"b", b"2").is_empty());
    assert_eq!((l.lingering_len(), l.entries(), s.total_listeners()), (0, 0, 0));
    assert_eq!(l.revive(CONN, &[(b"a", a1), (b"b", 0)], 2, None), Revive::Absent);
    s.check();
    // Another request (an older id, fewer channels, another order): stale, for the caller
    // to remove.
    for variant in 0..3 {
        let b0 = s.last_id();
        let key = park_multi(&mut s, &mut l, &[(b"a", a1), (b"b", b0)], slot, 3);
        let b3 = etag_of(&publish_and_wake(&mut s, &mut l, slot, b"b", b"3"), "b");
        let next: Vec<(&[u8], MsgId)> = match variant {
            0 => vec![(b"a", a1), (b"b", b0)],
            1 => vec![(b"a", a1)],
            _ => vec![(b"b", b3), (b"a", a1)],
        };
        assert_eq!(l.revive(CONN, &next, 4, None), Revive::Stale(key));
        release_all(&mut s, &mut l, key, slot);
        assert_eq!((l.lingering_len(), l.entries(), s.total_listeners()), (0, 0, 0));
        s.check();
    }
    // Time: due once LINGER_MS passed, not before.
    let key = park_multi(&mut s, &mut l, &[(b"x", 0), (b"y", 0)], slot, 5);
    publish_and_wake(&mut s, &mut l, slot, b"x", b"4");
    assert!(l.lingering_due(1, 100).is_empty());
    assert_eq!(l.lingering_due(2 + LINGER_MS, 100), vec![key]);
    release_all(&mut s, &mut l, key, slot);
    assert_eq!((l.lingering_len(), s.total_listeners()), (0, 0));
    // Shutdown: its entries are released, its spent handle is not answered.
    let last = s.last_id();
    park_multi(&mut s, &mut l, &[(b"x", last), (b"y", 0)], slot, 6);
    publish_and_wake(&mut s, &mut l, slot, b"y", b"5");
    let (releases, handles) = l.drain_all();
    assert!(handles.is_empty(), "{handles:?}");
    for (r, n) in releases {
        s.release(&r.name, r.serial, slot, n, r.last);
    }
    assert_eq!(s.total_listeners(), 0);
    s.check();
}

#[test]
fn one_to_one_channels_and_listeners_without_a_connection_leave_at_once() {
    let (mut s, slots) = store_with_workers(1);
    let slot = slots[0];
    let mut l: Listeners<u32> = Listeners::default();
    let on = AttrUpdate { one2one: Some(true), ..AttrUpdate::default() };
    s.publish(b"solo", None, &on, &popts(10), 1, &mut vec![]).unwrap();
    park_multi(&mut s, &mut l, &[(b"solo", 0), (b"b", 0)], slot, 1);
    assert_eq!(publish_and_wake(&mut s, &mut l, slot, b"solo", b"1").len(), 1);
    assert_eq!((l.lingering_len(), s.total_listeners()), (0, 0));
    let MultiListen::Park(parked) =
        s.listen_multi(&[(b"b", 0), (b"c", 0)], &lopts(slot), 1, &mut vec![]).unwrap()
    else {
        panic!()
    };
    l.park_multi([&b"b"[..], b"c"].into_iter(), &parked, 2, None);
    assert_eq!(publish_and_wake(&mut s, &mut l, slot, b"c", b"2").len(), 1);
    assert_eq!((l.lingering_len(), s.total_listeners()), (0, 0));
    s.check();
}
