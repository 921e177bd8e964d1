//! Which keys a command reads and which it writes: what makes a pipeline safe to send again.
//!
//! A pipeline of idempotent commands is not idempotent as a whole when one command reads a key
//! that a later command of the same pipeline writes: the second run reads what the first run
//! left behind. `MULTI; GET k; DEL k; EXEC` (a pop) returns nil the second time;
//! `SUNIONSTORE d a b; DEL a` stores a different union. A read is safe again only when a
//! write *before* it in the pipeline sets the key whatever it held (`SET`, `DEL`, a `STORE`'s
//! destination): both runs then read the same value.

use redis::{Arg, Cmd};

use super::Idempotency;

/// The keys one command touches, as far as the safety of sending its pipeline again goes.
#[derive(Debug, Default)]
pub(crate) struct Access<'a> {
    /// Keys whose value the command (or its reply) depends on.
    pub(crate) reads: Vec<&'a [u8]>,
    /// Keys it changes.
    pub(crate) writes: Vec<&'a [u8]>,
    /// Of `writes`, those it sets whatever they held.
    pub(crate) blind: Vec<&'a [u8]>,
    /// It depends on the whole keyspace (`KEYS`, `SCAN`, `DBSIZE`, `SORT … BY`).
    pub(crate) reads_all: bool,
    /// It changes the whole keyspace (`FLUSHALL`, `FLUSHDB`), whatever it held.
    pub(crate) writes_all: bool,
}

fn upper(word: &[u8]) -> String {
    String::from_utf8_lossy(word).to_ascii_uppercase()
}

