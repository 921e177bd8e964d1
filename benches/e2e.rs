//! End to end against a real local cluster (3 shards × 1 replica, feature `test-util`): the redis
//! crate's `ClusterConnection` called directly, `RedisService` over it, and the full `Client`,
//! under the same load — `E2E_TASKS` (64) concurrent tasks doing SET/GET, then pipelines of
//! `E2E_PIPELINE` (10) commands on one hash tag. Each variant runs `E2E_SECS` (2 s) after
//! `E2E_WARMUP_SECS` (0.5 s) of warm-up, one variant at a time, in `E2E_ROUNDS` (6) rounds with
//! the order rotated every round (ABC, BCA, CAB, …) so that drift hits every variant alike;
//! the verdicts use the median of the per-round ratios to the direct client.
//!
//! ```text
//! cargo bench --features test-util --bench e2e
//! E2E_ROUNDS=5 E2E_SECS=5 cargo bench --features test-util --bench e2e
//! ```
//!
//! Prints ops/s, p50/p99 latency and the client process's CPU time per call for each variant,
//! and their ratios to the direct client. `E2E_EXTRA=1` adds two `Client`s for attribution:
//! one with `timeout(None)`, one with `no_retry()`.
//! Targets: throughput ≥ 0.97 × direct, p99 ≤ 1.05 × direct.

