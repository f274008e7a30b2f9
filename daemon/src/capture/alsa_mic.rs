//! A live microphone through ALSA (alsa-lib, via the `alsa` crate): S16_LE from a named PCM
//! (`default`, `plughw:CARD=Device,DEV=0`, `hw:1,0`, ...), with explicit buffer and period sizes,
//! handed on as 16 kHz mono. A PCM that cannot give that (a `hw:` device at 48 kHz in stereo) is
//! captured as it can and converted (`resample.rs`).
//!
//! The field is hard on microphones: an overrun (the daemon fell behind the device) is counted
//! and capture goes on; a device that fails or disappears is closed and opened again with
//! back-off, without ending the source, so the rest of the daemon keeps running.

use std::time::SystemTime;

use alsa::pcm::{Access, Format, HwParams, PCM};
use alsa::{Direction, ValueOr};

use super::resample::ToMono16k;
use super::status::{Reconnect, StatusReporter, StopFlag};
use super::{AudioChunk, AudioSource, SourceError, MAX_CHUNK_SAMPLES};

/// What the gates and the model take: 16 kHz mono.
pub const CAPTURE_RATE: u32 = 16_000;
/// A microphone that delivers nothing for this long is taken as failed.
const STALL_TIMEOUT_MS: u32 = 5_000;

/// How the PCM is asked to buffer: a period is one chunk, the buffer holds `buffer_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlsaSettings {
    pub chunk_ms: u32,
    pub buffer_ms: u32,
}

pub struct AlsaCapture {
    settings: AlsaSettings,
    pcm: Option<OpenPcm>,
    buffer: Vec<i16>,
    converted: Vec<i16>,
    seq: u64,
    overruns: u64,
    reopens: u64,
    opened_before: bool,
    reconnect: Reconnect,
}

impl AlsaCapture {
    /// Opens the PCM now. A device that cannot be opened is logged and tried again from
    /// `next_chunk`, with back-off: a microphone plugged in later is picked up then.
    pub fn open(
        device: &str,
        settings: AlsaSettings,
        status: StatusReporter,
        stop: StopFlag,
    ) -> Result<Self, SourceError> {
        let chunk_len = (u64::from(CAPTURE_RATE) * u64::from(settings.chunk_ms) / 1000) as usize;
        if chunk_len == 0 || chunk_len > MAX_CHUNK_SAMPLES {
            return Err(SourceError::Format {
                media: format!("ALSA PCM {device}"),
                problem: format!(
                    "{} ms is {chunk_len} samples a chunk at {CAPTURE_RATE} Hz; a chunk holds 1 to {MAX_CHUNK_SAMPLES}",
                    settings.chunk_ms
                ),
            });
        }
        let mut capture = Self {
            settings,
            pcm: None,
            buffer: Vec::new(),
            converted: Vec::with_capacity(MAX_CHUNK_SAMPLES),
            seq: 0,
            overruns: 0,
            reopens: 0,
            opened_before: false,
            reconnect: Reconnect::new("microphone", device.to_owned(), status, stop),
        };
        capture.try_open();
        Ok(capture)
    }

    /// Overruns seen so far: each one lost the audio the daemon did not read in time.
    pub fn overruns(&self) -> u64 {
        self.overruns
    }

    /// How often the device was opened again after it failed.
    pub fn reopens(&self) -> u64 {
        self.reopens
    }

    fn try_open(&mut self) {
        match OpenPcm::open(self.reconnect.source(), self.settings) {
            Ok(pcm) => {
                if self.opened_before {
                    self.reopens += 1;
                    tracing::info!(device = %self.reconnect.source(), "microphone opened again");
                }
                self.opened_before = true;
                self.pcm = Some(pcm);
            }
            Err(e) => self.reconnect.failed(e.to_string()),
        }
    }

