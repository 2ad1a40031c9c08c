//! The flight: one fill per key, for every tier.
//!
//! ```text
//! get(key) ─► L1 fresh? ──yes──► value                          (0 round trips)
//!               │no    (one flight per key per process: local callers join it)
//!               ▼
//!           tier.check_and_lock: value | locked (by me) | held (token, pttl) | failed
//!               ├─ value ───► L1, answer                          (1)
//!               ├─ locked ──► fill once (lease extended every lease/3) ─► answer callers,
//!               │             then tier.store_release (value, release, wake) (2 in all)
//!               ├─ held ────► wait for this key's wake-up (or a poll) ─► read / take over
//!               └─ failed ──► the attempt waited on failed: its outcome is the answer
//! ```
//!
//! The fill runs in a task of its own, so a caller that goes away strands neither the lock
//! nor the callers waiting on it. A failure (error, timeout, panic, an error answer) is the
//! answer of every caller waiting on that attempt, here and on other nodes: nobody starts
//! a second attempt on its behalf. Grace (stale-while-revalidate), stale-if-error, early
//! refresh (XFetch) and hit-for-pass markers are here too, once.

use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use moka::future::Cache as Moka;
use moka::Expiry;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::codec::Codec;
use super::entry::{self, now_ms, Kind, Meta, Windows};
use super::weight;
use crate::stats::{Counters, Event, FillTimer, LockWait};
use crate::tier::wake::{is_shared_error, Wake, FAILURE_MARKER_MAX};
use crate::tier::PrehashedState;
use crate::tier::{
    jittered, new_token, BackendError, Check, CheckOpts, Generation, KeyHash, Tier, WakeSink,
};

/// What to do when the tier fails, or when a lock wait passes its limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Keep serving: run the fill anyway (coalesced within this process).
    #[default]
    Open,
    /// Refuse (the HTTP layer answers `503 Service Unavailable`), protecting the upstream
    /// above all.
    Closed,
}

/// How one answer was produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// From this process's memory.
    HitMemory,
    /// From the shared tier.
    HitTier,
    /// This caller's fill ran and its value was stored.
    Stored,
    /// Joined another caller of this process whose fill ran.
    Collapsed,
    /// Waited on another node's fill, then got its value.
    CollapsedFleet,
    /// A stale copy, served at once while one refresh runs (stale-while-revalidate).
    Stale,
    /// A stale copy, served because the fill failed (stale-if-error).
    StaleIfError,
    /// A stale copy, served because the fill took longer than the soft timeout; the fill
    /// goes on and stores when it lands.
    StaleSoftTimeout,
    /// The fill ran; its answer could not be stored.
    Uncacheable,
    /// The tier failed and the policy is to fail closed.
    TierUnavailable,
    /// Waited longer than the lock-wait limit and the policy is to fail closed.
    LockTimeout,
    /// The fill failed (here, or on the node this caller waited on).
    FillFailed,
}

/// A key: the canonical text (stored in the envelope and compared on read) and its hash
/// (the L1 key and, in hex, the tier's hash tag).
#[derive(Debug)]
pub(crate) struct Key {
    pub(crate) canonical: String,
    pub(crate) hash: KeyHash,
}

impl Key {
    pub(crate) fn new(canonical: String) -> Key {
        let hash = KeyHash(Sha256::digest(canonical.as_bytes()).into());
        Key { canonical, hash }
    }

    pub(crate) fn short(&self) -> impl std::fmt::Display + '_ {
        self.hash.short()
    }
}

/// The hash a tag is announced under when it is purged.
pub(crate) fn tag_hash(tag: &str) -> KeyHash {
    KeyHash(Sha256::digest(format!("tag\n{tag}").as_bytes()).into())
}

/// One entry in memory: its meta, its decoded value and what it weighs.
#[derive(Debug)]
pub(crate) struct Stored<T> {
    /// The canonical key: a wake-up carrying a value is decoded against it, and the
    /// HTTP layer builds a vary index's variant keys on it.
    pub(crate) key: String,
    pub(crate) meta: Meta,
    pub(crate) value: T,
    pub(crate) weight: u32,
}

/// The share of the capacity kept for the markers: one sixteenth; half of it for the
/// hit-for-pass markers, an eighth each for the refresh and purge markers, and a quarter
/// for the caller's own per-key structures (the HTTP layer's variant lists), when it has
/// some (otherwise L1 takes that quarter).
const MARKER_SHARE: u64 = 16;

/// How many poll intervals a waiter whose wake-up subscription is confirmed waits between
/// two looks at the tier: the wake-up answers it; the poll covers a lost one.
const CONFIRMED_POLL: u32 = 10;

/// What one marker costs in memory (see [`weight::MARKER`]).
const MARKER_WEIGHT: u32 = weight::MARKER as u32;

/// The settings of the flight.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) lease: Duration,
    pub(crate) lock_wait: Duration,
    pub(crate) on_lock_timeout: FailurePolicy,
    pub(crate) on_redis_error: FailurePolicy,
    pub(crate) poll_interval: Duration,
    pub(crate) fill_timeout: Duration,
    pub(crate) hit_for_pass: Duration,
    pub(crate) max_takeovers: u32,
    pub(crate) early_refresh: Option<f64>,
    /// The largest payload stored: with the envelope's own bounds, it sizes the largest
    /// value worth reading from the tier.
    pub(crate) max_payload: usize,
    pub(crate) l1_capacity: u64,
    /// Keep a share of the capacity for the caller's own per-key structures
    /// ([`Core::side_capacity`]), counted by [`Core::memory_with`].
    pub(crate) side: bool,
    /// The `cache` label of this node's metrics.
    pub(crate) name: String,
    /// With a usable stale copy, a fill slower than this answers its callers from the copy
    /// and goes on in the background.
    pub(crate) soft_timeout: Option<Duration>,
}

/// What a fill produced.
pub(crate) enum Filled<T, O> {
    /// A value to store and share. `error` marks an error answer stored on purpose (an
    /// HTTP 5xx with `error_ttl`): a usable stale copy is served instead.
    Store {
        value: T,
        windows: Windows,
        tags: Vec<String>,
        error: bool,
    },
    /// Not storable: the caller's own answer; the followers go to the fill themselves (a
    /// hit-for-pass marker lets them skip the lock for a while).
    Pass { own: O, reason: &'static str },
    /// The attempt failed with `status` (5xx or 429): the callers waiting on it get that
    /// status, the caller that ran it its own answer (when it has one).
    Failed { own: Option<O>, status: u16 },
}

/// The work a flight leads: the one call a cold key makes.
pub(crate) trait Fill<T>: Send + 'static {
    /// What only the caller that ran the fill gets back (a streamed response, an error).
    type Own: Send + 'static;
    /// What of the fill's own answer its followers in this process may share when it
    /// failed (an error behind an `Arc`). Default: nothing.
    fn share(own: &Self::Own) -> Option<SharedError> {
        let _ = own;
        None
    }

