//! The payload as the Qdrant engines store it (a JSON object), and what the embedded engine's
//! collections keep of it in RAM, keyed by point id ([`PointStore`]). Search results are
//! filled from the RAM copy: reading payloads back from the engine costs milliseconds per
//! query (QDRANT_EDGE.md, pitfall 7).

use super::{IndexError, LivePoint, Payload, PayloadPatch, Vector};
use crate::domain::{point_id, AttrFilter, AttrValue, Attributes, ItemId};
use parking_lot::RwLock;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use uuid::Uuid;

/// Payload field names; the filter translation and the payload indexes use the same names.
pub const F_ITEM_ID: &str = "item_id";
pub const F_CATEGORIES: &str = "categories";
pub const F_AVAILABLE: &str = "available";
pub const F_PRICE: &str = "price";
pub const F_CREATED_AT: &str = "created_at";
/// The item's attributes as given (read back into the payload).
pub const F_ATTRIBUTES: &str = "attributes";
/// Per attribute, the strings an equality filter compares with ([`crate::domain::AttrValue::keywords`]):
/// one keyword-indexed field per filterable name, whatever the value's type.
pub const F_ATTR_KEYWORDS: &str = "attr_kw";
/// Per numeric attribute, its value: one float-indexed field per filterable name.
pub const F_ATTR_NUMBERS: &str = "attr_num";

/// The payload path of an attribute's keywords (`attr_kw.brand`). Names are checked to be
/// `[A-Za-z0-9_]` when items are written, so the path needs no quoting.
pub fn attr_keyword_path(name: &str) -> String {
    format!("{F_ATTR_KEYWORDS}.{name}")
}

/// The payload path of a numeric attribute (`attr_num.size`).
pub fn attr_number_path(name: &str) -> String {
    format!("{F_ATTR_NUMBERS}.{name}")
}

/// The JSON object stored in the engine. Prices are widened to f64 exactly (`f64::from`), and
/// filter bounds are widened the same way, so `price >= min` gives the same answer in the
/// engine as in [`crate::domain::Filter::matches`] even at equality.
pub fn to_json(p: &Payload) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert(F_ITEM_ID.into(), json!(p.item_id.as_str()));
    m.insert(F_CATEGORIES.into(), json!(p.categories));
    m.insert(F_AVAILABLE.into(), json!(p.available));
    if let Some(price) = p.price {
        m.insert(F_PRICE.into(), json!(f64::from(price)));
    }
    if let Some(c) = p.created_at {
        m.insert(F_CREATED_AT.into(), json!(c));
    }
    m.insert("title".into(), json!(p.title));
    m.insert("popularity".into(), json!(f64::from(p.popularity)));
    if !p.tags.is_empty() {
        m.insert("tags".into(), json!(p.tags));
    }
    if let Some(y) = p.year {
        m.insert("year".into(), json!(y));
    }
    if !p.attributes.is_empty() {
        m.insert(F_ATTRIBUTES.into(), json!(p.attributes));
        let keywords: Map<String, Value> = p
            .attributes
            .iter()
            .map(|(name, v)| (name.clone(), json!(v.keywords())))
            .collect();
        let numbers: Map<String, Value> = p
            .attributes
            .iter()
            .filter_map(|(name, v)| Some((name.clone(), json!(v.number()?))))
            .collect();
        m.insert(F_ATTR_KEYWORDS.into(), Value::Object(keywords));
        if !numbers.is_empty() {
            m.insert(F_ATTR_NUMBERS.into(), Value::Object(numbers));
        }
    }
    m
}

/// The JSON fields a patch sets.
pub fn patch_json(patch: &PayloadPatch) -> Map<String, Value> {
    let mut m = Map::new();
    if let Some(a) = patch.available {
        m.insert(F_AVAILABLE.into(), json!(a));
    }
    if let Some(p) = patch.price {
        m.insert(F_PRICE.into(), json!(f64::from(p)));
    }
    if let Some(p) = patch.popularity {
        m.insert("popularity".into(), json!(f64::from(p)));
    }
    m
}

#[derive(Deserialize)]
struct Stored {
    item_id: ItemId,
    #[serde(default)]
    categories: Vec<String>,
    #[serde(default = "yes")]
    available: bool,
    #[serde(default)]
    price: Option<f64>,
    #[serde(default)]
    created_at: Option<i64>,
    #[serde(default)]
    title: String,
    #[serde(default)]
    popularity: f64,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    year: Option<i32>,
    #[serde(default)]
    attributes: Attributes,
}

fn yes() -> bool {
    true
}

/// Reads a payload back from the engine's JSON.
pub fn from_json(m: Map<String, Value>) -> Result<Payload, IndexError> {
    let s: Stored = serde_json::from_value(Value::Object(m))
        .map_err(|e| IndexError::Backend(format!("stored payload is not a tandem payload: {e}")))?;
    Ok(Payload {
        item_id: s.item_id,
        categories: s.categories,
        available: s.available,
        price: s.price.map(|p| p as f32),
        created_at: s.created_at,
        title: s.title,
        popularity: s.popularity as f32,
        tags: s.tags,
        year: s.year,
        attributes: s.attributes,
    })
}

