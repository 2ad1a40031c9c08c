//! The Redis tier: every primitive one Lua script (one round trip), on a lazily connected
//! handle with a deadline per call and a circuit breaker ([`conn`](super::conn)); wake-ups
//! through one supervised pub/sub subscription per node.
//!
//! Keys: `prefix:{hash}:v` (value), `prefix:{hash}:lock`, `prefix:{hash}:fail` (the short
//! failure marker of an attempt): the hash tag keeps them in one Cluster slot. Channels:
//! `prefix:{hash}:wake` for the key's wake-ups (heard by the nodes waiting on it),
//! `prefix:ready` for invalidations (heard by every node).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use redis::Value;
use tokio::sync::oneshot;

use super::conn::{BackendError, Breaker, Raced, RedisConn, Source};
use super::wake::{self, WakeSink};
use super::{millis, scripts, Check, CheckOpts, Generation, KeyHash, TierConfig, Wakers};

/// The shortest and longest a node hears a key it holds no waiter on, after finding its
/// lock held (a background refresh): the other fill's wake-up replaces its stale copy.
pub(crate) const LINGER_MIN: Duration = Duration::from_secs(1);
pub(crate) const LINGER_MAX: Duration = Duration::from_secs(10);

/// A Redis tier on one Redis or (with `S` a Cluster source) on a Redis Cluster: the same
/// scripts, routed by their keys, which share one hash tag.
pub(crate) struct RedisTier<S: Source = redis::Client> {
    pub(crate) conn: RedisConn<S>,
    prefix: String,
    broadcast: String,
    pub(crate) wakers: Arc<Wakers>,
    subscribed: AtomicBool,
    purge_check: Duration,
    /// Dropping it (with the tier) stops the subscription.
    stop_subscription: Mutex<Option<oneshot::Sender<()>>>,
}

fn int(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::Int(i) => Some(*i),
        _ => None,
    }
}

/// The largest value length as the scripts' `GETRANGE` end: Redis takes a signed 64-bit
/// index (no Redis string comes near it, so the clamp changes no answer).
fn range_end(max_value: usize) -> u64 {
    (max_value as u64).min(i64::MAX as u64)
}

fn unexpected(what: &str) -> BackendError {
    BackendError::Redis(redis::RedisError::from((
        redis::ErrorKind::Client,
        "unexpected script reply",
        what.to_owned(),
    )))
}

impl<S: Source> RedisTier<S> {
    pub(crate) fn new(client: S, cfg: &TierConfig) -> Self {
        RedisTier {
            conn: RedisConn::new(
                client,
                cfg.timeout,
                Breaker::new(cfg.breaker_failures, cfg.breaker_cooldown),
            ),
            prefix: cfg.prefix.clone(),
            broadcast: wake::broadcast_channel(&cfg.prefix),
            wakers: Arc::default(),
            subscribed: AtomicBool::new(false),
            purge_check: cfg.purge_check,
            stop_subscription: Mutex::new(None),
        }
    }

    /// The server's address, without credentials.
    pub(crate) fn address(&self) -> String {
        self.conn.client().address()
    }

    fn value_key(&self, key: &KeyHash) -> String {
        format!("{}:{{{}}}:v", self.prefix, key.hex())
    }

    fn lock_key(&self, key: &KeyHash) -> String {
        format!("{}:{{{}}}:lock", self.prefix, key.hex())
    }

    fn fail_key(&self, key: &KeyHash) -> String {
        format!("{}:{{{}}}:fail", self.prefix, key.hex())
    }

    fn gen_key(&self, key: &KeyHash) -> String {
        format!("{}:{{{}}}:gen", self.prefix, key.hex())
    }

    fn epoch_key(&self) -> String {
        format!("{}:epoch", self.prefix)
    }

    fn tag_key(&self, tag: &str) -> String {
        format!("{}:tag:{tag}", self.prefix)
    }

    fn wake_channel(&self, key: &KeyHash) -> String {
        wake::key_channel(&self.prefix, &key.0)
    }

