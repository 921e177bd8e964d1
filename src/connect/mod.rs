//! Making inner clients: seeds, name resolution, and the [`Connect`] trait.
//!
//! The rebuild layer never keeps addresses; it keeps a [`Connect`] — something that can make a
//! new inner service from the configured seed *names* whenever it is asked. The default is
//! [`ClusterConnector`], which builds a fresh `redis` cluster client each time.

mod address_book;
mod cluster;
mod credentials;
mod node;
pub(crate) mod outage;
mod resolve;
mod seeds;
mod tls;

use std::{fmt, future::Future, pin::Pin, sync::Arc};

pub(crate) use address_book::AddressBook;
pub(crate) use cluster::node_addr as cluster_node_addr;
pub use cluster::ClusterConnector;
pub use credentials::{
    credentials_fn, Credentials, CredentialsFn, CredentialsFuture, CredentialsProvider, Secret,
};
pub(crate) use credentials::{CredentialSource, PerConnection};
pub(crate) use node::NodeConnector;
pub use resolve::{DnsAdapter, PinnedResolver};
pub use resolve::{Resolve, ResolveFuture, StaticResolver, SystemResolver};
pub(crate) use seeds::redact_userinfo;
pub use seeds::{Endpoint, Seeds, DEFAULT_PORT};
pub use tls::TlsConfig;

use crate::Error;

/// What a connect is asked to do beyond the configured seeds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectHints {
    /// The generation the new service will have (1 for the first connect).
    pub generation: u64,
    /// Extra entry points for this connect only: addresses the previous client (or a topology
    /// refresh) last saw, replicas included. They help when the seed name still points at
    /// nodes that are gone; they never replace the configured seeds.
    pub extra_seeds: Vec<Endpoint>,
}

impl ConnectHints {
    /// Hints for the given generation, with no extra seeds.
    pub fn new(generation: u64) -> Self {
        ConnectHints {
            generation,
            extra_seeds: Vec::new(),
        }
    }

    /// Adds extra seeds.
    pub fn with_extra_seeds(mut self, extra: impl IntoIterator<Item = Endpoint>) -> Self {
        for seed in extra {
            if !self.extra_seeds.contains(&seed) {
                self.extra_seeds.push(seed);
            }
        }
        self
    }
}

/// Takes the results of probes of many addresses, some of which may swallow packets, as they
/// come: `each` is told every result and says whether it was an answer; `grace` (plus the time
/// the first answer took) after the first answer, the rest are given up. Returns whether any
/// were given up.
pub(crate) async fn drain_with_grace<S, T>(
    mut results: S,
    grace: std::time::Duration,
    mut each: impl FnMut(T) -> bool,
) -> bool
where
    S: futures_util::Stream<Item = T> + Unpin,
{
    use futures_util::StreamExt;
    let started = tokio::time::Instant::now();
    let mut grace_ends = None;
    loop {
        let next = match grace_ends {
            None => results.next().await,
            Some(at) => match tokio::time::timeout_at(at, results.next()).await {
                Ok(next) => next,
                Err(_) => return true,
            },
        };
        let Some(result) = next else { return false };
        if each(result) && grace_ends.is_none() {
            grace_ends = Some(tokio::time::Instant::now() + started.elapsed() + grace);
        }
    }
}

/// The future returned by [`Connect::connect`].
pub type ConnectFuture<S> = Pin<Box<dyn Future<Output = Result<S, Error>> + Send + 'static>>;

/// Makes a new inner service — the shape of tower's `MakeService`, without a target.
///
/// Called for the first connect and for every rebuild; each call must resolve names afresh.
pub trait Connect: Send + Sync + 'static {
    /// The service made, e.g. [`RedisService`](crate::RedisService) over a cluster connection.
    type Service;

    /// Makes one. The future must end on its own (use connection timeouts).
    fn connect(&self, hints: &ConnectHints) -> ConnectFuture<Self::Service>;
}

/// A [`Connect`] from a closure — handy in tests and for custom clients.
///
/// ```
/// use tower_redis_cluster::connect::{connect_fn, ConnectHints};
///
/// let connector = connect_fn(|hints: &ConnectHints| {
///     let generation = hints.generation;
///     async move { Ok::<_, tower_redis_cluster::Error>(generation) }
/// });
/// # let _ = connector;
/// ```
pub fn connect_fn<F, Fut, S>(f: F) -> ConnectFn<F>
where
    F: Fn(&ConnectHints) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<S, Error>> + Send + 'static,
{
    ConnectFn { f }
}

/// The [`Connect`] made by [`connect_fn`].
#[derive(Clone)]
pub struct ConnectFn<F> {
    f: F,
}

impl<F> fmt::Debug for ConnectFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectFn").finish_non_exhaustive()
    }
}

impl<F, Fut, S> Connect for ConnectFn<F>
where
    F: Fn(&ConnectHints) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<S, Error>> + Send + 'static,
{
    type Service = S;

    fn connect(&self, hints: &ConnectHints) -> ConnectFuture<S> {
        Box::pin((self.f)(hints))
    }
}

/// Any [`Connect`] behind one nameable type, for a [`Client`](crate::Client) built over a
/// connector of your own that must be stored — in a struct, in axum state — without naming a
/// closure's type: `Client<BoxConnect<RedisService<ConnectionManager>>>`.
///
/// ```no_run
/// use tower_redis_cluster::{
///     connect::{connect_fn, BoxConnect},
///     redis::{self, aio::ConnectionManager},
///     Client, Error, RedisService,
/// };
///
/// struct AppState {
///     redis: Client<BoxConnect<RedisService<ConnectionManager>>>,
/// }
///
/// # async fn run() -> Result<AppState, Error> {
/// let primary = BoxConnect::new(connect_fn(|_hints: &_| async {
///     let client = redis::Client::open("redis://primary.my-group.example.com:6379")?;
///     Ok(RedisService::new(ConnectionManager::new(client).await?))
/// }));
/// Ok(AppState { redis: Client::builder().build_with(primary).await? })
/// # }
/// ```
pub struct BoxConnect<S>(Arc<dyn Connect<Service = S>>);

impl<S> BoxConnect<S> {
    /// Boxes `connector`.
    pub fn new(connector: impl Connect<Service = S>) -> Self {
        BoxConnect(Arc::new(connector))
    }
}

impl<S> Clone for BoxConnect<S> {
    fn clone(&self) -> Self {
        BoxConnect(self.0.clone())
    }
}

impl<S> fmt::Debug for BoxConnect<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoxConnect").finish_non_exhaustive()
    }
}

impl<S: 'static> Connect for BoxConnect<S> {
    type Service = S;

    fn connect(&self, hints: &ConnectHints) -> ConnectFuture<S> {
        self.0.connect(hints)
    }
}
