//! The engine: forward passes over the MoE layer stack (through an executor), load recording,
//! and the remap executor (asynchronous layer-by-layer, or stop-the-world).
//!
//! Every step starts with a small all-gather of control records on the control channel. It
//! carries each rank's stop flag, the newest remap generation it holds, and whether its staging
//! of the current remap layer has finished. All ranks decide from the same gathered vector, so
//! they activate a remap, switch a layer (weights and maps together), or stop at the same step
//! boundary, whatever order they reached it in. Staging runs inside the executor (a side thread
//! over the TCP remap channel on the CPU backend, NCCL on the GPU's side stream on CUDA) while
//! forward passes continue with the old placement.

use std::collections::VecDeque;
use std::sync::mpsc;
use std::sync::{Arc, atomic::Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use half::bf16;
use moe_api::{PlacementDocument, RemapMode, RemapRequest, RemapState};
use serde::{Deserialize, Serialize};

use crate::comm::{CHAN_CTRL, Comm};
use crate::config::{ModelShape, TrafficMode};
use crate::exec::{Exec, add_residual, add_shared, topk_of};
use crate::model::{activation, gating_config};
use crate::placement::{LayerMap, LayerPlan, plan_layer};
use crate::state::{Shared, layers_to_move, now_ms, running_progress};
use crate::stats::{LoadHistory, par};
use crate::traffic::{Batch, Prefetch, Traffic};
use crate::weights::{ExpertWeights, WeightStore};
use moe_kernels::cpu;
use moe_kernels::{Bf16Matrix, EpTopology, Matrix, ReplicaMap, TopK};

/// What a test (or a benchmark) can observe of each step.
#[derive(Debug, Clone)]
pub struct StepRecord {
    pub step: u64,
    pub batch: Batch,
    pub output: Vec<bf16>,
    pub layer_generations: Vec<u64>,
    /// Wall time of the forward pass.
    pub duration: Duration,
    /// Time spent waiting for the batch (traffic generation that did not keep ahead).
    pub input_wait: Duration,
    /// When the step finished (intervals between steps include the step boundary: the
    /// agreement collective and any remap work or stall).
    pub finished: Instant,
    /// A remap was running during this step.
    pub remap_running: bool,
}

mod serve;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Ctrl {
    /// Forward API: rows this rank has queued, `(MoE layer, rows)` for layers with any. Every
    /// layer with rows on any rank is served in the round that follows this boundary.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    rows: Vec<(u32, u32)>,
    stop: bool,
    generation: u64,
    /// Digest of the request held (so two requests with one generation cannot both run).
    digest: u64,
    active: bool,
    staged: Option<usize>,
}

/// A digest of a remap request, equal on every rank for equal requests (same binary).
fn digest(req: &RemapRequest) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    req.placement.generation.hash(&mut h);
    req.placement.phy2log.hash(&mut h);
    req.layers.hash(&mut h);
    matches!(req.mode, RemapMode::StopTheWorld).hash(&mut h);
    h.finish()
}

struct Job {
    req: Arc<RemapRequest>,
    layers: Vec<usize>,
    idx: usize,
    /// The executor is staging `layers[idx]`.
    staging: bool,
    /// ... and said (at a boundary) that this rank's part has finished.
    staged: bool,
    /// When the staging of `layers[idx]` began (`--remap-layer-delay-ms` counts from here).
    staging_since: Instant,
    started: Instant,
}

pub struct EngineParts {
    pub shape: ModelShape,
    pub ranks_per_node: usize,
    pub comm: Arc<Comm>,
    pub shared: Arc<Shared>,
    pub placement: PlacementDocument,
    pub exec: Box<dyn Exec>,
    pub traffic: Traffic,
    pub history: Option<LoadHistory>,
    pub sink: Option<mpsc::Sender<StepRecord>>,
    /// Send inputs and outputs with each record (tests); false sends timings only.
    pub sink_tensors: bool,
    pub max_steps: u64,
    pub steps_per_second: f64,
    /// Generated or replayed batches, or rounds of forward-API requests.
    pub mode: TrafficMode,
    /// Most rows a rank pools into one round of a layer (forward API).
    pub max_round_rows: usize,
    /// An asynchronous remap layer counts as staged no earlier than this after it began.
    pub remap_layer_delay: Duration,
}

