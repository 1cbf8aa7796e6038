//! The QDEC residual sidecar, format version 1: the error `R = W − Ŵ` of every quantized
//! linear layer of one recoup checkpoint, 4-bit per output row, stored input-major so that
//! the residuals of one input channel are one contiguous run of bytes.
//!
//! The container is a safetensors file (header with an index of every tensor's dtype,
//! shape and byte range; data aligned after it). For each linear `P`
//! (`model.layers.0.self_attn.q_proj`):
//!
//! | tensor              | dtype | shape          | content                                         |
//! |---------------------|-------|----------------|-------------------------------------------------|
//! | `P.qdec.residual`   | U8    | `[cols, rows/2]` | row `i` = input channel `i`; byte `o/2` holds output `o` in its low nibble when `o` is even, high when odd; nibble = level + 8, level ∈ −7…7 |
//! | `P.qdec.scale`      | F16   | `[rows]`       | per output row: `R̂[o, i] = (nibble − 8) · scale[o]` |
//! | `P.qdec.envelope`   | F16   | `[L]`, `L ≤ cols` | optional: `t[j]` = the largest `j`-th largest `\|x\|` seen on calibration text (non-increasing; the first `L` order statistics) |
//! | `P.qdec.mean_abs`   | F32   | `[cols]`       | optional: mean `\|x_i\|` per input channel on calibration text |
//!
//! Nibble order is that of the paper's packed int32 words read little-endian (output
//! `8c + j` in bits `4j…4j+4` of word `c`). Input channels are in the model's original order
//! (not a GPTQ act-order permutation). The `__metadata__` key `recoup_qdec` holds
//! [`ResidualMeta`] as JSON: format version, bits, the digest of the checkpoint's metadata
//! the residual belongs to, provenance, and each layer's shape.

use crate::hf::HfDir;
use crate::hugepages::{HugePageArena, SharedBytes};
use crate::native::{StoredTensor, write_safetensors};
use anyhow::{Context, Result, anyhow, bail};
use half::f16;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

pub const RESIDUAL_FORMAT_VERSION: u32 = 1;
/// The `__metadata__` key holding [`ResidualMeta`] as JSON.
pub const RESIDUAL_METADATA_KEY: &str = "recoup_qdec";
/// Residual levels are −`MAX_LEVEL`…`MAX_LEVEL` (nibble 0, level −8, is never written).
pub const MAX_LEVEL: i8 = 7;

/// One layer's entry in the sidecar's metadata.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResidualLayerRecord {
    pub rows: usize,
    pub cols: usize,
    /// `‖R̂ − R‖ / ‖R‖`: how much of the residual the 4-bit code loses.
    pub code_rel_error: f64,
    /// `‖R‖ / ‖W‖`: the quantized layer's relative weight error.
    pub weight_rel_error: f64,
}

/// What a sidecar holds and what it belongs to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResidualMeta {
    pub format_version: u32,
    pub bits: u32,
    /// sha256 of the checkpoint's `recoup` metadata JSON: a sidecar is refused by any other
    /// checkpoint.
    pub checkpoint_digest: String,
    /// The quantized checkpoint and the reference model: paths and file hashes.
    pub quantized: serde_json::Value,
    pub reference: serde_json::Value,
    /// How the envelope and mean |x| were measured; absent when they were not.
    pub calibration: Option<serde_json::Value>,
    pub layers: BTreeMap<String, ResidualLayerRecord>,
}

