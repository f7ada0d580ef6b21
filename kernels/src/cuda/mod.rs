//! CUDA backend: NVRTC-compiled kernels (`src/cuda/moe.cu`), cuBLAS expert FFN, NCCL
//! all-to-all and expert weight movement.
//!
//! Everything is behind run-time detection: call [`available`] first; it checks that the
//! CUDA driver, NVRTC and cuBLAS libraries can be loaded and that a GPU is visible, and
//! returns [`KernelError::Unavailable`] otherwise (cudarc's dynamic loading would panic on
//! the first call into a missing library). [`nccl_available`] does the same for NCCL.
//!
//! Conventions:
//! * One [`Gpu`] per device: its context, a main stream on which every operation is
//!   enqueued, a side stream for weight movement, a cuBLAS handle, and the kernels (compiled
//!   once per process and architecture, loaded once per `Gpu`).
//! * cudarc's automatic multi-stream event tracking is switched off for the context (it adds
//!   an event record per buffer per launch); all work of a layer is ordered on the main
//!   stream, and the weight-movement helpers order the side stream with explicit events.
//! * Operations enqueue asynchronously; functions that return host data synchronise.
//! * Semantics and numerics are those of [`crate::cpu`]; the GPU tests state the tolerances.

mod comm;
mod ffn;
mod fp8;
mod layer;
mod timing;

pub use comm::{EpComm, NcclId, enable_peer_access, grouped};
pub use ffn::{DeviceExperts, ExpertStaging, FfnStrategy};
pub use fp8::{DeviceFp8Experts, Fp8Compute, Fp8Staging, probe_block_scaled};
pub use layer::{DecodeGraph, EpLayer, LayerExperts, Router, SharedExperts};

use crate::error::{KernelError, Result, invalid};
use crate::routing::{EpTopology, GatingConfig, GroupScore, ReplicaMap, Scoring};
use crate::tensor::Matrix;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, DevicePtr, DeviceRepr,
    LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use half::bf16;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// CUDA source of all kernels.
pub const KERNEL_SOURCE: &str = include_str!("moe.cu");

pub(crate) fn drv(e: cudarc::driver::DriverError) -> KernelError {
    KernelError::Driver(format!("{e:?}"))
}
pub(crate) fn blas_err(e: cudarc::cublas::result::CublasError) -> KernelError {
    KernelError::Cublas(format!("{e:?}"))
}

/// Checks that the CUDA driver, NVRTC and cuBLAS can be loaded and that at least one GPU is
/// visible; returns the number of GPUs.
pub fn available() -> Result<usize> {
    // SAFETY: these only try to dlopen the libraries.
    let (cuda, nvrtc, cublas) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
            cudarc::cublas::sys::is_culib_present(),
        )
    };
    if !cuda {
        return Err(KernelError::Unavailable(
            "no CUDA driver library (libcuda) found".into(),
        ));
    }
    if !nvrtc {
        return Err(KernelError::Unavailable(
            "no NVRTC library (libnvrtc) found".into(),
        ));
    }
    if !cublas {
        return Err(KernelError::Unavailable(
            "no cuBLAS library (libcublas) found".into(),
        ));
    }
    let n = CudaContext::device_count().map_err(|e| {
        KernelError::Unavailable(format!("CUDA driver present but unusable: {e:?}"))
    })?;
    if n <= 0 {
        return Err(KernelError::Unavailable("no GPU visible".into()));
    }
    Ok(n as usize)
}

/// Whether the NCCL library can be loaded (needed by [`EpComm`]).
pub fn nccl_available() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// PTX per architecture, compiled once per process.
fn ptx_for_arch(arch: &'static str) -> Result<String> {
    static CACHE: OnceLock<Mutex<HashMap<&'static str, String>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut guard = cache
        .lock()
        .map_err(|_| KernelError::Compile("PTX cache poisoned".into()))?;
    if let Some(p) = guard.get(arch) {
        return Ok(p.clone());
    }
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        options: vec!["-std=c++17".into()],
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(KERNEL_SOURCE, opts).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => {
            KernelError::Compile(log.to_string_lossy().into_owned())
        }
        other => KernelError::Compile(format!("{other:?}")),
    })?;
    let src = ptx.to_src();
    guard.insert(arch, src.clone());
    Ok(src)
}

fn arch_name(major: i32, minor: i32) -> &'static str {
    match (major, minor) {
        (7, 0) => "sm_70",
        (7, 5) => "sm_75",
        (8, 0) => "sm_80",
        (8, 6) => "sm_86",
        (8, 7) => "sm_87",
        (8, 9) => "sm_89",
        (9, 0) => "sm_90",
        (10, 0) => "sm_100",
        (10, 3) => "sm_103",
        (12, 0) => "sm_120",
        (12, 1) => "sm_121",
        // Unknown: compile for the newest listed family the driver can JIT from.
        (m, _) if m >= 12 => "sm_120",
        (m, _) if m >= 10 => "sm_100",
        (9, _) => "sm_90",
        _ => "sm_80",
    }
}

