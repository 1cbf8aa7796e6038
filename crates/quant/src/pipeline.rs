//! Quantizes a model one decoder block at a time, in bounded memory: only the current block
//! (in f32), the calibration activations at its input and its input statistics are held.
//!
//! Each finished block is written atomically to `<out>.work/block-NNNN.safetensors` (with
//! the run's settings in `<out>.work/job.json`), so a killed run resumes after the last
//! finished block: the activations are rebuilt by replaying the finished blocks as stored,
//! which is exactly what the uninterrupted run feeds forward. The checkpoint itself is
//! assembled from the block files and the source's embedding, norm and head at the end, and
//! appears atomically.

use crate::calib::{BlockStats, CalibrationSet};
use crate::error::{max_error_steps, sampled_output_error};
use crate::grid::{Clip, quantize_rtn};
use crate::method::{BlockWeights, DenseLinear, LinearName, Method, QuantizedLinear};
use anyhow::{Context, Result, anyhow, bail};
use recoup_formats::hf::HfDir;
use recoup_formats::native::{
    AWQ_INPUT_SCALE, AWQ_OUTPUT_SCALE, CheckpointMeta, FORMAT_VERSION, LayerRecord, METADATA_KEY,
    StoredTensor, packed_tensors, write_safetensors,
};
use recoup_formats::packed::{GridSpec, PackedLinear};
use recoup_formats::{DenseDtype, TensorSource, atomic};
use recoup_kernels::ops::RopeTable;
use recoup_model::ModelConfig;
use recoup_model::export::tokenizer_files;
use recoup_model::linear::{DenseF32, Linear};
use recoup_model::llama::{Block, block_tensor_name, embed_tokens};
use recoup_model::load::Opened;
use regex::Regex;
use safetensors::Dtype;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One quantization run.
pub struct Job<'a> {
    pub opened: &'a Opened,
    pub method: &'a dyn Method,
    pub calibration: Option<&'a CalibrationSet>,
    /// Linear layers whose full name matches stay dense.
    pub skip: Option<&'a Regex>,
    /// Feed each block's *quantized* outputs to the next (the standard); `false` feeds the
    /// f32 block's outputs.
    pub sequential: bool,
    /// The source model's path and hash, recorded in the checkpoint.
    pub source: serde_json::Value,
    pub out: &'a Path,
    /// Continue an interrupted run with the same settings instead of starting over.
    pub resume: bool,
    /// Round-to-nearest the output head (or, when tied, a copy of the embedding used as the
    /// head) to this many bits, group 128: decode reads the head for every token, and in
    /// f32 it outweighs a small model's quantized blocks. `None` keeps it as stored.
    pub head_bits: Option<u32>,
}

/// Progress of a run, for the caller's progress bar.
pub enum Event {
    /// `done` of `blocks` blocks were finished by an earlier run.
    Started {
        done: usize,
        blocks: usize,
    },
    BlockDone {
        layer: usize,
        blocks: usize,
    },
    /// Assembling the checkpoint.
    Writing,
}

pub struct Summary {
    pub quantized_layers: usize,
    /// Over the quantized layers: everything they store per weight.
    pub bits_per_weight: f64,
    /// Mean over the quantized layers of `tr(E H Eᵀ) / tr(W H Wᵀ)` (calibrated runs).
    pub mean_rel_error: Option<f64>,
}

/// Where an unfinished run of `out` keeps its finished blocks.
pub fn work_dir(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".work");
    out.with_file_name(name)
}

fn part_path(work: &Path, layer: usize) -> PathBuf {
    work.join(format!("block-{layer:04}.safetensors"))
}

