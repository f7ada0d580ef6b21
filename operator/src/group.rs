//! EP group restarts as pure decisions: which rank failure breaks the group, whether the
//! restart budget and backoff allow restarting it now, and which deployments a ConfigMap event
//! concerns.
//!
//! NCCL communicators do not survive a lost rank, so the whole group restarts together (as
//! LeaderWorkerSet's `RecreateGroupOnPodRestart` does) when a rank's container restarted or its
//! pod was replaced while the rest of the group is older.

use std::time::Duration;

use jiff::Timestamp;

use crate::crd::{GroupRestartPolicy, RankPod};

/// Why the operator restarted the whole group (event note, status, metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartReason {
    /// A rank's container restarted (the worker exited: its peer died, OOM, crash...).
    RankRestarted,
    /// A rank's pod was deleted or replaced while other ranks of the group kept running.
    RankLost,
    /// The worker spec (group hash) changed.
    SpecChanged,
    /// A rank failed a remap; the group reloads the committed placement.
    RemapFailed,
}

impl RestartReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RestartReason::RankRestarted => "RankRestarted",
            RestartReason::RankLost => "RankLost",
            RestartReason::SpecChanged => "SpecChanged",
            RestartReason::RemapFailed => "RemapFailed",
        }
    }

    /// Restarts caused by failures use the budget and the backoff; spec changes do not.
    pub fn budgeted(self) -> bool {
        !matches!(self, RestartReason::SpecChanged)
    }
}

/// A rank failure that breaks the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankFailure {
    pub reason: RestartReason,
    pub message: String,
}

/// Compares the group's pods as recorded (`status.rankPods`) with the live pods of the current
/// group hash (one entry per rank that has a live pod).
///
/// * A recorded rank whose pod now restarted more often: `RankRestarted`.
/// * A recorded rank whose pod is gone or has another uid while another recorded rank still
///   runs its recorded pod: `RankLost`. When every recorded pod is gone the whole group was
///   replaced (by the operator or someone else): not a rank failure.
/// * A rank without a record is joining the group (formation, after a restart): nothing.
///
/// A group of one rank has no communicator to break: never a failure.
pub fn detect_failure(recorded: &[RankPod], live: &[RankPod], ranks: u32) -> Option<RankFailure> {
    if ranks <= 1 {
        return None;
    }
    let recorded: Vec<&RankPod> = recorded.iter().filter(|r| r.rank < ranks).collect();
    let live_of = |rank: u32| live.iter().find(|p| p.rank == rank);
    let mut restarted = Vec::new();
    for r in &recorded {
        if let Some(p) = live_of(r.rank)
            && p.uid == r.uid
            && p.restarts > r.restarts
        {
            restarted.push(r.rank);
        }
    }
    if !restarted.is_empty() {
        return Some(RankFailure {
            reason: RestartReason::RankRestarted,
            message: format!(
                "rank{} {} restarted",
                if restarted.len() > 1 { "s" } else { "" },
                list(&restarted)
            ),
        });
    }
    let survivors = recorded
        .iter()
        .filter(|r| live_of(r.rank).is_some_and(|p| p.uid == r.uid))
        .count();
    let lost: Vec<u32> = recorded
        .iter()
        .filter(|r| live_of(r.rank).is_none_or(|p| p.uid != r.uid))
        .map(|r| r.rank)
        .collect();
    if survivors > 0 && !lost.is_empty() {
        return Some(RankFailure {
            reason: RestartReason::RankLost,
            message: format!(
                "the pod{} of rank{} {} {} deleted or replaced",
                if lost.len() > 1 { "s" } else { "" },
                if lost.len() > 1 { "s" } else { "" },
                list(&lost),
                if lost.len() > 1 { "were" } else { "was" }
            ),
        });
    }
    None
}

