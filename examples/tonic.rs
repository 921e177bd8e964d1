//! A key-value gRPC service on tonic, backed by a Redis Cluster through [`Client`].
//!
//! The service `kv.KeyValue` (`examples/proto/kv.proto`) has three unary methods: `Get` (or
//! `NOT_FOUND`), `Set` and `Incr`. Values live under `kv:{key}` in Redis, the keyspace of
//! `examples/axum.rs` too. No build script and no `protoc`: the messages are hand-written
//! `#[derive(prost::Message)]` structs matching the `.proto` file, and the server and client are
//! the few lines `tonic-build` would generate, on `tonic::server::Grpc` / `tonic::client::Grpc`
//! with `tonic_prost::ProstCodec`.
//!
//! Errors become gRPC codes by [`ErrorKind`]: a cluster that is moving or unreachable is
//! `UNAVAILABLE` (retry with backoff), a command the data rejects (`INCR` of a non-number, a key
//! of another type) is `FAILED_PRECONDITION`, and a broken configuration is `INTERNAL`.
//! tower-http's `TraceLayer` and tonic's own request timeout wrap the service, beside the
//! failover layers inside the client.
//!
//! ```sh
//! cargo run --example tonic --features test-util
//! grpcurl -plaintext -import-path examples/proto -proto kv.proto \
//!   -d '{"key": "greeting"}' 127.0.0.1:PORT kv.KeyValue/Get
//! ```
//!
//! With no configuration it starts a local Redis Cluster (3 shards × master + replica) with the
//! crate's harness. With `REDIS_CLUSTER_SEEDS=host:port[,host:port]` (and optionally
//! `REDIS_USERNAME`, `REDIS_PASSWORD`) it uses that cluster instead. It listens on
//! `127.0.0.1:$PORT`, or on a free port when `PORT` is not set, prints the address, makes a few
//! calls with [`KeyValueClient`] and serves until Ctrl-C.
//!
//! `tests/tonic.rs` compiles this file as a module and serves the same [`KeyValueServer`].

use std::{
    convert::Infallible,
    future::Future,
    task::{Context, Poll},
    time::Duration,
};

use tonic::{
    body::Body,
    codegen::{http, BoxFuture, Service},
    server::NamedService,
    transport::{server::TcpIncoming, Channel, Endpoint, Server},
    Status,
};
use tonic_prost::ProstCodec;
use tower_http::{
    classify::{GrpcCode, GrpcErrorsAsFailures, SharedClassifier},
    trace::TraceLayer,
};
use tower_redis_cluster::{Client, Error, ErrorKind};

/// The messages of `examples/proto/kv.proto`, written by hand.
pub mod proto {
    /// `Get`: the key to read.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GetRequest {
        /// The key (stored as `kv:{key}`).
        #[prost(string, tag = "1")]
        pub key: String,
    }

    /// `Get`: the value.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GetReply {
        /// The stored bytes.
        #[prost(bytes = "vec", tag = "1")]
        pub value: Vec<u8>,
    }

    /// `Set`: the key and its new value.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SetRequest {
        /// The key (stored as `kv:{key}`).
        #[prost(string, tag = "1")]
        pub key: String,
        /// The bytes to store.
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
    }

    /// `Set`: nothing.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SetReply {}

    /// `Incr`: the key of the counter.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct IncrRequest {
        /// The key (stored as `kv:{key}`).
        #[prost(string, tag = "1")]
        pub key: String,
    }

    /// `Incr`: the counter's new value.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct IncrReply {
        /// The value after the increment.
        #[prost(int64, tag = "1")]
        pub value: i64,
    }
}

use proto::{GetReply, GetRequest, IncrReply, IncrRequest, SetReply, SetRequest};

#[path = "common/mod.rs"]
mod common;

const SERVICE: &str = "kv.KeyValue";
const GET: &str = "/kv.KeyValue/Get";
const SET: &str = "/kv.KeyValue/Set";
const INCR: &str = "/kv.KeyValue/Incr";