use std::{
    sync::{
        atomic::{AtomicU64, AtomicU8, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use redis::{cluster_async::ClusterConnection, Cmd, Pipeline, Value};
use tower::{Service, ServiceExt};
use tower_redis_cluster::{
    connect::{ClusterConnector, Connect, ConnectHints},
    harness::LocalCluster,
    Client, RedisService, Seeds,
};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Direct,
    Service,
    Client,
    /// `E2E_EXTRA=1`: the `Client` with `timeout(None)` (no deadline, no timer).
    ClientNoTimeout,
    /// `E2E_EXTRA=1`: the `Client` with `no_retry()`.
    ClientNoRetry,
}

impl Variant {
    fn all(extra: bool) -> Vec<Variant> {
        let mut all = vec![Variant::Direct, Variant::Service, Variant::Client];
        if extra {
            all.extend([Variant::ClientNoTimeout, Variant::ClientNoRetry]);
        }
        all
    }

    fn name(self) -> &'static str {
        match self {
            Variant::Direct => "ClusterConnection (direct)",
            Variant::Service => "RedisService<ClusterConnection>",
            Variant::Client => "Client (full stack)",
            Variant::ClientNoTimeout => "Client, timeout(None)",
            Variant::ClientNoRetry => "Client, no_retry()",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// One SET or GET per call.
    Single,
    /// A pipeline of `E2E_PIPELINE` SET/GET on one hash tag per call.
    Pipeline(usize),
}

impl Mode {
    fn name(self) -> String {
        match self {
            Mode::Single => "single".into(),
            Mode::Pipeline(n) => format!("pipeline×{n}"),
        }
    }

    fn commands(self) -> u64 {
        match self {
            Mode::Single => 1,
            Mode::Pipeline(n) => n as u64,
        }
    }
}

/// The three clients, each with connections of its own, made with the same settings
/// (`ClusterConnector`'s defaults, the seed name resolved through the harness's name map).
#[derive(Clone)]
struct Clients {
    direct: ClusterConnection,
    service: RedisService<ClusterConnection>,
    client: Client,
    client_no_timeout: Client,
    client_no_retry: Client,
}

const VALUE: &str = "0123456789abcdef0123456789abcdef";

fn single(task: usize, i: u64) -> Cmd {
    // No hash tag: the keys spread over the three shards.
    let key = format!("e2e:t{task}:k{}", i % 128);
    if i.is_multiple_of(2) {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(VALUE);
        cmd
    } else {
        let mut cmd = redis::cmd("GET");
        cmd.arg(key);
        cmd
    }
}

fn pipeline(task: usize, i: u64, len: usize) -> Pipeline {
    let mut pipe = redis::pipe();
    for j in 0..len as u64 {
        // One hash tag per task: every command of the pipeline goes to one slot.
        let key = format!("{{e2e:t{task}}}:k{}", (i + j / 2) % 64);
        if j.is_multiple_of(2) {
            pipe.cmd("SET").arg(key).arg(VALUE);
        } else {
            pipe.cmd("GET").arg(key);
        }
    }
    pipe
}

/// One call of `variant` in `mode`; the error as text.
async fn call_once(
    clients: &mut Clients,
    variant: Variant,
    mode: Mode,
    task: usize,
    i: u64,
) -> Result<(), String> {
    match (variant, mode) {
        (Variant::Direct, Mode::Single) => single(task, i)
            .query_async::<Value>(&mut clients.direct)
            .await
            .map(drop)
            .map_err(|e| e.to_string()),
        (Variant::Direct, Mode::Pipeline(n)) => pipeline(task, i, n)
            .query_async::<Vec<Value>>(&mut clients.direct)
            .await
            .map(drop)
            .map_err(|e| e.to_string()),
        (Variant::Service, Mode::Single) => {
            let service = ServiceExt::<Cmd>::ready(&mut clients.service)
                .await
                .map_err(|e| e.to_string())?;
            service
                .call(single(task, i))
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
        (Variant::Service, Mode::Pipeline(n)) => {
            let service = ServiceExt::<Pipeline>::ready(&mut clients.service)
                .await
                .map_err(|e| e.to_string())?;
            service
                .call(pipeline(task, i, n))
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
        (Variant::Client | Variant::ClientNoTimeout | Variant::ClientNoRetry, _) => {
            let client = match variant {
                Variant::ClientNoTimeout => &clients.client_no_timeout,
                Variant::ClientNoRetry => &clients.client_no_retry,
                _ => &clients.client,
            };
            call_client(client, mode, task, i).await
        }
    }
}

async fn call_client(client: &Client, mode: Mode, task: usize, i: u64) -> Result<(), String> {
    match mode {
        Mode::Single => client
            .send(single(task, i))
            .await
            .map(drop)
            .map_err(|e| e.to_string()),
        Mode::Pipeline(n) => client
            .send_pipeline(pipeline(task, i, n))
            .await
            .map(drop)
            .map_err(|e| e.to_string()),
    }
}

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

/// CPU time (user + system) of this process so far, from `/proc/self/stat` (Linux; 10 ms
/// ticks assumed, the usual `CLK_TCK`).
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may contain spaces), from field 3 (state) on.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// One measured run of one variant.
struct Run {
    /// CPU time this process (every client thread) used in the measured window.
    cpu: Option<Duration>,
    /// Latencies of the calls that started and ended inside the measured window, in ns.
    samples: Vec<u64>,
    elapsed: Duration,
    errors: u64,
    first_error: Option<String>,
}

async fn run(
    clients: &Clients,
    variant: Variant,
    mode: Mode,
    tasks: usize,
    warmup: Duration,
    measure: Duration,
) -> Run {
    let phase = Arc::new(AtomicU8::new(WARMUP));
    let errors = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let mut clients = clients.clone();
            let phase = phase.clone();
            let errors = errors.clone();
            tokio::spawn(async move {
                let mut samples = Vec::with_capacity(64 * 1024);
                let mut first_error = None;
                let mut i = 0u64;
                loop {
                    let before = phase.load(Ordering::Relaxed);
                    if before == STOP {
                        break;
                    }
                    i += 1;
                    let started = Instant::now();
                    let result = call_once(&mut clients, variant, mode, task, i).await;
                    let took = started.elapsed();
                    match result {
                        Ok(()) => {
                            if before == MEASURE && phase.load(Ordering::Relaxed) == MEASURE {
                                samples.push(took.as_nanos() as u64);
                            }
                        }
                        Err(e) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            first_error.get_or_insert(e);
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
                (samples, first_error)
            })
        })
        .collect();
    tokio::time::sleep(warmup).await;
    errors.store(0, Ordering::Relaxed);
    phase.store(MEASURE, Ordering::Relaxed);
    let started = Instant::now();
    let cpu_before = process_cpu();
    tokio::time::sleep(measure).await;
    phase.store(STOP, Ordering::Relaxed);
    let cpu = process_cpu()
        .zip(cpu_before)
        .map(|(a, b)| a.saturating_sub(b));
    let elapsed = started.elapsed();
    let mut samples = Vec::new();
    let mut first_error = None;
    for handle in handles {
        let (s, e) = handle.await.expect("a load task panicked");
        samples.extend(s);
        if first_error.is_none() {
            first_error = e;
        }
    }
    Run {
        cpu,
        samples,
        elapsed,
        errors: errors.load(Ordering::Relaxed),
        first_error,
    }
}

#[derive(Default)]
struct Totals {
    samples: Vec<u64>,
    elapsed: Duration,
    errors: u64,
    first_error: Option<String>,
    /// Calls per second of each round.
    per_round: Vec<f64>,
    /// p99 latency of each round, in µs.
    per_round_p99: Vec<f64>,
    /// Client CPU µs per call of each round (when /proc could be read).
    per_round_cpu: Vec<f64>,
}

impl Totals {
    fn add(&mut self, mut run: Run) {
        self.per_round
            .push(run.samples.len() as f64 / run.elapsed.as_secs_f64());
        run.samples.sort_unstable();
        self.per_round_p99.push(percentile_us(&run.samples, 0.99));
        if let Some(cpu) = run.cpu {
            self.per_round_cpu
                .push(cpu.as_secs_f64() * 1e6 / run.samples.len().max(1) as f64);
        }
        self.samples.extend(run.samples);
        self.elapsed += run.elapsed;
        self.errors += run.errors;
        if self.first_error.is_none() {
            self.first_error = run.first_error;
        }
    }

    fn calls_per_sec(&self) -> f64 {
        self.samples.len() as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile_us(&self, p: f64) -> f64 {
        percentile_us(&self.samples, p)
    }
}

/// The `p` quantile of sorted latencies in ns, in µs.
fn percentile_us(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let at = ((sorted.len() as f64 * p) as usize).min(sorted.len() - 1);
    sorted[at] as f64 / 1000.0
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// The median of the round-by-round ratios `a[i] / b[i]`: each round's variants ran back to
/// back, so this cancels the drift between rounds.
fn median_ratio(a: &[f64], b: &[f64]) -> f64 {
    let ratios: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
    median(&ratios)
}

async fn make_clients(cluster: &LocalCluster) -> Clients {
    let connector = || {
        ClusterConnector::new(Seeds::parse([cluster.seed()]).expect("the harness seed parses"))
            .resolver(cluster.name_map())
    };
    let direct = connector()
        .connect(&ConnectHints::new(1))
        .await
        .expect("direct connection")
        .into_inner();
    let service = connector()
        .connect(&ConnectHints::new(1))
        .await
        .expect("service connection");
    let builder = || cluster.client_builder();
    let client = builder().build().await.expect("client");
    let client_no_timeout = builder().timeout(None).build().await.expect("client");
    let client_no_retry = builder().no_retry().build().await.expect("client");
    for c in [&client, &client_no_timeout, &client_no_retry] {
        c.wait_connected(Duration::from_secs(10))
            .await
            .expect("the client connects");
    }
    Clients {
        direct,
        service,
        client,
        client_no_timeout,
        client_no_retry,
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --benches` builds and runs this binary without `--bench`: do not start a
        // cluster and run for a minute and a half there.
        println!("e2e: run with `cargo bench --features test-util --bench e2e`; skipped");
        return;
    }
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
    }
    let tasks: usize = env_or("E2E_TASKS", 64);
    let rounds: usize = env_or("E2E_ROUNDS", 6);
    let secs: f64 = env_or("E2E_SECS", 2.0);
    let warmup_secs: f64 = env_or("E2E_WARMUP_SECS", 0.5);
    let pipeline_len: usize = env_or("E2E_PIPELINE", 10);
    let variants = Variant::all(env_or("E2E_EXTRA", 0u8) != 0);
    let workers: usize = env_or(
        "E2E_WORKERS",
        std::thread::available_parallelism().map_or(2, |n| n.get()),
    );
    let measure = Duration::from_secs_f64(secs);
    let warmup = Duration::from_secs_f64(warmup_secs);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(async move {
        let cluster = LocalCluster::builder()
            .shards(3)
            .replicas(1)
            .start()
            .await
            .expect("a local cluster (is redis-server on PATH?)");
        let clients = make_clients(&cluster).await;
        println!(
            "e2e: 3 shards × 1 replica at {} ({} nodes); {tasks} tasks, {rounds} rounds × {secs} s per variant (+{warmup_secs} s warm-up), tokio multi-thread with {workers} workers",
            cluster.seed(),
            cluster.nodes().len()
        );

        let modes = [Mode::Single, Mode::Pipeline(pipeline_len)];
        let mut totals: Vec<Vec<Totals>> = modes
            .iter()
            .map(|_| variants.iter().map(|_| Totals::default()).collect())
            .collect();
        for round in 0..rounds {
            for (m, &mode) in modes.iter().enumerate() {
                for k in 0..variants.len() {
                    let v = (k + round) % variants.len();
                    let variant = variants[v];
                    let result = run(&clients, variant, mode, tasks, warmup, measure).await;
                    println!(
                        "  round {}/{rounds} {:<12} {:<32} {:>10.0} calls/s  errors {}",
                        round + 1,
                        mode.name(),
                        variant.name(),
                        result.samples.len() as f64 / result.elapsed.as_secs_f64(),
                        result.errors
                    );
                    totals[m][v].add(result);
                }
            }
        }

        println!();
        println!("== e2e: {tasks} concurrent tasks, {rounds} rounds × {secs} s per variant; ratios to the direct ClusterConnection ==");
        println!(
            "{:<12} {:<32} {:>10} {:>10} {:>7} {:>7} {:>8} {:>7} {:>8} {:>7} {:>7} {:>8} {:>7} {:>6}  per-round calls/s",
            "mode", "variant", "calls/s", "cmds/s", "×thr", "×thr~", "p50 µs", "×p50", "p99 µs", "×p99", "×p99~", "cpu µs", "×cpu~", "errors"
        );
        let mut verdicts = Vec::new();
        for (m, mode) in modes.iter().enumerate() {
            for t in totals[m].iter_mut() {
                t.samples.sort_unstable();
            }
            let base = &totals[m][0];
            let (base_thr, base_p50, base_p99) = (
                base.calls_per_sec(),
                base.percentile_us(0.50),
                base.percentile_us(0.99),
            );
            for (v, variant) in variants.iter().enumerate() {
                let t = &totals[m][v];
                let thr = t.calls_per_sec();
                let (p50, p99) = (t.percentile_us(0.50), t.percentile_us(0.99));
                let thr_ratio = median_ratio(&t.per_round, &base.per_round);
                let p99_ratio = median_ratio(&t.per_round_p99, &base.per_round_p99);
                let cpu = median(&t.per_round_cpu);
                let cpu_ratio = median_ratio(&t.per_round_cpu, &base.per_round_cpu);
                println!(
                    "{:<12} {:<32} {:>10.0} {:>10.0} {:>7.3} {:>7.3} {:>8.0} {:>7.3} {:>8.0} {:>7.3} {:>7.3} {:>8.2} {:>7.3} {:>6}  {}",
                    mode.name(),
                    variant.name(),
                    thr,
                    thr * mode.commands() as f64,
                    thr / base_thr,
                    thr_ratio,
                    p50,
                    p50 / base_p50,
                    p99,
                    p99 / base_p99,
                    p99_ratio,
                    cpu,
                    cpu_ratio,
                    t.errors,
                    t.per_round
                        .iter()
                        .map(|r| format!("{r:.0}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                );
                if let Some(e) = &t.first_error {
                    println!("{:<12} {:<32} first error: {e}", "", "");
                }
                if *variant != Variant::Direct {
                    verdicts.push(format!(
                        "{} {}: throughput {:.3}× ({}), p99 {:.3}× ({})",
                        mode.name(),
                        variant.name(),
                        thr_ratio,
                        if thr_ratio >= 0.97 { "ok" } else { "MISS" },
                        p99_ratio,
                        if p99_ratio <= 1.05 { "ok" } else { "MISS" },
                    ));
                }
            }
        }
        println!("×thr, ×p50, ×p99: pooled over all rounds; ×thr~, ×p99~, ×cpu~: median of the per-round ratios (each round runs the variants back to back, so drift between rounds cancels)");
        println!("cpu µs: median per round of this process's CPU time (all client threads, user + system) per call — the client side only, the servers are other processes");
        println!("targets (judged on the per-round medians): throughput ≥ 0.97× and p99 ≤ 1.05× the direct client");
        for v in verdicts {
            println!("  {v}");
        }
        drop(clients);
        drop(cluster);
    });
}
