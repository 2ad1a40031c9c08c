//! The fill: contend for the key, call the inner service once, store, release, wake.
//! It runs in its own task, so the request that started it may go away.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tower_service::Service;

use crate::body::StampedeBody;
use crate::bounds::{HttpBody, Inner};
use crate::envelope::{now_ms, Entry, Kind};
use crate::key::Key;
use crate::layer::Shared;
use crate::lock::{jittered, new_token};
use crate::policy::{FailurePolicy, Freshness, Reason};
use crate::stats::Event;
use crate::status::Outcome;
use crate::store::{Check, RedisStore};
use crate::BoxError;

/// What a fill hands back to the request that started it.
pub(crate) enum Filled<B, E> {
    /// A usable entry (already in L1): fresh, or a stale copy served by a grace window.
    Entry(Arc<Entry>, Outcome),
    /// The answer could not be stored: the leader's own answer, streamed.
    Pass(Result<Response<StampedeBody<B>>, E>, Outcome),
    /// The upstream answered an error (5xx or 429) that is not stored: the leader gets it
    /// streamed, the requests waiting on this attempt get its status.
    Error(Response<StampedeBody<B>>, StatusCode),
    /// The inner call failed (its error, if it returned one), panicked or timed out; or,
    /// for a request that waited on another node, that node's attempt failed. The status
    /// is what the callers that get no error are answered: 502, or 504 for a timeout.
    Failed(Option<E>, StatusCode),
    /// A fail-closed policy refused the request.
    Refused(Outcome),
}

/// Which lock the fill holds while it calls the inner service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Held {
    Redis,
    Local,
    /// No lock: Redis is failing (`store == false`), or the wait or the check timed out
    /// (`store == true`: the answer is still offered to Redis, over nothing newer).
    Nothing {
        store: bool,
    },
}

enum Contend {
    Found(Arc<Entry>, Outcome),
    /// A stale copy inside its stale-while-revalidate window.
    Stale(Arc<Entry>),
    Pass,
    Lead(Held),
    Refuse(Outcome),
    /// The attempt this request waited on (on another node) failed with this status.
    Failed(StatusCode),
}

/// The inner call's result, before storing.
enum Led<B, E> {
    Cacheable {
        head: http::response::Parts,
        body: Bytes,
        fresh: Freshness,
    },
    Uncacheable(Response<StampedeBody<B>>, Reason),
    Failed(Option<E>, StatusCode),
}

impl<B, E> Led<B, E> {
    /// The upstream answered 5xx.
    fn is_server_error(&self) -> bool {
        self.status().is_some_and(|s| s.is_server_error())
    }

    /// The status the upstream answered, if it answered.
    fn status(&self) -> Option<StatusCode> {
        match self {
            Led::Cacheable { head, .. } => Some(head.status),
            Led::Uncacheable(res, _) => Some(res.status()),
            Led::Failed(..) => None,
        }
    }
}

/// A copy to serve if the upstream fails: the newest usable one.
fn keep_newest(fallback: &mut Option<Arc<Entry>>, candidate: Arc<Entry>) {
    if fallback
        .as_ref()
        .is_none_or(|f| f.stored_at < candidate.stored_at)
    {
        *fallback = Some(candidate);
    }
}

fn usable(fallback: Option<Arc<Entry>>) -> Option<Arc<Entry>> {
    fallback.filter(|f| f.is_usable_at(now_ms()))
}

/// Hands the fill's result to the request that started it. The entry goes into L1 here
/// only when that request has gone away: otherwise moka's flight inserts it.
async fn hand<B, E>(
    shared: &Shared,
    key: &Key,
    reply: oneshot::Sender<Filled<B, E>>,
    filled: Filled<B, E>,
) {
    if let Err(Filled::Entry(entry, _)) = reply.send(filled) {
        shared.l1.insert(key.hash, entry).await;
    }
}

