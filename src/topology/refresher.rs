//! The refresh task: one per layer, coalescing triggers and limiting the rate.

use std::{
    collections::HashSet,
    panic::AssertUnwindSafe,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, Weak,
    },
    time::Duration,
};

use futures_util::FutureExt;
use tokio::{sync::watch, sync::Notify, time::Instant};
use tower::util::rng::{HasherRng, Rng};

use super::{
    fetch::FetchTopology, NodeHealth, RefreshConfig, RefreshStats, TopologyChange, TopologySnapshot,
};
use crate::{connect::Endpoint, rebuild::RebuildHandle, Error};

/// Wakes the task; shared by the task and the refresher so that dropping the refresher can end
/// a task that waits with no periodic timer.
#[derive(Default)]
pub(crate) struct Signal {
    notify: Notify,
    requested: AtomicBool,
    closed: AtomicBool,
}

pub(crate) struct Refresher {
    pub(crate) source: Arc<dyn FetchTopology>,
    pub(crate) config: RefreshConfig,
    pub(crate) rebuild: Option<RebuildHandle>,
    pub(crate) snapshot: watch::Sender<Option<Arc<TopologySnapshot>>>,
    pub(crate) stats: watch::Sender<RefreshStats>,
    pub(crate) signal: Arc<Signal>,
    /// Why the configuration cannot work, reported by every call.
    pub(crate) invalid: Option<Error>,
    started: AtomicBool,
    triggers: AtomicU64,
    /// Refreshes started, failed ones included: which nodes the next one asks first.
    turns: AtomicU64,
    last_change: Mutex<Option<std::time::Instant>>,
    /// The nodes seen right after the inner client of a generation was made.
    generation_nodes: Mutex<Option<(u64, HashSet<Endpoint>)>>,
}

impl Drop for Refresher {
    fn drop(&mut self) {
        self.signal.closed.store(true, Ordering::Release);
        self.signal.notify.notify_one();
    }
}

impl Refresher {
    pub(crate) fn new(
        source: Arc<dyn FetchTopology>,
        config: RefreshConfig,
        rebuild: Option<RebuildHandle>,
    ) -> Arc<Self> {
        Arc::new(Refresher {
            source,
            invalid: config.validate().err(),
            config,
            rebuild,
            snapshot: watch::channel(None).0,
            stats: watch::channel(RefreshStats::default()).0,
            signal: Arc::default(),
            started: AtomicBool::new(false),
            triggers: AtomicU64::new(0),
            turns: AtomicU64::new(0),
            last_change: Mutex::new(None),
            generation_nodes: Mutex::new(None),
        })
    }

    /// Starts the task once, when a runtime is there.
    pub(crate) fn ensure_started(self: &Arc<Self>) {
        if self.started.load(Ordering::Acquire) {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            if !self.started.swap(true, Ordering::AcqRel) {
                runtime.spawn(run(Arc::downgrade(self), self.signal.clone()));
            }
        }
    }

    /// Asks for a refresh; cheap, callable on every failed call.
    pub(crate) fn trigger(&self) {
        self.triggers.fetch_add(1, Ordering::Relaxed);
        if !self.signal.requested.swap(true, Ordering::AcqRel) {
            self.signal.notify.notify_one();
        }
    }

    /// One refresh; returns whether the topology changed since the previous snapshot.
    async fn refresh(&self) -> Result<bool, Error> {
        let previous = self.snapshot.borrow().clone();
        // Masters first, everyone in turns (also after a failed refresh, so a dead set of
        // nodes is not asked again and again): a refresh asks only the first few.
        let turn = self.turns.fetch_add(1, Ordering::Relaxed);
        let known = previous
            .as_ref()
            .map(|s| s.probe_order(turn))
            .unwrap_or_default();
        let fetched = match self.source.fetch(&known).await {
            Ok(f) => f,
            Err(e) => {
                self.record_failure(e.clone());
                return Err(e);
            }
        };
        let mut stats = self.stats.borrow().clone();
        stats.refreshes += 1;
        stats.triggers = self.triggers.load(Ordering::Relaxed);
        let sequence = previous.as_ref().map_or(0, |s| s.sequence) + 1;
        let snapshot = fetched.into_snapshot(sequence);
        let changes = match &previous {
            None => Vec::new(),
            Some(p) => {
                let changes = snapshot.changes_since(p);
                for change in &changes {
                    tracing::info!(%change, "cluster topology changed");
                }
                changes
            }
        };
        let changed = previous.is_none() || !changes.is_empty();
        if let Some(rebuild) = &self.rebuild {
            // Every later rebuild may start from these nodes when the seed names are stale.
            rebuild.set_known_nodes(snapshot.endpoints());
            self.decide_rebuild(rebuild, &snapshot, previous.as_deref(), &changes);
        }
        stats.last_error = None;
        if changed {
            *self.last_change() = Some(std::time::Instant::now());
        }
        crate::metrics::refreshed(
            &self.config.client_name,
            true,
            changed && previous.is_some(),
            *self.last_change(),
        );
        if changed {
            stats.published += 1;
            tracing::debug!(
                sequence,
                shards = snapshot.shards.len(),
                agreed_by = snapshot.agreed_by,
                answered = snapshot.answered,
                "publishing topology snapshot"
            );
            self.snapshot.send_replace(Some(Arc::new(snapshot)));
        }
        self.stats.send_replace(stats);
        Ok(changed && previous.is_some())
    }

