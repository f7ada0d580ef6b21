//! CPU references against straightforward scalar versions, on random and adversarial inputs.
#![allow(clippy::needless_range_loop)]

use moe_kernels::rng::SplitMix64;
use moe_kernels::{
    Bf16Matrix, EpTopology, ExpertWeights, F32Matrix, GatingConfig, Matrix, RecvLayout, ReplicaMap,
    TopK, bf16, cpu, replica_hash,
};
use std::collections::HashSet;

/// Scalar gating: full sorts instead of selection.
fn gating_scalar(logits: &F32Matrix, cfg: &GatingConfig, bias: Option<&[f32]>) -> TopK {
    let (t, e, k) = (logits.rows(), cfg.num_experts, cfg.top_k);
    let mut ids = vec![];
    let mut weights = vec![];
    for tok in 0..t {
        let l: Vec<f64> = logits.row(tok).iter().map(|&v| v as f64).collect();
        let score: Vec<f32> = match cfg.scoring {
            moe_kernels::Scoring::Softmax => {
                let m = logits
                    .row(tok)
                    .iter()
                    .copied()
                    .fold(f32::NEG_INFINITY, f32::max);
                let ex: Vec<f32> = logits.row(tok).iter().map(|&v| (v - m).exp()).collect();
                let s: f32 = ex.iter().sum();
                ex.iter().map(|v| v / s).collect()
            }
            moe_kernels::Scoring::Sigmoid => logits
                .row(tok)
                .iter()
                .map(|&v| 1.0 / (1.0 + (-v).exp()))
                .collect(),
            moe_kernels::Scoring::SoftmaxTopK => unimplemented!("tested on its own below"),
        };
        let choice: Vec<f32> = (0..e)
            .map(|i| match (bias, cfg.scoring) {
                (Some(b), _) => score[i] + b[i],
                (None, moe_kernels::Scoring::Softmax) => l[i] as f32,
                _ => score[i],
            })
            .collect();
        let mut allowed = vec![true; e];
        if cfg.num_groups > 1 {
            let per = e / cfg.num_groups;
            let mut gs: Vec<(f32, usize)> = (0..cfg.num_groups)
                .map(|g| {
                    let mut v: Vec<f32> = choice[g * per..(g + 1) * per].to_vec();
                    v.sort_by(|a, b| b.partial_cmp(a).unwrap());
                    (if per == 1 { v[0] } else { v[0] + v[1] }, g)
                })
                .collect();
            gs.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
            let keep: HashSet<usize> = gs[..cfg.topk_groups].iter().map(|x| x.1).collect();
            for i in 0..e {
                allowed[i] = keep.contains(&(i / per));
            }
        }
        let mut order: Vec<usize> = (0..e).filter(|&i| allowed[i]).collect();
        order.sort_by(|&a, &b| choice[b].partial_cmp(&choice[a]).unwrap().then(a.cmp(&b)));
        let sel = &order[..k];
        let mut w: Vec<f32> = sel.iter().map(|&i| score[i]).collect();
        if cfg.renormalize {
            let s: f32 = w.iter().sum::<f32>() + 1e-20;
            w.iter_mut().for_each(|x| *x /= s);
        }
        w.iter_mut().for_each(|x| *x *= cfg.routed_scaling_factor);
        ids.extend(sel.iter().map(|&i| i as u32));
        weights.extend(w);
    }
    TopK {
        tokens: t,
        k,
        ids,
        weights,
    }
}

fn assert_topk_eq(a: &TopK, b: &TopK) {
    assert_eq!(a.ids, b.ids);
    for (x, y) in a.weights.iter().zip(&b.weights) {
        assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "{x} vs {y}");
    }
}

fn random_logits(rng: &mut SplitMix64, t: usize, e: usize, levels: Option<u64>) -> F32Matrix {
    let data = (0..t * e)
        .map(|_| match levels {
            Some(n) => rng.below(n) as f32 * 0.25 - 1.0, // few distinct values: many ties
            None => rng.uniform(-4.0, 4.0),
        })
        .collect();
    Matrix::from_vec(t, e, data).unwrap()
}

