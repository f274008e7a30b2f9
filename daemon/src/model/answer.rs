//! One question to the model, from prompt text (and a clip of audio) to streamed answer text.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{
    prepare_image, render_chat, sha256_file, AudioFeatureParams, Bundle, BundleError, ConstraintError,
    ConstraintTimings, Encoders, Grammar, ImageInputError, ImageParams, LogMelExtractor, Part, Role, Runtime,
    RuntimeError, Sampler, Sampling, TokenConstraints, Tokenizer, TokenizerError, ToolSet, Turn,
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
    #[error(transparent)]
    Constraint(#[from] ConstraintError),
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
    /// Instructions for a system turn (Gemma 3 and base models: ahead of the prompt).
    pub system: Option<String>,
    /// Tools declared in the system turn; to make the model call one, also constrain the answer
    /// to [`ToolSet::call_grammar`].
    pub tools: Option<ToolSet>,
    /// The answer must follow this JSON Schema or grammar.
    pub constraint: Option<Grammar>,
    /// Earlier turns of the conversation, between the system turn and `prompt`'s user turn (a
    /// tool's response goes in the model turn that made the call).
    pub history: Vec<Turn>,
}

/// What came back, with the timings a person wants to see.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The answer without special tokens.
    pub text: String,
    /// The answer with its special tokens written out (`<|tool_call>`, `<|"|>`): what a tool
    /// call is parsed from.
    pub raw_text: String,
    pub token_ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub encode_time: Duration,
    pub first_token_time: Duration,
    pub total_time: Duration,
    /// Time the constraint took, when the question had one.
    pub constraint_timings: Option<ConstraintTimings>,
}

pub struct Model {
    pub bundle: Bundle,
    runtime: Runtime,
    tokenizer: Arc<Tokenizer>,
    tokenizer_path: PathBuf,
    audio_features: LogMelExtractor,
    stop_ids: Vec<u32>,
    /// sha256 of `manifest.json`, which names every file's sha256: identifies the model exactly.
    manifest_sha256: String,
    /// Built on the first constrained question (about 2 s for a 262144-token vocabulary), then
    /// shared by all.
    constraints: Mutex<Option<Arc<TokenConstraints>>>,
}

impl Model {
    /// Opens and checks the bundle in `dir`, then loads its graphs and tokenizer.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        Self::load_with(dir, Encoders::Resident)
    }

    /// `load`, with the encoders kept in memory or loaded for each request as `encoders` says.
    pub fn load_with(dir: &Path, encoders: Encoders) -> Result<Self, ModelError> {
        let bundle = Bundle::open(dir)?;
        let runtime = Runtime::load_with(&bundle, encoders)?;
        let tokenizer_path = bundle.file("tokenizer").unwrap_or_else(|| dir.join("tokenizer.json"));
        let tokenizer = Arc::new(Tokenizer::load(&tokenizer_path)?);
        let manifest_path = dir.join("manifest.json");
        let manifest_sha256 =
            sha256_file(&manifest_path).map_err(|source| BundleError::Read { path: manifest_path, source })?;
        let special = bundle.manifest.sections.get("special_tokens");
        let mut stop_ids: Vec<u32> = special
            .and_then(|s| s.get("end_of_turn"))
            .and_then(|v| v.as_array())
            .map(|ids| ids.iter().filter_map(|id| id.as_u64()).map(|id| id as u32).collect())
            .unwrap_or_default();
        if let Some(eos) = special.and_then(|s| s.get("eos")).and_then(|v| v.as_u64()) {
            stop_ids.push(eos as u32);
        }
        super::runtime::return_freed_memory();
        Ok(Self {
            bundle,
            runtime,
            tokenizer,
            tokenizer_path,
            audio_features: LogMelExtractor::new(AudioFeatureParams::gemma4()),
            stop_ids,
            manifest_sha256,
            constraints: Mutex::new(None),
        })
    }

    /// sha256 of the bundle's `manifest.json`.
    pub fn manifest_sha256(&self) -> &str {
        &self.manifest_sha256
    }

    /// The graphs, for driving prefill and decode step by step (`outpostd bench`).
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The per-model part of constrained decoding, built on first use.
    pub fn token_constraints(&self) -> Result<Arc<TokenConstraints>, ModelError> {
        // A panic elsewhere while holding the lock leaves nothing half-built: the value is set whole.
        let mut built = self.constraints.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(constraints) = built.as_ref() {
            return Ok(constraints.clone());
        }
        let constraints =
            Arc::new(TokenConstraints::load(&self.tokenizer_path, self.tokenizer.clone(), &self.stop_ids)?);
        *built = Some(constraints.clone());
        Ok(constraints)
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
            let mut turns = Vec::new();
            if question.system.is_some() || question.tools.is_some() {
                let mut system = Vec::new();
                system.extend(question.system.clone().map(Part::Text));
                system.extend(question.tools.clone().map(Part::Tools));
                turns.push(Turn { role: Role::System, parts: system });
            }
            turns.extend(question.history.iter().cloned());
            turns.push(Turn { role: Role::User, parts });
            render_chat(self.bundle.architecture, &turns, true)
        } else {
            // A base model knows no turns: instructions and tools lead the prompt as plain text.
            let mut prompt = String::from("<bos>");
            for lead in [question.system.clone(), question.tools.as_ref().map(ToolSet::render_declarations)]
                .into_iter()
                .flatten()
            {
                prompt.push_str(&lead);
                prompt.push_str("\n\n");
            }
            prompt.push_str(&question.prompt);
            prompt
        };
        let ids = self.tokenizer.encode(&prompt)?;
        let mut constraint = match &question.constraint {
            Some(grammar) => Some(self.token_constraints()?.constraint(grammar)?),
            None => None,
        };
        let mut sampler = Sampler::new(question.sampling);
        let mut stream = self.tokenizer.stream();
        let mut first_token_time = None;
        let token_ids = self.runtime.generate_constrained(
            &ids,
            image.as_ref(),
            audio.as_ref(),
            question.max_tokens,
            &mut sampler,
            &self.stop_ids,
            constraint.as_mut(),
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
            raw_text: self.tokenizer.decode_with_special(&token_ids),
            prompt_tokens: ids.len(),
            token_ids,
            encode_time,
            first_token_time: first_token_time.unwrap_or_default(),
            total_time: start.elapsed(),
            constraint_timings: constraint.map(|c| c.timings().clone()),
        })
    }
}
