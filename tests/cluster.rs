//! The crate on a real Redis Cluster (3 masters, 3 replicas): coalescing across nodes with
//! each key's scripts on its slot's master and its wake-ups over sharded pub/sub, values
//! spread over every master, and a master's failover survived with no failed request.

mod support;

#[path = "support/proxy_process.rs"]
mod proxy_process;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use sha2::{Digest, Sha256};
use support::cluster::{key_slot, RedisCluster};
use support::{get, stampede, Upstream};
use tower::{Layer, ServiceExt};
use tower_stampede::{Backend, Cache, StampedeLayer};

/// A layer node on the cluster. The deadline is generous: these tests are about
/// coalescing, and a machine running other suites must not look like a slow Redis.
fn node(cluster: &RedisCluster) -> StampedeLayer {
    StampedeLayer::builder()
        .backend(Backend::redis_cluster(cluster.urls()).unwrap())
        .redis_timeout(Duration::from_secs(1))
        .build()
}

/// The Redis value key of `path` (the layer's default key).
fn value_key(path: &str) -> String {
    let canonical = format!("GET http://test{path}");
    let hex: String = Sha256::digest(canonical.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("stampede:{{{hex}}}:v")
}

/// A fresh path whose key lives in a slot `master` serves.
fn path_on(cluster: &RedisCluster, master: u16, tag: &str) -> String {
    (0..)
        .map(|i| format!("/{tag}{i}"))
        .find(|p| cluster.master_of_slot(key_slot(&value_key(p))) == master)
        .unwrap()
}

fn values_on(port: u16) -> u64 {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg("return #redis.call('KEYS', ARGV[1])")
        .arg(0)
        .arg("stampede:*:v");
    support::query(port, &cmd).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_coalesces_spreads_values_and_survives_a_failover() {
    let mut cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3, "{masters:?}");
    let upstream = Upstream::new(Duration::from_millis(200));
    let layers: Vec<StampedeLayer> = (0..3).map(|_| node(&cluster)).collect();
    let services: Vec<_> = layers.iter().map(|l| l.layer(upstream.service())).collect();

    // 300 concurrent requests on one cold key, over 3 nodes: one upstream call.
    let results = stampede(&services, &["/hot"], 300).await;
    assert!(results
        .iter()
        .all(|r| r.1 == StatusCode::OK && r.3 == "/hot #1"));
    assert_eq!(upstream.calls(), 1, "one upstream call for the whole fleet");
    // The other two nodes waited on the leader's lock and heard its sharded wake-up.
    let heard: u64 = layers.iter().map(|l| l.stats().wakeups).sum();
    assert!(heard >= 2, "{heard} wake-ups heard");

    // 3000 over 100 cold keys: 100 calls, and the values on every master.
    let fast = Upstream::new(Duration::from_millis(50));
    let services: Vec<_> = layers.iter().map(|l| l.layer(fast.service())).collect();
    let paths: Vec<String> = (0..100).map(|i| format!("/k{i}")).collect();
    let results = stampede(&services, &paths, 30).await;
    assert_eq!(results.len(), 3000);
    assert!(results.iter().all(|r| r.1 == StatusCode::OK));
    assert_eq!(fast.calls(), 100);
    let deadline = Instant::now() + Duration::from_secs(20);
    let spread = loop {
        let spread: Vec<u64> =
            tokio::task::block_in_place(|| masters.iter().map(|&port| values_on(port)).collect());
        if spread.iter().sum::<u64>() == 101 || Instant::now() > deadline {
            break spread;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("values per master {masters:?}: {spread:?}");
    assert_eq!(spread.iter().sum::<u64>(), 101, "{spread:?}");
    assert!(spread.iter().all(|&n| n > 0), "{spread:?}");

    // A Cache<String> on the cluster: 3 nodes x 100 concurrent try_get_with, one init.
    let caches: Vec<Cache<String>> = (0..3)
        .map(|_| {
            Cache::builder()
                .backend(Backend::redis_cluster(cluster.urls()).unwrap())
                .redis_timeout(Duration::from_secs(1))
                .build()
        })
        .collect();
    let inits = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(300));
    let calls: Vec<_> = (0..300)
        .map(|i| {
            let (cache, inits, barrier) = (caches[i % 3].clone(), inits.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                cache
                    .try_get_with("profile:42", async move {
                        inits.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Ok::<_, std::io::Error>("ada".to_owned())
                    })
                    .await
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap(), "ada");
    }
    assert_eq!(inits.load(Ordering::SeqCst), 1, "one init across the nodes");

    // The proxy on the cluster (`--redis-cluster URL,URL,...`): Redis answers it.
    let urls = cluster.urls().join(",");
    let proxy = tokio::task::spawn_blocking(move || {
        proxy_process::Proxy::start(
            "http://127.0.0.1:9",
            &["--redis-cluster", &urls, "--require-redis"],
        )
        .output()
    })
    .await
    .unwrap();
    assert!(proxy.contains("(cluster) answered"), "{proxy}");

    // A master killed under load: every request answered (its keys fail open meanwhile).
    let load = Upstream::new(Duration::from_millis(20));
    let services: Vec<_> = layers.iter().map(|l| l.layer(load.service())).collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (answered, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let workers: Vec<_> = (0..30)
        .map(|w| {
            let svc = services[w % 3].clone();
            let (stop, answered, failed) = (stop.clone(), answered.clone(), failed.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    // Cold keys and hot ones, on every shard.
                    let path = if i % 2 == 0 {
                        format!("/load{w}-{i}")
                    } else {
                        format!("/k{}", i % 100)
                    };
                    let res = svc.clone().oneshot(get(&path)).await.unwrap();
                    if res.status() == StatusCode::OK {
                        answered.fetch_add(1, Ordering::SeqCst);
                    } else {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                    i += 1;
                }
            })
        })
        .collect();
    let victim = masters[0];
    let cold_after = tokio::task::block_in_place(|| path_on(&cluster, victim, "after"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed_at = Instant::now();
    tokio::task::block_in_place(|| cluster.kill(victim));
    let promoted = tokio::task::block_in_place(|| cluster.wait_for_failover(victim));
    let failover = killed_at.elapsed();
    // Load goes on a little past the promotion.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    eprintln!(
        "master :{victim} killed under load, :{promoted} promoted after {failover:?}: \
         {} answered, {} failed",
        answered.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst)
    );
    assert_eq!(failed.load(Ordering::SeqCst), 0, "no failed request");
    assert!(answered.load(Ordering::SeqCst) > 0);

    // After the failover, a new cold key on the shard that failed over is coalesced
    // again: one upstream call (tried with fresh keys until the nodes have caught up).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut attempt = 0;
    let recovered = loop {
        let origin = Upstream::new(Duration::from_millis(200));
        let services: Vec<_> = layers.iter().map(|l| l.layer(origin.service())).collect();
        let path = format!("{cold_after}-{attempt}");
        let path = if attempt == 0 {
            cold_after.clone()
        } else {
            tokio::task::block_in_place(|| path_on(&cluster, promoted, &path[1..]))
        };
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
            "coalescing never came back after the failover ({} calls for {path})",
            origin.calls()
        );
        attempt += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "coalescing back on the promoted shard {recovered:?} after the kill \
         ({:?} after the promotion), {attempt} earlier attempt(s) uncoalesced",
        recovered - failover
    );
}
