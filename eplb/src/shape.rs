//! The shape of one MoE layer's expert-parallel deployment.

use serde::{Deserialize, Serialize};

use crate::error::{EplbError, Result};

/// E logical experts, R redundant slots, G ranks on N nodes, K expert groups.
///
/// A layer has `E + R` physical slots, `S = (E + R) / G` on every rank; rank `r` holds slots
/// `r*S .. r*S + S`. `num_groups == 1` means no grouped routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Shape {
    pub num_experts: usize,
    pub num_redundant: usize,
    pub num_ranks: usize,
    pub num_nodes: usize,
    pub num_groups: usize,
}

/// The smallest `R >= 0` such that `num_experts + R` is divisible by `num_ranks`.
///
/// Returns 0 when `num_ranks` is 0 (such a shape is refused anyway).
pub fn smallest_valid_redundant(num_experts: usize, num_ranks: usize) -> usize {
    if num_ranks == 0 {
        return 0;
    }
    (num_ranks - num_experts % num_ranks) % num_ranks
}

/// The smallest `R' >= r` such that `num_experts + R'` is divisible by `num_ranks`.
pub fn next_valid_redundant(num_experts: usize, r: usize, num_ranks: usize) -> usize {
    if num_ranks == 0 {
        return r;
    }
    r + (num_ranks - (num_experts + r) % num_ranks) % num_ranks
}

impl Shape {
    /// Builds and validates a shape.
    ///
    /// Refuses zero experts/ranks/nodes/groups, nodes that do not divide ranks, groups that do
    /// not divide experts, and `E + R` not divisible by `G` (the error names the smallest
    /// valid R and the nearest valid R above the one given).
    pub fn new(
        num_experts: usize,
        num_redundant: usize,
        num_ranks: usize,
        num_nodes: usize,
        num_groups: usize,
    ) -> Result<Shape> {
        let shape = Shape {
            num_experts,
            num_redundant,
            num_ranks,
            num_nodes,
            num_groups,
        };
        shape.validate()?;
        Ok(shape)
    }

    /// Checks the invariants [`Shape::new`] enforces (for shapes built by struct literal or
    /// deserialised).
    pub fn validate(&self) -> Result<()> {
        let err = |m: String| Err(EplbError::Shape(m));
        if self.num_experts == 0 {
            return err("the number of experts must be at least 1".into());
        }
        if self.num_ranks == 0 {
            return err("the number of ranks must be at least 1".into());
        }
        if self.num_nodes == 0 {
            return err("the number of nodes must be at least 1".into());
        }
        if self.num_groups == 0 {
            return err("the number of expert groups must be at least 1 (1 = no groups)".into());
        }
        if !self.num_ranks.is_multiple_of(self.num_nodes) {
            return err(format!(
                "{} ranks cannot be split evenly over {} nodes",
                self.num_ranks, self.num_nodes
            ));
        }
        if !self.num_experts.is_multiple_of(self.num_groups) {
            return err(format!(
                "{} experts cannot be split evenly into {} groups",
                self.num_experts, self.num_groups
            ));
        }
        let slots = self.num_experts.checked_add(self.num_redundant);
        let Some(slots) = slots else {
            return err(format!(
                "{} redundant experts is too many",
                self.num_redundant
            ));
        };
        if slots % self.num_ranks != 0 {
            let smallest = smallest_valid_redundant(self.num_experts, self.num_ranks);
            let next = next_valid_redundant(self.num_experts, self.num_redundant, self.num_ranks);
            return err(format!(
                "{} experts + {} redundant = {} slots cannot be split evenly over {} ranks; \
                 the smallest valid number of redundant experts is {} (nearest above {}: {})",
                self.num_experts,
                self.num_redundant,
                slots,
                self.num_ranks,
                smallest,
                self.num_redundant,
                next
            ));
        }
        if slots > (1 << 24) {
            return err(format!(
                "{slots} slots per layer is more than this planner supports"
            ));
        }
        Ok(())
    }

    /// Physical slots per layer, `E + R`.
    pub fn slots(&self) -> usize {
        self.num_experts + self.num_redundant
    }

    /// Slots on each rank, `S = (E + R) / G`.
    pub fn slots_per_rank(&self) -> usize {
        self.slots() / self.num_ranks.max(1)
    }

    /// Ranks (GPUs) per node.
    pub fn ranks_per_node(&self) -> usize {
        self.num_ranks / self.num_nodes.max(1)
    }

    /// Experts per expert group.
    pub fn experts_per_group(&self) -> usize {
        self.num_experts / self.num_groups.max(1)
    }

    /// True when a rank must hold two replicas of one expert (`S > E`).
    pub fn duplicates_forced(&self) -> bool {
        self.slots_per_rank() > self.num_experts
    }

    /// The most replicas one expert may get: `G` when no rank may hold two replicas of it,
    /// otherwise every slot not needed by the other experts.
    pub fn max_replicas(&self) -> usize {
        if self.duplicates_forced() {
            self.slots() - (self.num_experts - 1)
        } else {
            self.num_ranks.min(self.slots() - (self.num_experts - 1))
        }
    }

    /// Whether the hierarchical (node, then rank) variant of greedy applies: more than one
    /// node, more than one group, and groups divide evenly over nodes.
    pub fn hierarchical(&self) -> bool {
        self.num_nodes > 1 && self.num_groups > 1 && self.num_groups.is_multiple_of(self.num_nodes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smallest_valid_redundant_values() {
        assert_eq!(smallest_valid_redundant(256, 32), 0);
        assert_eq!(smallest_valid_redundant(10, 4), 2);
        assert_eq!(smallest_valid_redundant(3, 8), 5);
        assert_eq!(next_valid_redundant(256, 5, 32), 32);
    }

    #[test]
    fn refuses_indivisible_slots_naming_r() {
        let err = Shape::new(256, 5, 32, 4, 8).unwrap_err().to_string();
        assert!(
            err.contains("smallest valid number of redundant experts is 0"),
            "{err}"
        );
        assert!(err.contains("nearest above 5: 32"), "{err}");
        let err = Shape::new(10, 0, 4, 1, 1).unwrap_err().to_string();
        assert!(err.contains("is 2"), "{err}");
    }

    #[test]
    fn refuses_zero_and_uneven() {
        assert!(Shape::new(8, 0, 0, 1, 1).is_err());
        assert!(Shape::new(0, 8, 4, 1, 1).is_err());
        assert!(Shape::new(8, 0, 4, 3, 1).is_err());
        assert!(Shape::new(8, 0, 4, 1, 3).is_err());
        assert!(Shape::new(8, 0, 4, 0, 1).is_err());
    }

    #[test]
    fn derived_counts() {
        let s = Shape::new(256, 32, 32, 4, 8).unwrap();
        assert_eq!(s.slots(), 288);
        assert_eq!(s.slots_per_rank(), 9);
        assert_eq!(s.ranks_per_node(), 8);
        assert_eq!(s.max_replicas(), 32);
        assert!(s.hierarchical());
        assert!(!s.duplicates_forced());
        let tiny = Shape::new(2, 6, 2, 1, 1).unwrap();
        assert!(tiny.duplicates_forced());
        assert_eq!(tiny.max_replicas(), 7);
    }
}
