//! A small load tool for `benches/compare.sh`: a counting upstream, a stampede generator,
//! a cache filler and a bare server.
//!
//! ```text
//! # a counting upstream: "<path> #<n>" after 200 ms, `Cache-Control: public, max-age=60`
//! cargo run --release --example loadgen -- upstream --listen 127.0.0.1:9000 --delay 200ms
//! curl -s http://127.0.0.1:9000/__count      # requests served (paths under /__ excluded)
//! curl -s http://127.0.0.1:9000/__reset      # back to 0
//!
//! # 300 clients, released together, on one cold key spread over three front ends
//! cargo run --release --example loadgen -- stampede \
//!     --targets http://127.0.0.1:8081,http://127.0.0.1:8082,http://127.0.0.1:8083 \
//!     --clients 300 --keys 1
//! #   clients=300 keys=1 ok=300 errors=0 p50_ms=203.1 p99_ms=210.4 max_ms=211.0 ...
//!
//! # the same answer as a cache gives, from a bare hyper server (the hit path's limit)
//! cargo run --release --example loadgen -- --workers 1 bare --listen 127.0.0.1:9100 \
//!     --copy-of http://127.0.0.1:8081/2k/hot
//!
//! # 100k distinct 2 KiB answers through a cache, 64 at a time
//! cargo run --release --example loadgen -- fill --target http://127.0.0.1:8081 \
//!     --keys 100000 --prefix /2k/ --concurrency 64
//! ```
//!
//! The upstream's paths:
//!
//! * `/__count`: the number of requests it served, not counting the `/__` paths;
//! * `/__reset`: sets that count (and the per-path counts) back to 0;
//! * `/__arrivals`: when each counted request arrived since the last `/__arrivals`, in
//!   Unix µs, sorted, space-separated (then forgotten);
//! * `/__warm` (and any other `/__` path): `ok` at once, uncounted, cacheable (the
//!   stampede uses it to open and check its connections before the clock starts);
//! * `/2k/...`: `"<path> #<n>"` padded to exactly 2048 bytes;
//! * `/nostore/...`: `"<path> #<n>"` with `Cache-Control: no-store` (never stored: each
//!   leaves a hit-for-pass marker in the cache);
//! * anything else: `"<path> #<n>"`, where `n` counts the calls for that path.
//!
//! Every counted answer comes after `--delay` and, but for `/nostore/`, carries
//! `Cache-Control: public, max-age=60`.
//!
//! **How the stampede measures.** Each client owns one HTTP/1.1 keep-alive connection
//! (hyper's connection-level client), opened before the clock starts and checked with one
//! `GET /__warm` on it, so neither TCP handshakes nor a server's accept loop are part of
//! the latencies, and no client waits for another's connection. Then every client waits
//! on one `tokio::sync::Barrier`; once released it sends a single `GET` of
//! `<prefix><i % keys>-<run id>` (the run id is fresh each run, so every key is cold) to
//! target `i % targets`, and its latency runs from its release to the last byte of the
//! body. The connections stay open until the last client has its answer, so that no
//! connection's teardown lands in the middle of other clients' answers (`--close-each`
//! closes each one as soon as its answer is in). With `--phases` it also prints, for each
//! `Cache-Status` value, when the clients started, got the response head and the last
//! body byte (from the release), and with `--cpu-of PID,...` the CPU time those
//! processes, itself and the whole machine used from the release to the last answer
//! (`--cpu-mark` splits it at a point in between).

/// The proxy example's allocator, so that `bare` is measured against the proxy on equal
/// terms.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "common/process.rs"]
mod process;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Barrier, Semaphore};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Parser, Debug)]
#[command(
    name = "loadgen",
    about = "Load tools for benches/compare.sh: a counting upstream, a stampede, a cache filler, a bare server"
)]
struct Cli {
    /// Tokio worker threads (default: one per CPU). One runs a current-thread runtime, on
    /// which the commands of concurrent requests leave for Redis in one write.
    #[arg(long, global = true)]
    workers: Option<usize>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// A counting HTTP upstream that answers after a delay.
    Upstream(UpstreamArgs),
    /// Many clients released together on a few cold keys; prints one line of results.
    Stampede(StampedeArgs),
    /// Requests many distinct keys once each, to fill a cache.
    Fill(FillArgs),
    /// A bare hyper server answering every request with one answer held in memory: the
    /// limit a cache's hit path is measured against.
    Bare(BareArgs),
}