    /// Runs the fill. `stale` is the newest copy the flight knows of (stale, or kept for
    /// stale-if-error), for a fill that can revalidate it (a conditional request).
    fn run(
        self,
        stale: Option<Arc<Stored<T>>>,
    ) -> impl std::future::Future<Output = Filled<T, Self::Own>> + Send;
}

/// What a caller gets from the flight.
pub(crate) enum Flown<T, F: Fill<T>> {
    /// A value: from memory, the tier, this fill or another one; or a stale copy.
    Value(Arc<Stored<T>>, Outcome),
    /// This caller's fill ran and nothing was shared: its own answer.
    Own(F::Own, Outcome),
    /// The fill failed with this status, and this caller has no answer of its own (with
    /// the error the fill shared, for a follower in this process).
    Failed(u16, Outcome, Option<SharedError>),
    /// Go to the fill directly (a hit-for-pass marker): the fill is handed back, unused.
    Pass(F),
    /// A fail-closed policy refused.
    Refused(Outcome),
}

/// What this process's memory held for a key, as [`Core::peek`] found it.
pub(crate) enum Peek<T> {
    /// Not read: the read is made when the request is handled.
    Unread,
    /// Read: the entry, fresh or not, or none.
    Read(Option<Arc<Stored<T>>>),
}

/// A fill's error, shared with the followers of its flight in this process (the generic
/// cache hands it to them as its `Arc<E>`).
pub(crate) type SharedError = Arc<dyn std::any::Any + Send + Sync>;

/// How a flight ended, as its followers in this process see it.
#[derive(Clone)]
enum FlightEnd {
    Pass,
    Failed(u16, Option<SharedError>),
    Refused(Outcome),
    /// The fill ended without any answer (it cannot, short of a bug): a follower may lead
    /// the next attempt.
    Vanished,
    /// The key was purged while the fill ran: its answer is the leader's only (it asked
    /// before the purge); a follower, who may have asked after it, starts a new attempt.
    Purged,
}

/// What the fill task hands the caller that started it.
enum Led<T, F: Fill<T>> {
    Value(Arc<Stored<T>>, Outcome),
    /// A value for the leader only: the key was purged while the fill ran.
    Purged(Arc<Stored<T>>, Outcome),
    Own {
        own: F::Own,
        outcome: Outcome,
        followers: FlightEnd,
    },
    Failed(u16),
    Pass(F),
    Refused(Outcome),
}

/// Which lock the fill holds while it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Held {
    Lock,
    /// No lock: the tier is failing (`store == false`), or the wait timed out or the check
    /// timed out (`store == true`: the answer is still offered to the tier, without
    /// overwriting anything newer, which also releases a lock a late check may have taken).
    Nothing {
        store: bool,
    },
}

enum Contend<T> {
    Found(Arc<Stored<T>>, Outcome),
    /// A stale copy inside its stale-while-revalidate window.
    Stale(Arc<Stored<T>>),
    /// A usable stale copy, served because another node's fill passed the soft timeout.
    SoftStale(Arc<Stored<T>>),
    Pass,
    Lead(Held, Generation),
    Refuse(Outcome),
    /// The attempt this caller waited on (on another node) failed with this status.
    Failed(u16),
}

/// L1 entries live until their `stale_until`.
struct EntryExpiry;

impl<T> Expiry<[u8; 32], Arc<Stored<T>>> for EntryExpiry {
    fn expire_after_create(
        &self,
        _: &[u8; 32],
        value: &Arc<Stored<T>>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.meta.time_to_live(now_ms()))
    }

    fn expire_after_update(
        &self,
        _: &[u8; 32],
        value: &Arc<Stored<T>>,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.meta.time_to_live(now_ms()))
    }
}

/// What one node's in-process memory holds, by the weights its bound counts.
///
/// Taken with [`StampedeLayer::memory`](crate::StampedeLayer::memory) or
/// [`Cache::memory`](crate::Cache::memory). Every structure that grows with the number of
/// keys counts toward the capacity; `bytes() <= capacity` always holds once the cache's
/// pending evictions have run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Memory {
    /// Values in L1.
    pub l1_entries: u64,
    /// Their weight: the heap each holds (key, value, tags, the cache's own node).
    pub l1_bytes: u64,
    /// Hit-for-pass, refresh and purge markers, and the HTTP layer's per-URL variant lists.
    pub marker_entries: u64,
    /// Their weight.
    pub marker_bytes: u64,
    /// The bound.
    pub capacity: u64,
}

impl Memory {
    /// Everything counted, in bytes.
    pub fn bytes(&self) -> u64 {
        self.l1_bytes + self.marker_bytes
    }
}

/// One node: its L1, its markers, its tier and its counters. Shared (`Arc`) by every
/// handle of a `Cache` or a layer.
pub(crate) struct Core<T, C> {
    pub(crate) cfg: Config,
    pub(crate) l1: Moka<[u8; 32], Arc<Stored<T>>, PrehashedState>,
    passes: Option<Moka<[u8; 32], (), PrehashedState>>,
    /// Keys this process is refreshing in the background (or just failed to refresh: the
    /// marker then expires on its own, a backoff before the next try).
    refreshing: Moka<[u8; 32], (), PrehashedState>,
    /// When each key was last purged (heard here or done here), as a tick of `order`: a
    /// fill that started before does not share its answer.
    purges: Moka<[u8; 32], u64, PrehashedState>,
    /// This process's order of purge notes and fill starts: a clock of milliseconds would
    /// tie a fill started in the purge's millisecond with it, and drop its answer.
    order: std::sync::atomic::AtomicU64,
    /// The highest purge epoch heard in a wake-up.
    epoch_heard: std::sync::atomic::AtomicU64,
    pub(crate) tier: Tier,
    pub(crate) counters: Counters,
    codec: PhantomData<fn() -> C>,
}

impl<T, C> std::fmt::Debug for Core<T, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("config", &self.cfg)
            .field("tier", &self.tier)
            .finish_non_exhaustive()
    }
}

