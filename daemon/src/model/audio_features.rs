//! Log-mel features for Gemma 4's audio encoder, computed as transformers'
//! `Gemma4AudioFeatureExtractor` does: 16 kHz mono in [-1, 1], 20 ms frames every 10 ms, a
//! periodic Hann window, |rFFT| over 512 points, 128 HTK mel filters from 0 to 8 kHz without
//! normalisation, `ln(mel + 0.001)`. Frames that reach into padding are zeroed, like the mask.

use std::sync::Arc;

use realfft::{RealFftPlanner, RealToComplex};

#[derive(Debug, Clone, PartialEq)]
pub struct AudioFeatureParams {
    pub sample_rate: u32,
    pub mel_bins: usize,
    pub frame_length: usize,
    pub hop_length: usize,
    pub fft_length: usize,
    pub min_frequency: f64,
    pub max_frequency: f64,
    pub mel_floor: f64,
    /// The clip is padded with zeros to a multiple of this many samples.
    pub pad_to_multiple_of: usize,
    /// Longer clips are cut to this many samples (30 s).
    pub max_samples: usize,
}

impl AudioFeatureParams {
    /// transformers' defaults for Gemma 4.
    pub fn gemma4() -> Self {
        Self {
            sample_rate: 16_000,
            mel_bins: 128,
            frame_length: 320,
            hop_length: 160,
            fft_length: 512,
            min_frequency: 0.0,
            max_frequency: 8000.0,
            mel_floor: 1e-3,
            pad_to_multiple_of: 128,
            max_samples: 480_000,
        }
    }
}

/// `frames` rows of `mel_bins` values, row-major, and which frames hold only real audio.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioFeatures {
    pub frames: usize,
    pub mel_bins: usize,
    pub values: Vec<f32>,
    pub mask: Vec<bool>,
}

pub struct LogMelExtractor {
    params: AudioFeatureParams,
    window: Vec<f64>,
    /// `fft_length / 2 + 1` rows of `mel_bins` weights.
    filters: Vec<f64>,
    fft: Arc<dyn RealToComplex<f64>>,
}

impl LogMelExtractor {
    pub fn new(params: AudioFeatureParams) -> Self {
        // Periodic Hann, in f32 as transformers keeps it.
        let n = params.frame_length as f64;
        let window = (0..params.frame_length)
            .map(|i| f64::from((0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / n).cos()) as f32))
            .collect();
        let filters = mel_filters(&params);
        let fft = RealFftPlanner::<f64>::new().plan_fft_forward(params.fft_length);
        Self { params, window, filters, fft }
    }

    pub fn params(&self) -> &AudioFeatureParams {
        &self.params
    }

    /// Features of one mono clip, samples in [-1, 1].
    pub fn extract(&self, samples: &[f32]) -> AudioFeatures {
        let p = &self.params;
        let real = samples.len().min(p.max_samples);
        let padded = real.div_ceil(p.pad_to_multiple_of) * p.pad_to_multiple_of;
        // Semicausal: frame_length / 2 zeros in front, so the first frame is centred on t = 0.
        let pad_left = p.frame_length / 2;
        let mut signal = vec![0.0f64; pad_left + padded];
        for (slot, &sample) in signal[pad_left..].iter_mut().zip(&samples[..real]) {
            *slot = f64::from(sample);
        }
        // Each frame spans frame_length + 1 samples (room for pre-emphasis, which Gemma 4 leaves
        // off), so the count and the mask are computed over that span.
        let span = p.frame_length + 1;
        let frames = if signal.len() >= span { (signal.len() - span) / p.hop_length + 1 } else { 0 };
        let bins = p.fft_length / 2 + 1;

        let mut input = self.fft.make_input_vec();
        let mut spectrum = self.fft.make_output_vec();
        let mut magnitudes = vec![0.0f64; bins];
        let mut values = Vec::with_capacity(frames * p.mel_bins);
        let mut mask = Vec::with_capacity(frames);
        for frame in 0..frames {
            let start = frame * p.hop_length;
            input.fill(0.0);
            for (i, slot) in input[..p.frame_length].iter_mut().enumerate() {
                *slot = f64::from((signal[start + i] as f32) * (self.window[i] as f32));
            }
            // Input and output lengths come from this plan: the call cannot fail.
            let _ = self.fft.process(&mut input, &mut spectrum);
            for (m, c) in magnitudes.iter_mut().zip(&spectrum) {
                *m = c.norm();
            }
            let last_sample = start + span - 1;
            let valid = last_sample >= pad_left && last_sample - pad_left < real;
            mask.push(valid);
            for mel in 0..p.mel_bins {
                let energy: f64 =
                    magnitudes.iter().enumerate().map(|(bin, m)| m * self.filters[bin * p.mel_bins + mel]).sum();
                values.push(if valid { (energy + p.mel_floor).ln() as f32 } else { 0.0 });
            }
        }
        AudioFeatures { frames, mel_bins: p.mel_bins, values, mask }
    }
}

