//! Prefill: the product of a packed matrix with many tokens at once.
//!
//! Codes of up to 4 bits go through an integer GEMM: every token's activation is rounded to
//! 8-bit blocks of [`BLOCK`] exactly as decode rounds it (so prefill and decode compute the
//! same formula, the module formula of [`super`]), and the matrix is processed in tiles of
//! [`GEMM_ROWS`] rows whose codes are unpacked once to bytes, interleaved by 4: quad `q` of
//! the tile holds, for each of its rows, the codes of columns `4q..4q + 4`. A register of
//! codes (8 rows) then meets a token's 4 activation bytes broadcast to all lanes in one
//! `vpmaddubsw`, and each lane accumulates one row — no horizontal sums. The pair sums stay
//! in 16 bits for a whole block of 32 (16 products of at most 15·127 each fit in an i16):
//! one `vpmaddubsw` and one 16-bit add per 32 multiply-adds, one `vpmaddwd` and one FMA per
//! block, which is what makes this faster than f32 FMAs on a CPU without VNNI. The
//! broadcast is a shuffle, the scarce operation (a kernel with one per `vpmaddubsw` ran at
//! 50 GMAC/s per core in L1, two registers of rows per broadcast at 80), hence tiles of two
//! registers. The tile's columns are taken 1024 at a time (16 KB, in L1) past every token,
//! [`TOKENS_PER_PASS`] tokens per pass, their accumulators kept in memory between chunks.
//!
//! 8-bit codes (output heads) would overflow the 16-bit sums; they take the other path:
//! tiles of rows dequantized to f32 and multiplied with `gemm`.

use super::{Isa, QuantizedActivation, reference};
use crate::SharedMut;
use rayon::prelude::*;
use recoup_formats::packed::{BLOCK, PackedMatrix, TILE_ROWS};

/// Rows of a tile: two registers of 8 lanes, so that each broadcast of a token's 4 bytes
/// (a shuffle, the scarce operation here) serves two `vpmaddubsw`.
pub const GEMM_ROWS: usize = 16;

/// Tokens one pass over a tile computes: their accumulators and 16-bit partial sums for
/// both halves of the tile (nearly) stay within the 16 vector registers. Over one tile in
/// L1, 3 and 4 tokens measured alike (77–81 GMAC/s per core), 2 slower (73), 1 at 62–65.
pub const TOKENS_PER_PASS: usize = 3;

/// [`GEMM_ROWS`] rows of a packed matrix unpacked for the integer GEMM: codes interleaved by
/// 4 (module docs), and per group the rows' scales and zero-point factors as f32.
#[derive(Clone, Debug, Default)]
pub struct RowTile {
    pub cols: usize,
    pub group: usize,
    /// `cols / 4` quads of `GEMM_ROWS × 4` bytes.
    pub codes: Vec<u8>,
    /// `s_g` of each row, `GEMM_ROWS` per group.
    pub scales: Vec<f32>,
    /// `s_g · z_g` of each row, `GEMM_ROWS` per group.
    pub zero_terms: Vec<f32>,
}

impl RowTile {
    /// Rows `r0..r0 + GEMM_ROWS` of `m`; rows past the end are zeros (their outputs are
    /// computed and dropped). `row` is scratch for one row's codes.
    pub fn fill(&mut self, m: &PackedMatrix, r0: usize, row: &mut Vec<u8>) {
        let (cols, gpr) = (m.cols, m.groups_per_row());
        self.cols = cols;
        self.group = m.spec.group;
        self.codes.clear();
        self.codes.resize(cols * GEMM_ROWS, 0);
        self.scales.clear();
        self.scales.resize(gpr * GEMM_ROWS, 0.0);
        self.zero_terms.clear();
        self.zero_terms.resize(gpr * GEMM_ROWS, 0.0);
        row.resize(cols, 0);
        let lanes = GEMM_ROWS.min(m.rows.saturating_sub(r0));
        // Whole tiles of the matrix's layout are unpacked a quad at a time (8 rows × 4
        // codes, the bytes a quad of this tile holds for 8 of its rows); other rows one by one.
        let whole_tiles = m.rows / TILE_ROWS * TILE_ROWS;
        let tbb = m.spec.tile_block_bytes();
        let rb = m.spec.row_bytes(cols);
        let mut lane = 0;
        while lane < lanes {
            let r = r0 + lane;
            if r.is_multiple_of(TILE_ROWS) && r + TILE_ROWS <= whole_tiles.min(r0 + lanes) {
                let tile = &m.codes[r * rb..(r + TILE_ROWS) * rb];
                for (b, block) in tile.chunks_exact(tbb).enumerate() {
                    for j in 0..BLOCK / 4 {
                        let at = (b * BLOCK / 4 + j) * 4 * GEMM_ROWS + lane * 4;
                        m.spec
                            .unpack_tile_quad(block, j, &mut self.codes[at..at + 4 * TILE_ROWS]);
                    }
                }
                lane += TILE_ROWS;
            } else {
                m.row_codes(r, row);
                for (q, quad) in row.chunks_exact(4).enumerate() {
                    let at = q * 4 * GEMM_ROWS + lane * 4;
                    self.codes[at..at + 4].copy_from_slice(quad);
                }
                lane += 1;
            }
        }
        for lane in 0..lanes {
            let r = r0 + lane;
            for g in 0..gpr {
                let s = m.scale(r, g).to_f32();
                self.scales[g * GEMM_ROWS + lane] = s;
                self.zero_terms[g * GEMM_ROWS + lane] = s * f32::from(m.zero(r, g));
            }
        }
    }

