//! Block-quantized matrices in GGML's formats, Q8_0 (per row, blocks of one f16 scale and 32
//! int8) and Q4_0 (one f16 scale and 32 4-bit values), and their products with f32 activations,
//! by our own kernels.
//!
//! Decoding reads every weight once per token, so bytes are time: f32 reads four times Q8_0's
//! bytes and eight times Q4_0's. tract multiplies Q4_0 weights by a matrix-vector kernel only,
//! so a prompt's rows went through it one at a time. Here each activation row is quantized to
//! Q8_0 and each block's dot product is exact integer arithmetic, as llama.cpp's `q8_0 x q8_0`
//! and `q4_0 x q8_0`. The output layer (`output_layer.rs`) and the decoder's projections
//! (`block_matmul.rs`, a tract operator) use it.
//!
//! The weights are held in panels of eight rows, interleaved four values at a time, so that one
//! vector register holds four values of each of eight rows: a dot-product instruction (x86's
//! VNNI `vpdpbusd`, ARM's `sdot`) against four values of an activation row broadcast to every
//! lane then gives eight rows' sums at once, with no horizontal additions, and each weight
//! load serves up to four activation rows (on AVX-512, each activation load two panels). Q4_0
//! packs two such registers in one: group `c`'s values in the low nibbles, group `c + 4`'s in
//! the high ones. The scales stay in f16, as in GGML's blocks: in f32 they were a fifth of a
//! Q4_0 matrix's bytes, and decoding reads every one. Kernels (`x86.rs`, `arm.rs`): AVX-512 VNNI,
//! AVX2 (with F16C), NEON with and without the dot-product extension, and a scalar reference
//! every one of them is tested against.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use tract_onnx::prelude::f16;

use super::product_threads;

/// Values per Q8_0 block.
pub const BLOCK: usize = 32;
/// Bytes of one Q8_0 block on disk: an f16 scale, then 32 int8.
pub const BLOCK_BYTES: usize = 2 + BLOCK;

/// Rows per panel: one 32-bit lane of a 256-bit register each.
const PANEL: usize = 8;
/// Values of a row that sit together in a panel: one 32-bit lane.
const GROUP: usize = 4;
/// Bytes of one Q8_0 block of a panel: 32 values of each of its rows.
const Q8_0_PANEL_BLOCK: usize = PANEL * BLOCK;
/// Bytes of one Q4_0 block of a panel: 32 nibbles of each of its rows.
const Q4_0_PANEL_BLOCK: usize = PANEL * BLOCK / 2;
/// Activation rows one kernel call takes at most.
const TILE_ROWS: usize = 4;
/// Panels one kernel call takes at most: the AVX-512 kernel takes two, so that each activation
/// value it broadcasts serves sixteen weight rows (it has the registers for twice the sums).
const TILE_PANELS: usize = 2;
/// The sums one kernel call gives: per activation row, the rows of its panels.
type TileSums = [[f32; PANEL * TILE_PANELS]; TILE_ROWS];

/// How Q8_0 weights are stored: XORed with this. x86 keeps them offset by 128, unsigned,
/// because VNNI multiplies unsigned bytes by signed ones (the activations are the signed side;
/// the offset comes back out through each activation block's sum). ARM's `sdot` is signed by
/// signed. Q4_0's nibbles are stored as GGML has them everywhere: 0-15 for -8 to 7.
#[cfg(target_arch = "x86_64")]
const Q8_0_WEIGHT_BIAS: u8 = 0x80;
#[cfg(not(target_arch = "x86_64"))]
const Q8_0_WEIGHT_BIAS: u8 = 0;

/// Multiply-adds in a product below which it runs on one thread.
const PARALLEL_MIN_PRODUCTS: usize = 1 << 19;

/// Activation rows a thread quantizes at a time, in a product of many rows.
const ROWS_PER_CLAIM: usize = 16;

/// Threads the products run on, set with tract's (`model::use_threads`).
static THREADS: AtomicUsize = AtomicUsize::new(1);

pub fn set_threads(threads: usize) {
    THREADS.store(threads.max(1), Ordering::Relaxed);
}

pub fn threads() -> usize {
    THREADS.load(Ordering::Relaxed)
}

/// GGML Q8_0 `blocks` as f32 into `out`, 32 values a block, as llama.cpp dequantizes them
/// (`f32(q) * f32(d)`); stops at the end of the shorter of the two.
pub fn dequantize_blocks(blocks: &[u8], out: &mut [f32]) {
    for (block, values) in blocks.chunks_exact(BLOCK_BYTES).zip(out.chunks_mut(BLOCK)) {
        let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
        for (value, &q) in values.iter_mut().zip(&block[2..]) {
            *value = f32::from(q as i8) * d;
        }
    }
}

/// How a matrix's weights are stored: GGML's block formats, 32 values a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    Q8_0,
    Q4_0,
}

impl BlockFormat {
    /// Bytes of one block in GGML's files: an f16 scale, then the values.
    pub fn file_block_bytes(self) -> usize {
        match self {
            BlockFormat::Q8_0 => BLOCK_BYTES,
            BlockFormat::Q4_0 => 2 + BLOCK / 2,
        }
    }

    fn panel_block_bytes(self) -> usize {
        match self {
            BlockFormat::Q8_0 => Q8_0_PANEL_BLOCK,
            BlockFormat::Q4_0 => Q4_0_PANEL_BLOCK,
        }
    }

    /// A zero weight, as it is stored.
    fn zero_byte(self) -> u8 {
        match self {
            BlockFormat::Q8_0 => Q8_0_WEIGHT_BIAS,
            BlockFormat::Q4_0 => 0x88,
        }
    }
}

