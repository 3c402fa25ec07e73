//! The OpenAPI document, generated from the handlers' own types, served at `/openapi.json`
//! and committed as `schemas/openapi.json` (a test fails when the two drift apart).

use super::{routes, stats};
use axum::Json;
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tandem",
        description = "Recommendations: a two-tower model, Qdrant ANN and a session-aware re-ranker. Every error is a JSON `ErrorBody`; validation failures are 422 and name the field."
    ),
    paths(
        routes::get_recommendations,
        routes::post_recommendations,
        routes::similar,
        routes::trending,
        routes::upsert_items,
        routes::get_item,
        routes::patch_item,
        routes::delete_item,
        routes::onboarding,
        routes::categories,
        routes::post_events,
        routes::healthz,
        routes::readyz,
        stats::get_stats,
    ),
    tags(
        (name = "recommendations", description = "Personal, similar, trending and onboarding recommendations"),
        (name = "catalog", description = "Items: cold start, availability and price"),
        (name = "events", description = "What users did"),
        (name = "ops", description = "Health, readiness and live figures"),
    )
)]
pub struct ApiDoc;

/// The document as the committed file holds it (pretty JSON, trailing newline).
pub fn openapi_json() -> String {
    let mut s = ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes");
    s.push('\n');
    s
}

pub async fn serve_openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
