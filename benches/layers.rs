//! Per-call overhead of each layer, without any network: an in-memory `ConnectionLike` that
//! answers at once, wrapped in `RedisService`, then each layer alone and the real `Client`,
//! built over that connection with `ClientBuilder::build_with` in its default configuration.
//!
//! Three measurements, all of a GET built anew for every call:
//! * criterion (group `layers_get`): ns per call, `clone().oneshot(cmd)` on a current-thread
//!   tokio runtime;
//! * a table, outside criterion: heap allocations and bytes per call over `LAYERS_ALLOC_CALLS`
//!   (100 000) calls, counted by this binary's `#[global_allocator]`; the size of each call's
//!   future; an interleaved wall-clock ns/call; and every figure's difference to the bare
//!   `RedisService`. The `*_pending` rows use a connection that is pending once before it
//!   answers, as a real one is: every future is polled twice and the timeouts' timers are
//!   really registered (with an immediate answer they never are);
//! * a multi-thread table: 2 workers, 64 tasks, `LAYERS_MT_CALLS` (10 000) calls each — the cost
//!   of sharing the layers' state between threads (process CPU time per call).
//!
//! ```text
//! cargo bench --bench layers                 # everything
//! cargo bench --bench layers -- full         # criterion filter (the tables always run)
//! ```
//!
//! Targets: the full stack costs ≤ 250 ns and ≤ 2 allocations per call more than the bare
//! `RedisService`. The `target` lines say `MISS` when it does not.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::{Cell, RefCell},
    future::Future,
    hint::black_box,
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use criterion::{measurement::WallTime, BenchmarkGroup, Criterion};
use redis::{aio::ConnectionLike, Cmd, Pipeline, RedisFuture, Value};
use tokio::runtime::Runtime;
use tower::{util::BoxCloneSyncService, BoxError, Service, ServiceBuilder, ServiceExt};
use tower_redis_cluster::{
    connect::{Connect, ConnectFuture, ConnectHints},
    rebuild::{Rebuild, RebuildConfig},
    retry::{Retry, RetryConfig},
    topology::{RefreshConfig, TopologyRefresh, TopologySource},
    Client, Error, RedisService, Seeds,
};

// ---------------------------------------------------------------------------------------------
// Allocation counting

/// The system allocator, counting this thread's allocations (the benchmarks run every call on
/// the current thread: current-thread runtime, no blocking work on the hot path).
struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
    static BYTES: Cell<u64> = const { Cell::new(0) };
}

