//! recoup's native checkpoint: a Hugging Face model directory whose `model.safetensors` holds
//! each quantized linear `P` packed (`P.qweight` u8 `[rows, packed bytes]`, `P.scales` f16
//! `[rows, groups]`, `P.zeros` u8 `[rows, groups]` unless symmetric, `P.perm` i32 `[cols]`
//! after act-order, `P.lowrank_a` `[rows, rank]` and `P.lowrank_b` `[rank, cols]` with a
//! low-rank branch: f16, or i8 with per-row f16 scales in `P.lowrank_a_scales` `[rows]` and
//! `P.lowrank_b_scales` `[rank]`) beside the tensors kept dense as the source stored them, and whose
//! `__metadata__["recoup"]` records how it was made ([`CheckpointMeta`]).

use crate::hf::HfDir;
use crate::packed::{Factor, GridSpec, LowRank, PackedLinear, PackedMatrix, check_permutation};
use anyhow::{Context, Result, anyhow, bail};
use half::f16;
use safetensors::Dtype;
use safetensors::tensor::View;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub const FORMAT_VERSION: u32 = 1;
/// The `__metadata__` key holding [`CheckpointMeta`] as JSON.
pub const METADATA_KEY: &str = "recoup";
/// Suffixes of the f32 tensors holding the channel scales AWQ folded around a packed layer
/// `P`: `P.awq_input_scale` s (the layer stores `Q(W·diag(s))`), `P.awq_output_scale` t (it
/// stores `Q(diag(1/t)·W)`). Only tools relating the layer to its source weights read them.
pub const AWQ_INPUT_SCALE: &str = "awq_input_scale";
pub const AWQ_OUTPUT_SCALE: &str = "awq_output_scale";

/// How one linear layer was quantized.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerRecord {
    pub method: String,
    pub bits: u32,
    pub group: usize,
    pub sym: bool,
    pub rows: usize,
    pub cols: usize,
    pub act_order: bool,
    /// Everything stored, scales, zeros and permutation included.
    pub bits_per_weight: f64,
    /// Layer-output error on the calibration inputs, `tr(E H Eᵀ) / tr(W H Wᵀ)`, `E = Ŵ − W`.
    pub rel_error: Option<f64>,
    /// Rank of the low-rank branch, if the layer has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<usize>,
    /// `max |Ŵ − W| / s` over the layer (s: the element's group step), in the basis the
    /// quantizer saw: at most ½ where nothing was clipped, which FBQuant guarantees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_steps: Option<f64>,
}

/// How a checkpoint was made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format_version: u32,
    pub method: String,
    /// The method's settings (bits, group, symmetry, its own options).
    pub settings: serde_json::Value,
    /// Texts (with sha256), samples, sequence length and seed; absent for data-free methods.
    pub calibration: Option<serde_json::Value>,
    /// The source model: path and sha256 of its files.
    pub source: serde_json::Value,
    /// Per quantized linear, by prefix (`model.layers.0.self_attn.q_proj`).
    pub layers: BTreeMap<String, LayerRecord>,
}

impl CheckpointMeta {
    /// The decoder blocks' layers (not a quantized output head): what bits-per-weight
    /// figures are averaged over.
    pub fn block_layers(&self) -> impl Iterator<Item = (&String, &LayerRecord)> {
        self.layers
            .iter()
            .filter(|(name, _)| name.starts_with("model.layers."))
    }

    pub fn from_dir(dir: &HfDir) -> Result<Option<Self>> {
        let Some(text) = dir.metadata(METADATA_KEY) else {
            return Ok(None);
        };
        let meta: Self = serde_json::from_str(text).with_context(|| {
            format!(
                "{}: the recoup metadata is not valid",
                dir_path(dir).display()
            )
        })?;
        if meta.format_version > FORMAT_VERSION {
            bail!(
                "{}: recoup checkpoint format {} is newer than this build reads ({FORMAT_VERSION})",
                dir_path(dir).display(),
                meta.format_version
            );
        }
        Ok(Some(meta))
    }
}

fn dir_path(dir: &HfDir) -> &Path {
    crate::TensorSource::path(dir)
}

/// A tensor about to be written: its bytes owned, or borrowed from a mapping (so the block
/// files are assembled into the checkpoint without being read into memory).
pub struct StoredTensor<'a> {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    bytes: Bytes<'a>,
}

enum Bytes<'a> {
    Owned(Vec<u8>),
    Borrowed(&'a [u8]),
}

fn dtype_bytes(dtype: Dtype) -> usize {
    dtype.bitsize() / 8
}

impl<'a> StoredTensor<'a> {
    pub fn owned(dtype: Dtype, shape: Vec<usize>, bytes: Vec<u8>) -> Self {
        Self {
            dtype,
            shape,
            bytes: Bytes::Owned(bytes),
        }
    }

