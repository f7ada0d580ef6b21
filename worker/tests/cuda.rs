//! The CUDA backend against the single-process CPU reference (bf16 tolerance), with a remap.
//! Prints a SKIPPED line and passes where no GPU is present (CI); runs on the GPU machines.

mod common;

use std::time::{Duration, Instant};

use common::*;
use half::bf16;
use moe_api::{PlacementDocument, RemapMode, RemapRequest, RemapState, WorkerStatus};
use moe_worker::config::WeightsSource;
use moe_worker::engine::reference_forward;
use moe_worker::weights::WeightStore;

fn close(got: &[bf16], want: &[bf16]) -> Result<(), String> {
    let mut worst = 0.0f32;
    for (a, b) in got.iter().zip(want) {
        let (a, b) = (a.to_f32(), b.to_f32());
        let err = (a - b).abs() / (1.0 + b.abs());
        worst = worst.max(err);
    }
    if got.len() != want.len() || worst > 0.03 {
        return Err(format!("worst relative error {worst}"));
    }
    Ok(())
}

/// Waits until every rank's status reports `generation` served and its remap succeeded, on the
/// CUDA backend; returns the bytes the ranks received in that remap.
async fn bytes_once_succeeded(
    status_url: impl Fn(usize) -> String,
    world: usize,
    generation: u64,
    deadline: Instant,
) -> u64 {
    let mut received = 0;
    for rank in 0..world {
        loop {
            let s: WorkerStatus = get_json(&status_url(rank)).await;
            assert_eq!(s.backend, "cuda");
            if s.placement_generation == generation
                && let Some(p) = s
                    .remap
                    .as_ref()
                    .filter(|p| p.state == RemapState::Succeeded)
            {
                received += p.bytes_moved;
                break;
            }
            assert!(Instant::now() < deadline, "{s:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    received
}

async fn run(world: usize) {
    let dir = tempfile::tempdir().unwrap();
    let flags = |_: usize| {
        let mut v = strings(&[
            "--backend",
            "cuda",
            "--num-layers",
            "2",
            "--num-experts",
            "8",
            "--redundant-experts",
            "0",
            "--hidden",
            "256",
            "--intermediate",
            "128",
            "--top-k",
            "2",
            "--traffic-tokens-per-step",
            "64",
            "--traffic-steps-per-second",
            "100",
            "--weights",
            "synthetic:4",
        ]);
        v.push("--control-token-file".into());
        v.push(token_file(dir.path()));
        v
    };
    let shape = config(0, world, 1, &flags(0)).shape;
    let g = start_group(world, flags).await;
    g.wait_ready().await;
    let current: PlacementDocument = get_json(&g.url(0, "/v1/placement")).await;
    // Generation 1 (asynchronous): layer 0 swaps rank 0's first two slots (local copies, each
    // slot both a source and a destination), layer 1 reverses every slot (remote transfers
    // between ranks, over the remap communicator). Generation 2 (stop-the-world): back.
    let mut next = current.clone();
    next.generation = 1;
    next.phy2log[0].swap(0, 1);
    next.phy2log[1].reverse();
    let mut back = current.clone();
    back.generation = 2;
    for (generation, placement, mode) in [
        (1, next, RemapMode::Async),
        (2, back, RemapMode::StopTheWorld),
    ] {
        let body = serde_json::to_string(&RemapRequest {
            placement,
            layers: vec![],
            mode,
        })
        .unwrap();
        let (code, v) = post_remap(&g.url(0, "/v1/remap"), Some(TOKEN), body).await;
        assert_eq!(code, 202, "{v}");
        let deadline = Instant::now() + Duration::from_secs(60);
        let received = bytes_once_succeeded(
            |rank| g.url(rank, "/v1/status"),
            world,
            generation,
            deadline,
        )
        .await;
        if world > 1 {
            // Layer 1's reversal sends every expert to another rank: 8 experts' bytes.
            assert_eq!(
                received,
                8 * shape.expert_bytes() as u64,
                "generation {generation}"
            );
        }
        // Some steps on this placement before the next remap.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let sinks = g.stop().await;
    let store = WeightStore::open(&WeightsSource::Synthetic { seed: 4 }, &shape).unwrap();
    let mut gens = std::collections::BTreeSet::new();
    for (rank, rx) in sinks.into_iter().enumerate() {
        for (i, rec) in rx.try_iter().enumerate() {
            gens.insert(rec.layer_generations.clone());
            // Every step: a forward pass that mixed old and new weights or maps of a layer
            // would not match the reference.
            let want = reference_forward(&store, &shape, &rec.batch).unwrap();
            close(&rec.output, &want)
                .unwrap_or_else(|e| panic!("rank {rank} step {} (record {i}): {e}", rec.step));
        }
    }
    for g in [[0, 0], [1, 1], [2, 2]] {
        assert!(gens.contains(g.as_slice()), "{gens:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuda_backend_matches_the_cpu_reference() {
    let gpus = match moe_worker::cuda_exec::unavailable() {
        Some(why) => {
            eprintln!("SKIPPED cuda_backend_matches_the_cpu_reference: {why}");
            return;
        }
        None => moe_kernels::cuda::available().unwrap_or(0),
    };
    run(1).await;
    for world in [2, 4] {
        if gpus >= world {
            run(world).await;
        } else {
            eprintln!("SKIPPED the {world}-rank CUDA group: {gpus} GPU visible");
        }
    }
}

/// The `moe-worker` binary as one process per GPU (how pods run it): the group forms over the
/// TCP rendezvous, NCCL joins with the ids rank 0 hands out, an asynchronous remap moves
/// weights between the processes' GPUs, and SIGTERM stops the group with exit code 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuda_workers_as_processes_remap_and_stop() {
    use std::process::{Command, Stdio};
    let gpus = match moe_worker::cuda_exec::unavailable() {
        Some(why) => {
            eprintln!("SKIPPED cuda_workers_as_processes_remap_and_stop: {why}");
            return;
        }
        None => moe_kernels::cuda::available().unwrap_or(0),
    };
    if gpus < 2 {
        eprintln!("SKIPPED cuda_workers_as_processes_remap_and_stop: {gpus} GPU visible");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path());
    let port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let leader = port();
    let http = [port(), port()];
    let mut children: Vec<_> = (0..2)
        .map(|rank: usize| {
            // MOE_WORKER_BIN: the binary where the test runs elsewhere than it was built (GPU
            // machines get the test and the binary carried over).
            let bin = std::env::var("MOE_WORKER_BIN")
                .unwrap_or_else(|_| env!("CARGO_BIN_EXE_moe-worker").to_string());
            let mut cmd = Command::new(bin);
            cmd.env("MOE_RANK", rank.to_string())
                .env("MOE_WORLD_SIZE", "2")
                .env("MOE_LEADER_ADDR", format!("127.0.0.1:{leader}"))
                .env(
                    "MOE_COMM_PORT",
                    if rank == 0 { leader } else { 0 }.to_string(),
                )
                .env("MOE_HTTP_PORT", http[rank].to_string())
                .env("MOE_ADVERTISE_ADDR", "127.0.0.1")
                .env("MOE_BACKEND", "cuda")
                .env("MOE_NUM_LAYERS", "2")
                .env("MOE_NUM_EXPERTS", "8")
                .env("MOE_HIDDEN", "256")
                .env("MOE_INTERMEDIATE", "128")
                .env("MOE_TOP_K", "2")
                .env("MOE_TRAFFIC_TOKENS_PER_STEP", "64")
                .env("MOE_TRAFFIC_STEPS_PER_SECOND", "100")
                .env("MOE_CONTROL_TOKEN_FILE", &token)
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            cmd.spawn().expect("spawn moe-worker")
        })
        .collect();
    let url = |rank: usize, path: &str| format!("http://127.0.0.1:{}{path}", http[rank]);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut ready = 0;
        for rank in 0..2 {
            if let Ok(r) = reqwest::get(url(rank, "/readyz")).await
                && r.status().is_success()
            {
                ready += 1;
            }
        }
        if ready == 2 {
            break;
        }
        for c in &mut children {
            assert!(c.try_wait().unwrap().is_none(), "a worker exited early");
        }
        assert!(Instant::now() < deadline, "the group never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut next: PlacementDocument = get_json(&url(0, "/v1/placement")).await;
    next.generation = 1;
    next.phy2log[1].reverse();
    let body = serde_json::to_string(&RemapRequest {
        placement: next,
        layers: vec![],
        mode: RemapMode::Async,
    })
    .unwrap();
    let (code, v) = post_remap(&url(0, "/v1/remap"), Some(TOKEN), body).await;
    assert_eq!(code, 202, "{v}");
    let received = bytes_once_succeeded(|rank| url(rank, "/v1/status"), 2, 1, deadline).await;
    // Layer 1 reversed: each rank's 4 experts go to the other rank.
    assert_eq!(received, 8 * 3 * 256 * 128 * 2);
    let pid = children[1].id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    for (rank, c) in children.iter_mut().enumerate() {
        let stop = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = c.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < stop, "rank {rank} did not stop");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut err = String::new();
        if let Some(mut e) = c.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        assert_eq!(status.code(), Some(0), "rank {rank}:\n{err}");
    }
}
