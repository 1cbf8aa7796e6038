//! Selection against sorting, the bucket selector against exact top-k, and every SIMD
//! residual kernel against its scalar twin and against the dense product, on random data.

use super::*;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// Activations with a few outliers (distinct magnitudes almost surely).
fn activation(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let v: f32 = rng.random_range(-1.0..1.0);
            if rng.random_bool(0.02) { v * 30.0 } else { v }
        })
        .collect()
}

#[test]
fn budgets_split_partial_chunks_proportionally() {
    assert_eq!(chunk_budget(8, 1024), 8);
    assert_eq!(chunk_budget(8, 896), 7);
    assert_eq!(chunk_budget(16, 576), 9);
    assert_eq!(chunk_budget(0, 1024), 0);
    assert_eq!(chunk_budget(2048, 100), 100);
    // 4864 = 4 whole chunks and 768 channels.
    assert_eq!(total_budget(8, 4864), 4 * 8 + 6);
}

#[test]
fn exact_selection_is_the_top_k_of_every_chunk_by_sorting() {
    let mut rng = StdRng::seed_from_u64(1);
    let cases = [(4864, 8), (896, 16), (576, 64), (2048, 1), (1024, 1024)];
    for (case, (n, k_chunk)) in cases.into_iter().chain([(1024, 8), (3000, 12)]).enumerate() {
        let mut x = activation(&mut rng, n);
        if case >= cases.len() {
            // The largest values crowd into the first strided groups (one bin of the group
            // maxima), with one of them negative, and one more far out.
            for (i, v) in x.iter_mut().take(40).enumerate() {
                *v = 50.0 + i as f32;
            }
            x[3] = -x[3];
            x[n - 1] = 500.0;
        }
        let mut got = Vec::new();
        select_exact(&x, k_chunk, &mut got);
        let mut expected = Vec::new();
        for c0 in (0..n).step_by(CHUNK) {
            let mut idx: Vec<u32> = (c0 as u32..(c0 + CHUNK).min(n) as u32).collect();
            idx.sort_by(|&a, &b| x[b as usize].abs().total_cmp(&x[a as usize].abs()));
            expected.extend_from_slice(&idx[..chunk_budget(k_chunk, idx.len())]);
        }
        got.sort_unstable();
        expected.sort_unstable();
        assert_eq!(got, expected, "case {case}: n {n} k_chunk {k_chunk}");
    }
}

#[test]
fn bucket_selection_agrees_with_exact_top_k_outside_the_boundary_bucket() {
    let mut rng = StdRng::seed_from_u64(2);
    for (n, k_chunk) in [(4864, 8), (896, 16), (1536, 32), (3072, 4)] {
        // Thresholds as calibration would give them: the max, and a k-th order statistic.
        let calib = activation(&mut rng, n);
        let mut sorted: Vec<f32> = calib.iter().map(|v| v.abs()).collect();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let k = total_budget(k_chunk, n);
        let floors = BucketFloors::new(sorted[0], sorted[k - 1]);
        for trial in 0..20 {
            let mut x = activation(&mut rng, n);
            if trial % 4 == 0 {
                x[trial] = 500.0; // beyond anything calibration saw: the open top bucket
            }
            let mut got = Vec::new();
            select_bucket(&x, k_chunk, &floors, &mut got);
            for c0 in (0..n).step_by(CHUNK) {
                let c1 = (c0 + CHUNK).min(n);
                let chosen: Vec<u32> = got
                    .iter()
                    .copied()
                    .filter(|&i| (c0..c1).contains(&(i as usize)))
                    .collect();
                assert_eq!(chosen.len(), chunk_budget(k_chunk, c1 - c0), "exact count");
                let boundary = chosen
                    .iter()
                    .map(|&i| floors.bucket(x[i as usize].abs()))
                    .max()
                    .unwrap();
                for (i, v) in x.iter().enumerate().take(c1).skip(c0) {
                    let b = floors.bucket(v.abs());
                    let selected = chosen.contains(&(i as u32));
                    // Everything above the boundary bucket is selected; nothing below it.
                    assert!(
                        b >= boundary || selected,
                        "channel {i} in bucket {b} missed"
                    );
                    assert!(
                        b <= boundary || !selected,
                        "channel {i} in bucket {b} taken"
                    );
                }
            }
        }
    }
}

