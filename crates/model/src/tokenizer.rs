//! Tokenizers, all run by the `tokenizers` crate: a Hugging Face `tokenizer.json` as it is,
//! or a byte-level BPE built from a GGUF's `tokenizer.ggml.*` metadata with the family's
//! pre-tokenizer (the regexes llama.cpp uses for `smollm`, `qwen2`, `llama-bpe`, `gpt2`).

use anyhow::{Context, Result, anyhow, bail};
use recoup_formats::gguf::GgufFile;
use serde_json::Value;
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

/// Qwen2's pattern (llama.cpp's adaptation of the tokenizer.json regex: case-insensitive
/// contractions spelled out, single digits).
const QWEN2_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's pattern: as Qwen2's, but digits in runs of up to three.
const LLAMA3_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

pub struct Tokenizer {
    /// Matches control tokens spelled in the text (chat prompts).
    inner: tokenizers::Tokenizer,
    /// Treats control-token spellings as plain text (evaluation corpora).
    plain: tokenizers::Tokenizer,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Whether a BOS token starts every encoded text (the model's own convention).
    pub add_bos: bool,
    pub chat_template: Option<String>,
}

fn tk_err(e: tokenizers::Error) -> anyhow::Error {
    anyhow!("{e}")
}

impl Tokenizer {
    /// Builds the byte-level BPE a GGUF describes.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let path = file.path().display();
        let model = file.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            bail!(
                "{path}: tokenizer model '{model}' is not supported (recoup builds byte-level BPE, 'gpt2', from GGUF)"
            );
        }
        let pre = file
            .get("tokenizer.ggml.pre")
            .map(|_| file.get_str("tokenizer.ggml.pre"))
            .transpose()?
            .unwrap_or("default");
        let tokens = file.get_str_array("tokenizer.ggml.tokens")?;
        let types: Vec<i64> = match file.get("tokenizer.ggml.token_type") {
            Some(_) => file
                .get_array("tokenizer.ggml.token_type")?
                .iter()
                .map(|v| v.as_f64().map(|f| f as i64).unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            bail!(
                "{path}: {} token types for {} tokens",
                types.len(),
                tokens.len()
            );
        }
        let merges = file
            .get_str_array("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| anyhow!("{path}: malformed merge '{m}'"))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut vocab = Vocab::default();
        for (id, tok) in tokens.iter().enumerate() {
            vocab.insert(tok.to_string(), id as u32);
        }
        let (pre_tokenizer, ignore_merges, default_add_bos) =
            pre_tokenizer_for(pre).with_context(|| format!("{path}"))?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(|e| anyhow!("{path}: cannot build the BPE tokenizer: {e}"))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        // Control tokens are special (matched in text only when asked); user-defined tokens
        // are always matched, as llama.cpp does.
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| matches!(**t, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
            .map(|(tok, &t)| AddedToken::from(tok.to_string(), t == TOKEN_TYPE_CONTROL))
            .collect();
        inner.add_tokens(added).map_err(tk_err)?;
        let id = |k: &str| file.get(k).and_then(|v| v.as_u64()).map(|v| v as u32);
        let add_bos = match file.get("tokenizer.ggml.add_bos_token") {
            Some(_) => file.get_bool("tokenizer.ggml.add_bos_token")?,
            None => default_add_bos,
        };
        let chat_template = file
            .get("tokenizer.chat_template")
            .map(|_| file.get_str("tokenizer.chat_template").map(String::from))
            .transpose()?;
        Ok(Self::new(
            inner,
            id("tokenizer.ggml.bos_token_id"),
            id("tokenizer.ggml.eos_token_id"),
            add_bos,
            chat_template,
        ))
    }

    /// Loads `tokenizer.json` (and `tokenizer_config.json` for BOS/EOS, `add_bos_token` and
    /// the chat template) from a Hugging Face directory.
    pub fn from_hf_dir(dir: &Path, config: &Value) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow!("cannot load {}: {e}", path.display()))?;
        let tk_config_path = dir.join("tokenizer_config.json");
        let tk_config: Value = if tk_config_path.exists() {
            let text = std::fs::read_to_string(&tk_config_path)?;
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", tk_config_path.display()))?
        } else {
            Value::Null
        };
        // Special tokens are named either as strings or as {"content": …} objects.
        let token_id = |key: &str| {
            let v = tk_config.get(key)?;
            let text = v
                .as_str()
                .or_else(|| v.get("content").and_then(Value::as_str))?;
            inner.token_to_id(text)
        };
        let config_id = |key: &str| config.get(key).and_then(Value::as_u64).map(|v| v as u32);
        let bos = token_id("bos_token").or_else(|| config_id("bos_token_id"));
        let eos = token_id("eos_token").or_else(|| config_id("eos_token_id"));
        let add_bos = tk_config
            .get("add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let chat_template = tk_config
            .get("chat_template")
            .and_then(Value::as_str)
            .map(String::from);
        Ok(Self::new(inner, bos, eos, add_bos, chat_template))
    }

    fn new(
        inner: tokenizers::Tokenizer,
        bos: Option<u32>,
        eos: Option<u32>,
        add_bos: bool,
        chat_template: Option<String>,
    ) -> Self {
        let mut plain = inner.clone();
        plain.set_encode_special_tokens(true);
        Self {
            inner,
            plain,
            bos,
            eos,
            add_bos,
            chat_template,
        }
    }

    /// Token ids of `text`, without BOS. With `parse_special`, control-token text such as
    /// `<|im_start|>` becomes the control token (chat prompts); otherwise it is plain text
    /// (evaluation corpora).
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let tokenizer = if parse_special {
            &self.inner
        } else {
            &self.plain
        };
        Ok(tokenizer
            .encode_fast(text, false)
            .map_err(tk_err)?
            .get_ids()
            .to_vec())
    }

