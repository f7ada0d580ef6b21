//! Scenario 11 (issue 13): an attention instance generates through the expert tier while the
//! operator rebalances it. A Mixtral parity checkpoint (`clients/python/parity/attention.py
//! checkpoint`, saved by transformers) lies on a hostPath PersistentVolume bound to a claim; a
//! serving MoEDeployment loads it from that claim, starting from the `Linear` placement (the
//! busy low-numbered experts together); `attention.py generate` — a process beside the cluster
//! that calls every rank's forward port on its pod IP with the client token, as an attention
//! pod would — generates round after round with the MoE blocks served by the tier. The
//! operator remaps from the load those rows produced. Checked: every round's tokens equal
//! transformers' own generation (before, during and after the remap), the remap finished
//! with a newer placement generation, and the PAR of the served traffic (status and
//! `kubectl get moed`) fell after it.
//!
//! Needs the project's Python environment (`scripts/pyenv`); without it the scenario prints
//! `SKIPPED`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret};
use kube::api::Api;
use moe_e2e::wait;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::common::*;

const FORWARD_PORT: u16 = 8300;
/// Most generation rounds before the scenario gives up waiting for the remap.
const MAX_ROUNDS: u32 = 60;
/// Rounds that must start after the remap finished (the post-remap placement serves them).
const ROUNDS_AFTER: usize = 3;

/// The project's Python environment, or `None` when `scripts/pyenv` has not installed it.
fn python() -> Option<PathBuf> {
    let out = std::process::Command::new(repo_path("scripts/pyenv"))
        .arg("--path")
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let venv = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let py = venv.join("bin/python");
    py.exists().then_some(py)
}

/// `attention.py checkpoint --family mixtral DIR` (inside `volume`), readable by the workers'
/// user.
async fn write_checkpoint(py: &Path, volume: &Path, dir: &Path) -> Result<()> {
    let out = tokio::process::Command::new(py)
        .arg(repo_path("clients/python/parity/attention.py"))
        .args(["checkpoint", "--family", "mixtral"])
        .arg(dir)
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "attention.py checkpoint: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    use std::os::unix::fs::PermissionsExt;
    for d in [volume, dir] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
    }
    for e in std::fs::read_dir(dir)? {
        std::fs::set_permissions(e?.path(), std::fs::Permissions::from_mode(0o644))?;
    }
    Ok(())
}

/// A hostPath PersistentVolume holding `dir`, pre-bound to claim `ns/claim` (and the claim
/// naming it), as an administrator provisions a checkpoint volume by hand.
fn volume_yaml(ns: &str, claim: &str, dir: &Path) -> String {
    format!(
        "apiVersion: v1
kind: PersistentVolume
metadata: {{name: {ns}-{claim}}}
spec:
  capacity: {{storage: 1Gi}}
  accessModes: [ReadOnlyMany]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ''
  hostPath: {{path: {}, type: Directory}}
  claimRef: {{namespace: {ns}, name: {claim}}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: {claim}, namespace: {ns}}}
spec:
  accessModes: [ReadOnlyMany]
  storageClassName: ''
  volumeName: {ns}-{claim}
  resources: {{requests: {{storage: 1Gi}}}}
",
        dir.display()
    )
}

/// The MoEDeployment serving the checkpoint on claim `claim` (`spec.model` as `moectl model
/// inspect` prints it for the Mixtral parity model), remapping from the served load.
fn attention_moed(name: &str, claim: &str) -> Value {
    let mut obj = small_moed(
        name,
        "Linear",
        json!({"imbalanceThreshold": 1.05, "hysteresis": 0.02, "windowSteps": 150,
               "minWindowSteps": 100, "pollIntervalSeconds": 2, "replanIntervalSeconds": 4}),
        json!({}),
    );
    let spec = obj["spec"].as_object_mut().expect("spec");
    spec.remove("traffic");
    spec.insert(
        "model".into(),
        json!({"architecture": "MixtralForCausalLM", "numLayers": 2, "numExperts": 8,
               "hidden": 128, "intermediate": 32, "topK": 2, "scoring": "Softmax",
               "normTopkProb": true, "sharedExperts": 0}),
    );
    spec.insert(
        "weights".into(),
        json!({"persistentVolumeClaim": {"claimName": claim}}),
    );
    spec.insert(
        "serving".into(),
        json!({"enabled": true, "port": FORWARD_PORT, "maxRowsPerRequest": 4096,
               "clients": {"matchLabels": {"app": "attention"}}}),
    );
    obj
}

