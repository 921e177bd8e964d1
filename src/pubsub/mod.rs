//! Subscriptions that follow the cluster: [`Subscriber`].
//!
//! Pub/sub state lives on connections, so a failover, a slot move or a node replaced at a new
//! IP ends subscriptions that no reply error ever reports. A [`Subscriber`] keeps the
//! subscriptions you asked for as its own state and re-establishes each on the right node
//! whenever its connection is lost, the server unsubscribes it (`SUNSUBSCRIBE` after a slot
//! move or a demotion), or the topology says its node is gone:
//!
//! - channels (`SUBSCRIBE`) and patterns (`PSUBSCRIBE`) on one connection to any node — the
//!   cluster delivers every `PUBLISH` to every node — moved to another node as soon as that one
//!   is lost, without waiting for a failover;
//! - sharded channels (`SSUBSCRIBE`) on the master that owns their slot, grouped per master.
//!
//! **Gaps are never silent.** Messages published while a subscription is down are not
//! delivered by Redis later, so the stream says when that may have happened:
//! [`Event::Lost`] when a subscription stops (with the cause), [`Event::Resubscribed`] when it
//! is back (with how long it was down); an application that must not miss an update re-reads
//! its state at `Resubscribed`. No message of a subscription comes between its `Lost` and its
//! `Resubscribed`: the first ones the new connection receives wait until the stream has said
//! it is back. Around a resubscription, a message may also come **twice**: the
//! cluster forwards each `PUBLISH` from the node that took it to every other node, and the new
//! node may still be receiving a message the old one had already delivered. Between a
//! `Resubscribed` and the next `Lost`, each message comes once; a subscription's messages taken
//! by one node come in the order that node took them (two publishes taken by two nodes race, as in Redis). Redis
//! itself loses a `PUBLISH` that a node accepted just before it crashed, before forwarding it to
//! the others: no subscriber on another node can hear of that one.
//!
//! A consumer slower than the publishers does not grow memory
//! without bound: at most [`SubscriberConfig::buffer`] messages wait; newer ones are dropped and
//! counted in one [`Event::Overflow`] at the place they would have been.
//!
//! ```no_run
//! use futures_util::StreamExt;
//! use tower_redis_cluster::{pubsub::Event, Client, Error};
//!
//! # async fn run() -> Result<(), Error> {
//! let client = Client::builder().seed("redis://clustercfg.example.com:6379").build().await?;
//! let mut subscriber = client.subscriber()?;
//! subscriber.subscribe(["news"]).await?;
//! subscriber.ssubscribe(["orders:{eu}"]).await?;
//! while let Some(event) = subscriber.next().await {
//!     match event {
//!         Event::Message(message) => println!("{:?}", message.payload_str()),
//!         Event::Resubscribed { names, gap, .. } => {
//!             println!("back on {} channel(s) after {gap:?}: re-read what they carry", names.len())
//!         }
//!         other => println!("{other:?}"),
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Dropping the [`Subscriber`] closes its connections and ends its task.

mod driver;
mod outbox;

use std::{
    fmt,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures_util::Stream;
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    connect::Endpoint,
    topology::{TopologySnapshot, TopologySource},
    Error,
};
use outbox::Outbox;

/// Which kind of subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `SUBSCRIBE`: a channel, delivered by every node.
    Channel,
    /// `PSUBSCRIBE`: a glob-style pattern of channels, delivered by every node.
    Pattern,
    /// `SSUBSCRIBE`: a sharded channel, delivered by the nodes of the shard owning its slot.
    Sharded,
}

impl Kind {
    fn subscribe(self) -> &'static str {
        match self {
            Kind::Channel => "SUBSCRIBE",
            Kind::Pattern => "PSUBSCRIBE",
            Kind::Sharded => "SSUBSCRIBE",
        }
    }

    fn unsubscribe(self) -> &'static str {
        match self {
            Kind::Channel => "UNSUBSCRIBE",
            Kind::Pattern => "PUNSUBSCRIBE",
            Kind::Sharded => "SUNSUBSCRIBE",
        }
    }

    /// The name used in tracing and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Channel => "channel",
            Kind::Pattern => "pattern",
            Kind::Sharded => "sharded",
        }
    }
}

