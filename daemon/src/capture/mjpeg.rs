//! MJPEG files: JPEG frames back to back, as `ffmpeg -f mjpeg` writes them and UVC cameras send them.

use std::borrow::Cow;
use std::ops::Range;

use image::RgbImage;

use super::replay::{FrameStore, Replay};
use super::SourceError;
use crate::media::MediaRef;

pub type MjpegReplay = Replay<MjpegFrames>;

impl MjpegReplay {
    pub fn open(media: &MediaRef, fps: f64, looping: bool) -> Result<Self, SourceError> {
        Ok(Replay::new(MjpegFrames::open(media)?, fps, looping))
    }
}

/// An MJPEG file read into memory, with the byte range of each frame.
pub struct MjpegFrames {
    name: String,
    bytes: Cow<'static, [u8]>,
    frames: Vec<Range<usize>>,
}

impl MjpegFrames {
    pub fn open(media: &MediaRef) -> Result<Self, SourceError> {
        let name = media.to_string();
        let bytes = media.read().map_err(|source| SourceError::Read { media: name.clone(), source })?;
        let frames =
            split_jpeg_frames(&bytes).map_err(|problem| SourceError::Format { media: name.clone(), problem })?;
        let store = Self { name, bytes, frames };
        // Decoding the first frame proves the file is what it claims before anything starts.
        store.decode(0)?;
        Ok(store)
    }
}

impl FrameStore for MjpegFrames {
    fn frame_count(&self) -> usize {
        self.frames.len()
    }

    fn decode(&self, index: usize) -> Result<RgbImage, SourceError> {
        decode_jpeg(&self.bytes[self.frames[index].clone()]).map_err(|problem| SourceError::BadFrame {
            media: self.name.clone(),
            index,
            problem,
        })
    }

    fn describe(&self) -> String {
        format!("mjpeg file {} ({} frames)", self.name, self.frames.len())
    }
}

/// One JPEG image as RGB.
pub(super) fn decode_jpeg(jpeg: &[u8]) -> Result<RgbImage, String> {
    image::load_from_memory_with_format(jpeg, image::ImageFormat::Jpeg)
        .map(|image| image.to_rgb8())
        .map_err(|e| e.to_string())
}

/// Cuts JPEG images out of a byte stream that arrives in pieces (a pipe), as each one completes.
#[derive(Debug, Default)]
pub(super) struct JpegStreamSplitter {
    pending: Vec<u8>,
}

impl JpegStreamSplitter {
    /// Bytes held without a complete image before the stream is taken as not being MJPEG.
    pub(super) const MAX_PENDING: usize = 32 << 20;

    pub(super) fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    /// The next complete image, if one has arrived; `Err` for one that is broken, which is
    /// dropped so that the stream picks up again at the next start marker. Bytes before an
    /// image's start marker are dropped.
    pub(super) fn next_frame(&mut self) -> Option<Result<Vec<u8>, String>> {
        let start = self.pending.windows(2).position(|w| w == [0xFF, SOI])?;
        self.pending.drain(..start);
        match scan_jpeg(&self.pending, 0) {
            Scan::Complete(end) => {
                let rest = self.pending.split_off(end);
                Some(Ok(std::mem::replace(&mut self.pending, rest)))
            }
            Scan::Incomplete => None,
            Scan::Invalid(at) => {
                self.pending.drain(..2);
                Some(Err(format!("a broken JPEG frame (bad marker at byte {at}) was dropped")))
            }
        }
    }

    pub(super) fn pending(&self) -> usize {
        self.pending.len()
    }

    pub(super) fn clear(&mut self) {
        self.pending.clear();
    }
}

const SOI: u8 = 0xD8;
const EOI: u8 = 0xD9;
const SOS: u8 = 0xDA;

/// Byte ranges of the JPEG images in an MJPEG stream.
///
/// Walks the marker segments of each image rather than searching for the end marker, because an
/// embedded EXIF thumbnail carries markers of its own. No crate does this split; the format is
/// small enough to follow here (ITU T.81, B.1).
pub fn split_jpeg_frames(bytes: &[u8]) -> Result<Vec<Range<usize>>, String> {
    let mut frames = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        // Tolerate padding between frames, as some cameras write it.
        let Some(offset) = bytes[pos..].windows(2).position(|w| w == [0xFF, SOI]) else { break };
        let start = pos + offset;
        let end = match scan_jpeg(bytes, start) {
            Scan::Complete(end) => end,
            Scan::Incomplete => {
                return Err(format!("frame {} (at byte {start}) is cut off before its end marker", frames.len() + 1))
            }
            Scan::Invalid(at) => {
                return Err(format!(
                    "frame {} (at byte {start}) is broken: no JPEG marker at byte {at}",
                    frames.len() + 1
                ))
            }
        };
        frames.push(start..end);
        pos = end;
    }
    if frames.is_empty() {
        return Err("no JPEG frame found (an MJPEG file is JPEG images back to back)".into());
    }
    Ok(frames)
}

/// How far the JPEG that starts at a given offset goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Offset just past its end-of-image marker.
    Complete(usize),
    /// The bytes end before it does.
    Incomplete,
    /// Something that is not a JPEG marker where one must be, at this offset.
    Invalid(usize),
}

