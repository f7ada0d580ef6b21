//! Routing types shared by the CPU references and the CUDA kernels: the gating
//! configuration, top-k results, the logical-to-physical replica map with its hash, the
//! expert-parallel topology and the dispatch layouts.

use crate::error::{Result, invalid};

/// How router logits become expert scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    /// `softmax(logits)` over all experts (Mixtral, Qwen).
    Softmax,
    /// `sigmoid(logits)` per expert (DeepSeek-V3).
    Sigmoid,
    /// The top-k by logit, weighted by the softmax over those k logits only (gpt-oss).
    SoftmaxTopK,
}

/// Gating (routing) configuration of one MoE layer.
///
/// Semantics (identical on the CPU and the GPU):
/// 1. `score[e] = softmax(logits)[e]` or `sigmoid(logits[e])`.
/// 2. `choice[e] = score[e] + bias[e]` (bias optional, DeepSeek-V3's correction bias). For
///    softmax without bias the ranking uses the logits themselves (same order, no rounding
///    ties).
/// 3. With `num_groups > 1` the experts form `num_groups` equal consecutive groups; a group's
///    score is the sum of its two largest `choice` values (its only value when a group has
///    one expert), or with [`GroupScore::Max`] its largest; the `topk_groups` best groups are
///    kept and all other experts masked.
/// 4. The `top_k` experts with the largest `choice` are selected, in descending order.
///    **Ties resolve to the lower index** (for groups as for experts).
/// 5. `weight = score[id]` (the unbiased score); with `renormalize` the k weights are divided
///    by their sum (plus `1e-20`); finally multiplied by `routed_scaling_factor`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GatingConfig {
    /// Number of logical (routed) experts E.
    pub num_experts: usize,
    /// Experts per token k.
    pub top_k: usize,
    /// Score function.
    pub scoring: Scoring,
    /// Divide the k weights by their sum.
    pub renormalize: bool,
    /// Number of expert groups (1 = no group limit).
    pub num_groups: usize,
    /// Groups kept per token (ignored when `num_groups == 1`).
    pub topk_groups: usize,
    /// Final multiplier of the weights (DeepSeek-V3: 2.5; otherwise 1.0).
    pub routed_scaling_factor: f32,
    /// How a group is scored (ignored when `num_groups == 1`).
    pub group_score: GroupScore,
}

/// Score of an expert group for group-limited routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupScore {
    /// Sum of the group's two largest choices (DeepSeek-V3).
    Top2Sum,
    /// The group's largest choice (DeepSeek-V2 `group_limited_greedy`).
    Max,
}

impl GatingConfig {
    /// Softmax then top-k, optionally renormalised (Mixtral/Qwen style).
    pub fn softmax(num_experts: usize, top_k: usize, renormalize: bool) -> Self {
        Self {
            num_experts,
            top_k,
            scoring: Scoring::Softmax,
            renormalize,
            num_groups: 1,
            topk_groups: 1,
            routed_scaling_factor: 1.0,
            group_score: GroupScore::Top2Sum,
        }
    }

    /// Sigmoid + bias with grouped top-k, renormalised and scaled (DeepSeek-V3 style;
    /// V3 itself: 256 experts, top 8, 8 groups, 4 groups kept, factor 2.5).
    pub fn grouped_sigmoid(
        num_experts: usize,
        top_k: usize,
        num_groups: usize,
        topk_groups: usize,
        routed_scaling_factor: f32,
    ) -> Self {
        Self {
            num_experts,
            top_k,
            scoring: Scoring::Sigmoid,
            renormalize: true,
            num_groups,
            topk_groups,
            routed_scaling_factor,
            group_score: GroupScore::Top2Sum,
        }
    }

