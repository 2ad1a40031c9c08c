//! The Redis deployments besides a single server (Cluster, TLS, Sentinel), each started
//! by `tests/support` and driven with a plain redis-rs client, so that the support code
//! itself is proven before the crate's backends are tested on it.

mod support;

use std::time::{Duration, Instant};

use redis::cluster::ClusterClientBuilder;
use redis::sentinel::{SentinelClient, SentinelServerType};
use redis::{AsyncCommands, ClientTlsConfig, PushKind, TlsCertificates, Value};
use support::cluster::{key_slot, LoneNode, RedisCluster};
use support::sentinel::SentinelSetup;
use support::tls::TlsRedis;

/// How long a client-side step may take before the test fails.
const LIMIT: Duration = Duration::from_secs(30);

#[test]
fn key_slot_matches_the_cluster_spec() {
    // CRC16/XMODEM check value, and the hash-tag rules of the Redis Cluster spec.
    assert_eq!(key_slot("123456789"), 0x31c3);
    assert_eq!(key_slot("foo"), 12182);
    assert_eq!(key_slot("bar"), 5061);
    assert_eq!(key_slot("{user1000}.following"), key_slot("user1000"));
    assert_eq!(key_slot("{user1000}.followers"), key_slot("user1000"));
    assert_eq!(key_slot("foo{}{bar}"), key_slot("foo{}{bar}"));
    assert_ne!(key_slot("foo{}{bar}"), key_slot("bar"));
    assert_eq!(key_slot("foo{{bar}}zap"), key_slot("{bar"));
    assert_eq!(key_slot("foo{bar}{zap}"), key_slot("bar"));
}

#[test]
fn key_slot_matches_cluster_keyslot() {
    let node = LoneNode::start();
    let keys = [
        "prefix:{abc}:v",
        "prefix:{abc}:lock",
        "{abc}",
        "abc",
        "",
        "{",
        "}",
        "{}",
        "}{abc}",
        "a{b}c{d}",
        "foo{}{bar}",
        "foo{{bar}}zap",
        "tower-stampede:v:0123456789abcdef",
        "ключ{слот}",
    ];
    for key in keys {
        let theirs: u16 =
            support::query(node.port(), redis::cmd("CLUSTER").arg("KEYSLOT").arg(key)).unwrap();
        assert_eq!(key_slot(key), theirs, "slot of {key:?}");
    }
}

/// Waits (bounded) for the next sharded message on `rx`, skipping other pushes
/// (subscription confirmations).
async fn next_smessage(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let push = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("a sharded message within the limit")
            .expect("push channel open");
        if push.kind == PushKind::SMessage {
            return push.data;
        }
    }
}

