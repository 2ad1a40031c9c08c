//! Wake-ups: the waiters of this process by key, and (with Redis) one supervised pub/sub
//! connection per node whose messages are dispatched to them.
//!
//! A key's wake-ups go out on a channel of its own, `prefix:{hash}:wake` (the hash tag of
//! its value and lock: one Cluster slot). A node subscribes to it only while it has a
//! waiter on the key (from the first check that finds the lock held by another node until
//! its last waiter leaves), all such subscriptions multiplexed on the node's one pub/sub
//! connection; right after a subscription is confirmed its waiters re-check the tier, so
//! that a fill that landed in between is not missed. The bytes Redis sends per fill thus
//! grow with the nodes that wait on that key, not with the fleet. One broadcast channel,
//! `prefix:ready`, carries the small invalidations (`!X`) every node must hear, never a
//! value.
//!
//! A message is the key hash in 64 hex digits, then a tail: nothing (the fill ended, read
//! the tier), a stored envelope (`TSE...`, at most [`INLINE_MAX`] bytes: waiters need no
//! read), `!F` and a status (the attempt failed: that is the waiters' answer), or `!X` (the
//! key was invalidated: drop any copy in memory).

use std::collections::HashMap;
#[cfg(feature = "redis")]
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
#[cfg(feature = "redis")]
use std::sync::Weak;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
#[cfg(feature = "redis")]
use futures_util::{FutureExt, StreamExt};
#[cfg(feature = "redis")]
use tokio::sync::oneshot;
use tokio::sync::Notify;

#[cfg(feature = "redis")]
use super::jittered;
use super::{parse_hex, PrehashedState};

/// The largest stored value carried inside its wake-up message, so that waiters on other
/// nodes need no second round trip to read it.
pub(crate) const INLINE_MAX: usize = 32 * 1024;

/// What follows the key hash in the wake-up of a failed attempt: `!F` and the status the
/// attempt's waiters answer with. Stored envelopes start with `TSE`, so the two cannot be
/// confused.
const FAILURE_TAG: &[u8; 2] = b"!F";

/// The tail of an invalidation.
pub(crate) const INVALIDATED: &[u8; 2] = b"!X";

/// The longest a failure marker stays in the tier: it is there for the waiters of the
/// attempt that failed, whose wake-up was lost, never for the requests after them.
pub(crate) const FAILURE_MARKER_MAX: Duration = Duration::from_secs(5);

/// The tail of a failed attempt's wake-up message (and the failure marker's value).
pub(crate) fn failure_tail(status: u16) -> Vec<u8> {
    let mut tail = FAILURE_TAG.to_vec();
    tail.extend_from_slice(format!("{:03}", status.min(999)).as_bytes());
    tail
}

/// The status a wake-up's tail (or a failure marker) says the attempt failed with.
pub(crate) fn failure_status(tail: &[u8]) -> Option<u16> {
    let code = tail.strip_prefix(FAILURE_TAG)?.get(..3)?;
    let status: u16 = std::str::from_utf8(code).ok()?.parse().ok()?;
    // Only error statuses: nothing from outside can make a waiter answer a success.
    is_shared_error(status).then_some(status)
}

/// Statuses that end an attempt as a failure shared with its waiters: 5xx and 429.
pub(crate) fn is_shared_error(status: u16) -> bool {
    (500..=599).contains(&status) || status == 429
}

/// What a wake-up said about its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Wake {
    /// The fill ended: read the tier.
    Ended,
    /// The fill stored these bytes.
    Value(Bytes),
    /// The attempt failed with this status.
    Failed(u16),
    /// The key was purged, as the purge epoch's `n`th purge (when the message says).
    Invalidated(Option<u64>),
}

impl Wake {
    pub(crate) fn of_tail(tail: &[u8]) -> Wake {
        if tail.is_empty() || tail.len() > INLINE_MAX {
            return Wake::Ended;
        }
        if let Some(epoch) = tail.strip_prefix(INVALIDATED) {
            let epoch = std::str::from_utf8(epoch).ok().and_then(|e| e.parse().ok());
            return Wake::Invalidated(epoch);
        }
        match failure_status(tail) {
            Some(status) => Wake::Failed(status),
            None if tail.starts_with(FAILURE_TAG) => Wake::Ended,
            None => Wake::Value(Bytes::copy_from_slice(tail)),
        }
    }
}

