//! The retry layer's own logic — the decision matrix, backoff, budget, deadline, redirections,
//! pipelines and overrides — with a scripted inner service and paused time.
//! (Behaviour against a real cluster is in `tests/retry_cluster.rs`.)

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    io,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use redis::{Cmd, Pipeline, Value};
use tokio::time::Instant;
use tower::{
    retry::{budget::TpsBudget, Policy},
    Service, ServiceBuilder, ServiceExt,
};
use tower_redis_cluster::{
    classify,
    retry::{
        Action, Attempt, CallPolicy, Retry, RetryConfig, RetryLayer, RetryPolicy,
        StandardRetryPolicy,
    },
    Error, ErrorKind, Idempotency, IdempotencyTable, Sent,
};

// ---------------------------------------------------------------------------------------------
// A scripted inner service
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Outcome {
    Ok,
    Fail(ErrorKind, Sent),
    /// A server's error reply, classified as the real service would.
    Reply(&'static str),
}

/// One reply of the fake: an outcome, after a while.
#[derive(Clone, Copy, Debug)]
struct Reply {
    after: Duration,
    outcome: Outcome,
}

fn ok() -> Reply {
    Reply {
        after: Duration::ZERO,
        outcome: Outcome::Ok,
    }
}

fn fail(kind: ErrorKind, sent: Sent) -> Reply {
    Reply {
        after: Duration::ZERO,
        outcome: Outcome::Fail(kind, sent),
    }
}

impl Reply {
    fn after(mut self, after: Duration) -> Self {
        self.after = after;
        self
    }
}

#[derive(Debug)]
struct Script {
    /// Replies for the next calls, in order...
    next: VecDeque<Reply>,
    /// ...and for every call after them.
    then: Reply,
    /// When each call was made, and its key (first argument after the name).
    calls: Vec<(Instant, String)>,
}

/// A service that answers as scripted, the same for `Cmd` and `Pipeline`, and records calls.
#[derive(Clone, Debug)]
struct Fake {
    script: Arc<Mutex<Script>>,
}

impl Fake {
    fn always(reply: Reply) -> Self {
        Fake::script([], reply)
    }

    fn script(next: impl IntoIterator<Item = Reply>, then: Reply) -> Self {
        Fake {
            script: Arc::new(Mutex::new(Script {
                next: next.into_iter().collect(),
                then,
                calls: Vec::new(),
            })),
        }
    }

    fn calls(&self) -> usize {
        self.script.lock().unwrap().calls.len()
    }

    fn call_times(&self) -> Vec<Instant> {
        self.script
            .lock()
            .unwrap()
            .calls
            .iter()
            .map(|c| c.0)
            .collect()
    }

    fn calls_by_key(&self) -> HashMap<String, Vec<Instant>> {
        let mut by_key: HashMap<String, Vec<Instant>> = HashMap::new();
        for (at, key) in &self.script.lock().unwrap().calls {
            by_key.entry(key.clone()).or_default().push(*at);
        }
        by_key
    }

    fn answer(&self, key: String) -> Pin<Box<dyn Future<Output = Result<(), Error>> + Send>> {
        let reply = {
            let mut script = self.script.lock().unwrap();
            script.calls.push((Instant::now(), key));
            let then = script.then;
            script.next.pop_front().unwrap_or(then)
        };
        Box::pin(async move {
            if !reply.after.is_zero() {
                tokio::time::sleep(reply.after).await;
            }
            match reply.outcome {
                Outcome::Ok => Ok(()),
                Outcome::Fail(kind, sent) => {
                    Err(Error::new(kind, "scripted failure").with_sent(sent))
                }
                Outcome::Reply(raw) => Err(Error::from_redis(
                    redis::parse_redis_value(raw.as_bytes())
                        .unwrap()
                        .extract_error()
                        .unwrap_err(),
                )),
            }
        })
    }
}

fn key_of(cmd: &Cmd) -> String {
    match cmd.args_iter().nth(1) {
        Some(redis::Arg::Simple(key)) => String::from_utf8_lossy(key).into_owned(),
        _ => String::new(),
    }
}

/// The retry layer shares its request with the layers below it.
impl Service<Arc<Cmd>> for Fake {
    type Response = Value;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Value, Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, cmd: Arc<Cmd>) -> Self::Future {
        let answer = self.answer(key_of(&cmd));
        Box::pin(async move { answer.await.map(|()| Value::Okay) })
    }
}

