//! Tests of martd's API in the store and the listeners: attributes, keys, one-to-one
//! delivery and its election, multi-channel listeners.

use allocator_api2::alloc::Global;

use super::tests::{lopts, msg, popts, store_with_workers};
use super::*;
use crate::key::hash_key;
use crate::listeners::{Listeners, Verdict};
use std::vec::Vec;

fn attrs() -> AttrUpdate {
    AttrUpdate::default()
}

fn park(s: &mut Store<Global>, name: &[u8], since: Since, slot: u32, now: u64) -> Parked {
    match s.listen(name, since, &lopts(slot), now, &mut vec![]) {
        Ok(Listen::Park(p)) => p,
        Ok(Listen::Message(_)) => panic!("expected to park"),
        Err(e) => panic!("{e:?}"),
    }
}

fn bodies(s: &mut Store<Global>, name: &[u8], now: u64) -> Vec<Vec<u8>> {
    let p = s.channels.find(name).unwrap();
    // SAFETY: a live channel of the test store.
    let ch = unsafe { p.as_ref() };
    ch.messages_after(0, now, false).map(|m| m.body().to_vec()).collect()
}

#[test]
fn size_and_life_are_per_channel_and_bounded() {
    let (mut s, _) = store_with_workers(1);
    let mut w = vec![];
    let small = AttrUpdate { size: Some(2), ..attrs() };
    for b in [b"1", b"2", b"3"] {
        s.publish(b"small", Some(&msg(b)), &small, &popts(10), 1_000, &mut w).unwrap();
        s.publish(b"big", Some(&msg(b)), &attrs(), &popts(10), 1_000, &mut w).unwrap();
    }
    assert_eq!(bodies(&mut s, b"small", 1_000), vec![b"2".to_vec(), b"3".to_vec()]);
    assert_eq!(bodies(&mut s, b"big", 1_000).len(), 3);
    // The attribute stays: a later push without it still keeps 2.
    s.publish_msg(b"small", &msg(b"4"), &popts(10), 1_000, &mut w).unwrap();
    assert_eq!(bodies(&mut s, b"small", 1_000), vec![b"3".to_vec(), b"4".to_vec()]);
    // Lowered: trimmed at once. Bounded by the location's maximum.
    let one = AttrUpdate { size: Some(1), ..attrs() };
    s.publish(b"big", None, &one, &popts(10), 1_000, &mut w).unwrap();
    assert_eq!(bodies(&mut s, b"big", 1_000), vec![b"3".to_vec()]);
    let huge = AttrUpdate { size: Some(500), ..attrs() };
    let capped = PublishOpts { buffer_max: 3, ..popts(10) };
    for b in [b"a", b"b", b"c", b"d"] {
        s.publish(b"capped", Some(&msg(b)), &huge, &capped, 1_000, &mut w).unwrap();
    }
    assert_eq!(bodies(&mut s, b"capped", 1_000).len(), 3);

    let short = AttrUpdate { life_ms: Some(2_000), ..attrs() };
    s.publish(b"short", Some(&msg(b"x")), &short, &popts(10), 1_000, &mut w).unwrap();
    s.publish_msg(b"short", &msg(b"y"), &popts(10), 1_500, &mut w).unwrap();
    assert_eq!(bodies(&mut s, b"short", 2_999).len(), 2);
    assert_eq!(bodies(&mut s, b"short", 3_000), vec![b"y".to_vec()]);
    assert!(bodies(&mut s, b"short", 3_500).is_empty());
    s.check();
}

#[test]
fn attribute_only_push_is_never_a_message() {
    let (mut s, slots) = store_with_workers(1);
    let mut w = vec![];
    let p = park(&mut s, b"c", Since::Oldest, slots[0], 1);
    let set = AttrUpdate { size: Some(3), ..attrs() };
    let r = s.publish(b"c", None, &set, &popts(10), 2, &mut w).unwrap();
    assert_eq!(r.id, 0);
    assert!(w.is_empty(), "nobody is woken");
    assert!(s.channel(b"c", p.serial).unwrap().next_for(0, 2).is_none());
    assert_eq!(s.info(b"c", 2).unwrap().messages, 0);
}

