//! The Llama-family decoder (Llama 2/3, SmolLM2, Mistral-style; Qwen2 adds QKV biases):
//! RMSNorm, rotary embeddings, grouped-query attention, SwiGLU, tied or separate head.

use crate::config::ModelConfig;
use crate::kv_cache::KvCache;
use crate::linear::{DenseF32, Linear};
use anyhow::{Result, anyhow, bail};
use recoup_formats::TensorSource;
use recoup_kernels::attention::{AttentionShape, causal_attention};
use recoup_kernels::ops::{RopeTable, rms_norm, silu_mul};
use std::sync::Arc;

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
    embed: Arc<Vec<f32>>,
    pub blocks: Vec<Block>,
    norm: Vec<f32>,
    pub lm_head: Linear,
    inv_freq: Vec<f64>,
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
        let w = self.get(&format!("{prefix}.weight"), &[out, inp])?;
        let bias_name = format!("{prefix}.bias");
        let bias = if self.source.contains(&bias_name) {
            Some(self.get(&bias_name, &[out])?)
        } else {
            None
        };
        Ok(Linear::new(
            Box::new(DenseF32::new(Arc::new(w), out, inp)),
            bias,
        ))
    }
}

impl Model {
    /// Loads every tensor as f32 from `source`.
    pub fn from_source(config: ModelConfig, source: &dyn TensorSource) -> Result<Self> {
        let c = &config;
        let r = Reader { source };
        let d = c.hidden_size;
        let embed = Arc::new(r.get("model.embed_tokens.weight", &[c.vocab_size, d])?);
        let mut blocks = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let n = |m: &str| block_tensor_name(i, m);
            blocks.push(Block {
                attn_norm: r.get(&n("input_layernorm.weight"), &[d])?,
                q: r.linear(&n("self_attn.q_proj"), c.q_dim(), d)?,
                k: r.linear(&n("self_attn.k_proj"), c.kv_dim(), d)?,
                v: r.linear(&n("self_attn.v_proj"), c.kv_dim(), d)?,
                o: r.linear(&n("self_attn.o_proj"), d, c.q_dim())?,
                ffn_norm: r.get(&n("post_attention_layernorm.weight"), &[d])?,
                gate: r.linear(&n("mlp.gate_proj"), c.intermediate_size, d)?,
                up: r.linear(&n("mlp.up_proj"), c.intermediate_size, d)?,
                down: r.linear(&n("mlp.down_proj"), d, c.intermediate_size)?,
            });
        }
        let norm = r.get("model.norm.weight", &[d])?;
        let lm_head = if c.tie_embeddings {
            Linear::new(
                Box::new(DenseF32::new(embed.clone(), c.vocab_size, d)),
                None,
            )
        } else {
            r.linear("lm_head", c.vocab_size, d)?
        };
        let inv_freq = config.rope_inv_freq();
        Ok(Self {
            config,
            embed,
            blocks,
            norm,
            lm_head,
            inv_freq,
        })
    }

    /// Runs `tokens` at the positions after those in `cache`, appends them to the cache, and
    /// returns the final-normed hidden states (`tokens.len()` rows of `hidden_size`).
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        let c = &self.config;
        let (t, d, p0) = (tokens.len(), c.hidden_size, cache.len());
        if p0 + t > c.max_position {
            bail!(
                "{} positions exceed the model's context of {}",
                p0 + t,
                c.max_position
            );
        }
        if p0 + t > cache.capacity() {
            bail!(
                "{} positions exceed the KV cache's {}",
                p0 + t,
                cache.capacity()
            );
        }
        let mut x = Vec::with_capacity(t * d);
        for &tok in tokens {
            let row = self
                .embed
                .get(tok as usize * d..(tok as usize + 1) * d)
                .ok_or_else(|| {
                    anyhow!(
                        "token id {tok} is outside the vocabulary of {}",
                        c.vocab_size
                    )
                })?;
            x.extend_from_slice(row);
        }
        let rope = RopeTable::new(&self.inv_freq, p0, t);
        for (layer, block) in self.blocks.iter().enumerate() {
            self.block_forward(layer, block, &mut x, t, cache, &rope);
        }
        cache.advance(t);
        let mut out = vec![0f32; t * d];
        rms_norm(&x, &self.norm, c.rms_eps, &mut out);
        Ok(out)
    }

    fn block_forward(
        &self,
        layer: usize,
        b: &Block,
        x: &mut [f32],
        t: usize,
        cache: &mut KvCache,
        rope: &RopeTable,
    ) {
        let c = &self.config;
        let mut h = vec![0f32; x.len()];
        rms_norm(x, &b.attn_norm, c.rms_eps, &mut h);
        let mut q = b.q.forward(&h, t);
        let mut k = b.k.forward(&h, t);
        let v = b.v.forward(&h, t);
        rope.apply(&mut q, c.n_heads, c.head_dim);
        rope.apply(&mut k, c.n_kv_heads, c.head_dim);
        cache.write(layer, &k, &v, t);
        let mut attn = vec![0f32; t * c.q_dim()];
        let shape = AttentionShape {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        };
        causal_attention(
            &q,
            &cache.k[layer],
            &cache.v[layer],
            &mut attn,
            t,
            cache.len(),
            shape,
        );
        let o = b.o.forward(&attn, t);
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        rms_norm(x, &b.ffn_norm, c.rms_eps, &mut h);
        let mut gate = b.gate.forward(&h, t);
        let up = b.up.forward(&h, t);
        silu_mul(&mut gate, &up);
        let down = b.down.forward(&gate, t);
        x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
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

    /// Bytes of weights one decoded token reads (every linear layer and the head).
    pub fn weight_bytes_per_token(&self) -> usize {
        self.block_linears()
            .map(|l| l.op.weight_bytes())
            .sum::<usize>()
            + self.lm_head.op.weight_bytes()
    }
}