/// One published message.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Message {
    /// How it was subscribed to.
    pub kind: Kind,
    /// The channel it was published on.
    pub channel: Vec<u8>,
    /// The pattern that matched, for [`Kind::Pattern`].
    pub pattern: Option<Vec<u8>>,
    /// What was published.
    pub payload: Vec<u8>,
}

impl Message {
    /// The channel, when it is UTF-8.
    pub fn channel_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.channel).ok()
    }

    /// The payload, when it is UTF-8.
    pub fn payload_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.payload).ok()
    }
}

impl fmt::Debug for Message {
    // Payloads can be large or sensitive: their length, not their bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Message");
        d.field("kind", &self.kind)
            .field("channel", &String::from_utf8_lossy(&self.channel));
        if let Some(p) = &self.pattern {
            d.field("pattern", &String::from_utf8_lossy(p));
        }
        d.field("payload_len", &self.payload.len()).finish()
    }
}

/// What a [`Subscriber`] yields.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// A message.
    Message(Message),
    /// These subscriptions stopped: from now until their [`Resubscribed`](Event::Resubscribed),
    /// messages published on them may be missed. The subscriber is re-establishing them.
    Lost {
        /// Their kind.
        kind: Kind,
        /// The channels or patterns.
        names: Vec<Vec<u8>>,
        /// Why: the connection closed, a health check timed out, the server unsubscribed them
        /// (their slot moved), the node left the cluster.
        cause: Error,
    },
    /// These subscriptions, lost before, are established again, on `node`. Messages published
    /// during the `gap` — from when the loss was noticed, and for a short while before — may
    /// have been missed: re-read whatever state they carry. Messages published just before
    /// the loss may come again after this event.
    Resubscribed {
        /// Their kind.
        kind: Kind,
        /// The channels or patterns.
        names: Vec<Vec<u8>>,
        /// The node they are on now.
        node: Endpoint,
        /// How long the longest of them was down, from when its loss was noticed.
        gap: Duration,
    },
    /// The consumer fell behind: `dropped` messages arrived while the buffer was full and were
    /// discarded, here in the sequence (subscription events that piled up behind the last
    /// waiting message are merged, and come after it).
    Overflow {
        /// How many.
        dropped: u64,
    },
}

/// How a [`Subscriber`] behaves.
#[derive(Clone)]
#[non_exhaustive]
pub struct SubscriberConfig {
    /// Messages that may wait for the consumer; beyond it, newer messages are dropped and
    /// reported as one [`Event::Overflow`]. Default 1024.
    pub buffer: usize,
    /// How often each connection is checked with a `PING`, so a node whose address swallows
    /// packets (a replaced cloud node's) is noticed; default 1 s.
    pub ping_interval: Duration,
    /// How long a `PING` may take before its connection counts as lost; default 1 s.
    pub ping_timeout: Duration,
    /// How long [`Subscriber::subscribe`] (and its kin) waits for the server's confirmation
    /// before it fails and withdraws the subscriptions it could not establish, and how long
    /// one batch of subscribe commands may take before its connection counts as lost;
    /// default 5 s. A refusal that will not pass by itself (`NOPERM`, …) fails the call at
    /// once.
    pub subscribe_timeout: Duration,
    /// While a subscription cannot be re-established (its master is down, its slot is
    /// moving), the topology is read again after a delay growing from this floor…; default
    /// 50 ms.
    pub retry_floor: Duration,
    /// …up to this cap, with full jitter; default 300 ms. It bounds how long after the cluster
    /// serves again a subscription comes back.
    pub retry_cap: Duration,
    /// The topology is also read this often (±10 %) while there are subscriptions, so the
    /// nodes known stay current across replacements — unless the subscriber follows a
    /// client's topology refreshes, which do that already; default 15 s.
    pub refresh_every: Duration,
    /// The `client` label of the metrics; default `default`, or the client's name for a
    /// subscriber made by [`Client::subscriber`](crate::Client::subscriber).
    pub client_name: String,
}

impl Default for SubscriberConfig {
    fn default() -> Self {
        SubscriberConfig {
            buffer: 1024,
            ping_interval: Duration::from_secs(1),
            ping_timeout: Duration::from_secs(1),
            subscribe_timeout: Duration::from_secs(5),
            retry_floor: Duration::from_millis(50),
            retry_cap: Duration::from_millis(300),
            refresh_every: Duration::from_secs(15),
            client_name: "default".to_string(),
        }
    }
}