    /// Counts a refresh that ended without a result.
    fn record_failure(&self, error: Error) {
        crate::metrics::refreshed(&self.config.client_name, false, false, *self.last_change());
        let mut stats = self.stats.borrow().clone();
        stats.refreshes += 1;
        stats.failures += 1;
        stats.triggers = self.triggers.load(Ordering::Relaxed);
        stats.last_error = Some(error);
        self.stats.send_replace(stats);
    }

    fn last_change(&self) -> std::sync::MutexGuard<'_, Option<std::time::Instant>> {
        self.last_change.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The redis crate's client follows slot moves and new masters by itself — as long as one
    /// of the nodes it knows is still there, and as long as someone answers it with `MOVED`.
    /// When none of its nodes is left, or a shard's master died rather than stepped down (the
    /// old master's address swallows packets, so the inner client's requests there time out
    /// and it never learns of the new master), only a new client can reach the cluster.
    fn decide_rebuild(
        &self,
        rebuild: &RebuildHandle,
        snapshot: &TopologySnapshot,
        previous: Option<&TopologySnapshot>,
        changes: &[TopologyChange],
    ) {
        if !self.config.rebuild_when_unfollowable {
            return;
        }
        let generation = rebuild.generation();
        if generation == 0 {
            return;
        }
        let now: HashSet<Endpoint> = snapshot.endpoints().into_iter().collect();
        let mut recorded = self
            .generation_nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match recorded.as_ref() {
            Some((g, nodes)) if *g == generation => {
                if nodes.is_disjoint(&now) && !now.is_empty() {
                    tracing::info!(
                        generation,
                        "none of the nodes the inner client was made with remain; rebuilding"
                    );
                    rebuild.rebuild();
                    return;
                }
            }
            _ => *recorded = Some((generation, now)),
        }
        drop(recorded);
        // A node that restarted at another IP under its name: the inner client's connection to
        // it may still go to the old IP, whose packets vanish on a managed network; a timeout
        // makes the redis crate neither reconnect nor refresh, so its calls there would time
        // out for good. A new client resolves the name afresh.
        if let Some(TopologyChange::NodeMoved { endpoint, from, to }) = changes
            .iter()
            .find(|change| matches!(change, TopologyChange::NodeMoved { from: Some(_), .. }))
        {
            tracing::info!(
                generation,
                node = %endpoint,
                from = ?from,
                to = ?to,
                "a node restarted at another IP under its name; rebuilding"
            );
            rebuild.rebuild();
            return;
        }
        if let Some(lost) = lost_master(snapshot, previous, changes) {
            tracing::info!(
                generation,
                old_master = %lost,
                "a shard's master was lost (gone or failed), not demoted; rebuilding"
            );
            rebuild.rebuild();
        }
    }
}

/// The old master of a shard whose master changed, when that old master is no longer a healthy
/// member of the cluster (removed, or flagged failed): a master that stepped down gracefully
/// stays as a replica and answers `MOVED`, one that died does not.
fn lost_master(
    snapshot: &TopologySnapshot,
    previous: Option<&TopologySnapshot>,
    changes: &[TopologyChange],
) -> Option<Endpoint> {
    previous?;
    changes.iter().find_map(|change| match change {
        TopologyChange::MasterChanged {
            from: Some(old),
            to: Some(_),
            ..
        } => {
            let still_healthy = snapshot
                .nodes()
                .any(|n| &n.endpoint == old && n.health == NodeHealth::Online);
            (!still_healthy).then(|| old.clone())
        }
        _ => None,
    })
}

/// The longest a settle period grows to while the cluster keeps changing (a long live
/// resharding changes the topology at every refresh).
const SETTLE_CAP: Duration = Duration::from_secs(60);

/// A wait longer than this is "never": it keeps instant arithmetic from overflowing.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Failed refreshes in a row double the pause before the next one at most this many times:
/// 16 × the minimum interval (16 s by default).
const FAILURE_DOUBLINGS: u32 = 4;

