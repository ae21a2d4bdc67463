//! Streaming responses (EventSource, chunked streams): the response head at once, then the
//! body as it comes. EventSource bodies are parsed with the `eventsource-stream` crate.

use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use eventsource_stream::{Event, Eventsource};
use futures_util::{Stream, StreamExt};
use http_body_util::BodyExt;
use hyper::HeaderMap;
use tokio::time::timeout;

use super::http::{full, request, Conn};

type Chunks = Pin<Box<dyn Stream<Item = Result<Bytes, String>> + Send>>;

/// An open streaming response on its own connection.
pub struct Streaming {
    pub status: u16,
    pub headers: HeaderMap,
    chunks: Chunks,
    /// Bytes read and not yet taken by `read_until`.
    pub buf: Vec<u8>,
    /// What keeps the connection open.
    _conn: Box<dyn Send>,
}

impl Streaming {
    /// Sends `GET path` on `conn` and waits for the response head (bounded by `t`).
    pub async fn open(
        mut conn: Conn,
        path: &str,
        headers: &[(&str, &str)],
        t: Duration,
    ) -> Streaming {
        let req = request("GET", path, headers, full(""));
        let resp = timeout(t, conn.send_streaming(req))
            .await
            .unwrap_or_else(|_| panic!("GET {path}: no response head within {t:?}"))
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        Streaming::from_response(resp, Box::new(conn))
    }

    /// A response whose body is still to be read; `conn` is kept as long as the stream.
    pub fn from_response(
        resp: hyper::Response<hyper::body::Incoming>,
        conn: Box<dyn Send>,
    ) -> Streaming {
        let (parts, body) = resp.into_parts();
        let chunks = body.into_data_stream().map(|r| r.map_err(|e| e.to_string()));
        Streaming {
            status: parts.status.as_u16(),
            headers: parts.headers,
            chunks: Box::pin(chunks),
            buf: Vec::new(),
            _conn: conn,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The next body chunk; `None` at the end of the body (or on an error).
    pub async fn chunk(&mut self, t: Duration) -> Option<Bytes> {
        match timeout(t, self.chunks.next()).await {
            Ok(Some(Ok(b))) => Some(b),
            Ok(_) => None,
            Err(_) => panic!("no body chunk within {t:?}"),
        }
    }

    /// Reads until the body read so far holds `n` times `sep`; returns the pieces before each.
    pub async fn pieces(&mut self, sep: &[u8], n: usize, t: Duration) -> Vec<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + t;
        let mut out = Vec::new();
        loop {
            while out.len() < n {
                let Some(i) = self.buf.windows(sep.len()).position(|w| w == sep) else { break };
                out.push(self.buf[..i].to_vec());
                self.buf.drain(..i + sep.len());
            }
            if out.len() == n {
                return out;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.chunk(left).await {
                Some(b) => self.buf.extend_from_slice(&b),
                None => {
                    panic!("stream ended after {} of {n} pieces; rest {:?}", out.len(), self.buf)
                }
            }
        }
    }

    /// Whether the body ends within `t` (nothing more than what is read).
    pub async fn ends_within(&mut self, t: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + t;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match timeout(left, self.chunks.next()).await {
                Ok(Some(Ok(b))) => self.buf.extend_from_slice(&b),
                Ok(_) => return true,
                Err(_) => return false,
            }
        }
    }

    /// Whether the body ends within `t`, whole (a chunked body's last chunk), not cut off.
    pub async fn ends_whole_within(&mut self, t: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + t;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match timeout(left, self.chunks.next()).await {
                Ok(Some(Ok(b))) => self.buf.extend_from_slice(&b),
                Ok(Some(Err(_))) | Err(_) => return false,
                Ok(None) => return true,
            }
        }
    }

    /// Turns the stream into EventSource events.
    pub fn events(self) -> Events {
        let prefix = Bytes::from(self.buf);
        let chunks = futures_util::stream::once(async move { Ok(prefix) }).chain(self.chunks);
        Events {
            status: self.status,
            headers: self.headers,
            events: Box::pin(chunks.eventsource().map(|r| r.map_err(|e| e.to_string()))),
            _conn: self._conn,
        }
    }
}

/// An open EventSource response, as events.
pub struct Events {
    pub status: u16,
    pub headers: HeaderMap,
    events: Pin<Box<dyn Stream<Item = Result<Event, String>> + Send>>,
    _conn: Box<dyn Send>,
}

impl Events {
    /// The next event (`None`: the stream ended).
    pub async fn next(&mut self, t: Duration) -> Option<Event> {
        match timeout(t, self.events.next()).await {
            Ok(Some(Ok(e))) => Some(e),
            Ok(Some(Err(e))) => panic!("event stream: {e}"),
            Ok(None) => None,
            Err(_) => panic!("no event within {t:?}"),
        }
    }

    /// The next `n` events (panics if the stream ends first).
    pub async fn take(&mut self, n: usize, t: Duration) -> Vec<Event> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            match self.next(t).await {
                Some(e) => out.push(e),
                None => panic!("stream ended after {i} of {n} events: {out:?}"),
            }
        }
        out
    }

    /// Whether the stream ends within `t` with no further event.
    pub async fn ends_within(&mut self, t: Duration) -> bool {
        match timeout(t, self.events.next()).await {
            Ok(None) | Ok(Some(Err(_))) => true,
            Ok(Some(Ok(e))) => panic!("an event instead of the end: {e:?}"),
            Err(_) => false,
        }
    }
}
