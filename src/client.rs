//! [`Client`]: the ready-made stack, configured by a builder.
//!
//! `Client` is nothing but the public layers stacked with `ServiceBuilder` — the same stack a
//! user can assemble by hand, layer by layer (see the crate docs) — plus one deadline:
//!
//! ```text
//! Client            Clone + Send + Sync; query / send / query_pipeline; Service<Cmd> + Service<Pipeline>
//!   deadline        one timer over readiness and call, retries included
//!   Retry           kind × idempotency × Sent, backoff with full jitter, retry budget
//!   ConcurrencyLimit (optional)
//!   TopologyRefresh periodic + error-driven refresh, known nodes for rebuilds
//!   Rebuild         single-flight rebuild of the inner client from the seed names
//!   RedisService<ClusterConnection>
//! ```
//!
//! The layers are kept unboxed: a clone of the client is one reference-count increment, and
//! `query`/`send` consume a clone of the stack for one call ([`Retry::call_once`]). What a call
//! costs over the bare [`RedisService`](crate::RedisService) is measured by
//! `cargo bench --bench layers` (see the README).

use std::{
    fmt,
    future::Future,
    ops::Deref,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
    time::Duration,
};

use pin_project_lite::pin_project;
use redis::{Cmd, FromRedisValue, Pipeline, Value};
use tokio::time::{Instant, Sleep};
use tower::{
    retry::Policy,
    util::{Either, Oneshot},
    Service, ServiceBuilder, ServiceExt,
};

use crate::{
    connect::{
        ClusterConnector, Connect, Credentials, CredentialsProvider, Resolve, Seeds, TlsConfig,
    },
    rebuild::{Rebuild, RebuildConfig, RebuildHandle},
    retry::{
        CallOnce, CallPolicy, Delay, Retry, RetryConfig, RetryLayer, RetryRequest,
        StandardRetryPolicy,
    },
    topology::{RefreshConfig, TopologyHandle, TopologyRefresh, TopologyRefreshLayer},
    Error, ErrorKind,
};

/// A cheap-to-clone handle to a Redis Cluster that survives failovers and node replacements.
///
/// Commands share multiplexed connections to the nodes. Blocking commands (`BLPOP`, `BRPOP`,
/// `BLMOVE`, `BZPOPMIN`, `XREAD … BLOCK`, … — see [`command::block_time`](crate::command::block_time))
/// are each sent on a connection of their own, to the master of their key, for as long as they
/// block, and their call's deadline is extended by their own block time; a caller that gives
/// up closes that connection, so the server pops nothing on its behalf. A block for ever
/// (timeout 0) needs a client without a deadline (`timeout(None)`). Commands that would change
/// the shared connections' state (`WATCH`, `MULTI` alone, `SUBSCRIBE`, `SELECT`, `WAIT`, …) are
/// refused with [`ErrorKind::Unsupported`]; a transaction goes as
/// one atomic pipeline.
///
/// ```no_run
/// use std::time::Duration;
/// use tower_redis_cluster::Client;
///
/// # async fn run() -> Result<(), tower_redis_cluster::Error> {
/// let client = Client::builder()
///     .seed("clustercfg.my-cluster.example.com:6379") // kept as a name, resolved at every connect
///     .timeout(Duration::from_millis(500))
///     .build()
///     .await?;
/// let mut set = redis::cmd("SET");
/// set.arg("greeting").arg("hello");
/// client.query::<()>(&set).await?;
/// let mut get = redis::cmd("GET");
/// get.arg("greeting");
/// let value: String = client.query(&get).await?;
/// # Ok(()) }
/// ```
pub struct Client<C: Connect = ClusterConnector> {
    /// This handle's own copy of the layers, made at `poll_ready` and consumed by `call`.
    ready: Option<Core<C>>,
    /// Set while `poll_ready` waits (for a rebuild, or the concurrency limit): the call's
    /// deadline runs from the start of that wait. Boxed: a client that is ready at once never
    /// makes one.
    waiting: Option<Box<ReadyWait>>,
    /// Shared by every clone: a clone of the client is one reference count.
    info: Arc<Info<C>>,
}

/// A `Service` caller waiting in `poll_ready`: since when, and the timer that ends the wait at
/// the deadline.
struct ReadyWait {
    since: Instant,
    timer: Option<Pin<Box<Sleep>>>,
    /// The deadline passed before the stack was ready: the call fails without being sent.
    expired: bool,
}

impl<C: Connect> Clone for Client<C> {
    fn clone(&self) -> Self {
        // Readiness is per clone (tower's rule): a clone starts without a stack of its own.
        Client {
            ready: None,
            waiting: None,
            info: self.info.clone(),
        }
    }
}

struct Info<C: Connect> {
    /// The layers, unboxed; every call runs on a clone of them, and clones share their state
    /// (one rebuild, refresher, budget, concurrency limit).
    core: Core<C>,
    rebuild: RebuildHandle,
    topology: Option<TopologyHandle>,
    /// Where a [`Subscriber`](crate::pubsub::Subscriber) of this client finds the cluster.
    subscriber_source: Option<crate::topology::TopologySource>,
    summary: String,
    deadline: Option<Duration>,
    /// The `client` label of the metrics.
    name: crate::metrics::ClientName,
}

impl<C: Connect> Info<C> {
    /// The error of a call whose deadline passed: `what` happened, and, while no inner client
    /// serves, the last connect failure as the reason.
    fn deadline_error(&self, what: &str) -> Error {
        let deadline = self.deadline.unwrap_or_default();
        let mut error = Error::timeout(format!("{what} ({deadline:?})"));
        let status = self.rebuild.status();
        if let (false, Some(cause)) = (status.serving, status.last_error) {
            error = error.with_source(cause);
        }
        error
    }