/// One line of `attention.py generate`.
#[derive(Debug, Clone)]
struct Round {
    index: u64,
    ok: bool,
    /// Prompts whose tokens equal transformers' (of `prompts`).
    identical: u64,
    prompts: u64,
    started_at: f64,
    finished_at: f64,
    line: String,
}

fn parse_round(line: &str) -> Result<Round> {
    let v: Value = serde_json::from_str(line).with_context(|| format!("round line {line:?}"))?;
    Ok(Round {
        index: v["round"].as_u64().context("round")?,
        ok: v["ok"].as_bool().context("ok")?,
        identical: v["identical"].as_u64().context("identical")?,
        prompts: v["prompts"].as_u64().context("prompts")?,
        started_at: v["startedAt"].as_f64().context("startedAt")?,
        finished_at: v["finishedAt"].as_f64().context("finishedAt")?,
        line: line.to_string(),
    })
}

fn unix_seconds(rfc3339: &str) -> Option<f64> {
    let t: jiff::Timestamp = rfc3339.parse().ok()?;
    Some(t.as_millisecond() as f64 / 1000.0)
}

/// `kubectl get moed NAME -n NS` and the value of its `PAR` column.
fn kubectl_par(cluster: &moe_e2e::Cluster, ns: &str, name: &str) -> Result<(String, f64)> {
    let table = cluster.run_kubectl(&["get", "moed", name, "-n", ns])?;
    let mut lines = table.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let row: Vec<&str> = lines
        .find(|l| l.starts_with(name))
        .with_context(|| format!("no row for {name} in kubectl get moed:\n{table}"))?
        .split_whitespace()
        .collect();
    let column = header
        .iter()
        .position(|h| *h == "PAR")
        .with_context(|| format!("no PAR column in kubectl get moed:\n{table}"))?;
    let par = row
        .get(column)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no PAR value in kubectl get moed:\n{table}"))?;
    Ok((table, par))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attention_generates_through_the_expert_tier_while_it_rebalances() -> Result<()> {
    const TEST: &str = "attention_generates_through_the_expert_tier_while_it_rebalances";
    moe_e2e::init_tracing();
    let Some(py) = python() else {
        // Not print_skip: that one says the control plane is missing.
        eprintln!(
            "SKIPPED {TEST}: the project's Python environment is not installed (run scripts/pyenv)"
        );
        return Ok(());
    };
    let Some((cluster, nodes)) = cluster_with_operator(TEST, 1).await? else {
        return Ok(());
    };
    let started = Instant::now();
    let client = cluster.client();
    let (ns, name, claim) = ("afd", "mixtral", "mixtral-checkpoint");
    create_namespace(&cluster, ns).await?;

    // --- the checkpoint on a claim ----------------------------------------------------------
    // Outside the cluster directory (mode 0700): on the real node the workers run as uid
    // 65532 and must traverse to the volume's host path.
    let volume = tempfile::Builder::new()
        .prefix("moe-e2e-checkpoint-")
        .tempdir()?;
    let ckpt = volume.path().join("mixtral");
    write_checkpoint(&py, volume.path(), &ckpt).await?;
    cluster
        .apply_yaml(&volume_yaml(ns, claim, &ckpt), ns)
        .await?;
    // kube-controller-manager's persistent-volume binder completes the pre-binding.
    wait::object(&client, ns, claim, T, |c: &PersistentVolumeClaim| {
        c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")
    })
    .await
    .context("the checkpoint claim never became Bound")?;

    // --- the expert tier --------------------------------------------------------------------
    apply_moed(&client, ns, &attention_moed(name, claim)).await?;
    with_log(
        wait_status(&client, ns, name, T, "Available", |st| {
            cond_is(st, "Available", "True") && st["serving"]["rankEndpoints"].is_array()
        })
        .await,
        &nodes,
    )
    .await?;
    let (generation0, _) = committed_placement(&client, ns, name).await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let token = secrets
        .get(&format!("{name}-client-token"))
        .await?
        .data
        .and_then(|d| d.get("token").map(|b| b.0.clone()))
        .context("no token in the client-token Secret")?;
    let token_file = cluster.dir().join("client-token");
    std::fs::write(&token_file, &token)?;
    // status.serving.rankEndpoints names `<pod>.<service>.<ns>.svc:PORT`; beside the cluster
    // (no cluster DNS) the same ranks are reached on their pod IPs.
    let st = status(&get_moed(&client, ns, name).await?).clone();
    let rank_endpoints = st["serving"]["rankEndpoints"]
        .as_array()
        .context("rankEndpoints")?
        .clone();
    let pods = worker_pods(&client, ns, name).await?;
    ensure!(
        pods.len() == 2 && rank_endpoints.len() == 2,
        "{} pods for {rank_endpoints:?}",
        pods.len()
    );
    let mut urls = Vec::new();
    for (pod, ep) in pods.iter().zip(&rank_endpoints) {
        let pod_name = pod.metadata.name.as_deref().unwrap_or_default();
        ensure!(
            ep.as_str()
                .is_some_and(|e| e.starts_with(&format!("{pod_name}.")) && e.ends_with(":8300")),
            "rank endpoint {ep} is not pod {pod_name}'s forward port"
        );
        urls.push(format!(
            "http://{}:{FORWARD_PORT}",
            pod_ip(pod).context("pod IP")?
        ));
    }
    println!(
        "tier Available after {:.1} s (placement generation {generation0}); endpoints {}",
        started.elapsed().as_secs_f64(),
        urls.join(",")
    );

    // --- the attention instance ---------------------------------------------------------------
    let mut child = tokio::process::Command::new(&py)
        .arg(repo_path("clients/python/parity/attention.py"))
        .args(["generate", "--checkpoint"])
        .arg(&ckpt)
        .args(["--endpoints", &urls.join(",")])
        .arg("--token-file")
        .arg(&token_file)
        .args(["--rounds", &MAX_ROUNDS.to_string()])
        // Paced: on the real node a round takes ~60 ms, and status times are whole seconds, so
        // unpaced rounds all fell into the second the remap started in (none counted before).
        .args(["--interval", "0.25"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let stderr = child.stderr.take().context("stderr")?;
    let stderr_task = tokio::spawn(async move {
        let mut out = String::new();
        let mut r = BufReader::new(stderr).lines();
        while let Ok(Some(l)) = r.next_line().await {
            out.push_str(&l);
            out.push('\n');
        }
        out
    });

    let mut rounds: Vec<Round> = Vec::new();
    // (seconds since start, worstPar, meanPar, appliedGeneration) of every status read.
    let mut samples: Vec<(f64, f64, f64, u64)> = Vec::new();
    let mut par_before_remap: Option<f64> = None;
    let mut kubectl_before: Option<(String, f64)> = None;
    let mut remap: Option<Value> = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    let mut stopped_by_us = false;
    let exit = loop {
        tokio::select! {
            line = lines.next_line() => match line? {
                Some(l) => {
                    let r = parse_round(&l)?;
                    println!("round {}: {}", r.index, r.line);
                    rounds.push(r);
                }
                None => break child.wait().await?,
            },
            _ = poll.tick() => {
                let st = status(&get_moed(&client, ns, name).await?).clone();
                let im = &st["imbalance"];
                if let (Some(w), Some(m)) = (im["worstPar"].as_f64(), im["meanPar"].as_f64()) {
                    let applied = st["placement"]["appliedGeneration"].as_u64().unwrap_or(0);
                    samples.push((started.elapsed().as_secs_f64(), w, m, applied));
                    // Under the initial placement with no remap planned; or, when the pass
                    // that first published the PAR also planned the remap (a CI run saw no
                    // read in between), the first read with the remap planned: the operator
                    // commits the status before any worker moves and does not measure again
                    // until every rank serves the new generation, so its PAR is still the
                    // initial placement's.
                    let unplanned = st["remap"].is_null() || par_before_remap.is_none();
                    if applied == generation0 && remap.is_none() && unplanned {
                        par_before_remap = Some(w);
                        // `kubectl get moed` under the initial placement, read again when the
                        // PAR it would show changed.
                        if kubectl_before.as_ref().is_none_or(|(_, p)| (p - w).abs() > 1e-9) {
                            kubectl_before = Some(kubectl_par(&cluster, ns, name)?);
                        }
                    }
                }
                let last = &st["lastRemap"];
                if last["result"] == "Succeeded"
                    && last["generation"].as_u64().is_some_and(|g| g > generation0)
                    && last["parAfter"].is_number()
                {
                    remap = Some(last.clone());
                }
            }
        }
        // Enough: the remap finished, its PAR after was measured, and rounds ran after it.
        if let Some(r) = &remap {
            let finished = r["finishedAt"].as_str().and_then(unix_seconds);
            let after = rounds
                .iter()
                .filter(|x| finished.is_some_and(|f| x.started_at > f + 1.0))
                .count();
            if after >= ROUNDS_AFTER {
                stopped_by_us = true;
                child.start_kill()?;
                break child.wait().await?;
            }
        }
        if Instant::now() > deadline {
            child.start_kill()?;
            bail!(
                "no remap with a measured PAR after 600 s of generation; rounds {rounds:?}; PAR samples {samples:?}"
            );
        }
    };
    // Rounds in flight when the scenario stopped the instance are not counted.
    let errors = stderr_task.await.unwrap_or_default();
    let remap = match remap {
        Some(r) => r,
        None => {
            let o = get_moed(&client, ns, name).await?;
            bail!(
                "the attention instance stopped ({exit}) before a remap finished: {errors}\nstatus {}",
                status(&o)
            );
        }
    };
    ensure!(
        stopped_by_us || exit.success(),
        "the attention instance failed ({exit}): {errors}"
    );

    // --- every round identical to transformers alone, before, during and after the remap -------
    ensure!(!rounds.is_empty(), "no rounds");
    for r in &rounds {
        ensure!(
            r.ok && r.identical == r.prompts && r.prompts > 0,
            "round {} differs from transformers: {}",
            r.index,
            r.line
        );
    }
    // status times are whole seconds (RFC 3339 without fractions): a round counts as before
    // the remap when it finished before the second the remap started in, as after when it
    // started after the second the remap finished in.
    let remap_started = remap["startedAt"]
        .as_str()
        .and_then(unix_seconds)
        .context("startedAt")?;
    let remap_finished = remap["finishedAt"]
        .as_str()
        .and_then(unix_seconds)
        .context("finishedAt")?
        + 1.0;
    let before = rounds
        .iter()
        .filter(|r| r.finished_at < remap_started)
        .count();
    let during = rounds
        .iter()
        .filter(|r| r.finished_at >= remap_started && r.started_at <= remap_finished)
        .count();
    let after = rounds
        .iter()
        .filter(|r| r.started_at > remap_finished)
        .count();
    println!(
        "{} rounds identical to transformers: {before} before the remap, {during} overlapping it, {after} after",
        rounds.len()
    );
    ensure!(
        before >= 1 && after >= ROUNDS_AFTER,
        "the rounds do not span the remap"
    );

    // --- the remap and the PAR of the served traffic ---------------------------------------------
    let generation = remap["generation"].as_u64().context("generation")?;
    let (committed, _) = committed_placement(&client, ns, name).await?;
    ensure!(
        committed >= generation && generation > generation0,
        "committed generation {committed}, remap {generation}, initial {generation0}"
    );
    let par_before = remap["parBefore"].as_f64().context("parBefore")?;
    let par_after = remap["parAfter"].as_f64().context("parAfter")?;
    println!("lastRemap: {remap}");
    ensure!(
        remap["trigger"] == "Threshold",
        "the remap was not driven by the load: {remap}"
    );
    ensure!(
        par_after < par_before,
        "the remapped layers' PAR did not fall: {par_before} -> {par_after}"
    );
    // status.imbalance: the worst PAR read under the initial placement against the reads once
    // the new placement's window was trusted (after parAfter was measured).
    let par_initial = par_before_remap.context("no PAR read under the initial placement")?;
    let o = get_moed(&client, ns, name).await?;
    let st = status(&o);
    let par_now = st["imbalance"]["worstPar"].as_f64().context("worstPar")?;
    println!(
        "status.imbalance.worstPar: {par_initial:.3} under generation {generation0}, {par_now:.3} under generation {}",
        st["placement"]["appliedGeneration"]
    );
    ensure!(
        par_now < par_initial,
        "status PAR did not fall after the remap: {par_initial} -> {par_now} (samples {samples:?})"
    );
    let (table_before, shown_before) =
        kubectl_before.context("no kubectl PAR under the initial placement")?;
    let (table, shown) = kubectl_par(&cluster, ns, name)?;
    println!(
        "kubectl get moed under the initial placement:\n{table_before}\nafter the remap:\n{table}"
    );
    ensure!(
        shown < shown_before,
        "kubectl get moed shows PAR {shown} after the remap, not below {shown_before} before it"
    );
    println!(
        "scenario took {:.1} s (cluster and operator excluded)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
