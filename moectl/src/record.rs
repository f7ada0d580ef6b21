//! `moectl record`: the load a running worker group routes, recorded window by window into a
//! file `moectl backtest`, `plan` and `eval` read, so that planners, budgets and the operator's
//! settings can be tried on the deployment's own traffic.
//!
//! Each rank closes a window of `--stats-window` steps at the same group steps and keeps its
//! newest [`MAX_LOAD_HISTORY`] (`GET /v1/load?history=N`, logical expert counts). A window of
//! the group is the sum of every rank's window with the same end step; a poll appends the ones
//! newer than the file's last. The file is rewritten whole after each poll (beside it, then
//! renamed), so stopping the command at any moment leaves a complete recording, and a second
//! run with the same `--output` continues it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use moe_api::{API_PREFIX, LoadEpisode, LoadReport, MAX_LOAD_HISTORY, WorkerStatus};
use serde::{Deserialize, Serialize};

use crate::inputs::count;
use crate::{Fail, say, write_out};

/// The longest poll interval or idle time taken (a week).
const MAX_SECONDS: f64 = 604_800.0;

#[derive(clap::Args, Debug)]
pub struct RecordArgs {
    /// A rank's worker API (`http://HOST:PORT`, the port of its `/v1/load`): once per rank of
    /// the group, in any order (`kubectl port-forward pod/NAME-R PORT:8080` for each rank).
    #[arg(long = "worker", value_name = "URL", required = true)]
    workers: Vec<String>,
    /// The recording: `{"windows": [W][L][E], "endSteps", "steps", "gaps"}`, oldest window
    /// first. An existing recording is continued.
    #[arg(long)]
    output: PathBuf,
    /// Stop once the recording holds this many windows (default: until interrupted; the file
    /// is complete after every poll).
    #[arg(long)]
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

/// A recording: the group's windows and where each ends in the group's step count.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Recording {
    /// `windows[w][layer][expert]`: token-expert assignments routed in window `w`, all ranks.
    pub windows: Vec<Vec<Vec<f64>>>,
    /// The group step each window ends at (exclusive).
    pub end_steps: Vec<u64>,
    /// Steps in each window.
    pub steps: Vec<u64>,
    /// `[after, before]` end steps between which windows were lost (a poll came too late).
    #[serde(default)]
    pub gaps: Vec<[u64; 2]>,
}

/// What one poll added.
#[derive(Debug, PartialEq)]
pub struct Added {
    pub windows: usize,
    /// Windows closed since the last recorded one that no rank kept any more (step ranges).
    pub lost: Vec<[u64; 2]>,
}

impl Recording {
    /// Appends the group's windows in `reports` (one per rank) newer than the last recorded:
    /// those every rank has closed, summed over ranks ([`LoadEpisode::group_windows`]); oldest
    /// first, until the recording holds `limit` windows.
    pub fn add(&mut self, reports: &[LoadReport], limit: Option<usize>) -> Result<Added, String> {
        let mut added = Added {
            windows: 0,
            lost: Vec::new(),
        };
        let windows = LoadEpisode::group_windows(reports);
        // The group's step count went back: it restarted, and its windows cannot follow the
        // recorded ones (they would be skipped as old until its count passed the last one).
        if let (Some(newest), Some(&last)) = (windows.last(), self.end_steps.last())
            && newest.end_step < last
        {
            return Err(format!(
                "the group's newest window ends at step {}, before the recording's last ({last}): \
                 the group restarted (or is another one); record it to another --output",
                newest.end_step
            ));
        }
        for window in windows {
            let last = self.end_steps.last().copied();
            if last.is_some_and(|l| window.end_step <= l) {
                continue;
            }
            if limit.is_some_and(|n| self.windows.len() >= n) {
                break;
            }
            if let Some(w) = self.windows.first()
                && !same_shape(w, &window.logical_counts)
            {
                let sum = &window.logical_counts;
                return Err(format!(
                    "the group reports {} layers x {} experts, the recording holds {} x {}: \
                     another deployment? record it to another --output",
                    sum.len(),
                    sum.first().map_or(0, Vec::len),
                    w.len(),
                    w.first().map_or(0, Vec::len)
                ));
            }
            let start = window.end_step.saturating_sub(window.steps);
            if let Some(l) = last
                && start > l
            {
                self.gaps.push([l, start]);
                added.lost.push([l, start]);
            }
            self.windows.push(window.logical_counts);
            self.end_steps.push(window.end_step);
            self.steps.push(window.steps);
            added.windows += 1;
        }
        Ok(added)
    }
}

/// The step ranges a recording at `path` lost (its `gaps`); empty for any other load file.
pub fn gaps_in(path: &Path) -> Vec<[u64; 2]> {
    #[derive(Deserialize)]
    struct Gaps {
        #[serde(default)]
        gaps: Vec<[u64; 2]>,
    }
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| serde_json::from_str::<Gaps>(&text).ok())
        .map_or_else(Vec::new, |g| g.gaps)
}

