//! TLS for tests: a throw-away certificate made with the `openssl` command, and hyper
//! connections over rustls that trust it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

use super::http::{within, Conn, QUICK};

/// A certificate for `localhost` in `dir`, signed by a throw-away CA: (CA certificate,
/// server certificate, server key) paths.
pub fn make_cert(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let p = |f: &str| dir.join(f);
    let openssl = |args: &[&str]| {
        let out =
            Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(
        &[&["req", "-x509"][..], &ec, &["-days", "2", "-subj", "/CN=martd test CA"]]
            .concat()
            .into_iter()
            .chain(["-keyout", "ca.key", "-out", "ca.pem"])
            .collect::<Vec<_>>(),
    );
    openssl(
        &[&["req", "-x509", "-CA", "ca.pem", "-CAkey", "ca.key"][..], &ec]
            .concat()
            .into_iter()
            .chain(["-days", "2", "-subj", "/CN=localhost"])
            .chain([
                "-addext",
                "subjectAltName=DNS:localhost",
                "-addext",
                "basicConstraints=CA:FALSE",
            ])
            .chain(["-keyout", "key.pem", "-out", "cert.pem"])
            .collect::<Vec<_>>(),
    );
    (p("ca.pem"), p("cert.pem"), p("key.pem"))
}

/// A client that trusts only the CA certificate `ca`.
pub fn connector(ca: &Path) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(ca).expect("read certificate")).expect("add root");
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

impl Conn {
    /// An HTTP/1.1 connection over TLS to 127.0.0.1:`port` (certificate name `localhost`).
    pub async fn try_open_tls(port: u16, tls: &TlsConnector) -> Result<Conn, String> {
        let tcp = within(QUICK, "connect", TcpStream::connect(("127.0.0.1", port)))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        tcp.set_nodelay(true).ok();
        let name = ServerName::try_from("localhost").expect("server name");
        let stream = within(QUICK, "TLS handshake", tls.connect(name, tcp))
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        Conn::from_io(TokioIo::new(stream), port).await
    }
}
