//! The one error type of the harness.

use std::{fmt, io, net::SocketAddr, path::PathBuf, time::Duration};

/// Why a harness operation failed.
///
/// Every wait of the harness is bounded, so a cluster that never reaches the expected state ends
/// in [`HarnessError::Timeout`], whose `what` names the state that was not reached and the last
/// problem seen, rather than in a hung test.
#[derive(Debug)]
#[non_exhaustive]
pub enum HarnessError {
    /// The `redis-server` binary could not be found.
    RedisServerNotFound {
        /// What was looked for: the path given by `redis_server_path`/`TRC_REDIS_SERVER`, or the
        /// bare name `redis-server` when `PATH` was searched.
        tried: PathBuf,
    },
    /// A file-system or process operation failed.
    Io(io::Error),
    /// Redis answered with an error, or the connection to a node failed.
    Redis(redis::RedisError),
    /// A bounded wait ended before the expected state was reached.
    Timeout {
        /// The state that was not reached, with the last problem observed.
        what: String,
        /// How long the harness waited.
        after: Duration,
    },
    /// A `redis-server` process exited while the harness was waiting for it to start.
    NodeExited {
        /// The address the node was meant to listen on.
        addr: SocketAddr,
        /// The exit status, as printed by the OS.
        status: String,
        /// The last lines of the node's output and log, which usually say why.
        log_tail: String,
    },
    /// No free loopback subnet and port could be found for a new cluster or server.
    NoFreeAddress {
        /// How many candidates were tried.
        attempts: usize,
    },
    /// The address does not belong to a node of this cluster (or the node was already removed).
    UnknownNode {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// The shard index is out of range.
    InvalidShard {
        /// The index asked for.
        shard: usize,
        /// How many shards the cluster has.
        shards: usize,
    },
    /// The `nft` binary (nftables) could not be found, and
    /// [`blackhole_dead_nodes`](super::LocalClusterBuilder::blackhole_dead_nodes) (part of
    /// [`managed`](super::LocalClusterBuilder::managed)) needs it.
    NftNotFound {
        /// What was looked for: the path given by `nft_path`/`TRC_NFT`, or the bare name `nft`
        /// when `PATH` and the sbin directories were searched.
        tried: PathBuf,
    },
    /// An `nft` command failed, usually for lack of privileges (it needs root or
    /// `CAP_NET_ADMIN`).
    NftFailed {
        /// The command line (and script) that failed.
        command: String,
        /// What nft said, and its exit status.
        output: String,
    },
    /// The operation cannot be carried out in the cluster's current state (for example a failover
    /// of a shard without a running replica), or the builder's settings cannot work.
    Invalid(String),
}

impl fmt::Display for HarnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HarnessError::RedisServerNotFound { tried } => write!(
                f,
                "`redis-server` was not found on PATH: install it (Debian/Ubuntu: \
                 `apt-get install -y redis-server`, macOS: `brew install redis`) or set \
                 TRC_REDIS_SERVER to its path (looked for `{}`)",
                tried.display()
            ),
            HarnessError::Io(e) => write!(f, "harness I/O error: {e}"),
            HarnessError::Redis(e) => write!(f, "redis error: {e}"),
            HarnessError::Timeout { what, after } => {
                write!(f, "timed out after {after:?} waiting for {what}")
            }
            HarnessError::NodeExited {
                addr,
                status,
                log_tail,
            } => write!(
                f,
                "redis-server for {addr} exited during start-up ({status}); last output:\n{log_tail}"
            ),
            HarnessError::NoFreeAddress { attempts } => write!(
                f,
                "no free loopback subnet/port found after {attempts} attempts \
                 (is 127.0.0.0/8 routed to the loopback interface?)"
            ),
            HarnessError::UnknownNode { addr } => {
                write!(f, "{addr} is not a node of this cluster")
            }
            HarnessError::InvalidShard { shard, shards } => {
                write!(f, "shard {shard} does not exist (the cluster has {shards})")
            }
            HarnessError::NftNotFound { tried } => write!(
                f,
                "`nft` (nftables) was not found, and blackhole_dead_nodes(true) (part of \
                 managed()) needs it: install it (Debian/Ubuntu: `apt-get install -y nftables`) \
                 or set TRC_NFT to its path; it must run as root or with CAP_NET_ADMIN \
                 (looked for `{}`)",
                tried.display()
            ),
            HarnessError::NftFailed { command, output } => {
                write!(f, "`{command}` failed: {output}; ")?;
                if output.contains("Operation not permitted") {
                    f.write_str("nft lacks the privileges: ")?;
                }
                f.write_str(
                    "blackhole_dead_nodes(true) (part of managed()) installs nftables rules, \
                     which needs root or CAP_NET_ADMIN: run the tests as root (CI: `sudo`), give \
                     nft the capability (`setcap cap_net_admin+ep \"$(command -v nft)\"`), or \
                     turn blackholing off",
                )
            }
            HarnessError::Invalid(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for HarnessError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HarnessError::Io(e) => Some(e),
            HarnessError::Redis(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for HarnessError {
    fn from(e: io::Error) -> Self {
        HarnessError::Io(e)
    }
}

impl From<redis::RedisError> for HarnessError {
    fn from(e: redis::RedisError) -> Self {
        HarnessError::Redis(e)
    }
}

/// Adds what the harness was doing to an I/O error, so `Io` errors are actionable on their own.
pub(crate) fn io_context(e: io::Error, what: impl fmt::Display) -> HarnessError {
    HarnessError::Io(io::Error::new(e.kind(), format!("{what}: {e}")))
}
