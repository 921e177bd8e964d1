//! A Redis Cluster client for Rust services that keeps serving through failovers and nodes
//! replaced at new IPs, built from composable tower layers.
//!
//! ```no_run
//! use std::time::Duration;
//! use tower_redis_cluster::{redis::AsyncCommands, Client, Error};
//!
//! # async fn run() -> Result<(), Error> {
//! let mut client = Client::builder()
//!     .seed("clustercfg.my-cluster.example.com:6379") // kept as a name, resolved at every connect
//!     .timeout(Duration::from_millis(500)) // one deadline per call, retries included
//!     .build()
//!     .await?;
//! let () = client.set("greeting", "hello").await?;
//! let greeting: Option<String> = client.get("greeting").await?;
//! let visits: i64 = client.incr("visits", 1).await?; // never sent twice behind one Ok
//! # Ok(()) }
//! ```
//!
//! A managed Redis Cluster (AWS MemoryDB, ElastiCache) fails a shard over by promoting the
//! replica and replacing the old master with a node at a **new IP**. After two such failovers
//! none of the IPs a client learned at start-up exists. A client that froze its start-up nodes
//! as IPs — redis-py, issue #2472 — then fails every call with "Redis Cluster cannot be
//! connected", and its users' workaround was to catch the error and recreate the client.
//! This crate makes that workaround, and the policies around it, composable tower layers
//! around any Redis connection exposed as `tower::Service<redis::Cmd>` (and, below the retry
//! layer, which shares the request instead of copying it, `Service<Arc<redis::Cmd>>`):
//!
//! * [`Client`] — the layers below stacked with one deadline; a `tower::Service` and a
//!   `redis::aio::ConnectionLike` (typed commands, `Script`, pipelines);
//! * [`RedisService`] — a `redis` connection as a `Service<Cmd>` / `Service<Pipeline>`;
//! * [`retry`] — classification × idempotency × [`Sent`], backoff, budget, deadline;
//! * [`topology`] — periodic and error-driven refresh, the nodes it knows fed to rebuilds;
//! * [`rebuild`] — recreate the inner client from its seed *names* (never its frozen IPs):
//!   single-flight across clones, backoff, make-before-break, bounded waiting;
//! * [`Error`] — one classification of every failure, with [`Sent`] telling whether a command
//!   may have taken effect, and [`command`] telling whether it is safe to send again.
//!
//! The same stack by hand, to replace or omit any layer:
//!
//! ```no_run
//! use std::time::Duration;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use tower_redis_cluster::{rebuild::{RebuildConfig, RebuildLayer}, ClusterConnector, Seeds};
//!
//! # async fn run() -> Result<(), tower::BoxError> {
//! let seeds = Seeds::parse(["clustercfg.my-cluster.example.com:6379"])?; // kept as a name
//! let mut redis = ServiceBuilder::new()
//!     .timeout(Duration::from_secs(1))
//!     .layer(RebuildLayer::new(RebuildConfig::default()))
//!     .service(ClusterConnector::new(seeds));
//! let mut set = redis::cmd("SET");
//! set.arg("greeting").arg("hello");
//! // `oneshot` = ready + call; the request type picks `Service<Cmd>` over `Service<Pipeline>`.
//! redis.oneshot(set).await?;
//! # Ok(()) }
//! ```
//!
//! Features: `tls` (rustls), `metrics` (the `metrics` facade), `test-util` (the harness).
//!
//! The `test-util` feature adds the `harness` module: a local cluster of real `redis-server` processes,
//! one loopback IP per node, that can fail over, kill and replace nodes at new IPs — to
//! chaos-test your own services.
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![warn(missing_debug_implementations, unreachable_pub)]

pub mod backoff;
pub mod client;
pub mod command;
pub mod connect;
pub mod error;
#[cfg(feature = "test-util")]
pub mod harness;
pub mod metrics;
pub mod observability;
pub mod pubsub;
pub mod read;
pub mod rebuild;
pub mod retry;
pub mod service;
pub mod topology;

pub use client::{Client, ClientBuilder};
pub use command::{classify, Idempotency, IdempotencyTable};
pub use connect::{ClusterConnector, Connect, Credentials, Seeds, TlsConfig};
pub use error::{Error, ErrorKind, Sent};
/// The redis crate this one is built on (its `Cmd`, `Pipeline`, `Value`, `AsyncCommands`):
/// use it through this path and your commands are always of the version the `Client` takes.
pub use redis;
pub use service::RedisService;

/// The README's examples, compiled as doc tests so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// Entry points for the fuzz targets in `fuzz/` (built with `cargo fuzz`, which sets
/// `--cfg fuzzing`): the parsers that take untrusted input, which must never panic. Compiled in
/// tests as well, which replay the targets' seed inputs.
#[cfg(any(fuzzing, test))]
#[doc(hidden)]
pub mod fuzzing {
    use crate::{command, connect, topology, IdempotencyTable};

    /// Seeds and endpoints as a user or an environment variable may give them.
    pub fn seeds(text: &str) {
        let _ = connect::Seeds::parse(text.split('\n'));
        let _ = text.parse::<connect::Endpoint>();
    }

    /// A `CLUSTER SHARDS` or `CLUSTER SLOTS` reply, as any server (or something posing as one)
    /// may send it.
    pub fn topology_reply(bytes: &[u8]) {
        topology::fuzz_replies(bytes);
    }

    /// A command as a caller may build it: its classification, block time, refusal, fan-out.
    pub fn command(bytes: &[u8]) {
        let mut args = bytes.split(|b| *b == 0);
        let Some(name) = args.next() else { return };
        let mut cmd = redis::cmd(&String::from_utf8_lossy(name));
        for arg in args {
            cmd.arg(arg);
        }
        let _ = command::classify(&cmd);
        let _ = command::block_time(&cmd);
        let _ = command::fans_out(&cmd);
        let _ = command::shared_connection_refusal(&cmd);
        let mut pipe = redis::pipe();
        pipe.add_command(cmd.clone()).add_command(cmd);
        let _ = IdempotencyTable::new().classify_pipeline(&pipe);
        let _ = command::pipeline_refusal(&pipe);
    }

    #[cfg(test)]
    pub(crate) mod tests {
        use std::path::{Path, PathBuf};

        /// The seed inputs of a fuzz target, with their paths, sorted.
        pub(crate) fn seed_inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fuzz/seed")
                .join(target);
            let mut inputs: Vec<_> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|entry| {
                    let path = entry.expect("a directory entry").path();
                    let bytes = std::fs::read(&path).expect("a readable seed input");
                    (path, bytes)
                })
                .collect();
            inputs.sort();
            assert!(!inputs.is_empty(), "no seed inputs in {}", dir.display());
            inputs
        }

        #[test]
        fn the_fuzz_targets_take_their_seed_inputs() {
            for (_, bytes) in seed_inputs("seeds") {
                super::seeds(&String::from_utf8_lossy(&bytes));
            }
            for (_, bytes) in seed_inputs("topology_reply") {
                super::topology_reply(&bytes);
            }
            for (_, bytes) in seed_inputs("command") {
                super::command(&bytes);
            }
        }
    }
}
