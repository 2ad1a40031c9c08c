//! The tier: where the state shared by a fleet lives, behind one small interface.
//!
//! A tier stores opaque bytes under a key hash, holds one lock per key (a token with a
//! lease), and wakes the processes waiting on a key when its fill ends. The flight in
//! [`cache`](crate::cache) is written once against these primitives; a backend differs
//! only in how they run:
//!
//! * [`local`]: this process only. No values (the L1 is the only copy), in-process locks,
//!   wake-ups by direct notification. The embedded default: no Redis.
//! * `redis` (feature `redis`): one Redis. Every primitive is one Lua script, so one
//!   round trip; wake-ups come through a supervised pub/sub subscription.
//! * `cluster` (feature `cluster`): a Redis Cluster: the same scripts routed by their
//!   keys' slot, wake-ups over sharded pub/sub.
//! * `sentinel` (feature `sentinel`): one Redis whose master the sentinels name, followed
//!   through failovers.
//!
//! This room imports nothing from `cache` or `http`: what it hears from Redis it hands
//! upward through the [`WakeSink`] trait.

// Without Redis, parts of the interface (values, failure markers, wake-up messages) have
// no backend that produces them.
#![cfg_attr(not(feature = "redis"), allow(dead_code))]

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

#[cfg(feature = "cluster")]
pub(crate) mod cluster;
#[cfg(feature = "redis")]
pub(crate) mod conn;
pub(crate) mod health;
pub(crate) mod local;
#[cfg(feature = "redis")]
pub(crate) mod redis;
#[cfg(feature = "redis")]
pub(crate) mod scripts;
#[cfg(feature = "sentinel")]
pub(crate) mod sentinel;
#[cfg(feature = "tls")]
pub(crate) mod tls;
pub(crate) mod wake;

#[cfg(feature = "redis")]
pub use conn::BackendError;
#[cfg(not(feature = "redis"))]
pub use local::BackendError;

pub use health::{BackendHealth, RedisProblem, RedisState};
#[cfg(feature = "tls")]
pub use tls::TlsOptions;
pub(crate) use wake::{WakeSink, Wakers};

/// Where the shared tier lives: nowhere (this process only) or Redis.
///
/// ```
/// let local = tower_stampede::Backend::local();
/// # #[cfg(feature = "redis")]
/// let fleet = tower_stampede::Backend::redis("redis://127.0.0.1:6379/").unwrap();
/// ```
#[derive(Clone)]
pub struct Backend(pub(crate) BackendKind);

#[derive(Clone)]
pub(crate) enum BackendKind {
    Local,
    #[cfg(feature = "redis")]
    Redis(Box<::redis::Client>),
    #[cfg(feature = "cluster")]
    Cluster(Box<cluster::ClusterSource>),
    #[cfg(feature = "sentinel")]
    Sentinel(Box<sentinel::SentinelSource>),
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            BackendKind::Local => f.write_str("Backend::Local"),
            #[cfg(feature = "redis")]
            BackendKind::Redis(client) => f
                .debug_tuple("Backend::Redis")
                .field(&redacted(client))
                .finish(),
            #[cfg(feature = "cluster")]
            BackendKind::Cluster(source) => {
                use conn::Source;
                f.debug_tuple("Backend::RedisCluster")
                    .field(&source.address())
                    .finish()
            }
            #[cfg(feature = "sentinel")]
            BackendKind::Sentinel(source) => {
                use conn::Source;
                f.debug_tuple("Backend::RedisSentinel")
                    .field(&source.address())
                    .finish()
            }
        }
    }
}

/// The address of a Redis client, for logs: never its password.
#[cfg(feature = "redis")]
pub(crate) fn redacted(client: &::redis::Client) -> String {
    address_of(client.get_connection_info().addr())
}

/// `host:port` (or a socket path): never a password.
#[cfg(feature = "redis")]
pub(crate) fn address_of(addr: &::redis::ConnectionAddr) -> String {
    match addr {
        ::redis::ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
        ::redis::ConnectionAddr::TcpTls { host, port, .. } => format!("{host}:{port}"),
        other => other.to_string(),
    }
}

