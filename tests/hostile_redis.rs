//! Bytes in Redis are hostile input: values with absurd header counts, values far larger
//! than anything the layer stores, lock keys without an expiry or with a day-long one, and
//! wake-up messages carrying hostile envelopes. Each is placed in a real redis-server by
//! the test itself; two nodes then answer from the upstream, nothing panics, and the bad
//! bytes are replaced.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use redis::AsyncCommands;
use sha2::{Digest, Sha256};
use support::{cache_status, get, text, RedisServer, Upstream};
use tower::{Layer, ServiceExt};
use tower_stampede::{Backend, StampedeBuilder, StampedeLayer};

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Counts every panic in the process (tasks included: tokio catches them, the hook still
/// runs), so a test can assert that none happened while it ran.
fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
}

fn panics() -> usize {
    PANICS.load(Ordering::SeqCst)
}

/// A node on `server`, with a generous Redis deadline: these tests are about what the
/// bytes do, and a busy test machine must not look like a slow Redis.
fn node(server: &RedisServer) -> StampedeBuilder {
    StampedeLayer::builder()
        .backend(Backend::redis(server.url()).unwrap())
        .redis_timeout(Duration::from_secs(1))
}

/// The key hash of `support::get(path)` with the default key, as the layer computes it.
fn hash_hex(path: &str) -> String {
    let canonical = format!("GET http://test{path}");
    Sha256::digest(canonical.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn value_key(path: &str) -> String {
    format!("stampede:{{{}}}:v", hash_hex(path))
}

fn lock_key(path: &str) -> String {
    format!("stampede:{{{}}}:lock", hash_hex(path))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A well-formed envelope (the layout documented in `src/cache/entry.rs`, around the
/// stored answer of `src/http/stored.rs`) for the default key of `path`, fresh for an
/// hour, with `n_headers` distinct header names.
fn envelope(path: &str, n_headers: u16, body: &[u8]) -> Vec<u8> {
    let key = format!("GET http://test{path}");
    let now = now_ms();
    let mut payload = 200u16.to_be_bytes().to_vec();
    payload.extend(n_headers.to_be_bytes());
    for i in 0..n_headers {
        let name = format!("x-h{i}");
        payload.extend((name.len() as u16).to_be_bytes());
        payload.extend(name.as_bytes());
        payload.extend(1u32.to_be_bytes());
        payload.push(b'v');
    }
    payload.extend((body.len() as u32).to_be_bytes());
    payload.extend(body);

    let mut out = b"TSE\x02\x00".to_vec();
    out.extend((key.len() as u32).to_be_bytes());
    out.extend(key.as_bytes());
    for t in [now, now + 3_600_000, now + 3_600_000, now + 3_600_000] {
        out.extend(t.to_be_bytes());
    }
    out.extend(1u32.to_be_bytes());
    // No tags.
    out.extend(0u16.to_be_bytes());
    out.extend((payload.len() as u32).to_be_bytes());
    out.extend(payload);
    out
}

/// Polls `cond` until it holds; a condition that never holds fails the test.
async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cond().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits (bounded) for the layer's write to replace whatever stands at `key` with an
/// envelope, reading only its first bytes.
async fn wait_for_envelope(conn: &mut redis::aio::MultiplexedConnection, key: &str) {
    let key = key.to_owned();
    // The answer comes first and the write right after it: wait for our envelope (the
    // hostile bytes may be an envelope too), whose body is the upstream's first answer.
    eventually(&format!("{key} overwritten by our envelope"), || {
        let mut conn = conn.clone();
        let key = key.clone();
        async move {
            // Never read the hostile bytes whole: they may be megabytes.
            let len: u64 = conn.strlen(&key).await.unwrap();
            if len == 0 || len > 64 * 1024 {
                return false;
            }
            let stored: Option<Vec<u8>> = conn.get(&key).await.unwrap();
            stored.is_some_and(|v| v.starts_with(b"TSE") && v.ends_with(b"/p #1"))
        }
    })
    .await;
}

/// One number of `INFO section`, 0 when absent.
async fn info_field(
    conn: &mut redis::aio::MultiplexedConnection,
    section: &str,
    field: &str,
) -> u64 {
    support::info_number(conn, section, field)
        .await
        .unwrap_or(0)
}

/// Script calls sent by clients (EVALSHA, plus EVAL when a script had to be loaded).
async fn script_calls(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    info_field(conn, "commandstats", "cmdstat_evalsha").await
        + info_field(conn, "commandstats", "cmdstat_eval").await
}

type Svc = tower::util::BoxCloneService<
    Request<Full<Bytes>>,
    Response<tower_stampede::StampedeBody<Full<Bytes>>>,
    std::convert::Infallible,
>;

fn call(
    svc: &Svc,
    path: &str,
) -> impl std::future::Future<Output = (StatusCode, String, String)> + Send {
    let res = svc.clone().oneshot(get(path));
    async move {
        let res = res.await.unwrap();
        let status = res.status();
        let cs = cache_status(&res);
        (status, cs, text(res).await)
    }
}

fn two_nodes(
    server: &RedisServer,
    upstream: &Upstream,
    build: impl Fn(StampedeBuilder) -> StampedeBuilder,
) -> (Svc, Svc) {
    let a = build(node(server)).build().layer(upstream.service());
    let b = build(node(server)).build().layer(upstream.service());
    (Svc::new(a), Svc::new(b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_thousand_headers_are_a_miss_then_overwritten() {
    count_panics();
    let server = RedisServer::start();
    let mut conn = server.conn().await;
    let hostile = envelope("/p", 30_000, b"hostile");
    let () = conn.set(value_key("/p"), &hostile).await.unwrap();
    let upstream = Upstream::new(Duration::ZERO);
    let (a, b) = two_nodes(&server, &upstream, |b| b);
    let panics_before = panics();

    let (status, cs, body) = call(&a, "/p").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "/p #1"), "{cs}");
    wait_for_envelope(&mut conn, &value_key("/p")).await;
    let stored: Vec<u8> = conn.get(value_key("/p")).await.unwrap();
    assert!(stored.len() < hostile.len() && stored.ends_with(b"/p #1"));

    let (status, cs, body) = call(&b, "/p").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "/p #1"), "{cs}");
    assert_eq!(upstream.calls(), 1, "the second node read the new envelope");
    assert_eq!(panics() - panics_before, 0, "nothing panicked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_larger_than_the_maximum_is_never_read_and_gets_overwritten() {
    count_panics();
    let server = RedisServer::start();
    let mut conn = server.conn().await;
    let garbage = vec![b'x'; 4 * 1024 * 1024];
    let () = conn.set(value_key("/p"), &garbage).await.unwrap();
    let upstream = Upstream::new(Duration::ZERO);
    let (a, b) = two_nodes(&server, &upstream, |b| b.max_body(16 * 1024));
    let panics_before = panics();
    let sent_before = info_field(&mut conn, "stats", "total_net_output_bytes").await;

    let (status, cs, body) = call(&a, "/p").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "/p #1"), "{cs}");
    wait_for_envelope(&mut conn, &value_key("/p")).await;
    let (status, cs, body) = call(&b, "/p").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "/p #1"), "{cs}");
    assert_eq!(upstream.calls(), 1, "the second node read the new envelope");

    let sent = info_field(&mut conn, "stats", "total_net_output_bytes").await - sent_before;
    assert!(
        sent < garbage.len() as u64 / 4,
        "Redis sent {sent} bytes: the oversized value was read"
    );
    let len: u64 = conn.strlen(value_key("/p")).await.unwrap();
    assert!(
        len < 1024,
        "the value was replaced by a small envelope ({len} bytes)"
    );
    assert_eq!(panics() - panics_before, 0, "nothing panicked");
}