/// The fill of one key: its result goes to `reply` as soon as it is known, and the Redis
/// write (store, release, wake-up) follows, off the answer's path.
pub(crate) async fn fill<S, ReqB, B>(
    shared: Arc<Shared>,
    key: Arc<Key>,
    req: Request<ReqB>,
    svc: S,
    mut fallback: Option<Arc<Entry>>,
    reply: oneshot::Sender<Filled<B, S::Error>>,
) where
    S: Inner<ReqB, B>,
    ReqB: Send + 'static,
    B: HttpBody + Send + 'static,
{
    let token = new_token();
    let contend = match &shared.redis {
        Some(store) => contend_redis(&shared, store, &key, &token, &mut fallback).await,
        None => contend_local(&shared, &key, &token).await,
    };
    let held = match contend {
        Contend::Found(entry, outcome) => {
            return hand(&shared, &key, reply, Filled::Entry(entry, outcome)).await
        }
        Contend::Stale(entry) => {
            spawn_refresh(&shared, key.clone(), req, svc, entry.clone());
            return hand(&shared, &key, reply, Filled::Entry(entry, Outcome::Stale)).await;
        }
        Contend::Pass => {
            shared.mark_pass(key.hash).await;
            shared.counters.incr(Event::hit_for_pass);
            let mut svc = svc;
            let res = svc.call(req).await.map(|r| r.map(StampedeBody::stream));
            return hand(&shared, &key, reply, Filled::Pass(res, Outcome::HitForPass)).await;
        }
        Contend::Refuse(outcome) => {
            return hand(&shared, &key, reply, Filled::Refused(outcome)).await
        }
        Contend::Failed(status) => {
            shared.counters.incr(Event::upstream_failures);
            let filled = match usable(fallback) {
                Some(stale) => Filled::Entry(stale, Outcome::StaleIfError),
                None => Filled::Failed(None, status),
            };
            return hand(&shared, &key, reply, filled).await;
        }
        Contend::Lead(held) => held,
    };

    let (led, lost, fill_ms) = lead(&shared, &key, &token, held, svc, req).await;
    if led.is_server_error() {
        shared.counters.incr(Event::upstream_failures);
        if let Some(stale) = usable(fallback.clone()) {
            hand(
                &shared,
                &key,
                reply,
                Filled::Entry(stale, Outcome::StaleIfError),
            )
            .await;
            let status = led.status().unwrap_or(StatusCode::BAD_GATEWAY);
            return fail(&shared, &key, &token, held, status).await;
        }
    }
    match led {
        Led::Cacheable { head, body, fresh } => {
            let entry = entry_of(&shared, &key, head, body, fresh, fill_ms);
            hand(
                &shared,
                &key,
                reply,
                Filled::Entry(entry.clone(), Outcome::Stored),
            )
            .await;
            let ttl = entry.time_to_live(now_ms());
            finish(&shared, &key, &token, held, lost, Some((&entry, ttl))).await;
        }
        Led::Uncacheable(res, reason) if crate::wake::is_shared_error(res.status()) => {
            // Not stored, and no hit-for-pass either: a failing upstream stays coalesced.
            // The waiters of this attempt, here and on other nodes, get its status.
            tracing::debug!(key = %key.short(), reason, status = %res.status(), "upstream error not stored");
            shared.counters.incr(Event::uncacheable);
            let status = res.status();
            fail(&shared, &key, &token, held, status).await;
            hand(&shared, &key, reply, Filled::Error(res, status)).await;
        }
        Led::Uncacheable(res, reason) => {
            tracing::debug!(key = %key.short(), reason, "answer not stored; hit-for-pass");
            shared.counters.incr(Event::uncacheable);
            shared.mark_pass(key.hash).await;
            let status = res.status();
            hand(
                &shared,
                &key,
                reply,
                Filled::Pass(Ok(res), Outcome::Uncacheable),
            )
            .await;
            let marker = (!shared.cfg.hit_for_pass.is_zero()).then(|| {
                let now = now_ms();
                let until = now + shared.cfg.hit_for_pass.as_millis() as u64;
                Entry {
                    kind: Kind::Pass,
                    key: key.canonical.clone(),
                    status,
                    headers: Default::default(),
                    body: Bytes::new(),
                    stored_at: now,
                    fresh_until: until,
                    revalidate_until: until,
                    stale_until: until,
                    fill_ms,
                }
            });
            let marker = marker.as_ref().map(|m| (m, shared.cfg.hit_for_pass));
            finish(&shared, &key, &token, held, lost, marker).await;
        }
        Led::Failed(err, status) => {
            shared.counters.incr(Event::upstream_failures);
            let filled = match usable(fallback) {
                Some(stale) => Filled::Entry(stale, Outcome::StaleIfError),
                None => Filled::Failed(err, status),
            };
            // This process's followers share the outcome through the flight; the fleet's
            // waiters through the wake-up and a short failure marker, so that nobody
            // starts a second attempt on behalf of this one. Released first: the next
            // request, from anywhere, starts a fresh attempt.
            fail(&shared, &key, &token, held, status).await;
            hand(&shared, &key, reply, filled).await;
        }
    }
}

