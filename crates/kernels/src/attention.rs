//! Causal grouped-query attention of a run of new positions against a KV cache.
//!
//! Layout: `q` and `out` hold `t` rows of `n_heads · head_dim`; the caches hold rows of
//! `n_kv_heads · head_dim` for positions `0..p0 + t` (the new ones already written). Work is
//! split over (head, block of query rows); each block reads only the keys it may see, which
//! halves the work of a full prefill against a dense mask.

use crate::SharedMut;
use crate::ops::softmax;
use gemm::Parallelism;
use rayon::prelude::*;

#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    /// Values per position of the queries and the output.
    pub fn q_stride(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Values per position of the key and value caches.
    pub fn kv_stride(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

const QUERY_BLOCK: usize = 64;

pub fn causal_attention(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    out: &mut [f32],
    t: usize,
    p0: usize,
    s: AttentionShape,
) {
    let (hd, q_stride, kv_stride) = (s.head_dim, s.q_stride(), s.kv_stride());
    assert!(
        q.len() >= t * q_stride && out.len() >= t * q_stride,
        "attention: q/out too small"
    );
    assert!(
        k_cache.len() >= (p0 + t) * kv_stride && v_cache.len() >= (p0 + t) * kv_stride,
        "attention: cache too small"
    );
    assert!(
        s.n_heads.is_multiple_of(s.n_kv_heads),
        "attention: heads not a multiple of KV heads"
    );
    let group = s.n_heads / s.n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let n_blocks = t.div_ceil(QUERY_BLOCK);
    let out_ptr = SharedMut(out.as_mut_ptr());
    (0..s.n_heads * n_blocks).into_par_iter().for_each(|task| {
        let (h, blk) = (task / n_blocks, task % n_blocks);
        let kvh = h / group;
        let r0 = blk * QUERY_BLOCK;
        let rows = QUERY_BLOCK.min(t - r0);
        let keys = p0 + r0 + rows;
        let mut scores = vec![0f32; rows * keys];
        // SAFETY: bounds asserted above; this task writes only rows r0..r0+rows of head h.
        unsafe {
            gemm::gemm(
                rows,
                keys,
                hd,
                scores.as_mut_ptr(),
                1,
                keys as isize,
                false,
                q.as_ptr().add(r0 * q_stride + h * hd),
                1,
                q_stride as isize,
                k_cache.as_ptr().add(kvh * hd),
                kv_stride as isize,
                1,
                0.0,
                scale,
                false,
                false,
                false,
                Parallelism::None,
            );
        }
        for (i, row) in scores.chunks_exact_mut(keys).enumerate() {
            let visible = p0 + r0 + i + 1;
            softmax(&mut row[..visible]);
            row[visible..].fill(0.0);
        }
        // SAFETY: as above; `out` rows r0..r0+rows of head h belong to this task alone.
        unsafe {
            gemm::gemm(
                rows,
                hd,
                keys,
                out_ptr.get().add(r0 * q_stride + h * hd),
                1,
                q_stride as isize,
                false,
                scores.as_ptr(),
                1,
                keys as isize,
                v_cache.as_ptr().add(kvh * hd),
                1,
                kv_stride as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                Parallelism::None,
            );
        }
    });
}

/// Scalar reference for [`causal_attention`], one query at a time, in f64.
pub fn causal_attention_reference(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    out: &mut [f32],
    t: usize,
    p0: usize,
    s: AttentionShape,
) {
    let (hd, q_stride, kv_stride) = (s.head_dim, s.q_stride(), s.kv_stride());
    let group = s.n_heads / s.n_kv_heads;
    for i in 0..t {
        for h in 0..s.n_heads {
            let kvh = h / group;
            let qv = &q[i * q_stride + h * hd..][..hd];
            let visible = p0 + i + 1;
            let logits: Vec<f64> = (0..visible)
                .map(|j| {
                    let kv = &k_cache[j * kv_stride + kvh * hd..][..hd];
                    qv.iter()
                        .zip(kv)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>()
                        / (hd as f64).sqrt()
                })
                .collect();
            let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            for c in 0..hd {
                let acc: f64 = (0..visible)
                    .map(|j| weights[j] * v_cache[j * kv_stride + kvh * hd + c] as f64)
                    .sum();
                out[i * q_stride + h * hd + c] = (acc / total) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};

    #[test]
    fn matches_reference_for_prefill_and_decode() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let s = AttentionShape {
            n_heads: 6,
            n_kv_heads: 2,
            head_dim: 16,
        };
        // (new positions, cached positions before them): prefill spanning blocks, decode.
        for &(t, p0) in &[(150usize, 0usize), (1, 99), (7, 40)] {
            let total = p0 + t;
            let mut rand_vec =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2.0..2.0)).collect() };
            let q = rand_vec(t * 96);
            let k = rand_vec(total * 32);
            let v = rand_vec(total * 32);
            let (mut fast, mut slow) = (vec![0f32; t * 96], vec![0f32; t * 96]);
            causal_attention(&q, &k, &v, &mut fast, t, p0, s);
            causal_attention_reference(&q, &k, &v, &mut slow, t, p0, s);
            for (a, b) in fast.iter().zip(&slow) {
                assert!((a - b).abs() < 1e-4, "t={t} p0={p0}: {a} vs {b}");
            }
        }
    }
}