fn count(size: usize) {
    // `try_with`: allocations during thread teardown must not panic.
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
    let _ = BYTES.try_with(|c| c.set(c.get() + size as u64));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // A realloc is an allocation as far as the hot path is concerned.
        count(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs_now() -> (u64, u64) {
    (ALLOCS.with(Cell::get), BYTES.with(Cell::get))
}

// ---------------------------------------------------------------------------------------------
// The in-memory connection

/// Answers every command: `GET` with a 3-byte bulk string (one allocation, as a real reply
/// would need), anything else with `OK`. Its future is boxed, as `ConnectionLike` requires of
/// every connection. With `PENDING = false` it is ready at its first poll; with `PENDING =
/// true` it is pending once (`tokio::task::yield_now`), as a real reply always is — so every
/// layer's future is polled twice and the timeouts' timers get registered.
#[derive(Clone, Copy, Debug, Default)]
struct FakeConnection<const PENDING: bool = false>;

fn reply_to(cmd: &Cmd) -> Value {
    match cmd.args_iter().next() {
        Some(redis::Arg::Simple(b"GET")) => Value::BulkString(b"bar".to_vec()),
        _ => Value::Okay,
    }
}

impl<const PENDING: bool> ConnectionLike for FakeConnection<PENDING> {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let reply = reply_to(cmd);
        if PENDING {
            Box::pin(async move {
                tokio::task::yield_now().await;
                Ok(reply)
            })
        } else {
            Box::pin(std::future::ready(Ok(reply)))
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        _offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let replies = pipeline.cmd_iter().take(count).map(reply_to).collect();
        Box::pin(std::future::ready(Ok(replies)))
    }

    fn get_db(&self) -> i64 {
        0
    }
}

type Bare<const PENDING: bool = false> = RedisService<FakeConnection<PENDING>>;

fn bare() -> Bare {
    RedisService::new(FakeConnection)
}

fn bare_pending() -> Bare<true> {
    RedisService::new(FakeConnection)
}

/// The request of every benchmark, built anew for each call (a service takes it by value).
fn get() -> Cmd {
    let mut cmd = redis::cmd("GET");
    cmd.arg("foo");
    cmd
}

// ---------------------------------------------------------------------------------------------
// The configurations

/// An address nothing listens on: the refresher's first refresh fails at once and it then
/// waits for triggers (the periodic timer is off), which a successful call never sends.
fn unreachable_source() -> TopologySource {
    TopologySource::new(Seeds::parse(["127.0.0.1:1"]).expect("valid seed"))
}

/// Hands out the in-memory service.
#[derive(Clone, Copy, Debug, Default)]
struct FakeConnector<const PENDING: bool>;

impl<const PENDING: bool> Connect for FakeConnector<PENDING> {
    type Service = Bare<PENDING>;

    fn connect(&self, _: &ConnectHints) -> ConnectFuture<Bare<PENDING>> {
        Box::pin(async { Ok(RedisService::new(FakeConnection::<PENDING>)) })
    }
}

/// `Rebuild` over a connector that hands out the in-memory service; waits for generation 1.
async fn rebuild<const PENDING: bool>() -> Rebuild<FakeConnector<PENDING>> {
    // As `Client` configures it: `max_wait` is capped at the 5 s deadline (the default is 2 s).
    let service = Rebuild::new(FakeConnector, RebuildConfig::default());
    service
        .handle()
        .wait_for_generation(1, Duration::from_secs(5))
        .await
        .expect("the in-memory connector connects");
    service
}

/// `TopologyRefresh` with the periodic timer off.
fn refresh_config() -> RefreshConfig {
    RefreshConfig::default().every(None)
}

/// The Retry configuration `Client` uses by default (the deadline equals the 5 s timeout).
fn retry_config() -> RetryConfig {
    RetryConfig::default().deadline(Duration::from_secs(5))
}

/// Criterion's group name: results land in `target/criterion/layers_get/<config>/`.
const GROUP: &str = "layers_get";

const TIMEOUT: Duration = Duration::from_secs(5);

type Commands = BoxCloneSyncService<Cmd, Value, Error>;

/// The real `Client` over the in-memory connector, as `Client::builder()` configures it by
/// default (deadline 5 s, Retry, TopologyRefresh with its timer off, Rebuild), connected.
async fn real_client<const PENDING: bool>() -> Client<FakeConnector<PENDING>> {
    let client = Client::builder()
        .timeout(TIMEOUT)
        .topology_source(unreachable_source())
        .topology_refresh(refresh_config())
        .build_with(FakeConnector::<PENDING>)
        .await
        .expect("the client builds");
    client
        .wait_connected(Duration::from_secs(5))
        .await
        .expect("the in-memory connector connects");
    client
}

/// A pipeline of `len` commands on one hash tag, half SET, half GET.
fn pipeline(len: usize) -> Pipeline {
    let mut pipe = redis::pipe();
    for j in 0..len {
        if j % 2 == 0 {
            pipe.cmd("SET").arg(format!("{{tag}}:k{j}")).arg("value");
        } else {
            pipe.cmd("GET").arg(format!("{{tag}}:k{j}"));
        }
    }
    pipe
}

/// Allocations per pipeline call (a pipeline of 10 built beforehand and cloned for each call,
/// as a caller that keeps its pipeline would): the bare service, the full stack, and exactly
/// what `Client::query_pipeline::<Vec<Value>>(&pipe)` does (clone, deadline, convert).
fn pipeline_table(rt: &Runtime, calls: u64) {
    let (bare_service, client) = rt.block_on(async { (bare(), real_client::<false>().await) });
    let template = pipeline(10);
    let count = |name: &str, what: &str, run: &dyn Fn()| {
        run();
        let (a0, b0) = allocs_now();
        let started = Instant::now();
        for _ in 0..calls {
            run();
        }
        let ns = started.elapsed().as_nanos() as f64 / calls as f64;
        let (a1, b1) = allocs_now();
        let (allocs, bytes) = (
            (a1 - a0) as f64 / calls as f64,
            (b1 - b0) as f64 / calls as f64,
        );
        println!("{name:<22} {ns:>9.1} {allocs:>8.2} {bytes:>8.0}   {what}");
        allocs
    };
    println!();
    println!("== layers: one pipeline of 10 commands per call ({calls} calls, current-thread runtime) ==");
    println!(
        "{:<22} {:>9} {:>8} {:>8}   what",
        "config", "wall ns", "allocs", "bytes"
    );
    let clone_only = count(
        "pipeline_clone_only",
        "cloning the pipeline (included in the two rows below)",
        &|| {
            black_box(template.clone());
        },
    );
    let bare_allocs = count(
        "bare_pipeline",
        "clone + RedisService::<Pipeline>::oneshot",
        &|| {
            let call = bare_service.clone().oneshot(template.clone());
            black_box(rt.block_on(call).expect("the fake answers"));
        },
    );
    let full_allocs = count(
        "full_pipeline",
        "clone + the boxed Service interface's oneshot",
        &|| {
            let call = client.clone().oneshot(template.clone());
            black_box(rt.block_on(call).expect("the fake answers"));
        },
    );
    count(
        "client_query_pipeline",
        "= Client::query_pipeline(&p): clone, deadline, from_redis_value",
        &|| {
            let values = rt.block_on(client.query_pipeline::<Vec<Value>>(&template));
            black_box(values.expect("the fake answers"));
        },
    );
    println!(
        "Service interface vs bare: +{:.2} allocations per pipeline call (a clone of the pipeline costs {clone_only:.0})",
        full_allocs - bare_allocs
    );
}

/// A GET service as each configuration builds it.
trait Get:
    Service<Cmd, Response = Value, Error = Error, Future: Send> + Clone + Send + Sync + 'static
{
}

impl<S> Get for S where
    S: Service<Cmd, Response = Value, Error = Error, Future: Send> + Clone + Send + Sync + 'static
{
}

/// Each layer alone over the bare service: Rebuild, TopologyRefresh, Retry, Retry without a
/// budget, tower's Timeout (with the error mapping `Client` used to need around it).
async fn single_layers() -> (impl Get, impl Get, impl Get, impl Get, impl Get) {
    let timeout = ServiceBuilder::new()
        .map_err(Error::from)
        .layer(tower::timeout::TimeoutLayer::new(TIMEOUT))
        .map_err(|e: Error| -> BoxError { Box::new(e) })
        .service(bare());
    (
        rebuild::<false>().await,
        TopologyRefresh::new(bare(), unreachable_source(), refresh_config(), None),
        Retry::new(bare(), retry_config()),
        Retry::new(bare(), retry_config().without_budget()),
        timeout,
    )
}

/// One call the way each configuration is used. Everything runs on one thread (a
/// current-thread runtime), so nothing here needs to be `Send`.
trait Caller {
    fn call_once(&self) -> impl Future<Output = Value> + '_;
}

/// `service.clone().oneshot(GET)`: a caller of the `Service` interface with a shared handle.
struct Oneshot<S>(S);

impl<S> Caller for Oneshot<S>
where
    S: Service<Cmd, Response = Value, Error = Error> + Clone,
{
    fn call_once(&self) -> impl Future<Output = Value> + '_ {
        let service = self.0.clone();
        async move { service.oneshot(get()).await.expect("the fake answers") }
    }
}

/// `ready().await` + `call()` on one long-lived clone (a task that owns its service): no
/// clone per call.
struct Owned<S>(RefCell<Option<S>>);

impl<S> Caller for Owned<S>
where
    S: Service<Cmd, Response = Value, Error = Error>,
{
    async fn call_once(&self) -> Value {
        let mut service = self.0.borrow_mut().take().expect("one call at a time");
        let ready = service.ready().await.map(drop);
        let call = ready.map(|()| service.call(get()));
        *self.0.borrow_mut() = Some(service);
        call.expect("ready").await.expect("the fake answers")
    }
}

/// `Client::send`.
struct ClientSend<const PENDING: bool>(Client<FakeConnector<PENDING>>);

impl<const PENDING: bool> Caller for ClientSend<PENDING> {
    async fn call_once(&self) -> Value {
        self.0.send(get()).await.expect("the fake answers")
    }
}

/// Building the request alone, the floor every other line includes.
struct BuildOnly;

impl Caller for BuildOnly {
    fn call_once(&self) -> impl Future<Output = Value> + '_ {
        let cmd = black_box(get());
        async move {
            drop(cmd);
            Value::Nil
        }
    }
}

