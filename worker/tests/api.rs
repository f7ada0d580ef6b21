//! The HTTP API of one rank: health, readiness, metrics, status, load, placement, and the
//! admission rules of POST /v1/remap (401 / 400 / 409 / 202, idempotence).

mod common;

use std::time::{Duration, Instant};

use common::*;
use moe_api::{LoadReport, PlacementDocument, RemapMode, RemapRequest, RemapState, WorkerStatus};

fn flags(token: Option<String>) -> Vec<String> {
    let mut v = strings(&[
        "--num-layers",
        "2",
        "--num-experts",
        "4",
        "--hidden",
        "16",
        "--intermediate",
        "16",
        "--traffic-tokens-per-step",
        "8",
        "--traffic-steps-per-second",
        "200",
        "--stats-window",
        "10",
    ]);
    if let Some(t) = token {
        v.push("--control-token-file".into());
        v.push(t);
    }
    v
}

fn request(p: &PlacementDocument, mode: RemapMode) -> String {
    serde_json::to_string(&RemapRequest {
        placement: p.clone(),
        layers: vec![],
        mode,
    })
    .unwrap()
}

async fn wait_generation(g: &Group, generation: u64) -> WorkerStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s: WorkerStatus = get_json(&g.url(0, "/v1/status")).await;
        if s.placement_generation == generation
            && s.remap
                .as_ref()
                .is_some_and(|p| p.state == RemapState::Succeeded)
        {
            return s;
        }
        assert!(Instant::now() < deadline, "{s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_and_remap_admission() {
    let dir = tempfile::tempdir().unwrap();
    let g = start_group(1, |_| flags(Some(token_file(dir.path())))).await;
    let health = reqwest::get(g.url(0, "/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
    g.wait_ready().await;

    let status: WorkerStatus = get_json(&g.url(0, "/v1/status")).await;
    assert!(status.ready);
    assert_eq!((status.rank, status.world_size), (0, 1));
    assert_eq!(status.backend, "cpu");
    let current: PlacementDocument = get_json(&g.url(0, "/v1/placement")).await;
    assert_eq!(current.generation, 0);
    assert_eq!(current.phy2log, vec![vec![0, 1, 2, 3]; 2]);
    // The model description, with the keys other tools read.
    let model: serde_json::Value = get_json(&g.url(0, "/v1/model")).await;
    assert_eq!(model["architecture"], "synthetic");
    assert_eq!(model["numExperts"], 4);
    assert_eq!(model["moeLayers"], serde_json::json!([0, 1]));
    assert_eq!(model["scoring"], "softmax");
    assert_eq!(model["sharedExperts"], 0);
    assert_eq!(model["weightDtype"], "bf16");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let load: LoadReport = get_json(&g.url(0, "/v1/load")).await;
    assert_eq!(load.slot_counts.len(), 2);
    assert_eq!(load.par.len(), 2);
    assert!(load.window_steps > 0 && load.window_steps <= 10);
    let total: f64 = load.slot_counts[0].iter().sum();
    assert_eq!(
        total,
        load.window_steps as f64 * 8.0 * 2.0,
        "tokens x top-k per step"
    );

    // Closed past windows on request: whole windows of --stats-window steps, in logical
    // counts, oldest first, ending at multiples of the window.
    assert!(load.history.is_empty(), "history only when asked for");
    let deadline = Instant::now() + Duration::from_secs(30);
    let with_history: LoadReport = loop {
        let r: LoadReport = get_json(&g.url(0, "/v1/load?history=2")).await;
        if r.history.len() == 2 {
            break r;
        }
        assert!(Instant::now() < deadline, "no 2 closed windows: {r:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for ep in &with_history.history {
        assert_eq!(ep.steps, 10);
        assert_eq!(ep.end_step % 10, 0);
        assert_eq!(ep.logical_counts.len(), 2);
        let tokens: f64 = ep.logical_counts[0].iter().sum();
        assert_eq!(tokens, 10.0 * 8.0 * 2.0, "tokens x top-k over the window");
    }
    assert!(with_history.history[0].end_step < with_history.history[1].end_step);

    let url = g.url(0, "/v1/remap");
    let mut next = current.clone();
    next.generation = 1;
    next.phy2log[1] = vec![3, 2, 1, 0];

    // 401: no token, wrong token.
    let (code, v) = post_remap(&url, None, request(&next, RemapMode::Async)).await;
    assert_eq!(code, 401, "{v}");
    let (code, _) = post_remap(&url, Some("wrong"), request(&next, RemapMode::Async)).await;
    assert_eq!(code, 401);
    // 400: malformed JSON, wrong shape, layers out of range, unlisted differing layer.
    let (code, v) = post_remap(&url, Some(TOKEN), "{not json".into()).await;
    assert_eq!(code, 400);
    assert!(v["error"].as_str().unwrap().contains("malformed"), "{v}");
    let mut bad = next.clone();
    bad.phy2log[0] = vec![0, 1, 2, 2];
    let (code, v) = post_remap(&url, Some(TOKEN), request(&bad, RemapMode::Async)).await;
    assert_eq!(code, 400);
    assert!(v["error"].as_str().unwrap().contains("expert 3"), "{v}");
    let mut bad = next.clone();
    bad.num_logical_experts = 5;
    let (code, _) = post_remap(&url, Some(TOKEN), request(&bad, RemapMode::Async)).await;
    assert_eq!(code, 400);
    let body = serde_json::to_string(&RemapRequest {
        placement: next.clone(),
        layers: vec![7],
        mode: RemapMode::Async,
    })
    .unwrap();
    let (code, v) = post_remap(&url, Some(TOKEN), body).await;
    assert_eq!(code, 400, "{v}");
    let body = serde_json::to_string(&RemapRequest {
        placement: next.clone(),
        layers: vec![0],
        mode: RemapMode::Async,
    })
    .unwrap();
    let (code, v) = post_remap(&url, Some(TOKEN), body).await;
    assert_eq!(code, 400);
    assert!(v["error"].as_str().unwrap().contains("layer 1"), "{v}");

    // The current generation with the current placement: idempotent 202.
    let (code, v) = post_remap(&url, Some(TOKEN), request(&current, RemapMode::Async)).await;
    assert_eq!(code, 202, "{v}");
    // The current generation with another placement: 409.
    let mut clash = next.clone();
    clash.generation = 0;
    let (code, v) = post_remap(&url, Some(TOKEN), request(&clash, RemapMode::Async)).await;
    assert_eq!(code, 409);
    assert_eq!(v["reason"], moe_api::CONFLICT_DIVERGED, "{v}");

    // 202, then the same generation again is idempotent (202, same generation).
    let (code, v) = post_remap(&url, Some(TOKEN), request(&next, RemapMode::Async)).await;
    assert_eq!(code, 202, "{v}");
    assert_eq!(v["generation"], 1);
    let (code, v) = post_remap(&url, Some(TOKEN), request(&next, RemapMode::Async)).await;
    assert_eq!(code, 202, "{v}");
    // The same generation with another placement: 409.
    let mut other = next.clone();
    other.phy2log[1] = vec![1, 0, 3, 2];
    let (code, v) = post_remap(&url, Some(TOKEN), request(&other, RemapMode::Async)).await;
    assert_eq!(code, 409, "{v}");
    assert_eq!(v["reason"], moe_api::CONFLICT_DIVERGED, "{v}");
    let s = wait_generation(&g, 1).await;
    assert_eq!(s.layer_generations, vec![1, 1]);
    let p = s.remap.unwrap();
    assert_eq!((p.layers_done, p.layers_total), (1, 1));
    assert_eq!(
        p.experts_moved, 4,
        "every slot of layer 1 changed (same-GPU copies)"
    );
    assert_eq!(p.bytes_moved, 0, "nothing crosses ranks in a group of one");
    let (code, v) = post_remap(&url, Some(TOKEN), request(&next, RemapMode::Async)).await;
    assert_eq!(code, 202, "idempotent after completion too: {v}");
    assert_eq!(v["state"], "succeeded");

    // 409: older generation.
    let (code, v) = post_remap(&url, Some(TOKEN), request(&current, RemapMode::Async)).await;
    assert_eq!(code, 409);
    assert!(v["error"].as_str().unwrap().contains("stale"), "{v}");

    let placement: PlacementDocument = get_json(&g.url(0, "/v1/placement")).await;
    assert_eq!(placement, next);

    let metrics = get_text(&g.url(0, "/metrics")).await;
    for name in [
        "moe_worker_step_duration_seconds_bucket",
        "moe_worker_tokens_total",
        "moe_worker_layer_imbalance_ratio{layer=\"1\"",
        "moe_worker_remap_duration_seconds_count{rank=\"0\"} 1",
        "moe_worker_remap_experts_moved_total{rank=\"0\"} 4",
        "moe_worker_remap_bytes_total",
        "moe_worker_remap_stall_seconds_total",
        "moe_worker_placement_generation{rank=\"0\"} 1",
        "moe_worker_ready{rank=\"0\"} 1",
        "moe_worker_expert_memory_bytes{rank=\"0\"} 12288",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remap_is_refused_without_a_configured_token() {
    let g = start_group(1, |_| flags(None)).await;
    g.wait_ready().await;
    let current: PlacementDocument = get_json(&g.url(0, "/v1/placement")).await;
    let (code, v) = post_remap(
        &g.url(0, "/v1/remap"),
        Some(TOKEN),
        request(&current, RemapMode::Async),
    )
    .await;
    assert_eq!(code, 401);
    assert!(
        v["error"].as_str().unwrap().contains("no control token"),
        "{v}"
    );
    g.stop().await;
}
