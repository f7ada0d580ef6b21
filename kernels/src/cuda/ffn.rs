//! Expert FFN (SwiGLU) over variable token counts: a loop of cuBLAS GEMMs, or one raw
//! `cublasGemmGroupedBatchedEx` call per projection with device-resident pointer arrays.

use super::{DeviceMatrix, Gpu, blas_err, drv, ptr};
use crate::error::{Result, invalid};
use crate::tensor::{ExpertWeights, Matrix};
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};
use cudarc::driver::CudaSlice;
use half::bf16;

/// How [`DeviceExperts::ffn`] runs its GEMMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfnStrategy {
    /// One cuBLAS GEMM per expert and projection, spread over several streams so that
    /// small GEMMs overlap.
    Loop,
    /// The same GEMMs one after the other on the main stream (reference point).
    SerialLoop,
    /// One grouped GEMM call per projection (all experts at once).
    Grouped,
    /// Grouped when the largest expert has at most `max_rows_grouped` rows, else the loop.
    Auto {
        /// Crossover (rows of the busiest expert).
        max_rows_grouped: usize,
    },
}

impl Default for FfnStrategy {
    /// The crossover measured on H100 (docs/benchmarks/kernels.md).
    fn default() -> Self {
        FfnStrategy::Auto {
            max_rows_grouped: 64,
        }
    }
}

/// `C[n, m] = X[n, k] @ W[m, k]^T` (row-major, bf16 inputs, fp32 accumulation, output type
/// `ctype`) on the GPU's main stream.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_nt(
    gpu: &Gpu,
    handle: cudarc::cublas::sys::cublasHandle_t,
    n: usize,
    m: usize,
    k: usize,
    x: u64,
    w: u64,
    c: u64,
    ctype: cudaDataType_t,
) -> Result<()> {
    gemm_nt_typed(
        gpu,
        handle,
        (n, m, k),
        x,
        w,
        c,
        cudaDataType_t::CUDA_R_16BF,
        ctype,
    )
}

