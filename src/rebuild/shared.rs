//! The state every clone of a [`Rebuild`](super::Rebuild) shares, and the one rebuild task.

use std::{
    fmt,
    panic::AssertUnwindSafe,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, Weak,
    },
    time::Duration,
};

use arc_swap::ArcSwapOption;
use futures_util::FutureExt;
use tokio::{sync::watch, time::Instant};

use super::{RebuildAction, RebuildConfig, RebuildStatus};
use crate::{
    connect::{Connect, ConnectHints, Endpoint},
    Error, ErrorKind,
};

/// The serving inner service and its generation.
pub(crate) struct Serving<S> {
    pub(crate) service: S,
    pub(crate) generation: u64,
}

/// The current generation as waiters see it (the service itself is in `serving`).
pub(crate) struct Slot {
    pub(crate) generation: u64,
    /// False once the policy said the service cannot serve (`Replace`): new calls wait.
    pub(crate) serving: bool,
}

struct Control {
    rebuilding: bool,
    /// One-shot extra seeds for the rebuild in flight or the next one.
    extra_seeds: Vec<Endpoint>,
    /// Addresses last seen in the cluster, used by every rebuild until replaced.
    known_nodes: Vec<Endpoint>,
    status: RebuildStatus,
}

pub(crate) struct Shared<C: Connect> {
    connector: C,
    pub(crate) config: RebuildConfig,
    /// Why the configuration cannot work, reported by every call of every clone.
    pub(crate) invalid: Option<Error>,
    pub(crate) slot: watch::Sender<Slot>,
    /// The serving service, readable without a lock (`slot` is behind one): the callers' path.
    pub(crate) serving: ArcSwapOption<Serving<C::Service>>,
    /// Bumped after every change of `slot`, so callers can tell with one load whether the
    /// service they cached is still the one to use.
    slot_version: AtomicU64,
    /// Connection and timeout errors the policy has been told of: a call reads it when it
    /// starts, and its failure reaches the policy only when no other did meanwhile.
    failures_told: AtomicU64,
    status: watch::Sender<RebuildStatus>,
    control: Mutex<Control>,
}

impl<C: Connect> fmt::Debug for Shared<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .field("status", &*self.status.borrow())
            .finish_non_exhaustive()
    }
}

/// Why a rebuild was asked for, for tracing.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Reason {
    Start,
    Policy,
    Handle,
}

