//! The serving process's in-memory catalog: every servable item's metadata and vector, so that
//! re-ranking, explanations, history pooling and the trending fallback never wait on the index.
//!
//! The index stays the source of truth for what search can return; the catalog mirrors it.
//! Every write goes to the index first and to the catalog only when the index accepted it
//! (see the catalog handlers), so the two cannot disagree on an acknowledged write. Entries
//! are immutable `Arc`s replaced on update: a request that resolved an entry keeps a
//! consistent snapshot, and the next lookup sees the change.

use crate::domain::{Filter, Item, ItemId, Name};
use crate::index::{IndexError, LivePoint, Payload, Vector, VectorIndex};
use hashbrown::HashTable;
use parking_lot::{Mutex, RwLock};
use rayon::prelude::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::BuildHasher;
use std::path::PathBuf;
use std::sync::Arc;

/// Distinct filters whose popularity lists are kept; past it the cache starts over.
const POPULAR_CACHE_MAX: usize = 1024;

pub use crate::domain::CatalogEntry;

/// What the catalog adds to its entries (`crate::domain::CatalogEntry`): their index form.
impl CatalogEntry {
    /// The payload the index stores for this entry.
    pub fn payload(&self) -> Payload {
        Payload::of(&self.item, self.popularity)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("reading the catalog from the index: {0}")]
    Index(#[from] IndexError),
    #[error("catalog journal {file}: {reason}")]
    Journal { file: PathBuf, reason: String },
}

/// What a start-up load found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadReport {
    pub loaded: usize,
    /// Items of the catalog file that the index does not hold (not servable until indexed).
    pub missing_from_index: usize,
}

/// A popularity that orders totally, most popular first.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Descending(f32);

impl Eq for Descending {}
impl PartialOrd for Descending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Descending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.0.total_cmp(&self.0)
    }
}

/// An entry's place in the popularity order: by descending popularity, then by id.
type Rank = (Descending, ItemId);

fn rank(e: &CatalogEntry) -> Rank {
    (Descending(e.popularity), e.id().clone())
}

/// One write to the catalog: the entry before it and the entry after it.
type Change = (Option<Arc<CatalogEntry>>, Option<Arc<CatalogEntry>>);

/// The catalog by id: a hash table of the entries themselves, hashed by their ids. A map
/// from id to entry took three times the room: at 1M items it had 2M slots (hash tables
/// grow by doubling and stay at most 7/8 full) of 24 bytes, an id and a pointer (issue 37).
#[derive(Default)]
struct ById {
    table: HashTable<Arc<CatalogEntry>>,
    hasher: foldhash::fast::RandomState,
}

impl ById {
    fn with_capacity(n: usize) -> Self {
        ById {
            table: HashTable::with_capacity(n),
            hasher: Default::default(),
        }
    }

    fn len(&self) -> usize {
        self.table.len()
    }

    fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Ids are hashed as strings, so that a lookup by a borrowed string (a cached candidate
    /// list's bytes) needs no `ItemId` of its own.
    fn hash(&self, id: &str) -> u64 {
        self.hasher.hash_one(id)
    }

    fn get(&self, id: &str) -> Option<&Arc<CatalogEntry>> {
        self.table.find(self.hash(id), |e| e.id().as_str() == id)
    }

    fn get_mut(&mut self, id: &ItemId) -> Option<&mut Arc<CatalogEntry>> {
        let hash = self.hash(id.as_str());
        self.table.find_mut(hash, |e| e.id() == id)
    }

    /// Puts `entry` in place of the entry with its id, if any, and returns that one.
    fn insert(&mut self, entry: Arc<CatalogEntry>) -> Option<Arc<CatalogEntry>> {
        let hasher = &self.hasher;
        let hash = self.hash(entry.id().as_str());
        match self.table.entry(
            hash,
            |e| e.id() == entry.id(),
            |e| hasher.hash_one(e.id().as_str()),
        ) {
            hashbrown::hash_table::Entry::Occupied(mut e) => {
                Some(std::mem::replace(e.get_mut(), entry))
            }
            hashbrown::hash_table::Entry::Vacant(e) => {
                e.insert(entry);
                None
            }
        }
    }

    fn remove(&mut self, id: &ItemId) -> Option<Arc<CatalogEntry>> {
        let hash = self.hash(id.as_str());
        let found = self.table.find_entry(hash, |e| e.id() == id);
        found.ok().map(|e| e.remove().0)
    }

    fn values(&self) -> impl Iterator<Item = &Arc<CatalogEntry>> {
        self.table.iter()
    }
}

#[derive(Default)]
struct Entries {
    by_id: ById,
    /// Every entry's rank, kept in step with `by_id` by each write (a write moves one key,
    /// O(log n)), so that the fallback order never needs a sort of the whole catalog.
    by_popularity: BTreeSet<Rank>,
    /// How many entries each category has, kept in step by each write, so that requests can
    /// check a category name (and `GET /v1/categories` list them) without a catalog pass.
    categories: BTreeMap<Name, usize>,
}

impl Entries {
    /// The other two views of `by_id`, made on every core: a start-up at 1M items waits for
    /// this (issue 37).
    fn from_map(by_id: ById) -> Self {
        let all: Vec<&Arc<CatalogEntry>> = by_id.values().collect();
        let (by_popularity, categories) = rayon::join(
            || {
                let mut ranks: Vec<Rank> = all.par_iter().map(|e| rank(e)).collect();
                ranks.par_sort_unstable();
                // Sorted already: the set is built in one pass.
                BTreeSet::from_iter(ranks)
            },
            || {
                let mut categories = BTreeMap::new();
                for e in &all {
                    count_categories(&mut categories, e, true);
                }
                categories
            },
        );
        drop(all);
        Entries {
            by_id,
            by_popularity,
            categories,
        }
    }

