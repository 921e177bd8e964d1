//! Reading the topology from the cluster over fresh connections.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use futures_util::{stream, StreamExt};
use redis::Value;

use super::snapshot::{
    parse_cluster_shards, parse_cluster_slots, view_key, Asked, NodeHealth, Shard,
};
use crate::{
    connect::{
        drain_with_grace, AddressBook, CredentialSource, Credentials, CredentialsProvider,
        Endpoint, NodeConnector, Resolve, Seeds, SystemResolver, TlsConfig,
    },
    Error,
};

/// How long a refresh waits for the other probes once one has answered, beyond the time that
/// first answer took: enough for every live node of a loaded cluster, far less than a
/// connection timeout, which is what a blackholed address (a replaced cloud node's old IP)
/// would otherwise cost every refresh.
const ANSWER_GRACE: Duration = Duration::from_millis(100);

/// Where and how a topology refresh asks the cluster: the seeds (re-resolved at every refresh),
/// credentials and timeouts. Usually taken from the connector:
/// [`ClusterConnector::topology_source`](crate::ClusterConnector::topology_source), which
/// shares its resolver's memory of node addresses.
///
/// A refresh asks every known node by its endpoint — by *name* on clusters that announce host
/// names, so TLS is verified against the name — and every address the seed names resolve to,
/// each verified against the seed name. All probes run in parallel, each bounded by the
/// connection and response timeouts; once one node has answered, the others get a short grace
/// period, so an address that swallows packets delays a refresh by milliseconds, not by a
/// connection timeout.
#[derive(Clone)]
pub struct TopologySource {
    seeds: Seeds,
    book: Arc<AddressBook>,
    credentials: CredentialSource,
    connection_timeout: Duration,
    response_timeout: Duration,
    concurrency: usize,
    tls: Option<TlsConfig>,
}

/// One probe: a node (or seed) endpoint, and the IP to reach it at when the probe is for one
/// address behind a name.
#[derive(Clone, Debug)]
struct Probe {
    endpoint: Endpoint,
    pin: Option<IpAddr>,
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pin {
            Some(ip) if !self.endpoint.is_ip() => {
                write!(
                    f,
                    "{} at {}",
                    self.endpoint,
                    SocketAddr::new(ip, self.endpoint.port())
                )
            }
            _ => write!(f, "{}", self.endpoint),
        }
    }
}

impl TopologySource {
    /// Asks these seeds (and known nodes) with the system resolver, 1 s timeouts.
    pub fn new(seeds: Seeds) -> Self {
        let credentials = match seeds.credentials() {
            Some(c) => CredentialSource::provider(Arc::new(c.clone())),
            None => CredentialSource::none(),
        };
        TopologySource {
            credentials,
            seeds,
            book: Arc::new(AddressBook::new(
                Arc::new(SystemResolver),
                Duration::from_millis(500),
            )),
            connection_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            concurrency: 16,
            tls: None,
        }
    }

    /// Resolves names with `resolver`.
    pub fn resolver(mut self, resolver: impl Resolve) -> Self {
        self.book = Arc::new(AddressBook::new(
            Arc::new(resolver),
            self.connection_timeout / 2,
        ));
        self
    }

    /// Shares the connector's resolver and its memory of node addresses.
    pub(crate) fn address_book(mut self, book: Arc<AddressBook>) -> Self {
        self.book = book;
        self
    }

    /// Credentials for every node (`None`: no `AUTH`).
    pub fn credentials(mut self, credentials: Option<Credentials>) -> Self {
        self.credentials = match credentials {
            Some(c) => CredentialSource::provider(Arc::new(c)),
            None => CredentialSource::none(),
        };
        self
    }

    /// Asks `provider` for the credentials of every probe.
    pub fn credentials_provider(mut self, provider: impl CredentialsProvider) -> Self {
        self.credentials = CredentialSource::provider(Arc::new(provider));
        self
    }

