//! [`RedisService`]: any `redis` connection as a [`tower::Service`].
//!
//! The `redis` crate's connections (`cluster_async::ClusterConnection`, `ConnectionManager`,
//! `MultiplexedConnection`, or a user's own [`ConnectionLike`]) are cheap to clone handles onto a
//! shared, multiplexed connection. `RedisService` clones the handle per call, so it is always
//! ready and many calls run at once; every failure is classified into an [`Error`] here, once —
//! with the command in view, so that [`Sent`](crate::Sent) says whether *this* command may have
//! run (a refused command did not; a script that failed, or a command sent to several nodes,
//! may have).
//!
//! Because the connection is shared, commands that change its state for every caller —
//! `WATCH`, `MULTI`/`EXEC`/`DISCARD` sent one by one, `SUBSCRIBE` and its kin, `MONITOR`,
//! `SELECT`, `AUTH`, `HELLO`, `READONLY`, `RESET`, `CLIENT REPLY` — are refused before anything
//! is sent ([`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported), with what to use
//! instead). A transaction goes as one atomic pipeline.
//!
//! Over a cluster connection two more things happen here: an `ASK` (a slot being migrated) is
//! followed at once to the importing node behind `ASKING`, and `SCAN` walks every master — its
//! cursor carries the master's index in its high bits — instead of one random node per call.
//!
//! ```no_run
//! use std::time::Duration;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use tower_redis_cluster::RedisService;
//!
//! # async fn run() -> Result<(), tower::BoxError> {
//! let client = redis::cluster::ClusterClient::new(vec!["redis://127.0.0.1:7000"])?;
//! let connection = client.get_async_connection().await?;
//!
//! let mut service = ServiceBuilder::new()
//!     .timeout(Duration::from_millis(500))
//!     .service(RedisService::new(connection));
//!
//! let mut set = redis::cmd("SET");
//! set.arg("greeting").arg("hello");
//! ServiceExt::<redis::Cmd>::ready(&mut service).await?.call(set).await?;
//! # Ok(()) }
//! ```

mod future;

use std::{
    borrow::Borrow,
    sync::Arc,
    task::{Context, Poll},
};

use redis::{aio::ConnectionLike, Cmd, Pipeline, Value};
use tower::Service;

pub use future::{PipelineFuture, ResponseFuture};

use crate::Error;

/// A `redis` connection as a `Service<Cmd>` and `Service<Pipeline>`.
///
/// `C` is a handle onto a multiplexed connection, cloned for every call. Requests are taken
/// as they are (`Cmd`, `Pipeline`) or shared (`Arc<Cmd>`, `Arc<Pipeline>`, as the retry layer
/// passes them, so that a retry needs no copy). The service never queues: backpressure and
/// reconnects are the connection's business (and, above it, the layers of this crate).
///
/// Commands that would hold or change the shared connection are refused with
/// [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) before anything is sent:
/// `WATCH`, `SUBSCRIBE`, `SELECT` and the like, and blocking commands (`BLPOP`, `XREAD BLOCK`,
/// …) — except on the service that [`ClusterConnector`](crate::ClusterConnector) makes,
/// which sends each blocking command on a connection of its own to its key's master. Over a
/// connection of your own, send blocking commands on a dedicated `redis` connection.
#[derive(Clone, Debug)]
pub struct RedisService<C> {
    connection: C,
    resends: bool,
    /// Where blocking commands go instead of the shared connection; without it they are
    /// refused. Shared: cloned only for a blocking command.
    blocking: Option<Arc<BlockingLane>>,
}

/// Connections of their own for blocking commands: a `BLPOP` on the shared connection would
/// hold up every other caller's commands to that node for as long as it blocks, outlast the
/// shared connection's response timeout, and — once its caller gave up — still pop an element
/// that nobody would receive.
#[derive(Clone, Debug)]
pub(crate) struct BlockingLane {
    pub(crate) nodes: crate::connect::NodeConnector,
    /// Added to the command's own block time to bound the wait for its reply.
    pub(crate) margin: std::time::Duration,
}

