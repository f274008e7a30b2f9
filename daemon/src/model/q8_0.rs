//! Q8_0 matrices (GGML's 8-bit block format: per row, blocks of one f16 scale and 32 int8) and
//! their products with f32 activations, by our own kernels.
//!
//! tract multiplies block-quantized weights only in Q4_0, which costs Gemma 3 270M too much
//! accuracy, and f32 reads four times the bytes of Q8_0: decoding reads every weight once per
//! token, so bytes are time. Each activation row is quantized to Q8_0 too and each block's dot
//! product is exact integer arithmetic, as llama.cpp's `q8_0 x q8_0`, with AVX2 and NEON
//! kernels beside a scalar reference they are tested against. The output layer
//! (`output_layer.rs`) and the decoder's projections (`q8_0_matmul.rs`, a tract operator) use it.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use tract_onnx::prelude::f16;

/// Values per Q8_0 block.
pub const BLOCK: usize = 32;
/// Bytes of one Q8_0 block on disk: an f16 scale, then 32 int8.
pub const BLOCK_BYTES: usize = 2 + BLOCK;

/// Weights in a product below which one activation row is not split among threads.
const PARALLEL_MIN_WEIGHTS: usize = 1 << 19;

/// Threads the products run on, set with tract's (`model::use_threads`).
static THREADS: AtomicUsize = AtomicUsize::new(1);

pub fn set_threads(threads: usize) {
    THREADS.store(threads.max(1), Ordering::Relaxed);
}

pub fn threads() -> usize {
    THREADS.load(Ordering::Relaxed)
}

#[derive(Debug, thiserror::Error)]
pub enum Q8_0Error {
    #[error("a Q8_0 matrix {columns} wide: the width must be a multiple of {BLOCK}")]
    Width { columns: usize },
    #[error("{path}: {actual} bytes, but {rows} rows of {columns} Q8_0 values take {expected}")]
    Size { path: String, actual: u64, expected: u64, rows: usize, columns: usize },
    #[error("{path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{got} activations are not whole rows of {columns}")]
    Activations { got: usize, columns: usize },
}

/// A `[rows, columns]` matrix in Q8_0.
pub struct Q8_0Matrix {
    rows: usize,
    columns: usize,
    /// `rows x columns` int8, row-major: aligned runs of 32 for the vector loads.
    quants: Vec<i8>,
    /// One scale per block, row-major, widened from f16 once at load.
    scales: Vec<f32>,
}

impl std::fmt::Debug for Q8_0Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q8_0Matrix {{ {} x {} }}", self.rows, self.columns)
    }
}

impl Q8_0Matrix {
    /// Reads `rows` rows of `columns` values in GGML's Q8_0 block layout from `path`.
    pub fn load(path: &Path, rows: usize, columns: usize) -> Result<Self, Q8_0Error> {
        let name = path.display().to_string();
        let read_error = |source| Q8_0Error::Read { path: name.clone(), source };
        let mut matrix = Self::zeros(rows, columns)?;
        let file = File::open(path).map_err(read_error)?;
        let actual = file.metadata().map_err(read_error)?.len();
        let row_bytes = columns / BLOCK * BLOCK_BYTES;
        let expected = (rows * row_bytes) as u64;
        if actual != expected {
            return Err(Q8_0Error::Size { path: name, actual, expected, rows, columns });
        }
        // A few thousand rows at a time: the file is not held twice in memory.
        let mut reader = BufReader::new(file);
        let mut chunk = vec![0u8; row_bytes * 4096];
        let mut row = 0;
        while row < rows {
            let take = (rows - row).min(4096);
            let bytes = &mut chunk[..take * row_bytes];
            reader.read_exact(bytes).map_err(read_error)?;
            matrix.unpack_blocks(row, bytes);
            row += take;
        }
        Ok(matrix)
    }

    /// The matrix from Q8_0 blocks in memory, `rows x columns / 32` of them.
    pub fn from_blocks(blocks: &[u8], rows: usize, columns: usize) -> Result<Self, Q8_0Error> {
        let mut matrix = Self::zeros(rows, columns)?;
        let expected = rows * (columns / BLOCK) * BLOCK_BYTES;
        if blocks.len() != expected {
            return Err(Q8_0Error::Size {
                path: "(in memory)".into(),
                actual: blocks.len() as u64,
                expected: expected as u64,
                rows,
                columns,
            });
        }
        matrix.unpack_blocks(0, blocks);
        Ok(matrix)
    }

