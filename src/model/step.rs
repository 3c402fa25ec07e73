//! The training step by hand: forward and backward of both towers and the in-batch loss on
//! plain slices, with every buffer kept from one step to the next.
//!
//! The network is small (bag pooling, two `input -> hidden -> dim` MLPs, an L2
//! normalization and the `[n, n]` score matrix), so the candle graph of the same step spent
//! most of its time outside the matmuls: some forty elementwise ops forward and backward,
//! each a fresh tensor on one thread, the graph's bookkeeping, and fresh `[n, n]` buffers
//! (BENCHMARKS.md, issue 31). Here each elementwise chain is one pass over the rows, split
//! over the rayon pool; the matmuls call gemm (candle's own CPU kernel) directly, with
//! strides for the transposes; and the dense AdamW is one loop over one flat parameter
//! vector. Serving keeps the candle graph ([`TwoTowerNet`]); a test checks this step's loss
//! and every gradient against that graph's autograd.

use super::loss::{softmax_loss_backward, softmax_loss_forward, LogitBias};
use super::towers::{Bag, Mlp, NetConfig, TwoTowerNet};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::Rng;
use rayon::prelude::*;

/// Where one MLP's tensors sit in the flat dense vector.
#[derive(Debug, Clone, Copy)]
pub struct MlpLayout {
    w1: usize,
    b1: usize,
    w2: usize,
    b2: usize,
    input: usize,
    hidden: usize,
    output: usize,
}

impl MlpLayout {
    fn new(at: usize, input: usize, hidden: usize, output: usize) -> Self {
        let w1 = at;
        let b1 = w1 + hidden * input;
        let w2 = b1 + hidden;
        let b2 = w2 + output * hidden;
        MlpLayout {
            w1,
            b1,
            w2,
            b2,
            input,
            hidden,
            output,
        }
    }

    fn end(&self) -> usize {
        self.b2 + self.output
    }

    fn w1<'a>(&self, p: &'a [f32]) -> &'a [f32] {
        &p[self.w1..self.b1]
    }
    fn b1<'a>(&self, p: &'a [f32]) -> &'a [f32] {
        &p[self.b1..self.w2]
    }
    fn w2<'a>(&self, p: &'a [f32]) -> &'a [f32] {
        &p[self.w2..self.b2]
    }
    fn b2<'a>(&self, p: &'a [f32]) -> &'a [f32] {
        &p[self.b2..self.end()]
    }

    /// The MLP as candle layers (copies), for a servable snapshot.
    fn to_mlp(self, p: &[f32]) -> candle_core::Result<Mlp> {
        let t = |s: &[f32], shape: &[usize]| Tensor::from_slice(s, shape, &Device::Cpu);
        Mlp::from_tensors(
            t(self.w1(p), &[self.hidden, self.input])?,
            t(self.b1(p), &[self.hidden])?,
            t(self.w2(p), &[self.output, self.hidden])?,
            t(self.b2(p), &[self.output])?,
        )
    }
}

/// The dense parameters (history-length embeddings and both towers' MLPs) in one flat
/// vector, in the order the checkpoint lists them: `user_tower.length_embeddings`, then the
/// item tower's `fc1.weight`, `fc1.bias`, `fc2.weight`, `fc2.bias`, then the user tower's.
#[derive(Debug, Clone, Copy)]
pub struct DenseLayout {
    net: NetConfig,
    pub item: MlpLayout,
    pub user: MlpLayout,
    pub total: usize,
}

impl DenseLayout {
    pub fn new(net: &NetConfig) -> Self {
        let length = net.length_buckets * net.input_dim;
        let item = MlpLayout::new(length, net.input_dim, net.hidden, net.dim);
        let user = MlpLayout::new(item.end(), net.input_dim, net.hidden, net.dim);
        DenseLayout {
            net: *net,
            item,
            user,
            total: user.end(),
        }
    }