impl<C> RedisService<C> {
    /// Wraps a connection that sends each command once.
    pub fn new(connection: C) -> Self {
        RedisService {
            connection,
            resends: false,
            blocking: None,
        }
    }

    /// Sends blocking commands on connections of their own, made by `lane`.
    pub(crate) fn blocking_lane(mut self, lane: BlockingLane) -> Self {
        self.blocking = Some(Arc::new(lane));
        self
    }

    /// Declares that the connection may send a command again by itself — the `redis` crate's
    /// cluster client does, after a dropped connection, when its retries are above zero — and
    /// then reports only its *last* error. That error cannot prove the command was not applied,
    /// so every error is marked [`Sent::Maybe`](crate::Sent::Maybe) and a non-idempotent command
    /// is never retried on its word.
    pub fn resends_internally(mut self, resends: bool) -> Self {
        self.resends = resends;
        self
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &C {
        &self.connection
    }

    /// The wrapped connection, mutably.
    pub fn get_mut(&mut self) -> &mut C {
        &mut self.connection
    }

    /// Unwraps the connection.
    pub fn into_inner(self) -> C {
        self.connection
    }
}

/// `Service<$request>`: always ready — a multiplexed handle accepts commands at any time, and a
/// broken connection shows up as the command's error, which is where the layers above look for
/// it. The shared forms (`Arc<Cmd>`, `Arc<Pipeline>`) are what the [retry](crate::retry) layer
/// sends: a retry resends the same `Arc` instead of a copy.
macro_rules! redis_service {
    ($request:ty, $response:ty, $future:ty, $send:ident) => {
        impl<C> Service<$request> for RedisService<C>
        where
            C: ConnectionLike + Clone + Send + 'static,
        {
            type Response = $response;
            type Error = Error;
            type Future = $future;

            fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
                Poll::Ready(Ok(()))
            }

            fn call(&mut self, request: $request) -> Self::Future {
                self.$send(request)
            }
        }
    };
}

redis_service!(Cmd, Value, ResponseFuture, send_command);
redis_service!(Arc<Cmd>, Value, ResponseFuture, send_command);
redis_service!(Pipeline, Vec<Value>, PipelineFuture, send_pipeline);
redis_service!(Arc<Pipeline>, Vec<Value>, PipelineFuture, send_pipeline);

impl<C> RedisService<C>
where
    C: ConnectionLike + Clone + Send + 'static,
{
    fn send_command(&self, cmd: impl Borrow<Cmd> + Send + 'static) -> ResponseFuture {
        let mut connection = self.connection.clone();
        let resends = self.resends;
        let blocking = crate::command::blocking(cmd.borrow());
        let lane = blocking.and_then(|_| self.blocking.clone());
        ResponseFuture::new(Box::pin(async move {
            // Commands that change the state of the connection (WATCH, SUBSCRIBE, ...) would
            // change it for every caller: refused before anything is sent.
            if let Some(refused) = crate::command::shared_connection_refusal(cmd.borrow()) {
                return Err(refused);
            }
            if let Some((block, key)) = blocking {
                return match lane {
                    Some(lane) => lane.send(&mut connection, cmd.borrow(), block, key).await,
                    None => Err(blocking_refused(cmd.borrow())),
                };
            }
            if is_cluster::<C>() && is_scan(cmd.borrow()) {
                return cluster_scan(&mut connection, cmd.borrow())
                    .await
                    .map_err(Error::from_redis);
            }
            // Error replies arrive as `Value::ServerError` inside `Ok`; they are failures of the
            // command and must be classified like any other error (MOVED, WRONGTYPE, ...).
            let result = connection
                .req_packed_command(cmd.borrow())
                .await
                .and_then(Value::extract_error);
            let result = match result {
                Err(e) if is_ask(&e) => follow_ask(&mut connection, cmd.borrow(), e).await,
                other => other,
            };
            result.map_err(|e| {
                let error = crate::command::settle_sent(
                    cmd.borrow(),
                    Error::from_redis(e),
                    is_cluster::<C>(),
                );
                mark_resent(error, resends)
            })
        }))
    }

    fn send_pipeline(&self, pipeline: impl Borrow<Pipeline> + Send + 'static) -> PipelineFuture {
        let mut connection = self.connection.clone();
        let resends = self.resends;
        PipelineFuture::new(Box::pin(async move {
            let pipeline = pipeline.borrow();
            if let Some(refused) = crate::command::pipeline_refusal(pipeline) {
                return Err(refused);
            }
            if let Some(cmd) = pipeline
                .cmd_iter()
                .find(|c| crate::command::blocking(c).is_some())
            {
                return Err(blocking_refused(cmd).context("in a pipeline: send it on its own"));
            }
            // `query_async` unwraps MULTI/EXEC and drops ignored replies, so the caller gets one
            // value per command it did not ignore, for plain and atomic pipelines alike.
            pipeline
                .query_async::<Vec<Value>>(&mut connection)
                .await
                .map_err(|e| {
                    let error = Error::from_redis_pipeline(e, pipeline.len());
                    mark_resent(
                        crate::command::settle_pipeline_sent(pipeline, error),
                        resends,
                    )
                })
        }))
    }
}

