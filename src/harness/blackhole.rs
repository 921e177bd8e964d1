//! Dead nodes that vanish like cloud hosts: nftables rules that drop every packet to and from a
//! killed node's port and bus port.
//!
//! A killed local process is not what a client of a managed service sees when a host dies: the
//! kernel answers a connect to a closed port with a reset at once, and closes the dead process's
//! connections with a FIN. A vanished cloud host answers nothing — connects hang until their
//! timeout and established connections go silent. Dropping the packets reproduces that.
//!
//! Each cluster owns one table, `trc_<pid>_<a>_<b>` (its process and its subnet
//! `127.a.b.0/24`), with one set of dead `ip . port` pairs and two rules on the output hook
//! (every loopback packet passes it, in both directions), both limited to the cluster's subnet.
//! Blocking or unblocking a node is an element change in one transaction. The table is deleted
//! when the cluster is dropped; a program that ends without dropping it (SIGKILL,
//! `std::process::exit`) leaves its table behind, so the first blackholing cluster of every
//! process [sweeps](sweep) the tables of processes that are gone.

use std::{
    io::{self, Read, Write as _},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use super::{
    error::HarnessError,
    process::{self, BUS_PORT_OFFSET},
};

/// Environment variable naming the `nft` binary to use.
pub(crate) const ENV_NFT: &str = "TRC_NFT";

/// Every table of the harness starts with this.
const TABLE_PREFIX: &str = "trc_";

/// Finds `nft`: the builder's path, else `TRC_NFT`, else `PATH`, else the sbin directories (which
/// are often missing from `PATH` outside root's shell).
pub(crate) fn find_nft(explicit: Option<&Path>) -> Result<PathBuf, HarnessError> {
    let given = explicit.map(Path::to_path_buf).or_else(|| {
        std::env::var_os(ENV_NFT)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    match given {
        Some(p) if p.components().count() == 1 && !p.is_absolute() => {
            process::search_path(p.as_os_str()).ok_or(HarnessError::NftNotFound { tried: p })
        }
        Some(p) if process::is_executable(&p) => Ok(p),
        Some(p) => Err(HarnessError::NftNotFound { tried: p }),
        None => process::search_path("nft".as_ref())
            .or_else(|| {
                ["/usr/sbin/nft", "/sbin/nft"]
                    .into_iter()
                    .map(PathBuf::from)
                    .find(|p| process::is_executable(p))
            })
            .ok_or(HarnessError::NftNotFound {
                tried: PathBuf::from("nft"),
            }),
    }
}

/// How long one `nft` command may take; it normally takes a few milliseconds.
const NFT_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `nft <args>` with `script` on stdin (when given), for at most [`NFT_TIMEOUT`]; the
/// error carries nft's own message.
fn nft(bin: &Path, args: &[&str], script: Option<&str>) -> Result<String, HarnessError> {
    let shown = || {
        let mut s = format!("{} {}", bin.display(), args.join(" "));
        if let Some(script) = script {
            s += &format!(" <<'EOF'\n{script}EOF");
        }
        s
    };
    let failed = |output: String| HarnessError::NftFailed {
        command: shown(),
        output,
    };
    let mut child = Command::new(bin)
        .args(args)
        .stdin(if script.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => HarnessError::NftNotFound {
                tried: bin.to_path_buf(),
            },
            _ => failed(e.to_string()),
        })?;
    if let (Some(script), Some(mut stdin)) = (script, child.stdin.take()) {
        // A failed write shows up as nft's own error below. Dropping stdin ends the script.
        let _ = stdin.write_all(script.as_bytes());
    }
    // Read on threads of their own, so that a chatty nft never blocks on a full pipe while
    // this thread waits for it with a deadline.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut text);
            }
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < NFT_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(failed(format!(
                    "no answer within {NFT_TIMEOUT:?}; killed it"
                )));
            }
            Err(e) => return Err(failed(e.to_string())),
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    if status.success() {
        Ok(stdout)
    } else {
        Err(failed(format!("{} ({status})", stderr.trim())))
    }
}

/// One cluster's nftables table.
#[derive(Debug)]
pub(crate) struct Blackhole {
    nft: PathBuf,
    table: String,
}

impl Blackhole {
    /// Sweeps stale tables (once per process), then creates this cluster's table for the subnet
    /// `127.a.b.0/24`, empty: nothing is dropped until a node is [blocked](Self::block).
    ///
    /// Done before any node starts, so a missing `nft` or missing privileges fail `start()` at
    /// once, with the fix in the message, rather than the first kill.
    pub(crate) fn create(nft_bin: PathBuf, a: u8, b: u8) -> Result<Blackhole, HarnessError> {
        sweep_once(&nft_bin)?;
        let table = format!("{TABLE_PREFIX}{}_{a}_{b}", std::process::id());
        let subnet = format!("127.{a}.{b}.0/24");
        // `add` then `delete` first: a clean table even if one of that name was left over (a
        // subnet of this process is reused only after its cluster is gone). One transaction.
        let script = format!(
            "add table inet {table}\n\
             delete table inet {table}\n\
             table inet {table} {{\n\
             \tset dead {{ type ipv4_addr . inet_service; }}\n\
             \tchain out {{\n\
             \t\ttype filter hook output priority 0; policy accept;\n\
             \t\tip daddr {subnet} ip daddr . tcp dport @dead drop\n\
             \t\tip saddr {subnet} ip saddr . tcp sport @dead drop\n\
             \t}}\n\
             }}\n"
        );
        nft(&nft_bin, &["-f", "-"], Some(&script))?;
        tracing::debug!(%table, "nftables table created");
        Ok(Blackhole {
            nft: nft_bin,
            table,
        })
    }

