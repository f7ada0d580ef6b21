//! The CUDA backend: each layer runs through the kernels crate's `EpLayer` (router, gating,
//! replica choice with device-side load counters, NCCL dispatch/combine all-to-all, expert
//! FFN) on this rank's GPU; the residual add is a cuBLAS `AxpyEx` (bf16 in/out, fp32 compute,
//! the same rounding as the CPU backend).
//!
//! Remap weights move device to device. Each rank has a second NCCL communicator, bound to the
//! GPU's side stream and used for nothing but remap transfers, so weight traffic never queues
//! behind (or interleaves with) the forward pass's all-to-all on the main communicator. At the
//! boundary where the group starts a layer, every rank enqueues on the side stream: copies of
//! its local sources into staging buffers, then one NCCL group with its sends (straight from
//! the live slots, which are only read) and its receives (into staging buffers). Forward passes
//! keep running on the main stream meanwhile. An event after the group tells the engine, at
//! later boundaries, that this rank's part has finished; once every rank has said so, the
//! commit copies the staging buffers into their slots and uploads the new replica map, both
//! on the main stream, so the next forward pass sees the new weights and map together.
//!
//! Two communicators in flight at once need care (NCCL kernels wait for their peers). Every
//! rank launches the transfer group at the same point of its sequence of NCCL launches
//! (between the same two forward passes), so no rank holds back a transfer that a peer's
//! already-running transfer waits for. The streams do not order the transfer against the next
//! forward pass's all-to-all, so both NCCL kernels must also be able to run side by side: each
//! takes a few dozen SMs (of 132 on an H200). A GPU shared under MPS with a small SM share
//! would need the transfer moved to a step boundary instead (stop-the-world does that).

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Result, anyhow, bail};
use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaStream};
use cudarc::driver::{DevicePtr, DevicePtrMut};
use half::bf16;
use moe_api::PlacementDocument;
use moe_kernels::cuda::{
    DeviceExperts, DeviceMatrix, EpComm, EpLayer, ExpertStaging, Gpu, NcclId, grouped,
};
use moe_kernels::{Bf16Matrix, EpTopology};

use crate::comm::Comm;
use crate::config::ModelShape;
use crate::exec::Exec;
use crate::model::gating_config;
use crate::placement::{LayerMap, LayerPlan, SlotSource};
use crate::staging::StageStats;
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

/// The bytes rank 0 hands out at rendezvous: two fresh NCCL unique ids, one for the forward
/// pass's communicator and one for the remap transfers' (128 bytes each).
pub fn nccl_unique_id() -> Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(2 * 128);
    for _ in 0..2 {
        let id = NcclId::new().map_err(|e| anyhow!("creating an NCCL unique id: {e}"))?;
        bytes.extend(id.0.iter().map(|&c| c as u8));
    }
    Ok(bytes)
}

fn nccl_id(bytes: &[u8]) -> NcclId {
    let mut id = [0 as std::ffi::c_char; 128];
    for (d, s) in id.iter_mut().zip(bytes) {
        *d = *s as std::ffi::c_char;
    }
    NcclId(id)
}

/// Staging buffers (allocated on the main stream, filled on the side stream). However they are
/// dropped (after a commit, on an error part-way through enqueueing, when the engine stops
/// mid-remap), the main stream first waits for the side stream's work, so the memory is freed
/// (stream-ordered, on the main stream) only after every copy and receive into it.
struct StagingBuffers {
    main: Arc<CudaStream>,
    side: Arc<CudaStream>,
    bufs: Vec<ExpertStaging>,
}

impl Drop for StagingBuffers {
    fn drop(&mut self) {
        if self.bufs.is_empty() {
            return;
        }
        match self.side.record_event(None) {
            Ok(ev) => {
                if let Err(e) = self.main.wait(&ev) {
                    tracing::error!("ordering the staging buffers' release: {e:?}");
                }
            }
            Err(e) => tracing::error!("ordering the staging buffers' release: {e:?}"),
        }
    }
}

/// One layer's incoming weights, on their way on the side stream.
struct DeviceStaging {
    layer: usize,
    /// One buffer per expert received and per local copy.
    buffers: StagingBuffers,
    /// `(local slot, buffer)`: what the commit copies where.
    installs: Vec<(usize, usize)>,
    /// Recorded on the side stream around the transfers (timing enabled).
    start: CudaEvent,
    done: CudaEvent,
    finished: bool,
    bytes: u64,
}

