//! Reading the cluster's own view of itself (`CLUSTER NODES`, `CLUSTER INFO`,
//! `INFO replication`) and deciding whether it is healthy.
//!
//! Kept free of I/O so the rules can be unit-tested on canned replies.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
};

use super::Role;

/// Number of hash slots in a Redis Cluster.
pub(crate) const SLOTS: u16 = 16_384;

/// The slots `[start, end]` of shard `shard` of `shards`, split as evenly as possible.
pub(crate) fn shard_slots(shard: usize, shards: usize) -> (u16, u16) {
    let total = usize::from(SLOTS);
    let start = shard * total / shards;
    let end = (shard + 1) * total / shards - 1;
    (start as u16, end as u16)
}

/// One line of `CLUSTER NODES`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ViewEntry {
    pub(crate) id: String,
    /// `None` for `noaddr`/`:0` entries.
    pub(crate) addr: Option<SocketAddr>,
    /// The announced host name (`ip:port@cport,hostname`), if any.
    pub(crate) hostname: Option<String>,
    pub(crate) myself: bool,
    pub(crate) master: bool,
    pub(crate) replica: bool,
    /// `fail?`: this node suspects the other one.
    pub(crate) pfail: bool,
    /// `fail`: a majority of masters agreed it is down.
    pub(crate) fail: bool,
    pub(crate) handshake: bool,
    pub(crate) noaddr: bool,
    pub(crate) master_id: Option<String>,
    pub(crate) connected: bool,
    /// Stable slot ranges; importing/migrating markers (`[slot->-id]`) are ignored.
    pub(crate) slots: Vec<(u16, u16)>,
}

/// Parses `CLUSTER NODES`.
///
/// Format: `<id> <ip:port@cport[,hostname]> <flags> <master> <ping-sent> <pong-recv>
/// <config-epoch> <link-state> <slot>...`.
pub(crate) fn parse_cluster_nodes(text: &str) -> Result<Vec<ViewEntry>, String> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            return Err(format!("short CLUSTER NODES line: {line:?}"));
        }
        let addr_field = fields[1].split(['@', ',']).next().unwrap_or("");
        // After the first comma: the host name, then (Redis 7.2+) `key=value` aux fields.
        let hostname = fields[1]
            .split(',')
            .nth(1)
            .filter(|h| !h.is_empty() && !h.contains('='))
            .map(str::to_owned);
        let addr = addr_field.rsplit_once(':').and_then(|(host, port)| {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port: u16 = port.parse().ok()?;
            let ip = host.parse().ok()?;
            (port != 0).then(|| SocketAddr::new(ip, port))
        });
        let flags: HashSet<&str> = fields[2].split(',').collect();
        let mut slots = Vec::new();
        for s in &fields[8..] {
            if s.starts_with('[') {
                continue;
            }
            let range = match s.split_once('-') {
                Some((a, b)) => (a.parse(), b.parse()),
                None => (s.parse(), s.parse()),
            };
            match range {
                (Ok(a), Ok(b)) => slots.push((a, b)),
                _ => return Err(format!("bad slot {s:?} in CLUSTER NODES line {line:?}")),
            }
        }
        out.push(ViewEntry {
            id: fields[0].to_owned(),
            addr,
            hostname,
            myself: flags.contains("myself"),
            master: flags.contains("master"),
            replica: flags.contains("slave"),
            pfail: flags.contains("fail?"),
            fail: flags.contains("fail"),
            handshake: flags.contains("handshake"),
            noaddr: flags.contains("noaddr"),
            master_id: (fields[3] != "-").then(|| fields[3].to_owned()),
            connected: fields[7] == "connected",
            slots,
        });
    }
    Ok(out)
}

/// The value of `key` in a `key:value` per line reply (`CLUSTER INFO`, `INFO`).
pub(crate) fn info_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        l.trim_end()
            .strip_prefix(key)
            .and_then(|rest| rest.strip_prefix(':'))
    })
}

