//! The `edge` backend's RAM copy of the vectors, one contiguous block per category, so that a
//! search under a category filter reads only the rows of those categories and scores them
//! exactly.
//!
//! Why: category filters keep 1-15% of a catalog, whole clusters of it, the case where a
//! filtered graph search loses recall (QDRANT_EDGE.md, pitfall 6) and the engine's own exact
//! scan is slow (it checks the payload condition per point; 10k points cost ~3 ms at 1M). A
//! scan of one block is a stream of dot products over adjacent rows.
//!
//! An item in two categories has a row in both blocks (the search keeps it once); items
//! without a category are not here, and filters without an included category go to the
//! engine. Rows carry the filterable fields, so a scan checks them without a lookup; exclusion
//! by category asks the excluded categories' blocks.

use super::exact::TopK;
use super::{IndexPoint, Payload, PayloadPatch};
use crate::domain::{point_id, Filter};
use crate::vector::dot_rows;
use rayon::prelude::*;
use std::collections::{HashMap, HashSet};
use uuid::Uuid;

/// Rows scored per call of [`dot_rows`].
const SCAN_CHUNK: usize = 512;

/// The filterable fields of one row.
#[derive(Debug, Clone, Copy)]
struct Row {
    id: Uuid,
    available: bool,
    /// NaN: no price.
    price: f32,
    /// `i64::MIN`: no creation time.
    created_at: i64,
}

impl Row {
    fn of(p: &Payload) -> Row {
        Row {
            id: point_id(&p.item_id),
            available: p.available,
            price: p.price.unwrap_or(f32::NAN),
            created_at: p.created_at.unwrap_or(i64::MIN),
        }
    }
}

/// One category's rows: row `i` of `rows` is `vectors[i * dim..(i + 1) * dim]`.
#[derive(Debug, Default)]
struct Block {
    vectors: Vec<f32>,
    rows: Vec<Row>,
    at: HashMap<Uuid, usize>,
}

impl Block {
    fn put(&mut self, dim: usize, row: Row, v: &[f32]) {
        match self.at.get(&row.id) {
            Some(&i) => {
                self.vectors[i * dim..(i + 1) * dim].copy_from_slice(v);
                self.rows[i] = row;
            }
            None => {
                self.at.insert(row.id, self.rows.len());
                self.rows.push(row);
                self.vectors.extend_from_slice(v);
            }
        }
    }

    /// Moves the last row into the hole, so the block stays contiguous.
    fn remove(&mut self, dim: usize, id: &Uuid) {
        let Some(i) = self.at.remove(id) else { return };
        let last = self.rows.len() - 1;
        if i != last {
            let (head, tail) = self.vectors.split_at_mut(last * dim);
            head[i * dim..(i + 1) * dim].copy_from_slice(&tail[..dim]);
            self.rows.swap(i, last);
            self.at.insert(self.rows[i].id, i);
        }
        self.rows.pop();
        self.vectors.truncate(last * dim);
    }

    #[cfg(test)]
    fn vector(&self, dim: usize, i: usize) -> &[f32] {
        &self.vectors[i * dim..(i + 1) * dim]
    }
}

/// The filter's conditions on the row fields, prepared once per search.
struct RowFilter<'a> {
    available_only: bool,
    price_min: f32,
    price_max: f32,
    has_price_bound: bool,
    created_after: Option<i64>,
    excluded_ids: HashSet<Uuid>,
    excluded_blocks: Vec<&'a Block>,
}

impl RowFilter<'_> {
    #[inline]
    fn fields_pass(&self, r: &Row) -> bool {
        if self.available_only && !r.available {
            return false;
        }
        // NaN (no price) fails both comparisons, as an item without a price fails a bound.
        if self.has_price_bound && !(r.price >= self.price_min && r.price <= self.price_max) {
            return false;
        }
        self.created_after.is_none_or(|after| r.created_at > after)
    }

    /// The conditions that need a lookup; checked only for rows good enough to keep.
    fn lookups_pass(&self, r: &Row) -> bool {
        !self.excluded_ids.contains(&r.id)
            && !self
                .excluded_blocks
                .iter()
                .any(|b| b.at.contains_key(&r.id))
    }
}

/// Every categorised point's vector, by category.
#[derive(Debug)]
pub struct CategoryBlocks {
    dim: usize,
    blocks: HashMap<String, Block>,
}

