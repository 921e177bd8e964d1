//! The subscriber's task: the subscriptions wanted, the connections that carry them, and the
//! topology that says where each belongs.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::{future::BoxFuture, stream::FuturesUnordered, FutureExt, StreamExt};
use redis::{aio::MultiplexedConnection, PushInfo, PushKind, Value};
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::Instant,
};
use tower::util::rng::HasherRng;

use super::{outbox::Outbox, Event, Kind, Message, Request, SubscriberConfig};
use crate::{
    backoff::{JitteredBackoff, JitteredBackoffMaker},
    connect::{Endpoint, NodeConnector},
    topology::{NodeHealth, TopologySnapshot, TopologySource},
    Error, ErrorKind,
};

/// A subscription: its kind and name.
pub(super) type Key = (Kind, Vec<u8>);

/// Where a wanted subscription stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not on any connection; to be (re)established.
    Pending,
    /// Subscribe command number `attempt` is on connection `conn`, sent at `since`; the
    /// server's confirmation (a push) makes it active.
    Sending {
        conn: u64,
        attempt: u64,
        since: Instant,
    },
    /// Confirmed on connection `0`.
    Active(u64),
}

impl State {
    /// The connection it is on or on its way to.
    fn conn(self) -> Option<u64> {
        match self {
            State::Pending => None,
            State::Sending { conn, .. } | State::Active(conn) => Some(conn),
        }
    }
}

struct Sub {
    state: State,
    /// When it was noticed lost, if it was established before: its resubscription is a gap.
    lost_at: Option<Instant>,
    /// Not sent again before then (after a refusal).
    not_before: Option<Instant>,
}

/// How many subscribe commands one pipeline carries.
const BATCH: usize = 256;

/// The longest any configured duration may be: beyond it, instants would overflow.
pub(super) const LONGEST: Duration = Duration::from_secs(24 * 3600);

struct Conn {
    endpoint: Endpoint,
    handle: MultiplexedConnection,
    gate: Arc<Mutex<Gate>>,
    pinging: bool,
    next_ping: Instant,
}

/// What a connection's messages may do: go straight to the stream (the fast path, without
/// the task), wait, or be dropped. Shared by the connection's push callback and the task, so
/// the stream says `Resubscribed` before the first message of a new subscription and says
/// nothing of a subscription after its `Lost`.
#[derive(Default)]
struct Gate {
    /// The subscriptions active on this connection, as far as the stream is concerned, per
    /// kind (patterns by pattern).
    live: [HashSet<Vec<u8>>; 3],
    /// Per kind and name: confirmations the callback passed to the task that the task has not
    /// acted on yet. That subscription's messages wait behind them, in their order; the
    /// others' go on.
    confirming: [HashMap<Vec<u8>, usize>; 3],
    held: VecDeque<Message>,
    /// Messages that did not fit in `held` (as many as the stream's buffer), dropped.
    dropped: u64,
    /// The task gave the connection up: nothing it still receives is delivered.
    closed: bool,
}

impl Gate {
    fn lock(gate: &Mutex<Gate>) -> std::sync::MutexGuard<'_, Gate> {
        // Nothing panics while holding the lock; a poisoned one still holds valid sets.
        gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slot(kind: Kind) -> usize {
        match kind {
            Kind::Channel => 0,
            Kind::Pattern => 1,
            Kind::Sharded => 2,
        }
    }

    /// The subscription a message came by: its kind's slot and its name (the pattern, for a
    /// pattern's message).
    fn of(m: &Message) -> (usize, &[u8]) {
        (
            Self::slot(m.kind),
            m.pattern.as_deref().unwrap_or(&m.channel),
        )
    }

    fn unlive(&mut self, key: &Key) {
        self.live[Self::slot(key.0)].remove(&key.1);
    }

    /// The callback passes a confirmation of `key` to the task: its messages wait for it.
    fn confirming(&mut self, kind: Kind, name: &[u8]) {
        *self.confirming[Self::slot(kind)]
            .entry(name.to_vec())
            .or_default() += 1;
    }

    /// A message the connection received.
    fn deliver(&mut self, m: Message, outbox: &Outbox) {
        if self.closed {
            return;
        }
        let (slot, name) = Self::of(&m);
        if self.confirming[slot].contains_key(name) {
            if self.held.len() < outbox.capacity() {
                self.held.push_back(m);
            } else {
                self.dropped += 1;
            }
        } else if self.live[slot].contains(name) {
            outbox.message(m);
        }
    }

    /// The task acted on a confirmation of `key` and told the stream what it meant; `active`:
    /// whether the subscription is active on this connection now. Once no confirmation of it
    /// is left, its messages that waited go out (or are dropped, when it is not active).
    fn release(&mut self, key: &Key, active: bool, outbox: &Outbox) {
        let slot = Self::slot(key.0);
        if active && !self.closed {
            self.live[slot].insert(key.1.clone());
        }
        let Some(n) = self.confirming[slot].get_mut(&key.1) else {
            return;
        };
        *n -= 1;
        if *n > 0 {
            return;
        }
        self.confirming[slot].remove(&key.1);
        let live = !self.closed && self.live[slot].contains(&key.1);
        let mut rest = VecDeque::with_capacity(self.held.len());
        for m in self.held.drain(..) {
            let (s, name) = Self::of(&m);
            if s == slot && name == &key.1[..] {
                if live {
                    outbox.message(m);
                }
            } else {
                rest.push_back(m);
            }
        }
        self.held = rest;
        if self.confirming.iter().all(HashMap::is_empty) {
            outbox.dropped(std::mem::take(&mut self.dropped));
        }
    }

    fn close(&mut self, outbox: &Outbox) {
        self.closed = true;
        self.held.clear();
        self.live.iter_mut().for_each(HashSet::clear);
        self.confirming.iter_mut().for_each(HashMap::clear);
        outbox.dropped(std::mem::take(&mut self.dropped));
    }
}