/// Prepares the work directory and returns how many blocks an earlier run finished.
fn prepare_work_dir(work: &Path, fingerprint: &serde_json::Value, resume: bool) -> Result<usize> {
    let job_file = work.join("job.json");
    if work.exists() {
        if !resume {
            std::fs::remove_dir_all(work)
                .with_context(|| format!("cannot remove the unfinished run {}", work.display()))?;
        } else {
            let text = std::fs::read_to_string(&job_file)
                .with_context(|| format!("cannot read {}", job_file.display()))?;
            let earlier: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", job_file.display()))?;
            if &earlier != fingerprint {
                bail!(
                    "{} was started with different settings ({}); rerun with those, or \
                     without --resume to start over",
                    work.display(),
                    earlier
                );
            }
            return Ok((0..).take_while(|&i| part_path(work, i).exists()).count());
        }
    }
    std::fs::create_dir_all(work).with_context(|| format!("cannot create {}", work.display()))?;
    let tmp = work.join("job.json.partial");
    std::fs::write(&tmp, serde_json::to_string_pretty(fingerprint)? + "\n")?;
    std::fs::rename(&tmp, &job_file)?;
    Ok(0)
}

pub(crate) fn read_block_weights(
    c: &ModelConfig,
    source: &dyn TensorSource,
    layer: usize,
) -> Result<BlockWeights> {
    // Every tensor is checked against the size the config implies before anything runs.
    let get = |name: &str, len: usize| -> Result<Vec<f32>> {
        let full = block_tensor_name(layer, name);
        let data = source.tensor(&full)?.data;
        if data.len() != len {
            bail!(
                "{}: {full} has {} values, the config implies {len}",
                source.path().display(),
                data.len()
            );
        }
        Ok(data)
    };
    let dims = |name: LinearName| match name {
        LinearName::Q => (c.q_dim(), c.hidden_size),
        LinearName::K | LinearName::V => (c.kv_dim(), c.hidden_size),
        LinearName::O => (c.hidden_size, c.q_dim()),
        LinearName::Gate | LinearName::Up => (c.intermediate_size, c.hidden_size),
        LinearName::Down => (c.hidden_size, c.intermediate_size),
    };
    let linears = LinearName::ALL
        .iter()
        .map(|&name| {
            let prefix = block_tensor_name(layer, name.module());
            if source.packed(&prefix)?.is_some() {
                bail!("{}: {prefix} is already quantized", source.path().display());
            }
            let (rows, cols) = dims(name);
            let w = get(&format!("{}.weight", name.module()), rows * cols)?;
            let bias_name = format!("{}.bias", name.module());
            let bias = if source.contains(&block_tensor_name(layer, &bias_name)) {
                Some(get(&bias_name, rows)?)
            } else {
                None
            };
            Ok(DenseLinear {
                w,
                rows,
                cols,
                bias,
            })
        })
        .collect::<Result<_>>()?;
    Ok(BlockWeights {
        attn_norm: get("input_layernorm.weight", c.hidden_size)?,
        ffn_norm: get("post_attention_layernorm.weight", c.hidden_size)?,
        linears,
        modified: false,
    })
}

/// The f32 block that `weights` describe.
pub(crate) fn dense_block(w: &BlockWeights) -> Block {
    let lin = |name: LinearName| {
        let l = w.linear(name);
        Linear::new(
            Box::new(DenseF32::new(Arc::new(l.w.clone()), l.rows, l.cols)),
            l.bias.clone(),
        )
    };
    Block {
        attn_norm: w.attn_norm.clone(),
        q: lin(LinearName::Q),
        k: lin(LinearName::K),
        v: lin(LinearName::V),
        o: lin(LinearName::O),
        ffn_norm: w.ffn_norm.clone(),
        gate: lin(LinearName::Gate),
        up: lin(LinearName::Up),
        down: lin(LinearName::Down),
    }
}

/// The calibration activations at a block's input: one window of `seqlen` rows after another.
struct Activations {
    x: Vec<f32>,
    seqlen: usize,
    rope: RopeTable,
}

impl Activations {
    /// Runs every window through `block`; with `stats`, records the inputs of its linears.
    /// `update` replaces the activations with the block's outputs.
    fn run(
        &mut self,
        c: &ModelConfig,
        block: &Block,
        mut stats: Option<&mut BlockStats>,
        update: bool,
    ) {
        let (d, t) = (c.hidden_size, self.seqlen);
        let mut k = vec![0f32; t * c.kv_dim()];
        let mut v = vec![0f32; t * c.kv_dim()];
        let mut scratch = vec![0f32; t * d];
        for window in self.x.chunks_exact_mut(t * d) {
            let target: &mut [f32] = if update {
                window
            } else {
                scratch.copy_from_slice(window);
                &mut scratch
            };
            let mut tap = |site, input: &[f32]| {
                if let Some(s) = stats.as_deref_mut() {
                    s.add(site, input, t);
                }
            };
            if update {
                block.forward(c, target, t, &mut k, &mut v, 0, &self.rope, None, &mut tap);
            } else {
                block.forward_to_down(c, target, t, &mut k, &mut v, 0, &self.rope, None, &mut tap);
            }
        }
    }
}

