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
//!
//! A scan reads int8 codes of the rows (a quarter of the bytes: the scan is bound by memory
//! bandwidth, and a large category is tens of MB of f32), keeps the best `k` plus
//! [`RESCORE_EXTRA`] by the approximate score, and ranks those on the f32 rows. The answer
//! is exact unless a true top-`k` row's approximate score falls below that many others'.
//! The codes are of each row's offset from its block's mean: a category's rows sit close
//! together, and codes of the whole vectors would spend their 8 bits on what the rows share
//! (`q · mean` is the same for every row of a block, so the order needs only `q · offset`).
//!
//! Trained embeddings of one category vary in few directions: at 1M generated items, 32
//! principal directions hold 99.6% of a block's variance in 64 dimensions. A block where 32
//! hold at least [`PROJECTED_VARIANCE`] keeps codes of the offsets' coordinates on those
//! directions only (half the bytes and half the work per row), and its shortlist is longer.
//!
//! A block's centre and directions are fitted again each time it doubles. The service fits
//! off the lock, on a sample, and re-encodes the rows a chunk at a time while the block
//! goes on scanning its old codes ([`CategoryBlocks::start_fits`]).

use super::exact::TopK;
use super::{IndexPoint, Payload, PayloadPatch, Vector};
use crate::domain::{point_id, Filter, Name};
use crate::vector::{dot_rows, i8_rows_at_least, quantize_i8, symmetric_eigen};
use hashbrown::HashTable;
use rayon::prelude::*;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use uuid::Uuid;

/// Rows scored per call of [`i8_rows_at_least`] (the floor rises between calls).
const SCAN_CHUNK: usize = 512;
/// Rows kept by the approximate (int8) score beyond the `k` asked for, to be re-ranked on
/// the f32 rows: at least this many, and at least `k` more.
const RESCORE_EXTRA: usize = 64;
/// A block is first fitted when it holds this many rows.
const MIN_FIT_ROWS: usize = 64;
/// Coordinates kept per row by a block whose offsets are projected...
const PROJECTED_DIM: usize = 32;
/// ...when that many principal directions hold at least this fraction of their variance.
const PROJECTED_VARIANCE: f64 = 0.99;
/// A block's centre and covariance are estimated on at most this many rows, evenly spaced.
const COVARIANCE_SAMPLE: usize = 8_192;

/// Appends the int8 codes of `v - mean` (of `v` when `mean` is empty), or of its
/// coordinates on the rows of `basis` when there is one, and returns their scale.
fn encode(mean: &[f32], basis: &[f32], v: &Vector, codes: &mut Vec<i8>) -> f32 {
    let offset: Vec<f32> = if mean.is_empty() {
        v.to_vec()
    } else {
        v.iter().zip(mean).map(|(x, m)| x - m).collect()
    };
    quantize_i8(&project(basis, &offset), codes)
}

/// The coordinates of `v` on the rows of `basis` (`v` itself when there is no basis).
fn project(basis: &[f32], v: &[f32]) -> Vec<f32> {
    if basis.is_empty() {
        return v.to_vec();
    }
    let mut out = Vec::with_capacity(basis.len() / v.len());
    dot_rows(v, basis, &mut out);
    out
}

/// A block's centre and, when its offsets vary in few directions, those directions.
#[derive(Debug, Clone)]
pub struct Fit {
    mean: Vec<f32>,
    basis: Vec<f32>,
}

impl Fit {
    /// Fits on sampled rows (`dim` values each). The expensive part of a re-fit (a 64 × 64
    /// covariance and its eigenvectors: about 10 ms), so callers run it holding no lock.
    pub fn of_sample(dim: usize, sample: &[f32]) -> Fit {
        let n = sample.len() / dim;
        let mut mean = vec![0f32; dim];
        for v in sample.chunks_exact(dim) {
            for (m, x) in mean.iter_mut().zip(v) {
                *m += x;
            }
        }
        mean.iter_mut().for_each(|m| *m /= n.max(1) as f32);
        let basis = principal_basis(dim, sample, &mean);
        Fit { mean, basis }
    }
}

