//! The forward API's serving side (docs/forward-api.md): admission of requests (checks against
//! the model), the per-layer queue the engine drains into rounds, and the wait for an answer
//! with its bound (503 with Retry-After, exactly once).
//!
//! A request is an [`Entry`] (`forward/queue.rs`) that moves `Queued -> Taken` (the engine put
//! it in a round and will answer it) or `Queued -> Cancelled` (its caller stopped waiting and
//! was answered 503). The two transitions are one compare-and-swap, so a request is never both
//! computed for nobody and refused, and never answered twice.

pub mod http;
pub(crate) mod queue;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use half::bf16;
use moe_api::forward::{ForwardRequest, ForwardResponse, RequestHeader, Tensor};
use tokio::sync::oneshot;

use crate::config::TrafficMode;
use crate::state::Shared;

pub use queue::{Answer, Entry, Payload, Queue, Refusal, Served, Settings};

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
    let entry = Arc::new(Entry::new(
        a.header.rows as usize,
        Payload {
            x: a.x,
            routing: a.routing,
            reply: tx,
        },
    ));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ModelShape, Scoring};
    use crate::model::{SyntheticShape, synthetic};
    use moe_api::forward::{Dtype, Outcome};
    use std::time::Duration;

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
