//! A lazily connected Redis handle with a deadline on every call and a circuit breaker:
//! the one connection code of the Redis tier and of the lock API.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::RedisResult;
use tokio::sync::OnceCell;

use super::wake::{self, WakeSink, Wakers};

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

/// How long failures are remembered: `threshold` of them within this window open the
/// breaker.
const WINDOW: Duration = Duration::from_secs(1);

/// A trial that has not reported back within this long (its caller went away) is
/// presumed lost, and the next call becomes the trial.
const TRIAL_LOST: Duration = Duration::from_secs(2);

/// What the breaker lets one call do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Permit {
    /// Closed: call Redis.
    Call,
    /// Half-open: this call is the one trial; its outcome closes or re-opens the breaker.
    Trial,
    /// Open, or half-open with a trial running: skip Redis.
    Skip,
}

/// A change of the breaker's state, for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transition {
    /// Closed to open: `threshold` failures within the window.
    Opened,
    /// The trial failed: open for another cool-down.
    Reopened,
    /// The trial succeeded.
    Closed,
}

#[derive(Debug)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { since: Instant },
}

#[derive(Debug)]
struct BreakerState {
    state: State,
    /// While closed: the times of the latest failures, oldest first, at most `threshold`.
    failures: VecDeque<Instant>,
}

/// A circuit breaker: `threshold` failures within [`WINDOW`] open it for `cooldown`; then
/// one trial call goes through (others still skip Redis) and its outcome closes it or
/// opens it for another cool-down. Time is passed in, so the state machine is testable.
#[derive(Debug)]
pub(crate) struct Breaker {
    threshold: u32,
    cooldown: Duration,
    inner: Mutex<BreakerState>,
}

impl Breaker {
    /// `threshold == 0` never opens.
    pub(crate) fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold,
            cooldown,
            inner: Mutex::new(BreakerState {
                state: State::Closed,
                failures: VecDeque::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a call starting at `now` may go to Redis.
    pub(crate) fn permit(&self, now: Instant) -> Permit {
        if self.threshold == 0 {
            return Permit::Call;
        }
        let mut inner = self.lock();
        match inner.state {
            State::Closed => Permit::Call,
            State::Open { until } if now < until => Permit::Skip,
            State::HalfOpen { since } if now.saturating_duration_since(since) < TRIAL_LOST => {
                Permit::Skip
            }
            State::Open { .. } | State::HalfOpen { .. } => {
                inner.state = State::HalfOpen { since: now };
                Permit::Trial
            }
        }
    }

    /// Open or half-open: Redis is being skipped, or one trial is testing it.
    pub(crate) fn is_open(&self) -> bool {
        !matches!(self.lock().state, State::Closed)
    }

    /// Records that a call made under `permit` got an answer.
    pub(crate) fn success(&self, permit: Permit) -> Option<Transition> {
        if permit != Permit::Trial {
            return None;
        }
        let mut inner = self.lock();
        if !matches!(inner.state, State::HalfOpen { .. }) {
            return None;
        }
        inner.state = State::Closed;
        inner.failures.clear();
        Some(Transition::Closed)
    }

    /// Records that a call made under `permit` failed at `now`.
    pub(crate) fn failure(&self, permit: Permit, now: Instant) -> Option<Transition> {
        if self.threshold == 0 {
            return None;
        }
        let mut inner = self.lock();
        match (&inner.state, permit) {
            (State::HalfOpen { .. }, Permit::Trial) => {
                inner.state = State::Open {
                    until: now + self.cooldown,
                };
                Some(Transition::Reopened)
            }
            (State::Closed, _) => {
                let threshold = self.threshold as usize;
                let failures = &mut inner.failures;
                while failures
                    .front()
                    .is_some_and(|t| now.saturating_duration_since(*t) >= WINDOW)
                {
                    failures.pop_front();
                }
                failures.push_back(now);
                while failures.len() > threshold {
                    failures.pop_front();
                }
                if failures.len() < threshold {
                    return None;
                }
                inner.failures.clear();
                inner.state = State::Open {
                    until: now + self.cooldown,
                };
                Some(Transition::Opened)
            }
            // Open already, or a call that started before it opened: one outage, one
            // opening.
            _ => None,
        }
    }
}

/// Where a handle's connections come from: one Redis (a [`redis::Client`]) or a Redis
/// Cluster. A connection reconnects by itself; its commands are routed by their keys.
pub(crate) trait Source: Clone + Send + Sync + 'static {
    /// A connection handle: cheap to clone, shared by concurrent calls.
    type Conn: ConnectionLike + Clone + Send + Sync + 'static;

    /// The command a script publishes a key's wake-up with: `PUBLISH`, or `SPUBLISH` on a
    /// Cluster (the key's channel lives in the key's slot).
    const PUBLISH: &'static str = "PUBLISH";

    /// What the health check calls this backend.
    const KIND: &'static str = "redis";

    /// Opens a connection handle whose connects and answers are bounded by `timeout`.
    fn open(&self, timeout: Duration) -> impl Future<Output = RedisResult<Self::Conn>> + Send;

    /// Where the connections go, for logs: never a password.
    fn address(&self) -> String;

    /// One run of the node's wake-up subscription (see [`wake::subscribe`]): it returns
    /// when the cache is gone, and is started again by its supervisor otherwise.
    fn subscription(
        self,
        prefix: String,
        wakers: Arc<Wakers>,
        sink: Weak<dyn WakeSink>,
        timeout: Duration,
    ) -> impl Future<Output = ()> + Send + 'static;
}

/// A lazily connecting, reconnecting connection to `client`, its connects and answers
/// bounded by `timeout`.
pub(crate) fn manager(client: redis::Client, timeout: Duration) -> RedisResult<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout.max(CONNECT_TIMEOUT)))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(10))
        .set_max_delay(timeout);
    ConnectionManager::new_lazy_with_config(client, config)
}

