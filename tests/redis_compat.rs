//! The `Client` as a redis crate connection (`redis::aio::ConnectionLike`), against a real
//! cluster: typed commands (`AsyncCommands`), `Cmd::query_async`, pipelines and `Script`
//! through the whole stack, across a master replaced at a new IP. Requires the `test-util`
//! feature.

mod support;

use std::time::Duration;

use support::{connected, crash_master_and_replace, first_success, init_tracing};
use tower_redis_cluster::redis::{self, AsyncCommands};
use tower_redis_cluster::{Error, ErrorKind, Sent};

/// `SCRIPT EXISTS` of `sha` on the master of shard 0, asked of that node alone.
async fn cached_on_master(cluster: &tower_redis_cluster::harness::LocalCluster, sha: &str) -> bool {
    let mut exists = redis::cmd("SCRIPT");
    exists.arg("EXISTS").arg(sha);
    let reply = cluster
        .node_command(cluster.master_of(0).addr, &exists)
        .await
        .unwrap();
    let found: Vec<bool> = redis::from_redis_value(reply).unwrap();
    found == [true]
}

/// Runs the INCRBY script on `{u}score` with 5, as `redis::Script` does: `EVALSHA`, and after
/// `NOSCRIPT` a `SCRIPT LOAD` and `EVALSHA` again.
async fn add_five(script: &redis::Script, client: &mut tower_redis_cluster::Client) -> i64 {
    script
        .key("{u}score")
        .arg(5)
        .invoke_async(client)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_commands_pipelines_and_scripts_work_through_a_master_replacement() {
    init_tracing();
    // The seed user's shape: one shard, a master and its replica.
    typed_commands_pipelines_and_scripts(support::cluster(1, 1).await).await;
}

/// The same in the seed user's world: TLS with certificates that name DNS names only, nodes
/// announced by host name, an ACL user, the dead master's address blackholed.
#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_commands_pipelines_and_scripts_work_through_a_master_replacement_when_managed() {
    init_tracing();
    let cluster = tower_redis_cluster::harness::LocalCluster::builder()
        .shards(1)
        .replicas(1)
        .managed()
        .start()
        .await
        .expect("the managed cluster starts");
    typed_commands_pipelines_and_scripts(cluster).await;
}

