//! recoup's packed low-bit weights: integer codes on a uniform grid, a scale (and a zero
//! point when asymmetric) per group of input channels, per output row.
//!
//! In files, codes are packed row by row in blocks of 32 consecutive input channels, each
//! bit width laid out so that 8, 16 or 32 consecutive codes come back with one shift and
//! mask, and no value straddles a byte (3-bit is a 2-bit plane plus a 1-bit plane, as
//! ggml's Q3_K does).
//! A dequantized weight is `scale · (code − zero)`; symmetric grids use `zero = 2^(bits−1)`.
//!
//! Files store the codes row by row ([`GridSpec::pack_row`]). In memory, a matrix keeps them
//! in tiles of [`TILE_ROWS`] rows (see [`GridSpec::tile_codes`]), the layout the decode
//! kernels stream: one 32-byte register then holds 4 consecutive codes of each of 8 rows,
//! so a product with an activation's 4 bytes (broadcast to every lane) leaves one row's
//! sum in each lane, with no horizontal sums and one activation load shared by 8 rows. This
//! is llama.cpp's repacked Q4_0×8 idea; on a 2-core AMD EPYC (AVX2) the row-major kernel
//! was bound by its instructions, not by memory (the 3-bit one slower than the 4-bit one).

use crate::hugepages::SharedBytes;
use anyhow::{Result, bail};
use half::f16;

/// `f::<BITS>(args)` for a grid's bit width: the tiled layout's helpers are generic over it
/// so that their per-code loops carry no branch.
macro_rules! by_bits {
    ($bits:expr, $f:ident($($arg:expr),*)) => {
        match $bits {
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            4 => $f::<4>($($arg),*),
            _ => $f::<8>($($arg),*),
        }
    };
}

/// Input channels per packed block; every group size is a multiple of it.
pub const BLOCK: usize = 32;

/// One block layout: how 32 codes of one bit width become bytes and back.
pub trait CodePacking {
    const BITS: u32;
    /// Bytes of one block of [`BLOCK`] codes.
    const BLOCK_BYTES: usize;
    /// Packs 32 codes (each `< 2^BITS`) into `out[..BLOCK_BYTES]`.
    fn pack(codes: &[u8; BLOCK], out: &mut [u8]);
    /// Unpacks `bytes[..BLOCK_BYTES]` into 32 codes.
    fn unpack(bytes: &[u8], codes: &mut [u8; BLOCK]);
}

/// 2-bit: byte `j` (0..8) holds codes `j`, `j+8`, `j+16`, `j+24` in bit pairs 0, 2, 4, 6.
pub struct Packing2;
/// 3-bit: the low two bits as [`Packing2`] (8 bytes), then the high bits as one
/// little-endian 32-bit mask (bit `i` = high bit of code `i`).
pub struct Packing3;
/// 4-bit: byte `j` (0..16) holds code `j` in its low nibble and code `j+16` in its high one
/// (ggml's Q4_0 order).
pub struct Packing4;
/// 8-bit: one byte per code.
pub struct Packing8;

impl CodePacking for Packing2 {
    const BITS: u32 = 2;
    const BLOCK_BYTES: usize = 8;
    fn pack(codes: &[u8; BLOCK], out: &mut [u8]) {
        for j in 0..8 {
            out[j] = (0..4).fold(0u8, |b, s| b | (codes[j + 8 * s] & 3) << (2 * s));
        }
    }
    fn unpack(bytes: &[u8], codes: &mut [u8; BLOCK]) {
        for j in 0..8 {
            for s in 0..4 {
                codes[j + 8 * s] = (bytes[j] >> (2 * s)) & 3;
            }
        }
    }
}

impl CodePacking for Packing3 {
    const BITS: u32 = 3;
    const BLOCK_BYTES: usize = 12;
    fn pack(codes: &[u8; BLOCK], out: &mut [u8]) {
        let mut low = [0u8; BLOCK];
        let mut high = 0u32;
        for (i, &c) in codes.iter().enumerate() {
            low[i] = c & 3;
            high |= u32::from((c >> 2) & 1) << i;
        }
        Packing2::pack(&low, &mut out[..8]);
        out[8..12].copy_from_slice(&high.to_le_bytes());
    }
    fn unpack(bytes: &[u8], codes: &mut [u8; BLOCK]) {
        Packing2::unpack(&bytes[..8], codes);
        let high = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
        for (i, c) in codes.iter_mut().enumerate() {
            *c |= (((high >> i) & 1) as u8) << 2;
        }
    }
}

