//! Cache poisoning through unkeyed inputs: a request header or body that is not part of
//! the key must never shape an answer that other clients are served.
//!
//! The layer: a `GET`/`HEAD` with a body goes straight to the inner service. The proxy
//! (`examples/proxy.rs`, run as child processes on real sockets, two of them sharing a
//! real `redis-server`, in front of an upstream that reflects everything it receives):
//! forwarding headers are built from the connection, the client's `Host` is used only
//! with `--key-host`, rewrite and method override headers are dropped, and headers named
//! by `--forward-header` are forwarded and keyed.

mod support;

#[path = "support/proxy_process.rs"]
mod proxy_process;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use proxy_process::Proxy;
use support::RedisServer;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::{Layer, ServiceExt};
use tower_stampede::{Backend, StampedeLayer};

// ---------------------------------------------------------------------------------------
// The reflecting upstream
// ---------------------------------------------------------------------------------------

/// A hyper server on 127.0.0.1:0 whose body reflects what it received: `method: M`,
/// `body-length: N`, then every request header as `name: value`, one a line. Answers are
/// storable (`200`, no `Cache-Control`); paths under `/vary-tenant` add `Vary: X-Tenant`.
/// It counts requests per path.
struct Reflector {
    addr: SocketAddr,
    counts: Arc<Mutex<HashMap<String, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Reflector {
    async fn start() -> Reflector {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counts = Arc::new(Mutex::new(HashMap::new()));
        let c = counts.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let counts = c.clone();
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    reflect(req, counts.clone())
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Reflector { addr, counts, task }
    }

    fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn count(&self, path: &str) -> usize {
        self.counts.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

impl Drop for Reflector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn reflect(
    req: Request<Incoming>,
    counts: Arc<Mutex<HashMap<String, usize>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    *counts.lock().unwrap().entry(path.clone()).or_insert(0) += 1;
    let (parts, body) = req.into_parts();
    let received = match body.collect().await {
        Ok(b) => b.to_bytes().len().to_string(),
        Err(e) => format!("error {e}"),
    };
    let mut text = format!("method: {}\nbody-length: {received}\n", parts.method);
    for (name, value) in &parts.headers {
        text.push_str(&format!(
            "{name}: {}\n",
            String::from_utf8_lossy(value.as_bytes())
        ));
    }
    let mut res = Response::new(Full::new(Bytes::from(text)));
    if path.starts_with("/vary-tenant") {
        res.headers_mut()
            .insert("vary", http::HeaderValue::from_static("X-Tenant"));
    }
    Ok(res)
}

// ---------------------------------------------------------------------------------------
// The test client
// ---------------------------------------------------------------------------------------

type TestClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .build_http()
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn cache_status(&self) -> &str {
        self.headers
            .get("cache-status")
            .map_or("", |v| v.to_str().unwrap())
    }

    /// The values of a header the upstream received, from the reflected body.
    fn seen(&self, name: &str) -> Vec<&str> {
        self.body
            .lines()
            .filter_map(|l| l.split_once(": "))
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .collect()
    }
}

async fn send(client: &TestClient, req: Request<Full<Bytes>>) -> Answer {
    let res = client.request(req).await.expect("request to the proxy");
    let (parts, body) = res.into_parts();
    let body = body.collect().await.expect("response body").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8(body.to_vec()).expect("utf-8 body"),
    }
}

/// A request with extra headers and no body.
fn request(method: Method, url: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Full::default()).unwrap()
}

async fn get(client: &TestClient, url: &str) -> Answer {
    send(client, request(Method::GET, url, &[])).await
}

/// The forwarding headers the proxy builds from a connection from 127.0.0.1, and no
/// others; `problem` says what is wrong, if anything.
fn forwarding_problem(answer: &Answer) -> Option<String> {
    let wanted = [
        ("x-forwarded-for", "127.0.0.1"),
        ("x-forwarded-proto", "http"),
        ("forwarded", "for=127.0.0.1;proto=http"),
    ];
    for (name, value) in wanted {
        if answer.seen(name) != [value] {
            return Some(format!(
                "upstream saw {name}: {:?}, not [{value:?}]",
                answer.seen(name)
            ));
        }
    }
    for absent in [
        "x-forwarded-host",
        "x-forwarded-scheme",
        "x-forwarded-port",
        "x-host",
    ] {
        if !answer.seen(absent).is_empty() {
            return Some(format!("upstream saw {absent}: {:?}", answer.seen(absent)));
        }
    }
    None
}

