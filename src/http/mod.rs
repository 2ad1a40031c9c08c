//! The tower layer: HTTP meaning on top of the generic cache.
//!
//! This room decides what a request's key is (method, URL, varied headers, per-user
//! credentials), which requests may share an answer and which answers are stored (the
//! HTTP rules), what a stored answer looks like in bytes, and how each answer says where
//! it came from (RFC 9211 `Cache-Status`). The flight itself (coalescing, the lock, grace,
//! the tier) is the generic one in [`cache`](crate::cache): this layer is one client of it
//! and imports from `cache` and `tier`, never the other way.

pub(crate) mod body;
pub(crate) mod bounds;
pub(crate) mod future;
pub(crate) mod key;
pub(crate) mod layer;
pub(crate) mod policy;
pub(crate) mod rfc;
pub(crate) mod service;
pub(crate) mod shared;
pub(crate) mod status;
pub(crate) mod stored;

/// The boxed error of response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub use body::StampedeBody;
pub use future::ResponseFuture;
pub use key::default_key;
pub use layer::{StampedeBuilder, StampedeLayer};
pub use policy::PrivateRequests;
pub use service::Stampede;
