//! The wire types of the API (the same types generate `/openapi.json`), and their validation
//! into domain types. Each check names the field it refuses.

use super::error::AppError;
use super::extract::QueryPairs;
use crate::catalog::CatalogEntry;
use crate::config::{BoostRule, BoostRules, CatalogSettings};
use crate::domain::{
    check_attr_name, check_attributes, keyword_of_request, AttrFilter, AttrValue, Attributes,
    Filter, Item, ItemId, Name, SessionId, UserId, LANGUAGE, REGION,
};
use crate::pipeline::{Degraded, Recommendations, Source};
use crate::rerank::Components;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::{IntoParams, ToSchema};

pub const MAX_K: i64 = 200;
pub const DEFAULT_K: i64 = 20;
/// Longest list accepted for `exclude` and the onboarding `liked_items`.
pub const MAX_LIST: usize = 500;
/// Most values accepted for `category` and `exclude_category` (each costs a filtered scan)
/// and for the onboarding `categories`.
pub const MAX_CATEGORIES: usize = 32;
/// Largest `POST /v1/items` batch.
pub const MAX_ITEMS_BATCH: usize = 1_000;
/// Longest category or tag name, in characters.
pub const MAX_NAME_LEN: usize = 256;
/// Longest item title, in characters.
pub const MAX_TITLE_LEN: usize = 4_096;

/// Query of `GET /v1/recommendations`; the `POST` body has the same fields.
#[derive(Debug, Default, Deserialize, ToSchema, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RecommendParams {
    /// A known or new user; an unknown user is a new user.
    pub user_id: Option<String>,
    /// An anonymous (or logged-in) browsing session.
    pub session_id: Option<String>,
    /// How many items (1..=200, default 20).
    #[serde(default, deserialize_with = "integral")]
    pub k: Option<i64>,
    /// Keep only items in any of these categories (repeatable).
    #[serde(default)]
    pub category: Vec<String>,
    /// Drop items in any of these categories (repeatable).
    #[serde(default)]
    pub exclude_category: Vec<String>,
    /// Only items currently available (default true).
    pub available_only: Option<bool>,
    pub price_min: Option<f64>,
    pub price_max: Option<f64>,
    /// Item ids never to return (repeatable).
    #[serde(default)]
    pub exclude: Vec<String>,
    /// `attr.<name>=<value>`, or `attr[<name>]=<value>` (repeatable): keep items whose
    /// attribute `<name>` has one of the values. Values of one name are ORed, names are
    /// ANDed; a list attribute matches any of its strings, a number its shortest spelling
    /// (`42`, `4.5`), a boolean `true`/`false`. The name must be `region`, `language` or
    /// declared in `[catalog] filterable`, else 422 naming the parameter.
    #[serde(default)]
    #[param(value_type = Object, style = DeepObject)]
    pub attr: BTreeMap<String, Vec<String>>,
    /// `attr_not.<name>=<value>` (repeatable): drop items whose attribute has one of the
    /// values; items without the attribute stay.
    #[serde(default)]
    #[param(value_type = Object, style = DeepObject)]
    pub attr_not: BTreeMap<String, Vec<String>>,
    /// `attr_min.<name>=<number>`: keep items whose attribute is a number >= this (items
    /// without a number fail).
    #[serde(default)]
    #[param(value_type = Object, style = DeepObject)]
    pub attr_min: BTreeMap<String, f64>,
    /// `attr_max.<name>=<number>`: keep items whose attribute is a number <= this (items
    /// without a number fail).
    #[serde(default)]
    #[param(value_type = Object, style = DeepObject)]
    pub attr_max: BTreeMap<String, f64>,
    /// Keep items whose `region` attribute holds this, and items without one.
    pub region: Option<String>,
    /// Keep items whose `language` attribute holds this, and items without one.
    pub language: Option<String>,
    /// Boost rules to turn on besides the variant's (names of `[boosts.NAME]`, repeatable):
    /// `new_arrivals`, `promoted`, `bury_low_stock` unless the settings define others.
    #[serde(default)]
    pub boost: Vec<String>,
    /// Return each item's score components (and each boost's part).
    #[serde(default)]
    pub explain: bool,
}

/// Attribute filters, shared by the recommendation endpoints. In a query string a name
/// follows the prefix (`attr.brand=acme&attr.brand=zeta&attr_min.size=38`); in a JSON body
/// each is an object keyed by name (`"attr": {"brand": ["acme", "zeta"]}`). Values of one
/// name are ORed, names are ANDed, and every name must be filterable (`region`, `language`
/// and the names in `[catalog] filterable`), else 422 names it. Equality compares strings;
/// a number attribute matches its shortest spelling (`42`, `4.5`) and a boolean `true` or
/// `false`.
#[derive(Debug, Default)]
pub struct AttrParams {
    /// `attr.<name>=<value>` (repeatable): keep items whose attribute `<name>` has one of
    /// the values (a list attribute: any of its strings).
    pub attr: BTreeMap<String, Vec<String>>,
    /// `attr_not.<name>=<value>` (repeatable): drop items whose attribute has one of the
    /// values; items without the attribute stay.
    pub attr_not: BTreeMap<String, Vec<String>>,
    /// `attr_min.<name>=<number>`: keep items whose attribute is a number >= this.
    pub attr_min: BTreeMap<String, f64>,
    /// `attr_max.<name>=<number>`: keep items whose attribute is a number <= this.
    pub attr_max: BTreeMap<String, f64>,
    /// Keep items sold in this region: items whose `region` attribute holds it, and items
    /// without a `region` attribute (sold everywhere).
    pub region: Option<String>,
    /// Keep items offered in this language: items whose `language` attribute holds it, and
    /// items without a `language` attribute.
    pub language: Option<String>,
}

