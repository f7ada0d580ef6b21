//! A multi-rank CPU group in one process: outputs against the single-process reference,
//! load statistics, an asynchronous remap through the HTTP API that lowers PAR, and a
//! stop-the-world remap, with identical outputs throughout.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use moe_api::{LoadReport, PlacementDocument, RemapMode, RemapRequest, RemapState, WorkerStatus};
use moe_worker::config::WeightsSource;
use moe_worker::engine::reference_forward;
use moe_worker::stats::par;
use moe_worker::weights::WeightStore;

const WORLD: usize = 4;

fn flags(dir: &std::path::Path, rank: usize) -> Vec<String> {
    let mut v = strings(&[
        "--num-layers",
        "2",
        "--num-experts",
        "8",
        "--redundant-experts",
        "4",
        "--hidden",
        "32",
        "--intermediate",
        "48",
        "--top-k",
        "2",
        // DeepSeek-V3 gating on synthetic weights: sigmoid, correction bias, groups scored by
        // their top two, scaling 2.5, a shared expert on every rank.
        "--family",
        "deepseek_v3",
        "--expert-groups",
        "4",
        "--topk-groups",
        "2",
        "--traffic-tokens-per-step",
        "24",
        "--traffic-skew",
        "1.3",
        "--traffic-seed",
        "5",
        "--traffic-steps-per-second",
        "150",
        "--stats-window",
        "30",
        "--weights",
        "synthetic:11",
        "--load-history-steps",
        "10",
    ]);
    v.push("--control-token-file".into());
    v.push(token_file(dir));
    v.push("--load-history-file".into());
    v.push(
        dir.join(format!("load-{rank}.json"))
            .to_string_lossy()
            .into_owned(),
    );
    v
}

