//! Rank-content cover search for several episodes, three to eight slots per rank.
//!
//! The one-episode cover search ([`super::cover`]) lists every rank *content* (`S` distinct
//! experts, each with a replica count) whose load fits below a cut and builds a placement as a
//! cover of `G` contents, most constrained expert first. With several episodes the objective is
//! `F = sum_k w_k M_k` (`M_k` the heaviest rank of episode `k`), and the same holds rank by
//! rank: a rank with loads `L_k` in a placement below the cut `T` has
//! `sum_k w_k max(L_k, (total_k - L_k) / (G - 1)) < T` (the other ranks carry the rest, and
//! their heaviest is at least their mean). Those contents are listed once per cut (their
//! weighted load lies in `[w . total - (G - 1) T, T)`, a window on one number, as with one
//! episode), and the cover is built from them with the bound of the rank-by-rank search
//! ([`super::ranks`]): after the chosen contents (heaviest load per episode `top_k`, load
//! `rest_k` still to place on `n` ranks) a content with loads `L_k` may be next only while
//! `sum_k w_k max(top_k, L_k, (rest_k - L_k) / (n - 1)) < T`.
//!
//! What this adds over the rank-by-rank search is the look-ahead of the cover: before each
//! choice every expert with appearances still owed must have a compatible content left (the
//! rank-by-rank search learns that only when it reaches the rank that would hold it), and the
//! expert with the fewest is placed next, all its appearances in one go. On the sweep's
//! 16-expert 8 x 4 layers with four windows the rank-by-rank search spends 200-300 nodes
//! enumerating each rank's members and dies at the third rank of most branches: a cut 0.82%
//! above the mean took it more than 20M nodes (6.4 s) on one of them, this search 0.2-0.56M.
//!
//! Refuted states are not remembered. Remembering them with the heaviest loads they held (a
//! visit with loads no smaller in any episode is refuted too) skipped at most 10 states per
//! probe on those layers (4,000-11,000 remembered) in a version that restarted from the first
//! rank after each placement found; going on below the new cut instead, as here, needs no
//! memo and proved as many of the sweep's 12-expert 6 x 4 layers (4 of 5; 3 with restarts
//! and no memo).
//!
//! The scans of the lists (looking for compatible contents) were 90% of the time on those
//! layers; the lists hold what they read inline (weighted load, members' pairs, loads per
//! episode, in list order, as the one-episode lists do), the members are checked against a
//! table of the pairs the next rank may hold, filled once per node, and the early stop is
//! computed once per scan: the same nodes, fewer cache misses. At a group's first node each
//! owed expert's list is sieved ([`Search::sieve`]) and the rest of the group and the groups
//! below scan the positions kept, and a content must leave the replica counts room for the
//! slots after it (`Counts::admits`): on the last probe of a pareto 12-expert 6 x 4 layer
//! with four windows 24M contents looked at instead of 40M, and the layer proven.
//!
//! Same contract as [`super::exact::solve`]: finished, it has found the best placement below
//! the seed objective or shown that there is none.

use super::contents::{self, NextRank};
use super::exact::{ExactResult, spend_node};
use super::problem::{Problem, fewest_replicas};
use super::sieves::{SieveAt, Sieves};

mod listing;
mod masked;

/// More contents than this below the cut: the search gives up (the cut is too far above the
/// mean for a cover to settle anything quickly).
const MAX_CONTENTS: usize = 300_000;
/// Contents looked at in the lists per node charged (a node of the search costs about as much
/// as looking at this many contents).
const SCANS_PER_NODE: usize = 16;
/// Rounding margin of the window's lower end and of the early stops of the list scans.
const MARGIN: f64 = 1e-9;

/// Whether this search applies: several episodes, no forced duplicates, three to eight slots
/// per rank and at most 16 experts. With five to eight slots per rank the contents are listed
/// with the bound of every episode ([`contents::EpisodeLister`]) and shared by the probes of a
/// layer ([`Prover`]); the sweep's layers with four windows, 16 experts on 4 x 8 and 12 on
/// 4 x 6 and 3 x 8, are proven with it (5 of 5 each, where no search proved a bound above the
/// mean on 4 x 8, and the rank-by-rank search proved 3 of 5 on 4 x 6, the expert-by-expert
/// search 4 of 5 on 3 x 8). (Before that listing, on one number, with six slots per rank this
/// search proved 2 of 5 of those 4 x 6 layers.)
pub(crate) fn eligible(p: &Problem) -> bool {
    p.w > 1 && !p.dup_ok && !p.empty && (3..=8).contains(&p.s) && p.e <= 16 && p.g < 256
}

