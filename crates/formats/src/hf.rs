//! Hugging Face model directories: `config.json`, `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, `tokenizer.json`. Reading is over mmap; writing produces
//! what transformers loads, atomically.

use crate::hugepages::HugePageArena;
use crate::packed::PackedLinear;
use crate::{DenseDtype, Tensor, TensorSource, atomic, native};
use anyhow::{Context, Result, anyhow, bail};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const INDEX_FILE: &str = "model.safetensors.index.json";
const SINGLE_FILE: &str = "model.safetensors";

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    range: (usize, usize),
}

pub struct HfDir {
    dir: PathBuf,
    pub config: serde_json::Value,
    files: Vec<(PathBuf, memmap2::Mmap)>,
    order: Vec<String>,
    entries: HashMap<String, Entry>,
    /// The `__metadata__` maps of all files, merged.
    metadata: HashMap<String, String>,
    /// The codes of every packed layer, gathered on first use.
    packed_codes: OnceLock<HugePageArena>,
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

impl HfDir {
    pub fn open(dir: &Path) -> Result<Self> {
        let config = read_json(&dir.join("config.json"))?;
        let index_path = dir.join(INDEX_FILE);
        let shard_names: Vec<String> = if index_path.exists() {
            let index = read_json(&index_path)?;
            let map = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| anyhow!("{}: no weight_map object", index_path.display()))?;
            let mut shards: Vec<String> = Vec::new();
            for file in map.values() {
                let file = file.as_str().ok_or_else(|| {
                    anyhow!(
                        "{}: weight_map values must be file names",
                        index_path.display()
                    )
                })?;
                if !shards.iter().any(|s| s == file) {
                    shards.push(file.to_string());
                }
            }
            shards
        } else if dir.join(SINGLE_FILE).exists() {
            vec![SINGLE_FILE.to_string()]
        } else {
            bail!(
                "{}: neither {SINGLE_FILE} nor {INDEX_FILE} found",
                dir.display()
            );
        };
        let paths = shard_names.iter().map(|s| dir.join(s)).collect();
        Self::from_files(dir, config, paths)
    }

    /// One safetensors file on its own (no config), e.g. a block written by `quantize`.
    pub fn open_file(path: &Path) -> Result<Self> {
        Self::from_files(path, serde_json::Value::Null, vec![path.to_path_buf()])
    }

    fn from_files(dir: &Path, config: serde_json::Value, paths: Vec<PathBuf>) -> Result<Self> {
        let mut files = Vec::new();
        let mut order = Vec::new();
        let mut entries = HashMap::new();
        let mut metadata = HashMap::new();
        for (file_idx, path) in paths.into_iter().enumerate() {
            let file =
                File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
            // SAFETY: read-only map of a file recoup does not modify while it is mapped.
            let mmap = unsafe { memmap2::Mmap::map(&file) }
                .with_context(|| format!("cannot map {}", path.display()))?;
            let (header_len, meta) = SafeTensors::read_metadata(&mmap[..])
                .map_err(|e| anyhow!("{} is not a valid safetensors file: {e}", path.display()))?;
            if let Some(m) = meta.metadata() {
                metadata.extend(m.clone());
            }
            let data_start = 8 + header_len;
            let mut named: Vec<(String, &safetensors::tensor::TensorInfo)> =
                meta.tensors().into_iter().collect();
            named.sort_by_key(|(_, info)| info.data_offsets.0);
            for (name, info) in named {
                let range = (
                    data_start + info.data_offsets.0,
                    data_start + info.data_offsets.1,
                );
                order.push(name.clone());
                entries.insert(
                    name,
                    Entry {
                        file: file_idx,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        range,
                    },
                );
            }
            files.push((path, mmap));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            files,
            order,
            entries,
            metadata,
            packed_codes: OnceLock::new(),
        })
    }

    /// A value of the safetensors files' `__metadata__`.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }

    /// Every packed layer's codes (`*.qweight`, what a decode step streams) copied into one
    /// huge-page arena on first use by `copy(name, src, dst)`, so the page-cache mapping is
    /// read once (the first caller's `copy` lays out every part).
    pub fn packed_codes(&self, copy: impl Fn(&str, &[u8], &mut [u8])) -> Result<&HugePageArena> {
        if let Some(arena) = self.packed_codes.get() {
            return Ok(arena);
        }
        let parts = self
            .order
            .iter()
            .filter(|n| n.ends_with(".qweight"))
            .map(|n| {
                let (_, _, bytes) = self.raw(n).expect("listed names exist");
                (n.clone(), bytes)
            });
        let arena = HugePageArena::gather_with(parts, &self.dir.display().to_string(), copy)?;
        Ok(self.packed_codes.get_or_init(|| arena))
    }

    /// A tensor as stored: dtype, shape and bytes (borrowed from the mapping).
    pub fn raw(&self, name: &str) -> Option<(Dtype, &[usize], &[u8])> {
        let e = self.entries.get(name)?;
        Some((
            e.dtype,
            &e.shape,
            &self.files[e.file].1[e.range.0..e.range.1],
        ))
    }
}