    /// `encode`, with the model's BOS first when the model adds one.
    pub fn encode_with_bos(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if self.add_bos
            && let Some(bos) = self.bos
        {
            ids.push(bos);
        }
        ids.extend(self.encode(text, parse_special)?);
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(tk_err)
    }

    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Incremental decoding for streamed generation: yields text once it forms whole chars.
    pub fn stream(&self) -> TokenStream<'_> {
        TokenStream {
            tokenizer: self,
            ids: Vec::new(),
            emitted: 0,
        }
    }

    /// `tokenizer.json` text, for exporting.
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(true).map_err(tk_err)
    }

    /// `tokenizer_config.json` for exporting, so transformers knows BOS/EOS and the template.
    pub fn hf_tokenizer_config(&self) -> Value {
        let text = |id: Option<u32>| id.and_then(|i| self.inner.id_to_token(i));
        serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": text(self.bos),
            "eos_token": text(self.eos),
            "add_bos_token": self.add_bos,
            "add_eos_token": false,
            "chat_template": self.chat_template,
            "clean_up_tokenization_spaces": false,
        })
    }
}

/// The pre-tokenizer of a llama.cpp `tokenizer.ggml.pre` family, whether merges are ignored
/// when a word is itself a token (Llama 3), and the family's default for adding BOS.
fn pre_tokenizer_for(pre: &str) -> Result<(PreTokenizerWrapper, bool, bool)> {
    let byte_level_regex = || ByteLevel::new(false, true, true).into();
    let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(pattern.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(tk_err)?;
        Ok(Sequence::new(vec![
            split.into(),
            ByteLevel::new(false, false, false).into(),
        ])
        .into())
    };
    Ok(match pre {
        "smollm" | "starcoder" | "refact" => (
            Sequence::new(vec![Digits::new(true).into(), byte_level_regex()]).into(),
            false,
            false,
        ),
        "qwen2" => (split(QWEN2_PATTERN)?, false, false),
        "llama3" | "llama-v3" | "llama-bpe" => (split(LLAMA3_PATTERN)?, true, true),
        "gpt2" | "default" => (byte_level_regex(), false, false),
        other => bail!(
            "pre-tokenizer '{other}' is not supported (recoup knows smollm, qwen2, llama-bpe, gpt2)"
        ),
    })
}

pub struct TokenStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    emitted: usize,
}

impl TokenStream<'_> {
    /// Adds a token; returns the text it completes (empty while a UTF-8 sequence is partial).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let new = text.get(self.emitted..).unwrap_or_default().to_string();
        self.emitted = self.emitted.max(text.len());
        Ok(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

    /// The pieces a family's pre-tokenizer cuts `text` into, byte-level encoded (space = Ġ).
    fn pieces(family: &str, text: &str) -> Vec<String> {
        let (pre, _, _) = pre_tokenizer_for(family).unwrap();
        let mut s = PreTokenizedString::from(text);
        pre.pre_tokenize(&mut s).unwrap();
        s.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(p, _, _)| p.to_string())
            .collect()
    }

    #[test]
    fn families_split_digits_and_contractions_as_their_models_do() {
        // Llama 3: digit runs of up to three; case-insensitive contractions.
        assert_eq!(
            pieces("llama-bpe", "12345 IT'S"),
            ["123", "45", "ĠIT", "'S"]
        );
        // Qwen2: single digits.
        assert_eq!(
            pieces("qwen2", "2024 it's"),
            ["2", "0", "2", "4", "Ġit", "'s"]
        );
        // SmolLM: single digits, then GPT-2's pattern (case-sensitive contractions).
        assert_eq!(pieces("smollm", "42 it's"), ["4", "2", "Ġit", "'s"]);
        // GPT-2: digit runs stay whole.
        assert_eq!(pieces("gpt2", "2024 it's"), ["2024", "Ġit", "'s"]);
        assert!(pre_tokenizer_for("bloom").is_err());
    }
}
