//! Counters, durations and gauges: a [`Stats`] snapshot per layer, and (feature `metrics`,
//! on by default) the same and more through the `metrics` facade, every series labelled
//! with the layer's `cache` name and registered when the layer is built.
//!
//! Everything the request path, the fill and the lock wait report goes through the
//! one-line calls at the bottom of this file ([`timed`], [`note_outcome`], [`FillTimer`],
//! [`LockWait`], [`record_memory`]); without the feature they only keep the counters of
//! [`Stats`].

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! events {
    ($( $(#[$doc:meta])* $field:ident => $metric:literal $(, $label:literal = $value:literal)?; )*) => {
        /// One counted event.
        #[derive(Clone, Copy, Debug)]
        #[allow(non_camel_case_types)]
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
                $( let $field = self.load(i); i += 1; )*
                let _ = i;
                Stats { $($field,)* }
            }
        }

        /// The `metrics` counter of each event, in [`Event`] order, for `cache`.
        #[cfg(feature = "metrics")]
        fn register_counters(cache: &str) -> [metrics::Counter; EVENTS] {
            [$(
                metrics::counter!($metric, "cache" => cache.to_owned() $(, $label => $value)?),
            )*]
        }

        /// The metric name of each event, in [`Event`] order.
        #[cfg(all(test, feature = "metrics"))]
        const EVENT_METRICS: [&str; EVENTS] = [$($metric),*];
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
    /// Looks at the tier by a waiting fill after a pause that no wake-up ended: the poll
    /// under pub/sub, rare once the key's subscription is confirmed
    /// (`tower_stampede_lock_polls_total`).
    lock_polls => "tower_stampede_lock_polls_total";
}

/// The help text of every counter family, as `# HELP` shows it.
#[cfg(feature = "metrics")]
const COUNTER_HELP: &[(&str, &str)] = &[
    ("tower_stampede_hits_total", "Requests answered from the cache without going upstream, by tier: memory (this process) or redis (the shared tier)."),
    ("tower_stampede_misses_total", "Cacheable requests that found nothing usable in this process's memory."),
    ("tower_stampede_collapsed_total", "Requests answered by another request's upstream call, by scope: local (same process) or remote (another node's fill, read from Redis)."),
    ("tower_stampede_stale_served_total", "Stale copies served, while one refresh runs (stale-while-revalidate) or because the upstream failed (stale-if-error)."),
    ("tower_stampede_refreshes_total", "Background refreshes started: stale-while-revalidate or early refresh."),
    ("tower_stampede_upstream_calls_total", "Calls made to the inner service (the upstream) for cacheable requests."),
    ("tower_stampede_stored_total", "Answers stored in the cache."),
    ("tower_stampede_uncacheable_total", "Answers from the upstream that could not be stored."),
    ("tower_stampede_hit_for_pass_total", "Requests sent straight upstream because the key's last answer was not storable (hit-for-pass)."),
    ("tower_stampede_lock_total", "Fill locks, by result: acquired, waited (held by another fill), lost (lease lost during the call), timed_out (waited past the lock-wait limit)."),
    ("tower_stampede_redis_errors_total", "Redis calls that failed, timed out or were skipped because the breaker was open."),
    ("tower_stampede_bypassed_total", "Requests not eligible for caching (method, credentials, key function), sent straight upstream."),
    ("tower_stampede_upstream_failures_total", "Fills whose upstream call failed, panicked, timed out or answered 5xx."),
    ("tower_stampede_wakeups_total", "Wake-up messages received from Redis over pub/sub."),
    ("tower_stampede_lock_polls_total", "Looks at the tier by waiting fills after a pause no wake-up ended (the safety net under pub/sub)."),
];

/// The request duration histogram.
#[cfg(feature = "metrics")]
pub(crate) const REQUEST_DURATION: &str = "tower_stampede_request_duration_seconds";
/// The fill duration histogram.
#[cfg(feature = "metrics")]
pub(crate) const FILL_DURATION: &str = "tower_stampede_fill_duration_seconds";
/// The lock wait histogram.
#[cfg(feature = "metrics")]
pub(crate) const LOCK_WAIT: &str = "tower_stampede_lock_wait_seconds";
/// The gauge of answers in L1.
#[cfg(feature = "metrics")]
pub(crate) const L1_ENTRIES: &str = "tower_stampede_l1_entries";
/// The gauge of the in-process weight.
#[cfg(feature = "metrics")]
pub(crate) const L1_BYTES: &str = "tower_stampede_l1_bytes";
/// The gauge of upstream calls under the lock.
#[cfg(feature = "metrics")]
pub(crate) const FILLS_IN_FLIGHT: &str = "tower_stampede_fills_in_flight";
/// The gauge of fills waiting on another's lock.
#[cfg(feature = "metrics")]
pub(crate) const WAITERS: &str = "tower_stampede_waiters";

/// How a request ended, as the `outcome` label of the request histogram says it.
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    /// A fresh copy, from memory or Redis.
    Hit,
    /// A stale copy: stale-while-revalidate or stale-if-error.
    Stale,
    /// This request went upstream for its key (stored or not).
    Miss,
    /// Answered by another request's upstream call, in this process or another.
    Collapsed,
    /// Not cached: method, credentials, key function, hit-for-pass.
    Bypass,
    /// The layer answered an error (fail-closed policy, failed upstream) or the inner
    /// service returned one.
    Error,
}

