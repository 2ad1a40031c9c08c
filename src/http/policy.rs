//! The HTTP rules: which requests may share a cached answer, and which answers are stored.

use std::time::Duration;

use http::header::{
    ACCEPT_ENCODING, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, COOKIE, ETAG, IF_MATCH,
    IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, IF_UNMODIFIED_SINCE, RANGE, SET_COOKIE,
    TRANSFER_ENCODING, VARY,
};
use http::{HeaderMap, HeaderName, Method, StatusCode};

use super::rfc::{self, Directives, Timing, CDN_CACHE_CONTROL, OWN_CACHE_CONTROL};
use super::status::Outcome;

/// What to do with requests that carry `Authorization` or `Cookie`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PrivateRequests {
    /// Send them to the inner service untouched: never served from, nor stored into, the
    /// cache (the default).
    #[default]
    Bypass,
    /// Cache them per user: the credentials go into the key, so two users never share an
    /// answer and never wait on each other.
    PerUser,
    /// Ignore the credentials: everyone shares one answer. Only for credentials that are
    /// the same for every caller, such as a client's own API token.
    Shared,
}

/// Why an answer is not stored; becomes the `detail` of its hit-for-pass marker.
pub(crate) type Reason = &'static str;

#[derive(Clone, Debug)]
pub(crate) struct HttpRules {
    pub(crate) methods: Vec<Method>,
    pub(crate) private_requests: PrivateRequests,
    pub(crate) honor_no_store: bool,
    pub(crate) store_set_cookie: bool,
    pub(crate) vary: Vec<HeaderName>,
    pub(crate) ttl: Duration,
    pub(crate) honor_cache_control: bool,
    pub(crate) max_body: usize,
    pub(crate) grace: Duration,
    pub(crate) stale_if_error: Duration,
    pub(crate) negative_ttl: Duration,
    pub(crate) error_ttl: Duration,
    /// Send `Surrogate-Key` / `Cache-Tag` downstream (they are always read as tags).
    pub(crate) expose_tags: bool,
    /// Standards mode only: one TTL for every storable answer (0.1's fixed TTL).
    pub(crate) ttl_override: Option<Duration>,
    /// Heuristic freshness for answers with `Last-Modified`, capped at this; `None`: off.
    pub(crate) heuristic: Option<Duration>,
    /// How long past freshness an answer with a validator is kept to be revalidated.
    pub(crate) revalidate_window: Duration,
    /// The targeted fields (RFC 9213) in order: this cache's own, then `CDN-Cache-Control`.
    pub(crate) targeted: Vec<HeaderName>,
    /// Whether a client's `no-cache`, `max-age=0` or `Pragma: no-cache` sends it upstream.
    pub(crate) honor_request_no_cache: bool,
    /// The most variants per URL this node stores for answers varying on headers the key
    /// does not hold; 0 leaves such answers unstored.
    pub(crate) max_variants: usize,
    /// Whether `Accept-Encoding` is normalized and keyed.
    pub(crate) key_accept_encoding: bool,
}

/// How long an answer is fresh, then servable while one refresh runs, then kept (for
/// stale-if-error, and for revalidation); with what the standards mode learned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Freshness {
    pub(crate) ttl: Duration,
    pub(crate) grace: Duration,
    pub(crate) stale_if_error: Duration,
    /// The corrected initial age (RFC 9111 4.2.3), in seconds.
    pub(crate) initial_age: u32,
    /// How long past freshness it may be served without revalidation (grace or
    /// stale-if-error as the answer allows); beyond that the copy is only kept to be
    /// revalidated.
    pub(crate) stale_ok: Duration,
    /// Request headers the answer varies on that the key does not hold (standards mode).
    pub(crate) vary: Vec<HeaderName>,
    /// The answer's own tags (`Surrogate-Key`, `Cache-Tag`).
    pub(crate) tags: Vec<String>,
}

impl Freshness {
    fn fixed(ttl: Duration, grace: Duration, stale_if_error: Duration) -> Freshness {
        Freshness {
            ttl,
            grace,
            stale_if_error,
            initial_age: 0,
            stale_ok: grace.max(stale_if_error),
            vary: Vec::new(),
            tags: Vec::new(),
        }
    }
}

/// A byte range asked for: `bytes=first-last`, `bytes=first-` or `bytes=-suffix`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ByteRange {
    From(u64, Option<u64>),
    Suffix(u64),
}

