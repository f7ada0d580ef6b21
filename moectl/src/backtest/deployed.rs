//! The recorded deployment's own settings (`moectl record --deployment` keeps its
//! `spec.eplb`): replayed as one more operator row, and set against the lowest operator row, so
//! that a backtest says what the settings in use cost on the deployment's own traffic.

use eplb::bench::rolling::{RollingRow, Trigger};

use super::sweep::{OPERATOR_MAX_HISTORY, Replay, best, trigger_of};
use crate::record::RecordedEplb;

/// The row that remaps nothing (`spec.eplb.enabled: false` or `paused`).
const KEEP_ROW: &str = "keep the starting placement";

pub struct Deployed {
    /// `namespace/name`.
    pub name: String,
    pub eplb: RecordedEplb,
}

impl Deployed {
    /// The operator trigger these settings replay as; none when they remap nothing.
    pub fn trigger(&self) -> Option<Trigger> {
        (self.eplb.enabled && !self.eplb.paused).then_some(Trigger {
            threshold: self.eplb.imbalance_threshold,
            hysteresis: self.eplb.hysteresis,
            max_layers: Some(self.eplb.max_layers_per_remap),
        })
    }

    /// What the replay of these settings leaves out, or where they share another row.
    pub fn notes(&self, triggers: &[Trigger]) -> Vec<String> {
        let mut out = Vec::new();
        let e = &self.eplb;
        let Some(mine) = self.trigger() else {
            return out;
        };
        if let Some(t) = triggers
            .iter()
            .find(|t| t.label() == mine.label() && **t != mine)
        {
            out.push(format!(
                "{}'s settings (imbalanceThreshold {}, hysteresis {}) round to the row \"{}\" \
                 (labels to two decimals): its figures are that row's",
                self.name,
                e.imbalance_threshold,
                e.hysteresis,
                t.label()
            ));
        }
        if e.algorithm != "joint" {
            // (Only where it remaps: paused or disabled settings returned above.)
            out.push(format!(
                "{} plans with {}; its row replays joint behind the same trigger",
                self.name, e.algorithm
            ));
        }
        if e.max_moves_per_layer.is_some() || e.max_bytes_per_remap.is_some() {
            out.push(format!(
                "{}'s maxMovesPerLayer / maxBytesPerRemap are not replayed: its row moves what \
                 the trigger accepts",
                self.name
            ));
        }
        out
    }

    /// The settings in the CRD's terms.
    fn describe(&self) -> String {
        let e = &self.eplb;
        if !e.enabled || e.paused {
            return format!(
                "spec.eplb.{}: no remap",
                if e.enabled { "paused" } else { "enabled false" }
            );
        }
        format!(
            "historyWindows {}, imbalanceThreshold {}, hysteresis {}, maxLayersPerRemap {}",
            e.history_windows, e.imbalance_threshold, e.hysteresis, e.max_layers_per_remap
        )
    }

    /// Its row: the trigger's at `historyWindows` (or keeping the start when it remaps
    /// nothing); `None` when that history was not replayed.
    fn row<'a>(&self, replays: &'a [Replay]) -> Option<&'a RollingRow> {
        match self.trigger() {
            Some(t) => {
                let label = t.label();
                replays
                    .iter()
                    .find(|r| r.history == self.eplb.history_windows)?
                    .rows
                    .iter()
                    .find(|row| row.algorithm == label)
            }
            // Its history's replay where there is one (without a recorded start the keep row
            // differs between histories).
            None => replays
                .iter()
                .find(|r| r.history == self.eplb.history_windows)
                .or(replays.first())?
                .rows
                .iter()
                .find(|r| r.algorithm == KEEP_ROW),
        }
    }

    /// The finding: the settings' next-window PAR and moves, against the lowest operator row
    /// the operator can run. `windows`: the recording's; `stride`: windows between steps.
    pub fn finding(
        &self,
        replays: &[Replay],
        triggers: &[Trigger],
        windows: usize,
        stride: usize,
    ) -> String {
        let h = self.eplb.history_windows;
        let Some(row) = self.row(replays) else {
            // From the recorded start a replay of H windows needs H + 1 of them.
            let how = if windows <= h {
                format!("record at least {} windows to compare", h + 1)
            } else {
                format!("add {h} to --history to compare")
            };
            return format!(
                "- {} as recorded ({}): its historyWindows was not replayed; {how}.\n",
                self.name,
                self.describe(),
            );
        };
        let mine = row.mean_next();
        let cadence = if stride == 1 {
            String::new()
        } else {
            format!(" (replanning every {stride} windows; the operator's cadence is --stride 1)")
        };
        let mut out = format!(
            "- {} as recorded ({}): {mine:.4}, {:.1}% of the slots moved per step{cadence}",
            self.name,
            self.describe(),
            100.0 * row.moved_share_per_step()
        );
        // The lowest operator row at a history the operator keeps.
        let lowest = best(replays, |p| {
            p.history <= OPERATOR_MAX_HISTORY && trigger_of(p.row, triggers).is_some()
        });
        match lowest {
            Some(p) if p.row.mean_next() < mine => out.push_str(&format!(
                "; the lowest operator row ({} at historyWindows {}) {:.4}, {:.2}% below.\n",
                p.row.algorithm,
                p.history,
                p.row.mean_next(),
                100.0 * (1.0 - p.row.mean_next() / mine)
            )),
            Some(_) => out.push_str(": as low as the lowest operator row.\n"),
            None => out.push_str(".\n"),
        }
        out
    }

    /// [`Deployed::finding`]'s figures for `--json`.
    pub fn json(&self, replays: &[Replay]) -> serde_json::Value {
        let row = self.row(replays);
        serde_json::json!({
            "name": self.name,
            "historyWindows": self.eplb.history_windows,
            "row": row.map(|r| r.algorithm.clone()),
            "mean_next": row.map(RollingRow::mean_next),
            "moved_share_per_step": row.map(RollingRow::moved_share_per_step),
        })
    }
}
