//! `RedisService` against real `redis-server` processes: a cluster connection, a multiplexed
//! connection and a connection manager, plain and atomic pipelines, and the service under
//! generic tower middleware (`timeout`, `concurrency_limit`, `buffer`). Requires the
//! `test-util` feature (the harness).

mod support;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use redis::{
    aio::{ConnectionManager, MultiplexedConnection},
    cluster::ClusterClient,
    AsyncConnectionConfig, Cmd, Pipeline, Value,
};
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_redis_cluster::{
    harness::{LocalCluster, StandaloneServer},
    Error, ErrorKind, RedisService, Sent,
};

const SLOTS: u16 = 16384;

/// Logs through `RUST_LOG` when a test needs debugging. (Not `tests/support`, so that these
/// tests build and lint on their own.)
fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn cmd(parts: &[&str]) -> Cmd {
    let mut c = redis::cmd(parts[0]);
    for p in &parts[1..] {
        c.arg(*p);
    }
    c
}

fn bulk(s: &str) -> Value {
    Value::BulkString(s.as_bytes().to_vec())
}

/// One request through any service whose errors are ours.
async fn call<S, R>(service: &mut S, request: R) -> Result<S::Response, Error>
where
    S: Service<R, Error = Error>,
{
    service.ready().await?.call(request).await
}

/// The slot of `key`, as the cluster itself computes it.
async fn keyslot(cluster: &LocalCluster, key: &str) -> u16 {
    let any = cluster.addrs()[0];
    match cluster
        .node_command(any, &cmd(&["CLUSTER", "KEYSLOT", key]))
        .await
        .unwrap()
    {
        Value::Int(slot) => u16::try_from(slot).unwrap(),
        other => panic!("CLUSTER KEYSLOT {key}: {other:?}"),
    }
}

/// The shard owning `slot`, by the harness's documented split (shard `i` of `n` owns
/// `i * 16384 / n ..= (i + 1) * 16384 / n - 1`).
fn shard_of(slot: u16, shards: usize) -> usize {
    (0..shards)
        .find(|&i| usize::from(slot) < (i + 1) * usize::from(SLOTS) / shards)
        .expect("slot below 16384")
}

/// A multiplexed connection to one node, with the given response timeout.
async fn direct(addr: SocketAddr, response_timeout: Option<Duration>) -> MultiplexedConnection {
    let client = redis::Client::open(format!("redis://{addr}")).unwrap();
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(response_timeout);
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap()
}

