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
        3
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
        13
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
}