impl CodePacking for Packing4 {
    const BITS: u32 = 4;
    const BLOCK_BYTES: usize = 16;
    fn pack(codes: &[u8; BLOCK], out: &mut [u8]) {
        for j in 0..16 {
            out[j] = (codes[j] & 15) | (codes[j + 16] & 15) << 4;
        }
    }
    fn unpack(bytes: &[u8], codes: &mut [u8; BLOCK]) {
        for j in 0..16 {
            codes[j] = bytes[j] & 15;
            codes[j + 16] = bytes[j] >> 4;
        }
    }
}

impl CodePacking for Packing8 {
    const BITS: u32 = 8;
    const BLOCK_BYTES: usize = 32;
    fn pack(codes: &[u8; BLOCK], out: &mut [u8]) {
        out[..BLOCK].copy_from_slice(codes);
    }
    fn unpack(bytes: &[u8], codes: &mut [u8; BLOCK]) {
        codes.copy_from_slice(&bytes[..BLOCK]);
    }
}

/// The grid a matrix is quantized on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GridSpec {
    /// 2, 3, 4 or 8.
    pub bits: u32,
    /// Input channels per scale; equal to the matrix's columns for one scale per output row.
    /// A group size that does not divide the columns leaves a shorter last group.
    pub group: usize,
    /// Symmetric grids store no zero point (it is `2^(bits−1)`).
    pub sym: bool,
}

impl GridSpec {
    pub fn new(bits: u32, group: usize, sym: bool) -> Result<Self> {
        if ![2, 3, 4, 8].contains(&bits) {
            bail!("{bits}-bit grids are not supported (2, 3, 4 or 8)");
        }
        if group == 0 || !group.is_multiple_of(BLOCK) {
            bail!("group size {group} is not a positive multiple of {BLOCK}");
        }
        Ok(Self { bits, group, sym })
    }

    /// Largest code, `2^bits − 1`.
    pub fn max_code(&self) -> u8 {
        ((1u32 << self.bits) - 1) as u8
    }

    /// The zero point of a symmetric grid.
    pub fn sym_zero(&self) -> u8 {
        (1u32 << (self.bits - 1)) as u8
    }

    fn block_bytes(&self) -> usize {
        match self.bits {
            2 => Packing2::BLOCK_BYTES,
            3 => Packing3::BLOCK_BYTES,
            4 => Packing4::BLOCK_BYTES,
            _ => Packing8::BLOCK_BYTES,
        }
    }

    /// Packs `codes` (one row, a multiple of 32 long) into `out`.
    pub fn pack_row(&self, codes: &[u8], out: &mut [u8]) {
        let bb = self.block_bytes();
        for (c, o) in codes.chunks_exact(BLOCK).zip(out.chunks_exact_mut(bb)) {
            let c: &[u8; BLOCK] = c.try_into().unwrap();
            match self.bits {
                2 => Packing2::pack(c, o),
                3 => Packing3::pack(c, o),
                4 => Packing4::pack(c, o),
                _ => Packing8::pack(c, o),
            }
        }
    }

    /// Unpacks one row of packed bytes into `codes`.
    pub fn unpack_row(&self, bytes: &[u8], codes: &mut [u8]) {
        let bb = self.block_bytes();
        for (b, c) in bytes.chunks_exact(bb).zip(codes.chunks_exact_mut(BLOCK)) {
            let c: &mut [u8; BLOCK] = c.try_into().unwrap();
            match self.bits {
                2 => Packing2::unpack(b, c),
                3 => Packing3::unpack(b, c),
                4 => Packing4::unpack(b, c),
                _ => Packing8::unpack(b, c),
            }
        }
    }

    /// Packed bytes of one row of `cols` codes.
    pub fn row_bytes(&self, cols: usize) -> usize {
        cols / BLOCK * self.block_bytes()
    }

    /// Bytes of one tile block: [`TILE_ROWS`] rows × [`BLOCK`] columns.
    pub fn tile_block_bytes(&self) -> usize {
        TILE_ROWS * self.block_bytes()
    }

    /// Quad `j` of a tile block as 32 bytes, `out[lane·4 + c]` = code `(lane, 4j + c)`: the
    /// register the decode kernels build, for kernels that keep codes unpacked.
    pub fn unpack_tile_quad(&self, block: &[u8], j: usize, out: &mut [u8]) {
        fn quad<const BITS: u32>(block: &[u8], j: usize, out: &mut [u8]) {
            for (at, o) in out[..32].iter_mut().enumerate() {
                *o = tile_code::<BITS>(block, at / 4, 4 * j + at % 4);
            }
        }
        by_bits!(self.bits, quad(block, j, out))
    }

