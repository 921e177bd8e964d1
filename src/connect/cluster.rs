//! [`ClusterConnector`]: a fresh `redis` cluster client from the seed names, at every connect.

use std::{collections::HashSet, fmt, sync::Arc, time::Duration};

use futures_util::{stream::FuturesUnordered, StreamExt};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{ConnectionAddr, IntoConnectionInfo};

use super::{
    AddressBook, Connect, ConnectFuture, ConnectHints, CredentialSource, Credentials,
    CredentialsProvider, Endpoint, PerConnection, Resolve, Seeds, SystemResolver, TlsConfig,
};
use crate::{Error, RedisService};

/// How long a connect waits for more initial nodes to answer once one has, beyond the time that
/// first answer took.
pub(crate) const REACHABLE_GRACE: Duration = Duration::from_millis(50);

/// Builds a `redis::cluster_async::ClusterConnection` from [`Seeds`] each time it is called.
///
/// Every call resolves the seed names again (through its [`Resolve`]) and adds the
/// [`ConnectHints::extra_seeds`] — the nodes a topology refresh last saw, by their announced
/// endpoints — as further initial nodes. Connections go to host *names* where the cluster
/// announces names, so TLS verifies every node against its name; a name that does not resolve
/// (yet, or any more) is reached at the IPs it last resolved to or the cluster last reported
/// for it.
///
/// Before the inner client is made, the candidates are probed with plain TCP connects, all at
/// once: only those that answer become the inner client's initial nodes. A replaced cloud
/// node's old IP swallows packets, and the redis crate waits for *every* initial node before it
/// serves, so one such address would cost each rebuild a full connection timeout.
///
/// Credentials come from a [`CredentialsProvider`]: static ones are given to the inner client
/// once per connect; any other provider is asked by every node connection the inner client
/// opens (its first ones and each reconnect), so a rotated token reaches the next connection.
///
/// The inner client's own retries are kept low — by default 2, enough to follow a `MOVED` and
/// an `ASK` — so that the retry layer above is the one policy that decides; its per-request
/// response timeout bounds every attempt.
///
/// With inner retries above zero the redis crate may resend a command after a dropped
/// connection and report only its last error, so the service it makes marks every error
/// [`Sent::Maybe`](crate::Sent::Maybe) (see [`RedisService::resends_internally`]): idempotent
/// commands are still retried, non-idempotent ones (`INCR`) are not. With
/// [`inner_retries(0)`](Self::inner_retries) errors keep their precise `Sent` and `INCR` can be
/// retried safely after `MOVED`/`CLUSTERDOWN`, but an `ASK` during a live slot migration is no
/// longer followed by the inner client.
#[derive(Clone)]
pub struct ClusterConnector {
    seeds: Seeds,
    credentials: CredentialSource,
    resolver: Arc<dyn Resolve>,
    /// The resolver with its memory of node addresses, shared with the topology source.
    book: Arc<AddressBook>,
    connection_timeout: Duration,
    response_timeout: Duration,
    inner_retries: u32,
    read_from_replicas: bool,
    tls: Option<TlsConfig>,
}

impl ClusterConnector {
    /// A connector for these seeds, using the system resolver, credentials from the seed URLs
    /// (if any), a 1 s connection timeout and a 500 ms response timeout.
    pub fn new(seeds: Seeds) -> Self {
        let resolver: Arc<dyn Resolve> = Arc::new(SystemResolver);
        let connection_timeout = Duration::from_secs(1);
        ClusterConnector {
            credentials: match seeds.credentials() {
                Some(c) => CredentialSource::provider(Arc::new(c.clone())),
                None => CredentialSource::none(),
            },
            seeds,
            book: Arc::new(AddressBook::new(resolver.clone(), connection_timeout / 2)),
            resolver,
            connection_timeout,
            response_timeout: Duration::from_millis(500),
            inner_retries: 2,
            read_from_replicas: false,
            tls: None,
        }
    }

    /// A fresh address book for the current resolver and timeout: a lookup may take half a
    /// connection timeout, leaving the other half to connect to a remembered address.
    fn renew_book(&mut self) {
        self.book = Arc::new(AddressBook::new(
            self.resolver.clone(),
            self.connection_timeout / 2,
        ));
    }

    /// Resolves names (seeds and node host names) with `resolver` instead of the system's.
    pub fn resolver(mut self, resolver: impl Resolve) -> Self {
        self.resolver = Arc::new(resolver);
        self.renew_book();
        self
    }

