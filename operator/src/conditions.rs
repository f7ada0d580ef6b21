//! Status conditions as a pure function of what the reconciler observed.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

pub const AVAILABLE: &str = "Available";
pub const PROGRESSING: &str = "Progressing";
pub const REBALANCING: &str = "Rebalancing";
pub const DEGRADED: &str = "Degraded";
/// kstatus' conventions, so GitOps tools (Flux, Argo CD, `kubectl wait`) read health without
/// custom scripts: `Ready` (True when the group serves: available and not degraded),
/// `Reconciling` (True while the operator is still bringing the group to the spec) and
/// `Stalled` (True when it cannot get there without a fix: a problem in `Degraded` that
/// restarts do not cure).
pub const READY: &str = "Ready";
pub const RECONCILING: &str = "Reconciling";
pub const STALLED: &str = "Stalled";

/// A condition without its transition time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cond {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl Cond {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: &str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason: reason.to_string(),
            message: message.into(),
        }
    }
}

/// A problem that makes the deployment `Degraded`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// CamelCase reason: `InvalidSpec`, `StaticMapMissing`, `StaticMapInvalid`,
    /// `Unschedulable`, `WorkersUnreachable`, `RemapFailed`, `PlannerError`...
    pub reason: String,
    pub message: String,
}

impl Problem {
    pub fn new(reason: &str, message: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// The remap side of the picture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemapView {
    /// A remap to this generation is being executed: `layers_done/layers_total`.
    Running {
        generation: u64,
        layers_done: u32,
        layers_total: u32,
    },
    /// No remap runs; reason and message say why (`Balanced`, `Paused`, `Disabled`,
    /// `Cooldown`, `WaitingForStatistics`, `GroupNotReady`, `RemapFailed`...).
    Idle { reason: String, message: String },
}

/// Everything the conditions depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub ranks: u32,
    pub ready_ranks: u32,
    /// Pods of an older group hash exist (the group is being replaced as a whole).
    pub restarting: bool,
    /// The worker objects could not be created at all (invalid spec, missing static map).
    pub blocked: bool,
    /// A rank failed and the group restart waits for its backoff: the message says when.
    pub restart_pending: Option<String>,
    /// A rank failed and the restart budget is used up: the group is left as it is.
    pub restart_held: Option<String>,
    /// A group restart (after a failure or a spec change) waits for the operator's fleet-wide
    /// restart limit ([`crate::fleet`]): the message says so and when.
    pub fleet_wait: Option<String>,
    pub problems: Vec<Problem>,
    pub remap: RemapView,
}

impl Observed {
    /// The picture when the worker objects cannot be created (or applied) at all: no rank is
    /// counted ready, no restart is in play, and remaps are held with reason `Blocked` and
    /// `message` saying what blocks them.
    pub fn blocked(ranks: u32, problems: Vec<Problem>, message: &str) -> Observed {
        Observed {
            ranks,
            ready_ranks: 0,
            restarting: false,
            blocked: true,
            restart_pending: None,
            restart_held: None,
            fleet_wait: None,
            problems,
            remap: RemapView::Idle {
                reason: "Blocked".into(),
                message: message.into(),
            },
        }
    }
}

/// Degraded reasons that neither time nor restarts cure: the spec, the checkpoint or the image
/// must change (`Stalled` in kstatus' terms).
pub const NEEDS_A_FIX: [&str; 13] = [
    "InvalidSpec",
    "StaticMapMissing",
    "StaticMapInvalid",
    "InvalidShape",
    "UnknownAlgorithm",
    "ModelMismatch",
    "CheckpointInvalid",
    "WorkerConfigInvalid",
    "InvalidImageName",
    "CreateContainerConfigError",
    "PodSecurityViolation",
    "ApplyForbidden",
    "ApplyInvalid",
];

