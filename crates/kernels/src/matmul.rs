//! Dense f32 products against row-major weights `w[m×k]` (one row per output feature, the
//! layout of every linear layer): `y[n×m] = x[n×k] · wᵀ`.

use gemm::Parallelism;

/// Below this many multiply-adds a product runs on the calling thread: splitting a small
/// decode product across threads costs more than it saves.
const PARALLEL_MIN_FLOPS: usize = 1 << 18;

fn parallelism(flops: usize) -> Parallelism {
    if flops >= PARALLEL_MIN_FLOPS && rayon::current_num_threads() > 1 {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    }
}

/// `y[n×m] = x[n×k] · w[m×k]ᵀ` (overwrites `y`).
pub fn matmul_wt(x: &[f32], w: &[f32], y: &mut [f32], n: usize, k: usize, m: usize) {
    assert!(
        x.len() >= n * k && w.len() >= m * k && y.len() >= n * m,
        "matmul_wt: buffers too small"
    );
    if n == 0 || m == 0 {
        return;
    }
    if k == 0 {
        y[..n * m].fill(0.0);
        return;
    }
    // SAFETY: the asserts above bound every access: dst is n×m with row stride m, lhs n×k
    // with row stride k, rhs (= wᵀ) k×m with column stride k.
    unsafe {
        gemm::gemm(
            n,
            m,
            k,
            y.as_mut_ptr(),
            1,
            m as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism(n * m * k),
        );
    }
}

/// Scalar reference for [`matmul_wt`], accumulating in f64.
pub fn matmul_wt_reference(x: &[f32], w: &[f32], y: &mut [f32], n: usize, k: usize, m: usize) {
    for i in 0..n {
        for j in 0..m {
            let dot: f64 = (0..k)
                .map(|c| x[i * k + c] as f64 * w[j * k + c] as f64)
                .sum();
            y[i * m + j] = dot as f32;
        }
    }
}

/// Side of the tiles [`gram_upper`] computes one product at a time.
const GRAM_TILE: usize = 512;

/// The upper triangle (`j ≥ i`) of the Gram matrix `g[k×k] = x[n×k]ᵀ · x` of `n` rows;
/// what lies below the diagonal is unspecified. Callers that sum many Gram matrices mirror
/// once at the end instead of once per call (a transposed copy of 80 M values per window
/// for a 1.5B model's down projection).
pub fn gram_upper(x: &[f32], g: &mut [f32], n: usize, k: usize) {
    assert!(
        x.len() >= n * k && g.len() >= k * k,
        "gram: buffers too small"
    );
    if k == 0 {
        return;
    }
    if n == 0 {
        g[..k * k].fill(0.0);
        return;
    }
    // The result is symmetric: compute the tiles on and above the diagonal only.
    for i0 in (0..k).step_by(GRAM_TILE) {
        let i1 = (i0 + GRAM_TILE).min(k);
        for j0 in (i0..k).step_by(GRAM_TILE) {
            let j1 = (j0 + GRAM_TILE).min(k);
            // SAFETY: dst is rows i0..i1, columns j0..j1 of the k×k `g` (row stride k); lhs
            // = xᵀ restricted to rows i0..i1 (element (i, t) at t·k + i); rhs = x restricted
            // to columns j0..j1 (element (t, j) at t·k + j); all inside the asserted lengths.
            unsafe {
                gemm::gemm(
                    i1 - i0,
                    j1 - j0,
                    n,
                    g.as_mut_ptr().add(i0 * k + j0),
                    1,
                    k as isize,
                    false,
                    x.as_ptr().add(i0),
                    k as isize,
                    1,
                    x.as_ptr().add(j0),
                    1,
                    k as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism(n * (i1 - i0) * (j1 - j0)),
                );
            }
        }
    }
}

/// Scalar reference for [`gram_upper`] (the whole matrix), accumulating in f64.
pub fn gram_reference(x: &[f32], g: &mut [f32], n: usize, k: usize) {
    for i in 0..k {
        for j in 0..k {
            let dot: f64 = (0..n)
                .map(|t| x[t * k + i] as f64 * x[t * k + j] as f64)
                .sum();
            g[i * k + j] = dot as f32;
        }
    }
}

