//! QDEC's run-time half (papers.md part B): pick the salient input channels of the current
//! activation, `k_chunk` per 1024-channel chunk, and add their residuals to the output:
//!
//! ```text
//! y_o += scale_o · Σ_{i∈S} x_i · level(i, o)
//! ```
//!
//! The residual is stored input-major (`recoup_formats::residual`), so one selected channel
//! is one contiguous run of `rows/2` bytes. The per-row scale factors out of the sum, so the
//! kernel sums over the selected channels first and multiplies by the scales once; the
//! selected activations are rounded to 8 bits (a scale per 16 channels of similar size) and
//! the sums run on integers, as the main product's do. In decode the correction runs in the
//! epilogue of the main product (`lowbit::Epilogue`): each thread corrects its own output
//! rows right after computing them, reading the matching span of every selected run (no
//! atomics, no extra pass over the output).
//!
//! Selection: exact top-k per chunk (quickselect, the CPU's natural choice), the paper's
//! 32-bucket approximation with two calibrated thresholds, and, for the ablation, a static
//! set (exact top-k of a calibration statistic, computed once) or a random one.

pub mod reference;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

use crate::lowbit::Isa;
use half::f16;

/// Channels per selection chunk.
pub const CHUNK: usize = 1024;
/// Buckets of the approximate selector.
pub const BUCKETS: usize = 32;

/// Channels selected in a chunk of `len` channels (a partial last chunk gets its share,
/// rounded down).
pub fn chunk_budget(k_chunk: usize, len: usize) -> usize {
    (k_chunk * len / CHUNK).min(len)
}

/// Channels selected over a vector of `n`.
pub fn total_budget(k_chunk: usize, n: usize) -> usize {
    (0..n)
        .step_by(CHUNK)
        .map(|c0| chunk_budget(k_chunk, (n - c0).min(CHUNK)))
        .sum()
}

/// Up to this budget per chunk, the exact selector keeps a sorted list of the best so far
/// (one compare per channel, few insertions); beyond, it runs quickselect.
const INSERTION_MAX_K: usize = 64;

/// Indices of the `k_chunk` largest `|x_i|` of every chunk, appended to `out` chunk by chunk
/// (in no particular order within a chunk).
pub fn select_exact(x: &[f32], k_chunk: usize, out: &mut Vec<u32>) {
    for (c, chunk) in x.chunks(CHUNK).enumerate() {
        let k = chunk_budget(k_chunk, chunk.len());
        let base = (c * CHUNK) as u32;
        if k == 0 {
            continue;
        }
        if k <= INSERTION_MAX_K && k < chunk.len() {
            top_k_by_insertion(chunk, k, base, out);
            continue;
        }
        let mut order: Vec<u32> = (0..chunk.len() as u32).map(|i| i + base).collect();
        if k < chunk.len() {
            // Larger |x| first; NaN-free inputs (activations of a finite model).
            order.select_nth_unstable_by(k - 1, |&a, &b| {
                x[b as usize].abs().total_cmp(&x[a as usize].abs())
            });
        }
        out.extend_from_slice(&order[..k]);
    }
}

/// The `k` largest `|v|` of `chunk` (offset `base`): channels above the current floor are
/// appended to a buffer, and whenever it holds `2k`, a quickselect keeps the best `k` and
/// raises the floor to the k-th of them. After the first `2k` channels the floor is high
/// enough that most groups of 8 cost one vectorized compare.
fn top_k_by_insertion(chunk: &[f32], k: usize, base: u32, out: &mut Vec<u32>) {
    const LANES: usize = 8;
    let mut buf = [(0f32, 0u32); 2 * INSERTION_MAX_K + LANES];
    let (mut len, mut floor) = (0, f32::NEG_INFINITY);
    let by_magnitude = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0);
    for (g, group) in chunk.chunks(LANES).enumerate() {
        let above = match <&[f32; LANES]>::try_from(group) {
            // A fixed-size group compiles to one vector compare.
            Ok(lanes) => lanes.iter().fold(0u8, |m, v| m | u8::from(v.abs() > floor)) != 0,
            Err(_) => group.iter().any(|v| v.abs() > floor),
        };
        if !above {
            continue;
        }
        for (j, v) in group.iter().enumerate() {
            if v.abs() > floor {
                buf[len] = (v.abs(), base + (g * LANES + j) as u32);
                len += 1;
            }
        }
        if len >= 2 * k {
            buf[..len].select_nth_unstable_by(k - 1, by_magnitude);
            len = k;
            floor = buf[..k].iter().fold(f32::INFINITY, |m, e| m.min(e.0));
        }
    }
    if len > k {
        buf[..len].select_nth_unstable_by(k - 1, by_magnitude);
    }
    out.extend(buf[..len.min(k)].iter().map(|&(_, i)| i));
}

