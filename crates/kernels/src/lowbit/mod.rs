//! Products with recoup's packed low-bit matrices (`recoup_formats::packed`).
//!
//! Batch-1 decode is bound by the bytes of weights read, so the matrix-vector product reads
//! the packed codes directly and never materializes f32 weights. As in llama.cpp, the
//! activation is quantized once per product to 8-bit blocks of 32 (one f32 scale each), and
//! every block of 32 codes meets its activation block in integer dot products, 8 rows at
//! once (the tiled layout of `recoup_formats::packed`, one row per SIMD lane); with
//! `s` the group's scale, `z` its zero point and `d_b` the activation block's scale,
//!
//! ```text
//! y_r = Σ_g s_g · ( Σ_{b∈g} d_b · Σ_i q_i·x̂_i  −  z_g · Σ_{b∈g} d_b · Σ_i x̂_i )
//! ```
//!
//! where the second sum depends on the activation only and is computed once per product.
//! A low-rank branch `A·B` is added in the same job as the main product: each thread
//! computes its share of `v = B·x` (rank values), waits for the others, computes its rows
//! and adds `⟨A_r, v⟩` to them, 8 rows at a time, while they are still in L1 (the fused
//! path); the unfused path, kept as the measured baseline, runs the down-projection, the
//! up-projection and the addition as jobs of their own.
//!
//! Prefill (many tokens) runs the same formula as an integer GEMM over tiles of rows whose
//! codes are unpacked once and shared by every token ([`prefill`]).
//!
//! Every SIMD kernel has a scalar twin in [`reference`] computing the same formula; the
//! tests compare them on random data, and compare both with the f32 product of the
//! dequantized weights (the difference is bounded by the activation's rounding).

pub mod prefill;
pub mod reference;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use prefill::packed_matmul;

use crate::SharedMut;
use crate::qdec::{ResidualEpilogue, ResidualRef, SelectedCodes, add_residual, residual_into};
use half::f16;
use recoup_formats::packed::{BLOCK, Factor, PackedMatrix};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

/// An instruction set a kernel is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust: the reference twin, and the path on machines without the others.
    Scalar,
    /// AVX2 + FMA + F16C, integer dot products with `vpmaddubsw`.
    Avx2,
    /// AVX2 with AVX-512 VNNI's 256-bit `vpdpbusd` (u8 × i8 → i32 in one instruction).
    Avx2Vnni,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx2Vnni => "avx2-vnni",
        }
    }

    /// Every instruction set this machine runs, the plain one first.
    pub fn available() -> Vec<Isa> {
        let mut isas = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if x86::has_avx2() {
                isas.push(Isa::Avx2);
            }
            if x86::has_avx2_vnni() {
                isas.push(Isa::Avx2Vnni);
            }
        }
        isas
    }

    /// The fastest available set, or the one `RECOUP_ISA` names (for comparisons).
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            let available = Isa::available();
            if let Ok(want) = std::env::var("RECOUP_ISA") {
                match available.iter().find(|i| i.name() == want) {
                    Some(&isa) => return isa,
                    None => eprintln!(
                        "recoup: RECOUP_ISA={want} is not available here ({}); using the best",
                        available
                            .iter()
                            .map(|i| i.name())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                }
            }
            *available.last().unwrap()
        })
    }
}

/// An activation vector rounded to 8-bit blocks of [`BLOCK`] values: `x ≈ d_b · codes`.
#[derive(Clone, Debug, Default)]
pub struct QuantizedActivation {
    pub codes: Vec<i8>,
    /// `d_b`, one per block.
    pub scales: Vec<f32>,
    /// `d_b · Σ codes` per block: the activation's part of the zero-point term.
    pub block_sums: Vec<f32>,
}

impl QuantizedActivation {
    /// Rounds `x` (a multiple of [`BLOCK`] long) to nearest, symmetric per block.
    pub fn quantize(x: &[f32]) -> Self {
        let mut q = Self::default();
        q.requantize(x);
        q
    }

