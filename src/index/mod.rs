//! The vector index: item vectors plus the payload that filters need, searched by ANN under a
//! domain [`Filter`]. Backends: `edge` (qdrant-edge, in-process), `qdrant` (a Qdrant server
//! over gRPC) and `exact` (brute force, the recall oracle). Only this module knows Qdrant's
//! types.
//!
//! Collections are versioned: an index command or a model activation writes a new version,
//! then switches the serving alias to it, so readers never see a half-built collection.

use crate::domain::{Filter, Item, ItemId, Name};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// The payload stored with each vector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Payload {
    pub item_id: ItemId,
    pub categories: Vec<Name>,
    pub available: bool,
    pub price: Option<f32>,
    /// Unix seconds.
    pub created_at: Option<i64>,
    pub title: String,
    /// Training interaction count (or a live counter), used by rerank and cold-start priors.
    pub popularity: f32,
    /// The rest of the item's content, so that the collection holds the whole item: with a
    /// Qdrant server, a new replica loads its catalog from the collection (see `cluster`).
    pub tags: Vec<Name>,
    pub year: Option<i32>,
    /// The item's attributes; filters read them (see `payloads` for how they are stored).
    pub attributes: crate::domain::Attributes,
}

/// An item vector, shared rather than copied: the catalog entry, the embedded index's RAM
/// copy and its category blocks hold the same allocation (at 1M items × d = 64 each copy
/// would be 160 MB; issue 37), in half precision.
pub use crate::vector::Vector;

/// A vector with its payload, ready to upsert.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexPoint {
    pub vector: Vector,
    pub payload: Payload,
}

#[cfg(test)]
impl IndexPoint {
    /// A test point: an available item titled by its id, in `categories`, at `vector`.
    pub(crate) fn for_test(id: &str, categories: &[&str], vector: &[f32]) -> IndexPoint {
        let mut item = Item::new(crate::domain::ItemId::parse(id).unwrap(), id);
        item.categories = categories.iter().map(|&c| c.into()).collect();
        IndexPoint {
            vector: vector.into(),
            payload: Payload::of(&item, 0.0),
        }
    }
}

impl Payload {
    /// The payload of a catalog item with the given popularity.
    pub fn of(item: &Item, popularity: f32) -> Payload {
        Payload {
            item_id: item.item_id.clone(),
            categories: item.categories.to_vec(),
            available: item.available,
            price: item.price,
            created_at: item.created_at,
            title: item.title.clone(),
            popularity,
            tags: item.tags.to_vec(),
            year: item.year,
            attributes: item.attributes.clone(),
        }
    }

    /// The item this payload describes.
    pub fn to_item(&self) -> Item {
        Item {
            item_id: self.item_id.clone(),
            title: self.title.clone(),
            categories: self.categories.as_slice().into(),
            tags: self.tags.as_slice().into(),
            price: self.price,
            available: self.available,
            year: self.year,
            created_at: self.created_at,
            attributes: self.attributes.clone(),
        }
    }
}

/// An item's live fields and stored vector: what the catalog load, reconciliation and the
/// experiment arms read back from a collection ([`VectorIndex::fetch_live`]), without the
/// content (title, tags, attributes) that the catalog has from its own sources. The embedded
/// engine keeps only these in RAM, so it answers them without reading its files.
#[derive(Debug, Clone, PartialEq)]
pub struct LivePoint {
    pub item_id: ItemId,
    pub available: bool,
    pub price: Option<f32>,
    pub popularity: f32,
    pub vector: Vector,
}

impl LivePoint {
    fn of(p: Payload, vector: Vector) -> LivePoint {
        LivePoint {
            item_id: p.item_id,
            available: p.available,
            price: p.price,
            popularity: p.popularity,
            vector,
        }
    }
}

/// A partial payload update: the fields that are `Some` are set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PayloadPatch {
    pub available: Option<bool>,
    pub price: Option<f32>,
    pub popularity: Option<f32>,
}

impl PayloadPatch {
    /// Sets the live fields that the patch names, wherever a backend keeps them.
    pub fn apply(&self, available: &mut bool, price: &mut Option<f32>, popularity: &mut f32) {
        if let Some(a) = self.available {
            *available = a;
        }
        if let Some(p) = self.price {
            *price = Some(p);
        }
        if let Some(p) = self.popularity {
            *popularity = p;
        }
    }
}