/// The paper's bucket floors from two calibrated magnitudes: `t_a`, the largest |x| seen,
/// and `t_b`, the largest k-th largest |x| seen (k the layer's whole budget). Floors 0…15
/// are evenly spaced from `t_a` down to `t_b`, floors 16…31 from `15/16·t_b` down to 0;
/// bucket `b` holds `[floor_b, floor_{b−1})`, bucket 0 everything from `t_a` up.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BucketFloors {
    pub floors: [f32; BUCKETS],
}

impl BucketFloors {
    pub fn new(t_a: f32, t_b: f32) -> Self {
        let t_b = t_b.clamp(0.0, t_a);
        let mut floors = [0f32; BUCKETS];
        for (b, f) in floors.iter_mut().enumerate() {
            *f = if b < 16 {
                t_a + (t_b - t_a) * b as f32 / 15.0
            } else {
                t_b * (31 - b) as f32 / 16.0
            };
        }
        Self { floors }
    }

    /// The bucket of a magnitude: the first whose floor it reaches.
    pub fn bucket(&self, v: f32) -> usize {
        // The floors are monotone, so a binary search finds the first one ≤ v.
        self.floors.partition_point(|&f| f > v).min(BUCKETS - 1)
    }
}

/// The paper's approximate per-chunk top-k: buckets are taken whole from the largest down
/// while they fit, then the first members (in channel order) of the boundary bucket fill the
/// budget exactly. Everything selected is at least everything not selected, except within
/// that bucket. Two passes over the chunk (count per bucket, then collect) need no scratch.
pub fn select_bucket(x: &[f32], k_chunk: usize, floors: &BucketFloors, out: &mut Vec<u32>) {
    for (c, chunk) in x.chunks(CHUNK).enumerate() {
        let k = chunk_budget(k_chunk, chunk.len());
        if k == 0 {
            continue;
        }
        let mut counts = [0usize; BUCKETS];
        chunk
            .iter()
            .for_each(|v| counts[floors.bucket(v.abs())] += 1);
        // The boundary bucket, and how many of its members complete the budget.
        let (mut boundary, mut from_boundary) = (BUCKETS - 1, 0);
        let mut taken = 0;
        for (b, &n) in counts.iter().enumerate() {
            if taken + n >= k {
                (boundary, from_boundary) = (b, k - taken);
                break;
            }
            taken += n;
        }
        for (i, v) in chunk.iter().enumerate() {
            let b = floors.bucket(v.abs());
            if b == boundary && from_boundary > 0 {
                from_boundary -= 1;
            } else if b >= boundary {
                continue;
            }
            out.push((c * CHUNK + i) as u32);
        }
    }
}

/// `k_chunk` distinct uniformly random channels per chunk (the ablation's baseline), from
/// `seed` (callers vary it per call).
pub fn select_random(n: usize, k_chunk: usize, seed: u64, out: &mut Vec<u32>) {
    let mut state = seed;
    // SplitMix64: tiny, fast, and plenty random for picking channels.
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    for c0 in (0..n).step_by(CHUNK) {
        let len = (n - c0).min(CHUNK);
        let k = chunk_budget(k_chunk, len);
        // Floyd's algorithm: k distinct values of 0..len in k draws.
        let start = out.len();
        for j in len - k..len {
            let t = (next() % (j as u64 + 1)) as usize;
            let pick = if out[start..].contains(&((c0 + t) as u32)) {
                j
            } else {
                t
            };
            out.push((c0 + pick) as u32);
        }
    }
}

