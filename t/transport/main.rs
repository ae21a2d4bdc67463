//! martd's transports (issue 10): EventSource, chunked streams, interval-poll, and how a
//! location picks one per request. Real nginx with 2 workers, real sockets; every wait is
//! bounded, and the harness fails a test whose error log has alerts or crashes.

#[allow(unused_imports)]
#[path = "../harness/mod.rs"]
mod harness;

mod detach;
mod eventsource;
mod interval;
mod json;
mod multi;
mod multi_poll;
mod resume;
mod stream;
mod websocket;

use std::time::Duration;

use harness::*;

/// How soon a published message must reach a streaming subscriber.
const PROMPT: Duration = Duration::from_secs(3);

/// A publisher (`/pub`, keeping 1000 messages per channel: the tests publish in bursts), a
/// long-poll listener (`/sub`), then `extra` locations.
fn conf(extra: &str) -> Conf {
    Conf::new(&format!(
        "        martd_message_buffer_length 1000;
        location = /pub {{ martd_push; }}
        location = /sub {{ martd_listen; }}
{extra}"
    ))
}

/// Publishes `body` on `ch`; its message id.
async fn publish(c: &mut Conn, ch: &str, body: impl Into<bytes::Bytes>) -> u64 {
    c.publish_id(&format!("/pub?channel={ch}"), body).await
}

/// Opens `path` as a stream on a new connection served by worker `pid`.
async fn open_on(port: u16, pid: u32, path: &str, headers: &[(&str, &str)]) -> Streaming {
    Streaming::open(Conn::open_on(port, pid).await, path, headers, QUICK).await
}

const SSE: (&str, &str) = ("Accept", "text/event-stream");

/// Waits (up to 10 s) until the error log has a line containing `fragment`.
async fn wait_for_log(ng: &Nginx, fragment: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !ng.log().contains(fragment) {
        assert!(
            std::time::Instant::now() < deadline,
            "{fragment:?} not logged: {}",
            ng.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
