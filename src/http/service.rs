//! [`Stampede`], the service, and the request path: the HTTP meaning of a request (its
//! key, whether it may share an answer, what goes upstream) on top of the flight.

use std::collections::VecDeque;
use std::fmt;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{
    HeaderName, HeaderValue, AGE, ETAG, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED,
};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tower_service::Service;

use super::body::StampedeBody;
use super::bounds::{HttpBody, Inner};
use super::future::{Boxed, ResponseFuture, OUTCOME};
use super::policy::{
    etag_matches, etag_matches_strong, strip_conditionals, take_tags, ByteRange, Conditionals,
    Freshness,
};
use super::rfc::{self, Timing};
use super::shared::{url_tag, RequestKey, Shared};
use super::status::Outcome;
use super::stored;
use super::BoxError;
use crate::cache::entry::{now_ms, Windows};
use crate::cache::flight::{Fill, Filled, Flown, Key, Peek, Stored};
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
        let started = Instant::now();
        let span = tracing::debug_span!(
            "stampede",
            method = %req.method(),
            uri = %req.uri(),
            key = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        let (mut parts, body) = req.into_parts();
        // The hit path, here and synchronous: a request keyed and answered from memory
        // gets a future that holds its response, with nothing boxed and no inner call.
        let path = {
            let _entered = span.enter();
            self.shared.path_of(&mut parts)
        };
        let shared = self.shared.clone();
        let keyed = match path {
            Path::Answered(res) => return ResponseFuture::answered(res, span, shared, started),
            Path::Keyed(keyed, ask, peek) => Ok((keyed, ask, peek)),
            Path::Bypass(outcome) => Err(outcome),
        };
        // The ready service goes with the request; this handle keeps a fresh clone.
        let clone = self.inner.clone();
        let svc = std::mem::replace(&mut self.inner, clone);
        let req = Request::from_parts(parts, body);
        // One allocation, and the request's future is moved once, into it.
        let inner = match keyed {
            Ok((keyed, ask, peek)) => {
                Box::pin(handle(shared.clone(), svc, req, keyed, ask, peek)) as Boxed<_, _>
            }
            Err(outcome) => Box::pin(bypass(shared.clone(), svc, req, outcome)),
        };
        ResponseFuture::new(inner, span, shared, started)
    }
}

/// Where a request goes, as far as its head and this node's memory tell.
enum Path<B> {
    /// Answered from memory.
    Answered(Response<StampedeBody<B>>),
    /// Keyed, with no fresh answer in memory (or one only the async path may give), and
    /// what memory held.
    Keyed(RequestKey, Ask, Peek<stored::Response>),
    /// Not keyed: straight through.
    Bypass(Outcome),
}

impl Shared {
    /// The key of a request and, when a fresh answer is in memory, that answer. The
    /// request goes upstream, if it does, without this client's validators.
    fn path_of<B>(&self, parts: &mut http::request::Parts) -> Path<B> {
        let keyed = match self.key_for(parts) {
            Ok(keyed) => keyed,
            Err(outcome) => return Path::Bypass(outcome),
        };
        if tracing::level_enabled!(tracing::Level::DEBUG) {
            tracing::Span::current().record("key", tracing::field::display(keyed.key.short()));
        }
        let head = parts.method == Method::HEAD;
        // What goes upstream does so for everyone: without this client's validators.
        let cond = strip_conditionals(&mut parts.headers, self.rules.standards());
        let arrival = now_ms();
        let ask = Ask {
            head,
            cond,
            arrival,
            now: arrival,
        };
        let peek = self.core.peek(&keyed.key);
        match &peek {
            Peek::Read(Some(stored))
                if self.core.hits_are_plain()
                    && stored.meta.is_fresh_at(arrival)
                    && !stored.value.is_index() =>
            {
                self.core.counters.incr(Event::hits_memory);
                Path::Answered(self.respond(stored, Outcome::HitMemory, &ask))
            }
            _ => Path::Keyed(keyed, ask, peek),
        }
    }
}

/// What the client asked beyond the key: a body or not, its preconditions and range.
#[derive(Clone)]
pub(crate) struct Ask {
    head: bool,
    cond: Conditionals,
    /// When the request arrived, in Unix milliseconds.
    arrival: u64,
    /// When the answer is given, in Unix milliseconds.
    now: u64,
}

