//! TLS for harness nodes: a throwaway certificate authority per cluster (or server), a
//! certificate per node, and the client certificates of the harness and of the tests.
//!
//! Certificates are made at run time with `rcgen` rather than checked in, so nothing expires,
//! no key is ever shared between runs, and a node that comes up at a new IP gets a certificate
//! for that IP — as a managed service issues one to each replacement host. In the names-only mode
//! ([`tls_names_only`](super::LocalClusterBuilder::tls_names_only)) every node certificate
//! instead carries one wildcard DNS name and no IP, as managed services issue them.
//!
//! The PKI part compiles with `test-util` alone; only the admin connections need the crate's
//! `tls` feature (the `redis` crate's TLS support), and the builders refuse `tls(true)` without it.

use std::{
    fmt, fs,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

use super::{
    error::{io_context, HarnessError},
    process,
};

/// Names of the files each TLS node finds in its directory.
const NODE_CERT: &str = "tls-node.crt";
const NODE_KEY: &str = "tls-node.key";
const CA_CERT: &str = "tls-ca.crt";
/// The names the node certificate was issued for, one a line: a node whose names changed (it
/// moved to a new IP) gets a new certificate.
const NODE_SANS: &str = "tls-node.sans";

/// A certificate authority made up for one test: a fresh key and a self-signed certificate.
///
/// A [`LocalCluster`](super::LocalCluster) started with
/// [`tls(true)`](super::LocalClusterBuilder::tls) has its own; make another one to get a CA the
/// cluster does *not* trust (a client configured with it must fail verification), or to issue
/// extra client certificates.
///
/// ```
/// use tower_redis_cluster::harness::TestCa;
///
/// let other = TestCa::new().unwrap();
/// assert!(String::from_utf8(other.cert_pem()).unwrap().starts_with("-----BEGIN CERTIFICATE-----"));
/// let (cert, key) = other.issue_client_cert("someone").unwrap();
/// assert!(!cert.is_empty() && !key.is_empty());
/// ```
pub struct TestCa {
    name: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    /// Generates a new CA (ECDSA P-256). Each has a distinct subject name, so a certificate of
    /// one CA is never mistaken for one of another (it fails as an unknown issuer, not as a bad
    /// signature).
    pub fn new() -> Result<TestCa, HarnessError> {
        let name = format!("tower-redis-cluster test CA {:016x}", process::random_u64());
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(&name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().map_err(cert_error)?;
        let issuer = CertifiedIssuer::self_signed(params, key).map_err(cert_error)?;
        Ok(TestCa { name, issuer })
    }

    /// The CA certificate (PEM), what clients trust.
    pub fn cert_pem(&self) -> Vec<u8> {
        self.issuer.pem().into_bytes()
    }

    /// A certificate and key (PEM) for a server reachable at `ips` and `dns_names`.
    ///
    /// It is also valid as a client certificate: Redis nodes present their own certificate when
    /// they connect to each other (cluster bus, replication).
    pub fn issue_server_cert(
        &self,
        ips: &[IpAddr],
        dns_names: &[String],
    ) -> Result<(Vec<u8>, Vec<u8>), HarnessError> {
        let sans: Vec<String> = ips
            .iter()
            .map(ToString::to_string)
            .chain(dns_names.iter().cloned())
            .collect();
        let cn = sans.first().cloned().unwrap_or_else(|| "redis".into());
        let mut params = CertificateParams::new(sans).map_err(cert_error)?;
        params.distinguished_name = common_name(&cn);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.issue(params)
    }

    /// A client certificate and key (PEM) with the common name `name`, for mutual TLS.
    pub fn issue_client_cert(&self, name: &str) -> Result<(Vec<u8>, Vec<u8>), HarnessError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    fn issue(&self, params: CertificateParams) -> Result<(Vec<u8>, Vec<u8>), HarnessError> {
        let key = KeyPair::generate().map_err(cert_error)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(cert_error)?;
        Ok((cert.pem().into_bytes(), key.serialize_pem().into_bytes()))
    }
}

impl fmt::Debug for TestCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The signing key stays out of logs even though it is a throwaway.
        f.debug_struct("TestCa")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn common_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

fn cert_error(e: rcgen::Error) -> HarnessError {
    HarnessError::Io(std::io::Error::other(format!(
        "generating a test certificate: {e}"
    )))
}

/// What the harness's own (admin) connections need on a TLS cluster.
///
/// The harness always presents a client certificate, so that nodes which require one
/// ([`require_client_certs`](super::LocalClusterBuilder::require_client_certs)) still let it in.
#[cfg_attr(not(feature = "tls"), allow(dead_code))]
pub(crate) struct AdminTls {
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl AdminTls {
    #[cfg(feature = "tls")]
    pub(crate) fn certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: Some(redis::ClientTlsConfig {
                client_cert: self.cert_pem.clone(),
                client_key: self.key_pem.clone(),
            }),
            root_cert: Some(self.ca_pem.clone()),
        }
    }
}

impl fmt::Debug for AdminTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminTls").finish_non_exhaustive()
    }
}