#[test]
fn bucket_floors_follow_the_paper() {
    let f = BucketFloors::new(10.0, 2.0);
    assert_eq!(f.floors[0], 10.0);
    assert!((f.floors[15] - 2.0).abs() < 1e-6);
    assert!((f.floors[16] - 2.0 * 15.0 / 16.0).abs() < 1e-6);
    assert_eq!(f.floors[31], 0.0);
    assert_eq!(f.bucket(11.0), 0);
    assert_eq!(f.bucket(10.0), 0);
    assert_eq!(f.bucket(9.99), 1);
    assert_eq!(f.bucket(2.0), 15);
    assert_eq!(f.bucket(0.0), 31);
}

#[test]
fn the_bucket_is_the_first_floor_reached_on_edges_and_random_magnitudes() {
    let mut rng = StdRng::seed_from_u64(11);
    let by_search =
        |f: &BucketFloors, v: f32| f.floors.partition_point(|&x| x > v).min(BUCKETS - 1);
    let mut floors = vec![
        BucketFloors::new(10.0, 2.0),
        BucketFloors::new(3.0, 3.0),
        BucketFloors::new(5.0, 0.0),
        BucketFloors::new(0.0, 0.0),
        BucketFloors::new(1e-30, 1e-31),
    ];
    for _ in 0..50 {
        let t_a = rng.random_range(0.01f32..100.0);
        floors.push(BucketFloors::new(t_a, t_a * rng.random_range(0.0f32..1.0)));
    }
    for f in &floors {
        let mut values: Vec<f32> = f.floors.to_vec();
        values.extend(
            f.floors
                .iter()
                .flat_map(|&x| [x.next_up(), x.next_down().max(0.0)]),
        );
        values.extend((0..200).map(|_| rng.random_range(0.0..1.2 * f.floors[0].max(1e-3))));
        values.extend([0.0, f32::INFINITY, f32::NAN, f32::MAX]);
        for v in values {
            assert_eq!(f.bucket(v), by_search(f, v), "{v} in {:?}", f.floors);
        }
    }
}

