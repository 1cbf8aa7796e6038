//! The Llama-family decoder (Llama 2/3, SmolLM2, Mistral-style; Qwen2 adds QKV biases):
//! RMSNorm, rotary embeddings, grouped-query attention, SwiGLU, tied or separate head.

use crate::config::ModelConfig;
use crate::kv_cache::KvCache;
use crate::linear::{DenseF32, KernelOptions, Linear, PackedOp};
use crate::qdec::{Compensation, QdecOptions, SharedSelection};
use anyhow::{Context, Result, anyhow, bail};
use recoup_formats::TensorSource;
use recoup_formats::residual::{ResidualFile, Tier};
use recoup_kernels::attention::{AttentionShape, TreeMask, causal_attention};
use recoup_kernels::ops::{RopeTable, rms_norm, silu_mul};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

pub struct Block {
    pub attn_norm: Vec<f32>,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub ffn_norm: Vec<f32>,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

pub struct Model {
    pub config: ModelConfig,
    pub(crate) embed: Arc<Vec<f32>>,
    pub blocks: Vec<Block>,
    pub(crate) norm: Vec<f32>,
    pub lm_head: Linear,
    pub(crate) inv_freq: Vec<f64>,
    /// Switches QDEC's correction in every layer (see [`Model::set_qdec_enabled`]).
    qdec_enabled: Arc<AtomicBool>,
}

/// Canonical (Hugging Face) name of a block tensor.
pub fn block_tensor_name(layer: usize, module: &str) -> String {
    format!("model.layers.{layer}.{module}")
}

/// Reads tensors by name and checks each against the shape the config implies.
struct Reader<'a> {
    source: &'a dyn TensorSource,
}

impl Reader<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.source.tensor(name)?;
        if t.shape.as_slice() != shape {
            bail!(
                "{}: tensor {name} has shape {:?}, the config implies {shape:?}",
                self.source.path().display(),
                t.shape
            );
        }
        Ok(t.data)
    }

    fn linear(&self, prefix: &str, out: usize, inp: usize) -> Result<Linear> {
        let bias_name = format!("{prefix}.bias");
        let bias = if self.source.contains(&bias_name) {
            Some(self.get(&bias_name, &[out])?)
        } else {
            None
        };
        let op: Box<dyn crate::linear::LinearOp> = match self.source.packed(prefix)? {
            Some(p) => {
                let m = &p.matrix;
                if (m.rows, m.cols) != (out, inp) {
                    bail!(
                        "{}: {prefix} is packed as [{}, {}], the config implies [{out}, {inp}]",
                        self.source.path().display(),
                        m.rows,
                        m.cols
                    );
                }
                Box::new(PackedOp::new(p))
            }
            None => {
                let w = self.get(&format!("{prefix}.weight"), &[out, inp])?;
                Box::new(DenseF32::new(Arc::new(w), out, inp))
            }
        };
        Ok(Linear::new(op, bias))
    }
}

/// Where a block's linear layers read their input: q/k/v share one, gate/up share one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Site {
    Qkv,
    O,
    GateUp,
    Down,
}

/// A block's linear layers: module path (under `model.layers.N.`) and input site, in the
/// order of [`Block::linears_mut`].
pub const BLOCK_LINEARS: [(&str, Site); 7] = [
    ("self_attn.q_proj", Site::Qkv),
    ("self_attn.k_proj", Site::Qkv),
    ("self_attn.v_proj", Site::Qkv),
    ("self_attn.o_proj", Site::O),
    ("mlp.gate_proj", Site::GateUp),
    ("mlp.up_proj", Site::GateUp),
    ("mlp.down_proj", Site::Down),
];

impl Block {
    /// The linear layers, in the order of [`BLOCK_LINEARS`].
    pub fn linears_mut(&mut self) -> [&mut Linear; 7] {
        [
            &mut self.q,
            &mut self.k,
            &mut self.v,
            &mut self.o,
            &mut self.gate,
            &mut self.up,
            &mut self.down,
        ]
    }

