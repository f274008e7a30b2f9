//! Running a Gemma ONNX bundle with tract: token embedding, the vision and audio encoders, and
//! the decoder with its key/value cache, then greedy or sampled generation.
//!
//! The graph layout is the one `deploy/models/` exports (see the bundle's manifest, `graphs`):
//! `embed` maps ids to `inputs_embeds` and, for Gemma 4, `per_layer_inputs` (a bundle whose
//! output layer is also its embedding table has no `embed` graph: the rows are read from the
//! output layer, `text.output_layer.embed_scale`, and Gemma 4's per-layer rows from their own
//! table on disk, `per_layer_embeddings.rs`); `decoder` takes
//! those plus `past_key_i`/`past_value_i` for each layer that owns a cache and returns logits
//! (already soft-capped) and the `present_*` caches, or, where the bundle has an `output_layer`
//! file, the final hidden states that our own kernels turn into logits (`output_layer.rs`);
//! `vision` and `audio` return soft tokens with a validity mask. Gemma 3 bundles are the same
//! without per-layer inputs and encoders.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use tract_onnx::prelude::*;

use super::block_matrix::BlockFormat;
use super::output_layer::OutputLayer;
use super::per_layer_embeddings::{PerLayerEmbeddings, PerLayerEmbeddingsError, PerLayerLayout};
use super::{attention, block_matmul, block_matrix, fast_gelu, half_tables, kv_cache};
use super::{AudioFeatures, Bundle, Constraint, ConstraintError, ImagePatches, Sampler};

