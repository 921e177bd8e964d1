//! Send a failed command again — when that is safe, worth it, affordable and in time.
//!
//! During a failover a Redis Cluster answers `CLUSTERDOWN`, `TRYAGAIN`, `READONLY` or drops
//! connections for a second or two, then serves again. [`Retry`] hides that second from the
//! caller, within four limits:
//!
//! * **safety** — a [`NonIdempotent`](crate::Idempotency::NonIdempotent) command (`INCR`,
//!   `LPUSH`, unknown commands) is sent again only when the error proves it did not take
//!   effect ([`Sent::No`](crate::Sent::No)); read-only and idempotent ones whenever the error is
//!   transient. A pipeline is as safe as its least safe command. Per-command overrides come from
//!   an [`IdempotencyTable`](crate::IdempotencyTable);
//! * **worth** — only transient kinds are retried, with exponential backoff and full jitter;
//!   `MOVED`/`ASK` are followed at once, without counting as a failure (bounded per call) —
//!   unless the same redirection comes back, which means a failover in progress;
//! * **budget** — a [`RetryBudget`] (or any tower [`Budget`](tower::retry::budget::Budget))
//!   shared by every clone: each call deposits, each retry withdraws, so a cluster-wide outage
//!   cannot multiply the load; when it is empty the caller gets the original error;
//! * **deadline** — one deadline per call covers every attempt and backoff: no retry starts
//!   after it, and a retry in flight does not outlive it.
//!
//! ```
//! use std::{sync::{Arc, atomic::{AtomicUsize, Ordering}}, time::Duration};
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//! use tower_redis_cluster::{retry::{RetryConfig, RetryLayer}, Error, ErrorKind, Sent};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Error> {
//! // A stand-in for the cluster: the first attempt meets a failover in progress. The retry
//! // layer hands the layers below it a shared `Arc<Cmd>`, so a retry copies nothing.
//! let attempts = Arc::new(AtomicUsize::new(0));
//! let seen = attempts.clone();
//! let cluster = service_fn(move |_cmd: Arc<redis::Cmd>| {
//!     let n = seen.fetch_add(1, Ordering::SeqCst);
//!     async move {
//!         if n == 0 {
//!             Err(Error::new(ErrorKind::ClusterDown, "failover in progress").with_sent(Sent::No))
//!         } else {
//!             Ok(redis::Value::Okay)
//!         }
//!     }
//! });
//!
//! let mut redis = ServiceBuilder::new()
//!     .layer(RetryLayer::new(
//!         RetryConfig::default()
//!             .max_retries(3)
//!             .backoff(Duration::from_millis(20), Duration::from_secs(1))?
//!             .deadline(Duration::from_secs(2)),
//!     ))
//!     .service(cluster);
//!
//! let mut incr = redis::cmd("INCR");
//! incr.arg("visits");
//! // INCR is not idempotent, but CLUSTERDOWN proves it was not applied: sent again.
//! assert_eq!(redis.ready().await?.call(incr).await?, redis::Value::Okay);
//! assert_eq!(attempts.load(Ordering::SeqCst), 2);
//! # Ok(()) }
//! ```
//!
//! In the full stack, Retry sits between a timeout (the hard stop, at least as long as the
//! retry deadline) and the [rebuild](crate::rebuild) layer:
//!
//! ```no_run
//! use std::time::Duration;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use tower_redis_cluster::{
//!     rebuild::{RebuildConfig, RebuildLayer},
//!     retry::{RetryConfig, RetryLayer},
//!     ClusterConnector, Error, Seeds,
//! };
//!
//! # async fn run() -> Result<(), Error> {
//! let seeds = Seeds::parse(["clustercfg.my-cluster.example.com:6379"])?;
//! let mut redis = ServiceBuilder::new()
//!     .map_err(Error::from)
//!     .timeout(Duration::from_secs(5))
//!     .layer(RetryLayer::new(RetryConfig::default().deadline(Duration::from_secs(5))))
//!     .layer(RebuildLayer::new(RebuildConfig::default()))
//!     .service(ClusterConnector::new(seeds));
//! let mut get = redis::cmd("GET");
//! get.arg("greeting");
//! // The stack serves `Cmd` and `Pipeline`: say which one `ready` is for.
//! let reply = ServiceExt::<redis::Cmd>::ready(&mut redis).await?.call(get).await?;
//! # let _ = reply; Ok(()) }
//! ```
//!
//! # Policies
//!
//! What to retry is decided by a [`RetryPolicy`], which sees each failed [`Attempt`] (its
//! error, the request's idempotency, attempt number, redirections, elapsed and remaining time)
//! and answers an [`Action`]. [`StandardRetryPolicy`], configured by [`RetryConfig`], implements
//! the rules above; wrap or replace it with [`RetryLayer::with_policy`].
//!
//! # Why not tower's `Retry` service
//!
//! The per-call machinery is a [`tower::retry::Policy`] ([`CallPolicy`], for `Cmd` and
//! `Pipeline`), but it is driven by this module's own small [`Retry`] service rather than by
//! `tower::retry::Retry`, because that service keeps **one** policy value and clones it into
//! each response future after calling `clone_request` on its own copy. A call's start time,
//! deadline and counters would then have to be smuggled in through `clone_request`, relying
//! on that call order. Here `call()` makes a fresh [`CallPolicy`] for every call. Owning the
//! future also lets this layer:
//!
//! * bound the wait for the inner service's readiness before a retry by the deadline (a
//!   [`Rebuild`](crate::rebuild::Rebuild) that is reconnecting is not ready for up to its
//!   `max_wait`), and keep the *original* error when that wait is cut; tower's `Retry` would
//!   wait, and would return a readiness error instead;
//! * abandon a retry still in flight at the deadline;
//! * keep one tracing span over every attempt of a call;
//! * share the request with the layers below (`Arc<Cmd>`, `Arc<Pipeline>`) instead of copying
//!   it before the first attempt in case a retry needs it, and keep what only a retry needs
//!   (the deadline's timer, the last error, the backoff state) out of the way until then: a
//!   call that succeeds at once costs one allocation more than the bare service;
//! * consume a handle for one call ([`Retry::call_once`]) without the extra inner clone that
//!   `ServiceExt::oneshot` makes.
//!
//! # Interplay with the inner client
//!
//! [`ClusterConnector`](crate::ClusterConnector) keeps the `redis` cluster client's own retries
//! low (2 by default), enough to follow a `MOVED` and an `ASK` in place. A redirection that
//! still reaches this layer means the slots were moving faster than that; it is resent at once
//! ([`RetryConfig::max_redirects`]), or, when it names the node the call was already sent to,
//! after a backoff (see [`StandardRetryPolicy`]). The inner client also resends a command by
//! itself after a dropped connection, and then reports the error of its *last* try — a
//! refused reconnect, which says [`Sent::No`](crate::Sent::No) although the first try may have
//! run. Set its retries to 0 where a non-idempotent command must never run twice.
//!
//! # Observability
//!
//! Each call runs in a `redis` debug span with OpenTelemetry's database client fields (see
//! [`observability`](crate::observability)): the command *name* — never its arguments, which
//! may hold secrets — the generation of the inner client, the error kind of a failure and,
//! when the call needed more than one attempt, the attempt and redirection counts. Each retry is a debug event with the error kind, whether
//! the failed attempt may have taken effect, the attempt number and the delay. An empty budget
//! is a warning (at most one a second).

