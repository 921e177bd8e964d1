//! Endpoints and seeds: the names a cluster and its nodes are reached by, kept exactly as
//! configured or announced.

use std::{fmt, str::FromStr};

use super::Credentials;
use crate::Error;

/// The default Redis port, used when a seed names none.
pub const DEFAULT_PORT: u16 = 6379;

/// Where a node or a cluster is reached: a host *name* (or IP literal) and a port.
///
/// The one address type of the crate: configured seeds, the nodes of a
/// [`TopologySnapshot`](crate::topology::TopologySnapshot), the rebuild layer's known nodes and
/// a connect's extra seeds are all endpoints. A node's endpoint is what the cluster *announces*
/// for it — its host name when the cluster announces names (Redis 7
/// `cluster-announce-hostname` with `cluster-preferred-endpoint-type hostname`, as managed
/// services do), its IP otherwise — with the port of the transport in use (`tls-port` under TLS).
///
/// An endpoint is never replaced by the addresses it resolved to: after a failover those
/// addresses may be gone, while the name follows the node. The IPs a name last resolved to are
/// kept apart, as a fallback for connecting (see [`ClusterConnector`](super::ClusterConnector)),
/// and TLS is always verified against the name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    host: String,
    port: u16,
}

impl Endpoint {
    /// An endpoint from a host name or IP literal and a port.
    pub fn new(host: impl Into<String>, port: u16) -> Result<Self, Error> {
        let host = host.into();
        let trimmed = host.trim_start_matches('[').trim_end_matches(']');
        if trimmed.is_empty() {
            return Err(Error::config("a seed needs a host name"));
        }
        if trimmed
            .chars()
            .any(|c| c.is_whitespace() || c == '/' || c == '@')
        {
            return Err(Error::config(format!(
                "seed host {trimmed:?} is not a host name or IP address"
            )));
        }
        if port == 0 {
            return Err(Error::config(format!("seed {trimmed:?} has port 0")));
        }
        // Names are compared as DNS compares them (case-insensitively), IPs in canonical form,
        // so the same node announced twice is one endpoint.
        let host = match trimmed.parse::<std::net::IpAddr>() {
            Ok(ip) => ip.to_string(),
            Err(_) => trimmed.to_ascii_lowercase(),
        };
        Ok(Endpoint { host, port })
    }

    /// The host name or IP literal, as configured (IPv6 without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the host is an IP literal rather than a name.
    pub fn is_ip(&self) -> bool {
        self.ip().is_some()
    }

    /// The host as an IP address, when it is an IP literal.
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        self.host.parse().ok()
    }
}

/// An IP address and port as an endpoint (an IP literal: it will not follow a failover).
impl From<std::net::SocketAddr> for Endpoint {
    fn from(addr: std::net::SocketAddr) -> Self {
        Endpoint {
            host: addr.ip().to_string(),
            port: addr.port(),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// An endpoint as text: `host`, `host:port`, `[v6]:port`, or a `redis://` / `rediss://` URL.
/// Credentials in a URL are ignored here; use [`Seeds::parse`] to keep them.
impl FromStr for Endpoint {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(parse_seed(s)?.seed)
    }
}

/// The configured entry points of a cluster, plus what their URLs said about TLS and
/// credentials.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Seeds {
    seeds: Vec<Endpoint>,
    tls: bool,
    credentials: Option<Credentials>,
}

impl Seeds {
    /// Seeds from already parsed entries.
    pub fn new(seeds: impl IntoIterator<Item = Endpoint>) -> Self {
        Seeds {
            seeds: seeds.into_iter().collect(),
            tls: false,
            credentials: None,
        }
    }

