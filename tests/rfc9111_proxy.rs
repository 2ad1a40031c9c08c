//! RFC 9111 through the caching proxy (`examples/proxy.rs`) as real processes on real
//! sockets, in front of a scriptable origin, proxies sharing a real `redis-server`. The
//! proxy is a standards cache by default: one test per behaviour.
//!
//! `cargo test --test rfc9111_proxy` does not rebuild the example: run
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
use origin::{client, http_date, seen, Origin, Reply, Seen};
use proxy_process::Proxy;
use support::RedisServer;

async fn send(proxy: &Proxy, method: Method, path: &str, headers: &[(&str, &str)]) -> Seen {
    let mut b = Request::builder().method(method).uri(proxy.url(path));
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    let res = client()
        .request(b.body(Empty::<Bytes>::new()).unwrap())
        .await
        .expect("the proxy answers");
    seen(res).await
}

async fn get(proxy: &Proxy, path: &str) -> Seen {
    send(proxy, Method::GET, path, &[]).await
}

async fn get_with(proxy: &Proxy, path: &str, headers: &[(&str, &str)]) -> Seen {
    send(proxy, Method::GET, path, headers).await
}

fn counted(cc: &'static str) -> impl Fn(&http::HeaderMap, usize) -> Reply {
    move |_, n| Reply::ok(format!("#{n}")).header("cache-control", cc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freshness_by_default_and_the_ttl_flags() {
    let origin = Origin::start().await;
    origin.route("/max-age", counted("max-age=100"));
    origin.route("/s-maxage", counted("max-age=0, s-maxage=100"));
    origin.route("/zero", counted("max-age=0"));
    origin.route("/none", |_, n| Reply::ok(format!("#{n}")));
    origin.route("/expires", |_, n| {
        Reply::ok(format!("#{n}"))
            .header("date", http_date(0))
            .header("expires", http_date(100))
    });
    origin.route("/past", |_, n| {
        Reply::ok(format!("#{n}")).header("expires", "Thu, 01 Jan 1970 00:00:00 GMT")
    });
    origin.route("/modified", |_, n| {
        Reply::ok(format!("#{n}")).header("last-modified", http_date(-86_400))
    });
    let proxy = Proxy::start(&origin.base(), &[]);
    for (path, cached) in [
        ("/max-age", true),
        ("/s-maxage", true),
        ("/expires", true),
        ("/zero", false),
        ("/past", false),
        // No explicit freshness: the default --ttl is 0, nothing stored (as nginx).
        ("/none", false),
        ("/modified", false),
    ] {
        assert_eq!(get(&proxy, path).await.text(), "#1", "{path}");
        let want = if cached { "#1" } else { "#2" };
        assert_eq!(get(&proxy, path).await.text(), want, "{path}");
    }
    // --ttl: for answers without explicit freshness only; --heuristic for Last-Modified.
    let ttl = Proxy::start(&origin.base(), &["--ttl", "60s", "--heuristic"]);
    assert_eq!(get(&ttl, "/none").await.text(), "#3");
    assert_eq!(get(&ttl, "/none").await.text(), "#3");
    assert_eq!(get(&ttl, "/zero").await.text(), "#3");
    assert_eq!(get(&ttl, "/zero").await.text(), "#4");
    assert_eq!(get(&ttl, "/modified").await.text(), "#3");
    assert_eq!(get(&ttl, "/modified").await.text(), "#3");
    // --ttl-override: one TTL for every storable answer.
    let fixed = Proxy::start(&origin.base(), &["--ttl-override", "60s"]);
    assert_eq!(get(&fixed, "/zero").await.text(), "#5");
    assert_eq!(get(&fixed, "/zero").await.text(), "#5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn age_is_counted_across_proxies() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    origin.route("/aged", |_, n| {
        Reply::ok(format!("#{n}"))
            .header("cache-control", "max-age=1000")
            .header("age", "100")
    });
    let args = ["--redis", &redis.url(), "--redis-timeout", "2s"];
    let (a, b) = (
        Proxy::start(&origin.base(), &args),
        Proxy::start(&origin.base(), &args),
    );
    let started = Instant::now();
    assert!(get(&a, "/aged").await.age() >= 100);
    redis.wait_for_keys("stampede:*:v", 1).await;
    let other = get(&b, "/aged").await;
    assert!(other.cache_status().contains("detail=redis"), "{other:?}");
    let bound = 100 + started.elapsed().as_secs() + 1;
    assert!((100..=bound).contains(&other.age()), "{other:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_entry_is_revalidated_once_across_proxies() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    origin.route("/rev", |headers, n| {
        if n == 1 {
            return Reply::ok("body v1")
                .header("etag", "\"v1\"")
                .header("cache-control", "max-age=0");
        }
        if headers.get("if-none-match").is_some_and(|v| v == "\"v1\"") {
            return Reply::status(304)
                .header("etag", "\"v1\"")
                .header("cache-control", "max-age=100")
                .header("x-version", "2")
                .after(Duration::from_millis(300));
        }
        Reply::ok("unconditional")
    });
    let args = ["--redis", &redis.url(), "--redis-timeout", "2s"];
    let proxies = [
        Proxy::start(&origin.base(), &args),
        Proxy::start(&origin.base(), &args),
    ];
    assert_eq!(get(&proxies[0], "/rev").await.text(), "body v1");
    redis.wait_for_keys("stampede:*:v", 1).await;
    let urls: Vec<String> = (0..10).map(|i| proxies[i % 2].url("/rev")).collect();
    let all: Vec<_> = urls
        .into_iter()
        .map(|url| {
            tokio::spawn(async move {
                let res = client()
                    .request(Request::get(url).body(Empty::<Bytes>::new()).unwrap())
                    .await
                    .unwrap();
                seen(res).await
            })
        })
        .collect();
    for answer in all {
        let answer = answer.await.unwrap();
        assert_eq!(answer.text(), "body v1");
        assert_eq!(answer.header("x-version"), "2", "{answer:?}");
    }
    assert_eq!(origin.count("/rev"), 2);
    assert_eq!(
        origin.requests("/rev")[1].get("if-none-match").unwrap(),
        "\"v1\""
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn must_revalidate_is_never_served_stale_and_no_cache_always_revalidates() {
    let origin = Origin::start().await;
    origin.route("/mr", |_, n| match n {
        1 => Reply::ok("kept").header("etag", "\"k\"").header(
            "cache-control",
            "max-age=0, must-revalidate, stale-if-error=600",
        ),
        _ => Reply::status(500),
    });
    origin.route("/nc", |headers, n| {
        if headers.contains_key("if-none-match") {
            return Reply::status(304);
        }
        Reply::ok(format!("#{n}"))
            .header("etag", "\"n\"")
            .header("cache-control", "no-cache")
    });
    let proxy = Proxy::start(&origin.base(), &[]);
    assert_eq!(get(&proxy, "/mr").await.text(), "kept");
    assert_eq!(get(&proxy, "/mr").await.status.as_u16(), 504);
    for _ in 0..3 {
        assert_eq!(get(&proxy, "/nc").await.text(), "#1");
    }
    assert_eq!(origin.count("/nc"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_preconditions_are_answered_by_the_proxy() {
    let origin = Origin::start().await;
    origin.route("/doc", |_, n| {
        Reply::ok(format!("doc #{n}"))
            .header("cache-control", "max-age=100")
            .header("etag", "\"d1\"")
            .header("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT")
    });
    let proxy = Proxy::start(&origin.base(), &[]);
    assert_eq!(get(&proxy, "/doc").await.text(), "doc #1");
    for (headers, status) in [
        (&[("if-none-match", "\"d1\"")][..], 304),
        (
            &[("if-modified-since", "Tue, 02 Jan 2024 00:00:00 GMT")],
            304,
        ),
        (&[("if-match", "\"nope\"")], 412),
        (
            &[("if-unmodified-since", "Sun, 31 Dec 2023 00:00:00 GMT")],
            412,
        ),
        (&[("if-match", "\"d1\"")], 200),
    ] {
        let answer = get_with(&proxy, "/doc", headers).await;
        assert_eq!(answer.status.as_u16(), status, "{headers:?}");
    }
    assert_eq!(origin.count("/doc"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn variants_through_the_proxy() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    origin.route("/lang", |headers, n| {
        let lang = headers
            .get("accept-language")
            .map_or("-", |v| v.to_str().unwrap())
            .to_owned();
        Reply::ok(format!("{lang} #{n}"))
            .header("cache-control", "max-age=100")
            .header("vary", "accept-language, x-tenant")
    });
    let args = ["--redis", &redis.url(), "--redis-timeout", "2s"];
    let (a, b) = (
        Proxy::start(&origin.base(), &args),
        Proxy::start(&origin.base(), &args),
    );
    let en = [("accept-language", "en, de"), ("x-tenant", "1")];
    assert_eq!(get_with(&a, "/lang", &en).await.text(), "en, de #1");
    let spaced = [("accept-language", "en ,de"), ("x-tenant", "1")];
    assert_eq!(get_with(&a, "/lang", &spaced).await.text(), "en, de #1");
    redis.wait_for_keys("stampede:*:v", 2).await;
    assert_eq!(get_with(&b, "/lang", &en).await.text(), "en, de #1");
    let fr = [("accept-language", "fr"), ("x-tenant", "1")];
    assert_eq!(get_with(&b, "/lang", &fr).await.text(), "fr #2");
    let other_tenant = [("accept-language", "en, de"), ("x-tenant", "2")];
    assert_eq!(
        get_with(&a, "/lang", &other_tenant).await.text(),
        "en, de #3"
    );
    assert_eq!(origin.count("/lang"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_shared_not_stored_by_default() {
    let origin = Origin::start().await;
    origin.route("/down", |_, n| {
        Reply::status(502)
            .header("x-n", n.to_string())
            .after(Duration::from_millis(300))
    });
    origin.route("/down-fresh", |_, n| {
        Reply::status(500)
            .header("x-n", n.to_string())
            .header("cache-control", "max-age=100")
    });
    let proxy = Proxy::start(&origin.base(), &[]);
    let urls: Vec<String> = (0..5).map(|_| proxy.url("/down")).collect();
    let all: Vec<_> = urls
        .into_iter()
        .map(|url| {
            tokio::spawn(async move {
                client()
                    .request(Request::get(url).body(Empty::<Bytes>::new()).unwrap())
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    for status in all {
        assert_eq!(status.await.unwrap().as_u16(), 502);
    }
    assert_eq!(origin.count("/down"), 1, "shared with the waiting requests");
    get(&proxy, "/down").await;
    assert_eq!(origin.count("/down"), 2, "not stored");
    assert_eq!(get(&proxy, "/down-fresh").await.header("x-n"), "1");
    assert_eq!(get(&proxy, "/down-fresh").await.header("x-n"), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targeted_fields_rule_the_proxy_and_stop_there() {
    let origin = Origin::start().await;
    origin.route("/cdn", |_, n| {
        Reply::ok(format!("#{n}"))
            .header("cache-control", "private")
            .header("cdn-cache-control", "max-age=100")
    });
    origin.route("/own", |_, n| {
        Reply::ok(format!("#{n}"))
            .header("cdn-cache-control", "no-store")
            .header("tower-stampede-cache-control", "max-age=100")
    });
    let proxy = Proxy::start(&origin.base(), &[]);
    for path in ["/cdn", "/own"] {
        let first = get(&proxy, path).await;
        assert_eq!(first.text(), "#1");
        assert!(first.headers.get("cdn-cache-control").is_none());
        assert!(first.headers.get("tower-stampede-cache-control").is_none());
        assert_eq!(get(&proxy, path).await.text(), "#1", "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_directives_at_the_proxy() {
    let origin = Origin::start().await;
    origin.route("/p", counted("max-age=100"));
    let proxy = Proxy::start(&origin.base(), &[]);
    let bypass = get_with(&proxy, "/p", &[("cache-control", "no-store")]).await;
    assert!(
        bypass.cache_status().contains("detail=no-store"),
        "{bypass:?}"
    );
    assert_eq!(get(&proxy, "/p").await.text(), "#2");
    assert_eq!(
        get_with(&proxy, "/p", &[("cache-control", "no-cache")])
            .await
            .text(),
        "#2"
    );
    let honouring = Proxy::start(&origin.base(), &["--honor-client-no-cache"]);
    assert_eq!(get(&honouring, "/p").await.text(), "#3");
    assert_eq!(
        get_with(&honouring, "/p", &[("pragma", "no-cache")])
            .await
            .text(),
        "#4"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_and_head_from_the_stored_get() {
    let origin = Origin::start().await;
    origin.route("/file", |_, n| {
        Reply::ok("0123456789")
            .header("cache-control", "max-age=100")
            .header("x-n", n.to_string())
    });
    let proxy = Proxy::start(&origin.base(), &[]);
    let part = get_with(&proxy, "/file", &[("range", "bytes=3-4")]).await;
    assert_eq!((part.status.as_u16(), part.text()), (206, "34"));
    assert_eq!(part.header("content-range"), "bytes 3-4/10");
    let none = get_with(&proxy, "/file", &[("range", "bytes=20-")]).await;
    assert_eq!(none.status.as_u16(), 416);
    let head = send(&proxy, Method::HEAD, "/file", &[]).await;
    assert_eq!(
        (head.status.as_u16(), head.header("content-length")),
        (200, "10")
    );
    assert!(head.body.is_empty());
    assert_eq!(origin.count("/file"), 1);
    assert!(!origin.requests("/file")[0].contains_key("range"));
}
