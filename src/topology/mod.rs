//! Keep an up-to-date picture of the cluster, and act on it.
//!
//! [`TopologyRefresh`] watches every reply that passes through it. A `MOVED`/`ASK`, a connection
//! error, `CLUSTERDOWN` or `READONLY` — or a periodic timer, so an idle client notices a failover
//! before its first command fails — asks for a refresh. Refreshes are **coalesced** (one in
//! flight; the triggers during it lead to at most one follow-up) and **rate-limited** (a minimum
//! interval, with jitter so a fleet of clients does not refresh in lock-step).
//!
//! A refresh opens **fresh** connections to the seeds, **resolved again now**, and to every node
//! of the last snapshot, **replicas included**; reads `CLUSTER SHARDS` (`CLUSTER SLOTS` on servers
//! before 7.0); and keeps the view most answering nodes agree on, so a node cut off from its
//! peers cannot impose its stale view. The result is published as a [`TopologySnapshot`] on a
//! `tokio::sync::watch` channel ([`TopologyHandle::subscribe`]).
//!
//! With a [`RebuildHandle`], every snapshot's node addresses become the rebuild layer's *known
//! nodes*: a rebuild can reach the cluster even when the seed name still points at nodes that
//! are gone. And when a snapshot shows none of the nodes the inner client was made with, the
//! inner client cannot follow by itself, so a rebuild is requested.
//!
//! ```no_run
//! use tower::ServiceBuilder;
//! use tower_redis_cluster::{
//!     rebuild::{Rebuild, RebuildConfig},
//!     topology::{RefreshConfig, TopologyRefreshLayer},
//!     ClusterConnector, Seeds,
//! };
//!
//! # async fn run() -> Result<(), tower_redis_cluster::Error> {
//! let connector = ClusterConnector::new(Seeds::parse(["clustercfg.example.com:6379"])?);
//! let source = connector.topology_source();
//! let rebuild = Rebuild::new(connector, RebuildConfig::default());
//! let service = ServiceBuilder::new()
//!     .layer(TopologyRefreshLayer::new(source, RefreshConfig::default()).rebuild_handle(rebuild.handle()))
//!     .service(rebuild);
//! let mut snapshots = service.handle().subscribe();
//! tokio::spawn(async move {
//!     while snapshots.changed().await.is_ok() {
//!         if let Some(s) = snapshots.borrow().clone() {
//!             println!("masters now: {:?}", s.masters());
//!         }
//!     }
//! });
//! # Ok(()) }
//! ```

mod config;
pub(crate) mod fetch;
pub(crate) mod refresher;
mod snapshot;
#[cfg(test)]
mod tests;

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
    time::Duration,
};

use pin_project_lite::pin_project;
use tokio::sync::watch;
use tower::{Layer, Service};

pub use config::RefreshConfig;
pub use fetch::{TopologySource, DEFAULT_MAX_PROBES};
pub use snapshot::{NodeHealth, NodeRole, Shard, TopologyChange, TopologyNode, TopologySnapshot};

use refresher::Refresher;

use crate::{rebuild::RebuildHandle, Error};

/// Feeds `bytes`, parsed as RESP, to both topology parsers (the fuzz target's entry point).
#[cfg(any(fuzzing, test))]
pub(crate) fn fuzz_replies(bytes: &[u8]) {
    let Ok(value) = redis::parse_redis_value(bytes) else {
        return;
    };
    for tls in [false, true] {
        let asked = snapshot::Asked {
            endpoint: "127.0.0.1:7000".parse().expect("a valid endpoint"),
            ip: Some(std::net::Ipv4Addr::LOCALHOST.into()),
            tls,
        };
        let _ = snapshot::parse_cluster_shards(&value, &asked);
        let _ = snapshot::parse_cluster_slots(&value, &asked);
    }
}

/// Counters of a refresher, for tests and metrics.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct RefreshStats {
    /// Refreshes run (successful or not).
    pub refreshes: u64,
    /// Refreshes that reached no node.
    pub failures: u64,
    /// Snapshots published (the topology changed, or the first one).
    pub published: u64,
    /// Triggers received from calls (most are coalesced).
    pub triggers: u64,
    /// The error of the last refresh, if it failed.
    pub last_error: Option<Error>,
}

/// Makes a [`TopologyRefresh`] around a service.
#[derive(Clone, Debug)]
pub struct TopologyRefreshLayer {
    source: TopologySource,
    config: RefreshConfig,
    rebuild: Option<RebuildHandle>,
}

impl TopologyRefreshLayer {
    /// Refreshes from `source` (usually [`ClusterConnector::topology_source`](crate::ClusterConnector::topology_source)).
    pub fn new(source: TopologySource, config: RefreshConfig) -> Self {
        TopologyRefreshLayer {
            source,
            config,
            rebuild: None,
        }
    }

    /// Feeds snapshots to a rebuild layer (known nodes, rebuild when the inner client cannot
    /// follow).
    pub fn rebuild_handle(mut self, handle: RebuildHandle) -> Self {
        self.rebuild = Some(handle);
        self
    }
}

