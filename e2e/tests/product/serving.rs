//! Scenario 9: the expert tier's objects on the real API server. A MoEDeployment with
//! `spec.serving` gets its `<name>-experts` Service, `<name>-client-token` Secret and
//! `<name>-workers` NetworkPolicy (owned, with the right selectors and ports), the workers the
//! forward-API settings, status the endpoints; the token survives later reconciles; a
//! pre-existing Secret of the token's name (which the operator may not even read) is left
//! alone and reported as `Degraded/TokenMismatch` once the workers hold its token, and the
//! operator's own Secret replaces it when the user deletes it. (Admission of the forward
//! port: `validation`.)

use std::collections::BTreeMap;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use moe_e2e::wait;
use serde_json::{Value, json};

use crate::common::*;

const FORWARD_PORT: u16 = 8300;

/// [`small_moed`] serving the forward API (synthetic weights serve only when asked), no
/// generator, attention pods labelled `app: attention` as the clients.
fn serving_moed(name: &str) -> Value {
    let mut obj = small_moed(name, "RoundRobin", json!({}), json!({}));
    let spec = obj["spec"].as_object_mut().expect("spec");
    spec.remove("traffic");
    spec.insert(
        "serving".into(),
        json!({"enabled": true, "port": FORWARD_PORT, "maxRowsPerRequest": 256,
               "clients": {"matchLabels": {"app": "attention"}}}),
    );
    obj
}

fn controlled_by(meta: &ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && o.uid == uid && o.kind == "MoEDeployment")
}