#[test]
fn random_selection_draws_distinct_channels_in_each_chunk() {
    for seed in 0..50 {
        let mut got = Vec::new();
        select_random(2500, 16, seed, &mut got);
        assert_eq!(got.len(), total_budget(16, 2500));
        for c0 in (0..2500).step_by(CHUNK) {
            let mut chunk: Vec<u32> = got
                .iter()
                .copied()
                .filter(|&i| (c0..c0 + CHUNK).contains(&(i as usize)))
                .collect();
            assert_eq!(chunk.len(), chunk_budget(16, (2500 - c0).min(CHUNK)));
            chunk.sort_unstable();
            chunk.dedup();
            assert_eq!(
                chunk.len(),
                chunk_budget(16, (2500 - c0).min(CHUNK)),
                "distinct"
            );
        }
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    select_random(1024, 8, 1, &mut a);
    select_random(1024, 8, 2, &mut b);
    assert_ne!(a, b, "seeds vary the draw");
}

struct Residual {
    codes: Vec<u8>,
    scales: Vec<half::f16>,
    levels: Vec<i8>, // [rows, cols]
}

impl Residual {
    fn epilogue<'a>(&'a self, selected: &'a SelectedCodes) -> ResidualEpilogue<'a> {
        ResidualEpilogue {
            residual: ResidualRef {
                codes: &self.codes,
                scales: &self.scales,
            },
            selected,
        }
    }
}

fn residual(rng: &mut StdRng, rows: usize, cols: usize) -> Residual {
    let levels: Vec<i8> = (0..rows * cols).map(|_| rng.random_range(-7..=7)).collect();
    let codes = recoup_formats::residual::pack_input_major(&levels, rows, cols);
    let scales = (0..rows)
        .map(|_| half::f16::from_f32(rng.random_range(0.001..0.02)))
        .collect();
    Residual {
        codes,
        scales,
        levels,
    }
}

#[test]
fn simd_residual_matches_scalar_and_the_dense_product() {
    let mut rng = StdRng::seed_from_u64(3);
    for (rows, cols, k_chunk) in [
        (896, 896, 8),
        (4864, 896, 64),
        (2050, 1536, 16),
        (6, 40, 1024),
    ] {
        let r = residual(&mut rng, rows, cols);
        let x = activation(&mut rng, cols);
        let mut channels = Vec::new();
        select_exact(&x, k_chunk, &mut channels);
        let xs: Vec<f32> = channels.iter().map(|&i| x[i as usize]).collect();
        let selected = SelectedCodes::new(&channels, &xs);
        let e = r.epilogue(&selected);
        let base: Vec<f32> = (0..rows).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut scalar = base.clone();
        add_residual(e, 0, &mut scalar, Isa::Scalar);
        check_against_dense(&r, cols, &channels, &x, &base, &scalar);
        for isa in Isa::available() {
            // Whole, and in slices starting on even outputs; the same integer sums, so equal
            // to the scalar twin up to the order of a few float operations.
            for split in [rows, rows / 2 / 16 * 16, 96, 2] {
                let mut y = base.clone();
                let (a, b) = y.split_at_mut(split.min(rows));
                add_residual(e, 0, a, isa);
                add_residual(e, a.len(), b, isa);
                for (o, (v, s)) in y.iter().zip(&scalar).enumerate() {
                    assert!(
                        (v - s).abs() <= 1e-6 * (1.0 + s.abs()),
                        "{} rows {rows} split {split} row {o}: {v} vs {s}",
                        isa.name()
                    );
                }
            }
            // Written over whatever the buffer held: the correction alone.
            let mut only = vec![f32::NAN; rows];
            residual_into(e, 0, &mut only, isa);
            for (o, ((c, s), b)) in only.iter().zip(&scalar).zip(&base).enumerate() {
                assert!(
                    (c - (s - b)).abs() <= 1e-5 * (1.0 + s.abs()),
                    "{} rows {rows} correction alone, row {o}: {c} vs {}",
                    isa.name(),
                    s - b
                );
            }
        }
    }
}

#[test]
fn all_channels_and_exact_levels_give_the_full_residual_product() {
    // k = every channel: the correction is the whole R̂·x.
    let mut rng = StdRng::seed_from_u64(4);
    let (rows, cols) = (64, 2048);
    let r = residual(&mut rng, rows, cols);
    let x = activation(&mut rng, cols);
    let mut channels = Vec::new();
    select_exact(&x, CHUNK, &mut channels);
    assert_eq!(channels.len(), cols);
    let xs: Vec<f32> = channels.iter().map(|&i| x[i as usize]).collect();
    let mut y = vec![0f32; rows];
    let selected = SelectedCodes::new(&channels, &xs);
    add_residual(r.epilogue(&selected), 0, &mut y, Isa::best());
    check_against_dense(&r, cols, &channels, &x, &vec![0.0; rows], &y);
}

/// `y` against `base + diag(scale)·L[:, S]·x_S` in f64, within what rounding the selected
/// activations to 8 bits (one scale `d`) can change: `scale_o · Σ_S d/2 · |level|`.
fn check_against_dense(
    r: &Residual,
    cols: usize,
    channels: &[u32],
    x: &[f32],
    base: &[f32],
    y: &[f32],
) {
    let d = channels
        .iter()
        .fold(0f32, |m, &i| m.max(x[i as usize].abs())) as f64
        / 127.0;
    let (mut err, mut size) = (0f64, 0f64);
    for (o, (&yo, &b)) in y.iter().zip(base).enumerate() {
        let level = |i: u32| r.levels[o * cols + i as usize] as f64;
        let dot: f64 = channels
            .iter()
            .map(|&i| x[i as usize] as f64 * level(i))
            .sum();
        let slack: f64 = channels.iter().map(|&i| d / 2.0 * level(i).abs()).sum();
        let (want, s) = (b as f64 + r.scales[o].to_f64() * dot, r.scales[o].to_f64());
        let bound = s * slack + 1e-5 * (1.0 + want.abs());
        assert!(
            (yo as f64 - want).abs() <= bound,
            "row {o}: {yo} vs {want} ± {bound}"
        );
        err += (yo as f64 - want).abs();
        size += (s * dot).abs();
    }
    // Overall the rounding is a small part of the correction.
    assert!(
        err <= 0.01 * size,
        "error {err} against a correction of {size}"
    );
}
