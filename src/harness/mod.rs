//! A real Redis Cluster on the local machine, for tests and chaos experiments (feature
//! `test-util`).
//!
//! [`LocalCluster`] starts `redis-server` processes and makes a Redis Cluster of them, giving
//! **each node its own loopback IP** (all of `127.0.0.0/8` is loopback on Linux) and the **same
//! port**, the way a managed cluster (AWS MemoryDB, ElastiCache) looks to a client. So "a node
//! was replaced by a new one at a new IP" really happens: the old IP stops answering and the new
//! node is somewhere the client has never seen. A [`NameMap`] plays DNS: the cluster's
//! [configuration endpoint](LocalCluster::config_endpoint) resolves to its current nodes, and
//! can be [frozen](NameMap::freeze) to simulate a stale record.
//!
//! Operations mirror what happens to a production cluster: graceful
//! [failover](LocalCluster::failover), a [master crash](LocalCluster::kill_master),
//! [node replacement](LocalCluster::replace_node) at a new IP, a [paused](LocalCluster::pause_node)
//! (hung) node, a [restarted](LocalCluster::restart_node) node, and the whole cluster
//! [going down](LocalCluster::stop_all) and [coming back](LocalCluster::start_all). Each one
//! waits — always within a bound, returning [`HarnessError::Timeout`] otherwise — until the
//! cluster's own nodes agree it is healthy.
//!
//! # Requirements
//! Linux (for the `127.A.B.C` addresses; macOS only routes `127.0.0.1` by default), the `kill`
//! utility, and `redis-server` 7.0 or later, on `PATH` or named by `TRC_REDIS_SERVER`
//! (Debian/Ubuntu: `apt-get install -y redis-server`, macOS: `brew install redis`).
//! [Blackholing](LocalClusterBuilder::blackhole_dead_nodes) (part of the managed profile) also
//! needs `nft` (`apt-get install -y nftables`, or `TRC_NFT`) and root or `CAP_NET_ADMIN`.
//!
//! # No orphans
//! Every `redis-server` is started by one dedicated spawner thread under
//! `setpriv --pdeathsig KILL` (util-linux), so the kernel kills it when the test program ends,
//! however it ends: also after `std::process::exit`, a SIGKILL or an abort, when no destructor
//! runs. (The parent-death signal fires when the *thread* that forked the child exits, hence one
//! thread that lives as long as the process.) Where `setpriv` is missing, nodes are spawned
//! without it and a warning is logged once. A normal end, or a panic, still kills and reaps the
//! nodes on drop, as before.
//!
//! # TLS
//! [`LocalClusterBuilder::tls`] (crate feature `tls`) makes a TLS-only cluster: a throwaway
//! [`TestCa`] per cluster, a certificate per node naming its IP and the configuration endpoint
//! (a node started later at a new IP gets its own; with
//! [`tls_names_only`](LocalClusterBuilder::tls_names_only), one wildcard name and no IP), no
//! plaintext port, and TLS on the cluster bus and for replication. [`LocalCluster::ca_pem`], [`LocalCluster::client_identity`] and
//! [`LocalCluster::seed_url`] (`rediss://…`) give a client what it needs;
//! [`LocalClusterBuilder::require_client_certs`] turns on mutual TLS.
//!
//! # Managed profile
//! [`LocalClusterBuilder::managed`] makes a local cluster look like AWS MemoryDB/ElastiCache to
//! a client; each part can also be switched on alone:
//! - [`announce_hostnames`](LocalClusterBuilder::announce_hostnames): every node announces
//!   `node-<n>.<domain>` (`cluster-announce-hostname`, `cluster-preferred-endpoint-type
//!   hostname`), so `CLUSTER SLOTS`/`CLUSTER SHARDS` and redirections name hosts, which only
//!   the [`NameMap`] resolves. [`NodeInfo::hostname`] and [`LocalCluster::domain`] give them.
//! - [`tls_names_only`](LocalClusterBuilder::tls_names_only): node certificates carry one
//!   wildcard name, `*.<domain>`, and no IP, so a client must verify names, not IPs.
//! - an ACL user `app` with a random password ([`LocalCluster::user`]), rotated by
//!   [`set_user_password`](LocalCluster::set_user_password).
//! - [`blackhole_dead_nodes`](LocalClusterBuilder::blackhole_dead_nodes): a killed node vanishes
//!   like a cloud host — nftables drops every packet to and from its port and bus port, so
//!   connects hang and open connections go silent instead of being refused or closed.
//!
//! Besides [`replace_node`](LocalCluster::replace_node) (a new node, a new IP, a new name), two
//! operations model how such nodes come back:
//! [`replace_node_keeping_name`](LocalCluster::replace_node_keeping_name) (a new, empty node at a
//! new IP under the old host name: a pod without persistence, or a reused DNS name) and
//! [`move_node`](LocalCluster::move_node) (the same node — id, `nodes.conf`, name — at a new IP:
//! a pod with a persistent volume rescheduled). In both the name follows to the new IP in the
//! name map, unless [frozen](NameMap::freeze).
//! [`LocalCluster::client_builder`] returns a client builder configured for the profile (seed,
//! name map, CA, credentials).
//!
//! ```no_run
//! use std::time::Duration;
//! use tower_redis_cluster::harness::LocalCluster;
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut cluster = LocalCluster::builder().shards(3).replicas(1).managed().start().await?;
//! let client = cluster.client_builder().build().await?;
//! client.wait_connected(Duration::from_secs(10)).await?;
//!
//! // The master of shard 0 comes back at a new IP under its name; the old IP goes silent.
//! let old = cluster.master_of(0);
//! let moved = cluster.move_node(old.addr).await?;
//! assert_eq!((moved.id, moved.hostname), (old.id, old.hostname.clone()));
//! let name = old.hostname.unwrap();
//! assert_eq!(cluster.name_map().lookup(&name), vec![moved.addr]);
//! # Ok(()) }
//! ```
//!
//! # Isolation
//! Every cluster or standalone server takes a random `127.A.B.0/24` (A in 2..=254, so never
//! `127.0.0.1`) and a random port in 20000..=39999 (cluster bus: port + 10000), checked free by
//! binding before use. Tests can therefore run in parallel, in one process or many (as under
//! cargo-nextest). Node directories live in a temp dir removed on drop; set
//! `TRC_HARNESS_KEEP_DIR=1` to keep them (the path is printed) when a test needs debugging.
//!
//! # Example
//! ```no_run
//! use std::time::Duration;
//! use tower_redis_cluster::harness::LocalCluster;
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut cluster = LocalCluster::builder().shards(3).replicas(1).start().await?;
//! let client = redis::cluster::ClusterClient::new(cluster.node_urls())?;
//! let mut con = client.get_async_connection().await?;
//! let () = redis::cmd("SET").arg("k").arg("v").query_async(&mut con).await?;
//!
//! // The master of shard 0 is replaced by a node at a new IP.
//! let old = cluster.master_of(0);
//! let new = cluster.replace_node(old.addr).await?;
//! assert_ne!(old.addr.ip(), new.addr.ip());
//! assert!(!cluster.name_map().lookup(&cluster.config_endpoint()).contains(&old.addr));
//! cluster.wait_healthy(Duration::from_secs(10)).await?;
//! # Ok(()) }
//! ```