/// Five slots per rank or more: contents listed in every episode at once and shared by the
/// probes ([`Prover`]). With three or four the listing on the weighted load is cheap and the
/// probes list their own (the sweep's 8 x 4 and 8 x 3 rows stay as they were measured).
pub(crate) fn wide(p: &Problem) -> bool {
    p.s >= 5
}

/// Growth of the ascent's step on [`wide`] layers. The probes share one listing, so refuting
/// many cuts below the optimum costs little, while a probe far above it costs much (more
/// contents, a new listing): on the sweep's 16-expert 4 x 8 layers with four windows 5 of 5
/// proven with 1.3 (at most 0.5 s of CPU), 4 of 5 with 1.25 and with 1.5, 2 of 5 with 2: a
/// probe above the optimum ran out of nodes (measured before the last member was looked up by
/// its weighted load, which halved the listing's cost).
pub(crate) const WIDE_ASCENT_GROWTH: f64 = 1.3;

/// Node budget of one layer: one and a half times the rank-by-rank search's for the same
/// episodes (a node here is a cover state visited, a content listed or 16 contents looked at).
/// The inline lists made a node cheaper and the extra half spends that time: on the sweep's
/// 12-expert 6 x 4 layers with four windows 5 of 5 proven instead of 4, on 15 other zipf
/// layers of that shape 14 instead of 13, and on 6 uniform 16-expert 8 x 4 layers a median
/// proven gap of 1.36% instead of 1.60%; no layer tried lost a proof or a gap, the slowest
/// layer near 0.95 s of CPU (the ascent's schedule, growing by 1.5 instead of 2, proved more
/// but widened one uniform 8 x 4 layer's gap).
pub(crate) fn budget(p: &Problem) -> usize {
    super::ranks::budget(p) * 3 / 2
}

/// Runs the cover search on `p` for a placement with objective below `seed_f` (less a
/// rounding margin of 1e-9, as [`super::exact::solve`]; then for better ones), with at most
/// `budget` nodes.
pub(crate) fn solve(p: &Problem, seed_f: f64, budget: usize) -> ExactResult {
    let mut s = Search::new(p, seed_f, budget);
    s.run(None);
    s.result()
}

/// [`solve`] with the contents listed by [`contents::EpisodeLister`] (pruned in every episode at
/// once) on a layer with three or four slots per rank, where [`solve`] lists them on the
/// weighted load alone. The same contents, sent in the same order (the positions of all members
/// but the last, then the last replica by its episode-weighted load), so the same search below
/// the listing: only the listing's nodes differ. The sweep's 16-expert 8 x 4 layers with four
/// windows: 10,000-40,000 nodes a listing 1e-6 above the mean where nothing is listed, 170,000-
/// 300,000 at 0.82% (100-300 and 15,000-28,000 this way); see [`Prover::list_by_episodes`].
#[cfg(test)]
pub(crate) fn solve_listing_by_episodes(p: &Problem, seed_f: f64, budget: usize) -> ExactResult {
    let mut s = Search::new(p, seed_f, budget);
    s.by_episodes = true;
    s.run(None);
    s.result()
}

/// Probes at rising cuts on one layer with more than four slots per rank, sharing one listing
/// of the contents: with eight slots per rank listing them is most of a probe's cost, and about
/// as costly just above the mean as at the optimum (16 experts on 4 x 8 with four windows,
/// before the last member was looked up by its weighted load: 150,000-800,000 nodes for 55-184
/// contents 0.05% above the mean, 440,000-1,600,000 for 12,000-33,000 at 0.2%), while the
/// ascent probes a dozen cuts below the optimum. The contents
/// are listed once at [`LIST_AHEAD`] above the layer's lower bound (or at the probe's cut, if
/// higher) and each probe at or below that cut keeps those below its own; a probe above it
/// lists again, past its own cut ([`relist_at`]). With four slots per rank or fewer, [`solve`] (the listing is
/// cheap there).
pub(crate) struct Prover<'p> {
    p: &'p Problem,
    /// Where the first listing aims.
    ahead: f64,
    listed: Option<Listed>,
    /// The first listing ran out of nodes: no probe of this layer searches.
    gave_up: bool,
    /// What listings cost: `(cut, nodes)`, a listing at that cut needs at least these nodes
    /// (it spent them, less one for the work not yet charged at its end, or it ran out with
    /// them). Every test of the listing is monotone in the cut, so a listing at a higher cut
    /// visits every node a lower one did: one given fewer nodes than a lower cut needed runs
    /// out, and is not tried (on 16-expert 4 x 8 layers the ascent's probes above the first
    /// listing had 0.3-0.6M nodes left for a listing that needs more than the first's 1.2M).
    costs: Vec<(f64, usize)>,
    /// The last probe's target.
    last: Option<f64>,
    /// The plan's objective when the ascent began: no probe goes above it.
    incumbent: f64,
    /// Three or four slots per rank: list with [`contents::EpisodeLister`]
    /// ([`Self::list_by_episodes`]), and the sets of its last lister.
    by_episodes: bool,
    sets: Option<contents::Sets>,
}

