//! The best pairing of fixed replica counts with several episodes (two slots per rank), by
//! enumerating per-episode caps and testing each with a perfect matching.
//!
//! With counts fixed, a placement on ranks of two slots is a pairing of the replicas and its
//! objective is `F = sum_k w_k M_k`, `M_k` the heaviest pair of episode `k`. Given caps
//! `(C_1..C_W)`, a pairing with every pair of episode-`k` load at most `C_k` exists iff the graph
//! of the replicas whose pairs meet every cap (two replicas of one expert never) has a perfect
//! matching ([`super::blossom`]). Each `M_k` is the load of some pair of distinct experts, and at
//! least the episode's sorted pairing (the best pairing of that episode alone), so the search
//! enumerates candidate caps:
//! * the episodes by weight, heaviest first; the caps of all but the last two in increasing
//!   order, pruned by `sum_k w_k C_k` (undecided episodes at their sorted-pairing bound) against
//!   the cut, and by a matching test with every undecided cap as high as the cut allows;
//! * the last two as a staircase: the least feasible cap of the last episode does not grow
//!   as the cap of the one before grows, so both are walked in one pass (one matching test per
//!   step).
//!
//! Every feasible test's matching is a placement; the best below the cut is kept and lowers
//! the cut. Finished, the search has found the best pairing of these counts below the cut, or
//! shown there is none. It can run in pieces ([`Resumable`]): a piece that runs out records
//! the caps it stood at, and the next goes on from there below a cut no higher.

use super::blossom::Matcher;
use super::exact::{ExactResult, spend_node};
use super::problem::Problem;

/// The best pairing of the replicas of `cnt` (several episodes, no expert twice on a rank)
/// with objective below `cut`, each matching test one node of `budget`: the search in one
/// piece (the count search runs it in several, [`Resumable`]).
#[cfg(test)]
pub(crate) fn best_pairing(p: &Problem, cnt: &[usize], cut: f64, budget: usize) -> ExactResult {
    Resumable::new(p, cnt).run(cut, budget)
}

/// The caps search of one count vector, run in pieces: each [`Resumable::run`] goes on from
/// where the previous one ran out of budget, below a cut no higher than before (what the
/// pieces skip was searched at a higher cut: any pairing below the new cut there was found
/// then). A count-search leaf runs it by turns with the pairing search, which may lower the
/// cut in between.
pub(crate) struct Resumable<'p> {
    caps: Caps<'p>,
    started: bool,
}

impl<'p> Resumable<'p> {
    pub(crate) fn new(p: &'p Problem, cnt: &[usize]) -> Resumable<'p> {
        Resumable {
            caps: Caps::new(p, cnt, f64::INFINITY, 0),
            started: false,
        }
    }

    /// The best pairing below `cut` in what is left of the enumeration, with `budget` more
    /// matching tests; `proven` when the enumeration is complete (with the earlier pieces,
    /// every pairing below `cut` has been seen).
    pub(crate) fn run(&mut self, cut: f64, budget: usize) -> ExactResult {
        let s = &mut self.caps;
        // A NaN cut would pass every `floor >= cut` test and index past a candidate list.
        if cut.is_nan() || s.order.is_empty() || s.owner.len() > 64 {
            return ExactResult {
                row: None,
                proven: false,
                nodes: 0,
            };
        }
        // Resuming: the test that ran out is done again (at the depth recorded then).
        s.resuming = self.started && s.aborted;
        s.resume_depth = s.depth;
        if self.started && !s.aborted {
            // The enumeration finished before: nothing left below any lower cut.
            return ExactResult {
                row: None,
                proven: true,
                nodes: 0,
            };
        }
        self.started = true;
        s.cut = if s.cut.is_finite() {
            s.cut.min(cut)
        } else {
            cut
        };
        s.best_row = None;
        s.nodes = 0;
        s.budget = budget;
        s.aborted = false;
        s.level(0, 0.0);
        ExactResult {
            row: s.best_row.take(),
            proven: !s.aborted,
            nodes: s.nodes,
        }
    }
}

struct Caps<'p> {
    p: &'p Problem,
    /// Expert of each replica (vertex of the matching graph).
    owner: Vec<usize>,
    /// Per expert, the bits of its replicas.
    reps: Vec<u64>,
    /// Episodes with weight, heaviest weight first.
    order: Vec<usize>,
    /// Per episode: the distinct loads of pairs of distinct experts, ascending.
    cands: Vec<Vec<f64>>,
    /// Per episode: the first candidate at or above its sorted-pairing bound.
    lo: Vec<usize>,
    /// The pairs of distinct experts, and `loads[k * pairs + t]` the load of pair `t` in
    /// episode `k`.
    pairs: Vec<(usize, usize)>,
    loads: Vec<f64>,
    /// Per expert, the replicas (bits) it may share a rank with under the current caps.
    ok: Vec<u64>,
    /// Per episode: the candidate index of its current cap.
    at: Vec<usize>,
    /// `rest[j]`: `sum w_k cands[k][lo[k]]` over `order[j..]`.
    rest: Vec<f64>,
    cut: f64,
    best_row: Option<Vec<usize>>,
    nodes: usize,
    budget: usize,
    aborted: bool,
    adj: Vec<u64>,
    matcher: Matcher,
    /// Per depth of the enumeration (position in `order`), the candidate index of the cap being
    /// tried (for the last episode, the staircase's `jb`); `depth` the deepest level the
    /// current test belongs to. Recorded as they stand when the budget runs out.
    path: Vec<usize>,
    depth: usize,
    /// The depth recorded when the budget ran out, where resuming ends.
    resume_depth: usize,
    /// Resuming ([`Resumable::run`]): each level starts at its `path` entry instead of its
    /// first candidate until the level of the test that ran out is reached, or a level moves
    /// past its entry.
    resuming: bool,
}

