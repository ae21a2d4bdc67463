//! `report`: medians per server, martd/nchan ratios, targets, and BENCHMARKS.md.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;

use serde_json::Value;

use crate::args::Args;

/// The targets, checked on the medians.
enum Target {
    /// martd/nchan ≤ x
    RatioMax(f64),
    /// martd/nchan ≥ x
    RatioMin(f64),
    /// martd/nchan < x
    RatioBelow(f64),
    /// martd's median ≤ x
    MartdMax(f64),
    /// martd's median ≥ x
    MartdMin(f64),
}

fn target(case: &str, metric: &str) -> Option<Target> {
    use Target::*;
    let scenario = case.split('-').next().unwrap_or(case);
    if case == "idle-keepalive" || case == "fanout-floor" {
        return None; // nginx's floor, for reference
    }
    if case.ends_with("-multi") {
        return None; // compared with the single-channel case instead (VERSUS)
    }
    // Streaming subscribers (EventSource, WebSocket); latency-stream has latency's target.
    // Two nodes sharing channels through Redis.
    match (case, metric) {
        ("redis-latency", "p99_us") => return Some(MartdMax(2000.0)),
        ("redis-publish", "pubs_per_s") => return Some(RatioMin(1.5)),
        _ if case.starts_with("redis-") => return None,
        ("idle-sse" | "idle-ws", "rss_per_listener_b") => return Some(RatioMax(0.5)),
        ("idle-sse" | "idle-ws", _) => return None,
        ("fanout-sse" | "fanout-ws", "round_ms") => return Some(RatioMax(1.0)),
        ("fanout-sse" | "fanout-ws", "server_us_per_delivery") => return Some(RatioBelow(1.0)),
        ("fanout-sse" | "fanout-ws", _) => return None,
        _ => {}
    }
    Some(match (scenario, metric) {
        ("fanout", "round_ms" | "p50_us" | "p99_us") => RatioMax(0.5),
        ("publish", "pubs_per_s") => RatioMin(1.25),
        ("publish", "pub_over_ret") => MartdMin(0.9),
        ("idle", "rss_per_listener_b") => RatioMax(0.6),
        ("latency", "p99_us") => MartdMax(1000.0),
        // Copies per listener would show as ~1; one copy per worker as ~workers/listeners.
        ("big", "copies_per_listener") => MartdMax(0.1),
        _ => return None,
    })
}

/// Cases compared with another case of the same invocation, each server against itself:
/// (case, base case, metric, target on martd's case/base ratio).
const VERSUS: &[(&str, &str, &str, Option<f64>)] = &[
    ("fanout-multi", "fanout-1ch", "round_ms", Some(1.2)),
    ("fanout-multi", "fanout-1ch", "p50_us", None),
    ("fanout-multi", "fanout-1ch", "p99_us", None),
    ("fanout-multi", "fanout-1ch", "server_us_per_delivery", Some(1.2)),
    ("idle-multi", "idle", "rss_per_listener_b", None),
    ("idle-multi", "idle", "anon_per_listener_b", None),
    ("idle-multi", "idle", "shmem_per_listener_b", None),
    // The cost of TLS to Redis (martd only: nchan's column stays empty).
    ("redis-publish-tls", "redis-publish", "pubs_per_s", None),
    ("redis-publish-tls", "redis-publish", "server_us_per_pub", None),
];

/// The metrics shown in the summary table (every metric is in "Every run"), by scenario (the
/// case's first word), or by case for the redis-* cases.
fn key_metrics(scenario: &str) -> &'static [&'static str] {
    match scenario {
        // rate_per_s: the publish rate held (the latencies are at that rate).
        "redis-latency" => &["p50_us", "p99_us", "max_us", "rate_per_s"],
        "redis-publish" | "redis-publish-tls" => &[
            "pubs_per_s",
            "server_us_per_pub",
            "node_a_us_per_pub",
            "node_b_us_per_pub",
            "redis_us_per_pub",
        ],
        "redis-fanout" => &[
            "round_ms",
            "round_b_ms",
            "p50_us",
            "p99_us",
            "server_us_per_delivery",
            "redis_us_per_delivery",
        ],
        "fanout" => &["round_ms", "p50_us", "p99_us", "server_us_per_delivery"],
        "publish" => {
            &["pubs_per_s", "ret_per_s", "pub_over_ret", "server_us_per_pub", "server_us_per_ret"]
        }
        "idle" => &["rss_per_listener_b", "anon_per_listener_b"],
        "capacity" => &["received", "completion_ms", "setup_s"],
        "latency" => &["p50_us", "p99_us", "max_us"],
        "big" => &["deliveries_per_s", "round_ms", "rss_round_growth_kb", "copies_per_listener"],
        _ => &[],
    }
}