#[derive(Args, Debug)]
struct BareArgs {
    /// Address to listen on; port 0 picks a free port (logged as `listening on ADDR`).
    #[arg(long, default_value = "127.0.0.1:9100")]
    listen: SocketAddr,

    /// The answer to serve: fetched once from this URL at start (status, headers and
    /// body, less `date`, `content-length` and hop-by-hop headers, which hyper writes),
    /// so that the bare server sends the same bytes as the cache it is compared with.
    #[arg(long)]
    copy_of: Uri,
}

#[derive(Args, Debug)]
struct UpstreamArgs {
    /// Address to listen on; port 0 picks a free port (logged as `listening on ADDR`).
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,

    /// How long each counted request takes.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    delay: Duration,
}

#[derive(Args, Debug)]
struct StampedeArgs {
    /// Base URLs (`http://host:port`, comma-separated); client `i` uses target `i % n`.
    #[arg(long, value_delimiter = ',', required = true)]
    targets: Vec<Uri>,

    /// Concurrent clients, one request and one connection each.
    #[arg(long, default_value_t = 300)]
    clients: usize,

    /// Distinct keys; client `i` asks for key `i % keys`.
    #[arg(long, default_value_t = 1)]
    keys: usize,

    /// The path of key `k` is `<prefix><k>-<run id>`.
    #[arg(long, default_value = "/k")]
    prefix: String,

    /// The run id in the paths (default: fresh from the clock and the pid).
    #[arg(long)]
    run_id: Option<String>,

    /// Limit on each request, body included (an error past it).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,

    /// How many connections are opened at once while setting up.
    #[arg(long, default_value_t = 128)]
    connect_concurrency: usize,

    /// Also print, by Cache-Status value, when each phase ended (to stderr): the
    /// client's start (its first poll after the release), the response head and the last
    /// body byte, all counted from the release (the first client's start).
    #[arg(long)]
    phases: bool,

    /// Processes whose CPU time (their threads' run time, from `/proc`, Linux) is reported
    /// for the run alone, from the release to the last answer (`cpu_ms PID:MS ...` on
    /// stderr; this load generator's own as `self`, and every CPU's busy time, whoever
    /// used it, as `machine`).
    #[arg(long, value_delimiter = ',')]
    cpu_of: Vec<u32>,

    /// With `--cpu-of`: also split the CPU times at this long after the release (say,
    /// between the requests' arrival and the upstream's answers). The reading is taken on
    /// a thread of its own, and `cpu_mark_at_ms` says when it was.
    #[arg(long, value_parser = humantime::parse_duration)]
    cpu_mark: Option<Duration>,

    /// Once every client is connected and warm, print `ready` on stderr and wait this long
    /// before the release (time to start a profiler on the fronts for the burst alone).
    #[arg(long, value_parser = humantime::parse_duration)]
    release_after: Option<Duration>,

    /// Each client closes its connection as soon as its answer is in, instead of after the
    /// last client's: clients that leave at once, whose teardowns (theirs and the
    /// servers') then run among the other clients' answers.
    #[arg(long)]
    close_each: bool,
}

#[derive(Args, Debug)]
struct FillArgs {
    /// Base URL (`http://host:port`).
    #[arg(long)]
    target: Uri,

    /// Distinct keys: `<prefix>0` .. `<prefix><keys - 1>`.
    #[arg(long, default_value_t = 100_000)]
    keys: usize,

    /// Path prefix of the keys.
    #[arg(long, default_value = "/2k/")]
    prefix: String,

    /// Requests in flight at once (keep-alive connections).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,

    /// Limit on each request, body included (an error past it).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,

    /// Ask for the keys from the last to the first: a second, reversed pass over a cache
    /// that evicts the least recently used hits exactly the entries it still holds.
    #[arg(long)]
    reverse: bool,
}