/// Who hears the wake-ups of a tier: the cache above it.
pub(crate) trait WakeSink: Send + Sync {
    /// A wake-up message arrived (counted).
    fn heard(&self);
    /// Compares the tier's purge epoch with the highest one heard in a wake-up: past it,
    /// purges were missed (the subscription was down), and what may be stale is dropped.
    fn check_purges(&self) -> Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>>;
    /// `hash` woke with `wake`; the waiters of this process are woken already.
    fn on_wake(
        &self,
        hash: [u8; 32],
        wake: Wake,
    ) -> Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>>;
}

/// The fills of this process that wait on some key, by key hash, and which of those keys
/// want a subscription to their wake-up channel.
#[derive(Debug, Default)]
pub(crate) struct Wakers {
    map: Mutex<HashMap<[u8; 32], Arc<Slot>, PrehashedState>>,
    /// Keys whose subscription may have to change, for the subscription task.
    dirty: Mutex<Vec<[u8; 32]>>,
    /// Signalled when `dirty` grew.
    changed: Notify,
    /// Keys wanted for a while with nobody registered on them (a background refresh found
    /// the lock held elsewhere: the other fill's wake-up replaces the stale copy), until
    /// the first wake-up of the key or the deadline.
    timed: Mutex<HashMap<[u8; 32], Instant, PrehashedState>>,
}

#[derive(Debug, Default)]
struct Slot {
    notify: Notify,
    /// What the last wake-up said, and its number (the slot's wake-ups counted from 1),
    /// so that a waiter takes only the wake-ups that came while it waited.
    last: Mutex<Option<(u64, Wake)>>,
    /// A waiter found the lock held elsewhere: the key's channel is wanted.
    wanted: AtomicBool,
    /// The subscription to the key's channel is confirmed and its connection up: the
    /// key's wake-up will be heard, so its waiters may poll the tier less often.
    confirmed: AtomicBool,
}

impl Slot {
    /// No longer confirmed: the waiters, if they relied on it, look at the tier now and
    /// poll at the usual pace again.
    fn unconfirm(&self) {
        if self.confirmed.swap(false, Ordering::AcqRel) {
            self.notify.notify_waiters();
        }
    }
}

/// A registration; dropping it unregisters.
pub(crate) struct Waiting {
    wakers: Arc<Wakers>,
    hash: [u8; 32],
    slot: Arc<Slot>,
    /// The number of the last wake-up this waiter has seen (or that came before it).
    seen: AtomicU64,
}

impl Waiting {
    pub(crate) fn notify(&self) -> &Notify {
        &self.slot.notify
    }

    /// Whether the key's wake-up will be heard: its subscription is confirmed, on a
    /// connection that has not been lost since.
    pub(crate) fn confirmed(&self) -> bool {
        self.slot.confirmed.load(Ordering::Acquire)
    }

    /// What the last wake-up said, if one came since this waiter registered and since
    /// the last call: an earlier attempt's failure is not this waiter's answer, and a
    /// nudge without a message (a subscription confirmed or lost) reads as none.
    pub(crate) fn last(&self) -> Option<Wake> {
        let last = self.slot.last.lock().unwrap_or_else(|e| e.into_inner());
        match &*last {
            Some((n, wake)) if *n > self.seen.load(Ordering::Relaxed) => {
                self.seen.store(*n, Ordering::Relaxed);
                Some(wake.clone())
            }
            _ => None,
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut map = self.wakers.map.lock().unwrap_or_else(|e| e.into_inner());
        // The map's reference and ours: nobody else waits on this key.
        if Arc::strong_count(&self.slot) <= 2 {
            map.remove(&self.hash);
            if self.slot.wanted.load(Ordering::Acquire) {
                drop(map);
                self.wakers.mark(self.hash);
            }
        }
    }
}

impl Wakers {
    pub(crate) fn register(self: &Arc<Self>, hash: [u8; 32]) -> Waiting {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let slot = map.entry(hash).or_default().clone();
        let seen = slot
            .last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or(0, |(n, _)| *n);
        Waiting {
            wakers: self.clone(),
            hash,
            slot,
            seen: AtomicU64::new(seen),
        }
    }

    pub(crate) fn wake(&self, hash: &[u8; 32], wake: Wake) {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = map.get(hash) {
            let mut last = slot.last.lock().unwrap_or_else(|e| e.into_inner());
            let n = last.as_ref().map_or(1, |(n, _)| n + 1);
            *last = Some((n, wake));
            drop(last);
            slot.notify.notify_waiters();
        }
    }