/// How far past a probe above the shared listing the next listing reaches, in multiples of
/// the ascent's last step (the ratio of this probe's cut to the last one's, less one): the
/// ascent's next step is [`WIDE_ASCENT_GROWTH`] times as long, and a listing at the probe's
/// own cut leaves the next probe to list again. On the sweep's pareto 16-expert 4 x 8 layers
/// with four windows the ascent listed at 0.2%, at its probe 0.235% above the bound and again
/// at 0.306%, and ran out proving the optimum (0.255%) after the third listing; listing at
/// 0.317% the second time proves it.
const RELIST_AHEAD: f64 = 1.5;

/// At most this many contents are expected from a listing past the probe (of
/// [`MAX_CONTENTS`], where a listing stops): the contents below a cut grow about as the fourth
/// power of its distance from the bound (on the 16-expert 4 x 8 layers with four windows,
/// about three times as many per step of 1.3 of the ascent), and a listing that stops for too
/// many has spent its nodes for nothing (a one-hot layer of that shape, 0.43M nodes, and its
/// plan 0.015% worse).
const RELIST_CONTENTS: usize = MAX_CONTENTS / 2;

/// Where a probe at `seed` above `listed` lists, the last probe having been at `last` (below
/// `seed`): [`RELIST_AHEAD`] times the ascent's last step past the probe, no higher than the
/// incumbent (no probe goes above it) nor than where the contents below the cut are expected
/// to reach [`RELIST_CONTENTS`] (from the count in `listed`), and never below the probe.
fn relist_at(lower: f64, listed: &Listed, last: f64, seed: f64, incumbent: f64) -> f64 {
    let mut aim = (seed * (1.0 + RELIST_AHEAD * (seed / last - 1.0))).min(incumbent);
    let (d, n) = (listed.cut / lower - 1.0, listed.weighted.len());
    if d > 0.0 && n > 0 {
        let most = lower * (1.0 + d * (RELIST_CONTENTS as f64 / n as f64).powf(0.25));
        aim = aim.min(most);
    }
    aim.max(seed)
}

/// The share of its nodes the probe that lists first may spend on the listing: on the sweep's
/// 16-expert 4 x 8 layers with four windows that listing took 0.39-1.15M of the 2.1M nodes
/// the first probe gets; on six uniform layers of that shape more than 2.1M, and the whole
/// ascent went into listings that ran out (1.04 s median of CPU a layer instead of 0.31 s, no
/// bound above the mean). With 4/5 those cost 0.83 s median and every layer tried keeps its
/// proof; with 3/5 0.54 s, but 2 of 6 one-hot and 1 of 10 zipf layers lose theirs.
const FIRST_LISTING_SHARE: (usize, usize) = (4, 5);

/// How far above the lower bound (relative) the shared listing of [`Prover`] reaches at first:
/// the optima of the sweep's 16-expert 4 x 8 layers with four windows lie 0.14-0.23% above the
/// mean, and listing at 0.2% costs 1.5-3 times what listing just above the mean does.
pub(crate) const LIST_AHEAD: f64 = 2e-3;

/// Contents listed below `cut` (as a search stores them).
struct Listed {
    cut: f64,
    members: Vec<(usize, usize)>,
    loads: Vec<f64>,
    weighted: Vec<f64>,
}

