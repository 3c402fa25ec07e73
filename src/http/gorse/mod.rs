//! The Gorse-compatible API: Gorse's REST routes under `/api/...`, as the published SDKs
//! (pygorse 0.5.1, gorsejs 0.4.8) call them, so a Gorse user can point a client at tandem
//! unchanged. One more edge over the same parts as `/v1`: item writes go through the
//! catalog's write path (`ItemWriter`), feedback through the events' ingest (`events::ingest`)
//! and recommendations through the pipeline; what is new is Gorse's shapes, its status codes
//! (400 for bad input rather than 422) and the users and feedback records (`session::users`).
//!
//! Keys: every `/api` call needs the admin key (`TANDEM_ADMIN_KEY`) in `X-API-Key`, by the
//! catalog writes' rule (`auth`): 401 without it or with a wrong one, 403 when none is
//! configured. Gorse without a key is open; this API lists and deletes users' feedback and
//! writes the catalog, so here it is off instead.

pub mod wire;

use super::error::{AppError, ErrorBody};
use super::extract::{read_body, ApiPath, QueryPairs, RequestId};
use super::types::{ItemInput, MAX_ITEMS_BATCH, MAX_K, MAX_LIST};
use super::AppState;
use crate::catalog::CatalogEntry;
use crate::domain::{Filter, Item, ItemId, UserId};
use crate::pipeline::{RecommendRequest, Recommendations};
use crate::session::event::{self, EventInput, EventLimits, TimestampInput};
use crate::session::users::MAX_TYPE_LEN;
use crate::session::{FeedbackRecord, UserRecord};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::sync::Arc;
use wire::*;

/// Records per page when `n` is not given, and the most a page may ask for.
pub const DEFAULT_PAGE: usize = 100;
pub const MAX_PAGE: usize = 10_000;
/// Recommendations when `n` is not given (Gorse's default).
pub const DEFAULT_N: usize = 10;
/// Feedback items a session recommendation starts from (the newest ones).
const SESSION_ANCHORS: usize = 5;

/// A failure in Gorse's terms: the same JSON body as `/v1`, with Gorse's 400 for bad input.
#[derive(Debug)]
pub struct GorseError(pub AppError);

impl IntoResponse for GorseError {
    fn into_response(self) -> Response {
        let mut r = self.0.into_response();
        if r.status() == StatusCode::UNPROCESSABLE_ENTITY {
            *r.status_mut() = StatusCode::BAD_REQUEST;
        }
        r
    }
}

macro_rules! into_gorse_error {
    ($($t:ty),*) => {$(
        impl From<$t> for GorseError {
            fn from(e: $t) -> Self {
                GorseError(e.into())
            }
        }
    )*};
}
into_gorse_error!(
    AppError,
    crate::session::SessionError,
    crate::items::WriteError,
    crate::pipeline::PipelineError
);

type GResult<T> = Result<T, GorseError>;

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> GorseError {
    GorseError(AppError::invalid(field, reason))
}

/// The routes, nested under `/api` by `http::router`. Paths with an optional last segment
/// (a category) are served with and without it, and with a bare trailing slash, which is
/// what the SDKs send when the category is empty (`/api/recommend/bob/`).
pub fn router(state: AppState) -> Router<AppState> {
    let key = super::auth::CatalogKey::new(state.settings.admin_key.0.as_deref());
    let api_key = axum::middleware::from_fn_with_state(key, super::auth::authorize_catalog_write);
    Router::new()
        .route("/item", post(insert_item))
        .route("/items", get(list_items).post(insert_items))
        .route(
            "/item/{item_id}",
            get(get_item).patch(patch_item).delete(delete_item),
        )
        .route("/item/{item_id}/neighbors", get(neighbors))
        .route("/item/{item_id}/neighbors/", get(neighbors))
        .route("/item/{item_id}/neighbors/{category}", get(neighbors_in))
        .route("/user", post(insert_user))
        .route("/users", get(list_users).post(insert_users))
        .route(
            "/user/{user_id}",
            get(get_user).patch(patch_user).delete(delete_user),
        )
        .route("/user/{user_id}/feedback", get(user_feedback))
        .route(
            "/user/{user_id}/feedback/{feedback_type}",
            get(user_feedback_of_type),
        )
        .route(
            "/feedback",
            get(list_feedback).post(insert_feedback).put(put_feedback),
        )
        .route(
            "/feedback/{user_id}/{item_id}",
            get(get_feedback_pair).delete(delete_feedback_pair),
        )
        .route(
            "/feedback/{feedback_type}/{user_id}/{item_id}",
            get(get_feedback_typed).delete(delete_feedback_typed),
        )
        .route("/recommend/{user_id}", get(recommend))
        .route("/recommend/{user_id}/", get(recommend))
        .route("/recommend/{user_id}/{category}", get(recommend_in))
        .route("/session/recommend", post(session_recommend))
        .route("/session/recommend/", post(session_recommend))
        .route("/session/recommend/{category}", post(session_recommend_in))
        .route("/popular", get(popular))
        .route("/popular/", get(popular))
        .route("/popular/{category}", get(popular_in))
        .route("/latest", get(latest))
        .route("/latest/", get(latest))
        .route("/latest/{category}", get(latest_in))
        .route_layer(api_key)
        // The extractors' own rejections (a path segment that is not UTF-8) are tandem's
        // 422: Gorse answers bad input with 400.
        .route_layer(axum::middleware::map_response(gorse_status))
}

async fn gorse_status(mut r: Response) -> Response {
    if r.status() == StatusCode::UNPROCESSABLE_ENTITY {
        *r.status_mut() = StatusCode::BAD_REQUEST;
    }
    r
}

// ---- query parameters -------------------------------------------------------------------

/// `n` (1..=max, default `default`).
fn count(q: &QueryPairs, default: usize, max: usize) -> GResult<usize> {
    match q.parse::<usize>("n", "a positive integer")? {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(n) => Err(invalid(
            "n",
            format!("must be between 1 and {max}, got {n}"),
        )),
    }
}

/// `n` and `offset` of a ranked list: together at most tandem's `MAX_K`.
fn n_offset(q: &QueryPairs) -> GResult<(usize, usize)> {
    let n = count(q, DEFAULT_N, MAX_K as usize)?;
    let offset = q
        .parse::<usize>("offset", "a non-negative integer")?
        .unwrap_or(0);
    if n.saturating_add(offset) > MAX_K as usize {
        return Err(invalid(
            "offset",
            format!("n + offset must be at most {MAX_K}, got {n} + {offset}"),
        ));
    }
    Ok((n, offset))
}