#[test]
fn keys_guard_pushes_and_deletes() {
    let (mut s, _) = store_with_workers(1);
    let mut w = vec![];
    let k = AttrUpdate { key: Some(hash_key(7, b"secret")), ..attrs() };
    let wrong = AttrUpdate { key: Some(hash_key(7, b"nope")), ..attrs() };
    s.publish(b"k", Some(&msg(b"1")), &k, &popts(10), 1, &mut w).unwrap();
    let e = s.publish(b"k", Some(&msg(b"2")), &attrs(), &popts(10), 2, &mut w);
    assert_eq!(e.err(), Some(StoreError::Forbidden));
    let e = s.publish(b"k", Some(&msg(b"2")), &wrong, &popts(10), 2, &mut w);
    assert_eq!(e.err(), Some(StoreError::Forbidden));
    assert_eq!(bodies(&mut s, b"k", 3).len(), 1, "nothing changed");
    s.publish(b"k", Some(&msg(b"2")), &k, &popts(10), 3, &mut w).unwrap();
    assert_eq!(s.delete(b"k", None, 4, &mut w).err(), Some(StoreError::Forbidden));
    assert_eq!(s.delete(b"k", wrong.key.as_ref(), 4, &mut w).err(), Some(StoreError::Forbidden));
    assert!(s.delete(b"k", k.key.as_ref(), 4, &mut w).unwrap().is_some());
    // Gone with the channel.
    s.publish(b"k", Some(&msg(b"3")), &attrs(), &popts(10), 5, &mut w).unwrap();
}

#[test]
fn one2one_keeps_the_longest_waiting_listener_across_workers_and_consumes() {
    let (mut s, slots) = store_with_workers(2);
    let mut w = vec![];
    let mut a: Listeners<u32> = Listeners::default();
    let mut b: Listeners<u32> = Listeners::default();
    // Worker b's listener came first, then one on a, then another on b.
    let p1 = park(&mut s, b"o", Since::Oldest, slots[1], 1);
    b.park(b"o", &p1, 1);
    let p2 = park(&mut s, b"o", Since::Oldest, slots[0], 2);
    a.park(b"o", &p2, 2);
    let p3 = park(&mut s, b"o", Since::Oldest, slots[1], 3);
    b.park(b"o", &p3, 3);
    let on = AttrUpdate { one2one: Some(true), ..attrs() };
    s.publish(b"o", None, &on, &popts(10), 4, &mut w).unwrap();
    assert_eq!(w.len(), 2, "both workers are woken for the election");
    // Worker a reports first (its 2), then b (its 1): a's listener must go too.
    let mut out = vec![];
    let mut again = vec![];
    let mut serials = vec![];
    s.take_mailbox(slots[0], &mut serials);
    s.take_mailbox(slots[1], &mut serials);
    a.wake(&mut s, p1.serial, slots[0], 5, &mut out, &mut again);
    assert!(out.is_empty());
    b.wake(&mut s, p1.serial, slots[1], 5, &mut out, &mut again);
    assert!(matches!(out.as_slice(), [(3, Verdict::Conflict)]), "{out:?}");
    assert!(again.iter().any(|t| t.slot == slots[0]), "a is woken again");
    out.clear();
    a.wake(&mut s, p1.serial, slots[0], 6, &mut out, &mut vec![]);
    assert!(matches!(out.as_slice(), [(2, Verdict::Conflict)]), "{out:?}");
    assert_eq!(s.info(b"o", 6).unwrap().listeners, 1);
    // A newcomer is refused while one waits.
    let e = s.listen(b"o", Since::Oldest, &lopts(slots[0]), 7, &mut vec![]);
    assert!(matches!(e, Err(StoreError::Conflict)));
    // The kept listener gets the message, which is consumed.
    out.clear();
    s.publish_msg(b"o", &msg(b"m"), &popts(10), 8, &mut w).unwrap();
    b.wake(&mut s, p1.serial, slots[1], 8, &mut out, &mut vec![]);
    assert!(matches!(out.as_slice(), [(1, Verdict::Deliver(_))]), "{out:?}");
    assert_eq!(s.info(b"o", 9).unwrap().messages, 0, "consumed");
    s.check();
}

#[test]
fn multi_channel_listener_gets_every_channel_and_leaves_them_all() {
    let (mut s, slots) = store_with_workers(1);
    let mut w = vec![];
    s.publish_msg(b"a", &msg(b"a1"), &popts(10), 1, &mut w).unwrap();
    let a1 = s.last_id();
    s.publish_msg(b"a", &msg(b"a2"), &popts(10), 1, &mut w).unwrap();
    // Everything at once: a has two messages after 0, b none.
    let MultiListen::Messages(found) =
        s.listen_multi(&[(b"a", 0), (b"b", 0)], &lopts(slots[0]), 2, &mut w).unwrap()
    else {
        panic!("a has messages")
    };
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].0, 0);
    let ids: Vec<_> = found[0].1.messages_after(found[0].2, 2, false).map(|m| m.id).collect();
    assert_eq!(ids.len(), 2);
    assert_eq!(ids[0], a1);
    // Past a's last: parks on both.
    let last = s.last_id();
    let mut l: Listeners<u32> = Listeners::default();
    let MultiListen::Park(parked) =
        s.listen_multi(&[(b"a", last), (b"b", 0), (b"c", 0)], &lopts(slots[0]), 3, &mut w).unwrap()
    else {
        panic!("nothing newer")
    };
    l.park_multi([&b"a"[..], b"b", b"c"].into_iter(), &parked, 9, None);
    assert_eq!(l.len(), 1);
    assert_eq!(l.entries(), 3);
    assert_eq!(s.total_listeners(), 3);
    s.publish_msg(b"b", &msg(b"\xffb"), &popts(10), 4, &mut w).unwrap();
    let mut out = vec![];
    l.wake(&mut s, parked[1].serial, slots[0], 4, &mut out, &mut vec![]);
    let [(9, Verdict::Batch(body))] = out.as_slice() else { panic!("{out:?}") };
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert!(v["channels"]["a"].is_null());
    assert_eq!(v["channels"]["b"]["payload"][0]["base64"], "/2I=");
    assert_eq!(v["channels"]["b"]["etag"], s.last_id().to_string());
    assert!(l.is_empty());
    assert_eq!(l.entries(), 0);
    assert_eq!(s.total_listeners(), 0, "left every channel");
    s.check();
}

