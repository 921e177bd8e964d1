//! Recovery time after the seed failure (redis-py #2472), against real local clusters (feature
//! `test-util`).
//!
//! The scenario, run `RECOVERY_RUNS` (5) times in a row on a 1 shard × 1 replica cluster: the
//! master is SIGKILLed, the replica promoted (`CLUSTER FAILOVER TAKEOVER`, as a managed
//! service's control plane does — one shard has no other master to vote), and the dead node
//! replaced by a new one at a **new IP**. From the second run on, none of the IPs the clients
//! started with exists any more.
//!
//! Two variants, on two clusters, their runs alternated (A1 B1 A2 B2 …):
//! * **name updated** — the seed name follows the nodes (the harness updates its name map);
//! * **name stale** — the name is frozen at the start-up IPs (a stale DNS record or cache).
//!
//! In each variant two clients are made once, before the first run, from the same seed name
//! through the same resolver and with the same connection settings, and probed all along
//! (`RECOVERY_PROBES` (4) tasks each, a GET every 2 ms per task):
//! * `Client` — the full stack (configured as the scenario says);
//! * the redis crate's own `ClusterConnection` (from the same `ClusterConnector`).
//!
//! For each run and client: the time from "cluster healthy again" (`replace_node` returned) to
//! the first successful GET, and from the crash to the first success (of a GET sent after the
//! crash). A client with no success within `RECOVERY_LIMIT_SECS` (10) of the cluster being
//! healthy counts as **never**. Target: median ≤ 0.5 s in both variants for `Client`.
//!
//! Three scenarios (`RECOVERY_SCENARIOS`, a comma-separated list; default all three):
//! * **back-to-back** — the default `Client` (topology refresh every 30 s); each cluster's next
//!   crash follows as soon as the other cluster's run is done (well under a second later);
//! * **spaced** — `Client` with a topology refresh every `RECOVERY_REFRESH_SECS` (2 s) and at
//!   least `RECOVERY_GAP_SECS` (1.5 × the refresh period) from a run's "healthy" to the same
//!   cluster's next crash: the scaled-down picture of failovers minutes apart with the default
//!   30 s refresh;
//! * **managed** — spaced, on the harness's managed profile (the seed user's world): TLS with
//!   certificates that name DNS names only, nodes announced by host name, an ACL user, and the
//!   crashed master's address **blackholed** (packets dropped: connects hang until their
//!   timeout, open connections go silent). Needs the `tls` feature and root (nftables).
//!   Target: median ≤ 250 ms, p95 ≤ 500 ms.
//!
//! The line under each run shows what the `Client` knew before the crash and after it: its
//! generation, its refresher's counters, and how many live nodes its last topology snapshot
//! lists (the rebuild layer's known nodes, its only way back when the name is stale).
//!
//! Each variant's first run is also drawn: `target/recovery-<scenario>-<variant>.svg` shows
//! both clients' successful and failed GETs per 100 ms from a second before the crash, the
//! crash → takeover and the replacement shaded, and the `Client`'s rebuilds marked.
//!
//! ```text
//! cargo bench --features test-util,tls --bench recovery
//! RECOVERY_RUNS=10 RECOVERY_SCENARIOS=managed cargo bench --features test-util,tls --bench recovery
//! ```

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use redis::{cluster_async::ClusterConnection, Value};
use tower_redis_cluster::{
    connect::{ClusterConnector, Connect, ConnectHints, Credentials},
    harness::LocalCluster,
    topology::RefreshConfig,
    Client, Seeds,
};

#[path = "../examples/common/timeline.rs"]
mod timeline;
use timeline::{Counts, Rebuilds, Series, Span, Timeline};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One probe call: when it was sent, when it ended, whether it succeeded.
#[derive(Clone, Copy, Debug)]
struct Event {
    sent: Instant,
    ended: Instant,
    ok: bool,
}

