//! The state of one HTTP node, shared by its layer and every service built from it: the
//! flight core, the HTTP rules and the key function.

use std::sync::Arc;

use http::request::Parts;

use super::key::{default_key, request_key, KeyFn};
use super::policy::{normalize_accept_encoding, HttpRules};
use super::status::{Outcome, StatusValues};
use super::stored::{self, HttpCodec};
use crate::cache::flight::{Core, Key};
use crate::cache::weight;

/// The flight core of the HTTP layer: stored answers, in their codec.
pub(crate) type HttpCore = Core<stored::Response, HttpCodec>;

/// The variant keys stored per URL on this node: primary key hash to variant key hashes.
pub(crate) type Variants = moka::future::Cache<[u8; 32], Arc<std::sync::Mutex<Vec<[u8; 32]>>>>;

/// What one URL's variant list weighs at most, with `max` variants: a marker's node and
/// key, the `Arc` and its `Mutex`, and the list grown (by doubling, from 4) to hold `max`.
pub(crate) fn variant_list_weight(max: usize) -> u32 {
    let arc =
        2 * std::mem::size_of::<usize>() + std::mem::size_of::<std::sync::Mutex<Vec<[u8; 32]>>>();
    let list = max.max(4).checked_next_power_of_two().unwrap_or(usize::MAX);
    (weight::MARKER + weight::heap(arc) + weight::heap(list.saturating_mul(32)))
        .min(u32::MAX as usize) as u32
}

/// State shared by every clone of one layer and the services it built: one "node".
pub(crate) struct Shared {
    pub(crate) core: Arc<HttpCore>,
    pub(crate) status_values: StatusValues,
    pub(crate) rules: HttpRules,
    pub(crate) key_fn: Option<KeyFn>,
    /// The variants this node stored per URL (primary key hash), for `max_variants`.
    pub(crate) variants: Variants,
}

impl Shared {
    /// The key of a request, or why it bypasses the cache, and whether it is per user.
    ///
    /// A `HEAD` is keyed (and filled) as the `GET` it describes, as Varnish does: one entry
    /// answers both.
    pub(crate) fn key_for(&self, parts: &mut Parts) -> Result<RequestKey, Outcome> {
        let per_user = self.rules.check_request(&parts.method, &parts.headers)?;
        if self.rules.key_accept_encoding {
            normalize_accept_encoding(&mut parts.headers);
        }
        if parts.method == http::Method::HEAD && self.rules.methods.contains(&http::Method::GET) {
            parts.method = http::Method::GET;
            let key = self.key_for_checked(parts, per_user);
            parts.method = http::Method::HEAD;
            return key;
        }
        self.key_for_checked(parts, per_user)
    }

    fn key_for_checked(&self, parts: &Parts, per_user: bool) -> Result<RequestKey, Outcome> {
        let base = self.base_key(parts).ok_or(Outcome::Bypass("key"))?;
        Ok(RequestKey {
            key: Key::new(request_key(
                base,
                parts,
                &self.rules.vary,
                per_user,
                self.rules.key_accept_encoding,
            )),
            per_user,
        })
    }

    /// Purges every stored answer of `uri` (all its variants), fleet-wide. `host` is the
    /// `Host` a request for it would carry, for a relative `uri` and the default key.
    pub(crate) async fn purge(
        &self,
        uri: &http::Uri,
        host: Option<http::HeaderValue>,
    ) -> Result<u64, crate::tier::BackendError> {
        let mut req = http::Request::get(uri.clone());
        if let Some(host) = host {
            req = req.header(http::header::HOST, host);
        }
        let Ok(req) = req.body(()) else { return Ok(0) };
        let (parts, ()) = req.into_parts();
        let Some(base) = self.base_key(&parts) else {
            return Ok(0);
        };
        self.core.purge_tag(&url_tag(&base)).await
    }

    /// The key function's (or the default) key of a request, before varied headers and
    /// credentials are added.
    pub(crate) fn base_key(&self, parts: &Parts) -> Option<String> {
        match &self.key_fn {
            Some(f) => f(parts),
            None => Some(default_key(parts)),
        }
    }
}

/// A request's key, with what else the flight needs to know of it.
pub(crate) struct RequestKey {
    pub(crate) key: Key,
    /// Cached per user: the credentials are part of the key.
    pub(crate) per_user: bool,
}

/// The tag of every entry of one URL: the hash of its base key, short enough for the
/// envelope's tag bound whatever the URL's length.
pub(crate) fn url_tag(base: &str) -> String {
    use sha2::{Digest, Sha256};
    let hash = Sha256::digest(base.as_bytes());
    format!("url:{}", crate::tier::hex(&hash[..16]))
}
