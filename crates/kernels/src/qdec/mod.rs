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

/// Strided groups per chunk of the exact selector: group `j` of a chunk of `len` channels
/// holds channels `j, j + s, j + 2s, …` with `s = ⌈len / 8⌉`, so the groups' maxima are 8
/// vertical passes of `max` over contiguous slices (vectorized by the compiler).
const GROUP_MEMBERS: usize = 8;

/// Indices of the `k_chunk` largest `|x_i|` of every chunk, appended to `out` chunk by chunk
/// (in no particular order within a chunk).
pub fn select_exact(x: &[f32], k_chunk: usize, out: &mut Vec<u32>) {
    for (c, chunk) in x.chunks(CHUNK).enumerate() {
        let k = chunk_budget(k_chunk, chunk.len());
        let base = (c * CHUNK) as u32;
        if k == 0 {
            continue;
        }
        if k < chunk.len().div_ceil(GROUP_MEMBERS) {
            top_k_by_group_maxima(chunk, k, base, out);
        } else {
            top_k_by_quickselect(chunk, k, base, out);
        }
    }
}

/// The `k` largest `|v|` of `chunk` (offset `base`) by quickselect over all of it.
fn top_k_by_quickselect(chunk: &[f32], k: usize, base: u32, out: &mut Vec<u32>) {
    let mut order: Vec<u32> = (0..chunk.len() as u32).collect();
    if k < chunk.len() {
        // Larger |x| first; NaN-free inputs (activations of a finite model).
        order.select_nth_unstable_by(k - 1, |&a, &b| {
            chunk[b as usize].abs().total_cmp(&chunk[a as usize].abs())
        });
    }
    out.extend(order[..k].iter().map(|&i| i + base));
}

/// Strided groups of a full chunk.
const MAX_GROUPS: usize = CHUNK.div_ceil(GROUP_MEMBERS);
/// Candidates [`top_k_by_group_maxima`] gathers at most (the members of 32 groups).
const MAX_CANDIDATES: usize = 32 * GROUP_MEMBERS;

/// The `k` largest `|v|` of `chunk` (offset `base`), for `k` below its number of strided
/// groups, with few data-dependent branches (a fresh activation every call defeats the
/// branch predictor, which made a sorted insertion over all the group maxima the costly
/// part). One vectorized pass takes the maxima of the strided groups; cut into `k` bins,
/// the maxima give `t`, the smallest bin maximum: `k` distinct channels reach it, so the
/// `k`-th largest `|v|` is at least `t`, and every channel of the top `k` is among those
/// `≥ t`. Those candidates (members of the groups whose maximum reaches `t`, gathered
/// without branching per member) are few unless the top values crowd into one bin, and a
/// top-k over them finishes the selection.
fn top_k_by_group_maxima(chunk: &[f32], k: usize, base: u32, out: &mut Vec<u32>) {
    let stride = chunk.len().div_ceil(GROUP_MEMBERS);
    let mut maxima = [0f32; MAX_GROUPS];
    let maxima = &mut maxima[..stride];
    for slice in chunk.chunks(stride) {
        for (m, v) in maxima.iter_mut().zip(slice) {
            // A compare-and-select, which compiles to `maxps` (`f32::max` handles NaN).
            let a = v.abs();
            *m = if a > *m { a } else { *m };
        }
    }
    // Exactly `k` non-empty bins (the remainder joins the last).
    let size = stride / k;
    let bin_max = |b: usize| {
        let end = if b + 1 == k { stride } else { (b + 1) * size };
        maxima[b * size..end].iter().fold(0f32, |m, &v| m.max(v))
    };
    let t = (0..k).map(bin_max).fold(f32::INFINITY, f32::min);
    let groups = maxima.iter().filter(|&&m| m >= t).count();
    if groups * GROUP_MEMBERS > MAX_CANDIDATES {
        // The top values crowd into few bins (or are all alike): select over the chunk.
        return top_k_by_quickselect(chunk, k, base, out);
    }
    let mut candidates = [(0f32, 0u32); MAX_CANDIDATES];
    let mut n = 0;
    for (j, _) in maxima.iter().enumerate().filter(|&(_, &m)| m >= t) {
        for i in (j..chunk.len()).step_by(stride) {
            let v = chunk[i].abs();
            candidates[n] = (v, base + i as u32);
            n += usize::from(v >= t);
        }
    }
    let mut best = [(0f32, 0u32); MAX_GROUPS];
    let chosen = top_k(candidates[..n].iter().copied(), k, &mut best);
    out.extend(chosen.iter().map(|&(_, i)| i));
}

