//! The seed user's world, for real: a managed-style cluster (the harness's managed profile) —
//! TLS with certificates that name DNS names only (one wildcard, no IP), nodes announced by
//! host name, an ACL user, and the addresses of killed or replaced nodes **blackholed** (packets
//! dropped, so connects hang until their timeout, as to a vanished cloud host) — plus the
//! Kubernetes-style plaintext case and credential rotation.
//!
//! Requires the `test-util` and `tls` features, root (nftables) and `nft` on PATH.

mod support;

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use support::{
    assert_documented_kinds, connected, crash_master_and_replace, first_success, get, init_tracing,
    set, Load,
};
use tower_redis_cluster::{
    connect::{credentials_fn, Credentials, Endpoint},
    harness::{LocalCluster, LocalClusterBuilder},
    topology::TopologyHandle,
    Client, ErrorKind,
};

/// Recovery must happen, and long before this; the figures are the recovery bench's business.
const RECOVERY_LIMIT: Duration = Duration::from_secs(15);

async fn start(builder: LocalClusterBuilder) -> LocalCluster {
    init_tracing();
    builder.start().await.expect("the cluster starts")
}

/// The client an application of the seed's world would configure: the configuration
/// endpoint's name, the cluster's CA, the ACL user; a 2 s deadline.
async fn client_of(cluster: &LocalCluster) -> Client {
    connected(cluster.client_builder().timeout(Duration::from_secs(2))).await
}

/// The endpoints clients must use for the cluster's current nodes: their announced names.
fn announced(cluster: &LocalCluster) -> HashSet<Endpoint> {
    cluster
        .nodes()
        .into_iter()
        .map(|n| {
            let name = n.hostname.expect("nodes announce host names");
            Endpoint::new(name, n.addr.port()).unwrap()
        })
        .collect()
}

/// Waits until the client's topology snapshot lists exactly the cluster's current nodes — as
/// between two failovers in production, which are minutes apart.
async fn wait_known(topology: &TopologyHandle, cluster: &LocalCluster) {
    let want = announced(cluster);
    let deadline = Instant::now() + RECOVERY_LIMIT;
    let mut snapshots = topology.subscribe();
    loop {
        let seen: Option<HashSet<Endpoint>> = snapshots
            .borrow_and_update()
            .as_ref()
            .map(|s| s.endpoints().into_iter().collect());
        if seen.as_ref() == Some(&want) {
            return;
        }
        topology.refresh();
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "the topology never listed {want:?}; last seen {seen:?}"
        );
        let _ = tokio::time::timeout(left.min(Duration::from_secs(1)), snapshots.changed()).await;
    }
}

/// The value of `key` on the node at `addr`, asked directly.
async fn on_node(cluster: &LocalCluster, addr: std::net::SocketAddr, key: &str) -> Option<String> {
    redis::from_redis_value(cluster.node_command(addr, &get(key)).await.unwrap()).unwrap()
}

/// The seed scenario: one shard (master + replica); the master crashes and is replaced by a
/// node at a new IP, twice, so none of the start-up nodes — IPs or names — exists any more,
/// and their addresses swallow packets. The inner client loses its master without a `MOVED`
/// and must be rebuilt. With `stale_name`, the configuration endpoint keeps answering with the
/// start-up IPs throughout, so the rebuild can only start from the nodes the client learnt.
async fn seed_scenario(stale_name: bool) {
    let mut cluster = start(LocalCluster::builder().managed().shards(1).replicas(1)).await;
    let start_up_ips: HashSet<_> = cluster.addrs().iter().map(|a| a.ip()).collect();
    let start_up_names = announced(&cluster);
    let client = client_of(&cluster).await;
    let topology = client.topology().expect("refresh is on").clone();
    client.query::<()>(&set("seed:k", "v1")).await.unwrap();
    let endpoint = cluster.config_endpoint();
    if stale_name {
        cluster.name_map().freeze(&endpoint, true);
    }

    let load = Load::start(client.clone(), 8);
    let mut lags = Vec::new();
    for _ in 0..2 {
        wait_known(&topology, &cluster).await;
        let (master, new) = crash_master_and_replace(&mut cluster).await;
        assert_ne!(new.addr.ip(), master.addr.ip());
        let healthy = Instant::now();
        first_success(&client, RECOVERY_LIMIT).await.unwrap();
        lags.push(healthy.elapsed());
    }
    // Keep calls running a little past the last failover, so they too reach the new nodes.
    first_success(&client, RECOVERY_LIMIT).await.unwrap();
    let stats = load.stop().await;
    println!(
        "seed scenario (stale name: {stale_name}): lag after healthy {lags:?}, {} ok, errors {:?}, generation {}",
        stats.ok.load(Ordering::SeqCst),
        stats.errors(),
        client.generation()
    );
    assert!(stats.ok.load(Ordering::SeqCst) > 0);
    assert_documented_kinds(&stats.errors());
    assert!(client.generation() >= 2, "the inner client was rebuilt");

    // Nothing the client was started with exists: not an IP, not a node name.
    let now_ips: HashSet<_> = cluster.addrs().iter().map(|a| a.ip()).collect();
    assert!(
        start_up_ips.is_disjoint(&now_ips),
        "{start_up_ips:?} / {now_ips:?}"
    );
    assert!(start_up_names.is_disjoint(&announced(&cluster)));
    if stale_name {
        let resolved: HashSet<_> = cluster
            .name_map()
            .lookup(&endpoint)
            .iter()
            .map(|a| a.ip())
            .collect();
        assert_eq!(resolved, start_up_ips, "the name stayed stale");
    }
    // The data survived, and a write reaches today's master.
    assert_eq!(client.query::<String>(&get("seed:k")).await.unwrap(), "v1");
    client.query::<()>(&set("seed:k2", "v2")).await.unwrap();
    let master = cluster.master_of(0);
    assert_eq!(
        on_node(&cluster, master.addr, "seed:k2").await.as_deref(),
        Some("v2")
    );
}

