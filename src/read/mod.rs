//! Reads through a master's outage: [`ReadPolicy`] and the [`ReadRouting`] layer.
//!
//! While a master is down — crashed, its address swallowing packets, or already known failed
//! by its peers — every client we compared fails each call to its slots until a replica is
//! promoted: `cluster-node-timeout` and the election, 1–2 s at the least and 15 s with Redis's
//! default. Its replicas still hold the data. With [`ReadPolicy::PrimaryThenReplica`] a read
//! goes to the primary as always, and when that fails in a way an outage explains
//! (connection refused or reset, no reply in time, `CLUSTERDOWN`, `MASTERDOWN`, a `MOVED`
//! pointing back at the shard's own master — the inner client's detour when the master does
//! not answer) —
//! or when the topology already says the primary is failed or missing — the same read is sent
//! to a replica of the same slot, over a `READONLY` connection of the layer's own, within the
//! same call (and so within its deadline). A primary that has not answered within the
//! response timeout (an address that swallows packets answers never) gets a replica asked
//! alongside it; the first answer wins.
//!
//! **Set `cluster-allow-reads-when-down yes` on the cluster** (a parameter of ElastiCache and
//! MemoryDB parameter groups too) for reads to survive the whole outage: by default a replica
//! refuses reads with `CLUSTERDOWN` once it considers the cluster down — about
//! `cluster-node-timeout` after its master stopped answering, long before a replica of a
//! one-shard cluster is promoted.
//!
//! **A replica may be behind its master**: a read it serves can miss the last writes. That is
//! why the policy is opt-in. Writes never go to a replica: only commands the idempotency table
//! calls read-only, on one key (or keys of one slot) named right after the command, take that
//! path; anything else fails or is retried as without this layer.
//!
//! ```no_run
//! use tower_redis_cluster::{read::ReadPolicy, Client, Error};
//!
//! # async fn run() -> Result<(), Error> {
//! let client = Client::builder()
//!     .seed("clustercfg.my-cluster.example.com:6379")
//!     .read_policy(ReadPolicy::PrimaryThenReplica)
//!     .build()
//!     .await?;
//! # Ok(()) }
//! ```

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use tokio::time::Instant;

use futures_util::future::BoxFuture;
use redis::{aio::MultiplexedConnection, Cmd, Pipeline, Value};
use tower::Service;

use crate::{
    connect::{Endpoint, NodeConnector},
    topology::{NodeHealth, NodeRole, TopologyHandle, TopologyNode, TopologySnapshot},
    Error, ErrorKind, Idempotency,
};

/// Where reads go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReadPolicy {
    /// Every command to its slot's primary (the default).
    #[default]
    Primary,
    /// Reads to the primary; a read the primary cannot serve because it is down — or known
    /// down — is served by a replica of the same slot, possibly stale. See the
    /// [module docs](self).
    PrimaryThenReplica,
    /// Reads to a replica of the slot — one in the caller's zone first when
    /// [`Zones`] are given — then the others, the master last; possibly stale. Spreads reads
    /// off the masters, and keeps them in the zone (cross-zone traffic costs money and
    /// latency on a cloud).
    ReplicaPreferred,
}

/// Which zone (availability zone, rack) each node is in, and the caller's: with
/// [`ReadPolicy::ReplicaPreferred`] a read goes to a replica in the caller's zone first, and
/// to one in another zone when none there serves. Nodes are named by endpoint — `host:port` or
/// the host alone, as the cluster announces them (a host name, or an IP).
///
/// ```
/// use tower_redis_cluster::read::Zones;
///
/// let zones = Zones::new("eu-west-1a")
///     .node("node-2.my-cluster.example.com", "eu-west-1a")
///     .node("node-3.my-cluster.example.com", "eu-west-1b");
/// # let _ = zones;
/// ```
#[derive(Clone, Debug, Default)]
pub struct Zones {
    local: String,
    of: HashMap<String, String>,
}

impl Zones {
    /// The caller is in `local`.
    pub fn new(local: impl Into<String>) -> Self {
        Zones {
            local: local.into(),
            of: HashMap::new(),
        }
    }

    /// `node` (`host:port` or `host`) is in `zone`.
    pub fn node(mut self, node: impl Into<String>, zone: impl Into<String>) -> Self {
        self.of.insert(node.into(), zone.into());
        self
    }

    /// Whether `endpoint` is in the caller's zone.
    fn local(&self, endpoint: &Endpoint) -> bool {
        let zone = self
            .of
            .get(&endpoint.to_string())
            .or_else(|| self.of.get(endpoint.host()));
        zone == Some(&self.local)
    }
}

/// Per-shard fail-fast (a bulkhead): while a shard has no serving primary, its calls fail at
/// once with [`ErrorKind::ShardDown`] (unsent, not retried within the call) instead of each
/// waiting out its deadline — so they do not fill the application's concurrency, and calls for
/// the healthy shards go on at full speed. Reads under
/// [`ReadPolicy::PrimaryThenReplica`] go to a replica instead of failing.
///
/// A shard fails fast after [`after_failures`](Self::after_failures) calls in a row failed as
/// an outage fails them (refused, reset, timed out, `CLUSTERDOWN`, `MASTERDOWN`), or as soon as
/// the topology says its master failed or it has none. Then at most once per
/// [`probe_every`](Self::probe_every), one at a time, a probe asks the primary the topology
/// names — `EXISTS` of the calling command's key, on a connection of its own, not through the
/// inner client (a redis cluster client routing a call to a node it lost refreshes its slots
/// and reconnects to every node, the dead one too, holding every other call back meanwhile).
/// An answer that shows the node serves the slot lets the next call through the inner client
/// as the trial (its route may still lead to the old address), and the trial's success lets
/// the shard back in; each trip and each failed probe asks for a topology refresh, so the
/// probes follow a failover. Off by default: with it, a call whose
/// deadline would have outlasted a failover fails instead of waiting for it. Needs topology
/// refresh.
///
/// ```no_run
/// use std::time::Duration;
/// use tower_redis_cluster::{read::FailFastConfig, redis, Client, Error, ErrorKind};
///
/// # async fn run() -> Result<(), Error> {
/// let client = Client::builder()
///     .seed("clustercfg.my-cluster.example.com:6379")
///     .concurrency_limit(64)
///     .fail_fast(FailFastConfig::default().probe_every(Duration::from_millis(250)))
///     .build()
///     .await?;
/// match client.query::<Option<String>>(redis::cmd("GET").arg("k")).await {
///     // The shard is down: answer from a fallback at once instead of waiting.
///     Err(e) if e.kind() == ErrorKind::ShardDown => {}
///     other => {
///         other?;
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct FailFastConfig {
    /// Failed calls in a row that mark a shard down; default 3.
    pub after_failures: u32,
    /// How often a down shard's primary is probed; default 100 ms.
    pub probe_every: Duration,
}