/// Refreshes `current` in the background, at most once at a time per key in this
/// process and, through the lock, once in the fleet. Used by stale-while-revalidate and
/// by early refresh; the request that triggered it has already been answered.
pub(crate) fn spawn_refresh<S, ReqB, B>(
    shared: &Arc<Shared>,
    key: Arc<Key>,
    req: Request<ReqB>,
    svc: S,
    current: Arc<Entry>,
) where
    S: Inner<ReqB, B>,
    ReqB: Send + 'static,
    B: HttpBody + Send + 'static,
{
    if shared.refreshing.contains_key(&key.hash) {
        return;
    }
    // The refresh may land on another node: hear about it.
    shared.ensure_subscriber();
    let shared = shared.clone();
    tokio::spawn(async move {
        if !shared
            .refreshing
            .entry(key.hash)
            .or_insert(())
            .await
            .is_fresh()
        {
            return;
        }
        if refresh(&shared, &key, req, svc, &current).await {
            shared.refreshing.invalidate(&key.hash).await;
        }
        // Otherwise the marker stays until it expires or a wake-up for the key arrives:
        // a failing upstream is retried after a pause, not on every request.
    });
}

/// Returns true when the key needs no further refresh for now.
async fn refresh<S, ReqB, B>(
    shared: &Shared,
    key: &Key,
    req: Request<ReqB>,
    svc: S,
    current: &Entry,
) -> bool
where
    S: Service<Request<ReqB>, Response = Response<B>>,
    B: HttpBody,
{
    let token = new_token();
    let held = match &shared.redis {
        Some(store) => {
            // Another node may have refreshed already: adopt its newer value.
            let mut skip_value = false;
            loop {
                match store
                    .check_and_lock(key, &token, shared.cfg.lease, skip_value)
                    .await
                {
                    Ok(Check::Value(bytes)) => {
                        if let Ok(entry) = Entry::decode(bytes, &key.canonical) {
                            if entry.kind == Kind::Response
                                && entry.stored_at > current.stored_at
                                && entry.is_fresh_at(now_ms())
                            {
                                shared.l1.insert(key.hash, Arc::new(entry)).await;
                                return true;
                            }
                        }
                        if skip_value {
                            return false;
                        }
                        skip_value = true;
                    }
                    Ok(Check::Locked) => {
                        shared.counters.incr(Event::lock_acquired);
                        break Held::Redis;
                    }
                    Ok(Check::Held(..)) => return false,
                    Err(e) => {
                        shared.counters.incr(Event::redis_errors);
                        tracing::debug!(key = %key.short(), error = %e, "redis unavailable for a refresh");
                        match shared.cfg.on_redis_error {
                            FailurePolicy::Open => break Held::Nothing { store: false },
                            FailurePolicy::Closed => return false,
                        }
                    }
                }
            }
        }
        None => match shared
            .local_locks
            .try_lock(key.hash, &token, shared.cfg.lease)
        {
            None => Held::Local,
            Some(_) => return false,
        },
    };
    shared.counters.incr(Event::refreshes);
    let (led, lost, fill_ms) = lead(shared, key, &token, held, svc, req).await;
    if led.is_server_error() {
        // Keep the copy we have; try again after the back-off.
        shared.counters.incr(Event::upstream_failures);
        finish(shared, key, &token, held, lost, None).await;
        return false;
    }
    match led {
        Led::Cacheable { head, body, fresh } => {
            let entry = entry_of(shared, key, head, body, fresh, fill_ms);
            shared.l1.insert(key.hash, entry.clone()).await;
            let ttl = entry.time_to_live(now_ms());
            finish(shared, key, &token, held, lost, Some((&entry, ttl))).await;
            true
        }
        Led::Uncacheable(res, reason) if !res.status().is_server_error() => {
            // The resource became uncacheable: drop the copy; the next request learns why.
            tracing::debug!(key = %key.short(), reason, "refresh answer not storable; dropping the copy");
            finish(shared, key, &token, held, lost, None).await;
            shared.l1.invalidate(&key.hash).await;
            true
        }
        Led::Uncacheable(..) | Led::Failed(..) => {
            if matches!(led, Led::Failed(..)) {
                shared.counters.incr(Event::upstream_failures);
            }
            finish(shared, key, &token, held, lost, None).await;
            false
        }
    }
}

