//! The CUDA backend: each layer runs through the kernels crate's `EpLayer` (router, gating,
//! replica choice with device-side load counters, NCCL dispatch/combine all-to-all, expert
//! FFN) on this rank's GPU; the residual add is a cuBLAS `AxpyEx` (bf16 in/out, fp32 compute,
//! the same rounding as the CPU backend).
//!
//! Remap weights are staged through the host: a sending rank copies the slots it sends to the
//! host (device-to-host, counted as stall), the bytes travel over the comm backend's TCP links
//! on the remap channel while forward passes continue, and the receiving rank uploads them into
//! a staging buffer and commits it into the layer's slot on the main stream at the agreed step
//! boundary (counted as stall). The kernels crate's NCCL `send_slot`/`recv_slot` (side stream,
//! device to device) is not used yet.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Result, anyhow, bail};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{DevicePtr, DevicePtrMut};
use half::bf16;
use moe_api::PlacementDocument;
use moe_kernels::cuda::{DeviceExperts, DeviceMatrix, EpComm, EpLayer, ExpertStaging, Gpu, NcclId};
use moe_kernels::{Bf16Matrix, EpTopology, Matrix};

use crate::comm::Comm;
use crate::config::ModelShape;
use crate::exec::{Exec, StagedSlot, gating};
use crate::placement::LayerMap;
use crate::traffic::Batch;
use crate::weights::{ExpertWeights, WeightStore};

/// Why CUDA cannot be used here, or `None` when a GPU, the CUDA libraries and NCCL are there.
pub fn unavailable() -> Option<String> {
    match moe_kernels::cuda::available() {
        Err(e) => Some(e.to_string()),
        Ok(_) if !moe_kernels::cuda::nccl_available() => {
            Some("no NCCL library (libnccl) found".into())
        }
        Ok(_) => None,
    }
}

/// A fresh NCCL unique id as bytes (rank 0 hands it out at rendezvous).
pub fn nccl_unique_id() -> Result<Vec<u8>> {
    let id = NcclId::new().map_err(|e| anyhow!("creating the NCCL unique id: {e}"))?;
    Ok(id.0.iter().map(|&c| c as u8).collect())
}

pub struct CudaExec {
    shape: ModelShape,
    rank: usize,
    gpu: Gpu,
    comm: Option<EpComm>,
    blas: CudaBlas,
    routers: Vec<Bf16Matrix>,
    layers: Vec<Option<EpLayer>>,
}

// SAFETY: the executor is owned by the engine thread; it is moved into it once and never
// shared. `EpComm` is `Send`; the CUDA context, streams and cuBLAS handles are `Send`.
unsafe impl Send for CudaExec {}

impl CudaExec {
    /// Opens GPU `rank % visible GPUs`, joins the NCCL group with `unique_id`, uploads the
    /// routers and this rank's slots.
    pub fn load(
        store: &WeightStore,
        placement: &PlacementDocument,
        shape: &ModelShape,
        rank: usize,
        unique_id: &[u8],
    ) -> Result<CudaExec> {
        let n = moe_kernels::cuda::available()?;
        let gpu = Gpu::new(rank % n)?;
        tracing::info!(gpu = %gpu.name(), ordinal = rank % n, arch = gpu.arch(), "CUDA backend");
        let comm = if shape.world_size > 1 {
            if unique_id.len() != 128 {
                bail!(
                    "the NCCL unique id from rank 0 has {} bytes, expected 128",
                    unique_id.len()
                );
            }
            let mut id = [0 as std::ffi::c_char; 128];
            for (d, s) in id.iter_mut().zip(unique_id) {
                *d = *s as std::ffi::c_char;
            }
            Some(EpComm::from_rank(
                gpu.stream().clone(),
                rank,
                shape.world_size,
                &NcclId(id),
            )?)
        } else {
            None
        };
        let blas = CudaBlas::new(gpu.stream().clone()).map_err(|e| anyhow!("cuBLAS: {e:?}"))?;
        let spr = shape.slots_per_rank();
        let mut routers = Vec::with_capacity(shape.num_layers);
        let mut layers = Vec::with_capacity(shape.num_layers);
        for l in 0..shape.num_layers {
            let row = &placement.phy2log[l];
            let mine = &row[rank * spr..(rank + 1) * spr];
            let host: Vec<ExpertWeights> = store
                .load_slots(l, mine)?
                .iter()
                .map(|w| (**w).clone())
                .collect();
            let experts = DeviceExperts::upload(&gpu, &host)?;
            let router = store.router(l)?;
            let map = LayerMap::new(row.clone(), shape.num_experts).map_err(|e| anyhow!(e))?;
            layers.push(Some(EpLayer::new(
                &gpu,
                &router,
                gating(shape),
                None,
                &map.replicas,
                EpTopology::new(shape.world_size, spr)?,
                rank,
                experts,
            )?));
            routers.push(router);
        }
        gpu.synchronize()?;
        Ok(CudaExec {
            shape: *shape,
            rank,
            gpu,
            comm,
            blas,
            routers,
            layers,
        })
    }

