//! WAV files played back in real time, chunk by chunk, as a microphone would deliver them: at
//! 16 kHz mono like every audio source, whatever the file's rate and channels.

use std::io::Cursor;
use std::time::{Duration, SystemTime};

use super::pacing::Pacer;
use super::resample::recording_to_16k;
use super::{AudioChunk, AudioSource, SourceError, CAPTURE_RATE, MAX_CHUNK_SAMPLES};
use crate::media::MediaRef;

pub struct WavReplay {
    name: String,
    /// The file's own rate, for the log.
    file_rate: u32,
    /// Mono, 16-bit, 16 kHz, the whole recording: replay files are short.
    samples: Vec<i16>,
    chunk_len: usize,
    looping: bool,
    pacer: Pacer,
    next_sample: usize,
    seq: u64,
}

impl WavReplay {
    pub fn open(media: &MediaRef, chunk_ms: u32, looping: bool) -> Result<Self, SourceError> {
        let recording = read_wav(media)?;
        let name = media.to_string();
        let file_rate = recording.sample_rate;
        let sample_rate = CAPTURE_RATE;
        let chunk_len = (u64::from(sample_rate) * u64::from(chunk_ms) / 1000) as usize;
        if chunk_len == 0 || chunk_len > MAX_CHUNK_SAMPLES {
            return Err(SourceError::Format {
                media: name,
                problem: format!(
                    "{chunk_ms} ms at {sample_rate} Hz is {chunk_len} samples a chunk; a chunk holds 1 to {MAX_CHUNK_SAMPLES}: use a shorter chunk_ms"
                ),
            });
        }
        let samples: Vec<i16> =
            recording.samples.iter().map(|&x| (x * 32768.0).round().clamp(-32768.0, 32767.0) as i16).collect();
        let samples = recording_to_16k(&samples, file_rate)
            .map_err(|problem| SourceError::Format { media: name.clone(), problem })?;
        Ok(Self {
            name,
            file_rate,
            samples,
            chunk_len,
            looping,
            pacer: Pacer::new(Duration::from_secs_f64(chunk_len as f64 / f64::from(CAPTURE_RATE))),
            next_sample: 0,
            seq: 0,
        })
    }

    /// The rate of the file (chunks are always at 16 kHz).
    pub fn file_rate(&self) -> u32 {
        self.file_rate
    }
}

/// A whole WAV file, mono, samples in [-1, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct Recording {
    pub sample_rate: u32,
    pub samples: Vec<f32>,
}

/// Reads any integer or float WAV, averaging the channels to mono.
pub fn read_wav(media: &MediaRef) -> Result<Recording, SourceError> {
    let name = media.to_string();
    let format_error = |problem: String| SourceError::Format { media: name.clone(), problem };
    let bytes = media.read().map_err(|source| SourceError::Read { media: name.clone(), source })?;
    let mut reader =
        hound::WavReader::new(Cursor::new(bytes)).map_err(|e| format_error(format!("not a readable WAV file: {e}")))?;
    let spec = reader.spec();
    let interleaved: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => {
            reader.samples::<f32>().map(|s| s.map(|s| s.clamp(-1.0, 1.0))).collect::<Result<_, _>>()
        }
        hound::SampleFormat::Int => {
            let full_scale = 2f32.powi(i32::from(spec.bits_per_sample) - 1);
            reader.samples::<i32>().map(|s| s.map(|s| s as f32 / full_scale)).collect::<Result<_, _>>()
        }
    }
    .map_err(|e| format_error(format!("cannot read samples: {e}")))?;
    let channels = usize::from(spec.channels.max(1));
    let samples: Vec<f32> =
        interleaved.chunks(channels).map(|frame| frame.iter().sum::<f32>() / frame.len() as f32).collect();
    if samples.is_empty() {
        return Err(format_error("the recording holds no samples".into()));
    }
    Ok(Recording { sample_rate: spec.sample_rate, samples })
}

impl AudioSource for WavReplay {
    fn describe(&self) -> String {
        let mode = if self.looping { ", looping" } else { "" };
        let converted = if self.file_rate == CAPTURE_RATE { String::new() } else { format!(" as {CAPTURE_RATE} Hz") };
        format!(
            "real-time replay of wav file {} ({} Hz{converted}, {:.1} s, {} ms chunks{mode})",
            self.name,
            self.file_rate,
            self.samples.len() as f64 / f64::from(CAPTURE_RATE),
            self.chunk_len as u64 * 1000 / u64::from(CAPTURE_RATE)
        )
    }

