//! Elementwise and row-wise operations of the transformer block.

/// RMSNorm of each `d`-wide row of `x` into `out`: `x / sqrt(mean(x²) + eps) · w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (row, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &g) in o.iter_mut().zip(row).zip(w) {
            *o = v * inv * g;
        }
    }
}

/// `gate ← silu(gate) · up`, SwiGLU's gating.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// In-place softmax of one row.
pub fn softmax(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// `log p(target)` under the softmax of `logits`, computed in f64.
pub fn log_prob(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    logits[target] as f64 - max - sum.ln()
}

/// Cos/sin tables of rotary embeddings for a run of positions, shared by every layer and head.
pub struct RopeTable {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// `inv_freq[i]` is the angle per position of pair `i` (already divided by any scaling).
    pub fn new(inv_freq: &[f64], first_pos: usize, n_pos: usize) -> Self {
        Self::at_positions(inv_freq, first_pos..first_pos + n_pos)
    }

    /// The table of rows at arbitrary positions (the branches of a tree of continuations).
    pub fn at_positions(inv_freq: &[f64], positions: impl ExactSizeIterator<Item = usize>) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for p in positions {
            for &f in inv_freq {
                let angle = p as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Self { half, cos, sin }
    }

    /// Rotates every head of each position's row (`rows[t]` has `n_heads · head_dim` values)
    /// in the rotate-half layout of Hugging Face: pair `(i, i + rot/2)` within each head.
    pub fn apply(&self, rows: &mut [f32], n_heads: usize, head_dim: usize) {
        let half = self.half;
        for (t, row) in rows.chunks_exact_mut(n_heads * head_dim).enumerate() {
            let (cos, sin) = (
                &self.cos[t * half..(t + 1) * half],
                &self.sin[t * half..(t + 1) * half],
            );
            for head in row.chunks_exact_mut(head_dim) {
                for i in 0..half {
                    let (a, b) = (head[i], head[i + half]);
                    head[i] = a * cos[i] - b * sin[i];
                    head[i + half] = b * cos[i] + a * sin[i];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_rotates_pairs_and_keeps_norm() {
        let inv: Vec<f64> = (0..2)
            .map(|i| 1.0 / 10000f64.powf(2.0 * i as f64 / 4.0))
            .collect();
        let table = RopeTable::new(&inv, 3, 1);
        let mut row = vec![1.0, 2.0, 3.0, 4.0];
        table.apply(&mut row, 1, 4);
        let (c0, s0) = ((3.0f64).cos() as f32, (3.0f64).sin() as f32);
        assert!((row[0] - (1.0 * c0 - 3.0 * s0)).abs() < 1e-6);
        assert!((row[2] - (3.0 * c0 + 1.0 * s0)).abs() < 1e-6);
        let norm: f32 = row.iter().map(|v| v * v).sum();
        assert!((norm - 30.0).abs() < 1e-4);
    }

    #[test]
    fn log_prob_is_normalized() {
        let logits = [1.0f32, 2.0, 3.0, -1.0];
        let total: f64 = (0..4).map(|t| log_prob(&logits, t).exp()).sum();
        assert!((total - 1.0).abs() < 1e-12);
        assert!(log_prob(&logits, 2) > log_prob(&logits, 1));
    }
}
