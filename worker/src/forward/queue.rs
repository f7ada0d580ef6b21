//! What a rank holds for the forward API between requests and rounds: its settings, the
//! per-layer queue of waiting requests (each an [`Entry`] moving `Queued -> Taken` or
//! `Queued -> Cancelled` by one compare-and-swap) and the count of rows served. The worker's
//! shared state owns these; [`super`] serves requests with them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use half::bf16;
use tokio::sync::oneshot;

use crate::config::TrafficMode;
use crate::doorbell::Doorbell;

/// How the forward API is configured on this rank.
#[derive(Debug, Clone)]
pub struct Settings {
    pub traffic: TrafficMode,
    pub client_token_file: Option<std::path::PathBuf>,
    pub max_request_rows: usize,
    pub wait: Duration,
}

/// An error answer: status, one-line reason, Retry-After seconds (0: none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: String,
    pub retry_after: u16,
}

impl Refusal {
    pub fn new(status: u16, reason: impl Into<String>) -> Refusal {
        Refusal {
            status,
            reason: reason.into(),
            retry_after: 0,
        }
    }
    pub fn unavailable(reason: impl Into<String>) -> Refusal {
        Refusal {
            status: 503,
            reason: reason.into(),
            retry_after: 1,
        }
    }
}

/// The engine's answer to one request: its rows of the block output, or why not.
pub type Answer = Result<Vec<bf16>, Refusal>;

/// What the engine takes out of the queue.
pub struct Payload {
    pub x: Vec<bf16>,
    /// Caller routing `[T, k]` ids and weights.
    pub routing: Option<(Vec<u32>, Vec<f32>)>,
    pub reply: oneshot::Sender<Answer>,
}

const QUEUED: u8 = 0;
const TAKEN: u8 = 1;
const CANCELLED: u8 = 2;

pub struct Entry {
    state: AtomicU8,
    rows: usize,
    payload: Mutex<Option<Payload>>,
}

impl Entry {
    /// A request of `rows` rows, queued.
    pub(super) fn new(rows: usize, payload: Payload) -> Entry {
        Entry {
            state: AtomicU8::new(QUEUED),
            rows,
            payload: Mutex::new(Some(payload)),
        }
    }
    /// The caller gives up waiting; false when the engine already took the request.
    pub(super) fn cancel(&self) -> bool {
        self.state
            .compare_exchange(QUEUED, CANCELLED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
    fn take(&self) -> Option<Payload> {
        self.state
            .compare_exchange(QUEUED, TAKEN, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        self.payload
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
    fn live(&self) -> bool {
        self.state.load(Ordering::Acquire) == QUEUED
    }
}

/// Requests waiting for a round, per MoE layer.
pub struct Queue {
    inner: Mutex<QueueInner>,
    /// Rung when a request is queued.
    pub bell: Arc<Doorbell>,
}

struct QueueInner {
    layers: Vec<VecDeque<Arc<Entry>>>,
    /// Set when the engine has ended: later requests are refused with this.
    closed: Option<Refusal>,
}

impl Queue {
    pub fn new(num_layers: usize, bell: Arc<Doorbell>) -> Queue {
        Queue {
            inner: Mutex::new(QueueInner {
                layers: vec![VecDeque::new(); num_layers],
                closed: None,
            }),
            bell,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn push(&self, layer: usize, entry: Arc<Entry>) -> Result<(), Refusal> {
        {
            let mut q = self.lock();
            if let Some(r) = &q.closed {
                return Err(r.clone());
            }
            q.layers[layer].push_back(entry);
        }
        self.bell.ring();
        Ok(())
    }

    /// Rows queued per MoE layer (`(layer, rows)` for layers with any); drops cancelled entries.
    pub fn pending_rows(&self) -> Vec<(u32, u32)> {
        let mut q = self.lock();
        let mut out = Vec::new();
        for (l, entries) in q.layers.iter_mut().enumerate() {
            entries.retain(|e| e.live());
            let rows: usize = entries.iter().map(|e| e.rows).sum();
            if !entries.is_empty() {
                // A queued request of zero rows never reaches the queue, so rows > 0 here.
                out.push((l as u32, rows.min(u32::MAX as usize) as u32));
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.lock()
            .layers
            .iter()
            .all(|entries| entries.iter().all(|e| !e.live()))
    }

    /// Takes whole requests of `layer`, oldest first, up to `cap` rows (at least one request).
    pub fn take(&self, layer: usize, cap: usize) -> Vec<Payload> {
        let mut q = self.lock();
        let Some(entries) = q.layers.get_mut(layer) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut rows = 0;
        while let Some(e) = entries.front() {
            if !e.live() {
                entries.pop_front();
                continue;
            }
            if !out.is_empty() && rows + e.rows > cap {
                break;
            }
            let e = entries.pop_front().expect("front exists");
            if let Some(p) = e.take() {
                rows += e.rows;
                out.push(p);
            }
        }
        out
    }

    /// Refuses every queued request and every later one with `refusal` (the engine ended).
    pub fn close(&self, refusal: Refusal) {
        let mut q = self.lock();
        q.closed = Some(refusal.clone());
        for entries in &mut q.layers {
            for e in entries.drain(..) {
                if let Some(p) = e.take() {
                    let _ = p.reply.send(Err(refusal.clone()));
                }
            }
        }
    }
}

/// Rows answered by this rank: the total and a rate over the last 10 s.
#[derive(Debug, Default)]
pub struct Served {
    inner: Mutex<ServedInner>,
}

#[derive(Debug, Default)]
struct ServedInner {
    total: u64,
    recent: VecDeque<(Instant, u64)>,
}

const RATE_WINDOW: Duration = Duration::from_secs(10);

impl Served {
    pub fn record(&self, rows: u64) {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        s.total += rows;
        let now = Instant::now();
        s.recent.push_back((now, rows));
        while s
            .recent
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            s.recent.pop_front();
        }
    }

    /// (total, rows per second over the last 10 s).
    pub fn snapshot(&self) -> (u64, f64) {
        let s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let rows: u64 = s
            .recent
            .iter()
            .filter(|(t, _)| now.duration_since(*t) <= RATE_WINDOW)
            .map(|(_, n)| n)
            .sum();
        (s.total, rows as f64 / RATE_WINDOW.as_secs_f64())
    }
}
