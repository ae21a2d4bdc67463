//! Garbage collection: when things expire, what a step may cost, full zones, crashed workers,
//! and a model of channel lifetimes.

use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;

use allocator_api2::alloc::Global;
use proptest::prelude::*;

use super::tests::{lopts, msg, popts, store_with_workers, Budget};
use super::*;

const T0: u64 = 1_700_000_000_000;

fn ttl(ms: u64) -> (MessageSpec<'static>, PublishOpts) {
    let spec =
        MessageSpec { content_type: b"", event: b"", body: b"x", timeout_ms: ms, expire_ms: None };
    (spec, PublishOpts { timeout_ms: ms, ..popts(10) })
}

fn park<A: Allocator + Clone>(s: &mut Store<A>, name: &[u8], slot: u32, now: u64) -> Parked {
    match s.listen(name, Since::After(u64::MAX), &lopts(slot), now, &mut vec![]) {
        Ok(Listen::Park(p)) => p,
        Ok(Listen::Message(_)) => panic!("expected to park"),
        Err(e) => panic!("{e:?}"),
    }
}

fn queued<A: Allocator + Clone>(s: &Store<A>, name: &[u8]) -> usize {
    s.channels.find(name).map_or(0, |p| unsafe { p.as_ref() }.queue.len())
}

#[test]
fn a_message_is_reclaimed_at_its_expiry_on_an_idle_channel() {
    let (mut s, _) = store_with_workers(1);
    let (spec, opts) = ttl(1_000);
    s.publish_msg(b"a", &spec, &opts, T0, &mut vec![]).unwrap();
    assert!(!s.collect_garbage_step(T0 + 999, 64), "nothing due yet");
    assert_eq!(queued(&s, b"a"), 1);
    assert_eq!(s.collect_garbage(T0 + 999), 0);
    assert_eq!(queued(&s, b"a"), 1);
    s.check();
    assert_eq!(s.collect_garbage(T0 + 1_000), 0);
    assert_eq!(queued(&s, b"a"), 0, "reclaimed at its expiry");
    s.check_collected(T0 + 1_000);
    // The channel itself stays for its channel timeout after the publish.
    assert_eq!(s.collect_garbage(T0 + 299_999), 0);
    assert_eq!(s.collect_garbage(T0 + 300_000), 1);
    assert_eq!(s.channel_count(), 0);
    s.check();
}

#[test]
fn a_message_with_its_own_expiry_is_reclaimed_at_it_on_an_idle_channel() {
    let (mut s, _) = store_with_workers(1);
    // The channel's messages live an hour; one message asks for 2 s, behind an older one.
    let (spec, opts) = ttl(3_600_000);
    s.publish_msg(b"e", &spec, &opts, T0, &mut vec![]).unwrap();
    let short = MessageSpec { expire_ms: Some(2_000), ..spec };
    s.publish_msg(b"e", &short, &opts, T0 + 10, &mut vec![]).unwrap();
    // Never expiring, on a channel whose messages do.
    let never = MessageSpec { expire_ms: Some(0), ..spec };
    s.publish_msg(b"e", &never, &opts, T0 + 20, &mut vec![]).unwrap();
    assert_eq!(queued(&s, b"e"), 3);
    assert_eq!(s.collect_garbage(T0 + 2_009), 0);
    assert_eq!(queued(&s, b"e"), 3);
    // Nothing touches the channel: garbage collection alone reclaims it at its millisecond.
    s.collect_garbage(T0 + 2_010);
    assert_eq!(queued(&s, b"e"), 2, "the 2 s message went, the older one stays");
    s.check_collected(T0 + 2_010);
    s.collect_garbage(T0 + 3_600_000);
    assert_eq!(queued(&s, b"e"), 1, "the hour's message went, the one that never expires stays");
    s.check();
}

#[test]
fn far_deadlines_and_a_clock_that_jumps() {
    let (mut s, _) = store_with_workers(1);
    let far = 1u64 << 40; // beyond the wheel's exact span
    let (spec, opts) = ttl(far);
    s.publish_msg(b"far", &spec, &opts, T0, &mut vec![]).unwrap();
    let (spec, opts) = ttl(5);
    s.publish_msg(b"near", &spec, &opts, T0, &mut vec![]).unwrap();
    for now in [T0 + 4, T0 - 10_000, T0 + 3, T0 + 5, T0 + (1 << 37), T0 + far - 1] {
        s.collect_garbage(now);
        s.check();
        assert_eq!(queued(&s, b"far"), 1, "at {now}");
    }
    assert_eq!(queued(&s, b"near"), 0);
    // Placed again each time it reaches the horizon, it still goes at its millisecond.
    s.collect_garbage(T0 + far);
    assert_eq!(queued(&s, b"far"), 0);
    s.check_collected(T0 + far);
    // A clock that went back delays nothing past its deadline and loops on nothing.
    let (spec, opts) = ttl(100);
    s.publish_msg(b"back", &spec, &opts, T0 + far, &mut vec![]).unwrap();
    assert!(!s.collect_garbage_step(T0 + far - 50_000, 8));
    assert!(!s.collect_garbage_step(T0 + far + 99, 8));
    s.collect_garbage(T0 + far + 100);
    assert_eq!(queued(&s, b"back"), 0);
}

