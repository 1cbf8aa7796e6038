//! Every ggml type recoup reads, dequantized by the scalar reference and compared bit-exactly
//! with values computed independently by the `gguf` Python package
//! (`tools/fixtures/ggml_blocks.py`). Real model blocks where a model stores the type.

use recoup_formats::ggml::GgmlType;

#[derive(serde::Deserialize)]
struct Fixture {
    #[serde(rename = "type")]
    ggml_type: String,
    origin: String,
    raw_hex: String,
    expected: Vec<f64>,
}

fn type_by_name(name: &str) -> GgmlType {
    (0..64)
        .filter_map(|id| GgmlType::from_id(id).ok())
        .find(|t| t.name() == name)
        .unwrap_or_else(|| panic!("fixture type {name} is not a recoup type"))
}

#[test]
fn dequantization_matches_gguf_py_for_every_type() {
    let fixtures: Vec<Fixture> =
        serde_json::from_str(include_str!("fixtures/ggml_blocks.json")).expect("fixture parses");
    let names: Vec<&str> = fixtures.iter().map(|f| f.ggml_type.as_str()).collect();
    for want in [
        "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K",
    ] {
        assert!(names.contains(&want), "fixture lacks {want}");
    }
    for f in &fixtures {
        let t = type_by_name(&f.ggml_type);
        let raw: Vec<u8> = (0..f.raw_hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&f.raw_hex[i..i + 2], 16).unwrap())
            .collect();
        assert_eq!(
            t.bytes_for(f.expected.len()),
            Some(raw.len()),
            "{} block size",
            t.name()
        );
        let mut got = vec![0f32; f.expected.len()];
        t.dequantize(&raw, &mut got);
        assert!(
            got.iter().any(|&v| v != 0.0),
            "{}: all-zero blocks prove nothing",
            t.name()
        );
        for (i, (&g, &e)) in got.iter().zip(&f.expected).enumerate() {
            assert_eq!(
                g,
                e as f32,
                "{} ({}) element {i}: recoup {g}, gguf-py {e}",
                t.name(),
                f.origin
            );
        }
    }
}
