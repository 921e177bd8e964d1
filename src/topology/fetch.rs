//! Reading the topology from the cluster over fresh connections.

use std::{collections::HashMap, fmt, net::SocketAddr, sync::Arc, time::Duration};

use futures_util::{stream, StreamExt};
use redis::{AsyncConnectionConfig, IntoConnectionInfo, RedisConnectionInfo, Value};

use super::snapshot::{parse_cluster_shards, parse_cluster_slots, view_key, NodeHealth, Shard};
use crate::{
    connect::{Credentials, Resolve, Seed, Seeds, SystemResolver, TlsConfig},
    Error,
};

/// Where and how a topology refresh asks the cluster: the seeds (re-resolved at every refresh),
/// credentials and timeouts. Usually taken from the connector:
/// [`ClusterConnector::topology_source`](crate::ClusterConnector::topology_source).
#[derive(Clone)]
pub struct TopologySource {
    seeds: Seeds,
    resolver: Arc<dyn Resolve>,
    credentials: Option<Credentials>,
    connection_timeout: Duration,
    response_timeout: Duration,
    concurrency: usize,
    tls: Option<TlsConfig>,
}

impl TopologySource {
    /// Asks these seeds (and known nodes) with the system resolver, 1 s timeouts.
    pub fn new(seeds: Seeds) -> Self {
        TopologySource {
            credentials: seeds.credentials().cloned(),
            seeds,
            resolver: Arc::new(SystemResolver),
            connection_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            concurrency: 8,
            tls: None,
        }
    }

    /// Resolves seed names with `resolver`.
    pub fn resolver(mut self, resolver: impl Resolve) -> Self {
        self.resolver = Arc::new(resolver);
        self
    }

    pub(crate) fn shared_resolver(mut self, resolver: Arc<dyn Resolve>) -> Self {
        self.resolver = resolver;
        self
    }

    /// Credentials for every node.
    pub fn credentials(mut self, credentials: Option<Credentials>) -> Self {
        self.credentials = credentials;
        self
    }

    /// Probe over TLS (feature `tls`); `None` for plain TCP.
    pub fn tls(mut self, tls: Option<TlsConfig>) -> Self {
        self.tls = tls;
        self
    }

    /// Connection and response timeouts of each probe.
    pub fn timeouts(mut self, connection: Duration, response: Duration) -> Self {
        self.connection_timeout = connection;
        self.response_timeout = response;
        self
    }

    /// How many nodes are asked at once.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// Resolves the seeds now, adds `known` node addresses, asks each over a fresh connection
    /// and returns the view most of them agree on.
    pub(crate) async fn fetch(&self, known: &[SocketAddr]) -> Result<Fetched, Error> {
        let mut candidates: Vec<SocketAddr> = Vec::new();
        let mut errors: Vec<Error> = Vec::new();
        for seed in self.seeds.iter() {
            if let Ok(ip) = seed.host().parse() {
                candidates.push(SocketAddr::new(ip, seed.port()));
                continue;
            }
            let lookup = self.resolver.resolve(seed.host(), seed.port());
            match tokio::time::timeout(self.connection_timeout, lookup).await {
                Ok(Ok(addrs)) => candidates.extend(addrs),
                Ok(Err(e)) => errors.push(
                    Error::new(
                        crate::ErrorKind::Connection,
                        format!("resolving seed {seed}"),
                    )
                    .with_source(e),
                ),
                Err(_) => errors.push(Error::timeout(format!("resolving seed {seed}"))),
            }
        }
        candidates.extend_from_slice(known);
        let mut seen = std::collections::HashSet::new();
        candidates.retain(|a| seen.insert(*a));
        let asked = candidates.len();

        let answers: Vec<(SocketAddr, Result<Vec<Shard>, Error>)> = stream::iter(candidates)
            .map(|addr| async move { (addr, self.probe(addr).await) })
            .buffer_unordered(self.concurrency)
            .collect()
            .await;

        let mut views: HashMap<_, (usize, Vec<Shard>)> = HashMap::new();
        let mut answered = 0;
        for (addr, answer) in answers {
            match answer {
                Ok(shards) => {
                    answered += 1;
                    let entry = views.entry(view_key(&shards)).or_insert((0, shards));
                    entry.0 += 1;
                }
                Err(e) => {
                    tracing::debug!(%addr, error = %e, "topology probe failed");
                    errors.push(e);
                }
            }
        }
        // Most agreeing nodes win; among equals, the view with more healthy nodes (a node cut off
        // from its peers tends to see fewer).
        let best = views.into_values().max_by_key(|(count, shards)| {
            let healthy = shards
                .iter()
                .flat_map(|s| s.nodes())
                .filter(|n| n.health == NodeHealth::Online)
                .count();
            (*count, healthy)
        });
        match best {
            Some((agreed_by, shards)) => Ok(Fetched {
                shards,
                agreed_by,
                answered,
                asked,
            }),
            None => {
                let mut error = Error::unreachable(format!(
                    "no node answered a topology request ({asked} asked)"
                ));
                if let Some(cause) = errors.pop() {
                    error = error.with_source(cause);
                }
                Err(error)
            }
        }
    }

