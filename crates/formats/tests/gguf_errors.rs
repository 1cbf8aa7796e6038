//! Bad GGUF files give errors that name the file and the problem, never a panic.

use recoup_formats::gguf::GgufFile;
use std::path::Path;

/// A minimal valid GGUF v3: one metadata key and one 32-element Q8_0 tensor.
fn tiny_gguf(tensor_type: u32) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes()); // tensors
    b.extend_from_slice(&1u64.to_le_bytes()); // metadata
    let key = b"general.architecture";
    b.extend_from_slice(&(key.len() as u64).to_le_bytes());
    b.extend_from_slice(key);
    b.extend_from_slice(&8u32.to_le_bytes());
    b.extend_from_slice(&5u64.to_le_bytes());
    b.extend_from_slice(b"llama");
    let name = b"w";
    b.extend_from_slice(&(name.len() as u64).to_le_bytes());
    b.extend_from_slice(name);
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&32u64.to_le_bytes());
    b.extend_from_slice(&tensor_type.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b.extend_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
    b.extend((0..32).map(|i| (i as i8 - 16) as u8));
    b
}

fn open_bytes(bytes: &[u8]) -> (tempfile::TempDir, Result<GgufFile, String>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, bytes).unwrap();
    let r = GgufFile::open(Path::new(&path)).map_err(|e| format!("{e:#}"));
    (dir, r)
}

#[test]
fn valid_tiny_file_reads() {
    let (_d, f) = open_bytes(&tiny_gguf(8));
    let f = f.unwrap();
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    let t = f.tensor_f32("w").unwrap();
    assert_eq!(t.shape, vec![32]);
    assert_eq!(t.data[0], -8.0);
    assert_eq!(t.data[31], 7.5);
}

#[test]
fn every_truncation_is_an_error_naming_the_file() {
    let full = tiny_gguf(8);
    for len in 0..full.len() {
        let (_d, r) = open_bytes(&full[..len]);
        let err = r
            .err()
            .unwrap_or_else(|| panic!("truncated to {len} bytes but accepted"));
        assert!(err.contains("model.gguf"), "{err}");
        assert!(
            err.contains("truncated") || err.contains("magic") || err.contains("corrupt"),
            "{err}"
        );
    }
}

#[test]
fn wrong_magic_is_refused() {
    let mut bytes = tiny_gguf(8);
    bytes[0..4].copy_from_slice(b"GGML");
    let err = open_bytes(&bytes).1.err().unwrap();
    assert!(err.contains("not a GGUF file"), "{err}");
}

#[test]
fn unknown_tensor_type_is_named() {
    let err = open_bytes(&tiny_gguf(11)).1.err().unwrap();
    assert!(err.contains("Q3_K") && err.contains("tensor w"), "{err}");
    let err = open_bytes(&tiny_gguf(999)).1.err().unwrap();
    assert!(err.contains("999"), "{err}");
}

#[test]
fn absurd_counts_are_refused_without_allocating() {
    let mut bytes = tiny_gguf(8);
    bytes[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let err = open_bytes(&bytes).1.err().unwrap();
    assert!(err.contains("corrupt"), "{err}");
}
