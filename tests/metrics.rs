//! Counters and gauges reach the `metrics` recorder (features `metrics` + `test-util`).

mod support;

use std::time::Duration;

use metrics_util::{
    debugging::{DebugValue, DebuggingRecorder},
    CompositeKey,
};
use tower_redis_cluster::{topology::RefreshConfig, Client};

type Snapshot = Vec<(
    CompositeKey,
    Option<metrics::Unit>,
    Option<metrics::SharedString>,
    DebugValue,
)>;

fn counter(snapshot: &Snapshot, name: &str, label: Option<(&str, &str)>) -> u64 {
    snapshot
        .iter()
        .filter(|(key, _, _, _)| {
            key.key().name() == name
                && label
                    .is_none_or(|(k, v)| key.key().labels().any(|l| l.key() == k && l.value() == v))
        })
        .map(|(_, _, _, value)| match value {
            DebugValue::Counter(c) => *c,
            _ => 0,
        })
        .sum()
}

fn gauge(snapshot: &Snapshot, name: &str) -> Option<f64> {
    snapshot
        .iter()
        .find(|(key, _, _, _)| key.key().name() == name)
        .and_then(|(_, _, _, value)| match value {
            DebugValue::Gauge(g) => Some(g.into_inner()),
            _ => None,
        })
}

fn labelled(snapshot: &Snapshot, name: &str, labels: &[(&str, &str)]) -> u64 {
    snapshot
        .iter()
        .filter(|(key, _, _, _)| {
            key.key().name() == name
                && labels
                    .iter()
                    .all(|(k, v)| key.key().labels().any(|l| l.key() == *k && l.value() == *v))
        })
        .map(|(_, _, _, value)| match value {
            DebugValue::Counter(c) => *c,
            _ => 0,
        })
        .sum()
}

