//! Packed matrix-vector kernels: GB/s of weights read per instruction set and bit width,
//! next to the machine's streaming-read bandwidth measured in the same run, and the time
//! the low-rank branch adds with the fused and the unfused path.
//!
//! `cargo bench -p recoup-kernels --bench lowbit` (add `-- ROWS COLS` for another shape, and
//! `prefill` for the prefill products alone).

use half::f16;
use recoup_formats::packed::{Factor, FactorDtype, GridSpec, PackedMatrix};
use recoup_formats::residual::pack_input_major;
use recoup_kernels::lowbit::{
    Epilogue, Isa, LowRankFactors, QuantizedActivation, TiledFactor, factor_matvec,
    factor_matvec_add, packed_matvec, packed_matvec_low_rank,
    prefill::{dequantized_matmul, integer_gemm},
};
use recoup_kernels::membw::stream_read_gbps;
use recoup_kernels::qdec::{
    ResidualEpilogue, ResidualRef, SelectedCodes, add_residual, select_exact,
};
use std::time::Instant;

/// A deterministic pseudo-random stream (xorshift).
struct Stream(u64);
impl Stream {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f32 {
        (self.next() % 2001) as f32 / 1000.0 - 1.0
    }
}

fn matrix(s: &mut Stream, bits: u32, group: usize, rows: usize, cols: usize) -> PackedMatrix {
    let spec = GridSpec::new(bits, group, false).unwrap();
    let codes: Vec<u8> = (0..rows * cols)
        .map(|_| (s.next() % (1 << bits)) as u8)
        .collect();
    let rb = spec.row_bytes(cols);
    let mut packed = vec![0u8; rows * rb];
    for (c, p) in codes.chunks(cols).zip(packed.chunks_mut(rb)) {
        spec.pack_row(c, p);
    }
    let groups = rows * cols.div_ceil(group);
    let scales = (0..groups)
        .map(|_| f16::from_f32(0.01 + 0.01 * s.unit()))
        .collect();
    let zeros = (0..groups)
        .map(|_| (s.next() % (1 << bits)) as u8)
        .collect();
    PackedMatrix::new(spec, rows, cols, packed, scales, zeros, "bench").unwrap()
}

/// Median seconds of `f` over enough calls to take about a quarter of a second.
fn time(mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    f();
    let once = t.elapsed().as_secs_f64().max(1e-7);
    let reps = ((0.25 / once) as usize).clamp(5, 20_000);
    let mut v: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (rows, cols) = match args.as_slice() {
        [r, c, ..] => (*r, *c),
        _ => (4864, 896), // Qwen2.5-Coder-0.5B's gate/up projection
    };
    if std::env::args().any(|a| a == "prefill") {
        return prefill(&mut Stream(0x9E37_79B9_7F4A_7C15), rows, cols);
    }
    let stream = stream_read_gbps(1 << 30, 5);
    println!(
        "matrix [{rows}, {cols}], {} threads, streaming read {stream:.1} GB/s",
        rayon::current_num_threads()
    );
    let mut s = Stream(0x9E37_79B9_7F4A_7C15);
    let x: Vec<f32> = (0..cols).map(|_| s.unit()).collect();
    let act = QuantizedActivation::quantize(&x);
    let mut y = vec![0f32; rows];
    println!(
        "{:<10} {:>5} {:>6} {:>10} {:>8} {:>9}",
        "isa", "bits", "group", "µs", "GB/s", "of stream"
    );
    for (bits, group) in [(2, 64), (3, 128), (4, 128), (4, 32), (8, 32)] {
        let m = matrix(&mut s, bits, group, rows, cols);
        for isa in Isa::available() {
            let t = time(|| packed_matvec(&m, &act, &mut y, Epilogue::default(), isa));
            let gbps = m.storage_bytes() as f64 / t / 1e9;
            println!(
                "{:<10} {bits:>5} {group:>6} {:>10.1} {gbps:>8.1} {:>8.0}%",
                isa.name(),
                t * 1e6,
                100.0 * gbps / stream
            );
        }
    }
    let isa = Isa::best();
    let m = matrix(&mut s, 3, 128, rows, cols);
    let plain = time(|| packed_matvec(&m, &act, &mut y, Epilogue::default(), isa));
    println!(
        "\nlow-rank branch on 3-bit g128 ({}): time added to {:.1} µs",
        isa.name(),
        plain * 1e6
    );
    println!(
        "{:<6} {:<5} {:>10} {:>10} {:>14}",
        "rank", "dtype", "fused µs", "unfused µs", "fused/unfused"
    );
    for rank in [16, 32, 64] {
        for dtype in [FactorDtype::F16, FactorDtype::Int8] {
            let a: Vec<f32> = (0..rows * rank).map(|_| s.unit()).collect();
            let b: Vec<f32> = (0..rank * cols).map(|_| s.unit()).collect();
            let (a, b) = (
                Factor::quantize(&a, rank, dtype),
                Factor::quantize(&b, cols, dtype),
            );
            let mut v = vec![0f32; rank];
            let tiled = TiledFactor::new((&a).into(), rows, rank);
            let branch = LowRankFactors {
                a: &tiled,
                b: (&b).into(),
            };
            let fused =
                time(|| packed_matvec_low_rank(&m, &act, &x, branch, None, &mut y, &mut v, isa));
            let unfused = time(|| {
                factor_matvec(branch.b, &x, &mut v, isa);
                packed_matvec(&m, &act, &mut y, Epilogue::default(), isa);
                factor_matvec_add(&tiled, &v, &mut y, isa);
            });
            let (f, u) = (fused - plain, unfused - plain);
            println!(
                "{rank:<6} {:<5} {:>10.1} {:>10.1} {:>13.0}%",
                dtype.name(),
                f * 1e6,
                u * 1e6,
                100.0 * f / u
            );
        }
    }
    qdec(&mut s, &m, &act, &x, plain);
    prefill(&mut s, rows, cols);
}

