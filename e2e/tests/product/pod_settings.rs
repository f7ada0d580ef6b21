//! Scenario 9 (issue 14): what real GPU clusters need in the worker pod template, on the real
//! API server. `spec.worker`'s scheduling and pod settings reach the pods the StatefulSet makes
//! (and the group runs with them); admission refuses the operator's own labels, annotations,
//! volume names and mount paths; the group's PodDisruptionBudget makes the eviction API refuse
//! to evict a rank. Failures reach status: pods a ResourceQuota or the namespace's Pod Security
//! level refuse, and an owned object the API server refuses to apply, each become a `Degraded`
//! reason carrying the API server's message, with an event.

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DynamicObject, EvictParams, PostParams};
use serde_json::{Value, json};

use crate::common::*;

/// Scheduling and pod settings every cluster of the harness can honour (the real node and the
/// stand-in): a RuntimeClass and a PriorityClass the test creates, the default scheduler named
/// explicitly, a preferred (not required) node affinity.
fn pod_settings() -> Value {
    json!({
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 10, "preference": {"matchExpressions": [
                {"key": "nvidia.com/gpu.present", "operator": "In", "values": ["true"]}]}}]}},
        "topologySpreadConstraints": [{"maxSkew": 2, "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": "tuned"}}}],
        "schedulerName": "default-scheduler",
        "runtimeClassName": "moe-e2e",
        "priorityClassName": "moe-e2e-gpu",
        "imagePullSecrets": [{"name": "regcred"}],
        "podLabels": {"team": "ml", "volcano.sh/queue-name": "gpu"},
        "podAnnotations": {"example.com/owner": "ml-platform"},
        "volumes": [{"name": "cache", "emptyDir": {"sizeLimit": "64Mi"}}],
        "volumeMounts": [{"name": "cache", "mountPath": "/cache"}],
        "shmSize": "256Mi",
        // Not the default 75 s; short, because the cluster's teardown waits for it.
        "terminationGracePeriodSeconds": 20,
        "probes": {"startup": {"failureThreshold": 200}, "readiness": {"periodSeconds": 3}},
        "podSecurityContext": {"supplementalGroups": [4242]}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_pod_settings_reach_the_pods_and_the_group_has_a_disruption_budget() -> Result<()> {
    moe_e2e::init_tracing();
    let Some((cluster, nodes)) = cluster_with_operator(
        "worker_pod_settings_reach_the_pods_and_the_group_has_a_disruption_budget",
        1,
    )
    .await?
    else {
        return Ok(());
    };
    let client = cluster.client();
    let (ns, name) = ("tuned", "tuned");
    create_namespace(&cluster, ns).await?;
    // runc is the real node's containerd handler; the stand-in ignores handlers.
    cluster
        .apply_yaml(
            "apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata:\n  name: moe-e2e\nhandler: runc\n---\n\
             apiVersion: scheduling.k8s.io/v1\nkind: PriorityClass\nmetadata:\n  name: moe-e2e-gpu\nvalue: 1000\n",
            "default",
        )
        .await?;

    // Admission refuses what would break the operator's own use of the pod.
    let refused = [
        (
            json!({"podLabels": {"app.kubernetes.io/instance": "other"}}),
            "spec.worker.podLabels must not set",
        ),
        (
            json!({"podAnnotations": {"moe-operator.github.io/spec-hash": "x"}}),
            "spec.worker.podAnnotations must not set moe-operator.github.io/group-hash",
        ),
        (
            json!({"volumes": [{"name": "control", "emptyDir": {}}]}),
            "spec.worker.volumes must not be named",
        ),
        (
            json!({"volumes": [{"name": "c", "emptyDir": {}}],
                   "volumeMounts": [{"name": "c", "mountPath": "/dev/shm"}]}),
            "spec.worker.volumeMounts must not mount on",
        ),
        (
            json!({"shmSize": "lots"}),
            "spec.worker.shmSize must be a positive quantity",
        ),
    ];
    let api = moed_api(&client, ns);
    for (i, (worker, want)) in refused.into_iter().enumerate() {
        let mut m = small_moed(&format!("refused-{i}"), "RoundRobin", json!({}), json!({}));
        merge(&mut m["spec"]["worker"], worker);
        m["metadata"]["namespace"] = json!(ns);
        let obj: DynamicObject = serde_json::from_value(m)?;
        match api.create(&PostParams::default(), &obj).await {
            Ok(_) => anyhow::bail!("accepted, but wanted a refusal: {want}"),
            Err(e) => {
                let text = e.to_string();
                ensure!(text.contains(want), "refused with {text}, wanted: {want}");
                println!("refused at admission: {want}");
            }
        }
    }

    let mut m = small_moed(name, "RoundRobin", json!({}), json!({}));
    merge(&mut m["spec"]["worker"], pod_settings());
    apply_moed(&client, ns, &m).await?;
    let o = with_log(
        wait_status(&client, ns, name, T, "Available, 2/2", |st| {
            st["ready"] == "2/2" && cond_is(st, "Available", "True")
        })
        .await,
        &nodes,
    )
    .await?;
    println!("available with the pod settings: {}", status(&o)["ready"]);

    // What the API server stored for the pods the StatefulSet made.
    for pod in worker_pods(&client, ns, name).await? {
        check_pod(&pod).with_context(|| format!("pod {:?}", pod.metadata.name))?;
    }

    // The PodDisruptionBudget: owned, maxUnavailable 0, and the eviction API refuses to evict
    // a rank once the disruption controller has counted the group.
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), ns);
    let t0 = std::time::Instant::now();
    let pdb = moe_e2e::wait::until(T, "the disruption controller counts the group", || async {
        let p = pdbs.get_opt(name).await?;
        Ok(p.filter(|p| {
            p.status
                .as_ref()
                .is_some_and(|s| s.current_healthy == 2 && s.expected_pods == 2)
        }))
    })
    .await?;
    let owner = &pdb.metadata.owner_references.as_ref().context("owner")?[0];
    ensure!(
        owner.kind == "MoEDeployment" && owner.name == name,
        "{owner:?}"
    );
    let st = pdb.status.as_ref().context("pdb status")?;
    ensure!(
        st.disruptions_allowed == 0,
        "disruptionsAllowed {}",
        st.disruptions_allowed
    );
    // kube's default client retries a 429 with backoff for minutes (RetryPolicy::server_retry):
    // ask with one that takes the answer as it is.
    let kubeconfig = kube::config::Kubeconfig::read_from(cluster.kubeconfig_path())?;
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    config.default_retry = false;
    let pods_api: Api<Pod> = Api::namespaced(kube::Client::try_from(config)?, ns);
    match pods_api
        .evict(&format!("{name}-1"), &EvictParams::default())
        .await
    {
        Ok(_) => anyhow::bail!("the eviction of rank 1 was allowed"),
        Err(kube::Error::Api(s)) if s.code == 429 => println!(
            "eviction refused ({:.1} s after the group was available): {}",
            t0.elapsed().as_secs_f64(),
            s.message
        ),
        Err(e) => anyhow::bail!("the eviction failed otherwise: {e}"),
    }
    Ok(())
}

