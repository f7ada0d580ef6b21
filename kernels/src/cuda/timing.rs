//! Device-event timing for the benchmark binaries (kernel-bench, fp8-bench, decode-bench).

use super::{Gpu, drv};
use crate::error::Result;
use cudarc::driver::sys::CUevent_flags;

impl Gpu {
    /// Microseconds per call of `f`: after `warmup` calls, the median over `batches` batches of
    /// `reps` calls each, timed by events on the main stream (so the figure includes whatever
    /// host work and synchronisation the calls do, as a caller would see it).
    pub fn time_per_call_us(
        &self,
        warmup: usize,
        batches: usize,
        reps: usize,
        mut f: impl FnMut() -> Result<()>,
    ) -> Result<f64> {
        for _ in 0..warmup {
            f()?;
        }
        self.synchronize()?;
        let event = || {
            self.stream()
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(drv)
        };
        let mut per_call = Vec::with_capacity(batches);
        for _ in 0..batches.max(1) {
            let start = event()?;
            for _ in 0..reps {
                f()?;
            }
            let end = event()?;
            end.synchronize().map_err(drv)?;
            per_call
                .push(start.elapsed_ms(&end).map_err(drv)? as f64 * 1000.0 / reps.max(1) as f64);
        }
        per_call.sort_by(|a, b| a.total_cmp(b));
        Ok(per_call[per_call.len() / 2])
    }
}
