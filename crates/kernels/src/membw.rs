//! The machine's streaming-read bandwidth, measured the way batch-1 decode reads weights:
//! every thread sums its own slice of a buffer much larger than the caches.

use rayon::prelude::*;
use std::time::Instant;

/// Best of `reps` parallel full reads of a `bytes`-sized buffer, in GB/s (10⁹ bytes/s).
pub fn stream_read_gbps(bytes: usize, reps: usize) -> f64 {
    let n = bytes / 4;
    // Non-zero, varied contents, so no page is shared zero memory.
    let buf: Vec<f32> = (0..n).into_par_iter().map(|i| (i % 251) as f32).collect();
    let chunk = n.div_ceil(rayon::current_num_threads() * 4).max(1 << 16);
    let mut best = f64::MAX;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        let sum: f32 = buf.par_chunks(chunk).map(sum_slice).sum();
        std::hint::black_box(sum);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (n * 4) as f64 / best / 1e9
}

/// Sum with eight independent accumulators, so the loop is bound by loads, not adds.
fn sum_slice(s: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = s.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

#[cfg(test)]
mod tests {
    #[test]
    fn sum_slice_matches_plain_sum() {
        let v: Vec<f32> = (0..1003).map(|i| (i % 7) as f32).collect();
        assert_eq!(super::sum_slice(&v), v.iter().sum::<f32>());
    }
}