    /// `call` — readiness and call together — within the overall deadline, counted; `extra`
    /// is the block time of a blocking command, added to it.
    fn within_deadline<F, I>(
        this: I,
        call: F,
        now: Instant,
        extra: Duration,
        span: tracing::Span,
    ) -> Deadline<F, I>
    where
        I: Deref<Target = Info<C>>,
    {
        Deadline {
            call,
            span,
            // A deadline too far to represent is no deadline.
            at: this
                .deadline
                .and_then(|d| d.checked_add(extra))
                .and_then(|d| now.checked_add(d)),
            sleep: None,
            info: this,
        }
    }
}

pin_project! {
    /// One call of a helper on a clone of the stack: through the retry layer, or straight to
    /// the layers below it when retries are off.
    #[project = OneCallProj]
    enum OneCall<Req, C: Connect>
    where
        Limited<C>: Service<Req>,
        Limited<C>: Service<Arc<Req>>,
    {
        Retrying {
            #[pin]
            call: CallOnce<Limited<C>, StandardRetryPolicy, Req>,
        },
        Direct {
            #[pin]
            call: Oneshot<Limited<C>, Req>,
            // The retry layer's span, made here when that layer is off.
            span: tracing::Span,
        },
    }
}

impl<Req, C: Connect> OneCall<Req, C>
where
    Limited<C>: Service<Req> + Service<Arc<Req>>,
{
    /// A call on `core`, which it consumes, in `span`; `now` is when the call started.
    fn new(core: Core<C>, request: Req, now: Instant, span: tracing::Span) -> Self
    where
        Req: RetryRequest,
        Limited<C>: Service<Arc<Req>, Error = Error>,
    {
        match core {
            Either::Left(retry) => OneCall::Retrying {
                call: retry.call_once(request).started_at(now).in_span(span),
            },
            Either::Right(direct) => OneCall::Direct {
                span,
                call: direct.oneshot(request),
            },
        }
    }
}

impl<Req, T, C: Connect> Future for OneCall<Req, C>
where
    Req: RetryRequest,
    Limited<C>:
        Service<Req, Response = T, Error = Error> + Service<Arc<Req>, Response = T, Error = Error>,
    CallPolicy<StandardRetryPolicy>: Policy<Arc<Req>, T, Error, Future = Delay>,
{
    type Output = Result<T, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            OneCallProj::Retrying { call } => call.poll(cx),
            OneCallProj::Direct { call, span } => {
                let _entered = span.enter();
                let result = ready!(call.poll(cx));
                if let Err(error) = &result {
                    crate::retry::record_failure(span, error);
                }
                Poll::Ready(result)
            }
        }
    }
}

pin_project! {
    /// A call within the client's deadline; counts the outcome (`metrics` feature). The timer
    /// is made when the call first has to wait: one answered at its first poll never touches
    /// the timer wheel.
    struct Deadline<F, I> {
        #[pin]
        call: F,
        // The call's span, which hears of the deadline passing too.
        span: tracing::Span,
        at: Option<Instant>,
        #[pin]
        sleep: Option<Sleep>,
        info: I,
    }
}

impl<F, I, T, C: Connect> Future for Deadline<F, I>
where
    F: Future<Output = Result<T, Error>>,
    I: Deref<Target = Info<C>>,
{
    type Output = Result<T, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let result = match this.call.poll(cx) {
            Poll::Ready(result) => result,
            Poll::Pending => {
                let Some(at) = *this.at else {
                    return Poll::Pending;
                };
                if this.sleep.is_none() {
                    this.sleep.set(Some(tokio::time::sleep_until(at)));
                }
                let sleep = this.sleep.as_pin_mut().expect("set above");
                ready!(sleep.poll(cx));
                let error = this
                    .info
                    .deadline_error("the call did not finish within its deadline");
                crate::retry::record_failure(this.span, &error);
                Err(error)
            }
        };
        crate::metrics::call_finished(
            &this.info.name,
            result.as_ref().map(|_| ()).map_err(Error::kind),
        );
        Poll::Ready(result)
    }
}

impl Client {
    /// Starts configuring a client.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }
}