pub struct Engine {
    shape: ModelShape,
    rank: usize,
    world: usize,
    ranks_per_node: usize,
    comm: Arc<Comm>,
    shared: Arc<Shared>,
    current: PlacementDocument,
    layer_generations: Vec<u64>,
    maps: Vec<LayerMap>,
    exec: Box<dyn Exec>,
    traffic: Arc<Traffic>,
    history: Option<LoadHistory>,
    sink: Option<mpsc::Sender<StepRecord>>,
    sink_tensors: bool,
    job: Option<Job>,
    max_steps: u64,
    steps_per_second: f64,
    rate: VecDeque<(Instant, usize)>,
    mode: TrafficMode,
    max_round_rows: usize,
    remap_layer_delay: Duration,
    /// Token numbers for the replica choice of forward-API rows (distinct per rank).
    token_base: u32,
}

impl Engine {
    pub fn new(p: EngineParts) -> Result<Engine> {
        let rank = p.comm.rank();
        let world = p.comm.world();
        let maps = p
            .placement
            .phy2log
            .iter()
            .map(|row| LayerMap::new(row.clone(), p.shape.num_experts).map_err(|e| anyhow!(e)))
            .collect::<Result<Vec<_>>>()?;
        let layer_generations = vec![p.placement.generation; p.shape.num_layers];
        Ok(Engine {
            shape: p.shape,
            rank,
            world,
            ranks_per_node: p.ranks_per_node,
            comm: p.comm,
            shared: p.shared,
            current: p.placement,
            layer_generations,
            maps,
            exec: p.exec,
            traffic: Arc::new(p.traffic),
            history: p.history,
            sink: p.sink,
            sink_tensors: p.sink_tensors,
            job: None,
            max_steps: p.max_steps,
            steps_per_second: p.steps_per_second,
            rate: VecDeque::new(),
            mode: p.mode,
            max_round_rows: p.max_round_rows.max(1),
            remap_layer_delay: p.remap_layer_delay,
            token_base: (rank as u32).wrapping_mul(0x9E37_79B9),
        })
    }

    fn publish_placement(&self) {
        let mut st = self.shared.lock();
        let mut doc = self.current.clone();
        doc.generation = self.layer_generations.iter().copied().min().unwrap_or(0);
        self.shared
            .metrics
            .placement_generation
            .set(doc.generation as i64);
        st.placement = Some(doc);
        st.layer_generations = self.layer_generations.clone();
    }

    /// Runs steps until a stop is agreed or `max_steps` is reached. On failure the peers are
    /// told the reason before this rank's links close.
    pub fn run(&mut self) -> Result<()> {
        let r = self.run_steps();
        match &r {
            Ok(()) => self.comm.goodbye(),
            Err(e) => self.comm.abort(&format!("{e:#}")),
        }
        r
    }

    fn run_steps(&mut self) -> Result<()> {
        self.publish_placement();
        if self.mode == TrafficMode::Api {
            return self.run_rounds();
        }
        let mut step = 0u64;
        let period = (self.steps_per_second > 0.0)
            .then(|| Duration::from_secs_f64(1.0 / self.steps_per_second));
        let start = Instant::now();
        let feed = Prefetch::start(self.traffic.clone(), 0, 2)?;
        let want_output = self.sink.is_some() && self.sink_tensors;
        loop {
            if self.max_steps > 0 && step >= self.max_steps {
                break;
            }
            if self.boundary(Vec::new())?.is_none() {
                break;
            }
            if let Some(p) = period {
                let due = start + p.mul_f64(step as f64);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
            }
            let t_in = Instant::now();
            let batch = feed.batch(step);
            let input_wait = t_in.elapsed();
            let t0 = Instant::now();
            let tokens = batch.x.len() / self.shape.hidden;
            let (output, counts) = self.exec.forward(&self.comm, &batch, step, want_output)?;
            let dt = t0.elapsed();
            self.after_step(step, tokens, &counts, dt)?;
            if let Some(sink) = &self.sink {
                let (batch, output) = if self.sink_tensors {
                    (batch, output)
                } else {
                    (
                        Batch {
                            step,
                            x: Vec::new(),
                            routing: None,
                        },
                        Vec::new(),
                    )
                };
                let _ = sink.send(StepRecord {
                    step,
                    batch,
                    output,
                    layer_generations: self.layer_generations.clone(),
                    duration: dt,
                    input_wait,
                    finished: Instant::now(),
                    remap_running: self.job.is_some(),
                });
            }
            step += 1;
        }
        // Leave the remap's staging thread nothing to wait for.
        if let Some(h) = &self.history {
            h.write()?;
        }
        Ok(())
    }

