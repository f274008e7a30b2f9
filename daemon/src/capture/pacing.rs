use std::time::{Duration, Instant};

/// Releases one item per period, like a device clock. When the consumer falls behind it does not
/// burst to catch up: a live camera would not either.
#[derive(Debug)]
pub(super) struct Pacer {
    period: Duration,
    next_due: Option<Instant>,
}

impl Pacer {
    pub(super) fn new(period: Duration) -> Self {
        Self { period, next_due: None }
    }

    pub(super) fn from_rate(per_second: f64) -> Self {
        Self::new(Duration::from_secs_f64(1.0 / per_second))
    }

    /// Sleeps until the next item is due.
    pub(super) fn wait(&mut self) {
        let now = Instant::now();
        let due = match self.next_due {
            Some(due) if due > now => {
                std::thread::sleep(due - now);
                due
            }
            _ => now,
        };
        self.next_due = Some(due + self.period);
    }
}

/// Lets through at most one item per period from a device that runs faster than configured.
/// A quarter period of slack keeps a camera at exactly the configured rate from losing frames to
/// jitter.
#[derive(Debug)]
pub(super) struct RateLimiter {
    period: Duration,
    last: Option<Instant>,
}

impl RateLimiter {
    pub(super) fn new(period: Duration) -> Self {
        Self { period, last: None }
    }

    /// True when an item arriving at `now` should be kept.
    pub(super) fn admit(&mut self, now: Instant) -> bool {
        let due = self.last.is_none_or(|last| now.saturating_duration_since(last) >= self.period * 3 / 4);
        if due {
            self.last = Some(now);
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limiter_keeps_one_frame_in_three_of_a_camera_three_times_too_fast() {
        let mut limiter = RateLimiter::new(Duration::from_millis(100));
        let start = Instant::now();
        // 30 fps with a little jitter, limited to 10 fps.
        let kept: Vec<u64> = (0..30u64)
            .filter(|&i| limiter.admit(start + Duration::from_micros(i * 33_333 + (i % 2) * 2_000)))
            .collect();
        assert_eq!(kept, (0..30).step_by(3).collect::<Vec<_>>());
        let mut exact = RateLimiter::new(Duration::from_millis(100));
        assert!((0..10u64).all(|i| exact.admit(start + Duration::from_millis(i * 100 - i.min(1) * 3))));
    }

    #[test]
    fn releases_items_one_period_apart() {
        let mut pacer = Pacer::new(Duration::from_millis(20));
        let start = Instant::now();
        for _ in 0..6 {
            pacer.wait();
        }
        // Five full periods separate six releases.
        assert!(start.elapsed() >= Duration::from_millis(100), "{:?}", start.elapsed());
    }
}
