//! The response future of [`Retry`](super::Retry).

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::{retry::Policy, Service};
use tracing::Span;

use super::{CallPolicy, Delay, RetryPolicy};
use crate::Error;

pin_project! {
    /// One call through [`Retry`](super::Retry): its first attempt, and the backoffs and
    /// retries its [`CallPolicy`] asks for.
    pub struct ResponseFuture<S, P, Req>
    where
        S: Service<Arc<Req>>,
    {
        #[pin]
        state: State<S::Future>,
        // The service clone that sent the last attempt; it sends the retries.
        service: S,
        policy: CallPolicy<P>,
        // The request, shared with the attempt in flight.
        request: Arc<Req>,
        // What only a call that failed needs, made at its first retry: calls that succeed at
        // once never touch the timer or carry its weight.
        retrying: Option<Pin<Box<Retrying>>>,
        span: Span,
    }
}

pin_project! {
    struct Retrying {
        // The call's deadline, if it has one.
        #[pin]
        deadline: Option<Sleep>,
        // The error of the attempt being retried, returned if the retry cannot be sent.
        last_error: Option<Error>,
    }
}

impl Retrying {
    /// Whether the deadline has passed (registering the waker if not).
    fn deadline_passed(self: Pin<&mut Self>, cx: &mut Context<'_>) -> bool {
        self.project()
            .deadline
            .as_pin_mut()
            .is_some_and(|sleep| sleep.poll(cx).is_ready())
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Called {
            #[pin]
            future: F,
        },
        Waiting {
            #[pin]
            delay: Delay,
        },
        Readying,
    }
}

impl<S, P, Req> ResponseFuture<S, P, Req>
where
    S: Service<Arc<Req>>,
{
    pub(super) fn new(
        future: S::Future,
        service: S,
        policy: CallPolicy<P>,
        request: Arc<Req>,
        span: Span,
    ) -> Self {
        ResponseFuture {
            state: State::Called { future },
            service,
            policy,
            request,
            retrying: None,
            span,
        }
    }
}

impl<S, P, Req> Future for ResponseFuture<S, P, Req>
where
    S: Service<Arc<Req>, Error = Error>,
    P: RetryPolicy,
    CallPolicy<P>: Policy<Arc<Req>, S::Response, Error, Future = Delay>,
{
    type Output = Result<S::Response, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let _entered = this.span.enter();
        loop {
            match this.state.as_mut().project() {
                StateProj::Called { future } => {
                    let mut result = match future.poll(cx) {
                        Poll::Ready(result) => result,
                        Poll::Pending => {
                            // Only retries are cut at the deadline: the first attempt is what
                            // the caller would have had without this layer.
                            let Some(retrying) = this.retrying.as_mut() else {
                                return Poll::Pending;
                            };
                            if !retrying.as_mut().deadline_passed(cx) {
                                return Poll::Pending;
                            }
                            let error = Error::timeout(format!(
                                "attempt {} was still running at the call's deadline",
                                this.policy.attempt()
                            ));
                            let error = match retrying.as_mut().project().last_error.take() {
                                Some(previous) => error.with_source(previous),
                                None => error,
                            };
                            tracing::debug!("deadline passed during a retry");
                            let result = Err(this.policy.final_error(error));
                            record_outcome(this.span, this.policy, &result);
                            return Poll::Ready(result);
                        }
                    };
                    match this.policy.retry(this.request, &mut result) {
                        Some(delay) => {
                            let deadline = this.policy.deadline();
                            let retrying = this.retrying.get_or_insert_with(|| {
                                Box::pin(Retrying {
                                    deadline: deadline.map(tokio::time::sleep_until),
                                    last_error: None,
                                })
                            });
                            *retrying.as_mut().project().last_error = result.err();
                            this.state.set(State::Waiting { delay });
                        }
                        None => {
                            record_outcome(this.span, this.policy, &result);
                            return Poll::Ready(result);
                        }
                    }
                }
                StateProj::Waiting { delay } => {
                    // `CallPolicy` hands out no delay that ends past the deadline.
                    ready!(delay.poll(cx));
                    this.state.set(State::Readying);
                }
                StateProj::Readying => {
                    let retrying = this
                        .retrying
                        .as_mut()
                        .expect("a retry is only decided with its state at hand");
                    // Checked before sending, not only while waiting: timers fire on whole
                    // milliseconds, so a backoff that ends just before the deadline may be
                    // woken in the same tick as the deadline.
                    // A service that cannot take the retry (a rebuild in progress) must not
                    // hold the caller past the deadline either.
                    if retrying.as_mut().deadline_passed(cx) {
                        tracing::debug!("deadline passed before the retry could be sent");
                        let error = retrying
                            .as_mut()
                            .project()
                            .last_error
                            .take()
                            .unwrap_or_else(|| {
                                Error::timeout("the call's deadline passed before a retry")
                            });
                        let result = Err(this.policy.final_error(error));
                        record_outcome(this.span, this.policy, &result);
                        return Poll::Ready(result);
                    }
                    let ready = ready!(this.service.poll_ready(cx));
                    if let Err(error) = ready {
                        let result = Err(this.policy.final_error(error));
                        record_outcome(this.span, this.policy, &result);
                        return Poll::Ready(result);
                    }
                    let future = this.service.call(this.request.clone());
                    this.state.set(State::Called { future });
                }
            }
        }
    }
}

