//! The ranks a recording polls: worker addresses given with `--worker`, or a MoEDeployment's
//! pods reached through the API server (`--deployment`, [`ClusterRanks`]).

use bytes::Bytes;
use moe_api::{API_PREFIX, WorkerStatus};

use super::REQUEST_TIMEOUT;
use super::cluster::ClusterRanks;
use crate::Fail;

/// What `check_group` says about a rank no `--worker` names.
pub const NO_WORKER: &str = "no --worker: the group's load is the sum over every rank, so give \
                             each rank's address";

/// What `check_group` says about a rank no pod of the deployment serves.
pub const NO_POD: &str = "no pod serving it (the group is starting, or scaling): record once \
                          `kubectl get moedeployment` shows it Ready";

/// An answer: its HTTP status and body.
pub struct Fetched {
    pub status: u16,
    pub body: Bytes,
}

/// The ranks polled, each under a label for messages (its address).
pub enum Ranks {
    Workers(WorkerUrls),
    Cluster(Box<ClusterRanks>),
}

impl Ranks {
    pub fn labels(&self) -> &[String] {
        match self {
            Ranks::Workers(w) => &w.labels,
            Ranks::Cluster(c) => c.labels(),
        }
    }

    /// What to do about a rank nobody polls.
    pub fn missing_hint(&self) -> &'static str {
        match self {
            Ranks::Workers(_) => NO_WORKER,
            Ranks::Cluster(_) => NO_POD,
        }
    }

    /// `GET /v1{path}` from rank `i` (in [`Ranks::labels`] order), decoded.
    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &mut self,
        i: usize,
        path: &str,
    ) -> Result<T, String> {
        let full = format!("{API_PREFIX}{path}");
        let fetched = match self {
            Ranks::Workers(w) => w.get(i, &full).await?,
            Ranks::Cluster(c) => c.get(i, &full).await?,
        };
        let label = &self.labels()[i];
        if !(200..300).contains(&fetched.status) {
            let text = String::from_utf8_lossy(&fetched.body);
            let text: String = text.chars().take(200).collect();
            return Err(format!(
                "GET {label}{full}: HTTP {} {}",
                fetched.status,
                text.trim()
            ));
        }
        serde_json::from_slice(&fetched.body).map_err(|e| format!("GET {label}{full}: {e}"))
    }
}

/// Ranks at the addresses given with `--worker`.
pub struct WorkerUrls {
    client: reqwest::Client,
    /// `http://host:port`, without the API prefix.
    roots: Vec<String>,
    labels: Vec<String>,
}

impl WorkerUrls {
    pub fn new(urls: &[String]) -> Result<Self, Fail> {
        let roots = urls
            .iter()
            .map(|u| api_root(u))
            .collect::<Result<Vec<_>, _>>()?;
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| Fail(format!("cannot start the HTTP client: {e}")))?;
        Ok(Self {
            client,
            roots,
            labels: urls.to_vec(),
        })
    }

    async fn get(&self, i: usize, path: &str) -> Result<Fetched, String> {
        let url = format!("{}{path}", self.roots[i]);
        let fail = |e: reqwest::Error| format!("GET {url}: {e}");
        let resp = self.client.get(&url).send().await.map_err(fail)?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await.map_err(fail)?;
        Ok(Fetched { status, body })
    }
}

