//! Knobs of the standard retry policy.

use std::{fmt, sync::Arc, time::Duration};

use tower::retry::budget::Budget;

use super::RetryBudget;
use crate::{backoff::JitteredBackoffMaker, Error, IdempotencyTable};

/// A retry budget shared by every clone of the retry layer.
pub type SharedBudget = Arc<dyn Budget + Send + Sync>;

/// Configuration of [`StandardRetryPolicy`](super::StandardRetryPolicy). Every choice is a
/// setter; nothing is hidden.
///
/// ```
/// use std::time::Duration;
/// use tower_redis_cluster::{
///     retry::{RetryBudget, RetryConfig},
///     Idempotency, IdempotencyTable,
/// };
///
/// # fn main() -> Result<(), tower_redis_cluster::Error> {
/// let config = RetryConfig::new()
///     .max_retries(5)
///     .backoff(Duration::from_millis(50), Duration::from_secs(2))?
///     .deadline(Duration::from_secs(3))
///     // Retries may add at most 10 % of the last 10 s of calls, plus 5 per second.
///     .budget(RetryBudget::new(Duration::from_secs(10), 5, 0.1)?)
///     // Our one script overwrites a key with a fixed value: safe to send again.
///     .idempotency(IdempotencyTable::new().with_override("EVALSHA", Idempotency::Idempotent)?);
/// # let _ = config; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RetryConfig {
    pub(crate) max_retries: u32,
    pub(crate) max_redirects: u32,
    pub(crate) backoff: JitteredBackoffMaker,
    pub(crate) idempotency: IdempotencyTable,
    pub(crate) budget: Option<SharedBudget>,
    pub(crate) deadline: Option<Duration>,
    pub(crate) client_name: crate::metrics::ClientName,
}

impl RetryConfig {
    /// At most 16 retries per call, backing off from 20 ms to 1 s with full jitter (the 8
    /// first take about 2.2 s on average; all 16, about 6.3 s, 12.2 s at most) — so with the deadline of 5 s
    /// per call it is the deadline that ends the retries of a call through an outage, and a
    /// call with time left keeps trying until the failover is over (a failover that moves
    /// masters can take 8 retries in 2 s: repeated redirects to the dead node and
    /// `CLUSTERDOWN` while the promoted master rejoins); at most 5 redirections followed per
    /// call; the built-in idempotency table; the default [`RetryBudget`] (retries may add 20 %
    /// to the calls of the last 10 s, plus 10 per second).
    pub fn new() -> Self {
        RetryConfig {
            max_retries: 16,
            max_redirects: 5,
            backoff: JitteredBackoffMaker::new(Duration::from_millis(20), Duration::from_secs(1))
                .expect("valid default backoff"),
            idempotency: IdempotencyTable::new(),
            budget: Some(Arc::new(RetryBudget::default())),
            deadline: Some(Duration::from_secs(5)),
            client_name: crate::metrics::ClientName::default(),
        }
    }

    /// The `client` label of this layer's metrics (feature `metrics`), to tell the clients of
    /// one process apart. Default `default`; a [`Client`](crate::Client) sets its own name.
    pub fn client_name(mut self, name: impl Into<String>) -> Self {
        self.client_name = crate::metrics::ClientName::new(name);
        self
    }

    /// How many times a call may be sent again after failures. Following a redirection does
    /// not count (see [`max_redirects`](Self::max_redirects)). 0 disables retries of failures.
    pub fn max_retries(mut self, retries: u32) -> Self {
        self.max_retries = retries;
        self
    }

    /// How many `MOVED`/`ASK` redirections a call follows, on top of its retries.
    ///
    /// The inner cluster client follows redirections itself; one that reaches the retry layer
    /// means the client ran out of its own retries while slots were moving, so it is resent at
    /// once, without backoff and without spending budget. This bound keeps a redirection loop
    /// (two nodes that disagree about a slot) from spinning. A redirection to the same target
    /// as the call's previous one is not followed but retried, as a failure
    /// (see [`StandardRetryPolicy`](super::StandardRetryPolicy)).
    pub fn max_redirects(mut self, redirects: u32) -> Self {
        self.max_redirects = redirects;
        self
    }

    /// Delays between retries: exponential from `floor` to `cap`, full jitter. The n-th retry
    /// of a call (1-based) waits a delay drawn uniformly from `[floor, min(cap, floor · 2^n)]`
    /// — the first one from `[floor, 2 · floor]`, so not exactly `floor` — and every call draws
    /// from its own random stream, so calls that failed together do not retry together.
    /// Fails when `floor > cap` or `cap` is zero.
    pub fn backoff(mut self, floor: Duration, cap: Duration) -> Result<Self, Error> {
        self.backoff = JitteredBackoffMaker::new(floor, cap)?;
        Ok(self)
    }

    /// Which commands are safe to send again: the built-in table plus your overrides.
    pub fn idempotency(mut self, table: IdempotencyTable) -> Self {
        self.idempotency = table;
        self
    }

    /// The retry budget, shared by every clone of the service and by every service made from
    /// this configuration. Each call deposits into it; each retry of a failure withdraws. Any
    /// [`Budget`] fits: a [`RetryBudget`] (the default's type), tower's `TpsBudget`, your own.
    pub fn budget<B>(self, budget: B) -> Self
    where
        B: Budget + Send + Sync + 'static,
    {
        self.shared_budget(Arc::new(budget))
    }

    /// A budget you keep a handle on, to share it with other layers or to observe it (an
    /// `Arc<RetryBudget>` coerces).
    pub fn shared_budget(mut self, budget: SharedBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// No budget: retries are limited only per call. During a cluster-wide outage every call
    /// is then sent up to `max_retries + 1` times.
    pub fn without_budget(mut self) -> Self {
        self.budget = None;
        self
    }

    /// The overall deadline of one call — every attempt and every backoff — counted from the
    /// moment the call is made; `None` for none.
    ///
    /// A retry whose backoff would end at or after the deadline is not started: the caller
    /// gets the last error at once. A retry in flight at the deadline is abandoned with a
    /// `Timeout` error. The first attempt is not cut (that is a timeout layer's job, outside
    /// the retry layer); set the timeout layer's duration at least as long as this deadline.
    pub fn deadline(mut self, deadline: impl Into<Option<Duration>>) -> Self {
        self.deadline = deadline.into();
        self
    }
}

impl fmt::Debug for RetryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryConfig")
            .field("max_retries", &self.max_retries)
            .field("max_redirects", &self.max_redirects)
            .field("backoff", &self.backoff)
            .field("idempotency", &self.idempotency)
            .field("budget", &self.budget.as_ref().map(|_| "shared"))
            .field("deadline", &self.deadline)
            .finish()
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig::new()
    }
}
