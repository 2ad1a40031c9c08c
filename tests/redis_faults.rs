//! A slow, dead, full or frozen Redis, on real redis-server processes: values still
//! served under a write pause, the breaker closing soon after an outage, a refused store
//! that still releases and wakes, and a freeze that leaves the newest answer in Redis.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use redis::AsyncCommands;
use support::{cache_status, get, stampede, text, RedisServer, Upstream};
use tokio::sync::{Notify, Semaphore};
use tower::{Layer, ServiceExt};
use tower_stampede::{Backend, StampedeBuilder, StampedeLayer};

fn node(server: &RedisServer) -> StampedeBuilder {
    StampedeLayer::builder().backend(Backend::redis(server.url()).unwrap())
}

/// One field of `INFO`, as a number.
async fn info_field(
    conn: &mut redis::aio::MultiplexedConnection,
    section: &str,
    name: &str,
) -> u64 {
    support::info_number(conn, section, name)
        .await
        .unwrap_or_else(|| panic!("no {name} in INFO {section}"))
}

/// The `#<n>` counter at the end of an upstream body `"<path> #<n>"`, found in any bytes.
fn counter(bytes: &[u8], path: &str) -> Option<u64> {
    let marker = format!("{path} #");
    let at = bytes
        .windows(marker.len())
        .rposition(|w| w == marker.as_bytes())?;
    let digits: String = bytes[at + marker.len()..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .map(|&b| b as char)
        .collect();
    digits.parse().ok()
}

/// Under `CLIENT PAUSE WRITE` (Redis does this during a failover) scripts and PUBLISH
/// block but reads are served: a value already in Redis is still served from Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_pause_still_serves_values_from_redis() {
    let server = RedisServer::start();
    let upstream = Upstream::new(Duration::ZERO);
    let a = node(&server).build();
    let svc_a = a.layer(upstream.service());
    let paths: Vec<String> = (0..50).map(|i| format!("/k{i}")).collect();
    let filled = stampede(std::slice::from_ref(&svc_a), &paths, 1).await;
    assert!(filled.iter().all(|r| r.1 == StatusCode::OK));
    server.wait_for_keys("stampede:*:v", 50).await;
    assert_eq!(upstream.calls(), 50);

    // A second node with an empty L1 and a warm connection.
    let b = node(&server).build();
    let svc_b = b.layer(upstream.service());
    svc_b.clone().oneshot(get("/warm")).await.unwrap();
    server.wait_for_keys("stampede:*:v", 51).await;
    let calls_before = upstream.calls();

    let mut conn = server.conn().await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(3000)
        .arg("WRITE")
        .query_async(&mut conn)
        .await
        .unwrap();
    let results = stampede(std::slice::from_ref(&svc_b), &paths, 3).await;
    let _: () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query_async(&mut conn)
        .await
        .unwrap();

    let went_upstream = upstream.calls() - calls_before;
    let stats = b.stats();
    eprintln!(
        "write pause: {} requests, {went_upstream} went upstream, {} redis hits, {} redis errors",
        results.len(),
        stats.hits_redis,
        stats.redis_errors
    );
    for (path, status, cs, body) in &results {
        assert_eq!(*status, StatusCode::OK);
        assert!(
            cs.contains("hit; detail=redis") || cs.contains("collapsed"),
            "{path}: {cs}"
        );
        let expected = filled.iter().find(|r| &r.0 == path).unwrap();
        assert_eq!(body, &expected.3, "{path}");
    }
    assert_eq!(went_upstream, 0, "values in Redis went upstream");
    assert_eq!(stats.hits_redis, 50);
    assert_eq!(
        stats.redis_errors, 0,
        "a write stall with a working read is no error"
    );
}