    /// Parses each entry (`host:port` or URL). All URLs must agree on `redis://` vs `rediss://`;
    /// credentials are taken from the first URL that has them.
    pub fn parse<I, S>(entries: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut out = Seeds::default();
        let mut scheme: Option<bool> = None;
        for entry in entries {
            let parsed = parse_seed(entry.as_ref())?;
            if let Some(tls) = parsed.tls {
                match scheme {
                    Some(previous) if previous != tls => {
                        return Err(Error::config(
                            "seeds mix redis:// and rediss:// URLs; use one scheme for a cluster",
                        ))
                    }
                    _ => scheme = Some(tls),
                }
            }
            if out.credentials.is_none() {
                out.credentials = parsed.credentials;
            }
            if !out.seeds.contains(&parsed.seed) {
                out.seeds.push(parsed.seed);
            }
        }
        if out.seeds.is_empty() {
            return Err(Error::config(
                "no seeds: give at least one host:port or redis:// URL of the cluster",
            ));
        }
        out.tls = scheme.unwrap_or(false);
        Ok(out)
    }

    /// The seeds, in configured order.
    pub fn iter(&self) -> std::slice::Iter<'_, Endpoint> {
        self.seeds.iter()
    }

    /// How many seeds there are.
    pub fn len(&self) -> usize {
        self.seeds.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.seeds.is_empty()
    }

    /// Whether a `rediss://` URL asked for TLS.
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// Credentials found in a URL, if any.
    pub fn credentials(&self) -> Option<&Credentials> {
        self.credentials.as_ref()
    }

    /// Adds a seed (duplicates are ignored).
    pub fn push(&mut self, seed: Endpoint) {
        if !self.seeds.contains(&seed) {
            self.seeds.push(seed);
        }
    }
}

impl<'a> IntoIterator for &'a Seeds {
    type Item = &'a Endpoint;
    type IntoIter = std::slice::Iter<'a, Endpoint>;

    fn into_iter(self) -> Self::IntoIter {
        self.seeds.iter()
    }
}

struct ParsedSeed {
    seed: Endpoint,
    tls: Option<bool>,
    credentials: Option<Credentials>,
}

fn parse_seed(input: &str) -> Result<ParsedSeed, Error> {
    let input = input.trim();
    let (tls, rest) = if let Some(rest) = input.strip_prefix("rediss://") {
        (Some(true), rest)
    } else if let Some(rest) = input.strip_prefix("redis://") {
        (Some(false), rest)
    } else if input.contains("://") {
        return Err(Error::config(format!(
            "seed {:?} has an unsupported scheme; use redis:// or rediss://",
            redact_userinfo(input)
        )));
    } else {
        (None, input)
    };
    // Drop a path (`/0`) or query; a cluster has a single database.
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let (userinfo, hostport) = match authority.rfind('@') {
        Some(at) if tls.is_some() => (Some(&authority[..at]), &authority[at + 1..]),
        Some(_) => {
            return Err(Error::config(
                "credentials in a seed need the URL form redis://user:password@host:port",
            ))
        }
        None => (None, authority),
    };
    let (host, port) = split_host_port(hostport)?;
    let credentials = match userinfo {
        None => None,
        Some(info) => {
            let (user, pass) = match info.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (info, None),
            };
            let user = percent_decode(user)?;
            match pass {
                Some(p) => Some(Credentials {
                    username: (!user.is_empty()).then_some(user),
                    password: percent_decode(p)?.into(),
                }),
                None if user.is_empty() => None,
                None => {
                    return Err(Error::config(
                        "a seed URL names a user but no password (redis://user:password@host)",
                    ))
                }
            }
        }
    };
    Ok(ParsedSeed {
        seed: Endpoint::new(host, port)?,
        tls,
        credentials,
    })
}

fn split_host_port(hostport: &str) -> Result<(&str, u16), Error> {
    if hostport.is_empty() {
        return Err(Error::config("a seed needs a host name"));
    }
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let end = v6
            .find(']')
            .ok_or_else(|| Error::config(format!("seed {hostport:?}: unclosed '['")))?;
        let after = &v6[end + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(Error::config(format!("seed {hostport:?} is malformed"))),
        };
        (&v6[..end], port)
    } else if hostport.matches(':').count() > 1 {
        // A bare IPv6 address without a port.
        (hostport, None)
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => p.parse::<u16>().map_err(|_| {
            Error::config(format!(
                "seed {hostport:?}: port {p:?} is not a number in 1..=65535"
            ))
        })?,
    };
    Ok((host, port))
}