impl<T, C> Core<T, C>
where
    T: Send + Sync + 'static,
    C: Codec<T>,
{
    pub(crate) fn new(cfg: Config, tier: Tier) -> Arc<Self> {
        // The markers live inside the bound, not beside it: a flood of uncacheable keys
        // must not grow the process past the capacity.
        let markers = cfg.l1_capacity / MARKER_SHARE;
        let side = if cfg.side { markers / 4 } else { 0 };
        let l1 = Moka::builder()
            .max_capacity(cfg.l1_capacity - markers + markers / 4 - side)
            .weigher(|_: &[u8; 32], v: &Arc<Stored<T>>| v.weight)
            .expire_after(EntryExpiry)
            .build_with_hasher(PrehashedState::default());
        let passes = (!cfg.hit_for_pass.is_zero()).then(|| {
            Moka::builder()
                .max_capacity(markers / 2)
                .weigher(|_: &[u8; 32], _: &()| MARKER_WEIGHT)
                .time_to_live(cfg.hit_for_pass)
                .build_with_hasher(PrehashedState::default())
        });
        let purges = Moka::builder()
            .max_capacity(markers / 8)
            .weigher(|_: &[u8; 32], _: &u64| MARKER_WEIGHT)
            .time_to_live(
                cfg.fill_timeout
                    .saturating_mul(2)
                    .max(Duration::from_secs(1)),
            )
            .build_with_hasher(PrehashedState::default());
        let refreshing = Moka::builder()
            .max_capacity(markers / 8)
            .weigher(|_: &[u8; 32], _: &()| MARKER_WEIGHT)
            .time_to_live(Duration::from_secs(1).max(cfg.poll_interval))
            .build_with_hasher(PrehashedState::default());
        let counters = Counters::new(&cfg.name);
        Arc::new(Core {
            cfg,
            l1,
            passes,
            refreshing,
            purges,
            order: std::sync::atomic::AtomicU64::new(0),
            epoch_heard: std::sync::atomic::AtomicU64::new(0),
            tier,
            counters,
            codec: PhantomData,
        })
    }

    /// The largest value of ours the tier may hold for `key`.
    pub(crate) fn max_value(&self, key: &Key) -> usize {
        entry::max_encoded_len(key.canonical.len(), self.cfg.max_payload)
    }

    /// The share of the capacity kept for the caller's own per-key structures (zero unless
    /// `side` is set).
    pub(crate) fn side_capacity(&self) -> u64 {
        if self.cfg.side {
            self.cfg.l1_capacity / MARKER_SHARE / 4
        } else {
            0
        }
    }

    /// What this node's memory holds, after running pending maintenance.
    pub(crate) async fn memory(&self) -> Memory {
        self.memory_with(0, 0).await
    }

    /// What this node's memory holds, with the caller's own per-key structures
    /// (`side_entries` weighing `side_bytes`, inside [`side_capacity`](Self::side_capacity))
    /// counted among the markers.
    pub(crate) async fn memory_with(&self, side_entries: u64, side_bytes: u64) -> Memory {
        self.l1.run_pending_tasks().await;
        self.refreshing.run_pending_tasks().await;
        self.purges.run_pending_tasks().await;
        let mut memory = Memory {
            l1_entries: self.l1.entry_count(),
            l1_bytes: self.l1.weighted_size(),
            marker_entries: self.refreshing.entry_count()
                + self.purges.entry_count()
                + side_entries,
            marker_bytes: self.refreshing.weighted_size()
                + self.purges.weighted_size()
                + side_bytes,
            capacity: self.cfg.l1_capacity,
        };
        if let Some(passes) = &self.passes {
            passes.run_pending_tasks().await;
            memory.marker_entries += passes.entry_count();
            memory.marker_bytes += passes.weighted_size();
        }
        self.counters
            .record_memory(memory.l1_entries, memory.bytes());
        memory
    }

    /// Starts hearing the tier's wake-ups (once).
    pub(crate) fn ensure_subscribed(self: &Arc<Self>) {
        let sink: Arc<dyn WakeSink> = self.clone();
        self.tier.ensure_subscribed(Arc::downgrade(&sink));
    }

    /// An entry in memory of `value` under `key`, whose encoded payload is `payload_len`
    /// bytes.
    pub(crate) fn stored_entry(
        &self,
        key: &Key,
        meta: Meta,
        value: T,
        payload_len: usize,
    ) -> Arc<Stored<T>> {
        // The heap the entry holds: its `Arc` (two counts and the `Stored`), the key, the
        // tags, the value (its encoded length, plus what the codec says its decoded form
        // takes beyond that) and moka's node.
        let weight =
            weight::heap(2 * std::mem::size_of::<usize>() + std::mem::size_of::<Stored<T>>())
                .saturating_add(weight::heap(key.canonical.len()))
                .saturating_add(weight::tags(&meta.tags))
                .saturating_add(payload_len)
                .saturating_add(C::overhead(&value))
                .saturating_add(weight::CACHE_NODE)
                .min(u32::MAX as usize);
        Arc::new(Stored {
            key: key.canonical.clone(),
            meta,
            value,
            weight: weight as u32,
        })
    }

    /// Decodes bytes from the tier: an entry of `key`, its value decoded.
    fn decode(&self, key: &Key, bytes: &Bytes) -> Result<Arc<Stored<T>>, entry::DecodeError> {
        let (meta, payload) = entry::decode(bytes, &key.canonical)?;
        let value = match meta.kind {
            Kind::Value => {
                C::decode(&payload).map_err(|e| entry::DecodeError::Payload(e.to_string()))?
            }
            // A marker has no value; it is never kept as an entry.
            Kind::Pass => return Err(entry::DecodeError::Malformed),
        };
        Ok(self.stored_entry(key, meta, value, payload.len()))
    }

    /// The next tick of this process's order of purge notes and fill starts.
    fn tick(&self) -> u64 {
        self.order
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            .wrapping_add(1)
    }

    /// Whether `hash` was purged after the tick `since` (a fill's start).
    async fn purged_since(&self, hash: &KeyHash, since: u64) -> bool {
        self.purges.get(&hash.0).await.is_some_and(|at| at > since)
    }

    /// Notes a purge of `hash`, heard or done here: its copy leaves L1, and a fill of it
    /// that started before does not share its answer.
    async fn note_purge(&self, hash: &KeyHash) {
        self.purges.insert(hash.0, self.tick()).await;
        self.l1.invalidate(&hash.0).await;
    }

    /// How long a purge's generation outlives the fills it stops: past the fill timeout.
    fn generation_ttl(&self) -> Duration {
        self.cfg
            .fill_timeout
            .saturating_mul(2)
            .max(Duration::from_secs(60))
    }

    /// Purges `key` fleet-wide: from L1 here, from the tier, and (by a small broadcast)
    /// from every node's L1; a fill of it already running does not store.
    pub(crate) async fn purge(&self, key: &Key) -> Result<(), BackendError> {
        self.note_purge(&key.hash).await;
        self.tier.remove(&key.hash, self.generation_ttl()).await
    }

    /// Purges every entry tagged `tag` fleet-wide. Returns how many the tier held.
    pub(crate) async fn purge_tag(&self, tag: &str) -> Result<u64, BackendError> {
        // This node's copies, whether or not it hears the broadcast (the local tier has
        // none).
        let tagged: Vec<[u8; 32]> = self
            .l1
            .iter()
            .filter(|(_, stored)| stored.meta.tags.iter().any(|t| t == tag))
            .map(|(hash, _)| *hash)
            .collect();
        for hash in tagged {
            self.note_purge(&KeyHash(hash)).await;
        }
        // A fill of a key with this tag, running here, does not share its answer.
        let tag_hash = tag_hash(tag);
        self.note_purge(&tag_hash).await;
        self.tier
            .purge_tag(tag, &tag_hash, self.generation_ttl())
            .await
    }

    /// Whether a fill that started at the tick `since` and produced an entry with `tags` was
    /// overtaken by a purge of its key or of one of its tags.
    async fn overtaken(&self, key: &Key, tags: &[String], since: u64) -> bool {
        if self.purged_since(&key.hash, since).await {
            return true;
        }
        for tag in tags {
            if self.purged_since(&tag_hash(tag), since).await {
                return true;
            }
        }
        false
    }

    pub(crate) fn is_pass(&self, hash: &KeyHash) -> bool {
        self.passes
            .as_ref()
            .is_some_and(|p| p.contains_key(&hash.0))
    }

    async fn mark_pass(&self, hash: &KeyHash) {
        if let Some(passes) = &self.passes {
            passes.insert(hash.0, ()).await;
        }
    }

    /// The whole read: L1 first (fresh: answered; in grace: answered stale while one
    /// refresh runs; an early refresh maybe), then a hit-for-pass marker, then the flight.
    pub(crate) async fn get<F: Fill<T>>(self: &Arc<Self>, key: Key, fill: F) -> Flown<T, F> {
        self.get_at(key, fill, now_ms(), Peek::Unread).await
    }

    /// What this process's memory holds for `key` now, read without waiting: the HTTP
    /// hit path answers a fresh copy from it, and a request it does not answer hands it
    /// to [`get_at`](Self::get_at), so that memory is read once per request. Not counted:
    /// whoever acts on it counts.
    pub(crate) fn peek(&self, key: &Key) -> Peek<T> {
        // moka's read completes at once unless it runs its housekeeping and that has to
        // wait: then the read is left to `get_at`'s async path.
        match self.l1.get(&key.hash.0).now_or_never() {
            Some(entry) => Peek::Read(entry),
            None => Peek::Unread,
        }
    }

    /// Whether a hit on a fresh copy has nothing to do beyond being answered: no early
    /// refresh is configured.
    pub(crate) fn hits_are_plain(&self) -> bool {
        self.cfg.early_refresh.is_none()
    }

    /// [`get`](Self::get) as of `now` (Unix milliseconds), the caller's clock reading so
    /// that a hit reads the clock once, and with what the caller's [`peek`](Self::peek)
    /// found in memory, if it looked.
    pub(crate) async fn get_at<F: Fill<T>>(
        self: &Arc<Self>,
        key: Key,
        fill: F,
        now: u64,
        peek: Peek<T>,
    ) -> Flown<T, F> {
        let seen = match peek {
            Peek::Read(seen) => seen,
            Peek::Unread => self.l1.get(&key.hash.0).await,
        };
        let mut fallback = None;
        if let Some(entry) = seen {
            if entry.meta.is_fresh_at(now) {
                self.counters.incr(Event::hits_memory);
                if let Some(beta) = self.cfg.early_refresh {
                    let r = 1.0 - rand::random::<f64>();
                    if entry.meta.refresh_early(now, beta, r) {
                        self.spawn_refresh(Arc::new(key), fill, entry.clone());
                    }
                }
                return Flown::Value(entry, Outcome::HitMemory);
            }
            if entry.meta.is_revalidatable_at(now) {
                self.spawn_refresh(Arc::new(key), fill, entry.clone());
                return Flown::Value(entry, Outcome::Stale);
            }
            // Past the revalidation window: a miss, with this copy kept for stale-if-error.
            // Boxed: moka's invalidation future is large, and a hit should not carry it.
            Box::pin(self.l1.invalidate(&key.hash.0)).await;
            fallback = Some(entry).filter(|e| e.meta.is_usable_at(now));
        }
        if self.is_pass(&key.hash) {
            self.counters.incr(Event::hit_for_pass);
            return Flown::Pass(fill);
        }
        self.counters.incr(Event::misses);
        // The miss path is boxed on its own: its state is large, and a hit should not carry
        // (and move) it.
        Box::pin(self.miss(Arc::new(key), fallback, fill)).await
    }

    /// The miss path: one flight per key in this process, on moka's own coalescing. The
    /// leader's init spawns the fill task; the others wait for its value or its outcome.
    async fn miss<F: Fill<T>>(
        self: &Arc<Self>,
        key: Arc<Key>,
        fallback: Option<Arc<Stored<T>>>,
        fill: F,
    ) -> Flown<T, F> {
        self.ensure_subscribed();
        let mut fill = Some(fill);
        let mut vanished = 0;
        loop {
            let mut led: Option<Led<T, F>> = None;
            let flight = self
                .l1
                .entry(key.hash.0)
                .or_try_insert_with(async {
                    let Some(fill) = fill.take() else {
                        return Err(FlightEnd::Vanished);
                    };
                    let (reply, answer) = oneshot::channel();
                    // Boxed before it is spawned: the task then moves a pointer, not
                    // the flight's state, on its way into the runtime.
                    tokio::spawn(Box::pin(fly(
                        self.clone(),
                        key.clone(),
                        fill,
                        fallback.clone(),
                        reply,
                    )));
                    let Ok(answer) = answer.await else {
                        tracing::error!(key = %key.short(), "fill task ended without an answer");
                        led = Some(Led::Failed(502));
                        return Err(FlightEnd::Vanished);
                    };
                    let result = match &answer {
                        Led::Value(stored, _) => Ok(stored.clone()),
                        Led::Purged(..) => Err(FlightEnd::Purged),
                        Led::Own { followers, .. } => Err(followers.clone()),
                        Led::Failed(status) => Err(FlightEnd::Failed(*status, None)),
                        Led::Pass(_) => Err(FlightEnd::Pass),
                        Led::Refused(outcome) => Err(FlightEnd::Refused(*outcome)),
                    };
                    led = Some(answer);
                    result
                })
                .await;
            match (flight, led) {
                (Ok(_), Some(Led::Value(stored, outcome))) => return Flown::Value(stored, outcome),
                (Err(_), Some(Led::Purged(stored, outcome))) => {
                    return Flown::Value(stored, outcome)
                }
                (Err(_), Some(Led::Own { own, outcome, .. })) => return Flown::Own(own, outcome),
                (Err(_), Some(Led::Failed(status))) => {
                    return Flown::Failed(status, Outcome::FillFailed, None)
                }
                (Err(_), Some(Led::Pass(fill))) => return Flown::Pass(fill),
                (Err(_), Some(Led::Refused(outcome))) => return Flown::Refused(outcome),
                (Ok(entry), _) => {
                    let stored = entry.into_value();
                    let now = now_ms();
                    let outcome = if stored.meta.is_fresh_at(now) {
                        self.counters.incr(Event::collapsed_local);
                        Outcome::Collapsed
                    } else if stored.meta.is_revalidatable_at(now) {
                        Outcome::Stale
                    } else {
                        Outcome::StaleIfError
                    };
                    return Flown::Value(stored, outcome);
                }
                (Err(end), _) => match (*end).clone() {
                    FlightEnd::Pass => {
                        self.counters.incr(Event::hit_for_pass);
                        if let Some(fill) = fill.take() {
                            return Flown::Pass(fill);
                        }
                        return Flown::Failed(502, Outcome::FillFailed, None);
                    }
                    FlightEnd::Failed(status, shared) => {
                        return Flown::Failed(status, Outcome::FillFailed, shared)
                    }
                    FlightEnd::Refused(outcome) => return Flown::Refused(outcome),
                    FlightEnd::Vanished | FlightEnd::Purged => {
                        vanished += 1;
                        if vanished > self.cfg.max_takeovers || fill.is_none() {
                            return Flown::Failed(502, Outcome::FillFailed, None);
                        }
                    }
                },
            }
        }
    }

    /// Refreshes `current` in the background, at most once at a time per key in this
    /// process and, through the lock, once in the fleet. Used by stale-while-revalidate and
    /// by early refresh; the caller that triggered it has been answered already.
    pub(crate) fn spawn_refresh<F: Fill<T>>(
        self: &Arc<Self>,
        key: Arc<Key>,
        fill: F,
        current: Arc<Stored<T>>,
    ) {
        if self.refreshing.contains_key(&key.hash.0) {
            return;
        }
        // The refresh may land on another node: hear about it.
        self.ensure_subscribed();
        let core = self.clone();
        tokio::spawn(async move {
            if !core
                .refreshing
                .entry(key.hash.0)
                .or_insert(())
                .await
                .is_fresh()
            {
                return;
            }
            if core.refresh(&key, fill, &current).await {
                core.refreshing.invalidate(&key.hash.0).await;
            }
            // Otherwise the marker stays until it expires or a wake-up for the key arrives:
            // a failing fill is retried after a pause, not on every request.
        });
    }

    /// Returns true when the key needs no further refresh for now.
    async fn refresh<F: Fill<T>>(&self, key: &Key, fill: F, current: &Arc<Stored<T>>) -> bool {
        let token = new_token();
        // Another node may have refreshed already: adopt its newer value.
        let mut skip_value = false;
        let (held, generation) = loop {
            let opts = CheckOpts {
                lease: self.cfg.lease,
                skip_value,
                max_value: self.max_value(key),
                waited_on: None,
            };
            match self.tier.check_and_lock(&key.hash, &token, opts).await {
                Ok(Check::Value(bytes)) => {
                    if let Ok(stored) = self.decode(key, &bytes) {
                        if stored.meta.stored_at > current.meta.stored_at
                            && stored.meta.is_fresh_at(now_ms())
                        {
                            self.l1.insert(key.hash.0, stored).await;
                            return true;
                        }
                    }
                    if skip_value {
                        return false;
                    }
                    skip_value = true;
                }
                Ok(Check::Locked(generation)) => {
                    self.counters.incr(Event::lock_acquired);
                    break (Held::Lock, generation);
                }
                Ok(Check::Held { .. }) | Ok(Check::Failed(_)) => return false,
                Err(e) => {
                    self.counters.incr(Event::redis_errors);
                    tracing::debug!(key = %key.short(), error = %e, "tier unavailable for a refresh");
                    match self.cfg.on_redis_error {
                        FailurePolicy::Open => {
                            break (Held::Nothing { store: false }, Generation::Unknown)
                        }
                        FailurePolicy::Closed => return false,
                    }
                }
            }
        };
        self.counters.incr(Event::refreshes);
        let (filled, lost, fill_ms) = self
            .lead(key, &token, held, fill, Some(current.clone()))
            .await;
        match filled {
            Filled::Store {
                value,
                windows,
                tags,
                error: false,
            } => {
                match self.store(key, value, windows, tags, fill_ms) {
                    Some((stored, bytes)) => {
                        self.l1.insert(key.hash.0, stored.clone()).await;
                        // Counted once in place: whoever sees the count finds the value.
                        self.counters.incr(Event::stored);
                        let ttl = stored.meta.time_to_live(now_ms());
                        self.finish(
                            key,
                            &token,
                            (held, &generation),
                            lost,
                            Some((&bytes, ttl, &stored.meta.tags)),
                        )
                        .await;
                    }
                    None => {
                        self.finish(key, &token, (held, &generation), lost, None)
                            .await
                    }
                }
                true
            }
            Filled::Pass { reason, .. } => {
                // The value became unstorable: drop the copy; the next caller learns why.
                tracing::debug!(key = %key.short(), reason, "refreshed answer not storable; dropping the copy");
                self.finish(key, &token, (held, &generation), lost, None)
                    .await;
                self.l1.invalidate(&key.hash.0).await;
                true
            }
            Filled::Store { error: true, .. } | Filled::Failed { .. } => {
                // Keep the copy we have; try again after the back-off.
                self.counters.incr(Event::upstream_failures);
                self.finish(key, &token, (held, &generation), lost, None)
                    .await;
                false
            }
        }
    }

    /// Encodes a filled value; `None` (logged) when its codec refuses it: it is then
    /// answered but not shared.
    fn store(
        &self,
        key: &Key,
        value: T,
        windows: Windows,
        tags: Vec<String>,
        fill_ms: u32,
    ) -> Option<(Arc<Stored<T>>, Vec<u8>)> {
        let meta = Meta::value(now_ms(), windows, fill_ms, tags);
        match C::encode(&value) {
            Ok(payload) => {
                let bytes = entry::encode(&key.canonical, &meta, &payload);
                Some((self.stored_entry(key, meta, value, payload.len()), bytes))
            }
            Err(e) => {
                tracing::warn!(key = %key.short(), error = %e, "value does not encode; not stored");
                None
            }
        }
    }

    /// Runs the fill under the lock held: counts it, times it, guards it.
    async fn lead<F: Fill<T>>(
        &self,
        key: &Key,
        token: &str,
        held: Held,
        fill: F,
        stale: Option<Arc<Stored<T>>>,
    ) -> (Filled<T, F::Own>, bool, u32) {
        self.counters.incr(Event::upstream_calls);
        let _timer = FillTimer::start(&self.counters);
        let started = Instant::now();
        let (filled, lost) = self.guarded(key, token, held, fill.run(stale)).await;
        let fill_ms = started.elapsed().as_millis().min(u32::MAX as u128) as u32;
        (filled, lost, fill_ms)
    }

    /// Runs the fill under the fill timeout, catching panics, and extends the lease every
    /// third of it. Returns the result and whether the lease was lost.
    async fn guarded<O>(
        &self,
        key: &Key,
        token: &str,
        held: Held,
        call: impl std::future::Future<Output = Filled<T, O>>,
    ) -> (Filled<T, O>, bool) {
        let call = AssertUnwindSafe(call).catch_unwind();
        tokio::pin!(call);
        let deadline = tokio::time::sleep(self.cfg.fill_timeout);
        tokio::pin!(deadline);
        let period = (self.cfg.lease / 3).max(Duration::from_millis(1));
        let mut tick = tokio::time::interval_at(Instant::now() + period, period);
        let extending = held == Held::Lock;
        let mut lost = false;
        loop {
            tokio::select! {
                out = &mut call => {
                    let filled = out.unwrap_or_else(|_| {
                        tracing::error!(key = %key.short(), "the fill panicked");
                        Filled::Failed { own: None, status: 502 }
                    });
                    return (filled, lost);
                }
                _ = &mut deadline => {
                    tracing::warn!(key = %key.short(), timeout = ?self.cfg.fill_timeout, "the fill timed out");
                    return (Filled::Failed { own: None, status: 504 }, lost);
                }
                _ = tick.tick(), if extending && !lost => {
                    let kept = match self.tier.extend(&key.hash, token, self.cfg.lease).await {
                        Ok(kept) => kept,
                        Err(e) => {
                            self.counters.incr(Event::redis_errors);
                            tracing::debug!(error = %e, "lease extension failed; retrying next tick");
                            true
                        }
                    };
                    if !kept {
                        lost = true;
                        self.counters.incr(Event::lock_lost);
                        tracing::warn!(key = %key.short(), "lock lost while the fill ran");
                    }
                }
            }
        }
    }

    /// Waits for the key in the tier: a value, the lock, or a policy decision.
    async fn contend(
        &self,
        key: &Key,
        token: &str,
        fallback: &mut Option<Arc<Stored<T>>>,
    ) -> Contend<T> {
        let cfg = &self.cfg;
        let started = Instant::now();
        let waiting = self.tier.wakers().register(key.hash.0);
        let mut wait = LockWait::new(&self.counters);
        let mut waited = false;
        let mut skip_value = false;
        // The holder token last seen on the lock, and since when.
        let mut holder_seen: Option<(Bytes, Instant)> = None;
        loop {
            let notified = waiting.notify().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Another fill of this process (a refresh) may have landed meanwhile; with the
            // local tier this is the only place a value can appear.
            if let Some(stored) = self.l1.get(&key.hash.0).await {
                let now = now_ms();
                if stored.meta.is_fresh_at(now) {
                    self.counters.incr(Event::collapsed_local);
                    return Contend::Found(stored, Outcome::Collapsed);
                }
                if stored.meta.is_revalidatable_at(now) {
                    return Contend::Stale(stored);
                }
            }
            let opts = CheckOpts {
                lease: cfg.lease,
                skip_value,
                max_value: self.max_value(key),
                waited_on: holder_seen.as_ref().map(|(t, _)| &t[..]),
            };
            match self.tier.check_and_lock(&key.hash, token, opts).await {
                Ok(Check::Value(bytes)) => match self.judge(&bytes, key, waited, fallback) {
                    Some(decided) => return decided,
                    None => skip_value = true,
                },
                Ok(Check::Locked(generation)) => {
                    self.counters.incr(Event::lock_acquired);
                    return Contend::Lead(Held::Lock, generation);
                }
                Ok(Check::Failed(status)) => return Contend::Failed(status),
                Ok(Check::Held {
                    token: holder,
                    left,
                }) => {
                    skip_value = false;
                    if !waited {
                        waited = true;
                        self.counters.incr(Event::lock_waited);
                        wait.waiting();
                    }
                    let elapsed = started.elapsed();
                    if elapsed >= cfg.lock_wait {
                        self.counters.incr(Event::lock_timed_out);
                        return match cfg.on_lock_timeout {
                            FailurePolicy::Open => {
                                Contend::Lead(Held::Nothing { store: true }, Generation::Unknown)
                            }
                            FailurePolicy::Closed => Contend::Refuse(Outcome::LockTimeout),
                        };
                    }
                    // Another node's fill is slow and a usable stale copy is at hand: the
                    // soft timeout answers from it (that fill stores when it lands).
                    if let Some(soft) = cfg.soft_timeout {
                        let usable = fallback.as_ref().filter(|f| f.meta.is_usable_at(now_ms()));
                        if let Some(stale) = usable {
                            if elapsed >= soft {
                                self.counters.incr(Event::stale_served);
                                return Contend::SoftStale(stale.clone());
                            }
                        }
                    }
                    let since = match &holder_seen {
                        Some((seen, since)) if *seen == holder => *since,
                        _ => holder_seen.insert((holder.clone(), Instant::now())).1,
                    };
                    // Our holders extend to the lease every third of it: a lock without
                    // expiry or with a longer TTL is none of theirs. Once this waiter has
                    // seen the same holder for a lease, it takes the lock over and leads.
                    let foreign = left.is_none_or(|left| left > cfg.lease);
                    if foreign && since.elapsed() >= cfg.lease {
                        match self
                            .tier
                            .takeover(&key.hash, &holder, token, cfg.lease)
                            .await
                        {
                            Ok(true) => {
                                tracing::warn!(key = %key.short(), "took over a lock without a sane expiry");
                                self.counters.incr(Event::lock_acquired);
                                return Contend::Lead(Held::Lock, Generation::Unknown);
                            }
                            // The lock changed meanwhile: look again.
                            Ok(false) => {
                                holder_seen = None;
                                continue;
                            }
                            Err(e) => return self.tier_failed(key, e),
                        }
                    }
                    // Never a tight loop, whatever the lock's TTL says. With the key's
                    // subscription confirmed the wake-up will come, and the poll is only
                    // the safety net: it runs CONFIRMED_POLL times less often (and still
                    // right after the lock's TTL, for a holder that died).
                    let left = left.unwrap_or(Duration::MAX);
                    let every = if waiting.confirmed() {
                        cfg.poll_interval.saturating_mul(CONFIRMED_POLL)
                    } else {
                        cfg.poll_interval
                    };
                    let mut pause = jittered(every, every / 2)
                        .min(left.saturating_add(Duration::from_millis(1)))
                        .max(cfg.poll_interval / 2)
                        .min(cfg.lock_wait - elapsed);
                    if let (Some(soft), Some(_)) = (cfg.soft_timeout, fallback.as_ref()) {
                        let left = soft.saturating_sub(elapsed).max(Duration::from_millis(1));
                        pause = pause.min(left);
                    }
                    let woken = tokio::select! {
                        _ = &mut notified => true,
                        _ = tokio::time::sleep(pause) => false,
                    };
                    if !woken {
                        self.counters.incr(Event::lock_polls);
                    }
                    // A wake-up that carries the value saves the read; one that says the
                    // attempt failed is that attempt's answer for this caller too.
                    match woken.then(|| waiting.last()).flatten() {
                        Some(Wake::Failed(status)) => return Contend::Failed(status),
                        Some(Wake::Value(bytes)) => {
                            if let Some(decided) = self.judge(&bytes, key, true, fallback) {
                                return decided;
                            }
                        }
                        _ => {}
                    }
                }
                Err(e) => return self.tier_failed(key, e),
            }
        }
    }

    /// What a fill does when the tier fails under it: the error policy.
    fn tier_failed(&self, key: &Key, e: BackendError) -> Contend<T> {
        self.counters.incr(Event::redis_errors);
        tracing::debug!(key = %key.short(), error = %e, "tier unavailable for the fill");
        // A check that timed out may still run later and take the lock: offer the answer,
        // which releases that lock too (same connection, so after it).
        let store = is_timeout(&e);
        match self.cfg.on_redis_error {
            FailurePolicy::Open => Contend::Lead(Held::Nothing { store }, Generation::Unknown),
            FailurePolicy::Closed => Contend::Refuse(Outcome::TierUnavailable),
        }
    }

    /// What stored bytes mean for a fill: `None` when they are unusable (corrupt, foreign,
    /// expired): a miss. A usable-on-error copy is kept as the fallback.
    fn judge(
        &self,
        bytes: &Bytes,
        key: &Key,
        waited: bool,
        fallback: &mut Option<Arc<Stored<T>>>,
    ) -> Option<Contend<T>> {
        let now = now_ms();
        // A hit-for-pass marker: read its meta only.
        if let Ok((meta, _)) = entry::decode(bytes, &key.canonical) {
            if meta.kind == Kind::Pass {
                return meta.is_fresh_at(now).then_some(Contend::Pass);
            }
        }
        let stored = match self.decode(key, bytes) {
            Ok(stored) => stored,
            Err(e) => {
                tracing::debug!(key = %key.short(), error = %e, "unusable bytes in the tier; treating as a miss");
                return None;
            }
        };
        if stored.meta.is_fresh_at(now) {
            let outcome = if waited {
                self.counters.incr(Event::collapsed_remote);
                Outcome::CollapsedFleet
            } else {
                self.counters.incr(Event::hits_redis);
                Outcome::HitTier
            };
            return Some(Contend::Found(stored, outcome));
        }
        if stored.meta.is_revalidatable_at(now) {
            return Some(Contend::Stale(stored));
        }
        if stored.meta.is_usable_at(now)
            && fallback
                .as_ref()
                .is_none_or(|f| f.meta.stored_at < stored.meta.stored_at)
        {
            *fallback = Some(stored);
        }
        None
    }

    /// Stores (if there is something to store), releases and wakes the waiters.
    async fn finish(
        &self,
        key: &Key,
        token: &str,
        (held, generation): (Held, &Generation),
        lost: bool,
        store: Option<(&[u8], Duration, &[String])>,
    ) {
        if held == (Held::Nothing { store: false }) {
            return;
        }
        let result = match store {
            Some((bytes, ttl, tags)) => {
                self.tier
                    .store_release(&key.hash, token, bytes, ttl, generation, tags)
                    .await
            }
            None => self.tier.release(&key.hash, token).await,
        };
        match result {
            Ok(false) if held == Held::Lock && !lost => {
                self.counters.incr(Event::lock_lost);
                tracing::warn!(key = %key.short(), "lock had expired when the fill finished");
            }
            Ok(_) => {}
            Err(e) => {
                self.counters.incr(Event::redis_errors);
                tracing::debug!(key = %key.short(), error = %e, "store/release failed; the lease will expire");
            }
        }
    }

    /// Ends a failed fill: the lock is released and the fleet's waiters are told, by the
    /// wake-up and by a failure marker that outlives it briefly (for waiters whose wake-up
    /// was lost), that this attempt failed; they answer with its outcome instead of
    /// retrying.
    async fn fail(&self, key: &Key, token: &str, held: Held, status: u16) {
        match held {
            Held::Lock => {
                let marker_ttl = self.cfg.fill_timeout.min(FAILURE_MARKER_MAX);
                if let Err(e) = self
                    .tier
                    .fail_release(&key.hash, token, status, marker_ttl)
                    .await
                {
                    self.counters.incr(Event::redis_errors);
                    tracing::debug!(key = %key.short(), error = %e, "failure release failed; the lease will expire");
                }
            }
            Held::Nothing { store: true } => {
                self.finish(key, token, (held, &Generation::Unknown), false, None)
                    .await
            }
            Held::Nothing { store: false } => {}
        }
    }
}

