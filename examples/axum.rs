//! A key-value HTTP service on axum, backed by a Redis Cluster through [`Client`].
//!
//! ```text
//! GET    /kv/{key}        200 with the value (application/octet-stream), or 404
//! PUT    /kv/{key}        stores the request body: 204
//! DELETE /kv/{key}        204, or 404 when there was nothing to delete
//! POST   /kv/{key}/incr   INCR: 200 with the new value
//! ```
//!
//! Values live under `kv:{key}` in Redis (the same keyspace as `examples/tonic.rs`). The
//! [`Client`] is the router's state — a clone per request is a few reference counts — and
//! tower-http's `TraceLayer` and `TimeoutLayer` wrap the router, beside the failover layers
//! inside the client. Errors become HTTP statuses by [`ErrorKind`]: a cluster that is moving or
//! unreachable is `503` with `Retry-After`, a command the data rejects (`INCR` of a non-number,
//! a key of another type) is `409`, and a broken configuration is `500`.
//!
//! ```sh
//! cargo run --example axum --features test-util
//! curl -X PUT --data hello http://127.0.0.1:PORT/kv/greeting
//! curl http://127.0.0.1:PORT/kv/greeting
//! curl -X POST http://127.0.0.1:PORT/kv/visits/incr
//! ```
//!
//! With no configuration it starts a local Redis Cluster (3 shards × master + replica) with the
//! crate's harness. With `REDIS_CLUSTER_SEEDS=host:port[,host:port]` (and optionally
//! `REDIS_USERNAME`, `REDIS_PASSWORD`) it uses that cluster instead. It listens on
//! `127.0.0.1:$PORT`, or on a free port when `PORT` is not set, and prints the address.
//!
//! `tests/axum.rs` compiles this file as a module and serves the same [`app`].

use std::time::Duration;

use axum::{
    body::Bytes,
    extract::{Path, State},
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Router,
};
use tower_http::{timeout::TimeoutLayer, trace::TraceLayer};
use tower_redis_cluster::{Client, Error, ErrorKind, Sent};

#[path = "common/mod.rs"]
mod common;

/// A backstop for the whole HTTP request. The client's own deadline (2 s in `main`) is shorter,
/// so a slow cluster shows up as a `503` from [`ApiError`] rather than as this timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTP application: routes, the client as state, tower-http layers.
pub fn app(client: Client) -> Router {
    Router::new()
        .route(
            "/kv/{key}",
            get(get_value).put(put_value).delete(delete_value),
        )
        .route("/kv/{key}/incr", post(incr_value))
        .with_state(client)
        .layer((
            TraceLayer::new_for_http(),
            TimeoutLayer::with_status_code(StatusCode::SERVICE_UNAVAILABLE, REQUEST_TIMEOUT),
        ))
}

/// The Redis key that holds the value of `key`.
pub fn redis_key(key: &str) -> String {
    format!("kv:{key}")
}

async fn get_value(
    State(client): State<Client>,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    let mut cmd = redis::cmd("GET");
    cmd.arg(redis_key(&key));
    Ok(match client.query::<Option<Vec<u8>>>(&cmd).await? {
        Some(value) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            )],
            value,
        )
            .into_response(),
        None => not_found(&key),
    })
}

async fn put_value(
    State(client): State<Client>,
    Path(key): Path<String>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let mut cmd = redis::cmd("SET");
    cmd.arg(redis_key(&key)).arg(body.as_ref());
    client.query::<()>(&cmd).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_value(
    State(client): State<Client>,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    let mut cmd = redis::cmd("DEL");
    cmd.arg(redis_key(&key));
    Ok(match client.query::<u64>(&cmd).await? {
        0 => not_found(&key),
        _ => StatusCode::NO_CONTENT.into_response(),
    })
}

async fn incr_value(
    State(client): State<Client>,
    Path(key): Path<String>,
) -> Result<String, ApiError> {
    let mut cmd = redis::cmd("INCR");
    cmd.arg(redis_key(&key));
    let value: i64 = client.query(&cmd).await?;
    Ok(format!("{value}\n"))
}

fn not_found(key: &str) -> Response {
    (StatusCode::NOT_FOUND, format!("no value for key {key:?}\n")).into_response()
}

/// A failed Redis call, answered with a status chosen by its [`ErrorKind`]. The full error
/// (with node addresses and root cause) goes to the log, not to the HTTP client.
#[derive(Debug)]
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        ApiError(error)
    }
}

/// The HTTP status for a failed Redis call of this kind.
pub fn status_for(kind: ErrorKind) -> StatusCode {
    match kind {
        // The server refused the command for the data it holds: WRONGTYPE, INCR of a
        // non-number. The request conflicts with the current state of the resource.
        ErrorKind::Command => StatusCode::CONFLICT,
        // Failover, migration, unreachable nodes, deadline: it usually passes; ask to retry.
        kind if kind.is_transient() || kind == ErrorKind::Closed => StatusCode::SERVICE_UNAVAILABLE,
        // Auth, TLS, configuration: this service is misconfigured.
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let error = self.0;
        let status = status_for(error.kind());
        tracing::warn!(kind = %error.kind(), sent = ?error.sent(), %error, "redis call failed");
        let mut body = format!("redis error: {}", error.kind());
        let retry = status == StatusCode::SERVICE_UNAVAILABLE;
        // Whether retrying a write such as INCR could apply it twice: the caller may need to know.
        if retry && error.sent() == Sent::Maybe {
            body.push_str(" (the command may have taken effect)");
        }
        body.push('\n');
        let mut response = (status, body).into_response();
        if retry {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_http=debug".into()),
        )
        .init();
    let (client, _cluster) = common::connect().await?;
    let port: u16 = match std::env::var("PORT") {
        Ok(port) => port.parse()?,
        Err(_) => 0,
    };
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr} (Ctrl-C to stop)");
    println!("  curl -X PUT --data hello http://{addr}/kv/greeting");
    println!("  curl -i http://{addr}/kv/greeting");
    println!("  curl -X POST http://{addr}/kv/visits/incr");
    axum::serve(listener, app(client))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    // `_cluster` (if any) is dropped here, which stops its redis-server processes.
    Ok(())
}
