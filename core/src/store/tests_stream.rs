//! Tests of streaming subscribers (EventSource, chunked streams): they park even with a
//! backlog, get every newer message in order at each wake-up, and stay until they leave.

use allocator_api2::alloc::Global;

use super::tests::{lopts, msg, popts, store_with_workers};
use super::*;
use crate::listeners::{Listeners, Verdict};
use std::vec::Vec;

fn sopts(slot: u32) -> ListenOpts {
    ListenOpts { stream: true, ..lopts(slot) }
}

fn wake_all(s: &mut Store<Global>, l: &mut Listeners<u32>, slot: u32) -> Vec<(u32, Verdict)> {
    let mut serials = vec![];
    s.take_mailbox(slot, &mut serials);
    let mut out = vec![];
    for &serial in &serials {
        l.wake(s, serial, slot, 5, &mut out, &mut vec![]);
    }
    out
}

fn delivered(out: &[(u32, Verdict)]) -> Vec<(u32, Vec<u8>)> {
    out.iter()
        .map(|(h, v)| match v {
            Verdict::DeliverOn(p, _) | Verdict::Deliver(p) => (*h, p.body().to_vec()),
            other => panic!("{h}: {other:?}"),
        })
        .collect()
}

#[test]
fn a_stream_parks_with_a_backlog_and_gets_every_message_in_order_staying_parked() {
    let (mut s, slots) = store_with_workers(1);
    let slot = slots[0];
    let mut w = vec![];
    for b in [&b"1"[..], b"2"] {
        s.publish_msg(b"c", &msg(b), &popts(10), 1, &mut w).unwrap();
    }
    let Listen::Park(mut p) = s.listen(b"c", Since::Oldest, &sopts(slot), 2, &mut w).unwrap()
    else {
        panic!("a stream parks")
    };
    // The caller sends the backlog from the channel, then parks it past the last one.
    let backlog: Vec<_> =
        s.channel(b"c", p.serial).unwrap().messages_after(p.since, 2, false).collect();
    assert_eq!(backlog.len(), 2);
    p.since = backlog[1].id;
    let mut l: Listeners<u32> = Listeners::default();
    l.park_stream(b"c", &p, 1);
    // A plain long-poll of the same channel waits past the last id.
    let last = s.last_id();
    let Listen::Park(lp) = s.listen(b"c", Since::After(last), &lopts(slot), 2, &mut w).unwrap()
    else {
        panic!()
    };
    l.park(b"c", &lp, 2);
    for b in [&b"3"[..], b"4"] {
        s.publish_msg(b"c", &msg(b), &popts(10), 3, &mut w).unwrap();
    }
    let out = delivered(&wake_all(&mut s, &mut l, slot));
    assert_eq!(out, vec![(1, b"3".to_vec()), (1, b"4".to_vec()), (2, b"3".to_vec())]);
    assert_eq!(l.len(), 1, "the stream stays, the long-poll left");
    assert_eq!(s.total_listeners(), 1);
    s.publish_msg(b"c", &msg(b"5"), &popts(10), 4, &mut w).unwrap();
    assert_eq!(delivered(&wake_all(&mut s, &mut l, slot)), vec![(1, b"5".to_vec())]);
    s.check();
}

#[test]
fn a_stream_ends_when_displaced_deleted_or_removed() {
    let (mut s, slots) = store_with_workers(1);
    let slot = slots[0];
    let mut w = vec![];
    let mut l: Listeners<u32> = Listeners::default();
    let last = ListenOpts { concurrency: Concurrency::Last, ..sopts(slot) };
    let Listen::Park(p) = s.listen(b"d", Since::Oldest, &last, 1, &mut w).unwrap() else {
        panic!()
    };
    l.park_stream(b"d", &p, 1);
    let Listen::Park(p) = s.listen(b"d", Since::Oldest, &last, 1, &mut w).unwrap() else {
        panic!()
    };
    l.park_stream(b"d", &p, 2);
    let out = wake_all(&mut s, &mut l, slot);
    assert!(matches!(out.as_slice(), [(1, Verdict::Conflict)]), "{out:?}");
    assert_eq!((l.len(), s.total_listeners()), (1, 1));
    s.delete_any(b"d", 2, &mut w).unwrap();
    let out = wake_all(&mut s, &mut l, slot);
    assert!(matches!(out.as_slice(), [(2, Verdict::Gone)]), "{out:?}");
    assert_eq!((l.len(), s.total_listeners()), (0, 0));
    let Listen::Park(p) = s.listen(b"e", Since::Oldest, &sopts(slot), 3, &mut w).unwrap() else {
        panic!()
    };
    let key = l.park_stream(b"e", &p, 3);
    assert!(l.remove(key, |r| s.release(&r.name, r.serial, slot, 1, r.last)));
    assert_eq!((l.len(), s.total_listeners()), (0, 0));
    let (releases, handles) = {
        let Listen::Park(p) = s.listen(b"e", Since::Oldest, &sopts(slot), 3, &mut w).unwrap()
        else {
            panic!()
        };
        l.park_stream(b"e", &p, 4);
        l.drain_all()
    };
    assert_eq!(handles, vec![4]);
    for (r, n) in releases {
        s.release(&r.name, r.serial, slot, n, r.last);
    }
    assert_eq!(s.total_listeners(), 0);
    s.check();
}

