//! Vector arithmetic shared by the index scans, the re-ranker and the pipeline: the dot
//! product that every similarity here is (vectors are L2-normalised, so it is the cosine),
//! and [`Vector`], an item vector as the serving process keeps it.

use half::f16;
use half::slice::HalfFloatSliceExt;
use triomphe::ThinArc;

/// An item vector as the serving process keeps it: half-precision floats in one shared
/// allocation, behind a one-word pointer (the length is in the allocation). The catalog
/// entry, the embedded index's RAM copy and its category blocks hold the same one, replaced
/// (not changed) on update.
///
/// Why half precision: these vectors were the largest part of a restarted server's memory,
/// 320 bytes each at d = 64 (256 bytes of f32 and the `Arc`'s counts, in mimalloc's 320-byte
/// class), 320 MB at 1M items; in half precision they take 160 (issue 37). The thin pointer
/// saves 8 bytes in each of the three holders (about 3.3M at 1M items). A component of a
/// unit vector keeps a relative error under 2^-11, so a dot product with an f32 query moves
/// by at most about 5e-4, and a unit vector's squared norm by at most about 1e-3. Values past
/// ±65,504 become infinite, which the index's input checks reject; the model's vectors are
/// unit length.
///
/// Read it as f32: [`Vector::dot`] for one similarity, [`Vector::extend_to`] to make rows of
/// a matrix, [`Vector::to_vec`] for a copy.
#[derive(Clone, PartialEq)]
pub struct Vector(ThinArc<(), f16>);

impl Vector {
    /// Half-precision values given by their bit patterns (as [`Vector::bits`] gives them).
    pub fn from_bits(bits: impl ExactSizeIterator<Item = u16>) -> Vector {
        Vector(ThinArc::from_header_and_iter((), bits.map(f16::from_bits)))
    }

    fn halves(&self) -> &[f16] {
        &self.0.slice
    }

    pub fn len(&self) -> usize {
        self.halves().len()
    }

    pub fn is_empty(&self) -> bool {
        self.halves().is_empty()
    }

    /// The values as f32 (exactly: every half-precision value is an f32).
    pub fn iter(&self) -> impl ExactSizeIterator<Item = f32> + '_ {
        self.halves().iter().map(|h| h.to_f32())
    }

    /// The values' bit patterns, for a file that keeps them as they are.
    pub fn bits(&self) -> impl ExactSizeIterator<Item = u16> + '_ {
        self.halves().iter().map(|h| h.to_bits())
    }

    pub fn to_vec(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.len());
        self.extend_to(&mut out);
        out
    }

    /// Appends the values to `out` as f32 (eight at a time with F16C where the CPU has it).
    pub fn extend_to(&self, out: &mut Vec<f32>) {
        out.reserve(self.len());
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx") && std::is_x86_feature_detected!("f16c") {
            // SAFETY: the CPU supports AVX and F16C, checked just above, and `out` has room
            // for every value.
            unsafe { widen_f16c(self.halves(), out) };
            return;
        }
        out.extend(self.iter());
    }

    /// The dot product with `q`, over their common length.
    #[inline]
    pub fn dot(&self, q: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the CPU supports AVX2, FMA and F16C, checked just above.
            return unsafe { dot_f16_avx2(q, self.halves()) };
        }
        q.iter()
            .zip(self.halves().iter())
            .map(|(a, b)| a * b.to_f32())
            .sum()
    }

    /// The cosine of the angle to the L2-normalised `q`, over their common length: the dot
    /// product divided by this vector's own norm, so that a unit vector rounded slightly off
    /// unit length by half precision scores as its direction does, as the engine and the
    /// exact backend (which normalise in f32) score it. 0 for a zero vector.
    pub fn cosine(&self, q: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        let (dot, norm2) = if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the CPU supports AVX2, FMA and F16C, checked just above.
            unsafe { dot_norm2_f16_avx2(q, self.halves()) }
        } else {
            dot_norm2_portable(q, self.halves())
        };
        #[cfg(not(target_arch = "x86_64"))]
        let (dot, norm2) = dot_norm2_portable(q, self.halves());
        if norm2 > 0.0 {
            dot / norm2.sqrt()
        } else {
            0.0
        }
    }

    /// Cosine similarity with the L2-normalised `q`. Vectors of different lengths (a model
    /// swap in progress) compare as unrelated (0) instead of panicking.
    pub fn similarity(&self, q: &[f32]) -> f32 {
        if self.len() != q.len() {
            return 0.0;
        }
        self.dot(q)
    }

    /// Whether `a` and `b` are one allocation (not merely equal values).
    pub fn ptr_eq(a: &Vector, b: &Vector) -> bool {
        a.0.ptr() == b.0.ptr()
    }
}

