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

/// The largest value read while a check-and-lock stalls; a larger one waits for the
/// check-and-lock instead.
const READ_MAX: usize = 64 * 1024 * 1024;

/// What the check-and-lock script found.
#[derive(Debug)]
pub(crate) enum Check {
    Value(Bytes),
    Locked,
    Held(Duration),
}

#[derive(Debug)]
pub(crate) struct RedisStore {
    pub(crate) conn: RedisConn,
    prefix: String,
    pub(crate) channel: String,
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
    pub(crate) fn new(conn: RedisConn, prefix: &str) -> Self {
        RedisStore {
            conn,
            prefix: prefix.to_owned(),
            channel: format!("{prefix}:ready"),
        }
    }

    /// `prefix:{hash}:v`: the hash tag keeps value and lock in one Cluster slot.
    pub(crate) fn value_key(&self, key: &Key) -> String {
        format!("{}:{{{}}}:v", self.prefix, key.hex())
    }

    pub(crate) fn lock_key(&self, key: &Key) -> String {
        format!("{}:{{{}}}:lock", self.prefix, key.hex())
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
        let rk = vk.clone();
        let write = |mut c: redis::aio::ConnectionManager| async move {
            scripts::CHECK_AND_LOCK
                .key(vk)
                .key(lk)
                .arg(token)
                .arg(millis(lease))
                .arg(if skip_value { "1" } else { "0" })
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
                    .arg(READ_MAX)
                    .query_async::<Option<Vec<u8>>>(&mut c)
                    .await
            };
            match self.conn.run_or_read(write, read).await? {
                Raced::Write(reply) => reply,
                Raced::Read(value) => return Ok(Check::Value(Bytes::from(value))),
            }
        };
        match (int(reply.first()), reply.get(1)) {
            (Some(1), Some(Value::BulkString(b))) => Ok(Check::Value(Bytes::from(b.clone()))),
            (Some(2), _) => Ok(Check::Locked),
            (Some(3), pttl) => Ok(Check::Held(Duration::from_millis(
                int(pttl).unwrap_or(0).max(0) as u64,
            ))),
            _ => Err(unexpected("check-and-lock")),
        }
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
