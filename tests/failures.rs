//! A failed fill is an answer for everyone waiting on it, on every node, and nothing the
//! process keeps grows past its bound.

mod support;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use redis::AsyncCommands;
use support::{cache_status, get, RedisServer, Upstream};
use tower::{Layer, ServiceExt};
use tower_stampede::{Backend, StampedeBuilder, StampedeLayer};

fn node(server: &RedisServer) -> StampedeBuilder {
    StampedeLayer::builder()
        .backend(Backend::redis(server.url()).unwrap())
        .redis_timeout(Duration::from_secs(1))
}

/// A body that sends its first bytes and then nothing, ever: a slow-loris upstream.
struct Stalled {
    sent: bool,
}

impl Body for Stalled {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.sent {
            return Poll::Pending;
        }
        self.sent = true;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
            b"the first bytes",
        )))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upstream_is_answered_once_for_every_waiter_on_every_node() {
    let server = RedisServer::start();
    let timeout = Duration::from_millis(800);
    let layers: Vec<_> = (0..3)
        .map(|_| node(&server).upstream_timeout(timeout).build())
        .collect();
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = {
        let calls = calls.clone();
        tower::service_fn(move |_req: Request<Full<Bytes>>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Infallible>(Response::new(Stalled { sent: false })) }
        })
    };
    let services: Vec<_> = layers.iter().map(|l| l.layer(inner.clone())).collect();

    let started = Arc::new(tokio::sync::Barrier::new(20));
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let svc = services[i % 3].clone();
            let started = started.clone();
            tokio::spawn(async move {
                started.wait().await;
                let at = Instant::now();
                let res = svc.oneshot(get("/loris")).await.unwrap();
                (res.status(), cache_status(&res), at.elapsed())
            })
        })
        .collect();
    let mut longest = Duration::ZERO;
    for t in tasks {
        let (status, cs, waited) = t.await.unwrap();
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{cs}");
        assert!(cs.contains("upstream-failed"), "{cs}");
        longest = longest.max(waited);
    }
    let n = calls.load(Ordering::SeqCst);
    eprintln!(
        "20 clients, 3 nodes, stalled upstream: {n} upstream call(s), longest wait {longest:?}"
    );
    assert_eq!(n, 1, "one attempt, its outcome shared: no chain of retries");
    assert!(
        longest < timeout * 2,
        "a waiter waited {longest:?}, more than twice the upstream timeout"
    );

    // The lock is gone; the next request starts a fresh attempt.
    server.wait_for_keys("stampede:*:lock", 0).await;
    let res = services[1].clone().oneshot(get("/loris")).await.unwrap();
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_waiters_share_is_not_a_retry_and_the_next_request_tries_again() {
    let server = RedisServer::start();
    let upstream = Upstream::new(Duration::from_millis(300));
    upstream.fail(true);
    // error_ttl 0: the 500 is shared with those waiting, not stored.
    let layers: Vec<_> = (0..3)
        .map(|_| node(&server).error_ttl(Duration::ZERO).build())
        .collect();
    let services: Vec<_> = layers.iter().map(|l| l.layer(upstream.service())).collect();
    let results = support::stampede(&services, &["/down"], 30).await;
    assert!(results
        .iter()
        .all(|r| r.1 == StatusCode::INTERNAL_SERVER_ERROR || r.1 == StatusCode::BAD_GATEWAY));
    eprintln!(
        "30 requests on 3 nodes, upstream answering 500: {} upstream calls",
        upstream.calls()
    );
    assert!(
        upstream.calls() <= 3,
        "at most one call per node: {} calls",
        upstream.calls()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_written_to_redis_expires() {
    let server = RedisServer::start();
    let ok = Upstream::new(Duration::ZERO);
    let no_store = Upstream::new(Duration::ZERO).with_headers(&[("cache-control", "no-store")]);
    let layer = node(&server)
        .upstream_timeout(Duration::from_millis(300))
        .build();
    let stalled = tower::service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Stalled { sent: false }))
    });
    let _ = layer
        .layer(ok.service())
        .oneshot(get("/value"))
        .await
        .unwrap();
    let _ = layer
        .layer(no_store.service())
        .oneshot(get("/pass"))
        .await
        .unwrap();
    let _ = layer.layer(stalled).oneshot(get("/failed")).await.unwrap();
    server.wait_for_keys("stampede:*:v", 2).await;
    server.wait_for_keys("stampede:*:fail", 1).await;
    let mut conn = server.conn().await;
    let keys: Vec<String> = conn.keys("*").await.unwrap();
    assert!(keys.len() >= 3, "{keys:?}");
    for key in keys {
        let pttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(pttl > 0, "{key} has no expiry (PTTL {pttl})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hit_for_pass_markers_count_toward_the_memory_bound() {
    let capacity = 1 << 20;
    let no_store = Upstream::new(Duration::ZERO).with_headers(&[("cache-control", "no-store")]);
    let layer = StampedeLayer::builder()
        .l1_capacity(capacity)
        .hit_for_pass(Duration::from_secs(600))
        .build();
    let svc = layer.layer(no_store.service());
    // 20,000 uncacheable URLs: unbounded markers would take about 3 MiB.
    for i in 0..20_000 {
        let res = svc.clone().oneshot(get(&format!("/n/{i}"))).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    let memory = layer.memory().await;
    eprintln!("after 20,000 no-store URLs: {memory:?}");
    assert!(memory.marker_entries > 0, "{memory:?}");
    assert!(memory.bytes() <= capacity, "{memory:?}");
    assert!(memory.marker_bytes <= capacity / 16, "{memory:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_that_missed_the_wake_up_reads_the_failure_marker_instead_of_retrying() {
    let server = RedisServer::start();
    // Node B's user may not subscribe: it never hears a wake-up and has to poll.
    let deaf_url = server.deaf_url().await;
    let upstream = Upstream::new(Duration::from_millis(400));
    upstream.fail(true);
    let a = node(&server).error_ttl(Duration::ZERO).build();
    let b = StampedeLayer::builder()
        .backend(Backend::redis(deaf_url).unwrap())
        .redis_timeout(Duration::from_secs(1))
        .poll_interval(Duration::from_millis(100))
        .error_ttl(Duration::ZERO)
        .build();
    let leader = tokio::spawn(a.layer(upstream.service()).oneshot(get("/f")));
    // B waits once A holds the lock.
    server.wait_for_keys("stampede:*:lock", 1).await;
    let waiters: Vec<_> = (0..5)
        .map(|_| tokio::spawn(b.layer(upstream.service()).oneshot(get("/f"))))
        .collect();
    let res = leader.await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    for w in waiters {
        let res = w.await.unwrap().unwrap();
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(
            cache_status(&res).contains("upstream-failed"),
            "{}",
            cache_status(&res)
        );
    }
    assert_eq!(b.stats().wakeups, 0, "node B heard no wake-up");
    assert_eq!(
        upstream.calls(),
        1,
        "B's waiters took A's outcome, not a new attempt"
    );
    server.wait_for_keys("stampede:*:lock", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_wake_up_is_confirmed_polls_far_less_than_one_that_cannot_subscribe() {
    let server = RedisServer::start();
    let deaf_url = server.deaf_url().await;
    let upstream = Upstream::new(Duration::from_millis(1500));
    let every = Duration::from_millis(30);
    let a = node(&server).build();
    let hearing = node(&server).poll_interval(every).build();
    // This node's user may not subscribe: its waiter polls at the configured pace.
    let deaf = StampedeLayer::builder()
        .backend(Backend::redis(deaf_url).unwrap())
        .redis_timeout(Duration::from_secs(1))
        .poll_interval(every)
        .build();
    let leader = tokio::spawn(a.layer(upstream.service()).oneshot(get("/p")));
    server.wait_for_keys("stampede:*:lock", 1).await;
    let heard = tokio::spawn(hearing.layer(upstream.service()).oneshot(get("/p")));
    let polled = tokio::spawn(deaf.layer(upstream.service()).oneshot(get("/p")));
    for res in [leader, heard, polled] {
        let res = res.await.unwrap().unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let status = cache_status(&res);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "/p #1", "{status}");
    }
    assert_eq!(upstream.calls(), 1);
    let (hearing, deaf) = (hearing.stats(), deaf.stats());
    assert!(hearing.wakeups >= 1, "{hearing:?}");
    assert_eq!(deaf.wakeups, 0, "{deaf:?}");
    // Over the same 1.5 s wait: every 30 ms or so without a subscription, every 300 ms or
    // so with a confirmed one (the poll is only the safety net under pub/sub).
    assert!(
        hearing.lock_polls * 3 < deaf.lock_polls,
        "polls with a confirmed subscription: {}, without: {}",
        hearing.lock_polls,
        deaf.lock_polls
    );
}
