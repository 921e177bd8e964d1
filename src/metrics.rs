//! Counters, gauges and one histogram through the [`metrics`](https://docs.rs/metrics) facade (feature
//! `metrics`); without the feature every function here compiles to nothing.
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `redis_cluster_calls_total` | counter | `client`, `outcome` = `ok` or an [`ErrorKind`](crate::ErrorKind) name | calls through a `Client` |
//! | `redis_cluster_retries_total` | counter | `client`, `kind` | retries and followed redirections |
//! | `redis_cluster_retry_budget_exhausted_total` | counter | `client` | retries refused by the budget |
//! | `redis_cluster_rebuilds_total` | counter | `client` | inner clients made (the first one included) |
//! | `redis_cluster_connect_failures_total` | counter | `client`, `kind` | failed connects of the rebuild layer |
//! | `redis_cluster_generation` | gauge | `client` | generation of the current inner client |
//! | `redis_cluster_topology_refreshes_total` | counter | `client`, `outcome` = `ok` / `error` | topology refreshes |
//! | `redis_cluster_topology_changes_total` | counter | `client` | refreshes that found a change |
//! | `redis_cluster_topology_seconds_since_change` | gauge | `client` | at the last refresh, seconds since the topology last changed |
//! | `redis_cluster_replica_reads_total` | counter | `client`, `reason` = `primary failed` / `primary slow` / `primary known down` / `shard failing fast` / `replica preferred` | reads served off the inner client's route — by a replica, or the master over the read layer's own connection ([`ReadPolicy`](crate::read::ReadPolicy)) |
//! | `redis_cluster_shard_fail_fast_total` | counter | `client` | calls refused at a shard without a serving primary ([`FailFastConfig`](crate::read::FailFastConfig)); reads then go to a replica when they can, and count in `replica_reads_total` too |
//! | `redis_cluster_shard_down_total` | counter | `client` | times a shard was marked down (its calls start failing fast) |
//! | `redis_cluster_pubsub_subscriptions` | gauge | `client` | subscriptions the client's [`Subscriber`](crate::pubsub::Subscriber)s hold (wanted, established or not) |
//! | `redis_cluster_pubsub_lost_total` | counter | `client`, `kind` = `channel` / `pattern` / `sharded` | subscriptions lost (each a gap) |
//! | `redis_cluster_pubsub_resubscribed_total` | counter | `client`, `kind` | subscriptions re-established |
//! | `redis_cluster_pubsub_gap_seconds` | histogram | `client`, `kind` | how long re-established subscriptions were down |
//! | `redis_cluster_pubsub_dropped_total` | counter | `client` | messages dropped because the consumer fell behind |
//!
//! The `client` label tells the clients of one process apart:
//! [`ClientBuilder::name`](crate::ClientBuilder::name) — by default the client's first seed —
//! or, for layers stacked by hand, `client_name` on each layer's configuration (default
//! `default`). No label ever
//! carries a key, an argument or a credential.

use std::sync::Arc;

/// The `client` label of a layer's metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ClientName(pub(crate) Arc<str>);

impl Default for ClientName {
    fn default() -> Self {
        ClientName(Arc::from("default"))
    }
}

impl ClientName {
    pub(crate) fn new(name: impl Into<String>) -> Self {
        ClientName(Arc::from(name.into()))
    }
}

#[cfg(feature = "metrics")]
mod enabled {
    use std::time::Instant;

    use super::ClientName;
    use crate::ErrorKind;

    pub(crate) fn call_finished(client: &ClientName, outcome: Result<(), ErrorKind>) {
        let outcome = match outcome {
            Ok(()) => "ok",
            Err(kind) => kind.as_str(),
        };
        metrics::counter!("redis_cluster_calls_total", "client" => client.0.clone(), "outcome" => outcome)
            .increment(1);
    }

    /// Named by a retry policy (a `&str`: a custom policy knows no [`ClientName`]); retries are
    /// rare enough for the copy.
    pub(crate) fn retry(client: &str, kind: ErrorKind) {
        metrics::counter!("redis_cluster_retries_total", "client" => client.to_string(), "kind" => kind.as_str())
            .increment(1);
    }

    pub(crate) fn budget_exhausted(client: &ClientName) {
        metrics::counter!("redis_cluster_retry_budget_exhausted_total", "client" => client.0.clone())
            .increment(1);
    }

    pub(crate) fn rebuilt(client: &ClientName, generation: u64) {
        metrics::counter!("redis_cluster_rebuilds_total", "client" => client.0.clone())
            .increment(1);
        metrics::gauge!("redis_cluster_generation", "client" => client.0.clone())
            .set(generation as f64);
    }

