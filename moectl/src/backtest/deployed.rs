//! The recorded deployment's own settings (`moectl record --deployment` keeps its
//! `spec.eplb`): replayed as one more operator row, and set against the lowest operator row, so
//! that a backtest says what the settings in use cost on the deployment's own traffic.

use eplb::bench::rolling::{OPERATOR_DEFAULTS, RollingRow, Trigger};

use super::sweep::{OPERATOR_MAX_HISTORY, Replay, best, trigger_of};
use crate::record::RecordedEplb;

/// The row that remaps nothing (`spec.eplb.enabled: false` or `paused`).
const KEEP_ROW: &str = "keep the starting placement";

pub struct Deployed {
    /// `namespace/name`.
    pub name: String,
    pub eplb: RecordedEplb,
    /// The bytes the operator counts per moved expert (the recording's `expertBytes`).
    pub expert_bytes: Option<u64>,
    /// Whether the recording dates its windows (its `clock`): `replanIntervalSeconds` is
    /// replayed only then.
    pub clocked: bool,
}

impl Deployed {
    /// The operator trigger these settings replay as; none when they remap nothing (paused,
    /// disabled, or a planner the operator holds on as unknown).
    pub fn trigger(&self) -> Option<Trigger> {
        let e = &self.eplb;
        let algorithm = self.algorithm()?;
        (e.enabled && !e.paused).then(|| Trigger {
            threshold: e.imbalance_threshold,
            hysteresis: e.hysteresis,
            max_layers: Some(e.max_layers_per_remap),
            algorithm,
            ..self.with_limits(OPERATOR_DEFAULTS)
        })
    }

    /// `t` with these settings' `maxMovesPerLayer`, `maxBytesPerRemap` (in experts) and
    /// cooldown (where the replayed windows are dated), whether or not they remap.
    pub fn with_limits(&self, t: Trigger) -> Trigger {
        let e = &self.eplb;
        Trigger {
            max_moves: e
                .max_moves_per_layer
                .map(|m| usize::try_from(m).unwrap_or(usize::MAX)),
            max_slots_per_remap: self.slots_per_remap(),
            cooldown_seconds: (self.clocked && e.replan_interval_seconds > 0.0)
                .then_some(e.replan_interval_seconds),
            ..t
        }
    }

    /// `spec.eplb.algorithm` as the planner's own name; `None` for one eplb does not know.
    fn algorithm(&self) -> Option<&'static str> {
        eplb::planner::ALGORITHMS
            .iter()
            .chain(&eplb::planner::BASELINES)
            .find(|&&a| a == self.eplb.algorithm)
            .copied()
    }

    /// `spec.eplb.maxBytesPerRemap` in whole experts, as the operator's budget counts them;
    /// `None` when unset or when the recording lacks the bytes of an expert.
    fn slots_per_remap(&self) -> Option<usize> {
        let bytes = match self.eplb.max_bytes_per_remap.as_ref()? {
            serde_json::Value::String(q) => moe_api::quantity::parse_bytes(q)?,
            serde_json::Value::Number(n) => n.as_u64()?,
            _ => return None,
        };
        let per_expert = self.expert_bytes.filter(|&b| b > 0)?;
        Some(usize::try_from(bytes / per_expert).unwrap_or(usize::MAX))
    }

    /// What the replay of these settings leaves out, or where they share another row.
    pub fn notes(&self, triggers: &[Trigger]) -> Vec<String> {
        let mut out = Vec::new();
        let e = &self.eplb;
        if self.algorithm().is_none() && e.enabled && !e.paused {
            out.push(format!(
                "{} plans with {}, which this moectl does not know: the operator holds its \
                 remaps (UnknownAlgorithm), so its row keeps the start",
                self.name, e.algorithm
            ));
        }
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
        if e.max_bytes_per_remap.is_some() && mine.max_slots_per_remap.is_none() {
            out.push(format!(
                "{}'s maxBytesPerRemap is not replayed: {}",
                self.name,
                if self.expert_bytes.is_none() {
                    "the recording does not say the bytes of an expert (record it again with \
                     this moectl)"
                } else {
                    "it does not read as a quantity"
                }
            ));
        }
        if !self.clocked && e.replan_interval_seconds > 0.0 {
            out.push(format!(
                "{}'s replanIntervalSeconds is not replayed: the recording does not date its \
                 windows (record it again with this moectl); its row may remap every step",
                self.name
            ));
        }
        out
    }

    /// The settings in the CRD's terms, with those the replay could not follow marked.
    fn describe(&self) -> String {
        let e = &self.eplb;
        if !e.enabled || e.paused {
            return format!(
                "spec.eplb.{}: no remap",
                if e.enabled { "paused" } else { "enabled false" }
            );
        }
        if self.algorithm().is_none() {
            return format!("algorithm {}: no remap (unknown planner)", e.algorithm);
        }
        let mut out = format!(
            "historyWindows {}, imbalanceThreshold {}, hysteresis {}, maxLayersPerRemap {}, \
             replanIntervalSeconds {}{}",
            e.history_windows,
            e.imbalance_threshold,
            e.hysteresis,
            e.max_layers_per_remap,
            e.replan_interval_seconds,
            if self.clocked || e.replan_interval_seconds == 0.0 {
                ""
            } else {
                " (not replayed)"
            }
        );
        if e.algorithm != "joint" {
            out.push_str(&format!(", algorithm {}", e.algorithm));
        }
        if let Some(m) = e.max_moves_per_layer {
            out.push_str(&format!(", maxMovesPerLayer {m}"));
        }
        if let Some(q) = &e.max_bytes_per_remap {
            let q = q.as_str().map_or_else(|| q.to_string(), str::to_string);
            match self.slots_per_remap() {
                Some(n) => out.push_str(&format!(
                    ", maxBytesPerRemap {q} ({})",
                    crate::inputs::count(n, "expert")
                )),
                None => out.push_str(&format!(", maxBytesPerRemap {q} (not replayed)")),
            }
        }
        out
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
