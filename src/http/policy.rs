//! The HTTP rules: which requests may share a cached answer, and which answers are stored.

use std::time::Duration;

use http::header::{
    ACCEPT_ENCODING, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, COOKIE, ETAG, IF_MATCH,
    IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, IF_UNMODIFIED_SINCE, RANGE, SET_COOKIE,
    TRANSFER_ENCODING, VARY,
};
use http::{HeaderMap, HeaderName, Method, StatusCode};

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
}

/// How long an answer is fresh, then servable while one refresh runs, then servable when
/// the upstream fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Freshness {
    pub(crate) ttl: Duration,
    pub(crate) grace: Duration,
    pub(crate) stale_if_error: Duration,
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
        }
    }
}

/// Iterates the directives of every `Cache-Control` header: `(name, value)`.
fn directives(headers: &HeaderMap) -> impl Iterator<Item = (String, Option<String>)> + '_ {
    headers
        .get_all(CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|d| {
            let d = d.trim();
            if d.is_empty() {
                return None;
            }
            Some(match d.split_once('=') {
                Some((n, v)) => (
                    n.trim().to_ascii_lowercase(),
                    Some(v.trim().trim_matches('"').to_owned()),
                ),
                None => (d.to_ascii_lowercase(), None),
            })
        })
}

impl HttpRules {
    /// `Ok(per_user)` when the request may use the cache.
    pub(crate) fn check_request(
        &self,
        method: &Method,
        headers: &HeaderMap,
    ) -> Result<bool, Outcome> {
        if !self.methods.contains(method) {
            return Err(Outcome::Method);
        }
        // The key holds no body: a request with one must neither fill an entry others are
        // served from nor share another request's answer.
        if has_body(headers) {
            return Err(Outcome::Bypass("request-body"));
        }
        // A partial answer is not the resource: never stored, and no marker either.
        if headers.contains_key(RANGE) {
            return Err(Outcome::Bypass("range"));
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

    /// How long an answer may be used, or why it is not stored. `per_user` answers may
    /// vary on the credentials, which their key already holds.
    pub(crate) fn check_response(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        per_user: bool,
    ) -> Result<Freshness, Reason> {
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
        for value in headers.get_all(VARY) {
            let Ok(value) = value.to_str() else {
                return Err("vary");
            };
            for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                if name == "*" {
                    return Err("vary-star");
                }
                let keyed = self
                    .vary
                    .iter()
                    .any(|v| v.as_str().eq_ignore_ascii_case(name))
                    || name.eq_ignore_ascii_case(ACCEPT_ENCODING.as_str())
                    || (per_user
                        && (name.eq_ignore_ascii_case(AUTHORIZATION.as_str())
                            || name.eq_ignore_ascii_case(COOKIE.as_str())));
                if !keyed {
                    return Err("vary");
                }
            }
        }
        if !self.store_set_cookie && headers.contains_key(SET_COOKIE) {
            return Err("set-cookie");
        }
        let (mut max_age, mut s_maxage, mut swr, mut sie) = (None, None, None, None);
        for (name, value) in directives(headers) {
            let secs = || {
                value
                    .as_deref()
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(Duration::from_secs)
            };
            match name.as_str() {
                "no-store" | "private" | "no-cache" if self.honor_no_store => {
                    return Err("no-store")
                }
                "max-age" => max_age = secs(),
                "s-maxage" => s_maxage = secs(),
                "stale-while-revalidate" => swr = secs(),
                "stale-if-error" => sie = secs(),
                _ => {}
            }
        }
        let mut fresh = Freshness {
            ttl: self.ttl,
            grace: self.grace,
            stale_if_error: self.stale_if_error,
        };
        if let Some(ttl) = short {
            fresh = Freshness {
                ttl,
                grace: Duration::ZERO,
                stale_if_error: Duration::ZERO,
            };
        } else if self.honor_cache_control {
            fresh.ttl = s_maxage.or(max_age).unwrap_or(self.ttl);
            fresh.grace = swr.unwrap_or(self.grace);
            fresh.stale_if_error = sie.unwrap_or(self.stale_if_error);
        }
        if fresh.ttl.is_zero() {
            return Err("max-age");
        }
        Ok(fresh)
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
    let value = value.to_str().unwrap_or("");
    let accepts = |coding: &str| {
        value.split(',').any(|item| {
            let mut params = item.split(';');
            let name = params.next().unwrap_or("").trim();
            let refused = params.any(|p| {
                let p = p.trim();
                p.len() >= 2
                    && p[..2].eq_ignore_ascii_case("q=")
                    && p[2..].trim().parse::<f32>().is_ok_and(|q| q <= 0.0)
            });
            (name.eq_ignore_ascii_case(coding) || name == "*") && !refused
        })
    };
    if accepts("br") {
        headers.insert(ACCEPT_ENCODING, http::HeaderValue::from_static("br"));
    } else if accepts("gzip") {
        headers.insert(ACCEPT_ENCODING, http::HeaderValue::from_static("gzip"));
    } else {
        headers.remove(ACCEPT_ENCODING);
    }
}

/// Removes the request's validators before it may go upstream on behalf of everyone (a
/// 304 is not a storable answer); returns its `If-None-Match`, answered from the entry.
pub(crate) fn strip_conditionals(headers: &mut HeaderMap) -> Option<http::HeaderValue> {
    const VALIDATORS: [HeaderName; 4] =
        [IF_MODIFIED_SINCE, IF_MATCH, IF_UNMODIFIED_SINCE, IF_RANGE];
    // One pass over the (few) names first: most requests carry none.
    if !headers
        .keys()
        .any(|n| *n == IF_NONE_MATCH || VALIDATORS.contains(n))
    {
        return None;
    }
    for name in VALIDATORS {
        headers.remove(name);
    }
    headers.remove(IF_NONE_MATCH)
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
            ttl(rules.check_response(ok, &headers(&[]), false)),
            Ok(Duration::from_secs(60))
        );
        assert_eq!(
            ttl(rules.check_response(StatusCode::INTERNAL_SERVER_ERROR, &headers(&[]), false)),
            Ok(Duration::from_secs(1))
        );
        assert_eq!(
            rules.check_response(StatusCode::FORBIDDEN, &headers(&[]), false),
            Err("status")
        );
        assert_eq!(
            rules.check_response(
                ok,
                &headers(&[("cache-control", "public, no-store")]),
                false
            ),
            Err("no-store")
        );
        assert_eq!(
            rules.check_response(ok, &headers(&[("cache-control", "private")]), false),
            Err("no-store")
        );
        assert_eq!(
            rules.check_response(ok, &headers(&[("set-cookie", "a=b")]), false),
            Err("set-cookie")
        );
        assert_eq!(
            rules.check_response(ok, &headers(&[("vary", "*")]), false),
            Err("vary-star")
        );
        assert_eq!(
            rules.check_response(ok, &headers(&[("vary", "accept-language")]), false),
            Err("vary")
        );
        rules.vary.push(HeaderName::from_static("accept-language"));
        assert!(rules
            .check_response(ok, &headers(&[("vary", "Accept-Language")]), false)
            .is_ok());

        let cc = headers(&[("cache-control", "max-age=10, s-maxage=\"20\"")]);
        assert_eq!(
            ttl(rules.check_response(ok, &cc, false)),
            Ok(Duration::from_secs(60))
        );
        rules.honor_cache_control = true;
        assert_eq!(
            ttl(rules.check_response(ok, &cc, false)),
            Ok(Duration::from_secs(20))
        );
        assert_eq!(
            ttl(rules.check_response(ok, &headers(&[("cache-control", "max-age=7")]), false)),
            Ok(Duration::from_secs(7))
        );
        assert_eq!(
            rules.check_response(ok, &headers(&[("cache-control", "max-age=0")]), false),
            Err("max-age")
        );
        let windows = headers(&[(
            "cache-control",
            "max-age=5, stale-while-revalidate=30, stale-if-error=600",
        )]);
        assert_eq!(
            rules.check_response(ok, &windows, false),
            Ok(Freshness {
                ttl: Duration::from_secs(5),
                grace: Duration::from_secs(30),
                stale_if_error: Duration::from_secs(600)
            })
        );

        assert_eq!(
            rules.check_response(StatusCode::NOT_FOUND, &headers(&[]), false),
            Err("status")
        );
        rules.negative_ttl = Duration::from_secs(3);
        assert_eq!(
            ttl(rules.check_response(StatusCode::NOT_FOUND, &headers(&[]), false)),
            Ok(Duration::from_secs(3))
        );
        assert_eq!(
            ttl(rules.check_response(StatusCode::GONE, &cc, false)),
            Ok(Duration::from_secs(3))
        );
        assert_eq!(
            ttl(rules.check_response(StatusCode::BAD_GATEWAY, &headers(&[]), false)),
            Ok(Duration::from_secs(1))
        );
        assert_eq!(
            ttl(rules.check_response(StatusCode::TOO_MANY_REQUESTS, &headers(&[]), false)),
            Ok(Duration::from_secs(1))
        );
        rules.error_ttl = Duration::ZERO;
        assert_eq!(
            rules.check_response(StatusCode::BAD_GATEWAY, &headers(&[]), false),
            Err("status")
        );

        let vary_auth = headers(&[("vary", "Authorization, Cookie")]);
        assert_eq!(rules.check_response(ok, &vary_auth, false), Err("vary"));
        assert!(
            rules.check_response(ok, &vary_auth, true).is_ok(),
            "per-user keys hold the credentials"
        );

        rules.honor_no_store = false;
        rules.store_set_cookie = true;
        assert!(rules
            .check_response(
                ok,
                &headers(&[("cache-control", "no-store"), ("set-cookie", "a=b")]),
                false
            )
            .is_ok());
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
        assert!(rules.check_response(StatusCode::OK, &h, false).is_ok());
        h.append("x-one-more", HeaderValue::from_static("v"));
        assert_eq!(
            rules.check_response(StatusCode::OK, &h, false),
            Err("headers")
        );
        let mut big = HeaderMap::new();
        let value = HeaderValue::from_bytes(&vec![b'v'; 40 * 1024]).unwrap();
        big.insert("x-a", value.clone());
        big.insert("x-b", value);
        assert_eq!(
            rules.check_response(StatusCode::OK, &big, false),
            Err("headers")
        );
    }

    #[test]
    fn conditionals_are_stripped_and_answered_from_the_etag() {
        let mut h = headers(&[
            ("if-none-match", "W/\"v1\", \"v2\""),
            ("if-modified-since", "Tue, 01 Jan 2030 00:00:00 GMT"),
            ("accept", "*/*"),
        ]);
        let inm = strip_conditionals(&mut h).unwrap();
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
            .check_response(
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
