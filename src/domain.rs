//! Domain types shared by every layer. Input becomes these validated types at the boundary
//! (CSV/JSONL readers, HTTP extractors); deeper code trusts them.

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, LazyLock};

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

/// Ids hold their string in an `Arc`: a copy (the catalog's maps, the index's RAM copy, every
/// list of ids a request builds) shares the one allocation instead of making its own. At 1M
/// items the catalog and the index held four copies of every item id (issue 37).
macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            pub fn parse(s: impl Into<String>) -> Result<Self, DomainError> {
                let s = s.into();
                check_id(&s)?;
                Ok(Self(s.into()))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
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

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
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

/// A string that many items repeat: a category, a tag, an attribute's name or value. Each
/// distinct one is held once per process and shared by every item, index copy and filter
/// that names it (at 1M items, a dozen such strings per item made a third of the serving
/// catalog's memory; issue 37). Reads as a `str`, and serializes as one.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(Arc<str>);

/// Every [`Name`] in use, each once.
static NAMES: LazyLock<Mutex<Names>> = LazyLock::new(Mutex::default);

#[derive(Default)]
struct Names {
    set: HashSet<Arc<str>, foldhash::fast::RandomState>,
    /// The size of `set` after its last sweep; it is swept when it has doubled since.
    swept_at: usize,
}

impl Name {
    pub fn new(s: &str) -> Name {
        let mut names = NAMES.lock();
        if let Some(n) = names.set.get(s) {
            return Name(n.clone());
        }
        if names.set.len() >= (2 * names.swept_at).max(1024) {
            // Forget the names nothing holds any more (the items that had them changed or
            // went); only the set holds such a name, so no other thread can be copying it.
            names.set.retain(|n| Arc::strong_count(n) > 1);
            names.swept_at = names.set.len();
        }
        let n: Arc<str> = s.into();
        names.set.insert(n.clone());
        Name(n)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Name {
        Name::new(s)
    }
}

impl From<String> for Name {
    fn from(s: String) -> Name {
        Name::new(&s)
    }
}

impl From<&String> for Name {
    fn from(s: &String) -> Name {
        Name::new(s)
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<String> for Name {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<Name> for String {
    fn eq(&self, other: &Name) -> bool {
        **self == *other.0
    }
}

impl PartialEq<Name> for &str {
    fn eq(&self, other: &Name) -> bool {
        **self == *other.0
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Name {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Name;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Name, E> {
                Ok(Name::new(v))
            }
        }
        d.deserialize_str(Visitor)
    }
}

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
///
/// The lists are boxed slices rather than `Vec`s (no capacity word): with the attributes'
/// and the vector's, that takes a catalog entry from mimalloc's 192-byte class to its
/// 160-byte one, 32 MB at 1M items (issue 37).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub item_id: ItemId,
    pub title: String,
    /// Categories; `genres` in the file format (MovieLens' name), which stays as it is.
    #[serde(rename = "genres", alias = "categories")]
    pub categories: Box<[Name]>,
    #[serde(default)]
    pub tags: Box<[Name]>,
    #[serde(default)]
    pub price: Option<f32>,
    #[serde(default = "default_true")]
    pub available: bool,
    #[serde(default)]
    pub year: Option<i32>,
    /// Unix seconds.
    #[serde(default)]
    pub created_at: Option<i64>,
    /// Free-form attributes (`brand`, `region`, `language`, `size`, `promoted`, ...). Only the
    /// names declared in `[catalog] filterable` (and `region`, `language`) can be filtered on.
    #[serde(default, skip_serializing_if = "Attributes::is_empty")]
    pub attributes: Attributes,
}

/// One servable item as the serving process holds it: the item, its popularity and its
/// item-tower vector. The catalog (`crate::catalog`) keeps these, and the re-ranker and the
/// pipeline read them; it lives here, beside `Item`, so that neither needs the catalog or the
/// index to name it. (Its index payload, `payload()`, is built in `crate::catalog`, which
/// knows the index.)
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogEntry {
    pub item: Item,
    /// Interaction count (or a live counter); the cold-start prior and the fallback order.
    pub popularity: f32,
    /// The item-tower vector (L2-normalised), the same one the index holds: shared with the
    /// embedded index's RAM copy rather than copied (`crate::index::Vector`).
    pub vector: crate::vector::Vector,
}

impl CatalogEntry {
    pub fn id(&self) -> &ItemId {
        &self.item.item_id
    }
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
            categories: Box::new([]),
            tags: Box::new([]),
            price: None,
            available: true,
            year: None,
            created_at: None,
            attributes: Attributes::new(),
        }
    }
}

/// An item's attributes by name, in name order (so that they serialize the same every time),
/// with a map's reading API (`get`, `insert`, iteration by name) and its JSON form (an
/// object). A sorted list rather than a `BTreeMap`: the map's first node takes about 640
/// bytes however few attributes an item has, and the serving catalog holds one per item (at
/// 1M items, about 400 MB more than the list; issue 37). Items have a handful of attributes
/// (at most [`MAX_ATTRS`]), so a binary search finds one as fast. A boxed slice rather than
/// a `Vec`: no capacity word, which takes the catalog's entries down a size class together
/// with the half-precision vectors' thin pointer (issue 37); a change of one attribute (a
/// patch) builds the list again.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Attributes(Box<[(Name, AttrValue)]>);

impl Attributes {
    pub fn new() -> Self {
        Attributes(Box::new([]))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    fn find(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(n, _)| n.as_str().cmp(name))
    }

    pub fn get(&self, name: &str) -> Option<&AttrValue> {
        self.find(name).ok().map(|i| &self.0[i].1)
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.find(name).is_ok()
    }

    /// Sets `name`; returns the value it replaced.
    pub fn insert(&mut self, name: Name, value: AttrValue) -> Option<AttrValue> {
        match self.find(&name) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                let mut all = std::mem::take(&mut self.0).into_vec();
                all.insert(i, (name, value));
                self.0 = all.into_boxed_slice();
                None
            }
        }
    }

    /// The attributes in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&Name, &AttrValue)> {
        self.0.iter().map(|(n, v)| (n, v))
    }

    pub fn keys(&self) -> impl Iterator<Item = &Name> {
        self.0.iter().map(|(n, _)| n)
    }
}

