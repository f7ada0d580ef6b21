//! Scenario 7 (measurement, `#[ignore]`d; not a timed test): the live EPLB loop planning from
//! the workers' past windows (`spec.eplb.historyWindows: 4`) against planning from the current
//! window alone (`historyWindows: 1`), side by side in one cluster on the same drifting
//! traffic (same seed, skew and drift; the hot experts rotate every few windows). Prints a
//! Markdown table of the PAR the operator measured on each window, the remaps' PAR before,
//! predicted and after, and the steps per second the workers kept: the traffic drifts per
//! step and the operator's cadence is in seconds, so runs compare only at the same pace
//! (docs/benchmarks/eplb-live-loop.md):
//!
//! ```text
//! cargo test -p moe-e2e --test product -- --ignored --nocapture history_
//! MOE_E2E_HISTORY_SECS=300 ...   # measure longer (default 180 s)
//! MOE_E2E_HISTORY_SEED=5 ...      # other traffic (default seed 11)
//! ```

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::common::*;

#[derive(Default, Debug)]
struct Measured {
    samples: usize,
    mean_par_sum: f64,
    worst_par_sum: f64,
    experts_moved: u64,
    last_generation: Option<u64>,
    /// Per remap (one entry per succeeded remap seen, so also the remap count): worst PAR of
    /// its layers before, predicted and measured after (the PAR of the first window under the
    /// new placement, once the operator has measured it).
    remap_pars: Vec<(f64, f64, Option<f64>)>,
    /// Per remap: seconds from `startedAt` (the plan) to `finishedAt` (the last rank's
    /// switch), both written to the second.
    remap_secs: Vec<f64>,
    /// Rank 0's step counter at the start of the measurement and when it was read.
    first_step: Option<(u64, Instant)>,
    steps_per_second: Option<f64>,
}

impl Measured {
    fn observe(&mut self, st: &Value) {
        let im = &st["imbalance"];
        if let (Some(mean), Some(worst)) = (im["meanPar"].as_f64(), im["worstPar"].as_f64()) {
            self.samples += 1;
            self.mean_par_sum += mean;
            self.worst_par_sum += worst;
        }
        let last = &st["lastRemap"];
        if let Some(g) = last["generation"].as_u64()
            && last["result"] == "Succeeded"
        {
            if self.last_generation != Some(g) {
                self.last_generation = Some(g);
                self.experts_moved += last["expertsMoved"].as_u64().unwrap_or(0);
                self.remap_pars.push((
                    last["parBefore"].as_f64().unwrap_or(f64::NAN),
                    last["parPredicted"].as_f64().unwrap_or(f64::NAN),
                    None,
                ));
                let at = |key: &str| {
                    last[key]
                        .as_str()
                        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                };
                if let (Some(start), Some(end)) = (at("startedAt"), at("finishedAt")) {
                    let ms = end.as_millisecond() - start.as_millisecond();
                    self.remap_secs.push(ms as f64 / 1000.0);
                }
            }
            // parAfter comes with a later status write than the remap's end.
            if let Some(after) = last["parAfter"].as_f64()
                && let Some(r) = self.remap_pars.last_mut()
            {
                r.2 = Some(after);
            }
        }
    }

    /// Reads rank 0's step counter: the first call starts the clock, a later one sets the
    /// steps per second the workers kept (the traffic drifts per step while the operator's
    /// cadence is in seconds, so this rate is part of the scenario: debug-built workers on a
    /// loaded machine keep fewer steps per second than release-built ones).
    async fn read_step(&mut self, client: &kube::Client, ns: &str, name: &str) -> Result<()> {
        let pods = worker_pods(client, ns, name).await?;
        let ip = pods.first().and_then(pod_ip).context("rank 0's pod IP")?;
        let step = worker_get(&ip, "/v1/status").await?["step"]
            .as_u64()
            .context("step in /v1/status")?;
        let now = Instant::now();
        match self.first_step {
            None => self.first_step = Some((step, now)),
            Some((s0, t0)) => {
                let secs = now.duration_since(t0).as_secs_f64();
                self.steps_per_second = Some(step.saturating_sub(s0) as f64 / secs);
            }
        }
        Ok(())
    }

