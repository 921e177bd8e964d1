//! Recreate the inner client from its seed *names* when it can no longer serve.
//!
//! This is the redis-py #2472 workaround — "catch the error and recreate the client" — made a
//! policy: after two failovers that replace nodes at new IPs, none of the addresses a client
//! learned at start-up exist, and only a client made anew from the configuration endpoint's
//! name can reach the cluster.
//!
//! [`Rebuild`] owns the current inner service and its *generation*. All clones share it:
//!
//! * a [`RebuildPolicy`] reads every error (default: `Unreachable`, or a streak of
//!   connection/timeout errors) and may ask for a new client;
//! * **single-flight**: one rebuild at a time; errors from an older generation never start
//!   another; failed connects back off with full jitter;
//! * **make-before-break**: the old client keeps serving while the new one connects, unless
//!   the policy said it cannot (`Replace`);
//! * **bounded waiting**: while no client can serve, `poll_ready` is pending for at most
//!   `max_wait`, then the call fails with `Unreachable` (carrying the last connect error);
//! * **lazy start**: making the service never fails because the cluster is down;
//! * a [`RebuildHandle`] triggers rebuilds (with extra seeds) and observes generations.
//!
//! ```no_run
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use tower_redis_cluster::{
//!     connect::{ClusterConnector, Seeds},
//!     rebuild::{RebuildConfig, RebuildLayer},
//! };
//!
//! # async fn run() -> Result<(), tower_redis_cluster::Error> {
//! let connector = ClusterConnector::new(Seeds::parse(["clustercfg.example.com:6379"])?);
//! let mut service = ServiceBuilder::new()
//!     .layer(RebuildLayer::new(RebuildConfig::default()))
//!     .service(connector);
//! let handle = service.handle();
//!
//! let reply = ServiceExt::<redis::Cmd>::ready(&mut service)
//!     .await?
//!     .call(redis::cmd("PING"))
//!     .await?;
//! println!("{reply:?} from client generation {}", handle.generation());
//! # Ok(()) }
//! ```

mod config;
mod future;
mod policy;
mod shared;

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::sync::watch;
use tower::{Layer, Service};

pub use config::RebuildConfig;
pub use future::ResponseFuture;
pub use policy::{DefaultRebuildPolicy, ManualRebuildPolicy, RebuildAction, RebuildPolicy};

use shared::{Reason, Shared};

use crate::{
    connect::{Connect, Endpoint},
    Error, ErrorKind,
};

/// A snapshot of the rebuild state, as seen by a [`RebuildHandle`].
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct RebuildStatus {
    /// Generation of the current inner client; 0 until the first connect succeeds.
    pub generation: u64,
    /// Whether a rebuild is in flight.
    pub rebuilding: bool,
    /// Whether the current client serves calls (false before the first connect and after the
    /// policy retired it).
    pub serving: bool,
    /// Connect attempts made so far, successful or not.
    pub attempts: u64,
    /// Successful connects so far (the first connect included).
    pub rebuilds: u64,
    /// The last connect failure of the rebuild in flight, if any.
    pub last_error: Option<Error>,
    /// When the current client was installed.
    pub last_rebuild: Option<std::time::Instant>,
}

/// Makes a [`Rebuild`] from a [`Connect`].
#[derive(Clone, Debug, Default)]
pub struct RebuildLayer {
    config: RebuildConfig,
}

impl RebuildLayer {
    /// A layer with this configuration.
    pub fn new(config: RebuildConfig) -> Self {
        RebuildLayer { config }
    }
}

impl<C> Layer<C> for RebuildLayer
where
    C: Connect,
    C::Service: Send + Sync + 'static,
{
    type Service = Rebuild<C>;

    fn layer(&self, connector: C) -> Rebuild<C> {
        Rebuild::new(connector, self.config.clone())
    }
}

/// A service whose inner client is made by a [`Connect`] and remade when it cannot serve.
pub struct Rebuild<C: Connect> {
    shared: Arc<Shared<C>>,
    /// The serving inner service this clone last saw; checked against the shared slot's
    /// version (one atomic load) at every `poll_ready`.
    current: Option<Current<C::Service>>,
    /// Whether `current` was made ready for the next call.
    reserved: bool,
    /// Set when waiting for a client timed out: the next call fails with it.
    failed: Option<Error>,
    /// Boxed: only a clone that waits for a client needs it.
    waiting: Option<Box<Waiting>>,
}

struct Current<S> {
    service: S,
    generation: u64,
    /// The slot version this was read at.
    version: u64,
}

impl<S: Clone> Clone for Current<S> {
    fn clone(&self) -> Self {
        Current {
            service: self.service.clone(),
            generation: self.generation,
            version: self.version,
        }
    }
}

struct Waiting {
    deadline: Pin<Box<tokio::time::Sleep>>,
    changed: Option<Pin<Box<dyn Future<Output = ()> + Send + Sync>>>,
}

impl<C> Rebuild<C>
where
    C: Connect,
    C::Service: Send + Sync + 'static,
{
    /// A service that connects with `connector`. Never fails: when the cluster cannot be
    /// reached yet, calls wait (bounded) and the first successful connect serves them. Invalid
    /// configuration is reported by the first call.
    pub fn new(connector: C, config: RebuildConfig) -> Self {
        let eager = config.eager;
        let shared = Shared::new(connector, config);
        if eager && shared.invalid.is_none() {
            shared.request(RebuildAction::Replace, None, Vec::new(), Reason::Start);
        }
        Rebuild {
            shared,
            current: None,
            reserved: false,
            failed: None,
            waiting: None,
        }
    }

    /// A handle to trigger rebuilds and observe generations.
    pub fn handle(&self) -> RebuildHandle {
        RebuildHandle {
            control: self.shared.clone(),
            status: self.shared.status_receiver(),
        }
    }

    /// The connector.
    pub fn get_ref(&self) -> &C {
        self.shared.connector()
    }

    fn max_wait(&self) -> Duration {
        self.shared.config.max_wait
    }
}

impl<C> Clone for Rebuild<C>
where
    C: Connect,
    C::Service: Clone,
{
    fn clone(&self) -> Self {
        // Readiness is per clone: a clone starts unreserved (tower's rule for `Clone`). The
        // cached service comes along, so a fresh clone is ready without reading the slot.
        Rebuild {
            shared: self.shared.clone(),
            current: self.current.clone(),
            reserved: false,
            failed: None,
            waiting: None,
        }
    }
}

impl<C: Connect> fmt::Debug for Rebuild<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rebuild")
            .field("shared", &self.shared)
            .field("generation", &self.current.as_ref().map(|c| c.generation))
            .field("reserved", &self.reserved)
            .finish_non_exhaustive()
    }
}

