//! HTTP/1.1 client over hyper connections: one `Conn` is one TCP connection, so a test knows
//! which nginx worker serves each request.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame};
use hyper::client::conn::http1::SendRequest;
use hyper::{HeaderMap, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;

use super::proto::{parse_info_json, parse_info_text, Info};

pub type ReqBody = BoxBody<Bytes, Infallible>;

/// Default bound on a request that should be answered at once.
pub const QUICK: Duration = Duration::from_secs(10);
/// Default bound on a long-poll.
pub const LONG: Duration = Duration::from_secs(30);

/// Bounded await.
pub async fn within<F: Future>(d: Duration, what: &str, f: F) -> F::Output {
    match timeout(d, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {d:?}: {what}"),
    }
}

#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().expect("non-ASCII header"))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Pid of the worker that answered (`X-Worker`).
    pub fn worker(&self) -> u32 {
        self.header("x-worker")
            .unwrap_or_else(|| panic!("no X-Worker header in {self:?}"))
            .parse()
            .expect("X-Worker not a pid")
    }
}

/// A request body sent in several chunks with no length known up front (chunked encoding).
pub struct Chunked(pub std::collections::VecDeque<Bytes>);

impl Body for Chunked {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }
}

pub struct Conn {
    sender: SendRequest<ReqBody>,
    task: JoinHandle<()>,
    pub port: u16,
    /// Worker that served the probe request, if probed.
    pub worker: Option<u32>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn request(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: ReqBody,
) -> Request<ReqBody> {
    let mut b = Request::builder().method(method).uri(path).header("host", "127.0.0.1");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(body).expect("bad request")
}

/// A body sent with chunked transfer encoding, one chunk per element.
pub fn chunked(chunks: Vec<Bytes>) -> ReqBody {
    Chunked(chunks.into()).boxed()
}

pub fn full(body: impl Into<Bytes>) -> ReqBody {
    Full::new(body.into()).boxed()
}

impl Conn {
    pub async fn try_open(port: u16) -> Result<Conn, String> {
        let stream = timeout(QUICK, TcpStream::connect(("127.0.0.1", port)))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| format!("connect: {e}"))?;
        stream.set_nodelay(true).ok();
        Conn::from_io(TokioIo::new(stream), port).await
    }

