//! [`LocalCluster`]: a real Redis Cluster of `redis-server` processes, one loopback IP per node.

use std::{
    collections::BTreeSet,
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use futures_util::future::join_all;
use tracing::{debug, info};

use super::{
    admin::{self, cmd, Credentials, RESPONSE_TIMEOUT},
    blackhole::{self, Blackhole},
    error::{io_context, HarnessError},
    launch,
    name_map::NameMap,
    process::{self, NodeProcess, SubnetLease},
    tls::{self, ServerTls},
    topology::{self, Agreed, Expected, Observation},
    NodeInfo, Role,
};

/// How often bounded waits re-check the cluster.
const POLL: Duration = Duration::from_millis(100);
/// A manual failover that has not completed by then has timed out inside Redis
/// (`CLUSTER_MF_TIMEOUT` is 5 s), so the request is sent again.
const FAILOVER_ROUND: Duration = Duration::from_secs(6);
/// Host numbers available in a `/24` (.1 to .254).
const MAX_HOST: u8 = 254;

/// Builder of a [`LocalCluster`]; see [`LocalCluster::builder`].
#[derive(Clone, Debug)]
pub struct LocalClusterBuilder {
    shards: usize,
    replicas: usize,
    node_timeout: Duration,
    config: Vec<(String, String)>,
    password: Option<String>,
    user: Option<(String, String)>,
    redis_server: Option<PathBuf>,
    timeout: Duration,
    name_map: Option<NameMap>,
    keep_dir: bool,
    tls: bool,
    require_client_certs: bool,
    announce_hostnames: bool,
    tls_names_only: bool,
    blackhole_dead_nodes: bool,
    nft: Option<PathBuf>,
    /// Set by `managed()`: the user `app` with a random password, unless `user` is set.
    managed_user: bool,
}

impl Default for LocalClusterBuilder {
    fn default() -> Self {
        LocalClusterBuilder {
            shards: 3,
            replicas: 1,
            node_timeout: Duration::from_millis(1000),
            config: Vec::new(),
            password: None,
            user: None,
            redis_server: None,
            timeout: Duration::from_secs(30),
            name_map: None,
            keep_dir: false,
            tls: false,
            require_client_certs: false,
            announce_hostnames: false,
            tls_names_only: false,
            blackhole_dead_nodes: false,
            nft: None,
            managed_user: false,
        }
    }
}

impl LocalClusterBuilder {
    /// Number of shards (masters), at least 1. Default 3.
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = shards;
        self
    }

    /// Number of replicas per shard. Default 1.
    pub fn replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas;
        self
    }

    /// `cluster-node-timeout`: how long a node must be unreachable before it is suspected, which
    /// paces automatic failovers (roughly 2–3 × this). Default 1000 ms.
    pub fn node_timeout(mut self, node_timeout: Duration) -> Self {
        self.node_timeout = node_timeout;
        self
    }

    /// Adds the redis.conf line `key value` to every node, after the harness's own lines (so it
    /// can override them). `value` is written verbatim, unquoted, so multi-word directives keep
    /// their words, e.g. `.config("user", "app on >secret ~* +@all")`.
    ///
    /// Do not set `requirepass` or ACL rules that lock out the default user here: the harness's
    /// admin connections would be refused. Use [`password`](Self::password) or
    /// [`user`](Self::user), which the admin connections also use.
    pub fn config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.push((key.into(), value.into()));
        self
    }

    /// Requires `password` from the default user (`requirepass`, and `masterauth` so replicas
    /// can sync). Admin connections and [`LocalCluster::node_urls`] use it.
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into());
        self
    }

    /// Creates the ACL user `name` with `password` and all permissions on every node, used by
    /// replication (`masteruser`/`masterauth`), admin connections and
    /// [`LocalCluster::node_urls`]. The default user is left as it is (open unless
    /// [`password`](Self::password) is also set).
    pub fn user(mut self, name: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = Some((name.into(), password.into()));
        self
    }

    /// The `redis-server` binary to run. Default: `TRC_REDIS_SERVER` if set, else `redis-server`
    /// on `PATH`.
    pub fn redis_server_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.redis_server = Some(path.into());
        self
    }

    /// Upper bound of each operation (start, failover, replacement, waits inside them).
    /// Default 30 s.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Registers the configuration endpoint in `map` instead of a map of its own, so several
    /// clusters (or your own fake names) share one "DNS".
    pub fn name_map(mut self, map: NameMap) -> Self {
        self.name_map = Some(map);
        self
    }

    /// Keeps the nodes' directories (configs, logs, `nodes.conf`) after the cluster is dropped,
    /// and prints where they are. Also switched on by the environment variable
    /// `TRC_HARNESS_KEEP_DIR=1`. Default off.
    pub fn keep_dir(mut self, keep: bool) -> Self {
        self.keep_dir = keep;
        self
    }

    /// Serves clients over TLS only (needs the crate's `tls` feature). Default off.
    ///
    /// The cluster gets a CA of its own ([`LocalCluster::ca_pem`]) and every node — also each
    /// node started later at a new IP — a certificate from it naming the node's IP and the
    /// [configuration endpoint](LocalCluster::config_endpoint) (or only `*.<domain>`, with
    /// [`tls_names_only`](Self::tls_names_only)). Nodes listen with TLS on the
    /// cluster's port and have no plaintext port; the cluster bus and replication use TLS too.
    /// Clients need the CA (e.g. `TlsConfig::custom_ca(cluster.ca_pem().unwrap())`) and can
    /// connect to [`seed_url`](LocalCluster::seed_url). Client certificates are verified when
    /// offered but not required, unless [`require_client_certs`](Self::require_client_certs).
    pub fn tls(mut self, enabled: bool) -> Self {
        self.tls = enabled;
        self
    }

    /// With [`tls`](Self::tls): nodes refuse clients that present no certificate from the
    /// cluster's CA (`tls-auth-clients yes`), i.e. mutual TLS; use
    /// [`LocalCluster::client_identity`]. Default off (`tls-auth-clients optional`).
    pub fn require_client_certs(mut self, required: bool) -> Self {
        self.require_client_certs = required;
        self
    }

    /// Every node announces a host name of its own, `node-<n>.<domain>` (`n`: its host number
    /// in the cluster's subnet, never reused; `domain`: [`LocalCluster::domain`]), registered in
    /// the [name map](LocalCluster::name_map) and pointing at the node's IP. Default off.
    ///
    /// The nodes are configured with `cluster-announce-hostname` and
    /// `cluster-preferred-endpoint-type hostname`, as AWS MemoryDB/ElastiCache nodes are:
    /// `CLUSTER SLOTS`, `CLUSTER SHARDS` and `MOVED`/`ASK` redirections name nodes by host name,
    /// so a client must resolve those names (give it the name map, e.g.
    /// [`client_builder`](LocalCluster::client_builder), or `DnsAdapter(cluster.name_map())` for
    /// a redis-crate client). `CLUSTER NODES` shows `ip:port@cport,hostname`; `CLUSTER MEET`
    /// and replication still use IPs. A node [replaced](LocalCluster::replace_node) gets a new
    /// name; one [moved](LocalCluster::move_node) or
    /// [replaced under its name](LocalCluster::replace_node_keeping_name) keeps its name, which
    /// then points at the new IP. Without TLS names-only certificates, each node certificate also
    /// names the node's host name.
    pub fn announce_hostnames(mut self, enabled: bool) -> Self {
        self.announce_hostnames = enabled;
        self
    }

    /// With [`tls`](Self::tls): every node certificate carries exactly one name, the wildcard
    /// DNS name `*.<domain>`, and no IP — what managed services issue. Default off (each node
    /// certificate names its IP, the configuration endpoint and, with
    /// [`announce_hostnames`](Self::announce_hostnames), its host name).
    ///
    /// A client must then verify nodes by name: connect to the
    /// [configuration endpoint](LocalCluster::config_endpoint) or node host names (resolved
    /// through the name map), not to IPs, whose verification fails. The cluster bus and
    /// replication are unaffected (Redis does not check peer names there), and the harness's
    /// own connections verify the configuration endpoint's name, pinned to each node's IP.
    /// [`LocalCluster::node_urls`] then name nodes by host name when they announce one.
    /// [`start`](Self::start) fails with [`HarnessError::Invalid`] without `tls(true)`.
    pub fn tls_names_only(mut self, enabled: bool) -> Self {
        self.tls_names_only = enabled;
        self
    }

    /// Killed nodes vanish like cloud hosts instead of refusing connections. Default off. Needs
    /// `nft` (nftables), run as root or with `CAP_NET_ADMIN`; [`start`](Self::start) fails with
    /// [`HarnessError::NftNotFound`] or [`HarnessError::NftFailed`] (which say how to fix it)
    /// rather than silently skipping it.
    ///
    /// Once the harness kills a node ([`kill_master`](LocalCluster::kill_master),
    /// [`kill_node`](LocalCluster::kill_node), the old node of
    /// [`replace_node`](LocalCluster::replace_node) and its variants,
    /// [`stop_all`](LocalCluster::stop_all), [`restart_node`](LocalCluster::restart_node) while
    /// the node is down), every packet to and from its `ip:port` and its bus port
    /// `ip:port+10000` is dropped: connects hang until the client's timeout, established
    /// connections go silent (no FIN, no reset). The rules go in *before* the process is killed,
    /// so its dying FIN/RST never reaches a client. They are lifted when the harness starts the
    /// node again at the same address ([`restart_node`](LocalCluster::restart_node),
    /// [`start_all`](LocalCluster::start_all)).
    ///
    /// The rules live in one nftables table per cluster,
    /// [`trc_<pid>_<a>_<b>`](LocalCluster::blackhole_table), limited to the cluster's subnet
    /// `127.a.b.0/24`, and deleted when the cluster is dropped (also while a test unwinds from
    /// a panic). A process that ends without dropping its cluster leaves its table behind; the
    /// first blackholing cluster of each later process deletes the tables of processes that are
    /// gone (see also [`sweep_stale_blackhole_tables`](super::sweep_stale_blackhole_tables)).
    pub fn blackhole_dead_nodes(mut self, enabled: bool) -> Self {
        self.blackhole_dead_nodes = enabled;
        self
    }

    /// The `nft` binary for [`blackhole_dead_nodes`](Self::blackhole_dead_nodes). Default:
    /// `TRC_NFT` if set, else `nft` on `PATH`, else `/usr/sbin/nft` or `/sbin/nft`.
    pub fn nft_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.nft = Some(path.into());
        self
    }

    /// The managed-cluster profile: the cluster looks like AWS MemoryDB/ElastiCache to a
    /// client. Shorthand for [`tls(true)`](Self::tls),
    /// [`announce_hostnames(true)`](Self::announce_hostnames),
    /// [`tls_names_only(true)`](Self::tls_names_only), the ACL [`user`](Self::user) `app` with
    /// a random password (unless a user is set, before or after), and
    /// [`blackhole_dead_nodes(true)`](Self::blackhole_dead_nodes). Needs the crate's `tls`
    /// feature and `nft` with root or `CAP_NET_ADMIN`.
    ///
    /// [`LocalCluster::client_builder`] gives a client configured for it (seed, name map, CA,
    /// credentials); [`LocalCluster::user`] gives the credentials.
    pub fn managed(mut self) -> Self {
        self.tls = true;
        self.announce_hostnames = true;
        self.tls_names_only = true;
        self.blackhole_dead_nodes = true;
        self.managed_user = true;
        self
    }

    /// Starts the nodes, creates the cluster and waits until it is healthy and every replica is
    /// in sync.
    ///
    /// Slots are split evenly over the shards (`CLUSTER ADDSLOTSRANGE`), node 1 meets everyone
    /// (`CLUSTER MEET`), and once every node knows every other one, replicas are attached with
    /// `CLUSTER REPLICATE`. If anything fails, the processes already started are killed.
    pub async fn start(mut self) -> Result<LocalCluster, HarnessError> {
        let started = Instant::now();
        let deadline = started + self.timeout;
        if self.tls && !cfg!(feature = "tls") {
            return Err(tls::feature_missing("LocalClusterBuilder::tls(true)"));
        }
        if self.require_client_certs && !self.tls {
            return Err(HarnessError::Invalid(
                "require_client_certs(true) needs tls(true)".into(),
            ));
        }
        if self.tls_names_only && !self.tls {
            return Err(HarnessError::Invalid(
                "tls_names_only(true) needs tls(true): it is about the nodes' TLS certificates"
                    .into(),
            ));
        }
        let bin = process::find_redis_server(self.redis_server.as_deref())?;
        if self.shards == 0 {
            return Err(HarnessError::Invalid(
                "a cluster needs at least one shard".into(),
            ));
        }
        let total = self.shards * (1 + self.replicas);
        if total > usize::from(MAX_HOST) / 2 {
            return Err(HarnessError::Invalid(format!(
                "{total} nodes is too many for one /24 (at most {}, leaving room for replacements)",
                MAX_HOST / 2
            )));
        }
        // Found before anything starts, so a missing nft fails at once.
        let nft = if self.blackhole_dead_nodes {
            Some(blackhole::find_nft(self.nft.as_deref())?)
        } else {
            None
        };
        if self.managed_user && self.user.is_none() {
            self.user = Some(("app".into(), random_password()));
        }
        let lease = SubnetLease::acquire(total as u8, true)?;
        let blackhole = match nft {
            Some(nft) => Some(Blackhole::create(nft, lease.a(), lease.b())?),
            None => None,
        };
        let tempdir = tempfile::Builder::new()
            .prefix("trc-cluster-")
            .tempdir()
            .map_err(|e| io_context(e, "creating the cluster's temp dir"))?;
        let keep_dir = self.keep_dir || env_flag("TRC_HARNESS_KEEP_DIR");
        let domain = format!("trc-{:08x}.test", process::random_u64() as u32);
        let endpoint = format!("clustercfg.{domain}");
        let server_tls = if self.tls {
            Some(ServerTls::new(self.require_client_certs)?)
        } else {
            None
        };
        let mut creds = match (&self.user, &self.password) {
            (Some((u, p)), _) => Credentials {
                user: Some(u.clone()),
                password: Some(p.clone()),
                ..Credentials::default()
            },
            (None, Some(p)) => Credentials {
                user: None,
                password: Some(p.clone()),
                ..Credentials::default()
            },
            (None, None) => Credentials::default(),
        };
        creds.tls = server_tls.as_ref().map(|t| t.admin.clone());
        if self.tls_names_only {
            // The wildcard covers it, and it is the name a client of the cluster verifies.
            creds.tls_name = Some(endpoint.clone());
        }
        // A user who configures RDB saving wants the files kept across restarts.
        let keep_rdb = self
            .config
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("save"));
        let dir_path = tempdir.path().to_path_buf();
        let cluster = LocalCluster {
            settings: Settings {
                bin,
                shards: self.shards,
                replicas: self.replicas,
                node_timeout: self.node_timeout,
                extra: self.config,
                user: self.user,
                password: self.password,
                creds,
                timeout: self.timeout,
                keep_rdb,
                tls: server_tls,
                announce_hostnames: self.announce_hostnames,
                tls_names_only: self.tls_names_only,
            },
            domain,
            endpoint,
            names: self.name_map.unwrap_or_default(),
            state: Mutex::new(State {
                members: Vec::new(),
                next_host: 1,
                forgotten: Vec::new(),
                names: BTreeSet::new(),
            }),
            dir_path,
            tempdir: Some(tempdir),
            keep_dir,
            blackhole,
            lease,
        };
        info!(
            endpoint = %cluster.endpoint,
            subnet = %cluster.lease.ip(0),
            port = cluster.port(),
            shards = cluster.settings.shards,
            replicas = cluster.settings.replicas,
            "starting local Redis Cluster"
        );

        // All nodes start together, so their start-up times overlap.
        let mut planned = Vec::new();
        for i in 0..total {
            let (role, shard) = if i < self.shards {
                (Role::Master, i)
            } else {
                (Role::Replica, (i - self.shards) % self.shards)
            };
            let (host, addr, dir) = cluster.next_node_dir()?;
            let hostname = cluster.hostname_for(host);
            planned.push((host, addr, dir, role, shard, hostname));
        }
        let launched = join_all(
            planned
                .iter()
                .map(|(host, _, dir, _, _, name)| cluster.start_node(*host, dir, name.as_deref())),
        )
        .await;
        // On an error, the processes not registered yet are killed as `launched` drops, and the
        // registered ones with `cluster`.
        for ((host, addr, dir, role, shard, hostname), proc) in planned.into_iter().zip(launched) {
            cluster.lock().members.push(Member {
                id: String::new(),
                host,
                addr,
                dir,
                role,
                shard,
                hostname,
                process: Some(proc?),
            });
        }
        let creds = cluster.settings.creds.clone();

        // Ids, distinct config epochs (as redis-cli does, so no epoch collision has to be
        // resolved later), and slots for the masters.
        let addrs: Vec<SocketAddr> = cluster.lock().members.iter().map(|m| m.addr).collect();
        for (i, addr) in addrs.iter().enumerate() {
            let id: String =
                admin::query(*addr, &creds, &cmd(&["CLUSTER", "MYID"]), RESPONSE_TIMEOUT).await?;
            admin::query::<()>(
                *addr,
                &creds,
                &cmd(&["CLUSTER", "SET-CONFIG-EPOCH", &(i + 1).to_string()]),
                RESPONSE_TIMEOUT,
            )
            .await?;
            if i < self.shards {
                let (start, end) = topology::shard_slots(i, self.shards);
                admin::query::<()>(
                    *addr,
                    &creds,
                    &cmd(&[
                        "CLUSTER",
                        "ADDSLOTSRANGE",
                        &start.to_string(),
                        &end.to_string(),
                    ]),
                    RESPONSE_TIMEOUT,
                )
                .await?;
            }
            cluster.lock().members[i].id = id;
        }
        for addr in &addrs[1..] {
            admin::query::<()>(
                addrs[0],
                &creds,
                &cmd(&[
                    "CLUSTER",
                    "MEET",
                    &addr.ip().to_string(),
                    &addr.port().to_string(),
                ]),
                RESPONSE_TIMEOUT,
            )
            .await?;
        }
        cluster.wait_known(deadline).await?;
        let plan: Vec<(SocketAddr, String)> = {
            let state = cluster.lock();
            state
                .members
                .iter()
                .filter(|m| m.role == Role::Replica)
                .map(|m| {
                    let master = state
                        .members
                        .iter()
                        .find(|x| x.role == Role::Master && x.shard == m.shard)
                        .expect("every shard has a master at creation");
                    (m.addr, master.id.clone())
                })
                .collect()
        };
        for (replica, master_id) in plan {
            replicate(replica, &master_id, &creds, deadline).await?;
        }
        cluster.publish_names();
        cluster
            .wait_until(
                deadline,
                true,
                "the new cluster to be healthy with replicas in sync",
            )
            .await?;
        info!(
            endpoint = %cluster.endpoint,
            elapsed = ?started.elapsed(),
            "local Redis Cluster ready"
        );
        Ok(cluster)
    }
}