fn check_pod(pod: &Pod) -> Result<()> {
    let meta = &pod.metadata;
    let labels = meta.labels.as_ref().context("labels")?;
    ensure!(
        labels.get("team").map(String::as_str) == Some("ml"),
        "{labels:?}"
    );
    ensure!(
        labels.get("app.kubernetes.io/instance").map(String::as_str) == Some("tuned"),
        "{labels:?}"
    );
    let annotations = meta.annotations.as_ref().context("annotations")?;
    ensure!(
        annotations.get("example.com/owner").map(String::as_str) == Some("ml-platform"),
        "{annotations:?}"
    );
    let spec = pod.spec.as_ref().context("spec")?;
    ensure!(
        spec.tolerations
            .iter()
            .flatten()
            .any(|t| t.key.as_deref() == Some("nvidia.com/gpu")),
        "tolerations {:?}",
        spec.tolerations
    );
    ensure!(
        spec.affinity
            .as_ref()
            .and_then(|a| a.node_affinity.as_ref())
            .is_some(),
        "affinity"
    );
    ensure!(
        spec.topology_spread_constraints
            .as_ref()
            .is_some_and(|t| t[0].max_skew == 2),
        "topologySpreadConstraints"
    );
    ensure!(spec.scheduler_name.as_deref() == Some("default-scheduler"));
    ensure!(spec.runtime_class_name.as_deref() == Some("moe-e2e"));
    ensure!(spec.priority_class_name.as_deref() == Some("moe-e2e-gpu"));
    ensure!(spec.priority == Some(1000), "priority {:?}", spec.priority);
    ensure!(
        spec.image_pull_secrets
            .as_ref()
            .is_some_and(|s| s[0].name == "regcred")
    );
    ensure!(spec.termination_grace_period_seconds == Some(20));
    ensure!(
        spec.security_context
            .as_ref()
            .and_then(|s| s.supplemental_groups.as_deref())
            == Some(&[4242][..])
    );
    let volumes = spec.volumes.as_ref().context("volumes")?;
    let shm = volumes
        .iter()
        .find(|v| v.name == "dshm")
        .and_then(|v| v.empty_dir.as_ref())
        .context("dshm volume")?;
    ensure!(shm.medium.as_deref() == Some("Memory"), "{shm:?}");
    ensure!(
        shm.size_limit.as_ref().map(|q| q.0.as_str()) == Some("256Mi"),
        "{shm:?}"
    );
    ensure!(volumes.iter().any(|v| v.name == "cache"));
    let c = &spec.containers[0];
    let mounts = c.volume_mounts.as_ref().context("mounts")?;
    for path in [
        "/dev/shm",
        "/cache",
        "/etc/moe/control",
        "/etc/moe/placement",
    ] {
        ensure!(
            mounts.iter().any(|m| m.mount_path == path),
            "no mount on {path}"
        );
    }
    let startup = c.startup_probe.as_ref().context("startup probe")?;
    ensure!(startup.failure_threshold == Some(200));
    let readiness = c.readiness_probe.as_ref().context("readiness probe")?;
    ensure!(readiness.period_seconds == Some(3));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_pods_and_refused_applies_reach_status() -> Result<()> {
    moe_e2e::init_tracing();
    let Some((cluster, _nodes)) =
        cluster_with_operator("refused_pods_and_refused_applies_reach_status", 1).await?
    else {
        return Ok(());
    };
    let client = cluster.client();

    // A ResourceQuota that admits no pod.
    let ns = "quota";
    create_namespace(&cluster, ns).await?;
    cluster
        .apply_yaml(
            "apiVersion: v1\nkind: ResourceQuota\nmetadata:\n  name: no-pods\nspec:\n  hard:\n    pods: \"0\"\n",
            ns,
        )
        .await?;
    // Quota admission needs the quota's status (hard limits) from the quota controller.
    let quotas: Api<k8s_openapi::api::core::v1::ResourceQuota> =
        Api::namespaced(client.clone(), ns);
    moe_e2e::wait::until(
        T,
        "the quota controller fills in no-pods' status",
        || async {
            let q = quotas.get_opt("no-pods").await?;
            Ok(q.filter(|q| q.status.as_ref().and_then(|s| s.hard.as_ref()).is_some()))
        },
    )
    .await?;
    apply_moed(
        &client,
        ns,
        &small_moed("starved", "RoundRobin", json!({}), json!({})),
    )
    .await?;
    let o = wait_status(&client, ns, "starved", T, "Degraded/QuotaExceeded", |st| {
        condition(st, "Degraded") == Some(("True".into(), "QuotaExceeded".into()))
    })
    .await?;
    let message = degraded_message(&o);
    println!("quota: {message}");
    ensure!(
        message.contains("StatefulSet quota/starved cannot create worker pods")
            && message.contains("exceeded quota: no-pods"),
        "{message}"
    );
    // The event is posted after the status write that carries the condition: wait for it.
    moe_e2e::wait::until(T, "a QuotaExceeded event for starved", || async {
        let found = events(&client, ns, "starved", "QuotaExceeded").await?;
        Ok((!found.is_empty()).then_some(()))
    })
    .await?;

    // A security-context override the namespace's Pod Security level (restricted) forbids.
    let ns = "pss";
    create_namespace(&cluster, ns).await?;
    let mut m = small_moed("locked", "RoundRobin", json!({}), json!({}));
    m["spec"]["worker"]["securityContext"] = json!({"capabilities": {"add": ["IPC_LOCK"]}});
    apply_moed(&client, ns, &m).await?;
    let o = wait_status(
        &client,
        ns,
        "locked",
        T,
        "Degraded/PodSecurityViolation",
        |st| condition(st, "Degraded") == Some(("True".into(), "PodSecurityViolation".into())),
    )
    .await?;
    let message = degraded_message(&o);
    println!("pod security: {message}");
    ensure!(
        message.contains("violates PodSecurity \"restricted"),
        "{message}"
    );
    ensure!(
        cond_is(status(&o), "Stalled", "True"),
        "needs a fix: Stalled"
    );

    // An owned object the API server refuses: a pod label value Kubernetes does not allow
    // passes the CRD but not the StatefulSet's validation (422).
    let ns = "invalid";
    create_namespace(&cluster, ns).await?;
    let mut m = small_moed("mislabelled", "RoundRobin", json!({}), json!({}));
    m["spec"]["worker"]["podLabels"] = json!({"team": "not a label value!"});
    apply_moed(&client, ns, &m).await?;
    let o = wait_status(
        &client,
        ns,
        "mislabelled",
        T,
        "Degraded/ApplyInvalid",
        |st| condition(st, "Degraded") == Some(("True".into(), "ApplyInvalid".into())),
    )
    .await?;
    let message = degraded_message(&o);
    println!("refused apply: {message}");
    ensure!(
        message.starts_with(
            "the API server refused to apply StatefulSet invalid/mislabelled: 422 Invalid"
        ),
        "{message}"
    );
    moe_e2e::wait::until(T, "an ApplyInvalid event for mislabelled", || async {
        let found = events(&client, ns, "mislabelled", "ApplyInvalid").await?;
        Ok((!found.is_empty()).then_some(()))
    })
    .await?;
    Ok(())
}

fn degraded_message(o: &DynamicObject) -> String {
    status(o)["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Degraded")
        .and_then(|c| c["message"].as_str())
        .unwrap_or_default()
        .to_string()
}