impl<C: Connect> Client<C>
where
    C::Service: InnerService,
{
    /// Sends `request` on a clone of the stack, consumed by the call, within the deadline.
    /// The call started at `now` (read before the request was copied, so the copy counts
    /// against the deadline too).
    async fn send_request<Req, T>(&self, request: Req, now: Instant) -> Result<T, Error>
    where
        Req: RetryRequest,
        Limited<C>: Service<Req, Response = T, Error = Error>
            + Service<Arc<Req>, Response = T, Error = Error>,
        CallPolicy<StandardRetryPolicy>: Policy<Arc<Req>, T, Error, Future = Delay>,
        T: Send + 'static,
    {
        // One clock reading for the deadline and the retry layer's own.
        let extra =
            crate::command::block_allowance(crate::retry::block_of(&request), self.info.deadline)?;
        let span = crate::retry::call_span(&request);
        let call = OneCall::new(self.info.core.clone(), request, now, span.clone());
        Info::within_deadline(&*self.info, call, now, extra, span).await
    }

    /// Sends a command and converts its reply.
    ///
    /// The command is copied for the call (the layers below share it between attempts); for
    /// large values prefer [`send`](Self::send), which takes it by value. The deadline covers
    /// the copy. It is checked whenever the call's task runs, so work that runs without
    /// yielding — copying a value, packing it into the wire format — ends first: a 64 MiB
    /// `SET` under a 100 ms deadline ended after about 110 ms through `send` and 150 ms through
    /// `query` here (2-core VM, debug build).
    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, Error> {
        let now = Instant::now();
        let value = self.send_request(cmd.clone(), now).await?;
        redis::from_redis_value(value).map_err(|e| {
            Error::new(
                ErrorKind::Conversion,
                "the reply does not convert to the requested type",
            )
            .with_source(e)
        })
    }

    /// Sends a command, taking it by value (no clone), and returns the raw reply.
    pub async fn send(&self, cmd: Cmd) -> Result<Value, Error> {
        self.send_request(cmd, Instant::now()).await
    }

    /// Sends a pipeline, taking it by value (no clone), and returns the raw replies (one per
    /// command not ignored).
    pub async fn send_pipeline(&self, pipeline: Pipeline) -> Result<Vec<Value>, Error> {
        self.send_request(pipeline, Instant::now()).await
    }

    /// Sends a pipeline and converts its replies (one per command not ignored).
    pub async fn query_pipeline<T: FromRedisValue>(&self, pipeline: &Pipeline) -> Result<T, Error> {
        let now = Instant::now();
        let values: Vec<Value> = self.send_request(pipeline.clone(), now).await?;
        redis::from_redis_value(Value::Array(values)).map_err(|e| {
            Error::new(
                ErrorKind::Conversion,
                "the replies do not convert to the requested type",
            )
            .with_source(e)
        })
    }

    /// The handle of the rebuild layer: generation, manual rebuilds.
    pub fn rebuild_handle(&self) -> &RebuildHandle {
        &self.info.rebuild
    }

    /// A [`Subscriber`](crate::pubsub::Subscriber) to this client's cluster: the same seeds,
    /// resolver, TLS, credentials provider and timeouts, and the client's topology refreshes
    /// (when on) as well as its own. Subscriptions do not go through the client's
    /// connection; a rebuild of the client leaves them alone. Must be called inside a Tokio
    /// runtime. Fails with a `Config` error for a client made by
    /// [`build_with`](ClientBuilder::build_with) without a
    /// [`topology_source`](ClientBuilder::topology_source): there is no cluster to follow.
    pub fn subscriber(&self) -> Result<crate::pubsub::Subscriber, Error> {
        self.subscriber_with(
            crate::pubsub::SubscriberConfig::default().client_name(self.info.name.0.to_string()),
        )
    }

    /// [`subscriber`](Self::subscriber) with a configuration of your own.
    pub fn subscriber_with(
        &self,
        config: crate::pubsub::SubscriberConfig,
    ) -> Result<crate::pubsub::Subscriber, Error> {
        let source = self.info.subscriber_source.clone().ok_or_else(|| {
            Error::config(
                "a subscriber needs a cluster to follow: give build_with a topology_source(..)",
            )
        })?;
        let shared = self.info.topology.as_ref().map(|t| t.subscribe());
        crate::pubsub::Subscriber::start(source, shared, config)
    }

    /// The handle of the topology refresh layer, when it is on.
    pub fn topology(&self) -> Option<&TopologyHandle> {
        self.info.topology.as_ref()
    }

    /// The generation of the inner cluster client (0 until the first connect).
    pub fn generation(&self) -> u64 {
        self.info.rebuild.generation()
    }

    /// Waits, at most `timeout`, until the first inner client is connected. Returns the
    /// connect's own error at once when it cannot pass by itself (`Auth`, `Tls`, `Config` — a
    /// seed that is a standalone server, say) instead of waiting out `timeout`.
    pub async fn wait_connected(&self, timeout: Duration) -> Result<(), Error> {
        self.info
            .rebuild
            .wait_for_generation(1, timeout)
            .await
            .map(|_| ())
    }

    /// The `Service` interface's readiness: this handle's stack, cloned from the shared one
    /// if it has none.
    ///
    /// The wait counts against the call's deadline, as it does for the helpers: a caller that
    /// waits for a rebuild or for a slot under the concurrency limit is ready once the
    /// deadline passes, and its call then fails with `Timeout` without being sent.
    fn poll_ready_service<Req>(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>>
    where
        Core<C>: Service<Req, Error = Error>,
    {
        if self.waiting.as_ref().is_some_and(|w| w.expired) {
            return Poll::Ready(Ok(()));
        }
        let info = &self.info;
        let core = self.ready.get_or_insert_with(|| info.core.clone());
        match Service::<Req>::poll_ready(core, cx) {
            Poll::Ready(result) => Poll::Ready(result),
            Poll::Pending => {
                let deadline = info.deadline;
                let wait = self.waiting.get_or_insert_with(|| {
                    let since = Instant::now();
                    Box::new(ReadyWait {
                        since,
                        // A deadline too far to represent is no deadline.
                        timer: deadline
                            .and_then(|d| since.checked_add(d))
                            .map(|at| Box::pin(tokio::time::sleep_until(at))),
                        expired: false,
                    })
                });
                let expired = wait
                    .timer
                    .as_mut()
                    .is_some_and(|timer| timer.as_mut().poll(cx).is_ready());
                if !expired {
                    return Poll::Pending;
                }
                // Whatever the layers reserved goes; the call reports the wait.
                wait.expired = true;
                self.ready = None;
                Poll::Ready(Ok(()))
            }
        }
    }

    /// The `Service` interface's call: the stack made ready is consumed by the call (no clone
    /// is left behind for the next one until it is needed), within the deadline — counted from
    /// the start of a wait in `poll_ready`.
    fn call_service<Req>(&mut self, request: Req) -> ResponseFuture<Req, C>
    where
        Req: RetryRequest,
        Limited<C>: Service<Req> + Service<Arc<Req>, Error = Error>,
    {
        let waited = self.waiting.take();
        if waited.as_ref().is_some_and(|w| w.expired) {
            let error = self
                .info
                .deadline_error(
                    "the client was not ready within the call's deadline: the command was not sent",
                )
                .with_sent(crate::Sent::No);
            crate::metrics::call_finished(&self.info.name, Err(error.kind()));
            crate::retry::record_failure(&crate::retry::call_span(&request), &error);
            return ResponseFuture {
                state: CallState::Expired { error: Some(error) },
            };
        }
        let extra = match crate::command::block_allowance(
            crate::retry::block_of(&request),
            self.info.deadline,
        ) {
            Ok(extra) => extra,
            Err(refused) => {
                self.ready = None;
                return ResponseFuture {
                    state: CallState::Expired {
                        error: Some(refused),
                    },
                };
            }
        };
        // Without `poll_ready` first (against tower's contract) the call still works: it makes
        // its stack ready itself.
        let core = self.ready.take().unwrap_or_else(|| self.info.core.clone());
        let started = waited.map_or_else(Instant::now, |w| w.since);
        let span = crate::retry::call_span(&request);
        ResponseFuture {
            state: CallState::Call {
                inner: Info::within_deadline(
                    self.info.clone(),
                    OneCall::new(core, request, started, span.clone()),
                    started,
                    extra,
                    span,
                ),
            },
        }
    }
}

impl<C: Connect> fmt::Debug for Client<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("config", &self.info.summary)
            .field("generation", &self.info.rebuild.generation())
            .finish_non_exhaustive()
    }
}

