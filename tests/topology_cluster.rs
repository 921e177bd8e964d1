//! The topology refresh layer against real clusters. Requires the `test-util` feature.

mod support;

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use support::{
    assert_documented_kinds_without_retry, crash_master_and_replace, first_success, init_tracing,
    Load,
};
use tower::ServiceExt;
use tower_redis_cluster::{
    connect::{Connect, ConnectHints, Endpoint},
    harness::LocalCluster,
    rebuild::{Rebuild, RebuildConfig},
    topology::{RefreshConfig, TopologyHandle, TopologyRefresh, TopologyRefreshLayer},
    ClusterConnector, RedisService, Seeds,
};

fn connector(cluster: &LocalCluster) -> ClusterConnector {
    ClusterConnector::new(Seeds::parse([cluster.seed()]).unwrap()).resolver(cluster.name_map())
}

/// TopologyRefresh(Rebuild(RedisService)) on the cluster's configuration-endpoint name.
fn stack(
    cluster: &LocalCluster,
    config: RefreshConfig,
) -> TopologyRefresh<Rebuild<ClusterConnector>> {
    let connector = connector(cluster);
    let source = connector.topology_source();
    let rebuild = Rebuild::new(connector, RebuildConfig::default());
    let handle = rebuild.handle();
    tower::ServiceBuilder::new()
        .layer(TopologyRefreshLayer::new(source, config).rebuild_handle(handle))
        .service(rebuild)
}

/// Waits until the published snapshot satisfies `pred`; returns when it did.
async fn wait_snapshot(
    handle: &TopologyHandle,
    limit: Duration,
    pred: impl Fn(&tower_redis_cluster::topology::TopologySnapshot) -> bool,
) -> Instant {
    let mut rx = handle.subscribe();
    let waited =
        tokio::time::timeout(limit, rx.wait_for(|s| s.as_deref().is_some_and(&pred))).await;
    match waited {
        Ok(Ok(_)) => Instant::now(),
        _ => panic!(
            "no matching snapshot within {limit:?}; last: {:?}",
            handle.current()
        ),
    }
}