impl CategoryBlocks {
    pub fn new(dim: usize) -> Self {
        CategoryBlocks {
            dim,
            blocks: HashMap::new(),
        }
    }

    /// Inserts or replaces points (their vectors are stored normalised, as the engine
    /// scores cosine). A point whose categories changed leaves its old blocks.
    pub fn upsert(&mut self, points: &[IndexPoint]) {
        for p in points {
            let row = Row::of(&p.payload);
            self.remove_id(&row.id, &p.payload.categories);
            if p.payload.categories.is_empty() {
                continue;
            }
            let v = super::validate::normalized(&p.vector);
            for c in &p.payload.categories {
                self.blocks
                    .entry(c.clone())
                    .or_default()
                    .put(self.dim, row, &v);
            }
        }
    }

    /// Removes the point from every block except those in `keep`.
    fn remove_id(&mut self, id: &Uuid, keep: &[String]) {
        let dim = self.dim;
        for (c, b) in self.blocks.iter_mut() {
            if !keep.contains(c) {
                b.remove(dim, id);
            }
        }
    }

    pub fn delete(&mut self, ids: impl IntoIterator<Item = Uuid>) {
        for id in ids {
            self.remove_id(&id, &[]);
        }
    }

    /// Applies the filterable fields of a patch (price, availability) to every row of `id`.
    pub fn patch(&mut self, id: &Uuid, patch: &PayloadPatch) {
        for b in self.blocks.values_mut() {
            if let Some(&i) = b.at.get(id) {
                let r = &mut b.rows[i];
                if let Some(a) = patch.available {
                    r.available = a;
                }
                if let Some(p) = patch.price {
                    r.price = p;
                }
            }
        }
    }

    /// The stored (normalised) vector of a point (the tests' view of where a point is).
    #[cfg(test)]
    pub fn vector(&self, id: &Uuid) -> Option<&[f32]> {
        self.blocks
            .values()
            .find_map(|b| b.at.get(id).map(|&i| b.vector(self.dim, i)))
    }

    /// Rows a search under `filter` would scan; `None` when the filter includes no category,
    /// so that this copy cannot answer it.
    pub fn rows_to_scan(&self, filter: &Filter) -> Option<usize> {
        if filter.include_categories.is_empty() {
            return None;
        }
        let mut seen = HashSet::new();
        Some(
            filter
                .include_categories
                .iter()
                .filter(|c| seen.insert(c.as_str()))
                .filter_map(|c| self.blocks.get(c))
                .map(|b| b.rows.len())
                .sum(),
        )
    }