/// A client under constant light load, recording every call.
struct Probe {
    name: &'static str,
    events: Arc<Mutex<Vec<Event>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

#[derive(Clone)]
enum Target {
    Stack(Client),
    Plain(ClusterConnection),
}

impl Target {
    async fn get(&mut self) -> bool {
        let mut cmd = redis::cmd("GET");
        cmd.arg("recovery:probe");
        match self {
            Target::Stack(client) => client.send(cmd).await.is_ok(),
            Target::Plain(connection) => cmd.query_async::<Value>(connection).await.is_ok(),
        }
    }
}

impl Probe {
    fn start(name: &'static str, target: Target, tasks: usize) -> Probe {
        let events = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..tasks)
            .map(|_| {
                let mut target = target.clone();
                let events = events.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let sent = Instant::now();
                        let ok = target.get().await;
                        let ended = Instant::now();
                        events.lock().unwrap().push(Event { sent, ended, ok });
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                })
            })
            .collect();
        Probe {
            name,
            events,
            stop,
            tasks,
        }
    }

    /// Its successful and failed calls per bucket from `origin` to `end`.
    fn series(&self, origin: Instant, end: Instant) -> [Series; 2] {
        let counts = Counts::new(origin, end - origin + timeline::BUCKET);
        for e in self.events.lock().unwrap().iter() {
            counts.record_at(e.ended, e.ok);
        }
        counts.series(
            &format!("{} ok/s", self.name),
            &format!("{} failed/s", self.name),
            end,
        )
    }

    /// Forgets the calls that ended before `before` (keeps memory flat across runs).
    fn trim(&self, before: Instant) {
        self.events.lock().unwrap().retain(|e| e.ended >= before);
    }

    /// The end of the first successful call sent at or after `sent_after` that ended at or
    /// after `ended_after`.
    fn first_success(&self, sent_after: Instant, ended_after: Instant) -> Option<Instant> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.ok && e.sent >= sent_after && e.ended >= ended_after)
            .map(|e| e.ended)
            .min()
    }

    /// Failed calls sent at or after `since`.
    fn failures_since(&self, since: Instant) -> usize {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| !e.ok && e.sent >= since)
            .count()
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            // A call may be stuck until its own timeout; do not wait for it.
            task.abort();
        }
    }
}

/// One variant: its cluster and its two probed clients.
struct Variant {
    name: &'static str,
    cluster: LocalCluster,
    /// The `Client` the first probe uses, to read its topology and rebuild state.
    client: Client,
    probes: [Probe; 2],
    results: [Vec<RunResult>; 2],
    /// When this variant's cluster was last healthy after a run.
    last_healthy: Option<Instant>,
    /// The first run's timeline.
    plot: Option<Timeline>,
}

#[derive(Clone, Copy, Debug)]
struct RunResult {
    /// Healthy → first success; `None`: never (within the limit).
    from_healthy: Option<Duration>,
    /// Crash → first success; `None`: never.
    from_crash: Option<Duration>,
    /// Whether the client served just before the crash.
    up_before: bool,
    failures: usize,
}

async fn make_variant(
    name: &'static str,
    stale: bool,
    probes: usize,
    refresh_every: Option<Duration>,
    managed: bool,
) -> Variant {
    let mut cluster = LocalCluster::builder().shards(1).replicas(1);
    if managed {
        cluster = cluster.managed();
    }
    let cluster = cluster
        .start()
        .await
        .expect("a local cluster (is redis-server on PATH? for the managed profile: nft, root)");
    // As an application configures it: the seed name, the cluster's CA and ACL user if any.
    let mut builder = cluster.client_builder();
    if let Some(every) = refresh_every {
        builder = builder.topology_refresh(RefreshConfig::default().every(every));
    }
    let client = builder.build().await.expect("client");
    client
        .wait_connected(Duration::from_secs(10))
        .await
        .expect("the client connects");
    // The redis crate's cluster client, built by the same connector `Client` uses inside (the
    // same seed name, resolver, TLS, credentials, timeouts and retries), without our layers.
    let mut connector =
        ClusterConnector::new(Seeds::parse([cluster.seed()]).expect("the seed parses"))
            .resolver(cluster.name_map());
    if let Some((user, password)) = cluster.user() {
        connector = connector.credentials(Credentials::new(user, password));
    }
    #[cfg(feature = "tls")]
    if let Some(ca) = cluster.ca_pem() {
        connector = connector.tls(tower_redis_cluster::TlsConfig::custom_ca(ca));
    }
    let plain = connector
        .connect(&ConnectHints::new(1))
        .await
        .expect("plain cluster connection")
        .into_inner();
    if stale {
        // From now on DNS keeps answering with the start-up IPs.
        cluster.name_map().freeze(&cluster.config_endpoint(), true);
    }
    Variant {
        name,
        cluster,
        client: client.clone(),
        probes: [
            Probe::start("Client (full stack)", Target::Stack(client), probes),
            Probe::start("redis ClusterConnection", Target::Plain(plain), probes),
        ],
        results: [Vec::new(), Vec::new()],
        last_healthy: None,
        plot: None,
    }
}

