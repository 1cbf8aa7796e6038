//! AVX2 residual correction on integers. A pair of selected channels is loaded as one
//! 256-bit register (16 bytes of each run: 32 outputs), split into low nibbles (even
//! outputs) and high nibbles (odd outputs), and the two channels' nibbles are interleaved
//! output by output, so that one `vpmaddubsw` against the pair's two 8-bit activation codes
//! gives `q_a·n_a + q_b·n_b` for 16 outputs. Sums stay in registers across all selected
//! channels: in i16 within a group of 8 pairs (one activation scale), then scaled into f32;
//! the block's outputs are written once.

use super::{GROUP, ResidualEpilogue};
use core::arch::x86_64::*;

/// The pair's nibbles at byte `b` of runs `a` and `c`, interleaved by output: (even outputs
/// 0,2,…,30 as 16 pairs of bytes, odd outputs 1,3,…,31 likewise).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn pair_nibbles(a: *const u8, c: *const u8) -> (__m256i, __m256i) {
    // SAFETY: the caller points both at 16 readable bytes.
    let both = unsafe { _mm256_loadu2_m128i(c.cast(), a.cast()) };
    let mask = _mm256_set1_epi8(0xF);
    let low = _mm256_and_si256(both, mask);
    let high = _mm256_and_si256(_mm256_srli_epi16(both, 4), mask);
    // Lanes [a0..7 | a8..15 | c0..7 | c8..15] → [a0..7 | c0..7 | a8..15 | c8..15], then each
    // lane's two halves interleaved byte by byte.
    let interleave = |v: __m256i| {
        let p = _mm256_permute4x64_epi64(v, 0b11_01_10_00);
        _mm256_unpacklo_epi8(p, _mm256_srli_si256(p, 8))
    };
    (interleave(low), interleave(high))
}

/// `acc += d · v` for the 16 i16 lanes of `v` (as two vectors of 8 f32).
#[inline]
#[target_feature(enable = "avx2")]
fn scale_add(v: __m256i, d: __m256, acc: &mut [__m256; 2]) {
    let lo = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(v)));
    let hi = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(v, 1)));
    acc[0] = _mm256_add_ps(acc[0], _mm256_mul_ps(d, lo));
    acc[1] = _mm256_add_ps(acc[1], _mm256_mul_ps(d, hi));
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn add_residual(e: ResidualEpilogue, r0: usize, y: &mut [f32]) {
    let q = e.selected;
    let half = e.residual.rows() / 2;
    let first = r0 / 2;
    let codes = e.residual.codes.as_ptr();
    let bytes = y.len() / 2;
    let wide = bytes / 16 * 16;
    let offset = _mm256_set1_ps(q.offset);
    for b in (0..wide).step_by(16) {
        let zero = _mm256_setzero_ps();
        let (mut even, mut odd) = ([zero; 2], [zero; 2]);
        // Channel pairs, a group's after another (groups of 16 channels make 8 pairs; an odd
        // last channel pairs with itself, at code 0).
        let groups = q.channels.chunks(GROUP).zip(q.pair_codes.chunks(GROUP / 2));
        for ((channels, words), &d) in groups.zip(&q.scales) {
            let (mut e16, mut o16) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for (p, &word) in words.iter().enumerate() {
                let (a, c) = (
                    channels[2 * p],
                    channels[(2 * p + 1).min(channels.len() - 1)],
                );
                let start = |i: u32| i as usize * half + first + b;
                // SAFETY: the runs are of checked channels, and byte `first + b + 16` is
                // within them (`y` ends at or before the last row).
                let (lo, hi) = unsafe { pair_nibbles(codes.add(start(a)), codes.add(start(c))) };
                let w = _mm256_set1_epi16(word);
                e16 = _mm256_add_epi16(e16, _mm256_maddubs_epi16(lo, w));
                o16 = _mm256_add_epi16(o16, _mm256_maddubs_epi16(hi, w));
            }
            let d = _mm256_set1_ps(d);
            scale_add(e16, d, &mut even);
            scale_add(o16, d, &mut odd);
        }
        // Back to output order: even[0] holds outputs 0,2,…,14, odd[0] 1,3,…,15.
        for h in 0..2 {
            let lo = _mm256_unpacklo_ps(even[h], odd[h]); // 0–3 | 8–11
            let hi = _mm256_unpackhi_ps(even[h], odd[h]); // 4–7 | 12–15
            let first8 = _mm256_permute2f128_ps(lo, hi, 0x20);
            let second8 = _mm256_permute2f128_ps(lo, hi, 0x31);
            for (k, v) in [first8, second8].into_iter().enumerate() {
                let j = 2 * b + 16 * h + 8 * k;
                // SAFETY: j + 8 ≤ 2 · wide ≤ y.len(), and the scales cover r0 + y.len().
                unsafe {
                    let s = e.residual.scales.as_ptr().add(r0 + j);
                    let s = _mm256_cvtph_ps(_mm_loadu_si128(s.cast()));
                    let out = y.as_mut_ptr().add(j);
                    let add = _mm256_mul_ps(s, _mm256_sub_ps(v, offset));
                    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), add));
                }
            }
        }
    }
    // The last bytes (fewer than 16) as the scalar twin computes them.
    if wide < bytes {
        super::reference::add_residual(e, r0 + 2 * wide, &mut y[2 * wide..]);
    }
}