/// The cursor of a page: the hex of the last key of the previous page; empty or missing
/// for the first page. gorsejs sends it as `Cursor`, pygorse as `cursor`.
fn cursor(q: &QueryPairs) -> GResult<Option<String>> {
    let raw = match q.one("cursor")? {
        Some(c) => Some(c),
        None => q.one("Cursor")?,
    };
    let Some(raw) = raw.filter(|c| !c.is_empty()) else {
        return Ok(None);
    };
    let bad = || invalid("cursor", "is not a cursor this server returned");
    if raw.len() % 2 != 0 {
        return Err(bad());
    }
    let bytes: Option<Vec<u8>> = (0..raw.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(raw.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes.ok_or_else(bad)?)
        .map(Some)
        .map_err(|_| bad())
}

fn to_cursor(key: &str) -> String {
    key.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The next cursor: empty once a page comes back short (nothing is left).
fn next_cursor(len: usize, n: usize, last: Option<String>) -> String {
    match last {
        Some(k) if len == n => to_cursor(&k),
        _ => String::new(),
    }
}

fn parse_user(raw: String, field: &str) -> GResult<UserId> {
    UserId::parse(raw).map_err(|e| invalid(field, e.to_string()))
}

fn parse_item(raw: String, field: &str) -> GResult<ItemId> {
    ItemId::parse(raw).map_err(|e| invalid(field, e.to_string()))
}

fn not_found(what: &'static str, id: &str) -> GorseError {
    GorseError(AppError::NotFound {
        what,
        id: id.to_string(),
    })
}

/// A Gorse timestamp: RFC 3339, `YYYY-MM-DD HH:MM:SS` or `YYYY-MM-DD` (UTC); empty or
/// missing means now. Unix milliseconds.
fn parse_time(raw: Option<&str>, field: &str, now_ms: i64) -> GResult<i64> {
    let Some(s) = raw.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(now_ms);
    };
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    for format in ["%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S"] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, format) {
            return Ok(t.and_utc().timestamp_millis());
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d
            .and_time(chrono::NaiveTime::MIN)
            .and_utc()
            .timestamp_millis());
    }
    Err(invalid(
        field,
        format!("{s:?} is not a time (RFC 3339, `2022-02-24 10:00:00` or `2022-02-24`)"),
    ))
}

/// A Go duration as Gorse takes it (`30s`, `10m`, `1h30m`), in milliseconds.
fn parse_go_duration(s: &str, field: &str) -> GResult<i64> {
    let bad = || {
        invalid(
            field,
            format!("{s:?} is not a duration like 30s, 10m or 1h30m"),
        )
    };
    let mut total = 0f64;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let number: f64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let ms = match &rest[..unit_len] {
            "ns" => 1e-6,
            "us" | "µs" => 1e-3,
            "ms" => 1.0,
            "s" => 1e3,
            "m" => 60e3,
            "h" => 3600e3,
            _ => return Err(bad()),
        };
        total += number * ms;
        rest = &rest[unit_len..];
    }
    Ok(total.round() as i64)
}

fn check_text(field: &str, s: &str, max: usize) -> GResult<()> {
    if s.len() > max || s.chars().any(char::is_control) {
        return Err(invalid(
            field,
            format!("must be at most {max} characters without control characters"),
        ));
    }
    Ok(())
}

fn check_labels(field: &str, labels: &[String]) -> GResult<()> {
    if labels.len() > MAX_LIST {
        return Err(invalid(
            field,
            format!("at most {MAX_LIST} values, got {}", labels.len()),
        ));
    }
    for (i, l) in labels.iter().enumerate() {
        check_text(&format!("{field}[{i}]"), l, 256)?;
    }
    Ok(())
}

/// Parses a JSON body of `server.max_body_bytes` at most. Bodies are read here rather than
/// with `ApiJson` so that their errors come out as Gorse's 400.
async fn body<T: serde::de::DeserializeOwned>(s: &AppState, req: Request) -> GResult<T> {
    let bytes = read_body(req, s.settings.server.max_body_bytes).await?;
    Ok(super::extract::parse_json(&bytes)?)
}

/// A PATCH body: a JSON object (serde would also take a struct's fields as an array, so
/// `[null, null]` patched nothing and answered `RowAffected: 1`).
async fn object_body<T: serde::de::DeserializeOwned>(s: &AppState, req: Request) -> GResult<T> {
    let bytes = read_body(req, s.settings.server.max_body_bytes).await?;
    if !serde_json::from_slice::<serde_json::Value>(&bytes).is_ok_and(|v| v.is_object()) {
        return Err(invalid("body", "must be a JSON object"));
    }
    Ok(super::extract::parse_json(&bytes)?)
}

// ---- items ------------------------------------------------------------------------------

/// A Gorse item as tandem's item input: the `/v1/items` validation applies as it is, with
/// the field named in Gorse's terms. An existing item keeps its popularity.
fn item_input(s: &AppState, at: &str, g: GorseItem, now_ms: i64) -> GResult<(Item, f32)> {
    let created = parse_time(g.timestamp.as_deref(), &format!("{at}.Timestamp"), now_ms)?;
    let popularity = ItemId::parse(g.item_id.clone())
        .ok()
        .and_then(|id| s.catalog.get(&id))
        .map(|e| e.popularity);
    let input = ItemInput {
        item_id: g.item_id,
        title: g.comment.unwrap_or_default(),
        categories: g.categories.unwrap_or_default(),
        tags: g.labels.unwrap_or_default(),
        price: None,
        available: !g.is_hidden,
        year: None,
        created_at: Some(created.div_euclid(1000)),
        popularity,
        attributes: Default::default(),
    };
    input.validate(at, now_ms / 1000).map_err(|e| match e {
        AppError::Invalid { field, reason } => invalid(gorse_field(&field), reason),
        other => GorseError(other),
    })
}

/// `item.title` -> `item.Comment`: tandem's field names in Gorse's terms.
fn gorse_field(field: &str) -> String {
    let (head, last) = field.rsplit_once('.').unwrap_or(("", field));
    let (name, index) = match last.find('[') {
        Some(i) => last.split_at(i),
        None => (last, ""),
    };
    let name = match name {
        "item_id" => "ItemId",
        "title" => "Comment",
        "categories" => "Categories",
        "tags" => "Labels",
        "created_at" => "Timestamp",
        other => other,
    };
    if head.is_empty() {
        format!("{name}{index}")
    } else {
        format!("{head}.{name}{index}")
    }
}

async fn upsert(s: &AppState, items: Vec<GorseItem>, at: &str) -> GResult<Json<RowAffected>> {
    if items.is_empty() {
        return Ok(Json(RowAffected { row_affected: 0 }));
    }
    if items.len() > MAX_ITEMS_BATCH {
        return Err(invalid(
            at,
            format!(
                "at most {MAX_ITEMS_BATCH} items per request, got {}",
                items.len()
            ),
        ));
    }
    let now = event::now_ms();
    let mut batch = Vec::with_capacity(items.len());
    for (i, g) in items.into_iter().enumerate() {
        let field = if at == "item" {
            at.to_string()
        } else {
            format!("{at}[{i}]")
        };
        batch.push(item_input(s, &field, g, now)?);
    }
    let done = s.items.upsert(batch).await?;
    Ok(Json(RowAffected {
        row_affected: done.count,
    }))
}

