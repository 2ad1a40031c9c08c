//! RFC 9111 through the layer in its standards mode (`honor_cache_control(true)`), in
//! front of a real origin on a socket, nodes sharing a real `redis-server`. One test per
//! behaviour: freshness, Age, revalidation, client conditionals, Vary, errors, targeted
//! fields, request directives, ranges, HEAD.

mod support;

#[path = "support/origin.rs"]
mod origin;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use origin::{http_date, seen, Origin, Reply, Seen};
use support::RedisServer;
use tower::{Layer, Service, ServiceExt};
use tower_stampede::{Backend, StampedeBuilder, StampedeLayer};

/// The inner service: forwards to the origin over a real connection.
fn upstream(
    origin: &Origin,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Incoming>,
    Error = hyper_util::client::legacy::Error,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let addr = origin.addr;
    tower::service_fn(move |mut req: Request<Full<Bytes>>| {
        let client = client.clone();
        let pq = req
            .uri()
            .path_and_query()
            .map_or("/".to_owned(), |p| p.as_str().to_owned());
        *req.uri_mut() = format!("http://{addr}{pq}").parse().unwrap();
        async move { client.request(req).await }
    })
}

/// A standards node on `redis`: no default TTL, errors never stored by default, as the
/// proxy is configured.
fn standards(redis: &RedisServer) -> StampedeBuilder {
    StampedeLayer::builder()
        .backend(Backend::redis(redis.url()).unwrap())
        .honor_cache_control(true)
        .ttl(Duration::ZERO)
        .error_ttl(Duration::ZERO)
}

type Node = tower_stampede::Stampede<
    tower::util::BoxCloneSyncService<
        Request<Full<Bytes>>,
        Response<Incoming>,
        hyper_util::client::legacy::Error,
    >,
>;

fn node(builder: StampedeBuilder, origin: &Origin) -> Node {
    builder
        .build()
        .layer(tower::util::BoxCloneSyncService::new(upstream(origin)))
}

fn req(method: Method, path: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(method)
        .uri(format!("http://test{path}"));
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(Full::default()).unwrap()
}

async fn send(node: &Node, req: Request<Full<Bytes>>) -> Seen {
    seen(node.clone().oneshot(req).await.expect("the layer answers")).await
}

async fn get(node: &Node, path: &str) -> Seen {
    send(node, req(Method::GET, path, &[])).await
}

async fn get_with(node: &Node, path: &str, headers: &[(&str, &str)]) -> Seen {
    send(node, req(Method::GET, path, headers)).await
}

/// Waits until node `b` can read what `a` stored: the tier has `n` value keys.
async fn stored_in_redis(redis: &RedisServer, n: usize) {
    redis.wait_for_keys("stampede:*:v", n).await;
}

// ---------------------------------------------------------------------------------------
// 1. Freshness [4.2.1, 4.2.2]
// ---------------------------------------------------------------------------------------

