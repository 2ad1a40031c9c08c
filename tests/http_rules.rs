//! The HTTP rules seen from a client: the `Cache-Status` of every outcome, which requests
//! may share an answer, which answers are stored, hit-for-pass (in memory and across
//! nodes through Redis), `Vary`, the body limit, the TTL written to Redis, HEAD, and the
//! layer inside an axum router.

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderName;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use redis::AsyncCommands;
use support::*;
use tokio::sync::Semaphore;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_stampede::{Backend, PrivateRequests, StampedeBuilder, StampedeLayer};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// The full `Cache-Status` value this layer sets for `params` (default cache name).
fn cs(params: &str) -> String {
    format!("tower-stampede; {params}")
}

const STORED: &str = "fwd=miss; stored";
const HIT_MEMORY: &str = "hit; detail=memory";
const HIT_REDIS: &str = "hit; detail=redis";
const COLLAPSED: &str = "fwd=miss; collapsed";
const UNCACHEABLE: &str = "fwd=miss; detail=uncacheable";
const HIT_FOR_PASS: &str = "fwd=bypass; detail=hit-for-pass";
const METHOD: &str = "fwd=method";
const PRIVATE: &str = "fwd=bypass; detail=private";

/// A builder for a node on `server`.
fn redis_node(server: &RedisServer) -> StampedeBuilder {
    StampedeLayer::builder().backend(Backend::redis(server.url()).unwrap())
}

/// A request with any method and extra headers, on `http://test`.
fn request(method: Method, path: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut builder = Request::builder()
        .method(method)
        .uri(format!("http://test{path}"));
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Full::default()).unwrap()
}

/// Calls a (clone of a) service with `ready().await?.call(req)`.
async fn call<S, B>(svc: &S, req: Request<Full<Bytes>>) -> Response<B>
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
{
    let mut svc = svc.clone();
    svc.ready()
        .await
        .expect("service ready")
        .call(req)
        .await
        .expect("infallible stack")
}

/// Sends `req`; returns the `Cache-Status` and the body as text.
async fn exchange<S, B>(svc: &S, req: Request<Full<Bytes>>) -> (String, String)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let res = call(svc, req).await;
    let status = cache_status(&res);
    (status, text(res).await)
}

/// Sends a GET for `path`; returns the `Cache-Status` and the body as text.
async fn fetch<S, B>(svc: &S, path: &str) -> (String, String)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    exchange(svc, get(path)).await
}

/// Collects a body's bytes.
async fn bytes_of<B>(res: Response<B>) -> Bytes
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    res.into_body().collect().await.expect("body").to_bytes()
}

/// Waits (polling an observable condition, never a fixed sleep) until `cond` holds.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let waited = tokio::time::timeout(Duration::from_secs(30), async {
        while !cond() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(waited.is_ok(), "timed out waiting until {what}");
}

/// An inner service answering `"<path> #<n>"` with `headers`, counting its calls.
fn answering(headers: &[(&'static str, &'static str)]) -> Upstream {
    Upstream::default().with_headers(headers)
}

// ---------------------------------------------------------------------------------------
// 1. Cache-Status values
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_status_stored_then_memory_hit_then_redis_hit_on_another_node() {
    let server = RedisServer::start();
    let upstream = Upstream::new(Duration::ZERO);
    let node_a = redis_node(&server).build();
    let node_b = redis_node(&server).build();
    let a = ServiceBuilder::new()
        .layer(node_a.clone())
        .service(upstream.service());
    let b = node_b.layer(upstream.service());

    assert_eq!(fetch(&a, "/cs").await, (cs(STORED), "/cs #1".to_owned()));
    assert_eq!(upstream.calls(), 1);

    assert_eq!(
        fetch(&a, "/cs").await,
        (cs(HIT_MEMORY), "/cs #1".to_owned())
    );
    assert_eq!(upstream.calls(), 1);

    // Another node: empty L1, the answer comes from Redis (once A's write has landed)...
    server.wait_for_keys("stampede:*:v", 1).await;
    assert_eq!(fetch(&b, "/cs").await, (cs(HIT_REDIS), "/cs #1".to_owned()));
    // ... and is then in that node's memory too.
    assert_eq!(
        fetch(&b, "/cs").await,
        (cs(HIT_MEMORY), "/cs #1".to_owned())
    );
    assert_eq!(upstream.calls(), 1, "one upstream call for both nodes");

    let (sa, sb) = (node_a.stats(), node_b.stats());
    assert_eq!((sa.stored, sa.hits_memory, sa.upstream_calls), (1, 1, 1));
    assert_eq!(
        (sb.stored, sb.hits_redis, sb.hits_memory, sb.upstream_calls),
        (0, 1, 1, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_caches_cache_status_comes_first_on_the_miss_and_on_every_hit() {
    let upstream = answering(&[
        ("cache-control", "max-age=60"),
        ("cache-status", "OriginCache; hit"),
    ]);
    let svc = StampedeLayer::builder().build().layer(upstream.service());
    let joined = |params: &str| format!("OriginCache; hit, {}", cs(params));
    assert_eq!(
        fetch(&svc, "/joined").await,
        (joined(STORED), "/joined #1".to_owned())
    );
    for _ in 0..2 {
        assert_eq!(
            fetch(&svc, "/joined").await,
            (joined(HIT_MEMORY), "/joined #1".to_owned()),
            "ours once, after theirs, however often the stored answer is sent"
        );
    }
    assert_eq!(upstream.calls(), 1);
}

/// Fires 20 concurrent GETs for one cold key at one node whose upstream is held until all
/// 20 have missed; returns their (cache-status, body) and the upstream call count.
async fn twenty_concurrent_misses(layer: StampedeLayer) -> (Vec<(String, String)>, usize) {
    let calls = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let inner = {
        let (calls, gate) = (calls.clone(), gate.clone());
        tower::service_fn(move |req: Request<Full<Bytes>>| {
            let (calls, gate) = (calls.clone(), gate.clone());
            async move {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                gate.acquire().await.unwrap().forget();
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                    "{} #{n}",
                    req.uri().path()
                )))))
            }
        })
    };
    let svc = layer.layer(inner);
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move { fetch(&svc, "/crowd").await })
        })
        .collect();
    // Every request has looked in memory and missed (the only upstream call is held), so
    // all 20 are in the same flight before it may finish.
    wait_until("20 misses and 1 upstream call", || {
        layer.stats().misses == 20 && calls.load(Ordering::SeqCst) == 1
    })
    .await;
    gate.add_permits(100);
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    (out, calls.load(Ordering::SeqCst))
}

