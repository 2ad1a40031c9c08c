//! The hit path's cost: an L1 hit through the layer against the bare inner service, side by
//! side in one run, plus the envelope and the key hash on their own.
//!
//! `cargo bench --bench layer`

use std::convert::Infallible;
use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::{Request, Response};
use http_body_util::Full;
use tower::{Layer, ServiceExt};
use tower_stampede::__bench::{key_hash, Envelope};
use tower_stampede::StampedeLayer;

fn inner() -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    let body = Bytes::from(vec![b'x'; 2048]);
    tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let body = body.clone();
        async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
    })
}

fn request() -> Request<Full<Bytes>> {
    Request::get("http://api.example.com/users/42?fields=name,email")
        .header("accept", "application/json")
        .header("user-agent", "bench/1.0")
        .body(Full::default())
        .unwrap()
}

fn hit_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let bare = inner();
    let layered = StampedeLayer::new().layer(inner());
    rt.block_on(layered.clone().oneshot(request())).unwrap();

    let mut group = c.benchmark_group("hit_path");
    group.throughput(Throughput::Elements(1));
    group.bench_function("bare_inner_service", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(bare.clone().oneshot(request()).await.unwrap()) })
    });
    group.bench_function("stampede_l1_hit", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(layered.clone().oneshot(request()).await.unwrap()) })
    });
    group.finish();
}

fn envelope(c: &mut Criterion) {
    let key = "GET http://api.example.com/users/42?fields=name,email";
    let mut group = c.benchmark_group("envelope");
    for size in [256usize, 2048, 65536] {
        let sample = Envelope::sample(key, size);
        let bytes = Bytes::from(sample.encode());
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("encode", size), &sample, |b, s| {
            b.iter(|| black_box(s.encode()))
        });
        group.bench_with_input(BenchmarkId::new("decode", size), &bytes, |b, bytes| {
            b.iter(|| assert!(Envelope::decode(black_box(bytes.clone()), key)))
        });
    }
    group.finish();
}

fn key(c: &mut Criterion) {
    let (parts, _) = request().into_parts();
    c.bench_function("key_hash", |b| {
        b.iter(|| black_box(key_hash(black_box(&parts))))
    });
}

criterion_group!(benches, hit_path, envelope, key);
criterion_main!(benches);
