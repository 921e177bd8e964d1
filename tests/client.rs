//! The ready-made `Client` against real clusters. Requires the `test-util` feature.

mod support;

use redis::Value;
use std::{
    io::Write,
    sync::{atomic::Ordering, Arc, Mutex},
    time::Duration,
};

use support::{assert_documented_kinds, first_success, Load};
use tower_redis_cluster::{
    harness::{LocalCluster, StandaloneServer},
    Client, ErrorKind,
};

#[tokio::test]
async fn invalid_configuration_fails_build_with_a_config_error_that_says_what_to_fix() {
    let mut cases: Vec<(tower_redis_cluster::ClientBuilder, &str)> = vec![
        (Client::builder(), "no seeds"),
        (Client::builder().seed("http://h:1"), "scheme"),
        (Client::builder().seed("h:99999"), "port"),
        (
            Client::builder().seed("h:1").timeout(Duration::ZERO),
            "timeout",
        ),
        (
            Client::builder()
                .seed("h:1")
                .response_timeout(Duration::ZERO),
            "response_timeout",
        ),
        (
            Client::builder()
                .seed("h:1")
                .connection_timeout(Duration::ZERO),
            "connection_timeout",
        ),
        (
            Client::builder().seed("h:1").concurrency_limit(0),
            "concurrency_limit",
        ),
        (
            Client::builder()
                .seed("h:1")
                .tls(tower_redis_cluster::TlsConfig::custom_ca("not pem")),
            if cfg!(feature = "tls") { "PEM" } else { "tls" },
        ),
    ];
    cases.push((
        Client::builder()
            .seed("h:1")
            .topology_refresh(tower_redis_cluster::topology::RefreshConfig::default().jitter(3.0)),
        "jitter",
    ));
    cases.push((
        Client::builder().seed("h:1").rebuild(
            tower_redis_cluster::rebuild::RebuildConfig::default().connect_timeout(Duration::ZERO),
        ),
        "connect_timeout",
    ));
    for (builder, needle) in cases {
        let err = builder.build().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config, "{err}");
        assert!(err.to_string().contains(needle), "{needle:?} not in {err}");
    }
}

#[cfg(not(feature = "tls"))]
#[tokio::test]
async fn rediss_without_the_tls_feature_is_a_config_error() {
    let err = Client::builder()
        .seed("rediss://h:1")
        .build()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("`tls` feature"), "{err}");
}

