//! The domain [`Filter`] evaluated against a stored [`Payload`]: the same semantics as
//! [`Filter::matches`] on an `Item` (a test below holds the two together), compiled once per
//! search so that a scan over many payloads does no per-row allocation.

use super::Payload;
use crate::domain::Filter;
use std::collections::HashSet;

/// A filter prepared for evaluation over many payloads.
pub struct CompiledFilter<'a> {
    filter: &'a Filter,
    excluded: HashSet<&'a str>,
    /// Nothing to check: every payload passes.
    pass_all: bool,
}

impl<'a> CompiledFilter<'a> {
    pub fn new(filter: &'a Filter) -> Self {
        CompiledFilter {
            filter,
            excluded: filter.exclude_items.iter().map(|i| i.as_str()).collect(),
            pass_all: filter.is_empty(),
        }
    }

    pub fn pass_all(&self) -> bool {
        self.pass_all
    }

    /// Whether `p` passes; the same rules as [`Filter::matches`].
    pub fn matches(&self, p: &Payload) -> bool {
        if self.pass_all {
            return true;
        }
        let f = self.filter;
        if !f.include_categories.is_empty()
            && !p
                .categories
                .iter()
                .any(|c| f.include_categories.iter().any(|x| x == c))
        {
            return false;
        }
        if !f.exclude_categories.is_empty()
            && p.categories
                .iter()
                .any(|c| f.exclude_categories.iter().any(|x| x == c))
        {
            return false;
        }
        if f.available_only && !p.available {
            return false;
        }
        if f.price_min.is_some() || f.price_max.is_some() {
            let Some(price) = p.price else { return false };
            if f.price_min.is_some_and(|m| price < m) || f.price_max.is_some_and(|m| price > m) {
                return false;
            }
        }
        if let Some(after) = f.created_after {
            if p.created_at.is_none_or(|c| c <= after) {
                return false;
            }
        }
        (self.excluded.is_empty() || !self.excluded.contains(p.item_id.as_str()))
            && f.attributes.matches(&p.attributes)
    }
}

/// Whether one payload passes `filter` (compile once instead when checking many).
pub fn payload_matches(filter: &Filter, p: &Payload) -> bool {
    CompiledFilter::new(filter).matches(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{AttrFilter, AttrValue, Item, ItemId};
    use proptest::prelude::*;

    const CATS: [&str; 4] = ["a", "b", "c", "d"];

    fn payload_strategy() -> impl Strategy<Value = Payload> {
        (
            0u8..6,
            proptest::collection::vec(0usize..4, 0..3),
            any::<bool>(),
            proptest::option::of(0.0f32..20.0),
            proptest::option::of(0i64..20),
            attributes_strategy(),
        )
            .prop_map(|(id, cats, available, price, created_at, attrs)| Payload {
                item_id: ItemId::parse(format!("i{id}")).unwrap(),
                categories: cats.into_iter().map(|c| CATS[c].into()).collect(),
                available,
                price,
                created_at,
                title: String::new(),
                popularity: 0.0,
                tags: Vec::new(),
                year: None,
                attributes: attrs,
            })
    }

    const NAMES: [&str; 3] = ["brand", "region", "size"];
    const VALUES: [&str; 4] = ["x", "y", "z", "3"];

    fn attributes_strategy() -> impl Strategy<Value = crate::domain::Attributes> {
        let value = prop_oneof![
            (0usize..4).prop_map(|v| AttrValue::Text(VALUES[v].into())),
            proptest::collection::vec(0usize..4, 0..3)
                .prop_map(|l| AttrValue::List(l.into_iter().map(|v| VALUES[v].into()).collect())),
            (0u8..6).prop_map(|n| AttrValue::Number(f64::from(n))),
            any::<bool>().prop_map(AttrValue::Bool),
        ];
        proptest::collection::btree_map((0usize..3).prop_map(|n| NAMES[n]), value, 0..3)
            .prop_map(|m| m.into_iter().map(|(n, v)| (n.into(), v)).collect())
    }

    fn attr_filter_strategy() -> impl Strategy<Value = AttrFilter> {
        let names = || (0usize..3).prop_map(|n| NAMES[n].to_string());
        let values = || {
            proptest::collection::vec(
                prop_oneof![
                    (0usize..4).prop_map(|v| VALUES[v].to_string()),
                    Just("true".into())
                ],
                1..3,
            )
        };
        (
            proptest::collection::btree_map(names(), values(), 0..2),
            proptest::collection::btree_map(names(), values(), 0..2),
            proptest::collection::btree_map(names(), 0.0f64..6.0, 0..2),
            proptest::collection::btree_map(names(), 0.0f64..6.0, 0..2),
            proptest::collection::btree_map(names(), values(), 0..2),
        )
            .prop_map(|(any, none, min, max, any_or_unset)| AttrFilter {
                any,
                none,
                min,
                max,
                any_or_unset,
            })
    }

    fn filter_strategy() -> impl Strategy<Value = Filter> {
        (
            proptest::collection::vec(0usize..4, 0..3),
            proptest::collection::vec(0usize..4, 0..2),
            any::<bool>(),
            proptest::option::of(0.0f32..20.0),
            proptest::option::of(0.0f32..20.0),
            proptest::option::of(0i64..20),
            proptest::collection::vec(0u8..6, 0..3),
            attr_filter_strategy(),
        )
            .prop_map(
                |(inc, exc, avail, pmin, pmax, after, ex, attributes)| Filter {
                    include_categories: inc.into_iter().map(|c| CATS[c].to_string()).collect(),
                    exclude_categories: exc.into_iter().map(|c| CATS[c].to_string()).collect(),
                    available_only: avail,
                    price_min: pmin,
                    price_max: pmax,
                    created_after: after,
                    exclude_items: ex
                        .into_iter()
                        .map(|i| ItemId::parse(format!("i{i}")).unwrap())
                        .collect(),
                    attributes,
                },
            )
    }

    proptest! {
        /// The payload evaluation agrees with the domain oracle on every field.
        #[test]
        fn agrees_with_domain_filter(p in payload_strategy(), f in filter_strategy()) {
            let mut item = Item::new(p.item_id.clone(), "");
            item.categories = p.categories.as_slice().into();
            item.available = p.available;
            item.price = p.price;
            item.created_at = p.created_at;
            item.attributes = p.attributes.clone();
            prop_assert_eq!(payload_matches(&f, &p), f.matches(&item));
        }
    }
}
