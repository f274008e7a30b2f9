//! The emulated camera as the environment describes it, read once.

use std::ffi::{CString, OsString};
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;

use crate::uapi::{PIX_FMT_MJPEG, PIX_FMT_YUYV};

pub const ENV_DEVICE: &str = "OUTPOST_V4L2_EMU_DEVICE";
pub const ENV_MEDIA: &str = "OUTPOST_V4L2_EMU_MEDIA";
pub const ENV_FORMAT: &str = "OUTPOST_V4L2_EMU_FORMAT";
pub const ENV_WIDTH: &str = "OUTPOST_V4L2_EMU_WIDTH";
pub const ENV_HEIGHT: &str = "OUTPOST_V4L2_EMU_HEIGHT";
pub const ENV_FPS: &str = "OUTPOST_V4L2_EMU_FPS";
pub const ENV_INTERVALS: &str = "OUTPOST_V4L2_EMU_INTERVALS";
pub const ENV_CARD: &str = "OUTPOST_V4L2_EMU_CARD";
pub const ENV_LOG: &str = "OUTPOST_V4L2_EMU_LOG";
pub const ENV_STALL: &str = "OUTPOST_V4L2_EMU_STALL";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PixFmt {
    Yuyv,
    Mjpg,
}

impl PixFmt {
    pub fn fourcc(self) -> u32 {
        match self {
            PixFmt::Yuyv => PIX_FMT_YUYV,
            PixFmt::Mjpg => PIX_FMT_MJPEG,
        }
    }
}

pub struct Config {
    /// The camera node, NUL-terminated for stat(2).
    pub device: CString,
    pub format: PixFmt,
    pub width: u32,
    pub height: u32,
    /// Advertised frame rates, fastest first (the order drivers list intervals in).
    pub rates: Vec<u32>,
    /// The rate a freshly plugged camera runs at.
    pub default_rate: u32,
    pub card: String,
    pub log: bool,
    /// While this file exists a streaming camera delivers nothing (NUL-terminated for stat(2)).
    pub stall: Option<CString>,
    pub bytes: Vec<u8>,
    pub frames: Vec<Range<usize>>,
    /// What G_FMT reports and each buffer holds.
    pub sizeimage: u32,
}

impl Config {
    /// `Ok(None)` when no device is to be emulated; `Err` names the variable that is wrong.
    pub fn from_env() -> Result<Option<Config>, String> {
        let Some(device) = std::env::var_os(ENV_DEVICE) else { return Ok(None) };
        if !device.as_bytes().starts_with(b"/") {
            return Err(format!("{ENV_DEVICE}={} is not an absolute path", device.to_string_lossy()));
        }
        let device = CString::new(device.as_bytes()).map_err(|_| format!("{ENV_DEVICE} holds a NUL byte"))?;
        let media = std::env::var_os(ENV_MEDIA).ok_or_else(|| format!("{ENV_MEDIA} is not set"))?;
        let format = match string(ENV_FORMAT)?.as_deref() {
            Some("YUYV") => PixFmt::Yuyv,
            Some("MJPG") => PixFmt::Mjpg,
            Some(other) => return Err(format!("{ENV_FORMAT}={other} is neither YUYV nor MJPG")),
            None => return Err(format!("{ENV_FORMAT} is not set (YUYV or MJPG)")),
        };
        let width = number(ENV_WIDTH)?.ok_or_else(|| format!("{ENV_WIDTH} is not set"))?;
        let height = number(ENV_HEIGHT)?.ok_or_else(|| format!("{ENV_HEIGHT} is not set"))?;
        if width > 16384 || height > 16384 {
            return Err(format!("{width}x{height} is larger than a camera gives"));
        }
        let fps = number(ENV_FPS)?.unwrap_or(30);
        let mut rates = match string(ENV_INTERVALS)? {
            None => vec![fps],
            Some(list) => list
                .split(',')
                .map(|rate| rate.trim().parse::<u32>().ok().filter(|&r| r > 0 && r <= 1000))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| format!("{ENV_INTERVALS}={list} is not a list of frame rates such as 30,15,10"))?,
        };
        rates.sort_unstable_by(|a, b| b.cmp(a));
        rates.dedup();
        let default_rate = nearest_rate(&rates, 1, fps);
        let card = string(ENV_CARD)?.unwrap_or_else(|| "Outpost emulated camera".into());
        let log = string(ENV_LOG)?.is_some_and(|v| v == "1");
        let stall = std::env::var_os(ENV_STALL)
            .map(|path| CString::new(path.as_bytes()).map_err(|_| format!("{ENV_STALL} holds a NUL byte")))
            .transpose()?;

