use std::alloc::Layout;
use std::cell::Cell;
use std::collections::{HashMap as StdMap, VecDeque};
use std::ptr::NonNull;
use std::rc::Rc;

use allocator_api2::alloc::{AllocError, Allocator, Global};
use proptest::prelude::*;

use super::*;
use crate::listeners::{Listeners, Verdict};

/// The global allocator with a byte budget, like a small zone.
#[derive(Clone)]
pub(super) struct Budget(pub(super) Rc<Cell<usize>>);

unsafe impl Allocator for Budget {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        if layout.size() > self.0.get() {
            return Err(AllocError);
        }
        self.0.set(self.0.get() - layout.size());
        Global.allocate(layout)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        self.0.set(self.0.get() + layout.size());
        // SAFETY: `ptr` was allocated by `Global` with this layout in `allocate`.
        unsafe { Global.deallocate(ptr, layout) }
    }
}

pub(super) fn popts(buffer_len: usize) -> PublishOpts {
    PublishOpts {
        buffer_len,
        buffer_max: 1000,
        timeout_ms: 0,
        store: true,
        channel_timeout_ms: 300_000,
    }
}

pub(super) fn lopts(slot: u32) -> ListenOpts {
    ListenOpts {
        concurrency: Concurrency::Broadcast,
        max_listeners: 0,
        create: true,
        channel_timeout_ms: 300_000,
        slot,
        stream: false,
    }
}

pub(super) fn msg(body: &[u8]) -> MessageSpec<'_> {
    MessageSpec { content_type: b"text/plain", event: b"", body, timeout_ms: 0, expire_ms: None }
}

pub(super) fn store_with_workers(n: u32) -> (Store<Global>, std::vec::Vec<u32>) {
    let mut s = Store::new_in(Global);
    let slots =
        (0..n).map(|i| s.register_worker(100 + i as i32, 1, i, &|_| true).unwrap()).collect();
    (s, slots)
}

#[test]
fn publish_without_listeners_is_stored_and_served_oldest_first() {
    let (mut s, slots) = store_with_workers(1);
    let mut wake = vec![];
    let p1 = s.publish_msg(b"a", &msg(b"one"), &popts(10), 1_000, &mut wake).unwrap();
    let p2 = s.publish_msg(b"a", &msg(b"two"), &popts(10), 1_000, &mut wake).unwrap();
    assert_eq!(p1.listeners, 0);
    assert!(p2.id > p1.id);
    assert!(wake.is_empty());
    let Listen::Message(m) =
        s.listen(b"a", Since::Oldest, &lopts(slots[0]), 1_000, &mut wake).unwrap()
    else {
        panic!("expected a message")
    };
    assert_eq!(m.body(), b"one");
    let Listen::Message(m) =
        s.listen(b"a", Since::After(p1.id), &lopts(slots[0]), 1_000, &mut wake).unwrap()
    else {
        panic!("expected a message")
    };
    assert_eq!(m.body(), b"two");
    let info = s.info(b"a", 3_500).unwrap();
    assert_eq!(
        (info.messages, info.requested, info.listeners, info.last_message_id),
        (2, 2, 0, p2.id)
    );
}

