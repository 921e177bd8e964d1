//! [`NodeConnector`]: one fresh connection to one node, made the way the inner client makes
//! its own — by the node's name, TLS verified against it, credentials asked for just then.

use std::{net::IpAddr, sync::Arc, time::Duration};

use redis::{aio::MultiplexedConnection, AsyncConnectionConfig, IntoConnectionInfo};

use super::{AddressBook, CredentialSource, DnsAdapter, Endpoint, PinnedResolver, TlsConfig};
use crate::Error;

/// Opens single connections to nodes, for what cannot go through the shared cluster
/// connection: topology probes (a fresh connection per refresh) and blocking commands (a
/// connection of their own, as long as they block).
#[derive(Clone, Debug)]
pub(crate) struct NodeConnector {
    pub(crate) book: Arc<AddressBook>,
    pub(crate) credentials: CredentialSource,
    pub(crate) tls: Option<TlsConfig>,
    pub(crate) connection_timeout: Duration,
}

impl NodeConnector {
    /// A connection to `endpoint` — at `pin` when given, else wherever its name resolves (or
    /// last resolved) — whose replies may take `response_timeout` (`None`: any time).
    pub(crate) async fn connect(
        &self,
        endpoint: &Endpoint,
        pin: Option<IpAddr>,
        response_timeout: Option<Duration>,
    ) -> Result<MultiplexedConnection, Error> {
        self.connect_with(endpoint, pin, response_timeout, None)
            .await
    }

    /// A connection as [`connect`](Self::connect) makes it; with `push`, a RESP3 connection
    /// whose out-of-band messages (pub/sub deliveries and confirmations, and the library's
    /// notice that the connection closed) go to `push`.
    pub(crate) async fn connect_with(
        &self,
        endpoint: &Endpoint,
        pin: Option<IpAddr>,
        response_timeout: Option<Duration>,
        push: Option<Arc<dyn redis::aio::AsyncPushSender>>,
    ) -> Result<MultiplexedConnection, Error> {
        // Asked for every connection: a rotated token must reach the next one.
        let mut settings = redis::RedisConnectionInfo::default().set_skip_set_lib_name();
        // Whether opening the connection waits for the server to answer (a TLS handshake, an
        // AUTH, a HELLO): only then does it show that a node serves, not merely that a port
        // accepts (a paused node's kernel still does).
        let mut answered = self.tls.is_some() || push.is_some();
        if let Some(c) = self
            .credentials
            .fetch_within(self.connection_timeout)
            .await?
        {
            answered = true;
            settings = settings
                .set_username(c.user_or_default())
                .set_password(c.password.expose());
        }
        // The connection is made to the endpoint's *name*, so TLS verifies the name; the
        // resolver decides which IP it goes to.
        if push.is_some() {
            settings = settings.set_protocol(redis::ProtocolVersion::RESP3);
        }
        let info = super::cluster_node_addr(endpoint, self.tls.is_some())
            .into_connection_info()?
            .set_redis_settings(settings);
        let mut config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connection_timeout))
            .set_response_timeout(response_timeout);
        if let Some(push) = push {
            config = config.set_push_sender(ArcPush(push));
        }
        config = match pin {
            Some(ip) => config.set_dns_resolver(PinnedResolver(ip)),
            None => config.set_dns_resolver(DnsAdapter(self.book.clone())),
        };
        let client = match &self.tls {
            #[cfg(feature = "tls")]
            Some(tls) => redis::Client::build_with_tls(info, tls.certificates())?,
            #[cfg(not(feature = "tls"))]
            Some(_) => {
                return Err(Error::config(
                    "TLS connections need the `tls` feature of tower-redis-cluster",
                ))
            }
            None => redis::Client::open(info)?,
        };
        let connection = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| Error::from_redis(e).context(format_args!("connecting to {endpoint}")))?;
        // A node answered (a probe's, a replica read's, a subscription's, a blocking command's
        // connection): the client's connection checks and its inner client's dials go back to
        // normal. A bare TCP connect leaves that to the caller's first reply (a refresh's
        // probe counts its answers itself).
        if answered {
            self.book.outage().reached();
        }
        Ok(connection)
    }
}

/// An `Arc` of a push sender, as a push sender.
struct ArcPush(Arc<dyn redis::aio::AsyncPushSender>);

impl redis::aio::AsyncPushSender for ArcPush {
    fn send(&self, info: redis::PushInfo) -> Result<(), redis::aio::SendError> {
        self.0.send(info)
    }
}
