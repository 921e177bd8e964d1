//! Credentials: static ones, or a provider asked afresh at every connect.
//!
//! Managed services hand out short-lived secrets (IAM auth tokens valid for about 15 minutes,
//! rotated ACL passwords). A password read once at start-up makes every later reconnect,
//! rebuild and topology probe fail with an authentication error, forever. So the crate never
//! keeps a secret past one connect: it asks a [`CredentialsProvider`] each time it opens a
//! connection — the first connect, every reconnect of a node by the inner cluster client, every
//! rebuild, every topology probe. Static [`Credentials`] are the simple case of a provider.

use std::{fmt, future::Future, pin::Pin, sync::Arc};

use crate::Error;

/// A secret (password or token): never printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Secret(secret.into())
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret::new(s)
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret::new(s)
    }
}

/// ACL credentials: an optional user name (Redis 6+) and a password.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    /// The ACL user; `None` authenticates as `default`.
    pub username: Option<String>,
    /// The password, redacted in `Debug`.
    pub password: Secret,
}

impl Credentials {
    /// Credentials for an ACL user.
    pub fn new(username: impl Into<String>, password: impl Into<Secret>) -> Self {
        Credentials {
            username: Some(username.into()),
            password: password.into(),
        }
    }

    /// A password for the `default` user (`requirepass`).
    pub fn password(password: impl Into<Secret>) -> Self {
        Credentials {
            username: None,
            password: password.into(),
        }
    }

    /// The user name sent with `AUTH`: `default` when none is set.
    pub fn user_or_default(&self) -> &str {
        self.username.as_deref().unwrap_or("default")
    }
}

/// The future returned by [`CredentialsProvider::credentials`].
pub type CredentialsFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Credentials, Error>> + Send + 'a>>;

/// Supplies the credentials for one connection.
///
/// Asked at **every** connect — never cached by the crate past one connection — so a provider
/// can hand out short-lived tokens: generate a fresh IAM token, read a rotated secret, or
/// return a clone of what it holds (static [`Credentials`] implement this trait). It may cache
/// on its own, as long as what it returns is valid for the connection about to be opened.
/// Errors are reported as the connect's error (use [`ErrorKind::Auth`](crate::ErrorKind::Auth)
/// for a provider that cannot produce credentials, so nobody retries a hopeless connect
/// quickly).
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use tower_redis_cluster::connect::{credentials_fn, Credentials, CredentialsProvider};
///
/// // A secret rotated by the application (e.g. from a secrets manager's change notification).
/// let current = Arc::new(Mutex::new(Credentials::new("app", "first-token")));
/// let shared = current.clone();
/// let provider = credentials_fn(move || {
///     let credentials = shared.lock().unwrap().clone();
///     async move { Ok(credentials) }
/// });
/// *current.lock().unwrap() = Credentials::new("app", "rotated-token");
/// # let _ = provider;
/// ```
pub trait CredentialsProvider: Send + Sync + 'static {
    /// The credentials to authenticate the next connection with.
    fn credentials(&self) -> CredentialsFuture<'_>;

    /// Whether every call returns the same credentials. Static credentials are handed to the
    /// inner client once per client; others are asked by every node connection.
    fn is_static(&self) -> bool {
        false
    }
}

impl CredentialsProvider for Credentials {
    fn credentials(&self) -> CredentialsFuture<'_> {
        let credentials = self.clone();
        Box::pin(async move { Ok(credentials) })
    }

    fn is_static(&self) -> bool {
        true
    }
}

impl<P: CredentialsProvider + ?Sized> CredentialsProvider for Arc<P> {
    fn credentials(&self) -> CredentialsFuture<'_> {
        (**self).credentials()
    }

    fn is_static(&self) -> bool {
        (**self).is_static()
    }
}

/// A [`CredentialsProvider`] from a closure returning a future.
pub fn credentials_fn<F, Fut>(f: F) -> CredentialsFn<F>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Credentials, Error>> + Send + 'static,
{
    CredentialsFn { f }
}

/// The provider made by [`credentials_fn`].
#[derive(Clone)]
pub struct CredentialsFn<F> {
    f: F,
}

impl<F> fmt::Debug for CredentialsFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialsFn").finish_non_exhaustive()
    }
}

impl<F, Fut> CredentialsProvider for CredentialsFn<F>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Credentials, Error>> + Send + 'static,
{
    fn credentials(&self) -> CredentialsFuture<'_> {
        Box::pin((self.f)())
    }
}

/// How the crate holds credentials: none, or a provider (static ones included).
#[derive(Clone, Default)]
pub(crate) struct CredentialSource(Option<Arc<dyn CredentialsProvider>>);