#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
impl Ended {
    const ALL: [Ended; 6] = [
        Ended::Hit,
        Ended::Stale,
        Ended::Miss,
        Ended::Collapsed,
        Ended::Bypass,
        Ended::Error,
    ];

    /// The label value.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Ended::Hit => "hit",
            Ended::Stale => "stale",
            Ended::Miss => "miss",
            Ended::Collapsed => "collapsed",
            Ended::Bypass => "bypass",
            Ended::Error => "error",
        }
    }
}

/// The `metrics` handles of one layer, registered (and so exported, at zero) when it is
/// built. A recorder installed after the layer was built sees none of them.
#[cfg(feature = "metrics")]
#[derive(Debug)]
struct Metrics {
    counters: [metrics::Counter; EVENTS],
    /// By [`Ended`], in its order.
    requests: [metrics::Histogram; 6],
    fill: metrics::Histogram,
    lock_wait: metrics::Histogram,
    l1_entries: metrics::Gauge,
    l1_bytes: metrics::Gauge,
    fills_in_flight: metrics::Gauge,
    waiters: metrics::Gauge,
}

#[cfg(feature = "metrics")]
impl Metrics {
    fn register(cache: &str) -> Metrics {
        use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
        for (name, help) in COUNTER_HELP {
            describe_counter!(*name, Unit::Count, *help);
        }
        describe_histogram!(
            REQUEST_DURATION,
            Unit::Seconds,
            "Time from a request's arrival to its response head, by outcome: hit, stale, miss, collapsed, bypass, error."
        );
        describe_histogram!(
            FILL_DURATION,
            Unit::Seconds,
            "Time of each upstream call made under the fill lock, body buffering included."
        );
        describe_histogram!(
            LOCK_WAIT,
            Unit::Seconds,
            "Time fills spent waiting on a lock held by another fill (usually on another node), until they had an answer or the lock."
        );
        describe_gauge!(
            L1_ENTRIES,
            Unit::Count,
            "Answers cached in this process's memory (L1), as of the last StampedeLayer::memory call."
        );
        describe_gauge!(
            L1_BYTES,
            Unit::Bytes,
            "Weight of everything counted toward the in-process bound (L1 answers plus markers), as of the last StampedeLayer::memory call."
        );
        describe_gauge!(
            FILLS_IN_FLIGHT,
            Unit::Count,
            "Upstream calls running under the fill lock in this process."
        );
        describe_gauge!(
            WAITERS,
            Unit::Count,
            "Fills of this process waiting on a lock held by another fill."
        );
        let c = || cache.to_owned();
        let metrics = Metrics {
            counters: register_counters(cache),
            requests: Ended::ALL.map(
                |e| metrics::histogram!(REQUEST_DURATION, "cache" => c(), "outcome" => e.label()),
            ),
            fill: metrics::histogram!(FILL_DURATION, "cache" => c()),
            lock_wait: metrics::histogram!(LOCK_WAIT, "cache" => c()),
            l1_entries: metrics::gauge!(L1_ENTRIES, "cache" => c()),
            l1_bytes: metrics::gauge!(L1_BYTES, "cache" => c()),
            fills_in_flight: metrics::gauge!(FILLS_IN_FLIGHT, "cache" => c()),
            waiters: metrics::gauge!(WAITERS, "cache" => c()),
        };
        // Every series exists from the start, not only after its first event.
        for counter in &metrics.counters {
            counter.increment(0);
        }
        for gauge in [
            &metrics.l1_entries,
            &metrics.l1_bytes,
            &metrics.fills_in_flight,
            &metrics.waiters,
        ] {
            gauge.set(0.0);
        }
        metrics
    }
}

/// The live counters behind [`Stats`], and the layer's `metrics` handles.
#[derive(Debug)]
pub(crate) struct Counters {
    counts: [AtomicU64; EVENTS],
    #[cfg(feature = "metrics")]
    metrics: Metrics,
}

impl Counters {
    /// The counters of the layer named `cache` (its `cache_name`): with the `metrics`
    /// feature, describes every metric to the installed recorder and registers its series.
    pub(crate) fn new(cache: &str) -> Self {
        let _ = cache;
        Counters {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            #[cfg(feature = "metrics")]
            metrics: Metrics::register(cache),
        }
    }

