//! The block-scaled FP8 GEMM through cuBLASLt (`D = X @ W^T` with W's 128x128 block scales and
//! X's 1x128 scales, fp32 accumulation, bf16 out): the handle and workspaces per GPU, the
//! descriptors (freed on every path), the algorithm lookup, and a probe of what the installed
//! cuBLASLt supports. The FP8 experts ([`super::fp8`]) run their `Native` FFN on it.

use super::{Gpu, drv, ptr};
use crate::error::{KernelError, Result, invalid};
use cudarc::cublaslt::sys as lt;
use cudarc::driver::{CudaSlice, CudaStream};
use std::collections::HashMap;
use std::sync::Mutex;

/// cuBLASLt state shared by the FFN calls of one GPU: the handle, one workspace per stream
/// that runs GEMMs, and the algorithms found per problem shape.
pub(crate) struct LtContext {
    handle: lt::cublasLtHandle_t,
    workspaces: Vec<CudaSlice<u8>>,
    algos: Mutex<HashMap<(usize, usize, usize, usize), lt::cublasLtMatmulAlgo_t>>,
}

const LT_WORKSPACE: usize = 32 << 20;

impl std::fmt::Debug for LtContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LtContext")
    }
}

// SAFETY: the handle and workspaces are only used through `&LtContext` by the thread that
// owns the experts (the FFN takes `&mut self`); the algorithm cache has its own lock.
unsafe impl Send for LtContext {}

impl Drop for LtContext {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtCreate, destroyed once.
        unsafe {
            lt::cublasLtDestroy(self.handle);
        }
    }
}

fn lt_err(what: &str, s: lt::cublasStatus_t) -> KernelError {
    KernelError::Cublas(format!("{what}: {s:?}"))
}

fn lt_ok(what: &str, s: lt::cublasStatus_t) -> Result<()> {
    if s == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(lt_err(what, s))
    }
}

/// The matmul descriptor and the three layouts of one block-scaled FP8 GEMM (weights `[m, k]`
/// with 128x128 scales times activations `[n, k]` with 1x128 scales into bf16 `[m, n]`): the
/// algorithm lookup and the launch describe it the same way.
fn describe(g: &Fp8Gemm) -> Result<(Desc, Layout, Layout, Layout)> {
    use lt::cublasLtMatmulDescAttributes_t as A;
    let mut desc: lt::cublasLtMatmulDesc_t = std::ptr::null_mut();
    // SAFETY: out-pointer to a descriptor.
    lt_ok("cublasLtMatmulDescCreate", unsafe {
        lt::cublasLtMatmulDescCreate(
            &mut desc,
            lt::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            lt::cudaDataType_t::CUDA_R_32F,
        )
    })?;
    let desc = Desc(desc);
    set_attr(
        &desc,
        A::CUBLASLT_MATMUL_DESC_TRANSA,
        &cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T,
    )?;
    set_attr(
        &desc,
        A::CUBLASLT_MATMUL_DESC_TRANSB,
        &cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N,
    )?;
    set_attr(
        &desc,
        A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE,
        &lt::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F,
    )?;
    set_attr(
        &desc,
        A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE,
        &lt::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F,
    )?;
    set_attr(&desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &g.ws)?;
    set_attr(&desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &g.xs)?;
    let a = layout(lt::cudaDataType_t::CUDA_R_8F_E4M3, g.k, g.m, g.k)?;
    let b = layout(lt::cudaDataType_t::CUDA_R_8F_E4M3, g.k, g.n, g.k)?;
    let d = layout(lt::cudaDataType_t::CUDA_R_16BF, g.m, g.n, g.ldd)?;
    Ok((desc, a, b, d))
}

impl LtContext {
    pub(crate) fn new(gpu: &Gpu, streams: usize) -> Result<Self> {
        // SAFETY: only tries to dlopen the library.
        if !unsafe { lt::is_culib_present() } {
            return Err(KernelError::Unavailable(
                "no cuBLASLt library (libcublasLt) found".into(),
            ));
        }
        gpu.context().bind_to_thread().map_err(drv)?;
        let mut handle: lt::cublasLtHandle_t = std::ptr::null_mut();
        // SAFETY: out-pointer to a handle.
        lt_ok("cublasLtCreate", unsafe { lt::cublasLtCreate(&mut handle) })?;
        let workspaces = (0..streams.max(1))
            .map(|_| gpu.zeros::<u8>(LT_WORKSPACE))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            handle,
            workspaces,
            algos: Mutex::new(HashMap::new()),
        })
    }
}

