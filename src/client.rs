//! [`Client`]: the ready-made stack, configured by a builder.
//!
//! `Client` is nothing but the public layers stacked with `ServiceBuilder` and boxed — the same
//! stack a user can assemble by hand, layer by layer (see the crate docs):
//!
//! ```text
//! Client            BoxCloneSyncService<Cmd, Value, Error> (+ one for Pipeline), Clone + Send + Sync
//!   Timeout         one deadline for the whole call, retries included
//!   Retry           kind × idempotency × Sent, backoff with full jitter, retry budget
//!   ConcurrencyLimit (optional)
//!   TopologyRefresh periodic + error-driven refresh, known nodes for rebuilds
//!   Rebuild         single-flight rebuild of the inner client from the seed names
//!   RedisService<ClusterConnection>
//! ```

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use redis::{Cmd, FromRedisValue, Pipeline, Value};
use tower::{util::BoxCloneSyncService, Service, ServiceBuilder, ServiceExt};

use crate::{
    connect::{ClusterConnector, Credentials, Resolve, Seeds, TlsConfig},
    rebuild::{Rebuild, RebuildConfig, RebuildHandle},
    retry::{RetryConfig, RetryLayer},
    topology::{RefreshConfig, TopologyHandle, TopologyRefreshLayer},
    Error, ErrorKind,
};

/// A cheap-to-clone handle to a Redis Cluster that survives failovers and node replacements.
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
#[derive(Clone)]
pub struct Client {
    /// The stack behind the `Service` interface: the Timeout layer on top.
    commands: BoxCloneSyncService<Cmd, Value, Error>,
    pipelines: BoxCloneSyncService<Pipeline, Vec<Value>, Error>,
    /// The same layers (shared state, not copies) without the Timeout layer, for `query`,
    /// `send` and `query_pipeline`: their one deadline covers readiness and call together.
    dispatch: Arc<dyn Dispatch>,
    rebuild: RebuildHandle,
    topology: Option<TopologyHandle>,
    summary: Arc<str>,
    deadline: Option<Duration>,
}

impl Client {
    /// Starts configuring a client.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// Runs `call` — readiness and call together — within the overall deadline. (tower's
    /// `Timeout` covers only the response future; waiting for a rebuild happens in `poll_ready`.)
    async fn within_deadline<T>(&self, call: BoxedCall<T>) -> Result<T, Error> {
        let result = match self.deadline {
            Some(deadline) => tokio::time::timeout(deadline, call)
                .await
                .unwrap_or_else(|_| {
                    let mut error = Error::timeout(format!(
                        "the call did not finish within its deadline ({deadline:?})"
                    ));
                    // While no inner client serves, the reason is the last connect failure.
                    let status = self.rebuild.status();
                    if let (false, Some(cause)) = (status.serving, status.last_error) {
                        error = error.with_source(cause);
                    }
                    Err(error)
                }),
            None => call.await,
        };
        record(result)
    }

    /// Sends a command and converts its reply.
    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, Error> {
        let value = self
            .within_deadline(self.dispatch.command(cmd.clone()))
            .await?;
        redis::from_redis_value(value).map_err(|e| {
            Error::new(
                ErrorKind::Command,
                "the reply does not convert to the requested type",
            )
            .with_source(e)
        })
    }

    /// Sends a command, taking it by value (no clone), and returns the raw reply.
    pub async fn send(&self, cmd: Cmd) -> Result<Value, Error> {
        self.within_deadline(self.dispatch.command(cmd)).await
    }

    /// Sends a pipeline and converts its replies (one per command not ignored).
    pub async fn query_pipeline<T: FromRedisValue>(&self, pipeline: &Pipeline) -> Result<T, Error> {
        let values = self
            .within_deadline(self.dispatch.pipeline(pipeline.clone()))
            .await?;
        redis::from_redis_value(Value::Array(values)).map_err(|e| {
            Error::new(
                ErrorKind::Command,
                "the replies do not convert to the requested type",
            )
            .with_source(e)
        })
    }

    /// The handle of the rebuild layer: generation, manual rebuilds.
    pub fn rebuild_handle(&self) -> &RebuildHandle {
        &self.rebuild
    }

    /// The handle of the topology refresh layer, when it is on.
    pub fn topology(&self) -> Option<&TopologyHandle> {
        self.topology.as_ref()
    }

    /// The generation of the inner cluster client (0 until the first connect).
    pub fn generation(&self) -> u64 {
        self.rebuild.generation()
    }

