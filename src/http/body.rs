//! The one response body type of the layer.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::BoxError;

/// The body of every response from [`Stampede`](crate::Stampede): either a cached body
/// in one piece, or the inner service's body streamed through (after any frames that were
/// read while deciding whether to store it).
pub struct StampedeBody<B> {
    kind: Kind<B>,
}

enum Kind<B> {
    Full(Option<Bytes>),
    Stream {
        prefix: VecDeque<Frame<Bytes>>,
        inner: Pin<Box<B>>,
    },
}

impl<B> fmt::Debug for StampedeBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Full(b) => f
                .debug_tuple("Full")
                .field(&b.as_ref().map(Bytes::len))
                .finish(),
            Kind::Stream { prefix, .. } => f
                .debug_struct("Stream")
                .field("prefix_frames", &prefix.len())
                .finish(),
        }
    }
}

impl<B> StampedeBody<B> {
    /// A body of these bytes, in one piece: for an answer a service around the layer
    /// makes itself (an admin endpoint beside the cached routes).
    pub fn full(bytes: Bytes) -> Self {
        StampedeBody {
            kind: Kind::Full((!bytes.is_empty()).then_some(bytes)),
        }
    }

    pub(crate) fn empty() -> Self {
        StampedeBody {
            kind: Kind::Full(None),
        }
    }

    pub(crate) fn stream(inner: B) -> Self {
        Self::resume(VecDeque::new(), Box::pin(inner))
    }

    pub(crate) fn resume(prefix: VecDeque<Frame<Bytes>>, inner: Pin<Box<B>>) -> Self {
        StampedeBody {
            kind: Kind::Stream { prefix, inner },
        }
    }
}

impl<B> Body for StampedeBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().kind {
            Kind::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Kind::Stream { prefix, inner } => {
                if let Some(frame) = prefix.pop_front() {
                    return Poll::Ready(Some(Ok(frame)));
                }
                inner.as_mut().poll_frame(cx).map_err(Into::into)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(data) => data.is_none(),
            Kind::Stream { prefix, inner } => prefix.is_empty() && inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Kind::Stream { prefix, inner } => {
                let buffered: u64 = prefix
                    .iter()
                    .filter_map(|f| f.data_ref().map(|d| d.len() as u64))
                    .sum();
                let hint = inner.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(hint.lower() + buffered);
                if let Some(upper) = hint.upper() {
                    out.set_upper(upper + buffered);
                }
                out
            }
        }
    }
}
