//! The generic fleet cache: [`Cache<V>`] for any value, no HTTP types.
//!
//! This room holds the flight (one fill per key across every node sharing the backend:
//! L1, the tier's check-and-lock, the fill, store-release-wake, waiting, takeover, the
//! lease watchdog, grace, stale-if-error, early refresh, hit-for-pass markers), the stored
//! envelope and the codecs. It imports only from `tier` (and the crate's counters); the
//! HTTP layer is one client of it, [`Cache<V>`] another.
//!
//! # Examples
//!
//! ```
//! use std::time::Duration;
//! use tower_stampede::{Backend, Cache};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let cache: Cache<String> = Cache::builder()
//!     .backend(Backend::local()) // or Backend::redis("redis://127.0.0.1:6379/")?
//!     .ttl(Duration::from_secs(60))
//!     .build();
//!
//! let name = cache
//!     .try_get_with("user:42", async { Ok::<_, std::io::Error>("ada".to_owned()) })
//!     .await?;
//! assert_eq!(name, "ada");
//! // Cached: the second init never runs.
//! let again = cache
//!     .try_get_with("user:42", async { Err(std::io::Error::other("not called")) })
//!     .await?;
//! assert_eq!(again, "ada");
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

pub(crate) mod codec;
pub(crate) mod entry;
pub(crate) mod flight;
pub(crate) mod weight;

#[cfg(feature = "serde")]
pub use codec::Postcard;
pub use codec::{Codec, CodecError, DefaultCodec, Raw};
pub use flight::{FailurePolicy, Memory};

use entry::{now_ms, Windows};
use flight::{Config, Core, Fill, Filled, Flown, Key};

use crate::stats::Stats;
use crate::tier::{Backend, BackendError, BackendHealth, Tier, TierConfig};

/// Why [`Cache::try_get_with`] produced no value.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error<E> {
    /// The init failed: this call's own, or the one of the call it joined in this process
    /// (shared, as moka's `Arc<E>`).
    Init(Arc<E>),
    /// The init ran on another node and failed there; this call waited on that attempt
    /// and got its outcome instead of starting another.
    FillFailedElsewhere,
    /// The init did not finish within the fill timeout, or it panicked.
    FillAborted,
    /// The shared tier failed and [`CacheBuilder::on_redis_error`] is
    /// [`FailurePolicy::Closed`], or the lock wait passed its limit and
    /// [`CacheBuilder::on_lock_timeout`] is.
    Refused,
}

impl<E: fmt::Display> fmt::Display for Error<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Init(e) => write!(f, "the init failed: {e}"),
            Error::FillFailedElsewhere => f.write_str("the fill on another node failed"),
            Error::FillAborted => f.write_str("the fill timed out or panicked"),
            Error::Refused => f.write_str("the cache refused: its shared tier is unavailable"),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for Error<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Init(e) => Some(&**e),
            _ => None,
        }
    }
}

/// How long one entry lives and whether it is stored, decided by the init from the value
/// it fetched (adaptive caching): an API's answer often says how long it stays valid.
///
/// ```
/// use std::time::Duration;
/// use tower_stampede::EntryOptions;
///
/// let short = EntryOptions::new().ttl(Duration::from_secs(5));
/// let never = EntryOptions::new().no_store();
/// # let _ = (short, never);
/// ```
#[derive(Clone, Debug, Default)]
pub struct EntryOptions {
    ttl: Option<Duration>,
    grace: Option<Duration>,
    stale_if_error: Option<Duration>,
    no_store: bool,
    tags: Vec<String>,
}

