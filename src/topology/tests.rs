//! The refresher's own logic with a fake topology source and paused time.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use redis::{Cmd, Value};
use tokio::time::Instant;
use tower::{service_fn, Service, ServiceExt};

use super::{
    fetch::{FetchTopology, Fetched},
    refresher::jittered,
    snapshot, NodeHealth, NodeRole, RefreshConfig, Shard, TopologyNode, TopologyRefresh,
};
use crate::{
    connect::{connect_fn, ConnectHints, Endpoint},
    rebuild::{Rebuild, RebuildConfig},
    Error, ErrorKind,
};

/// Answers with the one-shard topology it is told, after a delay, counting fetches.
#[derive(Clone)]
struct FakeSource {
    fetches: Arc<Mutex<Vec<Instant>>>,
    shard: Arc<Mutex<Shard>>,
    delay: Duration,
    /// No node answers (the whole cluster is down).
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl FakeSource {
    fn new(delay: Duration) -> Self {
        FakeSource {
            fetches: Arc::default(),
            shard: Arc::new(Mutex::new(shard(
                node("127.0.0.1:7000", NodeRole::Master),
                vec![node("127.0.0.2:7000", NodeRole::Replica)],
            ))),
            delay,
            down: Arc::default(),
        }
    }

    fn count(&self) -> usize {
        self.fetches.lock().unwrap().len()
    }

    /// The shard is now served by `master`, with `replicas`.
    fn set(&self, master: TopologyNode, replicas: Vec<TopologyNode>) {
        *self.shard.lock().unwrap() = shard(master, replicas);
    }
}

fn shard(master: TopologyNode, replicas: Vec<TopologyNode>) -> Shard {
    Shard {
        slots: vec![0..=16383],
        master: Some(master),
        replicas,
    }
}

/// A node announced as `endpoint` (an IP, or a name with an `ip` given by `at`).
fn node(endpoint: &str, role: NodeRole) -> TopologyNode {
    let endpoint: Endpoint = endpoint.parse().unwrap();
    TopologyNode {
        id: endpoint.to_string(),
        ip: endpoint.ip(),
        endpoint,
        role,
        health: NodeHealth::Online,
    }
}

fn at(mut node: TopologyNode, ip: &str) -> TopologyNode {
    node.ip = Some(ip.parse().unwrap());
    node
}

fn failed(mut node: TopologyNode) -> TopologyNode {
    node.health = NodeHealth::Failed;
    node
}

impl FetchTopology for FakeSource {
    fn fetch<'a>(
        &'a self,
        _known: &'a [Endpoint],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Fetched, Error>> + Send + 'a>>
    {
        Box::pin(async move {
            self.fetches.lock().unwrap().push(Instant::now());
            tokio::time::sleep(self.delay).await;
            if self.down.load(Ordering::Relaxed) {
                return Err(Error::unreachable("no node answered a topology request"));
            }
            let shard = self.shard.lock().unwrap().clone();
            Ok(Fetched {
                shards: vec![shard],
                agreed_by: 2,
                answered: 2,
                asked: 2,
            })
        })
    }
}

/// The refresh layer asking `source`, its timer off, over a service whose every call fails
/// with a connection error: each call asks for a refresh, at most one per `min_interval`.
fn called_to_failure(
    source: Arc<dyn FetchTopology>,
    min_interval: Duration,
) -> TopologyRefresh<impl Service<Cmd, Response = Value, Error = Error, Future = impl Send> + Clone>
{
    let config = RefreshConfig::default()
        .every(None)
        .min_interval(min_interval)
        .jitter(0.1);
    TopologyRefresh::with_fetcher(failing(ErrorKind::Connection), source, config, None)
}

/// Calls `GET` through `svc` every 10 ms for `period` (paused time), whatever the outcome.
async fn call_every_10ms<S>(svc: &S, period: Duration)
where
    S: Service<Cmd> + Clone,
{
    let started = Instant::now();
    while started.elapsed() < period {
        let _ = svc.clone().oneshot(redis::cmd("GET")).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An inner service that fails every call with `kind`.
fn failing(
    kind: ErrorKind,
) -> impl Service<Cmd, Response = Value, Error = Error, Future = impl Send> + Clone {
    service_fn(move |_: Cmd| async move { Err::<Value, _>(Error::new(kind, "fake")) })
}

async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_triggers_during_a_refresh_costs_at_most_one_more() {
    let source = FakeSource::new(Duration::from_millis(100));
    let config = RefreshConfig::default().every(None);
    let svc = TopologyRefresh::with_fetcher(
        failing(ErrorKind::Moved),
        Arc::new(source.clone()),
        config,
        None,
    );
    settle().await;
    assert_eq!(source.count(), 1, "the first refresh runs at once");
    for _ in 0..1000 {
        let _ = svc.clone().oneshot(redis::cmd("GET")).await;
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        source.count(),
        2,
        "1000 MOVED errors during one refresh → one follow-up"
    );
    assert_eq!(svc.handle().stats().triggers, 1000);
}

#[tokio::test(start_paused = true)]
async fn continuous_triggers_refresh_at_most_once_per_min_interval() {
    let source = FakeSource::new(Duration::from_millis(5));
    let svc = called_to_failure(Arc::new(source.clone()), Duration::from_secs(1));
    call_every_10ms(&svc, Duration::from_secs(10)).await;
    let times = source.fetches.lock().unwrap().clone();
    // 10 s at one per ≥ 0.9 s, plus the first one.
    assert!(times.len() <= 12, "{} refreshes in 10 s", times.len());
    assert!(
        times.len() >= 9,
        "{} refreshes: triggers were lost",
        times.len()
    );
    for pair in times.windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(900),
            "{:?}",
            pair[1] - pair[0]
        );
    }
}

#[tokio::test(start_paused = true)]
async fn an_idle_client_refreshes_periodically_with_jitter() {
    let source = FakeSource::new(Duration::ZERO);
    let config = RefreshConfig::default()
        .every(Duration::from_secs(30))
        .jitter(0.1);
    let svc = TopologyRefresh::with_fetcher(
        failing(ErrorKind::Command),
        Arc::new(source.clone()),
        config,
        None,
    );
    tokio::time::sleep(Duration::from_secs(300)).await;
    let times = source.fetches.lock().unwrap().clone();
    assert!(
        (10..=12).contains(&times.len()),
        "{} refreshes in 300 s",
        times.len()
    );
    let gaps: Vec<Duration> = times.windows(2).map(|p| p[1] - p[0]).collect();
    for gap in &gaps {
        assert!(
            *gap >= Duration::from_secs(27) && *gap <= Duration::from_secs(33),
            "{gap:?}"
        );
    }
    // Jittered, not lock-step.
    assert!(gaps.iter().any(|g| *g != gaps[0]), "{gaps:?}");
    // Errors the policy does not care about never trigger.
    let _ = svc.clone().oneshot(redis::cmd("GET")).await;
    assert_eq!(svc.handle().stats().triggers, 0);
}

#[test]
fn jitter_stays_within_bounds() {
    let mut rng = tower::util::rng::HasherRng::default();
    let base = Duration::from_secs(10);
    let draws: Vec<Duration> = (0..10_000).map(|_| jittered(base, 0.2, &mut rng)).collect();
    assert!(draws
        .iter()
        .all(|d| *d >= Duration::from_secs(8) && *d <= Duration::from_secs(12)));
    let below = draws.iter().filter(|d| **d < base).count();
    assert!(
        (4000..6000).contains(&below),
        "{below} of 10000 below the base"
    );
    assert_eq!(jittered(base, 0.0, &mut rng), base);
}

#[tokio::test(start_paused = true)]
async fn snapshots_become_known_nodes_and_an_unfollowable_change_rebuilds() {
    let hints: Arc<Mutex<Vec<ConnectHints>>> = Arc::default();
    let seen = hints.clone();
    let connects = Arc::new(AtomicUsize::new(0));
    let counted = connects.clone();
    let rebuild = Rebuild::new(
        connect_fn(move |h: &ConnectHints| {
            seen.lock().unwrap().push(h.clone());
            counted.fetch_add(1, Ordering::SeqCst);
            async { Ok(failing(ErrorKind::Command)) }
        }),
        RebuildConfig::default(),
    );
    let handle = rebuild.handle();
    handle
        .wait_for_generation(1, Duration::from_secs(1))
        .await
        .unwrap();

    let source = FakeSource::new(Duration::ZERO);
    let config = RefreshConfig::default()
        .every(Duration::from_secs(10))
        .jitter(0.0);
    let svc = TopologyRefresh::with_fetcher(
        rebuild,
        Arc::new(source.clone()),
        config,
        Some(handle.clone()),
    );
    let topology = svc.handle();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(
        topology.current().unwrap().masters(),
        vec!["127.0.0.1:7000".parse().unwrap()]
    );

    // Both nodes replaced at new IPs: the client made from the old ones cannot follow.
    source.set(
        node("127.0.0.3:7000", NodeRole::Master),
        vec![node("127.0.0.4:7000", NodeRole::Replica)],
    );
    handle
        .wait_for_generation(2, Duration::from_secs(15))
        .await
        .unwrap();
    let last = hints.lock().unwrap().last().cloned().unwrap();
    let extra: Vec<String> = last.extra_seeds.iter().map(|s| s.to_string()).collect();
    assert!(extra.contains(&"127.0.0.3:7000".to_string()), "{extra:?}");
    assert!(extra.contains(&"127.0.0.4:7000".to_string()), "{extra:?}");
    assert_eq!(connects.load(Ordering::SeqCst), 2);

    // A further unchanged snapshot does not rebuild again.
    tokio::time::sleep(Duration::from_secs(25)).await;
    assert_eq!(connects.load(Ordering::SeqCst), 2);
    let changes = topology.stats();
    assert!(changes.published >= 2, "{changes:?}");
}

#[tokio::test(start_paused = true)]
async fn invalid_configuration_is_a_typed_error() {
    let source = FakeSource::new(Duration::ZERO);
    let svc = TopologyRefresh::with_fetcher(
        failing(ErrorKind::Command),
        Arc::new(source.clone()),
        RefreshConfig::default().jitter(3.0),
        None,
    );
    let err = svc.oneshot(redis::cmd("GET")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert_eq!(source.count(), 0);
}

#[tokio::test(start_paused = true)]
async fn after_a_change_the_refresher_looks_again_soon_until_things_settle() {
    let source = FakeSource::new(Duration::ZERO);
    let config = RefreshConfig::default()
        .every(Duration::from_secs(30))
        .jitter(0.0)
        .min_interval(Duration::from_secs(1));
    let _svc = TopologyRefresh::with_fetcher(
        failing(ErrorKind::Command),
        Arc::new(source.clone()),
        config,
        None,
    );
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert_eq!(source.count(), 2, "start + one period, nothing changed");

    // A failover: the next periodic refresh sees it...
    source.set(
        node("127.0.0.2:7000", NodeRole::Master),
        vec![node("127.0.0.3:7000", NodeRole::Replica)],
    );
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(source.count(), 3);
    // ...and the refresher looks again after 1 s (a replacement may be joining), then 2 s
    // later, and stops settling once a refresh sees no change.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(source.count(), 4, "a settle refresh 1 s after the change");
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(source.count(), 4, "no change seen: back to the 30 s period");
}

/// A rebuild stack whose connects are counted, with a refresher over `source` feeding it.
async fn counted_rebuilds(
    source: &FakeSource,
) -> (
    Arc<AtomicUsize>,
    TopologyRefresh<Rebuild<impl crate::connect::Connect>>,
) {
    let connects = Arc::new(AtomicUsize::new(0));
    let counted = connects.clone();
    let rebuild = Rebuild::new(
        connect_fn(move |_: &ConnectHints| {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Ok(failing(ErrorKind::Command)) }
        }),
        RebuildConfig::default(),
    );
    let handle = rebuild.handle();
    handle
        .wait_for_generation(1, Duration::from_secs(1))
        .await
        .unwrap();
    let config = RefreshConfig::default()
        .every(Duration::from_secs(10))
        .jitter(0.0);
    let svc =
        TopologyRefresh::with_fetcher(rebuild, Arc::new(source.clone()), config, Some(handle));
    tokio::time::sleep(Duration::from_millis(10)).await;
    (connects, svc)
}

#[tokio::test(start_paused = true)]
async fn a_master_that_died_rebuilds_one_that_stepped_down_does_not() {
    let source = FakeSource::new(Duration::ZERO);
    let (connects, svc) = counted_rebuilds(&source).await;
    assert_eq!(connects.load(Ordering::SeqCst), 1);

    // Graceful failover: the old master stays, as a healthy replica that answers MOVED.
    source.set(
        node("127.0.0.2:7000", NodeRole::Master),
        vec![node("127.0.0.1:7000", NodeRole::Replica)],
    );
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(svc.handle().stats().published, 2);
    assert_eq!(
        connects.load(Ordering::SeqCst),
        1,
        "no rebuild for a step-down"
    );

    // The new master crashes: its replica takes over and the dead one is flagged failed. Its
    // address may swallow packets, so the inner client would never hear MOVED from it.
    source.set(
        node("127.0.0.1:7000", NodeRole::Master),
        vec![failed(node("127.0.0.2:7000", NodeRole::Replica))],
    );
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(connects.load(Ordering::SeqCst), 2, "a lost master rebuilds");
}

#[tokio::test(start_paused = true)]
async fn nodes_known_by_name_that_move_to_new_ips_get_one_new_inner_client() {
    // Kubernetes: pods restart at new IPs under the same names. The inner client connects by
    // name, but a connection it still has to an old IP that swallows packets only times out
    // (and a timeout makes it neither reconnect nor refresh): one new client, made from the
    // names, for both moves.
    let source = FakeSource::new(Duration::ZERO);
    source.set(
        at(node("redis-0.svc.test:6379", NodeRole::Master), "127.0.0.1"),
        vec![at(
            node("redis-1.svc.test:6379", NodeRole::Replica),
            "127.0.0.2",
        )],
    );
    let (connects, svc) = counted_rebuilds(&source).await;
    source.set(
        at(node("redis-0.svc.test:6379", NodeRole::Master), "127.0.0.7"),
        vec![at(
            node("redis-1.svc.test:6379", NodeRole::Replica),
            "127.0.0.8",
        )],
    );
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(svc.handle().stats().published, 2, "the moves are published");
    let moved = svc
        .handle()
        .current()
        .unwrap()
        .nodes()
        .map(|n| n.ip.unwrap().to_string())
        .collect::<Vec<_>>();
    assert_eq!(moved, ["127.0.0.7", "127.0.0.8"]);
    assert_eq!(connects.load(Ordering::SeqCst), 2, "one rebuild");
}

/// A topology that changes at every look: the master alternates (a long live resharding
/// looks the same to the refresher).
#[derive(Clone, Default)]
struct Churning {
    fetches: Arc<AtomicUsize>,
    panic_on: Option<usize>,
}

impl FetchTopology for Churning {
    fn fetch<'a>(
        &'a self,
        _known: &'a [Endpoint],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Fetched, Error>> + Send + 'a>>
    {
        let n = self.fetches.fetch_add(1, Ordering::SeqCst);
        let panics = self.panic_on == Some(n);
        Box::pin(async move {
            assert!(!panics, "a bug in a topology source");
            let (m, r) = if n.is_multiple_of(2) {
                ("127.0.0.1:7000", "127.0.0.2:7000")
            } else {
                ("127.0.0.2:7000", "127.0.0.1:7000")
            };
            Ok(Fetched {
                shards: vec![shard(
                    node(m, NodeRole::Master),
                    vec![node(r, NodeRole::Replica)],
                )],
                agreed_by: 2,
                answered: 2,
                asked: 2,
            })
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_topology_that_keeps_changing_never_stops_the_refresher() {
    // The settle interval doubled without a cap and overflowed after ~64 changing refreshes in
    // a row, killing the task for good.
    let source = Churning::default();
    let svc = TopologyRefresh::with_fetcher(
        failing(ErrorKind::Command),
        Arc::new(source.clone()),
        RefreshConfig::default().every(None).jitter(0.1),
        None,
    );
    let mut last = 0;
    for _ in 0..200 {
        svc.handle().refresh();
        tokio::time::sleep(Duration::from_secs(120)).await;
        let now = source.fetches.load(Ordering::SeqCst);
        assert!(now > last, "the refresher stopped after {now} refreshes");
        last = now;
    }
    assert!(last >= 200, "{last}");
}

#[tokio::test(start_paused = true)]
async fn a_period_of_duration_max_means_never_not_a_panic() {
    let source = FakeSource::new(Duration::ZERO);
    let svc = TopologyRefresh::with_fetcher(
        failing(ErrorKind::Command),
        Arc::new(source.clone()),
        RefreshConfig::default()
            .every(Duration::MAX)
            .min_interval(Duration::MAX)
            .jitter(0.5),
        None,
    );
    settle().await;
    assert_eq!(source.count(), 1);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(source.count(), 1, "no periodic refresh within an hour");
    assert_eq!(svc.handle().stats().refreshes, 1);
    let mut rng = tower::util::rng::HasherRng::default();
    for _ in 0..100 {
        let _ = jittered(Duration::MAX, 0.5, &mut rng);
    }
}

#[tokio::test(start_paused = true)]
async fn a_refresh_that_panics_is_reported_and_the_refresher_carries_on() {
    let source = Churning {
        panic_on: Some(0),
        ..Churning::default()
    };
    let svc = TopologyRefresh::with_fetcher(
        failing(ErrorKind::Command),
        Arc::new(source.clone()),
        RefreshConfig::default().every(None),
        None,
    );
    settle().await;
    let stats = svc.handle().stats();
    assert_eq!((stats.refreshes, stats.failures), (1, 1), "{stats:?}");
    let error = stats.last_error.unwrap();
    assert_eq!(error.kind(), ErrorKind::Closed);
    assert!(error.to_string().contains("panicked"), "{error}");
    let after = svc
        .handle()
        .refresh_and_wait(Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(after.refreshes, 2);
    assert!(svc.handle().current().is_some());
}

/// The captured replies must parse, or the fuzzer would start from inputs the parsers
/// refuse at the first byte and never reach the code that reads nodes.
#[test]
fn the_captured_topology_replies_parse_to_a_node_announced_by_name() {
    for (path, bytes) in crate::fuzzing::tests::seed_inputs("topology_reply") {
        let value = redis::parse_redis_value(&bytes).expect("a RESP value");
        let asked = snapshot::Asked {
            endpoint: "127.0.0.71:7301".parse().expect("an endpoint"),
            ip: Some([127, 0, 0, 71].into()),
            tls: false,
        };
        let shards = snapshot::parse_cluster_shards(&value, &asked)
            .or_else(|_| snapshot::parse_cluster_slots(&value, &asked))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let master = shards[0].master.as_ref().expect("a master");
        assert_eq!(
            master.endpoint.to_string(),
            "node7301.example:7301",
            "{}",
            path.display()
        );
        assert_eq!(shards[0].slots, vec![0..=16383], "{}", path.display());
    }
}

/// Six shards of a master and a replica (`127.0.<shard>.1` and `.2`), the master of shard 3
/// failed.
fn six_shards() -> super::TopologySnapshot {
    let shards = (0..6)
        .map(|i| {
            let master = node(&format!("127.0.{i}.1:7000"), NodeRole::Master);
            let master = if i == 3 { failed(master) } else { master };
            let mut shard = shard(
                master,
                vec![node(&format!("127.0.{i}.2:7000"), NodeRole::Replica)],
            );
            shard.slots = vec![(i * 2000)..=(i * 2000 + 1999)];
            shard
        })
        .collect();
    super::TopologySnapshot {
        shards,
        agreed_by: 1,
        answered: 1,
        asked: 1,
        taken_at: std::time::SystemTime::now(),
        sequence: 0,
    }
}

#[test]
fn a_refresh_asks_the_serving_masters_first_and_every_other_node_in_turn() {
    let snapshot = six_shards();
    let serving_masters: Vec<Endpoint> = [0, 1, 2, 4, 5]
        .iter()
        .map(|i| format!("127.0.{i}.1:7000").parse().unwrap())
        .collect();
    let failed_master: Endpoint = "127.0.3.1:7000".parse().unwrap();
    let mut reached = std::collections::HashSet::new();
    for turn in 0..6 {
        let order = snapshot.probe_order(turn);
        assert_eq!(order.len(), 12, "each node once: {order:?}");
        let mut first: Vec<Endpoint> = order[..5].to_vec();
        first.sort();
        assert_eq!(first, serving_masters, "turn {turn}");
        // The failed node comes after every serving one.
        assert_eq!(order.last(), Some(&failed_master), "turn {turn}");
        // A refresh asking 6 nodes asks the masters and one replica, another each turn.
        reached.extend(order[..6].iter().cloned());
    }
    assert_eq!(
        reached.len(),
        11,
        "every serving node within 6 refreshes: {reached:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn refreshes_back_off_while_no_node_answers_and_resume_when_one_does() {
    let source = FakeSource::new(Duration::from_millis(5));
    source.down.store(true, Ordering::Relaxed);
    let svc = called_to_failure(Arc::new(source.clone()), Duration::from_secs(1));
    // Every call fails and asks for a refresh, for 60 s of a cluster that is all down.
    call_every_10ms(&svc, Duration::from_secs(60)).await;
    let down = source.count();
    // Once a second without backing off: 60. Doubling from 1 s to at most 16 s: about 8.
    assert!(down <= 10, "{down} failed refreshes in 60 s");
    assert!(down >= 5, "{down}");
    let gaps: Vec<Duration> = {
        let times = source.fetches.lock().unwrap();
        times.windows(2).map(|w| w[1] - w[0]).collect()
    };
    assert!(
        gaps.iter().all(|g| *g <= Duration::from_secs(17)),
        "never more than the cap apart: {gaps:?}"
    );
    // A node answers again: the next refresh succeeds, and the one after that comes at the
    // usual pace.
    source.down.store(false, Ordering::Relaxed);
    let back = Instant::now();
    while svc.handle().current().is_none() {
        call_every_10ms(&svc, Duration::from_millis(10)).await;
    }
    assert!(
        back.elapsed() <= Duration::from_secs(17),
        "{:?}",
        back.elapsed()
    );
    let after = source.count();
    call_every_10ms(&svc, Duration::from_secs(5)).await;
    assert!(
        source.count() - after >= 4,
        "{} refreshes in 5 s",
        source.count() - after
    );
}

#[test]
fn with_more_masters_than_probes_every_master_is_asked_in_turn() {
    let snapshot = six_shards();
    let mut asked = std::collections::HashSet::new();
    for turn in 0..5 {
        // A refresh that asks 2 nodes: two serving masters each turn.
        asked.extend(snapshot.probe_order(turn)[..2].iter().cloned());
    }
    assert_eq!(
        asked.len(),
        5,
        "every serving master within 5 refreshes: {asked:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_refresh_that_failed_asks_other_nodes_next_time() {
    // The refresher's turn moves with every refresh, failed ones included.
    let source = Recording::default();
    let svc = called_to_failure(Arc::new(source.clone()), Duration::from_millis(100));
    call_every_10ms(&svc, Duration::from_secs(30)).await;
    let firsts: std::collections::HashSet<Endpoint> = source
        .known
        .lock()
        .unwrap()
        .iter()
        .filter_map(|k| k.first().cloned())
        .collect();
    assert!(
        firsts.len() >= 3,
        "the first node asked never changed: {firsts:?}"
    );
}

/// Answers with `six_shards` once, then fails every refresh, recording the order of the known
/// nodes it was given.
#[derive(Clone, Default)]
struct Recording {
    known: Arc<Mutex<Vec<Vec<Endpoint>>>>,
}

impl FetchTopology for Recording {
    fn fetch<'a>(
        &'a self,
        known: &'a [Endpoint],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Fetched, Error>> + Send + 'a>>
    {
        Box::pin(async move {
            let first = {
                let mut seen = self.known.lock().unwrap();
                seen.push(known.to_vec());
                seen.len() == 1
            };
            if first {
                let snapshot = six_shards();
                Ok(Fetched {
                    shards: snapshot.shards,
                    agreed_by: 1,
                    answered: 1,
                    asked: 1,
                })
            } else {
                Err(Error::unreachable("no node answered"))
            }
        })
    }
}
