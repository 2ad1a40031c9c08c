//! Runs each example binary end to end and checks what it printed or served.
//!
//! The binaries are the ones cargo builds next to this test: `cargo test` builds every
//! example before running the tests; after `cargo test --test examples` alone they may be
//! missing or stale, so run `cargo build --examples` first.

mod support;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::RedisServer;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

/// A safety net against a hung example, not a timing assertion.
const LIMIT: Duration = Duration::from_secs(180);

/// `<target>/<profile>/examples/<name>`, next to this test's `deps` directory.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test binary lives in <target>/<profile>/deps");
    let path = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} does not exist: run `cargo build --examples` first (`cargo test` builds them, \
         `cargo test --test examples` alone does not)",
        path.display()
    );
    path
}

/// One heavy example at a time: each fires thousands of concurrent requests, and they
/// should not starve each other of CPU.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs an example to completion with `REDIS_URL` set; returns its stdout.
async fn run_with_redis(name: &str, redis: &RedisServer) -> String {
    let _one_at_a_time = HEAVY.lock().await;
    let output = Command::new(example(name))
        .env("REDIS_URL", redis.url())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(LIMIT, output)
        .await
        .unwrap_or_else(|_| panic!("{name} did not finish within {LIMIT:?}"))
        .unwrap_or_else(|e| panic!("could not run {name}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{name} failed ({}); stdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{stdout}");
    stdout
}

/// The cells after `label` on each line that starts with it (then whitespace), in order.
fn rows(output: &str, label: &str) -> Vec<Vec<String>> {
    output
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix(label))
        .filter(|rest| rest.starts_with(char::is_whitespace))
        .map(|rest| rest.split_whitespace().map(str::to_owned).collect())
        .collect()
}

#[tokio::test]
async fn demo_makes_one_upstream_call_per_cold_key() {
    let redis = RedisServer::start();
    let out = run_with_redis("demo", &redis).await;

    assert!(
        out.contains("(REDIS_URL)"),
        "the demo used REDIS_URL:\n{out}"
    );
    // Columns: upstream calls, p50, p99, errors; scenario 1 then scenario 2.
    let without = rows(&out, "without layer");
    let with = rows(&out, "with layer");
    assert_eq!(without.len(), 2, "two scenarios:\n{out}");
    assert_eq!(with.len(), 2, "two scenarios:\n{out}");
    assert_eq!(without[0][0], "300", "{out}");
    assert_eq!(without[1][0], "3000", "{out}");
    assert_eq!(
        with[0][0], "1",
        "one cold key, one upstream call for the fleet:\n{out}"
    );
    assert_eq!(
        with[1][0], "100",
        "100 cold keys, 100 upstream calls:\n{out}"
    );
    for row in without.iter().chain(&with) {
        assert_eq!(
            row.last().map(String::as_str),
            Some("0"),
            "no errors:\n{out}"
        );
    }
    assert!(
        out.contains("total: 3300 upstream calls without the layer, 101 with it"),
        "{out}"
    );
}

#[tokio::test]
async fn rate_limited_api_sees_ten_calls_and_no_429() {
    let redis = RedisServer::start();
    let out = run_with_redis("rate_limited_api", &redis).await;

    assert!(
        out.contains("(REDIS_URL)"),
        "the example used REDIS_URL:\n{out}"
    );
    // Columns: without layer, with layer, with Cache<V>.
    let cells = |label: &str| {
        let found = rows(&out, label);
        assert_eq!(found.len(), 1, "one `{label}` row:\n{out}");
        let row = &found[0];
        let n = |s: &String| {
            s.parse::<usize>()
                .unwrap_or_else(|_| panic!("a count in `{label}`:\n{out}"))
        };
        (n(&row[0]), n(&row[1]), n(&row[2]))
    };
    assert_eq!(cells("API calls made"), (1000, 10, 10), "{out}");
    let (without, with, cached) = cells("429s seen by clients");
    assert!(without > 0, "without the layer the API rate limits:\n{out}");
    assert_eq!(
        (with, cached),
        (0, 0),
        "with the layer or the cache no 429s:\n{out}"
    );
    let (_, with, cached) = cells("lookups answered 200");
    assert_eq!((with, cached), (1000, 1000), "{out}");
    assert_eq!(cells("other failures"), (0, 0, 0), "{out}");
}

#[tokio::test]
async fn axum_example_serves_the_second_report_from_the_cache() {
    let mut child = Command::new(example("axum"))
        .args(["--listen", "127.0.0.1:0"])
        .env_remove("REDIS_URL")
        .env_remove("PORT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run the axum example");

    // Keep its logs, for the failure messages, and keep the pipe drained.
    let logs = Arc::new(Mutex::new(String::new()));
    let mut stderr = child.stderr.take().expect("piped stderr");
    let sink = logs.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stderr.read(&mut buf).await {
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });

    // It prints `listening on ADDR` once bound.
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    let addr = tokio::time::timeout(LIMIT, async {
        while let Some(line) = stdout.next_line().await.expect("read stdout") {
            if let Some(addr) = line.strip_prefix("listening on ") {
                return Some(addr.trim().to_owned());
            }
        }
        None
    })
    .await
    .expect("the example printed its address in time")
    .unwrap_or_else(|| {
        panic!(
            "the example exited before listening; stderr:\n{}",
            logs.lock().unwrap()
        )
    });
    tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });

    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let get = |path: &str| {
        let req = Request::get(format!("http://{addr}{path}"))
            .body(Empty::new())
            .unwrap();
        let client = client.clone();
        async move {
            let res = client.request(req).await.expect("the example answers");
            let status = res.status();
            let cache_status = res
                .headers()
                .get("cache-status")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            let body = res.into_body().collect().await.expect("a body").to_bytes();
            (
                status,
                cache_status,
                String::from_utf8(body.to_vec()).expect("utf-8"),
            )
        }
    };

    let (status, first_cs, first) = get("/report/1").await;
    assert_eq!(status, 200, "{first}");
    assert!(
        first_cs.contains("stored"),
        "the first call fills the cache: {first_cs:?}"
    );
    let (status, second_cs, second) = get("/report/1").await;
    assert_eq!(status, 200, "{second}");
    assert!(
        second_cs.contains("hit"),
        "the second call is a hit: {second_cs:?}"
    );
    assert_eq!(second, first, "the same body");
    assert!(first.contains("\"generated_by_query\":1"), "{first}");

    let (_, _, stats) = get("/stats").await;
    assert!(stats.contains("\"report_handler_calls\": 1"), "{stats}");
    assert!(stats.contains("\"hits_memory\": 1"), "{stats}");

    child.kill().await.expect("kill the example");
}