/// One search result. `score` is cosine similarity (higher is closer).
///
/// A hit names the item only: the serving process holds the catalog in memory, keyed by item
/// id, and reads everything else there. So the `qdrant` backend asks the server for the
/// `item_id` field alone (not the whole payload), and the other backends copy no payload.
/// [`VectorIndex::fetch`] returns payloads when they are needed.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub score: f32,
    pub item_id: ItemId,
}

/// One page of [`VectorIndex::scroll`]: the points (payload and stored vector), and the
/// cursor of the next page (`None` after the last page).
pub type ScrollPage = (Vec<(Payload, Vector)>, Option<String>);

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("vector has {got} dimensions, the collection has {want}")]
    WrongDim { want: usize, got: usize },
    #[error("vector for item {item} has a non-finite component")]
    NonFinite { item: String },
    #[error("empty batch")]
    EmptyBatch,
    #[error("collection version {0:?} not found")]
    UnknownVersion(String),
    #[error("no collection is live yet (run `tandem index` first)")]
    NoActiveVersion,
    #[error("invalid collection version name {0:?}: use letters, digits, '-', '_' and '.'")]
    BadVersionName(String),
    #[error("index backend unavailable: {0}")]
    Unavailable(String),
    #[error("index backend error: {0}")]
    Backend(String),
}

/// What every backend does. Methods without a `version` act on the live (aliased) collection.
#[async_trait]
pub trait VectorIndex: Send + Sync {
    /// Upserts into the live collection; visible to search and durable when this returns.
    async fn upsert(&self, points: Vec<IndexPoint>) -> Result<(), IndexError>;
    /// Upserts into the live collection, visible to search when this returns but durable
    /// only after the next [`VectorIndex::flush`] (or a durable write). The caller keeps its
    /// own durable record of the write until then: the API's item upserts are in the catalog
    /// journal, which a restart replays past its flushed mark. Backends whose every write is
    /// durable anyway (the Qdrant server has its own WAL) just upsert.
    async fn upsert_buffered(&self, points: Vec<IndexPoint>) -> Result<(), IndexError> {
        self.upsert(points).await
    }
    /// Makes every write to the live collection before it durable.
    async fn flush(&self) -> Result<(), IndexError> {
        Ok(())
    }
    /// Writes down what the next start would otherwise rebuild from the collection's
    /// payloads (the embedded engine's RAM copy, see `snapshot`), if it can be exact: on a
    /// clean stop. Backends that rebuild nothing do nothing.
    async fn save_snapshot(&self) -> Result<(), IndexError> {
        Ok(())
    }
    async fn delete(&self, ids: &[ItemId]) -> Result<(), IndexError>;
    async fn set_payload(&self, id: &ItemId, patch: &PayloadPatch) -> Result<(), IndexError>;
    /// The `k` nearest items that pass `filter`, best first.
    async fn search(
        &self,
        vector: &[f32],
        filter: &Filter,
        k: usize,
    ) -> Result<Vec<Hit>, IndexError>;
    /// The stored vectors of the given items; unknown ids are absent from the result.
    async fn fetch(&self, ids: &[ItemId]) -> Result<Vec<(Payload, Vector)>, IndexError>;
    async fn count(&self) -> Result<usize, IndexError>;
    /// The live fields and stored vectors of the given items in `version` (the live
    /// collection when `None`), in the order of `ids`; unknown ids are absent. `fetch`
    /// without the rest of the payload: backends that keep these apart answer it cheaper.
    async fn fetch_live(
        &self,
        version: Option<&str>,
        ids: &[ItemId],
    ) -> Result<Vec<LivePoint>, IndexError> {
        let fetched = match version {
            None => self.fetch(ids).await?,
            Some(v) => self.fetch_from(v, ids).await?,
        };
        Ok(fetched
            .into_iter()
            .map(|(p, v)| LivePoint::of(p, v))
            .collect())
    }