impl ByteRange {
    /// One range of the `bytes` unit; `None` for anything else (several ranges, another
    /// unit, a malformed value), which goes upstream untouched.
    pub(crate) fn parse(value: &http::HeaderValue) -> Option<ByteRange> {
        let v = value.to_str().ok()?.trim();
        let (unit, spec) = v.split_once('=')?;
        if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') {
            return None;
        }
        let (first, last) = spec.trim().split_once('-')?;
        let num = |s: &str| -> Option<Option<u64>> {
            let s = s.trim();
            if s.is_empty() {
                return Some(None);
            }
            if !s.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            Some(Some(s.parse().unwrap_or(u64::MAX)))
        };
        match (num(first)?, num(last)?) {
            (Some(a), Some(b)) if a <= b => Some(ByteRange::From(a, Some(b))),
            (Some(a), None) => Some(ByteRange::From(a, None)),
            (None, Some(n)) => Some(ByteRange::Suffix(n)),
            _ => None,
        }
    }

    /// The inclusive byte span in a body of `len` bytes, or `None` when unsatisfiable.
    pub(crate) fn span(self, len: u64) -> Option<(u64, u64)> {
        match self {
            ByteRange::From(a, _) if a >= len => None,
            ByteRange::From(a, b) => Some((a, b.unwrap_or(u64::MAX).min(len - 1))),
            ByteRange::Suffix(0) => None,
            ByteRange::Suffix(_) if len == 0 => None,
            ByteRange::Suffix(n) => Some((len.saturating_sub(n), len - 1)),
        }
    }
}

impl Default for HttpRules {
    fn default() -> Self {
        HttpRules {
            methods: vec![Method::GET, Method::HEAD],
            private_requests: PrivateRequests::Bypass,
            honor_no_store: true,
            store_set_cookie: false,
            vary: Vec::new(),
            ttl: Duration::from_secs(60),
            honor_cache_control: false,
            max_body: 1024 * 1024,
            grace: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            negative_ttl: Duration::ZERO,
            error_ttl: Duration::from_secs(1),
            expose_tags: false,
            ttl_override: None,
            heuristic: None,
            revalidate_window: Duration::from_secs(600),
            targeted: vec![OWN_CACHE_CONTROL.clone(), CDN_CACHE_CONTROL.clone()],
            honor_request_no_cache: false,
            max_variants: 16,
            key_accept_encoding: true,
        }
    }
}

/// Iterates the directives of every `Cache-Control` header: `(name, value)`.
fn directives(headers: &HeaderMap) -> impl Iterator<Item = (String, Option<String>)> + '_ {
    rfc::directives(headers.get_all(CACHE_CONTROL).iter())
        .map(|(n, v)| (n, v.map(|v| v.trim_matches('"').to_owned())))
}

impl HttpRules {
    /// Whether the standards (RFC 9111) rules apply: `honor_cache_control` without a
    /// TTL override.
    pub(crate) fn standards(&self) -> bool {
        self.honor_cache_control && self.ttl_override.is_none()
    }

    /// `Ok(per_user)` when the request may use the cache.
    pub(crate) fn check_request(
        &self,
        method: &Method,
        headers: &HeaderMap,
    ) -> Result<bool, Outcome> {
        if !self.methods.contains(method) {
            return Err(Outcome::Method);
        }
        // One pass over the (few) names first: most requests carry none of the headers
        // looked at below, and each lookup hashes its name.
        const LOOKED_AT: [HeaderName; 7] = [
            TRANSFER_ENCODING,
            CONTENT_LENGTH,
            RANGE,
            CACHE_CONTROL,
            http::header::PRAGMA,
            AUTHORIZATION,
            COOKIE,
        ];
        if !headers.keys().any(|n| LOOKED_AT.contains(n)) {
            return Ok(false);
        }
        // The key holds no body: a request with one must neither fill an entry others are
        // served from nor share another request's answer.
        if has_body(headers) {
            return Err(Outcome::Bypass("request-body"));
        }
        let standards = self.standards();
        // A partial answer is not the resource: never stored, and no marker either. In
        // standards mode one byte range is answered from the whole entry.
        if headers.contains_key(RANGE) {
            let mut ranges = headers.get_all(RANGE).iter();
            let single =
                ranges.next().and_then(ByteRange::parse).is_some() && ranges.next().is_none();
            if !(standards && single) {
                return Err(Outcome::Bypass("range"));
            }
        }
        if standards {
            let mut no_cache = false;
            let mut has_cc = false;
            for (name, value) in rfc::directives(headers.get_all(CACHE_CONTROL).iter()) {
                has_cc = true;
                match name.as_str() {
                    "no-store" => return Err(Outcome::Bypass("no-store")),
                    "no-cache" => no_cache = true,
                    "max-age" if value.as_deref().map(|v| v.trim_matches('"')) == Some("0") => {
                        no_cache = true
                    }
                    _ => {}
                }
            }
            // Pragma counts only without Cache-Control (RFC 9111 5.4).
            if !has_cc {
                no_cache |= headers
                    .get_all(http::header::PRAGMA)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .any(|v| {
                        v.split(',')
                            .any(|p| p.trim().eq_ignore_ascii_case("no-cache"))
                    });
            }
            if no_cache && self.honor_request_no_cache {
                return Err(Outcome::Bypass("no-cache"));
            }
        }
        if headers.contains_key(AUTHORIZATION) || headers.contains_key(COOKIE) {
            return match self.private_requests {
                PrivateRequests::Bypass => Err(Outcome::Bypass("private")),
                PrivateRequests::PerUser => Ok(true),
                PrivateRequests::Shared => Ok(false),
            };
        }
        Ok(false)
    }