    /// The exact `k` best points passing `filter` (which includes at least one category),
    /// as (point id, cosine score), best first. `q` is normalised by the caller.
    pub fn search(&self, q: &[f32], filter: &Filter, k: usize) -> Vec<(Uuid, f32)> {
        let rf = RowFilter {
            available_only: filter.available_only,
            price_min: filter.price_min.unwrap_or(f32::NEG_INFINITY),
            price_max: filter.price_max.unwrap_or(f32::INFINITY),
            has_price_bound: filter.price_min.is_some() || filter.price_max.is_some(),
            created_after: filter.created_after,
            excluded_ids: filter.exclude_items.iter().map(point_id).collect(),
            excluded_blocks: filter
                .exclude_categories
                .iter()
                .filter_map(|c| self.blocks.get(c))
                .collect(),
        };
        let mut seen = HashSet::new();
        let blocks: Vec<&Block> = filter
            .include_categories
            .iter()
            .filter(|c| seen.insert(c.as_str()))
            .filter_map(|c| self.blocks.get(c))
            .collect();
        let dim = self.dim;
        let scan = |b: &&Block| {
            let mut top = TopK::new(k);
            let mut scores = Vec::with_capacity(SCAN_CHUNK);
            for (c, rows) in b.rows.chunks(SCAN_CHUNK).enumerate() {
                let first = c * SCAN_CHUNK;
                dot_rows(
                    q,
                    &b.vectors[first * dim..(first + rows.len()) * dim],
                    &mut scores,
                );
                for (j, (r, &s)) in rows.iter().zip(&scores).enumerate() {
                    if top.would_keep(s) && rf.fields_pass(r) && rf.lookups_pass(r) {
                        top.push(s, first + j);
                    }
                }
            }
            top.into_sorted()
                .into_iter()
                .map(|(s, i)| (b.rows[i].id, s))
                .collect::<Vec<_>>()
        };
        let per_block: Vec<Vec<(Uuid, f32)>> = if blocks.len() > 1 {
            blocks.par_iter().map(scan).collect()
        } else {
            blocks.iter().map(scan).collect()
        };
        if per_block.len() == 1 {
            return per_block.into_iter().next().unwrap_or_default();
        }
        // An item in two included categories is found in both blocks: keep it once.
        let mut best: HashMap<Uuid, f32> = HashMap::new();
        for (id, s) in per_block.into_iter().flatten() {
            best.entry(id).or_insert(s);
        }
        let mut merged: Vec<(Uuid, f32)> = best.into_iter().collect();
        merged.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        merged.truncate(k);
        merged
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ItemId;

    fn point(id: &str, cats: &[&str], v: [f32; 2], price: Option<f32>) -> IndexPoint {
        IndexPoint {
            vector: v.to_vec(),
            payload: Payload {
                item_id: ItemId::parse(id).unwrap(),
                categories: cats.iter().map(|c| c.to_string()).collect(),
                available: true,
                price,
                created_at: None,
                title: id.into(),
                popularity: 0.0,
            },
        }
    }

    fn ids(hits: &[(Uuid, f32)]) -> Vec<Uuid> {
        hits.iter().map(|(u, _)| *u).collect()
    }

    fn pid(s: &str) -> Uuid {
        point_id(&ItemId::parse(s).unwrap())
    }

    fn cats(include: &[&str]) -> Filter {
        Filter {
            include_categories: include.iter().map(|c| c.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn scans_only_included_categories_and_keeps_shared_items_once() {
        let mut b = CategoryBlocks::new(2);
        b.upsert(&[
            point("a", &["x"], [1.0, 0.0], None),
            point("b", &["x", "y"], [0.9, 0.1], None),
            point("c", &["y"], [0.0, 1.0], None),
            point("d", &["z"], [1.0, 0.01], None),
        ]);
        let hits = b.search(&[1.0, 0.0], &cats(&["x", "y"]), 10);
        assert_eq!(ids(&hits), vec![pid("a"), pid("b"), pid("c")]);
        assert_eq!(b.rows_to_scan(&cats(&["x", "y", "x"])), Some(4));
        assert_eq!(b.rows_to_scan(&Filter::default()), None);
    }

    #[test]
    fn moves_deletes_and_patches_rows() {
        let mut b = CategoryBlocks::new(2);
        b.upsert(&[
            point("a", &["x"], [1.0, 0.0], Some(10.0)),
            point("b", &["x"], [0.9, 0.1], Some(20.0)),
        ]);
        // "a" moves to category y.
        b.upsert(&[point("a", &["y"], [1.0, 0.0], Some(10.0))]);
        assert_eq!(
            ids(&b.search(&[1.0, 0.0], &cats(&["x"]), 10)),
            vec![pid("b")]
        );
        let cheap = Filter {
            price_max: Some(15.0),
            ..cats(&["x", "y"])
        };
        assert_eq!(ids(&b.search(&[1.0, 0.0], &cheap, 10)), vec![pid("a")]);
        b.patch(
            &pid("a"),
            &PayloadPatch {
                available: Some(false),
                ..Default::default()
            },
        );
        let live = Filter {
            available_only: true,
            ..cats(&["x", "y"])
        };
        assert_eq!(ids(&b.search(&[1.0, 0.0], &live, 10)), vec![pid("b")]);
        b.delete([pid("b")]);
        assert!(b.search(&[1.0, 0.0], &live, 10).is_empty());
        assert!(b.vector(&pid("a")).is_some());
        assert!(b.vector(&pid("b")).is_none());
    }

    #[test]
    fn excludes_by_id_and_by_category() {
        let mut b = CategoryBlocks::new(2);
        b.upsert(&[
            point("a", &["x"], [1.0, 0.0], None),
            point("b", &["x", "sale"], [0.9, 0.1], None),
            point("c", &["x"], [0.5, 0.5], None),
        ]);
        let f = Filter {
            exclude_categories: vec!["sale".into()],
            exclude_items: vec![ItemId::parse("a").unwrap()],
            ..cats(&["x"])
        };
        assert_eq!(ids(&b.search(&[1.0, 0.0], &f, 10)), vec![pid("c")]);
    }
}
