//! Every SIMD kernel against its scalar twin, and both against the f32 product of the
//! dequantized weights, on random data (never zeros) for every bit width and group size.

use super::*;
use crate::matmul::matmul_wt;
use crate::qdec::SelectedCodes;
use crate::testutil::{random_activation, random_matrix};
use half::f16;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use recoup_formats::packed::{FactorDtype, GridSpec};

fn configs() -> Vec<(u32, usize, bool, usize, usize)> {
    let mut c = vec![];
    for bits in [2, 3, 4, 8] {
        for (group, sym) in [(32, false), (64, true), (128, false), (128, true)] {
            // 576 columns leave a 64-wide last group at g128 (SmolLM2's width).
            for (rows, cols) in [(37, 576), (5, 1024), (3, 32)] {
                c.push((bits, group, sym, rows, cols));
            }
        }
        c.push((bits, 896, false, 9, 896)); // one group per row
    }
    c
}

/// `Σ_i |s_g|·(q_i + z_g)·|x̂_i|`: the size of the terms a row's sum adds up, for
/// tolerances of float summation order.
fn magnitude(m: &PackedMatrix, act: &QuantizedActivation, r: usize) -> f32 {
    let mut codes = vec![0u8; m.cols];
    m.row_codes(r, &mut codes);
    (0..m.cols)
        .map(|i| {
            let g = i / m.spec.group;
            let s = m.scale(r, g).to_f32().abs();
            let x = act.scales[i / BLOCK] * f32::from(act.codes[i]);
            s * (f32::from(codes[i]) + f32::from(m.zero(r, g))) * x.abs()
        })
        .sum()
}

#[test]
fn rounding_without_the_library_call_is_round() {
    let mut rng = StdRng::seed_from_u64(11);
    let halves = (-255..=255).map(|k| k as f32 / 2.0);
    let near = halves.clone().flat_map(|h| [h.next_down(), h.next_up()]);
    let random = (0..10_000).map(|_| rng.random_range(-127.49f32..127.49));
    for v in halves.chain(near).chain(random) {
        assert_eq!(reference::round_half_away(v), v.round() as i32, "{v}");
    }
}

#[test]
fn simd_activation_rounding_gives_the_scalar_bytes() {
    let mut rng = StdRng::seed_from_u64(12);
    let mut x = random_activation(&mut rng, 4096);
    // Exact halves of the step (0.25), where rounding modes differ, in the first block.
    x[..BLOCK]
        .iter_mut()
        .enumerate()
        .for_each(|(i, v)| *v = 0.25 * (i as f32 - 16.0) + 0.125);
    x[31] = 127.0 * 0.25;
    let want = {
        let mut q = QuantizedActivation::default();
        q.requantize_with(&x, Isa::Scalar);
        q
    };
    for isa in Isa::available() {
        let mut got = QuantizedActivation::default();
        got.requantize_with(&x, isa);
        assert_eq!(got.codes, want.codes, "{}", isa.name());
        assert_eq!(got.scales, want.scales, "{}", isa.name());
        assert_eq!(got.block_sums, want.block_sums, "{}", isa.name());
    }
}

#[test]
fn activation_rounds_within_half_a_step_per_block() {
    let mut rng = StdRng::seed_from_u64(1);
    let x = random_activation(&mut rng, 1024);
    let q = QuantizedActivation::quantize(&x);
    for (b, xb) in x.chunks(BLOCK).enumerate() {
        let d = q.scales[b];
        let max = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!((d * 127.0 - max).abs() <= 1e-6 * max);
        let mut sum = 0f32;
        for (i, &v) in xb.iter().enumerate() {
            let c = q.codes[b * BLOCK + i];
            assert!(
                (v - d * f32::from(c)).abs() <= d / 2.0 * (1.0 + 1e-5),
                "{v} {c} {d}"
            );
            sum += f32::from(c);
        }
        assert!((q.block_sums[b] - d * sum).abs() <= 1e-6 * d * 127.0 * 32.0);
    }
    let zero = QuantizedActivation::quantize(&[0.0; 64]);
    assert!(zero.codes.iter().all(|&c| c == 0) && zero.scales == [0.0, 0.0]);
}

