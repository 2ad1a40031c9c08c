//! A caching reverse proxy with fleet-wide stampede protection.
//!
//! Every `GET`/`HEAD` goes through a [`StampedeLayer`]: answers are kept in this process's
//! memory (L1) and, with `--redis`, in Redis (L2) shared by every proxy of the fleet. When
//! many clients ask for the same cold URL at once, on one proxy or on many, the upstream
//! sees **one** request; everybody else waits for its answer (woken through Redis pub/sub).
//! Each response says how it was produced in an RFC 9211 `Cache-Status` header.
//!
//! ```text
//! # one node, in-process cache only
//! cargo run --example proxy -- --upstream http://127.0.0.1:9000
//!
//! # a fleet: run this several times (different --listen), all with the same Redis
//! cargo run --example proxy -- --upstream http://127.0.0.1:9000 \
//!     --listen 127.0.0.1:8081 --redis redis://127.0.0.1:6379/ \
//!     --ttl 30s --lease 5s --metrics-listen 127.0.0.1:9100
//!
//! curl -si http://127.0.0.1:8081/some/page | grep -i cache-status
//! #   cache-status: tower-stampede; fwd=miss; stored     (first request)
//! #   cache-status: tower-stampede; hit; detail=memory   (afterwards)
//! curl -s http://127.0.0.1:9100/metrics | grep tower_stampede
//! ```
//!
//! What the proxy does around the layer:
//!
//! * forwards method, path, query, headers and body to the upstream over a pooled
//!   keep-alive client, with the `Host` rewritten to the upstream's;
//! * removes hop-by-hop headers (`Connection` and the headers it names, `Keep-Alive`,
//!   `Proxy-Authenticate`, `Proxy-Authorization`, `TE`, `Trailer`, `Transfer-Encoding`,
//!   `Upgrade`) in both directions, so protocol upgrades (WebSocket) are not proxied;
//! * builds the forwarding headers itself, from the connection: `X-Forwarded-For: <peer
//!   IP>`, `X-Forwarded-Proto: http` and `Forwarded: for=<peer>;proto=http` (RFC 7239, an
//!   IPv6 peer quoted in brackets), and drops every forwarding header the client sent
//!   ([`FORWARDING_HEADERS`]: `X-Forwarded-*`, `Forwarded`, `X-Real-IP`, `X-Host`, ...):
//!   the key does not hold them, so a value one client sent would be stored and served to
//!   everyone. Only from a peer inside `--trusted-proxies` are the `X-Forwarded-For` and
//!   `Forwarded` chains kept, with this hop appended;
//! * sends `X-Forwarded-Host` only with `--key-host`, which also puts the client's `Host`
//!   into the key (two hosts never share an entry); without it the client's `Host` reaches
//!   the upstream in no header at all;
//! * drops the URL rewrite and method override headers ([`REWRITE_HEADERS`]:
//!   `X-Original-URL`, `X-Rewrite-URL`, `X-HTTP-Method-Override`, ...) from `GET`/`HEAD`
//!   requests, which would otherwise store one resource's answer under another's key;
//! * forwards a header named by `--forward-header` as the client sent it (for
//!   `X-Forwarded-For` and `Forwarded`, with this hop appended), even one of the lists
//!   above, and keys on its value, so answers that `Vary` on it are stored too;
//! * sends a `GET`/`HEAD` that carries a body straight to the upstream, never cached nor
//!   coalesced (`Cache-Status: ...; fwd=bypass; detail=request-body`, or `detail=key` for
//!   an HTTP/2 body announced by neither `Content-Length` nor `Transfer-Encoding`);
//! * streams bodies both ways (the layer buffers only answers it stores, up to
//!   `--max-body`; bigger ones stream through and are not stored);
//! * answers `502 Bad Gateway` when the upstream cannot be reached and `504 Gateway
//!   Timeout` when its response head does not arrive within `--upstream-timeout`;
//! * keys the cache on method, upstream and path+query (plus the `--forward-header`
//!   values), never on the `Host` the client used unless `--key-host` says so, so proxies
//!   reached under different names or ports coalesce together;
//! * serves HTTP/1.1 and HTTP/2 (prior knowledge), shuts down gracefully on SIGINT/SIGTERM,
//!   and logs through `tracing` (filter with `RUST_LOG`, default `info`).
//!
//! Once it is ready it logs `listening on ADDR` with the bound address (so `--listen
//! 127.0.0.1:0` works), and `metrics on http://ADDR/metrics` with `--metrics-listen`.
//!
//! At start-up it asks Redis once ([`StampedeLayer::check_backend`]) and logs what it
//! found: `redis at ADDR answered`, `redis at ADDR unreachable: connection refused; serving
//! from this process only until it answers`, `redis rejected our credentials (WRONGPASS):
//! check the URL's password`, ... With `--require-redis` a Redis that does not answer
//! stops it instead (the same line at ERROR, non-zero exit).
//!
//! The `--metrics-listen` address also serves `GET /healthz` (200 while the process runs,
//! with a JSON body: backend, `"redis":"up"|"down"`, `"breaker":"closed"|"open"`, L1
//! figures; a node whose Redis is down still serves, from its own memory, so it is live)
//! and `GET /readyz` (503 until the proxy listener is serving, then 200; with
//! `--require-redis`, 503 again whenever Redis does not answer, and 200 once it does).

/// mimalloc instead of the system allocator: the resident memory stays closer to the
/// cache's bound under eviction churn (see the README's "Memory" figures).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "common/process.rs"]
mod process;

use std::convert::Infallible;
use std::future::Future;
use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use futures_util::future::Either;
use futures_util::FutureExt as _;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Incoming};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tower::{Layer, Service, ServiceExt};
use tower_stampede::{Backend, BackendHealth, RedisState, StampedeBody, StampedeLayer};
use tracing_subscriber::EnvFilter;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of everything the forwarding service answers: the upstream's body streamed,
/// or a short error text.
type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Command-line flags.
#[derive(Parser, Debug)]
#[command(
    name = "proxy",
    about = "A caching reverse proxy: one upstream call per cold URL across a whole fleet"
)]
struct Args {
    /// Address to listen on; port 0 picks a free port (the bound address is logged).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,

    /// The upstream's base URL, `http://host:port` (an optional path is prefixed to every
    /// request path).
    #[arg(long)]
    upstream: Uri,

    /// Redis URL for the shared cache and cross-node coalescing, e.g.
    /// `redis://127.0.0.1:6379/`. Without it each proxy caches and coalesces on its own.
    #[arg(long, env = "REDIS_URL")]
    redis: Option<String>,