impl<C, Req> Service<Req> for Rebuild<C>
where
    C: Connect,
    C::Service: Service<Req, Error = Error> + Clone + Send + Sync + 'static,
{
    type Response = <C::Service as Service<Req>>::Response;
    type Error = Error;
    type Future = ResponseFuture<<C::Service as Service<Req>>::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        loop {
            // The common case first: the client this clone saw still serves.
            if let Some(current) = &mut self.current {
                // A reservation stands even if the slot changed since: tower's contract.
                if self.reserved || current.version == self.shared.slot_version() {
                    let ready = current.service.poll_ready(cx);
                    self.reserved = matches!(ready, Poll::Ready(Ok(())));
                    return ready;
                }
                self.current = None;
            }
            if self.failed.is_some() {
                // The call reports the failure; readiness errors would be fatal to tower.
                return Poll::Ready(Ok(()));
            }
            if let Some(invalid) = &self.shared.invalid {
                self.failed = Some(invalid.clone());
                continue;
            }
            {
                // The version first: a change after this read bumps it again.
                let version = self.shared.slot_version();
                if let Some(serving) = &*self.shared.serving.load() {
                    self.current = Some(Current {
                        service: serving.service.clone(),
                        generation: serving.generation,
                        version,
                    });
                    self.waiting = None;
                    continue;
                }
            }
            // Subscribed first, then looked at: a change before the subscription is seen by the
            // checks below, a later one wakes the wait. (Looking first could miss a failure
            // recorded in between, and wait all of max_wait for it.)
            let max_wait = self.max_wait();
            let waiting = self.waiting.get_or_insert_with(|| {
                Box::new(Waiting {
                    deadline: Box::pin(tokio::time::sleep(max_wait)),
                    changed: None,
                })
            });
            if waiting.changed.is_none() {
                let mut slot = self.shared.slot.subscribe();
                slot.borrow_and_update();
                // A failed connect changes only the status: waking on it lets a non-transient
                // failure (below) reach the caller at once.
                let mut status = self.shared.status_receiver();
                status.borrow_and_update();
                waiting.changed = Some(Box::pin(async move {
                    let ended = tokio::select! {
                        r = slot.changed() => r.is_err(),
                        r = status.changed() => r.is_err(),
                    };
                    // Every sender is gone; the deadline still ends the wait.
                    if ended {
                        std::future::pending::<()>().await;
                    }
                }));
                if self.shared.slot.borrow().serving {
                    continue;
                }
            }
            // A connect that failed for a reason that does not pass by itself (wrong password,
            // untrusted certificate, bad configuration) is reported at once rather than after
            // max_wait; the rebuild keeps trying in the background in case it gets fixed.
            if let Some(cause) = self
                .shared
                .last_error()
                .filter(|e| !e.kind().is_transient())
            {
                self.waiting = None;
                self.failed = Some(cause);
                return Poll::Ready(Ok(()));
            }
            // No client can serve: make sure one is being made (lazy start, or a retired
            // client whose rebuild was asked for outside a runtime), then wait, bounded.
            if !self.shared.is_rebuilding() {
                let generation = self.shared.generation();
                self.shared.request(
                    RebuildAction::Replace,
                    Some(generation),
                    Vec::new(),
                    Reason::Start,
                );
            }
            let Some(waiting) = self.waiting.as_mut() else {
                continue;
            };
            let changed = waiting.changed.as_mut().expect("made above");
            if changed.as_mut().poll(cx).is_ready() {
                waiting.changed = None;
                continue;
            }
            if waiting.deadline.as_mut().poll(cx).is_ready() {
                self.waiting = None;
                let mut error = Error::unreachable(format!(
                    "no inner client could serve within max_wait ({max_wait:?}); a rebuild is in progress"
                ));
                if let Some(cause) = self.shared.last_error() {
                    error = error.with_source(cause);
                }
                self.failed = Some(error);
                return Poll::Ready(Ok(()));
            }
            return Poll::Pending;
        }
    }

    fn call(&mut self, request: Req) -> Self::Future {
        if let Some(error) = self.failed.take() {
            return ResponseFuture::failed(error);
        }
        match &mut self.current {
            Some(current) if self.reserved => {
                self.reserved = false;
                // The call's span (the retry layer's, when it is there) says which inner
                // client served it.
                if tracing::enabled!(tracing::Level::DEBUG) {
                    tracing::Span::current().record("generation", current.generation);
                }
                let told = self.shared.failures_told();
                let inner = current.service.call(request);
                ResponseFuture::called(inner, self.shared.clone(), current.generation, told)
            }
            _ => ResponseFuture::failed(Error::new(
                ErrorKind::Closed,
                "Rebuild::call was invoked without a successful poll_ready",
            )),
        }
    }
}

