//! Blocking commands (`BLPOP`, `BRPOP`, `BLMOVE`, `XREAD … BLOCK`, …) through the `Client`,
//! against a real cluster: each gets a connection of its own for as long as it blocks, and its
//! call's deadline is extended by its own block time. Requires the `test-util` feature.

mod support;

use std::time::Duration;

use redis::Value;
use support::connected;
use tower_redis_cluster::{Client, ErrorKind, Sent};

fn words(line: &str) -> redis::Cmd {
    let mut parts = line.split_whitespace();
    let mut c = redis::cmd(parts.next().unwrap());
    for p in parts {
        c.arg(p);
    }
    c
}

async fn client(
    cluster: &tower_redis_cluster::harness::LocalCluster,
    deadline: Option<Duration>,
) -> Client {
    connected(cluster.client_builder().timeout(deadline)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pop_waits_its_own_time_beyond_the_deadline_and_gets_what_arrives() {
    let cluster = support::cluster(3, 0).await;
    // The deadline is shorter than the pop's own timeout; the pop still gets its time.
    let client = client(&cluster, Some(Duration::from_millis(300))).await;
    let popper = client.clone();
    let pop = tokio::spawn(async move { popper.send(words("BLPOP {q}jobs 3")).await });
    until_blocked(&cluster, 1).await;
    // What is checked is time itself: the pop is still there past the caller's deadline.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!pop.is_finished(), "the pop did not wait");
    client.send(words("LPUSH {q}jobs job-1")).await.unwrap();
    let reply = pop.await.unwrap().unwrap();
    assert_eq!(
        reply,
        Value::Array(vec![
            Value::BulkString(b"{q}jobs".to_vec()),
            Value::BulkString(b"job-1".to_vec())
        ])
    );
    // Nothing arrives: the server's own timeout ends the pop with nil, not the client's.
    let started = std::time::Instant::now();
    assert_eq!(
        client.send(words("BLPOP {q}empty 1")).await.unwrap(),
        Value::Nil
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    // Streams too.
    client.send(words("XADD {q}s * f v")).await.unwrap();
    let read = client
        .send(words("XREAD BLOCK 1000 STREAMS {q}s 0"))
        .await
        .unwrap();
    assert!(matches!(read, Value::Array(_) | Value::Map(_)), "{read:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_pop_does_not_hold_up_other_callers_of_its_node() {
    let cluster = support::cluster(1, 0).await;
    let client = client(&cluster, Some(Duration::from_secs(1))).await;
    client.send(words("SET {q}k v")).await.unwrap();
    let popper = client.clone();
    let pop = tokio::spawn(async move { popper.send(words("BLPOP {q}idle 3")).await });
    until_blocked(&cluster, 1).await;
    // On the shared connection the node would not read these until the pop ended.
    for _ in 0..50 {
        assert_eq!(
            client.send(words("GET {q}k")).await.unwrap(),
            Value::BulkString(b"v".to_vec())
        );
    }
    assert!(
        !pop.is_finished(),
        "every GET was served while the pop still blocked"
    );
    assert_eq!(pop.await.unwrap().unwrap(), Value::Nil);
}

/// How many clients of the cluster's masters are blocked in a `BLPOP` right now (their own
/// `CLIENT LIST`).
async fn blocked_pops(cluster: &tower_redis_cluster::harness::LocalCluster) -> usize {
    let mut blocked = 0;
    for master in cluster.masters() {
        let list = cluster
            .node_command(master.addr, &words("CLIENT LIST"))
            .await
            .unwrap();
        let text: String = redis::from_redis_value(list).unwrap();
        blocked += text.lines().filter(|l| l.contains("cmd=blpop")).count();
    }
    blocked
}

/// Waits until `count` pops block on the servers.
async fn until_blocked(cluster: &tower_redis_cluster::harness::LocalCluster, count: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while blocked_pops(cluster).await != count {
        assert!(
            std::time::Instant::now() < deadline,
            "{count} pops never blocked"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_pop_never_takes_an_element_pushed_later() {
    let cluster = support::cluster(1, 0).await;
    let client = client(&cluster, Some(Duration::from_secs(1))).await;
    // The caller gives up long before the pop's own timeout.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(300),
        client.send(words("BLPOP {q}orders 30")),
    )
    .await;
    assert!(gave_up.is_err(), "the pop returned: {gave_up:?}");
    // Its connection went with it, so the server stops waiting on its behalf...
    until_blocked(&cluster, 0).await;
    // ...and an element pushed now is there for the next reader, not popped for nobody.
    client.send(words("LPUSH {q}orders order-1")).await.unwrap();
    assert_eq!(
        client.send(words("LPOP {q}orders")).await.unwrap(),
        Value::BulkString(b"order-1".to_vec())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_for_ever_needs_a_client_without_a_deadline() {
    let cluster = support::cluster(1, 0).await;
    let bounded = client(&cluster, Some(Duration::from_secs(1))).await;
    let err = bounded.send(words("BLPOP {q}forever 0")).await.unwrap_err();
    assert_eq!(
        (err.kind(), err.sent()),
        (ErrorKind::Unsupported, Sent::No),
        "{err}"
    );
    assert!(err.to_string().contains("timeout 0"), "{err}");
    // Through the Service interface, the same.
    use tower::{Service, ServiceExt};
    let mut service = bounded.clone();
    let err = ServiceExt::<redis::Cmd>::ready(&mut service)
        .await
        .unwrap()
        .call(words("BLPOP {q}forever 0"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");

    let unbounded = client(&cluster, None).await;
    let popper = unbounded.clone();
    let pop = tokio::spawn(async move { popper.send(words("BLPOP {q}forever 0")).await });
    until_blocked(&cluster, 1).await;
    unbounded.send(words("RPUSH {q}forever x")).await.unwrap();
    assert!(matches!(pop.await.unwrap().unwrap(), Value::Array(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_commands_leave_the_inner_client_alone() {
    let cluster = support::cluster(1, 0).await;
    let client = client(&cluster, Some(Duration::from_millis(500))).await;
    let generation = client.generation();
    // Five pops that time out on the server used to be five client timeouts: a rebuild.
    for _ in 0..6 {
        assert_eq!(
            client.send(words("BRPOP {q}none 0.6")).await.unwrap(),
            Value::Nil
        );
    }
    assert_eq!(client.generation(), generation, "no rebuild");
    // Not in a pipeline, and WAIT (which waits for the shared connection's writes) not at all.
    let mut pipe = redis::pipe();
    pipe.cmd("SET")
        .arg("{q}a")
        .arg(1)
        .cmd("BLPOP")
        .arg("{q}a")
        .arg(1);
    let err = client.send_pipeline(pipe).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    let err = client.send(words("WAIT 1 100")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    let mut pipe = redis::pipe();
    pipe.cmd("SET").arg("{q}a").arg(1).cmd("WAIT").arg(1).arg(0);
    let err = client.send_pipeline(pipe).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pop_whose_master_is_demoted_waits_on_the_new_master() {
    let mut cluster = support::cluster(1, 1).await;
    let client = client(&cluster, Some(Duration::from_secs(10))).await;
    let popper = client.clone();
    let pop = tokio::spawn(async move { popper.send(words("BLPOP {q}handover 8")).await });
    until_blocked(&cluster, 1).await;
    // A graceful failover demotes the master, which unblocks its blocked clients with
    // `-UNBLOCKED … instance state changed (master -> replica?)`: nothing was popped, and the
    // pop belongs on the new master.
    cluster.failover(0).await.unwrap();
    until_blocked(&cluster, 1).await;
    client.send(words("RPUSH {q}handover job")).await.unwrap();
    let popped = pop.await.unwrap().unwrap();
    assert_eq!(
        popped,
        Value::Array(vec![
            Value::BulkString(b"{q}handover".to_vec()),
            Value::BulkString(b"job".to_vec())
        ])
    );
}
