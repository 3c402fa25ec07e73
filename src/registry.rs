//! The model registry: checkpoints registered under `<data_dir>/models/`, each with its version
//! id, manifest, metrics, status and (once embedded) its index collection, persisted in
//! `<data_dir>/models/registry.json`.
//!
//! Statuses:
//! - `registered`: validated and copied in; no collection yet.
//! - `indexing`: its collection is being built (activation in progress).
//! - `ready`: its collection exists but another version serves; activating it, or rolling
//!   back to it, is an instant switch.
//! - `active`: serving.
//! - `retired`: served once; its collection was dropped to save memory. Activating it again
//!   re-embeds the catalog.
//!
//! Only the registry's own bookkeeping lives here; building collections and swapping the
//! serving model is `lifecycle`'s job. This module knows no HTTP.
//!
//! Where it is kept: one process keeps `registry.json` beside the checkpoints. Replicas
//! ([`crate::config::Settings::shared`]) keep one document in Redis, changed in a WATCH/MULTI
//! transaction that also announces the change on the replicas' stream (`cluster`), and each
//! keeps a copy that it reloads when told ([`Registry::reload`]). The checkpoints are in the
//! model store, a directory every replica reads.

use crate::cluster::{Bus, Change};
use crate::model::{Manifest, Metrics, ModelError, TwoTower};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const REGISTRY_FILE: &str = "registry.json";
/// The registry as it was before the last write: the copy a start-up falls back to when
/// `registry.json` is damaged (one write behind).
const PREVIOUS_FILE: &str = "registry.json.prev";
/// Where a damaged `registry.json` is moved, for an operator to look at.
const DAMAGED_FILE: &str = "registry.json.damaged";
/// Files a checkpoint directory holds (see `model::checkpoint`).
const CHECKPOINT_FILES: [&str; 2] = ["model.safetensors", "manifest.json"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ModelStatus {
    Registered,
    Indexing,
    Ready,
    Active,
    Retired,
}

/// Where an activation is: `embedding` (item tower over the catalog) then `indexing`
/// (upsert and index build), counted in items.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Progress {
    pub phase: String,
    pub done: u64,
    pub total: u64,
    /// RFC 3339.
    pub started_at: String,
}

/// One registered checkpoint, as `GET /admin/models` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelRecord {
    /// The manifest's `model_version`.
    pub version: String,
    pub status: ModelStatus,
    pub dim: usize,
    pub format_version: u32,
    /// When it was trained (the manifest's `created_at`).
    pub created_at: String,
    /// RFC 3339.
    pub registered_at: String,
    /// The directory it was registered from.
    pub source: String,
    /// Validation and test metrics from the manifest.
    #[schema(value_type = Object)]
    pub metrics: Metrics,
    /// The index collection version holding the catalog embedded by this model, if built.
    pub collection: Option<String>,
    pub activated_at: Option<String>,
    /// Set while an activation is running.
    pub progress: Option<Progress>,
    /// Why the last activation of this version failed, if it did.
    pub last_error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The checkpoint failed validation: schema, format version, dims against tensors, or a
    /// corrupt file. The model error names the file and the reason.
    #[error("rejected checkpoint: {0}")]
    Invalid(#[from] ModelError),
    #[error("path {path:?}: {reason}")]
    BadPath { path: String, reason: String },
    #[error("model version {0:?} is already registered")]
    AlreadyRegistered(String),
    #[error("model version {0:?} is not registered")]
    Unknown(String),
    #[error("model registry {path}: {reason}")]
    Storage { path: String, reason: String },
}

/// Where the registry document is kept.
enum Store {
    /// `registry.json` in the model store.
    File,
    /// One JSON document in Redis, shared by the replicas.
    Redis {
        bus: Arc<Bus>,
        conn: Mutex<Option<redis::Connection>>,
    },
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    /// In registration order.
    models: Vec<ModelRecord>,
    /// Versions in the order they became active, the current one last; rollback pops it.
    history: Vec<String>,
    /// The offline loop's run reports, oldest first (`crate::retrain`).
    #[serde(default)]
    retrain_runs: Vec<crate::retrain::report::RetrainReport>,
}