/// The stack as a `Service`: readiness from the layers (a rebuild in progress or the
/// concurrency limit makes callers wait here), the call within the overall deadline, which
/// starts with that wait: a caller that is still not ready when it passes is let through to a
/// call that fails with `Timeout` (`Sent::No`). Clones are cheap and independent, as tower
/// expects.
impl<C: Connect> Service<Cmd> for Client<C>
where
    C::Service: InnerService,
{
    type Response = Value;
    type Error = Error;
    type Future = ResponseFuture<Cmd, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.poll_ready_service::<Cmd>(cx)
    }

    fn call(&mut self, cmd: Cmd) -> Self::Future {
        self.call_service(cmd)
    }
}

impl<C: Connect> Service<Pipeline> for Client<C>
where
    C::Service: InnerService,
{
    type Response = Vec<Value>;
    type Error = Error;
    type Future = ResponseFuture<Pipeline, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.poll_ready_service::<Pipeline>(cx)
    }

    fn call(&mut self, pipeline: Pipeline) -> Self::Future {
        self.call_service(pipeline)
    }
}

pin_project! {
    /// The future of a call through `Client`'s `Service` interface: the layers' future within
    /// the client's deadline. Not boxed: a call costs no allocation beyond the layers' own.
    pub struct ResponseFuture<Req, C: Connect = ClusterConnector>
    where
        Limited<C>: Service<Req>,
        Limited<C>: Service<Arc<Req>>,
    {
        #[pin]
        state: CallState<Req, C>,
    }
}

pin_project! {
    #[project = CallStateProj]
    enum CallState<Req, C: Connect>
    where
        Limited<C>: Service<Req>,
        Limited<C>: Service<Arc<Req>>,
    {
        Call {
            #[pin]
            inner: Deadline<OneCall<Req, C>, Arc<Info<C>>>,
        },
        /// Ended before any attempt: the deadline passed while waiting to be ready, or the
        /// request cannot be honoured.
        Expired { error: Option<Error> },
    }
}

impl<Req, T, C: Connect> Future for ResponseFuture<Req, C>
where
    Req: RetryRequest,
    Limited<C>:
        Service<Req, Response = T, Error = Error> + Service<Arc<Req>, Response = T, Error = Error>,
    CallPolicy<StandardRetryPolicy>: Policy<Arc<Req>, T, Error, Future = Delay>,
{
    type Output = Result<T, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            CallStateProj::Call { inner } => inner.poll(cx),
            CallStateProj::Expired { error } => Poll::Ready(Err(error
                .take()
                .unwrap_or_else(|| Error::closed("response future polled after completion")))),
        }
    }
}

impl<Req, C: Connect> fmt::Debug for ResponseFuture<Req, C>
where
    Limited<C>: Service<Req> + Service<Arc<Req>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

/// Configures a [`Client`]. Each layer can be configured or turned off; nothing is hidden.
#[derive(Default)]
pub struct ClientBuilder {
    seeds: Vec<String>,
    credentials: Option<Arc<dyn CredentialsProvider>>,
    tls: Option<TlsConfig>,
    resolver: Option<Arc<dyn Resolve>>,
    connection_timeout: Option<Duration>,
    response_timeout: Option<Duration>,
    timeout: Option<Option<Duration>>,
    retry: Option<Option<RetryConfig>>,
    refresh: Option<Option<RefreshConfig>>,
    rebuild: Option<RebuildConfig>,
    read_from_replicas: bool,
    read_policy: crate::read::ReadPolicy,
    fail_fast: Option<crate::read::FailFastConfig>,
    zones: Option<crate::read::Zones>,
    /// The inner client's reply timeout, when this builder made the connector: when a slow
    /// primary's read gets a replica asked too.
    hedge_after: Option<Duration>,
    concurrency_limit: Option<usize>,
    inner_retries: Option<u32>,
    name: Option<String>,
    topology_source: Option<crate::topology::TopologySource>,
    topology_probes: Option<usize>,
}

