//! The checkpoint on disk: `model.safetensors` (every tensor) and `manifest.json` (format
//! version, model version id, shapes, the whole feature config, training settings, data
//! fingerprint, metrics, command, created_at). `docs/checkpoint.md` documents both and
//! `schemas/checkpoint-manifest.schema.json` describes the manifest.
//!
//! Loading checks the file against the tensor list the manifest implies before building
//! anything, so a truncated file, a missing tensor or a dims mismatch gets an error that names
//! it instead of a deep candle failure.

use super::features::{FeatureConfig, IdTable, PoolingConfig};
use super::towers::{tensor_specs, NetConfig};
use super::ModelError;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The checkpoint format this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const MANIFEST_FILE: &str = "manifest.json";
/// Tensors of the id table (not trained by gradient; written by the trainer).
pub const ID_KEYS_TENSOR: &str = "item_tower.id_keys";
pub const ID_COUNTS_TENSOR: &str = "item_tower.id_counts";
/// `[dim]`, optional: the popularity direction of [`SimilarQuery`] (checkpoints before it
/// lack it and load without it).
pub const POPULARITY_DIRECTION_TENSOR: &str = "item_tower.popularity_direction";

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    /// Unique per training run, e.g. `tt-20261124t071500-3f9a1c2e`.
    pub model_version: String,
    /// RFC 3339.
    pub created_at: String,
    /// Output dimension of both towers (the index's vector size).
    pub dim: usize,
    /// Width of the embedding table.
    pub input_dim: usize,
    pub hidden: usize,
    pub features: FeatureConfig,
    pub pooling: PoolingConfig,
    /// Buckets of the user tower's history-length embedding.
    pub length_buckets: usize,
    pub training: TrainingInfo,
    pub data: DataInfo,
    pub metrics: Metrics,
    /// A popularity term added to the tower score at ranking time, tuned on validation.
    #[serde(default)]
    pub popularity_prior: PopularityPrior,
    /// How `similar` builds its query from an anchor item (absent: the anchor's own vector).
    #[serde(default)]
    pub similar: SimilarQuery,
    /// The command line that produced this checkpoint.
    pub command: String,
}

/// The query `similar` searches with for an anchor item `a` (see [`TwoTower::similar_query`]):
/// `q = normalize(v - popularity_removal * (v . p) p + content_weight * c)`, where `v` is the
/// anchor's item vector, `p` the checkpoint's popularity direction (tensor
/// `item_tower.popularity_direction`, the training-count-weighted mean item vector, unit
/// length) and `c` the anchor's content-only vector (no id row, the unseen popularity bucket).
///
/// Why: every user interacts with best-sellers, so their vectors share a large component
/// along `p`, and by `v` alone best-sellers are each other's nearest neighbours whatever
/// their category. Taking `p` out of the query and adding the anchor's content lets category
/// and content decide. Only `similar` uses it; personal recommendations score `u . v`. Zero
/// weights (the default, and every checkpoint written before this field) query with `v`.
///
/// [`TwoTower::similar_query`]: super::TwoTower::similar_query
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SimilarQuery {
    #[serde(default)]
    pub popularity_removal: f32,
    #[serde(default)]
    pub content_weight: f32,
}

/// `score(u, i) = cos(u, i) + w(n) * ln(1 + count_i) / ln(1 + max_count)`, where `count_i` is
/// the item's training count, `n` the length of the user's history, and `w(n)` is `short` for
/// histories of at most `short_history` events and `long` otherwise. A user with a handful of
/// events says little about their taste, and for them what most people like is a strong
/// signal the towers alone under-use (DESIGN.md: new users lose to popularity). Both weights
/// are chosen on validation; zero weights (the default) rank by the towers alone.
///
/// `cold_bonus` is added for items with fewer than `cold_below` training interactions
/// (brand-new items included): exploration for the catalog's cold end, which the towers and
/// the prior otherwise rank below everything with a history. It is chosen on validation as
/// the largest gain in cold-item Recall@20 that costs at most 5% of the other Recall@20s.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PopularityPrior {
    pub short_history: usize,
    pub short: f32,
    pub long: f32,
    #[serde(default)]
    pub cold_below: usize,
    #[serde(default)]
    pub cold_bonus: f32,
    /// Added to cold items' scores in proportion to the user's own share of cold items
    /// (see [`PopularityPrior::cold_share`]): people who watch obscure films get more of
    /// them, and people who never do get none. 0 in checkpoints written before it.
    #[serde(default)]
    pub cold_affinity: f32,
}

impl Default for PopularityPrior {
    fn default() -> Self {
        PopularityPrior {
            short_history: 5,
            short: 0.0,
            long: 0.0,
            cold_below: 5,
            cold_bonus: 0.0,
            cold_affinity: 0.0,
        }
    }
}

impl PopularityPrior {
    /// The weight for a history of `n` events.
    pub fn weight(&self, n: usize) -> f32 {
        if n <= self.short_history {
            self.short
        } else {
            self.long
        }
    }

