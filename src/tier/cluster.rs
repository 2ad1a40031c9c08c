//! Redis Cluster (feature `cluster`): the Redis tier's scripts on a cluster connection,
//! each routed to the master of its keys' slot (a key's value, lock and failure marker
//! share one hash tag, so one slot), and wake-ups over sharded pub/sub: a key's channel
//! `prefix:{hash}:wake` lives in that same slot, so the script that ends a fill publishes
//! with `SPUBLISH` on the shard that holds the key, and a waiting node `SSUBSCRIBE`s there.
//! The broadcast channel (invalidations) is a plain `PUBLISH`, which a Cluster forwards to
//! every node.
//!
//! After a topology change (a master failed over) the shard channels are subscribed again
//! by the subscription itself: on a `Disconnection` push, on a shard's `SUNSUBSCRIBE`
//! push (its slot moved), and, for a subscription refused while the shard has no master,
//! again after a short pause. Messages sent during a failover are lost; waiters fall back
//! to polling, and the keys of the failing shard fail open meanwhile (the tier's error
//! policy).

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{ConnectionInfo, PushKind, RedisResult, Value};

use super::conn::Source;
use super::parse_hex;
use super::wake::{
    bounded, broadcast_channel, dispatch, jittered_backoff, key_channel, sleep_until, Live,
    WakeSink, Wakers,
};

/// How long a shard channel whose subscription was refused waits before the next try.
const RETRY: Duration = Duration::from_millis(200);

/// The nodes a Cluster is reached through (any of them: the rest are discovered), and the
/// TLS material for `rediss://` nodes.
#[derive(Clone)]
pub(crate) struct ClusterSource {
    nodes: Vec<ConnectionInfo>,
    #[cfg(feature = "tls")]
    pub(crate) certs: Option<redis::TlsCertificates>,
}

impl ClusterSource {
    pub(crate) fn new(nodes: Vec<ConnectionInfo>) -> Self {
        ClusterSource {
            nodes,
            #[cfg(feature = "tls")]
            certs: None,
        }
    }

    /// A builder on the seed nodes, with deadlines and the TLS material.
    fn builder(&self, timeout: Duration) -> ClusterClientBuilder {
        let builder = ClusterClientBuilder::new(self.nodes.clone())
            .connection_timeout(timeout.max(Duration::from_secs(1)))
            .response_timeout(timeout)
            .retries(1)
            .min_retry_wait(10)
            .max_retry_wait(timeout.as_millis().min(u64::MAX as u128) as u64);
        #[cfg(feature = "tls")]
        let builder = match &self.certs {
            Some(certs) => builder.certs(certs.clone()),
            None => builder,
        };
        builder
    }

    /// Checks that the seed list is usable (at least one node).
    pub(crate) fn check(&self) -> RedisResult<()> {
        ClusterClient::builder(self.nodes.clone()).build().map(drop)
    }
}

impl Source for ClusterSource {
    type Conn = ClusterConnection;

    const PUBLISH: &'static str = "SPUBLISH";
    const KIND: &'static str = "redis-cluster";

    async fn open(&self, timeout: Duration) -> RedisResult<ClusterConnection> {
        self.builder(timeout).build()?.get_async_connection().await
    }

    fn address(&self) -> String {
        let first = self
            .nodes
            .first()
            .map(|info| super::address_of(info.addr()))
            .unwrap_or_else(|| "?".to_owned());
        format!("{first} (cluster)")
    }

    fn subscription(
        self,
        prefix: String,
        wakers: Arc<Wakers>,
        sink: Weak<dyn WakeSink>,
        timeout: Duration,
    ) -> impl Future<Output = ()> + Send + 'static {
        subscribe(self, prefix, wakers, sink, timeout)
    }
}

/// The key hash of a shard channel of ours, `prefix:{hash}:wake`.
fn channel_hash(prefix: &str, channel: &[u8]) -> Option<[u8; 32]> {
    let rest = channel
        .strip_prefix(prefix.as_bytes())?
        .strip_prefix(b":{")?;
    let hex = rest.strip_suffix(b"}:wake")?;
    parse_hex(hex)
}