#[test]
fn listener_only_channels_go_soon_after_their_last_listener() {
    let (mut s, slots) = store_with_workers(1);
    let p = park(&mut s, b"l", slots[0], T0);
    assert_eq!(s.collect_garbage(T0 + 60_000), 0, "kept while someone listens");
    s.release(b"l", p.serial, slots[0], 1, Some(0));
    assert_eq!(s.collect_garbage(T0 + 60_000), 1, "gone at the next step");
    // Left within the grace after the listen: at the end of the grace.
    let p = park(&mut s, b"m", slots[0], T0 + 70_000);
    s.release(b"m", p.serial, slots[0], 1, Some(0));
    assert_eq!(s.collect_garbage(T0 + 70_000 + LISTENER_ONLY_GRACE_MS - 1), 0);
    assert_eq!(s.collect_garbage(T0 + 70_000 + LISTENER_ONLY_GRACE_MS), 1);
    // A channel published to keeps its channel timeout.
    let p = park(&mut s, b"n", slots[0], T0 + 80_000);
    let off = PublishOpts { store: false, ..popts(10) };
    s.publish_msg(b"n", &msg(b"x"), &off, T0 + 80_000, &mut vec![]).unwrap();
    s.release(b"n", p.serial, slots[0], 1, Some(p.last_id));
    assert_eq!(s.collect_garbage(T0 + 80_000 + 299_999), 0);
    assert_eq!(s.collect_garbage(T0 + 80_000 + 300_000), 1);
    s.check();
}

#[test]
fn a_flood_of_listeners_on_made_up_names_leaves_nothing() {
    let budget = Budget(Rc::new(Cell::new(1 << 30)));
    let mut s = Store::new_in(budget.clone());
    let slot = s.register_worker(1, 1, 0, &|_| true).unwrap();
    s.collect_garbage(T0);
    let baseline = budget.0.get();
    let mut parked = vec![];
    for i in 0..5_000u32 {
        let name = format!("random-{i}");
        parked.push((name.clone(), park(&mut s, name.as_bytes(), slot, T0)));
    }
    assert_eq!(s.channel_count(), 5_000);
    for (name, p) in &parked {
        s.release(name.as_bytes(), p.serial, slot, 1, Some(0));
    }
    assert_eq!(s.collect_garbage(T0 + 30_000), 5_000);
    s.check();
    // Channels, names and waiters are all given back; the table keeps a page or two.
    let kept = baseline - budget.0.get();
    assert!(kept <= 3 * paged::PAGE_BYTES, "{kept} bytes still held");
}

#[test]
fn each_step_does_at_most_its_budget() {
    let (mut s, _) = store_with_workers(1);
    let (spec, opts) = ttl(10);
    for i in 0..1_000u32 {
        s.publish_msg(format!("c{i}").as_bytes(), &spec, &opts, T0, &mut vec![]).unwrap();
    }
    let total = |s: &Store<Global>| -> usize {
        (0..1_000u32).map(|i| queued(s, format!("c{i}").as_bytes())).sum()
    };
    let mut steps = 0;
    let mut left = total(&s);
    while s.collect_garbage_step(T0 + 10, 16) {
        steps += 1;
        let now_left = total(&s);
        assert!(left - now_left <= 16, "{} messages in one step", left - now_left);
        left = now_left;
        s.check();
    }
    assert_eq!(total(&s), 0);
    // One unit per channel, plus one per level a channel moved down.
    assert!((1_000 / 16..=3 * 1_000 / 16 + 1).contains(&steps), "{steps} steps");
    // The channels themselves go later, in bounded steps too.
    let mut removed = 0;
    loop {
        let before = s.channel_count();
        let more = s.collect_garbage_step(T0 + 300_010, 16);
        assert!(before - s.channel_count() <= 16);
        removed += before - s.channel_count();
        if !more {
            break;
        }
    }
    assert_eq!(removed, 1_000);
}

