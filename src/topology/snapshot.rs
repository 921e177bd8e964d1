//! [`TopologySnapshot`]: who serves which slots, as the cluster itself reports it.

use std::{
    collections::{BTreeSet, HashSet},
    fmt,
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    time::SystemTime,
};

use redis::Value;

use crate::{connect::Endpoint, Error, ErrorKind};

/// A node's role in its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NodeRole {
    /// Serves the shard's slots.
    Master,
    /// Replicates the master.
    Replica,
}

/// A node's health as its peers report it (`CLUSTER SHARDS`; `CLUSTER SLOTS` omits failed
/// nodes, so its nodes are `Online`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NodeHealth {
    /// Serving.
    Online,
    /// Flagged as failed by the cluster.
    Failed,
    /// Loading its dataset (a replica after a full sync).
    Loading,
}

/// One node of a shard.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopologyNode {
    /// The cluster node id (40 hex characters).
    pub id: String,
    /// Where clients reach it: the endpoint the cluster announces for it — its host name when
    /// the cluster announces names, its IP otherwise — and the port of the transport in use
    /// (`tls-port` over TLS). This is the node's identity.
    pub endpoint: Endpoint,
    /// The IP the cluster reports for the node, when it reports one: where a connection goes
    /// when the endpoint's name does not resolve (yet, or any more).
    pub ip: Option<IpAddr>,
    /// Master or replica.
    pub role: NodeRole,
    /// Health as reported.
    pub health: NodeHealth,
}

impl TopologyNode {
    /// The reported IP with the endpoint's port, when an IP is known.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.endpoint
            .ip()
            .or(self.ip)
            .map(|ip| SocketAddr::new(ip, self.endpoint.port()))
    }
}

/// One shard: its slot ranges, master and replicas.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Shard {
    /// Slot ranges served, sorted.
    pub slots: Vec<RangeInclusive<u16>>,
    /// The master, if the shard has one that is known.
    pub master: Option<TopologyNode>,
    /// The replicas.
    pub replicas: Vec<TopologyNode>,
}

impl Shard {
    /// Every node of the shard, master first.
    pub fn nodes(&self) -> impl Iterator<Item = &TopologyNode> {
        self.master.iter().chain(self.replicas.iter())
    }
}

/// A consistent view of the cluster: shards with their slots, masters and replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologySnapshot {
    /// Shards, sorted by their first slot.
    pub shards: Vec<Shard>,
    /// How many nodes answered with exactly this view.
    pub agreed_by: usize,
    /// How many nodes answered at all.
    pub answered: usize,
    /// How many nodes were asked.
    pub asked: usize,
    /// When it was taken.
    pub taken_at: SystemTime,
    /// A counter of published snapshots (1 for the first).
    pub sequence: u64,
}