/// The attribute fields of a params struct, to and from [`AttrParams`].
macro_rules! attr_fields {
    ($t:ty) => {
        impl $t {
            fn with_attributes(a: AttrParams) -> Self {
                Self {
                    attr: a.attr,
                    attr_not: a.attr_not,
                    attr_min: a.attr_min,
                    attr_max: a.attr_max,
                    region: a.region,
                    language: a.language,
                    ..Default::default()
                }
            }

            fn attr_params(&mut self) -> AttrParams {
                AttrParams {
                    attr: std::mem::take(&mut self.attr),
                    attr_not: std::mem::take(&mut self.attr_not),
                    attr_min: std::mem::take(&mut self.attr_min),
                    attr_max: std::mem::take(&mut self.attr_max),
                    region: self.region.take(),
                    language: self.language.take(),
                }
            }
        }
    };
}
attr_fields!(RecommendParams);
attr_fields!(SimilarParams);
attr_fields!(TrendingParams);

/// The attribute filter prefixes of a query string: `attr.brand`, or as OpenAPI's
/// `deepObject` style spells it, `attr[brand]`.
const ATTR_PREFIXES: &[&str] = &[
    "attr.",
    "attr_not.",
    "attr_min.",
    "attr_max.",
    "attr[",
    "attr_not[",
    "attr_min[",
    "attr_max[",
];

/// (`attr`, `brand`) of `attr.brand` or `attr[brand]`.
fn split_attr_key(k: &str) -> Option<(&str, &str)> {
    if let Some((prefix, rest)) = k.split_once('[') {
        return Some((prefix, rest.strip_suffix(']')?));
    }
    k.split_once('.')
}

impl AttrParams {
    /// The `attr*.<name>`, `region` and `language` keys of a query string.
    pub fn from_query(q: &QueryPairs) -> Result<Self, AppError> {
        let mut a = AttrParams {
            region: q.one("region")?.map(str::to_string),
            language: q.one("language")?.map(str::to_string),
            ..Default::default()
        };
        for (k, v) in &q.0 {
            let Some((prefix, name)) = split_attr_key(k) else {
                continue;
            };
            let number = || {
                v.parse::<f64>()
                    .map_err(|_| AppError::invalid(k.clone(), format!("{v:?} is not a number")))
            };
            match prefix {
                "attr" => a.attr.entry(name.to_string()).or_default().push(v.clone()),
                "attr_not" => a
                    .attr_not
                    .entry(name.to_string())
                    .or_default()
                    .push(v.clone()),
                "attr_min" | "attr_max" => {
                    let map = if prefix == "attr_min" {
                        &mut a.attr_min
                    } else {
                        &mut a.attr_max
                    };
                    if map.insert(name.to_string(), number()?).is_some() {
                        return Err(AppError::invalid(k.clone(), "given more than once"));
                    }
                }
                _ => {}
            }
        }
        Ok(a)
    }

    /// The domain conditions; names and values are checked here, whether each name is
    /// filterable by [`check_filterable`] (it needs the settings).
    pub fn validate(self) -> Result<AttrFilter, AppError> {
        let mut f = AttrFilter::default();
        let names =
            self.attr.len() + self.attr_not.len() + self.attr_min.len() + self.attr_max.len();
        if names > MAX_CATEGORIES {
            return Err(AppError::invalid(
                "attr",
                format!("at most {MAX_CATEGORIES} attribute conditions, got {names}"),
            ));
        }
        for (prefix, map, out) in [
            ("attr", self.attr, &mut f.any),
            ("attr_not", self.attr_not, &mut f.none),
        ] {
            for (name, values) in map {
                let field = format!("{prefix}.{name}");
                check_attr_name(&name).map_err(|r| AppError::invalid(&field, r))?;
                check_names(&field, &values)?;
                if values.is_empty() {
                    return Err(AppError::invalid(&field, "give at least one value"));
                }
                out.insert(name, values.iter().map(|v| keyword_of_request(v)).collect());
            }
        }
        for (prefix, map, out) in [
            ("attr_min", self.attr_min, &mut f.min),
            ("attr_max", self.attr_max, &mut f.max),
        ] {
            for (name, bound) in map {
                let field = format!("{prefix}.{name}");
                check_attr_name(&name).map_err(|r| AppError::invalid(&field, r))?;
                if !bound.is_finite() {
                    return Err(AppError::invalid(&field, format!("{bound} is not finite")));
                }
                out.insert(name, bound);
            }
        }
        // `attr_min` above `attr_max` keeps nothing, as an inverted price range does: an empty
        // answer, not an error (the schema states each bound, not their order).
        for (field, value) in [(REGION, self.region), (LANGUAGE, self.language)] {
            if let Some(v) = value {
                check_names(field, std::slice::from_ref(&v)).map_err(|_| {
                    AppError::invalid(
                        field,
                        format!("{v:?} must be 1..={MAX_NAME_LEN} printable characters"),
                    )
                })?;
                f.any_or_unset
                    .insert(field.to_string(), vec![keyword_of_request(&v)]);
            }
        }
        Ok(f)
    }
}