    /// Reads decoder block `layer` from `source`.
    pub fn load(config: &ModelConfig, source: &dyn TensorSource, layer: usize) -> Result<Self> {
        let (c, r, d) = (config, Reader { source }, config.hidden_size);
        let n = |m: &str| block_tensor_name(layer, m);
        Ok(Block {
            attn_norm: r.get(&n("input_layernorm.weight"), &[d])?,
            q: r.linear(&n("self_attn.q_proj"), c.q_dim(), d)?,
            k: r.linear(&n("self_attn.k_proj"), c.kv_dim(), d)?,
            v: r.linear(&n("self_attn.v_proj"), c.kv_dim(), d)?,
            o: r.linear(&n("self_attn.o_proj"), d, c.q_dim())?,
            ffn_norm: r.get(&n("post_attention_layernorm.weight"), &[d])?,
            gate: r.linear(&n("mlp.gate_proj"), c.intermediate_size, d)?,
            up: r.linear(&n("mlp.up_proj"), c.intermediate_size, d)?,
            down: r.linear(&n("mlp.down_proj"), d, c.intermediate_size)?,
        })
    }

    /// Runs the block on `t` positions (`x`, updated in place) after the `p0` positions whose
    /// keys and values `k_cache` and `v_cache` hold (rows of `kv_dim`; the new ones are
    /// written after them). `tree`: the new positions form a tree rather than one sequence
    /// (`rope` then holds each one's position). `tap` sees each distinct linear input as it
    /// is computed.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        c: &ModelConfig,
        x: &mut [f32],
        t: usize,
        k_cache: &mut [f32],
        v_cache: &mut [f32],
        p0: usize,
        rope: &RopeTable,
        tree: Option<&TreeMask>,
        tap: &mut dyn FnMut(Site, &[f32]),
    ) {
        let gate = self.forward_to_down(c, x, t, k_cache, v_cache, p0, rope, tree, tap);
        let down = self.down.forward(&gate, t);
        x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
    }

    /// `forward` up to the down projection, whose input it returns (`x` then holds the
    /// residual stream after attention). Calibration stops here when nothing reads the
    /// block's output: the down projection is 30 % of a Qwen2.5 block's work.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_to_down(
        &self,
        c: &ModelConfig,
        x: &mut [f32],
        t: usize,
        k_cache: &mut [f32],
        v_cache: &mut [f32],
        p0: usize,
        rope: &RopeTable,
        tree: Option<&TreeMask>,
        tap: &mut dyn FnMut(Site, &[f32]),
    ) -> Vec<f32> {
        let mut h = vec![0f32; x.len()];
        rms_norm(x, &self.attn_norm, c.rms_eps, &mut h);
        tap(Site::Qkv, &h);
        let mut q = self.q.forward(&h, t);
        let mut k = self.k.forward(&h, t);
        let v = self.v.forward(&h, t);
        rope.apply(&mut q, c.n_heads, c.head_dim);
        rope.apply(&mut k, c.n_kv_heads, c.head_dim);
        let kv = c.kv_dim();
        k_cache[p0 * kv..(p0 + t) * kv].copy_from_slice(&k);
        v_cache[p0 * kv..(p0 + t) * kv].copy_from_slice(&v);
        let mut attn = vec![0f32; t * c.q_dim()];
        let shape = AttentionShape {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        };
        causal_attention(&q, k_cache, v_cache, &mut attn, t, p0, shape, tree);
        tap(Site::O, &attn);
        let o = self.o.forward(&attn, t);
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        rms_norm(x, &self.ffn_norm, c.rms_eps, &mut h);
        tap(Site::GateUp, &h);
        let mut gate = self.gate.forward(&h, t);
        let up = self.up.forward(&h, t);
        silu_mul(&mut gate, &up);
        tap(Site::Down, &gate);
        gate
    }
}

/// Rows of `embed` (`[vocab, d]`) for `tokens`, one after another.
pub fn embed_tokens(embed: &[f32], d: usize, tokens: &[u32]) -> Result<Vec<f32>> {
    let vocab = embed.len() / d.max(1);
    let mut x = Vec::with_capacity(tokens.len() * d);
    for &tok in tokens {
        let row = embed
            .get(tok as usize * d..(tok as usize + 1) * d)
            .ok_or_else(|| anyhow!("token id {tok} is outside the vocabulary of {vocab}"))?;
        x.extend_from_slice(row);
    }
    Ok(x)
}

impl Model {
    /// Loads every tensor as f32 from `source`.
    pub fn from_source(config: ModelConfig, source: &dyn TensorSource) -> Result<Self> {
        let c = &config;
        let r = Reader { source };
        let d = c.hidden_size;
        let embed = Arc::new(r.get("model.embed_tokens.weight", &[c.vocab_size, d])?);
        let blocks = (0..c.n_layers)
            .map(|i| Block::load(c, source, i))
            .collect::<Result<Vec<_>>>()?;
        let norm = r.get("model.norm.weight", &[d])?;
        // A quantized checkpoint may carry a packed head even when the embedding is tied.
        let packed_head = source.contains("lm_head.qweight");
        let lm_head = if c.tie_embeddings && !packed_head {
            Linear::new(
                Box::new(DenseF32::new(embed.clone(), c.vocab_size, d)),
                None,
            )
        } else {
            r.linear("lm_head", c.vocab_size, d)?
        };
        Ok(Self::assemble(config, embed, blocks, norm, lm_head))
    }