    fn length<'a>(&self, p: &'a [f32]) -> &'a [f32] {
        &p[..self.item.w1]
    }

    /// PyTorch-style uniform initialization: the length embeddings with standard deviation
    /// 0.05, each layer's weight and bias within `1 / sqrt(fan_in)`. Drawn in layout order.
    pub fn init(&self, rng: &mut StdRng) -> Vec<f32> {
        let mut p = vec![0f32; self.total];
        let mut fill = |range: std::ops::Range<usize>, bound: f32| {
            for x in &mut p[range] {
                *x = rng.gen_range(-bound..bound);
            }
        };
        fill(0..self.item.w1, 0.05 * 3f32.sqrt());
        for l in [self.item, self.user] {
            let b1 = 1.0 / (l.input as f32).sqrt();
            let b2 = 1.0 / (l.hidden as f32).sqrt();
            fill(l.w1..l.b1, b1);
            fill(l.b1..l.w2, b1);
            fill(l.w2..l.b2, b2);
            fill(l.b2..l.end(), b2);
        }
        p
    }

    /// A servable network from the flat parameters and the embedding table (copies).
    pub fn to_net(&self, p: &[f32], embeddings: &[f32]) -> candle_core::Result<TwoTowerNet> {
        let net = self.net;
        Ok(TwoTowerNet {
            cfg: net,
            embeddings: Tensor::from_slice(embeddings, (net.rows, net.input_dim), &Device::Cpu)?,
            length_embeddings: Tensor::from_slice(
                self.length(p),
                (net.length_buckets, net.input_dim),
                &Device::Cpu,
            )?,
            item_mlp: self.item.to_mlp(p)?,
            user_mlp: self.user.to_mlp(p)?,
        })
    }
}

/// AdamW on one slice of parameters with its moment estimates (PyTorch's and candle's
/// formula; `c1`, `c2` are the bias corrections `1 / (1 - beta^t)`).
#[inline]
pub fn adamw(theta: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], h: &AdamHyper) {
    let (b1, b2) = (h.beta1, h.beta2);
    for (((t, m), v), &g) in theta.iter_mut().zip(m).zip(v).zip(g) {
        *m = b1 * *m + (1.0 - b1) * g;
        *v = b2 * *v + (1.0 - b2) * g * g;
        *t = *t * h.decay - h.lr * (*m * h.c1) / ((*v * h.c2).sqrt() + h.eps);
    }
}

/// AdamW's constants for one step.
#[derive(Debug, Clone, Copy)]
pub struct AdamHyper {
    lr: f32,
    decay: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    c1: f32,
    c2: f32,
}

impl AdamHyper {
    /// `step` counts from 1.
    pub fn new(lr: f64, weight_decay: f64, step: usize) -> Self {
        let (beta1, beta2) = (0.9f64, 0.999f64);
        AdamHyper {
            lr: lr as f32,
            decay: (1.0 - lr * weight_decay) as f32,
            beta1: beta1 as f32,
            beta2: beta2 as f32,
            eps: 1e-8,
            c1: (1.0 / (1.0 - beta1.powi(step as i32))) as f32,
            c2: (1.0 / (1.0 - beta2.powi(step as i32))) as f32,
        }
    }
}

