//! State shared between the engine thread and the HTTP API, and the admission rules of
//! `POST /v1/remap`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use moe_api::{
    LoadReport, PlacementDocument, RemapProgress, RemapRequest, RemapState, WorkerStatus,
};

use crate::config::ModelShape;
use crate::doorbell::Doorbell;
use crate::forward::queue::{Queue, Served, Settings};
use crate::metrics::Metrics;
use crate::placement::check_shape;
use crate::stats::{Episodes, Window, par};

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Mutable state behind one lock.
#[derive(Debug, Default)]
pub struct State {
    /// The placement being served: row per layer as switched; `generation` is the minimum of
    /// `layer_generations`.
    pub placement: Option<PlacementDocument>,
    pub layer_generations: Vec<u64>,
    pub step: u64,
    pub tokens_per_second: f64,
    pub backend: String,
    /// Progress of the newest accepted remap.
    pub remap: Option<RemapProgress>,
    /// Accepted by this rank, not yet started by the group.
    pub pending: Option<Arc<RemapRequest>>,
    /// The newest request accepted (pending, running or done), for idempotence checks.
    pub accepted: Option<Arc<RemapRequest>>,
    /// True while the group executes a remap (`remap` is then `Running`).
    pub active: bool,
}

pub struct Shared {
    pub rank: usize,
    pub world: usize,
    pub shape: ModelShape,
    /// The model description `GET /v1/model` returns.
    pub model: std::sync::Arc<moe_model::ModelDescription>,
    pub token_file: Option<PathBuf>,
    pub metrics: Metrics,
    pub ready: AtomicBool,
    pub stop: AtomicBool,
    /// The engine returned (normally or with an error).
    pub finished: AtomicBool,
    pub state: Mutex<State>,
    pub window: Mutex<Window>,
    /// Closed past windows (logical counts) for `GET /v1/load?history=N`.
    pub episodes: Mutex<Episodes>,
    /// The other ranks of this process (`--local-ranks`), whose metrics this rank's /metrics
    /// also serves when it is the process's first rank (one scrape target per pod).
    pub local_peers: std::sync::OnceLock<Vec<prometheus::Registry>>,
    /// Wakes the engine when it sleeps between rounds (forward API).
    pub bell: Arc<Doorbell>,
    pub forward_settings: Settings,
    /// Forward-API requests waiting for a round.
    pub forward: Queue,
    /// Rows this rank answered through the forward API.
    pub served: Served,
}

/// Why a remap request was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 400: the request is malformed or does not fit the model.
    Malformed(String),
    /// 409: stale generation, or another remap is in progress.
    /// 409: the rank diverged from the requested placement (stale or different generation).
    Diverged(String),
    /// 409: another remap is in progress; retry when it finishes.
    Busy(String),
    /// 503: the group has not formed yet.
    NotReady(String),
}

impl Shared {
    pub fn new(
        rank: usize,
        world: usize,
        shape: ModelShape,
        model: std::sync::Arc<moe_model::ModelDescription>,
        token_file: Option<PathBuf>,
        window: usize,
        forward_settings: Settings,
    ) -> Shared {
        let bell = Arc::new(Doorbell::default());
        Shared {
            rank,
            world,
            shape,
            model,
            token_file,
            metrics: Metrics::new(rank),
            ready: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            state: Mutex::new(State::default()),
            window: Mutex::new(Window::new(window, shape.num_layers, shape.num_slots())),
            episodes: Mutex::new(Episodes::new(
                window,
                moe_api::MAX_LOAD_HISTORY,
                shape.num_layers,
                shape.num_experts,
            )),
            local_peers: std::sync::OnceLock::new(),
            forward: Queue::new(shape.num_layers, bell.clone()),
            bell,
            forward_settings,
            served: Served::default(),
        }
    }

