//! The episode-weighted loads of every two or three members a rank can still take, sorted,
//! for [`super::EpisodeLister`]: whether any of them brings a rank into the window of the
//! cut, and (for two) which.

/// The most members a set holds.
const MOST: usize = 3;

/// A set: its load and its replicas (the first `n`).
type Set = (f64, [u32; MOST]);

/// Every set of `n` replicas of `n` distinct experts at positions from `j` on (one segment per
/// `j`), lightest first by episode-weighted load. A replica is `r = j * (cap + 1) + c`
/// (position `j`, count `c`).
pub(super) struct SuffixSums {
    n: usize,
    /// `load[start[j]..start[j + 1]]`: the segment of the sets whose members are all at
    /// position `j` or later, sorted.
    start: Vec<usize>,
    load: Vec<f64>,
    /// `members[i * n..(i + 1) * n]`: the replicas of entry `i`, positions ascending (empty
    /// when not kept).
    members: Vec<u32>,
}

impl SuffixSums {
    /// `weighted[r]`: replica `r`'s episode-weighted load; `fewest[j]`: the fewest replicas of
    /// the expert at position `j` (above `cap`: it has none); `keep`: whether to keep the
    /// members of each set (to list them) or only the loads (to test a window).
    pub(super) fn new(
        weighted: &[f64],
        fewest: &[usize],
        cap: usize,
        n: usize,
        keep: bool,
    ) -> SuffixSums {
        assert!((1..=MOST).contains(&n), "sets of one to {MOST} members");
        let e = fewest.len();
        // Built from the last position back: segment `j` is the sets whose first member is
        // at `j`, sorted, merged with segment `j + 1`.
        let mut segments: Vec<Vec<Set>> = vec![Vec::new(); e + 1];
        for j in (0..e).rev() {
            let mut first: Vec<Set> = Vec::new();
            for c in fewest[j]..=cap {
                let r = j * (cap + 1) + c;
                let mut picked = [0; MOST];
                picked[0] = r as u32;
                let mut grow = Grow {
                    weighted,
                    fewest,
                    cap,
                    n,
                    picked,
                    out: &mut first,
                };
                grow.from(1, j + 1, weighted[r]);
            }
            first.sort_by(|a, b| a.0.total_cmp(&b.0));
            segments[j] = merge(first, &segments[j + 1]);
        }
        let mut start = Vec::with_capacity(e + 2);
        let (mut load, mut members) = (Vec::new(), Vec::new());
        for segment in &segments {
            start.push(load.len());
            for (l, m) in segment {
                load.push(*l);
                if keep {
                    members.extend_from_slice(&m[..n]);
                }
            }
        }
        start.push(load.len());
        SuffixSums {
            n,
            start,
            load,
            members,
        }
    }

    /// The sets from position `from` on whose load lies in `[lo, hi)`: their index range.
    fn window(&self, from: usize, lo: f64, hi: f64) -> std::ops::Range<usize> {
        let Some(&end) = self.start.get(from + 1) else {
            return 0..0;
        };
        let begin = self.start[from];
        let segment = &self.load[begin..end];
        let a = segment.partition_point(|&l| l < lo);
        let b = a + segment[a..].partition_point(|&l| l < hi);
        begin + a..begin + b
    }

    /// Whether some set from position `from` on has its load in `[lo, hi)`.
    pub(super) fn any_in(&self, from: usize, lo: f64, hi: f64) -> bool {
        let Some(&end) = self.start.get(from + 1) else {
            return false;
        };
        let segment = &self.load[self.start[from]..end];
        let a = segment.partition_point(|&l| l < lo);
        segment.get(a).is_some_and(|&l| l < hi)
    }

    /// The members of every set from position `from` on whose load lies in `[lo, hi)`,
    /// lightest first (only when built to keep them).
    pub(super) fn in_window(&self, from: usize, lo: f64, hi: f64) -> impl Iterator<Item = &[u32]> {
        let n = self.n;
        let range = self.window(from, lo, hi);
        self.members[range.start * n..range.end * n].chunks_exact(n)
    }
}