    /// A Redis Cluster instead of one Redis: some of its nodes' URLs, comma-separated
    /// (`redis://10.0.0.1:6379,redis://10.0.0.2:6379`; the rest are discovered).
    #[cfg(feature = "cluster")]
    #[arg(long, value_delimiter = ',', conflicts_with = "redis")]
    redis_cluster: Vec<String>,

    /// Redis behind Sentinel instead of one Redis: the master's name, `@`, the sentinels'
    /// URLs comma-separated (`mymaster@redis://10.0.0.1:26379,redis://10.0.0.2:26379`).
    #[cfg(feature = "sentinel")]
    #[arg(long, conflicts_with = "redis")]
    redis_sentinel: Option<String>,

    /// For `rediss://` URLs: verify the server against this CA certificate (PEM) instead
    /// of the system's roots.
    #[cfg(feature = "tls")]
    #[arg(long, value_name = "FILE")]
    redis_ca: Option<std::path::PathBuf>,

    /// For `rediss://` URLs: present this client certificate (PEM) to a server that asks
    /// for one; needs `--redis-client-key`.
    #[cfg(feature = "tls")]
    #[arg(long, value_name = "FILE", requires = "redis_client_key")]
    redis_client_cert: Option<std::path::PathBuf>,

    /// The key (PEM) of `--redis-client-cert`.
    #[cfg(feature = "tls")]
    #[arg(long, value_name = "FILE", requires = "redis_client_cert")]
    redis_client_key: Option<std::path::PathBuf>,

    /// Fail at start-up (non-zero exit) unless Redis answers, and afterwards answer
    /// `/readyz` with 503 whenever Redis does not. Without it a proxy whose Redis is down
    /// starts anyway, serves from its own memory until Redis answers, and stays ready.
    #[arg(long)]
    require_redis: bool,

    /// Log lines as `text` (default) or `json` (one object a line).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// How long an answer without explicit freshness (no `s-maxage`, `max-age` or
    /// `Expires`) is fresh (`500ms`, `5s`, `1m`, ...). The default, 0, leaves such answers
    /// unstored, as nginx does. Answers with explicit freshness follow it (RFC 9111).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    ttl: Duration,

    /// One TTL for every storable answer, whatever its headers say (the fixed TTL of
    /// earlier versions).
    #[arg(long, value_parser = humantime::parse_duration)]
    ttl_override: Option<Duration>,

    /// Heuristic freshness for answers with `Last-Modified` and no explicit freshness: a
    /// tenth of their age, at most `--heuristic-max` (RFC 9111 4.2.2).
    #[arg(long)]
    heuristic: bool,

    /// The cap of `--heuristic`.
    #[arg(long, default_value = "1d", value_parser = humantime::parse_duration)]
    heuristic_max: Duration,

    /// How long past freshness an answer with `ETag` or `Last-Modified` is kept, to be
    /// revalidated with a conditional request instead of fetched again.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    revalidate_window: Duration,

    /// Store 5xx and 429 answers without explicit freshness for this long (0: shared with
    /// the requests waiting on them, never stored).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    error_ttl: Duration,

    /// The most variants stored per URL for answers that `Vary` on request headers.
    #[arg(long, default_value_t = 16)]
    max_variants: usize,

    /// Send clients' `Cache-Control: no-cache`, `max-age=0` and `Pragma: no-cache` requests
    /// upstream (by default they are answered from the cache, which protects the upstream).
    #[arg(long)]
    honor_client_no_cache: bool,

    /// The name of this cache's own targeted cache-control field (RFC 9213), read before
    /// `CDN-Cache-Control` and `Cache-Control`, never forwarded downstream:
    /// `<target>-cache-control`.
    #[arg(long, default_value = "tower-stampede-cache-control", value_parser = targeted_name)]
    targeted_cache_control: HeaderName,

    /// Do not normalize and key `Accept-Encoding`; answers varying on it are then stored
    /// per variant.
    #[arg(long)]
    no_key_accept_encoding: bool,

    /// Stale-while-revalidate: for this long after the TTL, a stale answer is served at once
    /// while exactly one refresh runs across the fleet; it is also served if that refresh
    /// fails (stale-if-error).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    grace: Duration,

    /// The lease of the fill lock (it is extended while the upstream call runs).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    lease: Duration,

    /// The largest body stored, in bytes; bigger answers stream through unstored.
    #[arg(long, default_value_t = 1024 * 1024)]
    max_body: usize,

    /// The bound of the in-process cache (L1), in bytes of keys, headers and bodies.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    cache_size: u64,

    /// Prefix of the Redis keys and wake-up channel; proxies that coalesce together use
    /// the same one.
    #[arg(long, default_value = "stampede")]
    prefix: String,

    /// How long to wait for the upstream's response head before answering 504.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    upstream_timeout: Duration,

    /// The deadline on each Redis call; past it (or after repeated failures) a proxy falls
    /// back to coalescing within itself.
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    redis_timeout: Duration,

    /// Serve Prometheus metrics at `http://ADDR/metrics`, and `/healthz` and `/readyz`
    /// (port 0 picks a free port).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,

    /// Tokio worker threads (default: one per CPU). One runs a current-thread runtime, on
    /// which the commands of concurrent requests leave for Redis in one write.
    #[arg(long)]
    workers: Option<usize>,

    /// Leave transparent huge pages as the system has them. By default the proxy turns
    /// them off for itself (Linux): with them, a burst of requests that touches fresh heap
    /// faults in and zeroes 2 MiB at a time, in the middle of the burst (README,
    /// Performance).
    #[arg(long)]
    huge_pages: bool,

    /// Peers (CIDR blocks or addresses, comma separated: `10.0.0.0/8,::1`) whose
    /// `X-Forwarded-For` and `Forwarded` chains are kept, with this hop appended. From any
    /// other peer those headers are replaced by ones built from the connection. A trusted
    /// proxy must drop what its own clients send: the chain is not part of the key.
    #[arg(long, value_delimiter = ',', value_name = "CIDR,...")]
    trusted_proxies: Vec<Cidr>,

    /// Put the client's `Host` into the key (two hosts never share an entry) and send it
    /// upstream as `X-Forwarded-Host`. Without it the client's `Host` is not used.
    #[arg(long)]
    key_host: bool,

    /// A request header to forward as the client sent it (repeatable, or comma separated),
    /// even one the proxy drops otherwise; its value becomes part of the key.
    #[arg(long = "forward-header", value_delimiter = ',', value_name = "NAME", value_parser = parse_forward_header)]
    forward_headers: Vec<HeaderName>,