/// The TLS side of one cluster or standalone server: its CA, the certificates handed out so far,
/// and how nodes are configured.
pub(crate) struct ServerTls {
    ca: TestCa,
    require_client_certs: bool,
    /// The identity offered to tests, distinct from the harness's own.
    client: (Vec<u8>, Vec<u8>),
    pub(crate) admin: Arc<AdminTls>,
}

impl ServerTls {
    pub(crate) fn new(require_client_certs: bool) -> Result<ServerTls, HarnessError> {
        let ca = TestCa::new()?;
        let (cert_pem, key_pem) = ca.issue_client_cert("tower-redis-cluster harness")?;
        let client = ca.issue_client_cert("tower-redis-cluster test client")?;
        let admin = Arc::new(AdminTls {
            ca_pem: ca.cert_pem(),
            cert_pem,
            key_pem,
        });
        Ok(ServerTls {
            ca,
            require_client_certs,
            client,
            admin,
        })
    }

    pub(crate) fn ca_pem(&self) -> Vec<u8> {
        self.ca.cert_pem()
    }

    pub(crate) fn client_identity(&self) -> (Vec<u8>, Vec<u8>) {
        self.client.clone()
    }

    /// Whether nodes refuse clients without a certificate (`tls-auth-clients yes`).
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    pub(crate) fn requires_client_certs(&self) -> bool {
        self.require_client_certs
    }

    /// Writes the node's certificate (for `ips` and `dns_names`), key and the CA into `dir`, and
    /// returns the redis.conf lines that use them.
    ///
    /// An existing certificate for the same names is kept: a restarted node is the same host and
    /// keeps its identity, while a node at a new IP either has a new directory or, when the same
    /// node moved, new names, and so gets a certificate of its own.
    pub(crate) fn node_config(
        &self,
        ips: &[IpAddr],
        dns_names: &[String],
        dir: &Path,
        cluster: bool,
    ) -> Result<String, HarnessError> {
        let cert = dir.join(NODE_CERT);
        let key = dir.join(NODE_KEY);
        let ca = dir.join(CA_CERT);
        let sans_path = dir.join(NODE_SANS);
        let sans: String = ips
            .iter()
            .map(ToString::to_string)
            .chain(dns_names.iter().cloned())
            .map(|s| s + "\n")
            .collect();
        let issued_for = fs::read_to_string(&sans_path).ok();
        if !cert.exists() || !key.exists() || issued_for.as_deref() != Some(sans.as_str()) {
            let (cert_pem, key_pem) = self.ca.issue_server_cert(ips, dns_names)?;
            write(&key, &key_pem)?;
            write(&cert, &cert_pem)?;
            write(&sans_path, sans.as_bytes())?;
        }
        write(&ca, &self.ca.cert_pem())?;
        let q = |p: &PathBuf| process::quote(&p.to_string_lossy());
        let mut lines = format!(
            "tls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n",
            q(&cert),
            q(&key),
            q(&ca)
        );
        // `optional` still verifies a certificate that is offered, and lets clients without one
        // in; `yes` is the mutual-TLS setting.
        lines += if self.require_client_certs {
            "tls-auth-clients yes\n"
        } else {
            "tls-auth-clients optional\n"
        };
        // Replicas sync over TLS too: there is no plaintext port to fall back on.
        lines += "tls-replication yes\n";
        if cluster {
            lines += "tls-cluster yes\n";
        }
        Ok(lines)
    }
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("ca", &self.ca)
            .field("require_client_certs", &self.require_client_certs)
            .finish_non_exhaustive()
    }
}