/// A caller of `subscribe` waiting for its confirmations.
struct Waiter {
    remaining: HashSet<Key>,
    deadline: Instant,
    done: oneshot::Sender<Result<(), Error>>,
}

/// What the task's background work reports.
enum Op {
    Connected {
        id: u64,
        endpoint: Endpoint,
        gate: Arc<Mutex<Gate>>,
        result: Result<MultiplexedConnection, Error>,
    },
    Sent {
        conn: u64,
        keys: Vec<(Key, u64)>,
        result: Result<Vec<Value>, Error>,
    },
    Pinged {
        conn: u64,
        result: Result<(), Error>,
    },
    Fetched(Result<crate::topology::fetch::Fetched, Error>),
    /// Unsubscribe commands finished: their confirmations that will never come are not waited
    /// for.
    Unsubscribed {
        conn: u64,
        keys: Vec<Key>,
        result: Result<Vec<Value>, Error>,
    },
}

pub(super) struct Driver {
    config: SubscriberConfig,
    source: TopologySource,
    nodes: NodeConnector,
    /// The client's topology, when made from a client: adopted whenever it changes.
    shared: Option<watch::Receiver<Option<Arc<TopologySnapshot>>>>,
    requests: mpsc::UnboundedReceiver<Request>,
    control_tx: mpsc::UnboundedSender<(u64, PushInfo)>,
    control: mpsc::UnboundedReceiver<(u64, PushInfo)>,
    outbox: Arc<Outbox>,
    topology: Option<TopologySnapshot>,
    turn: u64,
    subs: HashMap<Key, Sub>,
    conns: HashMap<u64, Conn>,
    next_id: u64,
    connecting: HashSet<Endpoint>,
    /// Nodes not to connect to until then: their connection failed or was lost.
    avoid: HashMap<Endpoint, Instant>,
    /// Where channels and patterns go.
    global: Option<Endpoint>,
    ops: FuturesUnordered<BoxFuture<'static, Op>>,
    fetching: bool,
    fetch_wanted: bool,
    fetch_after: Instant,
    backoff_maker: JitteredBackoffMaker,
    /// Paces topology reads and resubscriptions while something fails; reset by success.
    backoff: JitteredBackoff,
    next_refresh: Instant,
    attempts: u64,
    waiters: Vec<Waiter>,
    /// Unsubscribe confirmations asked for, per connection and subscription.
    unsubscribing: HashMap<(u64, Key), usize>,
    /// Established again since the last flush: subscription, node, when lost.
    resubscribed: Vec<(Key, Endpoint, Instant)>,
    /// Lost since the last flush, with the cause.
    lost: Vec<(Key, Error)>,
    /// Confirmations acted on since the last flush, by connection and subscription: their
    /// gates let the messages behind them go after the flush.
    confirmed: Vec<(u64, Key)>,
    last_error: Option<Error>,
    rng: HasherRng,
    /// This subscriber's share of the client's subscriptions gauge.
    gauge: usize,
}

impl Driver {
    pub(super) fn new(
        source: TopologySource,
        shared: Option<watch::Receiver<Option<Arc<TopologySnapshot>>>>,
        config: SubscriberConfig,
        requests: mpsc::UnboundedReceiver<Request>,
        outbox: Arc<Outbox>,
    ) -> Self {
        let (control_tx, control) = mpsc::unbounded_channel();
        let backoff_maker = JitteredBackoffMaker::new(config.retry_floor, config.retry_cap)
            .expect("validated by the subscriber");
        let now = Instant::now();
        Driver {
            nodes: source.nodes(),
            source,
            shared,
            requests,
            control_tx,
            control,
            outbox,
            topology: None,
            turn: 0,
            subs: HashMap::new(),
            conns: HashMap::new(),
            next_id: 0,
            connecting: HashSet::new(),
            avoid: HashMap::new(),
            global: None,
            ops: FuturesUnordered::new(),
            fetching: false,
            fetch_wanted: false,
            fetch_after: now,
            backoff: backoff_maker.make(),
            backoff_maker,
            attempts: 0,
            next_refresh: now + config.refresh_every,
            waiters: Vec::new(),
            unsubscribing: HashMap::new(),
            resubscribed: Vec::new(),
            lost: Vec::new(),
            confirmed: Vec::new(),
            last_error: None,
            rng: HasherRng::default(),
            gauge: 0,
            config,
        }
    }

    pub(super) async fn run(mut self) {
        self.adopt_shared();
        loop {
            self.reconcile();
            self.finish_waiters();
            self.flush();
            self.release_gates();
            let wake = self.next_wake();
            tokio::select! {
                request = self.requests.recv() => match request {
                    Some(r) => self.request(r),
                    // The subscriber is gone: dropping the connections closes them.
                    None => return,
                },
                Some((conn, push)) = self.control.recv() => self.push(conn, push),
                Some(op) = self.ops.next(), if !self.ops.is_empty() => self.op(op),
                changed = changed(&mut self.shared) => {
                    if changed {
                        self.adopt_shared();
                    } else {
                        self.shared = None;
                    }
                }
                _ = tokio::time::sleep_until(wake) => self.tick(),
            }
        }
    }

    // ----- requests -----