/// The dense tensors and packed linears of one finished block, as stored.
fn block_tensors(
    c: &ModelConfig,
    source: &dyn TensorSource,
    layer: usize,
    weights: &BlockWeights,
    quantized: &[(LinearName, QuantizedLinear)],
) -> Vec<(String, StoredTensor<'static>)> {
    let dense = |name: String, shape: Vec<usize>, data: &[f32]| {
        let dtype = if weights.modified {
            DenseDtype::F32
        } else {
            source.dense_dtype(&name)
        };
        (
            name,
            StoredTensor::owned(dtype.safetensors(), shape, dtype.encode(data)),
        )
    };
    let n = |m: &str| block_tensor_name(layer, m);
    let mut out = vec![
        dense(
            n("input_layernorm.weight"),
            vec![c.hidden_size],
            &weights.attn_norm,
        ),
        dense(
            n("post_attention_layernorm.weight"),
            vec![c.hidden_size],
            &weights.ffn_norm,
        ),
    ];
    for name in LinearName::ALL {
        let prefix = n(name.module());
        let l = weights.linear(name);
        match quantized.iter().find(|(q, _)| *q == name) {
            Some((_, q)) => {
                out.extend(packed_tensors(&prefix, &q.packed));
                // The scales AWQ folded around the layer: what a residual sidecar needs to
                // express the reference weights in the basis the layer was quantized in.
                for (part, scale) in [
                    (AWQ_INPUT_SCALE, &q.input_scale),
                    (AWQ_OUTPUT_SCALE, &q.output_scale),
                ] {
                    if let Some(s) = scale {
                        let bytes = DenseDtype::F32.encode(s);
                        let t = StoredTensor::owned(Dtype::F32, vec![s.len()], bytes);
                        out.push((format!("{prefix}.{part}"), t));
                    }
                }
            }
            None => out.push(dense(
                format!("{prefix}.weight"),
                vec![l.rows, l.cols],
                &l.w,
            )),
        }
        if let Some(b) = &l.bias {
            out.push(dense(format!("{prefix}.bias"), vec![l.rows], b));
        }
    }
    out
}

fn metadata(meta: &CheckpointMeta) -> Result<HashMap<String, String>> {
    Ok(HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (METADATA_KEY.to_string(), serde_json::to_string(meta)?),
    ]))
}

