//! The span of every call through the `Client`, with OpenTelemetry's database client fields,
//! captured from a real cluster. Requires the `test-util` feature.

mod support;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use tower_redis_cluster::redis;
use tracing::{
    field::{Field, Visit},
    span::{Attributes, Id, Record},
    Subscriber,
};
use tracing_subscriber::{layer::Context, prelude::*, registry::LookupSpan, Layer};

/// A span's fields by name.
type FieldMap = BTreeMap<String, String>;

/// The fields of every `redis` span, as recorded (at creation and later), in creation order.
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Vec<(u64, FieldMap)>>>);

struct Fields<'a>(&'a mut FieldMap);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_string(),
            format!("{value:?}").trim_matches('"').to_string(),
        );
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Spans {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        if attrs.metadata().name() != "redis" {
            return;
        }
        let mut fields = BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        self.0.lock().unwrap().push((id.into_u64(), fields));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        let mut spans = self.0.lock().unwrap();
        if let Some((_, fields)) = spans.iter_mut().rev().find(|(i, _)| *i == id.into_u64()) {
            values.record(&mut Fields(fields));
        }
    }
}

impl Spans {
    /// The fields of the last span whose operation is `name`.
    fn last(&self, name: &str) -> FieldMap {
        let spans = self.0.lock().unwrap();
        spans
            .iter()
            .rev()
            .find(|(_, f)| f.get("db.operation.name").map(String::as_str) == Some(name))
            .map(|(_, f)| f.clone())
            .unwrap_or_else(|| panic!("no span for {name}: {spans:?}", spans = spans.len()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_has_a_span_with_the_database_client_fields() {
    let spans = Spans::default();
    let subscriber = tracing_subscriber::registry().with(
        spans
            .clone()
            .with_filter(tracing_subscriber::filter::LevelFilter::DEBUG),
    );
    let _guard = tracing::subscriber::set_global_default(subscriber);
    tracing::callsite::rebuild_interest_cache();

    let cluster = support::cluster(1, 0).await;
    let client = support::connected(cluster.client_builder()).await;
    let generation = client.generation().to_string();

    client
        .send(redis::cmd("SET").arg("{t}k").arg("v").clone())
        .await
        .unwrap();
    let set = spans.last("SET");
    for (field, value) in [
        ("otel.name", "SET"),
        ("otel.kind", "client"),
        ("db.system.name", "redis"),
        ("generation", generation.as_str()),
    ] {
        assert_eq!(
            set.get(field).map(String::as_str),
            Some(value),
            "{field}: {set:?}"
        );
    }
    assert!(!set.contains_key("error.type"), "{set:?}");
    assert!(
        !set.values().any(|v| v.contains("{t}k")),
        "a key leaked: {set:?}"
    );

    // A failure says what kind it was.
    client
        .send(redis::cmd("HGET").arg("{t}k").arg("f").clone())
        .await
        .unwrap_err();
    let failed = spans.last("HGET");
    assert_eq!(
        failed.get("error.type").map(String::as_str),
        Some("command"),
        "{failed:?}"
    );
    assert_eq!(
        failed.get("otel.status_code").map(String::as_str),
        Some("ERROR")
    );

    // A pipeline is one span, with its size.
    let mut pipe = redis::pipe();
    pipe.get("{t}k").get("{t}k");
    client.send_pipeline(pipe).await.unwrap();
    let pipeline = spans.last("PIPELINE");
    assert_eq!(
        pipeline.get("db.operation.batch.size").map(String::as_str),
        Some("2")
    );

    // A blocking command's own connection knows its node.
    let nil = client
        .send(redis::cmd("BLPOP").arg("{t}q").arg(0.05).clone())
        .await
        .unwrap();
    assert_eq!(nil, redis::Value::Nil);
    let pop = spans.last("BLPOP");
    let master = cluster.master_of(0).addr;
    assert_eq!(
        (
            pop.get("server.address").cloned(),
            pop.get("server.port").cloned()
        ),
        (
            Some(master.ip().to_string()),
            Some(master.port().to_string())
        ),
        "{pop:?}"
    );

    // A call its deadline ends (the first attempt, which the retry layer never cuts, is still
    // waiting for its reply) fails on its span too.
    let hurried = support::connected(
        cluster
            .client_builder()
            .timeout(std::time::Duration::from_millis(200)),
    )
    .await;
    let err = hurried
        .send(redis::cmd("DEBUG").arg("SLEEP").arg(0.6).clone())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), tower_redis_cluster::ErrorKind::Timeout, "{err}");
    let slept = spans.last("DEBUG");
    assert_eq!(
        slept.get("error.type").map(String::as_str),
        Some("timeout"),
        "{slept:?}"
    );
    assert_eq!(
        slept.get("otel.status_code").map(String::as_str),
        Some("ERROR")
    );

    // Without the retry layer, the client makes the same span.
    let direct = support::connected(cluster.client_builder().no_retry()).await;
    direct
        .send(redis::cmd("ECHO").arg("hello").clone())
        .await
        .unwrap();
    let echo = spans.last("ECHO");
    assert_eq!(
        echo.get("db.system.name").map(String::as_str),
        Some("redis")
    );
    assert_eq!(
        echo.get("generation").cloned(),
        Some(direct.generation().to_string()),
        "{echo:?}"
    );
}
