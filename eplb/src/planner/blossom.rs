//! Perfect matching in a small general graph (Edmonds' blossom algorithm).
//!
//! Vertices are `0..n` with `n <= 64`, each one's neighbours a bit mask, so that a graph of
//! replicas (two slots per rank: which replicas may share a rank) is built and tested in a few
//! microseconds. [`Matcher::perfect`] answers whether every vertex can be matched, and leaves
//! the matching in [`Matcher::mate`] when it can.

const NONE: usize = usize::MAX;

/// Scratch space of the blossom algorithm, reused between tests.
pub(crate) struct Matcher {
    /// `mate[v]`: the vertex matched to `v` (after a successful [`Matcher::perfect`]).
    pub mate: Vec<usize>,
    base: Vec<usize>,
    parent: Vec<usize>,
    used: Vec<bool>,
    in_blossom: Vec<bool>,
    on_path: Vec<bool>,
    queue: Vec<usize>,
}

impl Matcher {
    pub(crate) fn new(n: usize) -> Matcher {
        assert!(n <= 64, "bit-mask adjacency holds at most 64 vertices");
        Matcher {
            mate: vec![NONE; n],
            base: vec![0; n],
            parent: vec![NONE; n],
            used: vec![false; n],
            in_blossom: vec![false; n],
            on_path: vec![false; n],
            queue: Vec::with_capacity(n),
        }
    }

    /// Whether the graph with adjacency `adj` (`adj[v]` bit `u`: edge `v`-`u`, symmetric, no
    /// loops) has a perfect matching. A greedy matching first, then an augmenting path from
    /// every vertex left unmatched: a vertex with none stays unmatched in every maximum
    /// matching (Edmonds), so the answer is no at the first such vertex.
    pub(crate) fn perfect(&mut self, adj: &[u64]) -> bool {
        let n = adj.len();
        debug_assert!(n <= self.mate.len());
        if n % 2 == 1 {
            return false;
        }
        self.mate[..n].fill(NONE);
        for (v, &nb) in adj.iter().enumerate() {
            if self.mate[v] != NONE {
                continue;
            }
            let mut free = nb;
            while free != 0 {
                let u = free.trailing_zeros() as usize;
                free &= free - 1;
                if self.mate[u] == NONE {
                    self.mate[v] = u;
                    self.mate[u] = v;
                    break;
                }
            }
        }
        for root in 0..n {
            if self.mate[root] != NONE {
                continue;
            }
            let Some(mut u) = self.augmenting_path(adj, root) else {
                return false;
            };
            // Flip the path's edges, from its free end back to the root.
            while u != NONE {
                let pu = self.parent[u];
                let next = self.mate[pu];
                self.mate[u] = pu;
                self.mate[pu] = u;
                u = next;
            }
        }
        true
    }

    /// Breadth-first search for an augmenting path from `root`; returns its free end (the path
    /// runs back through `parent` and `mate`).
    fn augmenting_path(&mut self, adj: &[u64], root: usize) -> Option<usize> {
        let n = adj.len();
        self.used[..n].fill(false);
        self.parent[..n].fill(NONE);
        for (i, b) in self.base[..n].iter_mut().enumerate() {
            *b = i;
        }
        self.used[root] = true;
        self.queue.clear();
        self.queue.push(root);
        let mut head = 0;
        while head < self.queue.len() {
            let v = self.queue[head];
            head += 1;
            let mut nb = adj[v];
            while nb != 0 {
                let to = nb.trailing_zeros() as usize;
                nb &= nb - 1;
                if self.base[v] == self.base[to] || self.mate[v] == to {
                    continue;
                }
                if to == root || (self.mate[to] != NONE && self.parent[self.mate[to]] != NONE) {
                    // An odd cycle: contract it into a blossom based at the paths' meeting point.
                    let base = self.common_base(v, to);
                    self.in_blossom[..n].fill(false);
                    self.mark_path(v, base, to);
                    self.mark_path(to, base, v);
                    for i in 0..n {
                        if self.in_blossom[self.base[i]] {
                            self.base[i] = base;
                            if !self.used[i] {
                                self.used[i] = true;
                                self.queue.push(i);
                            }
                        }
                    }
                } else if self.parent[to] == NONE {
                    self.parent[to] = v;
                    if self.mate[to] == NONE {
                        return Some(to);
                    }
                    let next = self.mate[to];
                    self.used[next] = true;
                    self.queue.push(next);
                }
            }
        }
        None
    }

    /// The base where the alternating paths from `a` and `b` back to the root meet.
    fn common_base(&mut self, mut a: usize, mut b: usize) -> usize {
        self.on_path.fill(false);
        loop {
            a = self.base[a];
            self.on_path[a] = true;
            if self.mate[a] == NONE {
                break;
            }
            a = self.parent[self.mate[a]];
        }
        loop {
            b = self.base[b];
            if self.on_path[b] {
                return b;
            }
            b = self.parent[self.mate[b]];
        }
    }