impl TopologySnapshot {
    /// The endpoints of every node, masters and replicas, sorted.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        let mut endpoints: Vec<Endpoint> = self
            .shards
            .iter()
            .flat_map(|s| s.nodes().map(|n| n.endpoint.clone()))
            .collect();
        endpoints.sort();
        endpoints.dedup();
        endpoints
    }

    /// The nodes in the order a refresh asks them (it asks the first few, see
    /// [`TopologySource::max_probes`](super::TopologySource::max_probes)): the serving masters,
    /// then the other nodes — serving ones before failed or loading ones — each group rotated
    /// by `turn` (the refresh's number), so that successive refreshes reach every node in time.
    /// Each node once.
    pub(crate) fn probe_order(&self, turn: u64) -> Vec<Endpoint> {
        let mut masters: Vec<&TopologyNode> = self
            .shards
            .iter()
            .filter_map(|s| s.master.as_ref())
            .filter(|m| m.health == NodeHealth::Online)
            .collect();
        masters.sort();
        masters.dedup_by(|a, b| a.endpoint == b.endpoint);
        if !masters.is_empty() {
            let len = masters.len() as u64;
            masters.rotate_left((turn % len) as usize);
        }
        let mut order: Vec<Endpoint> = masters.iter().map(|m| m.endpoint.clone()).collect();
        let mut rest: Vec<&TopologyNode> = self
            .nodes()
            .filter(|n| !order.contains(&n.endpoint))
            .collect();
        rest.sort_by(|a, b| {
            (a.health != NodeHealth::Online, *a).cmp(&(b.health != NodeHealth::Online, *b))
        });
        rest.dedup_by(|a, b| a.endpoint == b.endpoint);
        let serving = rest
            .iter()
            .take_while(|n| n.health == NodeHealth::Online)
            .count();
        if serving > 0 {
            rest[..serving].rotate_left((turn % serving as u64) as usize);
        }
        let others = rest.len() - serving;
        if others > 0 {
            rest[serving..].rotate_left((turn % others as u64) as usize);
        }
        order.extend(rest.into_iter().map(|n| n.endpoint.clone()));
        order
    }

    /// Every node, masters and replicas.
    pub fn nodes(&self) -> impl Iterator<Item = &TopologyNode> {
        self.shards.iter().flat_map(Shard::nodes)
    }

    /// The masters' endpoints, by shard.
    pub fn masters(&self) -> Vec<Endpoint> {
        self.shards
            .iter()
            .filter_map(|s| s.master.as_ref().map(|m| m.endpoint.clone()))
            .collect()
    }

    /// The shard serving `slot`.
    pub fn shard_for_slot(&self, slot: u16) -> Option<&Shard> {
        self.shards
            .iter()
            .find(|s| s.slots.iter().any(|r| r.contains(&slot)))
    }

    /// How many of the 16384 slots are served.
    pub fn covered_slots(&self) -> usize {
        self.shards
            .iter()
            .flat_map(|s| s.slots.iter())
            .map(|r| (*r.end() as usize) - (*r.start() as usize) + 1)
            .sum()
    }

    /// What changed from `previous` to `self`, for events and decisions.
    pub fn changes_since(&self, previous: &TopologySnapshot) -> Vec<TopologyChange> {
        let mut changes = Vec::new();
        let before: HashSet<Endpoint> = previous.endpoints().into_iter().collect();
        let after: HashSet<Endpoint> = self.endpoints().into_iter().collect();
        for added in after.difference(&before) {
            changes.push(TopologyChange::NodeAdded(added.clone()));
        }
        for removed in before.difference(&after) {
            changes.push(TopologyChange::NodeRemoved(removed.clone()));
        }
        // A node that kept its name but moved (a pod restarted at a new IP) is no change of the
        // view clients route by, but it is news for whoever watches.
        for node in self.nodes().filter(|n| !n.endpoint.is_ip()) {
            let before = previous
                .nodes()
                .find(|p| p.endpoint == node.endpoint)
                .and_then(|p| p.ip);
            if let (Some(from), Some(to)) = (before, node.ip) {
                if from != to {
                    changes.push(TopologyChange::NodeMoved {
                        endpoint: node.endpoint.clone(),
                        from: Some(from),
                        to: Some(to),
                    });
                }
            }
        }
        for shard in &self.shards {
            let Some(first) = shard.slots.first().map(|r| *r.start()) else {
                continue;
            };
            let old = previous.shard_for_slot(first);
            let old_master = old
                .and_then(|s| s.master.as_ref())
                .map(|m| m.endpoint.clone());
            let new_master = shard.master.as_ref().map(|m| m.endpoint.clone());
            if old_master != new_master {
                changes.push(TopologyChange::MasterChanged {
                    first_slot: first,
                    from: old_master,
                    to: new_master,
                });
            }
        }
        if view_key(&self.shards).0 != view_key(&previous.shards).0 {
            changes.push(TopologyChange::SlotsMoved);
        }
        changes
    }
}

/// A difference between two snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TopologyChange {
    /// A node appeared.
    NodeAdded(Endpoint),
    /// A node disappeared.
    NodeRemoved(Endpoint),
    /// A node announced by name is reported at another IP (it restarted elsewhere).
    NodeMoved {
        /// The node's endpoint, unchanged.
        endpoint: Endpoint,
        /// The IP reported before.
        from: Option<IpAddr>,
        /// The IP reported now.
        to: Option<IpAddr>,
    },
    /// The shard holding `first_slot` has another master.
    MasterChanged {
        /// The first slot of the shard.
        first_slot: u16,
        /// The previous master.
        from: Option<Endpoint>,
        /// The new master.
        to: Option<Endpoint>,
    },
    /// Slot ranges moved between shards.
    SlotsMoved,
}