impl Backend {
    /// This process only: an in-memory L1 with per-key coalescing. No Redis needed.
    pub fn local() -> Self {
        Backend(BackendKind::Local)
    }

    /// Whether this is [`Backend::local`]: no shared tier.
    pub fn is_local(&self) -> bool {
        matches!(self.0, BackendKind::Local)
    }

    /// Redis at `url` (for example `redis://127.0.0.1:6379/0`) as the shared L2, lock and
    /// wake-up channel for a fleet. Nothing connects until the first request.
    #[cfg(feature = "redis")]
    pub fn redis(url: impl ::redis::IntoConnectionInfo) -> ::redis::RedisResult<Self> {
        Ok(Self::redis_client(::redis::Client::open(url)?))
    }

    /// Redis through a client you built.
    #[cfg(feature = "redis")]
    pub fn redis_client(client: ::redis::Client) -> Self {
        Backend(BackendKind::Redis(Box::new(client)))
    }

    /// A Redis Cluster reached through any of `nodes` (for example
    /// `["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"]`; the others are discovered).
    /// Each key's value, lock and wake-up channel live in one slot, so every primitive is
    /// still one script on one master, and a key's wake-ups go over sharded pub/sub to the
    /// nodes waiting on it. Nothing connects until the first request.
    ///
    /// ```no_run
    /// let cluster = tower_stampede::Backend::redis_cluster([
    ///     "redis://10.0.0.1:6379",
    ///     "redis://10.0.0.2:6379",
    /// ])
    /// .unwrap();
    /// ```
    #[cfg(feature = "cluster")]
    pub fn redis_cluster<T: ::redis::IntoConnectionInfo>(
        nodes: impl IntoIterator<Item = T>,
    ) -> ::redis::RedisResult<Self> {
        let nodes = nodes
            .into_iter()
            .map(|n| n.into_connection_info())
            .collect::<::redis::RedisResult<Vec<_>>>()?;
        let source = cluster::ClusterSource::new(nodes);
        source.check()?;
        Ok(Backend(BackendKind::Cluster(Box::new(source))))
    }

    /// The Redis whose master the sentinels at `sentinels` (for example
    /// `["redis://10.0.0.1:26379", "redis://10.0.0.2:26379"]`) name `master_name`. After a
    /// failover the next call asks them again and goes to the promoted replica; calls
    /// during the failover fail and are answered by the error policy (fail open by
    /// default). Nothing connects until the first request.
    #[cfg(feature = "sentinel")]
    pub fn redis_sentinel<T: ::redis::IntoConnectionInfo>(
        master_name: impl Into<String>,
        sentinels: impl IntoIterator<Item = T>,
    ) -> ::redis::RedisResult<Self> {
        let sentinels = sentinels
            .into_iter()
            .map(|n| n.into_connection_info())
            .collect::<::redis::RedisResult<Vec<_>>>()?;
        let source = sentinel::SentinelSource::new(master_name.into(), sentinels)?;
        Ok(Backend(BackendKind::Sentinel(Box::new(source))))
    }

    /// Uses `tls` for the `rediss://` connections of this backend (one Redis, a Cluster's
    /// nodes, or the Redis behind Sentinel): a private CA, a client certificate. A
    /// `rediss://` URL without it verifies against the system's roots. A certificate that
    /// does not verify is an error at the first call (named by `check_backend()`), and
    /// the node serves from its own memory meanwhile.
    #[cfg(feature = "tls")]
    pub fn with_tls(self, tls: TlsOptions) -> ::redis::RedisResult<Self> {
        let certs = tls.certificates();
        Ok(Backend(match self.0 {
            BackendKind::Local => BackendKind::Local,
            BackendKind::Redis(client) => BackendKind::Redis(Box::new(
                ::redis::Client::build_with_tls(client.get_connection_info().clone(), certs)?,
            )),
            #[cfg(feature = "cluster")]
            BackendKind::Cluster(mut source) => {
                source.certs = Some(certs);
                BackendKind::Cluster(source)
            }
            #[cfg(feature = "sentinel")]
            BackendKind::Sentinel(mut source) => {
                std::sync::Arc::make_mut(&mut source.config).certs = Some(certs);
                BackendKind::Sentinel(source)
            }
        }))
    }
}