/// What tandem keeps in RAM of one point of an embedded collection: what a search needs
/// (the item id of a hit, the filterable attributes that a category scan checks), the live
/// fields and the unit vector, which the category blocks and the catalog share
/// ([`super::Vector`]). Titles, tags and the other attributes stay in the engine's payload
/// (the catalog holds its own copy): at 1M items the whole payloads took about a kilobyte
/// per point here, most of it the attribute maps (issue 37).
#[derive(Debug, Clone)]
pub struct RamPoint {
    pub item_id: ItemId,
    pub available: bool,
    pub price: Option<f32>,
    pub popularity: f32,
    /// The attributes that filters can name, by name; the others are left out.
    pub(super) attributes: Box<[(String, AttrValue)]>,
    pub vector: Vector,
}

impl RamPoint {
    /// The RAM part of `p`, keeping the attributes named in `filterable`.
    pub fn of(p: Payload, vector: Vector, filterable: &[String]) -> RamPoint {
        let attributes = p
            .attributes
            .into_iter()
            .filter(|(name, _)| filterable.contains(name))
            .collect();
        RamPoint {
            item_id: p.item_id,
            available: p.available,
            price: p.price,
            popularity: p.popularity,
            attributes,
            vector,
        }
    }

    /// Whether the point passes an attribute filter (on filterable names, as requests are).
    pub fn attributes_pass(&self, filter: &AttrFilter) -> bool {
        filter.matches_with(|name| {
            self.attributes
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v)
        })
    }

    pub fn live(&self) -> LivePoint {
        LivePoint {
            item_id: self.item_id.clone(),
            available: self.available,
            price: self.price,
            popularity: self.popularity,
            vector: self.vector.clone(),
        }
    }
}

/// tandem's RAM copy of one collection's points ([`RamPoint`]), keyed by point id.
#[derive(Debug, Default)]
pub struct PointStore {
    map: RwLock<HashMap<Uuid, RamPoint>>,
}

impl PointStore {
    pub fn insert_many(&self, points: impl IntoIterator<Item = RamPoint>) {
        let mut map = self.map.write();
        for p in points {
            map.insert(point_id(&p.item_id), p);
        }
    }

    /// Replaces every point with `points`, keyed by point id (a load from a snapshot).
    pub fn fill(&self, points: HashMap<Uuid, RamPoint>) {
        *self.map.write() = points;
    }

    /// Runs `f` on every point, under the store's read lock (a snapshot being written).
    pub fn with_all<T>(&self, f: impl FnOnce(&HashMap<Uuid, RamPoint>) -> T) -> T {
        f(&self.map.read())
    }

    pub fn remove_many(&self, ids: &[ItemId]) {
        let mut map = self.map.write();
        for id in ids {
            map.remove(&point_id(id));
        }
    }

    pub fn patch(&self, id: &ItemId, patch: &PayloadPatch) {
        if let Some(p) = self.map.write().get_mut(&point_id(id)) {
            patch.apply(&mut p.available, &mut p.price, &mut p.popularity);
        }
    }

    /// Runs `f` on a point, under the store's read lock.
    pub fn with<T>(&self, id: &Uuid, f: impl FnOnce(&RamPoint) -> T) -> Option<T> {
        self.map.read().get(id).map(f)
    }

    /// The item ids of many points under one lock; unknown ids give `None`.
    pub fn item_ids<'a>(&self, ids: impl IntoIterator<Item = &'a Uuid>) -> Vec<Option<ItemId>> {
        let map = self.map.read();
        ids.into_iter()
            .map(|id| map.get(id).map(|p| p.item_id.clone()))
            .collect()
    }

    /// The live fields of many points under one lock, in their order; unknown ids are
    /// skipped.
    pub fn live<'a>(&self, ids: impl IntoIterator<Item = &'a Uuid>) -> Vec<LivePoint> {
        let map = self.map.read();
        ids.into_iter()
            .filter_map(|id| map.get(id))
            .map(RamPoint::live)
            .collect()
    }

    /// The stored vectors of many points under one lock; unknown ids give `None`.
    pub fn vectors<'a>(&self, ids: impl IntoIterator<Item = &'a Uuid>) -> Vec<Option<Vector>> {
        let map = self.map.read();
        ids.into_iter()
            .map(|id| map.get(id).map(|p| p.vector.clone()))
            .collect()
    }

    pub fn contains(&self, id: &ItemId) -> bool {
        self.map.read().contains_key(&point_id(id))
    }

    pub fn len(&self) -> usize {
        self.map.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::AttrValue;

    #[test]
    fn json_round_trip() {
        let p = Payload {
            item_id: ItemId::parse("x1").unwrap(),
            categories: vec!["Drama".into(), "War".into()],
            available: false,
            price: Some(9.99),
            created_at: Some(1_700_000_000),
            title: "T".into(),
            popularity: 3.0,
            tags: vec!["classic".into()],
            year: Some(1999),
            attributes: [
                ("brand".to_string(), AttrValue::Text("Acme".into())),
                ("size".to_string(), AttrValue::Number(42.0)),
                ("promoted".to_string(), AttrValue::Bool(true)),
                (
                    "region".to_string(),
                    AttrValue::List(vec!["eu".into(), "us".into()]),
                ),
            ]
            .into(),
        };
        let json = to_json(&p);
        assert_eq!(json[F_ATTR_KEYWORDS]["size"], json!(["42"]));
        assert_eq!(json[F_ATTR_KEYWORDS]["promoted"], json!(["true"]));
        assert_eq!(json[F_ATTR_NUMBERS], json!({"size": 42.0}));
        assert_eq!(from_json(to_json(&p)).unwrap(), p);
        let bare = Payload {
            price: None,
            created_at: None,
            tags: Vec::new(),
            year: None,
            attributes: Attributes::new(),
            ..p
        };
        assert_eq!(from_json(to_json(&bare)).unwrap(), bare);
    }
}
