//! The in-process bound against the heap it stands for: a counting allocator measures what
//! the cache really holds (every allocation rounded as glibc's malloc rounds it), and the
//! tests check that `memory()` charges at least that, and that a flood of distinct keys,
//! cacheable or not, keeps the heap within the bound.
//!
//! Heap only: RSS adds the allocator's free lists and the runtime, which
//! `benches/compare.sh memory` measures on a running proxy.

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt};
use tower_stampede::StampedeLayer;

/// What the heap holds, in bytes of malloc chunks: glibc rounds a request up to 16 bytes
/// with 8 of its own, 32 at least.
static LIVE: AtomicI64 = AtomicI64::new(0);

fn chunk(size: usize) -> i64 {
    ((size + 8).div_ceil(16) * 16).max(32) as i64
}

struct Counting;

// SAFETY: every call goes to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(chunk(layout.size()), Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(chunk(layout.size()), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(chunk(layout.size()), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(chunk(new_size) - chunk(layout.size()), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// One measurement at a time: the counter is the whole process's.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn live() -> i64 {
    LIVE.load(Ordering::Relaxed)
}

/// What the upstream's answers say of caching.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Fresh for ten minutes.
    Cacheable,
    /// `no-store`: each leaves a hit-for-pass marker.
    NoStore,
    /// Fresh for ten minutes, varying on a request header: each URL stores a vary index, a
    /// variant and a variant list.
    Varying,
}

/// An upstream answering every path with `body_len` bytes and the headers a typical origin
/// sends (`extra` more of them).
fn upstream(
    body_len: usize,
    extra: usize,
    kind: Kind,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |req: Request<Full<Bytes>>| async move {
        let mut body = req.uri().path().as_bytes().to_vec();
        body.resize(body_len, b'.');
        let mut res = Response::new(Full::new(Bytes::from(body)));
        let h = res.headers_mut();
        h.insert(
            "content-type",
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert(
            "cache-control",
            HeaderValue::from_static(if kind == Kind::NoStore {
                "no-store"
            } else {
                "public, max-age=600"
            }),
        );
        if kind == Kind::Varying {
            h.insert("vary", HeaderValue::from_static("x-variant"));
        }
        h.insert("content-length", HeaderValue::from(body_len));
        h.insert(
            "date",
            HeaderValue::from_str(&httpdate::fmt_http_date(std::time::SystemTime::now())).unwrap(),
        );
        for i in 0..extra {
            h.insert(
                http::HeaderName::from_bytes(format!("x-extra-{i}").as_bytes()).unwrap(),
                HeaderValue::from_str(&format!("value number {i}")).unwrap(),
            );
        }
        *res.status_mut() = StatusCode::OK;
        Ok::<_, Infallible>(res)
    })
}

fn layer(capacity: u64) -> StampedeLayer {
    StampedeLayer::builder()
        .l1_capacity(capacity)
        .honor_cache_control(true)
        .ttl(Duration::from_secs(3600))
        .max_body(64 * 1024)
        .hit_for_pass(Duration::from_secs(600))
        .build()
}