    pub fn borrowed(dtype: Dtype, shape: Vec<usize>, bytes: &'a [u8]) -> Self {
        Self {
            dtype,
            shape,
            bytes: Bytes::Borrowed(bytes),
        }
    }
}

impl View for &StoredTensor<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match &self.bytes {
            Bytes::Owned(b) => Cow::Borrowed(b),
            Bytes::Borrowed(b) => Cow::Borrowed(b),
        }
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * dtype_bytes(self.dtype)
    }
}

/// Writes a safetensors file atomically (a temporary file beside `path`, renamed into place).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, StoredTensor<'_>)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    let parent = parent.unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".partial-")
        .tempfile_in(parent)
        .with_context(|| format!("cannot create a temporary file in {}", parent.display()))?;
    safetensors::serialize_to_file(
        tensors.iter().map(|(n, t)| (n.as_str(), t)),
        Some(metadata),
        tmp.path(),
    )
    .with_context(|| format!("cannot write {}", path.display()))?;
    sort_metadata(tmp.path()).with_context(|| format!("cannot write {}", path.display()))?;
    // Temporary files are created private; the result is an ordinary file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))?;
    }
    tmp.persist(path)
        .with_context(|| format!("cannot rename into {}", path.display()))?;
    Ok(())
}

/// Rewrites the header of a safetensors file with its `__metadata__` keys sorted: the
/// writer emits them in hash order, which would make identical runs differ byte for byte.
fn sort_metadata(path: &Path) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)?;
    let mut header = vec![0u8; u64::from_le_bytes(len) as usize];
    f.read_exact(&mut header)?;
    let mut value: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)?;
    let Some(meta) = value.remove("__metadata__") else {
        return Ok(());
    };
    let sorted: BTreeMap<String, serde_json::Value> = serde_json::from_value(meta)?;
    let mut out = serde_json::Map::new();
    out.insert("__metadata__".into(), serde_json::to_value(sorted)?);
    out.extend(value);
    let mut text = serde_json::to_vec(&out)?;
    if text.len() > header.len() {
        bail!("re-encoded safetensors header grew");
    }
    // Same content, so the same length; trailing spaces are allowed should it shrink.
    text.resize(header.len(), b' ');
    f.seek(SeekFrom::Start(8))?;
    f.write_all(&text)?;
    Ok(())
}

/// The tensors that store one packed linear `prefix`.
pub fn packed_tensors(prefix: &str, p: &PackedLinear) -> Vec<(String, StoredTensor<'static>)> {
    let m = &p.matrix;
    let groups = m.groups_per_row();
    let mut out = vec![
        (
            format!("{prefix}.qweight"),
            StoredTensor::owned(
                Dtype::U8,
                vec![m.rows, m.spec.row_bytes(m.cols)],
                m.row_major_codes(),
            ),
        ),
        (
            format!("{prefix}.scales"),
            StoredTensor::owned(
                Dtype::F16,
                vec![m.rows, groups],
                f16_bytes(&m.row_major_scales()),
            ),
        ),
    ];
    if !m.spec.sym {
        out.push((
            format!("{prefix}.zeros"),
            StoredTensor::owned(Dtype::U8, vec![m.rows, groups], m.row_major_zeros()),
        ));
    }
    if let Some(lr) = &p.low_rank {
        for (name, factor, shape) in [
            ("lowrank_a", &lr.a, [m.rows, lr.rank]),
            ("lowrank_b", &lr.b, [lr.rank, m.cols]),
        ] {
            out.extend(factor_tensors(&format!("{prefix}.{name}"), factor, shape));
        }
    }
    if let Some(perm) = &p.perm {
        out.push((
            format!("{prefix}.perm"),
            StoredTensor::owned(
                Dtype::I32,
                vec![perm.len()],
                perm.iter()
                    .flat_map(|&v| (v as i32).to_le_bytes())
                    .collect(),
            ),
        ));
    }
    out
}

/// A low-rank factor: `NAME` f16, or `NAME` i8 with its per-row scales in `NAME_scales` f16.
fn factor_tensors(
    name: &str,
    factor: &Factor,
    shape: [usize; 2],
) -> Vec<(String, StoredTensor<'static>)> {
    match factor {
        Factor::F16(v) => vec![(
            name.to_string(),
            StoredTensor::owned(Dtype::F16, shape.to_vec(), f16_bytes(v)),
        )],
        Factor::Int8 { codes, scales } => vec![
            (
                name.to_string(),
                StoredTensor::owned(
                    Dtype::I8,
                    shape.to_vec(),
                    codes.iter().map(|&c| c as u8).collect(),
                ),
            ),
            (
                format!("{name}_scales"),
                StoredTensor::owned(Dtype::F16, vec![shape[0]], f16_bytes(scales)),
            ),
        ],
    }
}