#[test]
fn simd_rows_match_the_scalar_twin_for_every_format() {
    let mut rng = StdRng::seed_from_u64(2);
    for (bits, group, sym, rows, cols) in configs() {
        let spec = GridSpec::new(bits, group, sym).unwrap();
        let m = random_matrix(&mut rng, spec, rows, cols);
        let act = QuantizedActivation::quantize(&random_activation(&mut rng, cols));
        let sums = act.group_sums(group);
        let mut want = vec![0f32; rows];
        packed_rows(
            &m,
            &act,
            &sums,
            0,
            &mut want,
            Epilogue::default(),
            Isa::Scalar,
        );
        for isa in Isa::available() {
            let mut got = vec![f32::NAN; rows];
            packed_rows(&m, &act, &sums, 0, &mut got, Epilogue::default(), isa);
            for r in 0..rows {
                let tol = 1e-5 * magnitude(&m, &act, r);
                assert!(
                    (got[r] - want[r]).abs() <= tol,
                    "{} {bits}-bit g{group} sym={sym} [{rows}x{cols}] row {r}: {} vs {}",
                    isa.name(),
                    got[r],
                    want[r]
                );
            }
            // Sub-ranges of rows (the last two; one starting and ending inside tiles of 8)
            // give the same values as the whole.
            for span in [rows - rows.min(2)..rows, rows.min(3)..rows.min(13)] {
                let mut part = vec![f32::NAN; span.len()];
                packed_rows(
                    &m,
                    &act,
                    &sums,
                    span.start,
                    &mut part,
                    Epilogue::default(),
                    isa,
                );
                assert_eq!(part, got[span], "{} {bits}-bit g{group} part", isa.name());
            }
        }
    }
}

#[test]
fn scalar_twin_is_the_f32_product_up_to_the_activation_rounding() {
    let mut rng = StdRng::seed_from_u64(3);
    for (bits, group, sym, rows, cols) in configs() {
        let spec = GridSpec::new(bits, group, sym).unwrap();
        let m = random_matrix(&mut rng, spec, rows, cols);
        let x = random_activation(&mut rng, cols);
        let act = QuantizedActivation::quantize(&x);
        let mut y = vec![0f32; rows];
        packed_rows(
            &m,
            &act,
            &act.group_sums(group),
            0,
            &mut y,
            Epilogue::default(),
            Isa::Scalar,
        );
        let w = m.dequantize();
        for r in 0..rows {
            let row = &w[r * cols..(r + 1) * cols];
            let exact: f64 = row.iter().zip(&x).map(|(&w, &x)| w as f64 * x as f64).sum();
            // |x_i − x̂_i| ≤ d_b/2, so the products differ by at most Σ |w_i|·d_b/2.
            let bound: f32 = row
                .iter()
                .enumerate()
                .map(|(i, w)| w.abs() * act.scales[i / BLOCK] / 2.0)
                .sum();
            let tol = bound * 1.001 + 1e-5 * magnitude(&m, &act, r);
            assert!(
                (y[r] as f64 - exact).abs() <= tol as f64,
                "{bits}-bit g{group} row {r}: {} vs {exact} (bound {bound})",
                y[r]
            );
        }
    }
}

fn random_factor(rng: &mut StdRng, rows: usize, cols: usize, dtype: FactorDtype) -> Factor {
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| rng.random_range(-0.3..0.3))
        .collect();
    Factor::quantize(&v, cols, dtype)
}

#[test]
fn factor_dots_match_the_scalar_twin() {
    let mut rng = StdRng::seed_from_u64(4);
    for dtype in [FactorDtype::F16, FactorDtype::Int8] {
        for len in [1, 7, 8, 31, 32, 33, 100, 576] {
            let f = random_factor(&mut rng, 3, len, dtype);
            let v = random_activation(&mut rng, len);
            for r in 0..3 {
                let want = reference::factor_row_dot((&f).into(), r, &v);
                let mag: f32 = f.to_f32()[r * len..(r + 1) * len]
                    .iter()
                    .zip(&v)
                    .map(|(a, b)| (a * b).abs())
                    .sum();
                for isa in Isa::available() {
                    let got = factor_row_dot((&f).into(), r, &v, isa);
                    assert!(
                        (got - want).abs() <= 1e-5 * mag + 1e-30,
                        "{} {} len {len}: {got} vs {want}",
                        isa.name(),
                        dtype.name()
                    );
                }
            }
        }
    }
}