    /// An HTTP/1.1 client connection over any byte stream (plain TCP, TLS).
    pub async fn from_io<T>(io: T, port: u16) -> Result<Conn, String>
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (sender, conn) = timeout(QUICK, hyper::client::conn::http1::handshake(io))
            .await
            .map_err(|_| "handshake timed out".to_string())?
            .map_err(|e| format!("handshake: {e}"))?;
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn { sender, task, port, worker: None })
    }

    pub async fn open(port: u16) -> Conn {
        Conn::try_open(port).await.expect("open connection")
    }

    /// Open a connection and learn which worker serves it.
    pub async fn try_open_probed(port: u16) -> Result<Conn, String> {
        let mut c = Conn::try_open(port).await?;
        let r = c.try_request(request("GET", "/__worker", &[], full("")), QUICK).await?;
        c.worker = Some(r.worker());
        Ok(c)
    }

    pub async fn open_probed(port: u16) -> Conn {
        Conn::try_open_probed(port).await.expect("open probed connection")
    }

    /// A connection served by worker `pid`.
    pub async fn open_on(port: u16, pid: u32) -> Conn {
        for _ in 0..400 {
            let c = Conn::open_probed(port).await;
            if c.worker == Some(pid) {
                return c;
            }
        }
        panic!("no connection landed on worker {pid} in 400 attempts");
    }

    /// A connection served by any worker but `pid`.
    pub async fn open_not_on(port: u16, pid: u32) -> Conn {
        for _ in 0..400 {
            let c = Conn::open_probed(port).await;
            if c.worker != Some(pid) {
                return c;
            }
        }
        panic!("no connection landed on a worker other than {pid} in 400 attempts");
    }

    /// Two connections served by two different workers.
    pub async fn pair(port: u16) -> (Conn, Conn) {
        let a = Conn::open_probed(port).await;
        let b = Conn::open_not_on(port, a.worker()).await;
        (a, b)
    }

    /// `n` probed connections opened concurrently in batches.
    pub async fn open_many(port: u16, n: usize) -> Vec<Conn> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let batch = (n - out.len()).min(50);
            let mut set = JoinSet::new();
            for _ in 0..batch {
                set.spawn(Conn::try_open_probed(port));
            }
            while let Some(r) = within(QUICK * 3, "open_many batch", set.join_next()).await {
                out.push(r.expect("join").expect("open probed connection"));
            }
        }
        out
    }

    pub fn worker(&self) -> u32 {
        self.worker.expect("connection was not probed")
    }

    /// Sends `req` and returns the response with its body unread (streaming responses).
    pub async fn send_streaming(
        &mut self,
        req: Request<ReqBody>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, String> {
        self.sender.ready().await.map_err(|e| format!("connection not ready: {e}"))?;
        self.sender.send_request(req).await.map_err(|e| format!("request failed: {e}"))
    }

    pub async fn try_request(
        &mut self,
        req: Request<ReqBody>,
        t: Duration,
    ) -> Result<Resp, String> {
        let fut = async {
            self.sender.ready().await.map_err(|e| format!("connection not ready: {e}"))?;
            let resp =
                self.sender.send_request(req).await.map_err(|e| format!("request failed: {e}"))?;
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.map_err(|e| format!("reading body: {e}"))?.to_bytes();
            Ok(Resp { status: parts.status.as_u16(), headers: parts.headers, body })
        };
        match timeout(t, fut).await {
            Ok(r) => r,
            Err(_) => Err(format!("no response within {t:?}")),
        }
    }

    pub async fn try_send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<Resp, String> {
        self.try_request(request(method, path, headers, full(body)), QUICK).await
    }

    /// A request answered at once (bounded by [`QUICK`]).
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Resp {
        match self.try_send(method, path, headers, body).await {
            Ok(r) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        }
    }

    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Resp {
        self.send("GET", path, headers, Bytes::new()).await
    }

    /// Long-poll GET on this connection, bounded by `t`.
    pub async fn get_long(&mut self, path: &str, headers: &[(&str, &str)], t: Duration) -> Resp {
        match self.try_request(request("GET", path, headers, full("")), t).await {
            Ok(r) => r,
            Err(e) => panic!("GET {path}: {e}"),
        }
    }

    /// POST `body` as text/plain to `/pub?channel=ch`.
    pub async fn publish(&mut self, ch: &str, body: impl Into<Bytes>) -> Resp {
        self.send("POST", &format!("/pub?channel={ch}"), &[("content-type", "text/plain")], body)
            .await
    }

    /// Publish and expect 201/202; returns the new message id (from the JSON channel info).
    pub async fn publish_id(&mut self, path: &str, body: impl Into<Bytes>) -> u64 {
        let r = self.send("POST", path, &[("accept", "application/json")], body).await;
        assert!(r.status == 201 || r.status == 202, "publish to {path}: {} {}", r.status, r.text());
        parse_info_json(&r.text()).last_id.expect("no last_message_id after a publish")
    }

    /// Plain-text channel info from `/pub?channel=ch`; None on 404.
    pub async fn info(&mut self, ch: &str) -> Option<Info> {
        let r = self.get(&format!("/pub?channel={ch}"), &[]).await;
        match r.status {
            404 => None,
            200 => Some(parse_info_text(&r.text())),
            s => panic!("channel info {ch}: unexpected {s} {}", r.text()),
        }
    }

    /// Polls the channel info until `pred` holds (bounded).
    pub async fn wait_info(
        &mut self,
        ch: &str,
        what: &str,
        pred: impl Fn(Option<&Info>) -> bool,
    ) -> Option<Info> {
        let deadline = tokio::time::Instant::now() + QUICK;
        loop {
            let i = self.info(ch).await;
            if pred(i.as_ref()) {
                return i;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("channel {ch}: {what} not reached within {QUICK:?}; last info {i:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the channel has exactly `n` waiting listeners.
    pub async fn wait_listeners(&mut self, ch: &str, n: u64) -> Info {
        self.wait_info(ch, &format!("{n} listeners"), |i| i.is_some_and(|i| i.listeners == n))
            .await
            .unwrap()
    }

    /// Sends a long-poll GET from a task; the connection comes back with the response.
    pub fn spawn_get(mut self, path: &str, headers: &[(&str, &str)], t: Duration) -> Pending {
        let req = request("GET", path, headers, full(""));
        let what = format!("GET {path}");
        let h = tokio::spawn(async move {
            let r = self.try_request(req, t).await;
            (self, r)
        });
        Pending { handle: Some(h), what, t }
    }

    /// Long-poll `/sub?channel=ch` with optional ids.
    pub fn listen(self, ch: &str, etag: Option<&str>, lm: Option<&str>) -> Pending {
        let mut h = Vec::new();
        if let Some(e) = etag {
            h.push(("if-none-match", e));
        }
        if let Some(l) = lm {
            h.push(("if-modified-since", l));
        }
        self.spawn_get(&format!("/sub?channel={ch}"), &h, LONG)
    }
}

/// A request in flight on its own connection. Dropping it closes the connection.
pub struct Pending {
    handle: Option<JoinHandle<(Conn, Result<Resp, String>)>>,
    what: String,
    t: Duration,
}

impl Pending {
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(|h| h.is_finished())
    }

    pub async fn conn_resp(mut self) -> (Conn, Resp) {
        let h = self.handle.take().unwrap();
        let what = self.what.clone();
        let (c, r) = within(self.t + Duration::from_secs(5), &what, h).await.expect("request task");
        match r {
            Ok(r) => (c, r),
            Err(e) => panic!("{what}: {e}"),
        }
    }

    pub async fn resp(self) -> Resp {
        self.conn_resp().await.1
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}
