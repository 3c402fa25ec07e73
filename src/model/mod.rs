//! The two-tower model (candle): featurization, the towers, training and the checkpoint.
//!
//! - [`features`]: hashing of ids, categories and tokens; numeric buckets; pooling weights.
//! - [`towers`]: the network (shared embedding table, item MLP, user MLP), `load(vb, cfg)`.
//! - [`two_tower`]: [`TwoTower`], a loaded checkpoint: `embed_items`, `embed_user`.
//! - [`loss`]: the in-batch sampled softmax as one fused op.
//! - [`step`]: the training step by hand (forward, backward, fused AdamW) on reused buffers.
//! - [`train`]: in-batch sampled softmax with logQ correction, AdamW, early stopping.
//! - [`checkpoint`]: `model.safetensors` + `manifest.json`, checked on load.
//!
//! This module knows no transport and no storage beyond its own checkpoint files.

pub mod checkpoint;
pub mod features;
pub mod loss;
pub mod step;
pub mod towers;
pub mod train;
pub mod two_tower;

pub use checkpoint::{
    DataInfo, Manifest, Metrics, PopularityPrior, SimilarQuery, TrainingInfo, FORMAT_VERSION,
};
pub use train::{train_on_data, train_on_split, FitReport, TrainConfig};
pub use two_tower::TwoTower;

use crate::domain::{EventType, Item};
use std::path::PathBuf;

/// One event of a user's history, as the user tower sees it.
#[derive(Debug, Clone, Copy)]
pub struct UserEvent<'a> {
    pub item: &'a Item,
    pub event_type: EventType,
}

/// Why a checkpoint could not be loaded, saved or trained. Each variant names the file,
/// tensor or setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(
        "{path}: no such file (a checkpoint directory holds model.safetensors and manifest.json)"
    )]
    MissingFile { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid manifest: {reason}")]
    BadManifest { path: PathBuf, reason: String },
    #[error("{path}: unknown checkpoint format version {found} (this build of tandem reads version {supported})")]
    UnknownFormatVersion {
        path: PathBuf,
        found: String,
        supported: u32,
    },
    #[error("{path}: corrupt or truncated safetensors file: {reason}")]
    CorruptFile { path: PathBuf, reason: String },
    #[error("{path}: missing tensor `{name}` (expected shape {expected:?})")]
    MissingTensor {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
    },
    #[error("{path}: dims mismatch: tensor `{name}` has shape {found:?}, the manifest implies {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: tensor `{name}` has dtype {found}, expected {expected}")]
    WrongDType {
        path: PathBuf,
        name: String,
        expected: String,
        found: String,
    },
    #[error("invalid setting `{field}`: {reason}")]
    InvalidConfig { field: String, reason: String },
    #[error("training data: {0}")]
    TrainingData(String),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}
