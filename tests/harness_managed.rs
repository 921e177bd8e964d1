//! The harness's managed-cluster profile against real `redis-server` processes: announced host
//! names, names-only TLS certificates, blackholed dead nodes, replacement under the same name,
//! a node moving to a new IP, password rotation, and the errors of a machine without nftables.
//! Every check asks the nodes (or the kernel) where it can, not the harness's bookkeeping.
//!
//! Needs `nft` and root (or CAP_NET_ADMIN) for the blackholing tests, like `managed()` itself.
//! Run: `cargo test --features test-util,tls --test harness_managed -- --test-threads=2`.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use redis::{
    aio::MultiplexedConnection, cluster::ClusterClient, AsyncCommands, AsyncConnectionConfig,
    ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, Value,
};
use tower_redis_cluster::{
    connect::DnsAdapter,
    harness::{HarnessError, LocalCluster, NodeInfo, Role},
};

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

async fn start(builder: tower_redis_cluster::harness::LocalClusterBuilder) -> LocalCluster {
    init_tracing();
    let t = Instant::now();
    let c = builder.start().await.expect("cluster starts");
    eprintln!("[timing] cluster start: {:?}", t.elapsed());
    c
}

// ---------------------------------------------------------------------------------------------
// Talking to single nodes, as a client would
// ---------------------------------------------------------------------------------------------

fn certs(c: &LocalCluster) -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: None,
        root_cert: c.ca_pem(),
    }
}

/// A connection to the node at `addr`, logging in as `auth` (user, password). On a TLS cluster
/// the certificate is verified against `verify_as` (a name, or the IP itself).
async fn node_con(
    c: &LocalCluster,
    addr: SocketAddr,
    verify_as: &str,
    auth: Option<(&str, &str)>,
) -> redis::RedisResult<MultiplexedConnection> {
    let target = if c.is_tls() {
        ConnectionAddr::TcpTls {
            host: verify_as.to_owned(),
            port: addr.port(),
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(addr.ip().to_string(), addr.port())
    };
    let mut settings = RedisConnectionInfo::default();
    if let Some((user, password)) = auth {
        settings = settings.set_username(user).set_password(password);
    }
    let info = target.into_connection_info()?.set_redis_settings(settings);
    let client = if c.is_tls() {
        redis::Client::build_with_tls(info, certs(c))?
    } else {
        redis::Client::open(info)?
    };
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_dns_resolver(tower_redis_cluster::connect::PinnedResolver(addr.ip()));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// A connection to `addr` with the cluster's current credentials, verifying the configuration
/// endpoint's name (which every certificate of the cluster covers).
async fn admin_con(c: &LocalCluster, addr: SocketAddr) -> MultiplexedConnection {
    let user = c.user();
    let auth = user.as_ref().map(|(u, p)| (u.as_str(), p.as_str()));
    node_con(c, addr, &c.config_endpoint(), auth)
        .await
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"))
}

/// A redis-crate cluster client configured like an application: the configuration endpoint as
/// seed, the name map as DNS, the CA and the credentials.
fn cluster_client(c: &LocalCluster) -> ClusterClient {
    let mut b = redis::cluster::ClusterClientBuilder::new(vec![c.seed_url()])
        .async_dns_resolver(DnsAdapter(c.name_map()))
        .connection_timeout(Duration::from_secs(1))
        .response_timeout(Duration::from_secs(2));
    if c.is_tls() {
        b = b.certs(certs(c));
    }
    if let Some((user, password)) = c.user() {
        b = b.username(user).password(password);
    }
    b.build().unwrap()
}

async fn write_keys(c: &LocalCluster, n: usize) {
    let mut con = cluster_client(c).get_async_connection().await.unwrap();
    for i in 0..n {
        let () = con.set(format!("key:{i}"), i).await.unwrap();
    }
}

async fn read_keys(c: &LocalCluster, n: usize) {
    let mut con = cluster_client(c).get_async_connection().await.unwrap();
    for i in 0..n {
        let v: Option<usize> = con.get(format!("key:{i}")).await.unwrap();
        assert_eq!(v, Some(i), "key:{i} lost");
    }
}

fn text(v: Value) -> String {
    redis::from_redis_value(v).expect("a textual reply")
}

async fn cluster_nodes(c: &LocalCluster, at: SocketAddr) -> String {
    text(
        c.node_command(at, redis::cmd("CLUSTER").arg("NODES"))
            .await
            .expect("CLUSTER NODES"),
    )
}

fn scalar(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        Value::VerbatimString { text, .. } => text.clone(),
        other => format!("{other:?}"),
    }
}

/// The key/value pairs of a RESP2 flat array or a RESP3 map.
fn pairs(v: &Value) -> Vec<(String, &Value)> {
    match v {
        Value::Array(items) => items
            .chunks(2)
            .filter(|kv| kv.len() == 2)
            .map(|kv| (scalar(&kv[0]), &kv[1]))
            .collect(),
        Value::Map(kv) => kv.iter().map(|(k, v)| (scalar(k), v)).collect(),
        other => panic!("not a map: {other:?}"),
    }
}

/// Every node entry of the node's `CLUSTER SHARDS`, as field → value.
async fn shards_nodes(c: &LocalCluster, at: SocketAddr) -> Vec<HashMap<String, String>> {
    let reply = c
        .node_command(at, redis::cmd("CLUSTER").arg("SHARDS"))
        .await
        .expect("CLUSTER SHARDS");
    let Value::Array(shards) = reply else {
        panic!("CLUSTER SHARDS: {reply:?}");
    };
    let mut out = Vec::new();
    for shard in &shards {
        for (key, value) in pairs(shard) {
            if key != "nodes" {
                continue;
            }
            let Value::Array(nodes) = value else {
                panic!("nodes: {value:?}");
            };
            for node in nodes {
                out.push(
                    pairs(node)
                        .into_iter()
                        .map(|(k, v)| (k, scalar(v)))
                        .collect(),
                );
            }
        }
    }
    out
}

/// Whether a TCP connect to `addr` completes (either way) within `limit`.
async fn connect_answers(addr: SocketAddr, limit: Duration) -> bool {
    tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr))
        .await
        .is_ok()
}

