//! Helpers shared by the integration tests: in-process groups on loopback.
#![allow(dead_code)]

use std::net::TcpListener;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Parser;
use moe_worker::config::{Args, Config};
use moe_worker::engine::StepRecord;
use moe_worker::{Hooks, Worker};

pub const TOKEN: &str = "s3cret-token";

pub fn config(rank: usize, world: usize, leader_port: u16, extra: &[String]) -> Config {
    let mut argv: Vec<String> = [
        "moe-worker",
        "--rank",
        &rank.to_string(),
        "--world-size",
        &world.to_string(),
        "--leader-addr",
        &format!("127.0.0.1:{leader_port}"),
        "--comm-port",
        &if rank == 0 { leader_port } else { 0 }.to_string(),
        "--http-port",
        "0",
        "--advertise-addr",
        "127.0.0.1",
        "--rendezvous-timeout-seconds",
        "30",
        "--comm-timeout-seconds",
        "30",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.extend(extra.iter().cloned());
    Config::from_args(Args::try_parse_from(argv).expect("arguments parse")).expect("valid config")
}

pub struct Group {
    pub workers: Vec<Worker>,
    pub sinks: Vec<mpsc::Receiver<StepRecord>>,
}

impl Group {
    pub fn url(&self, rank: usize, path: &str) -> String {
        format!("http://{}{}", self.workers[rank].http_addr, path)
    }

    pub async fn wait_ready(&self) {
        let client = reqwest::Client::new();
        for r in 0..self.workers.len() {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let ok = client
                    .get(self.url(r, "/readyz"))
                    .send()
                    .await
                    .map(|resp| resp.status().is_success())
                    .unwrap_or(false);
                if ok {
                    break;
                }
                // A rank whose engine ended before it was ready failed at start (its error is
                // what `stop` would report); say so now rather than after the whole deadline.
                let ended: Vec<usize> = (0..self.workers.len())
                    .filter(|&q| self.workers[q].is_finished())
                    .collect();
                assert!(
                    ended.is_empty(),
                    "ranks {ended:?} ended before the group was ready"
                );
                assert!(Instant::now() < deadline, "rank {r} never became ready");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Stops the group through rank 0 and waits for every rank (all must end Ok).
    pub async fn stop(self) -> Vec<mpsc::Receiver<StepRecord>> {
        self.workers[0].request_stop();
        for (r, w) in self.workers.into_iter().enumerate() {
            tokio::time::timeout(Duration::from_secs(60), w.wait())
                .await
                .unwrap_or_else(|_| panic!("rank {r} did not stop"))
                .unwrap_or_else(|e| panic!("rank {r} failed: {e:#}"));
        }
        self.sinks
    }
}

/// Starts `world` ranks in this process; `extra(rank)` adds flags per rank.
pub async fn start_group(world: usize, extra: impl Fn(usize) -> Vec<String>) -> Group {
    let all: Vec<usize> = (0..world).collect();
    start_group_ranks(world, &all, extra).await
}

/// Starts only `ranks` of a `world`-rank group (the others never come).
pub async fn start_group_ranks(
    world: usize,
    ranks: &[usize],
    extra: impl Fn(usize) -> Vec<String>,
) -> Group {
    let leader = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = leader.local_addr().unwrap().port();
    let mut leader = Some(leader);
    let mut workers = Vec::new();
    let mut sinks = Vec::new();
    for &r in ranks {
        let (tx, rx) = mpsc::channel();
        let hooks = Hooks {
            comm_listener: if r == 0 { leader.take() } else { None },
            http_listener: None,
            forward_listener: None,
            step_sink: Some(tx),
            step_sink_timings_only: false,
            exit_on_hung_collective: false,
        };
        let w = moe_worker::start(config(r, world, port, &extra(r)), hooks)
            .await
            .expect("worker starts");
        workers.push(w);
        sinks.push(rx);
    }
    Group { workers, sinks }
}

pub fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The control token in `dir/token`. Tests call this once per rank while earlier ranks may
/// already be reading the file, so it is replaced by a rename, never truncated in place (a
/// rank that read it half-written failed to start about one run in four on a loaded machine).
pub fn token_file(dir: &std::path::Path) -> String {
    let p = dir.join("token");
    let tmp = tempfile::NamedTempFile::new_in(dir).unwrap();
    std::fs::write(tmp.path(), format!("{TOKEN}\n")).unwrap();
    tmp.persist(&p).unwrap();
    p.to_string_lossy().into_owned()
}

pub async fn get_json<T: serde::de::DeserializeOwned>(url: &str) -> T {
    reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// The body of `GET url` as text (a rank's `/metrics`, say).
pub async fn get_text(url: &str) -> String {
    reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .text()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

pub async fn post_remap(url: &str, token: Option<&str>, body: String) -> (u16, serde_json::Value) {
    let mut req = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = req.send().await.unwrap();
    let code = resp.status().as_u16();
    let v = resp.json().await.unwrap_or(serde_json::Value::Null);
    (code, v)
}
