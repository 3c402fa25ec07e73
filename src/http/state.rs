//! What every handler shares, and how it is built from `Settings` at start-up.

use crate::arms::Arms;
use crate::catalog::{Catalog, CatalogError, CatalogJournal};
use crate::config::{Settings, CONTROL_VARIANT};
use crate::data::DataError;
use crate::degrade::{Budgets, GuardedIndex, GuardedSession};
use crate::domain::{Item, ItemId, SessionId, UserId};
use crate::experiment::{Assignment, Experiments};
use crate::index::{IndexError, IndexPoint, Payload, VectorIndex};
use crate::lifecycle::{Lifecycle, LifecycleError};
use crate::model::{ModelError, TwoTower};
use crate::pipeline::Recommender;
use crate::registry::Registry;
use crate::session::{SessionError, SessionStore};
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Semaphore;

/// Items embedded per item-tower call when the server indexes its catalog itself.
const EMBED_BATCH: usize = 1_024;
/// How often buffered item upserts are flushed to the index. Under load at 1M items a flush
/// took 15-60 ms (strace of the engine's writer thread), and every item write waits behind
/// it, so once a second put a few percent of upserts behind one. The journal keeps the
/// writes durable meanwhile, and a restart re-embeds at most this much of it.
const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("loading the model from {path}: {source}")]
    Model {
        path: String,
        #[source]
        source: Box<ModelError>,
    },
    #[error("opening the index: {0}")]
    Index(#[from] IndexError),
    #[error("opening the session store: {0}")]
    Session(#[from] SessionError),
    #[error("reading the catalog: {0}")]
    Data(#[from] DataError),
    #[error("loading the catalog: {0}")]
    Catalog(#[from] CatalogError),
    #[error("the index holds {index}-d vectors but model {model_version} makes {model}-d ones; re-run `tandem index` with this model")]
    DimMismatch {
        index: usize,
        model: usize,
        model_version: String,
    },
    #[error("model registry: {0}")]
    Lifecycle(#[from] LifecycleError),
    #[error("server: {0}")]
    Io(std::io::Error),
}

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    /// The serving model; a new checkpoint is activated by storing into it.
    pub model: Arc<ArcSwap<TwoTower>>,
    pub index: Arc<dyn VectorIndex>,
    pub sessions: Arc<dyn SessionStore>,
    pub catalog: Arc<Catalog>,
    /// Items added through the API, replayed into the catalog at start-up.
    pub journal: Arc<CatalogJournal>,
    pub recommender: Arc<Recommender>,
    pub limiter: Arc<Semaphore>,
    /// Live request and cache figures for `GET /v1/stats`.
    pub stats: Arc<super::stats::ServerStats>,
    /// Registered models, activation and rollback (the admin API).
    pub lifecycle: Arc<Lifecycle>,
    /// A/B assignment and outcome counting.
    pub experiments: Arc<Experiments>,
}

impl AppState {
    /// Loads the model, opens the index and the session store, and loads the catalog. When
    /// the index is empty and a catalog dir is configured, the catalog is embedded and indexed
    /// first (the embedded demo and the tests start this way).
    pub async fn build(settings: Settings) -> Result<Self, ServeError> {
        let registry = Arc::new(
            Registry::open(&settings.data_dir, settings.registry.keep_last)
                .map_err(LifecycleError::from)?,
        );
        // After an activation the registry's active version is what serves, across restarts;
        // `model_path` is the first model only.
        let model_path = match registry.active() {
            Some(active) if registry.model_dir(&active.version).is_dir() => {
                tracing::info!(
                    version = active.version,
                    "serving the registry's active model"
                );
                registry.model_dir(&active.version)
            }
            _ => settings.model_path.clone(),
        };
        let model = TwoTower::load(&model_path).map_err(|e| ServeError::Model {
            path: model_path.display().to_string(),
            source: Box::new(e),
        })?;
        tracing::info!(version = model.version(), dim = model.dim(), "model loaded");
        crate::telemetry::set_model_version(model.version());
        // Budgets and circuit breakers in front of both dependencies: a slow or absent Redis
        // or Qdrant then degrades answers instead of failing or stalling them.
        let index: Arc<dyn VectorIndex> = Arc::new(GuardedIndex::new(
            crate::index::open(&settings, &settings.data_dir).await?,
            // Index writes (item upserts) may take longer than a read; they get the whole
            // request's budget.
            Budgets {
                write: std::time::Duration::from_millis(settings.server.request_timeout_ms),
                ..guard_budgets(&settings, settings.server.index_budget_ms)
            },
        ));
        let sessions: Arc<dyn SessionStore> = Arc::new(GuardedSession::new(
            crate::session::open(&settings).await?,
            guard_budgets(&settings, settings.server.session_budget_ms),
        ));
        let journal = CatalogJournal::new(journal_path(&settings));
        replay_unflushed(&journal, index.as_ref(), &model).await?;
        let mut items = read_catalog(&settings.server.catalog_dir)?;
        let added = journal.read()?;
        if !added.is_empty() {
            tracing::info!(items = added.len(), "replaying items added through the API");
            items = merge_items(items, added);
        }
        if !items.is_empty() && index_is_empty(index.as_ref()).await? {
            index_catalog(index.as_ref(), &model, &items, &settings.server.catalog_dir).await?;
        }
        let started = Instant::now();
        let total = items.len();
        let (catalog, report) = Catalog::load(items, index.as_ref(), |done, total| {
            if done % 100_000 < 2_000 || done == total {
                tracing::info!(done, total, "loading the catalog");
            }
        })
        .await?;
        if let Some(entry) = catalog.any() {
            if entry.vector.len() != model.dim() {
                return Err(ServeError::DimMismatch {
                    index: entry.vector.len(),
                    model: model.dim(),
                    model_version: model.version().to_string(),
                });
            }
        }
        tracing::info!(
            loaded = report.loaded,
            missing_from_index = report.missing_from_index,
            of = total,
            secs = started.elapsed().as_secs_f64(),
            "catalog loaded"
        );
        Self::from_parts(
            settings,
            model,
            index,
            sessions,
            Arc::new(catalog),
            registry,
            &model_path,
        )
        .await
    }

    /// Assembles a state from parts that are already open; `model_source` is the directory
    /// `model` was loaded from (the registry adopts it if it does not know it yet).
    pub async fn from_parts(
        settings: Settings,
        model: TwoTower,
        index: Arc<dyn VectorIndex>,
        sessions: Arc<dyn SessionStore>,
        catalog: Arc<Catalog>,
        registry: Arc<Registry>,
        model_source: &Path,
    ) -> Result<Self, ServeError> {
        let model = Arc::new(ArcSwap::from_pointee(model));
        let experiments = Arc::new(Experiments::new(
            settings.experiments.clone(),
            sessions.clone(),
            settings.rerank.clone(),
        ));
        experiments.spawn_flusher();
        let arms = Arc::new(Arms::new(index.clone()));
        let recommender = Arc::new(Recommender::new(
            model.clone(),
            index.clone(),
            sessions.clone(),
            catalog.clone(),
            settings.server.clone(),
            experiments.rerank_handle(),
            arms.clone(),
        ));
        let lifecycle = Arc::new(
            Lifecycle::start(
                registry,
                model.clone(),
                index.clone(),
                catalog.clone(),
                arms,
                model_source,
            )
            .await?,
        );
        // The configured experiments' models serve from the first request.
        lifecycle
            .pin(crate::experiment::pinned_models(&experiments.list()))
            .await;
        Ok(AppState {
            limiter: Arc::new(Semaphore::new(settings.server.max_concurrency)),
            journal: Arc::new(CatalogJournal::new(journal_path(&settings))),
            settings: Arc::new(settings),
            model,
            index,
            sessions,
            catalog,
            recommender,
            lifecycle,
            experiments,
            stats: Arc::new(super::stats::ServerStats::new()),
        })
    }

    /// The experiment arm of a request: the one place a variant is chosen. Without a running
    /// experiment (or an id to hash) it is control.
    pub fn choose_variant(&self, user: Option<&UserId>, session: Option<&SessionId>) -> String {
        self.assign(user, session)
            .map(|a| a.variant)
            .unwrap_or_else(|| CONTROL_VARIANT.to_string())
    }

    /// The full assignment, for handlers that count the response as an impression.
    pub fn assign(&self, user: Option<&UserId>, session: Option<&SessionId>) -> Option<Assignment> {
        self.experiments.assign(user, session)
    }
}

fn guard_budgets(settings: &Settings, read_ms: u64) -> Budgets {
    let ms = std::time::Duration::from_millis;
    let server = &settings.server;
    Budgets {
        read: ms(read_ms),
        write: ms(server.write_budget_ms),
        cooldown: ms(server.breaker_cooldown_ms),
    }
}

fn journal_path(settings: &Settings) -> std::path::PathBuf {
    settings.data_dir.join("catalog").join("items-added.jsonl")
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

fn read_catalog(dir: &Path) -> Result<Vec<Item>, ServeError> {
    if dir.as_os_str().is_empty() {
        tracing::warn!("server.catalog_dir is not set: the catalog starts empty; add items with POST /v1/items");
        return Ok(Vec::new());
    }
    let file = crate::data::find_file(dir, "items")?;
    Ok(crate::data::read_items(&file)?)
}

/// Item upserts acknowledged before the process stopped whose index write may not have been
/// flushed (the journal past its flush mark, see [`CatalogJournal`]): embedded and written to
/// the index again, durably. On an empty index there is nothing to repair: the whole
/// catalog, journal included, is indexed next.
async fn replay_unflushed(
    journal: &CatalogJournal,
    index: &dyn VectorIndex,
    model: &TwoTower,
) -> Result<(), ServeError> {
    let (pending, end) = journal.unflushed()?;
    if pending.is_empty() || index_is_empty(index).await? {
        return Ok(());
    }
    tracing::info!(
        items = pending.len(),
        "replaying item upserts that may not have reached the index before the last stop"
    );
    let mut points = Vec::with_capacity(pending.len());
    for chunk in pending.chunks(EMBED_BATCH) {
        let items: Vec<Item> = chunk.iter().map(|(i, _)| i.clone()).collect();
        let vectors = model.embed_items(&items).map_err(|e| ServeError::Model {
            path: model.version().to_string(),
            source: Box::new(e),
        })?;
        for ((item, popularity), vector) in chunk.iter().zip(vectors) {
            points.push(IndexPoint {
                vector,
                payload: Payload::of(item, *popularity),
            });
        }
    }
    index.upsert(points).await?;
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

async fn index_is_empty(index: &dyn VectorIndex) -> Result<bool, ServeError> {
    match index.count().await {
        Ok(n) => Ok(n == 0),
        Err(IndexError::NoActiveVersion) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

/// Embeds the catalog with the item tower and builds a new live collection version from it,
/// with popularity counted from the catalog dir's interactions (when there are any). Used at
/// start-up on an empty index and by `tandem index`. If it fails midway the live version is
/// unchanged (see `index::build_version`).
pub async fn index_catalog(
    index: &dyn VectorIndex,
    model: &TwoTower,
    items: &[Item],
    dir: &Path,
) -> Result<(), ServeError> {
    tracing::info!(
        items = items.len(),
        "the index is empty: indexing the catalog"
    );
    let popularity = count_interactions(dir)?;
    let mut points = Vec::with_capacity(items.len());
    for (n, chunk) in items.chunks(EMBED_BATCH).enumerate() {
        let vectors = model.embed_items(chunk).map_err(|e| ServeError::Model {
            path: model.version().to_string(),
            source: Box::new(e),
        })?;
        for (item, vector) in chunk.iter().zip(vectors) {
            let popularity = popularity.get(&item.item_id).copied().unwrap_or(0.0);
            points.push(IndexPoint {
                vector,
                payload: Payload::of(item, popularity),
            });
        }
        if (n + 1) % 100 == 0 {
            tracing::info!(
                embedded = points.len(),
                of = items.len(),
                "embedding the catalog"
            );
        }
    }
    let version = format!(
        "{}-{}",
        model.version(),
        chrono::Utc::now().format("%Y%m%dT%H%M%S")
    );
    let bar = indicatif::ProgressBar::new(points.len() as u64);
    crate::index::build_version(index, &version, model.dim(), points.into_iter(), &bar).await?;
    Ok(())
}

fn count_interactions(dir: &Path) -> Result<HashMap<ItemId, f32>, ServeError> {
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
