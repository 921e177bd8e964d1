//! Which keys a command reads and which it writes: what makes a pipeline safe to send again.
//!
//! A pipeline of idempotent commands is not idempotent as a whole when one command reads a key
//! that a later command of the same pipeline writes: the second run reads what the first run
//! left behind. `MULTI; GET k; DEL k; EXEC` (a pop) returns nil the second time;
//! `SUNIONSTORE d a b; DEL a` stores a different union. A read is safe again only when a
//! write *before* it in the pipeline sets the key whatever it held (`SET`, `DEL`, a `STORE`'s
//! destination): both runs then read the same value.
//!
//! A write depends on its key too, when it works on what the key holds: `ZADD b 1 m; SET b m`
//! fails with `WRONGTYPE` the second time (the first run left a string where `ZADD` wants a
//! sorted set), `HDEL h f; ZADD h 1 m` too, and `SADD s m; DEL s` succeeds the second time
//! where the first run, finding a string, failed. So a write that needs its key's type is
//! unsafe before a later write of that key, unless the later one is a write of the same kind
//! (`SADD s x; SREM s y` fail together or succeed together, and leave a set or nothing).
//! `LSET`, which needs its key to exist, is unsafe before any later write of it.

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
    /// Of `writes`, those written from what they hold: the command fails on a key of another
    /// type (`HSET`, `ZADD`, `SETRANGE`…) or one that does not exist (`LSET`).
    pub(crate) typed: Vec<&'a [u8]>,
    /// The type `typed` keys must have, when any key of that type (or none) will do; `None`
    /// when the command needs more (`LSET`: an existing list).
    pub(crate) family: Option<&'static str>,
    /// It depends on the whole keyspace (`KEYS`, `SCAN`, `DBSIZE`, `SORT … BY`).
    pub(crate) reads_all: bool,
    /// It changes the whole keyspace (`FLUSHALL`, `FLUSHDB`).
    pub(crate) writes_all: bool,
    /// ...whatever it held: a flush that cannot fail.
    pub(crate) resets_all: bool,
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
            // A write counts as setting its keys whatever they held (`blind`) only when it
            // cannot fail: a command that can (a store whose source has another type, a
            // RESTORE of a bad payload, SET with a bad expiry) may leave its key alone.
            "DEL" | "UNLINK" => {
                access.writes = rest.to_vec();
                access.blind = rest.to_vec();
            }
            "MSET" => {
                access.writes = rest.iter().step_by(2).copied().collect();
                if rest.len().is_multiple_of(2) {
                    access.blind = access.writes.clone();
                }
            }
            // The idempotent forms: no NX / XX / GET.
            "SET" | "SETEX" | "PSETEX" => {
                access.writes = first();
                if set_cannot_fail(&name, rest) {
                    access.blind = first();
                }
            }
            "RESTORE" => access.writes = first(),
            "SUNIONSTORE" | "SINTERSTORE" | "SDIFFSTORE" => {
                access.writes = first();
                access.reads = rest.iter().skip(1).copied().collect();
            }
            "ZUNIONSTORE" | "ZINTERSTORE" | "ZDIFFSTORE" => {
                access.writes = first();
                access.reads = counted(1);
            }
            "ZRANGESTORE" | "GEOSEARCHSTORE" => {
                access.writes = first();
                access.reads = rest.get(1).copied().into_iter().collect();
            }
            "BITOP" => {
                access.writes = rest.get(1).copied().into_iter().collect();
                access.reads = rest.iter().skip(2).copied().collect();
            }
            "PFMERGE" => {
                // Merges into the destination's own registers: it reads it too.
                access.writes = first();
                access.reads = rest.to_vec();
            }
            "COPY" => {
                // Even with REPLACE it leaves the destination alone when the source does not
                // exist: never a write "whatever it held".
                access.reads = first();
                access.writes = rest.get(1).copied().into_iter().collect();
            }
            "SORT" | "GEORADIUS" | "GEORADIUSBYMEMBER" => {
                access.reads = first();
                access.reads_all = name == "SORT" && (has("BY") || has("GET"));
                let store = rest.iter().position(|a| {
                    a.eq_ignore_ascii_case(b"STORE") || a.eq_ignore_ascii_case(b"STOREDIST")
                });
                if let Some(dest) = store.and_then(|at| rest.get(at + 1)) {
                    access.writes = vec![*dest];
                }
            }
            "FLUSHALL" | "FLUSHDB" => {
                access.writes_all = true;
                access.resets_all = match rest {
                    [] => true,
                    [mode] => {
                        mode.eq_ignore_ascii_case(b"ASYNC") || mode.eq_ignore_ascii_case(b"SYNC")
                    }
                    _ => false,
                };
            }
            "XGROUP" => {
                access.writes = rest.get(1).copied().into_iter().collect();
                access.typed = access.writes.clone();
            }
            // Keyless settings of the server or the connection.
            "AUTH" | "HELLO" | "SELECT" | "READONLY" | "READWRITE" | "RESET" | "ASKING"
            | "CLIENT" | "CONFIG" | "ACL" | "CLUSTER" | "SCRIPT" | "FUNCTION" | "LATENCY"
            | "SLOWLOG" | "MEMORY" | "MODULE" => {}
            // The rest write their first key, from what it held (HSET, SADD, ZADD, EXPIREAT…).
            _ => {
                access.writes = first();
                access.typed = first();
                access.family = family(&name);
            }
        },
    }
    access
}