impl<'p> Prover<'p> {
    pub(crate) fn new(p: &'p Problem, incumbent: f64) -> Prover<'p> {
        Prover {
            p,
            ahead: p.lower_bound() * (1.0 + LIST_AHEAD),
            listed: None,
            gave_up: false,
            costs: Vec::new(),
            last: None,
            incumbent,
            by_episodes: false,
            sets: None,
        }
    }

    /// From now on the probes of a layer with three or four slots per rank list their contents
    /// with [`contents::EpisodeLister`] (the same contents in the same order, so the same
    /// search, with fewer nodes for the listing; `Search::in_weighted_listing_order`). `joint` calls it after the short ascent, so that
    /// the short ascent, the neighbourhood search after it and the step the ascent proper
    /// resumes from stay what they were measured with; the ascent proper's probes then keep the
    /// nodes their listings no longer spend for the probes further up.
    pub(crate) fn list_by_episodes(&mut self) {
        self.by_episodes = true;
    }

    /// [`solve`] at `seed_f`, with the contents of the shared listing when it reaches the cut.
    pub(crate) fn solve(&mut self, seed_f: f64, budget: usize) -> ExactResult {
        let p = self.p;
        if !wide(p) {
            if self.by_episodes {
                let mut s = Search::new(p, seed_f, budget);
                s.by_episodes = true;
                s.sets = self.sets.take();
                s.run(None);
                self.sets = s.sets.take();
                return s.result();
            }
            return solve(p, seed_f, budget);
        }
        if self.gave_up {
            return ExactResult {
                row: None,
                proven: false,
                nodes: 0,
            };
        }
        let last = self.last.replace(seed_f);
        let mut s = Search::new(p, seed_f, budget);
        let reaches = self.listed.as_ref().is_some_and(|l| l.cut >= s.cut);
        if !reaches {
            // List once, further up than this probe needs, for the probes after it; the first
            // listing with at most FIRST_LISTING_SHARE of the nodes.
            let first = self.listed.is_none();
            let nodes = if first {
                budget / FIRST_LISTING_SHARE.1 * FIRST_LISTING_SHARE.0
            } else {
                budget
            };
            let aim = match (&self.listed, last) {
                (Some(listed), Some(last)) if last < seed_f => {
                    relist_at(p.lower_bound(), listed, last, seed_f, self.incumbent)
                }
                _ => self.ahead.max(seed_f),
            };
            if std::env::var("EPLB_DEBUG").is_ok() {
                eprintln!("episodes: listing at {aim}");
            }
            let mut lister = Search::new(p, aim, nodes);
            if self
                .costs
                .iter()
                .any(|&(cut, needs)| lister.cut >= cut && nodes < needs)
            {
                s.aborted = true;
                return s.result();
            }
            let listed = lister.list_contents();
            s.nodes = lister.nodes;
            if listed {
                self.costs
                    .push((lister.cut, lister.nodes.saturating_sub(1)));
            }
            if !listed && !lister.aborted_by_budget() {
                // Too many contents that far up: list at the probe's own cut.
                lister = Search::new(p, seed_f, budget - s.nodes.min(budget));
                if !lister.list_contents() {
                    s.nodes = s.nodes.saturating_add(lister.nodes);
                    s.aborted = true;
                    return s.result();
                }
                s.nodes = s.nodes.saturating_add(lister.nodes);
            } else if !listed {
                // Out of nodes. The first listing: this layer's contents cost more than its
                // search may spend, and the probes after this one give up at once (on layers
                // like that, uniform 16 experts on 4 x 8 with four windows, the ascent spent its
                // whole budget on listings that ran out, 0.7 s of CPU for nothing).
                self.gave_up = first;
                self.costs.push((lister.cut, nodes));
                s.aborted = true;
                return s.result();
            }
            self.listed = Some(Listed {
                cut: lister.cut,
                members: lister.members,
                loads: lister.loads,
                weighted: lister.weighted,
            });
        }
        if let Some(listed) = &self.listed {
            s.run(Some(listed));
        }
        s.result()
    }
}

struct Search<'p> {
    p: &'p Problem,
    w: usize,
    /// Most replicas an expert may have.
    cap: usize,
    /// Search below this.
    cut: f64,
    /// Load of each episode (the same whatever the counts).
    total: Vec<f64>,
    /// Contents: `members[i * S..(i + 1) * S]` as `(expert, count)`, their loads per episode
    /// (`loads[i * w + k]`) and episode-weighted (`weighted[i]`).
    members: Vec<(usize, usize)>,
    loads: Vec<f64>,
    weighted: Vec<f64>,
    /// `by[e * (cap + 1) + c]`: contents below the cut holding expert `e` with count `c`, the
    /// heaviest (episode-weighted) first, with what the scans read inline.
    by: Vec<List>,
    /// Per number of chosen contents `d`: `allowed[d * pairs + f * (cap + 1) + c]`, whether the
    /// next rank may hold expert `f` with count `c` (what `compatible` asks of each member).
    allowed: Vec<bool>,
    /// Fewest replicas of each expert that keep one below the first cut (still a valid least
    /// after the cut falls).
    fewest: Vec<usize>,
    /// Decided counts and appearances still to place.
    counts: contents::Counts,
    /// Per number of chosen contents `d`: heaviest load of each episode among them
    /// (`tops[d * w + k]`) and the load still to place (`rest[d * w + k]`).
    tops: Vec<f64>,
    rest: Vec<f64>,
    chosen: Vec<u32>,
    /// Contents looked at not yet charged to the budget.
    scanned: usize,
    best: Option<(f64, Vec<usize>)>,
    nodes: usize,
    budget: usize,
    aborted: bool,
    /// Per group of the cover (the ranks placed for one expert, from the node that chose it):
    /// the lists sieved at its first node, as the positions of the entries that passed the
    /// pairs and the bound there ([`Self::sieve`]). Along a path every test only gets harder,
    /// so the groups below scan these positions instead of the whole list.
    sieves: Sieves,
    /// Per number of chosen contents: the owed expert last found without a compatible
    /// content there ([`Self::owed_have_contents`] tries it first).
    failed: Vec<usize>,
    /// Three or four slots per rank: list with [`contents::EpisodeLister`] (as the wide layers
    /// do) instead of [`contents::Lister`].
    by_episodes: bool,
    /// The sets of the last [`contents::EpisodeLister`] of the layer (narrow layers listing by
    /// episodes: [`Prover`] passes them from probe to probe).
    sets: Option<contents::Sets>,
}

