//! The crate on Redis behind Sentinel: a fleet coalescing through the master the sentinels
//! name, and the master killed under load: no failed request, and coalescing back on the
//! promoted replica.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use support::sentinel::SentinelSetup;
use support::{get, stampede, Upstream};
use tower::{Layer, ServiceExt};
use tower_stampede::{Backend, StampedeLayer};

fn node(setup: &SentinelSetup) -> StampedeLayer {
    StampedeLayer::builder()
        .backend(Backend::redis_sentinel(setup.master_name(), setup.sentinel_urls()).unwrap())
        .redis_timeout(Duration::from_secs(1))
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_behind_sentinel_survives_the_masters_failover() {
    let mut setup = tokio::task::spawn_blocking(|| SentinelSetup::start("stampede"))
        .await
        .unwrap();
    let layers: Vec<StampedeLayer> = (0..3).map(|_| node(&setup)).collect();
    let health = layers[0].check_backend().await;
    assert!(health.is_up(), "{health}");
    assert_eq!(health.backend, "redis-sentinel");

    let upstream = Upstream::new(Duration::from_millis(200));
    let services: Vec<_> = layers.iter().map(|l| l.layer(upstream.service())).collect();
    let results = stampede(&services, &["/hot"], 300).await;
    assert!(results
        .iter()
        .all(|r| r.1 == StatusCode::OK && r.3 == "/hot #1"));
    assert_eq!(
        upstream.calls(),
        1,
        "one upstream call through the sentinels' master"
    );

    // The master killed under load: every request answered.
    let load = Upstream::new(Duration::from_millis(20));
    let services: Vec<_> = layers.iter().map(|l| l.layer(load.service())).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let (answered, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let workers: Vec<_> = (0..30)
        .map(|w| {
            let svc = services[w % 3].clone();
            let (stop, answered, failed) = (stop.clone(), answered.clone(), failed.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    // Cold keys and hot ones.
                    let path = if i % 2 == 0 {
                        format!("/load{w}-{i}")
                    } else {
                        format!("/load{w}-{}", i - 1)
                    };
                    let res = svc.clone().oneshot(get(&path)).await.unwrap();
                    if res.status() == StatusCode::OK {
                        answered.fetch_add(1, Ordering::SeqCst);
                    } else {
                        if failed.fetch_add(1, Ordering::SeqCst) == 0 {
                            eprintln!("failed: {} {}", res.status(), support::cache_status(&res));
                        }
                    }
                    i += 1;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed_at = Instant::now();
    setup.kill_master();
    let promoted = tokio::task::block_in_place(|| setup.wait_for_promotion());
    let promotion = killed_at.elapsed();
    assert_eq!(promoted, setup.replica_port());
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    eprintln!(
        "sentinel: master killed under load, :{promoted} promoted after {promotion:?}: \
         {} answered, {} failed",
        answered.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst)
    );
    assert_eq!(failed.load(Ordering::SeqCst), 0, "no failed request");

    // A new cold key after the promotion: one upstream call again (tried with fresh keys
    // until every node has found the new master).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut attempt = 0;
    let recovered = loop {
        let origin = Upstream::new(Duration::from_millis(200));
        let services: Vec<_> = layers.iter().map(|l| l.layer(origin.service())).collect();
        let path = format!("/after{attempt}");
        let results = stampede(&services, &[path.as_str()], 300).await;
        assert!(
            results.iter().all(|r| r.1 == StatusCode::OK),
            "no failed request"
        );
        if origin.calls() == 1 {
            break killed_at.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "coalescing never came back after the promotion ({} calls)",
            origin.calls()
        );
        attempt += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "sentinel: coalescing back {recovered:?} after the kill ({:?} after the promotion), \
         {attempt} earlier attempt(s) uncoalesced",
        recovered.saturating_sub(promotion)
    );
}