        let bytes = std::fs::read(&media)
            .map_err(|e| format!("{ENV_MEDIA}={}: cannot be read: {e}", media.to_string_lossy()))?;
        let frame_size = width as usize * height as usize * 2;
        let frames = match format {
            PixFmt::Yuyv => (0..bytes.len() / frame_size).map(|i| i * frame_size..(i + 1) * frame_size).collect(),
            PixFmt::Mjpg => split_jpeg_frames(&bytes)
                .map_err(|problem| format!("{ENV_MEDIA}={}: {problem}", media.to_string_lossy()))?,
        };
        if frames.is_empty() {
            return Err(format!("{ENV_MEDIA}={} holds no whole {width}x{height} frame", media.to_string_lossy()));
        }
        // Compressed frames get a generous bound, as drivers give, raised for any frame above it.
        let largest = frames.iter().map(|f| f.len()).max().unwrap_or(0);
        let sizeimage = u32::try_from(frame_size.max(largest)).map_err(|_| "frames of over 4 GiB".to_string())?;
        Ok(Some(Config {
            device,
            format,
            width,
            height,
            rates,
            default_rate,
            card,
            log,
            stall,
            bytes,
            frames,
            sizeimage,
        }))
    }

    pub fn bytesperline(&self) -> u32 {
        match self.format {
            PixFmt::Yuyv => self.width * 2,
            PixFmt::Mjpg => 0,
        }
    }

    pub fn frame(&self, sequence: u64) -> &[u8] {
        let range = &self.frames[(sequence % self.frames.len() as u64) as usize];
        &self.bytes[range.clone()]
    }
}

fn string(name: &str) -> Result<Option<String>, String> {
    std::env::var_os(name).map(OsString::into_string).transpose().map_err(|_| format!("{name} is not UTF-8"))
}

fn number(name: &str) -> Result<Option<u32>, String> {
    match string(name)? {
        None => Ok(None),
        Some(text) => match text.trim().parse::<u32>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(format!("{name}={text} is not a positive whole number")),
        },
    }
}

/// The advertised rate whose frame interval is nearest `numerator/denominator` seconds, as a
/// driver picks for S_PARM. A zero interval asks for the fastest.
pub fn nearest_rate(rates: &[u32], numerator: u32, denominator: u32) -> u32 {
    if numerator == 0 || denominator == 0 {
        return rates[0];
    }
    let wanted = f64::from(numerator) / f64::from(denominator);
    let distance = |rate: u32| (1.0 / f64::from(rate) - wanted).abs();
    rates.iter().copied().fold(rates[0], |best, rate| if distance(rate) < distance(best) { rate } else { best })
}

// The JPEG split below follows daemon/src/capture/mjpeg.rs (the daemon's own splitter), so the
// emulator frames an MJPEG file exactly as the daemon's replay source does.

const SOI: u8 = 0xD8;
const EOI: u8 = 0xD9;
const SOS: u8 = 0xDA;

/// Byte ranges of the JPEG images in an MJPEG stream. Walks each image's marker segments rather
/// than searching for `FF D9`, because an embedded EXIF thumbnail carries an end marker of its own.
pub fn split_jpeg_frames(bytes: &[u8]) -> Result<Vec<Range<usize>>, String> {
    let mut frames = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let Some(offset) = bytes[pos..].windows(2).position(|w| w == [0xFF, SOI]) else { break };
        let start = pos + offset;
        let end = jpeg_end(bytes, start)
            .ok_or_else(|| format!("frame {} (at byte {start}) is cut off before its end marker", frames.len() + 1))?;
        frames.push(start..end);
        pos = end;
    }
    if frames.is_empty() {
        return Err("no JPEG frame found (an MJPEG file is JPEG images back to back)".into());
    }
    Ok(frames)
}

fn jpeg_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut pos = start + 2;
    loop {
        while *bytes.get(pos)? == 0xFF && *bytes.get(pos + 1)? == 0xFF {
            pos += 1; // fill bytes
        }
        if *bytes.get(pos)? != 0xFF {
            return None;
        }
        let marker = *bytes.get(pos + 1)?;
        match marker {
            EOI => return Some(pos + 2),
            0xD0..=0xD7 | 0x01 => pos += 2,
            _ => {
                let length = usize::from(u16::from_be_bytes([*bytes.get(pos + 2)?, *bytes.get(pos + 3)?]));
                pos += 2 + length;
                if marker == SOS {
                    pos = scan_entropy_coded(bytes, pos)?;
                }
            }
        }
    }
}

/// Skips entropy-coded data, where 0xFF is followed by a stuffed 0x00 or a restart marker.
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

    #[test]
    fn nearest_rate_compares_intervals() {
        let rates = [30, 15, 10];
        assert_eq!(nearest_rate(&rates, 1, 25), 30);
        assert_eq!(nearest_rate(&rates, 1, 11), 10);
        assert_eq!(nearest_rate(&rates, 1, 1000), 30);
        assert_eq!(nearest_rate(&rates, 0, 0), 30);
    }

    #[test]
    fn thumbnail_end_marker_does_not_end_the_frame() {
        // SOI, APP1 holding a thumbnail's SOI..EOI, SOS, data with a stuffed FF 00, EOI.
        let mut jpeg = vec![0xFF, 0xD8, 0xFF, 0xE1, 0x00, 0x08, 0xFF, 0xD8, 0x11, 0x22, 0xFF, 0xD9];
        jpeg.extend([0xFF, 0xDA, 0x00, 0x03, 0x01, 0x33, 0xFF, 0x00, 0x44, 0xFF, 0xD9]);
        let two = [jpeg.clone(), jpeg].concat();
        assert_eq!(split_jpeg_frames(&two).unwrap(), vec![0..23, 23..46]);
    }
}
