//! `moectl bench --rolling K`: the rolling protocol (`eplb::bench::rolling`) on the standard
//! shapes, with the peers' rolling runs when `--peers` names an export.

use super::{Outputs, Rolling, provenance, read_peer_plans, settings};
use crate::{Fail, print_out, write_out};
use eplb::bench::rolling::{self, RollingOutcome, RollingRow};

pub(super) fn bench(
    out: &Outputs<'_>,
    shapes: &[&eplb::bench::BenchShape],
    opts: &eplb::bench::BenchOptions,
    r: Rolling,
    filter: Option<&str>,
) -> Result<Vec<String>, Fail> {
    let mut notes = Vec::new();
    let mut rows: Vec<RollingRow> = Vec::new();
    let mut outcomes = Vec::new();
    for s in shapes {
        let plans = match out.peers {
            Some(dir) => read_peer_plans(dir, s.name, opts, Some(r), &mut notes)?,
            None => Vec::new(),
        };
        let (shape_rows, o) = rolling::run_rolling(s, opts, r.steps, r.stride, plans)?;
        print_out(&rolling::markdown_table(&shape_rows))?;
        rows.extend(shape_rows);
        outcomes.extend(o.into_iter().map(|o| (s.name.to_string(), o)));
    }
    let summary = rolling::summary(&rows, &outcomes);
    print_out(&summary)?;
    let Some(path) = out.markdown else {
        return Ok(notes);
    };
    let doc = format!(
        "# EPLB rolling benchmark: {} replanning steps in a row, {} windows apart\n\n\
         {}; planning times are of one run per step.\n\n\
         Protocol: {PROTOCOL}\n\n{}{}\n## Next-window PAR step by step\n\n{}\n\
         ## Findings (computed from the table)\n\n\
         Per policy: next-window PAR averaged over the steps, on the windows that happened / in \
         expectation, and joint's distance below it.\n\n{summary}",
        r.steps,
        r.stride,
        provenance(
            &format!("--rolling {} --stride {} ", r.steps, r.stride),
            path,
            out.peers,
            &settings(filter, opts),
            "scripts/bench-peers --rolling",
        ),
        if out.peers.is_some() {
            format!("{PEERS_PROTOCOL}\n\n{}\n", peer_notes(&outcomes))
        } else {
            String::new()
        },
        rolling::markdown_table(&rows),
        rolling::steps_table(&rows),
    );
    write_out(Some(path), doc.as_bytes())?;
    Ok(notes)
}

/// One line per peer: the package, the file whose entry point ran, how its state was kept, and
/// on which shapes its placements held an expert twice on one rank (each step's own note is in
/// the driver's `rolling/<id>.json`).
pub(crate) fn peer_notes(outcomes: &[(String, RollingOutcome)]) -> String {
    let mut labels: Vec<&str> = Vec::new();
    for (_, o) in outcomes {
        if let RollingOutcome::Scored { row, .. } = o
            && !labels.contains(&row.algorithm.as_str())
        {
            labels.push(&row.algorithm);
        }
    }
    let mut out = String::new();
    for label in labels {
        let mut line = String::new();
        let mut twice = Vec::new();
        for (shape, o) in outcomes {
            let RollingOutcome::Scored {
                row,
                package,
                source,
                duplicate_steps,
                steps,
                note,
                ..
            } = o
            else {
                continue;
            };
            if row.algorithm != label {
                continue;
            }
            if line.is_empty() {
                line = format!("- {label}: `{package}`, `{source}`");
                if !note.is_empty() {
                    line.push_str(&format!("; {note}"));
                }
            }
            if *duplicate_steps > 0 {
                twice.push(format!("{shape} {duplicate_steps} of {steps} steps"));
            }
        }
        if !twice.is_empty() {
            line.push_str(&format!(
                "; an expert twice on one rank: {}",
                twice.join(", ")
            ));
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

pub(crate) const PEERS_PROTOCOL: &str = "Rows marked (peer) are the peers' own policies, run unmodified \
from their released packages by `scripts/bench-peers --rolling` (`eplb/peers/README.md`): each \
replans at every step from the placement its engine deployed the step before, with its policy \
object kept across steps where the engine keeps it, and is scored here like every other row.";

const PROTOCOL: &str = "for each shape a deterministic synthetic trace of 2H+(K-1)T+1 windows \
(H = --history, K = --rolling, T = --stride, by default H; heavy-tailed per-layer popularity, \
a log-normal drift step per window of standard deviation --drift, default 0.12, Poisson-like \
noise; see `eplb::synth`). The placement in use at the start is the `joint` plan of the first \
H windows. At step k every policy plans on the H windows H+kT .. 2H+kT-1 with the placement it deployed at step k-1 (the start at step 0), and is scored on \
window 2H+kT (mean PAR over layers) and on 32 draws of that window from the generator's law (expected PAR). `slots moved` counts the \
slots whose expert differs from the policy's own placement of the step before; `worst step` is \
the largest step's next-window mean PAR. `keep the starting placement` never replans. `joint \
(max B/layer)` moves at most B slots per layer at each step. `joint (min improvement 0)` \
replaces a layer whenever its plan is better at all (the default keeps the placement in use \
unless the objective drops by 0.5%, and undoes changes worth less than 0.25%). `joint, operator \
trigger` replans only what the operator's live loop would (`operator::remap::decide`): nothing \
until some layer's PAR on the latest window, under the placement in use, is above \
`spec.eplb.imbalanceThreshold`, then the layers above the threshold minus `hysteresis`, worst \
first, at most `maxLayersPerRemap` (the defaults: 1.2, 0.05, 8; then without the layer cap, \
and with a threshold of 1.1), once per step: the operator's cooldown between remaps \
(`replanIntervalSeconds`) is taken as one step, and of the plan it deploys what the operator \
accepts (`operator::remap::accept_plan`, through `eplb::accept_layers`): the changed layers \
whose PAR on that latest window drops, none unless one of them drops by at least `hysteresis` \
on its own (those first, the rest riding along; these rows have no move cap, so \
`eplb::accept_paced` does not apply). The lower bound is each next window's (largest water-filled replica load, at least 1), averaged.";