/// A key as the tier sees it: the SHA-256 of the canonical key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct KeyHash(pub(crate) [u8; 32]);

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({})", self.short())
    }
}

impl KeyHash {
    /// The hash in hex: the Redis hash tag and the wake-up message.
    #[cfg(feature = "redis")]
    pub(crate) fn hex(&self) -> String {
        hex(&self.0)
    }

    /// The first 16 hex digits, formatted only if a log or span asks for them.
    pub(crate) fn short(&self) -> impl fmt::Display + '_ {
        struct Short<'a>(&'a [u8; 32]);
        impl fmt::Display for Short<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex(&self.0[..8]))
            }
        }
        Short(&self.0)
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 0xf) as usize] as char);
    }
    out
}

/// Parses 64 hex digits back into a hash.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) fn parse_hex(s: &[u8]) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// A fresh random 128-bit token, as 32 hex digits.
pub(crate) fn new_token() -> String {
    hex(&rand::random::<[u8; 16]>())
}

/// Whole milliseconds, at least one (Redis refuses `PX 0`).
pub(crate) fn millis(d: Duration) -> u64 {
    (d.as_millis().min(u64::MAX as u128) as u64).max(1)
}

/// `base` plus a uniformly random part of `jitter`.
pub(crate) fn jittered(base: Duration, jitter: Duration) -> Duration {
    use rand::Rng;
    if jitter.is_zero() {
        return base;
    }
    base + rand::rng().random_range(Duration::ZERO..=jitter)
}

/// What the check-and-lock found.
#[derive(Debug)]
pub(crate) enum Check {
    /// Bytes stored for the key (not yet judged: they may be foreign or expired).
    Value(Bytes),
    /// The lock is ours now, under the key's purge generation (a store under an older
    /// one is refused: the key was purged while the fill ran).
    Locked(Generation),
    /// Another holder has the lock: its token, and the time left on its lease (`None`
    /// for a lock with no expiry, which no holder of ours ever leaves).
    Held {
        token: Bytes,
        left: Option<Duration>,
    },
    /// The attempt this caller waited on failed, with this status (its failure marker).
    Failed(u16),
}

/// The purge generation a fill started under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Generation {
    /// As the check-and-lock read it.
    Known(Bytes),
    /// Not known (the check failed or timed out): store only where no purge happened.
    Unknown,
    /// Any: an explicit insert.
    Any,
}

impl Generation {
    #[cfg(feature = "redis")]
    pub(crate) fn arg(&self) -> &[u8] {
        match self {
            Generation::Known(g) => g,
            Generation::Unknown => b"",
            Generation::Any => b"*",
        }
    }
}

/// The options of one check-and-lock.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CheckOpts<'a> {
    pub(crate) lease: Duration,
    /// The bytes found last time were unusable: take the lock over them.
    pub(crate) skip_value: bool,
    /// Values larger than this are treated as absent (never read whole).
    pub(crate) max_value: usize,
    /// The holder token this caller waited on: if the lock is free and that attempt left
    /// a failure marker, its outcome is the answer.
    pub(crate) waited_on: Option<&'a [u8]>,
}

/// The shared tier of one node.
pub(crate) enum Tier {
    Local(local::LocalTier),
    #[cfg(feature = "redis")]
    Redis(Box<redis::RedisTier>),
    #[cfg(feature = "cluster")]
    Cluster(Box<redis::RedisTier<cluster::ClusterSource>>),
    #[cfg(feature = "sentinel")]
    Sentinel(Box<redis::RedisTier<sentinel::SentinelSource>>),
}

