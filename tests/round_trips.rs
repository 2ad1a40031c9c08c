//! Redis round trips per kind of request, counted with MONITOR on a real redis-server:
//! commands sent by clients, not the ones scripts run inside Redis.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{cache_status, get, text, RedisServer, Upstream};
use tower::{Layer, ServiceExt};
use tower_stampede::{Backend, StampedeLayer};

/// Records every command clients send, as MONITOR reports them.
struct Monitor {
    lines: Arc<Mutex<Vec<String>>>,
    port: u16,
}

impl Monitor {
    fn start(server: &RedisServer) -> Monitor {
        let mut stream = TcpStream::connect(("127.0.0.1", server.port())).unwrap();
        stream.write_all(b"MONITOR\r\n").unwrap();
        let mut reader = BufReader::new(stream);
        let mut ok = String::new();
        reader.read_line(&mut ok).unwrap();
        assert_eq!(ok.trim(), "+OK");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in reader.lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        Monitor {
            lines,
            port: server.port(),
        }
    }

    /// Sends a marker through MONITOR and waits for it: every command sent before it has
    /// been recorded. Returns the client commands since the previous mark.
    fn mark(&self, name: &str) -> Vec<String> {
        let marker = format!("mark-{name}");
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.write_all(format!("ECHO {marker}\r\n").as_bytes())
            .unwrap();
        let mut reply = String::new();
        BufReader::new(&s).read_line(&mut reply).unwrap();
        loop {
            {
                let mut lines = self.lines.lock().unwrap();
                if let Some(at) = lines.iter().position(|l| l.contains(&marker)) {
                    let taken: Vec<String> = lines.drain(..=at).collect();
                    return taken[..taken.len() - 1]
                        .iter()
                        // Not the scripts' own commands, nor this test's marks and polls.
                        .filter(|l| {
                            !l.contains(" lua]")
                                && !l.contains("\"ECHO\" \"mark-")
                                && !l.contains("\"KEYS\"")
                        })
                        .cloned()
                        .collect();
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn summary(cmds: &[String]) -> String {
    cmds.iter()
        .map(|c| c.split('"').nth(1).unwrap_or("?").to_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_per_request_kind() {
    let server = RedisServer::start();
    let upstream = Upstream::new(Duration::ZERO);
    let node = |_| {
        StampedeLayer::builder()
            .backend(Backend::redis(server.url()).unwrap())
            .redis_timeout(Duration::from_secs(1))
            .build()
    };
    let (a, b) = (node(0), node(1));
    let svc_a = a.layer(upstream.service());
    let svc_b = b.layer(upstream.service());

    // Warm up: load the scripts and let each node subscribe to wake-ups.
    svc_a.clone().oneshot(get("/warm")).await.unwrap();
    svc_b.clone().oneshot(get("/warm")).await.unwrap();
    svc_b.clone().oneshot(get("/warm2")).await.unwrap();
    let mut conn = server.conn().await;
    loop {
        let (_, subscribers): (String, u64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg("stampede:ready")
            .query_async(&mut conn)
            .await
            .unwrap();
        if subscribers == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let monitor = Monitor::start(&server);
    monitor.mark("start");

    let res = svc_a.clone().oneshot(get("/k")).await.unwrap();
    assert!(cache_status(&res).contains("stored"));
    // The answer goes out first; the store-release-publish follows it.
    let values = || async {
        let mut conn = server.conn().await;
        redis::AsyncCommands::keys::<_, Vec<String>>(&mut conn, "stampede:*:v")
            .await
            .unwrap()
            .len()
    };
    while values().await < 3 {
        tokio::task::yield_now().await;
    }
    let leader_miss = monitor.mark("leader");

    let res = svc_a.clone().oneshot(get("/k")).await.unwrap();
    assert!(cache_status(&res).contains("detail=memory"));
    let l1_hit = monitor.mark("l1");

    let res = svc_b.clone().oneshot(get("/k")).await.unwrap();
    assert!(cache_status(&res).contains("detail=redis"));
    let l2_hit = monitor.mark("l2");

    // A waiter: node B asks while node A holds the lock on a slow key.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let started = Arc::new(tokio::sync::Notify::new());
    let slow = {
        let (gate, started) = (gate.clone(), started.clone());
        tower::service_fn(
            move |_req: http::Request<http_body_util::Full<bytes::Bytes>>| {
                let (gate, started) = (gate.clone(), started.clone());
                async move {
                    started.notify_one();
                    let _p = gate.acquire().await.unwrap();
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from("slow value")),
                    ))
                }
            },
        )
    };
    let leader = tokio::spawn(a.layer(slow.clone()).oneshot(get("/slow")));
    started.notified().await;
    monitor.mark("leader-started");
    let waited_before = b.stats().lock_waited;
    let waiter = tokio::spawn(b.layer(slow).oneshot(get("/slow")));
    // The waiter's one check has reached Redis (and found the lock held).
    while b.stats().lock_waited == waited_before {
        tokio::task::yield_now().await;
    }
    gate.add_permits(1);
    let leader_res = leader.await.unwrap().unwrap();
    let waiter_res = waiter.await.unwrap().unwrap();
    assert!(
        cache_status(&waiter_res).contains("collapsed; detail=fleet"),
        "{}",
        cache_status(&waiter_res)
    );
    assert_eq!(text(leader_res).await, "slow value");
    assert_eq!(text(waiter_res).await, "slow value");
    // The waiter was answered by the wake-up, so the leader's store-release-publish has
    // run; the waiter's node leaves the key's channel once nobody there waits on it.
    let mut conn = server.conn().await;
    loop {
        let channels: Vec<String> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg("stampede:*:wake")
            .query_async(&mut conn)
            .await
            .unwrap();
        if channels.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let waiter_and_leader: Vec<String> = monitor
        .mark("waiter")
        .into_iter()
        // Not this test's polls.
        .filter(|c| c.split('"').nth(1) != Some("PUBSUB"))
        .collect();
    let count = |name: &str| {
        waiter_and_leader
            .iter()
            .filter(|c| c.split('"').nth(1) == Some(name))
            .count()
    };
    // The leader's one EVALSHA; the waiter's check, and at most one re-check right after
    // its subscription to the key's channel was confirmed.
    let by_waiter = count("EVALSHA") - 1;

    println!("| request kind | Redis round trips | commands |");
    println!("|---|---|---|");
    println!("| L1 hit | {} | {} |", l1_hit.len(), summary(&l1_hit));
    println!("| L2 hit | {} | {} |", l2_hit.len(), summary(&l2_hit));
    println!(
        "| leader miss | {} | {} |",
        leader_miss.len(),
        summary(&leader_miss)
    );
    println!(
        "| waiter on another node | {by_waiter} + SUBSCRIBE/UNSUBSCRIBE of the key's channel + the wake-up | {} |",
        summary(&waiter_and_leader)
    );

    assert_eq!(l1_hit.len(), 0, "{l1_hit:?}");
    assert_eq!(l2_hit.len(), 1, "{l2_hit:?}");
    assert_eq!(leader_miss.len(), 2, "{leader_miss:?}");
    assert!((1..=2).contains(&by_waiter), "{waiter_and_leader:?}");
    // One subscription for the wait, on the node's pub/sub connection, and nothing else.
    assert_eq!(count("SUBSCRIBE"), 1, "{waiter_and_leader:?}");
    assert_eq!(count("UNSUBSCRIBE"), 1, "{waiter_and_leader:?}");
    assert_eq!(
        waiter_and_leader.len(),
        by_waiter + 3,
        "{waiter_and_leader:?}"
    );
}