    /// Peers (CIDR blocks or addresses) allowed to `PURGE`: `PURGE /path?query` purges that
    /// URL (all its variants), `PURGE` with `Surrogate-Key: tag1 tag2` purges those tags,
    /// fleet-wide. Others get 405 and nothing happens.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "CIDR,...",
        default_value = "127.0.0.0/8,::1"
    )]
    purge_allow: Vec<Cidr>,

    /// A token that allows `PURGE` from anywhere, sent as `Authorization: Bearer TOKEN`.
    #[arg(long, env = "PURGE_TOKEN", hide_env_values = true)]
    purge_token: Option<String>,

    /// Soft timeout: when a stale copy is usable (`--grace`) and the upstream takes longer
    /// than this, the waiting clients get the stale copy at once and the fill goes on in
    /// the background, storing when it lands. Off by default.
    #[arg(long, value_parser = humantime::parse_duration)]
    soft_timeout: Option<Duration>,
}

/// `--targeted-cache-control`: a header name of the form the layer takes,
/// `<target>-cache-control` (any other field would be read as this cache's directives and
/// removed from every answer).
fn targeted_name(s: &str) -> Result<HeaderName, String> {
    let name = HeaderName::from_bytes(s.as_bytes()).map_err(|e| e.to_string())?;
    match name.as_str().strip_suffix("-cache-control") {
        Some(target) if !target.is_empty() => Ok(name),
        _ => Err(format!(
            "`{s}` is not a targeted field name: <target>-cache-control"
        )),
    }
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines (coloured only on a terminal).
    Text,
    /// One JSON object a line.
    Json,
}

fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    if !args.huge_pages {
        process::no_huge_pages();
    }
    let logs = tracing_subscriber::fmt().with_env_filter(
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    );
    match args.log_format {
        LogFormat::Text => logs.with_ansi(std::io::stdout().is_terminal()).init(),
        LogFormat::Json => logs.json().with_ansi(false).init(),
    }

    let result = process::runtime(args.workers)?.block_on(run(args));
    if let Err(e) = &result {
        tracing::error!(error = %e, "proxy failed");
    }
    result
}

async fn run(args: Args) -> Result<(), BoxError> {
    let origin = Origin::parse(&args.upstream)?;

    // The recorder goes in before the layer is built: the layer registers its series then.
    let metrics = match args.metrics_listen {
        Some(addr) => Some(metrics_listener(addr).await?),
        None => None,
    };

    let backend = backend(&args)?;
    if args.require_redis && backend.is_local() {
        return Err("--require-redis needs --redis (or --redis-cluster, --redis-sentinel)".into());
    }

    let origin_key = origin.base.clone();
    let key_host = args.key_host;
    let layer = StampedeLayer::builder()
        .backend(backend)
        .prefix(args.prefix.clone())
        .l1_capacity(args.cache_size)
        // A standards cache (RFC 9111, shared): freshness from the answer's headers.
        .honor_cache_control(true)
        .ttl(args.ttl)
        .ttl_override(args.ttl_override)
        .heuristic_freshness(if args.heuristic {
            args.heuristic_max
        } else {
            Duration::ZERO
        })
        .revalidate_window(args.revalidate_window)
        .error_ttl(args.error_ttl)
        .max_variants(args.max_variants)
        .honor_request_no_cache(args.honor_client_no_cache)
        .targeted_cache_control(args.targeted_cache_control.clone())
        .key_accept_encoding(!args.no_key_accept_encoding)
        .grace(args.grace)
        .stale_if_error(args.grace)
        .lease(args.lease)
        .max_body(args.max_body)
        .redis_timeout(args.redis_timeout)
        // The proxy answers 504 when the response head is late; the layer's limit also
        // covers buffering a body it stores, so give it that much again.
        .upstream_timeout(args.upstream_timeout.saturating_mul(2))
        // The key must not depend on the Host the client used: every proxy of the fleet
        // (whatever its name or port) forwards to the same upstream.
        // With `--key-host` the client's Host is forwarded, so the key holds it.
        .key_fn(move |parts| {
            if parts.extensions.get::<UnframedBody>().is_some() {
                return None;
            }
            let pq = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
            let method = parts.method.as_str();
            let mut key = String::with_capacity(method.len() + origin_key.len() + pq.len() + 64);
            for part in [method, " ", &origin_key, pq] {
                key.push_str(part);
            }
            if key_host {
                key.push_str("\nhost:");
                key.push_str(client_host(parts).as_deref().unwrap_or(""));
            }
            Some(key)
        })
        // The headers forwarded as the client sent them are keyed.
        .vary(args.forward_headers.clone());
    let layer = match args.soft_timeout {
        Some(soft) => layer.soft_timeout(soft),
        None => layer,
    }
    .build();

    let ready = Arc::new(AtomicBool::new(false));
    if let Some((listener, handle)) = metrics {
        let ops = Ops {
            handle,
            layer: layer.clone(),
            ready: ready.clone(),
            require_redis: args.require_redis,
            last: Arc::new(tokio::sync::Mutex::new(None)),
        };
        serve_ops(listener, ops);
    }

    // What the backend looks like, once, now: a wrong URL shows at start-up, not at the
    // first request. Bounded by the Redis deadline (about 1 s for the first connection).
    if args.require_redis {
        let health = layer.probe_backend().await;
        if !health.is_up() {
            tracing::error!("{health}");
            return Err("--require-redis: redis did not answer".into());
        }
        tracing::info!("{health}");
    } else {
        layer.check_backend().await;
    }

    let forwarding = Forwarding {
        trusted: args.trusted_proxies.clone(),
        key_host: args.key_host,
        operator: args.forward_headers.clone(),
    };
    let forward = Forward::new(origin, args.upstream_timeout, forwarding);
    let purging = Arc::new(Purging {
        layer: layer.clone(),
        allow: args.purge_allow.clone(),
        token: args.purge_token.clone(),
        key_host: args.key_host,
    });

    let listener = TcpListener::bind(args.listen).await?;
    let local = listener.local_addr()?;
    tracing::info!(
        upstream = %args.upstream,
        ttl = ?args.ttl,
        ttl_override = ?args.ttl_override,
        grace = ?args.grace,
        lease = ?args.lease,
        max_body = args.max_body,
        upstream_timeout = ?args.upstream_timeout,
        redis_timeout = ?args.redis_timeout,
        trusted_proxies = ?args.trusted_proxies,
        key_host = args.key_host,
        forward_headers = ?args.forward_headers,
        "proxy ready"
    );
    // Ready from here: the listener is bound (connections queue until the loop below
    // accepts them), so whoever reads the next line finds /readyz answering 200.
    ready.store(true, Ordering::Release);
    // A stable line: tests and scripts read the bound address from it.
    tracing::info!("listening on {local}");

    let server = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);

    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let stack = layer.layer(forward.for_peer(peer));
                let purging = purging.clone();
                let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    if req.method().as_str() == "PURGE" {
                        let purging = purging.clone();
                        return Either::Left(Either::Left(Box::pin(async move {
                            Ok::<_, Infallible>(purging.handle(&req, peer.ip()).await)
                        })));
                    }
                    // An HTTP/2 body may come without `Content-Length`, where the layer
                    // cannot see it: such a GET/HEAD is not keyed either.
                    if matches!(*req.method(), Method::GET | Method::HEAD)
                        && !req.body().is_end_stream()
                        && !req.headers().contains_key(header::CONTENT_LENGTH)
                        && !req.headers().contains_key(header::TRANSFER_ENCODING)
                    {
                        req.extensions_mut().insert(UnframedBody);
                    }
                    // The stack takes the request here, in hyper's call, when it is ready at
                    // once (the forwarding service always is), not at its future's first poll:
                    // a hit is answered, and the request's head released, before hyper reads
                    // on. The head borrows hyper's read buffer; deferred, it makes hyper find
                    // the buffer shared and allocate a new one for every request.
                    // The purge and the deferred call are boxed: the future hyper holds and
                    // moves for every request is then no larger than the stack's own.
                    let mut stack = stack.clone();
                    if let Some(Ok(_)) = stack.ready().now_or_never() {
                        return Either::Right(stack.call(req));
                    }
                    Either::Left(Either::Right(Box::pin(stack.oneshot(req))))
                });
                let conn = server.serve_connection(TokioIo::new(stream), service).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }

    drop(listener);
    tracing::info!("shutting down: no new connections, finishing requests in flight");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(Duration::from_secs(10)) => {
            tracing::warn!("connections still open after 10 s; exiting anyway");
        }
    }
    Ok(())
}

