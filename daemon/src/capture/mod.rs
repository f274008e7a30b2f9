//! Sources: where frames and sound come from.
//!
//! A source is a blocking iterator, run on a thread of its own by the pipeline, the way a real
//! camera or microphone hands over one buffer at a time. Replay sources pace themselves to the
//! configured rate so that everything downstream sees what it would see from a live device.

mod alsa_mic;
mod image_dir;
mod mjpeg;
mod pacing;
mod pipe_camera;
mod replay;
mod resample;
mod status;
mod v4l2_camera;
mod wav;
mod yuyv;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use image::RgbImage;

use crate::config::{CameraConfig, CameraSourceKind, MicrophoneConfig, MicrophoneSourceKind, PixelFormat};
use crate::media::MediaRef;

pub use alsa_mic::{AlsaCapture, AlsaSettings, CAPTURE_RATE};
pub use image_dir::ImageDirReplay;
pub use mjpeg::{split_jpeg_frames, MjpegReplay};
pub use pipe_camera::PipeCamera;
pub use replay::{FrameStore, Replay};
pub use status::{DeviceReporters, DeviceState, DeviceStatus, Reconnect, StatusReporter, StopFlag};
pub use v4l2_camera::{describe_camera, CameraMode, V4l2Camera, V4l2Settings};
pub use wav::{read_wav, Recording, WavReplay};
pub use yuyv::{yuyv_to_rgb, YuyvReplay};

/// The most samples one [`AudioChunk`] holds: 100 ms at 48 kHz.
pub const MAX_CHUNK_SAMPLES: usize = 4800;

/// One picture from a camera, in RGB.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Counts frames from this source, from 0.
    pub seq: u64,
    pub captured_at: SystemTime,
    pub image: Arc<RgbImage>,
}

/// A short run of mono 16-bit samples from a microphone; fixed capacity, so the hot path does
/// not allocate.
#[derive(Debug, Clone)]
pub struct AudioChunk {
    pub seq: u64,
    pub captured_at: SystemTime,
    pub sample_rate: u32,
    pub samples: heapless::Vec<i16, MAX_CHUNK_SAMPLES>,
}

impl AudioChunk {
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.samples.len() as f64 / f64::from(self.sample_rate))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {media}: {source}")]
    Read { media: String, source: std::io::Error },
    #[error("{media}: {problem}")]
    Format { media: String, problem: String },
    #[error("{media}: frame {index} cannot be decoded: {problem}")]
    BadFrame { media: String, index: usize, problem: String },
}

/// Something that produces frames, one call at a time.
pub trait FrameSource: Send {
    /// Names the source in logs, e.g. `mjpeg replay of builtin:people.mjpeg at 10 fps`.
    fn describe(&self) -> String;
    /// Blocks until the next frame is due. `Ok(None)`: the source has ended for good.
    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError>;
}

/// Something that produces audio, one chunk at a time.
pub trait AudioSource: Send {
    fn describe(&self) -> String;
    /// Blocks until the next chunk is due. `Ok(None)`: the source has ended for good.
    fn next_chunk(&mut self) -> Result<Option<AudioChunk>, SourceError>;
}

/// Opens the camera a config describes (a validated one). Replay sources read and check their
/// media here, so a bad file is reported before anything starts; live ones report what becomes of
/// the device through `status`.
pub fn open_camera(
    config: &CameraConfig,
    base_dir: &std::path::Path,
    status: &StatusReporter,
    stop: &StopFlag,
) -> Result<Box<dyn FrameSource>, SourceError> {
    let missing = |key: &str| SourceError::Format { media: "[camera]".into(), problem: format!("`{key}` is not set") };
    let replay_media = || {
        let path = config.path.as_deref().ok_or_else(|| missing("path"))?;
        MediaRef::parse(path, base_dir).map_err(|problem| SourceError::Format { media: path.to_owned(), problem })
    };
    let source: Box<dyn FrameSource> = match config.source {
        CameraSourceKind::Mjpeg => Box::new(MjpegReplay::open(&replay_media()?, config.fps, config.looping)?),
        CameraSourceKind::Yuyv => {
            let media = replay_media()?;
            let (Some(width), Some(height)) = (config.width, config.height) else {
                return Err(SourceError::Format {
                    media: media.to_string(),
                    problem: "raw YUYV needs `width` and `height`".into(),
                });
            };
            Box::new(YuyvReplay::open(&media, width, height, config.fps, config.looping)?)
        }
        CameraSourceKind::Images => Box::new(ImageDirReplay::open(&replay_media()?, config.fps, config.looping)?),
        CameraSourceKind::V4l2 => {
            let device = config.device.as_deref().ok_or_else(|| missing("device"))?;
            let settings = V4l2Settings {
                format: config.format.unwrap_or(PixelFormat::Mjpeg),
                width: config.width.unwrap_or(V4l2Settings::DEFAULT_WIDTH),
                height: config.height.unwrap_or(V4l2Settings::DEFAULT_HEIGHT),
                fps: config.fps,
            };
            return Ok(Box::new(V4l2Camera::open(base_dir.join(device), settings, status.clone(), stop.clone())));
        }
        CameraSourceKind::Pipe => {
            let mut command = config.command.clone().ok_or_else(|| missing("command"))?;
            // A program named by a relative path is found from the config file, like every other
            // path in it; a bare name is looked up in PATH.
            if let Some(program) = command.first_mut().filter(|p| p.contains('/') && !p.starts_with('/')) {
                *program = base_dir.join(&*program).display().to_string();
            }
            return Ok(Box::new(PipeCamera::start(command, config.fps, status.clone(), stop.clone())));
        }
    };
    status.online(config.path.as_deref().unwrap_or_default(), source.describe());
    Ok(source)
}

/// Opens the microphone a config describes (a validated one: `path` for wav, `device` for alsa).
pub fn open_microphone(
    config: &MicrophoneConfig,
    base_dir: &std::path::Path,
    status: &StatusReporter,
    stop: &StopFlag,
) -> Result<Box<dyn AudioSource>, SourceError> {
    let missing =
        |key: &str| SourceError::Format { media: "[microphone]".into(), problem: format!("`{key}` is not set") };
    Ok(match config.source {
        MicrophoneSourceKind::Wav => {
            let path = config.path.as_deref().ok_or_else(|| missing("path"))?;
            let media = MediaRef::parse(path, base_dir)
                .map_err(|problem| SourceError::Format { media: path.to_owned(), problem })?;
            let source = WavReplay::open(&media, config.chunk_ms, config.looping)?;
            status.online(path, source.describe());
            Box::new(source)
        }
        MicrophoneSourceKind::Alsa => {
            let device = config.device.as_deref().ok_or_else(|| missing("device"))?;
            let settings = AlsaSettings { chunk_ms: config.chunk_ms, buffer_ms: config.buffer_ms };
            Box::new(AlsaCapture::open(device, settings, status.clone(), stop.clone())?)
        }
    })
}
