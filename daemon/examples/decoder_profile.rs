//! Where the decoder's time goes, operator by operator: the bundle's decoder graph loaded and
//! optimised as the runtime does, run over TOKENS new positions (the runtime's embeddings of
//! arbitrary ids) after PAST cached ones (a prefill by default; `1 128` is a decode step), timed
//! node by node and summed per operator and output shape.
//!
//! `cargo run --release --example decoder_profile -- BUNDLE [THREADS] [TOKENS=512] [PAST=0]`

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use outpost::model::{Bundle, Runtime};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::plan::{eval, SimpleState};

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
    let model = outpost::model::load_graph(&path)?;
    let mut inputs: TVec<TValue> = tvec!(embedded.embeds.into_tvalue());
    inputs.extend(embedded.per_layer);
    // The caches, [1, heads, past, head_dim] each, follow the embeddings.
    for outlet in &model.input_outlets()?[inputs.len()..] {
        let fact = model.outlet_fact(*outlet)?;
        let dim = |axis: usize| fact.shape[axis].as_i64().map(|d| d as usize).context("a cache with a symbolic shape");
        let shape = [1, dim(1)?, past, dim(3)?];
        let values: Vec<f32> = (0..shape.iter().product()).map(|i| ((i % 97) as f32 * 0.37).sin()).collect();
        inputs.push(tract_ndarray::ArrayD::from_shape_vec(shape.to_vec(), values)?.into_tensor().into_tvalue());
    }
    let plan = model.into_optimized()?.into_runnable()?;
    println!("{}: {tokens} tokens after {past}, {threads} threads", path.display());
    // The first run pays for first-touch allocations; the others are timed, the last reported.
    for run in ["first", "second", "third"] {
        let mut times: HashMap<String, (f64, usize)> = HashMap::new();
        let mut state = SimpleState::new(&plan)?;
        let start = Instant::now();
        state.run_plan_with_eval(inputs.clone(), |context, op_state, node, node_inputs| {
            let node_start = Instant::now();
            let outputs = eval(context, op_state, node, node_inputs);
            let name = node.op.name();
            let output = outputs.as_ref().ok().map(|o| (o[0].datum_type(), o[0].shape().to_vec()));
            let key = match output {
                Some((datum, shape)) => format!("{name} {datum:?} {shape:?}"),
                None => name.to_string(),
            };
            let entry = times.entry(key).or_default();
            entry.0 += node_start.elapsed().as_secs_f64();
            entry.1 += 1;
            outputs
        })?;
        let total = start.elapsed().as_secs_f64();
        println!("{run} run: {:.1} ms, {:.1} tokens/s", total * 1e3, tokens as f64 / total);
        if run == "third" {
            let nodes: usize = times.values().map(|(_, n)| n).sum();
            println!("  {nodes} nodes");
            let mut times: Vec<_> = times.into_iter().collect();
            times.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
            for (op, (seconds, nodes)) in times.iter().take(30) {
                println!("  {op:<60} {nodes:>4} nodes {:>8.2} ms {:>5.1}%", seconds * 1e3, seconds / total * 100.0);
            }
        }
    }
    Ok(())
}
