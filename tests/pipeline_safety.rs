//! A property of pipeline classification, checked against a real server: a pipeline that
//! `IdempotencyTable::classify_pipeline` calls safe to send again (`ReadOnly` or `Idempotent`)
//! leaves the same data, and gives the same replies to its reads, whether it runs once, twice,
//! or once after a first run that stopped part way (a connection that dropped mid-pipeline).
//! Replies that are counts (`SADD` → 1, then 0) are informational, as documented, and not
//! compared; whether a write failed is. Requires the `test-util` feature.

use std::collections::BTreeMap;

use proptest::prelude::*;
use redis::{aio::ConnectionLike, Value};
use tower_redis_cluster::{harness::StandaloneServer, Idempotency, IdempotencyTable};

const KEYS: [&str; 3] = ["ka", "kb", "kc"];
const MEMBERS: [&str; 2] = ["x", "y"];

/// One command of the vocabulary: a template and the keys and members it is filled with.
#[derive(Clone, Debug)]
struct Op {
    template: &'static str,
    keys: [usize; 3],
    member: usize,
}

/// `K0`..`K2` are keys, `M` a member or value.
const TEMPLATES: &[&str] = &[
    "GET K0",
    "SET K0 M",
    "DEL K0",
    "DEL K0 K1",
    "EXISTS K0",
    "MGET K0 K1",
    "MSET K0 M K1 M",
    "SADD K0 M",
    "SREM K0 M",
    "SMEMBERS K0",
    "SCARD K0",
    "SUNIONSTORE K0 K1 K2",
    "SINTERSTORE K0 K1 K2",
    "HSET K0 f M",
    "HDEL K0 f",
    "HGET K0 f",
    "HGETALL K0",
    "LPUSH K0 M",
    "LRANGE K0 0 -1",
    "RPOP K0",
    "INCR K0",
    "COPY K0 K1",
    "COPY K0 K1 REPLACE",
    "ZADD K0 1 M",
    "ZREM K0 M",
    "ZRANGE K0 0 -1",
    "ZUNIONSTORE K0 2 K1 K2",
    "APPEND K0 M",
    "GETDEL K0",
    "KEYS *",
    "DBSIZE",
    "LSET K0 0 M",
    "ZREMRANGEBYSCORE K0 0 1",
    "GEOADD K0 0 0 M",
    "PFADD K0 M",
    "SETRANGE K0 1 M",
    "PERSIST K0",
    "EXPIREAT K0 1",
    "BITOP OR K0 K1 K2",
    "SORT K0 ALPHA STORE K1",
    "TYPE K0",
];

impl Op {
    fn command(&self) -> redis::Cmd {
        let mut words = self.template.split_whitespace().map(|w| match w {
            "K0" => KEYS[self.keys[0]],
            "K1" => KEYS[self.keys[1]],
            "K2" => KEYS[self.keys[2]],
            "M" => MEMBERS[self.member],
            w => w,
        });
        let mut c = redis::cmd(words.next().unwrap());
        for w in words {
            c.arg(w);
        }
        c
    }
}

fn op() -> impl Strategy<Value = Op> {
    (0..TEMPLATES.len(), [0..3usize, 0..3, 0..3], 0..2usize).prop_map(|(t, keys, member)| Op {
        template: TEMPLATES[t],
        keys,
        member,
    })
}