pub fn quantize(job: &Job, on_event: &mut dyn FnMut(Event)) -> Result<Summary> {
    let c = &job.opened.config;
    let source = job.opened.source.as_ref();
    let method = job.method;
    // Data-free methods still use calibration data when given: to record each layer's
    // output error.
    let calibration = job.calibration;
    if method.needs_calibration() && calibration.is_none() {
        bail!("{} needs calibration data", method.name());
    }
    let base = CheckpointMeta {
        format_version: FORMAT_VERSION,
        method: method.name().to_string(),
        settings: method.settings(),
        calibration: calibration.map(|cal| cal.record.clone()),
        source: job.source.clone(),
        layers: BTreeMap::new(),
    };
    let fingerprint = json!({
        "meta": base,
        "skip": job.skip.map(|r| r.as_str().to_string()),
        "sequential": job.sequential,
    });
    let work = work_dir(job.out);
    let done = prepare_work_dir(&work, &fingerprint, job.resume)?;
    let blocks = c.n_layers;
    on_event(Event::Started {
        done: done.min(blocks),
        blocks,
    });

    if let Some(cal) = calibration
        && cal.seqlen > c.max_position
    {
        bail!(
            "calibration windows of {} tokens exceed the model's context of {}",
            cal.seqlen,
            c.max_position
        );
    }
    let mut acts = match calibration {
        Some(cal) => {
            let embed = source.tensor("model.embed_tokens.weight")?.data;
            let mut x = Vec::with_capacity(cal.windows.len() * cal.seqlen * c.hidden_size);
            for w in &cal.windows {
                x.extend(embed_tokens(&embed, c.hidden_size, w)?);
            }
            Some(Activations {
                x,
                seqlen: cal.seqlen,
                rope: RopeTable::new(&c.rope_inv_freq(), 0, cal.seqlen),
            })
        }
        None => None,
    };
    let rows_per_window =
        calibration.map_or(0, |cal| method.sample_rows().div_ceil(cal.windows.len()));
    let dims = [c.hidden_size, c.q_dim(), c.hidden_size, c.intermediate_size];

    for layer in 0..blocks {
        let part = part_path(&work, layer);
        let last = layer + 1 == blocks;
        if layer < done {
            // Finished earlier: only rebuild the next block's inputs.
            if let (Some(a), false) = (acts.as_mut(), last) {
                let block = if job.sequential {
                    Block::load(c, &HfDir::open_file(&part)?, layer)?
                } else {
                    Block::load(c, source, layer)?
                };
                a.run(c, &block, None, true);
            }
            continue;
        }
        let mut weights = read_block_weights(c, source, layer)?;
        let stats = match acts.as_mut() {
            Some(a) => {
                let mut st = BlockStats::new(dims, rows_per_window);
                a.run(c, &dense_block(&weights), Some(&mut st), !job.sequential);
                st.finish();
                Some(st)
            }
            None => None,
        };
        let targets: Vec<LinearName> = LinearName::ALL
            .into_iter()
            .filter(|n| {
                !job.skip
                    .is_some_and(|r| r.is_match(&block_tensor_name(layer, n.module())))
            })
            .collect();
        // The layer errors compare against the weights as they were; keep a copy only when
        // the method rewrites them (a 1.5B model's block is 190 MB in f32).
        let original: Option<Vec<(LinearName, Vec<f32>)>> =
            (stats.is_some() && method.rewrites_weights()).then(|| {
                targets
                    .iter()
                    .map(|&n| (n, weights.linear(n).w.clone()))
                    .collect()
            });
        let quantized = method
            .quantize_block(&mut weights, stats.as_ref(), &targets)
            .with_context(|| format!("quantizing block {layer}"))?;
        let mut meta = base.clone();
        for (name, q) in &quantized {
            let m = &q.packed.matrix;
            let w = match original.iter().flatten().find(|(n, _)| n == name) {
                Some((_, w)) => w,
                None => &weights.linear(*name).w,
            };
            let rel_error = stats.as_ref().map(|st| {
                sampled_output_error(
                    w,
                    &q.effective_weight(),
                    &st.site(name.site()).h,
                    m.rows,
                    m.cols,
                )
            });
            meta.layers.insert(
                block_tensor_name(layer, name.module()),
                LayerRecord {
                    method: method.name().to_string(),
                    bits: m.spec.bits,
                    group: m.spec.group,
                    sym: m.spec.sym,
                    rows: m.rows,
                    cols: m.cols,
                    act_order: q.packed.perm.is_some(),
                    bits_per_weight: 8.0 * q.packed.storage_bytes() as f64
                        / (m.rows * m.cols) as f64,
                    rel_error,
                    rank: q.packed.low_rank.as_ref().map(|l| l.rank),
                    max_error_steps: Some(max_error_steps(
                        &weights.linear(*name).w,
                        &q.reconstructed(),
                        &q.packed,
                    )),
                },
            );
        }
        let tensors = block_tensors(c, source, layer, &weights, &quantized);
        write_safetensors(&part, &tensors, metadata(&meta)?)?;
        drop((weights, quantized, tensors, stats));
        if let (Some(a), true, false) = (acts.as_mut(), job.sequential, last) {
            // Exactly what a resumed run replays: the block as stored.
            a.run(
                c,
                &Block::load(c, &HfDir::open_file(&part)?, layer)?,
                None,
                true,
            );
        }
        on_event(Event::BlockDone { layer, blocks });
    }
    drop(acts);
    on_event(Event::Writing);
    let summary = assemble(job, &work, base)?;
    std::fs::remove_dir_all(&work).with_context(|| format!("cannot remove {}", work.display()))?;
    Ok(summary)
}

