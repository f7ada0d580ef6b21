//! The sieves of the cover searches ([`super::cover`] with one window, [`super::episodes`] with
//! several): per group open on the search's path (a level), the content lists sieved at the
//! group's first node, each kept as the positions of the entries that passed there.
//!
//! Along a path every test of a content only gets stricter, so a sieve made in a group holds a
//! superset of what any node below it can use: the nodes below scan its positions instead of the
//! whole list. What a sieve keeps, and which level a search reads, is the search's own; this
//! type keeps the stack and reuses the position vectors of closed levels.

/// A sieve on the stack: `(level, index in that level)`.
pub(super) type SieveAt = (usize, usize);

#[derive(Default)]
pub(super) struct Sieves {
    /// Per level, the lists sieved there: `(list, positions)`. Levels `depth..` are kept only
    /// to reuse their memory.
    levels: Vec<Vec<(usize, Vec<u32>)>>,
    /// Levels open on the current path.
    depth: usize,
    /// Emptied position vectors, for reuse.
    spare: Vec<Vec<u32>>,
}

impl Sieves {
    /// A group starts: a level of sieves inside those of the groups it lies in.
    pub(super) fn open_level(&mut self) {
        if self.depth == self.levels.len() {
            self.levels.push(Vec::new());
        }
        let spare = &mut self.spare;
        spare.extend(self.levels[self.depth].drain(..).map(|(_, mut at)| {
            at.clear();
            at
        }));
        self.depth += 1;
    }

    pub(super) fn close_level(&mut self) {
        self.depth -= 1;
    }

    /// The innermost sieve of `list` on the current path, the current level included.
    pub(super) fn innermost(&self, list: usize) -> Option<SieveAt> {
        self.innermost_below(list, self.depth)
    }

    /// The innermost sieve of `list` in the groups enclosing the current one.
    pub(super) fn enclosing(&self, list: usize) -> Option<SieveAt> {
        self.innermost_below(list, self.depth.saturating_sub(1))
    }

    /// The sieve of `list` made at the current level, if any.
    pub(super) fn at_current(&self, list: usize) -> Option<SieveAt> {
        let level = self.depth.checked_sub(1)?;
        let k = self
            .levels
            .get(level)?
            .iter()
            .position(|(l, _)| *l == list)?;
        Some((level, k))
    }

    fn innermost_below(&self, list: usize, levels: usize) -> Option<SieveAt> {
        (0..levels).rev().find_map(|up| {
            let k = self.levels[up].iter().position(|(l, _)| *l == list)?;
            Some((up, k))
        })
    }

    /// The kept positions of a sieve, in list order.
    #[inline(always)]
    pub(super) fn positions(&self, (level, k): SieveAt) -> &[u32] {
        &self.levels[level][k].1
    }

    /// An empty position vector to fill and [`Self::push`].
    pub(super) fn take_spare(&mut self) -> Vec<u32> {
        self.spare.pop().unwrap_or_default()
    }

    /// Keeps `positions` as the current level's sieve of `list`.
    pub(super) fn push(&mut self, list: usize, positions: Vec<u32>) {
        self.levels[self.depth - 1].push((list, positions));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lookups see the levels of the path only; a closed level's vectors come back empty.
    #[test]
    fn levels_nest_and_reuse_their_memory() {
        let mut s = Sieves::default();
        assert_eq!(s.at_current(3), None);
        s.open_level();
        let mut a = s.take_spare();
        a.extend([1, 4, 9]);
        s.push(3, a);
        s.open_level();
        assert_eq!(s.at_current(3), None);
        assert_eq!(s.enclosing(3), Some((0, 0)));
        assert_eq!(s.innermost(3), Some((0, 0)));
        let mut b = s.take_spare();
        b.extend([4, 9]);
        s.push(3, b);
        assert_eq!(s.innermost(3), Some((1, 0)));
        assert_eq!(s.enclosing(3), Some((0, 0)));
        assert_eq!(s.positions((1, 0)), &[4, 9]);
        s.close_level();
        assert_eq!(s.innermost(3), Some((0, 0)));
        s.open_level();
        // Reopening level 1 drops its old sieve and keeps the vector, emptied.
        assert_eq!(s.innermost(3), Some((0, 0)));
        let reused = s.take_spare();
        assert!(reused.is_empty() && reused.capacity() >= 2);
        s.close_level();
        s.close_level();
        assert_eq!(s.innermost(3), None);
    }
}
