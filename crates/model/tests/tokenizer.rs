//! GGUF byte-level BPE tokenizers against llama.cpp's own tokenizer (`llama-tokenize`) on
//! real text from four corpora (tools/fixtures/tokenizer_golden.py). Qwen2's vocabulary comes
//! from a tokenizer-only GGUF fixture, so CI needs no Qwen download.

use recoup_formats::gguf::GgufFile;
use recoup_model::Tokenizer;
use std::io::Read;

#[derive(serde::Deserialize)]
struct Case {
    source: String,
    text: String,
    ids: Vec<u32>,
}

fn check(tokenizer: &Tokenizer, fixture: &str) {
    let cases: Vec<Case> = serde_json::from_str(fixture).unwrap();
    assert_eq!(cases.len(), 4);
    for case in cases {
        assert!(
            case.ids.len() > 200,
            "{}: fixture too small to mean much",
            case.source
        );
        let ids = tokenizer.encode(&case.text, false).unwrap();
        if ids != case.ids {
            let at = ids
                .iter()
                .zip(&case.ids)
                .position(|(a, b)| a != b)
                .unwrap_or(ids.len().min(case.ids.len()));
            panic!(
                "{}: ids differ from llama.cpp at index {at}: recoup {:?} vs llama.cpp {:?}",
                case.source,
                &ids[at..(at + 5).min(ids.len())],
                &case.ids[at..(at + 5).min(case.ids.len())]
            );
        }
        assert_eq!(
            tokenizer.decode(&ids).unwrap(),
            case.text,
            "{}: decode round trip",
            case.source
        );
    }
}

#[test]
fn smollm_pre_tokenizer_matches_llama_cpp() {
    let path = recoup_assets::resolve("smollm2-135m", recoup_assets::AssetKind::Model).unwrap();
    let tokenizer = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    check(&tokenizer, include_str!("fixtures/tokenizer_smollm.json"));
}

#[test]
fn qwen2_pre_tokenizer_matches_llama_cpp() {
    let mut gguf = Vec::new();
    flate2::read::GzDecoder::new(&include_bytes!("fixtures/qwen2_vocab.gguf.gz")[..])
        .read_to_end(&mut gguf)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qwen2-vocab.gguf");
    std::fs::write(&path, gguf).unwrap();
    let tokenizer = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    assert!(!tokenizer.add_bos);
    check(&tokenizer, include_str!("fixtures/tokenizer_qwen2.json"));
}

#[test]
fn control_tokens_are_text_unless_asked() {
    let path = recoup_assets::resolve("smollm2-135m", recoup_assets::AssetKind::Model).unwrap();
    let tokenizer = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    let chat = tokenizer.encode("<|im_start|>user", true).unwrap();
    let plain = tokenizer.encode("<|im_start|>user", false).unwrap();
    assert_eq!(
        chat.len(),
        2,
        "the control token is one id when parsed: {chat:?}"
    );
    assert!(
        plain.len() > 2,
        "and spelled out as text otherwise: {plain:?}"
    );
}