/// A real Redis Cluster of local `redis-server` processes, each node on its own loopback IP and
/// all on the same port, like a managed cluster.
///
/// Owns the processes: dropping it SIGKILLs and reaps every one of them (also paused ones, also
/// while a test unwinds from a panic) and then removes the nodes' directories. See the
/// [module documentation](super) for an overview.
pub struct LocalCluster {
    settings: Settings,
    /// `trc-XXXXXXXX.test`: the configuration endpoint and node host names live under it.
    domain: String,
    endpoint: String,
    names: NameMap,
    state: Mutex<State>,
    dir_path: PathBuf,
    // Declared after `state` so it is removed only after Drop::drop has killed the processes.
    tempdir: Option<tempfile::TempDir>,
    keep_dir: bool,
    /// With `blackhole_dead_nodes`. Taken (and its table deleted) by Drop::drop after the
    /// processes are killed, before `lease` hands the subnet to another cluster.
    blackhole: Option<Blackhole>,
    lease: SubnetLease,
}

#[derive(Debug)]
struct Settings {
    bin: PathBuf,
    shards: usize,
    replicas: usize,
    node_timeout: Duration,
    extra: Vec<(String, String)>,
    /// The ACL user and its *current* password (changed by `set_user_password`).
    user: Option<(String, String)>,
    /// The default user's current password (`requirepass`).
    password: Option<String>,
    creds: Credentials,
    timeout: Duration,
    keep_rdb: bool,
    /// `Some` on a TLS cluster.
    tls: Option<ServerTls>,
    announce_hostnames: bool,
    tls_names_only: bool,
}

