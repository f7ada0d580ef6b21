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
mod fp8_gemm;
mod gating;
mod layer;
mod rows;
mod timing;

pub use comm::{EpComm, NcclId, enable_peer_access, grouped};
pub use ffn::{DeviceExperts, ExpertStaging, FfnStrategy};
pub use fp8::{DeviceFp8Experts, Fp8Compute, Fp8Staging};
pub use fp8_gemm::probe_block_scaled;
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
