//! The rebuild layer against real `redis-server` clusters whose nodes come back at new IPs.
//! Requires the `test-util` feature (the harness).

mod support;

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use support::{assert_documented_kinds_without_retry, first_success, init_tracing, Load};
use tower_redis_cluster::{
    connect::{connect_fn, ClusterConnector, Connect, ConnectHints, Seeds},
    harness::LocalCluster,
    rebuild::{Rebuild, RebuildConfig, RebuildHandle},
    ErrorKind,
};

const RECOVERY_LIMIT: Duration = Duration::from_secs(30);

/// A connector on the cluster's configuration-endpoint *name*, resolved through the harness's
/// name map, that counts its attempts and successes.
fn counted_connector(
    cluster: &LocalCluster,
) -> (
    impl Connect<Service = <ClusterConnector as Connect>::Service>,
    Arc<AtomicU64>,
    Arc<AtomicU64>,
) {
    let inner =
        ClusterConnector::new(Seeds::parse([cluster.seed()]).unwrap()).resolver(cluster.name_map());
    let attempts = Arc::new(AtomicU64::new(0));
    let successes = Arc::new(AtomicU64::new(0));
    let (a, s) = (attempts.clone(), successes.clone());
    let connector = connect_fn(move |hints: &ConnectHints| {
        a.fetch_add(1, Ordering::SeqCst);
        let s = s.clone();
        let connecting = inner.connect(hints);
        async move {
            let service = connecting.await?;
            s.fetch_add(1, Ordering::SeqCst);
            Ok(service)
        }
    });
    (connector, attempts, successes)
}

/// A one-shard cluster has no other master to vote for its replica, so — as a managed
/// service's control plane does — the replica is promoted by force once the master is gone.
async fn promote_replica(cluster: &LocalCluster) {
    let replica = cluster.replicas_of(0)[0].clone();
    let mut takeover = redis::cmd("CLUSTER");
    takeover.arg("FAILOVER").arg("TAKEOVER");
    cluster.node_command(replica.addr, &takeover).await.unwrap();
}

fn ips(addrs: &[SocketAddr]) -> HashSet<std::net::IpAddr> {
    addrs.iter().map(|a| a.ip()).collect()
}

