//! Rank-by-rank exact search for one episode: bin completion with a waste budget.
//!
//! The expert-by-expert search ([`super::exact`]) decides every rank a little at a time, so a
//! rank's final load is known only near the leaves. On near-perfect partitions (the optimum
//! within a fraction of a percent of the mean, as with 12-16 experts of similar load on 4-8
//! ranks) that search cannot refute even a cut 1e-9 above the mean: every rank may still end
//! anywhere below it. This search fills one rank completely before the next, and uses the
//! fact that the load to place does not depend on the replica counts (an expert's replicas
//! split its load): with `R` left to place on `n` empty ranks, every rank must end in the
//! window `(R - (n - 1) cut, cut)`, whose width is the total slack `n cut - R`. Below a cut
//! just above the mean the window is tiny and few rank contents fit it.
//!
//! * Order: experts heaviest first. The rank being filled holds a replica of the *lead*, the
//!   first expert with replicas still to place (every remaining rank is empty, so one of them
//!   holding it can be taken next); its other members are later experts, as a set. Ranks with
//!   the same lead follow one another with their member sets in non-decreasing lexicographic
//!   order, so each placement is generated once up to the order of its ranks.
//! * Counts are chosen when an expert is first placed (replica `x / c` below the cut, at most
//!   one replica per rank); an expert whose remaining replicas (or fewest possible replicas)
//!   equal the ranks left must be on the rank being filled.
//! * Slots: the replicas still owed (placed counts' remainders plus the fewest possible for
//!   unplaced experts) must fit the empty slots, and the most possible must fill them.
//! * Remaining states already refuted (same counts and remainders, same order constraint) are
//!   remembered with the cut they were refuted at.
//!
//! Same contract as [`super::exact::solve`]: finished, it has found the best placement below
//! the seed objective or shown that there is none.

use std::collections::HashMap;

use super::exact::{ExactResult, spend_node};
use super::problem::{Problem, water_fill};

/// Node budget of one layer (a node is one member placed or one rank started, about a tenth
/// of an expert-by-expert node's time: 4M nodes take about 0.35 s on the sweep's machine).
pub(crate) const RANKS_NODES: usize = 4_000_000;
/// Rounding margin of the window's lower end: a rank is only refused for ending below it by
/// more than this (summation order makes the last rank's load differ from what is left by a
/// few ulps).
const FLOOR_MARGIN: f64 = 1e-9;
/// Refuted states remembered at most (each is a few dozen bytes).
const MEMO_LIMIT: usize = 400_000;

/// Whether this search applies: one episode, no forced duplicates, at least three slots per
/// rank (two slots per rank are the pairing search's), and a key that fits a byte per count.
pub(crate) fn eligible(p: &Problem) -> bool {
    p.w == 1 && !p.dup_ok && !p.empty && p.s >= 3 && p.g < 256
}

struct Search<'p> {
    p: &'p Problem,
    /// Experts, heaviest first; everything below is indexed by position in this order.
    order: Vec<usize>,
    x: Vec<f64>,
    /// Water-filling counts (tried first).
    hint: Vec<usize>,
    /// Chosen replica count (0: not placed yet) and replicas still to place.
    cnt: Vec<usize>,
    left: Vec<usize>,
    /// Most replicas an expert may have.
    cap: usize,
    /// Load still to place.
    rest: f64,
    /// Closed ranks (positions) and their loads.
    ranks: Vec<Vec<usize>>,
    rank_loads: Vec<f64>,
    /// The rank being filled: its lead, its other members and its load.
    lead: usize,
    members: Vec<usize>,
    load: f64,
    /// Per rank depth and position, the smallest and largest replica the positions from there
    /// on can still add to the rank being filled (`suffix_min[k * (E + 1) + j]`).
    suffix_min: Vec<f64>,
    suffix_max: Vec<f64>,
    /// Per rank depth, every replica a position can add to the rank being filled as
    /// `(size, position, count)`, ascending by size: the last member is looked up in it.
    candidates: Vec<Vec<(f64, usize, usize)>>,
    /// Per rank depth, the positions that must be on the rank being filled (ascending).
    forced: Vec<Vec<usize>>,
    cut: f64,
    best_row: Option<Vec<usize>>,
    memo: HashMap<Vec<u8>, f64>,
    nodes: usize,
    budget: usize,
    aborted: bool,
}

