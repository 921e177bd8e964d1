//! [`CallPolicy`]: one call's retry state, driving a [`RetryPolicy`] through tower's
//! [`Policy`] trait.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use redis::{Cmd, Pipeline};
use tokio::time::{Instant, Sleep};
use tower::retry::Policy;

use super::{Action, Attempt, RetryPolicy};
use crate::{Error, Idempotency, Sent};

/// The retry state of **one** call, as a [`tower::retry::Policy`] for `Cmd` and `Pipeline`.
///
/// It wraps the call's own clone of a [`RetryPolicy`] and keeps what the decisions need across
/// attempts: when the call started and its deadline, the attempt number, the redirections met,
/// the request's idempotency (classified once, at the first failure) and whether any attempt
/// may have taken effect.
///
/// [`Retry`](super::Retry) makes one in every `call()`. Do not hand one to tower's own
/// `tower::retry::Retry`: that service keeps a single policy value and clones it into each
/// response future, so the start time, deadline and counters would belong to no call in
/// particular.
///
/// What it enforces whatever the decision policy says:
/// * a retry whose delay would end at or after the deadline is not made;
/// * when it gives up after an attempt that may have taken effect, the error it leaves in the
///   result says [`Sent::Maybe`], even if the last attempt's own error said [`Sent::No`] — the
///   caller must not take a retried `SET` that timed out first for one that never ran.
pub struct CallPolicy<P> {
    policy: P,
    started: Instant,
    deadline: Option<Instant>,
    attempt: u32,
    redirects: u32,
    idempotency: Option<Idempotency>,
    maybe_applied: bool,
}

impl<P: RetryPolicy> CallPolicy<P> {
    /// Starts a call: `policy` is the call's own clone. Calls [`RetryPolicy::on_call`] and
    /// starts the deadline clock.
    pub fn new(policy: P) -> Self {
        CallPolicy::started_at(policy, Instant::now())
    }

    /// Like [`new`](Self::new), for a call that started at `started` (a caller that read the
    /// clock already, for a deadline of its own, passes that reading).
    pub fn started_at(mut policy: P, started: Instant) -> Self {
        policy.on_call();
        // A deadline too far to represent is no deadline.
        let deadline = policy.deadline().and_then(|d| started.checked_add(d));
        CallPolicy {
            policy,
            started,
            deadline,
            attempt: 1,
            redirects: 0,
            idempotency: None,
            maybe_applied: false,
        }
    }

    /// Moves the call's deadline `extra` later: a blocking command may take its own block time
    /// on top of the deadline.
    pub(crate) fn extend_deadline(&mut self, extra: Duration) {
        if !extra.is_zero() {
            self.deadline = self.deadline.and_then(|d| d.checked_add(extra));
        }
    }

    /// The call's decision policy.
    pub fn policy(&self) -> &P {
        &self.policy
    }

    /// The number of the current attempt (1 for the first; redirections followed with
    /// [`Action::Follow`] do not count).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Redirections met so far.
    pub fn redirects(&self) -> u32 {
        self.redirects
    }

    /// When the call started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// When the call's deadline passes, if it has one.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Whether an attempt that was retried may have taken effect.
    pub fn maybe_applied(&self) -> bool {
        self.maybe_applied
    }

    /// The error the caller gets when the call ends with `error`: [`Sent::Maybe`] if any earlier
    /// attempt may have taken effect, and never a bare redirection — one that was still not
    /// followed when the call ended means the shard has no reachable master yet (a failover in
    /// progress: the nodes keep pointing at a master that is gone), reported as
    /// [`ErrorKind::MasterDown`](crate::ErrorKind::MasterDown) with the redirection as its
    /// cause.
    pub fn final_error(&self, error: Error) -> Error {
        let error = if error.kind().is_redirect() {
            unfollowed_redirect(error)
        } else {
            error
        };
        if self.maybe_applied && error.sent() == Sent::No {
            error.with_sent(Sent::Maybe)
        } else {
            error
        }
    }