fn nft_table_exists(table: &str) -> bool {
    std::process::Command::new("nft")
        .args(["list", "table", "inet", table])
        .output()
        .unwrap()
        .status
        .success()
}

fn nft_table(table: &str) -> String {
    let out = std::process::Command::new("nft")
        .args(["list", "table", "inet", table])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

fn bus(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip(), addr.port() + 10_000)
}

// ---------------------------------------------------------------------------------------------
// Host names
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_announce_host_names_that_the_name_map_resolves() {
    let mut c = start(
        LocalCluster::builder()
            .shards(2)
            .replicas(1)
            .announce_hostnames(true),
    )
    .await;
    let domain = c.domain().to_owned();
    assert!(
        domain.starts_with("trc-") && domain.ends_with(".test") && domain.len() == 17,
        "{domain}"
    );
    assert_eq!(c.config_endpoint(), format!("clustercfg.{domain}"));
    let names = c.name_map();
    let nodes = c.nodes();
    for n in &nodes {
        let name = n.hostname.clone().expect("a host name");
        let host = match n.addr.ip() {
            std::net::IpAddr::V4(ip) => ip.octets()[3],
            other => panic!("{other}"),
        };
        assert_eq!(name, format!("node-{host}.{domain}"));
        assert_eq!(names.lookup(&name), vec![n.addr], "{name}");
    }

    // What the nodes themselves say: CLUSTER SHARDS names every node by its host name (also as
    // the endpoint clients are sent to), with its IP beside it; CLUSTER NODES appends the name.
    for n in &nodes {
        let seen = shards_nodes(&c, n.addr).await;
        assert_eq!(seen.len(), nodes.len(), "{seen:?}");
        for other in &nodes {
            let entry = seen
                .iter()
                .find(|e| e["id"] == other.id)
                .unwrap_or_else(|| panic!("{} missing from {seen:?}", other.id));
            let name = other.hostname.as_deref().unwrap();
            assert_eq!(entry["hostname"], name, "{entry:?}");
            assert_eq!(entry["endpoint"], name, "{entry:?}");
            assert_eq!(entry["ip"], other.addr.ip().to_string(), "{entry:?}");
            assert_eq!(entry["port"], other.addr.port().to_string(), "{entry:?}");
        }
        let text = cluster_nodes(&c, n.addr).await;
        for other in &nodes {
            let field = format!(
                "{}@{},{}",
                other.addr,
                other.addr.port() + 10_000,
                other.hostname.as_deref().unwrap()
            );
            assert!(text.contains(&field), "{field} not in\n{text}");
        }
    }
    // A client that is sent host names (CLUSTER SLOTS, MOVED) works through the name map.
    let slots = c
        .node_command(nodes[0].addr, redis::cmd("CLUSTER").arg("SLOTS"))
        .await
        .unwrap();
    assert!(
        format!("{slots:?}").contains(&format!(".{domain}")),
        "CLUSTER SLOTS names no host: {slots:?}"
    );
    write_keys(&c, 40).await;
    read_keys(&c, 40).await;

    // A replacement gets a name of its own; the old name leaves the map once the node is gone.
    let old = c.replicas_of(0).remove(0);
    let old_name = old.hostname.clone().unwrap();
    let new = c.replace_node(old.addr).await.unwrap();
    let new_name = new.hostname.clone().expect("the new node has a name");
    assert_ne!(new_name, old_name);
    assert_eq!(names.lookup(&new_name), vec![new.addr]);
    assert!(!names.contains(&old_name), "{old_name} still in the map");
    let text = cluster_nodes(&c, c.master_of(0).addr).await;
    assert!(
        text.contains(&new_name) && !text.contains(&old_name),
        "{text}"
    );

    // A frozen name stays, pointing at the gone node: a stale DNS record.
    let old = c.replicas_of(1).remove(0);
    let old_name = old.hostname.clone().unwrap();
    names.freeze(&old_name, true);
    let new = c.replace_node(old.addr).await.unwrap();
    assert_eq!(names.lookup(&old_name), vec![old.addr]);
    assert_eq!(
        names.lookup(new.hostname.as_deref().unwrap()),
        vec![new.addr]
    );
    read_keys(&c, 40).await;

    // Dropping the cluster removes every name it registered, frozen ones too.
    let registered: Vec<String> = c
        .nodes()
        .iter()
        .filter_map(|n| n.hostname.clone())
        .chain([old_name, c.config_endpoint()])
        .collect();
    drop(c);
    for name in registered {
        assert!(!names.contains(&name), "{name} outlived its cluster");
    }
}