    /// The whole prior term for an item with training count `count` whose popularity is
    /// `value` on the 0..=1 scale, for a history of `n` events.
    pub fn term(&self, n: usize, count: f32, value: f32) -> f32 {
        let cold = if count < self.cold_below as f32 {
            self.cold_bonus
        } else {
            0.0
        };
        self.weight(n) * value + cold
    }

    /// The user's share of cold items: of the training counts of the items in their history
    /// (the newest `pooling.max_history` events, as the user tower sees them), the share
    /// below `cold_below`; 0 for an empty history.
    pub fn cold_share(&self, history_counts: impl IntoIterator<Item = f32>) -> f32 {
        let (mut cold, mut n) = (0usize, 0usize);
        for c in history_counts {
            n += 1;
            cold += usize::from(c < self.cold_below as f32);
        }
        if n == 0 {
            0.0
        } else {
            cold as f32 / n as f32
        }
    }

    /// [`PopularityPrior::term`] plus the user's cold affinity: `cold_affinity *
    /// cold_share` for cold items, where `cold_share` is [`PopularityPrior::cold_share`] of
    /// the user's history.
    pub fn user_term(&self, n: usize, cold_share: f32, count: f32, value: f32) -> f32 {
        let affinity = if count < self.cold_below as f32 {
            self.cold_affinity * cold_share
        } else {
            0.0
        };
        self.term(n, count, value) + affinity
    }

    /// Whether the prior changes any score.
    pub fn is_active(&self) -> bool {
        self.short > 0.0 || self.long > 0.0 || self.cold_bonus > 0.0 || self.cold_affinity > 0.0
    }
}

/// How the checkpoint was trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TrainingInfo {
    pub epochs: usize,
    /// The epoch count chosen by validation (equal to `epochs` without validation).
    pub best_epoch: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub temperature: f64,
    pub id_dropout: f64,
    /// Weight of the log item-frequency correction (1 = full logQ).
    pub logq: f64,
    /// Items with fewer training interactions get no id embedding (content-only).
    pub min_item_count: usize,
    /// Weight of the content alignment loss (0 in checkpoints written before it).
    #[serde(default)]
    pub content_loss: f64,
    pub seed: u64,
    pub threads: usize,
    pub examples_per_epoch: usize,
    /// Training examples per second over the training loop of the final fit.
    pub examples_per_sec: f64,
    /// Wall time of the whole `train` run, validation fit included.
    pub seconds: f64,
}

/// What the model was trained on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DataInfo {
    /// The data directory or split directory.
    pub source: String,
    /// sha256 over the catalog ids and the (user, item, timestamp) rows, in file order.
    pub fingerprint: String,
    pub items: usize,
    pub users: usize,
    pub interactions: usize,
    /// Items with an id embedding.
    pub trained_items: usize,
}

/// Metric name (as `score.py` spells it) to value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    #[serde(default)]
    pub val: BTreeMap<String, f64>,
    #[serde(default)]
    pub test: BTreeMap<String, f64>,
}

impl Manifest {
    pub fn net_config(&self) -> NetConfig {
        NetConfig {
            rows: self.features.offsets().total,
            input_dim: self.input_dim,
            hidden: self.hidden,
            dim: self.dim,
            length_buckets: self.length_buckets,
        }
    }

    /// Reads and checks `dir/manifest.json`. The format version is read first, so a manifest
    /// from a newer tandem says so instead of failing on an unknown field.
    pub fn read(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join(MANIFEST_FILE);
        let text = read_file(&path)?;
        let bad = |reason: String| ModelError::BadManifest {
            path: path.clone(),
            reason,
        };
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let version = value
            .get("format_version")
            .ok_or_else(|| bad("missing field `format_version`".into()))?;
        if version.as_u64() != Some(FORMAT_VERSION as u64) {
            return Err(ModelError::UnknownFormatVersion {
                path: path.clone(),
                found: version.to_string(),
                supported: FORMAT_VERSION,
            });
        }
        let m: Manifest = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
        m.features.validate().map_err(bad)?;
        for (field, v) in [
            ("dim", m.dim),
            ("input_dim", m.input_dim),
            ("hidden", m.hidden),
            ("length_buckets", m.length_buckets),
            ("pooling.max_history", m.pooling.max_history),
        ] {
            if v == 0 {
                return Err(bad(format!("`{field}` must be at least 1")));
            }
        }
        Ok(m)
    }

    pub fn write(&self, dir: &Path) -> Result<(), ModelError> {
        let path = dir.join(MANIFEST_FILE);
        let text = serde_json::to_string_pretty(self).expect("manifest serializes");
        write_atomic(&path, text.as_bytes())
    }
}

fn read_file(path: &Path) -> Result<String, ModelError> {
    std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ModelError::MissingFile {
            path: path.to_path_buf(),
        },
        _ => ModelError::Io {
            path: path.to_path_buf(),
            source: e,
        },
    })
}