    fn take(&mut self, id: &ItemId) -> Option<Arc<CatalogEntry>> {
        let removed = self.by_id.remove(id)?;
        self.by_popularity.remove(&rank(&removed));
        count_categories(&mut self.categories, &removed, false);
        Some(removed)
    }

    /// Puts `entry` in place of whatever had its id, in both views; returns what it replaced.
    fn put(&mut self, entry: Arc<CatalogEntry>) -> Option<Arc<CatalogEntry>> {
        let new_rank = rank(&entry);
        count_categories(&mut self.categories, &entry, true);
        let old = self.by_id.insert(entry);
        if let Some(old) = &old {
            count_categories(&mut self.categories, old, false);
            let old_rank = rank(old);
            if old_rank == new_rank {
                return Some(old.clone());
            }
            self.by_popularity.remove(&old_rank);
        }
        self.by_popularity.insert(new_rank);
        old
    }
}

#[derive(Default)]
pub struct Catalog {
    entries: RwLock<Entries>,
    /// Answers of [`Catalog::popular`] as ids, keyed by the filter without its exclusion
    /// list: a narrow filter walks thousands of entries of the popularity order to find its
    /// top 100, and storefront traffic repeats the same few filters. Writes drop the lists
    /// they could change (see [`Catalog::forget_popular`]); lock order: `entries`, then this.
    popular_cache: Mutex<HashMap<String, PopularList>>,
}

/// One cached walk of the popularity order.
struct PopularList {
    filter: Filter,
    /// The walk stopped after this many matches...
    asked: usize,
    /// ...and found these, best first (fewer than `asked`: the whole catalog was walked).
    /// Shared, so that a cache hit (most requests with the popularity prior) does not copy
    /// every id.
    ids: Arc<[ItemId]>,
    /// The rank of the last id when the walk stopped early; an entry that matches and ranks
    /// above it belongs in the list.
    last: Option<Rank>,
}

/// Counts `entry` in (`add`) or out of the per-category counts.
fn count_categories(categories: &mut BTreeMap<Name, usize>, entry: &CatalogEntry, add: bool) {
    for g in &entry.item.categories {
        if add {
            *categories.entry(g.clone()).or_insert(0) += 1;
        } else if let Some(n) = categories.get_mut(g) {
            // A category whose last item went stays known (at 0): a page for it answers
            // an empty list, not "unknown category", until the process restarts.
            *n = n.saturating_sub(1);
        }
    }
}

/// A catalog entry of an item from the catalog file and its live fields from the index.
fn live_entry(mut item: Item, live: LivePoint) -> CatalogEntry {
    // The id's allocation is the index's: one per item (issue 37).
    item.item_id = live.item_id;
    item.available = live.available;
    item.price = live.price;
    CatalogEntry {
        item,
        popularity: live.popularity,
        vector: live.vector,
    }
}

/// Items per index lookup of a start-up load.
pub const LOAD_BATCH: usize = 8_192;

/// A start-up load of the catalog, batch by batch as the catalog file is read (see
/// `items::load`): content (title, categories, tags, year) from the file, and the live fields
/// (vector, availability, price, popularity) from the index, which API writes have updated.
/// At 1M items each batch is paired while the rest of the file is still being read, rather
/// than after it (issue 37).
pub struct Loader {
    map: ById,
    report: LoadReport,
    /// Items handed over so far.
    done: usize,
}

impl Loader {
    /// A load expecting about `n` items.
    pub fn with_capacity(n: usize) -> Self {
        Loader {
            map: ById::with_capacity(n),
            report: LoadReport::default(),
            done: 0,
        }
    }

