//! End to end against a real local cluster (3 shards × 1 replica, feature `test-util`): the redis
//! crate's `ClusterConnection` called directly, `RedisService` over it, the full `Client`, and
//! the `fred` crate's cluster client (the other client a Rust user would pick; a dev-dependency
//! of this bench only), under the same load — `E2E_TASKS` (64) concurrent tasks doing SET/GET,
//! then pipelines of `E2E_PIPELINE` (10) commands on one hash tag.
//!
//! Each round gives every contender the same fixed amount of work — `E2E_CALLS` (200 000) calls
//! after `E2E_WARMUP_CALLS` (20 000) of warm-up — one contender at a time, the order rotated
//! every round (ABCD, BCDA, …) so that drift hits every one alike, for `E2E_ROUNDS` (6) rounds.
//! What is decided on is the **client CPU time per call** (user + system time of this process,
//! from `getrusage`: every client thread, none of the servers, which are other processes) as
//! the median of the per-round ratios to the direct client, with the spread of those ratios;
//! throughput and p99 are reported the same way. After the rounds, `redis-benchmark --cluster`
//! on the same cluster gives the server-side ceiling (`E2E_REDIS_BENCHMARK=0` skips it).
//!
//! ```text
//! cargo bench --features test-util --bench e2e
//! E2E_ROUNDS=10 E2E_CALLS=300000 cargo bench --features test-util --bench e2e
//! ```
//!
//! `E2E_EXTRA=1` adds two `Client`s for attribution: one with `timeout(None)`, one with
//! `no_retry()`. Targets: `Client` CPU per call ≤ 1.05 × direct for single commands and
//! ≤ 1.02 × for pipelines.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
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
    /// The `fred` crate's cluster client, default configuration.
    Fred,
}