#[test]
fn a_crashed_workers_counts_go_in_bounded_steps_without_a_touch() {
    let (mut s, slots) = store_with_workers(2);
    for i in 0..300u32 {
        let name = format!("k{i}");
        park(&mut s, name.as_bytes(), slots[1], T0);
        if i % 3 == 0 {
            park(&mut s, name.as_bytes(), slots[0], T0);
        }
        if i % 2 == 0 {
            s.publish_msg(name.as_bytes(), &msg(b"m"), &popts(1), T0, &mut vec![]).unwrap();
        }
    }
    // Worker 1 crashes; its respawn purges the slot.
    let new_slot = s.register_worker(900, 1, 1, &|pid| pid != 101).unwrap();
    assert_eq!(s.total_listeners(), 100, "dead counts are left out at once");
    assert_eq!(s.info(b"k1", T0).unwrap().listeners, 0);
    assert_eq!(s.info(b"k3", T0).unwrap().listeners, 1);
    s.check();
    let mut steps = 0;
    while s.collect_garbage_step(T0 + 10_000, 16) {
        steps += 1;
        s.check();
    }
    assert!(s.dead.is_empty() && s.sweep.is_none());
    // Half the buckets and channels per step (the sweep's share).
    let bound = (s.channels.bucket_count() + 300).div_ceil(8) + 1;
    assert!(steps <= bound, "{steps} steps, bound {bound}");
    // Channels only the dead worker listened to and never published to are gone.
    assert_eq!(s.channel_count(), 300 - 100);
    s.check_collected(T0 + 10_000);
    let _ = new_slot;
}

#[test]
fn a_graceful_exit_leaves_nothing_to_sweep() {
    let (mut s, slots) = store_with_workers(2);
    let mut w: crate::listeners::Listeners<u32> = crate::listeners::Listeners::default();
    for i in 0..50u32 {
        let name = format!("g{i}");
        let p = park(&mut s, name.as_bytes(), slots[1], T0);
        w.park(name.as_bytes(), &p, i);
    }
    for (removed, n) in w.drain_all().0 {
        s.release(&removed.name, removed.serial, slots[1], n, removed.last);
    }
    s.unregister_worker(slots[1]);
    assert!(s.sweep.is_none() && s.dead.is_empty());
    s.check();
}

#[test]
fn a_full_zone_runs_one_bounded_step_not_a_walk() {
    let budget = Budget(Rc::new(Cell::new(256 * 1024)));
    let mut s = Store::new_in(budget.clone());
    let slot = s.register_worker(1, 1, 0, &|_| true).unwrap();
    let (spec, opts) = ttl(1_000);
    let mut n = 0u32;
    while s.publish_msg(format!("e{n}").as_bytes(), &spec, &opts, T0, &mut vec![]).is_ok() {
        n += 1;
    }
    assert!(n as usize > OOM_GC_BUDGET, "{n} channels");
    assert_eq!(s.stats.out_of_memory, 1);
    s.check();
    // Everything has expired: a refused allocation frees what one step reaches, enough here.
    s.publish_msg(b"after", &msg(b"y"), &popts(1), T0 + 1_000, &mut vec![]).unwrap();
    let emptied = (0..n).filter(|i| queued(&s, format!("e{i}").as_bytes()) == 0).count();
    assert!(emptied <= OOM_GC_BUDGET, "{emptied} queues emptied");
    let p = park(&mut s, b"listener", slot, T0 + 1_000);
    assert_eq!(p.last_id, 0);
    s.check();
    drop(s);
    assert_eq!(budget.0.get(), 256 * 1024, "everything was given back");
}

/// Operations for the lifetime model.
#[derive(Debug, Clone)]
enum Op {
    Publish { ch: u8, ttl: u8, timeout: u8 },
    Listen { ch: u8, worker: u8, timeout: u8 },
    Release { pick: u8 },
    Delete { ch: u8 },
    Tick { ms: u64 },
    Step { budget: u8 },
    FullGc,
    Crash { worker: u8 },
}

const TTLS: [u64; 5] = [0, 1, 500, 30_000, 1 << 37];
const TIMEOUTS: [u64; 4] = [0, 1_000, 60_000, 1 << 38];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..6, 0u8..5, 0u8..4).prop_map(|(ch, ttl, timeout)| Op::Publish { ch, ttl, timeout }),
        4 => (0u8..6, 0u8..2, 0u8..4).prop_map(|(ch, worker, timeout)| Op::Listen { ch, worker, timeout }),
        3 => any::<u8>().prop_map(|pick| Op::Release { pick }),
        1 => (0u8..6).prop_map(|ch| Op::Delete { ch }),
        3 => prop_oneof![0u64..3_000, 0u64..700_000, (1u64 << 36)..(1u64 << 38)].prop_map(|ms| Op::Tick { ms }),
        3 => (1u8..6).prop_map(|budget| Op::Step { budget }),
        1 => Just(Op::FullGc),
        1 => (0u8..2).prop_map(|worker| Op::Crash { worker }),
    ]
}