fn same_shape(a: &[Vec<f64>], b: &[Vec<f64>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.len() == y.len())
}

/// Checks that `statuses` (one per `--worker`, in that order) are every rank of one group,
/// each once.
fn check_group(workers: &[String], statuses: &[WorkerStatus]) -> Result<(), String> {
    let world = statuses.first().map_or(0, |s| s.world_size);
    let mut seen: Vec<Option<&str>> = vec![None; world];
    for (url, s) in workers.iter().zip(statuses) {
        if s.world_size != world {
            return Err(format!(
                "{url} is rank {} of {} ranks, {} rank {} of {world}: give the ranks of one group",
                s.rank, s.world_size, workers[0], statuses[0].rank
            ));
        }
        match seen.get_mut(s.rank) {
            Some(Some(other)) => {
                return Err(format!(
                    "{url} and {other} are both rank {}: give each rank once",
                    s.rank
                ));
            }
            Some(slot) => *slot = Some(url),
            None => return Err(format!("{url} reports rank {} of {world}", s.rank)),
        }
    }
    // Ranks of one group share its control token; two deployments of the same size do not.
    let ids: Vec<&str> = statuses
        .iter()
        .filter_map(|s| s.control_token_id.as_deref())
        .collect();
    if ids.windows(2).any(|w| w[0] != w[1]) {
        return Err(format!(
            "the --worker addresses answer with different control tokens: they are ranks of \
             different groups ({}); give the ranks of one group",
            workers.join(", ")
        ));
    }
    let missing: Vec<String> = (0..world)
        .filter(|&r| seen[r].is_none())
        .map(|r| r.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "rank{} {} of the group's {world} ha{} no --worker: the group's load is the sum \
             over every rank, so give each rank's address",
            if missing.len() == 1 { "" } else { "s" },
            missing.join(", "),
            if missing.len() == 1 { "s" } else { "ve" },
        ));
    }
    Ok(())
}

/// The worker API's base (`http://host:port/v1`) of a `--worker` address.
fn api_base(url: &str) -> Result<String, Fail> {
    let trimmed = url.trim_end_matches('/');
    if !(trimmed.starts_with("http://") || trimmed.starts_with("https://")) {
        return Err(Fail(format!(
            "--worker {url}: give the address as http://HOST:PORT"
        )));
    }
    Ok(if trimmed.ends_with(API_PREFIX) {
        trimmed.to_string()
    } else {
        format!("{trimmed}{API_PREFIX}")
    })
}

async fn get<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    url: &str,
) -> Result<T, String> {
    let resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("GET {url}: {status}"));
    }
    resp.json().await.map_err(|e| format!("GET {url}: {e}"))
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
    let bases = a
        .workers
        .iter()
        .map(|w| api_base(w))
        .collect::<Result<Vec<_>, _>>()?;
    let mut rec = read_existing(&a.output)?;
    if a.windows.is_some_and(|n| rec.windows.len() >= n) {
        say_recorded(&rec, a, "already");
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Fail(format!("cannot start the HTTP client: {e}")))?;
    runtime.block_on(poll_until_done(a, &bases, &mut rec))
}