#[test]
fn parked_listener_in_another_worker_is_woken_with_one_copy() {
    let (mut s, slots) = store_with_workers(2);
    let mut wake = vec![];
    let mut worker_b: Listeners<u32> = Listeners::default();
    for h in 0..3u32 {
        let Listen::Park(p) =
            s.listen(b"c", Since::Oldest, &lopts(slots[1]), 10, &mut wake).unwrap()
        else {
            panic!("expected to park")
        };
        worker_b.park(b"c", &p, h);
    }
    assert_eq!(s.info(b"c", 10).unwrap().listeners, 3);
    let p = s.publish_msg(b"c", &msg(b"hi"), &popts(10), 20, &mut wake).unwrap();
    assert_eq!(p.listeners, 3);
    assert_eq!(wake.len(), 1);
    assert_eq!(wake[0].slot, slots[1]);
    // A second publish before the worker ran does not signal it again.
    s.publish_msg(b"c", &msg(b"again"), &popts(10), 20, &mut wake).unwrap();
    assert_eq!(wake.len(), 1);
    let mut serials = vec![];
    assert!(!s.take_mailbox(slots[1], &mut serials));
    assert_eq!(serials.len(), 1);
    let mut out = vec![];
    worker_b.wake(&mut s, serials[0], slots[1], 30, &mut out, &mut vec![]);
    assert_eq!(out.len(), 3);
    for (_, v) in &out {
        let Verdict::Deliver(pl) = v else { panic!("expected delivery") };
        assert_eq!(pl.body(), b"hi");
    }
    assert_eq!(worker_b.cache.copies_made(), 1);
    assert_eq!(s.info(b"c", 30).unwrap().listeners, 0);
    assert!(worker_b.is_empty());
}

#[test]
fn concurrency_last_and_first() {
    let (mut s, slots) = store_with_workers(2);
    let mut wake = vec![];
    let mut a: Listeners<u32> = Listeners::default();
    let mut b: Listeners<u32> = Listeners::default();
    let last = ListenOpts { concurrency: Concurrency::Last, ..lopts(slots[0]) };
    let Listen::Park(p) = s.listen(b"l", Since::Oldest, &last, 1, &mut wake).unwrap() else {
        panic!()
    };
    a.park(b"l", &p, 1);
    let mut serials = vec![];
    s.take_mailbox(slots[0], &mut serials);
    wake.clear();
    let last_b = ListenOpts { slot: slots[1], ..last };
    let Listen::Park(p) = s.listen(b"l", Since::Oldest, &last_b, 2, &mut wake).unwrap() else {
        panic!()
    };
    b.park(b"l", &p, 2);
    assert!(wake.iter().any(|w| w.slot == slots[0]));
    let mut out = vec![];
    a.wake(&mut s, p.serial, slots[0], 3, &mut out, &mut vec![]);
    assert!(matches!(out.as_slice(), [(1, Verdict::Conflict)]));
    assert_eq!(s.info(b"l", 3).unwrap().listeners, 1);
    out.clear();
    b.wake(&mut s, p.serial, slots[1], 3, &mut out, &mut vec![]);
    assert!(out.is_empty(), "the newest listener keeps waiting");

    let first = ListenOpts { concurrency: Concurrency::First, ..lopts(slots[0]) };
    let Listen::Park(_) = s.listen(b"f", Since::Oldest, &first, 1, &mut wake).unwrap() else {
        panic!()
    };
    let again =
        s.listen(b"f", Since::Oldest, &ListenOpts { slot: slots[1], ..first }, 1, &mut wake);
    assert!(matches!(again, Err(StoreError::Conflict)));
}

#[test]
fn delete_sends_gone_and_ids_survive_recreation() {
    let (mut s, slots) = store_with_workers(1);
    let mut wake = vec![];
    let mut w: Listeners<u32> = Listeners::default();
    let p0 = s.publish_msg(b"d", &msg(b"x"), &popts(10), 5, &mut wake).unwrap();
    let Listen::Park(p) =
        s.listen(b"d", Since::After(p0.id), &lopts(slots[0]), 5, &mut wake).unwrap()
    else {
        panic!()
    };
    w.park(b"d", &p, 9);
    let info = s.delete_any(b"d", 6, &mut wake).unwrap();
    assert_eq!(info.listeners, 1);
    assert_eq!(wake.len(), 1);
    // Created again before the worker looked: the old listeners still get 410.
    let p1 = s.publish_msg(b"d", &msg(b"y"), &popts(10), 0, &mut wake).unwrap();
    assert!(p1.id > p0.id, "ids keep increasing even if the clock went back");
    let mut out = vec![];
    w.wake(&mut s, p.serial, slots[0], 7, &mut out, &mut vec![]);
    assert!(matches!(out.as_slice(), [(9, Verdict::Gone)]));
    assert!(s.delete_any(b"nope", 7, &mut wake).is_none());
}