fn percent_decode(s: &str) -> Result<String, Error> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| Error::config("a seed URL has a malformed %-escape"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| Error::config("a seed URL's credentials are not UTF-8"))
}

/// The input with any `user:password@` removed, for error messages.
pub(crate) fn redact_userinfo(input: &str) -> String {
    match (input.find("://"), input.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}<redacted>@{}", &input[..scheme + 3], &input[at + 1..])
        }
        _ => input.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_kept_as_given() {
        let seeds = Seeds::parse(["clustercfg.my-cluster.amazonaws.com:6380", "10.0.0.5"]).unwrap();
        let v: Vec<_> = seeds.iter().map(|s| (s.host(), s.port())).collect();
        assert_eq!(
            v,
            [
                ("clustercfg.my-cluster.amazonaws.com", 6380),
                ("10.0.0.5", DEFAULT_PORT)
            ]
        );
        assert!(!seeds.iter().next().unwrap().is_ip());
        assert!(seeds.iter().nth(1).unwrap().is_ip());
        assert!(!seeds.tls());
    }

    #[test]
    fn urls_give_tls_and_decoded_credentials() {
        let seeds = Seeds::parse(["rediss://app:p%40ss%3Aw0rd@cfg.example:6379/0"]).unwrap();
        assert!(seeds.tls());
        let c = seeds.credentials().unwrap();
        assert_eq!(c.username.as_deref(), Some("app"));
        assert_eq!(c.password.expose(), "p@ss:w0rd");
        assert_eq!(seeds.iter().next().unwrap().to_string(), "cfg.example:6379");
    }

    #[test]
    fn password_only_url() {
        let seeds = Seeds::parse(["redis://:hunter2@h:7000"]).unwrap();
        let c = seeds.credentials().unwrap();
        assert_eq!(c.username, None);
        assert_eq!(c.password.expose(), "hunter2");
    }

    #[test]
    fn ipv6_forms() {
        assert_eq!("[::1]:7000".parse::<Endpoint>().unwrap().host(), "::1");
        assert_eq!(
            "[::1]:7000".parse::<Endpoint>().unwrap().to_string(),
            "[::1]:7000"
        );
        assert_eq!("::1".parse::<Endpoint>().unwrap().port(), DEFAULT_PORT);
    }

    #[test]
    fn bad_input_is_a_config_error_that_names_the_problem() {
        for (input, needle) in [
            ("", "needs a host name"),
            ("host:notaport", "port"),
            ("host:70000", "port"),
            ("http://host:1", "scheme"),
            ("user:pw@host:1", "URL form"),
            ("redis://user@host:1", "no password"),
            ("host:0", "port 0"),
            ("[::1:7000", "unclosed"),
        ] {
            let e = Seeds::parse([input]).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Config, "{input}");
            assert!(e.to_string().contains(needle), "{input}: {e}");
        }
        assert!(Seeds::parse(Vec::<String>::new()).is_err());
        let mixed = Seeds::parse(["redis://a:1", "rediss://b:1"]).unwrap_err();
        assert!(mixed.to_string().contains("mix"));
    }

    #[test]
    fn secrets_never_show_in_debug_or_errors() {
        let seeds = Seeds::parse(["redis://app:topsecret@h:1"]).unwrap();
        assert!(!format!("{seeds:?}").contains("topsecret"));
        let e = Seeds::parse(["http://app:topsecret@h:1"]).unwrap_err();
        assert!(!e.to_string().contains("topsecret"), "{e}");
    }

    #[test]
    fn duplicates_are_dropped() {
        let seeds = Seeds::parse(["a:1", "a:1", "b:1"]).unwrap();
        assert_eq!(seeds.len(), 2);
    }
}
