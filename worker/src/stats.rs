//! Load statistics: per layer and physical slot token counts over a sliding window of rounds,
//! the per-layer peak-to-average ratio, and the load history in the `moectl` format.
//!
//! A round is one collective pass over a layer: with the generator every step is a round of
//! every layer; with the forward API a round serves the layers that had rows pending, so each
//! layer's window holds that layer's newest rounds (every rank takes part in each, with zero
//! rows or more, so every rank counts the same rounds).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

/// Sliding window of per-step slot counts. A layer's window restarts when the layer switches
/// placement (slot numbers then mean other experts).
#[derive(Debug, Clone)]
pub struct Window {
    size: usize,
    layers: Vec<LayerWindow>,
}

#[derive(Debug, Clone)]
struct LayerWindow {
    steps: VecDeque<Vec<u32>>,
    /// The group step (round) of each entry of `steps`.
    rounds: VecDeque<u64>,
    sums: Vec<u64>,
}

impl Window {
    pub fn new(size: usize, num_layers: usize, num_slots: usize) -> Window {
        Window {
            size: size.max(1),
            layers: vec![
                LayerWindow {
                    steps: VecDeque::new(),
                    rounds: VecDeque::new(),
                    sums: vec![0; num_slots],
                };
                num_layers
            ],
        }
    }

    /// Records group step `step`'s counts `[layer][slot]` (a round of every layer).
    pub fn record(&mut self, step: u64, counts: &[Vec<u32>]) {
        for (l, c) in counts.iter().enumerate() {
            self.record_layer(l, step, c);
        }
    }

    /// Records one round of `layer`, in group step `step`: its slot counts.
    pub fn record_layer(&mut self, layer: usize, step: u64, counts: &[u32]) {
        let size = self.size;
        let Some(w) = self.layers.get_mut(layer) else {
            return;
        };
        for (s, v) in w.sums.iter_mut().zip(counts) {
            *s += u64::from(*v);
        }
        w.steps.push_back(counts.to_vec());
        w.rounds.push_back(step);
        if w.steps.len() > size
            && let Some(old) = w.steps.pop_front()
        {
            w.rounds.pop_front();
            for (s, v) in w.sums.iter_mut().zip(&old) {
                *s -= u64::from(*v);
            }
        }
    }

    /// The oldest group step any layer's window holds (`None` while every window is empty).
    /// With the forward API a layer's window can reach far further back than `size` group
    /// steps (its rounds are those that served it), so this, not the current step minus the
    /// window size, says which closed windows share steps with the current one.
    pub fn first_step(&self) -> Option<u64> {
        self.layers
            .iter()
            .filter_map(|w| w.rounds.front())
            .min()
            .copied()
    }

    /// Forgets a layer's counts (after its placement changed).
    pub fn reset_layer(&mut self, layer: usize) {
        if let Some(w) = self.layers.get_mut(layer) {
            w.steps.clear();
            w.rounds.clear();
            w.sums.iter_mut().for_each(|s| *s = 0);
        }
    }

    /// Rounds in the window (the minimum over layers).
    pub fn steps(&self) -> usize {
        self.layers.iter().map(|w| w.steps.len()).min().unwrap_or(0)
    }

    /// Window sums `[layer][slot]`.
    pub fn sums(&self) -> Vec<Vec<f64>> {
        self.layers
            .iter()
            .map(|w| w.sums.iter().map(|&v| v as f64).collect())
            .collect()
    }

    pub fn layer_sums(&self, layer: usize) -> &[u64] {
        &self.layers[layer].sums
    }
}

/// Peak-to-average ratio of rank loads given slot counts of one layer (1.0 when idle).
pub fn par(slot_counts: &[f64], num_ranks: usize) -> f64 {
    if num_ranks == 0 || slot_counts.is_empty() {
        return 1.0;
    }
    let spr = slot_counts.len() / num_ranks;
    let loads: Vec<f64> = slot_counts
        .chunks(spr.max(1))
        .map(|c| c.iter().sum())
        .collect();
    let total: f64 = loads.iter().sum();
    if total <= 0.0 {
        return 1.0;
    }
    let max = loads.iter().copied().fold(0.0, f64::max);
    max / (total / num_ranks as f64)
}

