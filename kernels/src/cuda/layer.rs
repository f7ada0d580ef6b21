//! A whole expert-parallel MoE layer on one rank: router, gating, replica choice with load
//! counting, layout, dispatch all-to-all, expert FFN, combine all-to-all, weighted combine.

use super::{
    DeviceExperts, DeviceFp8Experts, DeviceMatrix, DeviceReplicaMap, EpComm, FfnStrategy,
    Fp8Compute, Gpu,
};
use crate::error::{Result, invalid};
use crate::routing::{EpTopology, GatingConfig, RecvLayout, ReplicaMap};
use crate::tensor::{Bf16Matrix, F32Matrix};
use cudarc::driver::CudaSlice;
use half::bf16;

/// The router weights of a layer on the device.
#[derive(Debug)]
enum DeviceRouter {
    Bf16(DeviceMatrix<bf16>),
    /// DeepSeek's fp32 routers (logits from fp32 weights, as the CPU reference).
    F32(DeviceMatrix<f32>),
}

/// A layer's router as given on the host.
#[derive(Debug, Clone, Copy)]
pub enum Router<'a> {
    /// bf16 weights `[E, H]`.
    Bf16(&'a Bf16Matrix),
    /// fp32 weights `[E, H]`.
    F32(&'a F32Matrix),
}

/// The routed experts of one rank: bf16, or FP8 with block scales.
#[derive(Debug)]
pub enum LayerExperts {
    /// bf16 weights.
    Bf16(DeviceExperts),
    /// FP8 weights and how they compute.
    Fp8(Box<DeviceFp8Experts>, Fp8Compute),
}

impl LayerExperts {
    /// Slots held.
    pub fn slots(&self) -> usize {
        match self {
            LayerExperts::Bf16(e) => e.slots,
            LayerExperts::Fp8(e, _) => e.slots,
        }
    }
    /// Hidden size.
    pub fn hidden(&self) -> usize {
        match self {
            LayerExperts::Bf16(e) => e.hidden,
            LayerExperts::Fp8(e, _) => e.hidden,
        }
    }
    /// Bytes of one slot (what a remap moves per expert).
    pub fn slot_bytes(&self) -> usize {
        match self {
            LayerExperts::Bf16(e) => e.slot_bytes(),
            LayerExperts::Fp8(e, _) => e.slot_bytes(),
        }
    }
    /// The SwiGLU FFN over rows grouped by local expert.
    pub fn ffn(
        &mut self,
        gpu: &Gpu,
        x: &DeviceMatrix<bf16>,
        offsets: &[u32],
        strategy: FfnStrategy,
    ) -> Result<DeviceMatrix<bf16>> {
        match self {
            LayerExperts::Bf16(e) => e.ffn(gpu, x, offsets, strategy),
            LayerExperts::Fp8(e, c) => e.ffn(gpu, x, offsets, *c),
        }
    }
}

/// The experts every token goes through besides the routed ones (DeepSeek's shared experts,
/// Qwen2-MoE's gated shared expert), computed on every rank for the rank's own tokens.
#[derive(Debug)]
pub struct SharedExperts {
    /// The shared MLP as one slot (DeepSeek's `n_shared_experts` fused, as stored).
    pub mlp: DeviceExperts,
    /// Qwen2-MoE's `shared_expert_gate` `[H]`: the output is scaled by `sigmoid(gate . x)`.
    pub gate: Option<CudaSlice<f32>>,
}

/// One rank's device state of an MoE layer.
#[derive(Debug)]
pub struct EpLayer {
    /// Gating configuration.
    pub gating: GatingConfig,
    /// Topology.
    pub topo: EpTopology,
    /// This rank.
    pub rank: usize,
    /// Local experts (`topo.slots_per_rank` slots: physical slots `rank*S..(rank+1)*S`).
    pub experts: LayerExperts,
    /// Shared experts, if the model has them.
    pub shared: Option<SharedExperts>,
    /// FFN strategy (bf16 experts).
    pub strategy: FfnStrategy,
    router: DeviceRouter,
    logit_bias: Option<CudaSlice<f32>>,
    bias: Option<CudaSlice<f32>>,
    map: DeviceReplicaMap,
    load: CudaSlice<u32>,
}

impl EpLayer {
    /// Uploads the router and map; `experts` must hold this rank's `S` slots.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        gpu: &Gpu,
        w_gate: &Bf16Matrix,
        gating: GatingConfig,
        bias: Option<&[f32]>,
        map: &ReplicaMap,
        topo: EpTopology,
        rank: usize,
        experts: DeviceExperts,
    ) -> Result<Self> {
        Self::with_parts(
            gpu,
            Router::Bf16(w_gate),
            gating,
            None,
            bias,
            map,
            topo,
            rank,
            LayerExperts::Bf16(experts),
            None,
        )
    }

    /// The general constructor: a bf16 or fp32 router, gpt-oss's router bias `logit_bias`
    /// (added to the logits), DeepSeek-V3's correction bias `bias` (choice only), bf16 or FP8
    /// experts and optional shared experts.
    #[allow(clippy::too_many_arguments)]
    pub fn with_parts(
        gpu: &Gpu,
        router: Router<'_>,
        gating: GatingConfig,
        logit_bias: Option<&[f32]>,
        bias: Option<&[f32]>,
        map: &ReplicaMap,
        topo: EpTopology,
        rank: usize,
        experts: LayerExperts,
        shared: Option<SharedExperts>,
    ) -> Result<Self> {
        gating.validate()?;
        let (rows, cols) = match router {
            Router::Bf16(w) => (w.rows(), w.cols()),
            Router::F32(w) => (w.rows(), w.cols()),
        };
        if rank >= topo.num_ranks
            || map.num_physical() != topo.num_slots()
            || experts.slots() != topo.slots_per_rank
            || map.num_logical() != gating.num_experts
            || rows != gating.num_experts
            || cols != experts.hidden()
        {
            return invalid("layer: rank, map, topology, experts and router shapes disagree");
        }
        if let Some(s) = &shared
            && (s.mlp.slots != 1
                || s.mlp.hidden != cols
                || s.gate.as_ref().is_some_and(|g| g.len() != cols))
        {
            return invalid("layer: the shared experts must be one [H]-wide MLP (and an [H] gate)");
        }
        Ok(Self {
            gating,
            topo,
            rank,
            experts,
            shared,
            strategy: FfnStrategy::default(),
            router: match router {
                Router::Bf16(w) => DeviceRouter::Bf16(gpu.upload(w)?),
                Router::F32(w) => DeviceRouter::F32(gpu.upload(w)?),
            },
            logit_bias: logit_bias.map(|b| gpu.upload_slice(b)).transpose()?,
            bias: bias.map(|b| gpu.upload_slice(b)).transpose()?,
            map: DeviceReplicaMap::upload(gpu, map)?,
            load: gpu.zeros(topo.num_slots())?,
        })
    }

    /// Replaces the replica map (a remap switches it together with the slots' weights), on
    /// the main stream: forward passes enqueued after this use the new map.
    pub fn set_map(&mut self, gpu: &Gpu, map: &ReplicaMap) -> Result<()> {
        if map.num_physical() != self.topo.num_slots()
            || map.num_logical() != self.gating.num_experts
        {
            return invalid("layer: the new map does not match the topology or the experts");
        }
        self.map = DeviceReplicaMap::upload(gpu, map)?;
        Ok(())
    }

    /// The per-physical-slot load counters accumulated so far (synchronises).
    pub fn load(&self, gpu: &Gpu) -> Result<Vec<u32>> {
        gpu.download_slice(&self.load)
    }

    /// Zeroes the load counters.
    pub fn reset_load(&mut self, gpu: &Gpu) -> Result<()> {
        gpu.stream()
            .memset_zeros(&mut self.load)
            .map_err(super::drv)
    }

    /// Runs the layer on this rank's tokens `x [T, H]` (token `t` hashes as
    /// `token_base + t`). With more than one rank, `comm` (bound to `gpu`'s main stream) is
    /// required and every rank must call `forward` for the same step. Returns `[T, H]`.
    /// Synchronises once or twice (the counts are needed on the host).
    pub fn forward(
        &mut self,
        gpu: &Gpu,
        comm: Option<&EpComm>,
        x: &DeviceMatrix<bf16>,
        token_base: u32,
    ) -> Result<DeviceMatrix<bf16>> {
        let (g, s) = (self.topo.num_ranks, self.topo.slots_per_rank);
        if x.cols != self.experts.hidden() {
            return invalid("layer: x has the wrong hidden size");
        }
        let logits = match &self.router {
            DeviceRouter::Bf16(w) => gpu.router_logits(x, w)?,
            DeviceRouter::F32(w) => gpu.router_logits_f32(x, w)?,
        };
        let topk = gpu.gating_topk_with(
            &logits,
            &self.gating,
            self.logit_bias.as_ref(),
            self.bias.as_ref(),
        )?;
        let phys = gpu.map_to_physical(&topk, &self.map, token_base, &mut self.load)?;
        let layout = gpu.dispatch_layout(&phys, topk.tokens, topk.k, self.topo)?;
        let (t, k) = (topk.tokens, topk.k);
        let send = gpu.permute(x, &layout)?;
        let y_send = if g == 1 {
            let offsets = gpu.download_slice(&layout.slot_offsets)?;
            self.experts.ffn(gpu, &send, &offsets, self.strategy)?
        } else {
            let Some(comm) = comm else {
                return invalid("layer: more than one rank needs a communicator");
            };
            if comm.world() != g
                || comm.rank() != self.rank
                || comm.stream().cu_stream() != gpu.stream().cu_stream()
            {
                return invalid("layer: communicator does not match the rank, world or stream");
            }
            let mut recv_counts = gpu.zeros::<u32>(g * s)?;
            comm.all_to_all_u32(&layout.rows_per_slot, &mut recv_counts, s)?;
            let send_counts = gpu.download_slice(&layout.rows_per_slot)?;
            let recv_counts = gpu.download_slice(&recv_counts)?;
            let sum = |c: &[u32], p: usize| c[p * s..(p + 1) * s].iter().sum::<u32>();
            let send_rows: Vec<u32> = (0..g).map(|p| sum(&send_counts, p)).collect();
            let recv_rows: Vec<u32> = (0..g).map(|p| sum(&recv_counts, p)).collect();
            let rl = RecvLayout::new(g, s, &recv_counts)?;
            let r = rl.rows();
            let mut recv = gpu.alloc_matrix::<bf16>(r, x.cols)?;
            comm.all_to_all_rows(&send, &send_rows, &mut recv, &recv_rows)?;
            let e2r = gpu.upload_slice(&pad(&rl.expert_major_to_recv))?;
            let r2e = gpu.upload_slice(&pad(&rl.recv_to_expert_major))?;
            let grouped = gpu.gather_rows(&recv, &e2r.slice(..r), 1)?;
            let y = self
                .experts
                .ffn(gpu, &grouped, &rl.expert_offsets, self.strategy)?;
            let y_recv = gpu.gather_rows(&y, &r2e.slice(..r), 1)?;
            let mut y_send = gpu.alloc_matrix::<bf16>(t * k, x.cols)?;
            comm.all_to_all_rows(&y_recv, &recv_rows, &mut y_send, &send_rows)?;
            y_send
        };
        let shared = match &self.shared {
            Some(sh) => {
                let y = sh.mlp.ffn(gpu, x, &[0, t as u32], self.strategy)?;
                let g = sh
                    .gate
                    .as_ref()
                    .map(|w| gpu.shared_gate(x, w))
                    .transpose()?;
                Some((y, g))
            }
            None => None,
        };
        let mut out = gpu.alloc_matrix::<bf16>(t, x.cols)?;
        gpu.unpermute_combine_shared_into(
            &y_send,
            &layout.inv,
            &topk.weights,
            t,
            k,
            shared.as_ref().map(|(y, g)| (y, g.as_ref())),
            &mut out,
        )?;
        Ok(out)
    }
}

