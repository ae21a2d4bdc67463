//! Tests of long-polls and interval-polls of a channel list (`martd_channel_id_delimiter`):
//! one message per answer, the oldest newer than the request's id on any channel.

use allocator_api2::alloc::Global;

use super::tests::{lopts, msg, popts, store_with_workers};
use super::*;
use crate::listeners::{ListenerKey, Listeners, Verdict};
use std::vec::Vec;

fn list(names: &[&'static [u8]], since: Since) -> Vec<(&'static [u8], Since)> {
    names.iter().map(|&n| (n, since)).collect()
}

/// What a request on `names` gets at once: `(channel, body)` of the oldest newer message.
fn now(s: &mut Store<Global>, names: &[&'static [u8]], since: Since) -> Option<(Vec<u8>, Vec<u8>)> {
    let chans = list(names, since);
    let found = s.peek_multi(&chans, 5);
    let (i, m) = oldest(&found, 5)?;
    Some((names[i].to_vec(), m.body().to_vec()))
}

fn park_first(
    s: &mut Store<Global>,
    l: &mut Listeners<u32>,
    names: &[&'static [u8]],
    since: Since,
    slot: u32,
    h: u32,
) -> (ListenerKey, Vec<Parked>) {
    let chans = list(names, since);
    let MultiListen::Park(parked) = s.listen_multi(&chans, &lopts(slot), 5, &mut vec![]).unwrap()
    else {
        panic!("nothing newer: parks")
    };
    (l.park_first(names.iter().copied(), &parked, h), parked)
}

/// One wake-up pass over the mailbox (in reverse order if `reverse`).
fn pass(
    s: &mut Store<Global>,
    l: &mut Listeners<u32>,
    slot: u32,
    reverse: bool,
) -> Vec<(u32, Verdict)> {
    let mut serials = vec![];
    let horizon = s.last_id();
    s.take_mailbox(slot, &mut serials);
    if reverse {
        serials.reverse();
    }
    l.begin_wake(&serials, horizon);
    let mut out = vec![];
    for &serial in &serials {
        l.wake(s, serial, slot, 5, &mut out, &mut vec![]);
    }
    l.end_wake();
    out
}

fn delivered(out: &[(u32, Verdict)]) -> Vec<(u32, Vec<u8>, Vec<u8>)> {
    out.iter()
        .map(|(h, v)| match v {
            Verdict::DeliverOn(p, ch) => (*h, ch.to_vec(), p.body().to_vec()),
            other => panic!("{h}: {other:?}"),
        })
        .collect()
}

#[test]
fn a_request_gets_the_oldest_newer_message_of_all_its_channels() {
    let (mut s, _) = store_with_workers(1);
    let mut w = vec![];
    for (ch, b) in [(&b"b"[..], &b"b1"[..]), (b"a", b"a1"), (b"b", b"b2"), (b"c", b"c1")] {
        s.publish_msg(ch, &msg(b), &popts(10), 1, &mut w).unwrap();
    }
    let ids: Vec<MsgId> = {
        let chans = list(&[b"a", b"b", b"c"], Since::Oldest);
        let mut ids: Vec<MsgId> = s
            .peek_multi(&chans, 5)
            .iter()
            .flat_map(|(_, ch, since)| ch.messages_after(*since, 5, false).map(|m| m.id))
            .collect();
        ids.sort();
        ids
    };
    // Resuming from each id in turn walks every message once, in publish order.
    let names: [&[u8]; 3] = [b"a", b"b", b"c"];
    let mut since = Since::Oldest;
    let mut got = Vec::new();
    while let Some((ch, body)) = now(&mut s, &names, since) {
        got.push((ch, body));
        since = Since::After(ids[got.len() - 1]);
    }
    let want: Vec<(Vec<u8>, Vec<u8>)> = [("b", "b1"), ("a", "a1"), ("b", "b2"), ("c", "c1")]
        .iter()
        .map(|(c, b)| (c.as_bytes().to_vec(), b.as_bytes().to_vec()))
        .collect();
    assert_eq!(got, want);
    // listen_multi finds the same first message (nothing counted).
    let chans = list(&names, Since::After(ids[0]));
    let MultiListen::Messages(found) = s.listen_multi(&chans, &lopts(1), 5, &mut w).unwrap() else {
        panic!("messages are newer")
    };
    let (i, m) = oldest(&found, 5).unwrap();
    assert_eq!((i, m.body()), (0, &b"a1"[..]));
    assert_eq!(s.total_listeners(), 0);
    // If-Modified-Since alone: the first message of any channel published after that second.
    assert!(now(&mut s, &names, Since::ModifiedSince(0)).is_none());
    s.publish_msg(b"c", &msg(b"c2"), &popts(10), 3_000, &mut w).unwrap();
    s.publish_msg(b"a", &msg(b"a2"), &popts(10), 3_500, &mut w).unwrap();
    assert_eq!(
        now(&mut s, &names, Since::ModifiedSince(2)).unwrap(),
        (b"c".to_vec(), b"c2".to_vec())
    );
    assert!(now(&mut s, &names, Since::ModifiedSince(3)).is_none());
    s.check();
}

#[test]
fn a_parked_list_gets_the_oldest_of_one_wake_up_and_leaves_every_channel() {
    let (mut s, slots) = store_with_workers(1);
    let slot = slots[0];
    let mut l: Listeners<u32> = Listeners::default();
    let names: [&'static [u8]; 3] = [b"a", b"b", b"c"];
    let (_, parked) = park_first(&mut s, &mut l, &names, Since::Oldest, slot, 7);
    // Two listeners of the same list share the pass's look-ups and the message copy.
    park_first(&mut s, &mut l, &names, Since::Oldest, slot, 8);
    assert_eq!((l.len(), l.entries(), s.total_listeners()), (2, 6, 6));
    let mut w = vec![];
    // c1 is older; the wake-up looks at a first and still answers c1.
    s.publish_msg(b"c", &msg(b"c1"), &popts(10), 5, &mut w).unwrap();
    s.publish_msg(b"a", &msg(b"a1"), &popts(10), 5, &mut w).unwrap();
    let out = pass(&mut s, &mut l, slot, true);
    assert_eq!(
        delivered(&out),
        vec![(7, b"c".to_vec(), b"c1".to_vec()), (8, b"c".to_vec(), b"c1".to_vec())]
    );
    if let [(_, Verdict::DeliverOn(p, _)), (_, Verdict::DeliverOn(q, _))] = out.as_slice() {
        assert!(std::rc::Rc::ptr_eq(p, q), "one copy per worker");
    }
    assert_eq!((l.len(), l.entries(), s.total_listeners()), (0, 0, 0));
    // The next request, with c1's id, gets a1 at once.
    let c1 = s.channel(b"c", parked[2].serial).unwrap().last_id();
    assert_eq!(now(&mut s, &names, Since::After(c1)).unwrap(), (b"a".to_vec(), b"a1".to_vec()));
    s.check();
}

#[test]
fn a_message_past_the_horizon_waits_for_its_own_wake_up() {
    let (mut s, slots) = store_with_workers(1);
    let slot = slots[0];
    let mut l: Listeners<u32> = Listeners::default();
    let (key, parked) = park_first(&mut s, &mut l, &[b"a", b"b"], Since::Oldest, slot, 1);
    let (a, b) = (parked[0].serial, parked[1].serial);
    let mut w = vec![];
    s.publish_msg(b"b", &msg(b"b1"), &popts(10), 5, &mut w).unwrap();
    let horizon = s.last_id();
    // Published after the mailbox was taken (as between two holds of the lock in one pass).
    s.publish_msg(b"a", &msg(b"a1"), &popts(10), 5, &mut w).unwrap();
    s.take_mailbox(slot, &mut vec![]);
    l.begin_wake(&[a, b], horizon);
    let mut out = vec![];
    l.wake(&mut s, a, slot, 5, &mut out, &mut vec![]);
    assert!(out.is_empty(), "a1 is past the horizon: not answered on a: {out:?}");
    l.wake(&mut s, b, slot, 5, &mut out, &mut vec![]);
    l.end_wake();
    assert_eq!(delivered(&out), vec![(1, b"b".to_vec(), b"b1".to_vec())]);
    assert!(!l.remove(key, |_| panic!("answered")));
    assert_eq!(s.total_listeners(), 0);
    s.check();
}

#[test]
fn a_parked_list_ends_with_410_naming_a_deleted_channel_or_304_on_timeout() {
    let (mut s, slots) = store_with_workers(1);
    let slot = slots[0];
    let mut l: Listeners<u32> = Listeners::default();
    park_first(&mut s, &mut l, &[b"x", b"y"], Since::Oldest, slot, 3);
    s.delete_any(b"y", 5, &mut vec![]).unwrap();
    let out = pass(&mut s, &mut l, slot, false);
    let [(3, Verdict::GoneChannel(name))] = out.as_slice() else { panic!("{out:?}") };
    assert_eq!(&name[..], b"y");
    assert_eq!((l.len(), s.total_listeners()), (0, 0));
    // Timeout: it leaves every channel.
    let (key, _) = park_first(&mut s, &mut l, &[b"x", b"z"], Since::Oldest, slot, 4);
    assert_eq!(s.total_listeners(), 2);
    assert!(l.remove(key, |r| s.release(&r.name, r.serial, slot, 1, r.last)));
    assert_eq!((l.len(), l.entries(), s.total_listeners()), (0, 0, 0));
    s.check();
}

#[test]
fn a_one_to_one_channel_of_a_list_consumes_what_it_delivers() {
    let (mut s, slots) = store_with_workers(1);
    let slot = slots[0];
    let mut w = vec![];
    let on = AttrUpdate { one2one: Some(true), ..AttrUpdate::default() };
    s.publish(b"solo", None, &on, &popts(10), 1, &mut w).unwrap();
    let mut l: Listeners<u32> = Listeners::default();
    park_first(&mut s, &mut l, &[b"solo", b"other"], Since::Oldest, slot, 9);
    s.publish_msg(b"solo", &msg(b"once"), &popts(10), 5, &mut w).unwrap();
    let out = pass(&mut s, &mut l, slot, false);
    assert_eq!(delivered(&out), vec![(9, b"solo".to_vec(), b"once".to_vec())]);
    assert!(now(&mut s, &[b"solo", b"other"], Since::Oldest).is_none(), "consumed");
    s.check();
}
