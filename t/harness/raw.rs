//! A raw TCP client for what hyper does not send: pipelined requests, HTTP/1.0, requests
//! written in pieces. Responses are parsed with `httparse`.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::http::{within, QUICK};

pub struct RawConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// A response read off a raw connection.
#[derive(Debug)]
pub struct RawResp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

impl RawConn {
    pub async fn open(port: u16) -> RawConn {
        let stream = within(QUICK, "raw connect", TcpStream::connect(("127.0.0.1", port)))
            .await
            .expect("raw connect");
        stream.set_nodelay(true).ok();
        RawConn { stream, buf: Vec::new() }
    }

    /// A connection with a 4 KB receive buffer (a client that reads slowly, or not at all).
    pub async fn open_on_small_buffer(port: u16) -> RawConn {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let stream = within(QUICK, "raw connect", sock.connect(addr)).await.expect("raw connect");
        RawConn { stream, buf: Vec::new() }
    }

    /// Reads whatever comes until the peer closes (end or reset) within `t`.
    pub async fn drained_to_close_within(&mut self, t: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + t;
        let mut b = vec![0u8; 64 * 1024];
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.stream.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
                Err(_) => return false,
            }
        }
    }

    pub async fn write(&mut self, bytes: &[u8]) {
        within(QUICK, "raw write", self.stream.write_all(bytes)).await.expect("raw write");
    }

    /// Whether the server closed the connection (read returns 0) within `t`, with nothing
    /// else sent.
    pub async fn closed_within(&mut self, t: Duration) -> bool {
        let mut b = [0u8; 1];
        matches!(tokio::time::timeout(t, self.stream.read(&mut b)).await, Ok(Ok(0)))
    }

    /// Reads one response with a `Content-Length` body (or none: 304 and HEAD-like).
    pub async fn response(&mut self, t: Duration) -> RawResp {
        within(t, "raw response", self.read_response()).await
    }

    async fn read_response(&mut self) -> RawResp {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(head) =
                resp.parse(&self.buf).expect("a valid HTTP response head")
            {
                let status = resp.code.expect("status");
                let headers: Vec<(String, String)> = resp
                    .headers
                    .iter()
                    .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned()))
                    .collect();
                let len = headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                    .map(|(_, v)| v.parse::<usize>().expect("content-length"))
                    .unwrap_or(0);
                while self.buf.len() < head + len {
                    self.fill().await;
                }
                let body = self.buf[head..head + len].to_vec();
                self.buf.drain(..head + len);
                return RawResp { status, headers, body };
            }
            self.fill().await;
        }
    }

    async fn fill(&mut self) {
        let mut chunk = [0u8; 4096];
        let n = self.stream.read(&mut chunk).await.expect("raw read");
        assert!(
            n > 0,
            "connection closed before a whole response: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        self.buf.extend_from_slice(&chunk[..n]);
    }
}
