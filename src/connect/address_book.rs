//! [`AddressBook`]: a resolver that remembers, so a name that stops resolving still connects.
//!
//! Nodes are known by their announced endpoint — a host name on managed clusters. Connecting to
//! one resolves the name afresh; but a per-node DNS record can lag behind a replacement (it
//! still points at the old IP, or does not exist yet) and a resolver can fail for a while.
//! The cluster itself reports each node's current IP (`CLUSTER SHARDS`). The address book keeps
//! both — the IPs each name last resolved to and the IP the cluster last reported for it — and
//! answers a lookup with the fresh answer *plus* the reported IP (the redis crate races them:
//! the first address that completes the handshake wins, and TLS is verified against the name
//! either way), or, when the name does not resolve, with what it remembers.

use std::{
    collections::HashMap,
    fmt, io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::time::Instant;

use super::{Resolve, ResolveFuture};

/// Names remembered at most; the least recently used beyond it are forgotten.
const CAPACITY: usize = 1024;

/// A [`Resolve`] that remembers what names resolved to and what the cluster reported for them,
/// and falls back on it. Shared by a connector's inner clients and its topology probes.
pub(crate) struct AddressBook {
    resolver: Arc<dyn Resolve>,
    /// How long one lookup may take before the remembered addresses are used instead: less
    /// than a connection timeout, so the fallback still has time to connect.
    lookup_timeout: Duration,
    entries: Mutex<HashMap<String, Entry>>,
    /// The pace of this client's checks of the cluster while no node answers.
    outage: super::outage::OutageGate,
}

#[derive(Default)]
struct Entry {
    /// What the name last resolved to.
    resolved: Vec<IpAddr>,
    /// What the cluster last reported for the node with this name.
    reported: Option<IpAddr>,
    used: Option<Instant>,
}

impl AddressBook {
    pub(crate) fn new(resolver: Arc<dyn Resolve>, lookup_timeout: Duration) -> Self {
        AddressBook {
            resolver,
            lookup_timeout,
            entries: Mutex::new(HashMap::new()),
            outage: super::outage::OutageGate::new(),
        }
    }

    /// The pace of connection checks while no node answers, shared by the connects and the
    /// topology refreshes that use this book.
    pub(crate) fn outage(&self) -> &super::outage::OutageGate {
        &self.outage
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // Every update is a plain assignment: a panic elsewhere cannot leave it half-written.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces what the cluster reports: `nodes` are the (name, IP) pairs of the newest
    /// topology. Names no longer reported keep only what they resolved to.
    pub(crate) fn set_reported(&self, nodes: impl IntoIterator<Item = (String, IpAddr)>) {
        let mut entries = self.entries();
        for entry in entries.values_mut() {
            entry.reported = None;
        }
        for (name, ip) in nodes {
            entries.entry(name).or_default().reported = Some(ip);
        }
        entries.retain(|_, e| e.reported.is_some() || !e.resolved.is_empty());
        prune(&mut entries);
    }

    /// The IP the cluster last reported for `name`.
    pub(crate) fn reported(&self, name: &str) -> Option<IpAddr> {
        self.entries().get(name).and_then(|e| e.reported)
    }

    /// Resolves `host` (an IP literal is answered as it is).
    pub(crate) async fn lookup(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let key = host.to_ascii_lowercase();
        let fresh = match tokio::time::timeout(
            self.lookup_timeout,
            self.resolver.resolve(host, port),
        )
        .await
        {
            Ok(Ok(addrs)) if !addrs.is_empty() => Ok(addrs),
            Ok(Ok(_)) => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{host} has no addresses"),
            )),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "resolving {host} took longer than {:?}",
                    self.lookup_timeout
                ),
            )),
        };
        let mut entries = self.entries();
        let entry = entries.entry(key).or_default();
        entry.used = Some(Instant::now());
        let reported = entry.reported.map(|ip| SocketAddr::new(ip, port));
        let answer = match fresh {
            Ok(mut addrs) => {
                entry.resolved = addrs.iter().map(SocketAddr::ip).collect();
                if let Some(r) = reported {
                    if !addrs.contains(&r) {
                        addrs.push(r);
                    }
                }
                Ok(addrs)
            }
            Err(e) => {
                let mut remembered: Vec<SocketAddr> = reported.into_iter().collect();
                for ip in &entry.resolved {
                    let addr = SocketAddr::new(*ip, port);
                    if !remembered.contains(&addr) {
                        remembered.push(addr);
                    }
                }
                if remembered.is_empty() {
                    Err(e)
                } else {
                    tracing::debug!(
                        host,
                        error = %e,
                        addrs = ?remembered,
                        "name did not resolve; using its last known addresses"
                    );
                    Ok(remembered)
                }
            }
        };
        prune(&mut entries);
        answer
    }
}