impl From<&[f32]> for Vector {
    fn from(v: &[f32]) -> Vector {
        let mut halves = vec![f16::ZERO; v.len()];
        halves.convert_from_f32_slice(v);
        Vector(ThinArc::from_header_and_slice((), &halves))
    }
}

impl From<Vec<f32>> for Vector {
    fn from(v: Vec<f32>) -> Vector {
        Vector::from(&v[..])
    }
}

impl<const N: usize> From<[f32; N]> for Vector {
    fn from(v: [f32; N]) -> Vector {
        Vector::from(&v[..])
    }
}

impl std::fmt::Debug for Vector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// `(q · h, h · h)` over the common length, one value at a time.
fn dot_norm2_portable(q: &[f32], h: &[f16]) -> (f32, f32) {
    q.iter().zip(h).fold((0.0, 0.0), |(d, n), (a, b)| {
        let b = b.to_f32();
        (d + a * b, n + b * b)
    })
}

/// [`dot_norm2_portable`]: eight halves at a time widened to f32, one FMA accumulator for
/// each sum.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_norm2_f16_avx2(q: &[f32], h: &[f16]) -> (f32, f32) {
    use std::arch::x86_64::*;
    let n = q.len().min(h.len());
    let (pq, ph) = (q.as_ptr(), h.as_ptr() as *const u16);
    let mut dot = _mm256_setzero_ps();
    let mut norm2 = _mm256_setzero_ps();
    let mut i = 0;
    // SAFETY (all loads): i + 8 <= n, so every load stays inside both slices.
    while i + 8 <= n {
        let x = _mm256_cvtph_ps(_mm_loadu_si128(ph.add(i) as *const __m128i));
        dot = _mm256_fmadd_ps(_mm256_loadu_ps(pq.add(i)), x, dot);
        norm2 = _mm256_fmadd_ps(x, x, norm2);
        i += 8;
    }
    let (mut d, mut nn) = (hsum(dot), hsum(norm2));
    while i < n {
        let x = h[i].to_f32();
        d += *pq.add(i) * x;
        nn += x * x;
        i += 1;
    }
    (d, nn)
}

/// [`Vector::extend_to`] with F16C; `out` has room for `h.len()` more values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn widen_f16c(h: &[f16], out: &mut Vec<f32>) {
    use std::arch::x86_64::*;
    let (n, start) = (h.len(), out.len());
    let (src, dst) = (h.as_ptr() as *const u16, out.as_mut_ptr().add(start));
    let mut i = 0;
    // SAFETY (all loads and stores): i + 8 <= n, so eight halves are read inside `h` and
    // eight floats written inside the room `out` has past `start`.
    while i + 8 <= n {
        let wide = _mm256_cvtph_ps(_mm_loadu_si128(src.add(i) as *const __m128i));
        _mm256_storeu_ps(dst.add(i), wide);
        i += 8;
    }
    while i < n {
        *dst.add(i) = h[i].to_f32();
        i += 1;
    }
    // SAFETY: the `n` values past `start` are written.
    out.set_len(start + n);
}

/// [`Vector::dot`]: eight halves at a time widened to f32 (`vcvtph2ps`), two FMA accumulators.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16_avx2(q: &[f32], h: &[f16]) -> f32 {
    use std::arch::x86_64::*;
    let n = q.len().min(h.len());
    let (pq, ph) = (q.as_ptr(), h.as_ptr() as *const u16);
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut i = 0;
    // SAFETY (all loads): i + 8 (or i + 16) <= n, so every load stays inside both slices
    // (eight halves are the 16 bytes `_mm_loadu_si128` reads).
    while i + 16 <= n {
        let h0 = _mm256_cvtph_ps(_mm_loadu_si128(ph.add(i) as *const __m128i));
        let h1 = _mm256_cvtph_ps(_mm_loadu_si128(ph.add(i + 8) as *const __m128i));
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pq.add(i)), h0, acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(pq.add(i + 8)), h1, acc1);
        i += 16;
    }
    if i + 8 <= n {
        let h0 = _mm256_cvtph_ps(_mm_loadu_si128(ph.add(i) as *const __m128i));
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pq.add(i)), h0, acc0);
        i += 8;
    }
    let mut sum = hsum(_mm256_add_ps(acc0, acc1));
    while i < n {
        sum += *pq.add(i) * h[i].to_f32();
        i += 1;
    }
    sum
}

