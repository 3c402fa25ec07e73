//! Model activation and rollback with zero downtime: the one place where the registry, the
//! serving model handle, the index and the catalog change together.
//!
//! Activation embeds the catalog with the new model's item tower into a new collection
//! version (in the background, with progress), switches the index alias, then swaps the
//! model handle (`ArcSwap`): a request holds the `Arc` it loaded, so requests in flight
//! finish on the old model. Writes that landed during the build are replayed into the new
//! collection, and the catalog's vectors are moved to the new model's space. The old
//! collection is kept, so a rollback is an alias switch and a handle swap, with no
//! re-embedding.
//!
//! With several replicas the registry is shared (see `cluster`): the replica that is asked
//! to activate or roll back does the work above, and every other one follows
//! ([`Lifecycle::follow`]): it loads the version the registry now names as active from the
//! model store, swaps its model handle, and moves its catalog to that collection's vectors,
//! without writing anything. Each replica searches the collection of the model it holds
//! ([`Arms::collection_of`]), so the moment between the alias switch and its own swap is
//! served by the old model from the old collection.
//!
//! A version can also be prepared: its collection is built without switching to it, so that
//! an experiment can serve it beside the active model ([`crate::arms`]). The versions that
//! enabled experiments pin keep their collections, and every switch re-derives which of them
//! serve as arms (all but the active one).

use crate::arms::{Arm, Arms};
use crate::catalog::{Catalog, CatalogEntry};
use crate::domain::ItemId;
use crate::index::{IndexError, IndexPoint, Vector, VectorIndex};
use crate::model::{ModelError, TwoTower};
use crate::registry::{ModelRecord, ModelStatus, Progress, Registry, RegistryError};
use arc_swap::ArcSwap;
use indicatif::{ProgressBar, ProgressDrawTarget};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Items per item-tower call while serving. The item tower and the per-request user tower
/// share candle's CPU thread pool, so a long bulk matmul makes every request wait behind it:
/// measured at 50k items on 2 cores, 1,024-item batches stalled requests past a 10 s timeout.
/// Small batches let request work interleave.
const EMBED_BATCH: usize = 64;
/// Catalog entries moved to their new vectors per lock after a switch (each lock holds
/// requests' catalog reads off for its length).
const VECTOR_CHUNK: usize = 2_000;
/// Items per index fetch while reconciling the catalog with a collection.
const FETCH_BATCH: usize = 2_000;
/// The background passes that follow a switch (moving the catalog to the new vectors,
/// reconciling it with a collection) pause this many times as long as each chunk took, so
/// they take at most a quarter of a core: they run while the new model already serves, and
/// requests' p99 matters more than how soon they finish (measured in BENCHMARKS.md: at half
/// a core, the p99 after a rollback at 1M was 2.75x the p99 before it).
const AFTER_SWITCH_PAUSE: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("model version {0:?} is already active")]
    AlreadyActive(String),
    #[error(
        "model version {0:?} already has a collection ({1}); an experiment can serve it as it is"
    )]
    AlreadyPrepared(String, String),
    #[error("{0} is in progress; try again when it has finished (see GET /admin/models)")]
    Busy(String),
    #[error("nothing to roll back to: no earlier active version with a kept collection")]
    NothingToRollBack,
    #[error("loading registered model {version}: {source}")]
    Model {
        version: String,
        #[source]
        source: Box<ModelError>,
    },
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("the server is shutting down; the background pass stopped")]
    ShuttingDown,
    #[error("the replicas' shared store: {0}")]
    Shared(String),
}

/// What `activate` did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ActivateOutcome {
    /// The catalog is being embedded in the background; watch `GET /admin/models`.
    Started,
    /// The version's collection was kept, so it is serving already.
    Switched,
}

/// A collection a background build made, with what the catalog held when it started.
struct Built {
    collection: String,
    snapshot: Vec<Arc<CatalogEntry>>,
    /// The new vectors by id, for the catalog to move to after a switch.
    fresh: HashMap<ItemId, Vector>,
}

struct Running {
    what: String,
    version: String,
    phase: Arc<Mutex<&'static str>>,
    embedded: Arc<AtomicU64>,
    total: u64,
    bar: ProgressBar,
    started_at: String,
}