// ---------------------------------------------------------------------------------------
// The layer
// ---------------------------------------------------------------------------------------

/// Polls `cond` until it holds, for at most 10 s.
async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_a_get_with_a_body_goes_straight_to_the_inner_service() {
    let redis = RedisServer::start();
    let calls = Arc::new(AtomicUsize::new(0));
    // The first call waits here until the test lets it answer.
    let gate = Arc::new(Semaphore::new(0));
    let inner = {
        let (calls, gate) = (calls.clone(), gate.clone());
        tower::service_fn(move |req: Request<Full<Bytes>>| {
            let (calls, gate) = (calls.clone(), gate.clone());
            async move {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                if n == 1 {
                    gate.acquire().await.unwrap().forget();
                }
                let len = req.into_body().collect().await.unwrap().to_bytes().len();
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                    "body-length: {len} #{n}"
                )))))
            }
        })
    };
    let layer = StampedeLayer::builder()
        .backend(Backend::redis(redis.url()).unwrap())
        .build();
    let svc = layer.layer(inner);
    let with_body = |headers: &[(&str, &str)], body: &'static str| {
        let mut builder = Request::get("http://test/p");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    };

    // A plain GET leads the flight and waits in the inner service.
    let plain = tokio::spawn(svc.clone().oneshot(support::get("/p")));
    wait_until("the plain GET reaches the inner service", || {
        calls.load(Ordering::SeqCst) == 1
    })
    .await;

    // A GET with a body for the same key does not join that flight: it has its own call.
    let joined = tokio::spawn(
        svc.clone()
            .oneshot(with_body(&[("content-length", "4")], "evil")),
    );
    wait_until(
        "the GET with a body calls the inner service instead of joining the flight",
        || calls.load(Ordering::SeqCst) == 2,
    )
    .await;
    let res = joined.await.unwrap().unwrap();
    assert_eq!(
        support::cache_status(&res),
        "tower-stampede; fwd=bypass; detail=request-body"
    );
    assert_eq!(support::text(res).await, "body-length: 4 #2");

    gate.add_permits(1);
    let res = plain.await.unwrap().unwrap();
    assert_eq!(
        support::cache_status(&res),
        "tower-stampede; fwd=miss; stored"
    );
    assert_eq!(support::text(res).await, "body-length: 0 #1");

    // Once the entry exists, a body still goes to the inner service, and never replaces it.
    for (headers, body, n) in [
        (&[("content-length", "4")][..], "evil", 3),
        (&[("transfer-encoding", "chunked")][..], "evil", 4),
    ] {
        let res = svc.clone().oneshot(with_body(headers, body)).await.unwrap();
        assert_eq!(
            support::cache_status(&res),
            "tower-stampede; fwd=bypass; detail=request-body",
            "{headers:?}"
        );
        assert_eq!(support::text(res).await, format!("body-length: 4 #{n}"));
    }
    let res = svc.clone().oneshot(support::get("/p")).await.unwrap();
    assert_eq!(
        support::cache_status(&res),
        "tower-stampede; hit; detail=memory"
    );
    assert_eq!(support::text(res).await, "body-length: 0 #1");
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    // An empty body is no body.
    let res = svc
        .clone()
        .oneshot(with_body(&[("content-length", "0")], ""))
        .await
        .unwrap();
    assert_eq!(
        support::cache_status(&res),
        "tower-stampede; hit; detail=memory"
    );
}

// ---------------------------------------------------------------------------------------
// The proxy
// ---------------------------------------------------------------------------------------

/// One poisoning attempt: a request to proxy A that carries an unkeyed input, and the
/// text that must never reach another client if it was cached.
struct Vector {
    name: &'static str,
    method: Method,
    headers: &'static [(&'static str, &'static str)],
    body: &'static str,
    marker: &'static str,
}