/// The sum of the eight lanes of `acc`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn hsum(acc: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let lanes = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let pairs = _mm_add_ps(lanes, _mm_movehl_ps(lanes, lanes));
    _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)))
}

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
    let mut sum = hsum(_mm256_add_ps(acc0, acc1));
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

/// Symmetric int8 codes of `v`, appended to `out`: `v[i] ≈ code[i] * scale`. Returns the
/// scale (0 for an all-zero vector, whose codes are all 0). Codes stay in -127..=127, which
/// [`i8_rows_at_least`] relies on.
pub fn quantize_i8(v: &[f32], out: &mut Vec<i8>) -> f32 {
    let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    if max == 0.0 || !max.is_finite() {
        out.extend(std::iter::repeat_n(0, v.len()));
        return 0.0;
    }
    let inv = 127.0 / max;
    out.extend(
        v.iter()
            .map(|x| (x * inv).round().clamp(-127.0, 127.0) as i8),
    );
    max / 127.0
}

/// The rows of int8 codes (row-major, `q.len()` columns) that score at least `floor`, where
/// row `r` scores `(q · row_r) * (scales[r] * q_scale)`: `(r, score)` is appended to `out`
/// for each. One pass that keeps the scores in registers and writes out only the rows that
/// pass: in a scan of a category, most rows fail the floor, and the codes are a quarter of
/// the bytes of the f32 rows (a scan is bound by memory bandwidth; BENCHMARKS.md, 12-04).
pub fn i8_rows_at_least(
    q: &[i8],
    q_scale: f32,
    rows: &[i8],
    scales: &[f32],
    floor: f32,
    out: &mut Vec<(usize, f32)>,
) {
    let dim = q.len();
    if dim == 0 {
        return;
    }
    // The AVX2 loads rely on it.
    assert_eq!(rows.len(), scales.len() * dim, "one scale per row");
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if dim.is_multiple_of(32) && std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above; dim is a multiple of 32.
        done = unsafe { i8_rows_at_least_avx2(q, q_scale, rows, scales, floor, out) };
    }
    for r in done..scales.len() {
        let score =
            dot_i8_portable(q, &rows[r * dim..(r + 1) * dim]) as f32 * (scales[r] * q_scale);
        if score >= floor {
            out.push((r, score));
        }
    }
}

fn dot_i8_portable(a: &[i8], b: &[i8]) -> i32 {
    a.iter().zip(b).map(|(&x, &y)| x as i32 * y as i32).sum()
}

/// Four rows at a time. `maddubs` multiplies unsigned by signed bytes, so the query's sign
/// moves onto the row (`sign`), and |q| * ±x over adjacent pairs fits i16 (2 * 127 * 127);
/// `madd` by ones widens the pairs to i32 before they are summed. The four sums are scaled
/// and compared with the floor together; a row is written out only when it passes. Returns
/// how many rows it scanned (all but the last `n % 4`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn i8_rows_at_least_avx2(
    q: &[i8],
    q_scale: f32,
    rows: &[i8],
    scales: &[f32],
    floor: f32,
    out: &mut Vec<(usize, f32)>,
) -> usize {
    use std::arch::x86_64::*;
    let dim = q.len();
    let n = scales.len();
    let (pq, pr, ps) = (q.as_ptr(), rows.as_ptr(), scales.as_ptr());
    let ones = _mm256_set1_epi16(1);
    let (qs, fl) = (_mm_set1_ps(q_scale), _mm_set1_ps(floor));
    let mut r = 0;
    // SAFETY (all loads): row r + 3 < n and j + 32 <= dim, so every load of rows r..r+4 stays
    // inside `rows` (n * dim bytes), of `scales` inside `scales`, and of `q` inside `q`.
    while r + 4 <= n {
        let base = pr.add(r * dim);
        let mut acc = [_mm256_setzero_si256(); 4];
        let mut j = 0;
        while j < dim {
            let qj = _mm256_loadu_si256(pq.add(j) as *const __m256i);
            let abs_q = _mm256_sign_epi8(qj, qj);
            for (t, a) in acc.iter_mut().enumerate() {
                let x = _mm256_loadu_si256(base.add(t * dim + j) as *const __m256i);
                let pairs = _mm256_maddubs_epi16(abs_q, _mm256_sign_epi8(x, qj));
                *a = _mm256_add_epi32(*a, _mm256_madd_epi16(pairs, ones));
            }
            j += 32;
        }
        let ab = _mm256_hadd_epi32(acc[0], acc[1]);
        let cd = _mm256_hadd_epi32(acc[2], acc[3]);
        let abcd = _mm256_hadd_epi32(ab, cd);
        let sums = _mm_add_epi32(
            _mm256_castsi256_si128(abcd),
            _mm256_extracti128_si256(abcd, 1),
        );
        let scores = _mm_mul_ps(
            _mm_cvtepi32_ps(sums),
            _mm_mul_ps(_mm_loadu_ps(ps.add(r)), qs),
        );
        let pass = _mm_movemask_ps(_mm_cmp_ps::<_CMP_GE_OQ>(scores, fl));
        if pass != 0 {
            let mut four = [0f32; 4];
            _mm_storeu_ps(four.as_mut_ptr(), scores);
            for (t, &score) in four.iter().enumerate() {
                if pass & (1 << t) != 0 {
                    out.push((r + t, score));
                }
            }
        }
        r += 4;
    }
    r
}