/// The registry. Every method is quick (file copies and a small JSON write), so callers on
/// the async runtime wrap only `register` in `spawn_blocking`.
pub struct Registry {
    dir: PathBuf,
    keep_last: usize,
    store: Store,
    /// The document as last read or written.
    state: Mutex<State>,
    /// Versions an enabled experiment serves: they keep their collections (set from the
    /// experiments at start-up and on every change, so not saved).
    pinned: Mutex<Vec<String>>,
    /// Why `registry.json` could not be read at start-up, when the registry fell back to
    /// its previous copy (or to an empty registry).
    recovered: Option<String>,
}

impl Registry {
    /// Opens (or creates) the registry of one process, in the model store `dir`. A version
    /// left `indexing` by a crash goes back to `registered` with the reason, since its
    /// half-built collection is gone.
    ///
    /// A damaged `registry.json` does not stop the start-up: it is moved aside to
    /// `registry.json.damaged`, and the registry is the copy kept before the last write
    /// (`registry.json.prev`, one write behind), or an empty one if that is damaged too;
    /// either way an error is logged, `tandem_registry_recovered` is 1, and
    /// [`Registry::recovered`] says why.
    pub fn open(dir: &Path, keep_last: usize) -> Result<Self, RegistryError> {
        let dir = dir.to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| storage(&dir, e))?;
        let file = dir.join(REGISTRY_FILE);
        let (mut state, recovered) = match read_state(&file)? {
            Ok(state) => (state, None),
            Err(reason) => {
                let damaged = dir.join(DAMAGED_FILE);
                std::fs::rename(&file, &damaged).map_err(|e| storage(&damaged, e))?;
                let previous = dir.join(PREVIOUS_FILE);
                let state = match read_state(&previous)? {
                    Ok(state) => {
                        tracing::error!(
                            file = %file.display(), moved_to = %damaged.display(), %reason,
                            "the model registry is damaged; serving from its previous copy {} (one write behind): check the active model",
                            previous.display()
                        );
                        state
                    }
                    Err(prev) => {
                        tracing::error!(
                            file = %file.display(), moved_to = %damaged.display(), %reason, previous = %prev,
                            "the model registry and its previous copy are damaged; starting with an empty registry (model_path serves): register the models again"
                        );
                        State::default()
                    }
                };
                (state, Some(reason))
            }
        };
        crate::telemetry::set_registry_recovered(recovered.is_some());
        for m in &mut state.models {
            if m.status == ModelStatus::Indexing {
                m.status = ModelStatus::Registered;
                m.progress = None;
                m.collection = None;
                m.last_error = Some("activation interrupted by a restart".into());
            }
        }
        let registry = Registry {
            dir,
            keep_last: keep_last.max(2),
            store: Store::File,
            state: Mutex::new(state),
            pinned: Mutex::new(Vec::new()),
            recovered,
        };
        registry.save_file(&registry.state.lock())?;
        Ok(registry)
    }

    /// Why the registry file could not be read at start-up, if it could not (see `open`).
    pub fn recovered(&self) -> Option<&str> {
        self.recovered.as_deref()
    }

    /// Opens the registry the replicas share: the document in Redis, the checkpoints in the
    /// model store `dir` (a volume every replica mounts). A version another replica is
    /// indexing stays `indexing`.
    pub fn open_shared(dir: &Path, keep_last: usize, bus: Arc<Bus>) -> Result<Self, RegistryError> {
        let dir = dir.to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| storage(&dir, e))?;
        let registry = Registry {
            dir,
            keep_last: keep_last.max(2),
            store: Store::Redis {
                bus,
                conn: Mutex::new(None),
            },
            state: Mutex::new(State::default()),
            pinned: Mutex::new(Vec::new()),
            recovered: None,
        };
        registry.reload()?;
        Ok(registry)
    }

    /// Reads the shared document again (another replica changed it). A no-op for one
    /// process's registry.
    pub fn reload(&self) -> Result<(), RegistryError> {
        let Store::Redis { bus, .. } = &self.store else {
            return Ok(());
        };
        let key = bus.keys().registry.clone();
        let st = self.with_redis(|con| {
            let text: Option<String> = redis::cmd("GET").arg(&key).query(con)?;
            Ok(text)
        })?;
        *self.state.lock() = parse_state(&key, st)?;
        Ok(())
    }

    /// The checkpoint directory of a registered version.
    pub fn model_dir(&self, version: &str) -> PathBuf {
        self.dir.join(version)
    }

    pub fn list(&self) -> Vec<ModelRecord> {
        self.state.lock().models.clone()
    }

    pub fn get(&self, version: &str) -> Option<ModelRecord> {
        self.state
            .lock()
            .models
            .iter()
            .find(|m| m.version == version)
            .cloned()
    }

    pub fn active(&self) -> Option<ModelRecord> {
        self.state
            .lock()
            .models
            .iter()
            .find(|m| m.status == ModelStatus::Active)
            .cloned()
    }

    /// Validates a checkpoint directory by loading it with the model's own loader (manifest
    /// schema, format version, every tensor's shape against the manifest's dims), then copies
    /// it under the registry. Blocking: file I/O and a full load.
    pub fn register(&self, path: &Path) -> Result<(ModelRecord, TwoTower), RegistryError> {
        if !path.is_dir() {
            return Err(RegistryError::BadPath {
                path: path.display().to_string(),
                reason: "not a directory on the server (a checkpoint directory holds model.safetensors and manifest.json)".into(),
            });
        }
        let model = TwoTower::load(path)?;
        let version = model.version().to_string();
        if !valid_version(&version) {
            return Err(RegistryError::Invalid(ModelError::BadManifest {
                path: path.join("manifest.json"),
                reason: format!(
                    "model_version {version:?} must be 1 to 128 letters, digits, '-', '_' or '.'"
                ),
            }));
        }
        if self.get(&version).is_some() {
            return Err(RegistryError::AlreadyRegistered(version));
        }
        self.copy_in(path, &version)?;
        let record = record_for(model.manifest(), path, ModelStatus::Registered);
        self.mutate(|st| {
            // A concurrent register of the same version may have won the race.
            if st.models.iter().any(|m| m.version == version) {
                return Err(RegistryError::AlreadyRegistered(version.clone()));
            }
            st.models.push(record.clone());
            Ok(())
        })?;
        Ok((record, model))
    }

    /// Records the model the server started with (from `model_path`) as active with the live
    /// collection, unless the registry already knows it. Returns its record.
    pub fn adopt_startup_model(
        &self,
        model: &TwoTower,
        source: &Path,
        collection: Option<String>,
    ) -> Result<ModelRecord, RegistryError> {
        let version = model.version().to_string();
        if let Some(existing) = self.get(&version) {
            if existing.status == ModelStatus::Active {
                if collection.is_some() && existing.collection != collection {
                    self.update(&version, |m| m.collection = collection.clone())?;
                }
                return Ok(self.get(&version).unwrap_or(existing));
            }
        } else {
            if !self.model_dir(&version).join(CHECKPOINT_FILES[1]).exists() {
                self.copy_in(source, &version)?;
            }
            let record = record_for(model.manifest(), source, ModelStatus::Registered);
            self.mutate(|st| {
                if !st.models.iter().any(|m| m.version == version) {
                    st.models.push(record.clone());
                }
                Ok(())
            })?;
        }
        self.mark_active(&version, collection)?;
        Ok(self.get(&version).expect("just marked active"))
    }

    /// Applies `change` to one record and persists the registry.
    pub fn update(
        &self,
        version: &str,
        change: impl Fn(&mut ModelRecord),
    ) -> Result<ModelRecord, RegistryError> {
        self.mutate(|st| {
            let m = st
                .models
                .iter_mut()
                .find(|m| m.version == version)
                .ok_or_else(|| RegistryError::Unknown(version.to_string()))?;
            change(m);
            Ok(m.clone())
        })
    }

    /// Makes `version` the active one with `collection`; the previously active version
    /// becomes `ready` (its collection is kept for rollback). Versions further back lose
    /// the rollback slot and become `retired`: their collections are returned, to be dropped.
    pub fn mark_active(
        &self,
        version: &str,
        collection: Option<String>,
    ) -> Result<Vec<String>, RegistryError> {
        self.mutate(|st| {
            if !st.models.iter().any(|m| m.version == version) {
                return Err(RegistryError::Unknown(version.to_string()));
            }
            let previous = st
                .models
                .iter()
                .find(|m| m.status == ModelStatus::Active && m.version != version)
                .map(|m| m.version.clone());
            let now = now();
            for m in &mut st.models {
                if m.version == version {
                    m.status = ModelStatus::Active;
                    m.collection = collection.clone();
                    m.activated_at = Some(now.clone());
                    m.progress = None;
                    m.last_error = None;
                } else if Some(&m.version) == previous.as_ref() {
                    m.status = ModelStatus::Ready;
                }
            }
            st.history.retain(|v| v != version);
            st.history.push(version.to_string());
            Ok(retire_beyond_rollback(
                st,
                collection.as_deref(),
                &self.pinned.lock(),
            ))
        })
    }

    /// A version whose collection was built without switching to it (`prepare`): `ready`,
    /// so that an experiment can serve it or an activation switch to it at once.
    pub fn mark_ready(&self, version: &str, collection: String) -> Result<(), RegistryError> {
        self.update(version, |m| {
            m.status = ModelStatus::Ready;
            m.collection = Some(collection.clone());
            m.progress = None;
            m.last_error = None;
        })
        .map(|_| ())
    }

    /// The versions enabled experiments serve; they keep their collections until unpinned.
    pub fn set_pinned(&self, versions: Vec<String>) {
        *self.pinned.lock() = versions;
    }

    /// The version a rollback returns to: the one active before the current one, if its
    /// collection is still kept.
    pub fn rollback_target(&self) -> Option<ModelRecord> {
        let st = self.state.lock();
        let n = st.history.len();
        if n < 2 {
            return None;
        }
        let prev = &st.history[n - 2];
        st.models
            .iter()
            .find(|m| &m.version == prev && m.collection.is_some())
            .cloned()
    }

    /// After a rollback switched to `target`: it is active again and the version rolled back
    /// from is `ready` (its collection kept, so re-activating it is instant).
    pub fn mark_rolled_back(&self, target: &str) -> Result<(), RegistryError> {
        self.mutate(|st| {
            let from = st.history.pop();
            let now = now();
            for m in &mut st.models {
                if m.version == target {
                    m.status = ModelStatus::Active;
                    m.activated_at = Some(now.clone());
                } else if Some(&m.version) == from.as_ref() {
                    m.status = ModelStatus::Ready;
                }
            }
            // The rolled-back-from version stays reachable by activating it again.
            Ok(())
        })
    }

    /// Keep-last-N: removes the oldest versions beyond `keep_last`, never the active one or
    /// the rollback target. Returns the collections of the removed versions, to be dropped.
    pub fn gc(&self) -> Result<Vec<String>, RegistryError> {
        let (collections, removed) = self.mutate(|st| {
            let mut protected: Vec<String> = st.history.iter().rev().take(2).cloned().collect();
            protected.extend(self.pinned.lock().iter().cloned());
            let mut removable: Vec<usize> = (0..st.models.len())
                .filter(|&i| {
                    let m = &st.models[i];
                    m.status != ModelStatus::Active
                        && m.status != ModelStatus::Indexing
                        && !protected.contains(&m.version)
                })
                .collect();
            let excess = st.models.len().saturating_sub(self.keep_last);
            removable.truncate(excess);
            let mut collections = Vec::new();
            let mut removed = Vec::new();
            for &i in removable.iter().rev() {
                let m = st.models.remove(i);
                if let Some(c) = m.collection {
                    collections.push(c);
                }
                st.history.retain(|v| v != &m.version);
                removed.push(m.version);
            }
            Ok((collections, removed))
        })?;
        for version in removed {
            let dir = self.model_dir(&version);
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "could not remove a collected model");
            }
            tracing::info!(version, "model version garbage-collected");
        }
        Ok(collections)
    }

    /// The retrain runs' reports, oldest first.
    pub fn retrain_runs(&self) -> Vec<crate::retrain::report::RetrainReport> {
        self.state.lock().retrain_runs.clone()
    }

    /// Keeps a retrain run's report (replacing one with the same id), and the newest `keep`
    /// of them.
    pub fn record_retrain(
        &self,
        report: crate::retrain::report::RetrainReport,
        keep: usize,
    ) -> Result<(), RegistryError> {
        self.mutate(|st| {
            st.retrain_runs.retain(|r| r.id != report.id);
            st.retrain_runs.push(report.clone());
            let excess = st.retrain_runs.len().saturating_sub(keep.max(1));
            st.retrain_runs.drain(..excess);
            Ok(())
        })
    }

    fn copy_in(&self, from: &Path, version: &str) -> Result<(), RegistryError> {
        // Copy into a temporary directory and rename, so a crash never leaves a registered
        // version with half its files.
        let tmp = self.dir.join(format!(".{version}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| storage(&tmp, e))?;
        for f in CHECKPOINT_FILES {
            std::fs::copy(from.join(f), tmp.join(f)).map_err(|e| storage(&from.join(f), e))?;
            // Durable before the registry names it: the registry file is fsynced next.
            std::fs::File::open(tmp.join(f))
                .and_then(|c| c.sync_all())
                .map_err(|e| storage(&tmp.join(f), e))?;
        }
        sync_dir(&tmp).map_err(|e| storage(&tmp, e))?;
        let dest = self.model_dir(version);
        let _ = std::fs::remove_dir_all(&dest);
        std::fs::rename(&tmp, &dest).map_err(|e| storage(&dest, e))?;
        sync_dir(&self.dir).map_err(|e| storage(&self.dir, e))
    }

    /// Changes the document and keeps it: in one process under the lock, then to the file;
    /// shared, as a Redis transaction on the newest document (retried if another replica
    /// changed it meanwhile, so `change` may run more than once) that also tells the other
    /// replicas.
    fn mutate<T>(
        &self,
        mut change: impl FnMut(&mut State) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let Store::Redis { bus, .. } = &self.store else {
            let mut st = self.state.lock();
            let out = change(&mut st)?;
            self.save_file(&st)?;
            return Ok(out);
        };
        let keys = bus.keys().clone();
        let origin = bus.origin().to_string();
        let outcome = self.with_redis(|con| {
            redis::transaction(con, &[&keys.registry], |con, pipe| {
                let text: Option<String> = redis::cmd("GET").arg(&keys.registry).query(con)?;
                let mut st = match parse_state(&keys.registry, text) {
                    Ok(st) => st,
                    Err(e) => return Ok(Some(Err(e))),
                };
                let out = match change(&mut st) {
                    Ok(out) => out,
                    Err(e) => return Ok(Some(Err(e))),
                };
                let text = serde_json::to_string(&st).expect("registry serializes");
                let xadd = crate::cluster::announce(&keys.stream, &origin, &Change::Registry);
                let done: Option<()> = pipe
                    .set(&keys.registry, text)
                    .ignore()
                    .add_command(xadd)
                    .ignore()
                    .query(con)?;
                Ok(done.map(|()| Ok((out, st))))
            })
        })?;
        let (out, st) = outcome?;
        *self.state.lock() = st;
        Ok(out)
    }

    /// Runs `f` on the shared registry's Redis connection, connecting first if needed; a
    /// failed call drops the connection so that the next one reconnects.
    fn with_redis<T>(
        &self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, RegistryError> {
        let Store::Redis { bus, conn } = &self.store else {
            unreachable!("only the shared registry talks to Redis");
        };
        let unavailable = |reason: String| RegistryError::Storage {
            path: bus.keys().registry.clone(),
            reason,
        };
        let mut guard = conn.lock();
        if guard.is_none() {
            *guard = Some(
                bus.blocking_connection()
                    .map_err(|e| unavailable(e.to_string()))?,
            );
        }
        let result = f(guard.as_mut().expect("connected above"));
        if result.is_err() {
            *guard = None;
        }
        result.map_err(|e| unavailable(e.to_string()))
    }

    /// Writes the document durably: the new text to a temporary file, fsynced; the current
    /// file kept as `registry.json.prev` (a hard link: no moment without a `registry.json`);
    /// the new one renamed into place; and the folder fsynced, so that the renames survive a
    /// power loss too (without it a crash could bring back an older or empty file).
    fn save_file(&self, st: &State) -> Result<(), RegistryError> {
        let file = self.dir.join(REGISTRY_FILE);
        let tmp = self.dir.join(format!("{REGISTRY_FILE}.tmp"));
        let text = serde_json::to_string_pretty(st).expect("registry serializes");
        write_synced(&tmp, text.as_bytes()).map_err(|e| storage(&tmp, e))?;
        if file.exists() {
            let prev_tmp = self.dir.join(format!("{PREVIOUS_FILE}.tmp"));
            let prev = self.dir.join(PREVIOUS_FILE);
            let _ = std::fs::remove_file(&prev_tmp);
            std::fs::hard_link(&file, &prev_tmp).map_err(|e| storage(&prev_tmp, e))?;
            std::fs::rename(&prev_tmp, &prev).map_err(|e| storage(&prev, e))?;
        }
        std::fs::rename(&tmp, &file).map_err(|e| storage(&file, e))?;
        sync_dir(&self.dir).map_err(|e| storage(&self.dir, e))
    }
}

/// Every version that has served before gives up its collection, except the active version,
/// the one before it (the rollback slot) and the versions experiments serve: at 1M items a
/// kept collection costs hundreds of MB. A version prepared but never active keeps its
/// collection (it was built to be used); keep-last-N removes it in time.
fn retire_beyond_rollback(
    st: &mut State,
    active_collection: Option<&str>,
    pinned: &[String],
) -> Vec<String> {
    let mut keep: Vec<String> = st.history.iter().rev().take(2).cloned().collect();
    keep.extend(pinned.iter().cloned());
    let mut dropped = Vec::new();
    for m in &mut st.models {
        let never_active = m.activated_at.is_none();
        if keep.contains(&m.version) || m.status == ModelStatus::Indexing || never_active {
            continue;
        }
        if let Some(c) = m.collection.take() {
            if Some(c.as_str()) != active_collection {
                dropped.push(c);
            }
        }
        if m.status == ModelStatus::Ready || m.status == ModelStatus::Active {
            m.status = ModelStatus::Retired;
        }
    }
    dropped
}

fn record_for(manifest: &Manifest, source: &Path, status: ModelStatus) -> ModelRecord {
    ModelRecord {
        version: manifest.model_version.clone(),
        status,
        dim: manifest.dim,
        format_version: manifest.format_version,
        created_at: manifest.created_at.clone(),
        registered_at: now(),
        source: source.display().to_string(),
        metrics: manifest.metrics.clone(),
        collection: None,
        activated_at: None,
        progress: None,
        last_error: None,
    }
}

/// Version ids become directory and collection names, so they are kept to a safe alphabet.
fn valid_version(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && !v.starts_with('.')
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The registry file: `Ok(Ok(state))` (an empty one when there is no file), `Ok(Err(why))`
/// when it is there but damaged, `Err` when it cannot be read at all.
fn read_state(file: &Path) -> Result<Result<State, String>, RegistryError> {
    match std::fs::read(file) {
        Ok(bytes) => Ok(serde_json::from_slice(&bytes).map_err(|e| e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Ok(State::default())),
        Err(e) => Err(storage(file, e)),
    }
}

/// Writes `bytes` to a new file and fsyncs it.
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Fsyncs a folder, so that the names created or renamed in it are durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// The shared document, or an empty registry when there is none yet.
fn parse_state(key: &str, text: Option<String>) -> Result<State, RegistryError> {
    match text {
        None => Ok(State::default()),
        Some(t) => serde_json::from_str(&t).map_err(|e| RegistryError::Storage {
            path: key.to_string(),
            reason: format!("not a registry document: {e}"),
        }),
    }
}

fn storage(path: &Path, e: std::io::Error) -> RegistryError {
    RegistryError::Storage {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}