impl fmt::Display for TopologyChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopologyChange::NodeAdded(a) => write!(f, "node added {a}"),
            TopologyChange::NodeRemoved(a) => write!(f, "node removed {a}"),
            TopologyChange::NodeMoved { endpoint, from, to } => write!(
                f,
                "node {endpoint} moved {} → {}",
                from.map_or("?".into(), |a| a.to_string()),
                to.map_or("?".into(), |a| a.to_string())
            ),
            TopologyChange::MasterChanged {
                first_slot,
                from,
                to,
            } => write!(
                f,
                "master of slot {first_slot} changed {} → {}",
                from.as_ref().map_or("none".into(), |a| a.to_string()),
                to.as_ref().map_or("none".into(), |a| a.to_string())
            ),
            TopologyChange::SlotsMoved => f.write_str("slots moved"),
        }
    }
}

/// Slot range bounds and the master serving them.
type SlotOwner = (u16, u16, Option<Endpoint>);

/// The part of a view nodes must agree on: slot ranges → master endpoint, and the node set.
pub(crate) fn view_key(shards: &[Shard]) -> (Vec<SlotOwner>, BTreeSet<Endpoint>) {
    let mut slots: Vec<SlotOwner> = shards
        .iter()
        .flat_map(|s| {
            let master = s.master.as_ref().map(|m| m.endpoint.clone());
            s.slots
                .iter()
                .map(move |r| (*r.start(), *r.end(), master.clone()))
        })
        .collect();
    slots.sort();
    let nodes = shards
        .iter()
        .flat_map(|s| {
            s.nodes()
                .filter(|n| n.health != NodeHealth::Failed)
                .map(|n| n.endpoint.clone())
        })
        .collect();
    (slots, nodes)
}

fn malformed(what: &str) -> Error {
    Error::new(
        ErrorKind::Command,
        format!("unexpected topology reply from the server: {what}"),
    )
}

fn as_str(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn as_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => as_str(other)?.parse().ok(),
    }
}

/// Key/value pairs of a RESP2 flat array or a RESP3 map.
fn pairs(v: &Value) -> Option<Vec<(String, &Value)>> {
    match v {
        Value::Map(entries) => entries.iter().map(|(k, v)| Some((as_str(k)?, v))).collect(),
        Value::Array(items) if items.len() % 2 == 0 => items
            .chunks(2)
            .map(|kv| Some((as_str(&kv[0])?, &kv[1])))
            .collect(),
        _ => None,
    }
}

/// What a parser needs to know about the probe that got the reply.
#[derive(Debug, Clone)]
pub(crate) struct Asked {
    /// The node that answered, as the probe reached it: a node that announces nothing reports
    /// no address for itself.
    pub(crate) endpoint: Endpoint,
    /// The IP the probe reached it at, when known.
    pub(crate) ip: Option<IpAddr>,
    /// Whether the probe spoke TLS: nodes are reached at their `tls-port` then.
    pub(crate) tls: bool,
}

/// A reported value that names nothing: Redis sends `?` for an unknown endpoint and an empty
/// string for a node that announces no address.
fn meaningful(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty() && v != "?")
}

/// A node's endpoint and reported IP from what it announces: the preferred `endpoint`, else its
/// host name, else its IP; `None` if a host is not a valid name or address.
fn announced(
    endpoint: Option<String>,
    hostname: Option<String>,
    ip: Option<String>,
    port: u16,
    asked: &Asked,
) -> Option<(Endpoint, Option<IpAddr>)> {
    let ip_text = meaningful(ip);
    let reported_ip = ip_text.as_deref().and_then(|t| t.parse::<IpAddr>().ok());
    let host = meaningful(endpoint).or(meaningful(hostname)).or(ip_text);
    match host {
        Some(host) => Some((Endpoint::new(host, port).ok()?, reported_ip)),
        // It announces nothing: it is the node that answered.
        None => Some((
            Endpoint::new(asked.endpoint.host(), port).ok()?,
            asked.ip.or(asked.endpoint.ip()),
        )),
    }
}