impl CredentialSource {
    pub(crate) fn none() -> Self {
        CredentialSource(None)
    }

    pub(crate) fn provider(provider: Arc<dyn CredentialsProvider>) -> Self {
        CredentialSource(Some(provider))
    }

    /// The provider, when credentials are configured.
    pub(crate) fn get(&self) -> Option<&Arc<dyn CredentialsProvider>> {
        self.0.as_ref()
    }

    /// [`fetch`](Self::fetch) bounded by `limit`: a provider that hangs (a token service that
    /// swallows packets) costs a connection no more than its connection timeout.
    pub(crate) async fn fetch_within(
        &self,
        limit: std::time::Duration,
    ) -> Result<Option<Credentials>, Error> {
        match tokio::time::timeout(limit, self.fetch()).await {
            Ok(fetched) => fetched,
            Err(_) => Err(Error::timeout(format!(
                "the credentials provider did not answer within {limit:?}"
            ))
            .with_sent(crate::Sent::No)),
        }
    }

    /// Asks the provider (if any) for the next connection's credentials.
    pub(crate) async fn fetch(&self) -> Result<Option<Credentials>, Error> {
        match &self.0 {
            None => Ok(None),
            Some(p) => p
                .credentials()
                .await
                .map(Some)
                .map_err(|e| e.context("the credentials provider failed")),
        }
    }
}

impl fmt::Debug for CredentialSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            None => f.write_str("none"),
            Some(p) if p.is_static() => f.write_str("static <redacted>"),
            Some(_) => f.write_str("provider"),
        }
    }
}

/// The provider as the redis crate's streaming credentials: every node connection the inner
/// cluster client opens (its first one, and each reconnect) subscribes and takes the first
/// item, so it authenticates with credentials asked for just then. The stream then stays
/// silent: a live, authenticated connection is never re-authenticated (Redis keeps it
/// authenticated), and the subscription task ends with the connection.
pub(crate) struct PerConnection(pub(crate) Arc<dyn CredentialsProvider>);

impl redis::auth::StreamingCredentialsProvider for PerConnection {
    fn subscribe(
        &self,
    ) -> Pin<Box<dyn futures_util::Stream<Item = redis::RedisResult<redis::auth::BasicAuth>> + Send>>
    {
        let provider = self.0.clone();
        let first = futures_util::stream::once(async move {
            match provider.credentials().await {
                Ok(c) => Ok(redis::auth::BasicAuth::new(
                    c.user_or_default().to_string(),
                    c.password.expose().to_string(),
                )),
                Err(e) => Err(redis::RedisError::from((
                    redis::ErrorKind::AuthenticationFailed,
                    "the credentials provider failed",
                    e.to_string(),
                ))),
            }
        });
        Box::pin(futures_util::StreamExt::chain(
            first,
            futures_util::stream::pending(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn debug_never_shows_the_secret() {
        let c = Credentials::new("app", "topsecret");
        assert!(!format!("{c:?}").contains("topsecret"));
        let source = CredentialSource::provider(Arc::new(c));
        assert!(!format!("{source:?}").contains("topsecret"));
    }

    #[tokio::test]
    async fn a_provider_is_asked_at_every_fetch() {
        let asked = Arc::new(AtomicU32::new(0));
        let counter = asked.clone();
        let provider = credentials_fn(move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move { Ok(Credentials::new("app", format!("token-{n}"))) }
        });
        let source = CredentialSource::provider(Arc::new(provider));
        let first = source.fetch().await.unwrap().unwrap();
        let second = source.fetch().await.unwrap().unwrap();
        assert_eq!(first.password.expose(), "token-0");
        assert_eq!(second.password.expose(), "token-1");
        assert_eq!(asked.load(Ordering::SeqCst), 2);
        assert!(CredentialSource::none().fetch().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn each_subscription_asks_once_and_then_stays_silent() {
        use futures_util::StreamExt;
        use redis::auth::StreamingCredentialsProvider;
        let asked = Arc::new(AtomicU32::new(0));
        let counter = asked.clone();
        let provider = PerConnection(Arc::new(credentials_fn(move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move { Ok(Credentials::password(format!("p{n}"))) }
        })));
        let mut a = provider.subscribe();
        let got = a.next().await.unwrap().unwrap();
        assert_eq!((got.username(), got.password()), ("default", "p0"));
        let mut b = provider.subscribe();
        assert_eq!(b.next().await.unwrap().unwrap().password(), "p1");
        // No second item: a live connection is not re-authenticated.
        let more = tokio::time::timeout(std::time::Duration::from_millis(20), a.next()).await;
        assert!(more.is_err(), "the stream yielded again");
    }
}