fn list(ranks: &[u32]) -> String {
    ranks
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The restart times that still count: within the window, oldest first.
pub fn recent_restarts(
    policy: &GroupRestartPolicy,
    restarts: &[Timestamp],
    now: Timestamp,
) -> Vec<Timestamp> {
    let window = i64::from(policy.window_seconds);
    let mut recent: Vec<Timestamp> = restarts
        .iter()
        .copied()
        .filter(|t| now.as_second().saturating_sub(t.as_second()) < window)
        .collect();
    recent.sort();
    recent
}

/// Delay before the restart that follows `recent` restarts in the window: none for the first,
/// then `initialBackoffSeconds`, doubled for each further one, at most `maxBackoffSeconds`.
pub fn backoff(policy: &GroupRestartPolicy, recent: usize) -> Duration {
    if recent == 0 {
        return Duration::ZERO;
    }
    let exp = u32::try_from(recent - 1).unwrap_or(u32::MAX).min(30);
    let secs = u64::from(policy.initial_backoff_seconds)
        .saturating_mul(1u64 << exp)
        .min(u64::from(policy.max_backoff_seconds));
    Duration::from_secs(secs)
}

/// Whether a failure-driven restart may happen now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// Restart now.
    Restart,
    /// The backoff since the last restart has not passed: try again after `wait`.
    Backoff {
        wait: Duration,
        /// When the backoff ends (stable across reconciles, for messages).
        at: Timestamp,
        /// The backoff delay.
        delay: Duration,
        recent: usize,
    },
    /// `maxRestarts` restarts within the window: hold until `until` (the oldest one leaves the
    /// window).
    Exhausted { until: Timestamp, recent: usize },
}

/// The restart budget and backoff, given the restarts within the window (`recent`, oldest
/// first, as from [`recent_restarts`]).
pub fn gate(policy: &GroupRestartPolicy, recent: &[Timestamp], now: Timestamp) -> Gate {
    let n = recent.len();
    if n >= policy.max_restarts as usize {
        // The budget frees when the oldest restart that still counts leaves the window; with
        // a budget of 0 nothing ever frees it.
        let oldest = if policy.max_restarts == 0 {
            None
        } else {
            recent.get(n - policy.max_restarts as usize)
        };
        let until = oldest
            .and_then(|t| {
                t.checked_add(jiff::SignedDuration::from_secs(i64::from(
                    policy.window_seconds,
                )))
                .ok()
            })
            .unwrap_or(Timestamp::MAX);
        return Gate::Exhausted { until, recent: n };
    }
    let Some(last) = recent.last() else {
        return Gate::Restart;
    };
    let delay = backoff(policy, n);
    let elapsed = now.duration_since(*last);
    let elapsed = Duration::try_from(elapsed).unwrap_or(Duration::ZERO);
    if elapsed >= delay {
        Gate::Restart
    } else {
        let at = jiff::SignedDuration::try_from(delay)
            .ok()
            .and_then(|d| last.checked_add(d).ok())
            .unwrap_or(now);
        Gate::Backoff {
            wait: delay - elapsed,
            at,
            delay,
            recent: n,
        }
    }
}

