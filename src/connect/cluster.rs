//! [`ClusterConnector`]: a fresh `redis` cluster client from the seed names, at every connect.

use std::{fmt, sync::Arc, time::Duration};

use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{ConnectionAddr, IntoConnectionInfo};

use super::{
    Connect, ConnectFuture, ConnectHints, Credentials, DnsAdapter, Resolve, Seed, Seeds,
    SystemResolver, TlsConfig,
};
use crate::{Error, RedisService};

/// Builds a `redis::cluster_async::ClusterConnection` from [`Seeds`] each time it is called.
///
/// Every call resolves the seed names again (through its [`Resolve`]) and adds the
/// [`ConnectHints::extra_seeds`] as further initial nodes. The inner client's own retries are
/// kept low — by default 2, enough to follow a `MOVED` and an `ASK` — so that the retry layer
/// above is the one policy that decides; its per-request response timeout bounds every attempt.
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
    credentials: Option<Credentials>,
    resolver: Arc<dyn Resolve>,
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
        ClusterConnector {
            credentials: seeds.credentials().cloned(),
            seeds,
            resolver: Arc::new(SystemResolver),
            connection_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_millis(500),
            inner_retries: 2,
            read_from_replicas: false,
            tls: None,
        }
    }

    /// Resolves seed names with `resolver` instead of the system's.
    pub fn resolver(mut self, resolver: impl Resolve) -> Self {
        self.resolver = Arc::new(resolver);
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
        self.credentials = Some(credentials);
        self
    }

    /// How long one TCP (and TLS) connect may take.
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
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

    /// Where a topology refresh should ask: the same seeds, resolver, credentials and
    /// connection timeout as this connector.
    pub fn topology_source(&self) -> crate::topology::TopologySource {
        crate::topology::TopologySource::new(self.seeds.clone())
            .shared_resolver(self.resolver.clone())
            .credentials(self.credentials.clone())
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

    fn builder(&self, hints: &ConnectHints) -> Result<ClusterClientBuilder, Error> {
        let mut nodes = Vec::with_capacity(self.seeds.len() + hints.extra_seeds.len());
        let tls = self.tls_config();
        for seed in self.seeds.iter().chain(hints.extra_seeds.iter()) {
            let info = node_addr(seed, tls.is_some())
                .into_connection_info()
                .map_err(Error::from_redis)?;
            nodes.push(info);
        }
        let mut builder = ClusterClientBuilder::new(nodes)
            .connection_timeout(self.connection_timeout)
            .response_timeout(self.response_timeout)
            .retries(self.inner_retries)
            // The inner client's waits between its retries: short, because the policy that
            // backs off is ours.
            .min_retry_wait(10)
            .max_retry_wait(100)
            .async_dns_resolver(DnsAdapter(self.resolver.clone()));
        if let Some(c) = &self.credentials {
            if let Some(user) = &c.username {
                builder = builder.username(user);
            }
            builder = builder.password(c.password.expose());
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
        let prepared = self
            .validate()
            .and_then(|()| self.builder(hints))
            .and_then(|b| b.build().map_err(Error::from_redis));
        let target = describe_targets(&self.seeds, hints);
        let resends = self.inner_retries > 0;
        Box::pin(async move {
            let client = prepared?;
            let connection = client.get_async_connection().await.map_err(|e| {
                Error::from_redis(e).context(format_args!("connecting to {target}"))
            })?;
            Ok(RedisService::new(connection).resends_internally(resends))
        })
    }
}

/// The address of a seed; with TLS the host name (or IP) is what the certificate is checked
/// against.
pub(crate) fn node_addr(seed: &Seed, tls: bool) -> ConnectionAddr {
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
