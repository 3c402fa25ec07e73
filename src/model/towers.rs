//! The network: one shared embedding table, the item tower and the user tower. Each block has
//! `load(vb, cfg)` and the `vb.pp(..)` names equal the tensor names in `model.safetensors`, so
//! the same code serves training (a `VarMap`) and serving (the mmaped checkpoint).
//!
//! Inputs arrive as sparse bags of (row, weight) built by the featurizer; pooling is an
//! `index_select` of table rows followed by an `index_add` into one row per item, which is
//! differentiable in candle and never materializes a dense item-by-feature matrix.

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{Linear, Module, VarBuilder};
use serde::{Deserialize, Serialize};

/// Shapes of the network. `rows` comes from the feature config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// Rows of the shared embedding table (`FeatureConfig::offsets().total`).
    pub rows: usize,
    /// Width of the embedding table, the towers' input.
    pub input_dim: usize,
    pub hidden: usize,
    /// Output dimension of both towers.
    pub dim: usize,
    /// Buckets of the history-length embedding in the user tower.
    pub length_buckets: usize,
}

/// The tensors of a checkpoint with their shapes, in a stable order. The loader checks a file
/// against this list before building anything, so a bad file gets a precise error.
pub fn tensor_specs(cfg: &NetConfig) -> Vec<(String, Vec<usize>)> {
    let mut v = vec![
        ("embeddings".to_string(), vec![cfg.rows, cfg.input_dim]),
        (
            "user_tower.length_embeddings".to_string(),
            vec![cfg.length_buckets, cfg.input_dim],
        ),
    ];
    for tower in ["item_tower", "user_tower"] {
        v.push((
            format!("{tower}.fc1.weight"),
            vec![cfg.hidden, cfg.input_dim],
        ));
        v.push((format!("{tower}.fc1.bias"), vec![cfg.hidden]));
        v.push((format!("{tower}.fc2.weight"), vec![cfg.dim, cfg.hidden]));
        v.push((format!("{tower}.fc2.bias"), vec![cfg.dim]));
    }
    v
}

/// Two linear layers with a ReLU between them.
#[derive(Debug, Clone)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    pub fn load(vb: VarBuilder, input: usize, hidden: usize, output: usize) -> Result<Self> {
        Ok(Mlp {
            fc1: candle_nn::linear(input, hidden, vb.pp("fc1"))?,
            fc2: candle_nn::linear(hidden, output, vb.pp("fc2"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(x)?.relu()?)
    }

    /// A copy that shares no storage (a snapshot of weights that keep training).
    pub fn deep_copy(&self) -> Result<Self> {
        let cp = |l: &Linear| -> Result<Linear> {
            Ok(Linear::new(
                l.weight().copy()?,
                l.bias().map(|b| b.copy()).transpose()?,
            ))
        };
        Ok(Mlp {
            fc1: cp(&self.fc1)?,
            fc2: cp(&self.fc2)?,
        })
    }
}

/// Rows `x / max(|x|, 1e-12)`.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    x.broadcast_div(&norm)
}

/// A sparse bag: `out[seg] += weight * table[row]` for each entry, `n` output rows.
#[derive(Debug, Clone, Default)]
pub struct Bag {
    pub rows: Vec<u32>,
    pub weights: Vec<f32>,
    pub segs: Vec<u32>,
    pub n: usize,
}

impl Bag {
    pub fn with_capacity(n: usize, nnz: usize) -> Self {
        Bag {
            rows: Vec::with_capacity(nnz),
            weights: Vec::with_capacity(nnz),
            segs: Vec::with_capacity(nnz),
            n,
        }
    }

    pub fn push(&mut self, seg: u32, row: u32, weight: f32) {
        self.rows.push(row);
        self.weights.push(weight);
        self.segs.push(seg);
    }

    /// `[n, width]`: the weighted sum of the selected rows of `table` per segment.
    pub fn pool(&self, table: &Tensor) -> Result<Tensor> {
        let (_, width) = table.dims2()?;
        let dev = table.device();
        let zeros = Tensor::zeros((self.n, width), DType::F32, dev)?;
        if self.rows.is_empty() {
            return Ok(zeros);
        }
        let nnz = self.rows.len();
        let rows = Tensor::from_slice(&self.rows, nnz, dev)?;
        let weights = Tensor::from_slice(&self.weights, (nnz, 1), dev)?;
        let segs = Tensor::from_slice(&self.segs, nnz, dev)?;
        let picked = table.index_select(&rows, 0)?.broadcast_mul(&weights)?;
        zeros.index_add(&segs, &picked, 0)
    }
}