pub(crate) struct Kernels {
    _module: Arc<CudaModule>,
    pub gating: CudaFunction,
    pub map_physical: CudaFunction,
    pub layout_count: CudaFunction,
    pub layout_colscan: CudaFunction,
    pub layout_slotscan: CudaFunction,
    pub layout_scatter: CudaFunction,
    pub tokens_per_rank: CudaFunction,
    pub layout_small: CudaFunction,
    pub gather_v8: CudaFunction,
    pub gather_s: CudaFunction,
    pub scatter_v8: CudaFunction,
    pub combine_v8: CudaFunction,
    pub combine_s: CudaFunction,
    pub silu_v8: CudaFunction,
    pub silu_s: CudaFunction,
    pub copy_v8: CudaFunction,
    pub fill: CudaFunction,
    pub shared_gate: CudaFunction,
    pub bf16_to_f32: CudaFunction,
    pub fp8_dequant: CudaFunction,
    pub fp8_quant_rows: CudaFunction,
    pub fp8_fill: CudaFunction,
    pub expert_gemv: CudaFunction,
    pub expert_gemv_fp8: CudaFunction,
}

/// One GPU: context, streams, cuBLAS handle, kernels.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    side: Arc<CudaStream>,
    pub(crate) blas: cudarc::cublas::CudaBlas,
    /// Extra streams, each with its own cuBLAS handle, for concurrent per-expert GEMMs.
    pub(crate) lanes: Vec<(Arc<CudaStream>, cudarc::cublas::CudaBlas)>,
    pub(crate) k: Kernels,
    sm_count: u32,
    arch: &'static str,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu(ordinal {}, {})", self.ctx.ordinal(), self.arch)
    }
}

const LAYOUT_CHUNK: usize = 256;

/// A row-wise kernel in its two widths: the vectorised one (8 bf16 per access) with the row
/// width in 8-value vectors when `h % 8 == 0`, else the scalar one with the width in values.
fn by_width<'a>(h: usize, v8: &'a CudaFunction, s: &'a CudaFunction) -> (&'a CudaFunction, i32) {
    if h.is_multiple_of(8) {
        (v8, (h / 8) as i32)
    } else {
        (s, h as i32)
    }
}
/// Streams the GEMM loop of the expert FFN spreads its per-expert GEMMs over.
const FFN_LANES: usize = 4;

