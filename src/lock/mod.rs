//! The lock on its own: a distributed lock on Redis, `SET key token NX PX lease`,
//! released by a Lua compare-and-delete and extended by a Lua compare-and-pexpire, on the
//! same scripts and connection code as the cache's tier (this room imports only `tier`).
//!
//! This is the lock the stampede layer uses, offered on its own: acquire with retries,
//! delay and jitter; release; extend; and [`RedisLock::run`], which runs a future under
//! the lock, extends the lease while it runs and always releases, on error and on panic
//! too.
//!
//! The lock is an efficiency lock: if a holder stalls past its lease, another may take
//! the lock. Releasing or extending a lock that is no longer yours is a typed error
//! ([`LockError::NotHeld`]) and never touches the new holder's lock.
//!
//! # Examples
//!
//! ```no_run
//! use std::time::Duration;
//! use tower_stampede::lock::RedisLock;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let client = redis::Client::open("redis://127.0.0.1:6379")?;
//! let lock = RedisLock::builder(client)
//!     .prefix("jobs")
//!     .lease(Duration::from_secs(10))
//!     .retries(20)
//!     .retry_delay(Duration::from_millis(100))
//!     .build();
//!
//! // By hand: acquire, work, release.
//! let guard = lock.acquire("nightly-report").await?;
//! guard.extend(Duration::from_secs(30)).await?;
//! guard.release().await?;
//!
//! // Or as a closure that always releases.
//! let rows = lock.run("nightly-report", || async { 42 }).await?;
//! assert_eq!(rows, 42);
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;

pub use crate::tier::conn::BackendError;
use crate::tier::conn::{Breaker, RedisConn};
use crate::tier::{jittered, millis, new_token, scripts};

/// What went wrong with a lock operation.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Every attempt found the lock held by someone else.
    #[error("lock {key:?} still held elsewhere after {attempts} attempts")]
    NotAcquired {
        /// The Redis key of the lock.
        key: String,
        /// How many times acquisition was tried.
        attempts: u32,
    },
    /// The lock expired or was taken over: this token no longer holds it.
    #[error("lock {key:?} is not held by this token (lease expired or taken over)")]
    NotHeld {
        /// The Redis key of the lock.
        key: String,
    },
    /// Redis failed or did not answer in time.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// A handle on a family of Redis locks sharing one prefix and one set of options.
///
/// Cheap to clone: clones share one lazily opened, auto-reconnecting connection.
#[derive(Clone)]
pub struct RedisLock {
    inner: Arc<Inner>,
}

struct Inner {
    conn: RedisConn,
    prefix: String,
    lease: Duration,
    retries: u32,
    retry_delay: Duration,
    jitter: Duration,
}

impl fmt::Debug for RedisLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLock")
            .field("prefix", &self.inner.prefix)
            .field("lease", &self.inner.lease)
            .field("retries", &self.inner.retries)
            .field("retry_delay", &self.inner.retry_delay)
            .field("jitter", &self.inner.jitter)
            .finish()
    }
}

/// Builds a [`RedisLock`]. Defaults: prefix `"lock"`, lease 5 s, 10 retries, 100 ms
/// between tries plus up to 50 ms of jitter, 1 s Redis call deadline.
#[derive(Debug)]
pub struct RedisLockBuilder {
    client: redis::Client,
    prefix: String,
    lease: Duration,
    retries: u32,
    retry_delay: Duration,
    jitter: Duration,
    timeout: Duration,
}

impl RedisLockBuilder {
    /// The key prefix: lock `k` lives at `prefix:k`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long a lock is held unless released or extended.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(1));
        self
    }

    /// How many more times [`RedisLock::acquire`] tries after the first failure.
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// The pause between two tries.
    pub fn retry_delay(mut self, delay: Duration) -> Self {
        self.retry_delay = delay;
        self
    }

    /// A random extra pause of up to this much, so contenders spread out.
    pub fn jitter(mut self, jitter: Duration) -> Self {
        self.jitter = jitter;
        self
    }

    /// The deadline on each Redis call.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Builds the handle. Nothing connects until the first call.
    pub fn build(self) -> RedisLock {
        RedisLock {
            inner: Arc::new(Inner {
                conn: RedisConn::new(self.client, self.timeout, Breaker::new(0, Duration::ZERO)),
                prefix: self.prefix,
                lease: self.lease,
                retries: self.retries,
                retry_delay: self.retry_delay,
                jitter: self.jitter,
            }),
        }
    }
}

impl RedisLock {
    /// A lock handle with the default options.
    pub fn new(client: redis::Client) -> Self {
        Self::builder(client).build()
    }

    /// Starts a builder.
    pub fn builder(client: redis::Client) -> RedisLockBuilder {
        RedisLockBuilder {
            client,
            prefix: "lock".to_owned(),
            lease: Duration::from_secs(5),
            retries: 10,
            retry_delay: Duration::from_millis(100),
            jitter: Duration::from_millis(50),
            timeout: Duration::from_secs(1),
        }
    }