/// Walks the JPEG that starts at `start` to its end-of-image marker.
fn scan_jpeg(bytes: &[u8], start: usize) -> Scan {
    let mut pos = start + 2;
    // Marker segments up to start-of-scan carry their own lengths.
    loop {
        let (Some(&first), Some(&marker)) = (bytes.get(pos), bytes.get(pos + 1)) else { return Scan::Incomplete };
        if first != 0xFF {
            return Scan::Invalid(pos);
        }
        match marker {
            0xFF => pos += 1, // a fill byte
            EOI => return Scan::Complete(pos + 2),
            // A new image inside this one: this one was cut short.
            SOI | 0x00 => return Scan::Invalid(pos),
            0xD0..=0xD7 | 0x01 => pos += 2,
            _ => {
                let (Some(&high), Some(&low)) = (bytes.get(pos + 2), bytes.get(pos + 3)) else {
                    return Scan::Incomplete;
                };
                let length = usize::from(u16::from_be_bytes([high, low]));
                if length < 2 {
                    return Scan::Invalid(pos);
                }
                pos += 2 + length;
                if marker == SOS {
                    match scan_entropy_coded(bytes, pos) {
                        Some(next) => pos = next,
                        None => return Scan::Incomplete,
                    }
                }
            }
        }
    }
}

/// Skips entropy-coded data, where 0xFF is always followed by a stuffed 0x00 or a restart marker,
/// to the next real marker.
fn scan_entropy_coded(bytes: &[u8], mut pos: usize) -> Option<usize> {
    loop {
        let offset = bytes.get(pos..)?.iter().position(|&b| b == 0xFF)?;
        pos += offset;
        match *bytes.get(pos + 1)? {
            0x00 | 0xD0..=0xD7 => pos += 2,
            _ => return Some(pos),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::{MediaRef, PEOPLE_MJPEG};

    fn builtin_people() -> MediaRef {
        MediaRef::parse(&format!("builtin:{PEOPLE_MJPEG}"), std::path::Path::new(".")).unwrap()
    }

    #[test]
    fn sample_clip_splits_into_its_sixty_frames() {
        let frames = MjpegFrames::open(&builtin_people()).unwrap();
        assert_eq!(frames.frame_count(), 60);
        let image = frames.decode(59).unwrap();
        assert_eq!((image.width(), image.height()), (320, 240));
    }

    #[test]
    fn frames_are_split_exactly_at_their_markers() {
        let bytes = builtin_people().read().unwrap();
        let frames = split_jpeg_frames(&bytes).unwrap();
        for pair in frames.windows(2) {
            assert_eq!(pair[0].end, pair[1].start, "ffmpeg writes frames back to back");
        }
        assert_eq!(frames.last().unwrap().end, bytes.len());
        for frame in &frames {
            assert_eq!(&bytes[frame.start..frame.start + 2], &[0xFF, SOI]);
            assert_eq!(&bytes[frame.end - 2..frame.end], &[0xFF, EOI]);
        }
    }

    #[test]
    fn cut_off_last_frame_is_named() {
        let bytes = builtin_people().read().unwrap();
        let frames = split_jpeg_frames(&bytes).unwrap();
        let cut = &bytes[..frames[2].start + 100];
        let err = split_jpeg_frames(cut).unwrap_err();
        assert!(err.starts_with("frame 3 (at byte"), "{err}");
    }

    #[test]
    fn stream_splitter_yields_each_image_once_it_is_complete() {
        let bytes = builtin_people().read().unwrap();
        let frames = split_jpeg_frames(&bytes).unwrap();
        let mut splitter = JpegStreamSplitter::default();
        splitter.push(b"rpicam-vid noise before the first frame");
        let mut out = Vec::new();
        // Pieces of an awkward size, as a pipe hands them over.
        for piece in bytes.chunks(4093) {
            splitter.push(piece);
            while let Some(frame) = splitter.next_frame() {
                out.push(frame.unwrap());
            }
        }
        assert_eq!(out.len(), frames.len());
        for (got, range) in out.iter().zip(&frames) {
            assert_eq!(got.as_slice(), &bytes[range.clone()]);
        }
        assert_eq!(splitter.pending(), 0);
    }

    #[test]
    fn stream_splitter_drops_a_broken_frame_and_picks_up_at_the_next() {
        let bytes = builtin_people().read().unwrap();
        let frames = split_jpeg_frames(&bytes).unwrap();
        let mut splitter = JpegStreamSplitter::default();
        // Frame 0 cut short in its image data (a camera glitch), then frames 1 and 2 whole.
        let cut = &bytes[frames[0].start..frames[0].start + 5000];
        splitter.push(cut);
        splitter.push(&bytes[frames[1].start..frames[2].end]);
        let first = splitter.next_frame().unwrap();
        assert!(first.unwrap_err().starts_with("a broken JPEG frame"), "the cut frame is reported");
        let mut whole = Vec::new();
        while let Some(frame) = splitter.next_frame() {
            whole.push(frame.unwrap());
        }
        assert_eq!(whole, [bytes[frames[1].clone()].to_vec(), bytes[frames[2].clone()].to_vec()]);
    }

    #[test]
    fn bytes_that_are_not_jpeg_are_refused() {
        assert!(split_jpeg_frames(b"RIFF....WAVEfmt ").unwrap_err().contains("no JPEG frame found"));
    }
}
