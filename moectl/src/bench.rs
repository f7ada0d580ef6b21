//! `moectl bench`: runs `eplb::bench` on the standard shapes and writes the markdown report.

use std::path::Path;

use crate::{Fail, print_out, write_out};

pub(crate) mod rolling;

/// The most windows of history `--history` takes: each shape's trace holds 2H+1 windows of
/// layers x experts counts, and every algorithm plans on H of them; far beyond this the run
/// would exhaust memory (or take days) instead of measuring anything.
const MAX_HISTORY: usize = 1024;

/// Where `moectl bench` writes (or, for the peers, reads) beside standard output.
pub(crate) struct Outputs<'a> {
    /// The report as markdown.
    pub markdown: Option<&'a Path>,
    /// The peers' inputs, instead of running the benchmark.
    pub export: Option<&'a Path>,
    /// The peers' plans to score beside ours.
    pub peers: Option<&'a Path>,
}

impl Outputs<'_> {
    /// Refuses, before the benchmark runs, a --markdown or --export that cannot be written.
    fn check(&self) -> Result<(), Fail> {
        if let Some(path) = self.markdown {
            crate::outfile::check_output(path, "--markdown", &[])?;
        }
        if let Some(dir) = self.export {
            crate::outfile::check_output_dir(dir, "--export")?;
        }
        Ok(())
    }
}

/// The rolling protocol's settings (`--rolling K --stride T`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Rolling {
    pub steps: usize,
    pub stride: usize,
}

/// What an export was made with: `--peers` scores plans only against the same run.
#[derive(serde::Serialize, serde::Deserialize)]
struct Manifest {
    seed: u64,
    history: usize,
    /// The traces' drift (absent from exports made before `--drift` existed: the default).
    #[serde(default = "default_drift")]
    drift: f64,
    /// The settings of a rolling export (absent for the one-shot protocol).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rolling: Option<Rolling>,
    /// Shape name -> its folder.
    shapes: std::collections::BTreeMap<String, String>,
}

fn default_drift() -> f64 {
    eplb::bench::DEFAULT_DRIFT
}

/// The largest `--drift`: a log-normal step of sd 1 moves a popularity by a factor of e per
/// window, already far past any load a deployment would rebalance.
const MAX_DRIFT: f64 = 1.0;