impl Default for FailFastConfig {
    fn default() -> Self {
        FailFastConfig {
            after_failures: 3,
            probe_every: Duration::from_millis(100),
        }
    }
}

impl FailFastConfig {
    /// Sets [`after_failures`](Self::after_failures) (at least 1).
    pub fn after_failures(mut self, failures: u32) -> Self {
        self.after_failures = failures.max(1);
        self
    }

    /// Sets [`probe_every`](Self::probe_every).
    pub fn probe_every(mut self, every: Duration) -> Self {
        self.probe_every = every;
        self
    }
}

/// Commands whose first argument is not a key (or that have none): fail-fast leaves them be.
const KEYLESS: &[&str] = &[
    "ACL",
    "AUTH",
    "BGREWRITEAOF",
    "BGSAVE",
    "BITOP",
    "BLMPOP",
    "BZMPOP",
    "CLIENT",
    "CLUSTER",
    "COMMAND",
    "CONFIG",
    "DBSIZE",
    "DEBUG",
    "ECHO",
    "EVAL",
    "EVALSHA",
    "EVALSHA_RO",
    "EVAL_RO",
    "FAILOVER",
    "FCALL",
    "FCALL_RO",
    "FLUSHALL",
    "FLUSHDB",
    "FUNCTION",
    "HELLO",
    "INFO",
    "KEYS",
    "LASTSAVE",
    "LATENCY",
    "LMPOP",
    "MEMORY",
    "MIGRATE",
    "MODULE",
    "OBJECT",
    "PFDEBUG",
    "PING",
    "PUBLISH",
    "PUBSUB",
    "RANDOMKEY",
    "READONLY",
    "READWRITE",
    "REPLICAOF",
    "ROLE",
    "SAVE",
    "SCAN",
    "SCRIPT",
    "SELECT",
    "SHUTDOWN",
    "SINTERCARD",
    "SLAVEOF",
    "SLOWLOG",
    "STRALGO",
    "SWAPDB",
    "TIME",
    "WAIT",
    "WAITAOF",
    "XGROUP",
    "XINFO",
    "XREAD",
    "XREADGROUP",
    "ZDIFF",
    "ZINTER",
    "ZINTERCARD",
    "ZMPOP",
    "ZUNION",
];

/// Whether `table` (sorted, upper case) holds `name`, in any case.
fn listed(table: &[&str], name: &[u8]) -> bool {
    table
        .binary_search_by(|entry| {
            let upper = name.iter().map(u8::to_ascii_uppercase);
            entry.bytes().cmp(upper)
        })
        .is_ok()
}

/// The slot of `cmd`'s first key, for fail-fast: any command whose first argument is a key.
/// Blocking commands are left be too: one waiting for data must not be a down shard's probe.
fn key_first_slot(cmd: &Cmd) -> Option<u16> {
    if crate::command::fans_out(cmd) || crate::command::blocking(cmd).is_some() {
        return None;
    }
    let mut args = cmd.args_iter();
    let redis::Arg::Simple(name) = args.next()? else {
        return None;
    };
    // Module commands (`FT.SEARCH index …`) name no key first.
    if listed(KEYLESS, name) || name.contains(&b'.') {
        return None;
    }
    match args.next()? {
        redis::Arg::Simple(key) => Some(crate::command::key_slot(key)),
        _ => None,
    }
}

/// Where a shard stands for fail-fast.
#[derive(Default)]
struct ShardState {
    /// Calls in a row that failed as an outage fails them.
    failures: u32,
    down: Option<Down>,
    /// When a failure was last counted.
    last_counted: Option<Instant>,
    /// The topology snapshot that last marked it down: one snapshot marks it once.
    marked_by: Option<u64>,
}

struct Down {
    since: Instant,
    next_probe: Instant,
    /// A probe aside found the primary serving: the next call goes through the inner client as
    /// the trial (its route may still lead to the old address), and the shard is back only
    /// when that succeeds.
    trial: bool,
    /// While a probe is out: until when it may take. A probe that never reports (a call
    /// that was the probe, dropped by its caller's deadline) holds the next one back only
    /// until then.
    probing_until: Option<Instant>,
    cause: Option<Error>,
}

/// The least time a probe is given before another may go.
const PROBE_LEASE: Duration = Duration::from_secs(1);

/// Configured durations are clamped to this: beyond it an instant would overflow.
const LONGEST: Duration = Duration::from_secs(24 * 3600);

/// A call to a shard's primary, as fail-fast records it.
struct Recorded {
    shard: u16,
    slot: u16,
    probe: bool,
    /// A probe aside (`EXISTS` on a connection of its own), not a call through the inner
    /// client.
    aside: bool,
    started: Instant,
    master: Option<Endpoint>,
}

/// What fail-fast lets a call do.
enum Gate {
    Pass,
    /// A probe is due; the call is refused with the error unless it is the probe itself.
    Probe(Error),
    /// The call is the trial after a probe aside succeeded: it goes through as a probe.
    Trial,
    Refuse(Error),
}

