//! The OpenAPI document, generated from the handlers' own types, served at `/openapi.json`
//! and committed as `schemas/openapi.json` (a test fails when the two drift apart).

use super::types::{MAX_CATEGORIES, MAX_ITEMS_BATCH, MAX_K, MAX_LIST, MAX_NAME_LEN, MAX_TITLE_LEN};
use super::{gorse, routes, stats, AppState};
use crate::domain::{EventType, MAX_ID_LEN};
use axum::extract::State;
use axum::Json;
use chrono::Datelike;
use serde_json::{json, Value};
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
    let mut s = serde_json::to_string_pretty(&document()).expect("the OpenAPI document serializes");
    s.push('\n');
    s
}

/// The generated document with the handlers' rules stated in it ([`state_rules`]).
pub fn document() -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the OpenAPI document serializes");
    state_rules(&mut doc);
    doc
}

/// The served document also states the rules that depend on the running server: the
/// category names the catalog knows (an unknown one is a 422), the event batch limit and
/// how far in the future a timestamp may be, as of this request.
pub async fn serve_openapi(State(s): State<AppState>) -> Json<Value> {
    let mut doc = document();
    let names: Vec<String> = s.catalog.categories().into_iter().map(|(c, _)| c).collect();
    let session = &s.settings.session;
    // Only filterable names may be filtered on (another is a 422).
    let mut filterable = vec!["region".to_string(), "language".to_string()];
    filterable.extend(s.settings.catalog.filterable.iter().cloned());
    let names_rule = json!({"type": "string", "enum": filterable});
    each_parameter(&mut doc, |_, p| {
        if let Some(f @ ("attr" | "attr_not" | "attr_min" | "attr_max")) = p["name"].as_str() {
            let rule = attr_filter(f, names_rule.clone());
            merge(&mut p["schema"], rule);
        }
    });
    let recommend = &mut doc["components"]["schemas"]["RecommendParams"]["properties"];
    for f in ["attr", "attr_not", "attr_min", "attr_max"] {
        if recommend.get(f).is_some() {
            merge(&mut recommend[f], attr_filter_body(f, names_rule.clone()));
        }
    }
    live_rules(
        &mut doc,
        &names,
        session.max_batch,
        chrono::Utc::now().timestamp_millis(),
        session.max_future_secs as i64 * 1000,
    );
    Json(doc)
}

/// No control characters (`char::is_control`: U+0000-001F, U+007F-009F).
const NO_CONTROL: &str = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$";
/// No control characters, and not only whitespace.
const NAME: &str = "^[^\\u0000-\\u001f\\u007f-\\u009f]*[^\\s\\u0000-\\u001f\\u007f-\\u009f][^\\u0000-\\u001f\\u007f-\\u009f]*$";
const UUID: &str = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$";

fn id() -> Value {
    json!({"type": "string", "minLength": 1, "maxLength": MAX_ID_LEN, "pattern": NO_CONTROL})
}

fn name() -> Value {
    json!({"type": "string", "minLength": 1, "maxLength": MAX_NAME_LEN, "pattern": NAME})
}

/// An attribute's name (`domain::Attributes`): ASCII letters, digits and `_`, starting with a
/// letter or `_`, at most 64 characters.
fn attr_name() -> Value {
    json!({"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]{0,63}$"})
}

/// A request's attribute filter (`attr.<name>=...`): names as `names` allows, values names
/// (`attr`, `attr_not`) or numbers (`attr_min`, `attr_max`).
fn attr_filter(field: &str, names: Value) -> Value {
    let value = if field.ends_with("_min") || field.ends_with("_max") {
        json!({"type": "number"})
    } else {
        name()
    };
    json!({"type": "object", "propertyNames": names, "additionalProperties": value})
}

/// [`attr_filter`] in a JSON body, where `attr` and `attr_not` take lists of values.
fn attr_filter_body(field: &str, names: Value) -> Value {
    let value = if field.ends_with("_min") || field.ends_with("_max") {
        json!({"type": "number"})
    } else {
        json!({"type": "array", "items": name(), "minItems": 1, "maxItems": MAX_CATEGORIES})
    };
    json!({"type": "object", "propertyNames": names, "additionalProperties": value})
}

