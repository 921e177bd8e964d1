//! Errors seen through a master crash: `Client` with `ReadPolicy::PrimaryThenReplica` against
//! the redis crate's own `ClusterConnection` with `read_from_replicas`, in the same run, on
//! one real local cluster (feature `test-util`).
//!
//! One shard (master + replica, `cluster-allow-reads-when-down yes`, so a replica may serve
//! at all while its master is down). Each contender runs 4 readers (a GET every 2 ms, 1 s per
//! read) and 1 writer (a SET every 10 ms, 4 s per write). The master crashes and stays down
//! 1.5 s, its replica is promoted (`CLUSTER FAILOVER TAKEOVER`) and the dead node replaced at a
//! new IP; then both run 2 s more. `REPLICA_RUNS` (3) rounds in a row on the same cluster:
//! from the second on, none of the start-up IPs exists.
//!
//! ```text
//! cargo bench --features test-util --bench replica_reads
//! ```

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use redis::{aio::ConnectionLike, cluster_async::ClusterConnection, Cmd};
use tower_redis_cluster::{
    connect::{Connect, ConnectHints},
    harness::LocalCluster,
    read::ReadPolicy,
    Client, ClusterConnector, Seeds,
};

/// One contender's way to send a command within a bound.
#[derive(Clone)]
enum Target {
    Ours(Client),
    Redis(ClusterConnection),
}

impl Target {
    async fn send(&mut self, cmd: Cmd, bound: Duration) -> bool {
        match self {
            // The client's own deadline bounds it.
            Target::Ours(client) => client.send(cmd).await.is_ok(),
            Target::Redis(connection) => matches!(
                tokio::time::timeout(bound, connection.req_packed_command(&cmd)).await,
                Ok(Ok(_))
            ),
        }
    }
}

#[derive(Default)]
struct Tally {
    reads_ok: AtomicU64,
    read_errors: AtomicU64,
    writes_ok: AtomicU64,
    write_errors: AtomicU64,
}

/// 4 readers through `readers` and a writer through `writer`, until `stop`.
fn load(
    readers: Target,
    writer: Target,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for reader in 0..4u64 {
        let (mut target, stop, tally) = (readers.clone(), stop.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = reader;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let mut get = redis::cmd("GET");
                get.arg(format!("{{b}}k{}", n % 50));
                if target.send(get, Duration::from_secs(1)).await {
                    tally.reads_ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    tally.read_errors.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    let mut target = writer;
    tasks.push(tokio::spawn(async move {
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let mut set = redis::cmd("SET");
            set.arg(format!("{{b}}w{}", n % 10)).arg(n);
            if target.send(set, Duration::from_secs(4)).await {
                tally.writes_ok.fetch_add(1, Ordering::Relaxed);
            } else {
                tally.write_errors.fetch_add(1, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }));
    tasks
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: usize = std::env::var("REPLICA_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut cluster = LocalCluster::builder()
        .shards(1)
        .replicas(1)
        .config("cluster-allow-reads-when-down", "yes")
        .start()
        .await
        .expect("the cluster starts");
    let ours = cluster
        .client_builder()
        .response_timeout(Duration::from_millis(300))
        .read_policy(ReadPolicy::PrimaryThenReplica)
        .timeout(Duration::from_secs(1))
        .build()
        .await
        .expect("the client builds");
    let writer = cluster
        .client_builder()
        .response_timeout(Duration::from_millis(300))
        .read_policy(ReadPolicy::PrimaryThenReplica)
        .timeout(Duration::from_secs(4))
        .build()
        .await
        .expect("the client builds");
    ours.wait_connected(Duration::from_secs(10)).await.unwrap();
    writer
        .wait_connected(Duration::from_secs(10))
        .await
        .unwrap();
    let redis_connection = ClusterConnector::new(Seeds::parse([cluster.seed()]).unwrap())
        .resolver(cluster.name_map())
        .response_timeout(Duration::from_millis(300))
        .read_from_replicas(true)
        .connect(&ConnectHints::new(1))
        .await
        .expect("the redis cluster connection")
        .into_inner();
    for i in 0..50 {
        let mut set = redis::cmd("SET");
        set.arg(format!("{{b}}k{i}")).arg(i);
        ours.send(set).await.unwrap();
    }

    println!("| run | contender | reads ok | read errors | writes ok | write errors |");
    println!("|---|---|---|---|---|---|");
    for run in 1..=runs {
        // The clients know the replacement before the next crash.
        let topology = ours.topology().unwrap().clone();
        while topology.current().map_or(0, |t| t.nodes().count()) < 2 {
            topology.refresh();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let tallies = [Arc::new(Tally::default()), Arc::new(Tally::default())];
        let mut tasks = load(
            Target::Ours(ours.clone()),
            Target::Ours(writer.clone()),
            stop.clone(),
            tallies[0].clone(),
        );
        tasks.extend(load(
            Target::Redis(redis_connection.clone()),
            Target::Redis(redis_connection.clone()),
            stop.clone(),
            tallies[1].clone(),
        ));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let master = cluster.master_of(0);
        cluster.kill_node(master.addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let replica = cluster.replicas_of(0)[0].clone();
        let mut takeover = redis::cmd("CLUSTER");
        takeover.arg("FAILOVER").arg("TAKEOVER");
        cluster.node_command(replica.addr, &takeover).await.unwrap();
        cluster.replace_node(master.addr).await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        for (name, tally) in [
            ("`Client`, `PrimaryThenReplica`", &tallies[0]),
            (
                "redis `ClusterConnection`, `read_from_replicas`",
                &tallies[1],
            ),
        ] {
            println!(
                "| {run} | {name} | {} | {} | {} | {} |",
                tally.reads_ok.load(Ordering::Relaxed),
                tally.read_errors.load(Ordering::Relaxed),
                tally.writes_ok.load(Ordering::Relaxed),
                tally.write_errors.load(Ordering::Relaxed),
            );
        }
    }
}