/// Closed past windows of logical expert counts for `GET /v1/load?history=N` (the operator
/// plans from several windows, as `moectl` does from a load file). Tumbling windows of
/// `steps_per_window` steps that close at multiples of it in the group's step count, so every
/// rank closes the same windows; the newest `keep` are kept.
#[derive(Debug, Clone)]
pub struct Episodes {
    steps_per_window: u64,
    keep: usize,
    current: Vec<Vec<f64>>,
    steps_in_current: u64,
    closed: VecDeque<moe_api::LoadEpisode>,
}

impl Episodes {
    pub fn new(
        steps_per_window: usize,
        keep: usize,
        num_layers: usize,
        num_experts: usize,
    ) -> Self {
        Episodes {
            steps_per_window: steps_per_window.max(1) as u64,
            keep,
            current: vec![vec![0.0; num_experts]; num_layers],
            steps_in_current: 0,
            closed: VecDeque::new(),
        }
    }

    /// Adds step `step`'s logical counts `[layer][expert]`.
    pub fn record(&mut self, step: u64, logical: &[Vec<f64>]) {
        for (l, row) in logical.iter().enumerate() {
            self.add_layer(l, row);
        }
        self.end_step(step);
    }

    /// Adds one layer's logical counts to the current window (a round of that layer).
    pub fn add_layer(&mut self, layer: usize, logical: &[f64]) {
        if let Some(acc) = self.current.get_mut(layer) {
            acc.iter_mut().zip(logical).for_each(|(a, v)| *a += v);
        }
    }

    /// Ends the group's step (round) `step`: windows close at multiples of the window size.
    pub fn end_step(&mut self, step: u64) {
        self.steps_in_current += 1;
        let end_step = step + 1;
        if end_step.is_multiple_of(self.steps_per_window) {
            let fresh =
                vec![vec![0.0; self.current.first().map_or(0, Vec::len)]; self.current.len()];
            // A window this rank saw only part of (it started mid-window) is not comparable
            // with the other ranks' and is dropped.
            if self.steps_in_current == self.steps_per_window && self.keep > 0 {
                self.closed.push_back(moe_api::LoadEpisode {
                    end_step,
                    steps: self.steps_in_current,
                    logical_counts: std::mem::replace(&mut self.current, fresh),
                });
                while self.closed.len() > self.keep {
                    self.closed.pop_front();
                }
            } else {
                self.current = fresh;
            }
            self.steps_in_current = 0;
        }
    }

    /// The newest `n` closed windows, oldest first.
    pub fn newest(&self, n: usize) -> Vec<moe_api::LoadEpisode> {
        let skip = self.closed.len().saturating_sub(n);
        self.closed.iter().skip(skip).cloned().collect()
    }
}

/// The `moectl` load file: `{"windows": [W][L][E]}` logical expert token counts.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct LoadHistoryFile {
    pub windows: Vec<Vec<Vec<f64>>>,
}

/// Accumulates logical counts and writes one window entry every `steps_per_entry` steps.
pub struct LoadHistory {
    path: PathBuf,
    steps_per_entry: u64,
    max_entries: usize,
    current: Vec<Vec<f64>>,
    steps_in_current: u64,
    file: LoadHistoryFile,
}

impl LoadHistory {
    pub fn new(path: &Path, steps_per_entry: u64, num_layers: usize, num_experts: usize) -> Self {
        LoadHistory {
            path: path.to_path_buf(),
            steps_per_entry: steps_per_entry.max(1),
            max_entries: 10_000,
            current: vec![vec![0.0; num_experts]; num_layers],
            steps_in_current: 0,
            file: LoadHistoryFile {
                windows: Vec::new(),
            },
        }
    }

