//! Tower layers that keep a service talking to a Redis Cluster through failovers, node
//! replacements and topology changes.
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
//! * [`RedisService`] — a `redis` connection as a `Service<Cmd>` / `Service<Pipeline>`;
//! * [`rebuild`] — recreate the inner client from its seed *names* (never its frozen IPs):
//!   single-flight across clones, backoff, make-before-break, bounded waiting;
//! * [`Error`] — one classification of every failure, with [`Sent`] telling whether a command
//!   may have taken effect, and [`command`] telling whether it is safe to send again.
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
pub mod rebuild;
pub mod retry;
pub mod service;
pub mod topology;

pub use client::{Client, ClientBuilder};
pub use command::{classify, Idempotency, IdempotencyTable};
pub use connect::{ClusterConnector, Connect, Credentials, Seeds, TlsConfig};
pub use error::{Error, ErrorKind, Sent};
pub use service::RedisService;
