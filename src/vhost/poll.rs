//! The adaptive busy-poll window of a queue worker.
//!
//! After a queue runs dry, its worker may spin on the avail ring for a
//! while before it sleeps: a request that arrives within the window is
//! taken without the cost of a kick and a wake-up (tens of microseconds on
//! a virtual machine). As in QEMU's adaptive AioContext polling, the window
//! starts at zero, grows (4 us, then doubling up to the maximum) each time
//! the queue slept for less than the maximum, and halves each time it slept
//! for longer. So a queue that is busy polls, and an idle one spins for at
//! most a few shrinking windows before it costs nothing at all.

use std::time::{Duration, Instant};

/// The first window after zero.
const GROW_FROM: Duration = Duration::from_micros(4);

/// One queue's window.
#[derive(Debug, Default)]
pub struct PollWindow {
    window: Duration,
    /// When the queue last ran dry (polling started), if it has not been
    /// woken since.
    idle_since: Option<Instant>,
}

impl PollWindow {
    /// How long to spin now.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The queue ran dry at `at` (its poll window starts then).
    pub fn went_idle(&mut self, at: Instant) {
        self.idle_since = Some(at);
    }

    /// The queue was woken at `now` for new requests; adapt the window
    /// (never beyond `max`; a zero `max` turns polling off).
    pub fn woke(&mut self, now: Instant, max: Duration) {
        let Some(since) = self.idle_since.take() else {
            return;
        };
        let slept = now.saturating_duration_since(since);
        if max.is_zero() {
            self.window = Duration::ZERO;
        } else if slept > max {
            // Spinning would not have caught it: poll less.
            self.window /= 2;
            if self.window < GROW_FROM {
                self.window = Duration::ZERO;
            }
        } else if slept > self.window {
            // A longer window would have caught it.
            self.window = (self.window * 2).max(GROW_FROM).min(max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_micros(50);

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    /// The queue ran dry, then was woken `gap` later.
    fn cycle(p: &mut PollWindow, gap: Duration) {
        let t = Instant::now();
        p.went_idle(t);
        p.woke(t + gap, MAX);
    }

    #[test]
    fn a_busy_queue_grows_its_window_to_the_maximum() {
        let mut p = PollWindow::default();
        assert_eq!(p.window(), Duration::ZERO, "no polling before any evidence");
        let mut seen = Vec::new();
        for _ in 0..6 {
            cycle(&mut p, us(45));
            seen.push(p.window().as_micros());
        }
        assert_eq!(seen, [4, 8, 16, 32, 50, 50]);
        // Requests 30 µs apart are caught by a 32 µs window already.
        let mut q = PollWindow::default();
        for _ in 0..6 {
            cycle(&mut q, us(30));
        }
        assert_eq!(q.window(), us(32));
    }

    #[test]
    fn an_idle_queue_stops_polling() {
        let mut p = PollWindow::default();
        for _ in 0..5 {
            cycle(&mut p, us(45));
        }
        let mut seen = Vec::new();
        for _ in 0..5 {
            cycle(&mut p, Duration::from_millis(5));
            seen.push(p.window().as_micros());
        }
        assert_eq!(seen, [25, 12, 6, 0, 0]);
    }

    #[test]
    fn a_wake_up_within_the_window_changes_nothing() {
        let mut p = PollWindow::default();
        for _ in 0..4 {
            cycle(&mut p, us(30));
        }
        assert_eq!(p.window(), us(32));
        cycle(&mut p, us(20));
        assert_eq!(p.window(), us(32));
    }

    #[test]
    fn a_zero_maximum_turns_polling_off() {
        let mut p = PollWindow::default();
        for _ in 0..4 {
            cycle(&mut p, us(30));
        }
        let t = Instant::now();
        p.went_idle(t);
        p.woke(t + us(1), Duration::ZERO);
        assert_eq!(p.window(), Duration::ZERO);
        // A wake-up without a recorded idle start is ignored.
        p.woke(t + us(30), MAX);
        assert_eq!(p.window(), Duration::ZERO);
    }
}