/// Resolves on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}

/// The buckets of the layer's duration histograms, in seconds: from a memory hit to a
/// slow fill.
const DURATION_BUCKETS: [f64; 14] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Installs the Prometheus recorder for the `metrics` facade (histograms with buckets, not
/// summaries) and binds `addr` for the page. (The exporter's own listener cannot report a
/// port chosen by the OS, so the proxy serves the page itself.)
async fn metrics_listener(addr: SocketAddr) -> Result<(TcpListener, PrometheusHandle), BoxError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Prefix("tower_stampede_".to_owned()),
            &DURATION_BUCKETS,
        )?
        .install_recorder()?;
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tracing::info!("metrics on http://{local}/metrics");

    // The recorder's housekeeping (histogram draining, idle metrics).
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok((listener, handle))
}

/// What the operations endpoints (`/metrics`, `/healthz`, `/readyz`) need.
#[derive(Clone)]
struct Ops {
    handle: PrometheusHandle,
    layer: StampedeLayer,
    /// Set once the proxy listener serves.
    ready: Arc<AtomicBool>,
    /// `--require-redis`: ready only while Redis answers.
    require_redis: bool,
    /// The last backend probe and when it was made: `/healthz` and `/readyz` ask Redis at
    /// most once a second between them, however often they are called.
    last: Arc<tokio::sync::Mutex<Option<(tokio::time::Instant, BackendHealth)>>>,
}

/// How long a backend probe answers `/healthz` (and `/readyz` with `--require-redis`).
const HEALTH_FRESH: Duration = Duration::from_secs(1);

impl Ops {
    /// The backend's health, probed at most once per [`HEALTH_FRESH`]; callers that come
    /// while a probe runs wait for it (bounded by the Redis deadline) instead of adding one.
    async fn health(&self) -> BackendHealth {
        let mut last = self.last.lock().await;
        if let Some((at, health)) = &*last {
            if at.elapsed() < HEALTH_FRESH {
                return health.clone();
            }
        }
        let health = self.layer.probe_backend().await;
        *last = Some((tokio::time::Instant::now(), health.clone()));
        health
    }

    async fn page(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        match req.uri().path() {
            "/metrics" => {
                // Brings the L1 gauges up to date for this scrape.
                self.layer.memory().await;
                let mut res = Response::new(Full::new(Bytes::from(self.handle.render())));
                res.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                res
            }
            "/healthz" => {
                let health = self.health().await;
                let memory = self.layer.memory().await;
                let redis = match &health.redis {
                    RedisState::Up => "up",
                    RedisState::Down(_) => "down",
                    _ => "none",
                };
                let mut body = format!(
                    "{{\"status\":\"ok\",\"backend\":\"{}\",\"redis\":\"{redis}\",\"breaker\":\"{}\"",
                    health.backend,
                    if health.breaker_open { "open" } else { "closed" },
                );
                if let Some(address) = &health.address {
                    body.push_str(&format!(",\"address\":{}", json_string(address)));
                }
                if !health.is_up() {
                    body.push_str(&format!(
                        ",\"problem\":{}",
                        json_string(&health.to_string())
                    ));
                }
                body.push_str(&format!(
                    ",\"l1_entries\":{},\"l1_bytes\":{},\"capacity\":{}}}\n",
                    memory.l1_entries,
                    memory.bytes(),
                    memory.capacity
                ));
                json_response(StatusCode::OK, body)
            }
            "/readyz" => {
                if !self.ready.load(Ordering::Acquire) {
                    return json_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "{\"status\":\"starting\"}\n".to_owned(),
                    );
                }
                // A node that must not serve without Redis follows it: the same probe as
                // `/healthz` (shared, at most once a second, within the Redis deadline).
                if self.require_redis {
                    let health = self.health().await;
                    if !health.is_up() {
                        return json_response(
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!(
                                "{{\"status\":\"redis down\",\"problem\":{}}}\n",
                                json_string(&health.to_string())
                            ),
                        );
                    }
                }
                json_response(StatusCode::OK, "{\"status\":\"ready\"}\n".to_owned())
            }
            _ => text_response(StatusCode::NOT_FOUND, "try /metrics, /healthz or /readyz\n"),
        }
    }
}

