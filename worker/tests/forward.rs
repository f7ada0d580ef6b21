//! The forward API on 2-rank CPU groups serving a real fixture checkpoint (`qwen3_moe`:
//! decoder layer 0 dense, layers 1 and 2 MoE, hidden 64, 16 experts, top-4): answers equal
//! the single-process reference of the layer (`engine::reference_layer`, itself checked against
//! transformers in tests/reference.rs) bit for bit, whichever rank and transport a request
//! takes and whatever it was pooled with; bad input gets a status and a reason while the group
//! keeps serving; clients that die or stall mid-request do not hold anyone up; requests across
//! asynchronous and stop-the-world remaps are all answered once, under one placement.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use half::bf16;
use moe_api::forward::client::{Client, ClientError, Stream};
use moe_api::forward::{
    ForwardRequest, ForwardResponse, Outcome, Routing, STREAM_PROTOCOL, Tensor,
};
use moe_api::{LoadReport, PlacementDocument, RemapMode, RemapRequest, RemapState, WorkerStatus};
use moe_kernels::Matrix;
use moe_worker::config::{ModelShape, Scoring, WeightsSource};
use moe_worker::engine::reference_layer;
use moe_worker::weights::WeightStore;

const HIDDEN: usize = 64;
const TOP_K: usize = 4;
const EXPERTS: usize = 16;
/// Decoder layers of the fixture that are MoE (worker layers 0 and 1).
const MOE_DECODER: [u32; 2] = [1, 2];

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models/qwen3_moe")
}

fn flags(extra: &[&str]) -> Vec<String> {
    let mut v = strings(&[
        "--traffic",
        "api",
        "--weights",
        fixture().to_str().unwrap(),
        "--stats-window",
        "1000",
    ]);
    v.extend(strings(extra));
    v
}

fn store() -> WeightStore {
    let desc = moe_model::ModelDescription::from_path(&fixture()).unwrap();
    let shape = ModelShape {
        num_layers: desc.num_moe_layers(),
        num_experts: desc.num_experts,
        hidden: desc.hidden,
        intermediate: desc.intermediate,
        top_k: desc.top_k,
        expert_groups: desc.expert_groups,
        topk_groups: desc.topk_groups,
        scoring: Scoring::Softmax,
        redundant: 0,
        world_size: 1,
        expert_bias: false,
    };
    WeightStore::open(&WeightsSource::Safetensors { dir: fixture() }, &shape).unwrap()
}

