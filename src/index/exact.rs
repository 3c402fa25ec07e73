//! `exact`: brute-force search over a contiguous in-memory matrix of unit vectors. It is the
//! recall oracle for the ANN backends and a fine backend for catalogs under ~50k items.
//!
//! Vectors are normalized on insert, so cosine similarity is a plain dot product; the dot
//! product uses eight independent accumulators so that the compiler vectorizes it. Scans over
//! more than [`PAR_MIN_ROWS`] rows are split across the rayon pool. Everything lives in
//! memory: a process restart starts empty (use `edge` for a persisted index).

use super::filter::CompiledFilter;
use super::validate::{check_dim, check_points, check_query, check_version_name, normalized};
use super::{Hit, IndexError, IndexPoint, Payload, PayloadPatch, ScrollPage, Vector, VectorIndex};
use crate::domain::{Filter, ItemId};
use crate::vector::dot;
use async_trait::async_trait;
use parking_lot::RwLock;
use rayon::prelude::*;
use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::ops::Bound;
use std::sync::Arc;

/// Below this many rows one thread scans; above, rayon splits the scan in chunks of this size.
pub const PAR_MIN_ROWS: usize = 16_384;

/// A score that orders totally (scores are finite: inputs are validated).
#[derive(Clone, Copy, PartialEq)]
struct Score(f32);
impl Eq for Score {}
impl PartialOrd for Score {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Score {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// The best `k` (score, row) pairs seen so far; a min-heap so the worst is evicted first.
/// Ties prefer the lower row, which keeps results deterministic.
pub(super) struct TopK {
    k: usize,
    heap: BinaryHeap<Reverse<(Score, Reverse<usize>)>>,
}

impl TopK {
    pub(super) fn new(k: usize) -> Self {
        TopK {
            k,
            heap: BinaryHeap::with_capacity(k + 1),
        }
    }

    #[inline]
    pub(super) fn push(&mut self, score: f32, row: usize) {
        let entry = Reverse((Score(score), Reverse(row)));
        if self.heap.len() < self.k {
            self.heap.push(entry);
        } else if let Some(worst) = self.heap.peek() {
            if entry < *worst {
                self.heap.pop();
                self.heap.push(entry);
            }
        }
    }

    fn merge(mut self, other: TopK) -> TopK {
        for Reverse((s, Reverse(row))) in other.heap {
            self.push(s.0, row);
        }
        self
    }

