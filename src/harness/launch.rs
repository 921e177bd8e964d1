//! Starting one `redis-server` and waiting until it answers.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use tracing::debug;

use super::{
    admin::{self, cmd, Credentials},
    error::HarnessError,
    process::{self, NodeProcess},
};

/// How long one `redis-server` may take to answer its first PING.
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a node's address may look busy before its start fails.
const ADDR_BUSY_GRACE: Duration = Duration::from_secs(2);

/// Spawns `redis-server <conf>` for `addr` and waits until it answers PING.
///
/// The address can look busy for a moment although nobody uses it: a process forked by another
/// thread of this program (another test spawning its redis-server, or `kill`) holds a copy of
/// every open socket of ours until it execs, including a bind-check listener that was just
/// closed. So the address is re-checked for a while before spawning, and a node that exits at
/// start-up with `Address already in use` is started again; a real squatter keeps the address
/// busy past the grace period and still fails the start, with Redis's own message.
///
/// The process is returned only once ready; if this future fails or is dropped, the process is
/// killed with it.
pub(crate) async fn launch(
    bin: &Path,
    conf: &Path,
    dir: &Path,
    addr: SocketAddr,
    cluster: bool,
    creds: &Credentials,
) -> Result<Arc<NodeProcess>, HarnessError> {
    let IpAddr::V4(ip) = addr.ip() else {
        return Err(HarnessError::Invalid(format!("{addr} is not IPv4")));
    };
    let started = Instant::now();
    loop {
        if let Err(e) = process::check_addr_free(ip, addr.port(), cluster) {
            if started.elapsed() >= ADDR_BUSY_GRACE {
                return Err(HarnessError::Io(e));
            }
            debug!(%addr, error = %e, "address busy; re-checking");
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let proc = Arc::new(NodeProcess::spawn(bin, conf, dir)?);
        debug!(%addr, pid = proc.pid(), "redis-server spawned");
        match wait_ready(&proc, addr, dir, creds, START_TIMEOUT).await {
            Ok(()) => return Ok(proc),
            Err(HarnessError::NodeExited { log_tail, .. })
                if log_tail.contains("Address already in use")
                    && started.elapsed() < ADDR_BUSY_GRACE =>
            {
                debug!(%addr, "redis-server could not bind; starting it again");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Polls PING until the node answers, its process exits, or `timeout` passes.
///
/// Any reply from the server counts, errors included (`NOAUTH` still proves it is up), except
/// `LOADING`.
async fn wait_ready(
    proc: &NodeProcess,
    addr: SocketAddr,
    dir: &Path,
    creds: &Credentials,
    timeout: Duration,
) -> Result<(), HarnessError> {
    let started = Instant::now();
    loop {
        if let Some(status) = proc.exit_status() {
            return Err(HarnessError::NodeExited {
                addr,
                status: status.to_string(),
                log_tail: process::log_tail(dir, 20),
            });
        }
        let last =
            match admin::query::<String>(addr, creds, &cmd(&["PING"]), Duration::from_millis(500))
                .await
            {
                Ok(_) => return Ok(()),
                Err(HarnessError::Redis(e)) if e.code().is_some_and(|c| c != "LOADING") => {
                    return Ok(())
                }
                Err(e) => e.to_string(),
            };
        if started.elapsed() >= timeout {
            return Err(HarnessError::Timeout {
                what: format!(
                    "redis-server at {addr} to answer PING (last error: {last}); log:\n{}",
                    process::log_tail(dir, 20)
                ),
                after: started.elapsed(),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
