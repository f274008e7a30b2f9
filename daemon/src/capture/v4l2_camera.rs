//! A live camera through V4L2 (the `v4l` crate): a USB webcam, or anything else with a capture
//! node. The format, size and rate from the config are negotiated to the nearest the camera
//! offers (logged, and published on the camera's status topic); frames stream through mmap
//! buffers and are converted to RGB.
//!
//! A camera that is unplugged, stalls or keeps sending frames that cannot be decoded is closed
//! and opened again with back-off, without ending the source: the rest of the daemon keeps
//! running, and capture resumes when the device returns.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use image::RgbImage;
use v4l::buffer::Type;
use v4l::capability::Flags as CapabilityFlags;
use v4l::frameinterval::FrameIntervalEnum;
use v4l::framesize::FrameSizeEnum;
use v4l::io::mmap::Stream as MmapStream;
use v4l::io::traits::{CaptureStream, Stream as StreamTrait};
use v4l::video::capture::Parameters;
use v4l::video::Capture;
use v4l::{Device, Format, FourCC, Fraction};

use super::mjpeg::decode_jpeg;
use super::pacing::RateLimiter;
use super::status::{Reconnect, StatusReporter, StopFlag};
use super::yuyv::yuyv_to_rgb_with_stride;
use super::{Frame, FrameSource, SourceError};
use crate::config::PixelFormat;

/// Buffers the driver fills while one is being converted.
const BUFFER_COUNT: u32 = 4;
/// A camera that sends nothing for this long is taken as failed (a first frame after STREAMON can
/// take a second while exposure settles).
const STALL_TIMEOUT: Duration = Duration::from_secs(5);

const MJPG: FourCC = FourCC { repr: *b"MJPG" };
const YUYV: FourCC = FourCC { repr: *b"YUYV" };

/// What the config asks of the camera.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct V4l2Settings {
    pub format: PixelFormat,
    pub width: u32,
    pub height: u32,
    pub fps: f64,
}

impl V4l2Settings {
    pub const DEFAULT_WIDTH: u32 = 640;
    pub const DEFAULT_HEIGHT: u32 = 480;
}

/// What the camera agreed to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CameraMode {
    pub format: PixelFormat,
    pub width: u32,
    pub height: u32,
    pub fps: f64,
}

impl fmt::Display for CameraMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}x{} at {} fps", format_name(self.format), self.width, self.height, self.fps)
    }
}

fn format_name(format: PixelFormat) -> &'static str {
    match format {
        PixelFormat::Mjpeg => "MJPEG",
        PixelFormat::Yuyv => "YUYV",
    }
}

fn fourcc_of(format: PixelFormat) -> FourCC {
    match format {
        PixelFormat::Mjpeg => MJPG,
        PixelFormat::Yuyv => YUYV,
    }
}

fn format_of(fourcc: FourCC) -> Option<PixelFormat> {
    match fourcc.repr {
        r if r == MJPG.repr => Some(PixelFormat::Mjpeg),
        r if r == YUYV.repr => Some(PixelFormat::Yuyv),
        _ => None,
    }
}

pub struct V4l2Camera {
    path: PathBuf,
    settings: V4l2Settings,
    open: Option<OpenCamera>,
    reconnect: Reconnect,
    /// Only while the camera runs faster than configured.
    limiter: Option<RateLimiter>,
    seq: u64,
    opened_before: bool,
    reopens: u64,
}

impl V4l2Camera {
    /// Opens the camera now if it is there; if not, says so and tries again from `next_frame`,
    /// with back-off: a camera plugged in later is picked up then.
    pub fn open(path: PathBuf, settings: V4l2Settings, status: StatusReporter, stop: StopFlag) -> Self {
        let mut camera = Self {
            reconnect: Reconnect::new("camera", path.display().to_string(), status, stop),
            path,
            settings,
            open: None,
            limiter: None,
            seq: 0,
            opened_before: false,
            reopens: 0,
        };
        camera.try_open();
        camera
    }

    /// How often the camera was opened again after it failed or went missing.
    pub fn reopens(&self) -> u64 {
        self.reopens
    }

    /// What the camera agreed to, while it is open.
    pub fn mode(&self) -> Option<CameraMode> {
        self.open.as_ref().map(|camera| camera.mode)
    }

    fn asked(&self) -> CameraMode {
        let V4l2Settings { format, width, height, fps } = self.settings;
        CameraMode { format, width, height, fps }
    }

