//! Several nodes (layers with their own L1 and Redis connections) sharing one real
//! redis-server: coalescing, failures, dropped leaders, Redis outages, corrupt bytes.

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use redis::AsyncCommands;
use support::{cache_status, get, stampede, text, RedisServer, Upstream};
use tokio::sync::{Barrier, Notify};
use tower::{Layer, Service, ServiceExt};
use tower_stampede::{Backend, StampedeBuilder, StampedeLayer};

/// A node on `server`. The deadline is generous: these tests are about coalescing, and a
/// test machine running other suites at once must not look like a slow Redis.
fn node(server: &RedisServer) -> StampedeBuilder {
    StampedeLayer::builder()
        .backend(Backend::redis(server.url()).unwrap())
        .redis_timeout(Duration::from_secs(1))
}

fn nodes(server: &RedisServer, n: usize) -> Vec<StampedeLayer> {
    (0..n).map(|_| node(server).build()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_300_requests_one_cold_key_make_one_upstream_call() {
    let server = RedisServer::start();
    let upstream = Upstream::new(Duration::from_millis(200));
    let layers = nodes(&server, 3);
    let services: Vec<_> = layers.iter().map(|l| l.layer(upstream.service())).collect();

    let started = Instant::now();
    let results = stampede(&services, &["/hot".to_owned()], 300).await;
    let elapsed = started.elapsed();

    assert_eq!(upstream.calls(), 1, "one upstream call for the whole fleet");
    assert_eq!(results.len(), 300);
    for (_, status, _, body) in &results {
        assert_eq!(*status, StatusCode::OK);
        assert_eq!(body, "/hot #1");
    }
    let stored = results.iter().filter(|r| r.2.contains("stored")).count();
    assert_eq!(stored, 1);
    let stats: Vec<_> = layers.iter().map(|l| l.stats()).collect();
    assert_eq!(stats.iter().map(|s| s.upstream_calls).sum::<u64>(), 1);
    eprintln!(
        "300 requests, 3 nodes, 1 cold key, upstream 200 ms: {} upstream call(s), all answered in {elapsed:?}; \
         collapsed local {} remote {}",
        upstream.calls(),
        stats.iter().map(|s| s.collapsed_local).sum::<u64>(),
        stats.iter().map(|s| s.collapsed_remote).sum::<u64>(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_100_keys_30_requests_each_make_100_upstream_calls() {
    let server = RedisServer::start();
    let upstream = Upstream::new(Duration::from_millis(50));
    let layers = nodes(&server, 3);
    let services: Vec<_> = layers.iter().map(|l| l.layer(upstream.service())).collect();
    let paths: Vec<String> = (0..100).map(|i| format!("/k{i}")).collect();

    let started = Instant::now();
    let results = stampede(&services, &paths, 30).await;
    let elapsed = started.elapsed();

    assert_eq!(upstream.calls(), 100);
    assert_eq!(results.len(), 3000);
    let mut bodies = std::collections::HashMap::new();
    for (path, status, _, body) in &results {
        assert_eq!(*status, StatusCode::OK);
        assert!(
            body.starts_with(&format!("{path} #")),
            "{path} answered with {body}"
        );
        let first = bodies.entry(path.clone()).or_insert_with(|| body.clone());
        assert_eq!(first, body, "every request for {path} got the same answer");
    }
    eprintln!(
        "3000 requests, 3 nodes, 100 cold keys: {} upstream calls in {elapsed:?}",
        upstream.calls()
    );
}

/// An inner service that fails (or panics) on every call, counting calls.
#[derive(Clone)]
struct Failing {
    calls: Arc<AtomicUsize>,
    panic: bool,
    release: Arc<Barrier>,
}

impl Service<Request<Full<Bytes>>> for Failing {
    type Response = Response<Full<Bytes>>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<Full<Bytes>>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let n = this.calls.fetch_add(1, Ordering::SeqCst);
            if n == 0 {
                // The first call waits until every request is in flight.
                this.release.wait().await;
            }
            if this.panic {
                panic!("upstream panicked");
            }
            Err(std::io::Error::other("upstream failed"))
        })
    }
}

async fn failing_upstream_answers_everyone(panic: bool) {
    let server = RedisServer::start();
    let layers: Vec<_> = (0..3)
        .map(|_| node(&server).max_takeovers(1).build())
        .collect();
    let calls = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(Barrier::new(2));
    let inner = Failing {
        calls: calls.clone(),
        panic,
        release: release.clone(),
    };
    let services: Vec<_> = layers.iter().map(|l| l.layer(inner.clone())).collect();

    let mut tasks = Vec::new();
    for i in 0..30 {
        let svc = services[i % 3].clone();
        tasks.push(tokio::spawn(
            async move { svc.oneshot(get("/broken")).await },
        ));
    }
    // Let the first upstream call fail once all 30 requests are queued behind it.
    // ...and the two other nodes wait on its lock (each node's flight waits once).
    while layers.iter().map(|l| l.stats().misses).sum::<u64>() < 30
        || layers.iter().map(|l| l.stats().lock_waited).sum::<u64>() < 2
    {
        tokio::task::yield_now().await;
    }
    release.wait().await;

    let mut errors = 0;
    let mut bad_gateway = 0;
    for t in tasks {
        match tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("a request hung")
            .unwrap()
        {
            Err(_) => errors += 1,
            Ok(res) => {
                assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
                assert!(
                    cache_status(&res).contains("upstream-failed"),
                    "{}",
                    cache_status(&res)
                );
                bad_gateway += 1;
            }
        }
    }
    assert_eq!(errors + bad_gateway, 30, "every request answered");
    if panic {
        assert_eq!(errors, 0, "a panic is a 502, never a crash");
    } else {
        assert!(errors >= 1, "the leader gets its own error");
    }
    let n = calls.load(Ordering::SeqCst);
    // One attempt: its failure is the answer of everyone waiting on it, on every node.
    assert_eq!(n, 1, "{n} upstream calls");
    eprintln!("30 requests on a failing upstream across 3 nodes: {n} upstream calls");

    let mut conn = server.conn().await;
    let mut keys: Vec<String> = conn.keys("stampede:*").await.unwrap();
    // The short failure marker of the attempt may remain, with its expiry.
    keys.retain(|k| !k.ends_with(":fail"));
    assert!(keys.is_empty(), "nothing stored and no lock left: {keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inner_error_stores_nothing_releases_the_lock_and_answers_every_waiter() {
    failing_upstream_answers_everyone(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inner_panic_stores_nothing_releases_the_lock_and_answers_every_waiter() {
    failing_upstream_answers_everyone(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_leader_still_serves_its_waiters_and_leaves_no_lock() {
    let server = RedisServer::start();
    let layers = nodes(&server, 3);
    let calls = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(Notify::new());
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let inner = {
        let (calls, started, gate) = (calls.clone(), started.clone(), gate.clone());
        tower::service_fn(move |_req: Request<Full<Bytes>>| {
            let (calls, started, gate) = (calls.clone(), started.clone(), gate.clone());
            async move {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                started.notify_one();
                let _permit = gate.acquire().await.unwrap();
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("value #{n}")))))
            }
        })
    };
    let services: Vec<_> = layers.iter().map(|l| l.layer(inner.clone())).collect();

    // The leader's request reaches the upstream, then its client goes away.
    let leader = tokio::spawn(services[0].clone().oneshot(get("/slow")));
    started.notified().await;
    let mut waiters = Vec::new();
    for i in 0..30 {
        waiters.push(tokio::spawn(services[i % 3].clone().oneshot(get("/slow"))));
    }
    leader.abort();
    assert!(leader.await.unwrap_err().is_cancelled());
    gate.add_permits(1000);

    for w in waiters {
        let res = w.await.unwrap().unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(text(res).await, "value #1");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // No lock left once the fill's write has landed, and one value.
    server.wait_for_keys("stampede:*:v", 1).await;
    let locks = server.wait_for_keys("stampede:*:lock", 0).await;
    assert!(locks.is_empty(), "lock left behind: {locks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_fails_open_and_coalescing_resumes_after_restart() {
    let mut server = RedisServer::start();
    let upstream = Upstream::new(Duration::from_millis(50));
    let layers: Vec<_> = (0..3)
        .map(|_| {
            node(&server)
                .redis_timeout(Duration::from_millis(200))
                .circuit_breaker(2, Duration::from_millis(200))
                .build()
        })
        .collect();
    let services: Vec<_> = layers.iter().map(|l| l.layer(upstream.service())).collect();

    let results = stampede(&services, &["/before".to_owned()], 30).await;
    assert!(results.iter().all(|r| r.3 == "/before #1"));
    assert_eq!(upstream.calls(), 1);

    server.kill();
    let before = upstream.calls();
    let results = stampede(&services, &["/during".to_owned()], 30).await;
    for (_, status, _, body) in &results {
        assert_eq!(*status, StatusCode::OK);
        assert!(body.starts_with("/during #"));
    }
    let during = upstream.calls() - before;
    assert!(
        (1..=3).contains(&during),
        "fail open, coalesced per node: {during} calls"
    );
    assert!(layers.iter().map(|l| l.stats().redis_errors).sum::<u64>() > 0);

    server.restart();
    let mut resumed_after = None;
    for round in 0..200 {
        let path = format!("/after{round}");
        let before = upstream.calls();
        let results = stampede(&services, std::slice::from_ref(&path), 30).await;
        assert!(results.iter().all(|r| r.1 == StatusCode::OK));
        if upstream.calls() - before == 1 {
            let first = &results[0].3;
            assert!(results.iter().all(|r| &r.3 == first));
            resumed_after = Some(round);
            break;
        }
    }
    let round = resumed_after.expect("cross-node coalescing never resumed after the restart");
    eprintln!("coalescing across nodes resumed on round {round} after the restart");
    let mut conn = server.conn().await;
    let values: Vec<String> = conn.keys("stampede:*:v").await.unwrap();
    assert!(!values.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_fails_open_without_hanging() {
    let server = RedisServer::start();
    let upstream = Upstream::new(Duration::ZERO);
    let layer = node(&server)
        .redis_timeout(Duration::from_millis(100))
        .build();
    let svc = layer.layer(upstream.service());
    svc.clone().oneshot(get("/warm")).await.unwrap();
    server.pause();
    // Frozen for sure before the requests: a PING no longer gets its answer (bounded).
    let mut tries = 0;
    while support::ping(server.port()) {
        tries += 1;
        assert!(tries < 100, "redis-server never froze");
    }
    for i in 0..5 {
        let res = svc.clone().oneshot(get(&format!("/p{i}"))).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    server.resume();
    assert_eq!(upstream.calls(), 6);
    assert!(layer.stats().redis_errors >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_closed_when_asked() {
    let mut server = RedisServer::start();
    let upstream = Upstream::new(Duration::ZERO);
    let layer = node(&server)
        .on_redis_error(tower_stampede::FailurePolicy::Closed)
        .build();
    let svc = layer.layer(upstream.service());
    server.kill();
    let res = svc.oneshot(get("/x")).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(cache_status(&res).contains("redis-unavailable"));
    assert_eq!(upstream.calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_foreign_bytes_are_a_miss_then_overwritten() {
    let server = RedisServer::start();
    let upstream = Upstream::new(Duration::ZERO);
    let first = node(&server).build().layer(upstream.service());
    assert_eq!(
        text(first.clone().oneshot(get("/g")).await.unwrap()).await,
        "/g #1"
    );
    assert_eq!(
        text(first.clone().oneshot(get("/other")).await.unwrap()).await,
        "/other #2"
    );

    let mut conn = server.conn().await;
    let keys = server.wait_for_keys("stampede:*:v", 2).await;
    let mut key_of = std::collections::HashMap::new();
    for k in &keys {
        let v: Vec<u8> = conn.get(k).await.unwrap();
        let body = if v.ends_with(b"/g #1") {
            "/g"
        } else {
            "/other"
        };
        key_of.insert(body, k.clone());
    }
    let g_key = key_of["/g"].clone();
    let other_bytes: Vec<u8> = conn.get(&key_of["/other"]).await.unwrap();

    let cases: [(&str, Vec<u8>); 4] = [
        ("garbage", b"\x00\xffnot an envelope".to_vec()),
        ("empty", Vec::new()),
        ("truncated", other_bytes[..other_bytes.len() / 2].to_vec()),
        ("another key's entry", other_bytes.clone()),
    ];
    for (i, (what, bytes)) in cases.into_iter().enumerate() {
        let () = conn.set(&g_key, bytes).await.unwrap();
        // A fresh node: empty L1, so the bytes in Redis are all it can find.
        let fresh = node(&server).build().layer(upstream.service());
        let res = fresh.oneshot(get("/g")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{what}");
        assert!(
            cache_status(&res).contains("stored"),
            "{what}: {}",
            cache_status(&res)
        );
        let expected = format!("/g #{}", i + 3);
        assert_eq!(text(res).await, expected, "{what} was a miss");
        // The write follows the answer: wait (bounded) for it to replace the bad bytes.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stored: Vec<u8> = conn.get(&g_key).await.unwrap();
            if stored.starts_with(b"TSE") && stored.ends_with(expected.as_bytes()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{what} never overwritten: {stored:?}"
            );
            tokio::task::yield_now().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_backend_coalesces_within_the_process() {
    let upstream = Upstream::new(Duration::from_millis(50));
    let layer = StampedeLayer::new();
    let svc = layer.layer(upstream.service());
    let results = stampede(&[svc], &["/local".to_owned()], 100).await;
    assert_eq!(upstream.calls(), 1);
    assert!(results.iter().all(|r| r.3 == "/local #1"));
    let s = layer.stats();
    assert_eq!((s.upstream_calls, s.stored), (1, 1));
    assert_eq!(s.collapsed_local + s.hits_memory, 99);
}
