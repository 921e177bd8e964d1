//! Commands that do not fit a connection every caller shares, against a real cluster through
//! the `Client`: cluster-wide `SCAN` and `KEYS` give every key; `WATCH`, `MULTI` sent alone,
//! `SUBSCRIBE`, `SELECT` and the like are refused before anything is sent, with a typed error
//! that says what to use instead. Requires the `test-util` feature.

mod support;

use std::collections::HashSet;

use redis::Value;
use support::connected;
use tower_redis_cluster::{ErrorKind, Sent};

fn words(line: &str) -> redis::Cmd {
    let mut parts = line.split_whitespace();
    let mut c = redis::cmd(parts.next().unwrap());
    for p in parts {
        c.arg(p);
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_walks_every_master_and_keys_sees_every_key() {
    let cluster = support::cluster(3, 1).await;
    let client = connected(cluster.client_builder()).await;
    let mut written = HashSet::new();
    for i in 0..300 {
        let key = format!("scan:{i}");
        client
            .query::<()>(redis::cmd("SET").arg(&key).arg(i))
            .await
            .unwrap();
        written.insert(key);
    }
    client
        .query::<()>(redis::cmd("SET").arg("other:x").arg(1))
        .await
        .unwrap();

    // The documented loop: SCAN cursor … until the cursor is 0 again.
    let mut seen = HashSet::new();
    let mut cursor = "0".to_string();
    let mut calls = 0;
    loop {
        let (next, keys): (String, Vec<String>) = client
            .query(
                redis::cmd("SCAN")
                    .arg(&cursor)
                    .arg("MATCH")
                    .arg("scan:*")
                    .arg("COUNT")
                    .arg(25),
            )
            .await
            .unwrap();
        calls += 1;
        seen.extend(keys);
        if next == "0" {
            break;
        }
        cursor = next;
        assert!(calls < 1000, "the walk does not end");
    }
    assert_eq!(
        seen, written,
        "SCAN missed or invented keys ({calls} calls)"
    );

    let keys: Vec<String> = client
        .query(redis::cmd("KEYS").arg("scan:*"))
        .await
        .unwrap();
    assert_eq!(keys.into_iter().collect::<HashSet<_>>(), written);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_that_change_the_shared_connection_are_refused_and_say_what_to_use() {
    let cluster = support::cluster(1, 0).await;
    let client = connected(cluster.client_builder()).await;
    for (line, hint) in [
        ("WATCH k", "dedicated connection"),
        ("MULTI", "atomic pipeline"),
        ("EXEC", "atomic pipeline"),
        ("DISCARD", "atomic pipeline"),
        ("SUBSCRIBE news", "pub/sub"),
        ("PSUBSCRIBE n*", "pub/sub"),
        ("SSUBSCRIBE news", "pub/sub"),
        ("MONITOR", "MONITOR"),
        ("SELECT 1", "configure the client"),
        ("CLIENT REPLY OFF", "configure the client"),
        ("AUTH app secret", "credentials"),
        ("READONLY", "read_from_replicas"),
        ("RESET", "configure the client"),
    ] {
        let err = client.send(words(line)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported, "{line}: {err}");
        assert_eq!(err.sent(), Sent::No, "{line}");
        assert!(err.to_string().contains(hint), "{line}: {err}");
        assert!(!err.to_string().contains("secret"), "{err}");
    }
    // Nothing reached the server: the shared connection is not watching, subscribed or
    // silenced, and serves on.
    client.send(words("SET k v")).await.unwrap();
    assert_eq!(
        client.send(words("GET k")).await.unwrap(),
        Value::BulkString(b"v".to_vec())
    );

    // In one pipeline, a transaction is written in one piece: fine, by hand or atomic.
    let mut by_hand = redis::pipe();
    by_hand
        .cmd("MULTI")
        .cmd("SET")
        .arg("{t}a")
        .arg(1)
        .cmd("INCR")
        .arg("{t}a")
        .cmd("EXEC");
    client.send_pipeline(by_hand).await.unwrap();
    let mut atomic = redis::pipe();
    atomic
        .atomic()
        .cmd("INCR")
        .arg("{t}a")
        .cmd("GET")
        .arg("{t}a");
    let (incr, get): (i64, String) = client.query_pipeline(&atomic).await.unwrap();
    assert_eq!((incr, get.as_str()), (3, "3"));
    // But not a WATCH, nor a MULTI left open for the next caller.
    let mut watch = redis::pipe();
    watch.cmd("WATCH").arg("{t}a").cmd("GET").arg("{t}a");
    let err = client.send_pipeline(watch).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    let mut open = redis::pipe();
    open.cmd("MULTI").cmd("INCR").arg("{t}a");
    let err = client.send_pipeline(open).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert_eq!(
        client.send(words("GET {t}a")).await.unwrap(),
        Value::BulkString(b"3".to_vec()),
        "the refused pipelines ran nothing"
    );
}
