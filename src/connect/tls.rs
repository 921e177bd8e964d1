//! TLS settings for cluster connections (feature `tls`, rustls).

use std::fmt;

use crate::Error;

/// How to verify the servers, and optionally who we are (mutual TLS).
///
/// Verification is always on; there is deliberately no switch to turn it off.
///
/// # Which name a node is verified against
/// Every connection is verified against the host it is made to: the seed's name for the
/// configuration endpoint (also when a topology probe goes to one particular IP behind it), and
/// each node's **announced endpoint** for the nodes. On clusters that announce host names —
/// AWS MemoryDB and ElastiCache with in-transit encryption, or Redis 7 with
/// `cluster-announce-hostname` and `cluster-preferred-endpoint-type hostname` — that is the
/// node's name, so certificates that name DNS names only (a wildcard for the cluster's domain)
/// verify, and keep verifying when a node's DNS record lags behind a replacement (the
/// connection then goes to the IP the cluster reports, still verified against the name).
///
/// A cluster that announces **IPs** behind certificates without IP SANs cannot be verified
/// node by node: the redis crate (1.x) checks each node connection against the address it
/// dials and offers no per-connection server-name override — only
/// `danger_accept_invalid_hostnames`, which switches name verification off and is not exposed
/// here. Announce host names on such clusters (or issue certificates with IP SANs).
#[derive(Clone, Default)]
pub struct TlsConfig {
    root_ca_pem: Option<Vec<u8>>,
    client_cert_pem: Option<Vec<u8>>,
    client_key_pem: Option<Vec<u8>>,
}

impl TlsConfig {
    /// Trust the Mozilla (webpki) roots and the system's roots — what managed services need.
    pub fn webpki_roots() -> Self {
        TlsConfig::default()
    }

    /// Trust only this CA (PEM), e.g. a private CA of a self-hosted cluster.
    pub fn custom_ca(pem: impl Into<Vec<u8>>) -> Self {
        TlsConfig {
            root_ca_pem: Some(pem.into()),
            ..TlsConfig::default()
        }
    }

    /// Present a client certificate and key (PEM) for mutual TLS.
    pub fn client_identity(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.client_cert_pem = Some(cert_pem.into());
        self.client_key_pem = Some(key_pem.into());
        self
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        let looks_pem = |b: &[u8]| std::str::from_utf8(b).is_ok_and(|s| s.contains("-----BEGIN"));
        if let Some(ca) = &self.root_ca_pem {
            if !looks_pem(ca) {
                return Err(Error::config(
                    "the TLS CA certificate is not PEM (-----BEGIN CERTIFICATE-----)",
                ));
            }
        }
        match (&self.client_cert_pem, &self.client_key_pem) {
            (Some(c), Some(k)) if !looks_pem(c) || !looks_pem(k) => Err(Error::config(
                "the TLS client certificate and key must be PEM",
            )),
            _ => Ok(()),
        }
    }

    #[cfg(feature = "tls")]
    pub(crate) fn certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: match (&self.client_cert_pem, &self.client_key_pem) {
                (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
                _ => None,
            },
            root_cert: self.root_ca_pem.clone(),
        }
    }
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("custom_ca", &self.root_ca_pem.is_some())
            .field("client_certificate", &self.client_cert_pem.is_some())
            .field(
                "client_key",
                &self.client_key_pem.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_key() {
        let c = TlsConfig::custom_ca("-----BEGIN CERTIFICATE-----x").client_identity(
            "-----BEGIN CERTIFICATE-----c",
            "-----BEGIN PRIVATE KEY-----SECRETKEY",
        );
        let text = format!("{c:?}");
        assert!(!text.contains("SECRETKEY"), "{text}");
        assert!(text.contains("redacted"));
    }

    #[test]
    fn non_pem_input_is_a_config_error() {
        let e = TlsConfig::custom_ca("not a cert").validate().unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Config);
        assert!(TlsConfig::webpki_roots().validate().is_ok());
    }
}