impl Source for redis::Client {
    type Conn = ConnectionManager;

    async fn open(&self, timeout: Duration) -> RedisResult<ConnectionManager> {
        manager(self.clone(), timeout)
    }

    fn address(&self) -> String {
        super::redacted(self)
    }

    fn subscription(
        self,
        prefix: String,
        wakers: Arc<Wakers>,
        sink: Weak<dyn WakeSink>,
        timeout: Duration,
    ) -> impl Future<Output = ()> + Send + 'static {
        let connect = move || {
            let client = self.clone();
            async move { client.get_async_pubsub().await }
        };
        wake::subscribe(connect, prefix, wakers, sink, timeout)
    }
}

/// A cheap-to-share Redis handle: connects on first use, never blocks start-up.
#[derive(Debug)]
pub(crate) struct RedisConn<S: Source = redis::Client> {
    client: S,
    /// Scripts and writes.
    manager: OnceCell<S::Conn>,
    /// Read-only calls made while a write stalls: a blocked script holds back every later
    /// command on its connection, so reads get one of their own. Opened at the first stall.
    reader: OnceCell<S::Conn>,
    timeout: Duration,
    breaker: Breaker,
    /// Set by the first answer: until then calls may also wait for the connection and
    /// the first script loads, so they get [`CONNECT_TIMEOUT`] at least.
    warm: AtomicBool,
}

/// The deadline of calls made before Redis first answered.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// What [`RedisConn::run_or_read`] got: the write's answer, or a usable read.
#[derive(Debug)]
pub(crate) enum Raced<W, R> {
    Write(W),
    Read(R),
}

impl BackendError {
    /// Redis did not answer in time: it may be slow or frozen rather than gone, and the
    /// command sent may still run later.
    pub(crate) fn is_timeout(&self) -> bool {
        match self {
            BackendError::Timeout(_) => true,
            BackendError::Redis(e) => e.is_timeout(),
            BackendError::CircuitOpen => false,
        }
    }
}

impl<S: Source> RedisConn<S> {
    pub(crate) fn new(client: S, timeout: Duration, breaker: Breaker) -> Self {
        Self {
            client,
            manager: OnceCell::new(),
            reader: OnceCell::new(),
            timeout,
            breaker,
            warm: AtomicBool::new(false),
        }
    }

