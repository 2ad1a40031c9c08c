//! End-to-end tests of `examples/proxy.rs` on real sockets: the example binary (built by
//! `cargo test` or `cargo build --examples`) runs as child processes in front of a
//! counting upstream written here, sharing a real `redis-server`.

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use support::RedisServer;
use tokio::net::TcpListener;
use tokio::sync::Barrier;

const BIG: usize = 3 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------
// The proxy process
// ---------------------------------------------------------------------------------------

#[path = "support/proxy_process.rs"]
mod proxy_process;

use proxy_process::Proxy;

// ---------------------------------------------------------------------------------------
// The counting upstream
// ---------------------------------------------------------------------------------------

type UpBody = BoxBody<Bytes, Infallible>;

/// A hyper server on 127.0.0.1:0 that counts requests per path. Paths:
/// `/big` (3 MiB, streamed in chunks, see [`big_body`]), `/echo-headers` (the request
/// headers it saw, one `name: value` a line; it also answers a few hop-by-hop headers),
/// `/nostore` (`Cache-Control: no-store`), anything else `"<path> #<n>"`.
struct Upstream {
    addr: SocketAddr,
    counts: Arc<Mutex<HashMap<String, usize>>>,
    delay_ms: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    async fn start(delay: Duration) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counts = Arc::new(Mutex::new(HashMap::new()));
        let delay_ms = Arc::new(AtomicU64::new(delay.as_millis() as u64));
        let (c, d) = (counts.clone(), delay_ms.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (counts, delay_ms) = (c.clone(), d.clone());
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    upstream_answer(req, counts.clone(), delay_ms.clone())
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            counts,
            delay_ms,
            task,
        }
    }

    fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn count(&self, path: &str) -> usize {
        self.counts.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The deterministic 3 MiB of `/big`.
fn big_body() -> Vec<u8> {
    (0..BIG)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 11)) as u8)
        .collect()
}

async fn upstream_answer(
    req: Request<Incoming>,
    counts: Arc<Mutex<HashMap<String, usize>>>,
    delay_ms: Arc<AtomicU64>,
) -> Result<Response<UpBody>, Infallible> {
    let path = req.uri().path().to_owned();
    let n = {
        let mut counts = counts.lock().unwrap();
        let n = counts.entry(path.clone()).or_insert(0);
        *n += 1;
        *n
    };
    let delay = delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let full = |text: String| Full::new(Bytes::from(text)).boxed();
    let res = match path.as_str() {
        "/big" => {
            let data = Bytes::from(big_body());
            let chunks = (0..BIG).step_by(CHUNK).map(move |at| {
                Ok::<_, Infallible>(Frame::data(data.slice(at..(at + CHUNK).min(BIG))))
            });
            Response::new(StreamBody::new(futures_util::stream::iter(chunks)).boxed())
        }
        "/echo-headers" => {
            let seen: String = req
                .headers()
                .iter()
                .map(|(k, v)| format!("{k}: {}\n", v.to_str().unwrap_or("?")))
                .collect();
            Response::builder()
                .header("connection", "x-resp-hop")
                .header("x-resp-hop", "1")
                .header("keep-alive", "timeout=5")
                .header("x-resp-kept", "yes")
                .body(full(seen))
                .unwrap()
        }
        "/nostore" => Response::builder()
            .header("cache-control", "no-store")
            .body(full(format!("/nostore #{n}")))
            .unwrap(),
        _ => Response::new(full(format!("{path} #{n}"))),
    };
    Ok(res)
}

// ---------------------------------------------------------------------------------------
// The test client
// ---------------------------------------------------------------------------------------

fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_max_idle_per_host(4096)
        .build_http()
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn cache_status(&self) -> &str {
        self.headers
            .get("cache-status")
            .map_or("", |v| v.to_str().unwrap())
    }

    fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("utf-8 body")
    }
}

