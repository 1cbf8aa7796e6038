//! Scalar twins of the QDEC kernels: the definition the SIMD versions are tested against.

use super::{ResidualEpilogue, SLICE};

/// `y[j] += scale_{r0+j} · Σ_i x_i · level(i, r0 + j)`, a slice of outputs at a time.
pub fn add_residual(e: ResidualEpilogue, r0: usize, y: &mut [f32]) {
    let mut acc = [0f32; SLICE];
    for s0 in (0..y.len()).step_by(SLICE) {
        let len = (y.len() - s0).min(SLICE);
        let acc = &mut acc[..len];
        acc.fill(0.0);
        let first_byte = (r0 + s0) / 2;
        for (&i, &xi) in e.channels.iter().zip(e.x) {
            let run = &e.residual.run(i as usize)[first_byte..first_byte + len.div_ceil(2)];
            for (pair, &byte) in acc.chunks_mut(2).zip(run) {
                pair[0] += xi * f32::from((byte & 0xF) as i8 - 8);
                if let Some(hi) = pair.get_mut(1) {
                    *hi += xi * f32::from((byte >> 4) as i8 - 8);
                }
            }
        }
        let scales = &e.residual.scales[r0 + s0..r0 + s0 + len];
        for ((out, a), s) in y[s0..s0 + len].iter_mut().zip(acc.iter()).zip(scales) {
            *out += s.to_f32() * a;
        }
    }
}
