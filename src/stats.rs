//! Counters: a [`Stats`] snapshot per layer, and the same through the `metrics` facade.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! events {
    ($( $(#[$doc:meta])* $field:ident => $metric:literal $(, $label:literal = $value:literal)?; )*) => {
        /// One counted event.
        #[derive(Clone, Copy, Debug)]
        #[allow(non_camel_case_types)]
        #[cfg_attr(not(feature = "redis"), allow(dead_code))]
        pub(crate) enum Event { $($field,)* }

        const EVENTS: usize = [$(stringify!($field)),*].len();

        /// A snapshot of one layer's counters since it was built.
        ///
        /// The same counts are emitted through the [`metrics`] facade (names in each field's
        /// doc), so any `metrics` exporter (Prometheus, StatsD, ...) sees them.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct Stats {
            $( $(#[$doc])* pub $field: u64, )*
        }

        impl Counters {
            pub(crate) fn snapshot(&self) -> Stats {
                let mut i = 0;
                $( let $field = self.0[i].load(Ordering::Relaxed); i += 1; )*
                let _ = i;
                Stats { $($field,)* }
            }
        }

        fn emit(event: Event) {
            match event {
                $( Event::$field => metrics::counter!($metric $(, $label => $value)?).increment(1), )*
            }
        }
    };
}

events! {
    /// Answered from this process's memory (`tower_stampede_hits_total{tier="memory"}`).
    hits_memory => "tower_stampede_hits_total", "tier" = "memory";
    /// Answered from Redis without waiting (`tower_stampede_hits_total{tier="redis"}`).
    hits_redis => "tower_stampede_hits_total", "tier" = "redis";
    /// Found nothing usable in memory (`tower_stampede_misses_total`).
    misses => "tower_stampede_misses_total";
    /// Joined a request of the same process that went upstream
    /// (`tower_stampede_collapsed_total{scope="local"}`).
    collapsed_local => "tower_stampede_collapsed_total", "scope" = "local";
    /// Waited on another node's lock and read its answer
    /// (`tower_stampede_collapsed_total{scope="remote"}`).
    collapsed_remote => "tower_stampede_collapsed_total", "scope" = "remote";
    /// Stale copies served, while revalidating or because the upstream failed
    /// (`tower_stampede_stale_served_total`).
    stale_served => "tower_stampede_stale_served_total";
    /// Refreshes started in the background: stale-while-revalidate or early refresh
    /// (`tower_stampede_refreshes_total`).
    refreshes => "tower_stampede_refreshes_total";
    /// Calls made to the inner service for cacheable requests
    /// (`tower_stampede_upstream_calls_total`).
    upstream_calls => "tower_stampede_upstream_calls_total";
    /// Answers stored (`tower_stampede_stored_total`).
    stored => "tower_stampede_stored_total";
    /// Answers that could not be stored (`tower_stampede_uncacheable_total`).
    uncacheable => "tower_stampede_uncacheable_total";
    /// Requests sent straight upstream by a hit-for-pass marker
    /// (`tower_stampede_hit_for_pass_total`).
    hit_for_pass => "tower_stampede_hit_for_pass_total";
    /// Locks taken (`tower_stampede_lock_total{result="acquired"}`).
    lock_acquired => "tower_stampede_lock_total", "result" = "acquired";
    /// Fills that found the lock held elsewhere and waited
    /// (`tower_stampede_lock_total{result="waited"}`).
    lock_waited => "tower_stampede_lock_total", "result" = "waited";
    /// Leases lost while the inner call ran (`tower_stampede_lock_total{result="lost"}`).
    lock_lost => "tower_stampede_lock_total", "result" = "lost";
    /// Waits that passed the lock-wait limit (`tower_stampede_lock_total{result="timed_out"}`).
    lock_timed_out => "tower_stampede_lock_total", "result" = "timed_out";
    /// Redis calls that failed, timed out or were skipped by the breaker
    /// (`tower_stampede_redis_errors_total`).
    redis_errors => "tower_stampede_redis_errors_total";
    /// Requests not eligible for caching (`tower_stampede_bypassed_total`).
    bypassed => "tower_stampede_bypassed_total";
    /// Fills whose inner call failed, panicked or timed out
    /// (`tower_stampede_upstream_failures_total`).
    upstream_failures => "tower_stampede_upstream_failures_total";
    /// Wake-up messages received from Redis over pub/sub
    /// (`tower_stampede_wakeups_total`).
    wakeups => "tower_stampede_wakeups_total";
}

/// The live counters behind [`Stats`].
#[derive(Debug)]
pub(crate) struct Counters([AtomicU64; EVENTS]);

impl Counters {
    pub(crate) fn new() -> Self {
        Counters(std::array::from_fn(|_| AtomicU64::new(0)))
    }

    pub(crate) fn incr(&self, event: Event) {
        self.0[event as usize].fetch_add(1, Ordering::Relaxed);
        emit(event);
    }
}
