//! Choosing the next token from the model's logits: greedy, or temperature with top-k and top-p,
//! in the order transformers applies them, from a seeded generator so that a run can be repeated.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// Always the most likely token (the first, on a tie, as `argmax` does).
    Greedy,
    Random {
        /// Above 0; 1 leaves the distribution as the model gave it.
        temperature: f32,
        /// Keep only the k most likely tokens.
        top_k: Option<usize>,
        /// Keep the most likely tokens whose probabilities add up to at least p (0-1].
        top_p: Option<f32>,
        seed: u64,
    },
}

impl Sampling {
    /// Greedy at temperature 0, as `model run --temperature 0` promises.
    pub fn from_temperature(temperature: f32, top_k: Option<usize>, top_p: Option<f32>, seed: u64) -> Self {
        if temperature <= 0.0 {
            Sampling::Greedy
        } else {
            Sampling::Random { temperature, top_k, top_p, seed }
        }
    }
}

pub struct Sampler {
    sampling: Sampling,
    rng: ChaCha8Rng,
    /// (token, probability) scratch, reused so that sampling allocates nothing per token.
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(sampling: Sampling) -> Self {
        let seed = match sampling {
            Sampling::Random { seed, .. } => seed,
            Sampling::Greedy => 0,
        };
        Self { sampling, rng: ChaCha8Rng::seed_from_u64(seed), candidates: Vec::new() }
    }

    /// The next token. `logits` must not be empty.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        match self.sampling {
            Sampling::Greedy => argmax(logits),
            Sampling::Random { temperature, top_k, top_p, .. } => self.sample_random(logits, temperature, top_k, top_p),
        }
    }

    fn sample_random(&mut self, logits: &[f32], temperature: f32, top_k: Option<usize>, top_p: Option<f32>) -> u32 {
        let candidates = &mut self.candidates;
        candidates.clear();
        // Tokens a constraint refused (-inf) can never be drawn: leaving them out spares sorting
        // the whole vocabulary when a grammar allows a handful.
        candidates.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, &l)| l != f32::NEG_INFINITY)
                .map(|(i, &l)| (i as u32, l / temperature)),
        );
        if candidates.is_empty() {
            return argmax(logits);
        }
        // Most likely first; a stable sort keeps ties in token order, like greedy.
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
        if let Some(k) = top_k {
            candidates.truncate(k.max(1));
        }
        let max = candidates[0].1;
        let mut total = 0.0;
        for candidate in candidates.iter_mut() {
            candidate.1 = (candidate.1 - max).exp();
            total += candidate.1;
        }
        for candidate in candidates.iter_mut() {
            candidate.1 /= total;
        }
        if let Some(p) = top_p {
            let mut cumulative = 0.0;
            let keep = candidates
                .iter()
                .position(|c| {
                    cumulative += c.1;
                    cumulative >= p
                })
                .map_or(candidates.len(), |last| last + 1);
            candidates.truncate(keep);
            let kept: f32 = candidates.iter().map(|c| c.1).sum();
            for candidate in candidates.iter_mut() {
                candidate.1 /= kept;
            }
        }
        let mut draw: f32 = self.rng.random();
        for &(token, probability) in candidates.iter() {
            if draw < probability {
                return token;
            }
            draw -= probability;
        }
        // Rounding left a sliver past the last candidate.
        candidates.last().map_or(0, |c| c.0)
    }
}

/// Index of the largest value, the first one on a tie.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frequencies(sampling: Sampling, logits: &[f32], draws: usize) -> Vec<f32> {
        let mut sampler = Sampler::new(sampling);
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..draws {
            counts[sampler.sample(logits) as usize] += 1;
        }
        counts.into_iter().map(|c| c as f32 / draws as f32).collect()
    }

    fn random(temperature: f32, top_k: Option<usize>, top_p: Option<f32>) -> Sampling {
        Sampling::Random { temperature, top_k, top_p, seed: 42 }
    }

    #[test]
    fn greedy_takes_the_first_largest() {
        assert_eq!(argmax(&[0.1, 3.0, -2.0, 3.0]), 1);
        assert_eq!(Sampler::new(Sampling::from_temperature(0.0, None, None, 7)).sample(&[1.0, 5.0, 2.0]), 1);
    }

    #[test]
    fn draws_follow_the_model_distribution() {
        let logits = [0.7f32.ln(), 0.2f32.ln(), 0.1f32.ln()];
        let seen = frequencies(random(1.0, None, None), &logits, 20_000);
        for (seen, expected) in seen.iter().zip([0.7, 0.2, 0.1]) {
            assert!((seen - expected).abs() < 0.015, "{seen} vs {expected}");
        }
    }

    #[test]
    fn top_k_and_top_p_cut_the_tail() {
        let logits = [0.7f32.ln(), 0.2f32.ln(), 0.1f32.ln()];
        let top_k = frequencies(random(1.0, Some(2), None), &logits, 5_000);
        assert_eq!(top_k[2], 0.0);
        assert!((top_k[0] - 0.7 / 0.9).abs() < 0.03, "{top_k:?}");
        let top_p = frequencies(random(1.0, None, Some(0.85)), &logits, 5_000);
        assert_eq!(top_p[2], 0.0, "0.7 + 0.2 reaches 0.85 without the last token");
        assert_eq!(frequencies(random(5.0, Some(1), None), &logits, 100)[0], 1.0, "top-1 is greedy");
    }

    #[test]
    fn low_temperature_sharpens() {
        let logits = [1.0, 0.0];
        let cold = frequencies(random(0.25, None, None), &logits, 5_000)[0];
        let warm = frequencies(random(1.0, None, None), &logits, 5_000)[0];
        assert!(cold > 0.97 && (warm - 0.731).abs() < 0.03, "{cold} {warm}");
    }

    #[test]
    fn refused_tokens_are_never_drawn() {
        let logits = [f32::NEG_INFINITY, 0.7f32.ln(), f32::NEG_INFINITY, 0.3f32.ln()];
        let seen = frequencies(random(1.0, Some(3), Some(0.99)), &logits, 10_000);
        assert_eq!((seen[0], seen[2]), (0.0, 0.0));
        assert!((seen[1] - 0.7).abs() < 0.02, "{seen:?}");
        assert_eq!(Sampler::new(Sampling::Greedy).sample(&logits), 1);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = || {
            let mut sampler = Sampler::new(random(0.8, Some(20), Some(0.9)));
            (0..30).map(|_| sampler.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }
}