pub struct CudaExec {
    // Fields drop in this order: a staging in flight first (its buffers' release is ordered
    // after the side stream's work), then the communicators, then the GPU.
    staging: Option<DeviceStaging>,
    shape: ModelShape,
    rank: usize,
    layers: Vec<EpLayer>,
    comm: Option<EpComm>,
    /// Remap transfers only, on the side stream.
    transfer_comm: Option<EpComm>,
    blas: CudaBlas,
    gpu: Gpu,
}

/// What the CUDA backend cannot compute yet, refused at load rather than computed wrongly:
/// shared experts, FP8 weights held natively, DeepSeek-V2's max group score (and, per layer,
/// routers that bf16 cannot hold exactly).
fn unsupported_on_gpu(store: &WeightStore) -> Result<()> {
    let m = store.model();
    let why = if m.family == moe_model::Family::GptOss {
        Some(
            "gpt-oss (router bias, softmax over the top-k, expert biases, clamped SwiGLU)"
                .to_string(),
        )
    } else if m.shared.is_some() {
        Some(format!(
            "{} shared experts ({} has {})",
            m.family, m.architecture, m.shared_experts
        ))
    } else if m.weight_dtype == moe_model::WeightDtype::Fp8E4m3 {
        Some("FP8 E4M3 block-scaled weights".to_string())
    } else if m.expert_groups > 1 && m.group_score == moe_model::GroupScore::Max {
        Some("DeepSeek-V2 group-limited routing (group score = max)".to_string())
    } else {
        None
    };
    match why {
        Some(w) => {
            bail!("the cuda backend does not compute {w} yet; run this model with --backend cpu")
        }
        None => Ok(()),
    }
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
        unsupported_on_gpu(store)?;
        let n = moe_kernels::cuda::available()?;
        let gpu = Gpu::new(rank % n)?;
        tracing::info!(gpu = %gpu.name(), ordinal = rank % n, arch = gpu.arch(), "CUDA backend");
        let (comm, transfer_comm) = if shape.world_size > 1 {
            if unique_id.len() != 2 * 128 {
                bail!(
                    "the NCCL unique ids from rank 0 have {} bytes, expected 256 \
                     (is every rank running the same moe-worker version?)",
                    unique_id.len()
                );
            }
            let w = shape.world_size;
            let main = EpComm::from_rank(gpu.stream().clone(), rank, w, &nccl_id(unique_id))?;
            let side = gpu.side_stream().clone();
            let transfer = EpComm::from_rank(side, rank, w, &nccl_id(&unique_id[128..]))?;
            // NCCL connects peers on their first exchange; do it now, so the first remap does
            // not pay for it on the engine thread.
            let ones = gpu.upload_slice(&vec![1u32; w])?;
            let mut got = gpu.zeros::<u32>(w)?;
            gpu.synchronize()?;
            transfer.all_to_all_u32(&ones, &mut got, 1)?;
            gpu.side_stream()
                .synchronize()
                .map_err(|e| anyhow!("connecting the remap communicator: {e:?}"))?;
            (Some(main), Some(transfer))
        } else {
            (None, None)
        };
        let blas = CudaBlas::new(gpu.stream().clone()).map_err(|e| anyhow!("cuBLAS: {e:?}"))?;
        let spr = shape.slots_per_rank();
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
            let router_f32 = store.router_f32(l)?;
            if router_f32
                .as_slice()
                .iter()
                .any(|v| bf16::from_f32(*v).to_f32() != *v)
            {
                bail!(
                    "MoE layer {l}: the router has fp32 weights that bf16 cannot hold; the cuda \
                     backend computes router logits from bf16 weights; run this model with \
                     --backend cpu"
                );
            }
            let router = store.router(l)?;
            let bias = store.correction_bias(l)?;
            let map = LayerMap::new(row.clone(), shape.num_experts).map_err(|e| anyhow!(e))?;
            layers.push(EpLayer::new(
                &gpu,
                &router,
                gating_config(store.model()),
                bias.as_deref(),
                &map.replicas,
                EpTopology::new(shape.world_size, spr)?,
                rank,
                experts,
            )?);
        }
        gpu.synchronize()?;
        Ok(CudaExec {
            shape: *shape,
            rank,
            gpu,
            comm,
            transfer_comm,
            blas,
            layers,
            staging: None,
        })
    }
}