/// The conditions, in a fixed order: Available, Progressing, Rebalancing, Degraded, then
/// kstatus' Ready, Reconciling and Stalled.
pub fn desired(o: &Observed) -> Vec<Cond> {
    let broken = o.restart_pending.as_ref().or(o.restart_held.as_ref());
    let all_ready =
        o.ranks > 0 && o.ready_ranks == o.ranks && !o.restarting && !o.blocked && broken.is_none();
    let available = if o.blocked {
        Cond::new(
            AVAILABLE,
            false,
            "NotCreated",
            "the worker group could not be created; see Degraded",
        )
    } else if let Some(m) = broken {
        Cond::new(AVAILABLE, false, "RankFailed", m.clone())
    } else if all_ready {
        Cond::new(
            AVAILABLE,
            true,
            "AllRanksReady",
            format!("{}/{} ranks ready", o.ready_ranks, o.ranks),
        )
    } else {
        Cond::new(
            AVAILABLE,
            false,
            "RanksNotReady",
            format!("{}/{} ranks ready", o.ready_ranks, o.ranks),
        )
    };
    let progressing = if o.blocked {
        Cond::new(
            PROGRESSING,
            false,
            "Blocked",
            "waiting for the problem in Degraded to be fixed",
        )
    } else if let Some(m) = &o.fleet_wait {
        Cond::new(PROGRESSING, true, "FleetRestartLimit", m.clone())
    } else if o.restarting {
        Cond::new(
            PROGRESSING,
            true,
            "GroupRestarting",
            "the EP group is being replaced as a whole",
        )
    } else if let Some(m) = &o.restart_pending {
        Cond::new(PROGRESSING, true, "RestartBackoff", m.clone())
    } else if o.restart_held.is_some() {
        Cond::new(
            PROGRESSING,
            false,
            "RestartBudgetExhausted",
            "the group restart is held; see Degraded",
        )
    } else if !all_ready {
        Cond::new(
            PROGRESSING,
            true,
            "WaitingForRanks",
            format!("{}/{} ranks ready", o.ready_ranks, o.ranks),
        )
    } else {
        Cond::new(
            PROGRESSING,
            false,
            "RolloutComplete",
            "every rank runs the current spec",
        )
    };
    let rebalancing = match &o.remap {
        RemapView::Running {
            generation,
            layers_done,
            layers_total,
        } => Cond::new(
            REBALANCING,
            true,
            "RemapInProgress",
            format!(
                "moving to placement generation {generation}: {layers_done}/{layers_total} layers switched"
            ),
        ),
        RemapView::Idle { reason, message } => {
            Cond::new(REBALANCING, false, reason, message.clone())
        }
    };
    let degraded = match o.problems.first() {
        Some(p) => {
            let mut message = p.message.clone();
            for more in o.problems.iter().skip(1) {
                message.push_str("; ");
                message.push_str(&more.reason);
                message.push_str(": ");
                message.push_str(&more.message);
            }
            Cond::new(DEGRADED, true, &p.reason, message)
        }
        None => Cond::new(DEGRADED, false, "AsExpected", "no problem detected"),
    };
    let ready = if available.status && !degraded.status {
        Cond::new(READY, true, "Ready", available.message.clone())
    } else if degraded.status {
        Cond::new(READY, false, &degraded.reason, degraded.message.clone())
    } else {
        Cond::new(READY, false, &available.reason, available.message.clone())
    };
    let reconciling = if progressing.status {
        Cond::new(
            RECONCILING,
            true,
            &progressing.reason,
            progressing.message.clone(),
        )
    } else {
        Cond::new(RECONCILING, false, "Reconciled", "the group runs the spec")
    };
    // Stalled: blocked (the spec cannot be applied), the restart budget used up, or a problem
    // only a change can fix; a crash loop or an unreachable rank is a problem the operator is
    // still acting on.
    let needs_fix = o
        .problems
        .iter()
        .any(|p| NEEDS_A_FIX.contains(&p.reason.as_str()));
    let stalled = if o.blocked || o.restart_held.is_some() || needs_fix {
        Cond::new(STALLED, true, &degraded.reason, degraded.message.clone())
    } else {
        Cond::new(STALLED, false, "NotStalled", "no problem blocks progress")
    };
    vec![
        available,
        progressing,
        rebalancing,
        degraded,
        ready,
        reconciling,
        stalled,
    ]
}

