//! [`Stampede`], the service, and the request path.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, AGE};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use tower_service::Service;
use tracing::Instrument;

use crate::body::StampedeBody;
use crate::bounds::{HttpBody, Inner};
use crate::envelope::{now_ms, Entry};
use crate::fill::{fill, spawn_refresh, Filled};
use crate::future::ResponseFuture;
use crate::key::Key;
use crate::layer::Shared;
use crate::policy::{etag_matches, strip_conditionals};
use crate::stats::{Event, Stats};
use crate::status::Outcome;
use crate::BoxError;

static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// The service built by [`StampedeLayer`](crate::StampedeLayer).
///
/// Cacheable requests are answered from memory, then Redis, else by one call to the
/// inner service per key across every node sharing the backend; everything else goes
/// straight through. Errors of the inner service are passed on as they are; the layer's
/// own failures (a fail-closed policy, an upstream that kept failing) are answered as
/// `503`/`502` responses, so an infallible stack stays infallible.
pub struct Stampede<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: Clone> Clone for Stampede<S> {
    fn clone(&self) -> Self {
        Stampede {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Stampede<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stampede")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S> Stampede<S> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared>) -> Self {
        Stampede { inner, shared }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Gives the inner service back.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// A snapshot of this node's counters.
    pub fn stats(&self) -> Stats {
        self.shared.counters.snapshot()
    }
}

impl<S, ReqB, B> Service<Request<ReqB>> for Stampede<S>
where
    S: Service<Request<ReqB>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    ReqB: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<StampedeBody<B>>;
    type Error = S::Error;
    type Future = ResponseFuture<B, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        // The ready service goes with the request; this handle keeps a fresh clone.
        let clone = self.inner.clone();
        let svc = std::mem::replace(&mut self.inner, clone);
        let span = tracing::debug_span!(
            "stampede",
            method = %req.method(),
            uri = %req.uri(),
            key = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        ResponseFuture::new(Box::pin(
            crate::stats::timed(self.shared.clone(), handle(self.shared.clone(), svc, req))
                .instrument(span),
        ))
    }
}

/// What the client asked beyond the key: a body or not, and its validator.
#[derive(Clone, Copy)]
pub(crate) struct Ask<'a> {
    head: bool,
    if_none_match: Option<&'a HeaderValue>,
    /// When the request arrived, in Unix milliseconds.
    now: u64,
}

/// What the leader of a local flight learned, beyond the shared entry.
enum Leader<B, E> {
    Entry(Outcome),
    Response(Result<Response<StampedeBody<B>>, E>, Outcome),
    Failed(Option<E>, StatusCode),
    Refused(Outcome),
}

/// Why a local flight ended without an entry, as its followers see it.
#[derive(Debug)]
enum Flight {
    Pass,
    /// The one attempt failed: every follower gets its outcome, none starts another.
    Failed(StatusCode),
    /// The fill ended without any answer (it cannot, short of a bug): a follower may lead
    /// the next attempt.
    Vanished,
    Refused(Outcome),
}

async fn handle<S, ReqB, B>(
    shared: Arc<Shared>,
    svc: S,
    req: Request<ReqB>,
) -> Result<Response<StampedeBody<B>>, S::Error>
where
    S: Inner<ReqB, B>,
    ReqB: Send + 'static,
    B: HttpBody + Send + 'static,
{
    let (mut parts, body) = req.into_parts();
    let key = match shared.key_for(&mut parts) {
        Ok(key) => key,
        Err(outcome) => {
            shared.counters.incr(Event::bypassed);
            return Box::pin(forward(
                &shared,
                svc,
                Request::from_parts(parts, body),
                outcome,
            ))
            .await;
        }
    };
    tracing::Span::current().record("key", tracing::field::display(key.short()));
    let head = parts.method == Method::HEAD;
    // What goes upstream does so for everyone: without this client's validators.
    let if_none_match = strip_conditionals(&mut parts.headers);
    let now = now_ms();
    let ask = Ask {
        head,
        if_none_match: if_none_match.as_ref(),
        now,
    };
    let req = Request::from_parts(parts, body);

    let mut fallback = None;
    if let Some(entry) = shared.l1.get(&key.hash).await {
        if entry.is_fresh_at(now) {
            shared.counters.incr(Event::hits_memory);
            if let Some(beta) = shared.cfg.early_refresh {
                let r = 1.0 - rand::random::<f64>();
                if entry.refresh_early(now, beta, r) {
                    spawn_refresh(&shared, Arc::new(key), req, svc, entry.clone());
                }
            }
            return Ok(shared.respond(&entry, Outcome::HitMemory, ask));
        }
        if entry.is_revalidatable_at(now) {
            spawn_refresh(&shared, Arc::new(key), req, svc, entry.clone());
            return Ok(shared.respond(&entry, Outcome::Stale, ask));
        }
        // Past the revalidation window: a miss, with this copy kept for stale-if-error.
        shared.l1.invalidate(&key.hash).await;
        fallback = Some(entry).filter(|e| e.is_usable_at(now));
    }
    if shared.is_pass(&key.hash) {
        shared.counters.incr(Event::hit_for_pass);
        return Box::pin(forward(&shared, svc, req, Outcome::HitForPass)).await;
    }
    shared.counters.incr(Event::misses);
    // The miss path is boxed on its own: its state is large, and a hit should not carry
    // (and move) it.
    Box::pin(miss(
        shared,
        Arc::new(key),
        req,
        svc,
        fallback,
        head,
        if_none_match,
    ))
    .await
}