/// The message of `Degraded/RestartBudgetExhausted`: what happened and what to do.
pub fn exhausted_message(
    policy: &GroupRestartPolicy,
    failure: &RankFailure,
    recent: usize,
    until: Timestamp,
    name: &str,
) -> String {
    let when = if until == Timestamp::MAX {
        "maxRestarts is 0, so the operator never restarts it".to_string()
    } else {
        format!("the next restart is allowed at {until}")
    };
    format!(
        "{}, but the EP group was already restarted {recent} times within {}s \
         (spec.groupRestartPolicy.maxRestarts: {}): {when}. Find why ranks fail \
         (kubectl logs -l app.kubernetes.io/instance={name} --previous; kubectl describe pods), \
         fix it (a spec change restarts the group at once), or raise maxRestarts",
        failure.message, policy.window_seconds, policy.max_restarts
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(rank: u32, uid: &str, restarts: u32) -> RankPod {
        RankPod {
            rank,
            uid: uid.into(),
            restarts,
        }
    }

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    fn policy(max: u32, window: u32, base: u32, cap: u32) -> GroupRestartPolicy {
        GroupRestartPolicy {
            max_restarts: max,
            window_seconds: window,
            initial_backoff_seconds: base,
            max_backoff_seconds: cap,
        }
    }

    #[test]
    fn a_restarted_container_breaks_the_group() {
        let rec = [pod(0, "a", 0), pod(1, "b", 2)];
        let f = detect_failure(&rec, &[pod(0, "a", 0), pod(1, "b", 3)], 2).unwrap();
        assert_eq!(f.reason, RestartReason::RankRestarted);
        assert_eq!(f.message, "rank 1 restarted");
        assert_eq!(detect_failure(&rec, &rec, 2), None, "unchanged counts");
    }

    #[test]
    fn a_replaced_or_missing_pod_is_a_lost_rank_while_others_are_older() {
        let rec = [pod(0, "a", 0), pod(1, "b", 0), pod(2, "c", 0)];
        let f = detect_failure(&rec, &[pod(0, "a", 0), pod(1, "x", 0), pod(2, "c", 0)], 3);
        assert_eq!(f.unwrap().reason, RestartReason::RankLost);
        let f = detect_failure(&rec, &[pod(0, "a", 0), pod(2, "c", 0)], 3).unwrap();
        assert_eq!(f.reason, RestartReason::RankLost);
        assert!(f.message.contains("rank 1 was"), "{}", f.message);
        // The whole group replaced (nobody older left): not a rank failure.
        assert_eq!(detect_failure(&rec, &[pod(0, "x", 0)], 3), None);
        assert_eq!(detect_failure(&rec, &[], 3), None);
    }

    #[test]
    fn joining_ranks_and_single_rank_groups_are_not_failures() {
        // Formation: ranks appear one after another.
        let rec = [pod(0, "a", 0)];
        assert_eq!(
            detect_failure(&rec, &[pod(0, "a", 0), pod(1, "b", 0)], 2),
            None
        );
        assert_eq!(detect_failure(&[], &[pod(0, "a", 5)], 2), None);
        // One rank: no peers, no communicator to break.
        assert_eq!(detect_failure(&rec, &[pod(0, "a", 3)], 1), None);
        // Records beyond the EP size are ignored.
        assert_eq!(
            detect_failure(&[pod(0, "a", 0), pod(5, "z", 0)], &[pod(0, "a", 0)], 2),
            None
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = policy(10, 3600, 10, 60);
        let secs: Vec<u64> = (0..6).map(|n| backoff(&p, n).as_secs()).collect();
        assert_eq!(secs, vec![0, 10, 20, 40, 60, 60]);
        assert_eq!(backoff(&p, 1000).as_secs(), 60);
    }

    #[test]
    fn restarts_outside_the_window_do_not_count() {
        let p = policy(3, 100, 10, 60);
        let r = recent_restarts(&p, &[t(150), t(50), t(0), t(100)], t(160));
        assert_eq!(
            r,
            vec![t(100), t(150)],
            "oldest first, older than 100 s dropped"
        );
    }

    #[test]
    fn gate_restarts_backs_off_and_exhausts() {
        let p = policy(3, 600, 10, 300);
        assert_eq!(gate(&p, &[], t(0)), Gate::Restart);
        // One restart at t=0: the second waits 10 s.
        assert_eq!(
            gate(&p, &[t(0)], t(4)),
            Gate::Backoff {
                wait: Duration::from_secs(6),
                at: t(10),
                delay: Duration::from_secs(10),
                recent: 1
            }
        );
        assert_eq!(gate(&p, &[t(0)], t(10)), Gate::Restart);
        // Two: the third waits 20 s after the second.
        assert_eq!(
            gate(&p, &[t(0), t(10)], t(15)),
            Gate::Backoff {
                wait: Duration::from_secs(15),
                at: t(30),
                delay: Duration::from_secs(20),
                recent: 2
            }
        );
        // Three within the window: exhausted until the oldest leaves it.
        assert_eq!(
            gate(&p, &[t(0), t(10), t(30)], t(100)),
            Gate::Exhausted {
                until: t(600),
                recent: 3
            }
        );
        // A budget of 0 never restarts.
        let never = policy(0, 600, 10, 300);
        assert_eq!(
            gate(&never, &[], t(0)),
            Gate::Exhausted {
                until: Timestamp::MAX,
                recent: 0
            }
        );
    }

    #[test]
    fn the_exhausted_message_says_what_to_do() {
        let p = policy(3, 600, 10, 300);
        let f = RankFailure {
            reason: RestartReason::RankRestarted,
            message: "rank 1 restarted".into(),
        };
        let m = exhausted_message(&p, &f, 3, t(600), "demo");
        assert!(m.starts_with("rank 1 restarted"), "{m}");
        assert!(m.contains("maxRestarts: 3"), "{m}");
        assert!(m.contains("kubectl logs -l app.kubernetes.io/instance=demo --previous"));
        assert!(m.contains("raise maxRestarts"));
    }

    #[test]
    fn reasons_and_budgets() {
        assert!(!RestartReason::SpecChanged.budgeted());
        assert!(RestartReason::RankLost.budgeted());
        assert_eq!(RestartReason::RemapFailed.as_str(), "RemapFailed");
    }
}