/// Everything the server holds, comparable.
async fn state(con: &mut redis::aio::MultiplexedConnection) -> BTreeMap<String, String> {
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(con).await.unwrap();
    keys.sort();
    let mut out = BTreeMap::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE").arg(&key).query_async(con).await.unwrap();
        let value = match kind.as_str() {
            "string" => format!(
                "{:?}",
                redis::cmd("GET").arg(&key).query_async::<Value>(con).await
            ),
            "set" => {
                let mut m: Vec<String> = redis::cmd("SMEMBERS")
                    .arg(&key)
                    .query_async(con)
                    .await
                    .unwrap();
                m.sort();
                format!("{m:?}")
            }
            "hash" => {
                let m: BTreeMap<String, String> = redis::cmd("HGETALL")
                    .arg(&key)
                    .query_async(con)
                    .await
                    .unwrap();
                format!("{m:?}")
            }
            "list" => format!(
                "{:?}",
                redis::cmd("LRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .query_async::<Vec<String>>(con)
                    .await
            ),
            "zset" => format!(
                "{:?}",
                redis::cmd("ZRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .query_async::<Vec<String>>(con)
                    .await
            ),
            other => other.to_string(),
        };
        out.insert(key, format!("{kind}:{value}"));
    }
    out
}

/// A reply, comparable: sets and maps sorted (their order is the server's business).
fn normal(value: &Value) -> String {
    match value {
        Value::Array(items) | Value::Set(items) => {
            let mut parts: Vec<String> = items.iter().map(normal).collect();
            parts.sort();
            format!("[{}]", parts.join(","))
        }
        Value::ServerError(e) => format!("ERR({:?})", e.code()),
        other => format!("{other:?}"),
    }
}

/// Runs `ops` as one pipeline and returns each command's reply (errors included).
async fn run(con: &mut redis::aio::MultiplexedConnection, ops: &[Op], atomic: bool) -> Vec<String> {
    if ops.is_empty() {
        return Vec::new();
    }
    let mut pipe = redis::pipe();
    if atomic {
        pipe.atomic();
    }
    for op in ops {
        pipe.add_command(op.command());
    }
    if atomic {
        return match pipe.query_async::<Vec<Value>>(con).await {
            Ok(values) => values.iter().map(normal).collect(),
            Err(e) => vec![format!("aborted: {:?}", e.code())],
        };
    }
    let values = con.req_packed_commands(&pipe, 0, ops.len()).await.unwrap();
    values.iter().map(normal).collect()
}

async fn reset(con: &mut redis::aio::MultiplexedConnection, initial: &[Op]) {
    let () = redis::cmd("FLUSHALL").query_async(con).await.unwrap();
    for op in initial {
        let _ = con.req_packed_command(&op.command()).await;
    }
}

/// What a caller acts on: the replies of the read-only commands, and whether each write
/// failed (and how) — a write's count is informational, its failure is not.
fn reads(ops: &[Op], replies: &[String]) -> Vec<(usize, String)> {
    let table = IdempotencyTable::new();
    ops.iter()
        .zip(replies)
        .enumerate()
        .map(|(i, (op, reply))| {
            if table.classify(&op.command()) == Idempotency::ReadOnly || reply.starts_with("ERR(") {
                (i, reply.clone())
            } else {
                (i, "ok".to_owned())
            }
        })
        .collect()
}

#[test]
fn pipelines_classified_safe_replay_to_the_same_data_and_reads() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (server, con) = runtime.block_on(async {
        let server = StandaloneServer::builder().start().await.unwrap();
        let client = redis::Client::open(server.url()).unwrap();
        let con = client.get_multiplexed_async_connection().await.unwrap();
        (server, con)
    });
    let table = IdempotencyTable::new();
    let checked = std::cell::RefCell::new([0usize; 2]);
    // PIPELINE_CASES=100000 for a long search.
    let cases = std::env::var("PIPELINE_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000);
    let config = ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let strategy = (
        proptest::collection::vec(op(), 0..4),
        proptest::collection::vec(op(), 1..5),
        any::<bool>(),
        0..5usize,
    );
    let result = runner.run(&strategy, |(initial, ops, atomic, cut)| {
        let mut pipe = redis::pipe();
        for op in &ops {
            pipe.add_command(op.command());
        }
        let class = table.classify_pipeline(&pipe);
        if !class.is_retry_safe() {
            return Ok(());
        }
        checked.borrow_mut()[usize::from(atomic)] += 1;
        let mut con = con.clone();
        runtime.block_on(async {
            reset(&mut con, &initial).await;
            let once = run(&mut con, &ops, atomic).await;
            let after_once = state(&mut con).await;
            // Sent again after it ran.
            let twice = run(&mut con, &ops, atomic).await;
            prop_assert_eq!(
                &state(&mut con).await,
                &after_once,
                "state after a second run: {:?}",
                ops
            );
            prop_assert_eq!(
                reads(&ops, &twice),
                reads(&ops, &once),
                "reads of a second run: {:?}",
                ops
            );
            // Sent again after a first run that stopped part way (a plain pipeline only: a
            // transaction runs whole or not at all).
            if !atomic {
                let cut = cut.min(ops.len());
                reset(&mut con, &initial).await;
                run(&mut con, &ops[..cut], false).await;
                let replay = run(&mut con, &ops, false).await;
                prop_assert_eq!(
                    &state(&mut con).await,
                    &after_once,
                    "state after a part run and a replay: {:?} cut {}",
                    ops,
                    cut
                );
                prop_assert_eq!(
                    reads(&ops, &replay),
                    reads(&ops, &once),
                    "reads after a part run: {:?} cut {}",
                    ops,
                    cut
                );
            }
            Ok(())
        })
    });
    drop(server);
    if let Err(e) = result {
        panic!("{e}");
    }
    let checked = checked.into_inner();
    println!(
        "pipelines classified safe and checked: {} plain, {} atomic",
        checked[0], checked[1]
    );
    assert!(
        checked[0] > 50 && checked[1] > 50,
        "too few safe pipelines drawn: {checked:?}"
    );
}
