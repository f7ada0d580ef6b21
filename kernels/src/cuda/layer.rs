//! A whole expert-parallel MoE layer on one rank: router, gating, replica choice with load
//! counting, layout, dispatch all-to-all, expert FFN, combine all-to-all, weighted combine.

use super::{DeviceExperts, DeviceMatrix, DeviceReplicaMap, EpComm, FfnStrategy, Gpu};
use crate::error::{Result, invalid};
use crate::routing::{EpTopology, GatingConfig, RecvLayout, ReplicaMap};
use crate::tensor::Bf16Matrix;
use cudarc::driver::CudaSlice;
use half::bf16;

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
    pub experts: DeviceExperts,
    /// FFN strategy.
    pub strategy: FfnStrategy,
    w_gate: DeviceMatrix<bf16>,
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
        gating.validate()?;
        if rank >= topo.num_ranks
            || map.num_physical() != topo.num_slots()
            || experts.slots != topo.slots_per_rank
            || map.num_logical() != gating.num_experts
            || w_gate.rows() != gating.num_experts
            || w_gate.cols() != experts.hidden
        {
            return invalid("layer: rank, map, topology, experts and router shapes disagree");
        }
        Ok(Self {
            gating,
            topo,
            rank,
            experts,
            strategy: FfnStrategy::default(),
            w_gate: gpu.upload(w_gate)?,
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
        if x.cols != self.experts.hidden {
            return invalid("layer: x has the wrong hidden size");
        }
        let logits = gpu.router_logits(x, &self.w_gate)?;
        let topk = gpu.gating_topk(&logits, &self.gating, self.bias.as_ref())?;
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
        gpu.unpermute_combine(&y_send, &layout.inv, &topk.weights, t, k)
    }
}

/// CUDA refuses empty allocations: pad an empty index list to one entry.
fn pad(v: &[u32]) -> Vec<u32> {
    if v.is_empty() { vec![0] } else { v.to_vec() }
}
