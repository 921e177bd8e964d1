//! Name resolution, done afresh at every connect.
//!
//! A managed cluster's configuration endpoint is a DNS name whose records follow the live
//! nodes. Resolving it once and keeping the IPs is the redis-py #2472 failure; here every
//! connect and rebuild asks a [`Resolve`] again. The same resolver is handed to the `redis`
//! crate (as its `AsyncDNSResolver`) so the connection keeps the *name* — which TLS needs for
//! server-name verification.

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, RwLock},
};

/// The future returned by [`Resolve::resolve`].
pub type ResolveFuture<'a> = Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>>;

/// Turns a host name and port into socket addresses.
///
/// Implement it to plug in service discovery; [`SystemResolver`] uses the operating system,
/// [`StaticResolver`] an in-memory map.
pub trait Resolve: Send + Sync + 'static {
    /// Resolves `host` (never an IP literal: those are not passed to a resolver) and `port`.
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> ResolveFuture<'a>;
}

impl<R: Resolve + ?Sized> Resolve for Arc<R> {
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> ResolveFuture<'a> {
        (**self).resolve(host, port)
    }
}

/// The operating system's resolver (`getaddrinfo` through tokio).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> ResolveFuture<'a> {
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
            Ok(addrs)
        })
    }
}

/// An in-memory name → addresses map, shared by its clones and changeable at any time.
///
/// For tests, and for users whose service discovery is not DNS. A name that is not in the map
/// fails to resolve with `NotFound` (unless a fallback resolver is set).
#[derive(Clone, Default)]
pub struct StaticResolver {
    names: Arc<RwLock<HashMap<String, Vec<SocketAddr>>>>,
    fallback: Option<Arc<dyn Resolve>>,
}

impl StaticResolver {
    /// An empty map.
    pub fn new() -> Self {
        StaticResolver::default()
    }

    /// Sets (or replaces) the addresses of a name. Ports of the addresses are used as given.
    pub fn set(&self, name: impl Into<String>, addrs: impl IntoIterator<Item = SocketAddr>) {
        let mut names = self.names.write().unwrap_or_else(|p| p.into_inner());
        names.insert(name.into(), addrs.into_iter().collect());
    }

    /// Builder form of [`StaticResolver::set`].
    pub fn with(
        self,
        name: impl Into<String>,
        addrs: impl IntoIterator<Item = SocketAddr>,
    ) -> Self {
        self.set(name, addrs);
        self
    }

    /// Removes a name.
    pub fn remove(&self, name: &str) {
        let mut names = self.names.write().unwrap_or_else(|p| p.into_inner());
        names.remove(name);
    }

    /// Resolves names missing from the map with `fallback`.
    pub fn with_fallback(mut self, fallback: impl Resolve) -> Self {
        self.fallback = Some(Arc::new(fallback));
        self
    }
}

impl fmt::Debug for StaticResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = self.names.read().unwrap_or_else(|p| p.into_inner());
        f.debug_struct("StaticResolver")
            .field("names", &*names)
            .field("fallback", &self.fallback.is_some())
            .finish()
    }
}

impl Resolve for StaticResolver {
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> ResolveFuture<'a> {
        let found = {
            let names = self.names.read().unwrap_or_else(|p| p.into_inner());
            names.get(host).cloned()
        };
        match (found, &self.fallback) {
            (Some(addrs), _) => Box::pin(async move { Ok(addrs) }),
            (None, Some(fallback)) => fallback.resolve(host, port),
            (None, None) => Box::pin(async move {
                Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("name {host:?} is not in the resolver's map"),
                ))
            }),
        }
    }
}

/// The harness's name map is the tests' DNS: its configuration endpoint follows the live nodes
/// (or stays stale when frozen). Like DNS, it answers with IPs; the port is the one asked for.
#[cfg(feature = "test-util")]
impl Resolve for crate::harness::NameMap {
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> ResolveFuture<'a> {
        let addrs: Vec<SocketAddr> = self
            .lookup(host)
            .into_iter()
            .map(|a| SocketAddr::new(a.ip(), port))
            .collect();
        Box::pin(async move {
            if addrs.is_empty() {
                Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("name {host:?} is not in the harness name map"),
                ))
            } else {
                Ok(addrs)
            }
        })
    }
}

/// Any [`Resolve`] as the `redis` crate's resolver, passing IP literals through — for a client
/// of the redis crate used directly.
///
/// ```no_run
/// use tower_redis_cluster::connect::{DnsAdapter, StaticResolver};
///
/// let names = StaticResolver::new().with("cfg.test", ["127.0.0.2:7000".parse().unwrap()]);
/// let client = redis::cluster::ClusterClientBuilder::new(vec!["redis://cfg.test:7000"])
///     .async_dns_resolver(DnsAdapter(names))
///     .build();
/// ```
#[derive(Clone, Debug)]
pub struct DnsAdapter<R>(pub R);

