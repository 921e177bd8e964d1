//! Knobs of the topology refresh layer.

use std::time::Duration;

use crate::{Error, ErrorKind};

/// Configuration of [`TopologyRefresh`](super::TopologyRefresh). Every choice is a setter.
#[derive(Clone, Debug)]
pub struct RefreshConfig {
    pub(crate) every: Option<Duration>,
    pub(crate) jitter: f64,
    pub(crate) min_interval: Duration,
    pub(crate) on_redirect: bool,
    pub(crate) on_connection_error: bool,
    pub(crate) on_cluster_down: bool,
    pub(crate) rebuild_when_unfollowable: bool,
    pub(crate) client_name: crate::metrics::ClientName,
}

impl RefreshConfig {
    /// Periodic refresh every 30 s; at most one refresh per second; both spread by ±10 %
    /// jitter; triggered by redirects, connection errors and `CLUSTERDOWN`/`READONLY`; asks for
    /// a rebuild when none of the nodes the inner client was built with remain.
    pub fn new() -> Self {
        RefreshConfig {
            every: Some(Duration::from_secs(30)),
            jitter: 0.1,
            min_interval: Duration::from_secs(1),
            on_redirect: true,
            on_connection_error: true,
            on_cluster_down: true,
            rebuild_when_unfollowable: true,
            client_name: crate::metrics::ClientName::default(),
        }
    }

    /// The `client` label of this layer's metrics (feature `metrics`), to tell the clients of
    /// one process apart. Default `default`; a [`Client`](crate::Client) sets its own name.
    pub fn client_name(mut self, name: impl Into<String>) -> Self {
        self.client_name = crate::metrics::ClientName::new(name);
        self
    }

    /// Refresh periodically, also when idle (`None` turns the timer off).
    pub fn every(mut self, interval: impl Into<Option<Duration>>) -> Self {
        self.every = interval.into();
        self
    }

    /// The relative jitter (0.0–1.0) applied to the period and the minimum interval, so that a
    /// fleet of clients does not refresh in lock-step.
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// The least time between two refreshes; triggers in between are coalesced into one.
    pub fn min_interval(mut self, min_interval: Duration) -> Self {
        self.min_interval = min_interval;
        self
    }

    /// Refresh when a `MOVED`/`ASK` reaches this layer.
    pub fn on_redirect(mut self, enabled: bool) -> Self {
        self.on_redirect = enabled;
        self
    }

    /// Refresh on `Connection`, `Timeout` and `Unreachable` errors.
    pub fn on_connection_error(mut self, enabled: bool) -> Self {
        self.on_connection_error = enabled;
        self
    }

    /// Refresh on `CLUSTERDOWN`, `TRYAGAIN`, `MASTERDOWN` and `READONLY`.
    pub fn on_cluster_down(mut self, enabled: bool) -> Self {
        self.on_cluster_down = enabled;
        self
    }

    /// Ask the rebuild layer for a new inner client when a snapshot shows none of the nodes
    /// known when the current client was made.
    pub fn rebuild_when_unfollowable(mut self, enabled: bool) -> Self {
        self.rebuild_when_unfollowable = enabled;
        self
    }

    pub(crate) fn triggers_on(&self, kind: ErrorKind) -> bool {
        match kind {
            ErrorKind::Moved | ErrorKind::Ask => self.on_redirect,
            ErrorKind::Connection | ErrorKind::Timeout | ErrorKind::Unreachable => {
                self.on_connection_error
            }
            ErrorKind::ClusterDown
            | ErrorKind::TryAgain
            | ErrorKind::MasterDown
            | ErrorKind::ReadOnly => self.on_cluster_down,
            _ => false,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        if !(0.0..=1.0).contains(&self.jitter) || self.jitter.is_nan() {
            return Err(Error::config("refresh jitter must be between 0.0 and 1.0"));
        }
        if self.every.is_some_and(|d| d.is_zero()) {
            return Err(Error::config(
                "the refresh period must be greater than zero (use every(None) to turn it off)",
            ));
        }
        Ok(())
    }
}

impl Default for RefreshConfig {
    fn default() -> Self {
        RefreshConfig::new()
    }
}
