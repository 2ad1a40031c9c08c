#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod body;
mod bounds;
mod conn;
mod envelope;
mod fill;
mod future;
mod health;
mod key;
mod layer;
pub mod lock;
mod policy;
mod scripts;
mod service;
mod stats;
mod status;
mod store;
mod wake;

pub use body::StampedeBody;
pub use conn::BackendError;
pub use future::ResponseFuture;
pub use health::{BackendHealth, RedisProblem, RedisState};
pub use key::default_key;
pub use layer::{Backend, Memory, StampedeBuilder, StampedeLayer};
pub use policy::{FailurePolicy, PrivateRequests};
pub use service::Stampede;
pub use stats::Stats;

/// The boxed error of response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Internals for the benchmarks in `benches/`; not part of the API.
#[doc(hidden)]
pub mod __bench {
    use bytes::Bytes;

    use crate::envelope::{Entry, Kind};

    /// A stored response of `body_len` bytes with a few typical headers.
    pub struct Envelope(Entry);

    impl Envelope {
        /// Builds the sample.
        pub fn sample(key: &str, body_len: usize) -> Envelope {
            let mut headers = http::HeaderMap::new();
            headers.insert(
                "content-type",
                http::HeaderValue::from_static("application/json"),
            );
            headers.insert(
                "etag",
                http::HeaderValue::from_static("\"5d8c72a5edda8d6a\""),
            );
            headers.insert(
                "cache-control",
                http::HeaderValue::from_static("public, max-age=60"),
            );
            Envelope(Entry {
                kind: Kind::Response,
                key: key.to_owned(),
                status: http::StatusCode::OK,
                headers,
                body: Bytes::from(vec![b'x'; body_len]),
                stored_at: 1,
                fresh_until: 2,
                revalidate_until: 3,
                stale_until: 4,
                fill_ms: 5,
            })
        }

        /// Encodes it.
        pub fn encode(&self) -> Vec<u8> {
            self.0.encode()
        }

        /// Decodes `bytes` for `key`; true when valid.
        pub fn decode(bytes: Bytes, key: &str) -> bool {
            Entry::decode(bytes, key).is_ok()
        }
    }

    /// The default key of a request, hashed as the layer does.
    pub fn key_hash(parts: &http::request::Parts) -> [u8; 32] {
        crate::key::Key::new(crate::key::default_key(parts), parts, &[], false).hash
    }
}