    /// Items handed over so far.
    pub fn done(&self) -> usize {
        self.done
    }

    /// Pairs `batch` with what the index holds for its items; a later item with an id
    /// replaces the earlier one, and an item the index does not hold is left out (and
    /// counted in the report).
    pub async fn add(
        &mut self,
        batch: Vec<Item>,
        index: &dyn VectorIndex,
    ) -> Result<(), CatalogError> {
        let ids: Vec<ItemId> = batch.iter().map(|i| i.item_id.clone()).collect();
        let fetched = index.fetch_live(None, &ids).await?;
        self.done += batch.len();
        // `fetch_live` answers in the order of `ids`: when it found every item (the
        // usual case) the two lists pair up without a map of the batch.
        let in_order = fetched.len() == batch.len()
            && fetched
                .iter()
                .zip(&batch)
                .all(|(p, i)| p.item_id == i.item_id);
        // The entries are made on every core.
        let made: Vec<Arc<CatalogEntry>> = match in_order {
            true => batch
                .into_par_iter()
                .zip(fetched)
                .map(|(item, live)| Arc::new(live_entry(item, live)))
                .collect(),
            false => {
                let by_id: HashMap<ItemId, LivePoint> = fetched
                    .into_iter()
                    .map(|p| (p.item_id.clone(), p))
                    .collect();
                let mut missing = 0;
                let made = batch
                    .into_iter()
                    .filter_map(|item| {
                        let live = by_id.get(&item.item_id).cloned();
                        if live.is_none() {
                            missing += 1;
                        }
                        Some(Arc::new(live_entry(item, live?)))
                    })
                    .collect();
                self.report.missing_from_index += missing;
                made
            }
        };
        self.report.loaded += made.len();
        for entry in made {
            self.map.insert(entry);
        }
        Ok(())
    }

    /// The catalog, with its popularity order and category counts made on every core.
    pub fn finish(self) -> (Catalog, LoadReport) {
        let catalog = Catalog {
            entries: RwLock::new(Entries::from_map(self.map)),
            popular_cache: Mutex::default(),
        };
        (catalog, self.report)
    }
}

impl Catalog {
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds the catalog from the items of a data dir and what the index holds for them
    /// (see [`Loader`]), in batches, calling `progress(done, total)` after each.
    pub async fn load(
        items: Vec<Item>,
        index: &dyn VectorIndex,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<(Self, LoadReport), CatalogError> {
        let total = items.len();
        let mut loader = Loader::with_capacity(total);
        let mut items = items.into_iter().peekable();
        while items.peek().is_some() {
            loader
                .add(items.by_ref().take(LOAD_BATCH).collect(), index)
                .await?;
            progress(loader.done(), total);
        }
        Ok(loader.finish())
    }

    /// Every read takes the lock without queueing behind a waiting writer. A whole-catalog
    /// snapshot (`entries`, a model switch's passes) holds the read lock for tens of
    /// milliseconds at 1M items; with the lock's default fairness, one writer arriving
    /// meanwhile (an item upsert, a pass moving vectors) would make every request's read
    /// wait behind it for as long. Writers still get in whenever no read is held, which on
    /// request paths is microseconds at a time.
    fn read(&self) -> parking_lot::RwLockReadGuard<'_, Entries> {
        self.entries.read_recursive()
    }

    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().by_id.is_empty()
    }

    /// Some entry, for checks that any one answers (vector dimensions).
    pub fn any(&self) -> Option<Arc<CatalogEntry>> {
        self.read().by_id.values().next().cloned()
    }

    /// Every entry, as of now (model activation embeds this snapshot).
    pub fn entries(&self) -> Vec<Arc<CatalogEntry>> {
        self.read().by_id.values().cloned().collect()
    }