/// Parses a `CLUSTER SHARDS` reply (Redis 7+).
pub(crate) fn parse_cluster_shards(reply: &Value, asked: &Asked) -> Result<Vec<Shard>, Error> {
    let Value::Array(items) = reply else {
        return Err(malformed("CLUSTER SHARDS is not an array"));
    };
    let mut shards = Vec::with_capacity(items.len());
    for item in items {
        let fields = pairs(item).ok_or_else(|| malformed("a shard is not a map"))?;
        let mut slots = Vec::new();
        let mut master = None;
        let mut replicas = Vec::new();
        for (key, value) in fields {
            match key.as_str() {
                "slots" => {
                    let Value::Array(bounds) = value else {
                        return Err(malformed("shard slots"));
                    };
                    for pair in bounds.chunks(2) {
                        let (Some(a), Some(b)) =
                            (pair.first().and_then(as_int), pair.get(1).and_then(as_int))
                        else {
                            return Err(malformed("slot range"));
                        };
                        slots.push(slot(a)?..=slot(b)?);
                    }
                }
                "nodes" => {
                    let Value::Array(nodes) = value else {
                        return Err(malformed("shard nodes"));
                    };
                    for node in nodes {
                        let n = pairs(node).ok_or_else(|| malformed("a node is not a map"))?;
                        let get = |k: &str| n.iter().find(|(key, _)| key == k).map(|(_, v)| *v);
                        let id = get("id").and_then(as_str).unwrap_or_default();
                        // The port of the transport the client speaks (`tls-port` over TLS), or
                        // the only one the node lists.
                        let port_of = |key: &str| {
                            get(key)
                                .and_then(as_int)
                                .and_then(|p| u16::try_from(p).ok())
                                .filter(|p| *p != 0)
                        };
                        let (preferred, other) = if asked.tls {
                            ("tls-port", "port")
                        } else {
                            ("port", "tls-port")
                        };
                        let port = port_of(preferred)
                            .or_else(|| port_of(other))
                            .ok_or_else(|| malformed("node port"))?;
                        let Some((endpoint, ip)) = announced(
                            get("endpoint").and_then(as_str),
                            get("hostname").and_then(as_str),
                            get("ip").and_then(as_str),
                            port,
                            asked,
                        ) else {
                            continue;
                        };
                        let health = match get("health").and_then(as_str).as_deref() {
                            Some("fail") | Some("failed") => NodeHealth::Failed,
                            Some("loading") => NodeHealth::Loading,
                            _ => NodeHealth::Online,
                        };
                        let role = match get("role").and_then(as_str).as_deref() {
                            Some("master") => NodeRole::Master,
                            _ => NodeRole::Replica,
                        };
                        let node = TopologyNode {
                            id,
                            endpoint,
                            ip,
                            role,
                            health,
                        };
                        // After a failover the old master stays listed as a `master` of the
                        // shard, failed, beside the promoted one: the one that serves is the
                        // shard's master; the other counts with the replicas.
                        let rank = |h: NodeHealth| match h {
                            NodeHealth::Online => 0,
                            NodeHealth::Loading => 1,
                            NodeHealth::Failed => 2,
                        };
                        let demoted = if role != NodeRole::Master {
                            Some(node)
                        } else {
                            match master.take() {
                                None => {
                                    master = Some(node);
                                    None
                                }
                                Some(first) if rank(node.health) < rank(first.health) => {
                                    master = Some(node);
                                    Some(first)
                                }
                                Some(first) => {
                                    master = Some(first);
                                    Some(node)
                                }
                            }
                        };
                        if let Some(node) = demoted {
                            replicas.push(TopologyNode {
                                role: NodeRole::Replica,
                                ..node
                            });
                        }
                    }
                }
                _ => {}
            }
        }
        // A shard without slots is a master that lost them (or an empty new node): not a shard
        // clients route to.
        if slots.is_empty() {
            continue;
        }
        slots.sort_by_key(|r| *r.start());
        replicas.sort();
        shards.push(Shard {
            slots,
            master,
            replicas,
        });
    }
    shards.sort_by_key(|s| s.slots.first().map(|r| *r.start()));
    Ok(shards)
}

