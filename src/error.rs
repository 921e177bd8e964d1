//! One error type for every layer, classified once.
//!
//! Every failure that leaves a layer of this crate is an [`Error`]: a [`redis::RedisError`] from
//! the inner client, or one of our own (a rebuild that could not finish in time, a bad
//! configuration, a closed service). It is classified into an [`ErrorKind`] exactly once, where it
//! enters the stack, so the retry, refresh and rebuild layers all decide from the same facts:
//!
//! * [`Error::kind`] — what went wrong, in the words of Redis Cluster (`Moved`, `ClusterDown`,
//!   `Unreachable`, ...);
//! * [`Error::sent`] — whether the command may have taken effect on a server, which decides
//!   whether a non-idempotent command may be sent again;
//! * [`Error::generation`] — which inner client produced it, so an error from a client that has
//!   already been replaced cannot trigger a second rebuild;
//! * [`std::error::Error::source`] — the root cause (an I/O error, a TLS or DNS failure, the
//!   server's reply), which `Display` also shows so that a log line is enough to act on.

use std::{error::Error as StdError, fmt, sync::Arc};

use redis::{RedisError, ServerErrorKind};

/// What went wrong, in the terms of Redis Cluster.
///
/// The kinds are ordered from "the cluster is moving" through "the network failed" to "the caller
/// or its configuration is wrong". Which of them are retried is decided by the retry policy, not
/// here; see [`ErrorKind::is_transient`] for the usual answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// `MOVED`: the slot is served by another node. The inner cluster client normally follows it.
    Moved,
    /// `ASK`: the slot is being migrated; one command goes to the target node.
    Ask,
    /// `TRYAGAIN`: a multi-key command hit a slot in the middle of a migration.
    TryAgain,
    /// `CLUSTERDOWN`: the cluster is not serving (uncovered slots, failover in progress).
    ClusterDown,
    /// `LOADING`: the node is loading its dataset and cannot serve yet.
    Loading,
    /// `MASTERDOWN`: a replica lost its link to the master and refuses stale reads — or the
    /// shard has no reachable master yet: the cluster kept redirecting (`MOVED`/`ASK`) to a
    /// node that did not serve the request before the call's deadline or redirect limit (a
    /// failover or migration in progress). A redirection never reaches a caller as such.
    MasterDown,
    /// `READONLY`: a write reached a node that is (now) a replica, typically a demoted master —
    /// or a blocking command was unblocked because its master was demoted (`UNBLOCKED … instance
    /// state changed`).
    ReadOnly,
    /// The connection was refused, reset or closed, or another I/O failure occurred.
    Connection,
    /// No reply arrived in time (per-attempt response timeout or the overall deadline).
    Timeout,
    /// No node of the cluster can be reached: the failure a rebuild from the seed names repairs.
    Unreachable,
    /// Failed fast, unsent: the shard of the command's slot has no serving primary just now
    /// (its calls kept failing, or the topology says its master failed), and this call was not
    /// one of the probes that let it back in. Transient, but not retried within the call —
    /// that is the point: see [`FailFastConfig`](crate::read::FailFastConfig).
    ShardDown,
    /// Authentication or authorisation failed (`NOAUTH`, `WRONGPASS`, `NOPERM`).
    Auth,
    /// The TLS handshake failed: an untrusted or mismatched certificate, or a protocol error.
    Tls,
    /// The server rejected the command itself (`WRONGTYPE`, syntax, `CROSSSLOT`, script errors).
    Command,
    /// The server answered, but the reply does not convert to the type the caller asked for
    /// (a client-side mistake: the command ran).
    Conversion,
    /// The command cannot work through this client: it changes the state of the connection it
    /// is sent on (`WATCH`, `MULTI`, `SUBSCRIBE`, `SELECT`, ...) and the connections are shared
    /// by every caller. Refused before anything is sent; the message says what to use instead.
    Unsupported,
    /// The configuration cannot work (no seeds, bad URL, unsupported option).
    Config,
    /// The service was shut down, or a background task it relies on is gone.
    Closed,
}