    /// Every category with its number of items (available or not), by name.
    pub fn categories(&self) -> Vec<(String, usize)> {
        let entries = self.read();
        entries
            .categories
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(c, n)| (c.to_string(), *n))
            .collect()
    }

    /// Whether `category` is a name this catalog knows (exact, case-sensitive, as filters
    /// match): some item has it, or had it since the process started.
    pub fn has_category(&self, category: &str) -> bool {
        self.read().categories.contains_key(category)
    }

    pub fn get(&self, id: &ItemId) -> Option<Arc<CatalogEntry>> {
        self.read().by_id.get(id.as_str()).cloned()
    }

    /// Resolves many ids (`ItemId`s or plain strings) under one lock; unknown ids are `None`.
    pub fn get_many<'a, Id: AsRef<str> + ?Sized + 'a>(
        &self,
        ids: impl IntoIterator<Item = &'a Id>,
    ) -> Vec<Option<Arc<CatalogEntry>>> {
        let entries = self.read();
        ids.into_iter()
            .map(|id| entries.by_id.get(id.as_ref()).cloned())
            .collect()
    }

    /// Inserts or replaces entries (after the index accepted them).
    pub fn upsert(&self, entries: impl IntoIterator<Item = CatalogEntry>) {
        let mut all = self.entries.write();
        let mut changes = Vec::new();
        for e in entries {
            let e = Arc::new(e);
            changes.push((all.put(e.clone()), Some(e)));
        }
        self.forget_popular(&changes);
    }

    /// Drops the cached popularity lists that a change can alter: the old entry was in the
    /// list, or the new one matches its filter and ranks above its end. Called with the
    /// `entries` write lock held, so that no walk interleaves with the change.
    fn forget_popular(&self, changes: &[Change]) {
        let mut cache = self.popular_cache.lock();
        if cache.is_empty() {
            return;
        }
        cache.retain(|_, list| {
            let reaches = |e: &Arc<CatalogEntry>, inclusive: bool| {
                list.filter.matches(&e.item)
                    && list.last.as_ref().is_none_or(|last| {
                        let r = rank(e);
                        r < *last || (inclusive && r == *last)
                    })
            };
            !changes.iter().any(|(old, new)| {
                old.as_ref().is_some_and(|o| reaches(o, true))
                    || new.as_ref().is_some_and(|n| reaches(n, false))
            })
        });
    }

    /// Applies a change to one entry; returns the new entry, or `None` if the id is unknown.
    pub fn update(
        &self,
        id: &ItemId,
        change: impl FnOnce(&mut CatalogEntry),
    ) -> Option<Arc<CatalogEntry>> {
        let mut all = self.entries.write();
        let mut entry = CatalogEntry::clone(all.by_id.get(id.as_str())?);
        change(&mut entry);
        let updated = Arc::new(entry);
        let old = all.put(updated.clone());
        self.forget_popular(&[(old, Some(updated.clone()))]);
        Some(updated)
    }

    /// Gives many entries their vectors under a new model, under one lock. A model switch
    /// moves every entry this way, in chunks, so that requests are not held up behind a
    /// million single-entry writes. Each pair is an entry as it was read and its new vector:
    /// an entry whose vector changed since it was read (a live write re-embedded it under
    /// the new model) keeps its own, and one removed since is skipped. A patch, which keeps
    /// the vector, does not stop the move.
    ///
    /// The new entries are made before the lock is taken, so that the lock is held for
    /// lookups and pointer swaps only (measured at 1M: copying 2,000 entries under it held
    /// requests' reads off for milliseconds per chunk).
    pub fn set_vectors(&self, vectors: impl IntoIterator<Item = (Arc<CatalogEntry>, Vector)>) {
        let moved: Vec<(Arc<CatalogEntry>, Arc<CatalogEntry>)> = vectors
            .into_iter()
            .map(|(read, v)| {
                let mut entry = CatalogEntry::clone(&read);
                entry.vector = v;
                (read, Arc::new(entry))
            })
            .collect();
        let mut all = self.entries.write();
        for (read, new) in moved {
            match all.by_id.get_mut(read.id()) {
                Some(slot) if Arc::ptr_eq(slot, &read) => *slot = new,
                // Patched since it was read (same vector, other fields): move the patched one.
                Some(slot) if slot.vector == read.vector => {
                    let mut entry = CatalogEntry::clone(slot);
                    entry.vector = new.vector.clone();
                    *slot = Arc::new(entry);
                }
                _ => {}
            }
        }
    }

    pub fn remove(&self, id: &ItemId) -> Option<Arc<CatalogEntry>> {
        let mut all = self.entries.write();
        let removed = all.take(id)?;
        self.forget_popular(&[(Some(removed.clone()), None)]);
        Some(removed)
    }

    /// The most popular items that pass `filter`, best first: the answer when nothing
    /// personal is known and trending is empty or down.
    pub fn popular(&self, filter: &Filter, k: usize) -> Vec<Arc<CatalogEntry>> {
        if k == 0 {
            return Vec::new();
        }
        let broad = Filter {
            exclude_items: Vec::new(),
            ..filter.clone()
        };
        let key = serde_json::to_string(&broad).expect("filters serialize");
        let asked = k + filter.exclude_items.len();
        let cached = self.popular_cache.lock().get(&key).and_then(|c| {
            let complete = c.ids.len() < c.asked;
            (c.asked >= asked || complete).then(|| (c.ids.clone(), complete))
        });
        if let Some((ids, complete)) = cached {
            let live: Vec<Arc<CatalogEntry>> = self
                .get_many(ids.iter())
                .into_iter()
                .flatten()
                .filter(|e| filter.matches(&e.item))
                .take(k)
                .collect();
            // Short because an entry stopped matching or went: walk again.
            if live.len() == k || complete {
                return live;
            }
        }
        let all = self.read();
        let walked: Vec<&Arc<CatalogEntry>> = all
            .by_popularity
            .iter()
            .filter_map(|(_, id)| all.by_id.get(id.as_str()))
            .filter(|e| broad.matches(&e.item))
            .take(asked)
            .collect();
        let live = walked
            .iter()
            .filter(|e| filter.matches(&e.item))
            .take(k)
            .map(|e| Arc::clone(e))
            .collect();
        let list = PopularList {
            last: (walked.len() == asked).then(|| rank(walked[asked - 1])),
            ids: walked.iter().map(|e| e.id().clone()).collect(),
            filter: broad,
            asked,
        };
        // Still under the read lock: no write can slip between the walk and the insert.
        let mut cache = self.popular_cache.lock();
        if cache.len() >= POPULAR_CACHE_MAX {
            cache.clear();
        }
        cache.insert(key, list);
        live
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, genre: &str, popularity: f32) -> CatalogEntry {
        let mut item = Item::new(ItemId::parse(id).unwrap(), format!("title {id}"));
        item.categories = [genre.into()].into();
        CatalogEntry {
            item,
            popularity,
            vector: vec![1.0, 0.0].into(),
        }
    }

    /// A start-up load pairs the file's items with the index's live fields over several
    /// batches (made on every core), whether a batch comes back whole or with gaps, and ends
    /// with the same views as a catalog built by upserts.
    #[tokio::test]
    async fn a_load_over_many_batches_matches_a_catalog_built_by_upserts() {
        use crate::index::exact::ExactIndex;
        use crate::index::IndexPoint;
        let n = 20_000;
        let genres = ["Drama", "Comedy", "Horror"];
        let item = |i: usize| {
            let mut item = Item::new(ItemId::parse(format!("item-{i:05}")).unwrap(), "t");
            item.categories = [genres[i % 3].into()].into();
            item.price = Some(1.0);
            item
        };
        let index = ExactIndex::new();
        index.create_version("v1", 2).await.unwrap();
        index.switch_to("v1").await.unwrap();
        // In the index: a live price and availability that differ from the file's, a few
        // popularities shared by many items (ties are ordered by id), and one item in a
        // hundred after the first batch missing, so that the first batch comes back whole
        // and in order and the others with gaps.
        let indexed = |i: &usize| *i < 8_192 || i % 100 != 7;
        let missing = (0..n).filter(|i| !indexed(i)).count();
        let live = |i: usize| {
            let mut it = item(i);
            it.price = Some(i as f32);
            it.available = !i.is_multiple_of(5);
            CatalogEntry {
                item: it,
                popularity: (i % 4) as f32,
                // Unit vectors, which the index stores as they are.
                vector: if i.is_multiple_of(2) {
                    vec![1.0, 0.0]
                } else {
                    vec![0.0, 1.0]
                }
                .into(),
            }
        };
        let points: Vec<IndexPoint> = (0..n)
            .filter(indexed)
            .map(|i| {
                let e = live(i);
                IndexPoint {
                    vector: e.vector.clone(),
                    payload: e.payload(),
                }
            })
            .collect();
        index.upsert(points).await.unwrap();
        // The first batch whole (in the index's order), the rest shuffled by a stride.
        let order: Vec<usize> = (0..n)
            .map(|k| match k < 8_192 {
                true => k,
                false => 8_192 + (k * 7_919) % (n - 8_192),
            })
            .collect();
        let mut seen = 0;
        let (loaded, report) = Catalog::load(
            order.iter().map(|&i| item(i)).collect(),
            &index,
            |done, total| {
                assert!(done > seen && done <= total);
                seen = done;
            },
        )
        .await
        .unwrap();
        let expected = Catalog::new();
        expected.upsert((0..n).filter(indexed).map(live));
        assert_eq!(seen, n);
        assert!(missing > 100);
        assert_eq!(report.missing_from_index, missing);
        assert_eq!(report.loaded, n - missing);
        assert_eq!(loaded.len(), expected.len());
        assert_eq!(loaded.categories(), expected.categories());
        let ids = |c: &Catalog| -> Vec<ItemId> {
            c.popular(&Filter::default(), n)
                .iter()
                .map(|e| e.id().clone())
                .collect()
        };
        assert_eq!(ids(&loaded), ids(&expected));
        for i in [0, 1, 5, 8_191, 8_192, 19_999] {
            let id = ItemId::parse(format!("item-{i:05}")).unwrap();
            let got = loaded.get(&id).unwrap();
            assert_eq!(
                *got,
                expected.get(&id).unwrap().as_ref().clone(),
                "item {i}"
            );
        }
        assert!(loaded.get(&ItemId::parse("item-08207").unwrap()).is_none());
    }

    #[test]
    fn category_counts_follow_upserts_updates_and_removes() {
        let c = Catalog::new();
        c.upsert([
            entry("a", "Drama", 1.0),
            entry("b", "Drama", 2.0),
            entry("c", "Comedy", 3.0),
        ]);
        assert_eq!(
            c.categories(),
            [("Comedy".to_string(), 1), ("Drama".to_string(), 2)]
        );
        assert!(c.has_category("Drama") && !c.has_category("drama"));
        // Replacing an item moves its count to its new category.
        c.upsert([entry("b", "Horror", 2.0)]);
        c.remove(&ItemId::parse("c").unwrap());
        assert_eq!(
            c.categories(),
            [("Drama".to_string(), 1), ("Horror".to_string(), 1)]
        );
        // Emptied categories are not listed, but stay known: not a typo, just sold out.
        assert!(c.has_category("Comedy"));
        c.update(&ItemId::parse("a").unwrap(), |e| e.item.available = false);
        assert_eq!(c.categories()[0], ("Drama".to_string(), 1));
    }

    #[test]
    fn popular_is_ordered_filtered_and_sees_updates() {
        let c = Catalog::new();
        c.upsert([
            entry("a", "x", 5.0),
            entry("b", "y", 9.0),
            entry("c", "x", 7.0),
        ]);
        let ids = |v: Vec<Arc<CatalogEntry>>| -> Vec<String> {
            v.iter().map(|e| e.id().to_string()).collect()
        };
        assert_eq!(ids(c.popular(&Filter::default(), 10)), ["b", "c", "a"]);
        let only_x = Filter {
            include_categories: vec!["x".into()],
            available_only: true,
            ..Default::default()
        };
        assert_eq!(ids(c.popular(&only_x, 10)), ["c", "a"]);
        c.update(&ItemId::parse("c").unwrap(), |e| e.item.available = false);
        assert_eq!(ids(c.popular(&only_x, 10)), ["a"]);
        c.remove(&ItemId::parse("a").unwrap());
        assert!(c.popular(&only_x, 10).is_empty());
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn cached_popular_lists_follow_every_kind_of_write() {
        let c = Catalog::new();
        c.upsert((0..50).map(|i| {
            entry(
                &format!("i{i:02}"),
                if i % 2 == 0 { "x" } else { "y" },
                i as f32,
            )
        }));
        let ids = |v: Vec<Arc<CatalogEntry>>| -> Vec<String> {
            v.iter().map(|e| e.id().to_string()).collect()
        };
        let only_x = Filter {
            include_categories: vec!["x".into()],
            ..Default::default()
        };
        assert_eq!(ids(c.popular(&only_x, 3)), ["i48", "i46", "i44"]);
        // Served from the cache, and the same answer.
        assert_eq!(ids(c.popular(&only_x, 3)), ["i48", "i46", "i44"]);
        // A new matching item ranking inside the list.
        c.upsert([entry("new", "x", 45.0)]);
        assert_eq!(ids(c.popular(&only_x, 3)), ["i48", "i46", "new"]);
        // A listed item falls below the end of the list.
        c.update(&ItemId::parse("i46").unwrap(), |e| e.popularity = 0.5);
        assert_eq!(ids(c.popular(&only_x, 3)), ["i48", "new", "i44"]);
        // An item starts to match (changes category into x).
        c.update(&ItemId::parse("i49").unwrap(), |e| {
            e.item.categories = ["x".into()].into()
        });
        assert_eq!(ids(c.popular(&only_x, 3)), ["i49", "i48", "new"]);
        // Removal and an exclusion list.
        c.remove(&ItemId::parse("i48").unwrap());
        let mut f = only_x.clone();
        f.exclude_items = vec![ItemId::parse("new").unwrap()];
        assert_eq!(ids(c.popular(&f, 3)), ["i49", "i44", "i42"]);
        assert_eq!(ids(c.popular(&only_x, 3)), ["i49", "new", "i44"]);
        // Asking for more than was cached walks again.
        assert_eq!(c.popular(&only_x, 30).len(), 26);
    }

    #[test]
    fn popularity_changes_move_items_once() {
        let c = Catalog::new();
        c.upsert([entry("a", "x", 1.0), entry("b", "x", 2.0)]);
        let ids = |v: Vec<Arc<CatalogEntry>>| -> Vec<String> {
            v.iter().map(|e| e.id().to_string()).collect()
        };
        // Re-upserting an item with a new popularity moves it, and it is listed once.
        c.upsert([entry("a", "x", 3.0)]);
        assert_eq!(ids(c.popular(&Filter::default(), 10)), ["a", "b"]);
        c.update(&ItemId::parse("b").unwrap(), |e| e.popularity = 4.0);
        assert_eq!(ids(c.popular(&Filter::default(), 10)), ["b", "a"]);
        // Equal popularity: by id.
        c.upsert([entry("0", "x", 3.0)]);
        assert_eq!(ids(c.popular(&Filter::default(), 10)), ["b", "0", "a"]);
        c.remove(&ItemId::parse("b").unwrap());
        assert_eq!(ids(c.popular(&Filter::default(), 10)), ["0", "a"]);
    }

    #[test]
    fn a_model_switch_moves_vectors_but_not_over_a_newer_live_write() {
        let c = Catalog::new();
        c.upsert([
            entry("kept", "x", 1.0),
            entry("patched", "x", 1.0),
            entry("rewritten", "x", 1.0),
            entry("removed", "x", 1.0),
        ]);
        let read = c.entries();
        // Live writes between the read and the move: a price patch keeps the vector; a
        // content upsert re-embeds the item under the new model.
        c.update(&ItemId::parse("patched").unwrap(), |e| {
            e.item.price = Some(3.0)
        });
        let mut rewritten = entry("rewritten", "x", 1.0);
        rewritten.vector = vec![0.0, -1.0].into();
        c.upsert([rewritten]);
        c.remove(&ItemId::parse("removed").unwrap());

        let new: Vector = vec![0.0, 1.0].into();
        c.set_vectors(read.into_iter().map(|e| (e, new.clone())));
        let vector = |id: &str| {
            c.get(&ItemId::parse(id).unwrap())
                .map(|e| e.vector.to_vec())
        };
        assert_eq!(vector("kept"), Some(vec![0.0, 1.0]));
        assert_eq!(vector("patched"), Some(vec![0.0, 1.0]));
        let patched = c.get(&ItemId::parse("patched").unwrap()).unwrap();
        assert_eq!(patched.item.price, Some(3.0), "the patch survives the move");
        assert_eq!(
            vector("rewritten"),
            Some(vec![0.0, -1.0]),
            "the live write wins"
        );
        assert_eq!(vector("removed"), None);
    }
}
