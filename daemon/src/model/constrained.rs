//! Constrained decoding with llguidance: the model may only produce text that a JSON Schema or a
//! Lark grammar accepts. Before each sampled token the constraint computes the set of allowed
//! tokens and every other logit becomes -inf; tokens the grammar forces are appended without
//! sampling; generation ends when the grammar is complete.
//!
//! Two levels, because the costs differ by three orders of magnitude:
//! - [`TokenConstraints`], once per model: the token trie and llguidance's parser factory over the
//!   bundle's `tokenizer.json` (about 2 s for Gemma's 262144 tokens);
//! - [`Constraint`], once per request: a compiled grammar and its parser state (milliseconds).
//!
//! `toktrie_hf_tokenizers` pins an older `tokenizers` than ours, so the token bytes come from
//! llguidance's own reader of `tokenizer.json`, and text is tokenized by our tokenizer through a
//! small [`TokenizerEnv`].

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llguidance::api::{StopReason, TopLevelGrammar};
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};

use super::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum ConstraintError {
    #[error("{path}: cannot read the tokenizer for constrained decoding: {source}")]
    ReadTokenizer { path: String, source: std::io::Error },
    #[error("{path}: tokenizer.json is not valid JSON: {source}")]
    TokenizerJson { path: String, source: serde_json::Error },
    #[error("{path}: cannot get the bytes of each token from tokenizer.json: {message}")]
    TokenBytes { path: String, message: String },
    #[error("the bundle names no end-of-turn or eos token, so a constrained answer could never end")]
    NoStopToken,
    #[error("stop token {token} is outside the tokenizer's {vocab} tokens")]
    StopTokenOutOfRange { token: u32, vocab: usize },
    #[error("cannot prepare constrained decoding for this tokenizer: {0}")]
    Factory(String),
    #[error("the {kind} does not compile: {message}")]
    Compile { kind: GrammarKind, message: String },
    #[error("the {kind} allows no next token after {generated} generated tokens: {reason}")]
    DeadEnd { kind: GrammarKind, generated: usize, reason: String },
    #[error("the {kind} refuses token {token} after {generated} generated tokens: {reason}")]
    Refused { kind: GrammarKind, token: u32, generated: usize, reason: String },
    #[error("the {kind} allows only tokens past the model's {logits} logits (tokenizer and model disagree)")]
    OutsideLogits { kind: GrammarKind, logits: usize },
    #[error("the answer reached its limit of {generated} tokens before the {kind} was complete: raise max_tokens")]
    Unfinished { kind: GrammarKind, generated: usize },
}

/// What a request is constrained to.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// Output is one JSON value valid under this schema, written compactly (no whitespace
    /// between tokens) unless the schema's `x-guidance` says otherwise.
    JsonSchema(serde_json::Value),
    /// A grammar in llguidance's Lark dialect; special tokens are written `<|tool_call>`.
    Lark(String),
}

impl Grammar {
    pub fn kind(&self) -> GrammarKind {
        match self {
            Grammar::JsonSchema(_) => GrammarKind::JsonSchema,
            Grammar::Lark(_) => GrammarKind::Lark,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrammarKind {
    JsonSchema,
    Lark,
}

impl std::fmt::Display for GrammarKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GrammarKind::JsonSchema => "JSON Schema",
            GrammarKind::Lark => "Lark grammar",
        })
    }
}

/// Our tokenizer as llguidance sees it: the trie of token bytes, and canonical tokenization of
/// text the grammar forces (so forced text gets the ids the model would have chosen).
struct BundleTokEnv {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for BundleTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, bytes: &[u8]) -> Vec<TokenId> {
        // Forced bytes can end inside a character; the trie's greedy split is the fallback there.
        match std::str::from_utf8(bytes).ok().and_then(|text| self.tokenizer.encode(text).ok()) {
            Some(ids) => ids,
            None => self.trie.greedy_tokenize(bytes),
        }
    }
}

/// The per-model part of constrained decoding: build once, then make a [`Constraint`] per request.
pub struct TokenConstraints {
    factory: ParserFactory,
    vocab: usize,
    /// How long reading tokenizer.json and building the parser factory took.
    pub build_time: Duration,
}

