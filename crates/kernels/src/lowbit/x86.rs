//! x86-64 kernels: AVX2 + FMA + F16C, and the same loops with AVX-512 VNNI's 256-bit
//! `vpdpbusd` for the integer dot product where the CPU has it.
//!
//! Decode: the codes are tiled by 8 rows (`recoup_formats::packed`): each quad of a block's
//! columns is one register of 8 rows × 4 codes (a shift and a mask of a plane), meeting the
//! activation's 4 bytes broadcast to every lane in one integer dot product that leaves each
//! row's sum in its own lane. A block's 8 quads are summed in integers, converted once and
//! accumulated in f32 with the activation block's scale; the group's scales (8 rows') then
//! multiply each group's sum. Prefill's integer GEMM (`tile_blocks`, see `super::prefill`)
//! and the activation rounding (`quantize_block`) are AVX2 only.

use super::prefill::{GEMM_ROWS, RowTile};
use super::{FactorRef, QuantizedActivation, TILE_ROWS, TiledFactor, Tiles};
use core::arch::x86_64::*;
use recoup_formats::packed::{BLOCK, PackedMatrix, TILE_ROWS as ROW_TILE};

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

/// The codes of quad `j` (columns `4j..4j + 4`) of a tile block's 8 rows, one row per
/// 32-bit lane (`recoup_formats::packed::tile_code` gives the layout): a shift and a mask of one plane.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_quad<const BITS: u32>(block: *const u8, j: usize) -> __m256i {
    // SAFETY: the caller points `block` at a whole tile block.
    let plane = |p: usize| unsafe { _mm256_loadu_si256(block.add(32 * p).cast()) };
    // Shifts by a runtime count (`vpsrlw xmm`), the same in every lane; the masks keep each
    // byte's own bits.
    let shr = |v: __m256i, n: usize| _mm256_srl_epi16(v, _mm_cvtsi64_si128(n as i64));
    match BITS {
        2 => _mm256_and_si256(shr(plane(j / 4), 2 * (j % 4)), _mm256_set1_epi8(3)),
        3 if j < 6 => _mm256_and_si256(shr(plane(j / 2), 3 * (j % 2)), _mm256_set1_epi8(7)),
        3 => {
            // Quads 6 and 7: the low bits are bits 6–7 of plane j − 6, the high bit is bit
            // j of plane 2, moved to bit 2.
            let low = _mm256_and_si256(shr(plane(j - 6), 6), _mm256_set1_epi8(3));
            let high = _mm256_and_si256(shr(plane(2), j - 2), _mm256_set1_epi8(4));
            _mm256_or_si256(low, high)
        }
        4 => _mm256_and_si256(shr(plane(j / 2), 4 * (j % 2)), _mm256_set1_epi8(15)),
        _ => plane(j),
    }
}

/// `vpmaddubsw` accumulation of one quad into `acc`: codes of up to 4 bits keep 16-bit
/// pair sums for a whole block (8 quads of pairs of at most 15·127 each fit in an i16);
/// 8-bit codes are shifted to signed (−128, folded into the zero point by the kernel),
/// multiplied by magnitude and moved sign, and widened to i32 every quad.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn acc_maddubs<const BITS: u32>(acc: __m256i, q: __m256i, x: __m256i) -> __m256i {
    if BITS == 8 {
        let a = _mm256_xor_si256(q, _mm256_set1_epi8(i8::MIN));
        let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(x, a));
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    } else {
        _mm256_add_epi16(acc, _mm256_maddubs_epi16(q, x))
    }
}

/// The block's 8 row sums (i32 lanes) from [`acc_maddubs`]'s accumulator.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn finish_maddubs<const BITS: u32>(acc: __m256i) -> __m256i {
    if BITS == 8 {
        acc
    } else {
        _mm256_madd_epi16(acc, _mm256_set1_epi16(1))
    }
}

/// `Σ q·x` into i32 lanes with one `vpdpbusd` (no saturation, no offset); generic over the
/// bit width only to share `packed_rows_with!` with [`acc_maddubs`].
#[inline]
#[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
fn acc_vnni<const BITS: u32>(acc: __m256i, q: __m256i, x: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(acc, q, x)
}

#[inline]
#[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
fn finish_vnni<const BITS: u32>(acc: __m256i) -> __m256i {
    acc
}

