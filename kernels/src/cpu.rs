//! CPU reference implementations of every kernel, with the same semantics as the CUDA
//! kernels. The worker's CPU backend calls these directly; the GPU tests compare against
//! them.
//!
//! Numerics (shared with the GPU):
//! * matrix products: bf16 inputs, fp32 accumulation; router logits stay fp32, FFN
//!   intermediates (`gate_up`, `h`) and outputs are rounded to bf16 (round to nearest even);
//! * `silu(g) = g / (1 + exp(-g))` in fp32 on bf16-rounded `g`, times `up`, rounded to bf16;
//! * combine: `out[t] = bf16(sum_j w[t,j] * y[row(t,j)])`, a fused multiply-add chain in fp32
//!   over `j = 0..k` in order.
//!
//! A whole expert-parallel layer in one process is [`moe_layer`]; a worker that exchanges
//! rows itself uses the steps: [`router_logits`], [`gating_topk`], [`map_to_physical`],
//! [`dispatch_layout`], [`permute`] (send buffer), exchange, [`RecvLayout`] +
//! [`gather_rows`], [`expert_ffn`], [`gather_rows`] back, exchange, [`unpermute_combine`].

use crate::error::{Result, invalid};
use crate::routing::{
    DispatchLayout, EpTopology, GatingConfig, GroupScore, RecvLayout, ReplicaMap, Scoring, TopK,
};
use crate::tensor::{Bf16Matrix, ExpertWeights, F32Matrix, Matrix};
use half::bf16;