/// The [`PROJECTED_DIM`] principal directions of the rows' offsets from `mean`, as rows of
/// one matrix, when they hold at least [`PROJECTED_VARIANCE`] of the variance; otherwise
/// empty (no projection).
fn principal_basis(dim: usize, vectors: &[f32], mean: &[f32]) -> Vec<f32> {
    if dim <= PROJECTED_DIM || vectors.is_empty() {
        return Vec::new();
    }
    let mut cov = vec![0f64; dim * dim];
    let mut offset = vec![0f64; dim];
    for v in vectors.chunks_exact(dim) {
        for ((o, x), m) in offset.iter_mut().zip(v).zip(mean) {
            *o = (x - m) as f64;
        }
        for i in 0..dim {
            let oi = offset[i];
            for (c, oj) in cov[i * dim..(i + 1) * dim].iter_mut().zip(&offset) {
                *c += oi * oj;
            }
        }
    }
    let (values, axes) = symmetric_eigen(&cov, dim);
    let total: f64 = values.iter().map(|v| v.max(0.0)).sum();
    let kept: f64 = values[..PROJECTED_DIM].iter().map(|v| v.max(0.0)).sum();
    if total <= 0.0 || kept < PROJECTED_VARIANCE * total {
        return Vec::new();
    }
    axes[..PROJECTED_DIM * dim]
        .iter()
        .map(|&x| x as f32)
        .collect()
}

/// The blocks holding one point (numbers into a list of category names) and its creation
/// time (`i64::MIN`: none); see [`CategoryBlocks::memberships`].
pub type Membership = (Vec<u32>, i64);

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

/// Int8 codes of rows' offsets from `mean` (of the rows themselves while `mean` is empty),
/// projected on `basis` when there is one: row `i`'s codes are `codes[i * w..(i + 1) * w]`
/// for `w` = [`Codes::width`], with scale `scales[i]`.
#[derive(Debug, Default)]
struct Codes {
    mean: Vec<f32>,
    /// [`PROJECTED_DIM`] rows of `dim` (principal directions of the offsets), or empty.
    basis: Vec<f32>,
    codes: Vec<i8>,
    scales: Vec<f32>,
}

impl Codes {
    fn of_fit(fit: Fit) -> Codes {
        Codes {
            mean: fit.mean,
            basis: fit.basis,
            ..Codes::default()
        }
    }

    /// Codes per row.
    fn width(&self, dim: usize) -> usize {
        if self.basis.is_empty() {
            dim
        } else {
            PROJECTED_DIM
        }
    }

    /// Rows encoded.
    fn len(&self) -> usize {
        self.scales.len()
    }

    fn push(&mut self, v: &Vector) {
        self.scales
            .push(encode(&self.mean, &self.basis, v, &mut self.codes));
    }

    fn set(&mut self, i: usize, v: &Vector) {
        let w = self.width(v.len());
        let mut code = Vec::with_capacity(w);
        self.scales[i] = encode(&self.mean, &self.basis, v, &mut code);
        self.codes[i * w..(i + 1) * w].copy_from_slice(&code);
    }

    /// Moves the last row's codes into row `i` and drops the last row.
    fn swap_remove(&mut self, dim: usize, i: usize) {
        let w = self.width(dim);
        let last = self.len() - 1;
        if i != last {
            let (head, tail) = self.codes.split_at_mut(last * w);
            head[i * w..(i + 1) * w].copy_from_slice(&tail[..w]);
        }
        self.scales.swap_remove(i);
        self.codes.truncate(last * w);
    }
}

/// One category's rows: row `i` of `rows` has the unit vector `vectors[i]`, and `codes` holds
/// its int8 codes for the scan. The vectors are not copied: they are the collection's RAM
/// copy, which the catalog shares too (only the few rows of a shortlist are read here).
#[derive(Debug, Default)]
struct Block {
    vectors: Vec<Vector>,
    codes: Codes,
    /// The codes of a new fit, filled a chunk of rows at a time (rows `0..next.len()` so far)
    /// and swapped in for `codes` when every row has them.
    next: Option<Codes>,
    /// Rows at the last fit; the block is fitted again each time it doubles.
    centred_at: usize,
    /// A fit of this block is under way (see [`CategoryBlocks::start_fits`]).
    fitting: bool,
    rows: Vec<Row>,
    at: RowIds,
}

/// A block's row numbers by point id: a table of `u32` row numbers, hashed by their rows'
/// ids. A map from id to row number took 24 bytes a slot, about 38 a row at its load, in
/// every block a point is in: about 40 MB at 1M items (issue 37).
#[derive(Debug, Default)]
struct RowIds {
    table: HashTable<u32>,
    hasher: foldhash::fast::RandomState,
}

impl RowIds {
    /// The number of the row of `rows` with `id`.
    fn get(&self, rows: &[Row], id: &Uuid) -> Option<usize> {
        self.table
            .find(self.hasher.hash_one(id), |&i| rows[i as usize].id == *id)
            .map(|&i| i as usize)
    }

    /// Adds row `i` of `rows`, whose id the table does not have.
    fn insert(&mut self, rows: &[Row], i: usize) {
        let hasher = &self.hasher;
        self.table
            .insert_unique(hasher.hash_one(rows[i].id), i as u32, |&j| {
                hasher.hash_one(rows[j as usize].id)
            });
    }