    fn after_step(
        &mut self,
        step: u64,
        tokens: usize,
        counts: &[Vec<u32>],
        dt: Duration,
    ) -> Result<()> {
        let shared = self.shared.clone();
        let m = &shared.metrics;
        m.step_duration.observe(dt.as_secs_f64());
        m.tokens.inc_by(tokens as u64);
        m.steps.inc();
        let now = Instant::now();
        self.rate.push_back((now, tokens));
        let tps = self.rate_now(now);
        m.tokens_per_second.set(tps);
        {
            let mut w = self.shared.lock_window();
            w.record(step, counts);
            for l in 0..self.shape.num_layers {
                let sums: Vec<f64> = w.layer_sums(l).iter().map(|&v| v as f64).collect();
                m.layer_imbalance
                    .with_label_values(&[l.to_string().as_str()])
                    .set(par(&sums, self.world));
            }
        }
        {
            let mut st = self.shared.lock();
            st.step = step + 1;
            st.tokens_per_second = tps;
        }
        // Logical counts (placement-independent) for the closed windows the operator plans
        // from, and the optional moectl history file.
        let logical: Vec<Vec<f64>> = counts
            .iter()
            .enumerate()
            .map(|(l, c)| self.logical(l, c))
            .collect();
        self.shared.lock_episodes().record(step, &logical);
        if let Some(h) = &mut self.history {
            h.add(&logical)?;
        }
        Ok(())
    }

    /// Slot counts of `layer` folded into logical expert counts under the current placement.
    fn logical(&self, layer: usize, counts: &[u32]) -> Vec<f64> {
        let mut v = vec![0.0; self.shape.num_experts];
        for (slot, &n) in counts.iter().enumerate() {
            v[self.maps[layer].phy2log[slot] as usize] += f64::from(n);
        }
        v
    }