/// One block-scaled FP8 GEMM (cuBLASLt, column-major view of row-major data):
/// `D[n, m] (ld ldd) = X[n, k] @ W[m, k]^T` with W's 128x128 block scales `ws` and X's
/// 1x128 scales `xs` (`[k/128][n rounded up to 4]`).
pub(super) struct Fp8Gemm {
    pub(super) m: usize,
    pub(super) n: usize,
    pub(super) k: usize,
    pub(super) ldd: usize,
    pub(super) w: u64,
    pub(super) ws: u64,
    pub(super) x: u64,
    pub(super) xs: u64,
    pub(super) d: u64,
}

/// RAII wrappers so that every early return frees the descriptors.
struct Desc(lt::cublasLtMatmulDesc_t);
impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtMatmulDescCreate.
        unsafe {
            lt::cublasLtMatmulDescDestroy(self.0);
        }
    }
}
struct Layout(lt::cublasLtMatrixLayout_t);
impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtMatrixLayoutCreate.
        unsafe {
            lt::cublasLtMatrixLayoutDestroy(self.0);
        }
    }
}
struct Pref(lt::cublasLtMatmulPreference_t);
impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtMatmulPreferenceCreate.
        unsafe {
            lt::cublasLtMatmulPreferenceDestroy(self.0);
        }
    }
}

fn set_attr<T>(d: &Desc, a: lt::cublasLtMatmulDescAttributes_t, v: &T) -> Result<()> {
    // SAFETY: `v` is a live value of the attribute's type and size.
    lt_ok("cublasLtMatmulDescSetAttribute", unsafe {
        lt::cublasLtMatmulDescSetAttribute(
            d.0,
            a,
            v as *const T as *const std::ffi::c_void,
            std::mem::size_of::<T>(),
        )
    })
}

fn layout(ty: lt::cudaDataType_t, rows: usize, cols: usize, ld: usize) -> Result<Layout> {
    let mut l: lt::cublasLtMatrixLayout_t = std::ptr::null_mut();
    // SAFETY: out-pointer to a layout.
    lt_ok("cublasLtMatrixLayoutCreate", unsafe {
        lt::cublasLtMatrixLayoutCreate(&mut l, ty, rows as u64, cols as u64, ld as i64)
    })?;
    Ok(Layout(l))
}

impl LtContext {
    /// Only the algorithm lookup of [`LtContext::gemm`] (nothing is enqueued).
    fn heuristic(&self, g: &Fp8Gemm) -> Result<()> {
        let (desc, a, b, d) = describe(g)?;
        let mut pref: lt::cublasLtMatmulPreference_t = std::ptr::null_mut();
        // SAFETY: out-pointer to a preference.
        lt_ok("cublasLtMatmulPreferenceCreate", unsafe {
            lt::cublasLtMatmulPreferenceCreate(&mut pref)
        })?;
        let pref = Pref(pref);
        // SAFETY: zeroed is a valid "empty" result struct (plain data).
        let mut res: lt::cublasLtMatmulHeuristicResult_t = unsafe { std::mem::zeroed() };
        let mut count = 0i32;
        // SAFETY: descriptors are live; one result requested.
        lt_ok("heuristic", unsafe {
            lt::cublasLtMatmulAlgoGetHeuristic(
                self.handle,
                desc.0,
                a.0,
                b.0,
                d.0,
                d.0,
                pref.0,
                1,
                &mut res,
                &mut count,
            )
        })?;
        if count == 0 {
            return invalid("no algorithm");
        }
        Ok(())
    }