/// Deterministic rows of unit scale (`t` rows, seed `s`).
fn rows(t: usize, s: u64) -> Vec<bf16> {
    (0..t * HIDDEN)
        .map(|i| {
            let v = moe_worker::placement::splitmix64(s.wrapping_mul(1_000_003) ^ i as u64);
            bf16::from_f32(((v >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
        })
        .collect()
}

/// The single-process reference of MoE layer `moe` on `x` (router routing or forced ids).
fn reference(store: &WeightStore, moe: usize, x: &[bf16], forced: Option<&[u32]>) -> Vec<bf16> {
    let xm = Matrix::from_vec(x.len() / HIDDEN, HIDDEN, x.to_vec()).unwrap();
    let (out, _) = reference_layer(store, moe, &xm, forced).unwrap();
    out.as_slice().to_vec()
}

fn endpoint(g: &Group, rank: usize) -> String {
    format!("http://{}", g.workers[rank].forward_addr)
}

fn bf16s(t: Tensor) -> Vec<bf16> {
    match t {
        Tensor::Bf16(v) => v,
        Tensor::F32(_) => panic!("asked for bf16, got f32"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_clients_on_both_ranks_get_the_reference_output() {
    let g = start_group(2, |_| flags(&[])).await;
    g.wait_ready().await;
    let store = Arc::new(store());
    // Streams and one-shot clients on both ranks, all at once, on both MoE layers; sizes
    // 1..37 rows so the rounds pool requests of several clients and ranks.
    let mut tasks = Vec::new();
    for c in 0..8usize {
        let (ep, store) = (endpoint(&g, c % 2), store.clone());
        tasks.push(tokio::spawn(async move {
            let stream = (c % 4 < 2).then_some(());
            let mut answered = 0;
            let s = match stream {
                Some(()) => Some(Stream::connect(&ep, None).await.unwrap()),
                None => None,
            };
            let mut one = match stream {
                Some(()) => None,
                None => Some(Client::connect(&ep, None).await.unwrap()),
            };
            for i in 0..6usize {
                let t = 1 + (c * 7 + i * 5) % 37;
                let x = rows(t, (c * 100 + i) as u64);
                let moe = (c + i) % 2;
                let got = match (&s, &mut one) {
                    (Some(s), _) => s
                        .forward(MOE_DECODER[moe], HIDDEN, Tensor::Bf16(x.clone()), None)
                        .await
                        .unwrap(),
                    (None, Some(one)) => one
                        .forward(MOE_DECODER[moe], HIDDEN, Tensor::Bf16(x.clone()), None)
                        .await
                        .unwrap(),
                    _ => unreachable!(),
                };
                assert!(
                    bf16s(got) == reference(&store, moe, &x, None),
                    "client {c} request {i}: {t} rows at MoE layer {moe} differ from the reference"
                );
                answered += t;
            }
            answered
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }

    // Pipelined: 32 requests in flight on one stream, answered out of order, matched by id.
    let s = Arc::new(Stream::connect(&endpoint(&g, 1), None).await.unwrap());
    let mut inflight = Vec::new();
    for i in 0..32u64 {
        let s = s.clone();
        let x = rows(3, 5000 + i);
        inflight.push(tokio::spawn(async move {
            let y = s
                .forward(MOE_DECODER[1], HIDDEN, Tensor::Bf16(x.clone()), None)
                .await
                .unwrap();
            (x, bf16s(y))
        }));
    }
    for h in inflight {
        let (x, y) = h.await.unwrap();
        assert!(y == reference(&store, 1, &x, None));
        total += 3;
    }

    // f32 in, f32 out: the rows are rounded to bf16 and the answer widened.
    let x = rows(5, 9);
    let xf: Vec<f32> = x.iter().map(|v| v.to_f32() + 1e-4).collect();
    let got = s
        .forward(MOE_DECODER[0], HIDDEN, Tensor::F32(xf.clone()), None)
        .await
        .unwrap();
    let want: Vec<f32> = reference(&store, 0, &Tensor::F32(xf).to_bf16(), None)
        .iter()
        .map(|v| v.to_f32())
        .collect();
    assert_eq!(got, Tensor::F32(want));
    total += 5;

    // Caller routing: the router's own choice gives the router's answer; other ids with 1/k
    // weights give the reference with those ids forced.
    let x = rows(6, 11);
    let xm = Matrix::from_vec(6, HIDDEN, x.clone()).unwrap();
    let (_, topk) = reference_layer(&store, 1, &xm, None).unwrap();
    let routed = Routing {
        top_k: TOP_K,
        ids: topk.ids.clone(),
        weights: topk.weights.clone(),
    };
    let got = s
        .forward(
            MOE_DECODER[1],
            HIDDEN,
            Tensor::Bf16(x.clone()),
            Some(routed),
        )
        .await
        .unwrap();
    assert!(bf16s(got) == reference(&store, 1, &x, None));
    let ids: Vec<u32> = (0..6 * TOP_K as u32)
        .map(|i| (i * 5) % EXPERTS as u32)
        .collect();
    let forced = Routing {
        top_k: TOP_K,
        ids: ids.clone(),
        weights: vec![1.0 / TOP_K as f32; 6 * TOP_K],
    };
    let got = s
        .forward(
            MOE_DECODER[1],
            HIDDEN,
            Tensor::Bf16(x.clone()),
            Some(forced),
        )
        .await
        .unwrap();
    assert!(bf16s(got) == reference(&store, 1, &x, Some(&ids)));
    total += 12;
    // Zero rows: an empty answer.
    let got = s
        .forward(MOE_DECODER[0], HIDDEN, Tensor::Bf16(Vec::new()), None)
        .await
        .unwrap();
    assert!(got.is_empty());

    // Status and statistics come from the rows served.
    let mut served = 0;
    let mut reports = Vec::new();
    for r in 0..2 {
        let st: WorkerStatus = get_json(&g.url(r, "/v1/status")).await;
        assert_eq!(st.traffic, "api");
        assert!(st.served_rows_per_second > 0.0, "{st:?}");
        served += st.served_rows_total as usize;
        reports.push(get_json::<LoadReport>(&g.url(r, "/v1/load")).await);
    }
    assert_eq!(served, total);
    let counts = LoadReport::sum_slot_counts(&reports);
    let routed: f64 = counts.iter().flatten().sum();
    assert_eq!(routed as usize, total * TOP_K);
    assert!(reports.iter().all(|r| r.window_steps > 0 && r.step > 0));
    // Every rank counts the same rounds.
    assert_eq!(reports[0].step, reports[1].step);
    let metrics = get_text(&g.url(0, "/metrics")).await;
    for name in [
        "moe_worker_forward_rows_total",
        "moe_worker_forward_requests_total",
        "moe_worker_forward_round_duration_seconds_bucket",
    ] {
        assert!(metrics.contains(name), "{name} missing");
    }
    g.stop().await;
}

/// Sends `body` as `POST /v1/forward`; (status, reason or response).
async fn post(
    ep: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> Result<ForwardResponse, (u16, String, Option<u16>)> {
    let mut c = Client::connect(ep, token).await.unwrap();
    match c.send_raw(body).await {
        Ok((_, Some(resp))) => Ok(resp),
        Ok((s, None)) => Err((s, String::new(), None)),
        Err(ClientError::Server {
            status,
            reason,
            retry_after,
        }) => Err((status, reason, retry_after)),
        Err(e) => panic!("{e}"),
    }
}

fn request(layer: u32, x: Vec<bf16>) -> ForwardRequest {
    ForwardRequest {
        id: 42,
        layer,
        hidden: HIDDEN,
        x: Tensor::Bf16(x),
        routing: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_a_status_and_a_reason_and_the_group_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path());
    let g = start_group(2, |_| {
        flags(&["--client-token-file", &token, "--max-request-rows", "64"])
    })
    .await;
    g.wait_ready().await;
    let ep = endpoint(&g, 1);
    let tok = Some(TOKEN);
    let good = request(1, rows(2, 1));
    let with_routing = |ids: Vec<u32>, k: usize| ForwardRequest {
        routing: Some(Routing {
            top_k: k,
            weights: vec![0.25; ids.len()],
            ids,
        }),
        ..good.clone()
    };
    let mut truncated = good.encode();
    truncated.truncate(truncated.len() - 2);
    let mut long = good.encode();
    long.push(0);
    let mut bad_dtype = good.encode();
    bad_dtype[6] = 9;
    let mut bad_magic = good.encode();
    bad_magic[..4].copy_from_slice(b"NOPE");
    // (what, token, body, status, reason)
    type Case<'a> = (&'a str, Option<&'a str>, Vec<u8>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "no token",
            None,
            good.encode(),
            401,
            "missing Authorization",
        ),
        (
            "wrong token",
            Some("nope"),
            good.encode(),
            401,
            "invalid bearer token",
        ),
        ("truncated", tok, truncated, 400, "truncated body"),
        ("too long", tok, long, 400, "body too long"),
        ("dtype", tok, bad_dtype, 400, "bad dtype 9"),
        ("magic", tok, bad_magic, 400, "bad magic"),
        (
            "hidden",
            tok,
            ForwardRequest {
                hidden: 32,
                ..good.clone()
            }
            .encode(),
            400,
            "hidden 32 does not match the model's hidden size 64",
        ),
        (
            "dense",
            tok,
            request(0, rows(1, 2)).encode(),
            400,
            "dense decoder layer",
        ),
        (
            "unknown",
            tok,
            request(9, rows(1, 2)).encode(),
            400,
            "not a decoder layer",
        ),
        (
            "rows",
            tok,
            request(1, rows(65, 2)).encode(),
            413,
            "more than --max-request-rows 64",
        ),
        (
            "routing ids",
            tok,
            with_routing(vec![0, 1, 2, 99, 0, 1, 2, 3], TOP_K).encode(),
            400,
            "expert id 99 at row 0 is out of range",
        ),
        (
            "routing k",
            tok,
            with_routing(vec![0, 1, 0, 1], 2).encode(),
            400,
            "top_k 2 does not match the model's top-k 4",
        ),
    ];
    for (what, token, body, status, reason) in cases {
        let (s, r, _) = post(&ep, token, body)
            .await
            .err()
            .unwrap_or_else(|| panic!("{what}: accepted"));
        assert_eq!(s, status, "{what}: {r}");
        assert!(r.contains(reason), "{what}: {r}");
        assert!(!r.contains('\n'), "{what}: one line: {r:?}");
    }
    // The same on the stream: a readable bad frame is answered with its id and the stream
    // goes on; an unreadable one is answered with id 0 and closes it.
    let s = Stream::connect(&ep, tok).await.unwrap();
    let bad = request(0, rows(1, 3)).encode();
    let r = s.send_frame(42, bad).await.unwrap();
    assert_eq!(r.id, 42);
    assert!(
        matches!(&r.outcome, Outcome::Err { status: 400, reason, .. } if reason.contains("dense"))
    );
    let ok = s
        .forward(1, HIDDEN, Tensor::Bf16(rows(2, 1)), None)
        .await
        .unwrap();
    assert_eq!(ok.len(), 2 * HIDDEN);
    let mut magic = good.encode();
    magic[0] = 0;
    let r = s.send_frame(0, magic).await.unwrap();
    assert_eq!((r.id, r.status()), (0, 400));
    assert!(
        s.forward(1, HIDDEN, Tensor::Bf16(rows(1, 1)), None)
            .await
            .is_err()
    );
    // The stream's upgrade needs the token too.
    let e = Stream::connect(&ep, Some("nope")).await.err().unwrap();
    assert!(matches!(e, ClientError::Server { status: 401, .. }), "{e}");

    // Everyone else was served all along.
    let good_answer = post(&ep, tok, good.encode()).await.unwrap();
    assert_eq!(good_answer.status(), 200);
    assert_eq!(good_answer.id, 42);
    let errors = get_text(&g.url(1, "/metrics")).await;
    assert!(
        errors
            .lines()
            .any(|l| l.starts_with("moe_worker_forward_errors_total")
                && l.contains("status=\"400\"")),
        "{errors}"
    );
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn not_ready_and_not_serving_groups_answer_503() {
    // A group whose second rank never comes: rank 0 is not ready.
    let lonely = start_group_ranks(2, &[0], |_| flags(&[])).await;
    let e = post(&endpoint(&lonely, 0), None, request(1, rows(1, 1)).encode())
        .await
        .err()
        .unwrap();
    assert_eq!(e.0, 503);
    assert!(e.1.contains("not ready"), "{}", e.1);
    assert_eq!(e.2, Some(1));
    let e = Stream::connect(&endpoint(&lonely, 0), None)
        .await
        .err()
        .unwrap();
    assert!(matches!(e, ClientError::Server { status: 503, .. }), "{e}");
    // A generator group does not serve the forward API.
    let gen_group = start_group(1, |_| {
        strings(&[
            "--weights",
            fixture().to_str().unwrap(),
            "--traffic",
            "generator",
            "--max-steps",
            "2",
        ])
    })
    .await;
    gen_group.wait_ready().await;
    let e = post(
        &endpoint(&gen_group, 0),
        None,
        request(1, rows(1, 1)).encode(),
    )
    .await
    .err()
    .unwrap();
    assert_eq!(e.0, 503);
    assert!(e.1.contains("--traffic generator"), "{}", e.1);
}

/// Raw HTTP on a socket: a client that sends part of a request and then stalls or dies.
fn raw_partial(addr: std::net::SocketAddr, upgrade: bool) -> std::net::TcpStream {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let body = request(1, rows(8, 1)).encode();
    if upgrade {
        write!(
            s,
            "POST /v1/forward/stream HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: {STREAM_PROTOCOL}\r\n\r\n"
        )
        .unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 101"));
        s.write_all(&(body.len() as u32).to_le_bytes()).unwrap();
        s.write_all(&body[..body.len() / 2]).unwrap();
    } else {
        write!(
            s,
            "POST /v1/forward HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        s.write_all(&body[..body.len() / 2]).unwrap();
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_that_stall_or_die_mid_request_hold_nobody_up() {
    let g = start_group(2, |_| flags(&[])).await;
    g.wait_ready().await;
    let store = store();
    // Two stalled clients (half a body, half a frame) hold their sockets open; two more die.
    let stalled = [
        raw_partial(g.workers[0].forward_addr, false),
        raw_partial(g.workers[1].forward_addr, true),
    ];
    drop(raw_partial(g.workers[0].forward_addr, true));
    drop(raw_partial(g.workers[1].forward_addr, false));
    // A stream whose client disappears with requests in flight.
    {
        let s = Arc::new(Stream::connect(&endpoint(&g, 0), None).await.unwrap());
        for i in 0..4 {
            let s = s.clone();
            tokio::spawn(async move {
                let _ = s.forward(1, HIDDEN, Tensor::Bf16(rows(16, i)), None).await;
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let s = Stream::connect(&endpoint(&g, 1), None).await.unwrap();
    for i in 0..10 {
        let x = rows(4, 700 + i);
        let t0 = Instant::now();
        let y = s
            .forward(2, HIDDEN, Tensor::Bf16(x.clone()), None)
            .await
            .unwrap();
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        assert!(bf16s(y) == reference(&store, 1, &x, None));
    }
    drop(stalled);
    g.stop().await;
}

/// The qwen3 fixture's placement on 2 ranks, reversed (every expert moves).
fn reversed(generation: u64) -> PlacementDocument {
    PlacementDocument {
        generation,
        num_layers: 2,
        num_logical_experts: EXPERTS,
        num_ranks: 2,
        num_nodes: 1,
        phy2log: vec![(0..EXPERTS as u32).rev().collect(); 2],
    }
}

async fn traffic_across_a_remap(mode: RemapMode, wait: &str) {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path());
    let g = start_group(2, |_| {
        flags(&[
            "--control-token-file",
            &token,
            "--forward-wait-seconds",
            wait,
        ])
    })
    .await;
    g.wait_ready().await;
    let store = Arc::new(store());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..4usize {
        let (ep, store, stop) = (endpoint(&g, c % 2), store.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let s = Stream::connect(&ep, None).await.unwrap();
            let (mut ok, mut retry) = (0usize, 0usize);
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let moe = (c + i as usize) % 2;
                let x = rows(1 + (i as usize % 9), c as u64 * 10_000 + i);
                match s
                    .forward(MOE_DECODER[moe], HIDDEN, Tensor::Bf16(x.clone()), None)
                    .await
                {
                    Ok(y) => {
                        assert!(
                            bf16s(y) == reference(&store, moe, &x, None),
                            "client {c} request {i}"
                        );
                        ok += 1;
                    }
                    Err(ClientError::Server {
                        status: 503,
                        retry_after: Some(_),
                        ..
                    }) => retry += 1,
                    Err(e) => panic!("client {c} request {i}: {e}"),
                }
                i += 1;
            }
            (ok, retry)
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let body = serde_json::to_string(&RemapRequest {
        placement: reversed(1),
        layers: vec![],
        mode,
    })
    .unwrap();
    let (code, v) = post_remap(&g.url(1, "/v1/remap"), Some(TOKEN), body).await;
    assert_eq!(code, 202, "{v}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st: WorkerStatus = get_json(&g.url(0, "/v1/status")).await;
        if st.placement_generation == 1
            && st
                .remap
                .as_ref()
                .is_some_and(|p| p.state == RemapState::Succeeded)
        {
            break;
        }
        assert!(Instant::now() < deadline, "{st:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (mut ok, mut retry) = (0, 0);
    for c in clients {
        let (o, r) = c.await.unwrap();
        ok += o;
        retry += r;
    }
    // Under a short wait bound a loaded machine refuses some; every request got one answer.
    assert!(ok > 0 && ok + retry > 20, "{ok} answered, {retry} refused");
    // Answered once each: the ranks answered exactly the 200s the clients received, and the
    // refused ones were never computed.
    let answered: u64 = g
        .workers
        .iter()
        .map(|w| w.shared.metrics.forward_requests.get())
        .sum();
    assert_eq!(answered as usize, ok, "{retry} refused");
    let refused: u64 = g
        .workers
        .iter()
        .map(|w| {
            w.shared
                .metrics
                .forward_errors
                .with_label_values(&["503"])
                .get()
        })
        .sum();
    assert_eq!(refused as usize, retry);
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_across_an_async_remap_are_answered_once_and_right() {
    traffic_across_a_remap(RemapMode::Async, "30").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_across_a_stop_the_world_remap_wait_or_get_503() {
    traffic_across_a_remap(RemapMode::StopTheWorld, "0.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_separate_forward_port_serves_only_the_forward_api() {
    let leader = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = leader.local_addr().unwrap().port();
    let config = config(0, 1, port, &flags(&[]));
    let hooks = moe_worker::Hooks {
        comm_listener: Some(leader),
        forward_listener: Some(std::net::TcpListener::bind("127.0.0.1:0").unwrap()),
        ..moe_worker::Hooks::default()
    };
    let w = moe_worker::start(config, hooks).await.unwrap();
    assert_ne!(w.forward_addr, w.http_addr);
    let g = Group {
        workers: vec![w],
        sinks: Vec::new(),
    };
    g.wait_ready().await;
    let store = store();
    let x = rows(3, 77);
    let s = Stream::connect(&endpoint(&g, 0), None).await.unwrap();
    let y = s
        .forward(1, HIDDEN, Tensor::Bf16(x.clone()), None)
        .await
        .unwrap();
    assert!(bf16s(y) == reference(&store, 0, &x, None));
    let http = format!("http://{}", g.workers[0].http_addr);
    let fwd = endpoint(&g, 0);
    let code = |url: String| async move { reqwest::get(url).await.unwrap().status().as_u16() };
    assert_eq!(code(format!("{http}/v1/status")).await, 200);
    assert_eq!(code(format!("{fwd}/v1/status")).await, 404);
    let e = post(&http, None, request(1, rows(1, 1)).encode())
        .await
        .err()
        .unwrap();
    assert_eq!(e.0, 404);
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rank_with_another_traffic_mode_is_refused_at_rendezvous() {
    let g = start_group(2, |r| {
        if r == 0 {
            flags(&[])
        } else {
            strings(&[
                "--weights",
                fixture().to_str().unwrap(),
                "--traffic",
                "generator",
            ])
        }
    })
    .await;
    let mut workers = g.workers.into_iter();
    let _rank0 = workers.next();
    let rank1 = workers.next().unwrap();
    let err = tokio::time::timeout(Duration::from_secs(30), rank1.wait())
        .await
        .expect("rank 1 gives up")
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("different configuration") && msg.contains("traffic="),
        "{msg}"
    );
}

/// The binary, configured through the environment names the operator sets: two processes,
/// the forward API on its own port behind a client token, a row limit; SIGTERM stops both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_the_forward_api_from_its_environment() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path());
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let leader = free();
    let mut ranks = Vec::new();
    let mut ports = Vec::new();
    for rank in 0..2 {
        let (http, fwd) = (free(), free());
        ports.push((http, fwd));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_moe-worker"))
            .env_clear()
            .env("MOE_RANK", rank.to_string())
            .env("MOE_WORLD_SIZE", "2")
            .env("MOE_LEADER_ADDR", format!("127.0.0.1:{leader}"))
            .env(
                "MOE_COMM_PORT",
                if rank == 0 { leader } else { 0 }.to_string(),
            )
            .env("MOE_HTTP_PORT", http.to_string())
            .env("MOE_FORWARD_PORT", fwd.to_string())
            .env("MOE_ADVERTISE_ADDR", "127.0.0.1")
            .env("MOE_BACKEND", "cpu")
            .env("MOE_WEIGHTS", fixture())
            .env("MOE_TRAFFIC", "api")
            .env("MOE_CLIENT_TOKEN_FILE", &token)
            .env("MOE_MAX_REQUEST_ROWS", "8")
            .env("MOE_RENDEZVOUS_TIMEOUT_SECONDS", "30")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        ranks.push(child);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for &(http, _) in &ports {
        loop {
            let ready = reqwest::get(format!("http://127.0.0.1:{http}/readyz"))
                .await
                .is_ok_and(|r| r.status() == 200);
            if ready {
                break;
            }
            assert!(Instant::now() < deadline, "the group did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let ep = format!("http://127.0.0.1:{}", ports[1].1);
    let s = Stream::connect(&ep, Some(TOKEN)).await.unwrap();
    let x = rows(8, 3);
    let y = s
        .forward(2, HIDDEN, Tensor::Bf16(x.clone()), None)
        .await
        .unwrap();
    assert!(bf16s(y) == reference(&store(), 1, &x, None));
    let e = s
        .forward(2, HIDDEN, Tensor::Bf16(rows(9, 3)), None)
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Server { status: 413, .. }), "{e}");
    let e = post(&ep, None, request(1, rows(1, 1)).encode())
        .await
        .err()
        .unwrap();
    assert_eq!(e.0, 401);
    let st: WorkerStatus = get_json(&format!("http://127.0.0.1:{}/v1/status", ports[1].0)).await;
    assert_eq!((st.traffic.as_str(), st.served_rows_total), ("api", 8));
    for child in &ranks {
        // SAFETY: signalling a child process this test started.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    }
    for mut child in ranks {
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "rank did not stop");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.code(), Some(0));
    }
}
