//! An axum app with one slow route behind `tower-stampede`, and one left bare for contrast.
//!
//! ```text
//! cargo run --example axum                                   # local backend, 127.0.0.1:3000
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --example axum -- --listen 127.0.0.1:3001
//! ```
//!
//! Routes:
//!
//! * `GET /report/{id}`: a database stand-in (300 ms, counted) behind the layer, on that
//!   route only;
//! * `GET /live/{id}`: the same query without the layer;
//! * `GET /stats`: the layer's counters and how often each handler ran.
//!
//! Try it:
//!
//! ```text
//! curl -i localhost:3000/report/1    # 300 ms; cache-status: tower-stampede; fwd=miss; stored
//! curl -i localhost:3000/report/1    # at once; cache-status: tower-stampede; hit; detail=memory
//! # a stampede on a cold key: 100 concurrent requests, one handler call
//! seq 100 | xargs -P 100 -I{} curl -s -o /dev/null localhost:3000/report/2
//! # the same on the bare route: 100 handler calls
//! seq 100 | xargs -P 100 -I{} curl -s -o /dev/null localhost:3000/live/2
//! curl localhost:3000/stats
//! ```
//!
//! With `REDIS_URL` set, instances form a fleet: a stampede spread over all of them still
//! runs the handler once per key. The default key includes the `Host` header, so give every
//! instance the same one, as a load balancer would:
//!
//! ```text
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --example axum -- --listen 127.0.0.1:3001 &
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --example axum -- --listen 127.0.0.1:3002 &
//! seq 200 | xargs -P 200 -I{} sh -c \
//!     'curl -s -o /dev/null -H "host: reports.local" localhost:300$(( {} % 2 + 1 ))/report/9'
//! curl localhost:3001/stats; curl localhost:3002/stats   # report_handler_calls: 1 between them
//! ```
//!
//! Options: `--listen ADDR` (default `127.0.0.1:3000`, or `127.0.0.1:$PORT`; port `0`
//! picks a free one), `--redis URL` (or `REDIS_URL`; `--redis-url` is an alias), `--ttl 30s`,
//! `--log-format json|text`. The address is printed as `listening on ADDR`. Logs go to
//! stderr (`RUST_LOG` filters them), coloured only on a terminal. At start-up it says
//! whether Redis answers (`redis at ADDR answered`, or why not).

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use clap::Parser;
use tower_stampede::{Backend, StampedeLayer};
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(about = "An axum app with one route behind tower-stampede")]
struct Args {
    /// Where to listen [default: 127.0.0.1:3000, or 127.0.0.1:$PORT]. Port 0 picks a free one.
    #[arg(long)]
    listen: Option<SocketAddr>,

    /// The port on 127.0.0.1 when --listen is not given.
    #[arg(long, env = "PORT")]
    port: Option<u16>,

    /// Redis shared by the instances of a fleet; without it, the local backend.
    #[arg(long, env = "REDIS_URL", alias = "redis-url")]
    redis: Option<String>,

    /// Log lines as `text` (default) or `json` (one object a line).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// How long a report stays cached, e.g. `30s` or `5m`.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    ttl: Duration,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines (coloured only on a terminal).
    Text,
    /// One JSON object a line.
    Json,
}

/// The app's state: the "database" and the layer, for `/stats`.
#[derive(Clone)]
struct AppState {
    db: Arc<Database>,
    stampede: StampedeLayer,
}

/// A slow database: every query takes 300 ms and is counted, per route.
#[derive(Default)]
struct Database {
    report_queries: AtomicUsize,
    live_queries: AtomicUsize,
}

impl Database {
    /// Runs the "query" for report `id`; `counter` counts the calls of one route.
    async fn report(&self, counter: &AtomicUsize, id: &str) -> String {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
        format!("{{\"report\":{id:?},\"generated_by_query\":{n}}}\n")
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().with_ansi(false).init(),
    }

    let backend = match args.redis.as_deref().filter(|u| !u.is_empty()) {
        Some(url) => {
            // Not the URL itself: it may hold a password. The check below names the address.
            tracing::info!("redis backend: instances sharing it form one fleet");
            Backend::redis(url)?
        }
        None => {
            tracing::info!(
                "local backend: coalescing within this process (set REDIS_URL for a fleet)"
            );
            Backend::local()
        }
    };
    let stampede = StampedeLayer::builder()
        .backend(backend)
        .prefix("tower-stampede-axum-example")
        .ttl(args.ttl)
        .build();
    stampede.check_backend().await;

    let state = AppState {
        db: Arc::default(),
        stampede: stampede.clone(),
    };
    let app = Router::new()
        // The layer on this one route: GET and HEAD of /report/{id} are cached.
        .route("/report/{id}", get(report).layer(stampede))
        .route("/live/{id}", get(live))
        .route("/stats", get(stats))
        .with_state(state);

    let addr = args
        .listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], args.port.unwrap_or(3000))));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    println!("listening on {addr}");
    println!("try: curl -i http://{addr}/report/1   (then again, and see /stats)");

    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

/// The protected route.
async fn report(State(state): State<AppState>, Path(id): Path<String>) -> impl IntoResponse {
    let body = state.db.report(&state.db.report_queries, &id).await;
    ([(CONTENT_TYPE, "application/json")], body)
}

/// The same query, unprotected.
async fn live(State(state): State<AppState>, Path(id): Path<String>) -> impl IntoResponse {
    let body = state.db.report(&state.db.live_queries, &id).await;
    ([(CONTENT_TYPE, "application/json")], body)
}

/// The layer's counters and the handler calls, as JSON.
async fn stats(State(state): State<AppState>) -> impl IntoResponse {
    let s = state.stampede.stats();
    let layer = [
        ("hits_memory", s.hits_memory),
        ("hits_redis", s.hits_redis),
        ("misses", s.misses),
        ("collapsed_local", s.collapsed_local),
        ("collapsed_remote", s.collapsed_remote),
        ("upstream_calls", s.upstream_calls),
        ("stored", s.stored),
        ("uncacheable", s.uncacheable),
        ("hit_for_pass", s.hit_for_pass),
        ("lock_acquired", s.lock_acquired),
        ("lock_waited", s.lock_waited),
        ("redis_errors", s.redis_errors),
        ("bypassed", s.bypassed),
    ]
    .iter()
    .map(|(name, value)| format!("    \"{name}\": {value}"))
    .collect::<Vec<_>>()
    .join(",\n");
    let body = format!(
        "{{\n  \"report_handler_calls\": {},\n  \"live_handler_calls\": {},\n  \"layer\": {{\n{layer}\n  }}\n}}\n",
        state.db.report_queries.load(Ordering::SeqCst),
        state.db.live_queries.load(Ordering::SeqCst),
    );
    ([(CONTENT_TYPE, "application/json")], body)
}
