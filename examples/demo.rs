//! The redis-py #2472 failure, live, and survived — in the seed user's world.
//!
//! With no configuration, the demo starts a local Redis Cluster (3 shards × master + replica,
//! every node on its own loopback IP) that looks like a managed one (AWS MemoryDB,
//! ElastiCache): **TLS only, with certificates that name DNS names only** (one wildcard for the
//! cluster's domain, no IP), **nodes announced by host name**, an **ACL user**, and the address
//! of every node that dies or is replaced **blackholed** — packets dropped, so connects hang
//! until their timeout, as to a vanished cloud host. The configuration endpoint's DNS record
//! is then **frozen** at the start-up IPs. While 16 tasks run a mixed workload through
//! `Client`, every node is replaced by a new one at a NEW IP under a new name (masters are
//! failed over first) and one master crashes. At the end no start-up IP or node name exists,
//! the configuration name still points only at dead IPs — the state in which redis-py gave up
//! for good — and the client is still serving.
//!
//! ```sh
//! cargo run --example demo --features test-util,tls
//! ```
//!
//! Blackholing needs nftables and root (`apt-get install -y nftables`); without them the demo
//! says so and runs with dead addresses that refuse connections instead.
//!
//! With `REDIS_CLUSTER_SEEDS=host:port[,host:port]` (and optionally `REDIS_USERNAME`,
//! `REDIS_PASSWORD`, `DEMO_SECONDS`) it runs the same workload against that cluster, without
//! chaos.
//!
//! At the end it writes a timeline — successful and failed calls per 100 ms, the chaos events
//! and the client's rebuilds marked — to `target/demo-timeline.svg` (or `DEMO_PLOT`).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use tower_redis_cluster::{
    harness::{HarnessError, LocalCluster, NodeInfo},
    topology::RefreshConfig,
    Client,
};

#[path = "common/timeline.rs"]
mod timeline;
use timeline::{Counts, Rebuilds, Span, Timeline};

/// A node's announced name without the cluster's domain.
fn short_name(node: &NodeInfo) -> String {
    match &node.hostname {
        Some(name) => name.split('.').next().unwrap_or(name).to_string(),
        None => node.addr.ip().to_string(),
    }
}

/// A node as the cluster announces it, with where it is now.
fn name_of(node: &NodeInfo) -> String {
    match &node.hostname {
        Some(name) => format!("{name} ({})", node.addr.ip()),
        None => node.addr.to_string(),
    }
}

#[derive(Default)]
struct Stats {
    ok: AtomicU64,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    /// Milliseconds since the start of the last successful call.
    last_ok_ms: AtomicU64,
    /// Longest stretch without any successful call since the last reset, in milliseconds.
    max_gap_ms: AtomicU64,
}

impl Stats {
    fn errors(&self) -> BTreeMap<&'static str, u64> {
        self.errors.lock().unwrap().clone()
    }
    fn error_total(&self) -> u64 {
        self.errors().values().sum()
    }
}

struct Workload {
    stats: Arc<Stats>,
    /// Calls per 100 ms, for the timeline.
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    started: Instant,
}

/// 16 tasks: reads, idempotent writes and counters (INCR), each call with the client's deadline.
/// The timeline counts the calls of the first `span`.
fn start_workload(client: &Client, span: Duration) -> Workload {
    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let counts = Arc::new(Counts::new(started, span));
    let tasks = (0..16)
        .map(|task| {
            let (client, stats, stop) = (client.clone(), stats.clone(), stop.clone());
            let counts = counts.clone();
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let key = format!("demo:{task}:{}", i % 100);
                    let mut cmd = match i % 3 {
                        0 => redis::cmd("GET"),
                        1 => redis::cmd("SET"),
                        _ => redis::cmd("INCR"),
                    };
                    if i % 3 == 2 {
                        cmd.arg(format!("demo:counter:{task}"));
                    } else {
                        cmd.arg(&key);
                    }
                    if i % 3 == 1 {
                        cmd.arg(i);
                    }
                    let result = client.send(cmd).await;
                    counts.record_at(Instant::now(), result.is_ok());
                    match result {
                        Ok(_) => {
                            stats.ok.fetch_add(1, Ordering::Relaxed);
                            let now = started.elapsed().as_millis() as u64;
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
            })
        })
        .collect();
    Workload {
        stats,
        counts,
        stop,
        tasks,
        started,
    }
}

impl Workload {
    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// One status line per second: throughput, errors, client generation, masters.
fn start_status_line(client: &Client, workload: &Workload) -> tokio::task::JoinHandle<()> {
    let (client, stats, stop, started) = (
        client.clone(),
        workload.stats.clone(),
        workload.stop.clone(),
        workload.started,
    );
    tokio::spawn(async move {
        let mut last = 0;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let ok = stats.ok.load(Ordering::Relaxed);
            let masters: Vec<String> = client
                .topology()
                .and_then(|t| t.current())
                .map(|s| s.masters().iter().map(|m| m.host().to_string()).collect())
                .unwrap_or_default();
            println!(
                "  t={:>5.1}s {:>7} ops/s  errors {:<28} generation {}  masters {}",
                started.elapsed().as_secs_f64(),
                ok - last,
                format!("{:?}", stats.errors()),
                client.generation(),
                masters.join(" ")
            );
            last = ok;
        }
    })
}