impl std::fmt::Display for BlockFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BlockFormat::Q8_0 => "Q8_0",
            BlockFormat::Q4_0 => "Q4_0",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BlockMatrixError {
    #[error("a {format} matrix {columns} wide: the width must be a multiple of {BLOCK}")]
    Width { format: BlockFormat, columns: usize },
    #[error("{path}: {actual} bytes, but {rows} rows of {columns} {format} values take {expected}")]
    Size { path: String, format: BlockFormat, actual: u64, expected: u64, rows: usize, columns: usize },
    #[error(
        "{values} values and {scales} scales for a {rows} x {columns} {format} matrix: it takes {} and {}",
        rows * columns, rows * columns / BLOCK
    )]
    Parts { format: BlockFormat, values: usize, scales: usize, rows: usize, columns: usize },
    #[error("{path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{got} activations are not whole rows of {columns}")]
    Activations { got: usize, columns: usize },
}

/// A `[rows, columns]` matrix in Q8_0 or Q4_0.
pub struct BlockMatrix {
    format: BlockFormat,
    rows: usize,
    columns: usize,
    /// Panel by panel (the last one padded with zero rows), block by block. Q8_0: for each group
    /// of four values the eight rows' four in turn, `[panel][block][group][row][4]`, each byte
    /// XORed with `Q8_0_WEIGHT_BIAS`. Q4_0: `[panel][block][chunk][row][4]`, each byte group
    /// `chunk`'s nibble low and group `chunk + 4`'s high.
    quants: Vec<u8>,
    /// One scale per block, `[panel][block][row]`, in f16 as GGML keeps them: a decode step reads
    /// every one, and in f32 they were a fifth of a Q4_0 matrix's bytes. The kernels widen eight
    /// at a time (F16C's `vcvtph2ps`, ARM's `fcvtl`).
    scales: Vec<f16>,
}

impl std::fmt::Debug for BlockMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockMatrix {{ {} x {} {} }}", self.rows, self.columns, self.format)
    }
}

impl BlockMatrix {
    /// Reads `rows` rows of `columns` values in GGML's `format` block layout from `path`.
    pub fn load(path: &Path, format: BlockFormat, rows: usize, columns: usize) -> Result<Self, BlockMatrixError> {
        let name = path.display().to_string();
        let read_error = |source| BlockMatrixError::Read { path: name.clone(), source };
        let mut matrix = Self::zeros(format, rows, columns)?;
        let file = File::open(path).map_err(read_error)?;
        let actual = file.metadata().map_err(read_error)?.len();
        let row_bytes = columns / BLOCK * format.file_block_bytes();
        let expected = (rows * row_bytes) as u64;
        if actual != expected {
            return Err(BlockMatrixError::Size { path: name, format, actual, expected, rows, columns });
        }
        // A few thousand rows at a time: the file is not held twice in memory.
        let mut reader = BufReader::new(file);
        let mut chunk = vec![0u8; row_bytes * 4096];
        let mut row = 0;
        while row < rows {
            let take = (rows - row).min(4096);
            let bytes = &mut chunk[..take * row_bytes];
            reader.read_exact(bytes).map_err(read_error)?;
            matrix.put_file_blocks(row, bytes);
            row += take;
        }
        Ok(matrix)
    }

    /// The matrix from Q8_0 blocks in memory, `rows x columns / 32` of them.
    pub fn from_blocks(blocks: &[u8], rows: usize, columns: usize) -> Result<Self, BlockMatrixError> {
        let mut matrix = Self::zeros(BlockFormat::Q8_0, rows, columns)?;
        let expected = rows * (columns / BLOCK) * BLOCK_BYTES;
        matrix.check_size(blocks.len(), expected)?;
        matrix.put_file_blocks(0, blocks);
        Ok(matrix)
    }

    /// The Q8_0 matrix from its int8 values (`rows x columns`, row-major) and one f16 scale per
    /// block.
    pub fn from_parts(quants: &[i8], scales: &[f16], rows: usize, columns: usize) -> Result<Self, BlockMatrixError> {
        let mut matrix = Self::zeros(BlockFormat::Q8_0, rows, columns)?;
        matrix.check_parts(quants.len(), scales.len())?;
        let blocks = columns / BLOCK;
        for (row, (values, scales)) in
            quants.chunks_exact(columns.max(1)).zip(scales.chunks_exact(blocks.max(1))).enumerate()
        {
            for (block, (values, scale)) in values.chunks_exact(BLOCK).zip(scales).enumerate() {
                matrix.put_block(row, block, *scale, values.iter().copied());
            }
        }
        Ok(matrix)
    }

    /// The Q4_0 matrix from its nibbles as ONNX's `MatMulNBits` holds them (`[rows, columns /
    /// 32, 16]` bytes, value `i` of a block in byte `i / 2`, low nibble first, `q - 8` the
    /// value) and one scale per block, rounded to f16 as GGML's Q4_0 holds it (the bundles'
    /// scripts round them so already; another graph's f32 scales move by at most 1/4096 of
    /// themselves, far inside the 4-bit values' own steps).
    pub fn from_q4_0_parts(
        nibbles: &[u8],
        scales: &[f32],
        rows: usize,
        columns: usize,
    ) -> Result<Self, BlockMatrixError> {
        let mut matrix = Self::zeros(BlockFormat::Q4_0, rows, columns)?;
        let blocks = columns / BLOCK;
        matrix.check_parts(2 * nibbles.len(), scales.len())?;
        for (n, (bytes, &scale)) in nibbles.chunks_exact(BLOCK / 2).zip(scales).enumerate() {
            let values = bytes.iter().flat_map(|&byte| [byte & 0x0F, byte >> 4]).map(|q| q as i8 - 8);
            matrix.put_block(n / blocks, n % blocks, f16::from_f32(scale), values);
        }
        Ok(matrix)
    }