impl fmt::Debug for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tier::Local(_) => f.write_str("local"),
            #[cfg(feature = "redis")]
            Tier::Redis(r) => write!(f, "redis at {}", r.address()),
            #[cfg(feature = "cluster")]
            Tier::Cluster(r) => write!(f, "redis cluster at {}", r.address()),
            #[cfg(feature = "sentinel")]
            Tier::Sentinel(r) => write!(f, "redis {}", r.address()),
        }
    }
}

/// Runs `$body` with `$t` bound to the Redis tier of whichever Redis variant `$tier` is
/// (one Redis or a Cluster: the same code, generic over the connection).
macro_rules! on_redis {
    ($tier:expr, $t:ident => $body:expr, local $l:pat => $local:expr) => {
        match $tier {
            Tier::Local($l) => $local,
            #[cfg(feature = "redis")]
            Tier::Redis($t) => $body,
            #[cfg(feature = "cluster")]
            Tier::Cluster($t) => $body,
            #[cfg(feature = "sentinel")]
            Tier::Sentinel($t) => $body,
        }
    };
}

/// How a Redis tier is set up.
#[derive(Clone, Debug)]
pub(crate) struct TierConfig {
    pub(crate) prefix: String,
    pub(crate) timeout: Duration,
    pub(crate) breaker_failures: u32,
    pub(crate) breaker_cooldown: Duration,
    /// How often a node checks the purge epoch, so that purges it did not hear (its
    /// subscription was down) still reach its memory within this bound.
    pub(crate) purge_check: Duration,
}

impl Tier {
    pub(crate) fn new(backend: Backend, cfg: &TierConfig) -> Tier {
        let _ = cfg;
        #[cfg(feature = "tls")]
        if !matches!(backend.0, BackendKind::Local) {
            tls::install_provider();
        }
        match backend.0 {
            BackendKind::Local => Tier::Local(local::LocalTier::default()),
            #[cfg(feature = "redis")]
            BackendKind::Redis(client) => {
                Tier::Redis(Box::new(redis::RedisTier::new(*client, cfg)))
            }
            #[cfg(feature = "cluster")]
            BackendKind::Cluster(source) => {
                Tier::Cluster(Box::new(redis::RedisTier::new(*source, cfg)))
            }
            #[cfg(feature = "sentinel")]
            BackendKind::Sentinel(source) => {
                Tier::Sentinel(Box::new(redis::RedisTier::new(*source, cfg)))
            }
        }
    }

    /// The waiters of this process, by key.
    pub(crate) fn wakers(&self) -> &Arc<Wakers> {
        on_redis!(self, t => &t.wakers, local t => &t.wakers)
    }

    /// Starts hearing wake-ups for `sink` (once; later calls do nothing).
    pub(crate) fn ensure_subscribed(&self, sink: std::sync::Weak<dyn WakeSink>) {
        on_redis!(self, t => t.ensure_subscribed(sink), local _ => drop(sink))
    }

    pub(crate) async fn check_and_lock(
        &self,
        key: &KeyHash,
        token: &str,
        opts: CheckOpts<'_>,
    ) -> Result<Check, BackendError> {
        on_redis!(self, t => t.check_and_lock(key, token, opts).await,
            local t => Ok(t.check_and_lock(key, token, opts.lease)))
    }

    /// Stores `bytes` for `ttl` (unless a newer entry, by `stored_at`, stands, or the key
    /// was purged since `generation`), records it under its `tags`, releases the lock if
    /// `token` holds it, and wakes the key's waiters. Returns whether the lock was still
    /// held.
    pub(crate) async fn store_release(
        &self,
        key: &KeyHash,
        token: &str,
        bytes: &[u8],
        ttl: Duration,
        generation: &Generation,
        tags: &[String],
    ) -> Result<bool, BackendError> {
        #[cfg(not(feature = "redis"))]
        let _ = (bytes, ttl, generation, tags);
        on_redis!(self, t => t.store_release(key, token, bytes, ttl, generation, tags).await,
            local t => Ok(t.release(key, token)))
    }

