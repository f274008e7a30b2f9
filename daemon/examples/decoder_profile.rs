//! Where the decoder's time goes, operator by operator: the bundle's decoder graph loaded and
//! optimised as the runtime does, run over TOKENS new positions (the runtime's embeddings of
//! arbitrary ids) after PAST cached ones (a prefill by default; `1 128` is a decode step), timed
//! node by node and summed per operator and output shape. `unfused` leaves the graph's attention
//! as exported (the runtime fuses it, `fuse_attention`).
//!
//! `cargo run --release --example decoder_profile -- BUNDLE [THREADS] [TOKENS=512] [PAST=0] [unfused]`

#[path = "common/node_times.rs"]
mod node_times;

use std::path::Path;

use anyhow::Context;
use outpost::model::{Bundle, Runtime};
use tract_onnx::prelude::*;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().context("usage: decoder_profile BUNDLE [THREADS] [TOKENS] [PAST]")?;
    let threads: usize = args.next().map(|t| t.parse()).transpose()?.unwrap_or(2);
    let tokens: usize = args.next().map(|t| t.parse()).transpose()?.unwrap_or(512);
    let past: usize = args.next().map(|t| t.parse()).transpose()?.unwrap_or(0);
    outpost::model::use_threads(threads);
    let bundle = Bundle::open(Path::new(&dir))?;
    let ids: Vec<u32> = (0..tokens as u32).map(|i| 1000 + i * 7).collect();
    let embedded = Runtime::load(&bundle)?.embed(&ids)?;
    let path = bundle.file("decoder").context("the bundle has no decoder graph")?;
    let mut model = outpost::model::load_graph(&path)?;
    let fused = match args.next().as_deref() {
        Some("unfused") => 0,
        _ => outpost::model::fuse_attention(&mut model, outpost::model::TEXT_QUERY_BLOCK)?,
    };
    let in_place = outpost::model::append_cache_in_place(&mut model)?;
    let mut caches = Vec::new();
    // The caches, [1, heads, past, head_dim] each, follow the embeddings.
    let first_cache = 1 + usize::from(embedded.per_layer.is_some());
    for outlet in &model.input_outlets()?[first_cache..] {
        let fact = model.outlet_fact(*outlet)?;
        let dim = |axis: usize| fact.shape[axis].as_i64().map(|d| d as usize).context("a cache with a symbolic shape");
        let shape = [1, dim(1)?, past, dim(3)?];
        let values: Vec<f32> = (0..shape.iter().product()).map(|i| ((i % 97) as f32 * 0.37).sin()).collect();
        let plain = tract_ndarray::ArrayD::from_shape_vec(shape.to_vec(), values)?.into_tensor();
        let appended = model.outlet_successors(*outlet).iter().all(|s| model.node(s.node).op.name() == "KvAppend");
        caches.push((plain, appended));
    }
    let plan = model.into_optimized()?.into_runnable()?;
    println!(
        "{}: {tokens} tokens after {past}, {threads} threads, {fused} attentions fused, {in_place} caches appended in place",
        path.display()
    );
    // The first run pays for first-touch allocations; the others are timed, the last reported.
    // Each run has inputs of its own, as the runtime's steps do: a cache no one else holds is
    // appended to in place.
    for run in ["first", "second", "third"] {
        let mut inputs: TVec<TValue> = tvec!(embedded.embeds.clone().into_tvalue());
        inputs.extend(embedded.per_layer.clone());
        for (plain, appended) in &caches {
            // As the runtime holds them after a step: where the graph appends to them, in buffers
            // with room for more.
            let cache = if *appended { outpost::model::cache_with_room(plain.clone())? } else { plain.clone() };
            inputs.push(cache.into_tvalue());
        }
        let times = node_times::time_nodes(&plan, inputs)?;
        println!("{run} run: {:.1} ms, {:.1} tokens/s", times.seconds * 1e3, tokens as f64 / times.seconds);
        if run == "third" {
            times.print(30);
        }
    }
    Ok(())
}