impl Settings {
    /// The redis.conf lines for the current passwords: written at every node start, so a node
    /// started after a password rotation gets the new one.
    fn auth_lines(&self) -> String {
        let mut lines = String::new();
        if let Some(p) = &self.password {
            lines += &format!("requirepass {}\n", process::quote(p));
        }
        if let Some((u, p)) = &self.user {
            lines += &format!(
                "user {} on {} ~* &* +@all\nmasteruser {}\n",
                process::quote(u),
                process::quote(&format!(">{p}")),
                process::quote(u)
            );
        }
        if let Some(p) = &self.creds.password {
            lines += &format!("masterauth {}\n", process::quote(p));
        }
        lines
    }
}

#[derive(Debug)]
struct State {
    /// Every node that belongs to the cluster: running, or killed but not forgotten.
    members: Vec<Member>,
    /// Next host number of the subnet: IPs are never reused within a cluster.
    next_host: u8,
    /// Ids of removed nodes. A member that was stopped while a node was forgotten still has it
    /// in its `nodes.conf`, and would reintroduce it through gossip once the others' 60 s ban
    /// expires; so a restarted member is told to forget them too.
    forgotten: Vec<String>,
    /// Every name the cluster put into the name map (the configuration endpoint and node host
    /// names), removed from it on drop.
    names: BTreeSet<String>,
}

#[derive(Debug)]
struct Member {
    id: String,
    host: u8,
    addr: SocketAddr,
    dir: PathBuf,
    role: Role,
    shard: usize,
    /// The announced host name, with `announce_hostnames`.
    hostname: Option<String>,
    /// `None` once the harness killed the node (`kill_node`, `stop_all`).
    process: Option<Arc<NodeProcess>>,
}

impl Member {
    fn info(&self) -> NodeInfo {
        NodeInfo {
            id: self.id.clone(),
            addr: self.addr,
            role: self.role,
            shard: self.shard,
            hostname: self.hostname.clone(),
        }
    }

    fn running(&self) -> bool {
        self.process.is_some()
    }
}

