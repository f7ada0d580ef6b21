//! MoE-block outputs of real checkpoint layouts against the transformers reference.
//!
//! `fixtures/models/<case>/` holds tiny checkpoints written by transformers' `save_pretrained`
//! and, per MoE decoder layer, the input rows and the reference MoE block's outputs
//! (`fixtures/generate.py`). For every case present, on 1, 2 and 4 CPU ranks under a linear,
//! a round-robin and a planned placement with redundant replicas, the per-layer path of a
//! group must
//! 1. give exactly the single-process reference (`engine::reference_layer`) bit for bit, and
//! 2. match transformers: relative Frobenius error against `output_f32` (the module run in
//!    fp32) at most [`TOL_FACTOR`] times the reference's own bf16 error (`output_bf16` vs
//!    `output_f32`) on the same rows, and never above [`TOL_ABS`]; the top-k sets equal the
//!    reference's except where its scores tie within bf16 rounding; the routing weights equal
//!    the reference's within fp32 rounding.
//!
//! Why this tolerance: this worker computes the experts as a bf16 model does (bf16 operands,
//! fp32 accumulation, gate/up, activation and expert outputs rounded to bf16), so its error
//! against the fp32 module is of the size of the bf16 module's own error; the factor allows
//! for rounding at different points (transformers adds the weighted expert outputs in bf16 one
//! by one, this worker sums them in fp32 and rounds once). Rows whose experts differ are
//! excluded from the error (they are checked to be ties); a row routed differently by the
//! reference's own bf16 run is not, which only makes its error larger.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use half::bf16;
use moe_api::PlacementDocument;
use moe_kernels::{Bf16Matrix, F32Matrix, Matrix, cpu};
use moe_model::{ModelDescription, Scoring as MScoring};
use moe_worker::comm::{RendezvousConfig, form_group};
use moe_worker::config::{InitialPlacement, ModelShape, WeightsSource};
use moe_worker::engine::reference_layer;
use moe_worker::exec::CpuExec;
use moe_worker::model::gating_config;
use moe_worker::placement::initial_placement;
use moe_worker::weights::WeightStore;
use safetensors::SafeTensors;

/// Allowed multiple of the reference's own bf16 error.
const TOL_FACTOR: f64 = 2.0;
/// Allowed relative Frobenius error whatever the reference's bf16 error.
const TOL_ABS: f64 = 0.02;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models")
}

fn cases() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixtures())
        .expect("fixtures/models exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("reference.safetensors").exists())
        .collect();
    v.sort();
    v
}

struct LayerRef {
    decoder: usize,
    input: Bf16Matrix,
    f32_out: Vec<f32>,
    bf16_out: Vec<f32>,
    ids: Vec<i64>,
    weights: Vec<f32>,
    logits: F32Matrix,
}

fn tensor_f32(st: &SafeTensors<'_>, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(name).unwrap_or_else(|_| panic!("{name}"));
    let v = match t.dtype() {
        safetensors::Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        safetensors::Dtype::BF16 => t
            .data()
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        safetensors::Dtype::I64 => t
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        d => panic!("{name}: dtype {d:?}"),
    };
    (t.shape().to_vec(), v)
}

fn load_refs(dir: &Path, desc: &ModelDescription) -> Vec<LayerRef> {
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    desc.moe_layers
        .iter()
        .map(|&d| {
            let (shape, x) = tensor_f32(&st, &format!("layers.{d}.input"));
            let input = Matrix::from_f32(shape[0], shape[1], &x).unwrap();
            let (ls, l) = tensor_f32(&st, &format!("layers.{d}.router_logits"));
            LayerRef {
                decoder: d,
                input,
                f32_out: tensor_f32(&st, &format!("layers.{d}.output_f32")).1,
                bf16_out: tensor_f32(&st, &format!("layers.{d}.output_bf16")).1,
                ids: tensor_f32(&st, &format!("layers.{d}.topk_ids"))
                    .1
                    .iter()
                    .map(|&v| v as i64)
                    .collect(),
                weights: tensor_f32(&st, &format!("layers.{d}.topk_weights")).1,
                logits: Matrix::from_vec(ls[0], ls[1], l).unwrap(),
            }
        })
        .collect()
}

/// The expert scores the choice ranks by, from the reference's logits (softmax or sigmoid,
/// plus the correction bias).
fn choice_scores(desc: &ModelDescription, logits: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let mut s: Vec<f32> = match desc.scoring {
        MScoring::Softmax => {
            let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = logits.iter().map(|v| (v - m).exp()).collect();
            let z: f32 = e.iter().sum();
            e.iter().map(|v| v / z).collect()
        }
        MScoring::Sigmoid => logits.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect(),
    };
    if let Some(b) = bias {
        s.iter_mut().zip(b).for_each(|(a, b)| *a += b);
    }
    s
}