/// Runs the rank-by-rank search on `p` for a placement with objective below `seed_f` (and
/// then for better ones), with at most `budget` nodes.
pub(crate) fn solve(p: &Problem, seed_f: f64, budget: usize) -> ExactResult {
    let mut order: Vec<usize> = (0..p.e).collect();
    order.sort_by(|&a, &b| p.x[b].total_cmp(&p.x[a]).then(a.cmp(&b)));
    let x: Vec<f64> = order.iter().map(|&e| p.x[e]).collect();
    let wf = water_fill(&p.agg, p.slots(), p.max_rep);
    let mut s = Search {
        p,
        hint: order.iter().map(|&e| wf[e]).collect(),
        order,
        rest: x.iter().sum(),
        x,
        cnt: vec![0; p.e],
        left: vec![0; p.e],
        cap: p.g.min(p.max_rep),
        ranks: Vec::with_capacity(p.g),
        rank_loads: Vec::with_capacity(p.g),
        lead: 0,
        members: Vec::with_capacity(p.s),
        load: 0.0,
        suffix_min: vec![0.0; (p.e + 1) * p.g],
        suffix_max: vec![0.0; (p.e + 1) * p.g],
        candidates: vec![Vec::new(); p.g],
        forced: vec![Vec::new(); p.g],
        cut: seed_f - 1e-9,
        best_row: None,
        memo: HashMap::new(),
        nodes: 0,
        budget,
        aborted: false,
    };
    s.next_rank(usize::MAX, &[]);
    if std::env::var("EPLB_DEBUG").is_ok() {
        eprintln!(
            "ranks: below {seed_f} nodes {} proven {} memo {}",
            s.nodes,
            !s.aborted,
            s.memo.len()
        );
    }
    ExactResult {
        row: s.best_row,
        proven: !s.aborted,
        nodes: s.nodes,
    }
}

