//! [`StampedeLayer`] and its builder.

use std::fmt;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::request::Parts;
use http::HeaderName;
use moka::future::Cache;
use moka::Expiry;
use tokio::sync::oneshot;
use tower_layer::Layer;

use crate::conn::{Breaker, RedisConn};
use crate::envelope::{now_ms, Entry};
use crate::key::{default_key, Key, KeyFn, PrehashedState};
use crate::policy::{normalize_accept_encoding, FailurePolicy, HttpRules, PrivateRequests};
use crate::service::Stampede;
use crate::stats::{Counters, Stats};
use crate::status::{Outcome, StatusValues};
use crate::store::{LocalLocks, RedisStore};
use crate::wake::Wakers;

/// Where the shared tier lives: nowhere (this process only) or Redis.
#[derive(Clone, Debug)]
pub struct Backend(BackendKind);

#[derive(Clone, Debug)]
enum BackendKind {
    Local,
    Redis(redis::Client),
}

impl Backend {
    /// This process only: an in-memory L1 with per-key coalescing. No Redis needed.
    pub fn local() -> Self {
        Backend(BackendKind::Local)
    }

    /// Redis at `url` (for example `redis://127.0.0.1:6379/0`) as the shared L2, lock and
    /// wake-up channel for a fleet. Nothing connects until the first request.
    pub fn redis(url: impl redis::IntoConnectionInfo) -> redis::RedisResult<Self> {
        Ok(Self::redis_client(redis::Client::open(url)?))
    }

    /// Redis through a client you built.
    pub fn redis_client(client: redis::Client) -> Self {
        Backend(BackendKind::Redis(client))
    }
}

/// Settings that are not HTTP rules.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) cache_name: String,
    pub(crate) lease: Duration,
    pub(crate) lock_wait: Duration,
    pub(crate) on_lock_timeout: FailurePolicy,
    pub(crate) on_redis_error: FailurePolicy,
    pub(crate) poll_interval: Duration,
    pub(crate) upstream_timeout: Duration,
    pub(crate) hit_for_pass: Duration,
    pub(crate) max_takeovers: u32,
    pub(crate) early_refresh: Option<f64>,
}

/// State shared by every clone of one layer and the services it built: one "node".
pub(crate) struct Shared {
    pub(crate) cfg: Config,
    pub(crate) status_values: StatusValues,
    pub(crate) rules: HttpRules,
    key_fn: Option<KeyFn>,
    pub(crate) l1: Cache<[u8; 32], Arc<Entry>, PrehashedState>,
    pub(crate) passes: Option<Cache<[u8; 32], (), PrehashedState>>,
    /// Keys this process is refreshing in the background (or just failed to refresh: the
    /// marker then expires on its own, a backoff before the next try).
    pub(crate) refreshing: Cache<[u8; 32], (), PrehashedState>,
    pub(crate) redis: Option<RedisStore>,
    pub(crate) local_locks: LocalLocks,
    pub(crate) wakers: Arc<Wakers>,
    pub(crate) counters: Counters,
    /// The in-process bound, `l1_capacity`.
    capacity: u64,
    subscriber_started: AtomicBool,
    subscriber_shutdown: Mutex<Option<oneshot::Receiver<()>>>,
    _shutdown: oneshot::Sender<()>,
}

impl Shared {
    /// The key of a request, or why it bypasses the cache.
    ///
    /// A `HEAD` is keyed (and filled) as the `GET` it describes, as Varnish does: one entry
    /// answers both.
    pub(crate) fn key_for(&self, parts: &mut Parts) -> Result<Key, Outcome> {
        let per_user = self.rules.check_request(&parts.method, &parts.headers)?;
        normalize_accept_encoding(&mut parts.headers);
        if parts.method == http::Method::HEAD && self.rules.methods.contains(&http::Method::GET) {
            parts.method = http::Method::GET;
            let key = self.key_for_checked(parts, per_user);
            parts.method = http::Method::HEAD;
            return key;
        }
        self.key_for_checked(parts, per_user)
    }

    fn key_for_checked(&self, parts: &Parts, per_user: bool) -> Result<Key, Outcome> {
        let base = match &self.key_fn {
            Some(f) => f(parts).ok_or(Outcome::Bypass("key"))?,
            None => default_key(parts),
        };
        Ok(Key::new(base, parts, &self.rules.vary, per_user))
    }

