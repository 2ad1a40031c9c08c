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
//!
//! The Redis tier, the server and client plumbing and the release of a stampede are shared
//! with the `rate_limited_api` example, in `examples/common/mod.rs`.

mod common;

use std::error::Error;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{client_service, http_client, run_id, spawn_released_together, SharedTier};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tower::{Layer, Service, ServiceExt};
use tower_stampede::{StampedeLayer, Stats};

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
    common::block_on_until_ctrl_c(run(&tier))
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
    let tasks = spawn_released_together(total, |i| {
        let svc = services[i % services.len()].clone();
        let req = upstream.request(&paths[i % paths.len()]);
        async move {
            let started = Instant::now();
            let ok = match svc.oneshot(req).await {
                Ok(res) if res.status() == StatusCode::OK => {
                    res.into_body().collect().await.is_ok()
                }
                _ => false,
            };
            (started.elapsed(), ok)
        }
    })
    .await;
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
// The upstream.

/// A slow HTTP server that counts its calls and answers `"<path> #<n>"`.
struct Upstream {
    addr: SocketAddr,
    calls: Arc<AtomicUsize>,
}

impl Upstream {
    async fn start(delay: Duration) -> std::io::Result<Upstream> {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let addr = common::serve("upstream", move |req: Request<Incoming>| {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                tokio::time::sleep(delay).await;
                let body = format!("{} #{n}", req.uri().path());
                Response::new(Full::new(Bytes::from(body)))
            }
        })
        .await?;
        Ok(Upstream { addr, calls })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn request(&self, path: &str) -> Request<Full<Bytes>> {
        common::get(self.addr, path)
    }
}