/// A backstop for a whole gRPC call. The client's own deadline (2 s in `main`) is shorter, so a
/// slow cluster shows up as `UNAVAILABLE` from [`status_for`] rather than as this timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The Redis key that holds the value of `key`.
pub fn redis_key(key: &str) -> Result<String, Status> {
    if key.is_empty() {
        return Err(Status::invalid_argument("the key must not be empty"));
    }
    Ok(format!("kv:{key}"))
}

/// The gRPC status for a failed Redis call. The full error (with node addresses and root cause)
/// goes to the log, not to the gRPC client.
pub fn status_for(error: Error) -> Status {
    tracing::warn!(kind = %error.kind(), sent = ?error.sent(), %error, "redis call failed");
    let message = format!("redis error: {}", error.kind());
    match error.kind() {
        // The server refused the command for the data it holds: WRONGTYPE, INCR of a non-number.
        ErrorKind::Command => Status::failed_precondition(message),
        // Failover, migration, unreachable nodes, deadline: it usually passes; retry with backoff.
        kind if kind.is_transient() || kind == ErrorKind::Closed => Status::unavailable(message),
        // Auth, TLS, configuration: this service is misconfigured.
        _ => Status::internal(message),
    }
}

async fn get(client: Client, request: GetRequest) -> Result<GetReply, Status> {
    let mut cmd = redis::cmd("GET");
    cmd.arg(redis_key(&request.key)?);
    match client
        .query::<Option<Vec<u8>>>(&cmd)
        .await
        .map_err(status_for)?
    {
        Some(value) => Ok(GetReply { value }),
        None => Err(Status::not_found(format!(
            "no value for key {:?}",
            request.key
        ))),
    }
}

async fn set(client: Client, request: SetRequest) -> Result<SetReply, Status> {
    let mut cmd = redis::cmd("SET");
    cmd.arg(redis_key(&request.key)?).arg(request.value);
    client.query::<()>(&cmd).await.map_err(status_for)?;
    Ok(SetReply {})
}

async fn incr(client: Client, request: IncrRequest) -> Result<IncrReply, Status> {
    let mut cmd = redis::cmd("INCR");
    cmd.arg(redis_key(&request.key)?);
    let value = client.query(&cmd).await.map_err(status_for)?;
    Ok(IncrReply { value })
}

/// The `kv.KeyValue` service: what `tonic-build` would generate, routing by path to the
/// handlers above.
#[derive(Clone, Debug)]
pub struct KeyValueServer {
    client: Client,
}

impl KeyValueServer {
    /// The service, answering with `client`.
    pub fn new(client: Client) -> Self {
        KeyValueServer { client }
    }
}

impl NamedService for KeyValueServer {
    const NAME: &'static str = SERVICE;
}