    /// The table's name.
    pub(crate) fn table(&self) -> &str {
        &self.table
    }

    fn elements(addr: SocketAddr) -> Result<String, HarnessError> {
        let IpAddr::V4(ip) = addr.ip() else {
            return Err(HarnessError::Invalid(format!("{addr} is not IPv4")));
        };
        let port = addr.port();
        Ok(format!(
            "{{ {ip} . {port}, {ip} . {} }}",
            port + BUS_PORT_OFFSET
        ))
    }

    /// Drops every packet to and from `addr` and its bus port from now on. Idempotent.
    pub(crate) fn block(&self, addr: SocketAddr) -> Result<(), HarnessError> {
        let script = format!(
            "add element inet {} dead {}\n",
            self.table,
            Self::elements(addr)?
        );
        nft(&self.nft, &["-f", "-"], Some(&script))?;
        tracing::debug!(%addr, table = %self.table, "node blackholed");
        Ok(())
    }

    /// Lets packets to and from `addr` and its bus port through again. Idempotent: deleting an
    /// element that is not there fails in nftables, so it is added first, in the same
    /// transaction.
    pub(crate) fn unblock(&self, addr: SocketAddr) -> Result<(), HarnessError> {
        let elements = Self::elements(addr)?;
        let script = format!(
            "add element inet {t} dead {elements}\ndelete element inet {t} dead {elements}\n",
            t = self.table
        );
        nft(&self.nft, &["-f", "-"], Some(&script))?;
        tracing::debug!(%addr, table = %self.table, "node reachable again");
        Ok(())
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        if let Err(e) = nft(&self.nft, &["delete", "table", "inet", &self.table], None) {
            // Nothing to return an error to; the next process's sweep removes it.
            tracing::warn!(table = %self.table, error = %e, "could not delete the nftables table");
        } else {
            tracing::debug!(table = %self.table, "nftables table deleted");
        }
    }
}

/// Whether a process with this pid exists and is not a zombie.
fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        // The state follows the command name, which is in parentheses and may hold anything.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| !matches!(state, 'Z' | 'X')),
    }
}

/// The pid in a harness table name (`trc_<pid>_<a>_<b>`).
fn table_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(TABLE_PREFIX)?;
    let mut parts = rest.split('_');
    let pid = parts.next()?.parse().ok()?;
    let a: Option<u8> = parts.next().and_then(|p| p.parse().ok());
    let b: Option<u8> = parts.next().and_then(|p| p.parse().ok());
    (a.is_some() && b.is_some() && parts.next().is_none()).then_some(pid)
}

/// Deletes the harness tables (`inet trc_<pid>_*`) whose process is gone; returns their names.
///
/// Tables of live processes are left alone, so tests running in parallel processes (as under
/// cargo-nextest) never remove each other's rules. A pid that was reused by an unrelated process
/// keeps its stale table until that process ends: harmless, its set names only addresses nobody
/// listens on any more.
pub(crate) fn sweep(nft_bin: &Path) -> Result<Vec<String>, HarnessError> {
    let listing = nft(nft_bin, &["list", "tables"], None)?;
    let me = std::process::id();
    let mut removed = Vec::new();
    for line in listing.lines() {
        let mut words = line.split_whitespace();
        let (Some("table"), Some("inet"), Some(name)) = (words.next(), words.next(), words.next())
        else {
            continue;
        };
        let Some(pid) = table_pid(name) else {
            continue;
        };
        if pid == me || pid_alive(pid) {
            continue;
        }
        match nft(nft_bin, &["delete", "table", "inet", name], None) {
            Ok(_) => {
                tracing::info!(
                    table = name,
                    pid,
                    "removed the nftables table of a dead process"
                );
                removed.push(name.to_owned());
            }
            // Another process's sweep may have removed it a moment ago.
            Err(e) => tracing::debug!(table = name, error = %e, "stale table not deleted"),
        }
    }
    Ok(removed)
}

/// [`sweep`], the first time it succeeds in this process.
fn sweep_once(nft_bin: &Path) -> Result<(), HarnessError> {
    static SWEPT: AtomicBool = AtomicBool::new(false);
    if !SWEPT.load(Ordering::Acquire) {
        sweep(nft_bin)?;
        SWEPT.store(true, Ordering::Release);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_carry_the_pid() {
        assert_eq!(table_pid("trc_1234_5_6"), Some(1234));
        assert_eq!(table_pid("trc_1234_5"), None);
        assert_eq!(table_pid("trc_1234_5_6_7"), None);
        assert_eq!(table_pid("trc_x_5_6"), None);
        assert_eq!(table_pid("filter"), None);
    }

    #[test]
    fn this_process_is_alive() {
        assert!(pid_alive(std::process::id()));
        // Above the kernel's pid_max limit (4194304), so never a process.
        assert!(!pid_alive(4_194_305));
    }

    #[test]
    fn a_missing_nft_is_named() {
        let e = find_nft(Some(Path::new("/nonexistent/nft"))).unwrap_err();
        assert!(matches!(e, HarnessError::NftNotFound { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("apt-get install -y nftables"), "{msg}");
        assert!(
            msg.contains("TRC_NFT") && msg.contains("CAP_NET_ADMIN"),
            "{msg}"
        );
    }
}