struct Config {
    name: &'static str,
    what: &'static str,
    caller: Box<dyn DynCaller>,
}

fn config(name: &'static str, what: &'static str, caller: impl Caller + 'static) -> Config {
    Config {
        name,
        what,
        caller: Box::new(caller),
    }
}

/// Object-safe wrapper so the configurations fit in one list.
trait DynCaller {
    fn call_many(&self, rt: &Runtime, n: u64);
    fn future_size(&self) -> usize;
    fn bench(&self, rt: &Runtime, group: &mut BenchmarkGroup<'_, WallTime>, name: &str);
}

impl<C: Caller> DynCaller for C {
    /// `n` calls inside one `block_on` (no allocation of its own per call).
    fn call_many(&self, rt: &Runtime, n: u64) {
        rt.block_on(async {
            for _ in 0..n {
                black_box(self.call_once().await);
            }
        });
    }

    /// The size of one call's future (made, never polled).
    fn future_size(&self) -> usize {
        std::mem::size_of_val(&self.call_once())
    }

    fn bench(&self, rt: &Runtime, group: &mut BenchmarkGroup<'_, WallTime>, name: &str) {
        group.bench_function(name, |b| b.to_async(rt).iter(|| self.call_once()));
    }
}

fn configs(rt: &Runtime) -> Vec<Config> {
    // Services that start background work (Rebuild's connect, TopologyRefresh's refresher)
    // must be made inside the runtime.
    rt.block_on(async {
        let (rebuild_alone, topology_alone, retry_alone, retry_no_budget, timeout_alone) =
            single_layers().await;
        let bare_boxed: Commands = BoxCloneSyncService::new(bare());
        let client = real_client::<false>().await;
        let client_pending = real_client::<true>().await;
        // Let the refreshers' first (failing) refreshes and the rebuild tasks finish.
        tokio::time::sleep(Duration::from_millis(200)).await;
        vec![
            config(
                "build_cmd_only",
                "building the GET Cmd, no call (included in every line)",
                BuildOnly,
            ),
            config(
                "bare",
                "RedisService<in-memory ConnectionLike>",
                Oneshot(bare()),
            ),
            config(
                "bare_boxed",
                "BoxCloneSyncService<RedisService>: the box alone",
                Oneshot(bare_boxed),
            ),
            config("rebuild", "Rebuild → RedisService", Oneshot(rebuild_alone)),
            config(
                "topology",
                "TopologyRefresh (periodic off) → RedisService",
                Oneshot(topology_alone),
            ),
            config(
                "retry",
                "Retry (Client's default config) → RedisService",
                Oneshot(retry_alone),
            ),
            config(
                "retry_no_budget",
                "Retry without the TpsBudget → RedisService",
                Oneshot(retry_no_budget),
            ),
            config(
                "timeout",
                "map_err → tower Timeout → map_err → RedisService",
                Oneshot(timeout_alone),
            ),
            config(
                "full",
                "Client's Service interface, clone().oneshot()",
                Oneshot(client.clone()),
            ),
            config(
                "full_owned",
                "Client's Service interface, ready()+call() on one owned clone",
                Owned(RefCell::new(Some(client.clone()))),
            ),
            config(
                "client_send",
                "= Client::send (a clone of the core, call_once, deadline)",
                ClientSend(client),
            ),
            config(
                "bare_pending",
                "bare, the connection pending once (as a real one is)",
                Oneshot(bare_pending()),
            ),
            config(
                "full_pending",
                "full, the connection pending once: timers registered",
                Oneshot(client_pending.clone()),
            ),
            config(
                "client_pending",
                "client_send, the connection pending once",
                ClientSend(client_pending),
            ),
        ]
    })
}

// ---------------------------------------------------------------------------------------------
// The allocation table

struct Row {
    name: &'static str,
    what: &'static str,
    /// Criterion's median estimate from this run, if it measured this configuration.
    criterion_ns: Option<f64>,
    /// Own wall-clock estimate, measured interleaved (see `measure`).
    wall_ns: f64,
    /// Median over the rounds of (this − its baseline in the same round).
    paired_delta_ns: f64,
    allocs: f64,
    bytes: f64,
    future: usize,
}

/// Allocations per call over `calls` calls of each configuration (after a warm-up), and a
/// wall-clock time per call measured **interleaved**: 21 rounds, each running `calls / 20`
/// calls of every configuration in turn, median per configuration — so that a machine whose
/// load drifts slows every configuration alike. The difference to the baseline is the median
/// of the per-round differences: both sides of each one were measured moments apart.
fn measure(rt: &Runtime, configs: &[Config], calls: u64, since: SystemTime) -> Vec<Row> {
    let mut rows: Vec<Row> = configs
        .iter()
        .map(|config| {
            config.caller.call_many(rt, calls / 10 + 1);
            let (a0, b0) = allocs_now();
            config.caller.call_many(rt, calls);
            let (a1, b1) = allocs_now();
            Row {
                name: config.name,
                what: config.what,
                criterion_ns: criterion_median_ns(config.name, since),
                wall_ns: f64::NAN,
                paired_delta_ns: f64::NAN,
                allocs: (a1 - a0) as f64 / calls as f64,
                bytes: (b1 - b0) as f64 / calls as f64,
                future: config.caller.future_size(),
            }
        })
        .collect();
    let batch = (calls / 20).max(1);
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    for _ in 0..21 {
        for (config, t) in configs.iter().zip(times.iter_mut()) {
            let started = Instant::now();
            config.caller.call_many(rt, batch);
            t.push(started.elapsed().as_nanos() as f64 / batch as f64);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for (i, row) in rows.iter_mut().enumerate() {
        row.wall_ns = median(times[i].clone());
        let base = baseline_name(row.name);
        if let Some(b) = configs.iter().position(|c| c.name == base) {
            let deltas = times[i].iter().zip(&times[b]).map(|(t, u)| t - u).collect();
            row.paired_delta_ns = median(deltas);
        }
    }
    rows
}

/// The bare service over the same kind of connection.
fn baseline_name(name: &str) -> &'static str {
    if name.ends_with("_pending") {
        "bare_pending"
    } else {
        "bare"
    }
}

/// Where criterion keeps its results (as criterion 0.5 decides it, minus `cargo metadata`:
/// `CRITERION_HOME`, else `$CARGO_TARGET_DIR/criterion`, else `target/criterion` next to this
/// binary's `target/<profile>/deps/`).
fn criterion_home() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return Some(home.into());
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return Some(PathBuf::from(target).join("criterion"));
    }
    let exe = std::env::current_exe().ok()?;
    Some(exe.ancestors().nth(3)?.join("criterion"))
}

