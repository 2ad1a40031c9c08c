//! How the `proxy` and `loadgen` processes run, alike, so that the proxy, the bare server
//! and the load are measured alike: transparent huge pages off, and the same runtime for
//! the same `--workers`. Included with `#[path = "common/process.rs"] mod process;`.

/// Turns transparent huge pages off for this process (`PR_SET_THP_DISABLE`), as Redis
/// advises for its own latency.
pub fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_THP_DISABLE takes integer arguments only and touches no
    // memory of ours; a failure (an old kernel) leaves the setting as it was.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// The Tokio runtime for `--workers`: none, one worker per CPU; one, a current-thread
/// runtime; more, that many workers.
///
/// One worker runs on a current-thread runtime, which queues a woken task behind the tasks
/// already ready rather than running it next. A Redis connection's writer, woken by the
/// first request of a pass, therefore runs after the pass and sends every command queued
/// in it with one write. On a multi-thread runtime, it runs straight after each request
/// that wakes it, and writes their commands one at a time.
pub fn runtime(workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match workers {
        Some(0 | 1) => tokio::runtime::Builder::new_current_thread(),
        Some(workers) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(workers);
            builder
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all().build()
}
