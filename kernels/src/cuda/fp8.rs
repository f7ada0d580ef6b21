//! FP8 E4M3 experts with 128x128 block scales, kept as FP8 on the GPU (half the memory and
//! half the bytes a remap moves), and their SwiGLU FFN.
//!
//! Two ways to compute ([`Fp8Compute`]):
//! * `Native`: activations quantised per 1x128 block on the fly (`s = amax / 448`,
//!   `q = e4m3(v / s)`, as DeepSeek-V3 inference does; the SwiGLU between the projections is
//!   fused into the second quantisation), then one cuBLASLt FP8 x FP8 GEMM per expert and
//!   projection with the weights' 128x128 block scales (`BLK128x128_32F`) and the activations'
//!   1x128 scales (`VEC128_32F`), fp32 accumulation, bf16 out. Needs a Hopper GPU (cuBLASLt's
//!   block-scaled FP8 modes) and hidden and intermediate sizes that are multiples of 128.
//! * `Dequant`: each expert's weights dequantised to bf16 (`bf16(q * s)`, the CPU
//!   reference's dequantisation bit for bit) into a scratch buffer, then the bf16 GEMMs: the
//!   CPU backend's arithmetic, on any GPU and any shape.
//!
//! Layout per slot: `w1` = gate rows then up rows (`[2I, H]` codes), `w2` = `[H, I]` codes;
//! scales per projection `[ceil(rows / 128), kbp]` with `kbp = ceil(cols / 128)` rounded up to
//! a multiple of 4 (cuBLASLt wants 16-byte aligned scale rows), gate's block rows then up's.

use super::fp8_gemm::{Fp8Gemm, LtContext};
use super::{DeviceMatrix, Gpu, drv, ffn, ptr};
use crate::error::{Result, invalid};
use crate::fp8::Fp8Expert;
use cudarc::driver::{CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use half::bf16;
use std::sync::Arc;

/// How [`DeviceFp8Experts::ffn`] computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8Compute {
    /// FP8 x FP8 cuBLASLt GEMMs with activations quantised per 1x128 block.
    Native,
    /// bf16 GEMMs on weights dequantised per expert (the CPU reference's arithmetic).
    Dequant,
}

/// The activation scales' layout for cuBLASLt's `VEC128_32F` operand: row index fastest
/// (`[k/128][rows rounded up to 4]`, the default) or, with `MOE_FP8_ACT_SCALES=k-major`,
/// block index fastest. A diagnostic switch for new cuBLAS versions; the GPU tests say
/// which layout the installed cuBLASLt reads.
fn act_scales_k_major() -> bool {
    static K_MAJOR: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *K_MAJOR.get_or_init(|| std::env::var("MOE_FP8_ACT_SCALES").is_ok_and(|v| v == "k-major"))
}

/// Scale row length: block columns rounded up to a multiple of 4.
fn kbp(cols: usize) -> usize {
    cols.div_ceil(128).div_ceil(4) * 4
}

/// Per-slot element counts: (w1 codes, w1 scales, w2 codes, w2 scales).
fn slot_counts(h: usize, i: usize) -> (usize, usize, usize, usize) {
    (
        2 * i * h,
        2 * i.div_ceil(128) * kbp(h),
        h * i,
        h.div_ceil(128) * kbp(i),
    )
}

/// Pads a `[rb, cols/128]` scale grid to `[rb, kbp(cols)]` rows (padding 0).
fn pad_scales(s: &[f32], rows: usize, cols: usize, out: &mut Vec<f32>) {
    let (rb, kb, kp) = (rows.div_ceil(128), cols.div_ceil(128), kbp(cols));
    for r in 0..rb {
        out.extend_from_slice(&s[r * kb..(r + 1) * kb]);
        out.extend(std::iter::repeat_n(0.0, kp - kb));
    }
}