/// The whole network.
#[derive(Debug, Clone)]
pub struct TwoTowerNet {
    pub cfg: NetConfig,
    /// `[rows, input_dim]`: id, category, token, year, price and popularity rows, shared by the
    /// item tower and (through the items of a history) the user tower.
    pub embeddings: Tensor,
    /// `[length_buckets, input_dim]`, added to the pooled history.
    pub length_embeddings: Tensor,
    pub item_mlp: Mlp,
    pub user_mlp: Mlp,
}

impl TwoTowerNet {
    pub fn load(vb: VarBuilder, cfg: &NetConfig) -> Result<Self> {
        let init = candle_nn::Init::Randn {
            mean: 0.0,
            stdev: 0.05,
        };
        Ok(TwoTowerNet {
            cfg: *cfg,
            embeddings: vb.get_with_hints((cfg.rows, cfg.input_dim), "embeddings", init)?,
            length_embeddings: vb.pp("user_tower").get_with_hints(
                (cfg.length_buckets, cfg.input_dim),
                "length_embeddings",
                init,
            )?,
            item_mlp: Mlp::load(vb.pp("item_tower"), cfg.input_dim, cfg.hidden, cfg.dim)?,
            user_mlp: Mlp::load(vb.pp("user_tower"), cfg.input_dim, cfg.hidden, cfg.dim)?,
        })
    }

    pub fn device(&self) -> &Device {
        self.embeddings.device()
    }

    /// Item tower input: `[n, input_dim]` from a bag over table rows.
    pub fn item_inputs(&self, bag: &Bag) -> Result<Tensor> {
        bag.pool(&self.embeddings)
    }

    /// Item tower: inputs `[n, input_dim]` to L2-normalized vectors `[n, dim]`.
    pub fn item_tower(&self, inputs: &Tensor) -> Result<Tensor> {
        l2_normalize(&self.item_mlp.forward(inputs)?)
    }

    /// User tower input: the weighted pool of history item inputs plus the history-length
    /// embedding. `history` is a bag over the rows of `item_inputs` (weights already
    /// normalized per user); `lengths` holds one length bucket per user.
    pub fn user_inputs(
        &self,
        item_inputs: &Tensor,
        history: &Bag,
        lengths: &[u32],
    ) -> Result<Tensor> {
        let pooled = history.pool(item_inputs)?;
        let idx = Tensor::from_slice(lengths, lengths.len(), self.device())?;
        pooled.add(&self.length_embeddings.index_select(&idx, 0)?)
    }

    /// User tower: inputs `[n, input_dim]` to L2-normalized vectors `[n, dim]`.
    pub fn user_tower(&self, inputs: &Tensor) -> Result<Tensor> {
        l2_normalize(&self.user_mlp.forward(inputs)?)
    }

    /// Every tensor with its checkpoint name, in the order of [`tensor_specs`].
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![
            ("embeddings".to_string(), self.embeddings.clone()),
            (
                "user_tower.length_embeddings".to_string(),
                self.length_embeddings.clone(),
            ),
        ];
        for (tower, mlp) in [
            ("item_tower", &self.item_mlp),
            ("user_tower", &self.user_mlp),
        ] {
            for (layer, lin) in [("fc1", &mlp.fc1), ("fc2", &mlp.fc2)] {
                v.push((format!("{tower}.{layer}.weight"), lin.weight().clone()));
                let bias = lin.bias().expect("tower layers have a bias").clone();
                v.push((format!("{tower}.{layer}.bias"), bias));
            }
        }
        v
    }
}

/// The history-length bucket: `min(floor(log2(n + 1)), buckets - 1)`; 0 for an empty history.
pub fn length_bucket(n: usize, buckets: usize) -> u32 {
    ((usize::BITS - 1 - (n + 1).leading_zeros()) as usize).min(buckets - 1) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_buckets() {
        assert_eq!(length_bucket(0, 8), 0);
        assert_eq!(length_bucket(1, 8), 1);
        assert_eq!(length_bucket(2, 8), 1);
        assert_eq!(length_bucket(3, 8), 2);
        assert_eq!(length_bucket(50, 8), 5);
        assert_eq!(length_bucket(1000, 4), 3);
    }

    #[test]
    fn bag_pools_weighted_rows() {
        let table = Tensor::new(&[[1f32, 0.], [0., 1.], [2., 2.]], &Device::Cpu).unwrap();
        let mut bag = Bag::with_capacity(2, 3);
        bag.push(0, 0, 0.5);
        bag.push(0, 2, 1.0);
        bag.push(1, 1, 2.0);
        let out: Vec<Vec<f32>> = bag.pool(&table).unwrap().to_vec2().unwrap();
        assert_eq!(out, vec![vec![2.5, 2.0], vec![0.0, 2.0]]);
    }
}
