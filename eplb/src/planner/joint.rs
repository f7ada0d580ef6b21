//! `joint`: replica counts and placement chosen together, over several episodes.
//!
//! 1. Small instances (up to 24 experts and 48 slots): proving from below with the cover
//!    search of [`super::cover`] (one episode, three to six slots per rank, up to 16 experts),
//!    its version for several episodes in [`super::episodes`] (three to eight slots per rank, up
//!    to 16 experts) or the rank-by-rank search of [`super::ranks`] (three or more slots per
//!    rank), then the exact branch-and-bound of [`super::exact`] (replica counts and ranks
//!    chosen together, expert by expert), or with two slots per rank the search over replica
//!    counts of [`super::pairs`], seeded with the heuristic's objective. When a search
//!    finishes within its node budget the result is proven optimal.
//! 2. Otherwise: two starts — (a) min-max replication on the episode-weighted load, then
//!    episode-aware packing (each replica to the rank that raises the objective least), and
//!    (b) the greedy plan — each improved by local search (swaps between critical and other
//!    ranks, replica re-assignments); the better one wins.

use crate::placement::repair_duplicates;
use crate::shape::Shape;

use super::cover;
use super::episodes;
use super::exact;
use super::greedy::greedy_row;
use super::local_search::{MAX_ITERS, State};
use super::neighbourhood;
use super::pairs;
use super::perfect;
use super::problem::{Problem, better, water_fill};
use super::prove;
use super::ranks;

pub(crate) struct JointResult {
    pub row: Vec<usize>,
    pub optimal: bool,
    /// The objective is proven within this relative distance of the optimum (0: optimal).
    pub proven_gap: Option<f64>,
}

/// Episode-aware packing of the replica counts `cnt`.
fn construct(p: &Problem, cnt: &[usize]) -> Vec<usize> {
    let mut items: Vec<usize> = Vec::with_capacity(p.slots());
    for (e, &c) in cnt.iter().enumerate() {
        for _ in 0..c {
            items.push(e);
        }
    }
    items.sort_by(|&a, &b| {
        (p.agg[b] / cnt[b] as f64)
            .total_cmp(&(p.agg[a] / cnt[a] as f64))
            .then(a.cmp(&b))
    });
    let mut loads = vec![0.0f64; p.w * p.g];
    let mut maxes = vec![0.0f64; p.w];
    let mut packs: Vec<Vec<usize>> = vec![Vec::with_capacity(p.s); p.g];
    for e in items {
        let c = cnt[e] as f64;
        let mut best: Option<(f64, f64, usize)> = None;
        let mut fallback: Option<usize> = None;
        for r in 0..p.g {
            if packs[r].len() >= p.s {
                continue;
            }
            if fallback.is_none() {
                fallback = Some(r);
            }
            if !p.dup_ok && packs[r].contains(&e) {
                continue;
            }
            let mut f = 0.0;
            let mut q = 0.0;
            for k in 0..p.w {
                let o = p.omega[k];
                let l = loads[k * p.g + r] + p.x[e * p.w + k] / c;
                f += o * l.max(maxes[k]);
                q += o * l;
            }
            let cand = (f, q, r);
            if best.is_none_or(|b| better((f, q), (b.0, b.1))) {
                best = Some(cand);
            }
        }
        let Some(r) = best.map(|b| b.2).or(fallback) else {
            continue;
        };
        packs[r].push(e);
        for k in 0..p.w {
            let l = &mut loads[k * p.g + r];
            *l += p.x[e * p.w + k] / c;
            maxes[k] = maxes[k].max(*l);
        }
    }
    let mut row: Vec<usize> = packs.into_iter().flatten().collect();
    repair_duplicates(&mut row, p.e, p.g);
    row
}

/// The construction step alone (the `flashlb-like` baseline).
pub(crate) fn construct_only(p: &Problem) -> Vec<usize> {
    let cnt = water_fill(&p.agg, p.slots(), p.max_rep);
    construct(p, &cnt)
}

