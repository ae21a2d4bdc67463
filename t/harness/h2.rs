//! HTTP/2 over TLS (ALPN `h2`): one connection carries many long-polls at once.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

use super::http::{full, request, within, ReqBody, Resp, QUICK};

/// A client that trusts only `ca` and offers only `h2`.
pub fn connector_h2(ca: &std::path::Path) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(ca).expect("read certificate")).expect("add root");
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    TlsConnector::from(Arc::new(config))
}

/// One HTTP/2 connection; requests on it run concurrently as streams.
pub struct H2Conn {
    sender: SendRequest<ReqBody>,
    task: JoinHandle<()>,
    pub port: u16,
    pub worker: Option<u32>,
    /// The socket, to close the connection under hyper (which keeps it while streams live).
    fd: std::os::fd::RawFd,
}

impl Drop for H2Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl H2Conn {
    pub async fn open(port: u16, tls: &TlsConnector) -> H2Conn {
        let tcp = within(QUICK, "connect", TcpStream::connect(("127.0.0.1", port)))
            .await
            .expect("connect");
        tcp.set_nodelay(true).ok();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&tcp);
        let name = ServerName::try_from("localhost").expect("server name");
        let stream =
            within(QUICK, "TLS handshake", tls.connect(name, tcp)).await.expect("TLS handshake");
        assert_eq!(
            stream.get_ref().1.alpn_protocol(),
            Some(&b"h2"[..]),
            "the server did not choose h2 by ALPN"
        );
        let (sender, conn) = within(
            QUICK,
            "h2 handshake",
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)),
        )
        .await
        .expect("h2 handshake");
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        H2Conn { sender, task, port, worker: None, fd }
    }

    /// A connection whose worker is known (from `X-Worker` of `probe`).
    pub async fn open_probed(port: u16, tls: &TlsConnector, probe: &str) -> H2Conn {
        let mut c = H2Conn::open(port, tls).await;
        let r = c.get(probe, &[], QUICK).await.expect("probe over h2");
        c.worker = Some(r.worker());
        c
    }

    /// A connection served by worker `pid`.
    pub async fn open_on(port: u16, tls: &TlsConnector, probe: &str, pid: u32) -> H2Conn {
        for _ in 0..400 {
            let c = H2Conn::open_probed(port, tls, probe).await;
            if c.worker == Some(pid) {
                return c;
            }
        }
        panic!("no h2 connection landed on worker {pid} in 400 attempts");
    }

    /// Shuts the TCP connection down in both directions, as a client that goes away.
    pub fn shutdown(&self) {
        // SAFETY: `fd` is the connection's socket, owned by hyper's task until this is dropped.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
    }

    pub fn worker(&self) -> u32 {
        self.worker.expect("connection was not probed")
    }

    /// A GET of `path` for this connection (`:authority` instead of `Host`).
    fn get_request(&self, path: &str, headers: &[(&str, &str)]) -> hyper::Request<ReqBody> {
        let mut req =
            request("GET", &format!("https://localhost:{}{path}", self.port), &[], full(""));
        req.headers_mut().remove("host");
        for (k, v) in headers {
            req.headers_mut().insert(
                hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        req
    }

    /// Starts a GET as a new stream; the answer comes through the handle.
    pub fn spawn_get(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        t: Duration,
    ) -> JoinHandle<Result<Resp, String>> {
        let req = self.get_request(path, headers);
        let mut sender = self.sender.clone();
        tokio::spawn(async move {
            let fut = async {
                sender.ready().await.map_err(|e| format!("h2 not ready: {e}"))?;
                let resp =
                    sender.send_request(req).await.map_err(|e| format!("h2 request: {e}"))?;
                if resp.version() != hyper::Version::HTTP_2 {
                    return Err(format!("answered as {:?}", resp.version()));
                }
                let (parts, body) = resp.into_parts();
                let body = body.collect().await.map_err(|e| format!("h2 body: {e}"))?.to_bytes();
                Ok(Resp { status: parts.status.as_u16(), headers: parts.headers, body })
            };
            match tokio::time::timeout(t, fut).await {
                Ok(r) => r,
                Err(_) => Err(format!("no h2 response within {t:?}")),
            }
        })
    }

    /// Starts a GET as a new stream and returns its response with the body unread (the
    /// connection stays open while it is read).
    pub async fn open_stream(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> super::stream::Streaming {
        let req = self.get_request(path, headers);
        let mut sender = self.sender.clone();
        let resp = within(QUICK, "h2 stream head", async {
            sender.ready().await.map_err(|e| format!("h2 not ready: {e}"))?;
            sender.send_request(req).await.map_err(|e| format!("h2 request: {e}"))
        })
        .await
        .unwrap_or_else(|e: String| panic!("GET {path} over h2: {e}"));
        assert_eq!(resp.version(), hyper::Version::HTTP_2);
        super::stream::Streaming::from_response(resp, Box::new(self.sender.clone()))
    }

    pub async fn get(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        t: Duration,
    ) -> Result<Resp, String> {
        self.spawn_get(path, headers, t).await.map_err(|e| format!("h2 task: {e}"))?
    }
}