    pub(crate) fn incr(&self, event: Event) {
        self.counts[event as usize].fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.metrics.counters[event as usize].increment(1);
    }

    fn load(&self, i: usize) -> u64 {
        self.counts[i].load(Ordering::Relaxed)
    }
}

impl Counters {
    /// Records one request's duration, up to its response head, by how it ended.
    pub(crate) fn record_request(&self, ended: Ended, secs: f64) {
        #[cfg(feature = "metrics")]
        self.metrics.requests[ended as usize].record(secs);
        #[cfg(not(feature = "metrics"))]
        let _ = (ended, secs);
    }

    /// The L1 gauges follow the figures just brought up to date.
    pub(crate) fn record_memory(&self, entries: u64, bytes: u64) {
        #[cfg(feature = "metrics")]
        {
            self.metrics.l1_entries.set(entries as f64);
            self.metrics.l1_bytes.set(bytes as f64);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = (entries, bytes);
    }
}

/// Call site: the start of an upstream call under the lock (`lead`). While it lives the
/// fill counts in `tower_stampede_fills_in_flight`; when it drops (the call ended, or its
/// task went away) its duration goes to `tower_stampede_fill_duration_seconds`.
#[must_use = "the fill is timed until this drops"]
pub(crate) struct FillTimer<'a> {
    #[cfg(feature = "metrics")]
    metrics: &'a Metrics,
    #[cfg(feature = "metrics")]
    started: std::time::Instant,
    #[cfg(not(feature = "metrics"))]
    _counters: std::marker::PhantomData<&'a Counters>,
}

impl<'a> FillTimer<'a> {
    pub(crate) fn start(counters: &'a Counters) -> Self {
        #[cfg(feature = "metrics")]
        {
            counters.metrics.fills_in_flight.increment(1.0);
            FillTimer {
                metrics: &counters.metrics,
                started: std::time::Instant::now(),
            }
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = counters;
            FillTimer {
                _counters: std::marker::PhantomData,
            }
        }
    }
}

impl Drop for FillTimer<'_> {
    fn drop(&mut self) {
        #[cfg(feature = "metrics")]
        {
            self.metrics.fills_in_flight.decrement(1.0);
            self.metrics
                .fill
                .record(self.started.elapsed().as_secs_f64());
        }
    }
}

/// Call sites: made when a fill starts contending for the lock (`contend_redis`), and
/// told [`waiting`](Self::waiting) when it first finds the lock held by another fill.
/// From then until it drops, the fill counts in `tower_stampede_waiters`; the time goes to
/// `tower_stampede_lock_wait_seconds`. A fill that never waited records nothing.
#[must_use = "the wait is timed until this drops"]
pub(crate) struct LockWait<'a> {
    #[cfg(feature = "metrics")]
    metrics: &'a Metrics,
    #[cfg(feature = "metrics")]
    since: Option<std::time::Instant>,
    #[cfg(not(feature = "metrics"))]
    _counters: std::marker::PhantomData<&'a Counters>,
}

impl<'a> LockWait<'a> {
    pub(crate) fn new(counters: &'a Counters) -> Self {
        #[cfg(feature = "metrics")]
        {
            LockWait {
                metrics: &counters.metrics,
                since: None,
            }
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = counters;
            LockWait {
                _counters: std::marker::PhantomData,
            }
        }
    }

    /// The lock is held by another fill: the wait starts now (once).
    pub(crate) fn waiting(&mut self) {
        #[cfg(feature = "metrics")]
        if self.since.is_none() {
            self.since = Some(std::time::Instant::now());
            self.metrics.waiters.increment(1.0);
        }
    }
}

impl Drop for LockWait<'_> {
    fn drop(&mut self) {
        #[cfg(feature = "metrics")]
        if let Some(since) = self.since {
            self.metrics.waiters.decrement(1.0);
            self.metrics.lock_wait.record(since.elapsed().as_secs_f64());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ended_labels_follow_their_order() {
        for (i, e) in Ended::ALL.iter().enumerate() {
            assert_eq!(*e as usize, i);
        }
    }

    #[cfg(feature = "metrics")]
    #[test]
    fn every_counter_family_has_help_text() {
        for name in EVENT_METRICS {
            assert!(
                COUNTER_HELP.iter().any(|(n, _)| *n == name),
                "{name} has no help text"
            );
        }
    }

    #[test]
    fn counts_without_a_recorder() {
        let counters = Counters::new("test");
        counters.incr(Event::misses);
        counters.incr(Event::misses);
        counters.incr(Event::stored);
        let stats = counters.snapshot();
        assert_eq!((stats.misses, stats.stored, stats.hits_memory), (2, 1, 0));
    }
}
