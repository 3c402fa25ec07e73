//! The payload as the Qdrant engines store it (a JSON object), and what the embedded engine's
//! collections keep of it in RAM, keyed by point id ([`PointStore`]). Search results are
//! filled from the RAM copy: reading payloads back from the engine costs milliseconds per
//! query (QDRANT_EDGE.md, pitfall 7).

use super::{IndexError, LivePoint, Payload, PayloadPatch, Vector};
use crate::domain::{point_id, AttrFilter, AttrValue, Attributes, ItemId, Name};
use parking_lot::RwLock;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::hash::BuildHasher;
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
            .map(|(name, v)| (name.to_string(), json!(v.keywords())))
            .collect();
        let numbers: Map<String, Value> = p
            .attributes
            .iter()
            .filter_map(|(name, v)| Some((name.to_string(), json!(v.number()?))))
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
    categories: Vec<Name>,
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
    tags: Vec<Name>,
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
    pub(super) attributes: Box<[(Name, AttrValue)]>,
    pub vector: Vector,
}

impl RamPoint {
    /// The RAM part of `p`, keeping the attributes named in `filterable`.
    pub fn of(p: Payload, vector: Vector, filterable: &[String]) -> RamPoint {
        let attributes = p
            .attributes
            .into_iter()
            .filter(|(name, _)| filterable.iter().any(|f| f == name))
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

/// tandem's RAM copy of one collection's points ([`RamPoint`]), by point id.
#[derive(Debug, Default)]
pub struct PointStore {
    points: RwLock<Points>,
}

/// The points in one list, and a hash table of their places in it by point id. A map from
/// point id to point took about twice the room: hash tables grow by doubling and stay at
/// most 7/8 full, so 1M points took 2M slots of 80 bytes (issue 37); here a slot is a `u32`.
#[derive(Debug, Default)]
pub struct Points {
    list: Vec<(Uuid, RamPoint)>,
    at: hashbrown::HashTable<u32>,
    hasher: foldhash::fast::RandomState,
}

impl Points {
    /// The points of a snapshot, whose point ids are known already, made off the store's lock
    /// (see [`PointStore::fill`]).
    pub fn of_loaded(points: impl ExactSizeIterator<Item = (Uuid, RamPoint)>) -> Points {
        let mut all = Points::default();
        let Points { list, at, hasher } = &mut all;
        list.reserve_exact(points.len());
        at.reserve(points.len(), |&j| hasher.hash_one(list[j as usize].0));
        for (id, p) in points {
            all.insert(id, p);
        }
        all
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    fn find(&self, id: &Uuid) -> Option<usize> {
        let list = &self.list;
        self.at
            .find(self.hasher.hash_one(id), |&i| list[i as usize].0 == *id)
            .map(|&i| i as usize)
    }

    fn get(&self, id: &Uuid) -> Option<&RamPoint> {
        self.find(id).map(|i| &self.list[i].1)
    }

    fn insert(&mut self, id: Uuid, point: RamPoint) {
        match self.find(&id) {
            Some(i) => self.list[i].1 = point,
            None => {
                let Points { list, at, hasher } = self;
                let i = u32::try_from(list.len()).expect("fewer than 2^32 points");
                at.insert_unique(hasher.hash_one(id), i, |&j| {
                    hasher.hash_one(list[j as usize].0)
                });
                list.push((id, point));
            }
        }
    }

    /// Moves the last point into the hole, so the list stays contiguous.
    fn remove(&mut self, id: &Uuid) {
        let Points { list, at, hasher } = self;
        let Ok(slot) = at.find_entry(hasher.hash_one(id), |&i| list[i as usize].0 == *id) else {
            return;
        };
        let i = slot.remove().0 as usize;
        let last = list.len() - 1;
        if i != last {
            let moved = at
                .find_mut(hasher.hash_one(list[last].0), |&j| j as usize == last)
                .expect("every point has a slot");
            *moved = i as u32;
        }
        list.swap_remove(i);
    }
}

impl PointStore {
    pub fn insert_many(&self, points: impl IntoIterator<Item = RamPoint>) {
        let mut all = self.points.write();
        for p in points {
            all.insert(point_id(&p.item_id), p);
        }
    }

    /// Replaces every point with `points` (a load from a snapshot).
    pub fn fill(&self, points: Points) {
        *self.points.write() = points;
    }

    /// Runs `f` on every point, under the store's read lock (a snapshot being written).
    pub fn with_all<T>(&self, f: impl FnOnce(&[(Uuid, RamPoint)]) -> T) -> T {
        f(&self.points.read().list)
    }

    pub fn remove_many(&self, ids: &[ItemId]) {
        let mut all = self.points.write();
        for id in ids {
            all.remove(&point_id(id));
        }
    }

    pub fn patch(&self, id: &ItemId, patch: &PayloadPatch) {
        let mut all = self.points.write();
        if let Some(i) = all.find(&point_id(id)) {
            let p = &mut all.list[i].1;
            patch.apply(&mut p.available, &mut p.price, &mut p.popularity);
        }
    }

    /// Runs `f` on a point, under the store's read lock.
    pub fn with<T>(&self, id: &Uuid, f: impl FnOnce(&RamPoint) -> T) -> Option<T> {
        self.points.read().get(id).map(f)
    }

    /// The item ids of many points under one lock; unknown ids give `None`.
    pub fn item_ids<'a>(&self, ids: impl IntoIterator<Item = &'a Uuid>) -> Vec<Option<ItemId>> {
        let all = self.points.read();
        ids.into_iter()
            .map(|id| all.get(id).map(|p| p.item_id.clone()))
            .collect()
    }

    /// The live fields of many points under one lock, in their order; unknown ids are
    /// skipped.
    pub fn live<'a>(&self, ids: impl IntoIterator<Item = &'a Uuid>) -> Vec<LivePoint> {
        let all = self.points.read();
        ids.into_iter()
            .filter_map(|id| all.get(id))
            .map(RamPoint::live)
            .collect()
    }

    /// The stored vectors of many points under one lock; unknown ids give `None`.
    pub fn vectors<'a>(&self, ids: impl IntoIterator<Item = &'a Uuid>) -> Vec<Option<Vector>> {
        let all = self.points.read();
        ids.into_iter()
            .map(|id| all.get(id).map(|p| p.vector.clone()))
            .collect()
    }