mod budget;
mod call;
mod config;
mod future;
mod layer;
mod policy;
mod standard;

use std::{
    mem,
    sync::Arc,
    task::{Context, Poll},
};

use redis::{Cmd, Pipeline};
use tower::{retry::Policy, Service};
use tracing::{field, Span};

pub use budget::RetryBudget;
pub use call::{CallPolicy, Delay};
pub use config::{RetryConfig, SharedBudget};
pub(crate) use future::record_failure;
pub use future::{CallOnce, ResponseFuture};
pub use layer::RetryLayer;
pub use policy::{Action, Attempt, RetryPolicy};
pub use standard::StandardRetryPolicy;

use crate::{command, Error};

/// Sends failed `Cmd`s and `Pipeline`s again as its [`RetryPolicy`] decides; see the
/// [module docs](self).
#[derive(Clone, Debug)]
pub struct Retry<S, P = StandardRetryPolicy> {
    inner: S,
    policy: P,
}

impl<S> Retry<S> {
    /// Retries calls to `inner` with [`StandardRetryPolicy`] and this configuration.
    pub fn new(inner: S, config: RetryConfig) -> Self {
        Retry {
            inner,
            policy: StandardRetryPolicy::new(config),
        }
    }
}

impl<S, P: RetryPolicy> Retry<S, P> {
    /// Retries calls to `inner` with a policy of your own (cloned for every call).
    pub fn with_policy(inner: S, policy: P) -> Self {
        Retry { inner, policy }
    }