/// A boost rule's name: the built-in rules' (settings may define more, which the server
/// accepts too).
fn boost_name() -> Value {
    let names: Vec<String> = crate::config::BoostRules::default()
        .names()
        .into_iter()
        .map(String::from)
        .collect();
    json!({"type": "string", "enum": names})
}

fn k() -> Value {
    json!({"type": "integer", "format": "int64", "minimum": 1, "maximum": MAX_K})
}

/// A price or a popularity: finite, 0 or more, and within an `f32`.
fn non_negative() -> Value {
    json!({"type": "number", "minimum": 0, "maximum": f32::MAX as f64})
}

fn list(items: Value, max: usize) -> Value {
    json!({"type": "array", "items": items, "maxItems": max})
}

/// `rule` with `null` allowed too (an `Option` field of a body).
fn nullable(mut rule: Value) -> Value {
    if let Some(t) = rule.get("type").and_then(Value::as_str).map(str::to_string) {
        rule["type"] = json!([t, "null"]);
    }
    rule
}

/// Calls `f` with each operation's path and each of its parameters.
fn each_parameter(doc: &mut Value, mut f: impl FnMut(&str, &mut Value)) {
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        for op in item
            .as_object_mut()
            .into_iter()
            .flat_map(|ops| ops.values_mut())
        {
            // `get_mut`, not indexing: indexing would add `parameters: null`.
            if let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) {
                params.iter_mut().for_each(|p| f(path, p));
            }
        }
    }
}

/// Sets each key of `rule` on `target`, keeping the keys it does not name (a description).
fn merge(target: &mut Value, rule: Value) {
    if let (Some(t), Value::Object(r)) = (target.as_object_mut(), rule) {
        t.extend(r);
    }
}