impl<'p> Search<'p> {
    fn new(p: &'p Problem, seed_f: f64, budget: usize) -> Search<'p> {
        let w = p.w;
        let total: Vec<f64> = (0..w)
            .map(|k| (0..p.e).map(|e| p.x[e * w + k]).sum())
            .collect();
        // No rank carries more than the whole load: a cut above it (an unbounded seed) is the
        // same search with finite numbers.
        let whole: f64 = total.iter().zip(&p.omega).map(|(t, o)| t * o).sum();
        let mut rest = vec![0.0; (p.g + 1) * w];
        rest[..w].copy_from_slice(&total);
        Search {
            p,
            w,
            cap: p.g.min(p.max_rep),
            cut: (seed_f - 1e-9).min(2.0 * whole + 1.0),
            total,
            members: Vec::new(),
            loads: Vec::new(),
            weighted: Vec::new(),
            by: Vec::new(),
            allowed: Vec::new(),
            fewest: vec![1; p.e],
            counts: contents::Counts::new(p.e, p.g),
            tops: vec![f64::NEG_INFINITY; (p.g + 1) * w],
            rest,
            chosen: Vec::with_capacity(p.g),
            scanned: 0,
            best: None,
            nodes: 0,
            budget,
            aborted: false,
            sieves: Sieves::default(),
            failed: vec![usize::MAX; p.g + 1],
            by_episodes: false,
            sets: None,
        }
    }

    /// Searches below the cut; each cover found lowers the cut and the search goes on below
    /// it (the contents listed under the first cut stay: the bound refuses those above). The
    /// contents are listed here, or kept from `listed` (listed below a cut at least this one).
    fn run(&mut self, listed: Option<&Listed>) {
        let ready = match listed {
            Some(listed) => {
                self.keep_listed(listed);
                !self.aborted
            }
            None => self.list_contents(),
        };
        if ready {
            self.index();
            self.cover(self.p.g, None);
        }
        if std::env::var("EPLB_DEBUG").is_ok() {
            eprintln!(
                "episodes: cut {} nodes {} proven {} contents {}",
                self.cut,
                self.nodes,
                !self.aborted,
                self.weighted.len(),
            );
        }
    }

    fn result(self) -> ExactResult {
        ExactResult {
            row: self.best.map(|b| b.1),
            proven: !self.aborted,
            nodes: self.nodes,
        }
    }

    /// Whether the search stopped for its budget (not for too many contents).
    fn aborted_by_budget(&self) -> bool {
        self.aborted && self.nodes > self.budget
    }

    /// Fills the table of pairs the next rank may hold (`allowed`) at the current depth.
    fn mark_allowed(&mut self, ranks_left: usize) {
        let stride = self.cap + 1;
        let pairs = self.p.e * stride;
        let base = self.chosen.len() * pairs;
        for f in 0..self.p.e {
            let label = self.counts.label[f];
            for c in 0..stride {
                self.allowed[base + f * stride + c] = if label == 0 {
                    c <= ranks_left && c >= self.fewest[f]
                } else {
                    label == c && self.counts.rem[f] >= 1
                };
            }
        }
    }

    /// Whether content `i` as the next of `ranks_left` ranks keeps the bound below the cut:
    /// `sum_k w_k max(top_k, L_k, (rest_k - L_k) / (ranks_left - 1))`.
    fn fits(&self, i: usize, ranks_left: usize) -> bool {
        let w = self.w;
        self.fits_loads(&self.loads[i * w..(i + 1) * w], ranks_left)
    }

    /// [`Self::fits`] of a content with these loads.
    fn fits_loads(&self, loads: &[f64], ranks_left: usize) -> bool {
        let (w, d) = (self.w, self.chosen.len());
        let later = (ranks_left - 1) as f64;
        let mut f = 0.0;
        for (k, &l) in loads.iter().enumerate() {
            let top = self.tops[d * w + k].max(l);
            let v = if ranks_left == 1 {
                top
            } else {
                top.max((self.rest[d * w + k] - l) / later)
            };
            f += self.p.omega[k] * v;
        }
        f < self.cut
    }

    /// Lists are sorted by weighted load, heaviest first: once a content's weighted load
    /// leaves more than the cut on average for the later ranks, every later one in the list
    /// does too. The scans' stop, computed once per scan (`None`: no stop, the last rank).
    fn light_limit(&self, ranks_left: usize) -> Option<(f64, f64)> {
        if ranks_left <= 1 {
            return None;
        }
        let (w, d) = (self.w, self.chosen.len());
        let rest: f64 = (0..w).map(|k| self.p.omega[k] * self.rest[d * w + k]).sum();
        Some((rest, (ranks_left - 1) as f64 * self.cut + MARGIN))
    }

    /// Whether content `i` is too light for the stop `limit` of [`Self::light_limit`].
    fn too_light(weighted: f64, limit: Option<(f64, f64)>) -> bool {
        limit.is_some_and(|(rest, most)| rest - weighted > most)
    }

    /// Whether entry `j` of list `list` can be the next rank: every member's pair allowed
    /// (`allowed`, filled for this depth by [`Self::mark_allowed`]) and the bound below the cut.
    fn compatible(&self, list: usize, j: usize, next: &NextRank) -> bool {
        self.pairs_fit(list, j, next.ranks_left) && self.admits(list, j, next)
    }

    /// The first part of [`Self::compatible`]: the pairs and the bound (both only get harder
    /// to pass along a path, [`Self::sieve`]).
    #[inline(always)]
    fn pairs_fit(&self, list: usize, j: usize, ranks_left: usize) -> bool {
        let (s, w) = (self.p.s, self.w);
        let base = self.chosen.len() * self.p.e * (self.cap + 1);
        let l = &self.by[list];
        l.pairs[j][..s]
            .iter()
            .all(|&pair| self.allowed[base + pair as usize])
            && self.fits_loads(&l.loads[j * w..(j + 1) * w], ranks_left)
    }

    /// The second: the replica counts still fit the slots after it ([`contents::Counts::admits`]).
    #[inline(always)]
    fn admits(&self, list: usize, j: usize, next: &NextRank) -> bool {
        let stride = self.cap + 1;
        self.counts.admits(
            next,
            &self.fewest,
            self.by[list].pairs[j][..self.p.s]
                .iter()
                .map(|&pair| (pair as usize / stride, pair as usize % stride)),
        )
    }

    /// Entries of `list` to scan: its innermost sieve's positions, or the whole list.
    fn scan_len(&self, list: usize, sieve: Option<SieveAt>) -> usize {
        match sieve {
            Some(sieve) => self.sieves.positions(sieve).len(),
            None => self.by[list].ids.len(),
        }
    }

    /// The list position of the `i`-th entry to scan.
    #[inline(always)]
    fn scan_at(&self, sieve: Option<SieveAt>, i: usize) -> usize {
        match sieve {
            Some(sieve) => self.sieves.positions(sieve)[i] as usize,
            None => i,
        }
    }

    /// Sieves `list` for the current group: keeps the positions of the entries, above the
    /// early stop, whose pairs the next rank may hold and whose loads keep the bound below
    /// the cut, scanning the innermost enclosing sieve of the list (a superset) or the whole
    /// list. Along a path counts only get decided, appearances owed and ranks left only fall,
    /// the cut only falls, and each episode's term `max(top_k, L_k, (rest_k - L_k) / (n - 1))`
    /// only rises (a content `l` placed: `max(l_k, (rest_k - l_k - L_k) / (n - 2))` is at least
    /// the mean `(rest_k - L_k) / (n - 1)`), as does the early stop's test (`l` lies below the
    /// cut); so an entry left out fails below too. Returns how many kept are compatible.
    fn sieve(&mut self, list: usize, next: &NextRank) -> usize {
        let mut at = self.sieves.take_spare();
        let outer = self.sieves.innermost(list);
        if outer.is_none() && !self.by[list].masks.is_empty() {
            let n = self.scan_whole(list, next, usize::MAX, Some(&mut at));
            self.sieves.push(list, at);
            return n;
        }
        let len = self.scan_len(list, outer);
        let light = self.light_limit(next.ranks_left);
        let mut n = 0;
        let mut seen = 0;
        for i in 0..len {
            let pos = self.scan_at(outer, i);
            seen += 1;
            if Self::too_light(self.by[list].weighted[pos], light) {
                break;
            }
            if !self.pairs_fit(list, pos, next.ranks_left) {
                continue;
            }
            at.push(pos as u32);
            n += usize::from(self.admits(list, pos, next));
        }
        self.charge(seen);
        self.sieves.push(list, at);
        n
    }

    /// Contents of list `list` compatible now, counted up to `limit`. The contents looked at
    /// are charged to the budget ([`SCANS_PER_NODE`]).
    fn count(&mut self, list: usize, next: &NextRank, limit: usize) -> usize {
        let mut n = 0;
        let mut seen = 0;
        let light = self.light_limit(next.ranks_left);
        let outer = self.sieves.innermost(list);
        if outer.is_none() && !self.by[list].masks.is_empty() {
            return self.scan_whole(list, next, limit, None);
        }
        for i in 0..self.scan_len(list, outer) {
            let j = self.scan_at(outer, i);
            seen += 1;
            if Self::too_light(self.by[list].weighted[j], light) {
                break;
            }
            if self.compatible(list, j, next) {
                n += 1;
                if n >= limit {
                    break;
                }
            }
        }
        self.charge(seen);
        n
    }

    /// Charges `seen` contents looked at to the budget.
    fn charge(&mut self, seen: usize) {
        self.scanned += seen;
        self.nodes = self.nodes.saturating_add(self.scanned / SCANS_PER_NODE);
        self.scanned %= SCANS_PER_NODE;
        if self.nodes > self.budget {
            self.aborted = true;
        }
    }

    fn apply(&mut self, i: usize) {
        let (s, w, d) = (self.p.s, self.w, self.chosen.len());
        self.counts.apply(&self.members[i * s..(i + 1) * s]);
        for k in 0..w {
            let l = self.loads[i * w + k];
            self.tops[(d + 1) * w + k] = self.tops[d * w + k].max(l);
            self.rest[(d + 1) * w + k] = self.rest[d * w + k] - l;
        }
        self.chosen.push(i as u32);
    }

    fn undo(&mut self, i: usize) {
        let s = self.p.s;
        self.chosen.pop();
        self.counts.undo(&self.members[i * s..(i + 1) * s]);
    }

    /// Covers `ranks_left` more ranks. `group`: the expert whose appearances are being placed
    /// and the list position of its last content.
    fn cover(&mut self, ranks_left: usize, group: Option<(usize, usize)>) {
        if !spend_node(&mut self.nodes, self.budget, &mut self.aborted) {
            return;
        }
        if ranks_left == 0 {
            self.record();
            return;
        }
        // The replicas owed and the counts still open fit the empty slots (else `None`), and
        // what the next rank must hold for them to fit after it too.
        let Some(next) = self
            .counts
            .next_rank(&self.fewest, self.cap, self.p.s, ranks_left)
        else {
            return;
        };
        self.mark_allowed(ranks_left);
        if let Some((e, from)) = group
            && self.counts.rem[e] > 0
        {
            self.branch(&next, e, self.counts.label[e], from);
            return;
        }
        self.sieves.open_level();
        self.choose_and_branch(&next);
        self.sieves.close_level();
    }

    /// At the start of a group: branches on the most constrained expert (one with appearances
    /// owed, else an undecided one); nothing when some expert has no compatible content left.
    fn choose_and_branch(&mut self, next: &NextRank) {
        let ranks_left = next.ranks_left;
        if !self.owed_have_contents(next) {
            return;
        }
        let mut pick: Option<(usize, usize)> = None;
        for e in 0..self.p.e {
            if self.counts.label[e] == 0 || self.counts.rem[e] == 0 {
                continue;
            }
            let n = self.sieve(e * (self.cap + 1) + self.counts.label[e], next);
            if n == 0 {
                return;
            }
            if pick.is_none_or(|b| n < b.1) {
                pick = Some((e, n));
            }
        }
        if let Some((e, _)) = pick {
            self.branch(next, e, self.counts.label[e], 0);
        } else {
            for e in 0..self.p.e {
                if self.counts.label[e] != 0 {
                    continue;
                }
                let limit = pick.map_or(usize::MAX, |b| b.1);
                let mut n = 0;
                for c in self.fewest[e]..=self.cap.min(ranks_left) {
                    n += self.count(e * (self.cap + 1) + c, next, limit - n);
                    if n >= limit {
                        break;
                    }
                }
                if n == 0 {
                    return;
                }
                if n < limit {
                    pick = Some((e, n));
                }
            }
            let Some((e, _)) = pick else {
                return;
            };
            for c in self.fewest[e]..=self.cap.min(ranks_left) {
                self.branch(next, e, c, 0);
                if self.aborted {
                    break;
                }
            }
        }
    }

    /// Whether every expert with appearances owed has a compatible content (false: the node
    /// is refuted), the test the sieves of [`Self::choose_and_branch`] make (a sieve counts
    /// the compatible contents it keeps), asked first and more cheaply: the expert that failed
    /// last at this depth is tried first, then the others by the length of their scan, each
    /// scan stopping at its first compatible content. The tree is the same; a node refuted
    /// looks at fewer contents (on the sweep's 16-expert 8 x 4 layers with four windows 90%
    /// of the nodes that open a group at the third rank are refuted there, and their sieves
    /// were 85% of the contents looked at: a refutation at 1.0115 times the mean charged
    /// 6.46M nodes on the first layer before, 5.44M with this alone, the same 368,000 cover
    /// nodes).
    fn owed_have_contents(&mut self, next: &NextRank) -> bool {
        let d = self.chosen.len();
        let stride = self.cap + 1;
        let mut order = [(0usize, 0usize); 16];
        let mut m = 0;
        for e in 0..self.p.e {
            if self.counts.label[e] == 0 || self.counts.rem[e] == 0 {
                continue;
            }
            let list = e * stride + self.counts.label[e];
            let len = if self.failed[d] == e {
                0
            } else {
                self.scan_len(list, self.sieves.innermost(list))
            };
            order[m] = (len, e);
            m += 1;
        }
        order[..m].sort_unstable();
        for &(_, e) in &order[..m] {
            if self.count(e * stride + self.counts.label[e], next, 1) == 0 {
                self.failed[d] = e;
                return false;
            }
        }
        true
    }

    /// Tries each compatible content of the list of expert `e` with count `c`, from position
    /// `from` on, as the next rank.
    fn branch(&mut self, next: &NextRank, e: usize, c: usize, from: usize) {
        let ranks_left = next.ranks_left;
        let list = e * (self.cap + 1) + c;
        let mut light = self.light_limit(ranks_left);
        // The innermost sieve of the list (the same entries in the same order, less some that
        // cannot be the next rank), else the list.
        let sieve = self.sieves.innermost(list);
        if sieve.is_none() && !self.by[list].masks.is_empty() {
            self.branch_whole(next, e, list, from);
            return;
        }
        let start = match sieve {
            Some(sieve) => self
                .sieves
                .positions(sieve)
                .partition_point(|&pos| (pos as usize) < from),
            None => from,
        };
        for at in start..self.scan_len(list, sieve) {
            let n = self.scan_at(sieve, at);
            let i = self.by[list].ids[n] as usize;
            self.charge(1);
            if self.aborted || Self::too_light(self.by[list].weighted[n], light) {
                break;
            }
            if !self.compatible(list, n, next) {
                continue;
            }
            self.apply(i);
            self.cover(ranks_left - 1, Some((e, n)));
            self.undo(i);
            // A cover found below lowered the cut, and with it the stop.
            light = self.light_limit(ranks_left);
        }
    }

    /// A full cover below the cut: the best placement so far, and the cut falls below it.
    fn record(&mut self) {
        let (w, g) = (self.w, self.p.g);
        let f: f64 = (0..w).map(|k| self.p.omega[k] * self.tops[g * w + k]).sum();
        if f >= self.cut {
            return;
        }
        let s = self.p.s;
        let mut row = Vec::with_capacity(self.p.slots());
        for &i in &self.chosen {
            let i = i as usize;
            row.extend(self.members[i * s..(i + 1) * s].iter().map(|m| m.0));
        }
        self.best = Some((f, row));
        self.cut = f - 1e-9;
    }
}

/// One list of contents (`Search::by`): their ids, and what the scans read, side by side in
/// list order: the episode-weighted load, the members' `(expert, count)` pairs as indices
/// `expert * (cap + 1) + count` and the loads per episode (`loads[j * w + k]`).
struct List {
    /// Three or four slots per rank (else empty): per 64 entries, per pair index
    /// `expert * (cap + 1) + count`, which of them hold it, and at `expert * (cap + 1)` (no
    /// count is 0) which hold the expert at all (`masks[word * E * (cap + 1) + index]`).
    masks: Vec<u64>,
    ids: Vec<u32>,
    weighted: Vec<f64>,
    pairs: Vec<[u16; 8]>,
    loads: Vec<f64>,
}

/// The listing's nodes count against the search's budget.
impl contents::Sink for Search<'_> {
    fn spend(&mut self) -> bool {
        spend_node(&mut self.nodes, self.budget, &mut self.aborted)
    }

    fn add(&mut self, _load: f64, picked: &[(usize, usize)]) -> bool {
        self.add_content(picked)
    }
}

#[cfg(test)]
mod tests;
