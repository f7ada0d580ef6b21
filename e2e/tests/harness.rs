//! Tests of the harness itself on a real local control plane: teardown when a test panics,
//! and the kubelet stand-in's less common features (init containers, emptyDir, downward API
//! volume, service-account credentials, restartPolicy, liveness probe).
//!
//! Skipped (with a printed `SKIPPED` line) when the control-plane binaries are not installed.

use std::time::Duration;

use anyhow::{Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use moe_e2e::{AgentConfig, Bins, Cluster, ImageMap, wait};

const T: Duration = Duration::from_secs(90);

fn alive(pid: u32) -> bool {
    // A zombie still answers kill(0); check /proc state too.
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit(')')
        .next()
        .and_then(|r| r.split_whitespace().next());
    state != Some("Z")
}

/// A test that panics still stops every process it started (control plane and pods).
#[test]
fn teardown_on_panic() -> Result<()> {
    if let Err(why) = Bins::locate() {
        moe_e2e::cluster::print_skip("teardown_on_panic", &why);
        return Ok(());
    }
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u32>>();
    let joined = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(async move {
            let mut cluster = Cluster::start().await.expect("cluster");
            let agent = cluster
                .start_agent(AgentConfig::gpu_nodes(1, 1))
                .await
                .expect("agent");
            let pod: Pod = serde_json::from_value(serde_json::json!({
                "metadata": {"name": "sleeper", "namespace": "default"},
                "spec": {"containers": [{"name": "c", "image": "busybox", "command": ["sleep", "600"]}]},
            }))
            .expect("pod");
            Api::<Pod>::namespaced(cluster.client(), "default")
                .create(&PostParams::default(), &pod)
                .await
                .expect("create pod");
            wait::pods_ready(&cluster.client(), "default", "", 1, T)
                .await
                .expect("pod ready");
            let mut pids: Vec<u32> = Vec::new();
            pids.extend(control_plane_pids(&cluster));
            pids.extend(agent.container_pid("default", "sleeper", "c"));
            tx.send(pids).expect("send");
            panic!("deliberate failure inside a test");
        });
    })
    .join();
    ensure!(joined.is_err(), "the inner test should have panicked");
    let pids = rx.recv()?;
    ensure!(
        pids.len() == 5,
        "expected 4 control-plane pids and 1 container pid, got {pids:?}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let left: Vec<u32> = pids.iter().copied().filter(|p| alive(*p)).collect();
    ensure!(
        left.is_empty(),
        "processes left running after a panic: {left:?}"
    );
    println!("all {} processes stopped after the panic", pids.len());
    Ok(())
}