/// `SPUBLISH` until a subscriber receives it (bounded): right after a failover the client
/// may not have subscribed again on the new master yet.
async fn spublish_until_heard(
    conn: &mut redis::cluster_async::ClusterConnection,
    channel: &str,
    payload: &str,
) {
    let deadline = Instant::now() + LIMIT;
    loop {
        let heard: redis::RedisResult<i64> = redis::cmd("SPUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async(conn)
            .await;
        if matches!(heard, Ok(n) if n > 0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "SPUBLISH {payload} never heard: {heard:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_serves_every_master_shard_pubsub_and_survives_a_failover() {
    let mut cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3, "{masters:?}");

    // One key per master, found by slot.
    let mut keys = Vec::new();
    tokio::task::block_in_place(|| {
        for master in &masters {
            let key = (0..)
                .map(|i| format!("tower-stampede:k{i}"))
                .find(|k| cluster.master_of_slot(key_slot(k)) == *master)
                .unwrap();
            keys.push(key);
        }
    });

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let client = ClusterClientBuilder::new(cluster.urls())
        .use_protocol(redis::ProtocolVersion::RESP3)
        .push_sender(tx)
        .build()
        .unwrap();
    let mut conn = client.get_async_connection().await.unwrap();
    for key in &keys {
        let () = conn.set(key, format!("v:{key}")).await.unwrap();
    }
    for key in &keys {
        let got: String = conn.get(key).await.unwrap();
        assert_eq!(got, format!("v:{key}"));
    }

    // Sharded pub/sub on a hash-tagged channel: the shard of `{abc}` carries it.
    let channel = "tower-stampede:{abc}:wake";
    let tagged_key = "tower-stampede:{abc}:v";
    assert_eq!(key_slot(channel), key_slot(tagged_key));
    conn.ssubscribe(channel).await.unwrap();
    spublish_until_heard(&mut conn, channel, "before").await;
    let data = next_smessage(&mut rx).await;
    assert_eq!(
        data,
        vec![
            Value::BulkString(channel.into()),
            Value::BulkString(b"before".to_vec())
        ]
    );
    let () = conn.set(tagged_key, "before").await.unwrap();
    // From a script too (the crate publishes its wake-ups from Lua): the channel shares
    // the key's hash tag, so the script runs on the shard that carries the channel.
    let heard: i64 = redis::cmd("EVAL")
        .arg("redis.call('SET', KEYS[1], ARGV[2]) return redis.call('SPUBLISH', ARGV[1], ARGV[2])")
        .arg(1)
        .arg(tagged_key)
        .arg(channel)
        .arg("from-lua")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(heard, 1);
    let data = next_smessage(&mut rx).await;
    assert_eq!(data.get(1), Some(&Value::BulkString(b"from-lua".to_vec())));

    // Kill the master of that shard; a replica takes over and the client follows.
    let old = tokio::task::block_in_place(|| cluster.master_of_slot(key_slot(channel)));
    let killed_at = Instant::now();
    tokio::task::block_in_place(|| cluster.kill(old));
    let new = tokio::task::block_in_place(|| cluster.wait_for_failover(old));
    let failover = killed_at.elapsed();
    assert_ne!(new, old);
    assert_eq!(
        tokio::task::block_in_place(|| cluster.master_of_slot(key_slot(channel))),
        new
    );
    assert!(!tokio::task::block_in_place(|| cluster.masters()).contains(&old));

    let () = conn.set(tagged_key, "after").await.unwrap();
    let got: String = conn.get(tagged_key).await.unwrap();
    assert_eq!(got, "after");
    for key in &keys {
        let () = conn.set(key, "again").await.unwrap();
    }
    // redis-rs 1.8.1 re-subscribes tracked shard channels after a topology change, but
    // against Redis 7.0 that left no live subscription on the new master (SPUBLISH there
    // reached 0 subscribers for 30 s), so the subscriber subscribes again itself.
    conn.ssubscribe(channel).await.unwrap();
    spublish_until_heard(&mut conn, channel, "after").await;
    loop {
        let data = next_smessage(&mut rx).await;
        if data.get(1) == Some(&Value::BulkString(b"after".to_vec())) {
            break;
        }
    }
    eprintln!(
        "cluster: master :{old} killed, :{new} serving its slots after {failover:?}; \
         client back after {:?}",
        killed_at.elapsed()
    );
}

fn tls_client(tls: &TlsRedis, ca: &std::path::Path, client_cert: bool) -> redis::Client {
    let client_tls = client_cert.then(|| ClientTlsConfig {
        client_cert: std::fs::read(tls.client_cert_path()).unwrap(),
        client_key: std::fs::read(tls.client_key_path()).unwrap(),
    });
    let certs = TlsCertificates {
        client_tls,
        root_cert: Some(std::fs::read(ca).unwrap()),
    };
    redis::Client::build_with_tls(tls.url(), certs).unwrap()
}

/// Connects and runs one PING (a refused client certificate shows up only once the
/// server reads from the connection, after the client's side of the handshake).
async fn tls_ping(client: &redis::Client) -> redis::RedisResult<String> {
    let attempt = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async(&mut conn).await
    };
    tokio::time::timeout(LIMIT, attempt)
        .await
        .expect("a TLS attempt ends within the limit")
}

fn install_crypto_provider() {
    // Fails when another test installed it first, which is just as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[tokio::test]
async fn tls_verifies_against_the_test_ca_and_refuses_a_wrong_ca() {
    install_crypto_provider();
    let tls = tokio::task::spawn_blocking(TlsRedis::start).await.unwrap();
    assert!(tls.url().starts_with("rediss://127.0.0.1:"));

    let client = tls_client(&tls, &tls.ca_pem_path(), false);
    assert_eq!(tls_ping(&client).await.unwrap(), "PONG");
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let () = conn.set("k", "v").await.unwrap();
    let got: String = conn.get("k").await.unwrap();
    assert_eq!(got, "v");

    let wrong = tls_client(&tls, &tls.wrong_ca_pem_path(), false);
    let err = tls_ping(&wrong).await.unwrap_err().to_string();
    assert!(
        err.contains("invalid peer certificate") && err.contains("UnknownIssuer"),
        "{err}"
    );

    // The same server accepts a client certificate it can verify.
    let with_cert = tls_client(&tls, &tls.ca_pem_path(), true);
    assert_eq!(tls_ping(&with_cert).await.unwrap(), "PONG");
}

#[tokio::test]
async fn mutual_tls_needs_the_client_certificate() {
    install_crypto_provider();
    let tls = tokio::task::spawn_blocking(TlsRedis::start_mutual)
        .await
        .unwrap();

    let with_cert = tls_client(&tls, &tls.ca_pem_path(), true);
    assert_eq!(tls_ping(&with_cert).await.unwrap(), "PONG");

    let without = tls_client(&tls, &tls.ca_pem_path(), false);
    let err = tls_ping(&without).await.unwrap_err().to_string();
    // TLS 1.3: the server refuses after the client's side of the handshake is done.
    assert!(err.contains("CertificateRequired"), "{err}");
}

async fn tcp_port(conn: &mut redis::aio::MultiplexedConnection) -> u16 {
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(conn)
        .await
        .unwrap();
    support::info_field(&info, "tcp_port")
        .and_then(|p| p.parse().ok())
        .expect("tcp_port in INFO server")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_client_follows_a_promotion() {
    let mut setup = tokio::task::spawn_blocking(|| SentinelSetup::start("stampede"))
        .await
        .unwrap();
    assert_eq!(setup.master_name(), "stampede");
    assert_eq!(setup.sentinel_urls().len(), 3);

    let mut client = SentinelClient::build(
        setup.sentinel_urls(),
        setup.master_name(),
        None,
        SentinelServerType::Master,
    )
    .unwrap();
    let mut conn = client.get_async_connection().await.unwrap();
    assert_eq!(tcp_port(&mut conn).await, setup.master_port());
    let () = conn.set("k", "before").await.unwrap();
    // The replica has the write before the master goes.
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(LIMIT.as_millis() as u64)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(acked, 1);

    let killed_at = Instant::now();
    setup.kill_master();
    let new = tokio::task::block_in_place(|| setup.wait_for_promotion());
    let promotion = killed_at.elapsed();
    assert_eq!(new, setup.replica_port());

    let mut conn = client.get_async_connection().await.unwrap();
    assert_eq!(tcp_port(&mut conn).await, new);
    let got: String = conn.get("k").await.unwrap();
    assert_eq!(got, "before");
    let () = conn.set("k", "after").await.unwrap();
    eprintln!("sentinel: master killed, replica :{new} promoted after {promotion:?}");
}
