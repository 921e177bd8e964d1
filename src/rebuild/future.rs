//! The response future of [`Rebuild`](super::Rebuild).

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use pin_project_lite::pin_project;

use super::shared::Shared;
use crate::{connect::Connect, Error};

pin_project! {
    /// Runs a call on the inner client of one generation and reports its outcome to the
    /// rebuild policy, stamping errors with that generation.
    pub struct ResponseFuture<F, C: Connect> {
        #[pin]
        state: State<F, C>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, C: Connect> {
        Called {
            #[pin]
            inner: F,
            shared: Arc<Shared<C>>,
            generation: u64,
            told: u64,
        },
        Failed {
            error: Option<Error>,
        },
    }
}

impl<F, C: Connect> ResponseFuture<F, C> {
    /// `told`: what the shared state's `failures_told` said as the call started.
    pub(super) fn called(inner: F, shared: Arc<Shared<C>>, generation: u64, told: u64) -> Self {
        ResponseFuture {
            state: State::Called {
                inner,
                shared,
                generation,
                told,
            },
        }
    }

    pub(super) fn failed(error: Error) -> Self {
        ResponseFuture {
            state: State::Failed { error: Some(error) },
        }
    }
}

impl<F, C, T> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<T, Error>>,
    C: Connect,
    C::Service: Send + Sync + 'static,
{
    type Output = Result<T, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Called {
                inner,
                shared,
                generation,
                told,
            } => {
                let result = ready!(inner.poll(cx));
                Poll::Ready(match result {
                    Ok(value) => {
                        shared.observe_success();
                        Ok(value)
                    }
                    Err(error) => {
                        let error = error.with_generation(*generation);
                        // A blocking command's own connection says nothing about the client.
                        if !error.is_detached() {
                            shared.observe_error(&error, *generation, *told);
                        }
                        Err(error)
                    }
                })
            }
            StateProj::Failed { error } => Poll::Ready(Err(error
                .take()
                .unwrap_or_else(|| Error::closed("response future polled after completion")))),
        }
    }
}

impl<F, C: Connect> std::fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
