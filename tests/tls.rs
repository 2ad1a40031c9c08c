//! The crate over TLS (`rediss://`) to a real TLS-only redis-server, verified against a
//! private CA, with a client certificate where the server asks for one.

mod support;

#[path = "support/proxy_process.rs"]
mod proxy_process;

use std::time::Duration;

use http::StatusCode;
use support::tls::TlsRedis;
use support::{stampede, Upstream};
use tower::Layer;
use tower_stampede::{Backend, RedisProblem, RedisState, StampedeLayer, TlsOptions};

fn tls_options(tls: &TlsRedis, ca: &std::path::Path, client_cert: bool) -> TlsOptions {
    let options = TlsOptions::new().ca_pem(std::fs::read(ca).unwrap());
    if client_cert {
        options.client_cert(
            std::fs::read(tls.client_cert_path()).unwrap(),
            std::fs::read(tls.client_key_path()).unwrap(),
        )
    } else {
        options
    }
}

fn node(tls: &TlsRedis, options: TlsOptions) -> StampedeLayer {
    StampedeLayer::builder()
        .backend(
            Backend::redis(tls.url())
                .unwrap()
                .with_tls(options)
                .unwrap(),
        )
        .redis_timeout(Duration::from_secs(1))
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_over_tls_coalesces_and_a_wrong_ca_is_named_and_fails_open() {
    let tls = tokio::task::spawn_blocking(TlsRedis::start_mutual)
        .await
        .unwrap();
    assert!(tls.url().starts_with("rediss://"));

    // 300 clients over 3 nodes, verified against the test CA with a client certificate.
    let upstream = Upstream::new(Duration::from_millis(200));
    let layers: Vec<_> = (0..3)
        .map(|_| node(&tls, tls_options(&tls, &tls.ca_pem_path(), true)))
        .collect();
    let health = layers[0].check_backend().await;
    assert!(health.is_up(), "{health}");
    let services: Vec<_> = layers.iter().map(|l| l.layer(upstream.service())).collect();
    let results = stampede(&services, &["/hot"], 300).await;
    assert!(results
        .iter()
        .all(|r| r.1 == StatusCode::OK && r.3 == "/hot #1"));
    assert_eq!(upstream.calls(), 1, "one upstream call over TLS");
    let heard: u64 = layers.iter().map(|l| l.stats().wakeups).sum();
    assert!(
        heard >= 2,
        "the waiting nodes heard the wake-up over TLS: {heard}"
    );

    // A wrong CA: the check names the certificate problem; requests are answered anyway.
    let wrong = node(&tls, tls_options(&tls, &tls.wrong_ca_pem_path(), true));
    let health = wrong.check_backend().await;
    match &health.redis {
        RedisState::Down(RedisProblem::Tls(cause)) => {
            assert!(cause.contains("UnknownIssuer"), "{cause}")
        }
        other => panic!("expected a TLS problem, got {other:?}"),
    }
    let text = health.to_string();
    assert!(
        text.contains("TLS") && text.contains("UnknownIssuer"),
        "{text}"
    );
    eprintln!("wrong CA: {text}");
    let origin = Upstream::new(Duration::ZERO);
    let results = stampede(&[wrong.layer(origin.service())], &["/open"], 5).await;
    assert!(results.iter().all(|r| r.1 == StatusCode::OK), "fails open");

    // The proxy's flags: the CA and client certificate from files; with a wrong CA and
    // --require-redis it refuses to start, saying why.
    let (ca, cert, key, wrong_ca) = (
        tls.ca_pem_path(),
        tls.client_cert_path(),
        tls.client_key_path(),
        tls.wrong_ca_pem_path(),
    );
    let args = |ca: &std::path::Path| -> Vec<String> {
        [
            "--redis",
            tls.url().as_str(),
            "--redis-ca",
            ca.to_str().unwrap(),
            "--redis-client-cert",
            cert.to_str().unwrap(),
            "--redis-client-key",
            key.to_str().unwrap(),
            "--require-redis",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let good = args(&ca);
    let proxy = tokio::task::spawn_blocking(move || {
        let good: Vec<&str> = good.iter().map(String::as_str).collect();
        proxy_process::Proxy::start("http://127.0.0.1:9", &good).output()
    })
    .await
    .unwrap();
    assert!(proxy.contains("answered"), "{proxy}");
    let mut refused = std::process::Command::new(proxy_process::proxy_binary());
    refused
        .args([
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "http://127.0.0.1:9",
        ])
        .args(args(&wrong_ca))
        .env("NO_COLOR", "1")
        .env_remove("REDIS_URL");
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || refused.output().unwrap()),
    )
    .await
    .expect("the proxy exits")
    .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("TLS handshake") && said.contains("UnknownIssuer"),
        "{said}"
    );

    // No client certificate where the server asks for one: named too.
    let without = node(&tls, tls_options(&tls, &tls.ca_pem_path(), false));
    let health = without.check_backend().await;
    assert!(
        matches!(&health.redis, RedisState::Down(RedisProblem::Tls(c)) if c.contains("CertificateRequired")),
        "{health:?}"
    );
}
