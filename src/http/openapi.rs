//! The OpenAPI document, generated from the handlers' own types, served at `/openapi.json`
//! and committed as `schemas/openapi.json` (a test fails when the two drift apart).

use super::{gorse, routes, stats};
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
        gorse::insert_item,
        gorse::insert_items,
        gorse::get_item,
        gorse::patch_item,
        gorse::delete_item,
        gorse::list_items,
        gorse::insert_user,
        gorse::insert_users,
        gorse::get_user,
        gorse::patch_user,
        gorse::delete_user,
        gorse::list_users,
        gorse::insert_feedback,
        gorse::put_feedback,
        gorse::list_feedback,
        gorse::user_feedback,
        gorse::user_feedback_of_type,
        gorse::get_feedback_pair,
        gorse::delete_feedback_pair,
        gorse::get_feedback_typed,
        gorse::delete_feedback_typed,
        gorse::recommend,
        gorse::recommend_in,
        gorse::session_recommend,
        gorse::session_recommend_in,
        gorse::neighbors,
        gorse::neighbors_in,
        gorse::popular,
        gorse::popular_in,
        gorse::latest,
        gorse::latest_in,
    ),
    tags(
        (name = "recommendations", description = "Personal, similar, trending and onboarding recommendations"),
        (name = "catalog", description = "Items: cold start, availability and price"),
        (name = "events", description = "What users did"),
        (name = "ops", description = "Health, readiness and live figures"),
        (name = "gorse", description = "Gorse's REST API (what pygorse 0.5.1 and gorsejs 0.4.8 call), over the same catalog, events and pipeline; bad input is 400 here, as in Gorse"),
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
