//! The hit path's cost: an L1 hit through the layer against the bare inner service, side by
//! side in one run, plus the envelope and the key hash on their own.
//!
//! `cargo bench --bench layer --features __bench,serde`

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

/// A typical API record, as `Cache<V>` stores it.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Profile {
    id: u64,
    name: String,
    email: String,
    followers: u32,
    verified: bool,
    tags: Vec<String>,
}

/// `Cache<V>`'s default codec (postcard) against JSON: time each way, and the bytes (printed
/// once, as `codec bytes: ...`).
fn codec(c: &mut Criterion) {
    use tower_stampede::cache::{Codec, Postcard};
    let p = Profile {
        id: 1_234_567,
        name: "Ada Lovelace".into(),
        email: "ada@example.com".into(),
        followers: 98_765,
        verified: true,
        tags: vec!["math".into(), "engines".into(), "poetry".into()],
    };
    let post = Bytes::from(<Postcard as Codec<Profile>>::encode(&p).unwrap());
    let json = Bytes::from(serde_json::to_vec(&p).unwrap());
    println!("codec bytes: postcard {}, json {}", post.len(), json.len());
    let mut group = c.benchmark_group("codec");
    group.bench_function("postcard_encode", |b| {
        b.iter(|| black_box(<Postcard as Codec<Profile>>::encode(black_box(&p)).unwrap()))
    });
    group.bench_function("json_encode", |b| {
        b.iter(|| black_box(serde_json::to_vec(black_box(&p)).unwrap()))
    });
    group.bench_function("postcard_decode", |b| {
        b.iter(|| black_box(<Postcard as Codec<Profile>>::decode(black_box(&post)).unwrap()))
    });
    group.bench_function("json_decode", |b| {
        b.iter(|| black_box(serde_json::from_slice::<Profile>(black_box(&json)).unwrap()))
    });
    group.finish();
}

criterion_group!(benches, hit_path, envelope, key, codec);
criterion_main!(benches);