/// Up to this `k`, [`top_k`] keeps a sorted list (one compare per item, few insertions);
/// beyond, it collects everything and runs quickselect.
const INSERTION_MAX_K: usize = 16;

/// The `k` items of largest magnitude (`k` at most `best.len()`), as a prefix of `best`.
fn top_k(
    items: impl Iterator<Item = (f32, u32)>,
    k: usize,
    best: &mut [(f32, u32)],
) -> &[(f32, u32)] {
    if k > INSERTION_MAX_K {
        let mut all: Vec<(f32, u32)> = items.collect();
        let k = k.min(all.len());
        if k > 0 && k < all.len() {
            all.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
        }
        best[..k].copy_from_slice(&all[..k]);
        return &best[..k];
    }
    let mut len = 0;
    for item in items {
        if len == k && item.0 <= best[k - 1].0 {
            continue;
        }
        // Insert in descending order, dropping the smallest when full.
        let mut at = len.min(k - 1);
        while at > 0 && best[at - 1].0 < item.0 {
            best[at] = best[at - 1];
            at -= 1;
        }
        best[at] = item;
        len = (len + 1).min(k);
    }
    &best[..len]
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

    /// The bucket of a magnitude: the first whose floor it reaches (the last when it
    /// reaches none).
    pub fn bucket(&self, v: f32) -> usize {
        // The floors are two arithmetic progressions, so the bucket is a division away; the
        // guess is then moved against the floors themselves (a step at most, where rounding
        // put it on the wrong side of one), so the answer is exactly the first floor ≤ v,
        // without a binary search's unpredictable branches per element.
        let f = &self.floors;
        if v.is_nan() {
            // No floor is ≤ NaN: the first bucket, as a search over the floors gives.
            return 0;
        }
        // Truncating casts (v ≥ 0, and the fix-up below covers the rounding): `floor` and
        // `ceil` are library calls on baseline x86-64.
        let guess = if v >= f[15] {
            let span = f[0] - f[15];
            if span > 0.0 {
                ((f[0] - v) / span * 15.0) as usize
            } else {
                0
            }
        } else if f[15] > 0.0 {
            31 - ((16.0 * v / f[15]) as usize).min(31)
        } else {
            31
        };
        let mut b = guess.min(BUCKETS - 1);
        while b > 0 && f[b - 1] <= v {
            b -= 1;
        }
        while b < BUCKETS - 1 && f[b] > v {
            b += 1;
        }
        b
    }
}