    /// [`Self::quantize`] into existing buffers, with the best instruction set.
    pub fn requantize(&mut self, x: &[f32]) {
        self.requantize_with(x, Isa::best());
    }

    /// [`Self::requantize`] with the kernels of `isa` (every set gives the same bytes).
    pub fn requantize_with(&mut self, x: &[f32], isa: Isa) {
        assert!(
            x.len().is_multiple_of(BLOCK),
            "activation length {}",
            x.len()
        );
        let blocks = x.len() / BLOCK;
        self.codes.resize(x.len(), 0);
        self.scales.resize(blocks, 0.0);
        self.block_sums.resize(blocks, 0.0);
        for (b, (xb, cb)) in x
            .chunks_exact(BLOCK)
            .zip(self.codes.chunks_exact_mut(BLOCK))
            .enumerate()
        {
            let (d, sum) = match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: listed by `Isa::available` only where the CPU has AVX2 and FMA;
                // both chunks hold a whole block.
                Isa::Avx2 | Isa::Avx2Vnni => unsafe { x86::quantize_block(xb, cb) },
                _ => reference::quantize_block(xb, cb),
            };
            self.scales[b] = d;
            self.block_sums[b] = d * sum as f32;
        }
    }

    /// The activation's zero-point term per group of `group` channels.
    pub fn group_sums(&self, group: usize) -> Vec<f32> {
        self.block_sums
            .chunks(group / BLOCK)
            .map(|g| g.iter().sum())
            .collect()
    }
}

/// A low-rank factor as stored, borrowed: row-major f16, or int8 with an f16 scale per row.
#[derive(Clone, Copy, Debug)]
pub enum FactorRef<'a> {
    F16(&'a [f16]),
    Int8 { codes: &'a [i8], scales: &'a [f16] },
}

impl<'a> From<&'a Factor> for FactorRef<'a> {
    fn from(f: &'a Factor) -> Self {
        match f {
            Factor::F16(v) => FactorRef::F16(v),
            Factor::Int8 { codes, scales } => FactorRef::Int8 { codes, scales },
        }
    }
}