impl EntryOptions {
    /// The cache's own settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// How long this entry is fresh, instead of the cache's [`ttl`](CacheBuilder::ttl).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// This entry's stale-while-revalidate window.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = Some(grace);
        self
    }

    /// This entry's stale-if-error window.
    pub fn stale_if_error(mut self, window: Duration) -> Self {
        self.stale_if_error = Some(window);
        self
    }

    /// Do not store this value: it is answered to this call only, and calls for the key
    /// run their own init for a while (the [`hit_for_pass`](CacheBuilder::hit_for_pass)
    /// window) instead of waiting on each other.
    pub fn no_store(mut self) -> Self {
        self.no_store = true;
        self
    }

    /// Tags this entry (at most 64, each at most 256 bytes).
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }
}

/// A fleet-wide cache of `V` values: at most one init per key runs at a time across every
/// node sharing the [`Backend`], and everyone else gets its value (callers in this process
/// without a Redis round trip, callers on other nodes woken the moment it lands).
///
/// Cheap to clone: clones share one node (one L1, one set of Redis connections).
/// `C` is the [`Codec`] that turns values into the bytes shared through Redis:
/// [`DefaultCodec`] unless named.
pub struct Cache<V, C = DefaultCodec> {
    core: Arc<Core<V, C>>,
    defaults: Windows,
    _value: PhantomData<fn() -> V>,
}

impl<V, C> Clone for Cache<V, C> {
    fn clone(&self) -> Self {
        Cache {
            core: self.core.clone(),
            defaults: self.defaults,
            _value: PhantomData,
        }
    }
}

impl<V, C> fmt::Debug for Cache<V, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("tier", &self.core.tier)
            .field("defaults", &self.defaults)
            .finish_non_exhaustive()
    }
}

/// The fill of a generic cache: the caller's init.
struct Init<Fut> {
    init: Fut,
    defaults: Windows,
}

impl<V, E, Fut> Fill<V> for Init<Fut>
where
    V: Send + Sync + 'static,
    E: Send + Sync + 'static,
    Fut: Future<Output = Result<(V, EntryOptions), E>> + Send + 'static,
{
    type Own = Result<V, Arc<E>>;

    fn share(own: &Self::Own) -> Option<flight::SharedError> {
        let e: flight::SharedError = Arc::new(own.as_ref().err()?.clone());
        Some(e)
    }

    async fn run(self, _stale: Option<Arc<flight::Stored<V>>>) -> Filled<V, Result<V, Arc<E>>> {
        match self.init.await {
            Ok((value, opts)) if opts.no_store => Filled::Pass {
                own: Ok(value),
                reason: "no-store",
            },
            Ok((value, opts)) => {
                let windows = Windows {
                    ttl: opts.ttl.unwrap_or(self.defaults.ttl),
                    grace: opts.grace.unwrap_or(self.defaults.grace),
                    stale_if_error: opts.stale_if_error.unwrap_or(self.defaults.stale_if_error),
                };
                if windows.ttl.is_zero() {
                    return Filled::Pass {
                        own: Ok(value),
                        reason: "ttl",
                    };
                }
                Filled::Store {
                    value,
                    windows,
                    tags: opts.tags,
                    error: false,
                }
            }
            Err(e) => Filled::Failed {
                own: Some(Err(Arc::new(e))),
                status: 502,
            },
        }
    }
}