    fn mean_remap_secs(&self) -> f64 {
        self.remap_secs.iter().sum::<f64>() / self.remap_secs.len().max(1) as f64
    }

    /// Mean over the remaps of (PAR before, predicted, after), the last over those measured.
    fn remap_means(&self) -> (f64, f64, f64) {
        let n = self.remap_pars.len().max(1) as f64;
        let afters: Vec<f64> = self.remap_pars.iter().filter_map(|r| r.2).collect();
        (
            self.remap_pars.iter().map(|r| r.0).sum::<f64>() / n,
            self.remap_pars.iter().map(|r| r.1).sum::<f64>() / n,
            afters.iter().sum::<f64>() / afters.len().max(1) as f64,
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run with --ignored --nocapture (docs/benchmarks/eplb.md)"]
async fn history_windows_vs_current_window_on_drifting_traffic() -> Result<()> {
    moe_e2e::init_tracing();
    let Some((cluster, agent)) =
        cluster_with_operator("history_windows_vs_current_window", 2).await?
    else {
        return Ok(());
    };
    let client = cluster.client();
    let ns = "history";
    create_namespace(&cluster, ns).await?;
    let secs: u64 = std::env::var("MOE_E2E_HISTORY_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(180);
    // 20 steps/s, windows of 40 steps (2 s); the popularity ranking shifts by one expert every
    // 100 steps (5 s, 2.5 windows). Remaps as soon as the threshold allows (every 4 s).
    let eplb = |history: u32| {
        json!({"historyWindows": history, "windowSteps": 40, "minWindowSteps": 30,
               "imbalanceThreshold": 1.05, "hysteresis": 0.02, "replanIntervalSeconds": 4,
               "pollIntervalSeconds": 2, "algorithm": "joint"})
    };
    let seed: u64 = std::env::var("MOE_E2E_HISTORY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(11);
    let traffic = json!({"skew": 1.5, "drift": 0.01, "seed": seed, "stepsPerSecond": 20});
    let cases = [("current-window", 1), ("history-4", 4)];
    for (name, history) in cases {
        let mut obj = small_moed(name, "RoundRobin", eplb(history), traffic.clone());
        obj["spec"]["expertParallel"]["redundantExperts"] = json!(2);
        apply_moed(&client, ns, &obj).await?;
    }
    for (name, _) in cases {
        wait_status(&client, ns, name, T, "Available with a PAR", |st| {
            available_with_par(st, 2)
        })
        .await?;
    }
    let mut measured: Vec<Measured> = cases.iter().map(|_| Measured::default()).collect();
    for ((name, _), m) in cases.iter().zip(&mut measured) {
        m.read_step(&client, ns, name).await?;
    }
    let until = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < until {
        for ((name, _), m) in cases.iter().zip(&mut measured) {
            m.observe(status(&get_moed(&client, ns, name).await?));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    for ((name, _), m) in cases.iter().zip(&mut measured) {
        m.read_step(&client, ns, name).await?;
    }
    println!(
        "\n| planning from | samples | mean PAR (time average) | worst-layer PAR | remaps | experts moved | per remap: PAR before / predicted / after | plan to last switch (s, mean) | steps/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for ((name, history), m) in cases.iter().zip(&measured) {
        let n = m.samples.max(1) as f64;
        let (before, predicted, after) = m.remap_means();
        println!(
            "| {name} (historyWindows {history}) | {} | {:.3} | {:.3} | {} | {} | {before:.3} / {predicted:.3} / {after:.3} | {:.1} | {:.1} |",
            m.samples,
            m.mean_par_sum / n,
            m.worst_par_sum / n,
            m.remap_pars.len(),
            m.experts_moved,
            m.mean_remap_secs(),
            m.steps_per_second.unwrap_or(f64::NAN),
        );
    }
    let _ = agent;
    Ok(())
}