/// Cheap to share behind an `Arc`; one activation or rollback runs at a time.
pub struct Lifecycle {
    registry: Arc<Registry>,
    model: Arc<ArcSwap<TwoTower>>,
    index: Arc<dyn VectorIndex>,
    catalog: Arc<Catalog>,
    /// Loaded models that are not serving (the rollback target), so a rollback never waits
    /// on disk.
    standby: Mutex<HashMap<String, Arc<TwoTower>>>,
    busy: Arc<tokio::sync::Mutex<()>>,
    running: Mutex<Option<Running>>,
    /// Models serving beside the active one, for experiments.
    arms: Arc<Arms>,
    /// The versions enabled experiments name (the active one among them serves as itself).
    pins: Mutex<Vec<String>>,
    /// Set when the server stops: the background passes end at their next chunk instead of
    /// holding the process (and the runtime's shutdown) for their remaining minute.
    stopping: Arc<AtomicBool>,
    /// The replicas' shared stream, when there are replicas (the switch lease).
    bus: Option<Arc<crate::cluster::Bus>>,
}

/// How long the cluster-wide switch lease lives without renewal (it is renewed while held).
const SWITCH_LEASE: std::time::Duration = std::time::Duration::from_secs(30);

/// Held while a switch runs (see [`Lifecycle::lock`]); released when dropped.
struct SwitchGuard {
    _local: tokio::sync::OwnedMutexGuard<()>,
    _lease: Option<crate::cluster::Lease>,
}

/// What a background build does when its collection is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    /// Switch to it (an activation).
    Switch,
    /// Keep it ready beside the live one (a preparation).
    Keep,
}

impl Lifecycle {
    /// Wires the lifecycle to the serving parts and records the model the server started
    /// with as active (with the live collection) if the registry does not know it yet.
    pub async fn start(
        registry: Arc<Registry>,
        model: Arc<ArcSwap<TwoTower>>,
        index: Arc<dyn VectorIndex>,
        catalog: Arc<Catalog>,
        arms: Arc<Arms>,
        model_source: &Path,
        bus: Option<Arc<crate::cluster::Bus>>,
    ) -> Result<Self, LifecycleError> {
        let live = match index.versions().await {
            Ok((_, live)) => live,
            Err(IndexError::NoActiveVersion) => None,
            Err(e) => return Err(e.into()),
        };
        registry.adopt_startup_model(&model.load(), model_source, live)?;
        let lifecycle = Lifecycle {
            registry,
            model,
            arms,
            index,
            catalog,
            standby: Mutex::new(HashMap::new()),
            busy: Arc::new(tokio::sync::Mutex::new(())),
            running: Mutex::new(None),
            pins: Mutex::new(Vec::new()),
            stopping: Arc::new(AtomicBool::new(false)),
            bus,
        };
        lifecycle.refresh_collections();
        Ok(lifecycle)
    }

    /// Tells the pipeline which collection each version's item tower filled.
    fn refresh_collections(&self) {
        self.arms.set_collections(
            self.registry
                .list()
                .into_iter()
                .filter_map(|m| Some((m.version, m.collection?)))
                .collect(),
        );
    }

