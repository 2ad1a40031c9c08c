//! RFC 9111 arithmetic for a shared cache: the directives that govern this cache (a
//! targeted field, RFC 9213, else `Cache-Control`), delta-seconds, HTTP dates, the `Age`
//! of an answer (section 4.2.3) and its freshness lifetime (4.2.1, 4.2.2).
//!
//! Everything here reads hostile input: values that do not parse are invalid, never a
//! panic; numbers are capped at 2^31 seconds as section 1.2.2 asks.

use http::header::{AGE, CACHE_CONTROL, DATE, ETAG, EXPIRES, LAST_MODIFIED};
use http::{HeaderMap, HeaderName, HeaderValue};

/// The largest delta-seconds a cache represents (RFC 9111 1.2.2): 2^31.
pub(crate) const MAX_DELTA: u64 = 1 << 31;

/// `CDN-Cache-Control` (RFC 9213), after this cache's own targeted field.
pub(crate) static CDN_CACHE_CONTROL: HeaderName = HeaderName::from_static("cdn-cache-control");

/// The default name of this cache's own targeted field.
pub(crate) static OWN_CACHE_CONTROL: HeaderName =
    HeaderName::from_static("tower-stampede-cache-control");

/// A delta-seconds value as received: a number of seconds (capped), or invalid
/// (negative, not a number, or given twice with different values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Delta {
    Secs(u64),
    Invalid,
}

impl Delta {
    fn parse(value: Option<&str>) -> Delta {
        // Recipients accept the quoted form too (RFC 9111 5.2).
        let Some(v) = value.map(|v| v.trim().trim_matches('"')) else {
            return Delta::Invalid;
        };
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Delta::Invalid;
        }
        // Past what a u64 holds: the cap (1.2.2).
        Delta::Secs(v.parse::<u64>().unwrap_or(MAX_DELTA).min(MAX_DELTA))
    }

    /// Seconds, an invalid value counting as 0 (stale: 4.2.1 encourages that).
    pub(crate) fn secs(self) -> u64 {
        match self {
            Delta::Secs(s) => s,
            Delta::Invalid => 0,
        }
    }

    fn merge(slot: &mut Option<Delta>, new: Delta) {
        *slot = match *slot {
            None => Some(new),
            Some(old) if old == new => Some(old),
            Some(_) => Some(Delta::Invalid),
        };
    }
}

/// The response directives this cache acts on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Directives {
    pub(crate) no_store: bool,
    pub(crate) private: bool,
    pub(crate) no_cache: bool,
    pub(crate) must_revalidate: bool,
    pub(crate) proxy_revalidate: bool,
    pub(crate) public: bool,
    pub(crate) max_age: Option<Delta>,
    pub(crate) s_maxage: Option<Delta>,
    pub(crate) stale_while_revalidate: Option<u64>,
    pub(crate) stale_if_error: Option<u64>,
    /// They came from a targeted field: `Expires` is ignored too (RFC 9213 2.2).
    pub(crate) targeted: bool,
}

impl Directives {
    /// The directives of the first targeted field present with a non-empty value (in
    /// `targeted` order), else of `Cache-Control`.
    pub(crate) fn of(headers: &HeaderMap, targeted: &[HeaderName]) -> Directives {
        for name in targeted {
            let present = headers
                .get_all(name)
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| !v.trim().is_empty()));
            if present {
                let mut d = Self::parse(headers.get_all(name).iter());
                d.targeted = true;
                return d;
            }
        }
        Self::parse(headers.get_all(CACHE_CONTROL).iter())
    }

    fn parse<'a>(values: impl Iterator<Item = &'a HeaderValue>) -> Directives {
        let mut d = Directives::default();
        for (name, value) in directives(values) {
            let value = value.as_deref();
            match name.as_str() {
                "no-store" => d.no_store = true,
                "private" => d.private = true,
                "no-cache" => d.no_cache = true,
                "must-revalidate" => d.must_revalidate = true,
                "proxy-revalidate" => d.proxy_revalidate = true,
                "public" => d.public = true,
                "max-age" => Delta::merge(&mut d.max_age, Delta::parse(value)),
                "s-maxage" => Delta::merge(&mut d.s_maxage, Delta::parse(value)),
                "stale-while-revalidate" => {
                    if let Delta::Secs(s) = Delta::parse(value) {
                        d.stale_while_revalidate = Some(s);
                    }
                }
                "stale-if-error" => {
                    if let Delta::Secs(s) = Delta::parse(value) {
                        d.stale_if_error = Some(s);
                    }
                }
                _ => {}
            }
        }
        d
    }

    /// Never served stale, not even on error: `must-revalidate`, `proxy-revalidate`,
    /// `s-maxage` (which implies `proxy-revalidate`, 5.2.2.10) and `no-cache`.
    pub(crate) fn strict(&self) -> bool {
        self.must_revalidate || self.proxy_revalidate || self.s_maxage.is_some() || self.no_cache
    }
}