    /// Checks that the configuration is consistent.
    pub fn validate(&self) -> Result<()> {
        let e = self.num_experts;
        if e == 0 || self.top_k == 0 || self.top_k > e {
            return invalid(format!(
                "gating: need 1 <= top_k ({}) <= experts ({e})",
                self.top_k
            ));
        }
        if self.num_groups == 0 || !e.is_multiple_of(self.num_groups) {
            return invalid(format!(
                "gating: {e} experts do not split into {} equal groups",
                self.num_groups
            ));
        }
        if self.num_groups > 1 {
            let per = e / self.num_groups;
            if self.topk_groups == 0
                || self.topk_groups > self.num_groups
                || self.top_k > self.topk_groups * per
            {
                return invalid(format!(
                    "gating: topk_groups {} of {} groups ({per} experts each) cannot hold top_k {}",
                    self.topk_groups, self.num_groups, self.top_k
                ));
            }
        }
        if !self.routed_scaling_factor.is_finite() {
            return invalid("gating: routed_scaling_factor must be finite");
        }
        Ok(())
    }
}

/// Result of gating: for each token its `k` expert ids (descending score) and weights.
#[derive(Debug, Clone, PartialEq)]
pub struct TopK {
    /// Number of tokens T.
    pub tokens: usize,
    /// Experts per token k.
    pub k: usize,
    /// `[T * k]` logical expert ids, token-major.
    pub ids: Vec<u32>,
    /// `[T * k]` routing weights, token-major.
    pub weights: Vec<f32>,
}

/// The replica hash: picks which replica of a logical expert serves a (token, expert) pair.
///
/// `replica = replica_hash(token_index, logical_expert) % logcnt[logical_expert]`.
///
/// A murmur3-style 32-bit finaliser over `token_index * 0x9E3779B1 ^ expert * 0x85EBCA77`:
/// consecutive token indices spread evenly over the replicas, and the same token picks
/// independently for different experts. The CUDA kernel (`src/cuda/moe.cu`,
/// `moe_replica_hash`) implements exactly the same arithmetic, so a worker's CPU and GPU
/// backends route identically. `token_index` is the caller's token numbering (the kernels
/// use `token_base + t` for the t-th row of the batch).
#[inline]
pub fn replica_hash(token_index: u32, logical_expert: u32) -> u32 {
    let mut h = token_index.wrapping_mul(0x9E37_79B1) ^ logical_expert.wrapping_mul(0x85EB_CA77);
    h ^= h >> 16;
    h = h.wrapping_mul(0x7FEB_352D);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846C_A68B);
    h ^= h >> 16;
    h
}

/// Logical-to-physical map of one layer (`log2phy`, `logcnt`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaMap {
    num_logical: usize,
    num_physical: usize,
    max_replicas: usize,
    log2phy: Vec<i32>,
    logcnt: Vec<u32>,
}

impl ReplicaMap {
    /// `log2phy` is `[num_logical x max_replicas]` (slots of each expert's replicas, padded
    /// with -1), `logcnt` is `[num_logical]` (replica counts, each >= 1). Every used entry
    /// must be a slot in `0..num_physical`.
    pub fn new(
        num_logical: usize,
        num_physical: usize,
        max_replicas: usize,
        log2phy: Vec<i32>,
        logcnt: Vec<u32>,
    ) -> Result<Self> {
        if num_logical == 0 || max_replicas == 0 {
            return invalid("replica map: no experts or no replica columns");
        }
        if log2phy.len() != num_logical * max_replicas || logcnt.len() != num_logical {
            return invalid(format!(
                "replica map: log2phy has {} entries (need {}), logcnt {} (need {num_logical})",
                log2phy.len(),
                num_logical * max_replicas,
                logcnt.len()
            ));
        }
        if num_physical > i32::MAX as usize {
            return invalid("replica map: too many physical slots");
        }
        for (e, &c) in logcnt.iter().enumerate() {
            if c == 0 || c as usize > max_replicas {
                return invalid(format!(
                    "replica map: expert {e} has {c} replicas (max {max_replicas})"
                ));
            }
            for r in 0..c as usize {
                let p = log2phy[e * max_replicas + r];
                if p < 0 || p as usize >= num_physical {
                    return invalid(format!("replica map: expert {e} replica {r} is slot {p}"));
                }
            }
        }
        Ok(Self {
            num_logical,
            num_physical,
            max_replicas,
            log2phy,
            logcnt,
        })
    }

