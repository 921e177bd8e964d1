//! [`TopologySnapshot`]: who serves which slots, as the cluster itself reports it.

use std::{
    collections::{BTreeSet, HashSet},
    fmt,
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    time::SystemTime,
};

use redis::Value;

use crate::{Error, ErrorKind};

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
    /// Where clients reach it.
    pub addr: SocketAddr,
    /// Master or replica.
    pub role: NodeRole,
    /// Health as reported.
    pub health: NodeHealth,
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
    /// The addresses of every node, masters and replicas.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        let mut addrs: Vec<SocketAddr> = self
            .shards
            .iter()
            .flat_map(|s| s.nodes().map(|n| n.addr))
            .collect();
        addrs.sort();
        addrs.dedup();
        addrs
    }

    /// The masters' addresses.
    pub fn masters(&self) -> Vec<SocketAddr> {
        self.shards
            .iter()
            .filter_map(|s| s.master.as_ref().map(|m| m.addr))
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
        let before: HashSet<SocketAddr> = previous.addrs().into_iter().collect();
        let after: HashSet<SocketAddr> = self.addrs().into_iter().collect();
        for added in after.difference(&before) {
            changes.push(TopologyChange::NodeAdded(*added));
        }
        for removed in before.difference(&after) {
            changes.push(TopologyChange::NodeRemoved(*removed));
        }
        for shard in &self.shards {
            let Some(first) = shard.slots.first().map(|r| *r.start()) else {
                continue;
            };
            let old = previous.shard_for_slot(first);
            let old_master = old.and_then(|s| s.master.as_ref()).map(|m| m.addr);
            let new_master = shard.master.as_ref().map(|m| m.addr);
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
pub enum TopologyChange {
    /// A node appeared.
    NodeAdded(SocketAddr),
    /// A node disappeared.
    NodeRemoved(SocketAddr),
    /// The shard holding `first_slot` has another master.
    MasterChanged {
        /// The first slot of the shard.
        first_slot: u16,
        /// The previous master.
        from: Option<SocketAddr>,
        /// The new master.
        to: Option<SocketAddr>,
    },
    /// Slot ranges moved between shards.
    SlotsMoved,
}

impl fmt::Display for TopologyChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopologyChange::NodeAdded(a) => write!(f, "node added {a}"),
            TopologyChange::NodeRemoved(a) => write!(f, "node removed {a}"),
            TopologyChange::MasterChanged {
                first_slot,
                from,
                to,
            } => write!(
                f,
                "master of slot {first_slot} changed {} → {}",
                from.map_or("none".into(), |a| a.to_string()),
                to.map_or("none".into(), |a| a.to_string())
            ),
            TopologyChange::SlotsMoved => f.write_str("slots moved"),
        }
    }
}

/// Slot range bounds and the master serving them.
type SlotOwner = (u16, u16, Option<SocketAddr>);