/// The run so far as a timeline: calls per 100 ms, `spans` shaded, the client's rebuilds marked.
fn timeline_of(
    title: String,
    workload: &Workload,
    spans: Vec<Span>,
    rebuilds: &Rebuilds,
) -> Timeline {
    let [ok, errors] = workload.counts.series(
        "successful calls/s",
        "failed calls/s (right axis)",
        Instant::now(),
    );
    Timeline {
        title,
        bucket: timeline::BUCKET,
        series: vec![ok, errors],
        spans,
        marks: rebuilds.marks(workload.started),
    }
}

/// Writes the timeline to `DEMO_PLOT` (default `target/demo-timeline.svg`) and says where.
fn write_plot(timeline: &Timeline) {
    let path = std::env::var_os("DEMO_PLOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/demo-timeline.svg"));
    match timeline::write_svg(&path, timeline) {
        Ok(()) => println!(
            "  timeline (calls per 100 ms, events, rebuilds): {}",
            path.display()
        ),
        Err(e) => eprintln!("cannot write the timeline to {}: {e}", path.display()),
    }
}

struct Event {
    what: String,
    took: Duration,
    longest_gap_ms: u64,
    errors: u64,
    recovered: bool,
}

/// The managed-style cluster; without nftables (or root) its dead addresses refuse instead of
/// swallowing packets, and the demo says so.
async fn start_cluster() -> Result<LocalCluster, Box<dyn std::error::Error>> {
    let builder = LocalCluster::builder().shards(3).replicas(1).managed();
    match builder.clone().start().await {
        Ok(cluster) => {
            println!("  dead nodes' addresses are blackholed (nftables)");
            Ok(cluster)
        }
        Err(e @ (HarnessError::NftNotFound { .. } | HarnessError::NftFailed { .. })) => {
            println!(
                "  cannot blackhole dead addresses ({e}); they will refuse connections instead"
            );
            Ok(builder.blackhole_dead_nodes(false).start().await?)
        }
        Err(e) => Err(e.into()),
    }
}

