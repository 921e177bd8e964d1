//! A fleet of `Client`s in one process against one cluster (feature `test-util`): what the
//! cluster sees of their refreshes and reconnects, at rest and through a total outage.
//!
//! `FLEET_CLIENTS` (200) clients with the default configuration, on a 3 shards × 1 replica
//! cluster that announces host names, so that every connection a client attempts — its inner
//! client's node connections, its connector's TCP checks, its topology probes — resolves a
//! name first: a counting resolver in front of the harness's name map counts them, by 100 ms
//! window.
//!
//! 1. **Idle**: memory per `Client` (RSS delta / clients), then `FLEET_STEADY_SECS` (40) with
//!    nothing to do: connection attempts per second in total and the largest burst in any
//!    100 ms window (the periodic refresh, 30 s ± 10 %, is what runs).
//! 2. **Outage**: every client calls `GET` every 200 ms; every node stops for
//!    `FLEET_OUTAGE_SECS` (10) and comes back (same IPs, names, node ids): attempts per client
//!    per second during the outage and the largest 100 ms burst, then the time until every
//!    client has served a call again. Target: ≤ 2 attempts per client per second.
//!
//! `FLEET_WINDOWS=1` also prints the idle windows that had attempts and the outage's attempts
//! second by second.
//!
//! ```text
//! cargo bench --features test-util --bench fleet
//! FLEET_CLIENTS=50 FLEET_STEADY_SECS=10 cargo bench --features test-util --bench fleet
//! ```

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use tower_redis_cluster::{
    connect::{Resolve, ResolveFuture},
    harness::{LocalCluster, NameMap},
    redis, Client,
};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The harness's name map, counting every lookup: one per connection attempt to a node.
struct Counting {
    names: NameMap,
    since: Instant,
    /// The configuration endpoint's name, looked up by rebuilds and refreshes only (nodes are
    /// reached by their own names).
    seed_host: String,
    /// Lookups per 100 ms window since `since`: of any name, and of the seed's.
    windows: Mutex<Vec<(u64, u64)>>,
}

impl Counting {
    fn new(names: NameMap, seed_host: String) -> Self {
        Counting {
            names,
            since: Instant::now(),
            seed_host,
            windows: Mutex::new(Vec::new()),
        }
    }

    fn window_now(&self) -> usize {
        (self.since.elapsed().as_millis() / 100) as usize
    }

    /// Waits until a whole second has passed without a lookup (10 s at most): the clients'
    /// start-up — a first refresh, and a second look a second after it — is not the rest.
    async fn settled(&self) {
        let started = Instant::now();
        loop {
            let last_busy = self.windows.lock().unwrap().len();
            if self.window_now() >= last_busy + 10 || started.elapsed() > Duration::from_secs(10) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Lookups in windows `[from, to)`: their total, the largest window, and the seed name's
    /// total.
    fn between(&self, from: usize, to: usize) -> (u64, u64, u64) {
        let windows = self.windows.lock().unwrap();
        let part = &windows[from.min(windows.len())..to.min(windows.len())];
        (
            part.iter().map(|w| w.0).sum(),
            part.iter().map(|w| w.0).max().unwrap_or(0),
            part.iter().map(|w| w.1).sum(),
        )
    }
}

impl Resolve for Counting {
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> ResolveFuture<'a> {
        let window = self.window_now();
        {
            let mut windows = self.windows.lock().unwrap();
            if windows.len() <= window {
                windows.resize(window + 1, (0, 0));
            }
            windows[window].0 += 1;
            if host.eq_ignore_ascii_case(&self.seed_host) {
                windows[window].1 += 1;
            }
        }
        self.names.resolve(host, port)
    }
}

/// The process's resident memory, in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    let clients: usize = env_or("FLEET_CLIENTS", 200);
    let steady = Duration::from_secs(env_or("FLEET_STEADY_SECS", 40));
    let outage = Duration::from_secs(env_or("FLEET_OUTAGE_SECS", 10));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(run(clients, steady, outage));
}

