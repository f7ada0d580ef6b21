//! The forward API's serving side (docs/forward-api.md): admission of requests (checks against
//! the model), the per-layer queue the engine drains into rounds, and the wait for an answer
//! with its bound (503 with Retry-After, exactly once).
//!
//! A request is an [`Entry`] that moves `Queued -> Taken` (the engine put it in a round and will
//! answer it) or `Queued -> Cancelled` (its caller stopped waiting and was answered 503). The
//! two transitions are one compare-and-swap, so a request is never both computed for nobody
//! and refused, and never answered twice.

pub mod http;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use half::bf16;
use moe_api::forward::{ForwardRequest, ForwardResponse, RequestHeader, Tensor};
use tokio::sync::oneshot;

use crate::config::TrafficMode;
use crate::doorbell::Doorbell;
use crate::state::Shared;

/// How the forward API is configured on this rank.
#[derive(Debug, Clone)]
pub struct Settings {
    pub traffic: TrafficMode,
    pub client_token_file: Option<std::path::PathBuf>,
    pub max_request_rows: usize,
    pub wait: Duration,
}

/// An error answer: status, one-line reason, Retry-After seconds (0: none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: String,
    pub retry_after: u16,
}

impl Refusal {
    pub fn new(status: u16, reason: impl Into<String>) -> Refusal {
        Refusal {
            status,
            reason: reason.into(),
            retry_after: 0,
        }
    }
    pub fn unavailable(reason: impl Into<String>) -> Refusal {
        Refusal {
            status: 503,
            reason: reason.into(),
            retry_after: 1,
        }
    }
}

/// The engine's answer to one request: its rows of the block output, or why not.
pub type Answer = Result<Vec<bf16>, Refusal>;

/// What the engine takes out of the queue.
pub struct Payload {
    pub x: Vec<bf16>,
    /// Caller routing `[T, k]` ids and weights.
    pub routing: Option<(Vec<u32>, Vec<f32>)>,
    pub reply: oneshot::Sender<Answer>,
}

const QUEUED: u8 = 0;
const TAKEN: u8 = 1;
const CANCELLED: u8 = 2;

pub struct Entry {
    state: AtomicU8,
    rows: usize,
    payload: Mutex<Option<Payload>>,
}