/// Heuristic joint plan of one layer (starts + local search), and its objective.
pub(crate) fn heuristic(p: &Problem, shape: &Shape, with_previous: bool) -> Vec<usize> {
    let cnt = water_fill(&p.agg, p.slots(), p.max_rep);
    let mut a = State::new(p, construct(p, &cnt));
    a.improve(None, MAX_ITERS);
    if with_previous {
        // The caller's warm start (previous placement improved in place) is the second start.
        return a.row;
    }
    let greedy = greedy_row(&p.raw_sum, shape, false);
    let mut b = State::new(p, greedy.clone());
    b.improve(None, MAX_ITERS);
    // The search ranks moves with a variance term, so it may trade a little F for balance
    // elsewhere; never return worse F than the greedy plan it started from.
    let fg = p.episode_par(&greedy);
    if p.episode_par(&a.row) > fg + 1e-12 && p.episode_par(&b.row) > fg + 1e-12 {
        return greedy;
    }
    let (fa, fb) = (a.objective(), b.objective());

    if better(fb, fa) { b.row } else { a.row }
}

/// Budget of the quick proof before the searches that prove from below (one episode).
const QUICK_PROOF_NODES: usize = 5_000;

/// A full proof by the expert-by-expert search within [`QUICK_PROOF_NODES`] (and whatever
/// better plan it finds on the way).
fn quick_proof(p: &Problem, start: prove::Proof) -> prove::Proof {
    prove::prove_from(
        p,
        start,
        QUICK_PROOF_NODES,
        QUICK_PROOF_NODES,
        |target, nodes| exact::solve(p, target, nodes),
        |target, nodes| exact::solve(p, target, nodes),
    )
}

/// Nodes of the short ascent before [`perfect::decide`] (one episode) and before the
/// neighbourhood search on the narrow path (several episodes, three or four slots per rank).
const QUICK_ASCENT: usize = 50_000;

/// On the narrow path (several episodes, three or four slots per rank), the ascent proper
/// resumes this many steps (of the ascent's growth) below the step the short ascent reached.
/// On the sweep's four-window rows 2 to 5 all prove the pareto 12-expert 6 x 4 and 8 x 3
/// layers and keep the 16-expert 8 x 4 rows' gaps; with 4 the 8 x 4 layers' bounds stay
/// nearest those of the restart from the first step (which raises them by up to 1.3e-4
/// with its small probes; resuming at the step itself skips those and widens one pareto row's
/// largest gap, 1.822% -> 1.823%).
const RESUME_BACK: i32 = 4;

/// Whether the narrow path's ascent proper lists by episodes (see
/// `episodes::Prover::list_by_episodes`); the short ascent before it lists on the weighted load.
const LIST_BY_EPISODES: bool = true;

/// The verdict of [`perfect::decide`] applied to a proof: a perfect placement is optimal; a
/// proof that none exists raises the lower bound to the next rank load above the mean.
fn settle_perfect(p: &Problem, mut start: prove::Proof) -> prove::Proof {
    // A bound above the mean already (a replica heavier than the mean): no perfect placement.
    if start.lower > 1.0 + 1e-9 {
        return start;
    }
    match perfect::decide(p, perfect::NODES) {
        perfect::Verdict::Perfect(row) => {
            start.take(p, Some(row));
            start.raise_lower(1.0);
        }
        perfect::Verdict::AtLeast(bound) => {
            // Rank loads are whole multiples of 1/L (`perfect`), so a plan within rounding of
            // the bound lies exactly on it (the next possible value is 1/T of the mean
            // further, T the mean in those units, far above f64 rounding): it is optimal.
            let bound = if (start.objective - bound).abs() <= 1e-12 * bound {
                bound.max(start.objective)
            } else {
                bound
            };
            start.raise_lower(bound);
        }
        perfect::Verdict::Unknown => {}
    }
    start
}

