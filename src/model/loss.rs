//! The training loss as one fused candle op: in-batch sampled softmax cross-entropy.
//!
//! Row `r` of the `[n, n]` score matrix holds the user's similarity to every target in the
//! batch; its own target sits on the diagonal. The logits are `scores * inv_temp + bias`,
//! where `bias` carries the logQ correction per column and `-inf`-like masks for duplicates
//! of the row's target. Composed from candle's elementwise ops this was a dozen `[n, n]`
//! passes forward and as many backward; fused, it is one pass forward (a stable
//! log-sum-exp per row, keeping the softmax) and one backward (`softmax - onehot`).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use std::sync::Arc;

/// Mean over rows of `-log softmax(scores[r] * inv_temp + bias[r])[r]`, a scalar.
/// `bias` is row-major `[n, n]`.
pub fn in_batch_softmax_loss(
    scores: &Tensor,
    bias: Arc<Vec<f32>>,
    inv_temp: f32,
) -> Result<Tensor> {
    let (n, m) = scores.dims2()?;
    if n != m || bias.len() != n * n {
        candle_core::bail!("in-batch loss needs square scores and bias, got {n}x{m}");
    }
    scores.contiguous()?.apply_op1(InBatchSoftmax {
        bias,
        inv_temp,
        n,
        probs: parking_lot::Mutex::new(None),
    })
}

struct InBatchSoftmax {
    bias: Arc<Vec<f32>>,
    inv_temp: f32,
    n: usize,
    /// The softmax of the forward pass, for the backward pass.
    probs: parking_lot::Mutex<Option<Vec<f32>>>,
}

impl InBatchSoftmax {
    /// The logits of row `r` into `out`; returns their log-sum-exp.
    fn row(&self, scores: &[f32], r: usize, out: &mut [f32]) -> f32 {
        let n = self.n;
        let s = &scores[r * n..(r + 1) * n];
        let b = &self.bias[r * n..(r + 1) * n];
        let mut max = f32::NEG_INFINITY;
        for ((o, &x), &bb) in out.iter_mut().zip(s).zip(b) {
            *o = x * self.inv_temp + bb;
            max = max.max(*o);
        }
        let sum: f32 = out.iter().map(|&z| (z - max).exp()).sum();
        max + sum.ln()
    }

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
        let mut total = 0f64;
        for r in 0..n {
            let p = &mut probs[r * n..(r + 1) * n];
            let lse = self.row(scores, r, p);
            total += (lse - p[r]) as f64;
            for v in p.iter_mut() {
                *v = (*v - lse).exp();
            }
        }
        *self.probs.lock() = Some(probs);
        let loss = (total / n as f64) as f32;
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let n = self.n;
        let Some(mut grad) = self.probs.lock().take() else {
            candle_core::bail!("in-batch loss: backward ran twice or before forward");
        };
        let scale = grad_res.to_scalar::<f32>()? * self.inv_temp / n as f32;
        for v in grad.iter_mut() {
            *v *= scale;
        }
        for r in 0..n {
            grad[r * n + r] -= scale;
        }
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
        let mut bias: Vec<f32> = (0..n * n).map(|i| (i % n) as f32 * 0.1).collect();
        bias[n + 3] = -1e9; // a masked duplicate
        let scores = Var::from_vec(vals, (n, n), &dev).unwrap();
        let inv_temp = 10.0f32;

        let fused =
            in_batch_softmax_loss(scores.as_tensor(), Arc::new(bias.clone()), inv_temp).unwrap();
        let g1 = fused.backward().unwrap();

        let b = Tensor::from_vec(bias, (n, n), &dev).unwrap();
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
        for (x, y) in v(&g1).iter().zip(v(&g2)) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }
}
