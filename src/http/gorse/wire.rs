//! Gorse's JSON shapes (PascalCase field names), as pygorse 0.5.1 and gorsejs 0.4.8 send and
//! read them, and their mapping onto tandem's items (see the README's "Coming from Gorse").

use crate::catalog::CatalogEntry;
use crate::domain::Name;
use crate::session::{FeedbackRecord, UserRecord};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// An item. `IsHidden` is tandem's `available: false` (never recommended, still readable),
/// `Labels` its tags, `Comment` its title and `Timestamp` its `created_at`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "PascalCase")]
pub struct GorseItem {
    #[schema(example = "vuejs:vue")]
    pub item_id: String,
    #[serde(default)]
    pub is_hidden: bool,
    #[serde(default)]
    pub categories: Option<Vec<String>>,
    /// RFC 3339 (`2022-02-24T00:00:00Z`) or a date (`2022-02-24`); empty or missing: now.
    #[serde(default)]
    pub timestamp: Option<String>,
    #[serde(default)]
    pub labels: Option<Vec<String>>,
    #[serde(default)]
    pub comment: Option<String>,
}

/// An item as the catalog holds it, in Gorse's shape.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "PascalCase")]
pub struct GorseItemView {
    pub item_id: String,
    pub is_hidden: bool,
    pub categories: Vec<String>,
    /// RFC 3339; empty when the item has no creation time.
    pub timestamp: String,
    pub labels: Vec<String>,
    pub comment: String,
}

impl From<&CatalogEntry> for GorseItemView {
    fn from(e: &CatalogEntry) -> Self {
        GorseItemView {
            item_id: e.item.item_id.to_string(),
            is_hidden: !e.item.available,
            categories: e.item.categories.iter().map(Name::to_string).collect(),
            timestamp: e
                .item
                .created_at
                .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .unwrap_or_default(),
            labels: e.item.tags.iter().map(Name::to_string).collect(),
            comment: e.item.title.clone(),
        }
    }
}

/// `PATCH /api/item/{id}`: the fields to change (a missing or null field is kept).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(rename_all = "PascalCase")]
pub struct GorseItemPatch {
    #[serde(default)]
    pub is_hidden: Option<bool>,
    #[serde(default)]
    pub categories: Option<Vec<String>>,
    #[serde(default)]
    pub timestamp: Option<String>,
    #[serde(default)]
    pub labels: Option<Vec<String>>,
    #[serde(default)]
    pub comment: Option<String>,
}

/// A user: labels and a comment (users are new to tandem; the session store keeps them).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "PascalCase")]
pub struct GorseUser {
    #[schema(example = "bob")]
    pub user_id: String,
    #[serde(default)]
    pub labels: Option<Vec<String>>,
    #[serde(default)]
    pub comment: Option<String>,
}

impl From<UserRecord> for GorseUser {
    fn from(u: UserRecord) -> Self {
        GorseUser {
            user_id: u.user_id.to_string(),
            labels: Some(u.labels),
            comment: Some(u.comment),
        }
    }
}

/// `PATCH /api/user/{id}`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(rename_all = "PascalCase")]
pub struct GorseUserPatch {
    #[serde(default)]
    pub labels: Option<Vec<String>>,
    #[serde(default)]
    pub comment: Option<String>,
}

/// One feedback: a user did `FeedbackType` to an item. The type maps to a tandem event type
/// through `[gorse] feedback_types`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "PascalCase")]
pub struct GorseFeedback {
    #[schema(example = "star")]
    pub feedback_type: String,
    pub user_id: String,
    pub item_id: String,
    /// RFC 3339 or a date; empty or missing: now.
    #[serde(default)]
    pub timestamp: Option<String>,
    #[serde(default)]
    pub value: Option<f64>,
    #[serde(default)]
    pub comment: Option<String>,
}

impl From<FeedbackRecord> for GorseFeedback {
    fn from(r: FeedbackRecord) -> Self {
        GorseFeedback {
            feedback_type: r.feedback_type,
            user_id: r.user_id.to_string(),
            item_id: r.item_id.to_string(),
            timestamp: chrono::DateTime::from_timestamp_millis(r.timestamp_ms)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
            value: Some(r.value),
            comment: Some(r.comment),
        }
    }
}

/// `POST /api/feedback` takes one feedback or an array of them.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum FeedbackBody {
    Many(Vec<GorseFeedback>),
    One(GorseFeedback),
}

/// What a write did.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RowAffected {
    #[serde(rename = "RowAffected")]
    pub row_affected: usize,
}

/// An item and its score (recommend with `X-API-Version: 2`, neighbors, popular, latest,
/// session recommend).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "PascalCase")]
pub struct Scored {
    pub id: String,
    pub score: f64,
}

/// `GET /api/recommend/...`: item ids, or with `X-API-Version: 2` ids and scores.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RecommendBody {
    Ids(Vec<String>),
    Scored(Vec<Scored>),
}

/// Either list, as `anyOf`: an empty list is both, which a derived `oneOf` would refuse.
impl utoipa::PartialSchema for RecommendBody {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{AnyOfBuilder, ArrayBuilder, ObjectBuilder, Type};
        AnyOfBuilder::new()
            .item(ArrayBuilder::new().items(ObjectBuilder::new().schema_type(Type::String)))
            .item(ArrayBuilder::new().items(<Scored as utoipa::PartialSchema>::schema()))
            .description(Some(
                "item ids; with `X-API-Version: 2` objects with the id and its score",
            ))
            .into()
    }
}

impl ToSchema for RecommendBody {}

/// A page of items; `Cursor` is empty on the last page.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "PascalCase")]
pub struct ItemPage {
    pub cursor: String,
    pub items: Vec<GorseItemView>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "PascalCase")]
pub struct UserPage {
    pub cursor: String,
    pub users: Vec<GorseUser>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "PascalCase")]
pub struct FeedbackPage {
    pub cursor: String,
    pub feedback: Vec<GorseFeedback>,
}