/// A path, the headers its answer carries, and whether the answer is then stored fresh.
type Case = (&'static str, Vec<(&'static str, String)>, bool);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freshness_comes_from_s_maxage_max_age_expires_or_the_heuristic() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    let cases: &[Case] = &[
        (
            "/max-age",
            vec![("cache-control", "max-age=100".into())],
            true,
        ),
        (
            "/quoted",
            vec![("cache-control", "max-age=\"100\"".into())],
            true,
        ),
        (
            "/s-maxage",
            vec![("cache-control", "max-age=0, s-maxage=100".into())],
            true,
        ),
        (
            "/s-maxage-zero",
            vec![("cache-control", "max-age=100, s-maxage=0".into())],
            false,
        ),
        (
            "/expires",
            vec![("date", http_date(0)), ("expires", http_date(100))],
            true,
        ),
        (
            "/past-expires",
            vec![("date", http_date(0)), ("expires", http_date(-100))],
            false,
        ),
        ("/invalid-expires", vec![("expires", "0".into())], false),
        (
            "/max-age-over-expires",
            vec![
                ("cache-control", "max-age=0".into()),
                ("expires", http_date(100)),
            ],
            false,
        ),
        (
            "/max-age-0",
            vec![("cache-control", "max-age=0".into())],
            false,
        ),
        (
            "/negative",
            vec![("cache-control", "max-age=-1".into())],
            false,
        ),
        ("/none", vec![], false),
        (
            "/last-modified",
            vec![("last-modified", http_date(-10 * 86_400))],
            false,
        ),
    ];
    for (path, headers, _) in cases {
        let headers = headers.clone();
        origin.route(path, move |_, n| {
            let mut r = Reply::ok(format!("#{n}"));
            for (name, value) in &headers {
                r = r.header(name, value.clone());
            }
            r
        });
    }
    let a = node(standards(&redis), &origin);
    for (path, _, cached) in cases {
        assert_eq!(get(&a, path).await.text(), "#1", "{path}");
        let second = get(&a, path).await;
        if *cached {
            assert_eq!(second.text(), "#1", "{path} is fresh");
            assert!(
                second.cache_status().contains("hit"),
                "{path}: {}",
                second.cache_status()
            );
        } else {
            assert_eq!(second.text(), "#2", "{path} is not stored fresh");
        }
    }
    // The heuristic: a tenth of the 10 days since Last-Modified, capped at a day.
    let h = node(
        standards(&redis)
            .prefix("heuristic")
            .heuristic_freshness(Duration::from_secs(86_400)),
        &origin,
    );
    assert_eq!(get(&h, "/last-modified").await.text(), "#3");
    assert_eq!(get(&h, "/last-modified").await.text(), "#3");
    // A default TTL for answers without explicit freshness, and the override for all.
    let d = node(
        standards(&redis)
            .prefix("default")
            .ttl(Duration::from_secs(60)),
        &origin,
    );
    assert_eq!(get(&d, "/none").await.text(), "#3");
    assert_eq!(get(&d, "/none").await.text(), "#3");
    assert_eq!(get(&d, "/max-age-0").await.text(), "#3");
    assert_eq!(get(&d, "/max-age-0").await.text(), "#4");
    let o = node(
        standards(&redis)
            .prefix("override")
            .ttl_override(Some(Duration::from_secs(60))),
        &origin,
    );
    assert_eq!(get(&o, "/max-age-0").await.text(), "#5");
    assert_eq!(get(&o, "/max-age-0").await.text(), "#5");
}

// ---------------------------------------------------------------------------------------
// 2. Age [4.2.3, 5.1]
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn age_counts_the_upstream_age_the_delay_and_residence_on_every_node() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    origin.route("/aged", |_, n| {
        Reply::ok(format!("#{n}"))
            .header("cache-control", "max-age=1000")
            .header("age", "100")
    });
    origin.route("/lines", |_, n| {
        Reply::ok(format!("#{n}"))
            .header("cache-control", "max-age=1000")
            .header("age", "200")
            .header("age", "5")
    });
    origin.route("/invalid", |_, n| {
        Reply::ok(format!("#{n}"))
            .header("cache-control", "max-age=1000")
            .header("age", "soon")
    });
    origin.route("/older-than-max-age", |_, n| {
        Reply::ok(format!("#{n}"))
            .header("cache-control", "max-age=10")
            .header("age", "20")
    });
    origin.route("/huge", |_, n| {
        Reply::ok(format!("#{n}"))
            .header("cache-control", "max-age=1000")
            .header("age", "99999999999999999999999")
    });
    let a = node(standards(&redis), &origin);
    let b = node(standards(&redis), &origin);
    let started = Instant::now();
    let first = get(&a, "/aged").await;
    assert!(first.age() >= 100, "{first:?}");
    stored_in_redis(&redis, 1).await;
    let other = get(&b, "/aged").await;
    assert!(other.cache_status().contains("detail=redis"), "{other:?}");
    let bound = 100 + started.elapsed().as_secs() + 1;
    assert!(
        other.age() >= 100 && other.age() <= bound,
        "age {} on the other node, not in 100..={bound}",
        other.age()
    );
    assert!(get(&a, "/aged").await.age() >= 100);

    // Several Age lines: the first counts.
    let lines = get(&a, "/lines").await;
    assert!(lines.age() >= 200, "{lines:?}");
    // An invalid Age is ignored: fresh, and stored.
    let invalid = get(&a, "/invalid").await;
    assert!(invalid.age() < 100, "{invalid:?}");
    assert_eq!(get(&a, "/invalid").await.text(), "#1");
    // Age past max-age: stale on arrival, not stored fresh.
    assert_eq!(get(&a, "/older-than-max-age").await.text(), "#1");
    assert_eq!(get(&a, "/older-than-max-age").await.text(), "#2");
    // A huge Age is capped at 2^31: stale on arrival too, and the emitted Age is the cap.
    let huge = get(&a, "/huge").await;
    assert_eq!(huge.age(), 1 << 31);
    assert_eq!(get(&a, "/huge").await.text(), "#2");
}

