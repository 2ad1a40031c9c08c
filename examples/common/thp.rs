//! What the `proxy` and `loadgen` examples share: transparent huge pages off, so that the
//! proxy, the bare server and the load are measured alike. Included with
//! `#[path = "common/thp.rs"] mod thp;`.

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
