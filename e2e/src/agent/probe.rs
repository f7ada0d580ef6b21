//! Probes: `httpGet` (plain HTTP), `tcpSocket` and `exec`, against the pod's loopback IP.

use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Timing parameters of a probe, with Kubernetes' defaults.
#[derive(Debug, Clone, Copy)]
pub struct ProbeTiming {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl ProbeTiming {
    pub fn of(p: &Probe) -> Self {
        let secs = |v: Option<i32>, d: i32| Duration::from_secs(v.unwrap_or(d).max(0) as u64);
        Self {
            initial_delay: secs(p.initial_delay_seconds, 0),
            period: secs(p.period_seconds, 10).max(Duration::from_millis(100)),
            timeout: secs(p.timeout_seconds, 1).max(Duration::from_millis(100)),
            success_threshold: p.success_threshold.unwrap_or(1).max(1) as u32,
            failure_threshold: p.failure_threshold.unwrap_or(3).max(1) as u32,
        }
    }
}

fn port_of(c: &Container, port: &IntOrString) -> Result<u16> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).map_err(|_| anyhow!("bad probe port {p}")),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .ok_or_else(|| anyhow!("probe port {name:?} is not a named container port")),
    }
}

/// Runs the probe once. `env` and `cwd` are used by exec probes.
pub async fn run_once(
    c: &Container,
    p: &Probe,
    pod_ip: &str,
    env: &[(String, String)],
    cwd: &std::path::Path,
) -> Result<()> {
    let timeout = ProbeTiming::of(p).timeout;
    if let Some(h) = &p.http_get {
        if h.scheme
            .as_deref()
            .is_some_and(|s| !s.eq_ignore_ascii_case("http"))
        {
            bail!("only HTTP probes are supported");
        }
        let port = port_of(c, &h.port)?;
        let host = h.host.clone().unwrap_or_else(|| pod_ip.to_string());
        let headers: Vec<(String, String)> = h
            .http_headers
            .iter()
            .flatten()
            .map(|hh| (hh.name.clone(), hh.value.clone()))
            .collect();
        let (code, _) = crate::http::get_with_headers(
            &host,
            port,
            h.path.as_deref().unwrap_or("/"),
            &headers,
            timeout,
        )
        .await?;
        if (200..400).contains(&code) {
            return Ok(());
        }
        bail!("HTTP probe returned {code}");
    }
    if let Some(t) = &p.tcp_socket {
        let port = port_of(c, &t.port)?;
        let host = t.host.clone().unwrap_or_else(|| pod_ip.to_string());
        tokio::time::timeout(
            timeout,
            tokio::net::TcpStream::connect((host.as_str(), port)),
        )
        .await
        .map_err(|_| anyhow!("TCP probe timed out"))??;
        return Ok(());
    }
    if let Some(e) = &p.exec {
        let cmd = e.command.clone().unwrap_or_default();
        let Some((prog, args)) = cmd.split_first() else {
            bail!("exec probe without command");
        };
        let mut child = tokio::process::Command::new(prog);
        child
            .args(args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(cwd)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        let status = tokio::time::timeout(timeout, child.status())
            .await
            .map_err(|_| anyhow!("exec probe timed out"))??;
        if status.success() {
            return Ok(());
        }
        bail!("exec probe exited with {status}");
    }
    if p.grpc.is_some() {
        bail!("gRPC probes are not supported by the moe-e2e agent");
    }
    bail!("probe has no handler")
}
