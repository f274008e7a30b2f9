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

/// Lets through at most one item per period, on average, from a device that runs faster than
/// configured. Items are due on a schedule rather than a period after the last one kept, so that
/// jitter does not lose frames: a quarter period of slack, and a late item moves the schedule on
/// by one period only.
#[derive(Debug)]
pub(super) struct RateLimiter {
    period: Duration,
    next_due: Option<Instant>,
}

impl RateLimiter {
    pub(super) fn new(period: Duration) -> Self {
        Self { period, next_due: None }
    }

    /// True when an item arriving at `now` should be kept.
    pub(super) fn admit(&mut self, now: Instant) -> bool {
        let due = self.next_due.is_none_or(|due| now + self.period / 4 >= due);
        if due {
            // After a long gap the schedule restarts from now rather than letting a burst through.
            let behind = now.checked_sub(self.period).unwrap_or(now);
            let base = self.next_due.map_or(now, |due| due.max(behind));
            self.next_due = Some(base + self.period);
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
        // A late frame moves the schedule on by one period only: those after it keep their times.
        let mut late = RateLimiter::new(Duration::from_millis(100));
        let kept: Vec<u64> = [0, 100, 230, 240, 300, 400]
            .into_iter()
            .filter(|&ms| late.admit(start + Duration::from_millis(ms)))
            .collect();
        assert_eq!(kept, [0, 100, 230, 300, 400]);
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