    fn request(&mut self, request: Request) {
        match request {
            Request::Subscribe { kind, names, done } => {
                let mut remaining = HashSet::new();
                for name in names {
                    let key = (kind, name);
                    let sub = self.subs.entry(key.clone()).or_insert(Sub {
                        state: State::Pending,
                        lost_at: None,
                        not_before: None,
                    });
                    if !matches!(sub.state, State::Active(_)) {
                        remaining.insert(key);
                    }
                }
                self.update_gauge();
                if remaining.is_empty() {
                    let _ = done.send(Ok(()));
                } else {
                    self.waiters.push(Waiter {
                        remaining,
                        deadline: Instant::now() + self.config.subscribe_timeout,
                        done,
                    });
                }
            }
            Request::Unsubscribe { kind, names, done } => {
                let keys: Vec<Key> = if names.is_empty() {
                    self.subs.keys().filter(|k| k.0 == kind).cloned().collect()
                } else {
                    names.into_iter().map(|n| (kind, n)).collect()
                };
                let mut by_conn: HashMap<u64, Vec<Key>> = HashMap::new();
                for key in keys {
                    for w in &mut self.waiters {
                        w.remaining.remove(&key);
                    }
                    if let Some(sub) = self.subs.remove(&key) {
                        if let Some(c) = sub.state.conn() {
                            if let Some(conn) = self.conns.get(&c) {
                                Gate::lock(&conn.gate).unlive(&key);
                            }
                            by_conn.entry(c).or_default().push(key);
                        }
                    }
                }
                for (conn, keys) in by_conn {
                    self.send_unsubscribe(conn, keys);
                }
                self.update_gauge();
                self.finish_waiters();
                let _ = done.send(Ok(()));
            }
        }
    }

