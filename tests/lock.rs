//! The standalone lock against a real redis-server.

mod support;

use std::time::Duration;

use redis::AsyncCommands;
use support::RedisServer;
use tower_stampede::lock::{LockError, RedisLock};

fn lock(server: &RedisServer, lease: Duration, retries: u32) -> RedisLock {
    RedisLock::builder(server.client())
        .prefix("t")
        .lease(lease)
        .retries(retries)
        .retry_delay(Duration::from_millis(10))
        .jitter(Duration::from_millis(5))
        .build()
}

#[tokio::test]
async fn second_acquire_gives_up_after_its_retries() {
    let server = RedisServer::start();
    let first = lock(&server, Duration::from_secs(30), 0);
    let second = lock(&server, Duration::from_secs(30), 3);
    let guard = first.acquire("job").await.unwrap();
    assert_eq!(guard.key(), "t:job");
    assert_eq!(guard.token().len(), 32);

    assert!(second.try_acquire("job").await.unwrap().is_none());
    match second.acquire("job").await {
        Err(LockError::NotAcquired { key, attempts }) => {
            assert_eq!(key, "t:job");
            assert_eq!(attempts, 4);
        }
        other => panic!("expected NotAcquired, got {other:?}"),
    }
    // Another key is independent.
    second
        .try_acquire("other")
        .await
        .unwrap()
        .expect("free key");
    guard.release().await.unwrap();
    second
        .try_acquire("job")
        .await
        .unwrap()
        .expect("released key");
}

#[tokio::test]
async fn lease_expiry_lets_the_next_holder_in_and_a_stale_release_leaves_its_lock() {
    let server = RedisServer::start();
    let short = lock(&server, Duration::from_millis(50), 0);
    let patient = lock(&server, Duration::from_secs(30), 500);
    let stale = short.acquire("k").await.unwrap();
    // Retries until the 50 ms lease has run out.
    let current = patient.acquire("k").await.unwrap();
    assert_ne!(stale.token(), current.token());

    let stale_token = stale.token().to_owned();
    assert!(matches!(
        stale.extend(Duration::from_secs(5)).await,
        Err(LockError::NotHeld { .. })
    ));
    assert!(matches!(
        stale.release().await,
        Err(LockError::NotHeld { .. })
    ));

    let mut conn = server.conn().await;
    let holder: Option<String> = conn.get("t:k").await.unwrap();
    assert_eq!(holder.as_deref(), Some(current.token()));
    assert_ne!(holder.as_deref(), Some(stale_token.as_str()));
    current.release().await.unwrap();
    let holder: Option<String> = conn.get("t:k").await.unwrap();
    assert_eq!(holder, None);
}

#[tokio::test]
async fn extend_sets_the_remaining_lease() {
    let server = RedisServer::start();
    let l = lock(&server, Duration::from_secs(2), 0);
    let guard = l.acquire("k").await.unwrap();
    let mut conn = server.conn().await;
    let before: i64 = conn.pttl("t:k").await.unwrap();
    assert!(before > 0 && before <= 2000, "pttl {before}");
    guard.extend(Duration::from_secs(60)).await.unwrap();
    let after: i64 = conn.pttl("t:k").await.unwrap();
    assert!(after > 2000 && after <= 60_000, "pttl {after}");
    guard.release().await.unwrap();
}

#[tokio::test]
async fn run_releases_on_success_error_and_panic() {
    let server = RedisServer::start();
    let l = lock(&server, Duration::from_secs(30), 0);
    let mut conn = server.conn().await;

    let mut observed = None;
    let v = l
        .run("k", || async {
            // The lock is held while the closure runs.
            observed = Some(
                server
                    .client()
                    .get_multiplexed_async_connection()
                    .await
                    .unwrap()
                    .exists::<_, bool>("t:k")
                    .await
                    .unwrap(),
            );
            7
        })
        .await
        .unwrap();
    assert_eq!(v, 7);
    assert_eq!(observed, Some(true));
    assert!(!conn.exists::<_, bool>("t:k").await.unwrap());

    let r: Result<Result<(), &str>, _> = l.run("k", || async { Err("boom") }).await;
    assert_eq!(r.unwrap(), Err("boom"));
    assert!(!conn.exists::<_, bool>("t:k").await.unwrap());

    let l2 = l.clone();
    let joined =
        tokio::spawn(async move { l2.run("k", || async { panic!("inside the lock") }).await })
            .await;
    assert!(joined.unwrap_err().is_panic());
    assert!(!conn.exists::<_, bool>("t:k").await.unwrap());

    // Held elsewhere: run gives up without running the closure.
    let holder = l.acquire("k").await.unwrap();
    let mut ran = false;
    let r = l.run("k", || async { ran = true }).await;
    assert!(matches!(r, Err(LockError::NotAcquired { .. })));
    assert!(!ran);
    holder.release().await.unwrap();
}

#[tokio::test]
async fn run_extends_the_lease_while_the_closure_runs() {
    let server = RedisServer::start();
    let l = lock(&server, Duration::from_millis(150), 0);
    let other = lock(&server, Duration::from_secs(30), 0);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let l2 = l.clone();
    let job = tokio::spawn(async move { l2.run("k", || async { rx.await.ok() }).await });
    let mut conn = server.conn().await;
    // Wait for the job to hold the lock, then watch it outlive several leases.
    while !conn.exists::<_, bool>("t:k").await.unwrap() {
        tokio::task::yield_now().await;
    }
    let start = tokio::time::Instant::now();
    while start.elapsed() < Duration::from_millis(600) {
        assert!(
            other.try_acquire("k").await.unwrap().is_none(),
            "lease lapsed while run() was working"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tx.send(()).unwrap();
    job.await.unwrap().unwrap();
    assert!(!conn.exists::<_, bool>("t:k").await.unwrap());
}

#[tokio::test]
async fn dropping_a_guard_releases_it_in_the_background() {
    let server = RedisServer::start();
    let l = lock(&server, Duration::from_secs(60), 0);
    let patient = lock(&server, Duration::from_secs(60), 1000);
    drop(l.acquire("k").await.unwrap());
    // Far sooner than the 60 s lease: the drop released it.
    patient.acquire("k").await.unwrap().release().await.unwrap();
}

#[tokio::test]
async fn redis_down_is_a_backend_error_not_a_hang() {
    let mut server = RedisServer::start();
    let l = RedisLock::builder(server.client())
        .timeout(Duration::from_millis(200))
        .build();
    l.acquire("k").await.unwrap().release().await.unwrap();
    server.kill();
    assert!(matches!(
        l.try_acquire("k").await,
        Err(LockError::Backend(_))
    ));
}