    fn try_open(&mut self) {
        match OpenCamera::open(&self.path, &self.settings) {
            Ok(camera) => {
                let (asked, name, card) = (self.asked(), self.reconnect.source(), &camera.card);
                if camera.mode == asked {
                    tracing::info!("camera {name} ({card}): {}", camera.mode);
                } else {
                    let skipped = if camera.mode.fps > asked.fps { " (extra frames are skipped)" } else { "" };
                    tracing::info!(
                        "camera {name} ({card}): {}, the nearest it offers to the {asked} asked for{skipped}",
                        camera.mode
                    );
                }
                // A camera at or below the rate asked for gives every frame it has.
                self.limiter =
                    (camera.mode.fps > asked.fps).then(|| RateLimiter::new(Duration::from_secs_f64(1.0 / asked.fps)));
                if self.opened_before {
                    self.reopens += 1;
                }
                self.opened_before = true;
                self.open = Some(camera);
            }
            Err(error) => self.reconnect.failed(error),
        }
    }

    /// Closes a camera that failed; the next `next_frame` opens it again after its back-off.
    fn fail(&mut self, error: String) {
        if let Some(camera) = self.open.take() {
            camera.close(&self.path);
        }
        self.reconnect.failed(error);
    }
}

impl FrameSource for V4l2Camera {
    fn describe(&self) -> String {
        format!("V4L2 camera {} (asked for {})", self.reconnect.source(), self.asked())
    }

    /// Blocks until a frame is captured. A failing camera is reopened with back-off (1 s doubling
    /// to 30 s) for as long as it takes; `Ok(None)` once the pipeline stops.
    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        loop {
            if self.reconnect.stopping() {
                return Ok(None);
            }
            let Some(camera) = self.open.as_mut() else {
                if self.reconnect.ready_to_open() {
                    self.try_open();
                }
                continue;
            };
            let (bytes, used) = match CaptureStream::next(&mut camera.stream) {
                Ok((bytes, meta)) => (bytes, meta.bytesused as usize),
                Err(e) => {
                    let error = match e.raw_os_error() {
                        Some(libc::ENODEV) => format!("the camera is gone (unplugged?): {e}"),
                        _ if e.kind() == std::io::ErrorKind::TimedOut => {
                            format!("no frame for {} s: the camera stalled", STALL_TIMEOUT.as_secs())
                        }
                        _ => format!("capture failed: {e}"),
                    };
                    self.fail(error);
                    continue;
                }
            };
            // Frames beyond the configured rate are dropped before the costly decode.
            if self.limiter.as_mut().is_some_and(|limiter| !limiter.admit(Instant::now())) {
                continue;
            }
            let (mode, stride) = (camera.mode, camera.stride);
            match convert(mode, stride, &bytes[..used.min(bytes.len())]) {
                Ok(image) => {
                    self.reconnect.delivered(|| mode.to_string());
                    let seq = self.seq;
                    self.seq += 1;
                    return Ok(Some(Frame { seq, captured_at: SystemTime::now(), image: Arc::new(image) }));
                }
                Err(problem) => {
                    if let Some(error) = self.reconnect.bad_frame(&problem) {
                        self.fail(error);
                    }
                }
            }
        }
    }
}

/// One buffer's bytes as an RGB image; YUYV rows are `stride` bytes apart (a driver may pad them).
fn convert(mode: CameraMode, stride: u32, bytes: &[u8]) -> Result<RgbImage, String> {
    match mode.format {
        PixelFormat::Mjpeg => decode_jpeg(bytes),
        PixelFormat::Yuyv => {
            let stride = stride.max(mode.width * 2);
            let size = stride as usize * mode.height as usize;
            let frame = bytes.get(..size).ok_or_else(|| {
                format!("{} bytes is short of a {}x{} YUYV frame ({size})", bytes.len(), mode.width, mode.height)
            })?;
            yuyv_to_rgb_with_stride(frame, mode.width, mode.height, stride)
        }
    }
}

/// A camera that is streaming.
struct OpenCamera {
    stream: MmapStream<'static>,
    _device: Device,
    card: String,
    mode: CameraMode,
    /// Bytes from one row to the next in a YUYV buffer.
    stride: u32,
}