impl ErrorKind {
    /// A short, stable, lower-case name, suitable as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Moved => "moved",
            ErrorKind::Ask => "ask",
            ErrorKind::TryAgain => "try_again",
            ErrorKind::ClusterDown => "cluster_down",
            ErrorKind::Loading => "loading",
            ErrorKind::MasterDown => "master_down",
            ErrorKind::ReadOnly => "read_only",
            ErrorKind::Connection => "connection",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Unreachable => "unreachable",
            ErrorKind::ShardDown => "shard_down",
            ErrorKind::Auth => "auth",
            ErrorKind::Tls => "tls",
            ErrorKind::Command => "command",
            ErrorKind::Conversion => "conversion",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Config => "config",
            ErrorKind::Closed => "closed",
        }
    }

    /// `MOVED` or `ASK`: a redirection, which says nothing about the health of the cluster.
    pub fn is_redirect(self) -> bool {
        matches!(self, ErrorKind::Moved | ErrorKind::Ask)
    }

    /// Whether the condition usually passes by itself (failover, migration, network blip), so that
    /// the same command may succeed later. `Auth`, `Tls`, `Command`, `Conversion`, `Unsupported`,
    /// `Config` and `Closed` never do.
    pub fn is_transient(self) -> bool {
        !matches!(
            self,
            ErrorKind::Auth
                | ErrorKind::Tls
                | ErrorKind::Command
                | ErrorKind::Conversion
                | ErrorKind::Unsupported
                | ErrorKind::Config
                | ErrorKind::Closed
        )
    }

    fn describe(self) -> &'static str {
        match self {
            ErrorKind::Moved => "slot moved to another node",
            ErrorKind::Ask => "slot is being migrated (ASK)",
            ErrorKind::TryAgain => "slot migration in progress, try again",
            ErrorKind::ClusterDown => "cluster is down",
            ErrorKind::Loading => "node is loading its dataset",
            ErrorKind::MasterDown => "the shard's master is down or not reachable yet",
            ErrorKind::ReadOnly => "write reached a replica (demoted master?)",
            ErrorKind::Connection => "connection failed",
            ErrorKind::Timeout => "timed out",
            ErrorKind::Unreachable => "no node of the cluster is reachable",
            ErrorKind::ShardDown => "the shard of the slot has no serving primary (failed fast)",
            ErrorKind::Auth => "authentication failed",
            ErrorKind::Tls => "TLS handshake failed (check the CA and the server name)",
            ErrorKind::Command => "command rejected by the server",
            ErrorKind::Conversion => "the reply does not convert to the requested type",
            ErrorKind::Unsupported => "the command cannot work on a shared connection",
            ErrorKind::Config => "invalid configuration",
            ErrorKind::Closed => "service closed",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a failed command may have taken effect on a server.
///
/// This is what makes retrying a non-idempotent command (`INCR`, `LPUSH`) safe or not:
/// only [`Sent::No`] proves that sending it again cannot apply it twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sent {
    /// The command provably did not take effect: it was never written to a connection, or a
    /// server refused it before executing it (`MOVED`, `READONLY`, `CLUSTERDOWN`, ...).
    No,
    /// The command may have been executed: the connection failed or timed out after it was
    /// written, or the outcome is otherwise unknown.
    Maybe,
}

/// The error of every service and layer in this crate.
///
/// Cheap to clone (one small allocation; the message and root cause are shared), so a failure
/// can be handed to every caller that waited for the same rebuild.
///
/// One pointer wide: results and futures that carry an `Error` stay small on the success path.
#[derive(Clone)]
pub struct Error(Box<Inner>);

#[derive(Clone)]
struct Inner {
    kind: ErrorKind,
    sent: Sent,
    generation: Option<u64>,
    message: Option<Arc<str>>,
    source: Option<Arc<dyn StdError + Send + Sync + 'static>>,
    /// Raised on a connection of its own (a blocking command's), not the shared inner client:
    /// it says nothing about whether that client needs rebuilding.
    detached: bool,
    /// When trying again is worth it: a connection check the client's outage gate holds back
    /// is due then — or earlier, when the gate says a node answered (the receiver changes).
    retry_at: Option<(
        tokio::time::Instant,
        Option<tokio::sync::watch::Receiver<u64>>,
    )>,
}