    pub(crate) fn connect_failed(client: &ClientName, kind: ErrorKind) {
        metrics::counter!("redis_cluster_connect_failures_total", "client" => client.0.clone(), "kind" => kind.as_str())
            .increment(1);
    }

    pub(crate) fn refreshed(
        client: &ClientName,
        ok: bool,
        changed: bool,
        last_change: Option<Instant>,
    ) {
        let outcome = if ok { "ok" } else { "error" };
        metrics::counter!("redis_cluster_topology_refreshes_total", "client" => client.0.clone(), "outcome" => outcome)
            .increment(1);
        if changed {
            metrics::counter!("redis_cluster_topology_changes_total", "client" => client.0.clone())
                .increment(1);
        }
        if let Some(at) = last_change {
            metrics::gauge!("redis_cluster_topology_seconds_since_change", "client" => client.0.clone())
                .set(at.elapsed().as_secs_f64());
        }
    }
    pub(crate) fn replica_read(client: &ClientName, reason: &'static str) {
        metrics::counter!("redis_cluster_replica_reads_total", "client" => client.0.clone(), "reason" => reason)
            .increment(1);
    }

    pub(crate) fn fail_fast(client: &ClientName) {
        metrics::counter!("redis_cluster_shard_fail_fast_total", "client" => client.0.clone())
            .increment(1);
    }

    pub(crate) fn fail_fast_tripped(client: &ClientName) {
        metrics::counter!("redis_cluster_shard_down_total", "client" => client.0.clone())
            .increment(1);
    }

    pub(crate) fn pubsub_subscriptions(client: &str, was: usize, now: usize) {
        if was != now {
            metrics::gauge!("redis_cluster_pubsub_subscriptions", "client" => client.to_string())
                .increment(now as f64 - was as f64);
        }
    }

    pub(crate) fn pubsub_lost(client: &str, kind: &'static str, n: usize) {
        metrics::counter!("redis_cluster_pubsub_lost_total", "client" => client.to_string(), "kind" => kind)
            .increment(n as u64);
    }

    pub(crate) fn pubsub_resubscribed(
        client: &str,
        kind: &'static str,
        n: usize,
        gap: std::time::Duration,
    ) {
        metrics::counter!("redis_cluster_pubsub_resubscribed_total", "client" => client.to_string(), "kind" => kind)
            .increment(n as u64);
        metrics::histogram!("redis_cluster_pubsub_gap_seconds", "client" => client.to_string(), "kind" => kind)
            .record(gap.as_secs_f64());
    }

    pub(crate) fn pubsub_dropped(client: &str, n: u64) {
        metrics::counter!("redis_cluster_pubsub_dropped_total", "client" => client.to_string())
            .increment(n);
    }
}

#[cfg(not(feature = "metrics"))]
mod enabled {
    use std::time::Instant;

    use super::ClientName;
    use crate::ErrorKind;

    #[inline(always)]
    pub(crate) fn call_finished(_: &ClientName, _: Result<(), ErrorKind>) {}
    #[inline(always)]
    pub(crate) fn retry(_: &str, _: ErrorKind) {}
    #[inline(always)]
    pub(crate) fn budget_exhausted(_: &ClientName) {}
    #[inline(always)]
    pub(crate) fn rebuilt(_: &ClientName, _: u64) {}
    #[inline(always)]
    pub(crate) fn connect_failed(_: &ClientName, _: ErrorKind) {}
    #[inline(always)]
    pub(crate) fn refreshed(_: &ClientName, _: bool, _: bool, _: Option<Instant>) {}
    #[inline(always)]
    pub(crate) fn replica_read(_: &ClientName, _: &'static str) {}
    #[inline(always)]
    pub(crate) fn fail_fast(_: &ClientName) {}
    #[inline(always)]
    pub(crate) fn fail_fast_tripped(_: &ClientName) {}
    #[inline(always)]
    pub(crate) fn pubsub_subscriptions(_: &str, _: usize, _: usize) {}
    #[inline(always)]
    pub(crate) fn pubsub_lost(_: &str, _: &'static str, _: usize) {}
    #[inline(always)]
    pub(crate) fn pubsub_resubscribed(_: &str, _: &'static str, _: usize, _: std::time::Duration) {}
    #[inline(always)]
    pub(crate) fn pubsub_dropped(_: &str, _: u64) {}
}

pub(crate) use enabled::*;
