//! x86-64 kernels: AVX2 + FMA + F16C, and the same loops with AVX-512 VNNI's 256-bit
//! `vpdpbusd` for the integer dot product where the CPU has it.
//!
//! Decode: each block of 32 codes is unpacked into one 256-bit register of bytes (one shift
//! and mask per bit plane, see `recoup_formats::packed`), meets its 32 activation bytes in
//! one integer dot product (8 lanes of i32), and is accumulated in f32 with the activation
//! block's scale; the group's scale multiplies each group's sum. Horizontal sums happen once
//! per row. Prefill's integer GEMM (`tile_blocks`, see `super::prefill`) and the activation
//! rounding (`quantize_block`) are AVX2 only.

use super::prefill::{GEMM_ROWS, RowTile};
use super::{FactorRef, QuantizedActivation, TILE_ROWS, TiledFactor, Tiles};
use core::arch::x86_64::*;
use recoup_formats::packed::{BLOCK, PackedMatrix};

pub fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

pub fn has_avx2_vnni() -> bool {
    has_avx2() && is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl")
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// One f16 to f32 with F16C (`half`'s conversion checks the CPU on every call).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn f16_to_f32(h: half::f16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h.to_bits()))))
}

/// `super::reference::quantize_block` for one block of 32, vectorized with the same
/// rounding (half away from zero, as `f32::round`), so both give the same bytes.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `x` and `codes` must hold 32 values.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn quantize_block(x: &[f32], codes: &mut [i8]) -> (f32, i32) {
    debug_assert!(x.len() == BLOCK && codes.len() == BLOCK);
    let sign = _mm256_set1_ps(-0.0);
    // SAFETY: `x` holds 32 floats.
    let v: [__m256; 4] = std::array::from_fn(|k| unsafe { _mm256_loadu_ps(x.as_ptr().add(8 * k)) });
    let abs = v.map(|v| _mm256_andnot_ps(sign, v));
    let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let max = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    let d = max / 127.0;
    let inv = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    let (half, one) = (_mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
    let ints = v.map(|v| {
        let q = _mm256_mul_ps(v, inv);
        let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(q);
        let frac = _mm256_sub_ps(q, t);
        let up = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(frac, half), one);
        let down = _mm256_and_ps(
            _mm256_cmp_ps::<_CMP_LE_OQ>(frac, _mm256_sub_ps(sign, half)),
            one,
        );
        _mm256_cvttps_epi32(_mm256_add_ps(t, _mm256_sub_ps(up, down)))
    });
    // Packing interleaves the 128-bit lanes; the permutation puts the 32 bytes back in order.
    let words = [
        _mm256_packs_epi32(ints[0], ints[1]),
        _mm256_packs_epi32(ints[2], ints[3]),
    ];
    let bytes = _mm256_packs_epi16(words[0], words[1]);
    let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    // SAFETY: `codes` holds 32 bytes.
    unsafe { _mm256_storeu_si256(codes.as_mut_ptr().cast(), bytes) };
    let sums = _mm256_add_epi32(
        _mm256_add_epi32(ints[0], ints[1]),
        _mm256_add_epi32(ints[2], ints[3]),
    );
    let s = _mm_add_epi32(
        _mm256_castsi256_si128(sums),
        _mm256_extracti128_si256(sums, 1),
    );
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    (d, _mm_cvtsi128_si32(s))
}

/// 2-bit block (8 bytes): byte `j` holds codes `j + 8k` in bits `2k..2k+2`. Broadcast the
/// 8 bytes to the four 64-bit lanes and shift lane `k` right by `2k`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn unpack2(p: *const u8) -> __m256i {
    // SAFETY: the caller points `p` at a whole block.
    let bytes = unsafe { p.cast::<i64>().read_unaligned() };
    let shifted = _mm256_srlv_epi64(_mm256_set1_epi64x(bytes), _mm256_set_epi64x(6, 4, 2, 0));
    _mm256_and_si256(shifted, _mm256_set1_epi8(3))
}

/// 3-bit block (12 bytes): the 2-bit plane, then a 32-bit mask of the high bits, spread to
/// one byte per code by a byte shuffle and a compare against each byte's bit.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn unpack3(p: *const u8) -> __m256i {
    // SAFETY: the caller points `p` at a whole block.
    let (low, mask) = unsafe { (unpack2(p), p.add(8).cast::<i32>().read_unaligned()) };
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(mask),
        _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
            3, 3, 3,
        ),
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
    let high = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    _mm256_or_si256(low, _mm256_and_si256(high, _mm256_set1_epi8(4)))
}