impl Service<http::Request<Body>> for KeyValueServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let client = self.client.clone();
        match request.uri().path() {
            GET => unary(request, move |r| get(client.clone(), r)),
            SET => unary(request, move |r| set(client.clone(), r)),
            INCR => unary(request, move |r| incr(client.clone(), r)),
            path => {
                let status = Status::unimplemented(format!("no method {path}"));
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// Decodes one `Req`, runs `handler`, encodes its `Rep` or its status.
fn unary<Req, Rep, F, Fut>(
    request: http::Request<Body>,
    mut handler: F,
) -> BoxFuture<http::Response<Body>, Infallible>
where
    Req: prost::Message + Default + Send + 'static,
    Rep: prost::Message + Send + 'static,
    F: FnMut(Req) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Rep, Status>> + Send + 'static,
{
    let service = tower::service_fn(move |r: tonic::Request<Req>| {
        let reply = handler(r.into_inner());
        async move { reply.await.map(tonic::Response::new) }
    });
    Box::pin(async move {
        let mut grpc = tonic::server::Grpc::new(ProstCodec::<Rep, Req>::default());
        Ok(grpc.unary(service, request).await)
    })
}

/// A client of `kv.KeyValue`: what `tonic-build` would generate, with plain Rust types.
#[derive(Clone, Debug)]
pub struct KeyValueClient {
    inner: tonic::client::Grpc<Channel>,
}

impl KeyValueClient {
    /// Connects to `uri` (`http://host:port`).
    pub async fn connect(uri: String) -> Result<Self, tonic::transport::Error> {
        let channel = Endpoint::from_shared(uri)?.connect().await?;
        Ok(KeyValueClient::new(channel))
    }

    /// A client on an existing channel.
    pub fn new(channel: Channel) -> Self {
        KeyValueClient {
            inner: tonic::client::Grpc::new(channel),
        }
    }

    async fn unary<Req, Rep>(&mut self, path: &'static str, request: Req) -> Result<Rep, Status>
    where
        Req: prost::Message + Send + Sync + 'static,
        Rep: prost::Message + Default + Send + Sync + 'static,
    {
        self.inner
            .ready()
            .await
            .map_err(|e| Status::unavailable(format!("the channel is not ready: {e}")))?;
        let reply = self
            .inner
            .unary(
                tonic::Request::new(request),
                http::uri::PathAndQuery::from_static(path),
                ProstCodec::<Req, Rep>::default(),
            )
            .await?;
        Ok(reply.into_inner())
    }

    /// `Get`: the value of `key`, or `NOT_FOUND`.
    pub async fn get(&mut self, key: impl Into<String>) -> Result<Vec<u8>, Status> {
        let request = GetRequest { key: key.into() };
        let reply: GetReply = self.unary(GET, request).await?;
        Ok(reply.value)
    }

    /// `Set`: stores `value` at `key`.
    pub async fn set(
        &mut self,
        key: impl Into<String>,
        value: impl Into<Vec<u8>>,
    ) -> Result<(), Status> {
        let request = SetRequest {
            key: key.into(),
            value: value.into(),
        };
        let SetReply {} = self.unary(SET, request).await?;
        Ok(())
    }

    /// `Incr`: increments the counter at `key`, returns its new value.
    pub async fn incr(&mut self, key: impl Into<String>) -> Result<i64, Status> {
        let request = IncrRequest { key: key.into() };
        let reply: IncrReply = self.unary(INCR, request).await?;
        Ok(reply.value)
    }
}

/// Serves `kv.KeyValue` for `client` on `listener` until `shutdown` completes, with tonic's
/// request timeout and tower-http's tracing around the service.
pub async fn serve(
    client: Client,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    Server::builder()
        .timeout(REQUEST_TIMEOUT)
        .layer(TraceLayer::new(SharedClassifier::new(
            // The caller's mistakes are answers, not failures of this service (like 4xx in HTTP).
            GrpcErrorsAsFailures::new()
                .with_success(GrpcCode::NotFound)
                .with_success(GrpcCode::InvalidArgument)
                .with_success(GrpcCode::FailedPrecondition),
        )))
        .add_service(KeyValueServer::new(client))
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown)
        .await
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
    let serving = tokio::spawn(serve(client, listener, async {
        let _ = tokio::signal::ctrl_c().await;
    }));
    println!("serving {SERVICE} on {addr} (Ctrl-C to stop)");

    let mut kv = KeyValueClient::connect(format!("http://{addr}")).await?;
    kv.set("greeting", "hello").await?;
    let greeting = kv.get("greeting").await?;
    println!("  Get greeting → {:?}", String::from_utf8_lossy(&greeting));
    println!("  Incr visits → {}", kv.incr("visits").await?);
    match kv.get("no-such-key").await {
        Err(status) => println!("  Get no-such-key → {:?}", status.code()),
        Ok(value) => println!("  Get no-such-key → {value:?}"),
    }
    println!(
        "  grpcurl -plaintext -import-path examples/proto -proto kv.proto \
         -d '{{\"key\": \"greeting\"}}' {addr} {SERVICE}/Get"
    );

    serving.await??;
    // `_cluster` (if any) is dropped here, which stops its redis-server processes.
    Ok(())
}