fn is_timeout(e: &BackendError) -> bool {
    #[cfg(feature = "redis")]
    {
        e.is_timeout()
    }
    #[cfg(not(feature = "redis"))]
    {
        match *e {}
    }
}

/// Hands the fill's result to the caller that started it. The value goes into L1 here
/// only when that caller has gone away: otherwise moka's flight inserts it.
async fn hand<T, C, F>(
    core: &Core<T, C>,
    key: &Key,
    reply: &mut Option<oneshot::Sender<Led<T, F>>>,
    led: Led<T, F>,
) where
    T: Send + Sync + 'static,
    C: Codec<T>,
    F: Fill<T>,
{
    // Answered already (a soft timeout served the stale copy): the value lands in L1.
    let unsent = match reply.take() {
        Some(reply) => reply.send(led).err(),
        None => Some(led),
    };
    if let Some(Led::Value(stored, _)) = unsent {
        core.l1.insert(key.hash.0, stored).await;
    }
}

/// The stale copy kept for a flight, if it may still be served now.
fn usable<T>(fallback: Option<Arc<Stored<T>>>) -> Option<Arc<Stored<T>>> {
    fallback.filter(|f| f.meta.is_usable_at(now_ms()))
}

/// The fill of one key, in a task of its own: its result goes to `reply` as soon as it is
/// known, and the tier write (store, release, wake-up) follows, off the answer's path.
async fn fly<T, C, F>(
    core: Arc<Core<T, C>>,
    key: Arc<Key>,
    fill: F,
    mut fallback: Option<Arc<Stored<T>>>,
    reply: oneshot::Sender<Led<T, F>>,
) where
    T: Send + Sync + 'static,
    C: Codec<T>,
    F: Fill<T>,
{
    let reply = &mut Some(reply);
    let token = new_token();
    let (held, generation) = match core.contend(&key, &token, &mut fallback).await {
        Contend::Found(stored, outcome) => {
            return hand(&core, &key, reply, Led::Value(stored, outcome)).await
        }
        Contend::Stale(stored) => {
            core.spawn_refresh(key.clone(), fill, stored.clone());
            return hand(&core, &key, reply, Led::Value(stored, Outcome::Stale)).await;
        }
        Contend::SoftStale(stored) => {
            let led = Led::Value(stored, Outcome::StaleSoftTimeout);
            return hand(&core, &key, reply, led).await;
        }
        Contend::Pass => {
            core.mark_pass(&key.hash).await;
            return hand(&core, &key, reply, Led::Pass(fill)).await;
        }
        Contend::Refuse(outcome) => return hand(&core, &key, reply, Led::Refused(outcome)).await,
        Contend::Failed(status) => {
            core.counters.incr(Event::upstream_failures);
            let led = match usable(fallback) {
                Some(stale) => Led::Value(stale, Outcome::StaleIfError),
                None => Led::Failed(status),
            };
            return hand(&core, &key, reply, led).await;
        }
        Contend::Lead(held, generation) => (held, generation),
    };
    // Boxed: the fill's state is large, and a flight that ends at the check (an L2 hit, a
    // key another node fills) should not carry it, nor move it into its task.
    Box::pin(fly_led(
        core,
        key,
        token,
        (held, generation),
        fill,
        fallback,
        reply,
    ))
    .await;
}

