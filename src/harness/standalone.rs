//! [`StandaloneServer`]: one plain (non-cluster) `redis-server` on its own loopback IP.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
};

use super::{
    admin::Credentials,
    error::{io_context, HarnessError},
    launch,
    process::{self, NodeProcess, SubnetLease},
    tls::{self, ServerTls},
};

/// Builder of a [`StandaloneServer`]; see [`StandaloneServer::builder`].
#[derive(Clone, Debug, Default)]
pub struct StandaloneServerBuilder {
    config: Vec<(String, String)>,
    redis_server: Option<PathBuf>,
    keep_dir: bool,
    tls: bool,
    require_client_certs: bool,
}

impl StandaloneServerBuilder {
    /// Adds the redis.conf line `key value`, written verbatim after the harness's own lines,
    /// e.g. `.config("user", "app on >secret ~* +@all")` for an ACL user.
    pub fn config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.push((key.into(), value.into()));
        self
    }

    /// The `redis-server` binary to run. Default: `TRC_REDIS_SERVER` if set, else
    /// `redis-server` on `PATH`.
    pub fn redis_server_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.redis_server = Some(path.into());
        self
    }

    /// Keeps the server's directory after it is dropped (also `TRC_HARNESS_KEEP_DIR=1`).
    pub fn keep_dir(mut self, keep: bool) -> Self {
        self.keep_dir = keep;
        self
    }

    /// Serves TLS only, with a CA of its own (needs the crate's `tls` feature); see
    /// [`LocalClusterBuilder::tls`](super::LocalClusterBuilder::tls). The certificate names the
    /// server's IP.
    pub fn tls(mut self, enabled: bool) -> Self {
        self.tls = enabled;
        self
    }

    /// With [`tls`](Self::tls): require a client certificate from the server's CA
    /// (`tls-auth-clients yes`).
    pub fn require_client_certs(mut self, required: bool) -> Self {
        self.require_client_certs = required;
        self
    }

    /// Starts the server and waits (at most 10 s) until it answers.
    pub async fn start(self) -> Result<StandaloneServer, HarnessError> {
        if self.tls && !cfg!(feature = "tls") {
            return Err(tls::feature_missing("StandaloneServerBuilder::tls(true)"));
        }
        if self.require_client_certs && !self.tls {
            return Err(HarnessError::Invalid(
                "require_client_certs(true) needs tls(true)".into(),
            ));
        }
        let bin = process::find_redis_server(self.redis_server.as_deref())?;
        let lease = SubnetLease::acquire(1, false)?;
        let tempdir = tempfile::Builder::new()
            .prefix("trc-standalone-")
            .tempdir()
            .map_err(|e| io_context(e, "creating the server's temp dir"))?;
        let addr = lease.addr(1);
        let dir = tempdir.path().to_path_buf();
        let server_tls = if self.tls {
            Some(ServerTls::new(self.require_client_certs)?)
        } else {
            None
        };
        let mut conf = process::base_config(lease.ip(1), lease.port(), &dir, self.tls);
        if let Some(tls) = &server_tls {
            conf += &tls.node_config(&[IpAddr::V4(lease.ip(1))], &[], &dir, false)?;
        }
        process::append_extra(&mut conf, &self.config);
        let conf_path = dir.join("redis.conf");
        std::fs::write(&conf_path, conf)
            .map_err(|e| io_context(e, format!("writing {}", conf_path.display())))?;
        // Readiness only needs *a* reply: NOAUTH from a locked-down default user counts. TLS is
        // still needed to get one.
        let creds = Credentials {
            tls: server_tls.as_ref().map(|t| t.admin.clone()),
            ..Credentials::default()
        };
        let process = launch::launch(&bin, &conf_path, &dir, addr, false, &creds).await?;
        let server = StandaloneServer {
            addr,
            tls: server_tls,
            process,
            dir,
            tempdir: Some(tempdir),
            keep_dir: self.keep_dir
                || std::env::var("TRC_HARNESS_KEEP_DIR").is_ok_and(|v| !v.is_empty() && v != "0"),
            _lease: lease,
        };
        tracing::info!(%addr, pid = server.process.pid(), "standalone redis-server ready");
        Ok(server)
    }
}

/// A single non-cluster `redis-server` on its own loopback IP and a random port, for tests of
/// plain connections (ACL users, TLS settings, ...). Dropping it kills the process and removes
/// its directory.
#[derive(Debug)]
pub struct StandaloneServer {
    addr: SocketAddr,
    tls: Option<ServerTls>,
    process: Arc<NodeProcess>,
    dir: PathBuf,
    tempdir: Option<tempfile::TempDir>,
    keep_dir: bool,
    _lease: SubnetLease,
}

impl StandaloneServer {
    /// A builder for a server with extra configuration.
    pub fn builder() -> StandaloneServerBuilder {
        StandaloneServerBuilder::default()
    }

    /// Starts a server with the harness's default configuration.
    pub async fn start() -> Result<StandaloneServer, HarnessError> {
        Self::builder().start().await
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `redis://ip:port`, or `rediss://ip:port` with TLS (no credentials).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// The PEM certificate of the CA that signed the server's certificate, with TLS.
    pub fn ca_pem(&self) -> Option<Vec<u8>> {
        self.tls.as_ref().map(ServerTls::ca_pem)
    }

    /// A client certificate and key (PEM) signed by the server's CA, with TLS.
    pub fn client_identity(&self) -> Option<(Vec<u8>, Vec<u8>)> {
        self.tls.as_ref().map(ServerTls::client_identity)
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The server's directory (config, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for StandaloneServer {
    fn drop(&mut self) {
        // Kill before the directory goes away (fields drop after this).
        self.process.kill();
        if self.keep_dir {
            if let Some(dir) = self.tempdir.take() {
                eprintln!("tower-redis-cluster harness: kept {}", dir.keep().display());
            }
        }
    }
}