/// The median point estimate criterion wrote for `layers_get/<name>` during this run.
fn criterion_median_ns(name: &str, since: SystemTime) -> Option<f64> {
    let path = criterion_home()?
        .join(GROUP)
        .join(name)
        .join("new")
        .join("estimates.json");
    if std::fs::metadata(&path).ok()?.modified().ok()? < since {
        return None; // left over from an earlier run (filtered out this time)
    }
    let json = std::fs::read_to_string(path).ok()?;
    let median = &json[json.find("\"median\"")?..];
    let value = &median[median.find("\"point_estimate\":")? + "\"point_estimate\":".len()..];
    let end = value.find([',', '}'])?;
    value[..end].trim().parse().ok()
}

fn allocation_table(rt: &Runtime, configs: &[Config], calls: u64, since: SystemTime) {
    let rows = measure(rt, configs, calls, since);
    // Each row is compared with the bare service over the same kind of connection.
    let baseline = |name: &str| rows.iter().find(|r| r.name == baseline_name(name));
    println!();
    println!("== layers: per-call cost of a GET (current-thread runtime, in-memory inner, {calls} calls per config for allocations) ==");
    println!(
        "{:<16} {:>9} {:>8} {:>9} {:>8} {:>7} {:>8} {:>7} {:>7}   what",
        "config", "wall ns", "Δwall", "crit ns", "Δcrit", "allocs", "Δallocs", "bytes", "future",
    );
    let opt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
    for r in &rows {
        let Some(base) = baseline(r.name) else {
            continue;
        };
        println!(
            "{:<16} {:>9.1} {:>8.1} {:>9} {:>8} {:>7.2} {:>8.2} {:>7.0} {:>7}   {}",
            r.name,
            r.wall_ns,
            r.paired_delta_ns,
            opt(r.criterion_ns),
            opt(r.criterion_ns.zip(base.criterion_ns).map(|(a, b)| a - b)),
            r.allocs,
            r.allocs - base.allocs,
            r.bytes,
            r.future,
            r.what
        );
    }
    println!("wall ns: median of 21 interleaved rounds (all configs in turn: robust to load drift), Δwall: median of the per-round differences to the baseline; crit ns: criterion's median from this run (\"-\" if filtered out)");
    println!("Δ: against `bare` (`bare_pending` for the *_pending rows); allocs/bytes: heap allocations and bytes per call; future: size in bytes of the call's future");
    let verdict = |ok: bool| if ok { "ok" } else { "MISS" };
    for name in ["full", "client_send", "full_pending", "client_pending"] {
        let (Some(r), Some(base)) = (rows.iter().find(|r| r.name == name), baseline(name)) else {
            continue;
        };
        let dwall = r.paired_delta_ns;
        let dcrit = r.criterion_ns.zip(base.criterion_ns).map(|(a, b)| a - b);
        let dallocs = r.allocs - base.allocs;
        println!(
            "target {name:<15} vs {:<13} +{dwall:.0} ns wall{} (≤ 250: {}), +{dallocs:.2} allocs (≤ 2: {})",
            base.name,
            dcrit.map_or_else(String::new, |d| format!(" / +{d:.0} ns criterion")),
            verdict(dwall <= 250.0 && dcrit.is_none_or(|d| d <= 250.0)),
            verdict(dallocs <= 2.0 + 1e-9)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Multi-threaded: the shared state of the layers under two worker threads

/// CPU time (user + system) of this process so far, from `/proc/self/stat` (Linux; 10 ms ticks
/// assumed, the usual `CLK_TCK`).
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// `tasks` tasks each making `per_task` calls, each `call(service.clone())`; returns the wall
/// time and the process CPU time the round took.
async fn mt_round<S, F, Fut>(
    service: &S,
    tasks: usize,
    per_task: u64,
    call: F,
) -> (Duration, Option<Duration>)
where
    S: Clone + Send + 'static,
    F: Fn(S) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Value, Error>> + Send,
{
    let cpu = process_cpu();
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let service = service.clone();
            let call = call.clone();
            tokio::spawn(async move {
                for _ in 0..per_task {
                    let value = call(service.clone()).await;
                    black_box(value.expect("the fake answers"));
                }
            })
        })
        .collect();
    for handle in handles {
        handle.await.expect("a task panicked");
    }
    let wall = started.elapsed();
    (wall, process_cpu().zip(cpu).map(|(a, b)| a - b))
}

/// The same configurations on a 2-worker multi-thread runtime with 64 tasks: what sharing the
/// layers' state (Arc counts, the retry budget's mutex, the rebuild slot's lock, the timer
/// wheel) across threads adds. Rounds interleaved; per call: median wall time over rounds
/// × 2 workers (thread time per call), and total process CPU / calls.
fn multi_thread_table(per_task: u64) {
    const TASKS: usize = 64;
    const ROUNDS: usize = 7;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let names = [
        "bare",
        "rebuild",
        "topology",
        "retry",
        "retry_no_budget",
        "timeout",
        "full",
        "client_send",
    ];
    let mut wall: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut cpu: Vec<Duration> = vec![Duration::ZERO; names.len()];
    let mut cpu_known = true;
    rt.block_on(async {
        let bare_service = bare();
        let (rebuild_alone, topology_alone, retry_alone, retry_no_budget, timeout_alone) =
            single_layers().await;
        let client = real_client::<false>().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Warm-up, then the measured rounds.
        for round in 0..=ROUNDS {
            let per_task = if round == 0 {
                per_task / 10 + 1
            } else {
                per_task
            };
            let results = [
                mt_round(&bare_service, TASKS, per_task, |s| s.oneshot(get())).await,
                mt_round(&rebuild_alone, TASKS, per_task, |s| s.oneshot(get())).await,
                mt_round(&topology_alone, TASKS, per_task, |s| s.oneshot(get())).await,
                mt_round(&retry_alone, TASKS, per_task, |s| s.oneshot(get())).await,
                mt_round(&retry_no_budget, TASKS, per_task, |s| s.oneshot(get())).await,
                mt_round(&timeout_alone, TASKS, per_task, |s| s.oneshot(get())).await,
                mt_round(&client, TASKS, per_task, |s| s.oneshot(get())).await,
                mt_round(
                    &client,
                    TASKS,
                    per_task,
                    |s| async move { s.send(get()).await },
                )
                .await,
            ];
            if round == 0 {
                continue;
            }
            for (i, (w, c)) in results.into_iter().enumerate() {
                let calls = (TASKS as u64 * per_task) as f64;
                // Two workers run the calls: thread time per call is twice the wall time.
                wall[i].push(w.as_nanos() as f64 * 2.0 / calls);
                match c {
                    Some(c) => cpu[i] += c,
                    None => cpu_known = false,
                }
            }
        }
    });
    let calls = (TASKS as u64 * per_task * ROUNDS as u64) as f64;
    let medians: Vec<f64> = wall
        .iter_mut()
        .map(|w| {
            w.sort_by(f64::total_cmp);
            w[w.len() / 2]
        })
        .collect();
    let cpu_ns: Vec<f64> = cpu.iter().map(|c| c.as_nanos() as f64 / calls).collect();
    println!();
    println!("== layers, multi-thread: 2 workers, {TASKS} tasks × {per_task} calls, {ROUNDS} interleaved rounds ==");
    println!(
        "{:<16} {:>10} {:>8} {:>12} {:>8}",
        "config", "cpu ns", "Δcpu", "thread ns", "Δthread"
    );
    for (i, name) in names.iter().enumerate() {
        let (c, dc) = if cpu_known {
            (
                format!("{:.1}", cpu_ns[i]),
                format!("{:.1}", cpu_ns[i] - cpu_ns[0]),
            )
        } else {
            ("-".into(), "-".into())
        };
        println!(
            "{:<16} {:>10} {:>8} {:>12.1} {:>8.1}",
            name,
            c,
            dc,
            medians[i],
            medians[i] - medians[0],
        );
    }
    println!("cpu ns: process CPU time / calls (10 ms ticks; the figure to use on a busy machine); thread ns: median over rounds of wall time × 2 workers / calls; Δ: against bare");
}

fn main() {
    // `cargo bench` passes `--bench`; anything else (`cargo test --benches`) is a quick smoke run.
    let benching = std::env::args().any(|a| a == "--bench");
    let calls: u64 = std::env::var("LAYERS_ALLOC_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if benching { 100_000 } else { 1_000 });

    if !benching {
        println!("layers: smoke run (no --bench, test profile): the figures below mean nothing");
    }
    let since = SystemTime::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let configs = configs(&rt);

    // `LAYERS_PROFILE=<config> [LAYERS_PROFILE_CALLS=n]`: only run that configuration's calls,
    // e.g. under `valgrind --tool=callgrind`, which counts instructions per function.
    if let Ok(name) = std::env::var("LAYERS_PROFILE") {
        let n = std::env::var("LAYERS_PROFILE_CALLS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100_000);
        let config = configs
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no configuration named {name}"));
        config.caller.call_many(&rt, n);
        println!("layers: ran {n} calls of {name}");
        return;
    }

    let per_task: u64 = std::env::var("LAYERS_MT_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if benching { 10_000 } else { 10 });
    // `LAYERS_ONLY_MT=1`: only the multi-thread table (a minute, not ten).
    if std::env::var("LAYERS_ONLY_MT").is_ok_and(|v| v != "0") {
        multi_thread_table(per_task);
        return;
    }

    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    let mut group = criterion.benchmark_group(GROUP);
    for config in &configs {
        config.caller.bench(&rt, &mut group, config.name);
    }
    group.finish();
    criterion.final_summary();

    allocation_table(&rt, &configs, calls, since);
    pipeline_table(&rt, calls / 10);

    multi_thread_table(per_task);
}
