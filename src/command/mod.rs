//! Which commands may be sent again after an attempt that may or may not have executed.
//!
//! When a connection drops or a reply times out after a command was written, nobody knows
//! whether the server executed it. Sending it again is only safe when executing it twice is,
//! for the caller, the same as executing it once: the data ends up the same, and the reply to
//! the second attempt does not tell the caller something false about the first.
//!
//! Every command falls into one of three classes, see [`Idempotency`]. [`classify`] uses the
//! built-in table of the Redis 7.0/7.2 command set; an [`IdempotencyTable`] adds overrides for
//! the commands you know better (your scripts, module commands, replies you act on).
//!
//! Where the line on replies is drawn:
//!
//! * a reply that hands back the *previous value* (`GETSET`, `SET ... GET`, `SETBIT`,
//!   `BITFIELD ... SET`) or exists to say whether a conditional write *won* (`SETNX`, `HSETNX`,
//!   `MSETNX`, `SET ... NX`, `SMOVE`) misleads after a retry, so those commands are
//!   [`Idempotency::NonIdempotent`];
//! * a *count* of added or removed elements (`SADD`, `HSET`, `ZADD`, `DEL`, `XACK`, ...) is
//!   treated as informational: the retry reports 0 for the work the first attempt did, but the
//!   data is right. If your code acts on such a count (for example `SADD` as a "first time
//!   seen" check), override the command to `NonIdempotent`.
//!
//! "Idempotent" means "twice in a row equals once". It does not protect against other clients
//! writing between the two attempts: a retried `SET` can overwrite a newer value that someone
//! else wrote in between. Commands the table does not know — module commands, commands of newer
//! Redis versions — are `NonIdempotent` until you override them.

mod access;

use std::collections::HashMap;
use std::fmt;

use redis::{Arg, Cmd, Pipeline};

use crate::Error;

use Idempotency::{Idempotent, NonIdempotent, ReadOnly};

/// How safe it is to send a command again when an earlier attempt may have executed.
///
/// The variants are ordered from the safest to the least safe, so the class of a group of
/// commands is the [`Ord::max`] of their classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Idempotency {
    /// Changes no data (`GET`, `HGETALL`, `CLUSTER NODES`); repeating it is always safe.
    ReadOnly,
    /// Changes data, but a second execution leaves the same data and an honest reply
    /// (`SET` without conditions, `DEL`, `SADD`, `HSET`).
    Idempotent,
    /// A second execution changes the data again or answers misleadingly (`INCR`, `LPUSH`,
    /// `SETNX`, `EVAL`), or nothing is known about the command. Never retried blindly.
    NonIdempotent,
}

impl Idempotency {
    /// Whether the command may be sent again after an attempt that may have executed.
    pub fn is_retry_safe(self) -> bool {
        matches!(self, ReadOnly | Idempotent)
    }

    /// A short, stable, lower-case name, suitable as a metric label or tracing field.
    pub fn as_str(self) -> &'static str {
        match self {
            ReadOnly => "read_only",
            Idempotent => "idempotent",
            NonIdempotent => "non_idempotent",
        }
    }
}

impl fmt::Display for Idempotency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Classifies a command with the built-in table (no overrides).
///
/// The command name and subcommand are matched case-insensitively; commands whose safety
/// depends on their options (`SET`, `GETEX`, `ZADD`, `COPY`, `RESTORE`, `SORT`, `XREAD`,
/// `FUNCTION LOAD`, ...) are judged by their arguments. Unknown commands, unknown subcommands
/// and an empty command are [`Idempotency::NonIdempotent`]. Does not allocate.
pub fn classify(cmd: &Cmd) -> Idempotency {
    let mut args = cmd.args_iter();
    let Some(Arg::Simple(name)) = args.next() else {
        return NonIdempotent;
    };
    let sub = match args.next() {
        Some(Arg::Simple(sub)) => Some(sub),
        _ => None,
    };
    find(COMMANDS, name).map_or(NonIdempotent, |rule| rule.apply(sub, cmd))
}

/// The command name of `cmd` (its first argument), upper-cased, if it has one.
///
/// Meant for tracing and metrics; bytes that are not UTF-8 are replaced.
pub fn command_name(cmd: &Cmd) -> Option<String> {
    match cmd.args_iter().next()? {
        Arg::Simple(name) if !name.is_empty() => {
            Some(String::from_utf8_lossy(name).to_ascii_uppercase())
        }
        _ => None,
    }
}

/// Writes the command's name, and its first argument after a space, upper-cased, into `buf`
/// (`"CONFIG SET"`, `"GET K"`) and returns the name's length; `None` for an empty or non-UTF-8
/// name.
fn name_and_sub(cmd: &Cmd, buf: &mut String) -> Option<usize> {
    let mut args = cmd.args_iter();
    let Some(Arg::Simple(name)) = args.next() else {
        return None;
    };
    buf.clear();
    buf.push_str(std::str::from_utf8(name).ok()?);
    let name_len = buf.len();
    if let Some(Arg::Simple(sub)) = args.next() {
        if let Ok(sub) = std::str::from_utf8(sub) {
            buf.push(' ');
            buf.push_str(sub);
        }
    }
    buf.make_ascii_uppercase();
    Some(name_len)
}

/// Commands the redis crate's cluster client sends to every node or every master (its
/// `AllNodes` / `AllPrimaries` routing), by name or `NAME SUBCOMMAND`.
const FANNED_OUT: &[&str] = &[
    "ACL DELUSER",
    "ACL SAVE",
    "ACL SETUSER",
    "CLIENT SETINFO",
    "CLIENT SETNAME",
    "CONFIG RESETSTAT",
    "CONFIG REWRITE",
    "CONFIG SET",
    "DBSIZE",
    "DEBUG",
    "FLUSHALL",
    "FLUSHDB",
    "FUNCTION DELETE",
    "FUNCTION FLUSH",
    "FUNCTION KILL",
    "FUNCTION LOAD",
    "FUNCTION RESTORE",
    "FUNCTION STATS",
    "INFO",
    "KEYS",
    "LATENCY RESET",
    "MEMORY PURGE",
    "PING",
    "RANDOMKEY",
    "SCRIPT EXISTS",
    "SCRIPT FLUSH",
    "SCRIPT KILL",
    "SCRIPT LOAD",
    "SLOWLOG RESET",
    "UNWATCH",
];

/// Multi-key commands the cluster client splits by slot when their keys span several.
const SPLIT_BY_SLOT: &[&str] = &[
    "DEL",
    "EXISTS",
    "JSON.MGET",
    "JSON.MSET",
    "MGET",
    "MSET",
    "TOUCH",
    "UNLINK",
];

/// Commands that run code or move keys one by one: an error reply can come after some of their
/// work was done.
const RUN_IN_STEPS: &[&str] = &[
    "EVAL",
    "EVALSHA",
    "EVALSHA_RO",
    "EVAL_RO",
    "FCALL",
    "FCALL_RO",
    "MIGRATE",
];

/// Whether the cluster client sends `cmd` to several nodes, so that one node's error says
/// nothing about the others.
pub(crate) fn fans_out(cmd: &Cmd) -> bool {
    let mut buf = String::new();
    let Some(name_len) = name_and_sub(cmd, &mut buf) else {
        return false;
    };
    let name = &buf[..name_len];
    if FANNED_OUT.contains(&buf.as_str()) || FANNED_OUT.contains(&name) {
        return true;
    }
    if !SPLIT_BY_SLOT.contains(&name) {
        return false;
    }
    // MSET's keys are every other argument, JSON.MSET's every third, JSON.MGET's all but the
    // last (a path); the others' are all of them.
    let step = match name {
        "MSET" => 2,
        "JSON.MSET" => 3,
        _ => 1,
    };
    let args = cmd.args_iter().count().saturating_sub(1);
    let take = if name == "JSON.MGET" {
        args.saturating_sub(1)
    } else {
        args
    };
    let mut keys = cmd
        .args_iter()
        .skip(1)
        .take(take)
        .step_by(step)
        .filter_map(|arg| match arg {
            Arg::Simple(key) => Some(key_slot(key)),
            _ => None,
        });
    match keys.next() {
        Some(first) => keys.any(|other| other != first),
        None => false,
    }
}

/// Whether an error reply to `cmd` can come after part of its work was done (a script, a
/// function, a multi-key `MIGRATE`).
pub(crate) fn runs_in_steps(cmd: &Cmd) -> bool {
    let mut buf = String::new();
    name_and_sub(cmd, &mut buf).is_some_and(|n| RUN_IN_STEPS.contains(&&buf[..n]))
}

/// Whether `cmd` may have taken effect, given that a server answered it with `error`.
///
/// A Redis command is atomic: a server that answers it with an error reply — `WRONGTYPE`, a
/// wrong arity, `CROSSSLOT`, `NOSCRIPT`, `CLUSTERDOWN` — did not run it ([`Sent::No`]), unless it
/// runs in steps (a script or function can fail after its first writes: an error it raised
/// while running is [`Sent::Maybe`]; a refusal before it ran — `MOVED`, `ASK`, `TRYAGAIN`,
/// `CLUSTERDOWN`, `LOADING`, `MASTERDOWN`, `READONLY`, `NOSCRIPT` — is not) or a cluster
/// client (`cluster`) sent it to several nodes (one node's error does not say what the others
/// did: [`Sent::Maybe`]). Errors that are not server replies keep their own `Sent`.
pub(crate) fn settle_sent(cmd: &Cmd, error: crate::Error, cluster: bool) -> crate::Error {
    use crate::Sent;
    let Some(redis) = error.redis_error() else {
        return error;
    };
    if !matches!(
        redis.kind(),
        redis::ErrorKind::Server(_) | redis::ErrorKind::Extension
    ) {
        return error;
    }
    let raised_while_running = matches!(
        error.kind(),
        crate::ErrorKind::Command | crate::ErrorKind::Conversion
    ) && redis.code() != Some("NOSCRIPT");
    let sent = if (cluster && fans_out(cmd)) || (raised_while_running && runs_in_steps(cmd)) {
        Sent::Maybe
    } else {
        Sent::No
    };
    error.with_sent(sent)
}

/// Why a command cannot go through a connection every caller shares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    /// `WATCH`: guards the transaction of the connection it is sent on.
    Watch,
    /// `MULTI` / `EXEC` / `DISCARD` sent one by one.
    Transaction,
    /// Puts the connection in a mode in which it serves nothing else.
    Subscribe,
    /// Changes a setting of the connection for every caller.
    ConnectionState,
    /// `WAIT`, `WAITAOF`: waits for the writes of the connection it is sent on — every
    /// caller's — and blocks it meanwhile.
    WaitsForWrites,
}

impl Refusal {
    fn error(self, name: &str) -> crate::Error {
        let advice = match self {
            Refusal::Watch => {
                "WATCH guards a transaction on the connection it is sent on, and this client's \
                 connections are shared by every caller, whose commands would run inside the \
                 watch: use a dedicated connection for optimistic transactions, or make the \
                 read-modify-write a script or function (EVAL, FCALL)"
            }
            Refusal::Transaction => {
                "MULTI, EXEC and DISCARD sent one by one would take in other callers' commands \
                 on the shared connection: send the transaction as one atomic pipeline \
                 (redis::pipe().atomic())"
            }
            Refusal::Subscribe => {
                "it turns the connection into one that serves nothing else: for pub/sub use \
                 Client::subscriber(), which also re-establishes subscriptions across \
                 failovers; for MONITOR a connection of its own"
            }
            Refusal::ConnectionState => {
                "it changes the state of a connection every caller shares: configure the client \
                 instead (credentials, credentials_provider, read_from_replicas)"
            }
            Refusal::WaitsForWrites => {
                "it waits for the writes of the connection it is sent on, which every caller \
                 shares, and blocks that connection meanwhile: send it on a connection of your \
                 own after your writes"
            }
        };
        crate::Error::new(
            crate::ErrorKind::Unsupported,
            format!("{name} cannot be sent through this client: {advice}"),
        )
    }
}

