//! Staging a remap layer on the host: what the CPU backend does while forward passes go on.
//!
//! A side thread sends the experts other ranks fetch from this rank and receives the ones this
//! rank fetches, over the comm backend's remap channel (TCP), and describes this rank's new
//! slots. The executor switches to them at the step boundary the group agrees on. (The CUDA
//! backend stages on the device instead: `cuda_exec`.)

use std::collections::HashMap;
use std::sync::{Arc, mpsc};
use std::time::Instant;

use anyhow::{Result, anyhow, bail};

use crate::comm::{CHAN_REMAP, Comm};
use crate::config::ModelShape;
use crate::placement::{LayerPlan, SlotSource};
use crate::weights::{ExpertWeights, expert_from_bytes, expert_to_bytes};

/// What one rank moved for one layer (reported in progress and metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageStats {
    /// Seconds the transfers took on this rank (sends and receives, not the switch).
    pub transfer_seconds: f64,
    /// Bytes this rank received.
    pub bytes: u64,
    /// This rank's slots whose expert changed (received or copied locally).
    pub moved: u64,
}

/// A layer slot's weights after staging, relative to the layer as served now.
#[derive(Clone)]
pub enum StagedSlot {
    /// Unchanged.
    Keep,
    /// Copy of the current weights of another local slot (same GPU).
    Local(usize),
    /// Received from another rank.
    Received(Arc<ExpertWeights>),
}

/// Weights staged for one layer of a remap.
pub struct Staged {
    /// One entry per local slot.
    pub slots: Vec<StagedSlot>,
    pub stats: StageStats,
}

