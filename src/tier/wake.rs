//! Wake-ups: the waiters of this process by key, and (with Redis) one supervised pub/sub
//! subscription per node whose messages are dispatched to them.
//!
//! A message is the key hash in 64 hex digits, then a tail: nothing (the fill ended, read
//! the tier), a stored envelope (`TSE...`, at most [`INLINE_MAX`] bytes: waiters need no
//! read), `!F` and a status (the attempt failed: that is the waiters' answer), or `!X` (the
//! key was invalidated: drop any copy in memory).

use std::collections::HashMap;
#[cfg(feature = "redis")]
use std::future::Future;
use std::pin::Pin;
#[cfg(feature = "redis")]
use std::sync::Weak;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

/// The fills of this process that wait on some key, by key hash.
#[derive(Debug, Default)]
pub(crate) struct Wakers {
    map: Mutex<HashMap<[u8; 32], Arc<Slot>, PrehashedState>>,
}

#[derive(Debug, Default)]
struct Slot {
    notify: Notify,
    /// What the last wake-up said.
    last: Mutex<Option<Wake>>,
}

/// A registration; dropping it unregisters.
pub(crate) struct Waiting {
    wakers: Arc<Wakers>,
    hash: [u8; 32],
    slot: Arc<Slot>,
}

impl Waiting {
    pub(crate) fn notify(&self) -> &Notify {
        &self.slot.notify
    }

    /// What the last wake-up said, if one came.
    pub(crate) fn last(&self) -> Option<Wake> {
        self.slot
            .last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut map = self.wakers.map.lock().unwrap_or_else(|e| e.into_inner());
        // The map's reference and ours: nobody else waits on this key.
        if Arc::strong_count(&self.slot) <= 2 {
            map.remove(&self.hash);
        }
    }
}

impl Wakers {
    pub(crate) fn register(self: &Arc<Self>, hash: [u8; 32]) -> Waiting {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let slot = map.entry(hash).or_default().clone();
        Waiting {
            wakers: self.clone(),
            hash,
            slot,
        }
    }

    pub(crate) fn wake(&self, hash: &[u8; 32], wake: Wake) {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = map.get(hash) {
            *slot.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(wake);
            slot.notify.notify_waiters();
        }
    }
}

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

/// Keeps one subscription to `channel` alive while the layer lives (its supervisor stops
/// it when the layer is dropped), reconnecting with backoff and jitter. Messages are key
/// hashes in hex, possibly followed by the stored bytes; the handling of each is bounded
/// and guarded, so no message can end the subscription.
#[cfg(feature = "redis")]
pub(crate) async fn subscribe(
    client: redis::Client,
    channel: String,
    sink: Weak<dyn WakeSink>,
    timeout: Duration,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let session = async {
            let mut pubsub = tokio::time::timeout(
                timeout.max(Duration::from_secs(1)),
                client.get_async_pubsub(),
            )
            .await
            .map_err(|_| "connect timed out".to_owned())?
            .map_err(|e| e.to_string())?;
            pubsub
                .subscribe(&channel)
                .await
                .map_err(|e| e.to_string())?;
            tracing::debug!(%channel, "subscribed to wake-ups");
            let mut messages = pubsub.into_on_message();
            while let Some(msg) = messages.next().await {
                let Some(sink) = sink.upgrade() else {
                    return Ok(());
                };
                sink.heard();
                let handled = std::panic::AssertUnwindSafe(async {
                    if let Some((hash, wake)) = parse_message(msg.get_payload_bytes()) {
                        sink.on_wake(hash, wake).await;
                    }
                })
                .catch_unwind()
                .await;
                if handled.is_err() {
                    tracing::error!(%channel, "handling a wake-up message panicked; message ignored");
                }
            }
            Err("subscription closed".to_owned())
        };
        let connected_at = tokio::time::Instant::now();
        match session.await {
            Ok(()) => return,
            Err(e) => {
                tracing::debug!(error = %e, "wake-up subscription lost; polling covers the gap")
            }
        }
        if connected_at.elapsed() > Duration::from_secs(5) {
            backoff = Duration::from_millis(50);
        }
        tokio::time::sleep(jittered(backoff, backoff / 2)).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
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
