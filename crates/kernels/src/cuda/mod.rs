//! The CUDA backend (cargo feature `cuda`): recoup's decode kernels for NVIDIA GPUs,
//! compiled at run time by NVRTC from `kernels.cu`, with the driver and NVRTC loaded
//! dynamically (the build needs no CUDA toolkit; a machine without a GPU gets an error, not
//! a crash). The kernels mirror the CPU path: packed 2/3/4/8-bit matrix-vector products
//! with the low-rank branch fused into their epilogue (and the unfused baseline: separate
//! down-, up-projection and add), and QDEC's selection + sparse residual product in one
//! kernel reading the residual zero-copy from mapped pinned host memory, on a stream of its
//! own, concurrent with the base product (both accumulate into one zeroed output, as
//! DecDEC does).
//!
//! Every launch takes raw device pointers, so the caller orders the two streams with
//! events (cudarc's automatic tracking is switched off).

use anyhow::{Context, Result, anyhow, bail};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    LaunchConfig, PushKernelArg, ValidAsZeroBits, sys,
};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx, compile_ptx_with_opts};
use std::sync::Arc;

/// The kernels' source.
pub const SOURCE: &str = include_str!("kernels.cu");

/// Threads per block of the one-warp-per-row products.
const GEMV_THREADS: u32 = 256;
const QDEC_THREADS: u32 = 1024;
const BUCKETS: usize = 32;

/// Whether NVRTC can be loaded (checked without cudarc's panic on a missing library).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to open the library by its candidate names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Whether the CUDA driver library can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: as above.
    unsafe { sys::is_culib_present() }
}

/// Compiles the kernels to PTX for a virtual architecture such as `compute_90`; needs NVRTC
/// only, no GPU.
pub fn compile(arch: &'static str) -> Result<Ptx> {
    if !nvrtc_present() {
        bail!(
            "NVRTC (libnvrtc.so) was not found: install the CUDA runtime or add its lib folder to LD_LIBRARY_PATH"
        );
    }
    let opts = CompileOptions {
        arch: Some(arch),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    compile_ptx_with_opts(SOURCE, opts).map_err(|e| match e {
        CompileError::CompileError { log, .. } => {
            anyhow!("kernels.cu does not compile:\n{}", log.to_string_lossy())
        }
        other => anyhow!("NVRTC failed: {other:?}"),
    })
}

struct Functions {
    /// Packed products for 2, 3, 4 and 8 bits.
    gemv: [CudaFunction; 4],
    lowrank_down: CudaFunction,
    lowrank_up: CudaFunction,
    add_inplace: CudaFunction,
    dense_gemv: CudaFunction,
    gather: CudaFunction,
    rms_norm: CudaFunction,
    silu_mul: CudaFunction,
    rope_store: CudaFunction,
    attention_decode: CudaFunction,
    qdec_correct: CudaFunction,
    read_probe: CudaFunction,
}

impl Functions {
    fn load(m: &Arc<CudaModule>) -> Result<Self> {
        let f = |name: &str| {
            m.load_function(name)
                .with_context(|| format!("kernel {name} is missing from the module"))
        };
        Ok(Self {
            gemv: [
                f("packed_gemv_q2")?,
                f("packed_gemv_q3")?,
                f("packed_gemv_q4")?,
                f("packed_gemv_q8")?,
            ],
            lowrank_down: f("lowrank_down")?,
            lowrank_up: f("lowrank_up")?,
            add_inplace: f("add_inplace")?,
            dense_gemv: f("dense_gemv")?,
            gather: f("gather")?,
            rms_norm: f("rms_norm")?,
            silu_mul: f("silu_mul")?,
            rope_store: f("rope_store")?,
            attention_decode: f("attention_decode")?,
            qdec_correct: f("qdec_correct")?,
            read_probe: f("read_probe")?,
        })
    }
}

/// One GPU with the kernels loaded, a main stream and a side stream for QDEC.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub main: Arc<CudaStream>,
    pub side: Arc<CudaStream>,
    f: Functions,
}

/// A device buffer's address, for a launch argument.
pub fn ptr<T>(s: &CudaSlice<T>, stream: &Arc<CudaStream>) -> u64 {
    s.device_ptr(stream).0
}

fn blocks_for(n: usize, per_block: u32) -> u32 {
    n.div_ceil(per_block as usize) as u32
}

fn config(grid: u32, block: u32, shared: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.max(1), 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: shared,
    }
}