/// The error of a blocking command that has no connection of its own to go on.
fn blocking_refused(cmd: &Cmd) -> Error {
    let name = crate::command::command_name(cmd).unwrap_or_default();
    Error::new(
        crate::ErrorKind::Unsupported,
        format!(
            "{name} blocks the connection it is sent on, and this one is shared by every caller: \
             send it through a cluster connection made by ClusterConnector (which gives each \
             blocking command a connection of its own), or on a connection of your own"
        ),
    )
}

impl BlockingLane {
    /// Sends `cmd`, which blocks for up to `block`, on a fresh connection to the master of the
    /// slot of its key (argument `key`), found through the cluster connection. The connection
    /// lives as long as the call: a caller that gives up drops it, and the server, seeing it
    /// close, stops waiting on its behalf — it pops nothing for a caller that is gone.
    async fn send<C: 'static>(
        &self,
        connection: &mut C,
        cmd: &Cmd,
        block: crate::command::Block,
        key: usize,
    ) -> Result<Value, Error> {
        use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
        let Some(cluster) = (connection as &mut dyn std::any::Any)
            .downcast_mut::<redis::cluster_async::ClusterConnection>()
        else {
            return Err(blocking_refused(cmd));
        };
        let Some(redis::Arg::Simple(key)) = cmd.args_iter().nth(key) else {
            return Err(Error::new(
                crate::ErrorKind::Command,
                "a blocking command without a key",
            )
            .with_sent(crate::Sent::No));
        };
        let slot = crate::command::key_slot(key);
        let slots = cluster
            .route_command(
                redis::cmd("CLUSTER").arg("SLOTS").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            )
            .await
            .map_err(|e| {
                // Only the lookup went out: the blocking command itself was not sent.
                Error::from_redis(e)
                    .with_sent(crate::Sent::No)
                    .context("asking the cluster which master serves the key (CLUSTER SLOTS)")
            })?;
        let Some((host, port)) = master_of_slot(&slots, slot) else {
            return Err(Error::new(
                crate::ErrorKind::ClusterDown,
                format!("no master serves slot {slot}"),
            )
            .with_sent(crate::Sent::No));
        };
        if tracing::enabled!(tracing::Level::DEBUG) {
            // The node is known here: it goes on the call's span (OpenTelemetry's fields).
            let span = tracing::Span::current();
            span.record("server.address", host.as_str());
            span.record("server.port", port);
        }
        let node = crate::connect::Endpoint::new(host, port)?;
        let response_timeout = match block {
            crate::command::Block::For(d) => Some(d.saturating_add(self.margin)),
            crate::command::Block::Forever => None,
        };
        // Nothing was written when the connection could not be made.
        let mut own = self
            .nodes
            .connect(&node, None, response_timeout)
            .await
            .map_err(|e| e.with_sent(crate::Sent::No).detached())?;
        own.req_packed_command(cmd)
            .await
            .and_then(Value::extract_error)
            .map_err(|e| crate::command::settle_sent(cmd, Error::from_redis(e), false).detached())
    }
}

