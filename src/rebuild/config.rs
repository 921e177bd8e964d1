//! Knobs of the rebuild layer.

use std::{fmt, sync::Arc, time::Duration};

use super::{DefaultRebuildPolicy, RebuildPolicy};
use crate::{backoff::JitteredBackoffMaker, Error};

/// Configuration of [`Rebuild`](super::Rebuild). Every choice is a setter; nothing is hidden.
#[derive(Clone)]
pub struct RebuildConfig {
    pub(crate) max_wait: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) backoff: JitteredBackoffMaker,
    pub(crate) policy: Arc<dyn RebuildPolicy>,
    pub(crate) eager: bool,
    pub(crate) client_name: crate::metrics::ClientName,
}

impl RebuildConfig {
    /// Callers wait at most 2 s for a client; one connect may take 10 s; failed connects back
    /// off from 100 ms to 5 s with full jitter; [`DefaultRebuildPolicy`]; the first connect
    /// starts as soon as the service is made.
    pub fn new() -> Self {
        RebuildConfig {
            max_wait: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(10),
            backoff: JitteredBackoffMaker::new(Duration::from_millis(100), Duration::from_secs(5))
                .expect("valid default backoff"),
            policy: Arc::new(DefaultRebuildPolicy::new()),
            eager: true,
            client_name: crate::metrics::ClientName::default(),
        }
    }

    /// The `client` label of this layer's metrics (feature `metrics`), to tell the clients of
    /// one process apart. Default `default`; a [`Client`](crate::Client) sets its own name.
    pub fn client_name(mut self, name: impl Into<String>) -> Self {
        self.client_name = crate::metrics::ClientName::new(name);
        self
    }

    /// How long a caller waits for a client while none can serve, before it gets
    /// `Unreachable`. This bounds every wait: there is no unbounded queue.
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }

    /// The longest one connect attempt may take.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Delays between failed connect attempts: exponential from `floor` to `cap`, full jitter.
    pub fn backoff(mut self, floor: Duration, cap: Duration) -> Result<Self, Error> {
        self.backoff = JitteredBackoffMaker::new(floor, cap)?;
        Ok(self)
    }

    /// The policy deciding from errors when to rebuild.
    pub fn policy(mut self, policy: impl RebuildPolicy) -> Self {
        self.policy = Arc::new(policy);
        self
    }

    /// Whether the first connect starts when the service is made (`true`) or on first use.
    pub fn eager(mut self, eager: bool) -> Self {
        self.eager = eager;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.connect_timeout.is_zero() {
            return Err(Error::config(
                "rebuild connect_timeout must be greater than zero",
            ));
        }
        Ok(())
    }
}

impl Default for RebuildConfig {
    fn default() -> Self {
        RebuildConfig::new()
    }
}

impl fmt::Debug for RebuildConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RebuildConfig")
            .field("max_wait", &self.max_wait)
            .field("connect_timeout", &self.connect_timeout)
            .field("backoff", &self.backoff)
            .field("eager", &self.eager)
            .finish_non_exhaustive()
    }
}
