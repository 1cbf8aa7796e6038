//! Dense f32 products. The one every linear layer uses reads row-major weights `w[m×k]` (one
//! row per output feature): `y[n×m] = x[n×k] · wᵀ`; the others serve the quantizers (Gram
//! matrices, GPTQ's in-place block updates, the low-rank branches' gradients).

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

/// A matrix operand: element `(i, j)` at `data[i·row + j·col]`, so one buffer serves as
/// itself, its transpose, or a block of a larger matrix.
#[derive(Clone, Copy)]
struct Strided<'a> {
    data: &'a [f32],
    row: usize,
    col: usize,
}

impl<'a> Strided<'a> {
    fn row_major(data: &'a [f32], ld: usize) -> Self {
        Self {
            data,
            row: ld,
            col: 1,
        }
    }

    fn transposed(data: &'a [f32], ld: usize) -> Self {
        Self {
            data,
            row: 1,
            col: ld,
        }
    }

    /// Whether an `r×c` view stays inside the buffer.
    fn fits(&self, r: usize, c: usize) -> bool {
        r == 0 || c == 0 || (r - 1) * self.row + (c - 1) * self.col < self.data.len()
    }
}

/// How [`product`] treats its destination, and its name in errors.
#[derive(Clone, Copy)]
struct Op {
    /// `dst −= lhs · rhs` instead of `dst = lhs · rhs`.
    subtract: bool,
    /// Large products may use the rayon pool; `false` keeps the caller's thread only.
    may_split: bool,
    what: &'static str,
}

impl Op {
    const SET: Op = Op {
        subtract: false,
        may_split: true,
        what: "",
    };

    const fn named(self, what: &'static str) -> Op {
        Op { what, ..self }
    }
}

/// `dst[m×n] = lhs[m×k] · rhs[k×n]`, or `dst −= lhs · rhs` with `subtract`; `dst` is
/// row-major with row stride `ldd`. The one place recoup calls into `gemm`.
fn product(
    dst: &mut [f32],
    ldd: usize,
    lhs: Strided,
    rhs: Strided,
    (m, k, n): (usize, usize, usize),
    op: Op,
) {
    let Op {
        subtract,
        may_split,
        what,
    } = op;
    if m == 0 || n == 0 {
        return;
    }
    let out = Strided::row_major(dst, ldd);
    assert!(
        out.fits(m, n) && ldd >= n && lhs.fits(m, k) && rhs.fits(k, n),
        "{what}: buffers too small"
    );
    if k == 0 {
        if !subtract {
            (0..m).for_each(|i| dst[i * ldd..i * ldd + n].fill(0.0));
        }
        return;
    }
    // SAFETY: `fits` bounds the last element each strided view touches, and `dst` is
    // borrowed mutably while `lhs` and `rhs` are shared borrows, so they do not alias.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ldd as isize,
            subtract,
            lhs.data.as_ptr(),
            lhs.col as isize,
            lhs.row as isize,
            rhs.data.as_ptr(),
            rhs.col as isize,
            rhs.row as isize,
            1.0,
            if subtract { -1.0 } else { 1.0 },
            false,
            false,
            false,
            if may_split {
                parallelism(m * n * k)
            } else {
                Parallelism::None
            },
        );
    }
}

/// `y[n×m] = x[n×k] · w[m×k]ᵀ` (overwrites `y`).
pub fn matmul_wt(x: &[f32], w: &[f32], y: &mut [f32], n: usize, k: usize, m: usize) {
    let (x, w) = (Strided::row_major(x, k), Strided::transposed(w, k));
    product(y, m, x, w, (n, k, m), Op::SET.named("matmul_wt"));
}

/// [`matmul_wt`] on the calling thread only, for callers that split the work themselves.
pub fn matmul_wt_serial(x: &[f32], w: &[f32], y: &mut [f32], n: usize, k: usize, m: usize) {
    let (x, w) = (Strided::row_major(x, k), Strided::transposed(w, k));
    product(
        y,
        m,
        x,
        w,
        (n, k, m),
        Op {
            may_split: false,
            ..Op::SET.named("matmul_wt_serial")
        },
    );
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

/// `c[m×n] = a[m×k] · b[k×n]` (overwrites `c`).
pub fn matmul(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) {
    let (a, b) = (Strided::row_major(a, k), Strided::row_major(b, n));
    product(c, n, a, b, (m, k, n), Op::SET.named("matmul"));
}

/// `c[m×n] = a[k×m]ᵀ · b[k×n]` (overwrites `c`).
pub fn matmul_tn(a: &[f32], b: &[f32], c: &mut [f32], k: usize, m: usize, n: usize) {
    let (a, b) = (Strided::transposed(a, m), Strided::row_major(b, n));
    product(c, n, a, b, (m, k, n), Op::SET.named("matmul_tn"));
}

/// Scalar reference for [`matmul`] and [`matmul_tn`]: `c[m×n] = op(a) · b` with `op(a)`
/// element `(i, t)` at `a[i·a_row + t·a_col]`, accumulating in f64.
pub fn matmul_reference(
    a: &[f32],
    (a_row, a_col): (usize, usize),
    b: &[f32],
    c: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
) {
    for i in 0..m {
        for j in 0..n {
            let dot: f64 = (0..k)
                .map(|t| a[i * a_row + t * a_col] as f64 * b[t * n + j] as f64)
                .sum();
            c[i * n + j] = dot as f32;
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
    // The result is symmetric: compute the tiles on and above the diagonal only, each
    // tile (i0.., j0..) = (columns i0.. of x)ᵀ · (columns j0.. of x).
    for i0 in (0..k).step_by(GRAM_TILE) {
        let i1 = (i0 + GRAM_TILE).min(k);
        for j0 in (i0..k).step_by(GRAM_TILE) {
            let j1 = (j0 + GRAM_TILE).min(k);
            let lhs = Strided::transposed(&x[i0..], k);
            let rhs = Strided::row_major(&x[j0..], k);
            product(
                &mut g[i0 * k + j0..],
                k,
                lhs,
                rhs,
                (i1 - i0, n, j1 - j0),
                Op::SET.named("gram"),
            );
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
    assert!(
        lda >= k && ldb >= n,
        "matmul_sub: strides shorter than rows"
    );
    let (a, b) = (Strided::row_major(a, lda), Strided::row_major(b, ldb));
    product(
        c,
        ldc,
        a,
        b,
        (r, k, n),
        Op {
            subtract: true,
            ..Op::SET.named("matmul_sub")
        },
    );
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
    fn matmul_and_matmul_tn_match_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        for &(m, k, n) in &[(1, 1, 1), (5, 17, 3), (64, 300, 32), (896, 32, 70)] {
            let a = random(&mut rng, m * k);
            let b = random(&mut rng, k * n);
            let tol = 1e-4 * (k as f32).sqrt();
            let (mut fast, mut slow) = (vec![0f32; m * n], vec![0f32; m * n]);
            matmul(&a, &b, &mut fast, m, k, n);
            matmul_reference(&a, (k, 1), &b, &mut slow, m, k, n);
            assert_close(&fast, &slow, tol, &format!("matmul ({m},{k},{n})"));
            // The same buffer read as a[k×m]ᵀ.
            matmul_tn(&a, &b, &mut fast, k, m, n);
            matmul_reference(&a, (1, m), &b, &mut slow, m, k, n);
            assert_close(&fast, &slow, tol, &format!("matmul_tn ({m},{k},{n})"));
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
