//! `lockhold`: the longest single hold of the zone lock, in-process on martd-core.
//!
//! Every store call the edge makes under the zone lock is one hold, so timing store calls on
//! one thread with the global allocator measures the holds themselves (without nginx's slab
//! allocator, which is not faster). A simulated clock drives a steady load over a store of
//! `--channels` channels: publishes to random channels with a short message timeout (so expiry
//! runs all the time), listeners parking on random channels (and on made-up names: channels
//! created by a listener alone) and leaving after a while, the wake-ups of the workers they
//! park in, and the garbage collection the edge runs every `--gc-interval-ms`: bounded steps
//! of `--budget` units, each one hold, until nothing is due. The same run times the full walk
//! over every channel that one garbage-collection tick was before (`legacy`).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

use martd_core::listeners::{ListenerKey, Listeners};
use martd_core::msgid::Since;
use martd_core::queue::MessageSpec;
use martd_core::store::{AttrUpdate, Concurrency, Listen, ListenOpts, PublishOpts, Store};
use martd_core::{Allocator, Global};
use serde_json::{json, Map, Value};

use crate::alloc::{prefault_heap, SlabSim};
use crate::args::Args;
use crate::legacy;
use crate::scenarios::percentile;

const T0: u64 = 1_700_000_000_000;
const WORKERS: usize = 4;

/// xorshift64*: reproducible and cheap.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

pub(crate) fn channel_name(i: u64) -> Vec<u8> {
    format!("channel-{i}").into_bytes()
}

/// The thread's context switches so far (voluntary or not).
fn switches() -> i64 {
    // SAFETY: `getrusage` only fills the struct it is given.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut ru);
        ru.ru_nvcsw + ru.ru_nivcsw
    }
}

/// CPU time of this thread (ns).
fn cpu_ns() -> i64 {
    // SAFETY: `clock_gettime` only fills the struct it is given.
    unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
        ts.tv_sec * 1_000_000_000 + ts.tv_nsec
    }
}

/// Wall time a call may spend off the CPU before it counts as disturbed (ns).
const OFF_CPU_NS: i64 = 20_000;

/// Hold times of one kind of store call (wall clock, ns), in call order. A call during which
/// the thread was switched out, or was off the CPU for more than [`OFF_CPU_NS`] (another
/// process or the hypervisor ran instead), is marked disturbed: that time is the machine's,
/// not the store's.
#[derive(Default)]
struct Holds {
    ns: Vec<u32>,
    disturbed: Vec<usize>,
}

impl Holds {
    fn time<R>(&mut self, f: impl FnOnce() -> R) -> R {
        let (s0, c0) = (switches(), cpu_ns());
        let t = Instant::now();
        let r = f();
        let wall = t.elapsed().as_nanos().min(u32::MAX as u128) as u32;
        let off_cpu = i64::from(wall) - (cpu_ns() - c0);
        if switches() != s0 || off_cpu >= OFF_CPU_NS {
            self.disturbed.push(self.ns.len());
        }
        self.ns.push(wall);
        r
    }

    fn clear(&mut self) {
        self.ns.clear();
        self.disturbed.clear();
    }
}

/// Simulated credits: how many events of a rate per second are due in one millisecond.
struct Pace {
    per_ms: f64,
    credit: f64,
}

impl Pace {
    fn new(per_s: f64) -> Pace {
        Pace { per_ms: per_s / 1000.0, credit: 0.0 }
    }

    fn take(&mut self) -> u64 {
        self.credit += self.per_ms;
        let n = self.credit.floor();
        self.credit -= n;
        n as u64
    }
}

struct Sim<A: Allocator + Clone> {
    store: Store<A>,
    slots: Vec<u32>,
    workers: Vec<Listeners<u64>>,
    /// (leave time, worker, listener key).
    leaving: BinaryHeap<Reverse<(u64, usize, u64, usize)>>,
    rng: Rng,
    channels: u64,
    ttl_ms: u64,
    channel_timeout_ms: u64,
    budget: usize,
    next_listener: u64,
    next_fresh: u64,
    body: Vec<u8>,
    publish: Holds,
    listen: Holds,
    release: Holds,
    wake: Holds,
    gc: Holds,
    gc_ticks: u64,
    parked: u64,
    answered_at_once: u64,
    delivered: u64,
}