impl fmt::Debug for SubscriberConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubscriberConfig")
            .field("buffer", &self.buffer)
            .field("ping_interval", &self.ping_interval)
            .field("ping_timeout", &self.ping_timeout)
            .field("subscribe_timeout", &self.subscribe_timeout)
            .field("retry", &(self.retry_floor..self.retry_cap))
            .field("refresh_every", &self.refresh_every)
            .finish_non_exhaustive()
    }
}

impl SubscriberConfig {
    /// Sets [`buffer`](Self::buffer).
    pub fn buffer(mut self, messages: usize) -> Self {
        self.buffer = messages;
        self
    }

    /// Sets [`ping_interval`](Self::ping_interval) and [`ping_timeout`](Self::ping_timeout).
    pub fn ping(mut self, interval: Duration, timeout: Duration) -> Self {
        self.ping_interval = interval;
        self.ping_timeout = timeout;
        self
    }

    /// Sets [`subscribe_timeout`](Self::subscribe_timeout).
    pub fn subscribe_timeout(mut self, timeout: Duration) -> Self {
        self.subscribe_timeout = timeout;
        self
    }

    /// Sets [`retry_floor`](Self::retry_floor) and [`retry_cap`](Self::retry_cap).
    pub fn retry(mut self, floor: Duration, cap: Duration) -> Self {
        self.retry_floor = floor;
        self.retry_cap = cap;
        self
    }

    /// Sets [`refresh_every`](Self::refresh_every).
    pub fn refresh_every(mut self, every: Duration) -> Self {
        self.refresh_every = every;
        self
    }

    /// Sets [`client_name`](Self::client_name).
    pub fn client_name(mut self, name: impl Into<String>) -> Self {
        self.client_name = name.into();
        self
    }

    fn validate(&self) -> Result<(), Error> {
        if self.buffer == 0 {
            return Err(Error::config(
                "a subscriber's buffer must hold at least one message",
            ));
        }
        for (what, d) in [
            ("ping_interval", self.ping_interval),
            ("ping_timeout", self.ping_timeout),
            ("subscribe_timeout", self.subscribe_timeout),
            ("refresh_every", self.refresh_every),
        ] {
            if d.is_zero() || d > driver::LONGEST {
                return Err(Error::config(format!(
                    "a subscriber's {what} must be greater than zero and at most {:?} ({d:?} given)",
                    driver::LONGEST
                )));
            }
        }
        if self.retry_cap > driver::LONGEST {
            return Err(Error::config(format!(
                "a subscriber's retry cap must be at most {:?}",
                driver::LONGEST
            )));
        }
        crate::backoff::JitteredBackoffMaker::new(self.retry_floor, self.retry_cap)
            .map(|_| ())
            .map_err(|e| e.context("a subscriber's retry delays"))
    }
}

/// A request from the handle to the task.
enum Request {
    Subscribe {
        kind: Kind,
        names: Vec<Vec<u8>>,
        done: oneshot::Sender<Result<(), Error>>,
    },
    Unsubscribe {
        kind: Kind,
        /// Empty: every subscription of the kind.
        names: Vec<Vec<u8>>,
        done: oneshot::Sender<Result<(), Error>>,
    },
}

/// Subscriptions to channels, patterns and sharded channels of a Redis Cluster that survive
/// failovers, slot moves and node replacements; a [`Stream`] of [`Event`]s. See the
/// [module docs](self).
///
/// Made by [`Client::subscriber`](crate::Client::subscriber) (same seeds, resolver, TLS and
/// credentials provider as the client, whose topology refreshes it also follows) or
/// [`Subscriber::new`]. Needs a Tokio runtime: it runs one task, which ends when it is dropped.
pub struct Subscriber {
    requests: mpsc::UnboundedSender<Request>,
    outbox: Arc<Outbox>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    /// A subscriber that finds the cluster's nodes through `source` (seeds, resolver, TLS,
    /// credentials and timeouts): usually
    /// [`ClusterConnector::topology_source`](crate::ClusterConnector::topology_source).
    pub fn new(source: TopologySource, config: SubscriberConfig) -> Result<Self, Error> {
        Subscriber::start(source, None, config)
    }