#[test]
fn tiled_up_projection_matches_the_row_dots() {
    let mut rng = StdRng::seed_from_u64(8);
    for dtype in [FactorDtype::F16, FactorDtype::Int8] {
        for (rows, rank) in [(13, 1), (8, 7), (37, 16), (20, 33)] {
            let a = random_factor(&mut rng, rows, rank, dtype);
            let af = a.to_f32();
            let v = random_activation(&mut rng, rank);
            let tiled = TiledFactor::new((&a).into(), rows, rank);
            for isa in Isa::available() {
                // From an unaligned first row, as a part of the rows may start.
                let mut y: Vec<f32> = (0..rows - 3).map(|i| i as f32).collect();
                add_low_rank(LowRankEpilogue { a: &tiled, v: &v }, 3, &mut y, isa);
                for (i, got) in y.iter().enumerate() {
                    let r = i + 3;
                    let want = i as f32 + reference::factor_row_dot((&a).into(), r, &v);
                    let mag = i as f32
                        + (0..rank)
                            .map(|k| (af[r * rank + k] * v[k]).abs())
                            .sum::<f32>();
                    assert!(
                        (got - want).abs() <= 1e-5 * mag,
                        "{} {} [{rows}x{rank}] row {r}: {got} vs {want}",
                        isa.name(),
                        dtype.name()
                    );
                }
            }
        }
    }
}

#[test]
fn fused_epilogue_equals_the_unfused_passes() {
    let mut rng = StdRng::seed_from_u64(5);
    let (rows, cols, rank) = (300, 576, 32);
    for dtype in [FactorDtype::F16, FactorDtype::Int8] {
        let m = random_matrix(&mut rng, GridSpec::new(3, 128, false).unwrap(), rows, cols);
        let a = random_factor(&mut rng, rows, rank, dtype);
        let b = random_factor(&mut rng, rank, cols, dtype);
        let x = random_activation(&mut rng, cols);
        let act = QuantizedActivation::quantize(&x);
        for isa in Isa::available() {
            let mut v = vec![0f32; rank];
            let mut fused = vec![0f32; rows];
            let tiled = TiledFactor::new((&a).into(), rows, rank);
            let (af, bf) = (&tiled, (&b).into());
            let branch = LowRankFactors { a: af, b: bf };
            packed_matvec_low_rank(&m, &act, &x, branch, None, &mut fused, &mut v, isa);
            // The same as the single-threaded row kernel with an explicit epilogue.
            let mut rows_only = vec![0f32; rows];
            let epilogue = LowRankEpilogue { a: af, v: &v };
            let sums = act.group_sums(128);
            packed_rows(
                &m,
                &act,
                &sums,
                0,
                &mut rows_only,
                Epilogue::low_rank(epilogue),
                isa,
            );
            assert_eq!(fused, rows_only, "{}", isa.name());
            let mut v = vec![0f32; rank];
            factor_matvec(bf, &x, &mut v, isa);
            let mut unfused = vec![0f32; rows];
            packed_matvec(&m, &act, &mut unfused, Epilogue::default(), isa);
            factor_matvec_add(&tiled, &v, &mut unfused, isa);
            // Up to the rounding of one addition per row.
            for (f, u) in fused.iter().zip(&unfused) {
                assert!((f - u).abs() <= 1e-6 * (f.abs() + u.abs()), "{f} vs {u}");
            }
            // And the branch is really there: (A·B)·x from f32 factors.
            let (af, bf) = (a.to_f32(), b.to_f32());
            let mut plain = vec![0f32; rows];
            packed_matvec(&m, &act, &mut plain, Epilogue::default(), isa);
            for r in 0..rows {
                let branch: f32 = (0..rank)
                    .map(|k| {
                        af[r * rank + k] * (0..cols).map(|j| bf[k * cols + j] * x[j]).sum::<f32>()
                    })
                    .sum();
                let got = fused[r] - plain[r];
                assert!(
                    (got - branch).abs() <= 1e-3 * (1.0 + branch.abs()),
                    "row {r}: {got} vs {branch}"
                );
            }
        }
    }
}

#[test]
fn threaded_product_equals_the_row_kernel() {
    let mut rng = StdRng::seed_from_u64(6);
    let m = random_matrix(&mut rng, GridSpec::new(4, 128, false).unwrap(), 4864, 896);
    let act = QuantizedActivation::quantize(&random_activation(&mut rng, 896));
    for isa in Isa::available() {
        let mut whole = vec![0f32; m.rows];
        packed_rows(
            &m,
            &act,
            &act.group_sums(128),
            0,
            &mut whole,
            Epilogue::default(),
            isa,
        );
        let mut threaded = vec![0f32; m.rows];
        packed_matvec(&m, &act, &mut threaded, Epilogue::default(), isa);
        assert_eq!(whole, threaded, "{}", isa.name());
    }
}

