//! The public API's handlers, wire work only: each turns wire input into validated domain
//! input (a 422 names the field at fault), calls the pipeline (`pipeline::Recommender`, which
//! assigns the variant, serves and counts the impression) or the catalog's write path
//! (`items::ItemWriter`, which holds every item-write rule), and shapes the answer.

use super::error::{AppError, ErrorBody};
use super::extract::{read_body, ApiJson, ApiPath, QueryPairs, RequestId};
use super::types::*;
use super::AppState;
use crate::catalog::CatalogEntry;
use crate::domain::{ItemId, UserId};
use crate::items;
use crate::pipeline::{OnboardRequest, RecommendRequest};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use std::sync::Arc;

type ApiResult<T> = Result<T, AppError>;

/// Personal recommendations (trending for a stranger).
#[utoipa::path(get, path = "/v1/recommendations", tag = "recommendations",
    params(RecommendParams),
    responses(
        (status = 200, body = RecommendationsResponse),
        (status = 422, description = "a parameter is invalid; `field` names it", body = ErrorBody),
    ))]
pub async fn get_recommendations(
    State(s): State<AppState>,
    RequestId(rid): RequestId,
    q: QueryPairs,
) -> ApiResult<RecommendationsBody> {
    recommend(&s, rid, RecommendParams::from_query(&q)?).await
}

/// The same as `GET`, with the parameters in a JSON body.
#[utoipa::path(post, path = "/v1/recommendations", tag = "recommendations",
    request_body = RecommendParams,
    responses(
        (status = 415, description = "the body is not sent as application/json", body = ErrorBody),
        (status = 200, body = RecommendationsResponse),
        (status = 413, body = ErrorBody),
        (status = 422, body = ErrorBody),
    ))]
pub async fn post_recommendations(
    State(s): State<AppState>,
    RequestId(rid): RequestId,
    ApiJson(params): ApiJson<RecommendParams>,
) -> ApiResult<RecommendationsBody> {
    recommend(&s, rid, params).await
}

async fn recommend(
    s: &AppState,
    request_id: String,
    params: RecommendParams,
) -> ApiResult<RecommendationsBody> {
    let v = params.validate()?;
    known_categories(s, &v.filter)?;
    let req = RecommendRequest {
        request_id,
        user: v.user,
        session: v.session,
        k: v.k,
        filter: v.filter,
        boosts: resolve_boosts(&s.settings.boosts, &v.boosts)?,
    };
    let recs = s.recommender.recommend(&req).await;
    s.stats.record_source(recs.source);
    Ok(RecommendationsBody::new(recs, v.explain))
}

/// Items similar to one item, under the same filters.
#[utoipa::path(get, path = "/v1/items/{item_id}/similar", tag = "recommendations",
    params(("item_id" = String, Path, description = "the anchor item"), SimilarParams),
    responses(
        (status = 200, body = RecommendationsResponse),
        (status = 404, description = "unknown item", body = ErrorBody),
        (status = 422, body = ErrorBody),
    ))]
pub async fn similar(
    State(s): State<AppState>,
    RequestId(rid): RequestId,
    ApiPath(item_id): ApiPath<String>,
    q: QueryPairs,
) -> ApiResult<RecommendationsBody> {
    let item = parse_item_id(item_id)?;
    let v = SimilarParams::from_query(&q)?.validate()?;
    known_categories(&s, &v.filter)?;
    let req = RecommendRequest {
        request_id: rid,
        user: None,
        session: None,
        k: v.k,
        filter: v.filter,
        boosts: resolve_boosts(&s.settings.boosts, &v.boosts)?,
    };
    let recs = s.recommender.similar(&item, &req).await?;
    Ok(RecommendationsBody::new(recs, v.explain))
}

/// Trending items, globally or in one category.
#[utoipa::path(get, path = "/v1/trending", tag = "recommendations",
    params(TrendingParams),
    responses((status = 200, body = RecommendationsResponse), (status = 422, body = ErrorBody)))]
pub async fn trending(
    State(s): State<AppState>,
    RequestId(rid): RequestId,
    q: QueryPairs,
) -> ApiResult<RecommendationsBody> {
    let v = TrendingParams::from_query(&q)?.validate()?;
    known_categories(&s, &v.filter)?;
    let req = RecommendRequest {
        request_id: rid,
        user: None,
        session: None,
        k: v.k,
        filter: v.filter,
        boosts: Vec::new(),
    };
    Ok(RecommendationsBody::new(
        s.recommender.trending(&req).await,
        false,
    ))
}