    /// Forgets the row of `rows` with `id`, and returns its number.
    fn remove(&mut self, rows: &[Row], id: &Uuid) -> Option<usize> {
        let found = self
            .table
            .find_entry(self.hasher.hash_one(id), |&i| rows[i as usize].id == *id);
        found.ok().map(|e| e.remove().0 as usize)
    }

    /// Row `from` has moved to `to` (`rows[to]` is the row that was at `from`).
    fn moved(&mut self, rows: &[Row], from: usize, to: usize) {
        let hash = self.hasher.hash_one(rows[to].id);
        if let Some(i) = self.table.find_mut(hash, |&i| i as usize == from) {
            *i = to as u32;
        }
    }
}

impl Block {
    fn put(&mut self, row: Row, v: &Vector) {
        match self.at.get(&self.rows, &row.id) {
            Some(i) => {
                self.vectors[i] = v.clone();
                self.codes.set(i, v);
                if let Some(next) = self.next.as_mut().filter(|n| i < n.len()) {
                    next.set(i, v);
                }
                self.rows[i] = row;
            }
            None => {
                self.rows.push(row);
                self.at.insert(&self.rows, self.rows.len() - 1);
                self.vectors.push(v.clone());
                self.codes.push(v);
            }
        }
    }

    /// Whether the block has doubled since it was last fitted (so that re-fits are amortized
    /// over the writes) and no fit of it is under way.
    fn due(&self) -> bool {
        !self.fitting && self.rows.len() >= (2 * self.centred_at).max(MIN_FIT_ROWS)
    }

    /// Up to [`COVARIANCE_SAMPLE`] rows, evenly spaced, to fit on.
    fn sample(&self, dim: usize) -> Vec<f32> {
        let step = self.rows.len().div_ceil(COVARIANCE_SAMPLE).max(1);
        let mut sample = Vec::with_capacity(self.rows.len().div_ceil(step) * dim);
        for v in self.vectors.iter().step_by(step) {
            v.extend_to(&mut sample);
        }
        sample
    }

    /// Encodes up to `max_rows` more rows with the new fit; once every row has them, scans
    /// switch to them. Returns whether the fit is done.
    fn continue_fit(&mut self, max_rows: usize) -> bool {
        let Some(next) = self.next.as_mut() else {
            return true;
        };
        let from = next.len();
        let to = self.rows.len().min(from.saturating_add(max_rows));
        for v in &self.vectors[from..to] {
            next.push(v);
        }
        if to < self.rows.len() {
            return false;
        }
        self.codes = self.next.take().expect("checked above");
        self.centred_at = self.rows.len();
        self.fitting = false;
        true
    }

    /// Fits a block filled without codes (at [`MIN_FIT_ROWS`] rows or more, as
    /// [`CategoryBlocks::fit_due`] would) and encodes every row.
    fn encode_all(&mut self, dim: usize) {
        let mut codes = Codes::default();
        if self.rows.len() >= MIN_FIT_ROWS {
            codes = Codes::of_fit(Fit::of_sample(dim, &self.sample(dim)));
            self.centred_at = self.rows.len();
        }
        codes.codes.reserve(self.rows.len() * codes.width(dim));
        codes.scales.reserve(self.rows.len());
        for v in &self.vectors {
            codes.push(v);
        }
        self.codes = codes;
    }

    /// Moves the last row into the hole, so the block stays contiguous.
    fn remove(&mut self, dim: usize, id: &Uuid) {
        let Some(i) = self.at.remove(&self.rows, id) else {
            return;
        };
        let rows_before = self.rows.len();
        self.rows.swap_remove(i);
        self.vectors.swap_remove(i);
        if i < self.rows.len() {
            self.at.moved(&self.rows, rows_before - 1, i);
        }
        self.codes.swap_remove(dim, i);
        if let Some(next) = self.next.as_mut().filter(|n| i < n.len()) {
            if next.len() == rows_before {
                // The moved row was encoded with the new fit too.
                next.swap_remove(dim, i);
            } else {
                // It was not yet: encode its new place.
                next.set(i, &self.vectors[i]);
            }
        }
    }
}

/// The best `m` rows by approximate score, kept loosely: rows at or above `floor` collect in
/// a buffer, which is cut back to its best `m` whenever it holds `2m`, raising the floor to
/// the `m`-th score. A row costs one compare and, rarely, a push; a heap would cost a sift
/// per row that enters.
struct Shortlist {
    m: usize,
    /// The score a row needs to enter; most rows fail this one compare.
    floor: f32,
    rows: Vec<(f32, usize)>,
}

