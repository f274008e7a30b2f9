//! Where the vision encoder's time goes, operator by operator: the bundle's vision graph planned
//! as the runtime plans it (optimised for a fixed patch count, its attention fused), one run
//! timed node by node, the times summed per operator and output shape.
//! `unfused` as a fourth argument keeps the exported attention, to compare.
//!
//! `cargo run --release --example vision_profile -- BUNDLE/vision.onnx [THREADS] [SOFT_TOKENS] [unfused]`

#[path = "common/node_times.rs"]
mod node_times;

use std::collections::HashMap;

use anyhow::Context;
use tract_onnx::prelude::*;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args.next().context("usage: vision_profile VISION_ONNX [THREADS] [SOFT_TOKENS] [unfused]")?;
    let threads: usize = args.next().map(|t| t.parse()).transpose()?.unwrap_or(2);
    let soft_tokens: usize = args.next().map(|p| p.parse()).transpose()?.unwrap_or(280);
    outpost::model::use_threads(threads);
    // A 4:3 picture, as the station's camera gives: at most budgets its patches fill part of the
    // grid, and the rest is padding the attention masks out, as in the runtime.
    let picture = image::RgbImage::from_fn(640, 480, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, 128]));
    let patches = outpost::model::prepare_image(&picture, &outpost::model::ImageParams::gemma4(soft_tokens))?;
    let real = patches.positions.chunks(2).filter(|p| p[0] >= 0).count();
    let model = outpost::model::load_graph(std::path::Path::new(&path))?;
    let count = model.symbols.sym("num_patches");
    let mut model = model.set_symbols(&HashMap::from([(count, TDim::Val(patches.max_patches as i64))]))?;
    let fused = match args.next().as_deref() {
        Some("unfused") => 0,
        _ => outpost::model::fuse_attention(&mut model, outpost::model::IMAGE_QUERY_BLOCK)?,
    };
    let plan = model.into_optimized()?.into_runnable()?;
    let (max, values) = (patches.max_patches, patches.patch_values);
    let pixels = tract_ndarray::Array3::from_shape_vec((1, max, values), patches.pixel_values)?;
    let positions = tract_ndarray::Array3::from_shape_vec((1, max, 2), patches.positions)?;
    let inputs: TVec<TValue> = tvec!(pixels.into_tensor().into(), positions.into_tensor().into());
    let patches = format!("{real} of {max}");
    println!("{path}: {patches} patches, {threads} threads, {fused} attentions fused");
    // The first run pays for first-touch allocations; the second is the one reported.
    for run in ["first", "second"] {
        let times = node_times::time_nodes(&plan, inputs.clone())?;
        println!("{run} run: {:.2} s", times.seconds);
        if run == "second" {
            times.print(20);
        }
    }
    Ok(())
}