fn assert_one_stored_nineteen_collapsed(results: &[(String, String)], calls: usize) {
    assert_eq!(calls, 1, "one upstream call");
    let stored = results.iter().filter(|r| r.0 == cs(STORED)).count();
    let collapsed = results.iter().filter(|r| r.0 == cs(COLLAPSED)).count();
    assert_eq!((stored, collapsed), (1, 19), "{results:?}");
    assert!(
        results.iter().all(|r| r.1 == "/crowd #1"),
        "all share the answer: {results:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_status_twenty_concurrent_misses_one_stored_nineteen_collapsed_redis() {
    let server = RedisServer::start();
    let layer = redis_node(&server).build();
    let (results, calls) = twenty_concurrent_misses(layer.clone()).await;
    assert_one_stored_nineteen_collapsed(&results, calls);
    let s = layer.stats();
    assert_eq!((s.upstream_calls, s.stored, s.collapsed_local), (1, 1, 19));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_status_twenty_concurrent_misses_one_stored_nineteen_collapsed_local() {
    let layer = StampedeLayer::builder().build();
    let (results, calls) = twenty_concurrent_misses(layer.clone()).await;
    assert_one_stored_nineteen_collapsed(&results, calls);
}

/// An inner service that counts its clones and its calls.
#[derive(Default)]
struct Counted {
    clones: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
}

impl Clone for Counted {
    fn clone(&self) -> Self {
        self.clones.fetch_add(1, Ordering::SeqCst);
        Counted {
            clones: self.clones.clone(),
            calls: self.calls.clone(),
        }
    }
}

impl Service<Request<Full<Bytes>>> for Counted {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let body = format!("{} #{n}", req.uri().path());
        std::future::ready(Ok(Response::builder()
            .header("cache-control", "max-age=60")
            .body(Full::new(Bytes::from(body)))
            .unwrap()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_in_memory_is_answered_in_call_without_touching_the_inner_service() {
    use futures_util::FutureExt;
    let inner = Counted::default();
    let (clones, calls) = (inner.clones.clone(), inner.calls.clone());
    let mut svc = StampedeLayer::builder().build().layer(inner);
    let miss = svc
        .ready()
        .await
        .unwrap()
        .call(request(Method::GET, "/in-call", &[]));
    let miss = miss.await.unwrap();
    assert_eq!(cache_status(&miss), cs(STORED));
    let (clones_after_miss, calls_after_miss) =
        (clones.load(Ordering::SeqCst), calls.load(Ordering::SeqCst));
    assert_eq!(calls_after_miss, 1);
    for _ in 0..3 {
        let hit = svc
            .ready()
            .await
            .unwrap()
            .call(request(Method::GET, "/in-call", &[]));
        // Ready when `call` returns: nothing left to run, nothing to wait for.
        let hit = hit
            .now_or_never()
            .expect("a hit's future is ready")
            .unwrap();
        assert_eq!(cache_status(&hit), cs(HIT_MEMORY));
        assert_eq!(&bytes_of(hit).await[..], b"/in-call #1");
    }
    assert_eq!(
        clones.load(Ordering::SeqCst),
        clones_after_miss,
        "a hit cloned the inner service"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // The service stays ready for the next miss.
    let other = svc
        .ready()
        .await
        .unwrap()
        .call(request(Method::GET, "/other", &[]));
    assert_eq!(
        bytes_of(other.await.unwrap()).await,
        Bytes::from("/other #2")
    );
}

// ---------------------------------------------------------------------------------------
// 2. Methods
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_is_never_cached() {
    let upstream = Upstream::new(Duration::ZERO);
    let layer = StampedeLayer::builder().build();
    let svc = layer.layer(upstream.service());

    let first = exchange(&svc, request(Method::POST, "/form", &[])).await;
    assert_eq!(first, (cs(METHOD), "/form #1".to_owned()));
    let second = exchange(&svc, request(Method::POST, "/form", &[])).await;
    assert_eq!(second, (cs(METHOD), "/form #2".to_owned()));
    assert_eq!(upstream.calls(), 2);

    // A GET for the same path is a miss of its own, not the POST's answer.
    assert_eq!(
        fetch(&svc, "/form").await,
        (cs(STORED), "/form #3".to_owned())
    );
    // And a POST after it still goes upstream.
    let third = exchange(&svc, request(Method::POST, "/form", &[])).await;
    assert_eq!(third, (cs(METHOD), "/form #4".to_owned()));
    assert_eq!(upstream.calls(), 4);
    assert_eq!(layer.stats().bypassed, 3);
}

// ---------------------------------------------------------------------------------------
// 3. Private requests
// ---------------------------------------------------------------------------------------

const ALICE: &str = "Bearer alice-token";
const BOB: &str = "Bearer bob-token";

fn as_user(user: &str) -> Request<Full<Bytes>> {
    request(Method::GET, "/me", &[("authorization", user)])
}

/// Asserts that `user`'s request for `/me` through `svc` is answered `body`, with the
/// `Cache-Status` `params`.
async fn assert_user_gets<S, B>(svc: &S, user: &str, params: &str, body: &str)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    assert_eq!(
        exchange(svc, as_user(user)).await,
        (cs(params), body.to_owned()),
        "{user}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_bypasses_the_cache_by_default() {
    let upstream = Upstream::default().echoing(http::header::AUTHORIZATION);
    let layer = StampedeLayer::builder().build();
    let svc = layer.layer(upstream.service());

    assert_user_gets(&svc, ALICE, PRIVATE, &format!("{ALICE} #1")).await;
    assert_user_gets(&svc, BOB, PRIVATE, &format!("{BOB} #2")).await;
    assert_user_gets(&svc, ALICE, PRIVATE, &format!("{ALICE} #3")).await;
    assert_eq!(upstream.calls(), 3, "every private request goes upstream");

    // Nothing private was stored: an anonymous request is a miss of its own.
    assert_eq!(
        exchange(&svc, request(Method::GET, "/me", &[])).await,
        (cs(STORED), "- #4".to_owned())
    );
    // And the anonymous answer is not served to a user either.
    assert_user_gets(&svc, BOB, PRIVATE, &format!("{BOB} #5")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_bypasses_the_cache_by_default() {
    let upstream = Upstream::new(Duration::ZERO);
    let layer = StampedeLayer::builder().build();
    let svc = layer.layer(upstream.service());
    let with_cookie = || request(Method::GET, "/cart", &[("cookie", "session=abc")]);

    assert_eq!(
        exchange(&svc, with_cookie()).await,
        (cs(PRIVATE), "/cart #1".to_owned())
    );
    assert_eq!(
        exchange(&svc, with_cookie()).await,
        (cs(PRIVATE), "/cart #2".to_owned())
    );
    assert_eq!(upstream.calls(), 2);
    // The cookie-less request is cached normally.
    assert_eq!(
        fetch(&svc, "/cart").await,
        (cs(STORED), "/cart #3".to_owned())
    );
    assert_eq!(
        fetch(&svc, "/cart").await,
        (cs(HIT_MEMORY), "/cart #3".to_owned())
    );
    // A cookie request still bypasses, even with a stored anonymous answer.
    assert_eq!(
        exchange(&svc, with_cookie()).await,
        (cs(PRIVATE), "/cart #4".to_owned())
    );
    assert_eq!(upstream.calls(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_caches_each_user_separately_and_never_crosses_users() {
    let server = RedisServer::start();
    let upstream = Upstream::default().echoing(http::header::AUTHORIZATION);
    let node_a = redis_node(&server)
        .private_requests(PrivateRequests::PerUser)
        .build();
    let node_b = redis_node(&server)
        .private_requests(PrivateRequests::PerUser)
        .build();
    let a = node_a.layer(upstream.service());
    let b = node_b.layer(upstream.service());

    let alice_body = format!("{ALICE} #1");
    let bob_body = format!("{BOB} #2");

    assert_user_gets(&a, ALICE, STORED, &alice_body).await;
    assert_user_gets(&a, ALICE, HIT_MEMORY, &alice_body).await;
    // Bob asks the node that has Alice's answer in memory: he gets his own.
    assert_user_gets(&a, BOB, STORED, &bob_body).await;
    assert_user_gets(&a, BOB, HIT_MEMORY, &bob_body).await;
    assert_user_gets(&a, ALICE, HIT_MEMORY, &alice_body).await;
    assert_eq!(upstream.calls(), 2, "one upstream call per user");

    // Through Redis, on another node, each user still gets only their own answer.
    server.wait_for_keys("stampede:*:v", 2).await;
    assert_user_gets(&b, BOB, HIT_REDIS, &bob_body).await;
    assert_user_gets(&b, ALICE, HIT_REDIS, &alice_body).await;
    assert_eq!(upstream.calls(), 2);

    // Anonymous requests share neither user's answer.
    assert_eq!(
        exchange(&a, request(Method::GET, "/me", &[])).await,
        (cs(STORED), "- #3".to_owned())
    );
    // Nor does a third user.
    let carol = "Bearer carol-token";
    assert_user_gets(&b, carol, STORED, &format!("{carol} #4")).await;
    assert_eq!(upstream.calls(), 4);
}

// ---------------------------------------------------------------------------------------
// 4. Answers that are not stored, and hit-for-pass
// ---------------------------------------------------------------------------------------

/// The first request is a miss that is not stored, the next ones go straight upstream.
async fn assert_not_stored_then_hit_for_pass(layer: StampedeLayer, inner: Upstream, what: &str) {
    let svc = layer.layer(inner.service());
    let (status, body) = fetch(&svc, "/u").await;
    assert_eq!(status, cs(UNCACHEABLE), "{what}: first request");
    assert_eq!(body, "/u #1", "{what}");
    assert_eq!(inner.calls(), 1, "{what}");

    let (status, body) = fetch(&svc, "/u").await;
    assert_eq!(status, cs(HIT_FOR_PASS), "{what}: second request");
    assert_eq!(
        body, "/u #2",
        "{what}: the second request went upstream again"
    );
    let (status, body) = fetch(&svc, "/u").await;
    assert_eq!(status, cs(HIT_FOR_PASS), "{what}: third request");
    assert_eq!(body, "/u #3", "{what}");
    assert_eq!(inner.calls(), 3, "{what}");

    let s = layer.stats();
    assert_eq!(
        (s.stored, s.uncacheable, s.hit_for_pass),
        (0, 1, 2),
        "{what}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncacheable_answers_are_not_stored_and_mark_hit_for_pass() {
    let cases: [(&str, Upstream); 5] = [
        (
            "cache-control: private",
            answering(&[("cache-control", "private")]),
        ),
        (
            "cache-control: no-store",
            answering(&[("cache-control", "no-store")]),
        ),
        (
            "cache-control: public, no-store",
            answering(&[("cache-control", "public, no-store")]),
        ),
        ("set-cookie", answering(&[("set-cookie", "session=abc")])),
        ("vary: *", answering(&[("vary", "*")])),
    ];
    for (what, inner) in cases {
        let layer = StampedeLayer::builder().build();
        assert_not_stored_then_hit_for_pass(layer, inner, what).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncacheable_status_500_is_passed_through_as_is() {
    let inner = answering(&[("x-upstream", "yes")]).with_status(StatusCode::INTERNAL_SERVER_ERROR);
    let svc = StampedeLayer::builder()
        .error_ttl(Duration::ZERO)
        .build()
        .layer(inner.service());
    for n in 1..=2 {
        let res = call(&svc, get("/err")).await;
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        // Not stored, and no hit-for-pass: requests for a failing URL stay coalesced.
        assert_eq!(cache_status(&res), cs(UNCACHEABLE));
        assert_eq!(res.headers().get("x-upstream").unwrap(), "yes");
        assert_eq!(text(res).await, format!("/err #{n}"));
    }
    assert_eq!(inner.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_error_is_shared_with_every_waiter_and_kept_briefly() {
    let server = RedisServer::start();
    let inner = answering(&[("x-upstream", "yes")]).with_status(StatusCode::BAD_GATEWAY);
    let gate = Arc::new(Semaphore::new(0));
    let gated = {
        let (svc, gate) = (inner.service(), gate.clone());
        tower::service_fn(move |req: Request<Full<Bytes>>| {
            let (svc, gate) = (svc.clone(), gate.clone());
            async move {
                let _p = gate.acquire().await.unwrap();
                svc.oneshot(req).await
            }
        })
    };
    let layers: Vec<_> = (0..3)
        .map(|_| {
            StampedeLayer::builder()
                .backend(Backend::redis(server.url()).unwrap())
                .redis_timeout(Duration::from_secs(1))
                .error_ttl(Duration::from_secs(30))
                .build()
        })
        .collect();
    let tasks: Vec<_> = (0..30)
        .map(|i| tokio::spawn(layers[i % 3].layer(gated.clone()).oneshot(get("/down"))))
        .collect();
    while layers.iter().map(|l| l.stats().misses).sum::<u64>() < 30 {
        tokio::task::yield_now().await;
    }
    gate.add_permits(1000);
    for t in tasks {
        let res = t.await.unwrap().unwrap();
        assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(res.headers().get("x-upstream").unwrap(), "yes");
        assert_eq!(text(res).await, "/down #1");
    }
    assert_eq!(inner.calls(), 1, "a failing upstream is not stampeded");
}

/// The first request stores, the second is a memory hit with the same answer.
async fn assert_stored(layer: StampedeLayer, inner: Upstream, what: &str) -> Response<Bytes> {
    let svc = layer.layer(inner.service());
    let (status, body) = fetch(&svc, "/s").await;
    assert_eq!(status, cs(STORED), "{what}: first request");
    assert_eq!(body, "/s #1", "{what}");
    let res = call(&svc, get("/s")).await;
    assert_eq!(cache_status(&res), cs(HIT_MEMORY), "{what}: second request");
    let (head, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    assert_eq!(body, "/s #1", "{what}");
    assert_eq!(inner.calls(), 1, "{what}");
    Response::from_parts(head, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opt_ins_store_no_store_private_and_set_cookie_answers() {
    for (what, cc) in [
        ("no-store", "no-store"),
        ("private", "private"),
        ("no-cache", "no-cache"),
    ] {
        let layer = StampedeLayer::builder().honor_no_store(false).build();
        assert_stored(layer, answering(&[("cache-control", cc)]), what).await;
    }

    let layer = StampedeLayer::builder().store_set_cookie(true).build();
    let hit = assert_stored(
        layer,
        answering(&[("set-cookie", "session=abc")]),
        "set-cookie",
    )
    .await;
    assert_eq!(
        hit.headers().get("set-cookie").unwrap(),
        "session=abc",
        "the stored cookie is replayed"
    );

    // Each opt-in only lifts its own rule.
    let layer = StampedeLayer::builder().honor_no_store(false).build();
    assert_not_stored_then_hit_for_pass(
        layer,
        answering(&[("set-cookie", "session=abc")]),
        "set-cookie with honor_no_store(false)",
    )
    .await;
    let layer = StampedeLayer::builder().store_set_cookie(true).build();
    assert_not_stored_then_hit_for_pass(
        layer,
        answering(&[("cache-control", "no-store")]),
        "no-store with store_set_cookie(true)",
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// 5. Hit-for-pass across nodes
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hit_for_pass_marker_is_shared_through_redis() {
    let server = RedisServer::start();
    let inner = answering(&[("cache-control", "no-store")]);
    let node_a = redis_node(&server)
        .hit_for_pass(Duration::from_secs(40))
        .build();
    let node_b = redis_node(&server)
        .hit_for_pass(Duration::from_secs(40))
        .build();
    let a = node_a.layer(inner.service());
    let b = node_b.layer(inner.service());

    assert_eq!(
        fetch(&a, "/nostore").await,
        (cs(UNCACHEABLE), "/nostore #1".to_owned())
    );

    // The marker is in Redis, with the hit-for-pass TTL, and it is not a stored answer.
    let mut conn = server.conn().await;
    let keys = server.wait_for_keys("stampede:*:v", 1).await;
    let pttl: i64 = conn.pttl(&keys[0]).await.unwrap();
    assert!(
        pttl > 10_000 && pttl <= 40_000,
        "marker PTTL {pttl} ms, hit_for_pass is 40 s"
    );
    let marker: Vec<u8> = conn.get(&keys[0]).await.unwrap();
    assert!(
        !marker.ends_with(b"/nostore #1"),
        "the uncacheable body is not in Redis"
    );

    // Node B has never seen the key: it finds the marker and goes straight upstream.
    assert_eq!(
        fetch(&b, "/nostore").await,
        (cs(HIT_FOR_PASS), "/nostore #2".to_owned())
    );
    assert_eq!(
        fetch(&b, "/nostore").await,
        (cs(HIT_FOR_PASS), "/nostore #3".to_owned())
    );
    assert_eq!(
        fetch(&a, "/nostore").await,
        (cs(HIT_FOR_PASS), "/nostore #4".to_owned())
    );
    assert_eq!(inner.calls(), 4);
    assert_eq!(node_b.stats().stored + node_b.stats().uncacheable, 0);
    let locks: Vec<String> = conn.keys("stampede:*:lock").await.unwrap();
    assert!(locks.is_empty(), "no lock left behind: {locks:?}");
}

// ---------------------------------------------------------------------------------------
// 6. Vary
// ---------------------------------------------------------------------------------------

fn lang(path: &str, language: &str) -> Request<Full<Bytes>> {
    request(Method::GET, path, &[("accept-language", language)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_on_configured_header_caches_one_answer_per_value() {
    let upstream = answering(&[("vary", "Accept-Language")])
        .echoing(HeaderName::from_static("accept-language"));
    let layer = StampedeLayer::builder()
        .vary([HeaderName::from_static("accept-language")])
        .build();
    let svc = layer.layer(upstream.service());

    assert_eq!(
        exchange(&svc, lang("/v", "en")).await,
        (cs(STORED), "en #1".to_owned())
    );
    assert_eq!(
        exchange(&svc, lang("/v", "fr")).await,
        (cs(STORED), "fr #2".to_owned())
    );
    assert_eq!(upstream.calls(), 2);
    for _ in 0..2 {
        assert_eq!(
            exchange(&svc, lang("/v", "en")).await,
            (cs(HIT_MEMORY), "en #1".to_owned())
        );
        assert_eq!(
            exchange(&svc, lang("/v", "fr")).await,
            (cs(HIT_MEMORY), "fr #2".to_owned())
        );
    }
    // No header at all is a value of its own.
    assert_eq!(
        exchange(&svc, request(Method::GET, "/v", &[])).await,
        (cs(STORED), "- #3".to_owned())
    );
    assert_eq!(upstream.calls(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_on_unconfigured_header_is_not_stored() {
    // The layer varies on accept-language; the answer varies on x-device.
    let inner = answering(&[("vary", "x-device")]);
    let layer = StampedeLayer::builder()
        .vary([HeaderName::from_static("accept-language")])
        .build();
    assert_not_stored_then_hit_for_pass(layer, inner, "vary: x-device").await;

    // A list naming a configured and an unconfigured header is not stored either.
    let inner = answering(&[("vary", "accept-language, x-device")]);
    let layer = StampedeLayer::builder()
        .vary([HeaderName::from_static("accept-language")])
        .build();
    assert_not_stored_then_hit_for_pass(layer, inner, "vary: accept-language, x-device").await;

    // Without any configured header, even accept-language is not stored.
    let inner = answering(&[("vary", "accept-language")]);
    assert_not_stored_then_hit_for_pass(
        StampedeLayer::builder().build(),
        inner,
        "vary: accept-language, nothing configured",
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// 7. max_body
// ---------------------------------------------------------------------------------------

/// `len` bytes of a non-repeating-looking pattern, so reordering or loss shows.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

type Chunked =
    StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// An inner service answering `/bytes/<len>` with `pattern(len)` in several frames of
/// uneven sizes (no size hint), counting its calls.
fn chunked_upstream(
    calls: Arc<AtomicUsize>,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Chunked>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(move |req: Request<Full<Bytes>>| {
        calls.fetch_add(1, Ordering::SeqCst);
        let len: usize = req
            .uri()
            .path()
            .strip_prefix("/bytes/")
            .unwrap()
            .parse()
            .unwrap();
        let data = Bytes::from(pattern(len));
        let sizes = [100, 900, 1, 2000, 333, 4096];
        let mut frames = Vec::new();
        let mut at = 0;
        let mut i = 0;
        while at < len {
            let end = (at + sizes[i % sizes.len()]).min(len);
            frames.push(Ok::<_, Infallible>(Frame::data(data.slice(at..end))));
            at = end;
            i += 1;
        }
        let body = StreamBody::new(futures_util::stream::iter(frames));
        std::future::ready(Ok::<_, Infallible>(Response::new(body)))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_body_streams_large_bodies_intact_and_does_not_store_them() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = StampedeLayer::builder().max_body(1024).build();
    let svc = layer.layer(chunked_upstream(calls.clone()));
    let expected = pattern(10_000);

    let res = call(&svc, get("/bytes/10000")).await;
    assert_eq!(cache_status(&res), cs(UNCACHEABLE));
    let body = bytes_of(res).await;
    assert_eq!(body.len(), 10_000);
    assert!(body == expected, "the body arrives whole and in order");
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let res = call(&svc, get("/bytes/10000")).await;
    assert_eq!(cache_status(&res), cs(HIT_FOR_PASS));
    assert!(bytes_of(res).await == expected);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the next request went upstream"
    );
    assert_eq!(layer.stats().stored, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_body_stores_bodies_up_to_the_limit() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = StampedeLayer::builder().max_body(1024).build();
    let svc = layer.layer(chunked_upstream(calls.clone()));

    // Under the limit, in several frames, and exactly at the limit: stored.
    for len in [1000usize, 1024] {
        let path = format!("/bytes/{len}");
        let before = calls.load(Ordering::SeqCst);
        let res = call(&svc, get(&path)).await;
        assert_eq!(cache_status(&res), cs(STORED), "{len} bytes");
        assert!(bytes_of(res).await == pattern(len), "{len} bytes");
        let res = call(&svc, get(&path)).await;
        assert_eq!(cache_status(&res), cs(HIT_MEMORY), "{len} bytes");
        assert!(
            bytes_of(res).await == pattern(len),
            "{len} bytes: the stored body is the whole body, in order"
        );
        assert_eq!(calls.load(Ordering::SeqCst), before + 1, "{len} bytes");
    }

    // One byte over: streamed, not stored.
    let res = call(&svc, get("/bytes/1025")).await;
    assert_eq!(cache_status(&res), cs(UNCACHEABLE));
    assert!(bytes_of(res).await == pattern(1025));
    let res = call(&svc, get("/bytes/1025")).await;
    assert_eq!(cache_status(&res), cs(HIT_FOR_PASS));
    assert!(bytes_of(res).await == pattern(1025));
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_body_with_an_exact_size_hint_over_the_limit_is_not_stored() {
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = {
        let calls = calls.clone();
        tower::service_fn(move |_req: Request<Full<Bytes>>| {
            calls.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(
                pattern(10_000),
            )))))
        })
    };
    let layer = StampedeLayer::builder().max_body(1024).build();
    let svc = layer.layer(inner);
    for expected_status in [UNCACHEABLE, HIT_FOR_PASS] {
        let res = call(&svc, get("/full")).await;
        assert_eq!(cache_status(&res), cs(expected_status));
        assert!(bytes_of(res).await == pattern(10_000));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

// ---------------------------------------------------------------------------------------
// 8. TTL written to Redis
// ---------------------------------------------------------------------------------------

/// Stores one answer for `/ttl` through a fresh node built from `builder` with an inner
/// answering `headers`, and returns the PTTL of the value key in Redis. Empties Redis.
async fn stored_pttl(
    server: &RedisServer,
    builder: StampedeBuilder,
    headers: &[(&'static str, &'static str)],
) -> i64 {
    let mut conn = server.conn().await;
    let () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    let inner = answering(headers);
    let svc = builder.build().layer(inner.service());
    assert_eq!(fetch(&svc, "/ttl").await.0, cs(STORED), "{headers:?}");
    assert_eq!(inner.calls(), 1);
    let keys = server.wait_for_keys("stampede:*:v", 1).await;
    let pttl: i64 = conn.pttl(&keys[0]).await.unwrap();
    let () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    pttl
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_in_redis_follows_the_fixed_ttl_or_cache_control() {
    let server = RedisServer::start();
    let ttl = Duration::from_secs(30);
    let node = || redis_node(&server).ttl(ttl);

    // The fixed TTL; Cache-Control is ignored unless asked for.
    let pttl = stored_pttl(&server, node(), &[]).await;
    assert!(pttl > 0 && pttl <= 30_000, "fixed ttl: PTTL {pttl}");
    let pttl = stored_pttl(&server, node(), &[("cache-control", "max-age=7")]).await;
    assert!(
        pttl > 7_000 && pttl <= 30_000,
        "max-age ignored by default: PTTL {pttl}"
    );

    // The default TTL is 60 s.
    let pttl = stored_pttl(&server, redis_node(&server), &[]).await;
    assert!(pttl > 30_000 && pttl <= 60_000, "default ttl: PTTL {pttl}");

    // honor_cache_control: max-age, and s-maxage over max-age whichever is larger.
    let honor = || node().honor_cache_control(true);
    let pttl = stored_pttl(&server, honor(), &[("cache-control", "max-age=7")]).await;
    assert!(pttl > 0 && pttl <= 7_000, "max-age=7: PTTL {pttl}");
    let pttl = stored_pttl(
        &server,
        honor(),
        &[("cache-control", "max-age=7, s-maxage=3")],
    )
    .await;
    assert!(pttl > 0 && pttl <= 3_000, "s-maxage=3 wins: PTTL {pttl}");
    let pttl = stored_pttl(
        &server,
        honor(),
        &[("cache-control", "s-maxage=20, max-age=7")],
    )
    .await;
    assert!(
        pttl > 7_000 && pttl <= 20_000,
        "s-maxage=20 wins: PTTL {pttl}"
    );
    // Without either directive, the fixed TTL.
    let pttl = stored_pttl(&server, honor(), &[("cache-control", "public")]).await;
    assert!(
        pttl > 7_000 && pttl <= 30_000,
        "no max-age: fixed ttl: PTTL {pttl}"
    );
}

// ---------------------------------------------------------------------------------------
// 9. axum
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_route_layer_caches_only_the_protected_route() {
    use axum::routing::get as axum_get;

    let slow_calls = Arc::new(AtomicUsize::new(0));
    let fresh_calls = Arc::new(AtomicUsize::new(0));
    let layer = StampedeLayer::builder().build();
    let app = axum::Router::new()
        .route(
            "/slow",
            axum_get({
                let calls = slow_calls.clone();
                move || async move { format!("slow #{}", calls.fetch_add(1, Ordering::SeqCst) + 1) }
            })
            .layer(layer.clone()),
        )
        .route(
            "/fresh",
            axum_get({
                let calls = fresh_calls.clone();
                move || async move {
                    format!("fresh #{}", calls.fetch_add(1, Ordering::SeqCst) + 1)
                }
            }),
        );

    let send = |path: &'static str| {
        let app = app.clone();
        async move {
            let req = Request::get(path)
                .header("host", "app.test")
                .body(axum::body::Body::empty())
                .unwrap();
            let res = app.oneshot(req).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK, "{path}");
            let status = cache_status(&res);
            (status, text(res).await)
        }
    };

    assert_eq!(send("/slow").await, (cs(STORED), "slow #1".to_owned()));
    assert_eq!(send("/slow").await, (cs(HIT_MEMORY), "slow #1".to_owned()));
    assert_eq!(send("/slow").await, (cs(HIT_MEMORY), "slow #1".to_owned()));
    assert_eq!(slow_calls.load(Ordering::SeqCst), 1);

    assert_eq!(send("/fresh").await, (String::new(), "fresh #1".to_owned()));
    assert_eq!(send("/fresh").await, (String::new(), "fresh #2".to_owned()));
    assert_eq!(fresh_calls.load(Ordering::SeqCst), 2);
    assert_eq!(layer.stats().upstream_calls, 1);
}

// ---------------------------------------------------------------------------------------
// 10. HEAD
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_and_get_share_one_entry_and_head_gets_no_body() {
    let upstream = Upstream::new(Duration::ZERO);
    let methods = Arc::new(Mutex::new(Vec::new()));
    let seen = methods.clone();
    let inner = tower::service_fn(move |req: Request<Full<Bytes>>| {
        seen.lock().unwrap().push(req.method().clone());
        upstream.service().oneshot(req)
    });
    let layer = StampedeLayer::builder().build();
    let svc = layer.layer(inner);
    let head = |path: &str| request(Method::HEAD, path, &[]);

    // A cold HEAD fills the entry with a GET, and answers the head only.
    let res = call(&svc, head("/h")).await;
    assert_eq!(cache_status(&res), cs(STORED));
    assert_eq!(res.headers().get("content-length").unwrap(), "5");
    assert!(bytes_of(res).await.is_empty(), "HEAD answers carry no body");
    assert_eq!(*methods.lock().unwrap(), vec![Method::GET]);

    // The GET is served from that entry, and so is the next HEAD.
    assert_eq!(
        fetch(&svc, "/h").await,
        (cs(HIT_MEMORY), "/h #1".to_owned())
    );
    let res = call(&svc, head("/h")).await;
    assert_eq!(cache_status(&res), cs(HIT_MEMORY));
    assert_eq!(res.headers().get("content-length").unwrap(), "5");
    assert!(bytes_of(res).await.is_empty(), "a HEAD hit carries no body");

    // GET first, then HEAD: one upstream call.
    assert_eq!(fetch(&svc, "/g").await, (cs(STORED), "/g #2".to_owned()));
    let res = call(&svc, head("/g")).await;
    assert_eq!(cache_status(&res), cs(HIT_MEMORY));
    assert!(bytes_of(res).await.is_empty());
    assert_eq!(methods.lock().unwrap().len(), 2);
}

/// Answers 304 to `If-None-Match: "v1"`, 206 to a `Range`, else a full body with that ETag.
fn etag_upstream(
    calls: Arc<AtomicUsize>,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |req: Request<Full<Bytes>>| {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        let res = if req
            .headers()
            .get("if-none-match")
            .is_some_and(|v| v == "\"v1\"")
        {
            Response::builder()
                .status(StatusCode::NOT_MODIFIED)
                .header("etag", "\"v1\"")
                .body(Full::default())
        } else if req.headers().contains_key("range") {
            Response::builder()
                .status(StatusCode::PARTIAL_CONTENT)
                .header("content-range", "bytes 0-1/10")
                .body(Full::new(Bytes::from("ab")))
        } else {
            Response::builder()
                .header("etag", "\"v1\"")
                .body(Full::new(Bytes::from(format!("full #{n}"))))
        };
        std::future::ready(Ok::<_, Infallible>(res.unwrap()))
    })
}

fn conditional(path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://test{path}"))
        .header("if-none-match", "\"v1\"")
        .body(Full::default())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_and_range_requests_never_poison_the_key_for_the_fleet() {
    let server = RedisServer::start();
    let calls = Arc::new(AtomicUsize::new(0));
    let node = || {
        StampedeLayer::builder()
            .backend(Backend::redis(server.url()).unwrap())
            .build()
            .layer(etag_upstream(calls.clone()))
    };
    let (a, b) = (node(), node());

    // A cold conditional request fills the key with the full answer and gets its 304.
    let res = a.clone().oneshot(conditional("/doc")).await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_MODIFIED);
    assert!(
        cache_status(&res).contains("stored"),
        "{}",
        cache_status(&res)
    );
    assert!(text(res).await.is_empty());
    server.wait_for_keys("stampede:*:v", 1).await;
    let res = b.clone().oneshot(get("/doc")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(cache_status(&res).contains("hit"), "{}", cache_status(&res));
    assert_eq!(text(res).await, "full #1");
    // A hit answers a matching validator with 304, a stale one with the body.
    let res = b.clone().oneshot(conditional("/doc")).await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_MODIFIED);
    let stale_validator = Request::get("http://test/doc")
        .header("if-none-match", "\"v0\"")
        .body(Full::default())
        .unwrap();
    let res = b.clone().oneshot(stale_validator).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // A range request goes upstream untouched and leaves no marker behind.
    let range = Request::get("http://test/r")
        .header("range", "bytes=0-1")
        .body(Full::default())
        .unwrap();
    let res = a.clone().oneshot(range).await.unwrap();
    assert_eq!(res.status(), StatusCode::PARTIAL_CONTENT);
    assert!(
        cache_status(&res).contains("fwd=bypass; detail=range"),
        "{}",
        cache_status(&res)
    );
    let res = b.clone().oneshot(get("/r")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        cache_status(&res).contains("stored"),
        "{}",
        cache_status(&res)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conditional_request_in_grace_refreshes_with_a_full_answer() {
    let calls = Arc::new(AtomicUsize::new(0));
    let ttl = Duration::from_millis(200);
    let layer = StampedeLayer::builder()
        .ttl(ttl)
        .grace(Duration::from_secs(60))
        .build();
    let svc = layer.layer(etag_upstream(calls.clone()));
    svc.clone().oneshot(get("/doc")).await.unwrap();
    tokio::time::sleep(ttl).await;
    let res = svc.clone().oneshot(conditional("/doc")).await.unwrap();
    assert!(
        cache_status(&res).contains("detail=stale"),
        "{}",
        cache_status(&res)
    );
    while layer.stats().stored < 2 {
        assert_eq!(layer.stats().upstream_failures, 0);
        tokio::task::yield_now().await;
    }
    let res = svc.clone().oneshot(get("/doc")).await.unwrap();
    assert!(
        cache_status(&res).contains("detail=memory"),
        "{}",
        cache_status(&res)
    );
    assert_eq!(text(res).await, "full #2");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_keys_keep_credentials_out_of_redis_and_may_vary_on_them() {
    let server = RedisServer::start();
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = {
        let calls = calls.clone();
        tower::service_fn(move |_r: Request<Full<Bytes>>| {
            calls.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok::<_, Infallible>(
                Response::builder()
                    .header("vary", "Authorization")
                    .body(Full::new(Bytes::from("me")))
                    .unwrap(),
            ))
        })
    };
    let svc = StampedeLayer::builder()
        .backend(Backend::redis(server.url()).unwrap())
        .private_requests(PrivateRequests::PerUser)
        .build()
        .layer(inner);
    let me = || {
        Request::get("http://test/me")
            .header("authorization", "Bearer SECRET-TOKEN-123")
            .body(Full::default())
            .unwrap()
    };
    let res = svc.clone().oneshot(me()).await.unwrap();
    assert!(
        cache_status(&res).contains("stored"),
        "{}",
        cache_status(&res)
    );
    let res = svc.clone().oneshot(me()).await.unwrap();
    assert!(cache_status(&res).contains("hit"), "{}", cache_status(&res));
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let mut conn = server.conn().await;
    let keys = server.wait_for_keys("stampede:*:v", 1).await;
    let stored: Vec<u8> = conn.get(&keys[0]).await.unwrap();
    assert!(
        !stored.windows(16).any(|w| w == b"SECRET-TOKEN-123"),
        "credentials written to redis"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_encoding_is_normalized_into_the_key_and_upstream() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = {
        let (seen, calls) = (seen.clone(), calls.clone());
        tower::service_fn(move |req: Request<Full<Bytes>>| {
            let coding = req
                .headers()
                .get("accept-encoding")
                .map(|v| v.to_str().unwrap().to_owned());
            seen.lock().unwrap().push(coding.clone());
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            let body = format!("{} #{n}", coding.as_deref().unwrap_or("identity"));
            std::future::ready(Ok::<_, Infallible>(
                Response::builder()
                    .header("vary", "Accept-Encoding")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap(),
            ))
        })
    };
    let svc = StampedeLayer::builder().build().layer(inner);
    let ask = |coding: Option<&str>| {
        let mut req = Request::get("http://test/page");
        if let Some(c) = coding {
            req = req.header("accept-encoding", c);
        }
        req.body(Full::default()).unwrap()
    };
    // Browsers' many spellings collapse onto one entry per coding the upstream may use.
    let mut bodies = Vec::new();
    for coding in [
        Some("gzip, deflate, br"),
        Some("br"),
        Some("gzip, deflate"),
        Some("gzip"),
        None,
        Some("identity"),
    ] {
        let res = svc.clone().oneshot(ask(coding)).await.unwrap();
        bodies.push(text(res).await);
    }
    assert_eq!(
        bodies,
        [
            "br #1",
            "br #1",
            "gzip #2",
            "gzip #2",
            "identity #3",
            "identity #3"
        ]
    );
    assert_eq!(
        *seen.lock().unwrap(),
        vec![Some("br".to_owned()), Some("gzip".to_owned()), None]
    );
}
