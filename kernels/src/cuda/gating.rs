//! The gating half of a layer on the GPU: router logits, top-k gating (grouped, softmax or
//! sigmoid scoring), logical-to-physical slot mapping and the dispatch layout of the routed
//! rows. Semantics as [`crate::cpu`].

use super::*;

impl Gpu {
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
}
