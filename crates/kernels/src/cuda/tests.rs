//! The CUDA kernels against the CPU path on fresh random data. Compilation needs only NVRTC
//! (tested wherever the library is found); the rest needs a GPU and returns early, saying
//! so, where there is none.

use super::*;
use crate::attention::{AttentionShape, causal_attention};
use crate::ops::{RopeTable, rms_norm as cpu_rms_norm};
use crate::testutil::{random_activation, random_matrix};
use half::f16;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use recoup_formats::packed::{FactorDtype, GridSpec, LowRank};
use recoup_formats::residual::pack_input_major;

#[test]
fn kernels_compile_with_nvrtc() {
    if !nvrtc_present() {
        eprintln!(
            "NVRTC not found: compilation not checked (set LD_LIBRARY_PATH to its lib folder)"
        );
        return;
    }
    for arch in ["compute_80", "compute_90"] {
        let ptx = compile(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        let text = ptx.to_src();
        for name in [
            "packed_gemv_q3",
            "qdec_correct",
            "attention_decode",
            "rope_store",
        ] {
            assert!(text.contains(name), "{arch}: {name} missing from the PTX");
        }
    }
}

fn gpu() -> Option<Gpu> {
    match Gpu::open(0) {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("no GPU, CUDA kernel checks skipped: {e}");
            None
        }
    }
}

/// Largest |a − b| relative to the largest |b|, after checking every output was written.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    assert!(a.iter().all(|v| v.is_finite()), "an output was not written");
    let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn factor_args(
    gpu: &Gpu,
    f: &recoup_formats::packed::Factor,
    keep: &mut Vec<CudaSlice<u8>>,
) -> FactorArgs {
    use recoup_formats::packed::Factor;
    let mut up = |bytes: Vec<u8>| {
        let s = gpu.upload(&bytes).unwrap();
        let p = gpu.ptr(&s);
        keep.push(s);
        p
    };
    let f16_bytes = |v: &[f16]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    match f {
        Factor::F16(v) => FactorArgs {
            f16: up(f16_bytes(v)),
            ..Default::default()
        },
        Factor::Int8 { codes, scales } => FactorArgs {
            i8: up(codes.iter().map(|&c| c as u8).collect()),
            scales: up(f16_bytes(scales)),
            ..Default::default()
        },
    }
}

#[test]
fn packed_products_match_the_cpu_with_both_low_rank_paths() {
    let Some(gpu) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(11);
    for bits in [2, 3, 4, 8] {
        for (group, sym, rows, cols) in [
            (128, false, 300, 896),
            (64, true, 77, 4864),
            (32, false, 5, 64),
        ] {
            let spec = GridSpec::new(bits, group, sym).unwrap();
            let m = random_matrix(&mut rng, spec, rows, cols);
            let x = random_activation(&mut rng, cols);
            let w = m.dequantize();
            let plain: Vec<f32> = (0..rows)
                .map(|r| {
                    w[r * cols..(r + 1) * cols]
                        .iter()
                        .zip(&x)
                        .map(|(a, b)| a * b)
                        .sum()
                })
                .collect();
            let mut keep = Vec::new();
            // The GPU kernels read everything row-major, as files store it.
            let codes = gpu.upload(&m.row_major_codes()).unwrap();
            let scales = gpu
                .upload(
                    &m.row_major_scales()
                        .iter()
                        .map(|s| s.to_bits())
                        .collect::<Vec<u16>>(),
                )
                .unwrap();
            let zeros = (!sym).then(|| gpu.upload(&m.row_major_zeros()).unwrap());
            let args = PackedArgs {
                bits,
                rows,
                cols,
                group,
                codes: gpu.ptr(&codes),
                scales: gpu.ptr(&scales),
                zeros: zeros.as_ref().map_or(0, |z| gpu.ptr(z)),
                sym_zero: i32::from(spec.sym_zero()),
            };
            let xd = gpu.upload(&x).unwrap();
            let y: CudaSlice<f32> = gpu.zeros(rows).unwrap();
            gpu.packed_gemv(&args, gpu.ptr(&xd), gpu.ptr(&y), &GemvEpilogue::default())
                .unwrap();
            let got = gpu.download(&y).unwrap();
            let e = rel_err(&got, &plain);
            assert!(e < 1e-4, "{bits}-bit g{group} sym {sym} {rows}×{cols}: {e}");

            for dtype in [FactorDtype::F16, FactorDtype::Int8] {
                let rank = 24;
                let a: Vec<f32> = (0..rows * rank)
                    .map(|_| rng.random_range(-0.1..0.1))
                    .collect();
                let b: Vec<f32> = (0..rank * cols)
                    .map(|_| rng.random_range(-0.1..0.1))
                    .collect();
                let lr = LowRank::from_f32(rank, &a, &b, dtype);
                let (af, bf) = (lr.a_f32(), lr.b_f32());
                let v: Vec<f32> = (0..rank)
                    .map(|j| {
                        bf[j * cols..(j + 1) * cols]
                            .iter()
                            .zip(&x)
                            .map(|(p, q)| p * q)
                            .sum()
                    })
                    .collect();
                let want: Vec<f32> = (0..rows)
                    .map(|r| plain[r] + (0..rank).map(|j| af[r * rank + j] * v[j]).sum::<f32>())
                    .collect();
                let (fa, fb) = (
                    factor_args(&gpu, &lr.a, &mut keep),
                    factor_args(&gpu, &lr.b, &mut keep),
                );
                let vd: CudaSlice<f32> = gpu.zeros(rank).unwrap();
                gpu.lowrank_down(&fb, gpu.ptr(&xd), gpu.ptr(&vd), rank, cols)
                    .unwrap();
                // Fused: the up-projection in the product's epilogue.
                let fused: CudaSlice<f32> = gpu.zeros(rows).unwrap();
                let e = GemvEpilogue {
                    a_f16: fa.f16,
                    a_i8: fa.i8,
                    a_scales: fa.scales,
                    v: gpu.ptr(&vd),
                    rank: rank as i32,
                    ..Default::default()
                };
                gpu.packed_gemv(&args, gpu.ptr(&xd), gpu.ptr(&fused), &e)
                    .unwrap();
                // Unfused: product, up-projection, addition.
                let unfused: CudaSlice<f32> = gpu.zeros(rows).unwrap();
                let t: CudaSlice<f32> = gpu.zeros(rows).unwrap();
                gpu.packed_gemv(
                    &args,
                    gpu.ptr(&xd),
                    gpu.ptr(&unfused),
                    &GemvEpilogue::default(),
                )
                .unwrap();
                gpu.lowrank_up(&fa, gpu.ptr(&vd), gpu.ptr(&t), rows, rank)
                    .unwrap();
                gpu.add(gpu.ptr(&unfused), gpu.ptr(&t), rows).unwrap();
                for (name, out) in [("fused", &fused), ("unfused", &unfused)] {
                    let e = rel_err(&gpu.download(out).unwrap(), &want);
                    assert!(e < 1e-4, "{name} {dtype:?} {bits}-bit {rows}×{cols}: {e}");
                }
            }
        }
    }
}