/// Whether `C` is the redis crate's cluster client, which routes by slot, fans some commands
/// out to several nodes and answers `ASK` during migrations.
fn is_cluster<C: 'static>() -> bool {
    std::any::TypeId::of::<C>() == std::any::TypeId::of::<redis::cluster_async::ClusterConnection>()
}

fn is_ask(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::Ask)
}

/// An `ASK` means: during this slot's migration, this one command goes to the importing node,
/// behind `ASKING`. The redis crate's cluster client does that only with its own retries above
/// zero, and resending by slot goes back to the migrating node, which answers `ASK` again —
/// until the migration of that slot ends. So over a cluster connection it is followed here, at
/// once. (Other connections never see `ASK`.) The answer, whatever it is, is the attempt's.
async fn follow_ask<C: 'static>(
    connection: &mut C,
    cmd: &Cmd,
    ask: redis::RedisError,
) -> redis::RedisResult<Value> {
    let Some(cluster) = (connection as &mut dyn std::any::Any)
        .downcast_mut::<redis::cluster_async::ClusterConnection>()
    else {
        return Err(ask);
    };
    let Some((host, port)) = ask
        .redirect_node()
        .and_then(|(target, _)| split_host_port(target))
    else {
        return Err(ask);
    };
    let mut pipe = redis::pipe();
    pipe.cmd("ASKING");
    pipe.add_command(cmd.clone());
    let route = redis::cluster_routing::SingleNodeRoutingInfo::ByAddress { host, port };
    let replies = cluster.route_pipeline(pipe, 1, 1, route).await?;
    replies
        .into_iter()
        .next()
        .unwrap_or(Value::Nil)
        .extract_error()
}

fn is_scan(cmd: &Cmd) -> bool {
    matches!(cmd.args_iter().next(), Some(redis::Arg::Simple(name)) if name.eq_ignore_ascii_case(b"SCAN"))
}

/// Bits of a cluster-wide `SCAN` cursor that hold the node's own cursor; the bits above hold
/// the index of the node (among the masters, by first slot).
const NODE_CURSOR_BITS: u32 = 48;

