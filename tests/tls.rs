//! TLS against real TLS-only clusters: the harness's `tls(true)` mode and the `Client` over it.
//! Requires the `test-util` and `tls` features.
//!
//! Every cluster here has an ACL user, so TLS and AUTH are exercised together, as on a managed
//! service. Each failure case checks what an operator needs: the right [`ErrorKind`], a prompt
//! answer within the client's deadline (not an endless retry), and a message naming the cause.

mod support;

use std::{
    io::{Read, Write},
    net::TcpStream,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use support::{assert_documented_kinds, first_success, get, init_tracing, set, Load};
use tower_redis_cluster::{
    harness::{LocalCluster, StandaloneServer, TestCa},
    Client, ErrorKind, TlsConfig,
};

const USER: &str = "app";
const PASS: &str = "tls-s3cret";
/// The client's overall deadline in the failure cases.
const DEADLINE: Duration = Duration::from_secs(1);
/// What a failing call may take beyond its deadline (scheduling, the timeout firing).
const SLACK: Duration = Duration::from_millis(300);

async fn tls_cluster(replicas: usize, require_client_certs: bool) -> LocalCluster {
    LocalCluster::builder()
        .shards(1)
        .replicas(replicas)
        .user(USER, PASS)
        .tls(true)
        .require_client_certs(require_client_certs)
        .start()
        .await
        .unwrap()
}

/// Sends a plaintext PING straight to a TLS node and returns whatever comes back (bounded).
fn plaintext_exchange(addr: std::net::SocketAddr) -> Vec<u8> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    // The node may close as soon as it sees a non-TLS record; a failed write is an answer too.
    let _ = s.write_all(b"PING\r\n");
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_over_tls_with_an_acl_user_serves_and_follows_a_master_to_a_new_ip() {
    init_tracing();
    let mut cluster = tls_cluster(1, false).await;
    assert!(cluster.is_tls());
    let seed = cluster.seed_url();
    assert!(seed.starts_with("rediss://clustercfg."), "{seed}");

    // TLS only: a plaintext PING gets no PONG (the port speaks TLS or nothing).
    let master = cluster.master_of(0);
    let reply = plaintext_exchange(master.addr);
    assert!(
        !String::from_utf8_lossy(&reply).contains("PONG"),
        "plaintext PING answered: {reply:?}"
    );

    let client = Client::builder()
        .seed(&seed)
        .resolver(cluster.name_map())
        .tls(TlsConfig::custom_ca(cluster.ca_pem().unwrap()))
        .credentials(USER, PASS)
        .build()
        .await
        .unwrap();
    client.wait_connected(Duration::from_secs(5)).await.unwrap();
    client.query::<()>(&set("tls:k", "v1")).await.unwrap();
    assert_eq!(client.query::<String>(&get("tls:k")).await.unwrap(), "v1");

    // The master is replaced by a node at a new IP, with a certificate of its own for that IP:
    // the client must verify it against the same CA and carry on.
    let load = Load::start(client.clone(), 4);
    let started = Instant::now();
    let new = cluster.replace_node(master.addr).await.unwrap();
    assert_ne!(new.addr.ip(), master.addr.ip());
    let new_master = cluster.master_of(0);
    assert_ne!(new_master.addr, master.addr);
    first_success(&client, Duration::from_secs(15))
        .await
        .unwrap();
    // Keep the load on a little after the replacement, so calls that have to reach the new
    // node are among those counted.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = load.stop().await;
    println!(
        "TLS client through a master replacement ({:?}): {} ok, errors {:?}",
        started.elapsed(),
        stats.ok.load(Ordering::SeqCst),
        stats.errors()
    );
    assert!(stats.ok.load(Ordering::SeqCst) > 0);
    assert_documented_kinds(&stats.errors());
    // The key survived the failover (the replica had it), and the old IP is gone for good.
    assert_eq!(client.query::<String>(&get("tls:k")).await.unwrap(), "v1");
    assert!(!cluster.addrs().contains(&master.addr));
    client.query::<()>(&set("tls:k2", "v2")).await.unwrap();
    let on_new: Option<String> = redis::from_redis_value(
        cluster
            .node_command(new_master.addr, &get("tls:k2"))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        on_new.as_deref(),
        Some("v2"),
        "write did not reach the new master"
    );
}

/// Calls PING twice through `client`; both must fail within the deadline with the same kind.
/// Returns the error of the first call and how long each took.
async fn fails_promptly(
    client: &Client,
    what: &str,
) -> (tower_redis_cluster::Error, [Duration; 2]) {
    let mut errors = Vec::new();
    let mut took = [Duration::ZERO; 2];
    for slot in &mut took {
        let started = Instant::now();
        let err = client
            .send(redis::cmd("PING"))
            .await
            .expect_err(&format!("{what}: PING succeeded"));
        *slot = started.elapsed();
        assert!(
            *slot <= DEADLINE + SLACK,
            "{what}: the call took {:?}, deadline {DEADLINE:?}: {err}",
            *slot
        );
        errors.push(err);
    }
    // A permanent failure (certificate, password) must be reported the same way every time. A
    // transient one may end either bound first — the deadline or the rebuild layer's
    // `max_wait`, which the builder caps at the deadline — but must stay transient.
    if errors[0].kind().is_transient() {
        assert!(
            errors[1].kind().is_transient(),
            "{what}: the second call failed differently: {} / {}",
            errors[0],
            errors[1]
        );
    } else {
        assert_eq!(
            errors[0].kind(),
            errors[1].kind(),
            "{what}: the second call failed differently: {} / {}",
            errors[0],
            errors[1]
        );
    }
    println!(
        "{what}: kind {}, took {:?}, error: {}",
        errors[0].kind(),
        took,
        errors[0]
    );
    (errors.swap_remove(0), took)
}

fn client_for(cluster: &LocalCluster) -> tower_redis_cluster::ClientBuilder {
    Client::builder()
        .seed(cluster.seed())
        .resolver(cluster.name_map())
        .timeout(DEADLINE)
}

/// A client with the right CA and password, as a control: each failure case changes one thing.
async fn assert_good_client_works(cluster: &LocalCluster) {
    let good = client_for(cluster)
        .tls(TlsConfig::custom_ca(cluster.ca_pem().unwrap()))
        .credentials(USER, PASS)
        .build()
        .await
        .unwrap();
    good.send(redis::cmd("PING")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_the_nodes_were_not_signed_by_fails_as_tls_promptly_and_says_why() {
    init_tracing();
    let cluster = tls_cluster(0, false).await;
    assert_good_client_works(&cluster).await;
    let other_ca = TestCa::new().unwrap();
    let client = client_for(&cluster)
        .tls(TlsConfig::custom_ca(other_ca.cert_pem()))
        .credentials(USER, PASS)
        .build()
        .await
        .unwrap();
    let (err, _) = fails_promptly(&client, "wrong CA").await;
    assert_eq!(err.kind(), ErrorKind::Tls, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("certificate") && text.contains("UnknownIssuer"),
        "the error does not name the cause: {text}"
    );
    assert_good_client_works(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_over_tls_fails_as_auth_promptly_and_says_why() {
    init_tracing();
    let cluster = tls_cluster(0, false).await;
    assert_good_client_works(&cluster).await;
    let client = client_for(&cluster)
        .tls(TlsConfig::custom_ca(cluster.ca_pem().unwrap()))
        .credentials(USER, "not-the-password")
        .build()
        .await
        .unwrap();
    let (err, _) = fails_promptly(&client, "wrong password").await;
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    let text = err.to_string();
    // Redis answers WRONGPASS; the redis crate reports it as a failed password authentication.
    assert!(
        text.contains("WRONGPASS") || text.contains("Password authentication failed"),
        "the error does not name the cause: {text}"
    );
    assert!(
        !text.contains("not-the-password"),
        "password leaked: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_client_of_a_tls_cluster_fails_within_its_deadline_and_says_why() {
    init_tracing();
    let cluster = tls_cluster(0, false).await;
    assert_good_client_works(&cluster).await;
    // No `.tls(..)` and a `host:port` seed: the client speaks RESP to a TLS listener, which
    // resets the connection. That could be a network blip, so it is a transient kind, retried
    // until the deadline — but never reported as a TLS or auth problem.
    let client = client_for(&cluster)
        .credentials(USER, PASS)
        .build()
        .await
        .unwrap();
    let (err, _) = fails_promptly(&client, "plaintext to the TLS port").await;
    // Which transient kind depends on which bound ends the wait first: the deadline, or the
    // rebuild layer's `max_wait` (capped at the deadline, so both end together here).
    assert!(
        matches!(
            err.kind(),
            ErrorKind::Connection | ErrorKind::Timeout | ErrorKind::Unreachable
        ),
        "{err}"
    );
    // Even a deadline error must say what was failing underneath.
    let text = err.to_string();
    assert!(
        text.contains("reset") || text.contains("closed"),
        "the error does not name the cause: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_works_with_the_client_identity_and_fails_typed_without_it() {
    init_tracing();
    let cluster = tls_cluster(0, true).await;
    let ca = cluster.ca_pem().unwrap();
    let (cert, key) = cluster.client_identity().unwrap();

    let with_identity = client_for(&cluster)
        .tls(TlsConfig::custom_ca(ca.clone()).client_identity(cert, key))
        .credentials(USER, PASS)
        .build()
        .await
        .unwrap();
    with_identity
        .query::<()>(&set("mtls:k", "v"))
        .await
        .unwrap();
    assert_eq!(
        with_identity.query::<String>(&get("mtls:k")).await.unwrap(),
        "v"
    );

    let without = client_for(&cluster)
        .tls(TlsConfig::custom_ca(ca.clone()))
        .credentials(USER, PASS)
        .build()
        .await
        .unwrap();
    let (err, _) = fails_promptly(&without, "mutual TLS without a client certificate").await;
    assert_eq!(err.kind(), ErrorKind::Tls, "{err}");
    // TLS 1.3: the server checks the client's (empty) certificate after the client finished its
    // side of the handshake, so the client learns of it from the server's alert.
    assert!(err.to_string().contains("CertificateRequired"), "{err}");

    // A certificate from a CA the nodes do not trust is refused as well.
    let stranger = TestCa::new().unwrap();
    let (cert, key) = stranger.issue_client_cert("stranger").unwrap();
    let foreign = client_for(&cluster)
        .tls(TlsConfig::custom_ca(ca).client_identity(cert, key))
        .credentials(USER, PASS)
        .build()
        .await
        .unwrap();
    let (err, _) = fails_promptly(&foreign, "mutual TLS with a foreign client certificate").await;
    assert_eq!(err.kind(), ErrorKind::Tls, "{err}");
    assert!(err.to_string().contains("UnknownCA"), "{err}");
}

#[tokio::test]
async fn standalone_tls_server_accepts_tls_only() {
    let server = StandaloneServer::builder().tls(true).start().await.unwrap();
    assert!(server.url().starts_with("rediss://"), "{}", server.url());
    let ca = server.ca_pem().unwrap();
    let client = redis::Client::build_with_tls(
        server.url(),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(ca),
        },
    )
    .unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let pong: String = redis::cmd("PING").query_async(&mut con).await.unwrap();
    assert_eq!(pong, "PONG");
    let reply = plaintext_exchange(server.addr());
    assert!(
        !String::from_utf8_lossy(&reply).contains("PONG"),
        "plaintext PING answered: {reply:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_nodes_have_no_plaintext_port_and_a_restarted_node_rejoins_over_tls() {
    init_tracing();
    let mut cluster = tls_cluster(1, false).await;
    let master = cluster.master_of(0);
    for (key, want) in [
        ("port", "0".to_string()),
        ("tls-port", cluster.port().to_string()),
        ("tls-cluster", "yes".into()),
        ("tls-replication", "yes".into()),
    ] {
        let mut c = redis::cmd("CONFIG");
        c.arg("GET").arg(key);
        let got: Vec<String> =
            redis::from_redis_value(cluster.node_command(master.addr, &c).await.unwrap()).unwrap();
        assert_eq!(got, vec![key.to_string(), want], "CONFIG GET {key}");
    }
    assert!(
        cluster
            .node_urls()
            .iter()
            .all(|u| u.starts_with("rediss://app:")),
        "{:?}",
        cluster.node_urls()
    );
    // The bus and replication only have TLS to use: a restarted replica that rejoins and
    // syncs again proves both work, with the certificate it kept.
    let replica = cluster.replicas_of(0)[0].clone();
    cluster.restart_node(replica.addr).await.unwrap();
    cluster.wait_settled(Duration::from_secs(10)).await.unwrap();
    assert_eq!(cluster.replicas_of(0)[0].addr, replica.addr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_of_a_plaintext_cluster_fails_as_tls_and_says_the_server_did_not_speak_it() {
    init_tracing();
    let cluster = support::cluster(1, 0).await;
    let ca = TestCa::new().unwrap();
    // A TLS handshake with a plaintext server hangs until the connection timeout (the server
    // waits for a line end); a short one lets even the first call see the diagnosis.
    let client = client_for(&cluster)
        .tls(TlsConfig::custom_ca(ca.cert_pem()))
        .connection_timeout(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let (err, _) = fails_promptly(&client, "TLS to a plaintext port").await;
    assert_eq!(err.kind(), ErrorKind::Tls, "{err}");
    assert!(
        err.to_string().contains("did not speak TLS"),
        "the error does not name the cause: {err}"
    );
}