/// The miss path: one flight per key in this process, on moka's own coalescing. The leader
/// runs the init (a spawned fill), the others wait for its value or its error.
async fn miss<S, ReqB, B>(
    shared: Arc<Shared>,
    key: Arc<Key>,
    req: Request<ReqB>,
    svc: S,
    fallback: Option<Arc<Entry>>,
    head: bool,
    if_none_match: Option<HeaderValue>,
) -> Result<Response<StampedeBody<B>>, S::Error>
where
    S: Inner<ReqB, B>,
    ReqB: Send + 'static,
    B: HttpBody + Send + 'static,
{
    let ask = Ask {
        head,
        if_none_match: if_none_match.as_ref(),
        now: now_ms(),
    };
    shared.ensure_subscriber();

    // One flight per key in this process, on moka's own coalescing: the leader runs the
    // init (a spawned fill), the others wait for its value or its error.
    let mut request = Some((req, svc));
    let mut failures = 0;
    loop {
        let mut leader: Option<Leader<B, S::Error>> = None;
        let flight = shared
            .l1
            .entry(key.hash)
            .or_try_insert_with(async {
                let (req, svc) = request.take().expect("a request leads at most one flight");
                let (reply, filled) = tokio::sync::oneshot::channel();
                tokio::spawn(fill(
                    shared.clone(),
                    key.clone(),
                    req,
                    svc,
                    fallback.clone(),
                    reply,
                ));
                let Ok(filled) = filled.await else {
                    tracing::error!("fill task ended without an answer");
                    leader = Some(Leader::Failed(None, StatusCode::BAD_GATEWAY));
                    return Err(Flight::Vanished);
                };
                let (result, learned) = match filled {
                    Filled::Entry(entry, outcome) => (Ok(entry), Leader::Entry(outcome)),
                    Filled::Pass(res, outcome) => {
                        (Err(Flight::Pass), Leader::Response(res, outcome))
                    }
                    Filled::Error(res, status) => (
                        Err(Flight::Failed(status)),
                        Leader::Response(Ok(res), Outcome::Uncacheable),
                    ),
                    Filled::Failed(e, status) => {
                        (Err(Flight::Failed(status)), Leader::Failed(e, status))
                    }
                    Filled::Refused(outcome) => {
                        (Err(Flight::Refused(outcome)), Leader::Refused(outcome))
                    }
                };
                leader = Some(learned);
                result
            })
            .await;
        match (flight, leader) {
            (Ok(entry), Some(Leader::Entry(outcome))) => {
                return Ok(shared.respond(entry.value(), outcome, ask));
            }
            (Ok(entry), _) => {
                let now = now_ms();
                let outcome = if entry.value().is_fresh_at(now) {
                    shared.counters.incr(Event::collapsed_local);
                    Outcome::Collapsed
                } else if entry.value().is_revalidatable_at(now) {
                    Outcome::Stale
                } else {
                    Outcome::StaleIfError
                };
                return Ok(shared.respond(entry.value(), outcome, ask));
            }
            (Err(_), Some(Leader::Response(res, outcome))) => {
                // The fill asked for a GET: a HEAD gets its head only.
                let res = res.map(|r| {
                    if head {
                        r.map(|_| StampedeBody::empty())
                    } else {
                        r
                    }
                });
                return res.map(|r| shared.stamp(r, outcome));
            }
            (Err(_), Some(Leader::Failed(Some(e), _))) => return Err(e),
            (Err(_), Some(Leader::Failed(None, status))) => {
                return Ok(shared.error_response(status, Outcome::UpstreamFailed));
            }
            (Err(_), Some(Leader::Refused(outcome))) | (Err(_), Some(Leader::Entry(outcome))) => {
                return Ok(shared.error_response(StatusCode::SERVICE_UNAVAILABLE, outcome));
            }
            (Err(e), None) => match *e {
                Flight::Pass => {
                    let (req, svc) = request.take().expect("a follower keeps its request");
                    shared.counters.incr(Event::hit_for_pass);
                    return forward(&shared, svc, req, Outcome::HitForPass).await;
                }
                Flight::Refused(outcome) => {
                    return Ok(shared.error_response(StatusCode::SERVICE_UNAVAILABLE, outcome));
                }
                Flight::Failed(status) => {
                    return Ok(shared.error_response(status, Outcome::UpstreamFailed));
                }
                Flight::Vanished => {
                    failures += 1;
                    if failures > shared.cfg.max_takeovers {
                        return Ok(
                            shared.error_response(StatusCode::BAD_GATEWAY, Outcome::UpstreamFailed)
                        );
                    }
                }
            },
        }
    }
}