/// `c[r×n] −= a[r×k] · b[k×n]`, each row-major with its own row stride (`ldc`, `lda`,
/// `ldb`), so that blocks of larger matrices are updated in place.
#[allow(clippy::too_many_arguments)]
pub fn matmul_sub(
    c: &mut [f32],
    ldc: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    r: usize,
    k: usize,
    n: usize,
) {
    if r == 0 || n == 0 || k == 0 {
        return;
    }
    assert!(
        c.len() >= (r - 1) * ldc + n
            && a.len() >= (r - 1) * lda + k
            && b.len() >= (k - 1) * ldb + n
            && ldc >= n
            && lda >= k
            && ldb >= n,
        "matmul_sub: buffers too small"
    );
    // SAFETY: the assert bounds the last element each strided operand touches.
    unsafe {
        gemm::gemm(
            r,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            true,
            a.as_ptr(),
            1,
            lda as isize,
            b.as_ptr(),
            1,
            ldb as isize,
            1.0,
            -1.0,
            false,
            false,
            false,
            parallelism(r * n * k),
        );
    }
}

/// Scalar reference for [`matmul_sub`].
#[allow(clippy::too_many_arguments)]
pub fn matmul_sub_reference(
    c: &mut [f32],
    ldc: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    r: usize,
    k: usize,
    n: usize,
) {
    for i in 0..r {
        for j in 0..n {
            let dot: f64 = (0..k)
                .map(|t| a[i * lda + t] as f64 * b[t * ldb + j] as f64)
                .sum();
            c[i * ldc + j] = (c[i * ldc + j] as f64 - dot) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};

    fn random(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    fn assert_close(fast: &[f32], slow: &[f32], tol: f32, what: &str) {
        for (i, (a, b)) in fast.iter().zip(slow).enumerate() {
            assert!((a - b).abs() <= tol, "{what} [{i}]: {a} vs {b}");
        }
    }

    #[test]
    fn gram_upper_matches_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for &(n, k) in &[(1, 7), (33, 64), (300, 96), (5, 1), (40, 1100)] {
            let x = random(&mut rng, n * k);
            let (mut fast, mut slow) = (vec![0f32; k * k], vec![0f32; k * k]);
            gram_upper(&x, &mut fast, n, k);
            gram_reference(&x, &mut slow, n, k);
            let upper = |g: &[f32]| -> Vec<f32> {
                (0..k)
                    .flat_map(|i| g[i * k + i..(i + 1) * k].to_vec())
                    .collect()
            };
            assert_close(
                &upper(&fast),
                &upper(&slow),
                1e-4 * (n as f32).sqrt(),
                &format!("gram ({n},{k})"),
            );
        }
    }

    #[test]
    fn matmul_sub_matches_reference_on_strided_blocks() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        for &(r, k, n, pad) in &[(4, 3, 5, 0), (64, 128, 300, 7), (1, 128, 1, 2)] {
            let (lda, ldb, ldc) = (k + pad, n + pad, n + 2 * pad);
            let a = random(&mut rng, r * lda);
            let b = random(&mut rng, k * ldb);
            let c0 = random(&mut rng, r * ldc);
            let (mut fast, mut slow) = (c0.clone(), c0.clone());
            matmul_sub(&mut fast, ldc, &a, lda, &b, ldb, r, k, n);
            matmul_sub_reference(&mut slow, ldc, &a, lda, &b, ldb, r, k, n);
            assert_close(
                &fast,
                &slow,
                1e-4 * (k as f32).sqrt(),
                &format!("matmul_sub ({r},{k},{n})"),
            );
            // Padding between rows is left alone.
            for i in 0..r {
                assert_eq!(
                    fast[i * ldc + n..(i + 1) * ldc],
                    c0[i * ldc + n..(i + 1) * ldc]
                );
            }
        }
    }

    #[test]
    fn matches_reference_on_random_shapes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for &(n, k, m) in &[
            (1, 576, 192),
            (3, 17, 5),
            (37, 576, 1536),
            (64, 896, 128),
            (1, 1, 1),
        ] {
            let x: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let w: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let (mut fast, mut slow) = (vec![0f32; n * m], vec![0f32; n * m]);
            matmul_wt(&x, &w, &mut fast, n, k, m);
            matmul_wt_reference(&x, &w, &mut slow, n, k, m);
            for (a, b) in fast.iter().zip(&slow) {
                assert!(
                    (a - b).abs() <= 1e-4 * (k as f32).sqrt(),
                    "({n},{k},{m}): {a} vs {b}"
                );
            }
        }
    }
}
