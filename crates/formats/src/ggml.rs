//! ggml tensor types and their block layouts: the scalar reference dequantization of every
//! type recoup reads from GGUF files. Layouts follow ggml's `block_*` structs byte for byte;
//! all multi-byte fields are little-endian.

use half::{bf16, f16};

/// The ggml type ids recoup reads (ids as in ggml.h; others are refused by name or id).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

/// Elements per k-quant super-block.
const QK_K: usize = 256;

impl GgmlType {
    pub fn from_id(id: u32) -> Result<Self, String> {
        Ok(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::BF16,
            _ => {
                return Err(format!(
                    "unsupported ggml tensor type {} (id {id})",
                    known_name(id)
                ));
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q4K => "Q4_K",
            Self::Q5K => "Q5_K",
            Self::Q6K => "Q6_K",
        }
    }

    /// Elements per block.
    pub fn block_elems(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 => 32,
            Self::Q4K | Self::Q5K | Self::Q6K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 2 + 16,
            Self::Q4_1 => 2 + 2 + 16,
            Self::Q5_0 => 2 + 4 + 16,
            Self::Q5_1 => 2 + 2 + 4 + 16,
            Self::Q8_0 => 2 + 32,
            Self::Q4K => 2 + 2 + 12 + QK_K / 2,
            Self::Q5K => 2 + 2 + 12 + QK_K / 8 + QK_K / 2,
            Self::Q6K => QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
        }
    }

    /// Bytes for `n` elements; `None` if `n` is not a whole number of blocks.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        n.is_multiple_of(self.block_elems())
            .then(|| n / self.block_elems() * self.block_bytes())
    }

    /// Dequantizes `src` (a whole number of blocks) into `dst` (`dst.len()` elements).
    pub fn dequantize(self, src: &[u8], dst: &mut [f32]) {
        let (be, bb) = (self.block_elems(), self.block_bytes());
        assert_eq!(
            src.len() * be,
            dst.len() * bb,
            "{} buffer sizes disagree",
            self.name()
        );
        let blocks = src.chunks_exact(bb).zip(dst.chunks_exact_mut(be));
        match self {
            Self::F32 => blocks.for_each(|(b, y)| y[0] = f32::from_le_bytes(b.try_into().unwrap())),
            Self::F16 => blocks.for_each(|(b, y)| y[0] = f16_at(b, 0)),
            Self::BF16 => {
                blocks.for_each(|(b, y)| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32())
            }
            Self::Q4_0 => blocks.for_each(|(b, y)| dequant_q4_0(b, y)),
            Self::Q4_1 => blocks.for_each(|(b, y)| dequant_q4_1(b, y)),
            Self::Q5_0 => blocks.for_each(|(b, y)| dequant_q5_0(b, y)),
            Self::Q5_1 => blocks.for_each(|(b, y)| dequant_q5_1(b, y)),
            Self::Q8_0 => blocks.for_each(|(b, y)| dequant_q8_0(b, y)),
            Self::Q4K => blocks.for_each(|(b, y)| dequant_q4_k(b, y)),
            Self::Q5K => blocks.for_each(|(b, y)| dequant_q5_k(b, y)),
            Self::Q6K => blocks.for_each(|(b, y)| dequant_q6_k(b, y)),
        }
    }
}

/// Names of ggml types recoup does not read, so the error says what the file holds.
fn known_name(id: u32) -> &'static str {
    match id {
        4 | 5 => "Q4_2/Q4_3 (removed from ggml)",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        15 => "Q8_K",
        16..=23 | 29 => "IQ (i-quant)",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        _ => "unknown",
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Q4_0: `d`, then 16 bytes of nibbles; low nibbles are elements 0..16, high 16..32.
fn dequant_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        y[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// Q4_1: `d`, `m`, 16 bytes of nibbles; value = q·d + m.
fn dequant_q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (j, &q) in b[4..20].iter().enumerate() {
        y[j] = (q & 0x0F) as f32 * d + m;
        y[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// The fifth bits of a Q5 block: bit j of `qh` belongs to element j.
fn q5_high_bits(qh: &[u8], j: usize) -> (u8, u8) {
    let qh = u32::from_le_bytes(qh.try_into().unwrap());
    (((qh >> j) << 4) as u8 & 0x10, (qh >> (j + 12)) as u8 & 0x10)
}

fn dequant_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[6..22].iter().enumerate() {
        let (h0, h1) = q5_high_bits(&b[2..6], j);
        y[j] = (((q & 0x0F) | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((q >> 4) | h1) as i32 - 16) as f32 * d;
    }
}

fn dequant_q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (j, &q) in b[8..24].iter().enumerate() {
        let (h0, h1) = q5_high_bits(&b[4..8], j);
        y[j] = ((q & 0x0F) | h0) as f32 * d + m;
        y[j + 16] = ((q >> 4) | h1) as f32 * d + m;
    }
}

fn dequant_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..34].iter().enumerate() {
        y[j] = q as i8 as f32 * d;
    }
}

/// The 6-bit scale and min of sub-block `j` (of 8) from the 12 packed bytes of Q4_K/Q5_K.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q4_K: super-block of 8 sub-blocks of 32; value = d·sc·q − dmin·m.
fn dequant_q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for chunk in 0..4 {
        let q = &qs[chunk * 32..chunk * 32 + 32];
        let (sc0, m0) = scale_min_k4(2 * chunk, scales);
        let (sc1, m1) = scale_min_k4(2 * chunk + 1, scales);
        let out = &mut y[chunk * 64..chunk * 64 + 64];
        for l in 0..32 {
            out[l] = d * sc0 as f32 * (q[l] & 0x0F) as f32 - dmin * m0 as f32;
            out[l + 32] = d * sc1 as f32 * (q[l] >> 4) as f32 - dmin * m1 as f32;
        }
    }
}

/// Q5_K: Q4_K plus one high bit per element in `qh` (bit 2·chunk and 2·chunk+1 of byte l).
fn dequant_q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for chunk in 0..4 {
        let q = &qs[chunk * 32..chunk * 32 + 32];
        let (sc0, m0) = scale_min_k4(2 * chunk, scales);
        let (sc1, m1) = scale_min_k4(2 * chunk + 1, scales);
        let (bit0, bit1) = (1u8 << (2 * chunk), 1u8 << (2 * chunk + 1));
        let out = &mut y[chunk * 64..chunk * 64 + 64];
        for l in 0..32 {
            let lo = (q[l] & 0x0F) + if qh[l] & bit0 != 0 { 16 } else { 0 };
            let hi = (q[l] >> 4) + if qh[l] & bit1 != 0 { 16 } else { 0 };
            out[l] = d * sc0 as f32 * lo as f32 - dmin * m0 as f32;
            out[l + 32] = d * sc1 as f32 * hi as f32 - dmin * m1 as f32;
        }
    }
}

/// Q6_K: 4 low bits in `ql`, 2 high bits in `qh`, 16 signed 8-bit scales, one f16 `d`.
fn dequant_q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[half * 64..half * 64 + 64];
        let qh = &b[128 + half * 32..128 + half * 32 + 32];
        let sc = &b[192 + half * 8..192 + half * 8 + 8];
        let out = &mut y[half * 128..half * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            out[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            out[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            out[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            out[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}