    /// Adds one step's logical counts `[layer][expert]`; writes the file when an entry completes.
    pub fn add(&mut self, logical: &[Vec<f64>]) -> Result<()> {
        for (acc, row) in self.current.iter_mut().zip(logical) {
            for (a, v) in acc.iter_mut().zip(row) {
                *a += v;
            }
        }
        self.steps_in_current += 1;
        if self.steps_in_current >= self.steps_per_entry {
            let fresh =
                vec![vec![0.0; self.current.first().map_or(0, Vec::len)]; self.current.len()];
            let entry = std::mem::replace(&mut self.current, fresh);
            self.steps_in_current = 0;
            self.file.windows.push(entry);
            if self.file.windows.len() > self.max_entries {
                self.file.windows.remove(0);
            }
            self.write()?;
        }
        Ok(())
    }

    pub fn write(&self) -> Result<()> {
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&self.file)?)
            .with_context(|| format!("writing {tmp:?}"))?;
        std::fs::rename(&tmp, &self.path).with_context(|| format!("renaming to {:?}", self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_slides_and_resets() {
        let mut w = Window::new(2, 2, 2);
        assert_eq!(w.first_step(), None);
        w.record(0, &[vec![1, 2], vec![3, 4]]);
        w.record(1, &[vec![1, 0], vec![0, 0]]);
        w.record(2, &[vec![5, 0], vec![0, 1]]);
        assert_eq!(w.sums(), vec![vec![6.0, 0.0], vec![0.0, 1.0]]);
        assert_eq!(w.steps(), 2);
        assert_eq!(w.first_step(), Some(1));
        w.reset_layer(1);
        assert_eq!(w.steps(), 0);
        assert_eq!(w.layer_sums(1), &[0, 0]);
        assert_eq!(w.layer_sums(0), &[6, 0]);
        assert_eq!(w.first_step(), Some(1), "layer 0 still holds steps 1 and 2");
        // Layers served unevenly: each layer's window holds its own newest rounds, so the
        // window reaches back to the oldest round of the least served layer.
        let mut w = Window::new(2, 2, 2);
        w.record_layer(1, 0, &[0, 4]);
        for step in 1..4 {
            w.record_layer(0, step, &[1, 0]);
        }
        assert_eq!(w.steps(), 1);
        assert_eq!(w.sums(), vec![vec![2.0, 0.0], vec![0.0, 4.0]]);
        assert_eq!(w.first_step(), Some(0));
    }

    #[test]
    fn episodes_close_at_multiples_of_the_window_and_keep_the_newest() {
        let mut e = Episodes::new(2, 2, 1, 2);
        // Started mid-window (step 1): the first window is partial and dropped.
        e.record(1, &[vec![9.0, 9.0]]);
        assert!(e.newest(4).is_empty());
        for step in 2..8 {
            e.record(step, &[vec![step as f64, 1.0]]);
        }
        let h = e.newest(4);
        assert_eq!(h.len(), 2);
        assert_eq!((h[0].end_step, h[1].end_step), (6, 8));
        assert_eq!(h[1].logical_counts, vec![vec![13.0, 2.0]]);
        assert_eq!(h[1].steps, 2);
        assert_eq!(e.newest(1)[0].end_step, 8);
    }

    #[test]
    fn par_of_rank_loads() {
        assert_eq!(par(&[1.0, 1.0, 1.0, 1.0], 2), 1.0);
        assert_eq!(par(&[3.0, 1.0, 0.0, 0.0], 2), 2.0);
        assert_eq!(par(&[0.0, 0.0], 2), 1.0);
    }

    #[test]
    fn history_writes_windows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("load.json");
        let mut h = LoadHistory::new(&path, 2, 1, 3);
        h.add(&[vec![1.0, 0.0, 0.0]]).unwrap();
        assert!(!path.exists());
        h.add(&[vec![1.0, 2.0, 0.0]]).unwrap();
        h.add(&[vec![0.0, 0.0, 1.0]]).unwrap();
        h.add(&[vec![0.0, 0.0, 1.0]]).unwrap();
        let f: LoadHistoryFile = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(
            f.windows,
            vec![vec![vec![2.0, 2.0, 0.0]], vec![vec![0.0, 0.0, 2.0]]]
        );
    }
}