/// A loaded, optimised graph ready to run.
type Plan = Arc<TypedRunnableModel>;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("bundle has no `{0}` graph")]
    MissingGraph(&'static str),
    #[error("cannot load {path}: {source:#}")]
    Load { path: String, source: TractError },
    #[error("{graph} graph failed: {source:#}")]
    Run { graph: &'static str, source: TractError },
    #[error("decoder graph inputs are not the expected past_key_i/past_value_i pairs: {0}")]
    CacheLayout(String),
    #[error("the embed graph should give inputs_embeds and, for Gemma 4, per_layer_inputs; it gives {0} outputs")]
    EmbedLayout(usize),
    #[error("prompt of {prompt} tokens plus {new} new ones exceeds the context of {max} tokens")]
    ContextFull { prompt: usize, new: usize, max: usize },
    #[error("{0} is not a contiguous tensor")]
    NotContiguous(&'static str),
    #[error("audio of {frames} feature frames is longer than the encoder's {max} (30 s)")]
    AudioTooLong { frames: usize, max: usize },
    #[error("audio encoder input is not a fixed [1, frames, mel_bins] shape: {0}")]
    AudioLayout(String),
    #[error("{what}: expected {expected} soft tokens in the prompt, the encoder gave {got}")]
    SoftTokenCount { what: &'static str, expected: usize, got: usize },
    #[error(transparent)]
    Constraint(#[from] ConstraintError),
    #[error("output layer: {0}")]
    OutputLayer(#[from] super::OutputLayerError),
    #[error("the manifest's text.output_layer {0}")]
    OutputLayerManifest(String),
    #[error("per-layer embeddings: {0}")]
    PerLayerEmbeddings(#[from] PerLayerEmbeddingsError),
    #[error("the manifest's text.per_layer_embeddings {0}")]
    PerLayerManifest(String),
    #[error("the manifest's text.multimodal_placeholder_ids {0} is not a list of token ids")]
    PlaceholderIds(String),
}

/// Whether the image and audio encoders stay in memory between the requests that use them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Encoders {
    /// Loaded with the model and kept: a request pays only for running them.
    #[default]
    Resident,
    /// Loaded for each request that uses them and dropped after it: E2B's hold 550 MB (Q8_0)
    /// that the model then needs only while a picture or a clip is encoded, for the time it
    /// takes to load one with each request. They are still loaded once at start, so that a
    /// graph that does not load fails the start rather than a request.
    OnDemand,
}

/// Which positions a decoder run gives logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitRows {
    /// The last one, which the next token is chosen from.
    Last,
    /// Every position of the input (scoring, parity tests).
    All,
}

/// Soft tokens from an encoder: `[tokens, hidden]` rows to place over the placeholders.
#[derive(Debug, Clone)]
pub struct SoftTokens {
    pub rows: Vec<f32>,
    pub hidden: usize,
}

impl SoftTokens {
    pub fn count(&self) -> usize {
        self.rows.len() / self.hidden.max(1)
    }
}

/// Keys and values of every layer that owns a cache, `[1, kv_heads, positions, head_dim]` each.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<(TValue, TValue)>,
}

impl KvCache {
    pub fn positions(&self) -> usize {
        self.layers.first().map_or(0, |(k, _)| k.shape()[2])
    }

    pub fn layer(&self, index: usize) -> Option<(&Tensor, &Tensor)> {
        self.layers.get(index).map(|(k, v)| (&**k, &**v))
    }

    /// Whether every layer's keys and values sit in buffers the next step appends to in place
    /// (where the decoder's attention is fused over them), rather than being copied.
    pub fn grows_in_place(&self) -> bool {
        self.layers.iter().all(|(k, v)| kv_cache::grows_in_place(k) && kv_cache::grows_in_place(v))
    }
}

/// Token embeddings of a run of ids, ready for the decoder.
#[derive(Debug, Clone)]
pub struct Embedded {
    /// `inputs_embeds` `[1, n, hidden]`.
    pub embeds: Tensor,
    /// Gemma 4's per-layer embeddings (PLE) `[1, n, layers, width]`; Gemma 3 has none.
    pub per_layer: Option<TValue>,
}

/// Where token embeddings come from.
enum Embedder {
    /// The bundle's embed graph; `per_layer_inputs`: it also gives Gemma 4's per-layer inputs,
    /// which the decoder takes second.
    Graph { plan: Plan, per_layer_inputs: bool },
    /// Rows of the output layer (the tied table) times `scale`: the table is held once, not twice.
    /// Gemma 4's per-layer rows come from `per_layer`, and the multimodal `placeholders` are
    /// looked up as id 0 (`<pad>`), as its embed graph does.
    OutputLayerRows { scale: f32, per_layer: Option<PerLayerEmbeddings>, placeholders: Vec<u32> },
}

pub struct Runtime {
    embedder: Embedder,
    decoder: Plan,
    /// Hidden states to logits outside the graph, where the bundle has one.
    output_layer: Option<OutputLayer>,
    vision: Option<EncoderGraph>,
    audio: Option<EncoderGraph>,
    /// `(kv_heads, head_dim)` of each cache-owning layer, in input order.
    cache_shapes: Vec<(usize, usize)>,
    /// The audio encoder is exported for a fixed number of feature frames (30 s).
    audio_frames: usize,
    image_token: Option<u32>,
    audio_token: Option<u32>,
    max_context: usize,
}

impl Runtime {
    pub fn load(bundle: &Bundle) -> Result<Self, RuntimeError> {
        Self::load_with(bundle, Encoders::Resident)
    }

    /// Loads `bundle`, its encoders kept in memory or loaded for each request as `encoders` says.
    pub fn load_with(bundle: &Bundle, encoders: Encoders) -> Result<Self, RuntimeError> {
        let graph = |role: &'static str| bundle.file(role).ok_or(RuntimeError::MissingGraph(role));
        // The encoders first: loaded on demand, each is dropped before the decoder loads, and
        // the start's peak memory is not the sum of them all.
        let keep = encoders == Encoders::Resident;
        let audio = match bundle.file("audio") {
            Some(path) => {
                let model = load_graph(&path)?;
                let frames = fixed_frames(&model)?;
                let plan = optimise(model, "audio")?;
                Some((EncoderGraph::new("audio", path, keep, audio_plan, Some((frames, plan))), frames))
            }
            None => None,
        };
        let (audio, audio_frames) = audio.unzip();
        let vision = match bundle.file("vision") {
            Some(path) => {
                let plan =
                    default_patches(bundle).map(|patches| vision_plan(&path, patches).map(|plan| (patches, plan)));
                Some(EncoderGraph::new("vision", path, keep, vision_plan, plan.transpose()?))
            }
            None => None,
        };
        let (output_layer, embed_scale) = load_output_layer(bundle)?.unzip();
        let embedder = match embed_scale.flatten() {
            Some(scale) if !scale.is_finite() => {
                return Err(RuntimeError::OutputLayerManifest(format!("embed_scale {scale} is not a finite number")))
            }
            Some(scale) => Embedder::OutputLayerRows {
                scale,
                per_layer: load_per_layer_embeddings(bundle)?,
                placeholders: placeholder_ids(bundle)?,
            },
            None => {
                let embed_model = load_graph(&graph("embed")?)?;
                let per_layer_inputs = match embed_model.outputs.len() {
                    1 => false,
                    2 => true,
                    other => return Err(RuntimeError::EmbedLayout(other)),
                };
                Embedder::Graph { plan: optimise(embed_model, "embed")?, per_layer_inputs }
            }
        };
        let per_layer_inputs = matches!(
            embedder,
            Embedder::Graph { per_layer_inputs: true, .. } | Embedder::OutputLayerRows { per_layer: Some(_), .. }
        );
        let mut decoder_model = load_graph(&graph("decoder")?)?;
        attention::fuse(&mut decoder_model, attention::TEXT_QUERY_BLOCK)
            .and_then(|_| kv_cache::append_in_place(&mut decoder_model))
            .map_err(|source| RuntimeError::Run { graph: "decoder", source })?;
        let cache_shapes = cache_shapes(&decoder_model, if per_layer_inputs { 2 } else { 1 })?;
        let special = bundle.manifest.sections.get("special_tokens");
        let token = |name: &str| special.and_then(|s| s.get(name)).and_then(|v| v.as_u64()).map(|v| v as u32);
        let max_context = bundle
            .manifest
            .sections
            .get("text")
            .and_then(|t| t.get("max_context"))
            .and_then(|v| v.as_u64())
            .unwrap_or(8192) as usize;
        Ok(Self {
            embedder,
            decoder: optimise(decoder_model, "decoder")?,
            output_layer,
            vision,
            audio,
            audio_frames: audio_frames.unwrap_or(0),
            cache_shapes,
            image_token: token("image"),
            audio_token: token("audio"),
            max_context,
        })
    }

    /// Positions the model attends over: prompt and answer together.
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// A cache holding nothing yet.
    pub fn empty_cache(&self) -> Result<KvCache, RuntimeError> {
        let empty = |heads: usize, dim: usize| {
            Tensor::zero::<f32>(&[1, heads, 0, dim])
                .map(IntoTValue::into_tvalue)
                .map_err(|source| RuntimeError::Run { graph: "decoder", source })
        };
        let layers = self
            .cache_shapes
            .iter()
            .map(|&(heads, dim)| Ok((empty(heads, dim)?, empty(heads, dim)?)))
            .collect::<Result<_, RuntimeError>>()?;
        Ok(KvCache { layers })
    }

    /// The embeddings of `ids`.
    pub fn embed(&self, ids: &[u32]) -> Result<Embedded, RuntimeError> {
        let shape_error = |source| RuntimeError::Run { graph: "embed", source };
        match (&self.embedder, &self.output_layer) {
            (Embedder::OutputLayerRows { scale, per_layer, placeholders }, Some(layer)) => {
                let ids: Vec<u32> = ids.iter().map(|id| if placeholders.contains(id) { 0 } else { *id }).collect();
                let rows = layer.embeddings(&ids, *scale)?;
                let embeds = tensor1(&rows).into_shape(&[1, ids.len(), layer.columns()]).map_err(shape_error)?;
                let per_layer = per_layer
                    .as_ref()
                    .map(|table| {
                        Ok::<_, RuntimeError>(
                            tensor1(&table.lookup(&ids)?)
                                .into_shape(&[1, ids.len(), table.layers(), table.width()])
                                .map_err(shape_error)?
                                .into_tvalue(),
                        )
                    })
                    .transpose()?;
                Ok(Embedded { embeds, per_layer })
            }
            (Embedder::OutputLayerRows { .. }, None) => Err(RuntimeError::MissingGraph("embed")),
            (Embedder::Graph { plan, per_layer_inputs }, _) => {
                let ids: Vec<i64> = ids.iter().map(|&id| i64::from(id)).collect();
                let input = tensor1(&ids).into_shape(&[1, ids.len()]).map_err(shape_error)?;
                let mut outputs = run(plan, "embed", tvec!(input.into_tvalue()))?;
                let per_layer = per_layer_inputs.then(|| outputs.remove(1));
                Ok(Embedded { embeds: outputs.remove(0).into_tensor(), per_layer })
            }
        }
    }

    /// Runs the decoder over `input` after what `cache` holds; returns the logits `[1, m, vocab]`
    /// of the positions `rows` asks for and replaces the cache with one that also holds these
    /// positions.
    pub fn decode(&self, input: Embedded, cache: &mut KvCache, rows: LogitRows) -> Result<Tensor, RuntimeError> {
        let mut inputs: TVec<TValue> = tvec!(input.embeds.into_tvalue());
        inputs.extend(input.per_layer);
        for (k, v) in cache.layers.drain(..) {
            inputs.push(k);
            inputs.push(v);
        }
        let mut outputs = run(&self.decoder, "decoder", inputs)?;
        let first = outputs.remove(0).into_tensor();
        let mut presents = outputs.into_iter();
        while let (Some(k), Some(v)) = (presents.next(), presents.next()) {
            cache.layers.push((k, v));
        }
        let positions = first.shape().get(1).copied().unwrap_or(0);
        let wanted = match rows {
            LogitRows::Last => positions.saturating_sub(1)..positions,
            LogitRows::All => 0..positions,
        };
        let decoder_error = |source| RuntimeError::Run { graph: "decoder", source };
        let Some(layer) = &self.output_layer else {
            // The graph gave the logits itself.
            return match rows {
                LogitRows::All => Ok(first),
                LogitRows::Last => first.slice(1, wanted.start, wanted.end).map_err(decoder_error),
            };
        };
        let hidden = values::<f32>(&first).map_err(decoder_error)?;
        let width = layer.columns();
        if first.shape().last() != Some(&width) {
            return Err(RuntimeError::OutputLayerManifest(format!(
                "says {width} columns, but the decoder gives hidden states {:?}",
                first.shape()
            )));
        }
        let rows = &hidden[wanted.start * width..wanted.end * width];
        // Written in place: a copy of 262144 logits a step costs as much as a small layer.
        let mut logits = Tensor::zero::<f32>(&[1, wanted.len(), layer.rows()]).map_err(decoder_error)?;
        {
            let mut written = logits.try_as_plain_ram_mut().map_err(decoder_error)?;
            layer.logits(rows, written.as_slice_mut::<f32>().map_err(decoder_error)?, block_matrix::threads())?;
        }
        Ok(logits)
    }

    /// Soft tokens of one prepared picture.
    pub fn encode_image(&self, patches: &ImagePatches) -> Result<SoftTokens, RuntimeError> {
        let vision = self.vision.as_ref().ok_or(RuntimeError::MissingGraph("vision"))?;
        let err = |source| RuntimeError::Run { graph: "vision", source };
        let pixels =
            tensor1(&patches.pixel_values).into_shape(&[1, patches.max_patches, patches.patch_values]).map_err(err)?;
        let positions = tensor1(&patches.positions).into_shape(&[1, patches.max_patches, 2]).map_err(err)?;
        let outputs = vision.run(patches.max_patches, tvec!(pixels.into_tvalue(), positions.into_tvalue()))?;
        soft_tokens(&outputs, "vision")
    }

    /// Soft tokens of one clip's log-mel features, padded to the encoder's fixed frame count.
    pub fn encode_audio(&self, features: &AudioFeatures) -> Result<SoftTokens, RuntimeError> {
        let audio = self.audio.as_ref().ok_or(RuntimeError::MissingGraph("audio"))?;
        if features.frames > self.audio_frames {
            return Err(RuntimeError::AudioTooLong { frames: features.frames, max: self.audio_frames });
        }
        let mut values = features.values.clone();
        values.resize(self.audio_frames * features.mel_bins, 0.0);
        let mut mask = features.mask.clone();
        mask.resize(self.audio_frames, false);
        let err = |source| RuntimeError::Run { graph: "audio", source };
        let values = tensor1(&values).into_shape(&[1, self.audio_frames, features.mel_bins]).map_err(err)?;
        let mask = tensor1(&mask).into_shape(&[1, self.audio_frames]).map_err(err)?;
        let outputs = audio.run(self.audio_frames, tvec!(values.into_tvalue(), mask.into_tvalue()))?;
        soft_tokens(&outputs, "audio")
    }

    /// Embeds the prompt and writes image and audio soft tokens over their placeholders.
    pub fn embed_prompt(
        &self,
        ids: &[u32],
        image: Option<&SoftTokens>,
        audio: Option<&SoftTokens>,
    ) -> Result<Embedded, RuntimeError> {
        let mut embedded = self.embed(ids)?;
        let hidden = *embedded.embeds.shape().last().unwrap_or(&0);
        let mut view = embedded
            .embeds
            .to_plain_array_view_mut::<f32>()
            .map_err(|source| RuntimeError::Run { graph: "embed", source })?;
        let rows = view.as_slice_mut().ok_or(RuntimeError::NotContiguous("inputs_embeds"))?;
        for (what, token, soft) in [("image", self.image_token, image), ("audio", self.audio_token, audio)] {
            let (Some(token), Some(soft)) = (token, soft) else { continue };
            let positions: Vec<usize> = ids.iter().enumerate().filter(|(_, &id)| id == token).map(|(i, _)| i).collect();
            if positions.len() != soft.count() {
                return Err(RuntimeError::SoftTokenCount { what, expected: positions.len(), got: soft.count() });
            }
            for (n, position) in positions.into_iter().enumerate() {
                rows[position * hidden..(position + 1) * hidden]
                    .copy_from_slice(&soft.rows[n * hidden..(n + 1) * hidden]);
            }
        }
        Ok(embedded)
    }

    /// Prefills `ids` (with any soft tokens) and generates up to `max_new` tokens, stopping after
    /// a token in `stop`. Each new token goes to `on_token` as soon as it is chosen; `on_logits`
    /// sees the logits each token was chosen from.
    #[allow(clippy::too_many_arguments)]
    pub fn generate(
        &self,
        ids: &[u32],
        image: Option<&SoftTokens>,
        audio: Option<&SoftTokens>,
        max_new: usize,
        sampler: &mut Sampler,
        stop: &[u32],
        on_token: impl FnMut(u32),
        on_logits: impl FnMut(&[f32]),
    ) -> Result<Vec<u32>, RuntimeError> {
        self.generate_constrained(ids, image, audio, max_new, sampler, stop, None, on_token, on_logits)
    }

    /// [`generate`](Self::generate) under a `constraint`: disallowed logits are set to -inf
    /// before sampling (`on_logits` sees them masked), tokens the grammar forces are appended
    /// without sampling (and without an `on_logits` call) and decoded together in one decoder
    /// run, and generation ends as soon as the grammar is complete. Reaching `max_new` first is
    /// an error: the output would not parse.
    #[allow(clippy::too_many_arguments)]
    pub fn generate_constrained(
        &self,
        ids: &[u32],
        image: Option<&SoftTokens>,
        audio: Option<&SoftTokens>,
        max_new: usize,
        sampler: &mut Sampler,
        stop: &[u32],
        mut constraint: Option<&mut Constraint>,
        mut on_token: impl FnMut(u32),
        mut on_logits: impl FnMut(&[f32]),
    ) -> Result<Vec<u32>, RuntimeError> {
        if ids.len() + max_new > self.max_context {
            return Err(RuntimeError::ContextFull { prompt: ids.len(), new: max_new, max: self.max_context });
        }
        let mut cache = self.empty_cache()?;
        let prompt = self.embed_prompt(ids, image, audio)?;
        let mut logits = self.decode(prompt, &mut cache, LogitRows::Last)?;
        let mut generated = Vec::with_capacity(max_new);
        // Masked copy of the logits: the decoder's own tensor is not ours to change.
        let mut masked = Vec::new();
        while generated.len() < max_new {
            let next: Vec<u32> = match constraint.as_deref_mut() {
                Some(constraint) => {
                    if constraint.is_finished() {
                        break;
                    }
                    let mut forced = constraint.forced_tokens()?;
                    if forced.is_empty() {
                        masked.clear();
                        masked.extend_from_slice(last_row(&logits)?);
                        constraint.mask_logits(&mut masked)?;
                        on_logits(&masked);
                        let token = sampler.sample(&masked);
                        constraint.accept(token)?;
                        vec![token]
                    } else {
                        forced.truncate(max_new - generated.len());
                        constraint.accept_forced(&forced)?;
                        forced
                    }
                }
                None => {
                    let last = last_row(&logits)?;
                    on_logits(last);
                    vec![sampler.sample(last)]
                }
            };
            for &token in &next {
                generated.push(token);
                on_token(token);
            }
            let finished = match constraint.as_deref() {
                Some(constraint) => constraint.is_finished(),
                None => next.iter().any(|token| stop.contains(token)),
            };
            if finished || generated.len() == max_new {
                break;
            }
            logits = self.decode(self.embed(&next)?, &mut cache, LogitRows::Last)?;
        }
        if let Some(constraint) = constraint {
            constraint.check_complete()?;
        }
        Ok(generated)
    }
}

/// An encoder's graph and its plan, optimised for one input size (the vision encoder's patch
/// count: tract's optimiser mis-types the graph's attention mask while the count is a symbol,
/// a `Where`, and without optimisation its products run on reference kernels). Pictures are
/// padded to their budget's count, so a station (one budget) needs one plan; another size
/// rebuilds it from the file, after the old one is dropped, so the weights are held once. With
/// `keep` false the plan is built for each run and dropped after it.
struct EncoderGraph {
    graph: &'static str,
    path: PathBuf,
    keep: bool,
    build: fn(&Path, usize) -> Result<Plan, RuntimeError>,
    plan: Mutex<Option<(usize, Plan)>>,
}

impl EncoderGraph {
    /// `plan`, built at load for a size, is held only if the plans are kept.
    fn new(
        graph: &'static str,
        path: PathBuf,
        keep: bool,
        build: fn(&Path, usize) -> Result<Plan, RuntimeError>,
        plan: Option<(usize, Plan)>,
    ) -> Self {
        let plan = if keep {
            plan
        } else {
            drop(plan);
            return_freed_memory();
            None
        };
        Self { graph, path, keep, build, plan: Mutex::new(plan) }
    }

    /// Runs the plan for `size` on `inputs`.
    fn run(&self, size: usize, inputs: TVec<TValue>) -> Result<TVec<TValue>, RuntimeError> {
        if !self.keep {
            let outputs = run(&(self.build)(&self.path, size)?, self.graph, inputs);
            return_freed_memory();
            return outputs;
        }
        let plan = {
            // A plan is swapped in whole, so one left by a panic elsewhere is still a good one.
            let mut held = self.plan.lock().unwrap_or_else(PoisonError::into_inner);
            match held.as_ref() {
                Some((count, plan)) if *count == size => plan.clone(),
                _ => {
                    *held = None;
                    let plan = (self.build)(&self.path, size)?;
                    *held = Some((size, plan.clone()));
                    plan
                }
            }
        };
        run(&plan, self.graph, inputs)
    }
}

/// Hands freed heap memory back to the system: glibc keeps it for later allocations, and the
/// resident memory would not fall. Loading leaves much of it (parsing the tokenizer's and the
/// graphs' files: 240 MB of the 660 MB E2B-shaped held once loaded), and so does a dropped
/// encoder.
pub(super) fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only releases memory that no allocation holds.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The audio graph at `path`, optimised (its frame count is fixed in the graph).
fn audio_plan(path: &Path, _frames: usize) -> Result<Plan, RuntimeError> {
    optimise(load_graph(path)?, "audio")
}

/// The vision graph at `path` with its `num_patches` input dimension fixed, optimised.
fn vision_plan(path: &Path, patches: usize) -> Result<Plan, RuntimeError> {
    let model = load_graph(path)?;
    let count = model.symbols.sym("num_patches");
    let mut fixed = model
        .set_symbols(&HashMap::from([(count, TDim::Val(patches as i64))]))
        .map_err(|source| RuntimeError::Run { graph: "vision", source })?;
    attention::fuse(&mut fixed, attention::IMAGE_QUERY_BLOCK)
        .map_err(|source| RuntimeError::Run { graph: "vision", source })?;
    optimise(fixed, "vision")
}

/// Patches of the manifest's default image budget (`vision.default_soft_tokens` soft tokens of
/// `vision.patches_per_soft_token` patches), if it says.
fn default_patches(bundle: &Bundle) -> Option<usize> {
    let vision = bundle.manifest.sections.get("vision")?;
    let count = |key: &str| vision.get(key).and_then(|v| v.as_u64()).map(|v| v as usize);
    Some(count("default_soft_tokens")? * count("patches_per_soft_token")?)
}

/// Runs the model's matrix products on `threads` threads (tract's default executor and our Q8_0
/// kernels', for the whole process).
pub fn use_threads(threads: usize) {
    use tract_linalg::multithread::{set_default_executor, Executor};
    block_matrix::set_threads(threads);
    set_default_executor(if threads > 1 { Executor::multithread(threads) } else { Executor::SingleThread });
}

/// The bundle's `output_layer` file, as its manifest describes it in `text.output_layer`:
/// `{"format": "q8_0" or "q4_0", "rows": vocab, "columns": hidden, "softcap": null or a number}`, and
/// `"embed_scale"` where the layer is also the embedding table (the bundle then has no embed
/// graph): the scale embeddings are multiplied by.
fn load_output_layer(bundle: &Bundle) -> Result<Option<(OutputLayer, Option<f32>)>, RuntimeError> {
    let Some(path) = bundle.file("output_layer") else { return Ok(None) };
    let missing = || RuntimeError::OutputLayerManifest("is missing, but the bundle has an output_layer file".into());
    let spec = bundle.manifest.sections.get("text").and_then(|t| t.get("output_layer")).ok_or_else(missing)?;
    let size = |key: &str| {
        spec.get(key)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .ok_or_else(|| RuntimeError::OutputLayerManifest(format!("has no `{key}` count")))
    };
    let format = match spec.get("format").and_then(|f| f.as_str()) {
        Some("q8_0") => BlockFormat::Q8_0,
        Some("q4_0") => BlockFormat::Q4_0,
        other => {
            return Err(RuntimeError::OutputLayerManifest(format!("format {other:?} is neither \"q8_0\" nor \"q4_0\"")))
        }
    };
    let number = |key: &str| match spec.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(value) => value
            .as_f64()
            .map(|v| Some(v as f32))
            .ok_or_else(|| RuntimeError::OutputLayerManifest(format!("{key} {value} is not a number"))),
    };
    let layer = OutputLayer::load(&path, format, size("rows")?, size("columns")?, number("softcap")?)?;
    Ok(Some((layer, number("embed_scale")?)))
}

/// Gemma 4's per-layer embedding table, where the bundle has one (`per_layer_embeddings` file,
/// laid out as the manifest's `text.per_layer_embeddings` says: `{"format": "q8_0", "rows",
/// "columns", "layers", "width", "scale"}`).
fn load_per_layer_embeddings(bundle: &Bundle) -> Result<Option<PerLayerEmbeddings>, RuntimeError> {
    let Some(path) = bundle.file("per_layer_embeddings") else { return Ok(None) };
    let bad = |what: String| RuntimeError::PerLayerManifest(what);
    let spec = bundle
        .manifest
        .sections
        .get("text")
        .and_then(|t| t.get("per_layer_embeddings"))
        .ok_or_else(|| bad("is missing, but the bundle has a per_layer_embeddings file".into()))?;
    match spec.get("format").and_then(|f| f.as_str()) {
        Some("q8_0") => {}
        other => return Err(bad(format!("format {other:?} is not \"q8_0\""))),
    }
    let size = |key: &str| {
        spec.get(key).and_then(|v| v.as_u64()).map(|v| v as usize).ok_or_else(|| bad(format!("has no `{key}` count")))
    };
    let scale = spec.get("scale").and_then(|v| v.as_f64()).ok_or_else(|| bad("has no `scale` number".into()))?;
    let layout = PerLayerLayout {
        rows: size("rows")?,
        columns: size("columns")?,
        layers: size("layers")?,
        width: size("width")?,
        scale: scale as f32,
    };
    Ok(Some(PerLayerEmbeddings::open(&path, layout)?))
}

/// The ids the manifest's `text.multimodal_placeholder_ids` lists (none when it has none).
fn placeholder_ids(bundle: &Bundle) -> Result<Vec<u32>, RuntimeError> {
    let Some(list) = bundle.manifest.sections.get("text").and_then(|t| t.get("multimodal_placeholder_ids")) else {
        return Ok(Vec::new());
    };
    let ids = list.as_array().map(|ids| ids.iter().map(|id| id.as_u64().and_then(|id| u32::try_from(id).ok())));
    ids.and_then(|ids| ids.collect::<Option<Vec<u32>>>()).ok_or_else(|| RuntimeError::PlaceholderIds(list.to_string()))
}

/// The ONNX graph at `path` as a typed model, with our operators (`MatMulQ8_0`, 4-bit
/// `MatMulNBits`) parsed into our kernels (their weights read into our matrices before tract
/// types the graph, so that they are not held twice) and `FastGelu` into tract's fused GELU:
/// what the runtime optimises and runs.
pub fn load_graph(path: &Path) -> Result<TypedModel, RuntimeError> {
    let load_error = |source| RuntimeError::Load { path: path.display().to_string(), source };
    let mut onnx = tract_onnx::onnx();
    block_matmul::register(&mut onnx);
    fast_gelu::register(&mut onnx);
    onnx.with_ignore_output_shapes(true)
        .with_ignore_value_info(true)
        .model_for_path(path)
        .and_then(|mut model| {
            block_matmul::read_weights_into_matrices(&mut model)?;
            let mut model = model.into_typed()?;
            half_tables::halve_tables(&mut model)?;
            Ok(model)
        })
        .map_err(load_error)
}

fn optimise(model: TypedModel, graph: &'static str) -> Result<Plan, RuntimeError> {
    model.into_optimized().and_then(|m| m.into_runnable()).map_err(|source| RuntimeError::Run { graph, source })
}

fn run(plan: &Plan, graph: &'static str, inputs: TVec<TValue>) -> Result<TVec<TValue>, RuntimeError> {
    plan.run(inputs).map_err(|source| RuntimeError::Run { graph, source })
}

/// Reads `(kv_heads, head_dim)` of each `past_key_i` input of the decoder; the cache inputs
/// come after the `first` embedding inputs.
fn cache_shapes(decoder: &TypedModel, first: usize) -> Result<Vec<(usize, usize)>, RuntimeError> {
    let mut shapes = Vec::new();
    for (index, outlet) in
        decoder.input_outlets().map_err(|e| RuntimeError::CacheLayout(e.to_string()))?.iter().enumerate().skip(first)
    {
        let fact = decoder.outlet_fact(*outlet).map_err(|e| RuntimeError::CacheLayout(e.to_string()))?;
        let dims: Vec<Option<usize>> = fact.shape.iter().map(|d| d.as_i64().map(|v| v as usize)).collect();
        match dims.as_slice() {
            [Some(1), Some(heads), _, Some(dim)] if (index - first).is_multiple_of(2) => shapes.push((*heads, *dim)),
            [Some(1), Some(_), _, Some(_)] => {}
            _ => return Err(RuntimeError::CacheLayout(format!("input {index} has shape {:?}", fact.shape))),
        }
    }
    Ok(shapes)
}

/// The fixed frame count of the audio encoder's `input_features`.
fn fixed_frames(audio: &TypedModel) -> Result<usize, RuntimeError> {
    let layout = |e: TractError| RuntimeError::AudioLayout(e.to_string());
    let outlet = audio.input_outlets().map_err(layout)?[0];
    let fact = audio.outlet_fact(outlet).map_err(layout)?;
    fact.shape
        .get(1)
        .and_then(|d| d.as_i64())
        .map(|frames| frames as usize)
        .ok_or_else(|| RuntimeError::AudioLayout(format!("{:?}", fact.shape)))
}

fn soft_tokens(outputs: &TVec<TValue>, graph: &'static str) -> Result<SoftTokens, RuntimeError> {
    let err = |source| RuntimeError::Run { graph, source };
    let embeds = values::<f32>(&outputs[0]).map_err(err)?;
    let mask = values::<bool>(&outputs[1]).map_err(err)?;
    let hidden = *outputs[0].shape().last().unwrap_or(&0);
    let mut rows = Vec::with_capacity(embeds.len());
    for (n, &valid) in mask.iter().enumerate() {
        if valid {
            rows.extend_from_slice(&embeds[n * hidden..(n + 1) * hidden]);
        }
    }
    Ok(SoftTokens { rows, hidden })
}

/// Logits of the last position of `[1, n, vocab]`.
pub fn last_row(logits: &Tensor) -> Result<&[f32], RuntimeError> {
    let vocab = *logits.shape().last().unwrap_or(&0);
    let all = values::<f32>(logits).map_err(|source| RuntimeError::Run { graph: "decoder", source })?;
    Ok(&all[all.len() - vocab..])
}

/// The values of a tensor held in memory, in order.
pub fn values<D: Datum>(tensor: &Tensor) -> TractResult<&[D]> {
    tensor.try_as_plain_ram()?.as_slice::<D>()
}