    pub(crate) fn client(&self) -> &S {
        &self.client
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    pub(crate) fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    async fn manager_in(&self, cell: &OnceCell<S::Conn>) -> RedisResult<S::Conn> {
        if let Some(m) = cell.get() {
            return Ok(m.clone());
        }
        cell.get_or_try_init(|| self.client.open(self.timeout))
            .await
            .cloned()
    }

    fn deadline(&self) -> Duration {
        if self.warm.load(Ordering::Relaxed) {
            self.timeout
        } else {
            self.timeout.max(CONNECT_TIMEOUT)
        }
    }

    /// One operation on the connection in `cell` under `deadline`; the breaker is not
    /// consulted.
    async fn call<T, F, Fut>(
        &self,
        cell: &OnceCell<S::Conn>,
        deadline: Duration,
        op: F,
    ) -> Result<T, BackendError>
    where
        F: FnOnce(S::Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let attempt = async { op(self.manager_in(cell).await?).await };
        match tokio::time::timeout(deadline, attempt).await {
            Ok(Ok(v)) => {
                self.warm.store(true, Ordering::Relaxed);
                Ok(v)
            }
            Ok(Err(e)) => Err(BackendError::Redis(e)),
            Err(_) => Err(BackendError::Timeout(deadline)),
        }
    }

    fn permit(&self) -> Result<Permit, BackendError> {
        match self.breaker.permit(Instant::now()) {
            Permit::Skip => Err(BackendError::CircuitOpen),
            permit => Ok(permit),
        }
    }

    /// Feeds the breaker with the outcome of a call made under `permit`, and logs its
    /// openings and closings.
    fn record(&self, permit: Permit, failed: Option<&BackendError>) {
        let transition = match failed {
            None => self.breaker.success(permit),
            Some(_) => self.breaker.failure(permit, Instant::now()),
        };
        match (transition, failed) {
            (Some(Transition::Opened), Some(e)) => tracing::warn!(
                error = %e,
                cooldown = ?self.breaker.cooldown,
                "redis failing; breaker open, serving from this process only for a cool-down"
            ),
            (Some(Transition::Reopened), Some(e)) => tracing::debug!(
                error = %e,
                cooldown = ?self.breaker.cooldown,
                "redis still failing after the cool-down; skipping it for another"
            ),
            (Some(Transition::Closed), _) => tracing::info!("redis answers again; breaker closed"),
            _ => {}
        }
    }

    /// Runs one Redis operation under the deadline and the breaker.
    pub(crate) async fn run<T, F, Fut>(&self, op: F) -> Result<T, BackendError>
    where
        F: FnOnce(S::Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let permit = self.permit()?;
        let result = self.call(&self.manager, self.deadline(), op).await;
        self.record(permit, result.as_ref().err());
        result
    }

    /// Runs `write` under the deadline and the breaker, like [`run`](Self::run). If it has
    /// not answered within a fifth of the deadline (Redis may be refusing writes for a
    /// while, as during a failover's `CLIENT PAUSE WRITE`), `read` also runs, on the read
    /// connection, within what is left of the deadline: a `Some` it returns is the answer.
    /// A write that times out while the read got an answer is no failure for the breaker:
    /// Redis is there, only slow to write.
    pub(crate) async fn run_or_read<W, R, F, Fut, G, Gut>(
        &self,
        write: F,
        read: G,
    ) -> Result<Raced<W, R>, BackendError>
    where
        F: FnOnce(S::Conn) -> Fut,
        Fut: Future<Output = RedisResult<W>>,
        G: FnOnce(S::Conn) -> Gut,
        Gut: Future<Output = RedisResult<Option<R>>>,
    {
        let permit = self.permit()?;
        let warm = self.warm.load(Ordering::Relaxed);
        let deadline = self.deadline();
        let started = tokio::time::Instant::now();
        let write = self.call(&self.manager, deadline, write);
        tokio::pin!(write);
        // A cold connection's first call is slow for reasons of its own.
        let stall = if warm { self.timeout / 5 } else { deadline };
        tokio::select! {
            biased;
            result = &mut write => {
                self.record(permit, result.as_ref().err());
                return result.map(Raced::Write);
            }
            _ = tokio::time::sleep(stall) => {}
        }
        let read = self.call(
            &self.reader,
            deadline.saturating_sub(started.elapsed()),
            read,
        );
        tokio::pin!(read);
        let mut read_answered = None;
        loop {
            tokio::select! {
                biased;
                result = &mut write => {
                    let failed = result.as_ref().err().filter(|_| read_answered != Some(true));
                    self.record(permit, failed);
                    return result.map(Raced::Write);
                }
                result = &mut read, if read_answered.is_none() => match result {
                    Ok(Some(value)) => {
                        self.record(permit, None);
                        return Ok(Raced::Read(value));
                    }
                    Ok(None) => read_answered = Some(true),
                    Err(e) => {
                        tracing::debug!(error = %e, "read during a stalled write failed");
                        read_answered = Some(false);
                    }
                },
            }
        }
    }

    /// Runs one Redis operation under the deadline even while the breaker is open: for a
    /// lock holder's store, release and extension, which must not strand its lock until the
    /// lease runs out because other requests failed. It does not feed the breaker either:
    /// a write held back by a write pause is not a dead Redis.
    pub(crate) async fn run_always<T, F, Fut>(&self, op: F) -> Result<T, BackendError>
    where
        F: FnOnce(S::Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        self.call(&self.manager, self.deadline(), op).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Opens `b` at `t` with `threshold` failures.
    fn open(b: &Breaker, t: Instant, threshold: u32) {
        for i in 0..threshold {
            let expected = (i + 1 == threshold).then_some(Transition::Opened);
            assert_eq!(b.failure(Permit::Call, t), expected, "failure {i}");
        }
    }

    #[test]
    fn opens_on_threshold_failures_within_the_window_only() {
        let t0 = Instant::now();
        let b = Breaker::new(3, Duration::from_secs(1));
        // Failures spread wider than the window never add up.
        for i in 0..10 {
            let t = t0 + WINDOW * i;
            assert_eq!(b.failure(Permit::Call, t), None);
            assert_eq!(b.failure(Permit::Call, t + 400 * MS), None);
            assert_eq!(b.permit(t + 500 * MS), Permit::Call);
        }
        // Three within one window open it.
        let t = t0 + WINDOW * 20;
        assert_eq!(b.failure(Permit::Call, t), None);
        assert_eq!(b.failure(Permit::Call, t + 300 * MS), None);
        assert_eq!(
            b.failure(Permit::Call, t + 900 * MS),
            Some(Transition::Opened)
        );
        assert_eq!(b.permit(t + 901 * MS), Permit::Skip);
    }

    #[test]
    fn one_outage_opens_once() {
        let t = Instant::now();
        let b = Breaker::new(3, Duration::from_secs(1));
        open(&b, t, 3);
        // Calls in flight when it opened fail too: no second opening, no longer cool-down.
        for _ in 0..20 {
            assert_eq!(b.failure(Permit::Call, t + 10 * MS), None);
        }
        assert_eq!(b.permit(t + 999 * MS), Permit::Skip);
        assert_eq!(b.permit(t + 1000 * MS), Permit::Trial);
    }

    #[test]
    fn after_the_cooldown_one_trial_goes_through_and_its_success_closes() {
        let t = Instant::now();
        let b = Breaker::new(3, Duration::from_secs(1));
        open(&b, t, 3);
        let after = t + Duration::from_secs(1);
        assert_eq!(b.permit(after), Permit::Trial);
        // Half-open: everyone else still skips Redis while the trial runs.
        for i in 1..50 {
            assert_eq!(b.permit(after + i * MS), Permit::Skip);
        }
        // Another call's success (one past the breaker) does not close it.
        assert_eq!(b.success(Permit::Call), None);
        assert_eq!(b.permit(after + 60 * MS), Permit::Skip);
        assert_eq!(b.success(Permit::Trial), Some(Transition::Closed));
        assert_eq!(b.permit(after + 61 * MS), Permit::Call);
        // Closed afresh: the failures of the outage are forgotten.
        assert_eq!(b.failure(Permit::Call, after + 62 * MS), None);
        assert_eq!(b.failure(Permit::Call, after + 63 * MS), None);
        assert_eq!(b.permit(after + 64 * MS), Permit::Call);
    }

    #[test]
    fn a_failed_trial_opens_for_another_cooldown() {
        let t = Instant::now();
        let b = Breaker::new(3, Duration::from_secs(1));
        open(&b, t, 3);
        let trial = t + Duration::from_secs(1);
        assert_eq!(b.permit(trial), Permit::Trial);
        // Other calls failing while the trial runs change nothing.
        assert_eq!(b.failure(Permit::Call, trial + 10 * MS), None);
        assert_eq!(
            b.failure(Permit::Trial, trial + 100 * MS),
            Some(Transition::Reopened)
        );
        assert_eq!(b.permit(trial + 1099 * MS), Permit::Skip);
        assert_eq!(b.permit(trial + 1100 * MS), Permit::Trial);
        assert_eq!(b.success(Permit::Trial), Some(Transition::Closed));
    }

    #[test]
    fn a_trial_that_never_reports_is_replaced() {
        let t = Instant::now();
        let b = Breaker::new(1, Duration::from_secs(1));
        open(&b, t, 1);
        let trial = t + Duration::from_secs(1);
        assert_eq!(b.permit(trial), Permit::Trial);
        assert_eq!(b.permit(trial + TRIAL_LOST - MS), Permit::Skip);
        assert_eq!(b.permit(trial + TRIAL_LOST), Permit::Trial);
    }

    #[test]
    fn zero_threshold_never_opens() {
        let t = Instant::now();
        let never = Breaker::new(0, Duration::from_secs(60));
        for i in 0..10 {
            assert_eq!(never.failure(Permit::Call, t + i * MS), None);
        }
        assert_eq!(never.permit(t + 10 * MS), Permit::Call);
    }
}