#[test]
fn prefill_gemm_equals_decode_formula_token_by_token() {
    let mut rng = StdRng::seed_from_u64(7);
    // 7 tokens: a pass of 4 and one of 3; row counts that leave a part-filled last tile.
    let n = 7;
    for (bits, group, sym, rows, cols) in configs() {
        if !prefill::integer_gemm_supports(bits) {
            continue;
        }
        let m = random_matrix(
            &mut rng,
            GridSpec::new(bits, group, sym).unwrap(),
            rows,
            cols,
        );
        let x = random_activation(&mut rng, n * cols);
        for isa in Isa::available() {
            let mut got = vec![f32::NAN; n * rows];
            prefill::integer_gemm(&m, &x, n, &mut got, isa);
            for t in 0..n {
                let act = QuantizedActivation::quantize(&x[t * cols..(t + 1) * cols]);
                let mut want = vec![0f32; rows];
                reference::packed_rows(&m, &act, &act.group_sums(group), 0, &mut want);
                for r in 0..rows {
                    let tol = 1e-5 * magnitude(&m, &act, r);
                    let g = got[t * rows + r];
                    assert!(
                        (g - want[r]).abs() <= tol,
                        "{} {bits}-bit g{group} sym={sym} [{rows}x{cols}] token {t} row {r}: \
                         {g} vs {}",
                        isa.name(),
                        want[r]
                    );
                }
            }
        }
    }
}

#[test]
fn prefill_without_the_integer_gemm_is_the_dequantized_product() {
    let mut rng = StdRng::seed_from_u64(17);
    let (rows, cols, n) = (1000, 576, 9);
    // 8-bit codes on any instruction set, and any width on the portable path.
    for (bits, isa) in [(8, Isa::best()), (3, Isa::Scalar)] {
        let m = random_matrix(
            &mut rng,
            GridSpec::new(bits, 64, false).unwrap(),
            rows,
            cols,
        );
        let x = random_activation(&mut rng, n * cols);
        let mut tiled = vec![f32::NAN; n * rows];
        packed_matmul(&m, &x, n, &mut tiled, isa);
        let mut whole = vec![0f32; n * rows];
        matmul_wt(&x, &m.dequantize(), &mut whole, n, cols, rows);
        for (a, b) in tiled.iter().zip(&whole) {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "{bits}-bit: {a} vs {b}"
            );
        }
    }
}

#[test]
fn residual_in_the_epilogue_equals_a_separate_pass() {
    use crate::qdec::{ResidualEpilogue, ResidualRef, add_residual, select_exact};
    let mut rng = StdRng::seed_from_u64(8);
    // Large enough to be split across the pool's threads.
    let (rows, cols, rank) = (1000, 576, 8);
    let m = random_matrix(&mut rng, GridSpec::new(4, 64, false).unwrap(), rows, cols);
    let a = random_factor(&mut rng, rows, rank, FactorDtype::F16);
    let b = random_factor(&mut rng, rank, cols, FactorDtype::F16);
    let levels: Vec<i8> = (0..rows * cols).map(|_| rng.random_range(-7..=7)).collect();
    let codes = recoup_formats::residual::pack_input_major(&levels, rows, cols);
    let scales: Vec<f16> = (0..rows)
        .map(|_| f16::from_f32(rng.random_range(0.001..0.01)))
        .collect();
    let x = random_activation(&mut rng, cols);
    let act = QuantizedActivation::quantize(&x);
    let mut channels = Vec::new();
    select_exact(&x, 32, &mut channels);
    let xs: Vec<f32> = channels.iter().map(|&i| x[i as usize]).collect();
    let selected = crate::qdec::SelectedCodes::new(&channels, &xs);
    let residual = ResidualEpilogue {
        residual: ResidualRef {
            codes: &codes,
            scales: &scales,
        },
        selected: &selected,
    };
    let tiled = TiledFactor::new((&a).into(), rows, rank);
    for isa in Isa::available() {
        let mut plain = vec![0f32; rows];
        packed_matvec(&m, &act, &mut plain, Epilogue::default(), isa);
        let mut fused = vec![0f32; rows];
        let epilogue = Epilogue {
            low_rank: None,
            residual: Some(residual),
        };
        packed_matvec(&m, &act, &mut fused, epilogue, isa);
        let mut separate = plain.clone();
        add_residual(residual, 0, &mut separate, isa);
        // Threads' slices start elsewhere, so a few outputs take the scalar tail (no FMA).
        for (f, s) in fused.iter().zip(&separate) {
            assert!(
                (f - s).abs() <= 1e-6 * (1.0 + s.abs()),
                "{}: {f} vs {s}",
                isa.name()
            );
        }
        assert!(fused != plain, "the correction changed the output");
        // Selecting inside the product's job gives the same outputs, also when the selection
        // is slow enough that the other parts finish every row before it (their blocks are
        // then corrected at the end, more of them than are kept as ranges).
        let branch = LowRankFactors {
            a: &tiled,
            b: (&b).into(),
        };
        let mut without = vec![0f32; rows];
        let mut v = vec![0f32; rank];
        packed_matvec_low_rank(&m, &act, &x, branch, None, &mut without, &mut v, isa);
        add_residual(residual, 0, &mut without, isa);
        for delay_ms in [0, 20] {
            let select = |f: &mut dyn FnMut(&SelectedCodes)| {
                std::thread::sleep(std::time::Duration::from_millis(delay_ms));
                f(&selected)
            };
            let correction = Selecting {
                residual: residual.residual,
                select: &select,
            };
            let mut selecting = vec![0f32; rows];
            packed_matvec_selecting(&m, &act, &mut selecting, correction, isa);
            for (f, s) in selecting.iter().zip(&separate) {
                assert!(
                    (f - s).abs() <= 1e-6 * (1.0 + s.abs()),
                    "{} (selection after {delay_ms} ms): {f} vs {s}",
                    isa.name()
                );
            }
            // With the low-rank branch too: the same as without the residual, plus it.
            let mut with = vec![0f32; rows];
            let c = Some(correction);
            packed_matvec_low_rank(&m, &act, &x, branch, c, &mut with, &mut v, isa);
            for (w, s) in with.iter().zip(&without) {
                assert!((w - s).abs() <= 1e-6 * (1.0 + w.abs()), "{w} vs {s}");
            }
        }
    }
}

