//! Upstreams for nginx to proxy to, run inside the test: a backend that answers each request
//! with what the test says (after an optional delay) and records every request it was asked,
//! and a raw client that checks a connection carries exactly the expected bytes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use super::http::{within, QUICK};
use super::raw::RawResp;

/// What a [`Backend`] answers to one request.
pub type Responder = dyn Fn(&str) -> String + Send + Sync;

/// An HTTP/1.x upstream on 127.0.0.1: one request per connection (nginx proxies with
/// `Connection: close` by default). Dropping it stops it and closes every connection it holds.
pub struct Backend {
    pub port: u16,
    requests: Arc<Mutex<Vec<String>>>,
    answered: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads a request head (up to the blank line); `None` if the peer closed first.
async fn read_head(s: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

impl Backend {
    /// Answers each request with `respond(request target)` (a whole HTTP response, written as
    /// is) after `delay`, then closes the connection.
    pub async fn start(
        delay: Duration,
        respond: impl Fn(&str) -> String + Send + Sync + 'static,
    ) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let answered = Arc::new(Mutex::new(Vec::new()));
        let respond: Arc<Responder> = Arc::new(respond);
        let (reqs, done) = (requests.clone(), answered.clone());
        let task = tokio::spawn(async move {
            // Connection tasks belong to this task: aborting it closes them all.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    a = listener.accept() => {
                        let Ok((mut s, _)) = a else { continue };
                        let (reqs, done, respond) = (reqs.clone(), done.clone(), respond.clone());
                        conns.spawn(async move {
                            let Some(head) = read_head(&mut s).await else { return };
                            let target = head
                                .lines()
                                .next()
                                .and_then(|l| l.split(' ').nth(1))
                                .unwrap_or("")
                                .to_string();
                            reqs.lock().unwrap().push(target.clone());
                            tokio::time::sleep(delay).await;
                            let resp = respond(&target);
                            let _ = s.write_all(resp.as_bytes()).await;
                            let _ = s.shutdown().await;
                            done.lock().unwrap().push(target);
                            // Let nginx close first.
                            let mut b = [0u8; 256];
                            let _ = tokio::time::timeout(QUICK, s.read(&mut b)).await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Backend { port, requests, answered, task }
    }

    /// An upstream that answers every request `204` only after `delay` (a slow mirror target).
    pub async fn slow(delay: Duration) -> Backend {
        Backend::start(delay, |_| {
            "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n".to_string()
        })
        .await
    }

    /// Every request target asked so far, in arrival order.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    /// How many requests asked for a target containing `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.requests.lock().unwrap().iter().filter(|t| t.contains(needle)).count()
    }

    /// How many requests were answered (the delay over).
    pub fn answered(&self) -> usize {
        self.answered.lock().unwrap().len()
    }

    /// Waits until `count(needle) == n` (bounded).
    pub async fn wait_count(&self, needle: &str, n: usize) {
        within(QUICK, &format!("backend asked {n} times for {needle:?}"), async {
            while self.count(needle) != n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }
}

/// A response `200` carrying `X-Accel-Redirect: uri` and no body.
pub fn accel_redirect(uri: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\nX-Accel-Redirect: {uri}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
}

/// A raw HTTP/1.1 client that parses exactly what the server sends: every byte must belong to
/// a well-formed response, and [`Wire::quiet`] checks that nothing else arrives.
pub struct Wire {
    stream: TcpStream,
    buf: Vec<u8>,
    closed: bool,
}

impl Wire {
    pub async fn open(port: u16) -> Wire {
        let stream = within(QUICK, "connect", TcpStream::connect(("127.0.0.1", port)))
            .await
            .expect("connect");
        stream.set_nodelay(true).ok();
        Wire { stream, buf: Vec::new(), closed: false }
    }

    pub async fn write(&mut self, bytes: &[u8]) {
        within(QUICK, "write", self.stream.write_all(bytes)).await.expect("write");
    }

    /// Sends a GET with extra header lines (each ending in `\r\n`).
    pub async fn get(&mut self, target: &str, headers: &str) {
        self.write(format!("GET {target} HTTP/1.1\r\nHost: t\r\n{headers}\r\n").as_bytes()).await;
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        match self.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                self.closed = true;
                false
            }
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// The next response (`Content-Length` or no body; not chunked), within `t`. Panics if the
    /// connection closes first or the bytes are not a response.
    pub async fn response(&mut self, t: Duration) -> RawResp {
        within(t, "response on the raw connection", async {
            loop {
                if let Some(r) = self.parse() {
                    return r;
                }
                if !self.fill().await {
                    panic!(
                        "connection closed before a whole response; had {:?}",
                        String::from_utf8_lossy(&self.buf)
                    );
                }
            }
        })
        .await
    }

    fn parse(&mut self) -> Option<RawResp> {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        let head = match resp.parse(&self.buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return None,
            Err(e) => {
                panic!("not an HTTP response ({e}): {:?}", String::from_utf8_lossy(&self.buf))
            }
        };
        let status = resp.code.expect("status");
        let headers: Vec<(String, String)> = resp
            .headers
            .iter()
            .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned()))
            .collect();
        assert!(
            !headers
                .iter()
                .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked")),
            "chunked response: {headers:?}"
        );
        let len = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.trim().parse::<usize>().expect("content-length"))
            .unwrap_or(0);
        if self.buf.len() < head + len {
            return None;
        }
        let body = self.buf[head..head + len].to_vec();
        self.buf.drain(..head + len);
        Some(RawResp { status, headers, body })
    }

    /// Nothing more arrives (no byte, no close) for `t`; panics with what came instead.
    pub async fn quiet(&mut self, t: Duration, what: &str) {
        assert!(
            self.buf.is_empty(),
            "{what}: unexpected bytes: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(t, self.stream.read(&mut chunk)).await {
            Err(_) => {}
            Ok(Ok(0)) => panic!("{what}: the server closed the connection"),
            Ok(Ok(n)) => {
                panic!("{what}: unexpected bytes: {:?}", String::from_utf8_lossy(&chunk[..n]))
            }
            Ok(Err(e)) => panic!("{what}: read error {e}"),
        }
    }

    /// Whether the server closed the connection within `t` (any bytes before it are kept).
    pub async fn closed_within(&mut self, t: Duration) -> bool {
        let _ = tokio::time::timeout(t, async { while self.fill().await {} }).await;
        self.closed
    }
}