/// Adds or replaces items: each is embedded with the item tower and indexed before the answer,
/// so it can be recommended by the next request (cold start for items).
#[utoipa::path(post, path = "/v1/items", tag = "catalog",
    request_body = ItemsUpsert,
    responses(
        (status = 401, description = "X-API-Key is missing or wrong", body = ErrorBody),
        (status = 403, description = "no API key is configured: catalog writes are disabled", body = ErrorBody),
        (status = 415, description = "the body is not sent as application/json", body = ErrorBody),
        (status = 200, body = ItemsUpserted),
        (status = 413, body = ErrorBody),
        (status = 422, body = ErrorBody),
        (status = 503, description = "the index did not answer", body = ErrorBody),
    ))]
pub async fn upsert_items(
    State(s): State<AppState>,
    ApiJson(body): ApiJson<ItemsUpsert>,
) -> ApiResult<Json<ItemsUpserted>> {
    if body.items.is_empty() {
        return Err(AppError::invalid("items", "must hold at least one item"));
    }
    if body.items.len() > MAX_ITEMS_BATCH {
        return Err(AppError::invalid(
            "items",
            format!(
                "at most {MAX_ITEMS_BATCH} items per request, got {}",
                body.items.len()
            ),
        ));
    }
    let now = chrono::Utc::now().timestamp();
    let mut items = Vec::with_capacity(body.items.len());
    let mut popularity = Vec::with_capacity(body.items.len());
    for (i, input) in body.items.into_iter().enumerate() {
        let (item, pop) = input.validate(&format!("items[{i}]"), now)?;
        items.push(item);
        popularity.push(pop);
    }
    let done = s
        .items
        .upsert(items.into_iter().zip(popularity).collect())
        .await?;
    Ok(Json(ItemsUpserted {
        upserted: done.count,
        model_version: done.model_version,
    }))
}

/// One item as the catalog holds it.
#[utoipa::path(get, path = "/v1/items/{item_id}", tag = "catalog",
    params(("item_id" = String, Path)),
    responses(
        (status = 200, body = ItemView),
        (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody),
    ))]
pub async fn get_item(
    State(s): State<AppState>,
    ApiPath(item_id): ApiPath<String>,
) -> ApiResult<Json<ItemView>> {
    let id = parse_item_id(item_id)?;
    let entry = known_item(&s, &id)?;
    Ok(Json(ItemView::from(entry.as_ref())))
}

/// Changes availability and/or price; the next request sees the change.
#[utoipa::path(patch, path = "/v1/items/{item_id}", tag = "catalog",
    params(("item_id" = String, Path)),
    request_body = ItemPatch,
    responses(
        (status = 401, description = "X-API-Key is missing or wrong", body = ErrorBody),
        (status = 403, description = "no API key is configured: catalog writes are disabled", body = ErrorBody),
        (status = 415, description = "the body is not sent as application/json", body = ErrorBody),
        (status = 200, body = ItemView),
        (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody),
    ))]
pub async fn patch_item(
    State(s): State<AppState>,
    ApiPath(item_id): ApiPath<String>,
    ApiJson(patch): ApiJson<ItemPatch>,
) -> ApiResult<Json<ItemView>> {
    let id = parse_item_id(item_id)?;
    if patch.available.is_none() && patch.price.is_none() {
        return Err(AppError::invalid(
            "body",
            "give at least one of `available`, `price`",
        ));
    }
    let price = match patch.price {
        None => None,
        Some(p) if p.is_finite() && p >= 0.0 && p <= f32::MAX as f64 => Some(p as f32),
        Some(p) => {
            return Err(AppError::invalid(
                "price",
                format!("must be a finite number >= 0, got {p}"),
            ))
        }
    };
    let updated = s
        .items
        .patch(
            &id,
            items::ItemPatch {
                available: patch.available,
                price,
            },
        )
        .await?;
    Ok(Json(ItemView::from(updated.as_ref())))
}

/// Removes an item from the index and the catalog.
#[utoipa::path(delete, path = "/v1/items/{item_id}", tag = "catalog",
    params(("item_id" = String, Path)),
    responses(
        (status = 401, description = "X-API-Key is missing or wrong", body = ErrorBody),
        (status = 403, description = "no API key is configured: catalog writes are disabled", body = ErrorBody),
        (status = 204, description = "deleted"),
        (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody),
    ))]