impl OpenCamera {
    fn open(path: &Path, settings: &V4l2Settings) -> Result<Self, String> {
        let device = Device::with_path(path).map_err(|e| format!("cannot open it: {e}"))?;
        let caps = device.query_caps().map_err(|e| format!("cannot query it (is it a V4L2 device?): {e}"))?;
        if !caps.capabilities.contains(CapabilityFlags::VIDEO_CAPTURE | CapabilityFlags::STREAMING) {
            return Err(format!(
                "{} cannot stream video (a UVC camera's second node carries metadata only: use the other, \
                 `outpostd probe` lists them)",
                caps.card
            ));
        }
        let offered: Vec<FourCC> = device
            .enum_formats()
            .map_err(|e| format!("cannot list its formats: {e}"))?
            .into_iter()
            .map(|description| description.fourcc)
            .collect();
        let format = choose_format(&offered, settings.format)?;
        let fourcc = fourcc_of(format);
        // Listing sizes and setting the rate are optional for a driver: without them, ask for the
        // configured values and take what S_FMT gives.
        let sizes: Vec<FrameSizeEnum> =
            device.enum_framesizes(fourcc).unwrap_or_default().into_iter().map(|size| size.size).collect();
        let (width, height) =
            nearest_size(&sizes, settings.width, settings.height).unwrap_or((settings.width, settings.height));
        // Drivers adjust a format they cannot do to one they can: what comes back is what streams.
        let set = device
            .set_format(&Format::new(width, height, fourcc))
            .map_err(|e| format!("refuses {} {width}x{height}: {e}", format_name(format)))?;
        let format = format_of(set.fourcc)
            .ok_or_else(|| format!("was asked for {} but chose {} instead", format_name(format), set.fourcc))?;
        let intervals: Vec<FrameIntervalEnum> = device
            .enum_frameintervals(set.fourcc, set.width, set.height)
            .map(|intervals| intervals.into_iter().map(|i| i.interval).collect())
            .unwrap_or_default();
        let interval = choose_interval(&intervals, settings.fps);
        let fps = match device.set_params(&Parameters::new(interval)) {
            Ok(params) => fps_of(params.interval).unwrap_or(settings.fps),
            Err(e) => {
                tracing::warn!("camera {}: cannot set its frame rate ({e}); taking what it sends", path.display());
                fps_of(interval).unwrap_or(settings.fps)
            }
        };
        let mode = CameraMode { format, width: set.width, height: set.height, fps };

        let mut stream = MmapStream::with_buffers(&device, Type::VideoCapture, BUFFER_COUNT)
            .map_err(|e| format!("cannot map {BUFFER_COUNT} capture buffers: {e}"))?;
        stream.set_timeout(STALL_TIMEOUT);
        Ok(Self { stream, _device: device, card: caps.card, mode, stride: set.stride })
    }

    /// Stops streaming and closes the device. The `v4l` crate panics in `drop` when stopping the
    /// stream or releasing its buffers fails with anything but ENODEV, and a second panic while
    /// unwinding the first would abort the daemon: stop it here first, and if that fails, leak the
    /// stream (one descriptor and its buffers) rather than drop it.
    fn close(mut self, path: &Path) {
        if let Err(e) = StreamTrait::stop(&mut self.stream) {
            if e.raw_os_error() != Some(libc::ENODEV) {
                tracing::warn!("camera {}: cannot stop streaming ({e}); leaving its buffers mapped", path.display());
                std::mem::forget(self.stream);
                return;
            }
        }
        if catch_unwind(AssertUnwindSafe(|| drop(self))).is_err() {
            tracing::warn!("camera {}: releasing its buffers failed; it is closed anyway", path.display());
        }
    }
}

/// The configured format when the camera has it, else the other one outpostd reads.
fn choose_format(offered: &[FourCC], wanted: PixelFormat) -> Result<PixelFormat, String> {
    let other = match wanted {
        PixelFormat::Mjpeg => PixelFormat::Yuyv,
        PixelFormat::Yuyv => PixelFormat::Mjpeg,
    };
    [wanted, other].into_iter().find(|format| offered.contains(&fourcc_of(*format))).ok_or_else(|| {
        let names: Vec<String> = offered.iter().map(ToString::to_string).collect();
        format!(
            "offers {} but outpostd reads MJPEG or YUYV",
            if names.is_empty() { "no format".into() } else { names.join(", ") }
        )
    })
}

