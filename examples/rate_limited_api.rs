//! The locksmith pattern, client side: a fleet of API clients that never trips the
//! API's rate limit, however many callers want the same records at once.
//!
//! ```text
//! cargo run --example rate_limited_api
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --example rate_limited_api
//! ```
//!
//! Everything runs in this one process:
//!
//! * a **rate-limited API** on `127.0.0.1:0`: `GET /users/{id}` answers a user record
//!   after 100 ms, but `429 Too Many Requests` to any call beyond 20 in the last second.
//!   It counts the calls it receives and insists on a bearer token;
//! * **3 client nodes**: each a hyper client, as a tower service, wrapped in its own
//!   [`StampedeLayer`] (its own in-memory L1, its own Redis connections), as if they were
//!   3 processes of one service that calls the API;
//! * **Redis**: `REDIS_URL` if set; else a `redis-server` from `PATH`, started on a free
//!   port and killed on exit; else none, and each node coalesces only its own lookups
//!   (up to 30 API calls: one per user per node).
//!
//! 1000 concurrent lookups over 10 user ids, spread over the 3 nodes, are fired three
//! times, each against a fresh API instance (a fresh rate limit):
//!
//! 1. without any cache: 1000 API calls, and 429s;
//! 2. with the tower layer around the client service: 10 calls, no 429;
//! 3. with the generic [`Cache<User>`](tower_stampede::Cache) and a plain async function
//!    that calls the API and parses the JSON (no tower service, no HTTP types in the
//!    cache): 10 calls, no 429. This is the shape for any value fetched from anywhere:
//!
//! ```ignore
//! let cache: Cache<User> = Cache::builder().backend(Backend::redis(url)?).ttl(ttl).build();
//! let user = cache.try_get_with(format!("user:{id}"), fetch_user(api, id)).await?;
//! ```
//!
//! Every request carries the same `Authorization: Bearer …` header: the client's own
//! token, not a user's. The layer sees it, and by default would send such requests
//! straight through (they could be one user's private answer);
//! [`PrivateRequests::Shared`] tells it the credential is the same for every caller, so
//! one answer may serve them all.
//!
//! The Redis tier, the server and client plumbing and the release of the lookups are
//! shared with the `demo` example, in `examples/common/mod.rs`.

mod common;

use std::collections::VecDeque;
use std::error::Error;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{client_service, http_client, run_id, spawn_released_together, SharedTier};
use http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_stampede::{Cache, PrivateRequests, StampedeLayer};

/// Calls the API allows in any one second.
const RATE_LIMIT: usize = 20;
/// How long the API takes to answer a lookup.
const API_DELAY: Duration = Duration::from_millis(100);
/// The client's own API token: the same for every caller.
const TOKEN: &str = "Bearer locksmith-demo-token";
const NODES: usize = 3;
const LOOKUPS: usize = 1000;
const USERS: usize = 10;
/// The deadline on each Redis call. The default suits production; an example may run as
/// a debug build on a busy laptop or CI runner, where a cold node's first burst
/// (connect, load the scripts, its fills at once) can take longer, and a Redis call that
/// times out fails open into an extra API call.
const REDIS_TIMEOUT: Duration = Duration::from_secs(1);

fn main() -> Result<(), Box<dyn Error>> {
    // Redis first, outside the runtime: the guard must outlive it, so that the server we
    // may have started is killed only after every connection to it is gone.
    let tier = SharedTier::from_env();
    common::block_on_until_ctrl_c(run(&tier))
}