    /// Creates an empty collection version with vectors of `dim` dimensions.
    async fn create_version(&self, version: &str, dim: usize) -> Result<(), IndexError>;
    /// Upserts into a version that need not be live (one being built, or an experiment
    /// arm's). Visible to `search_in` when this returns; durable once finalized (a version
    /// that serves beside the live one is reconciled with the catalog when it starts).
    async fn upsert_into(&self, version: &str, points: Vec<IndexPoint>) -> Result<(), IndexError>;
    /// `search` in a version that need not be live: an experiment arm serves from its own
    /// model's collection beside the live one.
    async fn search_in(
        &self,
        version: &str,
        vector: &[f32],
        filter: &Filter,
        k: usize,
    ) -> Result<Vec<Hit>, IndexError>;
    /// `fetch` from a version that need not be live.
    async fn fetch_from(
        &self,
        version: &str,
        ids: &[ItemId],
    ) -> Result<Vec<(Payload, Vector)>, IndexError>;
    /// `delete` in a version that need not be live.
    async fn delete_from(&self, version: &str, ids: &[ItemId]) -> Result<(), IndexError>;
    /// `set_payload` in a version that need not be live.
    async fn set_payload_in(
        &self,
        version: &str,
        id: &ItemId,
        patch: &PayloadPatch,
    ) -> Result<(), IndexError>;
    /// Blocks until the version is searchable at full speed (HNSW built), then returns.
    async fn finalize_version(&self, version: &str) -> Result<(), IndexError>;
    /// Atomically points the serving alias at `version`.
    async fn switch_to(&self, version: &str) -> Result<(), IndexError>;
    async fn drop_version(&self, version: &str) -> Result<(), IndexError>;
    /// All versions, and which one is live.
    async fn versions(&self) -> Result<(Vec<String>, Option<String>), IndexError>;
    /// One page of every point of a collection (the live one when `version` is `None`):
    /// payloads with their stored vectors (unit length: the collections are cosine), at most
    /// `limit` of them (a `limit` of 0 counts as 1), and the cursor of the next page, `None`
    /// after the last. Pass `offset: None` for the first page, then each returned cursor.
    ///
    /// The cursor is opaque and backend-specific. Pages follow a stable order of the points
    /// (point id, or item id for `exact`), so a point present during the whole scroll comes
    /// exactly once, even when other points are written meanwhile; a point written or deleted
    /// during the scroll may or may not appear. A replica loads its whole catalog with it at
    /// start-up (1M points in pages of a few thousand). A cursor that no page returned gives
    /// [`IndexError::Backend`].
    async fn scroll(
        &self,
        version: Option<&str>,
        offset: Option<String>,
        limit: usize,
    ) -> Result<ScrollPage, IndexError>;
}

pub mod bench;
pub mod blocks;
pub mod build;
pub mod edge;
pub mod exact;
pub mod filter;
pub mod payloads;
pub mod plan;
pub mod qdrant;
pub mod snapshot;
pub mod validate;

pub use build::{build_unswitched, build_version, build_version_batched, BuildReport};

use crate::config::{IndexBackend, Settings};
use std::path::Path;
use std::sync::Arc;

/// Opens the backend that `settings.index.backend` names. `edge` keeps its collections under
/// `<data_dir>/index/`; `qdrant` connects (and fails fast, naming the URL, if the server is
/// unreachable); `exact` starts empty in memory.
pub async fn open(
    settings: &Settings,
    data_dir: &Path,
) -> Result<Arc<dyn VectorIndex>, IndexError> {
    Ok(match settings.index.backend {
        IndexBackend::Embedded => Arc::new(edge::EdgeIndex::open(
            &data_dir.join("index"),
            edge::EdgeOptions {
                indexing_threads: settings.index.indexing_threads,
                scan_max_points: settings.index.scan_max_points,
                filterable: settings.catalog.indexed_names(),
                ..edge::EdgeOptions::default()
            },
        )?),
        IndexBackend::Qdrant => Arc::new(
            qdrant::QdrantIndex::connect(&settings.index)
                .await?
                .with_filterable(settings.catalog.indexed_names()),
        ),
        IndexBackend::Exact => Arc::new(exact::ExactIndex::new()),
    })
}