impl Entry {
    /// The caller gives up waiting; false when the engine already took the request.
    fn cancel(&self) -> bool {
        self.state
            .compare_exchange(QUEUED, CANCELLED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
    fn take(&self) -> Option<Payload> {
        self.state
            .compare_exchange(QUEUED, TAKEN, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        self.payload
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
    fn live(&self) -> bool {
        self.state.load(Ordering::Acquire) == QUEUED
    }
}

/// Requests waiting for a round, per MoE layer.
pub struct Queue {
    inner: Mutex<QueueInner>,
    /// Rung when a request is queued.
    pub bell: Arc<Doorbell>,
}

struct QueueInner {
    layers: Vec<VecDeque<Arc<Entry>>>,
    /// Set when the engine has ended: later requests are refused with this.
    closed: Option<Refusal>,
}

impl Queue {
    pub fn new(num_layers: usize, bell: Arc<Doorbell>) -> Queue {
        Queue {
            inner: Mutex::new(QueueInner {
                layers: vec![VecDeque::new(); num_layers],
                closed: None,
            }),
            bell,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, layer: usize, entry: Arc<Entry>) -> Result<(), Refusal> {
        {
            let mut q = self.lock();
            if let Some(r) = &q.closed {
                return Err(r.clone());
            }
            q.layers[layer].push_back(entry);
        }
        self.bell.ring();
        Ok(())
    }

    /// Rows queued per MoE layer (`(layer, rows)` for layers with any); drops cancelled entries.
    pub fn pending_rows(&self) -> Vec<(u32, u32)> {
        let mut q = self.lock();
        let mut out = Vec::new();
        for (l, entries) in q.layers.iter_mut().enumerate() {
            entries.retain(|e| e.live());
            let rows: usize = entries.iter().map(|e| e.rows).sum();
            if !entries.is_empty() {
                // A queued request of zero rows never reaches the queue, so rows > 0 here.
                out.push((l as u32, rows.min(u32::MAX as usize) as u32));
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.lock()
            .layers
            .iter()
            .all(|entries| entries.iter().all(|e| !e.live()))
    }

    /// Takes whole requests of `layer`, oldest first, up to `cap` rows (at least one request).
    pub fn take(&self, layer: usize, cap: usize) -> Vec<Payload> {
        let mut q = self.lock();
        let Some(entries) = q.layers.get_mut(layer) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut rows = 0;
        while let Some(e) = entries.front() {
            if !e.live() {
                entries.pop_front();
                continue;
            }
            if !out.is_empty() && rows + e.rows > cap {
                break;
            }
            let e = entries.pop_front().expect("front exists");
            if let Some(p) = e.take() {
                rows += e.rows;
                out.push(p);
            }
        }
        out
    }

    /// Refuses every queued request and every later one with `refusal` (the engine ended).
    pub fn close(&self, refusal: Refusal) {
        let mut q = self.lock();
        q.closed = Some(refusal.clone());
        for entries in &mut q.layers {
            for e in entries.drain(..) {
                if let Some(p) = e.take() {
                    let _ = p.reply.send(Err(refusal.clone()));
                }
            }
        }
    }
}

/// A decoded request checked against the model.
pub struct Admitted {
    pub header: RequestHeader,
    /// MoE layer index (worker numbering).
    pub moe_layer: usize,
    pub x: Vec<bf16>,
    pub routing: Option<(Vec<u32>, Vec<f32>)>,
}

/// Checks a decoded request against the model and this rank's limits.
pub fn admit(
    shared: &Shared,
    header: RequestHeader,
    req: ForwardRequest,
) -> Result<Admitted, Refusal> {
    let model = &shared.model;
    let max_rows = shared.forward_settings.max_request_rows;
    if header.rows as usize > max_rows {
        return Err(Refusal::new(
            413,
            format!(
                "{} rows is more than --max-request-rows {max_rows}",
                header.rows
            ),
        ));
    }
    if header.hidden as usize != model.hidden {
        return Err(Refusal::new(
            400,
            format!(
                "hidden {} does not match the model's hidden size {}",
                header.hidden, model.hidden
            ),
        ));
    }
    let d = header.layer as usize;
    let moe_layer = match model.moe_index(d) {
        Some(l) => l,
        None if d < model.num_hidden_layers => {
            return Err(Refusal::new(
                400,
                format!(
                    "layer {d} is a dense decoder layer (MoE layers: {:?})",
                    model.moe_layers
                ),
            ));
        }
        None => {
            return Err(Refusal::new(
                400,
                format!(
                    "layer {d} is not a decoder layer of the model ({} layers)",
                    model.num_hidden_layers
                ),
            ));
        }
    };
    let routing = match req.routing {
        None => None,
        Some(r) => {
            if r.top_k != model.top_k {
                return Err(Refusal::new(
                    400,
                    format!(
                        "top_k {} does not match the model's top-k {}",
                        r.top_k, model.top_k
                    ),
                ));
            }
            let e = model.num_experts;
            if let Some(i) = r.ids.iter().position(|&id| id as usize >= e) {
                return Err(Refusal::new(
                    400,
                    format!(
                        "expert id {} at row {} is out of range (the model has {e} routed experts)",
                        r.ids[i],
                        i / r.top_k.max(1)
                    ),
                ));
            }
            if let Some(i) = r.weights.iter().position(|w| !w.is_finite()) {
                return Err(Refusal::new(
                    400,
                    format!(
                        "routing weight at row {} is not finite ({})",
                        i / r.top_k.max(1),
                        r.weights[i]
                    ),
                ));
            }
            Some((r.ids, r.weights))
        }
    };
    Ok(Admitted {
        header,
        moe_layer,
        x: req.x.to_bf16(),
        routing,
    })
}

/// Serves one decoded request: admission, queueing, the bounded wait, the answer. Every path
/// gives exactly one response.
pub async fn serve(shared: &Shared, header: RequestHeader, req: ForwardRequest) -> ForwardResponse {
    let t0 = Instant::now();
    match serve_inner(shared, header, req).await {
        Ok(values) => {
            let rows = u64::from(header.rows);
            shared.served.record(rows);
            let m = &shared.metrics;
            m.forward_rows.inc_by(rows);
            m.forward_requests.inc();
            m.forward_request_duration
                .observe(t0.elapsed().as_secs_f64());
            ForwardResponse::ok(&header, Tensor::from_bf16(values, header.dtype))
        }
        Err(r) => refuse(shared, Some(&header), r),
    }
}

/// An error answer, counted.
pub fn refuse(shared: &Shared, header: Option<&RequestHeader>, r: Refusal) -> ForwardResponse {
    shared
        .metrics
        .forward_errors
        .with_label_values(&[r.status.to_string().as_str()])
        .inc();
    ForwardResponse::error(header, r.status, r.reason, r.retry_after)
}

async fn serve_inner(shared: &Shared, header: RequestHeader, req: ForwardRequest) -> Answer {
    let settings = &shared.forward_settings;
    if settings.traffic != TrafficMode::Api {
        return Err(Refusal::new(
            503,
            format!(
                "this group does not serve the forward API (--traffic {})",
                settings.traffic.name()
            ),
        ));
    }
    if !shared.is_ready() {
        return Err(Refusal::unavailable(
            "not ready: forming the group or loading weights",
        ));
    }
    let a = admit(shared, header, req)?;
    if a.header.rows == 0 {
        return Ok(Vec::new());
    }
    let (tx, mut rx) = oneshot::channel();
    let entry = Arc::new(Entry {
        state: AtomicU8::new(QUEUED),
        rows: a.header.rows as usize,
        payload: Mutex::new(Some(Payload {
            x: a.x,
            routing: a.routing,
            reply: tx,
        })),
    });
    shared.forward.push(a.moe_layer, entry.clone())?;
    tokio::select! {
        answer = &mut rx => return answer.unwrap_or_else(|_| Err(group_failed(shared))),
        _ = tokio::time::sleep(settings.wait) => {}
    }
    if entry.cancel() {
        let why = if shared.stop_the_world_running() {
            " (a stop-the-world remap is running)"
        } else {
            ""
        };
        return Err(Refusal::unavailable(format!(
            "waited {:?} in the queue{why}; retry",
            settings.wait
        )));
    }
    // The engine took it: its round is under way, the answer comes.
    rx.await.unwrap_or_else(|_| Err(group_failed(shared)))
}

fn group_failed(shared: &Shared) -> Refusal {
    if shared.stop.load(Ordering::SeqCst) {
        Refusal::unavailable("the group is stopping")
    } else {
        Refusal::new(500, "the group failed while the request was in a round")
    }
}

/// Rows answered by this rank: the total and a rate over the last 10 s.
#[derive(Debug, Default)]
pub struct Served {
    inner: Mutex<ServedInner>,
}

#[derive(Debug, Default)]
struct ServedInner {
    total: u64,
    recent: VecDeque<(Instant, u64)>,
}

const RATE_WINDOW: Duration = Duration::from_secs(10);

impl Served {
    pub fn record(&self, rows: u64) {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        s.total += rows;
        let now = Instant::now();
        s.recent.push_back((now, rows));
        while s
            .recent
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            s.recent.pop_front();
        }
    }

    /// (total, rows per second over the last 10 s).
    pub fn snapshot(&self) -> (u64, f64) {
        let s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let rows: u64 = s
            .recent
            .iter()
            .filter(|(t, _)| now.duration_since(*t) <= RATE_WINDOW)
            .map(|(_, n)| n)
            .sum();
        (s.total, rows as f64 / RATE_WINDOW.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ModelShape, Scoring};
    use crate::model::{SyntheticShape, synthetic};
    use moe_api::forward::{Dtype, Outcome};

    /// A ready rank of a 1-layer synthetic model with no engine: the test plays the engine.
    fn shared(wait: Duration) -> Arc<Shared> {
        let shape = ModelShape {
            num_layers: 1,
            num_experts: 4,
            hidden: 8,
            intermediate: 8,
            top_k: 2,
            expert_groups: 1,
            topk_groups: 1,
            scoring: Scoring::Softmax,
            redundant: 0,
            world_size: 1,
            expert_bias: false,
        };
        let model = synthetic(
            None,
            SyntheticShape {
                num_layers: 1,
                num_experts: 4,
                hidden: 8,
                intermediate: 8,
                top_k: 2,
                expert_groups: 1,
                topk_groups: 1,
                scoring: moe_model::Scoring::Softmax,
            },
        );
        let s = Shared::new(
            0,
            1,
            shape,
            Arc::new(model),
            None,
            10,
            Settings {
                traffic: TrafficMode::Api,
                client_token_file: None,
                max_request_rows: 16,
                wait,
            },
        );
        s.ready.store(true, Ordering::SeqCst);
        Arc::new(s)
    }

    fn req(rows: usize) -> (RequestHeader, ForwardRequest) {
        let r = ForwardRequest {
            id: 9,
            layer: 0,
            hidden: 8,
            x: Tensor::Bf16(vec![bf16::ONE; rows * 8]),
            routing: None,
        };
        (r.header(), r)
    }

    #[tokio::test]
    async fn a_request_not_taken_in_time_is_refused_once_and_never_computed() {
        let s = shared(Duration::from_millis(20));
        let (h, r) = req(2);
        let resp = serve(&s, h, r).await;
        assert_eq!(resp.status(), 503);
        assert!(matches!(resp.outcome, Outcome::Err { retry_after: 1, .. }));
        // The engine comes too late: nothing left to compute.
        assert!(s.forward.take(0, 16).is_empty());
        assert!(s.forward.pending_rows().is_empty());
        assert_eq!(
            s.metrics.forward_errors.with_label_values(&["503"]).get(),
            1
        );
    }

    #[tokio::test]
    async fn a_request_taken_in_time_waits_for_its_answer_past_the_bound() {
        let s = shared(Duration::from_millis(20));
        let engine = {
            let s = s.clone();
            std::thread::spawn(move || {
                loop {
                    let taken = s.forward.take(0, 16);
                    if let Some(p) = taken.into_iter().next() {
                        // A round that outlasts the wait bound.
                        std::thread::sleep(Duration::from_millis(60));
                        let y = p.x.iter().map(|v| *v + *v).collect();
                        let _ = p.reply.send(Ok(y));
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        let (h, r) = req(3);
        let resp = serve(&s, h, r).await;
        engine.join().unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.dtype, Dtype::Bf16);
        assert_eq!(
            resp.outcome,
            Outcome::Ok(Tensor::Bf16(vec![bf16::from_f32(2.0); 24]))
        );
        assert_eq!(s.served.snapshot().0, 3);
        assert_eq!(s.metrics.forward_requests.get(), 1);
    }

    #[tokio::test]
    async fn the_queue_pools_whole_requests_up_to_the_cap_and_close_refuses_the_rest() {
        let s = shared(Duration::from_secs(30));
        let mut waiting = Vec::new();
        for rows in [5, 6, 7] {
            let s = s.clone();
            let (h, r) = req(rows);
            waiting.push(tokio::spawn(async move { serve(&s, h, r).await }));
        }
        while s.forward.pending_rows() != vec![(0, 18)] {
            tokio::task::yield_now().await;
        }
        // Any two of 5, 6 and 7 rows fit in 16; the third would not (whole requests only).
        let taken = s.forward.take(0, 16);
        assert_eq!(taken.len(), 2);
        assert!(taken.iter().map(|p| p.x.len() / 8).sum::<usize>() <= 16);
        for p in taken {
            let _ = p.reply.send(Ok(p.x.clone()));
        }
        s.forward
            .close(Refusal::unavailable("the group has stopped"));
        let mut statuses: Vec<u16> = Vec::new();
        for w in waiting {
            statuses.push(w.await.unwrap().status());
        }
        statuses.sort();
        assert_eq!(statuses, vec![200, 200, 503]);
        let (h, r) = req(1);
        assert_eq!(serve(&s, h, r).await.status(), 503);
    }
}