/// Calls the inner service under the lock held: counts it, times it, guards it.
async fn lead<S, ReqB, B>(
    shared: &Shared,
    key: &Key,
    token: &str,
    held: Held,
    svc: S,
    req: Request<ReqB>,
) -> (Led<B, S::Error>, bool, u32)
where
    S: Service<Request<ReqB>, Response = Response<B>>,
    B: HttpBody,
{
    shared.counters.incr(Event::upstream_calls);
    let _timer = crate::stats::FillTimer::start(&shared.counters);
    // The entry answers GET and HEAD alike: fill it with the whole answer.
    let mut req = req;
    if req.method() == http::Method::HEAD {
        *req.method_mut() = http::Method::GET;
    }
    let started = Instant::now();
    let (led, lost) = guarded(
        shared,
        key,
        token,
        held,
        call_inner(shared, key.per_user, svc, req),
    )
    .await;
    let fill_ms = started.elapsed().as_millis().min(u32::MAX as u128) as u32;
    (led, lost, fill_ms)
}

/// Builds the entry of a storable answer in allocations of its own: header values cut
/// from the connection's read buffer would otherwise pin that whole buffer (8 KiB or more)
/// for as long as the entry lives.
fn entry_of(
    shared: &Shared,
    key: &Key,
    head: http::response::Parts,
    body: Bytes,
    fresh: Freshness,
    fill_ms: u32,
) -> Arc<Entry> {
    let now = now_ms();
    let fresh_until = now + fresh.ttl.as_millis() as u64;
    let headers = head
        .headers
        .iter()
        .map(|(name, value)| {
            let mut compact =
                http::HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
            compact.set_sensitive(value.is_sensitive());
            (name.clone(), compact)
        })
        .collect();
    shared.counters.incr(Event::stored);
    Arc::new(Entry {
        kind: Kind::Response,
        key: key.canonical.clone(),
        status: head.status,
        headers,
        body,
        stored_at: now,
        fresh_until,
        revalidate_until: fresh_until + fresh.grace.as_millis() as u64,
        stale_until: fresh_until + fresh.grace.max(fresh.stale_if_error).as_millis() as u64,
        fill_ms,
    })
}