#[test]
fn gating_softmax_matches_scalar() {
    let mut rng = SplitMix64::new(1);
    for &(e, k, renorm) in &[
        (8, 2, true),
        (64, 8, false),
        (7, 7, true),
        (1, 1, true),
        (128, 8, true),
    ] {
        for levels in [None, Some(3), Some(1)] {
            let logits = random_logits(&mut rng, 37, e, levels);
            let cfg = GatingConfig::softmax(e, k, renorm);
            let got = cpu::gating_topk(&logits, &cfg, None).unwrap();
            assert_topk_eq(&got, &gating_scalar(&logits, &cfg, None));
            if levels == Some(1) {
                // all equal: ties resolve to the lowest indices
                let want: Vec<u32> = (0..k as u32).collect();
                assert_eq!(&got.ids[..k], &want[..]);
            }
        }
    }
}

#[test]
fn gating_grouped_sigmoid_matches_scalar() {
    let mut rng = SplitMix64::new(2);
    for &(e, k, g, tg) in &[
        (256, 8, 8, 4),
        (64, 6, 8, 3),
        (16, 4, 16, 4),
        (32, 8, 1, 1),
        (12, 3, 4, 2),
    ] {
        for levels in [None, Some(4), Some(1)] {
            let logits = random_logits(&mut rng, 29, e, levels);
            let bias: Vec<f32> = match levels {
                Some(_) => vec![0.0; e],
                None => rng.vec_f32(e, -0.1, 0.1),
            };
            let cfg = GatingConfig::grouped_sigmoid(e, k, g, tg, 2.5);
            let got = cpu::gating_topk(&logits, &cfg, Some(&bias)).unwrap();
            assert_topk_eq(&got, &gating_scalar(&logits, &cfg, Some(&bias)));
            // weights sum to the scaling factor (renormalised)
            for tok in 0..got.tokens {
                let s: f32 = got.weights[tok * k..(tok + 1) * k].iter().sum();
                assert!((s - 2.5).abs() < 1e-4);
            }
        }
    }
}

#[test]
fn gating_rejects_bad_config() {
    let l = Matrix::zeros(2, 8);
    assert!(cpu::gating_topk(&l, &GatingConfig::softmax(8, 9, true), None).is_err());
    assert!(cpu::gating_topk(&l, &GatingConfig::grouped_sigmoid(8, 2, 3, 1, 1.0), None).is_err());
    assert!(cpu::gating_topk(&l, &GatingConfig::grouped_sigmoid(8, 5, 4, 2, 1.0), None).is_err());
    assert!(cpu::gating_topk(&l, &GatingConfig::softmax(4, 2, true), None).is_err());
    assert!(cpu::gating_topk(&l, &GatingConfig::softmax(8, 2, true), Some(&[0.0; 3])).is_err());
}

/// E logical experts over G ranks x S slots with redundant replicas (E not divisible by G).
fn redundant_map(e: usize, g: usize, s: usize, rng: &mut SplitMix64) -> (ReplicaMap, EpTopology) {
    let n = g * s;
    assert!(n >= e);
    let mut phy2log: Vec<u32> = (0..n)
        .map(|p| {
            if p < e {
                p as u32
            } else {
                rng.below(e as u64) as u32
            }
        })
        .collect();
    // shuffle
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        phy2log.swap(i, j);
    }
    (
        ReplicaMap::from_phy2log(&phy2log, e).unwrap(),
        EpTopology::new(g, s).unwrap(),
    )
}

#[test]
fn replica_map_and_load_counting() {
    let mut rng = SplitMix64::new(3);
    let (map, _) = redundant_map(10, 4, 3, &mut rng);
    let t = 500;
    let k = 3;
    let ids: Vec<u32> = (0..t * k).map(|_| rng.below(10) as u32).collect();
    let topk = TopK {
        tokens: t,
        k,
        ids: ids.clone(),
        weights: vec![1.0; t * k],
    };
    let mut load = vec![5u32; map.num_physical()];
    let phys = cpu::map_to_physical(&topk, &map, 1000, &mut load).unwrap();
    let mut want_load = vec![5u32; map.num_physical()];
    for (f, &e) in ids.iter().enumerate() {
        let c = map.logcnt()[e as usize];
        let r = replica_hash(1000 + (f / k) as u32, e) % c;
        let p = map.log2phy()[e as usize * map.max_replicas() + r as usize];
        assert_eq!(phys[f], p as u32);
        want_load[p as usize] += 1;
    }
    assert_eq!(load, want_load);
    // wrong counter length and bad expert ids are errors, not panics
    assert!(cpu::map_to_physical(&topk, &map, 0, &mut [0; 3]).is_err());
    let bad = TopK {
        tokens: 1,
        k: 1,
        ids: vec![10],
        weights: vec![1.0],
    };
    assert!(cpu::map_to_physical(&bad, &map, 0, &mut vec![0; map.num_physical()]).is_err());
}