/// Dot product of two fp32 slices with 8 partial sums (fp32).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let n8 = a.len() / 8 * 8;
    for (ca, cb) in a[..n8].chunks_exact(8).zip(b[..n8].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += ca[l] * cb[l];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for i in n8..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// `x [n, K] @ w [m, K]^T` with bf16 inputs and fp32 results.
fn matmul_nt_f32(x: &Bf16Matrix, w: &Bf16Matrix) -> F32Matrix {
    let xf = x.to_f32();
    let wf = w.to_f32();
    let (n, m) = (x.rows(), w.rows());
    let mut out = Matrix::zeros(n, m);
    for r in 0..n {
        let xr = xf.row(r);
        let o = out.row_mut(r);
        for (c, oc) in o.iter_mut().enumerate() {
            *oc = dot(xr, wf.row(c));
        }
    }
    out
}

/// Router logits `x [T, H] @ w_gate [E, H]^T`, fp32 `[T, E]`.
pub fn router_logits(x: &Bf16Matrix, w_gate: &Bf16Matrix) -> Result<F32Matrix> {
    if x.cols() != w_gate.cols() {
        return invalid(format!(
            "router: x has hidden {}, w_gate has {}",
            x.cols(),
            w_gate.cols()
        ));
    }
    Ok(matmul_nt_f32(x, w_gate))
}

/// Router logits with fp32 router weights (DeepSeek keeps its router in fp32): `x [T, H]`
/// (bf16, widened exactly) `@ w_gate [E, H]^T`, fp32 `[T, E]`. Equals [`router_logits`] for
/// weights that are widened bf16.
pub fn router_logits_f32(x: &Bf16Matrix, w_gate: &F32Matrix) -> Result<F32Matrix> {
    if x.cols() != w_gate.cols() {
        return invalid(format!(
            "router: x has hidden {}, w_gate has {}",
            x.cols(),
            w_gate.cols()
        ));
    }
    let xf = x.to_f32();
    let (n, m) = (x.rows(), w_gate.rows());
    let mut out = Matrix::zeros(n, m);
    for r in 0..n {
        let xr = xf.row(r);
        for (c, oc) in out.row_mut(r).iter_mut().enumerate() {
            *oc = dot(xr, w_gate.row(c));
        }
    }
    Ok(out)
}

/// `a` ranks before `b` (larger value first, ties to the lower index). NaN ranks last.
#[inline]
fn better(va: f32, ia: usize, vb: f32, ib: usize) -> bool {
    let (va, vb) = (
        if va.is_nan() { f32::NEG_INFINITY } else { va },
        if vb.is_nan() { f32::NEG_INFINITY } else { vb },
    );
    va > vb || (va == vb && ia < ib)
}

/// Gating: scores, optional group limit, top-k, weights (see [`GatingConfig`]).
/// `bias` (`[E]`) is added to the scores for the choice only.
pub fn gating_topk(logits: &F32Matrix, cfg: &GatingConfig, bias: Option<&[f32]>) -> Result<TopK> {
    cfg.validate()?;
    let e = cfg.num_experts;
    if logits.cols() != e {
        return invalid(format!(
            "gating: logits have {} columns, config {e} experts",
            logits.cols()
        ));
    }
    if let Some(b) = bias
        && b.len() != e
    {
        return invalid(format!("gating: bias has {} entries, need {e}", b.len()));
    }
    let t = logits.rows();
    let k = cfg.top_k;
    let mut ids = vec![0u32; t * k];
    let mut weights = vec![0f32; t * k];
    let mut score = vec![0f32; e];
    let mut choice = vec![0f32; e];
    let mut masked = vec![false; e];
    let g = cfg.num_groups;
    let per = e / g;
    let mut gscore = vec![0f32; g];
    let mut gkeep = vec![false; g];
    for tok in 0..t {
        let l = logits.row(tok);
        match cfg.scoring {
            Scoring::Softmax => {
                let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut s = 0f32;
                for (sc, &v) in score.iter_mut().zip(l) {
                    *sc = (v - m).exp();
                    s += *sc;
                }
                for sc in score.iter_mut() {
                    *sc /= s;
                }
            }
            Scoring::Sigmoid => {
                for (sc, &v) in score.iter_mut().zip(l) {
                    *sc = 1.0 / (1.0 + (-v).exp());
                }
            }
            // Weights come from the chosen logits below.
            Scoring::SoftmaxTopK => score.copy_from_slice(l),
        }
        for i in 0..e {
            choice[i] = match (bias, cfg.scoring) {
                (Some(b), _) => score[i] + b[i],
                (None, Scoring::Softmax | Scoring::SoftmaxTopK) => l[i],
                (None, Scoring::Sigmoid) => score[i],
            };
            masked[i] = false;
        }
        if g > 1 {
            for (gi, gs) in gscore.iter_mut().enumerate() {
                let grp = &choice[gi * per..(gi + 1) * per];
                // Two largest values of the group (first and second best by the rank order).
                let mut b1 = 0usize;
                for i in 1..per {
                    if better(grp[i], i, grp[b1], b1) {
                        b1 = i;
                    }
                }
                *gs = if per == 1 || cfg.group_score == GroupScore::Max {
                    grp[b1]
                } else {
                    let mut b2 = usize::MAX;
                    for i in 0..per {
                        if i != b1 && (b2 == usize::MAX || better(grp[i], i, grp[b2], b2)) {
                            b2 = i;
                        }
                    }
                    grp[b1] + grp[b2]
                };
                gkeep[gi] = false;
            }
            for _ in 0..cfg.topk_groups {
                let mut best = usize::MAX;
                for gi in 0..g {
                    if !gkeep[gi]
                        && (best == usize::MAX || better(gscore[gi], gi, gscore[best], best))
                    {
                        best = gi;
                    }
                }
                gkeep[best] = true;
            }
            for i in 0..e {
                masked[i] = !gkeep[i / per];
            }
        }
        let mut wsum = 0f32;
        for j in 0..k {
            let mut best = usize::MAX;
            for i in 0..e {
                if !masked[i] && (best == usize::MAX || better(choice[i], i, choice[best], best)) {
                    best = i;
                }
            }
            masked[best] = true;
            ids[tok * k + j] = best as u32;
            weights[tok * k + j] = score[best];
            wsum += score[best];
        }
        let w = &mut weights[tok * k..(tok + 1) * k];
        if cfg.scoring == Scoring::SoftmaxTopK {
            let m = w.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut z = 0f32;
            for x in w.iter_mut() {
                *x = (*x - m).exp();
                z += *x;
            }
            for x in w.iter_mut() {
                *x /= z;
            }
        }
        if cfg.renormalize {
            let d = wsum + 1e-20;
            for x in w.iter_mut() {
                *x /= d;
            }
        }
        if cfg.routed_scaling_factor != 1.0 {
            for x in w.iter_mut() {
                *x *= cfg.routed_scaling_factor;
            }
        }
    }
    Ok(TopK {
        tokens: t,
        k,
        ids,
        weights,
    })
}

/// Logical-to-physical replica choice fused with load recording: for each (token t, j),
/// `phys = map.choose(token_base + t, ids[t*k+j])`, and `load[phys] += 1`.
/// `load` has `map.num_physical()` counters (this layer's per-slot statistics).
/// Returns `[T * k]` physical slot ids.
pub fn map_to_physical(
    topk: &TopK,
    map: &ReplicaMap,
    token_base: u32,
    load: &mut [u32],
) -> Result<Vec<u32>> {
    if load.len() != map.num_physical() {
        return invalid(format!(
            "map: {} load counters for {} physical slots",
            load.len(),
            map.num_physical()
        ));
    }
    if topk.ids.len() != topk.tokens * topk.k {
        return invalid("map: top-k ids do not match tokens * k");
    }
    let mut phys = Vec::with_capacity(topk.ids.len());
    for (f, &e) in topk.ids.iter().enumerate() {
        let t = (f / topk.k) as u32;
        let p = map
            .choose(token_base.wrapping_add(t), e)
            .ok_or_else(|| crate::KernelError::Invalid(format!("map: expert {e} out of range")))?;
        load[p as usize] = load[p as usize].wrapping_add(1);
        phys.push(p);
    }
    Ok(phys)
}

/// Dispatch layout of a batch from its `[T * k]` physical slot ids (see [`DispatchLayout`]).
pub fn dispatch_layout(phys: &[u32], k: usize, topo: EpTopology) -> Result<DispatchLayout> {
    if k == 0 || !phys.len().is_multiple_of(k) {
        return invalid(format!(
            "layout: {} ids are not a multiple of k = {k}",
            phys.len()
        ));
    }
    if phys.len() > u32::MAX as usize {
        return invalid("layout: too many rows");
    }
    let ns = topo.num_slots();
    let t = phys.len() / k;
    let mut rows_per_slot = vec![0u32; ns];
    for &p in phys {
        if p as usize >= ns {
            return invalid(format!("layout: slot {p} >= {ns} slots"));
        }
        rows_per_slot[p as usize] += 1;
    }
    let mut slot_offsets = vec![0u32; ns + 1];
    for s in 0..ns {
        slot_offsets[s + 1] = slot_offsets[s] + rows_per_slot[s];
    }
    let g = topo.num_ranks;
    let rows_per_rank: Vec<u32> = (0..g)
        .map(|r| {
            slot_offsets[(r + 1) * topo.slots_per_rank] - slot_offsets[r * topo.slots_per_rank]
        })
        .collect();
    let mut tokens_per_rank = vec![0u32; g];
    let mut seen = vec![usize::MAX; g];
    for tok in 0..t {
        for &p in &phys[tok * k..(tok + 1) * k] {
            let r = topo.rank_of(p as usize);
            if seen[r] != tok {
                seen[r] = tok;
                tokens_per_rank[r] += 1;
            }
        }
    }
    let mut next = slot_offsets.clone();
    let mut perm = vec![0u32; phys.len()];
    let mut inv = vec![0u32; phys.len()];
    for (f, &p) in phys.iter().enumerate() {
        let row = next[p as usize];
        next[p as usize] += 1;
        perm[row as usize] = f as u32;
        inv[f] = row;
    }
    Ok(DispatchLayout {
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

/// Row gather: `out[i] = x[idx[i]]`.
pub fn gather_rows<T: Copy + Default>(x: &Matrix<T>, idx: &[u32]) -> Result<Matrix<T>> {
    let h = x.cols();
    let mut out = Matrix::zeros(idx.len(), h);
    for (i, &s) in idx.iter().enumerate() {
        if s as usize >= x.rows() {
            return invalid(format!("gather: row {s} >= {}", x.rows()));
        }
        out.row_mut(i).copy_from_slice(x.row(s as usize));
    }
    Ok(out)
}

/// Permute: the send buffer, `out[row] = x[perm[row] / k]` (`[T*k, H]`).
pub fn permute(x: &Bf16Matrix, layout: &DispatchLayout) -> Result<Bf16Matrix> {
    if x.rows() != layout.tokens {
        return invalid(format!(
            "permute: x has {} rows, layout {} tokens",
            x.rows(),
            layout.tokens
        ));
    }
    let src: Vec<u32> = layout.perm.iter().map(|&f| f / layout.k as u32).collect();
    gather_rows(x, &src)
}

/// Unpermute + weighted combine: `out[t] = bf16(sum_j w[t*k+j] * y[inv[t*k+j]])`, an fp32
/// fused multiply-add chain over `j` in order. `y` holds the expert outputs in send-row
/// order (`[T*k, H]`), `weights` the routing weights (`[T*k]`).
pub fn unpermute_combine(
    y: &Bf16Matrix,
    layout: &DispatchLayout,
    weights: &[f32],
) -> Result<Bf16Matrix> {
    let acc = unpermute_combine_f32(y, layout, weights)?;
    Matrix::from_f32(acc.rows(), acc.cols(), acc.as_slice())
}

/// [`unpermute_combine`] before the final rounding: the fp32 sums, so a caller can add more
/// terms (shared experts) and round once.
pub fn unpermute_combine_f32(
    y: &Bf16Matrix,
    layout: &DispatchLayout,
    weights: &[f32],
) -> Result<F32Matrix> {
    let (t, k) = (layout.tokens, layout.k);
    if y.rows() != t * k || weights.len() != t * k {
        return invalid(format!(
            "combine: y has {} rows, weights {}, need T*k = {}",
            y.rows(),
            weights.len(),
            t * k
        ));
    }
    let h = y.cols();
    let mut out: F32Matrix = Matrix::zeros(t, h);
    for tok in 0..t {
        let acc = out.row_mut(tok);
        for j in 0..k {
            let f = tok * k + j;
            let w = weights[f];
            let yr = y.row(layout.inv[f] as usize);
            for (a, v) in acc.iter_mut().zip(yr) {
                *a = w.mul_add(v.to_f32(), *a);
            }
        }
    }
    Ok(out)
}

/// `silu(g) = g / (1 + exp(-g))` in fp32.
#[inline]
pub fn silu(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

/// Fused SiLU-and-multiply: `gate_up [n, 2I]` (gate columns first) -> `h [n, I]`,
/// `h = bf16(silu(gate) * up)`.
pub fn silu_and_mul(gate_up: &Bf16Matrix) -> Result<Bf16Matrix> {
    if !gate_up.cols().is_multiple_of(2) {
        return invalid("silu_and_mul: odd number of columns");
    }
    let i = gate_up.cols() / 2;
    let mut out = Matrix::zeros(gate_up.rows(), i);
    for r in 0..gate_up.rows() {
        let src = gate_up.row(r);
        for (c, o) in out.row_mut(r).iter_mut().enumerate() {
            *o = bf16::from_f32(silu(src[c].to_f32()) * src[i + c].to_f32());
        }
    }
    Ok(out)
}

/// `x [n, K] @ w [m, K]^T` rounded to bf16.
pub fn matmul_nt_bf16(x: &Bf16Matrix, w: &Bf16Matrix) -> Result<Bf16Matrix> {
    if x.cols() != w.cols() {
        return invalid(format!("matmul: inner sizes {} and {}", x.cols(), w.cols()));
    }
    let f = matmul_nt_f32(x, w);
    Matrix::from_f32(f.rows(), f.cols(), f.as_slice())
}

/// The gated activation of the expert MLPs.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Activation {
    /// `silu(gate) * up` (SwiGLU).
    #[default]
    SiluMul,
    /// gpt-oss: `gate = min(gate, limit)`, `up = clamp(up, -limit, limit)`,
    /// `(up + 1) * gate * sigmoid(alpha * gate)`.
    ClampedSwiglu { alpha: f32, limit: f32 },
}

/// `x [n, K] @ w [m, K]^T (+ b)` rounded to bf16.
fn linear_bf16(x: &Bf16Matrix, w: &Bf16Matrix, b: Option<&[f32]>) -> Result<Bf16Matrix> {
    if x.cols() != w.cols() {
        return invalid(format!("matmul: inner sizes {} and {}", x.cols(), w.cols()));
    }
    let mut f = matmul_nt_f32(x, w);
    if let Some(b) = b {
        for r in 0..f.rows() {
            f.row_mut(r).iter_mut().zip(b).for_each(|(v, b)| *v += b);
        }
    }
    Matrix::from_f32(f.rows(), f.cols(), f.as_slice())
}

/// The gated activation: `gate_up [n, 2I]` (gate columns first) -> `h [n, I]` in bf16.
pub fn gated_activation(gate_up: &Bf16Matrix, act: Activation) -> Result<Bf16Matrix> {
    let (alpha, limit) = match act {
        Activation::SiluMul => return silu_and_mul(gate_up),
        Activation::ClampedSwiglu { alpha, limit } => (alpha, limit),
    };
    if !gate_up.cols().is_multiple_of(2) {
        return invalid("gated activation: odd number of columns");
    }
    let i = gate_up.cols() / 2;
    let mut out = Matrix::zeros(gate_up.rows(), i);
    for r in 0..gate_up.rows() {
        let src = gate_up.row(r);
        for (c, o) in out.row_mut(r).iter_mut().enumerate() {
            let g = src[c].to_f32().min(limit);
            let u = src[i + c].to_f32().clamp(-limit, limit);
            *o = bf16::from_f32((u + 1.0) * g / (1.0 + (-alpha * g).exp()));
        }
    }
    Ok(out)
}

/// SwiGLU FFN of one expert on all rows of `x` (`[n, H]` -> `[n, H]`).
pub fn expert_ffn_one(x: &Bf16Matrix, w: &ExpertWeights) -> Result<Bf16Matrix> {
    expert_ffn_one_act(x, w, Activation::SiluMul)
}

/// One expert's gated FFN with the given activation, adding the expert's biases when it has
/// them (gate_up and the output are rounded to bf16, as the SwiGLU path).
pub fn expert_ffn_one_act(
    x: &Bf16Matrix,
    w: &ExpertWeights,
    act: Activation,
) -> Result<Bf16Matrix> {
    let b = w.bias.as_ref();
    let gate_up = linear_bf16(x, &w.w1, b.map(|b| &b.b1[..]))?;
    let h = gated_activation(&gate_up, act)?;
    linear_bf16(&h, &w.w2, b.map(|b| &b.b2[..]))
}

/// Expert FFN over rows grouped by expert: rows `offsets[e]..offsets[e+1]` of `x` go through
/// `experts[e]` (`offsets` has `experts.len() + 1` entries, non-decreasing, last = rows).
pub fn expert_ffn(
    x: &Bf16Matrix,
    offsets: &[u32],
    experts: &[&ExpertWeights],
) -> Result<Bf16Matrix> {
    expert_ffn_act(x, offsets, experts, Activation::SiluMul)
}

/// [`expert_ffn`] with another gated activation.
pub fn expert_ffn_act(
    x: &Bf16Matrix,
    offsets: &[u32],
    experts: &[&ExpertWeights],
    act: Activation,
) -> Result<Bf16Matrix> {
    if offsets.len() != experts.len() + 1 || offsets.last().copied() != Some(x.rows() as u32) {
        return invalid(format!(
            "ffn: {} offsets for {} experts and {} rows",
            offsets.len(),
            experts.len(),
            x.rows()
        ));
    }
    if offsets[0] != 0 || offsets.windows(2).any(|w| w[0] > w[1]) {
        return invalid("ffn: offsets must start at 0 and not decrease");
    }
    let h = x.cols();
    let mut out = Matrix::zeros(x.rows(), h);
    for (e, w) in experts.iter().enumerate() {
        let (a, b) = (offsets[e] as usize, offsets[e + 1] as usize);
        if w.hidden() != h {
            return invalid(format!(
                "ffn: expert {e} has hidden {}, x has {h}",
                w.hidden()
            ));
        }
        if a == b {
            continue;
        }
        let xe = Matrix::from_vec(b - a, h, x.rows_slice(a, b).to_vec())?;
        let ye = expert_ffn_one_act(&xe, w, act)?;
        out.as_mut_slice()[a * h..b * h].copy_from_slice(ye.as_slice());
    }
    Ok(out)
}

/// Everything that defines one MoE layer's routing and experts, for [`moe_layer`].
#[derive(Debug, Clone, Copy)]
pub struct MoeLayerRef<'a> {
    /// Router weight `[E, H]`.
    pub w_gate: &'a Bf16Matrix,
    /// Gating configuration.
    pub gating: &'a GatingConfig,
    /// Optional score-correction bias `[E]`.
    pub bias: Option<&'a [f32]>,
    /// Logical-to-physical map.
    pub map: &'a ReplicaMap,
    /// Topology (`topo.num_slots() == map.num_physical()`).
    pub topo: EpTopology,
    /// Weights of every physical slot (`[G * S]`, slot-ordered).
    pub experts: &'a [ExpertWeights],
}

/// Intermediate results of [`moe_layer`] (for tests and diagnostics).
#[derive(Debug, Clone)]
pub struct MoeLayerOutput {
    /// `[T, H]` layer output.
    pub out: Bf16Matrix,
    /// Gating result.
    pub topk: TopK,
    /// `[T * k]` physical slots chosen.
    pub phys: Vec<u32>,
    /// Dispatch layout.
    pub layout: DispatchLayout,
}

/// The whole expert-parallel MoE layer in one process (the single-process reference):
/// router, gating, replica choice with load counting (`load`, `[G * S]`), layout, permute,
/// every slot's FFN, unpermute + combine. Token `t` uses hash index `token_base + t`.
pub fn moe_layer(
    x: &Bf16Matrix,
    layer: &MoeLayerRef<'_>,
    token_base: u32,
    load: &mut [u32],
) -> Result<MoeLayerOutput> {
    if layer.topo.num_slots() != layer.map.num_physical()
        || layer.experts.len() != layer.map.num_physical()
    {
        return invalid(format!(
            "layer: topology has {} slots, map {}, weights {}",
            layer.topo.num_slots(),
            layer.map.num_physical(),
            layer.experts.len()
        ));
    }
    if layer.map.num_logical() != layer.gating.num_experts {
        return invalid("layer: map and gating disagree on the number of experts");
    }
    let logits = router_logits(x, layer.w_gate)?;
    let topk = gating_topk(&logits, layer.gating, layer.bias)?;
    let phys = map_to_physical(&topk, layer.map, token_base, load)?;
    let layout = dispatch_layout(&phys, topk.k, layer.topo)?;
    let send = permute(x, &layout)?;
    // Rows are grouped by slot, so the send buffer is already expert-major over all slots.
    let refs: Vec<&ExpertWeights> = layer.experts.iter().collect();
    let y = expert_ffn(&send, &layout.slot_offsets, &refs)?;
    let out = unpermute_combine(&y, &layout, &topk.weights)?;
    Ok(MoeLayerOutput {
        out,
        topk,
        phys,
        layout,
    })
}

/// Receive-side helper for a worker: builds the [`RecvLayout`] from the `[G x S]` counts it
/// received and reorders the received rows expert-major (FFN input).
pub fn regroup_received(recv: &Bf16Matrix, layout: &RecvLayout) -> Result<Bf16Matrix> {
    if recv.rows() != layout.rows() {
        return invalid(format!(
            "regroup: {} rows received, layout has {}",
            recv.rows(),
            layout.rows()
        ));
    }
    gather_rows(recv, &layout.expert_major_to_recv)
}

/// Inverse of [`regroup_received`]: FFN outputs (expert-major) back to receive order, ready
/// to be sent back for the combine.
pub fn ungroup_outputs(y: &Bf16Matrix, layout: &RecvLayout) -> Result<Bf16Matrix> {
    if y.rows() != layout.rows() {
        return invalid(format!(
            "ungroup: {} rows, layout has {}",
            y.rows(),
            layout.rows()
        ));
    }
    gather_rows(y, &layout.recv_to_expert_major)
}

/// The expert-parallel layer as G ranks would run it, in one process, with the all-to-all
/// done by copying rows: each rank routes its own tokens (`xs[r]`, hash indices from
/// `token_bases[r]`, load counted into `loads[r]`), sends rows to the ranks holding the
/// chosen slots, runs its `S` local experts (`layer.experts[r*S..(r+1)*S]`) on the rows it
/// received, sends the outputs back, and combines. This is the reference for a worker's
/// multi-rank CPU backend (the exchange is the only part a worker replaces) and gives the
/// same result as [`moe_layer`] on the concatenated tokens.
pub fn moe_layer_multi_rank(
    xs: &[Bf16Matrix],
    layer: &MoeLayerRef<'_>,
    token_bases: &[u32],
    loads: &mut [Vec<u32>],
) -> Result<Vec<Bf16Matrix>> {
    let (g, s) = (layer.topo.num_ranks, layer.topo.slots_per_rank);
    if xs.len() != g || token_bases.len() != g || loads.len() != g || layer.experts.len() != g * s {
        return invalid(
            "multi-rank: need one x, token base and load vector per rank and G*S experts",
        );
    }
    let h = layer.w_gate.cols();
    // 1. per rank: routing and send buffers
    let mut routed = Vec::with_capacity(g);
    for r in 0..g {
        let logits = router_logits(&xs[r], layer.w_gate)?;
        let topk = gating_topk(&logits, layer.gating, layer.bias)?;
        let phys = map_to_physical(&topk, layer.map, token_bases[r], &mut loads[r])?;
        let layout = dispatch_layout(&phys, topk.k, layer.topo)?;
        let send = permute(&xs[r], &layout)?;
        routed.push((topk, layout, send));
    }
    // 2. "all-to-all": rank d receives from each source s its rows for d, in source order;
    //    counts[s][e] = rows from s for d's local expert e.
    let mut outputs_back: Vec<Vec<Bf16Matrix>> = vec![Vec::new(); g]; // [src][dst] -> rows
    for d in 0..g {
        let mut counts = Vec::with_capacity(g * s);
        let mut recv_data = Vec::new();
        for (_, layout, send) in &routed {
            counts.extend_from_slice(&layout.rows_per_slot[d * s..(d + 1) * s]);
            let (a, b) = (
                layout.slot_offsets[d * s] as usize,
                layout.slot_offsets[(d + 1) * s] as usize,
            );
            recv_data.extend_from_slice(send.rows_slice(a, b));
        }
        let rl = RecvLayout::new(g, s, &counts)?;
        let recv = Matrix::from_vec(rl.rows(), h, recv_data)?;
        let grouped = regroup_received(&recv, &rl)?;
        let local: Vec<&ExpertWeights> = layer.experts[d * s..(d + 1) * s].iter().collect();
        let y = expert_ffn(&grouped, &rl.expert_offsets, &local)?;
        let y_recv = ungroup_outputs(&y, &rl)?;
        // 3. "all-to-all" back: the rows from source `src` go back to it
        for (src, back) in outputs_back.iter_mut().enumerate() {
            let (a, b) = (
                rl.src_offsets[src] as usize,
                rl.src_offsets[src + 1] as usize,
            );
            back.push(Matrix::from_vec(
                b - a,
                h,
                y_recv.rows_slice(a, b).to_vec(),
            )?);
        }
    }
    // 4. per rank: the returned rows are in send order (destination-major); combine
    let mut outs = Vec::with_capacity(g);
    for (r, (topk, layout, _)) in routed.iter().enumerate() {
        let mut data = Vec::with_capacity(topk.tokens * topk.k * h);
        for part in &outputs_back[r] {
            data.extend_from_slice(part.as_slice());
        }
        let y_send = Matrix::from_vec(topk.tokens * topk.k, h, data)?;
        outs.push(unpermute_combine(&y_send, layout, &topk.weights)?);
    }
    Ok(outs)
}