/// Waits for the key in Redis: a value, the lock, or a policy decision.
async fn contend_redis(
    shared: &Arc<Shared>,
    store: &RedisStore,
    key: &Key,
    token: &str,
    fallback: &mut Option<Arc<Entry>>,
) -> Contend {
    let cfg = &shared.cfg;
    let started = Instant::now();
    let waiting = shared.wakers.register(key.hash);
    let mut wait = crate::stats::LockWait::new(&shared.counters);
    let mut waited = false;
    let mut skip_value = false;
    // The holder token last seen on the lock, and since when.
    let mut holder_seen: Option<(Bytes, Instant)> = None;
    loop {
        let notified = waiting.notify().notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        match store
            .check_and_lock(key, token, cfg.lease, skip_value)
            .await
        {
            Ok(Check::Value(bytes)) => match judge(bytes, key, waited, fallback) {
                Some(decided) => return decided.counted(shared),
                None => skip_value = true,
            },
            Ok(Check::Locked) => {
                // The lock is free after a wait: if the attempt waited on failed and its
                // wake-up was lost, its failure marker is the answer, not a new attempt.
                if let Some((holder, _)) = &holder_seen {
                    if let Ok(Some(status)) = store.failure_of(key, holder).await {
                        if let Err(e) = store.release_publish(key, token).await {
                            tracing::debug!(key = %key.short(), error = %e, "release after a failure marker failed");
                        }
                        return Contend::Failed(status);
                    }
                }
                shared.counters.incr(Event::lock_acquired);
                return Contend::Lead(Held::Redis);
            }
            Ok(Check::Held(pttl, holder)) => {
                skip_value = false;
                if !waited {
                    waited = true;
                    shared.counters.incr(Event::lock_waited);
                    wait.waiting();
                }
                let elapsed = started.elapsed();
                if elapsed >= cfg.lock_wait {
                    shared.counters.incr(Event::lock_timed_out);
                    return match cfg.on_lock_timeout {
                        FailurePolicy::Open => Contend::Lead(Held::Nothing { store: true }),
                        FailurePolicy::Closed => Contend::Refuse(Outcome::LockTimeout),
                    };
                }
                let since = match &holder_seen {
                    Some((seen, since)) if *seen == holder => *since,
                    _ => holder_seen.insert((holder.clone(), Instant::now())).1,
                };
                // Our holders extend to the lease every third of it: a lock without expiry
                // or with a longer TTL is none of theirs. Once this waiter has seen the
                // same holder for a lease, it takes the lock over and leads.
                if pttl > cfg.lease && since.elapsed() >= cfg.lease {
                    match store.take_over(key, &holder, token, cfg.lease).await {
                        Ok(true) => {
                            tracing::warn!(key = %key.short(), "took over a lock without a sane expiry");
                            shared.counters.incr(Event::lock_acquired);
                            return Contend::Lead(Held::Redis);
                        }
                        // The lock changed meanwhile: look again.
                        Ok(false) => {
                            holder_seen = None;
                            continue;
                        }
                        Err(e) => return redis_failed(shared, key, e),
                    }
                }
                // Never a tight loop, whatever the lock's TTL says.
                let pause = jittered(cfg.poll_interval, cfg.poll_interval / 2)
                    .min(pttl.saturating_add(Duration::from_millis(1)))
                    .max(cfg.poll_interval / 2)
                    .min(cfg.lock_wait - elapsed);
                let woken = tokio::select! {
                    _ = &mut notified => true,
                    _ = tokio::time::sleep(pause) => false,
                };
                // A wake-up that carries the value saves the read; one that says the
                // attempt failed is that attempt's answer for this request too.
                if let Some(bytes) = woken.then(|| waiting.value()).flatten() {
                    if let Some(status) = crate::wake::failure_status(&bytes) {
                        return Contend::Failed(status);
                    }
                    if let Some(decided) = judge(bytes, key, true, fallback) {
                        return decided.counted(shared);
                    }
                }
            }
            Err(e) => return redis_failed(shared, key, e),
        }
    }
}

/// What a fill does when Redis fails under it: the Redis error policy.
fn redis_failed(shared: &Shared, key: &Key, e: crate::conn::BackendError) -> Contend {
    shared.counters.incr(Event::redis_errors);
    tracing::debug!(key = %key.short(), error = %e, "redis unavailable for the fill");
    // A check that timed out may still run later and take the lock: offer the answer,
    // which releases that lock too (same connection, so after it).
    let store = e.is_timeout();
    match shared.cfg.on_redis_error {
        FailurePolicy::Open => Contend::Lead(Held::Nothing { store }),
        FailurePolicy::Closed => Contend::Refuse(Outcome::RedisUnavailable),
    }
}

