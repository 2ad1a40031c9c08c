//! Redis behind Sentinel (feature `sentinel`): the single-Redis tier on whichever server
//! the sentinels name master. The connection asks them again when the one it has fails
//! (refused, dropped, or `READONLY`: a demoted master), so after a failover the next call
//! goes to the promoted replica; the wake-up subscription does the same when it
//! reconnects. Calls during the failover fail, and the tier's error policy answers them
//! (fail open by default).

use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::sentinel::{SentinelClient, SentinelServerType};
use redis::{Cmd, ConnectionInfo, RedisError, RedisFuture, RedisResult, Value};

use super::conn::{manager, Source};
use super::wake::{self, WakeSink, Wakers};

/// The sentinels, the master's name, and TLS material for the Redis servers.
#[derive(Clone)]
pub(crate) struct SentinelConfig {
    sentinels: Vec<ConnectionInfo>,
    name: String,
    #[cfg(feature = "tls")]
    pub(crate) certs: Option<redis::TlsCertificates>,
}

/// Where the master is, as the sentinels say: asked once, and again after a failure.
#[derive(Clone)]
pub(crate) struct SentinelSource {
    pub(crate) config: Arc<SentinelConfig>,
    resolver: Arc<tokio::sync::Mutex<Option<SentinelClient>>>,
}

impl SentinelSource {
    pub(crate) fn new(name: String, sentinels: Vec<ConnectionInfo>) -> RedisResult<Self> {
        let source = SentinelSource {
            config: Arc::new(SentinelConfig {
                sentinels,
                name,
                #[cfg(feature = "tls")]
                certs: None,
            }),
            resolver: Arc::default(),
        };
        source.client().map(|_| source)
    }

    fn client(&self) -> RedisResult<SentinelClient> {
        let cfg = &self.config;
        #[cfg(feature = "tls")]
        if let Some(certs) = &cfg.certs {
            let addrs = cfg.sentinels.iter().map(|i| i.addr().clone());
            return redis::sentinel::SentinelClientBuilder::new(
                addrs,
                cfg.name.clone(),
                SentinelServerType::Master,
            )?
            .set_client_to_redis_certificates(certs.clone())
            .build();
        }
        SentinelClient::build(
            cfg.sentinels.clone(),
            cfg.name.clone(),
            None,
            SentinelServerType::Master,
        )
    }

    /// A client for the server the sentinels name master now.
    pub(crate) async fn master(&self) -> RedisResult<redis::Client> {
        let mut resolver = self.resolver.lock().await;
        if resolver.is_none() {
            *resolver = Some(self.client()?);
        }
        let client = resolver.as_mut().expect("set above");
        client.async_get_client().await
    }
}

impl Source for SentinelSource {
    type Conn = SentinelConn;

    const KIND: &'static str = "redis-sentinel";

    async fn open(&self, timeout: Duration) -> RedisResult<SentinelConn> {
        Ok(SentinelConn {
            source: self.clone(),
            current: Arc::default(),
            timeout,
        })
    }

    fn address(&self) -> String {
        let first = self
            .config
            .sentinels
            .first()
            .map(|info| super::address_of(info.addr()))
            .unwrap_or_else(|| "?".to_owned());
        format!("master {:?} via sentinel {first}", self.config.name)
    }

    fn subscription(
        self,
        prefix: String,
        wakers: Arc<Wakers>,
        sink: Weak<dyn WakeSink>,
        timeout: Duration,
    ) -> impl Future<Output = ()> + Send + 'static {
        let connect = move || {
            let source = self.clone();
            async move { source.master().await?.get_async_pubsub().await }
        };
        wake::subscribe(connect, prefix, wakers, sink, timeout)
    }
}

/// A connection to the current master: a reconnecting connection to the server last
/// named, replaced by one to the server named next when it fails.
#[derive(Clone)]
pub(crate) struct SentinelConn {
    source: SentinelSource,
    current: Arc<Mutex<Option<ConnectionManager>>>,
    timeout: Duration,
}

/// A failure after which the master may be another server.
fn moved(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.code() == Some("READONLY")
        || e.code() == Some("MASTERDOWN")
}

impl SentinelConn {
    async fn connection(&self) -> RedisResult<ConnectionManager> {
        if let Some(c) = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Ok(c);
        }
        let conn = manager(self.source.master().await?, self.timeout)?;
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
        Ok(conn)
    }

    fn judge<T>(&self, result: &RedisResult<T>) {
        if result.as_ref().is_err_and(moved) {
            self.current
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
        }
    }
}

impl ConnectionLike for SentinelConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let result = match self.connection().await {
                Ok(mut conn) => conn.req_packed_command(cmd).await,
                Err(e) => Err(e),
            };
            self.judge(&result);
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let result = match self.connection().await {
                Ok(mut conn) => conn.req_packed_commands(pipeline, offset, count).await,
                Err(e) => Err(e),
            };
            self.judge(&result);
            result
        })
    }

    fn get_db(&self) -> i64 {
        0
    }
}
