//! Whole-model decode on an NVIDIA GPU (feature `cuda`): the weights of a loaded [`Model`]
//! uploaded as they are stored (packed codes, f16 scales, low-rank factors; QDEC residuals
//! pinned in host memory and mapped into the GPU), the KV cache on the device, one decode
//! step per call. The CPU model stays the reference: the kernels are checked against it.

use crate::linear::{LayerWeights, Linear, LowRankPath};
use crate::qdec::Select;
use crate::{Model, ModelConfig};
use anyhow::{Result, anyhow, bail};
use cudarc::driver::{CudaSlice, DeviceRepr};
use half::f16;
use recoup_formats::packed::Factor;
use recoup_kernels::cuda::{
    FactorArgs, GemvEpilogue, Gpu, MappedHost, PackedArgs, QdecArgs, k_chunk_estimate,
};
use std::sync::Arc;

/// Blocks of the QDEC kernel per layer (the paper's n_tb): enough SMs to keep the PCIe
/// reads in flight, few enough to leave the rest to the base product.
const QDEC_BLOCKS: u32 = 8;

/// Largest low-rank branch the decode buffers hold.
const BRANCH_MAX_RANK: usize = 1024;

fn f16_bits(v: &[f16]) -> Vec<u16> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Device buffers that must live as long as the addresses taken from them.
#[derive(Default)]
struct Keep {
    buffers: Vec<Box<dyn std::any::Any>>,
    /// Bytes of everything uploaded or allocated.
    bytes: usize,
}

impl Keep {
    /// Uploads `v` and returns its address.
    fn put<T: DeviceRepr + 'static>(&mut self, gpu: &Gpu, v: &[T]) -> Result<u64> {
        let s = gpu.upload(v)?;
        let p = gpu.ptr(&s);
        self.bytes += std::mem::size_of_val(v);
        self.buffers.push(Box::new(s));
        Ok(p)
    }
    /// Allocates `n` zeroed f32 and returns their address.
    fn zeros(&mut self, gpu: &Gpu, n: usize) -> Result<u64> {
        let s: CudaSlice<f32> = gpu.zeros(n.max(1))?;
        let p = gpu.ptr(&s);
        self.bytes += 4 * n.max(1);
        self.buffers.push(Box::new(s));
        Ok(p)
    }
    fn factor(&mut self, gpu: &Gpu, f: &Factor) -> Result<FactorArgs> {
        Ok(match f {
            Factor::F16(v) => FactorArgs {
                f16: self.put(gpu, &f16_bits(v))?,
                ..Default::default()
            },
            Factor::Int8 { codes, scales } => FactorArgs {
                i8: self.put(gpu, &codes.iter().map(|&c| c as u8).collect::<Vec<u8>>())?,
                scales: self.put(gpu, &f16_bits(scales))?,
                ..Default::default()
            },
        })
    }
}

enum GpuWeights {
    Dense(u64),
    Packed {
        m: PackedArgs,
        /// The act-order permutation, if the columns are stored permuted.
        perm: Option<u64>,
        /// `(A, B, rank)` of the low-rank branch.
        low_rank: Option<(FactorArgs, FactorArgs, usize)>,
    },
}

struct GpuQdec {
    args: QdecArgs,
    _residual: MappedHost,
}

struct GpuLinear {
    rows: usize,
    cols: usize,
    bias: u64,
    w: GpuWeights,
    qdec: Option<GpuQdec>,
}