    fn next_chunk(&mut self) -> Result<Option<AudioChunk>, SourceError> {
        if self.next_sample >= self.samples.len() {
            if !self.looping {
                return Ok(None);
            }
            self.next_sample = 0;
        }
        let end = (self.next_sample + self.chunk_len).min(self.samples.len());
        let mut samples = heapless::Vec::new();
        samples.extend_from_slice(&self.samples[self.next_sample..end]).map_err(|_| SourceError::Format {
            media: self.name.clone(),
            problem: "chunk larger than its buffer".into(),
        })?;
        self.next_sample = end;
        self.pacer.wait();
        let chunk = AudioChunk { seq: self.seq, captured_at: SystemTime::now(), sample_rate: CAPTURE_RATE, samples };
        self.seq += 1;
        Ok(Some(chunk))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::SPEECH_WAV;

    fn write_wav(spec: hound::WavSpec, samples: &[i32]) -> (tempfile::TempDir, MediaRef) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.wav");
        let mut writer = hound::WavWriter::create(&path, spec).unwrap();
        for &s in samples {
            writer.write_sample(s).unwrap();
        }
        writer.finalize().unwrap();
        (dir, MediaRef::Path(path))
    }

    #[test]
    fn replays_every_sample_in_order_and_in_real_time() {
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: 16000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let input: Vec<i32> = (0..4000).map(|i| i * 7 - 14000).collect();
        let (_dir, media) = write_wav(spec, &input);
        let mut replay = WavReplay::open(&media, 50, false).unwrap();
        let start = std::time::Instant::now();
        let mut out = Vec::new();
        while let Some(chunk) = replay.next_chunk().unwrap() {
            assert_eq!(chunk.seq as usize, out.len() / 800);
            out.extend(chunk.samples.iter().map(|&s| i32::from(s)));
        }
        assert_eq!(out, input);
        // Five 50 ms chunks: the last is released 200 ms after the first.
        assert!(start.elapsed() >= Duration::from_millis(200), "{:?}", start.elapsed());
    }

    #[test]
    fn stereo_24_bit_is_mixed_down_to_mono_16_bit() {
        let spec = hound::WavSpec {
            channels: 2,
            sample_rate: 16000,
            bits_per_sample: 24,
            sample_format: hound::SampleFormat::Int,
        };
        let (_dir, media) = write_wav(spec, &[256 * 1000, 256 * 3000, -256 * 500, -256 * 1500]);
        let mut replay = WavReplay::open(&media, 10, false).unwrap();
        let chunk = replay.next_chunk().unwrap().unwrap();
        assert_eq!(chunk.samples.as_slice(), &[2000, -1000]);
    }

    #[test]
    fn builtin_speech_is_sixteen_khz() {
        let media = MediaRef::parse(&format!("builtin:{SPEECH_WAV}"), std::path::Path::new(".")).unwrap();
        let replay = WavReplay::open(&media, 100, false).unwrap();
        assert_eq!(replay.file_rate(), 16000);
        assert!(replay.describe().contains("(16000 Hz, 6.7 s"), "{}", replay.describe());
    }

    /// Every audio source hands on 16 kHz, so that the speech gate and the model can take any file.
    #[test]
    fn a_48_khz_file_is_replayed_at_16_khz() {
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: 48000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let tone: Vec<i32> = (0..48_000)
            .map(|i| (8000.0 * (i as f64 * 2.0 * std::f64::consts::PI * 500.0 / 48_000.0).sin()) as i32)
            .collect();
        let (_dir, media) = write_wav(spec, &tone);
        let mut replay = WavReplay::open(&media, 100, false).unwrap();
        assert!(replay.describe().contains("(48000 Hz as 16000 Hz, 1.0 s, 100 ms chunks"), "{}", replay.describe());
        let chunk = replay.next_chunk().unwrap().unwrap();
        assert_eq!((chunk.sample_rate, chunk.samples.len()), (16_000, 1600));
    }

    #[test]
    fn chunk_too_long_is_refused() {
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: 16000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let (_dir, media) = write_wav(spec, &[0; 10]);
        let err = WavReplay::open(&media, 400, false).err().unwrap().to_string();
        assert!(
            err.ends_with(
                "400 ms at 16000 Hz is 6400 samples a chunk; a chunk holds 1 to 4800: use a shorter chunk_ms"
            ),
            "{err}"
        );
    }
}