#[test]
fn replica_hash_balances_consecutive_tokens() {
    // 4 replicas, 40000 consecutive tokens: each replica within 3% of a quarter.
    let mut cnt = [0u32; 4];
    for t in 0..40_000u32 {
        cnt[(replica_hash(t, 17) % 4) as usize] += 1;
    }
    for c in cnt {
        assert!((c as i64 - 10_000).abs() < 300, "{cnt:?}");
    }
    // pinned values: the GPU implements the same function
    assert_eq!(replica_hash(0, 0), 0);
    assert_eq!(replica_hash(1, 0), replica_hash(1, 0));
    assert_ne!(replica_hash(1, 0), replica_hash(0, 1));
}

#[test]
fn replica_map_validation() {
    assert!(ReplicaMap::new(2, 2, 1, vec![0, 2], vec![1, 1]).is_err());
    assert!(ReplicaMap::new(2, 2, 1, vec![0, 1], vec![1, 0]).is_err());
    assert!(ReplicaMap::new(2, 2, 2, vec![0, -1, 1, -1], vec![1, 1]).is_ok());
    assert!(ReplicaMap::from_phy2log(&[0, 0, 2], 3).is_err()); // expert 1 has no slot? -> logcnt 0
    assert!(ReplicaMap::from_phy2log(&[0, 5], 2).is_err());
}

fn layout_scalar(phys: &[u32], k: usize, topo: EpTopology) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let mut order: Vec<u32> = (0..phys.len() as u32).collect();
    order.sort_by_key(|&f| phys[f as usize]); // stable
    let mut per_slot = vec![0u32; topo.num_slots()];
    for &p in phys {
        per_slot[p as usize] += 1;
    }
    let mut tpr = vec![0u32; topo.num_ranks];
    for tok in 0..phys.len() / k {
        let ranks: HashSet<usize> = phys[tok * k..(tok + 1) * k]
            .iter()
            .map(|&p| p as usize / topo.slots_per_rank)
            .collect();
        for r in ranks {
            tpr[r] += 1;
        }
    }
    (order, per_slot, tpr)
}

#[test]
fn dispatch_layout_matches_scalar() {
    let mut rng = SplitMix64::new(4);
    for &(g, s, k, t, mode) in &[
        (4, 3, 3, 200, 0),
        (1, 8, 2, 50, 0),
        (3, 5, 4, 100, 1),
        (8, 2, 8, 64, 2),
        (2, 4, 1, 0, 0),
    ] {
        let topo = EpTopology::new(g, s).unwrap();
        let n = topo.num_slots() as u64;
        let phys: Vec<u32> = (0..t * k)
            .map(|f| match mode {
                1 => 7.min(n as u32 - 1),             // all rows to one slot
                2 => ((f % k) as u32 * 2) % n as u32, // half the slots get nothing
                _ => rng.below(n) as u32,
            })
            .collect();
        let l = cpu::dispatch_layout(&phys, k, topo).unwrap();
        let (order, per_slot, tpr) = layout_scalar(&phys, k, topo);
        assert_eq!(l.perm, order);
        assert_eq!(l.rows_per_slot, per_slot);
        assert_eq!(l.tokens_per_rank, tpr);
        for (f, &row) in l.inv.iter().enumerate() {
            assert_eq!(l.perm[row as usize], f as u32);
        }
        let ro = l.rank_offsets();
        for r in 0..g {
            assert_eq!(ro[r + 1] - ro[r], l.rows_per_rank[r]);
            assert_eq!(
                l.rows_per_rank[r],
                per_slot[r * s..(r + 1) * s].iter().sum::<u32>()
            );
        }
    }
    assert!(cpu::dispatch_layout(&[0, 99], 1, EpTopology::new(2, 2).unwrap()).is_err());
    assert!(cpu::dispatch_layout(&[0, 1, 2], 2, EpTopology::new(2, 2).unwrap()).is_err());
}