impl Variant {
    fn all(extra: bool) -> Vec<Variant> {
        let mut all = vec![
            Variant::Direct,
            Variant::Service,
            Variant::Client,
            Variant::Fred,
        ];
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
            Variant::Fred => "fred Client (cluster)",
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
}

/// The contenders, each with connections of its own: ours made with the same settings
/// (`ClusterConnector`'s defaults, the seed name resolved through the harness's name map),
/// fred with its defaults.
#[derive(Clone)]
struct Clients {
    direct: ClusterConnection,
    service: RedisService<ClusterConnection>,
    client: Client,
    client_no_timeout: Client,
    client_no_retry: Client,
    fred: fred::clients::Client,
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
        (Variant::Fred, mode) => call_fred(&clients.fred, mode, task, i).await,
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

/// The same calls through fred: the same keys, values and pipelines.
async fn call_fred(
    client: &fred::clients::Client,
    mode: Mode,
    task: usize,
    i: u64,
) -> Result<(), String> {
    use fred::interfaces::KeysInterface;
    match mode {
        Mode::Single => {
            let key = format!("e2e:t{task}:k{}", i % 128);
            if i.is_multiple_of(2) {
                client
                    .set::<(), _, _>(key, VALUE, None, None, false)
                    .await
                    .map_err(|e| e.to_string())
            } else {
                client
                    .get::<Option<String>, _>(key)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
        }
        Mode::Pipeline(n) => {
            let pipe = client.pipeline();
            for j in 0..n as u64 {
                let key = format!("{{e2e:t{task}}}:k{}", (i + j / 2) % 64);
                let queued = if j.is_multiple_of(2) {
                    pipe.set::<(), _, _>(key, VALUE, None, None, false).await
                } else {
                    pipe.get::<(), _>(key).await
                };
                queued.map_err(|e| e.to_string())?;
            }
            pipe.all::<Vec<fred::types::Value>>()
                .await
                .map(drop)
                .map_err(|e| e.to_string())
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

/// CPU time (user + system) of this process so far — every thread, not its children (the
/// servers) — from `getrusage`, in microseconds.
fn process_cpu() -> Option<Duration> {
    // SAFETY: `getrusage` writes one `rusage` into the memory we own, and nothing else.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return None;
    }
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Some(Duration::from_micros(
        micros(usage.ru_utime) + micros(usage.ru_stime),
    ))
}

/// One measured run of one variant.
struct Run {
    /// CPU time this process (every client thread) used in the measured part.
    cpu: Option<Duration>,
    /// Latencies of the measured calls, in ns.
    samples: Vec<u64>,
    elapsed: Duration,
    errors: u64,
    first_error: Option<String>,
}

/// `calls` calls of `variant` in `mode`, shared out to `tasks` tasks as they go.
async fn work(
    clients: &Clients,
    variant: Variant,
    mode: Mode,
    tasks: usize,
    calls: u64,
) -> (Vec<u64>, u64, Option<String>) {
    let next = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let mut clients = clients.clone();
            let next = next.clone();
            tokio::spawn(async move {
                let mut samples = Vec::with_capacity((calls as usize / tasks) * 2);
                let (mut errors, mut first_error) = (0, None);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= calls {
                        break;
                    }
                    let started = Instant::now();
                    match call_once(&mut clients, variant, mode, task, i).await {
                        Ok(()) => samples.push(started.elapsed().as_nanos() as u64),
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert(e);
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
                (samples, errors, first_error)
            })
        })
        .collect();
    let (mut samples, mut errors, mut first_error) = (Vec::new(), 0, None);
    for handle in handles {
        let (s, e, f) = handle.await.expect("a load task panicked");
        samples.extend(s);
        errors += e;
        if first_error.is_none() {
            first_error = f;
        }
    }
    (samples, errors, first_error)
}

async fn run(
    clients: &Clients,
    variant: Variant,
    mode: Mode,
    tasks: usize,
    warmup: u64,
    calls: u64,
) -> Run {
    work(clients, variant, mode, tasks, warmup).await;
    let cpu_before = process_cpu();
    let started = Instant::now();
    let (samples, errors, first_error) = work(clients, variant, mode, tasks, calls).await;
    let elapsed = started.elapsed();
    let cpu = process_cpu()
        .zip(cpu_before)
        .map(|(a, b)| a.saturating_sub(b));
    Run {
        cpu,
        samples,
        elapsed,
        errors,
        first_error,
    }
}

#[derive(Default)]
struct Totals {
    errors: u64,
    first_error: Option<String>,
    /// Calls per second of each round.
    per_round: Vec<f64>,
    /// p99 latency of each round, in µs.
    per_round_p99: Vec<f64>,
    /// Client CPU µs per call of each round (when `getrusage` answered).
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
        self.errors += run.errors;
        if self.first_error.is_none() {
            self.first_error = run.first_error;
        }
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

/// The smallest and the largest of `values`.
fn spread(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(*v), hi.max(*v))
        })
}

fn ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y).collect()
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
    median(&ratios(a, b))
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
    let fred = {
        use fred::interfaces::ClientLike;
        let seed = cluster.masters()[0].addr;
        let config = fred::types::config::Config::from_url(&format!(
            "redis-cluster://{}:{}",
            seed.ip(),
            seed.port()
        ))
        .expect("a fred configuration");
        let fred = fred::types::Builder::from_config(config)
            .build()
            .expect("a fred client");
        fred.init().await.expect("fred connects");
        fred
    };
    Clients {
        direct,
        service,
        client,
        client_no_timeout,
        client_no_retry,
        fred,
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
    let calls: u64 = env_or("E2E_CALLS", 200_000);
    let warmup: u64 = env_or("E2E_WARMUP_CALLS", 20_000);
    let pipeline_len: usize = env_or("E2E_PIPELINE", 10);
    let mut variants = Variant::all(env_or("E2E_EXTRA", 0u8) != 0);
    // `E2E_ONLY=<part of a name>`: only the contenders whose name has it (for a profiler; the
    // ratios are then to the first of them).
    if let Ok(only) = std::env::var("E2E_ONLY") {
        variants.retain(|v| v.name().contains(only.as_str()));
        if variants.is_empty() {
            eprintln!("e2e: E2E_ONLY={only:?} matches no contender");
            std::process::exit(2);
        }
    }
    let workers: usize = env_or(
        "E2E_WORKERS",
        std::thread::available_parallelism().map_or(2, |n| n.get()),
    );

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
            "e2e: 3 shards × 1 replica at {} ({} nodes); {tasks} tasks, {rounds} rounds of {calls} calls per contender (after {warmup} to warm up), tokio multi-thread with {workers} workers",
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
                    let result = run(&clients, variant, mode, tasks, warmup, calls).await;
                    println!(
                        "  round {}/{rounds} {:<12} {:<32} {:>10.0} calls/s  {:>6.2} µs CPU per call  errors {}",
                        round + 1,
                        mode.name(),
                        variant.name(),
                        result.samples.len() as f64 / result.elapsed.as_secs_f64(),
                        result.cpu.map_or(f64::NAN, |c| c.as_secs_f64() * 1e6 / result.samples.len().max(1) as f64),
                        result.errors
                    );
                    totals[m][v].add(result);
                }
            }
        }

        println!();
        println!("== e2e: {tasks} concurrent tasks, {rounds} rounds of {calls} calls per contender; medians of the per-round ratios to the direct ClusterConnection, [min–max] ==");
        println!(
            "{:<12} {:<32} {:>9} {:>20} {:>8} {:>20} {:>8} {:>20} {:>6}",
            "mode", "variant", "calls/s", "×throughput", "p99 µs", "×p99", "cpu µs", "×cpu per call", "errors"
        );
        let mut verdicts = Vec::new();
        for (m, mode) in modes.iter().enumerate() {
            let base = &totals[m][0];
            for (v, variant) in variants.iter().enumerate() {
                let t = &totals[m][v];
                let with_spread = |a: &[f64], b: &[f64]| {
                    let r = ratios(a, b);
                    let (lo, hi) = spread(&r);
                    format!("{:.3} [{lo:.2}–{hi:.2}]", median(&r))
                };
                println!(
                    "{:<12} {:<32} {:>9.0} {:>20} {:>8.0} {:>20} {:>8.2} {:>20} {:>6}",
                    mode.name(),
                    variant.name(),
                    median(&t.per_round),
                    with_spread(&t.per_round, &base.per_round),
                    median(&t.per_round_p99),
                    with_spread(&t.per_round_p99, &base.per_round_p99),
                    median(&t.per_round_cpu),
                    with_spread(&t.per_round_cpu, &base.per_round_cpu),
                    t.errors,
                );
                if let Some(e) = &t.first_error {
                    println!("{:<12} {:<32} first error: {e}", "", "");
                }
                // The verdict is against the direct client only (`E2E_ONLY` may leave it out).
                if matches!(variant, Variant::Client) && variants[0] == Variant::Direct {
                    let cpu = median_ratio(&t.per_round_cpu, &base.per_round_cpu);
                    let target = if *mode == Mode::Single { 1.05 } else { 1.02 };
                    verdicts.push(format!(
                        "{} {}: CPU per call {cpu:.3}× the direct client (target ≤ {target}: {})",
                        mode.name(),
                        variant.name(),
                        if cpu <= target { "ok" } else { "MISS" },
                    ));
                }
            }
        }
        println!("calls/s, p99, cpu µs: medians over the rounds; × columns: median [min–max] of the per-round ratios (each round runs the contenders back to back, so drift between rounds cancels)");
        println!("cpu µs: this process's CPU time (all client threads, user + system, getrusage) per call — the client side only, the servers are other processes");
        for v in verdicts {
            println!("  {v}");
        }
        if env_or("E2E_REDIS_BENCHMARK", 1u8) != 0 {
            ceiling(&cluster, tasks, calls, pipeline_len);
        }
        drop(clients);
        drop(cluster);
    });
}

