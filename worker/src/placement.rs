//! Placement maps as the worker uses them, initial placements, and per-layer transfer plans.

use moe_api::PlacementDocument;
use moe_kernels::ReplicaMap;

use crate::config::{InitialPlacement, ModelShape};

/// One layer's maps, derived from its `phy2log` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerMap {
    pub phy2log: Vec<u32>,
    /// `log2phy` / `logcnt` in the kernels' form (replica choice by token hash).
    pub replicas: ReplicaMap,
}

impl LayerMap {
    pub fn new(phy2log: Vec<u32>, num_experts: usize) -> Result<LayerMap, String> {
        let replicas =
            ReplicaMap::from_phy2log(&phy2log, num_experts).map_err(|e| e.to_string())?;
        Ok(LayerMap { phy2log, replicas })
    }
}

/// A well-mixed 64-bit hash (SplitMix64 finaliser).
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Checks that a placement document fits the configured model shape.
pub fn check_shape(doc: &PlacementDocument, shape: &ModelShape) -> Result<(), String> {
    doc.validate()?;
    if doc.num_layers != shape.num_layers {
        return Err(format!(
            "placement has {} layers, the model {}",
            doc.num_layers, shape.num_layers
        ));
    }
    if doc.num_logical_experts != shape.num_experts {
        return Err(format!(
            "placement has {} logical experts, the model {}",
            doc.num_logical_experts, shape.num_experts
        ));
    }
    if doc.num_ranks != shape.world_size {
        return Err(format!(
            "placement is for {} ranks, the group has {}",
            doc.num_ranks, shape.world_size
        ));
    }
    if doc.num_slots() != shape.num_slots() {
        return Err(format!(
            "placement has {} slots per layer, the model {} (experts + redundant)",
            doc.num_slots(),
            shape.num_slots()
        ));
    }
    Ok(())
}

/// The planner's shape of this model.
pub fn eplb_shape(shape: &ModelShape, num_nodes: usize) -> Result<eplb::Shape, String> {
    eplb::Shape::new(
        shape.num_experts,
        shape.redundant,
        shape.world_size,
        num_nodes,
        shape.expert_groups,
    )
    .map_err(|e| e.to_string())
}

/// Initial placement (generation 0) by strategy, via the planner library.
pub fn initial_placement(
    strategy: InitialPlacement,
    shape: &ModelShape,
    num_nodes: usize,
) -> Result<PlacementDocument, String> {
    let strategy = match strategy {
        InitialPlacement::Linear => eplb::InitialStrategy::Linear,
        InitialPlacement::RoundRobin => eplb::InitialStrategy::RoundRobin,
        InitialPlacement::File => return Err("`file` placement has no built-in layout".into()),
    };
    let p = eplb::initial_placement(strategy, shape.num_layers, &eplb_shape(shape, num_nodes)?)
        .map_err(|e| e.to_string())?;
    let doc = p.to_document(0);
    check_shape(&doc, shape)?;
    Ok(doc)
}

/// Where a destination slot gets its new expert from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotSource {
    /// The slot keeps its expert.
    Keep,
    /// Copied from another slot on the same rank (same GPU).
    Local { src_slot: u32 },
    /// Received from `src_rank`'s `src_slot` (once per expert and destination rank).
    Remote { src_rank: usize, src_slot: u32 },
}

/// One remote transfer: `expert` from `src_rank` (its slot `src_slot`) to `dst_rank`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fetch {
    pub expert: u32,
    pub src_rank: usize,
    pub src_slot: u32,
    pub dst_rank: usize,
}

/// The transfer plan of one layer for the whole group (every rank computes the same plan).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerPlan {
    /// `sources[slot]` for every physical slot of the new placement.
    pub sources: Vec<SlotSource>,
    /// Remote transfers in a deterministic order.
    pub fetches: Vec<Fetch>,
    /// The new `phy2log` row.
    pub experts: Vec<u32>,
}