impl<A: Allocator + Clone> Sim<A> {
    fn publish_one(&mut self, name: &[u8], now: u64) {
        let spec = MessageSpec {
            content_type: b"text/plain",
            event: b"",
            body: &self.body,
            timeout_ms: self.ttl_ms,
            expire_ms: None,
        };
        let opts = PublishOpts {
            buffer_len: 10,
            buffer_max: 1000,
            timeout_ms: self.ttl_ms,
            store: true,
            channel_timeout_ms: self.channel_timeout_ms,
        };
        let mut wake = Vec::new();
        let store = &mut self.store;
        let r = self.publish.time(|| {
            store.publish(name, Some(&spec), &AttrUpdate::default(), &opts, now, &mut wake)
        });
        r.expect("the global allocator does not run out");
        for t in wake {
            self.process_mailbox(t.slot, now);
        }
    }

    /// What the edge does when a worker is woken: one hold for its whole mailbox.
    fn process_mailbox(&mut self, slot: u32, now: u64) {
        let w = self.slots.iter().position(|&s| s == slot).expect("a known slot");
        let (store, listeners) = (&mut self.store, &mut self.workers[w]);
        let mut out = Vec::new();
        // Workers to wake again after a one-to-one election: none here (broadcast channels).
        let mut again = Vec::new();
        self.wake.time(|| {
            let mut serials = Vec::new();
            if store.take_mailbox(slot, &mut serials) {
                serials = listeners.serials();
            }
            for serial in serials {
                listeners.wake(store, serial, slot, now, &mut out, &mut again);
            }
        });
        self.delivered += out.len() as u64;
    }

    fn listen_one(&mut self, now: u64, fresh_pct: u64) {
        let name = if self.rng.below(100) < fresh_pct {
            self.next_fresh += 1;
            format!("fresh-{}", self.next_fresh).into_bytes()
        } else {
            channel_name(self.rng.below(self.channels))
        };
        let w = self.rng.below(WORKERS as u64) as usize;
        let since = if self.rng.below(5) == 0 { Since::Oldest } else { Since::After(u64::MAX) };
        let opts = ListenOpts {
            concurrency: Concurrency::Broadcast,
            max_listeners: 0,
            create: true,
            channel_timeout_ms: self.channel_timeout_ms,
            slot: self.slots[w],
            stream: false,
        };
        let mut wake = Vec::new();
        let store = &mut self.store;
        let parked = self.listen.time(|| match store.listen(&name, since, &opts, now, &mut wake) {
            Ok(Listen::Park(p)) => Some(p),
            Ok(Listen::Message(_)) => None,
            Err(e) => panic!("listen: {e:?}"),
        });
        match parked {
            Some(p) => {
                self.next_listener += 1;
                let key = self.workers[w].park(&name, &p, self.next_listener);
                // Leaves (timeout or disconnect) within a minute.
                let at = now + 1_000 + self.rng.below(59_000);
                self.leaving.push(Reverse((at, w, key.serial, key.index)));
                self.parked += 1;
            }
            None => self.answered_at_once += 1,
        }
    }

    fn leave_due(&mut self, now: u64) {
        while let Some(&Reverse((at, w, serial, index))) = self.leaving.peek() {
            if at > now {
                break;
            }
            self.leaving.pop();
            // `None`: answered by a wake-up meanwhile.
            let (store, slot, release) = (&mut self.store, self.slots[w], &mut self.release);
            self.workers[w].remove(ListenerKey { serial, index }, |r| {
                release.time(|| store.release(&r.name, r.serial, slot, 1, r.last));
            });
        }
    }

    /// One garbage-collection tick as the edge runs it: bounded steps until nothing is due.
    fn gc_tick(&mut self, now: u64) {
        self.gc_ticks += 1;
        loop {
            let (store, budget) = (&mut self.store, self.budget);
            if !self.gc.time(|| store.collect_garbage_step(now, budget)) {
                break;
            }
        }
    }
}

/// Percentiles of hold times (ns in, µs out): p50, p99, p99.9, max.
fn stats(mut v: Vec<u32>) -> [f64; 4] {
    v.sort_unstable();
    let us = |q: f64| percentile(&v, q) / 1000.0;
    [us(0.5), us(0.99), us(0.999), v.last().map_or(f64::NAN, |&x| x as f64 / 1000.0)]
}

const KINDS: [&str; 5] = ["publish", "listen", "release", "wake", "gc_step"];

/// One fill and steady phase: the holds of each kind, and what happened.
struct Run {
    holds: [Holds; 5],
    facts: Value,
}

