//! What an entry weighs: the heap it holds, as the allocator hands it out.
//!
//! The bound counts allocations rounded the way glibc's malloc (the default allocator of a
//! Rust program on Linux) rounds them: 8 bytes of its own, a multiple of 16, 32 at least.
//! The per-entry figures of the cache's own structures were measured with a counting
//! allocator (`tests/memory.rs`, which fails if a weight comes out below the heap).

/// The heap an allocation of `len` bytes takes: none for an empty one.
pub(crate) fn heap(len: usize) -> usize {
    if len == 0 {
        return 0;
    }
    len.saturating_add(8)
        .div_ceil(16)
        .saturating_mul(16)
        .max(32)
}

/// What moka keeps beside each entry's key and value: its node (the entry's info, its
/// slot in the hash table, the access-order and timer-wheel nodes, the key's `Arc`) and
/// the share of the frequency sketch. Measured: 395 bytes per entry with a per-entry
/// expiry (`tests/memory.rs`), rounded up.
pub(crate) const CACHE_NODE: usize = 416;

/// The heap of one marker (a hit-for-pass, refresh or purge marker: a 32-byte key and no
/// value, or a timestamp) in its own moka cache with a time-to-live. Measured: 367 bytes
/// per hit-for-pass marker (`tests/memory.rs`), rounded up.
pub(crate) const MARKER: usize = 384;

/// The heap of tags: the `Vec` and each `String`.
pub(crate) fn tags(tags: &Vec<String>) -> usize {
    let list = heap(
        tags.capacity()
            .saturating_mul(std::mem::size_of::<String>()),
    );
    list + tags.iter().map(|t| heap(t.capacity())).sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_as_malloc_does() {
        assert_eq!(heap(0), 0);
        assert_eq!(heap(1), 32);
        assert_eq!(heap(24), 32);
        assert_eq!(heap(25), 48);
        assert_eq!(heap(2048), 2064);
        assert!(heap(usize::MAX) >= usize::MAX - 16);
    }
}