    /// Tokens per second over the recent entries of `self.rate`.
    fn rate_now(&mut self, now: Instant) -> f64 {
        while self.rate.len() > 2
            && self
                .rate
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(5))
        {
            self.rate.pop_front();
        }
        match (self.rate.front(), self.rate.len()) {
            (Some((t0, _)), n) if n >= 2 => {
                let secs = now.duration_since(*t0).as_secs_f64();
                let toks: usize = self.rate.iter().skip(1).map(|(_, n)| n).sum();
                if secs > 0.0 { toks as f64 / secs } else { 0.0 }
            }
            _ => 0.0,
        }
    }

    /// The step boundary: gather control records (with this rank's queued forward-API `rows`)
    /// and act on them. Returns `None` to stop, else the MoE layers with rows queued on any
    /// rank (ascending), which the round after this boundary serves.
    fn boundary(&mut self, rows: Vec<(u32, u32)>) -> Result<Option<Vec<usize>>> {
        if let Some(job) = &mut self.job
            && job.staging
            && !job.staged
        {
            job.staged = self
                .exec
                .staging_finished(false)
                .context("staging a remap layer")?
                && job.staging_since.elapsed() >= self.remap_layer_delay;
        }
        let pending = if self.job.is_none() {
            self.shared.lock().pending.clone()
        } else {
            None
        };
        let mine = Ctrl {
            rows,
            stop: self.shared.stop.load(Ordering::SeqCst),
            generation: match (&self.job, &pending) {
                (Some(j), _) => j.req.placement.generation,
                (None, Some(p)) => p.placement.generation,
                (None, None) => 0,
            },
            digest: match (&self.job, &pending) {
                (Some(j), _) => digest(&j.req),
                (None, Some(p)) => digest(p),
                (None, None) => 0,
            },
            active: self.job.is_some(),
            staged: self.job.as_ref().filter(|j| j.staged).map(|j| j.idx),
        };
        let all: Vec<Ctrl> = self
            .comm
            .all_gather(CHAN_CTRL, &serde_json::to_vec(&mine)?)
            .context("step-boundary agreement")?
            .iter()
            .map(|b| serde_json::from_slice(b))
            .collect::<Result<_, _>>()?;
        if all.iter().any(|c| c.stop) {
            tracing::info!("stopping: a rank asked the group to stop");
            return Ok(None);
        }
        let mut layers: Vec<usize> = all
            .iter()
            .flat_map(|c| c.rows.iter().map(|&(l, _)| l as usize))
            .filter(|&l| l < self.shape.num_layers)
            .collect();
        layers.sort_unstable();
        layers.dedup();
        self.agree(&all, &mine, pending)?;
        Ok(Some(layers))
    }

    /// The remap part of the boundary: switch, activate or hand out, from the gathered records.
    fn agree(
        &mut self,
        all: &[Ctrl],
        mine: &Ctrl,
        pending: Option<Arc<RemapRequest>>,
    ) -> Result<()> {
        if all.iter().any(|c| c.active != mine.active) {
            bail!("ranks disagree on whether a remap runs: {all:?}");
        }
        if let Some(job) = &self.job {
            let idx = job.idx;
            if all.iter().all(|c| c.staged == Some(idx)) {
                self.switch_current()?;
            }
            return Ok(());
        }
        let max = all.iter().map(|c| c.generation).max().unwrap_or(0);
        if max == 0 {
            return Ok(());
        }
        // The newest request of the lowest rank holding that generation is the group's.
        let src = all.iter().position(|c| c.generation == max).unwrap_or(0);
        let target = (max, all[src].digest);
        let lacks = |c: &Ctrl| (c.generation, c.digest) != target;
        if !all.iter().any(lacks) {
            let req = pending.ok_or_else(|| anyhow!("no pending remap to activate"))?;
            self.activate(req)?;
            return Ok(());
        }
        // Hand it to the ranks that lack it (POSTing to any rank is enough).
        if self.rank == src {
            let req = pending.ok_or_else(|| anyhow!("no pending remap to hand out"))?;
            let bytes = serde_json::to_vec(&*req)?;
            for (r, c) in all.iter().enumerate() {
                if lacks(c) {
                    self.comm.send(r, CHAN_CTRL, bytes.clone())?;
                }
            }
        } else if lacks(mine) {
            let bytes = self.comm.recv(src, CHAN_CTRL)?;
            let req: RemapRequest = serde_json::from_slice(&bytes)?;
            let layers = layers_to_move(&req, &self.current).map_err(|e| {
                anyhow!("rank {src} handed out a remap this rank cannot apply: {e}")
            })?;
            let req = Arc::new(req);
            let mut st = self.shared.lock();
            st.remap = Some(running_progress(&req, layers.len()));
            st.pending = Some(req.clone());
            st.accepted = Some(req);
        }
        Ok(())
    }

    fn activate(&mut self, req: Arc<RemapRequest>) -> Result<()> {
        let generation = req.placement.generation;
        let layers = match layers_to_move(&req, &self.current) {
            Ok(l) => l,
            Err(e) => {
                // Same decision on every rank: the current placement is the same everywhere.
                let mut st = self.shared.lock();
                if st.pending.as_ref().is_some_and(|p| Arc::ptr_eq(p, &req)) {
                    st.pending = None;
                }
                if let Some(p) = &mut st.remap
                    && p.generation == generation
                {
                    p.state = RemapState::Failed;
                    p.error = Some(e.clone());
                    p.finished_at_ms = Some(now_ms());
                }
                self.shared
                    .metrics
                    .remaps
                    .with_label_values(&["failed"])
                    .inc();
                tracing::warn!(generation, "remap refused at activation: {e}");
                return Ok(());
            }
        };
        tracing::info!(generation, ?layers, mode = ?req.mode, "remap starts");
        for l in 0..self.shape.num_layers {
            if !layers.contains(&l) {
                self.layer_generations[l] = generation;
            }
        }
        {
            let mut st = self.shared.lock();
            if st.pending.as_ref().is_some_and(|p| Arc::ptr_eq(p, &req)) {
                st.pending = None;
            }
            let keep_start = st
                .remap
                .as_ref()
                .filter(|p| p.generation == generation)
                .map(|p| p.started_at_ms);
            let mut p = running_progress(&req, layers.len());
            if let Some(s) = keep_start {
                p.started_at_ms = s;
            }
            st.remap = Some(p);
            st.active = true;
        }
        let m = &self.shared.metrics;
        m.remap_layers_total.set(layers.len() as i64);
        m.remap_layers_done.set(0);
        self.job = Some(Job {
            req: req.clone(),
            layers,
            idx: 0,
            staging: false,
            staged: false,
            staging_since: Instant::now(),
            started: Instant::now(),
        });
        match req.mode {
            RemapMode::Async => self.start_staging(),
            RemapMode::StopTheWorld => self.stop_the_world(),
        }
    }

    fn plan_for(&self, layer: usize, req: &RemapRequest) -> LayerPlan {
        plan_layer(
            &self.current.phy2log[layer],
            &req.placement.phy2log[layer],
            self.world,
            self.ranks_per_node,
        )
    }

    fn start_staging(&mut self) -> Result<()> {
        let Some(job) = &self.job else {
            return Ok(());
        };
        let Some(&layer) = job.layers.get(job.idx) else {
            return self.finish();
        };
        let plan = self.plan_for(layer, &job.req);
        // Setting the transfers up runs on the engine thread between forward passes: stall.
        let t0 = Instant::now();
        self.exec.begin_staging(&self.comm, layer, &plan)?;
        self.add_stall(t0.elapsed().as_secs_f64());
        if let Some(job) = &mut self.job {
            job.staging = true;
            job.staged = false;
            job.staging_since = t0;
        }
        Ok(())
    }

    /// Switches the current remap layer (weights and maps together) and starts the next.
    fn switch_current(&mut self) -> Result<()> {
        let Some(job) = &mut self.job else {
            return Ok(());
        };
        let layer = job.layers[job.idx];
        if !job.staged {
            bail!("switching layer {layer} before it was staged");
        }
        job.staging = false;
        job.staged = false;
        let row = job.req.placement.phy2log[layer].clone();
        let generation = job.req.placement.generation;
        job.idx += 1;
        self.apply(layer, row, generation, 0.0)?;
        self.start_staging()
    }

    /// Commits the staged `layer`: weights and maps switch together, before the next forward
    /// pass. `stall` is engine time already spent on it.
    fn apply(&mut self, layer: usize, row: Vec<u32>, generation: u64, stall: f64) -> Result<()> {
        let map = LayerMap::new(row.clone(), self.shape.num_experts)
            .map_err(|e| anyhow!("layer {layer}: {e}"))?;
        let t0 = Instant::now();
        let staged = self.exec.commit(layer, &map)?;
        let stall = stall + t0.elapsed().as_secs_f64();
        self.maps[layer] = map;
        self.current.phy2log[layer] = row;
        self.layer_generations[layer] = generation;
        self.shared.lock_window().reset_layer(layer);
        let m = &self.shared.metrics;
        m.remap_bytes.inc_by(staged.bytes);
        m.remap_transfer.inc_by(staged.transfer_seconds);
        m.remap_experts_moved.inc_by(staged.moved);
        m.remap_stall.inc_by(stall);
        m.remap_layers_done.inc();
        {
            let mut st = self.shared.lock();
            if let Some(p) = &mut st.remap
                && p.generation == generation
            {
                p.layers_done += 1;
                p.bytes_moved += staged.bytes;
                p.experts_moved += staged.moved;
                p.stall_seconds += stall;
            }
        }
        tracing::info!(layer, generation, bytes = staged.bytes, "layer switched");
        self.publish_placement();
        Ok(())
    }

    /// Time the engine thread spent on remap work between forward passes.
    fn add_stall(&self, secs: f64) {
        self.shared.metrics.remap_stall.inc_by(secs);
        let generation = self.job.as_ref().map(|j| j.req.placement.generation);
        let mut st = self.shared.lock();
        if let Some(p) = &mut st.remap
            && Some(p.generation) == generation
        {
            p.stall_seconds += secs;
        }
    }

    fn finish(&mut self) -> Result<()> {
        let Some(job) = self.job.take() else {
            return Ok(());
        };
        let generation = job.req.placement.generation;
        self.current.generation = generation;
        for g in &mut self.layer_generations {
            *g = generation;
        }
        self.publish_placement();
        let secs = job.started.elapsed().as_secs_f64();
        let m = &self.shared.metrics;
        m.remap_duration.observe(secs);
        m.remaps.with_label_values(&["succeeded"]).inc();
        let mut st = self.shared.lock();
        st.active = false;
        if let Some(p) = &mut st.remap
            && p.generation == generation
        {
            p.state = RemapState::Succeeded;
            p.finished_at_ms = Some(now_ms());
        }
        tracing::info!(generation, seconds = secs, "remap finished");
        Ok(())
    }

    /// All requested layers at once while serving is paused: each layer is staged and
    /// committed in turn with no forward pass in between; the group resumes together.
    fn stop_the_world(&mut self) -> Result<()> {
        let Some(job) = &self.job else {
            return Ok(());
        };
        let req = job.req.clone();
        let layers = job.layers.clone();
        for &l in &layers {
            let plan = self.plan_for(l, &req);
            let tl = Instant::now();
            self.exec.begin_staging(&self.comm, l, &plan)?;
            self.exec.staging_finished(true)?;
            let row = req.placement.phy2log[l].clone();
            self.apply(l, row, req.placement.generation, tl.elapsed().as_secs_f64())?;
        }
        let tb = Instant::now();
        self.comm.barrier(CHAN_CTRL)?;
        // The wait for the slowest rank is part of the pause too.
        self.add_stall(tb.elapsed().as_secs_f64());
        self.finish()
    }
}

