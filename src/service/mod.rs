//! [`RedisService`]: any `redis` connection as a [`tower::Service`].
//!
//! The `redis` crate's connections (`cluster_async::ClusterConnection`, `ConnectionManager`,
//! `MultiplexedConnection`, or a user's own [`ConnectionLike`]) are cheap to clone handles onto a
//! shared, multiplexed connection. `RedisService` clones the handle per call, so it is always
//! ready and many calls run at once; every failure is classified into an [`Error`] here, once.
//!
//! ```no_run
//! use std::time::Duration;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use tower_redis_cluster::RedisService;
//!
//! # async fn run() -> Result<(), tower::BoxError> {
//! let client = redis::cluster::ClusterClient::new(vec!["redis://127.0.0.1:7000"])?;
//! let connection = client.get_async_connection().await?;
//!
//! let mut service = ServiceBuilder::new()
//!     .timeout(Duration::from_millis(500))
//!     .service(RedisService::new(connection));
//!
//! let mut set = redis::cmd("SET");
//! set.arg("greeting").arg("hello");
//! ServiceExt::<redis::Cmd>::ready(&mut service).await?.call(set).await?;
//! # Ok(()) }
//! ```

mod future;

use std::task::{Context, Poll};

use redis::{aio::ConnectionLike, Cmd, Pipeline, Value};
use tower::Service;

pub use future::{PipelineFuture, ResponseFuture};

use crate::Error;

/// A `redis` connection as a `Service<Cmd>` and `Service<Pipeline>`.
///
/// `C` is a handle onto a multiplexed connection, cloned for every call. The service never
/// queues: backpressure and reconnects are the connection's business (and, above it, the
/// layers of this crate).
#[derive(Clone, Debug)]
pub struct RedisService<C> {
    connection: C,
}

impl<C> RedisService<C> {
    /// Wraps a connection.
    pub fn new(connection: C) -> Self {
        RedisService { connection }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &C {
        &self.connection
    }

    /// The wrapped connection, mutably.
    pub fn get_mut(&mut self) -> &mut C {
        &mut self.connection
    }

    /// Unwraps the connection.
    pub fn into_inner(self) -> C {
        self.connection
    }
}

impl<C> Service<Cmd> for RedisService<C>
where
    C: ConnectionLike + Clone + Send + 'static,
{
    type Response = Value;
    type Error = Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        // A multiplexed handle accepts commands at any time; a broken connection shows up as the
        // command's error, which is where the layers above look for it.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, cmd: Cmd) -> Self::Future {
        let mut connection = self.connection.clone();
        ResponseFuture::new(Box::pin(async move {
            // Error replies arrive as `Value::ServerError` inside `Ok`; they are failures of the
            // command and must be classified like any other error (MOVED, WRONGTYPE, ...).
            connection
                .req_packed_command(&cmd)
                .await
                .and_then(Value::extract_error)
                .map_err(Error::from_redis)
        }))
    }
}

impl<C> Service<Pipeline> for RedisService<C>
where
    C: ConnectionLike + Clone + Send + 'static,
{
    type Response = Vec<Value>;
    type Error = Error;
    type Future = PipelineFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, pipeline: Pipeline) -> Self::Future {
        let mut connection = self.connection.clone();
        PipelineFuture::new(Box::pin(async move {
            // `query_async` unwraps MULTI/EXEC and drops ignored replies, so the caller gets one
            // value per command it did not ignore, for plain and atomic pipelines alike.
            pipeline
                .query_async::<Vec<Value>>(&mut connection)
                .await
                .map_err(|e| Error::from_redis_pipeline(e, pipeline.len()))
        }))
    }
}