/// Read commands whose key comes right after the command's name (all their keys, for the
/// multi-key ones, which must share a slot): the ones a replica may serve.
const KEY_FIRST_READS: &[&str] = &[
    "BITCOUNT",
    "BITFIELD_RO",
    "BITPOS",
    "DUMP",
    "EXISTS",
    "EXPIRETIME",
    "GEODIST",
    "GEOHASH",
    "GEOPOS",
    "GEORADIUSBYMEMBER_RO",
    "GEORADIUS_RO",
    "GEOSEARCH",
    "GET",
    "GETBIT",
    "GETRANGE",
    "HEXISTS",
    "HGET",
    "HGETALL",
    "HKEYS",
    "HLEN",
    "HMGET",
    "HRANDFIELD",
    "HSCAN",
    "HSTRLEN",
    "HVALS",
    "LCS",
    "LINDEX",
    "LLEN",
    "LPOS",
    "LRANGE",
    "MGET",
    "PEXPIRETIME",
    "PFCOUNT",
    "PTTL",
    "SCARD",
    "SDIFF",
    "SINTER",
    "SISMEMBER",
    "SMEMBERS",
    "SMISMEMBER",
    "SORT_RO",
    "SRANDMEMBER",
    "SSCAN",
    "STRLEN",
    "SUBSTR",
    "SUNION",
    "TTL",
    "TYPE",
    "XLEN",
    "XRANGE",
    "XREVRANGE",
    "ZCARD",
    "ZCOUNT",
    "ZLEXCOUNT",
    "ZMSCORE",
    "ZRANDMEMBER",
    "ZRANGE",
    "ZRANGEBYLEX",
    "ZRANGEBYSCORE",
    "ZRANK",
    "ZREVRANGE",
    "ZREVRANGEBYLEX",
    "ZREVRANGEBYSCORE",
    "ZREVRANK",
    "ZSCAN",
    "ZSCORE",
];

/// The slot a replica may serve `cmd` from: a read-only command whose key comes first.
fn replica_slot(cmd: &Cmd) -> Option<u16> {
    // Keys in several slots: the cluster client splits the command; no one replica has them.
    if crate::classify(cmd) != Idempotency::ReadOnly || crate::command::fans_out(cmd) {
        return None;
    }
    let mut args = cmd.args_iter();
    let redis::Arg::Simple(name) = args.next()? else {
        return None;
    };
    if !listed(KEY_FIRST_READS, name) {
        return None;
    }
    match args.next()? {
        redis::Arg::Simple(key) => Some(crate::command::key_slot(key)),
        _ => None,
    }
}

/// Whether a failure of the primary is one a replica can stand in for, or that says the shard
/// has no serving primary. A `MOVED` counts only when it points back at the shard's `master`
/// as the topology names it: what the other nodes answer for the slots of a master that does
/// not answer (a redirect elsewhere is a resharding, where a replica of the old owner may
/// already miss the keys that moved). Not `TRYAGAIN` (a migration, again) nor `Unreachable`
/// (the whole client, not one shard).
fn outage(error: &Error, master: Option<&Endpoint>) -> bool {
    match error.kind() {
        ErrorKind::Moved => match (error.redirect(), master) {
            (Some((_, to)), Some(master)) => to == master.to_string(),
            _ => false,
        },
        kind => matches!(
            kind,
            ErrorKind::Connection
                | ErrorKind::Timeout
                | ErrorKind::ClusterDown
                | ErrorKind::MasterDown
        ),
    }
}

/// What the layer shares between its clones: the policy, the topology it reads replicas
/// from, and its `READONLY` connections to them.
struct Shared {
    policy: ReadPolicy,
    topology: TopologyHandle,
    nodes: NodeConnector,
    response_timeout: Duration,
    replicas: Mutex<HashMap<Endpoint, MultiplexedConnection>>,
    client: crate::metrics::ClientName,
    fail_fast: Option<FailFastConfig>,
    zones: Option<Zones>,
    /// Per shard, by the first slot of its first range.
    shards: Mutex<HashMap<u16, ShardState>>,
}

impl Shared {
    /// Whether a call for the shard `shard` (whose master the topology says is `known_down`)
    /// may go to its primary.
    fn gate(&self, shard: u16, slot: u16, known_down: Option<u64>) -> Gate {
        if self.fail_fast.is_none() {
            return Gate::Pass;
        }
        let now = Instant::now();
        let mut shards = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        let state = shards.entry(shard).or_default();
        if let Some(sequence) = known_down {
            if state.down.is_none() && state.marked_by != Some(sequence) {
                state.marked_by = Some(sequence);
                self.trip(
                    state,
                    slot,
                    now,
                    None,
                    "the topology says its master failed",
                );
            }
        }
        let Some(down) = &mut state.down else {
            return Gate::Pass;
        };
        let out = down.probing_until.is_some_and(|until| now < until);
        let probe = !out && now >= down.next_probe;
        if probe && down.trial && down.probing_until.is_some() {
            // The last trial never reported (its caller's deadline dropped it): as good as
            // failed. Back to probing aside, and let the topology catch up.
            down.trial = false;
            self.topology.refresh();
        }
        if probe {
            down.probing_until = Some(now + self.probe_lease());
            if down.trial {
                return Gate::Trial;
            }
        }
        let mut error = Error::new(
            ErrorKind::ShardDown,
            format!(
                "the shard of slot {slot} has had no serving primary for {:?}: failing fast",
                now.saturating_duration_since(down.since)
            ),
        );
        if let Some(cause) = &down.cause {
            error = error.with_source(cause.clone());
        }
        if probe {
            Gate::Probe(error)
        } else {
            crate::metrics::fail_fast(&self.client);
            Gate::Refuse(error)
        }
    }

    /// How long a probe may take before another may go.
    fn probe_lease(&self) -> Duration {
        self.response_timeout.clamp(PROBE_LEASE, LONGEST)
    }