    /// Connect with TLS (feature `tls`). `rediss://` seeds turn TLS on with
    /// [`TlsConfig::webpki_roots`] unless this is set.
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The TLS settings in force, if TLS is on.
    pub fn tls_config(&self) -> Option<TlsConfig> {
        match (&self.tls, self.seeds.tls()) {
            (Some(t), _) => Some(t.clone()),
            (None, true) => Some(TlsConfig::webpki_roots()),
            (None, false) => None,
        }
    }

    /// ACL credentials for every node.
    pub fn credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = CredentialSource::provider(Arc::new(credentials));
        self
    }

    /// Asks `provider` for credentials at every connection (see [`CredentialsProvider`]).
    pub fn credentials_provider(mut self, provider: impl CredentialsProvider) -> Self {
        self.credentials = CredentialSource::provider(Arc::new(provider));
        self
    }

    /// How long one TCP (and TLS) connect may take, name lookup and `AUTH` included.
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self.renew_book();
        self
    }

    /// How long a reply may take on the inner client's connections.
    pub(crate) fn reply_timeout(&self) -> Duration {
        self.response_timeout
    }

    /// How long the inner client waits for one reply.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// The inner client's own retries (redirects and reconnects share this count).
    pub fn inner_retries(mut self, retries: u32) -> Self {
        self.inner_retries = retries;
        self
    }

    /// Route read-only commands to replicas.
    pub fn read_from_replicas(mut self, enabled: bool) -> Self {
        self.read_from_replicas = enabled;
        self
    }

    /// The configured seeds.
    pub fn seeds(&self) -> &Seeds {
        &self.seeds
    }

    /// Where a topology refresh should ask: the same seeds, resolver (and its memory of node
    /// addresses), credentials, TLS and connection timeout as this connector.
    pub fn topology_source(&self) -> crate::topology::TopologySource {
        crate::topology::TopologySource::new(self.seeds.clone())
            .address_book(self.book.clone())
            .credential_source(self.credentials.clone())
            .tls(self.tls_config())
            .timeouts(
                self.connection_timeout,
                self.response_timeout.max(Duration::from_secs(1)),
            )
    }

    /// Checks the configuration without connecting: seeds, timeouts, TLS availability.
    pub fn validate(&self) -> Result<(), Error> {
        if self.seeds.is_empty() {
            return Err(Error::config(
                "no seeds: give at least one host:port of the cluster",
            ));
        }
        if self.connection_timeout.is_zero() || self.response_timeout.is_zero() {
            return Err(Error::config(
                "connection and response timeouts must be greater than zero",
            ));
        }
        if let Some(tls) = self.tls_config() {
            if !cfg!(feature = "tls") {
                return Err(Error::config(
                    "TLS was asked for (rediss:// seed or tls()), but this build lacks the `tls` feature of tower-redis-cluster",
                ));
            }
            tls.validate()?;
        }
        Ok(())
    }

    /// The inner client's builder for these initial nodes.
    fn builder(
        &self,
        nodes: &[Endpoint],
        static_credentials: Option<Credentials>,
    ) -> Result<ClusterClientBuilder, Error> {
        let tls = self.tls_config();
        let mut infos = Vec::with_capacity(nodes.len());
        for node in nodes {
            infos.push(
                node_addr(node, tls.is_some())
                    .into_connection_info()
                    .map_err(Error::from_redis)?,
            );
        }
        let mut builder = ClusterClientBuilder::new(infos)
            .connection_timeout(self.connection_timeout)
            .response_timeout(self.response_timeout)
            .retries(self.inner_retries)
            // The inner client's waits between its retries: short, because the policy that
            // backs off is ours.
            .min_retry_wait(10)
            .max_retry_wait(100)
            .async_dns_resolver(super::address_book::InnerDials(self.book.clone()));
        match (static_credentials, self.credentials.get()) {
            (Some(c), _) => {
                if let Some(user) = &c.username {
                    builder = builder.username(user);
                }
                builder = builder.password(c.password.expose());
            }
            (None, Some(provider)) => {
                builder = builder.set_credentials_provider(PerConnection(provider.clone()));
            }
            (None, None) => {}
        }
        #[cfg(feature = "tls")]
        if let Some(tls) = &tls {
            builder = builder
                .tls(redis::TlsMode::Secure)
                .certs(tls.certificates());
        }
        if self.read_from_replicas {
            builder =
                builder.read_routing_strategy(redis::cluster_read_routing::RandomReplicaStrategy);
        }
        Ok(builder)
    }

    /// The candidates that accept a TCP connection, probed all at once: those that answer by
    /// the time the first one did plus a short grace. When none does, the first candidate's
    /// failure: none would accept the inner client either, which would try each in turn again.
    ///
    /// While no node answers (this check or the topology refresh's found none), one candidate
    /// at a time is checked, at the pace of the client's [`OutageGate`], and the attempts in
    /// between fail at once without dialling.
    ///
    /// [`OutageGate`]: super::outage::OutageGate
    async fn reachable(&self, mut candidates: Vec<Endpoint>) -> Result<Vec<Endpoint>, Error> {
        use super::outage::{Check, Checker};
        let check = if candidates.is_empty() {
            Check::Clear { epoch: 0 }
        } else {
            self.book.outage().check(Checker::Connect)
        };
        let epoch = match check {
            Check::Clear { .. } if candidates.len() < 2 => return Ok(candidates),
            Check::Clear { epoch } => epoch,
            Check::Wait { since, next } => return Err(self.book.outage().held_back(since, next)),
            Check::One { turn, epoch } => {
                let one = candidates.swap_remove(turn % candidates.len());
                candidates = vec![one];
                epoch
            }
        };
        let timeout = self.connection_timeout;
        let attempts: FuturesUnordered<_> = candidates
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, endpoint)| {
                let book = self.book.clone();
                async move {
                    let attempt = async {
                        let addrs = book.lookup(endpoint.host(), endpoint.port()).await?;
                        let mut connects: FuturesUnordered<_> = addrs
                            .into_iter()
                            .map(tokio::net::TcpStream::connect)
                            .collect();
                        let mut last = None;
                        while let Some(result) = connects.next().await {
                            match result {
                                Ok(_) => return Ok(()),
                                Err(e) => last = Some(e),
                            }
                        }
                        Err(last.unwrap_or_else(|| {
                            std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
                        }))
                    };
                    let outcome = match tokio::time::timeout(timeout, attempt).await {
                        Ok(outcome) => outcome,
                        Err(_) => Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("no answer within {timeout:?}"),
                        )),
                    };
                    (i, outcome)
                }
            })
            .collect();
        let mut reachable = HashSet::new();
        let mut failures: Vec<(usize, std::io::Error)> = Vec::new();
        super::drain_with_grace(attempts, REACHABLE_GRACE, |(i, outcome)| match outcome {
            Ok(()) => {
                reachable.insert(i);
                true
            }
            Err(e) => {
                failures.push((i, e));
                false
            }
        })
        .await;
        if reachable.is_empty() {
            failures.sort_by_key(|(i, _)| *i);
            let first = failures.into_iter().next();
            let mut error = Error::unreachable(format!(
                "none of the {} initial nodes accepted a TCP connection within {timeout:?}{}",
                candidates.len(),
                match &first {
                    Some((i, _)) => format!(" ({} first)", candidates[*i]),
                    None => String::new(),
                }
            ))
            .with_sent(crate::Sent::No);
            if let Some((_, cause)) = first {
                error = error.with_source(cause);
            }
            self.book.outage().unreached(epoch, Some(error.clone()));
            // The next check is the gate's: a rebuild waits for it rather than for its own
            // backoff.
            return Err(self.book.outage().retry_when_due(error));
        }
        self.book.outage().reached();
        let skipped = candidates.len() - reachable.len();
        if skipped > 0 {
            tracing::debug!(
                skipped,
                "initial nodes that did not answer a TCP connect are left out"
            );
        }
        Ok(candidates
            .into_iter()
            .enumerate()
            .filter(|(i, _)| reachable.contains(i))
            .map(|(_, e)| e)
            .collect())
    }
}

