//! The layer stacked with tower-http's `CompressionLayer`, both ways round, on an axum
//! route answering a compressible body (local backend: what is measured is this node's
//! memory). Clients ask with `Accept-Encoding: gzip`, `br`, a browser's list, and none.
//!
//! * Compression outside the cache (`CompressionLayer` wrapping `StampedeLayer`): the
//!   cache stores the handler's uncompressed answer, and every answer, hits included, is
//!   compressed on its way out. The key holds the normalized `Accept-Encoding` (default
//!   on), so the same uncompressed bytes are stored once per coding (`br`, `gzip`,
//!   none); with `key_accept_encoding(false)` once in all.
//! * Compression inside the cache (`StampedeLayer` wrapping `CompressionLayer`): the cache
//!   stores compressed bytes, one entry per coding, and a hit is served as stored.
//!
//! Run with `--nocapture` to see the figures each stack ends with.

use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Body;
use http::{header, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_http::compression::CompressionLayer;
use tower_stampede::{Memory, StampedeLayer, Stats};

/// What the clients send, in order: each twice (a miss or a hit, then a hit). The
/// browser's list normalizes to `br`, so it shares the `br` entry.
const CLIENTS: [Option<&str>; 4] = [Some("gzip"), Some("br"), Some("gzip, deflate, br"), None];

/// The coding each client gets back (`None`: identity).
fn expected_coding(accept: Option<&str>) -> Option<&'static str> {
    match accept {
        Some("gzip") => Some("gzip"),
        Some(_) => Some("br"),
        None => None,
    }
}

/// A JSON report of 64 users, about 4.6 KiB: repetitive, as such answers are.
fn report() -> String {
    let users: Vec<String> = (0..64)
        .map(|i| {
            format!(r#"{{"id":{i},"name":"user {i}","email":"user{i}@example.com","active":true}}"#)
        })
        .collect();
    format!("[{}]", users.join(","))
}

/// The route: `GET /report`, counted.
fn app(calls: Arc<AtomicUsize>) -> axum::Router {
    axum::Router::new().route(
        "/report",
        axum::routing::get(move || {
            calls.fetch_add(1, Ordering::SeqCst);
            async move { ([(header::CONTENT_TYPE, "application/json")], report()) }
        }),
    )
}

/// One answer as the client saw it.
struct Answer {
    coding: Option<String>,
    cache_status: String,
    /// Bytes on the wire.
    wire: usize,
    /// The body after undoing `coding`.
    decoded: String,
}

async fn fetch<S, B>(svc: &mut S, accept: Option<&str>) -> Answer
where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let mut req = Request::get("http://app.test/report");
    if let Some(accept) = accept {
        req = req.header(header::ACCEPT_ENCODING, accept);
    }
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let header = |name| {
        res.headers()
            .get(name)
            .map(|v: &http::HeaderValue| v.to_str().unwrap().to_owned())
    };
    let coding = header(header::CONTENT_ENCODING);
    let cache_status = header(http::HeaderName::from_static("cache-status")).unwrap_or_default();
    let wire = res.into_body().collect().await.unwrap().to_bytes();
    let mut decoded = Vec::new();
    match coding.as_deref() {
        None => decoded.extend_from_slice(&wire),
        Some("gzip") => {
            flate2::read::GzDecoder::new(&wire[..])
                .read_to_end(&mut decoded)
                .unwrap();
        }
        Some("br") => {
            brotli::Decompressor::new(&wire[..], 4096)
                .read_to_end(&mut decoded)
                .unwrap();
        }
        Some(other) => panic!("unexpected Content-Encoding {other}"),
    }
    Answer {
        coding,
        cache_status,
        wire: wire.len(),
        decoded: String::from_utf8(decoded).unwrap(),
    }
}

/// What a stack ended with after every client asked twice.
struct Outcome {
    memory: Memory,
    stats: Stats,
    handler_calls: usize,
    answers: Vec<(Option<&'static str>, Answer)>,
}

async fn drive<S, B>(mut svc: S, layer: &StampedeLayer, calls: &AtomicUsize) -> Outcome
where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let mut answers = Vec::new();
    for accept in CLIENTS {
        for _ in 0..2 {
            let answer = fetch(&mut svc, accept).await;
            assert_eq!(answer.decoded, report(), "{accept:?}");
            assert_eq!(
                answer.coding.as_deref(),
                expected_coding(accept),
                "{accept:?}"
            );
            answers.push((accept, answer));
        }
    }
    Outcome {
        memory: layer.memory().await,
        stats: layer.stats(),
        handler_calls: calls.load(Ordering::SeqCst),
        answers,
    }
}