    /// Builds the map from `phy2log` (logical expert of each physical slot); replicas are
    /// listed in increasing slot order. Every logical expert must have a slot.
    pub fn from_phy2log(phy2log: &[u32], num_logical: usize) -> Result<Self> {
        let mut lists: Vec<Vec<i32>> = vec![Vec::new(); num_logical];
        for (p, &e) in phy2log.iter().enumerate() {
            match lists.get_mut(e as usize) {
                Some(l) => l.push(p as i32),
                None => {
                    return invalid(format!(
                        "phy2log: slot {p} holds expert {e} >= {num_logical}"
                    ));
                }
            }
        }
        let max_replicas = lists.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut log2phy = vec![-1; num_logical * max_replicas];
        let mut logcnt = vec![0u32; num_logical];
        for (e, l) in lists.iter().enumerate() {
            logcnt[e] = l.len() as u32;
            log2phy[e * max_replicas..e * max_replicas + l.len()].copy_from_slice(l);
        }
        Self::new(num_logical, phy2log.len(), max_replicas, log2phy, logcnt)
    }

    /// One replica per expert, expert e in slot e.
    pub fn identity(num_experts: usize) -> Result<Self> {
        let p: Vec<u32> = (0..num_experts as u32).collect();
        Self::from_phy2log(&p, num_experts)
    }

    /// Number of logical experts.
    pub fn num_logical(&self) -> usize {
        self.num_logical
    }
    /// Number of physical slots (the length of the load counters).
    pub fn num_physical(&self) -> usize {
        self.num_physical
    }
    /// Columns of `log2phy`.
    pub fn max_replicas(&self) -> usize {
        self.max_replicas
    }
    /// `[num_logical x max_replicas]`, padded with -1.
    pub fn log2phy(&self) -> &[i32] {
        &self.log2phy
    }
    /// `[num_logical]` replica counts.
    pub fn logcnt(&self) -> &[u32] {
        &self.logcnt
    }

    /// The physical slot serving logical expert `expert` for token `token_index`
    /// (`log2phy[expert][replica_hash(token_index, expert) % logcnt[expert]]`).
    /// `None` when `expert` is out of range.
    pub fn choose(&self, token_index: u32, expert: u32) -> Option<u32> {
        let e = expert as usize;
        let c = *self.logcnt.get(e)?;
        let r = (replica_hash(token_index, expert) % c) as usize;
        Some(self.log2phy[e * self.max_replicas + r] as u32)
    }
}

/// Expert-parallel topology: `num_ranks` ranks with `slots_per_rank` physical slots each.
/// Physical slot `p` lives on rank `p / slots_per_rank` as its local expert
/// `p % slots_per_rank`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpTopology {
    /// Number of EP ranks G.
    pub num_ranks: usize,
    /// Physical slots per rank S.
    pub slots_per_rank: usize,
}

impl EpTopology {
    /// Checked constructor.
    pub fn new(num_ranks: usize, slots_per_rank: usize) -> Result<Self> {
        if num_ranks == 0 || slots_per_rank == 0 {
            return invalid("topology: ranks and slots per rank must be positive");
        }
        Ok(Self {
            num_ranks,
            slots_per_rank,
        })
    }
    /// Total physical slots `G * S`.
    pub fn num_slots(&self) -> usize {
        self.num_ranks * self.slots_per_rank
    }
    /// Rank holding physical slot `p`.
    pub fn rank_of(&self, p: usize) -> usize {
        p / self.slots_per_rank
    }
}