impl ClientBuilder {
    /// Adds a seed: `host:port`, `host`, or a `redis://` / `rediss://` URL. Host names are kept
    /// and resolved again at every connect.
    pub fn seed(mut self, seed: impl Into<String>) -> Self {
        self.seeds.push(seed.into());
        self
    }

    /// Adds several seeds.
    pub fn seeds<I, S>(mut self, seeds: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.seeds.extend(seeds.into_iter().map(Into::into));
        self
    }

    /// ACL user and password (redacted in `Debug` and logs).
    pub fn credentials(
        mut self,
        username: impl Into<String>,
        password: impl Into<crate::connect::Secret>,
    ) -> Self {
        self.credentials = Some(Arc::new(Credentials::new(username, password)));
        self
    }

    /// A password for the `default` user.
    pub fn password(mut self, password: impl Into<crate::connect::Secret>) -> Self {
        self.credentials = Some(Arc::new(Credentials::password(password)));
        self
    }

    /// Credentials asked for at every connection: each node connection of the inner client
    /// (reconnects included), every rebuild and every topology probe — for short-lived tokens
    /// (IAM auth) and rotated passwords. Nothing is cached past one connect. A login the server
    /// refuses on a live client leads to a rebuild with fresh credentials.
    ///
    /// ```no_run
    /// use tower_redis_cluster::{connect::{credentials_fn, Credentials}, Client};
    ///
    /// # async fn fresh_token() -> String { String::new() }
    /// # async fn run() -> Result<(), tower_redis_cluster::Error> {
    /// let client = Client::builder()
    ///     .seed("rediss://clustercfg.my-cluster.example.com:6379")
    ///     .credentials_provider(credentials_fn(|| async {
    ///         Ok(Credentials::new("app", fresh_token().await))
    ///     }))
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn credentials_provider(mut self, provider: impl CredentialsProvider) -> Self {
        self.credentials = Some(Arc::new(provider));
        self
    }

    /// Connect over TLS (feature `tls`).
    ///
    /// The option exists in every build, so configuration read at run time compiles the same
    /// way with and without the feature; a build without it fails [`build`](Self::build) at
    /// once — before anything connects — with a `Config` error that names the `tls` feature,
    /// as does a `rediss://` seed.
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Resolve seed names with this resolver instead of the system's.
    pub fn resolver(mut self, resolver: impl Resolve) -> Self {
        self.resolver = Some(Arc::new(resolver));
        self
    }