/// The epilogue of a packed product: bias, low-rank `⟨A_r, v⟩`, accumulate into a zeroed
/// output. Pointers are 0 where absent.
#[derive(Clone, Copy, Default)]
pub struct GemvEpilogue {
    pub bias: u64,
    /// `A` in f16, or int8 codes with `a_scales` (one f16 per row).
    pub a_f16: u64,
    pub a_i8: u64,
    pub a_scales: u64,
    pub v: u64,
    pub rank: i32,
    pub accumulate: bool,
}

/// A packed matrix on the device, by address.
#[derive(Clone, Copy)]
pub struct PackedArgs {
    pub bits: u32,
    pub rows: usize,
    pub cols: usize,
    pub group: usize,
    pub codes: u64,
    pub scales: u64,
    /// 0 for a symmetric grid.
    pub zeros: u64,
    pub sym_zero: i32,
}

/// A low-rank factor on the device: f16, or int8 codes with one f16 scale per row.
#[derive(Clone, Copy, Default)]
pub struct FactorArgs {
    pub f16: u64,
    pub i8: u64,
    pub scales: u64,
}

/// QDEC's residual of one layer: runs in mapped host memory, scales on the device.
#[derive(Clone, Copy)]
pub struct QdecArgs {
    /// Device address of the mapped host runs (`[cols, rows/2]` bytes).
    pub residual: u64,
    pub scales: u64,
    pub rows: usize,
    pub cols: usize,
    pub k_chunk: usize,
    /// Device address of 32 f32 bucket floors, or 0 for exact top-k.
    pub floors: u64,
    /// Blocks of the kernel (the paper's n_tb): each selects the whole set, then corrects
    /// its share of the outputs.
    pub blocks: u32,
}

impl QdecArgs {
    /// Channels selected per token.
    pub fn total(&self) -> usize {
        (0..self.cols)
            .step_by(1024)
            .map(|c0| (self.k_chunk * (self.cols - c0).min(1024) / 1024).min(1024))
            .sum()
    }
}

impl Gpu {
    /// Opens device `ordinal`, compiles the kernels for its architecture and loads them.
    pub fn open(ordinal: usize) -> Result<Self> {
        if !driver_present() {
            bail!("no CUDA driver (libcuda.so) on this machine: --device cuda needs an NVIDIA GPU");
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| anyhow!("cannot open CUDA device {ordinal}: {e:?}"))?;
        // SAFETY: every launch below takes raw addresses and the two streams are ordered
        // with explicit events, so cudarc's per-buffer tracking would only add work.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| anyhow!("compute capability: {e:?}"))?;
        // NVRTC takes the architecture as a 'static string; one per process.
        let arch: &'static str = Box::leak(format!("compute_{major}{minor}").into_boxed_str());
        let module = ctx
            .load_module(compile(arch)?)
            .map_err(|e| anyhow!("cannot load the kernels: {e:?}"))?;
        let f = Functions::load(&module)?;
        let main = ctx.default_stream();
        let side = ctx
            .new_stream()
            .map_err(|e| anyhow!("cannot create a stream: {e:?}"))?;
        Ok(Self { ctx, main, side, f })
    }

