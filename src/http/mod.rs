//! The HTTP edge: routes, extractors, error mapping, OpenAPI. Only this module (and `main`)
//! knows axum. [`serve`] is the one entry point: `main` and every integration test start the
//! server the same way, with a listener the caller bound and a shutdown future it owns.

pub mod admin;
pub mod admin_client;
pub mod auth;
pub mod error;
mod events;
pub mod extract;
pub mod gorse;
pub mod openapi;
mod routes;
pub mod state;
pub mod stats;
pub mod types;
pub mod ui;

pub use error::{AppError, ErrorBody};
pub use state::{AppState, ServeError};

use crate::config::Settings;
use crate::telemetry;
use axum::extract::MatchedPath;
use axum::extract::{Request, State};
use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use std::future::{Future, IntoFuture};
use std::time::Duration;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

pub(crate) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Builds everything from `settings` (model, index, session store, catalog), then serves on
/// `listener` until `shutdown` completes, finishing the requests in flight.
pub async fn serve(
    listener: tokio::net::TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let state = AppState::build(settings).await?;
    run(listener, state, shutdown).await
}

/// Serves an already built state (the lifecycle code builds it once and keeps a handle).
///
/// Shutdown is bounded: once `shutdown` completes the listener closes at once, requests in
/// flight get `server.shutdown_grace_ms` to finish, and then the server returns anyway (a
/// client that never finishes its body must not block a deploy). The event log needs no
/// separate flush: an event is acknowledged only after its fsync, and dropping the last
/// handle on the store makes its writer finish what is queued.
pub async fn run(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let addr = listener.local_addr().map_err(ServeError::Io)?;
    tracing::info!(%addr, items = state.catalog.len(), "serving");
    let lag_monitor = telemetry::spawn_lag_monitor();
    let flusher = state
        .items
        .journal
        .clone()
        .map(|j| crate::items::load::spawn_flusher(state.index.clone(), j));
    let retrain_schedule = crate::retrain::spawn_scheduler(state.retrain_parts());
    let grace = Duration::from_millis(state.settings.server.shutdown_grace_ms);
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        let _ = stopping_tx.send(());
    };
    // Small responses go out at once rather than wait, under Nagle's algorithm, for the
    // client to acknowledge an earlier segment (axum 0.8's `serve` leaves it on).
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY on an accepted connection");
        }
    });
    let server = axum::serve(listener, router(state.clone()))
        .with_graceful_shutdown(signal)
        .into_future();
    let deadline = async move {
        if stopping_rx.await.is_err() {
            std::future::pending::<()>().await;
        }
        tracing::info!(
            grace_ms = grace.as_millis() as u64,
            "draining requests in flight"
        );
        tokio::time::sleep(grace).await;
    };
    let result = tokio::select! {
        r = server => r.map_err(ServeError::Io),
        _ = deadline => {
            tracing::warn!(
                in_flight = state.settings.server.max_concurrency - state.limiter.available_permits(),
                "shutdown grace period over; closing the remaining connections"
            );
            Ok(())
        }
    };
    lag_monitor.abort();
    if let Some(r) = retrain_schedule {
        r.abort();
    }
    if let Some(f) = flusher {
        f.abort();
    }
    // A clean stop leaves nothing for the next start to replay.
    if let Some(journal) = &state.items.journal {
        if journal.take_unflushed() {
            if let Err(e) = crate::items::load::flush_once(state.index.as_ref(), journal).await {
                tracing::warn!(error = %e, "final flush of buffered item upserts; the next start replays them");
            }
        }
    }
    state.lifecycle.shut_down();
    if let Some(f) = state.follower.lock().take() {
        f.abort();
    }
    // The next start reads the index's RAM copy back from this instead of every payload.
    if let Err(e) = state.index.save_snapshot().await {
        tracing::warn!(error = %e, "saving the index's RAM snapshot; the next start rebuilds it");
    }
    drop(state);
    tracing::info!("server stopped");
    result
}

/// The routes and middleware, for `serve` and for handler tests with `oneshot`.
pub fn router(state: AppState) -> Router {
    telemetry::install_metrics();
    let live = state.stats.clone();
    // Catalog writes need the key (see `auth`); reads of the same paths stay open.
    let catalog_key = axum::middleware::from_fn_with_state(
        auth::CatalogKey::new(state.settings.admin_key.0.as_deref()),
        auth::authorize_catalog_write,
    );
    Router::new()
        .route(
            "/v1/recommendations",
            get(routes::get_recommendations).post(routes::post_recommendations),
        )
        .route(
            "/v1/items",
            post(routes::upsert_items).route_layer(catalog_key.clone()),
        )
        .route(
            "/v1/items/{item_id}",
            get(routes::get_item).merge(
                axum::routing::patch(routes::patch_item)
                    .delete(routes::delete_item)
                    .route_layer(catalog_key),
            ),
        )
        .route("/v1/items/{item_id}/similar", get(routes::similar))
        .route("/v1/events", post(routes::post_events))
        .route("/v1/users/{user_id}/onboarding", post(routes::onboarding))
        .route("/v1/trending", get(routes::trending))
        .route("/v1/categories", get(routes::categories))
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .route("/metrics", get(routes::metrics))
        .route("/openapi.json", get(openapi::serve_openapi))
        .merge(stats::routes(live.clone()))
        .merge(ui::routes())
        .nest("/admin", admin::router(state.clone()))
        // Gorse's REST API, for its published SDKs (see `gorse`).
        .nest("/api", gorse::router(state.clone()))
        // On matched routes only: an unknown path or method keeps its 404 or 405.
        .route_layer(axum::middleware::from_fn(require_json))
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        // Outside the guard: a body is read before its request takes a slot.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            read_body_first,
        ))
        .layer(axum::middleware::from_fn(observe))
        // Outside the guard, so that a 429 or a 503 counts in the live figures too.
        .layer(axum::middleware::from_fn_with_state(live, stats::track))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        // Outermost: an unfit client id is dropped before one is set, so a new one replaces it.
        .layer(axum::middleware::from_fn(drop_unfit_request_id))
        .with_state(state)
}