pub(crate) fn bench(
    out: Outputs<'_>,
    rolling: Option<Rolling>,
    filter: Option<&str>,
    history: usize,
    repeats: usize,
    seed: u64,
    drift: f64,
) -> Result<Vec<String>, Fail> {
    if history == 0 || history > MAX_HISTORY {
        return Err(Fail(format!(
            "--history {history}: the windows of history must be between 1 and {MAX_HISTORY}"
        )));
    }
    if repeats == 0 {
        return Err(Fail(
            "--repeats 0: each algorithm must run at least once to be timed".into(),
        ));
    }
    if !(0.0..=MAX_DRIFT).contains(&drift) {
        return Err(Fail(format!(
            "--drift {drift}: the standard deviation of the log-popularity step per window must \
             be between 0 and {MAX_DRIFT} (default {})",
            eplb::bench::DEFAULT_DRIFT
        )));
    }
    out.check()?;
    let opts = eplb::bench::BenchOptions {
        history,
        seed,
        repeats,
        drift,
        ..Default::default()
    };
    let all = eplb::bench::standard_shapes();
    let shapes: Vec<_> = all
        .iter()
        .filter(|s| filter.is_none_or(|f| s.name.to_lowercase().contains(&f.to_lowercase())))
        .collect();
    if shapes.is_empty() {
        let names: Vec<&str> = all.iter().map(|s| s.name).collect();
        return Err(Fail(format!(
            "no benchmark shape matches --shape {}; the shapes are: {}",
            filter.unwrap_or(""),
            names.join(", ")
        )));
    }
    if let Some(r) = rolling {
        use eplb::bench::rolling::{MAX_STEPS, MAX_STRIDE};
        if !(1..=MAX_STEPS).contains(&r.steps) {
            return Err(Fail(format!(
                "--rolling {}: the steps must be between 1 and {MAX_STEPS}",
                r.steps
            )));
        }
        if !(1..=MAX_STRIDE).contains(&r.stride) {
            return Err(Fail(format!(
                "--stride {}: the windows between steps must be between 1 and {MAX_STRIDE}",
                r.stride
            )));
        }
    }
    if let Some(dir) = out.export {
        return export(dir, &shapes, &opts, rolling);
    }
    if let Some(r) = rolling {
        return rolling::bench(&out, &shapes, &opts, r, filter);
    }
    let mut notes = Vec::new();
    let mut rows = Vec::new();
    let mut outcomes = Vec::new();
    for s in shapes {
        let plans = match out.peers {
            Some(dir) => read_peer_plans(dir, s.name, &opts, None, &mut notes)?,
            None => Vec::new(),
        };
        let (r, o) = eplb::bench::run_shape_with_peers(s, &opts, plans)?;
        print_out(&eplb::bench::markdown_table(&r))?;
        rows.extend(r);
        outcomes.extend(o.into_iter().map(|o| (s.name.to_string(), o)));
    }
    let peers_section = if out.peers.is_some() {
        let summary = eplb::bench::peers::summary(&rows, &outcomes);
        print_out(&summary)?;
        format!(
            "\n## The peers' own code (computed from the table)\n\n{PEERS_PROTOCOL}\n\n{}\n{summary}",
            peer_sources(&outcomes)
        )
    } else {
        String::new()
    };
    if let Some(path) = out.markdown {
        let doc = format!(
            "# EPLB benchmark results\n\n{}; shared with other builds while measured, so \
             times are the fastest (and median) of {} runs. `greedy`'s planning time before \
             and after its speed-up, side by side: [eplb-greedy-speed.md](eplb-greedy-speed.md).\n\n\
             Protocol: {}\n\n{}\n## Findings (computed from the table)\n\n{}{}",
            provenance(
                "",
                path,
                out.peers,
                &settings(filter, &opts),
                "scripts/bench-peers"
            ),
            repeats,
            PROTOCOL,
            eplb::bench::markdown_table(&rows),
            eplb::bench::summary(&rows),
            peers_section,
        );
        write_out(Some(path), doc.as_bytes())?;
    }
    Ok(notes)
}

/// Writes each shape's [`eplb::bench::peers::PeerInputs`] to `dir/<slug>/inputs.json` (with
/// `rolling`, its [`eplb::bench::rolling::RollingPeerInputs`] to `dir/<slug>/rolling.json`)
/// and the run's settings to `dir/manifest.json`.
fn export(
    dir: &Path,
    shapes: &[&eplb::bench::BenchShape],
    opts: &eplb::bench::BenchOptions,
    rolling: Option<Rolling>,
) -> Result<Vec<String>, Fail> {
    let mut manifest = Manifest {
        seed: opts.seed,
        history: opts.history,
        drift: opts.drift,
        rolling,
        shapes: Default::default(),
    };
    for s in shapes {
        let slug = eplb::bench::peers::slug(s.name);
        let folder = dir.join(&slug);
        std::fs::create_dir_all(&folder)
            .map_err(|e| Fail(format!("cannot create {}: {e}", folder.display())))?;
        let (file, json) = match rolling {
            None => {
                let inputs = eplb::bench::BenchInputs::generate(s, opts)?;
                let peer = eplb::bench::peers::PeerInputs::new(s, &inputs);
                ("inputs.json", serde_json::to_vec(&peer)?)
            }
            Some(r) => {
                let inputs =
                    eplb::bench::rolling::RollingInputs::generate(s, opts, r.steps, r.stride)?;
                let peer = eplb::bench::rolling::RollingPeerInputs::new(s, &inputs);
                ("rolling.json", serde_json::to_vec(&peer)?)
            }
        };
        write_out(Some(&folder.join(file)), &json)?;
        manifest.shapes.insert(s.name.to_string(), slug);
    }
    let json = serde_json::to_vec_pretty(&manifest)?;
    write_out(Some(&dir.join("manifest.json")), &json)?;
    print_out(&format!(
        "wrote the {}inputs of {} shapes to {} (seed {}, {} windows of history{}{})\n",
        if rolling.is_some() { "rolling " } else { "" },
        shapes.len(),
        dir.display(),
        opts.seed,
        opts.history,
        non_default_drift(opts.drift).map_or(String::new(), |d| format!(", drift {d}")),
        rolling.map_or(String::new(), |r| format!(
            ", {} steps {} windows apart",
            r.steps, r.stride
        ))
    ))?;
    Ok(Vec::new())
}

