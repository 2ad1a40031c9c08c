//! The first thing to run: a cache stampede, without and with `tower-stampede`.
//!
//! ```text
//! cargo run --example demo
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --example demo
//! ```
//!
//! Everything runs in this one process:
//!
//! * an **upstream**: an HTTP server on `127.0.0.1:0` that takes 200 ms per call and
//!   counts its calls (the database, or the expensive API, that a stampede hurts);
//! * a **fleet of 3 nodes**: 3 [`StampedeLayer`]s, each with its own in-memory L1 and its
//!   own Redis connections, as if they were 3 processes on 3 machines. Each wraps an HTTP
//!   client to the upstream;
//! * **Redis**: `REDIS_URL` if set; else a `redis-server` from `PATH`, started on a free
//!   port and killed on exit; else none (each node then coalesces only its own requests,
//!   so a key costs up to one upstream call per node).
//!
//! Two stampedes are fired twice each, once straight at the upstream through the client
//! and once through the 3 nodes:
//!
//! 1. 300 concurrent requests for one cold key, spread over the 3 nodes;
//! 2. 3000 concurrent requests over 100 cold keys, spread over the 3 nodes.
//!
//! For each it prints the upstream calls the upstream counted, the p50 and p99 latency of
//! the requests, and the errors (anything but a `200` with a complete body).
//!
//! The client speaks HTTP/2 (prior knowledge) to the upstream, so thousands of concurrent
//! requests share one connection instead of needing thousands of sockets.

use std::convert::Infallible;
use std::error::Error;
use std::fmt;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{self, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::Barrier;
use tower::{Layer, Service, ServiceExt};
use tower_stampede::{Backend, StampedeLayer, Stats};

/// Nodes in the simulated fleet.
const NODES: usize = 3;
/// How long the upstream takes per call.
const UPSTREAM_DELAY: Duration = Duration::from_millis(200);
/// The deadline on each Redis call. The default suits production; a demo may run as a
/// debug build on a busy laptop or CI runner, where a cold node's first burst (connect,
/// load the scripts, 100 fills at once) can take longer, and a Redis call that times out
/// fails open into an extra upstream call.
const REDIS_TIMEOUT: Duration = Duration::from_secs(1);

fn main() -> Result<(), Box<dyn Error>> {
    // Redis first, outside the runtime: the guard must outlive it, so that the server we
    // may have started is killed only after every connection to it is gone.
    let tier = SharedTier::from_env();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        tokio::select! {
            result = run(&tier) => result,
            _ = tokio::signal::ctrl_c() => {
                println!("interrupted");
                Ok(())
            }
        }
    })
}

async fn run(tier: &SharedTier) -> Result<(), Box<dyn Error>> {
    let upstream = Upstream::start(UPSTREAM_DELAY).await?;
    tier.check().await?;
    println!("tower-stampede demo");
    println!(
        "upstream: http://{} ({} ms per call, counts its calls)",
        upstream.addr,
        UPSTREAM_DELAY.as_millis()
    );
    println!("redis:    {}", tier.description);
    println!("fleet:    {NODES} nodes, each its own StampedeLayer wrapping an HTTP client to the upstream");
    if tier.url.is_none() {
        println!("note:     cross-node coalescing needs Redis; without it each node makes its own call per key");
    }

    let client = client_service(http_client());
    // Open the HTTP/2 connection before timing anything.
    let warmup = client.clone().oneshot(upstream.request("/warmup")).await?;
    warmup.into_body().collect().await?;

    let scenarios = [
        Scenario {
            title: "scenario 1: 300 concurrent requests for one cold key, spread over 3 nodes",
            keys: 1,
            requests: 300,
        },
        Scenario {
            title: "scenario 2: 3000 concurrent requests over 100 cold keys, spread over 3 nodes",
            keys: 100,
            requests: 3000,
        },
    ];
    let run_id = run_id();
    let mut totals = [0usize; 2];
    for (n, scenario) in scenarios.iter().enumerate() {
        println!();
        println!("{}", scenario.title);
        println!(
            "  {:<15} {:>14} {:>8} {:>8} {:>7}",
            "mode", "upstream calls", "p50", "p99", "errors"
        );

        // Without the layer: every request goes to the upstream through the client.
        let paths = scenario.paths(&format!("/s{n}/direct"));
        let direct = vec![client.clone(); NODES];
        let before = upstream.calls();
        let result = fire(&upstream, &direct, &paths, scenario.requests).await;
        let calls = upstream.calls() - before;
        totals[0] += calls;
        result.print_row("without layer", calls);

        // With the layer: 3 nodes, fresh (cold) for this scenario, sharing Redis.
        let paths = scenario.paths(&format!("/s{n}/cached"));
        let layers: Vec<StampedeLayer> = (0..NODES)
            .map(|_| {
                let node = StampedeLayer::builder()
                    .backend(tier.backend()?)
                    .prefix(format!("tower-stampede-demo:{run_id}:s{n}"))
                    .redis_timeout(REDIS_TIMEOUT);
                Ok::<_, redis::RedisError>(node.build())
            })
            .collect::<Result<_, _>>()?;
        let nodes: Vec<_> = layers
            .iter()
            .map(|layer| layer.layer(client.clone()))
            .collect();
        let before = upstream.calls();
        let result = fire(&upstream, &nodes, &paths, scenario.requests).await;
        let calls = upstream.calls() - before;
        totals[1] += calls;
        result.print_row("with layer", calls);
        print_answered_by(&layers);
    }
    println!();
    println!(
        "total: {} upstream calls without the layer, {} with it",
        totals[0], totals[1]
    );
    Ok(())
}

