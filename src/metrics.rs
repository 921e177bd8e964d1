//! Counters and gauges through the [`metrics`](https://docs.rs/metrics) facade (feature
//! `metrics`); without the feature every function here compiles to nothing.
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `redis_cluster_calls_total` | counter | `outcome` = `ok` or an [`ErrorKind`](crate::ErrorKind) name | calls through a `Client` |
//! | `redis_cluster_retries_total` | counter | `kind` | retries and followed redirections |
//! | `redis_cluster_retry_budget_exhausted_total` | counter | — | retries refused by the budget |
//! | `redis_cluster_rebuilds_total` | counter | — | inner clients made (the first one included) |
//! | `redis_cluster_connect_failures_total` | counter | `kind` | failed connects of the rebuild layer |
//! | `redis_cluster_generation` | gauge | — | generation of the current inner client |
//! | `redis_cluster_topology_refreshes_total` | counter | `outcome` = `ok` / `error` | topology refreshes |
//! | `redis_cluster_topology_changes_total` | counter | — | refreshes that found a change |
//! | `redis_cluster_topology_seconds_since_change` | gauge | — | at the last refresh, seconds since the topology last changed |
//!
//! No label ever carries a key, an argument or a credential.

#[cfg(feature = "metrics")]
mod enabled {
    use std::time::Instant;

    use crate::ErrorKind;

    pub(crate) fn call_finished(outcome: Result<(), ErrorKind>) {
        let outcome = match outcome {
            Ok(()) => "ok",
            Err(kind) => kind.as_str(),
        };
        metrics::counter!("redis_cluster_calls_total", "outcome" => outcome).increment(1);
    }

    pub(crate) fn retry(kind: ErrorKind) {
        metrics::counter!("redis_cluster_retries_total", "kind" => kind.as_str()).increment(1);
    }

    pub(crate) fn budget_exhausted() {
        metrics::counter!("redis_cluster_retry_budget_exhausted_total").increment(1);
    }

    pub(crate) fn rebuilt(generation: u64) {
        metrics::counter!("redis_cluster_rebuilds_total").increment(1);
        metrics::gauge!("redis_cluster_generation").set(generation as f64);
    }

    pub(crate) fn connect_failed(kind: ErrorKind) {
        metrics::counter!("redis_cluster_connect_failures_total", "kind" => kind.as_str())
            .increment(1);
    }

    pub(crate) fn refreshed(ok: bool, changed: bool, last_change: Option<Instant>) {
        let outcome = if ok { "ok" } else { "error" };
        metrics::counter!("redis_cluster_topology_refreshes_total", "outcome" => outcome)
            .increment(1);
        if changed {
            metrics::counter!("redis_cluster_topology_changes_total").increment(1);
        }
        if let Some(at) = last_change {
            metrics::gauge!("redis_cluster_topology_seconds_since_change")
                .set(at.elapsed().as_secs_f64());
        }
    }
}

#[cfg(not(feature = "metrics"))]
mod enabled {
    use std::time::Instant;

    use crate::ErrorKind;

    #[inline(always)]
    pub(crate) fn call_finished(_: Result<(), ErrorKind>) {}
    #[inline(always)]
    pub(crate) fn retry(_: ErrorKind) {}
    #[inline(always)]
    pub(crate) fn budget_exhausted() {}
    #[inline(always)]
    pub(crate) fn rebuilt(_: u64) {}
    #[inline(always)]
    pub(crate) fn connect_failed(_: ErrorKind) {}
    #[inline(always)]
    pub(crate) fn refreshed(_: bool, _: bool, _: Option<Instant>) {}
}

pub(crate) use enabled::*;