impl std::ops::Index<&str> for Attributes {
    type Output = AttrValue;
    /// The value of `name`; panics if there is none, as a map's index does.
    fn index(&self, name: &str) -> &AttrValue {
        self.get(name)
            .unwrap_or_else(|| panic!("no attribute {name:?}"))
    }
}

impl FromIterator<(Name, AttrValue)> for Attributes {
    /// A later value for a name replaces an earlier one, as a map's `collect` does.
    fn from_iter<I: IntoIterator<Item = (Name, AttrValue)>>(iter: I) -> Self {
        let mut all: Vec<(Name, AttrValue)> = iter.into_iter().collect();
        // Stable: equal names keep their order, and the last of them is kept.
        all.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<(Name, AttrValue)> = Vec::with_capacity(all.len());
        for (n, v) in all {
            match out.last_mut() {
                Some(last) if last.0 == n => last.1 = v,
                _ => out.push((n, v)),
            }
        }
        Attributes(out.into_boxed_slice())
    }
}

impl<const N: usize> From<[(Name, AttrValue); N]> for Attributes {
    fn from(pairs: [(Name, AttrValue); N]) -> Self {
        pairs.into_iter().collect()
    }
}

impl IntoIterator for Attributes {
    type Item = (Name, AttrValue);
    type IntoIter = std::vec::IntoIter<(Name, AttrValue)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_vec().into_iter()
    }
}

impl<'a> IntoIterator for &'a Attributes {
    type Item = (&'a Name, &'a AttrValue);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (Name, AttrValue)>,
        fn(&'a (Name, AttrValue)) -> (&'a Name, &'a AttrValue),
    >;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(n, v)| (n, v))
    }
}

impl Serialize for Attributes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Attributes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Through a map: duplicate names keep the last value, as they always did.
        Ok(BTreeMap::<Name, AttrValue>::deserialize(d)?
            .into_iter()
            .collect())
    }
}

/// Longest attribute name; names are `[A-Za-z0-9_]`, so that each is a plain payload path.
pub const MAX_ATTR_NAME: usize = 64;
/// Most attributes per item, and most strings in one list value.
pub const MAX_ATTRS: usize = 64;

/// The attribute names that `region=` and `language=` filter on; always filterable.
pub const REGION: &str = "region";
pub const LANGUAGE: &str = "language";

/// One attribute value: a string, a list of strings, a number or a boolean.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum AttrValue {
    Bool(bool),
    Number(f64),
    #[schema(value_type = String)]
    Text(Name),
    // Boxed rather than a `Vec` (no capacity word): a value is 24 bytes, not 32, and at 1M
    // items with three or four attributes each that is about 30 MB (issue 37).
    #[schema(value_type = Vec<String>)]
    List(Box<[Name]>),
}