/// The rules the handlers enforce (types.rs, event.rs, domain.rs), stated in the document so
/// that a client generated from it validates as the server does: bounds, lengths, list
/// sizes, patterns, and which of two fields is required. Rules that depend on the running
/// server are added when it is served ([`live_rules`]).
pub fn state_rules(doc: &mut Value) {
    // Query and path parameters, by name.
    each_parameter(doc, |path, p| {
        // Gorse's pages (`n` records of a listing) go to 10,000; its lists to 200.
        let pages = ["/api/items", "/api/users", "/api/feedback"];
        let max_n = if pages.contains(&path) { 10_000 } else { MAX_K };
        let is_array = p["schema"]["type"] == "array";
        let rule = match p["name"].as_str() {
            Some("item_id" | "user_id" | "session_id") => id(),
            Some("k") => k(),
            Some("n") => json!({"type": "integer", "minimum": 1, "maximum": max_n}),
            Some("offset") => json!({"type": "integer", "minimum": 0}),
            Some("region" | "language") => name(),
            Some("boost") => list(boost_name(), MAX_LIST),
            Some(f @ ("attr" | "attr_not" | "attr_min" | "attr_max")) => {
                attr_filter(f, attr_name())
            }
            Some("category" | "exclude_category") if is_array => list(name(), MAX_CATEGORIES),
            Some("category") => name(),
            Some("exclude") => list(id(), MAX_LIST),
            Some("price_min" | "price_max") => non_negative(),
            _ => return,
        };
        merge(&mut p["schema"], rule);
    });
    // Past 64 KiB the HTTP parser refuses a URL itself (414, no body): a long `exclude` list
    // of long ids can reach it, and no JSON Schema keyword can bound a whole query string.
    if let Some(paths) = doc["paths"].as_object_mut() {
        for op in paths.values_mut().filter_map(Value::as_object_mut) {
            for op in op.values_mut() {
                let has_query = op
                    .get("parameters")
                    .and_then(Value::as_array)
                    .is_some_and(|ps| ps.iter().any(|p| p["in"] == "query"));
                if has_query {
                    op["responses"]["414"] = json!({
                        "description": "the URL is longer than 64 KiB (a long `exclude` list: `POST /v1/recommendations` takes the same fields in a body)"
                    });
                }
            }
        }
    }
    let schemas = &mut doc["components"]["schemas"];
    let recommend = &mut schemas["RecommendParams"]["properties"];
    for f in ["user_id", "session_id"] {
        merge(&mut recommend[f], nullable(id()));
    }
    merge(&mut recommend["k"], nullable(k()));
    for f in ["category", "exclude_category"] {
        merge(&mut recommend[f], list(name(), MAX_CATEGORIES));
    }
    merge(&mut recommend["exclude"], list(id(), MAX_LIST));
    for f in ["region", "language"] {
        merge(&mut recommend[f], nullable(name()));
    }
    merge(&mut recommend["boost"], list(boost_name(), MAX_LIST));
    for f in ["attr", "attr_not", "attr_min", "attr_max"] {
        if recommend.get(f).is_some() {
            merge(&mut recommend[f], attr_filter_body(f, attr_name()));
        }
    }
    for f in ["price_min", "price_max"] {
        merge(&mut recommend[f], nullable(non_negative()));
    }

    let item = &mut schemas["ItemInput"]["properties"];
    merge(&mut item["item_id"], id());
    merge(
        &mut item["title"],
        json!({"type": "string", "maxLength": MAX_TITLE_LEN, "pattern": NO_CONTROL}),
    );
    for f in ["categories", "tags"] {
        merge(&mut item[f], list(name(), MAX_CATEGORIES));
    }
    merge(&mut item["price"], nullable(non_negative()));
    merge(&mut item["popularity"], nullable(non_negative()));
    merge(
        &mut item["attributes"],
        json!({"propertyNames": attr_name()}),
    );
    merge(
        &mut item["year"],
        json!({"type": ["integer", "null"], "minimum": i32::MIN, "maximum": i32::MAX}),
    );
    merge(
        &mut item["created_at"],
        json!({"type": ["integer", "null"], "minimum": i64::MIN, "maximum": i64::MAX}),
    );
    merge(
        &mut schemas["ItemsUpsert"]["properties"]["items"],
        json!({"minItems": 1, "maxItems": MAX_ITEMS_BATCH}),
    );

    let patch = &mut schemas["ItemPatch"];
    merge(&mut patch["properties"]["price"], nullable(non_negative()));
    patch["anyOf"] = json!([
        {"required": ["available"], "properties": {"available": {"type": "boolean"}}},
        {"required": ["price"], "properties": {"price": non_negative()}},
    ]);

    let onboarding = &mut schemas["OnboardingInput"];
    merge(
        &mut onboarding["properties"]["categories"],
        list(name(), MAX_CATEGORIES),
    );
    merge(
        &mut onboarding["properties"]["liked_items"],
        list(id(), MAX_LIST),
    );
    merge(&mut onboarding["properties"]["k"], nullable(k()));
    for f in ["region", "language"] {
        merge(&mut onboarding["properties"][f], nullable(name()));
    }
    onboarding["anyOf"] = json!([
        {"required": ["categories"], "properties": {"categories": {"minItems": 1}}},
        {"required": ["liked_items"], "properties": {"liked_items": {"minItems": 1}}},
    ]);

    let event = &mut schemas["EventInput"];
    let types: Vec<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
    let props = &mut event["properties"];
    merge(
        &mut props["event_id"],
        json!({"type": ["string", "null"], "pattern": UUID}),
    );
    for f in ["user_id", "session_id", "variant"] {
        merge(&mut props[f], nullable(id()));
    }
    merge(&mut props["item_id"], id());
    merge(&mut props["type"], json!({"type": "string", "enum": types}));
    merge(
        &mut props["value"],
        json!({"type": ["number", "null"], "minimum": -(f32::MAX as f64), "maximum": f32::MAX as f64}),
    );
    props["timestamp"] = timestamp_rule(None);
    event["required"] = json!(["item_id", "type"]);
    event["anyOf"] = json!([
        {"required": ["user_id"], "properties": {"user_id": id()}},
        {"required": ["session_id"], "properties": {"session_id": id()}},
    ]);
    // The Gorse edge's bodies, checked as `/v1`'s are (ids, and categories and labels as names).
    for (schema, id_fields) in [
        ("GorseItem", &["ItemId"][..]),
        ("GorseItemPatch", &[][..]),
        ("GorseUser", &["UserId"][..]),
        ("GorseUserPatch", &[][..]),
        ("GorseFeedback", &["UserId", "ItemId"][..]),
    ] {
        let props = &mut schemas[schema]["properties"];
        for f in id_fields {
            merge(&mut props[*f], id());
        }
        // (Users' labels are not checked as names: a user's record is answered as stored.)
        for f in ["Categories", "Labels"] {
            if props.get(f).is_some() && schema.starts_with("GorseItem") {
                merge(&mut props[f], nullable(list(name(), MAX_CATEGORIES)));
            }
        }
    }

    // One event or a batch of them.
    doc["paths"]["/v1/events"]["post"]["requestBody"]["content"]["application/json"]["schema"] = json!({
        "oneOf": [
            {"$ref": "#/components/schemas/EventInput"},
            {"type": "array", "items": {"$ref": "#/components/schemas/EventInput"}, "minItems": 1},
        ]
    });
}

