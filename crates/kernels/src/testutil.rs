//! Random test data shared by the kernels' tests: packed matrices with scales of both signs,
//! activations with outlier channels (never zeros).

use half::f16;
use rand::RngExt;
use rand::rngs::StdRng;
use recoup_formats::packed::{GridSpec, PackedMatrix};

pub fn random_matrix(rng: &mut StdRng, spec: GridSpec, rows: usize, cols: usize) -> PackedMatrix {
    let codes: Vec<u8> = (0..rows * cols)
        .map(|_| rng.random_range(0..=spec.max_code()))
        .collect();
    let mut packed = vec![0u8; rows * spec.row_bytes(cols)];
    for (c, p) in codes
        .chunks_exact(cols)
        .zip(packed.chunks_exact_mut(spec.row_bytes(cols)))
    {
        spec.pack_row(c, p);
    }
    let groups = rows * cols.div_ceil(spec.group);
    // Scales of both signs and varied magnitude, as real groups have.
    let scales = (0..groups)
        .map(|_| {
            let s: f32 = rng.random_range(0.002..0.05);
            f16::from_f32(if rng.random_bool(0.2) { -s } else { s })
        })
        .collect();
    let zeros = if spec.sym {
        vec![]
    } else {
        (0..groups)
            .map(|_| rng.random_range(0..=spec.max_code()))
            .collect()
    };
    PackedMatrix::new(spec, rows, cols, packed, scales, zeros, "test").unwrap()
}

/// Activations with a few outlier channels, as in real models.
pub fn random_activation(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let v: f32 = rng.random_range(-1.0..1.0);
            if rng.random_bool(0.01) { v * 40.0 } else { v }
        })
        .collect()
}
