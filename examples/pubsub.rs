//! Subscriptions through a master crash and a node replaced at a new IP.
//!
//! Starts a local Redis Cluster (3 shards × master + replica, each node on its own loopback
//! IP), subscribes to a channel and a sharded channel, and publishes a numbered message on
//! each every 20 ms. The master owning the sharded channel then crashes, its replica takes
//! over, and the dead node is replaced by one at a new IP; then the node carrying the channel
//! subscription crashes too. The subscriber prints what the application sees — the explicit
//! `Lost` and `Resubscribed` events, never a silent gap — and at the end how many messages
//! were published and received on each channel.
//!
//! ```sh
//! cargo run --example pubsub --features test-util
//! ```

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use tower_redis_cluster::{
    command::key_slot, harness::LocalCluster, pubsub::Event, redis, Client, Error,
};

const CHANNEL: &str = "news";
const SHARDED: &str = "orders:{eu}";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("starting a local cluster: 3 shards × (master + replica)…");
    let mut cluster = LocalCluster::builder()
        .shards(3)
        .replicas(1)
        .start()
        .await?;
    let client = cluster.client_builder().build().await?;
    client.wait_connected(Duration::from_secs(10)).await?;

    let mut subscriber = client.subscriber()?;
    subscriber.subscribe([CHANNEL]).await?;
    subscriber.ssubscribe([SHARDED]).await?;
    println!("subscribed to {CHANNEL} and (sharded) {SHARDED}");

    let started = Instant::now();
    let received: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let reader = {
        let received = received.clone();
        tokio::spawn(async move {
            while let Some(event) = subscriber.next().await {
                let at = started.elapsed().as_secs_f64();
                match event {
                    Event::Message(m) => {
                        let channel = m.channel_str().unwrap_or("?").to_string();
                        *received.lock().unwrap().entry(channel).or_default() += 1;
                    }
                    Event::Lost { kind, names, cause } => println!(
                        "{at:6.2} s  LOST {} {:?}: {cause}",
                        kind.as_str(),
                        text(&names)
                    ),
                    Event::Resubscribed {
                        kind,
                        names,
                        node,
                        gap,
                    } => println!(
                        "{at:6.2} s  RESUBSCRIBED {} {:?} on {node} after {gap:?}",
                        kind.as_str(),
                        text(&names)
                    ),
                    other => println!("{at:6.2} s  {other:?}"),
                }
            }
        })
    };

    let published: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = tokio::spawn(publish(client.clone(), published.clone(), stop.clone()));

    tokio::time::sleep(Duration::from_secs(1)).await;
    let slot = key_slot(SHARDED.as_bytes());
    let owner = owner_of(&client, slot).await?;
    let victim = cluster
        .masters()
        .into_iter()
        .find(|m| owner.contains(&m.addr.to_string()) || m.hostname.as_deref() == Some(&owner))
        .unwrap_or_else(|| cluster.master_of(0));
    println!(
        "{:6.2} s  crashing master {} (owns slot {slot} of {SHARDED})",
        started.elapsed().as_secs_f64(),
        victim.addr
    );
    cluster.kill_node(victim.addr).await?;
    cluster.wait_healthy(Duration::from_secs(30)).await?;
    let new = cluster.replace_node(victim.addr).await?;
    println!(
        "{:6.2} s  replaced by {} (a new IP)",
        started.elapsed().as_secs_f64(),
        new.addr
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The node the channel subscription is on (`PUBSUB NUMSUB` counts a node's own clients).
    let mut numsub = redis::cmd("PUBSUB");
    numsub.arg("NUMSUB").arg(CHANNEL);
    for node in cluster.nodes() {
        let reply = cluster.node_command(node.addr, &numsub).await?;
        let (_, n): (String, i64) = redis::from_redis_value(reply)?;
        if n > 0 {
            println!(
                "{:6.2} s  crashing {:?} {} (carries the {CHANNEL} subscription)",
                started.elapsed().as_secs_f64(),
                node.role,
                node.addr
            );
            cluster.kill_node(node.addr).await?;
            cluster.wait_healthy(Duration::from_secs(30)).await?;
            cluster.replace_node(node.addr).await?;
            break;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    publisher.await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    reader.abort();
    let published = published.lock().unwrap().clone();
    let received = received.lock().unwrap().clone();
    for (channel, n) in &published {
        println!(
            "{channel}: {n} published (accepted by the cluster), {} received",
            received.get(channel).copied().unwrap_or(0)
        );
    }
    println!(
        "(messages published while a subscription was down are not redelivered by Redis; \
         the events above say when that was)"
    );
    Ok(())
}

async fn publish(
    client: Client,
    published: Arc<Mutex<BTreeMap<String, u64>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut n = 0u64;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        n += 1;
        for (command, channel) in [("PUBLISH", CHANNEL), ("SPUBLISH", SHARDED)] {
            let mut cmd = redis::cmd(command);
            cmd.arg(channel).arg(n);
            if client.query::<i64>(&cmd).await.is_ok() {
                *published
                    .lock()
                    .unwrap()
                    .entry(channel.to_string())
                    .or_default() += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The endpoint of the master owning `slot`, as the client's topology says.
async fn owner_of(client: &Client, slot: u16) -> Result<String, Error> {
    let topology = client.topology().expect("topology refresh is on");
    let snapshot = match topology.current() {
        Some(s) => s,
        None => {
            topology.refresh();
            let mut rx = topology.subscribe();
            rx.changed().await.ok();
            topology
                .current()
                .ok_or_else(|| Error::unreachable("no topology yet"))?
        }
    };
    Ok(snapshot
        .shard_for_slot(slot)
        .and_then(|s| s.master.as_ref())
        .map(|m| m.endpoint.to_string())
        .unwrap_or_default())
}

fn text(names: &[Vec<u8>]) -> Vec<String> {
    names
        .iter()
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect()
}