/// Whether a `SET`, `SETEX` or `PSETEX` (without NX, XX or GET) is well formed, so that it
/// sets its key whatever the key held: a missing value or an expiry that is not a positive
/// integer fails it.
fn set_cannot_fail(name: &str, rest: &[&[u8]]) -> bool {
    let positive = |word: &[u8]| {
        std::str::from_utf8(word)
            .ok()
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n > 0 && n < i64::MAX as u64 / 1000)
    };
    match (name, rest) {
        ("SETEX" | "PSETEX", [_, expiry, _]) => positive(expiry),
        ("SET", [_, _, options @ ..]) => {
            let mut options = options.iter();
            while let Some(option) = options.next() {
                let option = upper(option);
                match option.as_str() {
                    "KEEPTTL" => {}
                    "EX" | "PX" | "EXAT" | "PXAT" => {
                        if !options.next().is_some_and(|n| positive(n)) {
                            return false;
                        }
                    }
                    _ => return false,
                }
            }
            true
        }
        _ => false,
    }
}

/// The type a write works on, for the writes that take their key as any key of that type or
/// none; `None` for the rest (which need more, or are not known here).
fn family(name: &str) -> Option<&'static str> {
    Some(match name {
        "HSET" | "HMSET" | "HDEL" => "hash",
        "SADD" | "SREM" => "set",
        "ZADD" | "ZREM" | "ZREMRANGEBYLEX" | "ZREMRANGEBYSCORE" | "ZREMRANGEBYRANK" | "GEOADD" => {
            "zset"
        }
        "SETRANGE" | "SETBIT" => "string",
        // A string too, but one that SETRANGE or SETBIT make unreadable to the next PFADD.
        "PFADD" => "hyperloglog",
        "XACK" | "XDEL" => "stream",
        _ => return None,
    })
}

/// Whether a pipeline of commands, each safe to send again alone, is unsafe as a whole: one of
/// them reads a key that a later one writes, or writes a key from what it holds that a later
/// one writes otherwise than as the same kind of value — with no write before it that sets
/// the key whatever it held.
pub(crate) fn read_then_overwritten(commands: &[Access<'_>]) -> bool {
    commands.iter().enumerate().any(|(i, c)| {
        let later = &commands[i + 1..];
        let earlier = &commands[..i];
        let reset_before = |key: &[u8]| {
            earlier
                .iter()
                .any(|e| e.resets_all || e.blind.contains(&key))
        };
        let written_later = |key: &[u8]| {
            later
                .iter()
                .any(|l| l.writes_all || l.writes.contains(&key))
        };
        // A later write of the same kind of value finds (and leaves) what this one wants.
        let rewritten_later = |key: &[u8]| {
            later.iter().any(|l| {
                let same_kind =
                    c.family.is_some() && l.family == c.family && l.typed.contains(&key);
                (l.writes_all || l.writes.contains(&key)) && !same_kind
            })
        };
        let any_write_later = later.iter().any(|l| l.writes_all || !l.writes.is_empty());
        (c.reads_all && any_write_later && !earlier.iter().any(|e| e.resets_all))
            || c.reads
                .iter()
                .any(|key| written_later(key) && !reset_before(key))
            || c.typed
                .iter()
                .any(|key| rewritten_later(key) && !reset_before(key))
    })
}