impl<V, C> Cache<V, C>
where
    V: Clone + Send + Sync + 'static,
    C: Codec<V>,
{
    /// Starts a builder.
    pub fn builder() -> CacheBuilder<V, C> {
        CacheBuilder::default()
    }

    /// The value of `key`: from memory, else the shared tier, else by running `init`, once
    /// per key across every node sharing the backend. An init error reaches every caller
    /// waiting on that attempt (here as [`Error::Init`], on other nodes as
    /// [`Error::FillFailedElsewhere`]); nothing is stored, and the next call runs a fresh
    /// init.
    ///
    /// `init` runs in a task of its own (hence `Send + 'static`): a caller that goes away
    /// does not cancel it, and the callers waiting on it still get its value.
    pub async fn try_get_with<E, Fut>(&self, key: impl AsRef<str>, init: Fut) -> Result<V, Error<E>>
    where
        E: Send + Sync + 'static,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
    {
        self.try_get_with_options(
            key,
            async move { init.await.map(|v| (v, EntryOptions::new())) },
        )
        .await
    }

    /// [`try_get_with`](Self::try_get_with) for an init that cannot fail.
    pub async fn get_with<Fut>(
        &self,
        key: impl AsRef<str>,
        init: Fut,
    ) -> Result<V, Error<std::convert::Infallible>>
    where
        Fut: Future<Output = V> + Send + 'static,
    {
        self.try_get_with(key, async move { Ok(init.await) }).await
    }

    /// [`try_get_with`](Self::try_get_with) whose init also decides, from the value it
    /// fetched, how long the entry lives or that it is not stored ([`EntryOptions`]).
    pub fn try_get_with_options<E, Fut>(
        &self,
        key: impl AsRef<str>,
        init: Fut,
    ) -> impl Future<Output = Result<V, Error<E>>> + Send + 'static
    where
        E: Send + Sync + 'static,
        Fut: Future<Output = Result<(V, EntryOptions), E>> + Send + 'static,
    {
        let key = Key::new(key.as_ref().to_owned());
        let fill = Init {
            init,
            defaults: self.defaults,
        };
        let core = self.core.clone();
        // Boxed as `Send` here, where the compiler can see it is: callers then spawn the
        // call freely (an `async fn` chain this deep otherwise trips a known limit of the
        // compiler's higher-ranked `Send` reasoning at the caller).
        let call: std::pin::Pin<Box<dyn Future<Output = Result<V, Error<E>>> + Send>> =
            Box::pin(async move {
                match core.get(key, fill).await {
                    Flown::Value(stored, _) => Ok(stored.value.clone()),
                    Flown::Own(Ok(value), _) => Ok(value),
                    Flown::Own(Err(e), _) => Err(Error::Init(e)),
                    Flown::Failed(_, _, Some(shared)) => match shared.downcast::<Arc<E>>() {
                        Ok(e) => Err(Error::Init((*e).clone())),
                        Err(_) => Err(Error::FillFailedElsewhere),
                    },
                    Flown::Failed(status, _, None) => Err(match status {
                        504 => Error::FillAborted,
                        _ => Error::FillFailedElsewhere,
                    }),
                    // Hit-for-pass: this caller's own init, directly.
                    Flown::Pass(fill) => match fill.run(None).await {
                        Filled::Store { value, .. } => Ok(value),
                        Filled::Pass { own, .. } => own.map_err(Error::Init),
                        Filled::Failed { own: Some(own), .. } => own.map_err(Error::Init),
                        Filled::Failed { own: None, .. } => Err(Error::FillAborted),
                    },
                    Flown::Refused(_) => Err(Error::Refused),
                }
            });
        call
    }

    /// The value of `key` if this node's memory or the shared tier has a fresh one; never
    /// runs an init and never takes a lock.
    pub async fn get(&self, key: impl AsRef<str>) -> Option<V> {
        let key = Key::new(key.as_ref().to_owned());
        let now = now_ms();
        if let Some(stored) = self.core.l1.get(&key.hash.0).await {
            if stored.meta.is_fresh_at(now) {
                return Some(stored.value.clone());
            }
        }
        let bytes = self
            .core
            .tier
            .read(&key.hash, self.core.max_value(&key))
            .await
            .ok()??;
        let (meta, payload) = entry::decode(&bytes, &key.canonical).ok()?;
        if meta.kind != entry::Kind::Value || !meta.is_fresh_at(now) {
            return None;
        }
        let value = C::decode(&payload).ok()?;
        Some(value)
    }

    /// Stores `value` for `key` with the cache's settings, in memory and in the shared
    /// tier (where it replaces an older value and wakes anyone waiting on the key).
    pub async fn insert(&self, key: impl AsRef<str>, value: V) -> Result<(), BackendError> {
        self.insert_with(key, value, EntryOptions::new()).await
    }

    /// [`insert`](Self::insert) with options (a TTL, tags) for this entry.
    pub async fn insert_with(
        &self,
        key: impl AsRef<str>,
        value: V,
        opts: EntryOptions,
    ) -> Result<(), BackendError> {
        let key = Key::new(key.as_ref().to_owned());
        let windows = Windows {
            ttl: opts.ttl.unwrap_or(self.defaults.ttl),
            grace: opts.grace.unwrap_or(self.defaults.grace),
            stale_if_error: opts.stale_if_error.unwrap_or(self.defaults.stale_if_error),
        };
        let tags = opts.tags.clone();
        let meta = entry::Meta::value(now_ms(), windows, 0, opts.tags);
        let payload = match C::encode(&value) {
            Ok(payload) => payload,
            Err(e) => {
                tracing::warn!(key = %key.short(), error = %e, "value does not encode; kept in memory only");
                let stored = self.core.stored_entry(&key, meta, value, 0);
                self.core.l1.insert(key.hash.0, stored).await;
                return Ok(());
            }
        };
        let bytes = entry::encode(&key.canonical, &meta, &payload);
        let ttl = meta.time_to_live(now_ms());
        let stored = self.core.stored_entry(&key, meta, value, payload.len());
        self.core.l1.insert(key.hash.0, stored).await;
        // A fresh token holds no lock: the store only replaces an older value.
        self.core
            .tier
            .store_release(
                &key.hash,
                &crate::tier::new_token(),
                &bytes,
                ttl,
                &crate::tier::Generation::Any,
                &tags,
            )
            .await?;
        Ok(())
    }

    /// Removes `key` from this node's memory and from the shared tier, and tells every
    /// other node to drop its copy in memory (a small broadcast). An init of the key
    /// already running does not store its (older) value. A node whose subscription was
    /// down during the purge drops its copies within the purge check bound
    /// ([`CacheBuilder::purge_check`], 2 s by default).
    pub async fn invalidate(&self, key: impl AsRef<str>) -> Result<(), BackendError> {
        self.core.purge(&Key::new(key.as_ref().to_owned())).await
    }

    /// Removes every entry tagged `tag` ([`EntryOptions::tag`]), on every node, as
    /// [`invalidate`](Self::invalidate) does for one key. Returns how many entries the
    /// shared tier held under the tag.
    pub async fn invalidate_tag(&self, tag: &str) -> Result<u64, BackendError> {
        self.core.purge_tag(tag).await
    }

    /// A snapshot of this node's counters.
    pub fn stats(&self) -> Stats {
        self.core.counters.snapshot()
    }

    /// What this node's in-process memory holds, after running pending maintenance.
    pub async fn memory(&self) -> Memory {
        self.core.memory().await
    }

    /// Asks the backend once whether it answers, logs what it found and returns it.
    ///
    /// With Redis: one `PING`, under the Redis deadline (`redis_timeout`; at least 1 s
    /// while the first connection is made), past the circuit breaker and without feeding
    /// it. The log line is the returned value's `Display`:
    ///
    /// * INFO `redis at 127.0.0.1:6379 answered`;
    /// * WARN `redis at 127.0.0.1:6390 unreachable: connection refused; serving from this
    ///   process only until it answers` (refused, unreachable, timed out: the address and
    ///   the cause);
    /// * ERROR `redis rejected our credentials (WRONGPASS): check the URL's password`, or
    ///   `redis requires a password: add it to the URL` (`NOAUTH`).
    ///
    /// Call it at start-up, after building, so that a wrong URL shows at once rather than
    /// at the first request. `probe_backend` asks without logging.
    pub async fn check_backend(&self) -> BackendHealth {
        let health = self.probe_backend().await;
        health.log();
        health
    }

    /// What [`check_backend`](Self::check_backend) finds, without logging it.
    pub async fn probe_backend(&self) -> BackendHealth {
        self.core.tier.probe().await
    }
}

