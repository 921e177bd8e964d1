//! What the framework examples share: a `Client` for `REDIS_CLUSTER_SEEDS` (with optional
//! `REDIS_USERNAME` / `REDIS_PASSWORD`), or for a new local cluster started with the harness.

use std::time::Duration;

use tower_redis_cluster::{harness::LocalCluster, Client};

/// A client for `REDIS_CLUSTER_SEEDS`, or for a new local cluster (returned too: it stops when
/// dropped).
pub async fn connect() -> Result<(Client, Option<LocalCluster>), Box<dyn std::error::Error>> {
    let builder = Client::builder().timeout(Duration::from_secs(2));
    let (builder, cluster) = match std::env::var("REDIS_CLUSTER_SEEDS") {
        Ok(seeds) if !seeds.trim().is_empty() => {
            let mut builder = builder.seeds(seeds.split(',').map(str::trim));
            if let Ok(password) = std::env::var("REDIS_PASSWORD") {
                builder = match std::env::var("REDIS_USERNAME") {
                    Ok(user) => builder.credentials(user, password),
                    Err(_) => builder.password(password),
                };
            }
            println!("using the Redis Cluster at {seeds}");
            (builder, None)
        }
        _ => {
            println!("starting a local Redis Cluster: 3 shards × (master + replica)");
            let cluster = LocalCluster::builder()
                .shards(3)
                .replicas(1)
                .start()
                .await?;
            println!("cluster up at {}", cluster.seed());
            let builder = builder.seed(cluster.seed()).resolver(cluster.name_map());
            (builder, Some(cluster))
        }
    };
    let client = builder.build().await?;
    client.wait_connected(Duration::from_secs(10)).await?;
    Ok((client, cluster))
}