/// The keys `cmd` reads and writes; `class` is its idempotency (a non-idempotent command makes
/// its pipeline unsafe anyway, so its keys are not worked out).
pub(crate) fn access(cmd: &Cmd, class: Idempotency) -> Access<'_> {
    let args: Vec<&[u8]> = cmd
        .args_iter()
        .filter_map(|a| match a {
            Arg::Simple(a) => Some(a),
            _ => None,
        })
        .collect();
    let mut access = Access::default();
    let Some(name) = args.first().map(|n| upper(n)) else {
        return access;
    };
    let rest = &args[1..];
    let has = |word: &str| rest.iter().any(|a| a.eq_ignore_ascii_case(word.as_bytes()));
    // `numkeys` at `at`, then that many keys.
    let counted = |at: usize| -> Vec<&[u8]> {
        let n = rest
            .get(at)
            .and_then(|n| std::str::from_utf8(n).ok())
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0);
        rest.iter().skip(at + 1).take(n).copied().collect()
    };
    let first = || rest.first().copied().into_iter().collect::<Vec<_>>();
    match class {
        Idempotency::NonIdempotent => return access,
        Idempotency::ReadOnly => {
            match name.as_str() {
                "EXISTS" | "MGET" | "TOUCH" | "SUNION" | "SINTER" | "SDIFF" | "PFCOUNT" | "LCS" => {
                    access.reads = rest.to_vec()
                }
                "ZUNION" | "ZINTER" | "ZDIFF" | "SINTERCARD" | "ZINTERCARD" => {
                    access.reads = counted(0)
                }
                "EVAL_RO" | "EVALSHA_RO" | "FCALL_RO" => access.reads = counted(1),
                "XREAD" => {
                    if let Some(at) = rest.iter().position(|a| a.eq_ignore_ascii_case(b"STREAMS")) {
                        let streams = &rest[at + 1..];
                        access.reads = streams[..streams.len() / 2].to_vec();
                    }
                }
                "KEYS" | "SCAN" | "RANDOMKEY" | "DBSIZE" => access.reads_all = true,
                "SORT_RO" => {
                    access.reads = first();
                    access.reads_all = has("BY") || has("GET");
                }
                "OBJECT" | "MEMORY" => access.reads = rest.get(1).copied().into_iter().collect(),
                // Keyless: they read the server, not the data.
                "PING" | "ECHO" | "TIME" | "INFO" | "LASTSAVE" | "ROLE" | "COMMAND" | "LOLWUT"
                | "WAIT" | "WAITAOF" | "CLIENT" | "CLUSTER" | "CONFIG" | "ACL" | "LATENCY"
                | "SLOWLOG" | "MODULE" | "FUNCTION" | "SCRIPT" | "PUBSUB" | "XINFO"
                | "XPENDING" => {
                    if name == "XINFO" || name == "XPENDING" {
                        access.reads = if name == "XINFO" {
                            rest.get(1).copied().into_iter().collect()
                        } else {
                            first()
                        };
                    }
                }
                _ => access.reads = first(),
            }
        }
        Idempotency::Idempotent => match name.as_str() {
            "DEL" | "UNLINK" => {
                access.writes = rest.to_vec();
                access.blind = rest.to_vec();
            }
            "MSET" => {
                access.writes = rest.iter().step_by(2).copied().collect();
                access.blind = access.writes.clone();
            }
            // The idempotent forms: no NX / XX / GET.
            "SET" | "SETEX" | "PSETEX" => {
                access.writes = first();
                access.blind = first();
            }
            "RESTORE" => {
                access.writes = first();
                access.blind = first();
            }
            "SUNIONSTORE" | "SINTERSTORE" | "SDIFFSTORE" => {
                access.writes = first();
                access.blind = first();
                access.reads = rest.iter().skip(1).copied().collect();
            }
            "ZUNIONSTORE" | "ZINTERSTORE" | "ZDIFFSTORE" => {
                access.writes = first();
                access.blind = first();
                access.reads = counted(1);
            }
            "ZRANGESTORE" | "GEOSEARCHSTORE" => {
                access.writes = first();
                access.blind = first();
                access.reads = rest.get(1).copied().into_iter().collect();
            }
            "BITOP" => {
                access.writes = rest.get(1).copied().into_iter().collect();
                access.blind = access.writes.clone();
                access.reads = rest.iter().skip(2).copied().collect();
            }
            "PFMERGE" => {
                // Merges into the destination's own registers: it reads it too.
                access.writes = first();
                access.reads = rest.to_vec();
            }
            "COPY" => {
                access.reads = first();
                access.writes = rest.get(1).copied().into_iter().collect();
                if has("REPLACE") {
                    access.blind = access.writes.clone();
                }
            }
            "SORT" | "GEORADIUS" | "GEORADIUSBYMEMBER" => {
                access.reads = first();
                access.reads_all = name == "SORT" && (has("BY") || has("GET"));
                let store = rest.iter().position(|a| {
                    a.eq_ignore_ascii_case(b"STORE") || a.eq_ignore_ascii_case(b"STOREDIST")
                });
                if let Some(dest) = store.and_then(|at| rest.get(at + 1)) {
                    access.writes = vec![*dest];
                    access.blind = vec![*dest];
                }
            }
            "FLUSHALL" | "FLUSHDB" => access.writes_all = true,
            "XGROUP" => access.writes = rest.get(1).copied().into_iter().collect(),
            // Keyless settings of the server or the connection.
            "AUTH" | "HELLO" | "SELECT" | "READONLY" | "READWRITE" | "RESET" | "ASKING"
            | "CLIENT" | "CONFIG" | "ACL" | "CLUSTER" | "SCRIPT" | "FUNCTION" | "LATENCY"
            | "SLOWLOG" | "MEMORY" | "MODULE" => {}
            // The rest write their first key, from what it held (HSET, SADD, ZADD, EXPIREAT…).
            _ => access.writes = first(),
        },
    }
    access
}

/// Whether a pipeline of commands, each safe to send again alone, is unsafe as a whole: one of
/// them reads a key that a later one writes, with no write before it that sets the key
/// whatever it held.
pub(crate) fn read_then_overwritten(commands: &[Access<'_>]) -> bool {
    commands.iter().enumerate().any(|(i, c)| {
        let later = &commands[i + 1..];
        let earlier = &commands[..i];
        let reset_before = |key: &[u8]| {
            earlier
                .iter()
                .any(|e| e.writes_all || e.blind.contains(&key))
        };
        let written_later = |key: &[u8]| {
            later
                .iter()
                .any(|l| l.writes_all || l.writes.contains(&key))
        };
        let any_write_later = later.iter().any(|l| l.writes_all || !l.writes.is_empty());
        (c.reads_all && any_write_later && !earlier.iter().any(|e| e.writes_all))
            || c.reads
                .iter()
                .any(|key| written_later(key) && !reset_before(key))
    })
}