/// Sends a request straight to the inner service.
async fn forward<S, ReqB, B>(
    shared: &Shared,
    mut svc: S,
    req: Request<ReqB>,
    outcome: Outcome,
) -> Result<Response<StampedeBody<B>>, S::Error>
where
    S: Service<Request<ReqB>, Response = Response<B>>,
{
    let res = svc.call(req).await?;
    Ok(shared.stamp(res.map(StampedeBody::stream), outcome))
}

impl Shared {
    /// Adds this cache's `Cache-Status` entry after any from upstream caches.
    pub(crate) fn stamp<B>(&self, mut res: Response<B>, outcome: Outcome) -> Response<B> {
        tracing::Span::current().record("outcome", outcome.name());
        crate::stats::note_outcome(outcome);
        let ours = self.status_values.get(outcome);
        let value = match res.headers().get(&CACHE_STATUS) {
            Some(theirs) => {
                let mut joined = theirs.as_bytes().to_vec();
                joined.extend_from_slice(b", ");
                joined.extend_from_slice(ours.as_bytes());
                HeaderValue::from_bytes(&joined).unwrap_or(ours)
            }
            None => ours,
        };
        res.headers_mut().insert(CACHE_STATUS.clone(), value);
        res
    }

    pub(crate) fn respond<B>(
        &self,
        entry: &Entry,
        outcome: Outcome,
        ask: Ask<'_>,
    ) -> Response<StampedeBody<B>> {
        if matches!(outcome, Outcome::Stale | Outcome::StaleIfError) {
            self.counters.incr(Event::stale_served);
        }
        let not_modified = entry.status == StatusCode::OK
            && ask
                .if_none_match
                .is_some_and(|inm| etag_matches(inm, &entry.headers));
        let body = if ask.head || not_modified {
            StampedeBody::empty()
        } else {
            StampedeBody::full(entry.body.clone())
        };
        let mut res = Response::new(body);
        *res.headers_mut() = entry.headers.clone();
        if not_modified {
            *res.status_mut() = StatusCode::NOT_MODIFIED;
            res.headers_mut().remove(http::header::CONTENT_LENGTH);
        } else {
            *res.status_mut() = entry.status;
            if ask.head {
                res.headers_mut().insert(
                    http::header::CONTENT_LENGTH,
                    HeaderValue::from(entry.body.len()),
                );
            }
        }
        res.headers_mut()
            .insert(AGE, HeaderValue::from(entry.age_secs(ask.now)));
        self.stamp(res, outcome)
    }

    pub(crate) fn error_response<B>(
        &self,
        status: StatusCode,
        outcome: Outcome,
    ) -> Response<StampedeBody<B>> {
        let mut res = Response::new(StampedeBody::empty());
        *res.status_mut() = status;
        self.stamp(res, outcome)
    }

    pub(crate) fn is_pass(&self, hash: &[u8; 32]) -> bool {
        self.passes.as_ref().is_some_and(|p| p.contains_key(hash))
    }

    pub(crate) async fn mark_pass(&self, hash: [u8; 32]) {
        if let Some(passes) = &self.passes {
            passes.insert(hash, ()).await;
        }
    }
}
