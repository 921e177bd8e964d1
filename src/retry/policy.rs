//! The replaceable decision: [`RetryPolicy`], the view it decides from ([`Attempt`]) and what it
//! answers ([`Action`]).

use std::time::Duration;

use redis::{Cmd, Pipeline};

use crate::{command, Error, Idempotency, IdempotencyTable};

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// Send the request again at once, as a new attempt.
    Retry,
    /// Send the request again after this delay, as a new attempt.
    RetryAfter(Duration),
    /// Send the request again at once as a continuation of the same attempt: following a
    /// redirection, which says nothing about the health of the cluster. The attempt number does
    /// not grow, so a policy returning `Follow` must bound it itself (for example with
    /// [`Attempt::redirects`]).
    Follow,
    /// Give up: the caller gets this attempt's error.
    Stop,
}

/// A borrowed view of one failed attempt, handed to [`RetryPolicy::retry`].
#[derive(Debug)]
pub struct Attempt<'a> {
    pub(crate) error: &'a Error,
    pub(crate) idempotency: Idempotency,
    pub(crate) attempt: u32,
    pub(crate) redirects: u32,
    pub(crate) elapsed: Duration,
    pub(crate) remaining: Option<Duration>,
}

impl<'a> Attempt<'a> {
    /// The error of this attempt.
    pub fn error(&self) -> &'a Error {
        self.error
    }

    /// How safe the request is to send again (for a pipeline: its least safe command).
    pub fn idempotency(&self) -> Idempotency {
        self.idempotency
    }

    /// The number of this attempt, 1 for the first send.
    ///
    /// A resend the policy answered with [`Action::Follow`] (a redirection followed) does not
    /// start a new attempt: it has the number of the attempt that was redirected. So
    /// `attempt() - 1` is the number of retries that count against a limit.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// How many redirections (`MOVED`/`ASK`) this call has met, this attempt's included.
    pub fn redirects(&self) -> u32 {
        self.redirects
    }

    /// Time since the call started (its first attempt was sent).
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// Time left until the call's deadline, `None` when the call has none.
    ///
    /// The retry service refuses a retry whose delay would end at or after the deadline
    /// whatever the policy says; a policy can use this to stop earlier (and, for example, not
    /// spend budget on a retry that cannot happen).
    pub fn remaining(&self) -> Option<Duration> {
        self.remaining
    }
}

/// Decides whether a failed attempt is sent again, and when.
///
/// Modelled on tower-http's `follow_redirect::Policy`: the [`Retry`](super::Retry) service
/// **clones the policy for every call** and asks that clone about each failed attempt of the
/// call, so per-call state (a backoff sequence, counters) lives in `self`, and state shared by
/// all calls (a retry budget) belongs behind an `Arc`.
///
/// The service itself enforces what must hold whatever the policy says: a retry never starts
/// after the call's [`deadline`](RetryPolicy::deadline), a retry in flight does not outlive it,
/// and the error a caller finally gets says `Sent::Maybe` if *any* attempt may have taken
/// effect. Everything else — which errors, how often, how long to wait, the budget — is the
/// policy's. [`StandardRetryPolicy`](super::StandardRetryPolicy) is the usual answer; a custom
/// policy can wrap it and override single decisions:
///
/// ```
/// use std::time::Duration;
/// use tower_redis_cluster::{retry::{Action, Attempt, RetryConfig, RetryPolicy, StandardRetryPolicy}, ErrorKind};
///
/// /// The standard policy, but `LOADING` waits a whole second: a restarted node loads its
/// /// dataset far slower than a failover takes.
/// #[derive(Clone, Debug)]
/// struct PatientWithLoading(StandardRetryPolicy);
///
/// impl RetryPolicy for PatientWithLoading {
///     fn idempotency(&self, cmd: &redis::Cmd) -> tower_redis_cluster::Idempotency {
///         self.0.idempotency(cmd)
///     }
///     fn pipeline_idempotency(&self, pipe: &redis::Pipeline) -> tower_redis_cluster::Idempotency {
///         self.0.pipeline_idempotency(pipe)
///     }
///     fn deadline(&self) -> Option<Duration> {
///         self.0.deadline()
///     }
///     fn on_call(&mut self) {
///         self.0.on_call()
///     }
///     fn retry(&mut self, attempt: &Attempt<'_>) -> Action {
///         match self.0.retry(attempt) {
///             Action::RetryAfter(_) if attempt.error().kind() == ErrorKind::Loading => {
///                 Action::RetryAfter(Duration::from_secs(1))
///             }
///             action => action,
///         }
///     }
/// }
///
/// let policy = PatientWithLoading(StandardRetryPolicy::new(RetryConfig::default()));
/// # let _ = policy;
/// ```
pub trait RetryPolicy: Clone {
    /// How safe `cmd` is to send again. Asked at most once per call, and only when an attempt
    /// failed. Default: the built-in table ([`command::classify`]).
    fn idempotency(&self, cmd: &Cmd) -> Idempotency {
        command::classify(cmd)
    }

    /// How safe `pipeline` is to send again: by default its least safe command, by the
    /// built-in table.
    fn pipeline_idempotency(&self, pipeline: &Pipeline) -> Idempotency {
        IdempotencyTable::new().classify_pipeline(pipeline)
    }

    /// The overall deadline of one call, counted from the moment it is made; `None` for none.
    /// Default: none.
    fn deadline(&self) -> Option<Duration> {
        None
    }

    /// A call starts; `self` is the clone that will decide about this call only.
    /// Default: nothing.
    fn on_call(&mut self) {}

    /// The `client` label of the retry metrics (feature `metrics`). Default: `default`.
    fn client_name(&self) -> &str {
        "default"
    }

    /// An attempt failed: send it again (now or later), or stop and hand its error to the
    /// caller.
    fn retry(&mut self, attempt: &Attempt<'_>) -> Action;
}