fn token_of(s: &Secret) -> Option<String> {
    s.data
        .as_ref()?
        .get("token")
        .map(|b| String::from_utf8_lossy(&b.0).to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_objects_token_and_conflicts() -> Result<()> {
    moe_e2e::init_tracing();
    let Some((cluster, nodes)) =
        cluster_with_operator("serving_objects_token_and_conflicts", 1).await?
    else {
        return Ok(());
    };
    let client = cluster.client();
    let ns = "experts";
    create_namespace(&cluster, ns).await?;
    let name = "tier";
    let created = apply_moed(&client, ns, &serving_moed(name)).await?;
    let uid = created.uid().context("uid")?;

    // --- the owned objects ------------------------------------------------------------------
    let svc: Service = with_log(
        wait::object(&client, ns, &format!("{name}-experts"), T, |_: &Service| {
            true
        })
        .await,
        &nodes,
    )
    .await?;
    ensure!(
        controlled_by(&svc.metadata, &uid),
        "Service not owned: {:?}",
        svc.metadata
    );
    let spec = svc.spec.context("service spec")?;
    ensure!(
        spec.type_.as_deref() == Some("ClusterIP"),
        "type {:?}",
        spec.type_
    );
    ensure!(
        spec.cluster_ip.as_deref().is_some_and(|ip| ip != "None"),
        "no cluster IP: {:?}",
        spec.cluster_ip
    );
    let worker_labels = BTreeMap::from([
        ("app.kubernetes.io/instance".to_string(), name.to_string()),
        (
            "app.kubernetes.io/name".to_string(),
            "moe-worker".to_string(),
        ),
    ]);
    ensure!(
        spec.selector.as_ref() == Some(&worker_labels),
        "selector {:?}",
        spec.selector
    );
    let ports = spec.ports.unwrap_or_default();
    ensure!(
        ports.len() == 1
            && ports[0].port == i32::from(FORWARD_PORT)
            && ports[0].name.as_deref() == Some("forward"),
        "ports {ports:?}"
    );

    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret = secrets.get(&format!("{name}-client-token")).await?;
    ensure!(controlled_by(&secret.metadata, &uid), "Secret not owned");
    let token = token_of(&secret).context("no token in the client-token Secret")?;
    ensure!(token.len() >= 32, "a short token: {token:?}");
    let control = token_of(&secrets.get(&format!("{name}-control")).await?);
    ensure!(
        control.as_deref() != Some(token.as_str()),
        "client token = control token"
    );

    let np: NetworkPolicy = wait::object(
        &client,
        ns,
        &format!("{name}-workers"),
        T,
        |_: &NetworkPolicy| true,
    )
    .await?;
    ensure!(controlled_by(&np.metadata, &uid), "NetworkPolicy not owned");
    let np_spec = serde_json::to_value(np.spec.context("policy spec")?)?;
    ensure!(
        np_spec["podSelector"]["matchLabels"] == json!(worker_labels),
        "policy selects {}",
        np_spec["podSelector"]
    );
    ensure!(
        np_spec["policyTypes"] == json!(["Ingress"]),
        "{}",
        np_spec["policyTypes"]
    );
    let rules = np_spec["ingress"].as_array().context("ingress")?;
    let rule_on = |port: u16| {
        rules
            .iter()
            .find(|r| r["ports"][0]["port"] == json!(port))
            .cloned()
            .unwrap_or(Value::Null)
    };
    let forward = rule_on(FORWARD_PORT);
    ensure!(
        forward["from"] == json!([{"podSelector": {"matchLabels": {"app": "attention"}}}]),
        "forward port admits {}",
        forward["from"]
    );
    let control_rule = rule_on(WORKER_HTTP_PORT);
    let operator_peer = &control_rule["from"][0];
    ensure!(
        operator_peer["namespaceSelector"]["matchLabels"]
            == json!({"kubernetes.io/metadata.name": OPERATOR_NS})
            && operator_peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
                == "moe-operator",
        "control port admits {}",
        control_rule["from"]
    );
    ensure!(
        rules.iter().any(|r| r.get("ports").is_none()
            && r["from"] == json!([{"podSelector": {"matchLabels": worker_labels}}])),
        "the group's own pods are not admitted to its ports: {rules:?}"
    );
    ensure!(rules.len() == 3, "unexpected rules: {rules:?}");

    // --- the workers and status -------------------------------------------------------------
    let sts: StatefulSet = wait::object(&client, ns, name, T, |_: &StatefulSet| true).await?;
    let env = serde_json::to_value(
        &sts.spec
            .context("sts spec")?
            .template
            .spec
            .context("pod spec")?
            .containers[0]
            .env,
    )?;
    let value = |n: &str| {
        env.as_array()
            .and_then(|a| a.iter().find(|e| e["name"] == n))
            .map(|e| e["value"].clone())
            .unwrap_or(Value::Null)
    };
    ensure!(
        value("MOE_TRAFFIC") == "api",
        "MOE_TRAFFIC {}",
        value("MOE_TRAFFIC")
    );
    ensure!(
        value("MOE_FORWARD_PORT") == "8300",
        "MOE_FORWARD_PORT {}",
        value("MOE_FORWARD_PORT")
    );
    ensure!(
        value("MOE_MAX_REQUEST_ROWS") == "256",
        "{}",
        value("MOE_MAX_REQUEST_ROWS")
    );
    let o = wait_status(&client, ns, name, T, "status.serving", |st| {
        st["serving"]["endpoint"].is_string()
    })
    .await?;
    let serving = &status(&o)["serving"];
    ensure!(
        serving["endpoint"] == "tier-experts.experts.svc:8300",
        "{serving}"
    );
    ensure!(
        serving["rankEndpoints"]
            == json!([
                "tier-0.tier-workers.experts.svc:8300",
                "tier-1.tier-workers.experts.svc:8300"
            ]),
        "{serving}"
    );
    ensure!(
        serving["clientTokenSecret"] == "tier-client-token",
        "{serving}"
    );

    // --- the token survives reconciles: a spec change the operator acts on ---------------------
    patch_spec(
        &client,
        ns,
        name,
        json!({"eplb": {"imbalanceThreshold": 1.4}}),
    )
    .await?;
    let generation = get_moed(&client, ns, name).await?.metadata.generation;
    wait_status(
        &client,
        ns,
        name,
        T,
        "observedGeneration caught up",
        move |st| st["observedGeneration"].as_i64() == generation,
    )
    .await?;
    let again = secrets.get(&format!("{name}-client-token")).await?;
    ensure!(
        token_of(&again).as_deref() == Some(token.as_str()),
        "the client token changed"
    );
    ensure!(
        again.metadata.resource_version == secret.metadata.resource_version,
        "the client-token Secret was rewritten"
    );

    // --- a Secret of the token's name that is not the operator's -------------------------------
    let clash = "clash";
    let theirs = Secret {
        metadata: ObjectMeta {
            name: Some(format!("{clash}-client-token")),
            ..Default::default()
        },
        string_data: Some(BTreeMap::from([(
            "token".to_string(),
            "users-own".to_string(),
        )])),
        ..Default::default()
    };
    let theirs = secrets.create(&PostParams::default(), &theirs).await?;
    let clash_uid = apply_moed(&client, ns, &serving_moed(clash))
        .await?
        .uid()
        .context("uid")?;
    // The operator cannot read the Secret (its RBAC grants create only) and never writes it;
    // the workers mount it, and once they are up their status shows another client token.
    let o = with_log(
        wait_status(&client, ns, clash, T, "Degraded/TokenMismatch", |st| {
            condition(st, "Degraded") == Some(("True".into(), "TokenMismatch".into()))
        })
        .await,
        &nodes,
    )
    .await?;
    let message = status(&o)["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Degraded"))
        .map(|c| c["message"].to_string())
        .unwrap_or_default();
    ensure!(
        message.contains("Secret experts/clash-client-token")
            && message.contains("delete the Secret"),
        "Degraded message: {message}"
    );
    let after = secrets.get(&format!("{clash}-client-token")).await?;
    ensure!(
        after.metadata.resource_version == theirs.metadata.resource_version
            && after.metadata.owner_references.is_none(),
        "the user's Secret was touched: {:?}",
        after.metadata
    );
    let mismatch_events = events(&client, ns, clash, "TokenMismatch").await?;
    ensure!(!mismatch_events.is_empty(), "no TokenMismatch event");
    // The user removes their Secret: the operator creates its own (owned, the derived token).
    secrets
        .delete(&format!("{clash}-client-token"), &Default::default())
        .await?;
    let ours: Secret = wait::object(
        &client,
        ns,
        &format!("{clash}-client-token"),
        T,
        |s: &Secret| controlled_by(&s.metadata, &clash_uid),
    )
    .await
    .context("the operator did not create its own client-token Secret")?;
    ensure!(
        token_of(&ours).is_some_and(|t| t.len() == 64 && t != "users-own"),
        "the operator's Secret holds {:?}",
        token_of(&ours)
    );
    Ok(())
}

/// A process beside the cluster calls each rank's forward port as an attention pod would:
/// with the client token it gets the MoE output (200), without it or with another token 401;
/// the control port does not serve the forward API; the rows served reach
/// `status.serving.servedRowsPerSecond`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_expert_tier_answers_only_with_the_token() -> Result<()> {
    use moe_api::forward::Tensor;
    use moe_api::forward::client::{Client, ClientError};

    moe_e2e::init_tracing();
    let Some((cluster, nodes)) =
        cluster_with_operator("the_expert_tier_answers_only_with_the_token", 1).await?
    else {
        return Ok(());
    };
    let client = cluster.client();
    let (ns, name) = ("live", "live");
    create_namespace(&cluster, ns).await?;
    apply_moed(&client, ns, &serving_moed(name)).await?;
    with_log(
        wait_status(&client, ns, name, T, "Available", |st| {
            cond_is(st, "Available", "True")
        })
        .await,
        &nodes,
    )
    .await?;
    let token = wait::until(T, "the client token", || async {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
        Ok(secrets
            .get_opt(&format!("{name}-client-token"))
            .await?
            .as_ref()
            .and_then(token_of))
    })
    .await?;
    let hidden = 64; // small_moed's model
    let rows = 4;
    let x = || Tensor::F32((0..rows * hidden).map(|i| (i % 7) as f32 * 0.1).collect());
    let pods = worker_pods(&client, ns, name).await?;
    ensure!(pods.len() == 2, "{} worker pods", pods.len());
    for pod in &pods {
        let ip = pod_ip(pod).context("pod IP")?;
        let url = format!("http://{ip}:{FORWARD_PORT}");
        let mut with = Client::connect(&url, Some(&token)).await?;
        let out = with
            .forward(0, hidden, x(), None)
            .await
            .with_context(|| format!("{url} with the token"))?;
        ensure!(
            out.len() == rows * hidden && matches!(out, Tensor::F32(_)),
            "{url}: {} values",
            out.len()
        );
        for bad in [None, Some("not-the-token")] {
            let mut c = Client::connect(&url, bad).await?;
            match c.forward(0, hidden, x(), None).await {
                Err(ClientError::Server { status: 401, .. }) => {}
                other => anyhow::bail!("{url} with token {bad:?}: {other:?}"),
            }
        }
        // The control port serves no forward API (the NetworkPolicy tells the two apart).
        let mut control =
            Client::connect(&format!("http://{ip}:{WORKER_HTTP_PORT}"), Some(&token)).await?;
        match control.forward(0, hidden, x(), None).await {
            Err(ClientError::Server { status: 404, .. }) => {}
            other => anyhow::bail!("forward API on the control port: {other:?}"),
        }
        println!("{url}: 200 with the token, 401 without or with another");
    }

    // Traffic shows in status: keep sending until the operator reports it.
    let ip = pod_ip(&pods[0]).context("pod IP")?;
    let mut c = Client::connect(&format!("http://{ip}:{FORWARD_PORT}"), Some(&token)).await?;
    let api = moed_api(&client, ns);
    let deadline = std::time::Instant::now() + T;
    loop {
        for _ in 0..20 {
            c.forward(1, hidden, x(), None).await?;
        }
        let o = api.get(name).await?;
        let served = status(&o)["serving"]["servedRowsPerSecond"]
            .as_f64()
            .unwrap_or(0.0);
        if served > 0.0 {
            println!("status.serving.servedRowsPerSecond = {served}");
            let table = cluster.run_kubectl(&["get", "moed", "-n", ns])?;
            println!("{table}");
            ensure!(table.contains("SERVED/S"), "kubectl get moed:\n{table}");
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "servedRowsPerSecond still 0: {}",
            status(&o)["serving"]
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    Ok(())
}