async fn typed_commands_pipelines_and_scripts(
    mut cluster: tower_redis_cluster::harness::LocalCluster,
) {
    let mut client = connected(cluster.client_builder()).await;

    let () = client.set("{u}name", "ada").await.unwrap();
    let name: String = client.get("{u}name").await.unwrap();
    assert_eq!(name, "ada");
    assert_eq!(client.incr::<_, _, i64>("{u}visits", 1).await.unwrap(), 1);
    assert_eq!(client.incr::<_, _, i64>("{u}visits", 2).await.unwrap(), 3);
    let added: i64 = client.hset("{u}user", "lang", "rust").await.unwrap();
    assert_eq!(added, 1);
    let lang: String = client.hget("{u}user", "lang").await.unwrap();
    assert_eq!(lang, "rust");
    let id: String = client
        .xadd("{u}events", "*", &[("kind", "login")])
        .await
        .unwrap();
    assert!(id.contains('-'), "{id}");
    assert_eq!(client.xlen::<_, i64>("{u}events").await.unwrap(), 1);

    // A command of the caller's own, and pipelines: an ignored reply is dropped, a
    // transaction's replies are its commands'.
    let mut get = redis::cmd("GET");
    get.arg("{u}name");
    let name: String = get.query_async(&mut client).await.unwrap();
    assert_eq!(name, "ada");
    let (value,): (i64,) = redis::pipe()
        .set("{u}a", 7)
        .ignore()
        .get("{u}a")
        .query_async(&mut client)
        .await
        .unwrap();
    assert_eq!(value, 7);
    let (first, second): (i64, i64) = redis::pipe()
        .atomic()
        .incr("{u}c", 1)
        .incr("{u}c", 1)
        .query_async(&mut client)
        .await
        .unwrap();
    assert_eq!((first, second), (1, 2));

    // A server's refusal comes as the server sent it.
    let wrong = client.get::<_, String>("{u}user").await.unwrap_err();
    assert_eq!(wrong.code(), Some("WRONGTYPE"), "{wrong}");
    assert!(Error::of_redis(&wrong).is_none());

    let script = redis::Script::new("return redis.call('INCRBY', KEYS[1], ARGV[1])");
    assert_eq!(add_five(&script, &mut client).await, 5);
    assert!(cached_on_master(&cluster, script.get_hash()).await);

    // The master dies and its replica takes over; the old master comes back at a new IP.
    let (old, new) = crash_master_and_replace(&mut cluster).await;
    assert_ne!(old.addr.ip(), new.addr.ip());
    first_success(&client, Duration::from_secs(30))
        .await
        .expect("the client follows the failover");
    // Scripts are not replicated: the promoted master answers NOSCRIPT, and the script is
    // loaded again and run once, on what the replica had.
    assert!(!cached_on_master(&cluster, script.get_hash()).await);
    assert_eq!(add_five(&script, &mut client).await, 10);
    assert!(cached_on_master(&cluster, script.get_hash()).await);
    let name: String = client.get("{u}name").await.unwrap();
    assert_eq!(name, "ada");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incr_through_async_commands_is_never_sent_twice() {
    init_tracing();
    let cluster = support::cluster(1, 0).await;
    let mut client = connected(
        cluster
            .client_builder()
            .response_timeout(Duration::from_millis(200))
            .timeout(Duration::from_secs(1)),
    )
    .await;
    let master = cluster.master_of(0).addr;
    let mut reset = redis::cmd("CONFIG");
    reset.arg("RESETSTAT");
    cluster.node_command(master, &reset).await.unwrap();
    // Writes wait on the node until it is unpaused: the INCR is written and gets no reply in
    // time.
    let mut pause = redis::cmd("CLIENT");
    pause.arg("PAUSE").arg(10_000).arg("WRITE");
    cluster.node_command(master, &pause).await.unwrap();
    let err = client.incr::<_, _, i64>("{u}once", 1).await.unwrap_err();
    let mut unpause = redis::cmd("CLIENT");
    unpause.arg("UNPAUSE");
    cluster.node_command(master, &unpause).await.unwrap();
    assert!(err.is_timeout(), "{err}");
    let ours = Error::of_redis(&err).expect("the crate's error travels with it");
    assert_eq!(
        (ours.kind(), ours.sent()),
        (ErrorKind::Timeout, Sent::Maybe)
    );

    // The call has returned, so nothing will send it again: the INCR (INCRBY, as
    // `AsyncCommands` sends it) ran once, late.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let value = loop {
        if let Some(v) = client.get::<_, Option<i64>>("{u}once").await.unwrap() {
            break v;
        }
        assert!(std::time::Instant::now() < deadline, "the INCR never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(value, 1);
    let mut stats = redis::cmd("INFO");
    stats.arg("commandstats");
    let text: String =
        redis::from_redis_value(cluster.node_command(master, &stats).await.unwrap()).unwrap();
    let incr = text
        .lines()
        .find(|l| l.starts_with("cmdstat_incrby:"))
        .unwrap_or_else(|| panic!("no INCR ran: {text}"));
    assert!(incr.starts_with("cmdstat_incrby:calls=1,"), "{incr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_read_another_way_is_refused_unsent() {
    let cluster = support::cluster(1, 0).await;
    let mut client = connected(cluster.client_builder()).await;
    let mut pipe = redis::pipe();
    pipe.set("{u}x", 1).get("{u}x");
    let err = redis::aio::ConnectionLike::req_packed_commands(&mut client, &pipe, 1, 1)
        .await
        .unwrap_err();
    let ours = Error::of_redis(&err).expect("the crate's error");
    assert_eq!(
        (ours.kind(), ours.sent()),
        (ErrorKind::Unsupported, Sent::No)
    );
    let exists: bool = client.exists("{u}x").await.unwrap();
    assert!(!exists, "nothing was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_through_async_commands_walks_every_master() {
    let cluster = support::cluster(3, 0).await;
    let mut client = connected(cluster.client_builder()).await;
    let keys: Vec<String> = (0..60).map(|i| format!("scan:{i}")).collect();
    for key in &keys {
        let () = client.set(key, 1).await.unwrap();
    }
    let () = client.set("other", 1).await.unwrap();
    // The redis crate's iterator passes the cursor back as its own argument kind.
    let mut found: Vec<String> = Vec::new();
    {
        let mut iter = client.scan_match::<_, String>("scan:*").await.unwrap();
        while let Some(key) = futures_util::StreamExt::next(&mut iter).await {
            found.push(key.unwrap());
        }
    }
    found.sort();
    found.dedup();
    let mut expected = keys.clone();
    expected.sort();
    assert_eq!(found, expected);
}