impl ClusterConnector {
    /// What the first node speaks, when it is not what this connector speaks: a TLS handshake
    /// with a plaintext Redis just hangs (the server waits for a line end in the ClientHello),
    /// and a plaintext command to a TLS port is cut off — both look like network trouble. A
    /// plaintext `PING` tells them apart: a plaintext server answers in RESP, a TLS server with
    /// a TLS record. Only run after a connect failed.
    async fn transport_mismatch(&self, nodes: &[Endpoint]) -> Option<Error> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let node = nodes.first()?;
        let probe = async {
            let addr = *self
                .book
                .lookup(node.host(), node.port())
                .await
                .ok()?
                .first()?;
            let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
            stream.write_all(b"PING\r\n").await.ok()?;
            let mut reply = [0u8; 8];
            let n = stream.read(&mut reply).await.ok()?;
            Some(reply[..n].to_vec())
        };
        let bound = self.connection_timeout.min(Duration::from_millis(500));
        let reply = tokio::time::timeout(bound, probe).await.ok()??;
        let plaintext = matches!(reply.first(), Some(b'+' | b'-'));
        // A TLS record: alert (21) or handshake (22), protocol version 3.x.
        let tls_record = reply.len() >= 2 && matches!(reply[0], 21 | 22) && reply[1] == 3;
        let error = match (self.tls_config().is_some(), plaintext, tls_record) {
            (true, true, _) => Error::new(
                crate::ErrorKind::Tls,
                format!(
                    "the server at {node} did not speak TLS: it answered a plaintext PING \
                     (is {} its plaintext port? use the TLS port, or turn TLS off)",
                    node.port()
                ),
            ),
            (false, _, true) => Error::new(
                crate::ErrorKind::Tls,
                format!(
                    "the server at {node} speaks TLS only: connect with TLS (a rediss:// seed \
                     or tls(..), feature `tls`)"
                ),
            ),
            _ => return None,
        };
        Some(error.with_sent(crate::Sent::No))
    }
}