    /// Asks the group to stop at its next step boundary (and wakes an idle engine).
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.bell.ring();
    }

    /// True while this rank runs a stop-the-world remap (forward requests wait).
    pub fn stop_the_world_running(&self) -> bool {
        let st = self.lock();
        st.active
            && st.remap.as_ref().is_some_and(|p| {
                p.state == RemapState::Running && p.mode == moe_api::RemapMode::StopTheWorld
            })
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn lock_window(&self) -> MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub fn status(&self) -> WorkerStatus {
        let served = self.served.snapshot();
        let st = self.lock();
        WorkerStatus {
            rank: self.rank,
            world_size: self.world,
            ready: self.is_ready(),
            backend: st.backend.clone(),
            placement_generation: st.placement.as_ref().map_or(0, |p| p.generation),
            layer_generations: st.layer_generations.clone(),
            step: st.step,
            tokens_per_second: st.tokens_per_second,
            remap: st.remap.clone(),
            traffic: self.forward_settings.traffic.name().into(),
            served_rows_total: served.0,
            served_rows_per_second: served.1,
            control_token_id: token_id_of(self.token_file.as_deref()),
            client_token_id: token_id_of(self.forward_settings.client_token_file.as_deref()),
        }
    }

    pub fn lock_episodes(&self) -> MutexGuard<'_, Episodes> {
        self.episodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `GET /v1/load`, with the newest `history` closed windows (capped).
    pub fn load_report(&self, history: usize) -> LoadReport {
        let (layer_generations, step) = {
            let st = self.lock();
            (st.layer_generations.clone(), st.step)
        };
        let w = self.lock_window();
        let slot_counts = w.sums();
        let par = slot_counts.iter().map(|c| par(c, self.world)).collect();
        LoadReport {
            rank: self.rank,
            layer_generations,
            window_steps: w.steps() as u64,
            window_start_step: w.first_step(),
            step,
            slot_counts,
            par,
            history: self
                .lock_episodes()
                .newest(history.min(moe_api::MAX_LOAD_HISTORY)),
        }
    }

    /// Admission of `POST /v1/remap`: 202 with the progress, or a refusal.
    pub fn submit_remap(&self, req: RemapRequest) -> Result<RemapProgress, Refusal> {
        check_shape(&req.placement, &self.shape).map_err(Refusal::Malformed)?;
        let mut seen = vec![false; self.shape.num_layers];
        for &l in &req.layers {
            match seen.get_mut(l) {
                None => {
                    return Err(Refusal::Malformed(format!(
                        "layer {l} is out of range (the model has {} layers)",
                        self.shape.num_layers
                    )));
                }
                Some(true) => {
                    return Err(Refusal::Malformed(format!("layer {l} is listed twice")));
                }
                Some(s) => *s = true,
            }
        }
        let mut st = self.lock();
        let Some(current) = st.placement.clone() else {
            return Err(Refusal::NotReady(
                "the group has not formed yet; retry when /readyz answers 200".into(),
            ));
        };
        let generation = req.placement.generation;
        if let Some(p) = &st.remap
            && p.generation == generation
        {
            if let Some(a) = &st.accepted
                && a.placement.generation == generation
                && (a.placement.phy2log != req.placement.phy2log || a.mode != req.mode)
            {
                return Err(Refusal::Diverged(format!(
                    "generation {generation} was already accepted with a different placement or mode"
                )));
            }
            // Idempotent: the same generation again reports the progress of the one accepted.
            return Ok(p.clone());
        }
        if generation == current.generation && req.placement.phy2log == current.phy2log {
            return Ok(RemapProgress {
                generation,
                state: RemapState::Succeeded,
                mode: req.mode,
                layers_total: 0,
                layers_done: 0,
                experts_moved: 0,
                bytes_moved: 0,
                stall_seconds: 0.0,
                started_at_ms: now_ms(),
                finished_at_ms: Some(now_ms()),
                error: None,
            });
        }
        if generation <= current.generation {
            return Err(Refusal::Diverged(format!(
                "generation {generation} is stale: this rank serves generation {}",
                current.generation
            )));
        }
        if let Some(p) = &st.remap
            && p.state == RemapState::Running
        {
            if p.generation > generation {
                return Err(Refusal::Diverged(format!(
                    "generation {generation} is stale: a remap to generation {} was accepted",
                    p.generation
                )));
            }
            if st.active {
                return Err(Refusal::Busy(format!(
                    "a remap to generation {} is in progress; retry when it finishes",
                    p.generation
                )));
            }
        }
        if let Some(p) = &st.remap
            && p.state != RemapState::Running
            && p.generation > generation
        {
            return Err(Refusal::Diverged(format!(
                "generation {generation} is stale: generation {} was already accepted",
                p.generation
            )));
        }
        let layers = layers_to_move(&req, &current).map_err(Refusal::Malformed)?;
        let progress = running_progress(&req, layers.len());
        let req = Arc::new(req);
        st.remap = Some(progress.clone());
        st.pending = Some(req.clone());
        st.accepted = Some(req);
        drop(st);
        // An idle engine (forward API) wakes to start the remap.
        self.bell.ring();
        Ok(progress)
    }
}

/// The layers a request moves, in order: the listed ones, or every differing layer. Layers not
/// listed must equal the current placement.
pub fn layers_to_move(
    req: &RemapRequest,
    current: &PlacementDocument,
) -> Result<Vec<usize>, String> {
    let differs = |l: usize| req.placement.phy2log[l] != current.phy2log[l];
    if req.layers.is_empty() {
        return Ok((0..current.num_layers).filter(|&l| differs(l)).collect());
    }
    for l in 0..current.num_layers {
        if differs(l) && !req.layers.contains(&l) {
            return Err(format!(
                "layer {l} differs from the current placement but is not listed in `layers`"
            ));
        }
    }
    Ok(req.layers.clone())
}

/// The progress record of a remap this rank starts (posted to it, or passed on by the group).
pub fn running_progress(req: &RemapRequest, layers_total: usize) -> RemapProgress {
    RemapProgress {
        generation: req.placement.generation,
        state: RemapState::Running,
        mode: req.mode,
        layers_total,
        layers_done: 0,
        experts_moved: 0,
        bytes_moved: 0,
        stall_seconds: 0.0,
        started_at_ms: now_ms(),
        finished_at_ms: None,
        error: None,
    }
}

/// The id of the token in `path` (read on every call, as the APIs do: a Secret the kubelet
/// refreshed shows at once); `None` without a file or with an unreadable or empty one.
fn token_id_of(path: Option<&std::path::Path>) -> Option<String> {
    let text = std::fs::read_to_string(path?).ok()?;
    (!text.trim().is_empty()).then(|| moe_api::token_id(&text))
}
