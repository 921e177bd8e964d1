//! The rebuild layer's own logic — single-flight, bounded waiting, make-before-break,
//! generations, backoff — with an in-memory inner service and paused time.
//! (Behaviour against a real cluster is in `tests/rebuild_cluster.rs`.)

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use redis::{Cmd, Value};
use tokio::time::Instant;
use tokio_test::{assert_pending, assert_ready_ok, task};
use tower::{Service, ServiceExt};
use tower_redis_cluster::{
    connect::{connect_fn, ConnectHints},
    rebuild::{Rebuild, RebuildConfig},
    Error, ErrorKind,
};

/// What a fake inner client answers.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Behaviour {
    Ok,
    Fail(ErrorKind),
    /// Answers only after `release` is notified.
    Hang,
}

#[derive(Clone)]
struct Fake {
    generation: u64,
    behaviour: Arc<Mutex<Behaviour>>,
    release: Arc<tokio::sync::Notify>,
}

impl Service<Cmd> for Fake {
    type Response = Value;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Value, Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Cmd) -> Self::Future {
        let behaviour = *self.behaviour.lock().unwrap();
        let generation = self.generation as i64;
        let release = self.release.clone();
        Box::pin(async move {
            match behaviour {
                Behaviour::Ok => Ok(Value::Int(generation)),
                Behaviour::Fail(kind) => Err(Error::new(kind, "fake failure")),
                Behaviour::Hang => {
                    release.notified().await;
                    Err(Error::new(ErrorKind::Unreachable, "late failure"))
                }
            }
        })
    }
}

/// A connector whose clients behave as told per generation, and that counts connects.
#[derive(Clone)]
struct Script {
    connects: Arc<AtomicUsize>,
    fail_connects: Arc<AtomicUsize>,
    connect_delay: Arc<Mutex<Duration>>,
    per_generation: Arc<Mutex<Vec<Arc<Mutex<Behaviour>>>>>,
    release: Arc<tokio::sync::Notify>,
    attempt_times: Arc<Mutex<Vec<Instant>>>,
}

impl Script {
    fn new() -> Self {
        Script {
            connects: Arc::default(),
            fail_connects: Arc::default(),
            connect_delay: Arc::new(Mutex::new(Duration::ZERO)),
            per_generation: Arc::default(),
            release: Arc::default(),
            attempt_times: Arc::default(),
        }
    }

    /// Behaviour of the client of `generation` (1-based); later generations default to Ok.
    fn behaviour(&self, generation: u64) -> Arc<Mutex<Behaviour>> {
        let mut all = self.per_generation.lock().unwrap();
        while all.len() < generation as usize {
            all.push(Arc::new(Mutex::new(Behaviour::Ok)));
        }
        all[generation as usize - 1].clone()
    }

    fn set(&self, generation: u64, b: Behaviour) {
        *self.behaviour(generation).lock().unwrap() = b;
    }

    fn service(
        &self,
        config: RebuildConfig,
    ) -> Rebuild<impl tower_redis_cluster::Connect<Service = Fake>> {
        let script = self.clone();
        let connector = connect_fn(move |hints: &ConnectHints| {
            let script = script.clone();
            let generation = hints.generation;
            async move {
                script.attempt_times.lock().unwrap().push(Instant::now());
                let delay = *script.connect_delay.lock().unwrap();
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                if script
                    .fail_connects
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    return Err(Error::new(
                        ErrorKind::Connection,
                        "seed refused the connection",
                    ));
                }
                script.connects.fetch_add(1, Ordering::SeqCst);
                Ok(Fake {
                    generation,
                    behaviour: script.behaviour(generation),
                    release: script.release.clone(),
                })
            }
        });
        Rebuild::new(connector, config)
    }
}

async fn get(
    svc: &mut Rebuild<impl tower_redis_cluster::Connect<Service = Fake>>,
) -> Result<Value, Error> {
    svc.ready().await?.call(redis::cmd("GET")).await
}

#[tokio::test(start_paused = true)]
async fn lazy_start_serves_the_first_call_once_connected() {
    let script = Script::new();
    script.fail_connects.store(2, Ordering::SeqCst);
    let mut svc = script.service(RebuildConfig::default());
    // Two failed connects back off (≤ 100 ms + ≤ 200 ms) well inside the 2 s max_wait.
    assert_eq!(get(&mut svc).await.unwrap(), Value::Int(1));
    assert_eq!(script.attempt_times.lock().unwrap().len(), 3);
    assert_eq!(svc.handle().generation(), 1);
}

