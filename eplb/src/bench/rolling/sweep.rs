//! One recorded trace replayed with several history lengths (`moectl backtest --history
//! 1,2,4,8`): which H, and which policy, would have served this traffic best. A comparison
//! across H is fair only when every H is scored on the same windows, so the replays are
//! aligned on the newest window: each H keeps the same number of steps (the fewest any H's
//! windows allow, at most the caller's) and its last step is scored on the last window
//! recorded. The oldest windows a replay cannot use with that stride are left out in front.

use super::{MAX_STRIDE, RollingInputs, steps_that_fit};
use crate::bench::BenchShape;
use crate::error::{EplbError, Result};
use crate::load::LoadHistory;
use crate::placement::Placement;

impl RollingInputs {
    /// The replays of one recorded trace planning on each of `histories` windows (as
    /// [`RollingInputs::recorded`] builds each), all scored on the same windows: the same
    /// number of steps, `stride` windows apart, the last one on the newest window. Window
    /// indices (`offset`, [`RollingInputs::scored_at`]) count from the trace's first window
    /// whatever a replay leaves out in front.
    pub fn recorded_alike(
        bs: &BenchShape,
        history: &LoadHistory,
        histories: &[usize],
        stride: usize,
        max_steps: usize,
        start: Option<Placement>,
    ) -> Result<Vec<RollingInputs>> {
        if histories.is_empty() {
            return Err(EplbError::Request("no history length to replay".into()));
        }
        let w = history.num_windows();
        let first = |h: usize| if start.is_some() { 0 } else { h };
        let valid = |h: usize| h > 0 && (1..=MAX_STRIDE).contains(&stride);
        let mut steps = max_steps;
        for &h in histories {
            match steps_that_fit(w, first(h), h, stride).filter(|_| valid(h)) {
                Some(fit) => steps = steps.min(fit),
                // `recorded` says what is wrong: a zero, or how many windows this H needs.
                None => {
                    return Err(Self::recorded(bs, history, h, stride, max_steps, start)
                        .err()
                        .unwrap_or_else(|| {
                            EplbError::Request(format!("a replay planning on {h} windows"))
                        }));
                }
            }
        }
        let mut replays = Vec::with_capacity(histories.len());
        for &h in histories {
            replays.push(Self::recorded_steps(
                bs,
                history,
                h,
                stride,
                steps,
                start.clone(),
                true,
            )?);
        }
        Ok(replays)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::BenchShape;
    use crate::shape::Shape;

    fn trace(windows: usize) -> (BenchShape, LoadHistory) {
        let bs = BenchShape {
            name: "recorded",
            num_layers: 2,
            shape: Shape::new(8, 4, 4, 1, 1).unwrap(),
        };
        let h = LoadHistory::new(
            (0..windows)
                .map(|k| {
                    (0..2)
                        .map(|l| {
                            (0..8)
                                .map(|e| ((e * 7 + k * 3 + l) % 11 + 1) as f64)
                                .collect()
                        })
                        .collect()
                })
                .collect(),
        )
        .unwrap();
        (bs, h)
    }

    #[test]
    fn every_history_is_scored_on_the_same_windows_ending_on_the_newest() {
        let (bs, h) = trace(23);
        for stride in [1, 2, 3] {
            let replays =
                RollingInputs::recorded_alike(&bs, &h, &[1, 2, 4, 5], stride, 64, None).unwrap();
            let scored: Vec<Vec<usize>> = replays
                .iter()
                .map(|r| (0..r.steps).map(|k| r.scored_at(k)).collect())
                .collect();
            // H = 5 without a starting placement: 2H + 1 = 11 windows, then one step a stride.
            assert_eq!(scored[3].len(), (23 - 11) / stride + 1, "stride {stride}");
            for (r, s) in replays.iter().zip(&scored) {
                assert_eq!(s, &scored[0], "H = {}, stride {stride}", r.history);
                assert_eq!(*s.last().unwrap(), 22);
                // Each step plans on the H windows just before the one it is scored on.
                for (k, &scored) in s.iter().enumerate() {
                    let planned = r.history_at(k).unwrap();
                    assert_eq!(
                        planned.windows(),
                        &h.windows()[scored - r.history..scored],
                        "H = {}, stride {stride}, step {k}",
                        r.history
                    );
                    assert_eq!(r.next_at(k), h.windows()[scored].as_slice());
                }
            }
        }
    }

    #[test]
    fn the_caller_caps_the_steps_and_a_history_too_long_is_refused_with_its_needs() {
        let (bs, h) = trace(12);
        let replays = RollingInputs::recorded_alike(&bs, &h, &[2, 1], 1, 3, None).unwrap();
        assert!(replays.iter().all(|r| r.steps == 3 && r.scored_at(2) == 11));
        let err = RollingInputs::recorded_alike(&bs, &h, &[1, 6], 1, 64, None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("needs at least 13"), "{err}");
        let start = replays[0].start.clone();
        // With the placement in use given, H + 1 windows are enough.
        let given = RollingInputs::recorded_alike(&bs, &h, &[1, 6], 1, 64, Some(start)).unwrap();
        assert_eq!(given[1].steps, 12 - 7 + 1);
        assert!(given.iter().all(|r| r.scored_at(r.steps - 1) == 11));
    }
}