/// The FP8 weights of `slots` experts on one GPU (layout in the module docs).
#[derive(Debug)]
pub struct DeviceFp8Experts {
    /// Number of slots.
    pub slots: usize,
    /// Hidden size H.
    pub hidden: usize,
    /// Intermediate size I.
    pub inter: usize,
    /// `[slots * 2I * H]` codes (gate rows, then up rows).
    pub w1: CudaSlice<u8>,
    /// `[slots * 2 * ceil(I/128) * kbp(H)]` block scales.
    pub w1s: CudaSlice<f32>,
    /// `[slots * H * I]` codes.
    pub w2: CudaSlice<u8>,
    /// `[slots * ceil(H/128) * kbp(I)]` block scales.
    pub w2s: CudaSlice<f32>,
    lt: Option<LtContext>,
}

/// Staging buffers for one FP8 slot (weight movement target).
#[derive(Debug)]
pub struct Fp8Staging {
    /// w1 codes.
    pub w1: CudaSlice<u8>,
    /// w1 scales.
    pub w1s: CudaSlice<f32>,
    /// w2 codes.
    pub w2: CudaSlice<u8>,
    /// w2 scales.
    pub w2s: CudaSlice<f32>,
}

impl DeviceFp8Experts {
    /// Uploads experts (all of one shape); each is `[gate, up, down]`.
    pub fn upload(gpu: &Gpu, experts: &[Fp8Expert]) -> Result<Self> {
        let Some(first) = experts.first() else {
            return invalid("fp8 experts: need at least one slot");
        };
        let (h, i) = (first[0].cols, first[0].rows);
        if h == 0 || i == 0 {
            return invalid("fp8 experts: empty shape");
        }
        let (c1, s1, c2, s2) = slot_counts(h, i);
        let n = experts.len();
        let (mut w1, mut w1s) = (Vec::with_capacity(n * c1), Vec::with_capacity(n * s1));
        let (mut w2, mut w2s) = (Vec::with_capacity(n * c2), Vec::with_capacity(n * s2));
        for [g, u, d] in experts {
            g.check(i, h, "gate")?;
            u.check(i, h, "up")?;
            d.check(h, i, "down")?;
            w1.extend_from_slice(&g.codes);
            w1.extend_from_slice(&u.codes);
            pad_scales(&g.scales, i, h, &mut w1s);
            pad_scales(&u.scales, i, h, &mut w1s);
            w2.extend_from_slice(&d.codes);
            pad_scales(&d.scales, h, i, &mut w2s);
        }
        Ok(Self {
            slots: n,
            hidden: h,
            inter: i,
            w1: gpu.upload_slice(&w1)?,
            w1s: gpu.upload_slice(&w1s)?,
            w2: gpu.upload_slice(&w2)?,
            w2s: gpu.upload_slice(&w2s)?,
            lt: None,
        })
    }

    /// Synthetic experts generated on the device (benchmarks): codes of values uniform in
    /// the E4M3 range, block scales around `amp / 448` (so weights lie within +-`amp`).
    pub fn random(
        gpu: &Gpu,
        slots: usize,
        hidden: usize,
        inter: usize,
        seed: u32,
        amp: f32,
    ) -> Result<Self> {
        if slots == 0 || hidden == 0 || inter == 0 {
            return invalid("fp8 experts: empty shape");
        }
        let (c1, s1, c2, s2) = slot_counts(hidden, inter);
        let w1 = gpu.zeros::<u8>(slots * c1)?;
        let w2 = gpu.zeros::<u8>(slots * c2)?;
        for (buf, sd) in [(&w1, seed), (&w2, seed.wrapping_add(0x5bd1_e995))] {
            let n = buf.len() as u64;
            let cfg = LaunchConfig {
                grid_dim: (gpu.grid((n as usize).div_ceil(256)), 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = gpu.stream().launch_builder(&gpu.k.fp8_fill);
            b.arg(buf).arg(&n).arg(&sd);
            // SAFETY: matches the kernel signature; buf holds n bytes.
            unsafe { b.launch(cfg) }.map_err(drv)?;
        }
        let mut rng = crate::rng::SplitMix64::new(seed as u64);
        let mut sc = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| amp / 448.0 * rng.uniform(0.5, 1.0))
                .collect()
        };
        let (v1, v2) = (sc(slots * s1), sc(slots * s2));
        Ok(Self {
            slots,
            hidden,
            inter,
            w1,
            w1s: gpu.upload_slice(&v1)?,
            w2,
            w2s: gpu.upload_slice(&v2)?,
            lt: None,
        })
    }