/// What the fills of one request share with its path: the inner call not made yet, and
/// an answer a fill of the primary key found varying, to be stored under its variant.
pub(crate) struct Job<S, ReqB> {
    call: Mutex<Option<(S, Request<ReqB>)>>,
    stash: Mutex<Option<(stored::Response, Freshness)>>,
    /// The tag every entry of this URL carries (its variants and index too), so that a
    /// purge of the URL reaches them all: worked out by the fill that makes the call, not
    /// on the hit path.
    url_tag: std::sync::OnceLock<String>,
    /// Whether a vary index may pick this request's variant: then the fill that takes the
    /// call keeps a copy of its headers here (a hit never copies them).
    keeps_headers: bool,
    headers: std::sync::OnceLock<http::HeaderMap>,
}

impl<S, ReqB> Job<S, ReqB> {
    fn new(svc: S, req: Request<ReqB>, keeps_headers: bool) -> Self {
        Job {
            call: Mutex::new(Some((svc, req))),
            stash: Mutex::new(None),
            url_tag: std::sync::OnceLock::new(),
            keeps_headers,
            headers: std::sync::OnceLock::new(),
        }
    }

    fn take_call(&self) -> Option<(S, Request<ReqB>)> {
        let call = self.call.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((_, req)) = &call {
            if self.keeps_headers {
                let _ = self.headers.set(req.headers().clone());
            }
        }
        call
    }

    /// Runs `f` on the request's headers: those of the call not made yet, else the copy
    /// its fill kept. `None` when neither is at hand.
    fn with_headers<R>(&self, f: impl FnOnce(&http::HeaderMap) -> R) -> Option<R> {
        let call = self.call.lock().unwrap_or_else(|p| p.into_inner());
        match (&*call, self.headers.get()) {
            (Some((_, req)), _) => Some(f(req.headers())),
            (None, Some(headers)) => Some(f(headers)),
            (None, None) => None,
        }
    }

