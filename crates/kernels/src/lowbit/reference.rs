//! Scalar twins of the SIMD kernels: the same formulas, one value at a time, with the
//! block layouts read through `recoup_formats::packed`'s own unpacking.

use super::prefill::{GEMM_ROWS, RowTile};
use super::{FactorRef, QuantizedActivation, TILE_ROWS, TiledFactor, Tiles};
use recoup_formats::packed::{BLOCK, PackedMatrix};

/// One block of an activation rounded to 8 bits, symmetric: `codes = round(x / d)` with
/// `d = max|x| / 127`; returns `d` and the sum of the codes.
pub fn quantize_block(x: &[f32], codes: &mut [i8]) -> (f32, i32) {
    let max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = max / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = round_half_away(v * inv) as i8;
        sum += i32::from(*c);
    }
    (d, sum)
}

/// `v.round()` (half away from zero) without calling libm's `roundf`, which is what
/// `f32::round` becomes on targets without SSE4.1: truncate, and step away from zero when the
/// dropped fraction is at least a half (exact: `v − trunc(v)` is representable for
/// |v| < 2²³).
pub fn round_half_away(v: f32) -> i32 {
    let t = v as i32;
    let frac = v - t as f32;
    t + i32::from(frac >= 0.5) - i32::from(frac <= -0.5)
}

/// `⟨row r of f, v⟩`; rows are `v.len()` wide.
pub fn factor_row_dot(f: FactorRef, r: usize, v: &[f32]) -> f32 {
    let len = v.len();
    match f {
        FactorRef::F16(a) => a[r * len..(r + 1) * len]
            .iter()
            .zip(v)
            .map(|(a, v)| a.to_f32() * v)
            .sum(),
        FactorRef::Int8 { codes, scales } => {
            let dot: f32 = codes[r * len..(r + 1) * len]
                .iter()
                .zip(v)
                .map(|(&c, v)| f32::from(c) * v)
                .sum();
            scales[r].to_f32() * dot
        }
    }
}

/// The integer dot product of one block of codes with one block of the activation.
fn block_dot(codes: &[u8], x: &[i8]) -> i32 {
    codes
        .iter()
        .zip(x)
        .map(|(&q, &x)| i32::from(q) * i32::from(x))
        .sum()
}

/// Rows `r0..r0 + y.len()` of `m · x` (module formula).
pub fn packed_rows(
    m: &PackedMatrix,
    act: &QuantizedActivation,
    group_sums: &[f32],
    r0: usize,
    y: &mut [f32],
) {
    let gpr = m.groups_per_row();
    let blocks_per_group = m.spec.group / BLOCK;
    let mut codes = vec![0u8; m.cols];
    for (i, out) in y.iter_mut().enumerate() {
        let r = r0 + i;
        m.row_codes(r, &mut codes);
        let mut acc = 0f32;
        let mut zero_term = 0f32;
        for (g, &sum) in group_sums.iter().enumerate().take(gpr) {
            let s = m.scale(r, g).to_f32();
            zero_term += s * f32::from(m.zero(r, g)) * sum;
            let b0 = g * blocks_per_group;
            let b1 = (b0 + blocks_per_group).min(m.cols / BLOCK);
            for b in b0..b1 {
                let span = b * BLOCK..(b + 1) * BLOCK;
                let dot = block_dot(&codes[span.clone()], &act.codes[span]);
                acc += s * act.scales[b] * dot as f32;
            }
        }
        *out = acc - zero_term;
    }
}

/// `⟨A_r, v⟩` for the 8 rows of tile `t` of a tiled `A`.
pub fn tile_dots(a: &TiledFactor, t: usize, v: &[f32]) -> [f32; TILE_ROWS] {
    let mut out = [0f32; TILE_ROWS];
    let base = t * a.rank * TILE_ROWS;
    for (lane, o) in out.iter_mut().enumerate() {
        let at = |k: usize| base + k * TILE_ROWS + lane;
        *o = match &a.tiles {
            Tiles::F16(d) => (0..a.rank).map(|k| d[at(k)].to_f32() * v[k]).sum(),
            Tiles::Int8 { codes, scales } => {
                let dot: f32 = (0..a.rank).map(|k| f32::from(codes[at(k)]) * v[k]).sum();
                scales[t * TILE_ROWS + lane] * dot
            }
        };
    }
    out
}

/// The prefill tile's sums over `blocks` added to `acc` for each token (the module formula
/// without its zero-point term), reading the interleaved codes one at a time.
pub fn tile_blocks(
    tile: &RowTile,
    acts: &[QuantizedActivation],
    blocks: std::ops::Range<usize>,
    acc: &mut [[f32; GEMM_ROWS]],
) {
    let blocks_per_group = tile.group / BLOCK;
    for (act, acc) in acts.iter().zip(acc) {
        for (lane, a) in acc.iter_mut().enumerate() {
            for b in blocks.clone() {
                let s = tile.scales[b / blocks_per_group * GEMM_ROWS + lane];
                let dot: i32 = (b * BLOCK..(b + 1) * BLOCK)
                    .map(|i| i32::from(tile.code(lane, i)) * i32::from(act.codes[i]))
                    .sum();
                *a += s * act.scales[b] * dot as f32;
            }
        }
    }
}