impl TensorSource for HfDir {
    fn path(&self) -> &Path {
        &self.dir
    }

    fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    fn names(&self) -> Vec<String> {
        self.order.clone()
    }

    fn dense_dtype(&self, name: &str) -> DenseDtype {
        self.entries
            .get(name)
            .and_then(|e| DenseDtype::from_safetensors(e.dtype))
            .unwrap_or(DenseDtype::F32)
    }

    fn packed(&self, prefix: &str) -> Result<Option<PackedLinear>> {
        native::read_packed(self, prefix)
    }

    fn tensor(&self, name: &str) -> Result<Tensor> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| anyhow!("{}: no tensor {name}", self.dir.display()))?;
        let (path, mmap) = &self.files[entry.file];
        let bytes = &mmap[entry.range.0..entry.range.1];
        let dtype = DenseDtype::from_safetensors(entry.dtype).ok_or_else(|| {
            anyhow!(
                "{}: tensor {name} has dtype {:?}; recoup reads F32, F16 and BF16",
                path.display(),
                entry.dtype
            )
        })?;
        let data = dtype.decode(bytes);
        Ok(Tensor {
            shape: entry.shape.clone(),
            data,
        })
    }
}

/// A tensor encoded in the export precision, waiting for its shard to be written.
struct Encoded {
    name: String,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// Writes one shard as a safetensors file, returning the names it holds.
fn write_shard(shard: Vec<Encoded>, dtype: DenseDtype, path: &Path) -> Result<Vec<String>> {
    let views = shard
        .iter()
        .map(|t| {
            Ok((
                t.name.clone(),
                safetensors::tensor::TensorView::new(
                    dtype.safetensors(),
                    t.shape.clone(),
                    &t.bytes,
                )?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path)?;
    Ok(shard.into_iter().map(|t| t.name).collect())
}

/// Writes an HF model directory atomically: `config.json`, the tensors (one
/// `model.safetensors`, or shards of at most `shard_bytes` plus the index), and any extra
/// files (tokenizer). `load` produces each tensor of `names` in turn, so only one shard is
/// held in memory at a time.
pub fn write_hf_dir(
    dest: &Path,
    config: &serde_json::Value,
    names: &[String],
    load: &(dyn Fn(&str) -> Result<Tensor> + Sync),
    dtype: DenseDtype,
    shard_bytes: usize,
    extra_files: &[(String, String)],
) -> Result<()> {
    atomic::write_dir(dest, |tmp| {
        std::fs::write(tmp.join("config.json"), serde_json::to_string_pretty(config)? + "\n")?;
        for (file, text) in extra_files {
            std::fs::write(tmp.join(file), text)?;
        }
        let shard_path = |idx: usize| tmp.join(format!("shard-{idx}.tmp"));
        let mut shards: Vec<Vec<String>> = Vec::new();
        let (mut current, mut current_bytes, mut total_bytes) = (Vec::new(), 0usize, 0usize);
        for name in names {
            let t = load(name)?;
            let bytes = dtype.encode(&t.data);
            if current_bytes > 0 && current_bytes + bytes.len() > shard_bytes {
                shards.push(write_shard(std::mem::take(&mut current), dtype, &shard_path(shards.len()))?);
                current_bytes = 0;
            }
            current_bytes += bytes.len();
            total_bytes += bytes.len();
            current.push(Encoded { name: name.clone(), shape: t.shape, bytes });
        }
        shards.push(write_shard(current, dtype, &shard_path(shards.len()))?);
        let n = shards.len();
        if n == 1 {
            std::fs::rename(shard_path(0), tmp.join(SINGLE_FILE))?;
            return Ok(());
        }
        let mut weight_map = BTreeMap::new();
        for (idx, names) in shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{n:05}.safetensors", idx + 1);
            std::fs::rename(shard_path(idx), tmp.join(&file))?;
            for name in names {
                weight_map.insert(name.clone(), file.clone());
            }
        }
        let index = serde_json::json!({ "metadata": { "total_size": total_bytes }, "weight_map": weight_map });
        std::fs::write(tmp.join(INDEX_FILE), serde_json::to_string_pretty(&index)? + "\n")?;
        Ok(())
    })
    .with_context(|| format!("cannot write {}", dest.display()))
}