    /// A model from its parts (shapes already checked).
    pub(crate) fn assemble(
        config: ModelConfig,
        embed: Arc<Vec<f32>>,
        blocks: Vec<Block>,
        norm: Vec<f32>,
        lm_head: Linear,
    ) -> Self {
        let inv_freq = config.rope_inv_freq();
        Self {
            config,
            embed,
            blocks,
            norm,
            lm_head,
            inv_freq,
            qdec_enabled: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Runs `tokens` at the positions after those in `cache`, appends them to the cache, and
    /// returns the final-normed hidden states (`tokens.len()` rows of `hidden_size`).
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        self.forward_tapped(tokens, cache, &mut |_, _, _| {})
    }

    /// [`Self::forward`], showing `tap` each block's distinct linear inputs (block index,
    /// site, `tokens.len()` rows) as they are computed.
    pub fn forward_tapped(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        tap: &mut dyn FnMut(usize, Site, &[f32]),
    ) -> Result<Vec<f32>> {
        let p0 = cache.len();
        self.check_room(cache, p0 + tokens.len(), tokens.len())?;
        let rope = RopeTable::new(&self.inv_freq, p0, tokens.len());
        let out = self.run(tokens, cache, &rope, None, tap)?;
        cache.advance(tokens.len());
        Ok(out)
    }

    /// Runs a forest of new positions after the cached prefix in one pass: `parents[i]` is
    /// the new position token `i` continues (`None`: the prefix's last). Each position sees
    /// the prefix and its own ancestors, at position prefix + depth, so every branch gets
    /// what [`Self::forward`] would give it alone. Returns the final-normed hidden states;
    /// the cache keeps only the prefix.
    pub fn forward_tree(
        &self,
        tokens: &[u32],
        parents: &[Option<usize>],
        cache: &mut KvCache,
    ) -> Result<Vec<f32>> {
        if parents.len() != tokens.len() {
            bail!("{} parents for {} tokens", parents.len(), tokens.len());
        }
        let mut depth = vec![0usize; tokens.len()];
        for (i, parent) in parents.iter().enumerate() {
            if let Some(p) = *parent {
                if p >= i {
                    bail!("tree position {i} has parent {p}, not an earlier position");
                }
                depth[i] = depth[p] + 1;
            }
        }
        let p0 = cache.len();
        let deepest = depth.iter().max().map_or(0, |d| d + 1);
        self.check_room(cache, p0 + deepest, tokens.len())?;
        let rope = RopeTable::at_positions(&self.inv_freq, depth.iter().map(|d| p0 + d));
        let tree = TreeMask::from_parents(parents);
        self.run(tokens, cache, &rope, Some(&tree), &mut |_, _, _| {})
    }

    /// Refuses a run reaching position `end` or storing `t` new positions the cache cannot hold.
    fn check_room(&self, cache: &KvCache, end: usize, t: usize) -> Result<()> {
        let max = self.config.max_position;
        if end > max {
            bail!("{end} positions exceed the model's context of {max}");
        }
        if cache.len() + t > cache.capacity() {
            bail!(
                "{} positions exceed the KV cache's {}",
                cache.len() + t,
                cache.capacity()
            );
        }
        Ok(())
    }

    /// The blocks and the final norm over `tokens`, written into the cache after its
    /// positions (which the caller then keeps or not).
    fn run(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        rope: &RopeTable,
        tree: Option<&TreeMask>,
        tap: &mut dyn FnMut(usize, Site, &[f32]),
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        let (t, d, p0) = (tokens.len(), c.hidden_size, cache.len());
        let mut x = embed_tokens(&self.embed, d, tokens)?;
        for (layer, block) in self.blocks.iter().enumerate() {
            let (k, v) = cache.layer_mut(layer);
            block.forward(c, &mut x, t, k, v, p0, rope, tree, &mut |site, x| {
                tap(layer, site, x)
            });
        }
        let mut out = vec![0f32; t * d];
        rms_norm(&x, &self.norm, c.rms_eps, &mut out);
        Ok(out)
    }

    /// Logits of `n` hidden rows (`n · vocab_size` values).
    pub fn logits(&self, hidden: &[f32], n: usize) -> Vec<f32> {
        self.lm_head.forward(hidden, n)
    }

    /// Every linear layer of the decoder blocks (not the output head), block by block.
    pub fn block_linears(&self) -> impl Iterator<Item = &Linear> {
        self.blocks
            .iter()
            .flat_map(|b| [&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down])
    }

    /// Parameters of the model (the tied head counted once).
    pub fn parameter_count(&self) -> usize {
        let linears: usize = self
            .block_linears()
            .map(|l| l.op.in_features() * l.op.out_features())
            .sum();
        let head = if self.config.tie_embeddings {
            0
        } else {
            self.config.vocab_size * self.config.hidden_size
        };
        linears + self.embed.len() + head
    }

    /// Bits per weight of the decoder blocks' linear layers, everything they store counted.
    pub fn block_bits_per_weight(&self) -> f64 {
        let (bytes, weights) = self.block_linears().fold((0usize, 0usize), |(b, w), l| {
            (
                b + l.op.weight_bytes(),
                w + l.op.in_features() * l.op.out_features(),
            )
        });
        8.0 * bytes as f64 / weights.max(1) as f64
    }

    /// Chooses the compute path of every packed layer.
    pub fn set_kernel_options(&mut self, options: KernelOptions) {
        for b in &mut self.blocks {
            for l in b.linears_mut() {
                l.op.set_options(options);
            }
        }
        self.lm_head.op.set_options(options);
    }

    /// Attaches QDEC's residual correction from `file` to every layer it covers; errors name
    /// the file and layer (missing selector data, mismatched shapes, layers this model lacks).
    pub fn attach_qdec(
        &mut self,
        file: &ResidualFile,
        options: &QdecOptions,
        tier: Tier,
    ) -> Result<()> {
        let path = file.path().display().to_string();
        let mut attached = 0;
        for (layer, block) in self.blocks.iter_mut().enumerate() {
            let residuals = BLOCK_LINEARS
                .iter()
                .map(|(module, _)| file.layer(&block_tensor_name(layer, module), tier))
                .collect::<Result<Vec<_>>>()?;
            let mut readers: HashMap<Site, usize> = HashMap::new();
            for ((_, site), r) in BLOCK_LINEARS.iter().zip(&residuals) {
                *readers.entry(*site).or_default() += usize::from(r.is_some());
            }
            let mut shared: HashMap<Site, Arc<SharedSelection>> = HashMap::new();
            let linears = BLOCK_LINEARS.iter().zip(block.linears_mut());
            for (((module, site), linear), residual) in linears.zip(residuals) {
                let Some(residual) = residual else {
                    continue;
                };
                let prefix = block_tensor_name(layer, module);
                let k = options.k_chunk.for_site(*site);
                let on = self.qdec_enabled.clone();
                let shared = shared
                    .entry(*site)
                    .or_insert_with(|| Arc::new(SharedSelection::new(readers[site])))
                    .clone();
                Compensation::new(residual, k, options.select, options.in_prefill, on, shared)
                    .and_then(|c| linear.op.attach_residual(c))
                    .with_context(|| format!("{path}: {prefix}"))?;
                attached += 1;
            }
        }
        if attached < file.meta.layers.len() {
            let extra = file
                .meta
                .layers
                .keys()
                .find(|p| !self.has_linear(p))
                .cloned()
                .unwrap_or_default();
            bail!("{path}: holds residuals for layers this model does not have ({extra})");
        }
        Ok(())
    }

    fn has_linear(&self, prefix: &str) -> bool {
        (0..self.blocks.len()).any(|layer| {
            BLOCK_LINEARS
                .iter()
                .any(|(m, _)| block_tensor_name(layer, m) == prefix)
        })
    }

    /// Switches QDEC's correction off or on in every layer, between forward passes.
    pub fn set_qdec_enabled(&self, on: bool) {
        self.qdec_enabled.store(on, Ordering::Relaxed);
    }

    /// Bytes of QDEC residual one decoded token reads.
    pub fn residual_bytes_per_token(&self) -> usize {
        self.block_linears().map(|l| l.op.residual_bytes()).sum()
    }

    /// Bytes of weights one decoded token reads (every linear layer and the head).
    pub fn weight_bytes_per_token(&self) -> usize {
        self.block_linears()
            .map(|l| l.op.weight_bytes())
            .sum::<usize>()
            + self.lm_head.op.weight_bytes()
    }
}