/// 4-bit block (16 bytes): low nibbles are codes 0–15, high nibbles codes 16–31.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn unpack4(p: *const u8) -> __m256i {
    // SAFETY: the caller points `p` at a whole block.
    let v = unsafe { _mm_loadu_si128(p.cast()) };
    _mm256_and_si256(
        _mm256_set_m128i(_mm_srli_epi16(v, 4), v),
        _mm256_set1_epi8(0x0F),
    )
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn unpack<const BITS: u32>(p: *const u8) -> __m256i {
    // SAFETY: forwarded from the caller.
    unsafe {
        match BITS {
            2 => unpack2(p),
            3 => unpack3(p),
            4 => unpack4(p),
            _ => _mm256_loadu_si256(p.cast()),
        }
    }
}

/// `Σ (q − offset)·x` in 8 lanes with `vpmaddubsw`, whose i16 pair sums saturate: codes of
/// up to 4 bits are safe as they are (15·127·2 < 2¹⁵); 8-bit codes are first shifted to
/// signed (`offset` 128) and multiplied by magnitude and moved sign.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn dot_maddubs<const BITS: u32>(q: __m256i, x: __m256i) -> __m256i {
    let ones = _mm256_set1_epi16(1);
    if BITS == 8 {
        let a = _mm256_xor_si256(q, _mm256_set1_epi8(i8::MIN));
        let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(x, a));
        _mm256_madd_epi16(pairs, ones)
    } else {
        _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), ones)
    }
}

/// `Σ q·x` in 8 lanes with one `vpdpbusd` (no saturation, no offset); generic over the
/// bit width only to share `packed_rows_with!` with [`dot_maddubs`].
#[inline]
#[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
fn dot_vnni<const BITS: u32>(q: __m256i, x: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, x)
}

/// Rows ahead whose codes are requested while a row is computed: one row stream per
/// thread is latency-bound on its own (decode reached a third of the streaming bandwidth
/// with the loads of the codes the hottest instructions).
const PREFETCH_ROWS: usize = 2;

/// Asks for the cache lines of `bytes` bytes from `p` that lie before `end`.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn prefetch(p: *const u8, bytes: usize, end: *const u8) {
    let mut line = p;
    while line < end && line < p.wrapping_add(bytes) {
        // A hint that never faults; the address stays inside the codes anyway.
        _mm_prefetch::<_MM_HINT_T0>(line.cast());
        line = line.wrapping_add(64);
    }
}