/// Redis killed long enough to open every node's breaker, then restarted: a cold key
/// fired at three nodes is coalesced to one upstream call again within a few rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalescing_resumes_soon_after_redis_is_back() {
    let mut server = RedisServer::start();
    // Each round takes at least this long, so a count of rounds bounds the time from below.
    let upstream = Upstream::new(Duration::from_millis(100));
    let layers: Vec<_> = (0..3).map(|_| node(&server).build()).collect();
    let services: Vec<_> = layers.iter().map(|l| l.layer(upstream.service())).collect();
    let results = stampede(&services, &["/before"], 30).await;
    assert!(results.iter().all(|r| r.3 == "/before #1"));

    server.kill();
    let mut round = 0;
    // Enough failures on every node to open its breaker, over about a second of outage.
    while round < 10 || layers.iter().any(|l| l.stats().redis_errors < 5) {
        assert!(round < 200, "the nodes never saw Redis fail");
        let path = format!("/down{round}");
        let results = stampede(&services, std::slice::from_ref(&path), 30).await;
        assert!(results.iter().all(|r| r.1 == StatusCode::OK), "fail open");
        round += 1;
    }

    server.restart();
    let restarted = Instant::now();
    let mut resumed = None;
    for round in 0..30 {
        let path = format!("/after{round}");
        let before = upstream.calls();
        let results = stampede(&services, std::slice::from_ref(&path), 30).await;
        assert!(results.iter().all(|r| r.1 == StatusCode::OK));
        if upstream.calls() - before == 1 {
            assert!(results.iter().all(|r| r.3 == results[0].3));
            resumed = Some(round);
            break;
        }
    }
    let round = resumed.expect("the fleet did not coalesce again within 30 rounds of 100 ms");
    eprintln!(
        "coalescing across nodes resumed on round {round}, {:?} after the restart",
        restarted.elapsed()
    );
}

/// A gated upstream: announces each call, then waits for a permit before answering.
fn gated(
    body: &'static str,
    started: Arc<Notify>,
    gate: Arc<Semaphore>,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let (started, gate) = (started.clone(), gate.clone());
        async move {
            started.notify_one();
            let _permit = gate.acquire().await.unwrap();
            Ok(Response::new(Full::new(Bytes::from(body))))
        }
    })
}

