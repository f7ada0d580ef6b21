//! Smoke test of the harness on a real local control plane: API server, CRDs, the StatefulSet
//! and Job controllers, the scheduler binding GPU pods to fake GPU nodes, the kubelet stand-in
//! running containers (env, downward API, configMap volume, HTTP readiness, restarts),
//! and garbage collection.
//!
//! Skipped (with a printed `SKIPPED` line) when the control-plane binaries are not installed;
//! run `e2e/bootstrap.sh` first.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use moe_e2e::{AgentConfig, wait};

const T: Duration = Duration::from_secs(90);

const WORKLOAD: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: smoke
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: web
  namespace: smoke
spec:
  replicas: 2
  serviceName: web
  podManagementPolicy: Parallel
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      terminationGracePeriodSeconds: 2
      containers:
      - name: main
        image: docker.io/library/python:3-slim
        command: ["sh", "-c"]
        args:
        - |
          echo "pod=$(POD_NAME) ns=$POD_NS index=$POD_INDEX ip=$POD_IP greeting=$(cat /etc/cfg/greeting)"
          echo "$GREETING_ENV"
          echo "peer=$PEER"
          exec python3 -m http.server 8080 --bind "$POD_IP"
        env:
        - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
        - {name: POD_NS, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}
        - {name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
        - {name: POD_INDEX, valueFrom: {fieldRef: {fieldPath: "metadata.labels['apps.kubernetes.io/pod-index']"}}}
        - {name: GREETING_ENV, valueFrom: {configMapKeyRef: {name: web-config, key: greeting}}}
        - {name: PEER, value: "web-0.web.smoke.svc:8080"}
        ports:
        - {name: http, containerPort: 8080}
        readinessProbe:
          httpGet: {path: /, port: http}
          periodSeconds: 1
        resources:
          limits: {nvidia.com/gpu: "1"}
        volumeMounts:
        - {name: cfg, mountPath: /etc/cfg}
      volumes:
      - name: cfg
        configMap: {name: web-config}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_smoke() -> Result<()> {
    moe_e2e::init_tracing();
    let mut cluster = moe_e2e::cluster_or_skip!("control_plane_smoke");
    let client = cluster.client();

    let v = client.apiserver_version().await?;
    println!("API server {} at {}", v.git_version, cluster.api_url());
    ensure!(
        v.minor.starts_with("35"),
        "expected Kubernetes 1.35, got {}",
        v.git_version
    );

    // The project's CRD, when it exists, is accepted by the real API server.
    let crd_path = moe_e2e::workspace_root().join("crds/moedeployment.yaml");
    if crd_path.exists() {
        let applied = cluster.apply_file(&crd_path, "default").await?;
        for crd in applied {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let api: Api<CustomResourceDefinition> = Api::all(client.clone());
            wait::until(T, &format!("CRD {name} established"), || {
                let api = api.clone();
                let name = name.clone();
                async move {
                    let c = api.get(&name).await?;
                    let est = c.status.and_then(|s| s.conditions).is_some_and(|cs| {
                        cs.iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                    });
                    Ok(est.then_some(()))
                }
            })
            .await?;
            println!("CRD {name} established");
        }
    } else {
        println!("no crds/moedeployment.yaml yet; CRD check skipped");
    }

    // Two fake GPU nodes served by the agent.
    let agent = cluster.start_agent(AgentConfig::gpu_nodes(2, 4)).await?;
    let nodes: Api<Node> = Api::all(client.clone());
    for n in agent.node_names() {
        let node = nodes.get(&n).await?;
        let gpus = node
            .status
            .and_then(|s| s.allocatable)
            .and_then(|a| a.get(moe_e2e::GPU_RESOURCE).cloned())
            .context("node without GPU capacity")?;
        ensure!(gpus.0 == "4", "node {n} has {} GPUs", gpus.0);
    }

    // The cached kubectl and helm work against the cluster.
    if cluster.bins().kubectl.is_some() {
        let out = cluster.run_kubectl(&["get", "nodes", "-o", "name"])?;
        ensure!(out.contains("node/gpu-node-0"), "kubectl get nodes: {out}");
    }
    if cluster.bins().helm.is_some() {
        cluster.run_helm(&["list", "-A"])?;
    }

    // A StatefulSet whose pods need a GPU: scheduled, run, probed, ready.
    let ns = "smoke";
    cluster.apply_yaml(WORKLOAD, ns).await?;
    // The ConfigMap is created after the StatefulSet on purpose: pods wait for it, as with a
    // kubelet. It is owned by the StatefulSet, so garbage collection must delete it.
    let sts: StatefulSet = Api::namespaced(client.clone(), ns).get("web").await?;
    let mut cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web-config", "namespace": ns},
        "data": {"greeting": "hello from a configmap"},
    }))?;
    cm.metadata.owner_references = Some(vec![
        k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: "apps/v1".into(),
            kind: "StatefulSet".into(),
            name: "web".into(),
            uid: sts.metadata.uid.clone().unwrap_or_default(),
            ..Default::default()
        },
    ]);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    cms.create(&PostParams::default(), &cm).await?;

    let pods = wait::pods_ready(&client, ns, "app=web", 2, T).await?;
    let ip0 = agent.pod_ip(ns, "web-0").context("web-0 has no IP")?;
    for p in &pods {
        let name = p.metadata.name.clone().unwrap_or_default();
        let node = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        let ip = p
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .unwrap_or_default();
        ensure!(node.starts_with("gpu-node-"), "{name} bound to {node:?}");
        ensure!(
            ip.starts_with("127.") && ip != "127.0.0.1",
            "{name} has pod IP {ip}"
        );
        let index = name.rsplit('-').next().unwrap_or_default();
        let logs = agent.logs(ns, &name, "main")?;
        let want =
            format!("pod={name} ns={ns} index={index} ip={ip} greeting=hello from a configmap");
        ensure!(
            logs.contains(&want),
            "logs of {name}:\n{logs}\nwanted: {want}"
        );
        ensure!(
            logs.contains("\nhello from a configmap"),
            "configMapKeyRef env missing:\n{logs}"
        );
        // StatefulSet pod DNS names resolve to pod IPs (substituted by the agent).
        ensure!(
            logs.contains(&format!("peer={ip0}:8080")),
            "pod DNS name not resolved:\n{logs}"
        );
        let (code, _) = moe_e2e::http::get(&ip, 8080, "/", Duration::from_secs(2)).await?;
        ensure!(code == 200, "GET {ip}:8080 returned {code}");
        println!("{name}: node {node}, ip {ip}, ready");
    }

    // A crash: the container restarts per restartPolicy and becomes ready again.
    agent.kill_container(ns, "web-0", "main", libc::SIGKILL)?;
    wait::object::<Pod>(&client, ns, "web-0", T, |p| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .is_some_and(|c| c.restart_count >= 1 && c.ready)
    })
    .await?;
    println!("web-0 restarted after SIGKILL and is ready again");

    // A pod deleted by the user is killed and removed; the StatefulSet replaces it.
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let old_uid = pod_api.get("web-1").await?.metadata.uid;
    pod_api.delete("web-1", &DeleteParams::default()).await?;
    wait::object::<Pod>(&client, ns, "web-1", T, |p| {
        p.metadata.uid != old_uid && wait::pod_ready(p)
    })
    .await?;
    println!("web-1 deleted and replaced");

    // A Job runs to completion (restartPolicy Never, pod phase Succeeded).
    let job: Job = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "once", "namespace": ns},
        "spec": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "c", "image": "busybox", "command": ["sh", "-c", "exit 0"]}],
        }}},
    }))?;
    Api::<Job>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &job)
        .await?;
    wait::object::<Job>(&client, ns, "once", T, |j| {
        j.status.as_ref().and_then(|s| s.succeeded).unwrap_or(0) == 1
    })
    .await?;
    println!("job completed");

    // Garbage collection: deleting the StatefulSet removes its pods and the owned ConfigMap.
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    sts_api.delete("web", &DeleteParams::background()).await?;
    wait::until(T, "pods of web to be gone", || {
        let pod_api = pod_api.clone();
        async move {
            let left = pod_api
                .list(&ListParams::default().labels("app=web"))
                .await?;
            Ok(left.items.is_empty().then_some(()))
        }
    })
    .await?;
    wait::deleted::<ConfigMap>(&client, ns, "web-config", T).await?;
    ensure!(
        !agent.pods().iter().any(|p| p.starts_with("smoke/web-")),
        "agent still runs {:?}",
        agent.pods()
    );
    println!("garbage collection removed pods and the owned ConfigMap");
    cluster.ensure_running()?;
    Ok(())
}