    fn send_unsubscribe(&mut self, conn: u64, keys: Vec<Key>) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.cmd(key.0.unsubscribe()).arg(&key.1[..]);
            *self.unsubscribing.entry((conn, key.clone())).or_default() += 1;
        }
        let mut handle = c.handle.clone();
        let bound = self.config.subscribe_timeout;
        self.ops.push(
            async move {
                let result = bounded(bound, &mut handle, &pipe, keys.len()).await;
                Op::Unsubscribed { conn, keys, result }
            }
            .boxed(),
        );
    }

    // ----- what the connections push -----

    fn push(&mut self, conn: u64, push: PushInfo) {
        if !self.conns.contains_key(&conn) {
            return;
        }
        let kind = match push.kind {
            PushKind::Disconnection => {
                let endpoint = self.conns[&conn].endpoint.clone();
                self.conn_lost(
                    conn,
                    Error::new(
                        ErrorKind::Connection,
                        format!("the subscription connection to {endpoint} closed"),
                    ),
                );
                return;
            }
            PushKind::Subscribe => return self.confirmed(conn, Kind::Channel, push.data),
            PushKind::PSubscribe => return self.confirmed(conn, Kind::Pattern, push.data),
            PushKind::SSubscribe => return self.confirmed(conn, Kind::Sharded, push.data),
            PushKind::Unsubscribe => Kind::Channel,
            PushKind::PUnsubscribe => Kind::Pattern,
            PushKind::SUnsubscribe => Kind::Sharded,
            _ => return,
        };
        let Some(Value::BulkString(name)) = push.data.into_iter().next() else {
            return;
        };
        let key = (kind, name);
        if let Some(n) = self.unsubscribing.get_mut(&(conn, key.clone())) {
            *n -= 1;
            if *n == 0 {
                self.unsubscribing.remove(&(conn, key));
            }
            return;
        }
        // Not asked for: the server ended it — its slot moved, or the node is a replica now.
        if self.subs.get(&key).and_then(|s| s.state.conn()) == Some(conn) {
            let endpoint = self.conns[&conn].endpoint.clone();
            let cause = Error::new(
                ErrorKind::Moved,
                format!(
                    "{endpoint} ended the subscription ({}): its slot is served elsewhere now",
                    kind.unsubscribe()
                ),
            );
            self.mark_lost(&key, cause);
            self.fetch_wanted = true;
        }
    }

    /// The server confirmed a subscription on `conn`. Read from the pushes rather than from
    /// the replies: the redis crate takes a subscription push the server sends unasked (a
    /// `SUNSUBSCRIBE` after a slot move) as the reply of whatever request is oldest, so replies
    /// can be shifted; the pushes of one connection come in the server's order.
    fn confirmed(&mut self, conn: u64, kind: Kind, data: Vec<Value>) {
        let Some(Value::BulkString(name)) = data.into_iter().next() else {
            return;
        };
        let key = (kind, name);
        let Some(endpoint) = self.conns.get(&conn).map(|c| c.endpoint.clone()) else {
            return;
        };
        // Whatever it means, the messages behind it may go once the stream has said so.
        self.confirmed.push((conn, key.clone()));
        // Confirmed by a node the topology read meanwhile no longer names as the owner of its
        // slot: move it now rather than at the next topology change.
        let elsewhere = key.0 == Kind::Sharded
            && self
                .topology
                .as_ref()
                .and_then(|t| owner(t, &key.1))
                .is_some_and(|o| *o != endpoint);
        match self.subs.get_mut(&key) {
            // Lost before, and confirmed where it no longer belongs: still lost (the stream
            // said so already), undone here and sent where it belongs.
            Some(sub)
                if elsewhere
                    && sub.lost_at.is_some()
                    && matches!(sub.state, State::Sending { conn: c, .. } if c == conn) =>
            {
                sub.state = State::Pending;
                sub.not_before = None;
                self.send_unsubscribe(conn, vec![key]);
            }
            Some(sub) if matches!(sub.state, State::Sending { conn: c, .. } if c == conn) => {
                sub.state = State::Active(conn);
                sub.not_before = None;
                if let Some(at) = sub.lost_at.take() {
                    self.resubscribed.push((key.clone(), endpoint.clone(), at));
                }
                for w in &mut self.waiters {
                    w.remaining.remove(&key);
                }
                if elsewhere {
                    // Its first confirmation: its caller is answered, and the stream says
                    // it is lost at once.
                    self.mark_lost(
                        &key,
                        Error::new(
                            ErrorKind::Moved,
                            format!("{endpoint} no longer owns the slot of the sharded channel"),
                        ),
                    );
                    self.send_unsubscribe(conn, vec![key]);
                    return;
                }
                if self
                    .subs
                    .values()
                    .all(|s| matches!(s.state, State::Active(_)))
                {
                    self.backoff = self.backoff_maker.make();
                }
            }
            Some(sub) if sub.state == State::Active(conn) => {}
            // Withdrawn meanwhile, or wanted elsewhere: undo it here, unless that is on its
            // way already.
            _ => {
                if !self.unsubscribing.contains_key(&(conn, key.clone())) {
                    self.send_unsubscribe(conn, vec![key]);
                }
            }
        }
    }

    // ----- background work -----

    fn op(&mut self, op: Op) {
        match op {
            Op::Connected {
                id,
                endpoint,
                gate,
                result,
            } => {
                self.connecting.remove(&endpoint);
                let present = self
                    .topology
                    .as_ref()
                    .is_none_or(|t| t.nodes().any(|n| n.endpoint == endpoint));
                let result = match result {
                    // The node left the cluster while the connection was being made (a
                    // replaced node's old address may still accept): nothing to carry there.
                    Ok(_) if !present => Err(Error::new(
                        ErrorKind::Connection,
                        format!("{endpoint} is no longer a node of the cluster"),
                    )),
                    other => other,
                };
                match result {
                    Ok(handle) => {
                        tracing::debug!(node = %endpoint, "subscription connection open");
                        self.avoid.remove(&endpoint);
                        self.conns.insert(
                            id,
                            Conn {
                                endpoint,
                                handle,
                                gate,
                                pinging: false,
                                next_ping: Instant::now() + self.config.ping_interval,
                            },
                        );
                    }
                    Err(e) => {
                        tracing::debug!(node = %endpoint, error = %e, "subscription connection failed");
                        self.node_failed(&endpoint, e);
                    }
                }
            }
            Op::Sent { conn, keys, result } => self.sent(conn, keys, result),
            Op::Pinged { conn, result } => match result {
                Ok(()) => {
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.pinging = false;
                        c.next_ping = Instant::now() + self.config.ping_interval;
                    }
                }
                Err(e) => self.conn_lost(conn, e),
            },
            Op::Fetched(result) => {
                self.fetching = false;
                match result {
                    Ok(fetched) => {
                        let sequence = self.topology.as_ref().map_or(0, |t| t.sequence) + 1;
                        self.set_topology(fetched.into_snapshot(sequence));
                        // While something still has no place, read again after a growing
                        // delay; the next loss is read at once.
                        let unplaced = self.subs.values().any(|s| s.state == State::Pending);
                        self.fetch_after = Instant::now()
                            + if unplaced {
                                self.backoff.next_delay()
                            } else {
                                Duration::ZERO
                            };
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "subscriber topology read failed");
                        self.last_error = Some(e);
                        self.fetch_wanted = true;
                        self.fetch_after = Instant::now() + self.backoff.next_delay();
                    }
                }
            }
            Op::Unsubscribed { conn, keys, result } => {
                let failed: Vec<Key> = match result {
                    Ok(replies) => keys
                        .into_iter()
                        .zip(replies)
                        .filter(|(_, r)| matches!(r, Value::ServerError(_)))
                        .map(|(k, _)| k)
                        .collect(),
                    // Unanswered: the connection is not to be trusted with what it carries.
                    Err(e)
                        if e.kind() == ErrorKind::Connection || e.kind() == ErrorKind::Timeout =>
                    {
                        return self.conn_lost(conn, e);
                    }
                    Err(_) => keys,
                };
                for key in failed {
                    let entry = (conn, key);
                    if let Some(n) = self.unsubscribing.get_mut(&entry) {
                        *n -= 1;
                        if *n == 0 {
                            self.unsubscribing.remove(&entry);
                        }
                    }
                }
            }
        }
    }

    /// A subscribe pipeline finished: confirmations come as pushes ([`confirmed`]); here,
    /// only refusals count.
    ///
    /// [`confirmed`]: Self::confirmed
    fn sent(&mut self, conn: u64, keys: Vec<(Key, u64)>, result: Result<Vec<Value>, Error>) {
        let replies = match result {
            Ok(replies) => replies,
            Err(e) if e.kind() == ErrorKind::Connection || e.kind() == ErrorKind::Timeout => {
                return self.conn_lost(conn, e);
            }
            // A refusal of the whole pipeline: each command refused alike.
            Err(e) => {
                let delay = self.backoff.next_delay();
                for (key, attempt) in keys {
                    self.refused(conn, key, attempt, e.clone(), delay);
                }
                return;
            }
        };
        // Replies can be shifted by a push the server sent unasked (see `confirmed`): act on
        // refusals only when every other reply confirms its own command. Otherwise the
        // commands not confirmed are sent again when their confirmation is overdue.
        let aligned = keys.len() == replies.len()
            && keys
                .iter()
                .zip(&replies)
                .all(|((key, _), reply)| match reply {
                    Value::ServerError(_) => true,
                    Value::Push { data, .. } => {
                        data.first() == Some(&Value::BulkString(key.1.clone()))
                    }
                    _ => false,
                });
        if !aligned {
            tracing::debug!(
                "subscribe replies out of step with their commands; refusals left to time out"
            );
            return;
        }
        let delay = self.backoff.next_delay();
        for ((key, attempt), reply) in keys.into_iter().zip(replies) {
            if let Value::ServerError(e) = reply {
                self.refused(
                    conn,
                    key,
                    attempt,
                    Error::from_redis(redis::RedisError::from(e)),
                    delay,
                );
            }
        }
    }

    /// The server refused subscribe command `attempt` of `key` on `conn`. A routing refusal
    /// (`MOVED`, `CLUSTERDOWN`, `TRYAGAIN`, …) means the topology changed: read it again and try
    /// after a growing delay. Any other (`NOPERM`, …) will not pass by itself: a first
    /// subscription fails its caller with it; one established before is tried again at the
    /// longest delay.
    fn refused(&mut self, conn: u64, key: Key, attempt: u64, error: Error, delay: Duration) {
        let Some(sub) = self.subs.get_mut(&key) else {
            return;
        };
        if !matches!(sub.state, State::Sending { conn: c, attempt: a, .. } if c == conn && a == attempt)
        {
            return;
        }
        let endpoint = self.conns.get(&conn).map(|c| c.endpoint.to_string());
        tracing::debug!(node = ?endpoint, kind = key.0.as_str(), error = %error, "subscribe refused");
        sub.state = State::Pending;
        let routing = matches!(
            error.kind(),
            ErrorKind::Moved
                | ErrorKind::Ask
                | ErrorKind::TryAgain
                | ErrorKind::ClusterDown
                | ErrorKind::MasterDown
                | ErrorKind::Loading
                | ErrorKind::ReadOnly
                | ErrorKind::Connection
                | ErrorKind::Timeout
        );
        let now = Instant::now();
        if routing {
            sub.not_before = Some(now + delay);
            self.fetch_wanted = true;
        } else if sub.lost_at.is_none() {
            // Never established: its callers hear why, and it is withdrawn.
            self.subs.remove(&key);
            let mut i = 0;
            while i < self.waiters.len() {
                if self.waiters[i].remaining.contains(&key) {
                    let w = self.waiters.swap_remove(i);
                    self.withdraw(&w.remaining);
                    let _ = w.done.send(Err(error.clone()));
                } else {
                    i += 1;
                }
            }
            self.update_gauge();
        } else {
            sub.not_before = Some(now + self.config.retry_cap);
        }
        self.last_error = Some(error);
    }

    // ----- losing things -----

    fn mark_lost(&mut self, key: &Key, cause: Error) {
        let Some(sub) = self.subs.get_mut(key) else {
            return;
        };
        match sub.state {
            State::Active(conn) => {
                // Nothing more of it from that connection: the stream is about to say `Lost`.
                if let Some(c) = self.conns.get(&conn) {
                    Gate::lock(&c.gate).unlive(key);
                }
                sub.lost_at = Some(Instant::now());
                self.lost.push((key.clone(), cause));
            }
            State::Sending { .. } => {}
            State::Pending => return,
        }
        sub.state = State::Pending;
        sub.not_before = None;
    }

    fn conn_lost(&mut self, conn: u64, cause: Error) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        Gate::lock(&c.gate).close(&self.outbox);
        tracing::debug!(node = %c.endpoint, error = %cause, "subscription connection lost");
        let keys: Vec<Key> = self
            .subs
            .iter()
            .filter(|(_, s)| s.state.conn() == Some(conn))
            .map(|(k, _)| k.clone())
            .collect();
        for key in &keys {
            self.mark_lost(key, cause.clone());
        }
        self.unsubscribing.retain(|(c, _), _| *c != conn);
        self.node_failed(&c.endpoint, cause);
    }

    /// A node could not be reached or stopped answering: avoid it for a while, and ask the
    /// cluster where things are now.
    fn node_failed(&mut self, endpoint: &Endpoint, cause: Error) {
        let pause = self.config.ping_interval.max(self.config.retry_cap);
        self.avoid.insert(endpoint.clone(), Instant::now() + pause);
        if self.global.as_ref() == Some(endpoint) {
            self.global = None;
        }
        self.last_error = Some(cause);
        self.fetch_wanted = true;
    }

    // ----- topology -----

    fn adopt_shared(&mut self) {
        let Some(shared) = &mut self.shared else {
            return;
        };
        let snapshot = shared.borrow_and_update().clone();
        if let Some(s) = snapshot {
            self.set_topology((*s).clone());
        }
    }

    fn set_topology(&mut self, snapshot: TopologySnapshot) {
        // Connections to nodes that left the cluster carry nothing any more (a node replaced
        // and forgotten may still accept connections: it no longer hears the cluster's
        // messages).
        // Nor do connections carrying channels or patterns to a node the cluster marks failed:
        // cut off from its peers, it may still answer PINGs but hears no PUBLISH.
        let present: HashMap<&Endpoint, NodeHealth> =
            snapshot.nodes().map(|n| (&n.endpoint, n.health)).collect();
        let carries_channels = |id: u64| {
            self.subs
                .iter()
                .any(|(k, s)| k.0 != Kind::Sharded && s.state.conn() == Some(id))
        };
        let gone: Vec<u64> = self
            .conns
            .iter()
            .filter(|(id, c)| match present.get(&c.endpoint) {
                None => true,
                Some(NodeHealth::Failed) => carries_channels(**id),
                Some(_) => false,
            })
            .map(|(id, _)| *id)
            .collect();
        if let Some(g) = &self.global {
            if present.get(g).is_none_or(|h| *h == NodeHealth::Failed) {
                self.global = None;
            }
        }
        // Sharded subscriptions on a node that no longer owns their slot: the server may not
        // have said so (a demoted master keeps its clients).
        let mut moved: Vec<(u64, Key)> = Vec::new();
        for (key, sub) in &self.subs {
            if let (Kind::Sharded, State::Active(c)) = (key.0, sub.state) {
                let owner = owner(&snapshot, &key.1);
                let here = self.conns.get(&c).map(|c| &c.endpoint);
                if owner.is_some() && here.is_some() && owner != here {
                    moved.push((c, key.clone()));
                }
            }
        }
        let failed: HashSet<u64> = gone
            .iter()
            .copied()
            .filter(|id| present.contains_key(&self.conns[id].endpoint))
            .collect();
        self.topology = Some(snapshot);
        for id in gone {
            let endpoint = self.conns[&id].endpoint.clone();
            let why = if failed.contains(&id) {
                "is marked failed by the cluster"
            } else {
                "is no longer a node of the cluster"
            };
            self.conn_lost(
                id,
                Error::new(ErrorKind::Connection, format!("{endpoint} {why}")),
            );
        }
        let mut by_conn: HashMap<u64, Vec<Key>> = HashMap::new();
        for (conn, key) in moved {
            // Its connection was to a node that left: lost with it already.
            let Some(endpoint) = self.conns.get(&conn).map(|c| c.endpoint.clone()) else {
                continue;
            };
            self.mark_lost(
                &key,
                Error::new(
                    ErrorKind::Moved,
                    format!("{endpoint} no longer owns the slot of the sharded channel"),
                ),
            );
            by_conn.entry(conn).or_default().push(key);
        }
        for (conn, keys) in by_conn {
            self.send_unsubscribe(conn, keys);
        }
    }

    fn start_fetch(&mut self) {
        self.fetching = true;
        self.fetch_wanted = false;
        self.turn += 1;
        let mut known = self
            .topology
            .as_ref()
            .map(|t| t.probe_order(self.turn))
            .unwrap_or_default();
        // Nodes known to be unreachable right now go last.
        let now = Instant::now();
        known.sort_by_key(|e| avoided(&self.avoid, e, now));
        let source = self.source.clone();
        self.ops
            .push(async move { Op::Fetched(source.fetch(&known).await) }.boxed());
    }

    /// Where channels and patterns go: the node already carrying them, else an online node —
    /// masters first — not failed lately.
    fn global_target(&mut self) -> Option<Endpoint> {
        if let Some(g) = &self.global {
            return Some(g.clone());
        }
        let topology = self.topology.as_ref()?;
        let now = Instant::now();
        let mut candidates: Vec<&Endpoint> = topology
            .shards
            .iter()
            .filter_map(|s| s.master.as_ref())
            .chain(topology.shards.iter().flat_map(|s| s.replicas.iter()))
            .filter(|n| n.health == NodeHealth::Online)
            .map(|n| &n.endpoint)
            .filter(|e| !avoided(&self.avoid, e, now))
            .collect();
        // A node a connection is open to already is cheapest.
        candidates.sort_by_key(|e| !self.conns.values().any(|c| &c.endpoint == *e));
        let pick = candidates.first().map(|e| (*e).clone())?;
        self.global = Some(pick.clone());
        Some(pick)
    }

    // ----- the loop's own work -----

    /// Puts every pending subscription on its way to where it belongs.
    fn reconcile(&mut self) {
        let now = Instant::now();
        if self.subs.values().any(|s| s.state == State::Pending) && self.topology.is_none() {
            self.fetch_wanted = true;
        }
        let pending: Vec<(Key, bool)> = self
            .subs
            .iter()
            .filter(|(_, s)| s.state == State::Pending)
            .map(|(k, s)| (k.clone(), s.not_before.is_none_or(|t| t <= now)))
            .collect();
        // A delay that has passed is over: a key still without a place waits for the topology
        // or its connection, which wake the loop themselves.
        for sub in self.subs.values_mut() {
            if sub.not_before.is_some_and(|t| t <= now) {
                sub.not_before = None;
            }
        }
        let mut batches: BTreeMap<Endpoint, Vec<Key>> = BTreeMap::new();
        // Where pending subscriptions go, due or not: connections there are kept.
        let mut wanted: HashSet<Endpoint> = HashSet::new();
        for (key, due) in pending {
            let target = match key.0 {
                Kind::Sharded => self.topology.as_ref().and_then(|t| {
                    owner(t, &key.1)
                        .filter(|e| !avoided(&self.avoid, e, now))
                        .cloned()
                }),
                Kind::Channel | Kind::Pattern => self.global_target(),
            };
            match target {
                Some(t) => {
                    wanted.insert(t.clone());
                    if due {
                        batches.entry(t).or_default().push(key);
                    }
                }
                // Its master is down or unknown: the topology will tell when it serves.
                None => self.fetch_wanted = true,
            }
        }
        for (endpoint, keys) in batches {
            match self.conn_to(&endpoint) {
                Some(conn) => {
                    for chunk in keys.chunks(BATCH) {
                        self.send_subscribe(conn, chunk.to_vec());
                    }
                }
                None => self.connect(endpoint),
            }
        }
        if self.fetch_wanted && !self.fetching && now >= self.fetch_after {
            self.start_fetch();
        }
        // Connections that carry nothing, and that nothing waits to go to, are closed.
        let busy: HashSet<u64> = self.subs.values().filter_map(|s| s.state.conn()).collect();
        let idle: Vec<u64> = self
            .conns
            .iter()
            .filter(|(id, c)| !busy.contains(id) && !wanted.contains(&c.endpoint))
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            if self.global.as_ref() == Some(&self.conns[&id].endpoint) {
                self.global = None;
            }
            if let Some(c) = self.conns.remove(&id) {
                Gate::lock(&c.gate).close(&self.outbox);
            }
            self.unsubscribing.retain(|(c, _), _| *c != id);
        }
    }

    fn conn_to(&self, endpoint: &Endpoint) -> Option<u64> {
        self.conns
            .iter()
            .find(|(_, c)| &c.endpoint == endpoint)
            .map(|(id, _)| *id)
    }

    fn connect(&mut self, endpoint: Endpoint) {
        if !self.connecting.insert(endpoint.clone()) {
            return;
        }
        self.next_id += 1;
        let id = self.next_id;
        let outbox = self.outbox.clone();
        let control = self.control_tx.clone();
        let gate = Arc::new(Mutex::new(Gate::default()));
        let ours = gate.clone();
        let push = move |info: PushInfo| -> Result<(), ()> {
            match message(info) {
                Ok(m) => Gate::lock(&ours).deliver(m, &outbox),
                Err(info) => {
                    let kind = match info.kind {
                        PushKind::Subscribe => Some(Kind::Channel),
                        PushKind::PSubscribe => Some(Kind::Pattern),
                        PushKind::SSubscribe => Some(Kind::Sharded),
                        _ => None,
                    };
                    if let (Some(kind), Some(Value::BulkString(name))) = (kind, info.data.first()) {
                        // Counted before the task can see it: that subscription's messages
                        // wait for it.
                        Gate::lock(&ours).confirming(kind, name);
                    }
                    let _ = control.send((id, info));
                }
            }
            Ok(())
        };
        let nodes = self.nodes.clone();
        self.ops.push(
            async move {
                // Each request is bounded here: a health check by the ping timeout, a batch
                // of subscribe commands by the subscribe timeout.
                let result = nodes
                    .connect_with(&endpoint, None, None, Some(Arc::new(push)))
                    .await;
                Op::Connected {
                    id,
                    endpoint,
                    gate,
                    result,
                }
            }
            .boxed(),
        );
    }

    fn send_subscribe(&mut self, conn: u64, keys: Vec<Key>) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        // One name per command: each command has exactly one confirmation.
        let mut pipe = redis::pipe();
        let since = Instant::now();
        let mut sent = Vec::with_capacity(keys.len());
        for key in keys {
            pipe.cmd(key.0.subscribe()).arg(&key.1[..]);
            self.attempts += 1;
            let attempt = self.attempts;
            if let Some(sub) = self.subs.get_mut(&key) {
                sub.state = State::Sending {
                    conn,
                    attempt,
                    since,
                };
            }
            sent.push((key, attempt));
        }
        let mut handle = c.handle.clone();
        let bound = self.config.subscribe_timeout;
        self.ops.push(
            async move {
                let result = bounded(bound, &mut handle, &pipe, sent.len()).await;
                Op::Sent {
                    conn,
                    keys: sent,
                    result,
                }
            }
            .boxed(),
        );
    }

    fn tick(&mut self) {
        let now = Instant::now();
        // Health checks.
        let due: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.pinging && c.next_ping <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let c = self.conns.get_mut(&id).expect("listed above");
            c.pinging = true;
            let mut handle = c.handle.clone();
            let endpoint = c.endpoint.clone();
            let bound = self.config.ping_timeout;
            self.ops.push(
                async move {
                    let cmd = redis::cmd("PING");
                    let ping = cmd.query_async::<Value>(&mut handle);
                    let result = match tokio::time::timeout(bound, ping).await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err(e)) => Err(Error::from_redis(e)
                            .context(format_args!("health check of {endpoint}"))),
                        Err(_) => Err(Error::timeout(format!(
                            "{endpoint} did not answer a health check within {bound:?}"
                        ))),
                    };
                    Op::Pinged { conn: id, result }
                }
                .boxed(),
            );
        }
        if now >= self.next_refresh {
            self.next_refresh = now
                + crate::topology::refresher::jittered(
                    self.config.refresh_every,
                    0.1,
                    &mut self.rng,
                );
            // A client's refresher keeps its topology current already.
            if !self.subs.is_empty() && self.shared.is_none() {
                self.fetch_wanted = true;
            }
        }
        // A confirmation that never came (its reply was taken by another request, say): send
        // again.
        let bound = self.config.subscribe_timeout;
        for sub in self.subs.values_mut() {
            if let State::Sending { since, .. } = sub.state {
                if since + bound <= now {
                    sub.state = State::Pending;
                }
            }
        }
        self.avoid.retain(|_, until| *until > now);
        self.finish_waiters();
    }

    fn next_wake(&self) -> Instant {
        let mut wake = self.next_refresh;
        for c in self.conns.values() {
            if !c.pinging {
                wake = wake.min(c.next_ping);
            }
        }
        for sub in self.subs.values() {
            match sub.state {
                State::Pending => {
                    if let Some(t) = sub.not_before {
                        wake = wake.min(t);
                    }
                }
                State::Sending { since, .. } => {
                    wake = wake.min(since + self.config.subscribe_timeout)
                }
                State::Active(_) => {}
            }
        }
        if self.fetch_wanted && !self.fetching {
            wake = wake.min(self.fetch_after);
        }
        for w in &self.waiters {
            wake = wake.min(w.deadline);
        }
        if let Some(t) = self.avoid.values().min() {
            wake = wake.min(*t);
        }
        wake
    }

    /// Answers the callers of `subscribe` whose subscriptions are all confirmed, or whose
    /// time is up — withdrawing what could not be established.
    fn finish_waiters(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.waiters.len() {
            let w = &self.waiters[i];
            if w.remaining.is_empty() {
                let w = self.waiters.swap_remove(i);
                let _ = w.done.send(Ok(()));
            } else if w.deadline <= now {
                let w = self.waiters.swap_remove(i);
                let withdrawn = self.withdraw(&w.remaining);
                let kept = w.remaining.len() - withdrawn;
                let mut message = format!(
                    "{} subscription(s) not confirmed within {:?}",
                    w.remaining.len(),
                    self.config.subscribe_timeout
                );
                if withdrawn > 0 {
                    message += &format!("; {withdrawn} never established, withdrawn");
                }
                if kept > 0 {
                    message += &format!(
                        "; {kept} established before and lost since, still being re-established"
                    );
                }
                let mut error = Error::timeout(message).with_sent(crate::Sent::No);
                if let Some(cause) = &self.last_error {
                    error = error.with_source(cause.clone());
                }
                let _ = w.done.send(Err(error));
            } else {
                i += 1;
            }
        }
    }

    /// Withdraws those of `keys` never established (one established before and lost since is
    /// not a caller's to withdraw); returns how many.
    fn withdraw(&mut self, keys: &HashSet<Key>) -> usize {
        let mut withdrawn = 0;
        for key in keys {
            // Another caller still waiting for it keeps it; one on its way to a server is
            // undone there when its confirmation finds it unwanted.
            let others = self.waiters.iter().any(|w| w.remaining.contains(key));
            if !others && self.subs.get(key).is_some_and(|s| s.lost_at.is_none()) {
                self.subs.remove(key);
                withdrawn += 1;
            }
        }
        self.update_gauge();
        withdrawn
    }

    /// Tells the consumer what was lost and what is back since the last flush.
    fn flush(&mut self) {
        let mut lost: BTreeMap<Kind, (Vec<Vec<u8>>, Error)> = BTreeMap::new();
        for (key, cause) in self.lost.drain(..) {
            lost.entry(key.0)
                .or_insert_with(|| (Vec::new(), cause))
                .0
                .push(key.1);
        }
        for (kind, (mut names, cause)) in lost {
            names.sort();
            tracing::warn!(
                kind = kind.as_str(),
                subscriptions = names.len(),
                cause = %cause,
                "subscriptions lost; re-establishing them"
            );
            crate::metrics::pubsub_lost(&self.config.client_name, kind.as_str(), names.len());
            self.outbox.event(Event::Lost { kind, names, cause });
        }
        let now = Instant::now();
        let mut back: BTreeMap<(Kind, Endpoint), Back> = BTreeMap::new();
        for (key, node, at) in self.resubscribed.drain(..) {
            let entry = back.entry((key.0, node)).or_default();
            entry.0.push(key.1);
            entry.1 = entry.1.max(now - at);
        }
        for ((kind, node), (mut names, gap)) in back {
            names.sort();
            tracing::info!(
                kind = kind.as_str(),
                subscriptions = names.len(),
                node = %node,
                gap_ms = gap.as_millis() as u64,
                "subscriptions re-established"
            );
            crate::metrics::pubsub_resubscribed(
                &self.config.client_name,
                kind.as_str(),
                names.len(),
                gap,
            );
            self.outbox.event(Event::Resubscribed {
                kind,
                names,
                node,
                gap,
            });
        }
    }

    /// Lets the messages that waited behind the confirmations acted on go, now that the stream
    /// has said what those meant.
    fn release_gates(&mut self) {
        for (conn, key) in std::mem::take(&mut self.confirmed) {
            let active = self
                .subs
                .get(&key)
                .is_some_and(|s| s.state == State::Active(conn));
            if let Some(c) = self.conns.get(&conn) {
                Gate::lock(&c.gate).release(&key, active, &self.outbox);
            }
        }
    }

    /// Moves the client's gauge by this subscriber's change: several subscribers of one client
    /// add up, and a dropped one takes its share away.
    fn update_gauge(&mut self) {
        let now = self.subs.len();
        crate::metrics::pubsub_subscriptions(&self.config.client_name, self.gauge, now);
        self.gauge = now;
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // However the task ends, the stream ends with it instead of waiting forever.
        self.outbox.close();
        crate::metrics::pubsub_subscriptions(&self.config.client_name, self.gauge, 0);
    }
}

