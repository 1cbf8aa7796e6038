//! QDEC at run time: a packed layer's residual (from a `recoup residual` sidecar) with the
//! selector that picks, for each token, the input channels whose residuals are added.

use crate::llama::Site;
use anyhow::{Result, bail};
use recoup_formats::residual::LayerResidual;
use recoup_kernels::qdec::{
    self, BucketFloors, ResidualEpilogue, ResidualRef, SelectedCodes, total_budget,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// How a layer picks its channels each token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Select {
    /// The `k_chunk` largest |x_i| of every 1024-channel chunk, by quickselect.
    Exact,
    /// The paper's 32-bucket approximation, with thresholds from calibration.
    Bucket,
    /// A fixed set: per chunk, the channels of largest mean |x| on calibration text.
    Static,
    /// Uniformly random channels per chunk (the ablation's floor).
    Random,
}

impl Select {
    pub fn name(self) -> &'static str {
        match self {
            Select::Exact => "exact",
            Select::Bucket => "bucket",
            Select::Static => "static",
            Select::Random => "random",
        }
    }
}

/// Channels per 1024 for each projection type (the paper tunes them separately).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KChunk {
    pub qkv: usize,
    pub o: usize,
    pub gate_up: usize,
    pub down: usize,
}

impl KChunk {
    pub fn all(k: usize) -> Self {
        Self {
            qkv: k,
            o: k,
            gate_up: k,
            down: k,
        }
    }

    /// `K` alone, or `K,qkv=K1,o=K2,gu=K3,down=K4` (any subset of overrides).
    pub fn parse(s: &str) -> Result<Self> {
        let mut k = KChunk::all(0);
        for (n, item) in s.split(',').map(str::trim).enumerate() {
            let parse = |v: &str| {
                v.parse::<usize>()
                    .map_err(|_| anyhow::anyhow!("--qdec-k: `{v}` is not a channel count"))
            };
            match item.split_once('=') {
                None if n == 0 => {
                    k = KChunk::all(parse(item)?);
                }
                None => bail!("--qdec-k: only the first item may be a bare number (`{s}`)"),
                Some((site, v)) => {
                    let v = parse(v)?;
                    match site {
                        "qkv" => k.qkv = v,
                        "o" => k.o = v,
                        "gu" | "gate_up" => k.gate_up = v,
                        "down" => k.down = v,
                        other => bail!("--qdec-k: unknown projection `{other}` (qkv, o, gu, down)"),
                    }
                }
            }
        }
        if [k.qkv, k.o, k.gate_up, k.down]
            .iter()
            .any(|&v| v > qdec::CHUNK)
        {
            bail!("--qdec-k: at most {} channels per chunk", qdec::CHUNK);
        }
        Ok(k)
    }

    pub fn for_site(&self, site: Site) -> usize {
        match site {
            Site::Qkv => self.qkv,
            Site::O => self.o,
            Site::GateUp => self.gate_up,
            Site::Down => self.down,
        }
    }

    pub fn describe(&self) -> String {
        let KChunk {
            qkv,
            o,
            gate_up,
            down,
        } = *self;
        if qkv == o && o == gate_up && gate_up == down {
            format!("{qkv}")
        } else {
            format!("qkv={qkv},o={o},gu={gate_up},down={down}")
        }
    }
}

/// QDEC as chosen for a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QdecOptions {
    pub k_chunk: KChunk,
    pub select: Select,
    /// Correct every position of a multi-token forward (the paper's perplexity protocol),
    /// not only decode steps.
    pub in_prefill: bool,
}

/// A layer's residual and selector, ready to run.
pub struct Compensation {
    residual: LayerResidual,
    k_chunk: usize,
    select: Select,
    in_prefill: bool,
    floors: Option<BucketFloors>,
    static_set: Vec<u32>,
    /// Varies the random selector's draw from call to call.
    calls: AtomicU64,
    /// Shared by every layer of a model: switches the correction off and on between
    /// tokens (for measuring what it costs in the same run).
    enabled: Arc<AtomicBool>,
    /// Shared by the layers reading the same input (q/k/v, gate/up).
    shared: Arc<SharedSelection>,
}