/// The decode kernel, once per dot-product flavour: whole tiles of 8 rows, each lane one
/// row, so the activation's quads, block scales and group sums are loaded once per 8 rows
/// and no horizontal sum is needed. `$offset8` is what `$acc` subtracts from 8-bit codes,
/// folded into the zero point. Rows outside whole tiles (a matrix whose rows are not a
/// multiple of 8) go to the scalar twin.
macro_rules! packed_rows_with {
    ($name:ident, $features:literal, $acc:ident, $finish:ident, $offset8:expr) => {
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
            /// The 8 outputs of tile `t`.
            #[target_feature(enable = $features)]
            unsafe fn tile<const BITS: u32>(
                m: &PackedMatrix,
                act: &QuantizedActivation,
                group_sums: &[f32],
                t: usize,
            ) -> [f32; ROW_TILE] {
                let blocks = m.cols / BLOCK;
                let tbb = m.spec.tile_block_bytes();
                let blocks_per_group = m.spec.group / BLOCK;
                let offset = if BITS == 8 { $offset8 } else { 0.0 };
                let sym_zero = _mm256_set1_ps(f32::from(m.spec.sym_zero()) - offset);
                // SAFETY (every read below): tile `t` is whole, so its bytes, its rows'
                // scales and zeros lie within the matrix; the activation holds `cols` codes
                // and a scale per block, `group_sums` a sum per group.
                let codes = unsafe { m.codes.as_ptr().add(t * blocks * tbb) };
                let (mut acc, mut zero_term) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                for (g, &sum) in group_sums.iter().enumerate() {
                    let (b0, b1) = (
                        g * blocks_per_group,
                        ((g + 1) * blocks_per_group).min(blocks),
                    );
                    let mut group = _mm256_setzero_ps();
                    for b in b0..b1 {
                        let block = unsafe { codes.add(b * tbb) };
                        let x = unsafe { act.codes.as_ptr().add(b * BLOCK) };
                        let mut isum = _mm256_setzero_si256();
                        for j in 0..BLOCK / 4 {
                            let xq = _mm256_set1_epi32(unsafe {
                                x.add(4 * j).cast::<i32>().read_unaligned()
                            });
                            isum = $acc::<BITS>(isum, unsafe { tile_quad::<BITS>(block, j) }, xq);
                        }
                        let d = unsafe { _mm256_broadcast_ss(&*act.scales.as_ptr().add(b)) };
                        group =
                            _mm256_fmadd_ps(_mm256_cvtepi32_ps($finish::<BITS>(isum)), d, group);
                    }
                    // The tile's 8 scales and zero points of the group lie side by side.
                    let at = m.tile_param_index(t, g);
                    let s = unsafe {
                        _mm256_cvtph_ps(_mm_loadu_si128(m.scales.as_ptr().add(at).cast()))
                    };
                    let z = if m.spec.sym {
                        sym_zero
                    } else {
                        let z = unsafe { _mm_loadl_epi64(m.zeros.as_ptr().add(at).cast()) };
                        _mm256_sub_ps(
                            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(z)),
                            _mm256_set1_ps(offset),
                        )
                    };
                    acc = _mm256_fmadd_ps(group, s, acc);
                    zero_term =
                        _mm256_fmadd_ps(_mm256_mul_ps(s, z), _mm256_set1_ps(sum), zero_term);
                }
                let mut out = [0f32; ROW_TILE];
                // SAFETY: 8 floats.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr(), _mm256_sub_ps(acc, zero_term)) };
                out
            }
            #[target_feature(enable = $features)]
            unsafe fn rows<const BITS: u32>(
                m: &PackedMatrix,
                act: &QuantizedActivation,
                group_sums: &[f32],
                r0: usize,
                y: &mut [f32],
            ) {
                let tiled = m.rows / ROW_TILE * ROW_TILE;
                let end = r0 + y.len();
                let mut r = r0;
                while r < end.min(tiled) {
                    let (t, lane) = (r / ROW_TILE, r % ROW_TILE);
                    // SAFETY: forwarded; tile `t` is whole.
                    let out = unsafe { tile::<BITS>(m, act, group_sums, t) };
                    let n = (ROW_TILE - lane).min(end - r);
                    y[r - r0..r - r0 + n].copy_from_slice(&out[lane..lane + n]);
                    r += n;
                }
                if r < end {
                    super::reference::packed_rows(m, act, group_sums, r, &mut y[r - r0..]);
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

packed_rows_with!(
    packed_rows_avx2,
    "avx2,fma,f16c",
    acc_maddubs,
    finish_maddubs,
    128.0
);
packed_rows_with!(
    packed_rows_vnni,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    acc_vnni,
    finish_vnni,
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