    pub fn name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "CUDA device".into())
    }

    /// Peak memory bandwidth from the device attributes (GB/s), if it reports them.
    pub fn peak_gbps(&self) -> Option<f64> {
        use sys::CUdevice_attribute::*;
        let clock_khz = self
            .ctx
            .attribute(CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)
            .ok()? as f64;
        let bus_bits = self
            .ctx
            .attribute(CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)
            .ok()? as f64;
        (clock_khz > 0.0 && bus_bits > 0.0).then(|| 2.0 * clock_khz * 1e3 * bus_bits / 8.0 / 1e9)
    }

    /// Uploads `data`.
    pub fn upload<T: DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        self.main
            .clone_htod(data)
            .map_err(|e| anyhow!("cannot copy {} values to the GPU: {e:?}", data.len()))
    }

    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.main
            .alloc_zeros(len)
            .map_err(|e| anyhow!("cannot allocate {len} values on the GPU: {e:?}"))
    }

    pub fn download(&self, s: &CudaSlice<f32>) -> Result<Vec<f32>> {
        self.main
            .clone_dtoh(s)
            .map_err(|e| anyhow!("cannot copy from the GPU: {e:?}"))
    }

    pub fn sync(&self) -> Result<()> {
        self.ctx
            .synchronize()
            .map_err(|e| anyhow!("CUDA error: {e:?}"))
    }

    /// Zeroes `n` f32 at `y` on the main stream.
    pub fn zero(&self, y: u64, n: usize) -> Result<()> {
        // SAFETY: `y` holds `n` values; the memset is ordered on the main stream.
        unsafe { sys::cuMemsetD32Async(y, 0, n, self.main.cu_stream()) }
            .result()
            .map_err(|e| anyhow!("memset: {e:?}"))
    }

    /// Address of a buffer for launches on the main stream.
    pub fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        ptr(s, &self.main)
    }

    /// `y = m·x` (+ epilogue) on the main stream.
    pub fn packed_gemv(&self, m: &PackedArgs, x: u64, y: u64, e: &GemvEpilogue) -> Result<()> {
        let index = match m.bits {
            2 => 0,
            3 => 1,
            4 => 2,
            8 => 3,
            b => bail!("no CUDA kernel for {b}-bit codes"),
        };
        let (rows, cols, group) = (m.rows as i32, m.cols as i32, m.group as i32);
        let accumulate = i32::from(e.accumulate);
        let rows_per_block = GEMV_THREADS / 32;
        let cfg = config(blocks_for(m.rows, rows_per_block), GEMV_THREADS, 0);
        let mut b = self.main.launch_builder(&self.f.gemv[index]);
        b.arg(&m.codes)
            .arg(&m.scales)
            .arg(&m.zeros)
            .arg(&m.sym_zero);
        b.arg(&x)
            .arg(&e.bias)
            .arg(&y)
            .arg(&rows)
            .arg(&cols)
            .arg(&group);
        b.arg(&e.a_f16)
            .arg(&e.a_i8)
            .arg(&e.a_scales)
            .arg(&e.v)
            .arg(&e.rank);
        b.arg(&accumulate);
        // SAFETY: the addresses are of live buffers of the shapes given (checked when the
        // model was uploaded); the kernel reads and writes within them.
        unsafe { b.launch(cfg) }.map_err(|e| anyhow!("packed_gemv: {e:?}"))?;
        Ok(())
    }

    /// `v = B·x`, the branch's down-projection.
    pub fn lowrank_down(
        &self,
        b: &FactorArgs,
        x: u64,
        v: u64,
        rank: usize,
        cols: usize,
    ) -> Result<()> {
        let (r, c) = (rank as i32, cols as i32);
        let cfg = config(blocks_for(rank, GEMV_THREADS / 32), GEMV_THREADS, 0);
        let mut l = self.main.launch_builder(&self.f.lowrank_down);
        l.arg(&b.f16)
            .arg(&b.i8)
            .arg(&b.scales)
            .arg(&x)
            .arg(&v)
            .arg(&r)
            .arg(&c);
        // SAFETY: as for `packed_gemv`.
        unsafe { l.launch(cfg) }.map_err(|e| anyhow!("lowrank_down: {e:?}"))?;
        Ok(())
    }

    /// `t = A·v`, the unfused up-projection.
    pub fn lowrank_up(
        &self,
        a: &FactorArgs,
        v: u64,
        t: u64,
        rows: usize,
        rank: usize,
    ) -> Result<()> {
        let (r, k) = (rows as i32, rank as i32);
        let cfg = config(blocks_for(rows, GEMV_THREADS / 32), GEMV_THREADS, 0);
        let mut l = self.main.launch_builder(&self.f.lowrank_up);
        l.arg(&a.f16)
            .arg(&a.i8)
            .arg(&a.scales)
            .arg(&v)
            .arg(&t)
            .arg(&r)
            .arg(&k);
        // SAFETY: as for `packed_gemv`.
        unsafe { l.launch(cfg) }.map_err(|e| anyhow!("lowrank_up: {e:?}"))?;
        Ok(())
    }

    /// `y += t`.
    pub fn add(&self, y: u64, t: u64, n: usize) -> Result<()> {
        let len = n as i32;
        let mut l = self.main.launch_builder(&self.f.add_inplace);
        l.arg(&y).arg(&t).arg(&len);
        // SAFETY: both hold `n` values.
        unsafe { l.launch(config(blocks_for(n, 256), 256, 0)) }
            .map_err(|e| anyhow!("add: {e:?}"))?;
        Ok(())
    }

    /// `y = W·x (+ bias)` for a dense f32 `[rows, cols]` matrix.
    pub fn dense_gemv(
        &self,
        w: u64,
        x: u64,
        bias: u64,
        y: u64,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let (r, c) = (rows as i32, cols as i32);
        let cfg = config(blocks_for(rows, GEMV_THREADS / 32), GEMV_THREADS, 0);
        let mut l = self.main.launch_builder(&self.f.dense_gemv);
        l.arg(&w).arg(&x).arg(&bias).arg(&y).arg(&r).arg(&c);
        // SAFETY: as for `packed_gemv`.
        unsafe { l.launch(cfg) }.map_err(|e| anyhow!("dense_gemv: {e:?}"))?;
        Ok(())
    }

    /// `out[j] = x[perm[j]]`.
    pub fn gather(&self, x: u64, perm: u64, out: u64, n: usize) -> Result<()> {
        let len = n as i32;
        let mut l = self.main.launch_builder(&self.f.gather);
        l.arg(&x).arg(&perm).arg(&out).arg(&len);
        // SAFETY: `perm` holds `n` indices below `n`.
        unsafe { l.launch(config(blocks_for(n, 256), 256, 0)) }
            .map_err(|e| anyhow!("gather: {e:?}"))?;
        Ok(())
    }

    pub fn rms_norm(&self, x: u64, w: u64, out: u64, d: usize, eps: f32) -> Result<()> {
        let n = d as i32;
        let mut l = self.main.launch_builder(&self.f.rms_norm);
        l.arg(&x).arg(&w).arg(&out).arg(&n).arg(&eps);
        // SAFETY: the three buffers hold `d` values.
        unsafe { l.launch(config(1, 1024, 0)) }.map_err(|e| anyhow!("rms_norm: {e:?}"))?;
        Ok(())
    }

    pub fn silu_mul(&self, gate: u64, up: u64, n: usize) -> Result<()> {
        let len = n as i32;
        let mut l = self.main.launch_builder(&self.f.silu_mul);
        l.arg(&gate).arg(&up).arg(&len);
        // SAFETY: both hold `n` values.
        unsafe { l.launch(config(blocks_for(n, 256), 256, 0)) }
            .map_err(|e| anyhow!("silu_mul: {e:?}"))?;
        Ok(())
    }

    /// RoPE on q and k at `pos`; rotated k and v written to the caches' row `pos`.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_store(
        &self,
        q: u64,
        k: u64,
        v: u64,
        inv_freq: u64,
        half: usize,
        heads: (usize, usize, usize),
        pos: usize,
        caches: (u64, u64),
    ) -> Result<()> {
        let (n_heads, n_kv, head_dim) = (heads.0 as i32, heads.1 as i32, heads.2 as i32);
        let (h, p) = (half as i32, pos as i32);
        let mut l = self.main.launch_builder(&self.f.rope_store);
        l.arg(&q)
            .arg(&k)
            .arg(&v)
            .arg(&inv_freq)
            .arg(&h)
            .arg(&n_heads)
            .arg(&n_kv);
        l.arg(&head_dim).arg(&p).arg(&caches.0).arg(&caches.1);
        let pairs = (heads.0 + heads.1) * half;
        // SAFETY: the caches hold more than `pos` rows (checked by the caller).
        unsafe {
            l.launch(config(
                blocks_for(pairs.max(heads.1 * heads.2), 256),
                256,
                0,
            ))
        }
        .map_err(|e| anyhow!("rope_store: {e:?}"))?;
        Ok(())
    }

    /// Attention of the newest of `len` cached positions, every head.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode(
        &self,
        q: u64,
        caches: (u64, u64),
        out: u64,
        scratch: u64,
        heads: (usize, usize, usize),
        len: usize,
        max_len: usize,
    ) -> Result<()> {
        let (n_heads, n_kv, head_dim) = (heads.0 as i32, heads.1 as i32, heads.2 as i32);
        let (n, m) = (len as i32, max_len as i32);
        let mut l = self.main.launch_builder(&self.f.attention_decode);
        l.arg(&q)
            .arg(&caches.0)
            .arg(&caches.1)
            .arg(&out)
            .arg(&scratch);
        l.arg(&n_heads).arg(&n_kv).arg(&head_dim).arg(&n).arg(&m);
        // SAFETY: `scratch` holds `n_heads · max_len` values and `len ≤ max_len`.
        unsafe { l.launch(config(heads.0 as u32, 256, 0)) }
            .map_err(|e| anyhow!("attention_decode: {e:?}"))?;
        Ok(())
    }

    /// QDEC's correction of `y` (accumulated atomically) for activation `x`, on `stream`.
    pub fn qdec_correct(
        &self,
        q: &QdecArgs,
        x: u64,
        y: u64,
        stream: &Arc<CudaStream>,
    ) -> Result<()> {
        let total = q.total();
        let shared = (8 * total + 4 * 1024 + 4 * 2 * BUCKETS) as u32;
        if shared > 48 * 1024 {
            bail!(
                "QDEC on the GPU holds the selection in shared memory: {total} channels per token is \
                 more than it fits (lower --qdec-k)"
            );
        }
        if !q.rows.is_multiple_of(8) {
            bail!(
                "QDEC on the GPU reads residual runs as 32-bit words: {} rows is not a multiple of 8",
                q.rows
            );
        }
        let (n, k, rows) = (q.cols as i32, q.k_chunk as i32, q.rows as i32);
        let mode = i32::from(q.floors != 0);
        let mut l = stream.launch_builder(&self.f.qdec_correct);
        l.arg(&x)
            .arg(&n)
            .arg(&k)
            .arg(&mode)
            .arg(&q.floors)
            .arg(&q.residual);
        l.arg(&q.scales).arg(&rows).arg(&y);
        // SAFETY: the residual mapping holds `cols · rows/2` bytes, the scales `rows`, and the
        // selection fits the shared memory requested.
        unsafe { l.launch(config(q.blocks, QDEC_THREADS, shared)) }
            .map_err(|e| anyhow!("qdec_correct: {e:?}"))?;
        Ok(())
    }

    /// Reads `words` u32 at `src` with every SM and returns the seconds it took (for the
    /// bandwidth model: device memory, or mapped host memory over PCIe).
    pub fn read_seconds(&self, src: u64, words: usize, reps: usize) -> Result<f64> {
        let sink: CudaSlice<u32> = self.zeros(1)?;
        let sink_ptr = self.ptr(&sink);
        let sms = self
            .ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .unwrap_or(108) as u32;
        let run = || -> Result<()> {
            let mut l = self.main.launch_builder(&self.f.read_probe);
            l.arg(&src).arg(&words).arg(&sink_ptr);
            // SAFETY: `src` holds `words` u32.
            unsafe { l.launch(config(4 * sms, 1024, 0)) }
                .map_err(|e| anyhow!("read_probe: {e:?}"))?;
            Ok(())
        };
        run()?;
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self
            .main
            .record_event(timing)
            .map_err(|e| anyhow!("{e:?}"))?;
        for _ in 0..reps.max(1) {
            run()?;
        }
        let end = self
            .main
            .record_event(timing)
            .map_err(|e| anyhow!("{e:?}"))?;
        let ms = start.elapsed_ms(&end).map_err(|e| anyhow!("{e:?}"))?;
        Ok(ms as f64 / 1e3 / reps.max(1) as f64)
    }
}