/// `timestamp`: unix seconds (below 1e11), unix milliseconds, or an RFC 3339 string; with
/// `latest_ms`, none later than it (the server refuses a time further ahead of its clock
/// than `session.max_future_secs`).
fn timestamp_rule(latest_ms: Option<i64>) -> Value {
    let boundary = crate::session::event::SECONDS_MILLIS_BOUNDARY;
    let (seconds, millis) = match latest_ms {
        Some(ms) => (
            json!({"type": "number", "minimum": 0, "maximum": (ms / 1000) as f64, "exclusiveMaximum": boundary}),
            json!({"type": "number", "minimum": boundary, "maximum": ms as f64}),
        ),
        None => (
            json!({"type": "number", "minimum": 0, "exclusiveMaximum": boundary}),
            json!({"type": "number", "minimum": boundary, "maximum": (i64::MAX / 2) as f64}),
        ),
    };
    // RFC 3339, days 1-28 so that every match is a real date, years before the current one
    // when the server states it.
    let years = match latest_ms {
        Some(ms) => {
            years_before(chrono::DateTime::from_timestamp_millis(ms).map_or(2000, |d| d.year()))
        }
        None => "\\d{4}".to_string(),
    };
    let rfc3339 = format!(
        "^{years}-(0[1-9]|1[0-2])-(0[1-9]|1\\d|2[0-8])T([01]\\d|2[0-3]):[0-5]\\d:[0-5]\\d(\\.\\d{{1,9}})?(Z|[+-](0\\d|1[0-3]):[0-5]\\d)$"
    );
    json!({
        "description": "Unix seconds (< 1e11), unix milliseconds (>= 1e11), or an RFC 3339 string; at most `session.max_future_secs` ahead of the server's clock; default: when the server received the event.",
        "anyOf": [{"type": "null"}, seconds, millis, {"type": "string", "pattern": rfc3339}],
    })
}

/// A regex group matching the 4-digit years before `year`.
fn years_before(year: i32) -> String {
    let digits: Vec<u32> = format!("{:04}", year.clamp(1, 9999))
        .chars()
        .map(|c| c.to_digit(10).expect("a digit"))
        .collect();
    let mut alts = Vec::new();
    for i in 0..4 {
        if digits[i] == 0 {
            continue;
        }
        let prefix: String = digits[..i].iter().map(|d| d.to_string()).collect();
        let rest = 3 - i;
        let tail = if rest > 0 {
            format!("\\d{{{rest}}}")
        } else {
            String::new()
        };
        alts.push(format!("{prefix}[0-{}]{tail}", digits[i] - 1));
    }
    format!("({})", alts.join("|"))
}

/// The rules of the running server (see [`serve_openapi`]).
pub fn live_rules(
    doc: &mut Value,
    categories: &[String],
    max_batch: usize,
    now_ms: i64,
    max_future_ms: i64,
) {
    if !categories.is_empty() {
        let known = json!({"type": "string", "enum": categories});
        each_parameter(doc, |_, p| {
            if !matches!(p["name"].as_str(), Some("category" | "exclude_category")) {
                return;
            }
            let schema = &mut p["schema"];
            if schema["type"] == "array" {
                schema["items"] = known.clone();
            } else {
                merge(schema, known.clone());
            }
        });
        let schemas = &mut doc["components"]["schemas"];
        for f in ["category", "exclude_category"] {
            schemas["RecommendParams"]["properties"][f]["items"] = known.clone();
        }
        schemas["OnboardingInput"]["properties"]["categories"]["items"] = known.clone();
    }
    doc["components"]["schemas"]["EventInput"]["properties"]["timestamp"] = timestamp_rule(Some(
        crate::session::event::latest_allowed_ms(now_ms, max_future_ms),
    ));
    doc["paths"]["/v1/events"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        ["oneOf"][1]["maxItems"] = json!(max_batch);
}