/// Subscriptions back on one node: their names and the longest gap.
pub(super) type Back = (Vec<Vec<u8>>, Duration);

/// Whether `endpoint` is not to be connected to now.
fn avoided(avoid: &HashMap<Endpoint, Instant>, endpoint: &Endpoint, now: Instant) -> bool {
    avoid.get(endpoint).is_some_and(|until| *until > now)
}

/// The master owning the slot of sharded `channel`, if it is online.
fn owner<'a>(topology: &'a TopologySnapshot, channel: &[u8]) -> Option<&'a Endpoint> {
    let slot = crate::command::key_slot(channel);
    topology
        .shard_for_slot(slot)?
        .master
        .as_ref()
        .filter(|m| m.health == NodeHealth::Online)
        .map(|m| &m.endpoint)
}

/// A delivered message, or the push back when it is not one.
fn message(info: PushInfo) -> Result<Message, PushInfo> {
    let kind = match info.kind {
        PushKind::Message => Kind::Channel,
        PushKind::PMessage => Kind::Pattern,
        PushKind::SMessage => Kind::Sharded,
        _ => return Err(info),
    };
    let bytes = |v: Value| match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    };
    let mut data = info.data.into_iter().map(bytes);
    let (pattern, channel, payload) = match kind {
        Kind::Pattern => (
            Some(data.next().flatten()),
            data.next().flatten(),
            data.next().flatten(),
        ),
        _ => (None, data.next().flatten(), data.next().flatten()),
    };
    match (pattern, channel, payload) {
        (None, Some(channel), Some(payload)) => Ok(Message {
            kind,
            channel,
            pattern: None,
            payload,
        }),
        (Some(Some(pattern)), Some(channel), Some(payload)) => Ok(Message {
            kind,
            channel,
            pattern: Some(pattern),
            payload,
        }),
        _ => {
            tracing::debug!(kind = kind.as_str(), "malformed pub/sub message ignored");
            Err(PushInfo {
                kind: PushKind::Other("malformed".into()),
                data: Vec::new(),
            })
        }
    }
}

/// Sends `commands` commands on `handle`, bounded by `bound`.
async fn bounded(
    bound: Duration,
    handle: &mut MultiplexedConnection,
    pipe: &redis::Pipeline,
    commands: usize,
) -> Result<Vec<Value>, Error> {
    use redis::aio::ConnectionLike;
    match tokio::time::timeout(bound, handle.req_packed_commands(pipe, 0, commands)).await {
        Ok(result) => result.map_err(Error::from_redis),
        Err(_) => Err(Error::timeout(format!(
            "{commands} subscription command(s) unanswered after {bound:?}"
        ))),
    }
}

/// Waits for a change of the client's topology; `false` when the client is gone. Never ends
/// without one.
async fn changed(shared: &mut Option<watch::Receiver<Option<Arc<TopologySnapshot>>>>) -> bool {
    match shared {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}