async fn run(tier: &SharedTier) -> Result<(), Box<dyn Error>> {
    tier.check().await?;
    println!(
        "locksmith: {LOOKUPS} concurrent lookups of {USERS} users from {NODES} client nodes, \
         against an API that allows {RATE_LIMIT} calls/s"
    );
    println!("redis: {}", tier.description);
    if tier.url.is_none() {
        println!(
            "note:  cross-node coalescing needs Redis; without it each node calls the API once per \
             user ({} calls, more than the {RATE_LIMIT} allowed),",
            NODES * USERS
        );
        println!("       and the lookups that waited on a call answered 429 then go to the API themselves");
    }
    let client = http_client();

    // Without the layer: every lookup is an API call.
    let api = Api::start().await?;
    warm_up(&client, &api).await?;
    let direct: Vec<_> = (0..NODES)
        .map(|_| {
            ServiceBuilder::new()
                .map_request(with_token)
                .service(client_service(client.clone()))
        })
        .collect();
    let without = lookups(&api, &direct).await;

    // With the layer: 3 nodes sharing Redis, against a fresh API (a fresh rate limit).
    let api = Api::start().await?;
    warm_up(&client, &api).await?;
    let prefix = format!("tower-stampede-locksmith:{}", run_id());
    let layers: Vec<StampedeLayer> = (0..NODES)
        .map(|_| {
            let node = StampedeLayer::builder()
                .backend(tier.backend()?)
                .prefix(prefix.clone())
                .private_requests(PrivateRequests::Shared)
                .ttl(Duration::from_secs(30))
                .redis_timeout(REDIS_TIMEOUT);
            Ok::<_, redis::RedisError>(node.build())
        })
        .collect::<Result<_, _>>()?;
    let nodes: Vec<_> = layers
        .iter()
        .map(|layer| {
            ServiceBuilder::new()
                .map_request(with_token) // outermost: the layer sees the token
                .layer(layer.clone())
                .service(client_service(client.clone()))
        })
        .collect();
    let with = lookups(&api, &nodes).await;

    // With Cache<User>: 3 nodes sharing Redis, a plain async fetch, against a fresh API.
    let api = Api::start().await?;
    warm_up(&client, &api).await?;
    let prefix = format!("tower-stampede-locksmith-users:{}", run_id());
    let caches: Vec<Cache<User>> = (0..NODES)
        .map(|_| {
            Ok::<_, redis::RedisError>(
                Cache::builder()
                    .backend(tier.backend()?)
                    .prefix(prefix.clone())
                    .ttl(Duration::from_secs(30))
                    .redis_timeout(REDIS_TIMEOUT)
                    .build(),
            )
        })
        .collect::<Result<_, _>>()?;
    let cached = cache_lookups(&api, &client, &caches).await;

    println!();
    println!(
        "{:<24} {:>14} {:>12} {:>14}",
        "", "without layer", "with layer", "with Cache<V>"
    );
    let row = |label: &str, a: String, b: String, c: String| {
        println!("{label:<24} {a:>14} {b:>12} {c:>14}")
    };
    let count = |label: &str, f: fn(&Outcomes) -> usize| {
        row(
            label,
            f(&without).to_string(),
            f(&with).to_string(),
            f(&cached).to_string(),
        )
    };
    count("API calls made", |o| o.api_calls);
    count("429s seen by clients", |o| o.too_many);
    count("lookups answered 200", |o| o.ok);
    count("other failures", |o| o.failed);
    let secs = |d: Duration| format!("{:.2}s", d.as_secs_f64());
    row(
        "wall time",
        secs(without.wall),
        secs(with.wall),
        secs(cached.wall),
    );

    println!();
    println!("per node, with layer:");
    println!(
        "  {:<4}  {:>13}  {:>15}  {:>14}  {:>10}  {:>14}  {:>12}",
        "node",
        "went upstream",
        "waited on fleet",
        "joined on node",
        "cache hits",
        "passed through",
        "redis errors"
    );
    for (i, layer) in layers.iter().enumerate() {
        let s = layer.stats();
        println!(
            "  {:<4}  {:>13}  {:>15}  {:>14}  {:>10}  {:>14}  {:>12}",
            i + 1,
            s.upstream_calls,
            s.collapsed_remote,
            s.collapsed_local,
            s.hits_memory + s.hits_redis,
            s.hit_for_pass + s.bypassed,
            s.redis_errors
        );
    }
    Ok(())
}

/// Adds the client's API token, the same for every caller.
fn with_token(mut req: Request<Full<Bytes>>) -> Request<Full<Bytes>> {
    req.headers_mut()
        .insert(AUTHORIZATION, HeaderValue::from_static(TOKEN));
    req
}

// ---------------------------------------------------------------------------------------
// The lookups.

/// How the lookups of one run ended, and what the API saw.
#[derive(Default)]
struct Outcomes {
    ok: usize,
    too_many: usize,
    failed: usize,
    wall: Duration,
    api_calls: usize,
}

/// Fires the lookups at once: lookup `i` asks for user `i % USERS + 1` through node
/// `i % NODES`.
async fn lookups<S, B>(api: &Api, nodes: &[S]) -> Outcomes
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    let tasks = spawn_released_together(LOOKUPS, |i| {
        let node = nodes[i % nodes.len()].clone();
        let req = api.request(&format!("/users/{}", i % USERS + 1));
        async move {
            let res = node.oneshot(req).await.ok()?;
            let status = res.status();
            res.into_body().collect().await.ok()?;
            Some(status)
        }
    })
    .await;
    let started = Instant::now();
    let mut out = Outcomes::default();
    for task in tasks {
        match task.await.ok().flatten() {
            Some(StatusCode::OK) => out.ok += 1,
            Some(StatusCode::TOO_MANY_REQUESTS) => out.too_many += 1,
            _ => out.failed += 1,
        }
    }
    out.wall = started.elapsed();
    out.api_calls = api.calls();
    out
}