/// Pids of the control-plane processes whose working directory tree is this cluster's
/// (found through /proc, as the harness does not expose them).
fn control_plane_pids(cluster: &Cluster) -> Vec<u32> {
    let dir = cluster.dir().display().to_string();
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let ours =
            cmd.contains(&dir) || cmd.contains(&format!("127.0.0.1:{}", cluster.etcd_port()));
        if ours && alive(pid) {
            out.push(pid);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_features() -> Result<()> {
    moe_e2e::init_tracing();
    let mut cluster = moe_e2e::cluster_or_skip!("agent_features");
    let client = cluster.client();
    let agent = cluster
        .start_agent(
            AgentConfig::gpu_nodes(1, 8).images(ImageMap::workspace_default().fake("fake-worker")),
        )
        .await?;
    let kubectl = cluster
        .bins()
        .kubectl
        .clone()
        .map(|p| p.display().to_string());

    // Init container -> emptyDir -> main container; downward API volume; SA credentials.
    let whoami = match &kubectl {
        Some(k) => format!("{k} auth whoami -o jsonpath='{{.status.userInfo.username}}'; echo"),
        None => "echo system:serviceaccount:default:default".to_string(),
    };
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "features", "namespace": "default", "labels": {"tier": "gold"}},
        "spec": {
            "restartPolicy": "OnFailure",
            "initContainers": [{
                "name": "init", "image": "busybox",
                "command": ["sh", "-c", "echo from-init > /work/init.txt"],
                "volumeMounts": [{"name": "work", "mountPath": "/work"}],
            }],
            "containers": [{
                "name": "main", "image": "busybox",
                "command": ["sh", "-c"],
                "args": [format!(
                    "cat /work/init.txt; cat /podinfo/labels; echo; {whoami}; \
                     if [ ! -f /work/crashed ]; then touch /work/crashed; exit 3; fi; exec sleep 600"
                )],
                "volumeMounts": [
                    {"name": "work", "mountPath": "/work"},
                    {"name": "podinfo", "mountPath": "/podinfo"},
                ],
                "livenessProbe": {"exec": {"command": ["test", "-f", "/work/crashed"]}, "periodSeconds": 1},
            }],
            "volumes": [
                {"name": "work", "emptyDir": {}},
                {"name": "podinfo", "downwardAPI": {"items": [
                    {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                ]}},
            ],
        },
    }))?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(&PostParams::default(), &pod).await?;
    // First run exits 3 (OnFailure -> restart), second run stays up.
    let p = wait::object::<Pod>(&client, "default", "features", T, |p| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .is_some_and(|c| c.restart_count == 1 && c.ready)
    })
    .await?;
    let st = p.status.clone().unwrap_or_default();
    ensure!(
        st.phase.as_deref() == Some("Running"),
        "phase {:?}",
        st.phase
    );
    let last = st
        .container_statuses
        .and_then(|c| c.into_iter().next())
        .and_then(|c| c.last_state)
        .and_then(|s| s.terminated)
        .map(|t| t.exit_code);
    ensure!(last == Some(3), "lastState exit code {last:?}");
    let init_done = st
        .init_container_statuses
        .and_then(|c| c.into_iter().next())
        .and_then(|c| c.state)
        .and_then(|s| s.terminated)
        .map(|t| t.exit_code);
    ensure!(init_done == Some(0), "init container state {init_done:?}");

    // The container is ready as soon as it starts (no readiness probe): wait for its output.
    let want_sa = kubectl.is_some();
    let logs = wait::until(T, "output of features/main", || {
        let agent = agent.clone();
        async move {
            let logs = agent.logs("default", "features", "main")?;
            let done = logs.contains("from-init")
                && logs.contains("tier=\"gold\"")
                && (!want_sa || logs.contains("system:serviceaccount:"));
            Ok(done.then_some(logs))
        }
    })
    .await;
    let logs = match logs {
        Ok(l) => l,
        Err(e) => {
            let l = agent
                .logs("default", "features", "main")
                .unwrap_or_default();
            anyhow::bail!("{e:#}\nlogs:\n{l}");
        }
    };
    ensure!(
        !want_sa || logs.contains("system:serviceaccount:default:default"),
        "the pod did not authenticate as its service account:\n{logs}"
    );
    println!("init container, emptyDir, downward API, SA token, OnFailure restart: ok");

    // Liveness: removing the file makes the probe fail -> the container is restarted.
    let dir = agent
        .pod_dir("default", "features")
        .ok_or_else(|| anyhow::anyhow!("no pod dir"))?;
    std::fs::remove_file(dir.join("volumes/work/crashed"))?;
    wait::object::<Pod>(&client, "default", "features", T, |p| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .is_some_and(|c| c.restart_count >= 2)
    })
    .await?;
    println!("liveness probe failure restarted the container");

    // Deletion: SIGTERM is ignored, so the agent SIGKILLs after the grace period (2 s), then
    // removes the pod.
    let stubborn: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "stubborn", "namespace": "default"},
        "spec": {
            "terminationGracePeriodSeconds": 2,
            "containers": [{"name": "c", "image": "busybox",
                            "command": ["sh", "-c", "trap '' TERM; echo up; sleep 600"]}],
        },
    }))?;
    pods.create(&PostParams::default(), &stubborn).await?;
    wait::object::<Pod>(&client, "default", "stubborn", T, wait::pod_ready).await?;
    let pid = agent
        .container_pid("default", "stubborn", "c")
        .ok_or_else(|| anyhow::anyhow!("stubborn has no process"))?;
    let t0 = std::time::Instant::now();
    pods.delete("stubborn", &Default::default()).await?;
    wait::deleted::<Pod>(&client, "default", "stubborn", T).await?;
    let took = t0.elapsed();
    ensure!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(15),
        "deletion took {took:?}"
    );
    ensure!(!alive(pid), "process {pid} survived the deletion");
    println!("deletion honoured the grace period ({took:?}) and killed the process");

    // A fake image runs nothing and is Ready at once (for scale tests).
    let fake: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "fake", "namespace": "default"},
        "spec": {"containers": [{"name": "w", "image": "example.com/x/fake-worker:1"}]},
    }))?;
    pods.create(&PostParams::default(), &fake).await?;
    wait::object::<Pod>(&client, "default", "fake", T, wait::pod_ready).await?;
    ensure!(
        agent.container_pid("default", "fake", "w").is_none(),
        "a fake container has a process"
    );
    println!("fake image: ready without a process");

    // The node lifecycle controller sets a pod's Ready condition to False when its node's
    // heartbeat comes late; the agent must report its own view again, as a kubelet would.
    let flip: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "flip", "namespace": "default"},
        "spec": {"containers": [{"name": "c", "image": "busybox", "command": ["sleep", "600"]}]},
    }))?;
    pods.create(&PostParams::default(), &flip).await?;
    wait::object::<Pod>(&client, "default", "flip", T, wait::pod_ready).await?;
    let not_ready = serde_json::json!({"status": {"conditions": [
        {"type": "Ready", "status": "False", "reason": "NodeNotReady"}]}});
    let patched = pods
        .patch_status(
            "flip",
            &PatchParams::default(),
            &Patch::Strategic(&not_ready),
        )
        .await?;
    ensure!(
        !wait::pod_ready(&patched),
        "the patch did not mark flip not ready"
    );
    wait::object::<Pod>(&client, "default", "flip", T, wait::pod_ready).await?;
    println!("a Ready condition set to False by someone else was reported again");
    cluster.ensure_running()?;
    Ok(())
}
