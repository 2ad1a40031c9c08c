#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cache;
mod http;
#[cfg(feature = "redis")]
pub mod lock;
mod stats;
mod tier;

pub use cache::{Cache, CacheBuilder, EntryOptions, Error, FailurePolicy, Memory};
pub use http::{
    default_key, BoxError, PrivateRequests, ResponseFuture, Stampede, StampedeBody,
    StampedeBuilder, StampedeLayer,
};
pub use stats::Stats;
#[cfg(feature = "tls")]
pub use tier::TlsOptions;
pub use tier::{Backend, BackendError, BackendHealth, RedisProblem, RedisState};

/// Internals for the benchmarks in `benches/` (feature `__bench`); not part of the API.
#[cfg(feature = "__bench")]
#[doc(hidden)]
pub mod __bench {
    use bytes::Bytes;

    use crate::cache::entry::{self, Meta, Windows};
    use crate::cache::Codec;
    use crate::http::stored::{HttpCodec, Response};

    /// A stored response of `body_len` bytes with a few typical headers.
    pub struct Envelope {
        key: String,
        meta: Meta,
        response: Response,
    }

    impl Envelope {
        /// Builds the sample.
        pub fn sample(key: &str, body_len: usize) -> Envelope {
            let mut headers = ::http::HeaderMap::new();
            headers.insert(
                "content-type",
                ::http::HeaderValue::from_static("application/json"),
            );
            headers.insert(
                "etag",
                ::http::HeaderValue::from_static("\"5d8c72a5edda8d6a\""),
            );
            headers.insert(
                "cache-control",
                ::http::HeaderValue::from_static("public, max-age=60"),
            );
            let windows = Windows {
                ttl: std::time::Duration::from_secs(60),
                grace: std::time::Duration::ZERO,
                stale_if_error: std::time::Duration::ZERO,
            };
            Envelope {
                key: key.to_owned(),
                meta: Meta::value(1, windows, 5, Vec::new()),
                response: Response {
                    status: ::http::StatusCode::OK,
                    headers,
                    body: Bytes::from(vec![b'x'; body_len]),
                    ext: Default::default(),
                },
            }
        }

        /// Encodes it.
        pub fn encode(&self) -> Vec<u8> {
            let payload = HttpCodec::encode(&self.response).unwrap_or_default();
            entry::encode(&self.key, &self.meta, &payload)
        }

        /// Decodes `bytes` for `key`; true when valid.
        pub fn decode(bytes: Bytes, key: &str) -> bool {
            entry::decode(&bytes, key)
                .ok()
                .and_then(|(_, payload)| HttpCodec::decode(&payload).ok())
                .is_some()
        }
    }

    /// The default key of a request, hashed as the layer does.
    pub fn key_hash(parts: &::http::request::Parts) -> [u8; 32] {
        let canonical = crate::http::key::request_key(
            crate::http::key::default_key(parts),
            parts,
            &[],
            false,
            true,
        );
        crate::cache::flight::Key::new(canonical).hash.0
    }
}
