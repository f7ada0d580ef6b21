//! The engine serving the forward API: rounds of queued requests instead of generated steps.
//!
//! The engine sleeps on the doorbell while nothing is queued anywhere. A request queued at a
//! rank wakes that rank, which opens a round with the boundary all-gather; its control record
//! wakes the other ranks (their link readers ring their doorbells), which join. Every layer
//! with rows queued on any rank is then served, one collective `moe_layer` per layer, in
//! ascending order; ranks without rows of a layer take part with zero rows. Remap switches
//! happen inside the boundary, so a round serves each layer under one placement.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use moe_kernels::Matrix;

use super::Engine;
use crate::comm::CHAN_CTRL;
use crate::exec::GivenRouting;
use crate::forward::{Payload, Refusal};
use crate::stats::par;

/// How long an idle engine sleeps before it looks again without being rung (nothing depends
/// on it: every event rings; this only bounds the cost of a lost wakeup).
const IDLE_WAIT: Duration = Duration::from_secs(1);
/// While a remap's staging runs the group needs boundaries to switch layers even without
/// traffic: an idle group opens one this often.
const REMAP_POLL: Duration = Duration::from_millis(2);

impl Engine {
    /// Whether this rank must open (or join) a round now.
    fn has_work(&self) -> bool {
        self.shared.stop.load(Ordering::SeqCst)
            || !self.shared.forward.is_empty()
            || self.comm.has_pending(CHAN_CTRL)
            || self.shared.lock().pending.is_some()
    }

    pub(super) fn run_rounds(&mut self) -> Result<()> {
        // A zero-row round of MoE layer 0 first (collective, every rank starts here): an
        // executor that cannot serve the per-layer path says so now, not at the first request.
        let mut counts = vec![0u32; self.shape.num_slots()];
        self.exec
            .moe_layer(
                &self.comm,
                0,
                &Matrix::zeros(0, self.shape.hidden),
                0,
                &mut counts,
            )
            .context("--traffic api serves the per-layer path, which this executor does not run")?;
        let mut round = 0u64;
        loop {
            let seen = self.shared.bell.count();
            if !self.has_work() {
                if self.job.is_none() {
                    self.shared.bell.wait(seen, IDLE_WAIT);
                    continue;
                }
                self.shared.bell.wait(seen, REMAP_POLL);
            }
            let rows = self.shared.forward.pending_rows();
            let Some(layers) = self.boundary(rows)? else {
                break;
            };
            if layers.is_empty() {
                continue;
            }
            let mut logical = vec![vec![0.0; self.shape.num_experts]; self.shape.num_layers];
            for &l in &layers {
                logical[l] = self.serve_layer(l, round)?;
            }
            self.shared.lock_episodes().end_step(round);
            if let Some(h) = &mut self.history {
                h.add(&logical)?;
            }
            round += 1;
            self.shared.lock().step = round;
        }
        if let Some(h) = &self.history {
            h.write()?;
        }
        Ok(())
    }

    /// One round of MoE layer `l`: this rank's queued requests of the layer (maybe none)
    /// through the collective per-layer path; each request answered with its rows. Returns the
    /// logical expert counts of this rank's rows.
    fn serve_layer(&mut self, l: usize, round: u64) -> Result<Vec<f64>> {
        let h = self.shape.hidden;
        let k = self.shape.top_k;
        let taken: Vec<Payload> = self.shared.forward.take(l, self.max_round_rows);
        let t: usize = taken.iter().map(|p| p.x.len() / h).sum();
        let mut x = Vec::with_capacity(t * h);
        for p in &taken {
            x.extend_from_slice(&p.x);
        }
        let given = taken.iter().any(|p| p.routing.is_some()).then(|| {
            let mut g = GivenRouting {
                rows: Vec::with_capacity(t),
                ids: Vec::with_capacity(t * k),
                weights: Vec::with_capacity(t * k),
            };
            for p in &taken {
                let rows = p.x.len() / h;
                match &p.routing {
                    Some((ids, weights)) => {
                        g.rows.extend(std::iter::repeat_n(true, rows));
                        g.ids.extend_from_slice(ids);
                        g.weights.extend_from_slice(weights);
                    }
                    None => {
                        g.rows.extend(std::iter::repeat_n(false, rows));
                        g.ids.extend(std::iter::repeat_n(0, rows * k));
                        g.weights.extend(std::iter::repeat_n(0.0, rows * k));
                    }
                }
            }
            g
        });
        let mut counts = vec![0u32; self.shape.num_slots()];
        let base = self.token_base;
        self.token_base = self.token_base.wrapping_add(t as u32);
        let t0 = Instant::now();
        let result = Matrix::from_vec(t, h, x)
            .map_err(anyhow::Error::from)
            .and_then(|xm| match &given {
                Some(g) => self
                    .exec
                    .moe_layer_routed(&self.comm, l, &xm, g, base, &mut counts),
                None => self.exec.moe_layer(&self.comm, l, &xm, base, &mut counts),
            });
        let out = match result {
            Ok(out) => out,
            Err(e) => {
                // A failed collective breaks the group: the requests of this round learn why.
                let why = Refusal::new(500, format!("the group failed: {e:#}"));
                for p in taken {
                    let _ = p.reply.send(Err(why.clone()));
                }
                return Err(e.context(format!("forward round of MoE layer {l}")));
            }
        };
        let dt = t0.elapsed();
        let ys = out.as_slice();
        let mut at = 0;
        for p in taken {
            let n = p.x.len();
            let _ = p.reply.send(Ok(ys[at..at + n].to_vec()));
            at += n;
        }
        let shared = self.shared.clone();
        let m = &shared.metrics;
        m.forward_round_duration.observe(dt.as_secs_f64());
        m.tokens.inc_by(t as u64);
        let now = Instant::now();
        self.rate.push_back((now, t));
        let tps = self.rate_now(now);
        m.tokens_per_second.set(tps);
        {
            let mut w = shared.lock_window();
            w.record_layer(l, round, &counts);
            let sums: Vec<f64> = w.layer_sums(l).iter().map(|&v| v as f64).collect();
            m.layer_imbalance
                .with_label_values(&[l.to_string().as_str()])
                .set(par(&sums, self.world));
        }
        shared.lock().tokens_per_second = tps;
        let logical = self.logical(l, &counts);
        shared.lock_episodes().add_layer(l, &logical);
        Ok(logical)
    }
}