/// Keeps the book within its capacity, forgetting the least recently used names first (a
/// reported name is never dropped: it belongs to the current topology).
fn prune(entries: &mut HashMap<String, Entry>) {
    if entries.len() <= CAPACITY {
        return;
    }
    let mut idle: Vec<(Option<Instant>, String)> = entries
        .iter()
        .filter(|(_, e)| e.reported.is_none())
        .map(|(k, e)| (e.used, k.clone()))
        .collect();
    idle.sort();
    let excess = entries.len() - CAPACITY;
    for (_, name) in idle.into_iter().take(excess) {
        entries.remove(&name);
    }
}

impl Resolve for AddressBook {
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> ResolveFuture<'a> {
        Box::pin(self.lookup(host, port))
    }
}

/// The inner clients' resolver: the book, except that while the client's [`OutageGate`] finds
/// no node answering and its next check is not due, a dial fails at once, without a lookup or
/// a connection attempt. The `redis` crate keeps reconnecting to each node it lost (every
/// 50 ms, doubling to 1 s) and redials every node when it refreshes its slots; through a total
/// outage that would be most of a client's attempts, and a fleet's. The gate's checks (the
/// rebuild's, the refresher's, one node at a time) take the due moments; the first that
/// reaches a node lets every dial through again. A dial is held back at most one delay of the
/// gate (2 s at most): once a check is due and nobody took it, dials go.
///
/// [`OutageGate`]: super::outage::OutageGate
#[derive(Clone)]
pub(crate) struct InnerDials(pub(crate) Arc<AddressBook>);

impl redis::io::AsyncDNSResolver for InnerDials {
    fn resolve<'a, 'b: 'a>(
        &'a self,
        host: &'b str,
        port: u16,
    ) -> redis::RedisFuture<'a, Box<dyn Iterator<Item = SocketAddr> + Send + 'a>> {
        Box::pin(async move {
            if let Some((since, next)) = self.0.outage.holding() {
                let now = Instant::now();
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!(
                        "{host}:{port} not dialled: no node has answered for {:?}; the client's next check is in {:?}",
                        now.saturating_duration_since(since),
                        next.saturating_duration_since(now)
                    ),
                )
                .into());
            }
            let addrs = super::resolve::resolve_for_redis(&*self.0, host, port).await?;
            Ok(Box::new(addrs.into_iter()) as Box<dyn Iterator<Item = SocketAddr> + Send>)
        })
    }
}

impl fmt::Debug for InnerDials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("InnerDials").field(&self.0).finish()
    }
}