/// Iterates the directives of field values: `(lowercased name, value)`.
pub(crate) fn directives<'a>(
    values: impl Iterator<Item = &'a HeaderValue>,
) -> impl Iterator<Item = (String, Option<String>)> {
    values
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|d| {
            let d = d.trim();
            if d.is_empty() {
                return None;
            }
            Some(match d.split_once('=') {
                Some((n, v)) => (n.trim().to_ascii_lowercase(), Some(v.trim().to_owned())),
                None => (d.to_ascii_lowercase(), None),
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
}

/// An HTTP date (IMF-fixdate, RFC 850 or asctime) in Unix milliseconds; `None` when it
/// does not parse.
pub(crate) fn http_date_ms(value: &HeaderValue) -> Option<u64> {
    let text = value.to_str().ok()?;
    let at = httpdate::parse_http_date(text.trim()).ok()?;
    let since = at.duration_since(std::time::UNIX_EPOCH).ok()?;
    Some(since.as_millis().min(u64::MAX as u128) as u64)
}

/// The received `Age` in seconds (5.1): the first member of the field value, capped at
/// 2^31; an invalid value is ignored (0).
pub(crate) fn age_value(headers: &HeaderMap) -> u64 {
    let Some(first) = headers
        .get_all(AGE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find(|v| !v.is_empty())
    else {
        return 0;
    };
    match Delta::parse(Some(first)) {
        Delta::Secs(s) => s,
        Delta::Invalid => 0,
    }
}

/// When the request went upstream and when its answer's head came back, in Unix ms.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timing {
    pub(crate) request_ms: u64,
    pub(crate) response_ms: u64,
}

impl Timing {
    /// Now, for both: an answer with no delay.
    #[cfg(test)]
    pub(crate) fn now() -> Timing {
        let now = crate::cache::entry::now_ms();
        Timing {
            request_ms: now,
            response_ms: now,
        }
    }
}

/// The corrected initial age (4.2.3) in ms: the larger of the apparent age
/// (`response_time - Date`) and the received `Age` plus the response delay.
pub(crate) fn initial_age_ms(headers: &HeaderMap, timing: Timing) -> u64 {
    let apparent = headers
        .get(DATE)
        .and_then(http_date_ms)
        .map_or(0, |date| timing.response_ms.saturating_sub(date));
    let delay = timing.response_ms.saturating_sub(timing.request_ms);
    let corrected = age_value(headers)
        .saturating_mul(1000)
        .saturating_add(delay);
    apparent.max(corrected).min(MAX_DELTA * 1000)
}

/// Whether the answer carries a validator this cache can revalidate with.
pub(crate) fn has_validator(headers: &HeaderMap) -> bool {
    headers.contains_key(ETAG) || headers.contains_key(LAST_MODIFIED)
}

/// The explicit freshness lifetime in ms (4.2.1): `s-maxage`, else `max-age`, else
/// `Expires - Date` (unless the directives came from a targeted field). An invalid
/// value or `Expires` is a lifetime of 0 (already stale). `None`: no explicit freshness.
pub(crate) fn explicit_lifetime_ms(
    d: &Directives,
    headers: &HeaderMap,
    timing: Timing,
) -> Option<u64> {
    if let Some(s) = d.s_maxage {
        return Some(s.secs() * 1000);
    }
    if let Some(m) = d.max_age {
        return Some(m.secs() * 1000);
    }
    if d.targeted {
        return None;
    }
    let mut expires = headers.get_all(EXPIRES).iter();
    let first = expires.next()?;
    if expires.next().is_some() {
        // Two Expires: invalid freshness information.
        return Some(0);
    }
    let Some(expires) = http_date_ms(first) else {
        return Some(0);
    };
    let date = headers
        .get(DATE)
        .and_then(http_date_ms)
        .unwrap_or(timing.response_ms);
    Some(expires.saturating_sub(date).min(MAX_DELTA * 1000))
}

/// The heuristic lifetime in ms (4.2.2): a tenth of the time since `Last-Modified` (as of
/// `Date`), at most `cap_ms`.
pub(crate) fn heuristic_lifetime_ms(
    headers: &HeaderMap,
    timing: Timing,
    cap_ms: u64,
) -> Option<u64> {
    let modified = headers.get(LAST_MODIFIED).and_then(http_date_ms)?;
    let date = headers
        .get(DATE)
        .and_then(http_date_ms)
        .unwrap_or(timing.response_ms);
    Some((date.saturating_sub(modified) / 10).min(cap_ms))
}

/// Statuses cacheable without explicit freshness (RFC 9110 15.1).
pub(crate) fn heuristically_cacheable(status: u16) -> bool {
    matches!(
        status,
        200 | 203 | 204 | 206 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// A request header's value as a secondary key part (RFC 9111 4.1): every line joined,
/// each list member trimmed and inner runs of whitespace collapsed to one space. `None`
/// when the request lacks the header.
pub(crate) fn normalized(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut out = String::new();
    let mut any = false;
    for value in headers.get_all(name) {
        any = true;
        let text = String::from_utf8_lossy(value.as_bytes());
        for member in text.split(',') {
            let member = member.split_whitespace().collect::<Vec<_>>().join(" ");
            if member.is_empty() {
                continue;
            }
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(&member);
        }
    }
    any.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn delta_seconds() {
        assert_eq!(Delta::parse(Some("10")), Delta::Secs(10));
        assert_eq!(Delta::parse(Some("\"20\"")), Delta::Secs(20));
        assert_eq!(Delta::parse(Some("-1")), Delta::Invalid);
        assert_eq!(Delta::parse(Some("1.5")), Delta::Invalid);
        assert_eq!(Delta::parse(None), Delta::Invalid);
        assert_eq!(
            Delta::parse(Some("99999999999999999999999")),
            Delta::Secs(MAX_DELTA)
        );
        let d = Directives::of(&headers(&[("cache-control", "max-age=5, max-age=6")]), &[]);
        assert_eq!(d.max_age, Some(Delta::Invalid));
    }

    #[test]
    fn age_values() {
        assert_eq!(age_value(&headers(&[("age", "30")])), 30);
        assert_eq!(age_value(&headers(&[("age", "30, 40")])), 30);
        assert_eq!(age_value(&headers(&[("age", "30"), ("age", "40")])), 30);
        assert_eq!(age_value(&headers(&[("age", "abc")])), 0);
        assert_eq!(age_value(&headers(&[("age", "-3")])), 0);
        assert_eq!(
            age_value(&headers(&[("age", "123456789012345678901234567890")])),
            MAX_DELTA
        );
    }

    #[test]
    fn targeted_fields_outrank_cache_control() {
        let h = headers(&[
            ("cache-control", "max-age=5"),
            ("cdn-cache-control", "max-age=50"),
        ]);
        let d = Directives::of(&h, &[OWN_CACHE_CONTROL.clone(), CDN_CACHE_CONTROL.clone()]);
        assert_eq!(d.max_age, Some(Delta::Secs(50)));
        assert!(d.targeted);
        let h = headers(&[("cache-control", "max-age=5"), ("cdn-cache-control", " ")]);
        let d = Directives::of(&h, std::slice::from_ref(&CDN_CACHE_CONTROL));
        assert_eq!(d.max_age, Some(Delta::Secs(5)));
    }

    #[test]
    fn whitespace_normalization() {
        let a = headers(&[("accept-language", "en ,  fr")]);
        let b = headers(&[("accept-language", "en"), ("accept-language", "fr")]);
        let name = HeaderName::from_static("accept-language");
        assert_eq!(normalized(&a, &name), normalized(&b, &name));
        assert_eq!(normalized(&HeaderMap::new(), &name), None);
    }
}