/// A cluster member as the harness expects it.
#[derive(Clone, Debug)]
pub(crate) struct Expected {
    pub(crate) id: String,
    pub(crate) addr: SocketAddr,
    /// `false` for a member whose process the harness killed and has not forgotten
    /// (`kill_node`, `stop_all`): it may be flagged failed but must not serve slots.
    pub(crate) running: bool,
    /// The host name it announces, with `announce_hostnames`.
    pub(crate) hostname: Option<String>,
}

/// What one running node answered.
#[derive(Clone, Debug)]
pub(crate) struct Observation {
    pub(crate) addr: SocketAddr,
    pub(crate) cluster_info: String,
    pub(crate) cluster_nodes: String,
    pub(crate) replication: String,
}

/// The agreed topology of a healthy cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Agreed {
    /// For every running member: its role and shard.
    pub(crate) roles: HashMap<String, (Role, usize)>,
    /// For every running replica: the id of its master.
    pub(crate) master_of: HashMap<String, String>,
}

/// Decides whether the cluster is healthy; on failure says why, in one line.
///
/// Healthy means, for every running member: `cluster_state:ok` with all 16384 slots assigned and
/// ok; it knows exactly the expected members (so forgotten nodes are gone and no stranger is
/// there) at their expected addresses; it flags no running member `fail`, `fail?`, `handshake`
/// or `noaddr` and has a connected link to each; every slot is served by a running master; and
/// all running members agree on who serves which slot and on every running member's role and
/// master. Every shard's slot range is served by a single master. With `require_sync`, every
/// running replica also reports `master_link_status:up` towards that master, with no sync in
/// progress.
pub(crate) fn evaluate(
    expected: &[Expected],
    observations: &[Observation],
    shards: usize,
    require_sync: bool,
) -> Result<Agreed, String> {
    let running: HashMap<&str, &Expected> = expected
        .iter()
        .filter(|e| e.running)
        .map(|e| (e.id.as_str(), e))
        .collect();
    if running.is_empty() {
        return Err("no node is running".into());
    }
    let expected_ids: HashSet<&str> = expected.iter().map(|e| e.id.as_str()).collect();
    let by_id: HashMap<&str, &Expected> = expected.iter().map(|e| (e.id.as_str(), e)).collect();

    // Slot ranges (start -> (end, owner)) and roles (id -> (is_master, master id)) per view.
    type Ranges = BTreeMap<u16, (u16, String)>;
    type Roles = BTreeMap<String, (bool, Option<String>)>;
    let mut first: Option<(SocketAddr, Ranges, Roles)> = None;

    for obs in observations {
        let at = obs.addr;
        let state = info_field(&obs.cluster_info, "cluster_state").unwrap_or("?");
        if state != "ok" {
            return Err(format!("{at} reports cluster_state:{state}"));
        }
        for key in ["cluster_slots_assigned", "cluster_slots_ok"] {
            let v = info_field(&obs.cluster_info, key).unwrap_or("?");
            if v != "16384" {
                return Err(format!("{at} reports {key}:{v}"));
            }
        }
        let view = parse_cluster_nodes(&obs.cluster_nodes).map_err(|e| format!("{at}: {e}"))?;

        let myself = view
            .iter()
            .find(|v| v.myself)
            .ok_or_else(|| format!("{at}: no `myself` line in CLUSTER NODES"))?;
        match running.get(myself.id.as_str()) {
            Some(e) if e.addr == at => {}
            _ => {
                return Err(format!(
                    "{at} answers as node {} which is not the node expected there",
                    myself.id
                ))
            }
        }

        let seen: HashSet<&str> = view.iter().map(|v| v.id.as_str()).collect();
        // A node that joined while a member was stopped may only have heard of the stopped one
        // through gossip, and then sits in a handshake with it (under a temporary id) that
        // cannot complete: tolerated, as is not knowing a stopped member at all.
        let stopped_handshake = |v: &ViewEntry| {
            v.handshake
                && expected
                    .iter()
                    .any(|e| !e.running && Some(e.addr) == v.addr)
        };
        if let Some(stranger) = view
            .iter()
            .find(|v| !expected_ids.contains(v.id.as_str()) && !stopped_handshake(v))
        {
            return Err(format!(
                "{at} still knows node {} at {:?} (forgotten or unknown to the harness)",
                stranger.id, stranger.addr
            ));
        }
        if let Some(missing) = expected
            .iter()
            .find(|e| e.running && !seen.contains(e.id.as_str()))
        {
            return Err(format!(
                "{at} does not know node {} ({})",
                missing.id, missing.addr
            ));
        }

        let mut ranges = BTreeMap::new();
        let mut roles = Roles::new();
        for v in view.iter().filter(|v| !stopped_handshake(v)) {
            let member = by_id[v.id.as_str()];
            if let Some(addr) = v.addr {
                if addr != member.addr {
                    return Err(format!(
                        "{at} sees node {} at {addr}, expected {}",
                        v.id, member.addr
                    ));
                }
            }
            if member.running && member.hostname.is_some() && v.hostname != member.hostname {
                return Err(format!(
                    "{at} sees node {} ({}) with host name {:?}, expected {:?}",
                    v.id, member.addr, v.hostname, member.hostname
                ));
            }
            if member.running {
                let bad = [
                    (v.fail, "fail"),
                    (v.pfail, "fail?"),
                    (v.handshake, "handshake"),
                    (v.noaddr, "noaddr"),
                    (!v.myself && !v.connected, "disconnected"),
                ];
                if let Some((_, flag)) = bad.iter().find(|(set, _)| *set) {
                    return Err(format!("{at} flags {} ({}) {flag}", v.id, member.addr));
                }
                roles.insert(v.id.clone(), (v.master, v.master_id.clone()));
            }
            for &(start, end) in &v.slots {
                if !member.running {
                    return Err(format!(
                        "{at} has slots {start}-{end} served by stopped node {} ({})",
                        v.id, member.addr
                    ));
                }
                if !v.master {
                    return Err(format!("{at} has slots served by non-master {}", v.id));
                }
                ranges.insert(start, (end, v.id.clone()));
            }
        }
        // Contiguous coverage of 0..=16383.
        let mut next = 0u32;
        for (&start, (end, _)) in &ranges {
            if u32::from(start) != next {
                return Err(format!("{at}: slot {next} is not served"));
            }
            next = u32::from(*end) + 1;
        }
        if next != u32::from(SLOTS) {
            return Err(format!("{at}: slot {next} is not served"));
        }

        match &first {
            None => first = Some((at, ranges, roles)),
            Some((first_at, first_ranges, first_roles)) => {
                if *first_ranges != ranges {
                    return Err(format!("{at} and {first_at} disagree on the slot owners"));
                }
                if *first_roles != roles {
                    let diff = roles
                        .iter()
                        .find(|(id, r)| first_roles.get(*id) != Some(*r))
                        .map(|(id, _)| id.clone())
                        .unwrap_or_default();
                    return Err(format!(
                        "{at} and {first_at} disagree on the role of node {diff}"
                    ));
                }
            }
        }
    }
    if observations.len() != running.len() {
        return Err(format!(
            "{} of {} running nodes answered",
            observations.len(),
            running.len()
        ));
    }
    let Some((_, ranges, roles)) = first else {
        return Err("no node answered".into());
    };

    // Shards: each shard's range must have exactly one owner.
    let owner_of = |slot: u16| -> Option<&str> {
        ranges
            .range(..=slot)
            .next_back()
            .filter(|(_, (end, _))| *end >= slot)
            .map(|(_, (_, id))| id.as_str())
    };
    let mut shard_of_master: HashMap<String, usize> = HashMap::new();
    for shard in 0..shards {
        let (start, end) = shard_slots(shard, shards);
        let owner = owner_of(start).ok_or_else(|| format!("slot {start} is not served"))?;
        let covered = ranges
            .iter()
            .filter(|(&s, _)| s >= start && s <= end)
            .all(|(_, (e, id))| id == owner && *e <= end);
        if !covered {
            return Err(format!(
                "shard {shard} (slots {start}-{end}) is not served by a single master"
            ));
        }
        if let Some(other) = shard_of_master.insert(owner.to_owned(), shard) {
            return Err(format!("node {owner} serves shards {other} and {shard}"));
        }
    }

    let mut agreed = Agreed {
        roles: HashMap::new(),
        master_of: HashMap::new(),
    };
    for (id, (is_master, master_id)) in &roles {
        if *is_master {
            let shard = *shard_of_master.get(id).ok_or_else(|| {
                format!("master {id} ({}) serves no slot", running[id.as_str()].addr)
            })?;
            agreed.roles.insert(id.clone(), (Role::Master, shard));
        } else {
            let master = master_id
                .as_deref()
                .ok_or_else(|| format!("node {id} is neither master nor replica"))?;
            let shard = *shard_of_master
                .get(master)
                .ok_or_else(|| format!("replica {id} follows {master}, which serves no slot"))?;
            agreed.roles.insert(id.clone(), (Role::Replica, shard));
            agreed.master_of.insert(id.clone(), master.to_owned());
        }
    }

    if require_sync {
        for obs in observations {
            let Some(id) = running
                .iter()
                .find(|(_, e)| e.addr == obs.addr)
                .map(|(id, _)| *id)
            else {
                continue;
            };
            let Some(master) = agreed.master_of.get(id) else {
                continue;
            };
            let master_addr = running[master.as_str()].addr;
            let r = &obs.replication;
            let link = info_field(r, "master_link_status").unwrap_or("?");
            let host = info_field(r, "master_host").unwrap_or("?");
            let port = info_field(r, "master_port").unwrap_or("?");
            let syncing = info_field(r, "master_sync_in_progress").unwrap_or("?");
            if host != master_addr.ip().to_string() || port != master_addr.port().to_string() {
                return Err(format!(
                    "replica {} replicates from {host}:{port}, expected {master_addr}",
                    obs.addr
                ));
            }
            if link != "up" || syncing != "0" {
                return Err(format!(
                    "replica {} is not in sync (master_link_status:{link}, \
                     master_sync_in_progress:{syncing})",
                    obs.addr
                ));
            }
        }
    }
    Ok(agreed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn nodes(myself: &str, b_flags: &str) -> String {
        let (fa, fb) = if myself == A {
            ("myself,master", b_flags.to_owned())
        } else {
            ("master", format!("myself,{b_flags}"))
        };
        format!(
            "{A} 127.2.3.1:20000@30000 {fa} - 0 0 1 connected 0-16383\n\
             {B} 127.2.3.2:20000@30000,host {fb} {A} 0 0 1 connected\n"
        )
    }

    fn obs(at: &str, myself: &str, b_flags: &str) -> Observation {
        Observation {
            addr: addr(at),
            cluster_info: "cluster_state:ok\r\ncluster_slots_assigned:16384\r\ncluster_slots_ok:16384\r\n".into(),
            cluster_nodes: nodes(myself, b_flags),
            replication: "role:slave\r\nmaster_host:127.2.3.1\r\nmaster_port:20000\r\nmaster_link_status:up\r\nmaster_sync_in_progress:0\r\n".into(),
        }
    }

    fn expected() -> Vec<Expected> {
        vec![
            Expected {
                id: A.into(),
                addr: addr("127.2.3.1:20000"),
                running: true,
                hostname: None,
            },
            Expected {
                id: B.into(),
                addr: addr("127.2.3.2:20000"),
                running: true,
                hostname: None,
            },
        ]
    }

    #[test]
    fn parses_lines() {
        let v = parse_cluster_nodes(
            "e7d1 127.0.0.1:30004@31004,hostname4 slave,fail? e2b0 0 1 1 disconnected\n\
             e2b0 :0@0 master,noaddr - 0 0 2 connected 0-5 7 [8->-e7d1]\n",
        )
        .unwrap();
        assert_eq!(v[0].addr, Some(addr("127.0.0.1:30004")));
        assert!(v[0].replica && v[0].pfail && !v[0].fail && !v[0].connected);
        assert_eq!(v[0].master_id.as_deref(), Some("e2b0"));
        assert_eq!(v[1].addr, None);
        assert!(v[1].master && v[1].noaddr);
        assert_eq!(v[1].slots, vec![(0, 5), (7, 7)]);
    }

    #[test]
    fn host_names_are_parsed_and_checked() {
        let v = parse_cluster_nodes(&nodes(A, "slave")).unwrap();
        assert_eq!(v[0].hostname, None);
        assert_eq!(v[1].hostname.as_deref(), Some("host"));
        let v = parse_cluster_nodes(
            "e7d1 127.0.0.1:30004@31004,,shard-id=ab slave e2b0 0 1 1 connected\n",
        )
        .unwrap();
        assert_eq!(v[0].hostname, None);
        let o = [
            obs("127.2.3.1:20000", A, "slave"),
            obs("127.2.3.2:20000", B, "slave"),
        ];
        let mut e = expected();
        e[1].hostname = Some("host".into());
        assert!(evaluate(&e, &o, 1, true).is_ok());
        e[1].hostname = Some("other".into());
        let err = evaluate(&e, &o, 1, true).unwrap_err();
        assert!(err.contains("host name"), "{err}");
    }

    #[test]
    fn shard_ranges_cover_all_slots() {
        assert_eq!(shard_slots(0, 3), (0, 5460));
        assert_eq!(shard_slots(1, 3), (5461, 10921));
        assert_eq!(shard_slots(2, 3), (10922, 16383));
        assert_eq!(shard_slots(0, 1), (0, 16383));
    }

    #[test]
    fn healthy_when_all_agree() {
        let o = [
            obs("127.2.3.1:20000", A, "slave"),
            obs("127.2.3.2:20000", B, "slave"),
        ];
        let agreed = evaluate(&expected(), &o, 1, true).unwrap();
        assert_eq!(agreed.roles[A], (Role::Master, 0));
        assert_eq!(agreed.roles[B], (Role::Replica, 0));
        assert_eq!(agreed.master_of[B], A);
    }

    #[test]
    fn unhealthy_when_a_node_is_suspected() {
        let o = [
            obs("127.2.3.1:20000", A, "slave,fail?"),
            obs("127.2.3.2:20000", B, "slave"),
        ];
        let err = evaluate(&expected(), &o, 1, false).unwrap_err();
        assert!(err.contains("fail?"), "{err}");
    }

    #[test]
    fn unhealthy_when_a_forgotten_node_is_still_known() {
        let mut e = expected();
        e.pop();
        let o = [obs("127.2.3.1:20000", A, "slave")];
        let err = evaluate(&e, &o, 1, false).unwrap_err();
        assert!(err.contains("still knows"), "{err}");
    }

    #[test]
    fn unhealthy_when_replica_not_in_sync() {
        let mut o = [
            obs("127.2.3.1:20000", A, "slave"),
            obs("127.2.3.2:20000", B, "slave"),
        ];
        o[1].replication = o[1]
            .replication
            .replace("link_status:up", "link_status:down");
        assert!(evaluate(&expected(), &o, 1, false).is_ok());
        let err = evaluate(&expected(), &o, 1, true).unwrap_err();
        assert!(err.contains("not in sync"), "{err}");
    }
}