    /// `Σ_g s_g · z_g · (d·Σ x̂ over group g)` for each row: the zero-point term of a token
    /// whose group sums are `sums`.
    pub fn zero_term(&self, sums: &[f32]) -> [f32; GEMM_ROWS] {
        let mut z = [0f32; GEMM_ROWS];
        for (terms, &sum) in self.zero_terms.chunks_exact(GEMM_ROWS).zip(sums) {
            z.iter_mut().zip(terms).for_each(|(z, &t)| *z += t * sum);
        }
        z
    }

    /// The code of column `i` in row `lane` of the tile.
    pub fn code(&self, lane: usize, i: usize) -> u8 {
        self.codes[(i / 4) * 4 * GEMM_ROWS + lane * 4 + i % 4]
    }
}

/// Whether the integer GEMM takes codes of this width (see the module docs).
pub fn integer_gemm_supports(bits: u32) -> bool {
    bits <= 4
}

/// Blocks of columns per pass over the tokens: 16 rows × 1024 codes (16 KB) stay in L1
/// while every token's activation meets them.
const CHUNK_BLOCKS: usize = 32;

/// `y[n×rows] = x[n×cols] · mᵀ` for many tokens, spread over rayon's threads: the integer
/// GEMM for codes of up to 4 bits where a SIMD kernel exists, otherwise tiled
/// dequantization + f32 `gemm` (which has its own SIMD on every target, where the scalar
/// twin of the integer GEMM would be slow). The f32 matrix never exists whole.
pub fn packed_matmul(m: &PackedMatrix, x: &[f32], n: usize, y: &mut [f32], isa: Isa) {
    if isa == Isa::Scalar || !integer_gemm_supports(m.spec.bits) {
        dequantized_matmul(m, x, n, y)
    } else {
        integer_gemm(m, x, n, y, isa)
    }
}

/// The integer GEMM (module docs) with the kernels of `isa`; codes of at most 4 bits.
pub fn integer_gemm(m: &PackedMatrix, x: &[f32], n: usize, y: &mut [f32], isa: Isa) {
    let (rows, cols) = (m.rows, m.cols);
    assert!(
        x.len() >= n * cols && y.len() >= n * rows,
        "integer_gemm buffers"
    );
    assert!(
        integer_gemm_supports(m.spec.bits),
        "{}-bit codes",
        m.spec.bits
    );
    let acts: Vec<QuantizedActivation> = x[..n * cols]
        .par_chunks_exact(cols)
        .map(QuantizedActivation::quantize)
        .collect();
    let sums: Vec<Vec<f32>> = acts.iter().map(|a| a.group_sums(m.spec.group)).collect();
    let blocks = cols / BLOCK;
    let out = SharedMut(y.as_mut_ptr());
    (0..rows.div_ceil(GEMM_ROWS)).into_par_iter().for_each_init(
        || (RowTile::default(), Vec::new(), Vec::new()),
        |(tile, row, acc), t| {
            let r0 = t * GEMM_ROWS;
            tile.fill(m, r0, row);
            acc.clear();
            acc.resize(n, [0f32; GEMM_ROWS]);
            // Column chunks outside, tokens inside: the chunk of the tile stays in L1
            // and each token's accumulators are loaded and stored once per chunk.
            for b0 in (0..blocks).step_by(CHUNK_BLOCKS) {
                let b1 = (b0 + CHUNK_BLOCKS).min(blocks);
                for t0 in (0..n).step_by(TOKENS_PER_PASS) {
                    let t1 = (t0 + TOKENS_PER_PASS).min(n);
                    tile_blocks(tile, &acts[t0..t1], b0..b1, &mut acc[t0..t1], isa);
                }
            }
            let width = GEMM_ROWS.min(rows - r0);
            for (k, (acc, sums)) in acc.iter().zip(&sums).enumerate() {
                // SAFETY: tile `t` alone writes rows `r0..r0 + width` of each token's
                // output, which lie within `y`.
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(out.get().add(k * rows + r0), width) };
                let zero = tile.zero_term(sums);
                for ((y, a), z) in dst.iter_mut().zip(acc).zip(zero) {
                    *y = a - z;
                }
            }
        },
    );
}

