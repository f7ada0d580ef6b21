//! The ranks a recording polls: worker addresses given with `--worker`, or a MoEDeployment's
//! pods reached through the API server (`--deployment`, [`ClusterRanks`]).

use futures::StreamExt;
use moe_api::{API_PREFIX, WorkerStatus};

use super::REQUEST_TIMEOUT;
use super::answer::{Fetched, Poll};
use super::cluster::{ClusterRanks, Settings};
use crate::Fail;

/// What [`check_group`] tells the user to do, per way of naming the ranks.
pub struct Hints {
    /// About ranks nobody polls.
    pub missing: &'static str,
    /// About ranks of different groups, or one rank twice.
    pub mixed: &'static str,
}

const WORKER_HINTS: Hints = Hints {
    missing: "no --worker: the group's load is the sum over every rank, so give each rank's \
              address",
    mixed: "give each rank's address once, all of one group",
};

const POD_HINTS: Hints = Hints {
    missing: "no pod serving it (the group is starting, or scaling): record once \
              `kubectl get moedeployment` shows it Ready",
    mixed: "the deployment's pods serve more than one group (it is being replaced?): record \
            once `kubectl get moedeployment` shows it Ready",
};

/// Ranks asked at once at most: each request is a port-forward stream through the API server
/// (or a connection to a worker), and a group of 64 ranks asked one after another waits 64
/// round trips per poll.
const CONCURRENT_RANKS: usize = 16;

/// The ranks polled, each under a label for messages (its address).
pub enum Ranks {
    Workers(WorkerUrls),
    Cluster(Box<ClusterRanks>),
}

impl Ranks {
    pub fn labels(&self) -> &[String] {
        match self {
            Ranks::Workers(w) => &w.roots,
            Ranks::Cluster(c) => c.labels(),
        }
    }

    pub fn hints(&self) -> &'static Hints {
        match self {
            Ranks::Workers(_) => &WORKER_HINTS,
            Ranks::Cluster(_) => &POD_HINTS,
        }
    }

    /// The deployment recorded and its settings (`--deployment`); `None` for `--worker`.
    pub async fn settings(&self) -> Option<Result<Settings, String>> {
        match self {
            Ranks::Workers(_) => None,
            Ranks::Cluster(c) => Some(c.settings().await),
        }
    }

    /// `GET /v1{path}` from rank `i` (in [`Ranks::labels`] order), decoded.
    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &mut self,
        i: usize,
        path: &str,
    ) -> Result<T, Poll> {
        let full = format!("{API_PREFIX}{path}");
        let fetched = match self {
            Ranks::Workers(w) => w.get(i, &full).await.map_err(Poll::Retry)?,
            Ranks::Cluster(c) => c.get(i, &full).await?,
        };
        decode(&self.labels()[i], &full, fetched)
    }

    /// `GET /v1{path}` from every rank, in [`Ranks::labels`] order, decoded; up to
    /// [`CONCURRENT_RANKS`] asked at once. A failure that ends the recording
    /// ([`Poll::Stop`]) wins over one worth retrying; otherwise the first rank's failure.
    pub async fn get_json_all<T: serde::de::DeserializeOwned>(
        &mut self,
        path: &str,
    ) -> Result<Vec<T>, Poll> {
        let full = format!("{API_PREFIX}{path}");
        let fetched: Vec<Result<Fetched, Poll>> = match self {
            Ranks::Workers(w) => {
                let (w, full) = (&*w, &full);
                futures::stream::iter(0..w.roots.len())
                    .map(|i| async move { w.get(i, full).await.map_err(Poll::Retry) })
                    .buffered(CONCURRENT_RANKS)
                    .collect()
                    .await
            }
            Ranks::Cluster(c) => c.get_all(&full, CONCURRENT_RANKS).await,
        };
        let mut decoded: Vec<Result<T, Poll>> = fetched
            .into_iter()
            .zip(self.labels())
            .map(|(f, label)| f.and_then(|f| decode(label, &full, f)))
            .collect();
        if let Some(stop) = decoded.iter().position(|d| matches!(d, Err(Poll::Stop(_))))
            && let Err(e) = decoded.swap_remove(stop)
        {
            return Err(e);
        }
        decoded.into_iter().collect()
    }
}