    fn take_stash(&self) -> Option<(stored::Response, Freshness)> {
        self.stash.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// The fill of one HTTP key: the inner call (conditional when a stale copy with a
/// validator is at hand), its answer judged by the HTTP rules and, when storable,
/// buffered up to the body limit.
pub(crate) struct HttpFill<S, ReqB> {
    shared: Arc<Shared>,
    job: Arc<Job<S, ReqB>>,
    per_user: bool,
    /// For the key of a variant: the header names of the vary index it was built from.
    variant: Option<Vec<HeaderName>>,
}

/// Header fields a 304 does not update in the stored answer (RFC 9111 3.2): they describe
/// the stored body or the connection.
const NOT_UPDATED: [HeaderName; 8] = [
    http::header::CONTENT_LENGTH,
    http::header::CONTENT_ENCODING,
    http::header::CONTENT_RANGE,
    http::header::TRANSFER_ENCODING,
    http::header::CONNECTION,
    http::header::TE,
    http::header::TRAILER,
    http::header::UPGRADE,
];

/// The stored headers updated with a 304's (RFC 9111 3.2, 4.3.4): each field the 304
/// carries replaces every stored line of that name.
fn updated_headers(stored: &http::HeaderMap, fresh: &http::HeaderMap) -> http::HeaderMap {
    let mut out = stored.clone();
    for name in fresh.keys() {
        if NOT_UPDATED.contains(name) {
            continue;
        }
        out.remove(name);
        for value in fresh.get_all(name) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// What the flight stores for a judged answer.
fn to_store<O>(
    mut value: stored::Response,
    fresh: &Freshness,
    rfc: bool,
    url_tag: &str,
) -> Filled<stored::Response, O> {
    value.ext = stored::Ext {
        rfc,
        index: false,
        initial_age: fresh.initial_age,
        stale_ok_ms: fresh.stale_ok.as_millis().min(u64::MAX as u128) as u64,
    };
    let error = value.status.is_server_error();
    Filled::Store {
        value,
        windows: Windows {
            ttl: fresh.ttl,
            grace: fresh.grace,
            stale_if_error: fresh.stale_if_error,
        },
        tags: fresh
            .tags
            .iter()
            .cloned()
            .chain(std::iter::once(url_tag.to_owned()))
            .collect(),
        error,
    }
}

/// A client's answer made of a buffered one.
fn full_response<B>(value: &stored::Response) -> Response<StampedeBody<B>> {
    let mut res = Response::new(StampedeBody::full(value.body.clone()));
    *res.status_mut() = value.status;
    *res.headers_mut() = value.headers.clone();
    res
}

/// What only the request that ran a fill gets: its own answer or the inner error.
type Own<S, ReqB, B> = Result<Response<StampedeBody<B>>, <S as Service<Request<ReqB>>>::Error>;

impl<S, ReqB> HttpFill<S, ReqB> {
    /// Stores a judged answer: under this key, or, when it varies on headers the key does
    /// not hold and this is the primary key, a vary index here and the answer (stashed)
    /// under its variant by the request path's next fill.
    fn conclude<B>(
        &self,
        value: stored::Response,
        fresh: Freshness,
    ) -> Filled<stored::Response, Own<S, ReqB, B>>
    where
        S: Service<Request<ReqB>>,
    {
        let rfc = self.shared.rules.standards();
        match &self.variant {
            None if !fresh.vary.is_empty() => {
                let names = fresh
                    .vary
                    .iter()
                    .map(HeaderName::as_str)
                    .collect::<Vec<_>>()
                    .join(", ");
                let mut headers = http::HeaderMap::new();
                if let Ok(v) = HeaderValue::from_str(&names) {
                    headers.insert(http::header::VARY, v);
                }
                // The index outlives the answer's freshness: it names headers, and the
                // variants revalidate themselves.
                let ttl = fresh
                    .ttl
                    .saturating_add(fresh.grace.max(fresh.stale_if_error));
                let index = stored::Response {
                    status: StatusCode::OK,
                    headers,
                    body: Bytes::new(),
                    ext: stored::Ext {
                        rfc: true,
                        index: true,
                        initial_age: 0,
                        stale_ok_ms: 0,
                    },
                };
                *self.job.stash.lock().unwrap_or_else(|p| p.into_inner()) = Some((value, fresh));
                Filled::Store {
                    value: index,
                    windows: Windows {
                        ttl,
                        grace: Duration::ZERO,
                        stale_if_error: Duration::ZERO,
                    },
                    tags: vec![self.url_tag().to_owned()],
                    error: false,
                }
            }
            Some(names) if *names != fresh.vary => Filled::Pass {
                own: Ok(full_response(&value)),
                reason: "vary-changed",
            },
            _ => to_store(value, &fresh, rfc, self.url_tag()),
        }
    }
}

impl<S, ReqB> HttpFill<S, ReqB> {
    /// The tag of this fill's URL (empty until the fill's call worked it out).
    fn url_tag(&self) -> &str {
        self.job.url_tag.get().map_or("", String::as_str)
    }
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
        stale: Option<Arc<Stored<stored::Response>>>,
    ) -> Filled<stored::Response, Self::Own> {
        // The answer a primary-key fill of this request found varying: stored as it is.
        if self.variant.is_some() {
            if let Some((value, fresh)) = self.job.take_stash() {
                return self.conclude(value, fresh);
            }
        }
        let Some((mut svc, mut req)) = self.job.take_call() else {
            return Filled::Failed {
                own: None,
                status: 502,
            };
        };
        let shared = self.shared.clone();
        let per_user = self.per_user;
        // The entry answers GET and HEAD alike: fill it with the whole answer.
        if req.method() == Method::HEAD {
            *req.method_mut() = Method::GET;
        }
        let (parts, body) = req.into_parts();
        self.job.url_tag.get_or_init(|| {
            shared
                .base_key(&parts)
                .map(|base| url_tag(&base))
                .unwrap_or_default()
        });
        let mut req = Request::from_parts(parts, body);
        // A stale copy with a validator is revalidated (RFC 9111 4.3.1).
        let revalidating =
            stale.filter(|s| shared.rules.standards() && s.value.ext.rfc && !s.value.is_index());
        let revalidating = revalidating.filter(|s| {
            let mut asked = false;
            if let Some(etag) = s.value.headers.get(ETAG) {
                req.headers_mut().insert(IF_NONE_MATCH, etag.clone());
                asked = true;
            }
            if let Some(modified) = s.value.headers.get(LAST_MODIFIED) {
                req.headers_mut()
                    .insert(IF_MODIFIED_SINCE, modified.clone());
                asked = true;
            }
            asked
        });
        let request_ms = now_ms();
        let res = match svc.call(req).await {
            Ok(res) => res,
            Err(e) => {
                return Filled::Failed {
                    own: Some(Err(e)),
                    status: 502,
                }
            }
        };
        let timing = Timing {
            request_ms,
            response_ms: now_ms(),
        };
        let (mut head, body) = res.into_parts();
        // The answer's tags are for this cache: read, and removed unless exposed.
        let tags = take_tags(&mut head.headers, shared.rules.expose_tags);
        if shared.rules.standards() && head.headers.contains_key(AGE) {
            // What goes on carries this cache's view of the age (RFC 9111 4.2.3, 5.1).
            let age = rfc::initial_age_ms(&head.headers, timing) / 1000;
            head.headers.insert(AGE, HeaderValue::from(age));
        }
        if head.status == StatusCode::NOT_MODIFIED {
            if let Some(stale) = revalidating {
                // A 304 naming a strong validator other than the stored one updates
                // nothing (4.3.4): this attempt failed.
                let opaque = |v: &HeaderValue| {
                    v.to_str()
                        .map(|t| t.trim().trim_start_matches("W/").to_owned())
                        .ok()
                };
                if let Some(new) = head.headers.get(ETAG) {
                    let old = stale.value.headers.get(ETAG).and_then(opaque);
                    if old.is_none() || opaque(new) != old {
                        return Filled::Failed {
                            own: None,
                            status: 502,
                        };
                    }
                }
                let value = stored::Response {
                    status: stale.value.status,
                    headers: updated_headers(&stale.value.headers, &head.headers),
                    body: stale.value.body.clone(),
                    ext: stored::Ext::default(),
                };
                return match shared.rules.check_response(
                    value.status,
                    &value.headers,
                    per_user,
                    timing,
                ) {
                    Ok(mut fresh) => {
                        // A 304 keeps the entry's tags (the URL's own is added again).
                        fresh.tags = stale
                            .meta
                            .tags
                            .iter()
                            .filter(|t| *t != self.url_tag())
                            .cloned()
                            .collect();
                        self.conclude(value, fresh)
                    }
                    Err(reason) => Filled::Pass {
                        own: Ok(full_response(&value)),
                        reason,
                    },
                };
            }
        }
        let status = head.status.as_u16();
        let mut fresh =
            match shared
                .rules
                .check_response(head.status, &head.headers, per_user, timing)
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
        fresh.tags = tags;
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
        let value = stored::Response {
            status: head.status,
            headers,
            body,
            ext: stored::Ext::default(),
        };
        self.conclude(value, fresh)
    }
}

/// The path of a request not keyed: straight through, and an unsafe method's non-error
/// answer invalidates what is stored for its target (RFC 9111 4.4), fleet-wide.
async fn bypass<S, ReqB, B>(
    shared: Arc<Shared>,
    svc: S,
    req: Request<ReqB>,
    outcome: Outcome,
) -> Result<Response<StampedeBody<B>>, S::Error>
where
    S: Inner<ReqB, B>,
    ReqB: Send + 'static,
    B: HttpBody + Send + 'static,
{
    shared.core.counters.incr(Event::bypassed);
    let unsafe_target = (outcome == Outcome::Method && !is_safe(req.method())).then(|| {
        (
            req.uri().clone(),
            req.headers().get(http::header::HOST).cloned(),
        )
    });
    let res = forward(&shared, svc, req, outcome).await;
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
        Box::pin(invalidate_after_unsafe(&shared, &uri, host, locations)).await;
    }
    res
}

/// The path of a keyed request that memory did not answer: the flight, then the vary
/// index's variant when the primary key holds one.
async fn handle<S, ReqB, B>(
    shared: Arc<Shared>,
    svc: S,
    req: Request<ReqB>,
    keyed: RequestKey,
    ask: Ask,
    peek: Peek<stored::Response>,
) -> Result<Response<StampedeBody<B>>, S::Error>
where
    S: Inner<ReqB, B>,
    ReqB: Send + 'static,
    B: HttpBody + Send + 'static,
{
    let RequestKey { key, per_user } = keyed;
    let arrival = ask.arrival;
    let standards = shared.rules.standards();
    // The request's headers pick its variant once the primary key names the varied ones.
    let varies = standards && shared.rules.max_variants > 0;
    let job = Arc::new(Job::new(svc, req, varies));
    let primary = key.hash.0;
    let fill = HttpFill {
        shared: shared.clone(),
        job: job.clone(),
        per_user,
        variant: None,
    };
    let flown = shared.core.get_at(key, fill, arrival, peek).await;
    let index = match flown {
        Flown::Value(stored, _) if stored.value.is_index() => Some(stored),
        // The hit path: answered here, with nothing boxed, as of its arrival (an answer
        // from memory takes microseconds; one that waited reads the clock again).
        Flown::Value(stored, outcome @ crate::cache::flight::Outcome::HitMemory) => {
            return Ok(shared.respond(&stored, outcome.into(), &ask));
        }
        Flown::Value(stored, outcome) => {
            let ask = Ask {
                now: now_ms(),
                ..ask
            };
            return Ok(shared.respond(&stored, outcome.into(), &ask));
        }
        other => return Box::pin(answer(&shared, other, &job, ask)).await,
    };
    let Some(index) = index.filter(|_| varies) else {
        // A vary index where none was asked for (not the standards mode): bytes not of ours.
        return Ok(shared.error_response(StatusCode::BAD_GATEWAY, Outcome::UpstreamFailed));
    };
    // A vary index: the variant is keyed on the normalized values of the headers it names.
    let names = index_names(&index.value);
    let variant = job.with_headers(|headers| {
        let mut variant = index.key.clone();
        variant.push_str("\nvary");
        for name in &names {
            match rfc::normalized(headers, name) {
                Some(value) => {
                    let _ = write!(variant, "\n{name}:{value}");
                }
                None => {
                    let _ = write!(variant, "\n{name}!");
                }
            }
        }
        variant
    });
    let Some(variant) = variant else {
        return Ok(shared.error_response(StatusCode::BAD_GATEWAY, Outcome::UpstreamFailed));
    };
    let variant = Key::new(variant);
    if !Box::pin(shared.admit_variant(primary, variant.hash.0)).await {
        shared.core.counters.incr(Event::bypassed);
        return Box::pin(answer_own(&shared, &job, Outcome::Bypass("variants"))).await;
    }
    let fill = HttpFill {
        shared: shared.clone(),
        job: job.clone(),
        per_user,
        variant: Some(names),
    };
    let flown = shared.core.get(variant, fill).await;
    Box::pin(answer(&shared, flown, &job, ask)).await
}

/// The header names a vary index holds.
fn index_names(index: &stored::Response) -> Vec<HeaderName> {
    index
        .headers
        .get_all(http::header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect()
}

/// The client's answer from what the flight gave.
async fn answer<S, ReqB, B>(
    shared: &Arc<Shared>,
    flown: Flown<stored::Response, HttpFill<S, ReqB>>,
    job: &Job<S, ReqB>,
    ask: Ask,
) -> Result<Response<StampedeBody<B>>, S::Error>
where
    S: Inner<ReqB, B>,
    ReqB: Send + 'static,
    B: HttpBody + Send + 'static,
{
    let head = ask.head;
    match flown {
        Flown::Value(stored, outcome) => {
            if stored.value.is_index() {
                // A variant key never holds an index: bytes not of ours.
                return Ok(shared.error_response(StatusCode::BAD_GATEWAY, Outcome::UpstreamFailed));
            }
            let ask = Ask {
                now: now_ms(),
                ..ask
            };
            Ok(shared.respond(&stored, outcome.into(), &ask))
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
        Flown::Pass(_) => answer_own(shared, job, Outcome::HitForPass).await,
        Flown::Refused(outcome) => {
            Ok(shared.error_response(StatusCode::SERVICE_UNAVAILABLE, outcome.into()))
        }
    }
}

/// Sends the request straight upstream, or when a fill of it ran already, answers what
/// that fill stashed.
async fn answer_own<S, ReqB, B>(
    shared: &Arc<Shared>,
    job: &Job<S, ReqB>,
    outcome: Outcome,
) -> Result<Response<StampedeBody<B>>, S::Error>
where
    S: Inner<ReqB, B>,
    ReqB: Send + 'static,
    B: HttpBody + Send + 'static,
{
    if let Some((svc, req)) = job.take_call() {
        return forward(shared, svc, req, outcome).await;
    }
    match job.take_stash() {
        Some((value, _)) => Ok(shared.stamp(full_response(&value), outcome)),
        None => Ok(shared.error_response(StatusCode::BAD_GATEWAY, Outcome::UpstreamFailed)),
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
    /// Adds this cache's `Cache-Status` entry after any from upstream caches. In standards
    /// mode the fields targeted at this cache (RFC 9213) go no further.
    pub(crate) fn stamp<B>(&self, res: Response<B>, outcome: Outcome) -> Response<B> {
        self.stamp_with(res, outcome, true)
    }

    /// [`stamp`](Self::stamp), with the targeted fields removed only when `untargeted`
    /// (a stored answer's were left out when its headers were copied).
    fn stamp_with<B>(
        &self,
        mut res: Response<B>,
        outcome: Outcome,
        untargeted: bool,
    ) -> Response<B> {
        if tracing::level_enabled!(tracing::Level::DEBUG) {
            tracing::Span::current().record("outcome", outcome.name());
        }
        let _ = OUTCOME.try_with(|cell| cell.set(Some(outcome)));
        if untargeted {
            self.untarget(res.headers_mut());
        }
        let ours = self.status_values.get(outcome);
        // One lookup: an upstream cache's entry is joined, else ours goes in.
        match res.headers_mut().entry(&CACHE_STATUS) {
            http::header::Entry::Occupied(mut theirs) => {
                let mut joined = theirs.get().as_bytes().to_vec();
                joined.extend_from_slice(b", ");
                joined.extend_from_slice(ours.as_bytes());
                theirs.insert(HeaderValue::from_bytes(&joined).unwrap_or(ours));
            }
            http::header::Entry::Vacant(slot) => {
                slot.insert(ours);
            }
        }
        res
    }

    /// In standards mode, removes the fields targeted at this cache (RFC 9213): they go
    /// no further.
    fn untarget(&self, headers: &mut http::HeaderMap) {
        if self.rules.standards() {
            for name in &self.rules.targeted {
                headers.remove(name);
            }
        }
    }

    pub(crate) fn respond<B>(
        &self,
        stored: &Stored<stored::Response>,
        outcome: Outcome,
        ask: &Ask,
    ) -> Response<StampedeBody<B>> {
        let entry = &stored.value;
        let meta = &stored.meta;
        let mut outcome = outcome;
        if matches!(outcome, Outcome::Stale | Outcome::StaleIfError) {
            if meta.stored_at > ask.arrival {
                // Fetched or validated after this request arrived (an answer stale on
                // arrival, or `no-cache`): it is this request's answer.
                outcome = Outcome::Collapsed;
            } else if entry.ext.rfc
                && ask.now >= meta.fresh_until.saturating_add(entry.ext.stale_ok_ms)
            {
                // Kept only to be revalidated, and the revalidation failed: never served
                // stale (RFC 9111 4.2.4, 5.2.2.2).
                return self.error_response(StatusCode::GATEWAY_TIMEOUT, Outcome::UpstreamFailed);
            }
        }
        if matches!(outcome, Outcome::Stale | Outcome::StaleIfError) {
            self.core.counters.incr(Event::stale_served);
        }
        let mut res = Response::new(StampedeBody::empty());
        // A clone of the stored map (its table copied, nothing rehashed), with room for
        // `Age` and `Cache-Status`, without the targeted fields if it holds one.
        let headers = res.headers_mut();
        *headers = entry.headers.clone();
        // Outside standards mode nothing is targeted: a hit does not look.
        if self.rules.standards()
            && entry
                .headers
                .keys()
                .any(|name| self.rules.targeted.contains(name))
        {
            self.untarget(headers);
        }
        headers.reserve(2);
        *res.status_mut() = entry.status;
        let resident = meta.age_secs(ask.now);
        let age = (u64::from(entry.ext.initial_age) + resident).min(rfc::MAX_DELTA);
        res.headers_mut().insert(AGE, age_value(age));
        match preconditions(entry, ask) {
            Precondition::Failed => {
                *res.status_mut() = StatusCode::PRECONDITION_FAILED;
                res.headers_mut().remove(http::header::CONTENT_LENGTH);
                return self.stamp_with(res, outcome, false);
            }
            Precondition::NotModified => {
                *res.status_mut() = StatusCode::NOT_MODIFIED;
                res.headers_mut().remove(http::header::CONTENT_LENGTH);
                return self.stamp_with(res, outcome, false);
            }
            Precondition::Proceed => {}
        }
        let len = entry.body.len() as u64;
        let range = ask
            .cond
            .range
            .as_ref()
            .filter(|_| entry.status == StatusCode::OK)
            .filter(|_| if_range_holds(entry, ask))
            .and_then(ByteRange::parse);
        let mut body = entry.body.clone();
        if let Some(range) = range {
            match range.span(len) {
                Some((first, last)) => {
                    *res.status_mut() = StatusCode::PARTIAL_CONTENT;
                    body = body.slice(first as usize..=last as usize);
                    if let Ok(v) = HeaderValue::from_str(&format!("bytes {first}-{last}/{len}")) {
                        res.headers_mut().insert(http::header::CONTENT_RANGE, v);
                    }
                }
                None => {
                    *res.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
                    body = Bytes::new();
                    if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                        res.headers_mut().insert(http::header::CONTENT_RANGE, v);
                    }
                }
            }
        }
        if ask.head || range.is_some() {
            res.headers_mut()
                .insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        if !ask.head {
            *res.body_mut() = StampedeBody::full(body);
        }
        self.stamp_with(res, outcome, false)
    }

    /// Admits a variant of a URL, at most `max_variants` per URL on this node.
    async fn admit_variant(&self, primary: [u8; 32], variant: [u8; 32]) -> bool {
        let max = self.rules.max_variants;
        let known = self
            .variants
            .get_with(primary, async { Arc::new(Mutex::new(Vec::new())) })
            .await;
        let mut known = known.lock().unwrap_or_else(|p| p.into_inner());
        if known.contains(&variant) {
            return true;
        }
        if known.len() >= max {
            return false;
        }
        known.push(variant);
        true
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

/// The `Age` value of `secs`: the first minutes from a table of static values, so that a
/// hit does not allocate one.
fn age_value(secs: u64) -> HeaderValue {
    const STATIC_AGES: usize = 1024;
    static AGES: std::sync::OnceLock<Vec<HeaderValue>> = std::sync::OnceLock::new();
    let ages = AGES.get_or_init(|| {
        (0..STATIC_AGES)
            .map(|n| HeaderValue::from_static(Box::leak(n.to_string().into_boxed_str())))
            .collect()
    });
    match ages.get(secs as usize) {
        Some(value) => value.clone(),
        None => HeaderValue::from(secs),
    }
}

/// What the client's preconditions make of a stored answer (RFC 9110 13.2.2).
enum Precondition {
    Proceed,
    NotModified,
    Failed,
}

fn preconditions(entry: &stored::Response, ask: &Ask) -> Precondition {
    // Preconditions apply to what would be a 2xx answer only.
    let cond = &ask.cond;
    if !entry.status.is_success() || cond.is_empty() {
        return Precondition::Proceed;
    }
    let modified = || entry.headers.get(LAST_MODIFIED).and_then(rfc::http_date_ms);
    if let Some(if_match) = &cond.if_match {
        if !etag_matches_strong(if_match, &entry.headers) {
            return Precondition::Failed;
        }
    } else if let Some(since) = cond
        .if_unmodified_since
        .as_ref()
        .and_then(rfc::http_date_ms)
    {
        if modified().is_some_and(|m| m > since) {
            return Precondition::Failed;
        }
    }
    if let Some(inm) = &cond.if_none_match {
        if etag_matches(inm, &entry.headers) {
            return Precondition::NotModified;
        }
    } else if let Some(since) = cond.if_modified_since.as_ref().and_then(rfc::http_date_ms) {
        if modified().is_some_and(|m| m <= since) {
            return Precondition::NotModified;
        }
    }
    Precondition::Proceed
}

/// Whether an `If-Range` (absent, a strong ETag, or the exact `Last-Modified` date) lets
/// the range apply; otherwise the whole answer is sent.
fn if_range_holds(entry: &stored::Response, ask: &Ask) -> bool {
    let Some(if_range) = &ask.cond.if_range else {
        return true;
    };
    let Ok(text) = if_range.to_str() else {
        return false;
    };
    let text = text.trim();
    if text.starts_with('"') {
        return entry
            .headers
            .get(ETAG)
            .and_then(|e| e.to_str().ok())
            .is_some_and(|e| e.trim() == text);
    }
    match (
        rfc::http_date_ms(if_range),
        entry.headers.get(LAST_MODIFIED).and_then(rfc::http_date_ms),
    ) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}