/// Object-safe view of the shared state, so handles do not carry the connector's type.
trait Control: Send + Sync {
    fn trigger(self: Arc<Self>, action: RebuildAction, extra_seeds: Vec<Endpoint>);
    fn set_known_nodes(&self, nodes: Vec<Endpoint>);
}

impl<C> Control for Shared<C>
where
    C: Connect,
    C::Service: Send + Sync + 'static,
{
    fn trigger(self: Arc<Self>, action: RebuildAction, extra_seeds: Vec<Endpoint>) {
        Shared::request(&self, action, None, extra_seeds, Reason::Handle);
    }

    fn set_known_nodes(&self, nodes: Vec<Endpoint>) {
        Shared::set_known_nodes(self, nodes);
    }
}

/// Triggers rebuilds and observes generations; cheap to clone, shareable across tasks.
#[derive(Clone)]
pub struct RebuildHandle {
    control: Arc<dyn Control>,
    status: watch::Receiver<RebuildStatus>,
}

impl RebuildHandle {
    /// Rebuilds, keeping the current client serving until the new one is ready.
    pub fn rebuild(&self) {
        self.control
            .clone()
            .trigger(RebuildAction::Rebuild, Vec::new());
    }

    /// Rebuilds with extra entry points — for example every node address the last topology
    /// showed, replicas included — for when the seed names point only at dead nodes.
    pub fn rebuild_with_seeds(&self, extra_seeds: impl IntoIterator<Item = Endpoint>) {
        self.control
            .clone()
            .trigger(RebuildAction::Rebuild, extra_seeds.into_iter().collect());
    }

