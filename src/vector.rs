//! Vector arithmetic shared by the index scans, the re-ranker and the pipeline: the dot
//! product that every similarity here is (vectors are L2-normalised, so it is the cosine).

/// Dot product: AVX2 with FMA where the CPU has them (checked at run time, once per call: an
/// atomic load), otherwise a portable loop written for auto-vectorization.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA, checked just above.
        return unsafe { dot_avx2(a, b) };
    }
    dot_portable(a, b)
}

/// Eight lanes summed independently, so that the compiler vectorizes it.
#[inline]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    let mut acc = [0f32; 8];
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Two 8-lane FMA accumulators over the common length of `a` and `b`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut i = 0;
    // SAFETY (all loads): i + 8 (or i + 16) <= n, so every load stays inside both slices.
    while i + 16 <= n {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
        acc1 = _mm256_fmadd_ps(
            _mm256_loadu_ps(pa.add(i + 8)),
            _mm256_loadu_ps(pb.add(i + 8)),
            acc1,
        );
        i += 16;
    }
    if i + 8 <= n {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
        i += 8;
    }
    let acc = _mm256_add_ps(acc0, acc1);
    let lanes = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let pairs = _mm_add_ps(lanes, _mm_movehl_ps(lanes, lanes));
    let one = _mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1));
    let mut sum = _mm_cvtss_f32(one);
    while i < n {
        sum += *pa.add(i) * *pb.add(i);
        i += 1;
    }
    sum
}

/// The dot product of `q` with each row of `rows` (a row-major matrix of `q.len()` columns),
/// written to `out` (cleared first). Scoring a block of rows at once pays for the CPU check
/// once and sums four rows' lanes together, which at 64 dimensions is as much work as the
/// multiplications.
pub fn dot_rows(q: &[f32], rows: &[f32], out: &mut Vec<f32>) {
    out.clear();
    let dim = q.len();
    if dim == 0 {
        return;
    }
    debug_assert_eq!(rows.len() % dim, 0);
    #[cfg(target_arch = "x86_64")]
    if dim.is_multiple_of(8)
        && std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
    {
        // SAFETY: the CPU supports AVX2 and FMA, checked just above; dim is a multiple of 8.
        unsafe { dot_rows_avx2(q, rows, out) };
        return;
    }
    out.extend(rows.chunks_exact(dim).map(|r| dot(q, r)));
}

/// Four rows at a time, one 8-lane accumulator each, reduced together with horizontal adds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_rows_avx2(q: &[f32], rows: &[f32], out: &mut Vec<f32>) {
    use std::arch::x86_64::*;
    let dim = q.len();
    let n = rows.len() / dim;
    out.reserve(n);
    let (pq, pr) = (q.as_ptr(), rows.as_ptr());
    let mut r = 0;
    // SAFETY (all loads): row r + 3 < n and j + 8 <= dim, so every load of row r..r+4 stays
    // inside `rows`, and every load of `q` inside `q`.
    while r + 4 <= n {
        let base = pr.add(r * dim);
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut j = 0;
        while j < dim {
            let x = _mm256_loadu_ps(pq.add(j));
            for (t, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(x, _mm256_loadu_ps(base.add(t * dim + j)), *a);
            }
            j += 8;
        }
        let ab = _mm256_hadd_ps(acc[0], acc[1]);
        let cd = _mm256_hadd_ps(acc[2], acc[3]);
        let abcd = _mm256_hadd_ps(ab, cd);
        let sums = _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
        let mut four = [0f32; 4];
        _mm_storeu_ps(four.as_mut_ptr(), sums);
        out.extend_from_slice(&four);
        r += 4;
    }
    while r < n {
        out.push(dot_avx2(q, &rows[r * dim..(r + 1) * dim]));
        r += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_naive_at_every_length() {
        let a: Vec<f32> = (0..70).map(|i| i as f32 * 0.1).collect();
        let b: Vec<f32> = (0..70).map(|i| 1.0 - i as f32 * 0.05).collect();
        for n in [0, 1, 7, 8, 15, 16, 17, 37, 64, 70] {
            let (x, y) = (&a[..n], &b[..n]);
            let naive: f32 = x.iter().zip(y).map(|(p, q)| p * q).sum();
            assert!((dot(x, y) - naive).abs() < 1e-3, "n = {n}");
            assert!((dot_portable(x, y) - naive).abs() < 1e-3, "n = {n}");
        }
    }

    #[test]
    fn dot_rows_matches_dot_for_every_row() {
        for dim in [3, 8, 16, 64] {
            let q: Vec<f32> = (0..dim).map(|i| (i as f32 * 0.37).sin()).collect();
            for n in [0, 1, 3, 4, 5, 9] {
                let rows: Vec<f32> = (0..n * dim).map(|i| (i as f32 * 0.11).cos()).collect();
                let mut out = vec![9.0];
                dot_rows(&q, &rows, &mut out);
                assert_eq!(out.len(), n, "dim {dim}, {n} rows");
                for (i, s) in out.iter().enumerate() {
                    let want = dot(&q, &rows[i * dim..(i + 1) * dim]);
                    assert!((s - want).abs() < 1e-4, "dim {dim}, row {i}: {s} vs {want}");
                }
            }
        }
    }
}