#[tokio::test(start_paused = true)]
async fn poll_ready_is_pending_while_no_client_exists_and_fails_after_max_wait() {
    let script = Script::new();
    script.fail_connects.store(usize::MAX, Ordering::SeqCst);
    let max_wait = Duration::from_millis(750);
    let svc = script.service(RebuildConfig::default().max_wait(max_wait));

    let mut ready = task::spawn(svc.clone().ready_oneshot());
    assert_pending!(ready.poll());

    let started = Instant::now();
    let mut svc = svc;
    let err = get(&mut svc).await.unwrap_err();
    let waited = started.elapsed();
    assert_eq!(err.kind(), ErrorKind::Unreachable);
    assert!(
        waited >= max_wait && waited < max_wait + Duration::from_millis(5),
        "{waited:?}"
    );
    // The caller learns why: the last connect failure is the source.
    assert!(
        err.to_string().contains("seed refused the connection"),
        "{err}"
    );
    assert_eq!(script.connects.load(Ordering::SeqCst), 0);
}

/// `n` calls in flight together on the current client: each clone reserves it first, so
/// every call really reaches it.
async fn in_flight_together(
    svc: &Rebuild<impl tower_redis_cluster::Connect<Service = Fake>>,
    n: usize,
) -> Vec<Result<Value, Error>> {
    let mut callers = Vec::new();
    for _ in 0..n {
        let mut s = svc.clone();
        s.ready().await.unwrap();
        callers.push(s);
    }
    futures_util::future::join_all(callers.iter_mut().map(|s| s.call(redis::cmd("GET")))).await
}

