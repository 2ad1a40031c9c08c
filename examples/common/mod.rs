//! What the `demo` and `rate_limited_api` examples share: the Redis tier of the simulated
//! fleet (`REDIS_URL`, else a `redis-server` of our own, else none), an HTTP/2 server and
//! client on loopback, and the plumbing to run and release a stampede.
//!
//! A module in a subdirectory, so cargo does not build it as an example of its own; each
//! example includes it with `mod common;`.

use std::convert::Infallible;
use std::error::Error;
use std::future::Future;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{self, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::Barrier;
use tokio::task::JoinHandle;
use tower::Service;
use tower_stampede::Backend;

/// Runs `run` to completion on a new runtime, or until Ctrl-C.
///
/// Create the [`SharedTier`] that `run` borrows before calling this, outside the runtime:
/// the guard must outlive it, so that the server we may have started is killed only after
/// every connection to it is gone.
pub fn block_on_until_ctrl_c(
    run: impl Future<Output = Result<(), Box<dyn Error>>>,
) -> Result<(), Box<dyn Error>> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        tokio::select! {
            result = run => result,
            _ = tokio::signal::ctrl_c() => {
                println!("interrupted");
                Ok(())
            }
        }
    })
}

/// A new prefix per run, so a shared `REDIS_URL` never answers from an earlier run.
pub fn run_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{}-{nanos}", std::process::id())
}

/// Spawns `total` tasks, task `i` running `task(i)`, each held until all are spawned and
/// then released together; returns their handles once released.
pub async fn spawn_released_together<F, Fut>(
    total: usize,
    mut task: F,
) -> Vec<JoinHandle<Fut::Output>>
where
    F: FnMut(usize) -> Fut,
    Fut: Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    let start = Arc::new(Barrier::new(total + 1));
    let tasks = (0..total)
        .map(|i| {
            let run = task(i);
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                run.await
            })
        })
        .collect();
    start.wait().await;
    tasks
}

// ---------------------------------------------------------------------------------------
// The server and the client.

/// Serves `handle` over HTTP/1 and HTTP/2 on `127.0.0.1:0`, in the background; returns the
/// address. `name` prefixes the server's error messages.
pub async fn serve<F, Fut>(name: &'static str, handle: F) -> std::io::Result<SocketAddr>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    server.http2().max_concurrent_streams(100_000);
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    eprintln!("{name}: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let (handle, server) = (handle.clone(), server.clone());
            tokio::spawn(async move {
                let handler = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let answer = handle(req);
                    async move { Ok::<_, Infallible>(answer.await) }
                });
                let _ = server.serve_connection(TokioIo::new(stream), handler).await;
            });
        }
    });
    Ok(addr)
}

/// A GET request for `path` on the server at `addr`.
pub fn get(addr: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{addr}{path}"))
        .body(Full::default())
        .expect("a valid request")
}

/// An HTTP/2 client: one multiplexed connection per host, however many requests.
pub fn http_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .pool_max_idle_per_host(usize::MAX)
        .build_http()
}

/// The client as a tower service: the inner service every node wraps.
pub fn client_service(
    client: Client<HttpConnector, Full<Bytes>>,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Incoming>,
    Error = legacy::Error,
    Future = legacy::ResponseFuture,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |req: Request<Full<Bytes>>| client.request(req))
}

// ---------------------------------------------------------------------------------------
// Redis: REDIS_URL, else a redis-server of our own, else none.

/// The shared tier of the fleet.
pub struct SharedTier {
    pub url: Option<String>,
    pub description: String,
    /// Killed on drop.
    _server: Option<RedisServer>,
}

impl SharedTier {
    pub fn from_env() -> SharedTier {
        if let Some(url) = std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty()) {
            return SharedTier {
                description: format!("{url} (REDIS_URL)"),
                url: Some(url),
                _server: None,
            };
        }
        match RedisServer::start() {
            Ok(server) => SharedTier {
                url: Some(server.url()),
                description: format!("{} (a redis-server started for this run)", server.url()),
                _server: Some(server),
            },
            Err(why) => SharedTier {
                url: None,
                description: format!("none ({why}); every node uses the local backend"),
                _server: None,
            },
        }
    }

    /// Fails early, and clearly, when the Redis we were given does not answer.
    pub async fn check(&self) -> Result<(), Box<dyn Error>> {
        let Some(url) = &self.url else { return Ok(()) };
        let unreachable = |e: redis::RedisError| format!("redis at {url} does not answer: {e}");
        let client = redis::Client::open(url.as_str()).map_err(unreachable)?;
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .map_err(unreachable)?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(unreachable)?;
        Ok(())
    }

    /// The backend for a new node: each call gives the node its own Redis connections.
    pub fn backend(&self) -> Result<Backend, redis::RedisError> {
        match &self.url {
            Some(url) => Backend::redis(url.as_str()),
            None => Ok(Backend::local()),
        }
    }
}

/// A `redis-server` on a free loopback port, with persistence off; killed on drop.
struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    /// Starts one from `PATH`, trying another port if one is lost to a race.
    fn start() -> Result<RedisServer, String> {
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| format!("no free port: {e}"))?
                .port();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            let child = match child {
                Ok(child) => child,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err("REDIS_URL is not set and redis-server is not on PATH".into())
                }
                Err(e) => return Err(format!("could not run redis-server: {e}")),
            };
            let mut server = RedisServer { child, port };
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if let Ok(Some(_)) = server.child.try_wait() {
                    break; // exited: most likely the port was taken meanwhile; try another
                }
                if ping(port) {
                    return Ok(server);
                }
                if Instant::now() > deadline {
                    return Err("redis-server did not answer PING within 5 s".into());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Err("redis-server exited at start 5 times".into())
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// True when a Redis server on `port` answers `PING`.
fn ping(port: u16) -> bool {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}