    /// Another replica changed the shared registry (or it is time to check): serve the
    /// version it names as active. Loads the model from the model store, swaps the handle
    /// and moves the catalog to that collection's vectors in the background; writes nothing,
    /// since the replica that activated did. A version still being built is followed once it
    /// is active; if this replica is running a switch of its own, the next check retries.
    pub async fn follow(&self) {
        if let Err(e) = self.registry.reload() {
            tracing::warn!(error = %e, "re-reading the shared model registry");
            return;
        }
        self.refresh_collections();
        let Some(active) = self.registry.active() else {
            return;
        };
        let held = self.model.load().version().to_string();
        let Some(collection) = active.collection.clone() else {
            return;
        };
        if active.version == held {
            return;
        }
        let Ok(local) = self.lock_local() else {
            return;
        };
        let guard = SwitchGuard {
            _local: local,
            _lease: None,
        };
        let model = match self.load_model(&active.version).await {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(version = active.version, error = %e, "cannot load the model another replica activated; still serving {held}");
                return;
            }
        };
        self.arms.set_collection(model.version(), &collection);
        crate::telemetry::set_model_version(model.version());
        let previous = self.model.swap(model);
        self.standby
            .lock()
            .insert(previous.version().to_string(), previous);
        self.sync_arms().await;
        tracing::info!(
            version = active.version,
            previous = held,
            "serving the model another replica made active"
        );
        Reconciler {
            model: self.model.load_full(),
            index: self.index.clone(),
            catalog: self.catalog.clone(),
            arm: Some(collection),
            read_only: true,
            stopping: self.stopping.clone(),
        }
        .spawn(Some(guard));
    }

    /// Stops the background passes at their next chunk (the server is stopping). The next
    /// start rebuilds the catalog from the live collection; as after a crash, items written
    /// during an activation's build that its catch-up had not replayed yet are missing there.
    pub fn shut_down(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The models serving beside the active one.
    pub fn arms(&self) -> &Arc<Arms> {
        &self.arms
    }

    /// Why an experiment cannot serve `version`, if it cannot: it must be registered and
    /// have a collection (be active, or ready after an activation or a `prepare`).
    pub fn check_servable(&self, version: &str) -> Result<(), String> {
        let Some(m) = self.registry.get(version) else {
            return Err(format!("model version {version:?} is not registered"));
        };
        match (m.status, &m.collection) {
            (ModelStatus::Active, _) | (_, Some(_)) => Ok(()),
            (ModelStatus::Indexing, None) => Err(format!(
                "model version {version:?} is still being indexed; try again when GET /admin/models shows it ready"
            )),
            _ => Err(format!(
                "model version {version:?} has no index collection; build one with POST /admin/models/{version}/prepare (`tandem models prepare {version}`), then retry"
            )),
        }
    }

    /// Sets the versions enabled experiments serve: they keep their collections, and each
    /// one that is not active serves as an arm. An arm new to the set is reconciled with the
    /// catalog in the background (it may have missed writes while it was not serving).
    pub async fn pin(&self, versions: Vec<String>) {
        self.registry.set_pinned(versions.clone());
        *self.pins.lock() = versions;
        self.sync_arms().await;
    }

    /// Re-derives the arms from the pins and the active version.
    async fn sync_arms(&self) {
        let active = self.model.load().version().to_string();
        let pins = self.pins.lock().clone();
        let mut arms = Vec::new();
        for version in pins {
            if version == active || arms.iter().any(|a: &Arc<Arm>| a.model.version() == version) {
                continue;
            }
            let Some(collection) = self.registry.get(&version).and_then(|m| m.collection) else {
                tracing::warn!(version, "an experiment names a model without a collection; its variant gets the active model");
                continue;
            };
            if let Some(arm) = self
                .arms
                .get(&version)
                .filter(|a| a.collection == collection)
            {
                arms.push(arm);
                continue;
            }
            let model = match self.load_model(&version).await {
                Ok(m) => m,
                Err(e) => {
                    tracing::error!(version, error = %e, "cannot load an experiment's model; its variant gets the active model");
                    continue;
                }
            };
            self.standby.lock().insert(version.clone(), model.clone());
            let arm = Arc::new(Arm { model, collection });
            self.spawn_reconcile_arm(arm.clone());
            arms.push(arm);
        }
        let versions: Vec<&str> = arms.iter().map(|a| a.model.version()).collect();
        tracing::info!(active, arms = ?versions, "models serving");
        self.arms.set(arms);
    }

    /// The registered versions, with live progress on the one being activated.
    pub fn models(&self) -> Vec<ModelRecord> {
        let mut list = self.registry.list();
        if let Some(r) = self.running.lock().as_ref() {
            if let Some(m) = list.iter_mut().find(|m| m.version == r.version) {
                let phase = *r.phase.lock();
                let done = match phase {
                    "embedding" => r.embedded.load(Ordering::Relaxed),
                    _ => r.bar.position(),
                };
                m.progress = Some(Progress {
                    phase: phase.to_string(),
                    done,
                    total: r.total,
                    started_at: r.started_at.clone(),
                });
            }
        }
        list
    }

    /// Validates and registers a checkpoint directory, then applies keep-last-N.
    pub async fn register(&self, path: &Path) -> Result<ModelRecord, LifecycleError> {
        let registry = self.registry.clone();
        let path = path.to_path_buf();
        let (record, _) = tokio::task::spawn_blocking(move || registry.register(&path))
            .await
            .expect("register task does not panic")?;
        tracing::info!(version = record.version, "model registered");
        self.collect_garbage().await;
        Ok(record)
    }

    /// Starts activating `version`: an instant switch if its collection was kept, otherwise
    /// a background build. Fails at once if another activation or rollback is running.
    pub async fn activate(
        self: &Arc<Self>,
        version: &str,
    ) -> Result<ActivateOutcome, LifecycleError> {
        self.registry.reload()?;
        let record = self
            .registry
            .get(version)
            .ok_or_else(|| RegistryError::Unknown(version.to_string()))?;
        if record.status == ModelStatus::Active {
            return Err(LifecycleError::AlreadyActive(version.to_string()));
        }
        let guard = self.lock().await?;
        if let Some(collection) = record.collection.clone() {
            let model = self.load_model(version).await?;
            self.switch(model, &collection).await?;
            let dropped = self.registry.mark_active(version, Some(collection))?;
            self.refresh_collections();
            self.drop_collections(dropped).await;
            self.spawn_reconcile(guard);
            return Ok(ActivateOutcome::Switched);
        }
        self.start_build(guard, record, Then::Switch)?;
        Ok(ActivateOutcome::Started)
    }

    /// Builds `version`'s collection in the background without switching to it, so that an
    /// experiment can serve it beside the active model. Fails at once if another activation,
    /// preparation or rollback is running.
    pub async fn prepare(self: &Arc<Self>, version: &str) -> Result<ModelRecord, LifecycleError> {
        self.registry.reload()?;
        let record = self
            .registry
            .get(version)
            .ok_or_else(|| RegistryError::Unknown(version.to_string()))?;
        if record.status == ModelStatus::Active {
            return Err(LifecycleError::AlreadyActive(version.to_string()));
        }
        if let Some(c) = &record.collection {
            return Err(LifecycleError::AlreadyPrepared(
                version.to_string(),
                c.clone(),
            ));
        }
        let guard = self.lock().await?;
        self.start_build(guard, record, Then::Keep)?;
        Ok(self
            .models()
            .into_iter()
            .find(|m| m.version == version)
            .expect("a version being prepared is registered"))
    }

    /// Starts embedding and indexing the catalog for `record` in the background.
    fn start_build(
        self: &Arc<Self>,
        guard: SwitchGuard,
        record: ModelRecord,
        then: Then,
    ) -> Result<(), LifecycleError> {
        let version = record.version.clone();
        let total = self.catalog.len() as u64;
        let what = match then {
            Then::Switch => "activation",
            Then::Keep => "preparation",
        };
        let run = Running {
            what: format!("{what} of {version}"),
            version: version.clone(),
            phase: Arc::new(Mutex::new("loading")),
            embedded: Arc::new(AtomicU64::new(0)),
            total,
            bar: ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden()),
            started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        };
        let (phase, embedded, bar) = (run.phase.clone(), run.embedded.clone(), run.bar.clone());
        *self.running.lock() = Some(run);
        self.registry.update(&version, |m| {
            m.status = ModelStatus::Indexing;
            m.last_error = None;
        })?;
        let me = self.clone();
        let previous_status = record.status;
        tokio::spawn(async move {
            let started = Instant::now();
            let result = match then {
                Then::Switch => me.build_and_switch(&version, &phase, &embedded, &bar).await,
                Then::Keep => me.build_and_keep(&version, &phase, &embedded, &bar).await,
            };
            *me.running.lock() = None;
            match result {
                Ok(()) => tracing::info!(
                    version,
                    secs = started.elapsed().as_secs_f64(),
                    "model {}",
                    match then {
                        Then::Switch => "activated",
                        Then::Keep => "prepared",
                    }
                ),
                Err(e) => {
                    tracing::error!(version, error = %e, "{what} failed; the active model is unchanged");
                    let _ = me.registry.update(&version, |m| {
                        m.status = match previous_status {
                            ModelStatus::Retired => ModelStatus::Retired,
                            _ => ModelStatus::Registered,
                        };
                        m.progress = None;
                        m.last_error = Some(e.to_string());
                    });
                }
            }
            drop(guard);
        });
        Ok(())
    }

    /// Returns to the previously active version at once: alias switch and handle swap, no
    /// re-embedding. Returns the version now active.
    pub async fn rollback(&self) -> Result<ModelRecord, LifecycleError> {
        let guard = self.lock().await?;
        self.registry.reload()?;
        let target = self
            .registry
            .rollback_target()
            .ok_or(LifecycleError::NothingToRollBack)?;
        let collection = target
            .collection
            .clone()
            .ok_or(LifecycleError::NothingToRollBack)?;
        let model = self.load_model(&target.version).await?;
        self.switch(model, &collection).await?;
        self.registry.mark_rolled_back(&target.version)?;
        self.refresh_collections();
        tracing::info!(version = target.version, "rolled back");
        self.spawn_reconcile(guard);
        Ok(self
            .registry
            .get(&target.version)
            .expect("rollback target is registered"))
    }

    /// This process's switch lock, for following another replica's switch.
    fn lock_local(&self) -> Result<tokio::sync::OwnedMutexGuard<()>, LifecycleError> {
        self.busy.clone().try_lock_owned().map_err(|_| {
            LifecycleError::Busy(
                self.running
                    .lock()
                    .as_ref()
                    .map(|r| r.what.clone())
                    .unwrap_or_else(|| "another model switch".into()),
            )
        })
    }

    /// The lock a switch of this replica's own holds: this process's and, with replicas,
    /// the cluster-wide lease, so that two replicas never switch at once.
    async fn lock(&self) -> Result<SwitchGuard, LifecycleError> {
        let local = self.lock_local()?;
        let lease = match &self.bus {
            None => None,
            Some(bus) => match bus.hold(&bus.keys().lifecycle, SWITCH_LEASE).await {
                Ok(Some(lease)) => Some(lease),
                Ok(None) => {
                    return Err(LifecycleError::Busy(
                        "a model switch on another replica".into(),
                    ))
                }
                Err(e) => return Err(LifecycleError::Shared(e.to_string())),
            },
        };
        Ok(SwitchGuard {
            _local: local,
            _lease: lease,
        })
    }

    /// The alias first, then the handle: from here on new requests use the new model.
    async fn switch(&self, model: Arc<TwoTower>, collection: &str) -> Result<(), LifecycleError> {
        self.index.switch_to(collection).await?;
        self.arms.set_collection(model.version(), collection);
        crate::telemetry::set_model_version(model.version());
        let previous = self.model.swap(model);
        self.standby
            .lock()
            .insert(previous.version().to_string(), previous);
        self.sync_arms().await;
        Ok(())
    }

    async fn load_model(&self, version: &str) -> Result<Arc<TwoTower>, LifecycleError> {
        if let Some(m) = self.standby.lock().get(version) {
            return Ok(m.clone());
        }
        let dir = self.registry.model_dir(version);
        let m = tokio::task::spawn_blocking(move || TwoTower::load(&dir))
            .await
            .expect("model load does not panic")
            .map_err(|source| LifecycleError::Model {
                version: version.to_string(),
                source: Box::new(source),
            })?;
        Ok(Arc::new(m))
    }

    async fn build_and_switch(
        &self,
        version: &str,
        phase: &Mutex<&'static str>,
        embedded: &AtomicU64,
        bar: &ProgressBar,
    ) -> Result<(), LifecycleError> {
        let model = self.load_model(version).await?;
        let built = self
            .build(&model, Then::Switch, phase, embedded, bar)
            .await?;
        // The alias now points at the new collection; swap the model right behind it.
        self.arms.set_collection(model.version(), &built.collection);
        let previous = self.model.swap(model.clone());
        self.standby
            .lock()
            .insert(previous.version().to_string(), previous);
        // Serving the new model from here on, whatever happens next.
        let dropped = self.registry.mark_active(version, Some(built.collection))?;
        self.refresh_collections();
        self.sync_arms().await;
        *phase.lock() = "catching up";
        if let Err(e) = self.catch_up(&model, built.snapshot, built.fresh).await {
            tracing::error!(version, error = %e, "replaying catalog changes into the new collection");
        }
        self.drop_collections(dropped).await;
        self.collect_garbage().await;
        Ok(())
    }

    /// A preparation: the collection is built and kept ready, not switched to. Writes made
    /// during the build are caught up when it starts serving (as an arm or after a switch).
    async fn build_and_keep(
        &self,
        version: &str,
        phase: &Mutex<&'static str>,
        embedded: &AtomicU64,
        bar: &ProgressBar,
    ) -> Result<(), LifecycleError> {
        let model = self.load_model(version).await?;
        let Built {
            collection,
            snapshot,
            ..
        } = self.build(&model, Then::Keep, phase, embedded, bar).await?;
        // A million references to let go of: not on a runtime worker.
        off_runtime(move || drop(snapshot)).await;
        self.registry.mark_ready(version, collection)?;
        self.refresh_collections();
        self.sync_arms().await;
        Ok(())
    }

    /// Embeds the catalog with `model`'s item tower into a new collection version. For an
    /// activation the alias is switched to it when this returns.
    async fn build(
        &self,
        model: &Arc<TwoTower>,
        then: Then,
        phase: &Mutex<&'static str>,
        embedded: &AtomicU64,
        bar: &ProgressBar,
    ) -> Result<Built, LifecycleError> {
        let version = model.version();
        *phase.lock() = "embedding";
        let snapshot = off_runtime({
            let catalog = self.catalog.clone();
            move || catalog.entries()
        })
        .await;
        let mut points = Vec::with_capacity(snapshot.len());
        let mut last_log = Instant::now();
        for chunk in snapshot.chunks(EMBED_BATCH) {
            let batch_started = Instant::now();
            let batch =
                embed(model, chunk.to_vec())
                    .await
                    .map_err(|source| LifecycleError::Model {
                        version: version.to_string(),
                        source: Box::new(source),
                    })?;
            points.extend(batch);
            // Leave at least as much CPU to serving as the batch took: an activation may take
            // twice as long, but requests keep their latency.
            tokio::time::sleep(batch_started.elapsed()).await;
            let done =
                embedded.fetch_add(chunk.len() as u64, Ordering::Relaxed) + chunk.len() as u64;
            if last_log.elapsed().as_secs() >= 5 {
                last_log = Instant::now();
                tracing::info!(
                    version,
                    done,
                    total = snapshot.len(),
                    "embedding the catalog"
                );
            }
        }
        *phase.lock() = "indexing";
        let collection = crate::items::load::collection_name(version);
        // Keep the new vectors by id: the catalog moves to them after a switch. A million
        // entries take most of a second to copy and hash: not on a runtime worker.
        let (points, fresh) = off_runtime(move || {
            let fresh: HashMap<ItemId, Vector> = match then {
                Then::Switch => points
                    .iter()
                    .map(|p| (p.payload.item_id.clone(), p.vector.clone()))
                    .collect(),
                Then::Keep => HashMap::new(),
            };
            (points, fresh)
        })
        .await;
        let (index, dim, points) = (self.index.as_ref(), model.dim(), points.into_iter());
        match then {
            Then::Switch => {
                crate::index::build_version(index, &collection, dim, points, bar).await?;
            }
            Then::Keep => {
                crate::index::build_unswitched(index, &collection, dim, points, bar).await?;
            }
        }
        Ok(Built {
            collection,
            snapshot,
            fresh,
        })
    }

    /// After an activation's switch: moves unchanged catalog entries to their new vectors,
    /// and replays into the new collection what changed while it was being built (items
    /// added or patched through the API went to the old collection only).
    async fn catch_up(
        &self,
        model: &Arc<TwoTower>,
        snapshot: Vec<Arc<CatalogEntry>>,
        fresh: HashMap<ItemId, Vector>,
    ) -> Result<(), LifecycleError> {
        let catalog = self.catalog.clone();
        let stopping = self.stopping.clone();
        let (changed, deleted) =
            off_runtime(move || move_unchanged(&catalog, &snapshot, fresh, &stopping)).await?;
        if !deleted.is_empty() {
            self.index.delete(&deleted).await?;
        }
        self.reembed(model, changed).await
    }

    /// Embeds entries with `model` and upserts them into the live collection and catalog.
    async fn reembed(
        &self,
        model: &Arc<TwoTower>,
        entries: Vec<Arc<CatalogEntry>>,
    ) -> Result<(), LifecycleError> {
        for chunk in entries.chunks(EMBED_BATCH) {
            let vectors = embed(model, chunk.to_vec())
                .await
                .map(vectors_of)
                .map_err(|source| LifecycleError::Model {
                    version: model.version().to_string(),
                    source: Box::new(source),
                })?;
            self.index
                .upsert(points_now(&self.catalog, chunk, &vectors))
                .await?;
            self.catalog.set_vectors(chunk.iter().cloned().zip(vectors));
        }
        if !entries.is_empty() {
            tracing::info!(
                items = entries.len(),
                "replayed catalog changes into the live collection"
            );
        }
        Ok(())
    }

    /// After a switch to a kept collection (rollback or re-activation): the catalog takes
    /// that collection's vectors, and items written while it was not live are upserted.
    /// Holds the lifecycle lock until done so that no other switch interleaves.
    fn spawn_reconcile(&self, guard: SwitchGuard) {
        Reconciler {
            model: self.model.load_full(),
            index: self.index.clone(),
            catalog: self.catalog.clone(),
            arm: None,
            read_only: false,
            stopping: self.stopping.clone(),
        }
        .spawn(Some(guard));
    }

    /// An arm new to the set: its collection takes the writes it missed while not serving
    /// (items added or patched; items deleted are dropped by the business rules).
    fn spawn_reconcile_arm(&self, arm: Arc<Arm>) {
        Reconciler {
            model: arm.model.clone(),
            index: self.index.clone(),
            catalog: self.catalog.clone(),
            arm: Some(arm.collection.clone()),
            read_only: false,
            stopping: self.stopping.clone(),
        }
        .spawn(None);
    }

    async fn drop_collections(&self, collections: Vec<String>) {
        for c in collections {
            match self.index.drop_version(&c).await {
                Ok(()) => tracing::info!(collection = c, "dropped a retired collection"),
                Err(IndexError::UnknownVersion(_)) => {}
                Err(e) => tracing::warn!(collection = c, error = %e, "could not drop a collection"),
            }
        }
    }

    async fn collect_garbage(&self) {
        match self.registry.gc() {
            Ok(collections) => self.drop_collections(collections).await,
            Err(e) => tracing::warn!(error = %e, "model registry garbage collection failed"),
        }
        let keep: std::collections::HashSet<String> = self
            .registry
            .list()
            .into_iter()
            .filter(|m| m.collection.is_some())
            .map(|m| m.version)
            .collect();
        self.standby.lock().retain(|v, _| keep.contains(v));
    }
}