fn labelled_gauge(snapshot: &Snapshot, name: &str, client: &str) -> Option<f64> {
    snapshot
        .iter()
        .find(|(key, _, _, _)| {
            key.key().name() == name
                && key
                    .key()
                    .labels()
                    .any(|l| l.key() == "client" && l.value() == client)
        })
        .and_then(|(_, _, _, value)| match value {
            DebugValue::Gauge(g) => Some(g.into_inner()),
            _ => None,
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_errors_rebuilds_and_refreshes_are_counted() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test binary");

    let cluster = support::cluster(1, 0).await;
    let client = Client::builder()
        .seed(cluster.seed())
        .resolver(cluster.name_map())
        .topology_refresh(RefreshConfig::default().every(Duration::from_millis(200)))
        .build()
        .await
        .unwrap();
    client
        .wait_connected(Duration::from_secs(10))
        .await
        .unwrap();

    // A second client in the same process, with a name: its metrics keep apart.
    let second = Client::builder()
        .seed(cluster.seed())
        .resolver(cluster.name_map())
        .name("second")
        .build()
        .await
        .unwrap();
    second
        .wait_connected(Duration::from_secs(10))
        .await
        .unwrap();
    for _ in 0..3 {
        second.send(redis::cmd("PING")).await.unwrap();
    }

    for i in 0..10 {
        let mut set = redis::cmd("SET");
        set.arg(format!("m:{i}")).arg(i);
        client.send(set).await.unwrap();
    }
    let mut wrong = redis::cmd("LPUSH");
    wrong.arg("m:1").arg("x");
    assert!(client.send(wrong).await.is_err());

    let handle = client.rebuild_handle();
    handle.rebuild();
    handle
        .wait_for_generation(2, Duration::from_secs(10))
        .await
        .unwrap();
    client
        .topology()
        .unwrap()
        .refresh_and_wait(Duration::from_secs(5))
        .await
        .unwrap();

    // A subscriber of the second client: the server closes its connection (`CLIENT KILL`),
    // so its subscription is lost and re-established; a consumer that does not read
    // overflows a buffer of one.
    let mut subscriber = second
        .subscriber_with(
            tower_redis_cluster::pubsub::SubscriberConfig::default()
                .client_name("second")
                .buffer(1),
        )
        .unwrap();
    subscriber.subscribe(["m:news"]).await.unwrap();
    let node = cluster.masters()[0].addr;
    let mut list = redis::cmd("CLIENT");
    list.arg("LIST");
    let clients: String =
        redis::from_redis_value(cluster.node_command(node, &list).await.unwrap()).unwrap();
    let subscribed = clients
        .lines()
        .find(|l| l.contains(" sub=1 "))
        .expect("the subscriber's connection");
    let id = subscribed
        .split(' ')
        .next()
        .unwrap()
        .trim_start_matches("id=");
    let mut kill = redis::cmd("CLIENT");
    kill.arg("KILL").arg("ID").arg(id);
    cluster.node_command(node, &kill).await.unwrap();
    use futures_util::StreamExt;
    let mut events = Vec::new();
    while events.len() < 2 {
        let event = tokio::time::timeout(Duration::from_secs(10), subscriber.next())
            .await
            .unwrap()
            .unwrap();
        events.push(format!("{event:?}"));
    }
    assert!(events[0].starts_with("Lost"), "{events:?}");
    assert!(events[1].starts_with("Resubscribed"), "{events:?}");
    for n in 0..3 {
        let mut publish = redis::cmd("PUBLISH");
        publish.arg("m:news").arg(n);
        assert_eq!(second.query::<i64>(&publish).await.unwrap(), 1);
    }
    // Wait for the buffer to hold its one message and an overflow, then take all three.
    let started = std::time::Instant::now();
    while !format!("{subscriber:?}").contains("buffered: 2") {
        assert!(started.elapsed() < Duration::from_secs(5), "{subscriber:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (mut accounted, mut dropped) = (0, 0);
    while accounted < 3 {
        match tokio::time::timeout(Duration::from_secs(5), subscriber.next())
            .await
            .unwrap()
            .unwrap()
        {
            tower_redis_cluster::pubsub::Event::Overflow { dropped: n } => {
                dropped += n;
                accounted += n;
            }
            tower_redis_cluster::pubsub::Event::Message(_) => accounted += 1,
            other => panic!("{other:?}"),
        }
    }

    // One snapshot: taking one drains the recorder's counters.
    let snapshot: Snapshot = snapshotter.snapshot().into_vec();
    let snapshotter = &snapshot;
    let first = cluster.seed();
    assert_eq!(
        labelled(
            snapshotter,
            "redis_cluster_calls_total",
            &[("client", &first), ("outcome", "ok")]
        ),
        10,
        "the first client is named after its seed"
    );
    assert_eq!(
        labelled(
            snapshotter,
            "redis_cluster_calls_total",
            &[("client", "second"), ("outcome", "ok")]
        ),
        3 + 3,
        "three PINGs and three PUBLISHes"
    );
    // Each client's generation is its own gauge: 2 (rebuilt once) and 1.
    assert_eq!(
        labelled_gauge(snapshotter, "redis_cluster_generation", &first),
        Some(2.0)
    );
    assert_eq!(
        labelled_gauge(snapshotter, "redis_cluster_generation", "second"),
        Some(1.0)
    );
    assert_eq!(
        counter(
            snapshotter,
            "redis_cluster_calls_total",
            Some(("outcome", "ok"))
        ),
        16
    );
    assert_eq!(
        counter(
            snapshotter,
            "redis_cluster_calls_total",
            Some(("outcome", "command"))
        ),
        1
    );
    assert_eq!(
        counter(snapshotter, "redis_cluster_rebuilds_total", None),
        3
    );
    assert!(
        counter(
            snapshotter,
            "redis_cluster_topology_refreshes_total",
            Some(("outcome", "ok"))
        ) >= 1
    );
    assert!(gauge(snapshotter, "redis_cluster_topology_seconds_since_change").is_some());
    let pubsub = |name| {
        labelled(
            snapshotter,
            name,
            &[("client", "second"), ("kind", "channel")],
        )
    };
    assert_eq!(pubsub("redis_cluster_pubsub_lost_total"), 1);
    assert_eq!(pubsub("redis_cluster_pubsub_resubscribed_total"), 1);
    assert_eq!(
        labelled_gauge(snapshotter, "redis_cluster_pubsub_subscriptions", "second"),
        Some(1.0)
    );
    // What the stream reported dropped, the counter counted.
    assert!(dropped >= 1);
    assert_eq!(
        labelled(
            snapshotter,
            "redis_cluster_pubsub_dropped_total",
            &[("client", "second")]
        ),
        dropped
    );
    drop(subscriber);
}
