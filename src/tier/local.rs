//! The local tier: this process only. There is no shared copy (L1 is the only one); locks
//! are in-process leases, and wake-ups are direct notifications.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::wake::{failure_tail, Wake};
use super::{Check, KeyHash, PrehashedState, Wakers};

/// Why a call to the shared tier did not produce an answer. Without the `redis` feature
/// the only tier is local, which never fails.
#[cfg(not(feature = "redis"))]
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {}

#[derive(Debug, Default)]
pub(crate) struct LocalTier {
    pub(crate) locks: LocalLocks,
    pub(crate) wakers: Arc<Wakers>,
}

impl LocalTier {
    pub(crate) fn check_and_lock(&self, key: &KeyHash, token: &str, lease: Duration) -> Check {
        match self.locks.try_lock(key.0, token, lease) {
            None => Check::Locked(super::Generation::Any),
            Some((holder, left)) => Check::Held {
                token: holder,
                left: Some(left),
            },
        }
    }

    pub(crate) fn release(&self, key: &KeyHash, token: &str) -> bool {
        let held = self.locks.release(key.0, token);
        self.wakers.wake(&key.0, Wake::Ended);
        held
    }

    pub(crate) fn fail_release(&self, key: &KeyHash, token: &str, status: u16) -> bool {
        let held = self.locks.release(key.0, token);
        let wake = Wake::of_tail(&failure_tail(status));
        self.wakers.wake(&key.0, wake);
        held
    }
}

/// In-process locks with leases: they matter when a refresh runs while a request's fill
/// wants the same key, or a fill outlives the request that started it.
#[derive(Debug, Default)]
pub(crate) struct LocalLocks {
    map: Mutex<HashMap<[u8; 32], (String, Instant), PrehashedState>>,
}

impl LocalLocks {
    fn map(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], (String, Instant), PrehashedState>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `None` when taken, else the holder's token and the time left on its lease.
    pub(crate) fn try_lock(
        &self,
        hash: [u8; 32],
        token: &str,
        lease: Duration,
    ) -> Option<(Bytes, Duration)> {
        let mut map = self.map();
        let now = Instant::now();
        if let Some((holder, until)) = map.get(&hash) {
            if *until > now {
                return Some((Bytes::copy_from_slice(holder.as_bytes()), *until - now));
            }
        }
        map.insert(hash, (token.to_owned(), now + lease));
        None
    }

    pub(crate) fn extend(&self, hash: [u8; 32], token: &str, lease: Duration) -> bool {
        let mut map = self.map();
        match map.get_mut(&hash) {
            Some((t, until)) if t == token && *until > Instant::now() => {
                *until = Instant::now() + lease;
                true
            }
            _ => false,
        }
    }

    pub(crate) fn takeover(
        &self,
        hash: [u8; 32],
        old: &[u8],
        token: &str,
        lease: Duration,
    ) -> bool {
        let mut map = self.map();
        match map.get_mut(&hash) {
            Some((t, until)) if t.as_bytes() == old => {
                *t = token.to_owned();
                *until = Instant::now() + lease;
                true
            }
            _ => false,
        }
    }

    pub(crate) fn release(&self, hash: [u8; 32], token: &str) -> bool {
        let mut map = self.map();
        if map.get(&hash).is_some_and(|(t, _)| t == token) {
            map.remove(&hash);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_is_one_holders_until_released_or_expired() {
        let locks = LocalLocks::default();
        let h = [1u8; 32];
        assert!(locks.try_lock(h, "a", Duration::from_secs(60)).is_none());
        let (holder, _) = locks.try_lock(h, "b", Duration::from_secs(60)).unwrap();
        assert_eq!(&holder[..], b"a");
        assert!(!locks.release(h, "b"));
        assert!(locks.extend(h, "a", Duration::from_secs(60)));
        assert!(locks.takeover(h, b"a", "c", Duration::from_secs(60)));
        assert!(!locks.release(h, "a"));
        assert!(locks.release(h, "c"));
        assert!(locks.try_lock(h, "d", Duration::ZERO).is_none());
        assert!(
            locks.try_lock(h, "e", Duration::from_secs(1)).is_none(),
            "a zero lease lapsed"
        );
    }
}