    /// Reads one period from the open PCM and converts it into `converted`. `Err` says why the
    /// PCM must be closed and opened again.
    fn read_chunk(&mut self, open: &mut OpenPcm) -> Result<(), String> {
        let channels = open.channels;
        self.buffer.resize(open.converter.frames_in() * channels, 0);
        let io = open.pcm.io_i16().map_err(|e| e.to_string())?;
        let mut filled = 0;
        while filled < self.buffer.len() {
            // Waiting first bounds a read: a microphone that stops sending without an error (a
            // hung USB device) is taken as failed instead of blocking the source for ever.
            let read = match open.pcm.wait(Some(STALL_TIMEOUT_MS)) {
                Ok(true) => io.readi(&mut self.buffer[filled..]),
                Ok(false) => return Err(format!("no audio for {} s: the microphone stalled", STALL_TIMEOUT_MS / 1000)),
                Err(e) => Err(e),
            };
            match read {
                Ok(frames) => filled += frames * channels,
                // EPIPE: overrun; ESTRPIPE: the system was suspended. Both are recovered in place.
                Err(e) if e.errno() == libc::EPIPE || e.errno() == libc::ESTRPIPE => {
                    if e.errno() == libc::EPIPE {
                        self.overruns += 1;
                        tracing::warn!(device = %self.reconnect.source(), overruns = self.overruns, "microphone overrun: audio was lost, capture goes on");
                    }
                    open.pcm.try_recover(e, true).map_err(|e| format!("cannot recover from an overrun: {e}"))?;
                    // Recovery leaves a capture stream prepared, not running: waiting needs it started.
                    open.pcm.start().map_err(|e| format!("cannot restart capture after an overrun: {e}"))?;
                    filled = 0;
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        self.converted.clear();
        open.converter.convert(&self.buffer, &mut self.converted).map_err(|e| format!("cannot convert its audio: {e}"))
    }
}

/// An open capture PCM and how its audio becomes 16 kHz mono.
struct OpenPcm {
    pcm: PCM,
    rate: u32,
    channels: usize,
    converter: ToMono16k,
}

impl OpenPcm {
    fn open(device: &str, settings: AlsaSettings) -> Result<Self, SourceError> {
        let media = format!("ALSA PCM {device}");
        let fail =
            |what: &str, e: alsa::Error| SourceError::Format { media: media.clone(), problem: format!("{what}: {e}") };
        let pcm = PCM::new(device, Direction::Capture, false)
            .map_err(|e| fail("cannot open it for capture (list the PCMs with `outpostd probe` or `arecord -L`)", e))?;
        let (rate, channels) = {
            let hw = HwParams::any(&pcm).map_err(|e| fail("cannot read its capabilities", e))?;
            hw.set_access(Access::RWInterleaved).map_err(|e| fail("no interleaved read access", e))?;
            hw.set_format(Format::s16()).map_err(|e| fail("no 16-bit little-endian samples (try plughw:...)", e))?;
            let channels = hw.set_channels_near(1).map_err(|e| fail("cannot choose a channel count", e))?;
            let rate = hw.set_rate_near(CAPTURE_RATE, ValueOr::Nearest).map_err(|e| fail("cannot choose a rate", e))?;
            let period = (u64::from(rate) * u64::from(settings.chunk_ms) / 1000) as alsa::pcm::Frames;
            hw.set_period_size_near(period, ValueOr::Nearest).map_err(|e| fail("cannot set the period size", e))?;
            let buffer = (u64::from(rate) * u64::from(settings.buffer_ms) / 1000) as alsa::pcm::Frames;
            hw.set_buffer_size_near(buffer.max(2 * period)).map_err(|e| fail("cannot set the buffer size", e))?;
            pcm.hw_params(&hw).map_err(|e| fail("refuses 16-bit interleaved capture", e))?;
            (rate, channels as usize)
        };
        let frames_in = (u64::from(rate) * u64::from(settings.chunk_ms) / 1000) as usize;
        let converter = ToMono16k::new(rate, channels, frames_in, CAPTURE_RATE)
            .map_err(|problem| SourceError::Format { media: media.clone(), problem })?;
        if converter.frames_out() > MAX_CHUNK_SAMPLES {
            return Err(SourceError::Format {
                media,
                problem: format!(
                    "{} samples a chunk at {CAPTURE_RATE} Hz is more than a chunk holds ({MAX_CHUNK_SAMPLES})",
                    converter.frames_out()
                ),
            });
        }
        if rate != CAPTURE_RATE || channels != 1 {
            tracing::info!(
                device,
                rate,
                channels,
                "microphone gives {channels} channel(s) at {rate} Hz: converted to mono {CAPTURE_RATE} Hz"
            );
        }
        pcm.prepare().map_err(|e| fail("cannot prepare it", e))?;
        // Started now rather than by the first read, so that reads can wait with a timeout.
        pcm.start().map_err(|e| fail("cannot start capture", e))?;
        Ok(Self { pcm, rate, channels, converter })
    }

    /// What the device gives, for the status topic.
    fn mode(&self) -> String {
        format!("S16_LE, {} channel(s) at {} Hz, handed on as mono {CAPTURE_RATE} Hz", self.channels, self.rate)
    }
}

impl AudioSource for AlsaCapture {
    fn describe(&self) -> String {
        format!(
            "ALSA capture from {} (16-bit, as mono {CAPTURE_RATE} Hz, {} ms chunks, {} ms buffer)",
            self.reconnect.source(),
            self.settings.chunk_ms,
            self.settings.buffer_ms
        )
    }

    /// Blocks until a chunk is captured. A failing device is reopened with back-off (1 s doubling
    /// to 30 s) for as long as it takes; `Ok(None)` once the pipeline stops.
    fn next_chunk(&mut self) -> Result<Option<AudioChunk>, SourceError> {
        loop {
            let Some(mut pcm) = self.pcm.take() else {
                if !self.reconnect.ready_to_open() {
                    return Ok(None);
                }
                self.try_open();
                continue;
            };
            if let Err(error) = self.read_chunk(&mut pcm) {
                drop(pcm);
                self.reconnect.failed(format!("capture failed: {error}"));
                continue;
            }
            self.reconnect.delivered(|| pcm.mode());
            self.pcm = Some(pcm);
            let samples = heapless::Vec::from_slice(&self.converted).map_err(|_| SourceError::Format {
                media: self.reconnect.source().to_owned(),
                problem: "chunk larger than an AudioChunk".into(),
            })?;
            let chunk =
                AudioChunk { seq: self.seq, captured_at: SystemTime::now(), sample_rate: CAPTURE_RATE, samples };
            self.seq += 1;
            return Ok(Some(chunk));
        }
    }
}