    fn zeros(format: BlockFormat, rows: usize, columns: usize) -> Result<Self, BlockMatrixError> {
        if !columns.is_multiple_of(BLOCK) {
            return Err(BlockMatrixError::Width { format, columns });
        }
        let padded = rows.div_ceil(PANEL) * PANEL;
        Ok(Self {
            format,
            rows,
            columns,
            quants: vec![format.zero_byte(); padded * columns / BLOCK * format.panel_block_bytes() / PANEL],
            scales: vec![f16::ZERO; padded * columns / BLOCK],
        })
    }

    /// `Ok` when the `actual` bytes given for the matrix are the `expected`.
    fn check_size(&self, actual: usize, expected: usize) -> Result<(), BlockMatrixError> {
        if actual == expected {
            return Ok(());
        }
        Err(BlockMatrixError::Size {
            path: "(in memory)".into(),
            format: self.format,
            actual: actual as u64,
            expected: expected as u64,
            rows: self.rows,
            columns: self.columns,
        })
    }

    /// `Ok` when `values` and `scales` are the matrix's counts.
    fn check_parts(&self, values: usize, scales: usize) -> Result<(), BlockMatrixError> {
        let (rows, columns) = (self.rows, self.columns);
        if values == rows * columns && scales == rows * columns / BLOCK {
            return Ok(());
        }
        Err(BlockMatrixError::Parts { format: self.format, values, scales, rows, columns })
    }

    /// Places whole rows of GGML blocks of the matrix's format, starting at `first_row`. A
    /// Q4_0 block holds value `i` in the low nibble of byte `i` and value `i + 16` in its high
    /// nibble (`block_q4_0`), unlike `MatMulNBits`' pairs.
    fn put_file_blocks(&mut self, first_row: usize, blocks: &[u8]) {
        let per_row = self.columns / BLOCK;
        for (n, block) in blocks.chunks_exact(self.format.file_block_bytes()).enumerate() {
            let scale = f16::from_bits(u16::from_le_bytes([block[0], block[1]]));
            let (row, index) = (first_row + n / per_row, n % per_row);
            match self.format {
                BlockFormat::Q8_0 => self.put_block(row, index, scale, block[2..].iter().map(|&q| q as i8)),
                BlockFormat::Q4_0 => {
                    let nibbles = &block[2..];
                    let low = nibbles.iter().map(|&byte| (byte & 0x0F) as i8 - 8);
                    let high = nibbles.iter().map(|&byte| (byte >> 4) as i8 - 8);
                    self.put_block(row, index, scale, low.chain(high));
                }
            }
        }
    }

    /// Places one block of one row: its scale and 32 values (within -8..=7 for Q4_0).
    fn put_block(&mut self, row: usize, block: usize, scale: f16, values: impl Iterator<Item = i8>) {
        let panel_block = row / PANEL * (self.columns / BLOCK) + block;
        let start = panel_block * self.format.panel_block_bytes();
        for (index, value) in values.enumerate() {
            let (at, shift) = place(self.format, row % PANEL, index);
            let byte = &mut self.quants[start + at];
            *byte = match self.format {
                BlockFormat::Q8_0 => value as u8 ^ Q8_0_WEIGHT_BIAS,
                BlockFormat::Q4_0 => *byte & !(0x0F << shift) | ((value + 8) as u8 & 0x0F) << shift,
            };
        }
        self.scales[panel_block * PANEL + row % PANEL] = scale;
    }

    pub fn format(&self) -> BlockFormat {
        self.format
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn columns(&self) -> usize {
        self.columns
    }

    /// Row `row` as f32 into `out` (`columns` values): each value times its block's scale, as
    /// llama.cpp dequantizes (`f32(q) * f32(d)`).
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        for (column, value) in out.iter_mut().enumerate().take(self.columns) {
            *value = f32::from(self.weight(row, column)) * self.scale(row, column / BLOCK);
        }
    }

    /// The weight at `row`, `column`, as GGML's block holds it (`q - 8` for Q4_0).
    fn weight(&self, row: usize, column: usize) -> i8 {
        let panel_block = row / PANEL * (self.columns / BLOCK) + column / BLOCK;
        let (at, shift) = place(self.format, row % PANEL, column % BLOCK);
        stored_weight(self.format, self.quants[panel_block * self.format.panel_block_bytes() + at], shift)
    }

    /// The scale of `row`'s block `block`.
    fn scale(&self, row: usize, block: usize) -> f32 {
        self.scales[(row / PANEL * (self.columns / BLOCK) + block) * PANEL + row % PANEL].to_f32()
    }

    /// `out[m, n] = W[n] . x[m]` for every row `m` of `activations` (`m x columns`) into `out`
    /// (`m x rows`), on `threads` threads.
    pub fn multiply(&self, activations: &[f32], out: &mut [f32], threads: usize) -> Result<(), BlockMatrixError> {
        self.multiply_with(Kernel::best(), activations, out, threads)
    }

    /// `multiply` with the given kernel. The threads share out the panels: each takes the next
    /// chunk of them, against every activation row, until none is left, so that a thread that
    /// wakes late takes fewer rather than holding the others up.
    fn multiply_with(
        &self,
        kernel: Kernel,
        activations: &[f32],
        out: &mut [f32],
        threads: usize,
    ) -> Result<(), BlockMatrixError> {
        if !activations.len().is_multiple_of(self.columns.max(1))
            || out.len() * self.columns != activations.len() * self.rows
        {
            return Err(BlockMatrixError::Activations { got: activations.len(), columns: self.columns });
        }
        let m = activations.len() / self.columns.max(1);
        if m == 0 || self.rows == 0 {
            return Ok(());
        }
        // Handing out a small product (Gemma 3 270M's k and v at one row: 640 x 256) costs about
        // what it takes: one thread does it alone. Set when the hand-off went through rayon; with
        // the product threads, 2^17 decoded within the noise of this (72-79 tokens/s, 2 threads).
        let threads = match m * self.rows * self.columns < PARALLEL_MIN_PRODUCTS {
            true => 1,
            false => threads.max(1),
        };
        let xs = QuantizedRow::all(activations, self.columns, threads);
        let panels = self.rows.div_ceil(PANEL);
        let chunk = panels.div_ceil(threads * CHUNKS_PER_THREAD).next_multiple_of(kernel.panels_at_once());
        let chunks = panels.div_ceil(chunk);
        let next = AtomicUsize::new(0);
        let out = SharedRows { start: out.as_mut_ptr(), len: out.len() };
        product_threads::run(threads, &|| loop {
            let claimed = next.fetch_add(1, Ordering::Relaxed);
            if claimed >= chunks {
                break;
            }
            // SAFETY: each chunk is claimed once, and its panels' outputs are its own.
            unsafe { self.products(kernel, claimed * chunk..(claimed * chunk + chunk).min(panels), &xs, &out) };
        });
        Ok(())
    }

