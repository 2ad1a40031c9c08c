//! [`Stampede`], the service, and the request path: the HTTP meaning of a request (its
//! key, whether it may share an answer, what goes upstream) on top of the flight.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, AGE};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tower_service::Service;
use tracing::Instrument;

use super::body::StampedeBody;
use super::bounds::{HttpBody, Inner};
use super::future::ResponseFuture;
use super::policy::{etag_matches, strip_conditionals, take_tags};
use super::shared::{RequestKey, Shared};
use super::status::Outcome;
use super::stored;
use super::BoxError;
use crate::cache::entry::{now_ms, Windows};
use crate::cache::flight::{Fill, Filled, Flown, Stored};
use crate::stats::{Event, Stats};
use crate::tier::wake::is_shared_error;

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
        self.shared.core.counters.snapshot()
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
            timed(self.shared.clone(), handle(self.shared.clone(), svc, req)).instrument(span),
        ))
    }
}

tokio::task_local! {
    /// The outcome of the request whose future is being polled, noted by `stamp`.
    static OUTCOME: std::cell::Cell<Option<Outcome>>;
}

/// Runs a request's future and records its duration, up to the response head, by
/// outcome. A request whose future is dropped records nothing.
async fn timed<F, T, E>(shared: Arc<Shared>, request: F) -> Result<T, E>
where
    F: std::future::Future<Output = Result<T, E>>,
{
    if !cfg!(feature = "metrics") {
        return request.await;
    }
    OUTCOME
        .scope(std::cell::Cell::new(None), async move {
            let started = std::time::Instant::now();
            let result = request.await;
            let outcome = match &result {
                Ok(_) => OUTCOME.with(|cell| cell.get()),
                Err(_) => None,
            };
            shared
                .core
                .counters
                .record_request(Outcome::ended(outcome), started.elapsed().as_secs_f64());
            result
        })
        .await
}

/// What the client asked beyond the key: a body or not, and its validator.
#[derive(Clone, Copy)]
pub(crate) struct Ask<'a> {
    head: bool,
    if_none_match: Option<&'a HeaderValue>,
    /// When the request arrived, in Unix milliseconds.
    now: u64,
}

/// The fill of one HTTP key: the inner call, its answer judged by the HTTP rules and, when
/// storable, buffered up to the body limit.
pub(crate) struct HttpFill<S, ReqB> {
    shared: Arc<Shared>,
    svc: S,
    req: Request<ReqB>,
    per_user: bool,
    url_tag: String,
}