fn addr_set(addrs: Vec<SocketAddr>) -> HashSet<Endpoint> {
    addrs.into_iter().map(Endpoint::from).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_twice_while_the_seed_name_points_at_dead_ips_where_the_plain_client_does_not() {
    init_tracing();
    let mut cluster = support::cluster(1, 1).await;
    let endpoint = cluster.config_endpoint();
    let service = stack(
        &cluster,
        RefreshConfig::default().every(Duration::from_secs(1)),
    );
    let topology = service.handle();
    first_success(&service, Duration::from_secs(10))
        .await
        .unwrap();
    // DNS keeps answering with the start-up IPs from now on.
    cluster.name_map().freeze(&endpoint, true);
    // The redis crate's own cluster client, made the same way, for comparison.
    let plain = RedisService::new(
        connector(&cluster)
            .connect(&ConnectHints::new(1))
            .await
            .unwrap()
            .into_inner(),
    );

    let load = Load::start(service.clone(), 8);
    for round in 1..=2 {
        // The refresher has seen every current node (the replacement included).
        let live = addr_set(cluster.addrs());
        wait_snapshot(&topology, Duration::from_secs(10), |s| {
            s.endpoints().into_iter().collect::<HashSet<_>>() == live
        })
        .await;
        let crashed = Instant::now();
        crash_master_and_replace(&mut cluster).await;
        let healthy = Instant::now();
        let recovered = first_success(&service, Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("round {round}: the stack did not recover: {e}"));
        println!(
            "stale name, round {round}: healthy→first success {:?}, crash→first success {:?}",
            recovered.saturating_duration_since(healthy),
            recovered - crashed
        );
    }
    let stats = load.stop().await;
    assert_documented_kinds_without_retry(&stats.errors());
    println!(
        "load: {} ok, errors {:?}",
        stats.ok.load(Ordering::SeqCst),
        stats.errors()
    );

    // The plain client, given the same time, never comes back: its name leads to dead IPs and
    // it knows no live node.
    let plain_result = first_success(&plain, Duration::from_secs(10)).await;
    let err = plain_result.expect_err("the plain redis cluster client recovered from a stale name");
    println!("plain redis ClusterConnection after 10 s: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_client_publishes_the_new_master_within_one_period() {
    init_tracing();
    let mut cluster = support::cluster(3, 1).await;
    let period = Duration::from_secs(2);
    let service = stack(&cluster, RefreshConfig::default().every(period).jitter(0.1));
    let topology = service.handle();
    wait_snapshot(&topology, Duration::from_secs(10), |s| s.shards.len() == 3).await;

    // No command is sent from here on.
    let new_master = cluster.failover(0).await.unwrap();
    let failed_over = Instant::now();
    let seen = wait_snapshot(&topology, period * 3, |s| {
        s.masters().contains(&new_master.addr.into())
    })
    .await;
    let delay = seen - failed_over;
    println!("idle client saw the new master {delay:?} after the failover (period {period:?})");
    // One period plus jitter plus the refresh itself.
    assert!(
        delay <= period.mul_f64(1.1) + Duration::from_secs(1),
        "{delay:?}"
    );
    assert_eq!(
        topology.stats().triggers,
        0,
        "nothing but the timer refreshed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_storm_refreshes_at_most_once_per_min_interval() {
    init_tracing();
    let cluster = support::cluster(3, 0).await;
    // A connection to one node only: two thirds of the keys answer MOVED, every one of which
    // reaches the layer.
    let node = cluster.master_of(0).addr;
    let connection = redis::Client::open(format!("redis://{node}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let min_interval = Duration::from_millis(500);
    let config = RefreshConfig::default()
        .every(None)
        .min_interval(min_interval)
        .jitter(0.1);
    let source = connector(&cluster).topology_source();
    let service = TopologyRefresh::new(RedisService::new(connection), source, config, None);
    let topology = service.handle();

    let started = Instant::now();
    let mut moved = 0;
    for i in 0..10_000 {
        let mut get = redis::cmd("GET");
        get.arg(format!("storm:{i}"));
        if let Err(e) = service.clone().oneshot(get).await {
            assert_eq!(e.kind(), tower_redis_cluster::ErrorKind::Moved, "{e}");
            moved += 1;
        }
    }
    let elapsed = started.elapsed();
    tokio::time::sleep(min_interval * 2).await;
    let stats = topology.stats();
    let allowed =
        (elapsed.as_secs_f64() / min_interval.mul_f64(0.9).as_secs_f64()).ceil() as u64 + 2;
    println!(
        "MOVED storm: {moved} MOVED in {elapsed:?} → {} refreshes (allowed {allowed}), {} triggers",
        stats.refreshes, stats.triggers
    );
    assert!(moved > 5_000, "{moved}");
    assert!(
        stats.refreshes <= allowed,
        "{} > {allowed}",
        stats.refreshes
    );
    assert!(stats.refreshes >= 2, "the storm triggered no refresh");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_was_cut_off_does_not_impose_its_old_view() {
    init_tracing();
    let cluster = support::cluster(3, 1).await;
    let service = stack(
        &cluster,
        RefreshConfig::default()
            .every(None)
            .min_interval(Duration::from_millis(100)),
    );
    let topology = service.handle();
    wait_snapshot(&topology, Duration::from_secs(10), |s| s.shards.len() == 3).await;
    let old = cluster.master_of(0);
    let replica = cluster.replicas_of(0)[0].clone();

    // The master is cut off long enough for its replica to be elected in its place.
    cluster
        .pause_node(old.addr, Duration::from_secs(60))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = topology
            .refresh_and_wait(Duration::from_secs(10))
            .await
            .unwrap();
        let snapshot = topology.current().unwrap();
        if snapshot.masters().contains(&replica.addr.into()) {
            println!("failover seen after {} refreshes", s.refreshes);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica was never promoted: {snapshot:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Back: for a moment it still claims to be master; the majority view must win at every
    // refresh. Until gossip has spread that the old master is reachable again, the others may
    // split on whether it is failed, so a strict majority is awaited, not assumed.
    cluster.resume_node(old.addr).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        topology
            .refresh_and_wait(Duration::from_secs(10))
            .await
            .unwrap();
        let snapshot = topology.current().unwrap();
        assert!(
            snapshot.masters().contains(&replica.addr.into()),
            "{snapshot:?}"
        );
        assert!(
            !snapshot.masters().contains(&old.addr.into()),
            "{snapshot:?}"
        );
        if snapshot.agreed_by * 2 > snapshot.answered {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the nodes never agreed on one view: {snapshot:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_resharding_under_load_reaches_no_caller() {
    init_tracing();
    let cluster = support::cluster(3, 0).await;
    let client = tower_redis_cluster::Client::builder()
        .seed(cluster.seed())
        .resolver(cluster.name_map())
        .build()
        .await
        .unwrap();
    client
        .wait_connected(Duration::from_secs(10))
        .await
        .unwrap();
    let topology = client.topology().unwrap().clone();
    wait_snapshot(&topology, Duration::from_secs(10), |s| s.shards.len() == 3).await;
    // Keys in every shard, so that the moved slots hold keys being read and written.
    let load = Load::start(client.clone(), 8);

    let from = cluster.master_of(0);
    let to = cluster.master_of(1);
    let started = Instant::now();
    let output = tokio::process::Command::new("redis-cli")
        .args([
            "--cluster",
            "reshard",
            &from.addr.to_string(),
            "--cluster-from",
            &from.id,
            "--cluster-to",
            &to.id,
            "--cluster-slots",
            "2000",
            "--cluster-yes",
            "--cluster-pipeline",
            "5",
        ])
        .output()
        .await
        .expect("redis-cli is installed with redis-server");
    assert!(
        output.status.success(),
        "reshard failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let resharded = started.elapsed();
    // The refresher learns the new slot map (it is told by MOVED/ASK or its timer).
    topology.refresh();
    wait_snapshot(&topology, Duration::from_secs(10), |s| {
        s.shard_for_slot(0)
            .and_then(|sh| sh.master.as_ref())
            .map(|m| m.endpoint.clone())
            == Some(to.addr.into())
    })
    .await;
    let stats = load.stop().await;
    println!(
        "resharded 2000 slots in {resharded:?} under load: {} ok, errors {:?}",
        stats.ok.load(Ordering::SeqCst),
        stats.errors()
    );
    assert_eq!(
        stats.error_total(),
        0,
        "errors reached the callers: {:?}",
        stats.errors()
    );
    assert!(stats.ok.load(Ordering::SeqCst) > 1000);
}

/// Connections the cluster's nodes have accepted so far (`INFO stats`), summed.
async fn connections_received(cluster: &LocalCluster) -> u64 {
    let mut stats = redis::cmd("INFO");
    stats.arg("stats");
    let mut total = 0;
    for node in cluster.nodes() {
        let reply = cluster.node_command(node.addr, &stats).await.unwrap();
        let text: String = redis::from_redis_value(reply).unwrap();
        total += text
            .lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .expect("INFO stats has total_connections_received");
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_of_twelve_nodes_opens_no_more_connections_than_its_limit() {
    init_tracing();
    let cluster = support::cluster(6, 1).await;
    let service = stack(&cluster, RefreshConfig::default().every(None));
    let topology = service.handle();
    wait_snapshot(&topology, Duration::from_secs(20), |s| {
        s.shards.len() == 6 && s.nodes().count() == 12
    })
    .await;
    first_success(&service, Duration::from_secs(20))
        .await
        .unwrap();
    // Reading the counters opens connections of its own: measured, then left out.
    let first = connections_received(&cluster).await;
    let reading = connections_received(&cluster).await - first;
    let mut opened = Vec::new();
    for _ in 0..4 {
        let before = connections_received(&cluster).await;
        topology
            .refresh_and_wait(Duration::from_secs(10))
            .await
            .unwrap();
        let after = connections_received(&cluster).await;
        opened.push(after - before - reading);
    }
    let limit = tower_redis_cluster::topology::DEFAULT_MAX_PROBES as u64;
    println!("12 nodes: connections per refresh {opened:?} (limit {limit}, reading {reading})");
    assert!(
        opened.iter().all(|&n| n >= 1 && n <= limit),
        "{opened:?} against a limit of {limit}"
    );
    // Twelve nodes known; still one view of them all.
    let snapshot = topology.current().unwrap();
    assert_eq!(snapshot.nodes().count(), 12);
    assert!(snapshot.asked <= limit as usize, "{}", snapshot.asked);
}