impl GpuLinear {
    fn upload(gpu: &Gpu, l: &Linear, keep: &mut Keep) -> Result<Self> {
        let (rows, cols) = (l.op.out_features(), l.op.in_features());
        let bias = match &l.bias {
            Some(b) => keep.put(gpu, b)?,
            None => 0,
        };
        let (w, qdec) = match l.op.weights() {
            LayerWeights::Dense(w) => (GpuWeights::Dense(keep.put(gpu, w)?), None),
            LayerWeights::Packed { packed, qdec } => {
                let m = &packed.matrix;
                let args = PackedArgs {
                    bits: m.spec.bits,
                    rows,
                    cols,
                    group: m.spec.group,
                    // The GPU kernels read codes, scales and zeros row-major, as files store them.
                    codes: keep.put(gpu, &m.row_major_codes())?,
                    scales: keep.put(gpu, &f16_bits(&m.row_major_scales()))?,
                    zeros: if m.spec.sym {
                        0
                    } else {
                        keep.put(gpu, &m.row_major_zeros())?
                    },
                    sym_zero: i32::from(m.spec.sym_zero()),
                };
                let perm = match &packed.perm {
                    Some(p) => Some(keep.put(gpu, p)?),
                    None => None,
                };
                let low_rank = match &packed.low_rank {
                    Some(lr) if lr.rank > BRANCH_MAX_RANK => bail!(
                        "the GPU path holds the low-rank branch's v in {BRANCH_MAX_RANK} values; rank {} is larger",
                        lr.rank
                    ),
                    Some(lr) => Some((keep.factor(gpu, &lr.a)?, keep.factor(gpu, &lr.b)?, lr.rank)),
                    None => None,
                };
                let qdec = match qdec {
                    Some(c) => {
                        let floors = match c.selection() {
                            Select::Exact => 0,
                            Select::Bucket => {
                                let f = c.floors().expect("bucket selection has floors");
                                keep.put(gpu, &f.floors)?
                            }
                            other => bail!(
                                "QDEC on the GPU selects exactly or by buckets, not `{}`",
                                other.name()
                            ),
                        };
                        let r = c.residual();
                        let residual = MappedHost::new(gpu, r.codes.bytes())?;
                        let args = QdecArgs {
                            residual: residual.device_ptr(),
                            scales: keep.put(gpu, &f16_bits(&r.scales))?,
                            rows: r.rows,
                            cols: r.cols,
                            k_chunk: c.k_chunk(),
                            floors,
                            blocks: QDEC_BLOCKS,
                        };
                        Some(GpuQdec {
                            args,
                            _residual: residual,
                        })
                    }
                    None => None,
                };
                (
                    GpuWeights::Packed {
                        m: args,
                        perm,
                        low_rank,
                    },
                    qdec,
                )
            }
        };
        Ok(Self {
            rows,
            cols,
            bias,
            w,
            qdec,
        })
    }
}

struct GpuBlock {
    attn_norm: u64,
    ffn_norm: u64,
    /// q, k, v, o, gate, up, down.
    linears: Vec<GpuLinear>,
}

/// Scratch vectors of one decode step, by address.
struct Buffers {
    x: CudaSlice<f32>,
    h: u64,
    q: u64,
    k: u64,
    v: u64,
    attn: u64,
    o: u64,
    gate: u64,
    up: u64,
    down: u64,
    permuted: u64,
    branch_v: u64,
    branch_t: u64,
    scores: u64,
    logits: CudaSlice<f32>,
}

/// A model on the GPU, decoding one token per [`CudaModel::step`].
pub struct CudaModel {
    pub gpu: Gpu,
    pub config: ModelConfig,
    embed: Arc<Vec<f32>>,
    blocks: Vec<GpuBlock>,
    norm: u64,
    head: GpuLinear,
    inv_freq: u64,
    half: usize,
    caches: Vec<(u64, u64)>,
    max_len: usize,
    len: usize,
    buf: Buffers,
    low_rank: LowRankPath,
    qdec_on: bool,
    /// Bytes of weights and of the KV cache on the device.
    pub device_bytes: usize,
    /// Owns every buffer whose address the fields above hold.
    _keep: Keep,
}

impl CudaModel {
    /// Uploads `model` to GPU `ordinal` with a KV cache of `max_len` positions.
    pub fn upload(
        model: &Model,
        ordinal: usize,
        max_len: usize,
        low_rank: LowRankPath,
    ) -> Result<Self> {
        let gpu = Gpu::open(ordinal)?;
        let c = model.config.clone();
        if max_len > c.max_position {
            bail!(
                "{max_len} positions exceed the model's context of {}",
                c.max_position
            );
        }
        let mut keep = Keep::default();
        let mut blocks = Vec::new();
        for b in &model.blocks {
            let linears = [&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down]
                .into_iter()
                .map(|l| GpuLinear::upload(&gpu, l, &mut keep))
                .collect::<Result<Vec<_>>>()?;
            blocks.push(GpuBlock {
                attn_norm: keep.put(&gpu, &b.attn_norm)?,
                ffn_norm: keep.put(&gpu, &b.ffn_norm)?,
                linears,
            });
        }
        let head = GpuLinear::upload(&gpu, &model.lm_head, &mut keep)?;
        let norm = keep.put(&gpu, &model.norm)?;
        let inv_freq = keep.put(&gpu, &model.inv_freq)?;
        let kv = c.kv_dim();
        let mut caches = Vec::new();
        for _ in 0..c.n_layers {
            caches.push((
                keep.zeros(&gpu, max_len * kv)?,
                keep.zeros(&gpu, max_len * kv)?,
            ));
        }
        let widest = model
            .block_linears()
            .map(|l| l.op.in_features().max(l.op.out_features()))
            .max()
            .unwrap_or(c.hidden_size);
        let x: CudaSlice<f32> = gpu.zeros(c.hidden_size)?;
        let logits: CudaSlice<f32> = gpu.zeros(c.vocab_size)?;
        let buf = Buffers {
            x,
            h: keep.zeros(&gpu, c.hidden_size)?,
            q: keep.zeros(&gpu, c.q_dim())?,
            k: keep.zeros(&gpu, kv)?,
            v: keep.zeros(&gpu, kv)?,
            attn: keep.zeros(&gpu, c.q_dim())?,
            o: keep.zeros(&gpu, c.hidden_size)?,
            gate: keep.zeros(&gpu, c.intermediate_size)?,
            up: keep.zeros(&gpu, c.intermediate_size)?,
            down: keep.zeros(&gpu, c.hidden_size)?,
            permuted: keep.zeros(&gpu, widest)?,
            branch_v: keep.zeros(&gpu, BRANCH_MAX_RANK)?,
            branch_t: keep.zeros(&gpu, widest.max(c.vocab_size))?,
            scores: keep.zeros(&gpu, c.n_heads * max_len)?,
            logits,
        };
        let device_bytes = keep.bytes;
        gpu.sync()?;
        Ok(Self {
            half: model.inv_freq.len(),
            embed: model.embed.clone(),
            gpu,
            config: c,
            blocks,
            norm,
            head,
            inv_freq,
            caches,
            max_len,
            len: 0,
            buf,
            low_rank,
            qdec_on: true,
            device_bytes,
            _keep: keep,
        })
    }

