//! Motion by frame difference: shrink, grey, compare with the previous frame, count what changed.

use std::time::{Duration, Instant, SystemTime};

use image::imageops::{self, FilterType};
use image::GrayImage;
use serde::Serialize;

use super::Cooldown;
use crate::capture::Frame;
use crate::config::MotionGateConfig;

/// What the motion gate measured when it fired.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MotionEvent {
    pub frame_seq: u64,
    #[serde(skip)]
    pub at: SystemTime,
    /// Fraction of the frame whose brightness changed by more than the pixel threshold.
    pub changed_fraction: f64,
    /// Mean brightness change of the changed pixels (0-255).
    pub mean_change: f64,
    /// Box around the changed pixels, in frame pixels.
    pub region: Region,
    pub frame_width: u32,
    pub frame_height: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Region {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

pub struct MotionGate {
    pixel_threshold: u8,
    min_area_fraction: f64,
    analysis_width: u32,
    cooldown: Cooldown,
    previous: Option<GrayImage>,
}

impl MotionGate {
    pub fn new(config: &MotionGateConfig) -> Self {
        Self {
            pixel_threshold: config.pixel_threshold,
            min_area_fraction: config.min_area_fraction,
            analysis_width: config.analysis_width,
            cooldown: Cooldown::new(Duration::from_secs_f64(config.cooldown_secs)),
            previous: None,
        }
    }

    /// Compares `frame` with the one before it; an event when enough changed and the cool-down
    /// is over. The first frame only sets the reference.
    pub fn observe(&mut self, frame: &Frame, now: Instant) -> Option<MotionEvent> {
        let current = self.shrink(frame);
        let difference = match &self.previous {
            Some(previous) if previous.dimensions() == current.dimensions() => {
                Difference::between(previous, &current, self.pixel_threshold)
            }
            // First frame, or the camera changed resolution: this frame becomes the reference.
            _ => None,
        };
        let analysed = current.dimensions();
        self.previous = Some(current);
        let difference = difference?;
        if difference.changed_fraction < self.min_area_fraction || !self.cooldown.try_fire(now) {
            return None;
        }
        let (frame_width, frame_height) = frame.image.dimensions();
        Some(MotionEvent {
            frame_seq: frame.seq,
            at: frame.captured_at,
            changed_fraction: difference.changed_fraction,
            mean_change: difference.mean_change,
            region: difference.region.scaled(analysed, (frame_width, frame_height)),
            frame_width,
            frame_height,
        })
    }

    /// Grey and at most `analysis_width` wide; the averaging filter also smooths sensor noise.
    fn shrink(&self, frame: &Frame) -> GrayImage {
        let grey = imageops::grayscale(frame.image.as_ref());
        let (width, height) = grey.dimensions();
        if width <= self.analysis_width {
            return grey;
        }
        let new_height = ((u64::from(height) * u64::from(self.analysis_width)) / u64::from(width)).max(1) as u32;
        imageops::resize(&grey, self.analysis_width, new_height, FilterType::Triangle)
    }
}

/// How two same-sized grey images differ.
struct Difference {
    changed_fraction: f64,
    mean_change: f64,
    region: Region,
}

impl Difference {
    /// `None` when no pixel changed by more than `threshold`.
    fn between(before: &GrayImage, after: &GrayImage, threshold: u8) -> Option<Self> {
        let mut changed = 0u64;
        let mut change_sum = 0u64;
        let (mut min_x, mut min_y, mut max_x, mut max_y) = (u32::MAX, u32::MAX, 0, 0);
        for ((x, y, after_px), before_px) in after.enumerate_pixels().zip(before.pixels()) {
            let change = after_px[0].abs_diff(before_px[0]);
            if change > threshold {
                changed += 1;
                change_sum += u64::from(change);
                min_x = min_x.min(x);
                min_y = min_y.min(y);
                max_x = max_x.max(x);
                max_y = max_y.max(y);
            }
        }
        if changed == 0 {
            return None;
        }
        let (width, height) = after.dimensions();
        Some(Self {
            changed_fraction: changed as f64 / (f64::from(width) * f64::from(height)),
            mean_change: change_sum as f64 / changed as f64,
            region: Region { x: min_x, y: min_y, width: max_x + 1 - min_x, height: max_y + 1 - min_y },
        })
    }
}

impl Region {
    /// The same region in an image of size `to` instead of `from`.
    fn scaled(self, from: (u32, u32), to: (u32, u32)) -> Region {
        let x = |v: u32| (u64::from(v) * u64::from(to.0) / u64::from(from.0)) as u32;
        let y = |v: u32| (u64::from(v) * u64::from(to.1) / u64::from(from.1)) as u32;
        Region {
            x: x(self.x),
            y: y(self.y),
            width: x(self.x + self.width) - x(self.x),
            height: y(self.y + self.height) - y(self.y),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use image::{Rgb, RgbImage};

    use super::*;

    fn frame_with_square(seq: u64, x0: u32, y0: u32, side: u32) -> Frame {
        let image = RgbImage::from_fn(320, 240, |x, y| {
            if (x0..x0 + side).contains(&x) && (y0..y0 + side).contains(&y) {
                Rgb([240, 240, 240])
            } else {
                Rgb([30, 40, 50])
            }
        });
        Frame { seq, captured_at: SystemTime::now(), image: Arc::new(image) }
    }

    fn gate(min_area_fraction: f64, cooldown_secs: f64) -> MotionGate {
        MotionGate::new(&MotionGateConfig { min_area_fraction, cooldown_secs, ..MotionGateConfig::default() })
    }

    #[test]
    fn still_scene_never_fires() {
        let mut gate = gate(0.001, 0.0);
        let t = Instant::now();
        for seq in 0..5 {
            assert_eq!(gate.observe(&frame_with_square(seq, 100, 100, 40), t), None);
        }
    }

    #[test]
    fn moving_square_fires_with_its_region() {
        let mut gate = gate(0.001, 0.0);
        let t = Instant::now();
        assert!(gate.observe(&frame_with_square(0, 40, 40, 40), t).is_none(), "first frame is only a reference");
        let event = gate.observe(&frame_with_square(1, 200, 120, 40), t).expect("the square moved");
        assert_eq!(event.frame_seq, 1);
        // Old and new squares, 2 x 1600 of 76800 pixels, give or take the filter's edge.
        assert!((0.035..0.05).contains(&event.changed_fraction), "{}", event.changed_fraction);
        let r = event.region;
        assert!(r.x.abs_diff(40) <= 4 && r.y.abs_diff(40) <= 4, "{r:?}");
        assert!((r.x + r.width).abs_diff(240) <= 4 && (r.y + r.height).abs_diff(160) <= 4, "{r:?}");
        assert!(event.mean_change > 100.0, "{}", event.mean_change);
    }

    #[test]
    fn change_smaller_than_min_area_is_ignored() {
        let mut gate = gate(0.05, 0.0);
        let t = Instant::now();
        gate.observe(&frame_with_square(0, 40, 40, 40), t);
        assert_eq!(gate.observe(&frame_with_square(1, 200, 120, 40), t), None);
    }

    #[test]
    fn cooldown_holds_back_the_next_event() {
        let mut gate = gate(0.001, 5.0);
        let t = Instant::now();
        gate.observe(&frame_with_square(0, 0, 0, 40), t);
        assert!(gate.observe(&frame_with_square(1, 100, 0, 40), t).is_some());
        assert!(gate.observe(&frame_with_square(2, 200, 0, 40), t + Duration::from_secs(4)).is_none());
        assert!(gate.observe(&frame_with_square(3, 0, 100, 40), t + Duration::from_secs(5)).is_some());
    }

    #[test]
    fn resolution_change_resets_the_reference() {
        let mut gate = gate(0.001, 0.0);
        let t = Instant::now();
        gate.observe(&frame_with_square(0, 0, 0, 40), t);
        let small = Frame { seq: 1, captured_at: SystemTime::now(), image: Arc::new(RgbImage::new(64, 48)) };
        assert_eq!(gate.observe(&small, t), None);
    }
}
