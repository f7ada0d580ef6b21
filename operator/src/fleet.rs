//! A fleet-wide limit on whole-group restarts: at most N groups restarted per window across
//! every MoEDeployment the operator manages, so that no single cause (a node pool going away,
//! a bad rollout applied to many resources at once, a flapping network) takes the whole fleet
//! down together. Restarts over the limit wait, with a condition and an event saying so, and
//! go ahead as the window frees up.
//!
//! The record is in memory: an operator restart forgets it (at worst one more window's worth
//! of restarts). Per-group budgets (`spec.groupRestartPolicy`) still apply on top.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The limiter shared by all reconciles of one operator process.
#[derive(Debug)]
pub struct RestartLimiter {
    max: u32,
    window: Duration,
    granted: Mutex<VecDeque<Instant>>,
}

/// The answer to a restart request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// Restart now (recorded).
    Go,
    /// Over the limit: try again after `wait`.
    Wait {
        wait: Duration,
        max: u32,
        window: Duration,
    },
}

impl RestartLimiter {
    /// At most `max` restarts within any `window`; `max == 0` means no limit.
    pub fn new(max: u32, window: Duration) -> Self {
        Self {
            max,
            window,
            granted: Mutex::new(VecDeque::new()),
        }
    }

    /// No limit at all.
    pub fn unlimited() -> Self {
        Self::new(0, Duration::from_secs(60))
    }

    /// Asks to restart one group at `now`: granted (and recorded) when fewer than `max`
    /// restarts were granted within the window before `now`.
    pub fn try_acquire(&self, now: Instant) -> Grant {
        if self.max == 0 {
            return Grant::Go;
        }
        let Ok(mut granted) = self.granted.lock() else {
            return Grant::Go;
        };
        while granted
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= self.window)
        {
            granted.pop_front();
        }
        if granted.len() < self.max as usize {
            granted.push_back(now);
            return Grant::Go;
        }
        let oldest = granted.front().copied().unwrap_or(now);
        Grant::Wait {
            wait: (oldest + self.window).saturating_duration_since(now),
            max: self.max,
            window: self.window,
        }
    }
}

impl Grant {
    /// The message of a restart that waits (for the condition and the event).
    pub fn message(&self, what: &str) -> Option<String> {
        match self {
            Grant::Go => None,
            Grant::Wait { wait, max, window } => Some(format!(
                "{what}: the group restart waits {}s: the operator's fleet-wide limit of {max} group restart{} per {}s is reached (--max-group-restarts, MOE_OPERATOR_MAX_GROUP_RESTARTS)",
                wait.as_secs().max(1),
                if *max == 1 { "" } else { "s" },
                window.as_secs()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_max_per_window_then_waits_until_the_oldest_leaves() {
        let l = RestartLimiter::new(2, Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(l.try_acquire(t0), Grant::Go);
        assert_eq!(l.try_acquire(t0 + Duration::from_secs(10)), Grant::Go);
        match l.try_acquire(t0 + Duration::from_secs(20)) {
            Grant::Wait { wait, max, .. } => {
                assert_eq!((wait, max), (Duration::from_secs(40), 2));
            }
            Grant::Go => panic!("a third restart within the window must wait"),
        }
        // Refused requests are not recorded: the slot frees when the first grant leaves.
        assert!(matches!(
            l.try_acquire(t0 + Duration::from_secs(59)),
            Grant::Wait { .. }
        ));
        assert_eq!(l.try_acquire(t0 + Duration::from_secs(60)), Grant::Go);
        assert!(matches!(
            l.try_acquire(t0 + Duration::from_secs(61)),
            Grant::Wait { wait, .. } if wait == Duration::from_secs(9)
        ));
        let message = l
            .try_acquire(t0 + Duration::from_secs(61))
            .message("RankLost: pod demo-1 gone")
            .unwrap();
        assert!(
            message.contains("limit of 2 group restarts per 60s"),
            "{message}"
        );
    }

    #[test]
    fn zero_means_no_limit() {
        let l = RestartLimiter::unlimited();
        let t0 = Instant::now();
        for _ in 0..1000 {
            assert_eq!(l.try_acquire(t0), Grant::Go);
        }
    }
}