/// One word for `kubectl get`.
pub fn phase(o: &Observed) -> &'static str {
    if !o.problems.is_empty() {
        "Degraded"
    } else if o.restarting || o.restart_pending.is_some() || o.fleet_wait.is_some() {
        "Restarting"
    } else if matches!(o.remap, RemapView::Running { .. }) {
        "Rebalancing"
    } else if o.ranks > 0 && o.ready_ranks == o.ranks {
        "Running"
    } else {
        "Pending"
    }
}

/// Merges new conditions into old ones: `lastTransitionTime` moves only when the status flips.
pub fn merge(
    old: &[Condition],
    new: &[Cond],
    now: &Time,
    generation: Option<i64>,
) -> Vec<Condition> {
    new.iter()
        .map(|c| {
            let status = if c.status { "True" } else { "False" };
            let previous = old.iter().find(|o| o.type_ == c.type_);
            let last_transition_time = match previous {
                Some(p) if p.status == status => p.last_transition_time.clone(),
                _ => now.clone(),
            };
            Condition {
                type_: c.type_.to_string(),
                status: status.to_string(),
                reason: c.reason.clone(),
                message: c.message.clone(),
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idle() -> RemapView {
        RemapView::Idle {
            reason: "Balanced".into(),
            message: "ok".into(),
        }
    }

    fn obs() -> Observed {
        Observed {
            ranks: 4,
            ready_ranks: 4,
            restarting: false,
            blocked: false,
            restart_pending: None,
            restart_held: None,
            fleet_wait: None,
            problems: vec![],
            remap: idle(),
        }
    }

    fn get<'a>(c: &'a [Cond], t: &str) -> &'a Cond {
        c.iter().find(|c| c.type_ == t).unwrap()
    }

    /// kstatus' rules for a resource with conditions (sigs.k8s.io/cli-utils kstatus, as Flux
    /// and `kubectl wait` apply them): Reconciling=True -> InProgress, Stalled=True -> Failed,
    /// an unobserved generation -> InProgress, else Current. Written here from its
    /// documentation; this test checks the conditions drive it to the right answer.
    fn kstatus(c: &[Cond], observed_generation_is_current: bool) -> &'static str {
        let is = |t: &str| c.iter().any(|x| x.type_ == t && x.status);
        if is(STALLED) {
            "Failed"
        } else if is(RECONCILING) || !observed_generation_is_current {
            "InProgress"
        } else {
            "Current"
        }
    }

    #[test]
    fn gitops_health_follows_the_kstatus_rules() {
        let healthy = desired(&obs());
        assert_eq!(kstatus(&healthy, true), "Current");
        assert!(get(&healthy, READY).status);
        assert_eq!(
            kstatus(&healthy, false),
            "InProgress",
            "spec not observed yet"
        );
        let mut starting = obs();
        starting.ready_ranks = 1;
        let c = desired(&starting);
        assert_eq!(kstatus(&c, true), "InProgress");
        assert!(!get(&c, READY).status);
        let mut restarting = obs();
        restarting.restarting = true;
        assert_eq!(kstatus(&desired(&restarting), true), "InProgress");
        // A crash loop is a problem the operator still acts on (restarts): not stalled.
        let mut crashing = obs();
        crashing.ready_ranks = 3;
        crashing.problems.push(Problem::new(
            "WorkerCrashLoop",
            "pod demo-1 is crash looping",
        ));
        let c = desired(&crashing);
        assert_eq!(kstatus(&c, true), "InProgress");
        assert_eq!(get(&c, READY).reason, "WorkerCrashLoop");
        // A checkpoint that is not the spec's model, or a used-up restart budget: stalled.
        let mut mismatch = obs();
        mismatch.ready_ranks = 0;
        mismatch.problems.push(Problem::new(
            "ModelMismatch",
            "spec.model.numExperts 64 vs the checkpoint's 60",
        ));
        let c = desired(&mismatch);
        assert_eq!(kstatus(&c, true), "Failed");
        assert_eq!(get(&c, STALLED).reason, "ModelMismatch");
        let mut held = obs();
        held.restart_held = Some("budget used up".into());
        held.problems.push(Problem::new(
            "RestartBudgetExhausted",
            "5 restarts in 3600s",
        ));
        assert_eq!(kstatus(&desired(&held), true), "Failed");
        // A healthy group that is rebalancing is still Ready and Current.
        let mut remap = obs();
        remap.remap = RemapView::Running {
            generation: 2,
            layers_done: 1,
            layers_total: 4,
        };
        let c = desired(&remap);
        assert!(get(&c, READY).status);
        assert_eq!(kstatus(&c, true), "Current");
    }

    #[test]
    fn healthy_group_is_available_and_not_progressing() {
        let c = desired(&obs());
        assert!(get(&c, AVAILABLE).status);
        assert!(!get(&c, PROGRESSING).status);
        assert!(!get(&c, REBALANCING).status);
        assert!(!get(&c, DEGRADED).status);
        assert_eq!(phase(&obs()), "Running");
    }

    #[test]
    fn missing_static_map_is_degraded_with_reason() {
        let mut o = obs();
        o.blocked = true;
        o.ready_ranks = 0;
        o.problems.push(Problem::new(
            "StaticMapMissing",
            "ConfigMap ml/map not found",
        ));
        let c = desired(&o);
        assert!(!get(&c, AVAILABLE).status);
        let d = get(&c, DEGRADED);
        assert!(d.status);
        assert_eq!(d.reason, "StaticMapMissing");
        assert_eq!(phase(&o), "Degraded");
    }

    #[test]
    fn restart_and_remap_show_up() {
        let mut o = obs();
        o.restarting = true;
        assert_eq!(get(&desired(&o), PROGRESSING).reason, "GroupRestarting");
        assert_eq!(phase(&o), "Restarting");
        let mut o = obs();
        o.restart_pending = Some("rank 1 restarted; the group restarts in 10s".into());
        let c = desired(&o);
        assert_eq!(get(&c, PROGRESSING).reason, "RestartBackoff");
        assert_eq!(get(&c, AVAILABLE).reason, "RankFailed");
        assert_eq!(phase(&o), "Restarting");
        let mut o = obs();
        o.remap = RemapView::Running {
            generation: 3,
            layers_done: 1,
            layers_total: 4,
        };
        let c = desired(&o);
        assert!(get(&c, REBALANCING).status);
        assert!(get(&c, REBALANCING).message.contains("1/4"));
        assert_eq!(phase(&o), "Rebalancing");
    }

    #[test]
    fn merge_keeps_transition_time_unless_status_flips() {
        let t0 = Time(jiff::Timestamp::from_second(1_000).unwrap());
        let t1 = Time(jiff::Timestamp::from_second(2_000).unwrap());
        let first = merge(&[], &desired(&obs()), &t0, Some(1));
        let same = merge(&first, &desired(&obs()), &t1, Some(1));
        assert_eq!(first, same);
        let mut o = obs();
        o.ready_ranks = 3;
        let flipped = merge(&first, &desired(&o), &t1, Some(1));
        let avail = flipped.iter().find(|c| c.type_ == AVAILABLE).unwrap();
        assert_eq!(avail.last_transition_time, t1);
        let degraded = flipped.iter().find(|c| c.type_ == DEGRADED).unwrap();
        assert_eq!(degraded.last_transition_time, t0);
    }
}