/// The peers' plans of one shape, by file name: `dir/<slug>/peers/*.json`, or with `rolling`
/// their rolling runs `dir/<slug>/rolling/*.json`; none (and a note) when the folder is
/// missing. Refuses an export made with another seed, history or number of steps: its plans
/// were made from other windows than the ones this run scores.
fn read_peer_plans<T: serde::de::DeserializeOwned>(
    dir: &Path,
    shape: &str,
    opts: &eplb::bench::BenchOptions,
    rolling: Option<Rolling>,
    notes: &mut Vec<String>,
) -> Result<Vec<T>, Fail> {
    let manifest_path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&manifest_path).map_err(|e| {
        Fail(format!(
            "cannot read {}: {e} (make the folder with moectl bench --export)",
            manifest_path.display()
        ))
    })?;
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| Fail(format!("{}: {e}", manifest_path.display())))?;
    if manifest.seed != opts.seed
        || manifest.history != opts.history
        || manifest.drift != opts.drift
        || manifest.rolling != rolling
    {
        let flags = |seed: u64, history: usize, drift: f64, rolling: Option<Rolling>| {
            format!(
                "--seed {seed} --history {history}{}{}",
                drift_flag(drift),
                rolling.map_or(String::new(), |r| format!(
                    " --rolling {} --stride {}",
                    r.steps, r.stride
                ))
            )
        };
        return Err(Fail(format!(
            "{} was exported with {}, this run has {}: the peers planned on other windows; run \
             with the export's flags or export again",
            dir.display(),
            flags(
                manifest.seed,
                manifest.history,
                manifest.drift,
                manifest.rolling
            ),
            flags(opts.seed, opts.history, opts.drift, rolling),
        )));
    }
    let (sub, what) = if rolling.is_some() {
        ("rolling", "rolling run")
    } else {
        ("peers", "plan")
    };
    read_plans_in(
        &dir.join(eplb::bench::peers::slug(shape)).join(sub),
        shape,
        what,
        notes,
    )
}

/// Every `*.json` of `folder` as a peer's `what`, in file-name order; none (and a note) when
/// the folder is missing.
pub(crate) fn read_plans_in<T: serde::de::DeserializeOwned>(
    folder: &Path,
    shape: &str,
    what: &str,
    notes: &mut Vec<String>,
) -> Result<Vec<T>, Fail> {
    let Ok(entries) = std::fs::read_dir(folder) else {
        notes.push(format!(
            "no peer plans for {shape} (no folder {})",
            folder.display()
        ));
        return Ok(Vec::new());
    };
    let mut paths: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    let mut plans = Vec::new();
    for p in paths {
        let text = std::fs::read_to_string(&p)
            .map_err(|e| Fail(format!("cannot read {}: {e}", p.display())))?;
        let plan = serde_json::from_str(&text)
            .map_err(|e| Fail(format!("{}: not a peer {what}: {e}", p.display())))?;
        plans.push(plan);
    }
    Ok(plans)
}

/// One line per peer: the package and the file whose entry point ran.
fn peer_sources(outcomes: &[(String, eplb::bench::peers::PeerOutcome)]) -> String {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = String::new();
    for (_, o) in outcomes {
        if let eplb::bench::peers::PeerOutcome::Scored {
            row,
            package,
            source,
            ..
        } = o
            && seen.insert(row.algorithm.clone())
        {
            out.push_str(&format!("- {}: `{package}`, `{source}`\n", row.algorithm));
        }
    }
    out
}