/// Completes a set's first members in every way (building [`SuffixSums`]).
struct Grow<'a> {
    weighted: &'a [f64],
    fewest: &'a [usize],
    cap: usize,
    n: usize,
    picked: [u32; MOST],
    out: &'a mut Vec<Set>,
}

impl Grow<'_> {
    /// Every set completing the `d` members picked (weighing `so_far`) with members at
    /// positions from `from` on.
    fn from(&mut self, d: usize, from: usize, so_far: f64) {
        if d == self.n {
            self.out.push((so_far, self.picked));
            return;
        }
        for j in from..self.fewest.len() {
            for c in self.fewest[j]..=self.cap {
                let r = j * (self.cap + 1) + c;
                self.picked[d] = r as u32;
                self.from(d + 1, j + 1, so_far + self.weighted[r]);
            }
        }
    }
}

/// Two runs sorted by load, merged (stable: `a` first on ties).
fn merge(a: Vec<Set>, b: &[Set]) -> Vec<Set> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let mut b = b.iter().copied().peekable();
    for x in a {
        while let Some(y) = b.next_if(|y| y.0 < x.0) {
            out.push(y);
        }
        out.push(x);
    }
    out.extend(b);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every window query answers what a scan of every set of `n` replicas of distinct
    /// experts from the position on answers (random loads with ties, fewest counts above the
    /// cap, every start position, windows empty and wide).
    #[test]
    fn windows_hold_exactly_the_sets_whose_load_lies_in_them() {
        let mut rng = crate::synth::Rng::new(41);
        for _ in 0..300 {
            let e = 1 + rng.below(7);
            let cap = 1 + rng.below(4);
            let n = 2 + rng.below(2);
            let fewest: Vec<usize> = (0..e).map(|_| 1 + rng.below(cap + 1)).collect();
            let base: Vec<f64> = (0..e).map(|_| rng.below(20) as f64).collect();
            let weighted: Vec<f64> = (0..e * (cap + 1))
                .map(|r| base[r / (cap + 1)] / (r % (cap + 1)).max(1) as f64)
                .collect();
            let sums = SuffixSums::new(&weighted, &fewest, cap, n, true);
            let all: Vec<Vec<u32>> = (0..1u32 << e)
                .filter(|m| m.count_ones() as usize == n)
                .flat_map(|m| {
                    let positions: Vec<usize> = (0..e).filter(|&j| m >> j & 1 == 1).collect();
                    let mut sets: Vec<Vec<u32>> = vec![Vec::new()];
                    for &j in &positions {
                        sets = sets
                            .into_iter()
                            .flat_map(|s| {
                                (fewest[j]..=cap).map(move |c| {
                                    let mut s = s.clone();
                                    s.push((j * (cap + 1) + c) as u32);
                                    s
                                })
                            })
                            .collect();
                    }
                    sets
                })
                .collect();
            for from in 0..=e + 1 {
                let lo = rng.below(40) as f64 - 5.0;
                let hi = lo + [0.0, 0.5, 3.0, 100.0][rng.below(4)];
                let load = |s: &[u32]| s.iter().map(|&r| weighted[r as usize]).sum::<f64>();
                let mut want: Vec<Vec<u32>> = all
                    .iter()
                    .filter(|s| s[0] as usize / (cap + 1) >= from)
                    .filter(|s| (lo..hi).contains(&load(s)))
                    .cloned()
                    .collect();
                let mut got: Vec<Vec<u32>> =
                    sums.in_window(from, lo, hi).map(<[u32]>::to_vec).collect();
                let loads: Vec<f64> = got.iter().map(|s| load(s)).collect();
                assert!(loads.windows(2).all(|p| p[0] <= p[1]), "{loads:?}");
                assert_eq!(sums.any_in(from, lo, hi), !want.is_empty());
                got.sort();
                want.sort();
                assert_eq!(
                    got, want,
                    "e {e} cap {cap} n {n} fewest {fewest:?} from {from}"
                );
            }
        }
    }
}