// ---------------------------------------------------------------------------------------
// 3. Revalidation [4.3, 5.2.2]
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_entry_is_revalidated_once_across_the_fleet_and_a_304_updates_it() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    origin.route("/rev", |headers, n| {
        if n == 1 {
            return Reply::ok("body v1")
                .header("etag", "\"v1\"")
                .header("cache-control", "max-age=0")
                .header("x-version", "1");
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
    let a = node(standards(&redis), &origin);
    let b = node(standards(&redis), &origin);
    assert_eq!(get(&a, "/rev").await.text(), "body v1");
    stored_in_redis(&redis, 1).await;

    // Ten requests on two nodes for the stale entry: one conditional request.
    let mut all = Vec::new();
    for i in 0..10 {
        let n = if i % 2 == 0 { a.clone() } else { b.clone() };
        all.push(tokio::spawn(async move { get(&n, "/rev").await }));
    }
    for answer in all {
        let answer = answer.await.unwrap();
        assert_eq!(answer.text(), "body v1", "{answer:?}");
        assert_eq!(
            answer.header("x-version"),
            "2",
            "the 304's headers: {answer:?}"
        );
    }
    assert_eq!(origin.count("/rev"), 2, "one revalidation for the fleet");
    let conditional = &origin.requests("/rev")[1];
    assert_eq!(conditional.get("if-none-match").unwrap(), "\"v1\"");
    // The 304 made it fresh for 100 s: hits now.
    assert!(get(&b, "/rev").await.cache_status().contains("hit"));
    assert_eq!(origin.count("/rev"), 2);

    // A 200 to a conditional request replaces the entry.
    origin.route("/replace", |_, n| match n {
        1 => Reply::ok("one")
            .header("etag", "\"1\"")
            .header("cache-control", "max-age=0"),
        _ => Reply::ok("two")
            .header("etag", "\"2\"")
            .header("cache-control", "max-age=100"),
    });
    assert_eq!(get(&a, "/replace").await.text(), "one");
    assert_eq!(get(&a, "/replace").await.text(), "two");
    assert_eq!(get(&b, "/replace").await.text(), "two");
    assert_eq!(origin.count("/replace"), 2);
    assert_eq!(
        origin.requests("/replace")[1].get("if-none-match").unwrap(),
        "\"1\""
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_cache_is_revalidated_before_every_reuse_and_must_revalidate_is_never_stale() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    // no-cache with a validator: stored, and every reuse is a conditional request.
    origin.route("/no-cache", |headers, n| {
        if headers.contains_key("if-modified-since") {
            return Reply::status(304);
        }
        Reply::ok(format!("full #{n}"))
            .header("cache-control", "no-cache")
            .header("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT")
    });
    // Without a validator: nothing to revalidate with, so not stored.
    origin.route("/no-cache-bare", |_, n| {
        Reply::ok(format!("full #{n}")).header("cache-control", "no-cache")
    });
    let a = node(standards(&redis), &origin);
    for _ in 0..3 {
        assert_eq!(get(&a, "/no-cache").await.text(), "full #1");
    }
    assert_eq!(origin.count("/no-cache"), 3);
    for headers in &origin.requests("/no-cache")[1..] {
        assert!(headers.contains_key("if-modified-since"), "{headers:?}");
    }
    assert_eq!(get(&a, "/no-cache-bare").await.text(), "full #1");
    assert_eq!(get(&a, "/no-cache-bare").await.text(), "full #2");
    assert!(!origin.requests("/no-cache-bare")[1].contains_key("if-modified-since"));

    // When revalidation fails: stale-if-error serves the copy, unless the answer said
    // must-revalidate, proxy-revalidate or s-maxage.
    for (path, cc, stale_ok) in [
        ("/sie", "max-age=0, stale-if-error=600", true),
        (
            "/mr",
            "max-age=0, must-revalidate, stale-if-error=600",
            false,
        ),
        (
            "/pr",
            "max-age=0, proxy-revalidate, stale-if-error=600",
            false,
        ),
        ("/smax", "s-maxage=0, stale-if-error=600", false),
    ] {
        origin.route(path, move |_, n| match n {
            1 => Reply::ok("kept")
                .header("etag", "\"k\"")
                .header("cache-control", cc),
            _ => Reply::status(500),
        });
        assert_eq!(get(&a, path).await.text(), "kept");
        let failed = get(&a, path).await;
        if stale_ok {
            assert_eq!(
                (failed.status.as_u16(), failed.text()),
                (200, "kept"),
                "{path}"
            );
            assert!(
                failed.cache_status().contains("stale-if-error"),
                "{failed:?}"
            );
        } else {
            assert_eq!(failed.status.as_u16(), 504, "{path}: {failed:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// 4. Client conditionals [4.3.2]
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_preconditions_are_answered_from_the_entry() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    origin.route("/doc", |_, n| {
        Reply::ok(format!("doc #{n}"))
            .header("cache-control", "max-age=100")
            .header("etag", "\"d1\"")
            .header("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT")
    });
    let a = node(standards(&redis), &origin);
    assert_eq!(get(&a, "/doc").await.text(), "doc #1");
    let cases: &[(&[(&str, &str)], u16)] = &[
        (&[("if-none-match", "\"d1\"")], 304),
        (&[("if-none-match", "W/\"d1\", \"x\"")], 304),
        (&[("if-none-match", "\"other\"")], 200),
        (
            &[("if-modified-since", "Tue, 02 Jan 2024 00:00:00 GMT")],
            304,
        ),
        (
            &[("if-modified-since", "Sun, 31 Dec 2023 00:00:00 GMT")],
            200,
        ),
        (&[("if-match", "\"d1\"")], 200),
        (&[("if-match", "\"other\"")], 412),
        (&[("if-match", "W/\"d1\"")], 412),
        (
            &[("if-unmodified-since", "Sun, 31 Dec 2023 00:00:00 GMT")],
            412,
        ),
        (
            &[("if-unmodified-since", "Tue, 02 Jan 2024 00:00:00 GMT")],
            200,
        ),
    ];
    for (headers, status) in cases {
        let answer = get_with(&a, "/doc", headers).await;
        assert_eq!(answer.status.as_u16(), *status, "{headers:?}: {answer:?}");
        if *status == 200 {
            assert_eq!(answer.text(), "doc #1");
        } else {
            assert!(answer.body.is_empty());
        }
    }
    assert_eq!(origin.count("/doc"), 1);
    for headers in origin.requests("/doc") {
        assert!(!headers.contains_key("if-match") && !headers.contains_key("if-none-match"));
    }
}

// ---------------------------------------------------------------------------------------
// 5. Vary [4.1]
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_stored_per_variant_of_the_headers_they_vary_on() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    origin.route("/lang", |headers, n| {
        let value = |name: &str| {
            headers
                .get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect::<Vec<_>>()
                .join("|")
        };
        Reply::ok(format!(
            "{} {} #{n}",
            value("accept-language"),
            value("x-tenant")
        ))
        .header("cache-control", "max-age=100")
        .header("vary", "Accept-Language, X-Tenant")
    });
    origin.route("/star", |_, n| {
        Reply::ok(format!("#{n}"))
            .header("cache-control", "max-age=100")
            .header("vary", "*")
    });
    let a = node(standards(&redis).max_variants(3), &origin);
    let b = node(standards(&redis).max_variants(3), &origin);
    let en = [("accept-language", "en, fr"), ("x-tenant", "t1")];
    assert_eq!(get_with(&a, "/lang", &en).await.text(), "en, fr t1 #1");
    // The same values, in whitespace or lines that differ only in form: the variant.
    let same = [("accept-language", "en ,   fr"), ("x-tenant", "t1")];
    assert_eq!(get_with(&a, "/lang", &same).await.text(), "en, fr t1 #1");
    let lines = [
        ("accept-language", "en"),
        ("accept-language", "fr"),
        ("x-tenant", "t1"),
    ];
    assert_eq!(get_with(&a, "/lang", &lines).await.text(), "en, fr t1 #1");
    stored_in_redis(&redis, 2).await;
    let other = get_with(&b, "/lang", &en).await;
    assert_eq!(other.text(), "en, fr t1 #1");
    assert!(other.cache_status().contains("detail=redis"), "{other:?}");
    // Another value of either header: another variant.
    let fr = [("accept-language", "fr"), ("x-tenant", "t1")];
    assert_eq!(get_with(&a, "/lang", &fr).await.text(), "fr t1 #2");
    let t2 = [("accept-language", "en, fr"), ("x-tenant", "t2")];
    assert_eq!(get_with(&a, "/lang", &t2).await.text(), "en, fr t2 #3");
    assert_eq!(get_with(&b, "/lang", &fr).await.text(), "fr t1 #2");
    assert_eq!(get_with(&a, "/lang", &en).await.text(), "en, fr t1 #1");
    // Past the bound (3 per URL on a node): answered, not stored.
    let de = [("accept-language", "de")];
    assert_eq!(get_with(&a, "/lang", &de).await.text(), "de  #4");
    assert_eq!(get_with(&a, "/lang", &de).await.text(), "de  #5");
    assert_eq!(origin.count("/lang"), 5);
    // Vary: * is never stored.
    assert_eq!(get(&a, "/star").await.text(), "#1");
    assert_eq!(get(&a, "/star").await.text(), "#2");
}

// ---------------------------------------------------------------------------------------
// 6. Errors and storable statuses
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_shared_with_waiters_and_stored_only_with_explicit_freshness() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    origin.route("/down", |_, n| {
        Reply::status(500)
            .header("x-n", n.to_string())
            .after(Duration::from_millis(300))
    });
    origin.route("/down-fresh", |_, n| {
        Reply::status(503)
            .header("x-n", n.to_string())
            .header("cache-control", "max-age=100")
    });
    origin.route("/missing", |_, n| {
        Reply::status(404).header("x-n", n.to_string())
    });
    origin.route("/missing-fresh", |_, n| {
        Reply::status(404)
            .header("x-n", n.to_string())
            .header("cache-control", "max-age=100")
    });
    origin.route("/found-fresh", |_, n| {
        Reply::status(302)
            .header("x-n", n.to_string())
            .header("location", "/x")
            .header("cache-control", "max-age=100")
    });
    origin.route("/found", |_, n| {
        Reply::status(302)
            .header("x-n", n.to_string())
            .header("location", "/x")
    });
    let a = node(standards(&redis).ttl(Duration::from_secs(60)), &origin);
    // Five waiting requests share the one failing call...
    let all: Vec<_> = (0..5)
        .map(|_| {
            let a = a.clone();
            tokio::spawn(async move { get(&a, "/down").await })
        })
        .collect();
    for answer in all {
        assert_eq!(answer.await.unwrap().status.as_u16(), 500);
    }
    assert_eq!(origin.count("/down"), 1);
    // ...and a later request goes upstream again.
    assert_eq!(get(&a, "/down").await.status.as_u16(), 500);
    assert_eq!(origin.count("/down"), 2);
    // With explicit freshness an error is stored.
    assert_eq!(get(&a, "/down-fresh").await.header("x-n"), "1");
    assert_eq!(get(&a, "/down-fresh").await.header("x-n"), "1");
    // 404 is heuristically cacheable (the default TTL); 302 only with explicit freshness.
    assert_eq!(get(&a, "/missing").await.header("x-n"), "1");
    assert_eq!(get(&a, "/missing").await.header("x-n"), "1");
    assert_eq!(get(&a, "/missing-fresh").await.header("x-n"), "1");
    assert_eq!(get(&a, "/missing-fresh").await.header("x-n"), "1");
    assert_eq!(get(&a, "/found-fresh").await.header("x-n"), "1");
    assert_eq!(get(&a, "/found-fresh").await.header("x-n"), "1");
    assert_eq!(get(&a, "/found").await.header("x-n"), "1");
    assert_eq!(get(&a, "/found").await.header("x-n"), "2");
    // error_ttl set on purpose: errors without freshness are kept that long.
    let kept = node(
        standards(&redis)
            .prefix("kept")
            .error_ttl(Duration::from_secs(60)),
        &origin,
    );
    assert_eq!(get(&kept, "/down").await.header("x-n"), "3");
    assert_eq!(get(&kept, "/down").await.header("x-n"), "3");
}

// ---------------------------------------------------------------------------------------
// 7. Targeted fields [RFC 9213]
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targeted_fields_outrank_cache_control_and_stay_here() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    origin.route("/cdn", |_, n| {
        Reply::ok(format!("#{n}"))
            .header("cache-control", "no-store")
            .header("cdn-cache-control", "max-age=100")
    });
    origin.route("/own", |_, n| {
        Reply::ok(format!("#{n}"))
            .header("cache-control", "max-age=100")
            .header("cdn-cache-control", "max-age=100")
            .header("edge-cache-control", "no-store")
    });
    let a = node(
        standards(&redis)
            .targeted_cache_control(http::HeaderName::from_static("edge-cache-control")),
        &origin,
    );
    let first = get(&a, "/cdn").await;
    assert_eq!(first.text(), "#1");
    assert!(
        first.headers.get("cdn-cache-control").is_none(),
        "{first:?}"
    );
    assert_eq!(
        first.header("cache-control"),
        "no-store",
        "for the caches downstream"
    );
    let hit = get(&a, "/cdn").await;
    assert_eq!(hit.text(), "#1");
    assert!(
        hit.headers.get("cdn-cache-control").is_none(),
        "nor on a hit: {hit:?}"
    );
    assert_eq!(hit.header("cache-control"), "no-store");
    // The own field first: no-store for this cache, whatever the others say.
    let own = get(&a, "/own").await;
    assert!(own.headers.get("edge-cache-control").is_none());
    assert_eq!(get(&a, "/own").await.text(), "#2");
}

// ---------------------------------------------------------------------------------------
// 8. Request directives [5.2.1]
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_no_store_bypasses_and_no_cache_is_ignored_unless_honoured() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    origin.route("/p", |_, n| {
        Reply::ok(format!("#{n}")).header("cache-control", "max-age=100")
    });
    let a = node(standards(&redis), &origin);
    let no_store = get_with(&a, "/p", &[("cache-control", "no-store")]).await;
    assert_eq!(no_store.text(), "#1");
    assert!(no_store
        .cache_status()
        .contains("fwd=bypass; detail=no-store"));
    assert_eq!(
        get(&a, "/p").await.text(),
        "#2",
        "the bypass stored nothing"
    );
    for headers in [
        &[("cache-control", "no-cache")][..],
        &[("cache-control", "max-age=0")],
        &[("pragma", "no-cache")],
    ] {
        assert_eq!(
            get_with(&a, "/p", headers).await.text(),
            "#2",
            "{headers:?}"
        );
    }
    let honouring = node(
        standards(&redis).prefix("h").honor_request_no_cache(true),
        &origin,
    );
    assert_eq!(get(&honouring, "/p").await.text(), "#3");
    assert_eq!(
        get_with(&honouring, "/p", &[("cache-control", "no-cache")])
            .await
            .text(),
        "#4"
    );
    assert_eq!(
        get_with(&honouring, "/p", &[("pragma", "no-cache")])
            .await
            .text(),
        "#5"
    );
    assert_eq!(get(&honouring, "/p").await.text(), "#3");
}

// ---------------------------------------------------------------------------------------
// 9. Range [RFC 9110 14] and 10. HEAD
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_range_is_answered_from_the_entry_and_head_from_the_get() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    origin.route("/file", |headers, n| {
        if headers.contains_key("range") {
            return Reply::status(206).header("x-n", n.to_string());
        }
        Reply::ok("0123456789")
            .header("cache-control", "max-age=100")
            .header("etag", "\"f\"")
            .header("x-n", n.to_string())
    });
    let a = node(standards(&redis), &origin);
    let part = get_with(&a, "/file", &[("range", "bytes=2-5")]).await;
    assert_eq!((part.status.as_u16(), part.text()), (206, "2345"));
    assert_eq!(part.header("content-range"), "bytes 2-5/10");
    assert_eq!(part.header("content-length"), "4");
    for (range, status, body) in [
        ("bytes=7-", 206, "789"),
        ("bytes=-3", 206, "789"),
        ("bytes=8-100", 206, "89"),
        ("bytes=10-", 416, ""),
    ] {
        let answer = get_with(&a, "/file", &[("range", range)]).await;
        assert_eq!(
            (answer.status.as_u16(), answer.text()),
            (status, body),
            "{range}"
        );
    }
    assert_eq!(
        get_with(&a, "/file", &[("range", "bytes=10-")])
            .await
            .header("content-range"),
        "bytes */10"
    );
    // If-Range with another validator: the whole answer.
    let whole = get_with(
        &a,
        "/file",
        &[("range", "bytes=0-1"), ("if-range", "\"old\"")],
    )
    .await;
    assert_eq!((whole.status.as_u16(), whole.text()), (200, "0123456789"));
    assert_eq!(origin.count("/file"), 1);
    // Several ranges go upstream as they are.
    let multi = get_with(&a, "/file", &[("range", "bytes=0-1,4-5")]).await;
    assert_eq!(multi.status.as_u16(), 206);
    assert_eq!(multi.header("x-n"), "2");
    assert!(origin.requests("/file")[1].contains_key("range"));
    // HEAD from the GET entry: its head and length, no body.
    let head = send(&a, req(Method::HEAD, "/file", &[])).await;
    assert_eq!(head.status.as_u16(), 200);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), "10");
    assert!(head.cache_status().contains("hit"), "{head:?}");
    assert_eq!(origin.count("/file"), 2);
}

/// A targeted field's name is `<target>-cache-control`: any other name (a field the cache
/// reads or writes for itself) would be taken for this cache's directives and removed from
/// every answer, so the builder refuses it.
#[test]
fn only_a_targeted_field_name_is_taken_for_this_caches_own() {
    let taken = |name: &'static str| {
        std::panic::catch_unwind(|| {
            StampedeLayer::builder().targeted_cache_control(http::HeaderName::from_static(name))
        })
        .is_ok()
    };
    for name in [
        "cache-control",
        "age",
        "vary",
        "-cache-control",
        "cache-status",
    ] {
        assert!(!taken(name), "`{name}` was taken as a targeted field");
    }
    for name in ["edge-cache-control", "tower-stampede-cache-control"] {
        assert!(taken(name), "`{name}` was refused");
    }
}