fn replay<A: Allocator + Clone>(p: &Params, alloc: A) -> Result<Run, String> {
    let started = Instant::now();
    let mut store = Store::new_in(alloc);
    let slots: Vec<u32> = (0..WORKERS)
        .map(|i| store.register_worker(1000 + i as i32, 1, i as u32, &|_| true))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("register_worker: {e:?}"))?;
    let mut sim = Sim {
        store,
        slots,
        workers: (0..WORKERS).map(|_| Listeners::default()).collect(),
        leaving: BinaryHeap::new(),
        rng: Rng::new(p.seed),
        channels: p.channels,
        ttl_ms: p.ttl_ms,
        channel_timeout_ms: p.channel_timeout_ms,
        budget: p.budget,
        next_listener: 0,
        next_fresh: 0,
        body: vec![b'm'; p.size],
        publish: Holds::default(),
        listen: Holds::default(),
        release: Holds::default(),
        wake: Holds::default(),
        gc: Holds::default(),
        gc_ticks: 0,
        parked: 0,
        answered_at_once: 0,
        delivered: 0,
    };

    // Fill: one publish per channel, spread over the channel timeout so that channels later
    // expire and go at a steady pace, not all at once; garbage collection runs meanwhile.
    let fill_ms = p.channel_timeout_ms.max(1);
    let mut now = T0;
    let mut next_gc = T0 + p.gc_interval_ms;
    for i in 0..p.channels {
        now = T0 + i * fill_ms / p.channels.max(1);
        while now >= next_gc {
            sim.gc_tick(next_gc);
            next_gc += p.gc_interval_ms;
        }
        sim.publish_one(&channel_name(i), now);
    }
    let fill_s = started.elapsed().as_secs_f64();
    for h in [&mut sim.publish, &mut sim.listen, &mut sim.release, &mut sim.wake, &mut sim.gc] {
        h.clear();
    }
    sim.gc_ticks = 0;

    let (mut pubs, mut listens) = (Pace::new(p.publish_rate), Pace::new(p.listen_rate));
    let end = now + (p.seconds * 1000.0) as u64;
    let steady = Instant::now();
    while now < end {
        now += 1;
        for _ in 0..pubs.take() {
            let name = channel_name(sim.rng.below(p.channels));
            sim.publish_one(&name, now);
        }
        for _ in 0..listens.take() {
            sim.listen_one(now, p.fresh_pct);
        }
        sim.leave_due(now);
        if now >= next_gc {
            sim.gc_tick(now);
            next_gc += p.gc_interval_ms;
        }
    }
    let steady_s = steady.elapsed().as_secs_f64();
    let s = &sim.store;
    let facts = json!({
        "channels_end": s.channel_count(),
        "listeners_end": s.total_listeners(),
        "channels_created": s.stats.channels_created,
        "channels_removed": s.stats.channels_removed,
        "published": s.stats.published,
        "parked": sim.parked,
        "answered_at_once": sim.answered_at_once,
        "delivered": sim.delivered,
        "gc_ticks": sim.gc_ticks,
        "fill_s": (fill_s * 10.0).round() / 10.0,
        "steady_s": (steady_s * 10.0).round() / 10.0,
    });
    eprintln!("lockhold: replay done: {facts}");
    Ok(Run { holds: [sim.publish, sim.listen, sim.release, sim.wake, sim.gc], facts })
}