/// Commands refused on a shared connection, sorted (checked at compile time).
static REFUSED: &[(&str, Refusal)] = &[
    ("AUTH", Refusal::ConnectionState),
    ("DISCARD", Refusal::Transaction),
    ("EXEC", Refusal::Transaction),
    ("HELLO", Refusal::ConnectionState),
    ("MONITOR", Refusal::Subscribe),
    ("MULTI", Refusal::Transaction),
    ("PSUBSCRIBE", Refusal::Subscribe),
    ("PUNSUBSCRIBE", Refusal::Subscribe),
    ("QUIT", Refusal::ConnectionState),
    ("READONLY", Refusal::ConnectionState),
    ("READWRITE", Refusal::ConnectionState),
    ("RESET", Refusal::ConnectionState),
    ("SELECT", Refusal::ConnectionState),
    ("SSUBSCRIBE", Refusal::Subscribe),
    ("SUBSCRIBE", Refusal::Subscribe),
    ("SUNSUBSCRIBE", Refusal::Subscribe),
    ("UNSUBSCRIBE", Refusal::Subscribe),
    ("WAIT", Refusal::WaitsForWrites),
    ("WAITAOF", Refusal::WaitsForWrites),
    ("WATCH", Refusal::Watch),
];

const _: () = assert!(sorted_names(REFUSED), "REFUSED must be sorted");
/// The lengths, in bytes, of the names `refusal_of` looks up: every refused name's and
/// `CLIENT`'s (checked below), so a name of another length is not refused.
const REFUSED_LENGTHS: std::ops::RangeInclusive<usize> = 4..=12;
const _: () = assert!(
    names_within(REFUSED, *REFUSED_LENGTHS.start(), *REFUSED_LENGTHS.end())
        && b"CLIENT".len() >= *REFUSED_LENGTHS.start()
        && b"CLIENT".len() <= *REFUSED_LENGTHS.end(),
    "refusal_of skips names of a length outside REFUSED_LENGTHS"
);

const fn names_within<T>(table: &[(&str, T)], shortest: usize, longest: usize) -> bool {
    let mut i = 0;
    while i < table.len() {
        let len = table[i].0.len();
        if len < shortest || len > longest {
            return false;
        }
        i += 1;
    }
    true
}

const fn sorted_names<T>(table: &[(&str, T)]) -> bool {
    let mut i = 1;
    while i < table.len() {
        if !ascending(table[i - 1].0.as_bytes(), table[i].0.as_bytes()) {
            return false;
        }
        i += 1;
    }
    true
}

/// The refusal of `cmd`, if it cannot go through a shared connection, and its name.
fn refusal_of(cmd: &Cmd) -> Option<(Refusal, &[u8])> {
    let mut args = cmd.args_iter();
    let Some(Arg::Simple(name)) = args.next() else {
        return None;
    };
    // Most commands (`GET`, `SET`, `DEL`…) are told apart by their length alone.
    if !REFUSED_LENGTHS.contains(&name.len()) {
        return None;
    }
    if let Some(refusal) = find(REFUSED, name) {
        return Some((refusal, name));
    }
    let sub = match args.next() {
        Some(Arg::Simple(sub)) => sub,
        _ => return None,
    };
    (name.eq_ignore_ascii_case(b"CLIENT") && sub.eq_ignore_ascii_case(b"REPLY"))
        .then_some((Refusal::ConnectionState, name))
}

/// The error of a command that cannot go through a connection every caller shares (`WATCH`,
/// `MULTI` alone, `SUBSCRIBE`, `SELECT`, ...), saying what to use instead.
pub(crate) fn shared_connection_refusal(cmd: &Cmd) -> Option<crate::Error> {
    let (refusal, name) = refusal_of(cmd)?;
    Some(refusal.error(&String::from_utf8_lossy(name).to_ascii_uppercase()))
}

/// The same for a pipeline, which is written to the connection in one piece: a `MULTI` with its
/// `EXEC` (or `DISCARD`) in the same pipeline is fine, nothing else of the list above.
pub(crate) fn pipeline_refusal(pipeline: &Pipeline) -> Option<crate::Error> {
    let mut open = false;
    for cmd in pipeline.cmd_iter() {
        let Some((refusal, name)) = refusal_of(cmd) else {
            continue;
        };
        let name = String::from_utf8_lossy(name).to_ascii_uppercase();
        match (refusal, name.as_str()) {
            (Refusal::Transaction, "MULTI") if !open => open = true,
            (Refusal::Transaction, "EXEC" | "DISCARD") if open => open = false,
            _ => return Some(refusal.error(&name)),
        }
    }
    open.then(|| Refusal::Transaction.error("a pipeline's MULTI without its EXEC or DISCARD"))
}

/// The hash slot of `key` in a Redis Cluster: CRC16 (XMODEM) of the key — of its hash tag,
/// the part between the first `{` and the next `}`, when that part is not empty — modulo 16384.
///
/// ```
/// use tower_redis_cluster::command::key_slot;
///
/// assert_eq!(key_slot(b"foo"), 12182);
/// assert_eq!(key_slot(b"{user:1}:cart"), key_slot(b"user:1"));
/// ```
pub fn key_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|b| *b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|b| *b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    let mut crc: u16 = 0;
    for &byte in tagged.unwrap_or(key) {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// How long a blocking command may block on the server ([`block_time`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Block {
    /// At most this long (the command's own timeout).
    For(std::time::Duration),
    /// Until something arrives (a timeout of 0).
    Forever,
}

fn arg_text(arg: Arg<&[u8]>) -> Option<&str> {
    match arg {
        Arg::Simple(a) => std::str::from_utf8(a).ok(),
        _ => None,
    }
}

/// A timeout in seconds as the list and sorted-set pops take it (`"1.5"`); 0 is for ever.
fn seconds(text: Option<&str>) -> Option<Block> {
    let secs: f64 = text?
        .parse()
        .ok()
        .filter(|s: &f64| s.is_finite() && *s >= 0.0)?;
    Some(if secs == 0.0 {
        Block::Forever
    } else {
        Block::For(std::time::Duration::try_from_secs_f64(secs).ok()?)
    })
}

/// Whether `cmd` blocks on the server, and for how long: the list and sorted-set pops
/// (`BLPOP`, `BRPOP`, `BLMOVE`, `BRPOPLPUSH`, `BLMPOP`, `BZPOPMIN`, `BZPOPMAX`, `BZMPOP`) and
/// `XREAD` / `XREADGROUP` with `BLOCK`. Also returns the argument index of the first key, where
/// the command is sent. A malformed timeout is left for the server to refuse.
pub(crate) fn blocking(cmd: &Cmd) -> Option<(Block, usize)> {
    /// How a blocking command gives its timeout: its last argument (seconds), its first
    /// (seconds), or `BLOCK <ms>` before `STREAMS`.
    enum Layout {
        Last,
        First,
        Streams,
    }
    const BLOCKING: &[(&str, Layout)] = &[
        ("BLMOVE", Layout::Last),
        ("BLMPOP", Layout::First),
        ("BLPOP", Layout::Last),
        ("BRPOP", Layout::Last),
        ("BRPOPLPUSH", Layout::Last),
        ("BZMPOP", Layout::First),
        ("BZPOPMAX", Layout::Last),
        ("BZPOPMIN", Layout::Last),
        ("XREAD", Layout::Streams),
        ("XREADGROUP", Layout::Streams),
    ];
    let mut args = cmd.args_iter();
    let Some(Arg::Simple(name)) = args.next() else {
        return None;
    };
    // Most commands are not blocking: a look at the first letter spares the rest.
    if !matches!(name.first(), Some(b'B' | b'b' | b'X' | b'x')) {
        return None;
    }
    let (_, layout) = BLOCKING
        .iter()
        .find(|(n, _)| n.as_bytes().eq_ignore_ascii_case(name))?;
    match layout {
        Layout::Last => Some((seconds(cmd.args_iter().last().and_then(arg_text))?, 1)),
        Layout::First => Some((seconds(cmd.args_iter().nth(1).and_then(arg_text))?, 3)),
        Layout::Streams => {
            let is = |arg: Arg<&[u8]>, word: &str| {
                arg_text(arg).is_some_and(|a| a.eq_ignore_ascii_case(word))
            };
            let streams = cmd.args_iter().position(|a| is(a, "STREAMS"))?;
            let block = cmd.args_iter().take(streams).position(|a| is(a, "BLOCK"))?;
            let ms: u64 = cmd
                .args_iter()
                .nth(block + 1)
                .and_then(arg_text)?
                .parse()
                .ok()?;
            let block = if ms == 0 {
                Block::Forever
            } else {
                Block::For(std::time::Duration::from_millis(ms))
            };
            Some((block, streams + 1))
        }
    }
}

/// Whether `cmd` blocks on the server, and for how long — the list and sorted-set pops
/// (`BLPOP`, `BRPOP`, `BLMOVE`, `BRPOPLPUSH`, `BLMPOP`, `BZPOPMIN`, `BZPOPMAX`, `BZMPOP`) and
/// `XREAD` / `XREADGROUP` with `BLOCK`; `None` for every other command.
///
/// The [`Client`](crate::Client) sends such a command on a connection of its own (never the
/// shared one: it would hold up every other caller's commands to that node while it blocks)
/// and extends the call's deadline by this time.
///
/// ```
/// use std::time::Duration;
/// use tower_redis_cluster::command::{block_time, Block};
///
/// assert_eq!(block_time(redis::cmd("BLPOP").arg("jobs").arg(5)), Some(Block::For(Duration::from_secs(5))));
/// assert_eq!(block_time(redis::cmd("BLPOP").arg("jobs").arg(0)), Some(Block::Forever));
/// assert_eq!(block_time(redis::cmd("LPOP").arg("jobs")), None);
/// ```
pub fn block_time(cmd: &Cmd) -> Option<Block> {
    blocking(cmd).map(|(block, _)| block)
}

/// The time a blocking request adds to a call's `deadline`, or the error of one the deadline
/// cannot honour (a block for ever, under a deadline).
pub(crate) fn block_allowance(
    block: Option<Block>,
    deadline: Option<std::time::Duration>,
) -> Result<std::time::Duration, crate::Error> {
    match (block, deadline) {
        (None, _) => Ok(std::time::Duration::ZERO),
        (Some(Block::For(d)), _) => Ok(d),
        (Some(Block::Forever), None) => Ok(std::time::Duration::ZERO),
        (Some(Block::Forever), Some(deadline)) => Err(crate::Error::new(
            crate::ErrorKind::Unsupported,
            format!(
                "a blocking command with timeout 0 blocks for ever, which the call's deadline \
                 ({deadline:?}) cannot honour: give it a timeout (the deadline is extended by \
                 it), or use a client without a deadline"
            ),
        )),
    }
}

/// [`settle_sent`] for a pipeline whose every command the server answered with an error reply:
/// none of them ran — unless one runs in steps (a script). `error` keeps its `Sent` otherwise
/// (a command that succeeded, or one whose outcome is unknown, may have taken effect).
pub(crate) fn settle_pipeline_sent(pipeline: &Pipeline, error: crate::Error) -> crate::Error {
    let all_refused = error
        .redis_error()
        .and_then(|e| e.clone().into_server_errors())
        .is_some_and(|items| items.len() >= pipeline.len());
    if all_refused && error.sent() == crate::Sent::Maybe && !pipeline.cmd_iter().any(runs_in_steps)
    {
        error.with_sent(crate::Sent::No)
    } else {
        error
    }
}

/// The built-in table plus per-command overrides a user sets.
///
/// An override for `"NAME SUBCOMMAND"` beats one for `"NAME"`, which beats the built-in table.
/// A two-word override matches when the command's first two arguments are those words, so it
/// is meant for container commands (`CONFIG`, `CLIENT`, `CLUSTER`, module commands with
/// subcommands); options further along cannot be addressed.
///
/// ```
/// use tower_redis_cluster::{IdempotencyTable, Idempotency};
///
/// let table = IdempotencyTable::new()
///     // Our only script overwrites one key with a fixed value.
///     .with_override("EVALSHA", Idempotency::Idempotent)?
///     // We de-duplicate events on SADD's reply: a retry's "0 added" would drop an event.
///     .with_override("sadd", Idempotency::NonIdempotent)?
///     // Only CONFIG SET is affected; CONFIG GET keeps its built-in class.
///     .with_override("config set", Idempotency::NonIdempotent)?;
///
/// let mut evalsha = redis::cmd("EVALSHA");
/// evalsha.arg("a42059b356c875f0717db19a51f6aaca9ae659ea").arg(0);
/// assert_eq!(table.classify(&evalsha), Idempotency::Idempotent);
/// assert!(!table.classify(redis::cmd("SADD").arg("seen").arg("event-1")).is_retry_safe());
/// let mut config_set = redis::cmd("CONFIG");
/// config_set.arg("SET").arg("maxmemory").arg("1gb");
/// assert!(!table.classify(&config_set).is_retry_safe());
/// assert_eq!(
///     table.classify(redis::cmd("CONFIG").arg("GET").arg("maxmemory")),
///     Idempotency::ReadOnly
/// );
/// // Everything else comes from the built-in table.
/// assert_eq!(table.classify(redis::cmd("INCR").arg("hits")), Idempotency::NonIdempotent);
///
/// let mut pipe = redis::pipe();
/// pipe.cmd("GET").arg("a").cmd("EVALSHA").arg("a42059b356c875f0717db19a51f6aaca9ae659ea").arg(0);
/// assert_eq!(table.classify_pipeline(&pipe), Idempotency::Idempotent);
/// pipe.cmd("INCR").arg("hits");
/// assert_eq!(table.classify_pipeline(&pipe), Idempotency::NonIdempotent);
/// # Ok::<(), tower_redis_cluster::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct IdempotencyTable {
    /// Keyed by `"NAME"` or `"NAME SUBCOMMAND"`, upper-case, single space.
    overrides: HashMap<String, Idempotency>,
}

