//! Day one for an operator, on the `proxy` example as a real process: what it logs about a
//! Redis it cannot use, `--require-redis` (at start-up and in `/readyz` afterwards),
//! `/healthz` and `/readyz`, and a `/metrics` page worth scraping (help text, histograms
//! with buckets, L1 gauges).
//!
//! The example binary must be built first (`cargo build --examples`); `cargo test` does it.

mod support;

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::RedisServer;
use tokio::net::TcpListener;

#[path = "support/proxy_process.rs"]
mod proxy_process;

use proxy_process::{proxy_binary, Proxy};

/// A safety net for waits on a log line or a condition, not a timing assertion.
const PATIENCE: Duration = Duration::from_secs(20);

/// An upstream that answers `"<path>"` with `200 OK` to everything.
async fn upstream() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(
                    req.uri().path().to_owned(),
                ))))
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

/// A loopback port with nothing listening on it.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn get(url: &str) -> (StatusCode, String) {
    let res = client()
        .request(Request::get(url).body(Empty::new()).unwrap())
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Waits (bounded) for a log line holding every one of `needles`; returns it.
fn wait_for_line(proxy: &Proxy, needles: &[&str]) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let output = proxy.output();
        if let Some(line) = output
            .lines()
            .find(|line| needles.iter().all(|n| line.contains(n)))
        {
            return line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {needles:?}; output:\n{output}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn metrics_addr(proxy: &Proxy) -> SocketAddr {
    proxy
        .metrics
        .expect("the proxy logs `metrics on http://ADDR/metrics`")
}

// ---------------------------------------------------------------------------------------
// Start-up: what the log says about Redis
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_named_in_the_log() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("s3cret")
        .query_async(&mut conn)
        .await
        .unwrap();
    let url = format!("redis://:wrong@127.0.0.1:{}/", redis.port());
    let proxy = Proxy::start(&upstream().await, &["--redis", &url]);
    let line = wait_for_line(
        &proxy,
        &["redis rejected our credentials (WRONGPASS): check the URL's password"],
    );
    assert!(line.contains("ERROR"), "{line}");
    assert!(
        !proxy.output().contains("wrong@"),
        "the password reached the log:\n{}",
        proxy.output()
    );

    // No password at all in the URL: NOAUTH.
    let proxy = Proxy::start(&upstream().await, &["--redis", &redis.url()]);
    let line = wait_for_line(&proxy, &["redis requires a password: add it to the URL"]);
    assert!(line.contains("ERROR"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_port_is_named_with_the_refusal() {
    let port = closed_port();
    let url = format!("redis://127.0.0.1:{port}/");
    let proxy = Proxy::start(&upstream().await, &["--redis", &url]);
    let line = wait_for_line(
        &proxy,
        &[&format!(
            "redis at 127.0.0.1:{port} unreachable: connection refused; serving from this process only until it answers"
        )],
    );
    assert!(line.contains("WARN"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_redis_is_reported_once_at_start_up() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&upstream().await, &["--redis", &redis.url()]);
    let line = wait_for_line(
        &proxy,
        &[&format!("redis at 127.0.0.1:{} answered", redis.port())],
    );
    assert!(line.contains("INFO"), "{line}");
}

#[test]
fn require_redis_exits_non_zero_when_redis_does_not_answer() {
    let port = closed_port();
    let mut child = Command::new(proxy_binary())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "http://127.0.0.1:9",
        ])
        .args([
            "--redis",
            &format!("redis://127.0.0.1:{port}/"),
            "--require-redis",
        ])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the proxy example");
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "still running with --require-redis and no Redis:\n{}",
                String::from_utf8_lossy(&output.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let output = child.wait_with_output().unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!status.success(), "{status:?}:\n{log}");
    let message = format!("redis at 127.0.0.1:{port} unreachable: connection refused");
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains(&message)),
        "{log}"
    );
    assert!(!log.contains("listening on"), "{log}");
}