/// The bug an independent run found: with certificates that name no IP, every probe and every
/// rebuild from known nodes failed verification ("certificate not valid for name
/// 127.0.2.11"), so the client never recovered behind a stale name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_scenario_with_a_stale_name_recovers_through_nodes_known_by_name() {
    seed_scenario(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_scenario_with_the_name_following_the_nodes_recovers() {
    seed_scenario(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_shards_every_node_replaced_behind_a_stale_name() {
    let mut cluster = start(LocalCluster::builder().managed().shards(3).replicas(1)).await;
    let start_up_ips: HashSet<_> = cluster.addrs().iter().map(|a| a.ip()).collect();
    let client = client_of(&cluster).await;
    let topology = client.topology().unwrap().clone();
    cluster.name_map().freeze(&cluster.config_endpoint(), true);
    let load = Load::start(client.clone(), 8);
    for node in cluster.nodes() {
        wait_known(&topology, &cluster).await;
        cluster.replace_node(node.addr).await.unwrap();
        first_success(&client, RECOVERY_LIMIT).await.unwrap();
    }
    finish(
        &client,
        &cluster,
        &start_up_ips,
        load,
        "3x1, every node replaced, stale name",
    )
    .await;
}

/// After every node moved: none is at a start-up IP, the client serves, the load saw only
/// documented errors, and every shard takes writes again.
async fn finish(
    client: &Client,
    cluster: &LocalCluster,
    start_up_ips: &HashSet<std::net::IpAddr>,
    load: Load,
    label: &str,
) {
    let now_ips: HashSet<_> = cluster.addrs().iter().map(|a| a.ip()).collect();
    assert!(start_up_ips.is_disjoint(&now_ips));
    first_success(client, RECOVERY_LIMIT).await.unwrap();
    let stats = load.stop().await;
    println!(
        "{label}: {} ok, errors {:?}, generation {}",
        stats.ok.load(Ordering::SeqCst),
        stats.errors(),
        client.generation()
    );
    assert_documented_kinds(&stats.errors());
    for i in 0..30 {
        client
            .query::<()>(&set(&format!("after:{i}"), "x"))
            .await
            .unwrap();
    }
}

/// Kubernetes: plaintext, nodes announced by their pod names; every pod restarts at a new IP
/// under the same name (with its `nodes.conf`, as with a persistent volume). The old pod IPs
/// swallow packets.
async fn pods_restart_at_new_ips(stale_name: bool) {
    let mut cluster = start(
        LocalCluster::builder()
            .shards(3)
            .replicas(1)
            .announce_hostnames(true)
            .blackhole_dead_nodes(true),
    )
    .await;
    let names = announced(&cluster);
    let start_up_ips: HashSet<_> = cluster.addrs().iter().map(|a| a.ip()).collect();
    let client = client_of(&cluster).await;
    if stale_name {
        cluster.name_map().freeze(&cluster.config_endpoint(), true);
    }
    let load = Load::start(client.clone(), 8);
    for node in cluster.nodes() {
        let moved = cluster.move_node(node.addr).await.unwrap();
        assert_eq!(moved.hostname, node.hostname, "same name");
        assert_ne!(moved.addr.ip(), node.addr.ip(), "new IP");
        first_success(&client, RECOVERY_LIMIT).await.unwrap();
    }
    assert_eq!(announced(&cluster), names, "every pod kept its name");
    let label = format!("pods restarted at new IPs (stale name: {stale_name})");
    finish(&client, &cluster, &start_up_ips, load, &label).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_pods_restarting_at_new_ips_under_the_same_names() {
    pods_restart_at_new_ips(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_pods_restarting_at_new_ips_behind_a_stale_name() {
    pods_restart_at_new_ips(true).await;
}

/// Pods without persistence: a replacement comes up empty, as a new node, at a new IP, under
/// the old pod's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_under_the_old_name_is_followed() {
    let mut cluster = start(
        LocalCluster::builder()
            .shards(1)
            .replicas(1)
            .announce_hostnames(true)
            .blackhole_dead_nodes(true),
    )
    .await;
    let client = client_of(&cluster).await;
    client.query::<()>(&set("pod:k", "v")).await.unwrap();
    let load = Load::start(client.clone(), 4);
    for _ in 0..2 {
        let master = cluster.master_of(0);
        let new = cluster
            .replace_node_keeping_name(master.addr)
            .await
            .unwrap();
        assert_eq!(new.hostname, master.hostname);
        assert_ne!(new.id, master.id, "a new node");
        first_success(&client, RECOVERY_LIMIT).await.unwrap();
    }
    let stats = load.stop().await;
    assert_documented_kinds(&stats.errors());
    assert_eq!(client.query::<String>(&get("pod:k")).await.unwrap(), "v");
}

/// Short-lived credentials: the server stops accepting the old password while calls run, and
/// kills the connections authenticated with it; the client serves again as soon as its
/// provider hands out the new one — no restart, no rebuild by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_credentials_are_picked_up_from_the_provider() {
    let mut cluster = start(LocalCluster::builder().managed().shards(1).replicas(1)).await;
    let (user, first) = cluster.user().expect("the managed profile has an ACL user");
    let current = Arc::new(Mutex::new(Credentials::new(&user, first.as_str())));
    let asked = Arc::new(AtomicU64::new(0));
    let provider = {
        let (current, asked) = (current.clone(), asked.clone());
        credentials_fn(move || {
            asked.fetch_add(1, Ordering::SeqCst);
            let credentials = current.lock().unwrap().clone();
            async move { Ok(credentials) }
        })
    };
    let client = connected(
        cluster
            .client_builder()
            .credentials_provider(provider)
            .timeout(Duration::from_secs(2)),
    )
    .await;
    client.query::<()>(&set("rot:k", "v")).await.unwrap();
    let load = Load::start(client.clone(), 4);

    // The rotation: the new token is valid, the old one no longer; live connections made with
    // the old one are dropped.
    let second = "rotated-token-2";
    cluster.set_user_password(second).await.unwrap();
    let mut kill = redis::cmd("CLIENT");
    kill.arg("KILL").arg("USER").arg(&user);
    for addr in cluster.addrs() {
        cluster.node_command(addr, &kill).await.unwrap();
    }
    *current.lock().unwrap() = Credentials::new(&user, second);
    let rotated = Instant::now();
    first_success(&client, RECOVERY_LIMIT).await.unwrap();
    println!(
        "serving again {:?} after the provider had the new token",
        rotated.elapsed()
    );
    let stats = load.stop().await;
    println!(
        "rotation: {} ok, errors {:?}, provider asked {} times",
        stats.ok.load(Ordering::SeqCst),
        stats.errors(),
        asked.load(Ordering::SeqCst)
    );
    let mut allowed = stats.errors();
    allowed.remove(ErrorKind::Auth.as_str());
    assert_documented_kinds(&allowed);
    assert_eq!(client.query::<String>(&get("rot:k")).await.unwrap(), "v");
    // The old token is refused by the server, so serving proves the provider's new one is used.
    let old = Client::builder()
        .seed(cluster.seed())
        .resolver(cluster.name_map())
        .tls(tower_redis_cluster::TlsConfig::custom_ca(
            cluster.ca_pem().unwrap(),
        ))
        .credentials(&user, first.as_str())
        .timeout(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let refused = old.send(redis::cmd("PING")).await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Auth, "{refused}");
}

/// Nodes that listen on a plaintext port *and* a TLS port report both; a TLS client must be
/// sent to the TLS one — by the inner client and by the nodes it learns for rebuilds (the
/// snapshot once took `port` before `tls-port`, so a rebuild from known nodes went to the
/// plaintext port and hung in its TLS handshake).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_a_plaintext_and_a_tls_port_are_reached_on_the_tls_port() {
    // Every node also listens in plaintext on one port above the harness's ranges (its own IP
    // keeps it apart from other clusters).
    let plain_port = 50_000 + (std::process::id() % 9_000) as u16;
    let mut cluster = start(
        LocalCluster::builder()
            .managed()
            .shards(1)
            .replicas(1)
            .config("port", plain_port.to_string()),
    )
    .await;
    let master = cluster.master_of(0);
    let mut shards = redis::cmd("CLUSTER");
    shards.arg("SHARDS");
    let reply = format!(
        "{:?}",
        cluster.node_command(master.addr, &shards).await.unwrap()
    );
    assert!(
        reply.contains(&plain_port.to_string()),
        "both ports reported: {reply}"
    );

    let client = client_of(&cluster).await;
    let topology = client.topology().unwrap().clone();
    wait_known(&topology, &cluster).await;
    let ports: HashSet<u16> = topology
        .current()
        .unwrap()
        .endpoints()
        .iter()
        .map(Endpoint::port)
        .collect();
    assert_eq!(ports, HashSet::from([cluster.port()]), "the TLS port");

    // Rebuilds after crashes behind a stale name can only use those endpoints.
    cluster.name_map().freeze(&cluster.config_endpoint(), true);
    for _ in 0..2 {
        wait_known(&topology, &cluster).await;
        crash_master_and_replace(&mut cluster).await;
        first_success(&client, RECOVERY_LIMIT).await.unwrap();
    }
    assert!(client.generation() >= 2);
}