impl IdempotencyTable {
    /// The built-in table without overrides.
    pub fn new() -> Self {
        Self::default()
    }

    /// Overrides one command (case-insensitive); `"CONFIG SET"` style two-word names address a
    /// subcommand. A later override of the same name replaces an earlier one.
    ///
    /// Fails with a [`Config`](crate::ErrorKind::Config) error when `command` is empty or has
    /// more than two words: such an override could never match.
    pub fn with_override(
        mut self,
        command: impl AsRef<str>,
        idempotency: Idempotency,
    ) -> Result<Self, Error> {
        self.set_override(command, idempotency)?;
        Ok(self)
    }

    /// Overrides one command in place; see [`IdempotencyTable::with_override`].
    pub fn set_override(
        &mut self,
        command: impl AsRef<str>,
        idempotency: Idempotency,
    ) -> Result<(), Error> {
        let key = override_key(command.as_ref())?;
        self.overrides.insert(key, idempotency);
        Ok(())
    }

    /// Classifies a command: its subcommand override, its command override, or the built-in
    /// table, in that order.
    pub fn classify(&self, cmd: &Cmd) -> Idempotency {
        if !self.overrides.is_empty() {
            if let Some(found) = self.find_override(cmd) {
                return found;
            }
        }
        classify(cmd)
    }

    /// How safe a pipeline is to send again: at best as safe as its least safe command, and
    /// [`Idempotency::NonIdempotent`] when one of its commands reads a key that a later command
    /// of the pipeline writes, or writes a key from what it holds (`HSET`, `ZADD`, `LSET`…)
    /// that a later command writes otherwise than as the same kind of value — unless a command
    /// before it sets that key whatever it held and cannot fail (`SET`, `MSET`, `DEL`,
    /// `FLUSHALL`). The second run would find what the first one left: `MULTI; GET k; DEL k;
    /// EXEC` (a pop) returns nil the second time, `SUNIONSTORE d a b; DEL a` stores another
    /// union, and `ZADD b 1 m; SET b m` fails with `WRONGTYPE`. An empty pipeline is
    /// [`Idempotency::ReadOnly`].
    ///
    /// A MULTI/EXEC (atomic) pipeline is classified the same way. (The `redis` crate adds the
    /// `MULTI`/`EXEC` around an atomic pipeline when it sends it; a `MULTI` the caller put into
    /// a pipeline by hand is `NonIdempotent` like any other explicit `MULTI`.)
    pub fn classify_pipeline(&self, pipeline: &Pipeline) -> Idempotency {
        let mut worst = ReadOnly;
        let mut accesses = Vec::with_capacity(pipeline.len());
        for cmd in pipeline.cmd_iter() {
            let class = self.classify(cmd);
            worst = worst.max(class);
            if worst == NonIdempotent {
                return NonIdempotent;
            }
            accesses.push(access::access(cmd, class));
        }
        // Safe commands that are not safe together: a read of a key written later in the
        // same pipeline (see the `access` module).
        if worst == Idempotent && access::read_then_overwritten(&accesses) {
            return NonIdempotent;
        }
        worst
    }

    fn find_override(&self, cmd: &Cmd) -> Option<Idempotency> {
        let mut args = cmd.args_iter();
        let Some(Arg::Simple(name)) = args.next() else {
            return None;
        };
        if let Some(Arg::Simple(sub)) = args.next() {
            if let Some(found) = self.lookup(name, Some(sub)) {
                return Some(found);
            }
        }
        self.lookup(name, None)
    }

    fn lookup(&self, name: &[u8], sub: Option<&[u8]>) -> Option<Idempotency> {
        // Runs for every command once any override exists, so the key is built on the stack;
        // only absurdly long names fall back to the heap.
        let len = name.len() + sub.map_or(0, |sub| sub.len() + 1);
        let mut stack = [0u8; 64];
        let mut heap = Vec::new();
        let key: &mut [u8] = if len <= stack.len() {
            &mut stack[..len]
        } else {
            heap.resize(len, 0);
            &mut heap
        };
        key[..name.len()].copy_from_slice(name);
        if let Some(sub) = sub {
            key[name.len()] = b' ';
            key[name.len() + 1..].copy_from_slice(sub);
        }
        key.make_ascii_uppercase();
        // Override keys come from `&str`, so a name that is not UTF-8 cannot match any of them.
        let key = std::str::from_utf8(key).ok()?;
        self.overrides.get(key).copied()
    }
}

fn override_key(command: &str) -> Result<String, Error> {
    let mut words = command.split_ascii_whitespace();
    let (Some(name), sub, None) = (words.next(), words.next(), words.next()) else {
        return Err(Error::config(format!(
            "an idempotency override names one command or one `COMMAND SUBCOMMAND` pair, got {:?}",
            command.chars().take(100).collect::<String>()
        )));
    };
    let mut key = name.to_ascii_uppercase();
    if let Some(sub) = sub {
        key.push(' ');
        key.push_str(&sub.to_ascii_uppercase());
    }
    Ok(key)
}

/// How the table decides a command.
#[derive(Debug, Clone, Copy)]
enum Rule {
    /// Always this class.
    Is(Idempotency),
    /// Decided by the command's arguments.
    Args(fn(&Cmd) -> Idempotency),
    /// Decided by the subcommand (second argument); unknown or missing ones are
    /// `NonIdempotent`. Sorted like the top-level table; entries are never `Sub` themselves.
    Sub(&'static [(&'static str, Rule)]),
}

impl Rule {
    fn apply(self, sub: Option<&[u8]>, cmd: &Cmd) -> Idempotency {
        match self {
            Rule::Is(class) => class,
            Rule::Args(decide) => decide(cmd),
            Rule::Sub(subs) => sub
                .and_then(|sub| find(subs, sub))
                .map_or(NonIdempotent, |rule| rule.apply(None, cmd)),
        }
    }
}