impl TokenConstraints {
    /// Reads `tokenizer_json` (the bundle's), with `tokenizer` loaded from the same file and
    /// `stop` the ids that end a turn (the first is llguidance's eos).
    pub fn load(tokenizer_json: &Path, tokenizer: Arc<Tokenizer>, stop: &[u32]) -> Result<Self, ConstraintError> {
        let start = Instant::now();
        let path = tokenizer_json.display().to_string();
        let text = std::fs::read_to_string(tokenizer_json)
            .map_err(|source| ConstraintError::ReadTokenizer { path: path.clone(), source })?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|source| ConstraintError::TokenizerJson { path: path.clone(), source })?;
        let words = guarded(|| llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| e.to_string()))
            .map_err(|message| ConstraintError::TokenBytes { path, message })?;
        let vocab = words.len();
        let (&eos, _) = stop.split_first().ok_or(ConstraintError::NoStopToken)?;
        if let Some(&token) = stop.iter().find(|&&t| t as usize >= vocab) {
            return Err(ConstraintError::StopTokenOutOfRange { token, vocab });
        }
        let info = TokRxInfo::new(vocab as u32, eos);
        let factory = guarded(|| {
            let trie = TokTrie::from(&info, &words).with_eos_tokens(stop);
            let env: TokEnv = Arc::new(BundleTokEnv { trie, tokenizer });
            let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
            // Warnings go to our log, not llguidance's own stderr printing.
            factory.quiet();
            Ok(factory)
        })
        .map_err(ConstraintError::Factory)?;
        Ok(Self { factory, vocab, build_time: start.elapsed() })
    }

    /// Tokens in the tokenizer (the masks' length).
    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// Compiles `grammar` for one request.
    pub fn constraint(&self, grammar: &Grammar) -> Result<Constraint, ConstraintError> {
        let start = Instant::now();
        let kind = grammar.kind();
        let top = match grammar {
            Grammar::JsonSchema(schema) => TopLevelGrammar::from_json_schema(compact(schema.clone())),
            Grammar::Lark(text) => TopLevelGrammar::from_lark(text.clone()),
        };
        let parser = guarded(|| self.factory.create_parser(top).map_err(|e| e.to_string()))
            .map_err(|message| ConstraintError::Compile { kind, message })?;
        let mut matcher = Matcher::new(Ok(parser));
        if let Some(message) = matcher.get_error() {
            return Err(ConstraintError::Compile { kind, message });
        }
        for warning in matcher.grammar_warnings() {
            tracing::warn!("{kind}: {warning}");
        }
        Ok(Constraint { matcher, kind, generated: 0, timings: ConstraintTimings::new(start.elapsed()) })
    }
}

/// Runs llguidance code that asserts on its input, turning a panic into an error message.
fn guarded<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "llguidance panicked".to_owned());
        Err(message)
    })
}

/// JSON written without optional whitespace: llguidance's default lets whitespace run on, which
/// a weak model fills forever, and compact JSON is fewer tokens on a slow CPU.
fn compact(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(object) = schema.as_object_mut() {
        object.entry("x-guidance").or_insert_with(|| serde_json::json!({ "whitespace_flexible": false }));
    }
    schema
}

/// Time spent in the constraint, per generated token: what it costs on top of the model.
#[derive(Debug, Clone, Default)]
pub struct ConstraintTimings {
    /// Compiling the grammar.
    pub compile: Duration,
    /// llguidance computing the allowed-token set, per sampled token.
    pub mask: Vec<Duration>,
    /// Setting the disallowed logits to -inf, per sampled token.
    pub apply: Vec<Duration>,
    /// Advancing the parser by one token, per token (sampled or forced).
    pub consume: Vec<Duration>,
    /// Looking for forced tokens, per step.
    pub forced_lookup: Vec<Duration>,
    /// Tokens appended because the grammar allowed nothing else.
    pub forced_tokens: usize,
}

impl ConstraintTimings {
    fn new(compile: Duration) -> Self {
        Self { compile, ..Self::default() }
    }
}

/// One request's constraint: feed it every generated token, ask it for forced tokens and masks.
pub struct Constraint {
    matcher: Matcher,
    kind: GrammarKind,
    generated: usize,
    timings: ConstraintTimings,
}

impl Constraint {
    pub fn kind(&self) -> GrammarKind {
        self.kind
    }

    pub fn timings(&self) -> &ConstraintTimings {
        &self.timings
    }

    /// Tokens the grammar forces next (possibly none); they still have to be passed to
    /// [`accept_forced`](Self::accept_forced).
    pub fn forced_tokens(&mut self) -> Result<Vec<u32>, ConstraintError> {
        let start = Instant::now();
        let forced = self.matcher.compute_ff_tokens();
        self.timings.forced_lookup.push(start.elapsed());
        // An empty list also stands for a failure: tell them apart.
        if let Some(reason) = self.matcher.get_error() {
            return Err(self.dead_end(reason));
        }
        Ok(forced)
    }