#[test]
fn permute_and_combine_match_scalar() {
    let mut rng = SplitMix64::new(5);
    let (t, k, h) = (33, 4, 24);
    let topo = EpTopology::new(3, 2).unwrap();
    let phys: Vec<u32> = (0..t * k).map(|_| rng.below(6) as u32).collect();
    let l = cpu::dispatch_layout(&phys, k, topo).unwrap();
    let x = rng.bf16_matrix(t, h, 1.0);
    let send = cpu::permute(&x, &l).unwrap();
    for row in 0..t * k {
        assert_eq!(send.row(row), x.row(l.perm[row] as usize / k));
    }
    let y = rng.bf16_matrix(t * k, h, 1.0);
    let w = rng.vec_f32(t * k, 0.0, 1.0);
    let out = cpu::unpermute_combine(&y, &l, &w).unwrap();
    for tok in 0..t {
        for c in 0..h {
            let mut acc = 0f64;
            for j in 0..k {
                acc += w[tok * k + j] as f64 * y.row(l.inv[tok * k + j] as usize)[c].to_f64();
            }
            let got = out.row(tok)[c].to_f64();
            assert!(
                (got - acc).abs() <= 4e-3 * (acc.abs() + 1e-3),
                "{got} vs {acc}"
            );
        }
    }
    // combining the permuted input with weights summing to one gives back x (up to rounding)
    let wn: Vec<f32> = vec![0.25; t * k];
    let back = cpu::unpermute_combine(&send, &l, &wn).unwrap();
    assert_eq!(back, x);
}

#[test]
fn silu_and_mul_and_ffn_match_scalar() {
    let mut rng = SplitMix64::new(6);
    let (h, i) = (48, 20);
    let gu = rng.bf16_matrix(9, 2 * i, 6.0);
    let hm = cpu::silu_and_mul(&gu).unwrap();
    for r in 0..9 {
        for c in 0..i {
            let g = gu.row(r)[c].to_f64();
            let want = g / (1.0 + (-g).exp()) * gu.row(r)[i + c].to_f64();
            let got = hm.row(r)[c].to_f64();
            assert!(
                (got - want).abs() <= 8e-3 * want.abs() + 1e-6,
                "{got} vs {want}"
            );
        }
    }
    let experts: Vec<ExpertWeights> = (0..4)
        .map(|_| {
            ExpertWeights::new(rng.bf16_matrix(2 * i, h, 0.3), rng.bf16_matrix(h, i, 0.3)).unwrap()
        })
        .collect();
    let refs: Vec<&ExpertWeights> = experts.iter().collect();
    // expert 1 and 3 get no rows; expert 2 gets all but one
    let offsets = [0u32, 1, 1, 17, 17];
    let x = rng.bf16_matrix(17, h, 1.0);
    let y = cpu::expert_ffn(&x, &offsets, &refs).unwrap();
    let mut err = 0f64;
    let mut norm = 0f64;
    for r in 0..17 {
        let e = if r < 1 { 0 } else { 2 };
        let w = &experts[e];
        let xr: Vec<f64> = x.row(r).iter().map(|v| v.to_f64()).collect();
        let gu: Vec<f64> = (0..2 * i)
            .map(|c| {
                w.w1.row(c)
                    .iter()
                    .zip(&xr)
                    .map(|(a, b)| a.to_f64() * b)
                    .sum()
            })
            .collect();
        let hv: Vec<f64> = (0..i)
            .map(|c| gu[c] / (1.0 + (-gu[c]).exp()) * gu[i + c])
            .collect();
        for o in 0..h {
            let want: f64 =
                w.w2.row(o)
                    .iter()
                    .zip(&hv)
                    .map(|(a, b)| a.to_f64() * b)
                    .sum();
            err += (y.row(r)[o].to_f64() - want).powi(2);
            norm += want * want;
        }
    }
    assert!(
        (err / norm).sqrt() < 1e-2,
        "relative error {}",
        (err / norm).sqrt()
    );
    assert!(cpu::expert_ffn(&x, &[0, 1, 2], &refs).is_err());
    assert!(cpu::expert_ffn(&x, &[0, 1, 18, 17, 17], &refs).is_err());
}

#[test]
fn recv_layout_regroups() {
    let (g, s) = (3, 4);
    let counts = [2u32, 0, 1, 3, 0, 0, 0, 0, 1, 5, 0, 2];
    let l = RecvLayout::new(g, s, &counts).unwrap();
    assert_eq!(l.rows(), 14);
    assert_eq!(l.expert_offsets, vec![0, 3, 8, 9, 14]);
    assert_eq!(l.src_offsets, vec![0, 6, 6, 14]);
    // scalar: expert-major order lists (e, src, i)
    let mut want = vec![];
    for e in 0..s {
        for src in 0..g {
            let start = l.src_offsets[src] + counts[src * s..src * s + e].iter().sum::<u32>();
            for i in 0..counts[src * s + e] {
                want.push(start + i);
            }
        }
    }
    assert_eq!(l.expert_major_to_recv, want);
    let x: Bf16Matrix =
        Matrix::from_f32(14, 1, &(0..14).map(|v| v as f32).collect::<Vec<_>>()).unwrap();
    let grouped = cpu::regroup_received(&x, &l).unwrap();
    assert_eq!(cpu::ungroup_outputs(&grouped, &l).unwrap(), x);
    assert!(RecvLayout::new(2, 2, &[1, 2, 3]).is_err());
}