/// Binary search comparing the upper-cased bytes of `word` on the fly, so `classify` needs
/// neither an allocation nor a length limit.
fn find<T: Copy>(table: &[(&'static str, T)], word: &[u8]) -> Option<T> {
    table
        .binary_search_by(|(name, _)| {
            name.bytes()
                .cmp(word.iter().map(|byte| byte.to_ascii_uppercase()))
        })
        .ok()
        .map(|index| table[index].1)
}

/// Checked at compile time: the binary search needs strictly ascending, upper-case names.
const fn well_formed(table: &[(&str, Rule)], nested: bool) -> bool {
    let mut i = 0;
    while i < table.len() {
        let name = table[i].0.as_bytes();
        if name.is_empty() {
            return false;
        }
        let mut j = 0;
        while j < name.len() {
            if name[j].is_ascii_lowercase() {
                return false;
            }
            j += 1;
        }
        if i > 0 && !ascending(table[i - 1].0.as_bytes(), name) {
            return false;
        }
        if let Rule::Sub(subs) = table[i].1 {
            if nested || !well_formed(subs, true) {
                return false;
            }
        }
        i += 1;
    }
    true
}

const fn ascending(a: &[u8], b: &[u8]) -> bool {
    let mut i = 0;
    while i < a.len() && i < b.len() {
        if a[i] != b[i] {
            return a[i] < b[i];
        }
        i += 1;
    }
    a.len() < b.len()
}

const _: () = assert!(
    well_formed(COMMANDS, false),
    "command tables must be upper-case, strictly sorted, one level of subcommands"
);

const READ: Rule = Rule::Is(ReadOnly);
const IDEM: Rule = Rule::Is(Idempotent);
const NON_IDEM: Rule = Rule::Is(NonIdempotent);

/// The Redis 7.0/7.2 command set, sorted by name (byte order: `-` < `A`–`Z` < `_`).
///
/// Commands that are absent are `NonIdempotent` too; the unsafe ones are listed anyway so the
/// table documents a decision rather than an omission.
static COMMANDS: &[(&str, Rule)] = &[
    ("ACL", Rule::Sub(ACL)),
    ("APPEND", NON_IDEM),
    // A one-shot flag for the next command; setting it twice changes nothing.
    ("ASKING", IDEM),
    ("AUTH", IDEM),
    ("BGREWRITEAOF", NON_IDEM),
    // The retry fails with "Background save already in progress".
    ("BGSAVE", NON_IDEM),
    ("BITCOUNT", READ),
    ("BITFIELD", Rule::Args(bitfield)),
    ("BITFIELD_RO", READ),
    ("BITOP", Rule::Args(bitop)),
    ("BITPOS", READ),
    ("BLMOVE", NON_IDEM),
    ("BLMPOP", NON_IDEM),
    ("BLPOP", NON_IDEM),
    ("BRPOP", NON_IDEM),
    ("BRPOPLPUSH", NON_IDEM),
    ("BZMPOP", NON_IDEM),
    ("BZPOPMAX", NON_IDEM),
    ("BZPOPMIN", NON_IDEM),
    ("CLIENT", Rule::Sub(CLIENT)),
    ("CLUSTER", Rule::Sub(CLUSTER)),
    // Every subcommand (COUNT, DOCS, GETKEYS, INFO, LIST, ...) only describes the server.
    ("COMMAND", READ),
    ("CONFIG", Rule::Sub(CONFIG)),
    ("COPY", Rule::Args(copy)),
    ("DBSIZE", READ),
    ("DEBUG", NON_IDEM),
    ("DECR", NON_IDEM),
    ("DECRBY", NON_IDEM),
    ("DEL", IDEM),
    ("DISCARD", NON_IDEM),
    ("DUMP", READ),
    ("ECHO", READ),
    // What a script does is unknown; override the ones you know.
    ("EVAL", NON_IDEM),
    ("EVALSHA", NON_IDEM),
    ("EVALSHA_RO", READ),
    ("EVAL_RO", READ),
    ("EXEC", NON_IDEM),
    ("EXISTS", READ),
    // Relative: the retry pushes the deadline back by the time between the attempts.
    ("EXPIRE", NON_IDEM),
    ("EXPIREAT", Rule::Args(expire_at)),
    ("EXPIRETIME", READ),
    ("FAILOVER", NON_IDEM),
    ("FCALL", NON_IDEM),
    ("FCALL_RO", READ),
    // The caller asked for an empty database; the retry delivers exactly that.
    ("FLUSHALL", IDEM),
    ("FLUSHDB", IDEM),
    ("FUNCTION", Rule::Sub(FUNCTION)),
    // With NX/XX/CH the state still converges and the reply is a count, as with plain GEOADD.
    ("GEOADD", IDEM),
    ("GEODIST", READ),
    ("GEOHASH", READ),
    ("GEOPOS", READ),
    ("GEORADIUS", Rule::Args(georadius)),
    ("GEORADIUSBYMEMBER", Rule::Args(georadius_by_member)),
    ("GEORADIUSBYMEMBER_RO", READ),
    ("GEORADIUS_RO", READ),
    ("GEOSEARCH", READ),
    ("GEOSEARCHSTORE", Rule::Args(geosearchstore)),
    ("GET", READ),
    ("GETBIT", READ),
    // The retry finds the key gone and replies nil: the value is lost to the caller.
    ("GETDEL", NON_IDEM),
    ("GETEX", Rule::Args(getex)),
    ("GETRANGE", READ),
    // The data repeats, but the retry replies with our own new value instead of the old one.
    ("GETSET", NON_IDEM),
    ("HDEL", IDEM),
    ("HELLO", IDEM),
    ("HEXISTS", READ),
    ("HGET", READ),
    ("HGETALL", READ),
    ("HINCRBY", NON_IDEM),
    ("HINCRBYFLOAT", NON_IDEM),
    ("HKEYS", READ),
    ("HLEN", READ),
    ("HMGET", READ),
    ("HMSET", IDEM),
    ("HRANDFIELD", READ),
    ("HSCAN", READ),
    ("HSET", IDEM),
    // The retry replies 0, "someone else set it", about our own write.
    ("HSETNX", NON_IDEM),
    ("HSTRLEN", READ),
    ("HVALS", READ),
    ("INCR", NON_IDEM),
    ("INCRBY", NON_IDEM),
    ("INCRBYFLOAT", NON_IDEM),
    ("INFO", READ),
    ("KEYS", READ),
    ("LASTSAVE", READ),
    ("LATENCY", Rule::Sub(LATENCY)),
    ("LCS", READ),
    ("LINDEX", READ),
    ("LINSERT", NON_IDEM),
    ("LLEN", READ),
    ("LMOVE", NON_IDEM),
    ("LMPOP", NON_IDEM),
    ("LOLWUT", READ),
    ("LPOP", NON_IDEM),
    ("LPOS", READ),
    ("LPUSH", NON_IDEM),
    ("LPUSHX", NON_IDEM),
    ("LRANGE", READ),
    ("LREM", NON_IDEM),
    ("LSET", IDEM),
    // A positive start trims again on the retry; the harmless `0 -1` forms aren't worth
    // telling apart.
    ("LTRIM", NON_IDEM),
    ("MEMORY", Rule::Sub(MEMORY)),
    ("MGET", READ),
    ("MIGRATE", NON_IDEM),
    ("MODULE", Rule::Sub(MODULE)),
    ("MONITOR", NON_IDEM),
    ("MOVE", NON_IDEM),
    ("MSET", IDEM),
    // The retry replies 0, "some key existed", about our own keys.
    ("MSETNX", NON_IDEM),
    ("MULTI", NON_IDEM),
    ("OBJECT", Rule::Sub(OBJECT)),
    ("PERSIST", IDEM),
    ("PEXPIRE", NON_IDEM),
    ("PEXPIREAT", Rule::Args(expire_at)),
    ("PEXPIRETIME", READ),
    ("PFADD", IDEM),
    // May rewrite the cached cardinality inside the key, but never its contents.
    ("PFCOUNT", READ),
    // A union of registers: merging the same sources again changes nothing, even into a source.
    ("PFMERGE", IDEM),
    ("PING", READ),
    ("PSETEX", IDEM),
    ("PSUBSCRIBE", NON_IDEM),
    ("PSYNC", NON_IDEM),
    ("PTTL", READ),
    // Subscribers would receive the message twice.
    ("PUBLISH", NON_IDEM),
    ("PUBSUB", Rule::Sub(PUBSUB)),
    ("PUNSUBSCRIBE", NON_IDEM),
    // The retry would close the replacement connection.
    ("QUIT", NON_IDEM),
    ("RANDOMKEY", READ),
    ("READONLY", IDEM),
    ("READWRITE", IDEM),
    // The retry fails with "no such key": the first attempt already moved it.
    ("RENAME", NON_IDEM),
    ("RENAMENX", NON_IDEM),
    ("REPLCONF", NON_IDEM),
    ("REPLICAOF", NON_IDEM),
    ("RESET", IDEM),
    ("RESTORE", Rule::Args(restore)),
    ("ROLE", READ),
    ("RPOP", NON_IDEM),
    ("RPOPLPUSH", NON_IDEM),
    ("RPUSH", NON_IDEM),
    ("RPUSHX", NON_IDEM),
    ("SADD", IDEM),
    // Blocks the server for a full dump: not something to repeat on its own.
    ("SAVE", NON_IDEM),
    ("SCAN", READ),
    ("SCARD", READ),
    ("SCRIPT", Rule::Sub(SCRIPT)),
    ("SDIFF", READ),
    ("SDIFFSTORE", Rule::Args(set_store)),
    ("SELECT", IDEM),
    ("SET", Rule::Args(set)),
    // Replies with the previous bit, which after a retry is our own bit (like GETSET).
    ("SETBIT", NON_IDEM),
    ("SETEX", IDEM),
    ("SETNX", NON_IDEM),
    ("SETRANGE", IDEM),
    ("SHUTDOWN", NON_IDEM),
    ("SINTER", READ),
    ("SINTERCARD", READ),
    ("SINTERSTORE", Rule::Args(set_store)),
    ("SISMEMBER", READ),
    ("SLAVEOF", NON_IDEM),
    ("SLOWLOG", Rule::Sub(SLOWLOG)),
    ("SMEMBERS", READ),
    ("SMISMEMBER", READ),
    // The retry replies 0, "not a member of the source", about our own move.
    ("SMOVE", NON_IDEM),
    ("SORT", Rule::Args(sort)),
    ("SORT_RO", READ),
    ("SPOP", NON_IDEM),
    ("SPUBLISH", NON_IDEM),
    ("SRANDMEMBER", READ),
    ("SREM", IDEM),
    ("SSCAN", READ),
    ("SSUBSCRIBE", NON_IDEM),
    ("STRLEN", READ),
    ("SUBSCRIBE", NON_IDEM),
    ("SUBSTR", READ),
    ("SUNION", READ),
    ("SUNIONSTORE", Rule::Args(set_store)),
    ("SUNSUBSCRIBE", NON_IDEM),
    // A second swap undoes the first.
    ("SWAPDB", NON_IDEM),
    ("SYNC", NON_IDEM),
    ("TIME", READ),
    // Only refreshes the access time, which Redis itself counts as a read.
    ("TOUCH", READ),
    ("TTL", READ),
    ("TYPE", READ),
    ("UNLINK", IDEM),
    ("UNSUBSCRIBE", NON_IDEM),
    ("UNWATCH", NON_IDEM),
    // Waits for replication of earlier writes; changes nothing itself.
    ("WAIT", READ),
    ("WAITAOF", READ),
    ("WATCH", NON_IDEM),
    ("XACK", IDEM),
    // The retry appends a second entry, or with an explicit ID is rejected as not increasing.
    ("XADD", NON_IDEM),
    ("XAUTOCLAIM", NON_IDEM),
    ("XCLAIM", NON_IDEM),
    // Deleted IDs can never come back (new IDs only grow), so the retry is a no-op; the reply
    // is a count, like DEL.
    ("XDEL", IDEM),
    ("XGROUP", Rule::Sub(XGROUP)),
    ("XINFO", READ),
    ("XLEN", READ),
    ("XPENDING", READ),
    ("XRANGE", READ),
    ("XREAD", Rule::Args(xread)),
    // Delivers new messages to the group and bumps delivery counters again.
    ("XREADGROUP", NON_IDEM),
    ("XREVRANGE", READ),
    ("XSETID", NON_IDEM),
    // With `~` or LIMIT each run may evict another batch.
    ("XTRIM", NON_IDEM),
    ("ZADD", Rule::Args(zadd)),
    ("ZCARD", READ),
    ("ZCOUNT", READ),
    ("ZDIFF", READ),
    ("ZDIFFSTORE", Rule::Args(zset_store)),
    ("ZINCRBY", NON_IDEM),
    ("ZINTER", READ),
    ("ZINTERCARD", READ),
    ("ZINTERSTORE", Rule::Args(zset_store)),
    ("ZLEXCOUNT", READ),
    ("ZMPOP", NON_IDEM),
    ("ZMSCORE", READ),
    ("ZPOPMAX", NON_IDEM),
    ("ZPOPMIN", NON_IDEM),
    ("ZRANDMEMBER", READ),
    ("ZRANGE", READ),
    ("ZRANGEBYLEX", READ),
    ("ZRANGEBYSCORE", READ),
    ("ZRANGESTORE", Rule::Args(zrangestore)),
    ("ZRANK", READ),
    ("ZREM", IDEM),
    ("ZREMRANGEBYLEX", IDEM),
    // Ranks shift after the first run, so the retry removes other members.
    ("ZREMRANGEBYRANK", NON_IDEM),
    ("ZREMRANGEBYSCORE", IDEM),
    ("ZREVRANGE", READ),
    ("ZREVRANGEBYLEX", READ),
    ("ZREVRANGEBYSCORE", READ),
    ("ZREVRANK", READ),
    ("ZSCAN", READ),
    ("ZSCORE", READ),
    ("ZUNION", READ),
    ("ZUNIONSTORE", Rule::Args(zset_store)),
];

static ACL: &[(&str, Rule)] = &[
    ("CAT", READ),
    // A count of removed users, like DEL.
    ("DELUSER", IDEM),
    ("DRYRUN", READ),
    ("GENPASS", READ),
    ("GETUSER", READ),
    ("HELP", READ),
    ("LIST", READ),
    ("LOAD", IDEM),
    ("LOG", Rule::Args(acl_log)),
    ("SAVE", IDEM),
    // Rules apply on top of the user's current ones and selectors are appended, so a retry can
    // leave a different user.
    ("SETUSER", NON_IDEM),
    ("USERS", READ),
    ("WHOAMI", READ),
];

static CLIENT: &[(&str, Rule)] = &[
    ("CACHING", NON_IDEM),
    ("GETNAME", READ),
    ("GETREDIR", READ),
    ("HELP", READ),
    ("ID", READ),
    ("INFO", READ),
    ("KILL", NON_IDEM),
    ("LIST", READ),
    // Mode switches that change how later commands behave; kept away from automatic retries.
    ("NO-EVICT", NON_IDEM),
    ("NO-TOUCH", NON_IDEM),
    ("PAUSE", NON_IDEM),
    ("REPLY", NON_IDEM),
    ("SETINFO", IDEM),
    ("SETNAME", IDEM),
    ("TRACKING", NON_IDEM),
    ("TRACKINGINFO", READ),
    ("UNBLOCK", NON_IDEM),
    ("UNPAUSE", NON_IDEM),
];

static CLUSTER: &[(&str, Rule)] = &[
    ("ADDSLOTS", NON_IDEM),
    ("ADDSLOTSRANGE", NON_IDEM),
    ("BUMPEPOCH", NON_IDEM),
    ("COUNT-FAILURE-REPORTS", READ),
    ("COUNTKEYSINSLOT", READ),
    ("DELSLOTS", NON_IDEM),
    ("DELSLOTSRANGE", NON_IDEM),
    ("FAILOVER", NON_IDEM),
    ("FLUSHSLOTS", NON_IDEM),
    ("FORGET", NON_IDEM),
    ("GETKEYSINSLOT", READ),
    ("HELP", READ),
    ("INFO", READ),
    ("KEYSLOT", READ),
    ("LINKS", READ),
    ("MEET", NON_IDEM),
    ("MYID", READ),
    ("MYSHARDID", READ),
    ("NODES", READ),
    ("REPLICAS", READ),
    ("REPLICATE", NON_IDEM),
    ("RESET", NON_IDEM),
    ("SAVECONFIG", IDEM),
    ("SET-CONFIG-EPOCH", NON_IDEM),
    ("SETSLOT", NON_IDEM),
    ("SHARDS", READ),
    ("SLAVES", READ),
    ("SLOTS", READ),
];

static CONFIG: &[(&str, Rule)] = &[
    ("GET", READ),
    ("HELP", READ),
    ("RESETSTAT", IDEM),
    ("REWRITE", IDEM),
    ("SET", IDEM),
];

static FUNCTION: &[(&str, Rule)] = &[
    // The retry fails: "Library not found".
    ("DELETE", NON_IDEM),
    ("DUMP", READ),
    // Wipes libraries loaded by others since the first attempt; an admin act, like SCRIPT FLUSH.
    ("FLUSH", NON_IDEM),
    ("HELP", READ),
    ("KILL", NON_IDEM),
    ("LIST", READ),
    ("LOAD", Rule::Args(function_load)),
    ("RESTORE", Rule::Args(function_restore)),
    ("STATS", READ),
];

static LATENCY: &[(&str, Rule)] = &[
    ("DOCTOR", READ),
    ("GRAPH", READ),
    ("HELP", READ),
    ("HISTOGRAM", READ),
    ("HISTORY", READ),
    ("LATEST", READ),
    ("RESET", IDEM),
];

static MEMORY: &[(&str, Rule)] = &[
    ("DOCTOR", READ),
    ("HELP", READ),
    ("MALLOC-STATS", READ),
    ("PURGE", IDEM),
    ("STATS", READ),
    ("USAGE", READ),
];

static MODULE: &[(&str, Rule)] = &[
    ("HELP", READ),
    ("LIST", READ),
    ("LOAD", NON_IDEM),
    ("LOADEX", NON_IDEM),
    ("UNLOAD", NON_IDEM),
];

static OBJECT: &[(&str, Rule)] = &[
    ("ENCODING", READ),
    ("FREQ", READ),
    ("HELP", READ),
    ("IDLETIME", READ),
    ("REFCOUNT", READ),
];

static PUBSUB: &[(&str, Rule)] = &[
    ("CHANNELS", READ),
    ("HELP", READ),
    ("NUMPAT", READ),
    ("NUMSUB", READ),
    ("SHARDCHANNELS", READ),
    ("SHARDNUMSUB", READ),
];

static SCRIPT: &[(&str, Rule)] = &[
    ("DEBUG", NON_IDEM),
    ("EXISTS", READ),
    // Wipes scripts other clients loaded after the first attempt.
    ("FLUSH", NON_IDEM),
    ("HELP", READ),
    // The retry fails with NOTBUSY, or kills a different script.
    ("KILL", NON_IDEM),
    // Scripts are addressed by their SHA1, so loading one twice is a no-op.
    ("LOAD", IDEM),
];

static SLOWLOG: &[(&str, Rule)] = &[
    ("GET", READ),
    ("HELP", READ),
    ("LEN", READ),
    ("RESET", IDEM),
];

static XGROUP: &[(&str, Rule)] = &[
    // The retry fails with BUSYGROUP.
    ("CREATE", NON_IDEM),
    // The retry replies 0, "already existed", about our own consumer.
    ("CREATECONSUMER", NON_IDEM),
    // Counts (pending messages dropped, groups destroyed), like DEL.
    ("DELCONSUMER", IDEM),
    ("DESTROY", IDEM),
    ("HELP", READ),
    ("SETID", Rule::Args(xgroup_setid)),
];

// Argument inspection for the commands whose safety depends on their options. Options are
// matched case-insensitively; an option that isn't understood makes the command
// `NonIdempotent`, since a newer Redis may have given it a meaning we can't judge.

/// The arguments from position `from` on (0 is the command name). A cursor placeholder (or any
/// future non-byte argument) reads as an empty word, which matches no option.
fn words(cmd: &Cmd, from: usize) -> impl Iterator<Item = &[u8]> + '_ {
    cmd.args_iter().skip(from).map(|arg| match arg {
        Arg::Simple(bytes) => bytes,
        _ => &[],
    })
}

fn word_at(cmd: &Cmd, position: usize) -> Option<&[u8]> {
    words(cmd, position).next()
}

fn is(word: &[u8], option: &str) -> bool {
    word.eq_ignore_ascii_case(option.as_bytes())
}

fn is_any(word: &[u8], options: &[&str]) -> bool {
    options.iter().any(|option| is(word, option))
}

/// A store command overwrites its destination from its sources, so a retry writes the same
/// result — unless the destination is one of the sources. Then the retry reads the first
/// attempt's output: weighted or summed scores add up again, XOR and NOT flip back, ranges and
/// limits cut again. Rather than tell apart the few operators that survive this, any such
/// aliasing is `NonIdempotent`. A missing destination (a malformed command) is too.
fn store<'a>(
    destination: Option<&[u8]>,
    mut sources: impl Iterator<Item = &'a [u8]>,
) -> Idempotency {
    match destination {
        Some(destination) if !sources.any(|source| source == destination) => Idempotent,
        _ => NonIdempotent,
    }
}