fn run_with<A: Allocator + Clone>(
    p: &Params,
    make: impl Fn() -> Result<A, String>,
) -> Result<u8, String> {
    // The old tick first, on its own copy of the same channels, then dropped.
    let walk_us = legacy::full_walk_us(p.channels, p.size, p.ttl_ms, p.legacy_walks);
    eprintln!("lockhold: legacy full walk over {} channels: {walk_us:?} µs", p.channels);
    let runs: Vec<Run> =
        (0..p.replays.max(1)).map(|_| replay(p, make()?)).collect::<Result<_, _>>()?;

    let mut m = Map::new();
    let header = "| store call (one lock hold) | calls | p50 µs | p99 µs | p99.9 µs | max µs |";
    let mut one = vec![
        format!("{header} disturbed: calls (max µs) |"),
        "|---|---|---|---|---|---|---|".to_string(),
    ];
    let mut best = vec![header.to_string(), "|---|---|---|---|---|---|".to_string()];
    let (mut one_all, mut best_all, mut disturbed_all) = (vec![], vec![], vec![]);
    let mut row = |name: &str, kept: Vec<u32>, disturbed: Vec<u32>, fastest: Vec<u32>| {
        let n = kept.len();
        let d_max = disturbed.iter().max().map_or(0.0, |&x| x as f64 / 1000.0);
        let [p50, p99, p999, max] = stats(kept);
        one.push(format!(
            "| {name} | {n} | {p50:.2} | {p99:.2} | {p999:.2} | {max:.2} | {} ({d_max:.0}) |",
            disturbed.len()
        ));
        let nf = fastest.len();
        let [f50, f99, f999, fmax] = stats(fastest);
        best.push(format!("| {name} | {nf} | {f50:.2} | {f99:.2} | {f999:.2} | {fmax:.2} |"));
        for (k, v) in [("p99", p99), ("p999", p999), ("max", max)] {
            m.insert(format!("{name}_{k}_us"), json!(v));
        }
        for (k, v) in [("p99", f99), ("p999", f999), ("max", fmax)] {
            m.insert(format!("{name}_fastest_{k}_us"), json!(v));
        }
        m.insert(format!("{name}_calls"), json!(n));
        m.insert(format!("{name}_disturbed_calls"), json!(disturbed.len()));
    };
    for (k, name) in KINDS.iter().enumerate() {
        let first = &runs[0].holds[k];
        let mut kept = first.ns.clone();
        let mut disturbed = vec![];
        for &i in first.disturbed.iter().rev() {
            disturbed.push(kept.swap_remove(i));
        }
        // Per call, the fastest of the replays (the same calls in the same order each time).
        let len = runs.iter().map(|r| r.holds[k].ns.len()).min().unwrap_or(0);
        let fastest: Vec<u32> =
            (0..len).map(|i| runs.iter().map(|r| r.holds[k].ns[i]).min().unwrap_or(0)).collect();
        one_all.extend_from_slice(&kept);
        disturbed_all.extend_from_slice(&disturbed);
        best_all.extend_from_slice(&fastest);
        row(name, kept, disturbed, fastest);
    }
    row("all", one_all, disturbed_all, best_all);
    let walk_max = walk_us.iter().copied().fold(f64::NAN, f64::max);
    m.insert("legacy_walk_max_us".into(), json!(walk_max));
    m.insert("legacy_walk_us".into(), json!(walk_us));
    let params = json!({
        "channels": p.channels, "seconds": p.seconds, "publish_rate": p.publish_rate,
        "listen_rate": p.listen_rate, "fresh_pct": p.fresh_pct, "ttl_ms": p.ttl_ms,
        "channel_timeout_ms": p.channel_timeout_ms, "budget": p.budget,
        "gc_interval_ms": p.gc_interval_ms, "size": p.size, "seed": p.seed,
        "alloc": p.alloc, "replays": runs.len(),
    });
    println!("\nlockhold: {params}");
    println!("\nOne run (calls the machine disturbed are left out and counted apart):\n");
    for r in &one {
        println!("{r}");
    }
    println!("\nPer call, the fastest of {} replays of the same calls:\n", runs.len());
    for r in &best {
        println!("{r}");
    }
    println!(
        "\nThe garbage-collection tick before (one walk over every channel): {} µs max of {} walks",
        walk_max.round(),
        walk_us.len()
    );
    let facts: Vec<&Value> = runs.iter().map(|r| &r.facts).collect();
    println!("{}", json!(facts));
    let command = std::iter::once("martd-bench".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let line = json!({
        "bench": "martd-bench", "scenario": "lockhold", "case": "lockhold", "server": "martd-core",
        "errors": 0, "metrics": m, "params": params, "facts": facts, "command": command,
    });
    println!("{line}");
    Ok(0)
}

struct Params {
    channels: u64,
    seconds: f64,
    publish_rate: f64,
    listen_rate: f64,
    fresh_pct: u64,
    ttl_ms: u64,
    channel_timeout_ms: u64,
    budget: usize,
    gc_interval_ms: u64,
    size: usize,
    legacy_walks: u32,
    seed: u64,
    replays: u32,
    alloc: String,
}

pub fn run(a: &Args) -> Result<u8, String> {
    let channels: u64 = a.num("channels", 1_000_000)?;
    let p = Params {
        channels,
        seconds: a.num("seconds", 30.0)?,
        publish_rate: a.num("publish-rate", 50_000.0)?,
        listen_rate: a.num("listen-rate", 10_000.0)?,
        fresh_pct: a.num("fresh-pct", 30)?,
        ttl_ms: a.num("ttl-ms", 2_000)?,
        channel_timeout_ms: a.num("channel-timeout-ms", 60_000)?,
        budget: a.num("budget", martd_core::store::GC_STEP_BUDGET)?,
        gc_interval_ms: a.num("gc-interval-ms", 1_000)?,
        size: a.num("size", 64)?,
        legacy_walks: a.num("legacy-walks", 3)?,
        seed: a.num("seed", 1)?,
        replays: a.num("replays", 3)?,
        alloc: a.string("alloc", "slab"),
    };
    let prefault_mb: usize = a.num("prefault-mb", 256 + channels as usize * 2 / 1000)?;
    a.finish()?;
    // Memory touched before the run, so that no hold pays a first touch of fresh memory.
    prefault_heap(prefault_mb << 20);
    match p.alloc.as_str() {
        "global" => run_with(&p, || Ok(Global)),
        "slab" => run_with(&p, || SlabSim::new(prefault_mb << 20)),
        other => Err(format!("--alloc: global or slab, not {other:?}")),
    }
}
