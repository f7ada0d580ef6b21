//! Scenario 7 (measurement, `#[ignore]`d; not a timed test): the live EPLB loop planning from
//! the workers' past windows (`spec.eplb.historyWindows: 4`) against planning from the current
//! window alone (`historyWindows: 1`), side by side in one cluster on the same drifting
//! traffic (same seed, skew and drift; the hot experts rotate every few windows). Prints a
//! Markdown table of the PAR the operator measured on each window (docs/benchmarks/eplb.md):
//!
//! ```text
//! cargo test -p moe-e2e --test product -- --ignored --nocapture history_
//! MOE_E2E_HISTORY_SECS=300 ...   # measure longer (default 180 s)
//! MOE_E2E_HISTORY_SEED=5 ...      # other traffic (default seed 11)
//! ```

use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{Value, json};

use crate::common::*;

#[derive(Default, Debug)]
struct Measured {
    samples: usize,
    mean_par_sum: f64,
    worst_par_sum: f64,
    remaps: usize,
    experts_moved: u64,
    last_generation: Option<u64>,
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
            && self.last_generation != Some(g)
        {
            self.last_generation = Some(g);
            self.remaps += 1;
            self.experts_moved += last["expertsMoved"].as_u64().unwrap_or(0);
        }
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
    let until = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < until {
        for ((name, _), m) in cases.iter().zip(&mut measured) {
            m.observe(status(&get_moed(&client, ns, name).await?));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    println!(
        "\n| planning from | samples | mean PAR (time average) | worst-layer PAR | remaps | experts moved |"
    );
    println!("|---|---|---|---|---|---|");
    for ((name, history), m) in cases.iter().zip(&measured) {
        let n = m.samples.max(1) as f64;
        println!(
            "| {name} (historyWindows {history}) | {} | {:.3} | {:.3} | {} | {} |",
            m.samples,
            m.mean_par_sum / n,
            m.worst_par_sum / n,
            m.remaps,
            m.experts_moved
        );
    }
    let _ = agent;
    Ok(())
}
