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
    DeviceExperts, DeviceFp8Experts, DeviceMatrix, EpComm, EpLayer, ExpertStaging, Fp8Staging, Gpu,
    LayerExperts, NcclId, Router, SharedExperts, grouped,
};
use moe_kernels::fp8::{Fp8Expert, Fp8Projection};
use moe_kernels::{Bf16Matrix, EpTopology, KernelError, Matrix};

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
    bufs: Vec<SlotStaging>,
}

/// One slot's staging buffer, in the layer's weight format.
enum SlotStaging {
    Bf16(ExpertStaging),
    Fp8(Fp8Staging),
}

fn alloc_staging(gpu: &Gpu, experts: &LayerExperts) -> Result<SlotStaging> {
    Ok(match experts {
        LayerExperts::Bf16(e) => SlotStaging::Bf16(e.alloc_staging(gpu)?),
        LayerExperts::Fp8(e, _) => SlotStaging::Fp8(e.alloc_staging(gpu)?),
    })
}

fn mismatch() -> KernelError {
    KernelError::Invalid("a staging buffer does not match the layer's weight format".into())
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
/// gpt-oss's expert projection biases and clamped SwiGLU (its gating, router bias and
/// softmax over the top-k, run on the GPU).
fn unsupported_on_gpu(store: &WeightStore) -> Result<()> {
    let m = store.model();
    if m.expert_bias || m.swiglu.is_some() {
        bail!(
            "the cuda backend does not compute {} experts' projection biases and clamped SwiGLU \
             yet; run this model with --backend cpu",
            m.family
        );
    }
    Ok(())
}

/// A checkpoint's FP8 projection in the kernels' form (128x128 blocks only).
fn fp8_projection(m: crate::checkpoint::Fp8Matrix) -> Option<Fp8Projection> {
    (m.block == [128, 128]).then_some(Fp8Projection {
        rows: m.rows,
        cols: m.cols,
        codes: m.data,
        scales: m.scale_inv,
    })
}

/// This rank's routed experts of `layer` (`slots`: the logical expert of each local slot): FP8
/// codes and block scales as stored for an FP8 checkpoint with 128x128 blocks (native FP8
/// GEMMs where the GPU and shapes allow, else dequantised per expert at compute time), bf16
/// otherwise.
fn load_experts(
    gpu: &Gpu,
    store: &WeightStore,
    layer: usize,
    slots: &[u32],
) -> Result<LayerExperts> {
    if let WeightStore::Files { checkpoint, .. } = store
        && store.model().weight_dtype == moe_model::WeightDtype::Fp8E4m3
    {
        let mut read: HashMap<u32, Option<Fp8Expert>> = HashMap::new();
        let mut all = Vec::with_capacity(slots.len());
        for &e in slots {
            let got = match read.entry(e) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => v.insert(
                    checkpoint
                        .expert_fp8(layer, e as usize)?
                        .and_then(|[g, u, d]| {
                            Some([fp8_projection(g)?, fp8_projection(u)?, fp8_projection(d)?])
                        }),
                ),
            };
            match got.as_ref() {
                Some(x) => all.push(x.clone()),
                None => {
                    all.clear();
                    break;
                }
            }
        }
        if !all.is_empty() {
            let dev = DeviceFp8Experts::upload(gpu, &all)?;
            let compute = dev.default_compute(gpu);
            tracing::info!(layer, ?compute, "FP8 experts kept as FP8 on the GPU");
            return Ok(LayerExperts::Fp8(Box::new(dev), compute));
        }
        tracing::warn!(
            layer,
            "FP8 experts without 128x128 blocks: dequantised to bf16 at load"
        );
    }
    let host: Vec<ExpertWeights> = store
        .load_slots(layer, slots)?
        .iter()
        .map(|w| (**w).clone())
        .collect();
    Ok(LayerExperts::Bf16(DeviceExperts::upload(gpu, &host)?))
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
            let experts = load_experts(&gpu, store, l, mine)?;
            // bf16 logits GEMM when the router is bf16 anyway; DeepSeek's fp32 routers get
            // an fp32 GEMM, as on the CPU.
            let router_f32 = store.router_f32(l)?;
            let bf16_exact = router_f32
                .as_slice()
                .iter()
                .all(|v| bf16::from_f32(*v).to_f32() == *v);
            let router_bf16 = bf16_exact.then(|| store.router(l)).transpose()?;
            let router = match &router_bf16 {
                Some(r) => Router::Bf16(r),
                None => Router::F32(&router_f32),
            };
            let shared = match store.shared(l)? {
                Some(s) => Some(SharedExperts {
                    mlp: DeviceExperts::upload(&gpu, std::slice::from_ref(&s.mlp))?,
                    gate: s.gate.as_deref().map(|g| gpu.upload_slice(g)).transpose()?,
                }),
                None => None,
            };
            let bias = store.correction_bias(l)?;
            let router_bias = store.router_bias(l)?;
            let map = LayerMap::new(row.clone(), shape.num_experts).map_err(|e| anyhow!(e))?;
            layers.push(EpLayer::with_parts(
                &gpu,
                router,
                gating_config(store.model()),
                router_bias.as_deref(),
                bias.as_deref(),
                &map.replicas,
                EpTopology::new(shape.world_size, spr)?,
                rank,
                experts,
                shared,
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
                    buffers.bufs.push(alloc_staging(gpu, experts)?);
                    local_copies.push((src_slot as usize - base, buffers.bufs.len() - 1));
                    installs.push((s - base, buffers.bufs.len() - 1));
                }
                SlotSource::Remote { .. } => {
                    let idx = match received.get(&plan.experts[s]) {
                        Some(&i) => i,
                        None => {
                            buffers.bufs.push(alloc_staging(gpu, experts)?);
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
        for &(src, idx) in &local_copies {
            match (experts, &mut buffers.bufs[idx]) {
                (LayerExperts::Bf16(e), SlotStaging::Bf16(st)) => {
                    let (a, b) = e.slot_elems();
                    side.memcpy_dtod(&e.w1.slice(src * a..(src + 1) * a), &mut st.w1)
                        .map_err(cu)?;
                    side.memcpy_dtod(&e.w2.slice(src * b..(src + 1) * b), &mut st.w2)
                        .map_err(cu)?;
                }
                (LayerExperts::Fp8(e, _), SlotStaging::Fp8(st)) => {
                    e.copy_slot_to_staging(side, src, st)?
                }
                _ => return Err(mismatch().into()),
            }
        }
        if !sends.is_empty() || !recvs.is_empty() {
            let xfer = self.transfer_comm.as_ref().ok_or_else(|| {
                anyhow!("layer {layer}: a remote transfer needs more than one rank")
            })?;
            grouped(|| {
                for &(slot, peer) in &sends {
                    match experts {
                        LayerExperts::Bf16(e) => xfer.send_slot(e, slot, peer)?,
                        LayerExperts::Fp8(e, _) => xfer.send_fp8_slot(e, slot, peer)?,
                    }
                }
                for &(idx, peer) in &recvs {
                    match &mut buffers.bufs[idx] {
                        SlotStaging::Bf16(st) => xfer.recv_slot(st, peer)?,
                        SlotStaging::Fp8(st) => xfer.recv_fp8_slot(st, peer)?,
                    }
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

    /// The rows go to the GPU, through the layer (NCCL all-to-all with the group's other
    /// GPUs), and the block output comes back; the layer's device load counters of this call
    /// are added to `counts`.
    fn moe_layer(
        &mut self,
        _comm: &Comm,
        layer: usize,
        x: &Bf16Matrix,
        token_base: u32,
        counts: &mut [u32],
    ) -> Result<Bf16Matrix> {
        let gpu = &self.gpu;
        let l = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| anyhow!("no MoE layer {layer}"))?;
        let xd = DeviceMatrix {
            rows: x.rows(),
            cols: x.cols(),
            buf: gpu.upload_slice(x.as_slice())?,
        };
        let y = l.forward(gpu, self.comm.as_ref(), &xd, token_base)?;
        let load = l.load(gpu)?;
        l.reset_load(gpu)?;
        if counts.len() != load.len() {
            bail!(
                "MoE layer {layer}: {} slot counters given, the layer has {}",
                counts.len(),
                load.len()
            );
        }
        counts.iter_mut().zip(&load).for_each(|(c, v)| *c += v);
        let out = y.download(gpu)?;
        Ok(Matrix::from_vec(out.rows(), out.cols(), out.into_vec())?)
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
            match (&mut l.experts, &st.buffers.bufs[idx]) {
                (LayerExperts::Bf16(e), SlotStaging::Bf16(b)) => {
                    e.commit_staging(gpu, b, slot, Some(&st.done))?
                }
                (LayerExperts::Fp8(e, _), SlotStaging::Fp8(b)) => {
                    e.commit_staging(gpu, b, slot, Some(&st.done))?
                }
                _ => return Err(mismatch().into()),
            }
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