/// Builds a [`Cache`]. Every setting has a safe default; see each method.
pub struct CacheBuilder<V, C = DefaultCodec> {
    backend: Backend,
    tier: TierConfig,
    cfg: Config,
    defaults: Windows,
    _value: PhantomData<fn() -> (V, C)>,
}

impl<V, C> fmt::Debug for CacheBuilder<V, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheBuilder")
            .field("backend", &self.backend)
            .field("tier", &self.tier)
            .field("config", &self.cfg)
            .field("defaults", &self.defaults)
            .finish()
    }
}

/// The flight settings' defaults, shared by [`CacheBuilder`] and the HTTP layer's builder.
pub(crate) fn default_config() -> Config {
    Config {
        lease: Duration::from_secs(5),
        lock_wait: Duration::from_secs(30),
        on_lock_timeout: FailurePolicy::Open,
        on_redis_error: FailurePolicy::Open,
        poll_interval: Duration::from_millis(50),
        fill_timeout: Duration::from_secs(30),
        hit_for_pass: Duration::from_secs(10),
        max_takeovers: 2,
        early_refresh: None,
        max_payload: 1024 * 1024,
        l1_capacity: 64 * 1024 * 1024,
        side: false,
        name: "tower-stampede".to_owned(),
        soft_timeout: None,
    }
}