/// The seed failure (redis-py #2472): one shard behind a name; the master crashes, the replica
/// is promoted and a replacement joins at a new IP — twice, so no start-up IP is left.
async fn two_crash_failovers(stale_name: bool) {
    init_tracing();
    let mut cluster = support::cluster(1, 1).await;
    let original = ips(&cluster.addrs());
    let (connector, attempts, successes) = counted_connector(&cluster);
    let service = Rebuild::new(connector, RebuildConfig::default());
    let handle: RebuildHandle = service.handle();
    handle
        .wait_for_generation(1, Duration::from_secs(10))
        .await
        .unwrap();
    if stale_name {
        // DNS keeps answering with the start-up IPs.
        cluster.name_map().freeze(&cluster.config_endpoint(), true);
    }

    let load = Load::start(service.clone(), 8);
    for round in 1..=2 {
        // What a topology refresh would have told the rebuild layer before the crash.
        handle.set_known_nodes(cluster.addrs().into_iter().map(Into::into));
        let ok_before = load.stats.ok.load(Ordering::SeqCst);
        let master = cluster.master_of(0);
        let crashed = Instant::now();
        cluster.kill_node(master.addr).await.unwrap();
        promote_replica(&cluster).await;
        cluster.replace_node(master.addr).await.unwrap();
        let healthy = Instant::now();
        let recovered = first_success(&service, RECOVERY_LIMIT)
            .await
            .unwrap_or_else(|e| {
                panic!("round {round}: no recovery within {RECOVERY_LIMIT:?}: {e}")
            });
        // The load itself serves again too.
        let served = load.stats.ok.load(Ordering::SeqCst);
        let wait_load = Instant::now();
        while load.stats.ok.load(Ordering::SeqCst) <= served.max(ok_before) {
            assert!(
                wait_load.elapsed() < RECOVERY_LIMIT,
                "round {round}: load never served again"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        println!(
            "stale_name={stale_name} round {round}: healthy→first success {:?} (crash→first success {:?}), generation {}",
            recovered.saturating_duration_since(healthy),
            recovered - crashed,
            handle.generation()
        );
    }
    let stats = load.stop().await;
    let now = ips(&cluster.addrs());
    assert!(
        original.is_disjoint(&now),
        "an original IP survived: {original:?} vs {now:?}"
    );
    assert!(stats.ok.load(Ordering::SeqCst) > 0);
    assert_documented_kinds_without_retry(&stats.errors());
    println!(
        "load: {} ok, errors {:?}",
        stats.ok.load(Ordering::SeqCst),
        stats.errors()
    );
    let status = handle.status();
    // Every successful connect became a generation; no connect ran outside a rebuild.
    assert_eq!(successes.load(Ordering::SeqCst), status.rebuilds);
    assert_eq!(attempts.load(Ordering::SeqCst), status.attempts);
    if stale_name {
        // After the second crash the name leads only to dead IPs: only a rebuild from the
        // known nodes can have recovered.
        assert!(
            status.generation >= 2,
            "recovered without a rebuild? {status:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_two_replace_failovers_with_the_name_following_the_nodes() {
    two_crash_failovers(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_two_replace_failovers_with_a_stale_name_using_known_nodes() {
    two_crash_failovers(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_after_every_node_of_a_three_shard_cluster_is_replaced() {
    init_tracing();
    let mut cluster = support::cluster(3, 1).await;
    let original = ips(&cluster.addrs());
    let (connector, _, _) = counted_connector(&cluster);
    let service = Rebuild::new(connector, RebuildConfig::default());
    let handle = service.handle();
    handle
        .wait_for_generation(1, Duration::from_secs(10))
        .await
        .unwrap();
    let load = Load::start(service.clone(), 8);
    for node in cluster.nodes() {
        cluster.replace_node(node.addr).await.unwrap();
    }
    assert!(original.is_disjoint(&ips(&cluster.addrs())));
    first_success(&service, RECOVERY_LIMIT).await.unwrap();
    let stats = load.stop().await;
    assert_documented_kinds_without_retry(&stats.errors());
    println!(
        "3x1 all replaced: {} ok, errors {:?}, generation {}",
        stats.ok.load(Ordering::SeqCst),
        stats.errors(),
        handle.generation()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_end_within_max_wait_while_the_cluster_is_down_and_serve_again_after() {
    init_tracing();
    let mut cluster = support::cluster(1, 1).await;
    let (connector, _, _) = counted_connector(&cluster);
    let max_wait = Duration::from_millis(500);
    let config = RebuildConfig::default()
        .max_wait(max_wait)
        .backoff(Duration::from_millis(50), Duration::from_millis(500))
        .unwrap();
    let service = Rebuild::new(connector, config);
    let handle = service.handle();
    handle
        .wait_for_generation(1, Duration::from_secs(10))
        .await
        .unwrap();
    first_success(&service, RECOVERY_LIMIT).await.unwrap();

    cluster.stop_all().await.unwrap();
    // Let the client notice; from then on every call is `Unreachable` within max_wait.
    let settle = Instant::now();
    loop {
        let err = first_success(&service, Duration::from_millis(1))
            .await
            .unwrap_err();
        if err.kind() == ErrorKind::Unreachable || settle.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    let slack = Duration::from_millis(250);
    let mut kinds = HashSet::new();
    for _ in 0..20 {
        let started = Instant::now();
        let err = first_success(&service, Duration::from_millis(1))
            .await
            .unwrap_err();
        let took = started.elapsed();
        assert!(
            took <= max_wait + slack,
            "a call took {took:?} while the cluster was down"
        );
        kinds.insert(err.kind());
    }
    assert_eq!(kinds, HashSet::from([ErrorKind::Unreachable]), "{kinds:?}");

    let generation = handle.generation();
    cluster.start_all().await.unwrap();
    first_success(&service, RECOVERY_LIMIT).await.unwrap();
    assert!(
        handle.generation() > generation,
        "the same service object rebuilt itself"
    );
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_forced_rebuilds_leak_no_connections_or_tasks() {
    let cluster = support::cluster(1, 0).await;
    let (connector, _, successes) = counted_connector(&cluster);
    let service = Rebuild::new(connector, RebuildConfig::default());
    let handle = service.handle();
    handle
        .wait_for_generation(1, Duration::from_secs(10))
        .await
        .unwrap();
    first_success(&service, RECOVERY_LIMIT).await.unwrap();
    let metrics = tokio::runtime::Handle::current().metrics();
    let (fds, tasks) = (open_fds(), metrics.num_alive_tasks());

    for _ in 0..1000 {
        let next = handle.generation() + 1;
        handle.rebuild();
        handle
            .wait_for_generation(next, Duration::from_secs(10))
            .await
            .unwrap();
    }
    first_success(&service, RECOVERY_LIMIT).await.unwrap();
    assert_eq!(successes.load(Ordering::SeqCst), 1001);

    // Old clients close in the background once their last clone is dropped.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (now_fds, now_tasks) = (open_fds(), metrics.num_alive_tasks());
        if now_fds <= fds + 2 && now_tasks <= tasks {
            println!("1000 rebuilds: fds {fds} → {now_fds}, tasks {tasks} → {now_tasks}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "leak after 1000 rebuilds: fds {fds} → {now_fds}, tasks {tasks} → {now_tasks}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_no_node_accepts_fails_from_its_tcp_check_with_the_cause() {
    let mut cluster = support::cluster(3, 0).await;
    let connector = ClusterConnector::new(Seeds::parse(cluster.node_urls()).unwrap());
    cluster.stop_all().await.unwrap();
    let err = match connector.connect(&ConnectHints::default()).await {
        Ok(_) => panic!("connected to a stopped cluster"),
        Err(e) => e,
    };
    // Not the inner client trying every node again after the check found none: one error
    // that says what the check saw.
    assert_eq!(
        (err.kind(), err.sent()),
        (ErrorKind::Unreachable, tower_redis_cluster::Sent::No)
    );
    let text = err.to_string();
    assert!(
        text.contains("none of the 3 initial nodes accepted a TCP connection"),
        "{text}"
    );
    assert!(
        text.to_lowercase().contains("refused"),
        "the cause is shown: {text}"
    );
}

/// The harness's names, counting every lookup: with nodes announced by host name, one per
/// connection attempt of any part of a client.
struct CountingNames {
    names: tower_redis_cluster::harness::NameMap,
    lookups: AtomicU64,
}

impl tower_redis_cluster::connect::Resolve for CountingNames {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> tower_redis_cluster::connect::ResolveFuture<'a> {
        self.lookups.fetch_add(1, Ordering::Relaxed);
        self.names.resolve(host, port)
    }
}

/// Through a total outage a client does not keep dialling every node it knows from its
/// rebuilds and its refreshes alike: once a check reached no node, one node is checked at a
/// time, at most every 2 s or so — and the client serves again soon after the cluster does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_total_outage_connection_checks_are_paced_and_the_client_comes_back() {
    init_tracing();
    paced_through_a_total_outage(named_cluster().await).await;
}

/// 3 shards × 1 replica announcing host names, as a managed cluster does.
async fn named_cluster() -> LocalCluster {
    LocalCluster::builder()
        .shards(3)
        .replicas(1)
        .announce_hostnames(true)
        .start()
        .await
        .expect("the cluster starts")
}

/// The same in the seed user's world: TLS with names-only certificates, an ACL user, and dead
/// addresses that swallow packets, so each check waits for its connect timeout.
#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_total_outage_connection_checks_are_paced_and_the_client_comes_back_when_managed()
{
    init_tracing();
    let cluster = LocalCluster::builder()
        .managed()
        .shards(3)
        .replicas(1)
        .start()
        .await
        .expect("the managed cluster starts");
    paced_through_a_total_outage(cluster).await;
}

async fn paced_through_a_total_outage(mut cluster: LocalCluster) {
    let names = Arc::new(CountingNames {
        names: cluster.name_map(),
        lookups: AtomicU64::new(0),
    });
    let client = support::connected(cluster.client_builder().resolver(names.clone())).await;
    let get = || {
        let mut cmd = tower_redis_cluster::redis::cmd("GET");
        cmd.arg("paced");
        cmd
    };
    client.send(get()).await.unwrap();
    // A busy service: calls keep coming through the outage.
    let callers: Vec<_> = (0..16)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                loop {
                    let _ = client.send(get()).await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect();
    let before = names.lookups.load(Ordering::Relaxed);
    cluster.stop_all().await.unwrap();
    // The first reaction dials what the client knows (and the inner client reconnects on its
    // own); after it, the pace holds.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let from = names.lookups.load(Ordering::Relaxed);
    println!(
        "connection attempts in the outage's first 1.5 s: {}",
        from - before
    );
    let window = Duration::from_secs(5);
    tokio::time::sleep(window).await;
    let during = names.lookups.load(Ordering::Relaxed) - from;
    println!("connection attempts in {window:?} of a total outage: {during}");
    assert!(
        during as f64 <= 2.0 * window.as_secs_f64(),
        "{during} connection attempts in {window:?} of a total outage"
    );
    cluster.start_all().await.unwrap();
    let healthy = Instant::now();
    first_success(&client, Duration::from_secs(5))
        .await
        .expect("the client serves again");
    println!("served again {:?} after the cluster", healthy.elapsed());
    for caller in callers {
        caller.abort();
    }
}

/// A client that went through a total outage and then has nothing to do finds the cluster back
/// by itself: once a check found no node, its refresher checks again at the outage gate's pace,
/// without waiting for a call or for its periodic refresh (30 s away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_total_outage_an_idle_client_finds_the_cluster_back_by_itself() {
    init_tracing();
    let mut cluster = named_cluster().await;
    let client = support::connected(cluster.client_builder()).await;
    let stats = || client.topology().expect("refresh is on").stats();
    let succeeded = |s: &tower_redis_cluster::topology::RefreshStats| s.refreshes - s.failures;
    let failed_before = stats().failures;
    cluster.stop_all().await.unwrap();
    // Calls fail until a refresh has found no node.
    let waited = Instant::now();
    while stats().failures == failed_before {
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "no refresh failed through the outage: {:?}",
            stats()
        );
        let _ = client.send(tower_redis_cluster::redis::cmd("PING")).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // From here on, no calls. The refresher keeps checking at the gate's pace (at most 2 s
    // apart) by itself: a trigger left over from the calls would account for one refresh.
    let quiet = stats().refreshes;
    let waited = Instant::now();
    while stats().refreshes < quiet + 3 {
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "the refresher stopped checking once the calls stopped: {:?}",
            stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = succeeded(&stats());
    cluster.start_all().await.unwrap();
    let back = Instant::now();
    while succeeded(&stats()) == before {
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "no refresh succeeded within 10 s of the cluster's return without calls: {:?}",
            stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "an idle client's refresh found the cluster {:?} after it came back",
        back.elapsed()
    );
    let mut ping = tower_redis_cluster::redis::cmd("PING");
    ping.arg("back");
    client
        .send(ping)
        .await
        .expect("the idle client serves at once");
}
