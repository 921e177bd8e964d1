//! Shared helpers of the real-cluster tests: a load of concurrent workers and a recovery probe.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use redis::{Cmd, Value};
use tower::{Service, ServiceExt};
use tower_redis_cluster::{Error, ErrorKind};

/// Logs through `RUST_LOG` when a test needs debugging.
/// A healthy local cluster of `shards` × (master + `replicas`), stopped when dropped.
pub async fn cluster(shards: usize, replicas: usize) -> tower_redis_cluster::harness::LocalCluster {
    tower_redis_cluster::harness::LocalCluster::builder()
        .shards(shards)
        .replicas(replicas)
        .start()
        .await
        .expect("the local cluster starts")
}

/// Builds the client and waits, at most 10 s, until it is connected.
pub async fn connected(builder: tower_redis_cluster::ClientBuilder) -> tower_redis_cluster::Client {
    let client = builder.build().await.expect("the client builds");
    client
        .wait_connected(Duration::from_secs(10))
        .await
        .expect("the client connects");
    client
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Counters of a running load.
#[derive(Default)]
pub struct LoadStats {
    pub ok: AtomicU64,
    pub errors: Mutex<BTreeMap<&'static str, u64>>,
    /// Slowest call, in microseconds.
    pub slowest_us: AtomicU64,
}

impl LoadStats {
    pub fn errors(&self) -> BTreeMap<&'static str, u64> {
        self.errors.lock().unwrap().clone()
    }
    pub fn error_total(&self) -> u64 {
        self.errors().values().sum()
    }
}

/// `tasks` workers doing SET k v / GET k in a loop through clones of `service` until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    pub stats: Arc<LoadStats>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start<S>(service: S, tasks: usize) -> Load
    where
        S: Service<Cmd, Response = Value, Error = Error> + Clone + Send + 'static,
        S::Future: Send,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(LoadStats::default());
        let tasks = (0..tasks)
            .map(|t| {
                let mut service = service.clone();
                let stop = stop.clone();
                let stats = stats.clone();
                tokio::spawn(async move {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let key = format!("load:{t}:{}", i % 64);
                        let mut cmd = redis::cmd(if i.is_multiple_of(2) { "GET" } else { "SET" });
                        cmd.arg(&key);
                        if !i.is_multiple_of(2) {
                            cmd.arg(i);
                        }
                        let started = Instant::now();
                        let result = match service.ready().await {
                            Ok(s) => s.call(cmd).await,
                            Err(e) => Err(e),
                        };
                        let us = started.elapsed().as_micros() as u64;
                        stats.slowest_us.fetch_max(us, Ordering::Relaxed);
                        match result {
                            Ok(_) => {
                                stats.ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                *stats
                                    .errors
                                    .lock()
                                    .unwrap()
                                    .entry(e.kind().as_str())
                                    .or_default() += 1;
                                // Failing calls can be fast; do not spin on a dead cluster.
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        Load { stop, stats, tasks }
    }

    pub async fn stop(self) -> Arc<LoadStats> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("a load task panicked");
        }
        self.stats
    }
}

/// Calls GET through `service` until one succeeds; returns when it did. Fails after `limit`.
pub async fn first_success<S>(service: &S, limit: Duration) -> Result<Instant, Error>
where
    S: Service<Cmd, Response = Value, Error = Error> + Clone,
{
    let deadline = Instant::now() + limit;
    let mut last = None;
    while Instant::now() < deadline {
        let mut s = service.clone();
        let mut cmd = redis::cmd("GET");
        cmd.arg("probe");
        match s.ready().await {
            Ok(ready) => match ready.call(cmd).await {
                Ok(_) => return Ok(Instant::now()),
                Err(e) => last = Some(e),
            },
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Err(last.unwrap_or_else(|| Error::timeout("no attempt finished")))
}

/// The error kinds a caller of a stack with the retry layer (the `Client`) may see during
/// failovers. Redirects are not among them: the retry layer follows `MOVED` and `ASK`, and
/// one that keeps redirecting ends as `MasterDown`.
pub fn assert_documented_kinds(errors: &BTreeMap<&'static str, u64>) {
    assert_kinds(errors, &[]);
}

/// The same for a stack without the retry layer (rebuild and refresh alone), whose callers
/// also see a redirect the inner client did not follow within its own retries.
pub fn assert_documented_kinds_without_retry(errors: &BTreeMap<&'static str, u64>) {
    assert_kinds(errors, &[ErrorKind::Moved, ErrorKind::Ask]);
}

fn assert_kinds(errors: &BTreeMap<&'static str, u64>, also: &[ErrorKind]) {
    let allowed: Vec<&str> = [
        ErrorKind::TryAgain,
        ErrorKind::ClusterDown,
        ErrorKind::Loading,
        ErrorKind::MasterDown,
        ErrorKind::ReadOnly,
        ErrorKind::Connection,
        ErrorKind::Timeout,
        ErrorKind::Unreachable,
    ]
    .iter()
    .chain(also)
    .map(|k| k.as_str())
    .collect();
    for kind in errors.keys() {
        assert!(
            allowed.contains(kind),
            "unexpected error kind {kind}: {errors:?}"
        );
    }
}

pub fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// `SET key value`.
pub fn set(key: &str, value: &str) -> Cmd {
    let mut c = redis::cmd("SET");
    c.arg(key).arg(value);
    c
}

/// `GET key`.
pub fn get(key: &str) -> Cmd {
    let mut c = redis::cmd("GET");
    c.arg(key);
    c
}

/// A one-shard cluster's master crashes; its replica is promoted — by force, as a managed
/// service's control plane does: one shard has no other master to vote — and the dead node is
/// replaced by a new one at a new IP. Returns the old master and the new node.
pub async fn crash_master_and_replace(
    cluster: &mut tower_redis_cluster::harness::LocalCluster,
) -> (
    tower_redis_cluster::harness::NodeInfo,
    tower_redis_cluster::harness::NodeInfo,
) {
    let master = cluster.master_of(0);
    cluster.kill_node(master.addr).await.unwrap();
    let replica = cluster.replicas_of(0)[0].clone();
    let mut takeover = redis::cmd("CLUSTER");
    takeover.arg("FAILOVER").arg("TAKEOVER");
    cluster.node_command(replica.addr, &takeover).await.unwrap();
    let new = cluster.replace_node(master.addr).await.unwrap();
    (master, new)
}

/// The id of the master serving each slot range, as the cluster says (`CLUSTER SLOTS`).
pub async fn slot_owners(
    cluster: &tower_redis_cluster::harness::LocalCluster,
) -> Vec<(u16, u16, String)> {
    let mut slots = redis::cmd("CLUSTER");
    slots.arg("SLOTS");
    let reply = cluster
        .node_command(cluster.masters()[0].addr, &slots)
        .await
        .unwrap();
    let ranges: Vec<Vec<Value>> = redis::from_redis_value(reply).unwrap();
    ranges
        .into_iter()
        .map(|r| {
            let start: u16 = redis::from_redis_value(r[0].clone()).unwrap();
            let end: u16 = redis::from_redis_value(r[1].clone()).unwrap();
            let master: Vec<Value> = redis::from_redis_value(r[2].clone()).unwrap();
            let id: String = redis::from_redis_value(master[2].clone()).unwrap();
            (start, end, id)
        })
        .collect()
}
