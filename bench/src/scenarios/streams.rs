//! Streaming subscribers (`--transport eventsource|websocket`): idle-sse, idle-ws, fanout-sse,
//! fanout-ws, latency-stream.
//!
//! A subscriber opens one stream on `/subs?channel=NAME` (martd: `martd_listen eventsource
//! websocket stream`; nchan: `nchan_subscriber eventsource websocket`) and keeps it open for the
//! whole run: EventSource as `GET` with `Accept: text/event-stream` over a hyper connection (the
//! events parsed by a minimal line reader: `data:` lines make the body, other fields and comments
//! are skipped), WebSocket through tokio-tungstenite (text or binary frames are the bodies; pings
//! are answered by the library). Every body must be the next message of the rounds, in order;
//! anything else (a message lost, repeated, out of order, or after the last round) fails the
//! subscriber and counts as an error.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, CONTENT_TYPE};
use serde_json::json;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::clients::*;
use super::{Outcome, CONNECT_CONCURRENCY};
use crate::http::{self, now_us, Conn, Sender, Sources};
use crate::server::Server;

/// How a streaming subscriber talks to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Transport {
    EventSource,
    WebSocket,
}

impl Transport {
    pub(super) fn parse(s: &str) -> Result<Transport, String> {
        match s {
            "eventsource" => Ok(Transport::EventSource),
            "websocket" => Ok(Transport::WebSocket),
            _ => Err(format!("--transport: {s:?} is neither eventsource nor websocket")),
        }
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Transport::EventSource => "eventsource",
            Transport::WebSocket => "websocket",
        }
    }
}

/// An EventSource response being read.
struct Sse {
    body: Incoming,
    /// The connection's driver, when this subscriber runs it itself (`None`: spawned).
    conn: Option<Pin<Box<Conn>>>,
    /// Kept so that the connection is never seen as unused.
    _sender: Sender,
    /// Bytes of the stream not parsed yet (at most one incomplete line).
    buf: BytesMut,
    /// The `data:` lines of the event being read, joined by `\n`.
    data: Vec<u8>,
    has_data: bool,
}

impl Sse {
    /// Sends `GET path` with `Accept: text/event-stream` and waits for the response head, which
    /// must be `200 text/event-stream`.
    async fn open(
        mut s: Sender,
        mut conn: Option<Pin<Box<Conn>>>,
        path: &str,
    ) -> Result<Sse, String> {
        let mut req = http::get(path);
        req.headers_mut().insert(ACCEPT, HeaderValue::from_static("text/event-stream"));
        let resp = {
            let head = async {
                s.ready().await.map_err(|e| format!("connection: {e}"))?;
                s.send_request(req).await.map_err(|e| format!("request: {e}"))
            };
            match conn.as_mut() {
                Some(c) => tokio::select! {
                    biased;
                    r = head => r,
                    r = c.as_mut() => Err(format!("connection closed by the server ({r:?})")),
                },
                None => head.await,
            }
        }?;
        let ctype = resp.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        if resp.status() != 200 || !ctype.starts_with("text/event-stream") {
            return Err(format!("EventSource: status {}, content type {ctype:?}", resp.status()));
        }
        Ok(Sse {
            body: resp.into_body(),
            conn,
            _sender: s,
            buf: BytesMut::new(),
            data: Vec::new(),
            has_data: false,
        })
    }

    async fn next(&mut self) -> Result<Bytes, String> {
        loop {
            if let Some(ev) = parse_events(&mut self.buf, &mut self.data, &mut self.has_data) {
                return Ok(ev);
            }
            let frame = match self.conn.as_mut() {
                Some(c) => tokio::select! {
                    biased;
                    f = self.body.frame() => f,
                    r = c.as_mut() => {
                        return Err(format!("connection closed by the server ({r:?})"))
                    }
                },
                None => self.body.frame().await,
            };
            match frame {
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        self.buf.extend_from_slice(&d);
                    }
                }
                Some(Err(e)) => return Err(format!("EventSource body: {e}")),
                None => return Err("EventSource stream ended".into()),
            }
        }
    }
}

/// The data of the next complete event in `buf`, if there is one (`data` and `has_data`: the
/// event being read, kept between calls).
fn parse_events(buf: &mut BytesMut, data: &mut Vec<u8>, has_data: &mut bool) -> Option<Bytes> {
    while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
        let line = buf.split_to(nl + 1);
        let line = &line[..nl];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            if *has_data {
                *has_data = false;
                return Some(Bytes::from(std::mem::take(data)));
            }
            continue;
        }
        // Fields other than `data` (id, event, retry) and comments (`:`) are skipped.
        let value = match line.strip_prefix(b"data") {
            Some([]) => &[][..],
            Some([b':', v @ ..]) => v.strip_prefix(b" ").unwrap_or(v),
            _ => continue,
        };
        if *has_data {
            data.push(b'\n');
        }
        data.extend_from_slice(value);
        *has_data = true;
    }
    None
}

