//! Wake-ups: one pub/sub subscription per process, dispatched to the fills waiting on a key.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, Weak};

use crate::layer::Shared;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{oneshot, Notify};

use crate::key::{parse_hex, PrehashedState};
use crate::lock::jittered;

/// The largest stored value carried inside its wake-up message, so that waiters on other
/// nodes need no second round trip to read it.
pub(crate) const INLINE_MAX: usize = 32 * 1024;

/// What follows the key hash in the wake-up of a failed attempt: `!F` and the status the
/// attempt's waiters answer with (`502`, or `504` for a timeout). Stored envelopes start
/// with `TSE`, so the two cannot be confused.
const FAILURE_TAG: &[u8; 2] = b"!F";

/// The longest a failure marker stays in Redis: it is there for the waiters of the
/// attempt that failed, whose wake-up was lost, never for the requests after them.
pub(crate) const FAILURE_MARKER_MAX: Duration = Duration::from_secs(5);

/// The tail of a failed attempt's wake-up message (and the failure marker's value).
pub(crate) fn failure_tail(status: http::StatusCode) -> Vec<u8> {
    let mut tail = FAILURE_TAG.to_vec();
    tail.extend_from_slice(status.as_str().as_bytes());
    tail
}

/// The status a wake-up's tail (or a failure marker) says the attempt failed with.
pub(crate) fn failure_status(tail: &[u8]) -> Option<http::StatusCode> {
    let code = tail.strip_prefix(FAILURE_TAG)?;
    let status = http::StatusCode::from_bytes(code.get(..3)?).ok()?;
    // Only error statuses: nothing from outside can make a waiter answer a success.
    is_shared_error(status).then_some(status)
}

/// Answers that end an attempt as a failure shared with its waiters: 5xx and 429.
pub(crate) fn is_shared_error(status: http::StatusCode) -> bool {
    status.is_server_error() || status == http::StatusCode::TOO_MANY_REQUESTS
}

/// The fills of this process that wait on some key, by key hash.
#[derive(Debug, Default)]
pub(crate) struct Wakers {
    map: Mutex<HashMap<[u8; 32], Arc<Slot>, PrehashedState>>,
}

#[derive(Debug, Default)]
struct Slot {
    notify: Notify,
    /// The value carried by the last wake-up, if it carried one.
    value: Mutex<Option<Bytes>>,
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

    /// The stored bytes the last wake-up carried.
    pub(crate) fn value(&self) -> Option<Bytes> {
        self.slot
            .value
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

    pub(crate) fn wake(&self, hash: &[u8; 32], value: Option<Bytes>) {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = map.get(hash) {
            *slot.value.lock().unwrap_or_else(|e| e.into_inner()) = value;
            slot.notify.notify_waiters();
        }
    }
}

/// A wake-up message: the key hash in hex, then possibly the stored bytes. Only bytes a
/// store could have carried (at most [`INLINE_MAX`]) are kept: anything longer is not
/// ours, and the waiters read Redis instead.
pub(crate) fn parse_message(payload: &[u8]) -> Option<([u8; 32], Option<Bytes>)> {
    let hash = parse_hex(payload.get(..64)?)?;
    let rest = &payload[64..];
    let value =
        (!rest.is_empty() && rest.len() <= INLINE_MAX).then(|| Bytes::copy_from_slice(rest));
    Some((hash, value))
}

/// Runs the sessions `start` makes, each in a task of its own, until `shutdown` fires (the
/// layer was dropped) or `start` has nothing left to run. A session that ends or panics is
/// started again after a backoff with jitter: one bad message or bug must not stop the
/// wake-ups for the life of the process.
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
pub(crate) async fn subscribe(
    client: redis::Client,
    channel: String,
    shared: Weak<Shared>,
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
                let Some(shared) = shared.upgrade() else {
                    return Ok(());
                };
                shared.counters.incr(crate::stats::Event::wakeups);
                let handled = AssertUnwindSafe(async {
                    if let Some((hash, value)) = parse_message(msg.get_payload_bytes()) {
                        shared.on_wake(hash, value).await;
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
        for status in [
            http::StatusCode::BAD_GATEWAY,
            http::StatusCode::GATEWAY_TIMEOUT,
        ] {
            assert_eq!(failure_status(&failure_tail(status)), Some(status));
        }
        assert_eq!(failure_status(b"!F200"), None);
        assert_eq!(failure_status(b"!F304"), None);
        assert_eq!(
            failure_status(b"!F429"),
            Some(http::StatusCode::TOO_MANY_REQUESTS)
        );
        assert_eq!(failure_status(b"!F5"), None);
        assert_eq!(failure_status(b"TSE\x01"), None);
        assert_eq!(failure_status(b""), None);
    }

    #[test]
    fn messages_carry_only_values_a_store_could_have_sent() {
        let hex = [b'a'; 64];
        assert_eq!(parse_message(&hex), Some(([0xaa; 32], None)));
        let mut small = hex.to_vec();
        small.extend(b"TSE");
        assert_eq!(
            parse_message(&small).unwrap().1.as_deref(),
            Some(&b"TSE"[..])
        );
        let mut big = hex.to_vec();
        big.extend(vec![0u8; INLINE_MAX + 1]);
        assert_eq!(parse_message(&big), Some(([0xaa; 32], None)));
        assert_eq!(parse_message(b"not hex"), None);
        assert_eq!(parse_message(&[b'z'; 64]), None);
    }

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

    #[tokio::test]
    async fn a_supervisor_with_nothing_to_run_returns() {
        let (_stop, shutdown) = oneshot::channel();
        supervise(|| None::<std::future::Ready<()>>, shutdown).await;
    }
}