/// `acc[k] += Σ_{b ∈ blocks} s_g(b) · d_b · ⟨codes_b, x̂_b⟩` for the tile's rows and token
/// `k` of up to [`TOKENS_PER_PASS`] (the module formula without its zero-point term).
pub fn tile_blocks(
    tile: &RowTile,
    acts: &[QuantizedActivation],
    blocks: std::ops::Range<usize>,
    acc: &mut [[f32; GEMM_ROWS]],
    isa: Isa,
) {
    assert!(acts.len() <= TOKENS_PER_PASS && acc.len() == acts.len());
    assert!(blocks.end * BLOCK <= tile.cols, "blocks past the tile");
    for a in acts {
        assert_eq!(
            a.codes.len(),
            tile.cols,
            "activation length vs tile columns"
        );
    }
    match isa {
        Isa::Scalar => reference::tile_blocks(tile, acts, blocks, acc),
        // VNNI's `vpdpbusd` would save the 16-bit step; the AVX2 kernel is what runs (and is
        // tested) on every x86 machine with these sets.
        #[cfg(target_arch = "x86_64")]
        // SAFETY: listed by `Isa::available` only where the CPU has AVX2, FMA and F16C; the
        // asserts above bound every read.
        Isa::Avx2 | Isa::Avx2Vnni => unsafe {
            match acts.len() {
                3 => super::x86::tile_blocks::<3>(tile, acts, blocks, acc),
                2 => super::x86::tile_blocks::<2>(tile, acts, blocks, acc),
                _ => super::x86::tile_blocks::<1>(tile, acts, blocks, acc),
            }
        },
        #[cfg(not(target_arch = "x86_64"))]
        _ => reference::tile_blocks(tile, acts, blocks, acc),
    }
}

/// Rows of f32 weights per tile of the dequantizing path: a tile of a wide matrix stays
/// within L2 while `gemm` multiplies it with every token.
const DEQUANTIZED_TILE_FLOATS: usize = 1 << 18;

/// Tiles of rows dequantized to f32 and multiplied with `gemm`, tiles spread over the
/// threads (exact: the weights as the reference path computes them, the activation as is).
pub fn dequantized_matmul(m: &PackedMatrix, x: &[f32], n: usize, y: &mut [f32]) {
    let (rows, cols) = (m.rows, m.cols);
    assert!(
        x.len() >= n * cols && y.len() >= n * rows,
        "dequantized_matmul buffers"
    );
    let tile = (DEQUANTIZED_TILE_FLOATS / cols).clamp(16, rows.max(16));
    let tiles: Vec<(usize, Vec<f32>)> = (0..rows)
        .step_by(tile)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|r0| {
            let r1 = (r0 + tile).min(rows);
            let mut w = vec![0f32; (r1 - r0) * cols];
            let mut codes = vec![0u8; cols];
            for (r, wr) in (r0..r1).zip(w.chunks_exact_mut(cols)) {
                m.dequantize_row_with(r, &mut codes, wr);
            }
            let mut out = vec![0f32; n * (r1 - r0)];
            crate::matmul::matmul_wt_serial(x, &w, &mut out, n, cols, r1 - r0);
            (r0, out)
        })
        .collect();
    for (r0, out) in tiles {
        let width = out.len() / n.max(1);
        for (t, o) in out.chunks_exact(width).enumerate() {
            y[t * rows + r0..t * rows + r0 + width].copy_from_slice(o);
        }
    }
}

// The SIMD kernel's lanes are the tile's rows; quads of columns never straddle a block.
const _: () = assert!(BLOCK.is_multiple_of(4) && GEMM_ROWS == 16);
