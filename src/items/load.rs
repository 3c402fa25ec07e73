//! Start-up: the catalog a server begins with, and the index brought in line with it.
//!
//! - One process (embedded index): the catalog file plus the items added through the API
//!   (the journal), with their live fields and vectors from the index. Upserts the journal
//!   holds past the last flush are replayed first, and an empty index is filled from the
//!   catalog file.
//! - Replicas (a shared Qdrant collection): the collection itself, paged through with
//!   [`VectorIndex::scroll`]. A replica that finds no collection fills one from the catalog
//!   file under a Redis lease, so that replicas starting together index it once.

use super::{embed_points, CatalogJournal, EMBED_BATCH, FLUSH_EVERY};
use crate::catalog::{Catalog, CatalogEntry, CatalogError, LoadReport};
use crate::cluster::Bus;
use crate::data::DataError;
use crate::domain::{Item, ItemId};
use crate::index::{IndexError, VectorIndex};
use crate::model::{ModelError, TwoTower};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Points per scroll page when a replica loads the catalog from the collection.
const SCROLL_PAGE: usize = 2_000;
/// How long the replica that indexes an empty collection holds the lease; another replica
/// waits for the collection meanwhile, and takes over if the lease lapses (its holder died).
const BOOTSTRAP_LEASE: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading the catalog: {0}")]
    Data(#[from] DataError),
    #[error("loading the catalog: {0}")]
    Catalog(#[from] CatalogError),
    #[error("the index: {0}")]
    Index(#[from] IndexError),
    #[error("item tower of model {version}: {source}")]
    Model {
        version: String,
        #[source]
        source: Box<ModelError>,
    },
    #[error("{0}")]
    Cluster(#[from] crate::cluster::ClusterError),
}

/// Where the embedded index's journal lives.
pub fn journal_path(data_dir: &Path) -> PathBuf {
    data_dir.join("catalog").join("items-added.jsonl")
}

/// One process: replays unflushed journal lines, indexes the catalog into an empty index,
/// and loads the catalog from the file, the journal and the index.
pub async fn load_local(
    index: &dyn VectorIndex,
    model: &TwoTower,
    catalog_dir: &Path,
    journal: &CatalogJournal,
) -> Result<Catalog, LoadError> {
    let file = read_catalog(catalog_dir)?;
    load_local_from(index, model, catalog_dir, journal, file).await
}

/// [`load_local`] with the catalog file's items read already (the server reads the file
/// while the index opens: at 1M items each takes seconds).
pub async fn load_local_from(
    index: &dyn VectorIndex,
    model: &TwoTower,
    catalog_dir: &Path,
    journal: &CatalogJournal,
    file: Vec<Item>,
) -> Result<Catalog, LoadError> {
    let stage = Instant::now();
    replay_unflushed(journal, index, model).await?;
    crate::telemetry::startup_stage("journal replay", stage);
    let stage = Instant::now();
    let mut items = file;
    let added = journal.read()?;
    if !added.is_empty() {
        tracing::info!(items = added.len(), "replaying items added through the API");
        items = merge_items(items, added);
    }
    crate::telemetry::startup_stage("journal read", stage);
    if !items.is_empty() && index_is_empty(index).await? {
        let stage = Instant::now();
        index_catalog(index, model, &items, catalog_dir).await?;
        crate::telemetry::startup_stage("catalog indexed", stage);
    }
    let started = Instant::now();
    let total = items.len();
    let mut logged = 0;
    let (catalog, report) = Catalog::load(items, index, |done, total| {
        if done >= logged + 100_000 || done == total {
            logged = done;
            tracing::info!(done, total, "loading the catalog");
        }
    })
    .await?;
    log_loaded(report, total, started);
    crate::telemetry::startup_stage("catalog loaded", started);
    Ok(catalog)
}

/// Replicas: the shared collection `collection` (the live one when `None`) is the catalog.
/// When there is none yet, one replica indexes the catalog file into it first.
pub async fn load_shared(
    index: &dyn VectorIndex,
    model: &TwoTower,
    catalog_dir: &Path,
    bus: &Bus,
    collection: Option<&str>,
) -> Result<Catalog, LoadError> {
    if collection.is_none() {
        bootstrap(index, model, catalog_dir, bus).await?;
    }
    let started = Instant::now();
    let catalog = Catalog::new();
    let mut cursor = None;
    let mut loaded = 0usize;
    let mut last_log = Instant::now();
    loop {
        let (points, next) = match index.scroll(collection, cursor, SCROLL_PAGE).await {
            Err(IndexError::NoActiveVersion) => break,
            other => other?,
        };
        loaded += points.len();
        catalog.upsert(points.into_iter().map(|(payload, vector)| CatalogEntry {
            item: payload.to_item(),
            popularity: payload.popularity,
            vector,
        }));
        if last_log.elapsed() >= Duration::from_secs(5) {
            last_log = Instant::now();
            tracing::info!(loaded, "loading the catalog from the shared collection");
        }
        match next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    tracing::info!(
        loaded,
        secs = started.elapsed().as_secs_f64(),
        "catalog loaded from the shared collection"
    );
    Ok(catalog)
}

/// Indexes the catalog file into the shared index if no collection is live, under a lease:
/// the other replicas wait until the holder has made one live.
async fn bootstrap(
    index: &dyn VectorIndex,
    model: &TwoTower,
    catalog_dir: &Path,
    bus: &Bus,
) -> Result<(), LoadError> {
    let lease = bus.keys().bootstrap.clone();
    let mut waited = Instant::now();
    loop {
        if !index_is_empty(index).await? {
            return Ok(());
        }
        if bus.try_lease(&lease, BOOTSTRAP_LEASE).await? {
            let result = async {
                if index_is_empty(index).await? {
                    let items = read_catalog(catalog_dir)?;
                    if !items.is_empty() {
                        index_catalog(index, model, &items, catalog_dir).await?;
                    }
                }
                Ok::<_, LoadError>(())
            }
            .await;
            bus.release_lease(&lease).await?;
            return result;
        }
        if waited.elapsed() >= Duration::from_secs(5) {
            waited = Instant::now();
            tracing::info!(
                "another replica is indexing the catalog into the shared collection; waiting"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn log_loaded(report: LoadReport, total: usize, started: Instant) {
    tracing::info!(
        loaded = report.loaded,
        missing_from_index = report.missing_from_index,
        of = total,
        secs = started.elapsed().as_secs_f64(),
        "catalog loaded"
    );
}

/// The catalog file's items, then the journaled ones; a later entry for an id replaces the
/// earlier one in place.
fn merge_items(base: Vec<Item>, added: Vec<Item>) -> Vec<Item> {
    let mut at: HashMap<ItemId, usize> = HashMap::with_capacity(base.len());
    let mut items = base;
    for (i, item) in items.iter().enumerate() {
        at.insert(item.item_id.clone(), i);
    }
    for item in added {
        match at.get(&item.item_id) {
            Some(&i) => items[i] = item,
            None => {
                at.insert(item.item_id.clone(), items.len());
                items.push(item);
            }
        }
    }
    items
}

/// The items of a data dir's catalog file; none when no dir is configured.
pub fn read_catalog(dir: &Path) -> Result<Vec<Item>, LoadError> {
    if dir.as_os_str().is_empty() {
        tracing::warn!("server.catalog_dir is not set: the catalog starts empty; add items with POST /v1/items");
        return Ok(Vec::new());
    }
    let file = crate::data::find_file(dir, "items")?;
    Ok(crate::data::read_items(&file)?)
}

/// Journal lines per index write when a crash replay is written back. Each batch is one
/// buffered upsert under the index's write budget (the request timeout, 2 s): the whole
/// replay in one call would outgrow that budget once it is large (a 10 s flush interval at a
/// few thousand upserts a second leaves tens of thousands of lines), time out, and stop the
/// start-up again at every restart.
pub const REPLAY_BATCH: usize = 1_000;

/// Item upserts acknowledged before the process stopped whose index write may not have been
/// flushed (the journal past its flush mark, see [`CatalogJournal`]): embedded and written to
/// the index again in batches of [`REPLAY_BATCH`], then flushed once, and only then is the
/// flush mark moved (a crash during the replay replays it again). On an empty index there
/// is nothing to repair: the whole catalog, journal included, is indexed next.
async fn replay_unflushed(
    journal: &CatalogJournal,
    index: &dyn VectorIndex,
    model: &TwoTower,
) -> Result<(), LoadError> {
    let (pending, end) = journal.unflushed()?;
    if pending.is_empty() || index_is_empty(index).await? {
        return Ok(());
    }
    tracing::info!(
        items = pending.len(),
        batch = REPLAY_BATCH,
        "replaying item upserts that may not have reached the index before the last stop"
    );
    let mut last_log = Instant::now();
    for (n, chunk) in pending.chunks(REPLAY_BATCH).enumerate() {
        let points = embed_points(
            model,
            chunk.iter().map(|(i, p)| (i, *p)),
            EMBED_BATCH,
            |_| {},
        )
        .map_err(|source| model_error(model, source))?;
        index.upsert_buffered(points).await?;
        if last_log.elapsed() >= Duration::from_secs(5) {
            last_log = Instant::now();
            let done = (n * REPLAY_BATCH + chunk.len()).min(pending.len());
            tracing::info!(
                replayed = done,
                of = pending.len(),
                "replaying item upserts"
            );
        }
    }
    index.flush().await?;
    journal.mark_flushed(end)?;
    Ok(())
}

/// Flushes the index every [`FLUSH_EVERY`] while items are being upserted, and moves the
/// journal's flush mark, so that a restart replays at most that much of the upserts.
pub fn spawn_flusher(
    index: Arc<dyn VectorIndex>,
    journal: Arc<CatalogJournal>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !journal.take_unflushed() {
                continue;
            }
            if let Err(e) = flush_once(index.as_ref(), &journal).await {
                tracing::warn!(error = %e, "flushing buffered item upserts; retrying");
                journal.keep_unflushed();
            }
        }
    })
}

/// Flushes the index and moves the journal's flush mark past every line appended so far.
pub async fn flush_once(
    index: &dyn VectorIndex,
    journal: &Arc<CatalogJournal>,
) -> Result<(), String> {
    let j = journal.clone();
    let mark = tokio::task::spawn_blocking(move || j.byte_len())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    index.flush().await.map_err(|e| e.to_string())?;
    let j = journal.clone();
    tokio::task::spawn_blocking(move || j.mark_flushed(mark))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

async fn index_is_empty(index: &dyn VectorIndex) -> Result<bool, IndexError> {
    match index.count().await {
        Ok(n) => Ok(n == 0),
        Err(IndexError::NoActiveVersion) => Ok(true),
        Err(e) => Err(e),
    }
}

/// A collection name for `model`'s vectors: its version and the time, to the millisecond.
pub fn collection_name(model_version: &str) -> String {
    format!(
        "{model_version}-{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%S%3f")
    )
}

/// Embeds the catalog with the item tower and builds a new live collection version from it,
/// with popularity counted from the catalog dir's interactions (when there are any). Used at
/// start-up on an empty index and by `tandem index`. The item tower embeds each batch while
/// the engine writes the one before (issue 37: at 1M items the two stages took 31 s and 84 s
/// one after the other on a loaded box). If it fails midway the live version is unchanged
/// (see `index::build_version`).
pub async fn index_catalog(
    index: &dyn VectorIndex,
    model: &TwoTower,
    items: &[Item],
    dir: &Path,
) -> Result<(), LoadError> {
    tracing::info!(items = items.len(), "indexing the catalog");
    let popularity = count_interactions(dir)?;
    let mut embed_secs = 0.0;
    let mut failed: Option<ModelError> = None;
    let batches = items.chunks(EMBED_BATCH).map(|chunk| {
        let started = Instant::now();
        let points = embed_points(
            model,
            chunk.iter().map(|i| {
                let p = popularity.get(&i.item_id).copied().unwrap_or(0.0);
                (i, p)
            }),
            EMBED_BATCH,
            |_| {},
        );
        embed_secs += started.elapsed().as_secs_f64();
        points.map_err(|e| {
            let message = format!("the item tower failed: {e}");
            failed = Some(e);
            IndexError::Backend(message)
        })
    });
    let bar = indicatif::ProgressBar::new(items.len() as u64);
    let built = crate::index::build_version_batched(
        index,
        &collection_name(model.version()),
        model.dim(),
        batches,
        &bar,
    )
    .await;
    if let Some(source) = failed {
        return Err(model_error(model, source));
    }
    let report = built?;
    tracing::info!(
        embed_secs,
        upsert_secs = report.upsert_secs,
        finalize_secs = report.finalize_secs,
        "catalog indexed"
    );
    Ok(())
}

fn count_interactions(dir: &Path) -> Result<HashMap<ItemId, f32>, LoadError> {
    let mut counts = HashMap::new();
    let Ok(file) = crate::data::find_file(dir, "interactions") else {
        return Ok(counts);
    };
    crate::data::for_each_interaction(&file, |i| {
        *counts.entry(i.item_id).or_insert(0.0) += 1.0;
        Ok(())
    })?;
    Ok(counts)
}

fn model_error(model: &TwoTower, source: ModelError) -> LoadError {
    LoadError::Model {
        version: model.version().to_string(),
        source: Box::new(source),
    }
}