    /// The subscription to `hash`'s channel is confirmed: its waiters look at the tier
    /// again without a message (a fill that landed before the subscription is there now),
    /// and from then on may poll less often.
    pub(crate) fn confirm(&self, hash: &[u8; 32]) {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = map.get(hash) {
            slot.confirmed.store(true, Ordering::Release);
            slot.notify.notify_waiters();
        }
    }

    /// `hash`'s subscription is gone (its shard dropped it): its waiters poll at the
    /// usual pace again, starting now.
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub(crate) fn unconfirm(&self, hash: &[u8; 32]) {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = map.get(hash) {
            slot.unconfirm();
        }
    }

    /// The pub/sub connection is lost: no subscription is confirmed any more, and every
    /// waiter that relied on one looks at the tier now and polls at the usual pace.
    pub(crate) fn unconfirm_all(&self) {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.values().for_each(|slot| slot.unconfirm());
    }

    /// A check of `hash` found the lock held by another node: subscribe to the key's
    /// channel while anyone here waits on it, or, when nobody is registered (a background
    /// refresh), until its first wake-up or for `linger` at most.
    pub(crate) fn want(&self, hash: &[u8; 32], linger: Duration) {
        let registered = {
            let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            map.get(hash)
                .map(|slot| !slot.wanted.swap(true, Ordering::AcqRel))
        };
        let newly = match registered {
            Some(newly) => newly,
            None => {
                let until = Instant::now() + linger;
                let mut timed = self.timed();
                let had = timed.get(hash).is_some_and(|t| *t > Instant::now());
                let deadline = timed.entry(*hash).or_insert(until);
                *deadline = (*deadline).max(until);
                !had
            }
        };
        if newly {
            self.mark(*hash);
        }
    }