/// 422 for a filter on an attribute that is not filterable, naming the parameter.
pub fn check_filterable(filter: &Filter, catalog: &CatalogSettings) -> Result<(), AppError> {
    let a = &filter.attributes;
    for (prefix, names) in [
        ("attr", a.any.keys().collect::<Vec<_>>()),
        ("attr_not", a.none.keys().collect()),
        ("attr_min", a.min.keys().collect()),
        ("attr_max", a.max.keys().collect()),
    ] {
        for name in names {
            if !catalog.is_filterable(name) {
                return Err(AppError::invalid(
                    format!("{prefix}.{name}"),
                    format!(
                        "attribute {name:?} is not filterable; filterable: {} (declare more in [catalog] filterable)",
                        catalog.indexed_names().join(", ")
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The boost rules a request asked for (`boost=`), in its order, each once; an unknown name
/// is 422 naming `boost[i]`. The pipeline adds the rules of the variant it assigns.
pub fn resolve_boosts(
    rules: &BoostRules,
    requested: &[String],
) -> Result<Vec<(String, BoostRule)>, AppError> {
    let mut out: Vec<(String, BoostRule)> = Vec::new();
    for (i, name) in requested.iter().enumerate() {
        let Some(rule) = rules.get(name) else {
            return Err(AppError::invalid(
                format!("boost[{i}]"),
                format!(
                    "unknown boost rule {name:?}; expected one of: {}",
                    rules.names().join(", ")
                ),
            ));
        };
        if !out.iter().any(|(n, _)| n == name) {
            out.push((name.clone(), rule.clone()));
        }
    }
    Ok(out)
}

/// Query of `GET /v1/items/{item_id}/similar`.
#[derive(Debug, Default, Deserialize, ToSchema, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SimilarParams {
    /// How many items (1..=200, default 20).
    pub k: Option<i64>,
    #[serde(default)]
    pub category: Vec<String>,
    #[serde(default)]
    pub exclude_category: Vec<String>,
    pub available_only: Option<bool>,
    pub price_min: Option<f64>,
    pub price_max: Option<f64>,
    #[serde(default)]
    pub exclude: Vec<String>,
    /// `attr.<name>=<value>`, or `attr[<name>]=<value>` (repeatable): keep items whose
    /// attribute `<name>` has one of the values. Values of one name are ORed, names are
    /// ANDed; a list attribute matches any of its strings, a number its shortest spelling
    /// (`42`, `4.5`), a boolean `true`/`false`. The name must be `region`, `language` or
    /// declared in `[catalog] filterable`, else 422 naming the parameter.
    #[serde(default)]
    #[param(value_type = Object, style = DeepObject)]
    pub attr: BTreeMap<String, Vec<String>>,
    /// `attr_not.<name>=<value>` (repeatable): drop items whose attribute has one of the
    /// values; items without the attribute stay.
    #[serde(default)]
    #[param(value_type = Object, style = DeepObject)]
    pub attr_not: BTreeMap<String, Vec<String>>,
    /// `attr_min.<name>=<number>`: keep items whose attribute is a number >= this (items
    /// without a number fail).
    #[serde(default)]
    #[param(value_type = Object, style = DeepObject)]
    pub attr_min: BTreeMap<String, f64>,
    /// `attr_max.<name>=<number>`: keep items whose attribute is a number <= this (items
    /// without a number fail).
    #[serde(default)]
    #[param(value_type = Object, style = DeepObject)]
    pub attr_max: BTreeMap<String, f64>,
    /// Keep items whose `region` attribute holds this, and items without one.
    pub region: Option<String>,
    /// Keep items whose `language` attribute holds this, and items without one.
    pub language: Option<String>,
    /// Boost rules to turn on besides the variant's (repeatable).
    #[serde(default)]
    pub boost: Vec<String>,
    #[serde(default)]
    pub explain: bool,
}

/// Query of `GET /v1/trending`.
#[derive(Debug, Default, Deserialize, ToSchema, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TrendingParams {
    /// Only this category.
    pub category: Option<String>,
    /// How many items (1..=200, default 20).
    pub k: Option<i64>,
    /// `attr.<name>=<value>`, or `attr[<name>]=<value>` (repeatable): keep items whose
    /// attribute `<name>` has one of the values. Values of one name are ORed, names are
    /// ANDed; a list attribute matches any of its strings, a number its shortest spelling
    /// (`42`, `4.5`), a boolean `true`/`false`. The name must be `region`, `language` or
    /// declared in `[catalog] filterable`, else 422 naming the parameter.
    #[serde(default)]
    #[param(value_type = Object, style = DeepObject)]
    pub attr: BTreeMap<String, Vec<String>>,
    /// `attr_not.<name>=<value>` (repeatable): drop items whose attribute has one of the
    /// values; items without the attribute stay.
    #[serde(default)]
    #[param(value_type = Object, style = DeepObject)]
    pub attr_not: BTreeMap<String, Vec<String>>,
    /// `attr_min.<name>=<number>`: keep items whose attribute is a number >= this (items
    /// without a number fail).
    #[serde(default)]
    #[param(value_type = Object, style = DeepObject)]
    pub attr_min: BTreeMap<String, f64>,
    /// `attr_max.<name>=<number>`: keep items whose attribute is a number <= this (items
    /// without a number fail).
    #[serde(default)]
    #[param(value_type = Object, style = DeepObject)]
    pub attr_max: BTreeMap<String, f64>,
    /// Keep items whose `region` attribute holds this, and items without one.
    pub region: Option<String>,
    /// Keep items whose `language` attribute holds this, and items without one.
    pub language: Option<String>,
}

const RECOMMEND_KEYS: &[&str] = &[
    "user_id",
    "session_id",
    "k",
    "category",
    "exclude_category",
    "available_only",
    "price_min",
    "price_max",
    "exclude",
    "explain",
    "boost",
    "region",
    "language",
];
const SIMILAR_KEYS: &[&str] = &[
    "k",
    "category",
    "exclude_category",
    "available_only",
    "price_min",
    "price_max",
    "exclude",
    "explain",
    "boost",
    "region",
    "language",
];

impl RecommendParams {
    pub fn from_query(q: &QueryPairs) -> Result<Self, AppError> {
        q.allow_only_or_prefixed(RECOMMEND_KEYS, ATTR_PREFIXES)?;
        Ok(RecommendParams {
            user_id: q.one("user_id")?.map(str::to_string),
            session_id: q.one("session_id")?.map(str::to_string),
            k: q.parse("k", "an integer")?,
            category: q.many("category"),
            exclude_category: q.many("exclude_category"),
            available_only: q.parse("available_only", "true or false")?,
            price_min: q.parse("price_min", "a number")?,
            price_max: q.parse("price_max", "a number")?,
            exclude: q.many("exclude"),
            boost: q.many("boost"),
            explain: q.parse("explain", "true or false")?.unwrap_or(false),
            ..Self::with_attributes(AttrParams::from_query(q)?)
        })
    }

    /// The validated parts: who, how many, and the filter.
    pub fn validate(mut self) -> Result<Validated, AppError> {
        let attributes = self.attr_params();
        let user = self
            .user_id
            .map(|u| UserId::parse(u).map_err(|e| AppError::invalid("user_id", e.to_string())))
            .transpose()?;
        let session = self
            .session_id
            .map(|s| {
                SessionId::parse(s).map_err(|e| AppError::invalid("session_id", e.to_string()))
            })
            .transpose()?;
        let filter = build_filter(FilterParts {
            category: self.category,
            exclude_category: self.exclude_category,
            available_only: self.available_only,
            price_min: self.price_min,
            price_max: self.price_max,
            attributes,
            exclude: self.exclude,
        })?;
        Ok(Validated {
            user,
            session,
            k: validate_k(self.k)?,
            filter,
            explain: self.explain,
            boosts: self.boost,
        })
    }
}

impl SimilarParams {
    pub fn from_query(q: &QueryPairs) -> Result<Self, AppError> {
        q.allow_only_or_prefixed(SIMILAR_KEYS, ATTR_PREFIXES)?;
        Ok(SimilarParams {
            k: q.parse("k", "an integer")?,
            category: q.many("category"),
            exclude_category: q.many("exclude_category"),
            available_only: q.parse("available_only", "true or false")?,
            price_min: q.parse("price_min", "a number")?,
            price_max: q.parse("price_max", "a number")?,
            exclude: q.many("exclude"),
            boost: q.many("boost"),
            explain: q.parse("explain", "true or false")?.unwrap_or(false),
            ..Self::with_attributes(AttrParams::from_query(q)?)
        })
    }

    pub fn validate(mut self) -> Result<Validated, AppError> {
        let attributes = self.attr_params();
        Ok(Validated {
            user: None,
            session: None,
            k: validate_k(self.k)?,
            filter: build_filter(FilterParts {
                category: self.category,
                exclude_category: self.exclude_category,
                available_only: self.available_only,
                price_min: self.price_min,
                price_max: self.price_max,
                attributes,
                exclude: self.exclude,
            })?,
            explain: self.explain,
            boosts: self.boost,
        })
    }
}

impl TrendingParams {
    pub fn from_query(q: &QueryPairs) -> Result<Self, AppError> {
        q.allow_only_or_prefixed(&["category", "k", "region", "language"], ATTR_PREFIXES)?;
        Ok(TrendingParams {
            category: q.one("category")?.map(str::to_string),
            k: q.parse("k", "an integer")?,
            ..Self::with_attributes(AttrParams::from_query(q)?)
        })
    }

    pub fn validate(mut self) -> Result<Validated, AppError> {
        let attributes = self.attr_params();
        Ok(Validated {
            user: None,
            session: None,
            k: validate_k(self.k)?,
            filter: build_filter(FilterParts {
                category: self.category.into_iter().collect(),
                available_only: Some(true),
                attributes,
                ..Default::default()
            })?,
            explain: false,
            boosts: Vec::new(),
        })
    }
}

pub struct Validated {
    pub user: Option<UserId>,
    pub session: Option<SessionId>,
    pub k: usize,
    pub filter: Filter,
    pub explain: bool,
    /// Boost rule names the request asked for (`boost=`), resolved by [`resolve_boosts`].
    pub boosts: Vec<String>,
}

/// An optional integer that also takes a JSON number without a fraction (`106.0`): JSON
/// Schema counts it as an integer, so a client generated from the schema may send one.
/// [`integral`] for an `i32` (a year).
fn integral_i32<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i32>, D::Error> {
    use serde::de::Error;
    integral(d)?
        .map(|v| i32::try_from(v).map_err(|_| D::Error::custom(format!("{v} is out of range"))))
        .transpose()
}

fn integral<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    use serde::de::Error;
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    if let Some(i) = n.as_i64() {
        return Ok(Some(i));
    }
    match n.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 9.0e18 => Ok(Some(f as i64)),
        _ => Err(D::Error::custom(format!(
            "invalid type: {n}, expected an integer"
        ))),
    }
}

pub fn validate_k(k: Option<i64>) -> Result<usize, AppError> {
    let k = k.unwrap_or(DEFAULT_K);
    if !(1..=MAX_K).contains(&k) {
        return Err(AppError::invalid(
            "k",
            format!("must be between 1 and {MAX_K}, got {k}"),
        ));
    }
    Ok(k as usize)
}

#[derive(Default)]
struct FilterParts {
    category: Vec<String>,
    exclude_category: Vec<String>,
    available_only: Option<bool>,
    price_min: Option<f64>,
    price_max: Option<f64>,
    exclude: Vec<String>,
    attributes: AttrParams,
}

fn build_filter(p: FilterParts) -> Result<Filter, AppError> {
    check_names("category", &p.category)?;
    check_names("exclude_category", &p.exclude_category)?;
    let price = |field: &str, v: Option<f64>| -> Result<Option<f32>, AppError> {
        match v {
            None => Ok(None),
            Some(x) if x.is_finite() && x >= 0.0 && x <= f32::MAX as f64 => Ok(Some(x as f32)),
            Some(x) => Err(AppError::invalid(
                field,
                format!("must be a finite number >= 0, got {x}"),
            )),
        }
    };
    // A range with `price_min` above `price_max` is empty: it matches no item (an answer
    // with no items), as any other filter that nothing passes. The schema can state each
    // bound but not their order, so refusing it would refuse requests the schema allows.
    let price_min = price("price_min", p.price_min)?;
    let price_max = price("price_max", p.price_max)?;
    if p.exclude.len() > MAX_LIST {
        return Err(AppError::invalid(
            "exclude",
            format!("at most {MAX_LIST} ids, got {}", p.exclude.len()),
        ));
    }
    let exclude_items = p
        .exclude
        .into_iter()
        .enumerate()
        .map(|(i, id)| {
            ItemId::parse(id).map_err(|e| AppError::invalid(format!("exclude[{i}]"), e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Filter {
        include_categories: p.category,
        exclude_categories: p.exclude_category,
        available_only: p.available_only.unwrap_or(true),
        price_min,
        price_max,
        created_after: None,
        exclude_items,
        attributes: p.attributes.validate()?,
    })
}

fn check_names(field: &str, names: &[String]) -> Result<(), AppError> {
    if names.len() > MAX_CATEGORIES {
        return Err(AppError::invalid(
            field,
            format!("at most {MAX_CATEGORIES} values, got {}", names.len()),
        ));
    }
    for (i, n) in names.iter().enumerate() {
        if n.trim().is_empty()
            || n.chars().count() > MAX_NAME_LEN
            || n.chars().any(char::is_control)
        {
            return Err(AppError::invalid(
                format!("{field}[{i}]"),
                format!("{n:?} must be 1..={MAX_NAME_LEN} printable characters"),
            ));
        }
    }
    Ok(())
}

/// One recommended item.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RecommendedItem {
    pub item_id: String,
    pub score: f32,
    pub title: String,
    #[schema(value_type = Vec<String>)]
    pub categories: Vec<Name>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<f32>,
    /// The item's attributes (absent when it has none).
    #[serde(default, skip_serializing_if = "Attributes::is_empty")]
    #[schema(value_type = HashMap<String, AttrValue>)]
    pub attributes: Attributes,
    /// The score's components (with `explain=true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explanation: Option<Components>,
}

/// The answer of every recommendation-shaped endpoint.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RecommendationsResponse {
    pub request_id: String,
    pub model_version: String,
    /// The experiment arm that served the request.
    pub variant: String,
    /// Where the candidates came from.
    pub source: Source,
    /// Parts that did not answer; the response was made without them.
    pub degraded: Vec<Degraded>,
    pub items: Vec<RecommendedItem>,
}

impl RecommendationsResponse {
    pub fn new(r: Recommendations, explain: bool) -> Self {
        RecommendationsResponse {
            request_id: r.request_id,
            model_version: r.model_version,
            variant: r.variant,
            source: r.source,
            degraded: r.degraded,
            items: r
                .items
                .into_iter()
                .map(|x| RecommendedItem {
                    item_id: x.entry.item.item_id.to_string(),
                    score: x.score,
                    title: x.entry.item.title.clone(),
                    categories: x.entry.item.categories.to_vec(),
                    price: x.entry.item.price,
                    attributes: x.entry.item.attributes.clone(),
                    explanation: explain.then_some(x.components),
                })
                .collect(),
        }
    }
}

/// A [`RecommendationsResponse`] as the recommendation endpoints write it: the same JSON,
/// serialized straight from the catalog's entries. Building the owned response copied every
/// item's title, categories and attributes (a dozen allocations per item, 20 items a request)
/// only to serialize and drop them.
pub struct RecommendationsBody {
    recs: Recommendations,
    explain: bool,
}

/// Bytes reserved for a response before it is written: a 20-item answer is 3-5 kB, and
/// growing the buffer from axum's 128 bytes copies it five times.
const BODY_CAPACITY: usize = 4_096;

impl RecommendationsBody {
    pub fn new(recs: Recommendations, explain: bool) -> Self {
        RecommendationsBody { recs, explain }
    }
}

/// [`RecommendedItem`]'s fields, borrowed; the field order and the skip rules are the same.
#[derive(Serialize)]
struct RecommendedItemRef<'a> {
    item_id: &'a str,
    score: f32,
    title: &'a str,
    categories: &'a [Name],
    #[serde(skip_serializing_if = "Option::is_none")]
    price: Option<f32>,
    #[serde(skip_serializing_if = "Attributes::is_empty")]
    attributes: &'a Attributes,
    #[serde(skip_serializing_if = "Option::is_none")]
    explanation: Option<&'a Components>,
}

/// [`RecommendationsResponse`]'s fields, borrowed.
#[derive(Serialize)]
struct RecommendationsRef<'a> {
    request_id: &'a str,
    model_version: &'a str,
    variant: &'a str,
    source: Source,
    degraded: &'a [Degraded],
    #[serde(serialize_with = "serialize_items")]
    items: (&'a [crate::rerank::Ranked], bool),
}

fn serialize_items<S: serde::Serializer>(
    items: &(&[crate::rerank::Ranked], bool),
    s: S,
) -> Result<S::Ok, S::Error> {
    let (items, explain) = *items;
    s.collect_seq(items.iter().map(|x| {
        let item = &x.entry.item;
        RecommendedItemRef {
            item_id: item.item_id.as_str(),
            score: x.score,
            title: &item.title,
            categories: &item.categories,
            price: item.price,
            attributes: &item.attributes,
            explanation: explain.then_some(&x.components),
        }
    }))
}

impl Serialize for RecommendationsBody {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = &self.recs;
        RecommendationsRef {
            request_id: &r.request_id,
            model_version: &r.model_version,
            variant: &r.variant,
            source: r.source,
            degraded: &r.degraded,
            items: (&r.items, self.explain),
        }
        .serialize(s)
    }
}

impl axum::response::IntoResponse for RecommendationsBody {
    fn into_response(self) -> axum::response::Response {
        use axum::http::{header, HeaderValue};
        let mut buf = Vec::with_capacity(BODY_CAPACITY);
        match serde_json::to_writer(&mut buf, &self) {
            Ok(()) => (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                buf,
            )
                .into_response(),
            Err(e) => AppError::Internal {
                detail: format!("response encoding: {e}"),
            }
            .into_response(),
        }
    }
}

/// An item to add or replace; it is embedded with the item tower and indexed at once.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ItemInput {
    pub item_id: String,
    pub title: String,
    #[serde(default, alias = "genres")]
    pub categories: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    pub price: Option<f64>,
    #[serde(default = "yes")]
    pub available: bool,
    #[serde(default, deserialize_with = "integral_i32")]
    pub year: Option<i32>,
    /// Unix seconds; default now.
    #[serde(default, deserialize_with = "integral")]
    pub created_at: Option<i64>,
    /// A popularity prior (interaction count); default 0.
    pub popularity: Option<f32>,
    /// Attributes by name: a string, a list of strings, a number or a boolean. Names are
    /// ASCII letters, digits and `_` (starting with a letter or `_`); only filterable names
    /// (`region`, `language`, `[catalog] filterable`) can be filtered on.
    #[serde(default)]
    #[schema(value_type = HashMap<String, AttrValue>)]
    pub attributes: Attributes,
}

fn yes() -> bool {
    true
}

impl ItemInput {
    /// The domain item and its popularity; `at` is this item's field prefix (`items[3]`).
    pub fn validate(self, at: &str, now_s: i64) -> Result<(Item, f32), AppError> {
        let field = |f: &str| format!("{at}.{f}");
        let item_id = ItemId::parse(self.item_id)
            .map_err(|e| AppError::invalid(field("item_id"), e.to_string()))?;
        if self.title.chars().count() > MAX_TITLE_LEN || self.title.chars().any(char::is_control) {
            return Err(AppError::invalid(
                field("title"),
                format!("must be at most {MAX_TITLE_LEN} printable characters"),
            ));
        }
        check_names(&field("categories"), &self.categories)?;
        check_names(&field("tags"), &self.tags)?;
        let price = match self.price {
            None => None,
            Some(p) if p.is_finite() && p >= 0.0 && p <= f32::MAX as f64 => Some(p as f32),
            Some(p) => {
                return Err(AppError::invalid(
                    field("price"),
                    format!("must be a finite number >= 0, got {p}"),
                ))
            }
        };
        let popularity = match self.popularity {
            None => 0.0,
            Some(p) if p.is_finite() && p >= 0.0 => p,
            Some(p) => {
                return Err(AppError::invalid(
                    field("popularity"),
                    format!("must be a finite number >= 0, got {p}"),
                ))
            }
        };
        check_attributes(&self.attributes).map_err(|(name, reason)| {
            let f = if name.is_empty() {
                field("attributes")
            } else {
                field(&format!("attributes.{name}"))
            };
            AppError::invalid(f, reason)
        })?;
        let item = Item {
            item_id,
            title: self.title,
            categories: self.categories.into_iter().map(Name::from).collect(),
            tags: self.tags.into_iter().map(Name::from).collect(),
            price,
            available: self.available,
            year: self.year,
            created_at: Some(self.created_at.unwrap_or(now_s)),
            attributes: self.attributes,
        };
        Ok((item, popularity))
    }
}

/// `POST /v1/items` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ItemsUpsert {
    pub items: Vec<ItemInput>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ItemsUpserted {
    pub upserted: usize,
    pub model_version: String,
}

/// `PATCH /v1/items/{item_id}` body: the fields to change.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ItemPatch {
    pub available: Option<bool>,
    pub price: Option<f64>,
}