/// sha256 (hex) of a checkpoint's metadata JSON, as [`ResidualMeta::checkpoint_digest`].
pub fn checkpoint_digest(checkpoint_meta_json: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(checkpoint_meta_json.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Packs levels `q` (`[rows, cols]` row-major, each in −7…7) input-major: `[cols, rows/2]`.
pub fn pack_input_major(q: &[i8], rows: usize, cols: usize) -> Vec<u8> {
    assert!(
        rows.is_multiple_of(2) && q.len() == rows * cols,
        "residual shape"
    );
    let half = rows / 2;
    let mut out = vec![0u8; cols * half];
    for o in 0..rows {
        for (i, &level) in q[o * cols..(o + 1) * cols].iter().enumerate() {
            debug_assert!(level.abs() <= MAX_LEVEL);
            let nibble = (level + 8) as u8;
            out[i * half + o / 2] |= nibble << (4 * (o % 2));
        }
    }
    out
}

/// The level of output `o` in an input channel's packed run.
pub fn level(run: &[u8], o: usize) -> i8 {
    ((run[o / 2] >> (4 * (o % 2))) & 0xF) as i8 - 8
}

/// One layer's residual and calibration statistics as written.
pub struct LayerResidualData {
    pub rows: usize,
    pub cols: usize,
    /// `[cols, rows/2]`, as [`pack_input_major`] makes it.
    pub codes: Vec<u8>,
    pub scales: Vec<f16>,
    pub envelope: Option<Vec<f32>>,
    pub mean_abs: Option<Vec<f32>>,
}

fn tensor_name(prefix: &str, part: &str) -> String {
    format!("{prefix}.qdec.{part}")
}

/// Writes a sidecar atomically (temporary file renamed into place).
pub fn write_residual_file(
    path: &Path,
    meta: &ResidualMeta,
    layers: &[(String, LayerResidualData)],
) -> Result<()> {
    let mut tensors = Vec::new();
    for (prefix, l) in layers {
        let f16_bytes = |v: &[f16]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        tensors.push((
            tensor_name(prefix, "residual"),
            StoredTensor::borrowed(Dtype::U8, vec![l.cols, l.rows / 2], &l.codes),
        ));
        tensors.push((
            tensor_name(prefix, "scale"),
            StoredTensor::owned(Dtype::F16, vec![l.rows], f16_bytes(&l.scales)),
        ));
        if let Some(e) = &l.envelope {
            let e: Vec<f16> = e.iter().map(|&v| f16::from_f32(v)).collect();
            tensors.push((
                tensor_name(prefix, "envelope"),
                StoredTensor::owned(Dtype::F16, vec![e.len()], f16_bytes(&e)),
            ));
        }
        if let Some(m) = &l.mean_abs {
            tensors.push((
                tensor_name(prefix, "mean_abs"),
                StoredTensor::owned(
                    Dtype::F32,
                    vec![l.cols],
                    m.iter().flat_map(|v| v.to_le_bytes()).collect(),
                ),
            ));
        }
    }
    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (
            RESIDUAL_METADATA_KEY.to_string(),
            serde_json::to_string(meta)?,
        ),
    ]);
    write_safetensors(path, &tensors, metadata)
}

/// Where a layer's packed residual rows are read from at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// Copied into a buffer of their own when loaded.
    Ram,
    /// Read through the file's memory mapping, paged in on demand (and evictable).
    Mmap,
}

/// A layer's packed residual rows in their tier.
pub enum ResidualCodes {
    /// A part of the RAM tier's buffer.
    Ram(SharedBytes),
    Mapped {
        file: Arc<HfDir>,
        name: String,
    },
}

impl ResidualCodes {
    pub fn bytes(&self) -> &[u8] {
        match self {
            ResidualCodes::Ram(bytes) => bytes,
            ResidualCodes::Mapped { file, name } => {
                file.raw(name)
                    .expect("checked when the sidecar was opened")
                    .2
            }
        }
    }
}

/// One layer's residual, ready for the kernels.
pub struct LayerResidual {
    pub rows: usize,
    pub cols: usize,
    pub codes: ResidualCodes,
    /// Kept in f16 as stored: they are read with every corrected token.
    pub scales: Vec<f16>,
    pub envelope: Option<Vec<f32>>,
    pub mean_abs: Option<Vec<f32>>,
}

/// An opened sidecar: metadata checked, every layer's tensors present with their shapes.
pub struct ResidualFile {
    path: PathBuf,
    file: Arc<HfDir>,
    pub meta: ResidualMeta,
    /// The RAM tier: every layer's runs copied into one buffer, made on first use.
    ram: OnceLock<HugePageArena>,
}

