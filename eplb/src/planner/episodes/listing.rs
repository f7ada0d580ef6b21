//! Building the contents a probe searches, as [`super::Search`]'s methods: taking them from a
//! listing shared by the probes of a layer ([`Search::keep_listed`]), listing them on the
//! weighted load ([`Search::list_contents`]), or putting a listing by episodes in that
//! listing's order ([`Search::in_weighted_listing_order`]), then indexing them per expert and
//! laying the lists out for the scans.

use super::*;

impl Search<'_> {
    /// The contents of `listed` below this search's cut (the fewest replicas at this cut, as
    /// listing would set them). A content with a replica at or above the cut is above it, so
    /// every one kept has counts the listing at this cut would allow.
    pub(super) fn keep_listed(&mut self, listed: &Listed) {
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
    pub(super) fn list_contents(&mut self) -> bool {
        let p = self.p;
        let cap = self.cap;
        for e in 0..p.e {
            self.fewest[e] = fewest_replicas(p.agg[e], self.cut, cap);
        }
        if wide(p) || self.by_episodes {
            let total = self.total.clone();
            let l = contents::EpisodeLister::reusing(
                &p.x,
                &p.agg,
                &p.omega,
                &total,
                &self.fewest,
                cap,
                p.g,
                p.s,
                self.cut + MARGIN,
                self.sets.take(),
            );
            let listed = l.list(self);
            if self.by_episodes {
                self.sets = Some(l.into_sets());
                if listed {
                    self.in_weighted_listing_order();
                }
            }
            return listed;
        }
        let whole: f64 = self.total.iter().zip(&p.omega).map(|(t, o)| t * o).sum();
        let lo = whole - (p.g - 1) as f64 * self.cut - MARGIN;
        let l = contents::Lister::new(&p.agg[..p.e], &self.fewest, cap, lo, self.cut + MARGIN);
        l.list(p.s, self)
    }

    /// Puts the contents [`contents::EpisodeLister`] listed in the order [`contents::Lister`]
    /// sends them: by the positions and counts of all members but the last (both list in that
    /// order), then by the last member's replica as the weighted listing computes it
    /// (`agg / count`, then its position and count), where the episode lister takes the
    /// episode-weighted sum of its loads (equal but for rounding). The same contents in the
    /// same order: the same lists, ties between equal weighted loads included. Charged as
    /// looking at each content once.
    fn in_weighted_listing_order(&mut self) {
        let (p, s) = (self.p, self.p.s);
        let n = self.weighted.len();
        self.nodes = self.nodes.saturating_add(n / SCANS_PER_NODE);
        let mut order: Vec<usize> = (0..p.e).collect();
        order.sort_by(|&a, &b| p.agg[b].total_cmp(&p.agg[a]).then(a.cmp(&b)));
        let mut pos = vec![0; p.e];
        for (j, &e) in order.iter().enumerate() {
            pos[e] = j;
        }
        let members = &self.members;
        let prefix = |i: usize| {
            members[i * s..(i + 1) * s - 1]
                .iter()
                .map(|&(e, c)| (pos[e], c))
        };
        let last = |i: usize| {
            let (e, c) = members[(i + 1) * s - 1];
            (p.agg[e] / c as f64, pos[e], c)
        };
        let mut ids: Vec<usize> = (0..n).collect();
        ids.sort_by(|&a, &b| {
            prefix(a).cmp(prefix(b)).then_with(|| {
                let (x, y) = (last(a), last(b));
                x.0.total_cmp(&y.0).then((x.1, x.2).cmp(&(y.1, y.2)))
            })
        });
        self.reorder(&ids);
    }

    /// Stores a content if it can be a rank of a placement below the cut (false, giving up,
    /// when there are too many).
    pub(super) fn add_content(&mut self, picked: &[(usize, usize)]) -> bool {
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
    pub(super) fn index(&mut self) {
        // Charged to the budget (a quarter node per content), as the sorting costs time.
        self.nodes = self.nodes.saturating_add(self.weighted.len() / 4);
        if self.nodes > self.budget {
            self.aborted = true;
        }
        let p = self.p;
        self.heaviest_first();
        self.by = self.inline_all();
        self.allowed = vec![false; (p.g + 1) * p.e * (self.cap + 1)];
    }

    /// Every list (per pair `(expert, count)`, its contents with their weighted loads, pairs
    /// and loads side by side, and on three or four slots per rank the masks), built in one pass over the contents heaviest first
    /// ([`Self::heaviest_first`]): each content is appended to the lists of its pairs, so
    /// each list comes out heaviest first, equal loads in the order listed, as sorting it
    /// would leave it, and the contents are read front to back once instead of once per list
    /// at scattered places (on the 16-expert 8 x 4 layers' probes at 1.6% above the mean,
    /// 126,000-255,000 contents, gathering them list by list was a sixth of the time).
    fn inline_all(&self) -> Vec<List> {
        let (s, w, e) = (self.p.s, self.w, self.p.e);
        let stride = self.cap + 1;
        let masked = !wide(self.p);
        let mut len = vec![0usize; e * stride];
        for &(f, c) in &self.members {
            len[f * stride + c] += 1;
        }
        let mut lists: Vec<List> = len
            .iter()
            .map(|&n| List {
                masks: if masked {
                    vec![0; n.div_ceil(64) * e * stride]
                } else {
                    Vec::new()
                },
                weighted: Vec::with_capacity(n),
                pairs: Vec::with_capacity(n),
                loads: Vec::with_capacity(n * w),
                ids: Vec::with_capacity(n),
            })
            .collect();
        for i in 0..self.weighted.len() {
            let members = &self.members[i * s..(i + 1) * s];
            let mut pairs = [0u16; 8];
            for (m, &(f, c)) in members.iter().enumerate() {
                // e <= 16 and cap < 256 (`eligible`): every pair's index fits.
                pairs[m] = (f * stride + c) as u16;
            }
            let loads = &self.loads[i * w..(i + 1) * w];
            for &(f, c) in members {
                let list = &mut lists[f * stride + c];
                let j = list.ids.len();
                list.ids.push(i as u32);
                list.weighted.push(self.weighted[i]);
                list.pairs.push(pairs);
                for &l in loads {
                    list.loads.push(l);
                }
                if masked {
                    let word = j / 64 * e * stride;
                    for &(g, d) in members {
                        list.masks[word + g * stride] |= 1 << (j % 64);
                        list.masks[word + g * stride + d] |= 1 << (j % 64);
                    }
                }
            }
        }
        lists
    }

    /// Renumbers the contents heaviest first (episode-weighted; equal loads in the order they
    /// were listed), the order of every list ([`Self::inline_all`]). Every list holds the same
    /// contents in the same order as sorting each by weighted load and then by the order
    /// listed did, so the search is the same.
    fn heaviest_first(&mut self) {
        let n = self.weighted.len();
        let mut ids: Vec<usize> = (0..n).collect();
        ids.sort_by(|&a, &b| {
            self.weighted[b]
                .total_cmp(&self.weighted[a])
                .then(a.cmp(&b))
        });
        self.reorder(&ids);
    }

    /// Puts the contents in the order `ids` (position k takes the content at `ids[k]`).
    fn reorder(&mut self, ids: &[usize]) {
        if ids.iter().enumerate().all(|(k, &i)| k == i) {
            return;
        }
        let (s, w) = (self.p.s, self.w);
        let members: Vec<(usize, usize)> = ids
            .iter()
            .flat_map(|&i| self.members[i * s..(i + 1) * s].iter().copied())
            .collect();
        let loads: Vec<f64> = ids
            .iter()
            .flat_map(|&i| self.loads[i * w..(i + 1) * w].iter().copied())
            .collect();
        let weighted: Vec<f64> = ids.iter().map(|&i| self.weighted[i]).collect();
        (self.members, self.loads, self.weighted) = (members, loads, weighted);
    }
}