/// Parses a `CLUSTER SLOTS` reply (for servers before 7.0). Each node is
/// `[endpoint, port, id, {ip, hostname}]`; the port is that of the transport the asking
/// connection used.
pub(crate) fn parse_cluster_slots(reply: &Value, asked: &Asked) -> Result<Vec<Shard>, Error> {
    let Value::Array(ranges) = reply else {
        return Err(malformed("CLUSTER SLOTS is not an array"));
    };
    let mut shards: Vec<Shard> = Vec::new();
    for range in ranges {
        let Value::Array(parts) = range else {
            return Err(malformed("slot range entry"));
        };
        if parts.len() < 3 {
            return Err(malformed("slot range entry too short"));
        }
        let start = slot(as_int(&parts[0]).ok_or_else(|| malformed("slot start"))?)?;
        let end = slot(as_int(&parts[1]).ok_or_else(|| malformed("slot end"))?)?;
        let mut nodes = Vec::new();
        for (i, node) in parts[2..].iter().enumerate() {
            let Value::Array(fields) = node else {
                return Err(malformed("slot node"));
            };
            let preferred = fields.first().and_then(as_str);
            let port = fields
                .get(1)
                .and_then(as_int)
                .and_then(|p| u16::try_from(p).ok())
                .ok_or_else(|| malformed("slot node port"))?;
            let id = fields.get(2).and_then(as_str).unwrap_or_default();
            // Redis 7 adds the other names of the node: its IP when the endpoint is a host
            // name, its host name when the endpoint is an IP.
            let metadata = fields.get(3).and_then(pairs).unwrap_or_default();
            let meta = |k: &str| {
                metadata
                    .iter()
                    .find(|(key, _)| key == k)
                    .and_then(|(_, v)| as_str(v))
            };
            let preferred_is_ip = preferred
                .as_deref()
                .is_some_and(|p| p.parse::<IpAddr>().is_ok());
            let (endpoint, hostname, ip) = if preferred_is_ip {
                (preferred.clone(), meta("hostname"), preferred)
            } else {
                (preferred, meta("hostname"), meta("ip"))
            };
            let Some((endpoint, ip)) = announced(endpoint, hostname, ip, port, asked) else {
                continue;
            };
            nodes.push(TopologyNode {
                id,
                endpoint,
                ip,
                role: if i == 0 {
                    NodeRole::Master
                } else {
                    NodeRole::Replica
                },
                health: NodeHealth::Online,
            });
        }
        let mut nodes = nodes.into_iter();
        let master = nodes.next();
        let mut replicas: Vec<TopologyNode> = nodes.collect();
        replicas.sort();
        // CLUSTER SLOTS lists one entry per contiguous range; merge ranges of the same master.
        if let Some(shard) = shards
            .iter_mut()
            .find(|s| s.master.as_ref().map(|m| &m.id) == master.as_ref().map(|m| &m.id))
        {
            shard.slots.push(start..=end);
            shard.slots.sort_by_key(|r| *r.start());
        } else {
            shards.push(Shard {
                slots: vec![start..=end],
                master,
                replicas,
            });
        }
    }
    shards.sort_by_key(|s| s.slots.first().map(|r| *r.start()));
    Ok(shards)
}