fn hertz_to_mel(hertz: f64) -> f64 {
    2595.0 * (1.0 + hertz / 700.0).log10()
}

fn mel_to_hertz(mel: f64) -> f64 {
    700.0 * (10f64.powf(mel / 2595.0) - 1.0)
}

/// Triangular HTK-scale filters, `bins x mel_bins`, as transformers' `mel_filter_bank`
/// with `norm=None`.
fn mel_filters(p: &AudioFeatureParams) -> Vec<f64> {
    let bins = p.fft_length / 2 + 1;
    let (low, high) = (hertz_to_mel(p.min_frequency), hertz_to_mel(p.max_frequency));
    let edges: Vec<f64> =
        (0..p.mel_bins + 2).map(|i| mel_to_hertz(low + (high - low) * i as f64 / (p.mel_bins + 1) as f64)).collect();
    let nyquist = f64::from(p.sample_rate / 2);
    let mut filters = vec![0.0; bins * p.mel_bins];
    for bin in 0..bins {
        let frequency = nyquist * bin as f64 / (bins - 1) as f64;
        for mel in 0..p.mel_bins {
            let down = (frequency - edges[mel]) / (edges[mel + 1] - edges[mel]);
            let up = (edges[mel + 2] - frequency) / (edges[mel + 2] - edges[mel + 1]);
            filters[bin * p.mel_bins + mel] = down.min(up).max(0.0);
        }
    }
    filters
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(hertz: f64, seconds: f64) -> Vec<f32> {
        (0..(16_000.0 * seconds) as usize)
            .map(|i| (0.5 * (2.0 * std::f64::consts::PI * hertz * i as f64 / 16_000.0).sin()) as f32)
            .collect()
    }

    #[test]
    fn frame_count_and_mask_follow_the_padding() {
        let extractor = LogMelExtractor::new(AudioFeatureParams::gemma4());
        // 0.99 s: 15840 samples, padded to 15872 (a multiple of 128), 160 zeros in front.
        let features = extractor.extract(&tone(440.0, 0.99));
        assert_eq!(features.frames, (160 + 15_872 - 321) / 160 + 1);
        assert_eq!(features.values.len(), features.frames * 128);
        // The last frames reach past the clip's end.
        assert!(features.mask[..98].iter().all(|&v| v));
        assert!(!features.mask[features.frames - 1]);
        let last = &features.values[(features.frames - 1) * 128..];
        assert!(last.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn a_tone_lights_the_mel_band_that_holds_its_frequency() {
        let extractor = LogMelExtractor::new(AudioFeatureParams::gemma4());
        let features = extractor.extract(&tone(1000.0, 0.5));
        let row = &features.values[20 * 128..21 * 128];
        let loudest = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap();
        let (low, high) = (hertz_to_mel(0.0), hertz_to_mel(8000.0));
        let centre = |m: usize| mel_to_hertz(low + (high - low) * (m + 1) as f64 / 129.0);
        assert!(centre(loudest.saturating_sub(1)) <= 1000.0 && 1000.0 <= centre(loudest + 1), "band {loudest}");
        // Silence sits at the floor: ln(0.001).
        let silent = extractor.extract(&vec![0.0; 3200]);
        assert!((silent.values[0] - 0.001f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn filters_are_triangles_no_higher_than_one() {
        let p = AudioFeatureParams::gemma4();
        let filters = mel_filters(&p);
        assert!(filters.iter().all(|&w| (0.0..=1.0).contains(&w)));
        // Above a few hundred hertz a band is wider than an FFT bin (31.25 Hz), so it is seen.
        for mel in 20..p.mel_bins {
            let peak = (0..257).map(|b| filters[b * 128 + mel]).fold(0.0, f64::max);
            assert!(peak > 0.4, "filter {mel} peaks at {peak}");
        }
    }
}