    /// The products of the rows of `panels` with every row of `xs` into `out` (`xs.len()` rows
    /// of `self.rows`), weights in tiles that stay in cache while every activation row passes.
    ///
    /// # Safety
    /// No other thread writes the outputs of these panels meanwhile.
    unsafe fn products(&self, kernel: Kernel, panels: std::ops::Range<usize>, xs: &[QuantizedRow], out: &SharedRows) {
        let blocks = self.columns / BLOCK;
        let panel_bytes = blocks * self.format.panel_block_bytes();
        let step = kernel.panels_at_once();
        // Whole kernel calls' worth of panels, about `TILE_BYTES` of weights.
        let tile = (TILE_BYTES / panel_bytes).max(step).next_multiple_of(step);
        for tile_start in panels.clone().step_by(tile) {
            let tile_panels = tile_start..(tile_start + tile).min(panels.end);
            for (group, xs) in xs.chunks(TILE_ROWS).enumerate() {
                for first in tile_panels.clone().step_by(step) {
                    let last = (first + step).min(tile_panels.end);
                    let quants = &self.quants[first * panel_bytes..last * panel_bytes];
                    let scales = &self.scales[first * blocks * PANEL..last * blocks * PANEL];
                    let mut sums = [[0.0f32; PANEL * TILE_PANELS]; TILE_ROWS];
                    kernel.panels(self.format, last - first, quants, scales, xs, &mut sums);
                    let row = first * PANEL;
                    let live = ((last - first) * PANEL).min(self.rows - row);
                    for (m, sums) in sums[..xs.len()].iter().enumerate() {
                        // SAFETY: this panel's outputs, inside `out` (`multiply_with` checked its
                        // size), written by this thread alone (the caller's promise).
                        unsafe { out.write((group * TILE_ROWS + m) * self.rows + row, &sums[..live]) };
                    }
                }
            }
        }
    }
}

/// Weights a thread's panels pass every activation row in: they stay in its L2 cache (the Pi 5's
/// Cortex-A76 has 512 KiB), so that a product of many rows (a long prompt, an image's patches)
/// reads its activations from further out once per this much of the weights. Measured here on
/// 2520 x 3072 x 768 (an image's MLP, one thread): 55 G multiply-adds/s at 16 KiB, 71 at 256 KiB.
const TILE_BYTES: usize = 256 * 1024;

/// Chunks of panels per thread: enough that a late thread's share is small, few enough that
/// claiming them costs nothing.
const CHUNKS_PER_THREAD: usize = 8;

/// The output of a product, written by several threads at once, each to its own panels' columns.
struct SharedRows {
    start: *mut f32,
    len: usize,
}

// SAFETY: the threads write disjoint parts (see `BlockMatrix::products`).
unsafe impl Sync for SharedRows {}

impl SharedRows {
    /// # Safety
    /// No other thread touches `at..at + values.len()` meanwhile.
    unsafe fn write(&self, at: usize, values: &[f32]) {
        assert!(at + values.len() <= self.len, "a product's output out of bounds");
        // SAFETY: inside the buffer (checked), and this thread's alone (the caller's promise).
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), self.start.add(at), values.len()) };
    }
}

/// A hidden row quantized as llama.cpp's `quantize_row_q8_0` does (per block of 32,
/// `d = max |x| / 127`, `q = round(x / d)`, halves to even as its vector code rounds them, which
/// compiles to vector instructions here too), but with `d` kept in f32: it never goes to disk.
#[derive(Default)]
struct QuantizedRow {
    quants: Vec<i8>,
    scales: Vec<f32>,
    /// Per block, the sum of its values: times a weight offset (Q8_0's 128 on x86, Q4_0's 8),
    /// what that offset adds to a block's integer dot product.
    sums: Vec<i32>,
}

impl QuantizedRow {
    /// Every row of `activations` (rows of `columns`), on `threads` threads when there are
    /// enough rows: a long prompt's rows would otherwise be quantized on one thread while the
    /// others wait for the product.
    fn all(activations: &[f32], columns: usize, threads: usize) -> Vec<Self> {
        let rows = activations.chunks_exact(columns);
        if threads <= 1 || rows.len() < 2 * ROWS_PER_CLAIM {
            return rows.map(Self::of).collect();
        }
        let mut xs: Vec<Self> = std::iter::repeat_with(Self::default).take(rows.len()).collect();
        let claims = Mutex::new(xs.chunks_mut(ROWS_PER_CLAIM).zip(activations.chunks(ROWS_PER_CLAIM * columns)));
        product_threads::run(threads, &|| loop {
            // A panic elsewhere poisons the lock; the claims themselves are still whole.
            let claimed = claims.lock().unwrap_or_else(PoisonError::into_inner).next();
            let Some((xs, values)) = claimed else { break };
            for (x, row) in xs.iter_mut().zip(values.chunks_exact(columns)) {
                *x = Self::of(row);
            }
        });
        xs
    }