impl Service<Arc<Pipeline>> for Fake {
    type Response = Vec<Value>;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Vec<Value>, Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, pipeline: Arc<Pipeline>) -> Self::Future {
        let n = pipeline.len();
        let answer = self.answer(String::from("pipeline"));
        Box::pin(async move { answer.await.map(|()| vec![Value::Okay; n]) })
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const FLOOR: Duration = Duration::from_millis(10);
const CAP: Duration = Duration::from_millis(200);

/// No budget and no deadline, so a test sees one rule at a time.
fn plain() -> RetryConfig {
    RetryConfig::default()
        .without_budget()
        .deadline(None)
        .backoff(FLOOR, CAP)
        .unwrap()
}

fn cmd(line: &str) -> Cmd {
    let mut words = line.split_whitespace();
    let mut cmd = redis::cmd(words.next().unwrap());
    for word in words {
        cmd.arg(word);
    }
    cmd
}

async fn send<S, Req>(service: &mut S, request: Req) -> Result<S::Response, Error>
where
    S: Service<Req, Error = Error>,
{
    service.ready().await?.call(request).await
}

// ---------------------------------------------------------------------------------------------
// The decision matrix
// ---------------------------------------------------------------------------------------------

/// What the standard policy does with each kind, restated here rather than derived from the
/// code under test.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Rule {
    /// Retried up to `max_retries` times.
    Transient,
    /// Followed up to `max_redirects` times, at once.
    Redirect,
    /// Never sent again.
    Final,
}

const KINDS: [(ErrorKind, Rule); 14] = [
    (ErrorKind::Moved, Rule::Redirect),
    (ErrorKind::Ask, Rule::Redirect),
    (ErrorKind::TryAgain, Rule::Transient),
    (ErrorKind::ClusterDown, Rule::Transient),
    (ErrorKind::Loading, Rule::Transient),
    (ErrorKind::MasterDown, Rule::Transient),
    (ErrorKind::ReadOnly, Rule::Transient),
    (ErrorKind::Connection, Rule::Transient),
    (ErrorKind::Timeout, Rule::Transient),
    (ErrorKind::Unreachable, Rule::Transient),
    (ErrorKind::Auth, Rule::Final),
    (ErrorKind::Command, Rule::Final),
    (ErrorKind::Config, Rule::Final),
    (ErrorKind::Closed, Rule::Final),
];

#[tokio::test(start_paused = true)]
async fn decision_matrix_kind_by_idempotency_by_sent() {
    const MAX_RETRIES: u32 = 2;
    const MAX_REDIRECTS: u32 = 4;
    let commands = [
        ("GET k", Idempotency::ReadOnly),
        ("SET k v", Idempotency::Idempotent),
        ("INCR k", Idempotency::NonIdempotent),
    ];
    let mut rows = 0;
    for (kind, rule) in KINDS {
        for (line, idempotency) in commands {
            assert_eq!(classify(&cmd(line)), idempotency, "{line}");
            for sent in [Sent::No, Sent::Maybe] {
                let expected = match rule {
                    Rule::Final => 1,
                    _ if idempotency == Idempotency::NonIdempotent && sent == Sent::Maybe => 1,
                    Rule::Transient => 1 + MAX_RETRIES as usize,
                    Rule::Redirect => 1 + MAX_REDIRECTS as usize,
                };
                let fake = Fake::always(fail(kind, sent));
                let mut retry = Retry::new(
                    fake.clone(),
                    plain()
                        .max_retries(MAX_RETRIES)
                        .max_redirects(MAX_REDIRECTS),
                );
                let err = send(&mut retry, cmd(line)).await.unwrap_err();
                assert_eq!(
                    fake.calls(),
                    expected,
                    "{kind:?} × {idempotency:?} × {sent:?}: inner calls"
                );
                assert_eq!(err.sent(), sent, "{kind:?} × {idempotency:?} × {sent:?}");
                if rule == Rule::Redirect {
                    // A redirection never reaches the caller as such: one still not followed
                    // at the end means the shard has no reachable master yet, with the
                    // redirection as its cause.
                    assert_eq!(err.kind(), ErrorKind::MasterDown, "{kind:?}: {err}");
                    assert!(err.to_string().contains("scripted failure"), "{err}");
                } else {
                    // The caller gets the failure itself, not a wrapper of ours.
                    assert_eq!(err.kind(), kind, "{kind:?} × {idempotency:?} × {sent:?}");
                    assert_eq!(err.message(), Some("scripted failure"));
                }
                rows += 1;
            }
        }
    }
    assert_eq!(rows, 14 * 3 * 2);
}

