//! The bounds on what the layer wraps, named once for the private functions of the
//! request path.

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use super::BoxError;

/// A response body the layer can buffer and stream.
pub(crate) trait HttpBody: Body<Data = Bytes, Error: Into<BoxError>> {}

impl<T: Body<Data = Bytes, Error: Into<BoxError>>> HttpBody for T {}

/// An inner service whose calls can move into a fill's own task.
pub(crate) trait Inner<ReqB, B>:
    Service<Request<ReqB>, Response = Response<B>, Future: Send, Error: Send + 'static> + Send + 'static
{
}

impl<T, ReqB, B> Inner<ReqB, B> for T where
    T: Service<Request<ReqB>, Response = Response<B>, Future: Send, Error: Send + 'static>
        + Send
        + 'static
{
}