    pub(crate) fn start(
        source: TopologySource,
        topology: Option<watch::Receiver<Option<Arc<TopologySnapshot>>>>,
        config: SubscriberConfig,
    ) -> Result<Self, Error> {
        config.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::config("a Subscriber runs a task: make it inside a Tokio runtime")
        })?;
        let outbox = Arc::new(Outbox::new(config.buffer, &config.client_name));
        let (requests, receiver) = mpsc::unbounded_channel();
        let driver = driver::Driver::new(source, topology, config, receiver, outbox.clone());
        let task = runtime.spawn(driver.run());
        Ok(Subscriber {
            requests,
            outbox,
            task,
        })
    }

    /// Subscribes to `channels` (`SUBSCRIBE`). Returns once the server confirmed each, or
    /// fails — after [`SubscriberConfig::subscribe_timeout`] at the latest — with the
    /// subscriptions it could not establish withdrawn.
    pub async fn subscribe<I, N>(&self, channels: I) -> Result<(), Error>
    where
        I: IntoIterator<Item = N>,
        N: Into<Vec<u8>>,
    {
        self.change(Kind::Channel, channels, true).await
    }

    /// Subscribes to channels matching `patterns` (`PSUBSCRIBE`), as [`subscribe`](Self::subscribe).
    pub async fn psubscribe<I, N>(&self, patterns: I) -> Result<(), Error>
    where
        I: IntoIterator<Item = N>,
        N: Into<Vec<u8>>,
    {
        self.change(Kind::Pattern, patterns, true).await
    }

    /// Subscribes to sharded `channels` (`SSUBSCRIBE`) on the masters owning their slots, as
    /// [`subscribe`](Self::subscribe).
    pub async fn ssubscribe<I, N>(&self, channels: I) -> Result<(), Error>
    where
        I: IntoIterator<Item = N>,
        N: Into<Vec<u8>>,
    {
        self.change(Kind::Sharded, channels, true).await
    }

    /// Ends subscriptions to `channels`; none given: to every channel. Messages already
    /// received may still be yielded.
    pub async fn unsubscribe<I, N>(&self, channels: I) -> Result<(), Error>
    where
        I: IntoIterator<Item = N>,
        N: Into<Vec<u8>>,
    {
        self.change(Kind::Channel, channels, false).await
    }

    /// Ends pattern subscriptions, as [`unsubscribe`](Self::unsubscribe).
    pub async fn punsubscribe<I, N>(&self, patterns: I) -> Result<(), Error>
    where
        I: IntoIterator<Item = N>,
        N: Into<Vec<u8>>,
    {
        self.change(Kind::Pattern, patterns, false).await
    }

    /// Ends sharded subscriptions, as [`unsubscribe`](Self::unsubscribe).
    pub async fn sunsubscribe<I, N>(&self, channels: I) -> Result<(), Error>
    where
        I: IntoIterator<Item = N>,
        N: Into<Vec<u8>>,
    {
        self.change(Kind::Sharded, channels, false).await
    }

    async fn change<I, N>(&self, kind: Kind, names: I, subscribe: bool) -> Result<(), Error>
    where
        I: IntoIterator<Item = N>,
        N: Into<Vec<u8>>,
    {
        let names: Vec<Vec<u8>> = names.into_iter().map(Into::into).collect();
        if subscribe && names.is_empty() {
            return Err(Error::config(format!(
                "{} needs at least one name",
                kind.subscribe()
            )));
        }
        let (done, result) = oneshot::channel();
        let request = if subscribe {
            Request::Subscribe { kind, names, done }
        } else {
            Request::Unsubscribe { kind, names, done }
        };
        let closed = || Error::closed("the subscriber's task has ended");
        self.requests.send(request).map_err(|_| closed())?;
        result.await.map_err(|_| closed())?
    }
}

impl Stream for Subscriber {
    type Item = Event;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.outbox.poll_next(cx)
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        // The task owns the connections: ending it closes them.
        self.task.abort();
    }
}

impl fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscriber")
            .field("buffered", &self.outbox.len())
            .finish_non_exhaustive()
    }
}
