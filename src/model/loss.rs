//! The training loss as one fused candle op: in-batch sampled softmax cross-entropy.
//!
//! Row `r` of the `[n, n]` score matrix holds the user's similarity to every target in the
//! batch; its own target sits on the diagonal. The logits are `scores * inv_temp + bias`,
//! where `bias` carries the logQ correction per column and `-inf`-like masks for duplicates
//! of the row's target. Composed from candle's elementwise ops this was a dozen `[n, n]`
//! passes forward and as many backward; fused, it is one pass forward (a stable
//! log-sum-exp per row, keeping the softmax) and one backward (`softmax - onehot`).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// What is added to the scaled scores: a bias per column (the logQ correction; empty = none)
/// and cells taken out of the softmax altogether (duplicates of a row's target, which are
/// positives and not negatives), as `(row, column)` pairs sorted by row.
#[derive(Debug, Clone, Default)]
pub struct LogitBias {
    pub columns: Vec<f32>,
    pub masked: Vec<(u32, u32)>,
}

impl LogitBias {
    /// Errors unless it fits an `[n, n]` score matrix: one bias per column (or none), masked
    /// cells off the diagonal and sorted by row.
    pub fn check(&self, n: usize) -> Result<()> {
        if !(self.columns.is_empty() || self.columns.len() == n) {
            candle_core::bail!("in-batch loss needs one bias per column ({n})");
        }
        if self.masked.windows(2).any(|w| w[0].0 > w[1].0)
            || self
                .masked
                .iter()
                .any(|&(r, c)| r as usize >= n || c as usize >= n || r == c)
        {
            candle_core::bail!(
                "in-batch loss: masked cells must be off-diagonal and sorted by row"
            );
        }
        Ok(())
    }
}

/// Mean over rows of `-log softmax(scores[r] * inv_temp + columns)[r]`, with the masked cells
/// excluded, a scalar.
pub fn in_batch_softmax_loss(
    scores: &Tensor,
    bias: Arc<LogitBias>,
    inv_temp: f32,
) -> Result<Tensor> {
    let (n, m) = scores.dims2()?;
    if n != m {
        candle_core::bail!("in-batch loss needs square scores, got {n}x{m}");
    }
    bias.check(n)?;
    scores.contiguous()?.apply_op1(InBatchSoftmax {
        bias,
        inv_temp,
        n,
        probs: parking_lot::Mutex::new(None),
    })
}

/// `exp(x)` to about 3e-7 relative error, in a form the compiler vectorizes (no libm call):
/// `x = n ln 2 + r` with `n` an integer (its power of two built in the exponent bits) and
/// `|r| <= ln 2 / 2`, `r` computed in two parts (Cody-Waite) so it stays exact, and `e^r` by
/// its degree-6 Taylor polynomial. Inputs below -87 give about 1e-38, not 0.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

struct InBatchSoftmax {
    bias: Arc<LogitBias>,
    inv_temp: f32,
    n: usize,
    /// The softmax of the forward pass, for the backward pass.
    probs: parking_lot::Mutex<Option<Vec<f32>>>,
}

/// Row `r`'s softmax of `scores[r] * inv_temp + columns` (the `masked` cells of the row taken
/// out) into `out`; returns the row's loss `lse - logit[r]`. `s` is the row, `n` long.
fn softmax_row(
    s: &[f32],
    r: usize,
    bias: &LogitBias,
    inv_temp: f32,
    masked: &[(u32, u32)],
    out: &mut [f32],
) -> f32 {
    if bias.columns.is_empty() {
        for (o, &x) in out.iter_mut().zip(s) {
            *o = x * inv_temp;
        }
    } else {
        for ((o, &x), &b) in out.iter_mut().zip(s).zip(&bias.columns) {
            *o = x * inv_temp + b;
        }
    }
    for &(_, c) in masked {
        out[c as usize] = f32::NEG_INFINITY;
    }
    let max = out.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let own = out[r];
    let mut sum = 0f32;
    for o in out.iter_mut() {
        let e = fast_exp(*o - max);
        *o = e;
        sum += e;
    }
    for &(_, c) in masked {
        sum -= out[c as usize];
        out[c as usize] = 0.0;
    }
    let inv = 1.0 / sum;
    for o in out.iter_mut() {
        *o *= inv;
    }
    max + sum.ln() - own
}