    /// Probes a down shard's primary off the inner client's path: `EXISTS key` on a
    /// connection of its own to `master`, as the topology names it. The inner client is not
    /// asked: a cluster client that has no connection to a node refreshes its slots when a
    /// call is routed there, and the redis crate's refresh reconnects to every node of the
    /// slot map — the dead one too, whose address may swallow packets until the connect
    /// timeout — while holding every other call back.
    fn probe_aside(self: &Arc<Self>, call: Recorded, master: Endpoint, key: Vec<u8>) {
        let shared = self.clone();
        let lease = self.probe_lease();
        tokio::spawn(async move {
            let mut cmd = redis::cmd("EXISTS");
            cmd.arg(&key[..]);
            let asked = async {
                let mut connection = shared.connection(&master).await?;
                cmd.query_async::<Value>(&mut connection)
                    .await
                    .map_err(Error::from_redis)
            };
            let result = match tokio::time::timeout(lease, asked).await {
                Ok(result) => result,
                Err(_) => Err(Error::timeout(format!(
                    "the probe of {master} was not answered within {lease:?}"
                ))),
            };
            let outcome = match &result {
                Ok(_) => Ok(()),
                Err(e) => {
                    if matches!(e.kind(), ErrorKind::Connection | ErrorKind::Timeout) {
                        shared.lock().remove(&master);
                    }
                    // Answers that say the node serves the slot: a command error, the ACL's
                    // refusal of the command, a redirect elsewhere or a migration (another
                    // node serves it, which the inner client follows). Anything else — an
                    // outage, `LOADING`, a failed handshake — does not.
                    let serves = match e.kind() {
                        ErrorKind::Command | ErrorKind::Ask | ErrorKind::TryAgain => true,
                        ErrorKind::Moved => !outage(e, Some(&master)),
                        ErrorKind::Auth => e.server_code().as_deref() == Some("NOPERM"),
                        _ => false,
                    };
                    if serves {
                        Ok(())
                    } else {
                        Err(e)
                    }
                }
            };
            tracing::debug!(node = %master, slot = call.slot, ok = outcome.is_ok(), "probed a down shard's primary");
            shared.record(&call, outcome);
        });
    }

    fn trip(
        &self,
        state: &mut ShardState,
        slot: u16,
        now: Instant,
        cause: Option<Error>,
        why: &'static str,
    ) {
        let probe_every = self
            .fail_fast
            .as_ref()
            .map_or(Duration::ZERO, |c| c.probe_every);
        tracing::warn!(
            slot,
            why,
            "shard down: its calls fail fast until a probe succeeds"
        );
        crate::metrics::fail_fast_tripped(&self.client);
        state.down = Some(Down {
            since: now,
            next_probe: now + probe_every,
            trial: false,
            probing_until: None,
            cause,
        });
        // The probes ask the primary the topology names: let it catch up with the failover.
        self.topology.refresh();
    }

    /// What a call to the shard's primary, begun at `started`, came to. `master` is the
    /// shard's master as the topology named it then: a `MOVED` back to it — what the other
    /// nodes answer for the slots of a master that does not answer — counts as a failure.
    fn record(&self, call: &Recorded, outcome: Result<(), &Error>) {
        let Some(config) = &self.fail_fast else {
            return;
        };
        let now = Instant::now();
        let mut shards = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        let state = shards.entry(call.shard).or_default();
        // A reply the server made proves it serves, whatever it said.
        let outcome = match outcome {
            Err(e) if e.kind() == ErrorKind::Command => Ok(()),
            other => other,
        };
        match outcome {
            // A probe aside answered: the trial decides (see `Down::trial`).
            Ok(()) if call.aside => {
                if let Some(down) = &mut state.down {
                    down.trial = true;
                }
            }
            Ok(()) => {
                state.failures = 0;
                // A call begun before the shard was marked down proves nothing about now.
                let current = state
                    .down
                    .as_ref()
                    .is_some_and(|d| call.probe || call.started >= d.since);
                if current {
                    let down = state.down.take().expect("checked");
                    tracing::info!(
                        slot = call.slot,
                        down_ms = now.saturating_duration_since(down.since).as_millis() as u64,
                        "shard serves again: fail-fast ended"
                    );
                }
            }
            // Calls that were in flight together and failed together (one connection reset)
            // count once: only a call begun after the last counted failure counts again.
            Err(e) if outage(e, call.master.as_ref()) => {
                if state.last_counted.is_none_or(|at| call.started >= at) {
                    state.failures += 1;
                    state.last_counted = Some(now);
                }
                if state.down.is_none() && state.failures >= config.after_failures {
                    self.trip(
                        state,
                        call.slot,
                        now,
                        Some(e.clone()),
                        "its calls kept failing",
                    );
                }
            }
            // Neither proof of health nor of an outage.
            Err(_) => {}
        }
        if let (true, Some(down)) = (call.probe, &mut state.down) {
            down.probing_until = None;
            if outcome.is_err() {
                // The trial (or the probe) failed: back to probing aside, and let the
                // topology catch up.
                down.trial = false;
                self.topology.refresh();
            }
            // The trial goes at once after a probe aside answered.
            down.next_probe = if down.trial {
                now
            } else {
                now + config.probe_every.min(LONGEST)
            };
        }
    }

    /// Where `slot` can be read besides the route the inner client takes — its shard's
    /// online replicas, then its master as the topology names it (the inner client may still
    /// be on its way there after a failover) — and whether the primary is known down.
    fn replicas(&self, snapshot: &TopologySnapshot, slot: u16) -> (Vec<Endpoint>, bool) {
        let Some(shard) = snapshot.shard_for_slot(slot) else {
            return (Vec::new(), false);
        };
        let down = shard
            .master
            .as_ref()
            .is_none_or(|m| m.health == NodeHealth::Failed);
        // A replica reported loading is asked too, after the online ones: Redis 7.0 reports
        // a replica that has not seen a write since it synced as `loading` — and a replica
        // that really is loading answers `LOADING`, and the next is asked.
        let mut candidates: Vec<&TopologyNode> = shard
            .replicas
            .iter()
            .chain(shard.master.as_ref())
            .filter(|r| r.health != NodeHealth::Failed)
            .collect();
        candidates.sort_by_key(|n| {
            let remote = self.zones.as_ref().is_some_and(|z| !z.local(&n.endpoint));
            (
                n.role == NodeRole::Master,
                remote,
                n.health != NodeHealth::Online,
            )
        });
        let replicas = candidates.into_iter().map(|n| n.endpoint.clone()).collect();
        (replicas, down)
    }