fn main() -> Result<(), BoxError> {
    let cli = Cli::parse();
    // As the proxy does (its --huge-pages): the bare server and the load are measured
    // without transparent huge pages.
    process::no_huge_pages();
    let runtime = process::runtime(cli.workers)?;
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Upstream(args) => upstream(args).await,
            Command::Stampede(args) => stampede(args).await,
            Command::Fill(args) => fill(args).await,
            Command::Bare(args) => bare(args).await,
        }
    });
    // Connection tasks may still be parked on sockets; do not wait for them.
    runtime.shutdown_background();
    if let Err(e) = &result {
        eprintln!("loadgen: {e}");
    }
    result
}

// ---------------------------------------------------------------------------------------
// upstream
// ---------------------------------------------------------------------------------------

/// The upstream's counters.
#[derive(Default)]
struct Counts {
    total: AtomicU64,
    per_path: Mutex<HashMap<String, u64>>,
    /// When each counted request arrived since the last `/__arrivals`, in Unix µs.
    arrivals: Mutex<Vec<u64>>,
}

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The body size of `/2k/` paths.
const TWO_K: usize = 2048;

async fn upstream(args: UpstreamArgs) -> Result<(), BoxError> {
    let listener = TcpListener::bind(args.listen).await?;
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let counts = Arc::new(Counts::default());
    let delay = args.delay;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, usually: back off instead of spinning.
                eprintln!("upstream: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let counts = counts.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            answer(req, counts.clone(), delay)
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(body.into()));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

fn cacheable(mut res: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    res.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=60"),
    );
    res
}