/// The public API's bodies are JSON, and only JSON: a `POST`, `PUT` or `PATCH` under `/v1/`
/// (or Gorse's `/api/`) without `Content-Type: application/json` gets 415. A browser sends a
/// cross-site form or `text/plain` post without a CORS preflight, so accepting any type would
/// let any web page make its visitors' browsers write to tandem.
async fn require_json(req: Request, next: Next) -> Response {
    use axum::http::Method;
    let has_body = matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH);
    let public = req.uri().path().starts_with("/v1/") || req.uri().path().starts_with("/api/");
    if has_body && public && !is_json(req.headers()) {
        return AppError::UnsupportedMediaType.into_response();
    }
    next.run(req).await
}

fn is_json(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

/// Longest client `x-request-id` kept.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// A client's `x-request-id` is echoed, logged on every line of the request, and with an
/// experiment on kept as a store key for a day: one longer than [`MAX_REQUEST_ID_LEN`] or with
/// anything but printable ASCII is removed, and the server sets a new UUID in its place.
async fn drop_unfit_request_id(mut req: Request, next: Next) -> Response {
    let unfit = req.headers().get_all(REQUEST_ID).iter().any(|v| {
        v.is_empty()
            || v.len() > MAX_REQUEST_ID_LEN
            || !v.as_bytes().iter().all(u8::is_ascii_graphic)
    }) || req.headers().get_all(REQUEST_ID).iter().count() > 1;
    if unfit {
        req.headers_mut().remove(REQUEST_ID);
    }
    next.run(req).await
}

/// A request's body is read whole before the request takes one of the `max_concurrency`
/// slots, within `server.body_timeout_ms` (408 past it) and `server.max_body_bytes` (413):
/// a client that sends its headers and then trickles its body costs a connection for that
/// long, never a slot, so a few hundred of them cannot make everyone else get 429.
async fn read_body_first(State(s): State<AppState>, req: Request, next: Next) -> Response {
    use axum::http::Method;
    if !matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH) {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let ms = s.settings.server.body_timeout_ms;
    let read = extract::read_bytes(&parts.headers, body, s.settings.server.max_body_bytes);
    match tokio::time::timeout(Duration::from_millis(ms), read).await {
        Ok(Ok(bytes)) => next.run(Request::from_parts(parts, bytes.into())).await,
        Ok(Err(e)) => {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                telemetry::record_rejection(telemetry::Rejection::BodyTooLarge);
            }
            e.into_response()
        }
        Err(_) => {
            telemetry::record_rejection(telemetry::Rejection::BodyTimeout);
            let mut r = AppError::BodyTimeout { ms }.into_response();
            // The rest of the body may still be on its way: do not read it, close.
            r.headers_mut().insert(
                axum::http::header::CONNECTION,
                HeaderValue::from_static("close"),
            );
            r
        }
    }
}

/// Overload and slowness get clear statuses: past `max_concurrency` requests in flight the
/// next one gets 429 at once (queueing would only move the wait into the client's timeout),
/// and a request past its budget gets 503. Both, and every 503 a handler returns (a store
/// that is down), carry `Retry-After`, which is what clients' retry logic reads.
///
/// Health, readiness and metrics bypass the limit: an orchestrator that saw a busy replica
/// fail its liveness probe would restart it, turning overload into an outage.
async fn guard(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let retry_after = s.settings.server.retry_after_secs;
    if matches!(req.uri().path(), "/healthz" | "/readyz" | "/metrics") {
        return next.run(req).await;
    }
    let Ok(_permit) = s.limiter.clone().try_acquire_owned() else {
        telemetry::record_rejection(telemetry::Rejection::Overload);
        return with_retry_after(AppError::Overloaded.into_response(), retry_after);
    };
    let ms = s.settings.server.request_timeout_ms;
    let response = match tokio::time::timeout(Duration::from_millis(ms), next.run(req)).await {
        Ok(r) => r,
        Err(_) => {
            telemetry::record_rejection(telemetry::Rejection::Timeout);
            AppError::Timeout { ms }.into_response()
        }
    };
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
        telemetry::record_rejection(telemetry::Rejection::BodyTooLarge);
    }
    with_retry_after(response, retry_after)
}

fn with_retry_after(mut response: Response, secs: u64) -> Response {
    let status = response.status();
    if (status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE)
        && !response.headers().contains_key(RETRY_AFTER)
    {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

/// Counts and times every request by its route template (never the raw path: item ids would
/// explode the label space), method and final status, 429s included.
async fn observe(req: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = req.method().clone();
    let response = next.run(req).await;
    telemetry::record_request(
        &route,
        method.as_str(),
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

/// The span every request runs in: its id is on every log line written while serving it.
fn request_span(req: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    let request_id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    tracing::info_span!(
        "request",
        request_id,
        method = %req.method(),
        path = %req.uri().path(),
    )
}

async fn no_route(req: Request) -> AppError {
    AppError::NoRoute {
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
    }
}

async fn method_not_allowed(req: Request) -> AppError {
    AppError::MethodNotAllowed {
        method: req.method().to_string(),
    }
}
