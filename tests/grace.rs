//! Grace, fleet-wide: stale-while-revalidate, stale-if-error, early refresh and negative
//! caching, against a real redis-server.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use redis::AsyncCommands;
use support::{cache_status, get, stampede, text, RedisServer, Upstream};
use tower::{Layer, ServiceExt};
use tower_stampede::{Backend, StampedeBuilder, StampedeLayer, Stats};

/// The origin of these tests: counts calls; answers `"<path> #<n>"` after `delay`, or 500
/// while [`fail`](Upstream::fail)ing, or 404 for paths under `/missing`.
fn new_origin(delay: Duration) -> Upstream {
    Upstream::new(delay).not_found_under("/missing")
}

fn node(server: &RedisServer) -> StampedeBuilder {
    // A generous deadline: a busy test machine must not look like a slow Redis here.
    StampedeLayer::builder()
        .backend(Backend::redis(server.url()).unwrap())
        .redis_timeout(Duration::from_secs(1))
}

fn total(layers: &[StampedeLayer], f: impl Fn(Stats) -> u64) -> u64 {
    layers.iter().map(|l| f(l.stats())).sum()
}

/// Waits (bounded) until `done` holds, yielding to the runtime in between.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Stores `path` through `svc` (asserting it is the origin's first answer), then lets its
/// TTL pass.
async fn store_then_expire<S, B>(svc: &S, path: &str, ttl: Duration)
where
    S: tower::Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    assert_eq!(
        text(svc.clone().oneshot(get(path)).await.unwrap()).await,
        format!("{path} #1")
    );
    tokio::time::sleep(ttl).await;
}