impl Search<'_> {
    /// Fewest replicas of position `j` that keep one replica below the cut.
    fn fewest(&self, j: usize) -> usize {
        let x = self.x[j];
        if x <= 0.0 || self.cut <= 0.0 {
            return 1;
        }
        ((x / self.cut).floor() as usize + 1).max(1)
    }

    /// The state after the closed ranks, as a memo key: counts and remainders per position,
    /// and the member set the next rank must not precede (when it has the same lead).
    fn key(&self, constraint: Option<&[usize]>) -> Vec<u8> {
        let mut k = Vec::with_capacity(2 * self.p.e + self.p.s);
        for j in 0..self.p.e {
            k.push(self.cnt[j] as u8);
            k.push(self.left[j] as u8);
        }
        if let Some(c) = constraint {
            k.extend(c.iter().map(|&m| m as u8));
        }
        k
    }

    /// Starts the next rank (or records a finished placement). `prev_lead` / `prev_members`
    /// describe the rank closed last.
    fn next_rank(&mut self, prev_lead: usize, prev_members: &[usize]) {
        if !spend_node(&mut self.nodes, self.budget, &mut self.aborted) {
            return;
        }
        let p = self.p;
        let open = p.g - self.ranks.len();
        let Some(lead) = (0..p.e).find(|&j| self.cnt[j] == 0 || self.left[j] > 0) else {
            if open == 0 {
                self.record();
            }
            return;
        };
        if open == 0 || self.rest >= open as f64 * self.cut {
            return;
        }
        // Replicas owed against the empty slots.
        let slots = open * p.s;
        let (mut need_min, mut need_max) = (0, 0);
        for j in 0..p.e {
            if self.cnt[j] > 0 {
                if self.left[j] > open {
                    return;
                }
                need_min += self.left[j];
                need_max += self.left[j];
            } else {
                let lo = self.fewest(j);
                let hi = self.cap.min(open);
                if lo > hi {
                    return;
                }
                need_min += lo;
                need_max += hi;
            }
        }
        if need_min > slots || need_max < slots {
            return;
        }
        let constraint = (lead == prev_lead).then_some(prev_members);
        let key = self.key(constraint);
        if self.memo.get(&key).is_some_and(|&c| c >= self.cut) {
            return;
        }
        // Bounds on what each position can still add to this rank (per rank depth: the
        // ranks after this one overwrite their own rows).
        let n = p.e + 1;
        let base = self.ranks.len() * n;
        self.suffix_min[base + p.e] = f64::INFINITY;
        self.suffix_max[base + p.e] = f64::NEG_INFINITY;
        for j in (0..p.e).rev() {
            let (lo, hi) = if self.cnt[j] > 0 {
                if self.left[j] > 0 {
                    let v = self.x[j] / self.cnt[j] as f64;
                    (v, v)
                } else {
                    (f64::INFINITY, f64::NEG_INFINITY)
                }
            } else {
                (
                    self.x[j] / self.cap.min(open) as f64,
                    self.x[j] / self.fewest(j) as f64,
                )
            };
            self.suffix_min[base + j] = self.suffix_min[base + j + 1].min(lo);
            self.suffix_max[base + j] = self.suffix_max[base + j + 1].max(hi);
        }
        let depth = self.ranks.len();
        let mut cands = std::mem::take(&mut self.candidates[depth]);
        let mut forced = std::mem::take(&mut self.forced[depth]);
        cands.clear();
        forced.clear();
        for j in lead + 1..p.e {
            if self.cnt[j] > 0 {
                if self.left[j] > 0 {
                    cands.push((self.x[j] / self.cnt[j] as f64, j, self.cnt[j]));
                    if self.left[j] >= open {
                        forced.push(j);
                    }
                }
            } else {
                let lo = self.fewest(j);
                for c in lo..=self.cap.min(open) {
                    cands.push((self.x[j] / c as f64, j, c));
                }
                if lo >= open {
                    forced.push(j);
                }
            }
        }
        cands.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        self.candidates[depth] = cands;
        self.forced[depth] = forced;
        let saved = (self.lead, std::mem::take(&mut self.members), self.load);
        let rest_before = self.rest;
        self.lead = lead;
        for c in self.count_options(lead, open) {
            let fresh = self.cnt[lead] == 0;
            if fresh {
                self.cnt[lead] = c;
                self.left[lead] = c;
            }
            let size = self.x[lead] / self.cnt[lead] as f64;
            self.left[lead] -= 1;
            self.load = size;
            self.members.clear();
            self.pick(lead + 1, p.s - 1, rest_before, constraint, true);
            self.left[lead] += 1;
            if fresh {
                self.cnt[lead] = 0;
                self.left[lead] = 0;
            }
            if self.aborted {
                break;
            }
        }
        self.rest = rest_before;
        (self.lead, self.members, self.load) = saved;
        if !self.aborted && self.memo.len() < MEMO_LIMIT {
            self.memo.insert(key, self.cut);
        }
    }

    /// Replica counts to try for position `j` (its chosen count once placed), nearest the
    /// water-filling suggestion first.
    fn count_options(&self, j: usize, open: usize) -> Vec<usize> {
        if self.cnt[j] > 0 {
            return vec![self.cnt[j]];
        }
        let (lo, hi) = (self.fewest(j), self.cap.min(open));
        let mut v: Vec<usize> = (lo..=hi).collect();
        let hint = self.hint[j].clamp(lo.min(hi), hi.max(lo));
        v.sort_by_key(|&c| (c.abs_diff(hint), std::cmp::Reverse(c)));
        v
    }

    /// Adds `need` more members to the rank being filled, from positions `from..`.
    /// `constraint`: the previous rank's members (same lead), which this rank's member list
    /// must not precede lexicographically; `tight`: the members so far equal its prefix.
    fn pick(
        &mut self,
        from: usize,
        need: usize,
        rest_before: f64,
        constraint: Option<&[usize]>,
        tight: bool,
    ) {
        if !spend_node(&mut self.nodes, self.budget, &mut self.aborted) {
            return;
        }
        let p = self.p;
        let open = p.g - self.ranks.len();
        if need == 0 {
            self.close_rank(rest_before);
            return;
        }
        let depth = self.ranks.len();
        // Positions that must be on this rank and are still to come.
        let first_forced = self.forced[depth].iter().position(|&f| f >= from);
        let forced_left = first_forced.map_or(0, |i| self.forced[depth].len() - i);
        if forced_left > need {
            return;
        }
        let forced_next = first_forced.map(|i| self.forced[depth][i]);
        // The rank must end above this for the other ranks to take the rest under the cut
        // (less a rounding margin: the last rank must take exactly what is left).
        let floor = rest_before - (open - 1) as f64 * self.cut - FLOOR_MARGIN;
        let slot = p.s - 1 - need;
        let low = match (tight, constraint) {
            (true, Some(c)) => c[slot].max(from),
            _ => from,
        };
        if need == 1 {
            // The last member: its size must land the rank in (floor, cut).
            let (lo, hi) = (floor - self.load, self.cut - self.load);
            let cands = std::mem::take(&mut self.candidates[depth]);
            let start = cands.partition_point(|c| c.0 <= lo);
            for &(size, j, c) in &cands[start..] {
                if size >= hi {
                    break;
                }
                if j < low || forced_next.is_some_and(|f| f != j) {
                    continue;
                }
                self.place(j, c, size, rest_before, constraint, false);
                if self.aborted {
                    break;
                }
            }
            self.candidates[depth] = cands;
            return;
        }
        let base = depth * (p.e + 1);
        for j in low..p.e {
            if p.e - j < need
                || self.suffix_min[base + j] * need as f64 + self.load >= self.cut
                || self.suffix_max[base + j] * need as f64 + self.load <= floor
            {
                break;
            }
            let placed = self.cnt[j] > 0;
            if !(placed && self.left[j] == 0) {
                let still_tight = tight && constraint.is_some_and(|c| c[slot] == j);
                let rest_min = self.suffix_min[base + j + 1] * (need - 1) as f64;
                let rest_max = self.suffix_max[base + j + 1] * (need - 1) as f64;
                for c in self.count_options(j, open) {
                    let size = self.x[j] / c as f64;
                    let load = self.load + size;
                    if load + rest_min >= self.cut || load + rest_max <= floor {
                        continue;
                    }
                    self.place(j, c, size, rest_before, constraint, still_tight);
                    if self.aborted {
                        return;
                    }
                }
            }
            // A position that must be on this rank cannot be skipped.
            if forced_next == Some(j) {
                break;
            }
        }
    }

    /// Puts a replica of position `j` (count `c`, `size`) on the rank being filled and goes on
    /// with the next member.
    fn place(
        &mut self,
        j: usize,
        c: usize,
        size: f64,
        rest_before: f64,
        constraint: Option<&[usize]>,
        tight: bool,
    ) {
        let placed = self.cnt[j] > 0;
        if !placed {
            self.cnt[j] = c;
            self.left[j] = c;
        }
        self.left[j] -= 1;
        self.members.push(j);
        let before = self.load;
        self.load += size;
        let need = self.p.s - 1 - self.members.len();
        self.pick(j + 1, need, rest_before, constraint, tight);
        self.load = before;
        self.members.pop();
        self.left[j] += 1;
        if !placed {
            self.cnt[j] = 0;
            self.left[j] = 0;
        }
    }

    /// The rank is full: closes it if what is left fits under the cut on the other ranks, and
    /// goes on with the next rank.
    fn close_rank(&mut self, rest_before: f64) {
        let open = self.p.g - self.ranks.len();
        let after = rest_before - self.load;
        if after > (open - 1) as f64 * self.cut + FLOOR_MARGIN {
            return;
        }
        self.rest = after;
        let members = self.members.clone();
        self.ranks.push(
            std::iter::once(self.lead)
                .chain(members.iter().copied())
                .collect(),
        );
        self.rank_loads.push(self.load);
        let (lead, load) = (self.lead, self.load);
        self.next_rank(lead, &members);
        self.ranks.pop();
        self.rank_loads.pop();
        (self.lead, self.members, self.load) = (lead, members, load);
        self.rest = rest_before;
    }

    /// Every rank is closed and every replica placed: a placement below the cut.
    fn record(&mut self) {
        let f = self
            .rank_loads
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        if f >= self.cut {
            return;
        }
        self.cut = f - 1e-9;
        let row = self
            .ranks
            .iter()
            .flat_map(|r| r.iter().map(|&j| self.order[j]))
            .collect();
        self.best_row = Some(row);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::find_duplicate;
    use crate::planner::exact;
    use crate::planner::problem::brute_force_optimum;
    use proptest::prelude::*;

    /// Tiny shapes `(E, slots, G)` with at least three slots per rank, small enough for the
    /// brute-force oracle (`E^slots` rows).
    const TINY: [(usize, usize, usize); 7] = [
        (3, 6, 2),
        (4, 6, 2),
        (5, 6, 2),
        (4, 8, 2),
        (3, 9, 3),
        (4, 9, 3),
        (6, 6, 2),
    ];

    fn problem(loads: &[f64], g: usize, slots: usize) -> Problem {
        let shape = crate::shape::Shape::new(loads.len(), slots - loads.len(), g, 1, 1)
            .expect("a valid shape");
        Problem::new(&[loads], g, slots, 1.0, shape.max_replicas())
    }

    /// The search's answer from an unbounded start: a valid row with its objective, proven.
    fn optimum(p: &Problem, budget: usize) -> (f64, bool) {
        let res = solve(p, f64::INFINITY, budget);
        let row = res.row.expect("every eligible problem has a placement");
        assert_eq!(row.len(), p.slots());
        assert!(find_duplicate(&row, p.s).is_none(), "{row:?}");
        let mut cnt = vec![0; p.e];
        row.iter().for_each(|&e| cnt[e] += 1);
        assert!(cnt.iter().all(|&c| c >= 1 && c <= p.max_rep), "{cnt:?}");
        (p.objective(&row).0, res.proven)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        /// The brute-force optimum, found and proven; and below it, nothing (a refutation
        /// that is not one, or a missed placement, fails this).
        #[test]
        fn matches_brute_force_oracle(
            case in 0..TINY.len(),
            seed in proptest::collection::vec(1u32..1000, 6),
            hot in proptest::collection::vec(prop::bool::weighted(0.3), 6),
        ) {
            let (e, slots, g) = TINY[case];
            let loads: Vec<f64> = (0..e)
                .map(|i| f64::from(seed[i]) * if hot[i] { 20.0 } else { 1.0 })
                .collect();
            let p = problem(&loads, g, slots);
            prop_assume!(eligible(&p));
            let want = brute_force_optimum(&p, None);
            let (got, proven) = optimum(&p, 10_000_000);
            prop_assert!(proven);
            prop_assert!((got - want).abs() < 1e-9, "search {got} vs brute force {want}");
            let below = solve(&p, want - 1e-6, 10_000_000);
            prop_assert!(below.proven && below.row.is_none());
        }
    }

    /// Against the expert-by-expert search where that one finishes: the same optimum.
    #[test]
    fn agrees_with_the_expert_by_expert_search() {
        let mut rng = crate::synth::Rng::new(11);
        for (e, slots, g) in [(8, 16, 4), (8, 24, 8), (12, 24, 4), (10, 20, 5)] {
            for _ in 0..6 {
                let s = 0.4 + 0.8 * rng.uniform();
                let loads: Vec<f64> = (0..e)
                    .map(|i| {
                        (1000.0 * (1.0 + i as f64).powf(-s) * (0.4 * rng.normal()).exp()).round()
                    })
                    .collect();
                let p = problem(&loads, g, slots);
                let reference = exact::solve(&p, f64::INFINITY, 50_000_000);
                assert!(reference.proven, "{loads:?} on {g} ranks");
                let want = p.objective(&reference.row.expect("a placement")).0;
                let (got, proven) = optimum(&p, 50_000_000);
                assert!(proven, "{loads:?} on {g} ranks");
                assert!(
                    (got - want).abs() < 1e-9,
                    "{loads:?} on {g} ranks: {got} vs {want}"
                );
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Proving from below with any budget: the interval holds the brute-force optimum and
        /// "optimal" is said of the optimum only (a refuted probe above the optimum, or a
        /// lower bound taken from an unfinished probe, fails this).
        #[test]
        fn ascending_proof_holds_the_optimum(
            case in 0..TINY.len(),
            seed in proptest::collection::vec(1u32..1000, 6),
            budget in 1usize..20_000,
        ) {
            let (e, slots, g) = TINY[case];
            let loads: Vec<f64> = (0..e).map(|i| f64::from(seed[i])).collect();
            let p = problem(&loads, g, slots);
            prop_assume!(eligible(&p));
            let want = brute_force_optimum(&p, None);
            // A deliberately poor start: experts dealt round-robin, duplicates repaired.
            let mut start: Vec<usize> = (0..slots).map(|i| i % e).collect();
            crate::placement::repair_duplicates(&mut start, e, g);
            let proof = crate::planner::prove::ascend(
                &p,
                crate::planner::prove::Proof::start(&p, start),
                budget,
                |t, n| solve(&p, t, n),
            );
            prop_assert!(proof.lower <= want + 1e-9, "lower {} above optimum {want}", proof.lower);
            prop_assert!(proof.objective >= want - 1e-9);
            prop_assert!((proof.objective - p.objective(&proof.row).0).abs() < 1e-12);
            if proof.optimal {
                prop_assert!((proof.objective - want).abs() < 1e-9, "optimal {} vs {want}", proof.objective);
            }
        }
    }

    /// The shapes the expert-by-expert search could not close (docs/benchmarks/eplb-exact.md):
    /// 16 experts on 6 ranks x 4 slots and 8 ranks x 3 with near-uniform loads, proven by
    /// `joint` (the rank-by-rank search proving from below).
    #[test]
    fn joint_proves_near_uniform_layers_on_many_ranks() {
        let mut rng = crate::synth::Rng::new(3);
        for (slots, g) in [(24, 6), (24, 8), (32, 4)] {
            for _ in 0..3 {
                let loads: Vec<f64> = (0..16)
                    .map(|_| (1000.0 * (0.5 + rng.uniform())).round())
                    .collect();
                let shape = crate::shape::Shape::new(16, slots - 16, g, 1, 1).expect("shape");
                let p = Problem::new(&[&loads[..]], g, slots, 1.0, shape.max_replicas());
                let res = crate::planner::joint::plan_layer(&p, &shape, false);
                assert!(
                    res.optimal,
                    "{loads:?} on {g} ranks: gap {:?}",
                    res.proven_gap
                );
                assert!(find_duplicate(&res.row, p.s).is_none());
            }
        }
    }
}