    /// Whether a `Vary` name is already in the key: `Accept-Encoding` (normalized), the
    /// configured headers, and for per-user keys the credentials.
    fn keyed(&self, name: &str, per_user: bool) -> bool {
        self.vary
            .iter()
            .any(|v| v.as_str().eq_ignore_ascii_case(name))
            || (self.key_accept_encoding && name.eq_ignore_ascii_case(ACCEPT_ENCODING.as_str()))
            || (per_user
                && (name.eq_ignore_ascii_case(AUTHORIZATION.as_str())
                    || name.eq_ignore_ascii_case(COOKIE.as_str())))
    }

    /// The `Vary` names the key does not hold, or why the answer is not stored.
    fn unkeyed_vary(&self, headers: &HeaderMap, per_user: bool) -> Result<Vec<HeaderName>, Reason> {
        let mut names: Vec<HeaderName> = Vec::new();
        for value in headers.get_all(VARY) {
            let Ok(value) = value.to_str() else {
                return Err("vary");
            };
            for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                if name == "*" {
                    return Err("vary-star");
                }
                if self.keyed(name, per_user) {
                    continue;
                }
                let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
                    return Err("vary");
                };
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        Ok(names)
    }

    /// How long an answer may be used, or why it is not stored. `per_user` answers may
    /// vary on the credentials, which their key already holds. `timing` is when the
    /// request went upstream and when the answer came back (for its age).
    pub(crate) fn check_response(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        per_user: bool,
        timing: Timing,
    ) -> Result<Freshness, Reason> {
        if self.standards() {
            return self.check_standards(status, headers, per_user, timing);
        }
        // Negative answers and upstream errors: kept briefly, never served stale.
        let short = match status.as_u16() {
            404 | 410 if !self.negative_ttl.is_zero() => Some(self.negative_ttl),
            429 | 500..=599 if !self.error_ttl.is_zero() => Some(self.error_ttl),
            _ => None,
        };
        if short.is_none() && !matches!(status.as_u16(), 200 | 203 | 204 | 300 | 301 | 308) {
            return Err("status");
        }
        // What the envelope cannot hold is not stored: the decoder would refuse it.
        if !super::stored::headers_fit(headers) {
            return Err("headers");
        }
        if !self.unkeyed_vary(headers, per_user)?.is_empty() {
            return Err("vary");
        }
        if !self.store_set_cookie && headers.contains_key(SET_COOKIE) {
            return Err("set-cookie");
        }
        for (name, _) in directives(headers) {
            if matches!(name.as_str(), "no-store" | "private" | "no-cache") && self.honor_no_store {
                return Err("no-store");
            }
        }
        let fresh = match short {
            Some(ttl) => Freshness::fixed(ttl, Duration::ZERO, Duration::ZERO),
            None => Freshness::fixed(
                self.ttl_override.unwrap_or(self.ttl),
                self.grace,
                self.stale_if_error,
            ),
        };
        if fresh.ttl.is_zero() {
            return Err("max-age");
        }
        Ok(fresh)
    }

    /// The RFC 9111 rules for a shared cache.
    fn check_standards(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        per_user: bool,
        timing: Timing,
    ) -> Result<Freshness, Reason> {
        let code = status.as_u16();
        // Informational answers are never stored; a partial or not-modified answer is not
        // the resource (this cache asks upstream for whole ones).
        if code < 200 || code == 206 || code == 304 {
            return Err("status");
        }
        if !super::stored::headers_fit(headers) {
            return Err("headers");
        }
        let d = Directives::of(headers, &self.targeted);
        if self.honor_no_store && (d.no_store || d.private) {
            return Err("no-store");
        }
        let vary = self.unkeyed_vary(headers, per_user)?;
        if !vary.is_empty() && self.max_variants == 0 {
            return Err("vary");
        }
        if !self.store_set_cookie && headers.contains_key(SET_COOKIE) {
            return Err("set-cookie");
        }
        let error = code == 429 || status.is_server_error();
        let ms = |d: Duration| d.as_millis().min(u64::MAX as u128) as u64;
        let explicit = rfc::explicit_lifetime_ms(&d, headers, timing);
        let short = match code {
            404 | 410 if !self.negative_ttl.is_zero() => Some(self.negative_ttl),
            _ if error && !self.error_ttl.is_zero() => Some(self.error_ttl),
            _ => None,
        };
        // The configured TTLs count from the moment of storing; the answer's own
        // lifetimes from its age (4.2.3).
        let mut configured = false;
        let lifetime_ms = match (explicit, short) {
            (Some(e), _) => e,
            (None, Some(short)) => {
                configured = true;
                ms(short)
            }
            // Errors and other statuses need explicit freshness (RFC 9110 15.1).
            (None, None) if error || !rfc::heuristically_cacheable(code) => return Err("status"),
            (None, None) => match self
                .heuristic
                .and_then(|cap| rfc::heuristic_lifetime_ms(headers, timing, ms(cap)))
            {
                Some(h) => h,
                None => {
                    configured = true;
                    ms(self.ttl)
                }
            },
        };
        let validator = rfc::has_validator(headers);
        if d.no_cache && !validator {
            // Revalidated before every reuse, and nothing to revalidate with.
            return Err("no-cache");
        }
        let age_ms = rfc::initial_age_ms(headers, timing);
        let lifetime_ms = if d.no_cache { 0 } else { lifetime_ms };
        let ttl = if configured {
            Duration::from_millis(lifetime_ms)
        } else {
            Duration::from_millis(lifetime_ms.saturating_sub(age_ms))
        };
        let (grace, stale_if_error) = if d.strict() || (explicit.is_none() && short.is_some()) {
            (Duration::ZERO, Duration::ZERO)
        } else {
            (
                d.stale_while_revalidate
                    .map_or(self.grace, Duration::from_secs),
                d.stale_if_error
                    .map_or(self.stale_if_error, Duration::from_secs),
            )
        };
        let keep = if validator {
            self.revalidate_window
        } else {
            Duration::ZERO
        };
        if ttl.is_zero() && grace.is_zero() && stale_if_error.max(keep).is_zero() {
            return Err("max-age");
        }
        Ok(Freshness {
            ttl,
            grace,
            stale_if_error: stale_if_error.max(keep),
            initial_age: (age_ms / 1000).min(rfc::MAX_DELTA) as u32,
            stale_ok: grace.max(stale_if_error),
            vary,
            tags: Vec::new(),
        })
    }
}