impl<S> Layer<S> for TopologyRefreshLayer {
    type Service = TopologyRefresh<S>;

    fn layer(&self, inner: S) -> TopologyRefresh<S> {
        TopologyRefresh::new(
            inner,
            self.source.clone(),
            self.config.clone(),
            self.rebuild.clone(),
        )
    }
}

/// Observes replies of the inner service and keeps a topology snapshot up to date.
pub struct TopologyRefresh<S> {
    inner: S,
    refresher: Arc<Refresher>,
}

impl<S> TopologyRefresh<S> {
    /// Wraps `inner`. The refresh task starts at once when called inside a tokio runtime,
    /// otherwise on the first call. Invalid configuration is reported by every call.
    pub fn new(
        inner: S,
        source: TopologySource,
        config: RefreshConfig,
        rebuild: Option<RebuildHandle>,
    ) -> Self {
        TopologyRefresh::with_fetcher(inner, Arc::new(source), config, rebuild)
    }

    pub(crate) fn with_fetcher(
        inner: S,
        source: Arc<dyn fetch::FetchTopology>,
        config: RefreshConfig,
        rebuild: Option<RebuildHandle>,
    ) -> Self {
        let refresher = Refresher::new(source, config, rebuild);
        if refresher.invalid.is_none() {
            refresher.ensure_started();
        }
        TopologyRefresh { inner, refresher }
    }

    /// A handle to trigger refreshes and watch snapshots.
    pub fn handle(&self) -> TopologyHandle {
        TopologyHandle {
            refresher: self.refresher.clone(),
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone> Clone for TopologyRefresh<S> {
    fn clone(&self) -> Self {
        TopologyRefresh {
            inner: self.inner.clone(),
            refresher: self.refresher.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for TopologyRefresh<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TopologyRefresh")
            .field("inner", &self.inner)
            .field("stats", &*self.refresher.stats.borrow())
            .finish()
    }
}

impl<S, Req> Service<Req> for TopologyRefresh<S>
where
    S: Service<Req, Error = Error>,
{
    type Response = S::Response;
    type Error = Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if self.refresher.invalid.is_some() {
            return Poll::Ready(Ok(()));
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        if let Some(error) = &self.refresher.invalid {
            return ResponseFuture {
                inner: None,
                error: Some(error.clone()),
                refresher: self.refresher.clone(),
            };
        }
        self.refresher.ensure_started();
        ResponseFuture {
            inner: Some(self.inner.call(request)),
            error: None,
            refresher: self.refresher.clone(),
        }
    }
}

pin_project! {
    /// Passes the inner result through, asking for a refresh on topology-related errors.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: Option<F>,
        error: Option<Error>,
        refresher: Arc<Refresher>,
    }
}

impl<F, T> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, Error>>,
{
    type Output = Result<T, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            return Poll::Ready(Err(this.error.take().unwrap_or_else(|| {
                Error::closed("response future polled after completion")
            })));
        };
        let result = ready!(inner.poll(cx));
        if let Err(e) = &result {
            if this.refresher.config.triggers_on(e.kind()) {
                this.refresher.trigger();
            }
        }
        Poll::Ready(result)
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

/// Triggers refreshes and watches snapshots.
#[derive(Clone)]
pub struct TopologyHandle {
    refresher: Arc<Refresher>,
}

impl TopologyHandle {
    /// Asks for a refresh (coalesced and rate-limited like any other trigger).
    pub fn refresh(&self) {
        self.refresher.ensure_started();
        self.refresher.trigger();
    }

    /// Asks for a refresh and waits, at most `timeout`, until one has completed.
    pub async fn refresh_and_wait(&self, timeout: Duration) -> Result<RefreshStats, Error> {
        let mut stats = self.refresher.stats.subscribe();
        let before = stats.borrow_and_update().refreshes;
        self.refresh();
        let waited = tokio::time::timeout(timeout, async {
            stats
                .wait_for(|s| s.refreshes > before)
                .await
                .map(|s| s.clone())
        })
        .await;
        match waited {
            Ok(Ok(s)) => match &s.last_error {
                Some(e) => Err(e.clone()),
                None => Ok(s),
            },
            Ok(Err(_)) => Err(Error::closed("the topology refresher is gone")),
            Err(_) => Err(Error::timeout(format!(
                "no topology refresh completed within {timeout:?}"
            ))),
        }
    }

    /// The latest snapshot, if one was taken.
    pub fn current(&self) -> Option<Arc<TopologySnapshot>> {
        self.refresher.snapshot.borrow().clone()
    }

    /// A receiver that sees every published snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<TopologySnapshot>>> {
        self.refresher.snapshot.subscribe()
    }

    /// Counters.
    pub fn stats(&self) -> RefreshStats {
        self.refresher.stats.borrow().clone()
    }

    /// A receiver that sees every refresh's counters.
    pub fn subscribe_stats(&self) -> watch::Receiver<RefreshStats> {
        self.refresher.stats.subscribe()
    }
}

impl fmt::Debug for TopologyHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TopologyHandle")
            .field("stats", &*self.refresher.stats.borrow())
            .finish()
    }
}
