//! What a microphone gives, to what the gates and the model take: interleaved 16-bit samples of
//! any channel count and rate in, 16 kHz mono out. Channels are averaged; the rate is converted by
//! rubato's synchronous FFT resampler (the device's rate is fixed, so a fixed ratio is exact).

use audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Resampler};

pub struct ToMono16k {
    channels: usize,
    frames_in: usize,
    resampler: Option<Fft<f32>>,
    mono: Vec<f32>,
}

impl ToMono16k {
    /// For chunks of about `frames_wanted` frames of `channels` channels at `rate_in` Hz. The
    /// resampler may need a slightly different size (a multiple of what makes the ratio whole, e.g.
    /// 441 frames at 44.1 kHz): [`ToMono16k::frames_in`] is what each chunk must hold.
    pub fn new(rate_in: u32, channels: usize, frames_wanted: usize, rate_out: u32) -> Result<Self, String> {
        let resampler = (rate_in != rate_out)
            .then(|| {
                Fft::new(rate_in as usize, rate_out as usize, frames_wanted.max(1), 1, FixedSync::Both)
                    .map_err(|e| format!("cannot resample {rate_in} Hz to {rate_out} Hz: {e}"))
            })
            .transpose()?;
        let frames_in = resampler.as_ref().map_or(frames_wanted, |r| r.input_frames_next());
        Ok(Self { channels, frames_in, resampler, mono: vec![0.0; frames_in] })
    }

    /// Output samples by which the converted audio lags the input (the resampler's filter delay).
    pub fn delay(&self) -> usize {
        self.resampler.as_ref().map_or(0, |r| r.output_delay())
    }

    /// The frames one chunk takes in.
    pub fn frames_in(&self) -> usize {
        self.frames_in
    }

    /// Samples one chunk gives out.
    pub fn frames_out(&self) -> usize {
        self.resampler.as_ref().map_or(self.frames_in, |r| r.output_frames_next())
    }

    /// Converts one chunk of `frames_in * channels` interleaved samples, appending to `out`.
    pub fn convert(&mut self, interleaved: &[i16], out: &mut Vec<i16>) -> Result<(), String> {
        if interleaved.len() != self.frames_in * self.channels {
            return Err(format!(
                "a chunk of {} samples where {} frames of {} channel(s) were expected",
                interleaved.len(),
                self.frames_in,
                self.channels
            ));
        }
        for (mono, frame) in self.mono.iter_mut().zip(interleaved.chunks_exact(self.channels)) {
            *mono = frame.iter().map(|&s| f32::from(s)).sum::<f32>() / self.channels as f32;
        }
        let to_i16 = |x: f32| x.round().clamp(-32768.0, 32767.0) as i16;
        match &mut self.resampler {
            None => out.extend(self.mono.iter().map(|&x| to_i16(x))),
            Some(resampler) => {
                let input = InterleavedSlice::new(&self.mono, 1, self.frames_in).map_err(|e| e.to_string())?;
                let resampled = resampler.process(&input, None).map_err(|e| e.to_string())?;
                out.extend(resampled.take_data().into_iter().map(to_i16));
            }
        }
        Ok(())
    }
}

