//! The retry layer against real `redis-server` clusters: failovers, a crashed master, a
//! cluster that is down altogether. The stack is `Retry(Rebuild(RedisService))`.
//! Requires the `test-util` feature (the harness).

mod support;

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use redis::{Cmd, Value};
use support::{first_success, init_tracing, Load};
use tower::{retry::budget::TpsBudget, Service, ServiceExt};
use tower_redis_cluster::{
    connect::{ClusterConnector, Seeds},
    harness::LocalCluster,
    rebuild::{Rebuild, RebuildConfig},
    retry::{Retry, RetryConfig},
    Error, Sent,
};

const RECOVERY_LIMIT: Duration = Duration::from_secs(30);

/// Counts what goes through it: calls, and the errors that come back.
#[derive(Default, Debug)]
struct Counts {
    calls: AtomicU64,
    errors: AtomicU64,
    redirects: AtomicU64,
}

#[derive(Clone, Debug)]
struct Counted<S> {
    inner: S,
    counts: Arc<Counts>,
}

impl<S> Counted<S> {
    fn new(inner: S) -> (Self, Arc<Counts>) {
        let counts = Arc::new(Counts::default());
        (
            Counted {
                inner,
                counts: counts.clone(),
            },
            counts,
        )
    }
}

impl<S, Req> Service<Req> for Counted<S>
where
    S: Service<Req, Response = Value, Error = Error>,
    S::Future: Send + 'static,
{
    type Response = Value;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Value, Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, cmd: Req) -> Self::Future {
        self.counts.calls.fetch_add(1, Ordering::SeqCst);
        let counts = self.counts.clone();
        let call = self.inner.call(cmd);
        Box::pin(async move {
            let result = call.await;
            if let Err(e) = &result {
                counts.errors.fetch_add(1, Ordering::SeqCst);
                if e.kind().is_redirect() {
                    counts.redirects.fetch_add(1, Ordering::SeqCst);
                }
            }
            result
        })
    }
}

fn connector(cluster: &LocalCluster) -> ClusterConnector {
    ClusterConnector::new(Seeds::parse([cluster.seed()]).unwrap()).resolver(cluster.name_map())
}

/// `Retry(Counted(Rebuild(RedisService)))` on the cluster's configuration-endpoint name; the
/// counts are those of the attempts that reach the rebuild layer.
fn stack(
    connector: ClusterConnector,
    rebuild: RebuildConfig,
    retry: RetryConfig,
) -> (
    impl Service<Cmd, Response = Value, Error = Error, Future: Send> + Clone + Send + 'static,
    Arc<Counts>,
) {
    let (attempts, counts) = Counted::new(Rebuild::new(connector, rebuild));
    (Retry::new(attempts, retry), counts)
}

async fn call<S>(service: &mut S, cmd: Cmd) -> Result<Value, Error>
where
    S: Service<Cmd, Response = Value, Error = Error>,
{
    service.ready().await?.call(cmd).await
}