#[test]
fn limits_and_authorized_only() {
    let (mut s, slots) = store_with_workers(1);
    let mut wake = vec![];
    let strict = ListenOpts { create: false, ..lopts(slots[0]) };
    assert!(matches!(
        s.listen(b"x", Since::Oldest, &strict, 1, &mut wake),
        Err(StoreError::NotFound)
    ));
    let max1 = ListenOpts { max_listeners: 1, ..lopts(slots[0]) };
    assert!(matches!(s.listen(b"m", Since::Oldest, &max1, 1, &mut wake), Ok(Listen::Park(_))));
    assert!(matches!(
        s.listen(b"m", Since::Oldest, &max1, 1, &mut wake),
        Err(StoreError::TooManyListeners)
    ));
}

#[test]
fn future_ids_wait_for_the_next_message_and_old_ids_get_the_oldest() {
    let (mut s, slots) = store_with_workers(1);
    let mut wake = vec![];
    s.publish_msg(b"f", &msg(b"1"), &popts(2), 1_000, &mut wake).unwrap();
    s.publish_msg(b"f", &msg(b"2"), &popts(2), 1_000, &mut wake).unwrap();
    s.publish_msg(b"f", &msg(b"3"), &popts(2), 1_000, &mut wake).unwrap();
    let Listen::Message(m) =
        s.listen(b"f", Since::After(1), &lopts(slots[0]), 1_000, &mut wake).unwrap()
    else {
        panic!()
    };
    assert_eq!(m.body(), b"2");
    let Listen::Park(p) =
        s.listen(b"f", Since::After(u64::MAX), &lopts(slots[0]), 1_000, &mut wake).unwrap()
    else {
        panic!()
    };
    assert_eq!(p.since, s.last_id());
    let mut w: Listeners<u32> = Listeners::default();
    w.park(b"f", &p, 1);
    s.publish_msg(b"f", &msg(b"4"), &popts(2), 1_000, &mut wake).unwrap();
    let mut out = vec![];
    w.wake(&mut s, p.serial, slots[0], 1_000, &mut out, &mut vec![]);
    assert!(matches!(&out[..], [(1, Verdict::Deliver(pl))] if pl.body() == b"4"));
}

#[test]
fn store_off_reaches_waiting_listeners_only_and_frees_itself() {
    let (mut s, slots) = store_with_workers(2);
    let mut wake = vec![];
    let off = PublishOpts { store: false, ..popts(10) };
    let p = s.publish_msg(b"t", &msg(b"lost"), &off, 1, &mut wake).unwrap();
    assert_eq!(p.listeners, 0);
    assert!(matches!(
        s.listen(b"t", Since::Oldest, &lopts(slots[0]), 1, &mut wake),
        Ok(Listen::Park(_))
    ));
    let mut a: Listeners<u32> = Listeners::default();
    let mut b: Listeners<u32> = Listeners::default();
    let Listen::Park(pa) = s.listen(b"t", Since::Oldest, &lopts(slots[0]), 1, &mut wake).unwrap()
    else {
        panic!()
    };
    a.park(b"t", &pa, 1);
    let Listen::Park(pb) = s.listen(b"t", Since::Oldest, &lopts(slots[1]), 1, &mut wake).unwrap()
    else {
        panic!()
    };
    b.park(b"t", &pb, 2);
    let p = s.publish_msg(b"t", &msg(b"live"), &off, 2, &mut wake).unwrap();
    assert_eq!(p.listeners, 3);
    assert_eq!(s.info(b"t", 2).unwrap().messages, 0, "not stored for later listeners");
    let mut out = vec![];
    a.wake(&mut s, pa.serial, slots[0], 3, &mut out, &mut vec![]);
    b.wake(&mut s, pb.serial, slots[1], 3, &mut out, &mut vec![]);
    assert_eq!(out.len(), 2);
    // Both workers saw it; a fresh listener does not get it and the memory is gone.
    s.collect_garbage(4);
    let ch = s.channel(b"t", pa.serial).unwrap();
    assert!(ch.queue.is_empty());
}