/// The part of a view nodes must agree on: slot ranges → master address, and the node set.
pub(crate) fn view_key(shards: &[Shard]) -> (Vec<SlotOwner>, BTreeSet<SocketAddr>) {
    let mut slots: Vec<SlotOwner> = shards
        .iter()
        .flat_map(|s| {
            let master = s.master.as_ref().map(|m| m.addr);
            s.slots.iter().map(move |r| (*r.start(), *r.end(), master))
        })
        .collect();
    slots.sort();
    let nodes = shards
        .iter()
        .flat_map(|s| {
            s.nodes()
                .filter(|n| n.health != NodeHealth::Failed)
                .map(|n| n.addr)
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

fn node_addr(ip: &str, port: u16, fallback_ip: IpAddr) -> Option<SocketAddr> {
    // A node that announces nothing reports an empty ip for itself: it is the node we asked.
    let ip = if ip.is_empty() || ip == "?" {
        fallback_ip
    } else {
        ip.parse().ok()?
    };
    Some(SocketAddr::new(ip, port))
}

/// Parses a `CLUSTER SHARDS` reply (Redis 7+). `asked` is the node that answered.
pub(crate) fn parse_cluster_shards(reply: &Value, asked: SocketAddr) -> Result<Vec<Shard>, Error> {
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
                        let port = get("port")
                            .or_else(|| get("tls-port"))
                            .and_then(as_int)
                            .and_then(|p| u16::try_from(p).ok())
                            .ok_or_else(|| malformed("node port"))?;
                        let ip = get("ip").and_then(as_str).unwrap_or_default();
                        let Some(addr) = node_addr(&ip, port, asked.ip()) else {
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
                            addr,
                            role,
                            health,
                        };
                        if role == NodeRole::Master && master.is_none() {
                            master = Some(node);
                        } else {
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

/// Parses a `CLUSTER SLOTS` reply (for servers before 7.0).
pub(crate) fn parse_cluster_slots(reply: &Value, asked: SocketAddr) -> Result<Vec<Shard>, Error> {
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
            let ip = fields.first().and_then(as_str).unwrap_or_default();
            let port = fields
                .get(1)
                .and_then(as_int)
                .and_then(|p| u16::try_from(p).ok())
                .ok_or_else(|| malformed("slot node port"))?;
            let id = fields.get(2).and_then(as_str).unwrap_or_default();
            let Some(addr) = node_addr(&ip, port, asked.ip()) else {
                continue;
            };
            nodes.push(TopologyNode {
                id,
                addr,
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

    fn node(id: &str, ip: &str, port: i64, role: &str, health: &str) -> Value {
        Value::Array(vec![
            bulk("id"),
            bulk(id),
            bulk("port"),
            Value::Int(port),
            bulk("ip"),
            bulk(ip),
            bulk("endpoint"),
            bulk(ip),
            bulk("role"),
            bulk(role),
            bulk("replication-offset"),
            Value::Int(0),
            bulk("health"),
            bulk(health),
        ])
    }

    fn asked() -> SocketAddr {
        "127.0.0.9:7000".parse().unwrap()
    }

    #[test]
    fn parses_resp2_cluster_shards() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                bulk("slots"),
                Value::Array(vec![Value::Int(0), Value::Int(8191)]),
                bulk("nodes"),
                Value::Array(vec![
                    node("r1", "127.0.0.2", 7000, "replica", "online"),
                    node("m1", "127.0.0.1", 7000, "master", "online"),
                ]),
            ]),
            Value::Array(vec![
                bulk("slots"),
                Value::Array(vec![Value::Int(8192), Value::Int(16383)]),
                bulk("nodes"),
                Value::Array(vec![
                    node("m2", "", 7001, "master", "online"),
                    node("x", "127.0.0.4", 7000, "replica", "failed"),
                ]),
            ]),
        ]);
        let shards = parse_cluster_shards(&reply, asked()).unwrap();
        assert_eq!(shards.len(), 2);
        assert_eq!(shards[0].master.as_ref().unwrap().id, "m1");
        assert_eq!(
            shards[0].replicas[0].addr,
            "127.0.0.2:7000".parse().unwrap()
        );
        // An empty ip is the node that was asked.
        assert_eq!(
            shards[1].master.as_ref().unwrap().addr,
            "127.0.0.9:7001".parse().unwrap()
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
        assert_eq!(snapshot.addrs().len(), 4);
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
        let shards = parse_cluster_slots(&reply, asked()).unwrap();
        assert_eq!(shards.len(), 2);
        assert_eq!(shards[0].slots, vec![0..=99, 200..=16383]);
        assert_eq!(shards[1].slots, vec![100..=199]);
        assert_eq!(shards[0].replicas.len(), 1);
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        assert!(parse_cluster_shards(&Value::Int(1), asked()).is_err());
        assert!(parse_cluster_slots(&Value::Array(vec![Value::Int(1)]), asked()).is_err());
        let bad_slot = Value::Array(vec![Value::Array(vec![
            Value::Int(0),
            Value::Int(99999),
            Value::Array(vec![bulk("127.0.0.1"), Value::Int(1)]),
        ])]);
        assert!(parse_cluster_slots(&bad_slot, asked()).is_err());
    }

    #[test]
    fn changes_name_master_moves_and_node_churn() {
        let shard = |master: &str, replica: &str| Shard {
            slots: vec![0..=16383],
            master: Some(TopologyNode {
                id: master.into(),
                addr: master.parse().unwrap(),
                role: NodeRole::Master,
                health: NodeHealth::Online,
            }),
            replicas: vec![TopologyNode {
                id: replica.into(),
                addr: replica.parse().unwrap(),
                role: NodeRole::Replica,
                health: NodeHealth::Online,
            }],
        };
        let snap = |s: Shard| TopologySnapshot {
            shards: vec![s],
            agreed_by: 1,
            answered: 1,
            asked: 1,
            taken_at: SystemTime::now(),
            sequence: 1,
        };
        let before = snap(shard("127.0.0.1:1", "127.0.0.2:1"));
        let after = snap(shard("127.0.0.2:1", "127.0.0.3:1"));
        let changes = after.changes_since(&before);
        assert!(changes.contains(&TopologyChange::NodeAdded("127.0.0.3:1".parse().unwrap())));
        assert!(changes.contains(&TopologyChange::NodeRemoved("127.0.0.1:1".parse().unwrap())));
        assert!(changes
            .iter()
            .any(|c| matches!(c, TopologyChange::MasterChanged { .. })));
        assert!(after.changes_since(&after).is_empty());
    }
}