    /// Rows `[rows, cols]` of row-major packed codes (`src`, as files store them) into the
    /// tiled layout (`out`, the same length): tile `t` (rows `8t..8t + 8`) is
    /// `cols / 32` tile blocks of [`Self::tile_block_bytes`], block by block; the rows after
    /// the last whole tile stay row-major after the tiles.
    pub fn tile_codes(&self, rows: usize, cols: usize, src: &[u8], out: &mut [u8]) {
        use rayon::prelude::*;
        let rb = self.row_bytes(cols);
        assert!(
            src.len() == rows * rb && out.len() == src.len(),
            "tile_codes sizes"
        );
        let tiled = rows / TILE_ROWS * TILE_ROWS;
        let tbb = self.tile_block_bytes();
        // Tiles in parallel: this runs on every load, over every packed byte of the model.
        out[..tiled * rb]
            .par_chunks_exact_mut(TILE_ROWS * rb)
            .zip(src[..tiled * rb].par_chunks_exact(TILE_ROWS * rb))
            .for_each_init(
                || vec![0u8; TILE_ROWS * cols],
                |codes, (tile, src)| {
                    for (row, c) in src.chunks_exact(rb).zip(codes.chunks_exact_mut(cols)) {
                        self.unpack_row(row, c);
                    }
                    for (b, block) in tile.chunks_exact_mut(tbb).enumerate() {
                        let codes = &codes[b * BLOCK..];
                        by_bits!(self.bits, tile_block(codes, cols, block));
                    }
                },
            );
        out[tiled * rb..].copy_from_slice(&src[tiled * rb..]);
    }

    /// Codes of row `r` of a tiled `[rows, cols]` matrix's bytes.
    fn tiled_row_codes(&self, bytes: &[u8], rows: usize, cols: usize, r: usize, codes: &mut [u8]) {
        let rb = self.row_bytes(cols);
        let tiled = rows / TILE_ROWS * TILE_ROWS;
        if r >= tiled {
            return self.unpack_row(&bytes[r * rb..(r + 1) * rb], codes);
        }
        let tile = &bytes[r / TILE_ROWS * TILE_ROWS * rb..][..TILE_ROWS * rb];
        let lane = r % TILE_ROWS;
        // One match per row, not per code: this feeds every dequantization.
        fn each<const BITS: u32>(tile: &[u8], tbb: usize, lane: usize, codes: &mut [u8]) {
            for (block, c) in tile.chunks_exact(tbb).zip(codes.chunks_exact_mut(BLOCK)) {
                for (i, c) in c.iter_mut().enumerate() {
                    *c = tile_code::<BITS>(block, lane, i);
                }
            }
        }
        let tbb = self.tile_block_bytes();
        by_bits!(self.bits, each(tile, tbb, lane, codes))
    }
}

/// Rows of a tile of codes in memory (module docs).
pub const TILE_ROWS: usize = 8;

/// One tile block from 8 rows of unpacked codes (`codes[lane·cols + i]`, column `i` of the
/// block), the inverse of [`tile_code`].
fn tile_block<const BITS: u32>(codes: &[u8], cols: usize, block: &mut [u8]) {
    for at in 0..32 {
        let row = &codes[(at / 4) * cols + at % 4..];
        // Code of quad `j` at plane byte `at`.
        let q = |j: usize| row[4 * j];
        let mut put = |p: usize, v: u8| block[p * 32 + at] = v;
        match BITS {
            2 => (0..2).for_each(|p| put(p, (0..4).fold(0, |v, k| v | q(4 * p + k) << (2 * k)))),
            3 => {
                put(0, q(0) | q(1) << 3 | (q(6) & 3) << 6);
                put(1, q(2) | q(3) << 3 | (q(7) & 3) << 6);
                put(2, q(4) | q(5) << 3 | (q(6) >> 2) << 6 | (q(7) >> 2) << 7);
            }
            4 => (0..4).for_each(|p| put(p, q(2 * p) | q(2 * p + 1) << 4)),
            _ => (0..8).for_each(|j| put(j, q(j))),
        }
    }
}

