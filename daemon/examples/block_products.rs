//! Throughput of the block-quantized products at the shapes the E2B model runs: one row
//! (decode), 512 rows (a long prompt) and 2520 rows (an image's patches), in multiply-adds per
//! second; and the output layers' matrix-vector products (Gemma 3 270M's, E2B's), in GB/s of
//! weights read beside the machine's read bandwidth (`bench::read_bandwidth`).
//!
//! `cargo run --release --example block_products -- [THREADS] [q8_0|q4_0]`

use std::time::Instant;

use outpost::model::{block_kernel, BlockMatrix};
use tract_onnx::prelude::f16;

fn main() -> anyhow::Result<()> {
    let threads: usize = std::env::args().nth(1).map(|t| t.parse()).transpose()?.unwrap_or(2);
    let format = std::env::args().nth(2).unwrap_or_else(|| "q8_0".into());
    println!("{format} weights, kernel {}, {threads} threads", block_kernel());
    // (rows of the activations, weight rows, columns): the E2B decoder's gate/up and down, the
    // vision encoder's MLP.
    println!("read bandwidth: {:.1} GB/s on {threads} threads", outpost::bench::read_bandwidth(1 << 30, threads));
    for (m, n, k) in [
        (1, 12288, 1536),
        (512, 12288, 1536),
        (512, 1536, 6144),
        (2520, 3072, 768),
        (2520, 768, 3072),
        (1, 262144, 640),
        (1, 262144, 1536),
    ] {
        // f16 scales, as GGML's blocks hold them.
        let scales = (0..n * k / 32).map(|i| f16::from_f32(0.001 + (i % 13) as f32 * 1e-4));
        let matrix = match format.as_str() {
            "q8_0" => {
                let quants: Vec<i8> = (0..n * k).map(|i| ((i * 7919) % 255) as i8).collect();
                BlockMatrix::from_parts(&quants, &scales.collect::<Vec<_>>(), n, k)?
            }
            "q4_0" => {
                let nibbles: Vec<u8> = (0..n * k / 2).map(|i| ((i * 7919) % 256) as u8).collect();
                BlockMatrix::from_q4_0_parts(&nibbles, &scales.map(f16::to_f32).collect::<Vec<_>>(), n, k)?
            }
            other => anyhow::bail!("{other}: the weight format is q8_0 or q4_0"),
        };
        let activations: Vec<f32> = (0..m * k).map(|i| ((i % 97) as f32 - 48.0) * 0.01).collect();
        let mut out = vec![0f32; m * n];
        matrix.multiply(&activations, &mut out, threads)?;
        // The machine this is written on is shared: the fastest of several runs is the kernel's own
        // figure, the median what a run meets.
        let runs = (4e10 / (m * n * k) as f64).clamp(5.0, 400.0) as usize;
        let mut seconds: Vec<f64> = (0..runs)
            .map(|_| {
                let start = Instant::now();
                matrix.multiply(&activations, &mut out, threads).map(|()| start.elapsed().as_secs_f64())
            })
            .collect::<Result<_, _>>()?;
        seconds.sort_by(f64::total_cmp);
        let rate = |seconds: f64| (m * n * k) as f64 / seconds / 1e9;
        // As GGML's files hold them: 34 bytes (Q8_0) or 18 (Q4_0) per 32 weights.
        let bytes = (n * k / 32 * matrix.format().file_block_bytes()) as f64;
        println!(
            "{m:>5} x {n:>6} x {k:>5}: {:>8.2} ms, best {:>6.1}, median {:>6.1} G multiply-adds/s, {:>5.1} GB/s of weights",
            seconds[0] * 1e3,
            rate(seconds[0]),
            rate(seconds[runs / 2]),
            bytes / seconds[runs / 2] / 1e9
        );
    }
    Ok(())
}