impl Error {
    /// A new error of `kind` with a message saying what happened (and, ideally, what to check).
    ///
    /// Its [`Sent`] is `No` for the kinds that are raised before anything is written (`Config`,
    /// `Closed`, `Unreachable`, `ShardDown`, `Unsupported`) and `Maybe` otherwise; use [`Error::with_sent`] to be precise.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        let sent = match kind {
            ErrorKind::Config
            | ErrorKind::Closed
            | ErrorKind::Unreachable
            | ErrorKind::ShardDown
            | ErrorKind::Unsupported => Sent::No,
            _ => Sent::Maybe,
        };
        Error(Box::new(Inner {
            kind,
            sent,
            generation: None,
            message: Some(Arc::from(message.into())),
            source: None,
            detached: false,
            retry_at: None,
        }))
    }

    /// Classifies an error of the `redis` crate. This is the one place where that happens.
    pub fn from_redis(err: RedisError) -> Self {
        // One of ours that went through the redis crate's interfaces (`Error::into_redis`):
        // itself again, `Sent` and cause intact.
        if let Some(ours) = Error::of_redis(&err) {
            return ours.clone();
        }
        let (kind, sent) = classify_redis(&err);
        Error(Box::new(Inner {
            kind,
            sent,
            generation: None,
            message: None,
            source: Some(Arc::new(err)),
            detached: false,
            retry_at: None,
        }))
    }

    /// Classifies the error of a pipeline of `commands` commands.
    ///
    /// The `redis` crate reports the failed commands of a pipeline together; the others ran. So
    /// the pipeline "did not take effect" only when every command was refused before execution
    /// (or a `MULTI`/`EXEC` was aborted while queueing); otherwise it may have been applied in
    /// part. The kind is that of the first command error that no retry can fix, or else of the
    /// first failed command.
    pub fn from_redis_pipeline(err: RedisError, commands: usize) -> Self {
        let aborted = err.kind() == redis::ErrorKind::Server(ServerErrorKind::ExecAbort);
        let Some(items) = err.clone().into_server_errors() else {
            return Error::from_redis(err);
        };
        let kinds: Vec<ErrorKind> = items.iter().map(|(_, e)| classify_server(e)).collect();
        let kind = kinds
            .iter()
            .copied()
            .find(|k| !k.is_transient())
            .or_else(|| kinds.first().copied())
            .unwrap_or(ErrorKind::Command);
        let refused = |k: &ErrorKind| !matches!(k, ErrorKind::Command);
        let sent = if aborted || (items.len() >= commands && kinds.iter().all(refused)) {
            Sent::No
        } else {
            Sent::Maybe
        };
        Error(Box::new(Inner {
            kind,
            sent,
            generation: None,
            message: None,
            source: Some(Arc::new(err)),
            detached: false,
            retry_at: None,
        }))
    }

    /// Attaches the root cause.
    pub fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.0.source = Some(Arc::new(source));
        self
    }

    /// Attaches a root cause that is already shared.
    pub fn with_shared_source(mut self, source: Arc<dyn StdError + Send + Sync + 'static>) -> Self {
        self.0.source = Some(source);
        self
    }

    /// Overrides whether the command may have taken effect.
    pub fn with_sent(mut self, sent: Sent) -> Self {
        self.0.sent = sent;
        self
    }

    /// Records which inner client (rebuild generation) produced this error.
    pub fn with_generation(mut self, generation: u64) -> Self {
        self.0.generation = Some(generation);
        self
    }

    /// Prefixes the message with context (for example the seed being connected).
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.0.message = Some(match self.0.message {
            Some(m) => Arc::from(format!("{context}: {m}")),
            None => Arc::from(context.to_string()),
        });
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.0.kind
    }

    /// Whether the command may have taken effect.
    pub fn sent(&self) -> Sent {
        self.0.sent
    }

    /// The generation of the inner client that produced the error, when a rebuild layer knows it.
    pub fn generation(&self) -> Option<u64> {
        self.0.generation
    }

    /// Marks the error as raised on a connection of its own rather than the shared inner
    /// client (see `Inner::detached`).
    pub(crate) fn detached(mut self) -> Self {
        self.0.detached = true;
        self
    }

    /// Whether the error was raised on a connection of its own.
    pub(crate) fn is_detached(&self) -> bool {
        self.0.detached
    }

    /// Says when trying again is worth it (see `Inner::retry_at`).
    pub(crate) fn with_retry_at(mut self, at: Option<tokio::time::Instant>) -> Self {
        self.0.retry_at = at.map(|at| (at, None));
        self
    }

    /// Says that trying again is worth it before [`retry_at`](Self::retry_at) once `wake`
    /// changes (the outage gate's: a node answered).
    pub(crate) fn with_retry_wake(mut self, wake: tokio::sync::watch::Receiver<u64>) -> Self {
        if let Some((_, slot)) = &mut self.0.retry_at {
            *slot = Some(wake);
        }
        self
    }

    /// When trying again is worth it, if the error knows.
    pub(crate) fn retry_at(&self) -> Option<tokio::time::Instant> {
        self.0.retry_at.as_ref().map(|(at, _)| *at)
    }

    /// Waits until [`retry_at`](Self::retry_at) — or less, if what the error waits for happened
    /// earlier (a node answered the client's outage gate). At once without a `retry_at`.
    pub(crate) async fn until_retry(&self) {
        let Some((at, wake)) = &self.0.retry_at else {
            return;
        };
        let mut wake = wake.clone();
        let woken = async {
            let answered = match &mut wake {
                Some(wake) => wake.changed().await.is_ok(),
                None => false,
            };
            // A gate that is gone wakes nobody: wait for the time.
            if !answered {
                std::future::pending::<()>().await
            }
        };
        tokio::select! {
            _ = tokio::time::sleep_until(*at) => {}
            _ = woken => {}
        }
    }

    /// The root cause, shared (cheap to attach to another error).
    pub(crate) fn shared_source(&self) -> Option<Arc<dyn StdError + Send + Sync + 'static>> {
        self.0.source.clone()
    }

    /// The underlying `redis` error, if this error came from the inner client.
    pub fn redis_error(&self) -> Option<&RedisError> {
        self.0.source.as_deref()?.downcast_ref::<RedisError>()
    }

    /// The target of a `MOVED`/`ASK` redirection: `(slot, "host:port")` — for a pipeline, that of
    /// its first redirected command.
    pub fn redirect(&self) -> Option<(u16, String)> {
        let err = self.redis_error()?;
        if let Some((addr, slot)) = err.redirect_node() {
            return Some((slot, addr.to_string()));
        }
        let items = err.clone().into_server_errors()?;
        items.iter().find_map(|(_, e)| {
            if !matches!(
                e.kind(),
                Some(ServerErrorKind::Moved | ServerErrorKind::Ask)
            ) {
                return None;
            }
            let mut parts = e.details()?.split_ascii_whitespace();
            let slot = parts.next()?.parse().ok()?;
            Some((slot, parts.next()?.to_string()))
        })
    }

    /// The server's error code (`WRONGTYPE`, `MOVED`, `NOAUTH`, ...) when a server replied — for
    /// a pipeline, that of its first failed command.
    pub fn server_code(&self) -> Option<String> {
        let err = self.redis_error()?;
        if let Some(code) = err.code() {
            return Some(code.to_string());
        }
        let items = err.clone().into_server_errors()?;
        items.first().map(|(_, e)| e.code().to_string())
    }

    /// The message, without the kind and the root cause.
    pub fn message(&self) -> Option<&str> {
        self.0.message.as_deref()
    }

    // Convenience constructors for the failures our own layers raise.

    /// No node could be reached (rebuild did not produce a client in time, every seed failed).
    pub fn unreachable(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Unreachable, message)
    }

    /// The configuration cannot work; the message says what to fix.
    pub fn config(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Config, message)
    }

    /// The service is closed.
    pub fn closed(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Closed, message)
    }

    /// A deadline passed.
    pub fn timeout(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Timeout, message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.0.kind).field("sent", &self.0.sent);
        if let Some(g) = self.0.generation {
            d.field("generation", &g);
        }
        if let Some(m) = &self.0.message {
            d.field("message", m);
        }
        if let Some(s) = &self.0.source {
            d.field("source", &format_args!("{s}"));
        }
        d.finish()
    }
}