    /// Where to read `slot` now: the topology may know more than when the call began.
    fn candidates(&self, slot: u16, earlier: Vec<Endpoint>) -> Vec<Endpoint> {
        match self.topology.current() {
            Some(s) => self.replicas(&s, slot).0,
            None => earlier,
        }
    }

    async fn connection(&self, endpoint: &Endpoint) -> Result<MultiplexedConnection, Error> {
        if let Some(c) = self.lock().get(endpoint) {
            return Ok(c.clone());
        }
        let mut connection = self
            .nodes
            .connect(endpoint, None, Some(self.response_timeout))
            .await?;
        redis::cmd("READONLY")
            .query_async::<()>(&mut connection)
            .await
            .map_err(|e| Error::from_redis(e).context(format_args!("READONLY on {endpoint}")))?;
        // Connections to nodes that left the cluster go (a replaced node's never errs again).
        let present: Option<Vec<Endpoint>> = self
            .topology
            .current()
            .map(|t| t.nodes().map(|n| n.endpoint.clone()).collect());
        let mut replicas = self.lock();
        if let Some(present) = present {
            replicas.retain(|e, _| present.contains(e));
        }
        replicas.insert(endpoint.clone(), connection.clone());
        Ok(connection)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Endpoint, MultiplexedConnection>> {
        self.replicas.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `cmd` on the first of `replicas` that answers; the primary's failure (if any) stays the
    /// cause when none does.
    async fn read_elsewhere(
        &self,
        cmd: &Cmd,
        replicas: Vec<Endpoint>,
        reason: &'static str,
    ) -> Result<Value, Error> {
        let mut last = None;
        for endpoint in replicas {
            let result = async {
                let mut connection = self.connection(&endpoint).await?;
                cmd.query_async::<Value>(&mut connection)
                    .await
                    .map_err(Error::from_redis)
            }
            .await;
            match result {
                Ok(value) => {
                    tracing::debug!(node = %endpoint, reason, "read served off the inner client's route");
                    crate::metrics::replica_read(&self.client, reason);
                    return Ok(value);
                }
                Err(e) => {
                    if matches!(e.kind(), ErrorKind::Connection | ErrorKind::Timeout) {
                        self.lock().remove(&endpoint);
                    }
                    tracing::debug!(node = %endpoint, error = %e, "replica read failed");
                    last = Some(e.context(format_args!("read from replica {endpoint}")));
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::unreachable("no replica of the slot serves")))
    }
}

/// Routes reads as its [`ReadPolicy`] says; see the [module docs](self). Made by
/// [`ClientBuilder::read_policy`](crate::ClientBuilder::read_policy); with
/// [`ReadPolicy::Primary`] it passes every call through.
pub struct ReadRouting<S> {
    inner: S,
    shared: Option<Arc<Shared>>,
}

/// What the client's builder says about routing.
#[derive(Clone, Debug, Default)]
pub(crate) struct Routing {
    pub(crate) policy: ReadPolicy,
    pub(crate) fail_fast: Option<FailFastConfig>,
    pub(crate) zones: Option<Zones>,
}

impl<S> ReadRouting<S> {
    pub(crate) fn new(
        inner: S,
        routing: Routing,
        topology: TopologyHandle,
        nodes: NodeConnector,
        response_timeout: Duration,
        client: crate::metrics::ClientName,
    ) -> Self {
        let Routing {
            policy,
            fail_fast,
            zones,
        } = routing;
        let shared = (policy != ReadPolicy::Primary || fail_fast.is_some()).then(|| {
            Arc::new(Shared {
                policy,
                topology,
                nodes,
                response_timeout,
                replicas: Mutex::new(HashMap::new()),
                client,
                fail_fast,
                zones,
                shards: Mutex::new(HashMap::new()),
            })
        });
        ReadRouting { inner, shared }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: Clone> Clone for ReadRouting<S> {
    fn clone(&self) -> Self {
        ReadRouting {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for ReadRouting<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadRouting")
            .field("policy", &self.shared.as_ref().map(|s| s.policy))
            .field("inner", &self.inner)
            .finish()
    }
}

pin_project_lite::pin_project! {
    /// The future of a [`ReadRouting`] call: the inner one, or a read that may end on a
    /// replica.
    pub struct ReadFuture<F> {
        #[pin]
        direct: Option<F>,
        routed: Option<BoxFuture<'static, Result<Value, Error>>>,
    }
}

impl<F> ReadFuture<F> {
    fn direct(inner: F) -> Self {
        ReadFuture {
            direct: Some(inner),
            routed: None,
        }
    }

    fn routed(routed: BoxFuture<'static, Result<Value, Error>>) -> Self {
        ReadFuture {
            direct: None,
            routed: Some(routed),
        }
    }
}

impl<F> fmt::Debug for ReadFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.routed.is_some() {
            "ReadFuture::Routed"
        } else {
            "ReadFuture::Direct"
        })
    }
}

impl<F> Future for ReadFuture<F>
where
    F: Future<Output = Result<Value, Error>>,
{
    type Output = Result<Value, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Some(inner) = this.direct.as_pin_mut() {
            return inner.poll(cx);
        }
        match this.routed {
            Some(routed) => routed.as_mut().poll(cx),
            None => Poll::Ready(Err(Error::closed("a read future polled after it ended"))),
        }
    }
}

/// A command, owned or shared, that the layer can read and keep for a second try.
pub trait ReadRequest: Send + 'static {
    /// The command.
    fn command(&self) -> &Cmd;
}

impl ReadRequest for Cmd {
    fn command(&self) -> &Cmd {
        self
    }
}

impl ReadRequest for Arc<Cmd> {
    fn command(&self) -> &Cmd {
        self
    }
}

impl<S, R> Service<R> for ReadRouting<S>
where
    S: Service<R, Response = Value, Error = Error>
        + Service<Arc<Cmd>, Response = Value, Error = Error>,
    <S as Service<Arc<Cmd>>>::Future: Send + 'static,
    R: ReadRequest + Into<Arc<Cmd>>,
{
    type Response = Value;
    type Error = Error;
    type Future = ReadFuture<<S as Service<R>>::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        <S as Service<R>>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let Some(shared) = &self.shared else {
            return ReadFuture::direct(self.inner.call(request));
        };
        let cmd = request.command();
        let read_slot = match shared.policy {
            ReadPolicy::PrimaryThenReplica | ReadPolicy::ReplicaPreferred => replica_slot(cmd),
            ReadPolicy::Primary => None,
        };
        let slot = match (read_slot, &shared.fail_fast) {
            (Some(slot), _) => slot,
            (None, Some(_)) => match key_first_slot(cmd) {
                Some(slot) => slot,
                None => return ReadFuture::direct(self.inner.call(request)),
            },
            (None, None) => return ReadFuture::direct(self.inner.call(request)),
        };
        let snapshot = shared.topology.current();
        let (replicas, down, shard, master) = match snapshot.as_deref() {
            Some(s) => {
                let (replicas, down) = shared.replicas(s, slot);
                let of_slot = s.shard_for_slot(slot);
                let shard = of_slot
                    .and_then(|sh| sh.slots.first())
                    .map_or(slot, |r| *r.start());
                let master = of_slot
                    .and_then(|sh| sh.master.as_ref())
                    .map(|m| m.endpoint.clone());
                (replicas, down, shard, master)
            }
            None => (Vec::new(), false, slot, None),
        };
        let replicas = if read_slot.is_some() {
            replicas
        } else {
            Vec::new()
        };
        let shared = shared.clone();
        if shared.policy == ReadPolicy::ReplicaPreferred && !replicas.is_empty() {
            // Replicas first (the caller's zone first), the master last.
            let cmd: Arc<Cmd> = request.into();
            return ReadFuture::routed(Box::pin(async move {
                shared
                    .read_elsewhere(&cmd, replicas, "replica preferred")
                    .await
            }));
        }
        if down && !replicas.is_empty() {
            // The primary is known down: a read is not sent there.
            let cmd: Arc<Cmd> = request.into();
            return ReadFuture::routed(Box::pin(async move {
                shared
                    .read_elsewhere(&cmd, replicas, "primary known down")
                    .await
            }));
        }
        let known_down = down.then(|| snapshot.as_ref().map_or(0, |s| s.sequence));
        let cmd: Arc<Cmd> = request.into();
        let call = |probe: bool, aside: bool| Recorded {
            shard,
            slot,
            probe,
            aside,
            started: Instant::now(),
            master: master.clone(),
        };
        let (refused, probe) = match shared.gate(shard, slot, known_down) {
            Gate::Pass => (None, false),
            Gate::Trial => (None, true),
            // The probe goes aside, to the primary the topology names; this call fails fast
            // like the others. Without a named primary, the call is the probe.
            Gate::Probe(error) => match (&master, cmd.args_iter().nth(1)) {
                (Some(m), Some(redis::Arg::Simple(key))) => {
                    shared.probe_aside(call(true, true), m.clone(), key.to_vec());
                    crate::metrics::fail_fast(&shared.client);
                    (Some(error), false)
                }
                _ => (None, true),
            },
            Gate::Refuse(error) => (Some(error), false),
        };
        if let Some(error) = refused {
            if !replicas.is_empty() {
                return ReadFuture::routed(Box::pin(async move {
                    shared
                        .read_elsewhere(&cmd, replicas, "shard failing fast")
                        .await
                }));
            }
            return ReadFuture::routed(Box::pin(async move {
                // An answer with no I/O at all: a caller that loops on it must still yield
                // to the runtime now and then, or it starves every other task.
                tokio::task::coop::consume_budget().await;
                Err(error)
            }));
        }
        let call = call(probe, false);
        let primary = <S as Service<Arc<Cmd>>>::call(&mut self.inner, cmd.clone());
        if read_slot.is_none() {
            // A write (or a read with no replica to turn to): the primary's answer, recorded.
            return ReadFuture::routed(Box::pin(async move {
                let result = primary.await;
                shared.record(&call, result.as_ref().map(|_| ()));
                result
            }));
        }
        ReadFuture::routed(Box::pin(async move {
            let mut primary = std::pin::pin!(primary);
            let hedge = tokio::time::sleep(shared.response_timeout);
            let error = tokio::select! {
                result = &mut primary => {
                    shared.record(&call, result.as_ref().map(|_| ()));
                    match result {
                        Ok(value) => return Ok(value),
                        Err(e) if outage(&e, call.master.as_ref()) => e,
                        Err(e) => return Err(e),
                    }
                },
                () = hedge => {
                    // No answer in a response timeout: a primary whose address swallows
                    // packets may hold the call until its deadline. Ask a replica as well, and
                    // take the first answer.
                    let replicas = shared.candidates(slot, replicas);
                    if replicas.is_empty() {
                        let result = primary.await;
                        shared.record(&call, result.as_ref().map(|_| ()));
                        return result;
                    }
                    let replica = shared.read_elsewhere(&cmd, replicas, "primary slow");
                    let mut replica = std::pin::pin!(replica);
                    return tokio::select! {
                        result = &mut primary => {
                            shared.record(&call, result.as_ref().map(|_| ()));
                            match result {
                                Ok(value) => Ok(value),
                                Err(e) if outage(&e, call.master.as_ref()) => replica.await.map_err(|_| e),
                                Err(e) => Err(e),
                            }
                        },
                        result = &mut replica => match result {
                            Ok(value) => {
                                // The primary's fate is unknown: a probe ends without a word.
                                shared.record(&call, Err(&Error::closed("abandoned")));
                                Ok(value)
                            }
                            Err(_) => {
                                let result = primary.await;
                                shared.record(&call, result.as_ref().map(|_| ()));
                                result
                            }
                        },
                    };
                }
            };
            let replicas = shared.candidates(slot, replicas);
            if replicas.is_empty() {
                return Err(error);
            }
            shared
                .read_elsewhere(&cmd, replicas, "primary failed")
                .await
                .map_err(|replica| {
                    tracing::debug!(error = %replica, "no replica served the read either");
                    error
                })
        }))
    }
}