    /// How long one TCP/TLS connect may take (default 1 s).
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = Some(timeout);
        self
    }

    /// How long one attempt waits for its reply (default 500 ms).
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = Some(timeout);
        self
    }

    /// The overall deadline of a call, retries and waits included (default 5 s; `None`: off).
    pub fn timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.timeout = Some(timeout.into());
        self
    }

    /// Retry configuration (default [`RetryConfig::default`]).
    pub fn retry(mut self, config: RetryConfig) -> Self {
        self.retry = Some(Some(config));
        self
    }

    /// No retry layer.
    pub fn no_retry(mut self) -> Self {
        self.retry = Some(None);
        self
    }

    /// Topology refresh configuration (default [`RefreshConfig::default`]).
    pub fn topology_refresh(mut self, config: RefreshConfig) -> Self {
        self.refresh = Some(Some(config));
        self
    }

    /// At most `max` nodes asked (connections opened) per topology refresh, however large the
    /// cluster (default [`DEFAULT_MAX_PROBES`](crate::topology::DEFAULT_MAX_PROBES)); see
    /// [`TopologySource::max_probes`](crate::topology::TopologySource::max_probes). Applies to
    /// the topology source in use: the connector's for [`build`](Self::build), the one given to
    /// [`topology_source`](Self::topology_source) for [`build_with`](Self::build_with).
    pub fn topology_probes(mut self, max: usize) -> Self {
        self.topology_probes = Some(max);
        self
    }

    /// No topology refresh layer.
    pub fn no_topology_refresh(mut self) -> Self {
        self.refresh = Some(None);
        self
    }

    /// Rebuild configuration (default [`RebuildConfig::default`]).
    pub fn rebuild(mut self, config: RebuildConfig) -> Self {
        self.rebuild = Some(config);
        self
    }

    /// Route read-only commands to replicas (passed to the inner cluster client).
    pub fn read_from_replicas(mut self, enabled: bool) -> Self {
        self.read_from_replicas = enabled;
        self
    }

    /// Where reads go: [`ReadPolicy::PrimaryThenReplica`](crate::read::ReadPolicy) serves a
    /// read from a replica of its slot — possibly stale — when the primary is down or known
    /// down, within the same call; see the [`read`](crate::read) module. Needs topology
    /// refresh (on by default), which says where the replicas are.
    pub fn read_policy(mut self, policy: crate::read::ReadPolicy) -> Self {
        self.read_policy = policy;
        self
    }

    /// Which zone each node is in, and the caller's: reads under
    /// [`ReadPolicy::ReplicaPreferred`](crate::read::ReadPolicy) go to a replica in the
    /// caller's zone first.
    pub fn zones(mut self, zones: crate::read::Zones) -> Self {
        self.zones = Some(zones);
        self
    }

    /// Per-shard fail-fast: while a shard has no serving primary, its calls fail at once with
    /// [`ErrorKind::ShardDown`] (reads under
    /// `PrimaryThenReplica` go to a replica), so they do not hold the concurrency limit or the
    /// application's workers while the healthy shards serve. Off by default; see
    /// [`FailFastConfig`](crate::read::FailFastConfig). Needs topology refresh.
    pub fn fail_fast(mut self, config: crate::read::FailFastConfig) -> Self {
        self.fail_fast = Some(config);
        self
    }

    /// At most `limit` calls in flight per client (and its clones); further callers wait in
    /// `poll_ready`.
    pub fn concurrency_limit(mut self, limit: usize) -> Self {
        self.concurrency_limit = Some(limit);
        self
    }

    /// The client's name: the `client` label of every metric of its layers (feature
    /// `metrics`), so two clients of one process keep apart. Default: its first seed
    /// (`host:port`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The inner cluster client's own retries. Default: 0 when the retry layer is on, 2 when it
    /// is off. The redis crate resends a command by itself after a dropped connection and
    /// reports only its last outcome, so with inner retries an `INCR` can be applied twice
    /// behind a single `Ok`; at 0 every send is the retry layer's, which follows `MOVED`/`ASK`
    /// and knows which commands are safe to send again.
    pub fn inner_retries(mut self, retries: u32) -> Self {
        self.inner_retries = Some(retries);
        self
    }

    /// Validates the configuration and builds the stack. Does not wait for the cluster: the
    /// first connect runs in the background and calls wait for it, bounded (see
    /// [`Client::wait_connected`]). Fails only on invalid configuration, with a `Config` error
    /// that says what to fix.
    pub async fn build(mut self) -> Result<Client, Error> {
        let seeds = Seeds::parse(&self.seeds)?;
        self.check_limits()?;
        let name = self
            .name
            .clone()
            .or_else(|| seeds.iter().next().map(|s| s.to_string()))
            .unwrap_or_default();
        let mut connector = ClusterConnector::new(seeds);
        if let Some(c) = self.credentials.take() {
            connector = connector.credentials_provider(c);
        }
        if let Some(t) = self.tls.take() {
            connector = connector.tls(t);
        }
        if let Some(r) = self.resolver.take() {
            connector = connector.resolver(r);
        }
        if let Some(d) = self.connection_timeout {
            connector = connector.connection_timeout(d);
        }
        if let Some(d) = self.response_timeout {
            connector = connector.response_timeout(d);
        }
        let retry_on = !matches!(self.retry, Some(None));
        connector =
            connector.inner_retries(self.inner_retries.unwrap_or(if retry_on { 0 } else { 2 }));
        connector = connector.read_from_replicas(self.read_from_replicas);
        connector.validate()?;
        self.hedge_after = Some(connector.reply_timeout());
        let source = connector.topology_source();
        let described = format!("{connector:?}");
        self.assemble(connector, described, Some(source), name)
    }

    /// Builds the same stack — deadline, retries, concurrency limit, rebuilds — over a
    /// connector of your own: a [`ConnectionManager`](redis::aio::ConnectionManager) for a
    /// cluster-mode-disabled primary endpoint, a connection with options this builder does
    /// not have, a test double. The connector is asked for a new inner service at the first
    /// connect and at every rebuild, so it should resolve names afresh each time.
    ///
    /// What configures the connection — seeds, credentials, TLS, resolver, connection and
    /// response timeouts, replica reads, inner retries — belongs to that connector: set on
    /// this builder, it fails the build with a `Config` error. Topology refresh watches a
    /// Redis Cluster and needs a source to ask; it is off unless
    /// [`topology_source`](Self::topology_source) gives one.
    ///
    /// ```no_run
    /// use tower_redis_cluster::{connect::connect_fn, redis, Client, Error, RedisService};
    ///
    /// # async fn run() -> Result<(), Error> {
    /// // The primary endpoint of a cluster-mode-disabled replication group: its name moves to
    /// // the promoted replica, and every connect resolves it again.
    /// let primary = connect_fn(|_hints: &_| async {
    ///     let client = redis::Client::open("redis://primary.my-group.example.com:6379")
    ///         .map_err(Error::from_redis)?;
    ///     let manager = redis::aio::ConnectionManager::new(client)
    ///         .await
    ///         .map_err(Error::from_redis)?;
    ///     Ok(RedisService::new(manager))
    /// });
    /// let client = Client::builder().build_with(primary).await?;
    /// let value: Option<String> = client.query(redis::cmd("GET").arg("greeting")).await?;
    /// # Ok(()) }
    /// ```
    pub async fn build_with<C>(self, connector: C) -> Result<Client<C>, Error>
    where
        C: Connect,
        C::Service: InnerService,
    {
        let connection_options = [
            ("seed", !self.seeds.is_empty()),
            ("credentials", self.credentials.is_some()),
            ("tls", self.tls.is_some()),
            ("resolver", self.resolver.is_some()),
            ("connection_timeout", self.connection_timeout.is_some()),
            ("response_timeout", self.response_timeout.is_some()),
            ("read_from_replicas", self.read_from_replicas),
            ("inner_retries", self.inner_retries.is_some()),
        ];
        if let Some((option, _)) = connection_options.iter().find(|(_, set)| *set) {
            return Err(Error::config(format!(
                "{option} configures the connection, which build_with's connector makes: set it \
                 on that connector"
            )));
        }
        if self.topology_source.is_none() && matches!(self.refresh, Some(Some(_))) {
            return Err(Error::config(
                "topology refresh needs a source to ask: give build_with one with \
                 topology_source(..), or leave topology_refresh unset",
            ));
        }
        self.check_limits()?;
        let name = self.name.clone().unwrap_or_else(|| "client".to_string());
        let described = std::any::type_name::<C>().to_string();
        self.assemble(connector, described, None, name)
    }

    /// Timeouts and limits that cannot work, named.
    fn check_limits(&self) -> Result<(), Error> {
        for (option, value) in [
            ("connection_timeout", self.connection_timeout),
            ("response_timeout", self.response_timeout),
            ("timeout", self.timeout.flatten()),
        ] {
            if value.is_some_and(|d| d.is_zero()) {
                return Err(Error::config(format!("{option} must be greater than zero")));
            }
        }
        if self.concurrency_limit == Some(0) {
            return Err(Error::config("concurrency_limit must be at least 1"));
        }
        Ok(())
    }

    /// The topology source of the refresh layer: which nodes to ask for the cluster's
    /// topology, and how. [`build`](Self::build) uses its connector's by default;
    /// [`build_with`](Self::build_with) has none unless given one here.
    pub fn topology_source(mut self, source: crate::topology::TopologySource) -> Self {
        self.topology_source = Some(source);
        self
    }

    /// The layers over `connector` (`described` in the client's `Debug`), configured as this
    /// builder says. `source` is the connector's own topology source, if it has one.
    fn assemble<C>(
        self,
        connector: C,
        described: String,
        source: Option<crate::topology::TopologySource>,
        name: String,
    ) -> Result<Client<C>, Error>
    where
        C: Connect,
        C::Service: InnerService,
    {
        let name = crate::metrics::ClientName::new(name);

        let timeout = self.timeout.unwrap_or(Some(Duration::from_secs(5)));
        let retry = self.retry.unwrap_or_else(|| Some(RetryConfig::default()));
        // The retry layer must not start an attempt that the overall deadline would cut off.
        let retry = retry.map(|r| match (timeout, r.deadline) {
            (Some(t), Some(d)) if d <= t => r,
            (Some(t), _) => r.deadline(t),
            (None, _) => r,
        });
        let retry = retry.map(|mut r| {
            r.client_name = name.clone();
            r
        });
        let source = self
            .topology_source
            .or(source)
            .map(|s| match self.topology_probes {
                Some(max) => s.max_probes(max),
                None => s,
            });
        let subscriber_source = source.clone();
        let refresh = match source {
            Some(source) => self
                .refresh
                .unwrap_or_else(|| Some(RefreshConfig::default()))
                .map(|mut r| {
                    r.client_name = name.clone();
                    (source, r)
                }),
            None => None,
        };

        let summary = format!(
            "{described}, timeout {timeout:?}, retry {}, topology refresh {}, concurrency limit {:?}",
            if retry.is_some() { "on" } else { "off" },
            if refresh.is_some() { "on" } else { "off" },
            self.concurrency_limit
        );

        // Knobs that cannot work fail the build, not every later call.
        if let Some((_, config)) = &refresh {
            config.validate()?;
        }
        let mut rebuild_config = self.rebuild.unwrap_or_default();
        rebuild_config.validate()?;
        rebuild_config.client_name = name.clone();
        // A caller of the Service interface waits for a rebuild in poll_ready, which the
        // call's deadline does not cover: keep that wait within the deadline too.
        if let Some(t) = timeout {
            if rebuild_config.max_wait > t {
                rebuild_config = rebuild_config.max_wait(t);
            }
        }
        let rebuild = Rebuild::new(connector, rebuild_config);
        let rebuild_handle = rebuild.handle();
        let layers = Layers {
            retry,
            limit: self.concurrency_limit,
        };
        if (self.read_policy != crate::read::ReadPolicy::Primary || self.fail_fast.is_some())
            && refresh.is_none()
        {
            return Err(Error::config(
                "a read policy other than Primary and fail-fast find shards and replicas in the \
                 topology: they need topology refresh on (and, for build_with, a \
                 topology_source)",
            ));
        }
        let (core, topology) = match refresh {
            Some((source, config)) => {
                let nodes = source.nodes();
                let response_timeout = self.hedge_after.unwrap_or(source.response_timeout());
                let layer = TopologyRefreshLayer::new(source, config)
                    .rebuild_handle(rebuild_handle.clone());
                let refreshed = tower::Layer::layer(&layer, rebuild);
                let topology = refreshed.handle();
                let routed = crate::read::ReadRouting::new(
                    refreshed,
                    crate::read::Routing {
                        policy: self.read_policy,
                        fail_fast: self.fail_fast.clone(),
                        zones: self.zones.clone(),
                    },
                    topology.clone(),
                    nodes,
                    response_timeout,
                    name.clone(),
                );
                (layers.stack(Either::Left(routed)), Some(topology))
            }
            None => (layers.stack(Either::Right(rebuild)), None),
        };
        Ok(Client {
            ready: None,
            waiting: None,
            info: Arc::new(Info {
                core,
                rebuild: rebuild_handle,
                topology,
                subscriber_source,
                summary,
                deadline: timeout,
                name,
            }),
        })
    }
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field(
                "seeds",
                &self
                    .seeds
                    .iter()
                    .map(|s| crate::connect::redact_userinfo(s))
                    .collect::<Vec<_>>(),
            )
            .field(
                "credentials",
                &self.credentials.as_ref().map(|c| {
                    if c.is_static() {
                        "static <redacted>"
                    } else {
                        "provider"
                    }
                }),
            )
            .field("tls", &self.tls)
            .field("timeout", &self.timeout)
            .field("read_from_replicas", &self.read_from_replicas)
            .field("concurrency_limit", &self.concurrency_limit)
            .finish_non_exhaustive()
    }
}