/// Prefill of 512 tokens: the integer GEMM per instruction set against the dequantizing
/// f32 path (what 8-bit codes take), in multiply-adds per second.
fn prefill(s: &mut Stream, rows: usize, cols: usize) {
    let n = 512;
    let x: Vec<f32> = (0..n * cols).map(|_| s.unit()).collect();
    let mut y = vec![0f32; n * rows];
    let gmacs = |t: f64| (n * rows * cols) as f64 / t / 1e9;
    println!("\nprefill of {n} tokens: GMAC/s (multiply-adds per second)");
    println!(
        "{:<5} {:>6} {:>14} integer GEMM per isa",
        "bits", "group", "dequant + f32"
    );
    for (bits, group) in [(2, 64), (3, 128), (4, 128), (4, 32)] {
        let m = matrix(s, bits, group, rows, cols);
        let f32_path = time(|| dequantized_matmul(&m, &x, n, &mut y));
        // The scalar twin takes seconds per product here; it is checked by the tests.
        let int: Vec<String> = Isa::available()
            .into_iter()
            .filter(|&isa| isa != Isa::Scalar)
            .map(|isa| {
                let t = time(|| integer_gemm(&m, &x, n, &mut y, isa));
                format!("{} {:.1}", isa.name(), gmacs(t))
            })
            .collect();
        println!(
            "{bits:<5} {group:>6} {:>14.1} {}",
            gmacs(f32_path),
            int.join(", ")
        );
    }
}

/// QDEC's residual correction in the epilogue of the 3-bit product, per `k_chunk`: the time
/// it adds, and the residual pass alone on one thread per instruction set.
fn qdec(s: &mut Stream, m: &PackedMatrix, act: &QuantizedActivation, x: &[f32], plain: f64) {
    let (rows, cols) = (m.rows, m.cols);
    let levels: Vec<i8> = (0..rows * cols)
        .map(|_| (s.next() % 15) as i8 - 7)
        .collect();
    let codes = pack_input_major(&levels, rows, cols);
    let scales: Vec<f16> = (0..rows)
        .map(|_| f16::from_f32(0.001 + 0.001 * s.unit()))
        .collect();
    let mut y = vec![0f32; rows];
    println!(
        "\nQDEC residual on 3-bit g128: time added to {:.1} µs",
        plain * 1e6
    );
    println!(
        "{:<8} {:>9} {:>10} {:>8}   residual pass alone, 1 thread: ns per channel × 1000 outputs",
        "k_chunk", "MB read", "added µs", "added"
    );
    for n in [896, 4864] {
        // A new activation each call (as in decode), heavy-tailed like a model's: selection
        // on one repeated vector would train the branch predictors on its exact pattern.
        let xs: Vec<Vec<f32>> = (0..64)
            .map(|_| {
                (0..n)
                    .map(|_| {
                        let v = s.unit();
                        if s.next().is_multiple_of(50) {
                            30.0 * v
                        } else {
                            v
                        }
                    })
                    .collect()
            })
            .collect();
        for k_chunk in [2, 8, 64] {
            let (mut out, mut i) = (Vec::new(), 0);
            let t = time(|| {
                out.clear();
                i = (i + 1) % xs.len();
                select_exact(&xs[i], k_chunk, &mut out);
            });
            println!("select_exact n {n} k_chunk {k_chunk}: {:.2} µs", t * 1e6);
        }
    }
    for k_chunk in [0, 1, 8, 16, 64] {
        let mut channels = Vec::new();
        select_exact(x, k_chunk, &mut channels);
        let xs: Vec<f32> = channels.iter().map(|&i| x[i as usize]).collect();
        let selected = SelectedCodes::new(&channels, &xs);
        let e = ResidualEpilogue {
            residual: ResidualRef {
                codes: &codes,
                scales: &scales,
            },
            selected: &selected,
        };
        let isa = Isa::best();
        let with = Epilogue {
            low_rank: None,
            residual: Some(e),
        };
        let t = time(|| packed_matvec(m, act, &mut y, with, isa));
        let bytes = channels.len() * rows / 2 + 2 * rows;
        let alone: Vec<String> = Isa::available()
            .into_iter()
            .map(|isa| {
                let t = time(|| add_residual(e, 0, &mut y, isa));
                let per = t * 1e9 / (channels.len() * rows) as f64 * 1000.0;
                format!("{} {per:.0}", isa.name())
            })
            .collect();
        println!(
            "{k_chunk:<8} {:>9.3} {:>10.1} {:>7.1}%   {}",
            bytes as f64 / 1e6,
            (t - plain) * 1e6,
            100.0 * (t - plain) / plain,
            alone.join(", ")
        );
    }
}
