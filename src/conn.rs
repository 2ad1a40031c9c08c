//! A lazily connected Redis handle with a deadline on every call and a circuit breaker.

use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::RedisResult;

/// Why a call to Redis did not produce an answer.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Redis answered with an error, or the connection failed.
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis did not answer within the configured deadline.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// Redis is being skipped for a cool-down after repeated failures.
    #[error("redis skipped for a cool-down after repeated failures")]
    CircuitOpen,
}

/// Counts consecutive failures; past `threshold` it opens for `cooldown`.
#[derive(Debug)]
pub(crate) struct Breaker {
    threshold: u32,
    cooldown: Duration,
    failures: AtomicU32,
    /// Milliseconds since `epoch` until which calls are refused.
    open_until: AtomicU64,
    epoch: Instant,
}

impl Breaker {
    /// `threshold == 0` never opens.
    pub(crate) fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold,
            cooldown,
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub(crate) fn allows(&self) -> bool {
        self.now_ms() >= self.open_until.load(Ordering::Relaxed)
    }

    fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    /// Records a failure; returns true when this failure opened the breaker.
    fn failure(&self) -> bool {
        if self.threshold == 0 {
            return false;
        }
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= self.threshold {
            self.failures.store(0, Ordering::Relaxed);
            let until = self.now_ms() + self.cooldown.as_millis() as u64;
            self.open_until.store(until, Ordering::Relaxed);
            return true;
        }
        false
    }
}

/// A cheap-to-share Redis handle: connects on first use, never blocks start-up.
#[derive(Debug)]
pub(crate) struct RedisConn {
    client: redis::Client,
    manager: OnceLock<ConnectionManager>,
    timeout: Duration,
    breaker: Breaker,
    /// Set by the first answer: until then calls may also wait for the connection and
    /// the first script loads, so they get [`CONNECT_TIMEOUT`] at least.
    warm: std::sync::atomic::AtomicBool,
}

/// The deadline of calls made before Redis first answered.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

impl RedisConn {
    pub(crate) fn new(client: redis::Client, timeout: Duration, breaker: Breaker) -> Self {
        Self {
            client,
            manager: OnceLock::new(),
            timeout,
            breaker,
            warm: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub(crate) fn client(&self) -> &redis::Client {
        &self.client
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    fn manager(&self) -> RedisResult<ConnectionManager> {
        if let Some(m) = self.manager.get() {
            return Ok(m.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout.max(CONNECT_TIMEOUT)))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(self.timeout);
        let m = ConnectionManager::new_lazy_with_config(self.client.clone(), config)?;
        Ok(self.manager.get_or_init(|| m).clone())
    }

    /// Runs one Redis operation under the deadline and the breaker.
    pub(crate) async fn run<T, F, Fut>(&self, op: F) -> Result<T, BackendError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        if !self.breaker.allows() {
            return Err(BackendError::CircuitOpen);
        }
        self.run_always(op).await
    }

    /// Runs one Redis operation under the deadline even while the breaker is open: for a
    /// lock holder's store, release and extension, which must not strand its lock until the
    /// lease runs out because other requests failed.
    pub(crate) async fn run_always<T, F, Fut>(&self, op: F) -> Result<T, BackendError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let deadline = if self.warm.load(Ordering::Relaxed) {
            self.timeout
        } else {
            self.timeout.max(CONNECT_TIMEOUT)
        };
        let result = match self.manager() {
            Ok(conn) => match tokio::time::timeout(deadline, op(conn)).await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(BackendError::Redis(e)),
                Err(_) => Err(BackendError::Timeout(deadline)),
            },
            Err(e) => Err(BackendError::Redis(e)),
        };
        match &result {
            Ok(_) => {
                self.breaker.success();
                self.warm.store(true, Ordering::Relaxed);
            }
            Err(e) => {
                if self.breaker.failure() {
                    tracing::warn!(error = %e, "redis failing; skipping it for a cool-down");
                }
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_after_threshold_and_never_with_zero() {
        let b = Breaker::new(3, Duration::from_secs(60));
        assert!(!b.failure());
        b.success();
        assert!(!b.failure());
        assert!(!b.failure());
        assert!(b.allows());
        assert!(b.failure());
        assert!(!b.allows());

        let never = Breaker::new(0, Duration::from_secs(60));
        for _ in 0..10 {
            assert!(!never.failure());
        }
        assert!(never.allows());
    }
}