    /// Starts the wake-up subscription once, from inside the runtime, under a supervisor
    /// that restarts it if it ever ends or panics.
    pub(crate) fn ensure_subscriber(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        let Some(store) = &self.redis else { return };
        if self.subscriber_started.load(Ordering::Relaxed)
            || self.subscriber_started.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let Some(shutdown) = self
            .subscriber_shutdown
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        let (client, channel, timeout) = (
            store.conn.client().clone(),
            store.channel.clone(),
            store.conn.timeout(),
        );
        let shared = Arc::downgrade(self);
        // Supervised: a subscription that ends or panics is started again.
        tokio::spawn(crate::wake::supervise(
            move || {
                (shared.strong_count() > 0).then(|| {
                    crate::wake::subscribe(client.clone(), channel.clone(), shared.clone(), timeout)
                })
            },
            shutdown,
        ));
    }

    /// Another fill of this key finished somewhere: wake this process's waiters, and
    /// replace a stale L1 copy with the value the wake-up carried (or drop it, so the next
    /// request reads the new value from Redis).
    pub(crate) async fn on_wake(&self, hash: [u8; 32], value: Option<bytes::Bytes>) {
        self.wakers.wake(&hash, value.clone());
        if value
            .as_deref()
            .is_some_and(|v| crate::wake::failure_status(v).is_some())
        {
            // An attempt failed: its waiters have their answer, and a stale copy stays
            // for stale-if-error.
            return;
        }
        if let Some(stale) = self
            .l1
            .get(&hash)
            .await
            .filter(|e| !e.is_fresh_at(now_ms()))
        {
            let landed = value
                .and_then(|v| Entry::decode(v, &stale.key).ok())
                .filter(|e| e.kind == crate::envelope::Kind::Response && e.is_fresh_at(now_ms()));
            match landed {
                Some(entry) => self.l1.insert(hash, Arc::new(entry)).await,
                None => self.l1.invalidate(&hash).await,
            }
        }
        self.refreshing.invalidate(&hash).await;
    }
}

/// The share of `l1_capacity` kept for the hit-for-pass and refresh markers: one
/// sixteenth, half for each.
const MARKER_SHARE: u64 = 16;

/// What one marker costs in memory: the 32-byte key and moka's node, its slot in the
/// hash table and the per-entry bookkeeping (about 140 bytes measured per marker in RSS;
/// rounded up).
const MARKER_WEIGHT: u32 = 160;

/// What one node's in-process memory holds, by the weights its bound counts.
///
/// Taken with [`StampedeLayer::memory`]. Every structure that grows with the number of
/// keys counts toward [`StampedeBuilder::l1_capacity`]; `bytes() <= capacity` always
/// holds once the cache's pending evictions have run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Memory {
    /// Cached answers in L1.
    pub l1_entries: u64,
    /// Their weight: bodies, keys and headers plus the per-entry allowance.
    pub l1_bytes: u64,
    /// Hit-for-pass and refresh markers.
    pub marker_entries: u64,
    /// Their weight.
    pub marker_bytes: u64,
    /// The bound: [`StampedeBuilder::l1_capacity`].
    pub capacity: u64,
}

impl Memory {
    /// Everything counted, in bytes.
    pub fn bytes(&self) -> u64 {
        self.l1_bytes + self.marker_bytes
    }
}

/// L1 entries live until their `stale_until`.
struct EntryExpiry;

impl Expiry<[u8; 32], Arc<Entry>> for EntryExpiry {
    fn expire_after_create(
        &self,
        _: &[u8; 32],
        value: &Arc<Entry>,
        _: Instant,
    ) -> Option<Duration> {
        Some(value.time_to_live(now_ms()))
    }

    fn expire_after_update(
        &self,
        _: &[u8; 32],
        value: &Arc<Entry>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.time_to_live(now_ms()))
    }
}

/// A [`Layer`] that puts a stampede-proof cache in front of an HTTP service.
///
/// Each layer built is one node: one in-process L1 and, with [`Backend::redis`], one set of
/// Redis connections. Clones share that node; services built from it share it too.
#[derive(Clone)]
pub struct StampedeLayer {
    pub(crate) shared: Arc<Shared>,
}

impl fmt::Debug for StampedeLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StampedeLayer")
            .field("config", &self.shared.cfg)
            .field("rules", &self.shared.rules)
            .field("redis", &self.shared.redis.is_some())
            .finish()
    }
}

impl StampedeLayer {
    /// A layer with the defaults and the local backend.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// Starts a builder.
    pub fn builder() -> StampedeBuilder {
        StampedeBuilder::default()
    }

