//! Rank contents, shared by the two cover searches ([`super::cover`] for one episode,
//! [`super::episodes`] for several): listing every content whose (episode-weighted) load lies
//! in a window, and the replica counts a partial cover has decided.
//!
//! A content is `S` distinct experts, each with a replica count; its load is the sum of its
//! members' replica loads `x / count`.

mod episode_lister;
mod suffix_sums;

pub(super) use episode_lister::{EpisodeLister, Sets};

/// What listing the contents needs: positions are experts heaviest first.
pub(super) struct Lister {
    order: Vec<usize>,
    x: Vec<f64>,
    fewest: Vec<usize>,
    cap: usize,
    /// Smallest and largest replica any position from `j` on can add.
    suf_small: Vec<f64>,
    suf_large: Vec<f64>,
    /// Every replica a position can add, `(size, position, count)`, ascending by size.
    reps: Vec<(f64, usize, usize)>,
    /// The window: loads in `[lo, hi)`.
    lo: f64,
    hi: f64,
}

/// Where [`Lister::list`] sends what it finds, and charges the nodes it spends.
pub(super) trait Sink {
    /// One node of the listing; false when the budget is spent.
    fn spend(&mut self) -> bool;
    /// A content with this load (members as `(expert, count)`); false to stop listing.
    fn add(&mut self, load: f64, picked: &[(usize, usize)]) -> bool;
}

impl Lister {
    /// `x[e]`: expert `e`'s load; `fewest[e]`: its fewest replicas (at most `cap + 1`, which
    /// leaves it no replica); `cap`: most replicas of an expert; contents in `[lo, hi)`.
    pub(super) fn new(x: &[f64], fewest: &[usize], cap: usize, lo: f64, hi: f64) -> Lister {
        let e = x.len();
        let mut order: Vec<usize> = (0..e).collect();
        order.sort_by(|&a, &b| x[b].total_cmp(&x[a]).then(a.cmp(&b)));
        let fewest: Vec<usize> = order.iter().map(|&i| fewest[i]).collect();
        let x: Vec<f64> = order.iter().map(|&i| x[i]).collect();
        // Suffix extremes: what `k` more members from position `j` on add at least / most.
        let mut suf_small = vec![f64::INFINITY; e + 1];
        let mut suf_large = vec![0.0f64; e + 1];
        for j in (0..e).rev() {
            suf_small[j] = suf_small[j + 1].min(x[j] / cap as f64);
            suf_large[j] = suf_large[j + 1].max(x[j] / fewest[j] as f64);
        }
        let mut reps: Vec<(f64, usize, usize)> = (0..e)
            .flat_map(|j| (fewest[j]..=cap).map(move |c| (j, c)))
            .map(|(j, c)| (x[j] / c as f64, j, c))
            .collect();
        reps.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        Lister {
            order,
            x,
            fewest,
            cap,
            suf_small,
            suf_large,
            reps,
            lo,
            hi,
        }
    }

    /// Sends every content of `s` members with load in the window to `sink`, in lexicographic
    /// order of positions. False when the sink stopped it or the budget ran out.
    pub(super) fn list(&self, s: usize, sink: &mut impl Sink) -> bool {
        let mut picked: Vec<(usize, usize)> = Vec::with_capacity(s);
        self.list_from(s, 0, 0.0, &mut picked, sink)
    }

    /// The contents that extend `picked` (members at positions `from` on, whose loads add to
    /// `sum` so far).
    fn list_from(
        &self,
        s: usize,
        from: usize,
        sum: f64,
        picked: &mut Vec<(usize, usize)>,
        sink: &mut impl Sink,
    ) -> bool {
        if !sink.spend() {
            return false;
        }
        let need = s - picked.len();
        if need == 1 {
            // The last member: its replica must bring the load into the window, looked up
            // among every replica by size.
            let start = self.reps.partition_point(|r| sum + r.0 < self.lo);
            for &(size, j, c) in &self.reps[start..] {
                let v = sum + size;
                if v >= self.hi {
                    break;
                }
                if j < from {
                    continue;
                }
                if !sink.spend() {
                    return false;
                }
                picked.push((self.order[j], c));
                let ok = sink.add(v, picked);
                picked.pop();
                if !ok {
                    return false;
                }
            }
            return true;
        }
        let more = (need - 1) as f64;
        for j in from..self.order.len() {
            if self.order.len() - j < need
                || sum + need as f64 * self.suf_small[j] >= self.hi
                || sum + need as f64 * self.suf_large[j] < self.lo
            {
                break;
            }
            for c in self.fewest[j]..=self.cap {
                let v = sum + self.x[j] / c as f64;
                if v + more * self.suf_small[j + 1] >= self.hi {
                    continue;
                }
                if v + more * self.suf_large[j + 1] < self.lo {
                    // Larger counts only shrink the replica further.
                    break;
                }
                picked.push((self.order[j], c));
                let ok = self.list_from(s, j + 1, v, picked, sink);
                picked.pop();
                if !ok {
                    return false;
                }
            }
        }
        true
    }
}

