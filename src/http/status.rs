//! The RFC 9211 `Cache-Status` values this layer sets.

use http::HeaderValue;

use crate::stats::Ended;

/// How one response was produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// From this process's memory.
    HitMemory,
    /// From Redis.
    HitRedis,
    /// This request went upstream and the answer was stored.
    Stored,
    /// Joined another request of this process that went upstream.
    Collapsed,
    /// Waited on another node's lock, then read its answer from Redis.
    CollapsedFleet,
    /// A stale copy, served at once while one refresh runs (stale-while-revalidate).
    Stale,
    /// A stale copy, served because the upstream failed (stale-if-error).
    StaleIfError,
    /// A stale copy, served because the fill took longer than the soft timeout.
    StaleSoftTimeout,
    /// Went upstream; the answer was not storable.
    Uncacheable,
    /// Went upstream straight away: the key's last answer was not storable.
    HitForPass,
    /// Not a cached method.
    Method,
    /// A request that must not be shared (credentials) or that the key function skipped.
    Bypass(&'static str),
    /// Redis failed and the policy is to fail closed.
    RedisUnavailable,
    /// Waited longer than the lock-wait limit and the policy is to fail closed.
    LockTimeout,
    /// The upstream kept failing while this request waited on it.
    UpstreamFailed,
}

impl Outcome {
    /// How a request that ended with this outcome is labelled in the duration histogram;
    /// `None` (the inner service returned an error) is an error.
    pub(crate) fn ended(outcome: Option<Outcome>) -> Ended {
        match outcome {
            Some(Outcome::HitMemory | Outcome::HitRedis) => Ended::Hit,
            Some(Outcome::Stale | Outcome::StaleIfError | Outcome::StaleSoftTimeout) => {
                Ended::Stale
            }
            Some(Outcome::Stored | Outcome::Uncacheable) => Ended::Miss,
            Some(Outcome::Collapsed | Outcome::CollapsedFleet) => Ended::Collapsed,
            Some(Outcome::HitForPass | Outcome::Method | Outcome::Bypass(_)) => Ended::Bypass,
            Some(Outcome::RedisUnavailable | Outcome::LockTimeout | Outcome::UpstreamFailed)
            | None => Ended::Error,
        }
    }
}

impl From<crate::cache::flight::Outcome> for Outcome {
    fn from(outcome: crate::cache::flight::Outcome) -> Outcome {
        use crate::cache::flight::Outcome as F;
        match outcome {
            F::HitMemory => Outcome::HitMemory,
            F::HitTier => Outcome::HitRedis,
            F::Stored => Outcome::Stored,
            F::Collapsed => Outcome::Collapsed,
            F::CollapsedFleet => Outcome::CollapsedFleet,
            F::Stale => Outcome::Stale,
            F::StaleIfError => Outcome::StaleIfError,
            F::StaleSoftTimeout => Outcome::StaleSoftTimeout,
            F::Uncacheable => Outcome::Uncacheable,
            F::TierUnavailable => Outcome::RedisUnavailable,
            F::LockTimeout => Outcome::LockTimeout,
            F::FillFailed => Outcome::UpstreamFailed,
        }
    }
}

/// The `Cache-Status` values of the hot outcomes, formatted once per layer.
#[derive(Clone, Debug)]
pub(crate) struct StatusValues {
    cache: String,
    hit_memory: HeaderValue,
    hit_redis: HeaderValue,
    stale: HeaderValue,
    collapsed: HeaderValue,
}

impl StatusValues {
    pub(crate) fn new(cache: &str) -> Self {
        StatusValues {
            cache: cache.to_owned(),
            hit_memory: Outcome::HitMemory.header(cache),
            hit_redis: Outcome::HitRedis.header(cache),
            stale: Outcome::Stale.header(cache),
            collapsed: Outcome::Collapsed.header(cache),
        }
    }

    pub(crate) fn get(&self, outcome: Outcome) -> HeaderValue {
        match outcome {
            Outcome::HitMemory => self.hit_memory.clone(),
            Outcome::HitRedis => self.hit_redis.clone(),
            Outcome::Stale => self.stale.clone(),
            Outcome::Collapsed => self.collapsed.clone(),
            other => other.header(&self.cache),
        }
    }
}

impl Outcome {
    pub(crate) fn header(self, cache: &str) -> HeaderValue {
        let params = match self {
            Outcome::HitMemory => "hit; detail=memory".into(),
            Outcome::HitRedis => "hit; detail=redis".into(),
            Outcome::Stored => "fwd=miss; stored".into(),
            Outcome::Collapsed => "fwd=miss; collapsed".into(),
            Outcome::CollapsedFleet => "fwd=miss; collapsed; detail=fleet".into(),
            Outcome::Stale => "hit; detail=stale".into(),
            Outcome::StaleIfError => "fwd=miss; detail=stale-if-error".into(),
            Outcome::StaleSoftTimeout => "hit; detail=stale-soft-timeout".into(),
            Outcome::Uncacheable => "fwd=miss; detail=uncacheable".into(),
            Outcome::HitForPass => "fwd=bypass; detail=hit-for-pass".into(),
            Outcome::Method => "fwd=method".into(),
            Outcome::Bypass(why) => format!("fwd=bypass; detail={why}"),
            Outcome::RedisUnavailable => "fwd=miss; detail=redis-unavailable".into(),
            Outcome::LockTimeout => "fwd=miss; detail=lock-timeout".into(),
            Outcome::UpstreamFailed => "fwd=miss; detail=upstream-failed".into(),
        };
        HeaderValue::from_str(&format!("{cache}; {params}"))
            .unwrap_or_else(|_| HeaderValue::from_static("tower-stampede"))
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Outcome::HitMemory => "hit-memory",
            Outcome::HitRedis => "hit-redis",
            Outcome::Stored => "stored",
            Outcome::Collapsed => "collapsed",
            Outcome::CollapsedFleet => "collapsed-fleet",
            Outcome::Stale => "stale",
            Outcome::StaleIfError => "stale-if-error",
            Outcome::StaleSoftTimeout => "stale-soft-timeout",
            Outcome::Uncacheable => "uncacheable",
            Outcome::HitForPass => "hit-for-pass",
            Outcome::Method => "method",
            Outcome::Bypass(_) => "bypass",
            Outcome::RedisUnavailable => "redis-unavailable",
            Outcome::LockTimeout => "lock-timeout",
            Outcome::UpstreamFailed => "upstream-failed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_has_a_label() {
        use Outcome::*;
        let cases = [
            (HitMemory, "hit"),
            (HitRedis, "hit"),
            (Stale, "stale"),
            (StaleIfError, "stale"),
            (Stored, "miss"),
            (Uncacheable, "miss"),
            (Collapsed, "collapsed"),
            (CollapsedFleet, "collapsed"),
            (HitForPass, "bypass"),
            (Method, "bypass"),
            (Bypass("key"), "bypass"),
            (RedisUnavailable, "error"),
            (LockTimeout, "error"),
            (UpstreamFailed, "error"),
        ];
        for (outcome, label) in cases {
            assert_eq!(Outcome::ended(Some(outcome)).label(), label, "{outcome:?}");
        }
        assert_eq!(Outcome::ended(None).label(), "error");
    }
}
