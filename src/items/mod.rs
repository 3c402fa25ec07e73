//! The catalog's write path and its start-up loading: the one place where an item write
//! becomes durable, searchable and known to every replica.
//!
//! One write, in order:
//! 1. the item tower embeds new items ([`embed_points`], the one embed-then-index loop);
//! 2. the index takes the write, in the collection of the model that made the vectors;
//! 3. it is made durable: on the embedded engine the catalog journal line, fsynced
//!    ([`journal`]); a Qdrant server has its own WAL;
//! 4. experiment arms get it in their own collections;
//! 5. the in-memory catalog mirrors it;
//! 6. with several replicas it is announced on the shared stream ([`crate::cluster`]), and
//!    every other replica applies it to its own catalog ([`ItemWriter::apply_remote`]).
//!
//! The write is acknowledged only after all of them, and it runs as one unit on a task of its
//! own ([`unit`]): the request only awaits it, so a request that times out or whose client
//! goes away cannot stop a write half way (the index changed, the catalog not), which would
//! leave a deleted item served from the catalog or a patch seen by one copy only. A write
//! that fails part way answers an error (503 for a dependency) and a retry converges.
//!
//! Start-up ([`load`]): the embedded index replays the journal past its flush mark, indexes
//! the catalog file into an empty index, and loads the catalog from the file plus the index;
//! replicas load it from the shared collection itself.

pub mod journal;
pub mod load;

pub use journal::CatalogJournal;

use crate::arms::Arms;
use crate::catalog::{Catalog, CatalogEntry, CatalogError};
use crate::cluster::{Bus, Change, ClusterError, Delivered, UpsertedItem};
use crate::domain::{Item, ItemId};
use crate::index::{IndexError, IndexPoint, Payload, PayloadPatch, VectorIndex};
use crate::model::{ModelError, TwoTower};
use arc_swap::ArcSwap;
use std::sync::Arc;
use std::time::Duration;

