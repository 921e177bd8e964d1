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
    max_probes: usize,
    tls: Option<TlsConfig>,
}

/// How many nodes one refresh asks by default: every node of a cluster of up to three shards
/// with a replica each, and no more however large the cluster grows.
pub const DEFAULT_MAX_PROBES: usize = 6;

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
            max_probes: DEFAULT_MAX_PROBES,
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

    /// How long a node's reply may take.
    pub(crate) fn response_timeout(&self) -> Duration {
        self.response_timeout
    }

    /// How probes connect: as the inner client does.
    pub(crate) fn nodes(&self) -> NodeConnector {
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

    /// At most `max` connections per refresh (default [`DEFAULT_MAX_PROBES`], at least 1),
    /// whatever the size of the cluster: a fleet of clients refreshing against a large cluster
    /// must not open a connection to every node each time. The known nodes are asked in the
    /// order given — the refresh layer puts the serving masters first, then the other nodes,
    /// each group rotated by one with every refresh (failed ones included), so every node is
    /// asked in time — and up to half the probes go to seed addresses
    /// that are not known nodes (how new nodes are found, and the only probes of the first
    /// refresh). The view most of the asked nodes agree on still wins.
    pub fn max_probes(mut self, max: usize) -> Self {
        self.max_probes = max.max(1);
        self
    }

    /// The probes of one refresh, at most [`max_probes`](Self::max_probes): known nodes by their
    /// endpoint, in the order given, and addresses the seeds resolve to now that are not known
    /// nodes.
    async fn probes(&self, known: &[Endpoint], errors: &mut Vec<Error>) -> Vec<Probe> {
        let seeds = self.seed_probes(known, errors).await;
        select_probes(known, seeds, self.max_probes)
    }

    /// Every address the seeds resolve to now that is not one of the `known` nodes.
    async fn seed_probes(&self, known: &[Endpoint], errors: &mut Vec<Error>) -> Vec<Probe> {
        let mut probes = Vec::new();
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
    ///
    /// While no node answers (this refresh's or the connector's last check found none), one
    /// node is asked at a time — a known node and the seeds in turn — at the pace of the
    /// client's [`OutageGate`](crate::connect::outage::OutageGate), and refreshes in between
    /// fail at once without dialling.
    pub(crate) async fn fetch(&self, known: &[Endpoint]) -> Result<Fetched, Error> {
        use crate::connect::outage::{Check, Checker};
        let mut errors: Vec<Error> = Vec::new();
        let (probes, epoch) = match self.book.outage().check(Checker::Refresh) {
            Check::Clear { epoch } => (self.probes(known, &mut errors).await, epoch),
            Check::Wait { since, next } => return Err(self.book.outage().held_back(since, next)),
            // The known nodes and the seeds, one per check, in turn.
            Check::One { turn, epoch } if turn % (known.len() + 1) < known.len() => (
                vec![Probe {
                    endpoint: known[turn % (known.len() + 1)].clone(),
                    pin: None,
                }],
                epoch,
            ),
            Check::One { turn, epoch } => {
                let seeds = self.seed_probes(known, &mut errors).await;
                let round = turn / (known.len() + 1);
                let probes = match seeds.len() {
                    0 => known
                        .get(round % known.len().max(1))
                        .map(|e| Probe {
                            endpoint: e.clone(),
                            pin: None,
                        })
                        .into_iter()
                        .collect(),
                    n => vec![seeds[round % n].clone()],
                };
                (probes, epoch)
            }
        };
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
        // A node that answered at all — with a view, with a refusal, or with a handshake — is
        // there. A failure before any dial (a credentials provider's, say) says nothing.
        let heard = answered > 0
            || errors
                .iter()
                .any(|e| e.server_code().is_some() || e.kind() == crate::ErrorKind::Tls);
        if heard {
            self.book.outage().reached();
        } else {
            self.book.outage().unreached(epoch, errors.last().cloned());
        }

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
                // While no node answers, the next check is the outage gate's.
                if heard {
                    Err(error)
                } else {
                    Err(self.book.outage().retry_when_due(error))
                }
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

/// At most `limit` probes: the seed addresses (`seeds`, not known nodes) take up to half of
/// them when there are known nodes, all of them when there are none; the known nodes, in their
/// order, the rest; a share one side leaves unused goes to the other.
fn select_probes(known: &[Endpoint], seeds: Vec<Probe>, limit: usize) -> Vec<Probe> {
    let seed_share = if known.is_empty() {
        limit
    } else {
        seeds.len().min(limit.div_ceil(2))
    };
    let known_take = known.len().min(limit - seed_share);
    let seed_take = seeds.len().min(limit - known_take);
    let mut probes: Vec<Probe> = known[..known_take]
        .iter()
        .map(|e| Probe {
            endpoint: e.clone(),
            pin: None,
        })
        .collect();
    probes.extend(seeds.into_iter().take(seed_take));
    probes
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

impl Fetched {
    /// The snapshot it makes, numbered `sequence`, taken now.
    pub(crate) fn into_snapshot(self, sequence: u64) -> super::TopologySnapshot {
        super::TopologySnapshot {
            shards: self.shards,
            agreed_by: self.agreed_by,
            answered: self.answered,
            asked: self.asked,
            taken_at: std::time::SystemTime::now(),
            sequence,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(n: usize) -> Vec<Endpoint> {
        (1..=n)
            .map(|i| format!("127.0.0.{i}:7000").parse().unwrap())
            .collect()
    }

    fn seed_addresses(n: usize) -> Vec<Probe> {
        (1..=n)
            .map(|i| Probe {
                endpoint: "clustercfg.example.com:7000".parse().unwrap(),
                pin: Some(format!("127.0.1.{i}").parse().unwrap()),
            })
            .collect()
    }

    #[test]
    fn a_refresh_never_opens_more_than_its_limit() {
        // (known nodes, seed addresses not known, limit) → (known asked, seed addresses asked)
        let cases = [
            // Steady state: every seed address is a known node.
            ((12, 0, 6), (6, 0)),
            ((4, 0, 6), (4, 0)),
            // The first refresh: only the seeds, a configuration name behind 12 nodes.
            ((0, 12, 6), (0, 6)),
            // New nodes behind the name: up to half the probes find them.
            ((12, 5, 6), (3, 3)),
            ((12, 1, 6), (5, 1)),
            ((2, 5, 6), (2, 4)),
            ((12, 5, 1), (0, 1)),
        ];
        for ((known, seeds, limit), (want_known, want_seeds)) in cases {
            let known = endpoints(known);
            let probes = select_probes(&known, seed_addresses(seeds), limit);
            let asked_known = probes.iter().filter(|p| p.pin.is_none()).count();
            let asked_seeds = probes.len() - asked_known;
            assert_eq!(
                (asked_known, asked_seeds),
                (want_known, want_seeds),
                "{known:?}, {seeds} seed addresses, limit {limit}"
            );
            // The known nodes asked are the first ones, in order.
            let first: Vec<&Endpoint> = probes
                .iter()
                .take(asked_known)
                .map(|p| &p.endpoint)
                .collect();
            assert_eq!(first, known.iter().take(asked_known).collect::<Vec<_>>());
        }
    }
}