/// Brings a collection in line with the catalog: payload fields that differ are patched and
/// items it lacks are embedded and upserted. For the live collection (`arm: None`) the
/// catalog also moves to the collection's vectors; an arm's collection (`arm: Some`) serves
/// its own vectors and the catalog keeps the live ones.
///
/// `read_only`: a replica following another's switch. The catalog moves to the vectors of
/// collection `arm` (the new live one) and nothing is written: the replica that switched
/// reconciles the collection itself.
struct Reconciler {
    model: Arc<TwoTower>,
    index: Arc<dyn VectorIndex>,
    catalog: Arc<Catalog>,
    arm: Option<String>,
    read_only: bool,
    stopping: Arc<AtomicBool>,
}

impl Reconciler {
    /// Runs in the background on a blocking thread (it walks the whole catalog, and the
    /// embedded index answers its fetches synchronously), holding `guard` until done.
    fn spawn(self, guard: Option<SwitchGuard>) {
        let runtime = tokio::runtime::Handle::current();
        let what = match (&self.arm, self.read_only) {
            (_, true) => "catalog moved to the vectors of the collection another replica made live",
            (None, false) => "catalog reconciled with the live collection",
            (Some(_), false) => "experiment arm reconciled with the catalog",
        };
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            match runtime.block_on(self.run()) {
                Ok(n) => tracing::info!(
                    version = self.model.version(),
                    replayed = n,
                    secs = started.elapsed().as_secs_f64(),
                    "{what}"
                ),
                Err(e) => {
                    tracing::error!(version = self.model.version(), error = %e, "reconciling a collection with the catalog")
                }
            }
            drop(guard);
        });
    }

    async fn fetch(&self, ids: &[ItemId]) -> Result<Vec<crate::index::LivePoint>, IndexError> {
        self.index.fetch_live(self.arm.as_deref(), ids).await
    }

    async fn set_payload(
        &self,
        id: &ItemId,
        patch: &crate::index::PayloadPatch,
    ) -> Result<(), IndexError> {
        match &self.arm {
            None => self.index.set_payload(id, patch).await,
            Some(c) => self.index.set_payload_in(c, id, patch).await,
        }
    }

    async fn upsert(&self, points: Vec<IndexPoint>) -> Result<(), IndexError> {
        match &self.arm {
            None => self.index.upsert(points).await,
            Some(c) => self.index.upsert_into(c, points).await,
        }
    }

    fn set_vectors(&self, vectors: impl IntoIterator<Item = (Arc<CatalogEntry>, Vector)>) {
        if self.arm.is_none() || self.read_only {
            self.catalog.set_vectors(vectors);
        }
    }

    async fn run(&self) -> Result<usize, LifecycleError> {
        let entries = self.catalog.entries();
        let mut missing = Vec::new();
        for chunk in entries.chunks(FETCH_BATCH) {
            if self.stopping.load(Ordering::Relaxed) {
                return Err(LifecycleError::ShuttingDown);
            }
            let chunk_started = Instant::now();
            let ids: Vec<ItemId> = chunk.iter().map(|e| e.id().clone()).collect();
            let stored: HashMap<ItemId, crate::index::LivePoint> = self
                .fetch(&ids)
                .await?
                .into_iter()
                .map(|p| (p.item_id.clone(), p))
                .collect();
            let mut moved = Vec::with_capacity(chunk.len());
            for e in chunk {
                match stored.get(e.id()) {
                    Some(stored) => {
                        if self.arm.is_none() || self.read_only {
                            moved.push((e.clone(), stored.vector.clone()));
                        }
                        let current = &e.item;
                        if !self.read_only
                            && (stored.available != current.available
                                || stored.price != current.price)
                        {
                            let patch = crate::index::PayloadPatch {
                                available: Some(current.available),
                                price: current.price,
                                popularity: None,
                            };
                            self.set_payload(e.id(), &patch).await?;
                        }
                    }
                    None => missing.push(e.clone()),
                }
            }
            self.set_vectors(moved);
            // A blocking thread: its own sleep (the runtime's timer ends with the runtime).
            std::thread::sleep(chunk_started.elapsed() * AFTER_SWITCH_PAUSE);
        }
        if self.read_only {
            return Ok(0);
        }
        let n = missing.len();
        for chunk in missing.chunks(EMBED_BATCH) {
            let vectors = embed(&self.model, chunk.to_vec())
                .await
                .map(vectors_of)
                .map_err(|source| LifecycleError::Model {
                    version: self.model.version().to_string(),
                    source: Box::new(source),
                })?;
            self.upsert(points_now(&self.catalog, chunk, &vectors))
                .await?;
            self.set_vectors(chunk.iter().cloned().zip(vectors));
        }
        Ok(n)
    }
}