/// Whether the request's head announces a body: any `Transfer-Encoding`, or a
/// `Content-Length` other than `0` (one that does not parse counts as a body).
fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(TRANSFER_ENCODING)
        || headers
            .get_all(CONTENT_LENGTH)
            .iter()
            .any(|v| v.to_str().map_or(true, |v| v.trim().parse() != Ok(0u64)))
}

/// The tags an answer gives itself: `Surrogate-Key` (space separated, Fastly style) and
/// `Cache-Tag` (comma separated, Cloudflare style), bounded in number and length. The
/// headers are removed unless `expose` (they are for this cache, not for clients).
pub(crate) fn take_tags(headers: &mut HeaderMap, expose: bool) -> Vec<String> {
    use crate::cache::entry::{MAX_TAGS, MAX_TAG_LEN};
    const SURROGATE_KEY: HeaderName = HeaderName::from_static("surrogate-key");
    const CACHE_TAG: HeaderName = HeaderName::from_static("cache-tag");
    let mut tags: Vec<String> = Vec::new();
    for (name, split) in [(SURROGATE_KEY, ' '), (CACHE_TAG, ',')] {
        for value in headers.get_all(&name) {
            let Ok(value) = value.to_str() else { continue };
            for tag in value.split(split).map(str::trim).filter(|t| !t.is_empty()) {
                // One tag is kept for the URL itself.
                if tag.len() <= MAX_TAG_LEN
                    && tags.len() < MAX_TAGS - 1
                    && !tags.iter().any(|t| t == tag)
                {
                    tags.push(tag.to_owned());
                }
            }
        }
        if !expose {
            headers.remove(&name);
        }
    }
    tags
}

/// Reduces `Accept-Encoding` to the one coding the cache keys on, as Varnish does: `br`,
/// else `gzip`, else none (identity). The request goes upstream with that value, so every
/// request sharing the entry can decode it.
pub(crate) fn normalize_accept_encoding(headers: &mut HeaderMap) {
    let Some(value) = headers.get(ACCEPT_ENCODING) else {
        return;
    };
    // One pass over the list: the best coding accepted (`br`, else `gzip`).
    let mut br = false;
    let mut gzip = false;
    for item in value.to_str().unwrap_or("").split(',') {
        let mut params = item.split(';');
        let name = params.next().unwrap_or("").trim();
        let refused = params.any(|p| {
            let p = p.trim();
            p.len() >= 2
                && p[..2].eq_ignore_ascii_case("q=")
                && p[2..].trim().parse::<f32>().is_ok_and(|q| q <= 0.0)
        });
        if refused {
            continue;
        }
        if name == "*" || name.eq_ignore_ascii_case("br") {
            br = true;
        } else if name.eq_ignore_ascii_case("gzip") {
            gzip = true;
        }
    }
    let coding = if br {
        "br"
    } else if gzip {
        "gzip"
    } else {
        headers.remove(ACCEPT_ENCODING);
        return;
    };
    // Already in its normal form (a second pass, or a client that sends just that): the
    // value stays as it is.
    if value.as_bytes() != coding.as_bytes() {
        headers.insert(ACCEPT_ENCODING, http::HeaderValue::from_static(coding));
    }
}

/// The client's preconditions and range, taken off a request before it may go upstream
/// on behalf of everyone, and answered from the entry instead (RFC 9110 13, 14).
#[derive(Clone, Debug, Default)]
pub(crate) struct Conditionals {
    pub(crate) if_match: Option<http::HeaderValue>,
    pub(crate) if_none_match: Option<http::HeaderValue>,
    pub(crate) if_modified_since: Option<http::HeaderValue>,
    pub(crate) if_unmodified_since: Option<http::HeaderValue>,
    pub(crate) if_range: Option<http::HeaderValue>,
    pub(crate) range: Option<http::HeaderValue>,
}

