//! Gates: cheap checks on every frame and chunk that decide when something happened, and so when
//! the expensive model should look. Each gate is plain synchronous code fed one item at a time,
//! with the time passed in, so it is tested without threads or clocks.

mod motion;
mod sound;
mod speech;

pub use motion::{MotionEvent, MotionGate, Region};
pub use sound::{level_dbfs, SoundEvent, SoundGate, SILENCE_DBFS};
pub use speech::{
    Segment, Segmenter, SegmenterParams, SileroVad, SpeechEvent, SpeechGate, VadError, VAD_CONTEXT, VAD_SAMPLE_RATE,
    VAD_WINDOW,
};

use std::time::{Duration, Instant};

/// Quiet time after an event, shared by every gate.
#[derive(Debug)]
struct Cooldown {
    length: Duration,
    last_fired: Option<Instant>,
}

impl Cooldown {
    fn new(length: Duration) -> Self {
        Self { length, last_fired: None }
    }

    /// True, and starts a new quiet period, when the last event is far enough behind.
    fn try_fire(&mut self, now: Instant) -> bool {
        let ready = self.last_fired.is_none_or(|last| now.saturating_duration_since(last) >= self.length);
        if ready {
            self.last_fired = Some(now);
        }
        ready
    }
}