    /// The same experts dequantised to bf16 on the device (`bf16(q * s)`, the CPU backend's
    /// weights): the bf16 path's baseline on identical weights.
    pub fn to_bf16(&self, gpu: &Gpu) -> Result<super::DeviceExperts> {
        let (h, i) = (self.hidden, self.inter);
        let w1 = gpu.uninit::<bf16>(self.slots * 2 * i * h)?;
        let w2 = gpu.uninit::<bf16>(self.slots * h * i)?;
        let s = gpu.stream();
        for e in 0..self.slots {
            self.dequant_slot_into(
                gpu,
                e,
                ptr(&w1, s) + (e * 2 * i * h * 2) as u64,
                ptr(&w2, s) + (e * h * i * 2) as u64,
            )?;
        }
        Ok(super::DeviceExperts {
            slots: self.slots,
            hidden: h,
            inter: i,
            w1,
            w2,
        })
    }

    /// Per-slot element counts (w1 codes, w1 scales, w2 codes, w2 scales).
    pub fn slot_counts(&self) -> (usize, usize, usize, usize) {
        slot_counts(self.hidden, self.inter)
    }

    /// Bytes of one slot (codes and scales).
    pub fn slot_bytes(&self) -> usize {
        let (a, b, c, d) = self.slot_counts();
        a + 4 * b + c + 4 * d
    }

    /// Whether [`Fp8Compute::Native`] can run these shapes on this GPU (Hopper; H and I
    /// multiples of 128).
    pub fn native_supported(&self, gpu: &Gpu) -> bool {
        gpu.arch() == "sm_90" && self.hidden.is_multiple_of(128) && self.inter.is_multiple_of(128)
    }

    /// The compute mode the layer uses by default: native where supported.
    pub fn default_compute(&self, gpu: &Gpu) -> Fp8Compute {
        if self.native_supported(gpu) {
            Fp8Compute::Native
        } else {
            Fp8Compute::Dequant
        }
    }

    /// Allocates a staging buffer for one slot (unset: a copy or a receive fills it).
    pub fn alloc_staging(&self, gpu: &Gpu) -> Result<Fp8Staging> {
        let (a, b, c, d) = self.slot_counts();
        // SAFETY: filled by a copy / NCCL receive before a commit reads it; plain bytes.
        unsafe {
            Ok(Fp8Staging {
                w1: gpu.stream().alloc::<u8>(a).map_err(drv)?,
                w1s: gpu.stream().alloc::<f32>(b).map_err(drv)?,
                w2: gpu.stream().alloc::<u8>(c).map_err(drv)?,
                w2s: gpu.stream().alloc::<f32>(d).map_err(drv)?,
            })
        }
    }

    /// Copies slot `src` into a staging buffer on `stream`.
    pub fn copy_slot_to_staging(
        &self,
        stream: &Arc<CudaStream>,
        src: usize,
        st: &mut Fp8Staging,
    ) -> Result<()> {
        if src >= self.slots {
            return invalid("fp8 copy: slot out of range");
        }
        let (a, b, c, d) = self.slot_counts();
        stream
            .memcpy_dtod(&self.w1.slice(src * a..(src + 1) * a), &mut st.w1)
            .map_err(drv)?;
        stream
            .memcpy_dtod(&self.w1s.slice(src * b..(src + 1) * b), &mut st.w1s)
            .map_err(drv)?;
        stream
            .memcpy_dtod(&self.w2.slice(src * c..(src + 1) * c), &mut st.w2)
            .map_err(drv)?;
        stream
            .memcpy_dtod(&self.w2s.slice(src * d..(src + 1) * d), &mut st.w2s)
            .map_err(drv)
    }