    /// Starts the supervised subscription once, from inside the runtime.
    pub(crate) fn ensure_subscribed(&self, sink: Weak<dyn WakeSink>) {
        if self.subscribed.load(Ordering::Relaxed) || self.subscribed.swap(true, Ordering::AcqRel) {
            return;
        }
        let (stop, stopped) = oneshot::channel();
        *self
            .stop_subscription
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(stop);
        let (client, prefix, wakers, timeout) = (
            self.conn.client().clone(),
            self.prefix.clone(),
            self.wakers.clone(),
            self.conn.timeout(),
        );
        self.spawn_purge_watch(sink.clone());
        tokio::spawn(wake::supervise(
            move || {
                // Nobody left to hear: the cache is gone.
                sink.upgrade()?;
                Some(client.clone().subscription(
                    prefix.clone(),
                    wakers.clone(),
                    sink.clone(),
                    timeout,
                ))
            },
            stopped,
        ));
    }

    /// Has the cache check the purge epoch every `purge_check`: a node whose subscription
    /// missed purges learns it within that bound and drops what may be stale.
    fn spawn_purge_watch(&self, sink: Weak<dyn WakeSink>) {
        let every = self.purge_check;
        if every.is_zero() {
            return;
        }
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(sink) = sink.upgrade() else { return };
                sink.check_purges().await;
            }
        });
    }

    /// Check-and-lock, one round trip. If it stalls (Redis holding writes back), a
    /// read-only read on the read connection races it, and a value found is the answer.
    pub(crate) async fn check_and_lock(
        &self,
        key: &KeyHash,
        token: &str,
        opts: CheckOpts<'_>,
    ) -> Result<Check, BackendError> {
        let (vk, lk, fk) = (self.value_key(key), self.lock_key(key), self.fail_key(key));
        let gk = self.gen_key(key);
        let rk = vk.clone();
        let waited_on = opts.waited_on.unwrap_or_default();
        let write = |mut c: S::Conn| async move {
            scripts::CHECK_AND_LOCK
                .key(vk)
                .key(lk)
                .key(fk)
                .key(gk)
                .arg(token)
                .arg(millis(opts.lease))
                .arg(if opts.skip_value { "1" } else { "0" })
                .arg(range_end(opts.max_value))
                .arg(waited_on)
                .invoke_async::<Vec<Value>>(&mut c)
                .await
        };
        // A value known to be unusable is not worth reading again.
        let reply = if opts.skip_value {
            self.conn.run(write).await?
        } else {
            let read = |mut c: S::Conn| async move {
                redis::cmd("EVAL_RO")
                    .arg(scripts::READ_VALUE)
                    .arg(1)
                    .arg(rk)
                    .arg(range_end(opts.max_value))
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
            (Some(2), generation, _) => Ok(Check::Locked(Generation::Known(match generation {
                Some(Value::BulkString(g)) => Bytes::from(g),
                _ => Bytes::from_static(b"0"),
            }))),
            (Some(3), pttl, holder) => {
                let left = match int(pttl.as_ref()) {
                    // No expiry: it never lapses on its own.
                    Some(-1) => None,
                    ms => Some(Duration::from_millis(ms.unwrap_or(0).max(0) as u64)),
                };
                let token = match holder {
                    Some(Value::BulkString(b)) => Bytes::from(b),
                    _ => Bytes::new(),
                };
                // Waiting on another node's fill: hear this key's wake-ups (a refresh,
                // which waits on nothing, for about as long as that fill may take).
                let linger = left.unwrap_or(LINGER_MAX).clamp(LINGER_MIN, LINGER_MAX);
                self.wakers.want(&key.0, linger);
                Ok(Check::Held { token, left })
            }
            (Some(4), Some(Value::BulkString(tail)), _) => match wake::failure_status(&tail) {
                Some(status) => Ok(Check::Failed(status)),
                None => Err(unexpected("check-and-lock failure marker")),
            },
            _ => Err(unexpected("check-and-lock")),
        }
    }

    /// Takes the lock over from `stale`, a holder token seen on a lock that no holder of
    /// ours could have left. Returns whether `token` now holds it for `lease`.
    pub(crate) async fn takeover(
        &self,
        key: &KeyHash,
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
        key: &KeyHash,
        token: &str,
        bytes: &[u8],
        ttl: Duration,
        generation: &Generation,
        tags: &[String],
    ) -> Result<bool, BackendError> {
        let (vk, lk, gk, channel) = (
            self.value_key(key),
            self.lock_key(key),
            self.gen_key(key),
            self.wake_channel(key),
        );
        // One node holds every key: the tag sets are written in the same script. A Cluster
        // keeps them apart (other slots), in a second call.
        let one_node = S::PUBLISH == "PUBLISH";
        let sets: Vec<String> = tags.iter().map(|t| self.tag_key(t)).collect();
        let in_script: &[String] = if one_node { &sets } else { &[] };
        let reply: Vec<i64> = self
            .conn
            .run_always(|mut c| async move {
                let mut call = scripts::STORE_RELEASE.key(vk);
                call.key(lk).key(gk);
                for set in in_script {
                    call.key(set);
                }
                call.arg(token)
                    .arg(bytes)
                    .arg(millis(ttl))
                    .arg(&channel)
                    .arg(key.hex())
                    .arg(if bytes.len() <= wake::INLINE_MAX {
                        "1"
                    } else {
                        "0"
                    })
                    .arg(S::PUBLISH)
                    .arg(generation.arg())
                    .arg(key.hex())
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        if reply.get(1) == Some(&-1) {
            tracing::debug!(key = %key.short(), "redis refused the store (out of memory?); released and woken anyway");
        }
        if !one_node && reply.get(1) == Some(&1) && !sets.is_empty() {
            let hex = key.hex();
            let ms = millis(ttl);
            let _: () = self
                .conn
                .run_always(|mut c| async move {
                    let mut pipe = redis::pipe();
                    for set in &sets {
                        pipe.cmd("SADD").arg(set).arg(&hex).ignore();
                        pipe.cmd("PEXPIRE").arg(set).arg(ms).arg("GT").ignore();
                        pipe.cmd("PEXPIRE").arg(set).arg(ms).arg("NX").ignore();
                    }
                    pipe.query_async(&mut c).await
                })
                .await?;
        }
        Ok(reply.first() == Some(&1))
    }

    /// Releases (if still ours) and publishes, for a fill that produced nothing to store.
    pub(crate) async fn release_publish(
        &self,
        key: &KeyHash,
        token: &str,
    ) -> Result<bool, BackendError> {
        let (lk, channel) = (self.lock_key(key), self.wake_channel(key));
        let held: i64 = self
            .conn
            .run_always(|mut c| async move {
                scripts::RELEASE_PUBLISH
                    .key(lk)
                    .arg(token)
                    .arg(&channel)
                    .arg(key.hex())
                    .arg(S::PUBLISH)
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
        key: &KeyHash,
        token: &str,
        status: u16,
        marker_ttl: Duration,
    ) -> Result<bool, BackendError> {
        let (lk, fk, channel) = (
            self.lock_key(key),
            self.fail_key(key),
            self.wake_channel(key),
        );
        let tail = wake::failure_tail(status);
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
                    .arg(&channel)
                    .arg(message)
                    .arg(S::PUBLISH)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(held == 1)
    }

    pub(crate) async fn extend(
        &self,
        key: &KeyHash,
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

    /// Purges the value (see [`Tier::remove`](super::Tier::remove)).
    pub(crate) async fn remove(
        &self,
        key: &KeyHash,
        generation_ttl: Duration,
    ) -> Result<(), BackendError> {
        let epoch = self.next_epoch().await?;
        self.remove_under(key, epoch, generation_ttl).await
    }

    /// Moves the purge epoch (its own call: the epoch lives in no key's slot).
    async fn next_epoch(&self) -> Result<u64, BackendError> {
        let ek = self.epoch_key();
        self.conn
            .run(|mut c| async move { redis::cmd("INCR").arg(ek).query_async(&mut c).await })
            .await
    }

    /// Purges one key as the `epoch`th purge.
    async fn remove_under(
        &self,
        key: &KeyHash,
        epoch: u64,
        generation_ttl: Duration,
    ) -> Result<(), BackendError> {
        let (vk, gk) = (self.value_key(key), self.gen_key(key));
        let mut message = key.hex().into_bytes();
        message.extend_from_slice(wake::INVALIDATED);
        message.extend_from_slice(epoch.to_string().as_bytes());
        let () = self
            .conn
            .run(|mut c| async move {
                scripts::REMOVE
                    .key(vk)
                    .key(gk)
                    .arg(&self.broadcast)
                    .arg(message)
                    .arg(millis(generation_ttl))
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(())
    }

    /// Purges every value recorded under `tag`, key by key (a Cluster keeps them in other
    /// slots), then announces the tag itself, so that a fill of a tagged key running
    /// anywhere does not share its answer.
    pub(crate) async fn purge_tag(
        &self,
        tag: &str,
        tag_hash: &KeyHash,
        generation_ttl: Duration,
    ) -> Result<u64, BackendError> {
        let epoch = self.next_epoch().await?;
        let tk = self.tag_key(tag);
        // The tag is announced first: a node that then hears its entries' purges has
        // noted the tag's already (one channel, in order), so a fill of a tagged key that
        // starts after the purge is never mistaken for one it overtook.
        let mut message = tag_hash.hex().into_bytes();
        message.extend_from_slice(wake::INVALIDATED);
        message.extend_from_slice(epoch.to_string().as_bytes());
        let (members,): (Vec<Vec<u8>>,) = {
            let (tk, broadcast) = (tk.clone(), self.broadcast.clone());
            self.conn
                .run(|mut c| async move {
                    redis::pipe()
                        .cmd("SMEMBERS")
                        .arg(tk)
                        .cmd("PUBLISH")
                        .arg(broadcast)
                        .arg(message)
                        .ignore()
                        .query_async(&mut c)
                        .await
                })
                .await?
        };
        let mut purged = 0;
        for member in &members {
            let Some(hash) = super::parse_hex(member) else {
                continue;
            };
            self.remove_under(&KeyHash(hash), epoch, generation_ttl)
                .await?;
            purged += 1;
        }
        let () = self
            .conn
            .run(|mut c| async move { redis::cmd("DEL").arg(tk).query_async(&mut c).await })
            .await?;
        Ok(purged)
    }

    /// The purge epoch: how many purges the tier has seen.
    pub(crate) async fn epoch(&self) -> Result<u64, BackendError> {
        let ek = self.epoch_key();
        let epoch: Option<u64> = self
            .conn
            .run(|mut c| async move { redis::cmd("GET").arg(ek).query_async(&mut c).await })
            .await?;
        Ok(epoch.unwrap_or(0))
    }

    /// Reads a value without taking anything (read-only: it works while Redis refuses
    /// writes). Values larger than `max_value` read as absent.
    pub(crate) async fn read(
        &self,
        key: &KeyHash,
        max_value: usize,
    ) -> Result<Option<Bytes>, BackendError> {
        let vk = self.value_key(key);
        let value: Option<Vec<u8>> = self
            .conn
            .run(|mut c| async move {
                redis::cmd("EVAL_RO")
                    .arg(scripts::READ_VALUE)
                    .arg(1)
                    .arg(vk)
                    .arg(range_end(max_value))
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(value.map(Bytes::from))
    }

    /// One `PING` under the deadline, whatever the breaker says (and without feeding it).
    pub(crate) async fn ping(&self) -> Result<(), BackendError> {
        self.conn
            .run_always(|mut c| async move {
                redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .map(drop)
            })
            .await
    }

    /// Whether the breaker is skipping Redis (or testing it with one trial) now.
    pub(crate) fn breaker_open(&self) -> bool {
        self.conn.breaker().is_open()
    }
}