impl LayerPlan {
    /// Remote transfers that `rank` sends, in plan order.
    pub fn sends_of(&self, rank: usize) -> impl Iterator<Item = &Fetch> {
        self.fetches.iter().filter(move |f| f.src_rank == rank)
    }
    /// Remote transfers that `rank` receives, in plan order.
    pub fn recvs_of(&self, rank: usize) -> impl Iterator<Item = &Fetch> {
        self.fetches.iter().filter(move |f| f.dst_rank == rank)
    }
    /// Slots (global indices) whose expert changes.
    pub fn changed_slots(&self) -> usize {
        self.sources
            .iter()
            .filter(|s| !matches!(s, SlotSource::Keep))
            .count()
    }
}

/// Computes the transfer plan from `old` to `new` for one layer: every expert a rank needs and
/// does not hold comes from exactly one holder, on the same rank first, the same node next,
/// another node last; among equal candidates the one with the fewest sends so far, then the
/// lowest rank.
pub fn plan_layer(old: &[u32], new: &[u32], world: usize, ranks_per_node: usize) -> LayerPlan {
    let spr = old.len() / world.max(1);
    let rank_of = |slot: usize| slot / spr;
    let mut sources = vec![SlotSource::Keep; new.len()];
    let mut fetches: Vec<Fetch> = Vec::new();
    let mut sends = vec![0usize; world];
    for (slot, &e) in new.iter().enumerate() {
        if old[slot] == e {
            continue;
        }
        let dst = rank_of(slot);
        let local = (dst * spr..(dst + 1) * spr).find(|&s| old[s] == e);
        if let Some(s) = local {
            sources[slot] = SlotSource::Local { src_slot: s as u32 };
            continue;
        }
        if let Some(f) = fetches.iter().find(|f| f.dst_rank == dst && f.expert == e) {
            sources[slot] = SlotSource::Remote {
                src_rank: f.src_rank,
                src_slot: f.src_slot,
            };
            continue;
        }
        let node = dst / ranks_per_node.max(1);
        let best = old
            .iter()
            .enumerate()
            .filter(|&(_, &x)| x == e)
            .map(|(s, _)| (s, rank_of(s)))
            .min_by_key(|&(s, r)| {
                let other_node = usize::from(r / ranks_per_node.max(1) != node);
                (other_node, sends[r], r, s)
            });
        let Some((src_slot, src_rank)) = best else {
            // The old placement does not hold the expert at all: cannot happen for validated
            // placements (every expert is served).
            continue;
        };
        sends[src_rank] += 1;
        fetches.push(Fetch {
            expert: e,
            src_rank,
            src_slot: src_slot as u32,
            dst_rank: dst,
        });
        sources[slot] = SlotSource::Remote {
            src_rank,
            src_slot: src_slot as u32,
        };
    }
    LayerPlan {
        sources,
        fetches,
        experts: new.to_vec(),
    }
}

