//! The decode step's linear layers on the GPU at Qwen2.5-Coder-0.5B's shapes (24 blocks of
//! q/k/v/o/gate/up/down, d 896, 4864 intermediate), timed with CUDA events after warm-up,
//! median of many runs: plain 3- and 4-bit products (GB/s against the measured device
//! read), the rank-32 low-rank branch fused and unfused (the decode time each adds), and
//! QDEC at the k_chunk the bandwidth model picks (the slowdown, with its residuals in
//! mapped host memory). Random weights of the real shapes: the kernels' time does not
//! depend on the values. Run: `cargo bench -p recoup-kernels --features cuda --bench cuda`.

use cudarc::driver::{CudaSlice, sys};
use half::f16;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use recoup_formats::packed::{GridSpec, PackedMatrix};
use recoup_kernels::cuda::{
    FactorArgs, GemvEpilogue, Gpu, MappedHost, PackedArgs, QdecArgs, k_chunk_estimate,
};

const D: usize = 896;
const FF: usize = 4864;
const KV: usize = 128;
const LAYERS: usize = 24;
const RANK: usize = 32;

/// The seven products of a block: (rows, cols).
const SHAPES: [(usize, usize); 7] = [(D, D), (KV, D), (KV, D), (D, D), (FF, D), (FF, D), (D, FF)];

struct Layer {
    args: PackedArgs,
    a: FactorArgs,
    b: FactorArgs,
    qdec: QdecArgs,
    _keep: (Vec<CudaSlice<u8>>, Vec<CudaSlice<u16>>, MappedHost),
}