impl<'p> Caps<'p> {
    fn new(p: &'p Problem, cnt: &[usize], cut: f64, budget: usize) -> Caps<'p> {
        let (e, w) = (p.e, p.w);
        let mut owner = Vec::with_capacity(p.slots());
        let mut reps = vec![0u64; e];
        for (x, &c) in cnt.iter().enumerate() {
            for _ in 0..c {
                if owner.len() < 64 {
                    reps[x] |= 1 << owner.len();
                }
                owner.push(x);
            }
        }
        let size = |x: usize, k: usize| p.x[x * w + k] / cnt[x] as f64;
        let mut order: Vec<usize> = (0..w).filter(|&k| p.omega[k] > 0.0).collect();
        order.sort_by(|&a, &b| p.omega[b].total_cmp(&p.omega[a]).then(a.cmp(&b)));
        let present: Vec<usize> = (0..e).filter(|&x| cnt[x] > 0).collect();
        let mut pairs = Vec::with_capacity(present.len() * present.len() / 2);
        for (i, &a) in present.iter().enumerate() {
            for &b in &present[i + 1..] {
                pairs.push((a, b));
            }
        }
        let np = pairs.len();
        let mut loads = vec![0.0; w * np];
        let mut cands = vec![Vec::new(); w];
        let mut lo = vec![0; w];
        for &k in &order {
            for (t, &(a, b)) in pairs.iter().enumerate() {
                loads[k * np + t] = size(a, k) + size(b, k);
            }
            let mut c = loads[k * np..(k + 1) * np].to_vec();
            c.sort_by(f64::total_cmp);
            c.dedup();
            // The sorted pairing of the episode's replicas: no pairing has a lighter heaviest
            // pair (pairs of one expert allowed, so it bounds the valid pairings too).
            let mut units: Vec<f64> = owner.iter().map(|&x| size(x, k)).collect();
            units.sort_by(f64::total_cmp);
            let n = units.len();
            let bound = (0..n / 2)
                .map(|t| units[t] + units[n - 1 - t])
                .fold(f64::NEG_INFINITY, f64::max);
            lo[k] = c.partition_point(|&v| v < bound - 1e-12);
            cands[k] = c;
        }
        let mut rest = vec![0.0; order.len() + 1];
        for j in (0..order.len()).rev() {
            let k = order[j];
            let least = cands[k].get(lo[k]).copied().unwrap_or(f64::INFINITY);
            rest[j] = rest[j + 1] + p.omega[k] * least;
        }
        let n = owner.len();
        Caps {
            p,
            owner,
            reps,
            order,
            cands,
            lo,
            pairs,
            loads,
            ok: vec![0; e],
            at: vec![0; w],
            rest,
            cut,
            best_row: None,
            nodes: 0,
            budget,
            aborted: false,
            adj: vec![0; n],
            matcher: Matcher::new(n.min(64)),
            path: vec![0; w],
            depth: 0,
            resume_depth: 0,
            resuming: false,
        }
    }

    /// The highest candidate index of episode `k` whose weighted cap stays below `room`, if
    /// any at or above the episode's bound.
    fn highest_below(&self, k: usize, room: f64) -> Option<usize> {
        let w = self.p.omega[k];
        let n = self.cands[k].partition_point(|&v| w * v < room);
        (n > self.lo[k]).then(|| n - 1)
    }

    /// Enumerates the cap of episode `order[j]` (caps of `order[..j]` fixed, their weighted sum
    /// `partial`).
    fn level(&mut self, j: usize, partial: f64) {
        let left = self.order.len() - j;
        if left == 2 {
            self.staircase(partial);
            return;
        }
        let k = self.order[j];
        let w = self.p.omega[k];
        let first = self.start(j, self.lo[k]);
        for i in first..self.cands[k].len() {
            if i != first {
                // Past the recorded entry: what follows was never searched.
                self.resuming = false;
            }
            let floor = partial + w * self.cands[k][i] + self.rest[j + 1];
            if floor >= self.cut {
                break;
            }
            self.at[k] = i;
            self.path[j] = i;
            self.depth = j;
            if left == 1 {
                // One episode with weight: the least feasible cap is its optimum.
                if self.feasible() || self.aborted {
                    return;
                }
                continue;
            }
            // Every later cap as high as the cut allows (the others at their bounds). Resuming
            // below this level, the test passed before: skipped, so that every piece gets past
            // the path it resumes on (the levels below search the same caps either way).
            let mut open = true;
            for &q in &self.order[j + 1..] {
                let room = self.cut - floor + self.p.omega[q] * self.cands[q][self.lo[q]];
                match self.highest_below(q, room) {
                    Some(h) => self.at[q] = h,
                    None => open = false,
                }
            }
            if !self.resuming && (!open || !self.feasible()) {
                if self.aborted {
                    return;
                }
                continue;
            }
            self.level(j + 1, partial + w * self.cands[k][i]);
            if self.aborted {
                return;
            }
        }
    }

    /// The first candidate index level `j` tries: `lo`, or when resuming the one it stood at
    /// when the budget ran out (resuming ends at the level of that test).
    fn start(&mut self, j: usize, lo: usize) -> usize {
        if !self.resuming {
            return lo;
        }
        if j == self.resume_depth {
            self.resuming = false;
        }
        self.path[j].max(lo)
    }

    /// The last two episodes' caps: for each cap of the first ascending, the least feasible cap
    /// of the second, which never grows, so its index only moves down.
    fn staircase(&mut self, partial: f64) {
        let n = self.order.len();
        let (a, b) = (self.order[n - 2], self.order[n - 1]);
        let (wa, wb) = (self.p.omega[a], self.p.omega[b]);
        let mut jb = self.cands[b].len();
        let mut first = self.lo[a];
        if self.resuming {
            // Only a test of the staircase records this depth: the same cap of `a`, and `b`'s
            // walk from where it stood (the caps it passed above are infeasible or no better).
            first = self.path[n - 2].max(first);
            jb = self.path[n - 1].min(jb);
            self.resuming = false;
        }
        self.depth = n - 1;
        for ia in first..self.cands[a].len() {
            self.path[n - 2] = ia;
            let base = partial + wa * self.cands[a][ia];
            if base + self.rest[n - 1] >= self.cut {
                return;
            }
            // The highest cap of `b` still below the cut (the cut may have dropped).
            while jb > self.lo[b] && base + wb * self.cands[b][jb - 1] >= self.cut {
                jb -= 1;
            }
            if jb <= self.lo[b] {
                return;
            }
            self.at[a] = ia;
            self.at[b] = jb - 1;
            self.path[n - 1] = jb;
            if !self.feasible() {
                if self.aborted {
                    return;
                }
                continue;
            }
            jb -= 1;
            // Down to the least feasible cap of `b` for this cap of `a`.
            while jb > self.lo[b] {
                self.at[b] = jb - 1;
                self.path[n - 1] = jb;
                if !self.feasible() {
                    break;
                }
                jb -= 1;
            }
            if self.aborted {
                return;
            }
            // Later caps of `a` with this cap of `b` or a higher one: only those below.
        }
    }

    /// Whether the replicas can be paired within the current caps; when they can, the pairing
    /// is offered as a placement.
    fn feasible(&mut self) -> bool {
        if !spend_node(&mut self.nodes, self.budget, &mut self.aborted) {
            return false;
        }
        let np = self.pairs.len();
        self.ok.fill(0);
        'pairs: for (t, &(a, b)) in self.pairs.iter().enumerate() {
            for &k in &self.order {
                if self.loads[k * np + t] > self.cands[k][self.at[k]] {
                    continue 'pairs;
                }
            }
            self.ok[a] |= self.reps[b];
            self.ok[b] |= self.reps[a];
        }
        for (v, &x) in self.owner.iter().enumerate() {
            self.adj[v] = self.ok[x];
        }
        if !self.matcher.perfect(&self.adj) {
            return false;
        }
        let mut row = Vec::with_capacity(self.owner.len());
        for (v, &u) in self.matcher.mate.iter().enumerate() {
            if v < u {
                row.push(self.owner[v]);
                row.push(self.owner[u]);
            }
        }
        let f = self.p.episode_par(&row);
        if f < self.cut {
            self.cut = f - 1e-9;
            self.best_row = Some(row);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::find_duplicate;
    use crate::planner::pair_search::pair_search;
    use crate::planner::problem::brute_force_optimum;
    use proptest::prelude::*;

    /// `e` experts on `g` ranks of two slots, `windows` episodes of loads from `seed`.
    fn problem(e: usize, g: usize, windows: usize, seed: &[u32], recency: f64) -> Problem {
        problem_with(e, g, windows, seed, recency, None)
    }

    /// [`problem`] with episode `zero` (if any) carrying no load (weight 0).
    fn problem_with(
        e: usize,
        g: usize,
        windows: usize,
        seed: &[u32],
        recency: f64,
        zero: Option<usize>,
    ) -> Problem {
        let rows: Vec<Vec<f64>> = (0..windows)
            .map(|k| {
                (0..e)
                    .map(|i| {
                        if zero == Some(k) {
                            0.0
                        } else {
                            f64::from(seed[(k * e + i) % seed.len()])
                        }
                    })
                    .collect()
            })
            .collect();
        let refs: Vec<&[f64]> = rows.iter().map(Vec::as_slice).collect();
        Problem::new(&refs, g, 2 * g, recency, g)
    }

    /// Replica counts: one each, the other slots dealt by `extra`, at most `g` per expert;
    /// `None` when that fails.
    fn counts(e: usize, g: usize, extra: &[usize]) -> Option<Vec<usize>> {
        let mut cnt = vec![1usize; e];
        let mut left = (2 * g).checked_sub(e)?;
        let mut i = 0;
        while left > 0 && i < 200 {
            let j = (i + extra[i % extra.len()]) % e;
            if cnt[j] < g {
                cnt[j] += 1;
                left -= 1;
            }
            i += 1;
        }
        (left == 0).then_some(cnt)
    }

    /// A row's objective after checking it is a pairing of exactly `cnt` with no expert twice
    /// on a rank.
    fn checked(p: &Problem, cnt: &[usize], row: &[usize]) -> f64 {
        assert!(find_duplicate(row, 2).is_none(), "{row:?}");
        let mut got = vec![0usize; cnt.len()];
        row.iter().for_each(|&x| got[x] += 1);
        assert_eq!(got, cnt);
        p.objective(row).0
    }

    /// Tiny two-slot shapes `(E, G)` for the brute-force oracle.
    const TINY: [(usize, usize); 7] = [(2, 2), (3, 2), (3, 3), (4, 3), (4, 4), (5, 3), (5, 4)];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Against brute force over every row with the same counts, 1-4 episodes: from no cut
        /// it finds the optimum and finishes; with the cut just above it, it finds it; just
        /// below, it finishes with nothing. A cap enumeration that skipped a cap, a staircase
        /// that moved past a feasible cap or a matching that missed a pairing fails this.
        #[test]
        fn matches_brute_force_under_fixed_counts(
            case in 0..TINY.len(),
            windows in 1usize..5,
            seed in proptest::collection::vec(1u32..1000, 20),
            extra in proptest::collection::vec(0usize..4, 5),
            recency in prop_oneof![Just(1.0), 0.3f64..1.0],
            zero_window in proptest::option::of(0usize..4),
        ) {
            let (e, g) = TINY[case];
            // Equal weights (recency 1) and an episode without load (weight 0) included.
            let p = problem_with(e, g, windows, &seed, recency, zero_window);
            prop_assume!(!p.empty);
            let Some(cnt) = counts(e, g, &extra) else {
                return Err(TestCaseError::reject("no counts"));
            };
            let want = brute_force_optimum(&p, Some(&cnt));
            let res = best_pairing(&p, &cnt, f64::INFINITY, 1_000_000);
            prop_assert!(res.proven);
            if want.is_finite() {
                let row = res.row.expect("a pairing exists");
                let got = checked(&p, &cnt, &row);
                prop_assert!((got - want).abs() < 1e-9, "caps {got} vs optimum {want}");
                let near = best_pairing(&p, &cnt, want + 1e-7, 1_000_000);
                prop_assert!(near.proven);
                let row = near.row.expect("the optimum is below the cut");
                prop_assert!((checked(&p, &cnt, &row) - want).abs() < 1e-9);
                let below = best_pairing(&p, &cnt, want - 1e-6, 1_000_000);
                prop_assert!(below.proven && below.row.is_none());
            } else {
                // No pairing without an expert twice on a rank.
                prop_assert!(res.row.is_none());
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Run in pieces of a few tests each, the cut lowered between pieces as a pairing
        /// search would (to just above the optimum, or to the best found): the pieces together
        /// find the optimum and finish, and nothing is found below it. A resumption that
        /// skipped the test that ran out, or restarted a level past its recorded cap, fails
        /// this.
        #[test]
        fn resumed_in_pieces_matches_brute_force(
            case in 0..TINY.len(),
            windows in 2usize..5,
            seed in proptest::collection::vec(1u32..1000, 20),
            extra in proptest::collection::vec(0usize..4, 5),
            pieces in proptest::collection::vec((1usize..6, 0u8..4), 1..40),
        ) {
            let (e, g) = TINY[case];
            let p = problem(e, g, windows, &seed, 0.6);
            prop_assume!(!p.empty);
            let Some(cnt) = counts(e, g, &extra) else {
                return Err(TestCaseError::reject("no counts"));
            };
            let want = brute_force_optimum(&p, Some(&cnt));
            let mut r = Resumable::new(&p, &cnt);
            let mut cut = f64::INFINITY;
            let mut best = f64::INFINITY;
            let mut done = false;
            for step in 0..10_000 {
                let (budget, lower) = pieces[step % pieces.len()];
                // Now and then a pairing found elsewhere lowers the cut (never below the
                // optimum, as a search's cut never is while the optimum is unfound).
                if lower == 0 && want.is_finite() && cut > want + 1e-7 {
                    cut = want + 1e-7;
                }
                let res = r.run(cut, budget);
                if let Some(row) = res.row {
                    let f = checked(&p, &cnt, &row);
                    prop_assert!(f < cut, "{f} not below the cut {cut}");
                    best = best.min(f);
                    cut = f - 1e-9;
                }
                if res.proven {
                    done = true;
                    break;
                }
            }
            prop_assert!(done, "10,000 pieces did not finish");
            if want.is_finite() {
                prop_assert!((best - want).abs() < 1e-9, "pieces {best} vs optimum {want}");
            } else {
                prop_assert!(best.is_infinite());
            }
            // Finished: nothing more, below any cut.
            let again = r.run(cut, 100);
            prop_assert!(again.proven && again.row.is_none());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Beyond the brute force (8-10 experts, 12-16 slots, 2-4 episodes): the same optimum as
        /// the branch-and-bound over pairings, which shares no code with it, wherever that
        /// finishes.
        #[test]
        fn agrees_with_the_pairing_search(
            case in 0usize..3,
            windows in 2usize..5,
            seed in proptest::collection::vec(1u32..1000, 40),
            extra in proptest::collection::vec(0usize..6, 7),
        ) {
            let (e, g) = [(8, 6), (9, 7), (10, 8)][case];
            let p = problem(e, g, windows, &seed, 0.6);
            let Some(cnt) = counts(e, g, &extra) else {
                return Err(TestCaseError::reject("no counts"));
            };
            let other = pair_search(&p, &cnt, f64::INFINITY, 5_000_000);
            prop_assume!(other.proven);
            let res = best_pairing(&p, &cnt, f64::INFINITY, 1_000_000);
            prop_assert!(res.proven);
            match (res.row, other.row) {
                (Some(a), Some(b)) => {
                    let (fa, fb) = (checked(&p, &cnt, &a), p.objective(&b).0);
                    prop_assert!((fa - fb).abs() < 1e-9, "caps {fa} vs pairing search {fb}");
                }
                (a, b) => prop_assert!(a.is_none() && b.is_none(), "{a:?} vs {b:?}"),
            }
        }
    }

    /// Out of budget, it says so: a search stopped after one test is not finished.
    #[test]
    fn an_exhausted_budget_is_not_a_proof() {
        let p = problem(
            10,
            8,
            4,
            &[
                900, 310, 620, 760, 850, 1120, 280, 240, 320, 610, 400, 730, 230, 360, 290, 190,
                470, 500, 580, 860, 890, 260,
            ],
            0.6,
        );
        let cnt = counts(10, 8, &[0, 1, 2, 3, 4]).expect("counts");
        let full = best_pairing(&p, &cnt, f64::INFINITY, 1_000_000);
        assert!(full.proven && full.row.is_some() && full.nodes > 1);
        let cut = best_pairing(&p, &cnt, f64::INFINITY, 1);
        assert!(!cut.proven);
    }
}
