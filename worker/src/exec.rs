//! Executors of the MoE layer stack: the CPU backend (the kernels' CPU references, rows
//! exchanged over the TCP comm) and the switch of a layer's weights and maps.

use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use half::bf16;
use moe_api::PlacementDocument;
use moe_kernels::cpu;
use moe_kernels::{Bf16Matrix, EpTopology, F32Matrix, GatingConfig, Matrix, RecvLayout, TopK};

use crate::comm::{CHAN_STEP, Comm};
use crate::config::ModelShape;
use crate::model::{activation, gating_config};
use crate::placement::{LayerMap, LayerPlan};
use crate::staging::{HostStaging, StageStats, StagedSlot, send_slots};
use crate::traffic::Batch;
use crate::weights::{ExpertWeights, SharedExpert, WeightStore};
use moe_kernels::cpu::Activation;

/// What the engine needs from a backend.
///
/// A remap layer goes through `begin_staging` (at an agreed step boundary, the same one on
/// every rank), `staging_finished` (polled at each boundary; the group switches once every
/// rank says yes) and `commit` (at the agreed boundary: weights and maps switch together).
/// One layer is staged at a time.
pub trait Exec: Send {
    fn backend(&self) -> &'static str;
    /// One forward pass of this rank's batch through every layer; returns the outputs (empty
    /// unless `want_output`) and the per-layer slot counts of this rank's tokens.
    fn forward(
        &mut self,
        comm: &Comm,
        batch: &Batch,
        step: u64,
        want_output: bool,
    ) -> Result<(Vec<bf16>, Vec<Vec<u32>>)>;
    /// Starts moving the weights this rank's slots of `layer` need under `plan`, while forward
    /// passes continue with the current weights. Every rank calls it at the same boundary.
    fn begin_staging(&mut self, comm: &Arc<Comm>, layer: usize, plan: &LayerPlan) -> Result<()>;
    /// Whether this rank's staging has finished (without blocking, unless `wait`).
    fn staging_finished(&mut self, wait: bool) -> Result<bool>;
    /// Switches `layer` to `map` and the staged weights, together; what was moved.
    fn commit(&mut self, layer: usize, map: &LayerMap) -> Result<StageStats>;
    /// One MoE layer on this rank's rows `x` (`[T, H]`) across the whole group, returning the
    /// block output without the residual (see [`CpuExec::moe_layer`]); the per-slot counts of
    /// this rank's rows are added to `counts`. Collective: every rank calls it for the same
    /// layer at the same point.
    fn moe_layer(
        &mut self,
        comm: &Comm,
        layer: usize,
        x: &Bf16Matrix,
        token_base: u32,
        counts: &mut [u32],
    ) -> Result<Bf16Matrix>;
    /// [`Exec::moe_layer`] where some rows carry routing chosen by the caller (the forward
    /// API's flag bit 0): row `t` uses `given.ids/weights[t*k..(t+1)*k]` as they are when
    /// `given.rows[t]`, the router's choice otherwise. Collective like `moe_layer`.
    fn moe_layer_routed(
        &mut self,
        _comm: &Comm,
        layer: usize,
        _x: &Bf16Matrix,
        _given: &GivenRouting,
        _token_base: u32,
        _counts: &mut [u32],
    ) -> Result<Bf16Matrix> {
        bail!("MoE layer {layer}: routing supplied by the caller is served by the cpu backend only")
    }
}

