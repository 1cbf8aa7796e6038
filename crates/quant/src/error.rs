//! The layer-output error every method is judged by: for calibration inputs `X` with
//! `H = XᵀX`, `‖X Êᵀ‖² = tr(E H Eᵀ)` where `E = Ŵ − W`, reported relative to `tr(W H Wᵀ)`.

use recoup_kernels::matmul::matmul_wt;

/// `tr(E H Eᵀ) / tr(W H Wᵀ)` for `E = w_hat − w` (both `[rows, cols]`, `h` `[cols, cols]`).
pub fn output_error(w: &[f32], w_hat: &[f32], h: &[f64], rows: usize, cols: usize) -> f64 {
    // One product for both traces: the rows of E stacked on the rows of W, times H.
    let mut stacked: Vec<f32> = w_hat.iter().zip(w).map(|(a, b)| a - b).collect();
    stacked.extend_from_slice(w);
    let hf: Vec<f32> = h.iter().map(|&v| v as f32).collect();
    let mut prod = vec![0f32; 2 * rows * cols];
    // H is symmetric, so (stacked · Hᵀ) = stacked · H.
    matmul_wt(&stacked, &hf, &mut prod, 2 * rows, cols, cols);
    let trace = |range: std::ops::Range<usize>| -> f64 {
        stacked[range.clone()]
            .iter()
            .zip(&prod[range])
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum()
    };
    let (err, base) = (trace(0..rows * cols), trace(rows * cols..2 * rows * cols));
    if base > 0.0 { err / base } else { 0.0 }
}
