//! [`StampedeLayer`] and its builder.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::HeaderName;
use tower_layer::Layer;

use super::key::KeyFn;
use super::policy::{HttpRules, PrivateRequests};
use super::service::Stampede;
use super::shared::{variant_list_weight, Shared};
use super::status::StatusValues;
use super::stored;
use crate::cache::flight::{Config, Core};
use crate::cache::{default_config, default_tier, FailurePolicy, Memory};
use crate::stats::Stats;
use crate::tier::{Backend, BackendError, BackendHealth, Tier, TierConfig};

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
            .field("core", &self.shared.core)
            .field("rules", &self.shared.rules)
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
        self.shared.core.counters.snapshot()
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
        let variants = &self.shared.variants;
        variants.run_pending_tasks().await;
        self.shared
            .core
            .memory_with(variants.entry_count(), variants.weighted_size())
            .await
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
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let layer = tower_stampede::StampedeLayer::new();
    /// let health = layer.check_backend().await;
    /// assert_eq!(health.backend, "local");
    /// assert!(health.is_up());
    /// # }
    /// ```
    pub async fn check_backend(&self) -> BackendHealth {
        let health = self.probe_backend().await;
        health.log();
        health
    }

    /// What [`check_backend`](Self::check_backend) finds, without logging it: for a health
    /// endpoint. Bounded by the Redis deadline.
    pub async fn probe_backend(&self) -> BackendHealth {
        self.shared.core.tier.probe().await
    }

    /// Purges every stored answer of `uri` (all its variants: encodings, varied headers,
    /// users), on every node: the values leave Redis, every node drops its copies in memory
    /// (a small broadcast), and a fill of it already running does not store. Keyed as a
    /// `GET` of `uri` would be (with the layer's key function), the `Host` taken from the
    /// URI's authority. Returns how many answers Redis held.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let layer = tower_stampede::StampedeLayer::new();
    /// let uri: http::Uri = "http://shop.example/products/7".parse().unwrap();
    /// layer.purge(&uri).await.unwrap();
    /// # }
    /// ```
    pub async fn purge(&self, uri: &http::Uri) -> Result<u64, BackendError> {
        let host = uri
            .authority()
            .and_then(|a| http::HeaderValue::from_str(a.as_str()).ok());
        self.shared.purge(uri, host).await
    }

    /// Purges every stored answer tagged `tag` (by its `Surrogate-Key` or `Cache-Tag`
    /// header), on every node, as [`purge`](Self::purge) does. Returns how many answers
    /// Redis held under the tag.
    pub async fn purge_tag(&self, tag: &str) -> Result<u64, BackendError> {
        self.shared.core.purge_tag(tag).await
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
    tier: TierConfig,
    flight: Config,
    rules: HttpRules,
    cache_name: String,
    key_fn: Option<KeyFn>,
}

impl fmt::Debug for StampedeBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StampedeBuilder")
            .field("backend", &self.backend)
            .field("tier", &self.tier)
            .field("flight", &self.flight)
            .field("rules", &self.rules)
            .field("cache_name", &self.cache_name)
            .finish()
    }
}

impl Default for StampedeBuilder {
    fn default() -> Self {
        StampedeBuilder {
            backend: Backend::local(),
            tier: default_tier(),
            flight: default_config(),
            rules: HttpRules::default(),
            cache_name: "tower-stampede".to_owned(),
            key_fn: None,
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
        self.tier.prefix = prefix.into();
        self
    }

    /// The in-process bound, in bytes: cached answers, each weighed by the heap it holds
    /// (key, headers, body, tags and the cache's own node), and, in a sixteenth of it, the
    /// hit-for-pass, refresh and purge markers and the per-URL variant lists. See
    /// [`StampedeLayer::memory`]. Default 64 MiB.
    pub fn l1_capacity(mut self, bytes: u64) -> Self {
        self.flight.l1_capacity = bytes;
        self
    }

    /// How long a stored answer is fresh. With
    /// [`honor_cache_control`](Self::honor_cache_control), only for answers without
    /// explicit freshness (no `s-maxage`, `max-age` or `Expires`); `Duration::ZERO` then
    /// leaves them unstored. Default 60 s.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.rules.ttl = ttl;
        self
    }