async fn answer(
    req: Request<Incoming>,
    counts: Arc<Counts>,
    delay: Duration,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    match path.as_str() {
        "/__count" => {
            let n = counts.total.load(Ordering::SeqCst);
            return Ok(text(StatusCode::OK, format!("{n}\n")));
        }
        "/__reset" => {
            let n = counts.total.swap(0, Ordering::SeqCst);
            counts
                .per_path
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
            return Ok(text(StatusCode::OK, format!("{n}\n")));
        }
        "/__arrivals" => {
            let mut at =
                std::mem::take(&mut *counts.arrivals.lock().unwrap_or_else(|e| e.into_inner()));
            at.sort_unstable();
            let line = at.iter().map(u64::to_string).collect::<Vec<_>>().join(" ");
            return Ok(text(StatusCode::OK, format!("{line}\n")));
        }
        p if p.starts_with("/__") => return Ok(cacheable(text(StatusCode::OK, "ok\n"))),
        _ => {}
    }
    counts.total.fetch_add(1, Ordering::SeqCst);
    {
        let mut arrivals = counts.arrivals.lock().unwrap_or_else(|e| e.into_inner());
        // Bounded: a caller that never asks must not grow the upstream without end.
        if arrivals.len() < 1_000_000 {
            arrivals.push(unix_us());
        }
    }
    let n = {
        let mut per_path = counts.per_path.lock().unwrap_or_else(|e| e.into_inner());
        let n = per_path.entry(path.clone()).or_insert(0);
        *n += 1;
        *n
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut body = format!("{path} #{n}");
    if path.starts_with("/2k/") {
        body.push('\n');
        // The paths are ASCII, so any cut is on a character boundary.
        body.truncate(TWO_K);
        let pad = TWO_K - body.len();
        body.extend(std::iter::repeat_n('.', pad));
    }
    if path.starts_with("/nostore/") {
        let mut res = text(StatusCode::OK, body);
        res.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        return Ok(res);
    }
    Ok(cacheable(text(StatusCode::OK, body)))
}

// ---------------------------------------------------------------------------------------
// bare
// ---------------------------------------------------------------------------------------

/// Serves one answer from memory, with the proxy example's server setup (hyper-util's
/// HTTP/1 + HTTP/2 `auto` builder, `TCP_NODELAY`, one task per connection) and nothing
/// else: no routing, no key, no lookup.
async fn bare(args: BareArgs) -> Result<(), BoxError> {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let res = tokio::time::timeout(Duration::from_secs(10), client.get(args.copy_of.clone()))
        .await
        .map_err(|_| format!("{}: timed out", args.copy_of))??;
    let (mut parts, body) = res.into_parts();
    let body = body.collect().await?.to_bytes();
    for name in [
        header::DATE,
        header::CONTENT_LENGTH,
        header::CONNECTION,
        header::TRANSFER_ENCODING,
    ] {
        parts.headers.remove(name);
    }
    let answer = Arc::new((parts.status, parts.headers, body));

    let listener = TcpListener::bind(args.listen).await?;
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("bare: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let answer = answer.clone();
        let service = hyper::service::service_fn(move |_: Request<Incoming>| {
            let (status, headers, body) = &*answer;
            let mut res = Response::new(Full::new(body.clone()));
            *res.status_mut() = *status;
            *res.headers_mut() = headers.clone();
            std::future::ready(Ok::<_, Infallible>(res))
        });
        let conn = server
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

// ---------------------------------------------------------------------------------------
// stampede
// ---------------------------------------------------------------------------------------

/// One target: where to connect and what to put in `Host`.
#[derive(Clone, Debug)]
struct Target {
    authority: String,
    host: HeaderValue,
}

impl Target {
    fn parse(uri: &Uri) -> Result<Target, BoxError> {
        if uri.scheme_str() != Some("http") {
            return Err(format!("{uri}: only http:// targets are supported").into());
        }
        let authority = uri.authority().ok_or_else(|| format!("{uri}: no host"))?;
        let port = authority.port_u16().unwrap_or(80);
        let authority = format!("{}:{port}", authority.host());
        Ok(Target {
            host: HeaderValue::from_str(&authority)?,
            authority,
        })
    }
}

/// One client's connection.
type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// What one client saw.
struct Outcome {
    key: usize,
    target: usize,
    result: Result<Answer, String>,
    /// The connection, kept open until every client has its answer.
    conn: Option<Sender>,
}

struct Answer {
    /// When the request was sent, the response head came and the body ended.
    sent: Instant,
    head: Instant,
    done: Instant,
    latency: Duration,
    status: StatusCode,
    cache_status: String,
    body: Bytes,
}

async fn connect(target: &Target) -> Result<Sender, String> {
    let mut last = String::new();
    // A burst of connects can overflow a listen backlog; a dropped SYN is retried.
    for _ in 0..3 {
        let stream = match tokio::time::timeout(
            Duration::from_secs(5),
            TcpStream::connect(&target.authority),
        )
        .await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                last = format!("connect {}: {e}", target.authority);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(_) => {
                last = format!("connect {}: timed out", target.authority);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        return Ok(sender);
    }
    Err(last)
}

/// Sends one `GET path` on `sender` and reads the whole answer.
async fn request(
    sender: &mut Sender,
    target: &Target,
    path: &str,
    timeout: Duration,
) -> Result<Answer, String> {
    let started = Instant::now();
    let req = Request::get(path)
        .header(header::HOST, target.host.clone())
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let exchange = async {
        sender
            .ready()
            .await
            .map_err(|e| format!("connection: {e}"))?;
        let res = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let head = Instant::now();
        let (parts, body) = res.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        let cache_status = ["cache-status", "x-cache-status"]
            .iter()
            .find_map(|name| parts.headers.get(*name))
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let done = Instant::now();
        Ok::<_, String>(Answer {
            sent: started,
            head,
            done,
            latency: done - started,
            status: parts.status,
            cache_status,
            body,
        })
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(answer) => answer,
        Err(_) => Err(format!("timed out after {timeout:?}")),
    }
}

fn run_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{:x}{:x}", nanos, std::process::id())
}

/// The value at quantile `q` of sorted samples (nearest rank).
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `N× label (p50 X ms, max Y ms) | ...` for groups of latencies.
fn summaries(groups: BTreeMap<String, Vec<Duration>>) -> String {
    groups
        .into_iter()
        .map(|(label, mut l)| {
            l.sort();
            format!(
                "{}× {label} (p50 {:.1} ms, max {:.1} ms)",
                l.len(),
                ms(percentile(&l, 0.5)),
                ms(l.last().copied().unwrap_or_default()),
            )
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

async fn stampede(args: StampedeArgs) -> Result<(), BoxError> {
    if args.clients == 0 || args.keys == 0 {
        return Err("--clients and --keys must be at least 1".into());
    }
    let targets = args
        .targets
        .iter()
        .map(Target::parse)
        .collect::<Result<Vec<_>, _>>()?;
    let run = args.run_id.clone().unwrap_or_else(run_id);
    let connecting = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    // The clients and this task: the clock starts once everybody is connected.
    let barrier = Arc::new(Barrier::new(args.clients + 1));
    // With --release-after, a second barrier: the release, after the pause.
    let go = args
        .release_after
        .map(|_| Arc::new(Barrier::new(args.clients + 1)));
    let setup_failed = Arc::new(AtomicUsize::new(0));

    let n_targets = targets.len();
    let mut tasks = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let target = targets[i % n_targets].clone();
        let key = i % args.keys;
        let path = format!("{}{key}-{run}", args.prefix);
        let (connecting, barrier, setup_failed) =
            (connecting.clone(), barrier.clone(), setup_failed.clone());
        let go = go.clone();
        let timeout = args.timeout;
        let close_each = args.close_each;
        tasks.push(tokio::spawn(async move {
            // Set up: open the connection and use it once, a few clients at a time.
            let ready = async {
                let _permit = connecting.acquire().await.map_err(|e| e.to_string())?;
                let mut sender = connect(&target).await?;
                let warm = request(&mut sender, &target, "/__warm", timeout).await?;
                if warm.status != StatusCode::OK {
                    return Err(format!("warm-up: {}", warm.status));
                }
                Ok::<_, String>(sender)
            }
            .await;
            if ready.is_err() {
                setup_failed.fetch_add(1, Ordering::SeqCst);
            }
            barrier.wait().await;
            if let Some(go) = go {
                go.wait().await;
            }
            let (result, conn) = match ready {
                Ok(mut sender) => (
                    request(&mut sender, &target, &path, timeout).await,
                    Some(sender).filter(|_| !close_each),
                ),
                Err(e) => (Err(format!("setup: {e}")), None),
            };
            Outcome {
                key,
                target: i % n_targets,
                result,
                conn,
            }
        }));
    }
    let setup_started = Instant::now();
    barrier.wait().await;
    if let (Some(go), Some(pause)) = (&go, args.release_after) {
        eprintln!("ready");
        tokio::time::sleep(pause).await;
        go.wait().await;
    }
    let released_unix_us = unix_us();
    let setup = setup_started.elapsed();
    let cpu_before = cpu_times(&args.cpu_of);
    let cpu_mark = args
        .cpu_mark
        .filter(|_| !args.cpu_of.is_empty())
        .map(|after| {
            // A thread of its own, not a task: the runtime is as busy as the fronts during
            // the burst, and a task's timer would fire only when the queue reaches it.
            let pids = args.cpu_of.clone();
            let released = Instant::now();
            std::thread::spawn(move || {
                std::thread::sleep(after);
                (released.elapsed(), cpu_times(&pids))
            })
        });

    let mut latencies = Vec::with_capacity(args.clients);
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    // Latencies by Cache-Status and by target.
    let mut statuses: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    let mut per_target: BTreeMap<usize, Vec<Duration>> = BTreeMap::new();
    let mut bodies: HashMap<usize, HashSet<Bytes>> = HashMap::new();
    // (label, sent, head, done) of every answer, for --phases.
    let mut phases: Vec<(String, Instant, Instant, Instant)> = Vec::new();
    // Closed only once the last answer is in: a connection's teardown (the client's and
    // the server's) is then in nobody's latency and nobody's CPU time.
    let mut open = Vec::with_capacity(args.clients);
    for task in tasks {
        let mut outcome = task.await?;
        open.extend(outcome.conn.take());
        match outcome.result {
            Ok(answer) if answer.status == StatusCode::OK => {
                latencies.push(answer.latency);
                let label = if answer.cache_status.is_empty() {
                    "-".to_owned()
                } else {
                    answer.cache_status
                };
                if args.phases {
                    phases.push((label.clone(), answer.sent, answer.head, answer.done));
                }
                statuses.entry(label).or_default().push(answer.latency);
                per_target
                    .entry(outcome.target)
                    .or_default()
                    .push(answer.latency);
                bodies.entry(outcome.key).or_default().insert(answer.body);
            }
            Ok(answer) => {
                *errors
                    .entry(format!("status {}", answer.status))
                    .or_default() += 1
            }
            Err(e) => *errors.entry(e).or_default() += 1,
        }
    }
    let cpu_after = cpu_times(&args.cpu_of);
    drop(open);
    latencies.sort();
    let ok = latencies.len();
    let failed = args.clients - ok;
    let distinct: usize = bodies.values().map(HashSet::len).sum();
    println!(
        "clients={} keys={} ok={ok} errors={failed} p50_ms={:.1} p99_ms={:.1} max_ms={:.1} \
         min_ms={:.1} distinct_bodies={distinct} setup_ms={:.0} run={run}",
        args.clients,
        args.keys,
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.99)),
        ms(latencies.last().copied().unwrap_or_default()),
        ms(latencies.first().copied().unwrap_or_default()),
        ms(setup),
    );
    eprintln!("cache-status: {}", summaries(statuses));
    let per_target = per_target
        .into_iter()
        .map(|(t, l)| (targets[t].authority.clone(), l))
        .collect();
    eprintln!("by target: {}", summaries(per_target));
    if args.phases {
        eprint!("{}", phase_table(&phases));
        eprintln!("released_unix_us={released_unix_us}");
    }
    if !args.cpu_of.is_empty() {
        let used = |from: &[(String, u64)], to: &[(String, u64)]| {
            from.iter()
                .zip(to)
                .map(|((who, a), (_, b))| {
                    format!("{who}:{:.1}", b.saturating_sub(*a) as f64 / 1000.0)
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        eprintln!("cpu_ms {}", used(&cpu_before, &cpu_after));
        if let Some(mark) = cpu_mark {
            let (at, mark) = mark.join().map_err(|_| "the --cpu-mark thread panicked")?;
            eprintln!("cpu_mark_at_ms={:.1}", ms(at));
            eprintln!("cpu_ms_to_mark {}", used(&cpu_before, &mark));
            eprintln!("cpu_ms_after_mark {}", used(&mark, &cpu_after));
        }
    }
    for (e, n) in &errors {
        eprintln!("error ×{n}: {e}");
    }
    Ok(())
}

/// CPU time used so far by this process (`self`) and each of `pids`, in µs: the run time
/// of their live threads (`/proc/PID/task/*/schedstat`, Linux); 0 where `/proc` cannot
/// tell.
fn cpu_times(pids: &[u32]) -> Vec<(String, u64)> {
    let of = |dir: String| -> u64 {
        let Ok(tasks) = std::fs::read_dir(format!("{dir}/task")) else {
            return 0;
        };
        tasks
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .sum::<u64>()
            / 1000
    };
    // Every CPU's time not idle (nor waiting on I/O), in ticks of 10 ms.
    let machine = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|stat| {
            let cpu = stat.lines().next()?.strip_prefix("cpu ")?.to_owned();
            let ticks: Vec<u64> = cpu
                .split_whitespace()
                .filter_map(|t| t.parse().ok())
                .collect();
            let busy: u64 = ticks.iter().take(8).sum::<u64>()
                - ticks.get(3).copied().unwrap_or(0)
                - ticks.get(4).copied().unwrap_or(0);
            Some(busy * 10_000)
        })
        .unwrap_or(0);
    std::iter::once(("machine".to_owned(), machine))
        .chain(std::iter::once((
            "self".to_owned(),
            of("/proc/self".to_owned()),
        )))
        .chain(
            pids.iter()
                .map(|p| (p.to_string(), of(format!("/proc/{p}")))),
        )
        .collect()
}

/// `phases LABEL n=N start ... | head ... | done ...`, one line per Cache-Status value and
/// one for all: p50/p99/max in ms of each phase's end, counted from the release (the
/// earliest start).
fn phase_table(phases: &[(String, Instant, Instant, Instant)]) -> String {
    let Some(release) = phases.iter().map(|p| p.1).min() else {
        return String::new();
    };
    let mut groups: BTreeMap<&str, Vec<&(String, Instant, Instant, Instant)>> = BTreeMap::new();
    for p in phases {
        groups.entry(p.0.as_str()).or_default().push(p);
        groups.entry("(all)").or_default().push(p);
    }
    let stats = |mut l: Vec<Duration>| {
        l.sort();
        format!(
            "{:.1}/{:.1}/{:.1}",
            ms(percentile(&l, 0.5)),
            ms(percentile(&l, 0.99)),
            ms(l.last().copied().unwrap_or_default())
        )
    };
    let mut out = String::new();
    for (label, group) in groups {
        let of = |f: fn(&(String, Instant, Instant, Instant)) -> Instant| {
            stats(group.iter().map(|p| f(p) - release).collect())
        };
        out.push_str(&format!(
            "phases {label}: n={} start {} | head {} | done {} (ms from the release, p50/p99/max)\n",
            group.len(),
            of(|p| p.1),
            of(|p| p.2),
            of(|p| p.3),
        ));
    }
    out
}

// ---------------------------------------------------------------------------------------
// fill
// ---------------------------------------------------------------------------------------

async fn fill(args: FillArgs) -> Result<(), BoxError> {
    let target = Target::parse(&args.target)?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_max_idle_per_host(args.concurrency.max(1) * 2)
        .build(connector);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (client, next, target) = (client.clone(), next.clone(), target.clone());
        let (keys, prefix, timeout, reverse) =
            (args.keys, args.prefix.clone(), args.timeout, args.reverse);
        workers.push(tokio::spawn(async move {
            let (mut done, mut hits, mut bytes) = (0usize, 0usize, 0usize);
            let mut errors: BTreeMap<String, usize> = BTreeMap::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= keys {
                    break;
                }
                let i = if reverse { keys - 1 - i } else { i };
                let uri = format!("http://{}{prefix}{i}", target.authority);
                let exchange = async {
                    let res = client
                        .request(
                            Request::get(uri)
                                .body(Empty::new())
                                .map_err(|e| e.to_string())?,
                        )
                        .await
                        .map_err(|e| format!("request: {e}"))?;
                    let (parts, body) = res.into_parts();
                    let body = body.collect().await.map_err(|e| format!("body: {e}"))?;
                    Ok::<_, String>((parts, body.to_bytes()))
                };
                match tokio::time::timeout(timeout, exchange).await {
                    Ok(Ok((parts, body))) if parts.status == StatusCode::OK => {
                        done += 1;
                        bytes += body.len();
                        let hit = parts
                            .headers
                            .get("cache-status")
                            .and_then(|v| v.to_str().ok())
                            .is_some_and(|v| v.contains("; hit"));
                        hits += usize::from(hit);
                    }
                    Ok(Ok((parts, _))) => {
                        *errors
                            .entry(format!("status {}", parts.status))
                            .or_default() += 1
                    }
                    Ok(Err(e)) => *errors.entry(e).or_default() += 1,
                    Err(_) => *errors.entry("timed out".to_owned()).or_default() += 1,
                }
            }
            (done, hits, bytes, errors)
        }));
    }
    let (mut done, mut hits, mut bytes) = (0, 0, 0);
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for worker in workers {
        let (d, h, b, e) = worker.await?;
        done += d;
        hits += h;
        bytes += b;
        for (what, n) in e {
            *errors.entry(what).or_default() += n;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let failed: usize = errors.values().sum();
    println!(
        "keys={} done={done} errors={failed} hits={hits} body_bytes={bytes} secs={secs:.1} rps={:.0}",
        args.keys,
        done as f64 / secs.max(1e-9),
    );
    for (e, n) in &errors {
        eprintln!("error ×{n}: {e}");
    }
    Ok(())
}