    /// A snapshot of this node's counters.
    pub fn stats(&self) -> Stats {
        self.shared.counters.snapshot()
    }

    /// What this node's in-process memory holds, after running the cache's pending
    /// maintenance (evictions, expiries) so the figures are current.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let layer = tower_stampede::StampedeLayer::builder().l1_capacity(1 << 20).build();
    /// let memory = layer.memory().await;
    /// assert_eq!(memory.capacity, 1 << 20);
    /// assert!(memory.bytes() <= memory.capacity);
    /// # }
    /// ```
    pub async fn memory(&self) -> Memory {
        let shared = &self.shared;
        shared.l1.run_pending_tasks().await;
        shared.refreshing.run_pending_tasks().await;
        let mut memory = Memory {
            l1_entries: shared.l1.entry_count(),
            l1_bytes: shared.l1.weighted_size(),
            marker_entries: shared.refreshing.entry_count(),
            marker_bytes: shared.refreshing.weighted_size(),
            capacity: shared.capacity,
        };
        if let Some(passes) = &shared.passes {
            passes.run_pending_tasks().await;
            memory.marker_entries += passes.entry_count();
            memory.marker_bytes += passes.weighted_size();
        }
        crate::stats::record_memory(&shared.counters, &memory);
        memory
    }
}

impl Default for StampedeLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for StampedeLayer {
    type Service = Stampede<S>;

    fn layer(&self, inner: S) -> Stampede<S> {
        Stampede::from_shared(inner, self.shared.clone())
    }
}

/// Builds a [`StampedeLayer`]. Every setting has a safe default; see each method.
pub struct StampedeBuilder {
    backend: Backend,
    prefix: String,
    l1_capacity: u64,
    rules: HttpRules,
    cfg: Config,
    key_fn: Option<KeyFn>,
    redis_timeout: Duration,
    breaker_failures: u32,
    breaker_cooldown: Duration,
}

impl fmt::Debug for StampedeBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StampedeBuilder")
            .field("backend", &self.backend)
            .field("prefix", &self.prefix)
            .field("l1_capacity", &self.l1_capacity)
            .field("rules", &self.rules)
            .field("config", &self.cfg)
            .finish()
    }
}

impl Default for StampedeBuilder {
    fn default() -> Self {
        StampedeBuilder {
            backend: Backend::local(),
            prefix: "stampede".to_owned(),
            l1_capacity: 64 * 1024 * 1024,
            rules: HttpRules::default(),
            cfg: Config {
                cache_name: "tower-stampede".to_owned(),
                lease: Duration::from_secs(5),
                lock_wait: Duration::from_secs(30),
                on_lock_timeout: FailurePolicy::Open,
                on_redis_error: FailurePolicy::Open,
                poll_interval: Duration::from_millis(50),
                upstream_timeout: Duration::from_secs(30),
                hit_for_pass: Duration::from_secs(10),
                max_takeovers: 2,
                early_refresh: None,
            },
            key_fn: None,
            redis_timeout: Duration::from_millis(250),
            breaker_failures: 3,
            breaker_cooldown: Duration::from_secs(1),
        }
    }
}

impl StampedeBuilder {
    /// The shared tier. Default: [`Backend::local`].
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// The Redis key prefix and wake-up channel prefix. Default `"stampede"`. Nodes that
    /// should coalesce together use the same prefix.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The in-process bound, in bytes: cached answers (keys, headers and bodies plus a
    /// per-entry allowance) and, in a sixteenth of it, the hit-for-pass and refresh
    /// markers. See [`StampedeLayer::memory`]. Default 64 MiB.
    pub fn l1_capacity(mut self, bytes: u64) -> Self {
        self.l1_capacity = bytes;
        self
    }