    /// Empties the KV cache.
    pub fn reset(&mut self) {
        self.len = 0;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Switches QDEC's correction between tokens (for the paired slowdown measurement).
    pub fn set_qdec_enabled(&mut self, on: bool) {
        self.qdec_on = on;
    }

    /// Host bytes pinned for QDEC's residuals.
    pub fn residual_host_bytes(&self) -> usize {
        let layers = self.blocks.iter().flat_map(|b| &b.linears);
        layers
            .filter_map(|l| l.qdec.as_ref())
            .map(|q| q._residual.len())
            .sum()
    }

    /// The `k_chunk` the bandwidth model picks for this GPU at `bits`: device and mapped
    /// host memory read throughput measured here (papers.md B.7).
    pub fn k_chunk_model(&self, bits: u32) -> Result<(usize, f64, f64)> {
        let words = 64 << 20; // 256 MiB of device memory
        let dev: CudaSlice<u32> = self.gpu.zeros(words)?;
        let device_gbps =
            4.0 * words as f64 / self.gpu.read_seconds(self.gpu.ptr(&dev), words, 10)? / 1e9;
        let host_words = 16 << 20; // 64 MiB over the host link
        let host = MappedHost::new(&self.gpu, &vec![1u8; 4 * host_words])?;
        let link_gbps = 4.0 * host_words as f64
            / self.gpu.read_seconds(host.device_ptr(), host_words, 3)?
            / 1e9;
        Ok((
            k_chunk_estimate(bits, device_gbps, link_gbps),
            device_gbps,
            link_gbps,
        ))
    }

    fn linear(&self, l: &GpuLinear, x: u64, y: u64) -> Result<()> {
        let gpu = &self.gpu;
        let GpuWeights::Packed { m, perm, low_rank } = &l.w else {
            let GpuWeights::Dense(w) = l.w else {
                unreachable!()
            };
            return gpu.dense_gemv(w, x, l.bias, y, l.rows, l.cols);
        };
        let xs = match perm {
            Some(p) => {
                gpu.gather(x, *p, self.buf.permuted, l.cols)?;
                self.buf.permuted
            }
            None => x,
        };
        let qdec = l.qdec.as_ref().filter(|_| self.qdec_on);
        if let Some(q) = qdec {
            // Both the base product and the correction add into a zeroed output; the
            // correction runs on the side stream once the input is ready.
            gpu.zero(y, l.rows)?;
            let ready = gpu.main.record_event(None).map_err(|e| anyhow!("{e:?}"))?;
            gpu.side.wait(&ready).map_err(|e| anyhow!("{e:?}"))?;
            gpu.qdec_correct(&q.args, x, y, &gpu.side)?;
        }
        let mut e = GemvEpilogue {
            bias: l.bias,
            accumulate: qdec.is_some(),
            ..Default::default()
        };
        let branch = low_rank
            .as_ref()
            .filter(|_| self.low_rank != LowRankPath::Off);
        if let Some((a, b, rank)) = branch {
            gpu.lowrank_down(b, x, self.buf.branch_v, *rank, l.cols)?;
            if self.low_rank == LowRankPath::Fused {
                (e.a_f16, e.a_i8, e.a_scales) = (a.f16, a.i8, a.scales);
                (e.v, e.rank) = (self.buf.branch_v, *rank as i32);
            }
        }
        gpu.packed_gemv(m, xs, y, &e)?;
        if qdec.is_some() {
            let done = gpu.side.record_event(None).map_err(|e| anyhow!("{e:?}"))?;
            gpu.main.wait(&done).map_err(|e| anyhow!("{e:?}"))?;
        }
        if let (Some((a, _, rank)), LowRankPath::Unfused) = (branch, self.low_rank) {
            gpu.lowrank_up(a, self.buf.branch_v, self.buf.branch_t, l.rows, *rank)?;
            gpu.add(y, self.buf.branch_t, l.rows)?;
        }
        Ok(())
    }

    /// Runs `token` at the next position and returns its logits.
    pub fn step(&mut self, token: u32) -> Result<Vec<f32>> {
        let c = &self.config;
        let d = c.hidden_size;
        if self.len >= self.max_len {
            bail!(
                "{} positions exceed the GPU KV cache's {}",
                self.len + 1,
                self.max_len
            );
        }
        let row = self
            .embed
            .get(token as usize * d..(token as usize + 1) * d)
            .ok_or_else(|| {
                anyhow!(
                    "token id {token} is outside the vocabulary of {}",
                    c.vocab_size
                )
            })?;
        self.gpu
            .main
            .memcpy_htod(row, &mut self.buf.x)
            .map_err(|e| anyhow!("{e:?}"))?;
        let (gpu, b, pos) = (&self.gpu, &self.buf, self.len);
        let x = gpu.ptr(&b.x);
        let heads = (c.n_heads, c.n_kv_heads, c.head_dim);
        for (block, &caches) in self.blocks.iter().zip(&self.caches) {
            let [q, k, v, o, gate, up, down] = &block.linears[..] else {
                unreachable!("seven linears per block")
            };
            gpu.rms_norm(x, block.attn_norm, b.h, d, c.rms_eps)?;
            self.linear(q, b.h, b.q)?;
            self.linear(k, b.h, b.k)?;
            self.linear(v, b.h, b.v)?;
            gpu.rope_store(b.q, b.k, b.v, self.inv_freq, self.half, heads, pos, caches)?;
            gpu.attention_decode(b.q, caches, b.attn, b.scores, heads, pos + 1, self.max_len)?;
            self.linear(o, b.attn, b.o)?;
            gpu.add(x, b.o, d)?;
            gpu.rms_norm(x, block.ffn_norm, b.h, d, c.rms_eps)?;
            self.linear(gate, b.h, b.gate)?;
            self.linear(up, b.h, b.up)?;
            gpu.silu_mul(b.gate, b.up, c.intermediate_size)?;
            self.linear(down, b.gate, b.down)?;
            gpu.add(x, b.down, d)?;
        }
        gpu.rms_norm(x, self.norm, b.h, d, c.rms_eps)?;
        self.linear(&self.head, b.h, gpu.ptr(&b.logits))?;
        let logits = gpu.download(&b.logits)?;
        self.len += 1;
        Ok(logits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::KernelOptions;
    use recoup_formats::packed::GridSpec;

    /// The GPU's decode steps against the CPU reference path (f32 products of the dequantized
    /// weights) on a small random Qwen2 (q/k/v biases), every position's logits. Returns
    /// early, saying so, without a GPU.
    #[test]
    fn gpu_decode_matches_the_cpu_reference() {
        let config = crate::synthetic::tiny_qwen2(256, 640);
        for bits in [3, 4] {
            let spec = GridSpec::new(bits, 64, false).unwrap();
            let mut model = crate::synthetic::random_model(config.clone(), spec, 7).unwrap();
            model.set_kernel_options(KernelOptions {
                reference: true,
                ..Default::default()
            });
            let mut gpu = match CudaModel::upload(&model, 0, 16, LowRankPath::Fused) {
                Ok(g) => g,
                Err(e) => {
                    eprintln!("no GPU, decode check skipped: {e}");
                    return;
                }
            };
            let mut cache = crate::KvCache::new(&model.config, 16);
            for (pos, token) in [3u32, 141, 59, 265, 35, 89].into_iter().enumerate() {
                let hidden = model.forward(&[token], &mut cache).unwrap();
                let want = model.logits(&hidden, 1);
                let got = gpu.step(token).unwrap();
                let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
                let err = got
                    .iter()
                    .zip(&want)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    err / scale < 1e-3,
                    "{bits}-bit position {pos}: {}",
                    err / scale
                );
            }
        }
    }
}