/// [`gemm_nt`] with inputs of type `abtype` (bf16, or fp32 for the fp32 routers).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_nt_typed(
    gpu: &Gpu,
    handle: cudarc::cublas::sys::cublasHandle_t,
    (n, m, k): (usize, usize, usize),
    x: u64,
    w: u64,
    c: u64,
    abtype: cudaDataType_t,
    ctype: cudaDataType_t,
) -> Result<()> {
    gpu.context().bind_to_thread().map_err(drv)?;
    let alpha = 1.0f32;
    let beta = 0.0f32;
    // Column-major view: C^T [m, n] = W^T' ... i.e. op(A)=W (transposed), op(B)=X^T.
    unsafe {
        cudarc::cublas::sys::cublasGemmEx(
            handle,
            cublasOperation_t::CUBLAS_OP_T,
            cublasOperation_t::CUBLAS_OP_N,
            m as i32,
            n as i32,
            k as i32,
            &alpha as *const f32 as *const _,
            w as *const _,
            abtype,
            k as i32,
            x as *const _,
            abtype,
            k as i32,
            &beta as *const f32 as *const _,
            c as *mut _,
            ctype,
            m as i32,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
        .result()
        .map_err(blas_err)
    }
}

/// `C[r] = X[r] @ W[slot(r)]^T` for `[slots][m][k]` weights, rows grouped by the device
/// `offsets` (see `moe_expert_gemv`).
#[allow(clippy::too_many_arguments)]
fn gemv(
    gpu: &Gpu,
    x: u64,
    w: u64,
    offsets: &CudaSlice<u32>,
    slots: usize,
    m: usize,
    k: usize,
    c: u64,
) -> Result<()> {
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    let warps = 8usize;
    let cfg = LaunchConfig {
        grid_dim: (m.div_ceil(warps).clamp(1, 64) as u32, slots as u32, 1),
        block_dim: (32 * warps as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let (mi, kv) = (m as i32, (k / 8) as i32);
    let mut b = gpu.stream().launch_builder(&gpu.k.expert_gemv);
    b.arg(&x).arg(&w).arg(offsets).arg(&mi).arg(&kv).arg(&c);
    // SAFETY: matches the kernel signature; x holds the offsets' rows of k values, w slots x
    // m x k, c rows x m; k % 8 == 0 (16-byte vectors).
    unsafe { b.launch(cfg) }.map_err(drv)?;
    Ok(())
}

/// Makes every lane wait for the work enqueued so far on the main stream.
pub(crate) fn fork(
    gpu: &Gpu,
    lanes: &[(
        std::sync::Arc<cudarc::driver::CudaStream>,
        cudarc::cublas::CudaBlas,
    )],
) -> Result<()> {
    if lanes.is_empty() {
        return Ok(());
    }
    let ev = gpu.stream().record_event(None).map_err(drv)?;
    for (st, _) in lanes {
        st.wait(&ev).map_err(drv)?;
    }
    Ok(())
}

/// Makes the main stream wait for everything enqueued on the lanes.
pub(crate) fn join(
    gpu: &Gpu,
    lanes: &[(
        std::sync::Arc<cudarc::driver::CudaStream>,
        cudarc::cublas::CudaBlas,
    )],
) -> Result<()> {
    for (st, _) in lanes {
        let ev = st.record_event(None).map_err(drv)?;
        gpu.stream().wait(&ev).map_err(drv)?;
    }
    Ok(())
}

/// One grouped GEMM: for each group g, `C_g[n_g, m] = X_g[n_g, k] @ W_g[m, k]^T`.
/// `ptrs` is a device buffer receiving the `3 * groups` pointers.
#[allow(clippy::too_many_arguments)]
fn grouped_gemm_nt(
    gpu: &Gpu,
    m: usize,
    k: usize,
    ns: &[i32],
    xs: &[u64],
    ws: &[u64],
    cs: &[u64],
    ptrs: &mut CudaSlice<u64>,
) -> Result<()> {
    let g = ns.len();
    if g == 0 {
        return Ok(());
    }
    gpu.context().bind_to_thread().map_err(drv)?;
    let mut host = Vec::with_capacity(3 * g);
    host.extend_from_slice(ws);
    host.extend_from_slice(xs);
    host.extend_from_slice(cs);
    gpu.stream().memcpy_htod(&host, ptrs).map_err(drv)?;
    let base = ptr(ptrs, gpu.stream());
    let ta = vec![cublasOperation_t::CUBLAS_OP_T; g];
    let tb = vec![cublasOperation_t::CUBLAS_OP_N; g];
    let ms = vec![m as i32; g];
    let ks = vec![k as i32; g];
    let alpha = vec![1.0f32; g];
    let beta = vec![0.0f32; g];
    let ld_k = vec![k as i32; g];
    let ld_m = vec![m as i32; g];
    let sizes = vec![1i32; g];
    unsafe {
        cudarc::cublas::sys::cublasGemmGroupedBatchedEx(
            *gpu.blas.handle(),
            ta.as_ptr(),
            tb.as_ptr(),
            ms.as_ptr(),
            ns.as_ptr(),
            ks.as_ptr(),
            alpha.as_ptr() as *const _,
            base as *const *const std::ffi::c_void,
            cudaDataType_t::CUDA_R_16BF,
            ld_k.as_ptr(),
            (base + 8 * g as u64) as *const *const std::ffi::c_void,
            cudaDataType_t::CUDA_R_16BF,
            ld_k.as_ptr(),
            beta.as_ptr() as *const _,
            (base + 16 * g as u64) as *const *mut std::ffi::c_void,
            cudaDataType_t::CUDA_R_16BF,
            ld_m.as_ptr(),
            g as i32,
            sizes.as_ptr(),
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
        )
        .result()
        .map_err(blas_err)
    }
}

/// The weights of `slots` experts on one GPU, slot-contiguous:
/// `w1 [slots, 2I, H]`, `w2 [slots, H, I]` (same per-expert layout as [`ExpertWeights`]).
#[derive(Debug)]
pub struct DeviceExperts {
    /// Number of slots.
    pub slots: usize,
    /// Hidden size H.
    pub hidden: usize,
    /// Intermediate size I.
    pub inter: usize,
    /// `[slots * 2I * H]`
    pub w1: CudaSlice<bf16>,
    /// `[slots * H * I]`
    pub w2: CudaSlice<bf16>,
}

/// Staging buffer for one slot's weights (weight movement target).
#[derive(Debug)]
pub struct ExpertStaging {
    /// `[2I * H]`
    pub w1: CudaSlice<bf16>,
    /// `[H * I]`
    pub w2: CudaSlice<bf16>,
}

impl DeviceExperts {
    /// Uploads experts (all with the same shape).
    pub fn upload(gpu: &Gpu, experts: &[ExpertWeights]) -> Result<Self> {
        let Some(first) = experts.first() else {
            return invalid("experts: need at least one slot");
        };
        let (h, i) = (first.hidden(), first.intermediate());
        let mut w1 = Vec::with_capacity(experts.len() * 2 * i * h);
        let mut w2 = Vec::with_capacity(experts.len() * h * i);
        for e in experts {
            if e.hidden() != h || e.intermediate() != i {
                return invalid("experts: all slots must have the same shape");
            }
            if e.bias.is_some() {
                return invalid(
                    "experts: projection biases (gpt-oss) run on the CPU backend only for now",
                );
            }
            w1.extend_from_slice(e.w1.as_slice());
            w2.extend_from_slice(e.w2.as_slice());
        }
        Ok(Self {
            slots: experts.len(),
            hidden: h,
            inter: i,
            w1: gpu.upload_slice(&w1)?,
            w2: gpu.upload_slice(&w2)?,
        })
    }

    /// Synthetic experts generated on the device (seeded uniform in `[-scale, scale)`).
    pub fn random(
        gpu: &Gpu,
        slots: usize,
        hidden: usize,
        inter: usize,
        seed: u32,
        scale: f32,
    ) -> Result<Self> {
        if slots == 0 || hidden == 0 || inter == 0 {
            return invalid("experts: empty shape");
        }
        let mut w1 = gpu.zeros::<bf16>(slots * 2 * inter * hidden)?;
        let mut w2 = gpu.zeros::<bf16>(slots * hidden * inter)?;
        gpu.fill_uniform(&mut w1, seed, scale)?;
        gpu.fill_uniform(&mut w2, seed.wrapping_add(0x5bd1_e995), scale)?;
        Ok(Self {
            slots,
            hidden,
            inter,
            w1,
            w2,
        })
    }

    /// Elements of one slot's `w1` and `w2`.
    pub fn slot_elems(&self) -> (usize, usize) {
        (2 * self.inter * self.hidden, self.hidden * self.inter)
    }

    /// Bytes of one slot.
    pub fn slot_bytes(&self) -> usize {
        let (a, b) = self.slot_elems();
        2 * (a + b)
    }

    /// Downloads one slot's weights (synchronises).
    pub fn download_slot(&self, gpu: &Gpu, slot: usize) -> Result<ExpertWeights> {
        if slot >= self.slots {
            return invalid("experts: slot out of range");
        }
        let (a, b) = self.slot_elems();
        let w1 = gpu.download_slice(&self.w1.slice(slot * a..(slot + 1) * a))?;
        let w2 = gpu.download_slice(&self.w2.slice(slot * b..(slot + 1) * b))?;
        ExpertWeights::new(
            Matrix::from_vec(2 * self.inter, self.hidden, w1)?,
            Matrix::from_vec(self.hidden, self.inter, w2)?,
        )
    }

    /// Allocates a staging buffer for one slot (on the main stream; synchronises).
    pub fn new_staging(&self, gpu: &Gpu) -> Result<ExpertStaging> {
        let (a, b) = self.slot_elems();
        let s = ExpertStaging {
            w1: gpu.zeros(a)?,
            w2: gpu.zeros(b)?,
        };
        gpu.synchronize()?;
        Ok(s)
    }

    /// Allocates a staging buffer for one slot on the main stream, without zeroing it or
    /// waiting: for a buffer that a copy or a receive fills before anything reads it.
    pub fn alloc_staging(&self, gpu: &Gpu) -> Result<ExpertStaging> {
        let (a, b) = self.slot_elems();
        // SAFETY: the memory is left unset; callers fill it (copy / NCCL receive) before a
        // commit reads it. Device memory holds plain bf16 bits: no Rust value is invalid.
        unsafe {
            Ok(ExpertStaging {
                w1: gpu.stream().alloc::<bf16>(a).map_err(drv)?,
                w2: gpu.stream().alloc::<bf16>(b).map_err(drv)?,
            })
        }
    }

    /// SwiGLU FFN of the local experts over rows grouped by expert: rows
    /// `offsets[e]..offsets[e+1]` of `x` (`[R, H]`) go through slot `e`; `offsets` (host,
    /// `slots + 1` entries) is known on the host anyway (the all-to-all needs the counts).
    pub fn ffn(
        &self,
        gpu: &Gpu,
        x: &DeviceMatrix<bf16>,
        offsets: &[u32],
        strategy: FfnStrategy,
    ) -> Result<DeviceMatrix<bf16>> {
        let (h, i) = (self.hidden, self.inter);
        check_grouped_rows("ffn", self.slots, h, x, offsets)?;
        let r = x.rows;
        let mut out = gpu.alloc_matrix::<bf16>(r, h)?;
        if r == 0 {
            return Ok(out);
        }
        let gu = gpu.alloc_matrix::<bf16>(r, 2 * i)?;
        let hm = gpu.alloc_matrix::<bf16>(r, i)?;
        let s = gpu.stream();
        let (px, pgu, ph, py) = (
            ptr(&x.buf, s),
            ptr(&gu.buf, s),
            ptr(&hm.buf, s),
            ptr(&out.buf, s),
        );
        let (pw1, pw2) = (ptr(&self.w1, s), ptr(&self.w2, s));
        let (e1, e2) = self.slot_elems();
        let max_rows = offsets
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap_or(0);
        let grouped = match strategy {
            FfnStrategy::Loop | FfnStrategy::SerialLoop => false,
            FfnStrategy::Grouped => true,
            FfnStrategy::Auto { max_rows_grouped } => max_rows <= max_rows_grouped,
        };
        let groups: Vec<(usize, usize, usize)> = (0..self.slots)
            .filter_map(|e| {
                let (a, b) = (offsets[e] as usize, offsets[e + 1] as usize);
                (b > a).then_some((e, a, b - a))
            })
            .collect();
        if grouped {
            let mut ptrs = gpu.zeros::<u64>(3 * groups.len())?;
            let ns: Vec<i32> = groups.iter().map(|g| g.2 as i32).collect();
            let xs: Vec<u64> = groups.iter().map(|g| px + (g.1 * h * 2) as u64).collect();
            let w1s: Vec<u64> = groups.iter().map(|g| pw1 + (g.0 * e1 * 2) as u64).collect();
            let gus: Vec<u64> = groups
                .iter()
                .map(|g| pgu + (g.1 * 2 * i * 2) as u64)
                .collect();
            grouped_gemm_nt(gpu, 2 * i, h, &ns, &xs, &w1s, &gus, &mut ptrs)?;
            gpu.silu_and_mul_raw(pgu, r, i, ph)?;
            let mut ptrs2 = gpu.zeros::<u64>(3 * groups.len())?;
            let hs: Vec<u64> = groups.iter().map(|g| ph + (g.1 * i * 2) as u64).collect();
            let w2s: Vec<u64> = groups.iter().map(|g| pw2 + (g.0 * e2 * 2) as u64).collect();
            let ys: Vec<u64> = groups.iter().map(|g| py + (g.1 * h * 2) as u64).collect();
            grouped_gemm_nt(gpu, h, i, &ns, &hs, &w2s, &ys, &mut ptrs2)?;
        } else {
            // Per-expert GEMMs spread round-robin over the lanes (each its own stream and
            // cuBLAS handle) so that small GEMMs run concurrently; joined before the
            // SiLU and at the end.
            let lanes = if groups.len() > 1 {
                &gpu.lanes[..]
            } else {
                &gpu.lanes[..0]
            };
            let handle_of = |j: usize| match lanes.get(j % lanes.len().max(1)) {
                Some((_, b)) => *b.handle(),
                None => *gpu.blas.handle(),
            };
            fork(gpu, lanes)?;
            for (j, &(e, a, n)) in groups.iter().enumerate() {
                gemm_nt(
                    gpu,
                    handle_of(j),
                    n,
                    2 * i,
                    h,
                    px + (a * h * 2) as u64,
                    pw1 + (e * e1 * 2) as u64,
                    pgu + (a * 2 * i * 2) as u64,
                    cudaDataType_t::CUDA_R_16BF,
                )?;
            }
            join(gpu, lanes)?;
            gpu.silu_and_mul_raw(pgu, r, i, ph)?;
            fork(gpu, lanes)?;
            for (j, &(e, a, n)) in groups.iter().enumerate() {
                gemm_nt(
                    gpu,
                    handle_of(j),
                    n,
                    h,
                    i,
                    ph + (a * i * 2) as u64,
                    pw2 + (e * e2 * 2) as u64,
                    py + (a * h * 2) as u64,
                    cudaDataType_t::CUDA_R_16BF,
                )?;
            }
            join(gpu, lanes)?;
        }
        out.rows = r;
        Ok(out)
    }

    /// The SwiGLU FFN with the rows' grouping by slot read on the device (`offsets`,
    /// `slots + 1` entries, e.g. a one-rank dispatch layout's `slot_offsets`): no host round
    /// trip, so it can be captured in a CUDA graph. Memory-bound warp-per-output projections
    /// (`moe_expert_gemv`), meant for decode-size batches. Hidden and intermediate sizes must
    /// be multiples of 8.
    pub fn ffn_device_offsets(
        &self,
        gpu: &Gpu,
        x: &DeviceMatrix<bf16>,
        offsets: &CudaSlice<u32>,
    ) -> Result<DeviceMatrix<bf16>> {
        let (h, i) = (self.hidden, self.inter);
        if x.cols != h
            || !h.is_multiple_of(8)
            || !i.is_multiple_of(8)
            || offsets.len() < self.slots + 1
        {
            return invalid(
                "ffn_device_offsets: x must be [R, H], H and I multiples of 8, slots + 1 offsets",
            );
        }
        let r = x.rows;
        let mut out = gpu.alloc_matrix::<bf16>(r, h)?;
        if r == 0 {
            return Ok(out);
        }
        let gu = gpu.alloc_matrix::<bf16>(r, 2 * i)?;
        let hm = gpu.alloc_matrix::<bf16>(r, i)?;
        let s = gpu.stream();
        gemv(
            gpu,
            ptr(&x.buf, s),
            ptr(&self.w1, s),
            offsets,
            self.slots,
            2 * i,
            h,
            ptr(&gu.buf, s),
        )?;
        gpu.silu_and_mul_raw(ptr(&gu.buf, s), r, i, ptr(&hm.buf, s))?;
        gemv(
            gpu,
            ptr(&hm.buf, s),
            ptr(&self.w2, s),
            offsets,
            self.slots,
            h,
            i,
            ptr(&out.buf, s),
        )?;
        out.rows = r;
        Ok(out)
    }

    /// Copies a staging buffer into `slot` on the main stream, after `ready` (an event
    /// recorded on the stream that filled the staging buffer).
    pub fn commit_staging(
        &mut self,
        gpu: &Gpu,
        staging: &ExpertStaging,
        slot: usize,
        ready: Option<&cudarc::driver::CudaEvent>,
    ) -> Result<()> {
        if slot >= self.slots {
            return invalid("commit: slot out of range");
        }
        let (a, b) = self.slot_elems();
        let s = gpu.stream();
        if let Some(ev) = ready {
            s.wait(ev).map_err(drv)?;
        }
        s.memcpy_dtod(
            &staging.w1,
            &mut self.w1.slice_mut(slot * a..(slot + 1) * a),
        )
        .map_err(drv)?;
        s.memcpy_dtod(
            &staging.w2,
            &mut self.w2.slice_mut(slot * b..(slot + 1) * b),
        )
        .map_err(drv)?;
        Ok(())
    }
}

/// Checks the rows-grouped-by-slot layout both grouped FFNs (bf16 and FP8) take: `offsets` has
/// `slots + 1` non-decreasing entries from 0 to `x.rows`, and `x` is `[rows, hidden]`.
pub(super) fn check_grouped_rows(
    what: &str,
    slots: usize,
    hidden: usize,
    x: &DeviceMatrix<bf16>,
    offsets: &[u32],
) -> Result<()> {
    if offsets.len() != slots + 1
        || offsets[0] != 0
        || offsets.windows(2).any(|w| w[0] > w[1])
        || offsets[slots] as usize != x.rows
        || x.cols != hidden
    {
        return invalid(format!(
            "{what}: offsets must be {} non-decreasing entries from 0 to {} rows, x [{}, {}] vs hidden {hidden}",
            slots + 1,
            x.rows,
            x.rows,
            x.cols
        ));
    }
    Ok(())
}