/// The paper's approximate per-chunk top-k: buckets are taken whole from the largest down
/// while they fit, then the first members (in channel order) of the boundary bucket fill the
/// budget exactly. Everything selected is at least everything not selected, except within
/// that bucket. Two passes over the chunk (count per bucket, then collect by comparing with
/// the boundary's floors) need no scratch.
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
        // Bucket < boundary ⟺ v reaches the floor of the bucket before the boundary;
        // bucket ≤ boundary ⟺ v reaches the boundary's floor (every v, in the last bucket).
        let f = &floors.floors;
        let above = if boundary > 0 {
            f[boundary - 1]
        } else {
            f32::INFINITY
        };
        let at = if boundary < BUCKETS - 1 {
            f[boundary]
        } else {
            0.0
        };
        for (i, v) in chunk.iter().enumerate() {
            let v = v.abs();
            let take = if v >= above && boundary > 0 {
                true
            } else if v >= at && from_boundary > 0 {
                from_boundary -= 1;
                true
            } else {
                false
            };
            if take {
                out.push((c * CHUNK + i) as u32);
            }
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
/// integers: channels sorted by |x| (when there are more than [`GROUP`]) and cut into groups of [`GROUP`], each with its own
/// scale (`x_i ≈ scales[g] · codes_i`), so small selected values are not rounded on the
/// scale of the largest. Levels are stored as `nibble = level + 8`; `offset = Σ_g scales[g]
/// · 8 · Σ_{i∈g} codes_i` removes the 8s from every output at the end.
#[derive(Clone, Debug, Default)]
pub struct SelectedCodes {
    pub channels: Vec<u32>,
    pub codes: Vec<i8>,
    pub scales: Vec<f32>,
    pub offset: f32,
    /// The codes of consecutive channel pairs of each group as one little-endian i16 (an
    /// odd last channel pairs with code 0): the SIMD kernel's multiplier, made once per
    /// selection rather than per product and thread.
    pub pair_codes: Vec<i16>,
    /// Scratch of [`Self::refill`], kept to reuse its allocation.
    order: Vec<u32>,
}

impl SelectedCodes {
    /// `channels` selected from an activation, `x` their values (same order).
    pub fn new(channels: &[u32], x: &[f32]) -> Self {
        let mut codes = Self::default();
        codes.refill(channels, x);
        codes
    }

    /// [`Self::new`] in place: a decode step refills the previous step's buffers.
    pub fn refill(&mut self, channels: &[u32], x: &[f32]) {
        assert_eq!(channels.len(), x.len(), "selected channels vs values");
        self.order.clear();
        self.order.extend(0..channels.len() as u32);
        let magnitude = |i: u32| x[i as usize].abs();
        if channels.len() > GROUP {
            self.order
                .sort_unstable_by(|&a, &b| magnitude(b).total_cmp(&magnitude(a)));
        }
        self.channels.clear();
        self.channels
            .extend(self.order.iter().map(|&i| channels[i as usize]));
        self.codes.clear();
        self.scales.clear();
        self.pair_codes.clear();
        self.offset = 0.0;
        for group in self.order.chunks(GROUP) {
            // The group's largest (its first, when there are several groups to sort into).
            let scale = group.iter().map(|&i| magnitude(i)).fold(0f32, f32::max) / 127.0;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let start = self.codes.len();
            self.codes
                .extend(group.iter().map(|&i| (x[i as usize] * inv).round() as i8));
            let codes = &self.codes[start..];
            let sum: i32 = codes.iter().map(|&c| i32::from(c)).sum();
            self.offset += scale * (8 * sum) as f32;
            self.scales.push(scale);
            self.pair_codes.extend(codes.chunks(2).map(|pair| {
                let second = pair.get(1).copied().unwrap_or(0);
                i16::from_le_bytes([pair[0] as u8, second as u8])
            }));
        }
    }
}

/// Outputs accumulated per pass: the accumulators stay in L1 while every selected run is
/// read over the slice.
pub(crate) const SLICE: usize = 1024;

/// `y[j] += scale_o · Σ_{i∈S} x_i · level(i, o)` for outputs `o = r0 + j`. `r0` is even (a
/// byte holds two outputs), and the slice ends on an even output or at the last row.
pub fn add_residual(e: ResidualEpilogue, r0: usize, y: &mut [f32], isa: Isa) {
    residual_pass::<true>(e, r0, y, isa);
}

/// [`add_residual`] written over `out` rather than added to it (whatever `out` held): a
/// correction computed ahead of the outputs it corrects needs no zeroed buffer.
pub fn residual_into(e: ResidualEpilogue, r0: usize, out: &mut [f32], isa: Isa) {
    residual_pass::<false>(e, r0, out, isa);
}

fn residual_pass<const ACCUMULATE: bool>(e: ResidualEpilogue, r0: usize, y: &mut [f32], isa: Isa) {
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
        Isa::Scalar => reference::residual_pass::<ACCUMULATE>(e, r0, y),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: listed by `Isa::available` only where the CPU has AVX2, FMA and F16C; the
        // asserts bound every run and output.
        Isa::Avx2 | Isa::Avx2Vnni => unsafe { x86::residual_pass::<ACCUMULATE>(e, r0, y) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => reference::residual_pass::<ACCUMULATE>(e, r0, y),
    }
}
