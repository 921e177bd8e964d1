//! `Error` classification of failures provoked on real `redis-server` processes: every test
//! makes a server (or the network) produce the condition and checks `kind()`, `sent()` and,
//! where they apply, `redirect()` and `server_code()`. Requires the `test-util` feature.
//!
//! Each error is printed (`--nocapture`) with the redis crate's raw error, so a mismatch shows
//! exactly what the server replied.

use std::{
    net::{SocketAddr, TcpListener},
    time::{Duration, Instant},
};

use redis::{
    aio::MultiplexedConnection, cluster::ClusterClient, AsyncConnectionConfig, Cmd, Pipeline, Value,
};
use tower::{Service, ServiceExt};
use tower_redis_cluster::{
    harness::{LocalCluster, NodeInfo, StandaloneServer},
    Error, ErrorKind, RedisService, Sent,
};

const SLOTS: u16 = 16384;
const POLL: Duration = Duration::from_millis(20);

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

type Direct = RedisService<MultiplexedConnection>;

/// One request through `RedisService`, where every failure is classified.
async fn call<S, R>(service: &mut S, request: R) -> Result<S::Response, Error>
where
    S: Service<R, Error = Error>,
{
    service.ready().await?.call(request).await
}

/// The error of a call that must fail; prints it with the redis crate's raw error.
fn expect_err(result: Result<Value, Error>, what: &str) -> Error {
    let error = match result {
        Ok(v) => panic!("{what}: expected an error, got {v:?}"),
        Err(e) => e,
    };
    println!(
        "{what}: kind={:?} sent={:?} code={:?} redirect={:?} redis={:?} | {error}",
        error.kind(),
        error.sent(),
        error.server_code().as_deref(),
        error.redirect(),
        error.redis_error().map(|r| (r.kind(), r.to_string())),
    );
    error
}

fn assert_class(error: &Error, kind: ErrorKind, sent: Sent) {
    assert_eq!(
        (error.kind(), error.sent()),
        (kind, sent),
        "misclassified: {error:?} (raw: {:?})",
        error.redis_error()
    );
}

fn connection_config(response_timeout: Option<Duration>) -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(response_timeout)
}

/// A multiplexed connection to `url`, or the redis crate's error.
async fn try_connect(
    url: &str,
    response_timeout: Option<Duration>,
) -> redis::RedisResult<MultiplexedConnection> {
    redis::Client::open(url)?
        .get_multiplexed_async_connection_with_config(&connection_config(response_timeout))
        .await
}

/// A direct connection to one node (no cluster routing, no redirects).
async fn direct(addr: SocketAddr) -> Direct {
    direct_with_timeout(addr, Some(Duration::from_secs(5))).await
}

async fn direct_with_timeout(addr: SocketAddr, response_timeout: Option<Duration>) -> Direct {
    RedisService::new(
        try_connect(&format!("redis://{addr}"), response_timeout)
            .await
            .unwrap_or_else(|e| panic!("connecting to {addr}: {e}")),
    )
}

async fn keyslot(service: &mut Direct, key: &str) -> u16 {
    match call(service, cmd(&["CLUSTER", "KEYSLOT", key]))
        .await
        .unwrap()
    {
        Value::Int(slot) => u16::try_from(slot).unwrap(),
        other => panic!("CLUSTER KEYSLOT {key}: {other:?}"),
    }
}

/// The shard owning `slot` (shard `i` of `n` owns `i * 16384 / n ..= (i + 1) * 16384 / n - 1`).
fn shard_of(slot: u16, shards: usize) -> usize {
    (0..shards)
        .find(|&i| usize::from(slot) < (i + 1) * usize::from(SLOTS) / shards)
        .expect("slot below 16384")
}

/// Polls `check` until it returns `Some`, at most `limit`.
async fn poll_until<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(t) = check().await {
            return t;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(POLL).await;
    }
}

async fn info_field(service: &mut Direct, section: &str, field: &str) -> Option<String> {
    let info = match call(service, cmd(&["INFO", section])).await.ok()? {
        Value::BulkString(b) => String::from_utf8(b).ok()?,
        Value::VerbatimString { text, .. } => text,
        _ => return None,
    };
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
}