/// Code `(lane, i)` (row `lane` of the tile, column `i < 32` of the block) of a tile
/// block. With `at = lane·4 + i % 4` and `j = i / 4` (the column quad), byte `at` of
/// 32-byte plane `p` holds, per bit width:
/// - 8-bit: plane `j`, the code;
/// - 4-bit: plane `j / 2`, nibble `j % 2`;
/// - 2-bit: plane `j / 4`, bit pair `j % 4`;
/// - 3-bit: quads 0–5 whole, plane `j / 2`, bits `3·(j % 2)..+3`; quads 6 and 7 split: low
///   two bits in bits 6–7 of plane 0 (quad 6) and plane 1 (quad 7), high bit in bit 6
///   (quad 6) and 7 (quad 7) of plane 2. (High bits in a plane of their own, as files
///   store them, took a third more instructions per block.)
///
/// So one plane, shifted and masked, is a register of 8 rows × 4 columns of codes (two for
/// 3-bit quads 6 and 7).
#[inline]
pub fn tile_code<const BITS: u32>(block: &[u8], lane: usize, i: usize) -> u8 {
    let (j, at) = (i / 4, lane * 4 + i % 4);
    match BITS {
        2 => (block[(j / 4) * 32 + at] >> (2 * (j % 4))) & 3,
        3 if j < 6 => (block[(j / 2) * 32 + at] >> (3 * (j % 2))) & 7,
        3 => (block[(j - 6) * 32 + at] >> 6) | ((block[64 + at] >> j) & 1) << 2,
        4 => (block[(j / 2) * 32 + at] >> (4 * (j % 2))) & 15,
        _ => block[j * 32 + at],
    }
}

/// A quantized `[rows, cols]` weight: packed codes, and an f16 scale and a u8 zero point
/// per (row, group), all three in memory in the tiled layout (module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct PackedMatrix {
    pub spec: GridSpec,
    pub rows: usize,
    pub cols: usize,
    /// Tiled ([`GridSpec::tile_codes`]); on the heap after quantizing, in the model's
    /// huge-page arena after loading.
    pub codes: SharedBytes,
    /// One per (row, group), tiled like the codes: per tile of [`TILE_ROWS`] rows, group
    /// by group, the tile's 8 values side by side (one load for a kernel's 8 lanes); the
    /// rows after the last whole tile row-major. Read them with [`Self::scale`]; files
    /// store them row-major ([`Self::row_major_scales`]).
    pub scales: Vec<f16>,
    /// Tiled like `scales`; empty for symmetric grids ([`Self::zero`]).
    pub zeros: Vec<u8>,
}

/// `row_major` values, one per (row, group) of `rows` rows of `gpr` groups, in the tiled
/// order of [`PackedMatrix::scales`]; none (a symmetric grid's zeros) stay none.
fn tile_params<T: Copy>(row_major: &[T], rows: usize, gpr: usize) -> Vec<T> {
    let mut out = row_major.to_vec();
    if out.is_empty() {
        return out;
    }
    for r in 0..rows / TILE_ROWS * TILE_ROWS {
        for g in 0..gpr {
            out[param_index(r, g, rows, gpr)] = row_major[r * gpr + g];
        }
    }
    out
}

/// Where (row `r`, group `g`) lies in the tiled order of [`PackedMatrix::scales`].
#[inline]
fn param_index(r: usize, g: usize, rows: usize, gpr: usize) -> usize {
    if r < rows / TILE_ROWS * TILE_ROWS {
        (r / TILE_ROWS * gpr + g) * TILE_ROWS + r % TILE_ROWS
    } else {
        r * gpr + g
    }
}

impl PackedMatrix {
    /// A matrix from row-major packed codes (as [`GridSpec::pack_row`] writes them), scales
    /// and zero points, tiled here; checks that the parts agree with the shape and grid
    /// (`what` names the tensor in errors).
    pub fn new(
        spec: GridSpec,
        rows: usize,
        cols: usize,
        row_major: Vec<u8>,
        scales: Vec<f16>,
        zeros: Vec<u8>,
        what: &str,
    ) -> Result<Self> {
        let mut m = Self::from_tiled(spec, rows, cols, row_major.into(), scales, zeros, what)?;
        let mut tiled = vec![0u8; m.codes.len()];
        spec.tile_codes(rows, cols, &m.codes, &mut tiled);
        m.codes = tiled.into();
        Ok(m)
    }