    fn mark_path(&mut self, mut v: usize, base: usize, mut child: usize) {
        while self.base[v] != base {
            self.in_blossom[self.base[v]] = true;
            self.in_blossom[self.base[self.mate[v]]] = true;
            self.parent[v] = child;
            child = self.mate[v];
            v = self.parent[self.mate[v]];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Whether a perfect matching exists, by trying every partner of the lowest free vertex.
    fn brute_force(adj: &[u64], free: u64) -> bool {
        if free == 0 {
            return true;
        }
        let v = free.trailing_zeros() as usize;
        let rest = free & !(1 << v);
        let mut cand = adj[v] & rest;
        while cand != 0 {
            let u = cand.trailing_zeros() as usize;
            cand &= cand - 1;
            if brute_force(adj, rest & !(1 << u)) {
                return true;
            }
        }
        false
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Against brute force on random graphs of up to 12 vertices (odd cycles included, so
        /// blossoms are contracted), sparse and dense; a "yes" comes with a perfect matching
        /// of the graph's edges.
        #[test]
        fn matches_brute_force(
            half in 1usize..7,
            edges in proptest::collection::vec(prop::bool::weighted(0.3), 78),
        ) {
            // Even vertex counts only: an odd count is refused before the search runs.
            let n = 2 * half;
            let mut adj = vec![0u64; n];
            let mut t = 0;
            for a in 0..n {
                for b in a + 1..n {
                    if edges[t] {
                        adj[a] |= 1 << b;
                        adj[b] |= 1 << a;
                    }
                    t += 1;
                }
            }
            let mut m = Matcher::new(n);
            let got = m.perfect(&adj);
            let full = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
            prop_assert_eq!(got, brute_force(&adj, full));
            if got {
                for (v, &nb) in adj.iter().enumerate() {
                    let u = m.mate[v];
                    prop_assert!(u < n && m.mate[u] == v && nb & (1 << u) != 0);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// At the sizes the searches use (up to 48 replicas, 64 the limit) with no brute force:
        /// a planted perfect matching under random extra edges is found (and the answer is a
        /// perfect matching of the graph's edges); cutting three vertices off into a component
        /// of their own (a triangle: odd) leaves none.
        #[test]
        fn large_graphs_with_a_planted_answer(
            half in 20usize..33,
            order in Just(()).prop_perturb(|_, mut rng| {
                let mut v: Vec<usize> = (0..64).collect();
                for i in (1..64).rev() {
                    v.swap(i, rng.random_range(0..=i));
                }
                v
            }),
            noise in proptest::collection::vec(prop::bool::weighted(0.08), 64 * 63 / 2),
        ) {
            let n = 2 * half;
            let order: Vec<usize> = order.into_iter().filter(|&v| v < n).collect();
            let mut adj = vec![0u64; n];
            let link = |adj: &mut [u64], a: usize, b: usize| {
                adj[a] |= 1 << b;
                adj[b] |= 1 << a;
            };
            let mut t = 0;
            for a in 0..n {
                for b in a + 1..n {
                    if noise[t] {
                        link(&mut adj, a, b);
                    }
                    t += 1;
                }
            }
            for pair in order.chunks(2) {
                link(&mut adj, pair[0], pair[1]);
            }
            let mut m = Matcher::new(n);
            prop_assert!(m.perfect(&adj));
            for (v, &nb) in adj.iter().enumerate() {
                let u = m.mate[v];
                prop_assert!(u < n && m.mate[u] == v && nb & (1 << u) != 0);
            }
            // Three vertices joined only to each other: an odd component.
            let cut: Vec<usize> = order[..3].to_vec();
            let mask: u64 = cut.iter().map(|&v| 1u64 << v).sum();
            for (v, nb) in adj.iter_mut().enumerate() {
                if cut.contains(&v) {
                    *nb = mask & !(1 << v);
                } else {
                    *nb &= !mask;
                }
            }
            prop_assert!(!m.perfect(&adj));
        }
    }

    /// Named cases: a triangle with a pendant vertex at each corner has a perfect matching
    /// (each corner with its pendant); two triangles apart have none (odd components), and
    /// neither has a star of three leaves with two more vertices joined.
    #[test]
    fn named_cases() {
        let graph = |n: usize, edges: &[(usize, usize)]| {
            let mut adj = vec![0u64; n];
            for &(a, b) in edges {
                adj[a] |= 1 << b;
                adj[b] |= 1 << a;
            }
            adj
        };
        let mut m = Matcher::new(6);
        let pendant = graph(6, &[(0, 1), (1, 2), (2, 0), (0, 3), (1, 4), (2, 5)]);
        assert!(m.perfect(&pendant));
        assert_eq!((m.mate[0], m.mate[1], m.mate[2]), (3, 4, 5));
        let apart = graph(6, &[(0, 1), (1, 2), (2, 0), (3, 4), (4, 5), (5, 3)]);
        assert!(!m.perfect(&apart));
        let star = graph(6, &[(0, 1), (0, 2), (0, 3), (4, 5)]);
        assert!(!m.perfect(&star));
    }
}