impl fmt::Debug for LocalCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("LocalCluster")
            .field("config_endpoint", &self.endpoint)
            .field("port", &self.lease.port())
            .field("tls", &self.settings.tls.is_some())
            .field("dir", &self.dir_path)
            .field(
                "nodes",
                &state
                    .members
                    .iter()
                    .map(|m| {
                        format!(
                            "{}{} {:?} shard {}{}",
                            m.addr,
                            m.hostname
                                .as_deref()
                                .map(|h| format!(" ({h})"))
                                .unwrap_or_default(),
                            m.role,
                            m.shard,
                            if m.running() { "" } else { " (stopped)" }
                        )
                    })
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl LocalCluster {
    /// A builder with the defaults: 3 shards × 1 replica, node timeout 1000 ms.
    pub fn builder() -> LocalClusterBuilder {
        LocalClusterBuilder::default()
    }

    /// Starts a cluster with the defaults (3 shards × 1 replica).
    pub async fn start() -> Result<LocalCluster, HarnessError> {
        Self::builder().start().await
    }

    /// The port every node listens on (the cluster bus is on port + 10000).
    pub fn port(&self) -> u16 {
        self.lease.port()
    }

    /// The configuration endpoint's name, e.g. `clustercfg.trc-1a2b3c4d.test`. It is not
    /// resolvable by the OS: resolve it through [`name_map`](Self::name_map).
    pub fn config_endpoint(&self) -> String {
        self.endpoint.clone()
    }

    /// The cluster's own domain, e.g. `trc-1a2b3c4d.test`: the configuration endpoint is
    /// `clustercfg.<domain>`, announced node host names are `node-<n>.<domain>`
    /// ([`announce_hostnames`](LocalClusterBuilder::announce_hostnames)), and names-only node
    /// certificates are issued for `*.<domain>`
    /// ([`tls_names_only`](LocalClusterBuilder::tls_names_only)).
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The ACL user and its current password ([`LocalClusterBuilder::user`], or `app` with a
    /// random password under [`managed`](LocalClusterBuilder::managed)), following
    /// [`set_user_password`](Self::set_user_password); `None` without an ACL user.
    pub fn user(&self) -> Option<(String, String)> {
        self.settings.user.clone()
    }

    /// The nftables table of [`blackhole_dead_nodes`](LocalClusterBuilder::blackhole_dead_nodes)
    /// (`trc_<pid>_<a>_<b>`, family `inet`), e.g. for `nft list table inet <name>` while
    /// debugging; `None` without blackholing.
    pub fn blackhole_table(&self) -> Option<&str> {
        self.blackhole.as_ref().map(Blackhole::table)
    }

    /// `"<config_endpoint>:<port>"`, the seed a client of a managed cluster is configured with.
    pub fn seed(&self) -> String {
        format!("{}:{}", self.endpoint, self.port())
    }

    /// The seed as a URL: `rediss://<config_endpoint>:<port>` on a [TLS](LocalClusterBuilder::tls)
    /// cluster, else `redis://<config_endpoint>:<port>`. Carries no credentials (give them to
    /// the client separately); resolve the name through [`name_map`](Self::name_map).
    pub fn seed_url(&self) -> String {
        let scheme = if self.is_tls() { "rediss" } else { "redis" };
        format!("{scheme}://{}", self.seed())
    }

    /// Whether the nodes serve TLS only ([`LocalClusterBuilder::tls`]).
    pub fn is_tls(&self) -> bool {
        self.settings.tls.is_some()
    }

    /// The PEM certificate of the CA that signed every node's certificate, on a TLS cluster: what
    /// a client must trust.
    pub fn ca_pem(&self) -> Option<Vec<u8>> {
        self.settings.tls.as_ref().map(ServerTls::ca_pem)
    }

    /// A client certificate and key (PEM), signed by the cluster's CA, for mutual TLS (see
    /// [`require_client_certs`](LocalClusterBuilder::require_client_certs)); `None` without TLS.
    /// The same pair on every call; the harness's own connections use another one.
    pub fn client_identity(&self) -> Option<(Vec<u8>, Vec<u8>)> {
        self.settings.tls.as_ref().map(ServerTls::client_identity)
    }

    /// A [`Client`](crate::Client) builder for this cluster, as an application would configure
    /// it: the [seed](Self::seed) name, resolved through the [name map](Self::name_map) (which
    /// also resolves announced node host names); the cluster's credentials
    /// ([`user`](LocalClusterBuilder::user), else [`password`](LocalClusterBuilder::password));
    /// and on a TLS cluster (with the crate's `tls` feature)
    /// [`TlsConfig::custom_ca`](crate::TlsConfig::custom_ca) with [`ca_pem`](Self::ca_pem), plus
    /// the [client identity](Self::client_identity) when client certificates are required. So
    /// it is ready to use for every profile, [`managed`](LocalClusterBuilder::managed) included;
    /// anything set on it afterwards (e.g. other credentials) replaces what it set. The
    /// credentials are the current ones: after [`set_user_password`](Self::set_user_password),
    /// take a new builder.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use tower_redis_cluster::harness::LocalCluster;
    ///
    /// let cluster = LocalCluster::builder().shards(3).replicas(1).start().await?;
    /// let client = cluster.client_builder().timeout(Duration::from_secs(2)).build().await?;
    /// client.wait_connected(Duration::from_secs(10)).await?;
    /// # Ok(()) }
    /// ```
    pub fn client_builder(&self) -> crate::ClientBuilder {
        let builder = crate::Client::builder()
            .seed(self.seed())
            .resolver(self.name_map());
        #[cfg(feature = "tls")]
        let builder = match &self.settings.tls {
            Some(tls) => {
                let config = crate::TlsConfig::custom_ca(tls.ca_pem());
                builder.tls(if tls.requires_client_certs() {
                    let (cert, key) = tls.client_identity();
                    config.client_identity(cert, key)
                } else {
                    config
                })
            }
            None => builder,
        };
        match (&self.settings.user, &self.settings.password) {
            (Some((user, password)), _) => builder.credentials(user.clone(), password.clone()),
            (None, Some(password)) => builder.password(password.clone()),
            (None, None) => builder,
        }
    }

    /// The name map in which [`config_endpoint`](Self::config_endpoint) points at every member
    /// node (running, or stopped but not removed), and, with
    /// [`announce_hostnames`](LocalClusterBuilder::announce_hostnames), each member's host name
    /// at its IP. Each operation updates it unless the name is [frozen](NameMap::freeze); a
    /// removed node's host name is removed (unless frozen). Names the cluster registered are
    /// removed from the map when it is dropped.
    pub fn name_map(&self) -> NameMap {
        self.names.clone()
    }

    /// The running nodes as the harness knows them, by shard, master first.
    ///
    /// Roles are refreshed by every operation and by [`wait_healthy`](Self::wait_healthy); after
    /// changes the harness did not make (an automatic failover after
    /// [`kill_node`](Self::kill_node)), call `wait_healthy` first.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        let state = self.lock();
        let mut nodes: Vec<NodeInfo> = state
            .members
            .iter()
            .filter(|m| m.running())
            .map(Member::info)
            .collect();
        nodes.sort_by_key(|n| (n.shard, n.role != Role::Master, n.addr));
        nodes
    }

    /// Nodes killed by [`kill_node`](Self::kill_node) or [`stop_all`](Self::stop_all) and not
    /// started again: still members of the cluster.
    pub fn stopped_nodes(&self) -> Vec<NodeInfo> {
        self.lock()
            .members
            .iter()
            .filter(|m| !m.running())
            .map(Member::info)
            .collect()
    }

    /// The running node at `addr`, if any.
    pub fn node(&self, addr: SocketAddr) -> Option<NodeInfo> {
        self.nodes().into_iter().find(|n| n.addr == addr)
    }

    /// The running masters, by shard.
    pub fn masters(&self) -> Vec<NodeInfo> {
        self.nodes()
            .into_iter()
            .filter(|n| n.role == Role::Master)
            .collect()
    }

    /// The running replicas, by shard.
    pub fn replicas(&self) -> Vec<NodeInfo> {
        self.nodes()
            .into_iter()
            .filter(|n| n.role == Role::Replica)
            .collect()
    }

    /// The master of `shard`.
    ///
    /// # Panics
    /// If the shard does not exist or has no running master (use
    /// [`nodes`](Self::nodes) to check without panicking).
    pub fn master_of(&self, shard: usize) -> NodeInfo {
        self.masters()
            .into_iter()
            .find(|n| n.shard == shard)
            .unwrap_or_else(|| panic!("shard {shard} has no running master: {self:?}"))
    }

    /// The running replicas of `shard`.
    pub fn replicas_of(&self, shard: usize) -> Vec<NodeInfo> {
        self.replicas()
            .into_iter()
            .filter(|n| n.shard == shard)
            .collect()
    }

    /// The addresses of the running nodes.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes().into_iter().map(|n| n.addr).collect()
    }

    /// `redis://[user:password@]ip:port` of every running node, e.g. for
    /// `redis::cluster::ClusterClient::new(cluster.node_urls())`. Credentials set with
    /// [`password`](LocalClusterBuilder::password)/[`user`](LocalClusterBuilder::user) are
    /// included (the current ones). On a TLS cluster they are `rediss://` URLs, and a client also
    /// needs [`ca_pem`](Self::ca_pem) (the system roots do not trust the cluster's CA).
    ///
    /// With [`tls_names_only`](LocalClusterBuilder::tls_names_only) an IP cannot be verified, so
    /// nodes that announce a host name are given by it (`rediss://…@node-3.<domain>:port`),
    /// which a client must resolve through the [name map](Self::name_map) (e.g.
    /// `ClusterClientBuilder::async_dns_resolver(DnsAdapter(cluster.name_map()))`).
    pub fn node_urls(&self) -> Vec<String> {
        self.nodes()
            .into_iter()
            .map(|n| match (&n.hostname, self.settings.tls_names_only) {
                (Some(name), true) => self.settings.creds.url(&format!("{name}:{}", self.port())),
                _ => self.settings.creds.url(&n.addr.to_string()),
            })
            .collect()
    }

    /// Process ids of the running nodes.
    pub fn pids(&self) -> Vec<u32> {
        self.lock()
            .members
            .iter()
            .filter_map(|m| m.process.as_ref().map(|p| p.pid()))
            .collect()
    }

    /// Number of shards.
    pub fn shards(&self) -> usize {
        self.settings.shards
    }

    /// Replicas per shard the cluster was created with.
    pub fn replicas_per_shard(&self) -> usize {
        self.settings.replicas
    }

    /// `cluster-node-timeout` of the nodes.
    pub fn node_timeout(&self) -> Duration {
        self.settings.node_timeout
    }

    /// The directory holding one sub-directory per node (config, `nodes.conf`, logs).
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    /// The Redis log file of the member node at `addr` (also of a stopped one).
    pub fn log_path(&self, addr: SocketAddr) -> Option<PathBuf> {
        self.lock()
            .members
            .iter()
            .find(|m| m.addr == addr)
            .map(|m| m.dir.join(process::REDIS_LOG))
    }

    /// Sends `cmd` to the node at `addr` over a fresh admin connection (with the cluster's
    /// credentials) and returns its reply. Waits at most 2 s for the reply, so a paused node
    /// yields [`HarnessError::Timeout`] rather than a hang.
    pub async fn node_command(
        &self,
        addr: SocketAddr,
        cmd: &redis::Cmd,
    ) -> Result<redis::Value, HarnessError> {
        self.node_command_with_timeout(addr, cmd, RESPONSE_TIMEOUT)
            .await
    }

    /// [`node_command`](Self::node_command) with a chosen response timeout.
    pub async fn node_command_with_timeout(
        &self,
        addr: SocketAddr,
        cmd: &redis::Cmd,
        timeout: Duration,
    ) -> Result<redis::Value, HarnessError> {
        admin::query(addr, &self.settings.creds, cmd, timeout).await
    }

    /// Waits until the cluster is healthy, at most `timeout`, and refreshes the roles the
    /// harness reports.
    ///
    /// Healthy means, for every running node: `cluster_state:ok` with all 16384 slots assigned
    /// and ok; every shard's slots served by one running master; all running nodes agree on who
    /// serves each slot and on each running node's role; no running node is flagged
    /// `fail`/`fail?`/`handshake`/`noaddr` or disconnected by another; and the nodes know
    /// exactly the current members, so removed (forgotten) nodes are absent from every view, at
    /// their current addresses and (with
    /// [`announce_hostnames`](LocalClusterBuilder::announce_hostnames)) host names.
    /// Stopped members may be flagged as failed but must not serve slots. A paused node cannot
    /// answer, so the cluster is not healthy while one is paused.
    pub async fn wait_healthy(&self, timeout: Duration) -> Result<(), HarnessError> {
        self.wait_until(Instant::now() + timeout, false, "the cluster to be healthy")
            .await
    }

    /// [`wait_healthy`](Self::wait_healthy), and also every running replica reports
    /// `master_link_status:up` towards its master with no sync in progress.
    pub async fn wait_settled(&self, timeout: Duration) -> Result<(), HarnessError> {
        self.wait_until(
            Instant::now() + timeout,
            true,
            "the cluster to be healthy with replicas in sync",
        )
        .await
    }

    /// Graceful failover of `shard`: `CLUSTER FAILOVER` sent to one of its replicas (the
    /// longest-serving one). Waits until that replica is master, the cluster is healthy and the
    /// replicas (including the old master) are in sync; returns the new master.
    pub async fn failover(&mut self, shard: usize) -> Result<NodeInfo, HarnessError> {
        let started = Instant::now();
        let deadline = started + self.settings.timeout;
        self.check_shard(shard)?;
        self.wait_until(
            deadline,
            true,
            "the cluster to be settled before a failover",
        )
        .await?;
        let replica = self.oldest_replica(shard).ok_or_else(|| {
            HarnessError::Invalid(format!(
                "shard {shard} has no running replica to fail over to"
            ))
        })?;
        info!(endpoint = %self.endpoint, shard, to = %replica.addr, "failover");
        self.promote(replica.addr, deadline).await?;
        self.wait_until(deadline, true, "the cluster to be healthy after a failover")
            .await?;
        let new_master = self.master_of(shard);
        info!(endpoint = %self.endpoint, shard, master = %new_master.addr, elapsed = ?started.elapsed(), "failover done");
        Ok(new_master)
    }

    /// SIGKILLs the master of `shard` and waits for the automatic failover (one of its replicas
    /// elected master, which takes about 2–3 × the node timeout). The dead node is then
    /// forgotten (`CLUSTER FORGET` on every running node) and removed from the name map; returns
    /// the new master once the cluster is healthy and in sync.
    ///
    /// The election needs the votes of a majority of *all* masters, the dead one included, so
    /// it only happens with at least 3 shards; with 1 or 2 this ends in
    /// [`HarnessError::Timeout`] (fail over gracefully with [`failover`](Self::failover)).
    pub async fn kill_master(&mut self, shard: usize) -> Result<NodeInfo, HarnessError> {
        let started = Instant::now();
        let deadline = started + self.settings.timeout;
        self.check_shard(shard)?;
        self.wait_until(
            deadline,
            true,
            "the cluster to be settled before killing a master",
        )
        .await?;
        let master = self.master_of(shard);
        let replicas = self.replicas_of(shard);
        if replicas.is_empty() {
            return Err(HarnessError::Invalid(format!(
                "shard {shard} has no running replica: killing its master would lose its slots"
            )));
        }
        info!(endpoint = %self.endpoint, shard, master = %master.addr, "killing master");
        self.kill_process(master.addr)?;

        let new_master = loop {
            let checks = join_all(replicas.iter().map(|r| self.reports_master(r.addr))).await;
            if let Some(i) = checks.iter().position(|&m| m) {
                break replicas[i].clone();
            }
            if Instant::now() >= deadline {
                return Err(self.timeout_error(
                    started,
                    format!(
                        "a replica of shard {shard} to be promoted after its master was killed"
                    ),
                ));
            }
            tokio::time::sleep(POLL).await;
        };
        debug!(shard, new_master = %new_master.addr, elapsed = ?started.elapsed(), "replica promoted");
        self.remove_member(&master.id, deadline, true).await?;
        self.wait_until(
            deadline,
            true,
            "the cluster to be healthy after killing a master",
        )
        .await?;
        info!(endpoint = %self.endpoint, shard, master = %new_master.addr, elapsed = ?started.elapsed(), "master killed and replaced by its replica");
        Ok(self.node(new_master.addr).unwrap_or(new_master))
    }

    /// Replaces the node at `addr` by a new node at a new IP (same port), like a managed service
    /// replacing a failed host.
    ///
    /// If the node is a running master, its shard is first failed over gracefully to another
    /// replica, so that it is a replica. The new node is started, introduced (`CLUSTER MEET`) and
    /// made a replica of the shard's master (`CLUSTER REPLICATE`); if the shard had no other
    /// replica, the failover to the new node happens only now, once it is in sync. Then the old
    /// node is killed and forgotten by every running node (all within seconds, well inside the
    /// 60 s during which a forgotten node may not be re-learnt through gossip). Waits until the
    /// cluster is healthy and the new replica in sync. The name map loses the old address and
    /// gains the new one. `addr` may also be a stopped member (see [`kill_node`](Self::kill_node)).
    ///
    /// With [`announce_hostnames`](LocalClusterBuilder::announce_hostnames) the new node has a
    /// new name, `node-<n>.<domain>` for its new host number, registered in the name map as it
    /// starts; the old node's name is removed from the map once the node is forgotten, unless it
    /// is [frozen](NameMap::freeze) (a stale DNS record of a host that is gone). To keep the name,
    /// see [`replace_node_keeping_name`](Self::replace_node_keeping_name).
    pub async fn replace_node(&mut self, addr: SocketAddr) -> Result<NodeInfo, HarnessError> {
        let started = Instant::now();
        let deadline = started + self.settings.timeout;
        self.wait_until(
            deadline,
            true,
            "the cluster to be settled before a replacement",
        )
        .await?;
        let (old, old_running) = {
            let state = self.lock();
            let m = state
                .members
                .iter()
                .find(|m| m.addr == addr)
                .ok_or(HarnessError::UnknownNode { addr })?;
            (m.info(), m.running())
        };
        let shard = old.shard;
        info!(endpoint = %self.endpoint, %addr, role = ?old.role, shard, "replacing node");

        if old_running && old.role == Role::Master {
            if let Some(replica) = self.oldest_replica(shard) {
                self.promote(replica.addr, deadline).await?;
                self.wait_until(deadline, true, "the cluster to be healthy after a failover")
                    .await?;
            }
        }

        let new = self.add_replica(shard, deadline, None).await?;

        if self.node(addr).is_some_and(|n| n.role == Role::Master) {
            // The shard had no other replica: hand it to the new node now that it is in sync.
            self.promote(new.addr, deadline).await?;
            self.wait_until(deadline, true, "the cluster to be healthy after a failover")
                .await?;
        }

        self.kill_process(addr)?;
        self.remove_member(&old.id, deadline, true).await?;
        self.wait_until(
            deadline,
            true,
            "the cluster to be healthy after a replacement",
        )
        .await?;
        let new = self.node(new.addr).unwrap_or(new);
        info!(endpoint = %self.endpoint, old = %addr, new = %new.addr, elapsed = ?started.elapsed(), "node replaced");
        Ok(new)
    }

    /// Replaces every node of `shard` ([`replace_node`](Self::replace_node)), replicas first, then
    /// the master; returns the new nodes.
    pub async fn replace_shard_nodes(
        &mut self,
        shard: usize,
    ) -> Result<Vec<NodeInfo>, HarnessError> {
        self.check_shard(shard)?;
        let mut old: Vec<NodeInfo> = self
            .lock()
            .members
            .iter()
            .filter(|m| m.shard == shard)
            .map(Member::info)
            .collect();
        old.sort_by_key(|n| n.role == Role::Master);
        let mut new = Vec::with_capacity(old.len());
        for node in old {
            new.push(self.replace_node(node.addr).await?);
        }
        Ok(new)
    }

    /// Makes the node at `addr` stop answering for `duration`: SIGSTOP now, SIGCONT after
    /// `duration` from a background thread. Returns right after the SIGSTOP.
    ///
    /// A paused node keeps its TCP connections open and accepts new ones (the kernel does), but
    /// answers nothing: clients see timeouts, not refused connections. If it stays paused longer
    /// than the node timeout, the cluster flags it failed (and fails a master over). Dropping the
    /// cluster kills paused nodes too.
    pub async fn pause_node(
        &self,
        addr: SocketAddr,
        duration: Duration,
    ) -> Result<(), HarnessError> {
        let proc = self.process_of(addr)?;
        proc.signal("STOP")?;
        info!(endpoint = %self.endpoint, %addr, ?duration, "node paused");
        // A thread rather than a task: it must fire even if the test's runtime is busy, blocked
        // or gone. It holds only the process handle; once the cluster is dropped the process is
        // reaped and `signal` refuses, so a recycled pid can never be hit.
        let endpoint = self.endpoint.clone();
        std::thread::Builder::new()
            .name(format!("trc-resume-{addr}"))
            .spawn(move || {
                std::thread::sleep(duration);
                if proc.signal("CONT").is_ok() {
                    debug!(%endpoint, %addr, "node resumed");
                }
            })
            .map_err(|e| io_context(e, "spawning the resume thread"))?;
        Ok(())
    }

    /// Resumes a node paused by [`pause_node`](Self::pause_node) before its time is up.
    pub async fn resume_node(&self, addr: SocketAddr) -> Result<(), HarnessError> {
        self.process_of(addr)?.signal("CONT")
    }

    /// Pauses every running node for `duration` (see [`pause_node`](Self::pause_node)): the
    /// whole cluster hangs without closing connections.
    pub async fn pause_all(&self, duration: Duration) -> Result<(), HarnessError> {
        for addr in self.addrs() {
            self.pause_node(addr, duration).await?;
        }
        Ok(())
    }

    /// Migrates `slot`, with its keys, to the master `to`, live — as `redis-cli --cluster
    /// reshard` does: the target is set `IMPORTING`, the current owner `MIGRATING`, the keys
    /// move over in batches of `batch` with `pause` between batches (during which clients get
    /// `ASK` for the keys already moved), and every master is told the slot's new owner.
    /// Returns how many keys moved.
    ///
    /// The harness's health checks expect each shard to serve its original slot range
    /// ([`NodeInfo::shard`]); migrate the slot back before waiting for a healthy cluster.
    pub async fn migrate_slot(
        &self,
        slot: u16,
        to: SocketAddr,
        batch: usize,
        pause: Duration,
    ) -> Result<usize, HarnessError> {
        if slot >= topology::SLOTS {
            return Err(HarnessError::Invalid(format!("slot {slot} does not exist")));
        }
        let creds = &self.settings.creds;
        let masters = self.masters();
        let target = masters
            .iter()
            .find(|m| m.addr == to)
            .ok_or_else(|| HarnessError::Invalid(format!("{to} is not a running master")))?
            .clone();
        // The owner as the target sees it.
        let owner = {
            let text: String =
                admin::query(to, creds, &cmd(&["CLUSTER", "NODES"]), RESPONSE_TIMEOUT).await?;
            topology::parse_cluster_nodes(&text)
                .map_err(HarnessError::Invalid)?
                .into_iter()
                .find(|e| e.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
                .and_then(|e| masters.iter().find(|m| m.id == e.id).cloned())
                .ok_or_else(|| {
                    HarnessError::Invalid(format!("no running master owns slot {slot}"))
                })?
        };
        if owner.id == target.id {
            return Ok(0);
        }
        let slot_arg = slot.to_string();
        admin::query::<()>(
            to,
            creds,
            &cmd(&["CLUSTER", "SETSLOT", &slot_arg, "IMPORTING", &owner.id]),
            RESPONSE_TIMEOUT,
        )
        .await?;
        admin::query::<()>(
            owner.addr,
            creds,
            &cmd(&["CLUSTER", "SETSLOT", &slot_arg, "MIGRATING", &target.id]),
            RESPONSE_TIMEOUT,
        )
        .await?;
        let (ip, port) = (to.ip().to_string(), to.port().to_string());
        let batch_arg = batch.max(1).to_string();
        let mut moved = 0;
        loop {
            let keys: Vec<String> = admin::query(
                owner.addr,
                creds,
                &cmd(&["CLUSTER", "GETKEYSINSLOT", &slot_arg, &batch_arg]),
                RESPONSE_TIMEOUT,
            )
            .await?;
            if keys.is_empty() {
                break;
            }
            let mut migrate = redis::cmd("MIGRATE");
            migrate.arg(&ip).arg(&port).arg("").arg(0).arg(5000);
            match (&creds.user, &creds.password) {
                (Some(user), Some(password)) => {
                    migrate.arg("AUTH2").arg(user).arg(password);
                }
                (None, Some(password)) => {
                    migrate.arg("AUTH").arg(password);
                }
                _ => {}
            }
            migrate.arg("KEYS");
            for key in &keys {
                migrate.arg(key);
            }
            admin::query::<redis::Value>(owner.addr, creds, &migrate, RESPONSE_TIMEOUT).await?;
            moved += keys.len();
            tokio::time::sleep(pause).await;
        }
        // The target first, then the old owner, then the other masters (as redis-cli does;
        // replicas follow their masters).
        let mut order = vec![target.addr, owner.addr];
        order.extend(
            masters
                .iter()
                .map(|m| m.addr)
                .filter(|a| *a != target.addr && *a != owner.addr),
        );
        for addr in order {
            admin::query::<()>(
                addr,
                creds,
                &cmd(&["CLUSTER", "SETSLOT", &slot_arg, "NODE", &target.id]),
                RESPONSE_TIMEOUT,
            )
            .await?;
        }
        info!(endpoint = %self.endpoint, slot, from = %owner.addr, to = %to, moved, "slot migrated");
        Ok(moved)
    }

    /// SIGKILLs the node at `addr` without forgetting it: it stays a member (and in the name
    /// map), other nodes flag it failed, and if it was a master one of its replicas takes over
    /// after about 2–3 × the node timeout. Start it again with
    /// [`restart_node`](Self::restart_node), or replace it with
    /// [`replace_node`](Self::replace_node). Does not wait. Returns the node as last known.
    ///
    /// Clients get refused connections, or, with
    /// [`blackhole_dead_nodes`](LocalClusterBuilder::blackhole_dead_nodes), no answer at all.
    pub async fn kill_node(&mut self, addr: SocketAddr) -> Result<NodeInfo, HarnessError> {
        let info = self
            .lock()
            .members
            .iter()
            .find(|m| m.addr == addr && m.running())
            .map(Member::info)
            .ok_or(HarnessError::UnknownNode { addr })?;
        info!(endpoint = %self.endpoint, %addr, role = ?info.role, "killing node");
        self.kill_process(addr)?;
        Ok(info)
    }

    /// Kills the node at `addr` (if running) and starts it again at the same IP and port with
    /// its `nodes.conf`, so it rejoins as the same node; waits until the cluster is healthy and
    /// in sync.
    ///
    /// Nodes run without persistence, so the node comes back empty (the harness also deletes an
    /// RDB file a replica wrote during a full sync, unless `save` was configured). A master
    /// restarted before its replicas took over therefore empties its shard, as a real crash
    /// without persistence would; fail it over first to keep the data.
    ///
    /// With [`blackhole_dead_nodes`](LocalClusterBuilder::blackhole_dead_nodes) the node's
    /// address is blackholed while it is down and reachable again once it starts.
    pub async fn restart_node(&mut self, addr: SocketAddr) -> Result<NodeInfo, HarnessError> {
        let started = Instant::now();
        let deadline = started + self.settings.timeout;
        if !self.lock().members.iter().any(|m| m.addr == addr) {
            return Err(HarnessError::UnknownNode { addr });
        }
        info!(endpoint = %self.endpoint, %addr, "restarting node");
        self.kill_process(addr)?;
        self.start_stopped(&[addr], deadline).await?;
        self.wait_until(
            deadline,
            true,
            "the cluster to be healthy after a node restart",
        )
        .await?;
        info!(endpoint = %self.endpoint, %addr, elapsed = ?started.elapsed(), "node restarted");
        self.node(addr).ok_or(HarnessError::UnknownNode { addr })
    }

    /// The whole cluster goes down: every node is SIGKILLed (clients get refused connections, or
    /// no answer with [`blackhole_dead_nodes`](LocalClusterBuilder::blackhole_dead_nodes)).
    ///
    /// Directories and `nodes.conf` files are kept and the name map still lists the nodes, so
    /// [`start_all`](Self::start_all) brings the same cluster back. Data is lost (no
    /// persistence). For a cluster that hangs instead of refusing, see
    /// [`pause_all`](Self::pause_all).
    pub async fn stop_all(&mut self) -> Result<(), HarnessError> {
        info!(endpoint = %self.endpoint, "stopping every node");
        for addr in self.addrs() {
            self.kill_process(addr)?;
        }
        Ok(())
    }

    /// Starts every stopped node again at its IP with its `nodes.conf`, so the cluster re-forms
    /// with the same node ids, roles and slots; waits until it is healthy and in sync.
    pub async fn start_all(&mut self) -> Result<(), HarnessError> {
        let started = Instant::now();
        let deadline = started + self.settings.timeout;
        let stopped: Vec<SocketAddr> = self.stopped_nodes().iter().map(|n| n.addr).collect();
        info!(endpoint = %self.endpoint, nodes = stopped.len(), "starting stopped nodes");
        self.start_stopped(&stopped, deadline).await?;
        self.wait_until(deadline, true, "the restarted cluster to be healthy")
            .await?;
        info!(endpoint = %self.endpoint, elapsed = ?started.elapsed(), "cluster back");
        Ok(())
    }

    /// Replaces the node at `addr` by a new node at a new IP that announces the *old node's host
    /// name*, as a Kubernetes pod without persistence comes back, or a managed service reuses a
    /// node's DNS name for its replacement. Needs
    /// [`announce_hostnames`](LocalClusterBuilder::announce_hostnames). Returns the new node.
    ///
    /// Two live nodes must never announce the same name, so the old node goes first: if it is a
    /// running master, its shard is failed over to another replica (with none,
    /// [`HarnessError::Invalid`]: the shard would be left without a node); then it is killed
    /// (and [blackholed](LocalClusterBuilder::blackhole_dead_nodes)) and forgotten by every
    /// node. Then the new node — new id, empty — starts at the next free IP announcing the old
    /// name, the name is pointed at the new IP (unless [frozen](NameMap::freeze): a stale
    /// record), and the node is introduced, made a replica of the shard's master and waited for
    /// until the cluster is settled. Meanwhile the shard has one replica fewer. `addr` may also be
    /// a stopped member.
    pub async fn replace_node_keeping_name(
        &mut self,
        addr: SocketAddr,
    ) -> Result<NodeInfo, HarnessError> {
        let started = Instant::now();
        let deadline = started + self.settings.timeout;
        self.wait_until(
            deadline,
            true,
            "the cluster to be settled before a replacement",
        )
        .await?;
        let (old, old_running) = self.member(addr)?;
        let Some(name) = old.hostname.clone() else {
            return Err(HarnessError::Invalid(format!(
                "replace_node_keeping_name({addr}): the node has no host name to keep; start the \
                 cluster with announce_hostnames(true) (or managed()), or use replace_node"
            )));
        };
        let shard = old.shard;
        if old_running && old.role == Role::Master {
            self.hand_over(&old, deadline, "a replacement", || {
                format!(
                    "replace_node_keeping_name({addr}): it is the master of shard {shard}, which \
                     has no other running replica; its replacement can only start once it is \
                     gone (two nodes must not announce {name}), which would leave the shard \
                     without a node. Add a replica first, or use replace_node, which does"
                )
            })
            .await?;
        }
        info!(endpoint = %self.endpoint, %addr, %name, shard, "replacing node under its name");
        self.kill_process(addr)?;
        self.remove_member(&old.id, deadline, false).await?;
        let new = self.add_replica(shard, deadline, Some(name)).await?;
        info!(endpoint = %self.endpoint, old = %addr, new = %new.addr, elapsed = ?started.elapsed(), "node replaced under its name");
        Ok(new)
    }

    /// Moves the node at `addr` to a new IP: the *same* node — same directory, `nodes.conf`,
    /// node id and host name — starts again at the next free IP of the subnet, like a
    /// Kubernetes pod with a persistent volume rescheduled onto another host. Returns the node
    /// at its new address.
    ///
    /// If it is a running master, its shard is first failed over to another replica (with none,
    /// [`HarnessError::Invalid`]: the shard would go down and, without persistence, come back
    /// empty). Then it is killed (the old address
    /// [blackholed](LocalClusterBuilder::blackhole_dead_nodes)) and started again with
    /// `bind`/`cluster-announce-ip` set to the new IP. Redis needs no `CLUSTER MEET`: the node
    /// still knows its peers from `nodes.conf` and pings them from the new IP, and each peer
    /// updates the node's address when a ping arrives from a known id at a new address. The
    /// harness waits until every node sees it at the new address and the cluster is settled.
    /// The configuration endpoint loses the old address and gains the new one, and the node's
    /// host name points at the new IP (each unless [frozen](NameMap::freeze)). Without TLS
    /// names-only certificates, the node gets a new certificate for its new IP. Data it held is
    /// resynchronised from its master (no persistence). `addr` may also be a stopped member.
    pub async fn move_node(&mut self, addr: SocketAddr) -> Result<NodeInfo, HarnessError> {
        let started = Instant::now();
        let deadline = started + self.settings.timeout;
        self.wait_until(
            deadline,
            true,
            "the cluster to be settled before moving a node",
        )
        .await?;
        let (old, old_running) = self.member(addr)?;
        let shard = old.shard;
        if old_running && old.role == Role::Master {
            self.hand_over(&old, deadline, "a move", || {
                format!(
                    "move_node({addr}): it is the master of shard {shard}, which has no running \
                     replica to take over while it moves; without persistence the shard would \
                     come back empty. Add a replica first (replace_node does), or use \
                     restart_node to restart it in place"
                )
            })
            .await?;
        }
        self.kill_process(addr)?;
        let (host, new_addr) = self.next_host()?;
        let (dir, hostname) = {
            let mut state = self.lock();
            let m = state
                .members
                .iter_mut()
                .find(|m| m.addr == addr)
                .ok_or(HarnessError::UnknownNode { addr })?;
            m.host = host;
            m.addr = new_addr;
            (m.dir.clone(), m.hostname.clone())
        };
        info!(endpoint = %self.endpoint, old = %addr, new = %new_addr, id = %old.id, "moving node");
        if !self.settings.keep_rdb {
            let _ = std::fs::remove_file(dir.join("dump.rdb"));
        }
        let proc = self.start_node(host, &dir, hostname.as_deref()).await?;
        if let Some(m) = self.lock().members.iter_mut().find(|m| m.addr == new_addr) {
            m.process = Some(proc);
        }
        let forgotten = self.lock().forgotten.clone();
        join_all(
            forgotten
                .iter()
                .map(|id| self.forget_on(new_addr, id, deadline)),
        )
        .await
        .into_iter()
        .collect::<Result<Vec<()>, _>>()?;
        self.publish_names();
        self.wait_known(deadline).await?;
        debug!(new = %new_addr, elapsed = ?started.elapsed(), "every node sees the moved node at its new address");
        self.wait_until(deadline, true, "the cluster to be healthy after a move")
            .await?;
        info!(endpoint = %self.endpoint, old = %addr, new = %new_addr, elapsed = ?started.elapsed(), "node moved");
        self.node(new_addr)
            .ok_or(HarnessError::UnknownNode { addr: new_addr })
    }

    /// Rotates the password of the cluster's ACL user ([`LocalClusterBuilder::user`], `app`
    /// under [`managed`](LocalClusterBuilder::managed)) — or of the default user when only
    /// [`password`](LocalClusterBuilder::password) was set — to `new`, as a managed service
    /// rotates an auth token; waits until replication is settled.
    ///
    /// On every running node the new password is added next to the old one
    /// (`ACL SETUSER <user> ><new>`) and `masterauth` is set to it (`CONFIG SET`); then the
    /// harness's own connections, [`user`](Self::user), [`node_urls`](Self::node_urls),
    /// [`client_builder`](Self::client_builder) and the config written for later node starts
    /// switch to it; then the old password is removed everywhere (`ACL SETUSER <user> <<old>`).
    /// So at every moment one of the two works, and afterwards only `new` does.
    ///
    /// Redis keeps connections that are already authenticated: clients connected before the
    /// rotation keep working with the old password until they reconnect. To force
    /// re-authentication, kill their connections, e.g.
    /// `cluster.node_command(addr, redis::cmd("CLIENT").arg("KILL").arg("USER").arg("app"))` on
    /// every node (this also drops replication links using the user, which reconnect with the
    /// new `masterauth`). Stopped nodes get the new password when they are started again.
    pub async fn set_user_password(&mut self, new: impl Into<String>) -> Result<(), HarnessError> {
        let new = new.into();
        let started = Instant::now();
        let deadline = started + self.settings.timeout;
        let (user, old) = match (&self.settings.user, &self.settings.password) {
            (Some((user, old)), _) => (user.clone(), old.clone()),
            (None, Some(old)) => ("default".to_owned(), old.clone()),
            (None, None) => {
                return Err(HarnessError::Invalid(
                    "set_user_password: the cluster has no password to rotate; start it with \
                     user(..) (or managed()) or password(..)"
                        .into(),
                ))
            }
        };
        if new.is_empty() {
            return Err(HarnessError::Invalid(
                "set_user_password: the new password is empty".into(),
            ));
        }
        let addrs = self.addrs();
        let mut add = redis::pipe();
        add.cmd("ACL")
            .arg("SETUSER")
            .arg(&user)
            .arg(format!(">{new}"))
            .ignore()
            .cmd("CONFIG")
            .arg("SET")
            .arg("masterauth")
            .arg(&new)
            .ignore();
        self.on_every_node(&addrs, &add).await?;
        match &mut self.settings.user {
            Some((_, password)) => *password = new.clone(),
            None => self.settings.password = Some(new.clone()),
        }
        self.settings.creds.password = Some(new.clone());
        if old != new {
            let mut remove = redis::pipe();
            remove
                .cmd("ACL")
                .arg("SETUSER")
                .arg(&user)
                .arg(format!("<{old}"))
                .ignore();
            self.on_every_node(&addrs, &remove).await?;
        }
        self.wait_until(
            deadline,
            true,
            "the cluster to be settled after a password change",
        )
        .await?;
        info!(endpoint = %self.endpoint, %user, elapsed = ?started.elapsed(), "password rotated");
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Internals
    // -----------------------------------------------------------------------------------------

    /// Runs `pipe` on every node of `addrs` concurrently; the first error wins.
    async fn on_every_node(
        &self,
        addrs: &[SocketAddr],
        pipe: &redis::Pipeline,
    ) -> Result<(), HarnessError> {
        let creds = &self.settings.creds;
        join_all(
            addrs
                .iter()
                .map(|&addr| admin::query_pipe::<()>(addr, creds, pipe, RESPONSE_TIMEOUT)),
        )
        .await
        .into_iter()
        .collect::<Result<Vec<()>, _>>()?;
        Ok(())
    }

    /// The member at `addr` (running or stopped) and whether it runs.
    fn member(&self, addr: SocketAddr) -> Result<(NodeInfo, bool), HarnessError> {
        let state = self.lock();
        let m = state
            .members
            .iter()
            .find(|m| m.addr == addr)
            .ok_or(HarnessError::UnknownNode { addr })?;
        Ok((m.info(), m.running()))
    }

    /// `node-<host>.<domain>` with `announce_hostnames`.
    fn hostname_for(&self, host: u8) -> Option<String> {
        self.settings
            .announce_hostnames
            .then(|| format!("node-{host}.{}", self.domain))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock, but a poisoned lock must not turn Drop (which
        // kills the processes) into a second panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn check_shard(&self, shard: usize) -> Result<(), HarnessError> {
        if shard < self.settings.shards {
            Ok(())
        } else {
            Err(HarnessError::InvalidShard {
                shard,
                shards: self.settings.shards,
            })
        }
    }

    fn timeout_error(&self, started: Instant, what: String) -> HarnessError {
        HarnessError::Timeout {
            what: format!("{what} (cluster {})", self.endpoint),
            after: started.elapsed(),
        }
    }

    /// The running replica of `shard` created first (lowest host number).
    /// Fails the shard of `master` over to its oldest running replica before `master` goes
    /// (for `why`), and waits for the cluster to be healthy; with no replica,
    /// [`HarnessError::Invalid`] with `refusal`'s message.
    async fn hand_over(
        &self,
        master: &NodeInfo,
        deadline: Instant,
        why: &str,
        refusal: impl FnOnce() -> String,
    ) -> Result<(), HarnessError> {
        let replica = self
            .oldest_replica(master.shard)
            .ok_or_else(|| HarnessError::Invalid(refusal()))?;
        info!(endpoint = %self.endpoint, addr = %master.addr, to = %replica.addr, "failing over before {why}");
        self.promote(replica.addr, deadline).await?;
        self.wait_until(deadline, true, "the cluster to be healthy after a failover")
            .await
    }

    fn oldest_replica(&self, shard: usize) -> Option<NodeInfo> {
        let state = self.lock();
        state
            .members
            .iter()
            .filter(|m| m.running() && m.role == Role::Replica && m.shard == shard)
            .min_by_key(|m| m.host)
            .map(Member::info)
    }

    fn process_of(&self, addr: SocketAddr) -> Result<Arc<NodeProcess>, HarnessError> {
        self.lock()
            .members
            .iter()
            .find(|m| m.addr == addr)
            .and_then(|m| m.process.clone())
            .ok_or(HarnessError::UnknownNode { addr })
    }

    /// Reserves the next host number (and so IP).
    fn next_host(&self) -> Result<(u8, SocketAddr), HarnessError> {
        let mut state = self.lock();
        let host = state.next_host;
        if host > MAX_HOST {
            return Err(HarnessError::Invalid(
                "no unused IP left in the cluster's /24".into(),
            ));
        }
        state.next_host += 1;
        Ok((host, self.lease.addr(host)))
    }

    /// Reserves the next host number and creates its directory.
    fn next_node_dir(&self) -> Result<(u8, SocketAddr, PathBuf), HarnessError> {
        let (host, addr) = self.next_host()?;
        let dir = self.dir_path.join(format!("node-{host}"));
        std::fs::create_dir_all(&dir)
            .map_err(|e| io_context(e, format!("creating {}", dir.display())))?;
        Ok((host, addr, dir))
    }

    /// Writes the node's redis.conf (every time: it is cheap, keeps restarts identical and picks
    /// up a rotated password), starts `redis-server` at host `host` of the subnet (a moved node
    /// keeps its `dir`) and waits until it answers. `hostname` is announced when given.
    async fn start_node(
        &self,
        host: u8,
        dir: &Path,
        hostname: Option<&str>,
    ) -> Result<Arc<NodeProcess>, HarnessError> {
        let ip = self.lease.ip(host);
        let port = self.port();
        let mut conf = process::base_config(ip, port, dir, self.settings.tls.is_some());
        conf += "cluster-enabled yes\n";
        conf += "cluster-config-file nodes.conf\n";
        conf += &format!(
            "cluster-node-timeout {}\n",
            self.settings.node_timeout.as_millis()
        );
        conf += &format!("cluster-announce-ip {ip}\n");
        // A replica may always fail over, however long it was disconnected: tests pause nodes.
        conf += "cluster-replica-validity-factor 0\n";
        // The harness decides where replicas go; Redis must not move them between shards.
        conf += "cluster-allow-replica-migration no\n";
        if let Some(name) = hostname {
            // As MemoryDB/ElastiCache nodes do: clients are sent host names (CLUSTER SLOTS,
            // CLUSTER SHARDS, MOVED), never IPs.
            conf += &format!("cluster-announce-hostname {}\n", process::quote(name));
            conf += "cluster-preferred-endpoint-type hostname\n";
        }
        if let Some(tls) = &self.settings.tls {
            let (ips, names) = if self.settings.tls_names_only {
                (Vec::new(), vec![format!("*.{}", self.domain)])
            } else {
                let names = std::iter::once(self.endpoint.clone())
                    .chain(hostname.map(str::to_owned))
                    .collect();
                (vec![IpAddr::V4(ip)], names)
            };
            conf += &tls.node_config(&ips, &names, dir, true)?;
        }
        conf += &self.settings.auth_lines();
        process::append_extra(&mut conf, &self.settings.extra);
        let conf_path = dir.join("redis.conf");
        std::fs::write(&conf_path, conf)
            .map_err(|e| io_context(e, format!("writing {}", conf_path.display())))?;
        launch::launch(
            &self.settings.bin,
            &conf_path,
            dir,
            self.lease.addr(host),
            true,
            &self.settings.creds,
        )
        .await
    }

    /// Kills the member's process (if running) and marks it stopped.
    ///
    /// With blackholing, the address is blackholed *first*: the kernel closes a killed process's
    /// connections with a FIN (or a reset), which must not reach the clients of a host that is
    /// meant to vanish. If the rules cannot be installed the node is left running.
    fn kill_process(&self, addr: SocketAddr) -> Result<(), HarnessError> {
        let running = self
            .lock()
            .members
            .iter()
            .any(|m| m.addr == addr && m.running());
        if let (true, Some(blackhole)) = (running, &self.blackhole) {
            blackhole.block(addr)?;
        }
        let proc = {
            let mut state = self.lock();
            state
                .members
                .iter_mut()
                .find(|m| m.addr == addr)
                .and_then(|m| m.process.take())
        };
        if let Some(p) = proc {
            p.kill();
        }
        Ok(())
    }

    /// Starts the stopped members at `addrs` again (same dir, same `nodes.conf`), together, and
    /// waits until each answers PING.
    async fn start_stopped(
        &self,
        addrs: &[SocketAddr],
        deadline: Instant,
    ) -> Result<(), HarnessError> {
        let mut planned = Vec::new();
        for &addr in addrs {
            let (host, dir, hostname) = {
                let state = self.lock();
                let m = state
                    .members
                    .iter()
                    .find(|m| m.addr == addr)
                    .ok_or(HarnessError::UnknownNode { addr })?;
                (m.host, m.dir.clone(), m.hostname.clone())
            };
            if !self.settings.keep_rdb {
                let _ = std::fs::remove_file(dir.join("dump.rdb"));
            }
            // The node is back at the same address: it must be reachable again (and the
            // readiness PING get through).
            if let Some(blackhole) = &self.blackhole {
                blackhole.unblock(addr)?;
            }
            planned.push((addr, host, dir, hostname));
        }
        let launched = join_all(
            planned
                .iter()
                .map(|(_, host, dir, name)| self.start_node(*host, dir, name.as_deref())),
        )
        .await;
        for ((addr, ..), proc) in planned.iter().zip(launched) {
            let proc = proc?;
            if let Some(m) = self.lock().members.iter_mut().find(|m| m.addr == *addr) {
                m.process = Some(proc);
            }
        }
        let forgotten = self.lock().forgotten.clone();
        let forgets = planned.iter().flat_map(|(addr, ..)| {
            forgotten
                .iter()
                .map(|id| self.forget_on(*addr, id, deadline))
        });
        join_all(forgets)
            .await
            .into_iter()
            .collect::<Result<Vec<()>, _>>()?;
        Ok(())
    }

    /// Starts a new node at the next IP, introduces it and makes it a replica of `shard`'s
    /// master; returns once it is in sync. It announces `name` if given, else (with
    /// `announce_hostnames`) a name of its own; either is pointed at it in the name map as soon
    /// as it runs.
    async fn add_replica(
        &self,
        shard: usize,
        deadline: Instant,
        name: Option<String>,
    ) -> Result<NodeInfo, HarnessError> {
        let creds = self.settings.creds.clone();
        let master = self.master_of(shard);
        let (host, addr, dir) = self.next_node_dir()?;
        let hostname = name.or_else(|| self.hostname_for(host));
        let proc = self.start_node(host, &dir, hostname.as_deref()).await?;
        // Registered before anything else can fail, so that Drop kills it.
        self.lock().members.push(Member {
            id: String::new(),
            host,
            addr,
            dir,
            role: Role::Replica,
            shard,
            hostname: hostname.clone(),
            process: Some(proc),
        });
        if let Some(name) = &hostname {
            self.publish_name(name, addr);
        }
        let id: String =
            admin::query(addr, &creds, &cmd(&["CLUSTER", "MYID"]), RESPONSE_TIMEOUT).await?;
        if let Some(m) = self.lock().members.iter_mut().find(|m| m.addr == addr) {
            m.id = id.clone();
        }
        debug!(%addr, %id, shard, "new node started");
        admin::query::<()>(
            addr,
            &creds,
            &cmd(&[
                "CLUSTER",
                "MEET",
                &master.addr.ip().to_string(),
                &master.addr.port().to_string(),
            ]),
            RESPONSE_TIMEOUT,
        )
        .await?;
        self.wait_known(deadline).await?;
        replicate(addr, &master.id, &creds, deadline).await?;
        self.publish_names();
        self.wait_until(deadline, true, "the new node to be in sync")
            .await?;
        Ok(self.node(addr).unwrap_or(NodeInfo {
            id,
            addr,
            role: Role::Replica,
            shard,
            hostname,
        }))
    }

    /// Sends `CLUSTER FAILOVER` to the replica at `addr` until it reports itself master.
    async fn promote(&self, addr: SocketAddr, deadline: Instant) -> Result<(), HarnessError> {
        let started = Instant::now();
        let creds = &self.settings.creds;
        let mut last = String::from("no answer yet");
        loop {
            match admin::query::<()>(
                addr,
                creds,
                &cmd(&["CLUSTER", "FAILOVER"]),
                RESPONSE_TIMEOUT,
            )
            .await
            {
                Ok(()) => {}
                Err(e) => last = e.to_string(),
            }
            let round_end = (Instant::now() + FAILOVER_ROUND).min(deadline);
            while Instant::now() < round_end {
                if self.reports_master(addr).await {
                    debug!(%addr, elapsed = ?started.elapsed(), "replica promoted");
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if Instant::now() >= deadline {
                return Err(self.timeout_error(
                    started,
                    format!("{addr} to become master after CLUSTER FAILOVER (last error: {last})"),
                ));
            }
            debug!(%addr, "manual failover not done yet; asking again");
        }
    }

    /// Whether the node at `addr` says it is a master (its `myself` line in CLUSTER NODES).
    async fn reports_master(&self, addr: SocketAddr) -> bool {
        let Ok(text) = admin::query::<String>(
            addr,
            &self.settings.creds,
            &cmd(&["CLUSTER", "NODES"]),
            RESPONSE_TIMEOUT,
        )
        .await
        else {
            return false;
        };
        topology::parse_cluster_nodes(&text)
            .ok()
            .and_then(|v| v.into_iter().find(|e| e.myself))
            .is_some_and(|e| e.master)
    }

    /// Forgets the (already killed) member `id` on every running node, then drops it from the
    /// harness and the name map: its address from the configuration endpoint and, with
    /// `retire_name`, its host name (unless frozen).
    ///
    /// `CLUSTER FORGET` also bans the id for 60 s, during which gossip from nodes that still
    /// know it cannot bring it back; all nodes are told concurrently, so every ban is in place
    /// within moments of the first. A replica refuses to forget its own master until it has
    /// switched to the new one, hence the retries.
    async fn remove_member(
        &self,
        id: &str,
        deadline: Instant,
        retire_name: bool,
    ) -> Result<(), HarnessError> {
        let started = Instant::now();
        let targets = self.addrs();
        join_all(
            targets
                .iter()
                .map(|&addr| self.forget_on(addr, id, deadline)),
        )
        .await
        .into_iter()
        .collect::<Result<Vec<()>, _>>()?;
        let hostname = {
            let mut state = self.lock();
            let hostname = state
                .members
                .iter()
                .find(|m| m.id == id)
                .and_then(|m| m.hostname.clone());
            state.members.retain(|m| m.id != id);
            state.forgotten.push(id.to_owned());
            hostname
        };
        if let (true, Some(name)) = (retire_name, hostname) {
            self.names.retire(&name);
        }
        self.publish_names();
        debug!(id, elapsed = ?started.elapsed(), "node forgotten everywhere");
        Ok(())
    }

    /// `CLUSTER FORGET id` on the node at `addr`, retried while refused; an unknown id is
    /// already forgotten.
    async fn forget_on(
        &self,
        addr: SocketAddr,
        id: &str,
        deadline: Instant,
    ) -> Result<(), HarnessError> {
        let started = Instant::now();
        loop {
            match admin::query::<()>(
                addr,
                &self.settings.creds,
                &cmd(&["CLUSTER", "FORGET", id]),
                RESPONSE_TIMEOUT,
            )
            .await
            {
                Ok(()) => return Ok(()),
                Err(HarnessError::Redis(e)) if e.to_string().contains("Unknown node") => {
                    return Ok(())
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(HarnessError::Timeout {
                        what: format!("{addr} to forget node {id} (last error: {e})"),
                        after: started.elapsed(),
                    })
                }
                Err(e) => {
                    debug!(%addr, id, error = %e, "CLUSTER FORGET refused; retrying");
                    tokio::time::sleep(POLL).await;
                }
            }
        }
    }

    /// Points the configuration endpoint at every member, and every member's host name at its
    /// address (each unless frozen).
    fn publish_names(&self) {
        let (mut addrs, hosts): (Vec<SocketAddr>, Vec<(String, SocketAddr)>) = {
            let state = self.lock();
            (
                state.members.iter().map(|m| m.addr).collect(),
                state
                    .members
                    .iter()
                    .filter_map(|m| Some((m.hostname.clone()?, m.addr)))
                    .collect(),
            )
        };
        addrs.sort();
        self.publish_name_list(&self.endpoint, addrs);
        for (name, addr) in hosts {
            self.publish_name(&name, addr);
        }
    }

    /// Points a node's host name at its address (unless frozen).
    fn publish_name(&self, name: &str, addr: SocketAddr) {
        self.publish_name_list(name, vec![addr]);
    }

    fn publish_name_list(&self, name: &str, addrs: Vec<SocketAddr>) {
        // Remembered first, so that Drop removes it even if it stays frozen.
        self.lock().names.insert(name.to_owned());
        self.names.publish(name, addrs);
    }

    fn expected(&self) -> Vec<Expected> {
        self.lock()
            .members
            .iter()
            .map(|m| Expected {
                id: m.id.clone(),
                addr: m.addr,
                running: m.running(),
                hostname: m.hostname.clone(),
            })
            .collect()
    }

    /// One look at the cluster: every running node's CLUSTER INFO, CLUSTER NODES and INFO
    /// replication, evaluated together.
    async fn observe(&self, require_sync: bool) -> Result<Agreed, String> {
        let expected = self.expected();
        let creds = &self.settings.creds;
        let mut pipe = redis::pipe();
        pipe.cmd("CLUSTER")
            .arg("INFO")
            .cmd("CLUSTER")
            .arg("NODES")
            .cmd("INFO")
            .arg("replication");
        let pipe = &pipe;
        let replies = join_all(expected.iter().filter(|e| e.running).map(|e| async move {
            let reply: Result<(String, String, String), _> =
                admin::query_pipe(e.addr, creds, pipe, RESPONSE_TIMEOUT).await;
            (e.addr, reply)
        }))
        .await;
        let mut observations = Vec::with_capacity(replies.len());
        for (addr, reply) in replies {
            let (cluster_info, cluster_nodes, replication) =
                reply.map_err(|e| format!("{addr} did not answer: {e}"))?;
            observations.push(Observation {
                addr,
                cluster_info,
                cluster_nodes,
                replication,
            });
        }
        topology::evaluate(&expected, &observations, self.settings.shards, require_sync)
    }

    /// Polls until the cluster is healthy (and in sync with `require_sync`), then records the
    /// agreed roles. `what` names the goal in the timeout error, with the last problem seen.
    async fn wait_until(
        &self,
        deadline: Instant,
        require_sync: bool,
        what: &str,
    ) -> Result<(), HarnessError> {
        let started = Instant::now();
        loop {
            let problem = match self.observe(require_sync).await {
                Ok(agreed) => {
                    let mut state = self.lock();
                    for m in state.members.iter_mut() {
                        if let Some(&(role, shard)) = agreed.roles.get(&m.id) {
                            m.role = role;
                            m.shard = shard;
                        }
                    }
                    debug!(what, elapsed = ?started.elapsed(), "reached");
                    return Ok(());
                }
                Err(problem) => problem,
            };
            if Instant::now() >= deadline {
                return Err(self.timeout_error(started, format!("{what}; last problem: {problem}")));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Polls until every running member knows every other running member (after `CLUSTER
    /// MEET`): present in its CLUSTER NODES, handshake done, at the right address, with the
    /// right host name.
    async fn wait_known(&self, deadline: Instant) -> Result<(), HarnessError> {
        let started = Instant::now();
        let creds = &self.settings.creds;
        loop {
            let running: Vec<Expected> =
                self.expected().into_iter().filter(|e| e.running).collect();
            let running = &running;
            let views = join_all(running.iter().map(|e| async move {
                let text = admin::query::<String>(
                    e.addr,
                    creds,
                    &cmd(&["CLUSTER", "NODES"]),
                    RESPONSE_TIMEOUT,
                )
                .await
                .map_err(|err| format!("{} did not answer: {err}", e.addr))?;
                let view = topology::parse_cluster_nodes(&text)?;
                for other in running {
                    let ok = view.iter().any(|v| {
                        v.id == other.id
                            && v.addr == Some(other.addr)
                            && !v.handshake
                            && !v.noaddr
                            && (other.hostname.is_none() || v.hostname == other.hostname)
                    });
                    if !ok {
                        return Err(format!("{} does not know {} yet", e.addr, other.addr));
                    }
                }
                Ok(())
            }))
            .await;
            let problem = match views.into_iter().find_map(Result::err) {
                None => {
                    debug!(elapsed = ?started.elapsed(), "all nodes know each other");
                    return Ok(());
                }
                Some(p) => p,
            };
            if Instant::now() >= deadline {
                return Err(self.timeout_error(
                    started,
                    format!("every node to know every other node; last problem: {problem}"),
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        // SIGKILL works on SIGSTOPped processes too; `kill` also reaps, so no zombie is left
        // behind even if the test process lives on.
        for m in &state.members {
            if let Some(p) = &m.process {
                p.kill();
            }
        }
        // After the kills: their FINs may as well be dropped. Deletes the nftables table.
        drop(self.blackhole.take());
        // The names would point at dead addresses; a shared map should not keep them.
        self.names.remove(&self.endpoint);
        for name in &state.names {
            self.names.remove(name);
        }
        if self.keep_dir {
            if let Some(dir) = self.tempdir.take() {
                let path = dir.keep();
                eprintln!("tower-redis-cluster harness: kept {}", path.display());
            }
        }
        debug!(endpoint = %self.endpoint, "local Redis Cluster dropped");
    }
}

/// `CLUSTER REPLICATE master_id` on `replica`, retried while the replica does not know the
/// master yet.
async fn replicate(
    replica: SocketAddr,
    master_id: &str,
    creds: &Credentials,
    deadline: Instant,
) -> Result<(), HarnessError> {
    let started = Instant::now();
    loop {
        match admin::query::<()>(
            replica,
            creds,
            &cmd(&["CLUSTER", "REPLICATE", master_id]),
            RESPONSE_TIMEOUT,
        )
        .await
        {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(HarnessError::Timeout {
                    what: format!(
                        "{replica} to accept CLUSTER REPLICATE {master_id} (last error: {e})"
                    ),
                    after: started.elapsed(),
                })
            }
            Err(e) => {
                debug!(%replica, error = %e, "CLUSTER REPLICATE refused; retrying");
                tokio::time::sleep(POLL).await;
            }
        }
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// A password nobody guesses: 128 random bits in hex (no character redis.conf or a URL needs
/// escaped).
fn random_password() -> String {
    format!(
        "{:016x}{:016x}",
        process::random_u64(),
        process::random_u64()
    )
}