// ---------------------------------------------------------------------------------------------
// Names-only certificates
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_only_certificates_verify_names_not_ips() {
    let c = start(
        LocalCluster::builder()
            .shards(1)
            .replicas(1)
            .tls(true)
            .announce_hostnames(true)
            .tls_names_only(true)
            .user("app", "names-only-secret"),
    )
    .await;
    let auth = Some(("app", "names-only-secret"));
    for n in c.nodes() {
        let ip = n.addr.ip().to_string();
        // Verifying the IP fails: the certificate carries no IP.
        let err = node_con(&c, n.addr, &ip, auth)
            .await
            .err()
            .unwrap_or_else(|| panic!("{} verified as its IP", n.addr));
        eprintln!("[names-only] {} verified as its IP: {err}", n.addr);
        let msg = err.to_string().to_lowercase();
        assert!(
            msg.contains("certificate") || msg.contains("notvalidforname"),
            "not a certificate error: {err}"
        );
        // Verifying a name the wildcard covers works, pinned to the same IP: the endpoint and
        // the node's own name.
        for name in [c.config_endpoint(), n.hostname.clone().unwrap()] {
            let mut con = node_con(&c, n.addr, &name, auth)
                .await
                .unwrap_or_else(|e| panic!("{} as {name}: {e}", n.addr));
            let who: String = redis::cmd("ACL")
                .arg("WHOAMI")
                .query_async(&mut con)
                .await
                .unwrap();
            assert_eq!(who, "app");
        }
        // A name outside the domain is refused.
        assert!(node_con(&c, n.addr, "clustercfg.other.test", auth)
            .await
            .is_err());
    }
    // The bus and replication do not check names: the replica is in sync over TLS.
    let replica = c.replicas_of(0).remove(0);
    let repl = text(
        c.node_command(replica.addr, redis::cmd("INFO").arg("replication"))
            .await
            .unwrap(),
    );
    assert!(repl.contains("master_link_status:up"), "{repl}");
    // Node URLs name hosts, which only the name map resolves.
    for url in c.node_urls() {
        assert!(
            url.starts_with("rediss://app:names-only-secret@node-")
                && url.contains(&format!(".{}:", c.domain())),
            "{url}"
        );
    }
    write_keys(&c, 20).await;
    read_keys(&c, 20).await;
}