/// The rest of [`fly`] once the check made this flight the leader, holding the lock or not
/// (`held`): the fill, then the answer to `reply` and the tier write.
async fn fly_led<T, C, F>(
    core: Arc<Core<T, C>>,
    key: Arc<Key>,
    token: String,
    (held, generation): (Held, Generation),
    fill: F,
    fallback: Option<Arc<Stored<T>>>,
    reply: &mut Option<oneshot::Sender<Led<T, F>>>,
) where
    T: Send + Sync + 'static,
    C: Codec<T>,
    F: Fill<T>,
{
    let started = core.tick();
    let lead = core.lead(&key, &token, held, fill, fallback.clone());
    tokio::pin!(lead);
    let soft = core.cfg.soft_timeout.zip(usable(fallback.clone()));
    let (filled, lost, fill_ms) = match soft {
        // A slow fill with a usable stale copy: its callers get the copy now, and the fill
        // goes on, under its lock and the hard timeout, storing when it lands.
        Some((soft, stale)) => tokio::select! {
            out = &mut lead => out,
            _ = tokio::time::sleep(soft) => {
                core.counters.incr(Event::stale_served);
                hand(&core, &key, reply, Led::Value(stale, Outcome::StaleSoftTimeout)).await;
                lead.await
            }
        },
        None => lead.await,
    };
    match filled {
        Filled::Store {
            value,
            windows,
            tags,
            error,
        } => {
            // Purged while the fill ran (the key, or one of its tags): its answer is not
            // shared, and not stored.
            let purged = core.overtaken(&key, &tags, started).await;
            if error {
                core.counters.incr(Event::upstream_failures);
                if let Some(stale) = usable(fallback.clone()) {
                    hand(&core, &key, reply, Led::Value(stale, Outcome::StaleIfError)).await;
                    return core.fail(&key, &token, held, 502).await;
                }
            }
            match core.store(&key, value, windows, tags, fill_ms) {
                Some((stored, _)) if purged => {
                    hand(&core, &key, reply, Led::Purged(stored, Outcome::Stored)).await;
                    core.finish(&key, &token, (held, &generation), lost, None)
                        .await;
                }
                Some((stored, bytes)) => {
                    hand(
                        &core,
                        &key,
                        reply,
                        Led::Value(stored.clone(), Outcome::Stored),
                    )
                    .await;
                    core.counters.incr(Event::stored);
                    let ttl = stored.meta.time_to_live(now_ms());
                    core.finish(
                        &key,
                        &token,
                        (held, &generation),
                        lost,
                        Some((&bytes, ttl, &stored.meta.tags)),
                    )
                    .await;
                }
                None => {
                    core.finish(&key, &token, (held, &generation), lost, None)
                        .await;
                    hand(&core, &key, reply, Led::Failed(502)).await;
                }
            }
        }
        Filled::Pass { own, reason } => {
            tracing::debug!(key = %key.short(), reason, "answer not stored; hit-for-pass");
            core.counters.incr(Event::uncacheable);
            core.mark_pass(&key.hash).await;
            let led = Led::Own {
                own,
                outcome: Outcome::Uncacheable,
                followers: FlightEnd::Pass,
            };
            hand(&core, &key, reply, led).await;
            let marker = (!core.cfg.hit_for_pass.is_zero()).then(|| {
                let meta = Meta::pass(now_ms(), core.cfg.hit_for_pass, fill_ms);
                entry::encode(&key.canonical, &meta, &[])
            });
            let marker = marker
                .as_deref()
                .map(|m| (m, core.cfg.hit_for_pass, &[][..]));
            core.finish(&key, &token, (held, &generation), lost, marker)
                .await;
        }
        Filled::Failed { own, status } => {
            core.counters.incr(Event::upstream_failures);
            let led = match (status >= 500).then(|| usable(fallback)).flatten() {
                Some(stale) => Led::Value(stale, Outcome::StaleIfError),
                None => match own {
                    Some(own) => Led::Own {
                        followers: FlightEnd::Failed(status, F::share(&own)),
                        own,
                        outcome: if is_shared_error(status) {
                            Outcome::Uncacheable
                        } else {
                            Outcome::FillFailed
                        },
                    },
                    None => Led::Failed(status),
                },
            };
            // This process's followers share the outcome through the flight; the fleet's
            // waiters through the wake-up and a short failure marker, so that nobody
            // starts a second attempt on behalf of this one. Released first: the next
            // caller, from anywhere, starts a fresh attempt.
            core.fail(&key, &token, held, status).await;
            hand(&core, &key, reply, led).await;
        }
    }
}

