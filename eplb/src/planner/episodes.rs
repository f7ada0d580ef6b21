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

/// More contents than this below the cut: the search gives up (the cut is too far above the
/// mean for a cover to settle anything quickly).
const MAX_CONTENTS: usize = 300_000;
/// Contents looked at in the lists per node charged (a node of the search costs about as much
/// as looking at this many contents).
const SCANS_PER_NODE: usize = 16;
/// Contents charged for a word of 64 list entries dropped or passed at once by the expert
/// masks of a whole-list scan ([`Search::scan_whole`]); the entries the masks pass are charged
/// one each, as in the other scans. Measured so that a node costs about the time it did before
/// the masks (five 16-expert 8 x 4 layers with four windows, refutations at 1.0115 times the
/// mean, masks in the sieves and counts only: 3.1-3.8M nodes a second before, 3.2-3.9M with
/// 16, 2.6-3.7M with 8; with the groups' ranks too, 2.1-2.5M against 2.2-2.7M before at a
/// load of 5.5).
const WORD_SCANS: usize = 16;
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
        }
    }

    /// [`solve`] at `seed_f`, with the contents of the shared listing when it reaches the cut.
    pub(crate) fn solve(&mut self, seed_f: f64, budget: usize) -> ExactResult {
        let p = self.p;
        if !wide(p) {
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

    /// The contents of `listed` below this search's cut (the fewest replicas at this cut, as
    /// listing would set them). A content with a replica at or above the cut is above it, so
    /// every one kept has counts the listing at this cut would allow.
    fn keep_listed(&mut self, listed: &Listed) {
        let (p, w, s) = (self.p, self.w, self.p.s);
        for e in 0..p.e {
            self.fewest[e] = fewest_replicas(p.agg[e], self.cut, self.cap);
        }
        // A content looked at costs about as much as one listed.
        self.nodes = self
            .nodes
            .saturating_add(listed.weighted.len() / SCANS_PER_NODE);
        if self.nodes > self.budget {
            self.aborted = true;
            return;
        }
        for i in 0..listed.weighted.len() {
            if !self.fits_loads(&listed.loads[i * w..(i + 1) * w], p.g) {
                continue;
            }
            self.members
                .extend_from_slice(&listed.members[i * s..(i + 1) * s]);
            self.loads
                .extend_from_slice(&listed.loads[i * w..(i + 1) * w]);
            self.weighted.push(listed.weighted[i]);
        }
    }

    /// Lists every content whose episode-weighted load lies in the window of the cut and whose
    /// loads pass the bound of the first rank. False when the budget runs out or there are
    /// too many.
    fn list_contents(&mut self) -> bool {
        let p = self.p;
        let cap = self.cap;
        for e in 0..p.e {
            self.fewest[e] = fewest_replicas(p.agg[e], self.cut, cap);
        }
        if wide(p) {
            let total = self.total.clone();
            let l = contents::EpisodeLister::new(
                &p.x,
                &p.agg,
                &p.omega,
                &total,
                &self.fewest,
                cap,
                p.g,
                p.s,
                self.cut + MARGIN,
            );
            return l.list(self);
        }
        let whole: f64 = self.total.iter().zip(&p.omega).map(|(t, o)| t * o).sum();
        let lo = whole - (p.g - 1) as f64 * self.cut - MARGIN;
        let l = contents::Lister::new(&p.agg[..p.e], &self.fewest, cap, lo, self.cut + MARGIN);
        l.list(p.s, self)
    }

    /// Stores a content if it can be a rank of a placement below the cut (false, giving up,
    /// when there are too many).
    fn add_content(&mut self, picked: &[(usize, usize)]) -> bool {
        let (p, w) = (self.p, self.w);
        let i = self.weighted.len();
        for k in 0..w {
            let l: f64 = picked.iter().map(|&(e, c)| p.x[e * w + k] / c as f64).sum();
            self.loads.push(l);
        }
        self.members.extend_from_slice(picked);
        let weighted = (0..w).map(|k| p.omega[k] * self.loads[i * w + k]).sum();
        self.weighted.push(weighted);
        if !self.fits(i, p.g) {
            self.loads.truncate(i * w);
            self.members.truncate(i * p.s);
            self.weighted.pop();
            return true;
        }
        if self.weighted.len() > MAX_CONTENTS {
            self.aborted = true;
            return false;
        }
        true
    }

    /// Builds the per-(expert, count) lists from the contents listed (every one passes the
    /// bound of the first rank: `add_content` keeps no other), heaviest first.
    fn index(&mut self) {
        // Charged to the budget (a quarter node per content), as the sorting costs time.
        self.nodes = self.nodes.saturating_add(self.weighted.len() / 4);
        if self.nodes > self.budget {
            self.aborted = true;
        }
        let p = self.p;
        let s = p.s;
        let mut ids = vec![Vec::new(); p.e * (self.cap + 1)];
        for i in 0..self.weighted.len() {
            for m in i * s..(i + 1) * s {
                let (e, c) = self.members[m];
                ids[e * (self.cap + 1) + c].push(i as u32);
            }
        }
        for list in &mut ids {
            list.sort_by(|&a, &b| {
                self.weighted[b as usize]
                    .total_cmp(&self.weighted[a as usize])
                    .then(a.cmp(&b))
            });
        }
        self.by = ids.into_iter().map(|ids| self.inline(ids)).collect();
        self.allowed = vec![false; (p.g + 1) * p.e * (self.cap + 1)];
    }

    /// A list of these contents with their weighted loads, pairs and loads side by side.
    fn inline(&self, ids: Vec<u32>) -> List {
        let (s, w) = (self.p.s, self.w);
        let masked = !wide(self.p);
        let mut list = List {
            masks: if masked {
                vec![0; ids.len().div_ceil(64) * self.p.e * (self.cap + 1)]
            } else {
                Vec::new()
            },
            weighted: Vec::with_capacity(ids.len()),
            pairs: Vec::with_capacity(ids.len()),
            loads: Vec::with_capacity(ids.len() * w),
            ids,
        };
        let stride = self.cap + 1;
        for (j, &i) in list.ids.iter().enumerate() {
            let i = i as usize;
            list.weighted.push(self.weighted[i]);
            let mut pairs = [0u16; 8];
            let word = j / 64 * self.p.e * stride;
            for (m, &(f, c)) in self.members[i * s..(i + 1) * s].iter().enumerate() {
                // e <= 16 and cap < 256 (`eligible`): every pair's index fits.
                pairs[m] = (f * stride + c) as u16;
                if masked {
                    list.masks[word + f * stride] |= 1 << (j % 64);
                    list.masks[word + f * stride + c] |= 1 << (j % 64);
                }
            }
            list.pairs.push(pairs);
            list.loads
                .extend_from_slice(&self.loads[i * w..(i + 1) * w]);
        }
        list
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

    /// A scan of the whole of list `list` (no sieve encloses it; three or four slots per
    /// rank, where the lists have masks), as [`Self::sieve`] (with `keep`: the positions
    /// passing [`Self::pairs_fit`] pushed there, every compatible one counted) or
    /// [`Self::count`] (without: the compatible ones counted up to `limit`). The same answer
    /// as scanning entry by entry: the entries before the early stop (found by bisection, the
    /// list being sorted by weighted load) are taken 64 at a time, and the masks drop those
    /// holding an expert with every appearance placed or an expert whose count is decided
    /// with another count (pairs no rank may hold now, [`Self::mark_allowed`]) before any is
    /// looked at; the others are tested one by one. On those 8 x 4 layers 86% of the
    /// contents the sieves looked at failed on their pairs; a refutation at 1.0115 times the
    /// mean on the first of them charges 3.22M nodes instead of 5.44M (6.46M before
    /// [`Self::owed_have_contents`]), in about half the CPU time.
    fn scan_whole(
        &mut self,
        list: usize,
        next: &NextRank,
        limit: usize,
        mut keep: Option<&mut Vec<u32>>,
    ) -> usize {
        let stop = self.stop_at(list, self.light_limit(next.ranks_left));
        let drops = self.drops();
        let mut n = 0;
        let mut checked = 0;
        let mut words = 0;
        'scan: for w in 0..stop.div_ceil(64) {
            words += 1;
            let mut cand = self.passed(list, w, &drops, 0, stop);
            while cand != 0 {
                let pos = w * 64 + cand.trailing_zeros() as usize;
                cand &= cand - 1;
                checked += 1;
                if !self.pairs_fit(list, pos, next.ranks_left) {
                    continue;
                }
                let ok = self.admits(list, pos, next);
                if let Some(keep) = keep.as_deref_mut() {
                    keep.push(pos as u32);
                }
                if ok {
                    n += 1;
                    if n >= limit {
                        break 'scan;
                    }
                }
            }
        }
        self.charge(checked + words * WORD_SCANS);
        n
    }

    /// The position of the first entry of list `list` too light for the stop `light` (the
    /// list's length when none is): the list is sorted by weighted load, heaviest first.
    fn stop_at(&self, list: usize, light: Option<(f64, f64)>) -> usize {
        match light {
            Some(_) => self.by[list]
                .weighted
                .partition_point(|&wt| !Self::too_light(wt, light)),
            None => self.by[list].ids.len(),
        }
    }

    /// What the masks drop now, as pairs of mask indices `(has, with)`: the entries holding
    /// an expert (`has`) but not with the count decided for it (`with`; none, `usize::MAX`,
    /// once every appearance is placed). Those pairs no rank may hold ([`Self::mark_allowed`]).
    fn drops(&self) -> Drops {
        let stride = self.cap + 1;
        let mut drops = Drops {
            masks: [(0, 0); 16],
            len: 0,
        };
        for g in 0..self.p.e {
            let label = self.counts.label[g];
            if label == 0 {
                continue;
            }
            drops.masks[drops.len] = if self.counts.rem[g] == 0 {
                (g * stride, usize::MAX)
            } else {
                (g * stride, g * stride + label)
            };
            drops.len += 1;
        }
        drops
    }

    /// The entries of word `w` (positions `64 w..64 w + 64`) of list `list` in `from..stop`
    /// that `drops` leaves, as bits.
    #[inline(always)]
    fn passed(&self, list: usize, w: usize, drops: &Drops, from: usize, stop: usize) -> u64 {
        let per_word = self.p.e * (self.cap + 1);
        let masks = &self.by[list].masks[w * per_word..(w + 1) * per_word];
        let mut out = 0u64;
        for &(has, with) in &drops.masks[..drops.len] {
            out |= masks[has] & !masks.get(with).copied().unwrap_or(0);
        }
        let below = |end: usize| -> u64 {
            match end.saturating_sub(w * 64) {
                0 => 0,
                b if b >= 64 => u64::MAX,
                b => (1u64 << b) - 1,
            }
        };
        !out & below(stop) & !below(from)
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

    /// [`Self::branch`] on the whole of list `list` (no sieve encloses it) by its masks, as
    /// [`Self::scan_whole`]: the same children in the same order, the entries the masks drop
    /// charged a word at a time. The stop is found again after each child (a cover found
    /// below lowers the cut); the drops stay (the state is restored).
    fn branch_whole(&mut self, next: &NextRank, e: usize, list: usize, from: usize) {
        let ranks_left = next.ranks_left;
        let mut stop = self.stop_at(list, self.light_limit(ranks_left));
        let drops = self.drops();
        let mut w = from / 64;
        while w * 64 < stop {
            self.charge(WORD_SCANS);
            let mut cand = self.passed(list, w, &drops, from, stop);
            while cand != 0 {
                let n = w * 64 + cand.trailing_zeros() as usize;
                cand &= cand - 1;
                self.charge(1);
                if self.aborted || n >= stop {
                    return;
                }
                if !self.compatible(list, n, next) {
                    continue;
                }
                let i = self.by[list].ids[n] as usize;
                self.apply(i);
                self.cover(ranks_left - 1, Some((e, n)));
                self.undo(i);
                stop = self.stop_at(list, self.light_limit(ranks_left));
            }
            if self.aborted {
                return;
            }
            w += 1;
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

/// The masks a whole-list scan drops entries by ([`Search::drops`]).
struct Drops {
    masks: [(usize, usize); 16],
    len: usize,
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
mod tests {
    use super::*;
    use crate::placement::find_duplicate;
    use crate::planner::problem::{
        brute_force_optimum, check_ascent, check_search_at_optimum, checked_answer,
        rank_sets_optimum,
    };
    use crate::planner::{exact, ranks};
    use crate::shape::Shape;
    use proptest::prelude::*;

    /// Tiny shapes `(E, slots, G)` with three or four slots per rank, small enough for the
    /// brute-force oracle (`E^slots` rows).
    const TINY: [(usize, usize, usize); 7] = [
        (3, 6, 2),
        (4, 6, 2),
        (5, 6, 2),
        (4, 8, 2),
        (3, 9, 3),
        (4, 9, 3),
        (6, 8, 2),
    ];

    /// A layer of `rows.len()` episodes on `g` ranks and `slots` slots (recency 0.6, as
    /// `joint` plans), and its shape.
    fn layer(rows: &[Vec<f64>], g: usize, slots: usize) -> (Problem, Shape) {
        crate::planner::problem::test_layer(rows, g, slots, 0.6)
    }

    /// Loads with ties, zeros or one dominant expert (each episode drawn the same way).
    fn skewed(rng: &mut crate::synth::Rng, e: usize, kind: usize) -> Vec<f64> {
        (0..e)
            .map(|i| match kind {
                0 => rng.below(4) as f64,
                1 => (1 + rng.below(100)) as f64 * if i == 0 { 50.0 } else { 1.0 },
                2 => (1000 + rng.below(7)) as f64,
                _ => (1 + rng.below(10)) as f64 * if rng.below(3) == 0 { 20.0 } else { 1.0 },
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(160))]
        /// The brute-force optimum, found and proven; and below it, nothing (a refutation that
        /// is not one, or a missed placement, fails this). Two to four episodes, ties and
        /// zeros included. Planted bugs it caught (release build, under 10 s): the bound
        /// without the content's own load in the later ranks' mean (an over-eager prune), a
        /// group that skips identical ranks (`n + 1` as the next list position), the scans'
        /// early stop 1e-3 too eager, the listing window's lower end 1e-3 too high.
        #[test]
        fn matches_brute_force_oracle(
            case in 0..TINY.len(),
            windows in 2usize..5,
            seed in proptest::collection::vec(0u32..1000, 24),
            hot in proptest::collection::vec(prop::bool::weighted(0.3), 24),
            few in prop::bool::ANY,
        ) {
            let (e, slots, g) = TINY[case];
            let rows: Vec<Vec<f64>> = (0..windows)
                .map(|k| {
                    (0..e)
                        .map(|i| {
                            let t = k * e + i;
                            let v = if few { seed[t] % 3 } else { seed[t] };
                            f64::from(v) * if hot[t] { 20.0 } else { 1.0 }
                        })
                        .collect()
                })
                .collect();
            let (p, _) = layer(&rows, g, slots);
            prop_assume!(eligible(&p));
            let want = brute_force_optimum(&p, None);
            check_search_at_optimum(&p, want, solve).map_err(TestCaseError::fail)?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Proving from below with any budget: the interval holds the brute-force optimum and
        /// "optimal" is said of the optimum only.
        #[test]
        fn ascending_proof_holds_the_optimum(
            case in 0..TINY.len(),
            windows in 2usize..4,
            seed in proptest::collection::vec(1u32..1000, 18),
            budget in 1usize..20_000,
        ) {
            let (e, slots, g) = TINY[case];
            let rows: Vec<Vec<f64>> = (0..windows)
                .map(|k| (0..e).map(|i| f64::from(seed[k * e + i])).collect())
                .collect();
            let (p, _) = layer(&rows, g, slots);
            prop_assume!(eligible(&p));
            let want = brute_force_optimum(&p, None);
            check_ascent(&p, want, budget, solve).map_err(TestCaseError::fail)?;
        }
    }

    /// Shapes with five to eight slots per rank (the listing in every episode at once and the
    /// shared listing of [`Prover`]), small enough for the rank-set oracle and with at most
    /// [`MAX_CONTENTS`] contents in all (the search from no cut lists every one).
    const WIDE: [(usize, usize, usize); 8] = [
        (6, 10, 2),
        (7, 12, 2),
        (9, 12, 2),
        (9, 16, 2),
        (8, 15, 3),
        (9, 24, 3),
        (8, 20, 4),
        (8, 24, 4),
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Five to eight slots per rank, two to four episodes, skewed loads with ties and
        /// zeros, against the rank-set oracle (every multiset of rank contents): the search
        /// finds and proves the optimum from 1% and from just above it, and refutes just below
        /// it; a [`Prover`] does the same with probes in any order (each served by the
        /// listing it keeps when that reaches the probe, or listing again), and proving from
        /// below with it and any budget holds the optimum. (Planted in review: a listing kept
        /// for a probe up to 1 above its cut fails it, and `agrees_with_the_rank_set_oracle`
        /// through `joint`. Keeping the listed contents without the probe's own bound is not
        /// a bug: the cover's bound refuses those above the cut at every rank.)
        #[test]
        fn wide_ranks_match_the_rank_set_oracle(
            case in 0..WIDE.len(),
            windows in 2usize..5,
            kind in 0usize..4,
            seed in 0u64..1_000_000,
            order in proptest::collection::vec(0usize..4, 6),
            budget in 1usize..200_000,
        ) {
            let (e, slots, g) = WIDE[case];
            let mut rng = crate::synth::Rng::new(seed);
            let rows: Vec<Vec<f64>> = (0..windows).map(|_| skewed(&mut rng, e, kind)).collect();
            let (p, _) = layer(&rows, g, slots);
            prop_assume!(eligible(&p) && wide(&p));
            let (want, _) = rank_sets_optimum(&p);
            // (From 1% above the optimum, not from no cut: with every content below the cut
            // the cover search's first placements are poor and it may run out of nodes.)
            let targets = [want * 1.01, want * (1.0 + 1e-7), want - 1e-6, want * 0.999];
            for (t, &target) in targets.iter().enumerate() {
                let res = solve(&p, target, 10_000_000);
                prop_assert!(res.proven, "{rows:?}: not finished below {target}");
                match res.row {
                    Some(row) => {
                        let (got, _) = checked_answer(&p, ExactResult { row: Some(row), proven: true, nodes: 0 });
                        prop_assert!(t < 2 && (got - want).abs() < 1e-9, "{rows:?}: {got} below {target}, optimum {want}");
                    }
                    None => prop_assert!(t >= 2, "{rows:?}: none below {target}"),
                }
            }
            let mut prover = Prover::new(&p, f64::INFINITY);
            for &t in &order {
                let res = prover.solve(targets[t], 10_000_000);
                prop_assert!(res.proven, "{rows:?}: probe at {} not finished", targets[t]);
                match res.row {
                    Some(row) => {
                        prop_assert!(find_duplicate(&row, p.s).is_none());
                        prop_assert!(t < 2 && (p.objective(&row).0 - want).abs() < 1e-9,
                            "{rows:?}: probe at {} gave {}, optimum {want}", targets[t], p.objective(&row).0);
                    }
                    None => prop_assert!(t >= 2, "{rows:?}: none below {}", targets[t]),
                }
            }
            let mut prover = Prover::new(&p, f64::INFINITY);
            check_ascent(&p, want, budget, |_, t, n| prover.solve(t, n))
                .map_err(TestCaseError::fail)?;
        }
    }

    /// Beyond the brute-force shapes, against the rank-set oracle (7-8 experts, two to four
    /// episodes, skewed loads with ties and zeros): from an unbounded start, just above and
    /// just below the optimum, with small budgets (a valid placement below its cut whatever
    /// the budget), and the whole layer plan.
    #[test]
    fn agrees_with_the_rank_set_oracle() {
        const SHAPES: [(usize, usize, usize); 7] = [
            (7, 9, 3),
            (6, 12, 4),
            (5, 12, 3),
            (8, 12, 3),
            (7, 12, 4),
            (7, 12, 2),
            (6, 10, 2),
        ];
        let mut rng = crate::synth::Rng::new(29);
        for case in 0..140 {
            let (e, slots, g) = SHAPES[case % SHAPES.len()];
            let kind = rng.below(4);
            let rows: Vec<Vec<f64>> = (0..2 + rng.below(3))
                .map(|_| skewed(&mut rng, e, kind))
                .collect();
            let (p, shape) = layer(&rows, g, slots);
            if !eligible(&p) {
                continue;
            }
            let (want, _) = rank_sets_optimum(&p);
            let at = format!("{rows:?} on {g} ranks x {}", p.s);
            for seed in [f64::INFINITY, want * (1.0 + 1e-7), want + 2e-9] {
                let res = solve(&p, seed, 10_000_000);
                let row = res.row.unwrap_or_else(|| panic!("{at}: none below {seed}"));
                assert!(find_duplicate(&row, p.s).is_none(), "{at}: {row:?}");
                let got = p.objective(&row).0;
                assert!(
                    res.proven && (got - want).abs() < 1e-9,
                    "{at}: {got} vs {want}"
                );
            }
            let below = solve(&p, want - 1e-6, 10_000_000);
            assert!(below.proven && below.row.is_none(), "{at}: below {want}");
            let starved = solve(&p, want * 1.05, 1 + rng.below(3_000));
            if let Some(row) = starved.row {
                let got = p.objective(&row).0;
                assert!(find_duplicate(&row, p.s).is_none(), "{at}: {row:?}");
                assert!(got < want * 1.05 && got >= want - 1e-9, "{at}: {got}");
                assert!(!starved.proven || (got - want).abs() < 1e-9, "{at}: {got}");
            }
            let plan = crate::planner::joint::plan_layer(&p, &shape, false);
            let got = p.objective(&plan.row).0;
            assert!(
                got >= want - 1e-9 && (!plan.optimal || got - want < 1e-9),
                "{at}"
            );
            if let Some(gap) = plan.proven_gap {
                assert!(got <= want * (1.0 + gap) + 1e-9, "{at}: gap {gap}");
            }
        }
    }

    /// Against the expert-by-expert search on medium layers where it finishes (8-10 experts,
    /// two or three episodes): the same optimum, and nothing just below it.
    #[test]
    fn agrees_with_the_expert_by_expert_search() {
        let mut rng = crate::synth::Rng::new(13);
        for (e, slots, g, windows) in [(8, 16, 4, 3), (8, 24, 6, 3), (10, 20, 5, 2), (9, 24, 8, 2)]
        {
            for _ in 0..3 {
                let s = 0.4 + 0.8 * rng.uniform();
                let base: Vec<f64> = (0..e)
                    .map(|i| 1000.0 * (1.0 + i as f64).powf(-s) * (0.4 * rng.normal()).exp())
                    .collect();
                let rows: Vec<Vec<f64>> = (0..windows)
                    .map(|_| {
                        base.iter()
                            .map(|b| (b * (0.15 * rng.normal()).exp()).round())
                            .collect()
                    })
                    .collect();
                let (p, _) = layer(&rows, g, slots);
                assert!(eligible(&p));
                let reference = [
                    exact::solve(&p, f64::INFINITY, 50_000_000),
                    ranks::solve(&p, f64::INFINITY, 50_000_000),
                ]
                .into_iter()
                .find(|r| r.proven)
                .unwrap_or_else(|| panic!("{rows:?} on {g} ranks: no reference"));
                let want = p.objective(&reference.row.expect("a placement")).0;
                let at = format!("{rows:?} on {g} ranks");
                let above = solve(&p, want * (1.0 + 1e-7), 50_000_000);
                let row = above
                    .row
                    .unwrap_or_else(|| panic!("{at}: none near {want}"));
                assert!(
                    above.proven && (p.objective(&row).0 - want).abs() < 1e-9,
                    "{at}"
                );
                let below = solve(&p, want - 1e-6, 50_000_000);
                assert!(below.proven && below.row.is_none(), "{at}: below {want}");
            }
        }
    }

    /// Two of the sweep's 16-expert layers on 4 x 8 with four windows, where no search proved a
    /// bound above the mean before the listing in every episode and the shared listing (plans
    /// at 1.004450 and 1.004944 times the mean then): `joint` proves optima 0.17% and 0.14%
    /// above the mean, and the search alone (listing at its own cut, no shared listing)
    /// refutes just below them.
    /// Two of the sweep's 16-expert layers on 4 x 8 with four windows and their optima.
    const FOUR_BY_EIGHT: [([[f64; 16]; 4], f64); 2] = [
        (
            [
                [
                    1048.0, 337.0, 174.0, 235.0, 303.0, 121.0, 279.0, 250.0, 96.0, 68.0, 78.0,
                    100.0, 58.0, 95.0, 84.0, 76.0,
                ],
                [
                    1294.0, 326.0, 267.0, 199.0, 244.0, 125.0, 281.0, 171.0, 74.0, 88.0, 68.0,
                    110.0, 49.0, 121.0, 61.0, 71.0,
                ],
                [
                    977.0, 299.0, 254.0, 243.0, 273.0, 100.0, 258.0, 205.0, 107.0, 73.0, 79.0,
                    89.0, 52.0, 72.0, 72.0, 60.0,
                ],
                [
                    1016.0, 284.0, 261.0, 224.0, 221.0, 117.0, 411.0, 238.0, 111.0, 89.0, 71.0,
                    122.0, 65.0, 91.0, 70.0, 72.0,
                ],
            ],
            1.001677,
        ),
        (
            [
                [
                    1142.0, 410.0, 162.0, 223.0, 111.0, 46.0, 46.0, 183.0, 132.0, 148.0, 74.0,
                    49.0, 99.0, 65.0, 36.0, 37.0,
                ],
                [
                    1286.0, 320.0, 210.0, 210.0, 139.0, 44.0, 54.0, 148.0, 118.0, 113.0, 83.0,
                    53.0, 90.0, 57.0, 38.0, 44.0,
                ],
                [
                    1241.0, 305.0, 239.0, 161.0, 108.0, 48.0, 60.0, 192.0, 88.0, 109.0, 70.0, 33.0,
                    93.0, 54.0, 38.0, 30.0,
                ],
                [
                    1005.0, 402.0, 180.0, 205.0, 126.0, 39.0, 45.0, 180.0, 150.0, 114.0, 74.0,
                    50.0, 87.0, 71.0, 33.0, 35.0,
                ],
            ],
            1.001412,
        ),
    ];

    /// The 16-expert 8 x 4 layer of the sweep with four windows (zipf, the fourth) whose
    /// plan is its optimum, 1.014453 times the mean (proven by a probe at 1.0164 with 2.2M
    /// nodes, more than `joint` has left there).
    const EIGHT_BY_FOUR: [[f64; 16]; 4] = [
        [
            1294.0, 1645.0, 260.0, 137.0, 234.0, 311.0, 211.0, 147.0, 101.0, 143.0, 140.0, 105.0,
            30.0, 55.0, 157.0, 58.0,
        ],
        [
            1530.0, 1445.0, 347.0, 176.0, 238.0, 500.0, 201.0, 173.0, 77.0, 103.0, 102.0, 114.0,
            45.0, 56.0, 200.0, 50.0,
        ],
        [
            1324.0, 1452.0, 300.0, 147.0, 171.0, 411.0, 134.0, 174.0, 74.0, 100.0, 106.0, 102.0,
            29.0, 47.0, 142.0, 47.0,
        ],
        [
            1707.0, 1169.0, 273.0, 153.0, 173.0, 383.0, 199.0, 175.0, 92.0, 129.0, 122.0, 117.0,
            34.0, 48.0, 159.0, 53.0,
        ],
    ];

    /// Entry by entry, as [`Search::sieve`] and [`Search::count`] scan a list no sieve
    /// encloses: the positions passing the pairs and the bound, and the compatible ones counted
    /// up to `limit`.
    fn scan_entry_by_entry(
        s: &Search,
        list: usize,
        next: &NextRank,
        limit: usize,
    ) -> (Vec<u32>, usize) {
        let light = s.light_limit(next.ranks_left);
        let (mut kept, mut n) = (Vec::new(), 0);
        for j in 0..s.by[list].ids.len() {
            if Search::too_light(s.by[list].weighted[j], light) {
                break;
            }
            if !s.pairs_fit(list, j, next.ranks_left) {
                continue;
            }
            kept.push(j as u32);
            if s.admits(list, j, next) {
                n += 1;
                if n >= limit {
                    break;
                }
            }
        }
        (kept, n)
    }

    /// The whole-list scans by masks ([`Search::scan_whole`]) keep the positions and count the
    /// contents that scanning entry by entry does, for every list, at the states of random
    /// paths down a search of a sweep layer (a cut 1.3% above the mean) and of small random
    /// layers, with and without a limit. (Planted: the masks dropping the entries with the
    /// decided count instead of those with another, or the last word's valid bits one short:
    /// each fails it, and the brute-force and rank-set oracles.)
    #[test]
    fn masked_scans_match_entry_by_entry() {
        let mut rng = crate::synth::Rng::new(29);
        let mut layers: Vec<(Problem, f64)> = Vec::new();
        let rows: Vec<Vec<f64>> = EIGHT_BY_FOUR.iter().map(|w| w.to_vec()).collect();
        let (p, _) = layer(&rows, 8, 32);
        let cut = p.lower_bound() * 1.013;
        layers.push((p, cut));
        for _ in 0..40 {
            let (e, slots, g) = [(8, 16, 4), (10, 24, 8), (12, 24, 6), (12, 36, 9)][rng.below(4)];
            let kind = rng.below(4);
            let rows: Vec<Vec<f64>> = (0..2 + rng.below(3))
                .map(|_| skewed(&mut rng, e, kind))
                .collect();
            let (p, _) = layer(&rows, g, slots);
            let cut = p.lower_bound() * (1.0 + 0.05 * rng.uniform());
            layers.push((p, cut));
        }
        let mut compared = 0;
        for (p, cut) in &layers {
            if !eligible(p) || wide(p) {
                continue;
            }
            let mut s = Search::new(p, *cut, usize::MAX);
            assert!(s.list_contents());
            s.index();
            let walks = if p.e == 16 { 40 } else { 10 };
            for _ in 0..walks {
                let mut path = Vec::new();
                loop {
                    let ranks_left = p.g - s.chosen.len();
                    if ranks_left == 0 {
                        break;
                    }
                    let Some(next) = s.counts.next_rank(&s.fewest, s.cap, p.s, ranks_left) else {
                        break;
                    };
                    s.mark_allowed(ranks_left);
                    let mut options = Vec::new();
                    for list in 0..s.by.len() {
                        for limit in [1, 3, usize::MAX] {
                            let want = scan_entry_by_entry(&s, list, &next, limit);
                            let mut kept = Vec::new();
                            let keep = (limit == usize::MAX).then_some(&mut kept);
                            let n = s.scan_whole(list, &next, limit, keep);
                            assert_eq!(n, want.1, "list {list} limit {limit}");
                            if limit == usize::MAX {
                                assert_eq!(kept, want.0, "list {list}");
                            }
                            compared += 1;
                        }
                        for &j in &scan_entry_by_entry(&s, list, &next, usize::MAX).0 {
                            if s.admits(list, j as usize, &next) {
                                options.push(s.by[list].ids[j as usize] as usize);
                            }
                        }
                    }
                    if options.is_empty() {
                        break;
                    }
                    let i = options[rng.below(options.len())];
                    s.apply(i);
                    path.push(i);
                }
                while let Some(i) = path.pop() {
                    s.undo(i);
                }
            }
        }
        assert!(compared > 10_000, "{compared}");
    }

    /// `joint` leaves that layer open (its bound 1.008228); the cover search alone proves
    /// its optimum with 2.2M nodes from a cut 1.65% above the mean, and the rank-by-rank
    /// search, independent of the lists and their masks, confirms there is nothing below
    /// 1.0100.
    #[test]
    fn the_cover_search_proves_an_8_by_4_layer_with_four_windows() {
        let rows: Vec<Vec<f64>> = EIGHT_BY_FOUR.iter().map(|w| w.to_vec()).collect();
        let (p, _) = layer(&rows, 8, 32);
        assert!(eligible(&p) && !wide(&p));
        let mean = p.lower_bound();
        let res = solve(&p, mean * 1.0164736587165786, 20_000_000);
        let row = res.row.expect("a plan below the cut");
        assert!(res.proven && find_duplicate(&row, p.s).is_none());
        let want = p.objective(&row).0;
        assert!((want / mean - 1.014453).abs() < 1e-6, "{}", want / mean);
        let below = solve(&p, want - 1e-6, 20_000_000);
        assert!(below.proven && below.row.is_none());
        let low = ranks::solve(&p, mean * 1.0100, 100_000_000);
        assert!(low.proven && low.row.is_none());
    }

    #[test]
    fn joint_proves_16_expert_layers_on_4_ranks_of_8() {
        for (windows, rounded) in FOUR_BY_EIGHT {
            let rows: Vec<Vec<f64>> = windows.iter().map(|w| w.to_vec()).collect();
            let (p, shape) = layer(&rows, 4, 32);
            assert!(eligible(&p) && wide(&p));
            let res = crate::planner::joint::plan_layer(&p, &shape, false);
            assert!(res.optimal, "gap {:?}", res.proven_gap);
            let want = p.objective(&res.row).0;
            assert!((want - rounded).abs() < 1e-6, "{want}");
            assert!(find_duplicate(&res.row, p.s).is_none());
            let below = solve(&p, want - 1e-6, 20_000_000);
            assert!(below.proven && below.row.is_none(), "below {want}");
        }
    }

    /// A `Prover` whose first listing runs out of nodes settles nothing afterwards, whatever
    /// the budget (it gives up: no probe claims a refutation or a placement), and proving from
    /// below with it and a budget too small for that listing leaves the optimum in the interval.
    #[test]
    fn a_prover_out_of_nodes_on_its_first_listing_gives_up() {
        let (windows, rounded) = FOUR_BY_EIGHT[0];
        let rows: Vec<Vec<f64>> = windows.iter().map(|w| w.to_vec()).collect();
        let (p, _) = layer(&rows, 4, 32);
        let mut prover = Prover::new(&p, f64::INFINITY);
        let first = prover.solve(rounded * 1.01, 2_000);
        assert!(!first.proven && first.row.is_none());
        for target in [rounded - 1e-3, rounded * 1.01, f64::INFINITY] {
            let res = prover.solve(target, 50_000_000);
            assert!(
                !res.proven && res.row.is_none() && res.nodes == 0,
                "{target}"
            );
        }
        let mut prover = Prover::new(&p, f64::INFINITY);
        check_ascent(&p, rounded, 60_000, |_, t, n| prover.solve(t, n)).expect("interval");
    }

    /// A probe above the first listing's cut with fewer nodes than that listing spent returns
    /// at once, claiming nothing; one with more lists (here far up, and runs out); a probe
    /// below those cuts still settles what a fresh `Prover` settles.
    #[test]
    fn a_prover_skips_a_listing_that_ran_out_below_it() {
        let (windows, rounded) = FOUR_BY_EIGHT[0];
        let rows: Vec<Vec<f64>> = windows.iter().map(|w| w.to_vec()).collect();
        let (p, _) = layer(&rows, 4, 32);
        let mut prover = Prover::new(&p, f64::INFINITY);
        let low = prover.solve(p.lower_bound() * (1.0 + 1e-6), 20_000_000);
        assert!(low.proven && low.row.is_none());
        // Just above the first listing's cut (0.2% above the bound).
        let listed = prover.listed.as_ref().map_or(0.0, |l| l.cut);
        assert!(listed > 1.0);
        let short = prover.solve(listed * 1.0001, 1_000);
        assert!(!short.proven && short.row.is_none() && short.nodes == 0);
        // What the first listing spent: one far above it with twice that runs out (or has too
        // many contents) and claims nothing.
        let cost = prover.costs[0].1;
        let out = prover.solve(rounded * 1.01, 2 * cost);
        assert!(!out.proven && out.row.is_none() && out.nodes > 0);
        let at = prover.solve(rounded + 1e-6, 20_000_000);
        let fresh = Prover::new(&p, f64::INFINITY).solve(rounded + 1e-6, 20_000_000);
        assert!(at.proven && fresh.proven);
        let objective = |r: &Option<Vec<usize>>| r.as_ref().map(|r| p.objective(r).0);
        assert_eq!(objective(&at.row), objective(&fresh.row));
        assert!(objective(&at.row).is_some());
    }

    /// Where a probe above the shared listing lists ([`relist_at`]): past the probe by
    /// [`RELIST_AHEAD`] times the last step, never below the probe (an incumbent below it, or
    /// a listing with as many contents as expected at most, leaves it at the probe), no higher
    /// than the incumbent nor than the contents expected allow.
    #[test]
    fn a_relisting_aims_past_the_probe_within_its_limits() {
        let listed = |cut: f64, n: usize| Listed {
            cut,
            members: Vec::new(),
            loads: Vec::new(),
            weighted: vec![1.0; n],
        };
        let few = listed(1.002, 10);
        let (last, seed) = (1.0018, 1.0024);
        let want = seed * (1.0 + RELIST_AHEAD * (seed / last - 1.0));
        assert!((relist_at(1.0, &few, last, seed, 2.0) - want).abs() < 1e-12);
        assert_eq!(relist_at(1.0, &few, last, seed, 1.003), 1.003);
        assert_eq!(relist_at(1.0, &few, last, seed, 1.001), seed);
        assert_eq!(
            relist_at(1.0, &listed(1.002, RELIST_CONTENTS), last, seed, 2.0),
            seed
        );
        // 81 times the contents at three times the distance: as many as allowed at 0.3%.
        let many = listed(1.001, RELIST_CONTENTS / 81);
        assert!(want > 1.0031);
        assert!((relist_at(1.0, &many, last, seed, 2.0) - 1.003).abs() < 1e-6);
    }

    /// A probe above the first listing lists past its own cut (toward the incumbent), and a
    /// probe after it below that cut is served from that listing, with the plan and proof of a
    /// fresh search at its cut.
    #[test]
    fn a_probe_above_the_listing_lists_past_itself() {
        let (windows, rounded) = FOUR_BY_EIGHT[0];
        let rows: Vec<Vec<f64>> = windows.iter().map(|w| w.to_vec()).collect();
        let (p, _) = layer(&rows, 4, 32);
        let lower = p.lower_bound();
        let first_cut = lower * (1.0 + LIST_AHEAD);
        let seed = first_cut.max(rounded) * (1.0 + 1e-4);
        let incumbent = seed * (1.0 + 5e-4);
        let mut prover = Prover::new(&p, incumbent);
        let low = prover.solve(lower * (1.0 + 1e-6), 20_000_000);
        assert!(low.proven && low.row.is_none());
        assert!(prover.listed.as_ref().is_some_and(|l| l.cut < seed));
        let above = prover.solve(seed, 20_000_000);
        let cut = prover.listed.as_ref().map_or(0.0, |l| l.cut);
        assert!(cut > seed && cut <= incumbent, "{cut} {seed} {incumbent}");
        assert_eq!(prover.costs.len(), 2);
        let objective = |r: &Option<Vec<usize>>| r.as_ref().map(|r| p.objective(r).0);
        let fresh = Prover::new(&p, f64::INFINITY).solve(seed, 20_000_000);
        assert!(above.proven && fresh.proven);
        assert_eq!(objective(&above.row), objective(&fresh.row));
        let at = prover.solve(rounded + 1e-6, 20_000_000);
        assert_eq!(prover.costs.len(), 2);
        let fresh = Prover::new(&p, f64::INFINITY).solve(rounded + 1e-6, 20_000_000);
        assert!(at.proven && fresh.proven);
        assert_eq!(objective(&at.row), objective(&fresh.row));
        assert!(objective(&at.row).is_some());
    }

    /// Four of the sweep's layers with four windows (12 experts on 6 x 4 and on 8 x 3) that the
    /// rank-by-rank search left open within `joint`'s budget (proven gaps 0.8% and 1.6% median
    /// on those rows before this search; the third, on 6 x 4, open with this search's earlier
    /// budget; the fourth, on 8 x 3, open until the neighbourhood search ran before the
    /// ascent, 0.321%): `joint` proves them now, and the rank-by-rank search with a far larger
    /// budget confirms the optimum (finds it just above, refutes just below).
    /// `joint` proves the 12-expert, 24-slot layer of `windows` on `g` ranks optimal at
    /// `rounded` (to 1e-6), without an expert twice on a rank, and the rank-by-rank search with
    /// 100M nodes confirms that optimum: it finds a plan just above it and none just below.
    fn assert_joint_proves_12_expert_layer(g: usize, windows: &[[f64; 12]; 4], rounded: f64) {
        let rows: Vec<Vec<f64>> = windows.iter().map(|w| w.to_vec()).collect();
        let (p, shape) = layer(&rows, g, 24);
        let res = crate::planner::joint::plan_layer(&p, &shape, false);
        assert!(res.optimal, "{g} ranks: gap {:?}", res.proven_gap);
        let want = p.objective(&res.row).0;
        assert!((want - rounded).abs() < 1e-6, "{g} ranks: {want}");
        assert!(find_duplicate(&res.row, p.s).is_none());
        let above = ranks::solve(&p, want * (1.0 + 1e-7), 100_000_000);
        let row = above
            .row
            .expect("the rank-by-rank search finds the optimum");
        assert!(above.proven && (p.objective(&row).0 - want).abs() < 1e-9);
        let below = ranks::solve(&p, want - 1e-6, 100_000_000);
        assert!(
            below.proven && below.row.is_none(),
            "{g} ranks: below {want}"
        );
    }

    #[test]
    fn joint_proves_12_expert_layers_with_four_windows() {
        let cases: [(usize, [[f64; 12]; 4], f64); 4] = [
            (
                6,
                [
                    [
                        1310.0, 1003.0, 783.0, 556.0, 345.0, 454.0, 463.0, 270.0, 458.0, 345.0,
                        212.0, 167.0,
                    ],
                    [
                        1001.0, 712.0, 843.0, 546.0, 373.0, 353.0, 286.0, 287.0, 516.0, 314.0,
                        221.0, 152.0,
                    ],
                    [
                        943.0, 539.0, 744.0, 449.0, 295.0, 356.0, 340.0, 266.0, 465.0, 328.0,
                        248.0, 148.0,
                    ],
                    [
                        994.0, 762.0, 700.0, 686.0, 304.0, 411.0, 365.0, 246.0, 420.0, 282.0,
                        155.0, 180.0,
                    ],
                ],
                1.012374,
            ),
            (
                8,
                [
                    [
                        584.0, 482.0, 598.0, 285.0, 197.0, 183.0, 186.0, 64.0, 118.0, 66.0, 103.0,
                        85.0,
                    ],
                    [
                        509.0, 535.0, 398.0, 257.0, 173.0, 217.0, 172.0, 64.0, 105.0, 90.0, 75.0,
                        50.0,
                    ],
                    [
                        751.0, 440.0, 310.0, 270.0, 143.0, 198.0, 154.0, 55.0, 79.0, 66.0, 80.0,
                        54.0,
                    ],
                    [
                        507.0, 522.0, 393.0, 233.0, 180.0, 175.0, 199.0, 54.0, 69.0, 79.0, 95.0,
                        65.0,
                    ],
                ],
                1.033006,
            ),
            // Proven since the budget is one and a half times the rank-by-rank search's (with
            // the same budget the bound stopped at 1.016473).
            (
                6,
                [
                    [
                        797.0, 439.0, 538.0, 401.0, 121.0, 429.0, 252.0, 227.0, 163.0, 73.0, 234.0,
                        87.0,
                    ],
                    [
                        668.0, 498.0, 642.0, 402.0, 183.0, 364.0, 271.0, 206.0, 167.0, 94.0, 215.0,
                        94.0,
                    ],
                    [
                        732.0, 372.0, 606.0, 375.0, 170.0, 435.0, 285.0, 236.0, 147.0, 71.0, 247.0,
                        75.0,
                    ],
                    [
                        700.0, 606.0, 852.0, 323.0, 184.0, 637.0, 234.0, 169.0, 122.0, 97.0, 242.0,
                        94.0,
                    ],
                ],
                1.018803,
            ),
            // The ascent's probe at 1.0530 times the mean found this optimum from the
            // heuristic's plan and ran out below it on the contents listed at 1.0530.
            (
                8,
                [
                    [
                        2677.0, 708.0, 558.0, 669.0, 836.0, 658.0, 570.0, 401.0, 226.0, 194.0,
                        542.0, 565.0,
                    ],
                    [
                        3337.0, 658.0, 632.0, 705.0, 690.0, 641.0, 542.0, 521.0, 244.0, 303.0,
                        656.0, 371.0,
                    ],
                    [
                        3546.0, 704.0, 681.0, 574.0, 1076.0, 514.0, 597.0, 372.0, 231.0, 249.0,
                        621.0, 462.0,
                    ],
                    [
                        2618.0, 727.0, 584.0, 626.0, 549.0, 678.0, 762.0, 323.0, 206.0, 197.0,
                        547.0, 381.0,
                    ],
                ],
                1.036443,
            ),
        ];
        for (g, windows, rounded) in cases {
            assert_joint_proves_12_expert_layer(g, &windows, rounded);
        }
    }

    /// A pareto 12-expert 6 x 4 layer with four windows beyond the sweep (`exact_sweep pareto
    /// 12 24 15 4`, the third), open before the whole-list scans by masks (bound 1.016488 below
    /// the plan 1.020321, 0.377%: the probe at the plan ran out): `joint` proves it, and the
    /// rank-by-rank search with 100M nodes confirms the optimum above and below.
    #[test]
    fn joint_proves_a_pareto_12_expert_layer_with_masked_scans() {
        let windows = [
            [
                1173.0, 1596.0, 2043.0, 2597.0, 1209.0, 1472.0, 1034.0, 1585.0, 1635.0, 1876.0,
                1301.0, 3455.0,
            ],
            [
                1385.0, 2180.0, 2203.0, 3740.0, 1152.0, 1122.0, 860.0, 2278.0, 1943.0, 1613.0,
                987.0, 2260.0,
            ],
            [
                1157.0, 2027.0, 1997.0, 3398.0, 1528.0, 1591.0, 871.0, 1699.0, 1906.0, 1628.0,
                1207.0, 2210.0,
            ],
            [
                979.0, 2163.0, 2111.0, 2859.0, 994.0, 1298.0, 1426.0, 1247.0, 1873.0, 1628.0,
                1441.0, 2504.0,
            ],
        ];
        assert_joint_proves_12_expert_layer(6, &windows, 1.020321);
    }

    /// The sweep's two pareto 12-expert layers with four windows left open before the sieved
    /// scans and the resumed ascent (6 x 4: bound 1.016602 below a plan at 1.020538, the probe
    /// at the plan out of nodes, needing 2.7M; 8 x 3: bound 1.033217 below a plan at 1.035179):
    /// `joint` proves both, and the rank-by-rank search with 100M nodes confirms the optima
    /// above and below. Without the resumed ascent the 8 x 3 layer stays open (0.055%); without
    /// the sieves and the slot test the 6 x 4 layer's last probe needs 2.7M nodes (2.1M left).
    #[test]
    fn joint_proves_the_pareto_12_expert_layers() {
        let cases: [(usize, [[f64; 12]; 4], f64); 2] = [
            (
                6,
                [
                    [
                        2378.0, 1055.0, 6134.0, 928.0, 1034.0, 1425.0, 3076.0, 989.0, 1175.0,
                        5147.0, 4686.0, 1529.0,
                    ],
                    [
                        2477.0, 928.0, 5170.0, 990.0, 1477.0, 867.0, 1724.0, 1409.0, 1329.0,
                        5300.0, 3863.0, 1545.0,
                    ],
                    [
                        2386.0, 1259.0, 3536.0, 1214.0, 1339.0, 1536.0, 2198.0, 1450.0, 1594.0,
                        4694.0, 3478.0, 1560.0,
                    ],
                    [
                        2540.0, 1295.0, 4888.0, 1364.0, 1906.0, 1477.0, 2385.0, 1310.0, 1616.0,
                        4870.0, 2626.0, 1413.0,
                    ],
                ],
                1.020538,
            ),
            (
                8,
                [
                    [
                        2554.0, 2378.0, 1330.0, 1176.0, 1559.0, 2636.0, 1716.0, 2066.0, 1837.0,
                        3613.0, 2723.0, 2345.0,
                    ],
                    [
                        3385.0, 1538.0, 1587.0, 1155.0, 1756.0, 3023.0, 1708.0, 1509.0, 2113.0,
                        5039.0, 1929.0, 2193.0,
                    ],
                    [
                        2539.0, 2079.0, 1184.0, 1013.0, 1347.0, 2350.0, 1565.0, 1743.0, 1952.0,
                        4112.0, 2198.0, 2380.0,
                    ],
                    [
                        3042.0, 1934.0, 1567.0, 964.0, 1569.0, 2750.0, 1384.0, 1946.0, 1600.0,
                        3077.0, 2309.0, 1988.0,
                    ],
                ],
                1.033582,
            ),
        ];
        for (g, windows, rounded) in cases {
            assert_joint_proves_12_expert_layer(g, &windows, rounded);
        }
    }
}
