//! The shared tier: Redis values and locks through the scripts, or in-process locks for
//! the local backend.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::Value;

use crate::conn::{BackendError, Raced, RedisConn};
use crate::key::Key;
use crate::lock::millis;
use crate::scripts;

/// What the check-and-lock script found.
#[derive(Debug)]
pub(crate) enum Check {
    Value(Bytes),
    Locked,
    /// Held by another: the lock's time to live (`Duration::MAX` when it has no expiry)
    /// and the holder's token.
    Held(Duration, Bytes),
}

#[derive(Debug)]
pub(crate) struct RedisStore {
    pub(crate) conn: RedisConn,
    prefix: String,
    pub(crate) channel: String,
    /// The largest body stored: with the envelope's bounds, it sizes the largest value
    /// worth reading.
    max_body: usize,
}

fn int(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::Int(i) => Some(*i),
        _ => None,
    }
}

fn unexpected(what: &str) -> BackendError {
    BackendError::Redis(redis::RedisError::from((
        redis::ErrorKind::Client,
        "unexpected script reply",
        what.to_owned(),
    )))
}

impl RedisStore {
    pub(crate) fn new(conn: RedisConn, prefix: &str, max_body: usize) -> Self {
        RedisStore {
            conn,
            prefix: prefix.to_owned(),
            channel: format!("{prefix}:ready"),
            max_body,
        }
    }

    /// `prefix:{hash}:v`: the hash tag keeps value and lock in one Cluster slot.
    pub(crate) fn value_key(&self, key: &Key) -> String {
        format!("{}:{{{}}}:v", self.prefix, key.hex())
    }

    pub(crate) fn lock_key(&self, key: &Key) -> String {
        format!("{}:{{{}}}:lock", self.prefix, key.hex())
    }

    /// `prefix:{hash}:fail`: the short-lived marker of an attempt that failed.
    pub(crate) fn fail_key(&self, key: &Key) -> String {
        format!("{}:{{{}}}:fail", self.prefix, key.hex())
    }

    /// Check-and-lock, one round trip. If it stalls (Redis holding writes back), a
    /// read-only read on the read connection races it, and a value found is the answer.
    pub(crate) async fn check_and_lock(
        &self,
        key: &Key,
        token: &str,
        lease: Duration,
        skip_value: bool,
    ) -> Result<Check, BackendError> {
        let (vk, lk) = (self.value_key(key), self.lock_key(key));
        // Larger bytes cannot be an envelope of ours: never read them.
        let max_value = crate::envelope::max_encoded_len(key.canonical.len(), self.max_body);
        let rk = vk.clone();
        let write = |mut c: redis::aio::ConnectionManager| async move {
            scripts::CHECK_AND_LOCK
                .key(vk)
                .key(lk)
                .arg(token)
                .arg(millis(lease))
                .arg(if skip_value { "1" } else { "0" })
                .arg(max_value)
                .invoke_async::<Vec<Value>>(&mut c)
                .await
        };
        // A value known to be unusable is not worth reading again.
        let reply = if skip_value {
            self.conn.run(write).await?
        } else {
            let read = |mut c: redis::aio::ConnectionManager| async move {
                redis::cmd("EVAL_RO")
                    .arg(scripts::READ_VALUE)
                    .arg(1)
                    .arg(rk)
                    .arg(max_value)
                    .query_async::<Option<Vec<u8>>>(&mut c)
                    .await
            };
            match self.conn.run_or_read(write, read).await? {
                Raced::Write(reply) => reply,
                Raced::Read(value) => return Ok(Check::Value(Bytes::from(value))),
            }
        };
        let mut reply = reply.into_iter();
        match (int(reply.next().as_ref()), reply.next(), reply.next()) {
            (Some(1), Some(Value::BulkString(b)), _) => Ok(Check::Value(Bytes::from(b))),
            (Some(2), _, _) => Ok(Check::Locked),
            (Some(3), pttl, holder) => {
                let pttl = match int(pttl.as_ref()) {
                    // No expiry: it never lapses on its own.
                    Some(-1) => Duration::MAX,
                    ms => Duration::from_millis(ms.unwrap_or(0).max(0) as u64),
                };
                let holder = match holder {
                    Some(Value::BulkString(b)) => Bytes::from(b),
                    _ => Bytes::new(),
                };
                Ok(Check::Held(pttl, holder))
            }
            _ => Err(unexpected("check-and-lock")),
        }
    }

