//! martd-bench: martd vs nchan, side by side, on the same nginx binary.
//!
//! Every scenario subcommand starts its own fresh nginx (Debian's `/usr/sbin/nginx` by default)
//! with either martd or nchan loaded, 2 workers, on a free 127.0.0.1 port, runs long-poll,
//! EventSource (HTTP/1.1, hyper) or WebSocket (tokio-tungstenite) clients against it
//! (connections spread over 127.0.N.x source addresses),
//! stops it, prints a human table and ends with one JSON line. `report` turns the JSON lines of
//! many runs into medians, martd/nchan ratios and BENCHMARKS.md. Only loopback addresses are
//! ever used, and every run is bounded in time.

mod alloc;
mod args;
mod http;
mod legacy;
mod lockhold;
mod redis_server;
mod report;
mod scenarios;
mod server;
mod zonesize;

use std::process::ExitCode;

const USAGE: &str = "\
usage: martd-bench <scenario> --server martd|nchan [options]
       martd-bench lockhold|zonesize [options]
       martd-bench report --results FILE [--md FILE] [--meta KEY=VALUE ...]

scenarios (each starts a fresh nginx, prints a table and a final JSON line):
  fanout    --listeners 10000 --channels 1 --rounds 10 [--size 64] [--floor: each
            connection asks GET /ret64 (return 200, 64 bytes) when a round starts instead
            of long-polling: nginx's own floor for a round] [--multi 10 --pool 1000: each
            listener waits on `hot` and 9 channels of a pool of 1000 (one message each) in one
            request (martd: martd_listen json; nchan: nchan_channel_id split at commas); the
            rounds publish to `hot`] [--transport eventsource|websocket: each listener
            opens one stream on /subs?channel=.. (martd: martd_listen eventsource websocket
            stream; nchan: nchan_subscriber eventsource websocket) and keeps it for every round]
  publish   --publishers 16 --channels 100 --seconds 5 [--warmup 1] [--size 64]
  idle      --listeners 15000 [--channels 100] [--keepalive: idle keep-alive
            connections after one GET /ret instead of long-polls: nginx's own floor]
            [--multi 10 --pool 1000: multi-channel listeners, as for fanout]
            [--transport eventsource|websocket: open streams, as for fanout]
  capacity  --listeners 30000 --procs 2 [--channels 1]
  latency   --rate 1000 --seconds 10 [--transport eventsource: the listener is one
            EventSource stream]
  big       --listeners 1000 --size 65536 --rounds 10

two nodes sharing channels through Redis (each starts one redis-server on a free 127.0.0.1 port,
no persistence, and two nginx nodes A and B, 2 workers each, that use it: martd with
martd_redis_url, nchan with nchan_redis_pass; every publish goes to node A):
  redis-latency  --rate 1000 --seconds 10: latency with the listener on node B (4 publisher
                 connections on one worker of node A take turns, so that the rate holds)
  redis-publish  --publishers 16 --channels 100 --seconds 5 [--warmup 1] [--size 64]: the
                 publishers on node A, no listeners; then node B must show every channel's last
                 message
  redis-fanout   --listeners 10000 --rounds 10 [--size 64]: listeners of one channel, half on
                 each node, every round published on node A
  [--redis-server PATH]  (default /usr/bin/redis-server); each case first waits until every
                 worker of both nodes publishes through Redis (nchan answers 503 until then)
  [--tls]        martd only (case redis-publish-tls: redis-publish --tls): redis-server
                 serves TLS only (a certificate for localhost from a throw-away CA, made with
                 openssl) and martd connects with rediss://localhost:PORT and
                 martd_redis_trusted_certificate

in-process on martd-core (no nginx; no --server):
  lockhold  [--channels 1000000] [--seconds 30] [--publish-rate 50000] [--listen-rate 10000]
            [--fresh-pct 30] [--ttl-ms 2000] [--channel-timeout-ms 60000] [--budget 32]
            [--gc-interval-ms 1000] [--size 64] [--legacy-walks 3] [--seed 1] [--replays 3]
            [--alloc slab|global: the store's allocator, one that works like nginx's slab pool
            or the process's malloc] [--prefault-mb 256+2/1000 channels: memory touched
            before the run]: the longest single store call (one zone lock hold) under a steady
            load of publishes, listens, wake-ups and bounded garbage-collection steps over
            --channels channels, next to the full walk one garbage-collection tick was before
  zonesize  [--channels 100000] [--size 64]: zone bytes per channel and per message, with
            nginx's slab rounding

common options:
  --server martd|nchan     which module to load (required)
  --nginx PATH             nginx binary (default /usr/sbin/nginx)
  --martd-module PATH      martd .so (default target/debian-nginx/ngx_http_martd_module.so)
  --nchan-module PATH      nchan .so (default /usr/lib/nginx/modules/ngx_nchan_module.so)
  --workers N              worker_processes (default 2)
  --deadline SECS          hard bound for the whole run (default 300)
  --case NAME              label in the JSON line (default: the scenario name)
  --strict                 exit 1 unless the run had zero errors (smoke mode)
  --keep                   keep the nginx prefix directory
";

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = argv.first().cloned() else {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    };
    let args = match args::Args::parse(&argv[1..]) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("martd-bench: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let res = match cmd.as_str() {
        "report" => report::run(&args),
        "capacity-child" => scenarios::capacity_child(&args),
        "lockhold" => lockhold::run(&args),
        "zonesize" => zonesize::run(&args),
        "fanout" | "publish" | "idle" | "capacity" | "latency" | "big" | "redis-latency"
        | "redis-publish" | "redis-fanout" => scenarios::run(&cmd, &args),
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => Err(format!("unknown subcommand {cmd:?}")),
    };
    match res {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("martd-bench {cmd}: error: {e}");
            ExitCode::from(1)
        }
    }
}
