//! Replaying recorded frames as if a camera were delivering them.

use std::sync::Arc;
use std::time::SystemTime;

use image::RgbImage;

use super::pacing::Pacer;
use super::{Frame, FrameSource, SourceError};

/// Recorded frames that can be decoded one at a time, by index.
pub trait FrameStore: Send {
    fn frame_count(&self) -> usize;
    fn decode(&self, index: usize) -> Result<RgbImage, SourceError>;
    /// e.g. `mjpeg file builtin:people.mjpeg (60 frames)`.
    fn describe(&self) -> String;
}

/// Plays a [`FrameStore`] at a fixed rate, once or in a loop.
pub struct Replay<S> {
    store: S,
    fps: f64,
    pacer: Pacer,
    looping: bool,
    next_index: usize,
    seq: u64,
}

impl<S: FrameStore> Replay<S> {
    pub fn new(store: S, fps: f64, looping: bool) -> Self {
        Self { store, fps, pacer: Pacer::from_rate(fps), looping, next_index: 0, seq: 0 }
    }
}

impl<S: FrameStore> FrameSource for Replay<S> {
    fn describe(&self) -> String {
        let mode = if self.looping { ", looping" } else { "" };
        format!("replay of {} at {} fps{mode}", self.store.describe(), self.fps)
    }

    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        if self.next_index >= self.store.frame_count() {
            if !self.looping || self.store.frame_count() == 0 {
                return Ok(None);
            }
            self.next_index = 0;
        }
        let index = self.next_index;
        self.next_index += 1;
        self.pacer.wait();
        // The sequence number advances for bad frames too, so gaps show in what comes out.
        let seq = self.seq;
        self.seq += 1;
        let image = self.store.decode(index)?;
        Ok(Some(Frame { seq, captured_at: SystemTime::now(), image: Arc::new(image) }))
    }
}