/// The replica counts a partial cover has decided: per expert its count (`label`, 0 while
/// undecided) and the appearances still owed (`rem`); per content chosen, which of its members
/// it gave their count (a bit per member), so that undoing it restores the state.
pub(super) struct Counts {
    pub(super) label: Vec<usize>,
    pub(super) rem: Vec<usize>,
    fresh: Vec<u8>,
}

impl Counts {
    /// Nothing decided for `e` experts, room for `g` contents.
    pub(super) fn new(e: usize, g: usize) -> Counts {
        Counts {
            label: vec![0; e],
            rem: vec![0; e],
            fresh: Vec::with_capacity(g),
        }
    }

    /// A content with these members `(expert, count)` becomes a rank: members not decided yet
    /// get their count, and each owes one appearance less.
    pub(super) fn apply(&mut self, members: &[(usize, usize)]) {
        let mut fresh = 0u8;
        for (m, &(f, c)) in members.iter().enumerate() {
            if self.label[f] == 0 {
                self.label[f] = c;
                self.rem[f] = c;
                fresh |= 1 << m;
            }
            self.rem[f] -= 1;
        }
        self.fresh.push(fresh);
    }

    /// Undoes the last [`Self::apply`], of the same members.
    pub(super) fn undo(&mut self, members: &[(usize, usize)]) {
        let fresh = self.fresh.pop().unwrap_or(0);
        for (m, &(f, _)) in members.iter().enumerate() {
            self.rem[f] += 1;
            if fresh & (1 << m) != 0 {
                self.label[f] = 0;
                self.rem[f] = 0;
            }
        }
    }

    /// What the next rank must satisfy for the counts to still fit the slots after it (see
    /// [`NextRank`]); `None` when they do not fit now ([`Self::slots_fit`]). `ranks_left`:
    /// the empty ranks, the next one included.
    pub(super) fn next_rank(
        &self,
        fewest: &[usize],
        cap: usize,
        s: usize,
        ranks_left: usize,
    ) -> Option<NextRank> {
        if ranks_left == 0 {
            return None;
        }
        let each_now = ranks_left.min(cap);
        let each = (ranks_left - 1).min(cap);
        let (mut owed, mut least, mut most_now, mut most) = (0, 0, 0, 0);
        let mut forced = 0;
        for ((&label, &rem), &fewest) in self.label.iter().zip(&self.rem).zip(fewest) {
            if label == 0 {
                if fewest > each_now {
                    return None;
                }
                forced += usize::from(fewest > each);
                least += fewest;
                most_now += each_now;
                most += each;
            } else {
                if rem > ranks_left {
                    return None;
                }
                forced += usize::from(rem == ranks_left);
                owed += rem;
            }
        }
        let free = s * ranks_left;
        if owed + least > free || free > owed + most_now {
            return None;
        }
        Some(NextRank {
            ranks_left,
            spare: free - owed - least,
            surplus: (owed + most) as isize - free as isize,
            each,
            forced,
        })
    }

    /// Whether a content with these members `(expert, count)` can be the next rank: each
    /// member's count agrees with the count decided (with an appearance left) or is new and
    /// at most the ranks left, and after it the counts still fit the slots (the test
    /// [`Self::slots_fit`] makes of the state after it, from `next` in `O(S)`: the content's
    /// new counts use at most the spare replicas and give up at most the surplus, and it
    /// holds every expert that must be on each rank left).
    #[inline(always)]
    pub(super) fn admits(
        &self,
        next: &NextRank,
        fewest: &[usize],
        members: impl IntoIterator<Item = (usize, usize)>,
    ) -> bool {
        let (mut extra, mut given_up, mut forced) = (0usize, 0isize, 0usize);
        for (f, c) in members {
            let label = self.label[f];
            if label == 0 {
                if c > next.ranks_left {
                    return false;
                }
                extra += c.saturating_sub(fewest[f]);
                given_up += next.each as isize - c as isize;
                forced += usize::from(fewest[f] > next.each);
            } else {
                if label != c || self.rem[f] == 0 {
                    return false;
                }
                forced += usize::from(self.rem[f] == next.ranks_left);
            }
        }
        extra <= next.spare && given_up <= next.surplus && forced == next.forced
    }

