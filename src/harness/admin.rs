//! Admin connections to single nodes: always bounded in time.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use redis::{
    aio::MultiplexedConnection, AsyncConnectionConfig, ConnectionAddr, FromRedisValue,
    IntoConnectionInfo, RedisConnectionInfo,
};

use super::{error::HarnessError, tls::AdminTls};

/// How long establishing an admin connection (TCP + AUTH) may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long an admin command may wait for its reply.
pub(crate) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How admin connections (and `node_urls`) reach and log into nodes.
#[derive(Clone, Debug, Default)]
pub(crate) struct Credentials {
    pub(crate) user: Option<String>,
    pub(crate) password: Option<String>,
    /// Set on TLS nodes, which have no plaintext port: the CA that verifies them and the
    /// harness's client certificate.
    pub(crate) tls: Option<Arc<AdminTls>>,
    /// With names-only node certificates: the name to verify every node against (one the
    /// wildcard covers), instead of its IP, which the certificates do not carry.
    pub(crate) tls_name: Option<String>,
}

impl Credentials {
    pub(crate) fn connection_info(&self, addr: SocketAddr) -> redis::ConnectionInfo {
        let mut redis = RedisConnectionInfo::default().set_skip_set_lib_name();
        if let Some(user) = &self.user {
            redis = redis.set_username(user);
        }
        if let Some(password) = &self.password {
            redis = redis.set_password(password);
        }
        // With TLS the host is also the name the node's certificate is checked against: the IP
        // (each node certificate carries its IP), or the name of the names-only mode, which
        // `connect` then pins to `addr`.
        let host = match (&self.tls, &self.tls_name) {
            (Some(_), Some(name)) => name.clone(),
            _ => addr.ip().to_string(),
        };
        let target = if self.tls.is_some() {
            ConnectionAddr::TcpTls {
                host,
                port: addr.port(),
                insecure: false,
                tls_params: None,
            }
        } else {
            ConnectionAddr::Tcp(host, addr.port())
        };
        // An address never fails to convert.
        target
            .into_connection_info()
            .expect("an address is a valid connection info")
            .set_redis_settings(redis)
    }

    /// A client for the node at `addr`, over TLS when the nodes use it.
    fn client(&self, addr: SocketAddr) -> Result<redis::Client, HarnessError> {
        let info = self.connection_info(addr);
        match &self.tls {
            None => Ok(redis::Client::open(info)?),
            #[cfg(feature = "tls")]
            Some(tls) => Ok(redis::Client::build_with_tls(info, tls.certificates())?),
            // The builders refuse TLS without the feature; this only keeps that promise local.
            #[cfg(not(feature = "tls"))]
            Some(_) => Err(super::tls::feature_missing("an admin connection")),
        }
    }

    /// `redis://[user:pass@]<target>` (`rediss://` on TLS nodes), with the credentials
    /// percent-encoded; `target` is `ip:port` or `host:port`.
    pub(crate) fn url(&self, target: &str) -> String {
        let auth = match (&self.user, &self.password) {
            (Some(u), Some(p)) => format!("{}:{}@", percent_encode(u), percent_encode(p)),
            (None, Some(p)) => format!(":{}@", percent_encode(p)),
            (Some(u), None) => format!("{}@", percent_encode(u)),
            (None, None) => String::new(),
        };
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://{auth}{target}")
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Opens a connection with bounded connect and response times.
///
/// The outer `timeout` is belt and braces: a SIGSTOPped node accepts TCP connections (the kernel
/// completes the handshake) but never answers, and no wait of the harness may hang on it.
pub(crate) async fn connect(
    addr: SocketAddr,
    creds: &Credentials,
    connect_timeout: Duration,
    response_timeout: Duration,
) -> Result<MultiplexedConnection, HarnessError> {
    let client = creds.client(addr)?;
    let mut config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(Some(response_timeout));
    if creds.tls.is_some() && creds.tls_name.is_some() {
        config = config.set_dns_resolver(crate::connect::PinnedResolver(addr.ip()));
    }
    let limit = connect_timeout + response_timeout;
    match tokio::time::timeout(
        limit,
        client.get_multiplexed_async_connection_with_config(&config),
    )
    .await
    {
        Ok(result) => Ok(result?),
        Err(_) => Err(HarnessError::Timeout {
            what: format!("a connection to {addr}"),
            after: limit,
        }),
    }
}

/// Runs one command on one node over a fresh connection.
///
/// A fresh connection per command keeps the harness free of stale connections to killed or
/// restarted nodes; on loopback it costs well under a millisecond.
pub(crate) async fn query<T: FromRedisValue>(
    addr: SocketAddr,
    creds: &Credentials,
    cmd: &redis::Cmd,
    response_timeout: Duration,
) -> Result<T, HarnessError> {
    let mut con = connect(addr, creds, CONNECT_TIMEOUT, response_timeout).await?;
    bounded(addr, response_timeout, cmd.query_async(&mut con)).await
}

/// Runs a pipeline on one node over a fresh connection.
pub(crate) async fn query_pipe<T: FromRedisValue>(
    addr: SocketAddr,
    creds: &Credentials,
    pipe: &redis::Pipeline,
    response_timeout: Duration,
) -> Result<T, HarnessError> {
    let mut con = connect(addr, creds, CONNECT_TIMEOUT, response_timeout).await?;
    bounded(addr, response_timeout, pipe.query_async(&mut con)).await
}

async fn bounded<T>(
    addr: SocketAddr,
    limit: Duration,
    fut: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, HarnessError> {
    // A little slack over the connection's own response timeout, which normally fires first
    // and gives the more specific error.
    let limit = limit + Duration::from_millis(250);
    match tokio::time::timeout(limit, fut).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(HarnessError::Timeout {
            what: format!("a reply from {addr}"),
            after: limit,
        }),
    }
}

/// `redis::cmd(name)` with arguments, for brevity.
pub(crate) fn cmd(parts: &[&str]) -> redis::Cmd {
    let mut c = redis::cmd(parts[0]);
    for p in &parts[1..] {
        c.arg(*p);
    }
    c
}
