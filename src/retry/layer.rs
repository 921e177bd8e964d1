//! [`RetryLayer`]: makes a [`Retry`] around a service.

use tower::Layer;

use super::{Retry, RetryConfig, RetryPolicy, StandardRetryPolicy};

/// Makes a [`Retry`] around a service. Every service it makes shares the policy's shared state
/// (with [`StandardRetryPolicy`]: the retry budget).
#[derive(Clone, Debug)]
pub struct RetryLayer<P = StandardRetryPolicy> {
    policy: P,
}

impl RetryLayer {
    /// A layer using [`StandardRetryPolicy`] with this configuration.
    pub fn new(config: RetryConfig) -> Self {
        RetryLayer {
            policy: StandardRetryPolicy::new(config),
        }
    }
}

impl Default for RetryLayer {
    /// [`RetryLayer::new`] with [`RetryConfig::default`].
    fn default() -> Self {
        RetryLayer::new(RetryConfig::default())
    }
}

impl<P: RetryPolicy> RetryLayer<P> {
    /// A layer using a policy of your own.
    pub fn with_policy(policy: P) -> Self {
        RetryLayer { policy }
    }

    /// The policy each call starts from.
    pub fn policy(&self) -> &P {
        &self.policy
    }
}

impl<S, P: RetryPolicy> Layer<S> for RetryLayer<P> {
    type Service = Retry<S, P>;

    fn layer(&self, inner: S) -> Retry<S, P> {
        Retry::with_policy(inner, self.policy.clone())
    }
}