    /// Replicas owed and replica counts still open fit the `s * ranks_left` empty slots
    /// (`fewest`: the fewest replicas each expert may have). The searches ask
    /// [`Self::next_rank`], which makes this test and more; kept as the tests' reference.
    #[cfg(test)]
    pub(super) fn slots_fit(
        &self,
        fewest: &[usize],
        cap: usize,
        s: usize,
        ranks_left: usize,
    ) -> bool {
        let mut owed = 0;
        let (mut least, mut most) = (0, 0);
        for ((&label, &rem), &fewest) in self.label.iter().zip(&self.rem).zip(fewest) {
            if label == 0 {
                if fewest > ranks_left.min(cap) {
                    return false;
                }
                least += fewest;
                most += ranks_left.min(cap);
            } else {
                if rem > ranks_left {
                    return false;
                }
                owed += rem;
            }
        }
        let free = s * ranks_left;
        owed + least <= free && free <= owed + most
    }
}

/// What the next rank of a partial cover must satisfy for the replica counts to fit the
/// slots after it ([`Counts::next_rank`], [`Counts::admits`]). Without it the searches
/// spent most of their nodes on ranks [`Counts::slots_fit`] rejected one level down (the
/// sweep's slowest layer, uniform 16 experts on 8 x 4: 60-70% of its cover nodes), and
/// counted such ranks among an expert's options when choosing the most constrained one.
pub(super) struct NextRank {
    /// Empty ranks, the next one included.
    pub(super) ranks_left: usize,
    /// Replicas the new counts of the next rank's members may add above their fewest: the
    /// free slots less the replicas owed and the fewest of the experts still open.
    spare: usize,
    /// Replicas the new counts may fall short of the most each expert can still have once
    /// this rank is placed (`each`): what the replicas owed and those most add up to beyond
    /// the slots left after it.
    surplus: isize,
    /// Most replicas an open expert can have after the next rank (ranks left after it, at
    /// most the cap).
    each: usize,
    /// Experts that must be on the next rank: those owing an appearance on every rank left,
    /// and open ones whose fewest replicas exceed `each`.
    forced: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `admits` answers as the slow test it replaces: each member's count agrees with the
    /// state (as the cover search tested before) and, the content applied as the next rank,
    /// `slots_fit` holds one rank down. Random partial states (counts decided or not, any
    /// appearances owed, fewest replicas up to one above the cap) and random contents of
    /// distinct experts, both answers common (24,000 no, 3,400 yes). (Planted in review: `spare` one larger, the
    /// forced open experts counted with `each` of the rank before, the surplus without the
    /// new counts: each fails it.)
    #[test]
    fn admits_as_slots_fit_after_the_rank() {
        let mut rng = crate::synth::Rng::new(17);
        let mut seen = [0usize; 2];
        for _ in 0..200_000 {
            let e = 3 + rng.below(8);
            // (At most six members here; the searches' contents have at most eight: `fresh`
            // has a bit per member.)
            let s = 2 + rng.below(e.min(6) - 1);
            let g = 1 + rng.below(6);
            let cap = 1 + rng.below(g);
            let fewest: Vec<usize> = (0..e).map(|_| 1 + rng.below(2)).collect();
            let ranks_left = 1 + rng.below(g);
            let mut counts = Counts::new(e, g);
            for f in 0..e {
                if rng.below(2) == 0 {
                    let c = 1 + rng.below(cap);
                    counts.label[f] = c;
                    counts.rem[f] = rng.below(c + 1);
                }
            }
            let next = counts.next_rank(&fewest, cap, s, ranks_left);
            assert_eq!(
                next.is_some(),
                counts.slots_fit(&fewest, cap, s, ranks_left)
            );
            let Some(next) = next else { continue };
            let mut experts: Vec<usize> = (0..e).collect();
            for i in 0..s {
                experts.swap(i, i + rng.below(e - i));
            }
            let members: Vec<(usize, usize)> = experts[..s]
                .iter()
                .map(|&f| {
                    (
                        f,
                        fewest[f].min(cap) + rng.below(cap + 1 - fewest[f].min(cap)),
                    )
                })
                .collect();
            let agree = members.iter().all(|&(f, c)| {
                if counts.label[f] == 0 {
                    c <= ranks_left
                } else {
                    counts.label[f] == c && counts.rem[f] >= 1
                }
            });
            let got = counts.admits(&next, &fewest, members.iter().copied());
            let want = agree && {
                counts.apply(&members);
                let fit = counts.slots_fit(&fewest, cap, s, ranks_left - 1);
                counts.undo(&members);
                fit
            };
            assert_eq!(
                got, want,
                "{members:?} on {:?} / {:?}, fewest {fewest:?}, cap {cap}, {ranks_left} ranks of {s}",
                counts.label, counts.rem
            );
            seen[usize::from(want)] += 1;
        }
        assert!(seen[0] > 10_000 && seen[1] > 2_000, "{seen:?}");
    }
}
