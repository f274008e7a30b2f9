//! Raw packed YUYV 4:2:2 files: what a UVC camera sends uncompressed, frame after frame.

use std::borrow::Cow;

use image::RgbImage;
use yuv::{YuvPackedImage, YuvRange, YuvStandardMatrix};

use super::replay::{FrameStore, Replay};
use super::SourceError;
use crate::media::MediaRef;

pub type YuyvReplay = Replay<YuyvFrames>;

impl YuyvReplay {
    pub fn open(media: &MediaRef, width: u32, height: u32, fps: f64, looping: bool) -> Result<Self, SourceError> {
        Ok(Replay::new(YuyvFrames::open(media, width, height)?, fps, looping))
    }
}

pub struct YuyvFrames {
    name: String,
    bytes: Cow<'static, [u8]>,
    width: u32,
    height: u32,
}

impl YuyvFrames {
    pub fn open(media: &MediaRef, width: u32, height: u32) -> Result<Self, SourceError> {
        let name = media.to_string();
        let format_error = |problem: String| SourceError::Format { media: name.clone(), problem };
        if width == 0 || height == 0 || !width.is_multiple_of(2) {
            return Err(format_error(format!(
                "YUYV frames need an even, non-zero width and a non-zero height, got {width}x{height}"
            )));
        }
        let bytes = media.read().map_err(|source| SourceError::Read { media: name.clone(), source })?;
        let frame_len = frame_len(width, height);
        if bytes.is_empty() || bytes.len() % frame_len != 0 {
            return Err(format_error(format!(
                "{} bytes is not a whole number of {width}x{height} YUYV frames ({frame_len} bytes each): check width and height",
                bytes.len()
            )));
        }
        Ok(Self { name, bytes, width, height })
    }
}

fn frame_len(width: u32, height: u32) -> usize {
    width as usize * height as usize * 2
}

impl FrameStore for YuyvFrames {
    fn frame_count(&self) -> usize {
        self.bytes.len() / frame_len(self.width, self.height)
    }

    fn decode(&self, index: usize) -> Result<RgbImage, SourceError> {
        let len = frame_len(self.width, self.height);
        yuyv_to_rgb(&self.bytes[index * len..(index + 1) * len], self.width, self.height)
            .map_err(|problem| SourceError::BadFrame { media: self.name.clone(), index, problem })
    }

    fn describe(&self) -> String {
        format!("yuyv file {} ({}x{}, {} frames)", self.name, self.width, self.height, self.frame_count())
    }
}

/// Converts one packed YUYV frame to RGB (BT.601, limited range, as UVC cameras send it).
pub fn yuyv_to_rgb(yuyv: &[u8], width: u32, height: u32) -> Result<RgbImage, String> {
    yuyv_to_rgb_with_stride(yuyv, width, height, width * 2)
}

/// The same, for rows `stride` bytes apart (a driver may pad each row).
pub(super) fn yuyv_to_rgb_with_stride(yuyv: &[u8], width: u32, height: u32, stride: u32) -> Result<RgbImage, String> {
    let packed = YuvPackedImage { yuy: yuyv, yuy_stride: stride, width, height };
    let mut rgb = vec![0u8; width as usize * height as usize * 3];
    yuv::yuyv422_to_rgb(&packed, &mut rgb, width * 3, YuvRange::Limited, YuvStandardMatrix::Bt601)
        .map_err(|e| e.to_string())?;
    RgbImage::from_raw(width, height, rgb).ok_or_else(|| "converted frame has the wrong size".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packs RGB into YUYV with the textbook BT.601 limited-range formulas, independently of the
    /// conversion under test.
    fn rgb_to_yuyv(image: &RgbImage) -> Vec<u8> {
        let yuv = |[r, g, b]: [u8; 3]| {
            let (r, g, b) = (f64::from(r), f64::from(g), f64::from(b));
            let y = 16.0 + 0.257 * r + 0.504 * g + 0.098 * b;
            let u = 128.0 - 0.148 * r - 0.291 * g + 0.439 * b;
            let v = 128.0 + 0.439 * r - 0.368 * g - 0.071 * b;
            (y, u, v)
        };
        let mut out = Vec::new();
        for row in image.rows() {
            let pixels: Vec<_> = row.map(|p| yuv(p.0)).collect();
            for pair in pixels.chunks(2) {
                let (y0, u0, v0) = pair[0];
                let (y1, u1, v1) = pair[1];
                out.extend([y0, (u0 + u1) / 2.0, y1, (v0 + v1) / 2.0].map(|c| c.round().clamp(0.0, 255.0) as u8));
            }
        }
        out
    }

    #[test]
    fn converts_back_to_the_colours_it_was_made_from() {
        // Flat 2x1 blocks so that chroma subsampling loses nothing.
        let colours = [[200u8, 30, 40], [20, 180, 60], [30, 60, 220], [128, 128, 128]];
        let image = RgbImage::from_fn(8, 2, |x, _| image::Rgb(colours[(x / 2) as usize]));
        let back = yuyv_to_rgb(&rgb_to_yuyv(&image), 8, 2).unwrap();
        for (a, b) in image.pixels().zip(back.pixels()) {
            for c in 0..3 {
                assert!((i16::from(a[c]) - i16::from(b[c])).abs() <= 3, "{a:?} came back as {b:?}");
            }
        }
    }

    #[test]
    fn file_of_the_wrong_size_names_both_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cam.yuyv");
        std::fs::write(&path, vec![0u8; 4 * 2 * 2 * 3 + 1]).unwrap();
        let err = YuyvFrames::open(&MediaRef::Path(path), 4, 2).err().unwrap().to_string();
        assert!(
            err.ends_with("49 bytes is not a whole number of 4x2 YUYV frames (16 bytes each): check width and height"),
            "{err}"
        );
    }
}