/// Redis out of memory (`noeviction`) while a leader holds the lock: its store is
/// refused, yet the lock is released and the waiters on another node get its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_store_still_releases_the_lock_and_wakes_the_waiters() {
    let server = RedisServer::start();
    let mut conn = server.conn().await;
    // A lease far longer than the test waits: only a release removes the lock. The
    // waiters do not poll: only a wake-up answers them before their lock wait ends.
    let build = || {
        node(&server)
            .redis_timeout(Duration::from_secs(1))
            .lease(Duration::from_secs(60))
            .lock_wait(Duration::from_secs(5))
            .poll_interval(Duration::from_secs(30))
            .build()
    };
    let (a, b) = (build(), build());
    let other = Upstream::new(Duration::ZERO);
    // Warm both nodes: scripts loaded, wake-ups subscribed.
    a.layer(other.service())
        .oneshot(get("/warm-a"))
        .await
        .unwrap();
    b.layer(other.service())
        .oneshot(get("/warm-b"))
        .await
        .unwrap();
    server.wait_for_keys("stampede:*:v", 2).await;
    loop {
        let (_, subscribers): (String, u64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg("stampede:ready")
            .query_async(&mut conn)
            .await
            .unwrap();
        if subscribers == 2 {
            break;
        }
        tokio::task::yield_now().await;
    }
    let used = info_field(&mut conn, "memory", "used_memory").await;
    let max = used + 4 * 1024 * 1024;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .arg("maxmemory")
        .arg(max)
        .query_async(&mut conn)
        .await
        .unwrap();

    let started = Arc::new(Notify::new());
    let gate = Arc::new(Semaphore::new(0));
    let leader_svc = a.layer(gated("the leader's answer", started.clone(), gate.clone()));
    let leader = tokio::spawn(leader_svc.oneshot(get("/full")));
    started.notified().await;
    let calls_before = other.calls();
    let waiters: Vec<_> = (0..5)
        .map(|_| tokio::spawn(b.layer(other.service()).oneshot(get("/full"))))
        .collect();
    while b.stats().lock_waited == 0 {
        tokio::task::yield_now().await;
    }

    // Now fill Redis until it refuses writes, even a tiny one: a big value's own query
    // buffer counts while it is checked, so the values get smaller as writes are refused.
    let mut size = 64 * 1024;
    let mut refused = false;
    for i in 0..100_000 {
        let set: redis::RedisResult<()> = conn.set(format!("filler:{i}"), vec![b'x'; size]).await;
        if let Err(e) = set {
            assert!(e.to_string().contains("OOM"), "{e}");
            if size <= 16 {
                refused = true;
                break;
            }
            size /= 8;
        }
    }
    assert!(refused, "redis never refused a write");
    // Redis may free a little meanwhile (query buffers shrink): top up with tiny values
    // until a tiny write is refused.
    let mut top_up = 0;
    loop {
        let tiny: redis::RedisResult<()> = conn.set("probe", "x").await;
        if tiny.is_err() {
            break;
        }
        top_up += 1;
        assert!(top_up < 100_000, "redis still accepts writes");
        let _: redis::RedisResult<()> = conn.set(format!("top-up:{top_up}"), vec![b'x'; 256]).await;
    }
    gate.add_permits(1);

    let res = leader.await.unwrap().unwrap();
    let leader_status = cache_status(&res);
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(text(res).await, "the leader's answer");
    assert!(leader_status.contains("stored"), "{leader_status}");
    let mut by_the_fleet = 0;
    for waiter in waiters {
        let res = waiter.await.unwrap().unwrap();
        let cs = cache_status(&res);
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(text(res).await, "the leader's answer", "{cs}");
        // One waiter per node waits on Redis; the others wait on it.
        assert!(cs.contains("collapsed"), "{cs}");
        by_the_fleet += usize::from(cs.contains("collapsed; detail=fleet"));
    }
    assert_eq!(by_the_fleet, 1);
    assert_eq!(other.calls(), calls_before, "no waiter went upstream");
    let locks = server.wait_for_keys("stampede:*:lock", 0).await;
    assert!(locks.is_empty());
    let values: Vec<String> = conn.keys("stampede:*:v").await.unwrap();
    assert_eq!(values.len(), 2, "only the warm-up values: {values:?}");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(0)
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// Redis frozen (SIGSTOP) for longer than the lease while requests keep coming: every
/// request is answered, and once the writes queued during the freeze have run, in
/// whatever order, Redis holds the newest answer any node served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freeze_longer_than_the_lease_fails_open_and_keeps_the_newest_answer() {
    let server = RedisServer::start();
    let upstream = Upstream::new(Duration::ZERO);
    // Fresh for 50 ms, so every request below fills; kept in Redis for a minute as a
    // stale-if-error copy, so what lands stays there to be looked at. No breaker: every
    // fill offers its answer to Redis.
    let build = || {
        node(&server)
            .redis_timeout(Duration::from_millis(100))
            .lease(Duration::from_millis(300))
            .ttl(Duration::from_millis(50))
            .stale_if_error(Duration::from_secs(60))
            .circuit_breaker(0, Duration::from_secs(1))
            .build()
    };
    let layers = [build(), build()];
    let services: Vec<_> = layers.iter().map(|l| l.layer(upstream.service())).collect();
    for (i, svc) in services.iter().enumerate() {
        let res = svc
            .clone()
            .oneshot(get(&format!("/warm{i}")))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    server.wait_for_keys("stampede:*:v", 2).await;

    server.pause();
    let frozen = Instant::now();
    let mut newest = 0;
    // Each request waits out the 100 ms deadline: 13 of them outlast the 300 ms lease.
    // The newest answer comes from the first node, whose queued writes Redis usually runs
    // first on resuming: a last write that simply wins would leave the second node's older
    // answer.
    for i in 0..13 {
        let res = services[i % 2].clone().oneshot(get("/k")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "request {i} failed");
        let body = text(res).await;
        newest = newest.max(counter(body.as_bytes(), "/k").expect("a counter"));
    }
    let freeze = frozen.elapsed();
    server.resume();

    // Wait until the queued writes have run: no lock left, and two looks in a row see the
    // same value with no other client's command processed in between.
    let mut conn = server.conn().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last: Option<(Vec<u8>, u64)> = None;
    let landed = loop {
        let locks: Vec<String> = conn.keys("stampede:*:lock").await.unwrap();
        let values: Vec<String> = conn.keys("stampede:*:v").await.unwrap();
        let mut value = None;
        for key in &values {
            let bytes: Vec<u8> = conn.get(key).await.unwrap_or_default();
            if counter(&bytes, "/k").is_some() {
                value = Some(bytes);
            }
        }
        let processed = info_field(&mut conn, "stats", "total_commands_processed").await;
        match (value, &last) {
            // Our own commands since the last look: KEYS, KEYS, GETs, INFO.
            (Some(v), Some((prev, at)))
                if locks.is_empty() && &v == prev && processed == at + 3 + values.len() as u64 =>
            {
                break v
            }
            (v, _) => last = v.map(|v| (v, processed)),
        }
        assert!(
            Instant::now() < deadline,
            "the queued writes never settled: locks {locks:?}, values {values:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let in_redis = counter(&landed, "/k").unwrap();
    eprintln!(
        "frozen for {freeze:?}: newest answer served #{newest}, Redis holds #{in_redis}, \
         {} upstream calls",
        upstream.calls()
    );
    assert_eq!(
        in_redis, newest,
        "Redis holds an older answer than one served"
    );

    for (i, svc) in services.iter().enumerate() {
        let res = svc.clone().oneshot(get("/k")).await.unwrap();
        let cs = cache_status(&res);
        assert_eq!(res.status(), StatusCode::OK);
        eprintln!(
            "after the freeze node {i} serves {:?} ({cs})",
            text(res).await
        );
    }
}