impl Conditionals {
    /// No precondition and no range: the stored answer goes out as it is.
    pub(crate) fn is_empty(&self) -> bool {
        self.if_match.is_none()
            && self.if_none_match.is_none()
            && self.if_modified_since.is_none()
            && self.if_unmodified_since.is_none()
            && self.if_range.is_none()
            && self.range.is_none()
    }
}

/// Removes the request's validators (and, when `range` is set, its one byte range) before
/// it may go upstream on behalf of everyone (a 304 or 206 is not a storable answer).
pub(crate) fn strip_conditionals(headers: &mut HeaderMap, range: bool) -> Conditionals {
    const ALL: [HeaderName; 6] = [
        IF_MODIFIED_SINCE,
        IF_MATCH,
        IF_UNMODIFIED_SINCE,
        IF_RANGE,
        IF_NONE_MATCH,
        RANGE,
    ];
    // One pass over the (few) names first: most requests carry none.
    if !headers.keys().any(|n| ALL.contains(n)) {
        return Conditionals::default();
    }
    Conditionals {
        if_match: headers.remove(IF_MATCH),
        if_none_match: headers.remove(IF_NONE_MATCH),
        if_modified_since: headers.remove(IF_MODIFIED_SINCE),
        if_unmodified_since: headers.remove(IF_UNMODIFIED_SINCE),
        if_range: headers.remove(IF_RANGE),
        range: if range { headers.remove(RANGE) } else { None },
    }
}

/// Whether an `If-Match` value matches the stored `ETag` (strong comparison).
pub(crate) fn etag_matches_strong(if_match: &http::HeaderValue, stored: &HeaderMap) -> bool {
    let Ok(wanted) = if_match.to_str() else {
        return false;
    };
    let etag = stored
        .get(ETAG)
        .and_then(|e| e.to_str().ok())
        .map(str::trim);
    wanted.split(',').map(str::trim).any(|t| {
        t == "*" || etag.is_some_and(|e| !e.starts_with("W/") && !t.starts_with("W/") && t == e)
    })
}