#[tokio::test]
async fn names_only_needs_tls() {
    let e = LocalCluster::builder()
        .tls_names_only(true)
        .start()
        .await
        .unwrap_err();
    assert!(matches!(e, HarnessError::Invalid(_)), "{e:?}");
    assert!(e.to_string().contains("needs tls(true)"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Blackholed dead nodes
// ---------------------------------------------------------------------------------------------

/// A connection that answers PING now.
async fn pinging_stream(addr: SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    s.write_all(b"PING\r\n").await.unwrap();
    let mut buf = [0u8; 7];
    tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"+PONG\r\n");
    s
}

/// The connection is silent: a PING gets neither an answer nor an EOF nor a reset within
/// `limit`.
async fn assert_silent(mut s: tokio::net::TcpStream, limit: Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"PING\r\n").await.unwrap();
    let mut buf = [0u8; 16];
    match tokio::time::timeout(limit, s.read(&mut buf)).await {
        Err(_) => {}
        Ok(r) => panic!("the dead node's connection answered: {r:?} {:?}", &buf),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_nodes_vanish_and_come_back_when_restarted() {
    // Three shards: an automatic failover needs a majority of the masters alive to vote.
    let mut c = start(
        LocalCluster::builder()
            .shards(3)
            .replicas(1)
            .blackhole_dead_nodes(true),
    )
    .await;
    let table = c.blackhole_table().expect("a table").to_owned();
    assert_eq!(
        table,
        {
            let std::net::IpAddr::V4(ip) = c.master_of(0).addr.ip() else {
                unreachable!()
            };
            let o = ip.octets();
            format!("trc_{}_{}_{}", std::process::id(), o[1], o[2])
        },
        "named after the process and the subnet"
    );
    // Every rule is limited to the cluster's subnet.
    let listing = nft_table(&table);
    let std::net::IpAddr::V4(ip) = c.master_of(0).addr.ip() else {
        unreachable!()
    };
    let subnet = format!("127.{}.{}.0/24", ip.octets()[1], ip.octets()[2]);
    let rules: Vec<&str> = listing.lines().filter(|l| l.contains("drop")).collect();
    assert_eq!(rules.len(), 2, "{listing}");
    assert!(rules.iter().all(|r| r.contains(&subnet)), "{listing}");

    // A killed replica: connects to it hang instead of being refused, and a connection that
    // was open goes silent (no FIN or reset from the dying process gets out).
    let replica = c.replicas_of(0).remove(0);
    let open = pinging_stream(replica.addr).await;
    c.kill_node(replica.addr).await.unwrap();
    let t = Instant::now();
    assert!(
        !connect_answers(replica.addr, Duration::from_millis(300)).await,
        "a connect to the dead node was answered"
    );
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert!(!connect_answers(bus(replica.addr), Duration::from_millis(300)).await);
    assert_silent(open, Duration::from_millis(300)).await;
    // The other nodes are untouched.
    for n in c.nodes() {
        drop(pinging_stream(n.addr).await);
    }

    // Started again at the same address: reachable.
    c.restart_node(replica.addr).await.unwrap();
    drop(pinging_stream(replica.addr).await);
    assert!(connect_answers(bus(replica.addr), Duration::from_secs(1)).await);

    // A killed master vanishes too, and its replicas still take over (the nodes time it out).
    let master = c.master_of(0);
    let t = Instant::now();
    let new_master = c.kill_master(0).await.unwrap();
    eprintln!(
        "[timing] kill_master with a blackholed master: {:?}",
        t.elapsed()
    );
    assert_ne!(new_master.addr, master.addr);
    assert!(!connect_answers(master.addr, Duration::from_millis(300)).await);

    // The whole cluster vanishes and comes back.
    c.stop_all().await.unwrap();
    let addrs: Vec<SocketAddr> = c.stopped_nodes().iter().map(|n| n.addr).collect();
    assert_eq!(addrs.len(), 5);
    for &a in &addrs {
        assert!(!connect_answers(a, Duration::from_millis(300)).await, "{a}");
    }
    c.start_all().await.unwrap();
    for &a in &addrs {
        drop(pinging_stream(a).await);
    }

    // Dropping the cluster deletes its table.
    assert!(nft_table_exists(&table));
    drop(c);
    assert!(!nft_table_exists(&table), "{table} outlived its cluster");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_table_goes_when_a_test_panics() {
    let c = start(
        LocalCluster::builder()
            .shards(1)
            .replicas(0)
            .blackhole_dead_nodes(true),
    )
    .await;
    let table = c.blackhole_table().unwrap().to_owned();
    assert!(nft_table_exists(&table));
    let task = tokio::spawn(async move {
        let _owned = c;
        panic!("test failure while owning the cluster");
    });
    assert!(task.await.unwrap_err().is_panic());
    assert!(!nft_table_exists(&table));
}

#[tokio::test]
async fn a_missing_nft_says_how_to_install_it() {
    init_tracing();
    let err = LocalCluster::builder()
        .shards(1)
        .replicas(0)
        .blackhole_dead_nodes(true)
        .nft_path("/nonexistent/nft")
        .start()
        .await
        .unwrap_err();
    match &err {
        HarnessError::NftNotFound { tried } => assert_eq!(tried, Path::new("/nonexistent/nft")),
        other => panic!("expected NftNotFound, got {other:?}"),
    }
    let msg = err.to_string();
    for needle in [
        "apt-get install -y nftables",
        "TRC_NFT",
        "root",
        "CAP_NET_ADMIN",
    ] {
        assert!(msg.contains(needle), "{needle:?} missing from: {msg}");
    }
    // `managed()` needs it just as much.
    let err = LocalCluster::builder()
        .shards(1)
        .replicas(0)
        .managed()
        .nft_path("/nonexistent/nft")
        .start()
        .await
        .unwrap_err();
    assert!(matches!(err, HarnessError::NftNotFound { .. }), "{err:?}");
}

#[tokio::test]
async fn nft_without_privileges_is_a_clear_error() {
    init_tracing();
    // The real nft, without CAP_NET_ADMIN (dropped from the bounding set before it runs, so not
    // even root has it): what a non-root CI job gets.
    let dir = tempfile::tempdir().unwrap();
    let wrapper = dir.path().join("nft");
    let nft = ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("nft is installed");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nexec setpriv --bounding-set -net_admin {nft} \"$@\"\n"),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let err = LocalCluster::builder()
        .shards(1)
        .replicas(0)
        .blackhole_dead_nodes(true)
        .nft_path(&wrapper)
        .start()
        .await
        .unwrap_err();
    assert!(matches!(err, HarnessError::NftFailed { .. }), "{err:?}");
    let msg = err.to_string();
    for needle in ["Operation not permitted", "root", "CAP_NET_ADMIN"] {
        assert!(msg.contains(needle), "{needle:?} missing from: {msg}");
    }
}

/// `TRC_NFT` is read too; in a child process, since changing this process's environment would
/// race the other tests.
#[test]
fn a_missing_nft_via_env_var() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "env_child_missing_nft",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(tower_redis_cluster::harness::NFT_ENV, "/nonexistent/nft")
        .env("TRC_HARNESS_ENV_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("1 passed"), "child ran no test:\n{stdout}");
}

#[tokio::test]
#[ignore = "run by a_missing_nft_via_env_var in a child process with TRC_NFT set"]
async fn env_child_missing_nft() {
    if std::env::var_os("TRC_HARNESS_ENV_CHILD").is_none() {
        eprintln!("only meaningful when started by a_missing_nft_via_env_var");
        return;
    }
    let err = LocalCluster::builder()
        .blackhole_dead_nodes(true)
        .start()
        .await
        .unwrap_err();
    match &err {
        HarnessError::NftNotFound { tried } => assert_eq!(tried, Path::new("/nonexistent/nft")),
        other => panic!("expected NftNotFound, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The managed profile
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_profile_serves_a_client_from_its_builder() {
    let c = start(LocalCluster::builder().shards(2).replicas(1).managed()).await;
    assert!(c.is_tls());
    assert!(c.blackhole_table().is_some());
    let (user, password) = c.user().expect("an ACL user");
    assert_eq!(user, "app");
    assert_eq!(password.len(), 32, "{password}");
    assert!(c.nodes().iter().all(|n| n.hostname.is_some()));

    // The crate's client, from the harness's builder alone.
    let client = c.client_builder().build().await.unwrap();
    client
        .wait_connected(Duration::from_secs(10))
        .await
        .unwrap();
    for i in 0..20 {
        let mut set = redis::cmd("SET");
        set.arg(format!("k{i}")).arg(i);
        let _: () = client.query(&set).await.unwrap();
    }
    let mut get = redis::cmd("GET");
    get.arg("k7");
    let v: Option<i64> = client.query(&get).await.unwrap();
    assert_eq!(v, Some(7));
    // And a redis-crate cluster client configured the same way.
    read_keys_k(&c, 20).await;
}

async fn read_keys_k(c: &LocalCluster, n: i64) {
    let mut con = cluster_client(c).get_async_connection().await.unwrap();
    for i in 0..n {
        let v: Option<i64> = con.get(format!("k{i}")).await.unwrap();
        assert_eq!(v, Some(i));
    }
}

/// The node entries of every running node's CLUSTER SHARDS that carry `name`.
async fn entries_named(c: &LocalCluster, name: &str) -> Vec<HashMap<String, String>> {
    let mut out = Vec::new();
    for n in c.nodes() {
        out.extend(
            shards_nodes(c, n.addr)
                .await
                .into_iter()
                .filter(|e| e["hostname"] == name),
        );
    }
    out
}

async fn assert_known_everywhere_at(c: &LocalCluster, node: &NodeInfo) {
    let name = node.hostname.as_deref().unwrap();
    for n in c.nodes() {
        let text = cluster_nodes(c, n.addr).await;
        let line = text
            .lines()
            .find(|l| l.starts_with(&node.id))
            .unwrap_or_else(|| panic!("{} does not know {}:\n{text}", n.addr, node.id));
        let field = format!("{}@{},{name}", node.addr, node.addr.port() + 10_000);
        assert!(line.contains(&field), "{} sees {line}", n.addr);
    }
    let entries = entries_named(c, name).await;
    assert_eq!(
        entries.len(),
        c.nodes().len(),
        "one entry per view: {entries:?}"
    );
    for e in &entries {
        assert_eq!(e["id"], node.id);
        assert_eq!(e["ip"], node.addr.ip().to_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacement_keeping_the_name_is_a_new_node_at_a_new_ip() {
    let mut c = start(LocalCluster::builder().shards(2).replicas(1).managed()).await;
    write_keys(&c, 50).await;
    let names = c.name_map();

    // A master: failed over first, then replaced.
    let old = c.master_of(0);
    let name = old.hostname.clone().unwrap();
    let t = Instant::now();
    let new = c.replace_node_keeping_name(old.addr).await.unwrap();
    eprintln!(
        "[timing] replace_node_keeping_name (master): {:?}",
        t.elapsed()
    );
    assert_eq!(new.hostname.as_deref(), Some(name.as_str()));
    assert_ne!(new.addr.ip(), old.addr.ip());
    assert_ne!(new.id, old.id);
    assert_eq!(new.role, Role::Replica);
    assert_eq!(new.shard, 0);
    assert_eq!(names.lookup(&name), vec![new.addr]);
    let endpoint = names.lookup(&c.config_endpoint());
    assert!(endpoint.contains(&new.addr) && !endpoint.contains(&old.addr));
    // The nodes: the old id is gone, the name belongs to the new node at its IP.
    for n in c.nodes() {
        let text = cluster_nodes(&c, n.addr).await;
        assert!(
            !text.contains(&old.id),
            "{} still knows the old node",
            n.addr
        );
        assert!(!text.contains(&format!("{} ", old.addr)), "{text}");
    }
    assert_known_everywhere_at(&c, &new).await;
    // The old address is gone like a dead host.
    assert!(!connect_answers(old.addr, Duration::from_millis(300)).await);
    read_keys(&c, 50).await;

    // A replica: replaced directly.
    let old = c.replicas_of(1).remove(0);
    let name = old.hostname.clone().unwrap();
    let new = c.replace_node_keeping_name(old.addr).await.unwrap();
    assert_eq!(new.hostname.as_deref(), Some(name.as_str()));
    assert_ne!(new.id, old.id);
    assert_known_everywhere_at(&c, &new).await;
    assert_eq!(names.lookup(&name), vec![new.addr]);
    read_keys(&c, 50).await;
    c.wait_settled(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_node_is_the_same_node_at_a_new_ip() {
    let mut c = start(LocalCluster::builder().shards(2).replicas(1).managed()).await;
    write_keys(&c, 50).await;
    let names = c.name_map();
    let endpoint = c.config_endpoint();

    // A master: failed over first, then moved.
    let old = c.master_of(1);
    let name = old.hostname.clone().unwrap();
    let t = Instant::now();
    let moved = c.move_node(old.addr).await.unwrap();
    eprintln!("[timing] move_node (master): {:?}", t.elapsed());
    assert_eq!(moved.id, old.id, "the same node");
    assert_eq!(moved.hostname.as_deref(), Some(name.as_str()));
    assert_ne!(moved.addr.ip(), old.addr.ip());
    assert_eq!(moved.addr.port(), old.addr.port());
    assert_eq!(moved.role, Role::Replica);
    assert_eq!(moved.shard, 1);
    assert_eq!(names.lookup(&name), vec![moved.addr]);
    let seeds = names.lookup(&endpoint);
    assert!(
        seeds.contains(&moved.addr) && !seeds.contains(&old.addr),
        "{seeds:?}"
    );
    // Every node knows it under its id at the new IP, and nobody at the old one.
    assert_known_everywhere_at(&c, &moved).await;
    for n in c.nodes() {
        let text = cluster_nodes(&c, n.addr).await;
        assert!(!text.contains(&format!("{} ", old.addr)), "{text}");
        assert!(!text.contains(&format!("{}@", old.addr)), "{text}");
    }
    // It replicates from the new master, in sync, and the node says it is where it is.
    let repl = text(
        c.node_command(moved.addr, redis::cmd("INFO").arg("replication"))
            .await
            .unwrap(),
    );
    assert!(repl.contains("master_link_status:up"), "{repl}");
    assert!(
        repl.contains(&format!("master_host:{}", c.master_of(1).addr.ip())),
        "{repl}"
    );
    assert!(!connect_answers(old.addr, Duration::from_millis(300)).await);
    read_keys(&c, 50).await;

    // A replica moves without a failover, and can move again. With its name frozen (a stale
    // DNS record), the name keeps pointing at the old IP while the nodes know the new one.
    let old = moved;
    names.freeze(&name, true);
    let moved = c.move_node(old.addr).await.unwrap();
    assert_eq!(moved.id, old.id);
    assert_eq!(moved.role, Role::Replica);
    assert_ne!(moved.addr, old.addr);
    assert_known_everywhere_at(&c, &moved).await;
    assert_eq!(names.lookup(&name), vec![old.addr], "a frozen name moved");
    names.freeze(&name, false);
    read_keys(&c, 50).await;

    // A node that was down long enough for the others to flag it `fail` moves too: the flag is
    // cleared once it is back, at its new address.
    let old = c.replicas_of(0).remove(0);
    c.kill_node(old.addr).await.unwrap();
    let started = Instant::now();
    let observer = c.master_of(0).addr;
    loop {
        let text = cluster_nodes(&c, observer).await;
        let line = text
            .lines()
            .find(|l| l.starts_with(&old.id))
            .unwrap()
            .to_owned();
        if line
            .split_whitespace()
            .nth(2)
            .unwrap()
            .split(',')
            .any(|f| f == "fail")
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never flagged: {line}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "[timing] killed replica flagged fail after {:?}",
        started.elapsed()
    );
    let t = Instant::now();
    let moved = c.move_node(old.addr).await.unwrap();
    eprintln!("[timing] move_node (failed replica): {:?}", t.elapsed());
    assert_eq!(moved.id, old.id);
    assert_known_everywhere_at(&c, &moved).await;
    for n in c.nodes() {
        let text = cluster_nodes(&c, n.addr).await;
        let line = text.lines().find(|l| l.starts_with(&old.id)).unwrap();
        assert!(!line.contains("fail"), "{} still flags it: {line}", n.addr);
    }
    read_keys(&c, 50).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_without_replica_is_neither_moved_nor_replaced_under_its_name() {
    let mut c = start(
        LocalCluster::builder()
            .shards(1)
            .replicas(0)
            .announce_hostnames(true),
    )
    .await;
    let master = c.master_of(0);
    for e in [
        c.replace_node_keeping_name(master.addr).await.unwrap_err(),
        c.move_node(master.addr).await.unwrap_err(),
    ] {
        assert!(matches!(e, HarnessError::Invalid(_)), "{e:?}");
        // It says why, and what to do instead.
        assert!(e.to_string().contains("Add a replica first"), "{e}");
    }
    // Nothing happened to it.
    assert_eq!(c.master_of(0), master);
    c.wait_settled(Duration::from_secs(5)).await.unwrap();

    // Keeping a name needs names.
    let mut plain = start(LocalCluster::builder().shards(1).replicas(1)).await;
    let replica = plain.replicas_of(0).remove(0);
    let e = plain
        .replace_node_keeping_name(replica.addr)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("announce_hostnames"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Password rotation
// ---------------------------------------------------------------------------------------------

/// A key whose slot belongs to `shard` (slots are split evenly, in order).
async fn key_of_shard(c: &LocalCluster, shard: usize) -> String {
    let n = c.shards() as i64;
    for i in 0.. {
        let key = format!("probe:{i}");
        let slot: i64 = redis::from_redis_value(
            c.node_command(
                c.master_of(0).addr,
                redis::cmd("CLUSTER").arg("KEYSLOT").arg(&key),
            )
            .await
            .unwrap(),
        )
        .unwrap();
        // Shard `s` of `n` owns the slots below `(s + 1) * 16384 / n`, from the previous bound.
        if (0..n).find(|&s| slot < (s + 1) * 16_384 / n) == Some(shard as i64) {
            return key;
        }
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_rotation_applies_to_every_node_and_keeps_replication_up() {
    let mut c = start(LocalCluster::builder().shards(2).replicas(1).managed()).await;
    write_keys(&c, 30).await;
    let (user, old) = c.user().unwrap();
    let endpoint = c.config_endpoint();
    // A connection made before the rotation.
    let master = c.master_of(0);
    let mut before = node_con(&c, master.addr, &endpoint, Some((&user, &old)))
        .await
        .unwrap();

    let new = "rotated-s3cret";
    let t = Instant::now();
    c.set_user_password(new).await.unwrap();
    eprintln!("[timing] set_user_password: {:?}", t.elapsed());
    assert_eq!(c.user(), Some((user.clone(), new.to_owned())));

    for n in c.nodes() {
        let err = node_con(&c, n.addr, &endpoint, Some((&user, &old)))
            .await
            .err()
            .unwrap_or_else(|| panic!("{}: the old password still works", n.addr));
        assert!(
            err.to_string().contains("WRONGPASS")
                || err.kind() == redis::ErrorKind::AuthenticationFailed,
            "{}: {err}",
            n.addr
        );
        let mut con = node_con(&c, n.addr, &endpoint, Some((&user, new)))
            .await
            .unwrap_or_else(|e| panic!("{}: the new password fails: {e}", n.addr));
        let masterauth: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("masterauth")
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(masterauth, vec!["masterauth".to_owned(), new.to_owned()]);
    }
    // Redis keeps authenticated connections.
    let pong: String = redis::cmd("PING").query_async(&mut before).await.unwrap();
    assert_eq!(pong, "PONG");

    // Forcing re-authentication: every connection of the user goes, replication links
    // included, and replicas reconnect with the new masterauth.
    for n in c.nodes() {
        c.node_command(
            n.addr,
            redis::cmd("CLIENT").arg("KILL").arg("USER").arg(&user),
        )
        .await
        .unwrap();
    }
    assert!(redis::cmd("PING")
        .query_async::<String>(&mut before)
        .await
        .is_err());
    c.wait_settled(Duration::from_secs(10)).await.unwrap();
    for r in c.replicas() {
        let repl = text(
            c.node_command(r.addr, redis::cmd("INFO").arg("replication"))
                .await
                .unwrap(),
        );
        assert!(repl.contains("master_link_status:up"), "{repl}");
    }
    // Writes after the rotation reach the replicas: WAIT counts the acknowledging replicas.
    for shard in 0..c.shards() {
        let master = c.master_of(shard);
        let mut con = admin_con(&c, master.addr).await;
        let key = key_of_shard(&c, shard).await;
        let () = con.set(&key, "after-rotation").await.unwrap();
        let acked: i64 = redis::cmd("WAIT")
            .arg(1)
            .arg(2000)
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(acked, 1, "shard {shard}: the replica did not acknowledge");
    }
    read_keys(&c, 30).await;
    // The harness's own view follows: node URLs carry the new password.
    assert!(c.node_urls().iter().all(|u| u.contains(new)));
    // A node started after the rotation gets the new password from its config.
    let r = c.replicas_of(1).remove(0);
    c.restart_node(r.addr).await.unwrap();
    drop(
        node_con(&c, r.addr, &endpoint, Some((&user, new)))
            .await
            .unwrap(),
    );
}
