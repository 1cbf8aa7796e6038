//! GGUF (versions 2 and 3) over mmap: metadata, tensor table, and tensors dequantized to f32
//! under canonical Hugging Face names. Every read is bounds-checked, so a truncated or corrupt
//! file gives an error naming the file and what was being read, never a panic.

use crate::ggml::GgmlType;
use crate::{DenseDtype, Tensor, TensorSource};
use anyhow::{Context, Result, anyhow, bail};
use rayon::prelude::*;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F32(_) => "f32",
            Value::F64(_) => "f64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }

    /// Integer value of any integer type, if non-negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
}

/// One entry of the tensor table.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// Outermost dimension first (GGUF stores `ne` innermost first; this is reversed).
    pub shape: Vec<usize>,
    pub ggml_type: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: usize,
    pub n_bytes: usize,
}

pub struct GgufFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
}

/// A bounds-checked little-endian cursor over the mapped bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                anyhow!(
                    "truncated: {what} needs {n} bytes at offset {}, file has {}",
                    self.pos,
                    self.bytes.len()
                )
            })?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }

    /// A count that must fit in what is left of the file at `min_item_bytes` per item.
    fn count(&mut self, what: &str, min_item_bytes: usize) -> Result<usize> {
        let n = self.u64(what)?;
        let left = (self.bytes.len() - self.pos) as u64;
        if n.saturating_mul(min_item_bytes as u64) > left {
            bail!("corrupt: {what} is {n}, more than the {left} bytes left can hold");
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(what, 1)?;
        let raw = self.take(n, what)?;
        String::from_utf8(raw.to_vec()).map_err(|_| anyhow!("corrupt: {what} is not valid UTF-8"))
    }

    fn value(&mut self, type_id: u32, key: &str, depth: usize) -> Result<Value> {
        let b = |c: &mut Self, n| c.take(n, key);
        Ok(match type_id {
            0 => Value::U8(b(self, 1)?[0]),
            1 => Value::I8(b(self, 1)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(b(self, 2)?.try_into().unwrap())),
            3 => Value::I16(i16::from_le_bytes(b(self, 2)?.try_into().unwrap())),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(self.u32(key)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(key)?)),
            7 => match b(self, 1)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                v => bail!("corrupt: bool value {v} for key {key}"),
            },
            8 => Value::String(self.string(key)?),
            9 => {
                if depth > 0 {
                    bail!("corrupt: nested array under key {key}");
                }
                let item_type = self.u32(key)?;
                let n = self.count(key, 1)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(item_type, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(self.u64(key)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(key)?)),
            t => bail!("corrupt: unknown metadata value type {t} for key {key}"),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_inner(path).with_context(|| format!("cannot read GGUF file {}", path.display()))
    }

    fn open_inner(path: &Path) -> Result<Self> {
        let file = File::open(path)?;
        // SAFETY: the map is read-only; recoup never writes a file it has mapped. A file
        // truncated by another process while mapped is outside what any mmap reader can guard.
        let mmap = unsafe { memmap2::Mmap::map(&file)? };
        let mut c = Cursor {
            bytes: &mmap,
            pos: 0,
        };
        let magic = c.take(4, "magic")?;
        if magic != MAGIC {
            bail!("not a GGUF file: magic is {magic:02x?}, expected \"GGUF\"");
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            bail!("unsupported GGUF version {version} (recoup reads versions 2 and 3)");
        }
        let n_tensors = c.count("tensor count", 8)?;
        let n_kv = c.count("metadata count", 12)?;
        let mut metadata = Vec::with_capacity(n_kv);
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let type_id = c.u32(&key)?;
            let value = c.value(type_id, &key, 0)?;
            metadata.push((key, value));
        }
        let mut raw_tensors = Vec::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let name = c.string(&format!("name of tensor #{i}"))?;
            let n_dims = c.u32(&name)? as usize;
            if n_dims == 0 || n_dims > 4 {
                bail!("corrupt: tensor {name} has {n_dims} dimensions");
            }
            let mut ne = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                ne.push(c.u64(&name)? as usize);
            }
            let type_id = c.u32(&name)?;
            let offset = c.u64(&name)?;
            raw_tensors.push((name, ne, type_id, offset));
        }
        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            Some((_, v)) => v
                .as_u64()
                .filter(|a| a.is_power_of_two())
                .ok_or_else(|| anyhow!("corrupt: general.alignment {v:?}"))?,
            None => DEFAULT_ALIGNMENT,
        };
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(n_tensors);
        for (name, ne, type_id, offset) in raw_tensors {
            let ggml_type =
                GgmlType::from_id(type_id).map_err(|e| anyhow!("tensor {name}: {e}"))?;
            let numel = ne.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
            let n_bytes = numel.and_then(|n| ggml_type.bytes_for(n)).ok_or_else(|| {
                anyhow!(
                    "corrupt: tensor {name} has shape {ne:?}, not whole {} blocks",
                    ggml_type.name()
                )
            })?;
            let start = data_start.checked_add(offset).map(|s| s as usize);
            let end = start.and_then(|s| s.checked_add(n_bytes));
            match (start, end) {
                (Some(start), Some(end)) if end <= mmap.len() => {
                    let shape = ne.iter().rev().copied().collect();
                    tensors.push(TensorInfo {
                        name,
                        shape,
                        ggml_type,
                        offset: start,
                        n_bytes,
                    });
                }
                _ => bail!(
                    "truncated: tensor {name} ({} bytes at data offset {offset}) ends past the end of the file ({} bytes)",
                    n_bytes,
                    mmap.len()
                ),
            }
        }
        let index = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            version,
            metadata,
            tensors,
            index,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn require(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| anyhow!("{}: missing metadata key {key}", self.path.display()))
    }

    fn wrong_type(&self, key: &str, v: &Value, want: &str) -> anyhow::Error {
        anyhow!(
            "{}: metadata key {key} is a {}, expected {want}",
            self.path.display(),
            v.type_name()
        )
    }

    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        v.as_u64()
            .ok_or_else(|| self.wrong_type(key, v, "an unsigned integer"))
    }

    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self.require(key)?;
        v.as_f64()
            .ok_or_else(|| self.wrong_type(key, v, "a number"))
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        match self.require(key)? {
            Value::String(s) => Ok(s),
            v => Err(self.wrong_type(key, v, "a string")),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<bool> {
        match self.require(key)? {
            Value::Bool(b) => Ok(*b),
            v => Err(self.wrong_type(key, v, "a bool")),
        }
    }

    pub fn get_array(&self, key: &str) -> Result<&[Value]> {
        match self.require(key)? {
            Value::Array(a) => Ok(a),
            v => Err(self.wrong_type(key, v, "an array")),
        }
    }

    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        self.get_array(key)?
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                v => Err(self.wrong_type(key, v, "an array of strings")),
            })
            .collect()
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor, as stored.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.mmap[info.offset..info.offset + info.n_bytes]
    }

    /// A tensor under its GGUF name, dequantized to f32 (blocks in parallel).
    pub fn tensor_f32(&self, name: &str) -> Result<Tensor> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| anyhow!("{}: no tensor named {name}", self.path.display()))?;
        let bytes = self.tensor_bytes(info);
        let numel: usize = info.shape.iter().product();
        let mut data = vec![0f32; numel];
        let t = info.ggml_type;
        // Chunks of whole blocks, large enough to amortize scheduling.
        let blocks_per_chunk = 1024;
        bytes
            .par_chunks(t.block_bytes() * blocks_per_chunk)
            .zip(data.par_chunks_mut(t.block_elems() * blocks_per_chunk))
            .for_each(|(src, dst)| t.dequantize(src, dst));
        Ok(Tensor {
            shape: info.shape.clone(),
            data,
        })
    }
}