/// The eigenvalues and eigenvectors of a symmetric `n × n` matrix (row-major), largest
/// eigenvalue first; eigenvector `i` is row `i` of the returned matrix. Cyclic Jacobi
/// rotations, in f64: for the small covariance matrices of the index (one per category
/// block, `dim × dim`), where simplicity beats speed.
pub fn symmetric_eigen(a: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    assert_eq!(a.len(), n * n, "an n × n matrix");
    let mut a = a.to_vec();
    // v's columns are the eigenvectors as they converge.
    let mut v = vec![0f64; n * n];
    (0..n).for_each(|i| v[i * n + i] = 1.0);
    let scale: f64 = a.iter().map(|x| x * x).sum::<f64>().max(f64::MIN_POSITIVE);
    for _sweep in 0..64 {
        let off: f64 = (0..n)
            .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
            .map(|(i, j)| a[i * n + j] * a[i * n + j])
            .sum();
        if off <= 1e-24 * scale {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                // The rotation that zeroes a[p][q] (Numerical Recipes, 11.1).
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = if theta >= 0.0 { 1.0 } else { -1.0 }
                    / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                let rotate = |m: &mut [f64], x: usize, y: usize| {
                    let (mx, my) = (m[x], m[y]);
                    m[x] = c * mx - s * my;
                    m[y] = s * mx + c * my;
                };
                for k in 0..n {
                    rotate(&mut a, k * n + p, k * n + q);
                }
                for k in 0..n {
                    rotate(&mut a, p * n + k, q * n + k);
                }
                for k in 0..n {
                    rotate(&mut v, k * n + p, k * n + q);
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| a[y * n + y].total_cmp(&a[x * n + x]));
    let values = order.iter().map(|&i| a[i * n + i]).collect();
    let vectors = order
        .iter()
        .flat_map(|&i| (0..n).map(move |k| (k, i)))
        .map(|(k, i)| v[k * n + i])
        .collect();
    (values, vectors)
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
    fn a_half_precision_vector_keeps_its_values_and_dot_products_to_within_rounding() {
        let a: Vec<f32> = (0..70).map(|i| (i as f32 * 0.37).sin() * 0.3).collect();
        let b: Vec<f32> = (0..70).map(|i| (i as f32 * 0.11).cos() * 0.3).collect();
        for n in [0, 1, 7, 8, 15, 16, 17, 37, 64, 70] {
            let (x, y) = (&a[..n], &b[..n]);
            let v = Vector::from(y);
            assert_eq!(v.len(), n);
            for (got, want) in v.iter().zip(y) {
                assert!(
                    (got - want).abs() <= want.abs() / 2048.0,
                    "n = {n}: {got} vs {want}"
                );
            }
            assert_eq!(v.to_vec(), v.iter().collect::<Vec<_>>());
            // Against the f32 dot product of the rounded values, to float precision; against
            // the unrounded ones, to within the rounding.
            let rounded = dot(x, &v.to_vec());
            assert!((v.dot(x) - rounded).abs() < 1e-5, "n = {n}");
            assert!((v.dot(x) - dot(x, y)).abs() < 1e-3, "n = {n}");
            assert_eq!(Vector::from_bits(v.bits()), v);
        }
        // The cosine divides by the vector's own norm, whatever its length.
        let q = [0.6, 0.8, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        for scale in [1.0, 0.999, 3.0] {
            let v = Vector::from(q.map(|x| x * scale));
            assert!((v.cosine(&q) - 1.0).abs() < 1e-6, "scale {scale}");
        }
        assert_eq!(Vector::from([0.0; 9]).cosine(&q), 0.0);
        let mut out = vec![7.0];
        Vector::from([0.5, -0.25]).extend_to(&mut out);
        assert_eq!(out, [7.0, 0.5, -0.25]);
        assert_eq!(
            Vector::from([1.0, 2.0]).similarity(&[1.0]),
            0.0,
            "another length"
        );
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

    #[test]
    fn i8_rows_at_least_matches_the_integer_dot_at_the_extremes() {
        for dim in [3, 32, 64, 96] {
            // Full-scale codes of both signs: the case that would overflow i16 pair sums.
            let q: Vec<i8> = (0..dim)
                .map(|i| if i % 3 == 0 { -127 } else { 127 })
                .collect();
            for n in [0, 1, 4, 7, 13] {
                let rows: Vec<i8> = (0..n * dim)
                    .map(|i| [127i8, -127, 0, 5, -64][i % 5])
                    .collect();
                let scales: Vec<f32> = (0..n).map(|r| 0.5 + r as f32).collect();
                let want: Vec<(usize, f32)> = (0..n)
                    .map(|r| {
                        let d = dot_i8_portable(&q, &rows[r * dim..(r + 1) * dim]);
                        (r, d as f32 * (scales[r] * 0.25))
                    })
                    .collect();
                let mut all = Vec::new();
                i8_rows_at_least(&q, 0.25, &rows, &scales, f32::NEG_INFINITY, &mut all);
                assert_eq!(all, want, "dim {dim}, {n} rows");
                // A floor keeps exactly the rows at or above it, in row order.
                if let Some(&(_, floor)) = want.get(n / 2) {
                    let mut passed = Vec::new();
                    i8_rows_at_least(&q, 0.25, &rows, &scales, floor, &mut passed);
                    let kept: Vec<(usize, f32)> =
                        want.iter().copied().filter(|&(_, s)| s >= floor).collect();
                    assert_eq!(passed, kept, "dim {dim}, {n} rows, floor {floor}");
                }
            }
        }
    }

    #[test]
    fn int8_codes_approximate_the_dot_product() {
        let a: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin() / 5.7).collect();
        let b: Vec<f32> = (0..64).map(|i| (i as f32 * 0.91).cos() / 5.7).collect();
        let (mut ca, mut cb) = (Vec::new(), Vec::new());
        let (sa, sb) = (quantize_i8(&a, &mut ca), quantize_i8(&b, &mut cb));
        let mut out = Vec::new();
        i8_rows_at_least(&ca, sa, &cb, &[sb], f32::NEG_INFINITY, &mut out);
        let approx = out[0].1;
        assert!(
            (approx - dot(&a, &b)).abs() < 2e-3,
            "{approx} vs {}",
            dot(&a, &b)
        );
        let mut zero = Vec::new();
        assert_eq!(quantize_i8(&[0.0; 4], &mut zero), 0.0);
        assert_eq!(zero, vec![0; 4]);
    }

    #[test]
    fn eigenvectors_of_a_symmetric_matrix() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let n = 12;
        // A covariance: B^T B of random rows, so every eigenvalue is >= 0.
        let b: Vec<f64> = (0..40 * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut a = vec![0f64; n * n];
        for row in b.chunks_exact(n) {
            for i in 0..n {
                for j in 0..n {
                    a[i * n + j] += row[i] * row[j];
                }
            }
        }
        let (values, vectors) = symmetric_eigen(&a, n);
        assert!(values.windows(2).all(|w| w[0] >= w[1]), "largest first");
        for (i, &lambda) in values.iter().enumerate() {
            let v = &vectors[i * n..(i + 1) * n];
            let norm: f64 = v.iter().map(|x| x * x).sum();
            assert!((norm - 1.0).abs() < 1e-9);
            for r in 0..n {
                let av: f64 = (0..n).map(|c| a[r * n + c] * v[c]).sum();
                assert!((av - lambda * v[r]).abs() < 1e-8, "A v = λ v");
            }
        }
        let trace: f64 = (0..n).map(|i| a[i * n + i]).sum();
        assert!((values.iter().sum::<f64>() - trace).abs() < 1e-8);
    }
}