/// A loopback address nothing listens on: bound once to get a free port, then released.
/// `127.1.x.x` is never used by the harness (it leases `127.2.0.0` and up).
fn dead_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.1.254.253:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr
}

fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// SIGSTOPs a process of ours and SIGCONTs it when dropped (also when the test panics).
struct Paused(u32);

impl Paused {
    fn new(pid: u32) -> Self {
        signal(pid, "STOP");
        Paused(pid)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg("-CONT")
            .arg(self.0.to_string())
            .status();
    }
}

async fn small_cluster(shards: usize) -> LocalCluster {
    init_tracing();
    LocalCluster::builder()
        .shards(shards)
        .replicas(0)
        .start()
        .await
        .unwrap()
}

fn replica_of(master: &StandaloneServer) -> String {
    format!("{} {}", master.addr().ip(), master.addr().port())
}

// ---------------------------------------------------------------------------------------------
// Cluster redirections and states
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moved_from_a_master_that_does_not_own_the_slot() {
    let cluster = small_cluster(2).await;
    let key = "cls:moved";
    let mut any = direct(cluster.master_of(0).addr).await;
    let slot = keyslot(&mut any, key).await;
    let owner: NodeInfo = cluster.master_of(shard_of(slot, 2));
    let other: NodeInfo = cluster.master_of(1 - owner.shard);
    assert_ne!(owner.addr, other.addr);

    let mut on_owner = direct(owner.addr).await;
    assert_eq!(
        call(&mut on_owner, cmd(&["SET", key, "v"])).await.unwrap(),
        Value::Okay
    );

    let mut on_other = direct(other.addr).await;
    for request in [cmd(&["GET", key]), cmd(&["SET", key, "w"])] {
        let error = expect_err(call(&mut on_other, request).await, "MOVED");
        assert_class(&error, ErrorKind::Moved, Sent::No);
        assert_eq!(error.server_code().as_deref(), Some("MOVED"));
        let target = owner.addr.to_string();
        assert_eq!(error.redirect(), Some((slot, target.clone())));
        assert!(error.kind().is_redirect());
    }
    // The refused SET did not happen.
    assert_eq!(
        call(&mut on_owner, cmd(&["GET", key])).await.unwrap(),
        bulk("v")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ask_and_tryagain_while_a_slot_is_migrated_by_hand() {
    let cluster = small_cluster(2).await;
    let (moved_key, staying_key) = ("{cls:mig}:a", "{cls:mig}:b");
    let mut any = direct(cluster.master_of(0).addr).await;
    let slot = keyslot(&mut any, moved_key).await;
    assert_eq!(slot, keyslot(&mut any, staying_key).await);
    let source = cluster.master_of(shard_of(slot, 2));
    let target = cluster.master_of(1 - source.shard);
    let mut on_source = direct(source.addr).await;
    let mut on_target = direct(target.addr).await;

    for key in [moved_key, staying_key] {
        assert_eq!(
            call(&mut on_source, cmd(&["SET", key, key])).await.unwrap(),
            Value::Okay
        );
    }
    let slot_arg = slot.to_string();
    assert_eq!(
        call(
            &mut on_target,
            cmd(&["CLUSTER", "SETSLOT", &slot_arg, "IMPORTING", &source.id])
        )
        .await
        .unwrap(),
        Value::Okay
    );
    assert_eq!(
        call(
            &mut on_source,
            cmd(&["CLUSTER", "SETSLOT", &slot_arg, "MIGRATING", &target.id])
        )
        .await
        .unwrap(),
        Value::Okay
    );
    let (ip, port) = (target.addr.ip().to_string(), target.addr.port().to_string());
    assert_eq!(
        call(
            &mut on_source,
            cmd(&["MIGRATE", &ip, &port, moved_key, "0", "5000"])
        )
        .await
        .unwrap(),
        Value::Okay
    );

    // The key still on the source is served there; the migrated one is redirected with ASK.
    assert_eq!(
        call(&mut on_source, cmd(&["GET", staying_key]))
            .await
            .unwrap(),
        bulk(staying_key)
    );
    let error = expect_err(call(&mut on_source, cmd(&["GET", moved_key])).await, "ASK");
    assert_class(&error, ErrorKind::Ask, Sent::No);
    assert_eq!(error.server_code().as_deref(), Some("ASK"));
    let target_addr = target.addr.to_string();
    assert_eq!(error.redirect(), Some((slot, target_addr.clone())));
    assert!(error.kind().is_redirect());

    // Following the ASK by hand finds the key on the target.
    let mut asking = redis::pipe();
    asking.cmd("ASKING").ignore().cmd("GET").arg(moved_key);
    let followed = call(&mut on_target, asking).await.unwrap();
    assert_eq!(followed, vec![bulk(moved_key)]);

    // A multi-key command over both keys, one of them gone: TRYAGAIN.
    let error = expect_err(
        call(&mut on_source, cmd(&["MGET", moved_key, staying_key])).await,
        "TRYAGAIN",
    );
    assert_class(&error, ErrorKind::TryAgain, Sent::No);
    assert_eq!(error.server_code().as_deref(), Some("TRYAGAIN"));
    assert_eq!(error.redirect(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusterdown_when_the_slot_is_served_by_no_one() {
    let cluster = small_cluster(1).await;
    let node = cluster.master_of(0);
    let mut service = direct(node.addr).await;
    let key = "cls:down";
    assert_eq!(
        call(&mut service, cmd(&["SET", key, "v"])).await.unwrap(),
        Value::Okay
    );
    let slot = keyslot(&mut service, key).await.to_string();
    assert_eq!(
        call(&mut service, cmd(&["CLUSTER", "DELSLOTS", &slot]))
            .await
            .unwrap(),
        Value::Okay
    );
    for request in [cmd(&["GET", key]), cmd(&["SET", key, "w"])] {
        let error = expect_err(call(&mut service, request).await, "CLUSTERDOWN");
        assert_class(&error, ErrorKind::ClusterDown, Sent::No);
        assert_eq!(error.server_code().as_deref(), Some("CLUSTERDOWN"));
    }
    // Once the node notices the uncovered slot, the whole cluster is down, for every key.
    let error = poll_until(Duration::from_secs(5), "cluster_state:fail", || {
        let mut service = service.clone();
        async move {
            match info_cluster_state(&mut service).await.as_deref() {
                Some("fail") => Some(call(&mut service, cmd(&["GET", "cls:other-slot"])).await),
                _ => None,
            }
        }
    })
    .await;
    let error = expect_err(error, "CLUSTERDOWN (state fail)");
    assert_class(&error, ErrorKind::ClusterDown, Sent::No);
}

async fn info_cluster_state(service: &mut Direct) -> Option<String> {
    let info = match call(service, cmd(&["CLUSTER", "INFO"])).await.ok()? {
        Value::BulkString(b) => String::from_utf8(b).ok()?,
        Value::VerbatimString { text, .. } => text,
        _ => return None,
    };
    info.lines()
        .find_map(|l| l.strip_prefix("cluster_state:"))
        .map(|v| v.trim().to_string())
}

// ---------------------------------------------------------------------------------------------
// Replication states
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readonly_from_a_replica() {
    init_tracing();
    let master = StandaloneServer::start().await.unwrap();
    let replica = StandaloneServer::builder()
        .config("replicaof", replica_of(&master))
        .start()
        .await
        .unwrap();
    let mut on_master = direct(master.addr()).await;
    let mut on_replica = direct(replica.addr()).await;
    call(&mut on_master, cmd(&["SET", "cls:ro", "v"]))
        .await
        .unwrap();
    // Reads are served (once the replica is in sync)...
    poll_until(Duration::from_secs(10), "the replica to sync", || {
        let mut on_replica = on_replica.clone();
        async move {
            (call(&mut on_replica, cmd(&["GET", "cls:ro"])).await.ok()? == bulk("v")).then_some(())
        }
    })
    .await;
    // ...writes are refused.
    let error = expect_err(
        call(&mut on_replica, cmd(&["SET", "cls:ro", "w"])).await,
        "READONLY",
    );
    assert_class(&error, ErrorKind::ReadOnly, Sent::No);
    assert_eq!(error.server_code().as_deref(), Some("READONLY"));
    let error = expect_err(
        call(&mut on_replica, cmd(&["INCR", "cls:counter"])).await,
        "READONLY (INCR)",
    );
    assert_class(&error, ErrorKind::ReadOnly, Sent::No);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masterdown_from_a_replica_whose_master_died() {
    init_tracing();
    let master = StandaloneServer::start().await.unwrap();
    let replica = StandaloneServer::builder()
        .config("replicaof", replica_of(&master))
        .config("replica-serve-stale-data", "no")
        .start()
        .await
        .unwrap();
    let mut on_master = direct(master.addr()).await;
    let mut on_replica = direct(replica.addr()).await;
    call(&mut on_master, cmd(&["SET", "cls:md", "v"]))
        .await
        .unwrap();
    poll_until(Duration::from_secs(10), "the replica to serve", || {
        let mut on_replica = on_replica.clone();
        async move {
            (call(&mut on_replica, cmd(&["GET", "cls:md"])).await.ok()? == bulk("v")).then_some(())
        }
    })
    .await;

    drop(on_master);
    drop(master); // SIGKILL
    poll_until(Duration::from_secs(10), "master_link_status:down", || {
        let mut on_replica = on_replica.clone();
        async move {
            (info_field(&mut on_replica, "replication", "master_link_status")
                .await
                .as_deref()
                == Some("down"))
            .then_some(())
        }
    })
    .await;
    let error = expect_err(
        call(&mut on_replica, cmd(&["GET", "cls:md"])).await,
        "MASTERDOWN",
    );
    assert_class(&error, ErrorKind::MasterDown, Sent::No);
    assert_eq!(error.server_code().as_deref(), Some("MASTERDOWN"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loading_while_the_dataset_is_reloaded() {
    init_tracing();
    let server = StandaloneServer::start().await.unwrap();
    let mut admin = direct_with_timeout(server.addr(), Some(Duration::from_secs(30))).await;
    let mut client = direct(server.addr()).await;
    for setting in [
        cmd(&["DEBUG", "POPULATE", "5000", "cls:load"]),
        // Slow the load down (µs per key) and let the server answer other clients often.
        cmd(&["CONFIG", "SET", "key-load-delay", "100"]),
        cmd(&[
            "CONFIG",
            "SET",
            "loading-process-events-interval-bytes",
            "1024",
        ]),
    ] {
        assert_eq!(call(&mut admin, setting).await.unwrap(), Value::Okay);
    }
    assert_eq!(
        call(&mut client, cmd(&["GET", "cls:load:1"]))
            .await
            .unwrap(),
        bulk("value:1")
    );

    let reload = tokio::spawn(async move { call(&mut admin, cmd(&["DEBUG", "RELOAD"])).await });
    let error = poll_until(Duration::from_secs(10), "a LOADING reply", || {
        let mut client = client.clone();
        async move { call(&mut client, cmd(&["GET", "cls:load:1"])).await.err() }
    })
    .await;
    let error = expect_err(Err(error), "LOADING");
    assert_class(&error, ErrorKind::Loading, Sent::No);
    assert_eq!(error.server_code().as_deref(), Some("LOADING"));

    assert_eq!(reload.await.unwrap().unwrap(), Value::Okay);
    assert_eq!(
        call(&mut client, cmd(&["GET", "cls:load:1"]))
            .await
            .unwrap(),
        bulk("value:1")
    );
}

// ---------------------------------------------------------------------------------------------
// The command itself
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_commands_are_command_errors() {
    let cluster = small_cluster(1).await;
    let mut service = direct(cluster.master_of(0).addr).await;
    assert_eq!(
        call(&mut service, cmd(&["LPUSH", "cls:list", "x"]))
            .await
            .unwrap(),
        Value::Int(1)
    );
    let cases = [
        (cmd(&["GET", "cls:list"]), "WRONGTYPE"),
        (cmd(&["SET", "cls:k", "v", "NX", "XX"]), "ERR"),
        (cmd(&["NOSUCHCOMMAND", "x"]), "ERR"),
        (cmd(&["GET"]), "ERR"),
        // Two slots (both on this node): refused all the same.
        (cmd(&["MSET", "cls:a", "1", "cls:b", "2"]), "CROSSSLOT"),
    ];
    for (request, code) in cases {
        let error = expect_err(call(&mut service, request).await, code);
        // A command the server refused did not run.
        assert_class(&error, ErrorKind::Command, Sent::No);
        assert_eq!(error.server_code().as_deref(), Some(code));
        assert!(!error.kind().is_transient());
    }
    // A script can fail after a write: that error must not claim nothing happened.
    let script = "redis.call('SET', KEYS[1], 'written'); return redis.call('INCR', KEYS[1])";
    let error = expect_err(
        call(&mut service, cmd(&["EVAL", script, "1", "cls:script"])).await,
        "ERR",
    );
    assert_class(&error, ErrorKind::Command, Sent::Maybe);
    assert_eq!(
        call(&mut service, cmd(&["GET", "cls:script"]))
            .await
            .unwrap(),
        Value::BulkString(b"written".to_vec()),
        "the script's first write took effect"
    );
    // NOSCRIPT: the script never ran.
    let error = expect_err(
        call(&mut service, cmd(&["EVALSHA", &"0".repeat(40), "0"])).await,
        "NOSCRIPT",
    );
    assert_class(&error, ErrorKind::Command, Sent::No);
    let mut any = direct(cluster.master_of(0).addr).await;
    assert_ne!(
        keyslot(&mut any, "cls:a").await,
        keyslot(&mut any, "cls:b").await
    );
    // Nothing of the refused MSET was applied.
    assert_eq!(
        call(&mut service, cmd(&["EXISTS", "cls:a"])).await.unwrap(),
        Value::Int(0)
    );
}

// ---------------------------------------------------------------------------------------------
// Authentication and authorisation
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noauth_without_a_password() {
    init_tracing();
    let server = StandaloneServer::builder()
        .config("requirepass", "s3cret")
        .start()
        .await
        .unwrap();
    let url = format!("redis://{}", server.addr());
    let error = match try_connect(&url, Some(Duration::from_secs(5))).await {
        // The connection may be set up; the first command is then refused.
        Ok(connection) => {
            let mut service = RedisService::new(connection);
            expect_err(
                call(&mut service, cmd(&["GET", "cls:k"])).await,
                "NOAUTH (command)",
            )
        }
        Err(e) => expect_err(Err(Error::from(e)), "NOAUTH (connection set-up)"),
    };
    assert_class(&error, ErrorKind::Auth, Sent::No);

    // The right password works, so the failure above was the missing password.
    let url = format!("redis://:s3cret@{}", server.addr());
    let mut service = RedisService::new(try_connect(&url, None).await.unwrap());
    assert_eq!(
        call(&mut service, cmd(&["GET", "cls:k"])).await.unwrap(),
        Value::Nil
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrongpass_and_noperm_from_acl_users() {
    init_tracing();
    let server = StandaloneServer::builder()
        .config("user", "app on >secret ~* +@all")
        .config("user", "reader on >secret ~* +@all -set")
        .start()
        .await
        .unwrap();
    let addr = server.addr();

    let wrong = format!("redis://app:not-the-secret@{addr}");
    let error = match try_connect(&wrong, Some(Duration::from_secs(5))).await {
        Ok(connection) => {
            let mut service = RedisService::new(connection);
            expect_err(
                call(&mut service, cmd(&["GET", "cls:k"])).await,
                "WRONGPASS (command)",
            )
        }
        Err(e) => expect_err(Err(Error::from(e)), "WRONGPASS (connection set-up)"),
    };
    assert_class(&error, ErrorKind::Auth, Sent::No);
    assert!(!error.kind().is_transient());

    let mut app = RedisService::new(
        try_connect(&format!("redis://app:secret@{addr}"), None)
            .await
            .unwrap(),
    );
    assert_eq!(
        call(&mut app, cmd(&["SET", "cls:k", "v"])).await.unwrap(),
        Value::Okay
    );

    let mut reader = RedisService::new(
        try_connect(&format!("redis://reader:secret@{addr}"), None)
            .await
            .unwrap(),
    );
    assert_eq!(
        call(&mut reader, cmd(&["GET", "cls:k"])).await.unwrap(),
        bulk("v")
    );
    let error = expect_err(
        call(&mut reader, cmd(&["SET", "cls:k", "w"])).await,
        "NOPERM",
    );
    assert_class(&error, ErrorKind::Auth, Sent::No);
    assert_eq!(error.server_code().as_deref(), Some("NOPERM"));
    assert_eq!(
        call(&mut app, cmd(&["GET", "cls:k"])).await.unwrap(),
        bulk("v")
    );
}

// ---------------------------------------------------------------------------------------------
// The network
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connection_was_never_sent() {
    init_tracing();
    let addr = dead_addr();
    let error = match try_connect(&format!("redis://{addr}"), None).await {
        Ok(_) => panic!("something listens on {addr}"),
        Err(e) => expect_err(Err(Error::from(e)), "connection refused"),
    };
    assert_class(&error, ErrorKind::Connection, Sent::No);
    assert!(
        error.to_string().to_lowercase().contains("refused"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_killed_mid_command_and_after() {
    init_tracing();
    let server = StandaloneServer::start().await.unwrap();
    let raw = try_connect(&format!("redis://{}", server.addr()), None)
        .await
        .unwrap();
    let mut victim = RedisService::new(raw.clone());
    let mut admin = direct(server.addr()).await;
    let id = match call(&mut victim, cmd(&["CLIENT", "ID"])).await.unwrap() {
        Value::Int(id) => id.to_string(),
        other => panic!("CLIENT ID: {other:?}"),
    };

    // A blocking command would hold a shared connection: `RedisService` refuses it (it has
    // no connection of its own to give it) before sending anything...
    let refused = expect_err(
        call(&mut victim, cmd(&["BLPOP", "cls:never", "20"])).await,
        "BLPOP on a shared connection",
    );
    assert_class(&refused, ErrorKind::Unsupported, Sent::No);

    // ...so the command in flight (blocked on the server) when its connection is killed goes
    // out on the raw connection underneath, and its error is classified the same way.
    let mut blocked = raw;
    let in_flight = tokio::spawn(async move {
        redis::aio::ConnectionLike::req_packed_command(
            &mut blocked,
            &cmd(&["BLPOP", "cls:never", "20"]),
        )
        .await
        .map_err(Error::from_redis)
    });
    poll_until(Duration::from_secs(5), "the BLPOP to block", || {
        let mut admin = admin.clone();
        async move {
            (info_field(&mut admin, "clients", "blocked_clients")
                .await
                .as_deref()
                == Some("1"))
            .then_some(())
        }
    })
    .await;
    assert_eq!(
        call(&mut admin, cmd(&["CLIENT", "KILL", "ID", &id]))
            .await
            .unwrap(),
        Value::Int(1)
    );
    let error = tokio::time::timeout(Duration::from_secs(5), in_flight)
        .await
        .expect("the killed connection fails its command at once")
        .unwrap();
    let error = expect_err(error, "killed mid-command");
    assert_class(&error, ErrorKind::Connection, Sent::Maybe);

    // The next command on the dead connection fails too.
    let error = expect_err(
        call(&mut victim, cmd(&["GET", "cls:k"])).await,
        "after the kill",
    );
    assert_eq!(error.kind(), ErrorKind::Connection, "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_timeout_on_a_paused_server() {
    init_tracing();
    let server = StandaloneServer::start().await.unwrap();
    let response_timeout = Duration::from_millis(300);
    let mut service = direct_with_timeout(server.addr(), Some(response_timeout)).await;
    assert_eq!(
        call(&mut service, cmd(&["SET", "cls:k", "v"]))
            .await
            .unwrap(),
        Value::Okay
    );

    let paused = Paused::new(server.pid());
    let started = Instant::now();
    let error = expect_err(
        call(&mut service, cmd(&["GET", "cls:k"])).await,
        "response timeout",
    );
    let elapsed = started.elapsed();
    assert_class(&error, ErrorKind::Timeout, Sent::Maybe);
    assert!(
        elapsed >= response_timeout && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    drop(paused);

    // The server answers again on the same connection.
    poll_until(Duration::from_secs(5), "an answer after SIGCONT", || {
        let mut service = service.clone();
        async move { call(&mut service, cmd(&["GET", "cls:k"])).await.ok() }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// A whole cluster out of reach
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_when_the_only_seed_is_dead() {
    init_tracing();
    let addr = dead_addr();
    let result = ClusterClient::new(vec![format!("redis://{addr}")])
        .unwrap()
        .get_async_connection()
        .await;
    let error = match result {
        Ok(_) => panic!("something listens on {addr}"),
        Err(e) => expect_err(Err(Error::from(e)), "dead seed"),
    };
    assert_class(&error, ErrorKind::Unreachable, Sent::No);
    let text = error.to_string();
    assert!(text.to_lowercase().contains("refused"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_once_every_node_of_the_cluster_is_gone() {
    let mut cluster = small_cluster(2).await;
    // The inner client as `ClusterConnector` configures it: few, quick inner retries.
    let connection = ClusterClient::builder(cluster.node_urls())
        .connection_timeout(Duration::from_secs(1))
        .response_timeout(Duration::from_millis(500))
        .retries(2)
        .min_retry_wait(10)
        .max_retry_wait(100)
        .build()
        .unwrap()
        .get_async_connection()
        .await
        .unwrap();
    let mut service = RedisService::new(connection);
    for key in ["cls:a", "cls:b", "cls:c"] {
        call(&mut service, cmd(&["SET", key, "v"])).await.unwrap();
    }

    cluster.stop_all().await.unwrap();
    let mut kinds = Vec::new();
    let mut last = None;
    for attempt in 1..=6 {
        let started = Instant::now();
        let result = tokio::time::timeout(
            Duration::from_secs(10),
            call(&mut service, cmd(&["GET", "cls:a"])),
        )
        .await
        .expect("a call to a dead cluster must end by itself");
        let error = match result {
            Ok(v) => panic!("attempt {attempt}: a dead cluster answered {v:?}"),
            Err(e) => e,
        };
        println!(
            "dead cluster, attempt {attempt} after {:?}: kind={:?} sent={:?} redis={:?}",
            started.elapsed(),
            error.kind(),
            error.sent(),
            error.redis_error().map(|r| (r.kind(), r.to_string())),
        );
        kinds.push(error.kind());
        last = Some(error);
    }
    assert!(
        kinds
            .iter()
            .all(|k| matches!(k, ErrorKind::Unreachable | ErrorKind::Connection)),
        "{kinds:?}"
    );
    let last = last.unwrap();
    assert_class(&last, ErrorKind::Unreachable, Sent::No);
}

// ---------------------------------------------------------------------------------------------
// Pipelines (`Service<Pipeline>`)
// ---------------------------------------------------------------------------------------------

/// Compares an error with what is expected of it; a mismatch is recorded, not panicked on, so
/// that one run lists every difference.
fn check(
    mismatches: &mut Vec<String>,
    what: &str,
    error: &Error,
    expected: (ErrorKind, Sent, Option<&str>, Option<(u16, String)>),
) {
    let (kind, sent, code, redirect) = expected;
    let server_code = error.server_code();
    let actual = (
        error.kind(),
        error.sent(),
        server_code.as_deref(),
        error.redirect().map(|(s, a)| (s, a.to_string())),
    );
    if actual != (kind, sent, code, redirect.clone()) {
        mismatches.push(format!(
            "{what}: expected kind={kind:?} sent={sent:?} code={code:?} redirect={redirect:?}, \
             got kind={:?} sent={:?} code={:?} redirect={:?} (raw: {:?})",
            actual.0,
            actual.1,
            actual.2,
            actual.3,
            error.redis_error()
        ));
    }
}

/// A key that `shard` of a `shards`-shard cluster owns.
async fn key_on_shard(any: &mut Direct, prefix: &str, shard: usize, shards: usize) -> String {
    for i in 0..10_000 {
        let key = format!("{prefix}:{i}");
        if shard_of(keyslot(any, &key).await, shards) == shard {
            return key;
        }
    }
    panic!("no key of shard {shard}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_errors_keep_the_class_of_the_refusal() {
    let cluster = small_cluster(2).await;
    let mut any = direct(cluster.master_of(0).addr).await;
    let remote = "cls:pipe:remote";
    let slot = keyslot(&mut any, remote).await;
    let owner = cluster.master_of(shard_of(slot, 2));
    let here = cluster.master_of(1 - owner.shard);
    let local = key_on_shard(&mut any, "cls:pipe:local", here.shard, 2).await;
    let list = key_on_shard(&mut any, "cls:pipe:list", here.shard, 2).await;
    let mut on_here = direct(here.addr).await;
    call(&mut on_here, cmd(&["LPUSH", &list, "x"]))
        .await
        .unwrap();
    let moved = Some((slot, owner.addr.to_string()));
    let mut mismatches = Vec::new();

    // The redirected command alone: as if sent on its own.
    let mut pipe = Pipeline::new();
    pipe.cmd("GET").arg(remote);
    let error = expect_err(
        call(&mut on_here, pipe).await.map(Value::Array),
        "pipeline: MOVED alone",
    );
    check(
        &mut mismatches,
        "pipeline [GET remote]",
        &error,
        (ErrorKind::Moved, Sent::No, Some("MOVED"), moved.clone()),
    );

    // A rejected command alone: refused, so nothing ran.
    let mut pipe = Pipeline::new();
    pipe.cmd("GET").arg(&list);
    let error = expect_err(
        call(&mut on_here, pipe).await.map(Value::Array),
        "pipeline: WRONGTYPE alone",
    );
    check(
        &mut mismatches,
        "pipeline [GET list]",
        &error,
        (ErrorKind::Command, Sent::No, Some("WRONGTYPE"), None),
    );

    // An INCR that runs, then a redirected GET: the pipeline as a whole took effect in part,
    // so sending it again would apply the INCR twice. `Sent::No` would be a false promise.
    let mut pipe = Pipeline::new();
    pipe.cmd("INCR").arg(&local).cmd("GET").arg(remote);
    let error = expect_err(
        call(&mut on_here, pipe).await.map(Value::Array),
        "pipeline: INCR then MOVED",
    );
    assert_eq!(
        call(&mut on_here, cmd(&["GET", &local])).await.unwrap(),
        bulk("1"),
        "the INCR before the redirected GET was applied"
    );
    if error.sent() != Sent::Maybe {
        mismatches.push(format!(
            "pipeline [INCR local, GET remote]: the INCR was applied, yet sent={:?} kind={:?} \
             (raw: {:?})",
            error.sent(),
            error.kind(),
            error.redis_error()
        ));
    }

    // The other way round: the redirected GET comes first, the INCR after it still runs.
    let mut pipe = Pipeline::new();
    pipe.cmd("GET").arg(remote).cmd("INCR").arg(&local);
    let error = expect_err(
        call(&mut on_here, pipe).await.map(Value::Array),
        "pipeline: MOVED then INCR",
    );
    assert_eq!(
        call(&mut on_here, cmd(&["GET", &local])).await.unwrap(),
        bulk("2"),
        "the INCR after the redirected GET was applied"
    );
    if error.sent() != Sent::Maybe {
        mismatches.push(format!(
            "pipeline [GET remote, INCR local]: the INCR was applied, yet sent={:?} kind={:?} \
             (raw: {:?})",
            error.sent(),
            error.kind(),
            error.redis_error()
        ));
    }

    // A transaction with a redirected command is discarded whole (EXECABORT): nothing ran.
    let mut tx = Pipeline::new();
    tx.atomic().cmd("INCR").arg(&local).cmd("GET").arg(remote);
    let error = expect_err(
        call(&mut on_here, tx).await.map(Value::Array),
        "transaction: INCR then MOVED",
    );
    assert_eq!(
        call(&mut on_here, cmd(&["GET", &local])).await.unwrap(),
        bulk("2"),
        "the aborted transaction applied nothing"
    );
    assert!(!error.kind().is_redirect() || error.sent() == Sent::No);

    assert!(
        mismatches.is_empty(),
        "pipeline errors misclassified:\n{}",
        mismatches.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noauth_inside_a_pipeline_is_auth() {
    init_tracing();
    let server = StandaloneServer::builder()
        .config("requirepass", "s3cret")
        .start()
        .await
        .unwrap();
    let url = format!("redis://{}", server.addr());
    let mut service = RedisService::new(
        try_connect(&url, Some(Duration::from_secs(5)))
            .await
            .expect("connection set-up does not need the password"),
    );
    let mut pipe = Pipeline::new();
    pipe.cmd("GET").arg("cls:k");
    let error = expect_err(
        call(&mut service, pipe).await.map(Value::Array),
        "pipeline: NOAUTH",
    );
    let mut mismatches = Vec::new();
    check(
        &mut mismatches,
        "pipeline [GET] without a password",
        &error,
        (ErrorKind::Auth, Sent::No, Some("NOAUTH"), None),
    );
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}
