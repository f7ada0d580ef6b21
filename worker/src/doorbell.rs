//! The engine's doorbell: what wakes an idle engine (serving the forward API) without polling.
//!
//! Rung by a request queued at this rank, by a peer's control record arriving (a peer started
//! a round), by a stop or remap request, and by a failed link. The engine reads the count,
//! checks for work, and sleeps until the count moves on, so a ring between its check and its
//! sleep is never lost.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

#[derive(Debug, Default)]
pub struct Doorbell {
    rings: Mutex<u64>,
    cv: Condvar,
}

impl Doorbell {
    pub fn ring(&self) {
        let mut n = self.rings.lock().unwrap_or_else(|e| e.into_inner());
        *n = n.wrapping_add(1);
        self.cv.notify_all();
    }

    /// The rings so far (pass to [`Doorbell::wait`]).
    pub fn count(&self) -> u64 {
        *self.rings.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sleeps until the count differs from `seen` or `timeout` passes; true when rung.
    pub fn wait(&self, seen: u64, timeout: Duration) -> bool {
        let n = self.rings.lock().unwrap_or_else(|e| e.into_inner());
        let (n, _) = self
            .cv
            .wait_timeout_while(n, timeout, |n| *n == seen)
            .unwrap_or_else(|e| e.into_inner());
        *n != seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_ring_before_the_wait_is_not_lost() {
        let bell = Arc::new(Doorbell::default());
        let seen = bell.count();
        bell.ring();
        assert!(bell.wait(seen, Duration::from_secs(5)));
        let seen = bell.count();
        assert!(!bell.wait(seen, Duration::from_millis(10)));
        let b2 = bell.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            b2.ring();
        });
        assert!(bell.wait(seen, Duration::from_secs(5)));
        t.join().unwrap();
    }
}
