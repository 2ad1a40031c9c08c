//! The response future of [`Stampede`](crate::Stampede).

use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::Response;

use super::body::StampedeBody;
use super::shared::Shared;
use super::status::Outcome;

pub(crate) type Boxed<B, E> =
    Pin<Box<dyn Future<Output = Result<Response<StampedeBody<B>>, E>> + Send>>;

tokio::task_local! {
    /// The outcome of the request whose future is being polled, noted by `stamp`.
    pub(crate) static OUTCOME: Cell<Option<Outcome>>;
}

/// The future returned by [`Stampede`](crate::Stampede). Dropping it never strands a lock
/// or a waiter: a fill in progress runs on in its own task.
///
/// It polls the request path inside the request's `tracing` span and records the
/// request's duration, up to its response head, by outcome (a request whose future is
/// dropped records nothing). Both are done here rather than by wrapping the request's
/// future, so that future is built once, in its box, and never moved again. A request
/// answered from memory has no such future: this one is ready with its response.
pub struct ResponseFuture<B, E> {
    inner: State<B, E>,
    span: tracing::Span,
    shared: Arc<Shared>,
    started: Instant,
    /// The outcome noted so far (a request's future may be polled many times).
    outcome: Option<Outcome>,
}

/// The request's path still running, or the answer it already has.
enum State<B, E> {
    Path(Boxed<B, E>),
    /// Answered when the request was called (a hit in memory); `None` once taken.
    Answered(Option<Response<StampedeBody<B>>>),
}

impl<B, E> ResponseFuture<B, E> {
    pub(crate) fn new(
        inner: Boxed<B, E>,
        span: tracing::Span,
        shared: Arc<Shared>,
        started: Instant,
    ) -> Self {
        ResponseFuture {
            inner: State::Path(inner),
            span,
            shared,
            started,
            outcome: None,
        }
    }

    /// A future that is ready with `res`, the answer from memory.
    pub(crate) fn answered(
        res: Response<StampedeBody<B>>,
        span: tracing::Span,
        shared: Arc<Shared>,
        started: Instant,
    ) -> Self {
        ResponseFuture {
            inner: State::Answered(Some(res)),
            span,
            shared,
            started,
            outcome: Some(Outcome::HitMemory),
        }
    }

    fn record(&self, outcome: Option<Outcome>) {
        if cfg!(feature = "metrics") {
            self.shared.core.counters.record_request(
                Outcome::ended(outcome),
                self.started.elapsed().as_secs_f64(),
            );
        }
    }
}

impl<B, E> fmt::Debug for ResponseFuture<B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<B, E> Future for ResponseFuture<B, E> {
    type Output = Result<Response<StampedeBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Every field is `Unpin` (the request's future is boxed).
        let this = self.get_mut();
        let inner = match &mut this.inner {
            State::Path(inner) => inner,
            State::Answered(res) => {
                let res = res.take().expect("ResponseFuture polled after completion");
                this.record(this.outcome);
                return Poll::Ready(Ok(res));
            }
        };
        let _entered = this.span.enter();
        if !cfg!(feature = "metrics") {
            return inner.as_mut().poll(cx);
        }
        let (poll, outcome) = OUTCOME.sync_scope(Cell::new(this.outcome), || {
            let poll = inner.as_mut().poll(cx);
            (poll, OUTCOME.with(Cell::get))
        });
        this.outcome = outcome;
        if let Poll::Ready(result) = &poll {
            let outcome = match result {
                Ok(_) => this.outcome,
                Err(_) => None,
            };
            this.record(outcome);
        }
        poll
    }
}