impl fmt::Debug for AddressBook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AddressBook")
            .field("names", &self.entries().len())
            .field("lookup_timeout", &self.lookup_timeout)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connect::StaticResolver;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn a_name_that_stops_resolving_falls_back_to_its_last_addresses() {
        let dns = StaticResolver::new().with("node-1.test", [addr("127.0.0.5:7000")]);
        let book = AddressBook::new(Arc::new(dns.clone()), Duration::from_millis(100));
        assert_eq!(
            book.lookup("node-1.test", 7000).await.unwrap(),
            vec![addr("127.0.0.5:7000")]
        );
        dns.remove("node-1.test");
        assert_eq!(
            book.lookup("NODE-1.test", 7000).await.unwrap(),
            vec![addr("127.0.0.5:7000")],
            "names are case-insensitive and remembered"
        );
        let unknown = book.lookup("node-2.test", 7000).await.unwrap_err();
        assert_eq!(unknown.kind(), io::ErrorKind::NotFound);
    }

    #[tokio::test]
    async fn the_reported_ip_joins_a_stale_answer() {
        // DNS still points at the replaced node's IP; the cluster reports the new one.
        let dns = StaticResolver::new().with("node-1.test", [addr("127.0.0.5:7000")]);
        let book = AddressBook::new(Arc::new(dns), Duration::from_millis(100));
        book.set_reported([("node-1.test".to_string(), "127.0.0.9".parse().unwrap())]);
        assert_eq!(
            book.lookup("node-1.test", 7000).await.unwrap(),
            vec![addr("127.0.0.5:7000"), addr("127.0.0.9:7000")]
        );
        assert_eq!(
            book.reported("node-1.test"),
            Some("127.0.0.9".parse().unwrap())
        );
        // A name the cluster reports but DNS does not know yet is still reachable.
        book.set_reported([("node-2.test".to_string(), "127.0.0.10".parse().unwrap())]);
        assert_eq!(
            book.lookup("node-2.test", 7001).await.unwrap(),
            vec![addr("127.0.0.10:7001")]
        );
        assert_eq!(book.reported("node-1.test"), None, "replaced, not merged");
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_resolver_is_cut_off_in_favour_of_what_is_remembered() {
        struct Hangs;
        impl Resolve for Hangs {
            fn resolve<'a>(&'a self, _: &'a str, _: u16) -> ResolveFuture<'a> {
                Box::pin(std::future::pending())
            }
        }
        let book = AddressBook::new(Arc::new(Hangs), Duration::from_millis(100));
        book.set_reported([("node-1.test".to_string(), "127.0.0.9".parse().unwrap())]);
        assert_eq!(
            book.lookup("node-1.test", 7000).await.unwrap(),
            vec![addr("127.0.0.9:7000")]
        );
        let e = book.lookup("other.test", 7000).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn ip_literals_are_answered_without_a_lookup() {
        let book = AddressBook::new(Arc::new(StaticResolver::new()), Duration::from_millis(100));
        assert_eq!(
            book.lookup("[::1]", 7000).await.unwrap(),
            vec![addr("[::1]:7000")]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_inner_clients_dial_nothing_between_checks_while_no_node_answers() {
        use super::super::outage::{Check, Checker};
        use redis::io::AsyncDNSResolver;
        struct Counting(StaticResolver, std::sync::atomic::AtomicUsize);
        impl Resolve for Counting {
            fn resolve<'a>(&'a self, host: &'a str, port: u16) -> ResolveFuture<'a> {
                self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.0.resolve(host, port)
            }
        }
        let dns = Arc::new(Counting(
            StaticResolver::new().with("node-1.test", [addr("127.0.0.5:7000")]),
            Default::default(),
        ));
        let book = Arc::new(AddressBook::new(dns.clone(), Duration::from_millis(100)));
        let dials = InnerDials(book.clone());
        let lookups = || dns.1.load(std::sync::atomic::Ordering::Relaxed);
        let dial = |host: &'static str| {
            let dials = dials.clone();
            async move {
                dials
                    .resolve(host, 7000)
                    .await
                    .map(|addrs| addrs.collect::<Vec<SocketAddr>>())
            }
        };
        assert_eq!(
            dial("node-1.test").await.unwrap(),
            vec![addr("127.0.0.5:7000")]
        );
        assert_eq!(lookups(), 1);

        // A check reached no node: until the next check is due, the inner client's reconnects
        // fail at once, saying why, and neither look the name up nor dial (an IP literal is
        // not dialled either).
        let Check::Clear { epoch } = book.outage().check(Checker::Refresh) else {
            panic!("the gate starts clear");
        };
        book.outage().unreached(epoch, None);
        for host in ["node-1.test", "127.0.0.5"] {
            let Err(refused) = dial(host).await else {
                panic!("{host} was dialled while no node answers");
            };
            assert!(refused.is_connection_refusal(), "{refused:?}");
            assert!(refused.to_string().contains("not dialled"), "{refused}");
        }
        assert_eq!(lookups(), 1);
        // The topology probes and connection checks still use the book itself.
        book.lookup("node-1.test", 7000).await.unwrap();
        assert_eq!(lookups(), 2);

        // A check that is due and that nobody takes does not hold the dials back.
        tokio::time::advance(Duration::from_secs(3)).await;
        dial("node-1.test").await.unwrap();
        assert_eq!(lookups(), 3);
        // One that is taken and fails does, until the next one is due.
        let Check::One { epoch, .. } = book.outage().check(Checker::Connect) else {
            panic!("no check due after 3 s");
        };
        book.outage().unreached(epoch, None);
        assert!(dial("node-1.test").await.is_err());
        assert_eq!(lookups(), 3);

        // Once a check reaches a node, the inner client dials again.
        book.outage().reached();
        assert_eq!(
            dial("node-1.test").await.unwrap(),
            vec![addr("127.0.0.5:7000")]
        );
        assert_eq!(lookups(), 4);
    }

    #[tokio::test]
    async fn the_book_stays_bounded() {
        let dns = StaticResolver::new();
        for i in 0..CAPACITY + 10 {
            dns.set(format!("n{i}.test"), [addr("127.0.0.5:1")]);
        }
        let book = AddressBook::new(Arc::new(dns), Duration::from_millis(100));
        for i in 0..CAPACITY + 10 {
            book.lookup(&format!("n{i}.test"), 1).await.unwrap();
        }
        assert!(book.entries().len() <= CAPACITY);
        assert!(book
            .entries()
            .contains_key(&format!("n{}.test", CAPACITY + 9)));
    }
}
