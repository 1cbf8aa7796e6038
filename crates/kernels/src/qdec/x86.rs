//! AVX2 residual correction on integers. A pair of selected channels is read 32 bytes of
//! each run at a time (64 outputs); each run is split into low nibbles (even outputs) and
//! high nibbles (odd outputs), and the two channels' nibbles are interleaved byte by byte
//! within each 128-bit lane (`vpunpck{l,h}bw`, no lane crossing), so that one `vpmaddubsw`
//! against the pair's two 8-bit activation codes gives `q_a·n_a + q_b·n_b` for 16 outputs:
//! 128 multiply-adds from two loads and ten shuffles or masks. Sums stay in registers across
//! all selected channels: in i16 within a group of 8 pairs (one activation scale), then
//! scaled into f32; the block's 64 outputs are put back in order and written once.

use super::{GROUP, ResidualEpilogue};
use core::arch::x86_64::*;

/// Bytes of each run per block (two outputs a byte).
const BLOCK: usize = 32;

/// `acc += d · v` for the 16 i16 lanes of `v`: `acc[0]` gets the low lane's 8, `acc[1]` the
/// high lane's.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn scale_add(v: __m256i, d: __m256, acc: &mut [__m256; 2]) {
    let lo = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(v)));
    let hi = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(v, 1)));
    acc[0] = _mm256_fmadd_ps(d, lo, acc[0]);
    acc[1] = _mm256_fmadd_ps(d, hi, acc[1]);
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn residual_pass<const ACCUMULATE: bool>(e: ResidualEpilogue, r0: usize, y: &mut [f32]) {
    let q = e.selected;
    let half = e.residual.rows() / 2;
    let first = r0 / 2;
    let codes = e.residual.codes.as_ptr();
    let bytes = y.len() / 2;
    let wide = bytes / BLOCK * BLOCK;
    let offset = _mm256_set1_ps(q.offset);
    let mask = _mm256_set1_epi8(0xF);
    for b in (0..wide).step_by(BLOCK) {
        // Sums by (nibble, half of each lane): [even | odd][bytes 0–7 and 16–23 | 8–15 and
        // 24–31], each as the low lane's 8 outputs and the high lane's.
        let mut acc = [[[_mm256_setzero_ps(); 2]; 2]; 2];
        // Channel pairs, a group's after another (groups of 16 channels make 8 pairs; an odd
        // last channel pairs with itself, at code 0).
        let groups = q.channels.chunks(GROUP).zip(q.pair_codes.chunks(GROUP / 2));
        for ((channels, words), &d) in groups.zip(&q.scales) {
            let mut sums = [[_mm256_setzero_si256(); 2]; 2];
            for (p, &word) in words.iter().enumerate() {
                let (a, c) = (
                    channels[2 * p],
                    channels[(2 * p + 1).min(channels.len() - 1)],
                );
                let start = |i: u32| i as usize * half + first + b;
                // SAFETY: the runs are of checked channels, and byte `first + b + 32` is
                // within them (`y` ends at or before the last row).
                let (a, c) = unsafe {
                    (
                        _mm256_loadu_si256(codes.add(start(a)).cast()),
                        _mm256_loadu_si256(codes.add(start(c)).cast()),
                    )
                };
                let w = _mm256_set1_epi16(word);
                let nibbles = [
                    (_mm256_and_si256(a, mask), _mm256_and_si256(c, mask)),
                    (
                        _mm256_and_si256(_mm256_srli_epi16(a, 4), mask),
                        _mm256_and_si256(_mm256_srli_epi16(c, 4), mask),
                    ),
                ];
                for (s, (na, nc)) in sums.iter_mut().zip(nibbles) {
                    let lo = _mm256_maddubs_epi16(_mm256_unpacklo_epi8(na, nc), w);
                    let hi = _mm256_maddubs_epi16(_mm256_unpackhi_epi8(na, nc), w);
                    s[0] = _mm256_add_epi16(s[0], lo);
                    s[1] = _mm256_add_epi16(s[1], hi);
                }
            }
            let d = _mm256_set1_ps(d);
            for (acc, sums) in acc.iter_mut().zip(&sums) {
                for (acc, &s) in acc.iter_mut().zip(sums) {
                    scale_add(s, d, acc);
                }
            }
        }
        // Back to output order. acc[n][h][l] holds, for nibble n (even or odd outputs), the
        // outputs of bytes 8h…8h+7 of lane l (bytes 16l + 8h + j, j < 8); interleaving even
        // and odd gives the 16 consecutive outputs from 2·(16l + 8h).
        let [even, odd] = acc;
        for h in 0..2 {
            for l in 0..2 {
                let (e8, o8) = (even[h][l], odd[h][l]);
                let first8 = _mm256_permute2f128_ps(
                    _mm256_unpacklo_ps(e8, o8),
                    _mm256_unpackhi_ps(e8, o8),
                    0x20,
                );
                let second8 = _mm256_permute2f128_ps(
                    _mm256_unpacklo_ps(e8, o8),
                    _mm256_unpackhi_ps(e8, o8),
                    0x31,
                );
                for (k, v) in [first8, second8].into_iter().enumerate() {
                    let j = 2 * (b + 16 * l + 8 * h) + 8 * k;
                    // SAFETY: j + 8 ≤ 2 · wide ≤ y.len(), and the scales cover r0 + y.len().
                    unsafe {
                        let s = e.residual.scales.as_ptr().add(r0 + j);
                        let s = _mm256_cvtph_ps(_mm_loadu_si128(s.cast()));
                        let out = y.as_mut_ptr().add(j);
                        let c = _mm256_mul_ps(s, _mm256_sub_ps(v, offset));
                        let c = if ACCUMULATE {
                            _mm256_add_ps(_mm256_loadu_ps(out), c)
                        } else {
                            c
                        };
                        _mm256_storeu_ps(out, c);
                    }
                }
            }
        }
    }
    // The last bytes (fewer than a block) as the scalar twin computes them.
    if wide < bytes {
        super::reference::residual_pass::<ACCUMULATE>(e, r0 + 2 * wide, &mut y[2 * wide..]);
    }
}