#[tokio::test]
async fn building_succeeds_while_the_cluster_is_unreachable_and_calls_fail_within_the_deadline() {
    let client = Client::builder()
        .seed("127.0.0.1:1")
        .timeout(Duration::from_millis(400))
        .build()
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let err = client.send(redis::cmd("PING")).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    assert!(
        matches!(err.kind(), ErrorKind::Unreachable | ErrorKind::Timeout),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_a_connection_ends_at_once_on_errors_that_do_not_pass() {
    // A standalone server as seed, and a refused password: no wait makes them work, so the
    // caller hears the real error at once instead of `Unreachable` after its timeout.
    let standalone = StandaloneServer::builder()
        .config("user", "app on >right ~* &* +@all")
        .start()
        .await
        .unwrap();
    let timeout = Duration::from_secs(20);
    for (builder, kind, needle) in [
        (
            Client::builder().seed(standalone.addr().to_string()),
            ErrorKind::Config,
            "cluster support disabled",
        ),
        (
            Client::builder()
                .seed(standalone.addr().to_string())
                .credentials("app", "wrong"),
            ErrorKind::Auth,
            "Password authentication failed",
        ),
    ] {
        let client = builder.build().await.unwrap();
        let started = std::time::Instant::now();
        let err = client.wait_connected(timeout).await.unwrap_err();
        assert!(
            started.elapsed() < timeout / 2,
            "waited {:?}: {err}",
            started.elapsed()
        );
        assert_eq!(err.kind(), kind, "{err}");
        assert!(err.to_string().contains(needle), "{err}");
        // A call says the same.
        let call = client.send(redis::cmd("PING")).await.unwrap_err();
        assert_eq!(call.kind(), kind, "{call}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_covers_the_wait_for_readiness_on_the_service_path_too() {
    use tower::{Service, ServiceExt};
    // A caller of the `Service` interface (ready, then call) waited without bound for a slot
    // under the concurrency limit before its deadline even started.
    let cluster = support::cluster(1, 0).await;
    let deadline = Duration::from_millis(300);
    let client = support::connected(
        cluster
            .client_builder()
            .concurrency_limit(1)
            .timeout(deadline),
    )
    .await;
    // One clone holds the only slot and never calls.
    let mut holder = client.clone();
    ServiceExt::<redis::Cmd>::ready(&mut holder).await.unwrap();

    let mut waiter = client.clone();
    let started = std::time::Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(5), async {
        ServiceExt::<redis::Cmd>::ready(&mut waiter).await?;
        waiter.call(redis::cmd("PING")).await
    })
    .await
    .expect("the wait for readiness was not bounded by the deadline");
    let err = outcome.unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert_eq!(
        err.sent(),
        tower_redis_cluster::Sent::No,
        "never sent: {err}"
    );
    assert!(took >= deadline && took < deadline * 3, "{took:?}");

    // Once the slot is free, the same handle serves again.
    drop(holder);
    let reply = ServiceExt::<redis::Cmd>::ready(&mut waiter)
        .await
        .unwrap()
        .call(redis::cmd("PING"))
        .await
        .unwrap();
    assert_eq!(reply, Value::SimpleString("PONG".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_holds_for_a_large_value_within_the_copy_it_cannot_interrupt() {
    let cluster = support::cluster(1, 0).await;
    let deadline = Duration::from_millis(100);
    let client = support::connected(cluster.client_builder().timeout(deadline)).await;
    let value = vec![b'x'; 64 << 20];
    let mut set = redis::cmd("SET");
    set.arg("big").arg(&value[..]);
    // What runs without yielding — copying and packing 64 MiB — is the only slack.
    let slack = Duration::from_millis(400);
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let by_value = client.send(set.clone()).await;
        let took = started.elapsed();
        assert!(took < deadline + slack, "send took {took:?}");
        if let Err(e) = by_value {
            assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        }
        let started = std::time::Instant::now();
        let by_ref = client.query::<()>(&set).await;
        let took = started.elapsed();
        assert!(took < deadline + slack, "query took {took:?}");
        if let Err(e) = by_ref {
            assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_pipelines_and_a_replace_failover_through_the_client() {
    let mut cluster = support::cluster(3, 1).await;
    let client = support::connected(cluster.client_builder()).await;

    let mut set = redis::cmd("SET");
    set.arg("client:k").arg("v1");
    client.query::<()>(&set).await.unwrap();
    let mut get = redis::cmd("GET");
    get.arg("client:k");
    assert_eq!(client.query::<String>(&get).await.unwrap(), "v1");
    // The command ran; its reply is not a list of numbers: the caller's mistake, not the
    // server's refusal.
    let wrong: Result<Vec<i64>, _> = client.query(&get).await;
    assert_eq!(wrong.unwrap_err().kind(), ErrorKind::Conversion);

    let mut pipe = redis::pipe();
    pipe.cmd("SET").arg("{p}a").arg(1).ignore();
    pipe.cmd("INCR").arg("{p}a");
    pipe.cmd("GET").arg("{p}a");
    let (incr, got): (i64, String) = client.query_pipeline(&pipe).await.unwrap();
    assert_eq!((incr, got.as_str()), (2, "2"));
    // By value: the raw replies of the commands not ignored (the SET starts over at 1).
    assert_eq!(
        client.send_pipeline(pipe).await.unwrap(),
        vec![Value::Int(2), Value::BulkString(b"2".to_vec())]
    );

    let load = Load::start(client.clone(), 8);
    let master = cluster.master_of(1);
    cluster.replace_node(master.addr).await.unwrap();
    first_success(&client, Duration::from_secs(30))
        .await
        .unwrap();
    let stats = load.stop().await;
    assert_documented_kinds(&stats.errors());
    println!(
        "client through a master replacement: {} ok, errors {:?}",
        stats.ok.load(Ordering::SeqCst),
        stats.errors()
    );
    assert_eq!(client.query::<String>(&get).await.unwrap(), "v1");
    assert!(client.topology().unwrap().current().is_some());
}

/// Collects everything tracing writes.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_appear_in_debug_or_tracing_output() {
    const SECRET: &str = "s3cr3t-Pa55w0rd";
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("trace")
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let cluster = LocalCluster::builder()
        .shards(1)
        .replicas(0)
        .user("app", SECRET)
        .start()
        .await
        .unwrap();
    let builder = Client::builder()
        .seed(format!("redis://app:{SECRET}@{}", cluster.seed()))
        .resolver(cluster.name_map());
    let builder_debug = format!("{builder:?}");
    let client = builder.build().await.unwrap();
    client
        .wait_connected(Duration::from_secs(10))
        .await
        .unwrap();
    let mut set = redis::cmd("SET");
    set.arg("secret:k").arg("v");
    client.query::<()>(&set).await.unwrap();
    // A failing login too: its error must not echo the password either.
    let bad = Client::builder()
        .seed(format!("redis://app:{SECRET}-wrong@{}", cluster.seed()))
        .resolver(cluster.name_map())
        .timeout(Duration::from_millis(500))
        .build()
        .await
        .unwrap();
    let err = bad.send(redis::cmd("PING")).await.unwrap_err();

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(!logs.is_empty(), "tracing captured nothing");
    for (what, text) in [
        ("builder Debug", builder_debug),
        ("client Debug", format!("{client:?}")),
        ("error Display", err.to_string()),
        ("error Debug", format!("{err:?}")),
        ("tracing output", logs),
    ] {
        assert!(!text.contains(SECRET), "{what} leaks the password: {text}");
    }
}