#[test]
fn a_respawned_worker_purges_the_counts_of_the_dead_one() {
    let (mut s, slots) = store_with_workers(2);
    let mut wake = vec![];
    for _ in 0..5 {
        s.listen(b"k", Since::Oldest, &lopts(slots[1]), 1, &mut wake).unwrap();
    }
    s.listen(b"k", Since::Oldest, &lopts(slots[0]), 1, &mut wake).unwrap();
    assert_eq!(s.total_listeners(), 6);
    let new_slot = s.register_worker(999, 1, 1, &|pid| pid != 101).unwrap();
    assert_ne!(new_slot, slots[1]);
    assert_eq!(s.total_listeners(), 1);
    assert_eq!(s.info(b"k", 1).unwrap().listeners, 1);
}

#[test]
fn idle_channels_go_after_their_timeout() {
    let (mut s, slots) = store_with_workers(1);
    let mut wake = vec![];
    let short = PublishOpts { timeout_ms: 1_000, channel_timeout_ms: 5_000, ..popts(10) };
    s.publish_msg(b"i", &MessageSpec { timeout_ms: 1_000, ..msg(b"x") }, &short, 0, &mut wake)
        .unwrap();
    let Listen::Park(p) = s
        .listen(
            b"j",
            Since::Oldest,
            &ListenOpts { channel_timeout_ms: 5_000, ..lopts(slots[0]) },
            0,
            &mut wake,
        )
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(s.collect_garbage(4_000), 0);
    assert_eq!(s.info(b"i", 4_000).unwrap().messages, 0, "expired");
    assert_eq!(s.collect_garbage(5_000), 1, "channel i removed, j has a listener");
    s.release(b"j", p.serial, slots[0], 1, Some(0));
    assert_eq!(s.collect_garbage(6_000), 1);
    assert_eq!(s.channel_count(), 0);
}