async fn send(client: &Client<HttpConnector, Empty<Bytes>>, req: Request<Empty<Bytes>>) -> Answer {
    let res = client.request(req).await.expect("request to the proxy");
    let (parts, body) = res.into_parts();
    let body = body.collect().await.expect("response body").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

async fn get(client: &Client<HttpConnector, Empty<Bytes>>, url: &str) -> Answer {
    send(client, Request::get(url).body(Empty::new()).unwrap()).await
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_status_and_upstream_counts() {
    let redis = RedisServer::start();
    let upstream = Upstream::start(Duration::ZERO).await;
    // The upstream sends no freshness: `--ttl` gives it one (the default, 0, stores nothing).
    let proxy = Proxy::start(&upstream.base(), &["--redis", &redis.url(), "--ttl", "60s"]);
    let client = client();

    let first = get(&client, &proxy.url("/a?x=1")).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.cache_status(), "tower-stampede; fwd=miss; stored");
    assert_eq!(first.text(), "/a #1");

    let second = get(&client, &proxy.url("/a?x=1")).await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(second.cache_status(), "tower-stampede; hit; detail=memory");
    assert_eq!(second.text(), "/a #1");
    assert_eq!(upstream.count("/a"), 1);

    // Another query is another key.
    let other = get(&client, &proxy.url("/a?x=2")).await;
    assert_eq!(other.cache_status(), "tower-stampede; fwd=miss; stored");
    assert_eq!(upstream.count("/a"), 2);

    // `no-store` answers are passed on, not stored.
    let first = get(&client, &proxy.url("/nostore")).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(
        first.cache_status(),
        "tower-stampede; fwd=miss; detail=uncacheable"
    );
    assert_eq!(first.headers.get("cache-control").unwrap(), "no-store");
    let second = get(&client, &proxy.url("/nostore")).await;
    assert_eq!(second.text(), "/nostore #2");
    assert!(
        !second.cache_status().contains("hit;"),
        "{}",
        second.cache_status()
    );
    assert_eq!(upstream.count("/nostore"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_proxies_one_redis_one_upstream_call_per_cold_key() {
    let redis = RedisServer::start();
    let upstream = Upstream::start(Duration::from_millis(200)).await;
    // Three debug-build proxies, 3000 sockets and this test share a few CPUs here: Redis
    // calls can take longer than the 100 ms default deadline for scheduling reasons alone,
    // and a proxy that gives up on Redis coalesces only within itself (fails open). The
    // second runs on one thread (`--workers 1`: a current-thread runtime), the others on
    // one worker per CPU.
    let redis_url = redis.url();
    let proxies: Vec<Proxy> = (0..3)
        .map(|i| {
            let workers: &[&str] = if i == 1 { &["--workers", "1"] } else { &[] };
            let mut args = vec![
                "--redis",
                &redis_url,
                "--redis-timeout",
                "2s",
                "--ttl",
                "60s",
            ];
            args.extend_from_slice(workers);
            Proxy::start(&upstream.base(), &args)
        })
        .collect();
    let client = client();

    // 300 clients, one cold key, spread over the three proxies, released together.
    const CLIENTS: usize = 300;
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let mut tasks = Vec::with_capacity(CLIENTS);
    for i in 0..CLIENTS {
        let (client, barrier) = (client.clone(), barrier.clone());
        let url = proxies[i % proxies.len()].url("/hot");
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let started = Instant::now();
            let answer = get(&client, &url).await;
            (answer, started.elapsed())
        }));
    }
    let mut latencies = Vec::with_capacity(CLIENTS);
    let mut statuses: HashMap<String, usize> = HashMap::new();
    for task in tasks {
        let (answer, took) = task.await.unwrap();
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.cache_status());
        assert_eq!(answer.text(), "/hot #1");
        *statuses
            .entry(answer.cache_status().to_owned())
            .or_default() += 1;
        latencies.push(took);
    }
    latencies.sort();
    eprintln!(
        "300 clients / 1 cold key / 3 proxies: upstream calls = {}, p50 = {:?}, p99 = {:?}, max = {:?}",
        upstream.count("/hot"),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies[latencies.len() - 1],
    );
    eprintln!("  cache-status: {statuses:?}");
    assert_eq!(
        upstream.count("/hot"),
        1,
        "one upstream call for the whole fleet"
    );
    assert_eq!(statuses.get("tower-stampede; fwd=miss; stored"), Some(&1));

    // 3000 clients over 100 cold keys: one upstream call per key.
    upstream.set_delay(Duration::from_millis(50));
    const KEYS: usize = 100;
    const MANY: usize = 3000;
    let barrier = Arc::new(Barrier::new(MANY));
    let mut tasks = Vec::with_capacity(MANY);
    for i in 0..MANY {
        let (client, barrier) = (client.clone(), barrier.clone());
        let path = format!("/k/{}", i % KEYS);
        let url = proxies[i % proxies.len()].url(&path);
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let started = Instant::now();
            let answer = get(&client, &url).await;
            (path, answer, started.elapsed())
        }));
    }
    let mut latencies = Vec::with_capacity(MANY);
    for task in tasks {
        let (path, answer, took) = task.await.unwrap();
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "{path}: {}",
            answer.cache_status()
        );
        assert_eq!(answer.text(), format!("{path} #1"));
        latencies.push(took);
    }
    latencies.sort();
    let calls: usize = (0..KEYS).map(|k| upstream.count(&format!("/k/{k}"))).sum();
    eprintln!(
        "3000 clients / 100 cold keys / 3 proxies: upstream calls = {calls}, p50 = {:?}, p99 = {:?}",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
    );
    for k in 0..KEYS {
        assert_eq!(upstream.count(&format!("/k/{k}")), 1, "/k/{k}");
    }
    assert_eq!(calls, KEYS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_502_and_slow_upstream_is_504() {
    // A port with nothing listening on it.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = Proxy::start(&format!("http://{dead}"), &[]);
    let client = client();
    let answer = get(&client, &proxy.url("/anything")).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", proxy.output());

    let slow = Upstream::start(Duration::from_secs(5)).await;
    let proxy = Proxy::start(&slow.base(), &["--upstream-timeout", "200ms"]);
    let answer = get(&client, &proxy.url("/slow")).await;
    assert_eq!(
        answer.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        proxy.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_not_forwarded() {
    let upstream = Upstream::start(Duration::ZERO).await;
    let proxy = Proxy::start(&upstream.base(), &[]);
    let client = client();

    let req = Request::get(proxy.url("/echo-headers"))
        .header("connection", "x-custom")
        .header("x-custom", "1")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("x-kept", "yes")
        .header("x-forwarded-for", "10.0.0.1")
        .body(Empty::new())
        .unwrap();
    let answer = send(&client, req).await;
    assert_eq!(answer.status, StatusCode::OK);
    let seen: HashMap<String, String> = answer
        .text()
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    for hop in ["connection", "x-custom", "keep-alive", "te"] {
        assert!(!seen.contains_key(hop), "upstream saw `{hop}`: {seen:?}");
    }
    assert_eq!(
        seen.get("x-kept").map(String::as_str),
        Some("yes"),
        "{seen:?}"
    );
    // Built from the connection: the client's own value is not kept (`tests/poisoning.rs`).
    assert_eq!(
        seen.get("x-forwarded-for").map(String::as_str),
        Some("127.0.0.1")
    );
    assert_eq!(
        seen.get("x-forwarded-proto").map(String::as_str),
        Some("http")
    );
    assert_eq!(
        seen.get("host"),
        Some(&upstream.addr.to_string()),
        "host is the upstream's"
    );

    // And the other way: the upstream's hop-by-hop headers do not reach the client.
    assert!(
        answer.headers.get("x-resp-hop").is_none(),
        "{:?}",
        answer.headers
    );
    assert!(
        answer.headers.get("keep-alive").is_none(),
        "{:?}",
        answer.headers
    );
    assert_eq!(answer.headers.get("x-resp-kept").unwrap(), "yes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_max_body_streams_intact_and_is_not_stored() {
    let redis = RedisServer::start();
    let upstream = Upstream::start(Duration::ZERO).await;
    let proxy = Proxy::start(
        &upstream.base(),
        &["--redis", &redis.url(), "--max-body", "1048576"],
    );
    let client = client();
    let expected = big_body();

    let first = get(&client, &proxy.url("/big")).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.body.len(), BIG);
    assert!(
        first.body == expected,
        "the streamed body differs from the upstream's"
    );
    assert_eq!(
        first.cache_status(),
        "tower-stampede; fwd=miss; detail=uncacheable"
    );

    let second = get(&client, &proxy.url("/big")).await;
    assert_eq!(second.status, StatusCode::OK);
    assert!(
        second.body == expected,
        "the second streamed body differs from the upstream's"
    );
    assert!(
        !second.cache_status().contains("hit;"),
        "{}",
        second.cache_status()
    );
    assert_eq!(
        upstream.count("/big"),
        2,
        "not stored: both requests went upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_the_proxy_still_caches_and_stops_on_sigterm() {
    let upstream = Upstream::start(Duration::ZERO).await;
    let mut proxy = Proxy::start(&upstream.base(), &["--ttl", "60s"]);
    assert!(
        proxy.output().contains("cross-node coalescing needs Redis"),
        "{}",
        proxy.output()
    );
    let client = client();

    let first = get(&client, &proxy.url("/local")).await;
    assert_eq!(first.cache_status(), "tower-stampede; fwd=miss; stored");
    let second = get(&client, &proxy.url("/local")).await;
    assert_eq!(second.cache_status(), "tower-stampede; hit; detail=memory");
    assert_eq!(second.text(), "/local #1");
    assert_eq!(upstream.count("/local"), 1);

    // Graceful shutdown, with the client's keep-alive connection still open.
    let status = proxy.terminate();
    assert!(
        status.success(),
        "exit status {status:?}; output:\n{}",
        proxy.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_counts_hits() {
    let upstream = Upstream::start(Duration::ZERO).await;
    let proxy = Proxy::start(
        &upstream.base(),
        &["--metrics-listen", "127.0.0.1:0", "--ttl", "60s"],
    );
    let metrics = proxy
        .metrics
        .expect("the proxy logs `metrics on http://ADDR/metrics`");
    let client = client();

    get(&client, &proxy.url("/m")).await;
    let hit = get(&client, &proxy.url("/m")).await;
    assert_eq!(hit.cache_status(), "tower-stampede; hit; detail=memory");

    // The endpoint is bound before the address is logged; no retry needed.
    let page = get(&client, &format!("http://{metrics}/metrics")).await;
    assert_eq!(page.status, StatusCode::OK);
    let text = page.text();
    assert!(text.contains("tower_stampede_hits_total"), "{text}");
    let hits = text
        .lines()
        .find(|l| l.starts_with("tower_stampede_hits_total{") && l.contains("memory"))
        .unwrap_or_else(|| panic!("no memory-hit series in:\n{text}"));
    assert!(hits.ends_with(" 1"), "{hits}");
    assert!(
        text.contains("tower_stampede_stored_total{cache=\"tower-stampede\"} 1"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_serves_stale_at_once_while_one_refresh_runs_across_proxies() {
    let redis = RedisServer::start();
    let upstream = Upstream::start(Duration::from_millis(200)).await;
    let args = [
        "--redis",
        &redis.url(),
        "--redis-timeout",
        "2s",
        "--ttl",
        "300ms",
        "--grace",
        "1m",
    ];
    let proxies: Vec<_> = (0..3)
        .map(|_| Proxy::start(&upstream.base(), &args))
        .collect();
    let client = client();

    assert_eq!(
        get(&client, &proxies[0].url("/swr")).await.text(),
        "/swr #1"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Past the TTL: every proxy answers from the stale copy without waiting on the upstream.
    for round in 0..3 {
        for p in &proxies {
            let a = get(&client, &p.url("/swr")).await;
            assert_eq!(a.status, StatusCode::OK);
            assert_eq!(a.text(), "/swr #1", "round {round}");
            assert_eq!(a.cache_status(), "tower-stampede; hit; detail=stale");
        }
    }
    // Exactly one refresh lands, fleet-wide; then everyone has the new value.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let a = get(&client, &proxies[1].url("/swr")).await;
        if a.text() == "/swr #2" {
            break;
        }
        assert!(Instant::now() < deadline, "the refresh never landed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for p in &proxies {
        assert_eq!(get(&client, &p.url("/swr")).await.text(), "/swr #2");
    }
    assert_eq!(upstream.count("/swr"), 2);
}
