//! Whole-list scans by expert masks (three or four slots per rank): per 64 entries of a list,
//! which entries hold each expert and each (expert, count) pair, so that the entries no rank
//! may take now are dropped a word at a time instead of being read one by one. The same
//! positions, in the same order, as the entry-by-entry scans of [`super::Search`]
//! (`masked_scans_match_entry_by_entry` in the tests checks it); only the charge differs.

use super::Search;
use super::contents::NextRank;

/// Contents charged for a word of 64 list entries dropped or passed at once by the expert
/// masks of a whole-list scan ([`Search::scan_whole`]); the entries the masks pass are charged
/// one each, as in the other scans. Measured so that a node costs about the time it did before
/// the masks (five 16-expert 8 x 4 layers with four windows, refutations at 1.0115 times the
/// mean, masks in the sieves and counts only: 3.1-3.8M nodes a second before, 3.2-3.9M with
/// 16, 2.6-3.7M with 8; with the groups' ranks too, 2.1-2.5M against 2.2-2.7M before at a
/// load of 5.5).
const WORD_SCANS: usize = 16;

/// The masks a whole-list scan drops entries by ([`Search::drops`]).
struct Drops {
    masks: [(usize, usize); 16],
    len: usize,
}

impl Search<'_> {
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
    pub(super) fn scan_whole(
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

    /// [`Self::branch`] on the whole of list `list` (no sieve encloses it) by its masks, as
    /// [`Self::scan_whole`]: the same children in the same order, the entries the masks drop
    /// charged a word at a time. The stop is found again after each child (a cover found
    /// below lowers the cut); the drops stay (the state is restored).
    pub(super) fn branch_whole(&mut self, next: &NextRank, e: usize, list: usize, from: usize) {
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
}