    async fn probe(&self, addr: SocketAddr) -> Result<Vec<Shard>, Error> {
        let bound = self.connection_timeout + self.response_timeout * 2;
        match tokio::time::timeout(bound, self.probe_inner(addr)).await {
            Ok(result) => result,
            Err(_) => Err(Error::timeout(format!(
                "topology probe of {addr} took over {bound:?}"
            ))),
        }
    }

    async fn probe_inner(&self, addr: SocketAddr) -> Result<Vec<Shard>, Error> {
        let mut settings = RedisConnectionInfo::default();
        if let Some(c) = &self.credentials {
            if let Some(user) = &c.username {
                settings = settings.set_username(user);
            }
            settings = settings.set_password(c.password.expose());
        }
        let info = crate::connect::cluster_node_addr(&Seed::from(addr), self.tls.is_some())
            .into_connection_info()?
            .set_redis_settings(settings);
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connection_timeout))
            .set_response_timeout(Some(self.response_timeout));
        // A fresh connection per refresh: a long-lived one to a configuration endpoint can keep
        // talking to a node that left the cluster and still answers with its old view.
        let client = match &self.tls {
            #[cfg(feature = "tls")]
            Some(tls) => redis::Client::build_with_tls(info, tls.certificates())?,
            #[cfg(not(feature = "tls"))]
            Some(_) => {
                return Err(Error::config(
                    "TLS topology probes need the `tls` feature of tower-redis-cluster",
                ))
            }
            None => redis::Client::open(info)?,
        };
        let mut connection = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| Error::from_redis(e).context(format_args!("topology probe of {addr}")))?;
        let shards: Result<Value, _> = redis::cmd("CLUSTER")
            .arg("SHARDS")
            .query_async(&mut connection)
            .await;
        match shards {
            Ok(reply) => parse_cluster_shards(&reply, addr),
            // Servers before 7.0 do not know CLUSTER SHARDS.
            Err(e) if e.code() == Some("ERR") => {
                let reply: Value = redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query_async(&mut connection)
                    .await?;
                parse_cluster_slots(&reply, addr)
            }
            Err(e) => Err(Error::from_redis(e).context(format_args!("topology probe of {addr}"))),
        }
    }
}

impl fmt::Debug for TopologySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TopologySource")
            .field("seeds", &self.seeds)
            .field("credentials", &self.credentials)
            .field("connection_timeout", &self.connection_timeout)
            .field("response_timeout", &self.response_timeout)
            .finish_non_exhaustive()
    }
}

/// How a refresher reads the topology; a seam so the refresher's own logic (coalescing, rate
/// limit, decisions) can be tested without a cluster.
pub(crate) trait FetchTopology: Send + Sync + 'static {
    fn fetch<'a>(
        &'a self,
        known: &'a [SocketAddr],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Fetched, Error>> + Send + 'a>>;
}

impl FetchTopology for TopologySource {
    fn fetch<'a>(
        &'a self,
        known: &'a [SocketAddr],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Fetched, Error>> + Send + 'a>>
    {
        Box::pin(TopologySource::fetch(self, known))
    }
}

pub(crate) struct Fetched {
    pub(crate) shards: Vec<Shard>,
    pub(crate) agreed_by: usize,
    pub(crate) answered: usize,
    pub(crate) asked: usize,
}