    /// The standards mode: this layer caches as RFC 9111 says a shared cache does.
    /// Default off (every storable answer is fresh for [`ttl`](Self::ttl)).
    ///
    /// * Freshness from `s-maxage`, else `max-age`, else `Expires - Date`; for answers
    ///   without, [`ttl`](Self::ttl) (or the [heuristic](Self::heuristic_freshness)).
    /// * A targeted field (RFC 9213: [this cache's own](Self::targeted_cache_control),
    ///   then `CDN-Cache-Control`) outranks `Cache-Control`, and is not sent downstream.
    /// * The emitted `Age` counts the upstream's `Age`, the response delay and the time
    ///   the answer has been stored, on whichever node serves it.
    /// * Stale answers with a validator are kept for
    ///   [`revalidate_window`](Self::revalidate_window) and refreshed with a conditional
    ///   request (once across the fleet); a `304` updates the stored headers and keeps the
    ///   body. `no-cache` answers are revalidated before every reuse; `must-revalidate`,
    ///   `proxy-revalidate` and `s-maxage` answers are never served stale.
    /// * `stale-while-revalidate=N` and `stale-if-error=N` override [`grace`](Self::grace)
    ///   and [`stale_if_error`](Self::stale_if_error).
    /// * Errors (5xx, 429) are stored only with explicit freshness or
    ///   [`error_ttl`](Self::error_ttl); other statuses when heuristically cacheable
    ///   (RFC 9110 15.1) or with explicit freshness.
    /// * Answers varying on request headers the key does not hold are stored per variant
    ///   (see [`max_variants`](Self::max_variants)); `Vary: *` never.
    /// * A client's `Cache-Control: no-store` bypasses the cache; one byte range is
    ///   answered `206` from the stored answer.
    pub fn honor_cache_control(mut self, on: bool) -> Self {
        self.rules.honor_cache_control = on;
        self
    }

    /// One time to live for every storable answer, whatever its headers say: the fixed
    /// behaviour, even with [`honor_cache_control`](Self::honor_cache_control).
    /// `None` (default): no override.
    pub fn ttl_override(mut self, ttl: Option<Duration>) -> Self {
        self.rules.ttl_override = ttl.filter(|t| !t.is_zero());
        self
    }

    /// Standards mode: answers without explicit freshness but with `Last-Modified` are
    /// fresh for a tenth of the time since they were modified (RFC 9111 4.2.2), at most
    /// `cap`. `Duration::ZERO` (default) turns it off.
    pub fn heuristic_freshness(mut self, cap: Duration) -> Self {
        self.rules.heuristic = (!cap.is_zero()).then_some(cap);
        self
    }

    /// Standards mode: how long past freshness an answer with a validator (`ETag`,
    /// `Last-Modified`) is kept, to be revalidated rather than fetched again. It is not
    /// served stale for that: only within its grace or stale-if-error windows.
    /// Default 10 minutes.
    pub fn revalidate_window(mut self, window: Duration) -> Self {
        self.rules.revalidate_window = window;
        self
    }

    /// Standards mode: the name of this cache's own targeted cache-control field
    /// (RFC 9213), read before `CDN-Cache-Control` and `Cache-Control`, and removed from
    /// every answer sent downstream. Default `Tower-Stampede-Cache-Control`.
    ///
    /// # Panics
    ///
    /// When `name` does not end in `-cache-control` after a target (as
    /// `CDN-Cache-Control` does): any other field (`Cache-Control`, `Age`, `Vary`, ...)
    /// would be read as this cache's directives and removed from every answer.
    ///
    /// ```
    /// use http::HeaderName;
    ///
    /// let layer = tower_stampede::StampedeLayer::builder()
    ///     .honor_cache_control(true)
    ///     .targeted_cache_control(HeaderName::from_static("edge-cache-control"))
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn targeted_cache_control(mut self, name: HeaderName) -> Self {
        assert!(
            is_targeted_name(&name),
            "targeted_cache_control: `{name}` is not a targeted field name \
             (`<target>-cache-control`, RFC 9213)"
        );
        self.rules.targeted[0] = name;
        self
    }

    /// Standards mode: let a client's `Cache-Control: no-cache`, `max-age=0` or `Pragma:
    /// no-cache` send its request upstream (unstored). Default off: a shared cache
    /// protects its origin, and any client could otherwise empty it of its purpose.
    pub fn honor_request_no_cache(mut self, on: bool) -> Self {
        self.rules.honor_request_no_cache = on;
        self
    }

    /// Standards mode: the most variants this node stores per URL for answers that vary
    /// on request headers the key does not hold (a vary index at the URL's key names the
    /// headers; each variant is keyed on their normalized values). Past it, requests for
    /// new variants go upstream unstored. `0` leaves such answers unstored. Default 16.
    pub fn max_variants(mut self, n: usize) -> Self {
        self.rules.max_variants = n;
        self
    }

    /// Normalize `Accept-Encoding` to `br`, `gzip` or none and key on it (default on).
    /// Off, the header goes upstream as sent and is not keyed: answers that vary on it are
    /// then stored per variant (standards mode) or not at all.
    pub fn key_accept_encoding(mut self, on: bool) -> Self {
        self.rules.key_accept_encoding = on;
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
        self.flight.hit_for_pass = ttl;
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
        self.flight.early_refresh = (beta > 0.0 && beta.is_finite()).then_some(beta);
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
        self.flight.lease = lease.max(Duration::from_millis(3));
        self
    }

    /// How long a request waits on another node's fill before the
    /// [`on_lock_timeout`](Self::on_lock_timeout) policy applies. Default 30 s.
    pub fn lock_wait(mut self, wait: Duration) -> Self {
        self.flight.lock_wait = wait;
        self
    }