fn f16_bytes(v: &[f16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f16_values(b: &[u8]) -> Vec<f16> {
    b.chunks_exact(2)
        .map(|b| f16::from_le_bytes([b[0], b[1]]))
        .collect()
}

/// Copies a stored `*.qweight` (row-major) into the loader's arena in the tiled layout of
/// `PackedMatrix`. Bytes that do not match their layer's metadata are copied as they are:
/// [`read_packed`] refuses that layer with a clear error before anything reads them.
fn tile_qweight(meta: &CheckpointMeta, name: &str, src: &[u8], dst: &mut [u8]) {
    let layer = name
        .strip_suffix(".qweight")
        .and_then(|p| meta.layers.get(p));
    let spec = layer.and_then(|l| GridSpec::new(l.bits, l.group, l.sym).ok());
    match (layer, spec) {
        (Some(l), Some(spec)) if src.len() == l.rows * spec.row_bytes(l.cols) => {
            spec.tile_codes(l.rows, l.cols, src, dst)
        }
        _ => dst.copy_from_slice(src),
    }
}

/// Reads the packed linear `prefix` of a recoup checkpoint; `None` if it is stored dense.
pub fn read_packed(dir: &HfDir, prefix: &str) -> Result<Option<PackedLinear>> {
    let qweight = format!("{prefix}.qweight");
    if dir.raw(&qweight).is_none() {
        return Ok(None);
    }
    let path = dir_path(dir).display();
    let meta = CheckpointMeta::from_dir(dir)?.ok_or_else(|| {
        anyhow!("{path}: {qweight} is packed but the file has no recoup metadata")
    })?;
    let rec = meta
        .layers
        .get(prefix)
        .ok_or_else(|| anyhow!("{path}: the recoup metadata does not describe {prefix}"))?;
    let spec =
        GridSpec::new(rec.bits, rec.group, rec.sym).with_context(|| format!("{path}: {prefix}"))?;
    let (rows, cols) = (rec.rows, rec.cols);
    let groups = cols.div_ceil(spec.group);
    let part = |suffix: &str, dtype: Dtype, shape: &[usize]| -> Result<&[u8]> {
        let name = format!("{prefix}.{suffix}");
        let (d, s, bytes) = dir
            .raw(&name)
            .ok_or_else(|| anyhow!("{path}: {name} is missing"))?;
        if d != dtype || s != shape {
            bail!("{path}: {name} is {d:?} {s:?}, expected {dtype:?} {shape:?}");
        }
        Ok(bytes)
    };
    // Checked here for a clear error; the bytes come from the arena of every layer's codes.
    part("qweight", Dtype::U8, &[rows, spec.row_bytes(cols)])?;
    let codes = dir
        .packed_codes(|name, src, dst| tile_qweight(&meta, name, src, dst))?
        .get(&qweight)
        .expect("the arena holds every qweight");
    let scales = f16_values(part("scales", Dtype::F16, &[rows, groups])?);
    let zeros = if spec.sym {
        Vec::new()
    } else {
        part("zeros", Dtype::U8, &[rows, groups])?.to_vec()
    };
    let matrix = PackedMatrix::from_tiled(
        spec,
        rows,
        cols,
        codes,
        scales,
        zeros,
        &format!("{path}: {prefix}"),
    )?;
    let perm = if rec.act_order {
        let perm: Vec<u32> = part("perm", Dtype::I32, &[cols])?
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as u32)
            .collect();
        check_permutation(&perm, cols, &format!("{path}: {prefix}.perm"))?;
        Some(perm)
    } else {
        None
    };
    let factor = |suffix: &str, shape: [usize; 2]| -> Result<Factor> {
        let dtype = dir.raw(&format!("{prefix}.{suffix}")).map(|(d, _, _)| d);
        Ok(if dtype == Some(Dtype::I8) {
            Factor::Int8 {
                codes: part(suffix, Dtype::I8, &shape)?
                    .iter()
                    .map(|&b| b as i8)
                    .collect(),
                scales: f16_values(part(&format!("{suffix}_scales"), Dtype::F16, &shape[..1])?),
            }
        } else {
            Factor::F16(f16_values(part(suffix, Dtype::F16, &shape)?))
        })
    };
    let low_rank = match rec.rank {
        Some(rank) => Some(LowRank {
            rank,
            a: factor("lowrank_a", [rows, rank])?,
            b: factor("lowrank_b", [rank, cols])?,
        }),
        None => None,
    };
    Ok(Some(PackedLinear {
        matrix,
        perm,
        low_rank,
    }))
}
