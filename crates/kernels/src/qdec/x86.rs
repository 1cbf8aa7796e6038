//! AVX2 + FMA + F16C residual correction. 16 bytes of a run hold 32 outputs' nibbles: masking and
//! shifting split them into low and high nibbles, interleaving restores output order, and
//! each group of 8 levels is widened to f32 and multiply-added into the accumulators.
//! Channels go two at a time so each accumulator load and store serves two runs.

use super::{ResidualEpilogue, SLICE};
use core::arch::x86_64::*;

/// The 32 levels (nibble − 8) of 16 bytes at `p`, in output order, as two vectors of 16.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn levels(p: *const u8) -> [__m128i; 2] {
    // SAFETY: the caller points `p` at 16 readable bytes.
    let bytes = unsafe { _mm_loadu_si128(p.cast()) };
    let mask = _mm_set1_epi8(0xF);
    let lo = _mm_and_si128(bytes, mask);
    let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    let eight = _mm_set1_epi8(8);
    [
        _mm_sub_epi8(_mm_unpacklo_epi8(lo, hi), eight),
        _mm_sub_epi8(_mm_unpackhi_epi8(lo, hi), eight),
    ]
}

/// 16 levels as two vectors of 8 f32.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn widen(v: __m128i) -> [__m256; 2] {
    [
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)),
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8))),
    ]
}

/// `acc[j] += Σ_c xs[c] · level(runs[c], j)` for `j < len` (`runs` start at output 0 of
/// the slice and hold `len.div_ceil(2)` bytes).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn accumulate<const N: usize>(runs: [&[u8]; N], xs: [f32; N], acc: &mut [f32]) {
    let len = acc.len();
    let wide = len / 32 * 32;
    let xv = xs.map(|x| _mm256_set1_ps(x));
    let out = acc.as_mut_ptr();
    for j in (0..wide).step_by(32) {
        // SAFETY: j + 32 ≤ len, so every run has the 16 bytes from j/2 and acc the 32
        // values from j.
        unsafe {
            let mut sum = [
                _mm256_loadu_ps(out.add(j)),
                _mm256_loadu_ps(out.add(j + 8)),
                _mm256_loadu_ps(out.add(j + 16)),
                _mm256_loadu_ps(out.add(j + 24)),
            ];
            for c in 0..N {
                let [a, b] = levels(runs[c].as_ptr().add(j / 2));
                let [l0, l1] = widen(a);
                let [l2, l3] = widen(b);
                sum[0] = _mm256_fmadd_ps(xv[c], l0, sum[0]);
                sum[1] = _mm256_fmadd_ps(xv[c], l1, sum[1]);
                sum[2] = _mm256_fmadd_ps(xv[c], l2, sum[2]);
                sum[3] = _mm256_fmadd_ps(xv[c], l3, sum[3]);
            }
            for (k, s) in sum.into_iter().enumerate() {
                _mm256_storeu_ps(out.add(j + 8 * k), s);
            }
        }
    }
    for (c, run) in runs.iter().enumerate() {
        for j in wide..len {
            let nibble = (run[j / 2] >> (4 * (j % 2))) & 0xF;
            acc[j] += xs[c] * f32::from(nibble as i8 - 8);
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn add_residual(e: ResidualEpilogue, r0: usize, y: &mut [f32]) {
    let mut acc = [0f32; SLICE];
    for s0 in (0..y.len()).step_by(SLICE) {
        let len = (y.len() - s0).min(SLICE);
        let acc = &mut acc[..len];
        acc.fill(0.0);
        let bytes = (r0 + s0) / 2..(r0 + s0) / 2 + len.div_ceil(2);
        let run = |i: u32| &e.residual.run(i as usize)[bytes.clone()];
        let pairs = e.channels.len() / 2;
        for p in 0..pairs {
            let (c0, c1) = (2 * p, 2 * p + 1);
            let runs = [run(e.channels[c0]), run(e.channels[c1])];
            // SAFETY: the runs hold `len.div_ceil(2)` bytes, as `accumulate` needs.
            unsafe { accumulate(runs, [e.x[c0], e.x[c1]], acc) };
        }
        if e.channels.len() % 2 == 1 {
            let last = e.channels.len() - 1;
            // SAFETY: as above.
            unsafe { accumulate([run(e.channels[last])], [e.x[last]], acc) };
        }
        let scales = &e.residual.scales[r0 + s0..r0 + s0 + len];
        let y = &mut y[s0..s0 + len];
        let wide = len / 8 * 8;
        for j in (0..wide).step_by(8) {
            // SAFETY: j + 8 ≤ len bounds the 8 scales, accumulators and outputs.
            unsafe {
                let s = _mm256_cvtph_ps(_mm_loadu_si128(scales.as_ptr().add(j).cast()));
                let a = _mm256_loadu_ps(acc.as_ptr().add(j));
                let out = y.as_mut_ptr().add(j);
                _mm256_storeu_ps(
                    out,
                    _mm256_add_ps(_mm256_loadu_ps(out), _mm256_mul_ps(s, a)),
                );
            }
        }
        for j in wide..len {
            y[j] += scales[j].to_f32() * acc[j];
        }
    }
}
