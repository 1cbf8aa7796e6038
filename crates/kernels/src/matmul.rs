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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};

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
