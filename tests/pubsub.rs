//! Subscriptions through failovers, node replacements at new IPs, stale names and slot moves,
//! against real clusters, on the plain and the managed profile. A publisher sends numbered
//! messages on a channel, a pattern's channel and sharded channels; the checks read the
//! subscriber's stream as an application would. Requires the `test-util` feature.

mod support;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use support::{connected, crash_master_and_replace, init_tracing, median};
use tower_redis_cluster::{
    command::key_slot,
    harness::LocalCluster,
    pubsub::{Event, Kind, Subscriber, SubscriberConfig},
    redis, Client,
};

const CHANNEL: &str = "news";
const PATTERN: &str = "ev:*";
const PATTERN_CHANNEL: &str = "ev:one";

/// What the publisher did: per channel, each number's publish start, and whether it was
/// accepted.
#[derive(Default)]
struct Published {
    sent: BTreeMap<String, Vec<(u64, Instant, bool)>>,
    /// When each accepted publish was answered.
    acked: BTreeMap<(String, u64), Instant>,
    /// Receivers counted by the node that took each publish.
    receivers: BTreeMap<(String, u64), i64>,
}

/// What the stream said, in its order, with when it said it.
#[derive(Debug, Clone)]
enum Seen {
    Message(String, u64),
    Lost(Kind, Vec<String>),
    Back(Kind, Vec<String>, Duration),
    Overflow,
    /// What the test did then.
    Note(String),
}

fn names(names: &[Vec<u8>]) -> Vec<String> {
    names
        .iter()
        .map(|n| String::from_utf8(n.clone()).unwrap())
        .collect()
}

/// The master owning `channel`'s slot.
async fn owner_of(cluster: &LocalCluster, channel: &str) -> tower_redis_cluster::harness::NodeInfo {
    let slot = key_slot(channel.as_bytes());
    let owners = support::slot_owners(cluster).await;
    let id = &owners
        .iter()
        .find(|(s, e, _)| (*s..=*e).contains(&slot))
        .unwrap()
        .2;
    cluster.masters().into_iter().find(|m| &m.id == id).unwrap()
}

/// Two sharded channels, on different shards when there are several.
async fn sharded_channels(cluster: &LocalCluster) -> Vec<String> {
    let mut found: Vec<(String, String)> = Vec::new();
    for i in 0.. {
        let name = format!("orders:{{{i}}}");
        let owner = owner_of(cluster, &name).await.id;
        if cluster.shards() == 1 || found.iter().all(|(_, o)| *o != owner) {
            found.push((name, owner));
        }
        if found.len() == 2 {
            break;
        }
    }
    found.into_iter().map(|(n, _)| n).collect()
}

/// Which channel a subscription's name feeds.
fn channel_of(kind: Kind, name: &str) -> String {
    match kind {
        Kind::Pattern => PATTERN_CHANNEL.to_string(),
        _ => name.to_string(),
    }
}

struct Run {
    client: Client,
    subscriber_task: tokio::task::JoinHandle<Subscriber>,
    publisher: tokio::task::JoinHandle<()>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    published: Arc<Mutex<Published>>,
    seen: Arc<Mutex<Vec<(Instant, Seen)>>>,
    subscribed_at: Instant,
    sharded: Vec<String>,
}

