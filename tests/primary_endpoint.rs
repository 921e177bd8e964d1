//! `Client` over a connector of the user's own (`ClientBuilder::build_with`): the redis crate's
//! `ConnectionManager` behind the primary endpoint of a cluster-mode-disabled replication
//! group, whose name moves to the promoted replica when the primary dies — against real
//! `redis-server` processes. Requires the `test-util` feature.

mod support;

use std::time::{Duration, Instant};

use support::init_tracing;
use tower_redis_cluster::{
    connect::{connect_fn, BoxConnect, ConnectHints},
    harness::{NameMap, StandaloneServer},
    redis::{self, aio::ConnectionManager, AsyncCommands},
    Client, ErrorKind, RedisService,
};

const PRIMARY: &str = "primary.my-group.test";

/// A command on `server`'s own connection, outside the client under test.
async fn direct(server: &StandaloneServer, cmd: &redis::Cmd) -> redis::Value {
    let client = redis::Client::open(server.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    cmd.query_async(&mut connection).await.unwrap()
}

/// The connector an application would write: resolve the endpoint's name at every connect
/// (here through the test's name map; in production the system resolver does it when the
/// URL holds the name), and manage one connection to what it names.
/// Boxed, so that the client has a type an application can name (and keep in its state).
fn primary_endpoint(names: NameMap) -> BoxConnect<RedisService<ConnectionManager>> {
    BoxConnect::new(connect_fn(move |_: &ConnectHints| {
        let names = names.clone();
        async move {
            let Some(addr) = names.lookup(PRIMARY).first().copied() else {
                return Err(tower_redis_cluster::Error::unreachable(format!(
                    "{PRIMARY} does not resolve"
                )));
            };
            let client = redis::Client::open(format!("redis://{addr}"))?;
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_millis(500)))
                .set_response_timeout(Some(Duration::from_millis(500)))
                .set_number_of_retries(1);
            let manager = ConnectionManager::new_with_config(client, config).await?;
            Ok(RedisService::new(manager))
        }
    }))
}

/// What an application keeps: a client of a nameable type.
struct AppState {
    redis: Client<BoxConnect<RedisService<ConnectionManager>>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_follows_a_primary_endpoint_to_the_promoted_replica() {
    init_tracing();
    let primary = StandaloneServer::start().await.unwrap();
    let replica = StandaloneServer::start().await.unwrap();
    let mut follow = redis::cmd("REPLICAOF");
    follow
        .arg(primary.addr().ip().to_string())
        .arg(primary.addr().port());
    direct(&replica, &follow).await;
    let names = NameMap::new();
    names.set(PRIMARY, vec![primary.addr()]);

    let state = AppState {
        redis: Client::builder()
            .timeout(Duration::from_secs(2))
            .build_with(primary_endpoint(names.clone()))
            .await
            .unwrap(),
    };
    let mut client = state.redis.clone();
    client
        .wait_connected(Duration::from_secs(10))
        .await
        .unwrap();
    let () = client.set("greeting", "hello").await.unwrap();
    assert_eq!(client.incr::<_, _, i64>("visits", 1).await.unwrap(), 1);
    // Replicated before the primary dies.
    let mut get = redis::cmd("GET");
    get.arg("greeting");
    let deadline = Instant::now() + Duration::from_secs(10);
    while direct(&replica, &get).await != redis::Value::BulkString(b"hello".to_vec()) {
        assert!(Instant::now() < deadline, "the replica never synced");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The primary dies; the replica is promoted and the name moves to it.
    let generation = client.generation();
    drop(primary);
    let mut promote = redis::cmd("REPLICAOF");
    promote.arg("NO").arg("ONE");
    direct(&replica, &promote).await;
    names.set(PRIMARY, vec![replica.addr()]);

    let deadline = Instant::now() + Duration::from_secs(30);
    let greeting: String = loop {
        match client.get::<_, String>("greeting").await {
            Ok(value) => break value,
            Err(e) => assert!(
                Instant::now() < deadline,
                "the client never reached the promoted replica: {e}"
            ),
        }
    };
    assert_eq!(greeting, "hello");
    assert!(
        client.generation() > generation,
        "a new connection manager was made for the name's new address"
    );
    let () = client.set("after", "failover").await.unwrap();
    let after: String = client.get("after").await.unwrap();
    assert_eq!(after, "failover");
}

#[tokio::test]
async fn connection_options_belong_to_the_connector() {
    let names = NameMap::new();
    for (builder, option) in [
        (Client::builder().seed("h:1"), "seed"),
        (Client::builder().password("secret"), "credentials"),
        (
            Client::builder().response_timeout(Duration::from_secs(1)),
            "response_timeout",
        ),
        (Client::builder().inner_retries(1), "inner_retries"),
    ] {
        let err = builder
            .build_with(primary_endpoint(names.clone()))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config, "{err}");
        assert!(err.to_string().contains(option), "{option}: {err}");
        assert!(!err.to_string().contains("secret"), "{err}");
    }
    // Topology refresh asks a cluster, which a plain connector does not name.
    let err = Client::builder()
        .topology_refresh(Default::default())
        .build_with(primary_endpoint(names))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("topology_source"), "{err}");
}