/// Single-process reference of one MoE layer over all experts (no communication, one replica
/// per expert, expert `e` in slot `e`): router, gating, every chosen expert, combine, shared
/// experts. Returns the block output (no residual) and the top-k. Every multi-rank run of the
/// per-layer path must reproduce it bit for bit, whatever the placement.
pub fn reference_layer(
    store: &WeightStore,
    layer: usize,
    x: &Bf16Matrix,
    forced: Option<&[u32]>,
) -> Result<(Bf16Matrix, TopK)> {
    let model = store.model();
    let e = model.num_experts;
    let gating = gating_config(model);
    let topo = EpTopology::new(1, e)?;
    let identity = ReplicaMap::identity(e)?;
    let router = store.router_f32(layer)?;
    let router_bias = store.router_bias(layer)?;
    let bias = store.correction_bias(layer)?;
    let shared = store.shared(layer)?;
    let topk = topk_of(
        x,
        &router,
        router_bias.as_deref(),
        bias.as_deref(),
        forced,
        &gating,
    )?;
    // Only the experts chosen are read (the others' rows are empty).
    let mut used = vec![false; e];
    for &id in &topk.ids {
        used[id as usize] = true;
    }
    let empty = ExpertWeights::new(Matrix::zeros(0, x.cols()), Matrix::zeros(x.cols(), 0))?;
    let experts: Vec<ExpertWeights> = (0..e)
        .map(|i| {
            if used[i] {
                store.expert(layer, i as u32)
            } else {
                Ok(empty.clone())
            }
        })
        .collect::<Result<_>>()?;
    let refs: Vec<&ExpertWeights> = experts.iter().collect();
    let mut load = vec![0u32; e];
    let phys = cpu::map_to_physical(&topk, &identity, 0, &mut load)?;
    let layout = cpu::dispatch_layout(&phys, topk.k, topo)?;
    let y = cpu::expert_ffn_act(
        &cpu::permute(x, &layout)?,
        &layout.slot_offsets,
        &refs,
        activation(model),
    )?;
    let routed = cpu::unpermute_combine_f32(&y, &layout, &topk.weights)?;
    Ok((add_shared(routed, x, shared.as_ref())?, topk))
}

/// Single-process reference of the layer stack (each MoE layer by [`reference_layer`], then
/// the residual): what every multi-rank run must reproduce, whatever the placement.
pub fn reference_forward(
    store: &WeightStore,
    shape: &ModelShape,
    batch: &Batch,
) -> Result<Vec<bf16>> {
    let h = shape.hidden;
    let mut x = batch.x.clone();
    let t = x.len() / h;
    for l in 0..shape.num_layers {
        let xm = Matrix::from_vec(t, h, x.clone())?;
        let forced = batch.routing.as_ref().map(|r| &r[l][..]);
        let (out, _) = reference_layer(store, l, &xm, forced)?;
        add_residual(&mut x, &out);
    }
    Ok(x)
}