#[test]
fn multi_channel_listen_is_all_or_nothing_and_deletes_name_the_channel() {
    let (mut s, slots) = store_with_workers(1);
    let mut w = vec![];
    let on = AttrUpdate { one2one: Some(true), ..attrs() };
    s.publish(b"busy", None, &on, &popts(10), 1, &mut w).unwrap();
    park(&mut s, b"busy", Since::Oldest, slots[0], 1);
    let r = s.listen_multi(&[(b"x", 0), (b"busy", 0)], &lopts(slots[0]), 2, &mut w);
    assert!(matches!(r, Err(StoreError::Conflict)));
    assert_eq!(s.total_listeners(), 1, "x does not count it");
    let mut l: Listeners<u32> = Listeners::default();
    let MultiListen::Park(parked) =
        s.listen_multi(&[(b"x", 0), (b"y", 0)], &lopts(slots[0]), 3, &mut w).unwrap()
    else {
        panic!()
    };
    let key = l.park_multi([&b"x"[..], b"y"].into_iter(), &parked, 5, None);
    s.delete_any(b"y", 4, &mut w).unwrap();
    let mut out = vec![];
    l.wake(&mut s, parked[1].serial, slots[0], 4, &mut out, &mut vec![]);
    let [(5, Verdict::GoneChannel(name))] = out.as_slice() else { panic!("{out:?}") };
    assert_eq!(&name[..], b"y");
    assert!(!l.remove(key, |_| panic!("already gone")));
    assert_eq!(s.total_listeners(), 1, "only busy's listener is left");
    // A timeout removes a multi-channel listener from every channel.
    let MultiListen::Park(parked) =
        s.listen_multi(&[(b"x", 0), (b"z", 0)], &lopts(slots[0]), 5, &mut w).unwrap()
    else {
        panic!()
    };
    let key = l.park_multi([&b"x"[..], b"z"].into_iter(), &parked, 6, None);
    let mut released = 0;
    assert!(l.remove(key, |r| {
        released += 1;
        s.release(&r.name, r.serial, slots[0], 1, r.last);
    }));
    assert_eq!(released, 2);
    assert_eq!(s.total_listeners(), 1);
    s.check();
}

#[test]
fn a_wake_up_names_every_channel_with_news_for_multi_channel_listeners() {
    let (mut s, slots) = store_with_workers(1);
    let mut w = vec![];
    let mut l: Listeners<u32> = Listeners::default();
    let MultiListen::Park(parked) =
        s.listen_multi(&[(b"a", 0), (b"b", 0), (b"c", 0)], &lopts(slots[0]), 1, &mut w).unwrap()
    else {
        panic!()
    };
    l.park_multi([&b"a"[..], b"b", b"c"].into_iter(), &parked, 7, None);
    s.publish_msg(b"a", &msg(b"1"), &popts(10), 2, &mut w).unwrap();
    s.publish_msg(b"b", &msg(b"2"), &popts(10), 2, &mut w).unwrap();
    let mut serials = vec![];
    s.take_mailbox(slots[0], &mut serials);
    assert_eq!(serials.len(), 2);
    l.begin_wake(&serials, MsgId::MAX);
    let mut out = vec![];
    for &serial in &serials {
        l.wake(&mut s, serial, slots[0], 2, &mut out, &mut vec![]);
    }
    l.end_wake();
    let [(7, Verdict::Batch(body))] = out.as_slice() else { panic!("{out:?}") };
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(v["channels"]["a"]["payload"][0], "1");
    assert_eq!(v["channels"]["b"]["payload"][0], "2", "b's news is in the same reply");
    assert!(v["channels"]["c"].is_null());
    assert_eq!(s.total_listeners(), 0);
    s.check();
}