impl fmt::Debug for ClusterConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterConnector")
            .field("seeds", &self.seeds)
            .field("credentials", &self.credentials)
            .field("connection_timeout", &self.connection_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("inner_retries", &self.inner_retries)
            .field("read_from_replicas", &self.read_from_replicas)
            .field("tls", &self.tls_config())
            .finish_non_exhaustive()
    }
}

impl Connect for ClusterConnector {
    type Service = RedisService<ClusterConnection>;

    fn connect(&self, hints: &ConnectHints) -> ConnectFuture<Self::Service> {
        let this = self.clone();
        let hints = hints.clone();
        Box::pin(async move {
            this.validate()?;
            let target = describe_targets(&this.seeds, &hints);
            let mut candidates: Vec<Endpoint> = this.seeds.iter().cloned().collect();
            for extra in hints.extra_seeds {
                if !candidates.contains(&extra) {
                    candidates.push(extra);
                }
            }
            let nodes = this
                .reachable(candidates)
                .await
                .map_err(|e| e.context(format_args!("connecting to {target}")))?;
            // Static credentials go to the inner client as they are; a provider is asked by
            // each of its connections instead (never cached past one).
            let static_credentials = match this.credentials.get() {
                Some(p) if p.is_static() => this.credentials.fetch().await?,
                _ => None,
            };
            let client = this
                .builder(&nodes, static_credentials)?
                .build()
                .map_err(Error::from_redis)?;
            let connection = match client.get_async_connection().await {
                Ok(connection) => connection,
                Err(e) => {
                    let error =
                        Error::from_redis(e).context(format_args!("connecting to {target}"));
                    // A failure without a reason may be a transport mismatch, which no retry
                    // fixes: say so.
                    if error.kind().is_transient() {
                        if let Some(mismatch) = this.transport_mismatch(&nodes).await {
                            return Err(mismatch.with_source(error));
                        }
                    }
                    return Err(error);
                }
            };
            // Blocking commands get connections of their own, made like the inner client's.
            let lane = crate::service::BlockingLane {
                nodes: crate::connect::NodeConnector {
                    book: this.book.clone(),
                    credentials: this.credentials.clone(),
                    tls: this.tls_config(),
                    connection_timeout: this.connection_timeout,
                },
                margin: this.response_timeout,
            };
            Ok(RedisService::new(connection)
                .resends_internally(this.inner_retries > 0)
                .blocking_lane(lane))
        })
    }
}

/// The address of an endpoint; with TLS its host name (or IP) is what the certificate is checked
/// against.
pub(crate) fn node_addr(seed: &Endpoint, tls: bool) -> ConnectionAddr {
    if tls {
        ConnectionAddr::TcpTls {
            host: seed.host().to_string(),
            port: seed.port(),
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(seed.host().to_string(), seed.port())
    }
}

fn describe_targets(seeds: &Seeds, hints: &ConnectHints) -> String {
    let mut text = seeds
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if !hints.extra_seeds.is_empty() {
        text.push_str(&format!(
            " (+{} known node addresses)",
            hints.extra_seeds.len()
        ));
    }
    text
}