/// The last decode step's selection at one input site, reused by the other layers reading
/// the same activation, as the paper's fused QKV and gate-up projections share theirs.
pub struct SharedSelection {
    /// Layers reading the site's activation: with one, nothing is shared or compared.
    readers: usize,
    /// The activation last selected from (kept only when shared), and its selection.
    last: Mutex<(Vec<f32>, Arc<Selected>)>,
}

impl SharedSelection {
    pub fn new(readers: usize) -> Self {
        Self {
            readers,
            last: Mutex::default(),
        }
    }

    /// The selection of `x`: the cached one when `x` is the same activation (compared in
    /// full, a `memcmp` against microseconds of selecting), else `fill`ed anew, in the
    /// previous step's buffers when nobody holds them any more (as in decode).
    fn get(&self, x: &[f32], fill: impl FnOnce(&mut Selected)) -> Arc<Selected> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let (seen, selected) = &mut *last;
        if self.readers > 1 {
            if same_bits(seen, x) {
                return selected.clone();
            }
            seen.clear();
            seen.extend_from_slice(x);
        }
        fill(Arc::make_mut(selected));
        selected.clone()
    }
}

/// Whether two activations are bit for bit the same: one `memcmp`, where comparing as
/// floats is an element-by-element loop (and bit-equal values select the same channels).
fn same_bits(a: &[f32], b: &[f32]) -> bool {
    // SAFETY: an f32 is 4 initialized bytes without padding, and any byte is a valid u8.
    let bytes = |v: &[f32]| unsafe {
        std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v))
    };
    bytes(a) == bytes(b)
}

impl Compensation {
    /// Errors name what the sidecar lacks for the chosen selector.
    pub fn new(
        residual: LayerResidual,
        k_chunk: usize,
        select: Select,
        in_prefill: bool,
        enabled: Arc<AtomicBool>,
        shared: Arc<SharedSelection>,
    ) -> Result<Self> {
        let cols = residual.cols;
        let k = total_budget(k_chunk, cols);
        let floors = match (select, &residual.envelope) {
            (Select::Bucket, Some(t)) if k > t.len() => bail!(
                "bucket selection at k_chunk {k_chunk} needs the {k}-th largest |x|; the \
                 sidecar's thresholds stop at the {}-th",
                t.len()
            ),
            (Select::Bucket, Some(t)) => Some(BucketFloors::new(t[0], t[k.max(1) - 1])),
            (Select::Bucket, None) => {
                bail!("bucket selection needs thresholds: build the residual with calibration text")
            }
            _ => None,
        };
        let static_set = match (select, &residual.mean_abs) {
            (Select::Static, Some(m)) => {
                let mut set = Vec::new();
                qdec::select_exact(m, k_chunk, &mut set);
                set
            }
            (Select::Static, None) => {
                bail!(
                    "static selection needs channel statistics: build the residual with calibration text"
                )
            }
            _ => Vec::new(),
        };
        Ok(Self {
            residual,
            k_chunk,
            select,
            in_prefill,
            floors,
            static_set,
            calls: AtomicU64::new(0),
            enabled,
            shared,
        })
    }

    pub fn rows(&self) -> usize {
        self.residual.rows
    }

    pub fn residual(&self) -> &LayerResidual {
        &self.residual
    }

    pub fn k_chunk(&self) -> usize {
        self.k_chunk
    }

    pub fn selection(&self) -> Select {
        self.select
    }

    /// The bucket selector's floors (set for bucket selection only).
    pub fn floors(&self) -> Option<&BucketFloors> {
        self.floors.as_ref()
    }

    pub fn cols(&self) -> usize {
        self.residual.cols
    }