/// SET/GET, a plain pipeline and a MULTI/EXEC pipeline through `service`, on keys under `tag`;
/// every reply checked value by value.
async fn exercise<C>(service: &mut RedisService<C>, tag: &str)
where
    C: redis::aio::ConnectionLike + Clone + Send + 'static,
{
    let a = format!("{{{tag}}}:a");
    let b = format!("{{{tag}}}:b");

    assert_eq!(call(service, cmd(&["GET", &a])).await.unwrap(), Value::Nil);
    assert_eq!(
        call(service, cmd(&["SET", &a, "alpha"])).await.unwrap(),
        Value::Okay
    );
    assert_eq!(
        call(service, cmd(&["GET", &a])).await.unwrap(),
        bulk("alpha")
    );

    let mut plain = Pipeline::new();
    plain
        .cmd("SET")
        .arg(&a)
        .arg("1")
        .cmd("SET")
        .arg(&b)
        .arg("2")
        .ignore()
        .cmd("INCR")
        .arg(&a)
        .cmd("GET")
        .arg(&b)
        .cmd("MGET")
        .arg(&a)
        .arg(&b)
        .cmd("DEL")
        .arg(format!("{{{tag}}}:missing"));
    assert_eq!(
        call(service, plain).await.unwrap(),
        vec![
            Value::Okay,
            Value::Int(2),
            bulk("2"),
            Value::Array(vec![bulk("2"), bulk("2")]),
            Value::Int(0),
        ],
        "plain pipeline (the ignored SET gives no reply)"
    );

    let mut atomic = Pipeline::new();
    atomic
        .atomic()
        .cmd("SET")
        .arg(&a)
        .arg("10")
        .cmd("INCRBY")
        .arg(&a)
        .arg(5)
        .cmd("APPEND")
        .arg(&b)
        .arg("x")
        .ignore()
        .cmd("MGET")
        .arg(&a)
        .arg(&b)
        .cmd("DEL")
        .arg(&b)
        .cmd("EXISTS")
        .arg(&b);
    assert_eq!(
        call(service, atomic).await.unwrap(),
        vec![
            Value::Okay,
            Value::Int(15),
            Value::Array(vec![bulk("15"), bulk("2x")]),
            Value::Int(1),
            Value::Int(0),
        ],
        "MULTI/EXEC pipeline (unwrapped, the ignored APPEND gives no reply)"
    );
    assert_eq!(call(service, cmd(&["GET", &a])).await.unwrap(), bulk("15"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_connection_serves_every_shard_and_pipelines() {
    init_tracing();
    let cluster = support::cluster(3, 1).await;
    let connection = ClusterClient::new(cluster.node_urls())
        .unwrap()
        .get_async_connection()
        .await
        .unwrap();
    let mut service = RedisService::new(connection);

    // One key per shard, chosen by the slots the cluster reports.
    let mut by_shard: BTreeMap<usize, (String, u16)> = BTreeMap::new();
    for i in 0.. {
        let key = format!("svc:spread:{i}");
        let slot = keyslot(&cluster, &key).await;
        by_shard
            .entry(shard_of(slot, cluster.shards()))
            .or_insert((key, slot));
        if by_shard.len() == cluster.shards() {
            break;
        }
        assert!(i < 1000, "no key found for every shard: {by_shard:?}");
    }
    let masters: std::collections::HashSet<SocketAddr> = by_shard
        .keys()
        .map(|&shard| cluster.master_of(shard).addr)
        .collect();
    assert_eq!(
        masters.len(),
        3,
        "keys must live on three different masters"
    );

    for (&shard, (key, slot)) in &by_shard {
        let value = format!("value-of-{key}");
        assert_eq!(
            call(&mut service, cmd(&["SET", key, &value]))
                .await
                .unwrap(),
            Value::Okay
        );
        assert_eq!(
            call(&mut service, cmd(&["GET", key])).await.unwrap(),
            bulk(&value)
        );
        // The value is on the master that owns the slot (a direct GET elsewhere would be MOVED).
        let master = cluster.master_of(shard);
        assert_eq!(
            cluster
                .node_command(master.addr, &cmd(&["GET", key]))
                .await
                .unwrap(),
            bulk(&value),
            "{key} (slot {slot}) not on the master of shard {shard} ({})",
            master.addr
        );
    }

    exercise(&mut service, "user:1").await;
    // The hash-tagged keys all went to the one master owning {user:1}'s slot.
    let slot = keyslot(&cluster, "{user:1}:a").await;
    assert_eq!(slot, keyslot(&cluster, "{user:1}:b").await);
    let owner = cluster.master_of(shard_of(slot, cluster.shards()));
    assert_eq!(
        cluster
            .node_command(owner.addr, &cmd(&["MGET", "{user:1}:a", "{user:1}:b"]))
            .await
            .unwrap(),
        Value::Array(vec![bulk("15"), Value::Nil])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multiplexed_connection_and_connection_manager_on_a_standalone_server() {
    init_tracing();
    let server = StandaloneServer::start().await.unwrap();
    let client = redis::Client::open(server.url()).unwrap();

    let multiplexed = client.get_multiplexed_async_connection().await.unwrap();
    let mut service = RedisService::new(multiplexed);
    exercise(&mut service, "mux").await;
    // A clone shares the connection and sees the same data.
    let mut clone = service.clone();
    assert_eq!(
        call(&mut clone, cmd(&["GET", "{mux}:a"])).await.unwrap(),
        bulk("15")
    );

    let manager: ConnectionManager = client.get_connection_manager().await.unwrap();
    let mut service = RedisService::new(manager);
    exercise(&mut service, "manager").await;
    // Both wrote to the same server.
    assert_eq!(
        call(&mut service, cmd(&["MGET", "{mux}:a", "{manager}:a"]))
            .await
            .unwrap(),
        Value::Array(vec![bulk("15"), bulk("15")])
    );
    assert_eq!(
        call(&mut service, cmd(&["DBSIZE"])).await.unwrap(),
        Value::Int(2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tower_timeout_ends_calls_to_a_paused_node() {
    init_tracing();
    let cluster = support::cluster(1, 0).await;
    let master = cluster.master_of(0);
    // The connection itself would wait 30 s: only the tower timeout can end the call early.
    let connection = direct(master.addr, Some(Duration::from_secs(30))).await;
    let deadline = Duration::from_millis(300);
    let mut service = ServiceBuilder::new()
        .timeout(deadline)
        .service(RedisService::new(connection));

    let set: Result<Value, BoxError> = ServiceExt::<Cmd>::ready(&mut service)
        .await
        .unwrap()
        .call(cmd(&["SET", "t", "1"]))
        .await;
    assert_eq!(set.unwrap(), Value::Okay);
    let get: Result<Value, BoxError> = ServiceExt::<Cmd>::ready(&mut service)
        .await
        .unwrap()
        .call(cmd(&["GET", "t"]))
        .await;
    assert_eq!(get.unwrap(), bulk("1"));

    cluster
        .pause_node(master.addr, Duration::from_secs(10))
        .await
        .unwrap();
    let started = Instant::now();
    let boxed = ServiceExt::<Cmd>::ready(&mut service)
        .await
        .unwrap()
        .call(cmd(&["GET", "t"]))
        .await
        .expect_err("a paused node cannot answer");
    let elapsed = started.elapsed();
    assert!(
        boxed.is::<tower::timeout::error::Elapsed>(),
        "not the tower timeout: {boxed}"
    );
    let error = Error::from(boxed);
    assert_eq!(error.kind(), ErrorKind::Timeout, "{error}");
    assert_eq!(error.sent(), Sent::Maybe, "the GET was written: {error}");
    assert!(
        elapsed >= deadline && elapsed < Duration::from_secs(3),
        "ended after {elapsed:?}, deadline {deadline:?}"
    );

    // A pipeline goes through the same timeout.
    let mut pipe = Pipeline::new();
    pipe.cmd("GET").arg("t");
    let boxed = ServiceExt::<Pipeline>::ready(&mut service)
        .await
        .unwrap()
        .call(pipe)
        .await
        .expect_err("a paused node cannot answer a pipeline");
    assert_eq!(Error::from(boxed).kind(), ErrorKind::Timeout);

    // Once the node answers again, so does the service (the late replies are discarded).
    cluster.resume_node(master.addr).await.unwrap();
    let resumed = Instant::now();
    loop {
        let result = ServiceExt::<Cmd>::ready(&mut service)
            .await
            .unwrap()
            .call(cmd(&["GET", "t"]))
            .await;
        match result {
            Ok(v) => {
                assert_eq!(v, bulk("1"));
                break;
            }
            Err(e) => assert!(
                resumed.elapsed() < Duration::from_secs(5),
                "no answer after the node was resumed: {e}"
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffer_and_concurrency_limit_carry_many_concurrent_calls() {
    init_tracing();
    let server = StandaloneServer::start().await.unwrap();
    let client = redis::Client::open(server.url()).unwrap();
    let connection = client.get_multiplexed_async_connection().await.unwrap();

    const LIMIT: usize = 4;
    const TASKS: usize = 64;
    const CALLS: usize = 10;
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (f, p) = (in_flight.clone(), peak.clone());
    let service = ServiceBuilder::new()
        .buffer(32)
        .concurrency_limit(LIMIT)
        .map_future(
            move |future: tower_redis_cluster::service::ResponseFuture| {
                let now = f.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(now, Ordering::SeqCst);
                let f = f.clone();
                async move {
                    let result = future.await;
                    f.fetch_sub(1, Ordering::SeqCst);
                    result
                }
            },
        )
        .service(RedisService::new(connection));

    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let mut service = service.clone();
            tokio::spawn(async move {
                for i in 0..CALLS {
                    let key = format!("conc:{t}:{i}");
                    let value = format!("{t}-{i}");
                    let set = service
                        .ready()
                        .await
                        .unwrap()
                        .call(cmd(&["SET", &key, &value]))
                        .await
                        .map_err(Error::from)
                        .unwrap();
                    assert_eq!(set, Value::Okay);
                    let get = service
                        .ready()
                        .await
                        .unwrap()
                        .call(cmd(&["GET", &key]))
                        .await
                        .map_err(Error::from)
                        .unwrap();
                    assert_eq!(get, bulk(&value));
                    let incr = service
                        .ready()
                        .await
                        .unwrap()
                        .call(cmd(&["INCR", "conc:counter"]))
                        .await
                        .map_err(Error::from)
                        .unwrap();
                    assert!(matches!(incr, Value::Int(n) if n >= 1), "{incr:?}");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }

    let mut service = service;
    let counter = service
        .ready()
        .await
        .unwrap()
        .call(cmd(&["GET", "conc:counter"]))
        .await
        .unwrap();
    assert_eq!(counter, bulk(&(TASKS * CALLS).to_string()));
    let peak = peak.load(Ordering::SeqCst);
    println!("peak in-flight calls under concurrency_limit({LIMIT}): {peak}");
    assert!(peak <= LIMIT, "{peak} calls in flight, limit {LIMIT}");
    assert!(peak >= 2, "calls never overlapped (peak {peak})");
    assert_eq!(in_flight.load(Ordering::SeqCst), 0);

    // An error of ours crosses the buffer boxed and comes back out as it was: the connection's
    // response timeout (500 ms by default) ends a DEBUG SLEEP.
    let boxed = service
        .ready()
        .await
        .unwrap()
        .call(cmd(&["DEBUG", "SLEEP", "1"]))
        .await
        .expect_err("the response timeout fires");
    assert!(boxed.is::<Error>(), "not our error: {boxed}");
    let error = Error::from(boxed);
    assert_eq!(error.kind(), ErrorKind::Timeout, "{error}");
    assert_eq!(error.sent(), Sent::Maybe, "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_ref_get_mut_and_into_inner_reach_the_wrapped_connection() {
    init_tracing();
    let server = StandaloneServer::start().await.unwrap();
    let connection = direct(server.addr(), Some(Duration::from_secs(5))).await;
    let mut service = RedisService::new(connection);

    // get_ref: the very connection the service uses.
    let mut by_ref = service.get_ref().clone();
    let () = redis::cmd("SET")
        .arg("inner")
        .arg("from-get-ref")
        .query_async(&mut by_ref)
        .await
        .unwrap();
    assert_eq!(
        call(&mut service, cmd(&["GET", "inner"])).await.unwrap(),
        bulk("from-get-ref")
    );

    // get_mut: a setting changed on the inner connection applies to the service's calls.
    assert_eq!(
        call(&mut service, cmd(&["DEBUG", "SLEEP", "0.3"]))
            .await
            .unwrap(),
        Value::Okay
    );
    service
        .get_mut()
        .set_response_timeout(Duration::from_millis(100));
    let started = Instant::now();
    let error = call(&mut service, cmd(&["DEBUG", "SLEEP", "0.5"]))
        .await
        .expect_err("the shortened response timeout fires");
    assert_eq!(error.kind(), ErrorKind::Timeout, "{error}");
    assert!(started.elapsed() < Duration::from_millis(450));
    service
        .get_mut()
        .set_response_timeout(Duration::from_secs(5));
    assert_eq!(
        call(&mut service, cmd(&["SET", "inner", "from-service"]))
            .await
            .unwrap(),
        Value::Okay
    );

    // into_inner: the connection, still usable on its own.
    let mut connection: MultiplexedConnection = service.into_inner();
    let value: String = redis::cmd("GET")
        .arg("inner")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(value, "from-service");
    let service = RedisService::new(connection);
    let mut again = service;
    assert_eq!(
        call(&mut again, cmd(&["GET", "inner"])).await.unwrap(),
        bulk("from-service")
    );
}

/// A server's error reply to a single command must come out of `Service<Cmd>` as an `Err`,
/// classified, whatever the connection type — as it does from `Service<Pipeline>`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_error_replies_are_errors_for_every_connection_type() {
    init_tracing();
    let server = StandaloneServer::start().await.unwrap();
    let client = redis::Client::open(server.url()).unwrap();
    let cluster = support::cluster(1, 0).await;

    let mut outcomes = Vec::new();
    let mut mux = RedisService::new(client.get_multiplexed_async_connection().await.unwrap());
    outcomes.push(("MultiplexedConnection", wrongtype(&mut mux).await));
    let mut manager = RedisService::new(client.get_connection_manager().await.unwrap());
    outcomes.push(("ConnectionManager", wrongtype(&mut manager).await));
    let mut cluster_connection = RedisService::new(
        ClusterClient::new(cluster.node_urls())
            .unwrap()
            .get_async_connection()
            .await
            .unwrap(),
    );
    outcomes.push((
        "ClusterConnection",
        wrongtype(&mut cluster_connection).await,
    ));

    let mut wrong = Vec::new();
    for (connection, (single, piped)) in &outcomes {
        println!("{connection}: Service<Cmd> -> {single:?}; Service<Pipeline> -> {piped:?}");
        match single {
            Err(e)
                if e.kind() == ErrorKind::Command
                    && e.server_code().as_deref() == Some("WRONGTYPE") => {}
            Err(e) => wrong.push(format!("{connection} Service<Cmd>: {e:?}")),
            Ok(v) => wrong.push(format!("{connection} Service<Cmd>: Ok({v:?})")),
        }
        // (What a pipeline error exposes beyond its kind is checked in tests/classification.rs.)
        match piped {
            Err(e) if e.kind() == ErrorKind::Command => {}
            Err(e) => wrong.push(format!("{connection} Service<Pipeline>: {e:?}")),
            Ok(v) => wrong.push(format!("{connection} Service<Pipeline>: Ok({v:?})")),
        }
    }
    assert!(
        wrong.is_empty(),
        "WRONGTYPE not returned as a classified error:\n{}",
        wrong.join("\n")
    );
}

/// LPUSH then GET of the same key, through `Service<Cmd>` and through `Service<Pipeline>`.
async fn wrongtype<C>(
    service: &mut RedisService<C>,
) -> (Result<Value, Error>, Result<Vec<Value>, Error>)
where
    C: redis::aio::ConnectionLike + Clone + Send + 'static,
{
    call(service, cmd(&["DEL", "svc:list"])).await.unwrap();
    assert_eq!(
        call(service, cmd(&["LPUSH", "svc:list", "x"]))
            .await
            .unwrap(),
        Value::Int(1)
    );
    let single = call(service, cmd(&["GET", "svc:list"])).await;
    let mut pipe = Pipeline::new();
    pipe.cmd("GET").arg("svc:list");
    let piped = call(service, pipe).await;
    (single, piped)
}