/// Graceful failovers of each shard in turn under SET/GET load: no error reaches a caller.
/// `inner_retries`: the inner cluster client's own retries (`None`: the connector's default).
async fn graceful_failovers_under_load(inner_retries: Option<u32>) {
    init_tracing();
    let mut cluster = support::cluster(3, 1).await;
    let mut connector = connector(&cluster);
    if let Some(retries) = inner_retries {
        connector = connector.inner_retries(retries);
    }
    let (service, attempts) = stack(connector, RebuildConfig::default(), RetryConfig::default());
    first_success(&service, RECOVERY_LIMIT).await.unwrap();

    let started = Instant::now();
    let load = Load::start(service.clone(), 8);
    for shard in 0..3 {
        let before = load.stats.ok.load(Ordering::SeqCst);
        let new_master = cluster.failover(shard).await.unwrap();
        // The load must be running through each failover, or "no errors" says nothing.
        let deadline = Instant::now() + RECOVERY_LIMIT;
        while load.stats.ok.load(Ordering::SeqCst) < before + 100 {
            assert!(Instant::now() < deadline, "shard {shard}: the load stalled");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        println!(
            "shard {shard} failed over to {} at {:?}",
            new_master.addr,
            started.elapsed()
        );
    }
    let stats = load.stop().await;
    let ok = stats.ok.load(Ordering::SeqCst);
    println!(
        "3 graceful failovers, inner retries {inner_retries:?}: {ok} ops in {:?}, {} errors \
         absorbed by retries ({} attempts for {} calls), slowest call {} ms",
        started.elapsed(),
        attempts.errors.load(Ordering::SeqCst),
        attempts.calls.load(Ordering::SeqCst),
        ok + stats.error_total(),
        stats.slowest_us.load(Ordering::SeqCst) / 1000,
    );
    assert!(ok > 0);
    assert_eq!(
        stats.error_total(),
        0,
        "errors reached the callers: {:?}",
        stats.errors()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_failover_of_every_shard_under_load_reaches_no_caller() {
    graceful_failovers_under_load(None).await;
}

/// The same with the inner client's own retries off, so the retry layer alone carries the
/// calls through the failovers (the inner client still refreshes its slot map on `MOVED`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_failovers_reach_no_caller_with_the_retry_layer_alone_in_charge() {
    graceful_failovers_under_load(Some(0)).await;
}

/// Per-counter tallies of one INCR worker.
#[derive(Default, Debug, Clone, Copy)]
struct Tally {
    acknowledged: u64,
    /// Failed with `Sent::Maybe`: the increment may or may not have been applied.
    ambiguous: u64,
    /// Failed with `Sent::No`: the increment was certainly not applied.
    refused: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incr_counters_stay_exact_within_ambiguity_when_a_master_is_killed() {
    init_tracing();
    let mut cluster = support::cluster(3, 1).await;
    let (service, attempts) = stack(
        connector(&cluster),
        RebuildConfig::default(),
        RetryConfig::default(),
    );
    first_success(&service, RECOVERY_LIMIT).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|task| {
            let mut service = service.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut tallies: HashMap<String, Tally> = HashMap::new();
                let mut kinds: HashMap<(&'static str, Sent), u64> = HashMap::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // 16 counters per task, spread over every shard's slots.
                    let key = format!("counter:{task}:{}", i % 16);
                    i += 1;
                    let mut incr = redis::cmd("INCR");
                    incr.arg(&key);
                    let tally = tallies.entry(key).or_default();
                    match call(&mut service, incr).await {
                        Ok(_) => tally.acknowledged += 1,
                        Err(e) => {
                            *kinds.entry((e.kind().as_str(), e.sent())).or_default() += 1;
                            match e.sent() {
                                Sent::No => tally.refused += 1,
                                Sent::Maybe => tally.ambiguous += 1,
                            }
                        }
                    }
                }
                (tallies, kinds)
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = cluster.master_of(0);
    let promoted = cluster.kill_master(0).await.unwrap();
    println!("killed {}, promoted {}", killed.addr, promoted.addr);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);

    let mut tallies: BTreeMap<String, Tally> = BTreeMap::new();
    let mut kinds: HashMap<(&'static str, Sent), u64> = HashMap::new();
    for worker in workers {
        let (t, k) = worker.await.unwrap();
        tallies.extend(t);
        for (kind, n) in k {
            *kinds.entry(kind).or_default() += n;
        }
    }
    cluster.wait_settled(RECOVERY_LIMIT).await.unwrap();

    let mut reader = service.clone();
    let (mut acknowledged, mut ambiguous, mut refused) = (0, 0, 0);
    for (key, tally) in &tallies {
        let mut get = redis::cmd("GET");
        get.arg(key);
        let value: u64 = match call(&mut reader, get).await.unwrap() {
            Value::Nil => 0,
            v => redis::from_redis_value(v).unwrap(),
        };
        assert!(
            tally.acknowledged <= value && value <= tally.acknowledged + tally.ambiguous,
            "{key}: {value} after {tally:?}"
        );
        acknowledged += tally.acknowledged;
        ambiguous += tally.ambiguous;
        refused += tally.refused;
    }
    println!(
        "INCR through a master crash: {} counters, {acknowledged} acknowledged, {ambiguous} \
         ambiguous, {refused} refused ({kinds:?}); {} errors absorbed by retries",
        tallies.len(),
        attempts
            .errors
            .load(Ordering::SeqCst)
            .saturating_sub(ambiguous + refused),
    );
    assert!(acknowledged > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_down_for_ten_seconds_costs_no_more_than_the_budget_and_no_call_overruns() {
    init_tracing();
    let mut cluster = support::cluster(3, 0).await;
    // No reserve; every call earns a quarter of a retry. Deposits and withdrawals stay in the
    // budget for at least half its 60 s window (it advances at most two of its ten 6 s slots
    // per slot length), far longer than this test, so over the whole test:
    //     retries ≤ ⌊calls / 4⌋      (redirections are free and counted apart).
    const RETRY_SHARE: u64 = 4;
    let budget = Arc::new(TpsBudget::new(Duration::from_secs(60), 0, 0.25));
    let deadline = Duration::from_secs(2);
    let retry = RetryConfig::default()
        .shared_budget(budget)
        .deadline(deadline);
    let rebuild = RebuildConfig::default()
        .max_wait(Duration::from_millis(500))
        .backoff(Duration::from_millis(50), Duration::from_millis(500))
        .unwrap();
    let (service, attempts) = stack(connector(&cluster), rebuild, retry);
    let (service, calls) = Counted::new(service);
    first_success(&service, RECOVERY_LIMIT).await.unwrap();

    cluster.stop_all().await.unwrap();
    let down = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let slowest = Arc::new(AtomicU64::new(0));
    let kinds = Arc::new(std::sync::Mutex::new(BTreeMap::<&'static str, u64>::new()));
    let workers: Vec<_> = (0..8)
        .map(|task| {
            let mut service = service.clone();
            let (stop, slowest, kinds) = (stop.clone(), slowest.clone(), kinds.clone());
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let mut cmd = redis::cmd(if i.is_multiple_of(2) { "GET" } else { "SET" });
                    cmd.arg(format!("down:{task}:{i}"));
                    if !i.is_multiple_of(2) {
                        cmd.arg(i);
                    }
                    // The deadline runs from `call`; waiting for readiness comes before it.
                    let ready = match service.ready().await {
                        Ok(ready) => ready,
                        Err(e) => panic!("readiness failed: {e}"),
                    };
                    let started = Instant::now();
                    let result = ready.call(cmd).await;
                    slowest.fetch_max(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                    if let Err(e) = result {
                        *kinds.lock().unwrap().entry(e.kind().as_str()).or_default() += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    let outage = down.elapsed();

    let calls = calls.calls.load(Ordering::SeqCst);
    let sent = attempts.calls.load(Ordering::SeqCst);
    let redirects = attempts.redirects.load(Ordering::SeqCst);
    let allowance = calls / RETRY_SHARE + redirects;
    let slowest = Duration::from_millis(slowest.load(Ordering::SeqCst));
    println!(
        "cluster down {outage:?}: {calls} calls, {sent} attempts (allowance {allowance} retries), \
         slowest call {slowest:?}, errors {:?}",
        kinds.lock().unwrap()
    );
    assert!(
        sent <= calls + allowance,
        "{sent} attempts for {calls} calls: more than the budget's {allowance} retries"
    );
    assert!(calls >= 40, "the load barely ran: {calls} calls");
    assert!(sent > calls, "no retry at all: was the budget ever used?");
    let slack = Duration::from_millis(300);
    assert!(
        slowest <= deadline + slack,
        "a call took {slowest:?}, past its {deadline:?} deadline"
    );

    cluster.start_all().await.unwrap();
    let back = Instant::now();
    first_success(&service, RECOVERY_LIMIT).await.unwrap();
    let mut set = redis::cmd("SET");
    set.arg("after-the-outage").arg(1);
    call(&mut service.clone(), set).await.unwrap();
    println!("serving again {:?} after start_all", back.elapsed());
}