pin_project! {
    /// The future of [`Retry::call_once`](super::Retry::call_once): waits for the inner
    /// service to be ready, then runs the call.
    pub struct CallOnce<S, P, Req>
    where
        S: Service<Arc<Req>>,
    {
        #[pin]
        state: Once<S, P, Req>,
    }
}

pin_project! {
    #[project = OnceProj]
    enum Once<S, P, Req>
    where
        S: Service<Arc<Req>>,
    {
        Readying {
            parts: Option<(S, P, Req)>,
            started: Option<Instant>,
            // The call's span when the caller made it (to cover the wait for readiness too).
            span: Option<Span>,
        },
        Called {
            #[pin]
            future: ResponseFuture<S, P, Req>,
        },
    }
}

impl<S, P, Req> CallOnce<S, P, Req>
where
    S: Service<Arc<Req>>,
{
    pub(super) fn new(service: S, policy: P, request: Req) -> Self {
        CallOnce {
            state: Once::Readying {
                parts: Some((service, policy, request)),
                started: None,
                span: None,
            },
        }
    }

    /// Counts the call's deadline from `at` rather than from the moment the inner service is
    /// ready — for a caller whose own deadline started at `at`, so that both end together.
    pub fn started_at(mut self, at: Instant) -> Self {
        if let Once::Readying { started, .. } = &mut self.state {
            *started = Some(at);
        }
        self
    }

    /// Runs the call in `span` (made by [`call_span`](super::call_span)) instead of one of its
    /// own: the caller made it before waiting, and records there what ends the call outside
    /// this future (its own deadline).
    pub(crate) fn in_span(mut self, call_span: Span) -> Self {
        if let Once::Readying { span, .. } = &mut self.state {
            *span = Some(call_span);
        }
        self
    }
}

impl<S, P, Req> Future for CallOnce<S, P, Req>
where
    S: Service<Arc<Req>, Error = Error>,
    P: RetryPolicy,
    Req: super::RetryRequest,
    CallPolicy<P>: Policy<Arc<Req>, S::Response, Error, Future = Delay>,
{
    type Output = Result<S::Response, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                OnceProj::Readying {
                    parts,
                    started,
                    span,
                } => {
                    let Some((service, _, _)) = parts.as_mut() else {
                        return Poll::Ready(Err(Error::closed(
                            "call_once future polled after completion",
                        )));
                    };
                    if let Err(error) = ready!(service.poll_ready(cx)) {
                        *parts = None;
                        if let Some(span) = span.as_ref() {
                            record_failure(span, &error);
                        }
                        return Poll::Ready(Err(error));
                    }
                    let (service, policy, request) = parts.take().expect("checked above");
                    let future = super::start_call(policy, service, request, *started, span.take());
                    this.state.set(Once::Called { future });
                }
                OnceProj::Called { future } => return future.poll(cx),
            }
        }
    }
}

impl<S, P, Req> fmt::Debug for CallOnce<S, P, Req>
where
    S: Service<Arc<Req>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallOnce").finish_non_exhaustive()
    }
}

/// Puts the call's outcome on its span: the counts, when there is more than the first
/// attempt to tell, and for a failure its kind (`error.type`), status and the generation of
/// the inner client that failed it.
fn record_outcome<P: RetryPolicy, T>(
    span: &Span,
    policy: &CallPolicy<P>,
    result: &Result<T, Error>,
) {
    if span.is_disabled() {
        return;
    }
    if policy.attempt() > 1 || policy.redirects() > 0 {
        span.record("attempts", policy.attempt());
        span.record("redirects", policy.redirects());
    }
    if let Err(error) = result {
        record_failure(span, error);
    }
}

/// Puts a failed call's kind (`error.type`), status and the generation of the inner client
/// that failed it on the call's span.
pub(crate) fn record_failure(span: &Span, error: &Error) {
    if span.is_disabled() {
        return;
    }
    span.record("error.type", error.kind().as_str());
    span.record("otel.status_code", "ERROR");
    if let Some(generation) = error.generation() {
        span.record("generation", generation);
    }
}

impl<S, P, Req> fmt::Debug for ResponseFuture<S, P, Req>
where
    S: Service<Arc<Req>>,
    P: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}