/// Checks the single-process reference layer against transformers; returns the per-layer
/// outputs (what every group run must reproduce bit for bit).
fn check_against_transformers(
    case: &str,
    store: &WeightStore,
    desc: &ModelDescription,
    refs: &[LayerRef],
) -> Vec<Bf16Matrix> {
    let k = desc.top_k;
    let gating = gating_config(desc);
    let mut outs = Vec::new();
    for (l, r) in refs.iter().enumerate() {
        let (out, topk) = reference_layer(store, l, &r.input, None).unwrap();
        let bias = store.correction_bias(l).unwrap();
        let t = r.input.rows();
        let h = desc.hidden;
        // Gating semantics: this worker's gating on the reference's own logits gives the
        // reference's experts and weights (strictly, tie-free up to fp32 rounding).
        let on_ref = cpu::gating_topk(&r.logits, &gating, bias.as_deref()).unwrap();
        let mut same_rows = Vec::new();
        let mut ties = 0;
        for row in 0..t {
            let want: BTreeSet<i64> = r.ids[row * k..(row + 1) * k].iter().copied().collect();
            let sem: BTreeSet<i64> = on_ref.ids[row * k..(row + 1) * k]
                .iter()
                .map(|&v| v as i64)
                .collect();
            assert_eq!(
                sem, want,
                "{case} layer {l} row {row}: gating on the reference logits"
            );
            let pairs = |ids: &[u32], w: &[f32]| -> Vec<(i64, f32)> {
                let mut v: Vec<(i64, f32)> = ids
                    .iter()
                    .map(|&i| i as i64)
                    .zip(w.iter().copied())
                    .collect();
                v.sort_by_key(|p| p.0);
                v
            };
            let mut rw: Vec<(i64, f32)> = r.ids[row * k..(row + 1) * k]
                .iter()
                .copied()
                .zip(r.weights[row * k..(row + 1) * k].iter().copied())
                .collect();
            rw.sort_by_key(|p| p.0);
            let sw = pairs(
                &on_ref.ids[row * k..(row + 1) * k],
                &on_ref.weights[row * k..(row + 1) * k],
            );
            for ((_, a), (_, b)) in rw.iter().zip(&sw) {
                assert!(
                    (a - b).abs() <= 1e-5 * a.abs().max(1.0),
                    "{case} layer {l} row {row}: routing weight {b}, reference {a}"
                );
            }
            // Our own logits: same experts, or a tie within bf16 rounding of the scores.
            let ours: BTreeSet<i64> = topk.ids[row * k..(row + 1) * k]
                .iter()
                .map(|&v| v as i64)
                .collect();
            if ours == want {
                same_rows.push(row);
            } else {
                let s = choice_scores(desc, r.logits.row(row), bias.as_deref());
                let lo = want.difference(&ours).map(|&e| s[e as usize]);
                let hi = ours.difference(&want).map(|&e| s[e as usize]);
                let gap = lo.zip(hi).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                let scale = s.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!(
                    gap <= scale * 2f32.powi(-8),
                    "{case} layer {l} row {row}: experts {ours:?}, reference {want:?}, score gap {gap} is not a bf16 tie"
                );
                ties += 1;
            }
        }
        let err = |v: &dyn Fn(usize, usize) -> f64| -> f64 {
            let (mut num, mut den) = (0f64, 0f64);
            for &row in &same_rows {
                for c in 0..h {
                    let want = r.f32_out[row * h + c] as f64;
                    num += (v(row, c) - want).powi(2);
                    den += want * want;
                }
            }
            (num / den).sqrt()
        };
        let ours = err(&|row, c| out.row(row)[c].to_f32() as f64);
        let theirs = err(&|row, c| r.bf16_out[row * h + c] as f64);
        let tol = (TOL_FACTOR * theirs).min(TOL_ABS);
        println!(
            "{case} MoE layer {l} (decoder {}): rel. error {ours:.2e}, reference bf16 {theirs:.2e}, \
             tolerance {tol:.2e}; {} rows compared, {ties} bf16 ties",
            r.decoder,
            same_rows.len()
        );
        assert!(
            same_rows.len() * 10 >= t * 9,
            "{case} layer {l}: too many ties"
        );
        assert!(
            ours <= tol,
            "{case} MoE layer {l}: relative error {ours:.3e} above {tol:.3e} (reference bf16 {theirs:.3e})"
        );
        outs.push(out);
    }
    outs
}