/// One stampede: `requests` requests over `keys` distinct paths.
struct Scenario {
    title: &'static str,
    keys: usize,
    requests: usize,
}

impl Scenario {
    fn paths(&self, base: &str) -> Vec<String> {
        (0..self.keys).map(|k| format!("{base}/item/{k}")).collect()
    }
}

/// A new prefix per run, so a shared `REDIS_URL` never answers from an earlier run.
fn run_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{}-{nanos}", std::process::id())
}

/// How the with-layer requests were answered, summed over the nodes.
fn print_answered_by(layers: &[StampedeLayer]) {
    let sum = |f: fn(&Stats) -> u64| layers.iter().map(|l| f(&l.stats())).sum::<u64>();
    println!(
        "  with layer: {} went upstream, {} waited on another node's call, {} joined a call on \
         their own node, {} hit the cache; {} redis errors",
        sum(|s| s.upstream_calls),
        sum(|s| s.collapsed_remote),
        sum(|s| s.collapsed_local),
        sum(|s| s.hits_redis + s.hits_memory),
        sum(|s| s.redis_errors),
    );
}

// ---------------------------------------------------------------------------------------
// The stampede and its measurements.

/// What one stampede measured.
struct Fired {
    latencies: Vec<Duration>,
    errors: usize,
}

impl Fired {
    /// The nearest-rank percentile `p` (0..=100) of the latencies.
    fn percentile(&self, p: usize) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        let rank = (sorted.len() * p).div_ceil(100).max(1);
        sorted.get(rank - 1).copied().unwrap_or_default()
    }

    fn print_row(&self, mode: &str, upstream_calls: usize) {
        println!(
            "  {:<15} {:>14} {:>8} {:>8} {:>7}",
            mode,
            upstream_calls,
            Millis(self.percentile(50)),
            Millis(self.percentile(99)),
            self.errors
        );
    }
}

/// A duration printed as whole milliseconds.
struct Millis(Duration);

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&format!("{}ms", self.0.as_millis()))
    }
}

/// Fires `total` concurrent requests, released together; request `i` asks for
/// `paths[i % paths.len()]` through `services[i % services.len()]`.
async fn fire<S, B>(upstream: &Upstream, services: &[S], paths: &[String], total: usize) -> Fired
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    let start = Arc::new(Barrier::new(total + 1));
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let svc = services[i % services.len()].clone();
        let req = upstream.request(&paths[i % paths.len()]);
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let started = Instant::now();
            let ok = match svc.oneshot(req).await {
                Ok(res) if res.status() == StatusCode::OK => {
                    res.into_body().collect().await.is_ok()
                }
                _ => false,
            };
            (started.elapsed(), ok)
        }));
    }
    start.wait().await;
    let mut fired = Fired {
        latencies: Vec::with_capacity(total),
        errors: 0,
    };
    for task in tasks {
        match task.await {
            Ok((latency, ok)) => {
                fired.latencies.push(latency);
                fired.errors += usize::from(!ok);
            }
            Err(_) => fired.errors += 1,
        }
    }
    fired
}

