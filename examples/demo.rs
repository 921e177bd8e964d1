//! The failure from redis-py #2472, live: a one-shard cluster (master + replica) behind a
//! configuration-endpoint name fails over twice, each time the dead master is replaced by a
//! node at a NEW IP — after which no IP seen at start-up exists. Eight tasks keep writing and
//! reading through `Rebuild(RedisService)`; a status line per second shows what they see.
//!
//! ```sh
//! cargo run --example demo --features test-util
//! ```

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use tower::{Service, ServiceExt};
use tower_redis_cluster::{
    harness::LocalCluster,
    rebuild::{Rebuild, RebuildConfig},
    ClusterConnector, Seeds,
};

#[derive(Default)]
struct Stats {
    ok: AtomicU64,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    /// Milliseconds since start of the last successful call.
    last_ok_ms: AtomicU64,
    /// Longest time without any successful call, since last reset.
    max_gap_ms: AtomicU64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!(
        "starting a local Redis Cluster: 1 shard = master + replica, each on its own loopback IP"
    );
    let mut cluster = LocalCluster::builder()
        .shards(1)
        .replicas(1)
        .start()
        .await?;
    let start_ips: Vec<IpAddr> = cluster.addrs().iter().map(|a| a.ip()).collect();
    println!(
        "configuration endpoint {} → {:?}",
        cluster.seed(),
        cluster.name_map().lookup(&cluster.config_endpoint())
    );

    let connector =
        ClusterConnector::new(Seeds::parse([cluster.seed()])?).resolver(cluster.name_map());
    let service = Rebuild::new(connector, RebuildConfig::default());
    let handle = service.handle();
    handle
        .wait_for_generation(1, Duration::from_secs(10))
        .await?;

    let t0 = Instant::now();
    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for task in 0..8 {
        let (mut service, stats, stop) = (service.clone(), stats.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let key = format!("demo:{task}:{}", i % 100);
                let mut cmd = redis::cmd(if i.is_multiple_of(2) { "GET" } else { "SET" });
                cmd.arg(&key);
                if !i.is_multiple_of(2) {
                    cmd.arg(i);
                }
                let result = match ServiceExt::<redis::Cmd>::ready(&mut service).await {
                    Ok(s) => s.call(cmd).await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(_) => {
                        stats.ok.fetch_add(1, Ordering::Relaxed);
                        let now = t0.elapsed().as_millis() as u64;
                        let previous = stats.last_ok_ms.fetch_max(now, Ordering::Relaxed);
                        stats
                            .max_gap_ms
                            .fetch_max(now.saturating_sub(previous), Ordering::Relaxed);
                    }
                    Err(e) => {
                        *stats
                            .errors
                            .lock()
                            .unwrap()
                            .entry(e.kind().as_str())
                            .or_default() += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }));
    }

    // One status line per second.
    let reporter = {
        let (stats, stop, handle) = (stats.clone(), stop.clone(), handle.clone());
        let names = cluster.name_map();
        let endpoint = cluster.config_endpoint();
        tokio::spawn(async move {
            let mut last = 0;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let ok = stats.ok.load(Ordering::Relaxed);
                println!(
                    "  t={:>4.1}s  {:>6} ops/s  errors {:?}  client generation {}  name → {:?}",
                    t0.elapsed().as_secs_f64(),
                    ok - last,
                    stats.errors.lock().unwrap(),
                    handle.generation(),
                    names.lookup(&endpoint)
                );
                last = ok;
            }
        })
    };

    let mut recoveries = Vec::new();
    for round in 1..=2 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let master = cluster.master_of(0);
        println!("failover {round}: master {} crashes", master.addr);
        stats.max_gap_ms.store(0, Ordering::Relaxed);
        cluster.kill_node(master.addr).await?;
        // A one-shard cluster has no other master to vote, so the promotion is forced, as a
        // managed service's control plane does.
        let replica = cluster.replicas_of(0)[0].clone();
        let mut takeover = redis::cmd("CLUSTER");
        takeover.arg("FAILOVER").arg("TAKEOVER");
        cluster.node_command(replica.addr, &takeover).await?;
        let new = cluster.replace_node(master.addr).await?;
        println!(
            "failover {round}: {} promoted, replacement replica joined at NEW IP {}",
            replica.addr, new.addr
        );
        // Recovered = a success after the cluster is whole again; the outage callers saw is the
        // longest stretch without any success since the crash.
        let healthy_ms = t0.elapsed().as_millis() as u64;
        let deadline = Instant::now() + Duration::from_secs(30);
        while stats.last_ok_ms.load(Ordering::Relaxed) <= healthy_ms && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let recovered = stats.last_ok_ms.load(Ordering::Relaxed) > healthy_ms;
        let gap = stats.max_gap_ms.load(Ordering::Relaxed);
        recoveries.push((round, recovered.then_some(gap)));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await?;
    }
    reporter.await?;

    let now_ips: Vec<IpAddr> = cluster.addrs().iter().map(|a| a.ip()).collect();
    let survivors: Vec<_> = start_ips.iter().filter(|ip| now_ips.contains(ip)).collect();
    println!();
    println!("summary");
    println!("  start-up IPs {start_ips:?}, now {now_ips:?}, still present: {survivors:?}");
    println!(
        "  operations ok {}, errors {:?}",
        stats.ok.load(Ordering::Relaxed),
        stats.errors.lock().unwrap()
    );
    println!(
        "  client generations: {} (each rebuild from the seed name is one)",
        handle.generation()
    );
    let mut all_recovered = true;
    for (round, recovery) in &recoveries {
        match recovery {
            Some(ms) => println!(
                "  failover {round}: recovered; longest stretch without a successful call: {ms} ms"
            ),
            None => {
                all_recovered = false;
                println!("  failover {round}: NOT recovered within 30 s")
            }
        }
    }
    if !all_recovered {
        std::process::exit(1);
    }
    Ok(())
}