    fn decide<T>(
        &mut self,
        result: &mut Result<T, Error>,
        classify: impl FnOnce(&P) -> Idempotency,
    ) -> Option<Delay> {
        let Err(error) = result else {
            return None;
        };
        let idempotency = *self
            .idempotency
            .get_or_insert_with(|| classify(&self.policy));
        if error.kind().is_redirect() {
            self.redirects += 1;
        }
        let now = Instant::now();
        let remaining = self.deadline.map(|d| d.saturating_duration_since(now));
        let action = self.policy.retry(&Attempt {
            error,
            idempotency,
            attempt: self.attempt,
            redirects: self.redirects,
            elapsed: now.saturating_duration_since(self.started),
            remaining,
        });
        let (delay, follow) = match action {
            Action::Retry => (Duration::ZERO, false),
            Action::RetryAfter(delay) => (delay, false),
            Action::Follow => (Duration::ZERO, true),
            Action::Stop => {
                *error = self.final_error(error.clone());
                return None;
            }
        };
        if remaining.is_some_and(|left| delay >= left) {
            tracing::debug!(
                kind = %error.kind(),
                attempt = self.attempt,
                ?delay,
                ?remaining,
                "no retry: it would start after the call's deadline"
            );
            *error = self.final_error(error.clone());
            return None;
        }
        if error.sent() != Sent::No {
            self.maybe_applied = true;
        }
        crate::metrics::retry(self.policy.client_name(), error.kind());
        tracing::debug!(
            kind = %error.kind(),
            sent = ?error.sent(),
            idempotency = %idempotency,
            generation = error.generation(),
            attempt = self.attempt,
            redirects = self.redirects,
            follow,
            delay_ms = delay.as_secs_f64() * 1000.0,
            "retrying"
        );
        if !follow {
            self.attempt += 1;
        }
        Some(Delay::new(delay))
    }
}

/// A redirection the call ended on, as what it means to the caller.
fn unfollowed_redirect(error: Error) -> Error {
    let target = match error.redirect() {
        Some((slot, node)) => format!("slot {slot} is still redirected to {node}"),
        None => "the cluster still redirects the request".to_string(),
    };
    let mut reported = Error::new(
        crate::ErrorKind::MasterDown,
        format!(
            "{target}, which did not serve it within the call's deadline or redirect limit \
             (a failover or slot migration in progress)"
        ),
    )
    .with_sent(error.sent());
    if let Some(g) = error.generation() {
        reported = reported.with_generation(g);
    }
    // The redirection stays the cause (and `Error::redirect` still names its target).
    match error.shared_source() {
        Some(source) => reported.with_shared_source(source),
        None => reported.with_source(error),
    }
}

impl<P: fmt::Debug> fmt::Debug for CallPolicy<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallPolicy")
            .field("policy", &self.policy)
            .field("started", &self.started)
            .field("deadline", &self.deadline)
            .field("attempt", &self.attempt)
            .field("redirects", &self.redirects)
            .field("idempotency", &self.idempotency)
            .field("maybe_applied", &self.maybe_applied)
            .finish()
    }
}

/// Requests are shared (`Arc`): cloning one for a retry copies no command.
impl<P: RetryPolicy, T> Policy<Arc<Cmd>, T, Error> for CallPolicy<P> {
    type Future = Delay;

    fn retry(&mut self, req: &mut Arc<Cmd>, result: &mut Result<T, Error>) -> Option<Delay> {
        self.decide(result, |policy| policy.idempotency(req))
    }

    fn clone_request(&mut self, req: &Arc<Cmd>) -> Option<Arc<Cmd>> {
        Some(req.clone())
    }
}

impl<P: RetryPolicy, T> Policy<Arc<Pipeline>, T, Error> for CallPolicy<P> {
    type Future = Delay;

    fn retry(&mut self, req: &mut Arc<Pipeline>, result: &mut Result<T, Error>) -> Option<Delay> {
        self.decide(result, |policy| policy.pipeline_idempotency(req))
    }

    fn clone_request(&mut self, req: &Arc<Pipeline>) -> Option<Arc<Pipeline>> {
        Some(req.clone())
    }
}

/// The wait before a resend: none for an immediate one, the backoff otherwise.
pub struct Delay {
    duration: Duration,
    // Boxed: retries are rare, and the futures that hold a `Delay` stay small without it.
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Delay {
    fn new(duration: Duration) -> Self {
        Delay {
            duration,
            // No timer for an immediate resend: even an elapsed `Sleep` would register with
            // the timer wheel.
            sleep: (!duration.is_zero()).then(|| Box::pin(tokio::time::sleep(duration))),
        }
    }

    /// How long this delay lasts.
    pub fn duration(&self) -> Duration {
        self.duration
    }
}

impl Future for Delay {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.sleep {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Ready(()),
        }
    }
}

impl fmt::Debug for Delay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delay")
            .field("duration", &self.duration)
            .finish()
    }
}
