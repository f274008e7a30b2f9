//! The output layer (last hidden state to logits over the vocabulary), outside the decoder graph.
//!
//! It is the largest matrix of a small model (Gemma 3 270M: 262144 x 640; Gemma 4 E2B:
//! 262144 x 1536) and decoding reads it whole for every token, so it is kept in Q8_0 or Q4_0 and
//! multiplied by our own kernels (`block_matrix.rs`). Gemma's GGUF files store this tied table
//! in Q8_0, so a bundle prepared from one holds it exactly; Q4_0 halves what a token reads and
//! what the table holds in memory (E2B: 428 to 227 MB), for some accuracy. Outside the graph,
//! prefill also computes only the row it samples from.

use std::path::Path;

use tract_linalg::element_wise::ElementWise;
use tract_linalg::Func;

use super::block_matrix::{BlockFormat, BlockMatrix, BlockMatrixError};

#[derive(Debug, thiserror::Error)]
pub enum OutputLayerError {
    #[error(transparent)]
    Matrix(#[from] BlockMatrixError),
    #[error("the output layer's soft-cap must be a positive number, not {0}")]
    Softcap(f32),
    #[error("token id {id} is outside the vocabulary of {rows} rows")]
    TokenId { id: u32, rows: usize },
    #[error("the soft-cap's tanh kernel: {0}")]
    Tanh(String),
}

/// A `[vocab, hidden]` block-quantized matrix: `logits = softcap(W x)`.
#[derive(Debug)]
pub struct OutputLayer {
    matrix: BlockMatrix,
    /// Gemma's final logit soft-cap: `tanh(logit / cap) * cap`, with tract's vectorised tanh (a
    /// rational fit, a few ulps off): libm's, a value at a time, took 5 ms of each of E2B's
    /// 33 ms decode steps on an AVX2 machine, over 262144 logits.
    softcap: Option<(f32, Box<dyn ElementWise<f32>>)>,
}

impl OutputLayer {
    /// Reads `rows` rows of `columns` values in GGML's `format` block layout from `path`.
    pub fn load(
        path: &Path,
        format: BlockFormat,
        rows: usize,
        columns: usize,
        softcap: Option<f32>,
    ) -> Result<Self, OutputLayerError> {
        Self::new(BlockMatrix::load(path, format, rows, columns)?, softcap)
    }

    pub fn new(matrix: BlockMatrix, softcap: Option<f32>) -> Result<Self, OutputLayerError> {
        let softcap = match softcap {
            Some(cap) if !(cap.is_finite() && cap > 0.0) => return Err(OutputLayerError::Softcap(cap)),
            Some(cap) => Some((cap, Func::Tanh.ew_f32().map_err(|e| OutputLayerError::Tanh(e.to_string()))?)),
            None => None,
        };
        Ok(Self { matrix, softcap })
    }

    /// Logits per row.
    pub fn rows(&self) -> usize {
        self.matrix.rows()
    }

    /// The hidden width.
    pub fn columns(&self) -> usize {
        self.matrix.columns()
    }

    /// The rows of `ids` times `scale`, one after another: the input embeddings of a model whose
    /// embedding table is this matrix (tied, as Gemma's), so that one copy of it is held, not two.
    pub fn embeddings(&self, ids: &[u32], scale: f32) -> Result<Vec<f32>, OutputLayerError> {
        let columns = self.columns();
        let mut embeddings = vec![0.0; ids.len() * columns];
        for (&id, row) in ids.iter().zip(embeddings.chunks_exact_mut(columns)) {
            if id as usize >= self.rows() {
                return Err(OutputLayerError::TokenId { id, rows: self.rows() });
            }
            self.matrix.dequantize_row(id as usize, row);
            // After the dequantization, as the embed graph multiplies: the same values to the bit.
            row.iter_mut().for_each(|value| *value *= scale);
        }
        Ok(embeddings)
    }