/// Items per item-tower call in bulk work (start-up indexing, replays).
pub const EMBED_BATCH: usize = 1_024;
/// How often buffered item upserts are flushed to the embedded index. Under load at 1M items
/// a flush took 15-60 ms (strace of the engine's writer thread), and every item write waits
/// behind it, so once a second put a few percent of upserts behind one. The journal keeps the
/// writes durable meanwhile, and a restart re-embeds at most this much of it.
pub const FLUSH_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("item {0} not found")]
    UnknownItem(ItemId),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("item tower: {0}")]
    Model(#[from] ModelError),
    #[error(transparent)]
    Journal(#[from] CatalogError),
    /// The write is in the shared collection but the other replicas were not told; a retry
    /// of the same write is safe and tells them.
    #[error("announcing the write to the other replicas: {0}")]
    Announce(#[from] ClusterError),
    #[error("background task: {0}")]
    Task(String),
}

/// A change to an item's live fields (`PATCH /v1/items/{id}`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ItemPatch {
    pub available: Option<bool>,
    pub price: Option<f32>,
}

/// What an upsert did.
#[derive(Debug, Clone, PartialEq)]
pub struct Upserted {
    pub count: usize,
    /// The model whose item tower embedded the items.
    pub model_version: String,
}

/// Every catalog write goes through here. Cheap to share behind an `Arc`.
pub struct ItemWriter {
    pub index: Arc<dyn VectorIndex>,
    pub catalog: Arc<Catalog>,
    pub model: Arc<ArcSwap<TwoTower>>,
    pub arms: Arc<Arms>,
    /// The embedded index's durability record; `None` when the index is a Qdrant server
    /// shared by replicas (its WAL makes writes durable, and a local journal replayed at
    /// start-up could undo another replica's newer write).
    pub journal: Option<Arc<CatalogJournal>>,
    /// The replicas' shared stream, when there are replicas.
    pub bus: Option<Arc<Bus>>,
}

impl ItemWriter {
    /// Embeds `items` with the serving model and writes them everywhere (see the module doc),
    /// as one unit whatever happens to the caller.
    pub async fn upsert(self: &Arc<Self>, items: Vec<(Item, f32)>) -> Result<Upserted, WriteError> {
        let me = self.clone();
        unit(async move { me.upsert_now(items).await }).await
    }

    /// Changes availability and/or price, as one unit whatever happens to the caller.
    pub async fn patch(
        self: &Arc<Self>,
        id: &ItemId,
        patch: ItemPatch,
    ) -> Result<Arc<CatalogEntry>, WriteError> {
        let (me, id) = (self.clone(), id.clone());
        unit(async move { me.patch_now(&id, patch).await }).await
    }

    /// Removes an item from the index and the catalog, as one unit whatever happens to the
    /// caller.
    pub async fn delete(self: &Arc<Self>, id: &ItemId) -> Result<(), WriteError> {
        let (me, id) = (self.clone(), id.clone());
        unit(async move { me.delete_now(&id).await }).await
    }

    async fn upsert_now(&self, items: Vec<(Item, f32)>) -> Result<Upserted, WriteError> {
        let model = self.model.load_full();
        let entries = embed_entries(&model, items).await?;
        let points: Vec<IndexPoint> = entries.iter().map(point_of).collect();
        match (&self.journal, self.arms.collection_of(model.version())) {
            // The embedded engine: not flushed here (a flush is 10-30 ms); the journal line,
            // fsynced next, makes the write durable, and a restart replays lines past the
            // last flush.
            (Some(journal), _) => {
                self.index.upsert_buffered(points).await?;
                let journal = journal.clone();
                let lines: Vec<(Item, f32)> = entries
                    .iter()
                    .map(|e| (e.item.clone(), e.popularity))
                    .collect();
                blocking(move || journal.append(&lines)).await??;
            }
            (None, Some(collection)) => self.index.upsert_into(&collection, points).await?,
            (None, None) => self.index.upsert(points).await?,
        }
        self.upsert_into_arms(&entries).await;
        let announced = self.bus.as_ref().map(|_| Change::Upsert {
            model: model.version().to_string(),
            items: entries
                .iter()
                .map(|e| UpsertedItem {
                    item: e.item.clone(),
                    popularity: e.popularity,
                    vector: e.vector.to_vec(),
                })
                .collect(),
        });
        let count = entries.len();
        self.catalog.upsert(entries);
        if let (Some(bus), Some(change)) = (&self.bus, announced) {
            bus.publish(&change).await?;
        }
        Ok(Upserted {
            count,
            model_version: model.version().to_string(),
        })
    }

    /// Step 4: items the live collection took go to every experiment arm's collection, each
    /// embedded with that arm's item tower. A failure is logged, not returned: the live write
    /// stands, and the arm is reconciled when it next starts.
    async fn upsert_into_arms(&self, entries: &[CatalogEntry]) {
        let arms = self.arms.serving();
        if arms.is_empty() {
            return;
        }
        let items: Arc<[(Item, f32)]> = entries
            .iter()
            .map(|e| (e.item.clone(), e.popularity))
            .collect();
        for arm in arms {
            let (model, items) = (arm.model.clone(), items.clone());
            let points = blocking(move || {
                let items = items.iter().map(|(item, popularity)| (item, *popularity));
                embed_points(&model, items, usize::MAX, |_| {})
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|embedded| embedded.map_err(|e| e.to_string()));
            let points = match points {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(arm = %arm.collection, error = %e, "experiment arm: item tower");
                    continue;
                }
            };
            if let Err(e) = self.index.upsert_into(&arm.collection, points).await {
                tracing::warn!(arm = %arm.collection, error = %e, "experiment arm: upsert");
            }
        }
    }

    async fn patch_now(
        &self,
        id: &ItemId,
        patch: ItemPatch,
    ) -> Result<Arc<CatalogEntry>, WriteError> {
        self.known(id)?;
        let index_patch = PayloadPatch {
            available: patch.available,
            price: patch.price,
            popularity: None,
        };
        self.durably(async {
            match self.live_collection() {
                Some(c) => self.index.set_payload_in(&c, id, &index_patch).await,
                None => self.index.set_payload(id, &index_patch).await,
            }
        })
        .await?;
        self.arms.patched(id, &index_patch).await;
        let updated = apply_patch(&self.catalog, id, patch)
            .ok_or_else(|| WriteError::UnknownItem(id.clone()))?;
        self.announce(Change::Patch {
            item_id: id.clone(),
            available: patch.available,
            price: patch.price,
        })
        .await?;
        Ok(updated)
    }

    async fn delete_now(&self, id: &ItemId) -> Result<(), WriteError> {
        self.known(id)?;
        let ids = std::slice::from_ref(id);
        self.durably(async {
            match self.live_collection() {
                Some(c) => self.index.delete_from(&c, ids).await,
                None => self.index.delete(ids).await,
            }
        })
        .await?;
        self.arms.deleted(ids).await;
        self.catalog.remove(id);
        self.announce(Change::Delete {
            item_ids: vec![id.clone()],
        })
        .await
    }

    /// Applies catalog changes another replica made (its own are skipped). An upsert made
    /// by the model this replica serves takes the announced vectors as they are; one made
    /// by another model (the two replicas were on either side of a model switch) is embedded
    /// again with this replica's model and written to its collection, so that the
    /// collection this replica searches holds it in the right space.
    pub async fn apply_remote(&self, changes: &[Delivered]) {
        let Some(bus) = &self.bus else { return };
        for d in changes.iter().filter(|d| d.origin != bus.origin()) {
            let result = match &d.change {
                Change::Upsert { model, items } => self.apply_upsert(model, items).await,
                Change::Patch {
                    item_id,
                    available,
                    price,
                } => {
                    let patch = ItemPatch {
                        available: *available,
                        price: *price,
                    };
                    apply_patch(&self.catalog, item_id, patch);
                    Ok(())
                }
                Change::Delete { item_ids } => {
                    for id in item_ids {
                        self.catalog.remove(id);
                    }
                    Ok(())
                }
                Change::Registry | Change::Experiments => Ok(()),
            };
            if let Err(e) = result {
                tracing::warn!(id = d.id, error = %e, "applying another replica's catalog change");
            }
        }
    }

    async fn apply_upsert(&self, writer: &str, items: &[UpsertedItem]) -> Result<(), WriteError> {
        let model = self.model.load_full();
        if model.version() == writer {
            self.catalog.upsert(items.iter().map(|u| CatalogEntry {
                item: u.item.clone(),
                popularity: u.popularity,
                vector: u.vector.clone().into(),
            }));
            return Ok(());
        }
        let own = items
            .iter()
            .map(|u| (u.item.clone(), u.popularity))
            .collect();
        let entries = embed_entries(&model, own).await?;
        let points: Vec<IndexPoint> = entries.iter().map(point_of).collect();
        match self.arms.collection_of(model.version()) {
            Some(c) => self.index.upsert_into(&c, points).await?,
            None => self.index.upsert(points).await?,
        }
        tracing::info!(
            items = entries.len(),
            writer,
            serving = model.version(),
            "re-embedded items another replica wrote with another model"
        );
        self.catalog.upsert(entries);
        Ok(())
    }

    async fn announce(&self, change: Change) -> Result<(), WriteError> {
        if let Some(bus) = &self.bus {
            bus.publish(&change).await?;
        }
        Ok(())
    }

    fn known(&self, id: &ItemId) -> Result<Arc<CatalogEntry>, WriteError> {
        self.catalog
            .get(id)
            .ok_or_else(|| WriteError::UnknownItem(id.clone()))
    }

    /// The collection of the serving model, when replicas share the index (the embedded
    /// index writes through its alias, which its own switches move).
    fn live_collection(&self) -> Option<String> {
        self.bus.as_ref()?;
        self.arms.collection_of(self.model.load().version())
    }

    /// Runs a durable index write (it flushes the engine), then moves the journal's flush
    /// mark to where the journal was before it: a restart must not replay an older journal
    /// line of the item over this write.
    async fn durably(
        &self,
        write: impl std::future::Future<Output = Result<(), IndexError>>,
    ) -> Result<(), WriteError> {
        let Some(journal) = &self.journal else {
            return Ok(write.await?);
        };
        let j = journal.clone();
        let mark = blocking(move || j.byte_len()).await??;
        write.await?;
        let j = journal.clone();
        Ok(blocking(move || j.mark_flushed(mark)).await??)
    }
}

/// Applies a patch to the in-memory catalog; `None` if the item is gone.
fn apply_patch(catalog: &Catalog, id: &ItemId, patch: ItemPatch) -> Option<Arc<CatalogEntry>> {
    catalog.update(id, |e| {
        if let Some(a) = patch.available {
            e.item.available = a;
        }
        if let Some(p) = patch.price {
            e.item.price = Some(p);
        }
    })
}

fn point_of(e: &CatalogEntry) -> IndexPoint {
    IndexPoint {
        vector: e.vector.clone(),
        payload: e.payload(),
    }
}

/// Items with their popularity, embedded off the async workers.
async fn embed_entries(
    model: &Arc<TwoTower>,
    items: Vec<(Item, f32)>,
) -> Result<Vec<CatalogEntry>, WriteError> {
    let model = model.clone();
    let (items, points) = blocking(move || {
        let points = embed_points(
            &model,
            items.iter().map(|(i, p)| (i, *p)),
            usize::MAX,
            |_| {},
        );
        (items, points)
    })
    .await?;
    Ok(items
        .into_iter()
        .zip(points?)
        .map(|((item, popularity), point)| CatalogEntry {
            item,
            popularity,
            vector: point.vector,
        })
        .collect())
}

/// Embeds items with `model`'s item tower in batches of `batch` and returns the index points,
/// each with the popularity it comes with; `progress(done)` after each batch. The one place a
/// batch of items goes through an item tower: API upserts (and their experiment arms),
/// start-up indexing, journal replay, activations and reconciliation (`lifecycle`).
pub fn embed_points<'a>(
    model: &TwoTower,
    items: impl IntoIterator<Item = (&'a Item, f32)>,
    batch: usize,
    mut progress: impl FnMut(usize),
) -> Result<Vec<IndexPoint>, ModelError> {
    let items: Vec<(&Item, f32)> = items.into_iter().collect();
    let mut points = Vec::with_capacity(items.len());
    for chunk in items.chunks(batch.max(1)) {
        let plain: Vec<Item> = chunk.iter().map(|(i, _)| (*i).clone()).collect();
        let vectors = model.embed_items(&plain)?;
        for ((item, popularity), vector) in chunk.iter().zip(vectors) {
            points.push(IndexPoint {
                vector: vector.into(),
                payload: Payload::of(item, *popularity),
            });
        }
        progress(points.len());
    }
    Ok(points)
}

/// Runs one item write on a task of its own and awaits it: dropping the caller's future (a
/// request timeout, a client gone) leaves the write running to its end.
async fn unit<T: Send + 'static>(
    write: impl std::future::Future<Output = Result<T, WriteError>> + Send + 'static,
) -> Result<T, WriteError> {
    tokio::spawn(write)
        .await
        .map_err(|e| WriteError::Task(e.to_string()))?
}

/// Runs blocking work (journal I/O, the item tower) on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, WriteError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| WriteError::Task(e.to_string()))
}