    /// Enqueues one GEMM on `stream` with workspace `ws_index`. The algorithm is looked up
    /// once per (m, n rounded up to 64, k, ldd) and reused; a reused one that does not fit
    /// this n is replaced by a fresh lookup.
    pub(super) fn gemm(&self, g: &Fp8Gemm, stream: &CudaStream, ws_index: usize) -> Result<()> {
        let (desc, a, b, d) = describe(g)?;
        let key = (g.m, g.n.div_ceil(64) * 64, g.k, g.ldd);
        let ws = &self.workspaces[ws_index % self.workspaces.len()];
        let wsp = ptr(ws, stream);
        let run = |algo: &lt::cublasLtMatmulAlgo_t| {
            let (alpha, beta) = (1.0f32, 0.0f32);
            // SAFETY: descriptors describe the device buffers; the workspace belongs to
            // this stream's index alone.
            unsafe {
                lt::cublasLtMatmul(
                    self.handle,
                    desc.0,
                    &alpha as *const f32 as *const _,
                    g.w as *const _,
                    a.0,
                    g.x as *const _,
                    b.0,
                    &beta as *const f32 as *const _,
                    g.d as *const _,
                    d.0,
                    g.d as *mut _,
                    d.0,
                    algo,
                    wsp as *mut _,
                    LT_WORKSPACE,
                    stream.cu_stream() as lt::cudaStream_t,
                )
            }
        };
        let cached = self
            .algos
            .lock()
            .map_err(|_| KernelError::Cublas("algorithm cache poisoned".into()))?
            .get(&key)
            .copied();
        if let Some(algo) = cached
            && run(&algo) == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS
        {
            return Ok(());
        }
        let mut pref: lt::cublasLtMatmulPreference_t = std::ptr::null_mut();
        // SAFETY: out-pointer to a preference.
        lt_ok("cublasLtMatmulPreferenceCreate", unsafe {
            lt::cublasLtMatmulPreferenceCreate(&mut pref)
        })?;
        let pref = Pref(pref);
        let wsb = LT_WORKSPACE;
        // SAFETY: the attribute is a size_t.
        lt_ok("cublasLtMatmulPreferenceSetAttribute", unsafe {
            lt::cublasLtMatmulPreferenceSetAttribute(
                pref.0,
                lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &wsb as *const usize as *const _,
                std::mem::size_of::<usize>(),
            )
        })?;
        // SAFETY: zeroed is a valid "empty" result struct (plain data).
        let mut res: lt::cublasLtMatmulHeuristicResult_t = unsafe { std::mem::zeroed() };
        let mut count = 0i32;
        // SAFETY: descriptors are live; one result requested.
        lt_ok(
            &format!(
                "cublasLtMatmulAlgoGetHeuristic (m {} n {} k {})",
                g.m, g.n, g.k
            ),
            unsafe {
                lt::cublasLtMatmulAlgoGetHeuristic(
                    self.handle,
                    desc.0,
                    a.0,
                    b.0,
                    d.0,
                    d.0,
                    pref.0,
                    1,
                    &mut res,
                    &mut count,
                )
            },
        )?;
        if count == 0 {
            return Err(KernelError::Cublas(format!(
                "cuBLASLt has no block-scaled FP8 GEMM for m {} n {} k {} on this GPU \
                 (needs Hopper and CUDA 12.9+); use Fp8Compute::Dequant",
                g.m, g.n, g.k
            )));
        }
        lt_ok("cublasLtMatmul (fp8 block-scaled)", run(&res.algo))?;
        if let Ok(mut m) = self.algos.lock() {
            m.insert(key, res.algo);
        }
        Ok(())
    }
}

/// Asks cuBLASLt whether it has a block-scaled FP8 GEMM for a few shapes (diagnostics for the
/// benchmark's log): one line per shape.
pub fn probe_block_scaled(gpu: &Gpu) -> Result<Vec<String>> {
    let ctx = LtContext::new(gpu, 1)?;
    let buf = gpu.zeros::<u8>(1 << 20)?;
    let p = ptr(&buf, gpu.stream());
    let mut lines = Vec::new();
    for &(m, n, k) in &[
        (512usize, 4usize, 512usize),
        (512, 5, 512),
        (512, 128, 512),
        (4096, 256, 7168),
        (7168, 256, 2048),
    ] {
        let g = Fp8Gemm {
            m,
            n,
            k,
            ldd: m,
            w: p,
            ws: p,
            x: p,
            xs: p,
            d: p,
        };
        let r = ctx.heuristic(&g).map(|_| "supported".to_string());
        lines.push(format!(
            "block-scaled fp8 m {m} n {n} k {k}: {}",
            match r {
                Ok(v) => v,
                Err(e) => e.to_string(),
            }
        ));
    }
    Ok(lines)
}