/// The node's pub/sub on a Cluster: one RESP3 cluster connection whose pushes carry the
/// messages, the broadcast channel subscribed with `SUBSCRIBE`, key channels with
/// `SSUBSCRIBE` (one command each: each may live on another shard).
async fn subscribe(
    source: ClusterSource,
    prefix: String,
    wakers: Arc<Wakers>,
    sink: Weak<dyn WakeSink>,
    timeout: Duration,
) {
    let broadcast = broadcast_channel(&prefix);
    let limit = timeout.max(Duration::from_secs(1));
    let mut backoff = Duration::from_millis(50);
    loop {
        let session = async {
            let (tx, mut pushes) = tokio::sync::mpsc::unbounded_channel();
            let client = source
                .builder(timeout)
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(tx)
                .build()
                .map_err(|e| e.to_string())?;
            let mut conn = bounded(limit, client.get_async_connection()).await?;
            bounded(limit, conn.subscribe(&broadcast)).await?;
            tracing::debug!(channel = %broadcast, "subscribed to wake-ups on the cluster");
            let mut live = Live::default();
            wakers.take_dirty();
            let mut pending = wakers.wanted();
            // Key channels refused (their shard has no master right now), for another try.
            let mut refused: Vec<[u8; 32]> = Vec::new();
            let mut retry_at: Option<Instant> = None;
            loop {
                if !pending.is_empty() {
                    let (add, remove) = live.changes(&wakers, std::mem::take(&mut pending));
                    for hash in remove {
                        // A failed unsubscribe leaves a channel nobody reads: harmless.
                        let _ =
                            bounded(limit, conn.sunsubscribe(key_channel(&prefix, &hash))).await;
                    }
                    let subscribing = add.iter().map(|hash| {
                        let mut conn = conn.clone();
                        let channel = key_channel(&prefix, hash);
                        async move { (*hash, bounded(limit, conn.ssubscribe(channel)).await) }
                    });
                    for (hash, done) in futures_util::future::join_all(subscribing).await {
                        match done {
                            // Confirmed: a fill that landed before is in the tier now.
                            Ok(()) => wakers.confirm(&hash),
                            Err(e) => {
                                tracing::debug!(error = %e, "shard channel not subscribed; trying again shortly");
                                live.forget(&hash);
                                refused.push(hash);
                            }
                        }
                    }
                    if !refused.is_empty() && retry_at.is_none() {
                        retry_at = Some(Instant::now() + RETRY);
                    }
                }
                let next = match (wakers.expire(), retry_at) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                tokio::select! {
                    push = pushes.recv() => {
                        let Some(push) = push else {
                            return Err("push channel closed".to_owned());
                        };
                        match push.kind {
                            PushKind::Message | PushKind::SMessage => {
                                if let Some(Value::BulkString(payload)) = push.data.get(1) {
                                    if !dispatch(&sink, &wakers, payload).await {
                                        return Ok(());
                                    }
                                }
                            }
                            // A node's connection went: subscribe everything again (the
                            // client's own re-subscription is not relied upon).
                            PushKind::Disconnection => {
                                tracing::debug!("cluster pub/sub connection lost; subscribing again");
                                wakers.unconfirm_all();
                                bounded(limit, conn.subscribe(&broadcast)).await?;
                                live.clear();
                                pending = wakers.wanted();
                            }
                            // A shard dropped one of our channels (its slot moved).
                            PushKind::SUnsubscribe => {
                                let hash = match push.data.first() {
                                    Some(Value::BulkString(ch)) => channel_hash(&prefix, ch),
                                    _ => None,
                                };
                                if let Some(hash) = hash.filter(|h| live.contains(h)) {
                                    live.forget(&hash);
                                    wakers.unconfirm(&hash);
                                    pending.push(hash);
                                }
                            }
                            _ => {}
                        }
                    }
                    _ = wakers.changed() => {}
                    _ = sleep_until(next) => {}
                }
                pending.extend(wakers.take_dirty());
                if retry_at.is_some_and(|at| at <= Instant::now()) {
                    retry_at = None;
                    pending.append(&mut refused);
                }
            }
        };
        let connected_at = tokio::time::Instant::now();
        let ended = session.await;
        wakers.unconfirm_all();
        match ended {
            Ok(()) => return,
            Err(e) => {
                tracing::debug!(error = %e, "cluster wake-up subscription lost; polling covers the gap")
            }
        }
        if connected_at.elapsed() > Duration::from_secs(5) {
            backoff = Duration::from_millis(50);
        }
        backoff = jittered_backoff(backoff).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_channels_name_their_key() {
        let h = [0x5a; 32];
        let channel = key_channel("p", &h);
        assert_eq!(channel_hash("p", channel.as_bytes()), Some(h));
        assert_eq!(channel_hash("q", channel.as_bytes()), None);
        assert_eq!(channel_hash("p", b"p:ready"), None);
        assert_eq!(channel_hash("p", b"p:{zz}:wake"), None);
    }
}