/// An item as the catalog holds it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ItemView {
    pub item_id: String,
    pub title: String,
    #[schema(value_type = Vec<String>)]
    pub categories: Vec<Name>,
    #[schema(value_type = Vec<String>)]
    pub tags: Vec<Name>,
    pub price: Option<f32>,
    pub available: bool,
    pub year: Option<i32>,
    pub created_at: Option<i64>,
    pub popularity: f32,
    #[serde(default, skip_serializing_if = "Attributes::is_empty")]
    #[schema(value_type = HashMap<String, AttrValue>)]
    pub attributes: Attributes,
}

impl From<&CatalogEntry> for ItemView {
    fn from(e: &CatalogEntry) -> Self {
        ItemView {
            item_id: e.item.item_id.to_string(),
            title: e.item.title.clone(),
            categories: e.item.categories.to_vec(),
            tags: e.item.tags.to_vec(),
            price: e.item.price,
            available: e.item.available,
            year: e.item.year,
            created_at: e.item.created_at,
            popularity: e.popularity,
            attributes: e.item.attributes.clone(),
        }
    }
}

/// `POST /v1/users/{user_id}/onboarding` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OnboardingInput {
    /// Categories the user picked; their most popular items seed the history.
    #[serde(default)]
    pub categories: Vec<String>,
    /// Items the user picked.
    #[serde(default)]
    pub liked_items: Vec<String>,
    /// How many recommendations to return (1..=200, default 20).
    #[serde(default, deserialize_with = "integral")]
    pub k: Option<i64>,
    /// Recommend only items sold in this region (or naming no region).
    pub region: Option<String>,
    /// Recommend only items offered in this language (or naming no language).
    pub language: Option<String>,
}

