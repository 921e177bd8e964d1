//! Per-shard fail-fast against a real cluster: while one master is down, its calls fail at
//! once and the healthy shards keep their pace under one client-wide concurrency limit.
//! Requires the `test-util` feature.

mod support;

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use support::{connected, init_tracing};
use tower_redis_cluster::{
    command::key_slot, harness::LocalCluster, read::FailFastConfig, redis, ErrorKind,
};

/// One call: its shard, when it started, how long it took, and how it ended.
struct Call {
    shard: usize,
    started: Instant,
    took: Duration,
    error: Option<ErrorKind>,
}

/// Keys per shard (by the index of the master in `CLUSTER SLOTS` order of the masters).
async fn keys_by_shard(cluster: &LocalCluster, per_shard: usize) -> Vec<(String, Vec<String>)> {
    let owners = support::slot_owners(cluster).await;
    let mut by_id: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for i in 0.. {
        let key = format!("ff:{i}");
        let slot = key_slot(key.as_bytes());
        let id = &owners
            .iter()
            .find(|(s, e, _)| (*s..=*e).contains(&slot))
            .unwrap()
            .2;
        let keys = by_id.entry(id.clone()).or_default();
        if keys.len() < per_shard {
            keys.push(key);
        }
        if by_id.len() == cluster.shards() && by_id.values().all(|k| k.len() == per_shard) {
            break;
        }
    }
    by_id.into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_shard_fails_fast_and_the_healthy_ones_keep_their_pace() {
    init_tracing();
    let _alone = ONE_AT_A_TIME.lock().await;
    let cluster = LocalCluster::builder()
        .shards(3)
        .replicas(0)
        .config("cluster-require-full-coverage", "no")
        .start()
        .await
        .expect("the cluster starts");
    // A refused connection trips the shard at once: measured from 1 s after the crash.
    scenario(cluster, Duration::from_secs(1)).await;
}

/// The same in the seed user's world: the dead master's address swallows packets, so its
/// calls time out instead of being refused, and the shard trips on timeouts (or when the
/// topology marks the master failed): measured from 3 s after the crash. Probes must not go
/// through the inner client here: a redis cluster client routing a call to a node it has no
/// connection to refreshes its slots and reconnects to every node, the blackholed one too,
/// holding every shard's calls for the connect timeout (healthy shards ran at 0.04× their
/// pace so).
#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_shard_fails_fast_and_the_healthy_ones_keep_their_pace_when_managed() {
    init_tracing();
    let _alone = ONE_AT_A_TIME.lock().await;
    let cluster = LocalCluster::builder()
        .managed()
        .shards(3)
        .replicas(0)
        .config("cluster-require-full-coverage", "no")
        .start()
        .await
        .expect("the managed cluster starts");
    scenario(cluster, Duration::from_secs(3)).await;
}

/// The recorder of this test binary, installed by the first test that asks; its counters are
/// told apart by the `client` label (each test's client has its own name).
#[cfg(feature = "metrics")]
fn snapshotter() -> &'static metrics_util::debugging::Snapshotter {
    static SNAPSHOTTER: std::sync::OnceLock<metrics_util::debugging::Snapshotter> =
        std::sync::OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("the only recorder of this test binary");
        snapshotter
    })
}

