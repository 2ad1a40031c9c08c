//! The state of one HTTP node, shared by its layer and every service built from it: the
//! flight core, the HTTP rules and the key function.

use std::sync::Arc;

use http::request::Parts;

use super::key::{default_key, request_key, KeyFn};
use super::policy::{normalize_accept_encoding, HttpRules};
use super::status::{Outcome, StatusValues};
use super::stored::{self, HttpCodec};
use crate::cache::flight::{Core, Key};

/// The flight core of the HTTP layer: stored answers, in their codec.
pub(crate) type HttpCore = Core<stored::Response, HttpCodec>;

/// The variant keys stored per URL on this node: primary key hash to variant key hashes.
pub(crate) type Variants = moka::future::Cache<[u8; 32], Arc<std::sync::Mutex<Vec<[u8; 32]>>>>;

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
    pub(crate) fn key_for(&self, parts: &mut Parts) -> Result<(Key, bool), Outcome> {
        let per_user = self.rules.check_request(&parts.method, &parts.headers)?;
        if self.rules.key_accept_encoding {
            normalize_accept_encoding(&mut parts.headers);
        }
        if parts.method == http::Method::HEAD && self.rules.methods.contains(&http::Method::GET) {
            parts.method = http::Method::GET;
            let key = self.key_for_checked(parts, per_user);
            parts.method = http::Method::HEAD;
            return key.map(|k| (k, per_user));
        }
        self.key_for_checked(parts, per_user).map(|k| (k, per_user))
    }

    fn key_for_checked(&self, parts: &Parts, per_user: bool) -> Result<Key, Outcome> {
        let base = match &self.key_fn {
            Some(f) => f(parts).ok_or(Outcome::Bypass("key"))?,
            None => default_key(parts),
        };
        Ok(Key::new(request_key(
            base,
            parts,
            &self.rules.vary,
            per_user,
            self.rules.key_accept_encoding,
        )))
    }
}