/// Inserts or replaces an item.
#[utoipa::path(post, path = "/api/item", tag = "gorse", request_body = GorseItem,
    responses(
        (status = 200, body = RowAffected),
        (status = 400, body = ErrorBody),
        (status = 401, description = "X-API-Key is missing or wrong", body = ErrorBody),
        (status = 403, description = "no API key is configured: the Gorse API is off", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 415, description = "the body is not sent as application/json", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn insert_item(State(s): State<AppState>, req: Request) -> GResult<Json<RowAffected>> {
    let item: GorseItem = body(&s, req).await?;
    upsert(&s, vec![item], "item").await
}

/// Inserts or replaces items.
#[utoipa::path(post, path = "/api/items", tag = "gorse", request_body = Vec<GorseItem>,
    responses(
        (status = 200, body = RowAffected),
        (status = 400, body = ErrorBody),
        (status = 401, description = "X-API-Key is missing or wrong", body = ErrorBody),
        (status = 403, description = "no API key is configured: the Gorse API is off", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 415, description = "the body is not sent as application/json", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn insert_items(State(s): State<AppState>, req: Request) -> GResult<Json<RowAffected>> {
    let items: Vec<GorseItem> = body(&s, req).await?;
    upsert(&s, items, "items").await
}

fn known_item(s: &AppState, raw: String) -> GResult<Arc<CatalogEntry>> {
    let id = parse_item(raw, "item_id")?;
    s.catalog
        .get(&id)
        .ok_or_else(|| not_found("item", id.as_str()))
}

/// One item; 404 when unknown (a hidden item is still readable).
#[utoipa::path(get, path = "/api/item/{item_id}", tag = "gorse",
    params(("item_id" = String, Path)),
    responses(
        (status = 200, body = GorseItemView),
        (status = 400, body = ErrorBody),
        (status = 401, description = "X-API-Key is missing or wrong", body = ErrorBody),
        (status = 403, description = "no API key is configured: the Gorse API is off", body = ErrorBody),
        (status = 404, body = ErrorBody),
    ))]
pub async fn get_item(
    State(s): State<AppState>,
    ApiPath(item_id): ApiPath<String>,
) -> GResult<Json<GorseItemView>> {
    Ok(Json(GorseItemView::from(known_item(&s, item_id)?.as_ref())))
}

/// Changes an item: `IsHidden` alone is a live-field patch; any other field re-embeds the
/// item (its content changed) through the same upsert as `POST /api/item`.
#[utoipa::path(patch, path = "/api/item/{item_id}", tag = "gorse",
    params(("item_id" = String, Path)), request_body = GorseItemPatch,
    responses(
        (status = 200, body = RowAffected),
        (status = 400, body = ErrorBody),
        (status = 401, description = "X-API-Key is missing or wrong", body = ErrorBody),
        (status = 403, description = "no API key is configured: the Gorse API is off", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 415, description = "the body is not sent as application/json", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn patch_item(
    State(s): State<AppState>,
    ApiPath(item_id): ApiPath<String>,
    req: Request,
) -> GResult<Json<RowAffected>> {
    let entry = known_item(&s, item_id)?;
    let patch: GorseItemPatch = object_body(&s, req).await?;
    let content = patch.categories.is_some()
        || patch.labels.is_some()
        || patch.comment.is_some()
        || patch.timestamp.is_some();
    if !content {
        if let Some(hidden) = patch.is_hidden {
            let change = crate::items::ItemPatch {
                available: Some(!hidden),
                price: None,
            };
            s.items.patch(entry.id(), change).await?;
        }
        return Ok(Json(RowAffected { row_affected: 1 }));
    }
    let current = GorseItemView::from(entry.as_ref());
    let item = GorseItem {
        item_id: current.item_id,
        is_hidden: patch.is_hidden.unwrap_or(current.is_hidden),
        categories: Some(patch.categories.unwrap_or(current.categories)),
        timestamp: Some(patch.timestamp.unwrap_or(current.timestamp)),
        labels: Some(patch.labels.unwrap_or(current.labels)),
        comment: Some(patch.comment.unwrap_or(current.comment)),
    };
    let (mut item, popularity) = item_input(&s, "item", item, event::now_ms())?;
    // Fields Gorse does not know are kept.
    item.price = entry.item.price;
    item.year = entry.item.year;
    s.items.upsert(vec![(item, popularity)]).await?;
    Ok(Json(RowAffected { row_affected: 1 }))
}

/// Deletes an item from the index and the catalog; 404 when unknown.
#[utoipa::path(delete, path = "/api/item/{item_id}", tag = "gorse",
    params(("item_id" = String, Path)),
    responses(
        (status = 200, body = RowAffected),
        (status = 400, body = ErrorBody),
        (status = 401, description = "X-API-Key is missing or wrong", body = ErrorBody),
        (status = 403, description = "no API key is configured: the Gorse API is off", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn delete_item(
    State(s): State<AppState>,
    ApiPath(item_id): ApiPath<String>,
) -> GResult<Json<RowAffected>> {
    let id = parse_item(item_id, "item_id")?;
    s.items.delete(&id).await?;
    Ok(Json(RowAffected { row_affected: 1 }))
}

/// A page of items in id order (`n`, `cursor`). With `q`, the items whose id or comment
/// holds it (case-insensitive), at most `n`, without a cursor.
#[utoipa::path(get, path = "/api/items", tag = "gorse",
    params(
        ("n" = Option<usize>, Query, description = "items per page (default 100, at most 10000)"),
        ("cursor" = Option<String>, Query, description = "the previous page's Cursor; empty for the first page"),
        ("q" = Option<String>, Query, description = "search the ids and comments"),
    ),
    responses(
        (status = 200, body = ItemPage),
        (status = 400, body = ErrorBody),
        (status = 401, description = "X-API-Key is missing or wrong", body = ErrorBody),
        (status = 403, description = "no API key is configured: the Gorse API is off", body = ErrorBody),
    ))]
pub async fn list_items(State(s): State<AppState>, q: QueryPairs) -> GResult<Json<ItemPage>> {
    q.allow_only(&["n", "cursor", "Cursor", "q"])?;
    let n = count(&q, DEFAULT_PAGE, MAX_PAGE)?;
    let after = cursor(&q)?;
    let mut entries = s.catalog.entries();
    if let Some(query) = q.one("q")?.map(str::to_lowercase) {
        entries.retain(|e| {
            e.item.item_id.as_str().to_lowercase().contains(&query)
                || e.item.title.to_lowercase().contains(&query)
        });
    }
    if let Some(after) = &after {
        entries.retain(|e| e.item.item_id.as_str() > after.as_str());
    }
    // The n smallest ids, without sorting the whole catalog.
    if entries.len() > n {
        entries.select_nth_unstable_by(n, |a, b| a.item.item_id.cmp(&b.item.item_id));
        entries.truncate(n);
    }
    entries.sort_by(|a, b| a.item.item_id.cmp(&b.item.item_id));
    let last = entries.last().map(|e| e.item.item_id.to_string());
    Ok(Json(ItemPage {
        cursor: next_cursor(entries.len(), n, last),
        items: entries
            .iter()
            .map(|e| GorseItemView::from(e.as_ref()))
            .collect(),
    }))
}

// ---- users ------------------------------------------------------------------------------

fn user_record(at: &str, u: GorseUser) -> GResult<UserRecord> {
    let user_id = parse_user(u.user_id, &format!("{at}.UserId"))?;
    let labels = u.labels.unwrap_or_default();
    check_labels(&format!("{at}.Labels"), &labels)?;
    let comment = u.comment.unwrap_or_default();
    check_text(&format!("{at}.Comment"), &comment, 4096)?;
    Ok(UserRecord {
        user_id,
        labels,
        comment,
    })
}

/// Inserts or replaces a user.
#[utoipa::path(post, path = "/api/user", tag = "gorse", request_body = GorseUser,
    responses(
        (status = 200, body = RowAffected),
        (status = 400, body = ErrorBody),
        (status = 401, description = "X-API-Key is missing or wrong", body = ErrorBody),
        (status = 403, description = "no API key is configured: the Gorse API is off", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 415, description = "the body is not sent as application/json", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn insert_user(State(s): State<AppState>, req: Request) -> GResult<Json<RowAffected>> {
    let user: GorseUser = body(&s, req).await?;
    let record = user_record("user", user)?;
    s.users.put_users(&[record]).await?;
    Ok(Json(RowAffected { row_affected: 1 }))
}

/// Inserts or replaces users.
#[utoipa::path(post, path = "/api/users", tag = "gorse", request_body = Vec<GorseUser>,
    responses(
        (status = 200, body = RowAffected),
        (status = 400, body = ErrorBody),
        (status = 401, description = "X-API-Key is missing or wrong", body = ErrorBody),
        (status = 403, description = "no API key is configured: the Gorse API is off", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 415, description = "the body is not sent as application/json", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn insert_users(State(s): State<AppState>, req: Request) -> GResult<Json<RowAffected>> {
    let users: Vec<GorseUser> = body(&s, req).await?;
    if users.len() > MAX_ITEMS_BATCH {
        return Err(invalid(
            "users",
            format!("at most {MAX_ITEMS_BATCH} users per request"),
        ));
    }
    let records = users
        .into_iter()
        .enumerate()
        .map(|(i, u)| user_record(&format!("users[{i}]"), u))
        .collect::<GResult<Vec<_>>>()?;
    s.users.put_users(&records).await?;
    Ok(Json(RowAffected {
        row_affected: records.len(),
    }))
}

async fn known_user(s: &AppState, raw: String) -> GResult<UserRecord> {
    let id = parse_user(raw, "user_id")?;
    s.users
        .user(&id)
        .await?
        .ok_or_else(|| not_found("user", id.as_str()))
}

/// One user; 404 when unknown.
#[utoipa::path(get, path = "/api/user/{user_id}", tag = "gorse",
    params(("user_id" = String, Path)),
    responses(
        (status = 200, body = GorseUser),
        (status = 400, body = ErrorBody),
        (status = 401, description = "X-API-Key is missing or wrong", body = ErrorBody),
        (status = 403, description = "no API key is configured: the Gorse API is off", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn get_user(
    State(s): State<AppState>,
    ApiPath(user_id): ApiPath<String>,
) -> GResult<Json<GorseUser>> {
    Ok(Json(known_user(&s, user_id).await?.into()))
}

/// Changes a user's labels and/or comment; 404 when unknown.
#[utoipa::path(patch, path = "/api/user/{user_id}", tag = "gorse",
    params(("user_id" = String, Path)), request_body = GorseUserPatch,
    responses(
        (status = 200, body = RowAffected),
        (status = 400, body = ErrorBody),
        (status = 401, description = "X-API-Key is missing or wrong", body = ErrorBody),
        (status = 403, description = "no API key is configured: the Gorse API is off", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 415, description = "the body is not sent as application/json", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn patch_user(
    State(s): State<AppState>,
    ApiPath(user_id): ApiPath<String>,
    req: Request,
) -> GResult<Json<RowAffected>> {
    let current = known_user(&s, user_id).await?;
    let patch: GorseUserPatch = object_body(&s, req).await?;
    let record = user_record(
        "user",
        GorseUser {
            user_id: current.user_id.to_string(),
            labels: Some(patch.labels.unwrap_or(current.labels)),
            comment: Some(patch.comment.unwrap_or(current.comment)),
        },
    )?;
    s.users.put_users(&[record]).await?;
    Ok(Json(RowAffected { row_affected: 1 }))
}

/// Deletes a user with its feedback and activity: recommendations no longer use them.
#[utoipa::path(delete, path = "/api/user/{user_id}", tag = "gorse",
    params(("user_id" = String, Path)),
    responses(
        (status = 200, body = RowAffected),
        (status = 400, body = ErrorBody),
        (status = 401, description = "X-API-Key is missing or wrong", body = ErrorBody),
        (status = 403, description = "no API key is configured: the Gorse API is off", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn delete_user(
    State(s): State<AppState>,
    ApiPath(user_id): ApiPath<String>,
) -> GResult<Json<RowAffected>> {
    let id = parse_user(user_id, "user_id")?;
    if !s.users.delete_user(&id).await? {
        return Err(not_found("user", id.as_str()));
    }
    Ok(Json(RowAffected { row_affected: 1 }))
}

/// A page of users in id order.
#[utoipa::path(get, path = "/api/users", tag = "gorse",
    params(
        ("n" = Option<usize>, Query, description = "users per page (default 100, at most 10000)"),
        ("cursor" = Option<String>, Query, description = "the previous page's Cursor; empty for the first page"),
    ),
    responses(
        (status = 200, body = UserPage),
        (status = 400, body = ErrorBody),
        (status = 401, description = "X-API-Key is missing or wrong", body = ErrorBody),
        (status = 403, description = "no API key is configured: the Gorse API is off", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn list_users(State(s): State<AppState>, q: QueryPairs) -> GResult<Json<UserPage>> {
    q.allow_only(&["n", "cursor", "Cursor"])?;
    let n = count(&q, DEFAULT_PAGE, MAX_PAGE)?;
    let after = match cursor(&q)? {
        Some(c) => Some(parse_user(c, "cursor")?),
        None => None,
    };
    let users = s.users.users_after(after.as_ref(), n).await?;
    let last = users.last().map(|u| u.user_id.to_string());
    Ok(Json(UserPage {
        cursor: next_cursor(users.len(), n, last),
        users: users.into_iter().map(GorseUser::from).collect(),
    }))
}

// ---- feedback ---------------------------------------------------------------------------

/// Validates feedback into records and the events recommendations learn from; each event's
/// id is derived from the feedback (type, user, item, time), so a resent batch is counted
/// once.
fn feedback_events(
    s: &AppState,
    input: Vec<GorseFeedback>,
    now_ms: i64,
) -> GResult<(Vec<FeedbackRecord>, Vec<crate::session::Event>)> {
    let limits = EventLimits::from(&s.settings.session);
    if input.len() > limits.max_batch {
        return Err(invalid(
            "feedback",
            format!(
                "a batch of {} is larger than the limit of {}",
                input.len(),
                limits.max_batch
            ),
        ));
    }
    let mut records = Vec::with_capacity(input.len());
    let mut events = Vec::with_capacity(input.len());
    for (i, f) in input.into_iter().enumerate() {
        let at = format!("feedback[{i}]");
        if f.feedback_type.is_empty() {
            return Err(invalid(format!("{at}.FeedbackType"), "must not be empty"));
        }
        check_text(
            &format!("{at}.FeedbackType"),
            &f.feedback_type,
            MAX_TYPE_LEN,
        )?;
        let comment = f.comment.unwrap_or_default();
        check_text(&format!("{at}.Comment"), &comment, 4096)?;
        let timestamp_ms = parse_time(f.timestamp.as_deref(), &format!("{at}.Timestamp"), now_ms)?;
        let event_type = s.settings.gorse.event_type(&f.feedback_type);
        let id_seed = format!(
            "gorse\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{timestamp_ms}",
            f.feedback_type, f.user_id, f.item_id
        );
        let time = chrono::DateTime::from_timestamp_millis(timestamp_ms)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .ok_or_else(|| invalid(format!("{at}.Timestamp"), "is out of range"))?;
        let input = EventInput {
            event_id: Some(
                uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, id_seed.as_bytes()).to_string(),
            ),
            user_id: Some(f.user_id),
            item_id: Some(f.item_id),
            event_type: Some(event_type.as_str().to_string()),
            value: f.value.filter(|v| *v != 0.0),
            timestamp: Some(TimestampInput::Rfc3339(time)),
            context: Some(serde_json::json!({ "gorse_feedback_type": f.feedback_type })),
            ..Default::default()
        };
        let e = input.validate(now_ms, &limits).map_err(|e| {
            let field = match e.field() {
                "user_id" => "UserId",
                "item_id" => "ItemId",
                "value" => "Value",
                "timestamp" => "Timestamp",
                other => other,
            };
            invalid(format!("{at}.{field}"), e.to_string())
        })?;
        records.push(FeedbackRecord {
            feedback_type: f.feedback_type,
            user_id: e.user_id.clone().expect("validated with a user"),
            item_id: e.item_id.clone(),
            timestamp_ms,
            value: f.value.unwrap_or(0.0),
            comment,
        });
        events.push(e);
    }
    super::events::fill_categories(s, &mut events);
    Ok((records, events))
}

/// Writes feedback: the events first (what recommendations use, durable and idempotent),
/// then the records, and users not seen before (Gorse inserts them too). A failure part-way
/// answers 503 and the whole batch can be resent.
async fn write_feedback(
    s: &AppState,
    input: Vec<GorseFeedback>,
    overwrite: bool,
) -> GResult<usize> {
    let (mut records, mut events) = feedback_events(s, input, event::now_ms())?;
    if !overwrite {
        let mut keep = Vec::with_capacity(records.len());
        for r in &records {
            let existing = s.users.user_feedback(&r.user_id).await?;
            keep.push(!existing.iter().any(|e| e.key() == r.key()));
        }
        let mut flags = keep.iter();
        records.retain(|_| *flags.next().unwrap_or(&true));
        let mut flags = keep.iter();
        events.retain(|_| *flags.next().unwrap_or(&true));
    }
    if records.is_empty() {
        return Ok(0);
    }
    super::events::ingest(s, events).await?;
    let mut new_users: Vec<UserRecord> = Vec::new();
    for r in &records {
        if new_users.iter().any(|u| u.user_id == r.user_id) {
            continue;
        }
        if s.users.user(&r.user_id).await?.is_none() {
            new_users.push(UserRecord {
                user_id: r.user_id.clone(),
                labels: Vec::new(),
                comment: String::new(),
            });
        }
    }
    s.users.put_users(&new_users).await?;
    s.users.put_feedback(&records).await?;
    Ok(records.len())
}

async fn feedback_body(s: &AppState, req: Request) -> GResult<Vec<GorseFeedback>> {
    Ok(match body::<FeedbackBody>(s, req).await? {
        FeedbackBody::Many(v) => v,
        FeedbackBody::One(f) => vec![f],
    })
}

/// Inserts feedback (one or an array), replacing feedback of the same type, user and item.
#[utoipa::path(post, path = "/api/feedback", tag = "gorse", request_body = Vec<GorseFeedback>,
    responses(
        (status = 200, body = RowAffected),
        (status = 400, body = ErrorBody),
        (status = 401, description = "X-API-Key is missing or wrong", body = ErrorBody),
        (status = 403, description = "no API key is configured: the Gorse API is off", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 415, description = "the body is not sent as application/json", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn insert_feedback(
    State(s): State<AppState>,
    req: Request,
) -> GResult<Json<RowAffected>> {
    let input = feedback_body(&s, req).await?;
    let n = write_feedback(&s, input, true).await?;
    Ok(Json(RowAffected { row_affected: n }))
}

/// Inserts feedback, keeping feedback that already exists (gorsejs' `upsertFeedbacks`).
#[utoipa::path(put, path = "/api/feedback", tag = "gorse", request_body = Vec<GorseFeedback>,
    responses(
        (status = 200, body = RowAffected),
        (status = 400, body = ErrorBody),
        (status = 401, description = "X-API-Key is missing or wrong", body = ErrorBody),
        (status = 403, description = "no API key is configured: the Gorse API is off", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 415, description = "the body is not sent as application/json", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn put_feedback(State(s): State<AppState>, req: Request) -> GResult<Json<RowAffected>> {
    let input = feedback_body(&s, req).await?;
    let n = write_feedback(&s, input, false).await?;
    Ok(Json(RowAffected { row_affected: n }))
}

/// A page of feedback, ordered by user, item and type.
#[utoipa::path(get, path = "/api/feedback", tag = "gorse",
    params(
        ("n" = Option<usize>, Query, description = "feedback per page (default 100, at most 10000)"),
        ("cursor" = Option<String>, Query, description = "the previous page's Cursor; empty for the first page"),
    ),
    responses(
        (status = 200, body = FeedbackPage),
        (status = 400, body = ErrorBody),
        (status = 401, description = "X-API-Key is missing or wrong", body = ErrorBody),
        (status = 403, description = "no API key is configured: the Gorse API is off", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn list_feedback(
    State(s): State<AppState>,
    q: QueryPairs,
) -> GResult<Json<FeedbackPage>> {
    q.allow_only(&["n", "cursor", "Cursor"])?;
    let n = count(&q, DEFAULT_PAGE, MAX_PAGE)?;
    let after = cursor(&q)?;
    let records = s.users.feedback_after(after.as_deref(), n).await?;
    let last = records.last().map(FeedbackRecord::key);
    Ok(Json(FeedbackPage {
        cursor: next_cursor(records.len(), n, last),
        feedback: records.into_iter().map(GorseFeedback::from).collect(),
    }))
}

/// A user's feedback of one type.
#[utoipa::path(get, path = "/api/user/{user_id}/feedback/{feedback_type}", tag = "gorse",
    params(("user_id" = String, Path), ("feedback_type" = String, Path)),
    responses(
        (status = 200, body = Vec<GorseFeedback>),
        (status = 400, body = ErrorBody),
        (status = 404, description = "no route: an empty path segment", body = ErrorBody),
        (status = 401, description = "X-API-Key is missing or wrong", body = ErrorBody),
        (status = 403, description = "no API key is configured: the Gorse API is off", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn user_feedback_of_type(
    State(s): State<AppState>,
    ApiPath((user_id, feedback_type)): ApiPath<(String, String)>,
) -> GResult<Json<Vec<GorseFeedback>>> {
    let user = parse_user(user_id, "user_id")?;
    let records = s.users.user_feedback(&user).await?;
    Ok(Json(
        records
            .into_iter()
            .filter(|r| r.feedback_type == feedback_type)
            .map(GorseFeedback::from)
            .collect(),
    ))
}

/// A user's feedback of every type.
#[utoipa::path(get, path = "/api/user/{user_id}/feedback", tag = "gorse",
    params(("user_id" = String, Path)),
    responses(
        (status = 200, body = Vec<GorseFeedback>),
        (status = 400, body = ErrorBody),
        (status = 404, description = "no route: an empty path segment", body = ErrorBody),
        (status = 401, description = "X-API-Key is missing or wrong", body = ErrorBody),
        (status = 403, description = "no API key is configured: the Gorse API is off", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn user_feedback(
    State(s): State<AppState>,
    ApiPath(user_id): ApiPath<String>,
) -> GResult<Json<Vec<GorseFeedback>>> {
    let user = parse_user(user_id, "user_id")?;
    let records = s.users.user_feedback(&user).await?;
    Ok(Json(records.into_iter().map(GorseFeedback::from).collect()))
}

async fn pair_feedback(
    s: &AppState,
    user_id: String,
    item_id: String,
    feedback_type: Option<&str>,
) -> GResult<Vec<GorseFeedback>> {
    let user = parse_user(user_id, "user_id")?;
    let item = parse_item(item_id, "item_id")?;
    Ok(s.users
        .user_feedback(&user)
        .await?
        .into_iter()
        .filter(|r| r.item_id == item && feedback_type.is_none_or(|t| r.feedback_type == t))
        .map(GorseFeedback::from)
        .collect())
}

async fn remove_feedback(
    s: &AppState,
    user_id: String,
    item_id: String,
    feedback_type: Option<&str>,
) -> GResult<Json<RowAffected>> {
    let user = parse_user(user_id, "user_id")?;
    let item = parse_item(item_id, "item_id")?;
    let gone = s.users.delete_feedback(&user, &item, feedback_type).await?;
    Ok(Json(RowAffected {
        row_affected: gone.len(),
    }))
}

/// A user's feedback on an item, of every type.
#[utoipa::path(get, path = "/api/feedback/{user_id}/{item_id}", tag = "gorse",
    params(("user_id" = String, Path), ("item_id" = String, Path)),
    responses(
        (status = 200, body = Vec<GorseFeedback>),
        (status = 400, body = ErrorBody),
        (status = 404, description = "no route: an empty path segment", body = ErrorBody),
        (status = 401, description = "X-API-Key is missing or wrong", body = ErrorBody),
        (status = 403, description = "no API key is configured: the Gorse API is off", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn get_feedback_pair(
    State(s): State<AppState>,
    ApiPath((user_id, item_id)): ApiPath<(String, String)>,
) -> GResult<Json<Vec<GorseFeedback>>> {
    Ok(Json(pair_feedback(&s, user_id, item_id, None).await?))
}

/// Deletes a user's feedback on an item, of every type; the item leaves the user's history.
#[utoipa::path(delete, path = "/api/feedback/{user_id}/{item_id}", tag = "gorse",
    params(("user_id" = String, Path), ("item_id" = String, Path)),
    responses(
        (status = 200, body = RowAffected),
        (status = 400, body = ErrorBody),
        (status = 404, description = "no route: an empty path segment", body = ErrorBody),
        (status = 401, description = "X-API-Key is missing or wrong", body = ErrorBody),
        (status = 403, description = "no API key is configured: the Gorse API is off", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn delete_feedback_pair(
    State(s): State<AppState>,
    ApiPath((user_id, item_id)): ApiPath<(String, String)>,
) -> GResult<Json<RowAffected>> {
    remove_feedback(&s, user_id, item_id, None).await
}

/// A user's feedback of one type on an item (gorsejs' `getFeedback`): 404 when there is none.
#[utoipa::path(get, path = "/api/feedback/{feedback_type}/{user_id}/{item_id}", tag = "gorse",
    params(("feedback_type" = String, Path), ("user_id" = String, Path), ("item_id" = String, Path)),
    responses(
        (status = 200, body = GorseFeedback),
        (status = 400, body = ErrorBody),
        (status = 401, description = "X-API-Key is missing or wrong", body = ErrorBody),
        (status = 403, description = "no API key is configured: the Gorse API is off", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn get_feedback_typed(
    State(s): State<AppState>,
    ApiPath((feedback_type, user_id, item_id)): ApiPath<(String, String, String)>,
) -> GResult<Json<GorseFeedback>> {
    pair_feedback(&s, user_id, item_id, Some(&feedback_type))
        .await?
        .into_iter()
        .next()
        .map(Json)
        .ok_or_else(|| not_found("feedback", &feedback_type))
}

/// Deletes a user's feedback of one type on an item (gorsejs' `deleteFeedback`).
#[utoipa::path(delete, path = "/api/feedback/{feedback_type}/{user_id}/{item_id}", tag = "gorse",
    params(("feedback_type" = String, Path), ("user_id" = String, Path), ("item_id" = String, Path)),
    responses(
        (status = 200, body = RowAffected),
        (status = 400, body = ErrorBody),
        (status = 404, description = "no route: an empty path segment", body = ErrorBody),
        (status = 401, description = "X-API-Key is missing or wrong", body = ErrorBody),
        (status = 403, description = "no API key is configured: the Gorse API is off", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn delete_feedback_typed(
    State(s): State<AppState>,
    ApiPath((feedback_type, user_id, item_id)): ApiPath<(String, String, String)>,
) -> GResult<Json<RowAffected>> {
    remove_feedback(&s, user_id, item_id, Some(&feedback_type)).await
}

// ---- recommendations --------------------------------------------------------------------

/// The pipeline assigns the experiment variant (and its boosts); Gorse clients ask for none.
fn request(request_id: String, user: Option<UserId>, k: usize, filter: Filter) -> RecommendRequest {
    RecommendRequest {
        request_id,
        user,
        session: None,
        k,
        filter,
        boosts: Vec::new(),
    }
}

/// Hidden items never; one category when given.
fn visible_in(category: Option<String>) -> Filter {
    Filter {
        available_only: true,
        include_categories: category.into_iter().collect(),
        ..Default::default()
    }
}

fn scored(recs: Recommendations, offset: usize) -> Vec<Scored> {
    recs.items
        .into_iter()
        .skip(offset)
        .map(|r| Scored {
            id: r.entry.id().to_string(),
            score: f64::from(r.score),
        })
        .collect()
}

/// Gorse's `X-API-Version: 2` asks for scores.
fn wants_scores(headers: &HeaderMap) -> bool {
    headers
        .get("x-api-version")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim() == "2")
}

/// Personal recommendations for a user (`n`, `offset`), never an item the user gave
/// feedback on nor a hidden one. `write-back-type` records the answer as feedback of that
/// type (timestamped `write-back-delay` from now), as Gorse does.
#[utoipa::path(get, path = "/api/recommend/{user_id}", tag = "gorse",
    params(
        ("user_id" = String, Path),
        ("n" = Option<usize>, Query, description = "default 10"),
        ("offset" = Option<usize>, Query, description = "n + offset at most 200"),
        ("write-back-type" = Option<String>, Query, description = "record the answer as feedback of this type"),
        ("write-back-delay" = Option<String>, Query, description = "a Go duration (10m, 1h) added to the written-back feedback's time"),
        ("X-API-Version" = Option<String>, Header, description = "2: ids with scores"),
    ),
    responses(
        (status = 200, body = RecommendBody),
        (status = 400, body = ErrorBody),
        (status = 404, description = "no route: an empty path segment", body = ErrorBody),
        (status = 401, description = "X-API-Key is missing or wrong", body = ErrorBody),
        (status = 403, description = "no API key is configured: the Gorse API is off", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn recommend(
    State(s): State<AppState>,
    RequestId(rid): RequestId,
    headers: HeaderMap,
    ApiPath(user_id): ApiPath<String>,
    q: QueryPairs,
) -> GResult<Json<RecommendBody>> {
    recommend_for(&s, rid, &headers, user_id, None, &q).await
}

/// [`recommend`] in one category.
#[utoipa::path(get, path = "/api/recommend/{user_id}/{category}", tag = "gorse",
    params(
        ("user_id" = String, Path), ("category" = String, Path),
        ("n" = Option<usize>, Query), ("offset" = Option<usize>, Query),
        ("write-back-type" = Option<String>, Query), ("write-back-delay" = Option<String>, Query),
        ("X-API-Version" = Option<String>, Header, description = "2: ids with scores"),
    ),
    responses(
        (status = 200, body = RecommendBody),
        (status = 400, body = ErrorBody),
        (status = 404, description = "no route: an empty path segment", body = ErrorBody),
        (status = 401, description = "X-API-Key is missing or wrong", body = ErrorBody),
        (status = 403, description = "no API key is configured: the Gorse API is off", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn recommend_in(
    State(s): State<AppState>,
    RequestId(rid): RequestId,
    headers: HeaderMap,
    ApiPath((user_id, category)): ApiPath<(String, String)>,
    q: QueryPairs,
) -> GResult<Json<RecommendBody>> {
    recommend_for(&s, rid, &headers, user_id, Some(category), &q).await
}

async fn recommend_for(
    s: &AppState,
    rid: String,
    headers: &HeaderMap,
    user_id: String,
    category: Option<String>,
    q: &QueryPairs,
) -> GResult<Json<RecommendBody>> {
    q.allow_only(&["n", "offset", "write-back-type", "write-back-delay"])?;
    let (n, offset) = n_offset(q)?;
    let user = parse_user(user_id, "user_id")?;
    let write_back = q.one("write-back-type")?.map(str::to_string);
    let delay_ms = match q.one("write-back-delay")? {
        Some(d) => parse_go_duration(d, "write-back-delay")?,
        None => 0,
    };
    let max_ms = (s.settings.session.max_future_secs as i64).saturating_mul(1000);
    if !(0..=max_ms).contains(&delay_ms) {
        return Err(invalid(
            "write-back-delay",
            format!(
                "must be at most session.max_future_secs ({} s)",
                max_ms / 1000
            ),
        ));
    }
    // What the user gave feedback on is not recommended again (Gorse's rule), newest first
    // up to the filter's bound.
    let mut seen = s.users.user_feedback(&user).await?;
    seen.sort_by_key(|r| std::cmp::Reverse(r.timestamp_ms));
    let mut filter = visible_in(category.filter(|c| !c.is_empty()));
    filter.exclude_items = seen.into_iter().take(MAX_LIST).map(|r| r.item_id).collect();
    let req = request(rid, Some(user.clone()), n + offset, filter);
    let recs = s.recommender.recommend(&req).await;
    s.stats.record_source(recs.source);
    let items = scored(recs, offset);
    if let Some(feedback_type) = write_back {
        let now = event::now_ms() + delay_ms;
        let time = chrono::DateTime::from_timestamp_millis(now)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
        let input = items
            .iter()
            .map(|i| GorseFeedback {
                feedback_type: feedback_type.clone(),
                user_id: user.to_string(),
                item_id: i.id.clone(),
                timestamp: time.clone(),
                value: None,
                comment: None,
            })
            .collect();
        write_feedback(s, input, true)
            .await
            .map_err(|e| match e.0 {
                AppError::Invalid { reason, .. } => invalid("write-back-type", reason),
                other => GorseError(other),
            })?;
    }
    Ok(Json(if wants_scores(headers) {
        RecommendBody::Scored(items)
    } else {
        RecommendBody::Ids(items.into_iter().map(|i| i.id).collect())
    }))
}

/// Recommendations for an anonymous session given as feedback (nothing is stored): the
/// items nearest to its newest items, never one of them nor a hidden item.
#[utoipa::path(post, path = "/api/session/recommend", tag = "gorse",
    request_body = Vec<GorseFeedback>,
    params(("n" = Option<usize>, Query), ("offset" = Option<usize>, Query)),
    responses(
        (status = 200, body = Vec<Scored>),
        (status = 400, body = ErrorBody),
        (status = 401, description = "X-API-Key is missing or wrong", body = ErrorBody),
        (status = 403, description = "no API key is configured: the Gorse API is off", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 415, description = "the body is not sent as application/json", body = ErrorBody),
    ))]
pub async fn session_recommend(
    State(s): State<AppState>,
    RequestId(rid): RequestId,
    q: QueryPairs,
    req: Request,
) -> GResult<Json<Vec<Scored>>> {
    session_for(&s, rid, None, &q, req).await
}

/// [`session_recommend`] in one category.
#[utoipa::path(post, path = "/api/session/recommend/{category}", tag = "gorse",
    request_body = Vec<GorseFeedback>,
    params(("category" = String, Path), ("n" = Option<usize>, Query), ("offset" = Option<usize>, Query)),
    responses(
        (status = 200, body = Vec<Scored>),
        (status = 400, body = ErrorBody),
        (status = 404, description = "no route: an empty path segment", body = ErrorBody),
        (status = 401, description = "X-API-Key is missing or wrong", body = ErrorBody),
        (status = 403, description = "no API key is configured: the Gorse API is off", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 415, description = "the body is not sent as application/json", body = ErrorBody),
    ))]
pub async fn session_recommend_in(
    State(s): State<AppState>,
    RequestId(rid): RequestId,
    ApiPath(category): ApiPath<String>,
    q: QueryPairs,
    req: Request,
) -> GResult<Json<Vec<Scored>>> {
    session_for(&s, rid, Some(category), &q, req).await
}

async fn session_for(
    s: &AppState,
    rid: String,
    category: Option<String>,
    q: &QueryPairs,
    req: Request,
) -> GResult<Json<Vec<Scored>>> {
    q.allow_only(&["n", "offset"])?;
    let (n, offset) = n_offset(q)?;
    let mut feedback = feedback_body(s, req).await?;
    // Newest first; unknown items say nothing about the catalog and are skipped.
    let now = event::now_ms();
    let mut times = Vec::with_capacity(feedback.len());
    for (i, f) in feedback.iter().enumerate() {
        times.push(parse_time(
            f.timestamp.as_deref(),
            &format!("feedback[{i}].Timestamp"),
            now,
        )?);
    }
    let mut order: Vec<usize> = (0..feedback.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(times[i]));
    let mut given = Vec::new();
    for i in order {
        let raw = std::mem::take(&mut feedback[i].item_id);
        let id = parse_item(raw, &format!("feedback[{i}].ItemId"))?;
        if s.catalog.get(&id).is_some() && !given.contains(&id) {
            given.push(id);
        }
    }
    let mut filter = visible_in(category.filter(|c| !c.is_empty()));
    filter.exclude_items = given.iter().take(MAX_LIST).cloned().collect();
    let k = n + offset;
    let mut best: std::collections::HashMap<ItemId, f64> = Default::default();
    for anchor in given.iter().take(SESSION_ANCHORS) {
        let req = request(rid.clone(), None, k, filter.clone());
        for r in s.recommender.similar(anchor, &req).await?.items {
            let score = best.entry(r.entry.id().clone()).or_insert(f64::MIN);
            *score = score.max(f64::from(r.score));
        }
    }
    let mut ranked: Vec<Scored> = best
        .into_iter()
        .map(|(id, score)| Scored {
            id: id.to_string(),
            score,
        })
        .collect();
    ranked.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.id.cmp(&b.id)));
    Ok(Json(ranked.into_iter().skip(offset).take(n).collect()))
}

/// Items like one item, never a hidden one (`n`, `offset`); 404 for an unknown item.
#[utoipa::path(get, path = "/api/item/{item_id}/neighbors", tag = "gorse",
    params(("item_id" = String, Path), ("n" = Option<usize>, Query), ("offset" = Option<usize>, Query)),
    responses(
        (status = 200, body = Vec<Scored>),
        (status = 400, body = ErrorBody),
        (status = 401, description = "X-API-Key is missing or wrong", body = ErrorBody),
        (status = 403, description = "no API key is configured: the Gorse API is off", body = ErrorBody),
        (status = 404, body = ErrorBody),
    ))]
pub async fn neighbors(
    State(s): State<AppState>,
    RequestId(rid): RequestId,
    ApiPath(item_id): ApiPath<String>,
    q: QueryPairs,
) -> GResult<Json<Vec<Scored>>> {
    neighbors_of(&s, rid, item_id, None, &q).await
}

/// [`neighbors`] in one category.
#[utoipa::path(get, path = "/api/item/{item_id}/neighbors/{category}", tag = "gorse",
    params(("item_id" = String, Path), ("category" = String, Path), ("n" = Option<usize>, Query), ("offset" = Option<usize>, Query)),
    responses(
        (status = 200, body = Vec<Scored>),
        (status = 400, body = ErrorBody),
        (status = 401, description = "X-API-Key is missing or wrong", body = ErrorBody),
        (status = 403, description = "no API key is configured: the Gorse API is off", body = ErrorBody),
        (status = 404, body = ErrorBody),
    ))]
pub async fn neighbors_in(
    State(s): State<AppState>,
    RequestId(rid): RequestId,
    ApiPath((item_id, category)): ApiPath<(String, String)>,
    q: QueryPairs,
) -> GResult<Json<Vec<Scored>>> {
    neighbors_of(&s, rid, item_id, Some(category), &q).await
}

async fn neighbors_of(
    s: &AppState,
    rid: String,
    item_id: String,
    category: Option<String>,
    q: &QueryPairs,
) -> GResult<Json<Vec<Scored>>> {
    q.allow_only(&["n", "offset"])?;
    let (n, offset) = n_offset(q)?;
    let item = parse_item(item_id, "item_id")?;
    let req = request(
        rid,
        None,
        n + offset,
        visible_in(category.filter(|c| !c.is_empty())),
    );
    let recs = s.recommender.similar(&item, &req).await?;
    Ok(Json(scored(recs, offset)))
}

/// Trending items (tandem's decayed event counts), never hidden ones.
#[utoipa::path(get, path = "/api/popular", tag = "gorse",
    params(("n" = Option<usize>, Query), ("offset" = Option<usize>, Query)),
    responses(
        (status = 200, body = Vec<Scored>),
        (status = 400, body = ErrorBody),
        (status = 401, description = "X-API-Key is missing or wrong", body = ErrorBody),
        (status = 403, description = "no API key is configured: the Gorse API is off", body = ErrorBody),
    ))]
pub async fn popular(
    State(s): State<AppState>,
    RequestId(rid): RequestId,
    q: QueryPairs,
) -> GResult<Json<Vec<Scored>>> {
    popular_of(&s, rid, None, &q).await
}

/// [`popular`] in one category.
#[utoipa::path(get, path = "/api/popular/{category}", tag = "gorse",
    params(("category" = String, Path), ("n" = Option<usize>, Query), ("offset" = Option<usize>, Query)),
    responses(
        (status = 200, body = Vec<Scored>),
        (status = 400, body = ErrorBody),
        (status = 404, description = "no route: an empty path segment", body = ErrorBody),
        (status = 401, description = "X-API-Key is missing or wrong", body = ErrorBody),
        (status = 403, description = "no API key is configured: the Gorse API is off", body = ErrorBody),
    ))]
pub async fn popular_in(
    State(s): State<AppState>,
    RequestId(rid): RequestId,
    ApiPath(category): ApiPath<String>,
    q: QueryPairs,
) -> GResult<Json<Vec<Scored>>> {
    popular_of(&s, rid, Some(category), &q).await
}

async fn popular_of(
    s: &AppState,
    rid: String,
    category: Option<String>,
    q: &QueryPairs,
) -> GResult<Json<Vec<Scored>>> {
    q.allow_only(&["n", "offset"])?;
    let (n, offset) = n_offset(q)?;
    let req = request(
        rid,
        None,
        n + offset,
        visible_in(category.filter(|c| !c.is_empty())),
    );
    Ok(Json(scored(s.recommender.trending(&req).await, offset)))
}

/// The newest items by `Timestamp` (the score is its unix time), never hidden ones.
#[utoipa::path(get, path = "/api/latest", tag = "gorse",
    params(("n" = Option<usize>, Query), ("offset" = Option<usize>, Query)),
    responses(
        (status = 200, body = Vec<Scored>),
        (status = 400, body = ErrorBody),
        (status = 401, description = "X-API-Key is missing or wrong", body = ErrorBody),
        (status = 403, description = "no API key is configured: the Gorse API is off", body = ErrorBody),
    ))]
pub async fn latest(State(s): State<AppState>, q: QueryPairs) -> GResult<Json<Vec<Scored>>> {
    latest_of(&s, None, &q)
}

/// [`latest`] in one category.
#[utoipa::path(get, path = "/api/latest/{category}", tag = "gorse",
    params(("category" = String, Path), ("n" = Option<usize>, Query), ("offset" = Option<usize>, Query)),
    responses(
        (status = 200, body = Vec<Scored>),
        (status = 400, body = ErrorBody),
        (status = 404, description = "no route: an empty path segment", body = ErrorBody),
        (status = 401, description = "X-API-Key is missing or wrong", body = ErrorBody),
        (status = 403, description = "no API key is configured: the Gorse API is off", body = ErrorBody),
    ))]
pub async fn latest_in(
    State(s): State<AppState>,
    ApiPath(category): ApiPath<String>,
    q: QueryPairs,
) -> GResult<Json<Vec<Scored>>> {
    latest_of(&s, Some(category), &q)
}

fn latest_of(s: &AppState, category: Option<String>, q: &QueryPairs) -> GResult<Json<Vec<Scored>>> {
    q.allow_only(&["n", "offset"])?;
    let (n, offset) = n_offset(q)?;
    let filter = visible_in(category.filter(|c| !c.is_empty()));
    let mut entries: Vec<Arc<CatalogEntry>> = s
        .catalog
        .entries()
        .into_iter()
        .filter(|e| filter.matches(&e.item))
        .collect();
    let newest_first = |a: &Arc<CatalogEntry>, b: &Arc<CatalogEntry>| {
        b.item
            .created_at
            .cmp(&a.item.created_at)
            .then_with(|| a.item.item_id.cmp(&b.item.item_id))
    };
    let k = n + offset;
    if entries.len() > k {
        entries.select_nth_unstable_by(k, newest_first);
        entries.truncate(k);
    }
    entries.sort_by(newest_first);
    Ok(Json(
        entries
            .into_iter()
            .skip(offset)
            .map(|e| Scored {
                id: e.id().to_string(),
                score: e.item.created_at.unwrap_or(0) as f64,
            })
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_and_gorse_times() {
        assert_eq!(parse_go_duration("1h30m", "d").unwrap(), 5_400_000);
        assert_eq!(parse_go_duration("250ms", "d").unwrap(), 250);
        assert!(parse_go_duration("10 minutes", "d").is_err());
        assert_eq!(
            parse_time(Some("2022-02-24"), "t", 0).unwrap(),
            1_645_660_800_000
        );
        assert_eq!(parse_time(Some(""), "t", 42).unwrap(), 42);
        assert!(parse_time(Some("yesterday"), "t", 0).is_err());
    }

    #[test]
    fn cursors_round_trip_and_name_fields_in_gorse_terms() {
        let key = "bob\u{1f}item 1\u{1f}star";
        let q = QueryPairs(vec![("cursor".into(), to_cursor(key))]);
        assert_eq!(cursor(&q).unwrap().as_deref(), Some(key));
        let bad = QueryPairs(vec![("cursor".into(), "zz".into())]);
        assert!(cursor(&bad).is_err());
        assert_eq!(gorse_field("items[2].title"), "items[2].Comment");
        assert_eq!(gorse_field("item.tags[3]"), "item.Labels[3]");
    }
}