/// The forward pass over plain slices: the softmax of every row of the `[n, n]` `scores`
/// into `probs` (same shape), and the mean loss. Rows run on the rayon pool.
///
/// The caller checks the shapes and `bias` (see [`in_batch_softmax_loss`]).
pub fn softmax_loss_forward(
    scores: &[f32],
    n: usize,
    bias: &LogitBias,
    inv_temp: f32,
    probs: &mut [f32],
) -> f32 {
    let masked = &bias.masked;
    // Collected, then summed in order, so the reported loss does not depend on scheduling.
    let losses: Vec<f32> = probs[..n * n]
        .par_chunks_mut(n)
        .enumerate()
        .map(|(r, p)| {
            let lo = masked.partition_point(|m| (m.0 as usize) < r);
            let hi = masked.partition_point(|m| (m.0 as usize) <= r);
            let s = &scores[r * n..(r + 1) * n];
            softmax_row(s, r, bias, inv_temp, &masked[lo..hi], p)
        })
        .collect();
    let total: f64 = losses.iter().map(|&l| l as f64).sum();
    (total / n as f64) as f32
}

/// The backward pass in place: `probs` (from [`softmax_loss_forward`]) becomes the gradient
/// of `weight` times the mean loss with respect to the scores, `(probs - onehot) * weight *
/// inv_temp / n`.
pub fn softmax_loss_backward(probs: &mut [f32], n: usize, inv_temp: f32, weight: f32) {
    let scale = weight * inv_temp / n as f32;
    probs[..n * n]
        .par_chunks_mut(n)
        .enumerate()
        .for_each(|(r, row)| {
            for v in row.iter_mut() {
                *v *= scale;
            }
            row[r] -= scale;
        });
}

impl InBatchSoftmax {
    fn scores<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("in-batch loss needs f32 scores");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("in-batch loss needs contiguous scores");
        };
        Ok(&data[start..end])
    }
}

impl CustomOp1 for InBatchSoftmax {
    fn name(&self) -> &'static str {
        "in-batch-softmax-loss"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = self.n;
        let scores = Self::scores(storage, layout)?;
        let mut probs = vec![0f32; n * n];
        let loss = softmax_loss_forward(scores, n, &self.bias, self.inv_temp, &mut probs);
        *self.probs.lock() = Some(probs);
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let n = self.n;
        let Some(mut grad) = self.probs.lock().take() else {
            candle_core::bail!("in-batch loss: backward ran twice or before forward");
        };
        softmax_loss_backward(&mut grad, n, self.inv_temp, grad_res.to_scalar::<f32>()?);
        Ok(Some(Tensor::from_vec(grad, (n, n), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The fused op equals candle's composed cross-entropy, value and gradient.
    #[test]
    fn matches_composed_cross_entropy() {
        let dev = Device::Cpu;
        let n = 5;
        let vals: Vec<f32> = (0..n * n)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 7.0)
            .collect();
        let columns: Vec<f32> = (0..n).map(|j| j as f32 * 0.1).collect();
        let mut dense: Vec<f32> = (0..n * n).map(|i| columns[i % n]).collect();
        dense[n + 3] = -1e9; // a masked duplicate
        dense[4 * n] = -1e9;
        let bias = LogitBias {
            columns,
            masked: vec![(1, 3), (4, 0)],
        };
        let scores = Var::from_vec(vals, (n, n), &dev).unwrap();
        let inv_temp = 10.0f32;

        let fused = in_batch_softmax_loss(scores.as_tensor(), Arc::new(bias), inv_temp).unwrap();
        let g1 = fused.backward().unwrap();

        let b = Tensor::from_vec(dense, (n, n), &dev).unwrap();
        let logits = ((scores.as_tensor() * inv_temp as f64).unwrap() + b).unwrap();
        let labels = Tensor::arange(0u32, n as u32, &dev).unwrap();
        let plain = candle_nn::loss::cross_entropy(&logits, &labels).unwrap();
        let g2 = plain.backward().unwrap();

        let a = fused.to_scalar::<f32>().unwrap();
        let c = plain.to_scalar::<f32>().unwrap();
        assert!((a - c).abs() < 1e-5, "{a} vs {c}");
        let v = |g: &candle_core::backprop::GradStore| -> Vec<f32> {
            g.get(scores.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (v1, v2) = (v(&g1), v(&g2));
        assert_eq!(v1[n + 3], 0.0, "a masked cell gets no gradient");
        for (x, y) in v1.iter().zip(v2) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }

    #[test]
    fn fast_exp_is_close_to_exp() {
        let worst = |lo: i32, hi: i32| -> f32 {
            (lo..=hi)
                .map(|i| i as f32 / 100.0)
                .map(|x| ((fast_exp(x) - x.exp()) / x.exp()).abs())
                .fold(0.0, f32::max)
        };
        assert!(worst(-8700, 8800) < 1e-6, "{}", worst(-8700, 8800));
        assert!(fast_exp(-1e9) < 1e-37);
        assert_eq!(fast_exp(0.0), 1.0);
    }
}
