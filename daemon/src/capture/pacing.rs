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

#[cfg(test)]
mod tests {
    use super::*;

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
