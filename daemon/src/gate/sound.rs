//! Sound level: the RMS level of each chunk in dB relative to full scale, against a threshold.

use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use super::Cooldown;
use crate::capture::AudioChunk;
use crate::config::SoundGateConfig;

/// Reported for digital silence, where the logarithm has no value.
pub const SILENCE_DBFS: f64 = -120.0;

/// What the sound gate measured when it fired.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SoundEvent {
    pub chunk_seq: u64,
    #[serde(skip)]
    pub at: SystemTime,
    /// RMS level of the chunk, dBFS.
    pub level_dbfs: f64,
    /// Largest sample of the chunk, dBFS.
    pub peak_dbfs: f64,
    pub duration_ms: u64,
}

pub struct SoundGate {
    threshold_dbfs: f64,
    cooldown: Cooldown,
}

impl SoundGate {
    pub fn new(config: &SoundGateConfig) -> Self {
        Self {
            threshold_dbfs: config.threshold_dbfs,
            cooldown: Cooldown::new(Duration::from_secs_f64(config.cooldown_secs)),
        }
    }

    pub fn observe(&mut self, chunk: &AudioChunk, now: Instant) -> Option<SoundEvent> {
        let level_dbfs = level_dbfs(&chunk.samples);
        if level_dbfs < self.threshold_dbfs || !self.cooldown.try_fire(now) {
            return None;
        }
        let peak = chunk.samples.iter().map(|s| i32::from(*s).abs()).max().unwrap_or(0);
        Some(SoundEvent {
            chunk_seq: chunk.seq,
            at: chunk.captured_at,
            level_dbfs,
            peak_dbfs: to_dbfs(f64::from(peak) / 32768.0),
            duration_ms: chunk.duration().as_millis() as u64,
        })
    }
}

/// RMS level of 16-bit samples in dBFS: a full-scale square wave is 0, a full-scale sine -3.01.
pub fn level_dbfs(samples: &[i16]) -> f64 {
    if samples.is_empty() {
        return SILENCE_DBFS;
    }
    let mean_square = samples.iter().map(|&s| (f64::from(s) / 32768.0).powi(2)).sum::<f64>() / samples.len() as f64;
    to_dbfs(mean_square.sqrt())
}

fn to_dbfs(amplitude: f64) -> f64 {
    if amplitude <= 0.0 {
        SILENCE_DBFS
    } else {
        (20.0 * amplitude.log10()).max(SILENCE_DBFS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine_chunk(seq: u64, amplitude: f64) -> AudioChunk {
        let samples = (0..1600)
            .map(|i| (amplitude * 32767.0 * (i as f64 * 2.0 * std::f64::consts::PI * 440.0 / 16000.0).sin()) as i16);
        AudioChunk { seq, captured_at: SystemTime::now(), sample_rate: 16000, samples: samples.collect() }
    }

    #[test]
    fn levels_match_the_textbook_values() {
        assert!((level_dbfs(&sine_chunk(0, 1.0).samples) + 3.01).abs() < 0.02);
        assert!((level_dbfs(&sine_chunk(0, 0.1).samples) + 23.01).abs() < 0.02);
        assert_eq!(level_dbfs(&[0; 160]), SILENCE_DBFS);
        assert_eq!(level_dbfs(&[-32768; 4]), 0.0);
    }

    #[test]
    fn fires_above_threshold_and_reports_what_it_measured() {
        let mut gate = SoundGate::new(&SoundGateConfig { enabled: true, threshold_dbfs: -20.0, cooldown_secs: 0.0 });
        let t = Instant::now();
        assert_eq!(gate.observe(&sine_chunk(0, 0.05), t), None, "-29 dBFS is below the threshold");
        let event = gate.observe(&sine_chunk(1, 0.5), t).expect("-9 dBFS is above it");
        assert_eq!(event.chunk_seq, 1);
        assert!((event.level_dbfs + 9.03).abs() < 0.02, "{}", event.level_dbfs);
        assert!((event.peak_dbfs + 6.02).abs() < 0.02, "{}", event.peak_dbfs);
        assert_eq!(event.duration_ms, 100);
    }

    #[test]
    fn cooldown_holds_back_the_next_event() {
        let mut gate = SoundGate::new(&SoundGateConfig { enabled: true, threshold_dbfs: -20.0, cooldown_secs: 2.0 });
        let t = Instant::now();
        assert!(gate.observe(&sine_chunk(0, 0.5), t).is_some());
        assert!(gate.observe(&sine_chunk(1, 0.5), t + Duration::from_millis(1900)).is_none());
        assert!(gate.observe(&sine_chunk(2, 0.5), t + Duration::from_secs(2)).is_some());
    }
}