    /// How long a stored answer is fresh. Default 60 s.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.rules.ttl = ttl;
        self
    }

    /// Take the time to live from `s-maxage`, else `max-age`, falling back to
    /// [`ttl`](Self::ttl). Default off.
    pub fn honor_cache_control(mut self, on: bool) -> Self {
        self.rules.honor_cache_control = on;
        self
    }

    /// Refuse to store answers marked `Cache-Control: no-store`, `private` or `no-cache`.
    /// Default on.
    pub fn honor_no_store(mut self, on: bool) -> Self {
        self.rules.honor_no_store = on;
        self
    }

    /// Store answers that set cookies (the cookie is then replayed to everyone).
    /// Default off.
    pub fn store_set_cookie(mut self, on: bool) -> Self {
        self.rules.store_set_cookie = on;
        self
    }

    /// What to do with requests carrying `Authorization` or `Cookie`.
    /// Default [`PrivateRequests::Bypass`].
    pub fn private_requests(mut self, policy: PrivateRequests) -> Self {
        self.rules.private_requests = policy;
        self
    }

    /// The methods whose answers are cached. Default `GET` and `HEAD`.
    pub fn methods(mut self, methods: impl IntoIterator<Item = http::Method>) -> Self {
        self.rules.methods = methods.into_iter().collect();
        self
    }

    /// Request headers whose values go into the key. Answers that `Vary` on any other
    /// header are not stored. Default none.
    pub fn vary(mut self, headers: impl IntoIterator<Item = HeaderName>) -> Self {
        self.rules.vary = headers.into_iter().collect();
        self
    }

    /// The largest body stored; larger ones stream through unbuffered past this size and
    /// mark the key hit-for-pass. Default 1 MiB.
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.rules.max_body = bytes;
        self
    }

    /// How long an uncacheable answer lets the next requests for its key skip the lock
    /// and go straight upstream. `Duration::ZERO` turns it off. Default 10 s.
    pub fn hit_for_pass(mut self, ttl: Duration) -> Self {
        self.cfg.hit_for_pass = ttl;
        self
    }

    /// Stale-while-revalidate: for this long after the TTL, requests are answered at once
    /// from the stale copy while exactly one refresh runs, fleet-wide. With
    /// [`honor_cache_control`](Self::honor_cache_control), `stale-while-revalidate=N`
    /// overrides it. Default 0 (off).
    pub fn grace(mut self, grace: Duration) -> Self {
        self.rules.grace = grace;
        self
    }

    /// Stale-if-error: for this long after the TTL, a stale copy is served when the
    /// upstream fails, times out or answers 5xx. With
    /// [`honor_cache_control`](Self::honor_cache_control), `stale-if-error=N` overrides it.
    /// Default 0 (off).
    pub fn stale_if_error(mut self, window: Duration) -> Self {
        self.rules.stale_if_error = window;
        self
    }

    /// Early refresh (XFetch, Vattani et al., VLDB 2015): a hit refreshes in the
    /// background, under the lock, with a probability that rises as expiry nears, scaled
    /// by `beta` times how long the last fill took. A steadily hot key is then refreshed
    /// before it expires. `1.0` is the paper's default; larger refreshes earlier.
    /// Default off.
    pub fn early_refresh(mut self, beta: f64) -> Self {
        self.cfg.early_refresh = (beta > 0.0 && beta.is_finite()).then_some(beta);
        self
    }

    /// Negative caching: store `404` and `410` answers for this long. Default 0 (off:
    /// they are uncacheable and get a hit-for-pass marker).
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.rules.negative_ttl = ttl;
        self
    }

    /// Upstream errors (5xx) and `429 Too Many Requests`: the one answer is shared with everyone waiting on it and
    /// kept this long, so a failing upstream gets one call per key per period, fleet-wide,
    /// instead of a stampede. A usable stale copy is served instead when there is one
    /// ([`stale_if_error`](Self::stale_if_error)). `Duration::ZERO` passes errors through
    /// with a hit-for-pass marker, like any uncacheable answer. Default 1 s.
    pub fn error_ttl(mut self, ttl: Duration) -> Self {
        self.rules.error_ttl = ttl;
        self
    }

    /// The lock's lease; it is extended every third of it while the inner call runs.
    /// A lock found without an expiry, or with a time to live past the lease, is none of
    /// ours: once a waiter has seen the same holder on it for a lease, it takes the lock
    /// over and fills. Nodes sharing a prefix should therefore share the lease.
    /// Default 5 s.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.cfg.lease = lease.max(Duration::from_millis(3));
        self
    }

    /// How long a request waits on another node's fill before the
    /// [`on_lock_timeout`](Self::on_lock_timeout) policy applies. Default 30 s.
    pub fn lock_wait(mut self, wait: Duration) -> Self {
        self.cfg.lock_wait = wait;
        self
    }

    /// After the lock wait: call the inner service ([`FailurePolicy::Open`], default) or
    /// answer 503 ([`FailurePolicy::Closed`]).
    pub fn on_lock_timeout(mut self, policy: FailurePolicy) -> Self {
        self.cfg.on_lock_timeout = policy;
        self
    }

    /// When Redis fails: serve through L1 and local coalescing ([`FailurePolicy::Open`],
    /// default) or answer 503 ([`FailurePolicy::Closed`]).
    pub fn on_redis_error(mut self, policy: FailurePolicy) -> Self {
        self.cfg.on_redis_error = policy;
        self
    }

    /// How often a waiter re-checks Redis when no wake-up arrives (plus up to half of it
    /// as jitter; never sooner than half of it, whatever the lock's time to live).
    /// Default 50 ms.
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.cfg.poll_interval = every.max(Duration::from_millis(1));
        self
    }

    /// The limit on one inner call, body included. Default 30 s.
    pub fn upstream_timeout(mut self, timeout: Duration) -> Self {
        self.cfg.upstream_timeout = timeout;
        self
    }

    /// The deadline on each Redis call, scheduling delay included (a starved runtime
    /// must not read as a dead Redis). Default 250 ms.
    pub fn redis_timeout(mut self, timeout: Duration) -> Self {
        self.redis_timeout = timeout;
        self
    }

    /// After `failures` Redis errors within one second, skip Redis for `cooldown`; then one
    /// trial call goes to Redis (the others still skip it) and its success ends the skipping,
    /// its failure starts another cool-down. Default 3 and 1 s; `failures == 0` never skips.
    /// A call that times out while a read on the second connection got an answer (Redis
    /// holding writes back, as in a failover) is no failure.
    pub fn circuit_breaker(mut self, failures: u32, cooldown: Duration) -> Self {
        self.breaker_failures = failures;
        self.breaker_cooldown = cooldown;
        self
    }

    /// How many times a request that waited on a failed fill tries again (one of the
    /// waiters leads each retry) before answering 502. Default 2.
    pub fn max_takeovers(mut self, n: u32) -> Self {
        self.cfg.max_takeovers = n;
        self
    }

    /// The cache's name in `Cache-Status`. Default `"tower-stampede"`.
    pub fn cache_name(mut self, name: impl Into<String>) -> Self {
        self.cfg.cache_name = name.into();
        self
    }

    /// Replaces the default key ([`default_key`](crate::default_key)). Returning `None`
    /// sends the request straight to the inner service. Varied headers and per-user
    /// credentials are still added to what it returns.
    pub fn key_fn<F>(mut self, f: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.key_fn = Some(Arc::new(f));
        self
    }

    /// Builds the layer. Nothing connects to Redis until the first request.
    pub fn build(self) -> StampedeLayer {
        // The markers live inside the bound, not beside it: a flood of uncacheable URLs
        // must not grow the process past `l1_capacity`.
        let markers = self.l1_capacity / MARKER_SHARE;
        let l1 = Cache::builder()
            .max_capacity(self.l1_capacity - markers)
            .weigher(|_: &[u8; 32], v: &Arc<Entry>| v.weight())
            .expire_after(EntryExpiry)
            .build_with_hasher(PrehashedState::default());
        let passes = (!self.cfg.hit_for_pass.is_zero()).then(|| {
            Cache::builder()
                .max_capacity(markers / 2)
                .weigher(|_: &[u8; 32], _: &()| MARKER_WEIGHT)
                .time_to_live(self.cfg.hit_for_pass)
                .build_with_hasher(PrehashedState::default())
        });
        let refreshing = Cache::builder()
            .max_capacity(markers / 2)
            .weigher(|_: &[u8; 32], _: &()| MARKER_WEIGHT)
            .time_to_live(Duration::from_secs(1).max(self.cfg.poll_interval))
            .build_with_hasher(PrehashedState::default());
        let redis = match self.backend.0 {
            BackendKind::Local => None,
            BackendKind::Redis(client) => Some(RedisStore::new(
                RedisConn::new(
                    client,
                    self.redis_timeout,
                    Breaker::new(self.breaker_failures, self.breaker_cooldown),
                ),
                &self.prefix,
                self.rules.max_body,
            )),
        };
        let (tx, rx) = oneshot::channel();
        let counters = Counters::new(&self.cfg.cache_name);
        StampedeLayer {
            shared: Arc::new(Shared {
                status_values: StatusValues::new(&self.cfg.cache_name),
                cfg: self.cfg,
                rules: self.rules,
                key_fn: self.key_fn,
                l1,
                passes,
                refreshing,
                redis,
                local_locks: LocalLocks::default(),
                wakers: Arc::new(Wakers::default()),
                counters,
                capacity: self.l1_capacity,
                subscriber_started: AtomicBool::new(false),
                subscriber_shutdown: Mutex::new(Some(rx)),
                _shutdown: tx,
            }),
        }
    }
}