/// Waits until every probe has a success that ended after `since`, at most `limit`.
async fn wait_successes(
    probes: &[Probe],
    sent_after: Instant,
    ended_after: Instant,
    limit: Instant,
) {
    while Instant::now() < limit {
        if probes
            .iter()
            .all(|p| p.first_success(sent_after, ended_after).is_some())
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn run_once(variant: &mut Variant, run: usize, limit: Duration, gap: Duration) {
    if let Some(last) = variant.last_healthy {
        tokio::time::sleep_until((last + gap).into()).await;
    }
    let cluster = &mut variant.cluster;
    cluster
        .wait_settled(Duration::from_secs(30))
        .await
        .expect("the cluster settles before the crash");
    // Did each client serve just before the crash? (The plain client with a stale name will
    // not, once it has lost every node it knew.)
    let check = Instant::now();
    wait_successes(
        &variant.probes,
        check,
        check,
        check + Duration::from_secs(1),
    )
    .await;
    let up_before: Vec<bool> = variant
        .probes
        .iter()
        .map(|p| p.first_success(check, check).is_some())
        .collect();

    let before = client_state(&variant.client, &cluster.addrs());
    let rebuilds = (run == 1).then(|| Rebuilds::watch(&variant.client));
    let master = cluster.master_of(0);
    cluster
        .kill_node(master.addr)
        .await
        .expect("kill the master");
    // Taken once the node is gone: blackholing its address first takes a few milliseconds, in
    // which calls still succeed.
    let crashed = Instant::now();
    let replica = cluster.replicas_of(0)[0].clone();
    let mut takeover = redis::cmd("CLUSTER");
    takeover.arg("FAILOVER").arg("TAKEOVER");
    cluster
        .node_command(replica.addr, &takeover)
        .await
        .expect("CLUSTER FAILOVER TAKEOVER");
    let promoted = Instant::now();
    let new = cluster
        .replace_node(master.addr)
        .await
        .expect("replace the dead master");
    let healthy = Instant::now();
    variant.last_healthy = Some(healthy);
    wait_successes(&variant.probes, crashed, healthy, healthy + limit).await;
    if let Some(rebuilds) = rebuilds {
        // From a second before the crash (the probes' calls since the last trim are kept).
        let origin = check.checked_sub(Duration::from_secs(1)).unwrap_or(check);
        let end = Instant::now();
        let spans = vec![
            Span {
                from: crashed - origin,
                to: promoted - origin,
                label: "crash, takeover".to_string(),
            },
            Span {
                from: promoted - origin,
                to: healthy - origin,
                label: "replace at a new IP".to_string(),
            },
        ];
        variant.plot = Some(Timeline {
            title: format!("{}, run 1: GETs per 100 ms", variant.name),
            bucket: timeline::BUCKET,
            series: variant
                .probes
                .iter()
                .flat_map(|p| p.series(origin, end))
                .collect(),
            spans,
            marks: rebuilds.marks(origin),
        });
    }

    let mut line = format!(
        "  {:<13} run {run}: crash→healthy {:>6.0} ms (master {} → {}, new node {}) |",
        variant.name,
        (healthy - crashed).as_secs_f64() * 1000.0,
        master.addr,
        replica.addr,
        new.addr
    );
    for (i, probe) in variant.probes.iter().enumerate() {
        let first = probe
            .first_success(crashed, healthy)
            .filter(|t| *t <= healthy + limit);
        let result = RunResult {
            from_healthy: first.map(|t| t - healthy),
            from_crash: first
                .and_then(|_| probe.first_success(crashed, crashed))
                .map(|t| t - crashed),
            up_before: up_before[i],
            failures: probe.failures_since(crashed),
        };
        line.push_str(&format!(
            " {}: {} (crash→ {}){}, {} failed calls |",
            probe.name,
            fmt_opt(result.from_healthy),
            fmt_opt(result.from_crash),
            if result.up_before {
                ""
            } else {
                " [down before the crash]"
            },
            result.failures
        ));
        variant.results[i].push(result);
        probe.trim(Instant::now());
    }
    println!("{line}");
    println!(
        "  {:<13}        Client before the crash: {before}; after: {}",
        "",
        client_state(&variant.client, &variant.cluster.addrs())
    );
}

/// What the `Client` knows: its generation, its refresher's counters, and whether its last
/// topology snapshot lists every live node (the rebuild layer's known nodes come from it).
fn client_state(client: &Client, live: &[std::net::SocketAddr]) -> String {
    let rebuild = client.rebuild_handle().status();
    let Some(topology) = client.topology() else {
        return format!("generation {}, topology refresh off", rebuild.generation);
    };
    let stats = topology.stats();
    let known: Vec<std::net::SocketAddr> = topology
        .current()
        .map(|s| s.nodes().filter_map(|n| n.socket_addr()).collect())
        .unwrap_or_default();
    let missing = live.iter().filter(|a| !known.contains(a)).count();
    format!(
        "generation {} ({} connect attempts), {} refreshes ({} failed, {} triggers), snapshot knows {}/{} live nodes",
        rebuild.generation,
        rebuild.attempts,
        stats.refreshes,
        stats.failures,
        stats.triggers,
        live.len() - missing,
        live.len()
    )
}

fn fmt_ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn fmt_opt(d: Option<Duration>) -> String {
    d.map_or_else(|| "never".to_string(), fmt_ms)
}

/// Nearest-rank percentile, "never" sorting last.
fn percentile(values: &[Option<Duration>], p: f64) -> Option<Duration> {
    let mut sorted: Vec<Option<Duration>> = values.to_vec();
    sorted.sort_by_key(|v| v.unwrap_or(Duration::MAX));
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// How the failovers of one scenario are spaced, how the `Client` is configured, and which
/// world the clusters live in.
struct Scenario {
    name: &'static str,
    /// The least time from a run's "healthy" to the next crash of the same cluster.
    gap: Duration,
    /// The `Client`'s periodic topology refresh; `None`: its default (30 s).
    refresh_every: Option<Duration>,
    /// The harness's managed profile (TLS with names-only certificates, host names, ACL user,
    /// blackholed dead nodes).
    managed: bool,
    /// Targets for the `Client`: median and p95 of healthy→ok.
    target: (Duration, Option<Duration>),
}

struct Settings {
    runs: usize,
    limit: Duration,
    probes: usize,
}

/// Runs one scenario (both variants, runs alternated) and prints its table; returns the
/// verdict lines.
async fn scenario(scenario: &Scenario, settings: &Settings) -> Vec<String> {
    let Settings {
        runs,
        limit,
        probes,
    } = *settings;
    let (gap, refresh_every, managed) = (scenario.gap, scenario.refresh_every, scenario.managed);
    let started = Instant::now();
    println!();
    println!(
        "-- scenario \"{}\": {runs} runs per variant, ≥ {gap:?} between a cluster's runs, Client topology refresh every {}{} --",
        scenario.name,
        refresh_every.map_or_else(|| "30s (default)".to_string(), |d| format!("{d:?}")),
        if managed {
            "; managed profile (TLS, names-only certificates, host names, ACL user, dead IPs blackholed)"
        } else {
            ""
        }
    );
    let mut variants = [
        make_variant("name updated", false, probes, refresh_every, managed).await,
        make_variant("name stale", true, probes, refresh_every, managed).await,
    ];
    for run in 1..=runs {
        for variant in variants.iter_mut() {
            run_once(variant, run, limit, gap).await;
        }
    }

    println!();
    println!(
        "== recovery, scenario \"{}\": time to the first successful GET ({runs} runs; \"never\" = none within {limit:?} of healthy) ==",
        scenario.name
    );
    println!(
        "{:<13} {:<24} {:>10} {:>10} {:>10} {:>10} {:>6}  per run (healthy→ok)",
        "variant", "client", "healthy→ok", "p95", "crash→ok", "p95", "never",
    );
    let mut verdicts = Vec::new();
    for variant in &variants {
        for (i, probe) in variant.probes.iter().enumerate() {
            let results = &variant.results[i];
            let healthy: Vec<Option<Duration>> = results.iter().map(|r| r.from_healthy).collect();
            let crash: Vec<Option<Duration>> = results.iter().map(|r| r.from_crash).collect();
            let never = healthy.iter().filter(|v| v.is_none()).count();
            let median = percentile(&healthy, 0.5);
            println!(
                "{:<13} {:<24} {:>10} {:>10} {:>10} {:>10} {:>6}  {}",
                variant.name,
                probe.name,
                fmt_opt(median),
                fmt_opt(percentile(&healthy, 0.95)),
                fmt_opt(percentile(&crash, 0.5)),
                fmt_opt(percentile(&crash, 0.95)),
                format!("{never}/{}", results.len()),
                healthy
                    .iter()
                    .map(|v| fmt_opt(*v))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            if i == 0 {
                let (median_target, p95_target) = scenario.target;
                let p95 = percentile(&healthy, 0.95);
                let mut ok = median.is_some_and(|m| m <= median_target);
                let mut text = format!(
                    "\"{}\", {}: Client median healthy→ok {} ≤ {}",
                    scenario.name,
                    variant.name,
                    fmt_opt(median),
                    fmt_ms(median_target)
                );
                if let Some(p95_target) = p95_target {
                    ok &= p95.is_some_and(|p| p <= p95_target);
                    text.push_str(&format!(", p95 {} ≤ {}", fmt_opt(p95), fmt_ms(p95_target)));
                }
                verdicts.push(format!("{text}: {}", if ok { "ok" } else { "MISS" }));
            }
        }
    }
    println!("(scenario took {:.0} s)", started.elapsed().as_secs_f64());
    for variant in &mut variants {
        let Some(mut plot) = variant.plot.take() else {
            continue;
        };
        plot.title = format!("recovery, scenario \"{}\": {}", scenario.name, plot.title);
        let path = PathBuf::from(format!(
            "target/recovery-{}-{}.svg",
            scenario.name,
            variant.name.replace(' ', "-")
        ));
        match timeline::write_svg(&path, &plot) {
            Ok(()) => println!(
                "timeline of {}'s first run: {}",
                variant.name,
                path.display()
            ),
            Err(e) => eprintln!("cannot write {}: {e}", path.display()),
        }
    }
    for variant in variants {
        for probe in variant.probes {
            probe.stop().await;
        }
        drop(variant.cluster);
    }
    verdicts
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "recovery: run with `cargo bench --features test-util,tls --bench recovery`; skipped"
        );
        return;
    }
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
    }
    let settings = Settings {
        runs: env_or("RECOVERY_RUNS", 5).max(1),
        limit: Duration::from_secs_f64(env_or("RECOVERY_LIMIT_SECS", 10.0)),
        probes: env_or("RECOVERY_PROBES", 4).max(1),
    };
    let which: String = env_or(
        "RECOVERY_SCENARIOS",
        "back-to-back,spaced,managed".to_string(),
    );
    let wanted: Vec<&str> = which.split(',').map(str::trim).collect();
    let refresh = Duration::from_secs_f64(env_or("RECOVERY_REFRESH_SECS", 2.0));
    let spaced_gap =
        Duration::from_secs_f64(env_or("RECOVERY_GAP_SECS", refresh.as_secs_f64() * 1.5));
    let mut scenarios = Vec::new();
    if wanted.contains(&"back-to-back") {
        scenarios.push(Scenario {
            name: "back-to-back",
            gap: Duration::ZERO,
            refresh_every: None,
            managed: false,
            target: (Duration::from_millis(500), None),
        });
    }
    if wanted.contains(&"spaced") {
        scenarios.push(Scenario {
            name: "spaced",
            gap: spaced_gap,
            refresh_every: Some(refresh),
            managed: false,
            target: (Duration::from_millis(500), None),
        });
    }
    if wanted.contains(&"managed") {
        if cfg!(feature = "tls") {
            scenarios.push(Scenario {
                name: "managed",
                gap: spaced_gap,
                refresh_every: Some(refresh),
                managed: true,
                target: (Duration::from_millis(250), Some(Duration::from_millis(500))),
            });
        } else {
            println!("recovery: the managed scenario needs the `tls` feature; skipped");
        }
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(async move {
        let started = Instant::now();
        println!(
            "recovery: 1 shard × 1 replica; each run: kill the master, CLUSTER FAILOVER TAKEOVER, replace it at a new IP; limit {:?}, {} probe tasks per client",
            settings.limit, settings.probes
        );
        let mut verdicts = Vec::new();
        for s in &scenarios {
            verdicts.extend(scenario(s, &settings).await);
        }
        println!();
        println!("targets for Client: median healthy→ok ≤ 0.5 s; managed: median ≤ 250 ms, p95 ≤ 500 ms");
        for v in verdicts {
            println!("  {v}");
        }
        println!("(medians and p95 are nearest-rank over the runs, \"never\" counted as the slowest; total time {:.0} s)", started.elapsed().as_secs_f64());
    });
}