    /// Appends forced tokens to what the parser has seen.
    pub fn accept_forced(&mut self, tokens: &[u32]) -> Result<(), ConstraintError> {
        for &token in tokens {
            self.accept(token)?;
        }
        self.timings.forced_tokens += tokens.len();
        Ok(())
    }

    /// Sets every logit the grammar does not allow next to -inf. Logits past the tokenizer's
    /// vocabulary (padding rows of the output layer) are never allowed.
    pub fn mask_logits(&mut self, logits: &mut [f32]) -> Result<(), ConstraintError> {
        let start = Instant::now();
        let mask = self.matcher.compute_mask().map_err(|e| self.dead_end(e.to_string()))?;
        let computed = Instant::now();
        self.timings.mask.push(computed - start);
        let mut any_allowed = false;
        // 32 tokens a word: whole words allowed or refused are the common case.
        for (word_index, &word) in mask.as_slice().iter().enumerate() {
            let first = word_index * 32;
            if first >= logits.len() {
                break;
            }
            let end = (first + 32).min(logits.len());
            let bits = if end - first == 32 { word } else { word & ((1u32 << (end - first)) - 1) };
            match bits {
                0 => logits[first..end].fill(f32::NEG_INFINITY),
                u32::MAX => any_allowed = true,
                _ => {
                    any_allowed = true;
                    // Visit the refused tokens only: inside a string nearly every token is allowed.
                    let mut refused = !bits & (u32::MAX >> (32 - (end - first)));
                    while refused != 0 {
                        logits[first + refused.trailing_zeros() as usize] = f32::NEG_INFINITY;
                        refused &= refused - 1;
                    }
                }
            }
        }
        let covered = (mask.as_slice().len() * 32).min(logits.len());
        logits[covered..].fill(f32::NEG_INFINITY);
        self.timings.apply.push(computed.elapsed());
        if !any_allowed {
            return Err(ConstraintError::OutsideLogits { kind: self.kind, logits: logits.len() });
        }
        Ok(())
    }

    /// Advances the parser by the token the model produced.
    pub fn accept(&mut self, token: u32) -> Result<(), ConstraintError> {
        let start = Instant::now();
        let result = self.matcher.consume_token(token);
        self.timings.consume.push(start.elapsed());
        result.map_err(|e| ConstraintError::Refused {
            kind: self.kind,
            token,
            generated: self.generated,
            reason: e.to_string(),
        })?;
        self.generated += 1;
        Ok(())
    }