// ---------------------------------------------------------------------------------------
// The upstream and the client.

/// A slow HTTP server that counts its calls and answers `"<path> #<n>"`.
struct Upstream {
    addr: SocketAddr,
    calls: Arc<AtomicUsize>,
}

impl Upstream {
    async fn start(delay: Duration) -> std::io::Result<Upstream> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let calls = Arc::new(AtomicUsize::new(0));
        let mut server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        server.http2().max_concurrent_streams(100_000);
        let counter = calls.clone();
        tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        eprintln!("upstream: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let calls = counter.clone();
                let server = server.clone();
                tokio::spawn(async move {
                    let handler = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                        async move {
                            tokio::time::sleep(delay).await;
                            let body = format!("{} #{n}", req.uri().path());
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                        }
                    });
                    let _ = server.serve_connection(TokioIo::new(stream), handler).await;
                });
            }
        });
        Ok(Upstream { addr, calls })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn request(&self, path: &str) -> Request<Full<Bytes>> {
        Request::get(format!("http://{}{path}", self.addr))
            .body(Full::default())
            .expect("a valid request")
    }
}

/// An HTTP/2 client: one multiplexed connection per host, however many requests.
fn http_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .pool_max_idle_per_host(usize::MAX)
        .build_http()
}

/// The client as a tower service: the inner service every node wraps.
fn client_service(
    client: Client<HttpConnector, Full<Bytes>>,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Incoming>,
    Error = legacy::Error,
    Future = legacy::ResponseFuture,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |req: Request<Full<Bytes>>| client.request(req))
}

// ---------------------------------------------------------------------------------------
// Redis: REDIS_URL, else a redis-server of our own, else none.

/// The shared tier of the fleet.
struct SharedTier {
    url: Option<String>,
    description: String,
    /// Killed on drop.
    _server: Option<RedisServer>,
}

impl SharedTier {
    fn from_env() -> SharedTier {
        if let Some(url) = std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty()) {
            return SharedTier {
                description: format!("{url} (REDIS_URL)"),
                url: Some(url),
                _server: None,
            };
        }
        match RedisServer::start() {
            Ok(server) => SharedTier {
                url: Some(server.url()),
                description: format!("{} (a redis-server started for this run)", server.url()),
                _server: Some(server),
            },
            Err(why) => SharedTier {
                url: None,
                description: format!("none ({why}); every node uses the local backend"),
                _server: None,
            },
        }
    }

    /// Fails early, and clearly, when the Redis we were given does not answer.
    async fn check(&self) -> Result<(), Box<dyn Error>> {
        let Some(url) = &self.url else { return Ok(()) };
        let unreachable = |e: redis::RedisError| format!("redis at {url} does not answer: {e}");
        let client = redis::Client::open(url.as_str()).map_err(unreachable)?;
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .map_err(unreachable)?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(unreachable)?;
        Ok(())
    }

    /// The backend for a new node: each call gives the node its own Redis connections.
    fn backend(&self) -> Result<Backend, redis::RedisError> {
        match &self.url {
            Some(url) => Backend::redis(url.as_str()),
            None => Ok(Backend::local()),
        }
    }
}

/// A `redis-server` on a free loopback port, with persistence off; killed on drop.
struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    /// Starts one from `PATH`, trying another port if one is lost to a race.
    fn start() -> Result<RedisServer, String> {
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| format!("no free port: {e}"))?
                .port();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            let child = match child {
                Ok(child) => child,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err("REDIS_URL is not set and redis-server is not on PATH".into())
                }
                Err(e) => return Err(format!("could not run redis-server: {e}")),
            };
            let mut server = RedisServer { child, port };
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if let Ok(Some(_)) = server.child.try_wait() {
                    break; // exited: most likely the port was taken meanwhile; try another
                }
                if ping(port) {
                    return Ok(server);
                }
                if Instant::now() > deadline {
                    return Err("redis-server did not answer PING within 5 s".into());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Err("redis-server exited at start 5 times".into())
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// True when a Redis server on `port` answers `PING`.
fn ping(port: u16) -> bool {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}