/// One open stream.
enum Sub {
    Sse(Box<Sse>),
    Ws(Box<WebSocketStream<TcpStream>>),
}

impl Sub {
    /// The body of the next message.
    async fn next(&mut self) -> Result<Bytes, String> {
        match self {
            Sub::Sse(s) => s.next().await,
            Sub::Ws(ws) => loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => return Ok(t.into()),
                    Some(Ok(Message::Binary(b))) => return Ok(b),
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                    Some(Ok(Message::Close(c))) => {
                        return Err(format!("WebSocket closed by the server: {c:?}"))
                    }
                    Some(Err(e)) => return Err(format!("WebSocket: {e}")),
                    None => return Err("WebSocket ended".into()),
                }
            },
        }
    }
}

/// Opens a WebSocket on `stream` (`101` expected; tungstenite checks the handshake).
async fn open_ws(
    stream: TcpStream,
    dst: SocketAddr,
    path: &str,
) -> Result<WebSocketStream<TcpStream>, String> {
    // Small buffers: 15k clients in one process (the default read buffer is 128 KiB each).
    let cfg = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let url = format!("ws://{dst}{path}");
    let (ws, resp) = tokio_tungstenite::client_async_with_config(url, stream, Some(cfg))
        .await
        .map_err(|e| format!("WebSocket handshake: {e}"))?;
    if resp.status() != 101 {
        return Err(format!("WebSocket: status {}", resp.status()));
    }
    Ok(ws)
}

/// Reads messages until something is wrong: each must be the next of the rounds, in order
/// (one after the last round is an error too).
async fn receive(fan: &Fan, sub: &mut Sub) -> Result<(), String> {
    let mut expect = 0;
    loop {
        let body = sub.next().await?;
        fan.deliver(&body, expect)?;
        expect += 1;
    }
}

/// One subscriber on its own connection (at most `gate` connecting at once): counted in
/// `fan.connected` once its response head arrived, then reads until the run ends.
async fn subscriber(
    fan: Arc<Fan>,
    t: Transport,
    dst: SocketAddr,
    srcs: Arc<Sources>,
    path: String,
    gate: Arc<Semaphore>,
) {
    let res = async {
        let permit = gate.acquire_owned().await;
        let mut sub = match t {
            Transport::EventSource => {
                let (s, conn) = http::connect(dst, srcs.next()).await?;
                drop(permit);
                Sub::Sse(Box::new(Sse::open(s, Some(Box::pin(conn)), &path).await?))
            }
            Transport::WebSocket => {
                let tcp = http::tcp_connect(dst, srcs.next()).await?;
                drop(permit);
                Sub::Ws(Box::new(open_ws(tcp, dst, &path).await?))
            }
        };
        fan.connected.fetch_add(1, Relaxed);
        receive(&fan, &mut sub).await
    }
    .await;
    if let Err(e) = res {
        fan.failed.fetch_add(1, Relaxed);
        fan.errs.add(e);
    }
    fan.done.fetch_add(1, Relaxed);
}

fn spawn_subscribers(
    set: &mut JoinSet<()>,
    fan: &Arc<Fan>,
    t: Transport,
    dst: SocketAddr,
    srcs: &Arc<Sources>,
    n: u64,
    channels: &[String],
) {
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    for i in 0..n {
        let path = format!("/subs?channel={}", channels[(i % channels.len() as u64) as usize]);
        set.spawn(subscriber(fan.clone(), t, dst, srcs.clone(), path, gate.clone()));
    }
}

/// Waits until every subscriber has its response head and the server counts all of them.
async fn wait_open(
    fan: &Fan,
    ctl: &mut [Sender],
    channels: &[String],
    n: u64,
    timeout: Duration,
) -> Result<(), String> {
    let t0 = Instant::now();
    let open =
        wait_until(timeout, || fan.connected.load(Relaxed) + fan.failed.load(Relaxed) >= n).await;
    if !open {
        return Err(format!(
            "{} of {n} streams open after {} s",
            fan.connected.load(Relaxed),
            timeout.as_secs()
        ));
    }
    let want = || n - fan.failed.load(Relaxed);
    wait_parked(ctl, channels, want, timeout.saturating_sub(t0.elapsed())).await
}