/// `SCAN` over a cluster connection: a cursor belongs to one node, and the cluster client
/// would send each call to a random one — an iteration that silently misses keys. Here the
/// cursor the caller sees walks the masters one after the other (ordered by their first slot,
/// which a failover does not change): its high bits are the master's index, its low 48 the
/// master's own cursor; 0 starts and ends the walk, as with one node. Each call asks any node
/// for the masters (`CLUSTER SLOTS`) and sends the node's `SCAN` to its master. As on a single
/// node, keys may come twice; a failover or resharding during the walk may also skip keys of
/// the shards involved.
async fn cluster_scan<C: 'static>(connection: &mut C, cmd: &Cmd) -> redis::RedisResult<Value> {
    use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
    let invalid = |what: &str| {
        redis::RedisError::from((
            redis::ErrorKind::Client,
            "invalid cluster-wide SCAN cursor",
            what.to_string(),
        ))
    };
    let Some(cluster) = (connection as &mut dyn std::any::Any)
        .downcast_mut::<redis::cluster_async::ClusterConnection>()
    else {
        return Err(invalid("not a cluster connection"));
    };
    // As packed: the redis crate's `scan`/`scan_match` (and their iterators) hold the cursor
    // as `Arg::Cursor`, written into the packed command.
    let args = packed_args(&cmd.get_packed_command())
        .ok_or_else(|| invalid("the command does not pack to an array of strings"))?;
    let mut args = args.into_iter().skip(1);
    let cursor: u64 = match args.next() {
        Some(c) => std::str::from_utf8(&c)
            .ok()
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| invalid("the cursor is not a number"))?,
        None => return Err(invalid("SCAN needs a cursor")),
    };
    let rest: Vec<Vec<u8>> = args.collect();
    let slots = cluster
        .route_command(
            redis::cmd("CLUSTER").arg("SLOTS").clone(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
        )
        .await?;
    let masters = masters_by_first_slot(&slots);
    let index = (cursor >> NODE_CURSOR_BITS) as usize;
    let node_cursor = cursor & ((1 << NODE_CURSOR_BITS) - 1);
    let Some((host, port)) = masters.get(index).cloned() else {
        // A cursor past the last master (the cluster shrank): the walk is over.
        return Ok(Value::Array(vec![
            Value::BulkString(b"0".to_vec()),
            Value::Array(vec![]),
        ]));
    };
    let mut node_scan = redis::cmd("SCAN");
    node_scan.arg(node_cursor);
    for a in &rest {
        node_scan.arg(&a[..]);
    }
    let reply = cluster
        .route_command(
            node_scan,
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port }),
        )
        .await?
        .extract_error()?;
    let Value::Array(mut parts) = reply else {
        return Err(invalid("unexpected SCAN reply"));
    };
    if parts.len() != 2 {
        return Err(invalid("unexpected SCAN reply"));
    }
    let keys = parts.pop().expect("two parts");
    let next: u64 = redis::from_redis_value(parts.pop().expect("two parts"))?;
    if next >> NODE_CURSOR_BITS != 0 {
        return Err(invalid("a node's cursor does not fit in 48 bits"));
    }
    let next = match next {
        0 if index + 1 < masters.len() => ((index + 1) as u64) << NODE_CURSOR_BITS,
        0 => 0,
        c => ((index as u64) << NODE_CURSOR_BITS) | c,
    };
    Ok(Value::Array(vec![
        Value::BulkString(next.to_string().into_bytes()),
        keys,
    ]))
}

/// The arguments of a packed command (`*N` then `N` bulk strings), or `None` if it is not one.
fn packed_args(packed: &[u8]) -> Option<Vec<Vec<u8>>> {
    fn line(rest: &[u8]) -> Option<(&[u8], &[u8])> {
        let end = rest.windows(2).position(|w| w == b"\r\n")?;
        Some((&rest[..end], &rest[end + 2..]))
    }
    fn number(digits: &[u8]) -> Option<usize> {
        std::str::from_utf8(digits).ok()?.parse().ok()
    }
    let (head, mut rest) = line(packed.strip_prefix(b"*")?)?;
    let count = number(head)?;
    let mut args = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let (len, body) = line(rest.strip_prefix(b"$")?)?;
        let len = number(len)?;
        let value = body.get(..len)?;
        rest = body.get(len..)?.strip_prefix(b"\r\n")?;
        args.push(value.to_vec());
    }
    Some(args)
}

/// The slot ranges of a `CLUSTER SLOTS` reply with their master: `(first, last, host, port)`.
fn slot_masters(reply: &Value) -> Vec<(i64, i64, String, u16)> {
    let Value::Array(ranges) = reply else {
        return Vec::new();
    };
    ranges
        .iter()
        .filter_map(|range| {
            let Value::Array(parts) = range else {
                return None;
            };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
                (parts.first(), parts.get(1), parts.get(2))
            else {
                return None;
            };
            let host = match master.first()? {
                Value::BulkString(h) => String::from_utf8_lossy(h).into_owned(),
                Value::SimpleString(h) => h.clone(),
                _ => return None,
            };
            let Value::Int(port) = master.get(1)? else {
                return None;
            };
            Some((*start, *end, host, u16::try_from(*port).ok()?))
        })
        .collect()
}

