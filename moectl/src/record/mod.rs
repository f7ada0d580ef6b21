//! `moectl record`: the load a running worker group routes, recorded window by window into a
//! file `moectl backtest`, `plan` and `eval` read, so that planners, budgets and the operator's
//! settings can be tried on the deployment's own traffic.
//!
//! Each rank closes a window of `--stats-window` steps at the same group steps and keeps its
//! newest [`MAX_LOAD_HISTORY`] (`GET /v1/load?history=N`, logical expert counts). A window of
//! the group is the sum of every rank's window with the same end step; a poll appends the ones
//! newer than the file's last. A new recording starts with the placement the group serves
//! (kept in the file) and the windows that begin after it was read. The file is rewritten whole after each poll (beside it, then
//! renamed), so stopping the command at any moment leaves a complete recording, and a second
//! run with the same `--output` continues it.
//!
//! The ranks are the `--worker` addresses given, or a MoEDeployment's pods reached through the
//! API server's port-forward (`--deployment`, [`cluster`]).

mod answer;
mod cluster;
mod ranks;
mod recording;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use moe_api::{LoadReport, MAX_LOAD_HISTORY, PlacementDocument, WorkerStatus};

use crate::inputs::count;
use crate::{Fail, say, write_out};
use answer::Poll;
use cluster::{ClusterRanks, Target};
use ranks::{Ranks, WorkerUrls, check_group};
use recording::Added;
pub use recording::{RecordedContext, RecordedEplb, Recording, context_of};

/// The longest poll interval or idle time taken (a week).
const MAX_SECONDS: f64 = 604_800.0;

/// How long one request to a rank may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(clap::Args, Debug)]
// One of the two ways to reach the ranks is needed: the group names both when neither is given.
#[command(group(
    clap::ArgGroup::new("ranks_source")
        .required(true)
        .args(["workers", "deployment"])
))]
pub struct RecordArgs {
    /// A rank's worker API (`http://HOST:PORT`, the port of its `/v1/load`): once per rank of
    /// the group, in any order. On Kubernetes, `--deployment` finds and reaches them instead.
    #[arg(long = "worker", value_name = "URL")]
    workers: Vec<String>,
    /// A MoEDeployment: its ranks are found from its worker pods and reached through the API
    /// server's port-forward, with the kubeconfig's credentials (RBAC in its namespace: `list`
    /// pods, `get` and `create` pods/portforward; `get` moedeployments to keep its settings).
    #[arg(long, value_name = "NAME", conflicts_with = "workers")]
    deployment: Option<String>,
    /// The MoEDeployment's namespace (default: the kubeconfig context's).
    #[arg(long, short = 'n', requires = "deployment")]
    namespace: Option<String>,
    /// The kubeconfig context to use (default: the current one).
    #[arg(long, requires = "deployment")]
    context: Option<String>,
    /// The recording: `{"windows": [W][L][E], "endSteps", "steps", "gaps"}`, oldest window
    /// first. An existing recording is continued.
    #[arg(long)]
    output: PathBuf,
    /// Stop once the recording holds this many windows (default: until interrupted; the file
    /// is complete after every poll).
    #[arg(long, value_parser = at_least_one_window)]
    windows: Option<usize>,
    /// Seconds between polls. Each rank keeps its newest 16 windows: poll at least once in 16
    /// windows' time, or windows are lost (recorded in "gaps").
    #[arg(long, default_value_t = 10.0)]
    poll_seconds: f64,
    /// Give up after this many seconds without a new window (a group that stopped, or an
    /// address that never answers).
    #[arg(long, default_value_t = 600.0)]
    idle_seconds: f64,
}

