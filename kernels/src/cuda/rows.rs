//! Row movement and the activation on the GPU: gathers, the permutation of routed rows into
//! expert order and back with the weighted combine (shared experts included), the shared-expert
//! gate, SiLU-and-multiply, and a copy kernel for bandwidth probes. Semantics as [`crate::cpu`].

use super::*;

impl Gpu {
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