/// A lock no holder of ours could have left (`px`: None for no expiry) is taken over
/// once the waiters have seen it for a lease, without polling Redis in a tight loop.
async fn stale_lock_is_taken_over(px: Option<u64>) {
    count_panics();
    let server = RedisServer::start();
    let mut conn = server.conn().await;
    let lease = Duration::from_millis(300);
    let poll = Duration::from_millis(50);
    let mut set = redis::cmd("SET");
    set.arg(lock_key("/p")).arg("x");
    if let Some(px) = px {
        set.arg("PX").arg(px);
    }
    let () = set.query_async(&mut conn).await.unwrap();
    let upstream = Upstream::new(Duration::ZERO);
    let (a, b) = two_nodes(&server, &upstream, |b| {
        b.lease(lease)
            .poll_interval(poll)
            .lock_wait(Duration::from_secs(10))
    });
    let panics_before = panics();
    let calls_before = script_calls(&mut conn).await;

    let (ra, rb) = tokio::join!(call(&a, "/p"), call(&b, "/p"));
    for (status, cs, body) in [&ra, &rb] {
        assert_eq!((*status, body.as_str()), (StatusCode::OK, "/p #1"), "{cs}");
    }
    assert_eq!(
        upstream.calls(),
        1,
        "one node took the lock over and filled"
    );
    let script_calls = script_calls(&mut conn).await - calls_before;
    let bound = 4 * (lease.as_millis() / (poll.as_millis() / 2)) as u64 + 10;
    assert!(
        script_calls < bound,
        "{script_calls} script calls for two waits of about a lease (bound {bound})"
    );

    wait_for_envelope(&mut conn, &value_key("/p")).await;
    let lock: Option<String> = conn.get(lock_key("/p")).await.unwrap();
    assert_eq!(lock, None, "the taken-over lock was released by the fill");
    assert_eq!(panics() - panics_before, 0, "nothing panicked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_without_expiry_is_taken_over_after_the_lease() {
    stale_lock_is_taken_over(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_with_a_day_long_ttl_is_taken_over_after_the_lease() {
    stale_lock_is_taken_over(Some(24 * 3600 * 1000)).await;
}

/// Publishes on the wake-up channel; returns how many subscribers got it.
async fn publish(conn: &mut redis::aio::MultiplexedConnection, message: &[u8]) -> u64 {
    conn.publish("stampede:ready", message).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_wake_up_message_does_not_stop_wake_ups() {
    count_panics();
    let server = RedisServer::start();
    let mut conn = server.conn().await;
    let poll = Duration::from_secs(5);
    // Node B keeps stale copies in memory (usable on error for a minute): a wake-up for
    // such a key makes it decode what the message carries.
    let upstream_b = Upstream::new(Duration::ZERO);
    let b_layer = node(&server)
        .poll_interval(poll)
        .ttl(Duration::from_millis(300))
        .stale_if_error(Duration::from_secs(60))
        .build();
    let b = Svc::new(b_layer.layer(upstream_b.service()));
    // Node A's upstream answers only when the test lets it.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let a_calls = Arc::new(AtomicUsize::new(0));
    let a_layer = node(&server).poll_interval(poll).build();
    let a = Svc::new(a_layer.layer(tower::service_fn({
        let (gate, a_calls) = (gate.clone(), a_calls.clone());
        move |req: Request<Full<Bytes>>| {
            let (gate, a_calls) = (gate.clone(), a_calls.clone());
            async move {
                a_calls.fetch_add(1, Ordering::SeqCst);
                gate.acquire().await.unwrap().forget();
                let body = format!("{} from a", req.uri().path());
                Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(body))))
            }
        }
    })));
    let panics_before = panics();

    // B subscribes on a hit from Redis (a hit publishes nothing): from then on every
    // message published reaches it, and its counter can be followed exactly.
    let () = conn
        .set(value_key("/warm"), envelope("/warm", 0, b"warm"))
        .await
        .unwrap();
    let (status, cs, body) = call(&b, "/warm").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "warm"), "{cs}");
    eventually("B subscribed", || {
        let mut conn = conn.clone();
        async move {
            let (_, n): (String, u64) = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg("stampede:ready")
                .query_async(&mut conn)
                .await
                .unwrap();
            n == 1
        }
    })
    .await;
    let mut heard = 0;
    let mut heard_all = async |n: u64| {
        heard += n;
        let expected = heard;
        eventually(&format!("B heard {expected} wake-ups"), || async {
            b_layer.stats().wakeups == expected
        })
        .await;
        expected
    };

    // B fills /s: fresh for 300 ms, usable on error for a minute. Its own fill's wake-up
    // goes to the key's channel, which nobody here listens to; a probe on the broadcast
    // channel tells when B's subscription has caught up; a machine too slow for the copy
    // to still be fresh then tries again with another path.
    let mut attempt = 0;
    let (path, fresh_until) = loop {
        let path = format!("/s{attempt}");
        let (status, cs, body) = call(&b, &path).await;
        assert_eq!(status, StatusCode::OK, "{cs}");
        assert_eq!(body, format!("{path} #{}", attempt + 1));
        assert_eq!(publish(&mut conn, &[b'0'; 64]).await, 1);
        heard_all(1).await;
        // The answer comes before the write: wait (bounded) for B's entry to land.
        let key = value_key(&path);
        eventually(&format!("B's entry for {path} stored"), || {
            let (mut conn, key) = (conn.clone(), key.clone());
            async move { conn.exists(&key).await.unwrap() }
        })
        .await;
        let bytes: Vec<u8> = conn.get(&key).await.unwrap();
        let at = 3 + 1 + 1 + 4 + format!("GET http://test{path}").len() + 8;
        let fresh_until = u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
        if now_ms() < fresh_until {
            break (path, fresh_until);
        }
        attempt += 1;
        assert!(attempt < 5, "B's probes never came back within 300 ms");
    };
    eventually("B's copy is stale", || async { now_ms() > fresh_until }).await;

    // The hostile wake-up: the hash of that path, then an envelope for it with 30,000
    // headers. B's stale copy makes it look at what the message carries.
    let mut hostile = hash_hex(&path).into_bytes();
    hostile.extend(envelope(&path, 30_000, b"hostile"));
    assert_eq!(publish(&mut conn, &hostile).await, 1);
    let after_hostile = heard_all(1).await;

    // A cross-node fill: A leads /w, B waits on A's lock; with a 5 s poll interval and a
    // 5 s lease only the wake-up over pub/sub wakes B early.
    let lead = tokio::spawn({
        let a = a.clone();
        async move { call(&a, "/w").await }
    });
    eventually("A holds the lock of /w", || {
        let mut conn = conn.clone();
        async move { conn.exists(lock_key("/w")).await.unwrap() }
    })
    .await;
    let wait = tokio::spawn({
        let b = b.clone();
        async move { call(&b, "/w").await }
    });
    eventually("B waits on A's lock", || async {
        b_layer.stats().lock_waited >= 1
    })
    .await;
    gate.add_permits(1);
    let (status, cs, body) = lead.await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "/w from a"),
        "{cs}"
    );
    let (status, cs, body) = wait.await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "/w from a"),
        "{cs}"
    );
    assert_eq!(cs, "tower-stampede; fwd=miss; collapsed; detail=fleet");
    assert!(
        b_layer.stats().wakeups > after_hostile,
        "B's subscription heard A's fill ({} wake-ups before, {} after)",
        after_hostile,
        b_layer.stats().wakeups
    );
    assert_eq!(a_calls.load(Ordering::SeqCst), 1);
    assert_eq!(upstream_b.calls(), attempt + 1);
    assert_eq!(panics() - panics_before, 0, "nothing panicked");
}
