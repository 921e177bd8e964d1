//! Tests of the real-cluster harness (`tower_redis_cluster::harness`) against real
//! `redis-server` processes. Every check asks the nodes themselves where it can, not only the
//! harness's own bookkeeping.
//!
//! Run: `cargo test --features test-util --test harness -- --test-threads=2`
//! (`RUST_LOG=tower_redis_cluster=debug` and `--nocapture` show what the harness does).

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use redis::{cluster::ClusterClient, AsyncCommands};
use tower_redis_cluster::harness::{
    HarnessError, LocalCluster, NameMap, NodeInfo, Role, StandaloneServer,
};

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A 3 × 1 cluster (the builder's defaults, spelled out).
async fn cluster() -> LocalCluster {
    init_tracing();
    let t = Instant::now();
    let c = LocalCluster::builder()
        .shards(3)
        .replicas(1)
        .node_timeout(Duration::from_millis(1000))
        .start()
        .await
        .expect("cluster starts");
    eprintln!("[timing] cluster start: {:?}", t.elapsed());
    c
}

/// One line of a node's own `CLUSTER NODES`.
#[derive(Debug)]
struct Line {
    id: String,
    addr: String,
    flags: HashSet<String>,
    master_id: String,
}

fn text(v: redis::Value) -> String {
    redis::from_redis_value(v).expect("a textual reply")
}

/// What the node at `at` says about the cluster.
async fn view(c: &LocalCluster, at: SocketAddr) -> (String, Vec<Line>) {
    let raw = text(
        c.node_command(at, redis::cmd("CLUSTER").arg("NODES"))
            .await
            .expect("CLUSTER NODES"),
    );
    let lines = raw
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Line {
                id: f[0].to_owned(),
                addr: f[1].split('@').next().unwrap().to_owned(),
                flags: f[2].split(',').map(str::to_owned).collect(),
                master_id: f[3].to_owned(),
            }
        })
        .collect();
    (raw, lines)
}

/// The node's `myself` line.
async fn myself(c: &LocalCluster, at: SocketAddr) -> Line {
    view(c, at)
        .await
        .1
        .into_iter()
        .find(|l| l.flags.contains("myself"))
        .expect("a myself line")
}

async fn info_replication(c: &LocalCluster, at: SocketAddr) -> String {
    text(
        c.node_command(at, redis::cmd("INFO").arg("replication"))
            .await
            .expect("INFO replication"),
    )
}

fn sorted(mut v: Vec<SocketAddr>) -> Vec<SocketAddr> {
    v.sort();
    v
}

async fn write_keys(urls: Vec<String>, n: usize) {
    let client = ClusterClient::new(urls).unwrap();
    let mut con = client.get_async_connection().await.unwrap();
    for i in 0..n {
        let () = con.set(format!("key:{i}"), i).await.unwrap();
    }
}