/// Whole layer vs a per-token scalar evaluation, with redundant slots, E not divisible by G.
#[test]
fn moe_layer_matches_per_token_scalar() {
    let mut rng = SplitMix64::new(7);
    for &(e, g, s, k, hot) in &[
        (10usize, 4usize, 3usize, 3usize, false),
        (8, 2, 4, 2, true),
        (6, 4, 2, 2, false),
    ] {
        let (h, i, t) = (32, 16, 40);
        let (map, topo) = redundant_map(e, g, s, &mut rng);
        let mut w_gate = rng.bf16_matrix(e, h, 0.5);
        if hot {
            // every token to expert 0: a huge gate row
            for v in w_gate.row_mut(0) {
                *v = bf16::from_f32(50.0);
            }
        }
        let gating = GatingConfig::softmax(e, k, true);
        let experts: Vec<ExpertWeights> = (0..topo.num_slots())
            .map(|_| {
                ExpertWeights::new(rng.bf16_matrix(2 * i, h, 0.3), rng.bf16_matrix(h, i, 0.3))
                    .unwrap()
            })
            .collect();
        let mut x = rng.bf16_matrix(t, h, 1.0);
        if hot {
            for v in x.as_mut_slice() {
                *v = bf16::from_f32(v.to_f32().abs() + 0.1);
            }
        }
        let layer = cpu::MoeLayerRef {
            w_gate: &w_gate,
            gating: &gating,
            bias: None,
            map: &map,
            topo,
            experts: &experts,
        };
        let mut load = vec![0u32; topo.num_slots()];
        let res = cpu::moe_layer(&x, &layer, 0, &mut load).unwrap();
        assert_eq!(load.iter().sum::<u32>() as usize, t * k);
        if hot {
            assert!(res.topk.ids.chunks(k).all(|c| c[0] == 0));
        }
        for tok in 0..t {
            let xt = Matrix::from_vec(1, h, x.row(tok).to_vec()).unwrap();
            let mut acc = vec![0f64; h];
            for j in 0..k {
                let le = res.topk.ids[tok * k + j];
                let p = map.choose(tok as u32, le).unwrap() as usize;
                let y = cpu::expert_ffn_one(&xt, &experts[p]).unwrap();
                for c in 0..h {
                    acc[c] += res.topk.weights[tok * k + j] as f64 * y.row(0)[c].to_f64();
                }
            }
            for c in 0..h {
                let got = res.out.row(tok)[c].to_f64();
                assert!(
                    (got - acc[c]).abs() <= 1e-2 * acc[c].abs() + 1e-3,
                    "tok {tok} col {c}: {got} vs {}",
                    acc[c]
                );
            }
        }
    }
}

#[test]
fn shapes_are_checked() {
    assert!(Bf16Matrix::from_vec(2, 3, vec![bf16::ZERO; 5]).is_err());
    assert!(ExpertWeights::new(Matrix::zeros(3, 4), Matrix::zeros(4, 1)).is_err());
    assert!(cpu::router_logits(&Matrix::zeros(2, 3), &Matrix::zeros(4, 5)).is_err());
}