/// `⟨row r of f, v⟩`; rows are `v.len()` wide.
pub fn factor_row_dot(f: FactorRef, r: usize, v: &[f32], isa: Isa) -> f32 {
    match isa {
        Isa::Scalar => reference::factor_row_dot(f, r, v),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::available` lists these only where the CPU has AVX2, FMA and F16C.
        Isa::Avx2 | Isa::Avx2Vnni => unsafe { x86::factor_row_dot(f, r, v) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => reference::factor_row_dot(f, r, v),
    }
}

/// `out = f · x` for a `[out.len(), x.len()]` factor (the branch's down-projection `B·x`).
/// Rows go to the thread pool when the factor is large (a down-projection is as wide as
/// the layer's input: 8960 columns in a 1.5B model's MLP).
pub fn factor_matvec(f: FactorRef, x: &[f32], out: &mut [f32], isa: Isa) {
    split_rows(out, x.len(), |r0, part| {
        for (j, o) in part.iter_mut().enumerate() {
            *o = factor_row_dot(f, r0 + j, x, isa);
        }
    });
}

/// Rows of `A` that the epilogue computes together.
pub const TILE_ROWS: usize = 8;

/// A low-rank up-projection `A` `[rows, rank]` laid out for the epilogue: tiles of
/// [`TILE_ROWS`] rows, each stored rank-major (entry `k` of the tile's 8 rows side by
/// side), so 8 output rows cost `rank` vector FMAs and no horizontal sums. The last tile is
/// padded with zeros. Built once when a layer is loaded; the same bytes as `A`.
#[derive(Clone, Debug)]
pub struct TiledFactor {
    pub rows: usize,
    pub rank: usize,
    pub tiles: Tiles,
}

#[derive(Clone, Debug)]
pub enum Tiles {
    F16(Vec<f16>),
    /// int8 codes, and the per-row scales as f32 (padded like the rows).
    Int8 {
        codes: Vec<i8>,
        scales: Vec<f32>,
    },
}

impl TiledFactor {
    pub fn new(a: FactorRef, rows: usize, rank: usize) -> Self {
        let padded = rows.div_ceil(TILE_ROWS) * TILE_ROWS;
        let index = |r: usize, k: usize| (r / TILE_ROWS * rank + k) * TILE_ROWS + r % TILE_ROWS;
        let tiles = match a {
            FactorRef::F16(a) => {
                assert_eq!(a.len(), rows * rank, "A holds {rows} rows of rank {rank}");
                let mut t = vec![f16::ZERO; padded * rank];
                for (r, row) in a.chunks_exact(rank).enumerate() {
                    row.iter()
                        .enumerate()
                        .for_each(|(k, &v)| t[index(r, k)] = v);
                }
                Tiles::F16(t)
            }
            FactorRef::Int8 { codes, scales } => {
                assert!(
                    codes.len() == rows * rank && scales.len() == rows,
                    "A's shape"
                );
                let mut t = vec![0i8; padded * rank];
                for (r, row) in codes.chunks_exact(rank).enumerate() {
                    row.iter()
                        .enumerate()
                        .for_each(|(k, &v)| t[index(r, k)] = v);
                }
                let mut s: Vec<f32> = scales.iter().map(|s| s.to_f32()).collect();
                s.resize(padded, 0.0);
                Tiles::Int8 {
                    codes: t,
                    scales: s,
                }
            }
        };
        Self { rows, rank, tiles }
    }
}

/// A low-rank branch's factors as the kernels take them: `A` tiled, `B` `[rank, cols]`.
#[derive(Clone, Copy)]
pub struct LowRankFactors<'a> {
    pub a: &'a TiledFactor,
    pub b: FactorRef<'a>,
}

/// The low-rank up-projection added to output rows: `y_r += ⟨A_r, v⟩`.
#[derive(Clone, Copy)]
pub struct LowRankEpilogue<'a> {
    pub a: &'a TiledFactor,
    /// `v = B·x`, `rank` values.
    pub v: &'a [f32],
}

impl LowRankEpilogue<'_> {
    /// Panics unless `A` holds `rows` rows of `v.len()` values.
    fn check(&self, rows: usize) {
        let rank = self.v.len();
        assert!(
            self.a.rows == rows && self.a.rank == rank,
            "low-rank factor A is [{}, {}], not [{rows}, {rank}]",
            self.a.rows,
            self.a.rank
        );
    }
}

/// What is added to output rows in the same pass as the main product, while they are in
/// L1: the low-rank up-projection, QDEC's residual correction, both or neither.
#[derive(Clone, Copy, Default)]
pub struct Epilogue<'a> {
    pub low_rank: Option<LowRankEpilogue<'a>>,
    pub residual: Option<ResidualEpilogue<'a>>,
}

impl<'a> Epilogue<'a> {
    pub fn low_rank(e: LowRankEpilogue<'a>) -> Self {
        Self {
            low_rank: Some(e),
            residual: None,
        }
    }

    /// Adds both parts to `y`, outputs `r0…`.
    fn apply(&self, r0: usize, y: &mut [f32], isa: Isa) {
        if let Some(e) = self.low_rank {
            add_low_rank(e, r0, y, isa);
        }
        if let Some(e) = self.residual {
            add_residual(e, r0, y, isa);
        }
    }
}

/// `⟨A_r, v⟩` for the 8 rows of tile `t`.
pub fn tile_dots(a: &TiledFactor, t: usize, v: &[f32], isa: Isa) -> [f32; TILE_ROWS] {
    assert!(t * TILE_ROWS < a.rows && v.len() == a.rank, "tile {t} of A");
    match isa {
        Isa::Scalar => reference::tile_dots(a, t, v),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: listed by `Isa::available` only where the CPU has AVX2, FMA and F16C;
        // the assert bounds the tile.
        Isa::Avx2 | Isa::Avx2Vnni => unsafe { x86::tile_dots(a, t, v) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => reference::tile_dots(a, t, v),
    }
}

/// `y[i] += ⟨A_{r0+i}, v⟩` for `i < y.len()`, a tile of 8 rows at a time.
pub fn add_low_rank(e: LowRankEpilogue, r0: usize, y: &mut [f32], isa: Isa) {
    let end = r0 + y.len();
    let mut r = r0;
    while r < end {
        let (t, lane) = (r / TILE_ROWS, r % TILE_ROWS);
        let dots = tile_dots(e.a, t, e.v, isa);
        let n = (TILE_ROWS - lane).min(end - r);
        for (out, d) in y[r - r0..r - r0 + n].iter_mut().zip(&dots[lane..lane + n]) {
            *out += d;
        }
        r += n;
    }
}

/// `y[i] = ⟨packed row r0 + i, x⟩` (+ the epilogue) for `i < y.len()`, on the calling thread.
/// Parallel callers start parts on multiples of 16 rows, so the epilogue's tiles and the
/// residual's bytes (two outputs each) align.
pub fn packed_rows(
    m: &PackedMatrix,
    act: &QuantizedActivation,
    group_sums: &[f32],
    r0: usize,
    y: &mut [f32],
    epilogue: Epilogue,
    isa: Isa,
) {
    assert_eq!(
        act.codes.len(),
        m.cols,
        "activation length vs matrix columns"
    );
    assert!(r0 + y.len() <= m.rows, "rows out of range");
    assert_eq!(group_sums.len(), m.groups_per_row(), "group sums vs groups");
    if let Some(e) = &epilogue.low_rank {
        e.check(m.rows);
    }
    match isa {
        Isa::Scalar => reference::packed_rows(m, act, group_sums, r0, y),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: listed by `Isa::available` only where the CPU has the features; the
        // asserts above and `PackedMatrix::new`'s checks bound every read.
        Isa::Avx2 => unsafe { x86::packed_rows_avx2(m, act, group_sums, r0, y) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, with AVX-512 VNNI and VL present.
        Isa::Avx2Vnni => unsafe { x86::packed_rows_vnni(m, act, group_sums, r0, y) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => reference::packed_rows(m, act, group_sums, r0, y),
    }
    // The rows just written are still in L1: the epilogue costs no pass over them.
    epilogue.apply(r0, y, isa);
}

/// Below this many weights a product runs on the calling thread alone.
const MIN_PARALLEL_WEIGHTS: usize = 1 << 15;

/// Runs `f(first_row, rows_of_out)` on parts of `out` (one value per row of a `cols`-wide
/// matrix) on the threads of the spin pool, or whole on the calling thread when the matrix
/// is small. Parts are claimed in shrinking blocks ([`claim_rows`]), so a thread that
/// starts late or runs slower (another tenant on its core) computes fewer of them.
fn split_rows(out: &mut [f32], cols: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let pool = crate::pool::global();
    let rows = out.len();
    if pool.threads() == 1 || rows * cols < MIN_PARALLEL_WEIGHTS {
        return f(0, out);
    }
    let base = SharedMut(out.as_mut_ptr());
    let next = AtomicUsize::new(0);
    pool.run(&|_| {
        claim_rows(&next, rows, pool.threads(), |a, b| {
            // SAFETY: claimed ranges are disjoint parts of `out`, which outlives `run`.
            let mine = unsafe { std::slice::from_raw_parts_mut(base.get().add(a), b - a) };
            f(a, mine);
        });
    });
}

/// Rows a thread claims at least at once.
const MIN_CLAIM_ROWS: usize = 64;

/// Guided self-scheduling of `rows` over `threads`: each claim takes `1/(2·threads)` of the
/// rows left (at least [`MIN_CLAIM_ROWS`]), so a product costs a few atomic claims, and the
/// threads finish together even when one of them starts late. Claims start on multiples
/// of 16 rows (64 bytes of output), so threads rarely share a cache line of the output, and
/// the epilogue's 8-row tiles and the residual's 2-output bytes align.
fn claim_rows(next: &AtomicUsize, rows: usize, threads: usize, mut run: impl FnMut(usize, usize)) {
    loop {
        let start = next.load(Ordering::Relaxed);
        if start >= rows {
            return;
        }
        let size = ((rows - start) / (2 * threads))
            .max(MIN_CLAIM_ROWS)
            .next_multiple_of(16);
        let end = (start + size).min(rows);
        if next
            .compare_exchange(start, end, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            run(start, end);
        }
    }
}

/// `y = m · x` with rows split across the spin pool, plus the fused epilogue.
pub fn packed_matvec(
    m: &PackedMatrix,
    act: &QuantizedActivation,
    y: &mut [f32],
    epilogue: Epilogue,
    isa: Isa,
) {
    assert_eq!(y.len(), m.rows, "output length vs matrix rows");
    let sums = act.group_sums(m.spec.group);
    split_rows(y, m.cols, |r0, part| {
        packed_rows(m, act, &sums, r0, part, epilogue, isa)
    });
}

/// Chooses a token's channels and hands them to the closure it is given (which may then
/// borrow them, wherever the selection lives).
pub type Select<'a> = dyn Fn(&mut dyn FnMut(&SelectedCodes)) + Sync + 'a;

/// QDEC's correction with the channels chosen inside the product's job (`select` must not
/// use the pool).
#[derive(Clone, Copy)]
pub struct Selecting<'a> {
    pub residual: ResidualRef<'a>,
    pub select: &'a Select<'a>,
}

impl Selecting<'_> {
    /// Selects, and hands `f` the correction of the selected channels.
    fn with(&self, f: &mut dyn FnMut(ResidualEpilogue)) {
        let residual = self.residual;
        (self.select)(&mut |selected| f(ResidualEpilogue { residual, selected }));
    }
}

/// [`packed_matvec`] plus QDEC's correction, the channels chosen inside the same job and no
/// barrier in it (see `RowPhase`).
pub fn packed_matvec_selecting(
    m: &PackedMatrix,
    act: &QuantizedActivation,
    y: &mut [f32],
    correction: Selecting,
    isa: Isa,
) {
    // Checked here, not inside the job: a part that panicked there would leave the others
    // waiting for a correction that never comes.
    assert_eq!(y.len(), m.rows, "output length vs matrix rows");
    assert_eq!(
        act.codes.len(),
        m.cols,
        "activation length vs matrix columns"
    );
    assert_eq!(
        correction.residual.rows(),
        m.rows,
        "residual rows vs matrix rows"
    );
    let pool = crate::pool::global();
    let sums = act.group_sums(m.spec.group);
    if pool.threads() == 1 || m.rows * m.cols < MIN_PARALLEL_WEIGHTS {
        return correction.with(&mut |e| {
            let epilogue = Epilogue {
                low_rank: None,
                residual: Some(e),
            };
            packed_rows(m, act, &sums, 0, y, epilogue, isa)
        });
    }
    RowPhase::run(y, Some(correction), isa, &|phase, part| {
        phase.rows(part, &|r0, out| {
            packed_rows(m, act, &sums, r0, out, Epilogue::default(), isa)
        });
    });
}

/// The rows of a decode product split across the spin pool, with QDEC's correction and no
/// barrier for it. Rows are claimed in shrinking blocks ([`claim_rows`]). With a correction,
/// part 0 first selects the channels and computes the correction of every output into a
/// scratch vector while the other parts start on the rows, then claims rows too (fewer of
/// them, having started late). A block finished once the correction is complete gets it
/// added while its outputs are in L1; the few finished before keep their ranges and are
/// corrected by their part at the end. A version that waited at a barrier for every row
/// and then corrected half the outputs per part spent about 2 % of a token in that wait
/// (perf, 3-bit 0.5B model at `k_chunk` 8).
struct RowPhase<'a> {
    y: SharedMut,
    rows: usize,
    threads: usize,
    next: AtomicUsize,
    correction: Option<Selecting<'a>>,
    scratch: SharedMut,
    state: AtomicU8,
    isa: Isa,
}

/// States of the correction in a [`RowPhase`].
const PENDING: u8 = 0;
const READY: u8 = 1;
const FAILED: u8 = 2;

impl<'a> RowPhase<'a> {
    /// Runs `job(phase, part)` as one job of the spin pool, each part calling
    /// [`Self::rows`] once (after any work of its own) to compute and correct the rows of `y`.
    fn run(
        y: &mut [f32],
        correction: Option<Selecting<'a>>,
        isa: Isa,
        job: &(dyn Fn(&RowPhase, usize) + Sync),
    ) {
        thread_local! {
            /// The correction's scratch, kept by the calling thread from product to product.
            static SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
        }
        let mut scratch = SCRATCH.take();
        if correction.is_some() && scratch.len() < y.len() {
            // Grown only: the correction is written over it, not added, so it is never zeroed.
            scratch.resize(y.len(), 0.0);
        }
        let pool = crate::pool::global();
        let phase = RowPhase {
            y: SharedMut(y.as_mut_ptr()),
            rows: y.len(),
            threads: pool.threads(),
            next: AtomicUsize::new(0),
            correction,
            scratch: SharedMut(scratch.as_mut_ptr()),
            state: AtomicU8::new(PENDING),
            isa,
        };
        pool.run(&|part| job(&phase, part));
        SCRATCH.set(scratch);
    }

    /// Part `part`'s share of the rows: `compute(r0, out)` writes the outputs from row `r0`.
    /// Part 0 makes the correction first.
    fn rows(&self, part: usize, compute: &(dyn Fn(usize, &mut [f32]) + Sync)) {
        let rows = self.rows;
        if let Some(c) = self.correction.filter(|_| part == 0) {
            let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                // SAFETY: only this part writes the scratch, and before publishing it.
                let out = unsafe { std::slice::from_raw_parts_mut(self.scratch.get(), rows) };
                c.with(&mut |e| residual_into(e, 0, out, self.isa));
            }));
            if let Err(panic) = made {
                // The others then add nothing; the panic reaches the caller through `run`.
                self.state.store(FAILED, Ordering::Release);
                std::panic::resume_unwind(panic);
            }
            self.state.store(READY, Ordering::Release);
        }
        // SAFETY (both): claimed ranges are disjoint parts of `y`, which outlives the job, and
        // the scratch is only read once READY published it.
        let out = |a: usize, b: usize| unsafe {
            std::slice::from_raw_parts_mut(self.y.get().add(a), b - a)
        };
        let add = |a: usize, b: usize| {
            let c = unsafe { std::slice::from_raw_parts(self.scratch.get().add(a), b - a) };
            out(a, b).iter_mut().zip(c).for_each(|(y, c)| *y += c);
        };
        let corrected = self.correction.is_some();
        let mut early = [(0, 0); 8];
        let mut n_early = 0;
        claim_rows(&self.next, rows, self.threads, |start, end| {
            compute(start, out(start, end));
            if !corrected {
                return;
            }
            if self.state.load(Ordering::Acquire) == READY {
                add(start, end);
            } else if n_early < early.len() {
                early[n_early] = (start, end);
                n_early += 1;
            } else if self.wait() == READY {
                // Rarely reached: waits for the correction rather than keep more ranges.
                add(start, end);
            }
        });
        if n_early > 0 && self.wait() == READY {
            early[..n_early].iter().for_each(|&(a, b)| add(a, b));
        }
    }

    /// Spins until part 0 has made the correction or failed to.
    fn wait(&self) -> u8 {
        loop {
            match self.state.load(Ordering::Acquire) {
                PENDING => std::hint::spin_loop(),
                done => return done,
            }
        }
    }
}

/// `y = m·x + A·(B·x)` in one job of the spin pool, the fused low-rank path: each thread
/// computes its share of `v = B·x`, waits at a barrier until all of `v` is there, then
/// claims rows of the main product and adds `⟨A_r, v⟩` to them while they are in L1.
/// `x` is the activation in f32 (the branch's input, original column order), `act` the
/// same activation quantized in the matrix's stored order; `correction`, QDEC's, is chosen
/// after the barrier while the other parts start on the rows (`RowPhase`).
#[allow(clippy::too_many_arguments)]
pub fn packed_matvec_low_rank(
    m: &PackedMatrix,
    act: &QuantizedActivation,
    x: &[f32],
    branch: LowRankFactors,
    correction: Option<Selecting>,
    y: &mut [f32],
    v: &mut [f32],
    isa: Isa,
) {
    let LowRankFactors { a, b } = branch;
    assert_eq!(y.len(), m.rows, "output length vs matrix rows");
    assert_eq!(x.len(), m.cols, "activation length vs matrix columns");
    if let Some(c) = &correction {
        assert_eq!(c.residual.rows(), m.rows, "residual rows vs matrix rows");
    }
    let rank = v.len();
    LowRankEpilogue { a, v }.check(m.rows);
    let b_ok = match b {
        FactorRef::F16(b) => b.len() == rank * m.cols,
        FactorRef::Int8 { codes, scales } => codes.len() == rank * m.cols && scales.len() == rank,
    };
    assert!(
        b_ok,
        "low-rank factor B does not hold {rank} rows of {}",
        m.cols
    );
    let pool = crate::pool::global();
    let sums = act.group_sums(m.spec.group);
    let threads = pool.threads();
    if threads == 1 || m.rows * m.cols < MIN_PARALLEL_WEIGHTS {
        factor_matvec(b, x, v, isa);
        let low_rank = Some(LowRankEpilogue { a, v });
        let Some(c) = correction else {
            let epilogue = Epilogue {
                low_rank,
                residual: None,
            };
            return packed_rows(m, act, &sums, 0, y, epilogue, isa);
        };
        return c.with(&mut |e| {
            let residual = Some(e);
            packed_rows(m, act, &sums, 0, y, Epilogue { low_rank, residual }, isa)
        });
    }
    let v_base = SharedMut(v.as_mut_ptr());
    let arrived = AtomicUsize::new(0);
    RowPhase::run(y, correction, isa, &|phase, part| {
        let (v0, v1) = crate::pool::part_range(rank, threads, part, 1);
        for r in v0..v1 {
            let dot = factor_row_dot(b, r, x, isa);
            // SAFETY: each part writes its own entries of `v`, which outlives the job.
            unsafe { *v_base.get().add(r) = dot };
        }
        // Nothing above can panic (the shapes were checked), so every part arrives.
        arrived.fetch_add(1, Ordering::SeqCst);
        while arrived.load(Ordering::SeqCst) < threads {
            std::hint::spin_loop();
        }
        // SAFETY: every write to `v` happened before its writer's arrival.
        let v = unsafe { std::slice::from_raw_parts(v_base.get(), rank) };
        let low_rank = LowRankEpilogue { a, v };
        phase.rows(part, &|r0, out| {
            packed_rows(m, act, &sums, r0, out, Epilogue::low_rank(low_rank), isa)
        });
    });
}

/// `y += A · v` as a pass of its own: the unfused up-projection, rows split across the
/// spin pool.
pub fn factor_matvec_add(a: &TiledFactor, v: &[f32], y: &mut [f32], isa: Isa) {
    let e = LowRankEpilogue { a, v };
    e.check(y.len());
    split_rows(y, v.len(), |r0, part| add_low_rank(e, r0, part, isa));
}

#[cfg(test)]
mod tests;