impl Shortlist {
    fn new(m: usize) -> Shortlist {
        let m = m.max(1);
        Shortlist {
            m,
            floor: f32::NEG_INFINITY,
            rows: Vec::with_capacity(2 * m),
        }
    }

    #[inline]
    fn push(&mut self, score: f32, row: usize) {
        self.rows.push((score, row));
        if self.rows.len() == 2 * self.m {
            self.cut();
        }
    }

    fn cut(&mut self) {
        let m = self.m;
        self.rows
            .select_nth_unstable_by(m - 1, |a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        self.rows.truncate(m);
        self.floor = self.rows[m - 1].0;
    }

    /// The kept rows, in no particular order.
    fn into_rows(mut self) -> impl Iterator<Item = usize> {
        if self.rows.len() > self.m {
            self.cut();
        }
        self.rows.into_iter().map(|(_, row)| row)
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
                .any(|b| b.at.get(&b.rows, &r.id).is_some())
    }
}

/// A point as [`CategoryBlocks::from_loaded`] takes it.
pub struct LoadedRow<'a> {
    pub id: Uuid,
    pub categories: &'a [u32],
    pub available: bool,
    pub price: Option<f32>,
    pub created_at: Option<i64>,
    pub vector: &'a Vector,
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
            let v = super::validate::unit(&p.vector);
            for c in &p.payload.categories {
                self.blocks.entry(c.to_string()).or_default().put(row, &v);
            }
        }
    }

    /// The blocks of points read back from a snapshot of the collection
    /// (`super::snapshot`), as [`Self::upsert`] and [`Self::fit_due`] would leave them: a
    /// point's `categories` are numbers into `names`. Each row is encoded once, with its
    /// block's fit, and the blocks are fitted and encoded on every core.
    pub fn from_loaded<'a>(
        dim: usize,
        names: &[String],
        points: impl Iterator<Item = LoadedRow<'a>>,
    ) -> Self {
        let mut blocks: Vec<Block> = names.iter().map(|_| Block::default()).collect();
        for p in points {
            let row = Row {
                id: p.id,
                available: p.available,
                price: p.price.unwrap_or(f32::NAN),
                created_at: p.created_at.unwrap_or(i64::MIN),
            };
            for &c in p.categories {
                let b = &mut blocks[c as usize];
                b.rows.push(row);
                b.at.insert(&b.rows, b.rows.len() - 1);
                b.vectors.push(p.vector.clone());
            }
        }
        blocks.par_iter_mut().for_each(|b| {
            // Without the spare room of growth by doubling: a quarter of these lists on
            // average, about 15 MB at 1M items.
            b.rows.shrink_to_fit();
            b.vectors.shrink_to_fit();
            b.encode_all(dim)
        });
        CategoryBlocks {
            dim,
            blocks: names
                .iter()
                .cloned()
                .zip(blocks)
                .filter(|(_, b)| !b.rows.is_empty())
                .collect(),
        }
    }

    /// What a snapshot of the collection keeps of the blocks: the category names, and per
    /// point the numbers (into those names) of the blocks holding it and its creation time
    /// (`i64::MIN`: none).
    pub fn memberships(&self) -> (Vec<String>, HashMap<Uuid, Membership>) {
        let mut names: Vec<String> = self.blocks.keys().cloned().collect();
        names.sort();
        let mut by_id: HashMap<Uuid, Membership> = HashMap::new();
        for (n, name) in names.iter().enumerate() {
            for row in &self.blocks[name].rows {
                let e = by_id
                    .entry(row.id)
                    .or_insert_with(|| (Vec::new(), row.created_at));
                e.0.push(n as u32);
            }
        }
        (names, by_id)
    }

    /// The blocks that have doubled since they were last fitted, each with a sample of its
    /// rows to fit on ([`Fit::of_sample`]); they are not offered again until the fit is done
    /// ([`Self::begin_fit`], [`Self::continue_fit`]). Until then they keep scanning with
    /// their old codes, which new rows are encoded with too. Cheap: copies at most
    /// [`COVARIANCE_SAMPLE`] rows per block.
    pub fn start_fits(&mut self) -> Vec<(String, Vec<f32>)> {
        let dim = self.dim;
        self.blocks
            .iter_mut()
            .filter(|(_, b)| b.due())
            .map(|(c, b)| {
                b.fitting = true;
                (c.clone(), b.sample(dim))
            })
            .collect()
    }

    /// Hands a block its new fit, computed from the sample [`Self::start_fits`] gave.
    pub fn begin_fit(&mut self, category: &str, fit: Fit) {
        if let Some(b) = self.blocks.get_mut(category) {
            b.next = Some(Codes::of_fit(fit));
        }
    }

    /// Encodes up to `max_rows` more of the block's rows with its new fit (about 0.2 ms per
    /// 1,000 rows), so that a caller sharing the blocks with searches can release its lock
    /// between chunks; returns whether the fit is done (scans then use the new codes).
    pub fn continue_fit(&mut self, category: &str, max_rows: usize) -> bool {
        self.blocks
            .get_mut(category)
            .is_none_or(|b| b.continue_fit(max_rows))
    }

    /// Fits every block that is due, in place: for callers that hold the blocks alone.
    pub fn fit_due(&mut self) {
        for (c, sample) in self.start_fits() {
            self.begin_fit(&c, Fit::of_sample(self.dim, &sample));
            self.continue_fit(&c, usize::MAX);
        }
    }

    /// Removes the point from every block except those in `keep`.
    fn remove_id(&mut self, id: &Uuid, keep: &[Name]) {
        let dim = self.dim;
        for (c, b) in self.blocks.iter_mut() {
            if !keep.iter().any(|k| k == c) {
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
            if let Some(i) = b.at.get(&b.rows, id) {
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
    pub fn vector(&self, id: &Uuid) -> Option<&Vector> {
        self.blocks
            .values()
            .find_map(|b| b.at.get(&b.rows, id).map(|i| &b.vectors[i]))
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
    /// as (point id, cosine score), best first. `q` is normalised by the caller. Rows carry
    /// no attributes: `attributes_pass` answers the filter's attribute conditions (the
    /// caller looks the payload up), for the rows good enough to keep only.
    pub fn search(
        &self,
        q: &[f32],
        filter: &Filter,
        k: usize,
        attributes_pass: Option<&(dyn Fn(&Uuid) -> bool + Sync)>,
    ) -> Vec<(Uuid, f32)> {
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
            let codes = &b.codes;
            let width = codes.width(dim);
            let mut q_code = Vec::with_capacity(width);
            let q_scale = quantize_i8(&project(&codes.basis, q), &mut q_code);
            // Projected codes drop a little of every score, so more rows are re-ranked.
            let extra = k.max(RESCORE_EXTRA) * if codes.basis.is_empty() { 1 } else { 2 };
            let mut approx = Shortlist::new(k + extra);
            let mut passed = Vec::with_capacity(SCAN_CHUNK);
            for (c, rows) in b.rows.chunks(SCAN_CHUNK).enumerate() {
                let first = c * SCAN_CHUNK;
                passed.clear();
                i8_rows_at_least(
                    &q_code,
                    q_scale,
                    &codes.codes[first * width..(first + rows.len()) * width],
                    &codes.scales[first..first + rows.len()],
                    approx.floor,
                    &mut passed,
                );
                // The row's fields are read only for a score good enough to keep.
                for &(j, s) in &passed {
                    if s >= approx.floor
                        && rf.fields_pass(&rows[j])
                        && rf.lookups_pass(&rows[j])
                        && attributes_pass.is_none_or(|pass| pass(&rows[j].id))
                    {
                        approx.push(s, first + j);
                    }
                }
            }
            let mut top = TopK::new(k);
            for i in approx.into_rows() {
                top.push(b.vectors[i].cosine(q), i);
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
    use rand::{Rng, SeedableRng};

    fn point(id: &str, cats: &[&str], v: [f32; 2], price: Option<f32>) -> IndexPoint {
        let mut p = IndexPoint::for_test(id, cats, &v);
        p.payload.price = price;
        p
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
        let hits = b.search(&[1.0, 0.0], &cats(&["x", "y"]), 10, None);
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
            ids(&b.search(&[1.0, 0.0], &cats(&["x"]), 10, None)),
            vec![pid("b")]
        );
        let cheap = Filter {
            price_max: Some(15.0),
            ..cats(&["x", "y"])
        };
        assert_eq!(
            ids(&b.search(&[1.0, 0.0], &cheap, 10, None)),
            vec![pid("a")]
        );
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
        assert_eq!(ids(&b.search(&[1.0, 0.0], &live, 10, None)), vec![pid("b")]);
        b.delete([pid("b")]);
        assert!(b.search(&[1.0, 0.0], &live, 10, None).is_empty());
        assert!(b.vector(&pid("a")).is_some());
        assert!(b.vector(&pid("b")).is_none());
    }

    /// Deletes move a block's last row into the hole; every row stays findable by its id
    /// through many of them, and patches and exclusions reach the rows that moved.
    #[test]
    fn rows_stay_findable_by_id_through_many_deletes() {
        let n = 1_000;
        let name = |i: usize| format!("p{i}");
        let mut b = CategoryBlocks::new(2);
        let points: Vec<IndexPoint> = (0..n)
            .map(|i| point(&name(i), &["x", "y"], [1.0, i as f32 / n as f32], None))
            .collect();
        b.upsert(&points);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut gone = HashSet::new();
        while gone.len() < n / 2 {
            let i = rng.gen_range(0..n);
            if gone.insert(i) {
                b.delete([pid(&name(i))]);
            }
        }
        for i in 0..n {
            assert_eq!(
                b.vector(&pid(&name(i))).is_some(),
                !gone.contains(&i),
                "{}",
                name(i)
            );
        }
        let kept: Vec<usize> = (0..n).filter(|i| !gone.contains(i)).collect();
        for &i in kept.iter().step_by(2) {
            b.patch(
                &pid(&name(i)),
                &PayloadPatch {
                    available: Some(false),
                    ..Default::default()
                },
            );
        }
        let live = Filter {
            available_only: true,
            ..cats(&["x"])
        };
        let mut found = ids(&b.search(&[1.0, 0.0], &live, n, None));
        let mut expected: Vec<Uuid> = kept
            .iter()
            .skip(1)
            .step_by(2)
            .map(|&i| pid(&name(i)))
            .collect();
        found.sort();
        expected.sort();
        assert_eq!(found, expected);
        // Excluding block y (every row is in both) leaves nothing of block x.
        let not_y = Filter {
            exclude_categories: vec!["y".into()],
            ..cats(&["x"])
        };
        assert!(b.search(&[1.0, 0.0], &not_y, n, None).is_empty());
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
        assert_eq!(ids(&b.search(&[1.0, 0.0], &f, 10, None)), vec![pid("c")]);
    }

    #[test]
    fn the_shortlist_keeps_the_best_m_of_any_order() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for m in [1, 3, 64] {
            // Ties included: scores from a small set.
            let scores: Vec<f32> = (0..5000).map(|_| rng.gen_range(0..400) as f32).collect();
            let mut list = Shortlist::new(m);
            for (i, &s) in scores.iter().enumerate() {
                if s >= list.floor {
                    list.push(s, i);
                }
            }
            let mut kept: Vec<f32> = list.into_rows().map(|i| scores[i]).collect();
            kept.sort_by(|a, b| b.total_cmp(a));
            let mut all = scores.clone();
            all.sort_by(|a, b| b.total_cmp(a));
            assert_eq!(kept, all[..m], "m = {m}");
        }
    }

    /// The exact top `k` of `points` for `q` (normalised), by brute force over every vector
    /// as the blocks hold it (half precision), scored as they score it: what the int8
    /// shortlist must not lose. (How close half precision comes to f32 is the index contract
    /// tests' and `tandem bench ann`'s to say.)
    fn brute_force(points: &[IndexPoint], q: &[f32], k: usize) -> Vec<(Uuid, f32)> {
        let mut all: Vec<(Uuid, f32)> = points
            .iter()
            .map(|p| {
                let v = crate::index::validate::unit(&p.vector);
                (point_id(&p.payload.item_id), v.cosine(q))
            })
            .collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1));
        all.truncate(k);
        all
    }

    fn assert_exact(b: &CategoryBlocks, points: &[IndexPoint], q: &[f32], k: usize) {
        let want = brute_force(points, q, k);
        let hits = b.search(q, &cats(&["x"]), k, None);
        assert_eq!(ids(&hits), ids(&want));
        for ((_, got), (_, want)) in hits.iter().zip(&want) {
            assert!(
                (got - want).abs() < 1e-5,
                "scores are the full vectors' ones"
            );
        }
    }

    fn in_x(n: usize, vector: Vec<f32>) -> IndexPoint {
        IndexPoint {
            vector: vector.into(),
            payload: point(&format!("i{n}"), &["x"], [0.0, 0.0], None).payload,
        }
    }

    #[test]
    fn the_int8_scan_returns_the_exact_top_k_of_a_crowded_block() {
        // 20,000 rows close together (one cluster, as trained embeddings of a category are),
        // where approximate scores alone would misorder neighbours; the shortlist re-ranked
        // on f32 is 114 of them. The spread is the same in every direction, so the codes
        // are not projected.
        let dim = 64;
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let centre: Vec<f32> = (0..dim).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let points: Vec<IndexPoint> = (0..20_000)
            .map(|n| {
                in_x(
                    n,
                    centre
                        .iter()
                        .map(|c| c + rng.gen_range(-0.1..0.1))
                        .collect(),
                )
            })
            .collect();
        let mut b = CategoryBlocks::new(dim);
        b.upsert(&points);
        b.fit_due();
        assert!(b.blocks["x"].codes.basis.is_empty());
        for _ in 0..20 {
            let q: Vec<f32> = centre
                .iter()
                .map(|c| c + rng.gen_range(-0.3..0.3))
                .collect();
            assert_exact(&b, &points, &crate::index::validate::normalized(&q), 50);
        }
    }

    /// Rows that vary along 12 directions around a centre, with a little noise in all 64
    /// dimensions, as trained item vectors of one category do.
    struct LowRank {
        centre: Vec<f32>,
        directions: Vec<Vec<f32>>,
    }

    impl LowRank {
        const DIM: usize = 64;

        fn new(seed: u64) -> LowRank {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut random = |scale: f32| -> Vec<f32> {
                (0..Self::DIM)
                    .map(|_| rng.gen_range(-scale..scale))
                    .collect()
            };
            LowRank {
                centre: random(1.0),
                directions: (0..12).map(|_| random(0.1)).collect(),
            }
        }

        fn row(&self, n: usize, rng: &mut rand::rngs::StdRng) -> IndexPoint {
            let mut v = self.centre.clone();
            for d in &self.directions {
                let a: f32 = rng.gen_range(-1.0..1.0);
                v.iter_mut().zip(d).for_each(|(x, y)| *x += a * y);
            }
            v.iter_mut()
                .for_each(|x| *x += rng.gen_range(-0.002..0.002));
            in_x(n, v)
        }

        /// `n` rows, and a fitted block of them (category "x").
        fn fitted_block(
            &self,
            n: usize,
            rng: &mut rand::rngs::StdRng,
        ) -> (Vec<IndexPoint>, CategoryBlocks) {
            let points: Vec<IndexPoint> = (0..n).map(|i| self.row(i, rng)).collect();
            let mut b = CategoryBlocks::new(Self::DIM);
            b.upsert(&points);
            b.fit_due();
            (points, b)
        }

        /// Queries near the block, and from elsewhere (a user whose taste is another
        /// category).
        fn queries(&self, n: usize, rng: &mut rand::rngs::StdRng) -> Vec<Vec<f32>> {
            (0..n)
                .map(|i| {
                    let q: Vec<f32> = if i % 2 == 0 {
                        self.centre
                            .iter()
                            .map(|c| c + rng.gen_range(-0.3..0.3))
                            .collect()
                    } else {
                        (0..Self::DIM).map(|_| rng.gen_range(-1.0..1.0)).collect()
                    };
                    crate::index::validate::normalized(&q)
                })
                .collect()
        }
    }

    /// A restart's blocks (issue 37): built from what a snapshot keeps (memberships, the
    /// rows' fields and vectors) with one encoding per row, they hold the same codes as the
    /// blocks the snapshot was taken of, fitted or not, and answer the same.
    #[test]
    fn blocks_rebuilt_from_a_snapshot_scan_as_the_blocks_it_was_taken_of() {
        let shape = LowRank::new(12);
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let mut points: Vec<IndexPoint> = (0..2_000).map(|n| shape.row(n, &mut rng)).collect();
        // A small block ("y", not fitted) whose rows are in "x" too, some with prices.
        for (i, p) in points.iter_mut().enumerate().take(40) {
            p.payload.categories.push("y".into());
            p.payload.price = (i % 2 == 0).then_some(i as f32);
        }
        let mut saved = CategoryBlocks::new(LowRank::DIM);
        saved.upsert(&points);
        saved.fit_due();
        let (names, members) = saved.memberships();
        // Every point is in "x": its rows, in their order (so that the fits sum the same rows
        // in the same order), and the unit vectors the RAM copy would hold.
        let x = &saved.blocks["x"];
        let rows = x.rows.iter().zip(&x.vectors).map(|(r, vector)| {
            let (categories, created_at) = &members[&r.id];
            LoadedRow {
                id: r.id,
                categories,
                available: r.available,
                price: (!r.price.is_nan()).then_some(r.price),
                created_at: (*created_at != i64::MIN).then_some(*created_at),
                vector,
            }
        });
        let rebuilt = CategoryBlocks::from_loaded(LowRank::DIM, &names, rows);
        for name in ["x", "y"] {
            let (a, b) = (&saved.blocks[name], &rebuilt.blocks[name]);
            assert_eq!(a.rows.len(), b.rows.len(), "{name}");
            assert_eq!(a.centred_at, b.centred_at, "{name}");
            let ids = |blk: &Block| blk.rows.iter().map(|r| r.id).collect::<Vec<_>>();
            assert_eq!(ids(a), ids(b), "{name}");
            for (i, r) in b.rows.iter().enumerate() {
                assert_eq!(b.at.get(&b.rows, &r.id), Some(i), "{name}");
            }
            assert_eq!(a.codes.mean, b.codes.mean, "{name}");
            assert_eq!(a.codes.basis, b.codes.basis, "{name}");
            assert_eq!(a.codes.codes, b.codes.codes, "{name}");
            assert_eq!(a.codes.scales, b.codes.scales, "{name}");
        }
        assert!(!rebuilt.blocks["x"].codes.basis.is_empty(), "x is fitted");
        let cheap_y = Filter {
            price_max: Some(20.0),
            ..cats(&["y"])
        };
        for q in shape.queries(6, &mut rng) {
            for f in [
                cats(&["x"]),
                cats(&["y"]),
                cats(&["x", "y"]),
                cheap_y.clone(),
            ] {
                assert_eq!(
                    saved.search(&q, &f, 50, None),
                    rebuilt.search(&q, &f, 50, None)
                );
            }
        }
    }

    #[test]
    fn a_block_varying_in_few_directions_scans_projected_codes_and_stays_exact() {
        // The block keeps 32 coordinates per row.
        let dim = LowRank::DIM;
        let shape = LowRank::new(8);
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let (mut points, mut b) = shape.fitted_block(20_000, &mut rng);
        assert_eq!(b.blocks["x"].codes.basis.len(), PROJECTED_DIM * dim);
        assert_eq!(b.blocks["x"].codes.codes.len(), 20_000 * PROJECTED_DIM);
        let queries = shape.queries(20, &mut rng);
        for q in &queries {
            assert_exact(&b, &points, q, 100);
        }
        // Writes after the projection was fitted: the best rows of the first query move
        // elsewhere in the block, and new rows arrive.
        let best = ids(&brute_force(&points, &queries[0], 10));
        for p in points.iter_mut() {
            if best.contains(&point_id(&p.payload.item_id)) {
                *p = IndexPoint {
                    payload: p.payload.clone(),
                    ..shape.row(0, &mut rng)
                };
            }
        }
        let fresh: Vec<IndexPoint> = (20_000..20_500).map(|n| shape.row(n, &mut rng)).collect();
        b.upsert(
            &points
                .iter()
                .filter(|p| best.contains(&point_id(&p.payload.item_id)))
                .cloned()
                .collect::<Vec<_>>(),
        );
        b.upsert(&fresh);
        points.extend(fresh);
        for q in &queries {
            assert_exact(&b, &points, q, 100);
        }
    }

    #[test]
    fn a_block_that_doubled_is_fitted_again_a_chunk_at_a_time_and_stays_exact() {
        let dim = LowRank::DIM;
        let shape = LowRank::new(10);
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let (mut points, mut b) = shape.fitted_block(10_000, &mut rng);
        let first_mean = b.blocks["x"].codes.mean.clone();
        assert!(b.start_fits().is_empty(), "a fitted block is not due");
        let more: Vec<IndexPoint> = (10_000..20_000).map(|n| shape.row(n, &mut rng)).collect();
        b.upsert(&more);
        points.extend(more);
        let due = b.start_fits();
        assert_eq!(due.len(), 1);
        // Every third row of the 20,000 (at most COVARIANCE_SAMPLE).
        assert_eq!(due[0].1.len(), 6_667 * dim);
        assert!(
            b.start_fits().is_empty(),
            "a fit under way is not offered twice"
        );
        let (category, sample) = due.into_iter().next().unwrap();
        let fit = Fit::of_sample(dim, &sample);
        b.begin_fit(&category, fit.clone());
        // Between chunks (when the service releases the lock), rows move, leave and arrive,
        // on both sides of the rows encoded so far; searches stay exact throughout.
        let queries = shape.queries(6, &mut rng);
        let mut chunks = 0;
        while !b.continue_fit(&category, 3_000) {
            chunks += 1;
            let k = rng.gen_range(0..points.len());
            points[k] = IndexPoint {
                payload: points[k].payload.clone(),
                ..shape.row(0, &mut rng)
            };
            b.upsert(&[points[k].clone()]);
            let gone = points.swap_remove(rng.gen_range(0..points.len()));
            b.delete([point_id(&gone.payload.item_id)]);
            let fresh = shape.row(20_000 + chunks, &mut rng);
            b.upsert(std::slice::from_ref(&fresh));
            points.push(fresh);
            for q in &queries {
                assert_exact(&b, &points, q, 100);
            }
        }
        assert!(chunks >= 6, "{chunks} chunks");
        let block = &b.blocks["x"];
        assert_eq!(block.centred_at, 20_000);
        assert_ne!(block.codes.mean, first_mean);
        assert!(block.next.is_none() && !block.fitting);
        // The same codes as a fresh encoding of the final rows with the new fit.
        let mut expected = Codes::of_fit(fit);
        for v in &block.vectors {
            expected.push(v);
        }
        assert_eq!(block.codes.codes, expected.codes);
        assert_eq!(block.codes.scales, expected.scales);
        for q in &queries {
            assert_exact(&b, &points, q, 100);
        }
    }
}
