//! Gemma 4's per-layer embeddings (PLE): for each token id, a row of `layers x width` values
//! that the decoder takes beside the token's embedding.
//!
//! E2B's table is 262144 x 8960: 2.5 GB in Q8_0, more than the whole model may hold in memory
//! on a Pi, while a prompt reads a few hundred rows of it. So the table stays on disk and each
//! row is read when a token needs it (the page cache keeps the frequent ones; they are not the
//! process's memory). The file is GGML Q8_0 blocks, row after row, each row padded with zeros to
//! whole blocks.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::block_matrix::{dequantize_blocks, BLOCK, BLOCK_BYTES};

#[derive(Debug, thiserror::Error)]
pub enum PerLayerEmbeddingsError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {actual} bytes, but {rows} rows of {columns} Q8_0 values take {expected}")]
    Size { path: PathBuf, actual: u64, expected: u64, rows: usize, columns: usize },
    #[error("{layers} layers of {width} values do not fit rows of {columns}")]
    Shape { layers: usize, width: usize, columns: usize },
    #[error("the per-layer embeddings' scale must be a finite number, not {0}")]
    Scale(f32),
    #[error("token id {id} is outside the per-layer embedding table of {rows} rows")]
    TokenId { id: u32, rows: usize },
}

/// Where the table is and how it is laid out (the manifest's `text.per_layer_embeddings`).
#[derive(Debug, Clone, PartialEq)]
pub struct PerLayerLayout {
    pub rows: usize,
    /// Values stored per row: `layers x width`, rounded up to whole blocks.
    pub columns: usize,
    pub layers: usize,
    pub width: usize,
    /// What every value is multiplied by (Gemma: the square root of `width`).
    pub scale: f32,
}

/// The table on disk, read by row.
#[derive(Debug)]
pub struct PerLayerEmbeddings {
    file: File,
    path: PathBuf,
    layout: PerLayerLayout,
}

impl PerLayerEmbeddings {
    /// Opens the table at `path`, checking that the file holds exactly `layout`'s rows.
    pub fn open(path: &Path, layout: PerLayerLayout) -> Result<Self, PerLayerEmbeddingsError> {
        let PerLayerLayout { rows, columns, layers, width, scale } = layout;
        if columns % BLOCK != 0 || layers * width > columns || layers * width + BLOCK <= columns {
            return Err(PerLayerEmbeddingsError::Shape { layers, width, columns });
        }
        if !scale.is_finite() {
            return Err(PerLayerEmbeddingsError::Scale(scale));
        }
        let read_error = |source| PerLayerEmbeddingsError::Read { path: path.to_owned(), source };
        let file = File::open(path).map_err(read_error)?;
        let actual = file.metadata().map_err(read_error)?.len();
        let expected = (rows * columns / BLOCK * BLOCK_BYTES) as u64;
        if actual != expected {
            return Err(PerLayerEmbeddingsError::Size { path: path.to_owned(), actual, expected, rows, columns });
        }
        Ok(Self { file, path: path.to_owned(), layout })
    }

    /// Values per token: `layers x width`.
    pub fn values_per_token(&self) -> usize {
        self.layout.layers * self.layout.width
    }

    pub fn layers(&self) -> usize {
        self.layout.layers
    }

    pub fn width(&self) -> usize {
        self.layout.width
    }

    /// The rows of `ids` times the scale, one after another (`layers x width` values each).
    pub fn lookup(&self, ids: &[u32]) -> Result<Vec<f32>, PerLayerEmbeddingsError> {
        let PerLayerLayout { rows, columns, scale, .. } = self.layout;
        let row_bytes = columns / BLOCK * BLOCK_BYTES;
        let per_token = self.values_per_token();
        let mut blocks = vec![0u8; row_bytes];
        let mut values = vec![0.0f32; ids.len() * per_token];
        for (&id, row) in ids.iter().zip(values.chunks_exact_mut(per_token)) {
            if id as usize >= rows {
                return Err(PerLayerEmbeddingsError::TokenId { id, rows });
            }
            self.file
                .read_exact_at(&mut blocks, (id as usize * row_bytes) as u64)
                .map_err(|source| PerLayerEmbeddingsError::Read { path: self.path.clone(), source })?;
            dequantize_blocks(&blocks, row);
            // After the dequantization, as the embed graph multiplies: the same values to the bit.
            row.iter_mut().for_each(|value| *value *= scale);
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use tract_onnx::prelude::f16;

    use super::*;
    use crate::model::block_matrix::tests::random_blocks;

    fn layout(rows: usize, columns: usize, layers: usize, width: usize) -> PerLayerLayout {
        PerLayerLayout { rows, columns, layers, width, scale: 2.828_427 }
    }

    #[test]
    fn rows_are_read_from_the_file_and_scaled() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        // 6 layers of 8: 48 values, stored in rows of 64 (two blocks, the second half padding).
        let (rows, columns) = (30, 64);
        let blocks = random_blocks(&mut rng, rows, columns);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ple.q8_0");
        std::fs::write(&path, &blocks).unwrap();
        let table = PerLayerEmbeddings::open(&path, layout(rows, columns, 6, 8)).unwrap();
        let ids = [29, 0, 7, 29];
        let values = table.lookup(&ids).unwrap();
        assert_eq!(values.len(), ids.len() * 48);
        for (&id, row) in ids.iter().zip(values.chunks_exact(48)) {
            for (column, &value) in row.iter().enumerate() {
                let block = &blocks[(id as usize * 2 + column / BLOCK) * BLOCK_BYTES..][..BLOCK_BYTES];
                let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
                let q = block[2 + column % BLOCK] as i8;
                assert_eq!(value.to_bits(), (f32::from(q) * d * 2.828_427f32).to_bits(), "row {id} column {column}");
            }
        }
        let outside = table.lookup(&[30]).unwrap_err().to_string();
        assert!(outside.contains("token id 30 is outside the per-layer embedding table of 30 rows"), "{outside}");
    }

    #[test]
    fn a_file_of_the_wrong_size_or_a_layout_that_does_not_fit_is_refused() {
        let mut rng = ChaCha8Rng::seed_from_u64(10);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ple.q8_0");
        std::fs::write(&path, &random_blocks(&mut rng, 10, 64)[..BLOCK_BYTES * 19]).unwrap();
        let short = PerLayerEmbeddings::open(&path, layout(10, 64, 8, 8)).unwrap_err().to_string();
        assert!(short.contains("646 bytes, but 10 rows of 64 Q8_0 values take 680"), "{short}");
        for (columns, layers, width) in [(64, 9, 8), (96, 4, 8), (48, 6, 8)] {
            let error = PerLayerEmbeddings::open(&path, layout(10, columns, layers, width)).unwrap_err().to_string();
            assert!(
                error.contains(&format!("{layers} layers of {width} values do not fit rows of {columns}")),
                "{error}"
            );
        }
        let missing = PerLayerEmbeddings::open(&dir.path().join("absent"), layout(10, 64, 8, 8)).unwrap_err();
        assert!(missing.to_string().contains("absent"), "{missing}");
    }
}
