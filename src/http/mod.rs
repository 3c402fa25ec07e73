//! The HTTP edge: routes, extractors, error mapping, OpenAPI. Only this module (and `main`)
//! knows axum. [`serve`] is the one entry point: `main` and every integration test start the
//! server the same way, with a listener the caller bound and a shutdown future it owns.

pub mod admin;
pub mod admin_client;
pub mod error;
mod events;
pub mod extract;
pub mod openapi;
mod routes;
pub mod state;
pub mod stats;
pub mod types;
pub mod ui;

pub use error::{AppError, ErrorBody};
pub use state::{AppState, ServeError};

use crate::config::Settings;
use axum::extract::{Request, State};
use axum::http::HeaderName;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::future::Future;
use std::sync::OnceLock;
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
pub async fn run(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let addr = listener.local_addr().map_err(ServeError::Io)?;
    tracing::info!(%addr, items = state.catalog.len(), "serving");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(ServeError::Io)
}

/// The routes and middleware, for `serve` and for handler tests with `oneshot`.
pub fn router(state: AppState) -> Router {
    install_metrics();
    let live = state.stats.clone();
    Router::new()
        .route(
            "/v1/recommendations",
            get(routes::get_recommendations).post(routes::post_recommendations),
        )
        .route("/v1/items", post(routes::upsert_items))
        .route(
            "/v1/items/{item_id}",
            get(routes::get_item)
                .patch(routes::patch_item)
                .delete(routes::delete_item),
        )
        .route("/v1/items/{item_id}/similar", get(routes::similar))
        .route("/v1/events", post(routes::post_events))
        .route("/v1/users/{user_id}/onboarding", post(routes::onboarding))
        .route("/v1/trending", get(routes::trending))
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .route("/metrics", get(routes::metrics))
        .route("/openapi.json", get(openapi::serve_openapi))
        .merge(stats::routes(live.clone()))
        .merge(ui::routes())
        .nest(
            "/admin",
            admin::router(admin::AdminState::new(
                state.lifecycle.clone(),
                state.experiments.clone(),
                state.settings.admin_key.0.as_deref(),
            )),
        )
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        // Outside the guard, so that a 429 or a 503 counts in the live figures too.
        .layer(axum::middleware::from_fn_with_state(live, stats::track))
        .layer(TraceLayer::new_for_http())
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .with_state(state)
}

/// Overload and slowness get clear statuses: past `max_concurrency` requests in flight the
/// next one gets 429 at once (queueing would only move the wait into the client's timeout),
/// and a request past its budget gets 503.
async fn guard(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let Ok(_permit) = s.limiter.clone().try_acquire_owned() else {
        return AppError::Overloaded.into_response();
    };
    let ms = s.settings.server.request_timeout_ms;
    match tokio::time::timeout(Duration::from_millis(ms), next.run(req)).await {
        Ok(r) => r,
        Err(_) => AppError::Timeout { ms }.into_response(),
    }
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

static METRICS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder once per process (tests start many servers in one).
fn install_metrics() {
    METRICS.get_or_init(|| match PrometheusBuilder::new().install_recorder() {
        Ok(h) => {
            // Summaries keep samples until upkeep drains them; without it memory grows.
            let upkeep = h.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(Duration::from_secs(5));
                    upkeep.run_upkeep();
                })
                .ok();
            Some(h)
        }
        Err(e) => {
            tracing::warn!(error = %e, "metrics recorder not installed");
            None
        }
    });
}

pub(crate) fn metrics_handle() -> Option<&'static PrometheusHandle> {
    METRICS.get().and_then(Option::as_ref)
}