/// One rank's answer to `GET {label}{full}`, decoded; an HTTP error status is a failure.
fn decode<T: serde::de::DeserializeOwned>(
    label: &str,
    full: &str,
    fetched: Fetched,
) -> Result<T, Poll> {
    if !(200..300).contains(&fetched.status) {
        let text = String::from_utf8_lossy(&fetched.body);
        let text: String = text.chars().take(200).collect();
        return Err(Poll::Retry(format!(
            "GET {label}{full}: HTTP {} {}",
            fetched.status,
            text.trim()
        )));
    }
    serde_json::from_slice(&fetched.body)
        .map_err(|e| Poll::Retry(format!("GET {label}{full}: {e}")))
}

/// Ranks at the addresses given with `--worker`.
pub struct WorkerUrls {
    client: reqwest::Client,
    /// `http://host:port`, without the API prefix: also the label.
    roots: Vec<String>,
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
        Ok(Self { client, roots })
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
/// group, each once; `hints` say what to do otherwise.
pub fn check_group(
    labels: &[String],
    statuses: &[WorkerStatus],
    hints: &Hints,
) -> Result<(), String> {
    let world = statuses.first().map_or(0, |s| s.world_size);
    let mut seen: Vec<Option<&str>> = vec![None; world];
    for (label, s) in labels.iter().zip(statuses) {
        if s.world_size != world {
            return Err(format!(
                "{label} is rank {} of {} ranks, {} rank {} of {world}: {}",
                s.rank, s.world_size, labels[0], statuses[0].rank, hints.mixed
            ));
        }
        match seen.get_mut(s.rank) {
            Some(Some(other)) => {
                return Err(format!(
                    "{label} and {other} are both rank {}: {}",
                    s.rank, hints.mixed
                ));
            }
            Some(slot) => *slot = Some(label),
            None => return Err(format!("{label} reports rank {} of {world}", s.rank)),
        }
    }
    // Ranks of one group share its control token; two deployments of the same size do not.
    let ids: Vec<&str> = statuses
        .iter()
        .filter_map(|s| s.control_token_id.as_deref())
        .collect();
    if ids.windows(2).any(|w| w[0] != w[1]) {
        return Err(format!(
            "the ranks answer with different control tokens: they are ranks of different \
             groups ({}); {}",
            labels.join(", "),
            hints.mixed
        ));
    }
    let absent: Vec<String> = (0..world)
        .filter(|&r| seen[r].is_none())
        .map(|r| r.to_string())
        .collect();
    if !absent.is_empty() {
        return Err(format!(
            "rank{} {} of the group's {world} ha{} {}",
            if absent.len() == 1 { "" } else { "s" },
            absent.join(", "),
            if absent.len() == 1 { "s" } else { "ve" },
            hints.missing
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
        assert!(check_group(&urls[..2], &[token(0, "x"), token(1, "x")], &WORKER_HINTS).is_ok());
        let e =
            check_group(&urls[..2], &[token(0, "x"), token(1, "y")], &WORKER_HINTS).unwrap_err();
        assert!(e.contains("ranks of different groups"), "{e}");
        assert!(check_group(&urls[..2], &[status(1, 2), status(0, 2)], &WORKER_HINTS).is_ok());
        let e = check_group(&urls[..2], &[status(0, 3), status(2, 3)], &WORKER_HINTS).unwrap_err();
        assert!(e.contains("rank 1 of the group's 3 has no --worker"), "{e}");
        let e = check_group(
            &urls,
            &[status(0, 3), status(1, 3), status(1, 3)],
            &WORKER_HINTS,
        )
        .unwrap_err();
        assert!(
            e.contains("b and c are both rank 1") || e.contains("c and b"),
            "{e}"
        );
        let e = check_group(&urls[..2], &[status(0, 2), status(1, 4)], &WORKER_HINTS).unwrap_err();
        assert!(e.contains("rank 1 of 4 ranks"), "{e}");
        // Pods found for a deployment: what went wrong is not the user's list.
        let e = check_group(&urls[..2], &[status(0, 2), status(0, 2)], &POD_HINTS).unwrap_err();
        assert!(e.contains("serve more than one group"), "{e}");
        let e = check_group(&urls[..1], &[status(0, 2)], &POD_HINTS).unwrap_err();
        assert!(e.contains("has no pod serving it"), "{e}");
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