    /// A matrix whose codes are already tiled (a loader tiles them while copying them into
    /// its arena), scales and zero points row-major; the same checks as [`Self::new`].
    pub fn from_tiled(
        spec: GridSpec,
        rows: usize,
        cols: usize,
        codes: SharedBytes,
        scales: Vec<f16>,
        zeros: Vec<u8>,
        what: &str,
    ) -> Result<Self> {
        if !cols.is_multiple_of(BLOCK) {
            bail!("{what}: {cols} columns are not a multiple of {BLOCK}");
        }
        let groups = rows * cols.div_ceil(spec.group);
        let want_zeros = if spec.sym { 0 } else { groups };
        if codes.len() != rows * spec.row_bytes(cols)
            || scales.len() != groups
            || zeros.len() != want_zeros
        {
            bail!(
                "{what}: packed parts do not match a [{rows}, {cols}] {}-bit g{} matrix \
                 ({} code bytes, {} scales, {} zeros)",
                spec.bits,
                spec.group,
                codes.len(),
                scales.len(),
                zeros.len()
            );
        }
        if let Some(z) = zeros.iter().find(|&&z| z > spec.max_code()) {
            bail!("{what}: zero point {z} is off the {}-bit grid", spec.bits);
        }
        let gpr = cols.div_ceil(spec.group);
        Ok(Self {
            spec,
            rows,
            cols,
            codes,
            scales: tile_params(&scales, rows, gpr),
            zeros: tile_params(&zeros, rows, gpr),
        })
    }

    /// Groups per row; when the group size does not divide the columns the last group is
    /// shorter (GPTQ's convention).
    pub fn groups_per_row(&self) -> usize {
        self.cols.div_ceil(self.spec.group)
    }

    /// Scale of group `g` of `row`.
    #[inline]
    pub fn scale(&self, row: usize, g: usize) -> f16 {
        self.scales[param_index(row, g, self.rows, self.groups_per_row())]
    }

    /// Zero point of group `g` of `row`.
    #[inline]
    pub fn zero(&self, row: usize, g: usize) -> u8 {
        if self.spec.sym {
            self.spec.sym_zero()
        } else {
            self.zeros[param_index(row, g, self.rows, self.groups_per_row())]
        }
    }

    /// Where the 8 rows of tile `t` keep group `g`'s scales and zero points: 8 consecutive
    /// entries of `scales` and `zeros` from this index.
    #[inline]
    pub fn tile_param_index(&self, t: usize, g: usize) -> usize {
        param_index(t * TILE_ROWS, g, self.rows, self.groups_per_row())
    }

    /// The scales row-major, as files store them.
    pub fn row_major_scales(&self) -> Vec<f16> {
        self.row_major_params(|r, g| self.scale(r, g))
    }

    /// The zero points row-major, as files store them (empty for symmetric grids).
    pub fn row_major_zeros(&self) -> Vec<u8> {
        if self.spec.sym {
            return Vec::new();
        }
        self.row_major_params(|r, g| self.zero(r, g))
    }

    fn row_major_params<T>(&self, at: impl Fn(usize, usize) -> T) -> Vec<T> {
        let gpr = self.groups_per_row();
        (0..self.rows * gpr).map(|i| at(i / gpr, i % gpr)).collect()
    }

    /// Codes of one row.
    pub fn row_codes(&self, row: usize, codes: &mut [u8]) {
        self.spec
            .tiled_row_codes(&self.codes, self.rows, self.cols, row, codes);
    }

    /// The codes row-major, as files store them.
    pub fn row_major_codes(&self) -> Vec<u8> {
        let rb = self.spec.row_bytes(self.cols);
        let mut out = vec![0u8; self.rows * rb];
        let mut codes = vec![0u8; self.cols];
        for (r, row) in out.chunks_exact_mut(rb).enumerate() {
            self.row_codes(r, &mut codes);
            self.spec.pack_row(&codes, row);
        }
        out
    }

    /// Scalar reference dequantization of one row into `out[..cols]`.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        self.dequantize_row_with(row, &mut vec![0u8; self.cols], out);
    }

    /// [`Self::dequantize_row`] with caller-owned scratch for the `cols` codes, for loops
    /// over many rows.
    pub fn dequantize_row_with(&self, row: usize, codes: &mut [u8], out: &mut [f32]) {
        self.row_codes(row, codes);
        for (g, (c, o)) in codes
            .chunks(self.spec.group)
            .zip(out[..self.cols].chunks_mut(self.spec.group))
            .enumerate()
        {
            let s = self.scale(row, g).to_f32();
            let z = f32::from(self.zero(row, g));
            for (o, &q) in o.iter_mut().zip(c) {
                *o = s * (f32::from(q) - z);
            }
        }
    }

    /// The whole matrix as f32, rows in parallel.
    pub fn dequantize(&self) -> Vec<f32> {
        use rayon::prelude::*;
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols)
            .enumerate()
            .for_each(|(r, row)| self.dequantize_row(r, row));
        out
    }

    /// Bytes stored: codes, scales and zero points.
    pub fn storage_bytes(&self) -> usize {
        self.codes.len() + 2 * self.scales.len() + self.zeros.len()
    }
}

