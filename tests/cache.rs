//! The generic `Cache<V>`: fleet-wide coalescing of any value, against real redis-server
//! processes, and the faults the layer survives.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use support::RedisServer;
use tower_stampede::{Backend, Cache, EntryOptions, Error};

fn node(server: &RedisServer) -> Cache<String> {
    Cache::builder()
        .backend(Backend::redis(server.url()).unwrap())
        .redis_timeout(Duration::from_secs(1))
        .ttl(Duration::from_secs(60))
        .build()
}

/// An init that counts its runs in Redis (so runs on every node add up), sleeps, and
/// returns the run's number.
async fn counted_init(url: String, delay: Duration) -> Result<String, std::io::Error> {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let n: u64 = conn.incr("inits", 1).await.unwrap();
    tokio::time::sleep(delay).await;
    Ok(format!("profile v{n}"))
}

async fn inits(server: &RedisServer) -> u64 {
    let mut conn = server.conn().await;
    let n: Option<u64> = conn.get("inits").await.unwrap();
    n.unwrap_or(0)
}

/// `per_node` concurrent `try_get_with(key)` on each cache, released together.
async fn stampede(
    caches: &[Cache<String>],
    key: &str,
    per_node: usize,
    init: impl Fn() -> futures_util::future::BoxFuture<'static, Result<String, std::io::Error>>,
) -> Vec<Result<String, Error<std::io::Error>>> {
    let total = caches.len() * per_node;
    let barrier = Arc::new(tokio::sync::Barrier::new(total));
    let tasks: Vec<_> = (0..total)
        .map(|i| {
            let cache = caches[i % caches.len()].clone();
            let (barrier, key, init) = (barrier.clone(), key.to_owned(), init());
            tokio::spawn(async move {
                barrier.wait().await;
                cache.try_get_with(key, init).await
            })
        })
        .collect();
    let mut out = Vec::with_capacity(total);
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_300_calls_one_cold_key_run_one_init_and_invalidate_runs_one_more() {
    let server = RedisServer::start();
    let caches: Vec<_> = (0..3).map(|_| node(&server)).collect();
    let url = server.url();
    let init = || -> futures_util::future::BoxFuture<'static, _> {
        Box::pin(counted_init(url.clone(), Duration::from_millis(200)))
    };

    let started = Instant::now();
    let values = stampede(&caches, "profile:42", 100, init).await;
    let took = started.elapsed();
    assert_eq!(inits(&server).await, 1, "one init fleet-wide");
    assert!(values
        .iter()
        .all(|v| v.as_deref().ok() == Some("profile v1")));
    eprintln!("300 calls over 3 nodes, 200 ms init: 1 init, all answered in {took:?}");
    let fleet: u64 = caches.iter().map(|c| c.stats().collapsed_remote).sum();
    assert!(fleet >= 1, "the other nodes were woken by the fill");

    caches[0].invalidate("profile:42").await.unwrap();
    // Every node drops its copy (a broadcast): wait until none answers from memory.
    let deadline = Instant::now() + Duration::from_secs(10);
    while caches[1].get("profile:42").await.is_some() || caches[2].get("profile:42").await.is_some()
    {
        assert!(
            Instant::now() < deadline,
            "the invalidation never reached the other nodes"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let values = stampede(&caches, "profile:42", 100, init).await;
    assert_eq!(
        inits(&server).await,
        2,
        "one more init after the invalidation"
    );
    assert!(values
        .iter()
        .all(|v| v.as_deref().ok() == Some("profile v2")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_init_is_every_callers_error_leaves_no_lock_and_the_next_call_runs_again() {
    let server = RedisServer::start();
    let caches: Vec<_> = (0..3).map(|_| node(&server)).collect();
    let runs = Arc::new(AtomicUsize::new(0));
    let failing = {
        let runs = runs.clone();
        move || -> futures_util::future::BoxFuture<'static, Result<String, std::io::Error>> {
            let runs = runs.clone();
            Box::pin(async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(300)).await;
                Err(std::io::Error::other("rate limited"))
            })
        }
    };
    let results = stampede(&caches, "profile:7", 100, failing).await;
    assert!(
        results.iter().all(Result::is_err),
        "no value out of a failed init"
    );
    let local = results
        .iter()
        .filter(|r| matches!(r, Err(Error::Init(e)) if e.to_string() == "rate limited"))
        .count();
    let remote = results
        .iter()
        .filter(|r| matches!(r, Err(Error::FillFailedElsewhere)))
        .count();
    eprintln!(
        "300 calls on a failing init: {} init run(s), {local} saw the error itself, {remote} the remote failure",
        runs.load(Ordering::SeqCst)
    );
    assert_eq!(local + remote, 300, "{results:?}");
    assert!(
        local >= 100,
        "the leader's node shares its error with its own callers: {local}"
    );
    assert!(
        runs.load(Ordering::SeqCst) <= 3,
        "at most one attempt per node, never a chain: {} runs",
        runs.load(Ordering::SeqCst)
    );
    let locks = server.wait_for_keys("stampede:*:lock", 0).await;
    assert!(locks.is_empty());
    let values = server.wait_for_keys("stampede:*:v", 0).await;
    assert!(values.is_empty(), "nothing stored");

    let before = runs.load(Ordering::SeqCst);
    let ok = caches[0]
        .try_get_with("profile:7", async {
            Ok::<_, std::io::Error>("back".to_owned())
        })
        .await
        .unwrap();
    assert_eq!(ok, "back");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        before,
        "the failing init did not run again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_backend_runs_one_init_for_100_concurrent_calls() {
    let cache: Cache<String> = Cache::builder().build();
    let runs = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(100));
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (cache, runs, barrier) = (cache.clone(), runs.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                cache
                    .get_with("k", async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        "v".to_owned()
                    })
                    .await
                    .unwrap()
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), "v");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_entries_choose_their_ttl_or_not_to_be_stored() {
    let server = RedisServer::start();
    let cache = node(&server);
    let v = cache
        .try_get_with_options("short", async {
            Ok::<_, std::io::Error>((
                "a".to_owned(),
                EntryOptions::new().ttl(Duration::from_millis(300)),
            ))
        })
        .await
        .unwrap();
    assert_eq!(v, "a");
    let keys = server.wait_for_keys("stampede:*:v", 1).await;
    let mut conn = server.conn().await;
    let pttl: i64 = conn.pttl(&keys[0]).await.unwrap();
    assert!(
        (1..=300).contains(&pttl),
        "the entry's own TTL reached Redis: {pttl}"
    );

    let runs = Arc::new(AtomicUsize::new(0));
    for _ in 0..3 {
        let runs = runs.clone();
        let v = cache
            .try_get_with_options("never", async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(("b".to_owned(), EntryOptions::new().no_store()))
            })
            .await
            .unwrap();
        assert_eq!(v, "b");
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        3,
        "a no-store value is never reused"
    );
    assert_eq!(server.wait_for_keys("stampede:*:v", 1).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_get_and_a_value_shared_with_another_node() {
    let server = RedisServer::start();
    let (a, b) = (node(&server), node(&server));
    assert_eq!(a.get("user:1").await, None);
    a.insert("user:1", "ada".to_owned()).await.unwrap();
    assert_eq!(a.get("user:1").await.as_deref(), Some("ada"));
    assert_eq!(
        b.get("user:1").await.as_deref(),
        Some("ada"),
        "read from Redis"
    );
    let v = b
        .try_get_with("user:1", async {
            Err::<String, _>(std::io::Error::other("not called"))
        })
        .await
        .unwrap();
    assert_eq!(v, "ada");
}

/// The bound on values read from Redis is a `GETRANGE` end there: a bound past what
/// Redis takes as an index (`usize::MAX`) still reads every value, by either read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_bound_on_values_reads_what_another_stored() {
    let server = RedisServer::start();
    let a = node(&server);
    let b: Cache<String> = Cache::builder()
        .backend(Backend::redis(server.url()).unwrap())
        .redis_timeout(Duration::from_secs(1))
        .ttl(Duration::from_secs(60))
        .max_value(usize::MAX)
        .build();
    a.insert("user:1", "ada".to_owned()).await.unwrap();
    a.insert("user:2", "grace".to_owned()).await.unwrap();
    // `get` reads without a lock; `try_get_with` checks and locks in one script.
    assert_eq!(b.get("user:1").await.as_deref(), Some("ada"));
    let v = b
        .try_get_with("user:2", async {
            Err::<String, _>(std::io::Error::other("not called"))
        })
        .await
        .unwrap();
    assert_eq!(v, "grace");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_fails_open_then_coalescing_resumes_after_restart() {
    let mut server = RedisServer::start();
    let caches: Vec<Cache<String>> = (0..3)
        .map(|_| {
            Cache::builder()
                .backend(Backend::redis(server.url()).unwrap())
                .redis_timeout(Duration::from_millis(300))
                .circuit_breaker(3, Duration::from_millis(200))
                .build()
        })
        .collect();
    server.kill();
    let runs = Arc::new(AtomicUsize::new(0));
    let init = {
        let runs = runs.clone();
        move || -> futures_util::future::BoxFuture<'static, Result<String, std::io::Error>> {
            let runs = runs.clone();
            Box::pin(async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok("v".to_owned())
            })
        }
    };
    let values = stampede(&caches, "down", 20, init.clone()).await;
    assert!(
        values.iter().all(|v| v.as_deref().ok() == Some("v")),
        "fail open: answered"
    );
    assert!(
        runs.load(Ordering::SeqCst) <= 3,
        "coalesced within each node: {}",
        runs.load(Ordering::SeqCst)
    );

    server.restart();
    // Until the breakers close and Redis answers, a node may still fill alone; a cold key
    // is coalesced to one init again within a bounded number of rounds.
    let mut round = 0;
    loop {
        round += 1;
        let before = runs.load(Ordering::SeqCst);
        let key = format!("back-{round}");
        let values = stampede(&caches, &key, 10, init.clone()).await;
        assert!(values.iter().all(|v| v.is_ok()));
        if runs.load(Ordering::SeqCst) - before == 1 {
            break;
        }
        assert!(round < 50, "coalescing never resumed after the restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_fails_open_without_hanging() {
    let server = RedisServer::start();
    let cache: Cache<String> = Cache::builder()
        .backend(Backend::redis(server.url()).unwrap())
        .redis_timeout(Duration::from_millis(200))
        .build();
    cache
        .try_get_with("warm", async { Ok::<_, std::io::Error>("w".to_owned()) })
        .await
        .unwrap();
    server.pause();
    let v = tokio::time::timeout(
        Duration::from_secs(10),
        cache.try_get_with("cold", async { Ok::<_, std::io::Error>("c".to_owned()) }),
    )
    .await
    .expect("a frozen Redis must not hang a call")
    .unwrap();
    server.resume();
    assert_eq!(v, "c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_caller_still_answers_its_waiters_and_leaves_no_lock() {
    let server = RedisServer::start();
    let caches: Vec<_> = (0..2).map(|_| node(&server)).collect();
    let started = Arc::new(tokio::sync::Notify::new());
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let runs = Arc::new(AtomicUsize::new(0));
    let init = {
        let (started, gate, runs) = (started.clone(), gate.clone(), runs.clone());
        move || {
            let (started, gate, runs) = (started.clone(), gate.clone(), runs.clone());
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                started.notify_one();
                let _permit = gate.acquire().await.unwrap();
                Ok::<_, std::io::Error>("landed".to_owned())
            }
        }
    };
    let leader = tokio::spawn({
        let (cache, init) = (caches[0].clone(), init());
        async move { cache.try_get_with("slow", init).await }
    });
    started.notified().await;
    let waiters: Vec<_> = (0..20)
        .map(|i| {
            let (cache, init) = (caches[i % 2].clone(), init());
            tokio::spawn(async move { cache.try_get_with("slow", init).await })
        })
        .collect();
    leader.abort();
    assert!(leader.await.unwrap_err().is_cancelled());
    gate.add_permits(100);
    for w in waiters {
        assert_eq!(w.await.unwrap().unwrap(), "landed");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    server.wait_for_keys("stampede:*:v", 1).await;
    assert!(server.wait_for_keys("stampede:*:lock", 0).await.is_empty());
}

#[cfg(feature = "serde")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_serde_value_round_trips_through_redis() {
    #[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Profile {
        id: u64,
        name: String,
        followers: Vec<u64>,
    }
    let server = RedisServer::start();
    let build = || -> Cache<Profile> {
        Cache::builder()
            .backend(Backend::redis(server.url()).unwrap())
            .prefix("profiles")
            .build()
    };
    let (a, b) = (build(), build());
    let p = Profile {
        id: 42,
        name: "ada".into(),
        followers: vec![1, 2, 3],
    };
    let fetched = {
        let p = p.clone();
        a.try_get_with("42", async move { Ok::<_, std::io::Error>(p) })
            .await
            .unwrap()
    };
    assert_eq!(fetched, p);
    server.wait_for_keys("profiles:*:v", 1).await;
    let again = b
        .try_get_with("42", async {
            Err::<Profile, _>(std::io::Error::other("not called"))
        })
        .await
        .unwrap();
    assert_eq!(again, p, "decoded on another node");
}