    /// The logits of whole hidden rows into `logits` (`rows` per hidden row), on `threads` threads.
    pub fn logits(&self, hidden: &[f32], logits: &mut [f32], threads: usize) -> Result<(), OutputLayerError> {
        self.matrix.multiply(hidden, logits, threads)?;
        if let Some((cap, tanh)) = &self.softcap {
            logits.iter_mut().for_each(|logit| *logit /= cap);
            tanh.run(logits).map_err(|e| OutputLayerError::Tanh(e.to_string()))?;
            logits.iter_mut().for_each(|logit| *logit *= cap);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::model::block_matrix::BLOCK_BYTES;

    #[test]
    fn logits_are_soft_capped() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (rows, columns) = (40, 64);
        let blocks: Vec<u8> =
            (0..rows * 2 * BLOCK_BYTES).map(|i| if i % BLOCK_BYTES == 1 { 0x20 } else { rng.random() }).collect();
        let hidden: Vec<f32> = (0..columns).map(|_| rng.random_range(-1.0..1.0)).collect();
        let plain = OutputLayer::new(BlockMatrix::from_blocks(&blocks, rows, columns).unwrap(), None).unwrap();
        let capped = OutputLayer::new(BlockMatrix::from_blocks(&blocks, rows, columns).unwrap(), Some(0.5)).unwrap();
        let (mut a, mut b) = (vec![0.0; rows], vec![0.0; rows]);
        plain.logits(&hidden, &mut a, 1).unwrap();
        capped.logits(&hidden, &mut b, 2).unwrap();
        assert!(a.iter().any(|l| l.abs() > 0.5), "the cap must matter: {a:?}");
        for (&plain, &capped) in a.iter().zip(&b) {
            assert!((capped - (plain / 0.5).tanh() * 0.5).abs() <= 1e-5);
            assert!(capped.abs() <= 0.5);
        }
    }

    #[test]
    fn embeddings_are_the_rows_in_the_file_times_the_scale() {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        // Rows across panels (9 and 17 are in the second and third), two blocks each.
        let (rows, columns, scale) = (20, 64, 25.3f32);
        let blocks: Vec<u8> = (0..rows * 2 * BLOCK_BYTES).map(|_| rng.random()).collect();
        let blocks: Vec<u8> = blocks
            .chunks_exact(BLOCK_BYTES)
            .flat_map(|b| {
                // A finite scale: f16 bits of a value in [0.001, 0.1).
                let d = tract_onnx::prelude::f16::from_f32(rng.random_range(0.001..0.1)).to_le_bytes();
                [d[0], d[1]].into_iter().chain(b[2..].iter().copied())
            })
            .collect();
        let layer = OutputLayer::new(BlockMatrix::from_blocks(&blocks, rows, columns).unwrap(), None).unwrap();
        let ids = [9, 0, 17, 9];
        let embeddings = layer.embeddings(&ids, scale).unwrap();
        assert_eq!(embeddings.len(), ids.len() * columns);
        for (&id, row) in ids.iter().zip(embeddings.chunks_exact(columns)) {
            for (column, &value) in row.iter().enumerate() {
                let block = &blocks[(id as usize * 2 + column / 32) * BLOCK_BYTES..][..BLOCK_BYTES];
                let d = tract_onnx::prelude::f16::from_le_bytes([block[0], block[1]]).to_f32();
                let q = block[2 + column % 32] as i8;
                assert_eq!(value.to_bits(), (f32::from(q) * d * scale).to_bits(), "row {id} column {column}");
            }
        }
        let outside = layer.embeddings(&[20], scale).unwrap_err().to_string();
        assert!(outside.contains("token id 20 is outside the vocabulary of 20 rows"), "{outside}");
    }

    #[test]
    fn a_soft_cap_that_is_not_a_positive_number_is_refused() {
        for cap in [f32::NAN, 0.0, -30.0, f32::INFINITY] {
            let matrix = BlockMatrix::from_blocks(&[], 0, 64).unwrap();
            assert!(OutputLayer::new(matrix, Some(cap)).unwrap_err().to_string().contains("soft-cap"), "{cap}");
        }
    }
}