/// The masters of a `CLUSTER SLOTS` reply as `(host, port)`, ordered by the first slot they
/// serve.
fn masters_by_first_slot(reply: &Value) -> Vec<(String, u16)> {
    let mut masters: Vec<(i64, String, u16)> = Vec::new();
    for (start, _, host, port) in slot_masters(reply) {
        match masters
            .iter_mut()
            .find(|(_, h, p)| *h == host && *p == port)
        {
            Some(known) => known.0 = known.0.min(start),
            None => masters.push((start, host, port)),
        }
    }
    masters.sort();
    masters.into_iter().map(|(_, h, p)| (h, p)).collect()
}

/// The master serving `slot` in a `CLUSTER SLOTS` reply, as `(host, port)`.
fn master_of_slot(reply: &Value, slot: u16) -> Option<(String, u16)> {
    slot_masters(reply)
        .into_iter()
        .find(|(start, end, _, _)| (*start..=*end).contains(&i64::from(slot)))
        .map(|(_, _, host, port)| (host, port))
}

/// `host:port` or `[v6]:port` of a redirection.
fn split_host_port(target: &str) -> Option<(String, u16)> {
    let (host, port) = target.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host.to_string(), port.parse().ok()?))
}

fn mark_resent(error: Error, resends: bool) -> Error {
    if resends {
        error.with_sent(crate::Sent::Maybe)
    } else {
        error
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    /// Answers every command with the same raw reply.
    #[derive(Clone)]
    struct Replies(&'static [u8]);

    /// Answers every command with a MOVED error reply.
    const ALWAYS_MOVED: Replies = Replies(b"-MOVED 1 127.0.0.2:7000\r\n");

    impl ConnectionLike for Replies {
        fn req_packed_command<'a>(&'a mut self, _: &'a Cmd) -> redis::RedisFuture<'a, Value> {
            let raw = self.0;
            Box::pin(async move { redis::parse_redis_value(raw) })
        }

        fn req_packed_commands<'a>(
            &'a mut self,
            _: &'a Pipeline,
            _: usize,
            _: usize,
        ) -> redis::RedisFuture<'a, Vec<Value>> {
            let raw = self.0;
            Box::pin(async move { Ok(vec![redis::parse_redis_value(raw)?]) })
        }

        fn get_db(&self) -> i64 {
            0
        }
    }

    fn command(line: &str) -> Cmd {
        let mut words = line.split_whitespace();
        let mut c = redis::cmd(words.next().unwrap());
        for w in words {
            c.arg(w);
        }
        c
    }

    #[tokio::test]
    async fn sent_tells_the_truth_in_both_directions() {
        use crate::{ErrorKind::*, Sent::*};
        let cases: &[(&[u8], &str, crate::ErrorKind, crate::Sent)] = &[
            // A refused single command did not run, whatever the refusal.
            (
                b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
                "GET k",
                Command,
                No,
            ),
            (
                b"-ERR wrong number of arguments for 'get' command\r\n",
                "GET",
                Command,
                No,
            ),
            (
                b"-CROSSSLOT Keys in request don't hash to the same slot\r\n",
                "SUNIONSTORE d a b",
                Command,
                No,
            ),
            (
                b"-ERR value is not an integer or out of range\r\n",
                "INCR k",
                Command,
                No,
            ),
            (
                b"-NOSCRIPT No matching script. Please use EVAL.\r\n",
                "EVALSHA abc 0",
                Command,
                No,
            ),
            (
                b"-CLUSTERDOWN The cluster is down\r\n",
                "GET k",
                ClusterDown,
                No,
            ),
            // A script can fail after its first writes.
            (
                b"-ERR Error running script (call to f_abc): @user_script:1: oops\r\n",
                "EVAL s 0",
                Command,
                Maybe,
            ),
            (
                b"-WRONGTYPE Operation against a key script: abc, on @user_script:1.\r\n",
                "FCALL f 1 k",
                Command,
                Maybe,
            ),
            // ...but one refused before it ran did nothing: the redirect can be followed.
            (b"-MOVED 3999 127.0.0.1:6381\r\n", "EVAL s 1 k", Moved, No),
            (
                b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n",
                "FCALL f 2 {t}a {t}b",
                TryAgain,
                No,
            ),
            (
                b"-CLUSTERDOWN The cluster is down\r\n",
                "EVALSHA abc 1 k",
                ClusterDown,
                No,
            ),
            (
                b"-LOADING Redis is loading the dataset in memory\r\n",
                "EVAL s 1 k",
                Loading,
                No,
            ),
            // JSON.MSET's keys are every third argument.
            (
                b"-CLUSTERDOWN The cluster is down\r\n",
                "JSON.MSET a $ 1 b $ 2",
                ClusterDown,
                Maybe,
            ),
            (
                b"-CLUSTERDOWN The cluster is down\r\n",
                "JSON.MSET {t}a $ 1 {t}b $ 2",
                ClusterDown,
                No,
            ),
            // Sent to several nodes: one node's error says nothing of the others.
            (
                b"-CLUSTERDOWN The cluster is down\r\n",
                "FLUSHALL",
                ClusterDown,
                Maybe,
            ),
            (
                b"-CLUSTERDOWN The cluster is down\r\n",
                "FUNCTION LOAD lib",
                ClusterDown,
                Maybe,
            ),
            (
                b"-CLUSTERDOWN The cluster is down\r\n",
                "CONFIG SET maxmemory 1gb",
                ClusterDown,
                Maybe,
            ),
            (
                b"-CLUSTERDOWN The cluster is down\r\n",
                "DEL a b",
                ClusterDown,
                Maybe,
            ),
            (
                b"-CLUSTERDOWN The cluster is down\r\n",
                "MSET a 1 b 2",
                ClusterDown,
                Maybe,
            ),
            // ...unless every key lives in one slot: then it went to one node.
            (
                b"-CLUSTERDOWN The cluster is down\r\n",
                "DEL {t}a {t}b",
                ClusterDown,
                No,
            ),
            (
                b"-CLUSTERDOWN The cluster is down\r\n",
                "MSET {t}a 1 {t}b 2",
                ClusterDown,
                No,
            ),
            (
                b"-CLUSTERDOWN The cluster is down\r\n",
                "CONFIG GET maxmemory",
                ClusterDown,
                No,
            ),
        ];
        for (raw, line, kind, sent) in cases {
            let err = RedisService::new(Replies(raw))
                .oneshot(command(line))
                .await
                .unwrap_err();
            // The fake is one node: nothing fans out over it.
            let single_node = if crate::command::fans_out(&command(line)) {
                No
            } else {
                *sent
            };
            assert_eq!((err.kind(), err.sent()), (*kind, single_node), "{line}");
            // As the cluster client's errors are judged:
            let err = crate::command::settle_sent(&command(line), err, true);
            assert_eq!((err.kind(), err.sent()), (*kind, *sent), "{line}: {err}");
        }
    }

    #[tokio::test]
    async fn a_connection_that_resends_internally_never_claims_not_sent() {
        let precise = RedisService::new(ALWAYS_MOVED)
            .oneshot(redis::cmd("INCR"))
            .await
            .unwrap_err();
        assert_eq!(
            (precise.kind(), precise.sent()),
            (crate::ErrorKind::Moved, crate::Sent::No)
        );

        let resending = RedisService::new(ALWAYS_MOVED)
            .resends_internally(true)
            .oneshot(redis::cmd("INCR"))
            .await
            .unwrap_err();
        assert_eq!(
            (resending.kind(), resending.sent()),
            (crate::ErrorKind::Moved, crate::Sent::Maybe)
        );

        let mut pipe = redis::pipe();
        pipe.cmd("INCR").arg("k");
        let pipeline = RedisService::new(ALWAYS_MOVED)
            .resends_internally(true)
            .oneshot(pipe)
            .await
            .unwrap_err();
        assert_eq!(pipeline.sent(), crate::Sent::Maybe);
    }
}
