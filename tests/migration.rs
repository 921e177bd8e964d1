//! Slot migrations of slots that **hold keys**, live, through the `Client`: while a slot is
//! being migrated, the keys already moved are answered with `ASK` by the source node and must
//! be asked of the importing node behind `ASKING`; once it is done, `MOVED`. Neither ever
//! reaches a caller. Requires the `test-util` feature.

mod support;

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use support::{connected, init_tracing};
use tower_redis_cluster::{harness::LocalCluster, Client};

/// The hash tag every key of the test shares: they all live in one slot.
const TAG: &str = "{mig}";
const KEYS: usize = 200;

fn key(i: usize) -> String {
    format!("{TAG}:{i}")
}

async fn admin(cluster: &LocalCluster, addr: std::net::SocketAddr, parts: &[&str]) -> redis::Value {
    let mut c = redis::cmd(parts[0]);
    for p in &parts[1..] {
        c.arg(*p);
    }
    cluster
        .node_command(addr, &c)
        .await
        .unwrap_or_else(|e| panic!("{parts:?} on {addr}: {e}"))
}

/// Workers that read every key (checking its value) and overwrite it with the same value, all
/// the time, counting failures by kind.
struct Workers {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    errors: Arc<Mutex<BTreeMap<String, u64>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Workers {
    fn start(client: &Client, n: usize) -> Workers {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let errors: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
        let tasks = (0..n)
            .map(|w| {
                let (client, stop, ok, errors) =
                    (client.clone(), stop.clone(), ok.clone(), errors.clone());
                tokio::spawn(async move {
                    let mut i = w;
                    while !stop.load(Ordering::Relaxed) {
                        i = (i + 7) % KEYS;
                        let result = if i % 2 == 0 {
                            client
                                .query::<Option<String>>(redis::cmd("GET").arg(key(i)))
                                .await
                                .map(|v| assert_eq!(v, Some(i.to_string()), "{} lost", key(i)))
                        } else {
                            client
                                .query::<()>(redis::cmd("SET").arg(key(i)).arg(i.to_string()))
                                .await
                        };
                        match result {
                            Ok(()) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                *errors
                                    .lock()
                                    .unwrap()
                                    .entry(format!("{}: {e}", e.kind()))
                                    .or_default() += 1;
                            }
                        }
                    }
                })
            })
            .collect();
        Workers {
            stop,
            ok,
            errors,
            tasks,
        }
    }

    async fn stop(self) -> (u64, BTreeMap<String, u64>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("a worker panicked");
        }
        let errors = self.errors.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), errors)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_migration_of_a_slot_with_keys_reaches_no_caller() {
    init_tracing();
    let cluster = support::cluster(2, 0).await;
    let client = connected(cluster.client_builder().timeout(Duration::from_secs(2))).await;
    for i in 0..KEYS {
        client
            .query::<()>(redis::cmd("SET").arg(key(i)).arg(i.to_string()))
            .await
            .unwrap();
    }
    let slot: i64 = redis::from_redis_value(
        admin(
            &cluster,
            cluster.addrs()[0],
            &["CLUSTER", "KEYSLOT", &key(0)],
        )
        .await,
    )
    .unwrap();
    let slot = slot.to_string();
    // Which master serves the slot now, and which will.
    let masters = cluster.masters();
    let source = masters
        .iter()
        .find(|m| (slot.parse::<u16>().unwrap() < 8192) == (m.shard == 0))
        .unwrap()
        .clone();
    let target = masters.iter().find(|m| m.id != source.id).unwrap().clone();

    let workers = Workers::start(&client, 8);
    tokio::time::sleep(Duration::from_millis(200)).await;

    admin(
        &cluster,
        target.addr,
        &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &source.id],
    )
    .await;
    admin(
        &cluster,
        source.addr,
        &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &target.id],
    )
    .await;
    // Move the keys over in small batches, with calls running in between: the moved ones are
    // answered `ASK` by the source for as long as the slot is migrating. Half way, the
    // migration pauses for longer than a call's deadline (a big slot takes that long): a
    // client that does not follow `ASK` cannot serve the moved keys until the slot is done.
    let (ip, port) = (target.addr.ip().to_string(), target.addr.port().to_string());
    let mut moved = 0;
    let mut paused = false;
    loop {
        if !paused && moved >= KEYS / 2 {
            paused = true;
            tokio::time::sleep(Duration::from_millis(2500)).await;
        }
        let keys: Vec<String> = redis::from_redis_value(
            admin(
                &cluster,
                source.addr,
                &["CLUSTER", "GETKEYSINSLOT", &slot, "20"],
            )
            .await,
        )
        .unwrap();
        if keys.is_empty() {
            break;
        }
        let mut migrate = vec!["MIGRATE", &ip, &port, "", "0", "5000", "KEYS"];
        migrate.extend(keys.iter().map(String::as_str));
        admin(&cluster, source.addr, &migrate).await;
        moved += keys.len();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let during = workers.ok.load(Ordering::Relaxed);
    for node in [&target, &source] {
        admin(
            &cluster,
            node.addr,
            &["CLUSTER", "SETSLOT", &slot, "NODE", &target.id],
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, errors) = workers.stop().await;
    println!(
        "migration of slot {slot} ({KEYS} keys): {ok} ok ({during} by its end), errors {errors:?}"
    );
    assert!(errors.is_empty(), "callers saw {errors:?}");
    assert!(during > 100, "the calls ran during the migration: {during}");
    // Every key is now on the target, with its value.
    let on_target: Vec<String> = redis::from_redis_value(
        admin(
            &cluster,
            target.addr,
            &["CLUSTER", "GETKEYSINSLOT", &slot, "1000"],
        )
        .await,
    )
    .unwrap();
    assert_eq!(on_target.len(), KEYS);
    for i in 0..KEYS {
        let v: Option<String> = client.query(redis::cmd("GET").arg(key(i))).await.unwrap();
        assert_eq!(v, Some(i.to_string()));
    }
}
