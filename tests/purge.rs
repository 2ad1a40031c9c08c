//! Purge by key and by tag across the fleet, every node's memory kept in step, a purge
//! during a fill, a node that missed the broadcast, and the soft timeout.

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use support::{cache_status, get, stampede, text, RedisServer, Upstream};
use tower::{Layer, ServiceExt};
use tower_stampede::{Backend, StampedeBuilder, StampedeLayer};

fn node(server: &RedisServer) -> StampedeBuilder {
    StampedeLayer::builder()
        .backend(Backend::redis(server.url()).unwrap())
        .redis_timeout(Duration::from_secs(1))
}

async fn fetch<S, B>(svc: &S, path: &str) -> (String, String)
where
    S: tower::Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let res = svc.clone().oneshot(get(path)).await.unwrap();
    let cs = cache_status(&res);
    (cs, text(res).await)
}

/// Polls `cond` until it holds (bounded: a condition that never holds fails the test).
async fn until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_on_one_node_reaches_every_nodes_memory_and_refills_once() {
    let server = RedisServer::start();
    let upstream = Upstream::new(Duration::from_millis(50));
    let layers: Vec<_> = (0..3).map(|_| node(&server).build()).collect();
    let svcs: Vec<_> = layers.iter().map(|l| l.layer(upstream.service())).collect();
    for svc in &svcs {
        fetch(svc, "/price").await;
        fetch(svc, "/other").await;
    }
    for svc in &svcs {
        let (cs, body) = fetch(svc, "/price").await;
        assert!(cs.contains("hit; detail=memory"), "{cs}");
        assert_eq!(body, "/price #1");
    }
    assert_eq!(upstream.calls(), 2);

    let purged_at = Instant::now();
    let n = layers[0]
        .purge(&"http://test/price".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(n, 1, "one stored answer purged");
    // Every node drops its copy: bounded by a pub/sub hop.
    for layer in &layers[1..] {
        until("the other nodes dropped their copy", || async {
            layer.memory().await.l1_entries == 1
        })
        .await;
    }
    eprintln!(
        "purge: every node's copy gone {:?} after the call",
        purged_at.elapsed()
    );
    let results = stampede(&svcs[1..], &["/price"], 25).await;
    assert_eq!(
        upstream.calls(),
        3,
        "exactly one refill for 50 requests on B and C"
    );
    assert!(results.iter().all(|r| r.3 == "/price #3"), "{results:?}");
    for svc in &svcs {
        let (cs, body) = fetch(svc, "/other").await;
        assert!(
            cs.contains("hit; detail=memory"),
            "not purged, still a hit: {cs}"
        );
        assert_eq!(body, "/other #2");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_purge_removes_every_tagged_entry_on_every_node() {
    let server = RedisServer::start();
    let tagged = Upstream::new(Duration::ZERO).with_headers(&[("surrogate-key", "t catalog")]);
    let plain = Upstream::new(Duration::ZERO);
    let layers: Vec<_> = (0..3).map(|_| node(&server).build()).collect();
    let svc_t: Vec<_> = layers.iter().map(|l| l.layer(tagged.service())).collect();
    let svc_p: Vec<_> = layers.iter().map(|l| l.layer(plain.service())).collect();
    // Three tagged entries, each filled on a different node, read on every node.
    for (i, path) in ["/a", "/b", "/c"].iter().enumerate() {
        let res = svc_t[i].clone().oneshot(get(path)).await.unwrap();
        assert!(
            res.headers().get("surrogate-key").is_none(),
            "tags are not sent downstream"
        );
    }
    fetch(&svc_p[0], "/untagged").await;
    for i in 0..3 {
        for path in ["/a", "/b", "/c"] {
            fetch(&svc_t[i], path).await;
        }
        fetch(&svc_p[i], "/untagged").await;
    }
    assert_eq!((tagged.calls(), plain.calls()), (3, 1));

    let n = layers[1].purge_tag("t").await.unwrap();
    assert_eq!(n, 3);
    for layer in &layers {
        until("every node dropped the tagged copies", || async {
            layer.memory().await.l1_entries == 1
        })
        .await;
    }
    for i in 0..3 {
        for path in ["/a", "/b", "/c"] {
            fetch(&svc_t[i], path).await;
        }
        let (cs, _) = fetch(&svc_p[i], "/untagged").await;
        assert!(cs.contains("hit"), "{cs}");
    }
    assert_eq!(tagged.calls(), 6, "each tagged entry refilled once");
    assert_eq!(plain.calls(), 1, "the untagged one stayed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_during_a_fill_keeps_the_older_answer_from_being_served_after_it() {
    let server = RedisServer::start();
    let version = Arc::new(AtomicUsize::new(1));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let started = Arc::new(tokio::sync::Notify::new());
    let inner = {
        let (version, gate, started) = (version.clone(), gate.clone(), started.clone());
        tower::service_fn(move |_req: Request<Full<Bytes>>| {
            let (version, gate, started) = (version.clone(), gate.clone(), started.clone());
            async move {
                // The answer is read when the call starts: an in-flight fill is "older".
                let v = version.load(Ordering::SeqCst);
                started.notify_one();
                if v == 1 {
                    let _permit = gate.acquire().await.unwrap();
                }
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("v{v}")))))
            }
        })
    };
    let (a, b) = (node(&server).build(), node(&server).build());
    let (svc_a, svc_b) = (a.layer(inner.clone()), b.layer(inner.clone()));
    let old = tokio::spawn({
        let svc = svc_a.clone();
        async move { fetch(&svc, "/item").await }
    });
    started.notified().await;
    // The price changes, then the purge returns, while the old fill is still running.
    version.store(2, Ordering::SeqCst);
    a.purge(&"http://test/item".parse().unwrap()).await.unwrap();
    gate.add_permits(10);
    let (_, first) = old.await.unwrap();
    assert_eq!(
        first, "v1",
        "the request made before the purge may get the old answer"
    );
    for svc in [&svc_a, &svc_b, &svc_a] {
        let (cs, body) = fetch(svc, "/item").await;
        assert_eq!(body, "v2", "after the purge: {cs}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_missed_the_purge_drops_its_copy_within_the_bound() {
    let server = RedisServer::start();
    // Node B's user may not subscribe: it never hears the purge broadcast.
    let deaf_url = server.deaf_url().await;
    let upstream = Upstream::new(Duration::ZERO);
    let a = node(&server).build();
    let b = StampedeLayer::builder()
        .backend(Backend::redis(deaf_url).unwrap())
        .redis_timeout(Duration::from_secs(1))
        .purge_check(Duration::from_millis(200))
        .build();
    let (svc_a, svc_b) = (a.layer(upstream.service()), b.layer(upstream.service()));
    fetch(&svc_a, "/x").await;
    server.wait_for_keys("stampede:*:v", 1).await;
    let (cs, _) = fetch(&svc_b, "/x").await;
    assert!(cs.contains("hit; detail=redis"), "{cs}");
    let (cs, _) = fetch(&svc_b, "/x").await;
    assert!(cs.contains("hit; detail=memory"), "{cs}");

    a.purge(&"http://test/x".parse().unwrap()).await.unwrap();
    let purged_at = Instant::now();
    until("node B stopped serving its purged copy", || async {
        b.memory().await.l1_entries == 0
    })
    .await;
    eprintln!(
        "a node that missed the purge dropped its copy {:?} after it (bound: the 200 ms purge check)",
        purged_at.elapsed()
    );
    assert_eq!(b.stats().wakeups, 0, "node B heard nothing");
    let (_, body) = fetch(&svc_b, "/x").await;
    assert_eq!(body, "/x #2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_soft_timeout_answers_waiters_stale_while_the_slow_fill_finishes() {
    let server = RedisServer::start();
    let upstream = Upstream::new(Duration::ZERO);
    let slow = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let inner = {
        let (svc, slow) = (upstream.service(), slow.clone());
        tower::service_fn(move |req: Request<Full<Bytes>>| {
            let (svc, slow) = (svc.clone(), slow.clone());
            async move {
                if slow.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                svc.oneshot(req).await
            }
        })
    };
    let layers: Vec<_> = (0..2)
        .map(|_| {
            node(&server)
                .ttl(Duration::from_millis(200))
                .stale_if_error(Duration::from_secs(60))
                .soft_timeout(Duration::from_millis(100))
                .build()
        })
        .collect();
    let svcs: Vec<_> = layers.iter().map(|l| l.layer(inner.clone())).collect();
    let (_, first) = fetch(&svcs[0], "/slow").await;
    assert_eq!(first, "/slow #1");
    fetch(&svcs[1], "/slow").await;
    // Stale now, usable on error for a minute; the next fill takes 2 s.
    let stored = Instant::now();
    until("the copy is stale", || async {
        stored.elapsed() > Duration::from_millis(250)
    })
    .await;
    slow.store(true, Ordering::SeqCst);
    let results = stampede(&svcs, &["/slow"], 50).await;
    assert!(
        results
            .iter()
            .all(|r| r.1 == StatusCode::OK && r.3 == "/slow #1"),
        "every waiter got the stale copy: {results:?}"
    );
    assert!(
        results
            .iter()
            .filter(|r| r.2.contains("stale-soft-timeout"))
            .count()
            >= 2,
        "answered by the soft timeout: {:?}",
        results.iter().map(|r| &r.2).collect::<Vec<_>>()
    );
    until("the slow fill landed", || async { upstream.calls() == 2 }).await;
    // It stores when it lands: the new value is served from then on.
    until("the new value is served", || async {
        fetch(&svcs[1], "/slow").await.1 == "/slow #2"
    })
    .await;
    assert_eq!(upstream.calls(), 2, "one upstream call for the 100 waiters");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_invalidates_the_stored_get_on_every_node() {
    let server = RedisServer::start();
    let upstream = Upstream::new(Duration::ZERO);
    let (a, b) = (node(&server).build(), node(&server).build());
    let (svc_a, svc_b) = (a.layer(upstream.service()), b.layer(upstream.service()));
    fetch(&svc_a, "/cart").await;
    server.wait_for_keys("stampede:*:v", 1).await;
    let (cs, _) = fetch(&svc_b, "/cart").await;
    assert!(cs.contains("hit"), "{cs}");
    let post = Request::post("http://test/cart")
        .body(Full::default())
        .unwrap();
    let res = svc_a.clone().oneshot(post).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    until("node B dropped the GET's copy", || async {
        b.memory().await.l1_entries == 0
    })
    .await;
    let (cs, body) = fetch(&svc_b, "/cart").await;
    assert!(cs.contains("stored"), "{cs}");
    assert_eq!(body, "/cart #3");
}