/// A GGUF model's tensors under canonical HF names, with llama.cpp's conventions undone.
pub struct GgufTensorSource {
    file: GgufFile,
    /// Canonical name → GGUF name.
    names: Vec<(String, String)>,
    /// For `llama` GGUFs: heads of attn_q and attn_k, whose rows llama.cpp's converter
    /// permuted for interleaved RoPE.
    permuted_heads: Option<(usize, usize)>,
}

impl GgufTensorSource {
    pub fn new(file: GgufFile) -> Result<Self> {
        let arch = file.get_str("general.architecture")?.to_string();
        let permuted_heads = if arch == "llama" {
            let heads = file.get_u64("llama.attention.head_count")? as usize;
            let kv_heads = match file.get("llama.attention.head_count_kv") {
                Some(_) => file.get_u64("llama.attention.head_count_kv")? as usize,
                None => heads,
            };
            Some((heads, kv_heads))
        } else {
            None
        };
        let names = file
            .tensors
            .iter()
            .map(|t| (hf_name(&t.name), t.name.clone()))
            .collect();
        Ok(Self {
            file,
            names,
            permuted_heads,
        })
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    fn gguf_name(&self, name: &str) -> Option<&str> {
        self.names
            .iter()
            .find(|(hf, _)| hf == name)
            .map(|(_, g)| g.as_str())
    }
}

impl TensorSource for GgufTensorSource {
    fn path(&self) -> &Path {
        self.file.path()
    }

