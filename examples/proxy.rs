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
//! * appends the client's IP to `X-Forwarded-For` and sets `X-Forwarded-Proto: http`;
//! * streams bodies both ways (the layer buffers only answers it stores, up to
//!   `--max-body`; bigger ones stream through and are not stored);
//! * answers `502 Bad Gateway` when the upstream cannot be reached and `504 Gateway
//!   Timeout` when its response head does not arrive within `--upstream-timeout`;
//! * keys the cache on method, upstream and path+query, never on the `Host` the client
//!   used, so proxies reached under different names or ports coalesce together;
//! * serves HTTP/1.1 and HTTP/2 (prior knowledge), shuts down gracefully on SIGINT/SIGTERM,
//!   and logs through `tracing` (filter with `RUST_LOG`, default `info`).
//!
//! Once it is ready it logs `listening on ADDR` with the bound address (so `--listen
//! 127.0.0.1:0` works), and `metrics on http://ADDR/metrics` with `--metrics-listen`.

use std::convert::Infallible;
use std::future::Future;
use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tower::{Layer, Service, ServiceExt};
use tower_stampede::{Backend, StampedeLayer};
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

    /// How long a stored answer is fresh (`500ms`, `5s`, `1m`, ...).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    ttl: Duration,

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

    /// Serve Prometheus metrics at `http://ADDR/metrics` (port 0 picks a free port).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,

    /// Tokio worker threads (default: one per CPU).
    #[arg(long)]
    workers: Option<usize>,
}

fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_ansi(std::io::stdout().is_terminal())
        .init();

    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(workers) = args.workers {
        runtime.worker_threads(workers.max(1));
    }
    let result = runtime.build()?.block_on(run(args));
    if let Err(e) = &result {
        tracing::error!(error = %e, "proxy failed");
    }
    result
}

async fn run(args: Args) -> Result<(), BoxError> {
    let origin = Origin::parse(&args.upstream)?;

    if let Some(addr) = args.metrics_listen {
        serve_metrics(addr).await?;
    }

    let backend = match &args.redis {
        Some(url) => {
            tracing::info!(redis = %redact(url), prefix = %args.prefix, "shared cache and cross-node coalescing through redis");
            Backend::redis(url.as_str())?
        }
        None => {
            tracing::info!("no --redis: caching and coalescing within this process only; cross-node coalescing needs Redis");
            Backend::local()
        }
    };

    let origin_key = origin.base.clone();
    let layer = StampedeLayer::builder()
        .backend(backend)
        .prefix(args.prefix.clone())
        .l1_capacity(args.cache_size)
        .ttl(args.ttl)
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
        .key_fn(move |parts| {
            let pq = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
            Some(format!("{} {origin_key}{pq}", parts.method))
        })
        .build();

    let forward = Forward::new(origin, args.upstream_timeout);
    let stack = layer.layer(forward);

    let listener = TcpListener::bind(args.listen).await?;
    let local = listener.local_addr()?;
    tracing::info!(
        upstream = %args.upstream,
        ttl = ?args.ttl,
        grace = ?args.grace,
        lease = ?args.lease,
        max_body = args.max_body,
        upstream_timeout = ?args.upstream_timeout,
        redis_timeout = ?args.redis_timeout,
        "proxy ready"
    );
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
                let stack = stack.clone();
                let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    req.extensions_mut().insert(ClientAddr(peer));
                    stack.clone().oneshot(req)
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

/// Installs the Prometheus recorder for the `metrics` facade and serves its text at
/// `http://addr/metrics`. (The exporter's own listener cannot report a port chosen by the
/// OS, so the proxy serves the page itself.)
async fn serve_metrics(addr: SocketAddr) -> Result<(), BoxError> {
    let handle = PrometheusBuilder::new().install_recorder()?;
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
            let handle = handle.clone();
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let handle: PrometheusHandle = handle.clone();
                async move { Ok::<_, Infallible>(metrics_page(&handle, &req)) }
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
    Ok(())
}

fn metrics_page(handle: &PrometheusHandle, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        return text_response(StatusCode::NOT_FOUND, "try /metrics\n");
    }
    let mut res = Response::new(Full::new(Bytes::from(handle.render())));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
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

/// The client's address, put into each request's extensions by the accept loop.
#[derive(Clone, Copy, Debug)]
struct ClientAddr(SocketAddr);

/// The forwarding service: sends a request to the upstream and streams its answer back.
/// It never fails: upstream errors become `502`/`504` responses.
#[derive(Clone)]
struct Forward {
    client: Client<HttpConnector, Incoming>,
    origin: Origin,
    timeout: Duration,
}

impl Forward {
    fn new(origin: Origin, timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(1024)
            .build(connector);
        Forward {
            client,
            origin,
            timeout,
        }
    }

    /// Turns the client's request into the upstream's.
    fn upstream_request(&self, req: Request<Incoming>) -> Result<Request<Incoming>, http::Error> {
        let (mut parts, body) = req.into_parts();
        parts.uri = self.origin.uri_for(&parts.uri)?;
        // The pooled connections are HTTP/1.1 whatever the client spoke.
        parts.version = Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.insert(header::HOST, self.origin.host.clone());
        if let Some(ClientAddr(addr)) = parts.extensions.get::<ClientAddr>().copied() {
            append_forwarded_for(&mut parts.headers, addr.ip());
        }
        parts.headers.insert(
            HeaderName::from_static("x-forwarded-proto"),
            HeaderValue::from_static("http"),
        );
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
        let req = self.upstream_request(req);
        let client = self.client.clone();
        let timeout = self.timeout;
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

/// Appends `ip` to `X-Forwarded-For`, joining any values the client already sent.
fn append_forwarded_for(headers: &mut HeaderMap, ip: IpAddr) {
    let name = HeaderName::from_static("x-forwarded-for");
    let mut chain: Vec<String> = headers
        .get_all(&name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect();
    chain.push(ip.to_string());
    if let Ok(value) = HeaderValue::from_str(&chain.join(", ")) {
        headers.insert(name, value);
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
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***{}", &url[..scheme], &url[at..])
        }
        _ => url.to_owned(),
    }
}
