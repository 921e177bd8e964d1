//! Response futures of [`RedisService`](super::RedisService).

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use redis::Value;

use crate::Error;

type BoxedCall<T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send + 'static>>;

/// The future of one command sent through a [`RedisService`](super::RedisService).
pub struct ResponseFuture {
    inner: BoxedCall<Value>,
}

impl ResponseFuture {
    pub(super) fn new(inner: BoxedCall<Value>) -> Self {
        ResponseFuture { inner }
    }
}

impl Future for ResponseFuture {
    type Output = Result<Value, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

/// The future of one pipeline sent through a [`RedisService`](super::RedisService).
pub struct PipelineFuture {
    inner: BoxedCall<Vec<Value>>,
}

impl PipelineFuture {
    pub(super) fn new(inner: BoxedCall<Vec<Value>>) -> Self {
        PipelineFuture { inner }
    }
}

impl Future for PipelineFuture {
    type Output = Result<Vec<Value>, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl fmt::Debug for PipelineFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PipelineFuture").finish_non_exhaustive()
    }
}
