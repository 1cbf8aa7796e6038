//! GPTQ against a float64 numpy port of the reference implementation
//! (`tools/fixtures/gptq_reference.py`): the same codes, up to rare flips where f32 and f64
//! round a value that sits on a rounding boundary differently.

use recoup_formats::packed::GridSpec;
use recoup_quant::gptq::{GptqOptions, gptq};

#[derive(serde::Deserialize)]
struct Case {
    bits: u32,
    group: usize,
    block: usize,
    act_order: bool,
    dequantized: Vec<f32>,
}

#[derive(serde::Deserialize)]
struct Fixture {
    rows: usize,
    cols: usize,
    w: Vec<f32>,
    h: Vec<f64>,
    cases: Vec<Case>,
}

#[test]
fn gptq_matches_the_reference_loop() {
    let f: Fixture =
        serde_json::from_str(include_str!("fixtures/gptq_reference.json")).expect("fixture");
    for c in &f.cases {
        let spec = GridSpec::new(c.bits, c.group, false).unwrap();
        let opts = GptqOptions {
            block: c.block,
            damp: 0.01,
            act_order: c.act_order,
        };
        let ours = gptq(&f.w, f.rows, f.cols, &f.h, &spec, &opts)
            .unwrap()
            .dequantize();
        let differ = ours
            .iter()
            .zip(&c.dequantized)
            .filter(|(a, b)| (*a - *b).abs() > 1e-6 * (1.0 + b.abs()))
            .count();
        assert!(
            differ * 200 <= ours.len(),
            "{}-bit g{} block {} act_order {}: {differ} of {} weights differ from the reference",
            c.bits,
            c.group,
            c.block,
            c.act_order,
            ours.len()
        );
    }
}