#[test]
fn qdec_correction_matches_the_dense_residual_product() {
    let Some(gpu) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(12);
    for (rows, cols, k_chunk) in [
        (896, 896, 8),
        (4864, 896, 64),
        (896, 4864, 16),
        (64, 2500, 1024),
    ] {
        let levels: Vec<i8> = (0..rows * cols).map(|_| rng.random_range(-7..=7)).collect();
        let scales: Vec<f16> = (0..rows)
            .map(|_| f16::from_f32(rng.random_range(0.001..0.02)))
            .collect();
        let x = random_activation(&mut rng, cols);
        let mut channels = Vec::new();
        crate::qdec::select_exact(&x, k_chunk, &mut channels);
        let base: Vec<f32> = (0..rows).map(|_| rng.random_range(-1.0..1.0)).collect();
        let want: Vec<f32> = (0..rows)
            .map(|o| {
                let s: f32 = channels
                    .iter()
                    .map(|&i| x[i as usize] * f32::from(levels[o * cols + i as usize]))
                    .sum();
                base[o] + scales[o].to_f32() * s
            })
            .collect();
        let mapped = MappedHost::new(&gpu, &pack_input_major(&levels, rows, cols)).unwrap();
        let sd = gpu
            .upload(&scales.iter().map(|s| s.to_bits()).collect::<Vec<u16>>())
            .unwrap();
        let xd = gpu.upload(&x).unwrap();
        let q = QdecArgs {
            residual: mapped.device_ptr(),
            scales: gpu.ptr(&sd),
            rows,
            cols,
            k_chunk,
            floors: 0,
            blocks: 3,
        };
        let total = q.total();
        // Every case fits the kernel's shared memory: none is skipped.
        assert!(8 * total + 4096 + 256 <= 48 * 1024, "{total} channels");
        let y = gpu.upload(&base).unwrap();
        gpu.qdec_correct(&q, gpu.ptr(&xd), gpu.ptr(&y), &gpu.main)
            .unwrap();
        let e = rel_err(&gpu.download(&y).unwrap(), &want);
        assert!(e < 1e-4, "exact {rows}×{cols} k {k_chunk}: {e}");

        // Buckets with floors that put the k-th largest |x| at a floor give the same set as
        // exact top-k outside the boundary bucket; with one bucket boundary exactly at the
        // largest unselected magnitude, the sets are equal.
        let mut mags: Vec<f32> = x.iter().map(|v| v.abs()).collect();
        mags.sort_by(|a, b| b.total_cmp(a));
        let floors = crate::qdec::BucketFloors::new(mags[0], mags[total.max(1) - 1]);
        let fd = gpu.upload(&floors.floors).unwrap();
        let y = gpu.upload(&base).unwrap();
        let qb = QdecArgs {
            floors: gpu.ptr(&fd),
            ..q
        };
        gpu.qdec_correct(&qb, gpu.ptr(&xd), gpu.ptr(&y), &gpu.main)
            .unwrap();
        let mut cpu_bucket = Vec::new();
        crate::qdec::select_bucket(&x, k_chunk, &floors, &mut cpu_bucket);
        let want: Vec<f32> = (0..rows)
            .map(|o| {
                let s: f32 = cpu_bucket
                    .iter()
                    .map(|&i| x[i as usize] * f32::from(levels[o * cols + i as usize]))
                    .sum();
                base[o] + scales[o].to_f32() * s
            })
            .collect();
        let e = rel_err(&gpu.download(&y).unwrap(), &want);
        assert!(e < 1e-4, "bucket {rows}×{cols} k {k_chunk}: {e}");
    }
}