/// `n` nodes on `server`, each built by `configure`.
fn nodes(
    server: &RedisServer,
    n: usize,
    configure: impl Fn(StampedeBuilder) -> StampedeBuilder,
) -> Vec<StampedeLayer> {
    (0..n).map(|_| configure(node(server)).build()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inside_the_grace_window_everyone_gets_the_stale_copy_while_one_refresh_runs() {
    let server = RedisServer::start();
    let origin = new_origin(Duration::from_millis(200));
    let ttl = Duration::from_millis(300);
    let layers = nodes(&server, 3, |n| n.ttl(ttl).grace(Duration::from_secs(60)));
    let services: Vec<_> = layers.iter().map(|l| l.layer(origin.service())).collect();

    // Node 0 stores the value; then the TTL passes.
    store_then_expire(&services[0], "/swr", ttl).await;

    let results = stampede(&services, &["/swr"], 100).await;
    for (_, status, cs, body) in &results {
        assert_eq!(*status, StatusCode::OK);
        assert_eq!(body, "/swr #1");
        assert!(
            cs.contains("detail=stale"),
            "answered from the stale copy: {cs}"
        );
    }
    // Exactly one refresh, fleet-wide.
    until("the refresh to land", || total(&layers, |s| s.stored) == 2).await;
    assert_eq!(origin.calls(), 2);

    // Every node converges on the new value through the wake-up (or, if one was missed,
    // by adopting the newer copy from Redis), without another upstream call.
    for (i, svc) in services.iter().enumerate() {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let res = svc.clone().oneshot(get("/swr")).await.unwrap();
            let cs = cache_status(&res);
            match text(res).await.as_str() {
                "/swr #2" => {
                    assert!(!cs.contains("stale") && !cs.contains("stored"), "{cs}");
                    break;
                }
                "/swr #1" => assert!(cs.contains("detail=stale"), "node {i}: {cs}"),
                other => panic!("node {i} answered {other}"),
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {i} never saw the refresh"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let results = stampede(&services, &["/swr"], 30).await;
    assert!(results
        .iter()
        .all(|(_, s, _, b)| *s == StatusCode::OK && b == "/swr #2"));
    assert_eq!(origin.calls(), 2);
    assert!(total(&layers, |s| s.stale_served) >= 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_refresh_keeps_serving_stale_and_retries_later() {
    let server = RedisServer::start();
    let origin = new_origin(Duration::from_millis(20));
    let ttl = Duration::from_millis(200);
    let layers = nodes(&server, 3, |n| n.ttl(ttl).grace(Duration::from_secs(60)));
    let services: Vec<_> = layers.iter().map(|l| l.layer(origin.service())).collect();

    store_then_expire(&services[0], "/flaky", ttl).await;
    origin.fail(true);

    let results = stampede(&services, &["/flaky"], 30).await;
    assert!(results
        .iter()
        .all(|(_, s, cs, b)| *s == StatusCode::OK && b == "/flaky #1" && cs.contains("stale")));
    until("the refresh to fail", || {
        total(&layers, |s| s.upstream_failures) >= 1
    })
    .await;
    let failed_calls = origin.calls();
    let results = stampede(&services, &["/flaky"], 30).await;
    assert!(
        results
            .iter()
            .all(|(_, s, _, b)| *s == StatusCode::OK && b == "/flaky #1"),
        "stale kept after a failure"
    );

    // Once the upstream recovers, a later refresh lands.
    origin.fail(false);
    let mut fresh = None;
    for _ in 0..400 {
        let res = services[0].clone().oneshot(get("/flaky")).await.unwrap();
        let body = text(res).await;
        if body != "/flaky #1" {
            fresh = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let fresh = fresh.expect("the refresh was never retried");
    assert!(origin.calls() > failed_calls);
    assert_eq!(fresh, format!("/flaky #{}", origin.calls()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_serves_the_stale_copy_when_the_upstream_fails() {
    let server = RedisServer::start();
    let origin = new_origin(Duration::ZERO);
    let ttl = Duration::from_millis(200);
    let layers = nodes(&server, 2, |n| {
        n.ttl(ttl).stale_if_error(Duration::from_secs(60))
    });
    let services: Vec<_> = layers.iter().map(|l| l.layer(origin.service())).collect();

    store_then_expire(&services[0], "/sie", ttl).await;
    origin.fail(true);
    for svc in &services {
        // Node 0 has the copy in memory, node 1 only in Redis.
        let res = svc.clone().oneshot(get("/sie")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert!(
            cache_status(&res).contains("stale-if-error"),
            "{}",
            cache_status(&res)
        );
        assert_eq!(text(res).await, "/sie #1");
    }
    // No grace window: once the upstream is back, the next request waits for it.
    origin.fail(false);
    let res = services[1].clone().oneshot(get("/sie")).await.unwrap();
    assert!(
        cache_status(&res).contains("stored"),
        "{}",
        cache_status(&res)
    );
    assert_eq!(text(res).await, format!("/sie #{}", origin.calls()));

    // Without stale-if-error the failure reaches the client.
    let plain = node(&server)
        .prefix("plain")
        .ttl(ttl)
        .build()
        .layer(origin.service());
    plain.clone().oneshot(get("/sie")).await.unwrap();
    tokio::time::sleep(ttl).await;
    origin.fail(true);
    let res = plain.oneshot(get("/sie")).await.unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_refresh_keeps_a_steadily_hot_key_from_ever_missing() {
    let server = RedisServer::start();
    let origin = new_origin(Duration::from_millis(50));
    let ttl = Duration::from_millis(600);
    let layers = nodes(&server, 3, |n| n.ttl(ttl).early_refresh(4.0));
    let services: Vec<_> = layers.iter().map(|l| l.layer(origin.service())).collect();

    let first = services[0].clone().oneshot(get("/hot")).await.unwrap();
    assert!(cache_status(&first).contains("stored"));
    // A steady stream across several expiries: nobody waits on the upstream.
    for i in 0..200 {
        let res = services[i % 3].clone().oneshot(get("/hot")).await.unwrap();
        let cs = cache_status(&res);
        assert!(
            cs.contains("; hit"),
            "request {i} was not answered from cache: {cs}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refreshes = total(&layers, |s| s.refreshes);
    assert!(
        refreshes >= 2,
        "the key was refreshed early ({refreshes} refreshes)"
    );
    assert_eq!(origin.calls() as u64, 1 + refreshes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_entries_are_stored_briefly_and_expire_on_time() {
    let server = RedisServer::start();
    let origin = new_origin(Duration::ZERO);
    let negative_ttl = Duration::from_millis(300);
    let layer = node(&server).negative_ttl(negative_ttl).build();
    let svc = layer.layer(origin.service());

    let res = svc.clone().oneshot(get("/missing/1")).await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    assert!(cache_status(&res).contains("stored"));
    let res = svc.clone().oneshot(get("/missing/1")).await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    assert!(cache_status(&res).contains("hit"));
    assert_eq!(origin.calls(), 1);

    let mut conn = server.conn().await;
    let keys = server.wait_for_keys("stampede:*:v", 1).await;
    let pttl: i64 = conn.pttl(&keys[0]).await.unwrap();
    assert!(pttl > 0 && pttl <= 300, "negative entry lives {pttl} ms");

    tokio::time::sleep(negative_ttl).await;
    let res = svc.clone().oneshot(get("/missing/1")).await.unwrap();
    assert!(
        cache_status(&res).contains("stored"),
        "expired: {}",
        cache_status(&res)
    );
    assert_eq!(origin.calls(), 2);

    // Off by default: a 404 is not stored.
    let default = node(&server)
        .prefix("default")
        .build()
        .layer(origin.service());
    let res = default.oneshot(get("/missing/2")).await.unwrap();
    assert!(
        cache_status(&res).contains("uncacheable"),
        "{}",
        cache_status(&res)
    );
}