    /// After the lock wait: call the inner service ([`FailurePolicy::Open`], default) or
    /// answer 503 ([`FailurePolicy::Closed`]).
    pub fn on_lock_timeout(mut self, policy: FailurePolicy) -> Self {
        self.flight.on_lock_timeout = policy;
        self
    }

    /// When Redis fails: serve through L1 and local coalescing ([`FailurePolicy::Open`],
    /// default) or answer 503 ([`FailurePolicy::Closed`]).
    pub fn on_redis_error(mut self, policy: FailurePolicy) -> Self {
        self.flight.on_redis_error = policy;
        self
    }

    /// How often a waiter re-checks Redis when no wake-up arrives (plus up to half of it
    /// as jitter; never sooner than half of it, whatever the lock's time to live). Once the
    /// key's wake-up subscription is confirmed the wake-up answers the waiter, and it
    /// re-checks only every ten of these (and when the lock's time to live runs out); it
    /// polls at this pace again as soon as the subscription's connection is lost.
    /// Default 50 ms.
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.flight.poll_interval = every.max(Duration::from_millis(1));
        self
    }

    /// The limit on one inner call, body included. Default 30 s.
    pub fn upstream_timeout(mut self, timeout: Duration) -> Self {
        self.flight.fill_timeout = timeout;
        self
    }

    /// The deadline on each Redis call, scheduling delay included (a starved runtime
    /// must not read as a dead Redis). Default 250 ms.
    pub fn redis_timeout(mut self, timeout: Duration) -> Self {
        self.tier.timeout = timeout;
        self
    }

    /// After `failures` Redis errors within one second, skip Redis for `cooldown`; then one
    /// trial call goes to Redis (the others still skip it) and its success ends the skipping,
    /// its failure starts another cool-down. Default 3 and 1 s; `failures == 0` never skips.
    /// A call that times out while a read on the second connection got an answer (Redis
    /// holding writes back, as in a failover) is no failure.
    pub fn circuit_breaker(mut self, failures: u32, cooldown: Duration) -> Self {
        self.tier.breaker_failures = failures;
        self.tier.breaker_cooldown = cooldown;
        self
    }

    /// How many times a request that waited on a failed fill tries again (one of the
    /// waiters leads each retry) before answering 502. Default 2.
    pub fn max_takeovers(mut self, n: u32) -> Self {
        self.flight.max_takeovers = n;
        self
    }

    /// Soft timeout: when a usable stale copy is at hand (grace, stale-if-error) and the
    /// upstream takes longer than this, the waiting requests are answered from the copy at
    /// once (`Cache-Status: ...; hit; detail=stale-soft-timeout`) and the fill goes on in
    /// the background, under its lock and [`upstream_timeout`](Self::upstream_timeout),
    /// storing when it lands. Default off.
    pub fn soft_timeout(mut self, timeout: Duration) -> Self {
        self.flight.soft_timeout = Some(timeout);
        self
    }

    /// Send the `Surrogate-Key` and `Cache-Tag` headers downstream too. They are read as
    /// the answer's tags ([`StampedeLayer::purge_tag`]) either way. Default off: they are
    /// removed.
    pub fn expose_tags(mut self, on: bool) -> Self {
        self.rules.expose_tags = on;
        self
    }

    /// How often a node checks whether it missed purges (its subscription was down): at
    /// most this long after such a purge it drops its copies in memory. `Duration::ZERO`
    /// turns the check off. Default 2 s.
    pub fn purge_check(mut self, every: Duration) -> Self {
        self.tier.purge_check = every;
        self
    }

    /// The cache's name in `Cache-Status`. Default `"tower-stampede"`.
    pub fn cache_name(mut self, name: impl Into<String>) -> Self {
        self.cache_name = name.into();
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
        let mut flight = self.flight;
        flight.max_payload = stored::max_payload(self.rules.max_body);
        flight.name = self.cache_name.clone();
        // The variant lists are kept inside the bound, in the share the core leaves aside.
        flight.side = true;
        let tier = Tier::new(self.backend, &self.tier);
        let core = Core::new(flight, tier);
        let list = variant_list_weight(self.rules.max_variants);
        let variants = moka::future::Cache::builder()
            .max_capacity(core.side_capacity())
            .weigher(move |_: &[u8; 32], _: &_| list)
            .time_to_idle(Duration::from_secs(600))
            .build();
        StampedeLayer {
            shared: Arc::new(Shared {
                core,
                status_values: StatusValues::new(&self.cache_name),
                rules: self.rules,
                key_fn: self.key_fn,
                variants,
            }),
        }
    }
}

/// Whether `name` can be a targeted cache-control field (RFC 9213): `<target>-cache-control`,
/// with a target.
fn is_targeted_name(name: &HeaderName) -> bool {
    name.as_str()
        .strip_suffix("-cache-control")
        .is_some_and(|target| !target.is_empty())
}