/// The dense parameters with their AdamW state, updated in one pass.
pub struct DenseParams {
    pub layout: DenseLayout,
    pub values: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl DenseParams {
    pub fn new(layout: DenseLayout, rng: &mut StdRng) -> Self {
        DenseParams {
            values: layout.init(rng),
            m: vec![0.0; layout.total],
            v: vec![0.0; layout.total],
            layout,
        }
    }

    pub fn update(&mut self, grad: &[f32], h: &AdamHyper) {
        adamw(&mut self.values, &mut self.m, &mut self.v, grad, h);
    }
}

/// One training batch, built on the batch thread: bags over this step's table rows.
#[derive(Debug, Default)]
pub struct Batch {
    /// The table rows the step uses; bags index into this list.
    pub rows: Vec<u32>,
    /// History items' inputs, over `rows`.
    pub item_bag: Bag,
    /// Each example's target item (id row subject to dropout), over `rows`.
    pub target_bag: Bag,
    /// Content-only rows of each target (empty without the content loss), over `rows`.
    pub content_bag: Bag,
    /// Each example's history, over the rows of `item_bag`'s output, weights normalized.
    pub history: Bag,
    /// History-length bucket per example.
    pub lengths: Vec<u32>,
    /// Catalog index of each example's target.
    pub targets: Vec<u32>,
    /// The logQ correction per column and the duplicate-target mask.
    pub bias: LogitBias,
}

/// `c = a · b` (`accumulate`: `c += a · b`) with `a` `[m, k]` and `b` `[k, n]` row-major, or
/// read transposed from their storage: `ta` means `a` is stored `[k, m]`, `tb` that `b` is
/// stored `[n, k]`.
#[allow(clippy::too_many_arguments)]
fn matmul(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    (m, k, n): (usize, usize, usize),
    ta: bool,
    tb: bool,
    accumulate: bool,
) {
    assert!(c.len() >= m * n && a.len() >= m * k && b.len() >= k * n);
    let (a_rs, a_cs) = if ta { (1, m) } else { (k, 1) };
    let (b_rs, b_cs) = if tb { (1, k) } else { (n, 1) };
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the strides above address `a` as [m, k], `b` as [k, n] and `c` as [m, n]
    // within the lengths asserted, and `c` (a unique borrow) overlaps neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// Rows per rayon task in the elementwise passes.
const ROWS_PER_TASK: usize = 64;

/// `buf` resized to `len` and zeroed (its allocation kept).
fn zeroed(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    buf.clear();
    buf.resize(len, 0.0);
    buf
}

/// Adds the column sums of the `[rows, width]` `x` to `out` (`width` long).
fn add_column_sums(out: &mut [f32], x: &[f32], width: usize) {
    for row in x.chunks_exact(width) {
        for (o, &v) in out.iter_mut().zip(row) {
            *o += v;
        }
    }
}

/// One tower's pass over a batch: input `x` `[n, input]`, the ReLU layer `h`, the
/// normalized output `y`, and the backward scratch.
#[derive(Debug, Default)]
struct TowerPass {
    n: usize,
    x: Vec<f32>,
    h: Vec<f32>,
    y: Vec<f32>,
    inv_norm: Vec<f32>,
    /// The gradient with respect to `y`, then (in place) to the layer before the norm.
    dy: Vec<f32>,
    dh: Vec<f32>,
    /// The gradient with respect to `x`.
    dx: Vec<f32>,
}

impl TowerPass {
    /// `x` must hold `n` rows. Computes `h = relu(x W1ᵀ + b1)`, `y = normalize(h W2ᵀ + b2)`.
    fn forward(&mut self, p: &[f32], l: &MlpLayout, n: usize) {
        self.n = n;
        let (hd, out) = (l.hidden, l.output);
        fill_rows(&mut self.h, l.b1(p), n);
        matmul(
            &mut self.h,
            &self.x,
            l.w1(p),
            (n, l.input, hd),
            false,
            true,
            true,
        );
        self.h
            .par_chunks_mut(hd * ROWS_PER_TASK)
            .for_each(|c| c.iter_mut().for_each(|v| *v = v.max(0.0)));
        fill_rows(&mut self.y, l.b2(p), n);
        matmul(
            &mut self.y,
            &self.h,
            l.w2(p),
            (n, hd, out),
            false,
            true,
            true,
        );
        zeroed(&mut self.inv_norm, n);
        self.y
            .par_chunks_mut(out)
            .zip(self.inv_norm.par_iter_mut())
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(row, inv)| {
                // As `l2_normalize`: divide by max(|row|, 1e-12).
                let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                *inv = 1.0 / norm;
                row.iter_mut().for_each(|v| *v /= norm);
            });
    }

    /// With `dy` holding the gradient of the loss with respect to `y`: adds the MLP's
    /// gradients to `grad` (the flat dense gradient) and leaves the input's in `dx`.
    fn backward(&mut self, p: &[f32], l: &MlpLayout, grad: &mut [f32]) {
        let (n, hd, out, inp) = (self.n, l.hidden, l.output, l.input);
        // Through the normalization: (dy - y (y · dy)) / |o|.
        self.dy
            .par_chunks_mut(out)
            .zip(self.y.par_chunks(out))
            .zip(self.inv_norm.par_iter())
            .with_min_len(ROWS_PER_TASK)
            .for_each(|((d, y), &inv)| {
                let dot: f32 = d.iter().zip(y).map(|(a, b)| a * b).sum();
                for (dv, &yv) in d.iter_mut().zip(y) {
                    *dv = (*dv - yv * dot) * inv;
                }
            });
        matmul(
            &mut grad[l.w2..l.b2],
            &self.dy,
            &self.h,
            (out, n, hd),
            true,
            false,
            true,
        );
        add_column_sums(&mut grad[l.b2..l.end()], &self.dy, out);
        zeroed(&mut self.dh, n * hd);
        matmul(
            &mut self.dh,
            &self.dy,
            l.w2(p),
            (n, out, hd),
            false,
            false,
            false,
        );
        // Through the ReLU (h > 0 where its input was).
        self.dh
            .par_chunks_mut(hd * ROWS_PER_TASK)
            .zip(self.h.par_chunks(hd * ROWS_PER_TASK))
            .for_each(|(d, h)| {
                for (dv, &hv) in d.iter_mut().zip(h) {
                    if hv <= 0.0 {
                        *dv = 0.0;
                    }
                }
            });
        matmul(
            &mut grad[l.w1..l.b1],
            &self.dh,
            &self.x,
            (hd, n, inp),
            true,
            false,
            true,
        );
        add_column_sums(&mut grad[l.b1..l.w2], &self.dh, hd);
        zeroed(&mut self.dx, n * inp);
        matmul(
            &mut self.dx,
            &self.dh,
            l.w1(p),
            (n, hd, inp),
            false,
            false,
            false,
        );
    }
}

/// `buf` as `n` copies of `row`.
fn fill_rows(buf: &mut Vec<f32>, row: &[f32], n: usize) {
    buf.clear();
    for _ in 0..n {
        buf.extend_from_slice(row);
    }
}

/// The step's buffers, reused from one step to the next.
#[derive(Debug, Default)]
pub struct Step {
    /// This step's table rows `[rows, input]`, and their gradient.
    pub leaf: Vec<f32>,
    pub d_leaf: Vec<f32>,
    /// The history items' inputs and their gradient.
    items: Vec<f32>,
    d_items: Vec<f32>,
    user: TowerPass,
    target: TowerPass,
    content: TowerPass,
    scores: Vec<f32>,
    probs: Vec<f32>,
    aligned: Vec<f32>,
    aligned_probs: Vec<f32>,
    /// The gradient of the dense parameters (flat, as [`DenseLayout`]).
    pub grad: Vec<f32>,
}

impl Step {
    /// Forward and backward of one batch: the loss (the in-batch softmax plus
    /// `content_weight` times the content alignment loss, see `TrainConfig::content_loss`),
    /// with `d_leaf` (the gradient of the rows `batch.rows` of `table`) and `grad` (the dense
    /// parameters') filled.
    pub fn run(
        &mut self,
        table: &[f32],
        dense: &DenseParams,
        batch: &Batch,
        inv_temp: f32,
        content_weight: f32,
    ) -> candle_core::Result<f32> {
        let l = &dense.layout;
        let p = &dense.values;
        let w = l.net.input_dim;
        let n = batch.targets.len();
        let dim = l.net.dim;
        batch.bias.check(n)?;
        if batch.history.n != n || batch.target_bag.n != n || batch.lengths.len() != n {
            candle_core::bail!("training batch: every bag needs one row per example");
        }
        check_bag(&batch.item_bag, batch.rows.len())?;
        check_bag(&batch.target_bag, batch.rows.len())?;
        check_bag(&batch.history, batch.item_bag.n)?;
        if let Some(&b) = batch
            .lengths
            .iter()
            .find(|&&b| b as usize >= l.net.length_buckets)
        {
            candle_core::bail!("training batch: length bucket {b} out of range");
        }
        let content = content_weight > 0.0;
        if content {
            if batch.content_bag.n != n {
                candle_core::bail!("training batch: the content bag needs one row per example");
            }
            check_bag(&batch.content_bag, batch.rows.len())?;
        }

        // Forward.
        self.leaf.clear();
        for &r in &batch.rows {
            self.leaf
                .extend_from_slice(&table[r as usize * w..(r as usize + 1) * w]);
        }
        batch.item_bag.scatter(
            &self.leaf,
            zeroed(&mut self.items, batch.item_bag.n * w),
            w,
            false,
        );
        batch
            .history
            .scatter(&self.items, zeroed(&mut self.user.x, n * w), w, false);
        let lengths = l.length(p);
        for (row, &b) in self.user.x.chunks_exact_mut(w).zip(&batch.lengths) {
            let e = &lengths[b as usize * w..(b as usize + 1) * w];
            row.iter_mut().zip(e).for_each(|(x, e)| *x += e);
        }
        self.user.forward(p, &l.user, n);
        batch
            .target_bag
            .scatter(&self.leaf, zeroed(&mut self.target.x, n * w), w, false);
        self.target.forward(p, &l.item, n);
        zeroed(&mut self.scores, n * n);
        matmul(
            &mut self.scores,
            &self.user.y,
            &self.target.y,
            (n, dim, n),
            false,
            true,
            false,
        );
        zeroed(&mut self.probs, n * n);
        let mut loss =
            softmax_loss_forward(&self.scores, n, &batch.bias, inv_temp, &mut self.probs);
        if content {
            batch
                .content_bag
                .scatter(&self.leaf, zeroed(&mut self.content.x, n * w), w, false);
            self.content.forward(p, &l.item, n);
            zeroed(&mut self.aligned, n * n);
            matmul(
                &mut self.aligned,
                &self.content.y,
                &self.target.y,
                (n, dim, n),
                false,
                true,
                false,
            );
            // Duplicates of a target are masked as in the main loss; no logQ (the negatives
            // are items, not draws).
            let mask = LogitBias {
                columns: Vec::new(),
                masked: batch.bias.masked.clone(),
            };
            zeroed(&mut self.aligned_probs, n * n);
            let aux =
                softmax_loss_forward(&self.aligned, n, &mask, inv_temp, &mut self.aligned_probs);
            loss += content_weight * aux;
        }

        // Backward.
        softmax_loss_backward(&mut self.probs, n, inv_temp, 1.0);
        zeroed(&mut self.user.dy, n * dim);
        matmul(
            &mut self.user.dy,
            &self.probs,
            &self.target.y,
            (n, n, dim),
            false,
            false,
            false,
        );
        zeroed(&mut self.target.dy, n * dim);
        matmul(
            &mut self.target.dy,
            &self.probs,
            &self.user.y,
            (n, n, dim),
            true,
            false,
            false,
        );
        let grad = zeroed(&mut self.grad, l.total);
        if content {
            softmax_loss_backward(&mut self.aligned_probs, n, inv_temp, content_weight);
            zeroed(&mut self.content.dy, n * dim);
            matmul(
                &mut self.content.dy,
                &self.aligned_probs,
                &self.target.y,
                (n, n, dim),
                false,
                false,
                false,
            );
            matmul(
                &mut self.target.dy,
                &self.aligned_probs,
                &self.content.y,
                (n, n, dim),
                true,
                false,
                true,
            );
            self.content.backward(p, &l.item, grad);
        }
        self.target.backward(p, &l.item, grad);
        self.user.backward(p, &l.user, grad);
        for (row, &b) in self.user.dx.chunks_exact(w).zip(&batch.lengths) {
            let g = &mut grad[b as usize * w..(b as usize + 1) * w];
            g.iter_mut().zip(row).for_each(|(g, d)| *g += d);
        }
        batch.history.scatter(
            &self.user.dx,
            zeroed(&mut self.d_items, batch.item_bag.n * w),
            w,
            true,
        );
        let d_leaf = zeroed(&mut self.d_leaf, batch.rows.len() * w);
        batch.item_bag.scatter(&self.d_items, d_leaf, w, true);
        batch.target_bag.scatter(&self.target.dx, d_leaf, w, true);
        if content {
            batch.content_bag.scatter(&self.content.dx, d_leaf, w, true);
        }
        Ok(loss)
    }
}

/// Errors unless every entry of `bag` reads one of `rows` input rows.
fn check_bag(bag: &Bag, rows: usize) -> candle_core::Result<()> {
    if let Some(&bad) = bag.rows.iter().find(|&&r| r as usize >= rows) {
        candle_core::bail!("training batch: bag row {bad} is outside {rows} rows");
    }
    if let Some(&bad) = bag.segs.iter().find(|&&s| s as usize >= bag.n) {
        candle_core::bail!(
            "training batch: bag segment {bad} is outside {} rows",
            bag.n
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::loss::in_batch_softmax_loss;
    use candle_core::Var;
    use rand::SeedableRng;
    use std::sync::Arc;

    /// The same step composed from candle ops (the serving network's own functions) and
    /// differentiated by candle's autograd.
    fn candle_loss(
        net: &TwoTowerNet,
        b: &Batch,
        inv_temp: f32,
        content_weight: f32,
    ) -> candle_core::Result<Tensor> {
        let item_inputs = net.item_inputs(&b.item_bag)?;
        let users = net.user_tower(&net.user_inputs(&item_inputs, &b.history, &b.lengths)?)?;
        let targets = net.item_tower(&net.item_inputs(&b.target_bag)?)?;
        let scores = users.matmul(&targets.t()?)?;
        let loss = in_batch_softmax_loss(&scores, Arc::new(b.bias.clone()), inv_temp)?;
        if content_weight <= 0.0 {
            return Ok(loss);
        }
        let content = net.item_tower(&net.item_inputs(&b.content_bag)?)?;
        let aligned = content.matmul(&targets.t()?)?;
        let mask = LogitBias {
            columns: Vec::new(),
            masked: b.bias.masked.clone(),
        };
        let aux = in_batch_softmax_loss(&aligned, Arc::new(mask), inv_temp)?;
        loss + (aux * content_weight as f64)?
    }

    fn random_batch(rng: &mut StdRng, table_rows: usize, n: usize, buckets: usize) -> Batch {
        let rows: Vec<u32> = (0..table_rows as u32 / 2).map(|r| r * 2 + 1).collect();
        let items = 12usize;
        let mut b = Batch {
            rows,
            item_bag: Bag::with_capacity(items, 0),
            target_bag: Bag::with_capacity(n, 0),
            content_bag: Bag::with_capacity(n, 0),
            history: Bag::with_capacity(n, 0),
            ..Batch::default()
        };
        let nr = b.rows.len() as u32;
        for i in 0..items as u32 {
            for _ in 0..3 {
                b.item_bag
                    .push(i, rng.gen_range(0..nr), rng.gen_range(0.2..1.0));
            }
        }
        // Targets: a few repeat, so the duplicate mask is exercised.
        let targets: Vec<u32> = (0..n).map(|_| rng.gen_range(0..(n as u32 - 3))).collect();
        for (e, &t) in targets.iter().enumerate() {
            let e = e as u32;
            b.target_bag.push(e, t % nr, 1.0);
            b.target_bag.push(e, (t * 7 + 3) % nr, 0.5);
            b.content_bag.push(e, (t * 7 + 3) % nr, 0.5);
            b.content_bag.push(e, (t * 5 + 1) % nr, 0.7);
            for k in 0..(e % 4) {
                b.history
                    .push(e, (e + k) % items as u32, 1.0 / (e % 4) as f32);
            }
            b.lengths.push(e % buckets as u32);
        }
        let mut by: Vec<(u32, u32)> = targets
            .iter()
            .enumerate()
            .map(|(j, &t)| (t, j as u32))
            .collect();
        by.sort_unstable();
        for same in by.chunk_by(|a, b| a.0 == b.0) {
            for &(_, r) in same {
                for &(_, j) in same {
                    if r != j {
                        b.bias.masked.push((r, j));
                    }
                }
            }
        }
        b.bias.masked.sort_unstable();
        assert!(!b.bias.masked.is_empty());
        b.bias.columns = (0..n).map(|j| (j % 5) as f32 * 0.3).collect();
        b.targets = targets;
        b
    }

    /// The hand-written step gives candle autograd's loss and gradients, for the table rows
    /// and for every dense tensor, with and without the content loss.
    #[test]
    fn hand_step_matches_candle_autograd() {
        let net = NetConfig {
            rows: 40,
            input_dim: 8,
            hidden: 16,
            dim: 6,
            length_buckets: 3,
        };
        let mut rng = StdRng::seed_from_u64(5);
        let layout = DenseLayout::new(&net);
        let dense = DenseParams::new(layout, &mut rng);
        let table: Vec<f32> = (0..net.rows * net.input_dim)
            .map(|_| rng.gen_range(-0.5..0.5))
            .collect();
        let batch = random_batch(&mut rng, net.rows, 10, net.length_buckets);
        for content_weight in [0.0f32, 0.4] {
            let mut step = Step::default();
            let loss = step
                .run(&table, &dense, &batch, 7.0, content_weight)
                .unwrap();

            // The reference: the same parameters as candle vars, the leaf as gathered rows.
            let w = net.input_dim;
            let leaf: Vec<f32> = batch
                .rows
                .iter()
                .flat_map(|&r| table[r as usize * w..(r as usize + 1) * w].to_vec())
                .collect();
            let leaf = Var::from_vec(leaf, (batch.rows.len(), w), &Device::Cpu).unwrap();
            let mut reference = layout.to_net(&dense.values, &table).unwrap();
            reference.embeddings = leaf.as_tensor().clone();
            let vars: Vec<(String, Var)> = reference
                .named_tensors()
                .into_iter()
                .filter(|(name, _)| name != "embeddings")
                .map(|(name, t)| (name, Var::from_tensor(&t).unwrap()))
                .collect();
            let var = |name: &str| vars.iter().find(|v| v.0 == name).unwrap().1.clone();
            let mlp = |tower: &str| {
                Mlp::from_tensors(
                    var(&format!("{tower}.fc1.weight")).as_tensor().clone(),
                    var(&format!("{tower}.fc1.bias")).as_tensor().clone(),
                    var(&format!("{tower}.fc2.weight")).as_tensor().clone(),
                    var(&format!("{tower}.fc2.bias")).as_tensor().clone(),
                )
                .unwrap()
            };
            reference.length_embeddings = var("user_tower.length_embeddings").as_tensor().clone();
            reference.item_mlp = mlp("item_tower");
            reference.user_mlp = mlp("user_tower");
            let expected = candle_loss(&reference, &batch, 7.0, content_weight).unwrap();
            let grads = expected.backward().unwrap();
            let expected = expected.to_scalar::<f32>().unwrap();
            assert!(
                (loss - expected).abs() < 1e-4 * expected.abs().max(1.0),
                "loss {loss} vs candle {expected} (content {content_weight})"
            );

            let close = |name: &str, ours: &[f32], theirs: &Tensor| {
                let theirs: Vec<f32> = theirs.flatten_all().unwrap().to_vec1().unwrap();
                assert_eq!(ours.len(), theirs.len(), "{name}");
                let scale = theirs.iter().fold(1e-3f32, |a, b| a.max(b.abs()));
                for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-4 * scale,
                        "{name}[{i}]: {a} vs candle {b} (content {content_weight})"
                    );
                }
            };
            close("leaf", &step.d_leaf, grads.get(leaf.as_tensor()).unwrap());
            // The dense gradient, tensor by tensor in layout order.
            let mut at = 0;
            for (name, v) in &vars {
                let len = v.as_tensor().elem_count();
                let g = grads.get(v.as_tensor()).unwrap();
                close(name, &step.grad[at..at + len], g);
                at += len;
            }
            assert_eq!(at, layout.total);
        }
    }

    /// The fused AdamW is candle's AdamW: the same parameters after three steps.
    #[test]
    fn fused_adamw_matches_candle() {
        use candle_nn::Optimizer;
        let theta0 = vec![0.5f32, -1.0, 2.0, 0.0];
        let grads = [
            vec![0.1f32, -0.2, 0.3, 0.0],
            vec![-0.5, 0.1, 0.0, 1.0],
            vec![0.2, 0.2, -0.1, -0.3],
        ];
        let var = Var::from_vec(theta0.clone(), 4, &Device::Cpu).unwrap();
        let mut opt = candle_nn::AdamW::new(
            vec![var.clone()],
            candle_nn::ParamsAdamW {
                lr: 3e-3,
                weight_decay: 1e-2,
                ..Default::default()
            },
        )
        .unwrap();
        let (mut theta, mut m, mut v) = (theta0, vec![0f32; 4], vec![0f32; 4]);
        for (t, g) in grads.iter().enumerate() {
            // A loss whose gradient is g: sum(g * theta).
            let gt = Tensor::from_slice(g, 4, &Device::Cpu).unwrap();
            let loss = (var.as_tensor() * gt).unwrap().sum_all().unwrap();
            opt.backward_step(&loss).unwrap();
            adamw(
                &mut theta,
                &mut m,
                &mut v,
                g,
                &AdamHyper::new(3e-3, 1e-2, t + 1),
            );
        }
        let theirs: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        for (a, b) in theta.iter().zip(&theirs) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }
}