/// The row loop, once per dot-product flavour: `$offset8` is what `$dot` subtracts from
/// 8-bit codes, folded into the zero point.
macro_rules! packed_rows_with {
    ($name:ident, $features:literal, $dot:ident, $offset8:expr) => {
        /// # Safety
        /// The CPU must have the enabled features; `m`, `act`, `group_sums` and `y` must
        /// agree as `super::packed_rows` checks.
        #[target_feature(enable = $features)]
        pub unsafe fn $name(
            m: &PackedMatrix,
            act: &QuantizedActivation,
            group_sums: &[f32],
            r0: usize,
            y: &mut [f32],
        ) {
            #[target_feature(enable = $features)]
            unsafe fn rows<const BITS: u32>(
                m: &PackedMatrix,
                act: &QuantizedActivation,
                group_sums: &[f32],
                r0: usize,
                y: &mut [f32],
            ) {
                let blocks = m.cols / BLOCK;
                let row_bytes = m.spec.row_bytes(m.cols);
                let block_bytes = row_bytes / blocks;
                let gpr = m.groups_per_row();
                let blocks_per_group = m.spec.group / BLOCK;
                let offset = if BITS == 8 { $offset8 } else { 0.0 };
                let sym_zero = f32::from(m.spec.sym_zero());
                let end = m.codes.as_ptr_range().end;
                for (i, out) in y.iter_mut().enumerate() {
                    let r = r0 + i;
                    let row = m.codes[r * row_bytes..(r + 1) * row_bytes].as_ptr();
                    prefetch(row.wrapping_add(PREFETCH_ROWS * row_bytes), row_bytes, end);
                    let scales = &m.scales[r * gpr..(r + 1) * gpr];
                    let zeros = if m.spec.sym {
                        &[][..]
                    } else {
                        &m.zeros[r * gpr..(r + 1) * gpr]
                    };
                    let mut acc = _mm256_setzero_ps();
                    let mut zero_term = 0f32;
                    for (g, (&scale, &sum)) in scales.iter().zip(group_sums).enumerate() {
                        let s = f16_to_f32(scale);
                        let z = zeros.get(g).map_or(sym_zero, |&z| f32::from(z));
                        zero_term += s * (z - offset) * sum;
                        let b0 = g * blocks_per_group;
                        let b1 = (b0 + blocks_per_group).min(blocks);
                        // SAFETY: block `b` of row `r` lies within the row's bytes, and the
                        // activation holds `cols` codes and a scale per block.
                        let block = |b: usize| unsafe {
                            let q = unpack::<BITS>(row.add(b * block_bytes));
                            let x = _mm256_loadu_si256(act.codes.as_ptr().add(b * BLOCK).cast());
                            let d = _mm256_broadcast_ss(&*act.scales.as_ptr().add(b));
                            (_mm256_cvtepi32_ps($dot::<BITS>(q, x)), d)
                        };
                        // The group's blocks weighted by the activation's block scales,
                        // broadcast straight from memory (a load, where the product `s·d`
                        // took a multiply and a shuffle per block: 4-bit g128 −7 % in the
                        // micro-benchmark's best of four, the others within 3 %); pairs of
                        // blocks into two accumulators, so that consecutive blocks do not
                        // wait on one chain of FMAs. The group's scale multiplies the sum.
                        let (mut g0, mut g1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                        let mut b = b0;
                        while b + 2 <= b1 {
                            let ((p0, d0), (p1, d1)) = (block(b), block(b + 1));
                            g0 = _mm256_fmadd_ps(p0, d0, g0);
                            g1 = _mm256_fmadd_ps(p1, d1, g1);
                            b += 2;
                        }
                        if b < b1 {
                            let (p, d) = block(b);
                            g0 = _mm256_fmadd_ps(p, d, g0);
                        }
                        acc = _mm256_fmadd_ps(_mm256_add_ps(g0, g1), _mm256_set1_ps(s), acc);
                    }
                    *out = hsum(acc) - zero_term;
                }
            }
            // SAFETY: same features and the caller's guarantees.
            unsafe {
                match m.spec.bits {
                    2 => rows::<2>(m, act, group_sums, r0, y),
                    3 => rows::<3>(m, act, group_sums, r0, y),
                    4 => rows::<4>(m, act, group_sums, r0, y),
                    _ => rows::<8>(m, act, group_sums, r0, y),
                }
            }
        }
    };
}

packed_rows_with!(packed_rows_avx2, "avx2,fma,f16c", dot_maddubs, 128.0);
packed_rows_with!(
    packed_rows_vnni,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    dot_vnni,
    0.0
);

/// Eight factor values from `p` as f32.
trait FactorLanes {
    /// # Safety
    /// `p` must point at 8 readable values.
    unsafe fn load8(p: *const Self) -> __m256;
}

impl FactorLanes for half::f16 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const Self) -> __m256 {
        // SAFETY: forwarded from the caller.
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p.cast()) })
    }
}

impl FactorLanes for i8 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const Self) -> __m256 {
        // SAFETY: forwarded from the caller.
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(unsafe { _mm_loadl_epi64(p.cast()) }))
    }
}

/// `⟨row, v⟩` with four accumulators, so long rows (a down-projection `B` is as wide as
/// the layer's input) are not bound by the FMA latency.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_lanes<T: FactorLanes + Copy>(row: &[T], v: &[f32], tail: impl Fn(T) -> f32) -> f32 {
    let n = row.len().min(v.len());
    let (rp, vp) = (row.as_ptr(), v.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut j = 0;
    // SAFETY: every load reads 8 values starting below `n − 7`.
    unsafe {
        while j + 32 <= n {
            for (k, a) in acc.iter_mut().enumerate() {
                let o = j + 8 * k;
                *a = _mm256_fmadd_ps(T::load8(rp.add(o)), _mm256_loadu_ps(vp.add(o)), *a);
            }
            j += 32;
        }
        while j + 8 <= n {
            acc[0] = _mm256_fmadd_ps(T::load8(rp.add(j)), _mm256_loadu_ps(vp.add(j)), acc[0]);
            j += 8;
        }
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    hsum(sum) + (j..n).map(|i| tail(row[i]) * v[i]).sum::<f32>()
}

/// `⟨row r of f, v⟩`; rows are `v.len()` wide.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn factor_row_dot(f: FactorRef, r: usize, v: &[f32]) -> f32 {
    let len = v.len();
    match f {
        FactorRef::F16(a) => dot_lanes(&a[r * len..(r + 1) * len], v, |h| h.to_f32()),
        FactorRef::Int8 { codes, scales } => {
            scales[r].to_f32() * dot_lanes(&codes[r * len..(r + 1) * len], v, f32::from)
        }
    }
}