async fn run(clients: usize, steady: Duration, outage: Duration) {
    let mut cluster = LocalCluster::builder()
        .shards(3)
        .replicas(1)
        .announce_hostnames(true)
        .start()
        .await
        .expect("the local cluster starts");
    let seed_host = format!("clustercfg.{}", cluster.domain());
    let counting = Arc::new(Counting::new(cluster.name_map(), seed_host));

    let before = rss();
    let mut fleet = Vec::with_capacity(clients);
    for _ in 0..clients {
        let client = cluster
            .client_builder()
            .resolver(counting.clone())
            .build()
            .await
            .expect("the client builds");
        fleet.push(client);
    }
    for client in &fleet {
        client
            .wait_connected(Duration::from_secs(30))
            .await
            .expect("every client connects");
        let mut set = redis::cmd("SET");
        set.arg("fleet").arg("x");
        client.send(set).await.expect("every client serves");
    }
    let per_client = (rss().saturating_sub(before)) / clients as u64;

    // 1. Idle, once the start-up is over.
    counting.settled().await;
    let from = counting.window_now();
    tokio::time::sleep(steady).await;
    let to = counting.window_now();
    let (idle_total, idle_burst, idle_seed) = counting.between(from, to);
    if std::env::var("FLEET_WINDOWS").is_ok() {
        let windows = counting.windows.lock().unwrap();
        let busy: Vec<(f64, u64)> = windows[from.min(windows.len())..to.min(windows.len())]
            .iter()
            .enumerate()
            .filter(|(_, w)| w.0 > 0)
            .map(|(i, w)| (i as f64 / 10.0, w.0))
            .collect();
        println!("idle windows with attempts (s since the idle start, attempts): {busy:?}");
    }
    let idle_rate = idle_total as f64 / steady.as_secs_f64();

    // 2. Outage, under calls.
    let stop = Arc::new(AtomicBool::new(false));
    let last_ok: Arc<Vec<AtomicU64>> = Arc::new((0..clients).map(|_| AtomicU64::new(0)).collect());
    let epoch = Instant::now();
    let mut callers = Vec::new();
    for (i, client) in fleet.iter().enumerate() {
        let client = client.clone();
        let stop = stop.clone();
        let last_ok = last_ok.clone();
        callers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let mut get = redis::cmd("GET");
                get.arg("fleet");
                if client.send(get).await.is_ok() {
                    last_ok[i].store(epoch.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let counters = |fleet: &[Client]| -> (u64, u64) {
        fleet.iter().fold((0, 0), |(refreshes, rebuilds), c| {
            let stats = c.topology().map(|t| t.stats()).unwrap_or_default();
            (
                refreshes + stats.refreshes + stats.failures,
                rebuilds + c.rebuild_handle().status().attempts,
            )
        })
    };
    let (refreshes_before, rebuilds_before) = counters(&fleet);
    cluster.stop_all().await.expect("the nodes stop");
    let down_from = counting.window_now();
    tokio::time::sleep(outage).await;
    let down_to = counting.window_now();
    let (refreshes_after, rebuilds_after) = counters(&fleet);
    let restarting = Instant::now();
    cluster.start_all().await.expect("the cluster comes back");
    let healthy = Instant::now();
    let healthy_ms = epoch.elapsed().as_millis() as u64;
    let all_back = loop {
        let back = last_ok
            .iter()
            .filter(|t| t.load(Ordering::Relaxed) > healthy_ms)
            .count();
        if back == clients {
            break Some(healthy.elapsed());
        }
        if healthy.elapsed() > Duration::from_secs(60) {
            println!("fleet: {back} of {clients} clients served again within 60 s");
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    stop.store(true, Ordering::Relaxed);
    for caller in callers {
        let _ = caller.await;
    }
    let (down_total, down_burst, down_seed) = counting.between(down_from, down_to);
    if std::env::var("FLEET_WINDOWS").is_ok() {
        let windows = counting.windows.lock().unwrap();
        let per_second: Vec<u64> = windows
            [down_from.min(windows.len())..down_to.min(windows.len())]
            .chunks(10)
            .map(|c| c.iter().map(|w| w.0).sum())
            .collect();
        println!("outage attempts per second, second by second: {per_second:?}");
    }
    let down_seconds = outage.as_secs_f64();
    let per_client_second = down_total as f64 / clients as f64 / down_seconds;

    println!();
    println!(
        "== fleet: {clients} clients, 3 shards × 1 replica (host names), default configuration =="
    );
    println!(
        "memory per idle client          {:.1} KiB (RSS delta / clients)",
        per_client as f64 / 1024.0
    );
    println!(
        "idle {:>3} s                      {idle_total} connection attempts ({idle_seed} of the seed name): {idle_rate:.1}/s in total, largest 100 ms window {idle_burst}",
        steady.as_secs()
    );
    println!(
        "outage {:>3} s                    {down_total} attempts ({down_seed} of the seed name): {per_client_second:.2} per client per second, largest 100 ms window {down_burst} (mean {:.1})",
        outage.as_secs(),
        down_total as f64 / (down_to - down_from).max(1) as f64
    );
    println!(
        "  of which                      {} topology refreshes (≤ {} probes each), {} rebuild attempts; the rest are the inner clients' own reconnects",
        refreshes_after - refreshes_before,
        tower_redis_cluster::topology::DEFAULT_MAX_PROBES,
        rebuilds_after - rebuilds_before
    );
    println!(
        "back after the outage           cluster restarted in {:.1?}; every client served again {}",
        healthy - restarting,
        match all_back {
            Some(d) => format!("{d:.1?} after it was healthy"),
            None => "— not within 60 s".to_string(),
        }
    );
    println!(
        "target attempts per client per second during the outage ≤ 2: {}",
        if per_client_second <= 2.0 {
            "ok"
        } else {
            "MISS"
        }
    );
}
