//! Wake-ups: one pub/sub subscription per process, dispatched to the fills waiting on a key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use crate::layer::Shared;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{oneshot, Notify};

use crate::key::{parse_hex, PrehashedState};
use crate::lock::jittered;

/// The largest stored value carried inside its wake-up message, so that waiters on other
/// nodes need no second round trip to read it.
pub(crate) const INLINE_MAX: usize = 32 * 1024;

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

/// A wake-up message: the key hash in hex, then possibly the stored bytes.
pub(crate) fn parse_message(payload: &[u8]) -> Option<([u8; 32], Option<Bytes>)> {
    let hash = parse_hex(payload.get(..64)?)?;
    let value = (payload.len() > 64).then(|| Bytes::copy_from_slice(&payload[64..]));
    Some((hash, value))
}

/// Keeps one subscription to `channel` alive until `shutdown` fires (the layer was
/// dropped), reconnecting with backoff and jitter. Messages are key hashes in hex.
pub(crate) async fn subscribe(
    client: redis::Client,
    channel: String,
    shared: Weak<Shared>,
    timeout: Duration,
    mut shutdown: oneshot::Receiver<()>,
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
                if let Some((hash, value)) = parse_message(msg.get_payload_bytes()) {
                    shared.on_wake(hash, value).await;
                }
            }
            Err("subscription closed".to_owned())
        };
        let connected_at = tokio::time::Instant::now();
        tokio::select! {
            _ = &mut shutdown => return,
            res = session => match res {
                Ok(()) => return,
                Err(e) => tracing::debug!(error = %e, "wake-up subscription lost; polling covers the gap"),
            },
        }
        if connected_at.elapsed() > Duration::from_secs(5) {
            backoff = Duration::from_millis(50);
        }
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(jittered(backoff, backoff / 2)) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}