#[tokio::test(start_paused = true)]
async fn two_hundred_failing_callers_cause_exactly_one_rebuild() {
    let script = Script::new();
    script.set(1, Behaviour::Fail(ErrorKind::Unreachable));
    let svc = script.service(RebuildConfig::default().max_wait(Duration::from_secs(5)));
    let handle = svc.handle();
    handle
        .wait_for_generation(1, Duration::from_secs(1))
        .await
        .unwrap();

    let results = in_flight_together(&svc, 200).await;
    assert!(results
        .iter()
        .all(|r| r.as_ref().unwrap_err().kind() == ErrorKind::Unreachable));
    assert!(results
        .iter()
        .all(|r| r.as_ref().unwrap_err().generation() == Some(1)));

    handle
        .wait_for_generation(2, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(
        script.connects.load(Ordering::SeqCst),
        2,
        "first connect + one rebuild"
    );
    assert_eq!(get(&mut svc.clone()).await.unwrap(), Value::Int(2));
    // Nothing else is in flight.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(script.connects.load(Ordering::SeqCst), 2);
    assert_eq!(handle.status().rebuilds, 2);
}

#[tokio::test(start_paused = true)]
async fn errors_from_an_older_generation_never_start_another_rebuild() {
    let script = Script::new();
    script.set(1, Behaviour::Hang);
    let mut svc = script.service(RebuildConfig::default());
    let handle = svc.handle();
    handle
        .wait_for_generation(1, Duration::from_secs(1))
        .await
        .unwrap();

    // A call on generation 1 is in flight...
    svc.ready().await.unwrap();
    let late = tokio::spawn(svc.call(redis::cmd("GET")));
    tokio::task::yield_now().await;
    // ...while generation 2 takes over.
    handle.rebuild();
    handle
        .wait_for_generation(2, Duration::from_secs(1))
        .await
        .unwrap();

    // Now the old call fails with Unreachable — the error that would normally replace.
    script.release.notify_waiters();
    let err = late.await.unwrap().unwrap_err();
    assert_eq!(err.generation(), Some(1));
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(script.connects.load(Ordering::SeqCst), 2);
    assert_eq!(handle.generation(), 2);
    assert_eq!(get(&mut svc).await.unwrap(), Value::Int(2));
}

#[tokio::test(start_paused = true)]
async fn make_before_break_keeps_the_old_client_serving_during_a_rebuild() {
    let script = Script::new();
    let mut svc = script.service(RebuildConfig::default());
    let handle = svc.handle();
    handle
        .wait_for_generation(1, Duration::from_secs(1))
        .await
        .unwrap();

    *script.connect_delay.lock().unwrap() = Duration::from_secs(1);
    handle.rebuild();
    assert!(handle.status().rebuilding);
    // While the new client connects, calls are served at once by generation 1.
    let started = Instant::now();
    assert_eq!(get(&mut svc).await.unwrap(), Value::Int(1));
    assert!(started.elapsed() < Duration::from_millis(1));

    handle
        .wait_for_generation(2, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(get(&mut svc).await.unwrap(), Value::Int(2));
}

#[tokio::test(start_paused = true)]
async fn unreachable_retires_the_client_and_new_calls_wait_for_the_next() {
    let script = Script::new();
    script.set(1, Behaviour::Fail(ErrorKind::Unreachable));
    let mut svc = script.service(RebuildConfig::default().max_wait(Duration::from_secs(2)));
    let handle = svc.handle();
    handle
        .wait_for_generation(1, Duration::from_secs(1))
        .await
        .unwrap();
    *script.connect_delay.lock().unwrap() = Duration::from_millis(300);

    assert_eq!(
        get(&mut svc).await.unwrap_err().kind(),
        ErrorKind::Unreachable
    );
    assert!(!handle.status().serving);

    // The next caller does not hit the retired client: it waits ~300 ms and succeeds.
    let started = Instant::now();
    assert_eq!(get(&mut svc).await.unwrap(), Value::Int(2));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn connection_error_streak_rebuilds_but_keeps_serving() {
    let script = Script::new();
    script.set(1, Behaviour::Fail(ErrorKind::Connection));
    let mut svc = script.service(RebuildConfig::default());
    let handle = svc.handle();
    handle
        .wait_for_generation(1, Duration::from_secs(1))
        .await
        .unwrap();

    for _ in 0..4 {
        assert_eq!(
            get(&mut svc).await.unwrap_err().kind(),
            ErrorKind::Connection
        );
    }
    assert!(
        !handle.status().rebuilding,
        "4 errors are below the default threshold of 5"
    );
    assert_eq!(
        get(&mut svc).await.unwrap_err().kind(),
        ErrorKind::Connection
    );
    handle
        .wait_for_generation(2, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(get(&mut svc).await.unwrap(), Value::Int(2));
}

/// One dead node of many: the calls in flight to it time out together, while calls to the
/// other nodes go on succeeding. That burst is one failure, not a streak: it does not make a
/// new client (which would dial the dead node too).
#[tokio::test(start_paused = true)]
async fn timeouts_of_calls_in_flight_together_count_once() {
    let script = Script::new();
    script.set(1, Behaviour::Fail(ErrorKind::Timeout));
    let svc = script.service(RebuildConfig::default());
    let handle = svc.handle();
    handle
        .wait_for_generation(1, Duration::from_secs(1))
        .await
        .unwrap();

    let results = in_flight_together(&svc, 20).await;
    assert!(results
        .iter()
        .all(|r| r.as_ref().unwrap_err().kind() == ErrorKind::Timeout));
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(handle.generation(), 1, "a burst of 20 made a new client");
    assert_eq!(script.connects.load(Ordering::SeqCst), 1);

    // Failures of calls one after another still add up to the threshold of 5: four more.
    let mut svc = svc;
    for _ in 0..4 {
        assert_eq!(get(&mut svc).await.unwrap_err().kind(), ErrorKind::Timeout);
    }
    handle
        .wait_for_generation(2, Duration::from_secs(1))
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn failed_connects_back_off_with_growing_jittered_delays() {
    let script = Script::new();
    script.fail_connects.store(6, Ordering::SeqCst);
    let svc = script.service(
        RebuildConfig::default()
            .backoff(Duration::from_millis(100), Duration::from_secs(1))
            .unwrap(),
    );
    svc.handle()
        .wait_for_generation(1, Duration::from_secs(30))
        .await
        .unwrap();
    let times = script.attempt_times.lock().unwrap().clone();
    assert_eq!(times.len(), 7);
    for (i, pair) in times.windows(2).enumerate() {
        let gap = pair[1] - pair[0];
        let ceiling =
            (Duration::from_millis(100) * 2u32.pow(i as u32 + 1)).min(Duration::from_secs(1));
        assert!(gap >= Duration::from_millis(100), "gap {i}: {gap:?}");
        assert!(
            gap <= ceiling + Duration::from_millis(1),
            "gap {i}: {gap:?} > {ceiling:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn dropping_every_clone_stops_the_rebuild_task() {
    let script = Script::new();
    script.fail_connects.store(usize::MAX, Ordering::SeqCst);
    let svc = script.service(RebuildConfig::default());
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(svc);
    let attempts = script.attempt_times.lock().unwrap().len();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(script.attempt_times.lock().unwrap().len() <= attempts + 1);
}

#[tokio::test(start_paused = true)]
async fn invalid_configuration_is_reported_by_the_first_call() {
    let script = Script::new();
    let mut svc = script.service(RebuildConfig::default().connect_timeout(Duration::ZERO));
    let err = get(&mut svc).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    // Every clone says so too (a `Client` calls only through clones), and none connects.
    for _ in 0..2 {
        let err = get(&mut svc.clone()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
    }
    assert_eq!(script.attempt_times.lock().unwrap().len(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_clone_starts_unreserved() {
    let script = Script::new();
    let mut svc = script.service(RebuildConfig::default());
    svc.handle()
        .wait_for_generation(1, Duration::from_secs(1))
        .await
        .unwrap();
    let mut ready = task::spawn(async { svc.ready().await.map(|_| ()) });
    assert_ready_ok!(ready.poll());
    drop(ready);
    // call() on a clone that never became ready is a typed error, not a panic.
    let mut clone = svc.clone();
    let err = clone.call(redis::cmd("GET")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_connector_that_panics_fails_one_attempt_and_the_rebuild_goes_on() {
    // The in-flight mark used to be cleared only by a successful install: a panicking connect
    // left it set, and no rebuild ever started again.
    let panics = Arc::new(AtomicUsize::new(2));
    let left = panics.clone();
    let mut svc = Rebuild::new(
        connect_fn(move |hints: &ConnectHints| {
            let panic_now = left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            let generation = hints.generation;
            async move {
                assert!(!panic_now, "a bug in the user's connector");
                Ok(Fake {
                    generation,
                    behaviour: Arc::new(Mutex::new(Behaviour::Ok)),
                    release: Arc::default(),
                })
            }
        }),
        RebuildConfig::default(),
    );
    // The caller hears of the bug at once (it is not a passing condition)...
    let err = get(&mut svc).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed, "{err}");
    assert!(err.to_string().contains("panicked"), "{err}");
    // ...and the rebuild carries on behind it, backing off, until a connect works.
    let mut status = svc.handle().subscribe();
    status.wait_for(|s| s.generation == 1).await.unwrap();
    assert_eq!(get(&mut svc).await.unwrap(), Value::Int(1));
    assert_eq!(svc.handle().status().attempts, 3);
    assert_eq!(panics.load(Ordering::SeqCst), 0);
}

#[test]
fn a_rebuild_cut_short_by_its_runtime_starts_again_on_the_next() {
    // The rebuild task of the first runtime is dropped mid-backoff when that runtime shuts
    // down; the service lives on and must not wait for a rebuild nobody runs.
    let script = Script::new();
    script.fail_connects.store(1, Ordering::SeqCst);
    let first = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut svc = first.block_on(async {
        let svc = script.service(RebuildConfig::default().max_wait(Duration::from_secs(30)));
        // The first connect fails; the task now sleeps its backoff.
        let mut status = svc.handle().subscribe();
        status.wait_for(|s| s.attempts >= 1).await.unwrap();
        svc
    });
    drop(first);
    assert!(
        !svc.handle().status().rebuilding,
        "the dropped task took its in-flight mark with it"
    );
    let second = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    second.block_on(async {
        let reply = tokio::time::timeout(Duration::from_secs(10), get(&mut svc))
            .await
            .expect("the second runtime starts a rebuild of its own");
        assert_eq!(reply.unwrap(), Value::Int(1));
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_connect_failure_reaches_a_waiting_caller_at_once() {
    // Waiters looked at the last error before subscribing to status changes: a failure recorded
    // in between (by the rebuild task, running on the other worker) was seen only at max_wait.
    for round in 0..50 {
        let svc = Rebuild::new(
            connect_fn(|_: &ConnectHints| async {
                tokio::task::yield_now().await;
                Err::<Fake, _>(Error::new(ErrorKind::Auth, "WRONGPASS"))
            }),
            RebuildConfig::default()
                .max_wait(Duration::from_secs(30))
                .backoff(Duration::from_micros(50), Duration::from_micros(200))
                .unwrap()
                .eager(false),
        );
        let callers: Vec<_> = (0..16)
            .map(|_| {
                let mut svc = svc.clone();
                tokio::spawn(async move {
                    for _ in 0..20 {
                        let started = std::time::Instant::now();
                        let err = tokio::time::timeout(Duration::from_secs(5), get(&mut svc))
                            .await
                            .expect("a caller waited for max_wait")
                            .unwrap_err();
                        assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
                        assert!(started.elapsed() < Duration::from_secs(5));
                        svc = svc.clone();
                    }
                })
            })
            .collect();
        for caller in callers {
            caller
                .await
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
    }
}