    /// The grammar is complete and allows nothing more: stop generating.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped() && !self.matcher.is_error()
    }

    /// At the end of generation: `Ok` when the output is a complete sentence of the grammar
    /// (finished, or could end here), else why not.
    pub fn check_complete(&mut self) -> Result<(), ConstraintError> {
        if let Some(reason) = self.matcher.get_error() {
            return Err(self.dead_end(reason));
        }
        let complete = match self.matcher.stop_reason() {
            StopReason::NotStopped => self.matcher.is_accepting().unwrap_or(false),
            StopReason::EndOfSentence | StopReason::NoExtension => true,
            _ => false,
        };
        if complete {
            Ok(())
        } else {
            Err(ConstraintError::Unfinished { kind: self.kind, generated: self.generated })
        }
    }

    fn dead_end(&self, reason: String) -> ConstraintError {
        ConstraintError::DeadEnd { kind: self.kind, generated: self.generated, reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> TokenConstraints {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma4-tiny");
        let tokenizer = Arc::new(Tokenizer::load(&dir.join("tokenizer.json")).unwrap());
        TokenConstraints::load(&dir.join("tokenizer.json"), tokenizer, &[1, 6]).unwrap()
    }

    /// Drives a constraint to the end by always taking the lowest allowed token id.
    fn walk(constraint: &mut Constraint, vocab: usize, limit: usize) -> Vec<u32> {
        let mut out = Vec::new();
        while !constraint.is_finished() && out.len() < limit {
            let forced = constraint.forced_tokens().unwrap();
            if !forced.is_empty() {
                constraint.accept_forced(&forced).unwrap();
                out.extend(forced);
                continue;
            }
            let mut logits = vec![0.0; vocab];
            constraint.mask_logits(&mut logits).unwrap();
            let token = logits.iter().position(|l| l.is_finite()).unwrap() as u32;
            constraint.accept(token).unwrap();
            out.push(token);
        }
        out
    }

    #[test]
    fn forced_literal_is_produced_whole_and_finishes() {
        let constraints = tiny();
        let tokenizer =
            Tokenizer::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma4-tiny/tokenizer.json"))
                .unwrap();
        let mut constraint = constraints.constraint(&Grammar::Lark(r#"start: "gate closed""#.into())).unwrap();
        let ids = walk(&mut constraint, constraints.vocab_size(), 50);
        assert_eq!(tokenizer.decode(&ids), "gate closed");
        assert!(constraint.is_finished());
        constraint.check_complete().unwrap();
        assert!(constraint.timings().forced_tokens > 0, "a fixed literal is forced, not sampled");
    }

    #[test]
    fn mask_refuses_what_the_grammar_cannot_continue_with() {
        let constraints = tiny();
        let mut constraint = constraints.constraint(&Grammar::Lark(r#"start: /[0-9]+/"#.into())).unwrap();
        let mut logits = vec![1.0; constraints.vocab_size() + 7];
        constraint.mask_logits(&mut logits).unwrap();
        let tokenizer =
            Tokenizer::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma4-tiny/tokenizer.json"))
                .unwrap();
        let allowed: Vec<u32> = (0..logits.len() as u32).filter(|&t| logits[t as usize].is_finite()).collect();
        assert!(!allowed.is_empty());
        for &token in &allowed {
            let text = tokenizer.decode(&[token]);
            assert!(!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()), "token {token} is {text:?}");
        }
        for token in 0..constraints.vocab_size() as u32 {
            let text = tokenizer.decode(&[token]);
            let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
            assert_eq!(logits[token as usize].is_finite(), digits, "token {token} {text:?}");
        }
        assert!(logits[constraints.vocab_size()..].iter().all(|l| *l == f32::NEG_INFINITY), "padding rows");
        let letter = tokenizer.encode("x").unwrap()[0];
        assert!(matches!(constraint.accept(letter), Err(ConstraintError::Refused { .. })));
    }

    #[test]
    fn json_schema_output_is_compact_and_valid() {
        let constraints = tiny();
        let schema = serde_json::json!({
            "type": "object",
            "properties": { "n": { "type": "integer", "minimum": 3, "maximum": 3 } },
            "required": ["n"],
            "additionalProperties": false
        });
        let mut constraint = constraints.constraint(&Grammar::JsonSchema(schema)).unwrap();
        let ids = walk(&mut constraint, constraints.vocab_size(), 50);
        let tokenizer =
            Tokenizer::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma4-tiny/tokenizer.json"))
                .unwrap();
        assert_eq!(tokenizer.decode(&ids), r#"{"n":3}"#);
        constraint.check_complete().unwrap();
    }

    #[test]
    fn bad_grammars_are_refused_with_the_reason() {
        let constraints = tiny();
        let error = constraints.constraint(&Grammar::Lark("start: undefined_rule".into())).err().unwrap();
        assert!(matches!(error, ConstraintError::Compile { kind: GrammarKind::Lark, .. }), "{error}");
        assert!(error.to_string().contains("undefined_rule"), "{error}");
        let error =
            constraints.constraint(&Grammar::JsonSchema(serde_json::json!({"type": "integer", "foo_bar": 1}))).err();
        // Unknown keywords are ignored by JSON Schema; a contradiction is not.
        assert!(error.is_none(), "{error:?}");
        let error = constraints
            .constraint(&Grammar::JsonSchema(serde_json::json!({"type": "integer", "minimum": 5, "maximum": 1})))
            .err()
            .unwrap();
        assert!(matches!(error, ConstraintError::Compile { kind: GrammarKind::JsonSchema, .. }), "{error}");
        let error = constraints.constraint(&Grammar::Lark("start: <|no_such_token|>".into())).err().unwrap();
        assert!(error.to_string().contains("unknown special token"), "{error}");
    }

    #[test]
    fn unfinished_output_is_an_error() {
        let constraints = tiny();
        let mut constraint = constraints.constraint(&Grammar::Lark(r#"start: "a" /[0-9]/ "b""#.into())).unwrap();
        let forced = constraint.forced_tokens().unwrap();
        constraint.accept_forced(&forced).unwrap();
        assert!(matches!(constraint.check_complete(), Err(ConstraintError::Unfinished { .. })));
    }

    #[test]
    fn stop_tokens_must_be_in_the_vocabulary() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma4-tiny");
        let tokenizer = Arc::new(Tokenizer::load(&dir.join("tokenizer.json")).unwrap());
        let error =
            TokenConstraints::load(&dir.join("tokenizer.json"), tokenizer.clone(), &[1, 100_000]).err().unwrap();
        assert!(matches!(error, ConstraintError::StopTokenOutOfRange { token: 100_000, vocab: 512 }), "{error}");
        assert!(matches!(
            TokenConstraints::load(&dir.join("tokenizer.json"), tokenizer, &[]).err().unwrap(),
            ConstraintError::NoStopToken
        ));
    }
}