/// How a low-rank factor is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FactorDtype {
    F16,
    /// int8 codes with one f16 scale per row, symmetric (`scale = max |row| / 127`): half
    /// the bytes of f16 for ranks and widths where the branch's share of the bits matters.
    Int8,
}

impl FactorDtype {
    pub fn name(self) -> &'static str {
        match self {
            FactorDtype::F16 => "f16",
            FactorDtype::Int8 => "int8",
        }
    }
}

/// One factor of a low-rank branch, row-major, in its storage precision.
#[derive(Clone, Debug, PartialEq)]
pub enum Factor {
    F16(Vec<f16>),
    Int8 { codes: Vec<i8>, scales: Vec<f16> },
}

impl Factor {
    /// Rounds `values` (`cols` per row) to `dtype`.
    pub fn quantize(values: &[f32], cols: usize, dtype: FactorDtype) -> Self {
        match dtype {
            FactorDtype::F16 => Factor::F16(values.iter().map(|&v| f16::from_f32(v)).collect()),
            FactorDtype::Int8 => {
                let mut codes = Vec::with_capacity(values.len());
                let scales = values
                    .chunks_exact(cols)
                    .map(|row| {
                        let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                        // Codes are computed against the scale as stored, so that dequantizing
                        // reproduces them exactly.
                        let scale = f16::from_f32(max / 127.0);
                        let inv = if scale.to_f32() > 0.0 {
                            1.0 / scale.to_f32()
                        } else {
                            0.0
                        };
                        codes.extend(
                            row.iter()
                                .map(|v| (v * inv).round().clamp(-127.0, 127.0) as i8),
                        );
                        scale
                    })
                    .collect();
                Factor::Int8 { codes, scales }
            }
        }
    }

    pub fn dtype(&self) -> FactorDtype {
        match self {
            Factor::F16(_) => FactorDtype::F16,
            Factor::Int8 { .. } => FactorDtype::Int8,
        }
    }

    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Factor::F16(v) => v.iter().map(|v| v.to_f32()).collect(),
            Factor::Int8 { codes, scales } => {
                let cols = codes.len() / scales.len().max(1);
                codes
                    .chunks_exact(cols.max(1))
                    .zip(scales)
                    .flat_map(|(row, s)| row.iter().map(move |&c| c as f32 * s.to_f32()))
                    .collect()
            }
        }
    }

    pub fn storage_bytes(&self) -> usize {
        match self {
            Factor::F16(v) => 2 * v.len(),
            Factor::Int8 { codes, scales } => codes.len() + 2 * scales.len(),
        }
    }
}

/// A low-rank branch `Σ = A·B` beside a packed matrix, in the original column order:
/// `a` `[rows, rank]` (the up-projection) and `b` `[rank, cols]` (the down-projection).
#[derive(Clone, Debug, PartialEq)]
pub struct LowRank {
    pub rank: usize,
    pub a: Factor,
    pub b: Factor,
}

impl LowRank {
    /// Rounds f32 factors to their storage precision.
    pub fn from_f32(rank: usize, a: &[f32], b: &[f32], dtype: FactorDtype) -> Self {
        Self {
            rank,
            a: Factor::quantize(a, rank, dtype),
            b: Factor::quantize(b, b.len() / rank, dtype),
        }
    }

    pub fn a_f32(&self) -> Vec<f32> {
        self.a.to_f32()
    }

    pub fn b_f32(&self) -> Vec<f32> {
        self.b.to_f32()
    }

    pub fn storage_bytes(&self) -> usize {
        self.a.storage_bytes() + self.b.storage_bytes()
    }
}

/// A quantized linear layer's weights as stored: the packed matrix; when its columns were
/// quantized in a permuted order (GPTQ act-order), the permutation (stored column `j` is the
/// original input channel `perm[j]`); and an optional low-rank branch added to its output.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedLinear {
    pub matrix: PackedMatrix,
    pub perm: Option<Vec<u32>>,
    pub low_rank: Option<LowRank>,
}

impl PackedLinear {
    /// A packed matrix alone, in the original column order.
    pub fn plain(matrix: PackedMatrix) -> Self {
        Self {
            matrix,
            perm: None,
            low_rank: None,
        }
    }

