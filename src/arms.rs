//! Experiment arms that serve a model other than the active one, side by side with it, so
//! that two checkpoints can be compared on live traffic.
//!
//! An arm is a loaded model and the index collection holding the catalog embedded by that
//! model's item tower (built by an activation or by `POST /admin/models/{v}/prepare`). A
//! request assigned to the arm's variant takes its user vector from the arm's user tower and
//! its candidates from the arm's collection; the re-ranker then compares items in the arm's
//! vector space ([`Arms::in_space`]).
//!
//! Catalog writes go to the live collection first (that write is what the API acknowledges)
//! and then to every arm's collection (upserts embedded by `items::ItemWriter` with each
//! arm's item tower, [`Arms::patched`], [`Arms::deleted`]). An arm's collection that missed writes (it was not serving, or the
//! process stopped before its engine flushed) is reconciled with the catalog when the arm
//! starts. Whatever an arm's collection still gets wrong, the pipeline's business rules
//! check every returned item against the live catalog, so an item deleted or made
//! unavailable never comes back from an arm either.

use crate::catalog::CatalogEntry;
use crate::domain::ItemId;
use crate::index::{PayloadPatch, VectorIndex};
use crate::model::TwoTower;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::Arc;

/// A model serving beside the active one.
pub struct Arm {
    pub model: Arc<TwoTower>,
    /// The index collection version that holds the catalog embedded by `model`.
    pub collection: String,
}

/// The arms now serving, by model version, and the collection of every version that has
/// one. Cheap to share behind an `Arc`.
pub struct Arms {
    index: Arc<dyn VectorIndex>,
    by_version: ArcSwap<HashMap<String, Arc<Arm>>>,
    /// Model version -> the collection its item tower filled. A request searches the
    /// collection of the model it holds, never the alias: with several replicas the alias
    /// moves on one replica before another has swapped its model, and one model's user
    /// vector in another's item space finds nonsense.
    collections: ArcSwap<HashMap<String, String>>,
}

impl Arms {
    pub fn new(index: Arc<dyn VectorIndex>) -> Self {
        Arms {
            index,
            by_version: ArcSwap::from_pointee(HashMap::new()),
            collections: ArcSwap::from_pointee(HashMap::new()),
        }
    }

    /// The collection `version`'s item tower filled, if known; `None` means the live alias
    /// (a single process before its first activation, or a version being switched to).
    pub fn collection_of(&self, version: &str) -> Option<String> {
        self.collections.load().get(version).cloned()
    }

    /// Replaces the version -> collection map (from the registry).
    pub fn set_collections(&self, map: HashMap<String, String>) {
        self.collections.store(Arc::new(map));
    }

    /// Records one version's collection (just before a switch to it).
    pub fn set_collection(&self, version: &str, collection: &str) {
        let mut map = self.collections.load().as_ref().clone();
        map.insert(version.to_string(), collection.to_string());
        self.collections.store(Arc::new(map));
    }

    pub fn get(&self, version: &str) -> Option<Arc<Arm>> {
        self.by_version.load().get(version).cloned()
    }

    pub fn versions(&self) -> Vec<String> {
        let mut v: Vec<String> = self.by_version.load().keys().cloned().collect();
        v.sort();
        v
    }

    /// Replaces the set; requests that already hold an arm finish on it.
    pub fn set(&self, arms: Vec<Arc<Arm>>) {
        let map = arms
            .into_iter()
            .map(|a| (a.model.version().to_string(), a))
            .collect();
        self.by_version.store(Arc::new(map));
    }

    /// The arms now serving. A catalog upsert embeds its items with each one's item tower
    /// into its collection (`items::ItemWriter::upsert`, where every embedding is done).
    pub fn serving(&self) -> Vec<Arc<Arm>> {
        self.by_version.load().values().cloned().collect()
    }

    /// A PATCH the live collection took.
    pub async fn patched(&self, id: &ItemId, patch: &PayloadPatch) {
        for arm in self.by_version.load().values() {
            if let Err(e) = self.index.set_payload_in(&arm.collection, id, patch).await {
                tracing::warn!(arm = %arm.collection, error = %e, "experiment arm: set payload");
            }
        }
    }

    /// A DELETE the live collection took.
    pub async fn deleted(&self, ids: &[ItemId]) {
        for arm in self.by_version.load().values() {
            if let Err(e) = self.index.delete_from(&arm.collection, ids).await {
                tracing::warn!(arm = %arm.collection, error = %e, "experiment arm: delete");
            }
        }
    }

    /// The entries with their vectors in `arm`'s space, in order; an entry the arm's
    /// collection does not hold (added while it was not serving, before reconciliation) is
    /// dropped. `None` when the arm's collection does not answer.
    pub async fn in_space(
        &self,
        arm: &Arm,
        entries: Vec<Arc<CatalogEntry>>,
    ) -> Option<Vec<Arc<CatalogEntry>>> {
        if entries.is_empty() {
            return Some(entries);
        }
        let ids: Vec<ItemId> = entries.iter().map(|e| e.id().clone()).collect();
        let fetched = match self.index.fetch_live(Some(&arm.collection), &ids).await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(arm = %arm.collection, error = %e, "experiment arm: fetch");
                return None;
            }
        };
        let mut vectors: HashMap<ItemId, crate::index::Vector> =
            fetched.into_iter().map(|p| (p.item_id, p.vector)).collect();
        Some(
            entries
                .into_iter()
                .filter_map(|e| {
                    let vector = vectors.remove(e.id())?;
                    Some(Arc::new(CatalogEntry {
                        item: e.item.clone(),
                        popularity: e.popularity,
                        vector,
                    }))
                })
                .collect(),
        )
    }
}
