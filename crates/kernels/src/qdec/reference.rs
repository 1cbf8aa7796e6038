//! Scalar twins of the QDEC kernels: the definition the SIMD versions are tested against.

use super::{GROUP, ResidualEpilogue, SLICE};

/// `y[j] += scale_o · (Σ_g d_g · Σ_{i∈g} q_i · nibble(i, o) − offset)` for outputs
/// `o = r0 + j` (`=` rather than `+=` unless `ACCUMULATE`), the selected activations rounded
/// as [`super::SelectedCodes`] does: integer sums per group of channels, a slice of outputs
/// at a time.
pub fn residual_pass<const ACCUMULATE: bool>(e: ResidualEpilogue, r0: usize, y: &mut [f32]) {
    let q = e.selected;
    let mut acc = [0f32; SLICE];
    let mut sums = [0i32; SLICE];
    for s0 in (0..y.len()).step_by(SLICE) {
        let len = (y.len() - s0).min(SLICE);
        let acc = &mut acc[..len];
        acc.fill(0.0);
        let first_byte = (r0 + s0) / 2;
        for (g, d) in q.scales.iter().enumerate() {
            let sums = &mut sums[..len];
            sums.fill(0);
            let group = g * GROUP..((g + 1) * GROUP).min(q.codes.len());
            for (&i, &qi) in q.channels[group.clone()].iter().zip(&q.codes[group]) {
                let run = &e.residual.run(i as usize)[first_byte..first_byte + len.div_ceil(2)];
                for (pair, &byte) in sums.chunks_mut(2).zip(run) {
                    pair[0] += i32::from(qi) * i32::from(byte & 0xF);
                    if let Some(hi) = pair.get_mut(1) {
                        *hi += i32::from(qi) * i32::from(byte >> 4);
                    }
                }
            }
            for (a, &s) in acc.iter_mut().zip(sums.iter()) {
                *a += d * s as f32;
            }
        }
        let scales = &e.residual.scales[r0 + s0..r0 + s0 + len];
        for ((out, &a), s) in y[s0..s0 + len].iter_mut().zip(acc.iter()).zip(scales) {
            let c = s.to_f32() * (a - q.offset);
            *out = if ACCUMULATE { *out + c } else { c };
        }
    }
}