    fn of(values: &[f32]) -> Self {
        let mut quants = vec![0i8; values.len()];
        let mut scales = Vec::with_capacity(values.len() / BLOCK);
        for (block, out) in values.chunks_exact(BLOCK).zip(quants.chunks_exact_mut(BLOCK)) {
            let max = block.iter().fold(0f32, |max, v| max.max(v.abs()));
            let scale = max / 127.0;
            let inverse = if scale == 0.0 { 0.0 } else { 1.0 / scale };
            for (q, &v) in out.iter_mut().zip(block) {
                *q = (v * inverse).round_ties_even().clamp(-127.0, 127.0) as i8;
            }
            scales.push(scale);
        }
        Self {
            sums: quants.chunks_exact(BLOCK).map(|block| block.iter().map(|&q| i32::from(q)).sum()).collect(),
            quants,
            scales,
        }
    }
}

/// The kernel the products run on, on this CPU: `avx512-vnni`, `avx2`, `neon-dotprod`, `neon`
/// or `reference`.
pub fn kernel_name() -> &'static str {
    Kernel::best().name()
}

/// A way to compute a panel's products. Each checks nothing itself: `panel` checks the sizes once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Reference,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    #[cfg(target_arch = "aarch64")]
    Neon,
    #[cfg(target_arch = "aarch64")]
    NeonDotProduct,
}

/// Calls `kernel::<M>(args)` with `M` the number of activation rows (1 to 4): a constant, so
/// that each count's sums stay in registers.
macro_rules! for_rows {
    ($rows:expr, $kernel:ident($($arg:expr),*)) => {
        match $rows {
            1 => $kernel::<1>($($arg),*),
            2 => $kernel::<2>($($arg),*),
            3 => $kernel::<3>($($arg),*),
            _ => $kernel::<4>($($arg),*),
        }
    };
}

/// `for_rows` for a kernel that also takes one or two panels: `kernel::<M, P>(args)`.
#[cfg(target_arch = "x86_64")]
macro_rules! for_rows_and_panels {
    ($rows:expr, $panels:expr, $kernel:ident($($arg:expr),*)) => {
        match ($rows, $panels) {
            (1, 1) => $kernel::<1, 1>($($arg),*),
            (2, 1) => $kernel::<2, 1>($($arg),*),
            (3, 1) => $kernel::<3, 1>($($arg),*),
            (_, 1) => $kernel::<4, 1>($($arg),*),
            (1, _) => $kernel::<1, 2>($($arg),*),
            (2, _) => $kernel::<2, 2>($($arg),*),
            (3, _) => $kernel::<3, 2>($($arg),*),
            (_, _) => $kernel::<4, 2>($($arg),*),
        }
    };
}

impl Kernel {
    /// Every kernel this CPU runs, slowest first.
    fn available() -> Vec<Kernel> {
        #[allow(unused_mut)]
        let mut kernels = vec![Kernel::Reference];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            kernels.push(Kernel::Avx2);
            if std::arch::is_x86_feature_detected!("avx512vnni") && std::arch::is_x86_feature_detected!("avx512vl") {
                kernels.push(Kernel::Avx512Vnni);
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            kernels.push(Kernel::Neon);
            if std::arch::is_aarch64_feature_detected!("dotprod") {
                kernels.push(Kernel::NeonDotProduct);
            }
        }
        kernels
    }

    fn name(self) -> &'static str {
        match self {
            Kernel::Reference => "reference",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => "avx512-vnni",
            #[cfg(target_arch = "aarch64")]
            Kernel::Neon => "neon",
            #[cfg(target_arch = "aarch64")]
            Kernel::NeonDotProduct => "neon-dotprod",
        }
    }

    fn best() -> Kernel {
        static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| Self::available().last().copied().unwrap_or(Kernel::Reference))
    }

    /// Panels one call of `panels` takes at most.
    fn panels_at_once(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => TILE_PANELS,
            _ => 1,
        }
    }

    /// `sums[m][i]` = row `i` of the `panels` panels (`quants`, `scales`: up to
    /// `panels_at_once`, one after the other) . `xs[m]`, for up to four rows of `xs`.
    fn panels(
        self,
        format: BlockFormat,
        panels: usize,
        quants: &[u8],
        scales: &[f16],
        xs: &[QuantizedRow],
        sums: &mut TileSums,
    ) {
        // What the vector kernels read without bounds checks.
        let blocks = xs.first().map_or(0, |x| x.scales.len());
        assert!(
            (1..=TILE_ROWS).contains(&xs.len())
                && (1..=self.panels_at_once()).contains(&panels)
                && scales.len() == panels * blocks * PANEL
                && quants.len() == panels * blocks * format.panel_block_bytes()
                && xs.iter().all(|x| {
                    x.scales.len() == blocks && x.sums.len() == blocks && x.quants.len() == blocks * BLOCK
                }),
            "{format} panels and their activation rows differ in width"
        );
        #[cfg(target_arch = "aarch64")]
        use arm::{q4_0_dot_product, q4_0_neon, q8_0_dot_product, q8_0_neon};
        #[cfg(target_arch = "x86_64")]
        use x86::{q4_0_avx2, q4_0_vnni, q8_0_avx2, q8_0_vnni};
        use BlockFormat::{Q4_0, Q8_0};
        // SAFETY: each kernel runs only where `available` found its CPU features, and the sizes
        // it relies on are checked above.
        match (self, format) {
            (Kernel::Reference, _) => panel_reference(format, quants, scales, xs, sums),
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx2, Q8_0) => unsafe { for_rows!(xs.len(), q8_0_avx2(quants, scales, xs, sums)) },
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx2, Q4_0) => unsafe { for_rows!(xs.len(), q4_0_avx2(quants, scales, xs, sums)) },
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx512Vnni, Q8_0) => unsafe {
                for_rows_and_panels!(xs.len(), panels, q8_0_vnni(quants, scales, xs, sums))
            },
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx512Vnni, Q4_0) => unsafe {
                for_rows_and_panels!(xs.len(), panels, q4_0_vnni(quants, scales, xs, sums))
            },
            #[cfg(target_arch = "aarch64")]
            (Kernel::Neon, Q8_0) => unsafe { for_rows!(xs.len(), q8_0_neon(quants, scales, xs, sums)) },
            #[cfg(target_arch = "aarch64")]
            (Kernel::Neon, Q4_0) => unsafe { for_rows!(xs.len(), q4_0_neon(quants, scales, xs, sums)) },
            #[cfg(target_arch = "aarch64")]
            (Kernel::NeonDotProduct, Q8_0) => unsafe {
                for_rows!(xs.len(), q8_0_dot_product(quants, scales, xs, sums))
            },
            #[cfg(target_arch = "aarch64")]
            (Kernel::NeonDotProduct, Q4_0) => unsafe {
                for_rows!(xs.len(), q4_0_dot_product(quants, scales, xs, sums))
            },
        }
    }
}