    pub fn contains(&self, id: &ItemId) -> bool {
        self.points.read().find(&point_id(id)).is_some()
    }

    pub fn len(&self) -> usize {
        self.points.read().list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::AttrValue;

    /// A removed point's place goes to the last point; every point left is still found, with
    /// its own fields, and a replaced one has its new fields.
    #[test]
    fn the_ram_copy_finds_every_point_after_removes_and_replacements() {
        let id = |i: usize| ItemId::parse(format!("i{i}")).unwrap();
        let point = |i: usize, price: f32| RamPoint {
            item_id: id(i),
            available: true,
            price: Some(price),
            popularity: 0.0,
            attributes: Box::new([]),
            vector: vec![i as f32].into(),
        };
        let store = PointStore::default();
        store.insert_many((0..100).map(|i| point(i, 1.0)));
        store.remove_many(&[id(0), id(50), id(99), id(1000)]);
        store.insert_many([point(7, 2.0), point(100, 1.0)]);
        store.remove_many(&[id(1)]);
        assert_eq!(store.len(), 97);
        for i in 0..=100 {
            let found = store.live(&[point_id(&id(i))]);
            if [0, 1, 50, 99].contains(&i) {
                assert!(
                    found.is_empty() && !store.contains(&id(i)),
                    "{i} was removed"
                );
                continue;
            }
            let p = &found[0];
            assert_eq!(
                (p.item_id.clone(), p.vector.to_vec()),
                (id(i), vec![i as f32])
            );
            assert_eq!(p.price, Some(if i == 7 { 2.0 } else { 1.0 }));
        }
    }

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
                ("brand".into(), AttrValue::Text("Acme".into())),
                ("size".into(), AttrValue::Number(42.0)),
                ("promoted".into(), AttrValue::Bool(true)),
                (
                    "region".into(),
                    AttrValue::List(vec!["eu".into(), "us".into()].into()),
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