mod admin;
mod blackhole;
mod cluster;
mod error;
mod launch;
mod name_map;
mod process;
mod standalone;
mod tls;
mod topology;

use std::net::SocketAddr;

pub use cluster::{LocalCluster, LocalClusterBuilder};
pub use error::HarnessError;
pub use name_map::NameMap;
pub use standalone::{StandaloneServer, StandaloneServerBuilder};
pub use tls::TestCa;

/// Environment variable that names the `redis-server` binary the harness runs (when no
/// `redis_server_path` is given to a builder).
pub const REDIS_SERVER_ENV: &str = process::ENV_REDIS_SERVER;

/// Environment variable that names the `nft` binary (nftables) used by
/// [`LocalClusterBuilder::blackhole_dead_nodes`] (when no `nft_path` is given to the builder).
pub const NFT_ENV: &str = blackhole::ENV_NFT;

/// Deletes the nftables tables of [`blackhole_dead_nodes`](LocalClusterBuilder::blackhole_dead_nodes)
/// clusters whose process is gone (one killed with SIGKILL, or ended by `std::process::exit`,
/// cannot delete its own), and returns their names. Tables of running processes are left
/// alone.
///
/// The first blackholing cluster of every process does this by itself; call it to clean up
/// without starting one (e.g. at the start of a CI job). Finds `nft` like the builder does
/// (`TRC_NFT`, else `PATH`, else `/usr/sbin/nft`, `/sbin/nft`), and needs root or
/// `CAP_NET_ADMIN`.
pub fn sweep_stale_blackhole_tables() -> Result<Vec<String>, HarnessError> {
    blackhole::sweep(&blackhole::find_nft(None)?)
}

/// A node of a [`LocalCluster`], as the harness last saw it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NodeInfo {
    /// The node's cluster id (40 hex characters), as in `CLUSTER NODES`.
    pub id: String,
    /// Where the node listens: its own loopback IP and the cluster's port.
    pub addr: SocketAddr,
    /// Master or replica.
    pub role: Role,
    /// The shard (0-based) the node serves or replicates. Shard `i` of `n` owns the slots
    /// `i * 16384 / n ..= (i + 1) * 16384 / n - 1` throughout the cluster's life.
    pub shard: usize,
    /// The host name the node announces (`node-<n>.<domain>`), with
    /// [`announce_hostnames`](LocalClusterBuilder::announce_hostnames); resolvable through the
    /// cluster's [`name_map`](LocalCluster::name_map).
    pub hostname: Option<String>,
}

/// A node's role in its shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Serves the shard's slots.
    Master,
    /// Replicates the shard's master.
    Replica,
}