/// Sends `n` distinct GETs under `prefix`, 16 at a time, each body read to the end.
async fn flood<S>(svc: S, prefix: &str, n: usize)
where
    S: Service<
            Request<Full<Bytes>>,
            Response = Response<tower_stampede::StampedeBody<Full<Bytes>>>,
        > + Clone
        + Send
        + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
{
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..16 {
        let svc = svc.clone();
        let prefix = prefix.to_owned();
        tasks.spawn(async move {
            for i in (worker..n).step_by(16) {
                let req = Request::get(format!("http://origin.test{prefix}{i}"))
                    .body(Full::default())
                    .unwrap();
                let res = svc.clone().oneshot(req).await.unwrap();
                assert_eq!(res.status(), StatusCode::OK);
                res.into_body().collect().await.unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}

/// Runs `f` on a runtime of its own, dropped (with every task the layer spawned) before
/// the next measurement.
fn on_runtime<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Heap taken per entry (or per hit-for-pass marker, for `no-store` answers) against the
/// weight charged for it, with nothing evicted.
async fn per_entry(body_len: usize, extra: usize, no_store: bool) -> (f64, f64) {
    let n = 4_000;
    let layer = layer(1 << 30);
    let svc = layer.layer(upstream(
        body_len,
        extra,
        if no_store {
            Kind::NoStore
        } else {
            Kind::Cacheable
        },
    ));
    // The runtime's, the layer's and the service's own first allocations.
    flood(svc.clone(), "/warm/", 64).await;
    let warm = layer.memory().await;
    let before = live();
    flood(svc.clone(), "/e/", n).await;
    let memory = layer.memory().await;
    let heap = (live() - before) as f64 / n as f64;
    let (entries, bytes) = if no_store {
        (
            memory.marker_entries - warm.marker_entries,
            memory.marker_bytes - warm.marker_bytes,
        )
    } else {
        (
            memory.l1_entries - warm.l1_entries,
            memory.l1_bytes - warm.l1_bytes,
        )
    };
    assert_eq!(entries, n as u64, "{memory:?}");
    let weight = bytes as f64 / n as f64;
    eprintln!(
        "body {body_len} B, {extra} extra headers{}: heap {heap:.0} B per entry, weight {weight:.0} B",
        if no_store { ", no-store (markers)" } else { "" }
    );
    (heap, weight)
}

#[test]
fn an_entry_weighs_at_least_the_heap_it_takes() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    for (body_len, extra, no_store) in [
        (2048, 0, false),
        (16, 0, false),
        (16, 24, false),
        (20_000, 2, false),
        (16, 0, true),
    ] {
        let (heap, weight) = on_runtime(per_entry(body_len, extra, no_store));
        assert!(
            weight >= heap,
            "body {body_len} B, {extra} extra headers: weight {weight:.0} B < heap {heap:.0} B per entry"
        );
        assert!(
            weight <= heap * 1.25 + 64.0,
            "body {body_len} B, {extra} extra headers: weight {weight:.0} B overcharges heap {heap:.0} B per entry"
        );
    }
}

#[test]
fn a_flood_of_distinct_answers_keeps_the_heap_within_the_bound() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    on_runtime(async {
        let capacity = 4 << 20;
        let layer = layer(capacity);
        let svc = layer.layer(upstream(2048, 0, Kind::Cacheable));
        flood(svc.clone(), "/warm/", 64).await;
        layer.memory().await;
        let before = live();
        // About seven times what the bound holds.
        flood(svc.clone(), "/c/", 10_000).await;
        let memory = layer.memory().await;
        let grew = live() - before;
        eprintln!("10,000 2 KiB answers, bound {capacity}: heap grew {grew} B; {memory:?}");
        assert!(
            memory.l1_entries > 0 && memory.l1_entries < 10_000,
            "{memory:?}"
        );
        assert!(memory.bytes() <= capacity, "{memory:?}");
        assert!(
            grew <= capacity as i64,
            "heap grew {grew} B past the bound {capacity}"
        );
    });
}

#[test]
fn a_flood_of_distinct_uncacheable_urls_keeps_the_heap_within_the_bound() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    on_runtime(async {
        let capacity = 1 << 20;
        let layer = layer(capacity);
        let svc = layer.layer(upstream(64, 0, Kind::NoStore));
        flood(svc.clone(), "/warm/", 64).await;
        layer.memory().await;
        let before = live();
        // Unbounded markers would take several times the bound.
        flood(svc.clone(), "/n/", 40_000).await;
        let memory = layer.memory().await;
        let grew = live() - before;
        eprintln!("40,000 no-store URLs, bound {capacity}: heap grew {grew} B; {memory:?}");
        assert!(memory.marker_entries > 0, "{memory:?}");
        assert!(memory.bytes() <= capacity, "{memory:?}");
        assert!(
            grew <= capacity as i64,
            "heap grew {grew} B past the bound {capacity}"
        );
    });
}

#[test]
fn a_flood_of_distinct_varying_urls_keeps_the_heap_within_the_bound() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    on_runtime(async {
        let capacity = 1 << 20;
        let layer = layer(capacity);
        let svc = layer.layer(upstream(64, 0, Kind::Varying));
        flood(svc.clone(), "/warm/", 64).await;
        layer.memory().await;
        let before = live();
        // Each URL: a vary index, a variant and the URL's variant list.
        flood(svc.clone(), "/v/", 20_000).await;
        let memory = layer.memory().await;
        let grew = live() - before;
        eprintln!("20,000 varying URLs, bound {capacity}: heap grew {grew} B; {memory:?}");
        assert!(
            memory.l1_entries > 0 && memory.marker_entries > 0,
            "{memory:?}"
        );
        assert!(memory.bytes() <= capacity, "{memory:?}");
        assert!(
            grew <= capacity as i64,
            "heap grew {grew} B past the bound {capacity}"
        );
    });
}