/// A group of `world` CPU ranks on loopback, each running `f(rank, comm)` on its own thread.
fn run_group<T: Send + 'static>(
    world: usize,
    f: impl Fn(usize, &moe_worker::comm::Comm) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let listeners: Vec<TcpListener> = (0..world)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap())
        .collect();
    let leader = listeners[0].local_addr().unwrap().to_string();
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let f = f.clone();
            let leader = leader.clone();
            std::thread::spawn(move || {
                let cfg = RendezvousConfig {
                    rank,
                    world,
                    leader: Some(leader),
                    advertise: Some(Ipv4Addr::LOCALHOST.into()),
                    comm_port: l.local_addr().unwrap().port(),
                    timeout: Duration::from_secs(30),
                    comm_timeout: Duration::from_secs(30),
                    fingerprint: "reference-test".into(),
                    group_key: None,
                };
                let (comm, _) = form_group(&cfg, l, None, Vec::new).unwrap();
                let out = f(rank, &comm);
                comm.goodbye();
                out
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// A planned placement with `redundant` replicas, balanced for the reference rows' routing.
fn planned(desc: &ModelDescription, shape: &ModelShape, refs: &[LayerRef]) -> PlacementDocument {
    let k = desc.top_k;
    let load: Vec<Vec<f64>> = refs
        .iter()
        .map(|r| {
            let mut v = vec![1.0; desc.num_experts];
            for row in 0..r.input.rows() {
                v[r.ids[row * k] as usize] += 4.0;
            }
            v
        })
        .collect();
    let history = eplb::LoadHistory::single(load).unwrap();
    let eshape =
        eplb::Shape::new(desc.num_experts, shape.redundant, shape.world_size, 1, 1).unwrap();
    let req = eplb::PlanRequest::new(eshape, &history).threads(1);
    let plan = eplb::planner_by_name("greedy").unwrap().plan(&req).unwrap();
    let doc = plan.placement.to_document(1);
    // Redundant replicas really exist: some expert has two slots.
    assert!(doc.phy2log.iter().any(|row| {
        let set: BTreeSet<u32> = row.iter().copied().collect();
        set.len() < row.len()
    }));
    doc
}

fn check_case(dir: &Path) {
    let case = dir.file_name().unwrap().to_string_lossy().into_owned();
    let desc = ModelDescription::from_path(dir).unwrap();
    let refs = load_refs(dir, &desc);
    let src = WeightsSource::Safetensors {
        dir: dir.to_path_buf(),
    };
    let store = WeightStore::open(&src, &ModelShape::of_model(&desc, 1, 0)).unwrap();
    let want = check_against_transformers(&case, &store, &desc, &refs);
    let inputs: Arc<Vec<Bf16Matrix>> = Arc::new(refs.iter().map(|r| r.input.clone()).collect());
    for world in [1usize, 2, 4] {
        let redundant = world;
        for strategy in ["linear", "round-robin", "planned"] {
            let shape = ModelShape::of_model(
                &desc,
                world,
                if strategy == "planned" { redundant } else { 0 },
            );
            let placement = match strategy {
                "linear" => initial_placement(InitialPlacement::Linear, &shape, 1).unwrap(),
                "round-robin" => {
                    initial_placement(InitialPlacement::RoundRobin, &shape, 1).unwrap()
                }
                _ => planned(&desc, &shape, &refs),
            };
            let (src, inputs) = (src.clone(), inputs.clone());
            let got = run_group(world, move |rank, comm| {
                let store = WeightStore::open(&src, &shape).unwrap();
                let exec = CpuExec::load(&store, &placement, &shape, rank).unwrap();
                let mut outs = Vec::new();
                for (l, x) in inputs.iter().enumerate() {
                    // Rank r takes a contiguous share of the rows (rank 0 gets none on 4 ranks).
                    let t = x.rows();
                    let bounds: Vec<usize> = if world == 4 {
                        vec![0, 0, t / 3, 2 * t / 3, t]
                    } else {
                        (0..=world).map(|i| i * t / world).collect()
                    };
                    let (a, b) = (bounds[rank], bounds[rank + 1]);
                    let mine =
                        Matrix::from_vec(b - a, x.cols(), x.rows_slice(a, b).to_vec()).unwrap();
                    let mut counts = vec![0u32; shape.num_slots()];
                    let out = exec
                        .moe_layer(comm, l, &mine, None, a as u32, &mut counts)
                        .unwrap();
                    assert_eq!(counts.iter().sum::<u32>() as usize, (b - a) * shape.top_k);
                    outs.push(out.as_slice().to_vec());
                }
                outs
            });
            for l in 0..want.len() {
                let joined: Vec<bf16> = got.iter().flat_map(|o| o[l].iter().copied()).collect();
                assert!(
                    joined == want[l].as_slice(),
                    "{case}: {world} ranks, {strategy} placement, MoE layer {l} differs from the single-process reference"
                );
            }
        }
    }
}

#[test]
fn every_fixture_matches_transformers_on_1_2_4_ranks_and_any_placement() {
    let cases = cases();
    // qwen3_moe (+ sharded, fused), qwen2_moe, mixtral (+ fused), deepseek_v2 (+ lite),
    // deepseek_v3 (+ fp8), gpt_oss.
    assert!(
        cases.len() >= 11,
        "fixtures under {:?}: {cases:?}",
        fixtures()
    );
    for dir in cases {
        check_case(&dir);
    }
}