/// Checks that `statuses` (one per rank polled, labelled by `labels`) are every rank of one
/// group, each once; `missing` says what to do about a rank nobody polls.
pub fn check_group(
    labels: &[String],
    statuses: &[WorkerStatus],
    missing: &str,
) -> Result<(), String> {
    let workers = labels;
    let world = statuses.first().map_or(0, |s| s.world_size);
    let mut seen: Vec<Option<&str>> = vec![None; world];
    for (url, s) in workers.iter().zip(statuses) {
        if s.world_size != world {
            return Err(format!(
                "{url} is rank {} of {} ranks, {} rank {} of {world}: give the ranks of one group",
                s.rank, s.world_size, workers[0], statuses[0].rank
            ));
        }
        match seen.get_mut(s.rank) {
            Some(Some(other)) => {
                return Err(format!(
                    "{url} and {other} are both rank {}: give each rank once",
                    s.rank
                ));
            }
            Some(slot) => *slot = Some(url),
            None => return Err(format!("{url} reports rank {} of {world}", s.rank)),
        }
    }
    // Ranks of one group share its control token; two deployments of the same size do not.
    let ids: Vec<&str> = statuses
        .iter()
        .filter_map(|s| s.control_token_id.as_deref())
        .collect();
    if ids.windows(2).any(|w| w[0] != w[1]) {
        return Err(format!(
            "the ranks answer with different control tokens: they are ranks of \
             different groups ({}); give the ranks of one group",
            workers.join(", ")
        ));
    }
    let absent: Vec<String> = (0..world)
        .filter(|&r| seen[r].is_none())
        .map(|r| r.to_string())
        .collect();
    if !absent.is_empty() {
        return Err(format!(
            "rank{} {} of the group's {world} ha{} {missing}",
            if absent.len() == 1 { "" } else { "s" },
            absent.join(", "),
            if absent.len() == 1 { "s" } else { "ve" },
        ));
    }
    Ok(())
}

/// The root (`http://host:port`, the API prefix taken off) of a `--worker` address.
fn api_root(url: &str) -> Result<String, Fail> {
    let trimmed = url.trim_end_matches('/');
    if !(trimmed.starts_with("http://") || trimmed.starts_with("https://")) {
        return Err(Fail(format!(
            "--worker {url}: give the address as http://HOST:PORT"
        )));
    }
    Ok(trimmed
        .strip_suffix(API_PREFIX)
        .unwrap_or(trimmed)
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(rank: usize, world: usize) -> WorkerStatus {
        serde_json::from_value(serde_json::json!({
            "rank": rank, "worldSize": world, "ready": true, "backend": "cpu",
            "placementGeneration": 0, "layerGenerations": [], "step": 0,
            "tokensPerSecond": 0.0, "traffic": "synthetic", "servedRowsTotal": 0,
            "servedRowsPerSecond": 0.0
        }))
        .unwrap()
    }

    #[test]
    fn every_rank_of_one_group_once() {
        let urls: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        // Two groups of the same size tell themselves apart by their control tokens.
        let token = |rank, id: &str| WorkerStatus {
            control_token_id: Some(id.into()),
            ..status(rank, 2)
        };
        assert!(check_group(&urls[..2], &[token(0, "x"), token(1, "x")], NO_WORKER).is_ok());
        let e = check_group(&urls[..2], &[token(0, "x"), token(1, "y")], NO_WORKER).unwrap_err();
        assert!(e.contains("ranks of different groups"), "{e}");
        assert!(check_group(&urls[..2], &[status(1, 2), status(0, 2)], NO_WORKER).is_ok());
        let e = check_group(&urls[..2], &[status(0, 3), status(2, 3)], NO_WORKER).unwrap_err();
        assert!(e.contains("rank 1 of the group's 3 has no --worker"), "{e}");
        let e = check_group(
            &urls,
            &[status(0, 3), status(1, 3), status(1, 3)],
            NO_WORKER,
        )
        .unwrap_err();
        assert!(
            e.contains("b and c are both rank 1") || e.contains("c and b"),
            "{e}"
        );
        let e = check_group(&urls[..2], &[status(0, 2), status(1, 4)], NO_WORKER).unwrap_err();
        assert!(e.contains("rank 1 of 4 ranks"), "{e}");
        assert_eq!(
            api_root("http://h:1/").map_err(|f| f.0).unwrap(),
            "http://h:1"
        );
        assert_eq!(
            api_root("http://h:1/v1").map_err(|f| f.0).unwrap(),
            "http://h:1"
        );
        assert!(api_root("h:1").is_err());
    }
}