/// Page-locked host memory mapped into the GPU's address space: the kernels read it over
/// PCIe where it is used, with no copy and no GPU memory (QDEC's residual tier).
pub struct MappedHost {
    host: cudarc::driver::PinnedHostSlice<u8>,
    device: u64,
}

impl MappedHost {
    pub fn new(gpu: &Gpu, bytes: &[u8]) -> Result<Self> {
        // SAFETY: a fresh allocation of `bytes.len()` bytes, written below before any read.
        let mut host = unsafe {
            gpu.ctx
                .alloc_pinned_with_flags::<u8>(bytes.len().max(1), sys::CU_MEMHOSTALLOC_DEVICEMAP)
        }
        .map_err(|e| anyhow!("cannot pin {} bytes of host memory: {e:?}", bytes.len()))?;
        host.as_mut_slice().map_err(|e| anyhow!("{e:?}"))?[..bytes.len()].copy_from_slice(bytes);
        let hp = host.as_mut_ptr().map_err(|e| anyhow!("{e:?}"))? as *mut core::ffi::c_void;
        let mut device: sys::CUdeviceptr = 0;
        // SAFETY: `hp` is a live allocation made with CU_MEMHOSTALLOC_DEVICEMAP.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut device, hp, 0) }
            .result()
            .map_err(|e| anyhow!("cannot map pinned memory into the GPU: {e:?}"))?;
        Ok(Self { host, device })
    }

    /// The device address of byte 0.
    pub fn device_ptr(&self) -> u64 {
        self.device
    }

    pub fn len(&self) -> usize {
        self.host.len()
    }

    pub fn is_empty(&self) -> bool {
        self.host.len() == 0
    }
}

/// The `k_chunk` that makes a layer's residual transfer take as long as its base product
/// (papers.md B.7): `bits / ratio / 4 · 1024`, with `ratio` = device bandwidth / host-link
/// bandwidth (here both measured, not read from a spec sheet).
pub fn k_chunk_estimate(bits: u32, device_gbps: f64, link_gbps: f64) -> usize {
    let ratio = device_gbps / link_gbps;
    ((bits as f64 / ratio / 4.0) * 1024.0).round().max(1.0) as usize
}

#[cfg(test)]
mod tests;