    /// The matrix from its int8 values (`rows x columns`, row-major) and one f16 scale per block.
    pub fn from_parts(quants: Vec<i8>, scales: &[f16], rows: usize, columns: usize) -> Result<Self, Q8_0Error> {
        let mut matrix = Self::zeros(0, columns)?;
        if quants.len() != rows * columns || scales.len() * BLOCK != quants.len() {
            return Err(Q8_0Error::Size {
                path: "(in memory)".into(),
                actual: (quants.len() + 2 * scales.len()) as u64,
                expected: (rows * columns / BLOCK * BLOCK_BYTES) as u64,
                rows,
                columns,
            });
        }
        matrix.rows = rows;
        matrix.quants = quants;
        matrix.scales = scales.iter().map(|s| s.to_f32()).collect();
        Ok(matrix)
    }

    fn zeros(rows: usize, columns: usize) -> Result<Self, Q8_0Error> {
        if !columns.is_multiple_of(BLOCK) {
            return Err(Q8_0Error::Width { columns });
        }
        Ok(Self { rows, columns, quants: vec![0; rows * columns], scales: vec![0.0; rows * columns / BLOCK] })
    }

    /// Splits whole rows of blocks, starting at `first_row`, into quants and scales.
    fn unpack_blocks(&mut self, first_row: usize, blocks: &[u8]) {
        let first_block = first_row * self.columns / BLOCK;
        for (n, block) in blocks.chunks_exact(BLOCK_BYTES).enumerate() {
            let index = first_block + n;
            self.scales[index] = f16::from_bits(u16::from_le_bytes([block[0], block[1]])).to_f32();
            for (quant, &byte) in self.quants[index * BLOCK..(index + 1) * BLOCK].iter_mut().zip(&block[2..]) {
                *quant = byte as i8;
            }
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn columns(&self) -> usize {
        self.columns
    }

    /// Bytes a pass over the weights reads.
    pub fn weight_bytes(&self) -> usize {
        self.quants.len() + self.scales.len() * std::mem::size_of::<f32>()
    }

    /// `out[m, n] = W[n] . x[m]` for every row `m` of `activations` (`m x columns`) into `out`
    /// (`m x rows`), on `threads` threads: one activation row splits the matrix's rows among
    /// them, several split the activation rows (each thread then reads the whole matrix, in
    /// tiles that stay in cache while its rows pass over them).
    pub fn multiply(&self, activations: &[f32], out: &mut [f32], threads: usize) -> Result<(), Q8_0Error> {
        if !activations.len().is_multiple_of(self.columns.max(1))
            || out.len() * self.columns != activations.len() * self.rows
        {
            return Err(Q8_0Error::Activations { got: activations.len(), columns: self.columns });
        }
        let m = activations.len() / self.columns.max(1);
        // Waking a pool thread costs about what a small product takes (Gemma 3 270M's k and v:
        // 640 x 256): below this size one thread does a row's product alone.
        let threads = match m == 1 && self.rows * self.columns < PARALLEL_MIN_WEIGHTS {
            true => 1,
            false => threads.max(1),
        };
        if m == 0 || self.rows == 0 {
            return Ok(());
        }
        if m < threads {
            for (x, out) in activations.chunks_exact(self.columns).zip(out.chunks_exact_mut(self.rows)) {
                let x = QuantizedRow::of(x);
                let per_thread = self.rows.div_ceil(threads);
                run_parts(out.chunks_mut(per_thread).enumerate(), |(part, out)| {
                    dot_rows(self, part * per_thread, &x, out)
                });
            }
            return Ok(());
        }
        let rows_per_thread = m.div_ceil(threads);
        let parts = activations.chunks(rows_per_thread * self.columns).zip(out.chunks_mut(rows_per_thread * self.rows));
        run_parts(parts, |(xs, out)| {
            let xs: Vec<QuantizedRow> = xs.chunks_exact(self.columns).map(QuantizedRow::of).collect();
            // 16 KiB of weights at a time (Gemma 3 270M: 25 rows), against every activation row.
            let tile = (16384 / self.columns).max(1);
            for first in (0..self.rows).step_by(tile) {
                let last = (first + tile).min(self.rows);
                for (x, out) in xs.iter().zip(out.chunks_exact_mut(self.rows)) {
                    dot_rows(self, first, x, &mut out[first..last]);
                }
            }
        });
        Ok(())
    }
}

/// Runs `work` on every part: on the threads of tract's pool where the model has several
/// (`use_threads`), one after the other otherwise. A pool, not threads of our own: a decode step
/// makes over a hundred of these products, and starting threads for each cost more than some of
/// them take.
fn run_parts<P: Send>(parts: impl Iterator<Item = P>, work: impl Fn(P) + Sync) {
    match tract_linalg::multithread::current_tract_executor() {
        // The calling thread takes the first part itself: a pool thread that wakes for a
        // part takes a while, and one could otherwise take both parts before the other wakes.
        tract_linalg::multithread::Executor::MultiThread(pool) => pool.in_place_scope(|scope| {
            let mut parts = parts;
            let first = parts.next();
            for part in parts {
                let work = &work;
                scope.spawn(move |_| work(part));
            }
            if let Some(first) = first {
                work(first);
            }
        }),
        _ => parts.for_each(work),
    }
}

/// A hidden row quantized as llama.cpp's `quantize_row_q8_0` does (per block of 32,
/// `d = max |x| / 127`, `q = round(x / d)`), but with `d` kept in f32: it never goes to disk.
struct QuantizedRow {
    quants: Vec<i8>,
    scales: Vec<f32>,
}

impl QuantizedRow {
    fn of(values: &[f32]) -> Self {
        let mut quants = vec![0i8; values.len()];
        let mut scales = Vec::with_capacity(values.len() / BLOCK);
        for (block, out) in values.chunks_exact(BLOCK).zip(quants.chunks_exact_mut(BLOCK)) {
            let max = block.iter().fold(0f32, |max, v| max.max(v.abs()));
            let scale = max / 127.0;
            let inverse = if scale == 0.0 { 0.0 } else { 1.0 / scale };
            for (q, &v) in out.iter_mut().zip(block) {
                *q = (v * inverse).round().clamp(-127.0, 127.0) as i8;
            }
            scales.push(scale);
        }
        Self { quants, scales }
    }
}

/// `out[i] = W[first + i] . x` for the rows `out` covers, with the fastest kernel this CPU has.
fn dot_rows(matrix: &Q8_0Matrix, first: usize, x: &QuantizedRow, out: &mut [f32]) {
    let blocks = matrix.columns / BLOCK;
    let weights = &matrix.quants[first * matrix.columns..(first + out.len()) * matrix.columns];
    let scales = &matrix.scales[first * blocks..(first + out.len()) * blocks];
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA, checked just above.
        unsafe { x86::dot_rows_avx2(weights, scales, x, out) };
        return;
    }
    #[cfg(target_arch = "aarch64")]
    {
        // SAFETY: NEON is part of every aarch64 CPU.
        unsafe { arm::dot_rows_neon(weights, scales, x, out) };
        return;
    }
    #[allow(unreachable_code)]
    dot_rows_reference(weights, scales, x, out)
}

/// The reference the vector kernels are held to: each block's integer dot product, scaled by
/// both blocks' scales, summed in block order.
fn dot_rows_reference(weights: &[i8], scales: &[f32], x: &QuantizedRow, out: &mut [f32]) {
    let columns = x.quants.len();
    let blocks = columns / BLOCK;
    for (row, logit) in out.iter_mut().enumerate() {
        let w = &weights[row * columns..(row + 1) * columns];
        let d = &scales[row * blocks..(row + 1) * blocks];
        *logit = (0..blocks)
            .map(|b| {
                let dot: i32 = w[b * BLOCK..(b + 1) * BLOCK]
                    .iter()
                    .zip(&x.quants[b * BLOCK..(b + 1) * BLOCK])
                    .map(|(&w, &x)| i32::from(w) * i32::from(x))
                    .sum();
                d[b] * x.scales[b] * dot as f32
            })
            .sum();
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{QuantizedRow, BLOCK};

    /// llama.cpp's AVX2 `q8_0 x q8_0` block product: `maddubs` multiplies unsigned by signed
    /// bytes, so it takes |w| and x with w's sign (this way round a weight of -128 is right: its
    /// |w| is the byte 128, while x, within +-127, never overflows); pairs of products (at most
    /// 2 x 128 x 127) fit its i16 sums, and `madd` with ones widens them to i32.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_rows_avx2(weights: &[i8], scales: &[f32], x: &QuantizedRow, out: &mut [f32]) {
        let columns = x.quants.len();
        let blocks = columns / BLOCK;
        let ones = _mm256_set1_epi16(1);
        for (row, logit) in out.iter_mut().enumerate() {
            let w = weights[row * columns..].as_ptr();
            let d = &scales[row * blocks..(row + 1) * blocks];
            let mut sum = _mm256_setzero_ps();
            for (b, (&dw, &dx)) in d.iter().zip(&x.scales).enumerate() {
                // SAFETY: block b of row `row` and of x lie inside their slices (sizes checked
                // by the callers: `columns` values per row).
                let wv = unsafe { _mm256_loadu_si256(w.add(b * BLOCK) as *const __m256i) };
                let xv = unsafe { _mm256_loadu_si256(x.quants.as_ptr().add(b * BLOCK) as *const __m256i) };
                let products = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
                let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(products, ones));
                sum = _mm256_fmadd_ps(_mm256_set1_ps(dw * dx), dot, sum);
            }
            let half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
            let quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
            *logit = _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)));
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use std::arch::aarch64::*;

    use super::{QuantizedRow, BLOCK};

    /// Widening multiplies (i8 x i8 into i16, at most 128 x 128) added pairwise into i32: the
    /// base NEON of every aarch64 core, the Pi 4's Cortex-A72 included (no dot-product needed).
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn dot_rows_neon(weights: &[i8], scales: &[f32], x: &QuantizedRow, out: &mut [f32]) {
        let columns = x.quants.len();
        let blocks = columns / BLOCK;
        for (row, logit) in out.iter_mut().enumerate() {
            let w = weights[row * columns..].as_ptr();
            let d = &scales[row * blocks..(row + 1) * blocks];
            let mut sum = vdupq_n_f32(0.0);
            for (b, (&dw, &dx)) in d.iter().zip(&x.scales).enumerate() {
                // SAFETY: block b of row `row` and of x lie inside their slices.
                let (w0, w1, x0, x1) = unsafe {
                    let xp = x.quants.as_ptr().add(b * BLOCK);
                    (vld1q_s8(w.add(b * BLOCK)), vld1q_s8(w.add(b * BLOCK + 16)), vld1q_s8(xp), vld1q_s8(xp.add(16)))
                };
                let mut dot = vpaddlq_s16(vmull_s8(vget_low_s8(w0), vget_low_s8(x0)));
                dot = vpadalq_s16(dot, vmull_high_s8(w0, x0));
                dot = vpadalq_s16(dot, vmull_s8(vget_low_s8(w1), vget_low_s8(x1)));
                dot = vpadalq_s16(dot, vmull_high_s8(w1, x1));
                sum = vfmaq_n_f32(sum, vcvtq_f32_s32(dot), dw * dx);
            }
            *logit = vaddvq_f32(sum);
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    /// Random Q8_0 blocks, every int8 value possible (-128 included).
    pub(crate) fn random_blocks(rng: &mut ChaCha8Rng, rows: usize, columns: usize) -> Vec<u8> {
        let mut blocks = Vec::new();
        for _ in 0..rows * columns / BLOCK {
            let scale = f16::from_f32(rng.random_range(1e-4..2e-2));
            blocks.extend_from_slice(&scale.to_bits().to_le_bytes());
            blocks.extend((0..BLOCK).map(|_| rng.random::<u8>()));
        }
        blocks
    }

    fn dequantized(matrix: &Q8_0Matrix) -> Vec<f32> {
        matrix.quants.iter().enumerate().map(|(i, &q)| f32::from(q) * matrix.scales[i / BLOCK]).collect()
    }

    #[test]
    fn activations_quantize_as_llama_cpp_does() {
        let mut values = vec![0.0f32; BLOCK];
        values[0] = 1.27;
        values[1] = -0.5;
        values[2] = 0.004;
        let row = QuantizedRow::of(&values);
        let scale = 1.27f32 / 127.0;
        assert_eq!(row.scales, vec![scale]);
        assert_eq!(row.quants[0], 127);
        assert_eq!(&row.quants[..4], &[(1.27 / scale).round() as i8, (-0.5 / scale).round() as i8, 0, 0]);
        let zeros = QuantizedRow::of(&[0.0; BLOCK]);
        assert_eq!((zeros.scales[0], zeros.quants.iter().all(|&q| q == 0)), (0.0, true));
    }

    #[test]
    fn the_vector_kernel_and_every_split_give_the_reference_products() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (rows, columns) = (1031, 640);
        let matrix = Q8_0Matrix::from_blocks(&random_blocks(&mut rng, rows, columns), rows, columns).unwrap();
        let m = 5;
        let activations: Vec<f32> = (0..m * columns).map(|_| rng.random_range(-3.0..3.0)).collect();
        let mut reference = vec![0.0; m * rows];
        for (x, out) in activations.chunks_exact(columns).zip(reference.chunks_exact_mut(rows)) {
            dot_rows_reference(&matrix.quants, &matrix.scales, &QuantizedRow::of(x), out);
        }
        // One row splits the matrix among threads; several rows split the rows. Run on a pool of
        // three, as `use_threads` makes for the model.
        let pool = tract_linalg::multithread::Executor::multithread(3);
        for (rows_used, threads) in [(1, 1), (1, 2), (1, 3), (1, 8), (5, 1), (5, 2), (5, 3), (5, 8)] {
            let mut out = vec![0.0; rows_used * rows];
            tract_linalg::multithread::multithread_tract_scope(pool.clone(), || {
                matrix.multiply(&activations[..rows_used * columns], &mut out, threads).unwrap()
            });
            for (index, (&got, &want)) in out.iter().zip(&reference).enumerate() {
                // Exact integer blocks; only the order of the f32 sums of 20 blocks differs.
                assert!(
                    (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "{rows_used} rows, {threads} threads, output {index}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn products_are_close_to_f32_ones() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (rows, columns) = (64, 256);
        let matrix = Q8_0Matrix::from_blocks(&random_blocks(&mut rng, rows, columns), rows, columns).unwrap();
        let hidden: Vec<f32> = (0..columns).map(|_| rng.random_range(-1.0..1.0)).collect();
        let weights = dequantized(&matrix);
        let mut out = vec![0.0; rows];
        matrix.multiply(&hidden, &mut out, 2).unwrap();
        for (row, &got) in out.iter().enumerate() {
            let w = &weights[row * columns..(row + 1) * columns];
            let exact: f32 = w.iter().zip(&hidden).map(|(w, x)| w * x).sum();
            let scale: f32 = w.iter().zip(&hidden).map(|(w, x)| (w * x).abs()).sum();
            // 8-bit activations: each product is off by at most half a step of its block.
            assert!((got - exact).abs() <= 0.01 * scale, "row {row}: {got} vs {exact} (scale {scale})");
        }
    }

    #[test]
    fn shapes_that_do_not_fit_are_refused_with_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("output_layer.q8_0");
        std::fs::write(&path, vec![0u8; 10 * BLOCK_BYTES - 1]).unwrap();
        let error = Q8_0Matrix::load(&path, 5, 64).unwrap_err().to_string();
        assert!(error.contains("output_layer.q8_0: 339 bytes, but 5 rows of 64 Q8_0 values take 340"), "{error}");
        assert!(Q8_0Matrix::load(&path, 5, 60).unwrap_err().to_string().contains("multiple of 32"));
        let matrix = Q8_0Matrix::from_blocks(&[0; 2 * BLOCK_BYTES], 1, 64).unwrap();
        let error = matrix.multiply(&[0.0; 65], &mut [0.0; 1], 1).unwrap_err().to_string();
        assert_eq!(error, "65 activations are not whole rows of 64");
    }

    #[test]
    fn a_file_loads_to_the_same_matrix_as_its_blocks_and_parts() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (rows, columns) = (5000, 64);
        let blocks = random_blocks(&mut rng, rows, columns);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("output_layer.q8_0");
        std::fs::write(&path, &blocks).unwrap();
        let loaded = Q8_0Matrix::load(&path, rows, columns).unwrap();
        let direct = Q8_0Matrix::from_blocks(&blocks, rows, columns).unwrap();
        assert_eq!((loaded.quants == direct.quants, loaded.scales == direct.scales), (true, true));
        assert_eq!(direct.scales[1], f16::from_bits(u16::from_le_bytes([blocks[34], blocks[35]])).to_f32());
        assert_eq!(direct.quants[BLOCK], blocks[36] as i8);
        let scales: Vec<f16> = direct.scales.iter().map(|&s| f16::from_f32(s)).collect();
        let parts = Q8_0Matrix::from_parts(direct.quants.clone(), &scales, rows, columns).unwrap();
        assert_eq!((parts.quants == direct.quants, parts.scales == direct.scales), (true, true));
    }
}