/// The offered size closest to the one asked for (by the sum of the width and height
/// differences; the larger on a tie). `None` when the camera lists no sizes.
fn nearest_size(sizes: &[FrameSizeEnum], width: u32, height: u32) -> Option<(u32, u32)> {
    let snap = |value: u32, min: u32, max: u32, step: u32| {
        let clamped = value.clamp(min, max.max(min));
        let step = step.max(1);
        min + (clamped - min) / step * step
    };
    sizes
        .iter()
        .map(|size| match size {
            FrameSizeEnum::Discrete(d) => (d.width, d.height),
            FrameSizeEnum::Stepwise(s) => (
                snap(width, s.min_width, s.max_width, s.step_width),
                snap(height, s.min_height, s.max_height, s.step_height),
            ),
        })
        .min_by_key(|&(w, h)| {
            (
                u64::from(w.abs_diff(width)) + u64::from(h.abs_diff(height)),
                std::cmp::Reverse(u64::from(w) * u64::from(h)),
            )
        })
}

/// The frame interval to ask for: the slowest rate at or above the one configured (extra frames
/// are skipped, missing ones cannot be made up), else the fastest there is.
fn choose_interval(intervals: &[FrameIntervalEnum], fps: f64) -> Fraction {
    let wanted = interval_for(fps);
    let rates: Vec<(f64, Fraction)> = intervals
        .iter()
        .filter_map(|interval| {
            let fraction = match interval {
                FrameIntervalEnum::Discrete(fraction) => *fraction,
                FrameIntervalEnum::Stepwise(s) => {
                    let (a, b) = (fps_of(s.max)?, fps_of(s.min)?);
                    interval_for(fps.clamp(a.min(b), a.max(b)))
                }
            };
            Some((fps_of(fraction)?, fraction))
        })
        .collect();
    let at_or_above = rates.iter().filter(|(rate, _)| *rate >= fps - 1e-6).min_by(|a, b| a.0.total_cmp(&b.0));
    let fastest = rates.iter().max_by(|a, b| a.0.total_cmp(&b.0));
    at_or_above.or(fastest).map_or(wanted, |(_, fraction)| *fraction)
}

fn interval_for(fps: f64) -> Fraction {
    Fraction::new(1000, (fps * 1000.0).round().max(1.0) as u32)
}

fn fps_of(interval: Fraction) -> Option<f64> {
    (interval.numerator > 0 && interval.denominator > 0)
        .then(|| f64::from(interval.denominator) / f64::from(interval.numerator))
        // 30000/1001 and the like: two decimals are what a person reads.
        .map(|fps| (fps * 100.0).round() / 100.0)
        .filter(|fps| *fps > 0.0)
}