#[test]
fn a_full_zone_refuses_then_recovers() {
    let budget = Budget(Rc::new(Cell::new(64 * 1024)));
    let mut s = Store::new_in(budget.clone());
    let slot = s.register_worker(1, 1, 0, &|_| true).unwrap();
    let mut wake = vec![];
    let big = vec![b'x'; 4096];
    let mut full_at = None;
    for i in 0..100 {
        let name = format!("ch{i}");
        match s.publish_msg(name.as_bytes(), &msg(&big), &popts(10), 1, &mut wake) {
            Ok(_) => {}
            Err(StoreError::NoMemory) => {
                full_at = Some(i);
                break;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    let full_at = full_at.expect("the zone filled up");
    assert!(full_at > 5);
    assert!(
        s.info(format!("ch{full_at}").as_bytes(), 1).is_none(),
        "a refused publish creates no channel"
    );
    assert_eq!(s.stats.out_of_memory, 1);
    for i in 0..full_at {
        assert!(s.delete_any(format!("ch{i}").as_bytes(), 2, &mut wake).is_some());
    }
    s.publish_msg(b"again", &msg(&big), &popts(10), 3, &mut wake).unwrap();
    let _ = s.listen(b"again", Since::Oldest, &lopts(slot), 3, &mut wake).unwrap();
    drop(s);
    assert_eq!(budget.0.get(), 64 * 1024, "everything was given back");
}

/// Operations for the model-based test.
#[derive(Debug, Clone)]
enum Op {
    Publish { ch: u8, len: usize, ttl: u8 },
    Listen { ch: u8, worker: u8, since: Option<u8> },
    Delete { ch: u8 },
    Tick { ms: u16 },
    Drop { worker: u8 },
    Wake { worker: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..3, 1usize..4, 0u8..3).prop_map(|(ch, len, ttl)| Op::Publish { ch, len, ttl }),
        4 => (0u8..3, 0u8..2, proptest::option::of(0u8..12)).prop_map(|(ch, worker, since)| Op::Listen { ch, worker, since }),
        1 => (0u8..3).prop_map(|ch| Op::Delete { ch }),
        2 => (0u16..1500).prop_map(|ms| Op::Tick { ms }),
        1 => (0u8..2).prop_map(|worker| Op::Drop { worker }),
        3 => (0u8..2).prop_map(|worker| Op::Wake { worker }),
    ]
}

/// The oracle: per channel a plain queue of (id, body, expires).
#[derive(Default)]
struct Model {
    channels: StdMap<u8, VecDeque<(u64, std::vec::Vec<u8>, u64)>>,
    ids: std::vec::Vec<u64>,
    /// Every message published on a channel since it was last deleted: (id, body, expiry).
    published: StdMap<u8, std::vec::Vec<(u64, std::vec::Vec<u8>, u64)>>,
}

impl Model {
    fn next_after(&self, ch: u8, since: u64, now: u64) -> Option<&(u64, std::vec::Vec<u8>, u64)> {
        self.channels.get(&ch)?.iter().find(|(id, _, exp)| *id > since && now < *exp)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_a_simple_model(ops in proptest::collection::vec(op(), 1..80)) {
        let (mut s, slots) = store_with_workers(2);
        let mut model = Model::default();
        let mut workers: [Listeners<u32>; 2] = [Listeners::default(), Listeners::default()];
        // handle -> (channel, since) of every parked listener, to check what it gets.
        let mut waiting: StdMap<u32, (u8, u64)> = StdMap::new();
        let mut next_handle = 0u32;
        let mut now = 1_000u64;
        let mut wake = vec![];
        let mut counter = 0u32;
        for op in ops {
            match op {
                Op::Publish { ch, len, ttl } => {
                    counter += 1;
                    let body = format!("m{counter}").into_bytes();
                    let timeout_ms = u64::from(ttl) * 1000;
                    let opts = PublishOpts { buffer_len: len, buffer_max: 1000, timeout_ms, store: true, channel_timeout_ms: 1_000_000 };
                    let spec = MessageSpec { content_type: b"", event: b"", body: &body, timeout_ms, expire_ms: None };
                    let p = s.publish_msg(&[ch], &spec, &opts, now, &mut wake).unwrap();
                    prop_assert!(model.ids.last().is_none_or(|&l| p.id > l), "ids increase");
                    model.ids.push(p.id);
                    let q = model.channels.entry(ch).or_default();
                    q.retain(|(_, _, exp)| now < *exp);
                    while q.len() >= len { q.pop_front(); }
                    let exp = if timeout_ms == 0 { u64::MAX } else { now + timeout_ms };
                    model.published.entry(ch).or_default().push((p.id, body.clone(), exp));
                    q.push_back((p.id, body, exp));
                }
                Op::Listen { ch, worker, since } => {
                    let since_id = since.and_then(|i| model.ids.get(i as usize).copied());
                    let req = since_id.map_or(Since::Oldest, Since::After);
                    let expect = model.next_after(ch, since_id.unwrap_or(0), now).map(|m| m.1.clone());
                    let w = worker as usize;
                    match s.listen(&[ch], req, &lopts(slots[w]), now, &mut wake).unwrap() {
                        Listen::Message(m) => prop_assert_eq!(Some(m.body().to_vec()), expect),
                        Listen::Park(p) => {
                            prop_assert_eq!(expect, None);
                            next_handle += 1;
                            workers[w].park(&[ch], &p, next_handle);
                            waiting.insert(next_handle, (ch, p.since));
                            model.channels.entry(ch).or_default();
                        }
                    }
                }
                Op::Delete { ch } => {
                    let existed = s.delete_any(&[ch], now, &mut wake).is_some();
                    prop_assert_eq!(existed, model.channels.remove(&ch).is_some());
                    model.published.remove(&ch);
                }
                Op::Tick { ms } => now += u64::from(ms),
                Op::Drop { worker } => {
                    // The oldest listener of that worker disconnects.
                    let w = worker as usize;
                    let serials = workers[w].serials();
                    if let Some(&serial) = serials.first() {
                        for index in 0..64 {
                            let key = crate::listeners::ListenerKey { serial, index };
                            if workers[w].remove(key, |r| s.release(&r.name, r.serial, slots[w], 1, r.last)) {
                                break;
                            }
                        }
                    }
                }
                Op::Wake { worker } => {
                    let w = worker as usize;
                    let mut serials = vec![];
                    s.take_mailbox(slots[w], &mut serials);
                    let mut out = vec![];
                    for serial in workers[w].serials() {
                        workers[w].wake(&mut s, serial, slots[w], now, &mut out, &mut vec![]);
                    }
                    for (h, v) in out {
                        let (ch, since) = waiting.remove(&h).unwrap();
                        match v {
                            Verdict::Deliver(p) => {
                                // The oldest stored message after its id, or an older one
                                // pushed out of the buffer that was in flight to this
                                // waiting listener's worker: never one skipping a stored one.
                                let expect = model.next_after(ch, since, now).map(|m| m.0);
                                let body = p.body().to_vec();
                                let sent = model.published.get(&ch).and_then(|v| {
                                    v.iter().find(|(id, b, exp)| *id > since && *b == body && now < *exp)
                                });
                                prop_assert!(sent.is_some(), "a message of the channel after the id");
                                let id = sent.map_or(0, |m| m.0);
                                prop_assert!(expect.is_none_or(|e| id <= e), "no stored message skipped");
                                prop_assert_eq!(id, p.id);
                            }
                            Verdict::Gone => {}
                            Verdict::Conflict => prop_assert!(false, "broadcast never conflicts"),
                            Verdict::Unavailable => prop_assert!(false, "the global allocator does not fail"),
                            Verdict::Batch(_) | Verdict::GoneChannel(_) | Verdict::DeliverOn(..) => prop_assert!(false, "no multi-channel listener or stream here"),
                        }
                    }
                }
            }
            s.check();
            // The zone never counts a listener no worker holds (deleted channels' listeners
            // are held until their worker wakes).
            let held = (workers[0].len() + workers[1].len()) as u64;
            prop_assert!(s.total_listeners() <= held);
        }
        // Once every worker has looked at its channels the counts match exactly.
        for (w, slot) in slots.iter().enumerate() {
            let mut out = vec![];
            for serial in workers[w].serials() {
                workers[w].wake(&mut s, serial, *slot, now, &mut out, &mut vec![]);
            }
        }
        let held = (workers[0].len() + workers[1].len()) as u64;
        prop_assert_eq!(s.total_listeners(), held);
    }
}

#[test]
fn only_unsignalled_mail_needs_the_backstop() {
    let (mut s, slots) = store_with_workers(2);
    let mut wake = vec![];
    s.listen(b"u", Since::Oldest, &lopts(slots[1]), 1, &mut wake).unwrap();
    s.publish_msg(b"u", &msg(b"x"), &popts(10), 2, &mut wake).unwrap();
    assert_eq!(wake.len(), 1);
    assert!(!s.has_unsignalled_mail(slots[1]), "the pipe carries this one");
    s.clear_signal(slots[1]);
    assert!(s.has_unsignalled_mail(slots[1]), "nobody could write the pipe");
    let mut serials = vec![];
    s.take_mailbox(slots[1], &mut serials);
    assert!(!s.has_unsignalled_mail(slots[1]));
}