    /// Sets the node addresses last seen in the cluster (replicas included). Every later
    /// rebuild adds them to the configured seeds, so a client can be rebuilt even when the seed
    /// name still points only at nodes that are gone. The topology refresh layer keeps this up
    /// to date; each call replaces the previous list.
    pub fn set_known_nodes(&self, nodes: impl IntoIterator<Item = Endpoint>) {
        self.control.set_known_nodes(nodes.into_iter().collect());
    }

    /// Retires the current client now (new calls wait for the next one) and rebuilds.
    pub fn replace(&self) {
        self.control
            .clone()
            .trigger(RebuildAction::Replace, Vec::new());
    }

    /// The current state.
    pub fn status(&self) -> RebuildStatus {
        self.status.borrow().clone()
    }

    /// The generation of the current client (0 before the first connect).
    pub fn generation(&self) -> u64 {
        self.status.borrow().generation
    }

    /// A receiver that sees every state change.
    pub fn subscribe(&self) -> watch::Receiver<RebuildStatus> {
        self.status.clone()
    }

    /// Waits until the generation reaches `generation`, at most `timeout`. A connect that fails
    /// for a reason that does not pass by itself (a refused login, an untrusted certificate, a
    /// seed that is not a cluster node) ends the wait at once with that error.
    pub async fn wait_for_generation(
        &self,
        generation: u64,
        timeout: Duration,
    ) -> Result<RebuildStatus, Error> {
        let mut status = self.status.clone();
        let reached = tokio::time::timeout(timeout, async {
            status
                .wait_for(|s| {
                    s.generation >= generation
                        || s.last_error
                            .as_ref()
                            .is_some_and(|e| !e.kind().is_transient())
                })
                .await
                .map(|s| s.clone())
        })
        .await;
        match reached {
            Ok(Ok(s)) if s.generation >= generation => Ok(s),
            Ok(Ok(s)) => Err(s.last_error.unwrap_or_else(|| {
                Error::closed("the rebuild stopped without a client or an error")
            })),
            Ok(Err(_)) => Err(Error::closed("the rebuild service was dropped")),
            Err(_) => {
                let mut error = Error::unreachable(format!(
                    "client generation {generation} was not reached within {timeout:?}"
                ));
                if let Some(cause) = self.status.borrow().last_error.clone() {
                    error = error.with_source(cause);
                }
                Err(error)
            }
        }
    }
}

impl fmt::Debug for RebuildHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RebuildHandle")
            .field("status", &*self.status.borrow())
            .finish()
    }
}