/// Input channels per scale of a quantized output head.
const HEAD_GROUP: usize = 128;

/// Writes the checkpoint from the finished blocks and the source's other tensors.
fn assemble(job: &Job, work: &Path, mut meta: CheckpointMeta) -> Result<Summary> {
    let c = &job.opened.config;
    let source = job.opened.source.as_ref();
    let parts = (0..c.n_layers)
        .map(|i| HfDir::open_file(&part_path(work, i)))
        .collect::<Result<Vec<_>>>()?;
    for p in &parts {
        let m = CheckpointMeta::from_dir(p)?
            .ok_or_else(|| anyhow!("{}: no recoup metadata", p.path().display()))?;
        meta.layers.extend(m.layers);
    }
    let mut tensors: Vec<(String, StoredTensor)> = Vec::new();
    let mut outer = vec!["model.embed_tokens.weight", "model.norm.weight"];
    match job.head_bits {
        Some(bits) => {
            let name = if c.tie_embeddings {
                "model.embed_tokens.weight"
            } else {
                "lm_head.weight"
            };
            let w = source.tensor(name)?.data;
            let spec = GridSpec::new(bits, HEAD_GROUP, false)?;
            let matrix = quantize_rtn(&w, c.vocab_size, c.hidden_size, &spec, Clip::None, None)
                .pack(spec, c.vocab_size, c.hidden_size);
            let head = PackedLinear::plain(matrix);
            meta.layers.insert(
                "lm_head".into(),
                LayerRecord {
                    method: "rtn".into(),
                    bits,
                    group: HEAD_GROUP,
                    sym: false,
                    rows: c.vocab_size,
                    cols: c.hidden_size,
                    act_order: false,
                    bits_per_weight: 8.0 * head.storage_bytes() as f64
                        / (c.vocab_size * c.hidden_size) as f64,
                    rel_error: None,
                    rank: None,
                    max_error_steps: None,
                },
            );
            tensors.extend(packed_tensors("lm_head", &head));
            meta.settings["head_bits"] = bits.into();
        }
        None if !c.tie_embeddings => outer.push("lm_head.weight"),
        None => {}
    }
    for name in outer {
        let t = source.tensor(name)?;
        let dtype = source.dense_dtype(name);
        tensors.push((
            name.to_string(),
            StoredTensor::owned(dtype.safetensors(), t.shape, dtype.encode(&t.data)),
        ));
    }
    for p in &parts {
        for name in p.names() {
            let (dtype, shape, bytes) = p.raw(&name).expect("listed tensor");
            tensors.push((name, StoredTensor::borrowed(dtype, shape.to_vec(), bytes)));
        }
    }
    let mut config = c.to_hf()?;
    let mut qc = meta.settings.clone();
    qc["quant_method"] = "recoup".into();
    qc["method"] = meta.method.clone().into();
    qc["format_version"] = FORMAT_VERSION.into();
    config["quantization_config"] = qc;
    let extra = tokenizer_files(&job.opened.tokenizer)?;
    atomic::write_dir(job.out, |tmp| {
        std::fs::write(
            tmp.join("config.json"),
            serde_json::to_string_pretty(&config)? + "\n",
        )?;
        for (file, text) in &extra {
            std::fs::write(tmp.join(file), text)?;
        }
        write_safetensors(&tmp.join("model.safetensors"), &tensors, metadata(&meta)?)
    })
    .with_context(|| format!("cannot write {}", job.out.display()))?;
    let (mut bits, mut weights, mut errs) = (0f64, 0f64, Vec::new());
    for (_, l) in meta.block_layers() {
        let n = (l.rows * l.cols) as f64;
        bits += l.bits_per_weight * n;
        weights += n;
        errs.extend(l.rel_error);
    }
    Ok(Summary {
        quantized_layers: meta.block_layers().count(),
        bits_per_weight: if weights > 0.0 { bits / weights } else { 0.0 },
        mean_rel_error: (!errs.is_empty()).then(|| errs.iter().sum::<f64>() / errs.len() as f64),
    })
}