/// Writes through a temporary file and a rename, so a reader never sees half a file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    let tmp = path.with_extension("tmp");
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Everything `model.safetensors` holds, loaded and checked.
pub struct Weights {
    /// Network tensors by name, ready for `VarBuilder::from_tensors`.
    pub tensors: HashMap<String, Tensor>,
    pub ids: IdTable,
    /// `item_tower.popularity_direction`, when the checkpoint has it.
    pub popularity_direction: Option<Vec<f32>>,
}

/// Reads `dir/model.safetensors` (memory-mapped) and checks every tensor the manifest implies.
pub fn read_weights(
    dir: &Path,
    manifest: &Manifest,
    device: &Device,
) -> Result<Weights, ModelError> {
    let path = dir.join(WEIGHTS_FILE);
    if !path.exists() {
        return Err(ModelError::MissingFile { path });
    }
    // SAFETY: the file is mapped read-only; tandem never writes a checkpoint in place (saves
    // go through a rename), so the mapping does not change under us.
    let st = unsafe { MmapedSafetensors::new(&path) }.map_err(|e| ModelError::CorruptFile {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let buckets = manifest.features.id_buckets;
    let mut specs: Vec<(String, Vec<usize>, DType)> = tensor_specs(&manifest.net_config())
        .into_iter()
        .map(|(n, s)| (n, s, DType::F32))
        .collect();
    specs.push((ID_KEYS_TENSOR.into(), vec![buckets], DType::U32));
    specs.push((ID_COUNTS_TENSOR.into(), vec![buckets], DType::F32));

    let mut tensors = HashMap::new();
    for (name, shape, dtype) in specs {
        let view = st.get(&name).map_err(|_| ModelError::MissingTensor {
            path: path.clone(),
            name: name.clone(),
            expected: shape.clone(),
        })?;
        if view.shape() != shape.as_slice() {
            return Err(ModelError::ShapeMismatch {
                path: path.clone(),
                name,
                expected: shape,
                found: view.shape().to_vec(),
            });
        }
        let t = st
            .load(&name, device)
            .map_err(|e| ModelError::CorruptFile {
                path: path.clone(),
                reason: format!("tensor `{name}`: {e}"),
            })?;
        if t.dtype() != dtype {
            return Err(ModelError::WrongDType {
                path: path.clone(),
                name,
                expected: format!("{dtype:?}"),
                found: format!("{:?}", t.dtype()),
            });
        }
        tensors.insert(name, t);
    }
    let keys: Vec<u32> = tensors.remove(ID_KEYS_TENSOR).expect("checked").to_vec1()?;
    let counts: Vec<f32> = tensors
        .remove(ID_COUNTS_TENSOR)
        .expect("checked")
        .to_vec1()?;
    let ids = IdTable { keys, counts };
    let popularity_direction = match st.get(POPULARITY_DIRECTION_TENSOR) {
        Err(_) => None,
        Ok(view) if view.shape() != [manifest.dim] => {
            return Err(ModelError::ShapeMismatch {
                path: path.clone(),
                name: POPULARITY_DIRECTION_TENSOR.into(),
                expected: vec![manifest.dim],
                found: view.shape().to_vec(),
            })
        }
        Ok(_) => Some(
            st.load(POPULARITY_DIRECTION_TENSOR, device)
                .and_then(|t| t.to_dtype(DType::F32)?.to_vec1::<f32>())
                .map_err(|e| ModelError::CorruptFile {
                    path: path.clone(),
                    reason: format!("tensor `{POPULARITY_DIRECTION_TENSOR}`: {e}"),
                })?,
        ),
    };
    if ids.len() * 2 > buckets {
        return Err(ModelError::CorruptFile {
            path,
            reason: format!(
                "`{ID_KEYS_TENSOR}` is more than half full ({} of {buckets} slots)",
                ids.len()
            ),
        });
    }
    Ok(Weights {
        tensors,
        ids,
        popularity_direction,
    })
}

/// Writes `dir/model.safetensors` and `dir/manifest.json` (creating `dir`).
pub fn write_checkpoint(
    dir: &Path,
    manifest: &Manifest,
    net_tensors: Vec<(String, Tensor)>,
    ids: &IdTable,
    popularity_direction: Option<&[f32]>,
) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|source| ModelError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let n = ids.keys.len();
    let mut map: HashMap<String, Tensor> = net_tensors.into_iter().collect();
    map.insert(
        ID_KEYS_TENSOR.into(),
        Tensor::from_slice(&ids.keys, n, &Device::Cpu)?,
    );
    map.insert(
        ID_COUNTS_TENSOR.into(),
        Tensor::from_slice(&ids.counts, n, &Device::Cpu)?,
    );
    if let Some(p) = popularity_direction {
        map.insert(
            POPULARITY_DIRECTION_TENSOR.into(),
            Tensor::from_slice(p, p.len(), &Device::Cpu)?,
        );
    }
    let path = dir.join(WEIGHTS_FILE);
    let tmp: PathBuf = path.with_extension("tmp");
    candle_core::safetensors::save(&map, &tmp).map_err(|e| ModelError::Io {
        path: path.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    std::fs::rename(&tmp, &path).map_err(|source| ModelError::Io {
        path: path.clone(),
        source,
    })?;
    manifest.write(dir)
}