type Refreshed<C> = Either<crate::read::ReadRouting<TopologyRefresh<Rebuild<C>>>, Rebuild<C>>;
type Limited<C> = Either<tower::limit::ConcurrencyLimit<Refreshed<C>>, Refreshed<C>>;
/// The helpers' stack: Retry (when on) → ConcurrencyLimit (when set) → ReadRouting (a
/// pass-through unless a read policy or fail-fast is set) and TopologyRefresh (when refresh is
/// on) → Rebuild. Named, so that a helper's call is one future, not a boxed one.
type Core<C> = Either<Retry<Limited<C>>, Limited<C>>;

/// What a [`Client`] needs of the service its connector makes: commands and pipelines, taken
/// by value and shared (the retry layer shares one request between its attempts), with the
/// crate's [`Error`], `Send` futures and cheap clones. [`RedisService`](crate::RedisService)
/// over any redis connection is one; nothing needs to implement it by hand.
pub trait InnerService:
    Service<Cmd, Response = Value, Error = Error, Future: Send + 'static>
    + Service<Arc<Cmd>, Response = Value, Error = Error, Future: Send + 'static>
    + Service<Pipeline, Response = Vec<Value>, Error = Error, Future: Send + 'static>
    + Service<Arc<Pipeline>, Response = Vec<Value>, Error = Error, Future: Send + 'static>
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> InnerService for S where
    S: Service<Cmd, Response = Value, Error = Error, Future: Send + 'static>
        + Service<Arc<Cmd>, Response = Value, Error = Error, Future: Send + 'static>
        + Service<Pipeline, Response = Vec<Value>, Error = Error, Future: Send + 'static>
        + Service<Arc<Pipeline>, Response = Vec<Value>, Error = Error, Future: Send + 'static>
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// The layers `Client` puts above the topology refresh (or rebuild) layer.
struct Layers {
    retry: Option<RetryConfig>,
    limit: Option<usize>,
}

