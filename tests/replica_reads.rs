//! Reads served by the replica while the master is down (`ReadPolicy::PrimaryThenReplica`),
//! against real clusters in the seed's shape: one shard, a master and its replica. Requires the
//! `test-util` feature.

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
    harness::LocalCluster,
    read::{ReadPolicy, Zones},
    redis, Client,
};

const KEYS: usize = 50;

/// Errors by kind, and calls that went through.
#[derive(Default, Debug)]
struct Tally {
    ok: u64,
    errors: BTreeMap<String, u64>,
    /// When each error came.
    at: Vec<Instant>,
}

/// Tasks calling `make(i)` through `client` until stopped; each reply checked by `check`.
fn spawn_load(
    client: Client,
    tasks: usize,
    stop: Arc<AtomicBool>,
    make: fn(usize, u64) -> redis::Cmd,
    check: fn(usize, redis::Value),
) -> (Arc<Mutex<Tally>>, Vec<tokio::task::JoinHandle<()>>) {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let handles = (0..tasks)
        .map(|t| {
            let client = client.clone();
            let stop = stop.clone();
            let tally = tally.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let i = (t * 7919 + n as usize) % KEYS;
                    match client.send(make(i, n)).await {
                        Ok(value) => {
                            check(i, value);
                            tally.lock().unwrap().ok += 1;
                        }
                        Err(e) => {
                            *tally
                                .lock()
                                .unwrap()
                                .errors
                                .entry(format!("{}/{:?}", e.kind().as_str(), e.sent()))
                                .or_default() += 1;
                            tally.lock().unwrap().at.push(Instant::now());
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        })
        .collect();
    (tally, handles)
}

fn read(i: usize, _: u64) -> redis::Cmd {
    let mut get = redis::cmd("GET");
    get.arg(format!("{{r}}k{i}"));
    get
}

fn check_read(i: usize, value: redis::Value) {
    let got: String = redis::from_redis_value(value).unwrap();
    assert_eq!(got, format!("v{i}"), "a replica served another value");
}

fn write(i: usize, n: u64) -> redis::Cmd {
    let mut set = redis::cmd("SET");
    set.arg(format!("{{r}}w{i}")).arg(n);
    set
}

fn check_write(_: usize, _: redis::Value) {}

/// Until the replica has every write of the master (`INFO replication` offsets agree).
async fn replicated(cluster: &LocalCluster) {
    let offset = |text: String, field: &str| -> i64 {
        text.lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(-1)
    };
    let mut info = redis::cmd("INFO");
    info.arg("replication");
    let started = Instant::now();
    loop {
        let master: String = redis::from_redis_value(
            cluster
                .node_command(cluster.master_of(0).addr, &info)
                .await
                .unwrap(),
        )
        .unwrap();
        let m = offset(master, "master_repl_offset:");
        let mut behind = false;
        for replica in cluster.replicas_of(0) {
            let text: String =
                redis::from_redis_value(cluster.node_command(replica.addr, &info).await.unwrap())
                    .unwrap();
            behind |= offset(text, "slave_repl_offset:") != m;
        }
        if m > 0 && !behind {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "replica never caught up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The master crashes and stays down `outage` — a managed service's control plane takes its
/// time — before its replica is promoted (`CLUSTER FAILOVER TAKEOVER`: one shard has no other
/// master to vote) and the dead node is replaced at a new IP.
async fn outage_then_replacement(cluster: &mut LocalCluster, outage: Duration) {
    let master = cluster.master_of(0);
    cluster.kill_node(master.addr).await.unwrap();
    tokio::time::sleep(outage).await;
    let replica = cluster.replicas_of(0)[0].clone();
    let mut takeover = redis::cmd("CLUSTER");
    takeover.arg("FAILOVER").arg("TAKEOVER");
    cluster.node_command(replica.addr, &takeover).await.unwrap();
    cluster.replace_node(master.addr).await.unwrap();
}

/// One shard, a master and its replica, whose nodes serve reads while the cluster is down —
/// without it, the replica refuses reads (`CLUSTERDOWN`) as soon as it considers its master
/// failed, and no client can read anything until the promotion.
async fn start(builder: tower_redis_cluster::harness::LocalClusterBuilder) -> LocalCluster {
    builder
        .shards(1)
        .replicas(1)
        .config("cluster-allow-reads-when-down", "yes")
        .start()
        .await
        .expect("the cluster starts")
}

async fn scenario(mut cluster: LocalCluster, stale_name: bool) {
    // Reads have 1 s, writes 4 s; the master is down for 1.5 s, longer than a read may wait.
    let builder = || {
        cluster
            .client_builder()
            .response_timeout(Duration::from_millis(300))
    };
    let routed = connected(
        builder()
            .read_policy(ReadPolicy::PrimaryThenReplica)
            .timeout(Duration::from_secs(1)),
    )
    .await;
    let writer = connected(
        builder()
            .read_policy(ReadPolicy::PrimaryThenReplica)
            .timeout(Duration::from_secs(4)),
    )
    .await;
    // The same reads without the policy: the outage must show there.
    let control = connected(builder().timeout(Duration::from_secs(1))).await;
    for i in 0..KEYS {
        let mut set = redis::cmd("SET");
        set.arg(format!("{{r}}k{i}")).arg(format!("v{i}"));
        routed.send(set).await.unwrap();
    }
    replicated(&cluster).await;
    if stale_name {
        cluster.name_map().freeze(&cluster.config_endpoint(), true);
    }
    // The clients know the replica before the crash.
    for client in [&routed, &writer, &control] {
        let topology = client.topology().unwrap();
        let started = Instant::now();
        while topology.current().map_or(0, |t| t.nodes().count()) < 2 {
            topology.refresh();
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(started.elapsed() < Duration::from_secs(10));
        }
    }

    let stop = Arc::new(AtomicBool::new(false));
    let (reads, mut tasks) = spawn_load(routed.clone(), 8, stop.clone(), read, check_read);
    let (writes, more) = spawn_load(writer.clone(), 2, stop.clone(), write, check_write);
    tasks.extend(more);
    let (controlled, more) = spawn_load(control.clone(), 4, stop.clone(), read, check_read);
    tasks.extend(more);

    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed = Instant::now();
    outage_then_replacement(&mut cluster, Duration::from_millis(1500)).await;
    // Past the replacement, until the control client reads from the new master again.
    support::first_success(&control, Duration::from_secs(20))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let (reads, writes, controlled) = (
        reads.lock().unwrap(),
        writes.lock().unwrap(),
        controlled.lock().unwrap(),
    );
    let when = |t: &Tally| -> Vec<u128> {
        t.at.iter()
            .map(|a| a.saturating_duration_since(killed).as_millis())
            .collect()
    };
    println!(
        "stale name {stale_name}: PrimaryThenReplica reads {:?} at {:?} ms; writes (4 s) {:?} at {:?} ms; Primary reads {:?} at {:?} ms",
        reads.errors, when(&reads), writes.errors, when(&writes), controlled.errors, when(&controlled)
    );
    assert!(
        !controlled.errors.is_empty(),
        "the outage did not reach the reads of the client without the policy: it tested nothing"
    );
    assert!(reads.ok > 100 && writes.ok > 10);
    assert!(reads.errors.is_empty(), "read errors: {:?}", reads.errors);
    assert!(
        writes.errors.is_empty(),
        "write errors: {:?}",
        writes.errors
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_see_no_error_while_the_master_is_down_and_replaced() {
    init_tracing();
    scenario(start(LocalCluster::builder()).await, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_see_no_error_while_the_master_is_down_and_replaced_behind_a_stale_name() {
    init_tracing();
    scenario(start(LocalCluster::builder()).await, true).await;
}

#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_see_no_error_while_the_master_is_down_and_replaced_when_managed() {
    init_tracing();
    scenario(start(LocalCluster::builder().managed()).await, true).await;
}

#[tokio::test]
async fn a_read_policy_without_topology_refresh_fails_the_build() {
    let error = Client::builder()
        .seed("127.0.0.1:1")
        .no_topology_refresh()
        .read_policy(ReadPolicy::PrimaryThenReplica)
        .build()
        .await
        .unwrap_err();
    assert_eq!(
        error.kind(),
        tower_redis_cluster::ErrorKind::Config,
        "{error}"
    );
}

/// `GET`s each node has served.
async fn served(cluster: &LocalCluster, nodes: Vec<std::net::SocketAddr>) -> Vec<u64> {
    let mut counts = Vec::new();
    for node in nodes {
        counts.push(gets_served(cluster, node).await);
    }
    counts
}

/// `GET`s a node has served (`INFO commandstats`).
async fn gets_served(cluster: &LocalCluster, node: std::net::SocketAddr) -> u64 {
    let mut info = redis::cmd("INFO");
    info.arg("commandstats");
    let text: String =
        redis::from_redis_value(cluster.node_command(node, &info).await.unwrap()).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("cmdstat_get:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_stay_in_the_callers_zone_and_move_when_its_replica_dies() {
    init_tracing();
    let mut cluster = LocalCluster::builder()
        .shards(1)
        .replicas(2)
        .start()
        .await
        .expect("the cluster starts");
    let master = cluster.master_of(0);
    let replicas = cluster.replicas_of(0);
    let (near, far) = (replicas[0].clone(), replicas[1].clone());
    let zones = Zones::new("zone-a")
        .node(near.addr.to_string(), "zone-a")
        .node(far.addr.to_string(), "zone-b")
        .node(master.addr.to_string(), "zone-b");
    let client = connected(
        cluster
            .client_builder()
            .read_policy(ReadPolicy::ReplicaPreferred)
            .zones(zones),
    )
    .await;
    for i in 0..KEYS {
        let mut set = redis::cmd("SET");
        set.arg(format!("{{r}}k{i}")).arg(format!("v{i}"));
        client.send(set).await.unwrap();
    }
    replicated(&cluster).await;
    let topology = client.topology().unwrap();
    let started = Instant::now();
    while topology.current().map_or(0, |t| t.nodes().count()) < 3 {
        topology.refresh();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    let before = served(&cluster, vec![near.addr, far.addr, master.addr]).await;
    for i in 0..100 {
        check_read(i % KEYS, client.send(read(i % KEYS, 0)).await.unwrap());
    }
    let after = served(&cluster, vec![near.addr, far.addr, master.addr]).await;
    let delta: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    println!("GETs served (same-zone replica, other-zone replica, master): {delta:?}");
    assert_eq!(delta, [100, 0, 0], "reads left the caller's zone");

    // The same-zone replica dies: reads go to the other zone's replica, none fails.
    cluster.kill_node(near.addr).await.unwrap();
    let before = served(&cluster, vec![far.addr, master.addr]).await;
    for i in 0..100 {
        check_read(i % KEYS, client.send(read(i % KEYS, 0)).await.unwrap());
    }
    let after = served(&cluster, vec![far.addr, master.addr]).await;
    let delta: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    println!("after the same-zone replica died (other-zone replica, master): {delta:?}");
    assert_eq!(
        delta,
        [100, 0],
        "reads did not move to the other zone's replica"
    );
}