async fn local_chaos() -> Result<(), Box<dyn std::error::Error>> {
    println!(
        "starting a local Redis Cluster: 3 shards × (master + replica), one loopback IP per node,"
    );
    println!(
        "  TLS only, certificates naming DNS names only, nodes announced by host name, an ACL user"
    );
    let mut cluster = start_cluster().await?;
    let endpoint = cluster.config_endpoint();
    let start_ips: Vec<IpAddr> = cluster.addrs().iter().map(|a| a.ip()).collect();
    let start_names: Vec<String> = cluster
        .nodes()
        .into_iter()
        .filter_map(|n| n.hostname)
        .collect();

    // What an application of that world configures: the configuration endpoint's name, the
    // cluster's CA, the ACL user.
    let client = cluster
        .client_builder()
        .timeout(Duration::from_secs(2))
        // The demo packs a day of node replacements into half a minute; a client in production
        // keeps the default period (30 s) against failovers that take minutes.
        .topology_refresh(RefreshConfig::default().every(Duration::from_secs(1)))
        .build()
        .await?;
    client.wait_connected(Duration::from_secs(10)).await?;
    // From now on DNS answers with the start-up IPs only, however the cluster changes.
    cluster.name_map().freeze(&endpoint, true);
    println!(
        "seed rediss://{} as user {:?} (DNS frozen at {start_ips:?})",
        cluster.seed(),
        cluster.user().map(|(u, _)| u).unwrap_or_default()
    );
    println!("  nodes {}", start_names.join(" "));

    // Ten minutes of timeline: far more than the chaos takes.
    let workload = start_workload(&client, Duration::from_secs(600));
    let rebuilds = Rebuilds::watch(&client);
    let status = start_status_line(&client, &workload);
    let mut events = Vec::new();
    let mut spans = Vec::new();

    // Every start-up node is replaced, in start-up order, then a master crashes.
    let mut plan: Vec<Option<SocketAddr>> = cluster.addrs().into_iter().map(Some).collect();
    plan.push(None);

    for step in plan {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let stats = &workload.stats;
        let errors_before = stats.error_total();
        stats.max_gap_ms.store(0, Ordering::Relaxed);
        let began = Instant::now();
        let (what, label) = match step {
            None => {
                let master = cluster.master_of(0);
                println!(
                    "→ crash the master of shard 0: {} is killed; its replica takes over, a new node joins",
                    name_of(&master)
                );
                cluster.kill_node(master.addr).await?;
                let new = cluster.replace_node(master.addr).await?;
                (
                    format!("crash master of shard 0 (new replica {})", short_name(&new)),
                    "crash master 0".to_string(),
                )
            }
            Some(addr) => {
                // Roles move as nodes are replaced: say what the node is now.
                let old = cluster.node(addr).expect("a live node");
                let role = format!("{:?}", old.role).to_lowercase();
                println!(
                    "→ replace the {role} of shard {}: {} leaves, a node at a new IP joins",
                    old.shard,
                    name_of(&old)
                );
                let new = cluster.replace_node(addr).await?;
                (
                    format!(
                        "replace {role} of shard {} ({} → {})",
                        old.shard,
                        short_name(&old),
                        short_name(&new)
                    ),
                    format!("replace {role} {}", old.shard),
                )
            }
        };
        let took = began.elapsed();
        spans.push(Span {
            from: began - workload.started,
            to: began + took - workload.started,
            label,
        });
        // Recovered: a call succeeded after the event ended.
        let ended_ms = workload.started.elapsed().as_millis() as u64;
        let deadline = Instant::now() + Duration::from_secs(30);
        while stats.last_ok_ms.load(Ordering::Relaxed) <= ended_ms && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        events.push(Event {
            what,
            took,
            longest_gap_ms: stats.max_gap_ms.load(Ordering::Relaxed),
            errors: stats.error_total() - errors_before,
            recovered: stats.last_ok_ms.load(Ordering::Relaxed) > ended_ms,
        });
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let plot = timeline_of(
        "demo: 16 tasks through Client while every node is replaced at a new IP and a master crashes (managed profile, DNS frozen)".to_string(),
        &workload,
        spans,
        &rebuilds,
    );
    let stats = workload.stats.clone();
    workload.stop().await;
    let _ = status.await;

    let now_ips: Vec<IpAddr> = cluster.addrs().iter().map(|a| a.ip()).collect();
    let survivors: Vec<&IpAddr> = start_ips.iter().filter(|ip| now_ips.contains(ip)).collect();
    let now_names: Vec<String> = cluster
        .nodes()
        .into_iter()
        .filter_map(|n| n.hostname)
        .collect();
    let named: Vec<&String> = start_names
        .iter()
        .filter(|n| now_names.contains(n))
        .collect();
    println!();
    println!("summary");
    println!(
        "  start-up node names still in the cluster: {named:?} (now {})",
        now_names.join(" ")
    );
    println!(
        "  start-up IPs still in the cluster: {survivors:?} (the name still answers {:?})",
        cluster
            .name_map()
            .lookup(&endpoint)
            .iter()
            .map(|a| a.ip())
            .collect::<Vec<_>>()
    );
    println!(
        "  operations ok {}, errors {:?}, inner client generations {}",
        stats.ok.load(Ordering::Relaxed),
        stats.errors(),
        client.generation()
    );
    println!(
        "  {:<58} {:>9} {:>16} {:>7} {:>10}",
        "event", "took", "longest no-ok gap", "errors", "recovered"
    );
    let mut all = true;
    for e in &events {
        all &= e.recovered;
        println!(
            "  {:<58} {:>8.1}s {:>14} ms {:>7} {:>10}",
            e.what,
            e.took.as_secs_f64(),
            e.longest_gap_ms,
            e.errors,
            if e.recovered { "yes" } else { "NO" }
        );
    }
    write_plot(&plot);
    if !all {
        eprintln!("a chaos event was not recovered from");
        std::process::exit(1);
    }
    Ok(())
}

async fn remote(seeds: String) -> Result<(), Box<dyn std::error::Error>> {
    let mut builder = Client::builder().seeds(seeds.split(',').map(str::trim));
    if let Ok(password) = std::env::var("REDIS_PASSWORD") {
        builder = match std::env::var("REDIS_USERNAME") {
            Ok(user) => builder.credentials(user, password),
            Err(_) => builder.password(password),
        };
    }
    let client = builder.build().await?;
    client.wait_connected(Duration::from_secs(10)).await?;
    let seconds: u64 = std::env::var("DEMO_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    println!("running the workload against {seeds} for {seconds} s");
    let workload = start_workload(&client, Duration::from_secs(seconds + 10));
    let rebuilds = Rebuilds::watch(&client);
    let status = start_status_line(&client, &workload);
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let plot = timeline_of(
        format!("demo: 16 tasks through Client against {seeds}"),
        &workload,
        Vec::new(),
        &rebuilds,
    );
    let stats = workload.stats.clone();
    workload.stop().await;
    let _ = status.await;
    println!(
        "operations ok {}, errors {:?}",
        stats.ok.load(Ordering::Relaxed),
        stats.errors()
    );
    write_plot(&plot);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    match std::env::var("REDIS_CLUSTER_SEEDS") {
        Ok(seeds) if !seeds.trim().is_empty() => remote(seeds).await,
        _ => local_chaos().await,
    }
}