/// Whether an `If-None-Match` value matches the stored `ETag` (weak comparison).
pub(crate) fn etag_matches(if_none_match: &http::HeaderValue, stored: &HeaderMap) -> bool {
    let Some(etag) = stored.get(ETAG).and_then(|e| e.to_str().ok()) else {
        return false;
    };
    let Ok(wanted) = if_none_match.to_str() else {
        return false;
    };
    let opaque = |t: &str| t.trim().trim_start_matches("W/").to_owned();
    wanted
        .split(',')
        .any(|t| t.trim() == "*" || opaque(t) == opaque(etag))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    impl HttpRules {
        fn check(
            &self,
            status: StatusCode,
            headers: &HeaderMap,
            per_user: bool,
        ) -> Result<Freshness, Reason> {
            self.check_response(status, headers, per_user, Timing::now())
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn response_rules() {
        let mut rules = HttpRules::default();
        let ok = StatusCode::OK;
        let ttl = |r: Result<Freshness, Reason>| r.map(|f| f.ttl);
        assert_eq!(
            ttl(rules.check(ok, &headers(&[]), false)),
            Ok(Duration::from_secs(60))
        );
        assert_eq!(
            ttl(rules.check(StatusCode::INTERNAL_SERVER_ERROR, &headers(&[]), false)),
            Ok(Duration::from_secs(1))
        );
        assert_eq!(
            rules.check(StatusCode::FORBIDDEN, &headers(&[]), false),
            Err("status")
        );
        assert_eq!(
            rules.check(
                ok,
                &headers(&[("cache-control", "public, no-store")]),
                false
            ),
            Err("no-store")
        );
        assert_eq!(
            rules.check(ok, &headers(&[("cache-control", "private")]), false),
            Err("no-store")
        );
        assert_eq!(
            rules.check(ok, &headers(&[("set-cookie", "a=b")]), false),
            Err("set-cookie")
        );
        assert_eq!(
            rules.check(ok, &headers(&[("vary", "*")]), false),
            Err("vary-star")
        );
        assert_eq!(
            rules.check(ok, &headers(&[("vary", "accept-language")]), false),
            Err("vary")
        );
        rules.vary.push(HeaderName::from_static("accept-language"));
        assert!(rules
            .check(ok, &headers(&[("vary", "Accept-Language")]), false)
            .is_ok());

        let cc = headers(&[("cache-control", "max-age=10, s-maxage=\"20\"")]);
        assert_eq!(
            ttl(rules.check(ok, &cc, false)),
            Ok(Duration::from_secs(60))
        );
        rules.honor_cache_control = true;
        assert_eq!(
            ttl(rules.check(ok, &cc, false)),
            Ok(Duration::from_secs(20))
        );
        assert_eq!(
            ttl(rules.check(ok, &headers(&[("cache-control", "max-age=7")]), false)),
            Ok(Duration::from_secs(7))
        );
        assert_eq!(
            rules.check(ok, &headers(&[("cache-control", "max-age=0")]), false),
            Err("max-age")
        );
        let windows = headers(&[(
            "cache-control",
            "max-age=5, stale-while-revalidate=30, stale-if-error=600",
        )]);
        assert_eq!(
            rules
                .check(ok, &windows, false)
                .map(|f| (f.ttl, f.grace, f.stale_if_error)),
            Ok((
                Duration::from_secs(5),
                Duration::from_secs(30),
                Duration::from_secs(600)
            ))
        );

        // The fixed mode from here on (the standards mode: `standards_rules`).
        rules.honor_cache_control = false;
        assert_eq!(
            rules.check(StatusCode::NOT_FOUND, &headers(&[]), false),
            Err("status")
        );
        rules.negative_ttl = Duration::from_secs(3);
        assert_eq!(
            ttl(rules.check(StatusCode::NOT_FOUND, &headers(&[]), false)),
            Ok(Duration::from_secs(3))
        );
        assert_eq!(
            ttl(rules.check(StatusCode::GONE, &cc, false)),
            Ok(Duration::from_secs(3))
        );
        assert_eq!(
            ttl(rules.check(StatusCode::BAD_GATEWAY, &headers(&[]), false)),
            Ok(Duration::from_secs(1))
        );
        assert_eq!(
            ttl(rules.check(StatusCode::TOO_MANY_REQUESTS, &headers(&[]), false)),
            Ok(Duration::from_secs(1))
        );
        rules.error_ttl = Duration::ZERO;
        assert_eq!(
            rules.check(StatusCode::BAD_GATEWAY, &headers(&[]), false),
            Err("status")
        );

        let vary_auth = headers(&[("vary", "Authorization, Cookie")]);
        assert_eq!(rules.check(ok, &vary_auth, false), Err("vary"));
        assert!(
            rules.check(ok, &vary_auth, true).is_ok(),
            "per-user keys hold the credentials"
        );

        rules.honor_no_store = false;
        rules.store_set_cookie = true;
        assert!(rules
            .check(
                ok,
                &headers(&[("cache-control", "no-store"), ("set-cookie", "a=b")]),
                false
            )
            .is_ok());
    }

    #[test]
    fn standards_rules() {
        let rules = HttpRules {
            honor_cache_control: true,
            ttl: Duration::ZERO,
            error_ttl: Duration::ZERO,
            ..HttpRules::default()
        };
        let ok = StatusCode::OK;
        let check = |status, pairs: &[(&'static str, &'static str)]| {
            rules.check(status, &headers(pairs), false)
        };
        let ttl = |r: Result<Freshness, Reason>| r.map(|f| f.ttl.as_secs());
        // No explicit freshness and no default TTL: not stored.
        assert_eq!(check(ok, &[]), Err("max-age"));
        assert_eq!(ttl(check(ok, &[("cache-control", "max-age=30")])), Ok(30));
        assert_eq!(
            ttl(check(ok, &[("cache-control", "max-age=30, s-maxage=90")])),
            Ok(90)
        );
        assert_eq!(
            ttl(check(ok, &[("cache-control", "max-age=\"40\"")])),
            Ok(40)
        );
        // Negative, invalid and zero: stale at once, so unstored without a validator...
        for cc in [
            "max-age=-1",
            "max-age=abc",
            "max-age=0",
            "max-age=5, max-age=6",
        ] {
            assert_eq!(check(ok, &[("cache-control", cc)]), Err("max-age"), "{cc}");
        }
        // ...and kept to be revalidated with one, served stale never.
        let kept = check(ok, &[("cache-control", "max-age=0"), ("etag", "\"a\"")]).unwrap();
        assert_eq!(kept.ttl, Duration::ZERO);
        assert_eq!(kept.stale_if_error, rules.revalidate_window);
        assert_eq!(kept.stale_ok, Duration::ZERO);
        // Expires - Date; past and invalid Expires are stale.
        let date = "Tue, 01 Jan 2030 00:00:00 GMT";
        assert_eq!(
            ttl(check(
                ok,
                &[("date", date), ("expires", "Tue, 01 Jan 2030 00:01:40 GMT")]
            )),
            Ok(100 - (rfc::initial_age_ms(&headers(&[("date", date)]), Timing::now()) / 1000))
        );
        assert_eq!(
            check(ok, &[("expires", "Thu, 01 Jan 1970 00:00:00 GMT")]),
            Err("max-age")
        );
        assert_eq!(check(ok, &[("expires", "0")]), Err("max-age"));
        // Age over max-age: stale on arrival.
        assert_eq!(
            check(ok, &[("cache-control", "max-age=10"), ("age", "20")]),
            Err("max-age")
        );
        let aged = check(ok, &[("cache-control", "max-age=100"), ("age", "30, 50")]).unwrap();
        assert_eq!((aged.ttl.as_secs(), aged.initial_age), (70, 30));
        // no-cache: stored only with a validator, revalidated before every reuse.
        assert_eq!(check(ok, &[("cache-control", "no-cache")]), Err("no-cache"));
        let nc = check(
            ok,
            &[("cache-control", "no-cache, max-age=60"), ("etag", "\"a\"")],
        )
        .unwrap();
        assert_eq!((nc.ttl, nc.stale_ok), (Duration::ZERO, Duration::ZERO));
        // must-revalidate, proxy-revalidate and s-maxage are never served stale.
        for cc in [
            "max-age=5, must-revalidate",
            "max-age=5, proxy-revalidate",
            "s-maxage=5",
        ] {
            let f = check(
                ok,
                &[(
                    "cache-control",
                    &*format!("{cc}, stale-while-revalidate=9, stale-if-error=9").leak(),
                )],
            )
            .unwrap();
            assert_eq!(
                (f.grace, f.stale_ok),
                (Duration::ZERO, Duration::ZERO),
                "{cc}"
            );
        }
        // Heuristically cacheable statuses, errors with explicit freshness only.
        assert_eq!(check(StatusCode::NOT_FOUND, &[]), Err("max-age"));
        assert_eq!(
            ttl(check(
                StatusCode::NOT_FOUND,
                &[("cache-control", "max-age=5")]
            )),
            Ok(5)
        );
        assert_eq!(check(StatusCode::FOUND, &[]), Err("status"));
        assert_eq!(
            ttl(check(StatusCode::FOUND, &[("cache-control", "max-age=5")])),
            Ok(5)
        );
        assert_eq!(check(StatusCode::BAD_GATEWAY, &[]), Err("status"));
        assert_eq!(
            ttl(check(
                StatusCode::BAD_GATEWAY,
                &[("cache-control", "max-age=5")]
            )),
            Ok(5)
        );
        assert_eq!(
            check(
                StatusCode::PARTIAL_CONTENT,
                &[("cache-control", "max-age=5")]
            ),
            Err("status")
        );
        // 1xx are never stored, whatever they say.
        for informational in [StatusCode::CONTINUE, StatusCode::from_u16(103).unwrap()] {
            assert_eq!(
                check(informational, &[("cache-control", "max-age=5")]),
                Err("status")
            );
        }
        // Targeted fields outrank Cache-Control and Expires.
        assert_eq!(
            ttl(check(
                ok,
                &[
                    ("cache-control", "no-store"),
                    ("cdn-cache-control", "max-age=9")
                ]
            )),
            Ok(9)
        );
        assert_eq!(
            ttl(check(
                ok,
                &[
                    ("cdn-cache-control", "max-age=9"),
                    ("tower-stampede-cache-control", "max-age=3")
                ]
            )),
            Ok(3)
        );
        // Vary: the unkeyed names, sorted; `*` never.
        let v = check(
            ok,
            &[
                ("cache-control", "max-age=5"),
                ("vary", "X-B, accept-encoding"),
                ("vary", "x-a"),
            ],
        )
        .unwrap();
        assert_eq!(
            v.vary,
            vec![
                HeaderName::from_static("x-a"),
                HeaderName::from_static("x-b")
            ]
        );
        assert_eq!(
            check(ok, &[("cache-control", "max-age=5"), ("vary", "*")]),
            Err("vary-star")
        );
        // The heuristic: a tenth of the time since Last-Modified, capped.
        let heuristic = HttpRules {
            heuristic: Some(Duration::from_secs(3600)),
            ..rules.clone()
        };
        let lm = [
            ("date", date),
            ("last-modified", "Mon, 31 Dec 2029 23:50:00 GMT"),
        ];
        assert_eq!(
            heuristic
                .check(ok, &headers(&lm), false)
                .map(|f| f.ttl.as_secs() <= 60),
            Ok(true)
        );
        let old = [
            ("date", date),
            ("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT"),
        ];
        assert!(
            heuristic.check(ok, &headers(&old), false).unwrap().ttl <= Duration::from_secs(3600)
        );
    }

    #[test]
    fn byte_ranges() {
        let r = |v: &'static str| ByteRange::parse(&HeaderValue::from_static(v));
        assert_eq!(r("bytes=0-4").and_then(|r| r.span(10)), Some((0, 4)));
        assert_eq!(r("bytes=5-").and_then(|r| r.span(10)), Some((5, 9)));
        assert_eq!(r("bytes=-3").and_then(|r| r.span(10)), Some((7, 9)));
        assert_eq!(r("bytes=8-100").and_then(|r| r.span(10)), Some((8, 9)));
        assert_eq!(r("bytes=10-").map(|r| r.span(10)), Some(None));
        assert_eq!(r("bytes=0-1,3-4"), None);
        assert_eq!(r("items=0-1"), None);
        assert_eq!(r("bytes=4-2"), None);
    }

    #[test]
    fn answers_with_more_headers_than_an_envelope_holds_are_not_stored() {
        let rules = HttpRules::default();
        let mut h = HeaderMap::new();
        for i in 0..crate::http::stored::MAX_HEADERS {
            h.append(
                HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(),
                HeaderValue::from_static("v"),
            );
        }
        assert!(rules.check(StatusCode::OK, &h, false).is_ok());
        h.append("x-one-more", HeaderValue::from_static("v"));
        assert_eq!(rules.check(StatusCode::OK, &h, false), Err("headers"));
        let mut big = HeaderMap::new();
        let value = HeaderValue::from_bytes(&vec![b'v'; 40 * 1024]).unwrap();
        big.insert("x-a", value.clone());
        big.insert("x-b", value);
        assert_eq!(rules.check(StatusCode::OK, &big, false), Err("headers"));
    }

    #[test]
    fn conditionals_are_stripped_and_answered_from_the_etag() {
        let mut h = headers(&[
            ("if-none-match", "W/\"v1\", \"v2\""),
            ("if-modified-since", "Tue, 01 Jan 2030 00:00:00 GMT"),
            ("accept", "*/*"),
        ]);
        let inm = strip_conditionals(&mut h, false).if_none_match.unwrap();
        assert!(!h.contains_key("if-modified-since") && !h.contains_key("if-none-match"));
        assert!(h.contains_key("accept"));
        assert!(etag_matches(&inm, &headers(&[("etag", "\"v1\"")])));
        assert!(etag_matches(&inm, &headers(&[("etag", "W/\"v2\"")])));
        assert!(!etag_matches(&inm, &headers(&[("etag", "\"v3\"")])));
        assert!(!etag_matches(&inm, &headers(&[])));
        assert!(etag_matches(
            &HeaderValue::from_static("*"),
            &headers(&[("etag", "\"x\"")])
        ));
    }

    #[test]
    fn accept_encoding_is_normalized() {
        let norm = |v: &'static str| {
            let mut h = headers(&[("accept-encoding", v)]);
            normalize_accept_encoding(&mut h);
            h.get("accept-encoding")
                .map(|v| v.to_str().unwrap().to_owned())
        };
        assert_eq!(norm("gzip, deflate, br").as_deref(), Some("br"));
        assert_eq!(norm("gzip, deflate").as_deref(), Some("gzip"));
        assert_eq!(norm("br;q=0, gzip;q=0.5").as_deref(), Some("gzip"));
        assert_eq!(norm("GZIP").as_deref(), Some("gzip"));
        assert_eq!(norm("identity"), None);
        assert_eq!(norm("deflate, br;q=0.0"), None);
        let mut none = headers(&[]);
        normalize_accept_encoding(&mut none);
        assert!(none.is_empty());
        let rules = HttpRules::default();
        assert!(rules
            .check(
                StatusCode::OK,
                &headers(&[("vary", "Accept-Encoding")]),
                false
            )
            .is_ok());
    }

    #[test]
    fn request_rules() {
        let mut rules = HttpRules::default();
        assert_eq!(rules.check_request(&Method::GET, &headers(&[])), Ok(false));
        assert_eq!(
            rules.check_request(&Method::POST, &headers(&[])),
            Err(Outcome::Method)
        );
        assert_eq!(
            rules.check_request(&Method::GET, &headers(&[("range", "bytes=0-1")])),
            Err(Outcome::Bypass("range"))
        );
        let auth = headers(&[("authorization", "Bearer x")]);
        assert_eq!(
            rules.check_request(&Method::GET, &auth),
            Err(Outcome::Bypass("private"))
        );
        rules.private_requests = PrivateRequests::PerUser;
        assert_eq!(rules.check_request(&Method::GET, &auth), Ok(true));
        rules.private_requests = PrivateRequests::Shared;
        assert_eq!(
            rules.check_request(&Method::GET, &headers(&[("cookie", "s=1")])),
            Ok(false)
        );
    }

    #[test]
    fn a_request_with_a_body_bypasses() {
        let rules = HttpRules::default();
        let body = Err(Outcome::Bypass("request-body"));
        for (method, pairs) in [
            (Method::GET, &[("content-length", "5")][..]),
            (Method::HEAD, &[("content-length", "1")]),
            (Method::GET, &[("transfer-encoding", "chunked")]),
            (Method::GET, &[("transfer-encoding", "identity")]),
            (
                Method::GET,
                &[("content-length", "0"), ("content-length", "7")],
            ),
            (Method::GET, &[("content-length", "+0x")]),
            (Method::GET, &[("content-length", "")]),
            (
                Method::GET,
                &[("content-length", "0"), ("transfer-encoding", "chunked")],
            ),
        ] {
            assert_eq!(
                rules.check_request(&method, &headers(pairs)),
                body,
                "{pairs:?}"
            );
        }
        let mut odd = headers(&[]);
        odd.insert("content-length", HeaderValue::from_bytes(b"\xff").unwrap());
        assert_eq!(rules.check_request(&Method::GET, &odd), body);
        // An empty body is no body.
        assert_eq!(
            rules.check_request(&Method::GET, &headers(&[("content-length", "0")])),
            Ok(false)
        );
        assert_eq!(
            rules.check_request(&Method::GET, &headers(&[("content-length", " 0 ")])),
            Ok(false)
        );
        // Methods that are not cached keep their own outcome.
        assert_eq!(
            rules.check_request(&Method::POST, &headers(&[("content-length", "5")])),
            Err(Outcome::Method)
        );
    }
}
