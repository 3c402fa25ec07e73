//! The network: one shared embedding table, the item tower and the user tower. Each block has
//! `load(vb, cfg)` and the `vb.pp(..)` names equal the tensor names in `model.safetensors`, so
//! the same code serves training (a `VarMap`) and serving (the mmaped checkpoint).
//!
//! Inputs arrive as sparse bags of (row, weight) built by the featurizer; pooling is an
//! `index_select` of table rows followed by an `index_add` into one row per item, which is
//! differentiable in candle and never materializes a dense item-by-feature matrix.

use candle_core::{Device, Result, Tensor, D};
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

    /// From its four tensors: `fc1` `[hidden, input]` and `[hidden]`, `fc2` `[output, hidden]`
    /// and `[output]`.
    pub fn from_tensors(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Result<Self> {
        Ok(Mlp {
            fc1: Linear::new(w1, Some(b1)),
            fc2: Linear::new(w2, Some(b2)),
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
    ///
    /// One fused, differentiable op (forward: scatter-add of weighted rows; backward: the
    /// same bag transposed), so neither pass materializes an `[nnz, width]` intermediate.
    /// In training that intermediate was most of each step's memory traffic.
    pub fn pool(&self, table: &Tensor) -> Result<Tensor> {
        let (rows, _) = table.dims2()?;
        if let Some(&bad) = self.rows.iter().find(|&&r| r as usize >= rows) {
            candle_core::bail!("bag row {bad} is outside a table of {rows} rows");
        }
        if let Some(&bad) = self.segs.iter().find(|&&s| s as usize >= self.n) {
            candle_core::bail!("bag segment {bad} is outside {} output rows", self.n);
        }
        table.contiguous()?.apply_op1(BagOp {
            bag: std::sync::Arc::new(self.clone()),
        })
    }

    /// `out[seg] += weight * input[row]` over contiguous row-major slices of width `width`
    /// (with `transpose`, `out[row] += weight * input[seg]`).
    ///
    /// Big bags are split by columns over the thread pool: each worker owns a disjoint range
    /// of every output row's columns, so no two write the same float and no entry is
    /// visited twice per column. (Splitting by entries would need atomics or per-thread
    /// copies of `out`, which in the backward pass is as large as the table slice.)
    pub(super) fn scatter(&self, input: &[f32], out: &mut [f32], width: usize, transpose: bool) {
        let threads = rayon::current_num_threads().min(width / 16).max(1);
        if threads == 1 || self.rows.len() * width < PARALLEL_SCATTER_MIN {
            self.scatter_columns(
                input,
                out.as_mut_ptr(),
                out.len(),
                width,
                0..width,
                transpose,
            );
            return;
        }
        let out_len = out.len();
        let out_ptr = SendPtr(out.as_mut_ptr());
        let step = width.div_ceil(threads);
        rayon::scope(|scope| {
            for t in 0..threads {
                let cols = (t * step).min(width)..((t + 1) * step).min(width);
                let out_ptr = &out_ptr;
                scope.spawn(move |_| {
                    self.scatter_columns(input, out_ptr.0, out_len, width, cols, transpose)
                });
            }
        });
    }

    /// [`Bag::scatter`] restricted to the columns `cols` of every row.
    fn scatter_columns(
        &self,
        input: &[f32],
        out: *mut f32,
        out_len: usize,
        width: usize,
        cols: std::ops::Range<usize>,
        transpose: bool,
    ) {
        let span = cols.len();
        for ((&r, &w), &s) in self.rows.iter().zip(&self.weights).zip(&self.segs) {
            let (from, to) = if transpose {
                (s as usize, r as usize)
            } else {
                (r as usize, s as usize)
            };
            let src = &input[from * width + cols.start..from * width + cols.end];
            let start = to * width + cols.start;
            assert!(start + span <= out_len, "bag entry outside the output");
            // SAFETY: in bounds (checked above), and the callers give concurrent calls
            // disjoint column ranges, so this slice aliases no other live one.
            let dst = unsafe { std::slice::from_raw_parts_mut(out.add(start), span) };
            for (d, x) in dst.iter_mut().zip(src) {
                *d += w * x;
            }
        }
    }
}

/// Bags smaller than this many multiply-adds are pooled on the calling thread.
const PARALLEL_SCATTER_MIN: usize = 1 << 16;

/// A raw output pointer shared by the column workers of [`Bag::scatter`].
struct SendPtr(*mut f32);
// SAFETY: the workers write disjoint column ranges through it, and `rayon::scope` ends
// before the buffer it points into is used again.
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// The candle op behind [`Bag::pool`] (CPU only, f32).
struct BagOp {
    bag: std::sync::Arc<Bag>,
}

impl candle_core::CustomOp1 for BagOp {
    fn name(&self) -> &'static str {
        "embedding-bag"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let candle_core::CpuStorage::F32(data) = storage else {
            candle_core::bail!("embedding-bag needs an f32 table");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("embedding-bag needs a contiguous table");
        };
        let (_, width) = layout.shape().dims2()?;
        let mut out = vec![0f32; self.bag.n * width];
        self.bag.scatter(&data[start..end], &mut out, width, false);
        Ok((
            candle_core::CpuStorage::F32(out),
            candle_core::Shape::from((self.bag.n, width)),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (rows, width) = arg.dims2()?;
        let grad: Vec<f32> = grad_res.contiguous()?.flatten_all()?.to_vec1()?;
        let mut out = vec![0f32; rows * width];
        self.bag.scatter(&grad, &mut out, width, true);
        Ok(Some(Tensor::from_vec(out, (rows, width), arg.device())?))
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

    #[test]
    fn bag_gradient_matches_index_select_and_index_add() {
        let dev = Device::Cpu;
        let table = candle_core::Var::from_tensor(
            &Tensor::new(&[[1f32, -2.], [0.5, 1.], [2., 3.], [-1., 0.]], &dev).unwrap(),
        )
        .unwrap();
        let mut bag = Bag::with_capacity(3, 5);
        for (seg, row, w) in [
            (0, 0, 0.5),
            (0, 2, 1.0),
            (1, 1, 2.0),
            (2, 2, -1.0),
            (2, 0, 0.25),
        ] {
            bag.push(seg, row, w);
        }
        let probe = Tensor::new(&[[1f32, 2.], [3., -1.], [0.5, 4.]], &dev).unwrap();
        let fused = bag.pool(table.as_tensor()).unwrap();
        let g1 = (fused.clone() * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();

        let rows = Tensor::new(bag.rows.as_slice(), &dev).unwrap();
        let weights = Tensor::from_slice(&bag.weights, (5, 1), &dev).unwrap();
        let segs = Tensor::new(bag.segs.as_slice(), &dev).unwrap();
        let picked = table
            .as_tensor()
            .index_select(&rows, 0)
            .unwrap()
            .broadcast_mul(&weights)
            .unwrap();
        let plain = Tensor::zeros((3, 2), candle_core::DType::F32, &dev)
            .unwrap()
            .index_add(&segs, &picked, 0)
            .unwrap();
        let g2 = (plain.clone() * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();

        let v = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        assert_eq!(v(&fused), v(&plain));
        assert_eq!(
            v(g1.get(table.as_tensor()).unwrap()),
            v(g2.get(table.as_tensor()).unwrap())
        );
    }

    /// Bags big enough to be split over the thread pool give the serial result, forward and
    /// backward (each output float is written by one worker only).
    #[test]
    fn big_bags_pool_the_same_when_split_by_columns() {
        let (rows, width, n, nnz) = (500usize, 64usize, 300usize, 4000usize);
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let data: Vec<f32> = (0..rows * width)
            .map(|_| (next() % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let mut bag = Bag::with_capacity(n, nnz);
        for _ in 0..nnz {
            let (seg, row) = ((next() % n as u64) as u32, (next() % rows as u64) as u32);
            bag.push(seg, row, (next() % 100) as f32 / 50.0);
        }
        assert!(bag.rows.len() * width >= PARALLEL_SCATTER_MIN);
        let serial = |input: &[f32], out_rows: usize, transpose: bool| -> Vec<f32> {
            let mut out = vec![0f32; out_rows * width];
            bag.scatter_columns(
                input,
                out.as_mut_ptr(),
                out.len(),
                width,
                0..width,
                transpose,
            );
            out
        };
        let mut forward = vec![0f32; n * width];
        bag.scatter(&data, &mut forward, width, false);
        assert_eq!(forward, serial(&data, n, false));
        let mut backward = vec![0f32; rows * width];
        bag.scatter(&forward, &mut backward, width, true);
        assert_eq!(backward, serial(&forward, rows, true));
    }
}