    /// Best first.
    pub(super) fn into_sorted(self) -> Vec<(f32, usize)> {
        let mut v: Vec<_> = self
            .heap
            .into_iter()
            .map(|Reverse((s, Reverse(row)))| (s.0, row))
            .collect();
        v.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        v
    }
}

/// One collection version: row `i` of `vectors` belongs to `payloads[i]`.
#[derive(Debug)]
pub struct ExactCollection {
    dim: usize,
    vectors: Vec<f32>,
    payloads: Vec<Payload>,
    /// Ordered by item id, so that [`ExactCollection::scroll`] pages in a stable order.
    rows: BTreeMap<ItemId, usize>,
}

impl ExactCollection {
    pub fn new(dim: usize) -> Self {
        ExactCollection {
            dim,
            vectors: Vec::new(),
            payloads: Vec::new(),
            rows: BTreeMap::new(),
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn len(&self) -> usize {
        self.payloads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.payloads.is_empty()
    }

    pub fn upsert(&mut self, points: Vec<IndexPoint>) -> Result<(), IndexError> {
        check_points(&points, self.dim)?;
        for p in points {
            self.put(p.payload, &p.vector.to_vec());
        }
        Ok(())
    }

    /// Upserts points with full-precision vectors, each `dim` long: `tandem bench ann`'s
    /// oracle, exact on the vectors as generated rather than as the index holds them.
    pub fn upsert_f32(&mut self, points: impl IntoIterator<Item = (Payload, Vec<f32>)>) {
        for (payload, v) in points {
            assert_eq!(v.len(), self.dim, "a vector of another dimension");
            self.put(payload, &v);
        }
    }

    fn put(&mut self, payload: Payload, v: &[f32]) {
        let v = normalized(v);
        match self.rows.get(&payload.item_id) {
            Some(&row) => {
                self.vectors[row * self.dim..(row + 1) * self.dim].copy_from_slice(&v);
                self.payloads[row] = payload;
            }
            None => {
                self.rows
                    .insert(payload.item_id.clone(), self.payloads.len());
                self.vectors.extend_from_slice(&v);
                self.payloads.push(payload);
            }
        }
    }

    /// Removes rows by moving the last row into the hole, so the matrix stays contiguous.
    pub fn delete(&mut self, ids: &[ItemId]) {
        for id in ids {
            let Some(row) = self.rows.remove(id) else {
                continue;
            };
            let last = self.payloads.len() - 1;
            if row != last {
                let (head, tail) = self.vectors.split_at_mut(last * self.dim);
                head[row * self.dim..(row + 1) * self.dim].copy_from_slice(&tail[..self.dim]);
                self.payloads.swap(row, last);
                self.rows.insert(self.payloads[row].item_id.clone(), row);
            }
            self.payloads.pop();
            self.vectors.truncate(last * self.dim);
        }
    }

    /// Applies a patch; returns false if the item is unknown.
    pub fn set_payload(&mut self, id: &ItemId, patch: &PayloadPatch) -> bool {
        let Some(&row) = self.rows.get(id) else {
            return false;
        };
        let p = &mut self.payloads[row];
        patch.apply(&mut p.available, &mut p.price, &mut p.popularity);
        true
    }

    /// The `k` best rows passing `filter`, best first.
    pub fn search(
        &self,
        vector: &[f32],
        filter: &Filter,
        k: usize,
    ) -> Result<Vec<Hit>, IndexError> {
        check_query(vector, self.dim)?;
        if k == 0 {
            return Ok(Vec::new());
        }
        let q = normalized(vector);
        let filter = CompiledFilter::new(filter);
        let dim = self.dim;
        let scan = |start: usize, end: usize| {
            let mut top = TopK::new(k);
            for row in start..end {
                if filter.matches(&self.payloads[row]) {
                    top.push(dot(&q, &self.vectors[row * dim..(row + 1) * dim]), row);
                }
            }
            top
        };
        let n = self.len();
        let top = if n < PAR_MIN_ROWS {
            scan(0, n)
        } else {
            (0..n.div_ceil(PAR_MIN_ROWS))
                .into_par_iter()
                .map(|c| scan(c * PAR_MIN_ROWS, ((c + 1) * PAR_MIN_ROWS).min(n)))
                .reduce(|| TopK::new(k), TopK::merge)
        };
        Ok(top
            .into_sorted()
            .into_iter()
            .map(|(score, row)| Hit {
                score,
                item_id: self.payloads[row].item_id.clone(),
            })
            .collect())
    }

    pub fn fetch(&self, ids: &[ItemId]) -> Vec<(Payload, Vector)> {
        ids.iter()
            .filter_map(|id| self.rows.get(id))
            .map(|&row| {
                (
                    self.payloads[row].clone(),
                    self.vectors[row * self.dim..(row + 1) * self.dim].into(),
                )
            })
            .collect()
    }

    /// Up to `limit` points in item-id order from `from` (inclusive; the start when `None`),
    /// and the item id that starts the next page.
    pub fn scroll(&self, from: Option<&ItemId>, limit: usize) -> ScrollPage {
        let start = match from {
            Some(id) => Bound::Included(id),
            None => Bound::Unbounded,
        };
        let mut page = Vec::with_capacity(limit.min(self.len()));
        let mut rows = self.rows.range::<ItemId, _>((start, Bound::Unbounded));
        for (_, &row) in rows.by_ref().take(limit.max(1)) {
            page.push((
                self.payloads[row].clone(),
                self.vectors[row * self.dim..(row + 1) * self.dim].into(),
            ));
        }
        let next = rows.next().map(|(id, _)| id.to_string());
        (page, next)
    }
}

type Shared = Arc<RwLock<ExactCollection>>;

/// The `exact` backend: named in-memory versions and a live pointer.
#[derive(Default)]
pub struct ExactIndex {
    versions: RwLock<HashMap<String, Shared>>,
    live: RwLock<Option<(String, Shared)>>,
}

impl ExactIndex {
    pub fn new() -> Self {
        Self::default()
    }

    fn live(&self) -> Result<Shared, IndexError> {
        self.live
            .read()
            .as_ref()
            .map(|(_, c)| c.clone())
            .ok_or(IndexError::NoActiveVersion)
    }

    fn version(&self, version: &str) -> Result<Shared, IndexError> {
        self.versions
            .read()
            .get(version)
            .cloned()
            .ok_or_else(|| IndexError::UnknownVersion(version.to_string()))
    }
}

#[async_trait]
impl VectorIndex for ExactIndex {
    async fn upsert(&self, points: Vec<IndexPoint>) -> Result<(), IndexError> {
        self.live()?.write().upsert(points)
    }

    async fn delete(&self, ids: &[ItemId]) -> Result<(), IndexError> {
        self.live()?.write().delete(ids);
        Ok(())
    }

    async fn set_payload(&self, id: &ItemId, patch: &PayloadPatch) -> Result<(), IndexError> {
        // Patching an unknown item is a no-op, as in Qdrant.
        self.live()?.write().set_payload(id, patch);
        Ok(())
    }

    async fn search(
        &self,
        vector: &[f32],
        filter: &Filter,
        k: usize,
    ) -> Result<Vec<Hit>, IndexError> {
        self.live()?.read().search(vector, filter, k)
    }

    async fn fetch(&self, ids: &[ItemId]) -> Result<Vec<(Payload, Vector)>, IndexError> {
        Ok(self.live()?.read().fetch(ids))
    }

    async fn count(&self) -> Result<usize, IndexError> {
        Ok(self.live()?.read().len())
    }

    async fn create_version(&self, version: &str, dim: usize) -> Result<(), IndexError> {
        check_version_name(version)?;
        check_dim(dim)?;
        let mut versions = self.versions.write();
        if versions.contains_key(version) {
            return Err(IndexError::Backend(format!(
                "collection version {version:?} already exists"
            )));
        }
        versions.insert(
            version.to_string(),
            Arc::new(RwLock::new(ExactCollection::new(dim))),
        );
        Ok(())
    }

    async fn upsert_into(&self, version: &str, points: Vec<IndexPoint>) -> Result<(), IndexError> {
        self.version(version)?.write().upsert(points)
    }

    async fn search_in(
        &self,
        version: &str,
        vector: &[f32],
        filter: &Filter,
        k: usize,
    ) -> Result<Vec<Hit>, IndexError> {
        self.version(version)?.read().search(vector, filter, k)
    }

    async fn fetch_from(
        &self,
        version: &str,
        ids: &[ItemId],
    ) -> Result<Vec<(Payload, Vector)>, IndexError> {
        Ok(self.version(version)?.read().fetch(ids))
    }

    async fn delete_from(&self, version: &str, ids: &[ItemId]) -> Result<(), IndexError> {
        self.version(version)?.write().delete(ids);
        Ok(())
    }

    async fn set_payload_in(
        &self,
        version: &str,
        id: &ItemId,
        patch: &PayloadPatch,
    ) -> Result<(), IndexError> {
        self.version(version)?.write().set_payload(id, patch);
        Ok(())
    }

    async fn finalize_version(&self, version: &str) -> Result<(), IndexError> {
        // A brute-force scan has no index to build: searchable as soon as written.
        self.version(version).map(|_| ())
    }

    async fn switch_to(&self, version: &str) -> Result<(), IndexError> {
        let c = self.version(version)?;
        *self.live.write() = Some((version.to_string(), c));
        Ok(())
    }

    async fn drop_version(&self, version: &str) -> Result<(), IndexError> {
        if self
            .live
            .read()
            .as_ref()
            .is_some_and(|(name, _)| name == version)
        {
            return Err(IndexError::Backend(format!(
                "collection version {version:?} is live; switch to another version before dropping it"
            )));
        }
        self.versions
            .write()
            .remove(version)
            .map(|_| ())
            .ok_or_else(|| IndexError::UnknownVersion(version.to_string()))
    }

    async fn versions(&self) -> Result<(Vec<String>, Option<String>), IndexError> {
        let mut names: Vec<String> = self.versions.read().keys().cloned().collect();
        names.sort();
        Ok((names, self.live.read().as_ref().map(|(n, _)| n.clone())))
    }

    async fn scroll(
        &self,
        version: Option<&str>,
        offset: Option<String>,
        limit: usize,
    ) -> Result<ScrollPage, IndexError> {
        let c = match version {
            Some(v) => self.version(v)?,
            None => self.live()?,
        };
        let from = offset
            .map(|o| {
                ItemId::parse(&o)
                    .map_err(|_| IndexError::Backend(format!("invalid scroll cursor {o:?}")))
            })
            .transpose()?;
        let page = c.read().scroll(from.as_ref(), limit);
        Ok(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topk_keeps_best_in_order() {
        let mut t = TopK::new(3);
        for (i, s) in [0.1, 0.9, 0.5, 0.7, 0.2].into_iter().enumerate() {
            t.push(s, i);
        }
        let rows: Vec<usize> = t.into_sorted().into_iter().map(|(_, r)| r).collect();
        assert_eq!(rows, vec![1, 3, 2]);
    }

    #[test]
    fn delete_keeps_rows_consistent() {
        let mut c = ExactCollection::new(2);
        let pt = |id: &str, v: [f32; 2]| IndexPoint::for_test(id, &[], &v);
        c.upsert(vec![
            pt("a", [1.0, 0.0]),
            pt("b", [0.0, 1.0]),
            pt("c", [1.0, 1.0]),
        ])
        .unwrap();
        c.delete(&[ItemId::parse("a").unwrap()]);
        let got = c.fetch(&[ItemId::parse("c").unwrap(), ItemId::parse("a").unwrap()]);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.item_id.as_str(), "c");
        // The fetched vector is in half precision, as every vector handed out is.
        assert!((got[0].1.to_vec()[0] - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-3);
        let hits = c.search(&[1.0, 0.0], &Filter::default(), 5).unwrap();
        let ids: Vec<&str> = hits.iter().map(|h| h.item_id.as_str()).collect();
        assert_eq!(ids, vec!["c", "b"]);
    }
}