/// After an activation's switch, on a blocking thread: moves the catalog entries that did
/// not change during the build to their new vectors, `VECTOR_CHUNK` per lock, paced by
/// `AFTER_SWITCH_PAUSE`. Returns the entries that changed (to re-embed) and the ids
/// deleted during the build.
fn move_unchanged(
    catalog: &Catalog,
    snapshot: &[Arc<CatalogEntry>],
    mut fresh: HashMap<ItemId, Vector>,
    stopping: &AtomicBool,
) -> Result<(Vec<Arc<CatalogEntry>>, Vec<ItemId>), LifecycleError> {
    let before: HashMap<&ItemId, &Arc<CatalogEntry>> =
        snapshot.iter().map(|e| (e.id(), e)).collect();
    let now = catalog.entries();
    let mut changed = Vec::new();
    for chunk in now.chunks(VECTOR_CHUNK) {
        if stopping.load(Ordering::Relaxed) {
            return Err(LifecycleError::ShuttingDown);
        }
        let started = Instant::now();
        let mut moved = Vec::with_capacity(chunk.len());
        for entry in chunk {
            match before.get(entry.id()) {
                Some(old) if Arc::ptr_eq(old, entry) => {
                    if let Some(v) = fresh.remove(entry.id()) {
                        moved.push((entry.clone(), v));
                    }
                }
                _ => changed.push(entry.clone()),
            }
        }
        catalog.set_vectors(moved);
        std::thread::sleep(started.elapsed() * AFTER_SWITCH_PAUSE);
    }
    let live: std::collections::HashSet<&ItemId> = now.iter().map(|e| e.id()).collect();
    let deleted = snapshot
        .iter()
        .filter(|e| !live.contains(e.id()))
        .map(|e| e.id().clone())
        .collect();
    Ok((changed, deleted))
}

