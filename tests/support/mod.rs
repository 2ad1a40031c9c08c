//! Test support: real `redis-server` processes on free loopback ports, a counting
//! upstream service, and a stampede of concurrent requests. The deployments the crate
//! talks to besides a single server live in [`cluster`], [`tls`] and [`sentinel`].
#![allow(dead_code)]

pub mod cluster;
pub mod sentinel;
pub mod tls;

use std::convert::Infallible;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::ServiceExt;

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// A `redis-server` of our own: `--save "" --appendonly no`, killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

/// A free loopback port, from binding 127.0.0.1:0 (another process may take it before
/// we use it: the spawn helpers retry).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

impl RedisServer {
    /// Starts a server on a free port, retrying with another port if one is lost to a race.
    pub fn start() -> RedisServer {
        let dir = std::env::temp_dir().join(format!(
            "tower-stampede-redis-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create redis dir");
        let mut server = RedisServer {
            child: None,
            port: 0,
            dir,
        };
        for _ in 0..5 {
            server.port = free_port();
            if server.spawn() {
                return server;
            }
        }
        panic!(
            "redis-server did not start after 5 ports; log:\n{}",
            server.log()
        );
    }

    /// Spawns on `self.port`; false when the port was lost to another process.
    fn spawn(&mut self) -> bool {
        let log = self.dir.join("redis.log");
        let port = self.port;
        let mut args = server_args(port, &self.dir, &log);
        args.extend(["--bind".into(), "127.0.0.1".into()]);
        match spawn_redis(&args, &log, || ping(port)) {
            Some(child) => {
                self.child = Some(child);
                true
            }
            None => false,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
    }

    /// A plain async connection for assertions.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        self.client()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// The keys matching `pattern`, once there are exactly `n` of them. The layer answers
    /// first and writes to Redis right after, so a test that looks at Redis waits for the
    /// write (bounded: a write that never lands fails the test).
    pub async fn wait_for_keys(&self, pattern: &str, n: usize) -> Vec<String> {
        let mut conn = self.conn().await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let keys: Vec<String> = redis::AsyncCommands::keys(&mut conn, pattern)
                .await
                .unwrap();
            if keys.len() == n {
                return keys;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} keys matching {pattern}, found {keys:?}"
            );
            tokio::task::yield_now().await;
        }
    }

    /// A URL for a user that may do everything but subscribe to channels: a node using it
    /// never hears a wake-up or a purge broadcast and has to poll.
    pub async fn deaf_url(&self) -> String {
        let mut admin = self.conn().await;
        let () = redis::cmd("ACL")
            .arg(&[
                "SETUSER",
                "deaf",
                "on",
                ">pw",
                "~*",
                "resetchannels",
                "+@all",
            ])
            .query_async(&mut admin)
            .await
            .unwrap();
        format!("redis://deaf:pw@127.0.0.1:{}/", self.port)
    }

    /// Kills the server (SIGKILL) and waits for it to go.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn(),
            "port {} was taken while redis was down",
            self.port
        );
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("server running").id();
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .map(|s| s.success());
        assert_eq!(ok.ok(), Some(true), "kill {sig} {pid}");
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_child(&mut child);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What to install when a binary the tests run is missing.
pub const INSTALL_HINT: &str = "The tests start their own redis-server processes and make \
     throwaway certificates; install the tools with `sudo apt-get install redis-server \
     redis-tools openssl` (Debian/Ubuntu), `brew install redis openssl` (macOS), or run \
     `bash .ci/run`.";