/// One layer's decode step captured in a CUDA graph for a fixed token count (a bucket):
/// write the tokens into `x`, [`DecodeGraph::launch`], read `out`.
pub struct DecodeGraph {
    /// Input rows `[tokens, H]` (the graph reads them from here).
    pub x: DeviceMatrix<bf16>,
    /// Output rows `[tokens, H]`.
    pub out: DeviceMatrix<bf16>,
    graph: cudarc::driver::CudaGraph,
}

impl std::fmt::Debug for DecodeGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DecodeGraph({} tokens)", self.x.rows)
    }
}

impl DecodeGraph {
    /// Replays the captured step on the main stream (asynchronous).
    pub fn launch(&self) -> Result<()> {
        self.graph.launch().map_err(super::drv)
    }
}

impl EpLayer {
    /// The layer for a one-rank group without host round trips (router, gating, replica
    /// choice, layout, permute, FFN with the expert offsets read on the device, shared
    /// experts, combine into `out`): capturable in a CUDA graph. FP8 experts use the
    /// weight-only dequantising projections here.
    pub fn forward_decode(
        &mut self,
        gpu: &Gpu,
        x: &DeviceMatrix<bf16>,
        token_base: u32,
        out: &mut DeviceMatrix<bf16>,
    ) -> Result<()> {
        if self.topo.num_ranks != 1 || x.cols != self.experts.hidden() || out.rows != x.rows {
            return invalid("decode step: one rank, x [T, H] and out [T, H]");
        }
        let logits = match &self.router {
            DeviceRouter::Bf16(w) => gpu.router_logits(x, w)?,
            DeviceRouter::F32(w) => gpu.router_logits_f32(x, w)?,
        };
        let topk = gpu.gating_topk_with(
            &logits,
            &self.gating,
            self.logit_bias.as_ref(),
            self.bias.as_ref(),
        )?;
        let phys = gpu.map_to_physical(&topk, &self.map, token_base, &mut self.load)?;
        let layout = gpu.dispatch_layout(&phys, topk.tokens, topk.k, self.topo)?;
        let (t, k) = (topk.tokens, topk.k);
        let send = gpu.permute(x, &layout)?;
        let y_send = match &self.experts {
            LayerExperts::Bf16(e) => e.ffn_device_offsets(gpu, &send, &layout.slot_offsets)?,
            LayerExperts::Fp8(e, _) => e.ffn_device_offsets(gpu, &send, &layout.slot_offsets)?,
        };
        let shared = match &self.shared {
            // one group: plain cuBLAS GEMMs on the main stream (no host-to-device copies)
            Some(sh) => Some((
                sh.mlp.ffn(gpu, x, &[0, t as u32], FfnStrategy::Loop)?,
                sh.gate
                    .as_ref()
                    .map(|w| gpu.shared_gate(x, w))
                    .transpose()?,
            )),
            None => None,
        };
        gpu.unpermute_combine_shared_into(
            &y_send,
            &layout.inv,
            &topk.weights,
            t,
            k,
            shared.as_ref().map(|(y, g)| (y, g.as_ref())),
            out,
        )
    }

