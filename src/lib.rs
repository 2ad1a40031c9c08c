#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod body;
mod conn;
mod envelope;
mod fill;
mod future;
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
pub use key::default_key;
pub use layer::{Backend, StampedeBuilder, StampedeLayer};
pub use policy::{FailurePolicy, PrivateRequests};
pub use service::Stampede;
pub use stats::Stats;

/// The boxed error of response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
