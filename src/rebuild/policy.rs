//! When to rebuild: [`RebuildPolicy`] and its default.

use std::{
    fmt,
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
    time::Duration,
};

use tokio::time::Instant;

use crate::{Error, ErrorKind};

/// What a [`RebuildPolicy`] asks for after an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RebuildAction {
    /// Nothing: the inner client can handle it (or the caller must).
    None,
    /// Make a new inner client, and keep serving from the current one until it is ready
    /// (make-before-break). For a client that is degraded but may still work.
    Rebuild,
    /// The current client cannot serve any more: make a new one, and let new calls wait for it
    /// (at most `max_wait`) instead of failing on the old one.
    Replace,
}

/// Decides from the errors of the current inner client whether to rebuild it.
///
/// Of the `Connection` and `Timeout` errors of calls that were in flight together, the layer
/// passes on the first only: calls that fail together (one connection reset, or a dead node's
/// calls timing out at once while the other nodes serve) are one failure, not a streak.
///
/// Shared by every clone of the service, hence `&self` and `Sync`: keep state in atomics.
/// [`RebuildPolicy::on_success`] runs on every successful call, so it must be cheap.
pub trait RebuildPolicy: Send + Sync + 'static {
    /// An error from the current generation.
    fn on_error(&self, error: &Error) -> RebuildAction;

    /// A successful call.
    fn on_success(&self) {}

    /// A new inner client took over; forget what was learned about the old one.
    fn on_rebuilt(&self) {}
}

/// The default policy.
///
/// * `Unreachable` (no node can be reached, the redis-py #2472 state) → [`RebuildAction::Replace`].
/// * `threshold` consecutive `Connection`/`Timeout` errors, the first no longer than `window`
///   ago, with no success in between → [`RebuildAction::Rebuild`]. Calls in flight together
///   that fail together count once (see [`RebuildPolicy`]): one dead node of many does not
///   make a new client, which would dial the dead node too. Against nodes whose addresses
///   swallow packets, calls fail one response timeout after they start, so the streak grows
///   by one per response timeout at most: `threshold` response timeouts must fit in `window`
///   for this rule to fire (the `Unreachable` rule does not wait for it).
/// * A refused login (`Auth` other than `NOPERM`: `WRONGPASS`, `NOAUTH`, a failed `AUTH`) →
///   [`RebuildAction::Rebuild`]: the password or token the inner client holds was rotated, and
///   a new client asks the [credentials provider](crate::connect::CredentialsProvider) afresh.
///   The old client keeps serving meanwhile; a rebuild that fails the same way backs off.
/// * Everything else → [`RebuildAction::None`]: redirects and `CLUSTERDOWN` are topology
///   matters, command errors and missing permissions (`NOPERM`) are the caller's.
pub struct DefaultRebuildPolicy {
    threshold: u32,
    window: Duration,
    origin: Instant,
    streak: AtomicU32,
    streak_started_ms: AtomicU64,
}

impl DefaultRebuildPolicy {
    /// Rebuild after 5 consecutive connection/timeout errors within 10 s, or on `Unreachable`.
    pub fn new() -> Self {
        DefaultRebuildPolicy::with_threshold(5, Duration::from_secs(10))
    }

    /// Rebuild after `threshold` consecutive connection/timeout errors within `window`.
    /// A threshold of 0 disables that rule (only `Unreachable` rebuilds).
    pub fn with_threshold(threshold: u32, window: Duration) -> Self {
        DefaultRebuildPolicy {
            threshold,
            window,
            origin: Instant::now(),
            streak: AtomicU32::new(0),
            streak_started_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.origin)
            .as_millis() as u64
    }
}

impl Default for DefaultRebuildPolicy {
    fn default() -> Self {
        DefaultRebuildPolicy::new()
    }
}

impl fmt::Debug for DefaultRebuildPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DefaultRebuildPolicy")
            .field("threshold", &self.threshold)
            .field("window", &self.window)
            .field("streak", &self.streak.load(Ordering::Relaxed))
            .finish()
    }
}

impl RebuildPolicy for DefaultRebuildPolicy {
    fn on_error(&self, error: &Error) -> RebuildAction {
        match error.kind() {
            ErrorKind::Unreachable => RebuildAction::Replace,
            ErrorKind::Auth if error.server_code().as_deref() != Some("NOPERM") => {
                RebuildAction::Rebuild
            }
            ErrorKind::Connection | ErrorKind::Timeout if self.threshold > 0 => {
                let now = self.now_ms();
                let started = self.streak_started_ms.load(Ordering::Acquire);
                let window_ms = self.window.as_millis() as u64;
                let count = if self.streak.load(Ordering::Acquire) == 0
                    || now.saturating_sub(started) > window_ms
                {
                    // A new streak: the old one (if any) is too old to count.
                    self.streak_started_ms.store(now, Ordering::Release);
                    self.streak.store(1, Ordering::Release);
                    1
                } else {
                    self.streak.fetch_add(1, Ordering::AcqRel) + 1
                };
                if count >= self.threshold {
                    self.streak.store(0, Ordering::Release);
                    RebuildAction::Rebuild
                } else {
                    RebuildAction::None
                }
            }
            _ => RebuildAction::None,
        }
    }