pub async fn delete_item(
    State(s): State<AppState>,
    ApiPath(item_id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    let id = parse_item_id(item_id)?;
    s.items.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Cold start for users: seeds the history from chosen categories and liked items, and
/// returns the first recommendations.
#[utoipa::path(post, path = "/v1/users/{user_id}/onboarding", tag = "recommendations",
    params(("user_id" = String, Path)),
    request_body = OnboardingInput,
    responses(
        (status = 415, description = "the body is not sent as application/json", body = ErrorBody),
        (status = 200, body = OnboardingResponse),
        (status = 404, description = "a liked item is not in the catalog", body = ErrorBody),
        (status = 422, body = ErrorBody),
        (status = 503, description = "the session store did not answer", body = ErrorBody),
    ))]
pub async fn onboarding(
    State(s): State<AppState>,
    RequestId(rid): RequestId,
    ApiPath(user_id): ApiPath<String>,
    ApiJson(input): ApiJson<OnboardingInput>,
) -> ApiResult<Json<OnboardingResponse>> {
    let user = UserId::parse(user_id).map_err(|e| AppError::invalid("user_id", e.to_string()))?;
    let k = validate_k(input.k)?;
    let attributes = input.attr_filter()?;
    if input.categories.is_empty() && input.liked_items.is_empty() {
        return Err(AppError::invalid(
            "categories",
            "give at least one category or liked item",
        ));
    }
    if input.categories.len() > MAX_CATEGORIES {
        return Err(AppError::invalid(
            "categories",
            format!(
                "at most {MAX_CATEGORIES} values, got {}",
                input.categories.len()
            ),
        ));
    }
    if input.liked_items.len() > MAX_LIST {
        return Err(AppError::invalid(
            "liked_items",
            format!("at most {MAX_LIST} values, got {}", input.liked_items.len()),
        ));
    }
    for (i, c) in input.categories.iter().enumerate() {
        known_category(&s, &format!("categories[{i}]"), c)?;
    }
    let mut liked = Vec::with_capacity(input.liked_items.len());
    for (i, raw) in input.liked_items.into_iter().enumerate() {
        let field = format!("liked_items[{i}]");
        let id = ItemId::parse(raw).map_err(|e| AppError::invalid(&field, e.to_string()))?;
        let entry = s.catalog.get(&id).ok_or_else(|| AppError::UnknownItemIn {
            field: field.clone(),
            id: id.to_string(),
        })?;
        liked.push(entry);
    }
    let onboarded = s
        .recommender
        .onboard(&OnboardRequest {
            request_id: rid,
            user,
            categories: input.categories,
            liked,
            k,
            attributes,
        })
        .await?;
    Ok(Json(OnboardingResponse {
        seeded_items: onboarded.seeded.iter().map(ItemId::to_string).collect(),
        recommendations: RecommendationsResponse::new(onboarded.recommendations, false),
    }))
}

/// One category of the catalog.
#[derive(Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct CategoryCount {
    /// The exact name that `category` and `exclude_category` accept (case-sensitive).
    pub name: String,
    /// Items of the catalog in this category, available or not.
    pub items: usize,
}

#[derive(Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct CategoriesResponse {
    /// Every category of the catalog, by name.
    pub categories: Vec<CategoryCount>,
}

/// The catalog's categories and their item counts, for category chips and filters.
#[utoipa::path(get, path = "/v1/categories", tag = "catalog",
    responses((status = 200, body = CategoriesResponse)))]
pub async fn categories(State(s): State<AppState>) -> Json<CategoriesResponse> {
    Json(CategoriesResponse {
        categories: s
            .catalog
            .categories()
            .into_iter()
            .map(|(name, items)| CategoryCount { name, items })
            .collect(),
    })
}

/// Ingests one event or an array of events: durable when the answer is 202.
#[utoipa::path(post, path = "/v1/events", tag = "events",
    request_body(content = Vec<crate::session::event::EventInput>, description = "one event, or an array of events"),
    responses(
        (status = 415, description = "the body is not sent as application/json", body = ErrorBody),
        (status = 202, body = EventsAccepted),
        (status = 413, body = ErrorBody),
        (status = 422, body = ErrorBody),
        (status = 503, description = "the session store did not answer", body = ErrorBody),
    ))]