/// Serves the operations endpoints on `listener`.
fn serve_ops(listener: TcpListener, ops: Ops) {
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let ops = ops.clone();
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let ops = ops.clone();
                async move { Ok::<_, Infallible>(ops.page(&req).await) }
            });
            tokio::spawn(async move {
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "metrics connection ended with an error");
                }
            });
        }
    });
}

/// `text` as a JSON string literal.
fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

/// The upstream's scheme, authority and path prefix.
#[derive(Clone, Debug)]
struct Origin {
    scheme: Scheme,
    authority: Authority,
    /// A path prefix without its trailing `/` (often empty).
    prefix: String,
    /// `http://host:port` plus the prefix, for the cache key.
    base: String,
    host: HeaderValue,
}

impl Origin {
    fn parse(uri: &Uri) -> Result<Origin, BoxError> {
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => {
                return Err(format!("--upstream: only http:// is supported, not {other}://").into())
            }
            None => {
                return Err(
                    "--upstream must be an absolute URL such as http://127.0.0.1:9000".into(),
                )
            }
        }
        let authority = uri.authority().ok_or("--upstream has no host")?.clone();
        if authority.as_str().contains('@') {
            return Err("--upstream must not contain credentials".into());
        }
        if uri.query().is_some() {
            return Err("--upstream must not have a query".into());
        }
        let prefix = uri.path().trim_end_matches('/').to_owned();
        Ok(Origin {
            scheme: Scheme::HTTP,
            base: format!("http://{authority}{prefix}"),
            host: HeaderValue::from_str(authority.as_str())?,
            authority,
            prefix,
        })
    }

    /// The upstream URI for a request's path and query.
    fn uri_for(&self, uri: &Uri) -> Result<Uri, http::Error> {
        let pq = uri.path_and_query().map_or("/", PathAndQuery::as_str);
        let path_and_query = if self.prefix.is_empty() {
            PathAndQuery::try_from(pq)?
        } else {
            PathAndQuery::try_from(format!("{}{pq}", self.prefix))?
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
    }
}

/// Marks a `GET`/`HEAD` whose body is announced by neither `Content-Length` nor
/// `Transfer-Encoding` (HTTP/2): the key function skips it, and it goes upstream chunked.
#[derive(Clone, Copy, Debug)]
struct UnframedBody;

/// The `Host` the client asked for (the request target's authority, else the `Host`
/// header), lowercased: what `--key-host` keys on and sends as `X-Forwarded-Host`.
/// The client's `Host`, lowercased, from the header alone.
fn client_host_of(headers: &HeaderMap) -> Option<String> {
    let host = headers.get(header::HOST)?.to_str().ok()?.trim();
    (!host.is_empty() && !host.contains('@')).then(|| host.to_ascii_lowercase())
}

fn client_host(parts: &http::request::Parts) -> Option<String> {
    let host = match parts.uri.authority() {
        Some(authority) => authority.as_str(),
        None => parts.headers.get(header::HOST)?.to_str().ok()?,
    };
    let host = host.rsplit('@').next().unwrap_or(host).trim();
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

/// Forwarding headers a client may send, dropped from every request unless named by
/// `--forward-header`: the key does not hold them, so an upstream that builds links,
/// redirects or decisions from one of them would store one client's value for everyone.
/// The proxy sets `X-Forwarded-For`, `X-Forwarded-Proto`, `Forwarded` (and, with
/// `--key-host`, `X-Forwarded-Host`) itself.
const FORWARDING_HEADERS: [&str; 34] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-protocol",
    "x-forwarded-scheme",
    "x-forwarded-ssl",
    "x-forwarded-port",
    "x-forwarded-server",
    "x-forwarded-prefix",
    "x-forwarded-path",
    "x-forwarded-uri",
    "x-forwarded-by",
    "x-forwarded-client-cert",
    "x-forwarded",
    "forwarded-for",
    "x-original-forwarded-for",
    "x-real-ip",
    "x-client-ip",
    "x-cluster-client-ip",
    "x-proxyuser-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-host",
    "x-original-host",
    "x-forwarded-host-override",
    "x-http-host-override",
    "x-url-scheme",
    "x-scheme",
    "front-end-https",
    "x-arr-ssl",
    "x-envoy-external-address",
    "x-envoy-original-path",
];

/// URL rewrite and method override headers, dropped from `GET`/`HEAD` requests unless
/// named by `--forward-header`: an upstream that honours one answers for another resource
/// or method, stored under this request's key.
const REWRITE_HEADERS: [&str; 6] = [
    "x-original-url",
    "x-original-uri",
    "x-rewrite-url",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// A `--forward-header` name: any header but `Host` and the hop-by-hop ones.
fn parse_forward_header(name: &str) -> Result<HeaderName, String> {
    let header = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|_| format!("`{name}` is not a header name"))?;
    if header == header::HOST {
        return Err("the upstream's own Host is always sent; see --key-host".to_owned());
    }
    if HOP_BY_HOP.contains(&header.as_str()) {
        return Err(format!("`{header}` is hop-by-hop: it is never forwarded"));
    }
    Ok(header)
}

/// `PURGE` requests: who may send them, and what they purge.
struct Purging {
    layer: StampedeLayer,
    allow: Vec<Cidr>,
    token: Option<String>,
    key_host: bool,
}