    /// Captures [`EpLayer::forward_decode`] for `tokens` tokens in a CUDA graph (after one
    /// eager run, which loads everything the capture must not). The replica hash uses
    /// `token_base` at every replay; the load counters keep counting.
    pub fn capture_decode(
        &mut self,
        gpu: &Gpu,
        tokens: usize,
        token_base: u32,
    ) -> Result<DecodeGraph> {
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        let h = self.experts.hidden();
        let x = DeviceMatrix {
            rows: tokens,
            cols: h,
            buf: gpu.zeros::<bf16>(tokens * h)?,
        };
        let mut out = gpu.alloc_matrix::<bf16>(tokens, h)?;
        self.forward_decode(gpu, &x, token_base, &mut out)?;
        gpu.synchronize()?;
        let s = gpu.stream();
        s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(super::drv)?;
        let r = self.forward_decode(gpu, &x, token_base, &mut out);
        let g = s
            .end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
        r?;
        let graph = g
            .map_err(super::drv)?
            .ok_or_else(|| crate::error::KernelError::Driver("empty CUDA graph".into()))?;
        Ok(DecodeGraph { x, out, graph })
    }
}

/// CUDA refuses empty allocations: pad an empty index list to one entry.
fn pad(v: &[u32]) -> Vec<u32> {
    if v.is_empty() { vec![0] } else { v.to_vec() }
}