/// The multi-rank flow (dispatch, exchange, regroup, local FFN, exchange back, combine) gives
/// exactly the single-process result, with a rank that has no tokens and E not divisible by G.
#[test]
fn multi_rank_flow_equals_single_process() {
    let mut rng = SplitMix64::new(8);
    for &(e, g, s, k) in &[
        (10usize, 4usize, 3usize, 3usize),
        (8, 2, 5, 2),
        (6, 3, 2, 6),
        (5, 1, 7, 2),
    ] {
        let (h, i) = (24, 8);
        let (map, topo) = redundant_map(e, g, s, &mut rng);
        let w_gate = rng.bf16_matrix(e, h, 0.5);
        let gating = GatingConfig::softmax(e, k, true);
        let experts: Vec<ExpertWeights> = (0..topo.num_slots())
            .map(|_| {
                ExpertWeights::new(rng.bf16_matrix(2 * i, h, 0.3), rng.bf16_matrix(h, i, 0.3))
                    .unwrap()
            })
            .collect();
        let tokens: Vec<usize> = (0..g).map(|r| if r == 1 { 0 } else { 7 + 5 * r }).collect();
        let xs: Vec<Bf16Matrix> = tokens.iter().map(|&t| rng.bf16_matrix(t, h, 1.0)).collect();
        let bases: Vec<u32> = (0..g)
            .map(|r| tokens[..r].iter().sum::<usize>() as u32)
            .collect();
        let layer = cpu::MoeLayerRef {
            w_gate: &w_gate,
            gating: &gating,
            bias: None,
            map: &map,
            topo,
            experts: &experts,
        };
        let mut loads = vec![vec![0u32; topo.num_slots()]; g];
        let outs = cpu::moe_layer_multi_rank(&xs, &layer, &bases, &mut loads).unwrap();
        let all: Vec<bf16> = xs.iter().flat_map(|x| x.as_slice().to_vec()).collect();
        let x = Matrix::from_vec(tokens.iter().sum(), h, all).unwrap();
        let mut load = vec![0u32; topo.num_slots()];
        let want = cpu::moe_layer(&x, &layer, 0, &mut load).unwrap();
        let got: Vec<bf16> = outs.iter().flat_map(|o| o.as_slice().to_vec()).collect();
        assert_eq!(got, want.out.as_slice());
        let summed: Vec<u32> = (0..topo.num_slots())
            .map(|p| loads.iter().map(|l| l[p]).sum())
            .collect();
        assert_eq!(summed, load);
    }
}

#[test]
fn group_score_max_and_top2_sum_choose_different_groups() {
    use moe_kernels::GroupScore;
    // Groups {0, 1} and {2, 3}: the first has the best expert, the second the best pair.
    let l = F32Matrix::from_vec(1, 4, vec![3.0, -10.0, 2.5, 2.4]).unwrap();
    let top2 = GatingConfig {
        num_groups: 2,
        topk_groups: 1,
        ..GatingConfig::softmax(4, 1, false)
    };
    assert_eq!(cpu::gating_topk(&l, &top2, None).unwrap().ids, vec![2]);
    let max = GatingConfig {
        group_score: GroupScore::Max,
        ..top2
    };
    let got = cpu::gating_topk(&l, &max, None).unwrap();
    assert_eq!(got.ids, vec![0]);
    // Not renormalised: the softmax probability itself.
    let p0 = 1.0 / (1.0 + (-13f32).exp() + (-0.5f32).exp() + (-0.6f32).exp());
    assert!((got.weights[0] - p0).abs() < 1e-6);
}

#[test]
fn softmax_over_the_top_k_logits() {
    let l = F32Matrix::from_vec(1, 4, vec![0.5, 2.0, -1.0, 1.0]).unwrap();
    let cfg = GatingConfig {
        scoring: moe_kernels::Scoring::SoftmaxTopK,
        ..GatingConfig::softmax(4, 2, false)
    };
    let got = cpu::gating_topk(&l, &cfg, None).unwrap();
    assert_eq!(got.ids, vec![1, 3]);
    // softmax([2, 1]) = [1 / (1 + e^-1), e^-1 / (1 + e^-1)].
    let w0 = 1.0 / (1.0 + (-1f32).exp());
    assert!((got.weights[0] - w0).abs() < 1e-6 && (got.weights[1] - (1.0 - w0)).abs() < 1e-6);
}

#[test]
fn clamped_swiglu_with_biases() {
    use moe_kernels::cpu::Activation;
    // H = 1, I = 1: w1 = [gate; up] = [[1], [1]], w2 = [[1]].
    let w = ExpertWeights::new(
        Matrix::from_f32(2, 1, &[1.0, 1.0]).unwrap(),
        Matrix::from_f32(1, 1, &[1.0]).unwrap(),
    )
    .unwrap()
    .with_bias(vec![8.0, -9.0], vec![0.5])
    .unwrap();
    let x = Matrix::from_f32(1, 1, &[1.0]).unwrap();
    let act = Activation::ClampedSwiglu {
        alpha: 1.702,
        limit: 7.0,
    };
    let y = cpu::expert_ffn_one_act(&x, &w, act).unwrap();
    // gate = 9 -> 7, up = -8 -> -7: (-7 + 1) * 7 * sigmoid(1.702 * 7) + 0.5.
    let want = -6.0 * 7.0 / (1.0 + (-1.702f32 * 7.0).exp()) + 0.5;
    assert!((y.as_slice()[0].to_f32() - want).abs() <= want.abs() * 0.01);
}
