//! `PURGE` through the caching proxy (`examples/proxy.rs`) as real processes: by URL and
//! by `Surrogate-Key`, fleet-wide, from an allowed peer only.
//!
//! `cargo test --test purge_proxy` does not rebuild the example: run
//! `cargo build --examples --all-features` first.

mod support;

#[path = "support/origin.rs"]
mod origin;
#[path = "support/proxy_process.rs"]
mod proxy_process;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Empty;
use origin::{client, seen, Origin, Reply, Seen};
use proxy_process::Proxy;
use support::RedisServer;

async fn send(proxy: &Proxy, method: &str, path: &str, headers: &[(&str, &str)]) -> Seen {
    let mut b = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(proxy.url(path));
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    let res = client()
        .request(b.body(Empty::<Bytes>::new()).unwrap())
        .await
        .expect("the proxy answers");
    seen(res).await
}

/// Polls until `path` on `proxy` is answered by the origin again (bounded).
async fn until_refetched(proxy: &Proxy, path: &str, body: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if send(proxy, "GET", path, &[]).await.text() == body {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{path} never refetched as {body}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_by_url_and_by_surrogate_key_from_loopback_across_two_proxies() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    origin.route("/page", |_, n| {
        Reply::ok(format!("page #{n}")).header("cache-control", "max-age=600")
    });
    for path in ["/a", "/b"] {
        origin.route(path, move |_, n| {
            Reply::ok(format!("{path} #{n}"))
                .header("cache-control", "max-age=600")
                .header("surrogate-key", "product-7 catalog")
        });
    }
    let args = ["--redis", &redis.url()];
    let (a, b) = (
        Proxy::start(&origin.base(), &args),
        Proxy::start(&origin.base(), &args),
    );
    for proxy in [&a, &b] {
        for path in ["/page", "/a", "/b"] {
            send(proxy, "GET", path, &[]).await;
        }
    }
    let hit = send(&b, "GET", "/a", &[]).await;
    assert!(hit.cache_status().contains("hit"), "{}", hit.cache_status());
    assert_eq!(hit.header("surrogate-key"), "", "tags stay in the cache");
    assert_eq!(origin.count("/page") + origin.count("/a"), 2);

    let purged = send(&a, "PURGE", "/page", &[]).await;
    assert_eq!(purged.status, 200, "{}", purged.text());
    assert!(
        purged.text().contains(r#""purged":"url""#),
        "{}",
        purged.text()
    );
    until_refetched(&b, "/page", "page #2").await;

    let purged = send(&b, "PURGE", "/", &[("surrogate-key", "product-7")]).await;
    assert_eq!(purged.status, 200, "{}", purged.text());
    assert!(
        purged.text().contains(r#""entries":2"#),
        "{}",
        purged.text()
    );
    until_refetched(&a, "/a", "/a #2").await;
    until_refetched(&a, "/b", "/b #2").await;
    assert_eq!(origin.count("/a"), 2, "one refill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_from_a_peer_outside_purge_allow_is_refused_and_changes_nothing() {
    let origin = Origin::start().await;
    origin.route("/kept", |_, n| {
        Reply::ok(format!("kept #{n}")).header("cache-control", "max-age=600")
    });
    let proxy = Proxy::start(
        &origin.base(),
        &["--purge-allow", "10.0.0.0/8", "--purge-token", "s3cret"],
    );
    send(&proxy, "GET", "/kept", &[]).await;
    let refused = send(&proxy, "PURGE", "/kept", &[]).await;
    assert_eq!(refused.status, 405);
    let wrong = send(
        &proxy,
        "PURGE",
        "/kept",
        &[("authorization", "Bearer nope")],
    )
    .await;
    assert_eq!(wrong.status, 405);
    let still = send(&proxy, "GET", "/kept", &[]).await;
    assert!(
        still.cache_status().contains("hit"),
        "{}",
        still.cache_status()
    );
    assert_eq!(still.text(), "kept #1");
    let allowed = send(
        &proxy,
        "PURGE",
        "/kept",
        &[("authorization", "Bearer s3cret")],
    )
    .await;
    assert_eq!(allowed.status, 200, "the token allows it from anywhere");
    assert_eq!(send(&proxy, "GET", "/kept", &[]).await.text(), "kept #2");
}