/// `⟨A_r, v⟩` for the 8 rows of tile `t`: `rank` FMAs of 8 lanes, two chains.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; tile `t` must exist and `v` hold `rank` values.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn tile_dots(a: &TiledFactor, t: usize, v: &[f32]) -> [f32; TILE_ROWS] {
    let rank = a.rank;
    let base = t * rank * TILE_ROWS;
    let mut acc = [_mm256_setzero_ps(); 2];
    // SAFETY: tile `t` holds `rank · 8` values from `base`.
    unsafe {
        match &a.tiles {
            Tiles::F16(d) => {
                let p = d.as_ptr().add(base);
                for k in 0..rank {
                    let lanes = half::f16::load8(p.add(k * TILE_ROWS));
                    acc[k & 1] = _mm256_fmadd_ps(lanes, _mm256_set1_ps(v[k]), acc[k & 1]);
                }
            }
            Tiles::Int8 { codes, scales } => {
                let p = codes.as_ptr().add(base);
                for k in 0..rank {
                    let lanes = i8::load8(p.add(k * TILE_ROWS));
                    acc[k & 1] = _mm256_fmadd_ps(lanes, _mm256_set1_ps(v[k]), acc[k & 1]);
                }
                let s = _mm256_loadu_ps(scales.as_ptr().add(t * TILE_ROWS));
                acc = [_mm256_mul_ps(acc[0], s), _mm256_mul_ps(acc[1], s)];
            }
        }
    }
    let mut out = [0f32; TILE_ROWS];
    // SAFETY: `out` holds 8 floats.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), _mm256_add_ps(acc[0], acc[1])) };
    out
}

/// The prefill tile's 16 rows over `blocks` for `T` tokens, added to `acc`
/// (`super::prefill`): per quad of columns two registers of codes (4 per row, 8 rows each)
/// meet each token's 4 activation bytes broadcast to every lane; the 16-bit pair sums of a
/// block of 32 are added up in 16 bits (at most 16 products of 15·127 per lane), widened
/// once per block and scaled with the row's group scale times the token's block scale.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; the codes must have at most 4 bits; `acts` and
/// `acc` must hold `T` entries that agree with the tile, and `blocks` lie within it, as
/// `super::prefill::tile_blocks` checks.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn tile_blocks<const T: usize>(
    tile: &RowTile,
    acts: &[QuantizedActivation],
    blocks: std::ops::Range<usize>,
    acc: &mut [[f32; GEMM_ROWS]],
) {
    const HALF: usize = GEMM_ROWS / 2;
    let blocks_per_group = tile.group / BLOCK;
    let quad_bytes = 4 * GEMM_ROWS;
    let ones = _mm256_set1_epi16(1);
    let codes = tile.codes.as_ptr();
    let xs: [*const u8; T] = std::array::from_fn(|t| acts[t].codes.as_ptr().cast());
    // SAFETY: `acc[t]` holds 16 floats.
    let mut sums: [[__m256; T]; 2] = std::array::from_fn(|h| {
        std::array::from_fn(|t| unsafe { _mm256_loadu_ps(acc[t].as_ptr().add(h * HALF)) })
    });
    for b in blocks {
        // SAFETY: `scales` holds 16 values per group.
        let s = unsafe {
            let sp = tile.scales.as_ptr().add(b / blocks_per_group * GEMM_ROWS);
            [_mm256_loadu_ps(sp), _mm256_loadu_ps(sp.add(HALF))]
        };
        let mut pairs = [[_mm256_setzero_si256(); T]; 2];
        for q in 0..BLOCK / 4 {
            let col = b * BLOCK + 4 * q;
            // SAFETY: quad `col / 4` of the tile and 4 bytes at `col` of each activation lie
            // within their buffers (`col + 4 ≤ cols`).
            unsafe {
                let quad = codes.add(col / 4 * quad_bytes);
                let c = [
                    _mm256_loadu_si256(quad.cast()),
                    _mm256_loadu_si256(quad.add(32).cast()),
                ];
                for t in 0..T {
                    let x = _mm256_set1_epi32(xs[t].add(col).cast::<i32>().read_unaligned());
                    for h in 0..2 {
                        pairs[h][t] = _mm256_add_epi16(pairs[h][t], _mm256_maddubs_epi16(c[h], x));
                    }
                }
            }
        }
        for t in 0..T {
            let d = _mm256_set1_ps(acts[t].scales[b]);
            for h in 0..2 {
                let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs[h][t], ones));
                sums[h][t] = _mm256_fmadd_ps(dot, _mm256_mul_ps(s[h], d), sums[h][t]);
            }
        }
    }
    for (t, a) in acc.iter_mut().enumerate().take(T) {
        for (half, sum) in a.chunks_exact_mut(HALF).zip(sums) {
            // SAFETY: `half` holds 8 floats.
            unsafe { _mm256_storeu_ps(half.as_mut_ptr(), sum[t]) };
        }
    }
}