const PEERS_PROTOCOL: &str = "Rows marked (peer) are the peers' own policies, run unmodified from \
their released packages by `scripts/bench-peers` (`eplb/peers/README.md`) on the same history and \
placement in use as every other row, and scored here the same way. Their planning time is Python's \
(single process; the threads are torch's).";

const PROTOCOL: &str = "for each shape a deterministic synthetic trace of 2H+1 windows \
(H = --history, default 8) is generated (heavy-tailed per-layer popularity, a log-normal \
drift step per window of standard deviation --drift, default 0.12, Poisson-like noise; see \
`eplb::synth`). The placement in use (`keep previous`) is the `joint` \
plan of the first H windows. Each algorithm plans on the next H windows with that previous \
placement and is scored on those H windows (history: mean over layers and windows, worst over \
both) and on the following window (next: mean and worst over layers). `slots moved` counts \
slots whose expert differs from the previous placement. `flashlb-like` is joint's construction \
step alone (episode-weighted replication and packing, matched and cherry-picked like joint, no \
local or exact search): our reading of FlashLB's design, not its code. `multi-episode-lpt` is the \
plain construction joint is measured against (water-filling on the window average, then each \
replica, heaviest first, to the rank without that expert whose largest per-episode load after \
adding it is smallest; matched and cherry-picked like joint). `greedy` and `greedy-global` run on \
one thread; the others use every CPU (layers in parallel). The gap is the joint objective's \
distance to its lower bound (per layer; mean and max over layers). Three reference rows are not \
plans from the history: joint planned on the next window itself (hindsight), on the generator's \
expected next window (perfect prediction: it knows the hidden popularity state, only the next \
drift step and the counting noise are unknown), and on 16 draws from the next window's true \
distribution; and the next window's lower bound (largest water-filled replica load, at least 1). `expected next PAR` is the next-window mean PAR averaged over 32 draws of the next window from the generator's own law given everything before it (drift step and counting noise): the plan's expected next-window PAR, without the luck of the one window that happened (the hindsight row is planned on that window, so its expectation is what a plan for one realisation gives on others).";

/// A report's first lines: the command that wrote it (`flags` before `--markdown`, `settings`
/// after; with `--peers DIR` when the peers' plans were scored, as `script` runs it), when, and
/// the machine (up to its CPU model; the caller goes on with what its times are).
pub(super) fn provenance(
    flags: &str,
    markdown: &Path,
    peers: Option<&Path>,
    settings: &str,
    script: &str,
) -> String {
    format!(
        "Generated by `moectl bench {flags}--markdown {}{}{settings}` (release build{}) on {} UTC.\n\n\
         Machine: {} logical CPUs, {}",
        markdown.display(),
        peers.map_or(String::new(), |d| format!(" --peers {}", d.display())),
        peers.map_or(String::new(), |_| format!(
            ", as `{script}` runs it after the peers planned"
        )),
        utc_now(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model(),
    )
}

/// The flags that chose what was measured, as written on the command line (every one, the
/// defaults included, so that the header alone reproduces the run; `--drift` only where it is
/// not the default, so that the headers of runs from before it existed still read the same).
fn settings(filter: Option<&str>, opts: &eplb::bench::BenchOptions) -> String {
    let shape = filter.map_or(String::new(), |f| {
        if f.contains(char::is_whitespace) {
            format!(" --shape '{f}'")
        } else {
            format!(" --shape {f}")
        }
    });
    format!(
        "{shape} --history {} --repeats {} --seed {}{}",
        opts.history,
        opts.repeats,
        opts.seed,
        drift_flag(opts.drift)
    )
}

/// ` --drift SIGMA` where `drift` is not the default, else nothing.
fn drift_flag(drift: f64) -> String {
    non_default_drift(drift).map_or(String::new(), |d| format!(" --drift {d}"))
}

/// `drift` where it is not the default: what a header or a message names.
fn non_default_drift(drift: f64) -> Option<f64> {
    (drift != eplb::bench::DEFAULT_DRIFT).then_some(drift)
}

/// The model name from /proc/cpuinfo, or "unknown CPU".
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Current UTC time as `YYYY-MM-DD HH:MM`.
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60
    )
}