/// The most of one part (the message, each cause) that `Display` prints: a 1 MB host name in a
/// message must not become a multi-megabyte log line.
const DISPLAY_PART: usize = 512;
/// The most `Display` prints in all.
const DISPLAY_TOTAL: usize = 2048;

/// `text` cut at a character boundary near `max` bytes, saying how much was left out.
fn bounded(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} more bytes)", &text[..end], text.len() - end).into()
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = String::from(self.0.kind.describe());
        if let Some(m) = &self.0.message {
            text.push_str(": ");
            text.push_str(&bounded(m, DISPLAY_PART));
        }
        // The root cause is the part a reader acts on (a refused port, a certificate, a DNS name),
        // so it is printed here too rather than left for a reporter that walks `source()`.
        let mut cause = self
            .0
            .source
            .as_deref()
            .map(|s| s as &(dyn StdError + 'static));
        let mut depth = 0;
        while let Some(c) = cause {
            let part = c.to_string();
            let part = bounded(&part, DISPLAY_PART);
            // A cause that is already in the text (an error that repeats its source, or a
            // message that quoted it) is not printed twice.
            if !part.is_empty() && !text.contains(part.as_ref()) {
                text.push_str(": ");
                text.push_str(&part);
            }
            depth += 1;
            // Our errors and the redis crate's print their own causes: stop there.
            if depth >= 4 || c.is::<RedisError>() || c.is::<Error>() {
                break;
            }
            cause = c.source();
        }
        if let Some(g) = self.0.generation {
            text.push_str(&format!(" (client generation {g})"));
        }
        f.write_str(&bounded(&text, DISPLAY_TOTAL))
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.0
            .source
            .as_deref()
            .map(|s| s as &(dyn StdError + 'static))
    }
}

impl Error {
    /// This error as the redis crate's, for callers that go through the redis crate's own
    /// interfaces (the [`Client`](crate::Client) as a `redis::aio::ConnectionLike`: typed
    /// commands, `Script`, `Pipeline::query_async`).
    ///
    /// * A reply the server sent goes as the server sent it when it tells the same story —
    ///   a command the server rejected (`WRONGTYPE`, `NOSCRIPT`, a script error), or a refusal
    ///   (`CLUSTERDOWN`, `TRYAGAIN`, …) that nothing may have run behind — so code that
    ///   matches on its kind or code works: `redis::Script` loads a script again after
    ///   `NOSCRIPT`.
    /// * Everything else — timeouts, lost connections, an unreachable cluster, a command
    ///   refused before it was sent, a shard that kept redirecting (`MasterDown`), a refusal
    ///   after an attempt that may have applied (`Sent::Maybe`) — is an I/O error that carries
    ///   this error whole, [`Sent`] and cause included: get it back with [`Error::of_redis`]. Its I/O kind says what it is to the redis crate (`TimedOut` for
    ///   `Timeout`, so `is_timeout()` holds; `ConnectionReset` for `Connection`, `NotConnected`
    ///   for `Unreachable` and `Closed`, `Unsupported`, `InvalidInput` for `Config`).
    ///
    /// ```
    /// use tower_redis_cluster::{Error, ErrorKind, Sent};
    ///
    /// let error = Error::timeout("no reply").with_sent(Sent::Maybe);
    /// let redis_error = error.into_redis();
    /// assert!(redis_error.is_timeout());
    /// let back = Error::of_redis(&redis_error).unwrap();
    /// assert_eq!((back.kind(), back.sent()), (ErrorKind::Timeout, Sent::Maybe));
    /// // `?` from a redis result into this crate's error gives it back whole too.
    /// let again = Error::from(redis_error);
    /// assert_eq!((again.kind(), again.sent()), (ErrorKind::Timeout, Sent::Maybe));
    /// ```
    pub fn into_redis(self) -> RedisError {
        if let Some(server) = self
            .redis_error()
            .filter(|e| e.code().is_some() || (*e).clone().into_server_errors().is_some())
        {
            // As the server sent it only when that tells the same story: a rejected command
            // (its code is what callers match on; read again it says `Maybe`, never less), or
            // a reply that reads again as this error's kind and `Sent`. A `Sent::Maybe` the
            // stack worked out (a multi-slot command, a retry after an attempt that may have
            // applied) or a kind it worked out (`MasterDown` from redirects) must survive.
            if self.kind() == ErrorKind::Command
                || classify_redis(server) == (self.kind(), self.sent())
            {
                return server.clone();
            }
        }
        let io_kind = match self.kind() {
            ErrorKind::Timeout => std::io::ErrorKind::TimedOut,
            ErrorKind::Connection => std::io::ErrorKind::ConnectionReset,
            ErrorKind::Unreachable | ErrorKind::ShardDown | ErrorKind::Closed => {
                std::io::ErrorKind::NotConnected
            }
            ErrorKind::Unsupported => std::io::ErrorKind::Unsupported,
            ErrorKind::Config => std::io::ErrorKind::InvalidInput,
            _ => std::io::ErrorKind::Other,
        };
        RedisError::from(std::io::Error::new(io_kind, self))
    }

    /// The error behind a redis error made by [`Error::into_redis`]: what a caller of the
    /// [`Client`](crate::Client) through the redis crate's interfaces reads [`Sent`] and
    /// [`ErrorKind`] from. `None` for an error the server sent (its kind and code are in the
    /// redis error itself).
    pub fn of_redis(error: &RedisError) -> Option<&Error> {
        let source = StdError::source(error)?;
        // The redis crate keeps the I/O error behind an `Arc` and hands out the `Arc` itself.
        let io = match source.downcast_ref::<Arc<dyn StdError + Send + Sync>>() {
            Some(shared) => shared.downcast_ref::<std::io::Error>(),
            None => source.downcast_ref::<std::io::Error>(),
        }?;
        io.get_ref()?.downcast_ref::<Error>()
    }
}

impl From<RedisError> for Error {
    fn from(err: RedisError) -> Self {
        Error::from_redis(err)
    }
}

impl From<tower::timeout::error::Elapsed> for Error {
    fn from(_: tower::timeout::error::Elapsed) -> Self {
        Error::timeout("the call did not finish within its deadline")
    }
}

/// Converts the boxed error of generic tower middleware (`Timeout`, `Buffer`, ...) back into
/// an [`Error`], keeping ours as they are.
impl From<tower::BoxError> for Error {
    fn from(err: tower::BoxError) -> Self {
        match err.downcast::<Error>() {
            Ok(e) => *e,
            Err(err) => match err.downcast::<tower::timeout::error::Elapsed>() {
                Ok(_) => Error::timeout("the call did not finish within its deadline"),
                Err(err) => match err.downcast::<RedisError>() {
                    Ok(e) => Error::from_redis(*e),
                    Err(other) => Error(Box::new(Inner {
                        kind: ErrorKind::Closed,
                        sent: Sent::Maybe,
                        generation: None,
                        message: Some(Arc::from("a middleware failed")),
                        source: Some(Arc::from(other)),
                        detached: false,
                        retry_at: None,
                    })),
                },
            },
        }
    }
}

/// What a caught panic said, for the error that reports it.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

/// The kind of one server error reply.
fn classify_server(err: &redis::ServerError) -> ErrorKind {
    match err.kind() {
        Some(kind) => classify_server_kind(kind, err.details()),
        None => classify_extension_code(err.code()),
    }
}

fn classify_server_kind(kind: ServerErrorKind, detail: Option<&str>) -> ErrorKind {
    match kind {
        ServerErrorKind::Moved => ErrorKind::Moved,
        ServerErrorKind::Ask => ErrorKind::Ask,
        ServerErrorKind::TryAgain => ErrorKind::TryAgain,
        ServerErrorKind::ClusterDown => ErrorKind::ClusterDown,
        ServerErrorKind::BusyLoading => ErrorKind::Loading,
        ServerErrorKind::MasterDown => ErrorKind::MasterDown,
        ServerErrorKind::ReadOnly => ErrorKind::ReadOnly,
        ServerErrorKind::NoPerm => ErrorKind::Auth,
        ServerErrorKind::ResponseError => match detail {
            // Redis 6 answers a wrong password with a plain ERR.
            Some(d) if d.starts_with("invalid password") => ErrorKind::Auth,
            // A seed that is a standalone server: no retry or rebuild makes it a cluster.
            Some(d) if d.contains("cluster support disabled") => ErrorKind::Config,
            _ => ErrorKind::Command,
        },
        _ => ErrorKind::Command,
    }
}

/// Codes that servers send but the `redis` crate does not know by name.
fn classify_extension_code(code: &str) -> ErrorKind {
    match code {
        "NOAUTH" | "WRONGPASS" | "NOPERM" => ErrorKind::Auth,
        "MOVED" => ErrorKind::Moved,
        "ASK" => ErrorKind::Ask,
        "TRYAGAIN" => ErrorKind::TryAgain,
        "CLUSTERDOWN" => ErrorKind::ClusterDown,
        "LOADING" => ErrorKind::Loading,
        "MASTERDOWN" => ErrorKind::MasterDown,
        "READONLY" => ErrorKind::ReadOnly,
        _ => ErrorKind::Command,
    }
}

fn classify_redis(err: &RedisError) -> (ErrorKind, Sent) {
    use redis::ErrorKind as K;
    match err.kind() {
        // A server answered with an error: it parsed the command and decided not to (or could
        // not) execute it, so nothing was applied — except for command errors raised by a
        // script or transaction midway, which are never retried anyway.
        K::Server(server) => {
            let kind = classify_server_kind(server, err.detail());
            let sent = if kind == ErrorKind::Command {
                Sent::Maybe
            } else {
                Sent::No
            };
            (kind, sent)
        }
        K::Extension => {
            let kind = match err.code() {
                // A master that becomes a replica (a failover demoting it) unblocks its blocked
                // clients: the command popped nothing and belongs on the new master. (Not the
                // `UNBLOCKED` of `CLIENT UNBLOCK … ERROR`, which someone asked for.)
                Some("UNBLOCKED")
                    if err
                        .detail()
                        .is_some_and(|d| d.contains("instance state changed")) =>
                {
                    ErrorKind::ReadOnly
                }
                Some(code) => classify_extension_code(code),
                None => ErrorKind::Command,
            };
            let sent = if kind == ErrorKind::Command {
                Sent::Maybe
            } else {
                Sent::No
            };
            (kind, sent)
        }
        K::AuthenticationFailed => (ErrorKind::Auth, Sent::No),
        K::InvalidClientConfig | K::RESP3NotSupported => (ErrorKind::Config, Sent::No),
        // The cluster client has no connection for the slot and could not make one: the failure
        // of redis-py #2472. Nothing was written.
        K::ClusterConnectionNotFound => (ErrorKind::Unreachable, Sent::No),
        K::Io => classify_io(err),
        // A reply that cannot be parsed means the stream is out of step; the command was sent.
        K::Parse => (ErrorKind::Connection, Sent::Maybe),
        K::UnexpectedReturnType => (ErrorKind::Conversion, Sent::Maybe),
        // `Client` covers caller mistakes (empty command) and TLS failures; the latter carry a
        // source and happen while connecting, before any command is written.
        K::Client => {
            if is_tls_failure(&err.to_string()) {
                (ErrorKind::Tls, Sent::No)
            } else if StdError::source(err).is_some() {
                (ErrorKind::Connection, Sent::No)
            } else {
                (ErrorKind::Command, Sent::No)
            }
        }
        _ => (ErrorKind::Command, Sent::Maybe),
    }
}

/// rustls failures reach us flattened into I/O or client errors, so they are recognised by
/// their text (the redis crate keeps the inner error behind an `Arc<dyn Error>`).
fn is_tls_failure(text: &str) -> bool {
    const MARKERS: [&str; 7] = [
        "invalid peer certificate",
        "InvalidCertificate",
        "UnknownIssuer",
        "NotValidForName",
        "received fatal alert",
        "HandshakeFailure",
        "certificate verify failed",
    ];
    MARKERS.iter().any(|m| text.contains(m))
}

fn classify_io(err: &RedisError) -> (ErrorKind, Sent) {
    let text = err.to_string();
    // Checked first: "every initial node failed" because of a certificate is a TLS problem,
    // not an unreachable cluster.
    if is_tls_failure(&text) {
        return (ErrorKind::Tls, Sent::No);
    }
    // Likewise a refused login: retrying it until the deadline would only hide the cause.
    if ["AuthenticationFailed", "WRONGPASS", "NOAUTH", "NOPERM"]
        .iter()
        .any(|m| text.contains(m))
    {
        return (ErrorKind::Auth, Sent::No);
    }
    // The cluster client reports "every initial node failed" as a generic I/O error; it is the
    // unreachable-cluster condition, and the detail names the last node's failure.
    if err
        .to_string()
        .starts_with("Failed to create initial connections")
    {
        return (ErrorKind::Unreachable, Sent::No);
    }
    // The redis crate wraps the io::Error behind an `Arc<dyn Error>`, which hides it from
    // `downcast_ref`; its own predicates see through that.
    if err.is_timeout() {
        (ErrorKind::Timeout, Sent::Maybe)
    } else if err.is_connection_refusal() {
        // The connection was never established, so the command cannot have been written.
        (ErrorKind::Connection, Sent::No)
    } else {
        (ErrorKind::Connection, Sent::Maybe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    fn server_reply(raw: &[u8]) -> RedisError {
        redis::parse_redis_value(raw)
            .expect("valid RESP")
            .extract_error()
            .expect_err("an error reply")
    }

    #[test]
    fn sent_survives_a_round_trip_through_the_redis_error_type() {
        // A refusal the server sent, which the stack knows may have run elsewhere (a multi-slot
        // command, or a retry after an attempt that may have applied): `Maybe` must come back.
        let maybe = Error::from_redis(server_reply(b"-CLUSTERDOWN The cluster is down\r\n"))
            .with_sent(Sent::Maybe);
        let back = Error::from(maybe.into_redis());
        assert_eq!(
            (back.kind(), back.sent()),
            (ErrorKind::ClusterDown, Sent::Maybe)
        );
        // Told as the server sent it when that says the same: code-matching callers keep
        // working (`redis::Script` reloads after `NOSCRIPT`).
        let noscript = Error::from_redis(server_reply(b"-NOSCRIPT No matching script\r\n"))
            .with_sent(Sent::No)
            .into_redis();
        assert_eq!(noscript.code(), Some("NOSCRIPT"));
        let refused = Error::from_redis(server_reply(b"-TRYAGAIN Multiple keys\r\n")).into_redis();
        assert_eq!(refused.code(), Some("TRYAGAIN"));
        assert_eq!(Error::from(refused).sent(), Sent::No);
    }

    #[test]
    fn server_replies_are_classified_by_code() {
        let cases: &[(&[u8], ErrorKind, Sent)] = &[
            (
                b"-MOVED 3999 127.0.0.1:6381\r\n",
                ErrorKind::Moved,
                Sent::No,
            ),
            (b"-ASK 3999 127.0.0.1:6381\r\n", ErrorKind::Ask, Sent::No),
            (
                b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n",
                ErrorKind::TryAgain,
                Sent::No,
            ),
            (
                b"-CLUSTERDOWN The cluster is down\r\n",
                ErrorKind::ClusterDown,
                Sent::No,
            ),
            (
                b"-LOADING Redis is loading the dataset in memory\r\n",
                ErrorKind::Loading,
                Sent::No,
            ),
            (
                b"-MASTERDOWN Link with MASTER is down\r\n",
                ErrorKind::MasterDown,
                Sent::No,
            ),
            (
                b"-READONLY You can't write against a read only replica.\r\n",
                ErrorKind::ReadOnly,
                Sent::No,
            ),
            (
                b"-UNBLOCKED force unblock from blocking operation, instance state changed (master -> replica?)\r\n",
                ErrorKind::ReadOnly,
                Sent::No,
            ),
            (
                b"-UNBLOCKED client unblocked via CLIENT UNBLOCK\r\n",
                ErrorKind::Command,
                Sent::Maybe,
            ),
            (
                b"-NOAUTH Authentication required.\r\n",
                ErrorKind::Auth,
                Sent::No,
            ),
            (
                b"-WRONGPASS invalid username-password pair or user is disabled.\r\n",
                ErrorKind::Auth,
                Sent::No,
            ),
            (
                b"-NOPERM this user has no permissions to run the 'set' command\r\n",
                ErrorKind::Auth,
                Sent::No,
            ),
            (
                b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
                ErrorKind::Command,
                Sent::Maybe,
            ),
            (
                b"-ERR unknown command 'FOO'\r\n",
                ErrorKind::Command,
                Sent::Maybe,
            ),
            (
                b"-CROSSSLOT Keys in request don't hash to the same slot\r\n",
                ErrorKind::Command,
                Sent::Maybe,
            ),
            (
                b"-BUSYGROUP Consumer Group name already exists\r\n",
                ErrorKind::Command,
                Sent::Maybe,
            ),
        ];
        for (raw, kind, sent) in cases {
            let e = Error::from_redis(server_reply(raw));
            assert_eq!(
                (e.kind(), e.sent()),
                (*kind, *sent),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn redirect_target_is_exposed() {
        let e = Error::from_redis(server_reply(b"-MOVED 3999 10.0.0.7:6379\r\n"));
        assert_eq!(e.redirect(), Some((3999, "10.0.0.7:6379".to_string())));
        assert_eq!(e.server_code().as_deref(), Some("MOVED"));
        assert!(e.kind().is_redirect());
    }

    #[test]
    fn io_errors_split_into_refused_timeout_and_dropped() {
        let refused = Error::from(RedisError::from(io::Error::from(
            io::ErrorKind::ConnectionRefused,
        )));
        assert_eq!(
            (refused.kind(), refused.sent()),
            (ErrorKind::Connection, Sent::No)
        );

        let reset = Error::from(RedisError::from(io::Error::from(
            io::ErrorKind::ConnectionReset,
        )));
        assert_eq!(
            (reset.kind(), reset.sent()),
            (ErrorKind::Connection, Sent::Maybe)
        );

        let timed_out = Error::from(RedisError::from(io::Error::from(io::ErrorKind::TimedOut)));
        assert_eq!(
            (timed_out.kind(), timed_out.sent()),
            (ErrorKind::Timeout, Sent::Maybe)
        );
    }

    #[test]
    fn cluster_client_unreachable_messages() {
        let none = Error::from(RedisError::from((
            redis::ErrorKind::ClusterConnectionNotFound,
            "No connections found",
        )));
        assert_eq!(
            (none.kind(), none.sent()),
            (ErrorKind::Unreachable, Sent::No)
        );

        let initial = Error::from(RedisError::from((
            redis::ErrorKind::Io,
            "Failed to create initial connections",
            "Connection refused (os error 111)".to_string(),
        )));
        assert_eq!(initial.kind(), ErrorKind::Unreachable);
        // The root cause must survive into the message a user logs.
        assert!(initial.to_string().contains("os error 111"), "{initial}");
    }

    #[test]
    fn display_shows_kind_message_cause_and_generation() {
        let e = Error::new(
            ErrorKind::Connection,
            "connecting to clustercfg.example:6379",
        )
        .with_source(io::Error::other("failed to lookup address information"))
        .with_generation(3);
        let text = e.to_string();
        assert!(text.starts_with("connection failed: connecting to clustercfg.example:6379"));
        assert!(
            text.contains("failed to lookup address information"),
            "{text}"
        );
        assert!(text.ends_with("(client generation 3)"), "{text}");
        assert!(e.source().is_some());
        assert_eq!(e.generation(), Some(3));
    }

    #[test]
    fn own_errors_default_sent_by_kind() {
        assert_eq!(Error::unreachable("x").sent(), Sent::No);
        assert_eq!(Error::config("x").sent(), Sent::No);
        assert_eq!(Error::closed("x").sent(), Sent::No);
        assert_eq!(Error::timeout("x").sent(), Sent::Maybe);
        assert_eq!(Error::timeout("x").with_sent(Sent::No).sent(), Sent::No);
    }

    #[test]
    fn box_error_round_trips() {
        let original = Error::unreachable("no seed answered").with_generation(7);
        let boxed: tower::BoxError = Box::new(original);
        let back = Error::from(boxed);
        assert_eq!(back.kind(), ErrorKind::Unreachable);
        assert_eq!(back.generation(), Some(7));

        let elapsed: tower::BoxError = Box::new(tower::timeout::error::Elapsed::new());
        assert_eq!(Error::from(elapsed).kind(), ErrorKind::Timeout);
    }

    #[test]
    fn tls_failures_are_their_own_kind_even_inside_initial_connection_errors() {
        let initial = Error::from(RedisError::from((
            redis::ErrorKind::Io,
            "Failed to create initial connections",
            "invalid peer certificate: UnknownIssuer".to_string(),
        )));
        assert_eq!((initial.kind(), initial.sent()), (ErrorKind::Tls, Sent::No));
        assert!(!ErrorKind::Tls.is_transient());
        let login = Error::from(RedisError::from((
            redis::ErrorKind::Io,
            "Failed to create initial connections",
            "Io: Password authentication failed - AuthenticationFailed".to_string(),
        )));
        assert_eq!((login.kind(), login.sent()), (ErrorKind::Auth, Sent::No));
    }

    #[test]
    fn nested_errors_print_each_cause_once() {
        let root = Error::from(RedisError::from(io::Error::from(
            io::ErrorKind::ConnectionRefused,
        )));
        let root_text = root.redis_error().unwrap().to_string();
        let outer = Error::unreachable("no inner client could serve").with_source(root);
        let text = outer.to_string();
        assert_eq!(text.matches(&root_text).count(), 1, "{text}");
        let twice = Error::timeout("the call did not finish").with_source(outer);
        let text = twice.to_string();
        assert_eq!(text.matches(&root_text).count(), 1, "{text}");
    }

    #[test]
    fn display_is_bounded_whatever_the_message() {
        let huge = "h".repeat(1 << 20);
        let e = Error::config(format!("seed {huge:?} is not a host name"))
            .with_source(io::Error::other(huge.clone()));
        let text = e.to_string();
        assert!(text.len() < 4 * DISPLAY_TOTAL, "{} bytes", text.len());
        assert!(text.contains("more bytes"), "says it was cut");
        // Multi-byte characters are cut at a boundary.
        let wide = Error::config("é".repeat(10_000)).to_string();
        assert!(wide.len() < 4 * DISPLAY_TOTAL);
    }

    #[test]
    fn a_standalone_server_as_seed_is_a_config_error() {
        let e = Error::from_redis(server_reply(
            b"-ERR This instance has cluster support disabled\r\n",
        ));
        assert_eq!((e.kind(), e.sent()), (ErrorKind::Config, Sent::No));
        assert!(e.to_string().contains("cluster support disabled"), "{e}");
    }

    #[test]
    fn transient_kinds() {
        assert!(ErrorKind::ClusterDown.is_transient());
        assert!(ErrorKind::Unreachable.is_transient());
        assert!(!ErrorKind::Command.is_transient());
        assert!(!ErrorKind::Conversion.is_transient());
        assert!(!ErrorKind::Auth.is_transient());
        assert!(!ErrorKind::Config.is_transient());
    }

    #[test]
    fn error_is_send_sync_clone() {
        fn assert_traits<T: Send + Sync + Clone + 'static>() {}
        assert_traits::<Error>();
    }
}
