//! [`TwoTower`]: a loaded checkpoint (network, featurizer, manifest) and the two calls serving
//! needs, `embed_items` and `embed_user`.

use super::checkpoint::{read_weights, write_checkpoint, Manifest};
use super::features::{Featurizer, IdTable};
use super::towers::{length_bucket, Bag, TwoTowerNet};
use super::{ModelError, UserEvent};
use crate::domain::Item;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::path::Path;

/// Items per forward pass in [`TwoTower::embed_items`]: big enough for the matmuls to run at
/// full speed, small enough to keep memory flat over a million items.
const ITEM_BATCH: usize = 8192;

/// A loaded checkpoint. Cheap to share (`Arc<TwoTower>`); every method takes `&self`.
#[derive(Debug, Clone)]
pub struct TwoTower {
    net: TwoTowerNet,
    featurizer: Featurizer,
    manifest: Manifest,
    /// `ln(1 + max training count)`, the popularity prior's scale.
    log_max_count: f32,
    /// Unit `[dim]`: the direction best-sellers share (see `SimilarQuery`); `None` in
    /// checkpoints written before it.
    popularity_direction: Option<Vec<f32>>,
}

impl TwoTower {
    /// Loads `dir/model.safetensors` (memory-mapped) and `dir/manifest.json`. The featurizer
    /// is rebuilt from the manifest and the id table alone.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let manifest = Manifest::read(dir)?;
        let device = Device::Cpu;
        let weights = read_weights(dir, &manifest, &device)?;
        let vb = VarBuilder::from_tensors(weights.tensors, DType::F32, &device);
        let net = TwoTowerNet::load(vb, &manifest.net_config())?;
        let mut model = Self::from_parts(net, weights.ids, manifest);
        model.popularity_direction = weights.popularity_direction;
        Ok(model)
    }

    /// Wraps a freshly trained network.
    pub fn from_parts(net: TwoTowerNet, ids: IdTable, manifest: Manifest) -> Self {
        let max_count = ids.counts.iter().copied().fold(0.0f32, f32::max);
        let featurizer = Featurizer::new(manifest.features.clone(), ids);
        TwoTower {
            net,
            featurizer,
            manifest,
            log_max_count: max_count.ln_1p(),
            popularity_direction: None,
        }
    }

    /// Writes the checkpoint to `dir` (created if needed).
    pub fn save(&self, dir: &Path) -> Result<(), ModelError> {
        write_checkpoint(
            dir,
            &self.manifest,
            self.net.named_tensors(),
            &self.featurizer.ids,
            self.popularity_direction.as_deref(),
        )
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn manifest_mut(&mut self) -> &mut Manifest {
        &mut self.manifest
    }

    pub fn version(&self) -> &str {
        &self.manifest.model_version
    }

    pub fn dim(&self) -> usize {
        self.manifest.dim
    }

    pub fn featurizer(&self) -> &Featurizer {
        &self.featurizer
    }

    pub fn net(&self) -> &TwoTowerNet {
        &self.net
    }

    /// Training interaction count of an item (0 for items unseen in training); a popularity
    /// prior for the index payload and the re-ranker.
    pub fn popularity(&self, item: &Item) -> f32 {
        self.featurizer.popularity(item.item_id.as_str())
    }

    /// An item's popularity on the prior's 0..=1 scale, from its training count.
    pub fn prior_value(&self, count: f32) -> f32 {
        if self.log_max_count > 0.0 {
            count.max(0.0).ln_1p() / self.log_max_count
        } else {
            0.0
        }
    }

    /// Item tower, batched. Items unseen in training get a content-only vector (no id row).
    /// Vectors are L2-normalized, `dim` long, in the order of `items`.
    pub fn embed_items(&self, items: &[Item]) -> Result<Vec<Vec<f32>>, ModelError> {
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(ITEM_BATCH) {
            let inputs = self.item_inputs(chunk.iter(), chunk.len())?;
            let v: Vec<Vec<f32>> = self.net.item_tower(&inputs)?.to_vec2()?;
            out.extend(v);
        }
        Ok(out)
    }

    /// Content-only item vectors: each item as if it were brand new (no id row, the unseen
    /// popularity bucket), whether or not it was trained. A new item with the same title,
    /// categories, tags, year and price as a trained one gets exactly this vector.
    pub fn embed_content(&self, items: &[Item]) -> Result<Vec<Vec<f32>>, ModelError> {
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(ITEM_BATCH) {
            let mut bag = Bag::with_capacity(chunk.len(), chunk.len() * 10);
            for (i, item) in chunk.iter().enumerate() {
                for (row, w) in self.featurizer.content_features(item).content {
                    bag.push(i as u32, row, w);
                }
            }
            let v: Vec<Vec<f32>> = self
                .net
                .item_tower(&self.net.item_inputs(&bag)?)?
                .to_vec2()?;
            out.extend(v);
        }
        Ok(out)
    }

    /// The unit direction best-sellers share, if the checkpoint has one.
    pub fn popularity_direction(&self) -> Option<&[f32]> {
        self.popularity_direction.as_deref()
    }

    /// Sets the popularity direction to the training-count-weighted mean of the trained
    /// items' vectors (normalized). Items with no count do not weigh in.
    pub fn fit_popularity_direction(&mut self, items: &[Item]) -> Result<(), ModelError> {
        let vectors = self.embed_items(items)?;
        let mut p = vec![0f32; self.dim()];
        for (item, v) in items.iter().zip(&vectors) {
            let c = self.popularity(item);
            for (pj, vj) in p.iter_mut().zip(v) {
                *pj += c * vj;
            }
        }
        let norm = p.iter().map(|x| x * x).sum::<f32>().sqrt();
        self.popularity_direction = (norm > 0.0).then(|| p.iter().map(|x| x / norm).collect());
        Ok(())
    }

    /// The vector `similar` searches the item index with for the anchor `item` (see
    /// `SimilarQuery` in the manifest): the anchor's vector without its popularity
    /// component, plus its content-only vector, normalized. With the manifest's default
    /// weights (and for checkpoints without a popularity direction) it is the anchor's own
    /// item vector.
    pub fn similar_query(&self, item: &Item) -> Result<Vec<f32>, ModelError> {
        let cfg = self.manifest.similar;
        let mut v = self.embed_items(std::slice::from_ref(item))?.remove(0);
        if let (Some(p), true) = (&self.popularity_direction, cfg.popularity_removal != 0.0) {
            let along: f32 = v.iter().zip(p).map(|(a, b)| a * b).sum();
            for (vj, pj) in v.iter_mut().zip(p) {
                *vj -= cfg.popularity_removal * along * pj;
            }
        }
        if cfg.content_weight != 0.0 {
            let c = self.embed_content(std::slice::from_ref(item))?.remove(0);
            for (vj, cj) in v.iter_mut().zip(&c) {
                *vj += cfg.content_weight * cj;
            }
        }
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            v.iter_mut().for_each(|x| *x /= norm);
        }
        Ok(v)
    }

    /// Item tower inputs `[items.len(), input_dim]`, with the id row of trained items.
    fn item_inputs<'a>(
        &self,
        items: impl Iterator<Item = &'a Item>,
        n: usize,
    ) -> Result<Tensor, ModelError> {
        let mut bag = Bag::with_capacity(n, n * 10);
        for (i, item) in items.enumerate() {
            let f = self.featurizer.features(item);
            if let Some(row) = f.id_row {
                bag.push(i as u32, row, 1.0);
            }
            for (row, w) in f.content {
                bag.push(i as u32, row, w);
            }
        }
        Ok(self.net.item_inputs(&bag)?)
    }

    /// User tower over recent events, newest first; only the newest `pooling.max_history`
    /// count, weighted by recency (half-life `pooling.half_life`) and event type.
    ///
    /// An empty history is allowed: it gives the tower's learned "no history yet" vector
    /// (training includes every user's first event with an empty history), which leans to
    /// the items people start with, that is, to popular ones.
    pub fn embed_user(&self, history: &[UserEvent<'_>]) -> Result<Vec<f32>, ModelError> {
        let pooling = &self.manifest.pooling;
        let history = &history[..history.len().min(pooling.max_history)];
        let weights: Vec<f32> = history
            .iter()
            .enumerate()
            .map(|(k, e)| pooling.weight(k, e.event_type))
            .collect();
        let total: f32 = weights.iter().sum();
        let inputs = self.item_inputs(history.iter().map(|e| e.item), history.len())?;
        let mut bag = Bag::with_capacity(1, history.len());
        if total > 0.0 {
            for (k, w) in weights.iter().enumerate() {
                bag.push(0, k as u32, w / total);
            }
        }
        let len = [length_bucket(history.len(), self.manifest.length_buckets)];
        let user = self.net.user_inputs(&inputs, &bag, &len)?;
        let v: Vec<Vec<f32>> = self.net.user_tower(&user)?.to_vec2()?;
        Ok(v.into_iter().next().expect("one row"))
    }
}