    /// Releases (if still ours) and wakes the waiters, for a fill with nothing to store.
    pub(crate) async fn release(&self, key: &KeyHash, token: &str) -> Result<bool, BackendError> {
        on_redis!(self, t => t.release_publish(key, token).await,
            local t => Ok(t.release(key, token)))
    }

    /// Leaves a failure marker for `marker_ttl`, releases and tells the waiters that the
    /// attempt failed with `status`.
    pub(crate) async fn fail_release(
        &self,
        key: &KeyHash,
        token: &str,
        status: u16,
        marker_ttl: Duration,
    ) -> Result<bool, BackendError> {
        #[cfg(not(feature = "redis"))]
        let _ = marker_ttl;
        on_redis!(self, t => t.fail_release(key, token, status, marker_ttl).await,
            local t => Ok(t.fail_release(key, token, status)))
    }

    /// Extends the lease if `token` still holds the lock.
    pub(crate) async fn extend(
        &self,
        key: &KeyHash,
        token: &str,
        lease: Duration,
    ) -> Result<bool, BackendError> {
        on_redis!(self, t => t.extend(key, token, lease).await,
            local t => Ok(t.locks.extend(key.0, token, lease)))
    }

    /// Takes over a lock still held by `old` (one with no expiry, or a lease no holder of
    /// ours would set): compare-and-set to `token`.
    pub(crate) async fn takeover(
        &self,
        key: &KeyHash,
        old: &[u8],
        token: &str,
        lease: Duration,
    ) -> Result<bool, BackendError> {
        on_redis!(self, t => t.takeover(key, old, token, lease).await,
            local t => Ok(t.locks.takeover(key.0, old, token, lease)))
    }

    /// Purges the stored value: it leaves the tier, a fill that started before does not
    /// store, and every node is told to drop its copy. `generation_ttl` bounds how long the
    /// purge outlives such a fill.
    pub(crate) async fn remove(
        &self,
        key: &KeyHash,
        generation_ttl: Duration,
    ) -> Result<(), BackendError> {
        let _ = (key, generation_ttl);
        on_redis!(self, t => t.remove(key, generation_ttl).await, local _ => Ok(()))
    }

    /// Purges every value recorded under `tag`; returns how many the tier held.
    pub(crate) async fn purge_tag(
        &self,
        tag: &str,
        tag_hash: &KeyHash,
        generation_ttl: Duration,
    ) -> Result<u64, BackendError> {
        let _ = (tag, tag_hash, generation_ttl);
        on_redis!(self, t => t.purge_tag(tag, tag_hash, generation_ttl).await, local _ => Ok(0))
    }

    /// The purge epoch: how many purges the tier has seen (local: none).
    pub(crate) async fn epoch(&self) -> Result<u64, BackendError> {
        on_redis!(self, t => t.epoch().await, local _ => Ok(0))
    }

    /// Reads a value without taking the lock (local: there is no shared copy).
    pub(crate) async fn read(
        &self,
        key: &KeyHash,
        max_value: usize,
    ) -> Result<Option<Bytes>, BackendError> {
        let _ = (key, max_value);
        on_redis!(self, t => t.read(key, max_value).await, local _ => Ok(None))
    }
}

/// A `Hasher` for key hashes, which are uniform already: their first eight bytes serve.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    fn write(&mut self, bytes: &[u8]) {
        if let Some(head) = bytes.first_chunk::<8>() {
            self.0 ^= u64::from_le_bytes(*head);
        }
    }

    fn write_usize(&mut self, _length_prefix: usize) {}

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Builds [`Prehashed`] hashers.
pub(crate) type PrehashedState = std::hash::BuildHasherDefault<Prehashed>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_tokens_are_fresh() {
        let h = KeyHash([0xab; 32]);
        assert_eq!(parse_hex(hex(&h.0).as_bytes()), Some(h.0));
        assert_eq!(parse_hex(b"zz"), None);
        assert_ne!(new_token(), new_token());
        assert_eq!(new_token().len(), 32);
        assert_eq!(millis(Duration::ZERO), 1, "Redis refuses PX 0");
    }
}