/// `--windows`, refused at 0 when parsed: a recording of no windows would stop before its
/// first poll and write nothing, successfully.
fn at_least_one_window(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("give at least 1 window".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// An existing recording at `path` (continued), or a new one.
fn read_existing(path: &Path) -> Result<Recording, Fail> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| {
            Fail(format!(
                "{} exists and is not a moectl recording ({e}): give another --output",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Recording::default()),
        Err(e) => Err(Fail(format!("cannot read {}: {e}", path.display()))),
    }
}

pub fn record(a: &RecordArgs) -> Result<(), Fail> {
    for (flag, v) in [
        ("--poll-seconds", a.poll_seconds),
        ("--idle-seconds", a.idle_seconds),
    ] {
        if !(v > 0.0 && v <= MAX_SECONDS) {
            return Err(Fail(format!(
                "{flag} {v}: give a number of seconds above 0 and at most {MAX_SECONDS}"
            )));
        }
    }
    let workers = match a.deployment {
        Some(_) => None,
        None => Some(WorkerUrls::new(&a.workers)?),
    };
    // Before the first poll: the file is written after each one.
    crate::outfile::check_output(&a.output, "--output", &[])?;
    let mut rec = read_existing(&a.output)?;
    if a.windows.is_some_and(|n| rec.windows.len() >= n) {
        say_recorded(&rec, a, "already");
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Fail(format!("cannot start the HTTP client: {e}")))?;
    runtime.block_on(async {
        let mut ranks = match (workers, &a.deployment) {
            (Some(w), _) => Ranks::Workers(w),
            (None, deployment) => {
                let target = Target {
                    deployment: deployment.as_deref().unwrap_or_default(),
                    namespace: a.namespace.as_deref(),
                    context: a.context.as_deref(),
                };
                let c = tokio::time::timeout(REQUEST_TIMEOUT, ClusterRanks::discover(&target))
                    .await
                    .map_err(|_| {
                        Fail(format!(
                            "the cluster did not answer in {} s",
                            REQUEST_TIMEOUT.as_secs()
                        ))
                    })?
                    .map_err(Fail)?;
                say(format_args!(
                    "recording MoEDeployment {}: {} through the API server ({})",
                    target.deployment,
                    count(c.labels().len(), "rank"),
                    c.labels().join(", ")
                ));
                Ranks::Cluster(Box::new(c))
            }
        };
        poll_until_done(a, &mut ranks, &mut rec).await
    })
}

async fn poll_until_done(
    a: &RecordArgs,
    ranks: &mut Ranks,
    rec: &mut Recording,
) -> Result<(), Fail> {
    let idle = Duration::from_secs_f64(a.idle_seconds);
    let mut last_news = Instant::now();
    let mut checked = false;
    // A new recording's first window begins at or after this group step.
    let mut not_before = None;
    // The group's window size in steps, once a full window was seen: what to ask for.
    let mut window = rec.steps.iter().copied().max();
    loop {
        let round = async {
            if !checked {
                let statuses: Vec<WorkerStatus> = ranks.get_json_all("/status").await?;
                check_group(ranks.labels(), &statuses, ranks.hints()).map_err(Poll::Stop)?;
                if rec.windows.is_empty() {
                    let (placement, step) = group_start(ranks, &statuses).await?;
                    rec.placement = Some(placement);
                    not_before = Some(step);
                    match ranks.settings().await {
                        Some(Ok(settings)) => {
                            rec.deployment = Some(settings.deployment);
                            rec.eplb = Some(settings.eplb);
                            rec.expert_bytes = settings.expert_bytes;
                        }
                        // The recording does without: backtest then has no row of them.
                        Some(Err(e)) => say(format_args!(
                            "warning: the deployment's settings are not recorded: {e}"
                        )),
                        None => {}
                    }
                }
            }
            // The first rank's step, and when it said it: which windows closed since the last
            // poll, and the clock that dates them.
            let step = ranks.get_json::<WorkerStatus>(0, "/status").await?.step;
            let polled_at = unix_seconds();
            let last_end = rec.end_steps.last().copied();
            let wanted = windows_to_ask(step, window, last_end, not_before);
            if wanted == 0 {
                return Ok(Added::default());
            }
            // One more than had closed at that step: a window that closes while the ranks are
            // asked moves each later rank's newest windows up by one.
            let mut asked = (wanted + 1).min(MAX_LOAD_HISTORY);
            let mut reports = load_reports(ranks, asked).await?;
            if let Some(w) = window
                && asked < MAX_LOAD_HISTORY
                && !reaches_back(&reports, asked, next_window_end(w, last_end, not_before))
            {
                // More closed meanwhile (a slow poll of many ranks): everything they keep.
                asked = MAX_LOAD_HISTORY;
                reports = load_reports(ranks, asked).await?;
            }
            // The worker reports closed windows only, so the newest has the window's size.
            if let Some(newest) = reports.first().and_then(|r| r.history.last()) {
                window = Some(newest.steps);
            }
            let added = rec
                .add(&reports, a.windows, not_before)
                .map_err(Poll::Stop)?;
            if added.windows > 0 {
                rec.clock.push([step as f64, polled_at]);
            }
            Ok(added)
        };
        match round.await {
            Ok(added) => {
                checked = true;
                for [after, before] in added.lost {
                    say(format_args!(
                        "warning: the windows between steps {after} and {before} were lost: \
                         poll more often than every 16 windows (--poll-seconds)"
                    ));
                }
                if added.windows > 0 {
                    last_news = Instant::now();
                    write_out(Some(&a.output), &serde_json::to_vec(&*rec)?)?;
                    say(format_args!(
                        "recorded {} to {} (group step {})",
                        count(rec.windows.len(), "window"),
                        a.output.display(),
                        rec.end_steps.last().copied().unwrap_or(0)
                    ));
                }
            }
            Err(Poll::Stop(m)) => return Err(Fail(m)),
            Err(Poll::Retry(m)) => {
                if last_news.elapsed() >= idle {
                    return Err(Fail(format!(
                        "no new window for {} s; last error: {m}",
                        a.idle_seconds
                    )));
                }
                say(format_args!("warning: {m} (trying again)"));
            }
        }
        if a.windows.is_some_and(|n| rec.windows.len() >= n) {
            say_recorded(rec, a, "now");
            return Ok(());
        }
        if last_news.elapsed() >= idle {
            return Err(Fail(format!(
                "no new window for {} s: is the group serving traffic? (its windows are \
                 --stats-window steps)",
                a.idle_seconds
            )));
        }
        tokio::time::sleep(Duration::from_secs_f64(a.poll_seconds)).await;
    }
}

/// How many past windows to ask each rank for at group step `step`: those closed since the
/// recording's last (`last_end`) or, for a new recording, those begun at or after
/// `not_before`, at most [`MAX_LOAD_HISTORY`]. Windows close at multiples of the window size
/// (`window`) in the group's step count. Without the size (no full window seen yet) every
/// window the ranks keep, few then. A poll between two closes asks for nothing, so a 64-rank
/// DeepSeek-V3 group is not asked for 16 windows of 58 x 256 counts per rank (1-2 MB of JSON
/// each, estimated from 5-8 bytes a number) at every poll.
fn windows_to_ask(
    step: u64,
    window: Option<u64>,
    last_end: Option<u64>,
    not_before: Option<u64>,
) -> usize {
    let Some(w) = window.filter(|&w| w > 0) else {
        return MAX_LOAD_HISTORY;
    };
    // A step count below the recording's last window: the group restarted, which the
    // recording refuses when it sees the windows.
    if last_end.is_some_and(|end| step < end) {
        return MAX_LOAD_HISTORY;
    }
    // Windows end at multiples of `w`: those from the next one the recording lacks to the
    // newest closed at `step`.
    let next = next_window_end(w, last_end, not_before) / w;
    usize::try_from((step / w + 1).saturating_sub(next))
        .unwrap_or(usize::MAX)
        .min(MAX_LOAD_HISTORY)
}

/// The end step of the first window the recording lacks: the one after its last, or for a new
/// recording the first that begins at or after `not_before` (windows of `w` steps).
fn next_window_end(w: u64, last_end: Option<u64>, not_before: Option<u64>) -> u64 {
    match (last_end, not_before) {
        (Some(end), _) => end.saturating_add(w),
        (None, Some(s)) => s.div_ceil(w).saturating_add(1).saturating_mul(w),
        (None, None) => w,
    }
}

/// Whether every rank's answer to `?history=asked` reaches back to the window ending at
/// `first_end`, or holds all the rank keeps; otherwise more windows closed while the ranks
/// were asked than were asked for.
fn reaches_back(reports: &[LoadReport], asked: usize, first_end: u64) -> bool {
    reports.iter().all(|r| {
        r.history.len() < asked || r.history.first().is_some_and(|w| w.end_step <= first_end)
    })
}

/// Every rank's load report with its newest `history` closed windows, in rank order.
async fn load_reports(ranks: &mut Ranks, history: usize) -> Result<Vec<LoadReport>, Poll> {
    ranks
        .get_json_all(&format!("/load?history={history}"))
        .await
}

/// Now, in seconds since the Unix epoch (0 on a clock set before it).
fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Where a new recording starts: the placement every rank serves on every layer now (rank 0's
/// document), and the group step from which the windows are surely its. The ranks keep 16
/// windows of the past, but which placement served those is not known (a remap may have run
/// meanwhile), so a new recording leaves them out.
async fn group_start(
    ranks: &mut Ranks,
    statuses: &[WorkerStatus],
) -> Result<(PlacementDocument, u64), Poll> {
    let Some(first) = statuses.iter().position(|s| s.rank == 0) else {
        return Err(Poll::Stop("no rank 0 among the ranks".into()));
    };
    let doc: PlacementDocument = ranks.get_json(first, "/placement").await?;
    // Statuses read before the document: every layer of every rank already on its generation
    // means no remap was under way between the two reads, nor left unfinished.
    if let Some(s) = statuses
        .iter()
        .find(|s| s.layer_generations.iter().any(|&g| g != doc.generation))
    {
        return Err(Poll::Retry(format!(
            "rank {} does not serve placement generation {} on every layer yet (a remap is \
             under way): the recording starts once it has finished",
            s.rank, doc.generation
        )));
    }
    let step = statuses.iter().map(|s| s.step).max().unwrap_or(0);
    Ok((doc, step))
}

fn say_recorded(rec: &Recording, a: &RecordArgs, when: &str) {
    say(format_args!(
        "the recording {} {when} holds {}{}",
        a.output.display(),
        count(rec.windows.len(), "window"),
        if rec.gaps.is_empty() {
            String::new()
        } else {
            format!(" ({} lost: see \"gaps\")", count(rec.gaps.len(), "gap"))
        }
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poll_asks_for_the_windows_closed_since_the_last_recorded() {
        // Windows of 100 steps; the last recorded ends at 1000.
        let ask = |step| windows_to_ask(step, Some(100), Some(1000), None);
        assert_eq!(ask(1050), 0);
        assert_eq!(ask(1100), 1);
        assert_eq!(ask(1299), 2);
        assert_eq!(ask(9000), MAX_LOAD_HISTORY);
        // A new recording: windows that begin at or after its start.
        let new = |step, start| windows_to_ask(step, Some(100), None, Some(start));
        assert_eq!(new(1199, 1050), 0);
        assert_eq!(new(1200, 1050), 1);
        assert_eq!(new(1200, 1100), 1);
        assert_eq!(new(1200, 1101), 0);
        // A step below the last recorded window (a restarted group): all, so that the
        // recording sees the restart and refuses it.
        assert_eq!(ask(900), MAX_LOAD_HISTORY);
        // The size not known yet: all the ranks keep.
        assert_eq!(windows_to_ask(1200, None, None, Some(0)), MAX_LOAD_HISTORY);
        assert_eq!(
            windows_to_ask(1200, Some(0), Some(1000), None),
            MAX_LOAD_HISTORY
        );
    }

    fn report(ends: &[u64]) -> LoadReport {
        LoadReport {
            rank: 0,
            layer_generations: vec![0],
            window_steps: 0,
            window_start_step: None,
            step: 0,
            slot_counts: Vec::new(),
            par: Vec::new(),
            history: ends
                .iter()
                .map(|&end_step| moe_api::LoadEpisode {
                    end_step,
                    steps: 100,
                    logical_counts: vec![vec![1.0]],
                })
                .collect(),
        }
    }

    #[test]
    fn an_answer_that_misses_the_next_window_asks_again() {
        // The recording ends at 1000; asked for 2 windows.
        let first = next_window_end(100, Some(1000), None);
        assert_eq!(first, 1100);
        assert!(reaches_back(&[report(&[1100, 1200])], 2, first));
        // A rank behind: an older window too, still reaching back.
        assert!(reaches_back(
            &[report(&[1000, 1100]), report(&[1100, 1200])],
            2,
            first
        ));
        // A window closed meanwhile: the later rank's two newest skip 1100.
        assert!(!reaches_back(
            &[report(&[1100, 1200]), report(&[1200, 1300])],
            2,
            first
        ));
        // A rank that keeps fewer than asked holds all it has.
        assert!(reaches_back(&[report(&[1200])], 2, first));
        // A new recording begun at step 1050: its first window ends at 1200.
        assert_eq!(next_window_end(100, None, Some(1050)), 1200);
        assert_eq!(next_window_end(100, None, Some(1100)), 1200);
    }
}