fn random_layer(gpu: &Gpu, rng: &mut StdRng, bits: u32, rows: usize, cols: usize) -> Layer {
    let spec = GridSpec::new(bits, 128, false).unwrap();
    let codes: Vec<u8> = (0..rows * spec.row_bytes(cols))
        .map(|_| rng.random())
        .collect();
    let groups = rows * cols.div_ceil(128);
    let scales: Vec<f16> = (0..groups)
        .map(|_| f16::from_f32(rng.random_range(0.002..0.05)))
        .collect();
    let zeros: Vec<u8> = (0..groups)
        .map(|_| rng.random_range(0..=spec.max_code()))
        .collect();
    let m = PackedMatrix::new(spec, rows, cols, codes, scales, zeros, "bench").unwrap();
    let bits16 = |v: &[f16]| v.iter().map(|x| x.to_bits()).collect::<Vec<u16>>();
    let f16s = |n: usize, rng: &mut StdRng| -> Vec<u16> {
        (0..n)
            .map(|_| f16::from_f32(rng.random_range(-0.05..0.05)).to_bits())
            .collect()
    };
    let u8s = vec![
        gpu.upload(&m.row_major_codes()).unwrap(),
        gpu.upload(&m.row_major_zeros()).unwrap(),
    ];
    let u16s = vec![
        gpu.upload(&bits16(&m.row_major_scales())).unwrap(),
        gpu.upload(&f16s(rows * RANK, rng)).unwrap(),
        gpu.upload(&f16s(RANK * cols, rng)).unwrap(),
        gpu.upload(&f16s(rows, rng)).unwrap(),
    ];
    let runs: Vec<u8> = (0..cols * rows / 2).map(|_| rng.random()).collect();
    let mapped = MappedHost::new(gpu, &runs).unwrap();
    let args = PackedArgs {
        bits,
        rows,
        cols,
        group: 128,
        codes: gpu.ptr(&u8s[0]),
        scales: gpu.ptr(&u16s[0]),
        zeros: gpu.ptr(&u8s[1]),
        sym_zero: 0,
    };
    let factor = |s: &CudaSlice<u16>| FactorArgs {
        f16: gpu.ptr(s),
        ..Default::default()
    };
    let qdec = QdecArgs {
        residual: mapped.device_ptr(),
        scales: gpu.ptr(&u16s[3]),
        rows,
        cols,
        k_chunk: 0,
        floors: 0,
        blocks: 8,
    };
    Layer {
        args,
        a: factor(&u16s[1]),
        b: factor(&u16s[2]),
        qdec,
        _keep: (u8s, u16s, mapped),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Plain,
    Fused,
    Unfused,
    Qdec(usize),
}

/// Median microseconds of one token's products over `reps` runs.
fn time_token(gpu: &Gpu, layers: &[Layer], bufs: &Bufs, variant: Variant, reps: usize) -> f64 {
    let run = || {
        for l in layers {
            let (rows, cols) = (l.args.rows, l.args.cols);
            let mut e = GemvEpilogue::default();
            match variant {
                Variant::Plain => {}
                Variant::Fused | Variant::Unfused => {
                    gpu.lowrank_down(&l.b, bufs.x, bufs.v, RANK, cols).unwrap();
                    if variant == Variant::Fused {
                        (e.a_f16, e.v, e.rank) = (l.a.f16, bufs.v, RANK as i32);
                    }
                }
                Variant::Qdec(k) => {
                    gpu.zero(bufs.y, rows).unwrap();
                    let ready = gpu.main.record_event(None).unwrap();
                    gpu.side.wait(&ready).unwrap();
                    let q = QdecArgs {
                        k_chunk: k,
                        ..l.qdec
                    };
                    gpu.qdec_correct(&q, bufs.x, bufs.y, &gpu.side).unwrap();
                    e.accumulate = true;
                }
            }
            gpu.packed_gemv(&l.args, bufs.x, bufs.y, &e).unwrap();
            if let Variant::Qdec(_) = variant {
                let done = gpu.side.record_event(None).unwrap();
                gpu.main.wait(&done).unwrap();
            }
            if variant == Variant::Unfused {
                gpu.lowrank_up(&l.a, bufs.v, bufs.t, rows, RANK).unwrap();
                gpu.add(bufs.y, bufs.t, rows).unwrap();
            }
        }
    };
    for _ in 0..3 {
        run();
    }
    let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
    let mut us = Vec::new();
    for _ in 0..reps {
        let start = gpu.main.record_event(timing).unwrap();
        run();
        let end = gpu.main.record_event(timing).unwrap();
        us.push(start.elapsed_ms(&end).unwrap() as f64 * 1e3);
    }
    us.sort_by(f64::total_cmp);
    us[us.len() / 2]
}

struct Bufs {
    x: u64,
    y: u64,
    v: u64,
    t: u64,
}

fn main() {
    let gpu = match Gpu::open(0) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("no GPU, nothing to time: {e}");
            return;
        }
    };
    let mut rng = StdRng::seed_from_u64(5);
    let x: Vec<f32> = (0..FF).map(|_| rng.random_range(-1.0..1.0)).collect();
    let keep: Vec<CudaSlice<f32>> = vec![
        gpu.upload(&x).unwrap(),
        gpu.zeros(FF).unwrap(),
        gpu.zeros(RANK).unwrap(),
        gpu.zeros(FF).unwrap(),
    ];
    let bufs = Bufs {
        x: gpu.ptr(&keep[0]),
        y: gpu.ptr(&keep[1]),
        v: gpu.ptr(&keep[2]),
        t: gpu.ptr(&keep[3]),
    };
    // The bandwidth model's inputs, measured: device read and mapped host read.
    let words = 64 << 20;
    let dev: CudaSlice<u32> = gpu.zeros(words).unwrap();
    let device_gbps =
        4.0 * words as f64 / gpu.read_seconds(gpu.ptr(&dev), words, 10).unwrap() / 1e9;
    let host_words = 16 << 20;
    let host = MappedHost::new(&gpu, &vec![1u8; 4 * host_words]).unwrap();
    let link_gbps =
        4.0 * host_words as f64 / gpu.read_seconds(host.device_ptr(), host_words, 3).unwrap() / 1e9;
    println!(
        "{}: device read {device_gbps:.0} GB/s (attribute peak {}), mapped host read {link_gbps:.1} GB/s",
        gpu.name(),
        gpu.peak_gbps()
            .map_or("n/a".into(), |p| format!("{p:.0} GB/s"))
    );
    println!(
        "\nQwen2.5-Coder-0.5B shapes, 168 products per token, g128 asymmetric, medians of 50 tokens"
    );
    println!("bits  variant           µs/token   GB/s  of read   added µs   added / unfused");
    for bits in [3u32, 4] {
        let layers: Vec<Layer> = (0..LAYERS)
            .flat_map(|_| SHAPES)
            .map(|(r, c)| random_layer(&gpu, &mut rng, bits, r, c))
            .collect();
        let bytes: usize = layers
            .iter()
            .map(|l| {
                let spec = GridSpec::new(bits, 128, false).unwrap();
                l.args.rows * (spec.row_bytes(l.args.cols) + 3 * l.args.cols.div_ceil(128))
            })
            .sum();
        let k_model = k_chunk_estimate(bits, device_gbps, link_gbps);
        let plain = time_token(&gpu, &layers, &bufs, Variant::Plain, 50);
        let unfused = time_token(&gpu, &layers, &bufs, Variant::Unfused, 50);
        let rows = [
            ("plain", Variant::Plain),
            ("lowrank r32 unfused", Variant::Unfused),
            ("lowrank r32 fused", Variant::Fused),
            ("qdec k/2", Variant::Qdec((k_model / 2).max(1))),
            ("qdec k model", Variant::Qdec(k_model)),
            ("qdec 2·k", Variant::Qdec(2 * k_model)),
        ];
        for (name, variant) in rows {
            let us = match variant {
                Variant::Plain => plain,
                Variant::Unfused => unfused,
                v => time_token(&gpu, &layers, &bufs, v, 50),
            };
            let gbps = bytes as f64 / (us * 1e-6) / 1e9;
            let added = us - plain;
            let label = match variant {
                Variant::Qdec(k) => format!("{name} ({k})"),
                _ => name.to_string(),
            };
            let vs_unfused = match variant {
                Variant::Fused => format!("{:.0} %", 100.0 * added / (unfused - plain)),
                Variant::Qdec(_) => format!("slowdown {:+.1} %", 100.0 * added / plain),
                _ => String::new(),
            };
            println!(
                "{bits:<5} {label:<20} {us:>8.1} {gbps:>6.0} {:>7.0} % {added:>9.1}   {vs_unfused}",
                100.0 * gbps / device_gbps
            );
        }
    }
}