/// A whole mono recording at `rate_in` Hz as 16 kHz, aligned with the input (the filter delay
/// is taken off the front) and as long as the input lasts.
pub fn recording_to_16k(samples: &[i16], rate_in: u32) -> Result<Vec<i16>, String> {
    const RATE_OUT: u32 = 16_000;
    if rate_in == RATE_OUT {
        return Ok(samples.to_vec());
    }
    let mut converter = ToMono16k::new(rate_in, 1, (rate_in / 10).max(1) as usize, RATE_OUT)?;
    let frames_in = converter.frames_in();
    let wanted = (samples.len() as u64 * u64::from(RATE_OUT)).div_ceil(u64::from(rate_in)) as usize;
    let mut out = Vec::with_capacity(wanted + converter.delay() + frames_in);
    let mut chunk = vec![0i16; frames_in];
    let mut fed = 0;
    // Zero padding past the end flushes the delay line.
    while out.len() < wanted + converter.delay() {
        chunk.fill(0);
        let end = (fed + frames_in).min(samples.len());
        if fed < end {
            chunk[..end - fed].copy_from_slice(&samples[fed..end]);
        }
        fed += frames_in;
        converter.convert(&chunk, &mut out)?;
    }
    out.drain(..converter.delay());
    out.truncate(wanted);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 1 kHz tone at `rate` Hz on `channels` channels, through the converter in 100 ms chunks.
    fn tone_through(rate: u32, channels: usize) -> Vec<i16> {
        let frames_in = rate as usize / 10;
        let mut converter = ToMono16k::new(rate, channels, frames_in, 16_000).unwrap();
        let mut out = Vec::new();
        for chunk in 0..10 {
            let interleaved: Vec<i16> = (0..frames_in)
                .flat_map(|i| {
                    let t = (chunk * frames_in + i) as f32 / rate as f32;
                    let s = (10_000.0 * (2.0 * std::f32::consts::PI * 1000.0 * t).sin()) as i16;
                    std::iter::repeat_n(s, channels)
                })
                .collect();
            converter.convert(&interleaved, &mut out).unwrap();
        }
        out
    }

    /// What a `hw:` device gives (48 kHz stereo, 44.1 kHz mono) comes out as the same tone at
    /// 16 kHz, mono, as long as the input and at the same level.
    #[test]
    fn tones_at_device_rates_become_mono_16k_tones() {
        for (rate, channels) in [(48_000, 2), (44_100, 1)] {
            let out = tone_through(rate, channels);
            assert_eq!(out.len(), 16_000, "{rate} Hz: 1 s in, 1 s out");
            // Past the resampler's start-up delay: amplitude and frequency of the tone.
            let steady = &out[4000..];
            let peak = steady.iter().map(|s| s.unsigned_abs()).max().unwrap();
            assert!((9_500..=10_500).contains(&peak), "{rate} Hz: peak {peak}");
            let crossings = steady.windows(2).filter(|w| w[0] < 0 && w[1] >= 0).count();
            let seconds = steady.len() as f32 / 16_000.0;
            let frequency = crossings as f32 / seconds;
            assert!((frequency - 1000.0).abs() < 5.0, "{rate} Hz: {frequency} Hz out");
        }
    }

    /// 25 ms at 44.1 kHz is 1102.5 frames; the resampler needs a multiple of 441. Whatever was
    /// asked for, chunks of `frames_in` convert.
    #[test]
    fn chunk_sizes_that_do_not_fit_the_ratio_are_rounded_to_one_that_does() {
        for (rate, wanted) in [(44_100, 1102), (44_100, 1411), (11_025, 1102), (48_000, 1200), (22_050, 7)] {
            let mut converter = ToMono16k::new(rate, 2, wanted, 16_000).unwrap();
            let frames = converter.frames_in();
            let mut out = Vec::new();
            converter.convert(&vec![100; frames * 2], &mut out).unwrap();
            assert_eq!(out.len(), converter.frames_out(), "{rate} Hz, {wanted} frames asked, {frames} taken");
            // The nearest whole number of the ratio's blocks (441 frames at 44.1 kHz, 3 at 48 kHz).
            let block = rate as usize / gcd(rate as usize, 16_000);
            assert_eq!(frames % block, 0, "{rate} Hz: {frames} frames");
            assert!(frames.abs_diff(wanted) < block, "{rate} Hz: {frames} frames for {wanted}");
        }
    }

    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }

    /// A click in a 44.1 kHz recording lands at the same time in the 16 kHz one.
    #[test]
    fn a_recording_keeps_its_length_and_timing() {
        let mut samples = vec![0i16; 44_100];
        samples[22_050] = 30_000; // at 0.5 s
        let out = recording_to_16k(&samples, 44_100).unwrap();
        assert_eq!(out.len(), 16_000);
        let loudest = (0..out.len()).max_by_key(|&i| out[i].unsigned_abs()).unwrap();
        assert!(loudest.abs_diff(8_000) <= 1, "the click is at sample {loudest}, not 8000");
        assert_eq!(recording_to_16k(&[5, -5], 16_000).unwrap(), [5, -5]);
    }

    #[test]
    fn mono_16k_passes_through_unchanged() {
        let mut converter = ToMono16k::new(16_000, 1, 4, 16_000).unwrap();
        let mut out = Vec::new();
        converter.convert(&[1, -2, 3, -32768], &mut out).unwrap();
        assert_eq!(out, [1, -2, 3, -32768]);
    }
}