/// A layer's 4-bit residual as the kernel reads it: `codes` `[cols, rows/2]` input-major
/// (see `recoup_formats::residual`), `scales` one per output row.
#[derive(Clone, Copy)]
pub struct ResidualRef<'a> {
    pub codes: &'a [u8],
    pub scales: &'a [f16],
}

impl ResidualRef<'_> {
    pub fn rows(&self) -> usize {
        self.scales.len()
    }

    /// The packed run of input channel `i`.
    pub fn run(&self, i: usize) -> &[u8] {
        let half = self.rows() / 2;
        &self.codes[i * half..(i + 1) * half]
    }
}

/// The correction added to a layer's output: the residual and one token's selected
/// channels, their activations already rounded (once per selection, shared by every
/// product and thread that reads the same input).
#[derive(Clone, Copy)]
pub struct ResidualEpilogue<'a> {
    pub residual: ResidualRef<'a>,
    pub selected: &'a SelectedCodes,
}

/// Selected channels per activation scale: 8 pairs, whose i16 sums cannot overflow
/// (`2 · 15 · 127 · 8 < 2¹⁵`).
pub(crate) const GROUP: usize = 16;

/// The selected activations rounded to 8 bits so that the residual product runs on
/// integers: channels sorted by |x| and cut into groups of [`GROUP`], each with its own
/// scale (`x_i ≈ scales[g] · codes_i`), so small selected values are not rounded on the
/// scale of the largest. Levels are stored as `nibble = level + 8`; `offset = Σ_g scales[g]
/// · 8 · Σ_{i∈g} codes_i` removes the 8s from every output at the end.
#[derive(Clone, Debug)]
pub struct SelectedCodes {
    pub channels: Vec<u32>,
    pub codes: Vec<i8>,
    pub scales: Vec<f32>,
    pub offset: f32,
}

impl SelectedCodes {
    /// `channels` selected from an activation, `x` their values (same order).
    pub fn new(channels: &[u32], x: &[f32]) -> Self {
        assert_eq!(channels.len(), x.len(), "selected channels vs values");
        let mut order: Vec<usize> = (0..channels.len()).collect();
        order.sort_unstable_by(|&a, &b| x[b].abs().total_cmp(&x[a].abs()));
        let mut codes = Vec::with_capacity(order.len());
        let mut scales = Vec::with_capacity(order.len().div_ceil(GROUP));
        let mut offset = 0f32;
        for group in order.chunks(GROUP) {
            let max = x[group[0]].abs();
            let scale = max / 127.0;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let start = codes.len();
            codes.extend(group.iter().map(|&i| (x[i] * inv).round() as i8));
            let sum: i32 = codes[start..].iter().map(|&c| i32::from(c)).sum();
            offset += scale * (8 * sum) as f32;
            scales.push(scale);
        }
        Self {
            channels: order.iter().map(|&i| channels[i]).collect(),
            codes,
            scales,
            offset,
        }
    }
}

/// Outputs accumulated per pass: the accumulators stay in L1 while every selected run is
/// read over the slice.
pub(crate) const SLICE: usize = 1024;

/// `y[j] += scale_o · Σ_{i∈S} x_i · level(i, o)` for outputs `o = r0 + j`. `r0` is even (a
/// byte holds two outputs), and the slice ends on an even output or at the last row.
pub fn add_residual(e: ResidualEpilogue, r0: usize, y: &mut [f32], isa: Isa) {
    let rows = e.residual.rows();
    assert!(
        r0.is_multiple_of(2) && r0 + y.len() <= rows && rows.is_multiple_of(2),
        "residual outputs {r0}..{} of {rows}",
        r0 + y.len()
    );
    assert!(
        (r0 + y.len()).is_multiple_of(2),
        "residual slice ends mid-byte"
    );
    let cols = e.residual.codes.len() / (rows / 2).max(1);
    assert!(
        e.selected.channels.iter().all(|&i| (i as usize) < cols),
        "selected channel out of range"
    );
    match isa {
        Isa::Scalar => reference::add_residual(e, r0, y),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: listed by `Isa::available` only where the CPU has AVX2, FMA and F16C; the
        // asserts bound every run and output.
        Isa::Avx2 | Isa::Avx2Vnni => unsafe { x86::add_residual(e, r0, y) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => reference::add_residual(e, r0, y),
    }
}