    /// Copies a staging buffer into `slot` on the main stream, after `ready`.
    pub fn commit_staging(
        &mut self,
        gpu: &Gpu,
        st: &Fp8Staging,
        slot: usize,
        ready: Option<&cudarc::driver::CudaEvent>,
    ) -> Result<()> {
        if slot >= self.slots {
            return invalid("fp8 commit: slot out of range");
        }
        let (a, b, c, d) = self.slot_counts();
        let s = gpu.stream();
        if let Some(ev) = ready {
            s.wait(ev).map_err(drv)?;
        }
        s.memcpy_dtod(&st.w1, &mut self.w1.slice_mut(slot * a..(slot + 1) * a))
            .map_err(drv)?;
        s.memcpy_dtod(&st.w1s, &mut self.w1s.slice_mut(slot * b..(slot + 1) * b))
            .map_err(drv)?;
        s.memcpy_dtod(&st.w2, &mut self.w2.slice_mut(slot * c..(slot + 1) * c))
            .map_err(drv)?;
        s.memcpy_dtod(&st.w2s, &mut self.w2s.slice_mut(slot * d..(slot + 1) * d))
            .map_err(drv)
    }

    /// Dequantises one projection block grid into `out` (bf16, `rows x cols`).
    #[allow(clippy::too_many_arguments)]
    fn dequant(
        gpu: &Gpu,
        codes: u64,
        scales: u64,
        rows: usize,
        cols: usize,
        out: u64,
    ) -> Result<()> {
        let (r, c, k) = (rows as i32, cols as i32, kbp(cols) as i32);
        let cfg = LaunchConfig {
            grid_dim: (gpu.grid((rows * cols).div_ceil(256)), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = gpu.stream().launch_builder(&gpu.k.fp8_dequant);
        b.arg(&codes).arg(&scales).arg(&r).arg(&c).arg(&k).arg(&out);
        // SAFETY: matches the kernel signature; pointers cover rows x cols codes and the
        // padded scale grid.
        unsafe { b.launch(cfg) }.map_err(drv)?;
        Ok(())
    }

    /// Slot `slot`'s weights dequantised to bf16 (`w1 [2I, H]`, `w2 [H, I]`), as the CPU
    /// reference computes them (synchronises).
    pub fn dequantize_slot(&self, gpu: &Gpu, slot: usize) -> Result<(Vec<bf16>, Vec<bf16>)> {
        if slot >= self.slots {
            return invalid("fp8 dequantize: slot out of range");
        }
        let (h, i) = (self.hidden, self.inter);
        let w1 = gpu.alloc_matrix::<bf16>(2 * i, h)?;
        let w2 = gpu.alloc_matrix::<bf16>(h, i)?;
        self.dequant_slot_into(
            gpu,
            slot,
            ptr(&w1.buf, gpu.stream()),
            ptr(&w2.buf, gpu.stream()),
        )?;
        Ok((
            gpu.download_slice(&w1.buf.slice(..2 * i * h))?,
            gpu.download_slice(&w2.buf.slice(..h * i))?,
        ))
    }

    fn dequant_slot_into(&self, gpu: &Gpu, e: usize, w1: u64, w2: u64) -> Result<()> {
        let (h, i) = (self.hidden, self.inter);
        let (c1, s1, c2, s2) = self.slot_counts();
        let s = gpu.stream();
        let (pw1, pw1s, pw2, pw2s) = (
            ptr(&self.w1, s),
            ptr(&self.w1s, s),
            ptr(&self.w2, s),
            ptr(&self.w2s, s),
        );
        let half_s = i.div_ceil(128) * kbp(h);
        let c1e = pw1 + (e * c1) as u64;
        let s1e = pw1s + 4 * (e * s1) as u64;
        Self::dequant(gpu, c1e, s1e, i, h, w1)?;
        Self::dequant(
            gpu,
            c1e + (i * h) as u64,
            s1e + 4 * half_s as u64,
            i,
            h,
            w1 + 2 * (i * h) as u64,
        )?;
        Self::dequant(
            gpu,
            pw2 + (e * c2) as u64,
            pw2s + 4 * (e * s2) as u64,
            h,
            i,
            w2,
        )
    }

    /// Quantises rows grouped by `offsets` (device, `groups + 1`) per 1x128 block into the
    /// padded row layout (`soff`: each group's first padded row); mode 0 reads `src [R, K]`,
    /// mode 1 computes the SwiGLU of the padded `src [Rp, 2K]` first. Returns codes `[Rp, K]`
    /// and scales.
    #[allow(clippy::too_many_arguments)]
    fn quantize(
        gpu: &Gpu,
        src: u64,
        mode: i32,
        rows: usize,
        k: usize,
        offsets: &CudaSlice<u32>,
        soff_host: &[u32],
        soff: &CudaSlice<u32>,
    ) -> Result<(CudaSlice<u8>, CudaSlice<f32>)> {
        let groups = soff_host.len() - 1;
        let kb = k.div_ceil(128);
        // Codes of padding rows stay unset: a GEMM output row depends on its own input row
        // only, and padding rows' outputs are dropped.
        let q = gpu.uninit::<u8>(soff_host[groups] as usize * k)?;
        // Padding rows of the scale grid are never read by a GEMM row, but keep them finite.
        let s = gpu.zeros::<f32>(soff_host[groups] as usize * kb)?;
        let blocks = rows * kb;
        let cfg = LaunchConfig {
            grid_dim: (gpu.grid(blocks.div_ceil(8)), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (ri, ki, gi) = (rows as i32, k as i32, groups as i32);
        let kmajor = act_scales_k_major() as i32;
        let mut b = gpu.stream().launch_builder(&gpu.k.fp8_quant_rows);
        b.arg(&src)
            .arg(&mode)
            .arg(&ri)
            .arg(&ki)
            .arg(offsets)
            .arg(soff)
            .arg(&gi)
            .arg(&kmajor)
            .arg(&q)
            .arg(&s);
        // SAFETY: matches the kernel signature; src holds rows x K (mode 0) or rows x 2K
        // (mode 1) bf16 values; q and s are sized above.
        unsafe { b.launch(cfg) }.map_err(drv)?;
        Ok((q, s))
    }

    /// Quantises `x` per 1x128 block with the layout the native FFN uses (one group of all
    /// rows): codes `[R, K]` and scales `[ceil(K/128)][R rounded up to 4]` (synchronises). For
    /// tests and benchmarks.
    pub fn quantize_activations(gpu: &Gpu, x: &DeviceMatrix<bf16>) -> Result<(Vec<u8>, Vec<f32>)> {
        let r = x.rows as u32;
        let offs = gpu.upload_slice(&[0, r])?;
        let soff_h = [0, r.div_ceil(4) * 4];
        let soff = gpu.upload_slice(&soff_h)?;
        let (q, s) = Self::quantize(
            gpu,
            ptr(&x.buf, gpu.stream()),
            0,
            x.rows,
            x.cols,
            &offs,
            &soff_h,
            &soff,
        )?;
        Ok((
            gpu.download_slice(&q.slice(..x.rows * x.cols))?,
            gpu.download_slice(&s)?,
        ))
    }

    /// The SwiGLU FFN with the rows' grouping by slot read on the device (`offsets`, `slots +
    /// 1` entries), no host round trip (capturable in a CUDA graph): projections that decode
    /// each weight once (the hardware E4M3 conversion from sm_89) and multiply it with up to 8
    /// rows on the tensor cores, the 128x128 block scale applied to each block's fp32 partial
    /// sum (`moe_expert_gemv_fp8`); half the weight bytes of bf16. For decode-size batches;
    /// hidden and intermediate sizes multiples of 128.
    pub fn ffn_device_offsets(
        &self,
        gpu: &Gpu,
        x: &DeviceMatrix<bf16>,
        offsets: &CudaSlice<u32>,
    ) -> Result<DeviceMatrix<bf16>> {
        let (h, i) = (self.hidden, self.inter);
        if x.cols != h
            || !h.is_multiple_of(128)
            || !i.is_multiple_of(128)
            || offsets.len() < self.slots + 1
        {
            return invalid(
                "fp8 ffn_device_offsets: x must be [R, H], H and I multiples of 128, slots + 1 offsets",
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
        let launch = |x: u64, w: u64, sc: u64, m: usize, k: usize, c: u64| -> Result<()> {
            // One warp per 16 outputs (m % 16 == 0 as m % 128 == 0), four warps a block.
            let warps = 4usize;
            let cfg = LaunchConfig {
                grid_dim: ((m / 16).div_ceil(warps) as u32, self.slots as u32, 1),
                block_dim: (32 * warps as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let (mi, ki, kp) = (m as i32, k as i32, kbp(k) as i32);
            let mut b = gpu.stream().launch_builder(&gpu.k.expert_gemv_fp8);
            b.arg(&x)
                .arg(&w)
                .arg(&sc)
                .arg(&kp)
                .arg(offsets)
                .arg(&mi)
                .arg(&ki)
                .arg(&c);
            // SAFETY: matches the kernel signature; x holds the offsets' rows of k bf16, w
            // slots x m x k codes with their padded scale grids, c rows x m; k % 128 == 0 and
            // m % 16 == 0 (checked above).
            unsafe { b.launch(cfg) }.map_err(drv)?;
            Ok(())
        };
        launch(
            ptr(&x.buf, s),
            ptr(&self.w1, s),
            ptr(&self.w1s, s),
            2 * i,
            h,
            ptr(&gu.buf, s),
        )?;
        gpu.silu_and_mul_raw(ptr(&gu.buf, s), r, i, ptr(&hm.buf, s))?;
        launch(
            ptr(&hm.buf, s),
            ptr(&self.w2, s),
            ptr(&self.w2s, s),
            h,
            i,
            ptr(&out.buf, s),
        )?;
        out.rows = r;
        Ok(out)
    }

    /// SwiGLU FFN of the local experts over rows grouped by expert (`offsets`, host,
    /// `slots + 1` entries), as [`super::DeviceExperts::ffn`].
    pub fn ffn(
        &mut self,
        gpu: &Gpu,
        x: &DeviceMatrix<bf16>,
        offsets: &[u32],
        compute: Fp8Compute,
    ) -> Result<DeviceMatrix<bf16>> {
        let (h, i) = (self.hidden, self.inter);
        ffn::check_grouped_rows("fp8 ffn", self.slots, h, x, offsets)?;
        let r = x.rows;
        let mut out = gpu.alloc_matrix::<bf16>(r, h)?;
        if r == 0 {
            return Ok(out);
        }
        let s = gpu.stream();
        let (px, py) = (ptr(&x.buf, s), ptr(&out.buf, s));
        let groups: Vec<(usize, usize, usize)> = (0..self.slots)
            .filter_map(|e| {
                let (a, b) = (offsets[e] as usize, offsets[e + 1] as usize);
                (b > a).then_some((e, a, b - a))
            })
            .collect();
        match compute {
            Fp8Compute::Dequant => {
                let gu = gpu.alloc_matrix::<bf16>(r, 2 * i)?;
                let pgu = ptr(&gu.buf, s);
                let w1 = gpu.alloc_matrix::<bf16>(2 * i, h)?;
                let w2 = gpu.alloc_matrix::<bf16>(h, i)?;
                let hm = gpu.alloc_matrix::<bf16>(r, i)?;
                let (pw1, pw2, ph) = (ptr(&w1.buf, s), ptr(&w2.buf, s), ptr(&hm.buf, s));
                let bf = cudarc::cublas::sys::cudaDataType_t::CUDA_R_16BF;
                let handle = *gpu.blas.handle();
                for &(e, a, n) in &groups {
                    self.dequant_slot_into(gpu, e, pw1, pw2)?;
                    ffn::gemm_nt(
                        gpu,
                        handle,
                        n,
                        2 * i,
                        h,
                        px + (a * h * 2) as u64,
                        pw1,
                        pgu + (a * 2 * i * 2) as u64,
                        bf,
                    )?;
                    gpu.silu_and_mul_raw(
                        pgu + (a * 2 * i * 2) as u64,
                        n,
                        i,
                        ph + (a * i * 2) as u64,
                    )?;
                    ffn::gemm_nt(
                        gpu,
                        handle,
                        n,
                        h,
                        i,
                        ph + (a * i * 2) as u64,
                        pw2,
                        py + (a * h * 2) as u64,
                        bf,
                    )?;
                }
            }
            Fp8Compute::Native => {
                if !self.native_supported(gpu) {
                    return invalid(format!(
                        "fp8 ffn: native FP8 GEMMs need a Hopper GPU (this is {}) and hidden ({h}) \
                         and intermediate ({i}) sizes that are multiples of 128; use Fp8Compute::Dequant",
                        gpu.arch()
                    ));
                }
                if self.lt.is_none() {
                    self.lt = Some(LtContext::new(gpu, gpu.lanes.len())?);
                }
                let Some(lt) = self.lt.as_ref() else {
                    return invalid("fp8 ffn: no cuBLASLt context");
                };
                let mut soff_h = vec![0u32; self.slots + 1];
                for e in 0..self.slots {
                    soff_h[e + 1] = soff_h[e] + (offsets[e + 1] - offsets[e]).div_ceil(4) * 4;
                }
                let rp = soff_h[self.slots] as usize;
                let offs_d = gpu.upload_slice(offsets)?;
                let soff_d = gpu.upload_slice(&soff_h)?;
                // Padded rows (each expert's rows start at a multiple of 4), compacted at the end.
                let gu = gpu.alloc_matrix::<bf16>(rp, 2 * i)?;
                let yp = gpu.alloc_matrix::<bf16>(rp, h)?;
                let (pgu, pyp) = (ptr(&gu.buf, s), ptr(&yp.buf, s));
                let mut unpad = Vec::with_capacity(r);
                for e in 0..self.slots {
                    unpad.extend(soff_h[e]..soff_h[e] + offsets[e + 1] - offsets[e]);
                }
                let unpad = gpu.upload_slice(&unpad)?;
                let (xq, xs) = Self::quantize(gpu, px, 0, r, h, &offs_d, &soff_h, &soff_d)?;
                let (c1, s1, c2, s2) = self.slot_counts();
                let (pw1, pw1s, pw2, pw2s) = (
                    ptr(&self.w1, s),
                    ptr(&self.w1s, s),
                    ptr(&self.w2, s),
                    ptr(&self.w2s, s),
                );
                let (pxq, pxs) = (ptr(&xq, s), ptr(&xs, s));
                let lanes = &gpu.lanes[..];
                ffn::fork(gpu, lanes)?;
                for (j, &(e, _, n)) in groups.iter().enumerate() {
                    let g = Fp8Gemm {
                        m: 2 * i,
                        n: n.div_ceil(4) * 4,
                        k: h,
                        ldd: 2 * i,
                        w: pw1 + (e * c1) as u64,
                        ws: pw1s + 4 * (e * s1) as u64,
                        x: pxq + (soff_h[e] as usize * h) as u64,
                        xs: pxs + 4 * (soff_h[e] as usize * h.div_ceil(128)) as u64,
                        d: pgu + (soff_h[e] as usize * 2 * i * 2) as u64,
                    };
                    let lane = j % lanes.len().max(1);
                    let st = lanes.get(lane).map(|l| &l.0).unwrap_or(s);
                    lt.gemm(&g, st, lane)?;
                }
                ffn::join(gpu, lanes)?;
                let (hq, hs) = Self::quantize(gpu, pgu, 1, r, i, &offs_d, &soff_h, &soff_d)?;
                let (phq, phs) = (ptr(&hq, s), ptr(&hs, s));
                ffn::fork(gpu, lanes)?;
                for (j, &(e, _, n)) in groups.iter().enumerate() {
                    let g = Fp8Gemm {
                        m: h,
                        n: n.div_ceil(4) * 4,
                        k: i,
                        ldd: h,
                        w: pw2 + (e * c2) as u64,
                        ws: pw2s + 4 * (e * s2) as u64,
                        x: phq + (soff_h[e] as usize * i) as u64,
                        xs: phs + 4 * (soff_h[e] as usize * i.div_ceil(128)) as u64,
                        d: pyp + (soff_h[e] as usize * h * 2) as u64,
                    };
                    let lane = j % lanes.len().max(1);
                    let st = lanes.get(lane).map(|l| &l.0).unwrap_or(s);
                    lt.gemm(&g, st, lane)?;
                }
                ffn::join(gpu, lanes)?;
                gpu.gather_rows_into(&yp, &unpad.slice(..r), 1, &mut out)?;
                // The quantised buffers are freed stream-ordered on the main stream, which
                // now waits for the lanes.
                drop((xq, xs, hq, hs, gu, yp));
            }
        }
        out.rows = r;
        Ok(out)
    }
}
