//! The node's connections to Redis: one multiplexed connection to a standalone server, or a
//! cluster connection (`martd_redis_cluster on`) that routes each channel's keys to the master
//! of its hash slot; a subscription to the announce channel on one server (a cluster carries
//! `PUBLISH` to every node); and, to read every stream on (re)connect, each master in turn.

use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, TlsCertificates, Value};

/// How long a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// What the node talks to Redis with; clones share the connection.
#[derive(Clone)]
pub enum Link {
    One(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Link::One(c) => c.req_packed_command(cmd),
            Link::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Link::One(c) => c.req_packed_commands(cmd, offset, count),
            Link::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Link::One(c) => c.get_db(),
            Link::Cluster(c) => c.get_db(),
        }
    }
}

async fn timed<T, E: std::fmt::Display>(
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    tokio::time::timeout(CONNECT_TIMEOUT, f)
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())
}

/// What `martd_redis_url`, `martd_redis_cluster` and `martd_redis_trusted_certificate` say.
pub struct Servers {
    pub urls: Vec<String>,
    pub cluster: bool,
    /// The certificates (PEM) that verify a `rediss://` server (`None`: the system's).
    pub ca: Option<Vec<u8>>,
}

impl Servers {
    /// The urls, for log lines.
    pub fn shown(&self) -> String {
        self.urls.join(" ")
    }

    fn certificates(&self) -> TlsCertificates {
        TlsCertificates { client_tls: None, root_cert: self.ca.clone() }
    }

    fn client(&self, url: &str) -> Result<redis::Client, String> {
        match &self.ca {
            Some(_) if url.starts_with("rediss://") => {
                redis::Client::build_with_tls(url, self.certificates())
            }
            _ => redis::Client::open(url),
        }
        .map_err(|e| e.to_string())
    }
}

/// Connects to the servers (a standalone server: the first url that answers; a cluster: any
/// of them as seeds).
pub async fn connect(servers: &Servers) -> Result<Link, String> {
    let urls = &servers.urls;
    if servers.cluster {
        let mut b = redis::cluster::ClusterClient::builder(urls.to_vec());
        if servers.ca.is_some() {
            b = b.certs(servers.certificates());
        }
        let client = b.build().map_err(|e| e.to_string())?;
        return Ok(Link::Cluster(timed(client.get_async_connection()).await?));
    }
    let mut why = String::from("no url");
    for url in urls {
        let client = servers.client(url)?;
        match timed(client.get_multiplexed_async_connection()).await {
            Ok(c) => return Ok(Link::One(c)),
            Err(e) => why = e,
        }
    }
    Err(why)
}

/// A subscription to `channel` on the first server that answers.
pub async fn subscribe(servers: &Servers, channel: &[u8]) -> Result<redis::aio::PubSub, String> {
    let mut why = String::from("no url");
    for url in &servers.urls {
        let client = servers.client(url)?;
        match timed(client.get_async_pubsub()).await {
            Ok(mut p) => {
                p.subscribe(channel).await.map_err(|e| e.to_string())?;
                return Ok(p);
            }
            Err(e) => why = e,
        }
    }
    Err(why)
}

/// Connections to every server whose keys a full read must scan: the standalone server, or
/// each master of the cluster (from `CLUSTER NODES`, with the first url's credentials).
pub async fn scan_targets(link: &mut Link, servers: &Servers) -> Result<Vec<Link>, String> {
    if let Link::One(_) = link {
        return Ok(vec![link.clone()]);
    }
    let nodes: String =
        redis::cmd("CLUSTER").arg("NODES").query_async(link).await.map_err(|e| e.to_string())?;
    let seed = servers.urls.first().map(String::as_str).unwrap_or("redis://127.0.0.1");
    let mut out = Vec::new();
    for address in martd_core::redis::masters(&nodes) {
        let url = martd_core::redis::with_address(seed, address);
        let client = servers.client(&url)?;
        out.push(Link::One(timed(client.get_multiplexed_async_connection()).await?));
    }
    Ok(out)
}
