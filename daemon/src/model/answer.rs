//! One question to the model, from prompt text (and a clip of audio) to streamed answer text.

use std::path::Path;
use std::time::{Duration, Instant};

use super::{
    prepare_image, render_chat, AudioFeatureParams, Bundle, BundleError, ImageInputError, ImageParams, LogMelExtractor,
    Part, Role, Runtime, RuntimeError, Sampler, Sampling, Tokenizer, TokenizerError, Turn,
};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("audio needs an instruction-tuned gemma4 bundle with an audio encoder; {0} is not one")]
    NoAudio(String),
    #[error("a picture needs an instruction-tuned gemma4 bundle with a vision encoder; {0} is not one")]
    NoVision(String),
    #[error(transparent)]
    Image(#[from] ImageInputError),
}

/// What to ask.
#[derive(Debug, Clone)]
pub struct Question {
    pub prompt: String,
    /// A picture to look at, with the soft-token budget it may use.
    pub image: Option<(image::RgbImage, usize)>,
    /// 16 kHz mono samples in [-1, 1].
    pub audio: Option<Vec<f32>>,
    pub max_tokens: usize,
    pub sampling: Sampling,
}

/// What came back, with the timings a person wants to see.
#[derive(Debug, Clone)]
pub struct Answer {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub encode_time: Duration,
    pub first_token_time: Duration,
    pub total_time: Duration,
}

pub struct Model {
    pub bundle: Bundle,
    runtime: Runtime,
    tokenizer: Tokenizer,
    audio_features: LogMelExtractor,
    stop_ids: Vec<u32>,
}

impl Model {
    /// Opens and checks the bundle in `dir`, then loads its graphs and tokenizer.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let bundle = Bundle::open(dir)?;
        let runtime = Runtime::load(&bundle)?;
        let tokenizer_path = bundle.file("tokenizer").unwrap_or_else(|| dir.join("tokenizer.json"));
        let tokenizer = Tokenizer::load(&tokenizer_path)?;
        let special = bundle.manifest.sections.get("special_tokens");
        let mut stop_ids: Vec<u32> = special
            .and_then(|s| s.get("end_of_turn"))
            .and_then(|v| v.as_array())
            .map(|ids| ids.iter().filter_map(|id| id.as_u64()).map(|id| id as u32).collect())
            .unwrap_or_default();
        if let Some(eos) = special.and_then(|s| s.get("eos")).and_then(|v| v.as_u64()) {
            stop_ids.push(eos as u32);
        }
        Ok(Self {
            bundle,
            runtime,
            tokenizer,
            audio_features: LogMelExtractor::new(AudioFeatureParams::gemma4()),
            stop_ids,
        })
    }

    /// Asks `question`; `on_text` gets the answer piece by piece as it is generated.
    pub fn answer(&self, question: &Question, mut on_text: impl FnMut(&str)) -> Result<Answer, ModelError> {
        let start = Instant::now();
        let image = match &question.image {
            Some((picture, budget)) => {
                if !self.bundle.manifest.instruction_tuned || !self.bundle.manifest.files.contains_key("vision") {
                    return Err(ModelError::NoVision(self.bundle.manifest.name.clone()));
                }
                let patches = prepare_image(picture, &ImageParams::gemma4(*budget))?;
                Some(self.runtime.encode_image(&patches)?)
            }
            None => None,
        };
        let audio = match &question.audio {
            Some(samples) => {
                if !self.bundle.manifest.instruction_tuned || !self.bundle.manifest.files.contains_key("audio") {
                    return Err(ModelError::NoAudio(self.bundle.manifest.name.clone()));
                }
                Some(self.runtime.encode_audio(&self.audio_features.extract(samples))?)
            }
            None => None,
        };
        let encode_time = start.elapsed();
        let prompt = if self.bundle.manifest.instruction_tuned {
            let mut parts = Vec::new();
            if let Some(image) = &image {
                parts.push(Part::Image { soft_tokens: image.count() });
            }
            if let Some(audio) = &audio {
                parts.push(Part::Audio { soft_tokens: audio.count() });
            }
            parts.push(Part::Text(question.prompt.clone()));
            render_chat(self.bundle.architecture, &[Turn { role: Role::User, parts }], true)
        } else {
            format!("<bos>{}", question.prompt)
        };
        let ids = self.tokenizer.encode(&prompt)?;
        let mut sampler = Sampler::new(question.sampling);
        let mut stream = self.tokenizer.stream();
        let mut first_token_time = None;
        let token_ids = self.runtime.generate(
            &ids,
            image.as_ref(),
            audio.as_ref(),
            question.max_tokens,
            &mut sampler,
            &self.stop_ids,
            |token| {
                first_token_time.get_or_insert_with(|| start.elapsed());
                if let Some(text) = stream.push(token) {
                    on_text(&text);
                }
            },
            |_| {},
        )?;
        Ok(Answer {
            text: self.tokenizer.decode(&token_ids),
            prompt_tokens: ids.len(),
            token_ids,
            encode_time,
            first_token_time: first_token_time.unwrap_or_default(),
            total_time: start.elapsed(),
        })
    }
}