impl Purging {
    /// Answers a `PURGE`: 200 with what was purged, or 405 (nothing done) for a peer that
    /// may not purge.
    async fn handle<B>(&self, req: &Request<B>, peer: IpAddr) -> Response<StampedeBody<ProxyBody>> {
        let bearer = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let by_token = matches!((&self.token, bearer), (Some(t), Some(b)) if constant_time_eq(t.as_bytes(), b.as_bytes()));
        if !by_token && !self.allow.iter().any(|c| c.contains(peer)) {
            tracing::warn!(%peer, "PURGE refused: not an allowed peer and no valid token");
            return json(
                StatusCode::METHOD_NOT_ALLOWED,
                r#"{"error":"purge not allowed"}"#.into(),
            );
        }
        let tags: Vec<String> = req
            .headers()
            .get_all("surrogate-key")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(str::split_whitespace)
            .map(str::to_owned)
            .take(64)
            .collect();
        if !tags.is_empty() {
            let mut entries = 0;
            for tag in &tags {
                match self.layer.purge_tag(tag).await {
                    Ok(n) => entries += n,
                    Err(e) => return purge_failed(&e),
                }
            }
            tracing::info!(%peer, ?tags, entries, "purged by tag");
            let list = tags
                .iter()
                .map(|t| format!("\"{}\"", json_escape(t)))
                .collect::<Vec<_>>()
                .join(",");
            return json(
                StatusCode::OK,
                format!(r#"{{"purged":"tags","tags":[{list}],"entries":{entries}}}"#),
            );
        }
        // Keyed as a GET of the same path would be: the upstream's, and the client's Host
        // with --key-host.
        let pq = req.uri().path_and_query().map_or("/", PathAndQuery::as_str);
        let host = if self.key_host {
            client_host_of(req.headers()).unwrap_or_default()
        } else {
            "purge".to_owned()
        };
        let uri = match format!("http://{host}{pq}").parse::<Uri>() {
            Ok(uri) => uri,
            Err(_) => return json(StatusCode::BAD_REQUEST, r#"{"error":"bad target"}"#.into()),
        };
        match self.layer.purge(&uri).await {
            Ok(entries) => {
                tracing::info!(%peer, path = pq, entries, "purged by URL");
                json(
                    StatusCode::OK,
                    format!(
                        r#"{{"purged":"url","url":"{}","entries":{entries}}}"#,
                        json_escape(pq)
                    ),
                )
            }
            Err(e) => purge_failed(&e),
        }
    }
}

fn purge_failed(e: &tower_stampede::BackendError) -> Response<StampedeBody<ProxyBody>> {
    tracing::warn!(error = %e, "PURGE failed");
    json(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(r#"{{"error":"{}"}}"#, json_escape(&e.to_string())),
    )
}

fn json(status: StatusCode, body: String) -> Response<StampedeBody<ProxyBody>> {
    let mut res = Response::new(StampedeBody::full(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

/// The characters JSON strings may not hold as they are.
fn json_escape(text: &str) -> String {
    text.chars()
        .flat_map(|c| match c {
            '"' => vec!['\\', '"'],
            '\\' => vec!['\\', '\\'],
            c if c.is_control() => format!("\\u{:04x}", c as u32).chars().collect(),
            c => vec![c],
        })
        .collect()
}

/// Compares two secrets in time that depends on their length only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An IPv4 or IPv6 network, `ADDR/BITS` (a bare address is one host).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl Cidr {
    /// Whether `ip` is inside; an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) counts as
    /// the IPv4 address it maps.
    fn contains(&self, ip: IpAddr) -> bool {
        let (net, width) = ip_bits(self.net);
        let (ip, ip_width) = ip_bits(ip.to_canonical());
        width == ip_width && prefix(net, width, self.bits) == prefix(ip, width, self.bits)
    }
}

/// An address as a number, and its width in bits.
fn ip_bits(ip: IpAddr) -> (u128, u8) {
    match ip {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    }
}

/// The first `bits` bits of a `width`-bit number.
fn prefix(value: u128, width: u8, bits: u8) -> u128 {
    if bits == 0 {
        0
    } else {
        value >> (width - bits)
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Cidr, String> {
        let text = text.trim();
        let bad = || format!("`{text}` is not an address or a CIDR block such as 10.0.0.0/8");
        let (addr, bits) = match text.split_once('/') {
            Some((addr, bits)) => (addr, Some(bits)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let width = ip_bits(addr).1;
        let bits = match bits {
            None => width,
            Some(bits) if !bits.is_empty() && bits.bytes().all(|b| b.is_ascii_digit()) => bits
                .parse::<u8>()
                .ok()
                .filter(|&b| b <= width)
                .ok_or_else(bad)?,
            Some(_) => return Err(bad()),
        };
        // `::ffff:10.0.0.0/104` is `10.0.0.0/8`: peers are compared in their IPv4 form.
        if let IpAddr::V6(v6) = addr {
            if let (Some(v4), true) = (v6.to_ipv4_mapped(), bits >= 96) {
                return Ok(Cidr {
                    net: IpAddr::V4(v4),
                    bits: bits - 96,
                });
            }
        }
        Ok(Cidr { net: addr, bits })
    }
}

/// How the forwarding headers are built: see [`FORWARDING_HEADERS`].
#[derive(Clone, Debug, Default)]
struct Forwarding {
    /// `--trusted-proxies`.
    trusted: Vec<Cidr>,
    /// `--key-host`.
    key_host: bool,
    /// `--forward-header`: passed as the client sent them (and keyed).
    operator: Vec<HeaderName>,
}

impl Forwarding {
    /// Replaces the client's forwarding headers by ours; `host` is the client's `Host`
    /// (given only with `--key-host`).
    fn apply(
        &self,
        headers: &mut HeaderMap,
        method: &Method,
        peer: Option<IpAddr>,
        host: Option<String>,
    ) {
        let kept = |name: &str| self.operator.iter().any(|h| h.as_str() == name);
        let trusted = peer.is_some_and(|ip| self.trusted.iter().any(|net| net.contains(ip)));
        let chain = |headers: &HeaderMap, name: &str| -> Vec<String> {
            if !(trusted || kept(name)) {
                return Vec::new();
            }
            headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
                .collect()
        };
        let mut xff = chain(headers, "x-forwarded-for");
        let mut forwarded = chain(headers, "forwarded");
        for name in FORWARDING_HEADERS {
            if !kept(name) {
                headers.remove(name);
            }
        }
        if matches!(*method, Method::GET | Method::HEAD) {
            for name in REWRITE_HEADERS {
                if !kept(name) {
                    headers.remove(name);
                }
            }
        }
        if let Some(ip) = peer.map(|ip| ip.to_canonical()) {
            xff.push(ip.to_string());
            forwarded.push(forwarded_element(ip));
            for (name, chain) in [("x-forwarded-for", xff), ("forwarded", forwarded)] {
                if let Ok(value) = HeaderValue::from_str(&chain.join(", ")) {
                    headers.insert(HeaderName::from_static(name), value);
                }
            }
        }
        if !kept("x-forwarded-proto") {
            headers.insert(
                HeaderName::from_static("x-forwarded-proto"),
                HeaderValue::from_static("http"),
            );
        }
        if self.key_host && !kept("x-forwarded-host") {
            if let Some(value) = host.and_then(|h| HeaderValue::from_str(&h).ok()) {
                headers.insert(HeaderName::from_static("x-forwarded-host"), value);
            }
        }
    }
}

/// This hop's `Forwarded` element (RFC 7239 §4, §6: an IPv6 node quoted in brackets).
fn forwarded_element(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("for={v4};proto=http"),
        IpAddr::V6(v6) => format!("for=\"[{v6}]\";proto=http"),
    }
}

/// The forwarding service of one client connection: sends a request to the upstream and
/// streams its answer back. It never fails: upstream errors become `502`/`504` responses.
/// Cheap to clone (the layer clones it for every request).
#[derive(Clone)]
struct Forward {
    upstream: Arc<Upstream>,
    /// The client connection's peer, for the forwarding headers.
    peer: Option<IpAddr>,
}

impl Forward {
    /// The forwarding service of a connection from `peer`.
    fn for_peer(&self, peer: SocketAddr) -> Forward {
        Forward {
            upstream: self.upstream.clone(),
            peer: Some(peer.ip()),
        }
    }
}

/// The upstream every connection forwards to, and how.
struct Upstream {
    client: Client<HttpConnector, Incoming>,
    origin: Origin,
    timeout: Duration,
    forwarding: Forwarding,
}

impl Forward {
    fn new(origin: Origin, timeout: Duration, forwarding: Forwarding) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(1024)
            .build(connector);
        Forward {
            upstream: Arc::new(Upstream {
                client,
                origin,
                timeout,
                forwarding,
            }),
            peer: None,
        }
    }
}

impl Upstream {
    /// Turns the client's request (from `peer`) into the upstream's.
    fn upstream_request(
        &self,
        req: Request<Incoming>,
        peer: Option<IpAddr>,
    ) -> Result<Request<Incoming>, http::Error> {
        let (mut parts, body) = req.into_parts();
        // Read before the target and the Host are rewritten to the upstream's.
        let host = if self.forwarding.key_host {
            client_host(&parts)
        } else {
            None
        };
        parts.uri = self.origin.uri_for(&parts.uri)?;
        // The pooled connections are HTTP/1.1 whatever the client spoke.
        parts.version = Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        if parts.extensions.get::<UnframedBody>().is_some() {
            // Without this the client sends no body for a GET of unknown length.
            parts.headers.insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
        parts.headers.insert(header::HOST, self.origin.host.clone());
        self.forwarding
            .apply(&mut parts.headers, &parts.method, peer, host);
        Ok(Request::from_parts(parts, body))
    }
}

impl Service<Request<Incoming>> for Forward {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let req = self.upstream.upstream_request(req, self.peer);
        let client = self.upstream.client.clone();
        let timeout = self.upstream.timeout;
        Box::pin(async move {
            let req = match req {
                Ok(req) => req,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot build the upstream request");
                    return Ok(
                        text_response(StatusCode::BAD_REQUEST, "bad request target\n")
                            .map(boxed_full),
                    );
                }
            };
            let res = match tokio::time::timeout(timeout, client.request(req)).await {
                Ok(Ok(res)) => res,
                Ok(Err(e)) => {
                    let what = if e.is_connect() {
                        "cannot connect to upstream"
                    } else {
                        "upstream error"
                    };
                    tracing::warn!(%method, %path, error = %e, source = ?std::error::Error::source(&e), "{what}");
                    return Ok(text_response(StatusCode::BAD_GATEWAY, &format!("{what}\n"))
                        .map(boxed_full));
                }
                Err(_) => {
                    tracing::warn!(%method, %path, ?timeout, "upstream timed out");
                    return Ok(
                        text_response(StatusCode::GATEWAY_TIMEOUT, "upstream timed out\n")
                            .map(boxed_full),
                    );
                }
            };
            let (mut parts, body) = res.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            tracing::debug!(%method, %path, status = %parts.status, "upstream answered");
            Ok(Response::from_parts(parts, body.boxed()))
        })
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), plus the non-standard `Proxy-Connection`.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes the hop-by-hop headers and every header named in `Connection`.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

fn text_response(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::copy_from_slice(text.as_bytes())));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

fn boxed_full(body: Full<Bytes>) -> ProxyBody {
    body.map_err(|never| match never {}).boxed()
}

/// A Redis URL without its password, for logs.
/// The backend the flags name: one Redis, a Cluster, Sentinel, or none; with TLS material
/// for `rediss://` URLs.
fn backend(args: &Args) -> Result<Backend, BoxError> {
    let mut backend = None;
    if let Some(url) = &args.redis {
        tracing::info!(redis = %redact(url), prefix = %args.prefix, "shared cache and cross-node coalescing through redis");
        backend = Some(Backend::redis(url.as_str())?);
    }
    #[cfg(feature = "cluster")]
    if !args.redis_cluster.is_empty() {
        let shown: Vec<String> = args.redis_cluster.iter().map(|u| redact(u)).collect();
        tracing::info!(cluster = ?shown, prefix = %args.prefix, "shared cache and cross-node coalescing through a redis cluster");
        backend = Some(Backend::redis_cluster(
            args.redis_cluster.iter().map(String::as_str),
        )?);
    }
    #[cfg(feature = "sentinel")]
    if let Some(spec) = &args.redis_sentinel {
        let (name, urls) = spec
            .split_once('@')
            .ok_or("--redis-sentinel wants NAME@URL,URL,...")?;
        let urls: Vec<&str> = urls.split(',').filter(|u| !u.is_empty()).collect();
        if name.is_empty() || urls.is_empty() {
            return Err("--redis-sentinel wants NAME@URL,URL,...".into());
        }
        let shown: Vec<String> = urls.iter().map(|u| redact(u)).collect();
        tracing::info!(master = name, sentinels = ?shown, prefix = %args.prefix, "shared cache and cross-node coalescing through redis behind sentinel");
        backend = Some(Backend::redis_sentinel(name, urls)?);
    }
    let Some(backend) = backend else {
        tracing::info!("no --redis: caching and coalescing within this process only; cross-node coalescing needs Redis");
        return Ok(Backend::local());
    };
    #[cfg(feature = "tls")]
    let backend = {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))
        };
        let mut tls = None;
        if let Some(ca) = &args.redis_ca {
            tls = Some(tower_stampede::TlsOptions::new().ca_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&args.redis_client_cert, &args.redis_client_key) {
            let options = tls.take().unwrap_or_default();
            tls = Some(options.client_cert(read(cert)?, read(key)?));
        }
        match tls {
            Some(tls) => backend.with_tls(tls)?,
            None => backend,
        }
    };
    Ok(backend)
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***{}", &url[..scheme], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Cidr {
        text.parse().unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn the_targeted_field_flag_takes_only_targeted_names() {
        for refused in ["cache-control", "age", "-cache-control", "not a name"] {
            assert!(targeted_name(refused).is_err(), "{refused}");
        }
        assert_eq!(
            targeted_name("Edge-Cache-Control").unwrap(),
            HeaderName::from_static("edge-cache-control")
        );
    }

    #[test]
    fn cidr_blocks_match_ipv4_and_ipv6() {
        let ten = cidr("10.0.0.0/8");
        assert!(ten.contains(ip("10.0.0.1")));
        assert!(ten.contains(ip("10.255.255.255")));
        assert!(!ten.contains(ip("11.0.0.0")));
        assert!(!ten.contains(ip("9.255.255.255")));
        // IPv4-mapped peers (a dual-stack listener) count as their IPv4 address.
        assert!(ten.contains(ip("::ffff:10.1.2.3")));
        assert!(
            !ten.contains(ip("::a01:203")),
            "IPv4-compatible is not mapped"
        );

        let host = cidr("127.0.0.1");
        assert_eq!(host, cidr("127.0.0.1/32"));
        assert!(host.contains(ip("127.0.0.1")));
        assert!(!host.contains(ip("127.0.0.2")));

        let odd = cidr("192.168.1.77/25");
        assert!(odd.contains(ip("192.168.1.0")));
        assert!(odd.contains(ip("192.168.1.127")));
        assert!(!odd.contains(ip("192.168.1.128")));

        let everyone = cidr("0.0.0.0/0");
        assert!(everyone.contains(ip("203.0.113.9")));
        assert!(!everyone.contains(ip("2001:db8::1")), "families never mix");

        let v6 = cidr("2001:db8::/32");
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(!v6.contains(ip("32.1.13.184")));
        let loopback = cidr("::1");
        assert!(loopback.contains(ip("::1")));
        assert!(!loopback.contains(ip("::2")));
        assert!(!loopback.contains(ip("127.0.0.1")));
        assert!(cidr("::/0").contains(ip("fe80::1")));
        let nibble = cidr("fd00::/7");
        assert!(nibble.contains(ip("fc00::1")) && nibble.contains(ip("fdff::1")));
        assert!(!nibble.contains(ip("fe00::1")));

        assert_eq!(cidr("::ffff:10.0.0.0/104"), cidr("10.0.0.0/8"));
        assert_eq!(cidr(" 10.0.0.0/8 "), ten);

        for bad in [
            "",
            "/8",
            "10.0.0.0/",
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/+8",
            "10.0.0/8",
            "example.com",
            "10.0.0.0/8/8",
            "10.0.0.0/-1",
            "[::1]/128",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?} parsed");
        }
    }

    fn sent(forwarding: &Forwarding, method: Method, pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        forwarding.apply(
            &mut headers,
            &method,
            Some(ip("127.0.0.1")),
            Some("shop.example".to_owned()),
        );
        headers
    }

    fn values(headers: &HeaderMap, name: &str) -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn forwarding_headers_come_from_the_connection() {
        let plain = Forwarding::default();
        let mut all: Vec<(&str, &str)> = FORWARDING_HEADERS.iter().map(|n| (*n, "evil")).collect();
        all.extend(REWRITE_HEADERS.iter().map(|n| (*n, "/evil")));
        all.push(("x-kept", "yes"));
        let headers = sent(&plain, Method::GET, &all);
        assert_eq!(values(&headers, "x-forwarded-for"), ["127.0.0.1"]);
        assert_eq!(values(&headers, "x-forwarded-proto"), ["http"]);
        assert_eq!(values(&headers, "forwarded"), ["for=127.0.0.1;proto=http"]);
        assert_eq!(values(&headers, "x-kept"), ["yes"]);
        assert_eq!(headers.len(), 4, "{headers:?}");

        // Method overrides are only dropped where the answer may be stored.
        let post = sent(&plain, Method::POST, &[("x-http-method-override", "PUT")]);
        assert_eq!(values(&post, "x-http-method-override"), ["PUT"]);

        // An IPv6 peer, and an IPv4-mapped one.
        let mut headers = HeaderMap::new();
        plain.apply(&mut headers, &Method::GET, Some(ip("2001:db8::7")), None);
        assert_eq!(
            values(&headers, "forwarded"),
            ["for=\"[2001:db8::7]\";proto=http"]
        );
        assert_eq!(values(&headers, "x-forwarded-for"), ["2001:db8::7"]);
        let mut headers = HeaderMap::new();
        plain.apply(
            &mut headers,
            &Method::GET,
            Some(ip("::ffff:10.0.0.9")),
            None,
        );
        assert_eq!(values(&headers, "forwarded"), ["for=10.0.0.9;proto=http"]);
    }

    #[test]
    fn trusted_peers_keep_their_chains_and_operators_choose_headers() {
        let chains = [
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-for", "10.0.0.2, 10.0.0.3"),
            ("forwarded", "for=10.0.0.1"),
            ("x-forwarded-host", "evil"),
        ];
        let trusted = Forwarding {
            trusted: vec![cidr("127.0.0.0/8")],
            ..Forwarding::default()
        };
        let headers = sent(&trusted, Method::GET, &chains);
        assert_eq!(
            values(&headers, "x-forwarded-for"),
            ["10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.1"]
        );
        assert_eq!(
            values(&headers, "forwarded"),
            ["for=10.0.0.1, for=127.0.0.1;proto=http"]
        );
        assert!(headers.get("x-forwarded-host").is_none());

        let elsewhere = Forwarding {
            trusted: vec![cidr("10.0.0.0/8")],
            ..Forwarding::default()
        };
        let headers = sent(&elsewhere, Method::GET, &chains);
        assert_eq!(values(&headers, "x-forwarded-for"), ["127.0.0.1"]);

        let key_host = Forwarding {
            key_host: true,
            ..Forwarding::default()
        };
        let headers = sent(&key_host, Method::GET, &chains);
        assert_eq!(values(&headers, "x-forwarded-host"), ["shop.example"]);

        let operator = Forwarding {
            key_host: true,
            operator: vec![
                HeaderName::from_static("x-forwarded-host"),
                HeaderName::from_static("x-original-url"),
            ],
            ..Forwarding::default()
        };
        let headers = sent(
            &operator,
            Method::GET,
            &[
                ("x-forwarded-host", "tenant.example"),
                ("x-original-url", "/a"),
            ],
        );
        assert_eq!(values(&headers, "x-forwarded-host"), ["tenant.example"]);
        assert_eq!(values(&headers, "x-original-url"), ["/a"]);

        assert!(parse_forward_header("X-Tenant").is_ok());
        assert!(parse_forward_header("host").is_err());
        assert!(parse_forward_header("Connection").is_err());
        assert!(parse_forward_header("not a name").is_err());
    }
}