    fn contains(&self, name: &str) -> bool {
        self.gguf_name(name).is_some()
    }

    fn names(&self) -> Vec<String> {
        self.names.iter().map(|(hf, _)| hf.clone()).collect()
    }

    fn dense_dtype(&self, name: &str) -> DenseDtype {
        let ty = self
            .gguf_name(name)
            .and_then(|g| self.file.tensor_info(g))
            .map(|i| i.ggml_type);
        match ty {
            Some(GgmlType::F32) => DenseDtype::F32,
            Some(GgmlType::BF16) => DenseDtype::BF16,
            _ => DenseDtype::F16,
        }
    }

    fn tensor(&self, name: &str) -> Result<Tensor> {
        let gguf = self
            .gguf_name(name)
            .ok_or_else(|| anyhow!("{}: no tensor {name}", self.file.path().display()))?;
        let mut t = self.file.tensor_f32(gguf)?;
        if let Some((heads, kv_heads)) = self.permuted_heads {
            let n = if name.contains("self_attn.q_proj.") {
                Some(heads)
            } else if name.contains("self_attn.k_proj.") {
                Some(kv_heads)
            } else {
                None
            };
            if let Some(n) = n {
                unpermute_rope_rows(&mut t, n)
                    .with_context(|| format!("{}: tensor {gguf}", self.file.path().display()))?;
            }
        }
        Ok(t)
    }
}

/// Undoes llama.cpp's `permute` of Q/K rows: GGUF row `h·hd + 2i + s` holds HF row
/// `h·hd + s·hd/2 + i` (reshape `(n_head, hd/2, 2, cols)` → swap axes 1 and 2).
pub fn unpermute_rope_rows(t: &mut Tensor, n_head: usize) -> Result<()> {
    let rows = t.shape[0];
    let cols = t.numel() / rows.max(1);
    if n_head == 0 || !rows.is_multiple_of(n_head) || !(rows / n_head).is_multiple_of(2) {
        bail!("{rows} rows cannot be split into {n_head} heads of even size");
    }
    let hd = rows / n_head;
    let src = t.data.clone();
    for h in 0..n_head {
        for i in 0..hd / 2 {
            for s in 0..2 {
                let from = h * hd + 2 * i + s;
                let to = h * hd + s * (hd / 2) + i;
                t.data[to * cols..(to + 1) * cols]
                    .copy_from_slice(&src[from * cols..(from + 1) * cols]);
            }
        }
    }
    Ok(())
}

/// The Hugging Face name of a GGUF tensor (names without a counterpart are kept as they are).
pub fn hf_name(gguf: &str) -> String {
    match gguf {
        "token_embd.weight" => return "model.embed_tokens.weight".into(),
        "output_norm.weight" => return "model.norm.weight".into(),
        "output.weight" => return "lm_head.weight".into(),
        _ => {}
    }
    let Some(rest) = gguf.strip_prefix("blk.") else {
        return gguf.into();
    };
    let Some((layer, tail)) = rest.split_once('.') else {
        return gguf.into();
    };
    let Some((module, suffix)) = tail.split_once('.') else {
        return gguf.into();
    };
    let hf_module = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return gguf.into(),
    };
    format!("model.layers.{layer}.{hf_module}.{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hf() {
        assert_eq!(
            hf_name("blk.3.attn_q.weight"),
            "model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.12.ffn_down.weight"),
            "model.layers.12.mlp.down_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.attn_k.bias"),
            "model.layers.0.self_attn.k_proj.bias"
        );
        assert_eq!(hf_name("token_embd.weight"), "model.embed_tokens.weight");
        assert_eq!(hf_name("rope_freqs.weight"), "rope_freqs.weight");
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp's converter: reshape(n_head, 2, hd/2, cols).swapaxes(1, 2).
        let (n_head, hd, cols) = (3, 4, 2);
        let hf: Vec<f32> = (0..n_head * hd * cols).map(|v| v as f32).collect();
        let mut permuted = vec![0f32; hf.len()];
        for h in 0..n_head {
            for s in 0..2 {
                for i in 0..hd / 2 {
                    let hf_row = h * hd + s * hd / 2 + i;
                    let gguf_row = h * hd + i * 2 + s;
                    permuted[gguf_row * cols..][..cols]
                        .copy_from_slice(&hf[hf_row * cols..][..cols]);
                }
            }
        }
        let mut t = Tensor {
            shape: vec![n_head * hd, cols],
            data: permuted,
        };
        unpermute_rope_rows(&mut t, n_head).unwrap();
        assert_eq!(t.data, hf);
    }
}