fn write(path: &Path, contents: &[u8]) -> Result<(), HarnessError> {
    fs::write(path, contents).map_err(|e| io_context(e, format!("writing {}", path.display())))
}

/// The error of `tls(true)` in a build without the `tls` feature.
pub(crate) fn feature_missing(what: &str) -> HarnessError {
    HarnessError::Invalid(format!(
        "{what}: TLS nodes need the `tls` feature of tower-redis-cluster \
         (the harness's own connections to them use it); build with `--features test-util,tls`"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::{LocalCluster, StandaloneServer};

    #[test]
    fn certificates_are_pem_and_each_ca_is_distinct() {
        let a = TestCa::new().unwrap();
        let b = TestCa::new().unwrap();
        assert_ne!(a.cert_pem(), b.cert_pem());
        assert_ne!(a.name, b.name);
        let (cert, key) = a
            .issue_server_cert(&["127.9.9.9".parse().unwrap()], &["x.test".into()])
            .unwrap();
        let cert = String::from_utf8(cert).unwrap();
        let key = String::from_utf8(key).unwrap();
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"), "{cert}");
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
        // Debug must not show key material.
        assert!(!format!("{a:?}").contains("BEGIN"));
    }

    #[test]
    fn node_config_keeps_a_node_certificate_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let tls = ServerTls::new(true).unwrap();
        let ip: IpAddr = "127.9.9.9".parse().unwrap();
        let names = ["clustercfg.x.test".to_owned()];
        let conf = tls.node_config(&[ip], &names, dir.path(), true).unwrap();
        for line in [
            "tls-auth-clients yes",
            "tls-replication yes",
            "tls-cluster yes",
            NODE_CERT,
            NODE_KEY,
            CA_CERT,
        ] {
            assert!(conf.contains(line), "{line} missing from\n{conf}");
        }
        let first = fs::read(dir.path().join(NODE_CERT)).unwrap();
        tls.node_config(&[ip], &names, dir.path(), true).unwrap();
        assert_eq!(fs::read(dir.path().join(NODE_CERT)).unwrap(), first);
        // The same node at a new IP: a new certificate.
        let moved: IpAddr = "127.9.9.10".parse().unwrap();
        tls.node_config(&[moved], &names, dir.path(), true).unwrap();
        assert_ne!(fs::read(dir.path().join(NODE_CERT)).unwrap(), first);
        let standalone = ServerTls::new(false).unwrap();
        let conf = standalone
            .node_config(&[ip], &[], tempfile::tempdir().unwrap().path(), false)
            .unwrap();
        assert!(conf.contains("tls-auth-clients optional"), "{conf}");
        assert!(!conf.contains("tls-cluster"), "{conf}");
    }

    #[tokio::test]
    async fn client_certs_without_tls_are_refused_before_anything_starts() {
        let e = LocalCluster::builder()
            .require_client_certs(true)
            .start()
            .await
            .unwrap_err();
        assert!(matches!(e, HarnessError::Invalid(_)), "{e}");
        let e = StandaloneServer::builder()
            .require_client_certs(true)
            .start()
            .await
            .unwrap_err();
        assert!(matches!(e, HarnessError::Invalid(_)), "{e}");
    }

    #[cfg(not(feature = "tls"))]
    #[tokio::test]
    async fn tls_without_the_feature_is_a_clear_error() {
        let e = LocalCluster::builder().tls(true).start().await.unwrap_err();
        assert!(matches!(e, HarnessError::Invalid(_)), "{e}");
        assert!(e.to_string().contains("`tls` feature"), "{e}");
        let e = StandaloneServer::builder()
            .tls(true)
            .start()
            .await
            .unwrap_err();
        assert!(e.to_string().contains("`tls` feature"), "{e}");
    }
}