/// A channel as the model sees it.
#[derive(Debug)]
struct MChan {
    serial: u64,
    /// Expiry of each stored message, oldest first.
    msgs: std::vec::Vec<u64>,
    published: bool,
    listeners: [u32; 2],
    last_active: u64,
    timeout: u64,
}

impl MChan {
    fn removable(&self, now: u64) -> bool {
        let wait = if self.published { self.timeout } else { LISTENER_ONLY_GRACE_MS };
        self.listeners == [0, 0]
            && self.msgs.iter().all(|&e| e <= now)
            && now >= self.last_active.saturating_add(wait)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: if cfg!(miri) { 3 } else { 400 }, ..ProptestConfig::default() })]

    /// Channels go exactly when the model says they may, never while something is alive
    /// in them; counts of crashed workers disappear; every step keeps the store consistent.
    #[test]
    fn channel_lifetimes_match_a_model(ops in proptest::collection::vec(op(), 1..120)) {
        let (mut s, mut slots) = store_with_workers(2);
        let mut pids = [100i32, 101];
        let mut model: HashMap<u8, MChan> = HashMap::new();
        // Parked listeners: (channel, serial, worker).
        let mut parked: std::vec::Vec<(u8, u64, usize)> = vec![];
        let mut now = T0;
        for op in ops {
            match op {
                Op::Publish { ch, ttl, timeout } => {
                    let ttl = TTLS[ttl as usize];
                    let timeout = TIMEOUTS[timeout as usize];
                    let opts = PublishOpts { buffer_len: 3, buffer_max: 1000, timeout_ms: ttl, store: true, channel_timeout_ms: timeout };
                    let spec = MessageSpec { content_type: b"", event: b"", body: b"b", timeout_ms: ttl, expire_ms: None };
                    let p = s.publish_msg(&[ch], &spec, &opts, now, &mut vec![]).unwrap();
                    let serial = s.channels.find(&[ch]).map(|p| unsafe { p.as_ref() }.serial).unwrap();
                    let m = model.entry(ch).or_insert(MChan {
                        serial, msgs: vec![], published: false, listeners: [0, 0], last_active: now, timeout,
                    });
                    prop_assert_eq!(m.serial, serial);
                    prop_assert_eq!(p.listeners, m.listeners[0] + m.listeners[1]);
                    m.msgs.retain(|&e| e > now);
                    m.msgs.push(if ttl == 0 { u64::MAX } else { now + ttl });
                    if m.msgs.len() > 3 { m.msgs.remove(0); }
                    m.published = true;
                    m.last_active = now;
                    m.timeout = timeout;
                }
                Op::Listen { ch, worker, timeout } => {
                    let w = worker as usize;
                    let timeout = TIMEOUTS[timeout as usize];
                    let opts = ListenOpts { channel_timeout_ms: timeout, ..lopts(slots[w]) };
                    let Listen::Park(p) = s.listen(&[ch], Since::After(u64::MAX), &opts, now, &mut vec![]).unwrap() else {
                        panic!("nothing is newer than the newest id");
                    };
                    let m = model.entry(ch).or_insert(MChan {
                        serial: p.serial, msgs: vec![], published: false, listeners: [0, 0], last_active: now, timeout,
                    });
                    prop_assert_eq!(m.serial, p.serial);
                    m.listeners[w] += 1;
                    m.last_active = now;
                    m.timeout = timeout;
                    parked.push((ch, p.serial, w));
                }
                Op::Release { pick } => {
                    if !parked.is_empty() {
                        let (ch, serial, w) = parked.swap_remove(pick as usize % parked.len());
                        let last = !parked.iter().any(|&(c, sr, pw)| c == ch && sr == serial && pw == w);
                        s.release(&[ch], serial, slots[w], 1, last.then_some(0));
                        if let Some(m) = model.get_mut(&ch).filter(|m| m.serial == serial) {
                            m.listeners[w] -= 1;
                        }
                    }
                }
                Op::Delete { ch } => {
                    prop_assert_eq!(s.delete_any(&[ch], now, &mut vec![]).is_some(), model.remove(&ch).is_some());
                }
                Op::Tick { ms } => now += ms,
                Op::Step { budget } => {
                    s.collect_garbage_step(now, budget as usize);
                }
                Op::FullGc => {
                    s.collect_garbage(now);
                    s.check_collected(now);
                }
                Op::Crash { worker } => {
                    let w = worker as usize;
                    let dead = pids[w];
                    pids[w] += 10;
                    slots[w] = s.register_worker(pids[w], 1, w as u32, &|pid| pid != dead).unwrap();
                    parked.retain(|&(_, _, pw)| pw != w);
                    for m in model.values_mut() {
                        m.listeners[w] = 0;
                    }
                }
            }
            // Channels the store let go must have been removable; the others are the same.
            let gone: std::vec::Vec<u8> = model.keys().copied().filter(|ch| s.channels.find(&[*ch]).is_none()).collect();
            for ch in gone {
                let m = model.remove(&ch).unwrap();
                prop_assert!(m.removable(now), "channel {} removed while alive: {:?} at {}", ch, m, now);
            }
            prop_assert_eq!(s.channel_count(), model.len());
            if matches!(op, Op::FullGc) {
                for (ch, m) in &model {
                    prop_assert!(!m.removable(now), "channel {} kept after its time: {:?}", ch, m);
                }
            }
            for (ch, m) in &model {
                let info = s.info(&[*ch], now).unwrap();
                prop_assert_eq!(info.listeners, m.listeners[0] + m.listeners[1]);
            }
            s.check();
        }
    }

    /// A zone too small for what is asked refuses some requests and stays consistent;
    /// dropping the store gives every byte back.
    #[test]
    fn a_small_zone_stays_consistent(ops in proptest::collection::vec(op(), 1..120), size in 2_000usize..40_000) {
        let budget = Budget(Rc::new(Cell::new(size)));
        {
            let mut s = Store::new_in(budget.clone());
            let mut slots = vec![];
            for i in 0..2 {
                match s.register_worker(100 + i, 1, i as u32, &|_| true) {
                    Ok(slot) => slots.push(slot),
                    Err(_) => return Ok(()),
                }
            }
            let mut now = T0;
            let mut parked: std::vec::Vec<(std::vec::Vec<u8>, u64, usize)> = vec![];
            let body = [b'z'; 300];
            for op in ops {
                match op {
                    Op::Publish { ch, ttl, timeout } => {
                        let name = vec![b'p'; 1 + ch as usize * 40];
                        let spec = MessageSpec { content_type: b"t", event: b"", body: &body, timeout_ms: TTLS[ttl as usize], expire_ms: None };
                        let opts = PublishOpts { buffer_len: 4, buffer_max: 1000, timeout_ms: TTLS[ttl as usize], store: true, channel_timeout_ms: TIMEOUTS[timeout as usize] };
                        match s.publish_msg(&name, &spec, &opts, now, &mut vec![]) {
                            Ok(_) | Err(StoreError::NoMemory) => {}
                            Err(e) => prop_assert!(false, "{:?}", e),
                        }
                    }
                    Op::Listen { ch, worker, .. } => {
                        let w = worker as usize;
                        let name = vec![b'l'; 1 + ch as usize * 60];
                        let existed = s.channels.find(&name).is_some();
                        match s.listen(&name, Since::After(u64::MAX), &lopts(slots[w]), now, &mut vec![]) {
                            Ok(Listen::Park(p)) => parked.push((name, p.serial, w)),
                            Ok(Listen::Message(_)) => prop_assert!(false, "no message is newer"),
                            Err(StoreError::NoMemory) => prop_assert!(existed || s.channels.find(&name).is_none()),
                            Err(e) => prop_assert!(false, "{:?}", e),
                        }
                    }
                    Op::Release { pick } => {
                        if !parked.is_empty() {
                            let (name, serial, w) = parked.swap_remove(pick as usize % parked.len());
                            s.release(&name, serial, slots[w], 1, Some(0));
                        }
                    }
                    Op::Delete { ch } => {
                        s.delete_any(&vec![b'p'; 1 + ch as usize * 40], now, &mut vec![]);
                    }
                    Op::Tick { ms } => now += ms,
                    Op::Step { budget } => {
                        s.collect_garbage_step(now, budget as usize);
                    }
                    Op::FullGc => {
                        s.collect_garbage(now);
                    }
                    Op::Crash { worker } => {
                        let w = worker as usize;
                        let dead = 100 + w as i32;
                        if let Ok(slot) = s.register_worker(200 + w as i32, 1, w as u32, &|pid| pid != dead) {
                            slots[w] = slot;
                            parked.retain(|&(_, _, pw)| pw != w);
                        }
                    }
                }
                s.check();
            }
        }
        prop_assert_eq!(budget.0.get(), size, "every byte given back");
    }
}