impl Layers {
    /// Retry → ConcurrencyLimit around `inner`. The overall deadline is the client's own, not
    /// a Timeout layer: it covers readiness as well, with one timer per call.
    fn stack<C: Connect>(self, inner: Refreshed<C>) -> Core<C>
    where
        C::Service: InnerService,
    {
        ServiceBuilder::new()
            .option_layer(self.retry.map(RetryLayer::new))
            .option_layer(self.limit.map(tower::limit::ConcurrencyLimitLayer::new))
            .service(inner)
    }
}

/// The `Client` as a connection of the redis crate: every `redis::AsyncCommands` method
/// (`client.get(..)`, `client.set(..)`, `client.xadd(..)`), `Cmd::query_async(&mut client)`,
/// `Pipeline::query_async` and `redis::Script::invoke_async` go through the whole stack —
/// deadline, retries with their idempotency rules, rebuilds, topology refresh.
///
/// Errors arrive as the redis crate's: a command the server rejected as the server sent it (so
/// `redis::Script` loads a script again when a replaced node answers `NOSCRIPT`), anything
/// else as an I/O error carrying the crate's [`Error`] — [`Error::of_redis`] gives it back,
/// [`Sent`](crate::Sent) included. See [`Error::into_redis`].
///
/// A pipeline made with `ignore_errors()` fails as a whole at its first error reply here (the
/// redis crate does not let the client see that flag); send such pipelines with
/// [`Client::send_pipeline`] and look at each reply, or send their commands one by one.
///
/// ```no_run
/// use redis::AsyncCommands;
/// use tower_redis_cluster::Client;
///
/// # async fn run() -> redis::RedisResult<()> {
/// let mut client = Client::builder()
///     .seed("clustercfg.my-cluster.example.com:6379")
///     .build()
///     .await
///     .map_err(tower_redis_cluster::Error::into_redis)?;
/// let () = client.set("greeting", "hello").await?;
/// let greeting: String = client.get("greeting").await?;
/// let visits: i64 = client.incr("visits", 1).await?; // never sent twice behind one Ok
/// # Ok(()) }
/// ```
impl<C: Connect> redis::aio::ConnectionLike for Client<C>
where
    C::Service: InnerService,
{
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> redis::RedisFuture<'a, Value> {
        let now = Instant::now();
        Box::pin(async move {
            self.send_request(cmd.clone(), now)
                .await
                .map_err(Error::into_redis)
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        let now = Instant::now();
        Box::pin(async move {
            // `Pipeline::query_async` asks for every reply of a plain pipeline, and for the
            // one `EXEC` reply of a transaction; it drops the ignored commands' replies itself.
            let transaction = pipeline.is_transaction();
            let expected = if transaction {
                (pipeline.len() + 1, 1)
            } else {
                (0, pipeline.len())
            };
            if (offset, count) != expected {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "a pipeline read from reply {offset} for {count} replies: the client \
                         returns all of them (plain) or the transaction's result"
                    ),
                )
                .with_sent(crate::Sent::No)
                .into_redis());
            }
            // The stack answers one value per command not ignored: ask for all of them.
            let mut every = redis::pipe();
            if transaction {
                every.atomic();
            }
            for cmd in pipeline.cmd_iter() {
                every.add_command(cmd.clone());
            }
            let values: Vec<Value> = self
                .send_request(every, now)
                .await
                .map_err(Error::into_redis)?;
            Ok(if transaction {
                vec![Value::Array(values)]
            } else {
                values
            })
        })
    }

    fn get_db(&self) -> i64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tls_options_fail_the_build_naming_the_feature_it_lacks() {
        let asked = [
            Client::builder()
                .seed("cluster.example.com:6379")
                .tls(TlsConfig::webpki_roots()),
            Client::builder().seed("rediss://cluster.example.com:6379"),
        ];
        for builder in asked {
            let built = builder.build().await;
            if cfg!(feature = "tls") {
                assert!(built.is_ok(), "{:?}", built.err());
            } else {
                let err = built.unwrap_err();
                assert_eq!(err.kind(), ErrorKind::Config, "{err}");
                assert!(err.to_string().contains("`tls` feature"), "{err}");
            }
        }
    }
}