/// One test at a time, from before its cluster starts: the scenarios measure throughput, which
/// a second cluster's load — starting one included — would skew.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn scenario(cluster: LocalCluster, settle: Duration) {
    #[cfg(feature = "metrics")]
    let snapshotter = snapshotter();
    let name = format!("fail-fast-{}", cluster.port());
    // No replicas: the dead master's slots stay without one; the others serve on.
    let client = connected(
        cluster
            .client_builder()
            .concurrency_limit(64)
            .timeout(Duration::from_secs(1))
            .name(name.clone())
            .fail_fast(FailFastConfig::default()),
    )
    .await;
    let shards = keys_by_shard(&cluster, 20).await;
    let keys: Arc<Vec<Vec<String>>> = Arc::new(shards.iter().map(|(_, k)| k.clone()).collect());
    let dead = 1;
    let dead_id = shards[dead].0.clone();

    let stop = Arc::new(AtomicBool::new(false));
    let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
    let tasks: Vec<_> = (0..64)
        .map(|t| {
            let client = client.clone();
            let keys = keys.clone();
            let stop = stop.clone();
            let calls = calls.clone();
            tokio::spawn(async move {
                let mut n = t;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    // Keys spread evenly: every task goes round the shards.
                    let shard = n % keys.len();
                    let key = &keys[shard][n % keys[shard].len()];
                    let mut cmd = redis::cmd(if n % 2 == 0 { "GET" } else { "SET" });
                    cmd.arg(key);
                    if n % 2 == 1 {
                        cmd.arg(n);
                    }
                    let started = Instant::now();
                    let error = client.send(cmd).await.err().map(|e| e.kind());
                    calls.lock().unwrap().push(Call {
                        shard,
                        started,
                        took: started.elapsed(),
                        error,
                    });
                    // An application's pace: each worker serves a request every 10 ms or so.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        })
        .collect();

    let window = Duration::from_secs(3);
    let steady_from = Instant::now() + Duration::from_millis(500);
    tokio::time::sleep(Duration::from_millis(500) + window).await;
    let master = cluster
        .masters()
        .into_iter()
        .find(|m| m.id == dead_id)
        .unwrap();
    let mut cluster = cluster;
    cluster.kill_node(master.addr).await.unwrap();
    let killed = Instant::now();
    // The calls in flight at the crash end within their deadline, the shard trips; then
    // measure.
    let outage_from = killed + settle;
    tokio::time::sleep(settle + window).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }

    let calls = calls.lock().unwrap();
    let in_window = |from: Instant, c: &&Call| c.started >= from && c.started < from + window;
    let healthy_ok = |from: Instant| {
        calls
            .iter()
            .filter(|c| in_window(from, c) && c.shard != dead && c.error.is_none())
            .count() as f64
    };
    let (steady, outage) = (healthy_ok(steady_from), healthy_ok(outage_from));
    let mut dead_calls: Vec<Duration> = calls
        .iter()
        .filter(|c| in_window(outage_from, c) && c.shard == dead)
        .map(|c| c.took)
        .collect();
    dead_calls.sort();
    let p99 = dead_calls[(dead_calls.len() * 99 / 100).min(dead_calls.len() - 1)];
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for c in calls.iter().filter(|c| in_window(outage_from, c)) {
        let label = format!(
            "shard {}: {}",
            if c.shard == dead { "dead" } else { "healthy" },
            c.error.map_or("ok", |k| k.as_str())
        );
        *kinds.entry(label).or_default() += 1;
    }
    println!(
        "healthy shards: {steady} ok calls in {window:?} steady, {outage} with a master down \
         (×{:.2}); dead shard: {} calls, p99 {p99:?}; outcomes {kinds:?}",
        outage / steady,
        dead_calls.len()
    );
    assert!(
        outage >= 0.9 * steady,
        "healthy shards slowed: {outage} vs {steady}"
    );
    assert!(p99 <= Duration::from_millis(50), "dead shard p99 {p99:?}");
    assert!(
        calls
            .iter()
            .filter(|c| in_window(outage_from, c) && c.shard != dead)
            .all(|c| c.error.is_none()),
        "a healthy shard's call failed: {kinds:?}"
    );

    // Every refusal was counted, and the shard was marked down (at least) once.
    #[cfg(feature = "metrics")]
    {
        // One snapshot: taking one drains the counters.
        let snapshot = snapshotter.snapshot().into_vec();
        let counted = |counter: &str| -> u64 {
            snapshot
                .iter()
                .filter(|(key, _, _, _)| {
                    key.key().name() == counter
                        && key
                            .key()
                            .labels()
                            .any(|l| l.key() == "client" && l.value() == name)
                })
                .map(|(_, _, _, value)| match value {
                    metrics_util::debugging::DebugValue::Counter(c) => *c,
                    _ => 0,
                })
                .sum()
        };
        let refused = calls
            .iter()
            .filter(|c| c.error == Some(ErrorKind::ShardDown))
            .count() as u64;
        assert_eq!(counted("redis_cluster_shard_fail_fast_total"), refused);
        assert!(counted("redis_cluster_shard_down_total") >= 1);
    }
}

/// The seed's shape: its master crashes and the replica takes over, while the crashed master
/// stays known to the cluster (Redis 7.0 lists it as a master without slots; a server that
/// groups nodes by shard id lists it beside the promoted replica, which the topology parser's
/// own test covers). Fail-fast probes the primary the topology names: the shard must serve
/// again as soon as the promoted replica does.
async fn back_after_a_failover(mut cluster: LocalCluster) {
    let client = connected(
        cluster
            .client_builder()
            .timeout(Duration::from_secs(1))
            .fail_fast(FailFastConfig::default()),
    )
    .await;
    let set = |n: u64| {
        let mut cmd = redis::cmd("SET");
        cmd.arg("ff:failover").arg(n);
        cmd
    };
    client.send(set(0)).await.unwrap();
    let master = cluster.master_of(0);
    cluster.kill_node(master.addr).await.unwrap();
    // Calls fail (or fail fast) until the promotion; keep calling so the shard trips.
    let started = Instant::now();
    let mut n = 0;
    let mut tripped = false;
    while started.elapsed() < Duration::from_secs(30) {
        n += 1;
        match client.send(set(n)).await {
            Err(e) if e.kind() == ErrorKind::ShardDown => tripped = true,
            _ => {}
        }
        if tripped {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(tripped, "the shard never failed fast with its master dead");
    // One master cannot win a failover election by itself: the replica takes over, as an
    // operator (or a managed service) would make it.
    let replica = cluster.replicas_of(0)[0].clone();
    let mut takeover = redis::cmd("CLUSTER");
    takeover.arg("FAILOVER").arg("TAKEOVER");
    cluster.node_command(replica.addr, &takeover).await.unwrap();
    cluster.wait_healthy(Duration::from_secs(30)).await.unwrap();
    let healthy = Instant::now();
    // The topology names the promoted replica (the trip and each failed probe ask for a
    // refresh), a probe finds it serving, a trial call succeeds: writes go through again.
    loop {
        n += 1;
        match client.send(set(n)).await {
            Ok(_) => break,
            Err(e) => assert!(
                healthy.elapsed() < Duration::from_secs(10),
                "still failing {:?} after the cluster was healthy: {e}",
                healthy.elapsed()
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "writes served again {:?} after the cluster was healthy",
        healthy.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_failed_over_serves_again() {
    init_tracing();
    let _alone = ONE_AT_A_TIME.lock().await;
    back_after_a_failover(support::cluster(1, 1).await).await;
}

#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_failed_over_serves_again_when_managed() {
    init_tracing();
    let _alone = ONE_AT_A_TIME.lock().await;
    let cluster = LocalCluster::builder()
        .managed()
        .shards(1)
        .replicas(1)
        .start()
        .await
        .expect("the managed cluster starts");
    back_after_a_failover(cluster).await;
}
