//! [`StandardRetryPolicy`]: error kind × idempotency × `Sent`, backoff with full jitter, a
//! retry budget.

use std::{
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use redis::{Cmd, Pipeline};
use tokio::time::Instant;

use super::{Action, Attempt, RetryConfig, RetryPolicy};
use crate::{backoff::JitteredBackoff, ErrorKind, Idempotency, Sent};

/// The usual retry policy, configured by a [`RetryConfig`].
///
/// For each failed attempt, in this order:
///
/// 1. a [`NonIdempotent`](Idempotency::NonIdempotent) request is sent again only if the error
///    proves it did not take effect ([`Sent::No`]); read-only and idempotent requests are sent
///    again whatever [`Sent`] says;
/// 2. a redirection (`MOVED`/`ASK`) is followed at once ([`Action::Follow`]: no backoff, no
///    budget, not counted as a retry), up to [`max_redirects`](RetryConfig::max_redirects)
///    per call — unless it names the same slot and node as the call's previous redirection
///    (see below);
/// 3. only [transient kinds](StandardRetryPolicy::is_retryable) are retried: `TryAgain`,
///    `ClusterDown`, `Loading`, `MasterDown`, `ReadOnly`, `Connection`, `Timeout` and
///    `Unreachable`, and repeated redirections; never `Command`, `Auth`, `Config` or `Closed`;
/// 4. at most [`max_retries`](RetryConfig::max_retries) retries per call;
/// 5. the delay is the next of the call's own full-jitter backoff sequence; a retry that
///    would start at or after the call's deadline is not made;
/// 6. the retry must be paid from the [budget](RetryConfig::budget); when it is empty the
///    caller gets the attempt's own error, and a warning (at most one per second) says so.
///
/// # Repeated redirections
///
/// A redirection reaches this layer only after the inner client followed it itself and ran
/// out of its own retries. When a master has crashed, the other nodes answer `MOVED` to that
/// dead master until a replica is promoted (seconds, paced by the cluster's node timeout):
/// following that `MOVED` again at once only repeats what the inner client just did, five
/// times in a millisecond. So a redirection to the same slot and node as the call's previous
/// one is treated as what it is — a failover in progress — and retried like `CLUSTERDOWN`:
/// counted, after a backoff, paid from the budget. A redirection to a new target (a slot
/// migration moving on) is still followed at once.
#[derive(Clone)]
pub struct StandardRetryPolicy {
    shared: Arc<Shared>,
    /// What a call that failed remembers, made at its first failure (the policy is cloned per
    /// call; a call that succeeds carries only a null pointer for it).
    failed: Option<Box<Failed>>,
}

#[derive(Clone, Debug, Default)]
struct Failed {
    /// This call's delays, made at its first backoff.
    backoff: Option<JitteredBackoff>,
    /// The target (slot, node) of this call's last redirection.
    last_redirect: Option<(u16, String)>,
}

struct Shared {
    config: RetryConfig,
    /// Origin of `last_budget_warning_ms`.
    origin: Instant,
    last_budget_warning_ms: AtomicU64,
}

impl StandardRetryPolicy {
    /// The policy with this configuration.
    pub fn new(config: RetryConfig) -> Self {
        StandardRetryPolicy {
            shared: Arc::new(Shared {
                config,
                origin: Instant::now(),
                last_budget_warning_ms: AtomicU64::new(0),
            }),
            failed: None,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &RetryConfig {
        &self.shared.config
    }

    /// The retry budget, if any (shared by every clone).
    pub fn budget(&self) -> Option<&super::SharedBudget> {
        self.shared.config.budget.as_ref()
    }

    /// Whether an error of `kind` may go away if the same request is sent again: the cluster
    /// is moving (`TryAgain`, `ClusterDown`, `Loading`, `MasterDown`, `ReadOnly`) or the network
    /// failed (`Connection`, `Timeout`, `Unreachable`). Redirections are handled apart.
    pub fn is_retryable(kind: ErrorKind) -> bool {
        // Redirections are followed without counting (or retried when repeated); see `retry`.
        // A call failed fast for a dead shard ends fast: retrying it within the call would
        // wait out the deadline again, which is what failing fast avoids.
        kind.is_transient() && !kind.is_redirect() && kind != ErrorKind::ShardDown
    }

    fn next_delay(&mut self) -> Duration {
        // Every sequence `make()` hands out has its own random stream, so callers that failed
        // together (a failover) do not retry in lock-step.
        let maker = &self.shared.config.backoff;
        self.failed
            .get_or_insert_default()
            .backoff
            .get_or_insert_with(|| maker.make())
            .next_delay()
    }

    fn budget_exhausted(&self, attempt: &Attempt<'_>) {
        let error = attempt.error();
        // During an outage every call finds the budget empty; one warning a second is enough
        // to see it, the rest go to debug.
        let now_ms = self.shared.origin.elapsed().as_millis() as u64 + 1;
        let last = self.shared.last_budget_warning_ms.load(Ordering::Relaxed);
        let warn = (last == 0 || now_ms.saturating_sub(last) >= 1000)
            && self
                .shared
                .last_budget_warning_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        crate::metrics::budget_exhausted(&self.shared.config.client_name);
        if warn {
            tracing::warn!(
                kind = %error.kind(),
                attempt = attempt.attempt(),
                "retry budget exhausted: returning the error instead of retrying"
            );
        } else {
            tracing::debug!(
                kind = %error.kind(),
                attempt = attempt.attempt(),
                "retry budget exhausted: returning the error instead of retrying"
            );
        }
    }
}

impl fmt::Debug for StandardRetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StandardRetryPolicy")
            .field("config", &self.shared.config)
            .field("failed", &self.failed)
            .finish()
    }
}

impl RetryPolicy for StandardRetryPolicy {
    fn client_name(&self) -> &str {
        &self.shared.config.client_name.0
    }

    fn idempotency(&self, cmd: &Cmd) -> Idempotency {
        self.shared.config.idempotency.classify(cmd)
    }

    fn pipeline_idempotency(&self, pipeline: &Pipeline) -> Idempotency {
        self.shared.config.idempotency.classify_pipeline(pipeline)
    }

    fn deadline(&self) -> Option<Duration> {
        self.shared.config.deadline
    }

    fn on_call(&mut self) {
        // Every call earns retries, so the budget follows the traffic: a busy service may
        // retry more, and an outage cannot multiply the load beyond the configured share.
        if let Some(budget) = &self.shared.config.budget {
            budget.deposit();
        }
    }

    fn retry(&mut self, attempt: &Attempt<'_>) -> Action {
        let shared = self.shared.clone();
        let config = &shared.config;
        let error = attempt.error();
        // Checked first, for redirections too: only a proof that nothing was applied makes a
        // second INCR safe.
        if attempt.idempotency() == Idempotency::NonIdempotent && error.sent() != Sent::No {
            return Action::Stop;
        }
        let mut repeated_redirect = false;
        if error.kind().is_redirect() {
            let target = error.redirect();
            let failed = self.failed.get_or_insert_default();
            repeated_redirect = target.is_some() && target == failed.last_redirect;
            failed.last_redirect = target;
            if !repeated_redirect {
                if attempt.redirects() > config.max_redirects {
                    tracing::debug!(
                        redirects = attempt.redirects(),
                        "redirect limit reached: returning the redirection"
                    );
                    return Action::Stop;
                }
                return Action::Follow;
            }
        }
        if !(repeated_redirect || Self::is_retryable(error.kind()))
            || attempt.attempt() > config.max_retries
        {
            return Action::Stop;
        }
        let delay = self.next_delay();
        if attempt.remaining().is_some_and(|left| delay >= left) {
            // Checked before the budget, so a retry that cannot happen costs nothing.
            tracing::debug!(
                ?delay,
                remaining = ?attempt.remaining(),
                "no retry: the backoff would end after the call's deadline"
            );
            return Action::Stop;
        }
        if let Some(budget) = &config.budget {
            if !budget.withdraw() {
                self.budget_exhausted(attempt);
                return Action::Stop;
            }
        }
        Action::RetryAfter(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;
    use tower::retry::budget::Budget;

    fn attempt<'a>(error: &'a Error, idempotency: Idempotency, attempt: u32) -> Attempt<'a> {
        Attempt {
            error,
            idempotency,
            attempt,
            redirects: u32::from(error.kind().is_redirect()),
            elapsed: Duration::ZERO,
            remaining: None,
        }
    }

    fn moved(slot: u16, node: &str) -> Error {
        let raw = format!("-MOVED {slot} {node}\r\n");
        Error::from_redis(
            redis::parse_redis_value(raw.as_bytes())
                .unwrap()
                .extract_error()
                .unwrap_err(),
        )
    }

    fn config() -> RetryConfig {
        RetryConfig::new().without_budget().deadline(None)
    }

    #[tokio::test(start_paused = true)]
    async fn every_retry_is_jittered_under_a_growing_ceiling_and_calls_draw_apart() {
        let (floor, cap) = (Duration::from_millis(20), Duration::from_secs(1));
        // Calls clone one policy, as the service does; each clone has its own sequence.
        let template = StandardRetryPolicy::new(config().max_retries(20));
        let error = Error::new(ErrorKind::TryAgain, "x").with_sent(Sent::No);
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..50 {
            let mut policy = template.clone();
            for n in 1..=20u32 {
                // The n-th retry waits at most floor · 2^n: even the first one is jittered,
                // in [floor, 2 · floor].
                let ceiling = floor.saturating_mul(2u32.saturating_pow(n)).min(cap);
                match policy.retry(&attempt(&error, Idempotency::ReadOnly, n)) {
                    Action::RetryAfter(d) => {
                        assert!(
                            d >= floor && d <= ceiling,
                            "retry {n}: {d:?} outside [{floor:?}, {ceiling:?}]"
                        );
                        if n == 1 {
                            firsts.insert(d);
                        }
                    }
                    other => panic!("retry {n}: {other:?}"),
                }
            }
            assert_eq!(
                policy.retry(&attempt(&error, Idempotency::ReadOnly, 21)),
                Action::Stop
            );
        }
        // Not the floor every time, and not the same draw for every call.
        assert!(
            firsts.len() > 40,
            "first retries of 50 calls waited only {} distinct delays: {firsts:?}",
            firsts.len()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_past_the_deadline_costs_no_budget() {
        let budget =
            Arc::new(crate::retry::RetryBudget::new(Duration::from_secs(10), 1, 0.0).unwrap());
        // A floor of 1/s over 10 s: ten retries; spend all but one.
        for _ in 0..9 {
            assert!(budget.withdraw());
        }
        let mut policy = StandardRetryPolicy::new(config().shared_budget(budget.clone()));
        let error = Error::new(ErrorKind::Loading, "x").with_sent(Sent::No);
        let mut late = attempt(&error, Idempotency::ReadOnly, 1);
        late.remaining = Some(Duration::from_millis(5));
        assert_eq!(policy.retry(&late), Action::Stop);
        // The one token is still there for a retry that can happen.
        late.remaining = Some(Duration::from_secs(1));
        assert!(matches!(policy.retry(&late), Action::RetryAfter(_)));
        assert_eq!(policy.retry(&late), Action::Stop, "budget now empty");
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_same_redirection_twice_is_treated_as_a_failure() {
        let mut policy = StandardRetryPolicy::new(config());
        let a = moved(1, "10.0.0.1:7000");
        let b = moved(1, "10.0.0.2:7000");
        let other_slot = moved(2, "10.0.0.2:7000");
        let write = Idempotency::NonIdempotent;
        assert_eq!(policy.retry(&attempt(&a, write, 1)), Action::Follow);
        assert_eq!(policy.retry(&attempt(&b, write, 1)), Action::Follow);
        assert_eq!(
            policy.retry(&attempt(&other_slot, write, 1)),
            Action::Follow
        );
        assert!(matches!(
            policy.retry(&attempt(&other_slot, write, 1)),
            Action::RetryAfter(_)
        ));
        // A fresh call starts without history.
        let mut fresh = StandardRetryPolicy::new(config());
        assert_eq!(fresh.retry(&attempt(&a, write, 1)), Action::Follow);
    }

    #[test]
    fn debug_shows_every_knob() {
        let text = format!("{:?}", StandardRetryPolicy::new(RetryConfig::default()));
        for knob in [
            "max_retries: 16",
            "max_redirects: 5",
            "floor: 20ms",
            "cap: 1s",
            "deadline: Some(5s)",
            "budget: Some(",
        ] {
            assert!(text.contains(knob), "{knob} missing from {text}");
        }
    }
}