    /// The policy each call starts from.
    pub fn policy(&self) -> &P {
        &self.policy
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

    fn start<Req>(&mut self, request: Req) -> ResponseFuture<S, P, Req>
    where
        S: Service<Arc<Req>> + Clone,
        Req: RetryRequest,
    {
        // The clone that was made ready sends the first attempt and keeps the retries; this
        // handle gets a fresh clone, which must be made ready again (tower's `Clone` rule).
        let fresh = self.inner.clone();
        let service = mem::replace(&mut self.inner, fresh);
        start_call(self.policy.clone(), service, request, None, None)
    }

    /// One call through this handle, consuming it: the inner service is made ready and moved
    /// into the call. `ServiceExt::oneshot` on a `Retry` also makes a fresh inner clone for the
    /// handle it then drops; this makes none. `retry.clone().call_once(cmd)` is the cheapest
    /// way to send from a shared handle.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use tower::service_fn;
    /// use tower_redis_cluster::{retry::{Retry, RetryConfig}, Error};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Error> {
    /// let cluster = service_fn(|_cmd: Arc<redis::Cmd>| async { Ok::<_, Error>(redis::Value::Okay) });
    /// let shared = Retry::new(cluster, RetryConfig::default());
    /// // Each task sends through a clone of the shared handle, consumed by its call.
    /// let reply = shared.clone().call_once(redis::cmd("PING")).await?;
    /// assert_eq!(reply, redis::Value::Okay);
    /// # Ok(()) }
    /// ```
    pub fn call_once<Req>(self, request: Req) -> CallOnce<S, P, Req>
    where
        Req: RetryRequest,
        S: Service<Arc<Req>, Error = Error>,
    {
        CallOnce::new(self.inner, self.policy, request)
    }
}

/// The span of one call: OpenTelemetry's database client conventions, so an exporter
/// (tracing-opentelemetry) names it for the command (`otel.name`) and maps the rest as they
/// are. The `Client` makes the same span when its retry layer is off.
pub(crate) fn call_span<Req: RetryRequest>(request: &Req) -> Span {
    let span = tracing::debug_span!(
        "redis",
        otel.name = field::Empty,
        otel.kind = "client",
        otel.status_code = field::Empty,
        db.system.name = "redis",
        db.operation.name = field::Empty,
        db.operation.batch.size = field::Empty,
        server.address = field::Empty,
        server.port = field::Empty,
        error.type = field::Empty,
        attempts = field::Empty,
        redirects = field::Empty,
        generation = field::Empty,
    );
    request.describe(&span);
    span
}

/// Sends the first attempt of a call on `service`, which is ready.
fn start_call<S, P, Req>(
    policy: P,
    mut service: S,
    request: Req,
    started: Option<tokio::time::Instant>,
    span: Option<Span>,
) -> ResponseFuture<S, P, Req>
where
    S: Service<Arc<Req>>,
    P: RetryPolicy,
    Req: RetryRequest,
{
    let span = span.unwrap_or_else(|| call_span(&request));
    let mut policy = match started {
        Some(at) => CallPolicy::started_at(policy, at),
        None => CallPolicy::new(policy),
    };
    // A blocking command may take its own block time on top of the deadline. (This layer never
    // cuts a first attempt, so one that blocks for ever is the outer deadline's business.)
    if let Some(crate::command::Block::For(block)) = request.block() {
        policy.extend_deadline(block);
    }
    // Shared, not copied: the first attempt and every retry send the same request.
    let request = Arc::new(request);
    let future = if span.is_disabled() {
        service.call(request.clone())
    } else {
        span.in_scope(|| service.call(request.clone()))
    };
    ResponseFuture::new(future, service, policy, request, span)
}

mod sealed {
    use crate::command::Block;

    pub trait Sealed {
        /// How long the request blocks on the server, if it does (a pipeline never may).
        fn block(&self) -> Option<Block>;
    }

    impl Sealed for redis::Cmd {
        fn block(&self) -> Option<Block> {
            crate::command::block_time(self)
        }
    }

    impl Sealed for redis::Pipeline {
        fn block(&self) -> Option<Block> {
            None
        }
    }
}

/// How long `request` blocks on the server, if it does.
pub(crate) fn block_of<R: RetryRequest>(request: &R) -> Option<crate::command::Block> {
    request.block()
}

/// A request the retry layer sends: `Cmd` or `Pipeline` (sealed).
pub trait RetryRequest: sealed::Sealed {
    /// Puts what the call's span may say about the request on it: the command name, never its
    /// arguments.
    fn describe(&self, span: &Span);
}

impl RetryRequest for Cmd {
    fn describe(&self, span: &Span) {
        if !span.is_disabled() {
            // The name only: arguments may be passwords (AUTH) or personal data.
            if let Some(name) = command::command_name(self) {
                span.record("otel.name", field::display(&name));
                span.record("db.operation.name", field::display(&name));
            }
        }
    }
}

impl RetryRequest for Pipeline {
    fn describe(&self, span: &Span) {
        if !span.is_disabled() {
            let kind = if self.is_transaction() {
                "MULTI"
            } else {
                "PIPELINE"
            };
            span.record("otel.name", field::display(kind));
            span.record("db.operation.name", field::display(kind));
            span.record("db.operation.batch.size", self.len());
        }
    }
}

/// `Service<Cmd>` and `Service<Pipeline>` (the sealed [`RetryRequest`]s).
impl<S, P, Req> Service<Req> for Retry<S, P>
where
    Req: RetryRequest,
    S: Service<Arc<Req>, Error = Error> + Clone,
    P: RetryPolicy,
    CallPolicy<P>: Policy<Arc<Req>, S::Response, Error, Future = Delay>,
{
    type Response = S::Response;
    type Error = Error;
    type Future = ResponseFuture<S, P, Req>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        self.start(request)
    }
}