/// Index points for entries embedded as `read`, with each item's payload as it is now: an
/// entry removed or re-embedded by a live write since it was read is left out (that write
/// updated the index), and a patch since (price, availability) is kept.
fn points_now(
    catalog: &Catalog,
    read: &[Arc<CatalogEntry>],
    vectors: &[Vector],
) -> Vec<IndexPoint> {
    read.iter()
        .zip(vectors)
        .filter_map(|(e, v)| {
            let now = catalog.get(e.id())?;
            (now.vector == e.vector).then(|| IndexPoint {
                vector: v.clone(),
                payload: now.payload(),
            })
        })
        .collect()
}

/// Runs a CPU-bound step (a walk of the whole catalog, a million entries: tens to hundreds
/// of milliseconds; a batch through the item tower) on a blocking thread, so that no runtime
/// worker, and no request queued on it, waits for it.
async fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("a catalog pass or an embedding batch does not panic")
}

/// The item tower over one batch (`items::embed_points`), off the async runtime; the points
/// in the entries' order.
async fn embed(
    model: &Arc<TwoTower>,
    entries: Vec<Arc<CatalogEntry>>,
) -> Result<Vec<IndexPoint>, ModelError> {
    let model = model.clone();
    off_runtime(move || {
        let items = entries.iter().map(|e| (&e.item, e.popularity));
        crate::items::embed_points(&model, items, usize::MAX, |_| {})
    })
    .await
}

/// The vectors of embedded points, in order.
fn vectors_of(points: Vec<IndexPoint>) -> Vec<Vector> {
    points.into_iter().map(|p| p.vector).collect()
}
