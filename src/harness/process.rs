//! `redis-server` processes: finding the binary, picking loopback addresses, writing the config,
//! spawning, signalling and killing.

use std::{
    collections::HashSet,
    ffi::OsString,
    fmt::Write as _,
    fs,
    hash::{BuildHasher, Hasher},
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Mutex, OnceLock, PoisonError,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use super::error::{io_context, HarnessError};

/// Environment variable naming the `redis-server` binary to use.
pub(crate) const ENV_REDIS_SERVER: &str = "TRC_REDIS_SERVER";

/// Redis Cluster's bus port is the client port plus this (the Redis default).
pub(crate) const BUS_PORT_OFFSET: u16 = 10_000;

/// Name of the file that receives the process's stdout/stderr: errors printed before Redis has
/// opened its `logfile` (a bad config line, a port in use) only appear there.
pub(crate) const STDIO_LOG: &str = "stdio.log";
/// Name of Redis's own log file.
pub(crate) const REDIS_LOG: &str = "redis.log";

/// Finds the `redis-server` binary: the builder's path, else `TRC_REDIS_SERVER`, else `PATH`.
///
/// Done up front (rather than letting `spawn` fail) so the error can say how to install Redis.
pub(crate) fn find_redis_server(explicit: Option<&Path>) -> Result<PathBuf, HarnessError> {
    let given = explicit.map(Path::to_path_buf).or_else(|| {
        std::env::var_os(ENV_REDIS_SERVER)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    match given {
        // A bare name is looked up on PATH, as a shell would; anything with a separator is a path.
        Some(p) if p.components().count() == 1 && !p.is_absolute() => {
            search_path(p.as_os_str()).ok_or(HarnessError::RedisServerNotFound { tried: p })
        }
        Some(p) if is_executable(&p) => Ok(p),
        Some(p) => Err(HarnessError::RedisServerNotFound { tried: p }),
        None => search_path("redis-server".as_ref()).ok_or(HarnessError::RedisServerNotFound {
            tried: PathBuf::from("redis-server"),
        }),
    }
}

pub(crate) fn search_path(name: &std::ffi::OsStr) -> Option<PathBuf> {
    let path: OsString = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

pub(crate) fn is_executable(path: &Path) -> bool {
    let Ok(meta) = fs::metadata(path) else {
        return false;
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        meta.is_file() && meta.permissions().mode() & 0o111 != 0
    }
    #[cfg(not(unix))]
    {
        meta.is_file()
    }
}

// ---------------------------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------------------------

/// A pseudo-random number that differs between calls, threads and processes.
///
/// Parallel tests (threads of one process, or one process per test under cargo-nextest) must not
/// pick the same subnet, so the seed mixes the pid, a process-wide counter, the wall clock and the
/// per-process random keys of `RandomState`; SplitMix64 then spreads the bits. This is not
/// cryptographic and need not be: a collision is caught by the bind check anyway.
pub(crate) fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(count);
    hasher.write_u32(std::process::id());
    hasher.write_u64(nanos);
    let mut x = hasher.finish() ^ nanos.rotate_left(17) ^ (u64::from(std::process::id()) << 32);
    // SplitMix64 finaliser.
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Subnets handed out by this process and not yet released.
///
/// The bind check only sees sockets that exist; this set also covers a cluster of this process
/// whose next node has not bound its address yet (a replacement at host `.7` of the subnet).
static SUBNETS_IN_USE: Mutex<Option<HashSet<(u8, u8)>>> = Mutex::new(None);

/// A `127.A.B.0/24` subnet and one port, reserved for one cluster or standalone server.
///
/// Every node of a cluster listens on the same port at `127.A.B.<host>`. Dropping the lease
/// makes the subnet available to this process again.
#[derive(Debug)]
pub(crate) struct SubnetLease {
    a: u8,
    b: u8,
    port: u16,
}

impl SubnetLease {
    /// Picks a random subnet `127.A.B.0/24` (A in 2..=254, so never 127.0.x.x or 127.1.x.x where
    /// ordinary services live) and a random port in 20000..=39999 (bus port + 10000 stays below
    /// 50000), and checks that hosts `1..=check_hosts` can bind the port (and the bus port when
    /// `cluster`). Retries another candidate on conflict.
    pub(crate) fn acquire(check_hosts: u8, cluster: bool) -> Result<Self, HarnessError> {
        const ATTEMPTS: usize = 64;
        for _ in 0..ATTEMPTS {
            let r = random_u64();
            let a = 2 + (r % 253) as u8;
            let b = (r >> 8) as u8;
            let port = 20_000 + ((r >> 16) % 20_000) as u16;
            {
                let mut guard = SUBNETS_IN_USE
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let set = guard.get_or_insert_with(HashSet::new);
                if !set.insert((a, b)) {
                    continue;
                }
            }
            let lease = SubnetLease { a, b, port };
            if (1..=check_hosts.max(1)).all(|h| check_addr_free(lease.ip(h), port, cluster).is_ok())
            {
                tracing::debug!(subnet = %lease.ip(0), port, "loopback subnet reserved");
                return Ok(lease);
            }
            // `lease` drops here and releases the subnet.
        }
        Err(HarnessError::NoFreeAddress { attempts: ATTEMPTS })
    }

    /// The IP of host number `host` in the subnet.
    pub(crate) fn ip(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(127, self.a, self.b, host)
    }

    /// The `A` of `127.A.B.0/24`.
    pub(crate) fn a(&self) -> u8 {
        self.a
    }

    /// The `B` of `127.A.B.0/24`.
    pub(crate) fn b(&self) -> u8 {
        self.b
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    pub(crate) fn addr(&self, host: u8) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.ip(host), self.port))
    }
}

impl Drop for SubnetLease {
    fn drop(&mut self) {
        let mut guard = SUBNETS_IN_USE
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(set) = guard.as_mut() {
            set.remove(&(self.a, self.b));
        }
    }
}

/// Whether `ip:port` (and `ip:port+10000` for a cluster node) can be bound right now.
///
/// Binding is the only reliable check: it also fails when another process listens on the
/// wildcard address with that port. The listeners are closed again before Redis binds.
pub(crate) fn check_addr_free(ip: Ipv4Addr, port: u16, cluster: bool) -> io::Result<()> {
    let bind = |p: u16| {
        TcpListener::bind((ip, p))
            .map(drop)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot bind {ip}:{p}: {e}")))
    };
    bind(port)?;
    if cluster {
        bind(port + BUS_PORT_OFFSET)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// Quotes a value for redis.conf (which splits lines like a shell, honouring `"..."`).
pub(crate) fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The settings every harness node (cluster or standalone) gets.
///
/// A `tls` node listens with TLS on `port` and has no plaintext port at all (`port 0`), so a
/// client that forgets TLS fails instead of quietly connecting in the clear.
pub(crate) fn base_config(ip: Ipv4Addr, port: u16, dir: &Path, tls: bool) -> String {
    let mut c = String::new();
    let dir = quote(&dir.to_string_lossy());
    let _ = writeln!(c, "bind {ip}");
    if tls {
        let _ = writeln!(c, "port 0");
        let _ = writeln!(c, "tls-port {port}");
    } else {
        let _ = writeln!(c, "port {port}");
    }
    let _ = writeln!(c, "dir {dir}");
    let _ = writeln!(c, "logfile {}", quote(REDIS_LOG));
    let _ = writeln!(c, "daemonize no");
    // Tests want nodes without persistence: a restarted node comes back empty, fast.
    let _ = writeln!(c, "save \"\"");
    let _ = writeln!(c, "appendonly no");
    // Loopback-only and throwaway, so no password is required unless asked for.
    let _ = writeln!(c, "protected-mode no");
    let _ = writeln!(c, "enable-debug-command yes");
    // Full syncs without touching the disk and without waiting for more replicas.
    let _ = writeln!(c, "repl-diskless-sync yes");
    let _ = writeln!(c, "repl-diskless-sync-delay 0");
    c
}

/// Appends `key value` lines verbatim: the value is not quoted, so that multi-word settings such
/// as `user app on >secret ~* +@all` keep their words.
pub(crate) fn append_extra(conf: &mut String, extra: &[(String, String)]) {
    for (k, v) in extra {
        let _ = writeln!(conf, "{k} {v}");
    }
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// One `redis-server` process.
///
/// The `Child` sits behind a mutex and is taken out when the process is killed and reaped: a
/// signal is only sent while holding the lock and while the child is still there, so it can never
/// reach a recycled pid (the pid of an unreaped child cannot be reused).
#[derive(Debug)]
pub(crate) struct NodeProcess {
    pid: u32,
    child: Mutex<Option<Child>>,
}

impl NodeProcess {
    /// Starts `redis-server <conf>` in `dir`, with stdout/stderr appended to `dir/stdio.log`.
    ///
    /// `std::process` rather than `tokio::process`: `Drop` must be able to kill and reap
    /// synchronously, also while unwinding from a panic outside any runtime. The process is
    /// forked by the [spawner thread](spawn_child) under `setpriv --pdeathsig KILL`, so it dies
    /// with this program even when no `Drop` runs (`std::process::exit`, SIGKILL, abort).
    pub(crate) fn spawn(bin: &Path, conf: &Path, dir: &Path) -> Result<Self, HarnessError> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(STDIO_LOG))
            .map_err(|e| io_context(e, format!("opening {}", dir.join(STDIO_LOG).display())))?;
        let log2 = log
            .try_clone()
            .map_err(|e| io_context(e, "duplicating the log file handle"))?;
        let mut command = match setpriv() {
            // setpriv execs redis-server, so the pid stays the server's: `kill`, `/proc/<pid>`
            // and `LocalCluster::pids` all see the server itself.
            Some(setpriv) => {
                let mut c = Command::new(setpriv);
                c.args(["--pdeathsig", "KILL", "--"]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        command
            .arg(conf)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let child = spawn_child(command).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                HarnessError::RedisServerNotFound {
                    tried: bin.to_path_buf(),
                }
            } else {
                io_context(e, format!("spawning {}", bin.display()))
            }
        })?;
        Ok(NodeProcess {
            pid: child.id(),
            child: Mutex::new(Some(child)),
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The exit status if the process has exited on its own (it is then reaped).
    pub(crate) fn exit_status(&self) -> Option<ExitStatus> {
        let mut guard = self.lock();
        let child = guard.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                *guard = None;
                Some(status)
            }
            _ => None,
        }
    }

    /// Sends `signal` (a name such as `STOP` or `CONT`) if the process is still ours.
    ///
    /// The crate forbids `unsafe`, so there is no `libc::kill`; the `kill` utility does the same
    /// job. Holding the lock across it keeps the pid from being reaped (and reused) meanwhile.
    pub(crate) fn signal(&self, signal: &str) -> Result<(), HarnessError> {
        let guard = self.lock();
        if guard.is_none() {
            return Err(HarnessError::Invalid(format!(
                "process {} is not running",
                self.pid
            )));
        }
        let status = Command::new("kill")
            .args(["-s", signal, &self.pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| io_context(e, format!("running `kill -s {signal} {}`", self.pid)))?;
        drop(guard);
        if status.success() {
            Ok(())
        } else {
            Err(HarnessError::Io(io::Error::other(format!(
                "`kill -s {signal} {}` failed: {status}",
                self.pid
            ))))
        }
    }

    /// SIGKILL (which also ends a SIGSTOPped process) and reap. Idempotent.
    pub(crate) fn kill(&self) {
        let mut guard = self.lock();
        if let Some(mut child) = guard.take() {
            let _ = child.kill();
            let _ = child.wait();
            tracing::debug!(pid = self.pid, "redis-server killed");
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// No orphans: one spawner thread, and the parent-death signal
// ---------------------------------------------------------------------------------------------

/// A command for the spawner thread, and where its result goes.
struct SpawnRequest {
    command: Command,
    reply: mpsc::SyncSender<io::Result<Child>>,
}

/// Spawns `command` from the harness's one spawner thread, which lives as long as the process.
///
/// Linux sends the parent-death signal (`setpriv --pdeathsig`) when the *thread* that forked
/// the child exits, not when the process does. libtest runs every test on a thread of its own
/// and tokio moves tasks between worker threads, so a node forked by whichever thread happened
/// to run the launch would be SIGKILLed as soon as that thread ended, while the test may still
/// use it. One dedicated thread that never returns ends only with the process: then, and only
/// then, the kernel kills every node, also when the program ends without dropping its clusters
/// (`std::process::exit`, SIGKILL, an abort).
///
/// Requests are served one at a time; a spawn takes about a millisecond, so the serialisation
/// costs nothing next to a node's start-up.
fn spawn_child(command: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<Option<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        let started = std::thread::Builder::new()
            .name("trc-spawner".into())
            .spawn(move || {
                // The sender is a static that is never dropped, so this loop never ends.
                for mut req in rx {
                    let _ = req.reply.send(req.command.spawn());
                }
            });
        match started {
            Ok(_) => Some(tx),
            Err(e) => {
                tracing::error!(error = %e, "could not start the harness's spawner thread");
                None
            }
        }
    });
    let spawner = spawner.as_ref().ok_or_else(|| {
        io::Error::other("the harness's spawner thread could not be started (see the error log)")
    })?;
    let (reply, result) = mpsc::sync_channel(1);
    spawner
        .send(SpawnRequest { command, reply })
        .map_err(|_| io::Error::other("the harness's spawner thread is gone"))?;
    result
        .recv()
        .map_err(|_| io::Error::other("the harness's spawner thread did not answer"))?
}

/// `setpriv` (util-linux), if it is there and can set a parent-death signal; looked up once.
///
/// Without it (not Linux, or util-linux older than 2.33) nodes are spawned as they are, and a
/// warning says once that they can outlive a program that exits without dropping its clusters.
fn setpriv() -> Option<&'static Path> {
    static SETPRIV: OnceLock<Option<PathBuf>> = OnceLock::new();
    SETPRIV
        .get_or_init(|| {
            let found = if cfg!(target_os = "linux") {
                search_path("setpriv".as_ref())
                    .or_else(|| {
                        ["/usr/bin/setpriv", "/bin/setpriv"]
                            .into_iter()
                            .map(PathBuf::from)
                            .find(|p| is_executable(p))
                    })
                    .filter(|p| supports_pdeathsig(p))
            } else {
                None
            };
            if found.is_none() {
                tracing::warn!(
                    "`setpriv --pdeathsig` is not available (Linux with util-linux 2.33 or later: \
                     `apt-get install -y util-linux`): redis-server processes of the harness will \
                     outlive a test program that exits without dropping its clusters \
                     (std::process::exit, SIGKILL)"
                );
            }
            found
        })
        .as_deref()
}

fn supports_pdeathsig(setpriv: &Path) -> bool {
    Command::new(setpriv)
        .arg("--help")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--pdeathsig"))
}

/// The last `lines` lines of the node's stdio and Redis logs, for error messages.
pub(crate) fn log_tail(dir: &Path, lines: usize) -> String {
    let mut out = String::new();
    for name in [STDIO_LOG, REDIS_LOG] {
        if let Ok(text) = fs::read_to_string(dir.join(name)) {
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            if !all.is_empty() {
                let _ = writeln!(out, "--- {name} ---");
                for l in &all[start..] {
                    let _ = writeln!(out, "{l}");
                }
            }
        }
    }
    if out.is_empty() {
        out.push_str("(no output)");
    }
    out
}