    /// `x += y` in place (bf16 storage, fp32 compute), on the main stream.
    fn add_residual(&self, x: &mut DeviceMatrix<bf16>, y: &DeviceMatrix<bf16>) -> Result<()> {
        use cudarc::cublas::sys;
        let n = (x.rows * x.cols) as i32;
        let stream = self.gpu.stream();
        let alpha = 1.0f32;
        let (yp, _ry) = y.buf.device_ptr(stream);
        let (xp, _rx) = x.buf.device_ptr_mut(stream);
        // SAFETY: both buffers hold at least n bf16 elements on this GPU; the handle is bound to
        // the same stream; alpha is a host pointer (the default pointer mode).
        let st = unsafe {
            sys::cublasAxpyEx(
                *self.blas.handle(),
                n,
                &alpha as *const f32 as *const std::ffi::c_void,
                sys::cudaDataType::CUDA_R_32F,
                yp as *const std::ffi::c_void,
                sys::cudaDataType::CUDA_R_16BF,
                1,
                xp as *mut std::ffi::c_void,
                sys::cudaDataType::CUDA_R_16BF,
                1,
                sys::cudaDataType::CUDA_R_32F,
            )
        };
        st.result().map_err(|e| anyhow!("cublasAxpyEx: {e:?}"))
    }
}

impl Exec for CudaExec {
    fn backend(&self) -> &'static str {
        "cuda"
    }

    fn forward(
        &mut self,
        _comm: &Comm,
        batch: &Batch,
        step: u64,
    ) -> Result<(Vec<bf16>, Vec<Vec<u32>>)> {
        if batch.routing.is_some() {
            bail!("trace replay (--traffic-trace) is only supported by the cpu backend");
        }
        let h = self.shape.hidden;
        let t = batch.x.len() / h;
        let g = self.shape.world_size as u64;
        let token_base = ((step * g + self.rank as u64) * t as u64) as u32;
        let mut x = self.gpu.upload(&Matrix::from_vec(t, h, batch.x.clone())?)?;
        let mut counts = Vec::with_capacity(self.shape.num_layers);
        for l in 0..self.shape.num_layers {
            let y = {
                let gpu = &self.gpu;
                let comm = self.comm.as_ref();
                let layer = self
                    .layers
                    .get_mut(l)
                    .and_then(Option::as_mut)
                    .ok_or_else(|| anyhow!("no layer {l}"))?;
                layer.forward(gpu, comm, &x, token_base)?
            };
            self.add_residual(&mut x, &y)?;
        }
        for l in 0..self.shape.num_layers {
            let gpu = &self.gpu;
            let layer = self
                .layers
                .get_mut(l)
                .and_then(Option::as_mut)
                .ok_or_else(|| anyhow!("no layer {l}"))?;
            counts.push(layer.load(gpu)?);
            layer.reset_load(gpu)?;
        }
        let out = x.download(&self.gpu)?;
        Ok((out.into_vec(), counts))
    }

    fn host_slots(
        &mut self,
        layer: usize,
        local: &[usize],
    ) -> Result<HashMap<usize, Arc<ExpertWeights>>> {
        let gpu = &self.gpu;
        let l = self
            .layers
            .get(layer)
            .and_then(Option::as_ref)
            .ok_or_else(|| anyhow!("no layer {layer}"))?;
        local
            .iter()
            .map(|&s| Ok((s, Arc::new(l.experts.download_slot(gpu, s)?))))
            .collect()
    }

    fn install(&mut self, layer: usize, map: &LayerMap, slots: Vec<StagedSlot>) -> Result<()> {
        // Copies of local sources first (a slot may be both a source and a destination).
        let mut uploads: Vec<(usize, Arc<ExpertWeights>)> = Vec::new();
        {
            let gpu = &self.gpu;
            let l = self
                .layers
                .get(layer)
                .and_then(Option::as_ref)
                .ok_or_else(|| anyhow!("no layer {layer}"))?;
            for (i, s) in slots.iter().enumerate() {
                match s {
                    StagedSlot::Keep => {}
                    StagedSlot::Local(j) => {
                        uploads.push((i, Arc::new(l.experts.download_slot(gpu, *j)?)))
                    }
                    StagedSlot::Received(w) => uploads.push((i, w.clone())),
                }
            }
        }
        let old = self
            .layers
            .get_mut(layer)
            .and_then(Option::take)
            .ok_or_else(|| anyhow!("no layer {layer}"))?;
        let mut experts = old.experts;
        for (i, w) in &uploads {
            let staging = ExpertStaging {
                w1: self.gpu.upload_slice(w.w1.as_slice())?,
                w2: self.gpu.upload_slice(w.w2.as_slice())?,
            };
            experts.commit_staging(&self.gpu, &staging, *i, None)?;
            self.gpu.synchronize()?;
        }
        let rebuilt = EpLayer::new(
            &self.gpu,
            &self.routers[layer],
            gating(&self.shape),
            None,
            &map.replicas,
            EpTopology::new(self.shape.world_size, self.shape.slots_per_rank())?,
            self.rank,
            experts,
        )?;
        self.gpu.synchronize()?;
        self.layers[layer] = Some(rebuilt);
        Ok(())
    }
}