/// `redis-benchmark --cluster` on the same cluster, same connections count, same value size:
/// what the servers give a client written in C, as requests per second.
fn ceiling(cluster: &LocalCluster, tasks: usize, calls: u64, pipeline_len: usize) {
    let seed = cluster.masters()[0].addr;
    for pipeline in [1, pipeline_len] {
        let output = std::process::Command::new("redis-benchmark")
            .args(["-h", &seed.ip().to_string(), "-p", &seed.port().to_string()])
            .args([
                "--cluster",
                "-t",
                "set,get",
                "-q",
                "-d",
                &VALUE.len().to_string(),
            ])
            .args(["-c", &tasks.to_string(), "-n", &calls.to_string()])
            .args(["-P", &pipeline.to_string()])
            .output();
        match output {
            Ok(out) if !out.status.success() => println!(
                "redis-benchmark -P {pipeline} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Ok(out) => {
                let text = String::from_utf8_lossy(&out.stdout);
                // `-q` prints `SET: 123456.79 requests per second, p50=…` per test, after
                // progress lines that end in carriage returns.
                for line in text
                    .split(['\r', '\n'])
                    .filter(|l| l.contains("requests per second"))
                {
                    println!(
                        "redis-benchmark --cluster -c {tasks} -P {pipeline}: {}",
                        line.trim()
                    );
                }
            }
            Err(e) => println!("redis-benchmark not run: {e}"),
        }
    }
}