/// What stored bytes mean for a fill: `None` when they are unusable (corrupt, foreign,
/// expired): a miss. A usable-on-error copy is kept as the fallback.
fn judge(
    bytes: Bytes,
    key: &Key,
    waited: bool,
    fallback: &mut Option<Arc<Entry>>,
) -> Option<Contend> {
    let entry = match Entry::decode(bytes, &key.canonical) {
        Ok(entry) => entry,
        Err(e) => {
            tracing::debug!(key = %key.short(), error = %e, "unusable bytes in redis; treating as a miss");
            return None;
        }
    };
    let now = now_ms();
    match entry.kind {
        Kind::Pass if entry.is_fresh_at(now) => Some(Contend::Pass),
        Kind::Response if entry.is_fresh_at(now) => {
            let outcome = if waited {
                Outcome::CollapsedFleet
            } else {
                Outcome::HitRedis
            };
            Some(Contend::Found(Arc::new(entry), outcome))
        }
        Kind::Response if entry.is_revalidatable_at(now) => Some(Contend::Stale(Arc::new(entry))),
        Kind::Response if entry.is_usable_at(now) => {
            keep_newest(fallback, Arc::new(entry));
            None
        }
        _ => None,
    }
}

impl Contend {
    /// Counts a value found in Redis.
    fn counted(self, shared: &Shared) -> Contend {
        if let Contend::Found(_, outcome) = &self {
            shared.counters.incr(match outcome {
                Outcome::CollapsedFleet => Event::collapsed_remote,
                _ => Event::hits_redis,
            });
        }
        self
    }
}

/// The local backend's contention: only a second fill of this process can hold the lock.
async fn contend_local(shared: &Arc<Shared>, key: &Key, token: &str) -> Contend {
    let waiting = shared.wakers.register(key.hash);
    loop {
        let notified = waiting.notify().notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(entry) = shared.l1.get(&key.hash).await {
            let now = now_ms();
            if entry.is_fresh_at(now) {
                shared.counters.incr(Event::collapsed_local);
                return Contend::Found(entry, Outcome::Collapsed);
            }
            if entry.is_revalidatable_at(now) {
                return Contend::Stale(entry);
            }
        }
        match shared
            .local_locks
            .try_lock(key.hash, token, shared.cfg.lease)
        {
            None => return Contend::Lead(Held::Local),
            Some(left) => {
                tokio::select! {
                    _ = &mut notified => {}
                    _ = tokio::time::sleep(left) => {}
                }
            }
        }
    }
}

/// Calls the inner service once and buffers a storable body up to the limit.
async fn call_inner<S, ReqB, B>(
    shared: &Shared,
    per_user: bool,
    mut svc: S,
    req: Request<ReqB>,
) -> Led<B, S::Error>
where
    S: Service<Request<ReqB>, Response = Response<B>>,
    B: HttpBody,
{
    let res = match svc.call(req).await {
        Ok(res) => res,
        Err(e) => return Led::Failed(Some(e), StatusCode::BAD_GATEWAY),
    };
    let (head, body) = res.into_parts();
    let fresh = match shared
        .rules
        .check_response(head.status, &head.headers, per_user)
    {
        Ok(fresh) => fresh,
        Err(reason) => {
            return Led::Uncacheable(
                Response::from_parts(head, StampedeBody::stream(body)),
                reason,
            )
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
                return Led::Failed(None, StatusCode::BAD_GATEWAY);
            }
            Some(Ok(frame)) => {
                let trailers = frame.is_trailers();
                size += frame.data_ref().map_or(0, Bytes::len);
                frames.push_back(frame);
                if trailers {
                    return Led::Uncacheable(
                        Response::from_parts(head, StampedeBody::resume(frames, body)),
                        "trailers",
                    );
                }
                too_big = size > max;
            }
        }
    }
    if too_big {
        return Led::Uncacheable(
            Response::from_parts(head, StampedeBody::resume(frames, body)),
            "too-big",
        );
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
    Led::Cacheable { head, body, fresh }
}

