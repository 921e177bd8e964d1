//! The test's "DNS": names that resolve to loopback node addresses.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, PoisonError, RwLock},
};

/// A shared, in-memory name → addresses table: the "DNS" of a test.
///
/// A [`LocalCluster`](super::LocalCluster) registers its
/// [`config_endpoint`](super::LocalCluster::config_endpoint) here and keeps it pointing at its
/// member nodes as they are replaced, like the configuration endpoint of a managed cluster. The
/// names are deliberately not resolvable by the OS (they end in `.test`), so a client only finds
/// the cluster through this map: it implements [`Resolve`](crate::connect::Resolve) (give it to
/// `ClusterConnector::resolver` or `ClientBuilder::resolver`), and
/// [`DnsAdapter`](crate::connect::DnsAdapter) hands it to the redis crate directly.
///
/// Cloning is cheap and every clone sees the same table.
#[derive(Clone, Debug, Default)]
pub struct NameMap {
    inner: Arc<RwLock<HashMap<String, Entry>>>,
}

#[derive(Debug, Default)]
struct Entry {
    addrs: Vec<SocketAddr>,
    /// Set by [`NameMap::freeze`]: cluster operations leave the entry alone.
    frozen: bool,
}

impl NameMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Points `name` at `addrs`, replacing what it pointed at.
    ///
    /// This is an explicit change by the test, so it applies even to a frozen name; only the
    /// automatic updates of cluster operations respect [`freeze`](Self::freeze).
    pub fn set(&self, name: &str, addrs: Vec<SocketAddr>) {
        let mut map = self.write();
        map.entry(name.to_owned()).or_default().addrs = addrs;
    }

    /// The addresses `name` points at; empty when the name is unknown.
    pub fn lookup(&self, name: &str) -> Vec<SocketAddr> {
        self.read()
            .get(name)
            .map(|e| e.addrs.clone())
            .unwrap_or_default()
    }

    /// Whether `name` is registered at all (possibly with no address).
    pub fn contains(&self, name: &str) -> bool {
        self.read().contains_key(name)
    }

    /// Removes `name`.
    pub fn remove(&self, name: &str) {
        self.write().remove(name);
    }

    /// Freezes (`true`) or unfreezes (`false`) `name`.
    ///
    /// While frozen, cluster operations no longer update the name, which simulates a stale DNS
    /// record (or a client-side DNS cache) that still points at the old IPs after nodes were
    /// replaced. Unfreezing does not refresh the name by itself: the next cluster operation does.
    pub fn freeze(&self, name: &str, frozen: bool) {
        self.write().entry(name.to_owned()).or_default().frozen = frozen;
    }

    /// Whether `name` is frozen.
    pub fn is_frozen(&self, name: &str) -> bool {
        self.read().get(name).is_some_and(|e| e.frozen)
    }

    /// The update a cluster operation makes: skipped while the name is frozen.
    pub(crate) fn publish(&self, name: &str, addrs: Vec<SocketAddr>) {
        let mut map = self.write();
        let entry = map.entry(name.to_owned()).or_default();
        if entry.frozen {
            tracing::debug!(name, "name frozen: not updating it");
        } else {
            entry.addrs = addrs;
        }
    }

    /// The removal a cluster operation makes (a node's host name once the node is forgotten):
    /// skipped while the name is frozen, so a frozen name keeps pointing at the gone node.
    pub(crate) fn retire(&self, name: &str) {
        let mut map = self.write();
        if map.get(name).is_some_and(|e| e.frozen) {
            tracing::debug!(name, "name frozen: not removing it");
        } else {
            map.remove(name);
        }
    }

    // A panic elsewhere while the lock was held cannot leave the map half-updated (every write
    // is a single assignment), so a poisoned lock is still safe to use; ignoring the poison keeps
    // one failed test from cascading into every later lookup.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Entry>> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Entry>> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }
}