#[test]
fn a_wake_up_gives_streams_nothing_past_its_horizon() {
    let (mut s, slots) = store_with_workers(1);
    let slot = slots[0];
    let mut w = vec![];
    let mut l: Listeners<u32> = Listeners::default();
    for name in [&b"a"[..], b"b"] {
        let Listen::Park(p) = s.listen(name, Since::Oldest, &sopts(slot), 1, &mut w).unwrap()
        else {
            panic!()
        };
        l.park_stream(name, &p, 1);
    }
    s.publish_msg(b"a", &msg(b"a1"), &popts(10), 2, &mut w).unwrap();
    let mut serials = vec![];
    s.take_mailbox(slot, &mut serials);
    let horizon = s.last_id();
    // Published after the mailbox was taken: b's first, then a's second.
    s.publish_msg(b"b", &msg(b"b2"), &popts(10), 3, &mut w).unwrap();
    s.publish_msg(b"a", &msg(b"a3"), &popts(10), 3, &mut w).unwrap();
    let mut out = vec![];
    l.begin_wake(&serials, horizon);
    for &serial in &serials {
        l.wake(&mut s, serial, slot, 3, &mut out, &mut vec![]);
    }
    l.end_wake();
    assert_eq!(delivered(&out), vec![(1, b"a1".to_vec())], "a3 waits for its own wake-up");
    // The next pass has both channels: b2 then a3 once sorted by id, as the edge does.
    let mut serials = vec![];
    s.take_mailbox(slot, &mut serials);
    let horizon = s.last_id();
    let mut out = vec![];
    l.begin_wake(&serials, horizon);
    for &serial in &serials {
        l.wake(&mut s, serial, slot, 3, &mut out, &mut vec![]);
    }
    l.end_wake();
    out.sort_by_key(|(_, v)| match v {
        Verdict::DeliverOn(p, _) => p.id,
        _ => u64::MAX,
    });
    assert_eq!(delivered(&out), vec![(1, b"b2".to_vec()), (1, b"a3".to_vec())]);
    s.check();
}

#[test]
fn a_burst_longer_than_the_buffer_reaches_waiting_streams_whole() {
    let (mut s, slots) = store_with_workers(2);
    let mut w = vec![];
    let mut l: Listeners<u32> = Listeners::default();
    let Listen::Park(p) = s.listen(b"q", Since::Oldest, &sopts(slots[0]), 1, &mut w).unwrap()
    else {
        panic!()
    };
    l.park_stream(b"q", &p, 1);
    // Ten messages into a 3-message buffer before the worker looks.
    for i in 0..10u8 {
        s.publish_msg(b"q", &msg(&[b'0' + i]), &popts(3), 2, &mut w).unwrap();
    }
    let got = delivered(&wake_all(&mut s, &mut l, slots[0]));
    let want: Vec<_> = (0..10u8).map(|i| (1, vec![b'0' + i])).collect();
    assert_eq!(got, want, "every message of the burst");
    // Seen: only the buffer stays; a newcomer (another worker) gets the buffer's oldest.
    let p = s.channels.find(b"q").unwrap();
    // SAFETY: a live channel of the test store.
    assert_eq!(unsafe { p.as_ref() }.queue.len(), 3);
    match s.listen(b"q", Since::Oldest, &lopts(slots[1]), 3, &mut w).unwrap() {
        Listen::Message(m) => assert_eq!(m.body(), b"7"),
        Listen::Park(_) => panic!("the buffer has messages"),
    }
    // Not seen for longer than a transient message lives: gone all the same.
    for i in 0..10u8 {
        s.publish_msg(b"q", &msg(&[b'a' + i]), &popts(3), 4, &mut w).unwrap();
    }
    // (the buffer's three old ones go at once: seen; seven new ones wait; three stay stored)
    let mut p = s.channels.find(b"q").unwrap();
    // SAFETY: as above.
    let q = &mut unsafe { p.as_mut() }.queue;
    assert_eq!(q.len(), 10);
    assert_eq!(q.expire(4 + crate::queue::TRANSIENT_LIFE_MS), 7);
    assert_eq!(q.len(), 3);
    s.check();
}