const fn header(name: &'static str, headers: &'static [(&'static str, &'static str)]) -> Vector {
    Vector {
        name,
        method: Method::GET,
        headers,
        body: "",
        marker: "evil",
    }
}

const VECTORS: &[Vector] = &[
    header("x-forwarded-host", &[("x-forwarded-host", "evil.example")]),
    header("x-forwarded-scheme", &[("x-forwarded-scheme", "evil")]),
    header("x-forwarded-port", &[("x-forwarded-port", "6666evil")]),
    header("x-forwarded-proto", &[("x-forwarded-proto", "evil")]),
    header("x-forwarded-prefix", &[("x-forwarded-prefix", "/evil")]),
    header("x-forwarded-server", &[("x-forwarded-server", "evil")]),
    header("x-forwarded-for", &[("x-forwarded-for", "6.6.6.6, evil")]),
    header(
        "forwarded",
        &[("forwarded", "for=evil;host=evil.example;proto=https")],
    ),
    header("x-real-ip", &[("x-real-ip", "evil")]),
    header("x-host", &[("x-host", "evil.example")]),
    header("x-original-url", &[("x-original-url", "/evil")]),
    header("x-rewrite-url", &[("x-rewrite-url", "/evil")]),
    header(
        "x-http-method-override",
        &[("x-http-method-override", "evil")],
    ),
    header("x-http-method", &[("x-http-method", "evil")]),
    header("x-method-override", &[("x-method-override", "evil")]),
    header("host", &[("host", "evil.example")]),
    Vector {
        name: "head-x-forwarded-host",
        method: Method::HEAD,
        headers: &[("x-forwarded-host", "evil.example")],
        body: "",
        marker: "evil",
    },
    Vector {
        name: "get-with-body",
        method: Method::GET,
        headers: &[("content-length", "13")],
        body: "evil-body-13b",
        marker: "body-length: 13",
    },
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unkeyed_inputs_never_reach_other_clients_on_any_node() {
    let redis = RedisServer::start();
    let upstream = Reflector::start().await;
    // The upstream sends no freshness: `--ttl` gives it one (the default, 0, stores nothing).
    let args = [
        "--redis",
        &redis.url(),
        "--redis-timeout",
        "2s",
        "--ttl",
        "60s",
    ];
    let a = Proxy::start(&upstream.base(), &args);
    let b = Proxy::start(&upstream.base(), &args);
    let client = client();

    // Every vector runs, and all failures are listed together.
    let mut failures = Vec::new();
    for (i, v) in VECTORS.iter().enumerate() {
        let path = format!("/v/{}", v.name);
        let mut req = request(v.method.clone(), &a.url(&path), v.headers);
        *req.body_mut() = Full::new(Bytes::from_static(v.body.as_bytes()));
        let poison = send(&client, req).await;
        assert_eq!(poison.status, StatusCode::OK, "{}", v.name);
        if v.body.is_empty() {
            // What the upstream received on behalf of everyone.
            if poison.body.contains(v.marker) {
                failures.push(format!("{}: the upstream saw it:\n{}", v.name, poison.body));
            }
        } else if poison.cache_status() != "tower-stampede; fwd=bypass; detail=request-body" {
            failures.push(format!(
                "{}: a request with a body was {}",
                v.name,
                poison.cache_status()
            ));
        }

        let on_a = get(&client, &a.url(&path)).await;
        // The plain GET fills the entry if the attempt did not: one value per vector.
        redis.wait_for_keys("stampede:*:v", i + 1).await;
        let on_b = get(&client, &b.url(&path)).await;
        for (node, answer) in [("A", &on_a), ("B", &on_b)] {
            assert_eq!(answer.status, StatusCode::OK, "{} on {node}", v.name);
            if answer.body.contains(v.marker) {
                failures.push(format!(
                    "{}: a plain GET on {node} got it ({}):\n{}",
                    v.name,
                    answer.cache_status(),
                    answer.body
                ));
            }
            if let Some(problem) = forwarding_problem(answer) {
                failures.push(format!("{}: on {node}, {problem}", v.name));
            }
        }
        if on_b.cache_status() != "tower-stampede; hit; detail=redis" {
            failures.push(format!(
                "{}: B did not read A's entry: {}",
                v.name,
                on_b.cache_status()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_proxies_keep_the_client_chain_and_others_do_not() {
    let upstream = Reflector::start().await;
    let trusting = Proxy::start(&upstream.base(), &["--trusted-proxies", "127.0.0.1/32"]);
    let elsewhere = Proxy::start(&upstream.base(), &["--trusted-proxies", "10.0.0.0/8,::1"]);
    let client = client();
    let chain = [
        ("x-forwarded-for", "203.0.113.7"),
        ("forwarded", "for=203.0.113.7;proto=https"),
    ];

    let kept = send(
        &client,
        request(Method::GET, &trusting.url("/t/chain"), &chain),
    )
    .await;
    assert_eq!(kept.seen("x-forwarded-for"), ["203.0.113.7, 127.0.0.1"]);
    assert_eq!(
        kept.seen("forwarded"),
        ["for=203.0.113.7;proto=https, for=127.0.0.1;proto=http"]
    );
    assert_eq!(kept.seen("x-forwarded-proto"), ["http"]);

    let replaced = send(
        &client,
        request(Method::GET, &elsewhere.url("/t/chain"), &chain),
    )
    .await;
    assert_eq!(forwarding_problem(&replaced), None, "{}", replaced.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_host_keys_per_host_and_sends_x_forwarded_host() {
    let redis = RedisServer::start();
    let upstream = Reflector::start().await;
    let args = [
        "--redis",
        &redis.url(),
        "--redis-timeout",
        "2s",
        "--key-host",
        "--ttl",
        "60s",
    ];
    let a = Proxy::start(&upstream.base(), &args);
    let b = Proxy::start(&upstream.base(), &args);
    let client = client();
    let as_host = |proxy: &Proxy, host: &'static str| {
        request(Method::GET, &proxy.url("/h/page"), &[("host", host)])
    };

    let first = send(&client, as_host(&a, "a.example")).await;
    assert_eq!(first.cache_status(), "tower-stampede; fwd=miss; stored");
    assert_eq!(first.seen("x-forwarded-host"), ["a.example"]);
    let other = send(&client, as_host(&a, "b.example")).await;
    assert_eq!(
        other.cache_status(),
        "tower-stampede; fwd=miss; stored",
        "another host is another entry"
    );
    assert_eq!(other.seen("x-forwarded-host"), ["b.example"]);
    // The client's forwarding header is dropped, the one the proxy builds sent.
    let spoofed = send(
        &client,
        request(
            Method::GET,
            &a.url("/h/spoof"),
            &[("host", "c.example"), ("x-forwarded-host", "evil.example")],
        ),
    )
    .await;
    assert_eq!(spoofed.seen("x-forwarded-host"), ["c.example"]);
    assert_eq!(upstream.count("/h/page"), 2);

    redis.wait_for_keys("stampede:*:v", 3).await;
    let from_b = send(&client, as_host(&b, "a.example")).await;
    assert_eq!(from_b.cache_status(), "tower-stampede; hit; detail=redis");
    assert_eq!(from_b.seen("x-forwarded-host"), ["a.example"]);
    // Host names are case-insensitive: one entry.
    let upper = send(&client, as_host(&b, "B.EXAMPLE")).await;
    assert_eq!(upper.cache_status(), "tower-stampede; hit; detail=redis");
    assert_eq!(upper.seen("x-forwarded-host"), ["b.example"]);
    assert_eq!(upstream.count("/h/page"), 2);
    assert_eq!(
        forwarding_problem_but_host(&from_b),
        None,
        "{}",
        from_b.body
    );
    assert_eq!(
        from_b.seen("host"),
        [upstream.addr.to_string().as_str()],
        "the upstream's own Host"
    );
}

/// [`forwarding_problem`] for a proxy that sends `X-Forwarded-Host`.
fn forwarding_problem_but_host(answer: &Answer) -> Option<String> {
    let body = answer
        .body
        .lines()
        .filter(|l| !l.starts_with("x-forwarded-host: "))
        .map(|l| format!("{l}\n"))
        .collect();
    forwarding_problem(&Answer {
        status: answer.status,
        headers: answer.headers.clone(),
        body,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_header_forwards_and_keys_the_header() {
    let upstream = Reflector::start().await;
    let proxy = Proxy::start(
        &upstream.base(),
        &[
            "--ttl",
            "60s",
            "--forward-header",
            "X-Tenant,X-Forwarded-Prefix",
            "--forward-header",
            "x-original-url",
        ],
    );
    let client = client();
    let as_tenant = |path: &str, tenant: &'static str| {
        request(Method::GET, &proxy.url(path), &[("x-tenant", tenant)])
    };

    for path in ["/tenant", "/vary-tenant"] {
        let one = send(&client, as_tenant(path, "t1")).await;
        assert_eq!(
            one.cache_status(),
            "tower-stampede; fwd=miss; stored",
            "{path}"
        );
        assert_eq!(one.seen("x-tenant"), ["t1"]);
        let two = send(&client, as_tenant(path, "t2")).await;
        assert_eq!(
            two.cache_status(),
            "tower-stampede; fwd=miss; stored",
            "{path}"
        );
        assert_eq!(two.seen("x-tenant"), ["t2"]);
        let again = send(&client, as_tenant(path, "t1")).await;
        assert_eq!(
            again.cache_status(),
            "tower-stampede; hit; detail=memory",
            "{path}"
        );
        assert_eq!(again.seen("x-tenant"), ["t1"]);
        assert_eq!(upstream.count(path), 2, "{path}: one entry per tenant");
        assert_eq!(forwarding_problem(&again), None, "{}", again.body);
    }

    // The operator's choice wins over the dropped lists, keyed all the same.
    for header in ["x-forwarded-prefix", "x-original-url"] {
        let path = format!("/op/{header}");
        let with =
            |value: &'static str| request(Method::GET, &proxy.url(&path), &[(header, value)]);
        let first = send(&client, with("/one")).await;
        assert_eq!(first.seen(header), ["/one"]);
        let second = send(&client, with("/two")).await;
        assert_eq!(second.seen(header), ["/two"]);
        assert_eq!(second.cache_status(), "tower-stampede; fwd=miss; stored");
        assert_eq!(
            get(&client, &proxy.url(&path)).await.seen(header),
            Vec::<&str>::new()
        );
        assert_eq!(upstream.count(&path), 3);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_get_with_a_body_and_no_content_length_is_not_cached() {
    use http_body_util::combinators::BoxBody;
    use http_body_util::StreamBody;

    let upstream = Reflector::start().await;
    // The upstream sends no freshness: `--ttl` gives it one (the default, 0, stores nothing).
    let proxy = Proxy::start(&upstream.base(), &["--ttl", "60s"]);
    let h2: Client<HttpConnector, BoxBody<Bytes, Infallible>> =
        Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
    // A streamed body has no known length: HTTP/2 sends it without `Content-Length`.
    let frames = futures_util::stream::iter([Ok::<_, Infallible>(http_body::Frame::data(
        Bytes::from_static(b"evil"),
    ))]);
    let req = Request::get(proxy.url("/h2/body"))
        .body(StreamBody::new(frames).boxed())
        .unwrap();
    assert!(req.headers().get("content-length").is_none());
    let res = h2.request(req).await.expect("HTTP/2 request to the proxy");
    assert_eq!(res.version(), http::Version::HTTP_2);
    let status = res
        .headers()
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        status.as_deref(),
        Some("tower-stampede; fwd=bypass; detail=key")
    );
    assert!(
        String::from_utf8_lossy(&body).contains("body-length: 4\n"),
        "the body went upstream: {body:?}"
    );

    let plain = get(&client(), &proxy.url("/h2/body")).await;
    assert_eq!(plain.cache_status(), "tower-stampede; fwd=miss; stored");
    assert_eq!(plain.seen("body-length"), ["0"]);
}