/// Plans one layer with the joint algorithm.
pub(crate) fn plan_layer(p: &Problem, shape: &Shape, with_previous: bool) -> JointResult {
    let row = heuristic(p, shape, with_previous);
    if !exact::eligible(p) {
        return JointResult {
            row,
            optimal: false,
            proven_gap: None,
        };
    }
    // The plan the neighbourhood search returned before the ascent proper (several episodes,
    // three or four slots per rank: below).
    let mut searched_from: Option<Vec<usize>> = None;
    // Three or more slots per rank (`ranks::eligible`: at most six with several episodes): a
    // search proving from below first, and what it leaves open goes to the expert-by-expert
    // proof with the bound it proved.
    let mut start = prove::Proof::start(p, row.clone());
    let mut budget = exact::budget(p);
    // (Several episodes and seven or eight slots per rank: the cover search for several
    // episodes only; the rank-by-rank search takes at most six there.)
    if ranks::eligible(p) || episodes::eligible(p) {
        // One episode: a quick full proof by the expert-by-expert search first. Skewed layers
        // it settles in a few thousand nodes can cost the searches below their whole budget
        // (a one-hot 16-expert 8 x 3 layer of the sweep: 2,227 nodes, where the cover search
        // spent 3M and 700-860 ms first); on the others it costs a few milliseconds. (Several
        // episodes: not tried, the sweep's timings there were too noisy to tell.)
        if p.w == 1 {
            start = quick_proof(p, start);
        }
        // Which search proves from below:
        // - one episode, three to six slots per rank, up to 16 experts: the cover search (it
        //   settles near-perfect partitions the rank-by-rank search cannot: 16 experts on
        //   8 x 4, 10 of 10 proven per class on the sweep instead of 0-1);
        // - several episodes, three to eight slots per rank, up to 16 experts: the cover search
        //   for several episodes (the sweep's 12 experts on 6 x 4 and 8 x 3 with four windows:
        //   4 of 5 proven each instead of 0 and 1; 16 experts on 8 x 4: the bound twice as far
        //   above the mean; with five to eight slots per rank its probes share one listing
        //   and ascend by a step growing 1.3 times: 16 experts on 4 x 8 and 12 on 4 x 6 and
        //   3 x 8 all proven, 15 of 15, instead of 0, 3 and 4);
        // - otherwise the rank-by-rank search.
        let use_cover = cover::eligible(p);
        let use_episodes = episodes::eligible(p);
        let nodes = if use_cover {
            cover::COVER_NODES
        } else if use_episodes {
            episodes::budget(p)
        } else {
            ranks::budget(p)
        };
        // Kept back for a probe after a stall: with one episode half the budget (near-perfect
        // partitions stall the refutations, a probe higher up finds closer placements: the
        // sweep's 8 x 4 layers within 0.16% median instead of 0.36% with an eighth); with
        // several an eighth (their optimum lies further above the bound and the probe that
        // proves it needs most of the budget: with half, 1 of 5 12-expert 4 x 6 layers proven
        // instead of 3).
        let reserve = if p.w == 1 { nodes / 2 } else { nodes / 8 };
        let growth = if use_cover {
            cover::ASCENT_GROWTH
        } else if use_episodes && episodes::wide(p) {
            episodes::WIDE_ASCENT_GROWTH
        } else {
            2.0
        };
        let mut cover = cover::Prover::new(p);
        let mut episodes = episodes::Prover::new(p, start.objective);
        let used = std::cell::Cell::new(0usize);
        // The narrow path's ascent proper lists by episodes (`episodes::Prover::list_by_episodes`).
        let by_episodes = std::cell::Cell::new(false);
        let mut probe = |target: f64, nodes: usize| {
            let res = if use_cover {
                cover.solve(target, nodes)
            } else if use_episodes {
                if by_episodes.get() {
                    episodes.list_by_episodes();
                }
                episodes.solve(target, nodes)
            } else {
                ranks::solve(p, target, nodes)
            };
            used.set(used.get() + res.nodes.min(nodes));
            res
        };
        // A short ascent first (it settles most layers sooner), then, where it did not:
        // - one episode: whether every rank can carry exactly the mean, in whole tokens
        //   (`perfect`; the ascent settles most layers with a perfect placement sooner: the
        //   sweep's 16-expert 4 x 8 layers in 12 ms median, where listing the exact contents
        //   takes 40-80 ms): it settles near-perfect layers whose plans lie a fraction of a
        //   token above the mean, which the searches cannot tell from the mean;
        // - several episodes, three or four slots per rank (the cover search's narrow path;
        //   the ascent settles 8 experts on 4 x 4 in 2 ms, where the neighbourhood search
        //   costs 80): the better plan of the neighbourhood search from the heuristic's, so
        //   that the ascent's probe at the incumbent starts from it. A probe far above the
        //   optimum that finds it lists the contents of its own cut and runs out below the
        //   optimum: the sweep's 12-expert 8 x 3 layer left open with four windows, where the
        //   probe at 1.0530 times the mean found the optimum, 1.036443, and spent its 1.88M
        //   nodes below it on the 28,807 contents listed at 1.0530; a probe listed at 1.036443
        //   refutes it in 1.03M nodes (16,383 contents).
        let narrow = use_episodes && !episodes::wide(p);
        let mut step = prove::FIRST_STEP;
        if (p.w == 1 || narrow) && !start.optimal {
            start = prove::ascend_from(
                p,
                start,
                QUICK_ASCENT.min(nodes),
                0,
                growth,
                &mut step,
                &mut probe,
            );
            if !start.optimal && p.w == 1 {
                start = settle_perfect(p, start);
            } else if !start.optimal {
                let improved = neighbourhood::improve(p, row.clone(), neighbourhood::NODES, 0);
                start.take(p, Some(improved.clone()));
                let lower = start.lower;
                start.raise_lower(lower);
                searched_from = Some(improved);
            }
        }
        let left = nodes.saturating_sub(used.get());
        // The ascent proper: on the narrow path from a few steps below where the short one
        // stopped (each of its probes lists its contents again, and the small steps just above
        // the bound the short ascent raised cost that listing each for almost nothing: a
        // pareto 12-expert 8 x 3 layer of the sweep spent 230,000 of its 2.4M nodes there and
        // ran out proving its optimum); otherwise from the first step.
        by_episodes.set(narrow && LIST_BY_EPISODES);
        step = if narrow {
            (step / growth.powi(RESUME_BACK)).max(prove::FIRST_STEP)
        } else {
            prove::FIRST_STEP
        };
        start = prove::ascend_from(
            p,
            start,
            left,
            reserve.min(left),
            growth,
            &mut step,
            &mut probe,
        );
        // (A layer the ascent proved is settled by `prove_from` without a search.) The
        // expert-by-expert proof gets a quarter of its budget after the rank-by-rank search
        // (which takes about half its time): enough to close the 4 x 8 layers the ascent
        // brought near (16 experts, one window: 10 of 10 on the sweep with a quarter or a
        // half), and the unproven 8 x 4 layers stay near a second of CPU.
        budget /= 4;
    }
    // Two slots per rank: the search needs far fewer nodes from the pairing start.
    start.take(p, pairs::pairing_start(p));
    // The full proof, then bisection probes on the objective (`prove`). With two slots per
    // rank the full proof is the search over replica counts (`pairs`), which settles what the
    // expert-by-expert search would, in far fewer nodes; the probes are expert-by-expert
    // searches (a count search that runs out of budget leaves count vectors unsettled, which
    // the expert-by-expert search does not).
    let pairs_proof = p.s == 2 && !p.dup_ok;
    let mut proof = prove::prove_from(
        p,
        start,
        budget,
        // (Two slots per rank and several episodes: the count search settles every leaf with
        // the matching search of `pair_caps` and needs the whole budget on the sweep's hardest
        // 16 x 2 layer, 329,000 nodes; the probes after it settle nothing there.)
        match (pairs_proof, p.w > 1) {
            (true, true) => budget,
            (true, false) => budget * 3 / 4,
            (false, _) => budget / 2,
        },
        |target, nodes| {
            if pairs_proof {
                pairs::solve(p, target, nodes)
            } else {
                exact::solve(p, target, nodes)
            }
        },
        |target, nodes| exact::solve(p, target, nodes),
    );
    // Two slots per rank and several episodes, a count search that ran out of budget (rare
    // since its leaves are settled by `pair_caps`; with eight episodes it still happens): the
    // least per-episode pairing bound over the replica counts needs the count tree alone
    // (before `pair_caps`, 16 experts on 16 x 2 with four episodes: proven gaps 2.9% median
    // with it instead of 7.6%).
    if pairs_proof
        && p.w > 1
        && !proof.optimal
        && let Some(lb) = pairs::count_bound(p, proof.objective, budget)
    {
        proof.raise_lower(lb);
    }
    // Several episodes, three or more slots per rank, not proven: a better plan, by re-placing
    // a few ranks at a time exactly (the searches rarely find one there: the sweep's 16-expert
    // 8 x 4 layers with four windows kept the heuristic's plans at 1.025-1.035). Last, so that
    // layers the searches prove pay nothing (run before the expert-by-expert proof it cost
    // 12-expert 3 x 8 layers that proof settles 140 ms each). Two slots per rank: the count
    // search finds better plans than this.
    // (On the narrow path it ran first with counts fixed: those passes again only from a plan
    // the searches found since, as from its own plan they would repeat themselves.) Then the
    // passes with counts free inside the neighbourhoods (`neighbourhood::COUNT_NODES`), only
    // here, on the layers left open: before the narrow path's ascent they cost the layers it
    // proves (12 experts on 6 x 4 and 8 x 3, about 30-50 ms each).
    if p.w > 1 && p.s >= 3 && !proof.optimal {
        let fixed = if searched_from.as_ref() == Some(&proof.row) {
            0
        } else {
            neighbourhood::NODES
        };
        let row = neighbourhood::improve(p, proof.row.clone(), fixed, neighbourhood::COUNT_NODES);
        proof.take(p, Some(row));
        // A plan that meets the proven bound is optimal.
        let lower = proof.lower;
        proof.raise_lower(lower);
    }
    JointResult {
        optimal: proof.optimal,
        proven_gap: Some(proof.gap()),
        row: proof.row,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::find_duplicate;
    use crate::planner::problem::brute_force_optimum;
    use proptest::prelude::*;

    /// Tiny shapes `(E, R, G)` small enough for the brute-force oracle (E^(E+R) rows),
    /// including forced duplicates (`S > E`) and a single rank.
    const TINY: [(usize, usize, usize); 11] = [
        (3, 1, 2),
        (4, 2, 3),
        (4, 4, 2),
        (5, 1, 3),
        (3, 3, 3),
        (2, 4, 2),
        (5, 3, 4),
        (6, 0, 3),
        (2, 2, 1),
        (3, 5, 4),
        (4, 4, 4),
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn exact_matches_brute_force_oracle(
            case in 0..TINY.len(),
            windows in 1usize..4,
            seed in proptest::collection::vec(0u32..1000, 24),
            hot in proptest::collection::vec(prop::bool::weighted(0.25), 24),
            recency in 0.3f64..1.0,
        ) {
            let (e, r, g) = TINY[case];
            let rows: Vec<Vec<f64>> = (0..windows)
                .map(|k| {
                    (0..e)
                        .map(|i| {
                            let j = (k * e + i) % 24;
                            f64::from(seed[j]) * if hot[j] { 5.0 } else { 1.0 }
                        })
                        .collect()
                })
                .collect();
            let refs: Vec<&[f64]> = rows.iter().map(Vec::as_slice).collect();
            let shape = Shape::new(e, r, g, 1, 1).unwrap();
            let p = Problem::new(&refs, g, e + r, recency, shape.max_replicas());
            let res = plan_layer(&p, &shape, false);
            let want = brute_force_optimum(&p, None);
            let got = p.objective(&res.row).0;
            if p.empty {
                prop_assert!((got - want).abs() < 1e-9);
            } else {
                prop_assert!(res.optimal, "{e} experts, {r} redundant, {g} ranks not proven");
                prop_assert!((got - want).abs() < 1e-9, "joint {got} vs optimum {want}");
            }
            prop_assert!(p.lower_bound() <= want + 1e-9);
        }
    }

    /// FlashLB's published example (vllm-ascend PR): 8 experts, 8 ranks x 2 slots. Greedy
    /// reaches a heaviest rank of 232, FlashLB reports 205; the optimum is 590/3 = 196.67.
    #[test]
    fn flashlb_example_is_solved_to_optimality() {
        let load = [600.0, 560.0, 120.0, 120.0, 20.0, 10.0, 10.0, 10.0];
        let shape = Shape::new(8, 8, 8, 1, 1).unwrap();
        let p = Problem::new(&[&load[..]], 8, 16, 1.0, shape.max_replicas());
        let res = plan_layer(&p, &shape, false);
        assert!(res.optimal);
        let mean = load.iter().sum::<f64>() / 8.0;
        let heaviest = p.objective(&res.row).0 * mean;
        assert!(
            (heaviest - 590.0 / 3.0).abs() < 1e-6,
            "heaviest rank {heaviest}"
        );
        let greedy = p.episode_par(&greedy_row(&load, &shape, false)) * mean;
        assert!((greedy - 232.0).abs() < 1e-6, "greedy {greedy}");
        assert!(find_duplicate(&res.row, 2).is_none());
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
    }

    /// Every shape with 8 experts and 16 slots (2 to 16 ranks), skewed single- and
    /// multi-episode loads: the exact search proves its answer within the node budget.
    /// (Larger instances: `examples/exact_sweep.rs`, results in docs/benchmarks/eplb.md.)
    #[test]
    fn proves_8_experts_16_slots() {
        let mut rng = Rng(11);
        for g in [2, 4, 8, 16] {
            for windows in [1, 4] {
                let rows: Vec<Vec<f64>> = (0..windows)
                    .map(|_| {
                        (0..8)
                            .map(|i| {
                                let zipf = 1000.0 / (1.0 + i as f64).powf(0.9);
                                zipf * (0.5 + (rng.next() % 1000) as f64 / 1000.0)
                            })
                            .collect()
                    })
                    .collect();
                let refs: Vec<&[f64]> = rows.iter().map(Vec::as_slice).collect();
                let shape = Shape::new(8, 8, g, 1, 1).unwrap();
                let p = Problem::new(&refs, g, 16, 0.6, shape.max_replicas());
                let res = plan_layer(&p, &shape, false);
                assert!(res.optimal, "{g} ranks, {windows} windows not proven");
                assert!(p.objective(&res.row).0 >= p.lower_bound() - 1e-9);
            }
        }
    }

    /// A one-hot layer of the sweep (16 experts on 8 x 3, one expert with 60% of the load): the
    /// quick proof settles it from the heuristic's plan within its budget (2,227 nodes), where
    /// the cover search alone spent its whole budget first; `joint` returns the same optimum.
    #[test]
    fn quick_proof_settles_a_skewed_layer() {
        let loads = [
            63.0, 96.0, 98.0, 118.0, 81.0, 1901.0, 143.0, 55.0, 74.0, 91.0, 66.0, 153.0, 106.0,
            66.0, 137.0, 122.0,
        ];
        let shape = Shape::new(16, 8, 8, 1, 1).unwrap();
        let p = Problem::new(&[&loads[..]], 8, 24, 1.0, shape.max_replicas());
        let start = prove::Proof::start(&p, heuristic(&p, &shape, false));
        let quick = quick_proof(&p, start);
        assert!(quick.optimal, "not settled in {QUICK_PROOF_NODES} nodes");
        let res = plan_layer(&p, &shape, false);
        assert!(res.optimal);
        assert!((p.objective(&res.row).0 - quick.objective).abs() < 1e-12);
    }
}
