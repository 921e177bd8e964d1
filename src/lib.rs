//! tower-redis-cluster (crate docs are written in a later step).
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![warn(missing_debug_implementations, unreachable_pub)]

pub mod backoff;
pub mod command;
pub mod connect;
pub mod error;
#[cfg(feature = "test-util")]
pub mod harness;
pub mod rebuild;
pub mod service;

pub use command::{classify, Idempotency, IdempotencyTable};
pub use connect::{ClusterConnector, Connect, Seeds};
pub use error::{Error, ErrorKind, Sent};
pub use service::RedisService;