/// A fresh, empty directory under the system temp dir for one setup (`kind` names it).
pub fn temp_dir(kind: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tower-stampede-{kind}-{}-{}",
        std::process::id(),
        NEXT_DIR.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// The arguments every server of ours gets: `--port`, no persistence, `dir` and `log`.
pub fn server_args(port: u16, dir: &Path, log: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = ["--port", &port.to_string()]
        .iter()
        .map(Into::into)
        .collect();
    args.extend(["--save", "", "--appendonly", "no"].map(OsString::from));
    args.extend(["--dir".into(), dir.into(), "--logfile".into(), log.into()]);
    args
}

/// Runs `redis-server ARGS` until `ready()` says yes (bounded: 10 s). `None` when the
/// server exited because its port was taken (the caller picks another port); panics with
/// the server's `log` when it exits for another reason or never gets ready.
pub fn spawn_redis(
    args: &[OsString],
    log: &Path,
    mut ready: impl FnMut() -> bool,
) -> Option<Child> {
    let _ = std::fs::remove_file(log);
    let child = Command::new("redis-server")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("redis-server is not installed or not on PATH. {INSTALL_HINT}")
        }
        Err(e) => panic!("could not run redis-server: {e}"),
    };
    let read_log = || std::fs::read_to_string(log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            let log = read_log();
            if log.contains("Address already in use") {
                return None;
            }
            panic!("redis-server exited at start; log:\n{log}");
        }
        if ready() {
            return Some(child);
        }
        if Instant::now() > deadline {
            kill_child(&mut child);
            panic!(
                "redis-server did not get ready within 10 s; log:\n{}",
                read_log()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Kills a child for good: SIGCONT first (a paused process would not die until thawed),
/// then SIGKILL, and waits for it.
pub fn kill_child(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-CONT", &child.id().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let _ = child.kill();
    let _ = child.wait();
}

/// One server process of a multi-process setup (a cluster node, a sentinel, a TLS
/// server), on a port picked by `pick_port`, killed (SIGKILL) on drop.
pub struct Node {
    child: Option<Child>,
    port: u16,
    log: PathBuf,
}

impl Node {
    /// Starts `redis-server args(port)` on a port from `pick_port`, ready when
    /// `ready(port)` says so; tries another port (up to 5) when one is lost to a race.
    pub fn start(
        log: PathBuf,
        pick_port: fn() -> u16,
        mut args: impl FnMut(u16) -> Vec<OsString>,
        mut ready: impl FnMut(u16) -> bool,
    ) -> Node {
        for _ in 0..5 {
            let port = pick_port();
            if let Some(child) = spawn_redis(&args(port), &log, || ready(port)) {
                return Node {
                    child: Some(child),
                    port,
                    log,
                };
            }
        }
        panic!(
            "redis-server did not start after 5 ports; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether it has not been killed.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Its log file so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills it (SIGKILL) and waits for it to go.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_child(&mut child);
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One command to the plain server on `port`, on a fresh connection with 2 s timeouts.
pub fn query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> redis::RedisResult<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.set_write_timeout(Some(Duration::from_secs(2)))?;
    cmd.query(&mut conn)
}

/// The `field:value` lines of an `INFO`-like reply (`CLUSTER INFO`, `INFO replication`).
pub fn info_field(info: &str, field: &str) -> Option<String> {
    info.lines().find_map(|line| {
        let (k, v) = line.trim_end().split_once(':')?;
        (k == field).then(|| v.to_owned())
    })
}

/// A number of `INFO section`: the value of `field:N`, or the `calls=N` of a
/// `cmdstat_...:calls=N,usec=...` line; `None` when the field is absent.
pub async fn info_number(
    conn: &mut redis::aio::MultiplexedConnection,
    section: &str,
    field: &str,
) -> Option<u64> {
    let info: String = redis::cmd("INFO")
        .arg(section)
        .query_async(conn)
        .await
        .unwrap();
    let value = info_field(&info, field)?;
    let first = value.split(',').next().unwrap_or(&value);
    first.trim_start_matches("calls=").trim().parse().ok()
}

/// Runs a tool (`redis-cli`, `openssl`) to completion, bounded by `timeout` (killed
/// after). Panics with the install hint when the tool is missing.
pub fn run_tool(program: &str, args: &[OsString], timeout: Duration) -> std::process::Output {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("{program} is not installed or not on PATH. {INSTALL_HINT}")
        }
        Err(e) => panic!("could not run {program}: {e}"),
    };
    let deadline = Instant::now() + timeout;
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    if child.try_wait().ok().flatten().is_none() {
        let _ = child.kill();
    }
    child.wait_with_output().expect("collect tool output")
}

/// Polls `done` (every 20 ms) until it returns `Some`, for at most `limit`; on timeout
/// panics with `what` and the last `Err` seen.
pub fn wait_until<T>(
    what: &str,
    limit: Duration,
    mut done: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match done() {
            Ok(v) => return v,
            Err(last) if Instant::now() > deadline => {
                panic!("{what}: not within {limit:?}; last seen: {last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Whether a plain server (data node or sentinel) answers `PING` on `port`.
pub fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// Counts calls; answers `"<path> #<n>"` after an optional delay, so identical bodies
/// prove a shared answer. By default with `200 OK` and no headers; the builder methods
/// script another status, headers, a body that echoes a request header instead of the
/// path, or a `404` under a path prefix; and [`fail`](Upstream::fail) turns on `500`s.
#[derive(Clone, Default)]
pub struct Upstream {
    pub calls: Arc<AtomicUsize>,
    pub delay: Duration,
    status: StatusCode,
    headers: Vec<(HeaderName, HeaderValue)>,
    echo: Option<HeaderName>,
    not_found_under: Option<&'static str>,
    failing: Arc<AtomicBool>,
}

impl Upstream {
    pub fn new(delay: Duration) -> Self {
        Upstream {
            delay,
            ..Upstream::default()
        }
    }

    /// Answers with `status` instead of `200 OK`.
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// Adds `headers` to every answer.
    pub fn with_headers(mut self, headers: &[(&'static str, &'static str)]) -> Self {
        self.headers = static_headers(headers);
        self
    }

    /// Answers `"<value of request header `name`> #<n>"` (`-` for a request without it)
    /// instead of `"<path> #<n>"`.
    pub fn echoing(mut self, name: HeaderName) -> Self {
        self.echo = Some(name);
        self
    }

    /// Answers `404 Not Found` for paths that start with `prefix`.
    pub fn not_found_under(mut self, prefix: &'static str) -> Self {
        self.not_found_under = Some(prefix);
        self
    }

    /// While on, answers `500 Internal Server Error` whatever the path (still counted).
    pub fn fail(&self, on: bool) {
        self.failing.store(on, Ordering::SeqCst);
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn service(
        &self,
    ) -> impl tower::Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = Infallible,
        Future = impl Send,
    > + Clone
           + Send
           + Sync
           + 'static {
        let this = self.clone();
        tower::service_fn(move |req: Request<Full<Bytes>>| {
            let this = this.clone();
            async move {
                let n = this.calls.fetch_add(1, Ordering::SeqCst) + 1;
                if !this.delay.is_zero() {
                    tokio::time::sleep(this.delay).await;
                }
                let path = req.uri().path();
                let seen = match &this.echo {
                    Some(name) => req.headers().get(name).map_or("-", |v| v.to_str().unwrap()),
                    None => path,
                };
                let mut res = Response::new(Full::new(Bytes::from(format!("{seen} #{n}"))));
                *res.status_mut() = if this.failing.load(Ordering::SeqCst) {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else if this.not_found_under.is_some_and(|p| path.starts_with(p)) {
                    StatusCode::NOT_FOUND
                } else {
                    this.status
                };
                for (name, value) in &this.headers {
                    res.headers_mut().append(name.clone(), value.clone());
                }
                Ok::<_, Infallible>(res)
            }
        })
    }
}

/// Header pairs as a header list.
pub fn static_headers(headers: &[(&'static str, &'static str)]) -> Vec<(HeaderName, HeaderValue)> {
    headers
        .iter()
        .map(|&(n, v)| (HeaderName::from_static(n), HeaderValue::from_static(v)))
        .collect()
}

/// Fires `per_key` concurrent GETs for each path, spread round-robin over the services,
/// all released at once; returns (path, status, cache-status, body) per request, in the
/// order fired.
pub async fn stampede<S, B>(
    services: &[S],
    paths: &[impl AsRef<str>],
    per_key: usize,
) -> Vec<(String, StatusCode, String, String)>
where
    S: tower::Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug + Send,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: std::fmt::Debug,
{
    let total = paths.len() * per_key;
    let barrier = Arc::new(tokio::sync::Barrier::new(total));
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let path = paths[i % paths.len()].as_ref().to_owned();
        let svc = services[i % services.len()].clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let res = svc.oneshot(get(&path)).await.expect("infallible stack");
            let status = res.status();
            let cs = cache_status(&res);
            (path, status, cs, text(res).await)
        }));
    }
    let mut out = Vec::with_capacity(total);
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// A GET request for `path` on `http://test`.
pub fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://test{path}"))
        .body(Full::default())
        .unwrap()
}

/// Collects a response's body as a string.
pub async fn text<B>(res: Response<B>) -> String
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let bytes = res.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8(bytes.to_vec()).expect("utf-8 body")
}

/// The `Cache-Status` header of a response.
pub fn cache_status<B>(res: &Response<B>) -> String {
    res.headers()
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}
