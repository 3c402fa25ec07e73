//! What every handler shares, and how it is built from `Settings` at start-up.

use crate::arms::Arms;
use crate::catalog::Catalog;
use crate::cluster::{Bus, Change, ClusterError};
use crate::config::experiments::pinned_models;
use crate::config::{Experiment, Settings};
use crate::degrade::{Budgets, GuardedIndex, GuardedSession};
use crate::experiment::Experiments;
use crate::index::{IndexError, VectorIndex};
use crate::items::load::{journal_path, LoadError};
use crate::items::{CatalogJournal, ItemWriter};
use crate::lifecycle::{Lifecycle, LifecycleError};
use crate::model::{ModelError, TwoTower};
use crate::pipeline::{self, Recommender};
use crate::registry::Registry;
use crate::session::{SessionError, SessionStore, UserStore};
use arc_swap::ArcSwap;
use futures::FutureExt;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::Semaphore;

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
    #[error("{0}")]
    Load(#[from] LoadError),
    #[error("the index holds {index}-d vectors but model {model_version} makes {model}-d ones; re-run `tandem index` with this model")]
    DimMismatch {
        index: usize,
        model: usize,
        model_version: String,
    },
    #[error("model registry: {0}")]
    Lifecycle(#[from] LifecycleError),
    #[error("the registry's active model {version} has no checkpoint folder {dir}: restore the folder (or mount the model store); tandem does not fall back to model_path, which would serve another model marked active")]
    MissingActiveModel { version: String, dir: String },
    #[error("{0}")]
    Cluster(#[from] ClusterError),
    #[error("server: {0}")]
    Io(std::io::Error),
}

/// What `AppState::build` opened, before it is assembled into a state.
struct Opened {
    settings: Settings,
    model: TwoTower,
    index: Arc<dyn VectorIndex>,
    sessions: Arc<dyn SessionStore>,
    users: Arc<dyn UserStore>,
    catalog: Arc<Catalog>,
    registry: Arc<Registry>,
    /// The directory `model` was loaded from (the registry adopts it if it does not know it
    /// yet).
    model_source: PathBuf,
    journal: Option<Arc<CatalogJournal>>,
    bus: Option<Arc<Bus>>,
}

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    /// The serving model; a new checkpoint is activated by storing into it.
    pub model: Arc<ArcSwap<TwoTower>>,
    pub index: Arc<dyn VectorIndex>,
    pub sessions: Arc<dyn SessionStore>,
    /// The Gorse edge's users and feedback records, in the session store's backend.
    pub users: Arc<dyn UserStore>,
    pub catalog: Arc<Catalog>,
    /// The catalog's write path (`POST`, `PATCH`, `DELETE /v1/items`).
    pub items: Arc<ItemWriter>,
    pub recommender: Arc<Recommender>,
    pub limiter: Arc<Semaphore>,
    /// Live request and cache figures for `GET /v1/stats`.
    pub stats: Arc<super::stats::ServerStats>,
    /// Registered models, activation and rollback (the admin API).
    pub lifecycle: Arc<Lifecycle>,
    /// A/B assignment and outcome counting.
    pub experiments: Arc<Experiments>,
    /// The replicas' shared stream, when this server is one of several (`Settings::shared`).
    pub bus: Option<Arc<Bus>>,
    /// The offline retrain loop (`POST /admin/retrain` and the `[retrain] every` schedule).
    pub retrain: Arc<crate::retrain::Retrainer>,
    /// The task following the other replicas' changes; stopped with the server.
    pub follower: Arc<parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl AppState {
    /// Loads the model, opens the index and the session store, and loads the catalog (see
    /// `items::load`). With replicas (`Settings::shared`) the registry, the experiments and
    /// the catalog come from the shared Redis and Qdrant, and the replica follows the other
    /// replicas' changes from the moment its load began.
    pub async fn build(settings: Settings) -> Result<Self, ServeError> {
        let started = std::time::Instant::now();
        // One process reads its catalog file while the index opens (at 1M items each takes
        // seconds); replicas load theirs from the shared collection.
        let catalog_file = (!settings.shared())
            .then(|| crate::items::load::CatalogFile::read(&settings.server.catalog_dir));
        let bus = match settings.shared() {
            true => Some(Bus::connect(&settings).await?),
            false => None,
        };
        let store = settings.registry.model_store(&settings.data_dir);
        let keep = settings.registry.keep_last;
        let registry = Arc::new(
            match &bus {
                Some(bus) => Registry::open_shared(&store, keep, bus.clone()),
                None => Registry::open(&store, keep),
            }
            .map_err(LifecycleError::from)?,
        );
        // After an activation the registry's active version is what serves, across restarts
        // and on every replica; `model_path` is the first model only.
        // A registry whose active version has no checkpoint folder (a lost volume, a folder
        // removed by hand) stops the start-up: falling back to `model_path` would serve
        // another model and mark it active over the live collection.
        let model_path = match registry.active() {
            Some(active) => {
                let dir = registry.model_dir(&active.version);
                if !dir.is_dir() {
                    return Err(ServeError::MissingActiveModel {
                        version: active.version,
                        dir: dir.display().to_string(),
                    });
                }
                tracing::info!(
                    version = active.version,
                    "serving the registry's active model"
                );
                dir
            }
            None => settings.model_path.clone(),
        };
        let model = TwoTower::load(&model_path).map_err(|e| ServeError::Model {
            path: model_path.display().to_string(),
            source: Box::new(e),
        })?;
        tracing::info!(version = model.version(), dim = model.dim(), "model loaded");
        crate::telemetry::startup_stage("model", started);
        let stage = std::time::Instant::now();
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
        crate::telemetry::startup_stage("index opened", stage);
        let (sessions, users) = crate::session::open_with_users(&settings).await?;
        let sessions: Arc<dyn SessionStore> = Arc::new(GuardedSession::new(
            sessions,
            guard_budgets(&settings, settings.server.session_budget_ms),
        ));
        let catalog_dir = settings.server.catalog_dir.clone();
        let (catalog, journal, follow_from) = match &bus {
            Some(bus) => {
                // Taken before the load: changes made while it runs are applied after it.
                let from = bus.head().await?;
                let collection = registry
                    .active()
                    .filter(|a| a.version == model.version())
                    .and_then(|a| a.collection);
                let catalog = crate::items::load::load_shared(
                    index.as_ref(),
                    &model,
                    &catalog_dir,
                    bus,
                    collection.as_deref(),
                )
                .await?;
                (catalog, None, Some(from))
            }
            None => {
                let journal = CatalogJournal::new(journal_path(&settings.data_dir));
                let file = catalog_file
                    .unwrap_or_else(|| crate::items::load::CatalogFile::read(&catalog_dir));
                let catalog = crate::items::load::load_local_from(
                    index.as_ref(),
                    &model,
                    &catalog_dir,
                    &journal,
                    file,
                )
                .await?;
                (catalog, Some(Arc::new(journal)), None)
            }
        };
        crate::telemetry::startup_stage("sessions and catalog", stage);
        if let Some(entry) = catalog.any() {
            if entry.vector.len() != model.dim() {
                return Err(ServeError::DimMismatch {
                    index: entry.vector.len(),
                    model: model.dim(),
                    model_version: model.version().to_string(),
                });
            }
        }
        let mut settings = settings;
        if let Some(bus) = &bus {
            // The experiments an admin set on any replica outlive the configured ones.
            if let Some(shared) = bus
                .get_json::<Vec<Experiment>>(&bus.keys().experiments)
                .await?
            {
                settings.experiments = shared;
            }
        }
        let state = Self::assemble(Opened {
            settings,
            model,
            index,
            sessions,
            users,
            catalog: Arc::new(catalog),
            registry,
            model_source: model_path,
            journal,
            bus,
        })
        .await?;
        if let Some(from) = follow_from {
            state.follow_replicas(from);
        }
        crate::telemetry::startup_stage("whole start-up", started);
        Ok(state)
    }

    /// Assembles a state from what `build` opened.
    async fn assemble(opened: Opened) -> Result<Self, ServeError> {
        let Opened {
            settings,
            model,
            index,
            sessions,
            users,
            catalog,
            registry,
            model_source,
            journal,
            bus,
        } = opened;
        let model = Arc::new(ArcSwap::from_pointee(model));
        let experiments = Arc::new(Experiments::new(
            settings.experiments.clone(),
            sessions.clone(),
            settings.rerank.clone(),
        ));
        experiments.spawn_flusher();
        let arms = Arc::new(Arms::new(index.clone()));
        let recommender = Arc::new(Recommender::new(pipeline::Parts {
            model: model.clone(),
            index: index.clone(),
            sessions: sessions.clone(),
            catalog: catalog.clone(),
            settings: settings.server.clone(),
            boosts: settings.boosts.clone(),
            experiments: experiments.clone(),
            arms: arms.clone(),
        }));
        let lifecycle = Arc::new(
            Lifecycle::start(
                registry,
                model.clone(),
                index.clone(),
                catalog.clone(),
                arms.clone(),
                &model_source,
                bus.clone(),
            )
            .await?,
        );
        // The configured experiments' models serve from the first request.
        lifecycle.pin(pinned_models(&experiments.list())).await;
        let items = Arc::new(ItemWriter {
            index: index.clone(),
            catalog: catalog.clone(),
            model: model.clone(),
            arms,
            journal,
            bus: bus.clone(),
        });
        Ok(AppState {
            limiter: Arc::new(Semaphore::new(settings.server.max_concurrency)),
            settings: Arc::new(settings),
            model,
            index,
            sessions,
            users,
            catalog,
            items,
            recommender,
            lifecycle,
            experiments,
            stats: Arc::new(super::stats::ServerStats::new()),
            bus,
            retrain: Arc::default(),
            follower: Arc::default(),
        })
    }

    /// What the retrain loop reads and changes (`crate::retrain`, which knows nothing of HTTP).
    pub fn retrain_parts(&self) -> crate::retrain::Serving {
        crate::retrain::Serving {
            settings: self.settings.clone(),
            model: self.model.clone(),
            sessions: self.sessions.clone(),
            catalog: self.catalog.clone(),
            lifecycle: self.lifecycle.clone(),
            experiments: self.experiments.clone(),
            bus: self.bus.clone(),
            retrain: self.retrain.clone(),
        }
    }

    /// Experiments another replica set: their models first, as `PUT /admin/experiments`
    /// does.
    async fn apply_experiments(&self, set: Vec<Experiment>) {
        if let Err(e) = crate::config::experiments::validate(&set) {
            tracing::error!(error = %e, "experiments from the shared store do not validate; keeping the current ones");
            return;
        }
        self.lifecycle.pin(pinned_models(&set)).await;
        self.experiments.replace(set);
    }

    /// Follows the other replicas' changes from stream id `from`: catalog writes, the
    /// registry (the active model) and the experiments. When nothing arrives for a second
    /// the registry is checked anyway, so a missed announcement cannot leave a replica on
    /// an old model.
    fn follow_replicas(&self, from: String) {
        let Some(bus) = self.bus.clone() else { return };
        let me = self.clone();
        let idle = self.clone();
        let task = bus.follow(
            from,
            move |batch| {
                let s = me.clone();
                async move {
                    s.items.apply_remote(&batch).await;
                    if batch.iter().any(|d| matches!(d.change, Change::Registry)) {
                        s.lifecycle.follow().await;
                    }
                    if batch.iter().any(|d| {
                        matches!(d.change, Change::Experiments)
                            && Some(d.origin.as_str()) != s.bus.as_ref().map(|b| b.origin())
                    }) {
                        s.follow_experiments().await;
                    }
                }
                .boxed()
            },
            move || {
                let s = idle.clone();
                async move { s.lifecycle.follow().await }.boxed()
            },
        );
        *self.follower.lock() = Some(task);
    }

    async fn follow_experiments(&self) {
        let Some(bus) = &self.bus else { return };
        match bus
            .get_json::<Vec<Experiment>>(&bus.keys().experiments)
            .await
        {
            Ok(Some(set)) => {
                tracing::info!(
                    experiments = set.len(),
                    "experiments changed on another replica"
                );
                self.apply_experiments(set).await;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "reading the shared experiments"),
        }
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