async fn poll_until_done(
    a: &RecordArgs,
    bases: &[String],
    rec: &mut Recording,
) -> Result<(), Fail> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| Fail(format!("cannot start the HTTP client: {e}")))?;
    let idle = Duration::from_secs_f64(a.idle_seconds);
    let mut last_news = Instant::now();
    let mut checked = false;
    loop {
        let round = async {
            if !checked {
                let mut statuses = Vec::with_capacity(bases.len());
                for b in bases {
                    statuses.push(
                        get::<WorkerStatus>(&client, &format!("{b}/status"))
                            .await
                            .map_err(Poll::Retry)?,
                    );
                }
                check_group(&a.workers, &statuses).map_err(Poll::Stop)?;
            }
            let mut reports = Vec::with_capacity(bases.len());
            for b in bases {
                let url = format!("{b}/load?history={MAX_LOAD_HISTORY}");
                reports.push(
                    get::<LoadReport>(&client, &url)
                        .await
                        .map_err(Poll::Retry)?,
                );
            }
            rec.add(&reports, a.windows).map_err(Poll::Stop)
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

/// Why a poll failed: an answer that ends the recording (not one group, a restart, another
/// shape), or a request that may succeed at the next poll.
enum Poll {
    Stop(String),
    Retry(String),
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

    fn report(rank: usize, episodes: &[(u64, u64, f64)]) -> LoadReport {
        LoadReport {
            rank,
            layer_generations: vec![0],
            window_steps: 0,
            step: 0,
            slot_counts: vec![vec![0.0; 3]],
            par: vec![1.0],
            history: episodes
                .iter()
                .map(|&(end_step, steps, v)| LoadEpisode {
                    end_step,
                    steps,
                    logical_counts: vec![vec![v, 2.0 * v]],
                })
                .collect(),
        }
    }

    #[test]
    fn windows_every_rank_closed_are_summed_once_and_lost_ones_noted() {
        let mut rec = Recording::default();
        // Rank 1 has not closed the window ending at 30 yet: it waits for the next poll.
        let a = [
            report(0, &[(10, 10, 1.0), (20, 10, 2.0), (30, 10, 3.0)]),
            report(1, &[(10, 10, 10.0), (20, 10, 20.0)]),
        ];
        assert_eq!(
            rec.add(&a, None).unwrap(),
            Added {
                windows: 2,
                lost: Vec::new()
            }
        );
        assert_eq!(
            rec.windows,
            vec![vec![vec![11.0, 22.0]], vec![vec![22.0, 44.0]]]
        );
        assert_eq!(
            (rec.end_steps.clone(), rec.steps.clone()),
            (vec![10, 20], vec![10, 10])
        );
        // Polled again: only the new one.
        let b = [
            report(0, &[(20, 10, 2.0), (30, 10, 3.0)]),
            report(1, &[(20, 10, 20.0), (30, 10, 30.0)]),
        ];
        assert_eq!(rec.add(&b, None).unwrap().windows, 1);
        assert_eq!(rec.windows[2], vec![vec![33.0, 66.0]]);
        // Too late: the windows ending at 40 and 50 are gone from both ranks.
        let c = [report(0, &[(60, 10, 1.0)]), report(1, &[(60, 10, 1.0)])];
        assert_eq!(
            rec.add(&c, None).unwrap(),
            Added {
                windows: 1,
                lost: vec![[30, 50]]
            }
        );
        assert_eq!(rec.gaps, vec![[30, 50]]);
        // A window in another shape than the recording's is refused.
        let d = [
            LoadReport {
                history: vec![LoadEpisode {
                    end_step: 70,
                    steps: 10,
                    logical_counts: vec![vec![1.0]],
                }],
                ..report(0, &[])
            },
            LoadReport {
                history: vec![LoadEpisode {
                    end_step: 70,
                    steps: 10,
                    logical_counts: vec![vec![2.0]],
                }],
                ..report(1, &[])
            },
        ];
        let e = rec.add(&d, None).unwrap_err();
        assert!(
            e.contains("1 layers x 1 experts, the recording holds 1 x 2"),
            "{e}"
        );
        // A limit stops at that many windows; the next poll would not add past it either.
        let mut capped = Recording::default();
        assert_eq!(capped.add(&b, Some(1)).unwrap().windows, 1);
        assert_eq!(capped.end_steps, vec![20]);
        assert_eq!(capped.add(&b, Some(1)).unwrap().windows, 0);
        // A restarted group counts steps from 0 again: said so, not waited out.
        let restarted = [report(0, &[(10, 10, 1.0)]), report(1, &[(10, 10, 1.0)])];
        let e = rec.add(&restarted, None).unwrap_err();
        assert!(e.contains("the group restarted"), "{e}");
    }

    fn status(rank: usize, world: usize) -> WorkerStatus {
        serde_json::from_value(serde_json::json!({
            "rank": rank, "worldSize": world, "ready": true, "backend": "cpu",
            "placementGeneration": 0, "layerGenerations": [], "step": 0,
            "tokensPerSecond": 0.0, "traffic": "synthetic", "servedRowsTotal": 0,
            "servedRowsPerSecond": 0.0
        }))
        .unwrap()
    }

    #[test]
    fn every_rank_of_one_group_once() {
        let urls: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        // Two groups of the same size tell themselves apart by their control tokens.
        let token = |rank, id: &str| WorkerStatus {
            control_token_id: Some(id.into()),
            ..status(rank, 2)
        };
        assert!(check_group(&urls[..2], &[token(0, "x"), token(1, "x")]).is_ok());
        let e = check_group(&urls[..2], &[token(0, "x"), token(1, "y")]).unwrap_err();
        assert!(e.contains("ranks of different groups"), "{e}");
        assert!(check_group(&urls[..2], &[status(1, 2), status(0, 2)]).is_ok());
        let e = check_group(&urls[..2], &[status(0, 3), status(2, 3)]).unwrap_err();
        assert!(e.contains("rank 1 of the group's 3 has no --worker"), "{e}");
        let e = check_group(&urls, &[status(0, 3), status(1, 3), status(1, 3)]).unwrap_err();
        assert!(
            e.contains("b and c are both rank 1") || e.contains("c and b"),
            "{e}"
        );
        let e = check_group(&urls[..2], &[status(0, 2), status(1, 4)]).unwrap_err();
        assert!(e.contains("rank 1 of 4 ranks"), "{e}");
        assert_eq!(
            api_base("http://h:1/").map_err(|f| f.0).unwrap(),
            "http://h:1/v1"
        );
        assert_eq!(
            api_base("http://h:1/v1").map_err(|f| f.0).unwrap(),
            "http://h:1/v1"
        );
        assert!(api_base("h:1").is_err());
    }
}