/// idle-sse, idle-ws: `n` open streams parked on a fresh server; worker memory growth per
/// stream, as `idle` measures it.
pub(super) async fn idle_streams(
    srv: &Server,
    out: &mut Outcome,
    n: u64,
    nch: u64,
    t: Transport,
) -> Result<(), String> {
    out.params.insert("listeners".into(), json!(n));
    out.params.insert("channels".into(), json!(nch));
    out.params.insert("transport".into(), json!(t.name()));
    let nch = nch.max(1);
    let channels: Vec<String> = (0..nch).map(|i| format!("idle{i}")).collect();
    let srcs = Arc::new(Sources::new(0));
    let fan = Fan::new(1, 64, out.errs.clone());
    let mut ctl = control(srv, &srcs).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mem0 = srv.mem();
    let mut set = JoinSet::new();
    let t0 = Instant::now();
    spawn_subscribers(&mut set, &fan, t, srv.addr, &srcs, n, &channels);
    wait_open(&fan, &mut ctl, &channels, n, Duration::from_secs(120)).await?;
    out.metric("setup_s", t0.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mem1 = srv.mem();
    idle_metrics(out, n - fan.failed.load(Relaxed), mem0, mem1);
    Ok(())
}

/// fanout-sse, fanout-ws: `n` streams opened once, then `rounds` rounds of one message per
/// channel; a round ends when every stream has its message, and the next one starts 20 ms
/// later (as in `fanout`, without the re-requests to wait for).
pub(super) async fn fanout_streams(
    srv: &Server,
    out: &mut Outcome,
    n: u64,
    nch: u64,
    rounds: u64,
    size: usize,
    t: Transport,
) -> Result<(), String> {
    out.params.insert("listeners".into(), json!(n));
    out.params.insert("channels".into(), json!(nch));
    out.params.insert("rounds".into(), json!(rounds));
    out.params.insert("size".into(), json!(size));
    out.params.insert("transport".into(), json!(t.name()));
    let nch = nch.max(1);
    let channels: Arc<Vec<String>> = Arc::new((0..nch).map(|i| format!("fan{i}")).collect());
    let srcs = Arc::new(Sources::new(0));
    let errs = out.errs.clone();
    let fan = Fan::new(rounds, size, errs.clone());
    let mut ctl = control(srv, &srcs).await?;
    let mut pubs = Vec::new();
    for _ in 0..nch.min(8) {
        pubs.push(http::connect_spawned(srv.addr, srcs.next()).await?);
    }
    let mut set = JoinSet::new();
    let t_setup = Instant::now();
    spawn_subscribers(&mut set, &fan, t, srv.addr, &srcs, n, &channels);
    wait_open(&fan, &mut ctl, &channels, n, Duration::from_secs(120)).await?;
    out.metric("setup_s", t_setup.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cpu0 = srv.cpu_us();

    let mut round_ms = Vec::new();
    let mut busy_us = 0u64;
    for r in 0..rounds {
        if r > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let t0 = now_us();
        publish_round(&mut pubs, &channels, size, r, &errs).await;
        let i = r as usize;
        let all = wait_until(Duration::from_secs(30), || {
            fan.got[i].load(Relaxed) >= n - fan.failed.load(Relaxed)
        })
        .await;
        if !all {
            let missing = n - fan.failed.load(Relaxed) - fan.got[i].load(Relaxed);
            return Err(format!(
                "round {r}: {missing} subscribers did not get the message within 30 s"
            ));
        }
        let took = fan.last_us[i].load(Relaxed).saturating_sub(t0);
        busy_us += took;
        round_ms.push(took as f64 / 1000.0);
    }
    let cpu1 = srv.cpu_us();
    // A message repeated after the last round fails its subscriber (an error) if it comes now.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let expected = n * rounds;
    let got = fan.deliveries();
    if got < expected {
        errs.add_n(expected - got, format!("{} of {expected} deliveries missing", expected - got));
    }
    round_metrics(out, &fan, &round_ms, cpu0, cpu1);
    out.metric("deliveries_per_s", got as f64 / (busy_us.max(1) as f64 / 1e6));
    Ok(())
}

/// latency-stream's subscriber: an EventSource stream on the connection `s` (already on the
/// worker the caller chose), read until the run ends.
pub(super) async fn listen_stream(fan: &Fan, s: Sender, path: &str) -> Result<(), String> {
    let mut sub = Sub::Sse(Box::new(Sse::open(s, None, path).await?));
    fan.connected.fetch_add(1, Relaxed);
    receive(fan, &mut sub).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(chunks: &[&[u8]]) -> Vec<Bytes> {
        let (mut buf, mut data, mut has_data) = (BytesMut::new(), Vec::new(), false);
        let mut out = Vec::new();
        for c in chunks {
            buf.extend_from_slice(c);
            while let Some(b) = parse_events(&mut buf, &mut data, &mut has_data) {
                out.push(b);
            }
        }
        out
    }

    #[test]
    fn sse_events() {
        let got =
            events(&[b": hi\n\nid: 1\nda", b"ta: abc\n\n", b"data:x\r\ndata\ndata: y\n", b"\n"]);
        assert_eq!(got, vec![Bytes::from("abc"), Bytes::from("x\n\ny")]);
        assert!(events(&[b"id: 2\n\n: ping\n\nevent: e\n\n"]).is_empty());
        assert_eq!(events(&[b"dataX: no\ndata: yes\n\n"]), vec![Bytes::from("yes")]);
    }
}