    /// The default lease of locks taken through this handle.
    pub fn lease(&self) -> Duration {
        self.inner.lease
    }

    fn redis_key(&self, key: &str) -> String {
        if self.inner.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}:{key}", self.inner.prefix)
        }
    }

    /// One attempt: the guard when the lock was free, `None` when it is held elsewhere.
    pub async fn try_acquire(&self, key: &str) -> Result<Option<LockGuard>, LockError> {
        let redis_key = self.redis_key(key);
        let token = new_token();
        let lease_ms = millis(self.inner.lease);
        let (k, t) = (&redis_key, &token);
        let taken: Option<String> = self
            .inner
            .conn
            .run(|mut c| async move {
                redis::cmd("SET")
                    .arg(k)
                    .arg(t)
                    .arg("NX")
                    .arg("PX")
                    .arg(lease_ms)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(taken.map(|_| LockGuard {
            lock: self.clone(),
            key: redis_key,
            token,
            released: false,
        }))
    }

    /// Tries up to `1 + retries` times, pausing `retry_delay` plus jitter between tries.
    pub async fn acquire(&self, key: &str) -> Result<LockGuard, LockError> {
        let attempts = self.inner.retries.saturating_add(1);
        for attempt in 1..=attempts {
            if let Some(guard) = self.try_acquire(key).await? {
                return Ok(guard);
            }
            if attempt < attempts {
                tokio::time::sleep(jittered(self.inner.retry_delay, self.inner.jitter)).await;
            }
        }
        Err(LockError::NotAcquired {
            key: self.redis_key(key),
            attempts,
        })
    }

    /// Acquires `key`, runs `f` while extending the lease every third of it, and releases,
    /// whether `f` returns, fails or panics (a panic is resumed after the release).
    ///
    /// Returns what `f` returned. If the lease was lost while `f` ran (Redis unreachable
    /// for longer than the lease), the work is done all the same: the result is returned
    /// and the loss is logged, since another holder may have run concurrently.
    pub async fn run<F, Fut, T>(&self, key: &str, f: F) -> Result<T, LockError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let guard = self.acquire(key).await?;
        let work = AssertUnwindSafe(f()).catch_unwind();
        tokio::pin!(work);
        let period = self.inner.lease / 3;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let outcome = loop {
            tokio::select! {
                out = &mut work => break out,
                _ = tick.tick() => {
                    if let Err(e) = guard.extend(self.inner.lease).await {
                        tracing::warn!(key = %guard.key, error = %e, "lock extension failed");
                    }
                }
            }
        };
        let lock_key = guard.key.clone();
        if let Err(e) = guard.release().await {
            tracing::warn!(key = %lock_key, error = %e, "lock release after run failed");
        }
        match outcome {
            Ok(v) => Ok(v),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    pub(crate) async fn release_token(&self, key: &str, token: &str) -> Result<(), LockError> {
        let n: i64 = self
            .inner
            .conn
            .run(|mut c| async move {
                scripts::RELEASE
                    .key(key)
                    .arg(token)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        if n == 1 {
            Ok(())
        } else {
            Err(LockError::NotHeld {
                key: key.to_owned(),
            })
        }
    }
}

/// Proof of holding a lock. Release it with [`LockGuard::release`]; dropping it releases
/// in the background on a best-effort basis, and the lease is the backstop.
pub struct LockGuard {
    lock: RedisLock,
    key: String,
    token: String,
    released: bool,
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("key", &self.key)
            .field("token", &self.token)
            .finish()
    }
}

impl LockGuard {
    /// The Redis key of the lock.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The random 128-bit token that proves ownership, as 32 hex digits.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Releases the lock if this token still holds it; [`LockError::NotHeld`] otherwise,
    /// in which case the current holder's lock is left alone.
    pub async fn release(mut self) -> Result<(), LockError> {
        self.released = true;
        self.lock.release_token(&self.key, &self.token).await
    }

    /// Sets the remaining lease to `lease` if this token still holds the lock.
    pub async fn extend(&self, lease: Duration) -> Result<(), LockError> {
        let (key, token, ms) = (&self.key, &self.token, millis(lease));
        let n: i64 = self
            .lock
            .inner
            .conn
            .run(|mut c| async move {
                scripts::EXTEND
                    .key(key)
                    .arg(token)
                    .arg(ms)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        if n == 1 {
            Ok(())
        } else {
            Err(LockError::NotHeld { key: key.clone() })
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let lock = self.lock.clone();
            let key = std::mem::take(&mut self.key);
            let token = std::mem::take(&mut self.token);
            rt.spawn(async move {
                let _ = lock.release_token(&key, &token).await;
            });
        }
    }
}