pub async fn post_events(State(s): State<AppState>, req: Request) -> ApiResult<impl IntoResponse> {
    let bytes = read_body(req, s.settings.server.max_body_bytes).await?;
    let events = super::events::parse_events(&s, &bytes).inspect_err(|_| {
        crate::telemetry::record_events_refused(false, 1);
    })?;
    let outcome = super::events::ingest(&s, events).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(EventsAccepted {
            accepted: outcome.accepted,
            duplicates: outcome.duplicates,
        }),
    ))
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// The model is loaded and the index and the session store answer.
#[utoipa::path(get, path = "/readyz", tag = "ops",
    responses((status = 200, body = Readiness), (status = 503, body = Readiness)))]
pub async fn readyz(State(s): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let mut failing = Vec::new();
    let (count, ping) = tokio::join!(s.index.count(), s.sessions.ping());
    let index_items = match count {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::warn!(error = %e, "readiness: index");
            failing.push("index".to_string());
            None
        }
    };
    if let Err(e) = ping {
        tracing::warn!(error = %e, "readiness: session store");
        failing.push("session".to_string());
    }
    let status = if failing.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Readiness {
        status: if failing.is_empty() {
            "ready"
        } else {
            "not_ready"
        }
        .into(),
        model_version: s.model.load().version().to_string(),
        catalog_items: s.catalog.len(),
        index_items,
        failing,
    };
    (status, Json(body))
}

/// Prometheus metrics, including the per-stage pipeline latencies.
pub async fn metrics() -> impl IntoResponse {
    let body = crate::telemetry::render();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        body,
    )
}

/// An unknown (or mis-cased) category would filter everything out and answer an empty list
/// that looks like "nothing matches": a 422 that names the field and the near names instead.
fn known_categories(s: &AppState, filter: &crate::domain::Filter) -> ApiResult<()> {
    check_filterable(filter, &s.settings.catalog)?;
    for c in &filter.include_categories {
        known_category(s, "category", c)?;
    }
    for c in &filter.exclude_categories {
        known_category(s, "exclude_category", c)?;
    }
    Ok(())
}

fn known_category(s: &AppState, field: &str, name: &str) -> ApiResult<()> {
    if s.catalog.has_category(name) {
        return Ok(());
    }
    let known: Vec<String> = s.catalog.categories().into_iter().map(|(c, _)| c).collect();
    let near = closest_names(name, &known, 3);
    let hint = if near.is_empty() {
        let some: Vec<&str> = known.iter().take(8).map(String::as_str).collect();
        format!(
            "known categories include {} (GET /v1/categories lists them all)",
            some.join(", ")
        )
    } else {
        format!(
            "did you mean {}? (GET /v1/categories lists them all)",
            near.join(", ")
        )
    };
    Err(AppError::invalid(
        field,
        format!("unknown category {name:?}; names are case-sensitive; {hint}"),
    ))
}

/// The known names nearest to `name`: a case-insensitive match first, then by edit distance
/// (case-insensitive) within a third of the name's length, then names that contain it.
fn closest_names(name: &str, known: &[String], n: usize) -> Vec<String> {
    let lower = name.to_lowercase();
    let limit = (lower.chars().count() / 3).max(1);
    let mut scored: Vec<(usize, &String)> = known
        .iter()
        .filter_map(|k| {
            let kl = k.to_lowercase();
            let d = edit_distance(&lower, &kl);
            if d <= limit {
                Some((d, k))
            } else if !lower.is_empty() && (kl.contains(&lower) || lower.contains(&kl)) {
                Some((limit + 1, k))
            } else {
                None
            }
        })
        .collect();
    scored.sort();
    scored.into_iter().take(n).map(|(_, k)| k.clone()).collect()
}

/// Levenshtein distance over chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

fn parse_item_id(raw: String) -> ApiResult<ItemId> {
    ItemId::parse(raw).map_err(|e| AppError::invalid("item_id", e.to_string()))
}

fn known_item(s: &AppState, id: &ItemId) -> ApiResult<Arc<CatalogEntry>> {
    s.catalog.get(id).ok_or_else(|| not_found(id))
}

fn not_found(id: &ItemId) -> AppError {
    AppError::NotFound {
        what: "item",
        id: id.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn closest_names_prefer_case_then_spelling() {
        let known = names(&["Books", "Comedy", "Toys", "Toys & Games", "Drama"]);
        assert_eq!(closest_names("toys", &known, 3), ["Toys", "Toys & Games"]);
        assert_eq!(closest_names("Comdy", &known, 3), ["Comedy"]);
        assert!(closest_names("Spaceships", &known, 3).is_empty());
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