#[test]
fn block_operations_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(13);
    let (n_heads, n_kv, head_dim, len, max_len) = (14, 2, 64, 37, 64);
    let (q_dim, kv_dim) = (n_heads * head_dim, n_kv * head_dim);
    let mut rand = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
    // RMSNorm.
    let (x, w) = (rand(896), rand(896));
    let mut want = vec![0f32; 896];
    cpu_rms_norm(&x, &w, 1e-6, &mut want);
    let (xd, wd, od) = (
        gpu.upload(&x).unwrap(),
        gpu.upload(&w).unwrap(),
        gpu.zeros::<f32>(896).unwrap(),
    );
    gpu.rms_norm(gpu.ptr(&xd), gpu.ptr(&wd), gpu.ptr(&od), 896, 1e-6)
        .unwrap();
    assert!(rel_err(&gpu.download(&od).unwrap(), &want) < 1e-5);

    // RoPE + cache store + attention of the newest position.
    let inv: Vec<f64> = (0..head_dim / 2)
        .map(|i| 1.0 / 1e6f64.powf(2.0 * i as f64 / head_dim as f64))
        .collect();
    let mut k_cache = rand(max_len * kv_dim);
    let mut v_cache = rand(max_len * kv_dim);
    let (q, k, v) = (rand(q_dim), rand(kv_dim), rand(kv_dim));
    let pos = len - 1;
    let (kc, vc) = (gpu.upload(&k_cache).unwrap(), gpu.upload(&v_cache).unwrap());
    let (qd, kd, vd) = (
        gpu.upload(&q).unwrap(),
        gpu.upload(&k).unwrap(),
        gpu.upload(&v).unwrap(),
    );
    let invd = gpu.upload(&inv).unwrap();
    gpu.rope_store(
        gpu.ptr(&qd),
        gpu.ptr(&kd),
        gpu.ptr(&vd),
        gpu.ptr(&invd),
        inv.len(),
        (n_heads, n_kv, head_dim),
        pos,
        (gpu.ptr(&kc), gpu.ptr(&vc)),
    )
    .unwrap();
    let rope = RopeTable::new(&inv, pos, 1);
    let (mut q_cpu, mut k_cpu) = (q.clone(), k.clone());
    rope.apply(&mut q_cpu, n_heads, head_dim);
    rope.apply(&mut k_cpu, n_kv, head_dim);
    k_cache[pos * kv_dim..len * kv_dim].copy_from_slice(&k_cpu);
    v_cache[pos * kv_dim..len * kv_dim].copy_from_slice(&v);
    assert!(
        rel_err(&gpu.download(&qd).unwrap(), &q_cpu) < 1e-5,
        "rotated q"
    );
    assert!(
        rel_err(
            &gpu.download(&kc).unwrap()[..len * kv_dim],
            &k_cache[..len * kv_dim]
        ) < 1e-5
    );
    let mut attn = vec![0f32; q_dim];
    let shape = AttentionShape {
        n_heads,
        n_kv_heads: n_kv,
        head_dim,
    };
    causal_attention(
        &q_cpu,
        &k_cache[..len * kv_dim],
        &v_cache[..len * kv_dim],
        &mut attn,
        1,
        pos,
        shape,
        None,
    );
    let out = gpu.zeros::<f32>(q_dim).unwrap();
    let scratch = gpu.zeros::<f32>(n_heads * max_len).unwrap();
    gpu.attention_decode(
        gpu.ptr(&qd),
        (gpu.ptr(&kc), gpu.ptr(&vc)),
        gpu.ptr(&out),
        gpu.ptr(&scratch),
        (n_heads, n_kv, head_dim),
        len,
        max_len,
    )
    .unwrap();
    assert!(
        rel_err(&gpu.download(&out).unwrap(), &attn) < 1e-5,
        "attention"
    );
}

#[test]
fn the_bandwidth_model_picks_the_papers_example() {
    // RTX 4050 Mobile: 192 GB/s device, PCIe 4.0 ×8 ≈ 16 GB/s, 3-bit → k_chunk 64.
    assert_eq!(k_chunk_estimate(3, 192.0, 16.0), 64);
    // H100 SXM (3.35 TB/s) on PCIe 5.0 ×16 (≈ 64 GB/s) at 3 bits: about 15.
    assert_eq!(k_chunk_estimate(3, 3350.0, 64.0), 15);
}