    pub(crate) fn credential_source(mut self, source: CredentialSource) -> Self {
        self.credentials = source;
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

    /// How probes connect: as the inner client does.
    fn nodes(&self) -> NodeConnector {
        NodeConnector {
            book: self.book.clone(),
            credentials: self.credentials.clone(),
            tls: self.tls.clone(),
            connection_timeout: self.connection_timeout,
        }
    }

    /// How many nodes are asked at once.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// The probes of one refresh: every known node by its endpoint, and every address the seeds
    /// resolve to now that is not already one of those.
    async fn probes(&self, known: &[Endpoint], errors: &mut Vec<Error>) -> Vec<Probe> {
        let mut probes: Vec<Probe> = known
            .iter()
            .map(|e| Probe {
                endpoint: e.clone(),
                pin: None,
            })
            .collect();
        let covered: HashSet<SocketAddr> = known
            .iter()
            .filter_map(|e| {
                let ip = e.ip().or_else(|| self.book.reported(e.host()))?;
                Some(SocketAddr::new(ip, e.port()))
            })
            .collect();
        let mut pinned = HashSet::new();
        for seed in self.seeds.iter() {
            if known.contains(seed) {
                continue;
            }
            match self.book.lookup(seed.host(), seed.port()).await {
                Ok(addrs) => {
                    for addr in addrs {
                        if !covered.contains(&addr) && pinned.insert(addr) {
                            probes.push(Probe {
                                endpoint: seed.clone(),
                                pin: Some(addr.ip()),
                            });
                        }
                    }
                }
                Err(e) => errors.push(
                    Error::new(
                        crate::ErrorKind::Connection,
                        format!("resolving seed {seed}"),
                    )
                    .with_source(e),
                ),
            }
        }
        probes
    }

    /// Resolves the seeds now, adds the `known` nodes, asks each over a fresh connection and
    /// returns the view most of them agree on.
    pub(crate) async fn fetch(&self, known: &[Endpoint]) -> Result<Fetched, Error> {
        let mut errors: Vec<Error> = Vec::new();
        let probes = self.probes(known, &mut errors).await;
        let asked = probes.len();

        let answers = stream::iter(probes)
            .map(|probe| async move {
                let result = self.probe(&probe).await;
                (probe, result)
            })
            .buffer_unordered(self.concurrency);
        // Each node's view counts once, however many of its addresses or names answered.
        let mut views_by_node: HashMap<String, Vec<Shard>> = HashMap::new();
        let gave_up = drain_with_grace(answers, ANSWER_GRACE, |(probe, answer)| match answer {
            Ok((id, shards)) => {
                views_by_node.entry(id).or_insert(shards);
                true
            }
            Err(e) => {
                tracing::debug!(%probe, error = %e, "topology probe failed");
                errors.push(e);
                false
            }
        })
        .await;
        if gave_up {
            tracing::debug!(
                answered = views_by_node.len(),
                failed = errors.len(),
                asked,
                "topology probes still pending after the grace period; deciding without them"
            );
        }
        let answered = views_by_node.len();

        let mut views: HashMap<_, (usize, Vec<Shard>)> = HashMap::new();
        for shards in views_by_node.into_values() {
            let entry = views.entry(view_key(&shards)).or_insert((0, shards));
            entry.0 += 1;
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
            Some((agreed_by, shards)) => {
                // Remember where the cluster says each named node is, for connects whose name
                // does not resolve (yet) or resolves to a replaced node's old IP.
                self.book.set_reported(
                    shards
                        .iter()
                        .flat_map(|s| s.nodes())
                        .filter(|n| !n.endpoint.is_ip())
                        .filter_map(|n| Some((n.endpoint.host().to_string(), n.ip?))),
                );
                Ok(Fetched {
                    shards,
                    agreed_by,
                    answered,
                    asked,
                })
            }
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

    /// One node's id and view, bounded in time.
    async fn probe(&self, probe: &Probe) -> Result<(String, Vec<Shard>), Error> {
        let bound = self.connection_timeout + self.response_timeout * 2;
        match tokio::time::timeout(bound, self.probe_inner(probe)).await {
            Ok(result) => result,
            Err(_) => Err(Error::timeout(format!(
                "topology probe of {probe} took over {bound:?}"
            ))),
        }
    }

    async fn probe_inner(&self, probe: &Probe) -> Result<(String, Vec<Shard>), Error> {
        let context = |e: redis::RedisError| {
            Error::from_redis(e).context(format_args!("topology probe of {probe}"))
        };
        // A fresh connection per refresh: a long-lived one to a configuration endpoint can keep
        // talking to a node that left the cluster and still answers with its old view.
        let mut connection = self
            .nodes()
            .connect(&probe.endpoint, probe.pin, Some(self.response_timeout))
            .await
            .map_err(|e| e.context(format_args!("topology probe of {probe}")))?;
        let asked = Asked {
            endpoint: match probe.pin {
                // A pinned probe reached one address behind a seed name, not a node's name.
                Some(ip) => Endpoint::from(SocketAddr::new(ip, probe.endpoint.port())),
                None => probe.endpoint.clone(),
            },
            ip: probe.pin,
            tls: self.tls.is_some(),
        };
        let shards: Result<(String, Value), _> = redis::pipe()
            .cmd("CLUSTER")
            .arg("MYID")
            .cmd("CLUSTER")
            .arg("SHARDS")
            .query_async(&mut connection)
            .await;
        match shards {
            Ok((id, reply)) => Ok((id, parse_cluster_shards(&reply, &asked)?)),
            // Servers before 7.0 do not know CLUSTER SHARDS.
            Err(e) if is_error_reply(&e) => {
                let (id, reply): (String, Value) = redis::pipe()
                    .cmd("CLUSTER")
                    .arg("MYID")
                    .cmd("CLUSTER")
                    .arg("SLOTS")
                    .query_async(&mut connection)
                    .await
                    .map_err(context)?;
                Ok((id, parse_cluster_slots(&reply, &asked)?))
            }
            Err(e) => Err(context(e)),
        }
    }
}

/// A plain `ERR` reply (for one command of a pipeline too): what a server before 7.0 answers
/// to `CLUSTER SHARDS`.
fn is_error_reply(e: &redis::RedisError) -> bool {
    e.code() == Some("ERR")
        || e.clone()
            .into_server_errors()
            .is_some_and(|items| items.iter().any(|(_, s)| s.code() == "ERR"))
}

impl fmt::Debug for TopologySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TopologySource")
            .field("seeds", &self.seeds)
            .field("credentials", &self.credentials)
            .field("connection_timeout", &self.connection_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// How a refresher reads the topology; a seam so the refresher's own logic (coalescing, rate
/// limit, decisions) can be tested without a cluster.
pub(crate) trait FetchTopology: Send + Sync + 'static {
    fn fetch<'a>(
        &'a self,
        known: &'a [Endpoint],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Fetched, Error>> + Send + 'a>>;
}

impl FetchTopology for TopologySource {
    fn fetch<'a>(
        &'a self,
        known: &'a [Endpoint],
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