impl<T, C> WakeSink for Core<T, C>
where
    T: Send + Sync + 'static,
    C: Codec<T>,
{
    fn heard(&self) {
        self.counters.incr(Event::wakeups);
    }

    fn check_purges(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            use std::sync::atomic::Ordering;
            let Some(epoch) = self.tier.epoch().await.ok() else {
                return;
            };
            let heard = self.epoch_heard.load(Ordering::Acquire);
            if epoch > heard {
                // Purges this node did not hear: it cannot tell which, so its copies go.
                tracing::info!(
                    epoch,
                    heard,
                    "purges missed while unsubscribed; dropping this node's copies"
                );
                self.l1.invalidate_all();
                self.epoch_heard.fetch_max(epoch, Ordering::AcqRel);
            }
        })
    }

    /// Another fill of this key finished somewhere: wake this process's waiters, and
    /// replace a stale L1 copy with the value the wake-up carried (or drop it, so the next
    /// caller reads the new value from the tier).
    fn on_wake(
        &self,
        hash: [u8; 32],
        wake: Wake,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            self.tier.wakers().wake(&hash, wake.clone());
            match wake {
                // An attempt failed: its waiters have their answer, and a stale copy stays
                // for stale-if-error.
                Wake::Failed(_) => return,
                Wake::Invalidated(epoch) => {
                    if let Some(epoch) = epoch {
                        self.epoch_heard
                            .fetch_max(epoch, std::sync::atomic::Ordering::AcqRel);
                    }
                    self.note_purge(&KeyHash(hash)).await;
                    return;
                }
                Wake::Ended | Wake::Value(_) => {}
            }
            if let Some(stale) = self
                .l1
                .get(&hash)
                .await
                .filter(|e| !e.meta.is_fresh_at(now_ms()))
            {
                let landed = match wake {
                    Wake::Value(bytes) => {
                        let key = Key {
                            canonical: stale.key.clone(),
                            hash: KeyHash(hash),
                        };
                        self.decode(&key, &bytes)
                            .ok()
                            .filter(|e| e.meta.is_fresh_at(now_ms()))
                    }
                    _ => None,
                };
                match landed {
                    Some(stored) => self.l1.insert(hash, stored).await,
                    None => self.l1.invalidate(&hash).await,
                }
            }
            self.refreshing.invalidate(&hash).await;
        })
    }
}