fn slot(v: i64) -> Result<u16, Error> {
    u16::try_from(v)
        .ok()
        .filter(|s| *s < 16384)
        .ok_or_else(|| malformed("slot number out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    /// A `CLUSTER SHARDS` node entry: `fields` as key/value pairs, RESP2 style.
    fn entry(fields: &[(&str, Value)]) -> Value {
        Value::Array(
            fields
                .iter()
                .flat_map(|(k, v)| [bulk(k), v.clone()])
                .collect(),
        )
    }

    fn node(id: &str, ip: &str, port: i64, role: &str, health: &str) -> Value {
        entry(&[
            ("id", bulk(id)),
            ("port", Value::Int(port)),
            ("ip", bulk(ip)),
            ("endpoint", bulk(ip)),
            ("role", bulk(role)),
            ("replication-offset", Value::Int(0)),
            ("health", bulk(health)),
        ])
    }

    fn shard(first: i64, last: i64, nodes: Vec<Value>) -> Value {
        Value::Array(vec![
            bulk("slots"),
            Value::Array(vec![Value::Int(first), Value::Int(last)]),
            bulk("nodes"),
            Value::Array(nodes),
        ])
    }

    fn asked(tls: bool) -> Asked {
        Asked {
            endpoint: "127.0.0.9:7000".parse().unwrap(),
            ip: None,
            tls,
        }
    }

    fn ep(s: &str) -> Endpoint {
        s.parse().unwrap()
    }

    #[test]
    fn parses_resp2_cluster_shards() {
        let reply = Value::Array(vec![
            shard(
                0,
                8191,
                vec![
                    node("r1", "127.0.0.2", 7000, "replica", "online"),
                    node("m1", "127.0.0.1", 7000, "master", "online"),
                ],
            ),
            shard(
                8192,
                16383,
                vec![
                    node("m2", "", 7001, "master", "online"),
                    node("x", "127.0.0.4", 7000, "replica", "failed"),
                ],
            ),
        ]);
        let shards = parse_cluster_shards(&reply, &asked(false)).unwrap();
        assert_eq!(shards.len(), 2);
        assert_eq!(shards[0].master.as_ref().unwrap().id, "m1");
        assert_eq!(shards[0].replicas[0].endpoint, ep("127.0.0.2:7000"));
        assert_eq!(shards[0].replicas[0].ip, Some("127.0.0.2".parse().unwrap()));
        // A node that announces nothing is the node that was asked.
        assert_eq!(
            shards[1].master.as_ref().unwrap().endpoint,
            ep("127.0.0.9:7001")
        );
        assert_eq!(shards[1].replicas[0].health, NodeHealth::Failed);
        let snapshot = TopologySnapshot {
            shards,
            agreed_by: 1,
            answered: 1,
            asked: 1,
            taken_at: SystemTime::now(),
            sequence: 1,
        };
        assert_eq!(snapshot.covered_slots(), 16384);
        assert_eq!(snapshot.endpoints().len(), 4);
        assert_eq!(
            snapshot
                .shard_for_slot(9000)
                .unwrap()
                .master
                .as_ref()
                .unwrap()
                .id,
            "m2"
        );
    }

    /// After a failover, until the old master comes back (as a replica) or is forgotten, a
    /// server that groups nodes by shard id may list it in its shard with role `master` and
    /// health `fail`, beside the promoted replica, in either order (Redis 7.0.15 lists it as a
    /// shard of its own, without slots). The shard's master is the one that serves.
    #[test]
    fn a_failed_old_master_listed_beside_the_promoted_one_is_not_the_shards_master() {
        for failed_first in [true, false] {
            let old = node("old", "127.0.0.1", 7000, "master", "fail");
            let new = node("new", "127.0.0.2", 7000, "master", "online");
            let nodes = if failed_first {
                vec![old, new]
            } else {
                vec![new, old]
            };
            let shards =
                parse_cluster_shards(&Value::Array(vec![shard(0, 16383, nodes)]), &asked(false))
                    .unwrap();
            let master = shards[0].master.as_ref().unwrap();
            assert_eq!(master.id, "new", "failed listed first: {failed_first}");
            assert_eq!(master.health, NodeHealth::Online);
            assert_eq!(shards[0].replicas.len(), 1);
            assert_eq!(shards[0].replicas[0].id, "old");
            assert_eq!(shards[0].replicas[0].health, NodeHealth::Failed);
        }
    }

    /// What a Redis 7 node with `cluster-announce-hostname` and
    /// `cluster-preferred-endpoint-type hostname` answers (recorded from redis-server 7.0.15).
    fn hostname_node(id: &str, ip: &str, name: &str, role: &str, tls_port: Option<i64>) -> Value {
        let mut fields = vec![("id", bulk(id))];
        match tls_port {
            // A TLS-only node (`port 0`) lists no plaintext port.
            Some(p) => fields.push(("tls-port", Value::Int(p))),
            None => fields.push(("port", Value::Int(23001))),
        }
        fields.extend([
            ("ip", bulk(ip)),
            ("endpoint", bulk(name)),
            ("hostname", bulk(name)),
            ("role", bulk(role)),
            ("replication-offset", Value::Int(0)),
            ("health", bulk("online")),
        ]);
        entry(&fields)
    }

    #[test]
    fn a_node_announced_by_name_is_its_name_with_its_ip_kept_apart() {
        let reply = Value::Array(vec![shard(
            0,
            16383,
            vec![
                hostname_node("m", "127.55.0.1", "Node1.exp.test", "master", Some(23000)),
                hostname_node("r", "127.55.0.2", "node2.exp.test", "replica", Some(23000)),
            ],
        )]);
        let shards = parse_cluster_shards(&reply, &asked(true)).unwrap();
        let master = shards[0].master.as_ref().unwrap();
        assert_eq!(
            master.endpoint,
            ep("node1.exp.test:23000"),
            "lower-cased name"
        );
        assert_eq!(master.ip, Some("127.55.0.1".parse().unwrap()));
        assert_eq!(
            master.socket_addr(),
            Some("127.55.0.1:23000".parse().unwrap())
        );
    }

    #[test]
    fn over_tls_the_tls_port_wins_and_plaintext_clients_keep_the_plain_port() {
        let both = entry(&[
            ("id", bulk("m")),
            ("port", Value::Int(23001)),
            ("tls-port", Value::Int(23000)),
            ("ip", bulk("127.55.0.1")),
            ("endpoint", bulk("node1.exp.test")),
            ("role", bulk("master")),
            ("health", bulk("online")),
        ]);
        let reply = Value::Array(vec![shard(0, 16383, vec![both])]);
        let port = |tls| {
            parse_cluster_shards(&reply, &asked(tls)).unwrap()[0]
                .master
                .as_ref()
                .unwrap()
                .endpoint
                .port()
        };
        assert_eq!(port(true), 23000);
        assert_eq!(port(false), 23001);
    }

    #[test]
    fn unknown_endpoints_fall_back_to_the_host_name_then_the_ip() {
        let question_mark = entry(&[
            ("id", bulk("m")),
            ("port", Value::Int(7000)),
            ("ip", bulk("127.0.0.1")),
            ("endpoint", bulk("?")),
            ("role", bulk("master")),
        ]);
        let named = entry(&[
            ("id", bulk("r")),
            ("port", Value::Int(7000)),
            ("ip", bulk("127.0.0.2")),
            ("endpoint", bulk("?")),
            ("hostname", bulk("replica.test")),
            ("role", bulk("replica")),
        ]);
        let reply = Value::Array(vec![shard(0, 16383, vec![question_mark, named])]);
        let shards = parse_cluster_shards(&reply, &asked(false)).unwrap();
        assert_eq!(
            shards[0].master.as_ref().unwrap().endpoint,
            ep("127.0.0.1:7000")
        );
        assert_eq!(shards[0].replicas[0].endpoint, ep("replica.test:7000"));
    }

    #[test]
    fn parses_cluster_slots_and_merges_ranges() {
        let entry = |a: i64, b: i64, ip: &str, id: &str| {
            Value::Array(vec![
                Value::Int(a),
                Value::Int(b),
                Value::Array(vec![bulk(ip), Value::Int(7000), bulk(id)]),
                Value::Array(vec![bulk("127.0.0.3"), Value::Int(7000), bulk("r")]),
            ])
        };
        let reply = Value::Array(vec![
            entry(0, 99, "127.0.0.1", "m1"),
            entry(200, 16383, "127.0.0.1", "m1"),
            entry(100, 199, "127.0.0.2", "m2"),
        ]);
        let shards = parse_cluster_slots(&reply, &asked(false)).unwrap();
        assert_eq!(shards.len(), 2);
        assert_eq!(shards[0].slots, vec![0..=99, 200..=16383]);
        assert_eq!(shards[1].slots, vec![100..=199]);
        assert_eq!(shards[0].replicas.len(), 1);
    }

    #[test]
    fn cluster_slots_with_host_names_keeps_the_name_and_the_metadata_ip() {
        // Redis 7: [endpoint, port, id, {ip}] when the endpoint is a host name,
        // [ip, port, id, {hostname}] when it is an IP.
        let reply = Value::Array(vec![Value::Array(vec![
            Value::Int(0),
            Value::Int(16383),
            Value::Array(vec![
                bulk("node1.exp.test"),
                Value::Int(23000),
                bulk("m"),
                Value::Array(vec![bulk("ip"), bulk("127.55.0.1")]),
            ]),
            Value::Array(vec![
                bulk("127.55.0.2"),
                Value::Int(23000),
                bulk("r"),
                Value::Array(vec![bulk("hostname"), bulk("node2.exp.test")]),
            ]),
        ])]);
        let shards = parse_cluster_slots(&reply, &asked(true)).unwrap();
        let master = shards[0].master.as_ref().unwrap();
        assert_eq!(master.endpoint, ep("node1.exp.test:23000"));
        assert_eq!(master.ip, Some("127.55.0.1".parse().unwrap()));
        // An IP endpoint stays the endpoint: the cluster prefers IPs for it.
        assert_eq!(shards[0].replicas[0].endpoint, ep("127.55.0.2:23000"));
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        assert!(parse_cluster_shards(&Value::Int(1), &asked(false)).is_err());
        assert!(parse_cluster_slots(&Value::Array(vec![Value::Int(1)]), &asked(false)).is_err());
        let bad_slot = Value::Array(vec![Value::Array(vec![
            Value::Int(0),
            Value::Int(99999),
            Value::Array(vec![bulk("127.0.0.1"), Value::Int(1)]),
        ])]);
        assert!(parse_cluster_slots(&bad_slot, &asked(false)).is_err());
        let no_port = Value::Array(vec![shard(
            0,
            16383,
            vec![entry(&[("id", bulk("m")), ("role", bulk("master"))])],
        )]);
        assert!(parse_cluster_shards(&no_port, &asked(false)).is_err());
        // A host that is neither a name nor an IP is skipped, not trusted.
        let bad_host = Value::Array(vec![shard(
            0,
            16383,
            vec![node("m", "not an ip", 7000, "master", "online")],
        )]);
        let shards = parse_cluster_shards(&bad_host, &asked(false)).unwrap();
        assert!(shards[0].master.is_none(), "{shards:?}");
    }

    fn topology_node(endpoint: &str, ip: Option<&str>, role: NodeRole) -> TopologyNode {
        TopologyNode {
            id: endpoint.into(),
            endpoint: ep(endpoint),
            ip: ip.map(|i| i.parse().unwrap()),
            role,
            health: NodeHealth::Online,
        }
    }

    fn snap(master: TopologyNode, replica: TopologyNode) -> TopologySnapshot {
        TopologySnapshot {
            shards: vec![Shard {
                slots: vec![0..=16383],
                master: Some(master),
                replicas: vec![replica],
            }],
            agreed_by: 1,
            answered: 1,
            asked: 1,
            taken_at: SystemTime::now(),
            sequence: 1,
        }
    }

    #[test]
    fn changes_name_master_moves_and_node_churn() {
        let shard = |m: &str, r: &str| {
            snap(
                topology_node(m, None, NodeRole::Master),
                topology_node(r, None, NodeRole::Replica),
            )
        };
        let before = shard("127.0.0.1:1", "127.0.0.2:1");
        let after = shard("127.0.0.2:1", "127.0.0.3:1");
        let changes = after.changes_since(&before);
        assert!(changes.contains(&TopologyChange::NodeAdded(ep("127.0.0.3:1"))));
        assert!(changes.contains(&TopologyChange::NodeRemoved(ep("127.0.0.1:1"))));
        assert!(changes
            .iter()
            .any(|c| matches!(c, TopologyChange::MasterChanged { .. })));
        assert!(after.changes_since(&after).is_empty());
    }

    #[test]
    fn a_named_node_at_a_new_ip_is_a_move_not_a_new_node() {
        let before = snap(
            topology_node("a.test:1", Some("127.0.0.1"), NodeRole::Master),
            topology_node("b.test:1", Some("127.0.0.2"), NodeRole::Replica),
        );
        let after = snap(
            topology_node("a.test:1", Some("127.0.0.7"), NodeRole::Master),
            topology_node("b.test:1", Some("127.0.0.2"), NodeRole::Replica),
        );
        let changes = after.changes_since(&before);
        assert_eq!(
            changes,
            vec![TopologyChange::NodeMoved {
                endpoint: ep("a.test:1"),
                from: Some("127.0.0.1".parse().unwrap()),
                to: Some("127.0.0.7".parse().unwrap()),
            }]
        );
        assert_eq!(view_key(&after.shards), view_key(&before.shards));
    }
}
