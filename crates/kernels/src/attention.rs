//! Causal grouped-query attention of a run of new positions against a KV cache.
//!
//! Layout: `q` and `out` hold `t` rows of `n_heads · head_dim`; the caches hold rows of
//! `n_kv_heads · head_dim` for positions `0..p0 + t` (the new ones already written). Work is
//! split over (head, block of query rows); each block reads only the keys it may see, which
//! halves the work of a full prefill against a dense mask.
//!
//! The new positions may also form a tree ([`TreeMask`]): several continuations of the
//! cached prefix in one pass, each seeing the prefix and its own ancestors only. Scoring a
//! question's answers this way runs them as one batch.

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

/// Visibility among `t` new positions that form a forest: position `i` sees the cached
/// prefix, its ancestors and itself. One bit per (position, earlier position).
pub struct TreeMask {
    words: usize,
    bits: Vec<u64>,
}

impl TreeMask {
    /// `parents[i]` is the new position `i` continues (`None`: it continues the cached
    /// prefix). Every parent comes before its child.
    pub fn from_parents(parents: &[Option<usize>]) -> Self {
        let t = parents.len();
        let words = t.div_ceil(64);
        let mut bits = vec![0u64; t * words];
        for (i, parent) in parents.iter().enumerate() {
            if let Some(p) = *parent {
                assert!(
                    p < i,
                    "tree mask: position {i} has parent {p}, not an earlier one"
                );
                let (src, dst) = bits.split_at_mut(i * words);
                dst[..words].copy_from_slice(&src[p * words..(p + 1) * words]);
            }
            bits[i * words + i / 64] |= 1 << (i % 64);
        }
        Self { words, bits }
    }

    /// Whether new position `i` sees new position `j`.
    pub fn sees(&self, i: usize, j: usize) -> bool {
        self.bits[i * self.words + j / 64] >> (j % 64) & 1 == 1
    }
}

#[allow(clippy::too_many_arguments)]
pub fn causal_attention(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    out: &mut [f32],
    t: usize,
    p0: usize,
    s: AttentionShape,
    tree: Option<&TreeMask>,
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
            if let Some(tree) = tree {
                for j in 0..r0 + i {
                    if !tree.sees(r0 + i, j) {
                        row[p0 + j] = f32::NEG_INFINITY;
                    }
                }
            }
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
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_reference(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    out: &mut [f32],
    t: usize,
    p0: usize,
    s: AttentionShape,
    tree: Option<&TreeMask>,
) {
    let (hd, q_stride, kv_stride) = (s.head_dim, s.q_stride(), s.kv_stride());
    let group = s.n_heads / s.n_kv_heads;
    for i in 0..t {
        for h in 0..s.n_heads {
            let kvh = h / group;
            let qv = &q[i * q_stride + h * hd..][..hd];
            let visible: Vec<usize> = (0..p0 + i + 1)
                .filter(|&j| j < p0 || tree.is_none_or(|m| m.sees(i, j - p0)))
                .collect();
            let logits: Vec<f64> = visible
                .iter()
                .map(|&j| {
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
                let acc: f64 = visible
                    .iter()
                    .zip(&weights)
                    .map(|(&j, w)| w * v_cache[j * kv_stride + kvh * hd + c] as f64)
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
            causal_attention(&q, &k, &v, &mut fast, t, p0, s, None);
            causal_attention_reference(&q, &k, &v, &mut slow, t, p0, s, None);
            for (a, b) in fast.iter().zip(&slow) {
                assert!((a - b).abs() < 1e-4, "t={t} p0={p0}: {a} vs {b}");
            }
        }
    }

    /// Random forests over 150 new positions (spanning query blocks): the fast kernel
    /// masks as the reference does, and a chain is plain causal attention.
    #[test]
    fn tree_masks_match_reference_and_a_chain_is_causal() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let s = AttentionShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
        };
        let (t, p0) = (150usize, 9usize);
        let mut rand_vec =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2.0..2.0)).collect() };
        let q = rand_vec(t * 64);
        let k = rand_vec((p0 + t) * 32);
        let v = rand_vec((p0 + t) * 32);
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        let parents: Vec<Option<usize>> = (0..t)
            .map(|i| (i > 0 && rng.random_range(0..4) > 0).then(|| rng.random_range(0..i)))
            .collect();
        let tree = TreeMask::from_parents(&parents);
        let (mut fast, mut slow) = (vec![0f32; t * 64], vec![0f32; t * 64]);
        causal_attention(&q, &k, &v, &mut fast, t, p0, s, Some(&tree));
        causal_attention_reference(&q, &k, &v, &mut slow, t, p0, s, Some(&tree));
        for (a, b) in fast.iter().zip(&slow) {
            assert!((a - b).abs() < 1e-4, "tree: {a} vs {b}");
        }
        let chain: Vec<Option<usize>> = (0..t).map(|i| i.checked_sub(1)).collect();
        let chain = TreeMask::from_parents(&chain);
        let mut plain = vec![0f32; t * 64];
        causal_attention(&q, &k, &v, &mut fast, t, p0, s, Some(&chain));
        causal_attention(&q, &k, &v, &mut plain, t, p0, s, None);
        assert_eq!(fast, plain);
        // A root sees only the prefix and itself, not the position before it.
        let roots: Vec<usize> = (1..t).filter(|&i| parents[i].is_none()).collect();
        assert!(!roots.is_empty());
        assert!(
            roots
                .iter()
                .all(|&r| tree.sees(r, r) && !tree.sees(r, r - 1))
        );
    }
}