// SET key value [NX | XX] [GET] [EX s | PX ms | EXAT t | PXAT t | KEEPTTL]
fn set(cmd: &Cmd) -> Idempotency {
    let mut words = words(cmd, 3);
    while let Some(word) = words.next() {
        if is_any(word, &["EX", "PX", "EXAT", "PXAT"]) {
            // A relative TTL restarts on the retry, but together with the value: the caller
            // still gets "this value, fresh for N seconds", unlike a bare EXPIRE.
            words.next();
        } else if !is(word, "KEEPTTL") {
            // NX and XX make the reply a "did it win" signal, GET returns our own value.
            return NonIdempotent;
        }
    }
    Idempotent
}

// GETEX key [EX s | PX ms | EXAT t | PXAT t | PERSIST]
fn getex(cmd: &Cmd) -> Idempotency {
    let mut words = words(cmd, 2);
    while let Some(word) = words.next() {
        if is_any(word, &["EXAT", "PXAT"]) {
            words.next();
        } else if !is(word, "PERSIST") {
            // EX and PX only move a deadline, like EXPIRE.
            return NonIdempotent;
        }
    }
    // Without options GETEX reads, but Redis flags it as a write (replicas refuse it), so it
    // is not `ReadOnly`.
    Idempotent
}

// EXPIREAT key unix-time [NX | XX | GT | LT]
fn expire_at(cmd: &Cmd) -> Idempotency {
    // An absolute deadline repeats exactly. With NX, GT or LT the retry finds that deadline
    // already set and replies 0, "not set"; XX finds it and sets it again.
    if words(cmd, 3).all(|word| is(word, "XX")) {
        Idempotent
    } else {
        NonIdempotent
    }
}

// ZADD key [NX | XX] [GT | LT] [CH] [INCR] score member [score member ...]
fn zadd(cmd: &Cmd) -> Idempotency {
    for word in words(cmd, 2) {
        if is(word, "INCR") {
            return NonIdempotent;
        }
        if !is_any(word, &["NX", "XX", "GT", "LT", "CH"]) {
            // The first score: the options are over. The conditions only decide which members
            // change, and the same members end with the same scores on a retry; the reply stays
            // a count, as without them.
            break;
        }
    }
    Idempotent
}

// COPY source destination [DB destination-db] [REPLACE]
fn copy(cmd: &Cmd) -> Idempotency {
    let mut replace = false;
    let mut words = words(cmd, 3);
    while let Some(word) = words.next() {
        if is(word, "DB") {
            words.next();
        } else if is(word, "REPLACE") {
            replace = true;
        } else {
            return NonIdempotent;
        }
    }
    // Without REPLACE the retry finds the destination taken and replies 0, "not copied".
    if replace {
        Idempotent
    } else {
        NonIdempotent
    }
}

// RESTORE key ttl serialized-value [REPLACE] [ABSTTL] [IDLETIME seconds] [FREQ frequency]
fn restore(cmd: &Cmd) -> Idempotency {
    let mut replace = false;
    let mut words = words(cmd, 4);
    while let Some(word) = words.next() {
        if is(word, "REPLACE") {
            replace = true;
        } else if is_any(word, &["IDLETIME", "FREQ"]) {
            words.next();
        } else if !is(word, "ABSTTL") {
            return NonIdempotent;
        }
    }
    // Without REPLACE the retry fails with BUSYKEY.
    if replace {
        Idempotent
    } else {
        NonIdempotent
    }
}

// SORT key [BY pattern] [LIMIT offset count] [GET pattern ...] [ASC | DESC] [ALPHA]
//     [STORE destination]
fn sort(cmd: &Cmd) -> Idempotency {
    let mut destination = None;
    let mut words = words(cmd, 2);
    while let Some(word) = words.next() {
        if is_any(word, &["BY", "GET"]) {
            words.next();
        } else if is(word, "LIMIT") {
            words.nth(1);
        } else if is(word, "STORE") {
            destination = Some(words.next());
        } else if !is_any(word, &["ASC", "DESC", "ALPHA"]) {
            return NonIdempotent;
        }
    }
    match destination {
        Some(destination) => store(destination, word_at(cmd, 1).into_iter()),
        // Reads only, but Redis flags SORT as a write (that's why SORT_RO exists) and replicas
        // refuse it, so it must not pass for `ReadOnly`.
        None => Idempotent,
    }
}

// GEORADIUS key longitude latitude radius unit [options]
fn georadius(cmd: &Cmd) -> Idempotency {
    geo_radius_options(cmd, 6)
}

// GEORADIUSBYMEMBER key member radius unit [options]
fn georadius_by_member(cmd: &Cmd) -> Idempotency {
    geo_radius_options(cmd, 5)
}

// [WITHCOORD] [WITHDIST] [WITHHASH] [COUNT count [ANY]] [ASC | DESC] [STORE key | STOREDIST key]
fn geo_radius_options(cmd: &Cmd, first_option: usize) -> Idempotency {
    let mut destination = None;
    let mut words = words(cmd, first_option);
    while let Some(word) = words.next() {
        if is(word, "COUNT") {
            words.next();
        } else if is_any(word, &["STORE", "STOREDIST"]) {
            destination = Some(words.next());
        } else if !is_any(
            word,
            &["WITHCOORD", "WITHDIST", "WITHHASH", "ANY", "ASC", "DESC"],
        ) {
            return NonIdempotent;
        }
    }
    match destination {
        Some(destination) => store(destination, word_at(cmd, 1).into_iter()),
        // Write-flagged like SORT; the _RO variants are the `ReadOnly` ones.
        None => Idempotent,
    }
}

// GEOSEARCHSTORE destination source ...
fn geosearchstore(cmd: &Cmd) -> Idempotency {
    store(word_at(cmd, 1), words(cmd, 2).take(1))
}

// ZRANGESTORE destination source ...
fn zrangestore(cmd: &Cmd) -> Idempotency {
    store(word_at(cmd, 1), words(cmd, 2).take(1))
}

// SINTERSTORE / SUNIONSTORE / SDIFFSTORE destination key [key ...]
fn set_store(cmd: &Cmd) -> Idempotency {
    store(word_at(cmd, 1), words(cmd, 2))
}

// ZUNIONSTORE / ZINTERSTORE / ZDIFFSTORE destination numkeys key [key ...] [options]
fn zset_store(cmd: &Cmd) -> Idempotency {
    let numkeys = word_at(cmd, 2)
        .and_then(|word| std::str::from_utf8(word).ok())
        .and_then(|word| word.parse::<usize>().ok());
    match numkeys {
        Some(numkeys) => store(word_at(cmd, 1), words(cmd, 3).take(numkeys)),
        None => NonIdempotent,
    }
}

// BITOP operation destkey key [key ...]
fn bitop(cmd: &Cmd) -> Idempotency {
    match word_at(cmd, 1) {
        Some(operation) if is_any(operation, &["AND", "OR", "XOR", "NOT"]) => {
            store(word_at(cmd, 2), words(cmd, 3))
        }
        _ => NonIdempotent,
    }
}

// BITFIELD key [GET encoding offset | [OVERFLOW WRAP | SAT | FAIL]
//     SET encoding offset value | INCRBY encoding offset increment ...]
fn bitfield(cmd: &Cmd) -> Idempotency {
    let mut words = words(cmd, 2);
    while let Some(word) = words.next() {
        if is(word, "GET") {
            words.nth(1);
        } else if is(word, "OVERFLOW") {
            words.next();
        } else {
            // INCRBY adds again; SET replies with the previous value, which after a retry is
            // our own (like GETSET).
            return NonIdempotent;
        }
    }
    // GET only: reads, but write-flagged like SORT (BITFIELD_RO is the `ReadOnly` one).
    Idempotent
}

// XREAD [COUNT count] [BLOCK milliseconds] STREAMS key [key ...] id [id ...]
fn xread(cmd: &Cmd) -> Idempotency {
    let mut words = words(cmd, 1);
    while let Some(word) = words.next() {
        if is(word, "COUNT") {
            words.next();
        } else if is(word, "STREAMS") {
            return ReadOnly;
        } else {
            // BLOCK: a blocking read is often waiting on `$`, "entries newer than now", which a
            // retry re-anchors, silently skipping what the lost reply carried.
            return NonIdempotent;
        }
    }
    NonIdempotent
}

// XGROUP SETID key group id [ENTRIESREAD entries-read]
fn xgroup_setid(cmd: &Cmd) -> Idempotency {
    match word_at(cmd, 4) {
        // `$` means "the last entry now", which may be a newer entry on the retry.
        Some(id) if id != b"$" => Idempotent,
        _ => NonIdempotent,
    }
}

// ACL LOG [count | RESET]
fn acl_log(cmd: &Cmd) -> Idempotency {
    match word_at(cmd, 2) {
        Some(word) if is(word, "RESET") => Idempotent,
        _ => ReadOnly,
    }
}