/// Median of the non-negative values (metrics are never negative; a negative one is a
/// placeholder for "not measured").
fn median(v: Vec<f64>) -> f64 {
    let v: Vec<f64> = v.into_iter().filter(|x| *x >= 0.0).collect();
    crate::scenarios::median(&v)
}

fn num(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

struct Row {
    case: String,
    metric: String,
    martd: f64,
    nchan: f64,
    target: String,
    holds: String,
    /// A `case ÷ base` row: the values are ratios, no martd/nchan column.
    cross: bool,
}

pub fn run(a: &Args) -> Result<u8, String> {
    let results = a.str_opt("results").ok_or("--results FILE is required")?;
    let md = a.str_opt("md");
    let meta = a.all("meta");
    let invocation = a.string("invocation", "scripts/bench");
    a.finish()?;
    let text = fs::read_to_string(&results).map_err(|e| format!("{results}: {e}"))?;
    let runs: Vec<Value> = text
        .lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{results}: {e}"))?;

    // case -> server -> runs, cases in order of appearance.
    let mut cases: Vec<String> = Vec::new();
    let mut by: BTreeMap<(String, String), Vec<&Value>> = BTreeMap::new();
    for r in &runs {
        let case = r["case"].as_str().unwrap_or("?").to_string();
        let server = r["server"].as_str().unwrap_or("?").to_string();
        if !cases.contains(&case) {
            cases.push(case.clone());
        }
        by.entry((case, server)).or_default().push(r);
    }
    let empty = Vec::new();
    let mut rows = Vec::new();
    let mut pairs = 0;
    for case in &cases {
        let m = by.get(&(case.clone(), "martd".into())).unwrap_or(&empty);
        let n = by.get(&(case.clone(), "nchan".into())).unwrap_or(&empty);
        pairs = pairs.max(if m.is_empty() || n.is_empty() {
            m.len().max(n.len())
        } else {
            m.len().min(n.len())
        });
        let scenario = match case.split('-').next().unwrap_or(case) {
            "redis" => case.as_str(),
            s => s,
        };
        let metrics: Vec<String> = key_metrics(scenario).iter().map(|m| m.to_string()).collect();
        let med = |runs: &[&Value], k: &str| {
            median(runs.iter().filter_map(|r| r["metrics"][k].as_f64()).collect())
        };
        for k in &metrics {
            let (mv, nv) = (med(m, k), med(n, k));
            let ratio = mv / nv;
            let (t, holds) = match target(case, k) {
                None => (String::new(), String::new()),
                Some(Target::RatioMax(x)) => (format!("ratio ≤ {x}"), yes(ratio <= x)),
                Some(Target::RatioMin(x)) => (format!("ratio ≥ {x}"), yes(ratio >= x)),
                Some(Target::RatioBelow(x)) => (format!("ratio < {x}"), yes(ratio < x)),
                Some(Target::MartdMax(x)) => (format!("martd ≤ {x}"), yes(mv <= x)),
                Some(Target::MartdMin(x)) => (format!("martd ≥ {x}"), yes(mv >= x)),
            };
            rows.push(Row {
                case: case.clone(),
                metric: k.clone(),
                martd: mv,
                nchan: nv,
                target: t,
                holds,
                cross: false,
            });
        }
        let other = |runs: &[&Value]| {
            median(runs.iter().filter_map(|r| r["other_cpu_pct"].as_f64()).collect())
        };
        rows.push(Row {
            case: case.clone(),
            metric: "other_cpu_pct (CPU used by other processes)".into(),
            martd: other(m),
            nchan: other(n),
            target: String::new(),
            holds: String::new(),
            cross: false,
        });
        let errs =
            |runs: &[&Value]| runs.iter().map(|r| r["errors"].as_u64().unwrap_or(1)).sum::<u64>();
        let (me, ne) = (errs(m), errs(n));
        rows.push(Row {
            case: case.clone(),
            metric: "errors (sum over runs)".into(),
            martd: me as f64,
            nchan: ne as f64,
            target: "martd = 0".into(),
            holds: yes(me == 0 && !m.is_empty()),
            cross: false,
        });
    }
    let med_of = |case: &str, server: &str, k: &str| {
        let runs = by.get(&(case.to_string(), server.to_string())).unwrap_or(&empty);
        median(runs.iter().filter_map(|r| r["metrics"][k].as_f64()).collect())
    };
    for &(case, base, k, max) in VERSUS {
        if !(cases.iter().any(|c| c == case) && cases.iter().any(|c| c == base)) {
            continue;
        }
        let mv = med_of(case, "martd", k) / med_of(base, "martd", k);
        let nv = med_of(case, "nchan", k) / med_of(base, "nchan", k);
        rows.push(Row {
            case: format!("{case} ÷ {base}"),
            metric: k.to_string(),
            martd: mv,
            nchan: nv,
            target: max.map(|x| format!("martd ≤ {x}")).unwrap_or_default(),
            holds: max.map(|x| yes(mv <= x)).unwrap_or_default(),
            cross: true,
        });
    }

    let mut table = String::from(
        "| case | metric | martd | nchan | martd/nchan | target | holds |\n|---|---|---:|---:|---:|---|---|\n",
    );
    for r in &rows {
        let count = r.metric.starts_with("errors");
        let ratio = if count || r.cross || r.metric.starts_with("other") {
            String::new()
        } else {
            num(r.martd / r.nchan)
        };
        let val = |v: f64| if count { format!("{v}") } else { num(v) };
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.case,
            r.metric,
            val(r.martd),
            val(r.nchan),
            ratio,
            r.target,
            r.holds
        );
    }
    println!("\nmedians over {pairs} pair(s) of runs (martd and nchan alternately, the order swapped every other pair, fresh nginx each run):\n");
    print!("{table}");
    let disturbed = median(runs.iter().filter_map(|r| r["other_cpu_pct"].as_f64()).collect());
    if disturbed > 10.0 {
        println!(
            "\nwarning: other processes used a median {disturbed:.0}% of the CPU during the runs: \
             wall-clock figures are noisy (server_us_* and memory figures are not)"
        );
    }

    if let Some(md) = md {
        let notes = fs::read_to_string(&md)
            .ok()
            .and_then(|old| old.find("\n## Profile notes").map(|i| old[i + 1..].to_string()))
            .unwrap_or_else(|| {
                "## Profile notes\n\n_(to be filled in: where martd spends its time and memory in these \
                 scenarios — perf profiles of the workers, and what changed because of them.)_\n"
                    .to_string()
            });
        let mut s = String::new();
        s.push_str("# Benchmarks: martd vs nchan\n\n");
        s.push_str(
            "Written by `scripts/bench` from one run (see the README's Benchmarks section); every figure \
             is a median over the runs of that invocation, and every ratio compares martd and nchan measured \
             in the same invocation, on the same nginx binary, with the same worker count. Only the \
             \"Profile notes\" section is kept when the file is rewritten.\n\n",
        );
        s.push_str("## Machine and software\n\n");
        for m in &meta {
            let (k, v) = m.split_once('=').unwrap_or((m, ""));
            let _ = writeln!(s, "- {k}: {v}");
        }
        let _ = writeln!(s, "\n## Commands\n\n    {invocation}\n");
        s.push_str(
            "ran, for each pair and each case, the case against martd and nchan (martd first in odd \
             pairs, nchan first in even pairs; each run starts its own nginx with `worker_processes 2`, `worker_rlimit_nofile 20000`, \
             `worker_connections 20000`, `listen 127.0.0.1:PORT reuseport`, in a fresh temporary \
             prefix):\n\n",
        );
        let mut seen = Vec::new();
        for r in &runs {
            if let Some(c) = r["command"].as_str() {
                if !seen.contains(&c) {
                    seen.push(c);
                    let _ = writeln!(s, "    {c}");
                }
            }
        }
        let _ = writeln!(s, "\n## Results: medians over {pairs} pair(s)\n");
        if disturbed > 10.0 {
            let _ = writeln!(
                s,
                "**This run was disturbed:** other processes used a median {disturbed:.0}% of the \
                 machine's CPU during the runs (`other_cpu_pct`), so the wall-clock figures (rates, \
                 round times, latencies) are noisy and the server-CPU (`server_us_*`) and memory \
                 figures are the ones to trust. Run `scripts/bench` again on a quiet machine.\n"
            );
        }
        s.push_str(&table);
        s.push_str(
            "\nUnits: `_ms` milliseconds, `_us` microseconds, `_b` bytes, `_kb` KiB, `_per_s` per second. \
             fanout: `round_ms` is the time from the first publish of a round to the last listener \
             receiving it; `p50_us`/`p99_us` are publish→receive latencies of every delivery. idle: worker \
             memory (VmRSS summed over the workers) growth per parked listener. big: `rss_round_growth_kb` is \
             the peak worker RSS growth during the rounds over the parked state, and `copies_per_listener` \
             that growth in message sizes per listener (about 1 if every listener had its own copy alive \
             at once). latency: \
             listener connection on one worker, publisher connection on the other. fanout-multi, \
             idle-multi: every listener waits on 10 channels in one request (martd: a `martd_listen \
             json` location; nchan: `nchan_channel_id` split at commas), `hot` and 9 of a pool of \
             1,000 that each hold one message; the rounds publish to `hot`. idle-sse, idle-ws, \
             fanout-sse, fanout-ws, latency-stream: the same with streams that stay open (EventSource \
             or WebSocket on `/subs`: martd `martd_listen eventsource websocket stream`, nchan \
             `nchan_subscriber eventsource websocket`) instead of long-polls. redis-latency, \
             redis-publish, redis-fanout: two nginx nodes, A and B (2 workers each), sharing \
             channels through one redis-server (martd: `martd_redis_url`; nchan: an upstream with \
             `nchan_redis_server` and `nchan_redis_pass` in the publisher and subscriber \
             locations), every publish on node A: redis-latency's listener waits on node B, \
             redis-publish has no listeners (`server_us_per_pub` is both nodes' workers, \
             `redis_us_per_pub` redis-server's CPU), redis-fanout's listeners are half on each \
             node (`round_b_ms`: the round on node B alone). redis-publish-tls (martd only): \
             redis-publish with redis-server serving TLS only (a certificate from a throw-away \
             CA) and martd connecting with `rediss://` and `martd_redis_trusted_certificate`. \
             A row `A ÷ B` is the \
             ratio of case A's median to case B's, each server against itself in this invocation.\n",
        );
        s.push_str("\n## Every run\n\n| case | server | errors | elapsed s | other_cpu_pct | metrics |\n|---|---|---:|---:|---:|---|\n");
        for r in &runs {
            let metrics = r["metrics"]
                .as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| format!("{k}={}", num(v.as_f64().unwrap_or(f64::NAN))))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
                .join(" ");
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                r["case"].as_str().unwrap_or("?"),
                r["server"].as_str().unwrap_or("?"),
                r["errors"],
                r["elapsed_s"],
                r["other_cpu_pct"],
                metrics
            );
        }
        let mut samples = String::new();
        for r in &runs {
            if let Some(v) = r["error_samples"].as_array() {
                for e in v.iter().filter_map(|e| e.as_str()).take(3) {
                    let _ = writeln!(
                        samples,
                        "- {} / {}: {}",
                        r["case"].as_str().unwrap_or("?"),
                        r["server"].as_str().unwrap_or("?"),
                        e.replace('|', "/")
                    );
                }
            }
        }
        if !samples.is_empty() {
            s.push_str("\nErrors seen (first few per run):\n\n");
            s.push_str(&samples);
        }
        s.push('\n');
        s.push_str(&notes);
        fs::write(&md, s).map_err(|e| format!("{md}: {e}"))?;
        eprintln!("martd-bench report: wrote {md}");
    }
    Ok(0)
}

fn yes(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}