#[test]
fn a_panicking_selection_or_a_mismatched_residual_reaches_the_caller_and_the_pool_survives() {
    let mut rng = StdRng::seed_from_u64(9);
    let (rows, cols) = (1000, 576);
    let m = random_matrix(&mut rng, GridSpec::new(3, 64, false).unwrap(), rows, cols);
    let (codes, scales) = (vec![0x88u8; rows / 2 * cols], vec![f16::ONE; rows]);
    let residual = crate::qdec::ResidualRef {
        codes: &codes,
        scales: &scales,
    };
    let act = QuantizedActivation::quantize(&random_activation(&mut rng, cols));
    let mut y = vec![0f32; rows];
    let failing = |_: &mut dyn FnMut(&SelectedCodes)| panic!("no selection");
    let failing = Selecting {
        residual,
        select: &failing,
    };
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        packed_matvec_selecting(&m, &act, &mut y, failing, Isa::best());
    }));
    assert!(caught.is_err());
    // The same inside the low-rank job, after its barrier.
    let rank = 4;
    let a = random_factor(&mut rng, rows, rank, FactorDtype::F16);
    let b = random_factor(&mut rng, rank, cols, FactorDtype::F16);
    let tiled = TiledFactor::new((&a).into(), rows, rank);
    let branch = LowRankFactors {
        a: &tiled,
        b: (&b).into(),
    };
    let x = random_activation(&mut rng, cols);
    let mut v = vec![0f32; rank];
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        packed_matvec_low_rank(
            &m,
            &act,
            &x,
            branch,
            Some(failing),
            &mut y,
            &mut v,
            Isa::best(),
        );
    }));
    assert!(caught.is_err());
    // An activation of another width is refused before the job starts: inside it, the
    // parts' products would panic and leave the others waiting for the correction.
    let narrow = QuantizedActivation::quantize(&random_activation(&mut rng, cols - 64));
    let selected = crate::qdec::SelectedCodes::new(&[3, 7], &[0.5, -0.25]);
    let select = |f: &mut dyn FnMut(&SelectedCodes)| f(&selected);
    let correction = Selecting {
        residual,
        select: &select,
    };
    let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        packed_matvec_selecting(&m, &narrow, &mut y, correction, Isa::best());
    }));
    assert!(refused.is_err());
    let mut again = vec![0f32; rows];
    packed_matvec(&m, &act, &mut again, Epilogue::default(), Isa::best());
    assert!(again.iter().any(|&v| v != 0.0));
}
