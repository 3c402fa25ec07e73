//! Domain types shared by every layer. Input becomes these validated types at the boundary
//! (CSV/JSONL readers, HTTP extractors); deeper code trusts them.

use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

/// Sets and maps keyed by item id. The request path looks items up by the hundred (the
/// catalog, the re-ranker's purchased, viewed and trending checks), so they hash with
/// foldhash, seeded per process, rather than SipHash.
pub type IdSet = HashSet<ItemId, foldhash::fast::RandomState>;
pub type IdMap<V> = HashMap<ItemId, V, foldhash::fast::RandomState>;

/// Longest id accepted on the wire.
pub const MAX_ID_LEN: usize = 256;

/// Why an id or field failed to parse. The caller adds the field name and location.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("must not be empty")]
    Empty,
    #[error("is longer than {MAX_ID_LEN} characters")]
    TooLong,
    #[error("contains a control character")]
    ControlChar,
    #[error("unknown event type {0:?} (expected one of view, click, add_to_cart, purchase, rating, impression)")]
    UnknownEventType(String),
}

fn check_id(s: &str) -> Result<(), DomainError> {
    if s.is_empty() {
        return Err(DomainError::Empty);
    }
    if s.len() > MAX_ID_LEN && s.chars().count() > MAX_ID_LEN {
        return Err(DomainError::TooLong);
    }
    if s.chars().any(char::is_control) {
        return Err(DomainError::ControlChar);
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn parse(s: impl Into<String>) -> Result<Self, DomainError> {
                let s = s.into();
                check_id(&s)?;
                Ok(Self(s))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = DomainError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

string_id!(
    /// An item's external id. Ids are strings on the wire; see [`crate::data::IdMap`] for the
    /// dense internal index and [`point_id`] for the Qdrant point id.
    ItemId
);
string_id!(
    /// A user's external id.
    UserId
);
string_id!(
    /// An anonymous session's id.
    SessionId
);

/// Namespace for UUID v5 point ids, so that an item id maps to the same Qdrant point everywhere.
const POINT_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x7a6e_d3c1_4b9f_4e0a_9c55_1d2e_3f40_5a61);

/// The stable Qdrant point id (UUID v5) of an item.
pub fn point_id(item: &ItemId) -> uuid::Uuid {
    uuid::Uuid::new_v5(&POINT_NAMESPACE, item.as_str().as_bytes())
}

/// What a user did with an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    View,
    Click,
    AddToCart,
    Purchase,
    #[default]
    Rating,
    Impression,
}

impl EventType {
    pub const ALL: [EventType; 6] = [
        EventType::View,
        EventType::Click,
        EventType::AddToCart,
        EventType::Purchase,
        EventType::Rating,
        EventType::Impression,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::View => "view",
            EventType::Click => "click",
            EventType::AddToCart => "add_to_cart",
            EventType::Purchase => "purchase",
            EventType::Rating => "rating",
            EventType::Impression => "impression",
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventType {
    type Err = DomainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| DomainError::UnknownEventType(s.to_string()))
    }
}

/// A catalog item in tandem's common format (`items.csv` / `items.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub item_id: ItemId,
    pub title: String,
    /// Categories; `genres` in the file format (MovieLens' name), which stays as it is.
    #[serde(rename = "genres", alias = "categories")]
    pub categories: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub price: Option<f32>,
    #[serde(default = "default_true")]
    pub available: bool,
    #[serde(default)]
    pub year: Option<i32>,
    /// Unix seconds.
    #[serde(default)]
    pub created_at: Option<i64>,
}

fn default_true() -> bool {
    true
}

impl Item {
    /// An item with only an id and a title; the rest defaulted.
    pub fn new(item_id: ItemId, title: impl Into<String>) -> Self {
        Item {
            item_id,
            title: title.into(),
            categories: Vec::new(),
            tags: Vec::new(),
            price: None,
            available: true,
            year: None,
            created_at: None,
        }
    }
}

/// One row of `interactions.csv`: a user touched an item at a time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interaction {
    pub user_id: UserId,
    pub item_id: ItemId,
    pub rating: f32,
    /// Unix seconds.
    pub timestamp: i64,
    #[serde(default)]
    pub event_type: EventType,
}

/// What a search may return. The index backends translate it into their own filter types;
/// nothing outside `index/` sees Qdrant's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Filter {
    /// Keep items in any of these categories (empty: no restriction).
    #[serde(default)]
    pub include_categories: Vec<String>,
    /// Drop items in any of these categories.
    #[serde(default)]
    pub exclude_categories: Vec<String>,
    #[serde(default)]
    pub available_only: bool,
    #[serde(default)]
    pub price_min: Option<f32>,
    #[serde(default)]
    pub price_max: Option<f32>,
    /// Unix seconds; keep items created strictly after.
    #[serde(default)]
    pub created_after: Option<i64>,
    #[serde(default)]
    pub exclude_items: Vec<ItemId>,
}

impl Filter {
    /// Whether an item passes this filter. Backends that cannot push a condition down use
    /// this, and tests use it as the oracle.
    pub fn matches(&self, item: &Item) -> bool {
        if !self.include_categories.is_empty()
            && !item
                .categories
                .iter()
                .any(|g| self.include_categories.contains(g))
        {
            return false;
        }
        if item
            .categories
            .iter()
            .any(|g| self.exclude_categories.contains(g))
        {
            return false;
        }
        if self.available_only && !item.available {
            return false;
        }
        if self.price_min.is_some() || self.price_max.is_some() {
            let Some(p) = item.price else { return false };
            if self.price_min.is_some_and(|m| p < m) || self.price_max.is_some_and(|m| p > m) {
                return false;
            }
        }
        if let Some(after) = self.created_after {
            if item.created_at.is_none_or(|c| c <= after) {
                return false;
            }
        }
        !self.exclude_items.contains(&item.item_id)
    }

    pub fn is_empty(&self) -> bool {
        *self == Filter::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_validated() {
        assert_eq!(ItemId::parse(""), Err(DomainError::Empty));
        assert_eq!(ItemId::parse("a\nb"), Err(DomainError::ControlChar));
        assert_eq!(ItemId::parse("x".repeat(300)), Err(DomainError::TooLong));
        assert_eq!(ItemId::parse("42").unwrap().as_str(), "42");
    }

    #[test]
    fn point_ids_are_stable_and_distinct() {
        let a = ItemId::parse("a").unwrap();
        let b = ItemId::parse("b").unwrap();
        assert_eq!(point_id(&a), point_id(&a.clone()));
        assert_ne!(point_id(&a), point_id(&b));
    }

    #[test]
    fn filter_matches_semantics() {
        let mut item = Item::new(ItemId::parse("1").unwrap(), "t");
        item.categories = vec!["Drama".into()];
        item.price = Some(10.0);
        let f = Filter {
            include_categories: vec!["Drama".into()],
            price_max: Some(12.0),
            ..Default::default()
        };
        assert!(f.matches(&item));
        item.available = false;
        assert!(f.matches(&item));
        assert!(!Filter {
            available_only: true,
            ..f.clone()
        }
        .matches(&item));
        assert!(!Filter {
            exclude_categories: vec!["Drama".into()],
            ..Default::default()
        }
        .matches(&item));
    }
}