/// `x += y` in place (bf16 storage, fp32 compute), on `gpu`'s main stream (`blas` is bound to
/// it).
fn add_residual(
    gpu: &Gpu,
    blas: &CudaBlas,
    x: &mut DeviceMatrix<bf16>,
    y: &DeviceMatrix<bf16>,
) -> Result<()> {
    use cudarc::cublas::sys;
    let n = (x.rows * x.cols) as i32;
    let stream = gpu.stream();
    let alpha = 1.0f32;
    let (yp, _ry) = y.buf.device_ptr(stream);
    let (xp, _rx) = x.buf.device_ptr_mut(stream);
    // SAFETY: both buffers hold at least n bf16 elements on this GPU; the handle is bound to
    // the same stream; alpha is a host pointer (the default pointer mode).
    let st = unsafe {
        sys::cublasAxpyEx(
            *blas.handle(),
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

impl Exec for CudaExec {
    fn backend(&self) -> &'static str {
        "cuda"
    }

    fn forward(
        &mut self,
        _comm: &Comm,
        batch: &Batch,
        step: u64,
        want_output: bool,
    ) -> Result<(Vec<bf16>, Vec<Vec<u32>>)> {
        if batch.routing.is_some() {
            bail!("trace replay (--traffic-trace) is only supported by the cpu backend");
        }
        let h = self.shape.hidden;
        let t = batch.x.len() / h;
        let g = self.shape.world_size as u64;
        let token_base = ((step * g + self.rank as u64) * t as u64) as u32;
        if t * h != batch.x.len() {
            bail!("step {step}: the batch is not a whole number of {h}-wide rows");
        }
        // Straight from the batch (no host copy first).
        let mut x = DeviceMatrix {
            rows: t,
            cols: h,
            buf: self.gpu.upload_slice(&batch.x)?,
        };
        for layer in &mut self.layers {
            let y = layer.forward(&self.gpu, self.comm.as_ref(), &x, token_base)?;
            add_residual(&self.gpu, &self.blas, &mut x, &y)?;
        }
        let mut counts = Vec::with_capacity(self.layers.len());
        for layer in &mut self.layers {
            counts.push(layer.load(&self.gpu)?);
            layer.reset_load(&self.gpu)?;
        }
        // Reading the counters synchronised the main stream: the step is done on the GPU.
        let out = if want_output {
            x.download(&self.gpu)?.into_vec()
        } else {
            Vec::new()
        };
        Ok((out, counts))
    }

    fn begin_staging(&mut self, _comm: &Arc<Comm>, layer: usize, plan: &LayerPlan) -> Result<()> {
        if self.staging.is_some() {
            bail!("layer {layer}: another layer is still being staged");
        }
        let spr = self.shape.slots_per_rank();
        let base = self.rank * spr;
        let gpu = &self.gpu;
        let experts = &self
            .layers
            .get(layer)
            .ok_or_else(|| anyhow!("no layer {layer}"))?
            .experts;
        // Buffers: one per local copy, one per expert received (slots of this rank that need
        // the same remote expert share it).
        let mut buffers = StagingBuffers {
            main: gpu.stream().clone(),
            side: gpu.side_stream().clone(),
            bufs: Vec::new(),
        };
        let mut installs = Vec::new();
        let mut local_copies = Vec::new();
        let mut received: HashMap<u32, usize> = HashMap::new();
        for s in base..base + spr {
            match plan.sources[s] {
                SlotSource::Keep => {}
                SlotSource::Local { src_slot } => {
                    buffers.bufs.push(experts.alloc_staging(gpu)?);
                    local_copies.push((src_slot as usize - base, buffers.bufs.len() - 1));
                    installs.push((s - base, buffers.bufs.len() - 1));
                }
                SlotSource::Remote { .. } => {
                    let idx = match received.get(&plan.experts[s]) {
                        Some(&i) => i,
                        None => {
                            buffers.bufs.push(experts.alloc_staging(gpu)?);
                            received.insert(plan.experts[s], buffers.bufs.len() - 1);
                            buffers.bufs.len() - 1
                        }
                    };
                    installs.push((s - base, idx));
                }
            }
        }
        // Receives in plan order (the senders send in plan order too, so each pair matches).
        let recvs = plan
            .recvs_of(self.rank)
            .map(|f| match received.get(&f.expert) {
                Some(&idx) => Ok((idx, f.src_rank)),
                None => Err(anyhow!(
                    "layer {layer}: expert {} is received but no slot needs it",
                    f.expert
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        // Every buffer a slot will be committed from must be filled by a receive.
        let filled: std::collections::HashSet<usize> = recvs.iter().map(|r| r.0).collect();
        if filled.len() != received.len() {
            bail!(
                "layer {layer}: the transfer plan sends this rank {} of the {} experts its slots \
                 need from other ranks",
                filled.len(),
                received.len()
            );
        }
        let sends: Vec<(usize, usize)> = plan
            .sends_of(self.rank)
            .map(|f| (f.src_slot as usize - base, f.dst_rank))
            .collect();
        let side = gpu.side_stream();
        let cu = |e| anyhow!("layer {layer} staging: {e:?}");
        // After the buffers' allocation and any earlier commit on the main stream.
        side.wait(&gpu.stream().record_event(None).map_err(cu)?)
            .map_err(cu)?;
        let start = side
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(cu)?;
        let (a, b) = experts.slot_elems();
        for &(src, idx) in &local_copies {
            let st = &mut buffers.bufs[idx];
            side.memcpy_dtod(&experts.w1.slice(src * a..(src + 1) * a), &mut st.w1)
                .map_err(cu)?;
            side.memcpy_dtod(&experts.w2.slice(src * b..(src + 1) * b), &mut st.w2)
                .map_err(cu)?;
        }
        if !sends.is_empty() || !recvs.is_empty() {
            let xfer = self.transfer_comm.as_ref().ok_or_else(|| {
                anyhow!("layer {layer}: a remote transfer needs more than one rank")
            })?;
            grouped(|| {
                for &(slot, peer) in &sends {
                    xfer.send_slot(experts, slot, peer)?;
                }
                for &(idx, peer) in &recvs {
                    xfer.recv_slot(&mut buffers.bufs[idx], peer)?;
                }
                Ok(())
            })?;
        }
        let bytes = (recvs.len() * experts.slot_bytes()) as u64;
        let done = side
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(cu)?;
        self.staging = Some(DeviceStaging {
            layer,
            buffers,
            installs,
            start,
            done,
            finished: false,
            bytes,
        });
        Ok(())
    }

    fn staging_finished(&mut self, wait: bool) -> Result<bool> {
        let Some(st) = &mut self.staging else {
            bail!("no layer is being staged");
        };
        if !st.finished {
            let cu = |e| anyhow!("layer {} staging: {e:?}", st.layer);
            if wait {
                st.done.synchronize().map_err(cu)?;
                st.finished = true;
            } else {
                st.finished = st.done.try_is_complete().map_err(cu)?;
            }
        }
        Ok(st.finished)
    }

    fn moe_layer(
        &mut self,
        _comm: &Comm,
        layer: usize,
        _x: &Bf16Matrix,
        _token_base: u32,
        _counts: &mut [u32],
    ) -> Result<Bf16Matrix> {
        bail!(
            "MoE layer {layer}: the per-layer path (rows in, block output out) runs on the cpu \
             backend only for now; the cuda backend runs whole steps"
        )
    }

    fn commit(&mut self, layer: usize, map: &LayerMap) -> Result<StageStats> {
        let st = match self.staging.take() {
            Some(st) if st.layer == layer && st.finished => st,
            Some(st) if st.layer == layer => {
                bail!("layer {layer} committed before its transfers finished")
            }
            Some(st) => bail!("layer {layer} committed while layer {} is staged", st.layer),
            None => bail!("layer {layer} committed before it was staged"),
        };
        let gpu = &self.gpu;
        let l = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| anyhow!("no layer {layer}"))?;
        // The main stream takes over: copies in, then the new map; the next forward pass is
        // enqueued after both. Dropping the buffers below frees them on the main stream, after
        // these copies.
        for &(slot, idx) in &st.installs {
            l.experts
                .commit_staging(gpu, &st.buffers.bufs[idx], slot, Some(&st.done))?;
        }
        l.set_map(gpu, &map.replicas)?;
        let ms = st
            .start
            .elapsed_ms(&st.done)
            .map_err(|e| anyhow!("layer {layer}: timing the transfers: {e:?}"))?;
        Ok(StageStats {
            transfer_seconds: f64::from(ms) / 1e3,
            bytes: st.bytes,
            moved: st.installs.len() as u64,
        })
    }
}
