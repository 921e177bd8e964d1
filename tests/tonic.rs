//! `examples/tonic.rs` served over real gRPC (HTTP/2 over TCP) in front of a real cluster.
//! Requires the `test-util` feature.

// The example, compiled as a module: the test serves exactly the example's service and talks to
// it with the example's client. Its `main` and helpers are unused here.
#[allow(dead_code)]
#[path = "../examples/tonic.rs"]
mod tonic_example;

mod support;

use std::time::Duration;

use tonic::Code;
use tonic_example::KeyValueClient;
use tower_redis_cluster::Client;

/// Serves the example's service for `client` on an ephemeral port of 127.0.0.1 and connects
/// the example's client to it.
async fn serve(client: Client) -> KeyValueClient {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(tonic_example::serve(
        client,
        listener,
        std::future::pending(),
    ));
    tokio::time::timeout(
        Duration::from_secs(5),
        KeyValueClient::connect(format!("http://{addr}")),
    )
    .await
    .expect("connecting timed out")
    .unwrap()
}

/// Bounds every call so that a hang fails the test instead of stalling it.
async fn bounded<T>(call: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("the gRPC call timed out")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_value_over_grpc_lands_in_the_cluster() {
    let cluster = support::cluster(1, 1).await;
    let client = support::connected(cluster.client_builder()).await;
    let mut kv = serve(client).await;
    // A separate connection, straight to the nodes, to see what really landed.
    let direct = redis::cluster::ClusterClient::new(cluster.node_urls()).unwrap();
    let mut direct = direct.get_async_connection().await.unwrap();

    bounded(kv.set("greeting", "hello")).await.unwrap();
    let stored: Option<String> = redis::cmd("GET")
        .arg("kv:greeting")
        .query_async(&mut direct)
        .await
        .unwrap();
    assert_eq!(stored.as_deref(), Some("hello"));
    assert_eq!(bounded(kv.get("greeting")).await.unwrap(), b"hello");

    // Arbitrary bytes round-trip, and a value written behind the service's back is served too.
    let () = redis::cmd("SET")
        .arg("kv:binary")
        .arg(&[0u8, 159, 146, 150][..])
        .query_async(&mut direct)
        .await
        .unwrap();
    assert_eq!(
        bounded(kv.get("binary")).await.unwrap(),
        vec![0u8, 159, 146, 150]
    );

    let missing = bounded(kv.get("missing")).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");

    assert_eq!(bounded(kv.incr("visits")).await.unwrap(), 1);
    assert_eq!(bounded(kv.incr("visits")).await.unwrap(), 2);
    let visits: i64 = redis::cmd("GET")
        .arg("kv:visits")
        .query_async(&mut direct)
        .await
        .unwrap();
    assert_eq!(visits, 2);

    // INCR of a value that is not a number: the server rejects the command (ErrorKind::Command).
    let not_a_number = bounded(kv.incr("greeting")).await.unwrap_err();
    assert_eq!(
        not_a_number.code(),
        Code::FailedPrecondition,
        "{not_a_number:?}"
    );
    assert_eq!(not_a_number.message(), "redis error: command");

    let empty = bounded(kv.get("")).await.unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument, "{empty:?}");
}

#[tokio::test]
async fn an_unreachable_cluster_is_unavailable() {
    let client = Client::builder()
        .seed("127.0.0.1:1")
        .timeout(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let mut kv = serve(client).await;
    let status = bounded(kv.get("anything")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().starts_with("redis error: "), "{status:?}");
    // The error's details (addresses, root cause) stay in the server's log.
    assert!(!status.message().contains("127.0.0.1"), "{status:?}");
}