/// Runs the inner call under the upstream timeout, catching panics, and extends the
/// lease every third of it. Returns the result and whether the lease was lost.
async fn guarded<B, E>(
    shared: &Shared,
    key: &Key,
    token: &str,
    held: Held,
    call: impl std::future::Future<Output = Led<B, E>>,
) -> (Led<B, E>, bool) {
    let call = AssertUnwindSafe(call).catch_unwind();
    tokio::pin!(call);
    let deadline = tokio::time::sleep(shared.cfg.upstream_timeout);
    tokio::pin!(deadline);
    let period = (shared.cfg.lease / 3).max(Duration::from_millis(1));
    let mut tick = tokio::time::interval_at(Instant::now() + period, period);
    let extending = matches!(held, Held::Redis | Held::Local);
    let mut lost = false;
    loop {
        tokio::select! {
            out = &mut call => {
                let led = out.unwrap_or_else(|_| {
                    tracing::error!(key = %key.short(), "inner service panicked during a fill");
                    Led::Failed(None, StatusCode::BAD_GATEWAY)
                });
                return (led, lost);
            }
            _ = &mut deadline => {
                tracing::warn!(key = %key.short(), timeout = ?shared.cfg.upstream_timeout, "inner call timed out");
                return (Led::Failed(None, StatusCode::GATEWAY_TIMEOUT), lost);
            }
            _ = tick.tick(), if extending && !lost => {
                let kept = match (held, &shared.redis) {
                    (Held::Redis, Some(store)) => match store.extend(key, token, shared.cfg.lease).await {
                        Ok(kept) => kept,
                        Err(e) => {
                            shared.counters.incr(Event::redis_errors);
                            tracing::debug!(error = %e, "lease extension failed; retrying next tick");
                            true
                        }
                    },
                    _ => shared.local_locks.extend(key.hash, token, shared.cfg.lease),
                };
                if !kept {
                    lost = true;
                    shared.counters.incr(Event::lock_lost);
                    tracing::warn!(key = %key.short(), "lock lost while the inner call ran");
                }
            }
        }
    }
}

/// Stores (if there is something to store), releases and wakes the waiters.
async fn finish(
    shared: &Shared,
    key: &Key,
    token: &str,
    held: Held,
    lost: bool,
    store: Option<(&Entry, Duration)>,
) {
    match (held, &shared.redis) {
        (Held::Redis | Held::Nothing { store: true }, Some(redis)) => {
            let result = match store {
                Some((entry, ttl)) => redis.store_release(key, token, &entry.encode(), ttl).await,
                None => redis.release_publish(key, token).await,
            };
            match result {
                Ok(false) if held == Held::Redis && !lost => {
                    shared.counters.incr(Event::lock_lost);
                    tracing::warn!(key = %key.short(), "lock had expired when the fill finished");
                }
                Ok(_) => {}
                Err(e) => {
                    shared.counters.incr(Event::redis_errors);
                    tracing::debug!(key = %key.short(), error = %e, "store/release failed; the lease will expire");
                }
            }
        }
        (Held::Local, _) => {
            shared.local_locks.release(key.hash, token);
            shared.wakers.wake(&key.hash, None);
        }
        _ => {}
    }
}

/// Ends a failed fill: the lock is released and the fleet's waiters are told, by the
/// wake-up and by a failure marker that outlives it briefly (for waiters whose wake-up was
/// lost), that this attempt failed; they answer with its outcome instead of retrying.
async fn fail(shared: &Shared, key: &Key, token: &str, held: Held, status: StatusCode) {
    match (held, &shared.redis) {
        (Held::Redis, Some(redis)) => {
            let marker_ttl = shared
                .cfg
                .upstream_timeout
                .min(crate::wake::FAILURE_MARKER_MAX);
            if let Err(e) = redis.fail_release(key, token, status, marker_ttl).await {
                shared.counters.incr(Event::redis_errors);
                tracing::debug!(key = %key.short(), error = %e, "failure release failed; the lease will expire");
            }
        }
        (Held::Nothing { store: true }, Some(_)) | (Held::Local, _) => {
            finish(shared, key, token, held, false, None).await;
        }
        _ => {}
    }
}