/// A user record, as the API returns it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct User {
    id: u64,
    name: String,
    email: String,
}

/// Why a fetch failed.
#[derive(Debug)]
enum ApiError {
    RateLimited,
    Other(String),
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiError::RateLimited => f.write_str("429 Too Many Requests"),
            ApiError::Other(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for ApiError {}

/// The plain async fetch: one API call, the JSON parsed into a [`User`].
async fn fetch_user(
    client: Client<HttpConnector, Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Result<User, ApiError> {
    let res = client
        .request(with_token(req))
        .await
        .map_err(|e| ApiError::Other(e.to_string()))?;
    match res.status() {
        StatusCode::OK => {}
        StatusCode::TOO_MANY_REQUESTS => return Err(ApiError::RateLimited),
        other => return Err(ApiError::Other(format!("status {other}"))),
    }
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|e| ApiError::Other(e.to_string()))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| ApiError::Other(e.to_string()))
}

/// The lookups through `Cache<User>`: lookup `i` asks node `i % NODES` for user
/// `i % USERS + 1`.
async fn cache_lookups(
    api: &Api,
    client: &Client<HttpConnector, Full<Bytes>>,
    caches: &[Cache<User>],
) -> Outcomes {
    let tasks = spawn_released_together(LOOKUPS, |i| {
        let cache = caches[i % caches.len()].clone();
        let id = i % USERS + 1;
        let fetch = fetch_user(client.clone(), api.request(&format!("/users/{id}")));
        async move { cache.try_get_with(format!("user:{id}"), fetch).await }
    })
    .await;
    let started = Instant::now();
    let mut out = Outcomes::default();
    for task in tasks {
        match task.await {
            Ok(Ok(_user)) => out.ok += 1,
            Ok(Err(tower_stampede::Error::Init(e))) if matches!(*e, ApiError::RateLimited) => {
                out.too_many += 1
            }
            _ => out.failed += 1,
        }
    }
    out.wall = started.elapsed();
    out.api_calls = api.calls();
    out
}

// ---------------------------------------------------------------------------------------
// The rate-limited API and the client.

/// An API that answers `429` to calls beyond [`RATE_LIMIT`] in the last second.
struct Api {
    addr: SocketAddr,
    state: Arc<ApiState>,
}

/// What the API remembers: how many calls it got, and when it admitted the recent ones.
#[derive(Default)]
struct ApiState {
    calls: AtomicUsize,
    admitted: Mutex<VecDeque<Instant>>,
}

impl Api {
    async fn start() -> std::io::Result<Api> {
        let state = Arc::new(ApiState::default());
        let shared = state.clone();
        let addr = common::serve("api", move |req: Request<Incoming>| {
            let state = shared.clone();
            async move { state.handle(req).await }
        })
        .await?;
        Ok(Api { addr, state })
    }

    fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }

    fn request(&self, path: &str) -> Request<Full<Bytes>> {
        common::get(self.addr, path)
    }
}

impl ApiState {
    /// The API's one handler. `/health` is free; `/users/{id}` is counted and rate limited.
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        if path == "/health" {
            return respond(StatusCode::OK, "ok");
        }
        let Some(id) = path
            .strip_prefix("/users/")
            .and_then(|id| id.parse::<u64>().ok())
        else {
            return respond(StatusCode::NOT_FOUND, "no such route");
        };
        self.calls.fetch_add(1, Ordering::SeqCst);
        if req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            != Some(TOKEN)
        {
            return respond(StatusCode::UNAUTHORIZED, "bad token");
        }
        if !self.admit() {
            let mut res = respond(StatusCode::TOO_MANY_REQUESTS, "slow down");
            res.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            return res;
        }
        tokio::time::sleep(API_DELAY).await;
        let body = format!(r#"{{"id":{id},"name":"user {id}","email":"user{id}@example.com"}}"#);
        let mut res = respond(StatusCode::OK, body);
        res.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        res
    }

    /// The rate limit, a sliding window: admits a call when fewer than [`RATE_LIMIT`] were
    /// admitted in the last second.
    fn admit(&self) -> bool {
        let mut admitted = self.admitted.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        while admitted
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
        {
            admitted.pop_front();
        }
        if admitted.len() >= RATE_LIMIT {
            return false;
        }
        admitted.push_back(now);
        true
    }
}

fn respond(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(body.into()));
    *res.status_mut() = status;
    res
}

/// Opens the client's connection to the API (on a free route) before anything is timed.
async fn warm_up(
    client: &Client<HttpConnector, Full<Bytes>>,
    api: &Api,
) -> Result<(), Box<dyn Error>> {
    let res = client.request(api.request("/health")).await?;
    res.into_body().collect().await?;
    Ok(())
}