/// What `outpostd probe` prints for one camera node: its name, then each format it offers with
/// its sizes and rates.
pub fn describe_camera(path: &Path) -> Result<Vec<String>, String> {
    let device = Device::with_path(path).map_err(|e| format!("cannot open it: {e}"))?;
    let caps = device.query_caps().map_err(|e| format!("cannot query it: {e}"))?;
    let mut lines = vec![format!("{} ({}, {})", caps.card, caps.driver, caps.bus)];
    if !caps.capabilities.contains(CapabilityFlags::VIDEO_CAPTURE) {
        lines.push("not a video capture node (a UVC camera's metadata node): use its other node".into());
        return Ok(lines);
    }
    let formats = device.enum_formats().map_err(|e| format!("cannot list its formats: {e}"))?;
    for description in formats {
        let readable = if format_of(description.fourcc).is_some() { "" } else { " (outpostd cannot read this one)" };
        lines.push(format!("{} ({}){readable}:", description.fourcc, description.description));
        for size in device.enum_framesizes(description.fourcc).unwrap_or_default() {
            match size.size {
                FrameSizeEnum::Discrete(d) => {
                    let rates: Vec<String> = device
                        .enum_frameintervals(description.fourcc, d.width, d.height)
                        .unwrap_or_default()
                        .into_iter()
                        .filter_map(|i| match i.interval {
                            FrameIntervalEnum::Discrete(fraction) => fps_of(fraction).map(|fps| fps.to_string()),
                            FrameIntervalEnum::Stepwise(s) => Some(format!(
                                "{}-{}",
                                fps_of(s.max).unwrap_or_default(),
                                fps_of(s.min).unwrap_or_default()
                            )),
                        })
                        .collect();
                    lines.push(format!("  {}x{} at {} fps", d.width, d.height, rates.join(", ")));
                }
                FrameSizeEnum::Stepwise(s) => lines.push(format!(
                    "  {}x{} to {}x{} in steps of {}x{}",
                    s.min_width, s.min_height, s.max_width, s.max_height, s.step_width, s.step_height
                )),
            }
        }
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use v4l::framesize::{Discrete, Stepwise};

    use super::*;

    fn discrete(sizes: &[(u32, u32)]) -> Vec<FrameSizeEnum> {
        sizes.iter().map(|&(width, height)| FrameSizeEnum::Discrete(Discrete { width, height })).collect()
    }

    #[test]
    fn the_configured_format_wins_and_the_other_one_stands_in() {
        assert_eq!(choose_format(&[YUYV, MJPG], PixelFormat::Mjpeg), Ok(PixelFormat::Mjpeg));
        assert_eq!(choose_format(&[YUYV], PixelFormat::Mjpeg), Ok(PixelFormat::Yuyv));
        let err = choose_format(&[FourCC::new(b"H264"), FourCC::new(b"GREY")], PixelFormat::Mjpeg).unwrap_err();
        assert_eq!(err, "offers H264, GREY but outpostd reads MJPEG or YUYV");
    }

    #[test]
    fn nearest_size_prefers_exact_then_closest_then_larger() {
        let sizes = discrete(&[(320, 240), (640, 480), (1280, 720), (1920, 1080)]);
        assert_eq!(nearest_size(&sizes, 640, 480), Some((640, 480)));
        assert_eq!(nearest_size(&sizes, 1280, 800), Some((1280, 720)));
        assert_eq!(nearest_size(&sizes, 800, 600), Some((640, 480)));
        // 960x600 is 480 from both 640x480 and 1280x720: the larger keeps more detail.
        assert_eq!(nearest_size(&discrete(&[(640, 480), (1280, 720)]), 960, 600), Some((1280, 720)));
        assert_eq!(nearest_size(&[], 640, 480), None);
    }

    #[test]
    fn stepwise_sizes_snap_to_their_grid() {
        let sizes = [FrameSizeEnum::Stepwise(Stepwise {
            min_width: 64,
            max_width: 4056,
            step_width: 16,
            min_height: 64,
            max_height: 3040,
            step_height: 2,
        })];
        assert_eq!(nearest_size(&sizes, 1000, 5000), Some((992, 3040)));
    }

    #[test]
    fn interval_is_the_slowest_rate_at_or_above_the_one_asked_for() {
        let rates = |fps: &[u32]| -> Vec<FrameIntervalEnum> {
            fps.iter().map(|&f| FrameIntervalEnum::Discrete(Fraction::new(1, f))).collect()
        };
        let chosen = |intervals: &[FrameIntervalEnum], fps| fps_of(choose_interval(intervals, fps)).unwrap();
        assert_eq!(chosen(&rates(&[30, 15, 10, 5]), 10.0), 10.0);
        assert_eq!(chosen(&rates(&[30, 15, 5]), 10.0), 15.0);
        assert_eq!(chosen(&rates(&[15, 5]), 25.0), 15.0, "nothing fast enough: the fastest");
        assert_eq!(chosen(&[], 12.5), 12.5, "no list: ask for what is configured");
        let ntsc = [FrameIntervalEnum::Discrete(Fraction::new(1001, 30000))];
        assert_eq!(chosen(&ntsc, 10.0), 29.97);
    }

    #[test]
    fn short_yuyv_buffer_is_a_named_problem() {
        let mode = CameraMode { format: PixelFormat::Yuyv, width: 4, height: 2, fps: 10.0 };
        assert_eq!(convert(mode, 8, &[0; 15]).unwrap_err(), "15 bytes is short of a 4x2 YUYV frame (16)");
        assert_eq!(convert(mode, 8, &[128; 16]).unwrap().dimensions(), (4, 2));
    }

    #[test]
    fn padded_yuyv_rows_are_read_at_their_stride() {
        let mode = CameraMode { format: PixelFormat::Yuyv, width: 2, height: 2, fps: 10.0 };
        // Rows of 4 bytes padded to 8: a grey row and a white one.
        let padded = [128, 128, 128, 128, 0, 0, 0, 0, 235, 128, 235, 128, 0, 0, 0, 0];
        let image = convert(mode, 8, &padded).unwrap();
        let tight = convert(mode, 4, &[128, 128, 128, 128, 235, 128, 235, 128]).unwrap();
        assert_eq!(image, tight);
    }
}