async fn read_keys(urls: Vec<String>, n: usize) {
    let client = ClusterClient::new(urls).unwrap();
    let mut con = client.get_async_connection().await.unwrap();
    for i in 0..n {
        let v: Option<usize> = con.get(format!("key:{i}")).await.unwrap();
        assert_eq!(v, Some(i), "key:{i} lost");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_gives_a_healthy_cluster_with_one_ip_per_node() {
    let c = cluster().await;
    c.wait_healthy(Duration::from_secs(5)).await.unwrap();

    let nodes = c.nodes();
    assert_eq!(nodes.len(), 6, "{c:?}");
    assert_eq!(c.masters().len(), 3);
    assert_eq!(c.replicas().len(), 3);
    let ips: HashSet<IpAddr> = nodes.iter().map(|n| n.addr.ip()).collect();
    assert_eq!(ips.len(), 6, "every node has its own IP: {nodes:?}");
    for n in &nodes {
        assert_eq!(n.addr.port(), c.port(), "one port for all nodes");
        assert!(n.addr.ip().is_loopback());
        assert_ne!(n.addr.ip(), IpAddr::from([127, 0, 0, 1]));
        assert_eq!(n.id.len(), 40);
    }
    assert!((20_000..=39_999).contains(&c.port()));
    for shard in 0..3 {
        assert_eq!(c.master_of(shard).shard, shard);
        assert_eq!(c.replicas_of(shard).len(), 1);
    }

    // The name map is the cluster's DNS: the endpoint resolves to all six nodes.
    let endpoint = c.config_endpoint();
    assert!(endpoint.starts_with("clustercfg.trc-") && endpoint.ends_with(".test"));
    assert_eq!(c.seed(), format!("{endpoint}:{}", c.port()));
    assert_eq!(sorted(c.name_map().lookup(&endpoint)), sorted(c.addrs()));

    // The nodes agree with the harness about who is who.
    for n in &nodes {
        let me = myself(&c, n.addr).await;
        assert_eq!(me.id, n.id);
        assert_eq!(me.addr, n.addr.to_string());
        let expected_flag = match n.role {
            Role::Master => "master",
            Role::Replica => "slave",
        };
        assert!(me.flags.contains(expected_flag), "{n:?}: {me:?}");
        if n.role == Role::Replica {
            assert_eq!(me.master_id, c.master_of(n.shard).id);
        }
    }

    // A real client works, both from the node URLs and from the seed name via the name map.
    write_keys(c.node_urls(), 50).await;
    read_keys(c.node_urls(), 50).await;
    let client = redis::cluster::ClusterClientBuilder::new(vec![format!("redis://{}", c.seed())])
        .async_dns_resolver(tower_redis_cluster::connect::DnsAdapter(c.name_map()))
        .build()
        .unwrap();
    let mut con = client.get_async_connection().await.unwrap();
    let v: Option<usize> = con.get("key:7").await.unwrap();
    assert_eq!(v, Some(7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_promotes_the_replica_and_demotes_the_master() {
    let mut c = cluster().await;
    let old_master = c.master_of(1);
    let old_replica = c.replicas_of(1).remove(0);

    let t = Instant::now();
    let new_master = c.failover(1).await.unwrap();
    eprintln!("[timing] failover: {:?}", t.elapsed());
    assert_eq!(new_master.addr, old_replica.addr);
    assert_eq!(new_master.role, Role::Master);

    // Ask the nodes themselves.
    assert!(myself(&c, old_replica.addr).await.flags.contains("master"));
    let demoted = myself(&c, old_master.addr).await;
    assert!(demoted.flags.contains("slave"), "{demoted:?}");
    assert_eq!(demoted.master_id, old_replica.id);
    let repl = info_replication(&c, old_master.addr).await;
    assert!(
        repl.contains(&format!("master_host:{}", old_replica.addr.ip())),
        "{repl}"
    );
    assert!(repl.contains("master_link_status:up"), "{repl}");
    // Every other node sees the new master as master too.
    for n in c.nodes() {
        let (_, lines) = view(&c, n.addr).await;
        let seen = lines.iter().find(|l| l.id == old_replica.id).unwrap();
        assert!(seen.flags.contains("master"), "{} sees {seen:?}", n.addr);
    }

    c.wait_healthy(Duration::from_secs(5)).await.unwrap();
    assert_eq!(c.master_of(1).addr, old_replica.addr);
    let replicas: Vec<SocketAddr> = c.replicas_of(1).iter().map(|n| n.addr).collect();
    assert_eq!(replicas, vec![old_master.addr]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_master_promotes_the_replica_and_forgets_the_dead_node() {
    let mut c = cluster().await;
    let dead = c.master_of(0);
    let replica = c.replicas_of(0).remove(0);

    let t = Instant::now();
    let new_master = c.kill_master(0).await.unwrap();
    eprintln!(
        "[timing] kill_master (detection + election + forget): {:?}",
        t.elapsed()
    );
    assert_eq!(new_master.addr, replica.addr);
    assert!(myself(&c, replica.addr).await.flags.contains("master"));

    assert_eq!(c.nodes().len(), 5);
    for n in c.nodes() {
        let (raw, _) = view(&c, n.addr).await;
        assert!(
            !raw.contains(&dead.id) && !raw.contains(&dead.addr.to_string()),
            "{} still knows the dead node:\n{raw}",
            n.addr
        );
    }
    let resolved = c.name_map().lookup(&c.config_endpoint());
    assert!(!resolved.contains(&dead.addr));
    assert_eq!(sorted(resolved), sorted(c.addrs()));
    c.wait_healthy(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_every_node_moves_the_cluster_to_new_ips() {
    let mut c = cluster().await;
    // Replicas first, then masters: both paths of replace_node (a master is failed over to
    // its replica first).
    let mut original: Vec<NodeInfo> = c.replicas();
    original.extend(c.masters());
    let original_ips: HashSet<IpAddr> = original.iter().map(|n| n.addr.ip()).collect();
    write_keys(c.node_urls(), 200).await;

    let t = Instant::now();
    for old in &original {
        // Whatever its role is by now (earlier replacements fail masters over).
        let role = c.node(old.addr).unwrap().role;
        let step = Instant::now();
        let new = c.replace_node(old.addr).await.unwrap();
        eprintln!("[timing] replace_node ({role:?}): {:?}", step.elapsed());
        assert!(!original_ips.contains(&new.addr.ip()), "a new IP: {new:?}");
        assert_eq!(new.addr.port(), c.port());
        assert_eq!(new.shard, old.shard);
        assert_eq!(new.role, Role::Replica);
        assert!(c.node(old.addr).is_none());
    }
    eprintln!("[timing] replace all 6 nodes: {:?}", t.elapsed());

    assert_eq!(c.nodes().len(), 6);
    assert_eq!(c.masters().len(), 3);
    let ips: HashSet<IpAddr> = c.addrs().iter().map(SocketAddr::ip).collect();
    assert_eq!(ips.len(), 6);
    assert!(ips.is_disjoint(&original_ips));
    for n in c.nodes() {
        let (raw, _) = view(&c, n.addr).await;
        for ip in &original_ips {
            assert!(
                !raw.contains(&format!("{ip}:")),
                "{} still mentions {ip}:\n{raw}",
                n.addr
            );
        }
    }
    let resolved = c.name_map().lookup(&c.config_endpoint());
    assert_eq!(sorted(resolved), sorted(c.addrs()));
    c.wait_healthy(Duration::from_secs(5)).await.unwrap();

    // Graceful failovers and full syncs kept every key.
    read_keys(c.node_urls(), 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_node_stops_answering_then_answers_again() {
    let c = cluster().await;
    let target = c.replicas()[0].addr;
    let other = c.masters()[0].addr;
    let pause = Duration::from_millis(1000);
    let ping = || {
        let mut cmd = redis::cmd("PING");
        cmd.arg("hi");
        cmd
    };

    let t = Instant::now();
    c.pause_node(target, pause).await.unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(200),
        "pause_node returns at once"
    );

    let r = c
        .node_command_with_timeout(target, &ping(), Duration::from_millis(200))
        .await;
    assert!(
        matches!(
            r,
            Err(HarnessError::Timeout { .. }) | Err(HarnessError::Redis(_))
        ),
        "a paused node must not answer: {r:?}"
    );
    assert!(
        t.elapsed() < pause,
        "the check ran while the node was paused"
    );
    // The rest of the cluster is unaffected.
    c.node_command(other, &ping()).await.unwrap();

    let answered_at = loop {
        if c.node_command_with_timeout(target, &ping(), Duration::from_millis(200))
            .await
            .is_ok()
        {
            break t.elapsed();
        }
        assert!(
            t.elapsed() < pause + Duration::from_secs(3),
            "never resumed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("[timing] paused node answered again after {answered_at:?}");
    assert!(answered_at >= pause, "answered too early: {answered_at:?}");
    c.wait_healthy(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_goes_down_and_comes_back() {
    let mut c = cluster().await;
    let before: Vec<NodeInfo> = c.nodes();

    c.stop_all().await.unwrap();
    assert!(c.nodes().is_empty());
    assert_eq!(c.stopped_nodes().len(), 6);
    assert!(c.pids().is_empty());
    // Down means refused connections, and the name still points at the nodes.
    for n in &before {
        let r = c.node_command(n.addr, &redis::cmd("PING")).await;
        assert!(r.is_err(), "{} still answers", n.addr);
    }
    assert_eq!(c.name_map().lookup(&c.config_endpoint()).len(), 6);
    assert!(c.wait_healthy(Duration::from_millis(300)).await.is_err());

    let t = Instant::now();
    c.start_all().await.unwrap();
    eprintln!("[timing] start_all until healthy: {:?}", t.elapsed());
    let after: Vec<NodeInfo> = c.nodes();
    assert_eq!(after.len(), 6);
    for n in &before {
        let me = myself(&c, n.addr).await;
        assert_eq!(me.id, n.id, "the same node came back at {}", n.addr);
    }
    c.wait_healthy(Duration::from_secs(5)).await.unwrap();
    write_keys(c.node_urls(), 20).await;
    read_keys(c.node_urls(), 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_name_keeps_the_old_addresses_after_a_replacement() {
    let mut c = cluster().await;
    let names: NameMap = c.name_map();
    let endpoint = c.config_endpoint();
    let before = names.lookup(&endpoint);
    assert_eq!(before.len(), 6);

    names.freeze(&endpoint, true);
    assert!(names.is_frozen(&endpoint));
    let old = c.replicas()[0].clone();
    let new = c.replace_node(old.addr).await.unwrap();
    assert_eq!(names.lookup(&endpoint), before, "a frozen name is stale");
    assert!(!names.lookup(&endpoint).contains(&new.addr));
    // The resolver the redis crate uses gives the stale answer too.
    let adapter = tower_redis_cluster::connect::DnsAdapter(names.clone());
    let resolved: Vec<SocketAddr> =
        redis::io::AsyncDNSResolver::resolve(&adapter, &endpoint, c.port())
            .await
            .unwrap()
            .collect();
    assert!(resolved.contains(&old.addr));

    // Unfrozen, the next operation brings the name up to date.
    names.freeze(&endpoint, false);
    let old2 = c.replicas_of(1).remove(0);
    let new2 = c.replace_node(old2.addr).await.unwrap();
    let now = names.lookup(&endpoint);
    assert_eq!(sorted(now.clone()), sorted(c.addrs()));
    assert!(now.contains(&new.addr) && now.contains(&new2.addr));
    assert!(!now.contains(&old.addr) && !now.contains(&old2.addr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_replica_rejoins_as_the_same_node() {
    let mut c = cluster().await;
    let replica = c.replicas_of(2).remove(0);
    let master = c.master_of(2);
    c.kill_node(replica.addr).await.unwrap();
    assert_eq!(c.stopped_nodes(), vec![replica.clone()]);

    // The others notice: flagged failed after the node timeout.
    let t = Instant::now();
    loop {
        let (_, lines) = view(&c, master.addr).await;
        let seen = lines.iter().find(|l| l.id == replica.id).unwrap();
        if seen.flags.contains("fail") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "never flagged: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "[timing] killed replica flagged fail after {:?}",
        t.elapsed()
    );

    // While it is down, another node is replaced: the cluster is healthy without it (a stopped
    // member may be flagged, but serves nothing), and the node forgotten meanwhile must not come
    // back with the restarted one's stale nodes.conf.
    let other = c.replicas_of(0).remove(0);
    let t = Instant::now();
    let new = c.replace_node(other.addr).await.unwrap();
    eprintln!(
        "[timing] replace_node while another node is down: {:?}",
        t.elapsed()
    );
    assert_eq!(c.stopped_nodes(), vec![replica.clone()]);

    let t = Instant::now();
    let back = c.restart_node(replica.addr).await.unwrap();
    eprintln!(
        "[timing] restart_node until healthy and in sync: {:?}",
        t.elapsed()
    );
    assert_eq!(back, replica);
    assert_eq!(myself(&c, replica.addr).await.id, replica.id);
    assert!(info_replication(&c, replica.addr)
        .await
        .contains("master_link_status:up"));
    let (raw, lines) = view(&c, replica.addr).await;
    assert!(
        !raw.contains(&other.id),
        "the forgotten node is back:\n{raw}"
    );
    assert!(lines.iter().any(|l| l.id == new.id));
    c.wait_healthy(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_with_credentials_uses_them_everywhere() {
    init_tracing();
    let c = LocalCluster::builder()
        .shards(1)
        .replicas(1)
        .password("default-pw")
        .user("admin", "s3cr3t!pw")
        .start()
        .await
        .unwrap();
    assert!(c.node_urls()[0].starts_with("redis://admin:s3cr3t%21pw@"));
    // Replication authenticated (masteruser/masterauth), so the replica is in sync.
    let replica = c.replicas()[0].addr;
    assert!(info_replication(&c, replica)
        .await
        .contains("master_link_status:up"));
    // Without credentials the nodes refuse.
    let anon = redis::Client::open(format!("redis://{}", c.masters()[0].addr)).unwrap();
    let mut con = anon.get_multiplexed_async_connection().await.unwrap();
    let r: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut con).await;
    assert!(r.is_err(), "{r:?}");
    write_keys(c.node_urls(), 10).await;
    read_keys(c.node_urls(), 10).await;
}

fn process_gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_kills_every_process_even_when_a_test_panics() {
    let c = cluster().await;
    let pids = c.pids();
    assert_eq!(pids.len(), 6);
    assert!(pids.iter().all(|&p| !process_gone(p)));
    let dir = c.dir().to_path_buf();
    assert!(dir.exists());
    let names = c.name_map();
    let endpoint = c.config_endpoint();
    // A paused (SIGSTOPped) node must die too.
    c.pause_node(c.addrs()[0], Duration::from_secs(60))
        .await
        .unwrap();

    let task = tokio::spawn(async move {
        let _owned = c;
        panic!("test failure while owning the cluster");
    });
    let err = task.await.unwrap_err();
    assert!(err.is_panic());

    for pid in &pids {
        assert!(process_gone(*pid), "redis-server {pid} survived the drop");
    }
    assert!(!dir.exists(), "{} was not removed", dir.display());
    assert!(names.lookup(&endpoint).is_empty());

    // Same with a synchronous panic, unwinding outside any task.
    let s = StandaloneServer::start().await.unwrap();
    let pid = s.pid();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _owned = s;
        panic!("sync panic");
    }));
    assert!(r.is_err());
    assert!(process_gone(pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_server_with_an_acl_user() {
    init_tracing();
    let s = StandaloneServer::builder()
        .config("user", "app on >secret ~* +@all")
        .start()
        .await
        .unwrap();
    assert!(s.addr().ip().is_loopback());
    assert_ne!(s.addr().ip(), IpAddr::from([127, 0, 0, 1]));
    assert_eq!(s.url(), format!("redis://{}", s.addr()));

    let host = s.addr().ip();
    let port = s.addr().port();
    let client = redis::Client::open(format!("redis://app:secret@{host}:{port}")).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let who: String = redis::cmd("ACL")
        .arg("WHOAMI")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(who, "app");
    let () = con.set("k", "v").await.unwrap();
    let v: String = con.get("k").await.unwrap();
    assert_eq!(v, "v");

    let wrong = redis::Client::open(format!("redis://app:wrong@{host}:{port}")).unwrap();
    assert!(wrong.get_multiplexed_async_connection().await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_redis_server_says_how_to_install_it() {
    init_tracing();
    // Errors travel across tasks and into `Box<dyn Error + Send + Sync>`; clusters are shared
    // by tasks of a test.
    fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<HarnessError>();
    send_sync::<LocalCluster>();
    send_sync::<StandaloneServer>();
    send_sync::<NameMap>();

    let err = LocalCluster::builder()
        .redis_server_path("/nonexistent/redis-server")
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(err, HarnessError::RedisServerNotFound { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("apt-get install -y redis-server"), "{msg}");
    assert!(msg.contains("brew install redis") && msg.contains("TRC_REDIS_SERVER"));

    let err = StandaloneServer::builder()
        .redis_server_path("/nonexistent/redis-server")
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(err, HarnessError::RedisServerNotFound { .. }),
        "{err:?}"
    );
}

/// The environment variable is read too. Changing the environment of this process would race
/// the other tests, so the check runs in a child process: this test binary, filtered to
/// `env_child_missing_redis_server`.
#[test]
fn missing_redis_server_via_env_var() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "env_child_missing_redis_server",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            tower_redis_cluster::harness::REDIS_SERVER_ENV,
            "/nonexistent/redis-server",
        )
        .env("TRC_HARNESS_ENV_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("1 passed"), "child ran no test:\n{stdout}");
}

#[tokio::test]
#[ignore = "run by missing_redis_server_via_env_var in a child process with TRC_REDIS_SERVER set"]
async fn env_child_missing_redis_server() {
    if std::env::var_os("TRC_HARNESS_ENV_CHILD").is_none() {
        eprintln!("only meaningful when started by missing_redis_server_via_env_var");
        return;
    }
    let err = LocalCluster::start().await.unwrap_err();
    match &err {
        HarnessError::RedisServerNotFound { tried } => {
            assert_eq!(tried, Path::new("/nonexistent/redis-server"));
        }
        other => panic!("expected RedisServerNotFound, got {other:?}"),
    }
    assert!(err.to_string().contains("apt-get"));
}

// ---------------------------------------------------------------------------------------------
// No orphans: nodes die with the program even when no Drop runs
// ---------------------------------------------------------------------------------------------

/// The environment variable that turns `orphan_child` on and says how the child ends.
const ORPHAN_CHILD_ENV: &str = "TRC_HARNESS_ORPHAN_CHILD";

/// A running child test process and what it printed.
struct OrphanChild {
    child: std::process::Child,
    pids: Vec<u32>,
    /// The child's temp dirs: no destructor removes them when it exits without unwinding.
    dirs: Vec<std::path::PathBuf>,
    /// The nftables table of its cluster, in the `-blackhole` modes.
    table: Option<String>,
}

impl Drop for OrphanChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for dir in &self.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Runs this test binary again, filtered to `orphan_child` in `mode`, and waits (bounded) until
/// it has printed the pids of its redis-servers.
fn start_orphan_child(mode: &str) -> OrphanChild {
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "orphan_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ORPHAN_CHILD_ENV, mode)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // Reads to the end, so the child never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            // libtest may have written `test orphan_child ... ` on the same line.
            if let Some((_, rest)) = line.split_once("TRC_ORPHAN ") {
                let (pids, rest) = rest.split_once(" dirs ").unwrap();
                let (dirs, table) = rest.split_once(" table ").unwrap();
                let pids: Vec<u32> = pids
                    .split_whitespace()
                    .map(|p| p.parse().unwrap())
                    .collect();
                let dirs = dirs.split_whitespace().map(Into::into).collect();
                let table = (table != "-").then(|| table.to_owned());
                let _ = tx.send((pids, dirs, table));
            }
        }
    });
    let (pids, dirs, table) = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(printed) => printed,
        Err(e) => {
            let _ = child.kill();
            let status = child.wait().unwrap();
            panic!("the child printed no pids ({e}); it ended with {status}");
        }
    };
    assert!(pids.len() >= 3, "{pids:?}");
    OrphanChild {
        child,
        pids,
        dirs,
        table,
    }
}

/// Whether the process is gone: no `/proc/<pid>`, or a zombie (dead, waiting to be reaped by
/// whoever adopted it — this machine's init may not reap).
fn dead_or_zombie(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the command name, which is in parentheses and may contain spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| matches!(state, 'Z' | 'X')),
    }
}

/// Waits (at most 10 s) until every pid is gone.
fn assert_all_gone(pids: &[u32], how: &str) {
    let started = Instant::now();
    loop {
        let alive: Vec<u32> = pids
            .iter()
            .copied()
            .filter(|&p| !dead_or_zombie(p))
            .collect();
        if alive.is_empty() {
            eprintln!(
                "[timing] redis-servers gone {:?} after {how}",
                started.elapsed()
            );
            return;
        }
        if started.elapsed() > Duration::from_secs(10) {
            panic!("redis-server processes {alive:?} outlived their test process ({how})");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn nodes_die_with_a_program_that_calls_exit() {
    let mut child = start_orphan_child("exit");
    let status = child.child.wait().unwrap();
    assert!(status.success(), "the child ended with {status}");
    assert_all_gone(&child.pids, "std::process::exit(0)");
}

#[test]
fn nodes_die_with_a_program_that_is_sigkilled() {
    let mut child = start_orphan_child("wait");
    let pids = child.pids.clone();
    assert!(pids.iter().all(|&p| !dead_or_zombie(p)), "{pids:?}");
    child.child.kill().unwrap();
    child.child.wait().unwrap();
    assert_all_gone(&pids, "SIGKILL");
}

fn nft_table_exists(table: &str) -> bool {
    std::process::Command::new("nft")
        .args(["list", "table", "inet", table])
        .output()
        .unwrap()
        .status
        .success()
}

/// A process that dies with a blackholing cluster cannot delete its nftables table; the next
/// process's first blackholing cluster does, and so does an explicit sweep. (No other test of
/// this binary blackholes, so nothing else sweeps meanwhile.)
#[test]
fn nft_tables_of_dead_processes_are_swept() {
    let mut a = start_orphan_child("wait-blackhole");
    let table_a = a.table.clone().expect("the child's table");
    assert!(
        table_a.starts_with(&format!("trc_{}_", a.child.id())),
        "{table_a}"
    );
    assert!(nft_table_exists(&table_a));
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    assert_all_gone(&a.pids, "SIGKILL");
    assert!(
        nft_table_exists(&table_a),
        "no Drop ran, yet {table_a} is gone"
    );

    // Another process starts a blackholing cluster, and exits without dropping it.
    let mut b = start_orphan_child("exit-blackhole");
    let table_b = b.table.clone().expect("the child's table");
    assert!(!nft_table_exists(&table_a), "{table_a} was not swept");
    assert!(b.child.wait().unwrap().success());
    assert_all_gone(&b.pids, "std::process::exit(0)");
    assert!(nft_table_exists(&table_b));

    let removed = tower_redis_cluster::harness::sweep_stale_blackhole_tables().unwrap();
    assert!(removed.contains(&table_b), "{removed:?}");
    assert!(!nft_table_exists(&table_b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by the nodes_die_with_* and nft_tables_* tests in a child process"]
async fn orphan_child() {
    let Ok(mode) = std::env::var(ORPHAN_CHILD_ENV) else {
        eprintln!("only meaningful when started by a nodes_die_with_* test");
        return;
    };
    let (mode, blackhole) = match mode.strip_suffix("-blackhole") {
        Some(mode) => (mode.to_owned(), true),
        None => (mode, false),
    };
    let cluster = LocalCluster::builder()
        .shards(1)
        .replicas(1)
        .blackhole_dead_nodes(blackhole)
        .start()
        .await
        .unwrap();
    let standalone = StandaloneServer::start().await.unwrap();
    let mut pids = cluster.pids();
    pids.push(standalone.pid());
    let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "TRC_ORPHAN {} dirs {} {} table {}",
            pids.join(" "),
            cluster.dir().display(),
            standalone.dir().display(),
            cluster.blackhole_table().unwrap_or("-")
        )
        .unwrap();
        out.flush().unwrap();
    }
    match mode.as_str() {
        // No destructor runs: the cluster and the server are still alive here.
        "exit" => std::process::exit(0),
        "wait" => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            panic!("the parent test did not kill this process within 60 s");
        }
        other => panic!("unknown {ORPHAN_CHILD_ENV} mode {other:?}"),
    }
}