impl<C> Shared<C>
where
    C: Connect,
    C::Service: Send + Sync + 'static,
{
    /// The version of `slot`: read it *before* reading the slot, and a cache made from that
    /// read is refreshed after any later change (the bump follows the change).
    pub(crate) fn slot_version(&self) -> u64 {
        self.slot_version.load(Ordering::Acquire)
    }

    fn slot_changed(&self) {
        self.slot_version.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn new(connector: C, config: RebuildConfig) -> Arc<Self> {
        let (slot, _) = watch::channel(Slot {
            generation: 0,
            serving: false,
        });
        let (status, _) = watch::channel(RebuildStatus::default());
        Arc::new(Shared {
            connector,
            invalid: config.validate().err(),
            config,
            slot,
            serving: ArcSwapOption::empty(),
            slot_version: AtomicU64::new(0),
            failures_told: AtomicU64::new(0),
            status,
            control: Mutex::new(Control {
                rebuilding: false,
                extra_seeds: Vec::new(),
                known_nodes: Vec::new(),
                status: RebuildStatus::default(),
            }),
        })
    }

    fn control(&self) -> std::sync::MutexGuard<'_, Control> {
        // A panic while holding this lock cannot leave it half-written in a way that matters
        // more than losing the client, so recover the guard.
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn connector(&self) -> &C {
        &self.connector
    }

    pub(crate) fn status_receiver(&self) -> watch::Receiver<RebuildStatus> {
        self.status.subscribe()
    }

    pub(crate) fn generation(&self) -> u64 {
        self.slot.borrow().generation
    }

    /// The last connect failure, to explain an `Unreachable` to a caller who waited.
    pub(crate) fn last_error(&self) -> Option<Error> {
        self.control().status.last_error.clone()
    }

    /// What a call reads as it starts, for [`observe_error`](Self::observe_error).
    pub(crate) fn failures_told(&self) -> u64 {
        self.failures_told.load(Ordering::Relaxed)
    }

    /// Feeds an error of generation `generation` to the policy and acts on its answer.
    /// `told` is what [`failures_told`](Self::failures_told) said when the call started: of
    /// the connection and timeout errors of calls in flight together — one node's connection
    /// reset, or a dead node's calls timing out at once while the others serve — the policy
    /// hears the first only.
    pub(crate) fn observe_error(self: &Arc<Self>, error: &Error, generation: u64, told: u64) {
        if generation < self.generation() {
            // Already replaced: the error says nothing about the current client.
            return;
        }
        if matches!(error.kind(), ErrorKind::Connection | ErrorKind::Timeout)
            && self
                .failures_told
                .compare_exchange(
                    told,
                    told.wrapping_add(1),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return;
        }
        let action = self.config.policy.on_error(error);
        if action != RebuildAction::None {
            tracing::debug!(
                error = %error,
                generation,
                ?action,
                "rebuild policy asked for a new client"
            );
            self.request(action, Some(generation), Vec::new(), Reason::Policy);
        }
    }

    pub(crate) fn observe_success(&self) {
        self.config.policy.on_success();
    }

    /// Asks for a rebuild. Single-flight: while one runs, requests only add their extra seeds
    /// (and may retire the current client); requests about an older generation are ignored.
    pub(crate) fn request(
        self: &Arc<Self>,
        action: RebuildAction,
        from_generation: Option<u64>,
        extra_seeds: Vec<Endpoint>,
        reason: Reason,
    ) {
        if action == RebuildAction::None || self.invalid.is_some() {
            return;
        }
        let mut control = self.control();
        let current = self.generation();
        if from_generation.is_some_and(|g| g < current) {
            return;
        }
        for seed in extra_seeds {
            if !control.extra_seeds.contains(&seed) {
                control.extra_seeds.push(seed);
            }
        }
        if action == RebuildAction::Replace {
            let retired = self.slot.send_if_modified(|slot| {
                let retire = slot.serving && slot.generation == current;
                if retire {
                    slot.serving = false;
                }
                retire
            });
            if retired {
                self.serving.store(None);
                self.slot_changed();
            }
            control.status.serving = false;
        }
        if control.rebuilding {
            tracing::trace!(generation = current, ?reason, "rebuild already in flight");
            self.status.send_replace(control.status.clone());
            return;
        }
        let runtime = match tokio::runtime::Handle::try_current() {
            Ok(runtime) => runtime,
            Err(_) => {
                tracing::warn!("rebuild requested outside a tokio runtime; it starts on first use");
                return;
            }
        };
        control.rebuilding = true;
        control.status.rebuilding = true;
        self.status.send_replace(control.status.clone());
        drop(control);
        tracing::info!(
            from_generation = current,
            ?reason,
            ?action,
            "rebuilding the inner client"
        );
        runtime.spawn(run(Arc::downgrade(self)));
    }

    /// Replaces the addresses every later rebuild adds to the seeds.
    pub(crate) fn set_known_nodes(&self, nodes: Vec<Endpoint>) {
        self.control().known_nodes = nodes;
    }

    /// Whether a rebuild is in flight.
    pub(crate) fn is_rebuilding(&self) -> bool {
        self.control().rebuilding
    }

    fn next_attempt(&self) -> (ConnectHints, u64) {
        let mut control = self.control();
        control.status.attempts += 1;
        let generation = self.generation() + 1;
        let hints = ConnectHints::new(generation).with_extra_seeds(
            control
                .extra_seeds
                .iter()
                .chain(control.known_nodes.iter())
                .cloned(),
        );
        (hints, control.status.attempts)
    }

    fn install(&self, service: C::Service, generation: u64, started: Instant, attempts: u32) {
        let mut control = self.control();
        control.rebuilding = false;
        control.extra_seeds.clear();
        control.status.generation = generation;
        control.status.rebuilding = false;
        control.status.serving = true;
        control.status.rebuilds += 1;
        control.status.last_error = None;
        control.status.last_rebuild = Some(std::time::Instant::now());
        self.serving.store(Some(Arc::new(Serving {
            service,
            generation,
        })));
        self.slot.send_replace(Slot {
            generation,
            serving: true,
        });
        self.slot_changed();
        self.config.policy.on_rebuilt();
        self.status.send_replace(control.status.clone());
        crate::metrics::rebuilt(&self.config.client_name, generation);
        tracing::info!(
            generation,
            attempts,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "inner client rebuilt"
        );
    }

    fn record_failure(&self, error: Error, attempt: u32, delay: Duration) {
        crate::metrics::connect_failed(&self.config.client_name, error.kind());
        tracing::warn!(
            error = %error,
            attempt,
            retry_in_ms = delay.as_millis() as u64,
            "connecting a new inner client failed"
        );
        let mut control = self.control();
        control.status.last_error = Some(error);
        self.status.send_replace(control.status.clone());
    }
}

/// Clears the in-flight mark if the task ends without installing a client — dropped by a
/// runtime that shut down, or unwound — so the next call starts a rebuild instead of waiting
/// for one that will never come.
struct InFlight<C: Connect>(Weak<Shared<C>>);

impl<C: Connect> Drop for InFlight<C> {
    fn drop(&mut self) {
        if let Some(shared) = self.0.upgrade() {
            let mut control = shared.control.lock().unwrap_or_else(|p| p.into_inner());
            if control.rebuilding {
                control.rebuilding = false;
                control.status.rebuilding = false;
                shared.status.send_replace(control.status.clone());
            }
        }
    }
}

/// The rebuild task: connect until it works, backing off with jitter; ends early when every
/// service and handle is gone.
async fn run<C>(weak: Weak<Shared<C>>)
where
    C: Connect,
    C::Service: Send + Sync + 'static,
{
    let _in_flight = InFlight(weak.clone());
    let started = Instant::now();
    let mut backoff = match weak.upgrade() {
        Some(shared) => shared.config.backoff.make(),
        None => return,
    };
    let mut attempt: u32 = 0;
    loop {
        let Some(shared) = weak.upgrade() else {
            return;
        };
        attempt += 1;
        let (hints, _) = shared.next_attempt();
        let generation = hints.generation;
        let timeout = shared.config.connect_timeout;
        // A connector that panics (a user's `Connect`) fails this attempt, like an error: the
        // rebuild backs off and tries again instead of dying with its in-flight mark set.
        let connecting = AssertUnwindSafe(async {
            match tokio::time::timeout(timeout, shared.connector.connect(&hints)).await {
                Ok(result) => result,
                Err(_) => Err(Error::timeout(format!(
                    "connecting a new inner client took longer than {timeout:?}"
                ))),
            }
        })
        .catch_unwind();
        let result = connecting.await.unwrap_or_else(|panic| {
            Err(Error::closed(format!(
                "the connector panicked: {}",
                crate::error::panic_message(&*panic)
            )))
        });
        match result {
            Ok(service) => {
                shared.install(service, generation, started, attempt);
                return;
            }
            Err(error) => {
                // A connector that knows when the next try is worth it (its connection checks
                // are paced while no node answers) is taken at its word; otherwise back off.
                let delay = match error.retry_at() {
                    Some(at) => at
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(10)),
                    None => backoff.next_delay(),
                };
                let paced = error.retry_at().is_some().then(|| error.clone());
                shared.record_failure(error, attempt, delay);
                drop(shared);
                match paced {
                    // Until the next check is due, or a node answered meanwhile (a refresh
                    // found one): then at once.
                    Some(error) => {
                        let floor = tokio::time::sleep(Duration::from_millis(10));
                        tokio::join!(floor, error.until_retry());
                    }
                    None => tokio::time::sleep(delay).await,
                }
            }
        }
    }
}