    /// The packed part's weights `[rows, cols]` in the original column order, without the
    /// low-rank branch.
    pub fn dequantize(&self) -> Vec<f32> {
        let w = self.matrix.dequantize();
        let Some(perm) = &self.perm else { return w };
        let cols = self.matrix.cols;
        let mut out = vec![0f32; w.len()];
        for (src, dst) in w.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
            for (j, &p) in perm.iter().enumerate() {
                dst[p as usize] = src[j];
            }
        }
        out
    }

    /// Bytes stored, the permutation and the low-rank branch included.
    pub fn storage_bytes(&self) -> usize {
        self.matrix.storage_bytes()
            + self.perm.as_ref().map_or(0, |p| 4 * p.len())
            + self.low_rank.as_ref().map_or(0, LowRank::storage_bytes)
    }
}

/// Checks that `perm` is a permutation of `0..n`.
pub fn check_permutation(perm: &[u32], n: usize, what: &str) -> Result<()> {
    let mut seen = vec![false; n];
    if perm.len() != n {
        bail!(
            "{what}: permutation has {} entries, expected {n}",
            perm.len()
        );
    }
    for &p in perm {
        match seen.get_mut(p as usize) {
            Some(s) if !*s => *s = true,
            _ => bail!("{what}: not a permutation of 0..{n} (entry {p})"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random stream (xorshift), so this crate needs no rand.
    fn codes(seed: u64, n: usize, bits: u32) -> Vec<u8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % (1 << bits)) as u8
            })
            .collect()
    }

    #[test]
    fn every_packing_round_trips() {
        for bits in [2, 3, 4, 8] {
            let spec = GridSpec::new(bits, 64, false).unwrap();
            let mut c = codes(bits as u64 + 1, 256, bits);
            (c[0], c[255]) = (0, spec.max_code());
            let mut packed = vec![0u8; spec.row_bytes(256)];
            spec.pack_row(&c, &mut packed);
            assert_eq!(packed.len() * 8, 256 * bits as usize, "{bits}-bit size");
            let mut back = vec![0u8; 256];
            spec.unpack_row(&packed, &mut back);
            assert_eq!(back, c, "{bits}-bit");
        }
    }

    #[test]
    fn tiles_round_trip_and_put_four_columns_of_eight_rows_in_a_plane() {
        for bits in [2, 3, 4, 8] {
            let spec = GridSpec::new(bits, 32, false).unwrap();
            // 19 rows: two whole tiles and 3 rows left row-major.
            let (rows, cols) = (19, 64);
            let c = codes(u64::from(bits) + 7, rows * cols, bits);
            let mut packed = vec![0u8; rows * spec.row_bytes(cols)];
            for (c, p) in c.chunks(cols).zip(packed.chunks_mut(spec.row_bytes(cols))) {
                spec.pack_row(c, p);
            }
            let groups = rows * 2;
            let scales: Vec<f16> = (0..groups).map(|i| f16::from_f32(i as f32)).collect();
            let zeros: Vec<u8> = (0..groups).map(|i| (i % 3) as u8).collect();
            let m = PackedMatrix::new(
                spec,
                rows,
                cols,
                packed.clone(),
                scales.clone(),
                zeros.clone(),
                "t",
            )
            .unwrap();
            assert_ne!(&m.codes[..], &packed[..], "{bits}-bit: tiled differs");
            assert_eq!(m.row_major_codes(), packed, "{bits}-bit round trip");
            assert_eq!(m.row_major_scales(), scales);
            assert_eq!(m.row_major_zeros(), zeros);
            // Group 1 of tile 1's rows side by side; row 17 (after the tiles) row-major.
            let at = m.tile_param_index(1, 1);
            assert_eq!(
                m.scales[at..at + 8],
                scales[8 * 2..16 * 2]
                    .iter()
                    .skip(1)
                    .step_by(2)
                    .copied()
                    .collect::<Vec<_>>()[..]
            );
            assert_eq!((m.scale(17, 1), m.zero(17, 1)), (scales[35], zeros[35]));
            let mut row = vec![0u8; cols];
            for r in 0..rows {
                m.row_codes(r, &mut row);
                assert_eq!(row, c[r * cols..(r + 1) * cols], "{bits}-bit row {r}");
            }
            // Tile 1, block 1, row 5, column 4·3 + 2 = 14: plane byte 5·4 + 2.
            let block = &m.codes[(8 * spec.row_bytes(cols)) + spec.tile_block_bytes()..];
            let want = c[13 * cols + 32 + 14];
            let mut quad = [0u8; 32];
            spec.unpack_tile_quad(block, 3, &mut quad);
            assert_eq!(quad[5 * 4 + 2], want, "{bits}-bit tile quad");
            if bits == 8 {
                assert_eq!(block[3 * 32 + 5 * 4 + 2], want);
            }
        }
    }

    #[test]
    fn four_bit_layout_is_ggml_q4_0_order() {
        let c: Vec<u8> = (0..32).map(|i| (i % 16) as u8).collect();
        let mut p = [0u8; 16];
        Packing4::pack(c.as_slice().try_into().unwrap(), &mut p);
        assert_eq!(p[0], c[0] | c[16] << 4);
        assert_eq!(p[15], c[15] | c[31] << 4);
    }

    #[test]
    fn dequantize_uses_scale_and_zero_per_group() {
        let spec = GridSpec::new(4, 32, false).unwrap();
        let c = codes(9, 64, 4);
        let mut packed = vec![0u8; spec.row_bytes(64)];
        spec.pack_row(&c, &mut packed);
        let scales = vec![f16::from_f32(0.5), f16::from_f32(-0.25)];
        let m = PackedMatrix::new(spec, 1, 64, packed, scales, vec![3, 8], "t").unwrap();
        let mut out = vec![0f32; 64];
        m.dequantize_row(0, &mut out);
        for i in 0..64 {
            let (s, z) = if i < 32 { (0.5, 3.0) } else { (-0.25, 8.0) };
            assert_eq!(out[i], s * (c[i] as f32 - z));
        }
        // 4 bits per code, an f16 scale and a u8 zero per 32 weights.
        assert_eq!(m.storage_bytes(), 32 + 2 * (2 + 1));
    }

    #[test]
    fn inconsistent_parts_are_refused() {
        let spec = GridSpec::new(3, 32, false).unwrap();
        let ok = || {
            (
                vec![0u8; spec.row_bytes(64) * 2],
                vec![f16::ONE; 4],
                vec![0u8; 4],
            )
        };
        let (c, s, z) = ok();
        assert!(PackedMatrix::new(spec, 2, 64, c, s, z, "t").is_ok());
        let (c, s, _) = ok();
        let e = PackedMatrix::new(spec, 2, 64, c, s, vec![9u8; 4], "t").unwrap_err();
        assert!(e.to_string().contains("off the 3-bit grid"), "{e}");
        let (c, _, z) = ok();
        let e = PackedMatrix::new(spec, 2, 64, c, vec![f16::ONE; 3], z, "t").unwrap_err();
        assert!(e.to_string().contains("do not match"), "{e}");
        assert!(GridSpec::new(5, 32, false).is_err());
        assert!(GridSpec::new(4, 48, false).is_err());
        assert!(check_permutation(&[0, 2, 2], 3, "p").is_err());
        assert!(check_permutation(&[2, 0, 1], 3, "p").is_ok());
    }

    #[test]
    fn int8_factors_round_within_half_a_step_per_row() {
        let (rows, cols) = (7, 40);
        // Values in (−1, 1) times the row number, so each row has its own scale.
        let v: Vec<f32> = codes(5, rows * cols, 8)
            .iter()
            .enumerate()
            .map(|(i, &c)| (c as f32 / 127.5 - 1.0) * (1 + i / cols) as f32)
            .collect();
        let f = Factor::quantize(&v, cols, FactorDtype::Int8);
        let Factor::Int8 { codes, scales } = &f else {
            panic!("not int8")
        };
        assert_eq!((codes.len(), scales.len()), (rows * cols, rows));
        assert_eq!(f.storage_bytes(), rows * cols + 2 * rows);
        let back = f.to_f32();
        for (r, (row, got)) in v.chunks(cols).zip(back.chunks(cols)).enumerate() {
            let s = scales[r].to_f32();
            let max = row.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!((s - max / 127.0).abs() <= 1e-3 * s, "row {r} scale {s}");
            for (a, b) in row.iter().zip(got) {
                assert!((a - b).abs() <= s / 2.0 + 1e-6 * s, "row {r}: {a} → {b}");
            }
        }
        let zero = Factor::quantize(&[0.0; 8], 4, FactorDtype::Int8);
        assert_eq!(zero.to_f32(), vec![0.0; 8]);
        let h = Factor::quantize(&v, cols, FactorDtype::F16);
        assert_eq!(h.storage_bytes(), 2 * rows * cols);
        assert_eq!(h.dtype(), FactorDtype::F16);
    }
}