/// The group's load (sum over ranks) and its PAR per layer, once every rank has a full window.
async fn group_par(g: &Group, min_steps: u64) -> (Vec<Vec<f64>>, Vec<f64>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut reports = Vec::new();
        for r in 0..WORLD {
            reports.push(get_json::<LoadReport>(&g.url(r, "/v1/load")).await);
        }
        if reports.iter().all(|r| r.window_steps >= min_steps) {
            let total = LoadReport::sum_slot_counts(&reports);
            let pars = total.iter().map(|c| par(c, WORLD)).collect();
            return (total, pars);
        }
        assert!(Instant::now() < deadline, "windows never filled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_remap(g: &Group, generation: u64) -> Vec<WorkerStatus> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut all = Vec::new();
        for r in 0..WORLD {
            all.push(get_json::<WorkerStatus>(&g.url(r, "/v1/status")).await);
        }
        if all.iter().all(|s| {
            s.placement_generation == generation
                && s.remap
                    .as_ref()
                    .is_some_and(|p| p.state == RemapState::Succeeded)
        }) {
            return all;
        }
        for s in &all {
            if let Some(p) = &s.remap {
                assert_ne!(p.state, RemapState::Failed, "remap failed: {p:?}");
            }
        }
        assert!(
            Instant::now() < deadline,
            "remap to {generation} never finished: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A better placement for the measured load, from the planner library.
fn plan(current: &PlacementDocument, load: &[Vec<f64>]) -> PlacementDocument {
    let logical = LoadReport::logical_load(load, current);
    let history = eplb::LoadHistory::single(logical).unwrap();
    let shape = eplb::Shape::new(8, 4, WORLD, 1, 1).unwrap();
    let prev = eplb::Placement::from_document(current).unwrap();
    let req = eplb::PlanRequest::new(shape, &history)
        .previous(&prev)
        .threads(1);
    let plan = eplb::planner_by_name("greedy").unwrap().plan(&req).unwrap();
    plan.placement.to_document(current.generation + 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_rank_group_matches_reference_and_async_remap_lowers_par() {
    let dir = tempfile::tempdir().unwrap();
    let g = start_group(WORLD, |r| flags(dir.path(), r)).await;
    g.wait_ready().await;

    let before: PlacementDocument = get_json(&g.url(0, "/v1/placement")).await;
    assert_eq!(before.generation, 0);
    let (load, par_before) = group_par(&g, 30).await;
    let target = plan(&before, &load);
    assert_ne!(
        target.phy2log, before.phy2log,
        "the planner should move something"
    );

    // Asynchronous remap, posted to one rank only: the group hands it to the others.
    let body = serde_json::to_string(&RemapRequest {
        placement: target.clone(),
        layers: vec![],
        mode: RemapMode::Async,
    })
    .unwrap();
    let (code, progress) = post_remap(&g.url(2, "/v1/remap"), Some(TOKEN), body.clone()).await;
    assert_eq!(code, 202, "{progress}");
    assert_eq!(progress["generation"], 1);
    // The same generation again (to another rank) is idempotent.
    let (code, _) = post_remap(&g.url(2, "/v1/remap"), Some(TOKEN), body).await;
    assert_eq!(code, 202);
    let statuses = wait_remap(&g, 1).await;
    let moved: u64 = statuses
        .iter()
        .map(|s| s.remap.as_ref().map_or(0, |p| p.bytes_moved))
        .sum();
    assert!(moved > 0, "a remap across ranks moves bytes: {statuses:?}");
    for s in &statuses {
        let p = s.remap.as_ref().unwrap();
        assert_eq!(p.layers_done, p.layers_total);
        assert_eq!(s.layer_generations, vec![1, 1]);
    }
    let after: PlacementDocument = get_json(&g.url(3, "/v1/placement")).await;
    assert_eq!(after, target);

    let (_, par_after) = group_par(&g, 30).await;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(
        mean(&par_after) < mean(&par_before),
        "PAR before {par_before:?}, after {par_after:?}"
    );

    let metrics = get_text(&g.url(1, "/metrics")).await;
    assert!(
        metrics.contains("moe_worker_placement_generation{rank=\"1\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("moe_worker_remaps_total")
                && l.contains("succeeded")
                && l.ends_with(" 1")),
        "{metrics}"
    );

    // Stop-the-world back to the initial placement (generation 2).
    let mut back = before.clone();
    back.generation = 2;
    let body = serde_json::to_string(&RemapRequest {
        placement: back.clone(),
        layers: vec![1, 0],
        mode: RemapMode::StopTheWorld,
    })
    .unwrap();
    for r in 0..WORLD {
        let (code, v) = post_remap(&g.url(r, "/v1/remap"), Some(TOKEN), body.clone()).await;
        assert_eq!(code, 202, "rank {r}: {v}");
    }
    let statuses = wait_remap(&g, 2).await;
    assert!(
        statuses
            .iter()
            .all(|s| s.remap.as_ref().unwrap().mode == RemapMode::StopTheWorld)
    );
    // Stale now.
    let body = serde_json::to_string(&RemapRequest {
        placement: target,
        layers: vec![],
        mode: RemapMode::Async,
    })
    .unwrap();
    let (code, v) = post_remap(&g.url(0, "/v1/remap"), Some(TOKEN), body).await;
    assert_eq!(code, 409, "{v}");

    // Let a few steps run on the final placement, then stop the whole group.
    let step_now = get_json::<WorkerStatus>(&g.url(0, "/v1/status")).await.step;
    while get_json::<WorkerStatus>(&g.url(0, "/v1/status")).await.step < step_now + 5 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sinks = g.stop().await;

    // Every step of every rank, under every placement, equals the single-process reference.
    let cfg = config(0, WORLD, 1, &flags(dir.path(), 0));
    let store = WeightStore::from_config(&cfg).unwrap();
    assert!(store.model().correction_bias && store.model().shared.is_some());
    let shape = cfg.shape;
    let mut generations = BTreeSet::new();
    let mut checked = 0;
    for (rank, rx) in sinks.into_iter().enumerate() {
        let records: Vec<_> = rx.try_iter().collect();
        assert!(
            records.len() > 60,
            "rank {rank} ran {} steps",
            records.len()
        );
        let mut last_gen = None;
        for (i, rec) in records.iter().enumerate() {
            generations.insert(rec.layer_generations.clone());
            // Check the first steps, every step around a switch, and a sample of the rest.
            let switched = last_gen.as_ref() != Some(&rec.layer_generations);
            last_gen = Some(rec.layer_generations.clone());
            if i < 3 || switched || i % 25 == 0 {
                let want = reference_forward(&store, &shape, &rec.batch).unwrap();
                assert_eq!(rec.output, want, "rank {rank} step {} differs", rec.step);
                checked += 1;
            }
        }
    }
    assert!(checked > 20);
    assert!(generations.contains(&vec![0, 0]) && generations.contains(&vec![1, 1]));
    assert!(generations.contains(&vec![2, 2]), "{generations:?}");
    // Asynchronous: layers switch at different boundaries while serving continues.
    assert!(
        generations.contains(&vec![1, 0]) || generations.contains(&vec![0, 1]),
        "{generations:?}"
    );
    // Stop-the-world: every layer at once.
    assert!(
        !generations.contains(&vec![2, 1]) && !generations.contains(&vec![1, 2]),
        "{generations:?}"
    );

    // The load history is in moectl's format.
    let text = std::fs::read_to_string(dir.path().join("load-0.json")).unwrap();
    let history = eplb::LoadHistory::from_json_str(&text).unwrap();
    assert!(history.num_windows() >= 3);
    assert_eq!((history.num_layers(), history.num_experts()), (2, 8));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newest_committed_placement_wins_at_start() {
    // Rank 1 restarts with the committed generation-3 placement; rank 0's file is older.
    let dir = tempfile::tempdir().unwrap();
    let mut newer = PlacementDocument {
        generation: 3,
        num_layers: 1,
        num_logical_experts: 4,
        num_ranks: 2,
        num_nodes: 1,
        phy2log: vec![vec![3, 1, 2, 0]],
    };
    let p1 = dir.path().join("p1.json");
    std::fs::write(&p1, serde_json::to_string(&newer).unwrap()).unwrap();
    let mut older = newer.clone();
    older.generation = 2;
    older.phy2log = vec![vec![0, 1, 2, 3]];
    let p0 = dir.path().join("p0.json");
    std::fs::write(&p0, serde_json::to_string(&older).unwrap()).unwrap();
    let g = start_group(2, |r| {
        let mut v = strings(&[
            "--num-layers",
            "1",
            "--num-experts",
            "4",
            "--hidden",
            "16",
            "--intermediate",
            "16",
            "--initial-placement",
            "file",
            "--traffic-steps-per-second",
            "100",
        ]);
        v.push("--placement-file".into());
        v.push(
            (if r == 0 { &p0 } else { &p1 })
                .to_string_lossy()
                .into_owned(),
        );
        v
    })
    .await;
    g.wait_ready().await;
    for r in 0..2 {
        let p: PlacementDocument = get_json(&g.url(r, "/v1/placement")).await;
        assert_eq!(p, newer, "rank {r}");
    }
    let sinks = g.stop().await;
    newer.generation = 0;
    assert!(sinks[1].try_iter().count() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_trace_matches_the_reference() {
    use moe_worker::traffic::TraceStep;
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.jsonl");
    let mut text = String::new();
    for step in 0..3u32 {
        let layer = |l: u32| -> Vec<Vec<u32>> {
            (0..6u32)
                .map(|t| vec![(t + step + l) % 4, (t + 2 * step + l + 1) % 4])
                .collect()
        };
        let s = TraceStep {
            topk_ids: vec![layer(0), layer(1)],
        };
        text.push_str(&serde_json::to_string(&s).unwrap());
        text.push('\n');
    }
    std::fs::write(&trace, text).unwrap();
    let flags = |_: usize| {
        let mut v = strings(&[
            "--num-layers",
            "2",
            "--num-experts",
            "4",
            "--hidden",
            "16",
            "--intermediate",
            "16",
            "--max-steps",
            "6",
        ]);
        v.push("--traffic-trace".into());
        v.push(trace.to_string_lossy().into_owned());
        v
    };
    let shape = config(0, 2, 1, &flags(0)).shape;
    let g = start_group(2, flags).await;
    let mut sinks = Vec::new();
    for (r, w) in g.workers.into_iter().enumerate() {
        w.wait().await.unwrap_or_else(|e| panic!("rank {r}: {e:#}"));
    }
    sinks.extend(g.sinks);
    let store = WeightStore::open(&WeightsSource::Synthetic { seed: 0 }, &shape).unwrap();
    for (rank, rx) in sinks.into_iter().enumerate() {
        let recs: Vec<_> = rx.try_iter().collect();
        assert_eq!(recs.len(), 6, "rank {rank}");
        for rec in recs {
            assert_eq!(
                rec.batch.x.len(),
                3 * 16,
                "three of the six tokens per rank"
            );
            let want = reference_forward(&store, &shape, &rec.batch).unwrap();
            assert_eq!(rec.output, want, "rank {rank} step {}", rec.step);
        }
    }
}