/// By the JSON type, directly: the derived form of an untagged enum buffers every value and
/// tries each variant in turn, which was most of the time of reading a 1M-item catalog file
/// with attributes (issue 37). The same values are accepted.
impl<'de> Deserialize<'de> for AttrValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = AttrValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, a list of strings, a number or a boolean")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<AttrValue, E> {
                Ok(AttrValue::Bool(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<AttrValue, E> {
                Ok(AttrValue::Number(v as f64))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<AttrValue, E> {
                Ok(AttrValue::Number(v as f64))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<AttrValue, E> {
                Ok(AttrValue::Number(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<AttrValue, E> {
                Ok(AttrValue::Text(Name::new(v)))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<AttrValue, A::Error> {
                let mut list = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX_ATTRS));
                while let Some(s) = seq.next_element::<Name>()? {
                    list.push(s);
                }
                Ok(AttrValue::List(list.into()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl AttrValue {
    /// The strings an equality filter (`attr.<name>=v`) compares with: the string, every
    /// string of a list, a number in its shortest spelling (`42`, `4.5`), `true`/`false`.
    pub fn keywords(&self) -> Vec<String> {
        match self {
            AttrValue::Text(s) => vec![s.to_string()],
            AttrValue::List(l) => l.iter().map(Name::to_string).collect(),
            AttrValue::Number(n) => vec![number_keyword(*n)],
            AttrValue::Bool(b) => vec![b.to_string()],
        }
    }

    /// An empty list says nothing: `region=` treats it as no region at all.
    pub fn is_unset(&self) -> bool {
        matches!(self, AttrValue::List(l) if l.is_empty())
    }

    /// Whether one of [`Self::keywords`] is among `values` (without building them).
    pub fn has_any_of(&self, values: &[String]) -> bool {
        match self {
            AttrValue::Text(s) => values.iter().any(|v| v == s),
            AttrValue::List(l) => l.iter().any(|x| values.iter().any(|v| v == x)),
            AttrValue::Number(n) => values.contains(&number_keyword(*n)),
            AttrValue::Bool(b) => values
                .iter()
                .any(|v| v == if *b { "true" } else { "false" }),
        }
    }

    /// The number a range filter (`attr_min.<name>`) compares with; only numbers have one.
    pub fn number(&self) -> Option<f64> {
        match self {
            AttrValue::Number(n) => Some(*n),
            _ => None,
        }
    }
}

/// A number as an equality filter spells it: `42` for 42.0, `4.5` for 4.5.
pub fn number_keyword(n: f64) -> String {
    format!("{n}")
}

/// The same value as a filter compares it: a request value that reads as a number is
/// spelled as [`number_keyword`] spells numbers (`42.0` and `42` both match the number 42).
pub fn keyword_of_request(v: &str) -> String {
    match v.parse::<f64>() {
        Ok(n) if n.is_finite() && !v.trim().is_empty() => number_keyword(n),
        _ => v.to_string(),
    }
}

/// Why an attribute name or value is refused (the caller names the field).
pub fn check_attr_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_ATTR_NAME {
        return Err(format!(
            "attribute names are 1..={MAX_ATTR_NAME} characters"
        ));
    }
    let starts_well = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_');
    if !starts_well || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!(
            "attribute name {name:?} must start with a letter or '_' and hold only ASCII \
             letters, digits and '_'"
        ));
    }
    Ok(())
}

/// Checks every name and value of an item's attributes; the error is (attribute name, reason).
pub fn check_attributes(attrs: &Attributes) -> Result<(), (String, String)> {
    if attrs.len() > MAX_ATTRS {
        return Err((
            String::new(),
            format!("at most {MAX_ATTRS} attributes, got {}", attrs.len()),
        ));
    }
    for (name, value) in attrs {
        check_attr_name(name).map_err(|r| (name.to_string(), r))?;
        let bad = |r: String| Err((name.to_string(), r));
        match value {
            AttrValue::Number(n) if !n.is_finite() => return bad(format!("{n} is not finite")),
            AttrValue::Text(s) if s.len() > MAX_ID_LEN || s.chars().any(char::is_control) => {
                return bad(format!(
                    "values are at most {MAX_ID_LEN} printable characters"
                ))
            }
            AttrValue::List(l) if l.len() > MAX_ATTRS => {
                return bad(format!("at most {MAX_ATTRS} values, got {}", l.len()))
            }
            AttrValue::List(l)
                if l.iter()
                    .any(|s| s.len() > MAX_ID_LEN || s.chars().any(char::is_control)) =>
            {
                return bad(format!(
                    "values are at most {MAX_ID_LEN} printable characters"
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Conditions on attributes. Values of one name are ORed, names are ANDed; every map is keyed
/// by attribute name, and its values are spelled as [`keyword_of_request`] spells them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AttrFilter {
    /// `attr.<name>=v`: the item has one of these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub any: BTreeMap<String, Vec<String>>,
    /// `attr_not.<name>=v`: the item has none of these values (an item without the attribute
    /// passes).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub none: BTreeMap<String, Vec<String>>,
    /// `attr_min.<name>`: the attribute is a number at least this.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub min: BTreeMap<String, f64>,
    /// `attr_max.<name>`: the attribute is a number at most this.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub max: BTreeMap<String, f64>,
    /// `region=`, `language=`: the item has one of these values, or no such attribute at all
    /// (an item that names no region is sold everywhere).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub any_or_unset: BTreeMap<String, Vec<String>>,
}

/// A lookup by attribute name, spelled like `Attributes::get` so that
/// [`AttrFilter::matches_with`] reads as `matches` did.
struct Getter<F>(F);

impl<'a, F: Fn(&str) -> Option<&'a AttrValue>> Getter<F> {
    fn get(&self, name: &str) -> Option<&'a AttrValue> {
        (self.0)(name)
    }
}

impl AttrFilter {
    pub fn is_empty(&self) -> bool {
        self.any.is_empty()
            && self.none.is_empty()
            && self.min.is_empty()
            && self.max.is_empty()
            && self.any_or_unset.is_empty()
    }

    /// Every attribute name the filter reads.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.any
            .keys()
            .chain(self.none.keys())
            .chain(self.min.keys())
            .chain(self.max.keys())
            .chain(self.any_or_unset.keys())
    }

    /// Whether an item with these attributes passes: the oracle of every backend.
    pub fn matches(&self, attrs: &Attributes) -> bool {
        self.matches_with(|name| attrs.get(name))
    }

    /// [`Self::matches`] on attributes kept in another shape: `get` finds one by name.
    pub fn matches_with<'a>(&self, get: impl Fn(&str) -> Option<&'a AttrValue>) -> bool {
        let attrs = Getter(get);
        let has_any = |name: &String, values: &[String]| {
            attrs.get(name).is_some_and(|v| v.has_any_of(values))
        };
        for (name, values) in &self.any {
            if !has_any(name, values) {
                return false;
            }
        }
        for (name, values) in &self.none {
            if has_any(name, values) {
                return false;
            }
        }
        for (name, values) in &self.any_or_unset {
            if attrs
                .get(name)
                .is_some_and(|v| !v.is_unset() && !v.has_any_of(values))
            {
                return false;
            }
        }
        for (name, min) in &self.min {
            if attrs
                .get(name)
                .and_then(AttrValue::number)
                .is_none_or(|n| n < *min)
            {
                return false;
            }
        }
        for (name, max) in &self.max {
            if attrs
                .get(name)
                .and_then(AttrValue::number)
                .is_none_or(|n| n > *max)
            {
                return false;
            }
        }
        true
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
    /// Conditions on item attributes (`attr.*`, `region`, `language`).
    #[serde(default, skip_serializing_if = "AttrFilter::is_empty")]
    pub attributes: AttrFilter,
}

impl Filter {
    /// Whether an item passes this filter. Backends that cannot push a condition down use
    /// this, and tests use it as the oracle.
    pub fn matches(&self, item: &Item) -> bool {
        if !self.include_categories.is_empty()
            && !item
                .categories
                .iter()
                .any(|g| self.include_categories.iter().any(|c| c == g))
        {
            return false;
        }
        if item
            .categories
            .iter()
            .any(|g| self.exclude_categories.iter().any(|c| c == g))
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
        !self.exclude_items.contains(&item.item_id) && self.attributes.matches(&item.attributes)
    }

    pub fn is_empty(&self) -> bool {
        *self == Filter::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A catalog entry fits mimalloc's 160-byte class with its `Arc`'s two counts (the
    /// next class is 192 bytes: 32 MB more at 1M items; issue 37). A field added to `Item` or
    /// `CatalogEntry` that breaks this costs that much.
    #[test]
    fn a_catalog_entry_with_its_counts_takes_at_most_160_bytes() {
        let arc_counts = 2 * std::mem::size_of::<usize>();
        assert!(
            std::mem::size_of::<CatalogEntry>() + arc_counts <= 160,
            "{} bytes",
            std::mem::size_of::<CatalogEntry>()
        );
    }

    #[test]
    fn ids_are_validated() {
        assert_eq!(ItemId::parse(""), Err(DomainError::Empty));
        assert_eq!(ItemId::parse("a\nb"), Err(DomainError::ControlChar));
        assert_eq!(ItemId::parse("x".repeat(300)), Err(DomainError::TooLong));
        assert_eq!(ItemId::parse("42").unwrap().as_str(), "42");
    }

    /// A name read twice is held once, also after the names nothing holds any more were
    /// forgotten; it reads, compares and serializes as its string.
    #[test]
    fn names_are_shared_and_survive_sweeps() {
        let kept = Name::new("names_are_shared: kept");
        for i in 0..5_000 {
            Name::new(&format!("names_are_shared: gone {i}"));
        }
        let again: Name = serde_json::from_str(r#""names_are_shared: kept""#).unwrap();
        assert!(Arc::ptr_eq(&kept.0, &again.0));
        assert_eq!(again, "names_are_shared: kept");
        assert_eq!(
            serde_json::to_string(&again).unwrap(),
            r#""names_are_shared: kept""#
        );
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
        item.categories = ["Drama".into()].into();
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

    fn attrs(pairs: &[(&str, AttrValue)]) -> Attributes {
        pairs
            .iter()
            .map(|(k, v)| (Name::new(k), v.clone()))
            .collect()
    }

    #[test]
    fn attribute_filters_or_within_a_name_and_across_names() {
        let item = attrs(&[
            ("brand", AttrValue::Text("acme".into())),
            (
                "region",
                AttrValue::List(vec!["eu".into(), "us".into()].into()),
            ),
            ("size", AttrValue::Number(42.0)),
            ("promoted", AttrValue::Bool(true)),
        ]);
        let mut f = AttrFilter::default();
        f.any
            .insert("brand".into(), vec!["zeta".into(), "acme".into()]);
        assert!(f.matches(&item));
        f.any.insert("region".into(), vec!["jp".into()]);
        assert!(!f.matches(&item), "names are ANDed");
        f.any.insert("region".into(), vec!["us".into()]);
        assert!(f.matches(&item), "a list matches any of its values");
        // Numbers and booleans by their spelling; request values are spelled the same way.
        f.any
            .insert("size".into(), vec![keyword_of_request("42.0")]);
        f.any.insert("promoted".into(), vec!["true".into()]);
        assert!(f.matches(&item));
        f.none.insert("brand".into(), vec!["acme".into()]);
        assert!(!f.matches(&item));
        f.none.clear();
        f.min.insert("size".into(), 42.0);
        f.max.insert("size".into(), 42.0);
        assert!(f.matches(&item), "bounds are inclusive");
        f.min.insert("brand".into(), 0.0);
        assert!(!f.matches(&item), "a range needs a number");
    }

    #[test]
    fn region_and_language_pass_items_that_name_none() {
        let mut f = AttrFilter::default();
        f.any_or_unset.insert("region".into(), vec!["jp".into()]);
        assert!(f.matches(&Attributes::new()));
        assert!(f.matches(&attrs(&[("region", AttrValue::List(Box::default()))])));
        assert!(f.matches(&attrs(&[("region", AttrValue::Text("jp".into()))])));
        assert!(!f.matches(&attrs(&[("region", AttrValue::Text("eu".into()))])));
        // attr_not passes items without the attribute too; attr does not.
        let mut g = AttrFilter::default();
        g.none.insert("brand".into(), vec!["acme".into()]);
        assert!(g.matches(&Attributes::new()));
        g.any.insert("brand".into(), vec!["zeta".into()]);
        assert!(!g.matches(&Attributes::new()));
    }

    #[test]
    fn attribute_names_and_values_are_checked() {
        assert!(check_attr_name("brand_2").is_ok());
        assert!(check_attr_name("2brand").is_err());
        assert!(check_attr_name("a.b").is_err());
        assert!(check_attr_name("").is_err());
        let bad = attrs(&[("x", AttrValue::Number(f64::NAN))]);
        assert_eq!(check_attributes(&bad).unwrap_err().0, "x");
        let json: Attributes =
            serde_json::from_str(r#"{"a":"s","b":["x","y"],"c":4.5,"d":false}"#).unwrap();
        assert_eq!(json["c"], AttrValue::Number(4.5));
        assert_eq!(json["b"].keywords(), ["x", "y"]);
        assert!(serde_json::from_str::<Attributes>(r#"{"a":{"b":1}}"#).is_err());
    }
}