impl ResidualFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = HfDir::open_file(path)
            .with_context(|| format!("{}: not a readable residual file", path.display()))?;
        let p = path.display();
        let json = file.metadata(RESIDUAL_METADATA_KEY).ok_or_else(|| {
            anyhow!("{p}: not a recoup residual file (no `{RESIDUAL_METADATA_KEY}` metadata)")
        })?;
        let meta: ResidualMeta = serde_json::from_str(json)
            .with_context(|| format!("{p}: the `{RESIDUAL_METADATA_KEY}` metadata is invalid"))?;
        if meta.format_version != RESIDUAL_FORMAT_VERSION {
            bail!(
                "{p}: residual format version {} (this recoup reads {RESIDUAL_FORMAT_VERSION})",
                meta.format_version
            );
        }
        if meta.bits != 4 {
            bail!("{p}: {}-bit residuals (this recoup reads 4-bit)", meta.bits);
        }
        let this = Self {
            path: path.to_path_buf(),
            file: Arc::new(file),
            meta,
            ram: OnceLock::new(),
        };
        for (prefix, rec) in &this.meta.layers {
            if !rec.rows.is_multiple_of(2) || rec.rows == 0 || rec.cols == 0 {
                bail!("{p}: {prefix} has {}×{} residuals", rec.rows, rec.cols);
            }
            this.part(prefix, "residual", Dtype::U8, &[rec.cols, rec.rows / 2])?;
            this.part(prefix, "scale", Dtype::F16, &[rec.rows])?;
            this.optional(prefix, "envelope", Dtype::F16, rec.cols, true)?;
            this.optional(prefix, "mean_abs", Dtype::F32, rec.cols, false)?;
        }
        Ok(this)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn part(&self, prefix: &str, part: &str, dtype: Dtype, shape: &[usize]) -> Result<&[u8]> {
        let name = tensor_name(prefix, part);
        let p = self.path.display();
        let (d, s, bytes) = self
            .file
            .raw(&name)
            .ok_or_else(|| anyhow!("{p}: {name} is missing"))?;
        if d != dtype || s != shape {
            bail!("{p}: {name} is {d:?} {s:?}, expected {dtype:?} {shape:?}");
        }
        Ok(bytes)
    }

    /// An optional vector of `len` values, or of 1…`len` when `prefix_of` (the envelope).
    fn optional(
        &self,
        prefix: &str,
        part: &str,
        dtype: Dtype,
        len: usize,
        prefix_of: bool,
    ) -> Result<Option<Vec<f32>>> {
        let Some((_, shape, _)) = self.file.raw(&tensor_name(prefix, part)) else {
            return Ok(None);
        };
        let len = match shape {
            [l] if prefix_of && (1..=len).contains(l) => *l,
            _ => len,
        };
        let bytes = self.part(prefix, part, dtype, &[len])?;
        let dense = crate::DenseDtype::from_safetensors(dtype).expect("a float dtype");
        Ok(Some(dense.decode(bytes)))
    }

    /// Checks that this sidecar was built for the checkpoint whose metadata JSON is given.
    pub fn check_belongs_to(&self, checkpoint: &Path, checkpoint_meta_json: &str) -> Result<()> {
        if checkpoint_digest(checkpoint_meta_json) != self.meta.checkpoint_digest {
            bail!(
                "{} was built for another checkpoint than {} (its metadata differs); \
                 rebuild it with `recoup residual`",
                self.path.display(),
                checkpoint.display()
            );
        }
        Ok(())
    }

    /// Every layer's runs in one buffer backed by huge pages where the kernel allows: a
    /// decode step reads a few short runs at scattered places, and with 4 KiB pages nearly
    /// every run costs a page walk.
    fn ram_tier(&self) -> Result<HugePageArena> {
        let mut parts = Vec::new();
        for (prefix, rec) in &self.meta.layers {
            let bytes = self.part(prefix, "residual", Dtype::U8, &[rec.cols, rec.rows / 2])?;
            parts.push((prefix.clone(), bytes));
        }
        HugePageArena::gather(parts, &format!("{}: the residual", self.path.display()))
    }

    /// Layer `prefix`'s residual in `tier`, or `None` if the sidecar has none for it.
    pub fn layer(&self, prefix: &str, tier: Tier) -> Result<Option<LayerResidual>> {
        let Some(rec) = self.meta.layers.get(prefix) else {
            return Ok(None);
        };
        let (rows, cols) = (rec.rows, rec.cols);
        let name = tensor_name(prefix, "residual");
        let codes = match tier {
            Tier::Ram => {
                let arena = match self.ram.get() {
                    Some(arena) => arena,
                    None => {
                        let arena = self.ram_tier()?;
                        self.ram.get_or_init(|| arena)
                    }
                };
                ResidualCodes::Ram(arena.get(prefix).expect("every layer is gathered"))
            }
            Tier::Mmap => ResidualCodes::Mapped {
                file: self.file.clone(),
                name,
            },
        };
        let scales = self
            .part(prefix, "scale", Dtype::F16, &[rows])?
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]))
            .collect();
        Ok(Some(LayerResidual {
            rows,
            cols,
            codes,
            scales,
            envelope: self.optional(prefix, "envelope", Dtype::F16, cols, true)?,
            mean_abs: self.optional(prefix, "mean_abs", Dtype::F32, cols, false)?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_round_trips_every_level_in_both_nibbles() {
        let (rows, cols) = (6, 5);
        let q: Vec<i8> = (0..rows * cols)
            .map(|i| ((i * 7 + i / 3) % 15) as i8 - 7)
            .collect();
        let packed = pack_input_major(&q, rows, cols);
        assert_eq!(packed.len(), cols * rows / 2);
        for o in 0..rows {
            for i in 0..cols {
                let run = &packed[i * rows / 2..(i + 1) * rows / 2];
                assert_eq!(level(run, o), q[o * cols + i], "output {o} channel {i}");
            }
        }
        assert!(
            packed.iter().all(|&b| b & 0xF != 0 && b >> 4 != 0),
            "nibble 0 unused"
        );
    }
}