    /// Whether a forward of `n` tokens is corrected: decode steps always, prefill on request
    /// (and neither where the layer selects no channel).
    pub fn applies(&self, n: usize) -> bool {
        self.selects_any() && (n == 1 || self.in_prefill) && self.enabled.load(Ordering::Relaxed)
    }

    /// Whether `k_chunk` selects any channel of this layer's input (a partial chunk gets its
    /// share rounded down: `k_chunk` 1 selects nothing from 896 channels). A layer that
    /// selects none is not corrected at all, rather than run a pass that adds zeros.
    fn selects_any(&self) -> bool {
        total_budget(self.k_chunk, self.residual.cols) > 0
    }

    /// The channels to correct for a decode step's activation `x` (original column order)
    /// and their values, shared with the layers reading the same `x`.
    pub fn select(&self, x: &[f32]) -> Arc<Selected> {
        self.shared.get(x, |s| self.fill(x, s))
    }

    /// [`Self::select`] without the shared cache (prefill positions, each its own).
    pub fn select_fresh(&self, x: &[f32]) -> Selected {
        let mut s = Selected::default();
        self.fill(x, &mut s);
        s
    }

    /// Selects the channels of `x` into `s`, reusing its buffers.
    fn fill(&self, x: &[f32], s: &mut Selected) {
        let channels = &mut s.channels;
        channels.clear();
        match self.select {
            Select::Exact => qdec::select_exact(x, self.k_chunk, channels),
            Select::Bucket => {
                let floors = self.floors.as_ref().expect("set for bucket selection");
                qdec::select_bucket(x, self.k_chunk, floors, channels);
            }
            Select::Static => channels.extend_from_slice(&self.static_set),
            Select::Random => {
                let seed = self.calls.fetch_add(1, Ordering::Relaxed);
                qdec::select_random(x.len(), self.k_chunk, seed, channels);
            }
        }
        s.values.clear();
        s.values.extend(channels.iter().map(|&i| x[i as usize]));
        s.codes.refill(channels, &s.values);
    }

    pub fn residual_ref(&self) -> ResidualRef<'_> {
        ResidualRef {
            codes: self.residual.codes.bytes(),
            scales: &self.residual.scales,
        }
    }

    pub fn epilogue<'a>(&'a self, s: &'a Selected) -> ResidualEpilogue<'a> {
        ResidualEpilogue {
            residual: self.residual_ref(),
            selected: &s.codes,
        }
    }

    /// Bytes of residual one corrected token reads: the selected runs and the scales.
    pub fn bytes_per_token(&self) -> usize {
        if !self.selects_any() {
            return 0;
        }
        let rows = self.residual.rows;
        total_budget(self.k_chunk, self.residual.cols) * rows / 2 + 2 * rows
    }

    pub fn describe(&self) -> String {
        format!("qdec k{} {}", self.k_chunk, self.select.name())
    }
}

/// One token's selection: the channels and their activations rounded for the kernels.
#[derive(Clone, Default)]
pub struct Selected {
    pub codes: SelectedCodes,
    /// The selector's output and the selected values, kept to reuse their allocations.
    channels: Vec<u32>,
    values: Vec<f32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k_chunk_parses_a_base_and_overrides() {
        assert_eq!(KChunk::parse("8").unwrap(), KChunk::all(8));
        let k = KChunk::parse("8,down=16,gu=4").unwrap();
        assert_eq!((k.qkv, k.o, k.gate_up, k.down), (8, 8, 4, 16));
        let k = KChunk::parse("qkv=2").unwrap();
        assert_eq!((k.qkv, k.o, k.gate_up, k.down), (2, 0, 0, 0));
        assert_eq!(k.describe(), "qkv=2,o=0,gu=0,down=0");
        for bad in ["x", "8,9", "8,mlp=3", "2000", "8,o=-1"] {
            let err = KChunk::parse(bad).unwrap_err().to_string();
            assert!(err.contains("--qdec-k"), "{bad}: {err}");
        }
    }
}