impl OnboardingInput {
    /// The region and language conditions of the recommendations.
    pub fn attr_filter(&self) -> Result<AttrFilter, AppError> {
        AttrParams {
            region: self.region.clone(),
            language: self.language.clone(),
            ..Default::default()
        }
        .validate()
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OnboardingResponse {
    /// The items written to the user's history.
    pub seeded_items: Vec<String>,
    pub recommendations: RecommendationsResponse,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EventsAccepted {
    pub accepted: usize,
    pub duplicates: usize,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    pub status: String,
    pub model_version: String,
    pub catalog_items: usize,
    pub index_items: Option<usize>,
    /// The parts that did not answer.
    pub failing: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(pairs: &[(&str, &str)]) -> QueryPairs {
        QueryPairs(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn field(r: Result<Validated, AppError>) -> String {
        match r {
            Err(AppError::Invalid { field, .. }) => field,
            Err(e) => panic!("{e:?}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn recommend_query_validates_each_field() {
        let v = RecommendParams::from_query(&query(&[
            ("user_id", "u1"),
            ("category", "Drama"),
            ("category", "Comedy"),
            ("price_max", "10"),
            ("exclude", "7"),
        ]))
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(v.k, 20);
        assert!(v.filter.available_only);
        assert_eq!(v.filter.include_categories, ["Drama", "Comedy"]);
        assert_eq!(v.filter.exclude_items[0].as_str(), "7");

        let check = |pairs: &[(&str, &str)]| {
            field(RecommendParams::from_query(&query(pairs)).and_then(RecommendParams::validate))
        };
        assert_eq!(check(&[("k", "0")]), "k");
        assert_eq!(check(&[("k", "10000")]), "k");
        assert_eq!(check(&[("k", "ten")]), "k");
        assert_eq!(check(&[("price_min", "-1")]), "price_min");
        assert_eq!(check(&[("price_max", "NaN")]), "price_max");
        // An inverted range is an empty one (it matches nothing), not an error.
        let inverted =
            RecommendParams::from_query(&query(&[("price_min", "5"), ("price_max", "1")]))
                .unwrap()
                .validate()
                .unwrap();
        assert_eq!(
            (inverted.filter.price_min, inverted.filter.price_max),
            (Some(5.0), Some(1.0))
        );
        assert_eq!(check(&[("colour", "red")]), "colour");
        assert_eq!(check(&[("user_id", "")]), "user_id");
        assert_eq!(check(&[("exclude", "a"), ("exclude", "")]), "exclude[1]");
        assert_eq!(check(&[("category", " ")]), "category[0]");
        assert_eq!(check(&[("explain", "maybe")]), "explain");
    }

    /// The body the endpoints write, serialized from borrowed entries, is the JSON of the
    /// owned response type that clients (and the schema) read: every field, in order, with
    /// the same fields left out.
    #[test]
    fn the_written_body_is_the_response_type_json() {
        use crate::rerank::{Components, Ranked};
        let entry = |id: &str, price: Option<f32>, attrs: &[(&str, AttrValue)]| {
            let mut item = Item::new(ItemId::parse(id).unwrap(), format!("title \"{id}\" é"));
            item.categories = ["Drama".into(), "Comedy".into()].into();
            item.price = price;
            item.attributes = attrs
                .iter()
                .map(|&(k, ref v)| (k.into(), v.clone()))
                .collect();
            std::sync::Arc::new(CatalogEntry {
                item,
                popularity: 1.0,
                vector: vec![1.0, 0.0].into(),
            })
        };
        let recs = Recommendations {
            request_id: "req-1".into(),
            model_version: "m1".into(),
            variant: "control".into(),
            source: Source::Personal,
            degraded: vec![Degraded::Session, Degraded::Trending],
            items: vec![
                Ranked {
                    entry: entry(
                        "a",
                        Some(9.5),
                        &[
                            ("brand", AttrValue::Text("acme".into())),
                            (
                                "region",
                                AttrValue::List(vec!["eu".into(), "us".into()].into()),
                            ),
                            ("stock", AttrValue::Number(3.0)),
                            ("promoted", AttrValue::Bool(true)),
                        ],
                    ),
                    score: 0.75,
                    components: Components {
                        ann: 0.5,
                        boosts: [("promoted".to_string(), 0.25)].into(),
                        ..Components::default()
                    },
                },
                Ranked {
                    entry: entry("b", None, &[]),
                    score: -0.125,
                    components: Components::default(),
                },
            ],
        };
        for explain in [false, true] {
            let written =
                serde_json::to_string(&RecommendationsBody::new(recs.clone(), explain)).unwrap();
            let owned = serde_json::to_string(&RecommendationsResponse::new(recs.clone(), explain))
                .unwrap();
            assert_eq!(written, owned, "explain={explain}");
        }
        let back: RecommendationsResponse = serde_json::from_str(
            &serde_json::to_string(&RecommendationsBody::new(recs, true)).unwrap(),
        )
        .unwrap();
        assert_eq!(back.items[0].attributes["stock"], AttrValue::Number(3.0));
        assert!(back.items[1].attributes.is_empty() && back.items[1].price.is_none());
    }

    #[test]
    fn boosts_resolve_the_request_and_name_an_unknown_one() {
        let rules = BoostRules::default();
        let names =
            |v: &[(String, BoostRule)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        let got = resolve_boosts(
            &rules,
            &[
                "promoted".into(),
                "bury_low_stock".into(),
                "promoted".into(),
            ],
        )
        .unwrap();
        assert_eq!(names(&got), ["promoted", "bury_low_stock"]);
        match resolve_boosts(&rules, &["promoted".into(), "sparkle".into()]) {
            Err(AppError::Invalid { field, .. }) => assert_eq!(field, "boost[1]"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn item_input_names_the_bad_field() {
        let input = ItemInput {
            item_id: "x".into(),
            title: "t".into(),
            categories: vec![],
            tags: vec![],
            price: Some(-2.0),
            available: true,
            year: None,
            created_at: None,
            popularity: None,
            attributes: Attributes::new(),
        };
        match input.validate("items[4]", 0) {
            Err(AppError::Invalid { field, .. }) => assert_eq!(field, "items[4].price"),
            other => panic!("{other:?}"),
        }
    }
}
