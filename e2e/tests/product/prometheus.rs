//! A real Prometheus server (built by `scripts/prometheus` into the e2e cache) run as a host
//! process beside the cluster, like the control plane's processes, and the parts of its HTTP
//! API the alert scenario reads (`/api/v1/targets`, `/api/v1/alerts`, `/api/v1/rules`,
//! `/api/v1/query`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use moe_e2e::process::{ManagedProcess, free_port, log_tail};
use serde_json::{Value, json};

/// The binary `scripts/prometheus` installs (`<e2e cache>/bin/prometheus`), if it is there.
pub fn binary() -> Option<PathBuf> {
    let p = moe_e2e::bins::bin_dir()?.join("prometheus");
    p.is_file().then_some(p)
}

/// A running Prometheus; killed (its process group) on drop.
pub struct Prometheus {
    proc: ManagedProcess,
    port: u16,
    http: reqwest::Client,
}

impl Prometheus {
    /// Writes `prometheus.yml` (global intervals, `scrape_configs`) and `rules.yml` into `dir`
    /// and starts `bin` on a free loopback port with its TSDB in `dir/data`; returns once
    /// `/-/ready` answers 200.
    pub async fn start(
        bin: &Path,
        dir: &Path,
        interval: &str,
        scrape_configs: Vec<Value>,
        rules: &Value,
    ) -> Result<Prometheus> {
        std::fs::create_dir_all(dir.join("data"))?;
        let rules_file = dir.join("rules.yml");
        std::fs::write(&rules_file, serde_yaml::to_string(rules)?)?;
        let config = json!({
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [rules_file.to_string_lossy()],
            "scrape_configs": scrape_configs,
        });
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, serde_yaml::to_string(&config)?)?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()?;
        // A free port can be taken between the choice and the bind: try a few.
        let mut last_err = None;
        for attempt in 0..3 {
            let port = free_port()?;
            let mut cmd = Command::new(bin);
            cmd.arg(format!("--config.file={}", config_file.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--log.level=info");
            let log = dir.join(format!("prometheus-{attempt}.log"));
            let mut proc = ManagedProcess::spawn("prometheus", cmd, &log)?;
            let mut p = None;
            for _ in 0..300 {
                if proc.exited().is_some() {
                    break;
                }
                if let Ok(r) = http
                    .get(format!("http://127.0.0.1:{port}/-/ready"))
                    .send()
                    .await
                    && r.status().is_success()
                {
                    p = Some(port);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            match p {
                Some(port) => return Ok(Prometheus { proc, port, http }),
                None => {
                    last_err = Some(format!(
                        "last lines of {}:\n{}",
                        log.display(),
                        log_tail(&log, 30)
                    ));
                    proc.kill();
                }
            }
        }
        bail!(
            "Prometheus did not become ready: {}",
            last_err.unwrap_or_default()
        )
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The tail of its log (for failure messages).
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(self.proc.log_path(), n)
    }

    /// `GET /api/v1/<path>`: the `data` of a `status: success` answer.
    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Result<Value> {
        let url = format!("{}/api/v1/{path}", self.url());
        let body: Value = self
            .http
            .get(&url)
            .query(query)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?
            .json()
            .await
            .with_context(|| format!("GET {url}: not JSON"))?;
        ensure!(body["status"] == "success", "GET {url}: {body}");
        Ok(body["data"].clone())
    }

    /// The active scrape targets (labels after relabeling, `health`, `lastError`, `scrapePool`).
    pub async fn targets(&self) -> Result<Vec<Value>> {
        let d = self.api("targets", &[("state", "active")]).await?;
        Ok(d["activeTargets"].as_array().cloned().unwrap_or_default())
    }

    /// The pending and firing alerts (resolved ones are not listed).
    pub async fn alerts(&self) -> Result<Vec<Value>> {
        let d = self.api("alerts", &[]).await?;
        Ok(d["alerts"].as_array().cloned().unwrap_or_default())
    }

    /// Every alerting rule (`name`, `state`, `health`, `lastError`, its `alerts`).
    pub async fn alerting_rules(&self) -> Result<Vec<Value>> {
        let d = self.api("rules", &[("type", "alert")]).await?;
        Ok(d["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect())
    }

    /// An instant query's result vector.
    pub async fn query(&self, q: &str) -> Result<Vec<Value>> {
        let d = self.api("query", &[("query", q)]).await?;
        Ok(d["result"].as_array().cloned().unwrap_or_default())
    }
}