    fn on_success(&self) {
        // A load before the store keeps the hot path free of cache-line writes.
        if self.streak.load(Ordering::Relaxed) != 0 {
            self.streak.store(0, Ordering::Relaxed);
        }
    }

    fn on_rebuilt(&self) {
        self.streak.store(0, Ordering::Release);
    }
}

/// A policy that never rebuilds on errors (rebuilds happen only through a
/// [`RebuildHandle`](super::RebuildHandle)).
#[derive(Debug, Clone, Copy, Default)]
pub struct ManualRebuildPolicy;

impl RebuildPolicy for ManualRebuildPolicy {
    fn on_error(&self, _error: &Error) -> RebuildAction {
        RebuildAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(kind: ErrorKind) -> Error {
        Error::new(kind, "test")
    }

    #[tokio::test(start_paused = true)]
    async fn unreachable_replaces_at_once() {
        let p = DefaultRebuildPolicy::new();
        assert_eq!(
            p.on_error(&err(ErrorKind::Unreachable)),
            RebuildAction::Replace
        );
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_connection_errors_within_window_rebuild() {
        let p = DefaultRebuildPolicy::with_threshold(3, Duration::from_secs(10));
        assert_eq!(p.on_error(&err(ErrorKind::Connection)), RebuildAction::None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(p.on_error(&err(ErrorKind::Timeout)), RebuildAction::None);
        assert_eq!(
            p.on_error(&err(ErrorKind::Connection)),
            RebuildAction::Rebuild
        );
        // The streak starts over after a decision.
        assert_eq!(p.on_error(&err(ErrorKind::Connection)), RebuildAction::None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_breaks_the_streak() {
        let p = DefaultRebuildPolicy::with_threshold(2, Duration::from_secs(10));
        assert_eq!(p.on_error(&err(ErrorKind::Connection)), RebuildAction::None);
        p.on_success();
        assert_eq!(p.on_error(&err(ErrorKind::Connection)), RebuildAction::None);
        assert_eq!(
            p.on_error(&err(ErrorKind::Connection)),
            RebuildAction::Rebuild
        );
    }

    #[tokio::test(start_paused = true)]
    async fn errors_spread_beyond_the_window_do_not_add_up() {
        let p = DefaultRebuildPolicy::with_threshold(2, Duration::from_secs(5));
        assert_eq!(p.on_error(&err(ErrorKind::Connection)), RebuildAction::None);
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(p.on_error(&err(ErrorKind::Connection)), RebuildAction::None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            p.on_error(&err(ErrorKind::Connection)),
            RebuildAction::Rebuild
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_login_rebuilds_with_fresh_credentials() {
        let p = DefaultRebuildPolicy::new();
        let wrongpass = Error::from_redis(
            redis::parse_redis_value(b"-WRONGPASS invalid username-password pair\r\n")
                .unwrap()
                .extract_error()
                .unwrap_err(),
        );
        assert_eq!(p.on_error(&wrongpass), RebuildAction::Rebuild);
        assert_eq!(p.on_error(&err(ErrorKind::Auth)), RebuildAction::Rebuild);
    }

    #[tokio::test(start_paused = true)]
    async fn other_kinds_never_rebuild() {
        let p = DefaultRebuildPolicy::with_threshold(1, Duration::from_secs(5));
        for kind in [
            ErrorKind::Moved,
            ErrorKind::Ask,
            ErrorKind::ClusterDown,
            ErrorKind::Command,
            ErrorKind::ReadOnly,
        ] {
            assert_eq!(p.on_error(&err(kind)), RebuildAction::None, "{kind:?}");
        }
        // A missing permission is the caller's: a new client would be refused the same way.
        let noperm = Error::from_redis(
            redis::parse_redis_value(b"-NOPERM no permissions to run the 'set' command\r\n")
                .unwrap()
                .extract_error()
                .unwrap_err(),
        );
        assert_eq!(noperm.kind(), ErrorKind::Auth);
        assert_eq!(p.on_error(&noperm), RebuildAction::None);
        assert_eq!(
            ManualRebuildPolicy.on_error(&err(ErrorKind::Unreachable)),
            RebuildAction::None
        );
    }
}