    fn timed(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Instant, PrehashedState>> {
        self.timed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a subscription to `hash`'s channel is wanted now.
    pub(crate) fn is_wanted(&self, hash: &[u8; 32]) -> bool {
        let registered = {
            let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            map.get(hash)
                .is_some_and(|slot| slot.wanted.load(Ordering::Acquire))
        };
        registered || self.timed().get(hash).is_some_and(|t| *t > Instant::now())
    }

    /// Every key whose channel is wanted now (for a subscription that starts afresh).
    pub(crate) fn wanted(&self) -> Vec<[u8; 32]> {
        let mut wanted: Vec<[u8; 32]> = {
            let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            map.iter()
                .filter(|(_, slot)| slot.wanted.load(Ordering::Acquire))
                .map(|(hash, _)| *hash)
                .collect()
        };
        let now = Instant::now();
        wanted.extend(
            self.timed()
                .iter()
                .filter(|(_, t)| **t > now)
                .map(|(hash, _)| *hash),
        );
        wanted
    }

    /// A wake-up of `hash` arrived: a lingering interest in it has served.
    pub(crate) fn heard(&self, hash: &[u8; 32]) {
        if self.timed().remove(hash).is_some() {
            self.mark(*hash);
        }
    }

    /// Drops the lingering interests past their deadline (marked, so that their
    /// subscriptions end), and says when the next one ends.
    pub(crate) fn expire(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut expired = Vec::new();
        let next = {
            let mut timed = self.timed();
            timed.retain(|hash, t| {
                let keep = *t > now;
                if !keep {
                    expired.push(*hash);
                }
                keep
            });
            timed.values().min().copied()
        };
        expired.into_iter().for_each(|h| self.mark(h));
        next
    }

    fn mark(&self, hash: [u8; 32]) {
        self.dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(hash);
        self.changed.notify_one();
    }

    /// The keys whose subscription may have to change since the last call.
    pub(crate) fn take_dirty(&self) -> Vec<[u8; 32]> {
        std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Resolves when keys were marked since the last call (or before the first).
    pub(crate) async fn changed(&self) {
        self.changed.notified().await
    }
}

/// The wake-up channel of one key: `prefix:{hash}:wake`, in the slot of its value and lock.
pub(crate) fn key_channel(prefix: &str, hash: &[u8; 32]) -> String {
    format!("{prefix}:{{{}}}:wake", super::hex(hash))
}

/// The broadcast channel every node hears: invalidations only.
pub(crate) fn broadcast_channel(prefix: &str) -> String {
    format!("{prefix}:ready")
}

/// How many channels one `SUBSCRIBE` or `UNSUBSCRIBE` names at most.
#[cfg(feature = "redis")]
const SUBSCRIBE_BATCH: usize = 256;

/// A wake-up message: the key hash and what its tail says.
pub(crate) fn parse_message(payload: &[u8]) -> Option<([u8; 32], Wake)> {
    let hash = parse_hex(payload.get(..64)?)?;
    Some((hash, Wake::of_tail(&payload[64..])))
}

/// Runs the sessions `start` makes, each in a task of its own, until `shutdown` fires (the
/// layer was dropped) or `start` has nothing left to run. A session that ends or panics is
/// started again after a backoff with jitter: one bad message or bug must not stop the
/// wake-ups for the life of the process.
#[cfg(feature = "redis")]
pub(crate) async fn supervise<F, Fut>(mut start: F, mut shutdown: oneshot::Receiver<()>)
where
    F: FnMut() -> Option<Fut>,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut backoff = Duration::from_millis(50);
    loop {
        let Some(session) = start() else { return };
        let started = tokio::time::Instant::now();
        let mut task = tokio::spawn(session);
        tokio::select! {
            _ = &mut shutdown => {
                task.abort();
                return;
            }
            ended = &mut task => match ended {
                Ok(()) => tracing::debug!("wake-up subscription ended; restarting it"),
                Err(e) if e.is_panic() => {
                    tracing::error!("wake-up subscription panicked; restarting it");
                }
                // Cancelled: the runtime is shutting down.
                Err(_) => return,
            },
        }
        if started.elapsed() > Duration::from_secs(5) {
            backoff = Duration::from_millis(50);
        }
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(jittered(backoff, backoff / 2)) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Keeps the node's pub/sub connection alive while the layer lives (its supervisor stops
/// it when the layer is dropped), reconnecting with backoff and jitter: the broadcast
/// channel always, and the channel of every key [`Wakers`] wants, subscribed and
/// unsubscribed as waiters come and go (and all again on a new connection). Messages are
/// key hashes in hex, possibly followed by a tail; the handling of each is bounded and
/// guarded, so no message can end the subscription.
#[cfg(feature = "redis")]
pub(crate) async fn subscribe<C, F>(
    mut connect: C,
    prefix: String,
    wakers: Arc<Wakers>,
    sink: Weak<dyn WakeSink>,
    timeout: Duration,
) where
    C: FnMut() -> F,
    F: Future<Output = redis::RedisResult<redis::aio::PubSub>>,
{
    let broadcast = broadcast_channel(&prefix);
    let limit = timeout.max(Duration::from_secs(1));
    let mut backoff = Duration::from_millis(50);
    loop {
        let session = async {
            let pubsub = bounded(limit, connect()).await?;
            let (mut subs, mut messages) = pubsub.split();
            bounded(limit, subs.subscribe(&broadcast)).await?;
            tracing::debug!(channel = %broadcast, "subscribed to wake-ups");
            let mut live = Live::default();
            // A new connection: every key wanted now, whatever was marked before.
            wakers.take_dirty();
            let mut pending = wakers.wanted();
            loop {
                if !pending.is_empty() {
                    let (add, remove) = live.changes(&wakers, std::mem::take(&mut pending));
                    for chunk in remove.chunks(SUBSCRIBE_BATCH) {
                        let channels: Vec<String> =
                            chunk.iter().map(|h| key_channel(&prefix, h)).collect();
                        bounded(limit, subs.unsubscribe(channels)).await?;
                    }
                    for chunk in add.chunks(SUBSCRIBE_BATCH) {
                        let channels: Vec<String> =
                            chunk.iter().map(|h| key_channel(&prefix, h)).collect();
                        bounded(limit, subs.subscribe(channels)).await?;
                        // Confirmed: a fill that landed before is in the tier now.
                        chunk.iter().for_each(|h| wakers.confirm(h));
                    }
                }
                let next_expiry = wakers.expire();
                tokio::select! {
                    msg = messages.next() => {
                        let Some(msg) = msg else {
                            return Err("subscription closed".to_owned());
                        };
                        if !dispatch(&sink, &wakers, msg.get_payload_bytes()).await {
                            return Ok(());
                        }
                    }
                    _ = wakers.changed() => {}
                    _ = sleep_until(next_expiry) => {}
                }
                pending = wakers.take_dirty();
            }
        };
        let connected_at = tokio::time::Instant::now();
        let ended = session.await;
        // Whatever was subscribed on that connection is not any more.
        wakers.unconfirm_all();
        match ended {
            Ok(()) => return,
            Err(e) => {
                tracing::debug!(error = %e, "wake-up subscription lost; polling covers the gap")
            }
        }
        if connected_at.elapsed() > Duration::from_secs(5) {
            backoff = Duration::from_millis(50);
        }
        backoff = jittered_backoff(backoff).await;
    }
}

/// A subscription step under a deadline, its error in words.
#[cfg(feature = "redis")]
pub(crate) async fn bounded<T>(
    limit: Duration,
    step: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, step).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {limit:?}")),
    }
}

/// The key channels one pub/sub connection is subscribed to.
#[derive(Debug, Default)]
pub(crate) struct Live(std::collections::HashSet<[u8; 32], PrehashedState>);

impl Live {
    /// What to subscribe and unsubscribe for the keys in `dirty`, given what `wakers`
    /// wants now; the set is updated as if both were done.
    pub(crate) fn changes(
        &mut self,
        wakers: &Wakers,
        dirty: Vec<[u8; 32]>,
    ) -> (Vec<[u8; 32]>, Vec<[u8; 32]>) {
        let (mut add, mut remove) = (Vec::new(), Vec::new());
        for hash in dirty {
            if wakers.is_wanted(&hash) {
                if self.0.insert(hash) {
                    add.push(hash);
                }
            } else if self.0.remove(&hash) {
                remove.push(hash);
            }
        }
        (add, remove)
    }

    /// Whether `hash`'s channel is subscribed here.
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub(crate) fn contains(&self, hash: &[u8; 32]) -> bool {
        self.0.contains(hash)
    }

    /// Counts `hash`'s channel as not subscribed (its subscription failed or was dropped).
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub(crate) fn forget(&mut self, hash: &[u8; 32]) {
        self.0.remove(hash);
    }

    /// Counts every channel as not subscribed (the connection was replaced).
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub(crate) fn clear(&mut self) {
        self.0.clear();
    }
}

/// Sleeps `backoff` plus up to half of it, and returns the next backoff (doubled, at most
/// one second).
#[cfg(feature = "redis")]
pub(crate) async fn jittered_backoff(backoff: Duration) -> Duration {
    tokio::time::sleep(jittered(backoff, backoff / 2)).await;
    (backoff * 2).min(Duration::from_secs(1))
}

/// Sleeps until `deadline`, or forever without one.
#[cfg(feature = "redis")]
pub(crate) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Hands one message to `sink`, guarded: false when the cache is gone.
#[cfg(feature = "redis")]
pub(crate) async fn dispatch(sink: &Weak<dyn WakeSink>, wakers: &Wakers, payload: &[u8]) -> bool {
    let Some(sink) = sink.upgrade() else {
        return false;
    };
    sink.heard();
    let handled = std::panic::AssertUnwindSafe(async {
        if let Some((hash, wake)) = parse_message(payload) {
            wakers.heard(&hash);
            sink.on_wake(hash, wake).await;
        }
    })
    .catch_unwind()
    .await;
    if handled.is_err() {
        tracing::error!("handling a wake-up message panicked; message ignored");
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn failure_tails_round_trip_and_nothing_else_reads_as_one() {
        for status in [502, 504, 500, 429] {
            assert_eq!(failure_status(&failure_tail(status)), Some(status));
        }
        assert_eq!(failure_status(b"!F200"), None);
        assert_eq!(failure_status(b"!F304"), None);
        assert_eq!(failure_status(b"!F5"), None);
        assert_eq!(failure_status(b"!F-12"), None);
        assert_eq!(failure_status(b"TSE\x01"), None);
        assert_eq!(failure_status(b""), None);
    }

    #[test]
    fn messages_carry_only_what_a_fill_could_have_sent() {
        let hex = [b'a'; 64];
        assert_eq!(parse_message(&hex), Some(([0xaa; 32], Wake::Ended)));
        let with = |tail: &[u8]| {
            let mut m = hex.to_vec();
            m.extend_from_slice(tail);
            parse_message(&m).unwrap().1
        };
        assert_eq!(with(b"TSE"), Wake::Value(Bytes::from_static(b"TSE")));
        assert_eq!(with(&vec![0u8; INLINE_MAX + 1]), Wake::Ended);
        assert_eq!(with(b"!F504"), Wake::Failed(504));
        assert_eq!(with(b"!F200"), Wake::Ended, "no wake-up makes a success");
        assert_eq!(with(b"!X"), Wake::Invalidated(None));
        assert_eq!(with(b"!X42"), Wake::Invalidated(Some(42)));
        assert_eq!(parse_message(b"not hex"), None);
        assert_eq!(parse_message(&[b'z'; 64]), None);
    }

    #[test]
    fn a_waiter_takes_only_the_wake_ups_that_came_while_it_waited() {
        let wakers = Arc::new(Wakers::default());
        let h = [3u8; 32];
        let early = wakers.register(h);
        wakers.wake(&h, Wake::Failed(502));
        // Registered after that attempt failed, while the slot still lives.
        let late = wakers.register(h);
        assert_eq!(early.last(), Some(Wake::Failed(502)));
        assert_eq!(early.last(), None, "each wake-up is taken once");
        assert_eq!(
            late.last(),
            None,
            "an earlier attempt's failure is not its answer"
        );
        wakers.confirm(&h);
        assert_eq!(late.last(), None, "a nudge carries no message");
        wakers.wake(&h, Wake::Ended);
        assert_eq!(late.last(), Some(Wake::Ended));
        assert_eq!(early.last(), Some(Wake::Ended));
    }

    #[test]
    fn a_key_is_wanted_from_a_held_check_until_its_last_waiter_leaves() {
        let wakers = Arc::new(Wakers::default());
        let (h, other) = ([1u8; 32], [2u8; 32]);
        let first = wakers.register(h);
        let second = wakers.register(h);
        assert!(
            !wakers.is_wanted(&h),
            "registered, but no check found the lock held"
        );
        wakers.want(&h, Duration::from_secs(1));
        wakers.want(&h, Duration::from_secs(1));
        assert_eq!(wakers.take_dirty(), vec![h], "marked once");
        assert_eq!(wakers.wanted(), vec![h]);
        let mut live = Live::default();
        assert_eq!(live.changes(&wakers, vec![h, h]), (vec![h], vec![]));
        drop(first);
        assert!(wakers.is_wanted(&h), "one waiter is left");
        assert!(wakers.take_dirty().is_empty());
        drop(second);
        assert!(!wakers.is_wanted(&h));
        assert_eq!(wakers.take_dirty(), vec![h]);
        assert_eq!(live.changes(&wakers, vec![h]), (vec![], vec![h]));
        // Nobody registered (a background refresh): wanted until its first wake-up.
        wakers.want(&other, Duration::from_secs(60));
        assert!(wakers.is_wanted(&other));
        assert_eq!(wakers.take_dirty(), vec![other]);
        wakers.heard(&other);
        assert!(!wakers.is_wanted(&other));
        assert_eq!(wakers.take_dirty(), vec![other]);
        // ... or until its deadline.
        wakers.want(&other, Duration::ZERO);
        wakers.take_dirty();
        assert_eq!(wakers.expire(), None);
        assert!(!wakers.is_wanted(&other));
        assert_eq!(wakers.take_dirty(), vec![other]);
    }

    #[test]
    fn channels_share_the_keys_hash_tag() {
        let h = [0xab; 32];
        let tag = format!("{{{}}}", crate::tier::hex(&h));
        assert_eq!(key_channel("p", &h), format!("p:{tag}:wake"));
        assert_eq!(broadcast_channel("p"), "p:ready");
    }

    #[cfg(feature = "redis")]
    #[tokio::test(start_paused = true)]
    async fn a_session_that_panics_or_ends_is_restarted_until_shutdown() {
        let starts = Arc::new(AtomicUsize::new(0));
        let (running, mut third) = tokio::sync::mpsc::unbounded_channel();
        let (stop, shutdown) = oneshot::channel();
        let supervisor = tokio::spawn(supervise(
            {
                let starts = starts.clone();
                move || {
                    let n = starts.fetch_add(1, Ordering::SeqCst) + 1;
                    let running = running.clone();
                    Some(async move {
                        match n {
                            1 => panic!("a session that panics"),
                            2 => {}
                            _ => {
                                let _ = running.send(());
                                std::future::pending::<()>().await
                            }
                        }
                    })
                }
            },
            shutdown,
        ));
        third.recv().await.unwrap();
        assert_eq!(starts.load(Ordering::SeqCst), 3);
        drop(stop);
        supervisor.await.unwrap();
        assert_eq!(starts.load(Ordering::SeqCst), 3);
    }

    #[cfg(feature = "redis")]
    #[tokio::test]
    async fn a_supervisor_with_nothing_to_run_returns() {
        let (_stop, shutdown) = oneshot::channel();
        supervise(|| None::<std::future::Ready<()>>, shutdown).await;
    }
}