/// Send-side layout of one batch (what dispatch needs).
///
/// Rows of the send buffer are (token, j) pairs, `flat = t * k + j`, sorted **stably** by
/// physical slot. Because slots are numbered rank-major, this groups rows by
/// (destination rank, local expert), and within one slot keeps increasing `flat` order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchLayout {
    /// Topology the layout was built for.
    pub topo: EpTopology,
    /// Tokens T.
    pub tokens: usize,
    /// Experts per token k.
    pub k: usize,
    /// `[G]` distinct tokens with at least one row for the rank (a token counts once per rank).
    pub tokens_per_rank: Vec<u32>,
    /// `[G]` rows sent to each rank (what the all-to-all moves).
    pub rows_per_rank: Vec<u32>,
    /// `[G * S]` rows per physical slot; rank r's local experts are
    /// `rows_per_slot[r*S..(r+1)*S]` (tokens per local expert, counted with multiplicity k).
    pub rows_per_slot: Vec<u32>,
    /// `[G * S + 1]` first send row of each slot (exclusive prefix sum of `rows_per_slot`).
    pub slot_offsets: Vec<u32>,
    /// `[T * k]` send row -> source flat index `t * k + j` (source token = `perm[row] / k`).
    pub perm: Vec<u32>,
    /// `[T * k]` source flat index -> send row (inverse of `perm`).
    pub inv: Vec<u32>,
}

impl DispatchLayout {
    /// Row offsets of each destination rank in the send buffer (`[G + 1]`).
    pub fn rank_offsets(&self) -> Vec<u32> {
        let s = self.topo.slots_per_rank;
        (0..=self.topo.num_ranks)
            .map(|r| self.slot_offsets[r * s])
            .collect()
    }
}

/// Receive-side layout: the receive buffer holds, for each source rank in order, its rows
/// grouped by local expert (`counts[src * S + e]` rows for local expert `e`). The expert FFN
/// wants rows grouped by local expert across sources ("expert-major"); this layout gives
/// both directions of that reordering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecvLayout {
    /// Source ranks G.
    pub num_ranks: usize,
    /// Local experts S.
    pub slots_per_rank: usize,
    /// `[G + 1]` first receive row of each source.
    pub src_offsets: Vec<u32>,
    /// `[S + 1]` first expert-major row of each local expert.
    pub expert_offsets: Vec<u32>,
    /// `[R]` expert-major row -> receive row (gather for the FFN input).
    pub expert_major_to_recv: Vec<u32>,
    /// `[R]` receive row -> expert-major row (gather back for the combine send).
    pub recv_to_expert_major: Vec<u32>,
}

impl RecvLayout {
    /// `counts` is `[G x S]`, source-major: rows from source `src` for local expert `e`.
    pub fn new(num_ranks: usize, slots_per_rank: usize, counts: &[u32]) -> Result<Self> {
        if counts.len() != num_ranks * slots_per_rank {
            return invalid(format!(
                "recv layout: {} counts for {num_ranks} ranks x {slots_per_rank} slots",
                counts.len()
            ));
        }
        let total: u64 = counts.iter().map(|&c| c as u64).sum();
        if total > u32::MAX as u64 {
            return invalid("recv layout: more than 2^32 rows");
        }
        let (g, s) = (num_ranks, slots_per_rank);
        let mut src_offsets = vec![0u32; g + 1];
        for src in 0..g {
            src_offsets[src + 1] =
                src_offsets[src] + counts[src * s..(src + 1) * s].iter().sum::<u32>();
        }
        let mut expert_offsets = vec![0u32; s + 1];
        for e in 0..s {
            expert_offsets[e + 1] =
                expert_offsets[e] + (0..g).map(|src| counts[src * s + e]).sum::<u32>();
        }
        let n = total as usize;
        let mut e2r = vec![0u32; n];
        let mut r2e = vec![0u32; n];
        let mut next = expert_offsets.clone();
        for src in 0..g {
            let mut recv = src_offsets[src];
            for e in 0..s {
                for _ in 0..counts[src * s + e] {
                    let dst = next[e];
                    next[e] += 1;
                    e2r[dst as usize] = recv;
                    r2e[recv as usize] = dst;
                    recv += 1;
                }
            }
        }
        Ok(Self {
            num_ranks,
            slots_per_rank,
            src_offsets,
            expert_offsets,
            expert_major_to_recv: e2r,
            recv_to_expert_major: r2e,
        })
    }
    /// Total rows received.
    pub fn rows(&self) -> usize {
        self.expert_major_to_recv.len()
    }
}
