//! The store's side of the stats: counts kept incrementally, workers' counters, listings.

use std::collections::HashSet;

use allocator_api2::alloc::Global;
use proptest::prelude::*;

use super::tests::{lopts, msg, popts, store_with_workers};
use super::*;
use crate::stats::{Cursor, ListenerKind};

#[test]
fn stored_messages_are_counted_as_they_come_and_go() {
    let (mut s, slots) = store_with_workers(1);
    let mut wake = vec![];
    for i in 0..5 {
        s.publish_msg(b"a", &msg(b"x"), &popts(3), 1_000 + i, &mut wake).unwrap();
    }
    s.publish_msg(b"b", &msg(b"y"), &popts(10), 1_000, &mut wake).unwrap();
    assert_eq!(s.stats.messages, 4, "a keeps 3, b 1");
    let short = MessageSpec { timeout_ms: 500, ..msg(b"z") };
    s.publish_msg(b"c", &short, &PublishOpts { timeout_ms: 500, ..popts(10) }, 1_000, &mut wake)
        .unwrap();
    assert_eq!(s.stats.messages, 5);
    s.collect_garbage(2_000);
    assert_eq!(s.stats.messages, 4, "the expired one went");
    s.delete_any(b"a", 2_000, &mut wake);
    assert_eq!(s.stats.messages, 1);
    // Store off: a message for the listeners waiting is not a stored one.
    s.listen(b"t", Since::Oldest, &lopts(slots[0]), 2_000, &mut wake).unwrap();
    let off = PublishOpts { store: false, ..popts(10) };
    s.publish_msg(b"t", &msg(b"w"), &off, 2_000, &mut wake).unwrap();
    assert_eq!(s.stats.messages, 1);
    s.check();
    let snap = s.stats_snapshot(2_000, &|_| true);
    assert_eq!((snap.channels, snap.messages, snap.published), (3, 1, 8));
    assert_eq!(snap.published_last_minute(), 8);
    assert_eq!(s.stats_snapshot(70_000, &|_| true).published_last_minute(), 0);
}

#[test]
fn workers_counts_survive_them_and_a_dead_ones_listeners_do_not() {
    let (mut s, slots) = store_with_workers(2);
    // SAFETY (test): the records live while their slots are registered.
    let c0 = unsafe { s.counters(slots[0]).unwrap().as_ref() };
    c0.delivered(3);
    c0.set_listeners(ListenerKind::LongPoll, 2);
    let c1 = unsafe { s.counters(slots[1]).unwrap().as_ref() };
    c1.delivered(4);
    c1.set_listeners(ListenerKind::Stream, 1);
    c1.notified();
    let snap = s.stats_snapshot(0, &|pid| pid != 101);
    assert_eq!(snap.totals.listeners, [2, 0, 0, 0], "pid 101 is dead: its listeners are not");
    assert_eq!(snap.totals.deliveries, 7);
    assert_eq!(snap.workers.len(), 2);
    // Its replacement purges the slot; its cumulative counts stay in the totals.
    s.register_worker(999, 1, 1, &|pid| pid != 101).unwrap();
    let snap = s.stats_snapshot(0, &|_| true);
    assert_eq!(snap.totals.listeners, [2, 0, 0, 0]);
    assert_eq!((snap.totals.deliveries, snap.totals.notify_sent), (7, 1));
    assert_eq!(snap.workers.len(), 2);
    assert!(snap.workers.iter().any(|w| w.pid == 999 && w.counts.deliveries == 0));
    s.unregister_worker(slots[0]);
    let snap = s.stats_snapshot(0, &|_| true);
    assert_eq!(snap.totals.listeners, [0; 4]);
    assert_eq!(snap.totals.deliveries, 7);
}

#[test]
fn channel_stats_leave_the_key_out_and_count_live_listeners() {
    let (mut s, slots) = store_with_workers(1);
    let mut wake = vec![];
    let attrs = AttrUpdate { size: Some(4), life_ms: Some(60_000), ..AttrUpdate::default() };
    s.publish(b"k", Some(&msg(b"x")), &attrs, &popts(10), 1_000, &mut wake).unwrap();
    s.listen(b"k", Since::After(s.last_id()), &lopts(slots[0]), 1_000, &mut wake).unwrap();
    let c = s.channel_stats(b"k", 3_000).unwrap().unwrap();
    assert_eq!((c.messages, c.listeners, c.requested), (1, 1, 2));
    assert_eq!((c.size, c.life_ms, c.one2one), (Some(4), Some(60_000), false));
    assert_eq!(c.last_id, s.last_id());
    assert_eq!(s.channel_stats(b"nope", 3_000).unwrap(), None);
}

/// Every page of a listing, with `budget` per call and `room` per page.
fn list_all(
    s: &Store<Global>,
    prefix: &[u8],
    room: usize,
    budget: usize,
) -> std::vec::Vec<std::vec::Vec<u8>> {
    let mut names = vec![];
    let mut cursor = Some(Cursor::default());
    let mut calls = 0;
    while let Some(c) = cursor {
        let mut page = vec![];
        cursor = s.list_channels(prefix, c, room, budget, 0, &mut page).unwrap();
        assert!(page.len() <= room);
        names.extend(page.into_iter().map(|c| c.name));
        calls += 1;
        assert!(calls < 100_000, "the listing ends");
    }
    names
}

proptest! {
    #[test]
    fn listings_give_each_matching_channel_once(
        names in proptest::collection::hash_set("[ab]{0,4}", 0..120),
        prefix in "[ab]{0,2}",
        room in 1usize..10,
        budget in 1usize..40,
    ) {
        let (mut s, _) = store_with_workers(1);
        let mut wake = vec![];
        for n in &names {
            s.publish_msg(n.as_bytes(), &msg(b"x"), &popts(10), 0, &mut wake).unwrap();
        }
        let got = list_all(&s, prefix.as_bytes(), room, budget);
        let unique: HashSet<_> = got.iter().cloned().collect();
        prop_assert_eq!(unique.len(), got.len(), "no channel twice");
        let want: HashSet<_> =
            names.iter().filter(|n| n.starts_with(&prefix)).map(|n| n.as_bytes().to_vec()).collect();
        prop_assert_eq!(unique, want);
    }
}

#[test]
fn a_listing_call_looks_at_a_bounded_number_of_channels() {
    let (mut s, _) = store_with_workers(1);
    let mut wake = vec![];
    for i in 0..5_000 {
        s.publish_msg(format!("c{i}").as_bytes(), &msg(b"x"), &popts(1), 0, &mut wake).unwrap();
    }
    // Nothing matches: every call stops at its budget and says where to go on.
    let mut page = vec![];
    let next = s.list_channels(b"zzz", Cursor::default(), 100, 64, 0, &mut page).unwrap();
    assert!(page.is_empty());
    let next = next.expect("more to look at");
    assert!(next.bucket <= 64, "{next:?}");
    // c49, c490..c499, c4900..c4999.
    assert_eq!(list_all(&s, b"c49", 100, 64).len(), 111);
}