    /// Waits, at most `timeout`, until the first inner client is connected.
    pub async fn wait_connected(&self, timeout: Duration) -> Result<(), Error> {
        self.rebuild
            .wait_for_generation(1, timeout)
            .await
            .map(|_| ())
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("config", &self.summary)
            .field("generation", &self.rebuild.generation())
            .finish_non_exhaustive()
    }
}

impl Service<Cmd> for Client {
    type Response = Value;
    type Error = Error;
    type Future = <BoxCloneSyncService<Cmd, Value, Error> as Service<Cmd>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.commands.poll_ready(cx)
    }

    fn call(&mut self, cmd: Cmd) -> Self::Future {
        self.commands.call(cmd)
    }
}

impl Service<Pipeline> for Client {
    type Response = Vec<Value>;
    type Error = Error;
    type Future = <BoxCloneSyncService<Pipeline, Vec<Value>, Error> as Service<Pipeline>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.pipelines.poll_ready(cx)
    }

    fn call(&mut self, pipeline: Pipeline) -> Self::Future {
        self.pipelines.call(pipeline)
    }
}

/// Configures a [`Client`]. Each layer can be configured or turned off; nothing is hidden.
#[derive(Default)]
pub struct ClientBuilder {
    seeds: Vec<String>,
    credentials: Option<Credentials>,
    tls: Option<TlsConfig>,
    resolver: Option<Arc<dyn Resolve>>,
    connection_timeout: Option<Duration>,
    response_timeout: Option<Duration>,
    timeout: Option<Option<Duration>>,
    retry: Option<Option<RetryConfig>>,
    refresh: Option<Option<RefreshConfig>>,
    rebuild: Option<RebuildConfig>,
    read_from_replicas: bool,
    concurrency_limit: Option<usize>,
    inner_retries: Option<u32>,
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
        self.credentials = Some(Credentials::new(username, password));
        self
    }

    /// A password for the `default` user.
    pub fn password(mut self, password: impl Into<crate::connect::Secret>) -> Self {
        self.credentials = Some(Credentials::password(password));
        self
    }

    /// Connect over TLS (feature `tls`).
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

    /// At most `limit` calls in flight per client (and its clones); further callers wait in
    /// `poll_ready`.
    pub fn concurrency_limit(mut self, limit: usize) -> Self {
        self.concurrency_limit = Some(limit);
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
    pub async fn build(self) -> Result<Client, Error> {
        let seeds = Seeds::parse(&self.seeds)?;
        for (name, value) in [
            ("connection_timeout", self.connection_timeout),
            ("response_timeout", self.response_timeout),
            ("timeout", self.timeout.flatten()),
        ] {
            if value.is_some_and(|d| d.is_zero()) {
                return Err(Error::config(format!("{name} must be greater than zero")));
            }
        }
        if self.concurrency_limit == Some(0) {
            return Err(Error::config("concurrency_limit must be at least 1"));
        }

        let mut connector = ClusterConnector::new(seeds);
        if let Some(c) = self.credentials {
            connector = connector.credentials(c);
        }
        if let Some(t) = self.tls {
            connector = connector.tls(t);
        }
        if let Some(r) = self.resolver {
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

        let timeout = self.timeout.unwrap_or(Some(Duration::from_secs(5)));
        let retry = self.retry.unwrap_or_else(|| Some(RetryConfig::default()));
        // The retry layer must not start an attempt that the overall deadline would cut off.
        let retry = retry.map(|r| match (timeout, r.deadline) {
            (Some(t), Some(d)) if d <= t => r,
            (Some(t), _) => r.deadline(t),
            (None, _) => r,
        });
        let refresh = self
            .refresh
            .unwrap_or_else(|| Some(RefreshConfig::default()));

        let summary: Arc<str> = Arc::from(format!(
            "{connector:?}, timeout {timeout:?}, retry {}, topology refresh {}, concurrency limit {:?}",
            if retry.is_some() { "on" } else { "off" },
            if refresh.is_some() { "on" } else { "off" },
            self.concurrency_limit
        ));

        let source = connector.topology_source();
        let mut rebuild_config = self.rebuild.unwrap_or_default();
        // A caller of the Service interface waits for a rebuild in poll_ready, which the
        // Timeout layer does not cover: keep that wait inside the deadline too.
        if let Some(t) = timeout {
            if rebuild_config.max_wait > t {
                rebuild_config = rebuild_config.max_wait(t);
            }
        }
        let rebuild = Rebuild::new(connector, rebuild_config);
        let rebuild_handle = rebuild.handle();
        let layers = Layers {
            retry,
            timeout,
            limit: self.concurrency_limit,
        };
        let (stacks, topology) = match refresh {
            Some(config) => {
                let layer = TopologyRefreshLayer::new(source, config)
                    .rebuild_handle(rebuild_handle.clone());
                let refreshed = tower::Layer::layer(&layer, rebuild);
                let topology = refreshed.handle();
                (layers.stack(refreshed), Some(topology))
            }
            None => (layers.stack(rebuild), None),
        };
        Ok(Client {
            commands: stacks.commands,
            pipelines: stacks.pipelines,
            dispatch: stacks.dispatch,
            rebuild: rebuild_handle,
            topology,
            summary,
            deadline: timeout,
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
            .field("credentials", &self.credentials)
            .field("tls", &self.tls)
            .field("timeout", &self.timeout)
            .field("read_from_replicas", &self.read_from_replicas)
            .field("concurrency_limit", &self.concurrency_limit)
            .finish_non_exhaustive()
    }
}

type BoxedCall<T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send + 'static>>;

/// Sends through a clone of the concrete stack, without cloning a boxed service per call.
trait Dispatch: Send + Sync {
    fn command(&self, cmd: Cmd) -> BoxedCall<Value>;
    fn pipeline(&self, pipeline: Pipeline) -> BoxedCall<Vec<Value>>;
}

impl<S> Dispatch for S
where
    S: Service<Cmd, Response = Value, Error = Error>
        + Service<Pipeline, Response = Vec<Value>, Error = Error>
        + Clone
        + Send
        + Sync
        + 'static,
    <S as Service<Cmd>>::Future: Send + 'static,
    <S as Service<Pipeline>>::Future: Send + 'static,
{
    fn command(&self, cmd: Cmd) -> BoxedCall<Value> {
        Box::pin(ServiceExt::<Cmd>::oneshot(self.clone(), cmd))
    }

    fn pipeline(&self, pipeline: Pipeline) -> BoxedCall<Vec<Value>> {
        Box::pin(ServiceExt::<Pipeline>::oneshot(self.clone(), pipeline))
    }
}

/// The layers `Client` puts above the topology refresh (or rebuild) layer.
struct Layers {
    retry: Option<RetryConfig>,
    timeout: Option<Duration>,
    limit: Option<usize>,
}

struct Stacks {
    commands: BoxCloneSyncService<Cmd, Value, Error>,
    pipelines: BoxCloneSyncService<Pipeline, Vec<Value>, Error>,
    dispatch: Arc<dyn Dispatch>,
}

impl Layers {
    /// Retry → ConcurrencyLimit around `inner` for the helpers, and Timeout above that for the
    /// `Service` interface, boxed once for commands and once for pipelines. Every entry point
    /// shares the same inner state: one rebuild, refresher, budget and concurrency limit.
    fn stack<S>(self, inner: S) -> Stacks
    where
        S: Service<Cmd, Response = Value, Error = Error>
            + Service<Arc<Cmd>, Response = Value, Error = Error>
            + Service<Pipeline, Response = Vec<Value>, Error = Error>
            + Service<Arc<Pipeline>, Response = Vec<Value>, Error = Error>
            + Clone
            + Send
            + Sync
            + 'static,
        <S as Service<Cmd>>::Future: Send + 'static,
        <S as Service<Arc<Cmd>>>::Future: Send + 'static,
        <S as Service<Pipeline>>::Future: Send + 'static,
        <S as Service<Arc<Pipeline>>>::Future: Send + 'static,
    {
        let core = ServiceBuilder::new()
            .option_layer(self.retry.map(RetryLayer::new))
            .option_layer(self.limit.map(tower::limit::ConcurrencyLimitLayer::new))
            .service(inner);
        let timed = ServiceBuilder::new()
            .map_err(Error::from)
            .option_layer(self.timeout.map(tower::timeout::TimeoutLayer::new))
            .map_err(|e: Error| -> tower::BoxError { Box::new(e) })
            .service(core.clone());
        Stacks {
            commands: BoxCloneSyncService::new(ServiceExt::<Cmd>::map_result(
                timed.clone(),
                record::<Value>,
            )),
            pipelines: BoxCloneSyncService::new(ServiceExt::<Pipeline>::map_result(
                timed,
                record::<Vec<Value>>,
            )),
            dispatch: Arc::new(core),
        }
    }
}

/// Counts a finished call (a no-op without the `metrics` feature).
fn record<T>(result: Result<T, Error>) -> Result<T, Error> {
    crate::metrics::call_finished(result.as_ref().map(|_| ()).map_err(Error::kind));
    result
}