/// Routing supplied by callers for some rows of one per-layer call (see
/// [`Exec::moe_layer_routed`]): `ids` and `weights` are `[T, k]`, meaningful where `rows[t]`.
#[derive(Debug, Clone, Default)]
pub struct GivenRouting {
    pub rows: Vec<bool>,
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

/// Top-k of one layer: the router's (logits plus the router bias when the model has one; the
/// correction bias for the choice) or, when a
/// trace forces them, the given ids (`[T * k]`) with weights `1/k`.
pub fn topk_of(
    x: &Bf16Matrix,
    router: &F32Matrix,
    router_bias: Option<&[f32]>,
    bias: Option<&[f32]>,
    forced: Option<&[u32]>,
    gating: &GatingConfig,
) -> Result<TopK> {
    let t = x.rows();
    let k = gating.top_k;
    Ok(match forced {
        Some(ids) => TopK {
            tokens: t,
            k,
            ids: ids.to_vec(),
            weights: vec![1.0 / k as f32; t * k],
        },
        None => {
            let mut logits = cpu::router_logits_f32(x, router)?;
            if let Some(b) = router_bias {
                for r in 0..logits.rows() {
                    logits
                        .row_mut(r)
                        .iter_mut()
                        .zip(b)
                        .for_each(|(v, b)| *v += b);
                }
            }
            cpu::gating_topk(&logits, gating, bias)?
        }
    })
}

/// The block output: the routed experts' fp32 sum plus the shared experts (Qwen2-MoE: times
/// `sigmoid(shared_expert_gate · x)`), rounded to bf16 once.
pub fn add_shared(
    mut routed: F32Matrix,
    x: &Bf16Matrix,
    shared: Option<&SharedExpert>,
) -> Result<Bf16Matrix> {
    if let Some(s) = shared
        && x.rows() > 0
    {
        let y = cpu::expert_ffn_one(x, &s.mlp)?;
        for t in 0..x.rows() {
            let g = match &s.gate {
                Some(w) => {
                    let z: f32 = x.row(t).iter().zip(w).map(|(a, b)| a.to_f32() * b).sum();
                    1.0 / (1.0 + (-z).exp())
                }
                None => 1.0,
            };
            for (acc, v) in routed.row_mut(t).iter_mut().zip(y.row(t)) {
                *acc = g.mul_add(v.to_f32(), *acc);
            }
        }
    }
    Ok(Matrix::from_f32(
        routed.rows(),
        routed.cols(),
        routed.as_slice(),
    )?)
}

/// `x = bf16(x + moe_out)`: the residual connection around each MoE layer.
pub fn add_residual(x: &mut [bf16], out: &Bf16Matrix) {
    for (a, b) in x.iter_mut().zip(out.as_slice()) {
        *a = bf16::from_f32(a.to_f32() + b.to_f32());
    }
}

pub fn encode_rows(out: &mut Vec<u8>, rows: &[bf16]) {
    for v in rows {
        out.extend_from_slice(&v.to_bits().to_le_bytes());
    }
}

pub fn decode_rows(bytes: &[u8]) -> Vec<bf16> {
    bytes
        .chunks_exact(2)
        .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
        .collect()
}

/// One MoE layer as the CPU backend serves it.
pub struct CpuLayer {
    pub map: LayerMap,
    /// Weights of this rank's slots (`slots_per_rank` entries).
    pub experts: Vec<Arc<ExpertWeights>>,
    /// Router `[E, H]` (fp32 as stored; bf16 routers widen exactly).
    pub router: F32Matrix,
    /// gpt-oss's router bias (added to the logits).
    pub router_bias: Option<Vec<f32>>,
    /// DeepSeek-V3's correction bias (choice only).
    pub bias: Option<Vec<f32>>,
    /// Shared experts (every rank holds them).
    pub shared: Option<SharedExpert>,
}

/// The CPU backend.
pub struct CpuExec {
    pub shape: ModelShape,
    pub gating: GatingConfig,
    /// The experts' gated activation.
    pub act: Activation,
    pub rank: usize,
    pub world: usize,
    pub layers: Vec<CpuLayer>,
    staging: Option<HostStaging>,
}

impl CpuExec {
    /// Loads the routers and this rank's slots of every layer.
    pub fn load(
        store: &WeightStore,
        placement: &PlacementDocument,
        shape: &ModelShape,
        rank: usize,
    ) -> Result<CpuExec> {
        let spr = shape.slots_per_rank();
        let layers = (0..shape.num_layers)
            .map(|l| {
                let row = &placement.phy2log[l];
                let mine = &row[rank * spr..(rank + 1) * spr];
                Ok(CpuLayer {
                    map: LayerMap::new(row.clone(), shape.num_experts).map_err(|e| anyhow!(e))?,
                    experts: store
                        .load_slots(l, mine)
                        .with_context(|| format!("loading the experts of layer {l}"))?,
                    router: store
                        .router_f32(l)
                        .with_context(|| format!("loading the router of layer {l}"))?,
                    router_bias: store
                        .router_bias(l)
                        .with_context(|| format!("loading the router bias of layer {l}"))?,
                    bias: store
                        .correction_bias(l)
                        .with_context(|| format!("loading the correction bias of layer {l}"))?,
                    shared: store
                        .shared(l)
                        .with_context(|| format!("loading the shared experts of layer {l}"))?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(CpuExec {
            shape: *shape,
            gating: gating_config(store.model()),
            act: activation(store.model()),
            rank,
            world: shape.world_size,
            layers,
            staging: None,
        })
    }

    /// One MoE layer on this rank's rows across the whole group: router and gating (or the
    /// `forced` ids, `[T * k]`), replica choice by token hash `token_base + t` with per-slot
    /// load counting into `counts` (`[slots]`), dispatch layout and permute, all-to-all of rows
    /// plus per-slot counts, regroup by local expert, the local slots' SwiGLU FFN, back to
    /// receive order, all-to-all back, unpermute and weighted combine, plus the shared experts.
    /// Returns the block output `[T, H]` without the residual.
    ///
    /// Collective: every rank of the group calls it for the same layer at the same point (a
    /// rank without rows passes a `0 x H` matrix), since the two all-to-alls pair up.
    pub fn moe_layer(
        &self,
        comm: &Comm,
        l: usize,
        xm: &Bf16Matrix,
        forced: Option<&[u32]>,
        token_base: u32,
        counts: &mut [u32],
    ) -> Result<Bf16Matrix> {
        let topk = self.route(l, xm, forced)?;
        self.moe_layer_topk(comm, l, xm, &topk, token_base, counts)
    }

    /// The top-k of `xm` at layer `l`: the router's, or the `forced` ids with weights `1/k`.
    pub fn route(&self, l: usize, xm: &Bf16Matrix, forced: Option<&[u32]>) -> Result<TopK> {
        let layer = self.layer(l, xm)?;
        topk_of(
            xm,
            &layer.router,
            layer.router_bias.as_deref(),
            layer.bias.as_deref(),
            forced,
            &self.gating,
        )
    }

    fn layer(&self, l: usize, xm: &Bf16Matrix) -> Result<&CpuLayer> {
        let h = self.shape.hidden;
        if xm.cols() != h {
            bail!(
                "layer {l}: rows of {} values, the model's hidden size is {h}",
                xm.cols()
            );
        }
        self.layers
            .get(l)
            .ok_or_else(|| anyhow!("no MoE layer {l} (the model has {})", self.layers.len()))
    }

    /// [`CpuExec::moe_layer`] with the top-k decided: dispatch, experts, combine, shared experts.
    pub fn moe_layer_topk(
        &self,
        comm: &Comm,
        l: usize,
        xm: &Bf16Matrix,
        topk: &TopK,
        token_base: u32,
        counts: &mut [u32],
    ) -> Result<Bf16Matrix> {
        let h = self.shape.hidden;
        let k = self.shape.top_k;
        let s = self.shape.slots_per_rank();
        let g = self.world;
        let t = xm.rows();
        let layer = self.layer(l, xm)?;
        if topk.tokens != t || topk.k != k || topk.ids.len() != t * k || topk.weights.len() != t * k
        {
            bail!(
                "layer {l}: routing of {} x {} for {t} rows of top-{k}",
                topk.tokens,
                topk.k
            );
        }
        if let Some(bad) = topk
            .ids
            .iter()
            .find(|&&e| e as usize >= self.shape.num_experts)
        {
            bail!("layer {l}: expert id {bad} out of range");
        }
        let topo = EpTopology::new(g, s)?;
        let row_bytes = 2 * h;
        let phys = cpu::map_to_physical(topk, &layer.map.replicas, token_base, counts)?;
        let layout = cpu::dispatch_layout(&phys, k, topo)?;
        let send_rows = cpu::permute(xm, &layout)?;
        let offs = layout.rank_offsets();
        let send: Vec<Vec<u8>> = (0..g)
            .map(|r| {
                let (a, b) = (offs[r] as usize, offs[r + 1] as usize);
                let mut buf = Vec::with_capacity(4 * s + (b - a) * row_bytes);
                for c in &layout.rows_per_slot[r * s..(r + 1) * s] {
                    buf.extend_from_slice(&c.to_le_bytes());
                }
                encode_rows(&mut buf, send_rows.rows_slice(a, b));
                buf
            })
            .collect();
        let recv = comm
            .all_to_all(CHAN_STEP, send)
            .context("dispatch all-to-all")?;
        let mut slot_counts = Vec::with_capacity(g * s);
        let mut rows = Vec::new();
        for (src, buf) in recv.iter().enumerate() {
            if buf.len() < 4 * s || !(buf.len() - 4 * s).is_multiple_of(row_bytes) {
                bail!("malformed dispatch from rank {src}");
            }
            let n0 = slot_counts.len();
            for c in buf[..4 * s].chunks_exact(4) {
                slot_counts.push(u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            }
            let n: u32 = slot_counts[n0..].iter().sum();
            if n as usize * row_bytes != buf.len() - 4 * s {
                bail!("rank {src} sent counts that do not match its rows");
            }
            rows.extend(decode_rows(&buf[4 * s..]));
        }
        let recv_rows = Matrix::from_vec(rows.len() / h, h, rows)?;
        let rl = RecvLayout::new(g, s, &slot_counts)?;
        let xin = cpu::regroup_received(&recv_rows, &rl)?;
        let refs: Vec<&ExpertWeights> = layer.experts.iter().map(Arc::as_ref).collect();
        let y = cpu::expert_ffn_act(&xin, &rl.expert_offsets, &refs, self.act)?;
        let y = cpu::ungroup_outputs(&y, &rl)?;
        let back: Vec<Vec<u8>> = (0..g)
            .map(|src| {
                let (a, b) = (
                    rl.src_offsets[src] as usize,
                    rl.src_offsets[src + 1] as usize,
                );
                let mut buf = Vec::with_capacity((b - a) * row_bytes);
                encode_rows(&mut buf, y.rows_slice(a, b));
                buf
            })
            .collect();
        let got = comm
            .all_to_all(CHAN_STEP, back)
            .context("combine all-to-all")?;
        let mut ys = Vec::with_capacity(t * k * h);
        for (r, buf) in got.iter().enumerate() {
            if buf.len() != (offs[r + 1] - offs[r]) as usize * row_bytes {
                bail!(
                    "rank {r} returned {} bytes of expert outputs, expected {}",
                    buf.len(),
                    (offs[r + 1] - offs[r]) as usize * row_bytes
                );
            }
            ys.extend(decode_rows(buf));
        }
        let ym = Matrix::from_vec(t * k, h, ys)?;
        let routed = cpu::unpermute_combine_f32(&ym, &layout, &topk.weights)?;
        add_shared(routed, xm, layer.shared.as_ref())
    }
}

impl Exec for CpuExec {
    fn backend(&self) -> &'static str {
        "cpu"
    }

    fn forward(
        &mut self,
        comm: &Comm,
        batch: &Batch,
        step: u64,
        _want_output: bool,
    ) -> Result<(Vec<bf16>, Vec<Vec<u32>>)> {
        let h = self.shape.hidden;
        let k = self.shape.top_k;
        let mut x = batch.x.clone();
        let t = x.len() / h;
        let mut counts = vec![vec![0u32; self.shape.num_slots()]; self.shape.num_layers];
        let token_base = ((step * self.world as u64 + self.rank as u64) * t as u64) as u32;
        for (l, layer_counts) in counts.iter_mut().enumerate() {
            let xm = Matrix::from_vec(t, h, x.clone())?;
            let forced = batch.routing.as_ref().map(|r| &r[l][..]);
            if let Some(ids) = forced
                && ids.len() != t * k
            {
                bail!(
                    "layer {l}: the trace gives {} ids for {t} tokens",
                    ids.len()
                );
            }
            let out = CpuExec::moe_layer(self, comm, l, &xm, forced, token_base, layer_counts)
                .with_context(|| format!("step {step} layer {l}"))?;
            add_residual(&mut x, &out);
        }
        Ok((x, counts))
    }

    fn moe_layer(
        &mut self,
        comm: &Comm,
        layer: usize,
        x: &Bf16Matrix,
        token_base: u32,
        counts: &mut [u32],
    ) -> Result<Bf16Matrix> {
        CpuExec::moe_layer(self, comm, layer, x, None, token_base, counts)
    }

    fn moe_layer_routed(
        &mut self,
        comm: &Comm,
        layer: usize,
        x: &Bf16Matrix,
        given: &GivenRouting,
        token_base: u32,
        counts: &mut [u32],
    ) -> Result<Bf16Matrix> {
        let k = self.shape.top_k;
        let t = x.rows();
        if given.rows.len() != t || given.ids.len() != t * k || given.weights.len() != t * k {
            bail!("layer {layer}: caller routing does not cover {t} rows of top-{k}");
        }
        // The router's choice for every row, then the callers' where they gave one (the
        // router's work on those rows is wasted, but it is small next to the experts').
        let mut topk = self.route(layer, x, None)?;
        for (row, _) in given.rows.iter().enumerate().filter(|(_, g)| **g) {
            let r = row * k..(row + 1) * k;
            topk.ids[r.clone()].copy_from_slice(&given.ids[r.clone()]);
            topk.weights[r.clone()].copy_from_slice(&given.weights[r]);
        }
        self.moe_layer_topk(comm, layer, x, &topk, token_base, counts)
    }

    fn begin_staging(&mut self, comm: &Arc<Comm>, layer: usize, plan: &LayerPlan) -> Result<()> {
        if self.staging.is_some() {
            bail!("layer {layer}: another layer is still being staged");
        }
        let l = self
            .layers
            .get(layer)
            .ok_or_else(|| anyhow!("no layer {layer}"))?;
        // The side thread gets its own references to the weights it sends.
        let sends = send_slots(plan, self.rank, self.shape.slots_per_rank())
            .into_iter()
            .map(|s| {
                l.experts
                    .get(s)
                    .map(|w| (s, w.clone()))
                    .ok_or_else(|| anyhow!("no local slot {s}"))
            })
            .collect::<Result<_>>()?;
        self.staging = Some(HostStaging::start(
            comm.clone(),
            layer,
            plan.clone(),
            sends,
            self.shape,
        )?);
        Ok(())
    }

    fn staging_finished(&mut self, wait: bool) -> Result<bool> {
        match &mut self.staging {
            Some(st) => st.finished(wait),
            None => bail!("no layer is being staged"),
        }
    }

    fn commit(&mut self, layer: usize, map: &LayerMap) -> Result<StageStats> {
        let staged = match self.staging.take() {
            Some(st) if st.layer == layer => st.take()?,
            Some(st) => bail!("layer {layer} committed while layer {} is staged", st.layer),
            None => bail!("layer {layer} committed before it was staged"),
        };
        let l = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| anyhow!("no layer {layer}"))?;
        let old = l.experts.clone();
        let mut experts = Vec::with_capacity(old.len());
        for (i, s) in staged.slots.into_iter().enumerate() {
            experts.push(match s {
                StagedSlot::Keep => old[i].clone(),
                StagedSlot::Local(j) => old
                    .get(j)
                    .cloned()
                    .ok_or_else(|| anyhow!("no local slot {j}"))?,
                StagedSlot::Received(w) => w,
            });
        }
        l.experts = experts;
        l.map = map.clone();
        Ok(staged.stats)
    }
}