impl<R: Resolve> redis::io::AsyncDNSResolver for DnsAdapter<R> {
    fn resolve<'a, 'b: 'a>(
        &'a self,
        host: &'b str,
        port: u16,
    ) -> redis::RedisFuture<'a, Box<dyn Iterator<Item = SocketAddr> + Send + 'a>> {
        Box::pin(async move {
            let addrs = resolve_for_redis(&self.0, host, port).await?;
            Ok(Box::new(addrs.into_iter()) as Box<dyn Iterator<Item = SocketAddr> + Send>)
        })
    }
}

/// What `resolver` answers for `host` as the redis crate's resolver would: IP literals as they
/// are, an empty answer as `NotFound`, errors naming what was resolved.
pub(crate) async fn resolve_for_redis<R: Resolve + ?Sized>(
    resolver: &R,
    host: &str,
    port: u16,
) -> io::Result<Vec<SocketAddr>> {
    let literal = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>();
    if let Ok(ip) = literal {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let addrs = resolver
        .resolve(host, port)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("resolving {host}:{port}: {e}")))?;
    tracing::debug!(host, port, ?addrs, "resolved seed name");
    if addrs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("resolving {host}:{port}: the name has no addresses"),
        ));
    }
    Ok(addrs)
}

/// The redis crate's resolver for a connection to one known IP: the connection keeps the
/// *name* it was given — TLS verifies against it — while going to exactly this IP (on the port
/// asked for). How topology probes reach each address behind a configuration endpoint, and
/// how to reach one node of a cluster whose certificates name DNS names only.
///
/// ```no_run
/// use tower_redis_cluster::connect::PinnedResolver;
///
/// # async fn run() -> redis::RedisResult<()> {
/// // The node at 10.0.3.7, verified as the configuration endpoint's name.
/// let client = redis::Client::open("rediss://clustercfg.my-cluster.example.com:6379")?;
/// let config = redis::AsyncConnectionConfig::new()
///     .set_dns_resolver(PinnedResolver("10.0.3.7".parse().unwrap()));
/// let mut node = client.get_multiplexed_async_connection_with_config(&config).await?;
/// let _: String = redis::cmd("CLUSTER").arg("MYID").query_async(&mut node).await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinnedResolver(pub IpAddr);

impl redis::io::AsyncDNSResolver for PinnedResolver {
    fn resolve<'a, 'b: 'a>(
        &'a self,
        _host: &'b str,
        port: u16,
    ) -> redis::RedisFuture<'a, Box<dyn Iterator<Item = SocketAddr> + Send + 'a>> {
        let addr = SocketAddr::new(self.0, port);
        Box::pin(async move {
            Ok(Box::new(std::iter::once(addr)) as Box<dyn Iterator<Item = SocketAddr> + Send>)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::io::AsyncDNSResolver;

    #[tokio::test]
    async fn static_map_changes_are_seen_by_the_next_lookup() {
        let r = StaticResolver::new();
        let a: SocketAddr = "127.0.0.2:7000".parse().unwrap();
        let b: SocketAddr = "127.0.0.3:7000".parse().unwrap();
        r.set("cfg.test", [a]);
        assert_eq!(r.resolve("cfg.test", 7000).await.unwrap(), vec![a]);
        r.clone().set("cfg.test", [b]);
        assert_eq!(r.resolve("cfg.test", 7000).await.unwrap(), vec![b]);
        let missing = r.resolve("other.test", 1).await.unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    }

    #[tokio::test]
    async fn fallback_resolves_unknown_names() {
        let inner = StaticResolver::new().with("b.test", ["127.0.0.9:1".parse().unwrap()]);
        let r = StaticResolver::new().with_fallback(inner);
        assert_eq!(r.resolve("b.test", 1).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn adapter_passes_ip_literals_and_names_the_host_on_failure() {
        let adapter = DnsAdapter(StaticResolver::new());
        let ips: Vec<_> = adapter.resolve("127.0.0.5", 7001).await.unwrap().collect();
        assert_eq!(ips, vec!["127.0.0.5:7001".parse::<SocketAddr>().unwrap()]);
        let v6: Vec<_> = adapter.resolve("::1", 7001).await.unwrap().collect();
        assert_eq!(v6.len(), 1);
        let err = match adapter.resolve("gone.test", 7001).await {
            Ok(_) => panic!("an unknown name resolved"),
            Err(e) => e,
        };
        assert!(err.to_string().contains("gone.test:7001"), "{err}");
    }
}