async fn start(cluster: &LocalCluster) -> Run {
    let client = connected(cluster.client_builder()).await;
    let sharded = sharded_channels(cluster).await;
    let mut subscriber = client
        .subscriber_with(SubscriberConfig::default().client_name("pubsub-test"))
        .unwrap();
    subscriber.subscribe([CHANNEL]).await.unwrap();
    subscriber.psubscribe([PATTERN]).await.unwrap();
    subscriber.ssubscribe(sharded.clone()).await.unwrap();
    let subscribed_at = Instant::now();

    let seen = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let subscriber_task = {
        let seen = seen.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            loop {
                let next =
                    tokio::time::timeout(Duration::from_millis(200), subscriber.next()).await;
                let event = match next {
                    Ok(Some(e)) => e,
                    Ok(None) => panic!("the subscriber's stream ended"),
                    Err(_) if stop.load(std::sync::atomic::Ordering::SeqCst) => return subscriber,
                    Err(_) => continue,
                };
                let item = match event {
                    Event::Message(m) => Seen::Message(
                        m.channel_str().unwrap().to_string(),
                        m.payload_str().unwrap().parse().unwrap(),
                    ),
                    Event::Lost { kind, names: n, .. } => Seen::Lost(kind, names(&n)),
                    Event::Resubscribed {
                        kind,
                        names: n,
                        gap,
                        ..
                    } => Seen::Back(kind, names(&n), gap),
                    Event::Overflow { .. } => Seen::Overflow,
                    other => panic!("unexpected event {other:?}"),
                };
                seen.lock().unwrap().push((Instant::now(), item));
            }
        })
    };

    let published = Arc::new(Mutex::new(Published::default()));
    let publisher = {
        let client = client.clone();
        let published = published.clone();
        let stop = stop.clone();
        let mut channels: Vec<(String, &'static str)> = vec![
            (CHANNEL.to_string(), "PUBLISH"),
            (PATTERN_CHANNEL.to_string(), "PUBLISH"),
        ];
        channels.extend(sharded.iter().map(|c| (c.clone(), "SPUBLISH")));
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                n += 1;
                let sends = channels.iter().map(|(channel, command)| {
                    let client = client.clone();
                    async move {
                        let mut cmd = redis::cmd(command);
                        cmd.arg(channel).arg(n);
                        let started = Instant::now();
                        let reply = client.query::<i64>(&cmd).await;
                        (channel.clone(), started, reply)
                    }
                });
                for (channel, started, reply) in futures_util::future::join_all(sends).await {
                    let ok = reply.is_ok();
                    let mut published = published.lock().unwrap();
                    if let Ok(r) = reply {
                        published.receivers.insert((channel.clone(), n), r);
                        published.acked.insert((channel.clone(), n), Instant::now());
                    }
                    published
                        .sent
                        .entry(channel)
                        .or_default()
                        .push((n, started, ok));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    Run {
        client,
        subscriber_task,
        publisher,
        stop,
        published,
        seen,
        subscribed_at,
        sharded,
    }
}

/// How late a loss may be noticed: a health check's interval and timeout, and some margin.
const NOTICE: Duration = Duration::from_millis(2_500);

impl Run {
    fn note(&self, what: impl Into<String>) {
        self.seen
            .lock()
            .unwrap()
            .push((Instant::now(), Seen::Note(what.into())));
    }

    /// Waits until every subscription is back (no `Lost` without its `Back`) and a message of
    /// each channel published after that arrived.
    async fn wait_all_flowing(&self, limit: Duration) {
        let started = Instant::now();
        loop {
            let since = Instant::now();
            tokio::time::sleep(Duration::from_millis(300)).await;
            let seen = self.seen.lock().unwrap().clone();
            let all_back = self.down(&seen).is_empty();
            let fresh = self.channels().iter().all(|c| {
                seen.iter()
                    .any(|(t, s)| *t > since && matches!(s, Seen::Message(ch, _) if ch == c))
            });
            if all_back && fresh {
                return;
            }
            assert!(
                started.elapsed() < limit,
                "subscriptions still down after {limit:?}: {:?}",
                self.down(&seen)
            );
        }
    }

    fn channels(&self) -> Vec<String> {
        let mut c = vec![CHANNEL.to_string(), PATTERN_CHANNEL.to_string()];
        c.extend(self.sharded.iter().cloned());
        c
    }

    /// Channels whose last word in the stream is `Lost`.
    fn down(&self, seen: &[(Instant, Seen)]) -> Vec<String> {
        let mut down = BTreeMap::new();
        for (_, s) in seen {
            match s {
                Seen::Lost(kind, n) => n.iter().for_each(|n| {
                    down.insert(channel_of(*kind, n), true);
                }),
                Seen::Back(kind, n, _) => n.iter().for_each(|n| {
                    down.insert(channel_of(*kind, n), false);
                }),
                _ => {}
            }
        }
        down.into_iter()
            .filter(|(_, d)| *d)
            .map(|(c, _)| c)
            .collect()
    }

    /// Stops, checks what the stream said against what was published, and returns the
    /// resume delays: from the first accepted publish after a loss to the resubscription.
    async fn finish(self) -> Vec<Duration> {
        self.wait_all_flowing(Duration::from_secs(20)).await;
        let channels = self.channels();
        let Run {
            client,
            subscriber_task,
            publisher,
            stop,
            published,
            seen,
            subscribed_at,
            ..
        } = self;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        publisher.await.unwrap();
        // Let the last messages arrive.
        tokio::time::sleep(Duration::from_millis(500)).await;
        drop(subscriber_task.await.unwrap());
        let seen = seen.lock().unwrap().clone();
        let receivers = std::mem::take(&mut published.lock().unwrap().receivers);
        let acked = std::mem::take(&mut published.lock().unwrap().acked);
        let published = std::mem::take(&mut published.lock().unwrap().sent);
        for (t, s) in &seen {
            if let Seen::Note(what) = s {
                println!(
                    "{:>6} ms: {what}",
                    t.duration_since(subscribed_at).as_millis()
                );
            }
        }
        let mut resumes = Vec::new();
        let mut total_lost = 0;
        for channel in channels {
            let sent = &published[&channel];
            let ok: BTreeMap<u64, Instant> =
                sent.iter().filter(|s| s.2).map(|s| (s.0, s.1)).collect();
            assert!(
                ok.len() > 50,
                "{channel}: only {} publishes accepted",
                ok.len()
            );
            // The stream as this channel's application sees it.
            let mine: Vec<(Instant, Seen)> = seen
                .iter()
                .filter(|(_, s)| match s {
                    Seen::Message(c, _) => *c == channel,
                    Seen::Lost(k, n) | Seen::Back(k, n, _) => {
                        n.iter().any(|n| channel_of(*k, n) == channel)
                    }
                    Seen::Overflow | Seen::Note(_) => true,
                })
                .cloned()
                .collect();
            // 1. No message twice, and none missing without a `Lost` (or `Overflow`) between
            // the messages before and after it in the stream. Messages may come out of order:
            // the cluster forwards a `PUBLISH` from the node that took it, and two publishes
            // taken by two nodes race.
            let mut received = std::collections::BTreeSet::new();
            let mut out_of_order = 0;
            let mut repeated = 0;
            let mut last = 0u64;
            // Where each number was last delivered, in the stream.
            let mut position: BTreeMap<u64, usize> = BTreeMap::new();
            let mut down = false;
            for (i, (_, s)) in mine.iter().enumerate() {
                match s {
                    Seen::Lost(..) => down = true,
                    Seen::Back(..) => down = false,
                    Seen::Message(_, n) => assert!(
                        !down,
                        "{channel}: {n} delivered between a Lost and its Resubscribed"
                    ),
                    _ => {}
                }
                if let Seen::Message(_, n) = s {
                    if let Some(first) = position.insert(*n, i) {
                        // Twice is allowed only across a resubscription: the cluster may have
                        // been forwarding it to the new node as the old one delivered it.
                        let moved = mine[first..i]
                            .iter()
                            .any(|(_, s)| matches!(s, Seen::Back(..)));
                        let around: Vec<_> = mine[first.saturating_sub(3)..(i + 2).min(mine.len())]
                            .iter()
                            .map(|(_, s)| format!("{s:?}"))
                            .collect();
                        assert!(
                            moved,
                            "{channel}: {n} delivered twice on one subscription; receivers {:?}; stream {around:?}",
                            receivers.get(&(channel.clone(), *n))
                        );
                        repeated += 1;
                    }
                    received.insert(*n);
                    if *n < last {
                        out_of_order += 1;
                    }
                    last = last.max(*n);
                }
            }
            // Redis itself loses a PUBLISH that a node accepted just before it crashed, before
            // forwarding it over the cluster bus: no subscriber elsewhere can hear of it. Those
            // taken within 100 ms of a crash are not the subscriber's to report.
            let crashes: Vec<Instant> = seen
                .iter()
                .filter(|(_, s)| matches!(s, Seen::Note(n) if n.starts_with("killing")))
                .map(|(t, _)| *t)
                .collect();
            let near_a_crash = |at: Instant| {
                crashes
                    .iter()
                    .any(|k| at.max(*k).duration_since(at.min(*k)) < Duration::from_millis(100))
            };
            for n in ok.keys().filter(|n| !received.contains(n)) {
                if near_a_crash(ok[n]) {
                    continue;
                }
                let before = mine
                    .iter()
                    .rposition(|(_, s)| matches!(s, Seen::Message(_, m) if m < n));
                let after = mine
                    .iter()
                    .position(|(_, s)| matches!(s, Seen::Message(_, m) if m > n));
                let (Some(before), Some(after)) = (before, after) else {
                    continue;
                };
                let warned = (before.min(after)..before.max(after))
                    .any(|i| matches!(mine[i].1, Seen::Lost(..) | Seen::Overflow));
                if !warned {
                    let at = ok[n];
                    let around: Vec<String> = mine
                        .iter()
                        .filter(|(t, s)| {
                            !matches!(s, Seen::Message(..))
                                && (t.max(&at).duration_since(*t.min(&at))) < Duration::from_secs(3)
                        })
                        .map(|(t, s)| {
                            let ms = t.duration_since(subscribed_at).as_millis() as i64
                                - at.duration_since(subscribed_at).as_millis() as i64;
                            format!("{ms:+} ms {s:?}")
                        })
                        .collect();
                    let counts: Vec<_> = (n.saturating_sub(3)..n + 3)
                        .map(|m| (m, receivers.get(&(channel.clone(), m))))
                        .collect();
                    panic!(
                        "{channel}: {n} accepted by the cluster but never delivered, with no Lost around it: {around:?}; receivers {counts:?}"
                    );
                }
            }
            // 2. Every message published while the subscription stood was received: from the
            // subscription (or its re-establishment) until shortly before its next loss.
            let mut windows = Vec::new();
            let mut open = Some(subscribed_at);
            let mut lost_at = None;
            for (t, s) in &mine {
                match s {
                    Seen::Lost(..) => {
                        if let Some(from) = open.take() {
                            windows.push((from, t.checked_sub(NOTICE).unwrap_or(from)));
                        }
                        lost_at.get_or_insert(*t);
                    }
                    Seen::Back(_, _, gap) => {
                        assert!(!gap.is_zero(), "{channel}: a gap of zero");
                        open = Some(*t);
                        if let Some(at) = lost_at.take() {
                            // The cluster served this channel again at its first accepted
                            // publish after the loss was noticed.
                            let serving = acked
                                .iter()
                                .filter(|((c, _), a)| *c == channel && **a > at)
                                .map(|(_, a)| *a)
                                .min();
                            let resume =
                                serving.map_or(Duration::ZERO, |s| t.saturating_duration_since(s));
                            resumes.push(resume);
                            total_lost += 1;
                        }
                    }
                    _ => {}
                }
            }
            if let Some(from) = open {
                windows.push((from, Instant::now()));
            }
            let missing: Vec<u64> = ok
                .iter()
                .filter(|(n, at)| {
                    !received.contains(n) && windows.iter().any(|(from, to)| *at > from && *at < to)
                })
                .map(|(n, _)| *n)
                .collect();
            assert!(
                missing.is_empty(),
                "{channel}: published while subscribed, never received: {missing:?}"
            );
            println!(
                "{channel}: {} accepted, {} received ({out_of_order} out of order, {repeated} again after a resubscription), windows {}",
                ok.len(),
                received.len(),
                windows.len()
            );
        }
        println!("lost and re-established {total_lost} times; resume delays {resumes:?}");
        drop(client);
        resumes
    }
}

fn assert_prompt(mut resumes: Vec<Duration>) {
    assert!(
        !resumes.is_empty(),
        "no subscription was lost: the scenario tested nothing"
    );
    let m = median(&mut resumes);
    println!(
        "resume after the cluster served again: median {m:?}, max {:?}",
        resumes.iter().max().unwrap()
    );
    assert!(m <= Duration::from_millis(500), "median resume {m:?}");
}

/// The node a subscriber to `channel` is connected to (`PUBSUB NUMSUB` counts a node's own
/// clients).
async fn carrier_of(
    cluster: &LocalCluster,
    channel: &str,
) -> tower_redis_cluster::harness::NodeInfo {
    let mut numsub = redis::cmd("PUBSUB");
    numsub.arg("NUMSUB").arg(channel);
    for node in cluster.nodes() {
        let reply = cluster.node_command(node.addr, &numsub).await.unwrap();
        let (_, n): (String, i64) = redis::from_redis_value(reply).unwrap();
        if n > 0 {
            return node;
        }
    }
    panic!("no node has a subscriber to {channel}");
}

/// Three shards: the master of the first sharded channel crashes and is replaced at a new IP;
/// the second sharded channel's slot moves to another master and back; the master of shard 1
/// crashes; then the node carrying the channel and the pattern does.
async fn three_shards(mut cluster: LocalCluster) {
    let run = start(&cluster).await;
    run.wait_all_flowing(Duration::from_secs(10)).await;

    for round in 0..3 {
        let victim = match round {
            0 => owner_of(&cluster, &run.sharded[0]).await,
            1 => cluster.master_of(1),
            _ => carrier_of(&cluster, CHANNEL).await,
        };
        run.note(format!("killing {:?} {}", victim.role, victim.addr));
        cluster.kill_node(victim.addr).await.unwrap();
        cluster.wait_healthy(Duration::from_secs(30)).await.unwrap();
        run.note("healthy; replacing");
        cluster.replace_node(victim.addr).await.unwrap();
        run.note("replaced");
        run.wait_all_flowing(Duration::from_secs(20)).await;
        if round == 0 {
            // The second sharded channel's slot moves to another master, and back.
            let slot = key_slot(run.sharded[1].as_bytes());
            let home = owner_of(&cluster, &run.sharded[1]).await;
            let away = cluster
                .masters()
                .into_iter()
                .find(|m| m.addr != home.addr)
                .unwrap();
            for to in [away, home] {
                run.note(format!("moving slot {slot} to {}", to.addr));
                cluster
                    .migrate_slot(slot, to.addr, 100, Duration::ZERO)
                    .await
                    .unwrap();
                assert_eq!(owner_of(&cluster, &run.sharded[1]).await.addr, to.addr);
                run.wait_all_flowing(Duration::from_secs(20)).await;
            }
        }
    }
    assert_prompt(run.finish().await);
}

/// The seed's shape: one shard; its master crashes and is replaced at a new IP, twice, with
/// the configuration name frozen on the start-up IPs (a stale DNS record).
async fn one_shard(mut cluster: LocalCluster) {
    cluster.name_map().freeze(&cluster.config_endpoint(), true);
    let run = start(&cluster).await;
    run.wait_all_flowing(Duration::from_secs(10)).await;
    for _ in 0..2 {
        let topology = run.client.topology().unwrap().clone();
        // The client knows the replacement before the next crash (a stale name cannot tell).
        let want = cluster.nodes().len();
        let started = Instant::now();
        while topology.current().map_or(0, |t| t.nodes().count()) < want {
            topology.refresh();
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(started.elapsed() < Duration::from_secs(20));
        }
        let (old, new) = crash_master_and_replace(&mut cluster).await;
        assert_ne!(old.addr.ip(), new.addr.ip());
        run.wait_all_flowing(Duration::from_secs(20)).await;
    }
    assert_prompt(run.finish().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_follow_crashes_replacements_and_slot_moves_on_three_shards() {
    init_tracing();
    three_shards(support::cluster(3, 1).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_follow_the_seed_scenario_behind_a_stale_name() {
    init_tracing();
    one_shard(support::cluster(1, 1).await).await;
}

#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_follow_crashes_replacements_and_slot_moves_on_three_managed_shards() {
    init_tracing();
    let cluster = LocalCluster::builder()
        .shards(3)
        .replicas(1)
        .managed()
        .start()
        .await
        .expect("the managed cluster starts");
    three_shards(cluster).await;
}

#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_follow_the_seed_scenario_behind_a_stale_name_when_managed() {
    init_tracing();
    let cluster = LocalCluster::builder()
        .shards(1)
        .replicas(1)
        .managed()
        .start()
        .await
        .expect("the managed cluster starts");
    one_shard(cluster).await;
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Waits until `f` holds, at most `limit`.
async fn eventually(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let started = Instant::now();
    while !f() {
        assert!(started.elapsed() < limit, "{what} after {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribing_and_dropping_leave_no_connection_or_task_behind() {
    init_tracing();
    let cluster = support::cluster(3, 0).await;
    let client = connected(cluster.client_builder()).await;
    let sharded = sharded_channels(&cluster).await;
    let runtime = tokio::runtime::Handle::current().metrics();
    let fds = open_fds();
    let tasks = runtime.num_alive_tasks();

    let subscriber = client.subscriber().unwrap();
    subscriber.subscribe([CHANNEL, "other"]).await.unwrap();
    subscriber.psubscribe([PATTERN]).await.unwrap();
    subscriber.ssubscribe(sharded.clone()).await.unwrap();
    // One connection for the channels and patterns, one per master of a sharded channel (the
    // channels' node may be one of them), as the servers see them.
    assert!(subscribed_connections(&cluster).await >= 2);

    subscriber.unsubscribe(Vec::<String>::new()).await.unwrap();
    subscriber.punsubscribe([PATTERN]).await.unwrap();
    subscriber.sunsubscribe(sharded).await.unwrap();
    // The client's own topology probes open and close connections meanwhile: ours are gone
    // when the count is back at (or under) the baseline.
    eventually(Duration::from_secs(5), "connections still open", || {
        open_fds() <= fds
    })
    .await;
    assert_eq!(subscribed_connections(&cluster).await, 0);

    // And again, ended by a drop.
    subscriber.subscribe([CHANNEL]).await.unwrap();
    assert_eq!(subscribed_connections(&cluster).await, 1);
    drop(subscriber);
    eventually(Duration::from_secs(5), "connections or tasks left", || {
        open_fds() <= fds && runtime.num_alive_tasks() <= tasks
    })
    .await;
    let started = Instant::now();
    while subscribed_connections(&cluster).await > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a subscribed connection outlived its subscriber"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connections with a subscription, over every node (`CLIENT LIST`: `sub`, `psub`, `ssub`).
async fn subscribed_connections(cluster: &LocalCluster) -> usize {
    let mut list = redis::cmd("CLIENT");
    list.arg("LIST");
    let mut n = 0;
    for node in cluster.nodes() {
        let text: String =
            redis::from_redis_value(cluster.node_command(node.addr, &list).await.unwrap()).unwrap();
        n += text
            .lines()
            .filter(|l| {
                l.split(' ').any(|f| {
                    ["sub=", "psub=", "ssub="]
                        .iter()
                        .any(|p| f.strip_prefix(p).is_some_and(|v| v != "0"))
                })
            })
            .count();
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_gets_a_bounded_buffer_and_an_overflow_event() {
    init_tracing();
    let cluster = support::cluster(3, 0).await;
    let client = connected(cluster.client_builder()).await;
    let mut subscriber = client
        .subscriber_with(SubscriberConfig::default().buffer(4))
        .unwrap();
    subscriber.ssubscribe(["slow:{1}"]).await.unwrap();
    for n in 1..=20 {
        let mut publish = redis::cmd("SPUBLISH");
        publish.arg("slow:{1}").arg(n);
        assert_eq!(client.query::<i64>(&publish).await.unwrap(), 1);
    }
    // Four wait; the rest were dropped as they came, but for those that arrived after the
    // consumer had made room: they follow the overflow, in order.
    let mut got = Vec::new();
    let mut accounted = 0;
    while accounted < 20 {
        match tokio::time::timeout(Duration::from_secs(5), subscriber.next()).await {
            Ok(Some(Event::Message(m))) => {
                got.push(m.payload_str().unwrap().to_string());
                accounted += 1;
            }
            Ok(Some(Event::Overflow { dropped })) => {
                got.push(format!("dropped {dropped}"));
                accounted += dropped;
            }
            other => panic!("{got:?} then {other:?}"),
        }
    }
    assert_eq!(got[..4], ["1", "2", "3", "4"], "{got:?}");
    let dropped: u64 = got[4]
        .strip_prefix("dropped ")
        .expect("an overflow")
        .parse()
        .unwrap();
    let after: Vec<u64> = got[5..].iter().map(|m| m.parse().unwrap()).collect();
    let expected: Vec<u64> = (4 + dropped + 1..=20).collect();
    assert_eq!(after, expected, "{got:?}");
    // Bad input is refused, typed.
    let empty = subscriber
        .subscribe(Vec::<String>::new())
        .await
        .unwrap_err();
    assert_eq!(
        empty.kind(),
        tower_redis_cluster::ErrorKind::Config,
        "{empty}"
    );
}

#[tokio::test]
async fn a_subscribe_no_node_confirms_fails_in_time_with_its_cause_and_is_withdrawn() {
    init_tracing();
    // Nothing listens there: every topology read is refused.
    let seeds = tower_redis_cluster::Seeds::parse(["127.0.0.1:1"]).unwrap();
    let source = tower_redis_cluster::topology::TopologySource::new(seeds);
    let subscriber = Subscriber::new(
        source,
        SubscriberConfig::default().subscribe_timeout(Duration::from_millis(300)),
    )
    .unwrap();
    let started = Instant::now();
    let error = subscriber.subscribe(["news"]).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        error.kind(),
        tower_redis_cluster::ErrorKind::Timeout,
        "{error}"
    );
    assert_eq!(error.sent(), tower_redis_cluster::Sent::No);
    let text = format!("{error}");
    assert!(
        text.contains("withdrawn") && text.contains("refused"),
        "{text}"
    );
    let bad = Subscriber::new(
        tower_redis_cluster::topology::TopologySource::new(
            tower_redis_cluster::Seeds::parse(["127.0.0.1:1"]).unwrap(),
        ),
        SubscriberConfig::default().buffer(0),
    )
    .unwrap_err();
    assert_eq!(bad.kind(), tower_redis_cluster::ErrorKind::Config, "{bad}");
}

/// `total_connections_received` of a node.
async fn connections_received(cluster: &LocalCluster, node: std::net::SocketAddr) -> u64 {
    let mut info = redis::cmd("INFO");
    info.arg("stats");
    let text: String =
        redis::from_redis_value(cluster.node_command(node, &info).await.unwrap()).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A review found the topology re-read every 50 ms, each read a fresh connection to every
/// node, for as long as a subscription's master stayed down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_whose_master_stays_down_reads_the_topology_at_a_backed_off_pace() {
    init_tracing();
    let mut cluster = support::cluster(3, 0).await;
    // No refresher of the client's: every topology read is the subscriber's own.
    let client = connected(cluster.client_builder().no_topology_refresh()).await;
    let subscriber = client.subscriber().unwrap();
    let channel = "down:{0}";
    subscriber.ssubscribe([channel]).await.unwrap();
    let master = owner_of(&cluster, channel).await;
    let other = cluster
        .masters()
        .into_iter()
        .find(|m| m.addr != master.addr)
        .unwrap();
    cluster.kill_node(master.addr).await.unwrap();
    // The shard has no replica: its slots stay without a master.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = connections_received(&cluster, other.addr).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reads = connections_received(&cluster, other.addr).await - before - 1;
    println!("topology reads in 3 s with the master down: {reads}");
    // Delays grow from 50 ms to 300 ms: some 15 reads; the old pace was 60.
    assert!(reads <= 30, "{reads} reads in 3 s");
    assert!(reads >= 3, "{reads}: the subscriber stopped looking");
    drop(subscriber);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_the_acl_forbids_fails_at_once_with_the_servers_reason() {
    init_tracing();
    let cluster = support::cluster(1, 0).await;
    let mut acl = redis::cmd("ACL");
    acl.arg("SETUSER")
        .arg("reader")
        .arg("on")
        .arg(">reader-secret")
        .arg("~*")
        .arg("&allowed:*")
        .arg("+@all");
    cluster
        .node_command(cluster.masters()[0].addr, &acl)
        .await
        .unwrap();
    let client = connected(
        cluster
            .client_builder()
            .credentials("reader", "reader-secret"),
    )
    .await;
    let subscriber = client.subscriber().unwrap();
    let started = Instant::now();
    let refused = subscriber.subscribe(["forbidden"]).await.unwrap_err();
    assert_eq!(
        refused.kind(),
        tower_redis_cluster::ErrorKind::Auth,
        "{refused}"
    );
    assert!(
        format!("{refused}").contains("no permissions to access one of the channels"),
        "{refused}"
    );
    // Not after the subscribe timeout (5 s): the refusal does not pass by waiting.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    subscriber.subscribe(["allowed:1"]).await.unwrap();
    // The secret is in no error text.
    assert!(!format!("{refused:?}").contains("reader-secret"));
}

/// The stream's contract at a resubscription: after a `Lost`, no message of that subscription
/// comes before its `Resubscribed`. The servers cut every subscribed connection while
/// publishers keep the channels busy, so the new connection's first messages race its
/// confirmation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_message_comes_between_a_loss_and_its_resubscription() {
    init_tracing();
    let cluster = support::cluster(3, 0).await;
    let client = connected(cluster.client_builder()).await;
    let sharded = sharded_channels(&cluster).await[0].clone();
    let mut subscriber = client
        .subscriber_with(SubscriberConfig::default().buffer(1 << 16))
        .unwrap();
    subscriber.subscribe([CHANNEL]).await.unwrap();
    subscriber.psubscribe([PATTERN]).await.unwrap();
    subscriber.ssubscribe([sharded.clone()]).await.unwrap();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut publishers = Vec::new();
    for (channel, command) in [
        (CHANNEL.to_string(), "PUBLISH"),
        (PATTERN_CHANNEL.to_string(), "PUBLISH"),
        (sharded.clone(), "SPUBLISH"),
    ] {
        for _ in 0..4 {
            let client = client.clone();
            let stop = stop.clone();
            let channel = channel.clone();
            publishers.push(tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let mut cmd = redis::cmd(command);
                    cmd.arg(&channel).arg("x");
                    let _ = client.query::<i64>(&cmd).await;
                }
            }));
        }
    }

    // Per subscription: down (between a Lost and its Resubscribed) or up.
    let key = |kind: Kind, name: &str| format!("{kind:?}:{name}");
    let mut down: BTreeMap<String, bool> = BTreeMap::new();
    let mut violations = Vec::new();
    let mut cuts = 0;
    let mut backs = 0;
    let started = Instant::now();
    let mut kill = redis::cmd("CLIENT");
    kill.arg("KILL").arg("TYPE").arg("pubsub");
    while cuts < 6 {
        assert!(started.elapsed() < Duration::from_secs(60), "too slow");
        // All up: cut every subscribed connection.
        if down.values().all(|d| !d) && backs >= cuts * 3 {
            for node in cluster.nodes() {
                cluster.node_command(node.addr, &kill).await.unwrap();
            }
            cuts += 1;
        }
        let event = tokio::time::timeout(Duration::from_secs(10), subscriber.next())
            .await
            .expect("the stream went quiet")
            .expect("the stream ended");
        match event {
            Event::Message(m) => {
                let k = match &m.pattern {
                    Some(p) => key(Kind::Pattern, std::str::from_utf8(p).unwrap()),
                    None => key(m.kind, m.channel_str().unwrap()),
                };
                if down.get(&k) == Some(&true) {
                    violations.push(k);
                }
            }
            Event::Lost { kind, names: n, .. } => {
                for n in names(&n) {
                    down.insert(key(kind, &n), true);
                }
            }
            Event::Resubscribed { kind, names: n, .. } => {
                for n in names(&n) {
                    down.insert(key(kind, &n), false);
                    backs += 1;
                }
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for p in publishers {
        p.await.unwrap();
    }
    assert!(
        violations.is_empty(),
        "{} message(s) between a Lost and its Resubscribed: {:?}",
        violations.len(),
        violations.iter().collect::<std::collections::BTreeSet<_>>()
    );
}