/// Where value `index` of a block of row `row` of a panel is stored, within the panel's block:
/// its byte, and the shift of its nibble (Q4_0) or 0.
fn place(format: BlockFormat, row: usize, index: usize) -> (usize, u32) {
    let lane = row * GROUP + index % GROUP;
    match format {
        BlockFormat::Q8_0 => (lane + index / GROUP * PANEL * GROUP, 0),
        BlockFormat::Q4_0 => (lane + index % (BLOCK / 2) / GROUP * PANEL * GROUP, 4 * (index / (BLOCK / 2)) as u32),
    }
}

/// The weight as GGML's block holds it (`q - 8` for Q4_0) from its stored byte and shift.
fn stored_weight(format: BlockFormat, byte: u8, shift: u32) -> i8 {
    match format {
        BlockFormat::Q8_0 => (byte ^ Q8_0_WEIGHT_BIAS) as i8,
        BlockFormat::Q4_0 => (byte >> shift & 0x0F) as i8 - 8,
    }
}

/// The reference the vector kernels are held to: each block's integer dot product, scaled by
/// both blocks' scales, summed in block order.
fn panel_reference(format: BlockFormat, quants: &[u8], scales: &[f16], xs: &[QuantizedRow], sums: &mut TileSums) {
    let block_bytes = format.panel_block_bytes();
    for (x, sums) in xs.iter().zip(sums.iter_mut()) {
        for (row, sum) in sums[..PANEL].iter_mut().enumerate() {
            *sum = (0..x.scales.len())
                .map(|block| {
                    let weights = &quants[block * block_bytes..(block + 1) * block_bytes];
                    let dot: i32 = (0..BLOCK)
                        .map(|i| {
                            let (at, shift) = place(format, row, i);
                            i32::from(stored_weight(format, weights[at], shift))
                                * i32::from(x.quants[block * BLOCK + i])
                        })
                        .sum();
                    scales[block * PANEL + row].to_f32() * x.scales[block] * dot as f32
                })
                .sum();
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod arm;
#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
pub(crate) mod tests {
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

    /// `W x` straight from GGML's blocks, row by row: no panels.
    fn products_from_blocks(blocks: &[u8], rows: usize, x: &QuantizedRow) -> Vec<f32> {
        let per_row = x.scales.len();
        (0..rows)
            .map(|row| {
                let row_blocks = &blocks[row * per_row * BLOCK_BYTES..(row + 1) * per_row * BLOCK_BYTES];
                row_blocks
                    .chunks_exact(BLOCK_BYTES)
                    .enumerate()
                    .map(|(b, block)| {
                        let scale = f16::from_bits(u16::from_le_bytes([block[0], block[1]])).to_f32();
                        let dot: i32 = block[2..]
                            .iter()
                            .zip(&x.quants[b * BLOCK..])
                            .map(|(&w, &x)| i32::from(w as i8) * i32::from(x))
                            .sum();
                        scale * x.scales[b] * dot as f32
                    })
                    .sum()
            })
            .collect()
    }

    fn dequantized(matrix: &BlockMatrix) -> Vec<f32> {
        let (rows, columns) = (matrix.rows(), matrix.columns());
        (0..rows * columns)
            .map(|i| {
                f32::from(matrix.weight(i / columns, i % columns)) * matrix.scale(i / columns, i % columns / BLOCK)
            })
            .collect()
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
        // Halves round to even, as llama.cpp's vector code does (`_mm256_round_ps`, `vcvtnq`).
        let halves = QuantizedRow::of(&[[127.0, 2.5, -2.5, 3.5].as_slice(), &[0.0; BLOCK - 4]].concat());
        assert_eq!(&halves.quants[..4], &[127, 2, -2, 4]);
        let zeros = QuantizedRow::of(&[0.0; BLOCK]);
        assert_eq!((zeros.scales[0], zeros.quants.iter().all(|&q| q == 0)), (0.0, true));
    }

    #[test]
    fn rows_quantized_on_threads_are_the_rows_quantized_one_by_one() {
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        let columns = 96;
        // Enough rows to share out, and a last claim that is not whole.
        let m = 3 * ROWS_PER_CLAIM + 5;
        let activations: Vec<f32> = (0..m * columns).map(|_| rng.random_range(-3.0..3.0)).collect();
        for threads in [1, 2, 3, 8] {
            let xs = QuantizedRow::all(&activations, columns, threads);
            assert_eq!(xs.len(), m);
            for (x, row) in xs.iter().zip(activations.chunks_exact(columns)) {
                let alone = QuantizedRow::of(row);
                assert_eq!((&x.quants, &x.scales), (&alone.quants, &alone.scales), "{threads} threads");
                assert_eq!(x.sums, alone.sums);
            }
        }
    }

    /// Random Q4_0 weights as `MatMulNBits` holds them: every nibble possible, and a scale per
    /// block.
    fn random_q4_0(rng: &mut ChaCha8Rng, rows: usize, columns: usize) -> (Vec<u8>, Vec<f32>) {
        let nibbles = (0..rows * columns / 2).map(|_| rng.random::<u8>()).collect();
        let scales =
            (0..rows * columns / BLOCK).map(|_| f16::from_f32(rng.random_range(1e-4..2e-2)).to_f32()).collect();
        (nibbles, scales)
    }

    /// `W x` straight from `MatMulNBits`' nibbles, row by row: no panels.
    fn products_from_q4_0(nibbles: &[u8], scales: &[f32], rows: usize, x: &QuantizedRow) -> Vec<f32> {
        let per_row = x.scales.len();
        (0..rows)
            .map(|row| {
                (0..per_row)
                    .map(|b| {
                        let block = row * per_row + b;
                        let bytes = &nibbles[block * BLOCK / 2..(block + 1) * BLOCK / 2];
                        let dot: i32 = (0..BLOCK)
                            .map(|i| {
                                let q = i32::from(bytes[i / 2] >> (4 * (i % 2)) & 0x0F);
                                (q - 8) * i32::from(x.quants[b * BLOCK + i])
                            })
                            .sum();
                        scales[block] * x.scales[b] * dot as f32
                    })
                    .sum()
            })
            .collect()
    }

    /// Every kernel of this CPU, at every split of threads and activation rows, gives `expected`
    /// (`activations`' rows' products, one after the other).
    fn check_every_kernel_and_split(matrix: &BlockMatrix, activations: &[f32], expected: &[f32]) {
        let (rows, columns) = (matrix.rows(), matrix.columns());
        let kernels = Kernel::available();
        #[cfg(target_arch = "x86_64")]
        if std::env::var_os("CI").is_none() {
            assert!(kernels.contains(&Kernel::Avx2), "{kernels:?}");
        }
        #[cfg(target_arch = "aarch64")]
        assert!(kernels.contains(&Kernel::Neon), "{kernels:?}");
        // Threads share out chunks of panels; activation rows go to the kernels in groups of up
        // to four.
        for kernel in kernels {
            for (rows_used, threads) in [(1, 1), (1, 2), (1, 3), (1, 8), (2, 1), (3, 1), (5, 2), (9, 1), (9, 3), (9, 8)]
            {
                let mut out = vec![0.0; rows_used * rows];
                matrix.multiply_with(kernel, &activations[..rows_used * columns], &mut out, threads).unwrap();
                for (index, (&got, &want)) in out.iter().zip(expected).enumerate() {
                    // Exact integer blocks; only the order of the f32 sums of 20 blocks differs.
                    assert!(
                        (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                        "{} {kernel:?}, {rows_used} rows, {threads} threads, output {index}: {got} vs {want}",
                        matrix.format()
                    );
                }
            }
        }
    }

    #[test]
    fn every_kernel_and_every_split_give_the_products_of_the_blocks() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        // Not a whole number of panels: the last one is padded.
        let (rows, columns) = (1031, 640);
        let m = 9;
        let activations: Vec<f32> = (0..m * columns).map(|_| rng.random_range(-3.0..3.0)).collect();
        let xs: Vec<QuantizedRow> = activations.chunks_exact(columns).map(QuantizedRow::of).collect();

        let blocks = random_blocks(&mut rng, rows, columns);
        let matrix = BlockMatrix::from_blocks(&blocks, rows, columns).unwrap();
        let expected: Vec<f32> = xs.iter().flat_map(|x| products_from_blocks(&blocks, rows, x)).collect();
        check_every_kernel_and_split(&matrix, &activations, &expected);

        let (nibbles, scales) = random_q4_0(&mut rng, rows, columns);
        let matrix = BlockMatrix::from_q4_0_parts(&nibbles, &scales, rows, columns).unwrap();
        let expected: Vec<f32> = xs.iter().flat_map(|x| products_from_q4_0(&nibbles, &scales, rows, x)).collect();
        check_every_kernel_and_split(&matrix, &activations, &expected);
    }

    #[test]
    fn q4_0_weights_are_placed_where_their_parts_say() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (rows, columns) = (19, 96);
        let (nibbles, scales) = random_q4_0(&mut rng, rows, columns);
        let matrix = BlockMatrix::from_q4_0_parts(&nibbles, &scales, rows, columns).unwrap();
        let mut row = vec![0.0; columns];
        for r in 0..rows {
            matrix.dequantize_row(r, &mut row);
            for (column, &value) in row.iter().enumerate() {
                let byte = nibbles[(r * columns + column) / 2];
                let q = i32::from(if column.is_multiple_of(2) { byte & 0x0F } else { byte >> 4 });
                assert_eq!(value, (q - 8) as f32 * scales[(r * columns + column) / BLOCK], "row {r}, column {column}");
            }
        }
        let error = BlockMatrix::from_q4_0_parts(&nibbles[1..], &scales, rows, columns).unwrap_err().to_string();
        assert_eq!(error, "1822 values and 57 scales for a 19 x 96 Q4_0 matrix: it takes 1824 and 57");
    }

    #[test]
    fn products_are_close_to_f32_ones() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (rows, columns) = (64, 256);
        let (nibbles, scales) = random_q4_0(&mut rng, rows, columns);
        let hidden: Vec<f32> = (0..columns).map(|_| rng.random_range(-1.0..1.0)).collect();
        for matrix in [
            BlockMatrix::from_blocks(&random_blocks(&mut rng, rows, columns), rows, columns).unwrap(),
            BlockMatrix::from_q4_0_parts(&nibbles, &scales, rows, columns).unwrap(),
        ] {
            let weights = dequantized(&matrix);
            let mut out = vec![0.0; rows];
            matrix.multiply(&hidden, &mut out, 2).unwrap();
            for (row, &got) in out.iter().enumerate() {
                let w = &weights[row * columns..(row + 1) * columns];
                let exact: f32 = w.iter().zip(&hidden).map(|(w, x)| w * x).sum();
                let scale: f32 = w.iter().zip(&hidden).map(|(w, x)| (w * x).abs()).sum();
                // 8-bit activations: each product is off by at most half a step of its block.
                assert!((got - exact).abs() <= 0.01 * scale, "{row} of {matrix:?}: {got} vs {exact} (scale {scale})");
            }
        }
    }

    #[test]
    fn shapes_that_do_not_fit_are_refused_with_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("output_layer.q8_0");
        std::fs::write(&path, vec![0u8; 10 * BLOCK_BYTES - 1]).unwrap();
        let error = BlockMatrix::load(&path, BlockFormat::Q8_0, 5, 64).unwrap_err().to_string();
        assert!(error.contains("output_layer.q8_0: 339 bytes, but 5 rows of 64 Q8_0 values take 340"), "{error}");
        let error = BlockMatrix::load(&path, BlockFormat::Q4_0, 5, 64).unwrap_err().to_string();
        assert!(error.contains("339 bytes, but 5 rows of 64 Q4_0 values take 180"), "{error}");
        assert!(BlockMatrix::load(&path, BlockFormat::Q8_0, 5, 60).unwrap_err().to_string().contains("multiple of 32"));
        let matrix = BlockMatrix::from_blocks(&[0; 2 * BLOCK_BYTES], 1, 64).unwrap();
        let error = matrix.multiply(&[0.0; 65], &mut [0.0; 1], 1).unwrap_err().to_string();
        assert_eq!(error, "65 activations are not whole rows of 64");
        let error = BlockMatrix::from_parts(&[0; 64], &[f16::ZERO; 3], 1, 64).unwrap_err().to_string();
        assert_eq!(error, "64 values and 3 scales for a 1 x 64 Q8_0 matrix: it takes 64 and 2");
    }

    #[test]
    fn a_file_loads_to_the_same_matrix_as_its_blocks_and_parts() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (rows, columns) = (5001, 64);
        let blocks = random_blocks(&mut rng, rows, columns);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("output_layer.q8_0");
        std::fs::write(&path, &blocks).unwrap();
        let loaded = BlockMatrix::load(&path, BlockFormat::Q8_0, rows, columns).unwrap();
        let direct = BlockMatrix::from_blocks(&blocks, rows, columns).unwrap();
        assert_eq!((loaded.quants == direct.quants, loaded.scales == direct.scales), (true, true));
        // Row 1, block 1: the fourth block of the file.
        let block = &blocks[3 * BLOCK_BYTES..];
        assert_eq!(direct.scale(1, 1), f16::from_bits(u16::from_le_bytes([block[0], block[1]])).to_f32());
        assert_eq!((direct.weight(1, 32), direct.weight(1, 63)), (block[2] as i8, block[33] as i8));
        let quants: Vec<i8> = (0..rows * columns).map(|i| direct.weight(i / columns, i % columns)).collect();
        let scales: Vec<f16> = (0..rows * columns / BLOCK)
            .map(|b| f16::from_f32(direct.scale(b / (columns / BLOCK), b % (columns / BLOCK))))
            .collect();
        let parts = BlockMatrix::from_parts(&quants, &scales, rows, columns).unwrap();
        assert_eq!((parts.quants == direct.quants, parts.scales == direct.scales), (true, true));
    }

    /// GGML's `block_q4_0`: an f16 scale, then value `i` in the low nibble of byte `i` and value
    /// `i + 16` in the high one.
    #[test]
    fn a_q4_0_file_loads_as_ggml_lays_out_its_blocks() {
        let mut rng = ChaCha8Rng::seed_from_u64(17);
        let (rows, columns) = (4099, 64);
        let block_bytes = BlockFormat::Q4_0.file_block_bytes();
        let mut blocks = Vec::new();
        for _ in 0..rows * columns / BLOCK {
            blocks.extend_from_slice(&f16::from_f32(rng.random_range(1e-4..2e-2)).to_bits().to_le_bytes());
            blocks.extend((0..BLOCK / 2).map(|_| rng.random::<u8>()));
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("output_layer.q4_0");
        std::fs::write(&path, &blocks).unwrap();
        let matrix = BlockMatrix::load(&path, BlockFormat::Q4_0, rows, columns).unwrap();
        assert_eq!(matrix.format(), BlockFormat::Q4_0);
        let mut row = vec![0.0; columns];
        for r in [0, 1, 7, 8, 4098] {
            matrix.dequantize_row(r, &mut row);
            for (column, &value) in row.iter().enumerate() {
                let block = &blocks[(r * columns + column) / BLOCK * block_bytes..][..block_bytes];
                let scale = f16::from_bits(u16::from_le_bytes([block[0], block[1]])).to_f32();
                let i = column % BLOCK;
                let nibble = if i < 16 { block[2 + i] & 0x0F } else { block[2 + i - 16] >> 4 };
                assert_eq!(value, f32::from(nibble as i8 - 8) * scale, "row {r}, column {column}");
            }
        }
        // The same values as MatMulNBits' layout gives, multiplied by the same kernels.
        let mut nibbles = Vec::new();
        let mut scales = Vec::new();
        for block in blocks.chunks_exact(block_bytes) {
            scales.push(f16::from_bits(u16::from_le_bytes([block[0], block[1]])).to_f32());
            let values: Vec<u8> =
                block[2..].iter().map(|b| b & 0x0F).chain(block[2..].iter().map(|b| b >> 4)).collect();
            nibbles.extend(values.chunks_exact(2).map(|pair| pair[0] | pair[1] << 4));
        }
        let parts = BlockMatrix::from_q4_0_parts(&nibbles, &scales, rows, columns).unwrap();
        assert_eq!((parts.quants == matrix.quants, parts.scales == matrix.scales), (true, true));
    }
}