    /// Takes the lock over from `stale`, a holder token seen on a lock that no holder of
    /// ours could have left. Returns whether `token` now holds it for `lease`.
    pub(crate) async fn take_over(
        &self,
        key: &Key,
        stale: &[u8],
        token: &str,
        lease: Duration,
    ) -> Result<bool, BackendError> {
        let lk = self.lock_key(key);
        let n: i64 = self
            .conn
            .run(|mut c| async move {
                scripts::TAKE_OVER
                    .key(lk)
                    .arg(stale)
                    .arg(token)
                    .arg(millis(lease))
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(n == 1)
    }

    /// Stores, releases and publishes in one round trip. Returns whether the lock was
    /// still held.
    pub(crate) async fn store_release(
        &self,
        key: &Key,
        token: &str,
        bytes: &[u8],
        ttl: Duration,
    ) -> Result<bool, BackendError> {
        let (vk, lk) = (self.value_key(key), self.lock_key(key));
        let reply: Vec<i64> = self
            .conn
            .run_always(|mut c| async move {
                scripts::STORE_RELEASE
                    .key(vk)
                    .key(lk)
                    .arg(token)
                    .arg(bytes)
                    .arg(millis(ttl))
                    .arg(&self.channel)
                    .arg(key.hex())
                    .arg(if bytes.len() <= crate::wake::INLINE_MAX {
                        "1"
                    } else {
                        "0"
                    })
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        if reply.get(1) == Some(&-1) {
            tracing::debug!(key = %key.short(), "redis refused the store (out of memory?); released and woken anyway");
        }
        Ok(reply.first() == Some(&1))
    }

    /// Releases (if still ours) and publishes, for a fill that produced nothing to store.
    pub(crate) async fn release_publish(
        &self,
        key: &Key,
        token: &str,
    ) -> Result<bool, BackendError> {
        let lk = self.lock_key(key);
        let held: i64 = self
            .conn
            .run_always(|mut c| async move {
                scripts::RELEASE_PUBLISH
                    .key(lk)
                    .arg(token)
                    .arg(&self.channel)
                    .arg(key.hex())
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(held == 1)
    }

    /// Leaves a failure marker, releases (if still ours) and publishes the failure, for a
    /// fill whose attempt failed. Returns whether the lock was still held.
    pub(crate) async fn fail_release(
        &self,
        key: &Key,
        token: &str,
        status: http::StatusCode,
        marker_ttl: Duration,
    ) -> Result<bool, BackendError> {
        let (lk, fk) = (self.lock_key(key), self.fail_key(key));
        let tail = crate::wake::failure_tail(status);
        let mut message = key.hex().into_bytes();
        message.extend_from_slice(&tail);
        let mut marker = tail;
        marker.extend_from_slice(token.as_bytes());
        let held: i64 = self
            .conn
            .run_always(|mut c| async move {
                scripts::FAIL_RELEASE
                    .key(lk)
                    .key(fk)
                    .arg(token)
                    .arg(marker)
                    .arg(millis(marker_ttl))
                    .arg(&self.channel)
                    .arg(message)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(held == 1)
    }

    /// The status of the failed attempt of `holder`, if it left a failure marker.
    pub(crate) async fn failure_of(
        &self,
        key: &Key,
        holder: &[u8],
    ) -> Result<Option<http::StatusCode>, BackendError> {
        let fk = self.fail_key(key);
        let marker: Option<Vec<u8>> = self
            .conn
            .run(|mut c| async move { redis::cmd("GET").arg(fk).query_async(&mut c).await })
            .await?;
        Ok(marker.and_then(|m| {
            let status = crate::wake::failure_status(&m)?;
            (m.get(5..) == Some(holder)).then_some(status)
        }))
    }

    pub(crate) async fn extend(
        &self,
        key: &Key,
        token: &str,
        lease: Duration,
    ) -> Result<bool, BackendError> {
        let lk = self.lock_key(key);
        let n: i64 = self
            .conn
            .run_always(|mut c| async move {
                scripts::EXTEND
                    .key(lk)
                    .arg(token)
                    .arg(millis(lease))
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(n == 1)
    }
}

/// In-process locks with leases, for the local backend: they matter when a leader's
/// request is dropped and a waiter starts a second fill while the first still runs.
#[derive(Debug, Default)]
pub(crate) struct LocalLocks {
    map: Mutex<HashMap<[u8; 32], (String, Instant)>>,
}

impl LocalLocks {
    /// `None` when taken, else the time left on the holder's lease.
    pub(crate) fn try_lock(
        &self,
        hash: [u8; 32],
        token: &str,
        lease: Duration,
    ) -> Option<Duration> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if let Some((_, until)) = map.get(&hash) {
            if *until > now {
                return Some(*until - now);
            }
        }
        map.insert(hash, (token.to_owned(), now + lease));
        None
    }

    pub(crate) fn extend(&self, hash: [u8; 32], token: &str, lease: Duration) -> bool {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        match map.get_mut(&hash) {
            Some((t, until)) if t == token && *until > Instant::now() => {
                *until = Instant::now() + lease;
                true
            }
            _ => false,
        }
    }

    pub(crate) fn release(&self, hash: [u8; 32], token: &str) -> bool {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
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
    fn ttl_and_lease_arguments_are_at_least_one_millisecond() {
        // Redis refuses `PX 0`: an entry whose time to live ran out still gets 1 ms.
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::from_micros(999)), 1);
        assert_eq!(millis(Duration::from_millis(1500)), 1500);
    }
}
