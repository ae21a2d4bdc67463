//! HTTP/1.1 client connections (hyper), spread over 127.0.N.x source addresses.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper::header::{HeaderValue, ACCEPT, HOST, IF_MODIFIED_SINCE, IF_NONE_MATCH};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};

pub type Body = Full<Bytes>;
pub type Sender = SendRequest<Body>;
pub type Conn = Connection<TokioIo<TcpStream>, Body>;

/// Source addresses 127.0.NET.2 ..= 127.0.NET.251, used round-robin, so that no single source
/// address runs out of ephemeral ports.
pub struct Sources {
    net: u8,
    next: AtomicUsize,
}

impl Sources {
    pub const fn new(net: u8) -> Sources {
        Sources { net, next: AtomicUsize::new(0) }
    }

    pub fn next(&self) -> Ipv4Addr {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % 250;
        Ipv4Addr::new(127, 0, self.net, 2 + i as u8)
    }
}

pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// A TCP connection from `src` (any port) to `dst`, with TCP_NODELAY, and its hyper handshake.
pub async fn connect(dst: SocketAddr, src: Ipv4Addr) -> Result<(Sender, Conn), String> {
    let stream = tcp_connect(dst, src).await?;
    http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("handshake: {e}"))
}

/// A TCP connection from `src` (any port) to `dst`, with TCP_NODELAY (WebSocket subscribers).
pub async fn tcp_connect(dst: SocketAddr, src: Ipv4Addr) -> Result<TcpStream, String> {
    assert!(dst.ip().is_loopback() && src.is_loopback(), "loopback only");
    let sock = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    // Pick the source port at connect() time (per destination), not at bind().
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on a socket we own, with a valid int option value.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    sock.bind(SocketAddr::new(src.into(), 0)).map_err(|e| format!("bind {src}: {e}"))?;
    let stream = tokio::time::timeout(Duration::from_secs(10), sock.connect(dst))
        .await
        .map_err(|_| format!("connect {dst} from {src}: timeout"))?
        .map_err(|e| format!("connect {dst} from {src}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    Ok(stream)
}

/// A connection whose driver runs in its own task (publishers, control requests).
pub async fn connect_spawned(dst: SocketAddr, src: Ipv4Addr) -> Result<Sender, String> {
    let (s, c) = connect(dst, src).await?;
    tokio::spawn(async move {
        let _ = c.await;
    });
    Ok(s)
}

pub struct Resp {
    pub status: u16,
    pub etag: Option<HeaderValue>,
    pub last_modified: Option<HeaderValue>,
    pub worker: Option<String>,
    pub body: Bytes,
}

fn host() -> HeaderValue {
    HeaderValue::from_static("127.0.0.1")
}

pub fn get(path: &str) -> Request<Body> {
    Request::builder()
        .method(Method::GET)
        .uri(path)
        .header(HOST, host())
        .body(Full::new(Bytes::new()))
        .expect("request")
}

/// A long-poll request carrying the ids of the last message received.
pub fn listen(path: &str, etag: Option<&HeaderValue>, lm: Option<&HeaderValue>) -> Request<Body> {
    let mut r = get(path);
    if let Some(e) = etag {
        r.headers_mut().insert(IF_NONE_MATCH, e.clone());
    }
    if let Some(l) = lm {
        r.headers_mut().insert(IF_MODIFIED_SINCE, l.clone());
    }
    r
}

pub fn post(path: &str, body: Bytes) -> Request<Body> {
    Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(HOST, host())
        .header("content-type", "application/octet-stream")
        .body(Full::new(body))
        .expect("request")
}

pub async fn send(s: &mut Sender, req: Request<Body>) -> Result<Resp, String> {
    s.ready().await.map_err(|e| format!("connection: {e}"))?;
    let resp = s.send_request(req).await.map_err(|e| format!("request: {e}"))?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
    let h = &parts.headers;
    Ok(Resp {
        status: parts.status.as_u16(),
        etag: h.get("etag").cloned(),
        last_modified: h.get("last-modified").cloned(),
        worker: h.get("x-worker").and_then(|v| v.to_str().ok()).map(str::to_string),
        body,
    })
}

/// Waiting listeners of a channel according to the server (martd: `listeners`, nchan:
/// `subscribers` in the JSON channel info); 0 when the channel does not exist.
pub async fn listener_count(s: &mut Sender, channel: &str) -> Result<u64, String> {
    let mut req = get(&format!("/pub?channel={channel}"));
    req.headers_mut().insert(ACCEPT, HeaderValue::from_static("application/json"));
    let r = send(s, req).await?;
    match r.status {
        404 => Ok(0),
        200 => {
            let v: serde_json::Value = serde_json::from_slice(&r.body)
                .map_err(|e| format!("channel info {:?}: {e}", String::from_utf8_lossy(&r.body)))?;
            v.get("listeners")
                .or_else(|| v.get("subscribers"))
                .and_then(|n| n.as_u64())
                .ok_or_else(|| format!("no listener count in {v}"))
        }
        st => Err(format!("channel info: status {st}")),
    }
}

/// Message bodies: `<send µs since epoch, 16 digits>:<sequence, 8 digits>:` padded with `x`.
pub fn message(size: usize, seq: u64) -> (u64, Bytes) {
    let ts = now_us();
    let mut b = format!("{ts:016}:{seq:08}:").into_bytes();
    b.resize(size.max(b.len()), b'x');
    (ts, Bytes::from(b))
}

/// (send µs, sequence) of a message body.
pub fn parse_message(b: &[u8]) -> Option<(u64, u64)> {
    if b.len() < 26 || b[16] != b':' || b[25] != b':' {
        return None;
    }
    let ts = std::str::from_utf8(&b[..16]).ok()?.parse().ok()?;
    let seq = std::str::from_utf8(&b[17..25]).ok()?.parse().ok()?;
    Some((ts, seq))
}

#[cfg(test)]
mod tests {
    #[test]
    fn message_round_trip() {
        let (ts, b) = super::message(64, 42);
        assert_eq!(b.len(), 64);
        assert_eq!(super::parse_message(&b), Some((ts, 42)));
        assert_eq!(super::message(10, 1).1.len(), 26);
        assert_eq!(super::parse_message(b"junk"), None);
    }
}
