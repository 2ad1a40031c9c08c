//! Wake-up traffic grows with the nodes that wait on a key, not with the fleet: a fill
//! nobody else waits on costs Redis no output to the other nodes, however many there are.

mod support;

use std::time::{Duration, Instant};

use support::RedisServer;
use tower_stampede::{Backend, Cache};

const NODES: usize = 20;
const FILLS: usize = 100;
const VALUE: usize = 16 * 1024;

/// What Redis has sent to its clients so far (`INFO stats`).
async fn output_bytes(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(conn)
        .await
        .unwrap();
    support::info_field(&info, "total_net_output_bytes")
        .and_then(|v| v.parse().ok())
        .expect("total_net_output_bytes in INFO stats")
}

/// Runs `cmd` (a small reply each time) until it answers `want`, bounded.
async fn until<T>(conn: &mut redis::aio::MultiplexedConnection, cmd: &redis::Cmd, want: T)
where
    T: PartialEq + std::fmt::Debug + redis::FromRedisValue,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got: T = cmd.query_async(conn).await.unwrap();
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{cmd:?}: {got:?}, not {want:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The number of stored values, as one integer (not the key names).
fn values() -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg("return #redis.call('KEYS', ARGV[1])")
        .arg(0)
        .arg("stampede:*:v");
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_nobody_waits_on_sends_no_value_to_the_fleet() {
    let server = RedisServer::start();
    let caches: Vec<Cache<String>> = (0..NODES)
        .map(|_| {
            Cache::builder()
                .backend(Backend::redis(server.url()).unwrap())
                .redis_timeout(Duration::from_secs(1))
                .build()
        })
        .collect();
    // Every node makes a request, so that its pub/sub connection is live.
    for (i, cache) in caches.iter().enumerate() {
        let v = cache
            .get_with(format!("warm{i}"), async { "w".to_owned() })
            .await
            .unwrap();
        assert_eq!(v, "w");
    }
    let mut conn = server.conn().await;
    let mut numsub = redis::cmd("PUBSUB");
    numsub.arg("NUMSUB").arg("stampede:ready");
    until(
        &mut conn,
        &numsub,
        ("stampede:ready".to_owned(), NODES as u64),
    )
    .await;
    until(&mut conn, &values(), NODES as u64).await;

    let before = output_bytes(&mut conn).await;
    for i in 0..FILLS {
        let v = caches[0]
            .get_with(format!("fill{i}"), async { "x".repeat(VALUE) })
            .await
            .unwrap();
        assert_eq!(v.len(), VALUE);
    }
    // The answer goes out before the store: wait for every store to land.
    until(&mut conn, &values(), (NODES + FILLS) as u64).await;
    let after = output_bytes(&mut conn).await;

    let grown = after - before;
    eprintln!(
        "{NODES} nodes subscribed, {FILLS} fills of {VALUE} B by one node, nobody waiting: \
         Redis sent {grown} B, {} B per fill",
        grown / FILLS as u64
    );
    assert!(
        grown <= (2 * VALUE * FILLS) as u64,
        "Redis sent {grown} B for {FILLS} fills of {VALUE} B"
    );
}