/// Pipelines pass through: their commands may span slots and include writes.
impl<S> Service<Arc<Pipeline>> for ReadRouting<S>
where
    S: Service<Arc<Pipeline>, Response = Vec<Value>, Error = Error>,
{
    type Response = Vec<Value>;
    type Error = Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Arc<Pipeline>) -> S::Future {
        self.inner.call(request)
    }
}

/// Pipelines pass through: their commands may span slots and include writes.
impl<S> Service<Pipeline> for ReadRouting<S>
where
    S: Service<Pipeline, Response = Vec<Value>, Error = Error>,
{
    type Response = Vec<Value>;
    type Error = Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        <S as Service<Pipeline>>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, request: Pipeline) -> S::Future {
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tables_are_sorted_for_their_search() {
        for table in [KEY_FIRST_READS, KEYLESS] {
            let mut sorted = table.to_vec();
            sorted.sort_unstable();
            assert_eq!(sorted, table);
        }
    }

    #[test]
    fn fail_fast_knows_the_first_key_of_most_commands_and_leaves_the_others_be() {
        let slot_of = |args: &[&str]| {
            let mut cmd = redis::cmd(args[0]);
            for a in &args[1..] {
                cmd.arg(*a);
            }
            key_first_slot(&cmd)
        };
        let k = Some(crate::command::key_slot(b"{u}k"));
        assert_eq!(slot_of(&["SET", "{u}k", "v"]), k);
        assert_eq!(slot_of(&["incr", "{u}k"]), k);
        assert_eq!(slot_of(&["HSET", "{u}k", "f", "v"]), k);
        assert_eq!(slot_of(&["PING"]), None);
        assert_eq!(slot_of(&["PUBLISH", "news", "x"]), None);
        assert_eq!(slot_of(&["EVAL", "return 1", "1", "{u}k"]), None);
        assert_eq!(slot_of(&["CLUSTER", "INFO"]), None);
        // Keys in several slots: the cluster client splits it.
        assert_eq!(slot_of(&["MGET", "a", "b", "c"]), None);
        // First arguments that are not keys, and a blocking command (never a probe).
        assert_eq!(slot_of(&["BITOP", "AND", "{u}d", "{u}k"]), None);
        assert_eq!(slot_of(&["FT.SEARCH", "idx", "*"]), None);
        assert_eq!(slot_of(&["xgroup", "CREATE", "{u}k", "g", "$"]), None);
        assert_eq!(slot_of(&["BLPOP", "{u}k", "0"]), None);
    }

    #[test]
    fn a_redirect_is_an_outage_only_when_it_points_back_at_the_shards_master() {
        let master = Endpoint::from(std::net::SocketAddr::from(([127, 0, 0, 1], 7000)));
        let moved = |to: &str| {
            let raw = format!("-MOVED 5 {to}\r\n");
            Error::from_redis(
                redis::parse_redis_value(raw.as_bytes())
                    .unwrap()
                    .extract_error()
                    .unwrap_err(),
            )
        };
        let back = moved("127.0.0.1:7000");
        assert_eq!(back.kind(), ErrorKind::Moved, "{back}");
        assert!(outage(&back, Some(&master)), "{back:?}");
        assert!(!outage(&moved("127.0.0.1:7001"), Some(&master)));
        assert!(!outage(&back, None));
        assert!(outage(&Error::new(ErrorKind::Connection, "reset"), None));
        assert!(!outage(&Error::new(ErrorKind::TryAgain, "migrating"), None));
        assert!(!outage(&Error::unreachable("rebuilding"), None));
    }

    /// A tracker with fail-fast on, no topology needed for the gate and the record.
    fn tracker() -> Shared {
        let source =
            crate::topology::TopologySource::new(crate::Seeds::parse(["127.0.0.1:1"]).unwrap());
        let layer = crate::topology::TopologyRefresh::new(
            (),
            source.clone(),
            crate::topology::RefreshConfig::default(),
            None,
        );
        Shared {
            policy: ReadPolicy::Primary,
            topology: layer.handle(),
            nodes: source.nodes(),
            response_timeout: Duration::from_secs(1),
            replicas: Mutex::new(HashMap::new()),
            client: crate::metrics::ClientName::default(),
            fail_fast: Some(FailFastConfig::default()),
            zones: None,
            shards: Mutex::new(HashMap::new()),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_shard_fails_fast_after_failures_in_a_row_and_one_probe_lets_it_back_in() {
        let shared = tracker();
        let refused = Error::new(ErrorKind::Connection, "refused");
        let pass = |g: Gate| matches!(g, Gate::Pass);
        let call = |probe: bool| Recorded {
            shard: 0,
            slot: 5,
            probe,
            aside: false,
            started: Instant::now(),
            master: None,
        };
        for _ in 0..2 {
            assert!(pass(shared.gate(0, 5, None)));
            shared.record(&call(false), Err(&refused));
        }
        // A success in between starts the count again.
        shared.record(&call(false), Ok(()));
        tokio::time::advance(Duration::from_millis(1)).await;
        for _ in 0..3 {
            assert!(pass(shared.gate(0, 5, None)));
            shared.record(&call(false), Err(&refused));
        }
        // Down: refused at once, unsent, with the cause; another shard is not affected.
        match shared.gate(0, 5, None) {
            Gate::Refuse(e) => {
                assert_eq!(e.kind(), ErrorKind::ShardDown);
                assert_eq!(e.sent(), crate::Sent::No);
                assert!(format!("{e}").contains("refused"), "{e}");
            }
            _ => panic!("not refused"),
        }
        assert!(pass(shared.gate(9000, 9001, None)));
        // A call begun before the shard went down that succeeds late proves nothing.
        let mut early = call(false);
        early.started -= Duration::from_millis(1);
        shared.record(&early, Ok(()));
        assert!(matches!(shared.gate(0, 5, None), Gate::Refuse(_)));
        // One probe per interval; while it runs, the others are refused.
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(matches!(shared.gate(0, 5, None), Gate::Probe(_)));
        assert!(matches!(shared.gate(0, 5, None), Gate::Refuse(_)));
        shared.record(&call(true), Err(&refused));
        assert!(matches!(shared.gate(0, 5, None), Gate::Refuse(_)));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(matches!(shared.gate(0, 5, None), Gate::Probe(_)));
        shared.record(&call(true), Ok(()));
        assert!(pass(shared.gate(0, 5, None)));
        // A probe that never reports (its caller's deadline dropped it) holds the next one
        // back only for its lease.
        shared.record(&call(false), Err(&refused));
        shared.record(&call(false), Err(&refused));
        shared.record(&call(false), Err(&refused));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(matches!(shared.gate(0, 5, None), Gate::Probe(_)));
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(matches!(shared.gate(0, 5, None), Gate::Refuse(_)));
        tokio::time::advance(Duration::from_millis(600)).await;
        assert!(matches!(shared.gate(0, 5, None), Gate::Probe(_)));
        shared.record(&call(true), Ok(()));
        assert!(pass(shared.gate(0, 5, None)));
        // The topology marks it down at once — once per snapshot.
        assert!(matches!(shared.gate(0, 5, Some(7)), Gate::Refuse(_)));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(matches!(shared.gate(0, 5, Some(7)), Gate::Probe(_)));
        shared.record(&call(true), Ok(()));
        assert!(
            pass(shared.gate(0, 5, Some(7))),
            "the same snapshot marks it down again"
        );
    }

    /// A probe aside that finds the primary serving does not reopen the shard by itself: the
    /// inner client's route may still lead to the old address. The next call goes through as
    /// the trial; only its success reopens it, and its failure goes back to probing aside.
    #[tokio::test(start_paused = true)]
    async fn a_probe_aside_that_succeeds_lets_one_trial_call_decide() {
        let shared = tracker();
        let refused = Error::new(ErrorKind::Connection, "refused");
        let call = |probe: bool, aside: bool| Recorded {
            shard: 0,
            slot: 5,
            probe,
            aside,
            started: Instant::now(),
            master: None,
        };
        for _ in 0..3 {
            assert!(matches!(shared.gate(0, 5, None), Gate::Pass));
            shared.record(&call(false, false), Err(&refused));
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        assert!(matches!(shared.gate(0, 5, None), Gate::Refuse(_)));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(matches!(shared.gate(0, 5, None), Gate::Probe(_)));
        shared.record(&call(true, true), Ok(()));
        // The trial, at once; the others still fail fast while it runs.
        assert!(matches!(shared.gate(0, 5, None), Gate::Trial));
        assert!(matches!(shared.gate(0, 5, None), Gate::Refuse(_)));
        // Its route still leads to the dead address: back to probing aside.
        shared.record(&call(true, false), Err(&refused));
        assert!(matches!(shared.gate(0, 5, None), Gate::Refuse(_)));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(matches!(shared.gate(0, 5, None), Gate::Probe(_)));
        shared.record(&call(true, true), Ok(()));
        assert!(matches!(shared.gate(0, 5, None), Gate::Trial));
        // A trial that never reports (its caller's deadline dropped it) counts as failed once
        // its lease is over: the next probe goes aside again.
        tokio::time::advance(Duration::from_millis(1_001)).await;
        assert!(matches!(shared.gate(0, 5, None), Gate::Probe(_)));
        shared.record(&call(true, true), Ok(()));
        assert!(matches!(shared.gate(0, 5, None), Gate::Trial));
        shared.record(&call(true, false), Ok(()));
        assert!(matches!(shared.gate(0, 5, None), Gate::Pass));
    }

    #[test]
    fn only_reads_whose_key_comes_first_may_go_to_a_replica() {
        let slot_of = |args: &[&str]| {
            let mut cmd = redis::cmd(args[0]);
            for a in &args[1..] {
                cmd.arg(*a);
            }
            replica_slot(&cmd)
        };
        assert_eq!(
            slot_of(&["GET", "{u}k"]),
            Some(crate::command::key_slot(b"{u}k"))
        );
        assert_eq!(
            slot_of(&["get", "{u}k"]),
            Some(crate::command::key_slot(b"{u}k"))
        );
        assert!(slot_of(&["HGETALL", "h"]).is_some());
        // Writes, keyless reads, reads whose key is elsewhere: never.
        assert_eq!(slot_of(&["SET", "k", "v"]), None);
        assert_eq!(slot_of(&["INCR", "k"]), None);
        assert_eq!(slot_of(&["GETDEL", "k"]), None);
        assert_eq!(slot_of(&["DBSIZE"]), None);
        assert_eq!(slot_of(&["EVAL_RO", "return 1", "1", "k"]), None);
        assert_eq!(slot_of(&["OBJECT", "ENCODING", "k"]), None);
        assert_eq!(slot_of(&["GET"]), None);
        assert!(slot_of(&["SORT_RO", "k"]).is_some());
        // Keys of several slots: the cluster client splits it; no one replica holds them.
        assert_eq!(slot_of(&["MGET", "a", "b", "c"]), None);
        assert!(slot_of(&["MGET", "{u}a", "{u}b"]).is_some());
    }
}