// ---------------------------------------------------------------------------------------
// /healthz and /readyz
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness_of_a_healthy_node() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(
        &upstream().await,
        &["--redis", &redis.url(), "--metrics-listen", "127.0.0.1:0"],
    );
    let ops = metrics_addr(&proxy);
    let (status, body) = get(&format!("http://{ops}/healthz")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for field in [
        r#""status":"ok""#,
        r#""backend":"redis""#,
        r#""redis":"up""#,
        r#""breaker":"closed""#,
    ] {
        assert!(body.contains(field), "{field} missing from {body}");
    }
    let (status, body) = get(&format!("http://{ops}/readyz")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_redis_is_down_is_live_and_says_so() {
    let mut redis = RedisServer::start();
    let proxy = Proxy::start(
        &upstream().await,
        &["--redis", &redis.url(), "--metrics-listen", "127.0.0.1:0"],
    );
    let ops = metrics_addr(&proxy);
    redis.kill();
    // The last probe is reused for a second: poll until one made after the kill answers.
    let deadline = Instant::now() + PATIENCE;
    let body = loop {
        let (status, body) = get(&format!("http://{ops}/healthz")).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "a fail-open node stays live: {body}"
        );
        if body.contains(r#""redis":"down""#) {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "redis still up after its kill: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(body.contains(r#""status":"ok""#), "{body}");
    assert!(body.contains("unreachable"), "{body}");
    // It still serves (from its own memory), so it is ready: without `--require-redis`
    // readiness does not follow Redis.
    let (status, _) = get(&proxy.url("/page")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = get(&format!("http://{ops}/readyz")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// Polls `/readyz` (bounded) until it answers `want`; returns the body. The probe behind
/// it is reused for a second, so a change in Redis shows within about that.
async fn wait_for_readyz(ops: SocketAddr, want: StatusCode, why: &str) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, body) = get(&format!("http://{ops}/readyz")).await;
        if status == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz still {status} ({body}), not {want}, {why}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_require_redis_readiness_follows_redis() {
    let mut redis = RedisServer::start();
    let proxy = Proxy::start(
        &upstream().await,
        &[
            "--redis",
            &redis.url(),
            "--require-redis",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let ops = metrics_addr(&proxy);
    let body = wait_for_readyz(ops, StatusCode::OK, "with Redis up").await;
    assert!(body.contains(r#""status":"ready""#), "{body}");

    // Redis gone: not ready, though still live and still serving (fail-open).
    redis.kill();
    let body = wait_for_readyz(ops, StatusCode::SERVICE_UNAVAILABLE, "after Redis died").await;
    assert!(body.contains(r#""status":"redis down""#), "{body}");
    assert!(body.contains("unreachable"), "{body}");
    let (status, body) = get(&format!("http://{ops}/healthz")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains(r#""redis":"down""#), "{body}");
    let (status, _) = get(&proxy.url("/page")).await;
    assert_eq!(status, StatusCode::OK);

    // Back on the same port: ready again.
    redis.restart();
    wait_for_readyz(ops, StatusCode::OK, "after Redis came back").await;

    // Frozen (SIGSTOP): the probe gives up at the Redis deadline, and readiness with it.
    redis.pause();
    let body = wait_for_readyz(ops, StatusCode::SERVICE_UNAVAILABLE, "with Redis frozen").await;
    assert!(body.contains(r#""status":"redis down""#), "{body}");
    redis.resume();
    wait_for_readyz(ops, StatusCode::OK, "after Redis thawed").await;
}

// ---------------------------------------------------------------------------------------
// /metrics
// ---------------------------------------------------------------------------------------

/// The metric family of a sample line: its name without a histogram's suffixes.
fn family(sample: &str) -> &str {
    let name = sample.split(['{', ' ']).next().unwrap_or(sample);
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name)
}

/// The value of the sample named `series` exactly (name and labels as rendered).
fn value(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_described_histograms_have_buckets_and_gauges_follow_l1() {
    // The upstream sends no freshness: `--ttl` gives it one (the default, 0, stores nothing).
    let proxy = Proxy::start(
        &upstream().await,
        &["--metrics-listen", "127.0.0.1:0", "--ttl", "60s"],
    );
    let ops = metrics_addr(&proxy);

    // Before any request: every series is there already, at zero.
    let (_, page) = get(&format!("http://{ops}/metrics")).await;
    for series in [
        r#"tower_stampede_lock_total{cache="tower-stampede",result="timed_out"}"#,
        r#"tower_stampede_redis_errors_total{cache="tower-stampede"}"#,
        r#"tower_stampede_fills_in_flight{cache="tower-stampede"}"#,
        r#"tower_stampede_waiters{cache="tower-stampede"}"#,
    ] {
        assert_eq!(value(&page, series), Some(0.0), "{series} in:\n{page}");
    }

    // Three keys, each a miss then a hit.
    for path in ["/a", "/b", "/c"] {
        for _ in 0..2 {
            let (status, body) = get(&proxy.url(path)).await;
            assert_eq!((status, body.as_str()), (StatusCode::OK, path));
        }
    }
    let (status, page) = get(&format!("http://{ops}/metrics")).await;
    assert_eq!(status, StatusCode::OK);

    let families: BTreeSet<&str> = page
        .lines()
        .filter(|l| l.starts_with("tower_stampede_"))
        .map(family)
        .collect();
    for name in [
        "tower_stampede_hits_total",
        "tower_stampede_request_duration_seconds",
        "tower_stampede_fill_duration_seconds",
        "tower_stampede_lock_wait_seconds",
        "tower_stampede_l1_entries",
        "tower_stampede_l1_bytes",
        "tower_stampede_fills_in_flight",
        "tower_stampede_waiters",
    ] {
        assert!(families.contains(name), "no {name} in:\n{page}");
    }
    for name in &families {
        assert!(
            page.lines()
                .any(|l| l.starts_with(&format!("# HELP {name} "))),
            "no # HELP for {name} in:\n{page}"
        );
        assert!(
            page.lines()
                .any(|l| l.starts_with(&format!("# TYPE {name} "))),
            "no # TYPE for {name} in:\n{page}"
        );
        assert!(
            page.lines()
                .filter(|l| l.starts_with(name))
                .all(|l| l.contains(r#"cache="tower-stampede""#)),
            "a {name} series without the cache label in:\n{page}"
        );
    }
    assert!(
        page.contains("# TYPE tower_stampede_request_duration_seconds histogram"),
        "{page}"
    );
    let hits = value(
        &page,
        r#"tower_stampede_request_duration_seconds_count{cache="tower-stampede",outcome="hit"}"#,
    );
    let misses = value(
        &page,
        r#"tower_stampede_request_duration_seconds_count{cache="tower-stampede",outcome="miss"}"#,
    );
    assert_eq!((hits, misses), (Some(3.0), Some(3.0)), "{page}");
    let all_hits_bucket = value(
        &page,
        r#"tower_stampede_request_duration_seconds_bucket{cache="tower-stampede",outcome="hit",le="+Inf"}"#,
    );
    assert_eq!(all_hits_bucket, Some(3.0), "{page}");
    assert!(
        page.lines().any(
            |l| l.starts_with("tower_stampede_request_duration_seconds_bucket{")
                && l.contains(r#"le="0.001""#)
        ),
        "{page}"
    );
    let fills = value(
        &page,
        r#"tower_stampede_fill_duration_seconds_count{cache="tower-stampede"}"#,
    );
    assert_eq!(fills, Some(3.0), "{page}");

    // The L1 gauges: the three entries stored, and their weight.
    let entries = value(
        &page,
        r#"tower_stampede_l1_entries{cache="tower-stampede"}"#,
    );
    assert_eq!(entries, Some(3.0), "{page}");
    let bytes = value(&page, r#"tower_stampede_l1_bytes{cache="tower-stampede"}"#)
        .unwrap_or_else(|| panic!("no l1_bytes in:\n{page}"));
    assert!(bytes > 0.0, "{page}");
}