#[tokio::test(start_paused = true)]
async fn a_transient_failure_that_clears_is_invisible_to_the_caller() {
    let fake = Fake::script(
        [
            fail(ErrorKind::ClusterDown, Sent::No),
            fail(ErrorKind::TryAgain, Sent::No),
        ],
        ok(),
    );
    let mut retry = Retry::new(fake.clone(), plain());
    assert_eq!(send(&mut retry, cmd("INCR k")).await.unwrap(), Value::Okay);
    assert_eq!(fake.calls(), 3);
}

// ---------------------------------------------------------------------------------------------
// Backoff
// ---------------------------------------------------------------------------------------------

/// The longest wait before the `retry`-th retry (1-based): `floor · 2^retry`, at most the cap.
/// Every wait is drawn from `[FLOOR, ceiling(retry)]`, the first one's from `[FLOOR, 2 · FLOOR]`.
fn ceiling(retry: u32) -> Duration {
    (FLOOR * 2u32.pow(retry)).min(CAP)
}

#[tokio::test(start_paused = true)]
async fn backoff_delays_stay_within_floor_and_growing_ceiling_over_many_draws() {
    let template = StandardRetryPolicy::new(plain().max_retries(10));
    let mut per_retry: Vec<Vec<Duration>> = vec![Vec::new(); 10];
    for _ in 0..500 {
        // Driven through tower's `Policy` trait, as the service does.
        let mut call = CallPolicy::new(template.clone());
        let mut request = Arc::new(cmd("GET k"));
        for retry in 1..=10u32 {
            let mut result: Result<Value, Error> =
                Err(Error::new(ErrorKind::TryAgain, "x").with_sent(Sent::No));
            let delay = Policy::retry(&mut call, &mut request, &mut result)
                .expect("a transient failure within max_retries is retried")
                .duration();
            assert!(delay >= FLOOR, "retry {retry}: {delay:?} below the floor");
            assert!(
                delay <= ceiling(retry),
                "retry {retry}: {delay:?} above {:?}",
                ceiling(retry)
            );
            per_retry[retry as usize - 1].push(delay);
        }
        let mut result: Result<Value, Error> =
            Err(Error::new(ErrorKind::TryAgain, "x").with_sent(Sent::No));
        assert!(
            Policy::retry(&mut call, &mut request, &mut result).is_none(),
            "an 11th attempt after max_retries = 10"
        );
    }
    // Full jitter: every retry's draws cover their whole range, the first retry's included.
    for (i, draws) in per_retry.iter().enumerate() {
        let retry = i as u32 + 1;
        let span = ceiling(retry) - FLOOR;
        let min = *draws.iter().min().unwrap();
        let max = *draws.iter().max().unwrap();
        assert!(
            min < FLOOR + span / 10,
            "retry {retry}: lowest draw {min:?}"
        );
        assert!(
            max > ceiling(retry) - span / 10,
            "retry {retry}: highest draw {max:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn concurrent_calls_do_not_retry_in_lock_step() {
    // 100 callers hit the same failover at the same instant. Their retries must spread out,
    // or they all come back together.
    let fake = Fake::always(fail(ErrorKind::ClusterDown, Sent::No));
    let retry = Retry::new(fake.clone(), plain().max_retries(4));
    let calls: Vec<_> = (0..100)
        .map(|i| {
            let mut retry = retry.clone();
            tokio::spawn(async move { send(&mut retry, cmd(&format!("GET k{i}"))).await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap_err();
    }
    let by_key = fake.calls_by_key();
    assert_eq!(by_key.len(), 100);
    let (mut first_gaps, mut third_gaps) = (Vec::new(), Vec::new());
    for times in by_key.values() {
        assert_eq!(times.len(), 5);
        for (i, pair) in times.windows(2).enumerate() {
            let gap = pair[1] - pair[0];
            let retry = i as u32 + 1;
            // The timer fires on whole milliseconds.
            assert!(gap >= FLOOR, "retry {retry}: {gap:?}");
            assert!(gap <= ceiling(retry) + Duration::from_millis(1), "{gap:?}");
            match retry {
                1 => first_gaps.push(gap),
                3 => third_gaps.push(gap),
                _ => {}
            }
        }
    }
    // Even the first retries spread over [FLOOR, 2 · FLOOR] (11 whole milliseconds).
    first_gaps.sort();
    first_gaps.dedup();
    assert!(
        first_gaps.len() >= 5,
        "first retries came at only {} distinct delays: {first_gaps:?}",
        first_gaps.len()
    );
    third_gaps.sort();
    third_gaps.dedup();
    assert!(
        third_gaps.len() >= 10,
        "third retries came at only {} distinct delays: {third_gaps:?}",
        third_gaps.len()
    );
}

// ---------------------------------------------------------------------------------------------
// Budget
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn an_empty_budget_returns_the_original_error_and_stops_retrying() {
    // 10 retries in reserve (1 per second over 10 s), nothing earned by calls.
    let budget = Arc::new(TpsBudget::new(Duration::from_secs(10), 1, 0.0));
    let fake = Fake::always(fail(ErrorKind::TryAgain, Sent::No));
    let mut retry = Retry::new(
        fake.clone(),
        plain()
            .max_retries(3)
            .backoff(Duration::from_millis(1), Duration::from_millis(5))
            .unwrap()
            .shared_budget(budget.clone()),
    );
    let mut attempts_per_call = Vec::new();
    for _ in 0..20 {
        let before = fake.calls();
        let err = send(&mut retry, cmd("GET k")).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TryAgain);
        assert_eq!(err.message(), Some("scripted failure"));
        attempts_per_call.push(fake.calls() - before);
    }
    // 3 + 3 + 3 + 1 retries (max_retries = 3) use up the reserve of 10; then first attempts
    // only.
    let mut expected = vec![4, 4, 4, 2];
    expected.resize(20, 1);
    assert_eq!(attempts_per_call, expected);
    assert_eq!(fake.calls(), 20 + 10);
}

#[tokio::test(start_paused = true)]
async fn every_call_earns_budget_for_later_retries() {
    // No reserve; each call deposits 1, each retry costs 2 (retry_percent 0.5).
    let budget = TpsBudget::new(Duration::from_secs(10), 0, 0.5);
    let fake = Fake::script((0..10).map(|_| ok()), fail(ErrorKind::Loading, Sent::No));
    let mut retry = Retry::new(
        fake.clone(),
        plain()
            .max_retries(3)
            .backoff(Duration::from_millis(1), Duration::from_millis(5))
            .unwrap()
            .budget(budget),
    );
    for _ in 0..10 {
        send(&mut retry, cmd("GET k")).await.unwrap();
    }
    let mut attempts_per_call = Vec::new();
    for _ in 0..6 {
        let before = fake.calls();
        send(&mut retry, cmd("GET k")).await.unwrap_err();
        attempts_per_call.push(fake.calls() - before);
    }
    // Balance 10 (+1 per failing call), max_retries = 3: 11 → 3 retries → 5; 6 → 3 → 0; 1 → none;
    // 2 → one → 0; 1 → none; 2 → one.
    assert_eq!(attempts_per_call, [4, 4, 1, 2, 1, 2]);
}

#[tokio::test(start_paused = true)]
async fn redirections_do_not_spend_budget() {
    // A budget that can never pay for a retry.
    let budget = TpsBudget::new(Duration::from_secs(10), 0, 0.0);
    let fake = Fake::script(
        [
            fail(ErrorKind::Moved, Sent::No),
            fail(ErrorKind::Ask, Sent::No),
        ],
        ok(),
    );
    let mut retry = Retry::new(fake.clone(), plain().budget(budget));
    send(&mut retry, cmd("SET k v")).await.unwrap();
    assert_eq!(fake.calls(), 3);
}

// ---------------------------------------------------------------------------------------------
// Deadline
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn no_retry_starts_after_the_deadline_and_the_call_ends_by_it() {
    let deadline = Duration::from_secs(1);
    for _ in 0..50 {
        // Each attempt takes 150 ms to fail; backoffs grow from 50 ms to 400 ms.
        let fake =
            Fake::always(fail(ErrorKind::Unreachable, Sent::No).after(Duration::from_millis(150)));
        let mut retry = Retry::new(
            fake.clone(),
            plain()
                .max_retries(50)
                .backoff(Duration::from_millis(50), Duration::from_millis(400))
                .unwrap()
                .deadline(deadline),
        );
        let started = Instant::now();
        let err = send(&mut retry, cmd("GET k")).await.unwrap_err();
        let took = started.elapsed();
        assert!(took <= deadline, "the call took {took:?}");
        let times = fake.call_times();
        assert!(times.len() >= 3, "only {} attempts", times.len());
        for t in &times {
            assert!(
                *t - started < deadline,
                "an attempt started at {:?}",
                *t - started
            );
        }
        match err.kind() {
            // The next backoff would have ended past the deadline: the last failure itself.
            ErrorKind::Unreachable => assert_eq!(err.message(), Some("scripted failure")),
            // The last retry was still running at the deadline: abandoned, maybe applied.
            ErrorKind::Timeout => {
                assert_eq!(took, deadline);
                assert_eq!(err.sent(), Sent::Maybe);
                assert!(err.to_string().contains("scripted failure"), "{err}");
            }
            other => panic!("unexpected {other:?}: {err}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_backoff_that_would_end_after_the_deadline_is_not_started() {
    let fake = Fake::always(fail(ErrorKind::TryAgain, Sent::No));
    let mut retry = Retry::new(
        fake.clone(),
        plain()
            .backoff(Duration::from_millis(200), Duration::from_millis(200))
            .unwrap()
            .deadline(Duration::from_millis(100)),
    );
    let started = Instant::now();
    let err = send(&mut retry, cmd("GET k")).await.unwrap_err();
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(fake.calls(), 1);
    assert_eq!(err.kind(), ErrorKind::TryAgain);
}

#[tokio::test(start_paused = true)]
async fn a_retry_in_flight_at_the_deadline_is_abandoned_as_maybe_applied() {
    let fake = Fake::script(
        [fail(ErrorKind::Connection, Sent::No)],
        ok().after(Duration::from_secs(10)),
    );
    let mut retry = Retry::new(fake.clone(), plain().deadline(Duration::from_millis(500)));
    let started = Instant::now();
    let err = send(&mut retry, cmd("INCR k")).await.unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_millis(500));
    assert_eq!(fake.calls(), 2);
    assert_eq!(err.kind(), ErrorKind::Timeout);
    // The retry was sent: it may have been applied, whatever the first attempt said.
    assert_eq!(err.sent(), Sent::Maybe);
    assert!(err.to_string().contains("scripted failure"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn waiting_for_readiness_before_a_retry_ends_at_the_deadline_with_the_original_error() {
    let (mock, mut handle) = tower_test::mock::pair::<Arc<Cmd>, Value>();
    handle.allow(1);
    fn ours(error: tower::BoxError) -> Error {
        Error::from(error)
    }
    let inner = ServiceBuilder::new()
        .map_err(ours as fn(tower::BoxError) -> Error)
        .service(mock);
    let mut retry = Retry::new(inner, plain().deadline(Duration::from_millis(300)));
    let started = Instant::now();
    let call = send(&mut retry, cmd("GET k"));
    let cluster = async {
        let (_, reply) = handle.next_request().await.unwrap();
        reply.send_error(Error::new(ErrorKind::ClusterDown, "first").with_sent(Sent::No));
        // No further request is allowed: the retry waits in poll_ready until the deadline.
    };
    let (result, ()) = tokio::join!(call, cluster);
    let err = result.unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_millis(300));
    assert_eq!(err.kind(), ErrorKind::ClusterDown);
    assert_eq!(err.message(), Some("first"));
    assert_eq!(err.sent(), Sent::No);
}

#[tokio::test(start_paused = true)]
async fn the_first_attempt_is_not_cut_by_the_retry_deadline() {
    // Cutting the first attempt is the timeout layer's job: without a failure, Retry is
    // transparent.
    let fake = Fake::always(ok().after(Duration::from_secs(2)));
    let mut retry = Retry::new(fake.clone(), plain().deadline(Duration::from_secs(1)));
    let started = Instant::now();
    assert_eq!(send(&mut retry, cmd("GET k")).await.unwrap(), Value::Okay);
    assert_eq!(started.elapsed(), Duration::from_secs(2));
}

// ---------------------------------------------------------------------------------------------
// Redirections
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn redirections_are_followed_at_once_without_counting_as_attempts() {
    // max_retries = 0 (one attempt), yet two redirections are followed.
    let fake = Fake::script(
        [
            fail(ErrorKind::Moved, Sent::No),
            fail(ErrorKind::Moved, Sent::No),
        ],
        ok(),
    );
    let mut retry = Retry::new(fake.clone(), plain().max_retries(0));
    let started = Instant::now();
    send(&mut retry, cmd("INCR k")).await.unwrap();
    assert_eq!(fake.calls(), 3);
    assert_eq!(
        started.elapsed(),
        Duration::ZERO,
        "no backoff for a redirect"
    );

    // With one retry allowed: MOVED, TRYAGAIN (the retry), ASK, then success.
    let fake = Fake::script(
        [
            fail(ErrorKind::Moved, Sent::No),
            fail(ErrorKind::TryAgain, Sent::No),
            fail(ErrorKind::Ask, Sent::No),
        ],
        ok(),
    );
    let mut retry = Retry::new(fake.clone(), plain().max_retries(1));
    send(&mut retry, cmd("GET k")).await.unwrap();
    assert_eq!(fake.calls(), 4);
}

fn reply(raw: &'static str) -> Reply {
    Reply {
        after: Duration::ZERO,
        outcome: Outcome::Reply(raw),
    }
}

#[tokio::test(start_paused = true)]
async fn redirections_to_new_targets_are_followed_but_a_repeated_one_backs_off() {
    // A slot migration moving on: every redirection names a new node; followed at once.
    let fake = Fake::script(
        [
            reply("-MOVED 3999 10.0.0.1:7000\r\n"),
            reply("-ASK 3999 10.0.0.2:7000\r\n"),
            reply("-MOVED 3999 10.0.0.3:7000\r\n"),
        ],
        ok(),
    );
    let mut retry = Retry::new(fake.clone(), plain().max_retries(0));
    let started = Instant::now();
    send(&mut retry, cmd("INCR k")).await.unwrap();
    assert_eq!(fake.calls(), 4);
    assert_eq!(started.elapsed(), Duration::ZERO);

    // A crashed master: the nodes keep pointing at it. The first MOVED is followed at once;
    // the same MOVED again is a failover in progress: a counted retry after a backoff.
    let dead = "-MOVED 3999 10.0.0.1:7000\r\n";
    let fake = Fake::always(reply(dead));
    let mut retry = Retry::new(fake.clone(), plain().max_retries(2));
    let started = Instant::now();
    let err = send(&mut retry, cmd("INCR k")).await.unwrap_err();
    // Reported as what it is: no reachable master for the slot yet, the redirection kept.
    assert_eq!(err.kind(), ErrorKind::MasterDown, "{err}");
    assert_eq!(err.redirect(), Some((3999, "10.0.0.1:7000".to_owned())));
    assert!(err
        .to_string()
        .contains("slot 3999 is still redirected to 10.0.0.1:7000"));
    // Follow at 0, then two retries after backoffs, then max_retries is reached.
    assert_eq!(fake.calls(), 4);
    let times = fake.call_times();
    assert_eq!(
        times[1], times[0],
        "the first redirection is followed at once"
    );
    assert!(times[2] - times[1] >= FLOOR, "{:?}", times[2] - times[1]);
    assert!(times[3] - times[2] >= FLOOR, "{:?}", times[3] - times[2]);
    assert!(started.elapsed() >= FLOOR * 2);

    // Repeated redirections are paid from the budget like any retry.
    let fake = Fake::always(reply(dead));
    let mut retry = Retry::new(
        fake.clone(),
        plain().budget(TpsBudget::new(Duration::from_secs(10), 0, 0.0)),
    );
    send(&mut retry, cmd("GET k")).await.unwrap_err();
    assert_eq!(fake.calls(), 2, "one free follow, no budget for more");
}

#[tokio::test(start_paused = true)]
async fn a_redirection_loop_is_bounded() {
    let fake = Fake::always(fail(ErrorKind::Moved, Sent::No));
    let mut retry = Retry::new(fake.clone(), RetryConfig::default().deadline(None));
    let started = Instant::now();
    let err = send(&mut retry, cmd("GET k")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MasterDown);
    assert_eq!(fake.calls(), 1 + 5, "default max_redirects is 5");
    assert_eq!(started.elapsed(), Duration::ZERO);
}

// ---------------------------------------------------------------------------------------------
// Pipelines and overrides
// ---------------------------------------------------------------------------------------------

fn pipe(lines: &[&str]) -> Pipeline {
    let mut pipe = redis::pipe();
    for line in lines {
        pipe.add_command(cmd(line));
    }
    pipe
}

#[tokio::test(start_paused = true)]
async fn pipelines_are_retried_only_when_running_them_twice_is_running_them_once() {
    // With max_retries = 3: 4 attempts when sent again, 1 when not.
    let cases: &[(Pipeline, Sent, usize)] = &[
        // An idempotent write and a read after it: sent again after an ambiguous failure.
        (pipe(&["SET a 1", "GET a"]), Sent::Maybe, 4),
        // A read of what a later command writes: a second run reads the first run's result.
        (pipe(&["GET a", "SET a 1"]), Sent::Maybe, 1),
        (pipe(&["GET a", "DEL a"]), Sent::Maybe, 1),
        (pipe(&["GET a", "DEL a"]), Sent::No, 4),
        // One INCR makes the whole pipeline unsafe to repeat...
        (pipe(&["GET a", "INCR n", "GET b"]), Sent::Maybe, 1),
        // ...unless the failure proves nothing ran.
        (pipe(&["GET a", "INCR n"]), Sent::No, 4),
        (pipe(&["GET a", "MGET a b"]), Sent::Maybe, 4),
    ];
    for (pipeline, sent, expected) in cases {
        let fake = Fake::always(fail(ErrorKind::Connection, *sent));
        let mut retry = Retry::new(fake.clone(), plain().max_retries(3));
        let err = send(&mut retry, pipeline.clone()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Connection);
        assert_eq!(
            fake.calls(),
            *expected,
            "{sent:?}: {:?}",
            pipeline.cmd_iter().count()
        );
    }

    let mut atomic = pipe(&["SET a 1", "DEL b"]);
    atomic.atomic();
    let fake = Fake::script([fail(ErrorKind::Timeout, Sent::Maybe)], ok());
    let mut retry = Retry::new(fake.clone(), plain().max_retries(3));
    assert_eq!(send(&mut retry, atomic).await.unwrap().len(), 2);
    assert_eq!(fake.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn overrides_opt_commands_in_and_out() {
    let overrides = IdempotencyTable::new()
        // Our script overwrites a key with a fixed value.
        .with_override("EVALSHA", Idempotency::Idempotent)
        .unwrap()
        // We act on SADD's "added" count.
        .with_override("SADD", Idempotency::NonIdempotent)
        .unwrap();
    // With max_retries = 3: 4 attempts when sent again, 1 when not.
    let cases = [
        ("EVALSHA abc 0", IdempotencyTable::new(), 1),
        ("EVALSHA abc 0", overrides.clone(), 4),
        ("SADD s m", IdempotencyTable::new(), 4),
        ("SADD s m", overrides.clone(), 1),
    ];
    for (line, table, expected) in cases {
        let fake = Fake::always(fail(ErrorKind::Timeout, Sent::Maybe));
        let mut retry = Retry::new(fake.clone(), plain().max_retries(3).idempotency(table));
        send(&mut retry, cmd(line)).await.unwrap_err();
        assert_eq!(fake.calls(), expected, "{line}");
    }
    // Overrides apply to the commands of a pipeline too.
    let fake = Fake::always(fail(ErrorKind::Timeout, Sent::Maybe));
    let mut retry = Retry::new(fake.clone(), plain().max_retries(3).idempotency(overrides));
    send(&mut retry, pipe(&["GET a", "EVALSHA abc 0"]))
        .await
        .unwrap_err();
    assert_eq!(fake.calls(), 4);
}

// ---------------------------------------------------------------------------------------------
// What the caller is told
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn the_final_error_says_maybe_if_any_attempt_may_have_taken_effect() {
    // SET timed out (maybe applied), then the retry met CLUSTERDOWN (surely not applied):
    // the caller must not conclude that the SET never happened.
    let fake = Fake::script(
        [fail(ErrorKind::Timeout, Sent::Maybe)],
        fail(ErrorKind::ClusterDown, Sent::No),
    );
    let mut retry = Retry::new(fake.clone(), plain().max_retries(1));
    let err = send(&mut retry, cmd("SET k v")).await.unwrap_err();
    assert_eq!(fake.calls(), 2);
    assert_eq!(err.kind(), ErrorKind::ClusterDown);
    assert_eq!(err.sent(), Sent::Maybe);

    // Every attempt provably unapplied: the caller may resend the INCR itself.
    let fake = Fake::always(fail(ErrorKind::ClusterDown, Sent::No));
    let mut retry = Retry::new(fake.clone(), plain().max_retries(1));
    let err = send(&mut retry, cmd("INCR k")).await.unwrap_err();
    assert_eq!(fake.calls(), 2);
    assert_eq!(err.sent(), Sent::No);
}

// ---------------------------------------------------------------------------------------------
// A policy of one's own
// ---------------------------------------------------------------------------------------------

/// What a policy was shown: attempt, redirects, elapsed, remaining.
type Seen = (u32, u32, Duration, Option<Duration>);

/// Retries everything — even command errors — every 5 ms, and records what it was shown.
#[derive(Clone, Debug, Default)]
struct Stubborn {
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl RetryPolicy for Stubborn {
    fn deadline(&self) -> Option<Duration> {
        Some(Duration::from_millis(12))
    }

    fn retry(&mut self, attempt: &Attempt<'_>) -> Action {
        self.seen.lock().unwrap().push((
            attempt.attempt(),
            attempt.redirects(),
            attempt.elapsed(),
            attempt.remaining(),
        ));
        Action::RetryAfter(Duration::from_millis(5))
    }
}

#[tokio::test(start_paused = true)]
async fn a_custom_policy_decides_but_the_service_keeps_the_deadline() {
    let policy = Stubborn::default();
    let fake = Fake::script(
        [fail(ErrorKind::Moved, Sent::No)],
        fail(ErrorKind::Command, Sent::Maybe),
    );
    let mut retry = ServiceBuilder::new()
        .layer(RetryLayer::with_policy(policy.clone()))
        .service(fake.clone());
    let err = send(&mut retry, cmd("INCR k")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Command);
    // Sent at 0 (MOVED), 5, 10; at 10 ms a 5 ms delay would end past the 12 ms deadline.
    assert_eq!(fake.calls(), 3);
    let ms = Duration::from_millis;
    assert_eq!(
        *policy.seen.lock().unwrap(),
        [
            (1, 1, ms(0), Some(ms(12))),
            (2, 1, ms(5), Some(ms(7))),
            (3, 1, ms(10), Some(ms(2))),
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Tracing, accessors
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn traces_name_the_command_never_its_arguments() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    // Tests in other threads hit the same callsites at the same time. One whose registration
    // straddled `set_default` cached "nobody listens" without this subscriber; once such
    // registrations are done, recompute.
    std::thread::sleep(std::time::Duration::from_millis(10));
    tracing::callsite::rebuild_interest_cache();

    let fake = Fake::script([fail(ErrorKind::TryAgain, Sent::No)], ok());
    let mut retry = Retry::new(fake.clone(), plain());
    send(&mut retry, cmd("SET session:42 hunter2-secret"))
        .await
        .unwrap();

    // An empty budget is reported.
    let fake = Fake::always(fail(ErrorKind::Loading, Sent::No));
    let mut retry = Retry::new(
        fake,
        plain().budget(TpsBudget::new(Duration::from_secs(10), 0, 0.0)),
    );
    send(&mut retry, cmd("GET session:42")).await.unwrap_err();

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("redis{otel.kind=\"client\" db.system.name=\"redis\" otel.name=SET"),
        "{logs}"
    );
    assert!(logs.contains("db.operation.name=SET"), "{logs}");
    assert!(logs.contains("retrying"), "{logs}");
    assert!(logs.contains("kind=try_again"), "{logs}");
    assert!(logs.contains("attempt=1"), "{logs}");
    assert!(logs.contains("delay_ms="), "{logs}");
    assert!(logs.contains("retry budget exhausted"), "{logs}");
    assert!(!logs.contains("hunter2"), "an argument leaked: {logs}");
    assert!(!logs.contains("session:42"), "a key leaked: {logs}");
}

#[tokio::test(start_paused = true)]
async fn accessors_clone_and_debug() {
    let fake = Fake::always(ok());
    let mut retry = Retry::new(fake.clone(), RetryConfig::default());
    let _: &Fake = retry.get_ref();
    let _: &mut Fake = retry.get_mut();
    let debug = format!("{retry:?}");
    assert!(debug.contains("StandardRetryPolicy"), "{debug}");
    assert!(debug.contains("max_retries: 16"), "{debug}");
    assert!(debug.contains("deadline: Some(5s)"), "{debug}");
    let mut copy = retry.clone();
    send(&mut copy, cmd("GET k")).await.unwrap();
    let inner: Fake = retry.into_inner();
    assert_eq!(inner.calls(), 1);
    assert!(format!("{:?}", RetryLayer::default()).contains("RetryLayer"));
}
