//! The `proxy` example as a child process, for the tests that run it on real sockets
//! (`tests/proxy.rs`, `tests/poisoning.rs`, which include this file with `#[path]`).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// The example binary next to this test binary: `<target>/debug/examples/proxy`.
pub fn proxy_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // <target>/debug/deps/proxy-<hash>  ->  <target>/debug/examples/proxy
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir");
    let bin = profile_dir
        .join("examples")
        .join(format!("proxy{}", std::env::consts::EXE_SUFFIX));
    if !bin.is_file() {
        panic!(
            "the proxy example is not built: {} is missing. `cargo test` builds it; with a \
             target filter such as `cargo test --test proxy`, run `cargo build --examples` first.",
            bin.display()
        );
    }
    bin
}

/// One running proxy, killed on drop.
pub struct Proxy {
    child: Child,
    /// The address it listens on.
    pub addr: SocketAddr,
    /// The metrics address, with `--metrics-listen`.
    pub metrics: Option<SocketAddr>,
    log: Arc<Mutex<Vec<String>>>,
}

/// The address logged after `marker` (ANSI colour codes, if any, are skipped).
fn address_after(line: &str, marker: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(marker)? + marker.len()..];
    let addr: String = rest
        .chars()
        .take_while(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']'))
        .collect();
    addr.parse().ok()
}

impl Proxy {
    /// Starts `proxy --listen 127.0.0.1:0 --upstream <upstream> <extra...>` and waits for
    /// its `listening on` line; two workers unless `extra` says `--workers`.
    pub fn start(upstream: &str, extra: &[&str]) -> Proxy {
        let workers: &[&str] = if extra.contains(&"--workers") {
            &[]
        } else {
            &["--workers", "2"]
        };
        let mut child = Command::new(proxy_binary())
            .args(["--listen", "127.0.0.1:0", "--upstream", upstream])
            .args(workers)
            .args(extra)
            // `PROXY_LOG=debug cargo test --test proxy` for more detail from the proxies.
            .env(
                "RUST_LOG",
                std::env::var("PROXY_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .env("NO_COLOR", "1")
            .env_remove("REDIS_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the proxy example");

        // Both pipes are drained for the whole life of the process, so it never blocks on
        // a full pipe; every line is kept for failure messages.
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel::<String>();
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        for pipe in [Box::new(stdout) as Box<dyn Read + Send>, Box::new(stderr)] {
            let (log, tx) = (log.clone(), tx.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    log.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        drop(tx);

        let deadline = Instant::now() + Duration::from_secs(20);
        let mut metrics = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = address_after(&line, "metrics on http://") {
                        metrics = Some(addr);
                    }
                    if let Some(addr) = address_after(&line, "listening on ") {
                        return Proxy {
                            child,
                            addr,
                            metrics,
                            log,
                        };
                    }
                }
                Err(e) => {
                    let _ = child.kill();
                    let status = child.wait();
                    panic!(
                        "the proxy did not log `listening on` ({e:?}; exit: {status:?}); output:\n{}",
                        log.lock().unwrap().join("\n")
                    );
                }
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn output(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Sends SIGTERM and waits (bounded) for the process to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {pid}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "proxy still running 10 s after SIGTERM:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log.lock().unwrap();
            let keep = if std::env::var_os("PROXY_LOG").is_some() {
                log.len()
            } else {
                40
            };
            let tail = &log[log.len().saturating_sub(keep)..];
            eprintln!(
                "--- proxy {} (last {} lines) ---\n{}",
                self.addr,
                tail.len(),
                tail.join("\n")
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