impl<S, ReqB, B> Fill<stored::Response> for HttpFill<S, ReqB>
where
    S: Service<Request<ReqB>, Response = Response<B>> + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    ReqB: Send + 'static,
    B: HttpBody + Send + 'static,
{
    type Own = Result<Response<StampedeBody<B>>, S::Error>;

    async fn run(
        self,
        _stale: Option<Arc<Stored<stored::Response>>>,
    ) -> Filled<stored::Response, Self::Own> {
        let HttpFill {
            shared,
            mut svc,
            mut req,
            per_user,
            url_tag,
        } = self;
        // The entry answers GET and HEAD alike: fill it with the whole answer.
        if req.method() == Method::HEAD {
            *req.method_mut() = Method::GET;
        }
        let res = match svc.call(req).await {
            Ok(res) => res,
            Err(e) => {
                return Filled::Failed {
                    own: Some(Err(e)),
                    status: 502,
                }
            }
        };
        let (mut head, body) = res.into_parts();
        let status = head.status.as_u16();
        let mut tags = take_tags(&mut head.headers, shared.rules.expose_tags);
        tags.push(url_tag);
        let fresh = match shared
            .rules
            .check_response(head.status, &head.headers, per_user)
        {
            Ok(fresh) => fresh,
            Err(reason) => {
                let res = Response::from_parts(head, StampedeBody::stream(body));
                // Not stored, and no hit-for-pass either: a failing upstream stays
                // coalesced; the waiters of this attempt get its status.
                if is_shared_error(status) {
                    return Filled::Failed {
                        own: Some(Ok(res)),
                        status,
                    };
                }
                return Filled::Pass {
                    own: Ok(res),
                    reason,
                };
            }
        };
        let max = shared.rules.max_body;
        let mut body = Box::pin(body);
        let mut frames: VecDeque<Frame<Bytes>> = VecDeque::new();
        let mut size = 0usize;
        let mut too_big = body.size_hint().lower() > max as u64;
        while !too_big {
            match body.frame().await {
                None => break,
                Some(Err(e)) => {
                    let e: BoxError = e.into();
                    tracing::warn!(error = %e, "inner body failed while buffering");
                    return Filled::Failed {
                        own: None,
                        status: 502,
                    };
                }
                Some(Ok(frame)) => {
                    let trailers = frame.is_trailers();
                    size += frame.data_ref().map_or(0, Bytes::len);
                    frames.push_back(frame);
                    if trailers {
                        return Filled::Pass {
                            own: Ok(Response::from_parts(
                                head,
                                StampedeBody::resume(frames, body),
                            )),
                            reason: "trailers",
                        };
                    }
                    too_big = size > max;
                }
            }
        }
        if too_big {
            return Filled::Pass {
                own: Ok(Response::from_parts(
                    head,
                    StampedeBody::resume(frames, body),
                )),
                reason: "too-big",
            };
        }
        let body = match frames.len() {
            0 => Bytes::new(),
            // One frame is a slice of the connection's read buffer: copy it out.
            1 => frames
                .pop_front()
                .and_then(|f| f.into_data().ok())
                .map(|d| Bytes::copy_from_slice(&d))
                .unwrap_or_default(),
            _ => {
                let mut buf = BytesMut::with_capacity(size);
                for f in frames {
                    if let Some(d) = f.data_ref() {
                        buf.extend_from_slice(d);
                    }
                }
                buf.freeze()
            }
        };
        // Header values in allocations of their own: values cut from the connection's
        // read buffer would otherwise pin that whole buffer (8 KiB or more) for as long as
        // the entry lives.
        let headers = head
            .headers
            .iter()
            .map(|(name, value)| {
                let mut compact =
                    HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
                compact.set_sensitive(value.is_sensitive());
                (name.clone(), compact)
            })
            .collect();
        Filled::Store {
            value: stored::Response {
                status: head.status,
                headers,
                body,
            },
            windows: Windows {
                ttl: fresh.ttl,
                grace: fresh.grace,
                stale_if_error: fresh.stale_if_error,
            },
            tags,
            error: head.status.is_server_error(),
        }
    }
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
    let RequestKey {
        key,
        per_user,
        url_tag,
    } = match shared.key_for(&mut parts) {
        Ok(key) => key,
        Err(outcome) => {
            shared.core.counters.incr(Event::bypassed);
            // An unsafe method's non-error answer invalidates what is stored for its
            // target (RFC 9111 4.4), fleet-wide.
            let unsafe_target =
                (outcome == Outcome::Method && !is_safe(&parts.method)).then(|| {
                    (
                        parts.uri.clone(),
                        parts.headers.get(http::header::HOST).cloned(),
                    )
                });
            let res = Box::pin(forward(
                &shared,
                svc,
                Request::from_parts(parts, body),
                outcome,
            ))
            .await;
            let invalidate = match (unsafe_target, &res) {
                (Some((uri, host)), Ok(res))
                    if !res.status().is_client_error() && !res.status().is_server_error() =>
                {
                    let named = |name| res.headers().get(name).cloned();
                    let locations = [
                        named(http::header::LOCATION),
                        named(http::header::CONTENT_LOCATION),
                    ];
                    Some((uri, host, locations))
                }
                _ => None,
            };
            if let Some((uri, host, locations)) = invalidate {
                invalidate_after_unsafe(&shared, &uri, host, locations).await;
            }
            return res;
        }
    };
    tracing::Span::current().record("key", tracing::field::display(key.short()));
    let head = parts.method == Method::HEAD;
    // What goes upstream does so for everyone: without this client's validators.
    let if_none_match = strip_conditionals(&mut parts.headers);
    let ask = Ask {
        head,
        if_none_match: if_none_match.as_ref(),
        now: now_ms(),
    };
    let fill = HttpFill {
        shared: shared.clone(),
        svc,
        req: Request::from_parts(parts, body),
        per_user,
        url_tag,
    };
    match shared.core.get(key, fill).await {
        Flown::Value(stored, outcome) => {
            let ask = Ask {
                now: now_ms(),
                ..ask
            };
            Ok(shared.respond(&stored, outcome.into(), ask))
        }
        Flown::Own(res, outcome) => {
            // The fill asked for a GET: a HEAD gets its head only.
            let res = res.map(|r| {
                if head {
                    r.map(|_| StampedeBody::empty())
                } else {
                    r
                }
            });
            res.map(|r| shared.stamp(r, outcome.into()))
        }
        Flown::Failed(status, outcome, _) => Ok(shared.error_response(
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
            outcome.into(),
        )),
        Flown::Pass(fill) => {
            Box::pin(forward(&shared, fill.svc, fill.req, Outcome::HitForPass)).await
        }
        Flown::Refused(outcome) => {
            Ok(shared.error_response(StatusCode::SERVICE_UNAVAILABLE, outcome.into()))
        }
    }
}

fn is_safe(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

/// After a non-error answer to an unsafe method: purges the target URI and the
/// same-origin `Location` and `Content-Location` it names, on every node.
async fn invalidate_after_unsafe(
    shared: &Shared,
    uri: &http::Uri,
    host: Option<HeaderValue>,
    locations: [Option<HeaderValue>; 2],
) {
    let mut targets = vec![uri.clone()];
    for value in locations.iter().flatten() {
        let Ok(value) = value.to_str() else {
            continue;
        };
        let Ok(target) = value.parse::<http::Uri>() else {
            continue;
        };
        // Same origin only: a relative reference, or the request's own authority.
        let same = match target.authority() {
            None => true,
            Some(a) => {
                uri.authority() == Some(a)
                    || host
                        .as_ref()
                        .is_some_and(|h| h.as_bytes() == a.as_str().as_bytes())
            }
        };
        if same {
            targets.push(target);
        }
    }
    for target in targets {
        if let Err(e) = shared.purge(&target, host.clone()).await {
            tracing::debug!(error = %e, uri = %target, "invalidation after an unsafe method failed");
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
        let _ = OUTCOME.try_with(|cell| cell.set(Some(outcome)));
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
        stored: &Stored<stored::Response>,
        outcome: Outcome,
        ask: Ask<'_>,
    ) -> Response<StampedeBody<B>> {
        if matches!(outcome, Outcome::Stale | Outcome::StaleIfError) {
            self.core.counters.incr(Event::stale_served);
        }
        let entry = &stored.value;
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
            .insert(AGE, HeaderValue::from(stored.meta.age_secs(ask.now)));
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
}