/// The local slots `rank` sends in `plan`.
pub fn send_slots(plan: &LayerPlan, rank: usize, spr: usize) -> Vec<usize> {
    let mut v: Vec<usize> = plan
        .sends_of(rank)
        .map(|f| f.src_slot as usize - rank * spr)
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Stages one layer's incoming weights on `rank`: sends the experts other ranks fetch from it
/// (`sends`, by local slot), receives the ones it fetches, and describes its new slots.
pub fn stage_layer(
    comm: &Comm,
    plan: &LayerPlan,
    sends: &HashMap<usize, Arc<ExpertWeights>>,
    rank: usize,
    shape: &ModelShape,
) -> Result<Staged> {
    let spr = shape.slots_per_rank();
    let base = rank * spr;
    let t0 = Instant::now();
    for f in plan.sends_of(rank) {
        let w = sends
            .get(&(f.src_slot as usize - base))
            .ok_or_else(|| anyhow!("plan sends slot {} not staged by rank {rank}", f.src_slot))?;
        comm.send_chunked(f.dst_rank, CHAN_REMAP, &expert_to_bytes(w))?;
    }
    let mut received: HashMap<u32, Arc<ExpertWeights>> = HashMap::new();
    let mut bytes = 0u64;
    for f in plan.recvs_of(rank) {
        let data = comm.recv_len(f.src_rank, CHAN_REMAP, shape.expert_bytes())?;
        bytes += data.len() as u64;
        received.insert(f.expert, Arc::new(expert_from_bytes(&data, shape)?));
    }
    let transfer_seconds = t0.elapsed().as_secs_f64();
    let mut slots = Vec::with_capacity(spr);
    let mut moved = 0;
    for s in base..base + spr {
        slots.push(match plan.sources[s] {
            SlotSource::Keep => StagedSlot::Keep,
            SlotSource::Local { src_slot } => {
                moved += 1;
                StagedSlot::Local(src_slot as usize - base)
            }
            SlotSource::Remote { .. } => {
                moved += 1;
                let expert = plan.experts[s];
                StagedSlot::Received(
                    received
                        .get(&expert)
                        .cloned()
                        .ok_or_else(|| anyhow!("expert {expert} was not received"))?,
                )
            }
        });
    }
    Ok(Staged {
        slots,
        stats: StageStats {
            transfer_seconds,
            bytes,
            moved,
        },
    })
}

/// One layer being staged by a side thread.
pub struct HostStaging {
    pub layer: usize,
    rx: mpsc::Receiver<Result<Staged>>,
    result: Option<Staged>,
}

impl HostStaging {
    /// Starts [`stage_layer`] on a thread of its own.
    pub fn start(
        comm: Arc<Comm>,
        layer: usize,
        plan: LayerPlan,
        sends: HashMap<usize, Arc<ExpertWeights>>,
        shape: ModelShape,
    ) -> Result<HostStaging> {
        let (tx, rx) = mpsc::channel();
        let rank = comm.rank();
        std::thread::Builder::new()
            .name(format!("stage-layer-{layer}"))
            .spawn(move || {
                let _ = tx.send(stage_layer(&comm, &plan, &sends, rank, &shape));
            })?;
        Ok(HostStaging {
            layer,
            rx,
            result: None,
        })
    }

    /// Whether the thread has finished; with `wait`, blocks until it has. A failed staging
    /// is an error.
    pub fn finished(&mut self, wait: bool) -> Result<bool> {
        if self.result.is_some() {
            return Ok(true);
        }
        let got = if wait {
            self.rx
                .recv()
                .map_err(|_| anyhow!("the staging thread of layer {} died", self.layer))?
        } else {
            match self.rx.try_recv() {
                Ok(r) => r,
                Err(mpsc::TryRecvError::Empty) => return Ok(false),
                Err(mpsc::TryRecvError::Disconnected) => {
                    bail!("the staging thread of layer {} died", self.layer)
                }
            }
        };
        self.result = Some(got?);
        Ok(true)
    }

    /// The staged slots (after [`HostStaging::finished`] said true).
    pub fn take(self) -> Result<Staged> {
        self.result
            .ok_or_else(|| anyhow!("layer {} switched before it was staged", self.layer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::tests::group;
    use crate::config::Scoring;
    use crate::placement::plan_layer;
    use crate::weights::synthetic_expert;

    #[test]
    fn staging_moves_each_needed_expert_once_from_one_holder() {
        let shape = ModelShape {
            num_layers: 1,
            num_experts: 4,
            hidden: 8,
            intermediate: 4,
            top_k: 2,
            expert_groups: 1,
            topk_groups: 1,
            scoring: Scoring::Softmax,
            redundant: 2,
            world_size: 3,
            expert_bias: false,
        };
        let old: Vec<u32> = vec![0, 1, 2, 3, 0, 1];
        let new: Vec<u32> = vec![3, 1, 2, 2, 0, 0];
        let plan = plan_layer(&old, &new, 3, 3);
        let handles: Vec<_> = group(3)
            .into_iter()
            .map(|(comm, _)| {
                let plan = plan.clone();
                let old = old.clone();
                std::thread::spawn(move || {
                    let rank = comm.rank();
                    let spr = shape.slots_per_rank();
                    let sends = send_slots(&plan, rank, spr)
                        .into_iter()
                        .map(|s| {
                            (
                                s,
                                Arc::new(synthetic_expert(1, 0, old[rank * spr + s], &shape)),
                            )
                        })
                        .collect();
                    let comm = Arc::new(comm);
                    let mut st = HostStaging::start(comm.clone(), 0, plan, sends, shape).unwrap();
                    assert!(st.finished(true).unwrap());
                    // Keep the links open until every rank is done.
                    (rank, st.take(), comm)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for (rank, staged, _) in &results {
            let (rank, staged) = (*rank, staged.as_ref().unwrap());
            for (i, slot) in staged.slots.iter().enumerate() {
                let s = rank * 2 + i;
                match slot {
                    StagedSlot::Keep => assert_eq!(old[s], new[s]),
                    StagedSlot::Local(j) => assert_eq!(old[rank * 2 + j], new[s]),
                    StagedSlot::Received(w) => {
                        assert_eq!(**w, synthetic_expert(1, 0, new[s], &shape));
                    }
                }
            }
            // Only rank 0 receives (expert 3, from rank 1); ranks 1 and 2 copy locally.
            let want_bytes = if rank == 0 {
                shape.expert_bytes() as u64
            } else {
                0
            };
            assert_eq!(staged.stats.bytes, want_bytes, "rank {rank}");
            assert_eq!(staged.stats.moved, 1, "rank {rank}");
        }
    }
}