fn show(name: &str, outcome: &Outcome) {
    let m = &outcome.memory;
    println!(
        "{name}: l1_entries={} l1_bytes={} marker_entries={} upstream_calls={} handler_calls={} stored={} hits={}",
        m.l1_entries,
        m.l1_bytes,
        m.marker_entries,
        outcome.stats.upstream_calls,
        outcome.handler_calls,
        outcome.stats.stored,
        outcome.stats.hits_memory,
    );
    for (accept, answer) in &outcome.answers {
        println!(
            "  accept-encoding {:<20} -> {:<5} {:>5} bytes  {}",
            accept.unwrap_or("(none)"),
            answer.coding.as_deref().unwrap_or("-"),
            answer.wire,
            answer.cache_status,
        );
    }
}

/// Compression outside: the cache holds the uncompressed answer, once per normalized
/// coding by default, once in all with `key_accept_encoding(false)`; hits are compressed
/// again on every request.
async fn compression_outside(key_accept_encoding: bool) -> Outcome {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = StampedeLayer::builder()
        .key_accept_encoding(key_accept_encoding)
        .build();
    let svc = ServiceBuilder::new()
        .layer(CompressionLayer::new())
        .layer(layer.clone())
        .service(app(calls.clone()));
    drive(svc, &layer, &calls).await
}

/// Compression inside: the cache holds compressed bytes, one entry per coding.
async fn compression_inside(key_accept_encoding: bool) -> Outcome {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = StampedeLayer::builder()
        .key_accept_encoding(key_accept_encoding)
        .build();
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .layer(CompressionLayer::new())
        .service(app(calls.clone()));
    drive(svc, &layer, &calls).await
}

#[tokio::test]
async fn compression_outside_stores_uncompressed_and_compresses_every_hit() {
    let body = report().len() as u64;
    assert!(body >= 2048, "a body worth compressing: {body} bytes");

    let keyed = compression_outside(true).await;
    show("outside, key_accept_encoding(true)", &keyed);
    // One entry per normalized coding (br, gzip, none), each holding the whole body.
    assert_eq!(keyed.memory.l1_entries, 3);
    assert_eq!(keyed.stats.upstream_calls, 3);
    assert_eq!(keyed.handler_calls, 3);
    assert!(
        keyed.memory.l1_bytes >= 3 * body,
        "{}",
        keyed.memory.l1_bytes
    );
    // Hits are compressed on the way out: a hit from memory carries a Content-Encoding.
    for (accept, answer) in &keyed.answers {
        if answer.cache_status.contains("hit") && accept.is_some() {
            assert!(
                answer.coding.is_some(),
                "{accept:?} {}",
                answer.cache_status
            );
            assert!((answer.wire as u64) < body);
        }
    }

    let unkeyed = compression_outside(false).await;
    show("outside, key_accept_encoding(false)", &unkeyed);
    // One uncompressed entry serves every coding.
    assert_eq!(unkeyed.memory.l1_entries, 1);
    assert_eq!(unkeyed.stats.upstream_calls, 1);
    assert_eq!(unkeyed.handler_calls, 1);
    assert!(
        unkeyed.memory.l1_bytes >= body,
        "{}",
        unkeyed.memory.l1_bytes
    );
    assert!(
        unkeyed.memory.l1_bytes < 2 * body,
        "{}",
        unkeyed.memory.l1_bytes
    );
}

#[tokio::test]
async fn compression_inside_stores_compressed_bytes_per_coding() {
    let body = report().len() as u64;
    let inside = compression_inside(true).await;
    show("inside, key_accept_encoding(true)", &inside);
    // br (shared by the browser's list), gzip and identity: three entries, three calls.
    assert_eq!(inside.memory.l1_entries, 3);
    assert_eq!(inside.stats.upstream_calls, 3);
    assert_eq!(inside.handler_calls, 3);
    // Two of the three hold compressed bytes: less than three plain bodies, where the
    // same three entries stored outside the compression hold at least that.
    assert!(
        inside.memory.l1_bytes < 3 * body,
        "{}",
        inside.memory.l1_bytes
    );
    let outside = compression_outside(true).await;
    assert!(outside.memory.l1_bytes >= 3 * body);
    // A hit is the stored compressed answer, byte for byte the miss's.
    for accept in CLIENTS {
        let wires: Vec<usize> = inside
            .answers
            .iter()
            .filter(|(a, _)| expected_coding(*a) == expected_coding(accept))
            .map(|(_, answer)| answer.wire)
            .collect();
        assert!(
            wires.windows(2).all(|w| w[0] == w[1]),
            "{accept:?}: {wires:?}"
        );
    }

    // Not keyed on Accept-Encoding, the compressed answer (`Vary: accept-encoding`) cannot
    // be shared between codings: it is not stored, and the hit-for-pass marker sends every
    // later request straight to the handler.
    let unkeyed = compression_inside(false).await;
    show("inside, key_accept_encoding(false)", &unkeyed);
    assert_eq!(unkeyed.memory.l1_entries, 0);
    assert_eq!(unkeyed.stats.uncacheable, 1);
    assert_eq!(unkeyed.stats.hit_for_pass, CLIENTS.len() as u64 * 2 - 1);
    assert_eq!(unkeyed.handler_calls, CLIENTS.len() * 2);
}