// FUNCTION LOAD [REPLACE] function-code
fn function_load(cmd: &Cmd) -> Idempotency {
    let mut words = words(cmd, 2);
    match (words.next(), words.next()) {
        (Some(option), Some(_code)) if is(option, "REPLACE") => Idempotent,
        // The retry fails: "Library already exists".
        _ => NonIdempotent,
    }
}

// FUNCTION RESTORE serialized-value [FLUSH | APPEND | REPLACE]
fn function_restore(cmd: &Cmd) -> Idempotency {
    match word_at(cmd, 3) {
        Some(policy) if is_any(policy, &["FLUSH", "REPLACE"]) => Idempotent,
        // APPEND, the default, fails on the retry because the libraries exist.
        _ => NonIdempotent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd_of(line: &str) -> Cmd {
        let mut cmd = Cmd::new();
        for word in line.split(' ') {
            cmd.arg(word);
        }
        cmd
    }

    fn class(line: &str) -> Idempotency {
        classify(&cmd_of(line))
    }

    #[track_caller]
    fn expect(expected: Idempotency, lines: &[&str]) {
        let wrong: Vec<String> = lines
            .iter()
            .filter(|line| class(line) != expected)
            .map(|line| format!("{line:?} is {:?}", class(line)))
            .collect();
        assert!(wrong.is_empty(), "expected {expected:?}: {wrong:#?}");
    }

    #[test]
    fn strings() {
        expect(
            ReadOnly,
            &[
                "GET k",
                "MGET a b",
                "STRLEN k",
                "GETRANGE k 0 3",
                "SUBSTR k 0 3",
                "LCS a b",
            ],
        );
        expect(
            Idempotent,
            &[
                "SET k v",
                "SET k v EX 10",
                "SET k v PX 100",
                "SET k v EXAT 1700000000",
                "SET k v PXAT 1700000000000",
                "SET k v KEEPTTL",
                "MSET a 1 b 2",
                "SETEX k 10 v",
                "PSETEX k 100 v",
                "SETRANGE k 3 abc",
                "GETEX k",
                "GETEX k PERSIST",
                "GETEX k EXAT 1700000000",
                "GETEX k PXAT 1700000000000",
            ],
        );
        expect(
            NonIdempotent,
            &[
                "INCR k",
                "INCRBY k 2",
                "INCRBYFLOAT k 1.5",
                "DECR k",
                "DECRBY k 2",
                "APPEND k x",
                "GETSET k v",
                "GETDEL k",
                "GETEX k EX 10",
                "GETEX k PX 100",
                "SET k v NX",
                "SET k v XX",
                "SET k v GET",
                "SET k v EX 10 NX",
                "SET k v IFEQ old",
                "SETNX k v",
                "MSETNX a 1 b 2",
            ],
        );
    }

    #[test]
    fn option_words_in_key_or_value_position_are_not_options() {
        // Key "nx", value "get": plain SETs.
        expect(
            Idempotent,
            &["SET nx get", "SET k nx EX 10", "ZADD incr 1 incr"],
        );
        // The value of EX is skipped, not read as an option.
        expect(Idempotent, &["SET k v EX 10 KEEPTTL"]);
        // A member named INCR after the first score is a member.
        expect(Idempotent, &["ZADD z NX 1 INCR"]);
    }

    #[test]
    fn options_are_case_insensitive() {
        expect(
            NonIdempotent,
            &["set k v nx", "set k v Get", "zadd z incr 1 m"],
        );
        expect(
            Idempotent,
            &["set k v ex 10", "copy a b replace", "getex k persist"],
        );
        expect(ReadOnly, &["xread count 1 streams s 0"]);
    }

    #[test]
    fn keys_and_generic() {
        expect(
            ReadOnly,
            &[
                "EXISTS k",
                "TYPE k",
                "TTL k",
                "PTTL k",
                "EXPIRETIME k",
                "PEXPIRETIME k",
                "KEYS *",
                "SCAN 0",
                "RANDOMKEY",
                "DUMP k",
                "TOUCH k",
                "OBJECT ENCODING k",
                "OBJECT FREQ k",
                "OBJECT IDLETIME k",
                "OBJECT REFCOUNT k",
                "SORT_RO k",
                "WAIT 1 0",
                "WAITAOF 1 0 0",
            ],
        );
        expect(
            Idempotent,
            &[
                "DEL a b",
                "UNLINK a b",
                "EXPIREAT k 1700000000",
                "PEXPIREAT k 1700000000000",
                "EXPIREAT k 1700000000 XX",
                "PERSIST k",
                "COPY a b REPLACE",
                "COPY a b DB 1 REPLACE",
                "RESTORE k 0 payload REPLACE",
                "RESTORE k 0 payload REPLACE ABSTTL IDLETIME 10 FREQ 5",
                "SORT k",
                "SORT k BY w_* LIMIT 0 10 GET # GET o_* DESC ALPHA",
                "SORT k STORE dst",
                "SORT k LIMIT 0 10 STORE dst",
            ],
        );
        expect(
            NonIdempotent,
            &[
                "EXPIRE k 10",
                "PEXPIRE k 100",
                "EXPIREAT k 1700000000 NX",
                "EXPIREAT k 1700000000 GT",
                "PEXPIREAT k 1700000000000 LT",
                "COPY a b",
                "COPY a b DB 1",
                "RESTORE k 0 payload",
                "RESTORE k 0 payload ABSTTL",
                "RENAME a b",
                "RENAMENX a b",
                "MOVE k 1",
                "MIGRATE host 6379 k 0 1000",
                "OBJECT",
                "OBJECT NOSUCH k",
                "SORT k NOSUCH",
            ],
        );
    }

    #[test]
    fn hashes() {
        expect(
            ReadOnly,
            &[
                "HGET h f",
                "HMGET h a b",
                "HGETALL h",
                "HKEYS h",
                "HVALS h",
                "HLEN h",
                "HEXISTS h f",
                "HSTRLEN h f",
                "HSCAN h 0",
                "HRANDFIELD h 2",
            ],
        );
        expect(Idempotent, &["HSET h f v", "HMSET h f v", "HDEL h f"]);
        expect(
            NonIdempotent,
            &["HSETNX h f v", "HINCRBY h f 1", "HINCRBYFLOAT h f 0.5"],
        );
    }

    #[test]
    fn lists() {
        expect(
            ReadOnly,
            &["LRANGE l 0 -1", "LINDEX l 0", "LLEN l", "LPOS l x"],
        );
        expect(Idempotent, &["LSET l 0 x"]);
        expect(
            NonIdempotent,
            &[
                "LPUSH l x",
                "RPUSH l x",
                "LPUSHX l x",
                "RPUSHX l x",
                "LINSERT l BEFORE a b",
                "LPOP l",
                "RPOP l",
                "LMOVE a b LEFT RIGHT",
                "RPOPLPUSH a b",
                "BLPOP l 0",
                "BRPOP l 0",
                "BLMOVE a b LEFT RIGHT 0",
                "BRPOPLPUSH a b 0",
                "LMPOP 1 l LEFT",
                "BLMPOP 0 1 l LEFT",
                "LREM l 0 x",
                "LTRIM l 1 -1",
                "LTRIM l 0 -1",
            ],
        );
    }

    #[test]
    fn sets() {
        expect(
            ReadOnly,
            &[
                "SMEMBERS s",
                "SISMEMBER s m",
                "SMISMEMBER s a b",
                "SCARD s",
                "SRANDMEMBER s",
                "SSCAN s 0",
                "SINTER a b",
                "SUNION a b",
                "SDIFF a b",
                "SINTERCARD 2 a b",
            ],
        );
        expect(
            Idempotent,
            &[
                "SADD s m",
                "SREM s m",
                "SINTERSTORE d a b",
                "SUNIONSTORE d a b",
                "SDIFFSTORE d a b",
            ],
        );
        expect(NonIdempotent, &["SMOVE a b m", "SPOP s"]);
    }

    #[test]
    fn sorted_sets() {
        expect(
            ReadOnly,
            &[
                "ZRANGE z 0 -1",
                "ZRANGEBYSCORE z 0 10",
                "ZRANGEBYLEX z - +",
                "ZREVRANGE z 0 -1",
                "ZREVRANGEBYSCORE z 10 0",
                "ZREVRANGEBYLEX z + -",
                "ZSCORE z m",
                "ZMSCORE z a b",
                "ZRANK z m",
                "ZREVRANK z m",
                "ZCARD z",
                "ZCOUNT z 0 10",
                "ZLEXCOUNT z - +",
                "ZSCAN z 0",
                "ZRANDMEMBER z",
                "ZINTER 2 a b",
                "ZUNION 2 a b",
                "ZDIFF 2 a b",
                "ZINTERCARD 2 a b",
            ],
        );
        expect(
            Idempotent,
            &[
                "ZADD z 1 m",
                "ZADD z NX 1 m",
                "ZADD z XX CH 1 m",
                "ZADD z GT 1 m 2 n",
                "ZADD z XX LT CH 1 m",
                "ZREM z m",
                "ZREMRANGEBYSCORE z 0 10",
                "ZREMRANGEBYLEX z - +",
                "ZUNIONSTORE d 2 a b",
                "ZINTERSTORE d 2 a b WEIGHTS 1 2 AGGREGATE MAX",
                "ZDIFFSTORE d 2 a b",
                "ZRANGESTORE d z 0 10",
            ],
        );
        expect(
            NonIdempotent,
            &[
                "ZADD z INCR 1 m",
                "ZADD z NX INCR 1 m",
                "ZINCRBY z 1 m",
                "ZREMRANGEBYRANK z 0 1",
                "ZPOPMIN z",
                "ZPOPMAX z",
                "BZPOPMIN z 0",
                "BZPOPMAX z 0",
                "ZMPOP 1 z MIN",
                "BZMPOP 0 1 z MIN",
            ],
        );
    }

    #[test]
    fn stores_into_one_of_their_sources_are_not_idempotent() {
        expect(
            NonIdempotent,
            &[
                "ZUNIONSTORE a 2 a b",
                "ZINTERSTORE b 2 a b WEIGHTS 2 1",
                "ZDIFFSTORE a 2 a b",
                "ZRANGESTORE z z 1 2",
                "SUNIONSTORE a a b",
                "SINTERSTORE b a b",
                "SDIFFSTORE a a b",
                "BITOP XOR d d x",
                "BITOP NOT d d",
                "SORT k LIMIT 1 2 STORE k",
                "GEORADIUS g 15 37 200 km STORE g",
                "GEORADIUSBYMEMBER g m 200 km STOREDIST g",
                "GEOSEARCHSTORE g g FROMMEMBER m BYRADIUS 10 km",
                // Malformed: no numkeys, no destination.
                "ZUNIONSTORE d x a b",
                "SUNIONSTORE",
            ],
        );
        // A source that only comes after the numkeys sources (here a WEIGHTS value) is not one.
        expect(
            Idempotent,
            &[
                "ZUNIONSTORE d 1 a WEIGHTS d",
                "SUNIONSTORE A a b",
                "BITOP AND d a b",
            ],
        );
    }

    #[test]
    fn streams() {
        expect(
            ReadOnly,
            &[
                "XRANGE s - +",
                "XREVRANGE s + -",
                "XLEN s",
                "XREAD STREAMS s 0",
                "XREAD COUNT 10 STREAMS s 0",
                "XINFO STREAM s",
                "XINFO GROUPS s",
                "XPENDING s g",
                "XGROUP HELP",
            ],
        );
        expect(
            Idempotent,
            &[
                "XACK s g 1-0",
                "XDEL s 1-0",
                "XGROUP SETID s g 5-0",
                "XGROUP DESTROY s g",
                "XGROUP DELCONSUMER s g c",
            ],
        );
        expect(
            NonIdempotent,
            &[
                "XADD s * f v",
                "XADD s 5-0 f v",
                "XTRIM s MAXLEN 100",
                "XCLAIM s g c 0 1-0",
                "XAUTOCLAIM s g c 0 0",
                "XREADGROUP GROUP g c STREAMS s >",
                "XREAD BLOCK 0 STREAMS s $",
                "XREAD COUNT 1 BLOCK 100 STREAMS s $",
                "XREAD COUNT 1",
                "XSETID s 5-0",
                "XGROUP CREATE s g $",
                "XGROUP CREATECONSUMER s g c",
                "XGROUP SETID s g $",
            ],
        );
    }

    #[test]
    fn geo() {
        expect(
            ReadOnly,
            &[
                "GEOPOS g m",
                "GEODIST g a b",
                "GEOHASH g m",
                "GEOSEARCH g FROMMEMBER m BYRADIUS 10 km",
                "GEORADIUS_RO g 15 37 200 km",
                "GEORADIUSBYMEMBER_RO g m 200 km",
            ],
        );
        expect(
            Idempotent,
            &[
                "GEOADD g 13.36 38.11 palermo",
                "GEOADD g NX CH 13.36 38.11 palermo",
                "GEORADIUS g 15 37 200 km WITHDIST COUNT 5 ANY ASC",
                "GEORADIUS g 15 37 200 km STORE dst",
                "GEORADIUSBYMEMBER g STORE 200 km STOREDIST dst",
                "GEOSEARCHSTORE dst g FROMMEMBER m BYRADIUS 10 km",
            ],
        );
        expect(NonIdempotent, &["GEORADIUS g 15 37 200 km NOSUCH"]);
    }

    #[test]
    fn hyperloglog() {
        expect(ReadOnly, &["PFCOUNT h", "PFCOUNT a b"]);
        expect(
            Idempotent,
            &["PFADD h a b", "PFMERGE d a b", "PFMERGE a a b"],
        );
        expect(NonIdempotent, &["PFDEBUG GETREG h", "PFSELFTEST"]);
    }

    #[test]
    fn bitmaps() {
        expect(
            ReadOnly,
            &[
                "BITCOUNT k",
                "BITPOS k 1",
                "GETBIT k 7",
                "BITFIELD_RO k GET u8 0",
            ],
        );
        expect(
            Idempotent,
            &[
                "BITOP AND d a b",
                "BITOP OR d a b",
                "BITOP XOR d a b",
                "BITOP NOT d a",
                "BITFIELD k GET u8 0 GET i4 8",
                "BITFIELD k OVERFLOW SAT GET u8 0",
            ],
        );
        expect(
            NonIdempotent,
            &[
                "SETBIT k 7 1",
                "BITFIELD k SET u8 0 255",
                "BITFIELD k INCRBY u8 0 1",
                "BITFIELD k GET u8 0 INCRBY u8 0 1",
                "BITOP NOSUCH d a",
            ],
        );
    }

    #[test]
    fn scripting_and_functions() {
        expect(
            ReadOnly,
            &[
                "EVAL_RO return 1 0",
                "EVALSHA_RO abc 0",
                "FCALL_RO f 0",
                "SCRIPT EXISTS abc",
                "FUNCTION LIST",
                "FUNCTION DUMP",
                "FUNCTION STATS",
            ],
        );
        expect(
            Idempotent,
            &[
                "SCRIPT LOAD return 1",
                "FUNCTION LOAD REPLACE code",
                "FUNCTION RESTORE payload REPLACE",
                "FUNCTION RESTORE payload FLUSH",
            ],
        );
        expect(
            NonIdempotent,
            &[
                "EVAL return 1 0",
                "EVALSHA abc 0",
                "FCALL f 0",
                "SCRIPT FLUSH",
                "SCRIPT KILL",
                "FUNCTION LOAD code",
                "FUNCTION LOAD REPLACE",
                "FUNCTION RESTORE payload",
                "FUNCTION RESTORE payload APPEND",
                "FUNCTION DELETE lib",
                "FUNCTION FLUSH",
                "FUNCTION KILL",
            ],
        );
    }

    #[test]
    fn pubsub() {
        expect(
            ReadOnly,
            &[
                "PUBSUB CHANNELS",
                "PUBSUB NUMSUB c",
                "PUBSUB NUMPAT",
                "PUBSUB SHARDCHANNELS",
                "PUBSUB SHARDNUMSUB c",
            ],
        );
        expect(
            NonIdempotent,
            &[
                "PUBLISH c m",
                "SPUBLISH c m",
                "SUBSCRIBE c",
                "UNSUBSCRIBE c",
                "PSUBSCRIBE c*",
                "PUNSUBSCRIBE c*",
                "SSUBSCRIBE c",
                "SUNSUBSCRIBE c",
            ],
        );
    }

    #[test]
    fn transactions() {
        expect(
            NonIdempotent,
            &["MULTI", "EXEC", "DISCARD", "WATCH k", "UNWATCH"],
        );
    }

    #[test]
    fn connection() {
        expect(
            ReadOnly,
            &["PING", "ECHO hi", "CLIENT GETNAME", "CLIENT ID"],
        );
        expect(
            Idempotent,
            &[
                "AUTH user pass",
                "HELLO 3",
                "SELECT 0",
                "READONLY",
                "READWRITE",
                "RESET",
                "CLIENT SETNAME app",
                "CLIENT SETINFO LIB-NAME x",
            ],
        );
        expect(
            NonIdempotent,
            &[
                "QUIT",
                "CLIENT REPLY OFF",
                "CLIENT NO-EVICT ON",
                "CLIENT TRACKING ON",
            ],
        );
    }

    #[test]
    fn server_and_admin() {
        expect(
            ReadOnly,
            &[
                "TIME",
                "DBSIZE",
                "INFO",
                "LASTSAVE",
                "ROLE",
                "LOLWUT",
                "MEMORY USAGE k",
                "MEMORY STATS",
                "MEMORY DOCTOR",
                "COMMAND",
                "COMMAND COUNT",
                "COMMAND DOCS GET",
                "CONFIG GET maxmemory",
                "SLOWLOG GET 10",
                "SLOWLOG LEN",
                "LATENCY LATEST",
                "LATENCY HISTORY event",
                "ACL WHOAMI",
                "ACL LIST",
                "ACL USERS",
                "ACL GETUSER u",
                "ACL CAT",
                "ACL LOG",
                "ACL LOG 10",
                "MODULE LIST",
            ],
        );
        expect(
            Idempotent,
            &[
                "FLUSHDB",
                "FLUSHALL ASYNC",
                "CONFIG SET maxmemory 1gb",
                "CONFIG REWRITE",
                "SLOWLOG RESET",
                "LATENCY RESET",
                "MEMORY PURGE",
                "ACL LOG RESET",
                "ACL DELUSER u",
            ],
        );
        expect(
            NonIdempotent,
            &[
                "SAVE",
                "BGSAVE",
                "BGREWRITEAOF",
                "SHUTDOWN",
                "FAILOVER",
                "DEBUG SLEEP 0",
                "MONITOR",
                "SWAPDB 0 1",
                "REPLICAOF host 6379",
                "ACL SETUSER u on",
                "MODULE LOAD path",
                "CLIENT KILL ID 7",
                "CLIENT PAUSE 100",
                "CLIENT UNPAUSE",
                "CONFIG",
            ],
        );
    }

    #[test]
    fn cluster() {
        expect(
            ReadOnly,
            &[
                "CLUSTER INFO",
                "CLUSTER NODES",
                "CLUSTER SLOTS",
                "CLUSTER SHARDS",
                "CLUSTER KEYSLOT k",
                "CLUSTER COUNTKEYSINSLOT 7",
                "CLUSTER GETKEYSINSLOT 7 10",
                "CLUSTER MYID",
                "CLUSTER MYSHARDID",
                "CLUSTER LINKS",
                "CLUSTER COUNT-FAILURE-REPORTS id",
            ],
        );
        expect(Idempotent, &["READONLY", "ASKING"]);
        expect(
            NonIdempotent,
            &[
                "CLUSTER FAILOVER",
                "CLUSTER RESET",
                "CLUSTER SETSLOT 7 NODE id",
                "CLUSTER ADDSLOTS 7",
                "CLUSTER DELSLOTS 7",
                "CLUSTER MEET 10.0.0.1 6379",
                "CLUSTER FORGET id",
                "CLUSTER REPLICATE id",
                "CLUSTER SET-CONFIG-EPOCH 1",
                "CLUSTER",
            ],
        );
    }

    #[test]
    fn names_and_subcommands_are_case_insensitive() {
        assert_eq!(classify(redis::cmd("get").arg("k")), ReadOnly);
        assert_eq!(classify(redis::cmd("gEt").arg("k")), ReadOnly);
        assert_eq!(classify(redis::cmd("incr").arg("k")), NonIdempotent);
        assert_eq!(classify(redis::cmd("set").arg("k").arg("v")), Idempotent);
        expect(
            ReadOnly,
            &["config get maxmemory", "Client List", "cluster nodes"],
        );
        expect(Idempotent, &["config Set maxmemory 1gb"]);
        expect(NonIdempotent, &["client kill ID 7"]);
    }

    #[test]
    fn subcommands_decide() {
        assert_eq!(class("CONFIG GET maxmemory"), ReadOnly);
        assert_eq!(class("CONFIG SET maxmemory 1gb"), Idempotent);
        assert_eq!(class("CLIENT LIST"), ReadOnly);
        assert_eq!(class("CLIENT KILL ID 7"), NonIdempotent);
        // Unknown subcommands of known containers are not guessed.
        expect(
            NonIdempotent,
            &["CONFIG NOSUCH", "CLIENT NOSUCH", "MEMORY NOSUCH"],
        );
        // A container without its subcommand is not either.
        assert_eq!(classify(&redis::cmd("CONFIG")), NonIdempotent);
        let mut cursor_sub = redis::cmd("CONFIG");
        cursor_sub.cursor_arg(0);
        assert_eq!(classify(&cursor_sub), NonIdempotent);
    }

    #[test]
    fn unknown_and_empty_commands_are_not_idempotent() {
        expect(
            NonIdempotent,
            &["NOSUCHCOMMAND k", "FT.SEARCH idx q", "JSON.SET k $ 1"],
        );
        assert_eq!(classify(&Cmd::new()), NonIdempotent);
        assert_eq!(classify(redis::cmd("").arg("k")), NonIdempotent);
        // A prefix or an extension of a known name is another name.
        expect(NonIdempotent, &["GE k", "GETT k", "ZRANGESTOREX d z 0 1"]);
        let mut not_utf8 = Cmd::new();
        not_utf8.arg(&b"G\xffT"[..]).arg("k");
        assert_eq!(classify(&not_utf8), NonIdempotent);
        let mut cursor_only = Cmd::new();
        cursor_only.cursor_arg(0);
        assert_eq!(classify(&cursor_only), NonIdempotent);
    }

    #[test]
    fn every_table_entry_is_found_under_its_name_in_any_case() {
        let mut entries = 0;
        for &(name, rule) in COMMANDS {
            match rule {
                Rule::Is(expected) => {
                    entries += 1;
                    assert_eq!(class(name), expected, "{name}");
                    assert_eq!(class(&name.to_ascii_lowercase()), expected, "{name}");
                }
                Rule::Args(_) => entries += 1,
                Rule::Sub(subs) => {
                    for &(sub, rule) in subs {
                        entries += 1;
                        if let Rule::Is(expected) = rule {
                            let line = format!("{name} {sub}");
                            assert_eq!(class(&line), expected, "{line}");
                            assert_eq!(class(&line.to_ascii_lowercase()), expected, "{line}");
                        }
                    }
                }
            }
        }
        assert!(entries > 300, "only {entries} entries");
    }

    #[test]
    fn malformed_tables_are_rejected() {
        assert!(well_formed(&[("A", READ), ("B", READ)], false));
        assert!(!well_formed(&[("B", READ), ("A", READ)], false));
        assert!(!well_formed(&[("A", READ), ("A", IDEM)], false));
        assert!(!well_formed(&[("a", READ)], false));
        assert!(!well_formed(&[("", READ)], false));
        assert!(!well_formed(
            &[("A", Rule::Sub(&[("Y", READ), ("X", READ)]))],
            false
        ));
        assert!(!well_formed(
            &[("A", Rule::Sub(&[("X", Rule::Sub(&[]))]))],
            false
        ));
        // Byte order: '-' sorts before letters, '_' after them.
        assert!(well_formed(
            &[("A-B", READ), ("AB", READ), ("A_B", READ)],
            false
        ));
    }

    #[test]
    fn command_level_override_beats_the_table() {
        let table = IdempotencyTable::new()
            .with_override("sadd", NonIdempotent)
            .unwrap()
            .with_override("EVALSHA", Idempotent)
            .unwrap()
            .with_override("FT.SEARCH", ReadOnly)
            .unwrap();
        assert_eq!(table.classify(&cmd_of("SADD s m")), NonIdempotent);
        assert_eq!(table.classify(&cmd_of("sadd s m")), NonIdempotent);
        assert_eq!(table.classify(&cmd_of("EVALSHA abc 0")), Idempotent);
        assert_eq!(table.classify(&cmd_of("FT.SEARCH idx q")), ReadOnly);
        assert_eq!(table.classify(&cmd_of("ft.search idx q")), ReadOnly);
        // Everything else is still the built-in table.
        assert_eq!(table.classify(&cmd_of("SREM s m")), Idempotent);
        assert_eq!(table.classify(&cmd_of("INCR k")), NonIdempotent);
        assert_eq!(table.classify(&cmd_of("GET k")), ReadOnly);
    }

    #[test]
    fn subcommand_override_beats_command_override_beats_table() {
        let mut table = IdempotencyTable::new()
            .with_override("config  set", NonIdempotent)
            .unwrap()
            .with_override("CLIENT", ReadOnly)
            .unwrap()
            .with_override("client kill", Idempotent)
            .unwrap();
        assert_eq!(
            table.classify(&cmd_of("CONFIG SET maxmemory 1gb")),
            NonIdempotent
        );
        assert_eq!(
            table.classify(&cmd_of("Config Set maxmemory 1gb")),
            NonIdempotent
        );
        // Other subcommands are untouched by a subcommand override.
        assert_eq!(table.classify(&cmd_of("CONFIG GET maxmemory")), ReadOnly);
        assert_eq!(table.classify(&cmd_of("CONFIG REWRITE")), Idempotent);
        // The subcommand override wins over the command override.
        assert_eq!(table.classify(&cmd_of("CLIENT KILL ID 7")), Idempotent);
        assert_eq!(table.classify(&cmd_of("CLIENT PAUSE 100")), ReadOnly);
        assert_eq!(table.classify(&redis::cmd("CLIENT")), ReadOnly);
        // A later override replaces an earlier one.
        table.set_override("CLIENT KILL", NonIdempotent).unwrap();
        assert_eq!(table.classify(&cmd_of("CLIENT KILL ID 7")), NonIdempotent);
    }

    #[test]
    fn long_override_names_still_match() {
        let long = "X".repeat(70);
        let table = IdempotencyTable::new()
            .with_override(format!("{long} sub"), ReadOnly)
            .unwrap();
        assert_eq!(table.classify(&cmd_of(&format!("{long} sub k"))), ReadOnly);
        assert_eq!(
            table.classify(&cmd_of(&format!("{long} other k"))),
            NonIdempotent
        );
    }

    #[test]
    fn key_slots_are_redis_cluster_slots() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(key_slot(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"));
        assert_ne!(
            key_slot(b"foo{}{bar}"),
            key_slot(b"bar"),
            "an empty tag is no tag"
        );
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        assert_eq!(key_slot(b""), 0);
    }

    #[test]
    fn blocking_commands_and_their_time() {
        use std::time::Duration;
        let cmd = |line: &str| {
            let mut words = line.split_whitespace();
            let mut c = redis::cmd(words.next().unwrap());
            for w in words {
                c.arg(w);
            }
            c
        };
        for (line, expected) in [
            ("BLPOP q 5", Some((Block::For(Duration::from_secs(5)), 1))),
            (
                "brpop a b 0.25",
                Some((Block::For(Duration::from_millis(250)), 1)),
            ),
            ("BLPOP q 0", Some((Block::Forever, 1))),
            (
                "BLMOVE a b LEFT RIGHT 1",
                Some((Block::For(Duration::from_secs(1)), 1)),
            ),
            (
                "BRPOPLPUSH a b 2",
                Some((Block::For(Duration::from_secs(2)), 1)),
            ),
            (
                "BZPOPMIN z 1.5",
                Some((Block::For(Duration::from_millis(1500)), 1)),
            ),
            (
                "BLMPOP 3 2 a b LEFT",
                Some((Block::For(Duration::from_secs(3)), 3)),
            ),
            ("BZMPOP 0 1 z MIN", Some((Block::Forever, 3))),
            (
                "XREAD COUNT 2 BLOCK 1500 STREAMS s 0",
                Some((Block::For(Duration::from_millis(1500)), 6)),
            ),
            (
                "XREADGROUP GROUP g c BLOCK 0 STREAMS s >",
                Some((Block::Forever, 7)),
            ),
            ("XREAD STREAMS s 0", None),
            ("GET k", None),
            ("BITCOUNT k", None),
            ("BLPOP q not-a-number", None),
        ] {
            assert_eq!(blocking(&cmd(line)), expected, "{line}");
        }
        assert_eq!(
            block_allowance(None, Some(Duration::from_secs(1))).unwrap(),
            Duration::ZERO
        );
        assert_eq!(
            block_allowance(
                Some(Block::For(Duration::from_secs(4))),
                Some(Duration::from_secs(1))
            )
            .unwrap(),
            Duration::from_secs(4)
        );
        let e = block_allowance(Some(Block::Forever), Some(Duration::from_secs(1))).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Unsupported);
        assert!(block_allowance(Some(Block::Forever), None).is_ok());
    }

    #[test]
    fn overrides_that_could_never_match_are_config_errors_not_panics() {
        for bad in ["CLIENT KILL ID", "  ", ""] {
            let e = IdempotencyTable::new()
                .with_override(bad, Idempotent)
                .unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Config, "{bad:?}");
            assert!(e.to_string().contains("one command or one"), "{e}");
            let mut table = IdempotencyTable::new();
            assert!(table.set_override(bad, Idempotent).is_err());
        }
        // A huge input is not echoed whole.
        let huge = "X ".repeat(100_000);
        let e = IdempotencyTable::new()
            .with_override(&huge, Idempotent)
            .unwrap_err();
        assert!(e.to_string().len() < 500, "{} bytes", e.to_string().len());
    }

    #[test]
    fn a_pipeline_is_safe_only_if_each_command_is_and_none_reads_what_a_later_one_writes() {
        let table = IdempotencyTable::new();
        let class = |lines: &[&str], atomic: bool| {
            let mut pipe = redis::pipe();
            if atomic {
                pipe.atomic();
            }
            for line in lines {
                let mut words = line.split_whitespace();
                pipe.cmd(words.next().unwrap());
                for w in words {
                    pipe.arg(w);
                }
            }
            table.classify_pipeline(&pipe)
        };
        assert_eq!(class(&[], false), ReadOnly);
        assert_eq!(class(&["GET a", "MGET a b"], false), ReadOnly);
        // Unsafe commands make the pipeline unsafe, wherever they are.
        assert_eq!(class(&["SET a 1", "INCR n", "GET a"], false), NonIdempotent);
        assert_eq!(
            class(&["SET a 1", "DEL b", "LPUSH l x"], true),
            NonIdempotent
        );
        // Writes that repeat, read nothing of each other: safe.
        assert_eq!(class(&["SET a 1", "DEL b"], true), Idempotent);
        assert_eq!(
            class(&["SADD s x", "SREM s y", "HSET h f v"], false),
            Idempotent
        );
        // A read after a write that sets the key whatever it held: both runs read the same.
        assert_eq!(class(&["SET a 1", "GET a"], false), Idempotent);
        assert_eq!(class(&["DEL a", "EXISTS a", "SET a 2"], false), Idempotent);
        // A read of what a later command writes: the second run reads the first run's result.
        // A pop: GET then DEL returns nil the second time.
        assert_eq!(class(&["GET k", "DEL k"], true), NonIdempotent);
        // The union is stored, then a source deleted: the second run stores another union.
        assert_eq!(class(&["SUNIONSTORE d a b", "DEL a"], false), NonIdempotent);
        assert_eq!(
            class(&["GET a", "MGET a b", "SET a 1"], false),
            NonIdempotent
        );
        assert_eq!(class(&["SMEMBERS s", "SADD s x"], false), NonIdempotent);
        assert_eq!(class(&["COPY a b", "DEL a"], false), NonIdempotent);
        // ...unless a write before the read set it whatever it held.
        assert_eq!(
            class(&["SET a 1", "COPY a b REPLACE", "SET a 2"], false),
            Idempotent
        );
        // A write that works on what its key holds, then another write of that key: the second
        // run's first write finds what the first run left (found by tests/pipeline_safety).
        assert_eq!(class(&["ZADD b 1 m", "SET b m"], true), NonIdempotent);
        assert_eq!(class(&["HDEL k f", "ZADD k 1 m"], false), NonIdempotent);
        assert_eq!(
            class(&["PFADD k m", "SETRANGE k 1 m"], false),
            NonIdempotent
        );
        assert_eq!(
            class(&["HSET h f v", "SUNIONSTORE h a"], false),
            NonIdempotent
        );
        assert_eq!(
            class(&["SADD s x", "RESTORE s 0 blob REPLACE"], false),
            NonIdempotent
        );
        // (a string there fails the first run's SADD, not the second's)
        assert_eq!(class(&["SADD s m", "DEL s"], true), NonIdempotent);
        assert_eq!(class(&["LSET l 0 x", "DEL l"], false), NonIdempotent);
        // ...unless it writes the same kind of value, or a write before set the key.
        assert_eq!(
            class(&["HSET h f v", "HDEL h f", "HSET h g v"], false),
            Idempotent
        );
        assert_eq!(
            class(&["ZADD z 1 m", "ZREM z n", "GEOADD z 0 0 p"], true),
            Idempotent
        );
        assert_eq!(
            class(&["DEL b", "ZADD b 1 m", "SET b m"], false),
            Idempotent
        );
        // A write that can fail is no reset: a store whose source holds another type leaves
        // its destination alone, so does a SET with a bad expiry.
        assert_eq!(
            class(
                &["MSET a x b x", "SUNIONSTORE c a b", "EXISTS c", "SET c x"],
                false
            ),
            NonIdempotent
        );
        assert_eq!(
            class(&["SET c x EX 0", "EXISTS c", "SET c y"], false),
            NonIdempotent
        );
        assert_eq!(
            class(&["SET c x EX 10", "EXISTS c", "SET c y"], false),
            Idempotent
        );
        assert_eq!(
            class(&["FLUSHALL", "EXISTS c", "SET c y"], false),
            Idempotent
        );
        assert_eq!(
            class(&["FLUSHALL NOW", "EXISTS c", "SET c y"], false),
            NonIdempotent
        );
        // COPY leaves its destination alone when the source is missing: no reset.
        assert_eq!(
            class(&["COPY b a REPLACE", "EXISTS a", "SADD a m"], false),
            NonIdempotent
        );
        // A read of the whole keyspace, then any write.
        assert_eq!(class(&["KEYS *", "SET a 1"], false), NonIdempotent);
        assert_eq!(class(&["FLUSHALL", "KEYS *", "SET a 1"], false), Idempotent);
        assert_eq!(class(&["GET a"], true), ReadOnly);
        // A hand-written transaction contains MULTI, which is not idempotent on its own.
        assert_eq!(class(&["MULTI", "GET a", "EXEC"], false), NonIdempotent);
    }

    #[test]
    fn pipelines_use_overrides() {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg("a").cmd("EVALSHA").arg("abc").arg(0);
        assert_eq!(
            IdempotencyTable::new().classify_pipeline(&pipe),
            NonIdempotent
        );
        let table = IdempotencyTable::new()
            .with_override("evalsha", Idempotent)
            .unwrap();
        assert_eq!(table.classify_pipeline(&pipe), Idempotent);
    }

    #[test]
    fn ordering_puts_the_least_safe_last() {
        assert!(ReadOnly < Idempotent);
        assert!(Idempotent < NonIdempotent);
        assert_eq!(
            [Idempotent, NonIdempotent, ReadOnly].iter().max(),
            Some(&NonIdempotent)
        );
        assert_eq!([Idempotent, ReadOnly].iter().max(), Some(&Idempotent));
        assert!(ReadOnly.is_retry_safe());
        assert!(Idempotent.is_retry_safe());
        assert!(!NonIdempotent.is_retry_safe());
        assert_eq!(ReadOnly.as_str(), "read_only");
        assert_eq!(Idempotent.as_str(), "idempotent");
        assert_eq!(NonIdempotent.to_string(), "non_idempotent");
    }

    #[test]
    fn command_names() {
        assert_eq!(
            command_name(redis::cmd("get").arg("k")).as_deref(),
            Some("GET")
        );
        assert_eq!(
            command_name(&cmd_of("Config Set a b")).as_deref(),
            Some("CONFIG")
        );
        assert_eq!(command_name(&Cmd::new()), None);
        assert_eq!(command_name(&redis::cmd("")), None);
        let mut cursor_only = Cmd::new();
        cursor_only.cursor_arg(0);
        assert_eq!(command_name(&cursor_only), None);
    }
}
