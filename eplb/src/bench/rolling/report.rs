//! The rolling run as markdown: one line per policy with its means over the steps, each
//! policy's PAR step by step, and the findings computed from them.

use super::{BOUND_ROW, RollingOutcome, RollingRow, mean};
use crate::bench::{median, par};

/// The rolling rows as markdown: one line per policy with its means over the steps.
pub fn markdown_table(rows: &[RollingRow]) -> String {
    let mut s = String::from(
        "| shape | policy | next PAR (mean of steps) | expected next PAR (mean of steps) | worst step | slots moved per step | layers changed per step | cross-node moves (all steps) | cross-node tokens | plan ms per step (median / max) |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let bound = r.algorithm == BOUND_ROW;
        let dash = || "-".to_string();
        let n = r.slots_moved.len().max(1) as f64;
        let time = if r.plan_ms.is_empty() {
            dash()
        } else {
            format!(
                "{:.1} / {:.1}",
                median(r.plan_ms.clone()),
                r.plan_ms.iter().copied().fold(0.0, f64::max)
            )
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.shape,
            r.algorithm,
            par(r.mean_next()),
            par(r.mean_expected()),
            par(r.worst_step()),
            if bound {
                dash()
            } else {
                format!(
                    "{:.0} ({:.1}%)",
                    r.moved_total() as f64 / n,
                    100.0 * r.moved_share_per_step()
                )
            },
            if bound {
                dash()
            } else {
                format!("{:.1}", r.layers_changed.iter().sum::<usize>() as f64 / n)
            },
            if bound {
                dash()
            } else {
                r.cross_node_moves.iter().sum::<usize>().to_string()
            },
            if bound {
                dash()
            } else {
                format!("{:.1}%", 100.0 * mean(&r.cross_node_tokens))
            },
            time,
        ));
    }
    s
}

/// Each row's next-window PAR step by step.
pub fn steps_table(rows: &[RollingRow]) -> String {
    let steps = rows.iter().map(|r| r.next_par.len()).max().unwrap_or(0);
    let mut s = String::from("| shape | policy |");
    for k in 1..=steps {
        s.push_str(&format!(" step {k} |"));
    }
    s.push_str("\n|---|---|");
    s.push_str(&"---|".repeat(steps));
    s.push('\n');
    for r in rows {
        s.push_str(&format!("| {} | {} |", r.shape, r.algorithm));
        for x in &r.next_par {
            s.push_str(&format!(" {} |", par(*x)));
        }
        s.push('\n');
    }
    s
}

/// Findings per shape: joint against the lpt baseline, its budgeted and triggered variants and
/// every peer, on PAR (the windows that happened and in expectation) and slots moved over the
/// run; and every peer that produced no row, with the reason.
pub fn summary(rows: &[RollingRow], outcomes: &[(String, RollingOutcome)]) -> String {
    let mut out = String::new();
    for shape in crate::bench::in_order(rows.iter().map(|r| r.shape.as_str())) {
        let in_shape: Vec<&RollingRow> = rows.iter().filter(|r| r.shape == shape).collect();
        let Some(joint) = in_shape.iter().find(|r| r.algorithm == "joint") else {
            continue;
        };
        let steps = joint.next_par.len();
        // A recorded trace has no law to draw the next windows from: no expected PAR.
        let drawn = !joint.mean_expected().is_nan();
        // "on the windows that happened / in expectation", or the first alone.
        let pair = |next: String, expected: String| {
            if drawn {
                format!("{next} / {expected}")
            } else {
                next
            }
        };
        let both = |next: f64, expected: f64| pair(format!("{next:.4}"), format!("{expected:.4}"));
        out.push_str(&format!(
            "- **{shape}** ({steps} steps; joint: next {}{:.1}% of the slots moved per step): ",
            if drawn {
                format!(
                    "{:.4}, expected {:.4}, ",
                    joint.mean_next(),
                    joint.mean_expected()
                )
            } else {
                format!("{:.4}, ", joint.mean_next())
            },
            100.0 * joint.moved_share_per_step()
        ));
        let mut parts = Vec::new();
        for r in &in_shape {
            if r.algorithm == "joint" || r.algorithm == BOUND_ROW {
                continue;
            }
            let moves = if r.moved_total() == 0 {
                "moving nothing".to_string()
            } else {
                format!(
                    "moving {:.2}x joint's slots",
                    r.moved_total() as f64 / joint.moved_total().max(1) as f64
                )
            };
            let joint_vs = pair(
                joint_against(joint.mean_next(), r.mean_next()),
                joint_against(joint.mean_expected(), r.mean_expected()),
            );
            parts.push(format!(
                "{} {} (joint {joint_vs}), {moves}",
                r.algorithm,
                both(r.mean_next(), r.mean_expected()),
            ));
        }
        for (_, o) in outcomes.iter().filter(|(s, _)| s == shape) {
            if let RollingOutcome::Failed { label, reason, .. } = o {
                parts.push(format!("{label}: no row ({reason})"));
            }
        }
        if let Some(b) = in_shape.iter().find(|r| r.algorithm == BOUND_ROW) {
            parts.push(format!(
                "lower bound {}",
                both(b.mean_next(), b.mean_expected())
            ));
        }
        out.push_str(&parts.join("; "));
        out.push_str(".\n");
    }
    out
}

/// Joint's PAR against another row's, as "1.20% lower" or "0.57% higher": a row that beats
/// joint must not read "joint -0.57% lower".
fn joint_against(joint: f64, other: f64) -> String {
    let below = 100.0 * (1.0 - joint / other);
    // Decided on the printed value: -0.001 is "0.00% lower", not "0.00% higher".
    if (below * 100.0).round() < 0.0 {
        format!("{:.2}% higher", -below)
    } else {
        format!("{:.2}% lower", below.max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row whose PAR is below joint's says joint is higher, with a positive number.
    #[test]
    fn joint_against_says_higher_or_lower() {
        assert_eq!(joint_against(1.0, 1.1), "9.09% lower");
        assert_eq!(joint_against(1.0757, 1.0696), "0.57% higher");
        assert_eq!(joint_against(1.0, 1.0), "0.00% lower");
        assert_eq!(joint_against(1.00001, 1.0), "0.00% lower");
    }
}