/// The tier settings' defaults.
pub(crate) fn default_tier() -> TierConfig {
    TierConfig {
        prefix: "stampede".to_owned(),
        timeout: Duration::from_millis(250),
        breaker_failures: 3,
        breaker_cooldown: Duration::from_secs(1),
        purge_check: Duration::from_secs(2),
    }
}

impl<V, C> Default for CacheBuilder<V, C> {
    fn default() -> Self {
        CacheBuilder {
            backend: Backend::local(),
            tier: default_tier(),
            cfg: default_config(),
            defaults: Windows {
                ttl: Duration::from_secs(60),
                grace: Duration::ZERO,
                stale_if_error: Duration::ZERO,
            },
            _value: PhantomData,
        }
    }
}

impl<V, C> CacheBuilder<V, C>
where
    V: Clone + Send + Sync + 'static,
    C: Codec<V>,
{
    /// The shared tier. Default: [`Backend::local`].
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// The Redis key and channel prefix. Default `"stampede"`. Nodes that share values use
    /// the same prefix; use one prefix per cache (per value type).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.tier.prefix = prefix.into();
        self
    }

    /// How long a value is fresh. Default 60 s.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.defaults.ttl = ttl;
        self
    }

    /// Stale-while-revalidate: for this long after the TTL, callers get the stale value
    /// at once while exactly one refresh runs, fleet-wide. Default 0 (off).
    pub fn grace(mut self, grace: Duration) -> Self {
        self.defaults.grace = grace;
        self
    }

    /// Stale-if-error: for this long after the TTL, a stale value is returned when the
    /// init fails. Default 0 (off).
    pub fn stale_if_error(mut self, window: Duration) -> Self {
        self.defaults.stale_if_error = window;
        self
    }

    /// Early refresh (XFetch): a hit refreshes in the background with a probability that
    /// rises as expiry nears, scaled by `beta` times how long the last init took.
    /// Default off.
    pub fn early_refresh(mut self, beta: f64) -> Self {
        self.cfg.early_refresh = (beta > 0.0 && beta.is_finite()).then_some(beta);
        self
    }

    /// The in-process bound, in bytes: each entry weighs the heap it holds (key, tags, the
    /// cache's own node, and the value: its encoded length plus what its codec's
    /// [`Codec::overhead`] adds); a sixteenth of it is kept for the hit-for-pass, refresh
    /// and purge markers. Default 64 MiB.
    pub fn l1_capacity(mut self, bytes: u64) -> Self {
        self.cfg.l1_capacity = bytes;
        self
    }

    /// The largest encoded value shared through the tier; larger bytes found there are
    /// treated as absent, and never read further than one byte past the bound. Default
    /// 1 MiB.
    pub fn max_value(mut self, bytes: usize) -> Self {
        self.cfg.max_payload = bytes;
        self
    }

    /// The lock's lease; it is extended every third of it while the init runs. Default 5 s.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.cfg.lease = lease.max(Duration::from_millis(3));
        self
    }

    /// How long a call waits on another node's init before the
    /// [`on_lock_timeout`](Self::on_lock_timeout) policy applies. Default 30 s.
    pub fn lock_wait(mut self, wait: Duration) -> Self {
        self.cfg.lock_wait = wait;
        self
    }

    /// After the lock wait: run the init anyway ([`FailurePolicy::Open`], default) or
    /// return [`Error::Refused`] ([`FailurePolicy::Closed`]).
    pub fn on_lock_timeout(mut self, policy: FailurePolicy) -> Self {
        self.cfg.on_lock_timeout = policy;
        self
    }

    /// When Redis fails: serve through L1 and local coalescing ([`FailurePolicy::Open`],
    /// default) or return [`Error::Refused`] ([`FailurePolicy::Closed`]).
    pub fn on_redis_error(mut self, policy: FailurePolicy) -> Self {
        self.cfg.on_redis_error = policy;
        self
    }

    /// How often a waiter re-checks Redis when no wake-up arrives (plus up to half of it
    /// as jitter, and never less than half of it). Once the key's wake-up subscription is
    /// confirmed the wake-up answers the waiter, and it re-checks only every ten of these
    /// (and when the lock's time to live runs out); it polls at this pace again as soon as
    /// the subscription's connection is lost. Default 50 ms.
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.cfg.poll_interval = every.max(Duration::from_millis(1));
        self
    }

    /// The limit on one init. Default 30 s.
    pub fn fill_timeout(mut self, timeout: Duration) -> Self {
        self.cfg.fill_timeout = timeout;
        self
    }

    /// How long a value the init said not to store lets the next calls for its key skip
    /// the lock and run their own init. `Duration::ZERO` turns it off. Default 10 s.
    pub fn hit_for_pass(mut self, ttl: Duration) -> Self {
        self.cfg.hit_for_pass = ttl;
        self
    }

    /// The deadline on each Redis call. Default 250 ms.
    pub fn redis_timeout(mut self, timeout: Duration) -> Self {
        self.tier.timeout = timeout;
        self
    }

    /// After `failures` Redis errors within a second, skip Redis for `cooldown`, then let
    /// one trial call through; its success closes the breaker. Default 3 and 1 s;
    /// `failures == 0` never skips.
    pub fn circuit_breaker(mut self, failures: u32, cooldown: Duration) -> Self {
        self.tier.breaker_failures = failures;
        self.tier.breaker_cooldown = cooldown;
        self
    }

    /// Soft timeout: when a usable stale value is at hand (grace, stale-if-error) and the
    /// init takes longer than this, the callers get the stale value at once and the init
    /// goes on in the background, under its lock and the fill timeout, storing when it
    /// lands. Default off.
    pub fn soft_timeout(mut self, timeout: Duration) -> Self {
        self.cfg.soft_timeout = Some(timeout);
        self
    }

    /// How often a node checks whether it missed purges (its subscription was down): at
    /// most this long after such a purge, it drops its copies. `Duration::ZERO` turns the
    /// check off. Default 2 s.
    pub fn purge_check(mut self, every: Duration) -> Self {
        self.tier.purge_check = every;
        self
    }

    /// The `cache` label of this node's metrics, to tell caches apart. Default
    /// `"tower-stampede"`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.cfg.name = name.into();
        self
    }

    /// Builds the cache. Nothing connects to Redis until the first call.
    pub fn build(self) -> Cache<V, C> {
        let tier = Tier::new(self.backend, &self.tier);
        Cache {
            core: Core::new(self.cfg, tier),
            defaults: self.defaults,
            _value: PhantomData,
        }
    }
}