impl Gpu {
    /// Opens device `ordinal` (checks [`available`] first), compiles/loads the kernels.
    pub fn new(ordinal: usize) -> Result<Self> {
        let n = available()?;
        if ordinal >= n {
            return invalid(format!("GPU {ordinal} requested, {n} visible"));
        }
        let ctx = CudaContext::new(ordinal).map_err(drv)?;
        // SAFETY: switched off before any allocation; this crate orders its streams itself.
        unsafe { ctx.disable_event_tracking() };
        // Keep freed pool memory cached in the process (default threshold 0 returns it to
        // the driver at every synchronisation, making the next allocation slow).
        unsafe {
            let mut pool: cudarc::driver::sys::CUmemoryPool = std::ptr::null_mut();
            if cudarc::driver::sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device())
                .result()
                .is_ok()
            {
                let mut thr: u64 = u64::MAX;
                cudarc::driver::sys::cuMemPoolSetAttribute(
                    pool,
                    cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    &mut thr as *mut u64 as *mut std::ffi::c_void,
                )
                .result()
                .map_err(drv)?;
            }
        }
        let stream = ctx.new_stream().map_err(drv)?;
        let side = ctx.new_stream().map_err(drv)?;
        let (maj, min) = ctx.compute_capability().map_err(drv)?;
        let arch = arch_name(maj, min);
        let ptx = ptx_for_arch(arch)?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .map_err(drv)?;
        let f = |name: &str| module.load_function(name).map_err(drv);
        let k = Kernels {
            gating: f("moe_gating")?,
            map_physical: f("moe_map_physical")?,
            layout_count: f("moe_layout_count")?,
            layout_colscan: f("moe_layout_colscan")?,
            layout_slotscan: f("moe_layout_slotscan")?,
            layout_scatter: f("moe_layout_scatter")?,
            tokens_per_rank: f("moe_tokens_per_rank")?,
            layout_small: f("moe_layout_small")?,
            gather_v8: f("moe_gather_rows_v8")?,
            gather_s: f("moe_gather_rows_s")?,
            scatter_v8: f("moe_scatter_rows_v8")?,
            combine_v8: f("moe_combine_v8")?,
            combine_s: f("moe_combine_s")?,
            silu_v8: f("moe_silu_mul_v8")?,
            silu_s: f("moe_silu_mul_s")?,
            copy_v8: f("moe_copy_v8")?,
            fill: f("moe_fill_uniform")?,
            shared_gate: f("moe_shared_gate")?,
            bf16_to_f32: f("moe_bf16_to_f32")?,
            fp8_dequant: f("moe_fp8_dequant")?,
            fp8_quant_rows: f("moe_fp8_quant_rows")?,
            fp8_fill: f("moe_fp8_fill")?,
            expert_gemv: f("moe_expert_gemv")?,
            expert_gemv_fp8: f("moe_expert_gemv_fp8")?,
            _module: module,
        };
        let blas = cudarc::cublas::CudaBlas::new(stream.clone()).map_err(blas_err)?;
        let mut lanes = Vec::with_capacity(FFN_LANES);
        for _ in 0..FFN_LANES {
            let st = ctx.new_stream().map_err(drv)?;
            let b = cudarc::cublas::CudaBlas::new(st.clone()).map_err(blas_err)?;
            lanes.push((st, b));
        }
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(drv)? as u32;
        Ok(Self {
            ctx,
            stream,
            side,
            blas,
            lanes,
            k,
            sm_count,
            arch,
        })
    }

    /// The CUDA context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    /// The main stream (every operation of this crate is enqueued here).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// The side stream used for weight movement.
    pub fn side_stream(&self) -> &Arc<CudaStream> {
        &self.side
    }
    /// Device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }
    /// Device name.
    pub fn name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "unknown GPU".into())
    }
    /// The architecture the kernels were compiled for (e.g. `sm_90`).
    pub fn arch(&self) -> &'static str {
        self.arch
    }
    /// Waits for the main stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(drv)
    }

    /// Uploads a host matrix.
    pub fn upload<T: DeviceRepr + Copy + Default>(&self, m: &Matrix<T>) -> Result<DeviceMatrix<T>> {
        Ok(DeviceMatrix {
            rows: m.rows(),
            cols: m.cols(),
            buf: self.upload_slice(m.as_slice())?,
        })
    }
    /// Uploads a slice (an empty slice gives a one-element allocation: CUDA refuses empty
    /// ones).
    pub fn upload_slice<T: DeviceRepr>(&self, v: &[T]) -> Result<CudaSlice<T>> {
        if v.is_empty() {
            // SAFETY: never read (length-0 data).
            return unsafe { self.stream.alloc(1) }.map_err(drv);
        }
        self.stream.clone_htod(v).map_err(drv)
    }
    /// Downloads a slice (synchronises).
    pub fn download_slice<T: DeviceRepr + Default + Clone, S: DevicePtr<T>>(
        &self,
        s: &S,
    ) -> Result<Vec<T>> {
        if s.is_empty() {
            self.synchronize()?;
            return Ok(Vec::new());
        }
        self.stream.clone_dtoh(s).map_err(drv)
    }
    /// Allocates `n` zeroed elements on the main stream (at least one element is allocated,
    /// as CUDA refuses empty allocations).
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros(n.max(1)).map_err(drv)
    }

    /// Allocates `n` (at least one) elements that the caller's kernels fully overwrite.
    pub(crate) fn uninit<T: DeviceRepr>(&self, n: usize) -> Result<CudaSlice<T>> {
        // SAFETY: callers only use this for buffers a kernel writes completely before reading.
        unsafe { self.stream.alloc(n.max(1)) }.map_err(drv)
    }

    /// Fills `buf` with seeded uniform bf16 values in `[-scale, scale)` (device-side
    /// generator, for benchmarks and synthetic weights).
    pub fn fill_uniform(&self, buf: &mut CudaSlice<bf16>, seed: u32, scale: f32) -> Result<()> {
        let n = buf.len() as u64;
        let cfg = LaunchConfig {
            grid_dim: (self.sm_count * 8, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&self.k.fill);
        b.arg(buf).arg(&n).arg(&seed).arg(&scale);
        unsafe { b.launch(cfg) }.map_err(drv)?;
        Ok(())
    }
    /// Allocates an uninitialised `rows x cols` matrix.
    pub fn alloc_matrix<T: DeviceRepr>(&self, rows: usize, cols: usize) -> Result<DeviceMatrix<T>> {
        // SAFETY: every producer in this crate writes the whole output.
        let buf = unsafe { self.stream.alloc(rows.max(1) * cols.max(1)) }.map_err(drv)?;
        Ok(DeviceMatrix { rows, cols, buf })
    }

    fn grid(&self, blocks: usize) -> u32 {
        blocks.clamp(1, (self.sm_count as usize) * 32) as u32
    }

    /// Router logits `x [T, H] @ w_gate [E, H]^T` in fp32 (cuBLAS, fp32 accumulation).
    pub fn router_logits(
        &self,
        x: &DeviceMatrix<bf16>,
        w_gate: &DeviceMatrix<bf16>,
    ) -> Result<DeviceMatrix<f32>> {
        if x.cols != w_gate.cols {
            return invalid(format!(
                "router: x hidden {} vs w_gate {}",
                x.cols, w_gate.cols
            ));
        }
        let mut out = self.alloc_matrix::<f32>(x.rows, w_gate.rows)?;
        if x.rows > 0 {
            ffn::gemm_nt(
                self,
                *self.blas.handle(),
                x.rows,
                w_gate.rows,
                x.cols,
                ptr(&x.buf, &self.stream),
                ptr(&w_gate.buf, &self.stream),
                ptr(&out.buf, &self.stream),
                cudarc::cublas::sys::cudaDataType_t::CUDA_R_32F,
            )?;
        }
        out.rows = x.rows;
        Ok(out)
    }

    /// Router logits from an fp32 router `[E, H]` (DeepSeek keeps its routers in fp32): the
    /// bf16 rows widened to fp32, then an fp32 GEMM (no TF32), as the CPU reference computes.
    pub fn router_logits_f32(
        &self,
        x: &DeviceMatrix<bf16>,
        w_gate: &DeviceMatrix<f32>,
    ) -> Result<DeviceMatrix<f32>> {
        if x.cols != w_gate.cols {
            return invalid(format!(
                "router: x hidden {} vs w_gate {}",
                x.cols, w_gate.cols
            ));
        }
        let mut out = self.alloc_matrix::<f32>(x.rows, w_gate.rows)?;
        if x.rows > 0 {
            let n = (x.rows * x.cols) as u64;
            let xf = self.uninit::<f32>(n as usize)?;
            let cfg = LaunchConfig {
                grid_dim: (self.grid((n as usize).div_ceil(256)), 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = self.stream.launch_builder(&self.k.bf16_to_f32);
            b.arg(&x.buf).arg(&n).arg(&xf);
            // SAFETY: matches the kernel signature; both buffers hold n elements.
            unsafe { b.launch(cfg) }.map_err(drv)?;
            ffn::gemm_nt_typed(
                self,
                *self.blas.handle(),
                (x.rows, w_gate.rows, x.cols),
                ptr(&xf, &self.stream),
                ptr(&w_gate.buf, &self.stream),
                ptr(&out.buf, &self.stream),
                cudarc::cublas::sys::cudaDataType_t::CUDA_R_32F,
                cudarc::cublas::sys::cudaDataType_t::CUDA_R_32F,
            )?;
        }
        out.rows = x.rows;
        Ok(out)
    }

    /// Gating top-k (see [`GatingConfig`]); `bias` is `[E]` or `None`.
    pub fn gating_topk(
        &self,
        logits: &DeviceMatrix<f32>,
        cfg: &GatingConfig,
        bias: Option<&CudaSlice<f32>>,
    ) -> Result<DeviceTopK> {
        self.gating_topk_with(logits, cfg, None, bias)
    }

    /// [`Gpu::gating_topk`] with gpt-oss's router bias `logit_bias` (`[E]`, added to the
    /// logits before anything else).
    pub fn gating_topk_with(
        &self,
        logits: &DeviceMatrix<f32>,
        cfg: &GatingConfig,
        logit_bias: Option<&CudaSlice<f32>>,
        bias: Option<&CudaSlice<f32>>,
    ) -> Result<DeviceTopK> {
        cfg.validate()?;
        let e = cfg.num_experts;
        if logits.cols != e {
            return invalid(format!(
                "gating: logits have {} columns, config {e}",
                logits.cols
            ));
        }
        if cfg.top_k > 32 {
            return invalid("gating: the GPU kernel supports top_k <= 32");
        }
        for b in [bias, logit_bias].into_iter().flatten() {
            if b.len() != e {
                return invalid("gating: bias length differs from the number of experts");
            }
        }
        let t = logits.rows;
        let k = cfg.top_k;
        let mut ids = self.uninit::<u32>(t * k)?;
        let mut weights = self.uninit::<f32>(t * k)?;
        if t > 0 {
            let g = cfg.num_groups;
            let per_warp = (2 * e + g + e.div_ceil(4)) * 4;
            let warps = 4usize;
            let smem = per_warp * warps;
            if smem > 48 * 1024 {
                return invalid(format!("gating: {e} experts need too much shared memory"));
            }
            let null: u64 = 0;
            let bias_ptr = bias.map(|b| ptr(b, &self.stream)).unwrap_or(null);
            let lbias_ptr = logit_bias.map(|b| ptr(b, &self.stream)).unwrap_or(null);
            let cfgv = LaunchConfig {
                grid_dim: (self.grid(t.div_ceil(warps)), 1, 1),
                block_dim: (32 * warps as u32, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            let (ti, ei, ki) = (t as i32, e as i32, k as i32);
            let scoring: i32 = match cfg.scoring {
                Scoring::Softmax => 0,
                Scoring::Sigmoid => 1,
                Scoring::SoftmaxTopK => 2,
            };
            let ren = cfg.renormalize as i32;
            let (gi, tg) = (g as i32, cfg.topk_groups as i32);
            let gmax = (cfg.group_score == GroupScore::Max) as i32;
            let scale = cfg.routed_scaling_factor;
            let mut b = self.stream.launch_builder(&self.k.gating);
            b.arg(&logits.buf)
                .arg(&lbias_ptr)
                .arg(&bias_ptr)
                .arg(&ti)
                .arg(&ei)
                .arg(&ki)
                .arg(&scoring)
                .arg(&ren)
                .arg(&gi)
                .arg(&tg)
                .arg(&gmax)
                .arg(&scale)
                .arg(&mut ids)
                .arg(&mut weights);
            // SAFETY: argument list matches the kernel signature; sizes checked above.
            unsafe { b.launch(cfgv) }.map_err(drv)?;
        }
        Ok(DeviceTopK {
            tokens: t,
            k,
            ids,
            weights,
        })
    }

    /// Replica choice + load counting: `[T*k]` physical slots; `load[p] += 1` per row.
    /// Token `t` uses hash index `token_base + t`.
    pub fn map_to_physical(
        &self,
        topk: &DeviceTopK,
        map: &DeviceReplicaMap,
        token_base: u32,
        load: &mut CudaSlice<u32>,
    ) -> Result<CudaSlice<u32>> {
        if load.len() != map.num_physical {
            return invalid("map: load counters must have one entry per physical slot");
        }
        let n = topk.tokens * topk.k;
        let mut phys = self.uninit::<u32>(n)?;
        if n > 0 {
            let (ni, ki, nl, mr) = (
                n as i32,
                topk.k as i32,
                map.num_logical as i32,
                map.max_replicas as i32,
            );
            let mut b = self.stream.launch_builder(&self.k.map_physical);
            b.arg(&topk.ids)
                .arg(&ni)
                .arg(&ki)
                .arg(&token_base)
                .arg(&map.log2phy)
                .arg(&map.logcnt)
                .arg(&nl)
                .arg(&mr)
                .arg(&mut phys)
                .arg(load);
            // SAFETY: matches the kernel signature; ids come from gating (checked in-kernel).
            unsafe { b.launch(LaunchConfig::for_num_elems(n as u32)) }.map_err(drv)?;
        }
        Ok(phys)
    }

    /// Dispatch layout of `[T*k]` physical slots (see [`crate::DispatchLayout`]).
    pub fn dispatch_layout(
        &self,
        phys: &CudaSlice<u32>,
        tokens: usize,
        k: usize,
        topo: EpTopology,
    ) -> Result<DeviceLayout> {
        let n = tokens * k;
        if k == 0 || phys.len() < n {
            return invalid("layout: need tokens * k physical ids");
        }
        let t = tokens;
        let ns = topo.num_slots();
        let (ni, nsi) = (n as i32, ns as i32);
        let spr = topo.slots_per_rank as i32;
        let nr = topo.num_ranks as i32;
        if n <= 1024 && (ns + topo.num_ranks) * 4 <= 40 * 1024 {
            // one block does everything (decode-sized batches: one launch instead of five)
            let mut rows_per_slot = self.uninit::<u32>(ns)?;
            let mut slot_offsets = self.uninit::<u32>(ns + 1)?;
            let mut rows_per_rank = self.uninit::<u32>(topo.num_ranks)?;
            let mut tokens_per_rank = self.uninit::<u32>(topo.num_ranks)?;
            let mut perm = self.uninit::<u32>(n)?;
            let mut inv = self.uninit::<u32>(n)?;
            let (tt, kk) = (t as i32, k as i32);
            let mut b = self.stream.launch_builder(&self.k.layout_small);
            b.arg(phys)
                .arg(&ni)
                .arg(&tt)
                .arg(&kk)
                .arg(&nsi)
                .arg(&spr)
                .arg(&nr)
                .arg(&mut rows_per_slot)
                .arg(&mut slot_offsets)
                .arg(&mut rows_per_rank)
                .arg(&mut tokens_per_rank)
                .arg(&mut perm)
                .arg(&mut inv);
            // SAFETY: matches the kernel signature; n <= 1024 = block size, shared memory sized.
            unsafe {
                b.launch(LaunchConfig {
                    grid_dim: (1, 1, 1),
                    block_dim: (1024, 1, 1),
                    shared_mem_bytes: ((ns + topo.num_ranks) * 4) as u32,
                })
            }
            .map_err(drv)?;
            return Ok(DeviceLayout {
                topo,
                tokens: t,
                k,
                tokens_per_rank,
                rows_per_rank,
                rows_per_slot,
                slot_offsets,
                perm,
                inv,
            });
        }
        let nchunks = n.div_ceil(LAYOUT_CHUNK).max(1);
        let mut local = self.uninit::<u32>(n)?;
        let mut hist = self.uninit::<u32>(nchunks * ns)?;
        let mut rows_per_slot = self.uninit::<u32>(ns)?;
        let mut slot_offsets = self.uninit::<u32>(ns + 1)?;
        let mut rows_per_rank = self.uninit::<u32>(topo.num_ranks)?;
        let mut tokens_per_rank = self.zeros::<u32>(topo.num_ranks)?;
        let mut perm = self.zeros::<u32>(n.max(1))?;
        let mut inv = self.zeros::<u32>(n.max(1))?;
        let nci = nchunks as i32;
        unsafe {
            let mut b = self.stream.launch_builder(&self.k.layout_count);
            b.arg(phys)
                .arg(&ni)
                .arg(&nsi)
                .arg(&mut local)
                .arg(&mut hist);
            b.launch(LaunchConfig {
                grid_dim: (nchunks as u32, 1, 1),
                block_dim: (LAYOUT_CHUNK as u32, 1, 1),
                shared_mem_bytes: 0,
            })
            .map_err(drv)?;
            let mut b = self.stream.launch_builder(&self.k.layout_colscan);
            b.arg(&mut hist).arg(&nci).arg(&nsi).arg(&mut rows_per_slot);
            b.launch(LaunchConfig {
                grid_dim: (ns as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
            .map_err(drv)?;
            let mut b = self.stream.launch_builder(&self.k.layout_slotscan);
            b.arg(&rows_per_slot)
                .arg(&nsi)
                .arg(&spr)
                .arg(&mut slot_offsets)
                .arg(&mut rows_per_rank);
            b.launch(LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (1024, 1, 1),
                shared_mem_bytes: 0,
            })
            .map_err(drv)?;
            if n > 0 {
                let mut b = self.stream.launch_builder(&self.k.layout_scatter);
                b.arg(phys)
                    .arg(&ni)
                    .arg(&nsi)
                    .arg(&local)
                    .arg(&hist)
                    .arg(&slot_offsets)
                    .arg(&mut perm)
                    .arg(&mut inv);
                b.launch(LaunchConfig::for_num_elems(n as u32))
                    .map_err(drv)?;
                let (tt, kk) = (t as i32, k as i32);
                let mut b = self.stream.launch_builder(&self.k.tokens_per_rank);
                b.arg(phys)
                    .arg(&tt)
                    .arg(&kk)
                    .arg(&spr)
                    .arg(&nr)
                    .arg(&mut tokens_per_rank);
                b.launch(LaunchConfig::for_num_elems(t as u32))
                    .map_err(drv)?;
            }
        }
        Ok(DeviceLayout {
            topo,
            tokens: t,
            k,
            tokens_per_rank,
            rows_per_rank,
            rows_per_slot,
            slot_offsets,
            perm,
            inv,
        })
    }

    /// Row gather: `out[r] = x[idx[r] / div]` (`div = k` turns a permutation of (token, j)
    /// rows into token rows; `div = 1` is a plain gather).
    pub fn gather_rows(
        &self,
        x: &DeviceMatrix<bf16>,
        idx: &CudaView<'_, u32>,
        div: u32,
    ) -> Result<DeviceMatrix<bf16>> {
        let mut out = self.alloc_matrix::<bf16>(idx.len(), x.cols)?;
        self.gather_rows_into(x, idx, div, &mut out)?;
        Ok(out)
    }

    /// [`Gpu::gather_rows`] into an existing matrix with `idx.len()` rows.
    pub fn gather_rows_into(
        &self,
        x: &DeviceMatrix<bf16>,
        idx: &CudaView<'_, u32>,
        div: u32,
        out: &mut DeviceMatrix<bf16>,
    ) -> Result<()> {
        let rows = idx.len();
        if out.rows != rows || out.cols != x.cols || div == 0 {
            return invalid("gather: output shape mismatch");
        }
        if rows == 0 || x.cols == 0 {
            return Ok(());
        }
        let h = x.cols;
        let cfg = LaunchConfig {
            grid_dim: (self.grid(rows), 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let ri = rows as i32;
        let (f, w) = by_width(h, &self.k.gather_v8, &self.k.gather_s);
        let mut b = self.stream.launch_builder(f);
        b.arg(&x.buf)
            .arg(idx)
            .arg(&div)
            .arg(&ri)
            .arg(&w)
            .arg(&mut out.buf);
        // SAFETY: matches both kernels' signature (w counts 8-value vectors or values); idx
        // holds `rows` entries, each < x.rows * div.
        unsafe { b.launch(cfg) }.map_err(drv)?;
        Ok(())
    }

    /// Permute: the send buffer `out[row] = x[perm[row] / k]` (`[T*k, H]`).
    pub fn permute(
        &self,
        x: &DeviceMatrix<bf16>,
        layout: &DeviceLayout,
    ) -> Result<DeviceMatrix<bf16>> {
        let mut out = self.alloc_matrix::<bf16>(layout.tokens * layout.k, x.cols)?;
        self.permute_into(x, layout, &mut out)?;
        Ok(out)
    }

    /// [`Gpu::permute`] into an existing `[T*k, H]` matrix. With `H % 8 == 0` each token row
    /// is read once and written to its k send rows (through `layout.inv`); otherwise a row
    /// gather through `layout.perm`.
    pub fn permute_into(
        &self,
        x: &DeviceMatrix<bf16>,
        layout: &DeviceLayout,
        out: &mut DeviceMatrix<bf16>,
    ) -> Result<()> {
        let (t, k, h) = (layout.tokens, layout.k, x.cols);
        if x.rows != t || out.rows != t * k || out.cols != h {
            return invalid("permute: x must have the layout's tokens, out tokens * k rows");
        }
        if t == 0 || h == 0 {
            return Ok(());
        }
        if !h.is_multiple_of(8) {
            return self.gather_rows_into(x, &layout.perm.slice(..t * k), k as u32, out);
        }
        let hv = h / 8;
        let cfg = LaunchConfig {
            grid_dim: (self.grid(t), hv.div_ceil(128) as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (ti, ki, hvi) = (t as i32, k as i32, hv as i32);
        let mut b = self.stream.launch_builder(&self.k.scatter_v8);
        b.arg(&x.buf)
            .arg(&layout.inv)
            .arg(&ti)
            .arg(&ki)
            .arg(&hvi)
            .arg(&mut out.buf);
        // SAFETY: matches the kernel signature; inv is a permutation of 0..T*k.
        unsafe { b.launch(cfg) }.map_err(drv)?;
        Ok(())
    }

    /// Unpermute + combine: `out[t] = bf16(sum_j w[t*k+j] * y[inv[t*k+j]])`.
    pub fn unpermute_combine(
        &self,
        y: &DeviceMatrix<bf16>,
        inv: &CudaSlice<u32>,
        weights: &CudaSlice<f32>,
        tokens: usize,
        k: usize,
    ) -> Result<DeviceMatrix<bf16>> {
        let mut out = self.alloc_matrix::<bf16>(tokens, y.cols)?;
        self.unpermute_combine_into(y, inv, weights, tokens, k, &mut out)?;
        Ok(out)
    }

    /// [`Gpu::unpermute_combine`] into an existing `[tokens, H]` matrix.
    pub fn unpermute_combine_into(
        &self,
        y: &DeviceMatrix<bf16>,
        inv: &CudaSlice<u32>,
        weights: &CudaSlice<f32>,
        tokens: usize,
        k: usize,
        out: &mut DeviceMatrix<bf16>,
    ) -> Result<()> {
        self.unpermute_combine_shared_into(y, inv, weights, tokens, k, None, out)
    }

    /// [`Gpu::unpermute_combine_into`] plus the shared experts: with `shared = Some((s, g))`,
    /// `out[t] = bf16(sum_j w[t*k+j] * y[inv[t*k+j]] + g[t] * s[t])` (`g` is the per-token
    /// shared-expert gate, 1 when `None`), one rounding as on the CPU.
    #[allow(clippy::too_many_arguments)]
    pub fn unpermute_combine_shared_into(
        &self,
        y: &DeviceMatrix<bf16>,
        inv: &CudaSlice<u32>,
        weights: &CudaSlice<f32>,
        tokens: usize,
        k: usize,
        shared: Option<(&DeviceMatrix<bf16>, Option<&CudaSlice<f32>>)>,
        out: &mut DeviceMatrix<bf16>,
    ) -> Result<()> {
        if let Some((s, g)) = shared
            && (s.rows != tokens || s.cols != y.cols || g.is_some_and(|g| g.len() < tokens))
        {
            return invalid("combine: the shared experts' output must be [tokens, H]");
        }
        if y.rows != tokens * k || inv.len() < tokens * k || weights.len() < tokens * k {
            return invalid("combine: y, inv and weights must have tokens * k entries");
        }
        if out.rows != tokens || out.cols != y.cols {
            return invalid("combine: output shape mismatch");
        }
        if tokens == 0 || y.cols == 0 {
            return Ok(());
        }
        let h = y.cols;
        // column chunks of 128 vectors (1024 values); enough blocks for small token counts
        let chunks = if h.is_multiple_of(8) {
            (h / 8).div_ceil(128)
        } else {
            1
        };
        let cfg = LaunchConfig {
            grid_dim: (self.grid(tokens), chunks as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (ti, ki) = (tokens as i32, k as i32);
        let (f, w) = by_width(h, &self.k.combine_v8, &self.k.combine_s);
        let sp: u64 = shared.map(|(s, _)| ptr(&s.buf, &self.stream)).unwrap_or(0);
        let gp: u64 = shared
            .and_then(|(_, g)| g)
            .map(|g| ptr(g, &self.stream))
            .unwrap_or(0);
        let mut b = self.stream.launch_builder(f);
        b.arg(&y.buf)
            .arg(inv)
            .arg(weights)
            .arg(&ti)
            .arg(&ki)
            .arg(&w)
            .arg(&sp)
            .arg(&gp)
            .arg(&mut out.buf);
        // SAFETY: matches both kernels' signature (w counts 8-value vectors or values); inv
        // and weights hold tokens * k entries, inv indexes y's rows.
        unsafe { b.launch(cfg) }.map_err(drv)?;
        Ok(())
    }

    /// Qwen2-MoE's shared-expert gate per token: `g[t] = sigmoid(x[t] . w)` (fp32).
    pub fn shared_gate(
        &self,
        x: &DeviceMatrix<bf16>,
        w: &CudaSlice<f32>,
    ) -> Result<CudaSlice<f32>> {
        if w.len() != x.cols {
            return invalid("shared gate: the gate vector must have H entries");
        }
        let g = self.uninit::<f32>(x.rows)?;
        if x.rows == 0 {
            return Ok(g);
        }
        let (ti, hi) = (x.rows as i32, x.cols as i32);
        let cfg = LaunchConfig {
            grid_dim: (self.grid(x.rows.div_ceil(4)), 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&self.k.shared_gate);
        b.arg(&x.buf).arg(w).arg(&ti).arg(&hi).arg(&g);
        // SAFETY: matches the kernel signature; x is [T, H], w [H], g [T].
        unsafe { b.launch(cfg) }.map_err(drv)?;
        Ok(g)
    }

    /// Fused SiLU-and-multiply `[n, 2I] -> [n, I]`.
    pub fn silu_and_mul(&self, gate_up: &DeviceMatrix<bf16>) -> Result<DeviceMatrix<bf16>> {
        if !gate_up.cols.is_multiple_of(2) {
            return invalid("silu_and_mul: odd number of columns");
        }
        let mut out = self.alloc_matrix::<bf16>(gate_up.rows, gate_up.cols / 2)?;
        self.silu_and_mul_raw(
            ptr(&gate_up.buf, &self.stream),
            gate_up.rows,
            gate_up.cols / 2,
            ptr(&out.buf, &self.stream),
        )?;
        out.rows = gate_up.rows;
        Ok(out)
    }

    pub(crate) fn silu_and_mul_raw(&self, gu: u64, n: usize, i: usize, h: u64) -> Result<()> {
        if n == 0 || i == 0 {
            return Ok(());
        }
        let ni = n as i32;
        let (f, w) = by_width(i, &self.k.silu_v8, &self.k.silu_s);
        let cfg = LaunchConfig {
            grid_dim: (self.grid((n * w as usize).div_ceil(256)), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(f);
        b.arg(&gu).arg(&ni).arg(&w).arg(&h);
        // SAFETY: matches both kernels' signature (w counts 8-value vectors or values); gu
        // points at n * 2i values and h at n * i on this GPU.
        unsafe { b.launch(cfg) }.map_err(drv)?;
        Ok(())
    }

    /// Device-to-device copy with the crate's vectorised copy kernel (bandwidth probe);
    /// `bytes` must be a multiple of 16.
    pub fn copy_kernel(&self, src: &CudaSlice<u8>, dst: &mut CudaSlice<u8>) -> Result<()> {
        let n = src.len().min(dst.len()) / 16;
        let cfg = LaunchConfig {
            grid_dim: (self.sm_count * 8, 1, 1),
            block_dim: (512, 1, 1),
            shared_mem_bytes: 0,
        };
        let nn = n as u64;
        let mut b = self.stream.launch_builder(&self.k.copy_v8);
        b.arg(src).arg(&nn).arg(dst);
        unsafe { b.launch(cfg) }.map_err(drv)?;
        Ok(())
    }
}

/// Raw device address of a slice (event tracking is off, so no guard is needed).
pub(crate) fn ptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    let (p, _g) = s.device_ptr(stream);
    p
}

/// A row-major matrix in device memory.
#[derive(Debug)]
pub struct DeviceMatrix<T> {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// `rows * cols` elements (at least one element is allocated).
    pub buf: CudaSlice<T>,
}

impl<T: DeviceRepr + Copy + Default> DeviceMatrix<T> {
    /// Downloads to the host (synchronises).
    pub fn download(&self, gpu: &Gpu) -> Result<Matrix<T>> {
        let n = self.rows * self.cols;
        let mut v = gpu.download_slice(&self.buf.slice(..n))?;
        v.truncate(n);
        Matrix::from_vec(self.rows, self.cols, v)
    }
}

/// Gating result on the device.
#[derive(Debug)]
pub struct DeviceTopK {
    /// Tokens.
    pub tokens: usize,
    /// Experts per token.
    pub k: usize,
    /// `[T*k]` logical expert ids.
    pub ids: CudaSlice<u32>,
    /// `[T*k]` weights.
    pub weights: CudaSlice<f32>,
}

/// A [`ReplicaMap`] in device memory.
#[derive(Debug)]
pub struct DeviceReplicaMap {
    num_logical: usize,
    num_physical: usize,
    max_replicas: usize,
    log2phy: CudaSlice<i32>,
    logcnt: CudaSlice<u32>,
}

impl DeviceReplicaMap {
    /// Uploads a map.
    pub fn upload(gpu: &Gpu, map: &ReplicaMap) -> Result<Self> {
        Ok(Self {
            num_logical: map.num_logical(),
            num_physical: map.num_physical(),
            max_replicas: map.max_replicas(),
            log2phy: gpu.upload_slice(map.log2phy())?,
            logcnt: gpu.upload_slice(map.logcnt())?,
        })
    }
    /// Physical slots (length of the load counters).
    pub fn num_physical(&self) -> usize {
        self.num_physical
    }
}

/// Dispatch layout on the device (fields as in [`crate::DispatchLayout`]).
#[derive(Debug)]
pub struct DeviceLayout {
    /// Topology.
    pub topo: EpTopology,
    /// Tokens.
    pub tokens: usize,
    /// Experts per token.
    pub k: usize,
    /// `[G]`
    pub tokens_per_rank: CudaSlice<u32>,
    /// `[G]`
    pub rows_per_rank: CudaSlice<u32>,
    /// `[G*S]`
    pub rows_per_slot: CudaSlice<u32>,
    /// `[G*S+1]`
    pub slot_offsets: CudaSlice<u32>,
    /// `[T*k]`
    pub perm: CudaSlice<u32>,
    /// `[T*k]`
    pub inv: CudaSlice<u32>,
}

impl DeviceLayout {
    /// Copies the layout to the host (synchronises).
    pub fn download(&self, gpu: &Gpu) -> Result<crate::DispatchLayout> {
        let n = self.tokens * self.k;
        Ok(crate::DispatchLayout {
            topo: self.topo,
            tokens: self.tokens,
            k: self.k,
            tokens_per_rank: gpu.download_slice(&self.tokens_per_rank)?,
            rows_per_rank: gpu.download_slice(&self.rows_per_rank)?,
            rows_per_slot: gpu.download_slice(&self.rows_per_slot)?,
            slot_offsets: gpu.download_slice(&self.slot_offsets)?,
            perm: gpu.download_slice(&self.perm.slice(..n))?,
            inv: gpu.download_slice(&self.inv.slice(..n))?,
        })
    }
}