/// `base` spread by ±`jitter`, saturating at [`FOREVER`] (a configured `Duration::MAX` means
/// "practically never", not a panic).
pub(crate) fn jittered(base: Duration, jitter: f64, rng: &mut HasherRng) -> Duration {
    let base = base.min(FOREVER);
    if jitter <= 0.0 {
        return base;
    }
    let factor = 1.0 + jitter * (2.0 * rng.next_f64() - 1.0);
    Duration::try_from_secs_f64(base.as_secs_f64() * factor.max(0.0))
        .unwrap_or(FOREVER)
        .min(FOREVER)
}

/// Marks the task as gone when it ends while its refresher lives on (its runtime shut down, or
/// it panicked outside a refresh), so the next call starts it again instead of finding it
/// silently missing.
struct TaskGuard(Weak<Refresher>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if let Some(refresher) = self.0.upgrade() {
            refresher.started.store(false, Ordering::Release);
        }
    }
}

async fn run(weak: Weak<Refresher>, signal: Arc<Signal>) {
    let _guard = TaskGuard(weak.clone());
    let mut rng = HasherRng::default();
    let mut last_refresh: Option<Instant> = None;
    // The first refresh runs at once: a snapshot is useful before anything fails.
    let mut due_now = true;
    // After a change, the cluster usually keeps moving for a while (a failover is followed by a
    // replacement node joining): look again soon, backing off, until a refresh sees no change.
    // Without this, a second failover before the next period could find every known node gone.
    let mut settle: Option<Duration> = None;
    // Refreshes that failed in a row (no node answered): the next one waits twice as long each
    // time, up to 16 times the minimum interval (`FAILURE_DOUBLINGS`), so a client of a cluster that is
    // all down — and a fleet of them — does not knock on every node each second.
    let mut failures: u32 = 0;
    // While no node answers, refreshes go when the client's outage gate lets the next check go
    // (`Error::retry_at`), not after a pause of their own.
    let mut gated: Option<Error> = None;
    loop {
        if signal.closed.load(Ordering::Acquire) {
            return;
        }
        let (every, min_interval, jitter) = match weak.upgrade() {
            Some(r) => (r.config.every, r.config.min_interval, r.config.jitter),
            None => return,
        };
        if !due_now {
            let wait = match (settle, every) {
                (Some(s), Some(e)) => Some(s.min(e)),
                (Some(s), None) => Some(s),
                (None, e) => e,
            };
            let periodic = async {
                match wait {
                    Some(d) => tokio::time::sleep(jittered(d, jitter, &mut rng)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = signal.notify.notified() => {}
                _ = periodic => {}
            }
            if signal.closed.load(Ordering::Acquire) {
                return;
            }
        }
        due_now = false;
        if let Some(error) = gated.take() {
            // Until the gate's next check is due, or a node answered another check.
            error.until_retry().await;
        } else if let Some(last) = last_refresh {
            let wait = if failures == 0 {
                jittered(min_interval, jitter, &mut rng)
            } else {
                // Spread over the second half of the pause while backing off: clients that
                // lost the cluster together must not come back together.
                let pause = min_interval.saturating_mul(1 << failures.min(FAILURE_DOUBLINGS));
                jittered(pause.mul_f64(0.75), 1.0 / 3.0, &mut rng)
            };
            tokio::time::sleep_until(last + wait).await;
        }
        signal.requested.store(false, Ordering::Release);
        let Some(refresher) = weak.upgrade() else {
            return;
        };
        last_refresh = Some(Instant::now());
        // A refresh that panics (a bug, ours or a resolver's) is a failed refresh, reported as
        // such; the task carries on rather than leaving the client without refreshes.
        let outcome = AssertUnwindSafe(refresher.refresh()).catch_unwind().await;
        match outcome {
            Ok(Ok(true)) => {
                failures = 0;
                let first = min_interval.max(Duration::from_secs(1)).min(SETTLE_CAP);
                settle = Some(settle.map_or(first, |s| s.saturating_mul(2).min(SETTLE_CAP)));
            }
            Ok(Ok(false)) => {
                failures = 0;
                settle = None;
            }
            Ok(Err(e)) if e.retry_at().is_some() => {
                // Checks again when the gate lets the next check go, without waiting for a
                // trigger: an idle client finds the cluster back by itself.
                gated = Some(e.clone());
                due_now = true;
                tracing::debug!(error = %e, "topology refresh failed: no node answers");
            }
            Ok(Err(e)) => {
                failures = failures.saturating_add(1);
                tracing::warn!(error = %e, failures, "topology refresh failed");
            }
            Err(panic) => {
                let error = Error::closed(format!(
                    "a topology refresh panicked: {}",
                    crate::error::panic_message(&*panic)
                ));
                tracing::error!(error = %error, "topology refresh panicked; carrying on");
                refresher.record_failure(error);
            }
        }
        // Triggers that arrived while this refresh ran are kept as one follow-up refresh (after
        // the minimum interval): they may report a change that happened after this refresh read
        // the topology, and dropping them could leave a stale view until the next period.
    }
}
