//! Text to token ids and back, with the `tokenizers` crate on the bundle's `tokenizer.json`.
//! Prompts arrive already carrying their special tokens (`<bos>`, turn markers, soft-token
//! placeholders), so nothing is added on encoding.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: cannot load the tokenizer: {message}")]
    Load { path: String, message: String },
    #[error("cannot tokenize the prompt: {0}")]
    Encode(String),
    #[error("the tokenizer has no token `{0}`")]
    UnknownToken(String),
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    pub fn load(path: &Path) -> Result<Self, TokenizerError> {
        tokenizers::Tokenizer::from_file(path)
            .map(|inner| Self { inner })
            .map_err(|e| TokenizerError::Load { path: path.display().to_string(), message: e.to_string() })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.inner.encode(text, false).map(|e| e.get_ids().to_vec()).map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, true).unwrap_or_default()
    }

    /// Text of `ids` with the special tokens written out (`<|tool_call>`, `<|"|>`, ...): what
    /// tool-call parsing reads.
    pub fn decode_with_special(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, false).unwrap_or_default()
    }

    pub fn token_id(&self, token: &str) -> Result<u32, TokenizerError> {
        self.inner.token_to_id(token).ok_or_else(|| TokenizerError::UnknownToken(token.into()))
    }

    /// Turns a stream of ids into text as soon as each piece is whole (a multi-byte character
    /// can span several byte tokens).
    pub fn stream(&self) -> TextStream<'_> {
        TextStream { tokenizer: self, ids: Vec::new(), shown: 0 }
    }
}

pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    /// Bytes of the decoded text already handed out.
    shown: usize,
}

impl TextStream<'_> {
    /// The new text that `id` completes, if any.
    pub fn push(&mut self, id: u32) -> Option<String> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids);
        // An unfinished character decodes as U+FFFD: wait for the bytes that complete it.
        if text.len() <= self.shown || text.ends_with('\u{FFFD}') || !text.is_char_boundary(self.shown) {
            return None;
        }
        let new = text[self.shown..].to_owned();
        self.shown = text.len();
        Some(new)
    }
}
