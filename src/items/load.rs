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
use crate::catalog::{Catalog, CatalogEntry, CatalogError, LoadReport, Loader, LOAD_BATCH};
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
    let file = CatalogFile::read(catalog_dir);
    load_local_from(index, model, catalog_dir, journal, file).await
}

/// [`load_local`] with the catalog file's read under way already (the server starts it
/// before it opens the index: at 1M items each takes seconds).
pub async fn load_local_from(
    index: &dyn VectorIndex,
    model: &TwoTower,
    catalog_dir: &Path,
    journal: &CatalogJournal,
    mut file: CatalogFile,
) -> Result<Catalog, LoadError> {
    let stage = Instant::now();
    replay_unflushed(journal, index, model).await?;
    crate::telemetry::startup_stage("journal replay", stage);
    let stage = Instant::now();
    let mut added = Added::new(journal.read()?);
    if !added.is_empty() {
        tracing::info!(items = added.len(), "replaying items added through the API");
    }
    crate::telemetry::startup_stage("journal read", stage);
    let started = Instant::now();
    let mut logged = 0;
    let mut progress = |done: usize| {
        if done >= logged + 100_000 {
            logged = done;
            tracing::info!(done, "loading the catalog");
        }
    };
    let (catalog, report, total) = match index.count().await {
        Ok(0) | Err(IndexError::NoActiveVersion) => {
            // A first start: the whole catalog is embedded and indexed, then loaded.
            let mut items = file.all().await?;
            added.replace_in(&mut items);
            items.extend(added.rest());
            if !items.is_empty() {
                let stage = Instant::now();
                index_catalog(index, model, &items, catalog_dir).await?;
                crate::telemetry::startup_stage("catalog indexed", stage);
            }
            let total = items.len();
            let (catalog, report) = Catalog::load(items, index, |done, _| progress(done)).await?;
            (catalog, report, total)
        }
        Ok(points) => {
            // A restart: each batch of the file is paired with the index as it is read.
            let mut loader = Loader::with_capacity(points);
            while let Some(mut batch) = file.next().await? {
                added.replace_in(&mut batch);
                loader.add(batch, index).await?;
                progress(loader.done());
            }
            let rest = added.rest();
            if !rest.is_empty() {
                loader.add(rest, index).await?;
            }
            let total = loader.done();
            let (catalog, report) = loader.finish();
            (catalog, report, total)
        }
        Err(e) => return Err(e.into()),
    };
    log_loaded(report, total, started);
    crate::telemetry::startup_stage("catalog loaded", started);
    Ok(catalog)
}

/// The catalog file, read on a thread of its own and handed over in batches as they are
/// read, so that a restart pairs the first batches with the index while the file's end is
/// still being parsed (issue 37).
pub struct CatalogFile {
    batches: tokio::sync::mpsc::UnboundedReceiver<Result<Vec<Item>, LoadError>>,
}

impl CatalogFile {
    /// Starts reading the catalog file of `dir` (none when no dir is configured).
    pub fn read(dir: &Path) -> Self {
        let (tx, batches) = tokio::sync::mpsc::unbounded_channel();
        let failed = tx.clone();
        let reader = {
            let dir = dir.to_path_buf();
            move || {
                let stage = Instant::now();
                let mut batch = Vec::with_capacity(LOAD_BATCH);
                let read = for_each_catalog_item(&dir, |item| {
                    batch.push(item);
                    if batch.len() == LOAD_BATCH {
                        // A closed channel means the start-up failed elsewhere: the rest is
                        // not needed, and reading on is harmless.
                        let _ = tx.send(Ok(std::mem::replace(
                            &mut batch,
                            Vec::with_capacity(LOAD_BATCH),
                        )));
                    }
                });
                match read {
                    Ok(()) if batch.is_empty() => {}
                    read => {
                        let _ = tx.send(read.map(|()| batch));
                    }
                }
                crate::telemetry::startup_stage("catalog file read", stage);
            }
        };
        if let Err(e) = std::thread::Builder::new()
            .name("catalog-file".into())
            .spawn(reader)
        {
            let _ = failed.send(Err(LoadError::Data(DataError::Io {
                file: dir.to_path_buf(),
                source: e,
            })));
        }
        CatalogFile { batches }
    }

    /// The next batch, `None` after the last; the file's error, if it has one, in place of
    /// the batch where the read stopped.
    pub async fn next(&mut self) -> Result<Option<Vec<Item>>, LoadError> {
        self.batches.recv().await.transpose()
    }

    /// Every item of the file.
    pub async fn all(&mut self) -> Result<Vec<Item>, LoadError> {
        let mut items = Vec::new();
        while let Some(batch) = self.next().await? {
            items.extend(batch);
        }
        Ok(items)
    }
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

/// The items added through the API (the journal), each in place of the catalog file's item
/// with its id, or after the file's items; a later line for an id replaces the earlier one.
struct Added {
    at: HashMap<ItemId, usize>,
    /// Each id's latest item, and whether the file had the id.
    items: Vec<(Item, bool)>,
}

impl Added {
    fn new(lines: Vec<Item>) -> Self {
        let mut added = Added {
            at: HashMap::new(),
            items: Vec::new(),
        };
        for item in lines {
            match added.at.get(&item.item_id) {
                Some(&i) => added.items[i].0 = item,
                None => {
                    added.at.insert(item.item_id.clone(), added.items.len());
                    added.items.push((item, false));
                }
            }
        }
        added
    }

    fn len(&self) -> usize {
        self.items.len()
    }

    fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Puts the added items in place of the file's items with their ids.
    fn replace_in(&mut self, file: &mut [Item]) {
        if self.at.is_empty() {
            return;
        }
        for item in file {
            if let Some(&i) = self.at.get(&item.item_id) {
                *item = self.items[i].0.clone();
                self.items[i].1 = true;
            }
        }
    }

    /// The added items whose ids the file did not have.
    fn rest(&mut self) -> Vec<Item> {
        self.at.clear();
        std::mem::take(&mut self.items)
            .into_iter()
            .filter(|(_, in_file)| !in_file)
            .map(|(item, _)| item)
            .collect()
    }
}

/// Calls `f` with each item of a data dir's catalog file; none when no dir is configured.
fn for_each_catalog_item(dir: &Path, mut f: impl FnMut(Item)) -> Result<(), LoadError> {
    if dir.as_os_str().is_empty() {
        tracing::warn!("server.catalog_dir is not set: the catalog starts empty; add items with POST /v1/items");
        return Ok(());
    }
    let file = crate::data::find_file(dir, "items")?;
    crate::data::for_each_item(&file, |item| {
        f(item);
        Ok(())
    })?;
    Ok(())
}

/// The items of a data dir's catalog file; none when no dir is configured.
pub fn read_catalog(dir: &Path) -> Result<Vec<Item>, LoadError> {
    let mut items = Vec::new();
    for_each_catalog_item(dir, |item| items.push(item))?;
    Ok(items)
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