/// Parses a placement file: a [`PlacementDocument`] (camelCase, with its generation) or a
/// vllm-ascend expert map (`{"moe_layer_count": L, "layer_list": [...]}`, generation 0).
pub fn parse_placement_file(
    text: &str,
    shape: &ModelShape,
    num_nodes: usize,
) -> Result<PlacementDocument, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let doc = if value.get("layer_list").is_some() {
        eplb::Placement::from_ascend_expert_map(&value, Some(shape.num_experts), num_nodes)
            .map_err(|e| e.to_string())?
            .to_document(0)
    } else {
        let doc: PlacementDocument =
            serde_json::from_value(value).map_err(|e| format!("bad placement document: {e}"))?;
        eplb::Placement::from_document(&doc).map_err(|e| e.to_string())?;
        doc
    };
    check_shape(&doc, shape)?;
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Scoring;

    fn shape(e: usize, r: usize, g: usize) -> ModelShape {
        ModelShape {
            num_layers: 2,
            num_experts: e,
            hidden: 8,
            intermediate: 8,
            top_k: 2,
            expert_groups: 1,
            topk_groups: 1,
            scoring: Scoring::Softmax,
            redundant: r,
            world_size: g,
            expert_bias: false,
        }
    }

    #[test]
    fn initial_placements_serve_every_expert() {
        for (e, r, g) in [(16, 0, 4), (10, 2, 4), (7, 1, 2), (8, 8, 4), (5, 3, 8)] {
            for s in [InitialPlacement::Linear, InitialPlacement::RoundRobin] {
                let doc = initial_placement(s, &shape(e, r, g), 1).unwrap();
                assert_eq!(doc.num_slots(), e + r);
            }
        }
        let rr = initial_placement(InitialPlacement::RoundRobin, &shape(8, 0, 4), 1).unwrap();
        assert_eq!(rr.phy2log[0], vec![0, 4, 1, 5, 2, 6, 3, 7]);
        let lin = initial_placement(InitialPlacement::Linear, &shape(8, 0, 4), 1).unwrap();
        assert_eq!(lin.phy2log[0], vec![0, 1, 2, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn placement_files_in_both_formats() {
        let s = shape(4, 0, 2);
        let doc = initial_placement(InitialPlacement::RoundRobin, &s, 1).unwrap();
        let text = serde_json::to_string(&doc).unwrap();
        assert_eq!(parse_placement_file(&text, &s, 1).unwrap(), doc);
        let ascend = r#"{"moe_layer_count": 2, "layer_list": [
            {"layer_id": 0, "device_count": 2, "device_list": [
                {"device_id": 1, "device_expert": [2, 3]}, {"device_id": 0, "device_expert": [1, 0]}]},
            {"layer_id": 1, "device_count": 2, "device_list": [
                {"device_id": 0, "device_expert": [0, 1]}, {"device_id": 1, "device_expert": [2, 3]}]}]}"#;
        // Devices are read by list position, as vllm-ascend does (device_id is not read).
        let doc = parse_placement_file(ascend, &s, 1).unwrap();
        assert_eq!(doc.phy2log, vec![vec![2, 3, 1, 0], vec![0, 1, 2, 3]]);
        // A device listing an expert twice: vllm-ascend would serve it from one slot only.
        let err =
            parse_placement_file(&ascend.replace("[2, 3]}]}]}", "[2, 2]}]}]}"), &s, 1).unwrap_err();
        assert!(err.contains("lists expert 2 twice"), "{err}");
    }

    #[test]
    fn plan_prefers_same_rank_then_same_node() {
        // 4 ranks, 2 per node, 2 slots per rank.
        let old = [0, 1, 2, 3, 4, 5, 6, 0];
        let new = [1, 0, 2, 3, 4, 5, 6, 0];
        let p = plan_layer(&old, &new, 4, 2);
        assert_eq!(p.sources[0], SlotSource::Local { src_slot: 1 });
        assert!(p.fetches.is_empty());
        // Rank 1 (node 0) needs expert 0: held by rank 0 (node 0) and rank 3 (node 1).
        let new = [0, 1, 0, 3, 4, 5, 6, 0];
        let p = plan_layer(&old, &new, 4, 2);
        assert_eq!(
            p.fetches,
            vec![Fetch {
                expert: 0,
                src_rank: 0,
                src_slot: 0,
                dst_rank: 1
            }]
        );
        // Rank 2 (node 1) needs expert 0: rank 3 is on its node.
        let new = [0, 1, 2, 3, 0, 5, 6, 0];
        let p = plan_layer(&old, &new, 4, 2);
        assert_eq!(p.fetches[0].src_rank, 3);
    }

    #[test]
    fn plan_fetches_each_expert_once_per_rank() {
        let old = [0, 1, 2, 3];
        let new = [0, 1, 3, 3];
        let p = plan_layer(&old, &new, 2, 2);
        assert_eq!(p.sources[2], SlotSource::Local { src_slot: 3 });
        let old = [0, 1, 2, 3];
        let new = [0, 0, 2, 3];
        let p = plan_layer(&old, &new, 2, 2);
        assert_eq!(p.sources[1], SlotSource::Local { src_slot: 0 });
        let old = [0, 1, 2, 3, 4, 5];
        let new = [0, 1, 2, 3, 0, 0];
        let p = plan_layer(&old, &new, 3, 3);
        assert_eq!(p.fetches.len(), 1);
        assert_eq!(p.sources[4], p.sources[5]);
    }
}
